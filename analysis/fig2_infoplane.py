"""Figure 2: information-plane trajectories (I[X;Z], H[Y|Z]) by β'', with and without the noise.

    python analysis/fig2_infoplane.py RESULTS_DIR [--out DIR]

Writes fig2_infoplane.png and fig2_infoplane.pdf to --out (default: the current folder).
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
    fig = report.figure_infoplane(runs, results.load_metrics(args.results))
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix in ("png", "pdf"):
        fig.savefig(args.out / f"fig2_infoplane.{suffix}", dpi=report.DPI)
    print(f"wrote {args.out / 'fig2_infoplane'}.png and .pdf", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
