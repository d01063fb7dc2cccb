"""The run directory format: identity, atomic writers, state, and loaders into pandas DataFrames.

<out>/<sweep>/<run_id>/{config.json, metrics.jsonl, summary.json, checkpoint.pt, run.log, DONE}. Everything that
asks "what happened to this run" (skip, resume, status, reports) reads these files and nothing else.

What the folder's filesystem must provide (docs/decisions.md): atomic rename within a folder, exclusive create
(O_EXCL) that holds across nodes, close-to-open consistency, and fsync that reaches stable storage. `flock` is
used when it works and is not relied on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ibbench.config import RunConfig
from ibbench.errors import RunLocked

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["RunLock", "RunLocked", "load_metrics", "load_runs", "run_lock", "run_state"]

log = logging.getLogger(__name__)

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"  # the last good checkpoint before checkpoint.pt, kept while training
RUN_LOG = "run.log"  # what happened to the run: starts, resumes, recoveries from damaged files, failures
DONE = "DONE"

LOCK = ".lock"  # flock target: the fast path on one node
LOCK_FILE = ".lock.json"  # created with O_EXCL: the lock across nodes; holds host, pid, job id and a heartbeat
TEMP_SUFFIX = ".tmp"  # atomic writers' unique temporaries: .<name>.<random>.tmp

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


def _create_unique(path: Path) -> tuple[int, Path]:
    """A new, empty temporary next to path: a unique name, and mode 0666 less the umask like any other file
    (mkstemp's 0600 hid runs' files from collaborators' status and report)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def fsync_dir(folder: Path) -> None:
    """Make a rename in folder durable (without it a node crash can bring back the old name or none)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        # Some filesystems refuse fsync on a directory (EINVAL); the rename is then all they offer.
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None], previous: Path | None = None) -> None:
    """write(file) into a unique temporary in path's folder, fsync it, then rename it over path (the old path
    moved to `previous` first, when given), and fsync the folder: readers see the old file or the new one, never
    half of one. On any error (a full disk included) the temporary is removed and the old file stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_unique(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data via a temporary file in the same folder and rename, so readers never see half a file."""
    atomic_write(path, lambda f: f.write(data))


def remove_temporaries(run_dir: Path) -> list[str]:
    """Delete temporaries a killed writer left in run_dir (call under the run's lock); returns their names."""
    removed = []
    for tmp in Path(run_dir).glob(f".*{TEMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp.name)
    return removed


def checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints to resume from, newest first: checkpoint.pt, then the previous good one."""
    return [p for p in (Path(run_dir) / CHECKPOINT, Path(run_dir) / PREVIOUS_CHECKPOINT) if p.exists()]


def append_log(run_dir: Path, message: str) -> None:
    """One timestamped line in the run's run.log; a log that cannot be written (full disk) never stops a run."""
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        with (Path(run_dir) / RUN_LOG).open("a") as f:
            f.write(f"{stamp} {message}\n")
    except OSError as exc:
        log.warning("cannot write %s: %s", Path(run_dir) / RUN_LOG, exc)


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


LOCK_HEARTBEAT_S = 10.0  # how often a holder rewrites its lock file
LOCK_STALE_S = 60.0  # a lock file unchanged this long (on the waiter's own clock) belongs to a dead holder
_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}  # flock absent on this filesystem


def lock_owner(run_dir: Path) -> dict[str, Any] | None:
    """Who holds run_dir's lock file (host, pid, job_id, since, heartbeat), or None when nobody does."""
    try:
        return _owner((Path(run_dir) / LOCK_FILE).read_bytes())
    except OSError:
        return None


def _owner(content: bytes) -> dict[str, Any] | None:
    try:
        owner = json.loads(content)
    except ValueError:  # empty or torn: its writer died between create and write
        return None
    return owner if isinstance(owner, dict) else None


def _describe(owner: Mapping[str, Any] | None) -> str:
    if not owner:
        return "an unknown holder"
    job = f", SLURM job {owner['job_id']}" if owner.get("job_id") else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}{job}, last heartbeat {owner.get('heartbeat')}"


def _restart_count() -> int | None:
    """This SLURM job's attempt (SLURM_RESTART_COUNT: 0 for the first, +1 per requeue); None outside SLURM."""
    if not os.environ.get("SLURM_JOB_ID"):
        return None
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return None


def _earlier_attempt_of_this_job(owner: Mapping[str, Any]) -> bool:
    """Whether a lock's holder ran in an earlier attempt of the SLURM job this process runs in. SLURM starts a
    requeued job's next attempt only after every process of the previous one has ended (the job leaves
    COMPLETING first), so such a holder is gone wherever it ran: waiting out stale_s would only delay the resume
    (by a minute, when the requeued job lands on another node)."""
    mine, theirs = _restart_count(), owner.get("restart")
    if mine is None or not isinstance(theirs, int) or str(owner.get("job_id")) != os.environ.get("SLURM_JOB_ID"):
        return False
    return theirs < mine


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # another user's process, or an unreadable pid: assume alive, let the heartbeat decide
    return True


class RunLock:
    """Exclusive hold on a run directory across processes and nodes.

    flock on `.lock` is the fast path: on one node it sees a holder at once and is released by the kernel when the
    holder dies. It may be node-local on cluster filesystems (NFS local_lock, BeeGFS, Lustre localflock) or
    missing (ENOLCK/ENOSYS), so the lock that counts is `.lock.json`, created with O_EXCL and holding the
    holder's host, pid, SLURM job id and a heartbeat that a thread rewrites every heartbeat_s. A waiter takes it
    over only when it is stale: its holder is a dead pid on this host, ran in an earlier attempt of the waiter's
    own SLURM job, or the file has not changed for stale_s of the waiter's own clock (no clock comparison across
    nodes). `lost` turns true if another process took it over
    (this one was frozen longer than stale_s): the holder must then stop writing into the run directory.
    """

    def __init__(self, run_dir: Path, wait_s: float = 120.0, stale_s: float = LOCK_STALE_S,
                 heartbeat_s: float = LOCK_HEARTBEAT_S):  # fmt: skip
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.wait_s, self.stale_s, self.heartbeat_s = wait_s, stale_s, heartbeat_s
        self.token = secrets.token_hex(8)
        self.lost = False
        self._handle: IO[str] | None = None
        self._flocked = False
        self._stop = threading.Event()
        self._beats = 0
        self._thread: threading.Thread | None = None
        self._seen: dict[Path, tuple[bytes, float]] = {}  # file -> (content seen, monotonic time first seen)

    # -- the flock fast path

    def _flock(self, deadline: float) -> None:
        """Take flock on .lock, waiting until deadline; skip it where the filesystem does not support it."""
        self._handle = (self.run_dir / LOCK).open("a+")
        while True:
            try:
                fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._flocked = True
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RunLocked(f"{self.run_dir} is being trained by another process "
                                    f"({_describe(lock_owner(self.run_dir))})") from None  # fmt: skip
                time.sleep(0.5)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                log.info("flock unsupported in %s (%s); using the lock file only", self.run_dir, exc.strerror)
                return

    # -- the lock file

    def _content(self) -> bytes:
        owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            # Read here rather than passed down: train.run is called the same way by every launcher.
            "job_id": os.environ.get("SLURM_JOB_ID"),
            "restart": _restart_count(),
            "token": self.token,
            "since": self._since,
            "heartbeat": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "beats": self._beats,
        }
        return (json.dumps(owner) + "\n").encode()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self._content())
                f.flush()
                os.fsync(f.fileno())
        except BaseException:  # e.g. a full disk: an empty lock file would hold others off for stale_s
            self.path.unlink(missing_ok=True)
            raise
        return True

    def _stale(self, path: Path, content: bytes) -> bool:
        """Is path (a lock or breaker file holding content) abandoned?"""
        owner = _owner(content)
        if owner is not None and owner.get("host") == socket.gethostname():
            # A holder on this node holds flock too where flock works: we have it, so that holder is gone.
            if self._flocked or not _pid_alive(owner.get("pid")):
                return True
        if owner is not None and _earlier_attempt_of_this_job(owner):
            return True
        now = time.monotonic()
        seen = self._seen.get(path)
        if seen is None or seen[0] != content:
            self._seen[path] = (content, now)
            return False
        return now - seen[1] >= self.stale_s

    def _take_over(self, content: bytes) -> bool:
        """Remove the stale lock file whose content we judged, serialised by an O_EXCL breaker file so that two
        waiters can never remove a fresh lock that a third just created. True when it was removed."""
        breaker = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(breaker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if self._stale(breaker, breaker.read_bytes()):  # its owner died mid-takeover
                    breaker.unlink(missing_ok=True)
            return False
        try:
            os.write(fd, self._content())
            try:
                if self.path.read_bytes() != content:
                    return False
                self.path.unlink()
            except OSError:
                return False
        finally:
            os.close(fd)
            breaker.unlink(missing_ok=True)
        log.warning("%s: took over a stale lock (%s)", self.run_dir, _describe(_owner(content)))
        append_log(self.run_dir, f"took over a stale lock ({_describe(_owner(content))})")
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with self.path.open("r+b") as f:
                    if (_owner(f.read()) or {}).get("token") != self.token:
                        raise ValueError("the lock file now names another holder")
                    self._beats += 1
                    f.seek(0)
                    f.write(self._content())
                    f.truncate()
                    f.flush()
                    os.fsync(f.fileno())
            except (FileNotFoundError, ValueError) as exc:
                self.lost = True
                log.error("%s: lost the run lock (%s): another process may be training this run", self.run_dir, exc)
                return
            except OSError as exc:  # a filesystem hiccup: beat again next time (stale_s allows several misses)
                log.warning("%s: could not renew the run lock: %s", self.run_dir, exc)

    def acquire(self) -> RunLock:
        deadline = time.monotonic() + self.wait_s
        self._since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            self._flock(deadline)
            holder = None  # the last readable owner seen (a heartbeat being rewritten may read as torn)
            while not self._create():
                try:
                    content = self.path.read_bytes()
                except FileNotFoundError:
                    continue  # released between our create and read: try again at once
                holder = _owner(content) or holder
                if self._stale(self.path, content) and self._take_over(content):
                    continue
                if time.monotonic() > deadline:
                    raise RunLocked(f"{self.run_dir} is being trained by another process ({_describe(holder)})")
                time.sleep(min(0.5, self.stale_s / 4))
        except BaseException:
            self._unflock()
            raise
        self._thread = threading.Thread(target=self._heartbeat, name=f"lock-{self.run_dir.name}", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OSError):
            if (_owner(self.path.read_bytes()) or {}).get("token") == self.token:
                self.path.unlink()
        self._unflock()

    def _unflock(self) -> None:
        if self._handle is not None:
            if self._flocked:
                fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle, self._flocked = None, False


@contextlib.contextmanager
def run_lock(run_dir: Path, wait_s: float = 120.0, stale_s: float = LOCK_STALE_S) -> Iterator[RunLock]:
    """Hold run_dir's RunLock while training; waits up to wait_s for a previous holder, else raises RunLocked.

    A killed sweep driver can leave its trials running for a few seconds, and a requeued job can start on
    another node while its predecessor's node is still winding down: the lock keeps a re-run from training the
    same run twice at once.
    """
    lock = RunLock(run_dir, wait_s=wait_s, stale_s=stale_s).acquire()
    try:
        yield lock
    finally:
        lock.release()


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
    import pandas as pd  # here: every trial process imports this module, and only the loaders need pandas (0.5 s)

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
