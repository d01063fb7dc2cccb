"""Table "robustness_attacks": accuracy under each attack of the suite and the per-image worst case, per ε.

    python analysis/table_robustness_attacks.py RESULTS_DIR [--out DIR]

Prints the table as Markdown; with --out also writes it as .csv (the numbers) and .tex (booktabs).
"""

from __future__ import annotations

import sys

from _common import table_main

from ibbench import report


def main(argv: list[str] | None = None) -> int:
    return table_main(__doc__, lambda runs, metrics: report.attack_table(runs), argv)


if __name__ == "__main__":
    sys.exit(main())
