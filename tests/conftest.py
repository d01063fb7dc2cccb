"""Shared fixtures."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

# One intra-op thread: CI has 2 cores, and Ray trials or a second process beside a 2-thread torch make OpenMP
# threads spin against each other (runs 10-30x slower were seen); results do not depend on it.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _private_tmpdir(tmp_path_factory):
    """A temp folder of the session's own for everything the tests start (Ray's per-sweep temp folders of the
    `ibbench sweep` subprocesses included, which a killed driver cannot remove itself), removed at the end: the
    suite leaves nothing in the shared temp folder. Short, because Ray's socket paths below it are limited to 107
    bytes; pytest's own folder is placed first, where it always is."""
    tmp_path_factory.getbasetemp()
    path = tempfile.mkdtemp(prefix="ibt-", dir="/tmp")
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = path
    tempfile.tempdir = None  # tempfile caches the folder it found first
    yield Path(path)
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before
    tempfile.tempdir = None
    shutil.rmtree(path, ignore_errors=True)


# Test files that submit to the local SLURM: under pytest-xdist one worker runs them all, in order, and first.
SLURM_TEST_FILES = ("tests/test_slurm.py::", "tests/test_slurm_two_nodes.py::")
# Test files whose module-scoped fixtures cost seconds (a trained sweep, a written report): one worker runs each
# file whole, so that its fixtures are built once, not once per worker.
SHARED_FIXTURE_FILES = ("tests/test_report.py::", "tests/test_report_browser.py::")


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture scope
def pytest_collection_modifyitems(config, items):
    """Tests marked cuda compare CUDA against the CPU; without a CUDA device they skip, saying so. SLURM tests come
    first: they wait on the scheduler most of their time, the longest path through the suite. Then the slow tests,
    then the quick ones: the xdist workers finish together when the last tests handed out are short (longest
    first), instead of one worker idling while another runs a minute-long test it drew last."""
    skip = pytest.mark.skip(reason="needs a CUDA device (run with `pytest -m cuda` where one is)")
    for item in items:
        if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
            item.add_marker(skip)
    items.sort(key=lambda item: (not item.nodeid.startswith(SLURM_TEST_FILES), item.get_closest_marker("slow") is None))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`-n 3 --dist loadgroup` (the README's command): every SLURM test on one worker, in file order (they share one
    local cluster, whose CPUs some need free); each file of SHARED_FIXTURE_FILES on one worker; every other test
    scheduled on its own. xdist's own loadgroup (xdist_group markers) no longer groups under pytest ≥ 9.2, whose
    node ids it cannot rename."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupedScopes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith(SLURM_TEST_FILES):
                return "slurm"
            return nodeid.split("::", 1)[0] if nodeid.startswith(SHARED_FIXTURE_FILES) else nodeid

    return GroupedScopes(config, log)


@pytest.fixture(autouse=True)
def _fresh_global_rngs():
    """Every test starts from the same global RNG state: train.run reseeds the global RNGs, so without this an
    unseeded draw in one test would depend on which tests ran before it. Tests that need randomness should still
    draw from a torch.Generator of their own."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


CIFAR10_LABEL_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def _write_cifar_batch(path: Path, data: np.ndarray, labels: list[int], batch_label: str) -> None:
    # The real files were pickled by Python 2, whose str keys come back as str under torchvision's
    # pickle.load(..., encoding="latin1"); str keys reproduce exactly what torchvision reads.
    entry = {
        "batch_label": batch_label,
        "labels": labels,
        "data": data,
        "filenames": [f"image_{i:05d}.png" for i in range(len(labels))],
    }
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    """A tiny CIFAR-10 in the real python layout: <root>/cifar-10-batches-py, 20 images per batch file."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    n = 20
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        # (n, 3072) uint8 rows: 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [(i + b) % 10 for i in range(n)]
        _write_cifar_batch(folder / name, data, labels, f"batch {b + 1} of 6")
    meta = {"label_names": CIFAR10_LABEL_NAMES, "num_cases_per_batch": n, "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return tmp_path


REPO = Path(__file__).resolve().parents[1]


def _slurm_status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "slurm/local/status.sh"), *args], capture_output=True, text=True)


def _ensure_slurm(*args: str) -> None:
    """The local SLURM from slurm/local/ up (with `args`, e.g. --nodes 2): started here, as .ci/run does, when it
    is not up and this machine allows it (root, Debian packages installable); otherwise skip with one line why."""
    if shutil.which("sbatch") is not None and _slurm_status(*args).returncode == 0:
        return
    reason = None
    if os.geteuid() != 0:
        reason = "not root, so slurm/local/start.sh cannot start the local SLURM"
    elif shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        reason = "no apt-get to install SLURM's Debian packages"
    else:
        started = subprocess.run(["bash", str(REPO / "slurm/local/start.sh"), *args], capture_output=True, text=True,
                                 stdin=subprocess.DEVNULL, timeout=900)  # fmt: skip
        if started.returncode == 0:
            return
        lines = (started.stderr or started.stdout).strip().splitlines()
        reason = "slurm/local/start.sh failed: " + (lines[-1] if lines else f"exit {started.returncode}")
    if os.environ.get("CI"):
        pytest.fail(f"CI needs the local SLURM: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The local one-node SLURM (partition `debug`)."""
    _ensure_slurm()


@pytest.fixture(scope="session")
def slurm_two_nodes(slurm_cluster) -> None:
    """The local SLURM with its two-node partition `two` (nodeA, nodeB) as well."""
    _ensure_slurm("--nodes", "2")


@pytest.fixture(scope="session")
def ray_runtime(_private_tmpdir):
    """One Ray runtime for the whole test session (ray.init costs seconds), its files in the private temp folder."""
    import ray

    from ibbench.launch.local import init_ray

    # In the session's private temp folder, short: Ray's socket paths below it may not exceed 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-"))
    init_ray(num_cpus=2, temp_dir=temp_dir)
    yield temp_dir
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
