"""Ray Tune on this machine: start (or join) a Ray runtime, then drive the sweep."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ibbench.config import SweepSpec
from ibbench.sweep import Event, SweepOutcome, run_sweep

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Start a private Ray runtime (or join `address`) unless one is running in this process already."""
    import ray

    if ray.is_initialized():
        return
    # Worker output stays out of the driver's terminal: the CLI shows one live view, and every run's outcome
    # (with a failure's reason) is in its run directory.
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus, **kwargs)
    log.info("ray resources: %s", ray.cluster_resources())


def launch(
    spec: SweepSpec,
    out: Path,
    *,
    retry_failed: bool = False,
    on_event: Event | None = None,
    address: str | None = None,
) -> SweepOutcome:
    """Run the sweep's pending runs with Ray Tune on this machine (or the Ray cluster at `address`)."""
    init_ray(address)
    return run_sweep(spec, out, retry_failed=retry_failed, on_event=on_event)
