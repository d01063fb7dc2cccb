"""Table "accuracy": test accuracy per configuration and decoder, mean ± s.e. over seeds; baselines as rows.

    python analysis/table_accuracy.py RESULTS_DIR [--out DIR]

Prints the table as Markdown; with --out also writes it as .csv (the numbers) and .tex (booktabs).
"""

from __future__ import annotations

import sys

from _common import table_main

from ibbench import report


def main(argv: list[str] | None = None) -> int:
    return table_main(__doc__, lambda runs, metrics: report.accuracy_table(runs), argv)


if __name__ == "__main__":
    sys.exit(main())
