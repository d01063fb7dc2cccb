"""What every analysis script shares: read a results folder, build one table or figure, write it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from ibbench import report, results

# (runs, per-epoch metrics) -> a table or a figure; most builders only look at runs.
Builder = Callable[[pd.DataFrame, pd.DataFrame], object]


def _args(doc: str, out_help: str, argv: list[str] | None, default_out: Path | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("results", help="a sweep folder (OUT/<sweep>) or an output root")
    parser.add_argument("--out", type=Path, default=default_out, help=out_help)
    return parser.parse_args(argv)


def table_main(doc: str, build: Builder, argv: list[str] | None = None) -> int:
    """Print the table as Markdown; with --out also write its .csv and .tex."""
    args = _args(doc, "also write the table's .csv and .tex here", argv, None)
    table = build(results.load_runs(args.results), results.load_metrics(args.results))
    print(report.table_markdown(table))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{table.name}.csv").write_text(report.table_csv(table))
        (args.out / f"{table.name}.tex").write_text(report.table_latex(table))
        print(f"wrote {args.out / table.name}.csv and .tex", file=sys.stderr)
    return 0


def figure_main(doc: str, name: str, build: Builder, argv: list[str] | None = None) -> int:
    """Write the figure as <out>/<name>.png and .pdf."""
    args = _args(doc, "folder for the .png and .pdf", argv, Path("."))
    fig = build(results.load_runs(args.results), results.load_metrics(args.results))
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix in ("png", "pdf"):
        fig.savefig(args.out / f"{name}.{suffix}", dpi=report.DPI)
    print(f"wrote {args.out / name}.png and .pdf", file=sys.stderr)
    return 0
