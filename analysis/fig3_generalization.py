"""Figure 3: generalization error (1 − test accuracy) vs β'' per decoder, CE as the reference line.

    python analysis/fig3_generalization.py RESULTS_DIR [--out DIR]

Writes fig3_generalization.png and fig3_generalization.pdf to --out (default: the current folder).
"""

from __future__ import annotations

import sys

from _common import figure_main

from ibbench import report


def main(argv: list[str] | None = None) -> int:
    return figure_main(__doc__, "fig3_generalization", lambda runs, metrics: report.figure_generalization(runs), argv)


if __name__ == "__main__":
    sys.exit(main())
