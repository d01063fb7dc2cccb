"""Table "robustness": per-image worst-case accuracy over the attack suite at each ε, its AUC (ranked within each
decoder), the paper's FGSM AUC beside it, and the masking check.

    python analysis/table_robustness.py RESULTS_DIR [--out DIR]

Prints the table as Markdown; with --out also writes it as .csv (the numbers) and .tex (booktabs).
"""

from __future__ import annotations

import sys

from _common import table_main

from ibbench import report


def main(argv: list[str] | None = None) -> int:
    return table_main(__doc__, lambda runs, metrics: report.robustness_table(runs), argv)


if __name__ == "__main__":
    sys.exit(main())
