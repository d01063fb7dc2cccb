"""Shared fixtures."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

# One intra-op thread: CI has 2 cores, and Ray trials or a second process beside a 2-thread torch make OpenMP
# threads spin against each other (runs 10-30x slower were seen); results do not depend on it.
torch.set_num_threads(1)

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


@pytest.fixture(scope="session")
def ray_runtime():
    """One Ray runtime for the whole test session (ray.init costs seconds); every Ray test shares it."""
    import ray

    from ibbench.launch.local import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


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
