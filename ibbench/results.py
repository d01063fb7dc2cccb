"""The run directory format: identity, atomic writers, state, and loaders into pandas DataFrames.

<out>/<sweep>/<run_id>/{config.json, metrics.jsonl, summary.json, checkpoint.pt, DONE}. Everything that asks
"what happened to this run" (skip, resume, status, reports) reads these files and nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ibbench.config import RunConfig

log = logging.getLogger(__name__)

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
DONE = "DONE"

LOCK = ".lock"

STATES = ("done", "stopped", "failed", "incomplete", "new")


def canonical_json(cfg: RunConfig) -> str:
    """The identity of a run: its config minus placement fields, as sorted compact JSON."""
    return cfg.identity()


def run_id(cfg: RunConfig) -> str:
    """First 12 hex digits of sha256 of the canonical config JSON."""
    return hashlib.sha256(canonical_json(cfg).encode()).hexdigest()[:12]


def _jsonable(value: Any) -> Any:
    """NaN/inf as null, so the files stay strict JSON that any tool reads."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(_jsonable(value), indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    """config.json; a directory that already holds a different config is refused (ids must not collide)."""
    path = Path(run_dir) / CONFIG
    if path.exists():
        existing = read_json(path)
        if canonical_json(RunConfig.from_dict(existing, str(path))) != canonical_json(cfg):
            raise ValueError(f"{path} holds a different run's config; refusing to mix two runs in one folder")
    write_json(path, cfg.to_dict())


def read_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG
    return RunConfig.from_dict(read_json(path), str(path))


def append_metrics(run_dir: Path, row: Mapping[str, Any]) -> None:
    """One line of metrics.jsonl, flushed to disk before returning."""
    path = Path(run_dir) / METRICS
    with path.open("a") as f:
        f.write(json.dumps(_jsonable(row), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl; a torn last line (the process died mid-write) is skipped."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping an unreadable line (a write cut short?)", path, number)
    return rows


def truncate_metrics(run_dir: Path, last_epoch: int) -> None:
    """Keep only rows up to last_epoch: a resumed run recomputes what came after its checkpoint."""
    rows = [r for r in read_metrics(run_dir) if int(r.get("epoch", 0)) <= last_epoch]
    atomic_write_bytes(Path(run_dir) / METRICS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> None:
    write_json(Path(run_dir) / SUMMARY, summary)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / SUMMARY
    try:
        return read_json(path)
    except (OSError, json.JSONDecodeError):
        return None


def mark_done(run_dir: Path) -> None:
    """DONE, written last: its presence means every other file of the run is complete."""
    atomic_write_bytes(Path(run_dir) / DONE, b"")


def run_state(run_dir: Path) -> str:
    """done (DONE exists), stopped (early, by a scheduler), failed, incomplete (started), or new."""
    run_dir = Path(run_dir)
    if (run_dir / DONE).exists():
        return "done"
    summary = read_summary(run_dir)
    if summary is not None and summary.get("status") in ("failed", "stopped"):
        return summary["status"]
    if (run_dir / CONFIG).exists() or (run_dir / CHECKPOINT).exists():
        return "incomplete"
    return "new"


def clear_failure(run_dir: Path) -> None:
    """Forget a failed run's summary so it can be retried (its checkpoint, if any, is kept to resume from)."""
    (Path(run_dir) / SUMMARY).unlink(missing_ok=True)


class RunLocked(RuntimeError):
    """Another live process is training this run directory."""


@contextlib.contextmanager
def run_lock(run_dir: Path, wait_s: float = 120.0) -> Iterator[None]:
    """Exclusive lock on a run directory while it trains; waits up to wait_s for a previous holder to exit.

    A killed sweep driver can leave its trials running for a few seconds: the lock (released by the kernel
    when its holder dies) keeps a re-run from training the same run twice at once.
    """
    path = Path(run_dir) / LOCK
    with path.open("a+") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    handle.seek(0)
                    raise RunLocked(
                        f"{run_dir} is being trained by another process ({handle.read().strip()})"
                    ) from None
                time.sleep(0.5)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def iter_run_dirs(root: Path) -> Iterator[Path]:
    """Run directories (holding config.json) below root, or root itself; scratch folders starting '.' skipped."""
    root = Path(root)
    if (root / CONFIG).exists():
        yield root
        return
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            yield from iter_run_dirs(child)


def run_row(run_dir: Path) -> dict[str, Any]:
    """One run as a flat row: config fields, status, latest metrics (final when done), robustness columns."""
    row: dict[str, Any] = {"run_id": run_dir.name, "sweep": run_dir.parent.name, "path": str(run_dir)}
    try:
        row.update(read_json(run_dir / CONFIG))
    except (OSError, json.JSONDecodeError) as exc:
        row["reason"] = f"unreadable config.json: {exc}"
    state = run_state(run_dir)
    row["status"] = state
    summary = read_summary(run_dir) or {}
    if state == "done":
        latest = summary.get("final") or {}
    else:  # incomplete, failed or stopped: the last evaluation so far (reports use done runs only)
        metrics = read_metrics(run_dir)
        latest = metrics[-1] if metrics else {}
        row["epochs_done"] = max((int(m.get("epoch", 0)) for m in metrics), default=0)
        if "time" in latest:
            row["wall_time"] = latest["time"]
    for key, value in latest.items():
        if key not in ("run_id", "epoch", "time"):
            # A metric named like a config field (the final "lr") must not overwrite the configured value.
            row[f"final/{key}" if key in row else key] = value
    for key in ("reason", "wall_time", "epochs_done"):
        if key in summary:
            row[key] = summary[key]
    for decoder, curve in (summary.get("robustness") or {}).items():
        for attack, points in curve.items():
            for eps, acc in points.items():
                row[f"robust/{attack}/{decoder}/{eps}"] = acc
    return row


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in ("decoders", "fgsm_eps"):
        if column in frame:  # lists are unhashable; as tuples they group and compare
            frame[column] = frame[column].map(lambda v: tuple(v) if isinstance(v, list) else v)
    return frame


def load_runs(root: Path | str) -> pd.DataFrame:
    """One row per run below root: run_id, sweep, path, status, config fields, final metrics, reason."""
    return _frame([run_row(d) for d in iter_run_dirs(Path(root))])


def load_metrics(root: Path | str) -> pd.DataFrame:
    """One row per run and eval epoch: config fields, status and every metrics.jsonl field."""
    rows = []
    for run_dir in iter_run_dirs(Path(root)):
        try:
            config = read_json(run_dir / CONFIG)
        except (OSError, json.JSONDecodeError):
            config = {}
        state = run_state(run_dir)
        for metric in read_metrics(run_dir):
            # The per-epoch "lr" must not overwrite the configured one: metrics named like config fields get
            # an "epoch/" prefix.
            renamed = {f"epoch/{k}" if k in config else k: v for k, v in metric.items()}
            rows.append({**config, "sweep": run_dir.parent.name, "status": state, **renamed, "run_id": run_dir.name})
    return _frame(rows)
