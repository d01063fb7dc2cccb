"""Figure 1: worst-case accuracy vs ε, a panel per decoder family, one line per β'', baselines through the same
decoder (dashed) and their own classifier (dotted).

    python analysis/fig1_robustness.py RESULTS_DIR [--out DIR]

Writes fig1_robustness.png and fig1_robustness.pdf to --out (default: the current folder).
"""

from __future__ import annotations

import sys

from _common import figure_main

from ibbench import report


def main(argv: list[str] | None = None) -> int:
    return figure_main(__doc__, "fig1_robustness", lambda runs, metrics: report.figure_robustness(runs), argv)


if __name__ == "__main__":
    sys.exit(main())
