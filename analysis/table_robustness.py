"""Table "robustness": accuracy under FGSM (and PGD) at each ε and the area under the curve, ranked.

    python analysis/table_robustness.py RESULTS_DIR [--out DIR]

Prints the table as Markdown; with --out also writes it as .csv (the numbers) and .tex (booktabs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ibbench import report, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a sweep folder (OUT/<sweep>) or an output root")
    parser.add_argument("--out", type=Path, help="also write the table's .csv and .tex here")
    args = parser.parse_args(argv)
    runs = results.load_runs(args.results)
    table = report.robustness_table(runs)
    print(report.table_markdown(table))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{table.name}.csv").write_text(report.table_csv(table))
        (args.out / f"{table.name}.tex").write_text(report.table_latex(table))
        print(f"wrote {args.out / table.name}.csv and .tex", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
