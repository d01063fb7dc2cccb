"""The `ibbench` command: the only module that prints (with rich) and reads the environment."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import math
import re
import shlex
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from rich.console import Console
from rich.live import Live
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
            err_console.print(f"interrupted: {run_dir} resumes from its last checkpoint; resume with: ibbench {again}")
            return 130
        except train.TrainingFailed as exc:
            progress.stop()
            err_console.print(f"run failed: {exc} (see {run_dir / results.SUMMARY})", markup=False, soft_wrap=True)
            return 1
        except (results.RunLocked, OSError) as exc:  # held by another process; a disk that refuses any write
            progress.stop()
            err_console.print(f"run not trained: {exc}", markup=False, soft_wrap=True)
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


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return "–" if value is None else str(value)


STATE_STYLE = {
    "done": "green",
    "stopped": "cyan",
    "failed": "red",
    "incomplete": "yellow",
    "new": "dim",
    "running": "bold blue",
}


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)) or seconds != seconds:
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _config_cell(values: dict, field: str) -> str:
    """A config value for a table; "–" where the run's objective does not read the field (β'' of a CE run)."""
    from ibbench.objectives import OBJECTIVES, unused_fields

    objective = values.get("objective")
    if objective in OBJECTIVES and field in unused_fields(objective):
        return "–"
    return _fmt(values.get(field))


def _runs_table(title: str, rows: list[dict], fields: list[str], metric: str | None = None) -> Table:
    """One line per run: run_id, the given config fields, state, and (with a metric) its value and the run's time."""
    table = Table(title=title)
    table.add_column("run_id", no_wrap=True, min_width=12)  # ids are what users copy: never cut them
    for name in fields:
        table.add_column(name)
    table.add_column("state")
    if metric is not None:
        table.add_column(metric, justify="right", overflow="fold")
        table.add_column("time", justify="right")
    for row in rows:
        style = STATE_STYLE.get(row["status"], "")
        cells = [row["run_id"], *(_config_cell(row, f) for f in fields), f"[{style}]{row['status']}[/{style}]"]
        if metric is not None:
            value = row.get(metric)
            cells += [_fmt(value) if isinstance(value, (int, float)) and value == value else "–",
                      _duration(row.get("wall_time"))]  # fmt: skip
        table.add_row(*cells)
    return table


def _plan_table(planned, title: str, metric: str | None = None) -> Table:
    """The runs of a plan with what varies between them; with a metric, each run's value of it and its time."""
    from ibbench import results
    from ibbench.sweep import varying_fields

    rows = []
    for p in planned:
        row = {**p.cfg.to_dict(), "run_id": p.run_id, "status": p.state}
        if metric is not None and p.state != "new":
            latest = results.run_row(p.run_dir)
            row.update({k: latest.get(k) for k in (metric, "wall_time")})
        rows.append(row)
    return _runs_table(title, rows, varying_fields(planned), metric)


def _counts(states) -> str:
    from collections import Counter

    counts = Counter(states)
    order = ["done", "stopped", "running", "incomplete", "failed", "new"]
    return ", ".join(f"{counts[k]} {k}" for k in order if counts[k]) or "no runs"


