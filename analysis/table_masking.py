"""Table "masking": gradient-masking diagnostics per (model, decoder): zero-gradient share, Square gap, worst case
at the largest ε, and the verdict.

    python analysis/table_masking.py RESULTS_DIR [--out DIR]

Prints the table as Markdown; with --out also writes it as .csv (the numbers) and .tex (booktabs).
"""

from __future__ import annotations

import sys

from _common import table_main

from ibbench import report


def main(argv: list[str] | None = None) -> int:
    return table_main(__doc__, lambda runs, metrics: report.masking_table(runs), argv)


if __name__ == "__main__":
    sys.exit(main())
