"""Figure 3: generalization error (1 − test accuracy) vs β'' per decoder, CE as the reference line.

    python analysis/fig3_generalization.py RESULTS_DIR [--out DIR]

Writes fig3_generalization.png and fig3_generalization.pdf to --out (default: the current folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ibbench import report, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a sweep folder (OUT/<sweep>) or an output root")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the .png and .pdf")
    args = parser.parse_args(argv)
    runs = results.load_runs(args.results)
    fig = report.figure_generalization(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix in ("png", "pdf"):
        fig.savefig(args.out / f"fig3_generalization.{suffix}", dpi=report.DPI)
    print(f"wrote {args.out / 'fig3_generalization'}.png and .pdf", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
