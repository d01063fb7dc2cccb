"""Figure 2: information-plane trajectories (I[X;Z], H[Y|Z]) by β'', with and without the noise.

    python analysis/fig2_infoplane.py RESULTS_DIR [--out DIR]

Writes fig2_infoplane.png and fig2_infoplane.pdf to --out (default: the current folder).
"""

from __future__ import annotations

import sys

from _common import figure_main

from ibbench import report


def main(argv: list[str] | None = None) -> int:
    return figure_main(__doc__, "fig2_infoplane", lambda runs, metrics: report.figure_infoplane(runs, metrics), argv)


if __name__ == "__main__":
    sys.exit(main())
