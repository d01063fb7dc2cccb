"""The `ibbench` command: the only module that prints (with rich) and reads the environment."""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ibbench.errors import ConfigError

console = Console()
err_console = Console(stderr=True)


def package_version() -> str:
    try:
        return version("ibbench")
    except PackageNotFoundError:
        return "0+unknown"


def _run_command(args: argparse.Namespace) -> int:
    from ibbench import results, train
    from ibbench.config import load_run_config

    cfg = load_run_config(args.config, args.set)
    name = Path(args.config).stem if args.config else "default"
    run_dir = Path(args.out) / re.sub(r"[^a-z0-9_-]+", "-", name.lower()) / results.run_id(cfg)
    if results.run_state(run_dir) == "done":
        console.print(f"[green]done already[/green]: {run_dir} (delete its DONE file to train again)")
        _print_summary(results.read_summary(run_dir) or {})
        return 0
    resume = results.run_state(run_dir) in ("incomplete", "failed")
    console.print(f"{'resuming' if resume else 'training'} run {run_dir.name} in {run_dir}")
    progress = Progress(
        TextColumn("[bold]epoch {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    with progress:
        task = progress.add_task("train", total=cfg.epochs, status="", completed=0)
        last: dict[str, float] = {}

        def on_epoch(terms: dict) -> None:
            status = f"loss {terms['loss']:.4g}  lr {terms['lr']:.2g}"
            accs = [f"{k.removeprefix('acc/')} {v:.3f}" for k, v in last.items() if k.startswith("acc/")]
            progress.update(
                task, completed=terms["epoch"], status=status + ("  acc " + ", ".join(accs) if accs else "")
            )

        try:
            summary = train.run(cfg, run_dir, report=last.update, progress=on_epoch)
        except KeyboardInterrupt:
            progress.stop()
            again = " ".join(shlex.quote(a) for a in sys.argv[1:]) or "run"
            err_console.print(
                f"interrupted: the last finished epoch is checkpointed in {run_dir}; resume with: ibbench {again}"
            )
            return 130
        except train.TrainingFailed as exc:
            progress.stop()
            err_console.print(f"run failed: {exc} (see {run_dir / results.SUMMARY})", markup=False)
            return 1
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    final = summary.get("final") or {}
    table = Table(title=f"run {summary.get('run_id', '?')}: {summary.get('status', '?')}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in final.items():
        if key in ("run_id",) or key.startswith("train_acc/") or key.startswith("test_acc/"):
            continue
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    for decoder, attacks in (summary.get("robustness") or {}).items():
        for attack, curve in attacks.items():
            points = ", ".join(f"{float(eps) * 255:.0f}/255: {acc:.3f}" for eps, acc in curve.items())
            table.add_row(f"{attack} {decoder}", points)
    if "wall_time" in summary:
        table.add_row("wall time", f"{summary['wall_time']:.1f} s")
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ibbench",
        description="Sweeps and benchmarks for information-bottleneck training with a k-NN entropy estimator.",
    )
    parser.add_argument("--version", action="version", version=f"ibbench {package_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="train one run (resumes an interrupted one)")
    run.add_argument("config", nargs="?", help="a YAML file of RunConfig fields (default: all defaults)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    run.add_argument("--out", default="runs", help="output root; the run goes to OUT/<config name>/<run_id>")
    run.set_defaults(handler=_run_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except ConfigError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
