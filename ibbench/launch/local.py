"""Ray Tune on this machine: a private Ray runtime for the sweep (or the one this process runs already)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ibbench.config import SweepSpec
from ibbench.sweep import RAY_SCRATCH, Event, SweepOutcome, check_resources, run_sweep, sweep_dir

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    temp_dir: str | Path | None = None,
) -> bool:
    """Start a private Ray runtime (or join `address`) unless this process has one; True when it started one.

    A runtime started here advertises and connects over 127.0.0.1 only and requires a per-runtime token (token
    authentication, Ray ≥ 2.52): Ray 2.60's gRPC servers listen on every interface whatever the node address,
    so the token is what keeps other users and hosts from submitting work to it.
    """
    if address is None:
        # Ray reads these at import (and hands them to every process it starts): set them first.
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
        # "no cluster": every Ray process advertises and connects over 127.0.0.1, not the machine's address.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    already_imported = "ray" in sys.modules
    import ray

    if ray.is_initialized():
        return False
    if address is None and already_imported:
        _reread_env_settings()
    # Worker output stays out of the driver's terminal: the CLI shows one live view, and every run's outcome
    # (with a failure's reason) is in its run directory.
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            num_gpus=num_gpus,
            _node_ip_address=LOOPBACK,
            _temp_dir=str(temp_dir) if temp_dir is not None else None,
            **kwargs,
        )
    log.info("ray resources: %s", ray.cluster_resources())
    return True


def _reread_env_settings() -> None:
    """Make an already imported Ray take the settings above, which it otherwise reads once, at import."""
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    ray_constants.ENABLE_RAY_CLUSTER = False


@contextlib.contextmanager
def local_ray(logs_to: Path, num_cpus: int | None = None, num_gpus: int | None = None) -> Iterator[None]:
    """A Ray runtime for one command: Ray's temp folder is a fresh private directory (mkdtemp, mode 0700), not a
    predictable name in the shared temp folder; on exit Ray is shut down, its session logs are copied to
    `logs_to` and the temp folder removed. When this process runs Ray already (tests), that runtime is used as is.
    """
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        yield
        return
    temp_dir = ray_temp_dir()
    try:
        init_ray(num_cpus=num_cpus, num_gpus=num_gpus, temp_dir=temp_dir)
        yield
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        keep_ray_logs(temp_dir, logs_to)


# len("/ibbench-ray-xxxxxxxx/r/session_2026-11-29_20-31-14_019691_21653/sockets/plasma_store"), with room to spare.
RAY_SOCKET_SUFFIX = 92
SOCKET_PATH_MAX = 107  # AF_UNIX on Linux


def ray_temp_dir() -> Path:
    """A temp folder for one Ray runtime, inside a fresh private folder (mkdtemp: mode 0700, unpredictable name).

    Ray opens up the permissions of the temp folder it is given (0777); the private parent keeps other users out of
    it all the same. Short on purpose: Ray's Unix sockets live below it, and their paths may not exceed 107 bytes;
    where $TMPDIR is too deep for that (a job's nested scratch folder), /tmp takes its place.
    """
    base = tempfile.gettempdir()
    if len(base) + RAY_SOCKET_SUFFIX > SOCKET_PATH_MAX and os.access("/tmp", os.W_OK):
        log.debug("temp folder %s too deep for Ray's socket paths; using /tmp", base)
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="ibbench-ray-", dir=base)) / "r"


def keep_ray_logs(temp_dir: str | Path, logs_to: Path, prefix: str = "logs-") -> None:
    """Copy the session logs of a stopped Ray runtime to `logs_to` (as <prefix><time>/), then remove its temp dir
    (and the private folder ray_temp_dir made around it)."""
    temp_dir = Path(temp_dir)
    for logs in temp_dir.glob("session_2*/logs"):
        with contextlib.suppress(OSError, shutil.Error):
            shutil.copytree(logs, Path(logs_to) / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}", dirs_exist_ok=True)
    private = temp_dir.parent if temp_dir.name == "r" and temp_dir.parent.name.startswith("ibbench-ray-") else temp_dir
    shutil.rmtree(private, ignore_errors=True)


def preflight(spec: SweepSpec) -> None:
    """ConfigError before Ray starts when one trial needs more than this machine has (the local runtime gets
    this machine's CPUs and GPUs)."""
    import torch

    check_resources(spec, os.cpu_count() or 1, torch.cuda.device_count(), "this machine")


def launch(
    spec: SweepSpec,
    out: Path,
    *,
    retry_failed: bool = False,
    on_event: Event | None = None,
) -> SweepOutcome:
    """Run the sweep's pending runs with Ray Tune on this machine; Ray's own logs end up in <sweep>/.ray/."""
    preflight(spec)
    with local_ray(sweep_dir(spec, out) / RAY_SCRATCH):
        return run_sweep(spec, out, retry_failed=retry_failed, on_event=on_event)