def _sweep_command(args: argparse.Namespace) -> int:
    from ibbench.config import load_sweep
    from ibbench.sweep import archive_study, check_study, optuna_trial_count, plan, sweep_dir, sweep_metric

    spec = load_sweep(args.spec, args.set, max_runs=args.max_runs)
    out = Path(args.out)
    if args.new_study and not args.dry_run:
        kept = archive_study(spec, out)
        if kept is not None:
            console.print(f"starting a new study; the previous one is kept in {kept}")
    elif not args.new_study:
        check_study(spec, out)  # a changed sweep must not top up a study whose trials meant something else
    planned = plan(spec, out)
    if args.dry_run:
        if spec.search is None:
            # Rendering is ~3 ms a row: a 10⁴-run grid is summarised rather than listed.
            shown = planned if len(planned) <= DRY_RUN_ROWS else planned[: DRY_RUN_ROWS // 2]
            console.print(_plan_table(shown, f"sweep {spec.name}: {len(planned)} runs in {sweep_dir(spec, out)}"))
            if len(shown) < len(planned):
                console.print(f"… and {len(planned) - len(shown)} more runs (the first {len(shown)} are listed)")
        else:
            s = spec.search
            space = ", ".join(f"{k} ~ {kind}{list(a)}" for k, kind, a in s.space)
            console.print(
                f"sweep {spec.name}: Optuna search, {s.num_samples} trials ({optuna_trial_count(spec, out)} in the "
                f"study so far), {s.mode} {s.metric}, scheduler {s.scheduler}; space: {space}"
            )
            if planned:
                console.print(_plan_table(planned, "runs so far"))
        total = len(planned) if spec.search is None else spec.search.num_samples
        console.print(f"{total} runs: {_counts(p.state for p in planned)}")
        return 0
    from ibbench.data import check_available

    for dataset, data_dir, download in {(p.cfg.dataset, p.cfg.data_dir, p.cfg.download) for p in planned} | (
        {
            (
                dict(spec.base).get("dataset", "cifar10"),
                dict(spec.base).get("data_dir"),
                dict(spec.base).get("download", False),
            )
        }
        if spec.search is not None
        else set()
    ):
        check_available(dataset, data_dir, download)
    if args.launcher != "local":
        return _submit_slurm(spec, out, args)
    metric, mode = sweep_metric(spec)
    return _run_local_sweep(spec, out, metric, mode, args.retry_failed, args.verbose)


DRY_RUN_ROWS = 200  # a dry run lists every run up to this many


def _submit_slurm(spec, out: Path, args: argparse.Namespace) -> int:
    import time

    from ibbench import results
    from ibbench.launch import slurm
    from ibbench.sweep import plan, sweep_dir

    if not args.cluster:
        raise ConfigError(
            "--cluster", "--cluster", "the slurm launchers need a cluster file", "--cluster slurm/cluster.yaml"
        )
    cluster = slurm.load_cluster(args.cluster)
    try:
        submission = slurm.submit(spec, out, cluster, args.launcher, retry_failed=args.retry_failed)
    except slurm.SlurmError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 1
    root = sweep_dir(spec, out)
    if submission.live_driver:
        console.print(f"sweep {spec.name}: live SLURM job {submission.live_driver} is driving this search; not "
                      f"starting a second driver (follow with: ibbench status {root})", soft_wrap=True)  # fmt: skip
        return 0
    if submission.skipped_active:
        console.print(f"{len(submission.skipped_active)} runs are covered by jobs still queued or running; not "
                      "resubmitted", soft_wrap=True)  # fmt: skip
    if not submission.jobs:
        console.print(f"sweep {spec.name}: nothing to submit — {_counts(p.state for p in plan(spec, out))}")
        return 0
    ids = [j.job_id for j in submission.jobs]
    shown = ids if len(ids) <= 6 else [*ids[:3], "…", *ids[-2:]]
    console.print(f"submitted {len(submission.runs)} runs as {len(ids)} SLURM job(s): {' '.join(shown)}")
    console.print(f"logs: {submission.log_dir}/<job id>/")
    console.print(f"follow with: ibbench status {root}")
    if not args.wait:
        return 0
    runs = set(submission.runs)
    with Live(console=console, refresh_per_second=1) as live:
        polled = time.monotonic()
        while True:
            if time.monotonic() - polled > 5:
                # One sacct call for all jobs every 5 s: a job that ended without its result file (killed, or
                # failed outside Python) is seen then, not after submitit's own back-off of up to a minute.
                submission.jobs[0].watcher.update()
                polled = time.monotonic()
            # An allocation is over when its head (task 0) is: the sweep's outcome is its result.
            finished = [j for j in submission.jobs if (j.task(0) if j.num_tasks > 1 else j).done()]
            states = [p.state for p in plan(spec, out) if spec.search is not None or p.run_id in runs]
            live.update(f"jobs {len(finished)}/{len(ids)} ended — runs: {_counts(states)}")
            if len(finished) == len(ids):
                break
            time.sleep(3)
    if not console.is_terminal:
        console.print()  # Live leaves its last frame without a line end when the output is a file or pipe
    # Returned means over: a job that just ended (cancelled, above all) lingers in the queue while SLURM kills its
    # processes, and holds its runs against a resubmission until it has left.
    if not slurm.wait_until_gone(ids):
        err_console.print("some jobs are still listed by squeue; a resubmission now leaves their runs to them")
    bad = 0
    for job in submission.jobs:
        # An allocation's outcome is its head's (task 0): a worker lost with its node is not the sweep failing.
        head = job.task(0) if job.num_tasks > 1 else job
        if head.state.startswith("CANCELLED"):
            # scancel'd jobs write no result file: do not give it submitit's 15 s for a slow filesystem to show it
            head._results_timeout_s = 1
        error = head.exception()  # None when the job returned; sacct's state can lag behind the result file
        if error is not None:
            bad += 1
            err_console.print(f"job {job.job_id} ended {job.state}: {_job_error_line(error)}; logs "
                              f"{head.paths.stdout} {head.paths.stderr}", markup=False)  # fmt: skip
        elif args.launcher == "slurm":
            _print_allocation_outcome(job.job_id, head.result())
    after = [p for p in plan(spec, out) if spec.search is not None or p.run_id in runs]
    for p in after:
        if p.state == "failed":
            reason = (results.read_summary(p.run_dir) or {}).get("reason", "?")
            err_console.print(f"failed: {p.run_id}: {reason}", markup=False)
    console.print(f"{_counts(p.state for p in after)}")
    return 0 if not bad and all(p.state in ("done", "stopped") for p in after) else 1


def _job_error_line(error: Exception) -> str:
    """One line from submitit's job error: the exception line of the job's traceback, else its last line."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if "----" in "".join(lines):
        trace = [line for line in lines if not line.startswith("----")]
        exception_lines = [line for line in trace if re.match(r"^[\w.]+(Error|Exception|Failed)\b.*:", line)]
        if exception_lines:
            return exception_lines[-1]
    return lines[-1] if lines else type(error).__name__


def _print_allocation_outcome(job_id: str, result: str) -> None:
    """What an allocation's head reports beyond the run directories: nodes joined and lost, retried trials."""
    import json

    try:
        outcome = json.loads(result)
    except (TypeError, ValueError):
        return
    if not isinstance(outcome, dict):
        return
    joined, nodes = outcome.get("nodes_joined"), outcome.get("nodes")
    if joined is not None and nodes and joined < nodes:
        err_console.print(f"job {job_id}: only {joined} of {nodes} nodes joined the Ray cluster", soft_wrap=True)
    if outcome.get("lost_nodes"):
        retried = outcome.get("retried") or []
        err_console.print(f"job {job_id}: node(s) lost mid-sweep: {', '.join(outcome['lost_nodes'])}; "
                          f"{len(retried)} trial(s) retried on the remaining nodes: {', '.join(retried) or '–'}",
                          markup=False, soft_wrap=True)  # fmt: skip
    if outcome.get("held"):
        console.print(f"job {job_id}: {len(outcome['held'])} runs were left to other live jobs holding them",
                      soft_wrap=True)  # fmt: skip


def _run_local_sweep(spec, out: Path, metric: str, mode: str, retry_failed: bool, verbose: bool = False) -> int:
    from ibbench.launch.local import launch, preflight
    from ibbench.sweep import RAY_SCRATCH, plan

    planned = plan(spec, out)
    todo = [p for p in planned if p.state in ("new", "incomplete") or (retry_failed and p.state == "failed")]
    if spec.search is None and not todo:
        console.print(f"sweep {spec.name}: nothing to train — {_counts(p.state for p in planned)}")
        return 1 if any(p.state == "failed" for p in planned) else 0
    live_state: dict = {"running": {}, "finished": 0, "errors": 0, "best": None}

    def render() -> Table:
        table = Table(title=f"sweep {spec.name} → {out / spec.name}", show_edge=False)
        table.add_column("trial")
        table.add_column("run_id")
        table.add_column("epoch", justify="right")
        table.add_column(metric, justify="right", overflow="fold")
        for trial, info in sorted(live_state["running"].items()):
            table.add_row(trial, info.get("run_id", "…"), _fmt(info.get("epoch")), _fmt(info.get(metric)))
        best = live_state["best"]
        total = len(todo) if spec.search is None else "?"
        table.caption = (
            f"{live_state['finished']}/{total} finished ({live_state['errors']} failed), "
            f"{len(live_state['running'])} running; best {metric} so far: {_fmt(best[1]) if best else '–'}"
            + (f" ({best[0]})" if best else "")
        )
        return table

    def on_event(kind: str, payload: dict) -> None:
        trial = payload["trial"]
        if kind == "start":
            live_state["running"][trial] = {}
        elif kind == "result":
            live_state["running"].setdefault(trial, {}).update(payload)
            value = payload.get(metric)
            if isinstance(value, (int, float)) and not math.isnan(value):  # NaN: a failed run's closing result
                best = live_state["best"]
                if best is None or (value > best[1] if mode == "max" else value < best[1]):
                    live_state["best"] = (payload.get("run_id", trial), value)
        else:
            live_state["running"].pop(trial, None)
            live_state["finished"] += 1
            live_state["errors"] += kind == "error"
        live.update(render())

    preflight(spec)
    scratch = out / spec.name / RAY_SCRATCH
    # Ray's own console output goes to a log unless asked for; the live view is ours alone.
    quiet = contextlib.nullcontext() if verbose else _ray_output_to(scratch / "driver.log")
    live = Live(render(), console=console, refresh_per_second=2, transient=False, redirect_stdout=False,
                redirect_stderr=False)  # fmt: skip
    with quiet, live:
        try:
            outcome = launch(spec, out, retry_failed=retry_failed, on_event=on_event)
        except KeyboardInterrupt:
            live.stop()
            err_console.print("interrupted: finished runs are kept and the others resume from their checkpoints; "
                              "run the same command again to continue")  # fmt: skip
            return 130
    if not console.is_terminal:
        console.print()  # Live leaves its last frame without a line end when the output is a file or pipe
    after = plan(spec, out)
    console.print(_plan_table(after, f"sweep {spec.name}: outcome", metric))
    for rid, reason in outcome.reasons.items():
        err_console.print(f"failed: {rid}: {reason} ({outcome.sweep_dir / rid / 'summary.json'})", markup=False)
    if outcome.retried:
        err_console.print(f"retried after their process died: {', '.join(outcome.retried)}", soft_wrap=True)
    for trial, reason in outcome.trial_failures.items():
        err_console.print(f"failed before its run started: {trial}: {reason}", markup=False, soft_wrap=True)
    trial_failures = f", {len(outcome.trial_failures)} trials failed before starting" if outcome.trial_failures else ""
    console.print(f"trained {len(outcome.trained)}, skipped {len(outcome.skipped)} already done; "
                  f"{_counts(outcome.states.values())}{trial_failures}")  # fmt: skip
    if not verbose:
        console.print(f"Ray's own output and logs: {scratch}/", soft_wrap=True, highlight=False)
    if outcome.interrupted:
        err_console.print("interrupted: run the same command again to resume the unfinished runs")
        return 130
    return 0 if outcome.ok else 1


@contextlib.contextmanager
def _ray_output_to(log_path: Path):
    """Ray's and Ray Tune's console output (their prints, warnings and loggers) into log_path; ours stays put."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    loggers = [logging.getLogger("ray")]
    saved = [(logger, logger.handlers[:], logger.propagate) for logger in loggers]
    with open(log_path, "a", buffering=1) as sink:
        # rich writes to the real streams from here on, whatever sys.stdout becomes.
        console.file, err_console.file = sys.stdout, sys.stderr
        handler = logging.StreamHandler(sink)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        try:
            for logger in loggers:
                logger.handlers, logger.propagate = [handler], False
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield
        finally:
            for logger, handlers, propagate in saved:
                logger.handlers, logger.propagate = handlers, propagate
            console.file = err_console.file = None  # follow sys.stdout / sys.stderr again


def _status_command(args: argparse.Namespace) -> int:
    from ibbench import results
    from ibbench.config import load_sweep
    from ibbench.sweep import OPTUNA_DB, SPEC_FILE, sweep_metric

    root = Path(args.dir)
    if not root.is_dir():
        raise ConfigError(str(root), "DIR", "no such folder", "a sweep's output folder, e.g. runs/quickstart")
    runs = results.load_runs(root)
    if runs.empty:
        console.print(f"{root}: no runs yet")
        return 0
    for sweep_name, frame in runs.groupby("sweep", sort=True):
        sweep_folder = Path(frame["path"].iloc[0]).parent
        spec = load_sweep(sweep_folder / SPEC_FILE) if (sweep_folder / SPEC_FILE).exists() else None
        metric, mode = sweep_metric(spec) if spec is not None else ("val_acc/gmm", "max")
        console.print(f"[bold]{sweep_name}[/bold]: {len(frame)} runs — {_counts(frame['status'])}")
        if metric in frame:
            ranked = frame[frame[metric].notna()].sort_values(metric, ascending=(mode == "min")).head(args.top)
            fields = [f for f in ("objective", "beta", "noise", "k", "seed") if f in ranked]
            rows = [{k: (None if _is_nan(v) else v) for k, v in row.items()} for row in ranked.to_dict("records")]
            console.print(_runs_table(f"best {len(rows)} by {metric} ({mode})", rows, fields, metric))
        else:
            console.print(f"no run reports {metric} yet")
        failed = frame[frame["status"] == "failed"]
        for _, row in failed.iterrows():
            console.print(f"[red]failed[/red] {row['run_id']}: {row.get('reason', '?')}", soft_wrap=True)
        if spec is not None and spec.search is not None:
            db = (sweep_folder / OPTUNA_DB).resolve()
            console.print(f"the Optuna study: optuna-dashboard sqlite:///{db}", soft_wrap=True)
            if importlib.util.find_spec("optuna_dashboard") is None:
                console.print("  (optuna-dashboard is not installed: pip install 'ibbench[dashboard]')")
    return 0


def _is_nan(value) -> bool:
    return isinstance(value, float) and value != value


def _report_command(args: argparse.Namespace) -> int:
    from ibbench import report, results

    root = Path(args.dir)
    if not root.is_dir():
        raise ConfigError(str(root), "DIR", "no such folder", "a sweep's output folder, e.g. runs/quickstart")
    runs = results.load_runs(root)
    if runs.empty:
        raise ConfigError(str(root), "DIR", "no run directories (with config.json) below it",
                          "a sweep's output folder, e.g. runs/quickstart")  # fmt: skip
    out = Path(args.out) if args.out else root / "report"
    written = report.write_report(root, out)
    console.print(f"report on {len(runs)} runs ({_counts(runs['status'])}): {len(written)} files in {out}",
                  soft_wrap=True)  # fmt: skip
    console.print(f"open {out / 'report.html'} (self-contained) or {out / 'report.md'}", soft_wrap=True)
    unfinished = runs[runs["status"] != "done"]
    if not unfinished.empty:
        console.print(f"[yellow]{len(unfinished)} runs not finished[/yellow] are listed in the report's "
                      "'Runs not finished' section with their reasons")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ibbench",
        description="Sweeps and benchmarks for information-bottleneck training with a k-NN entropy estimator.",
    )
    parser.add_argument("--version", action="version", version=f"ibbench {package_version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log debug messages, and let Ray and Ray Tune print their own output")  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="train one run (resumes an interrupted one)")
    run.add_argument("config", nargs="?", help="a YAML file of RunConfig fields (default: all defaults)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    run.add_argument("--out", default="runs", help="output root; the run goes to OUT/<config name>/<run_id>")
    run.set_defaults(handler=_run_command)

    sweep = sub.add_parser("sweep", help="run every trial of a sweep file (resumable; DONE runs are skipped)")
    sweep.add_argument("spec", help="a sweep YAML file, e.g. sweeps/quickstart.yaml")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and their states; start nothing")
    sweep.add_argument("--launcher", choices=["local", "slurm", "slurm-array"], default="local")
    sweep.add_argument("--cluster", help="cluster file for the slurm launchers (see slurm/cluster.example.yaml)")
    sweep.add_argument("--out", default="runs", help="output root; runs go to OUT/<sweep name>/<run_id>")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a base field")
    sweep.add_argument("--retry-failed", action="store_true", help="train failed runs again (from their checkpoints)")
    sweep.add_argument("--wait", action="store_true", help="slurm launchers: block with a progress view until done")
    sweep.add_argument("--max-runs", type=int, help="refuse larger grids (default: the file's max_runs)")
    sweep.add_argument(
        "--new-study", action="store_true", help="search sweeps: start a new Optuna study (the old one is kept)"
    )
    sweep.set_defaults(handler=_sweep_command)

    status = sub.add_parser("status", help="counts by state and the best runs of a sweep folder")
    status.add_argument("dir", help="a sweep folder (OUT/<sweep>) or an output root")
    status.add_argument("--top", type=int, default=5, help="how many of the best runs to list")
    status.set_defaults(handler=_status_command)

    report = sub.add_parser("report", help="tables (md, html, csv, tex) and the paper's figures from a sweep folder")
    report.add_argument("dir", help="a sweep folder (OUT/<sweep>) or an output root")
    report.add_argument("--out", help="where the report goes (default: DIR/report)")
    report.set_defaults(handler=_report_command)
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
