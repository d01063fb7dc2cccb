"""Table "information plane": final and best-epoch I[X;Z] and H[Y|Z] per configuration.

    python analysis/table_infoplane.py RESULTS_DIR [--out DIR]

Prints the table as Markdown; with --out also writes it as .csv (the numbers) and .tex (booktabs).
"""

from __future__ import annotations

import sys

from _common import table_main

from ibbench import report


def main(argv: list[str] | None = None) -> int:
    return table_main(__doc__, lambda runs, metrics: report.infoplane_table(runs, metrics), argv)


if __name__ == "__main__":
    sys.exit(main())
