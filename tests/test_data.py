"""Datasets, class-balanced batching, on-device augmentation and the device-resident loader."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ibbench.data import (
    DATASETS,
    DIGITS_TEST_FRACTION,
    DeviceLoader,
    augment_cifar,
    balanced_batches,
    channel_stats,
    check_batch,
    load_dataset,
    make_synthetic,
    stratified_split,
)
from ibbench.errors import ConfigError
from ibbench.registry import UnknownNameError


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


# ---------------------------------------------------------------- cifar10


def test_cifar10_from_python_batches(cifar10_dir: Path) -> None:
    ds = load_dataset("cifar10", data_dir=cifar10_dir)
    assert ds.train_x.shape == (100, 3, 32, 32) and ds.test_x.shape == (20, 3, 32, 32)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.train_x.min() >= 0 and ds.train_x.max() <= 1
    assert ds.info.input_shape == (3, 32, 32) and ds.info.num_classes == 10
    with open(cifar10_dir / "cifar-10-batches-py" / "batches.meta", "rb") as f:
        assert ds.info.classes == tuple(pickle.load(f)["label_names"])

    with open(cifar10_dir / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        raw = pickle.load(f)
    assert ds.train_y[20:40].tolist() == raw["labels"]
    # Row layout: three 1024-value planes (R, G, B), each row-major 32x32.
    expected = torch.from_numpy(raw["data"][3]).reshape(3, 32, 32).float() / 255
    assert torch.equal(ds.train_x[23], expected)

    mean, std = channel_stats(ds.train_x)
    assert ds.info.mean == mean and len(ds.info.std) == 3
    assert torch.allclose(torch.tensor(ds.info.std), ds.train_x.std(dim=(0, 2, 3), unbiased=False), atol=1e-5)


def test_cifar10_missing_folder_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as err:
        load_dataset("cifar10", data_dir=missing)
    message = str(err.value)
    assert "\n" not in message
    assert str(missing / "cifar-10-batches-py") in message and message.startswith(f"{missing}: data_dir:")
    assert "download: true" in message


def test_cifar10_incomplete_folder_refused(cifar10_dir: Path) -> None:
    (cifar10_dir / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(ConfigError, match="CIFAR-10 not found"):
        load_dataset("cifar10", data_dir=cifar10_dir)


# ---------------------------------------------------------------- digits


@pytest.mark.slow
def test_digits_are_scikit_learns_images_and_split_index_for_index_without_importing_it(digits) -> None:
    """The bundled file read directly and the stratified split redone in numpy (importing scikit-learn cost every
    trial process 1.5-2 s): the same images, labels and split as scikit-learn's own loader and train_test_split."""
    code = "import sys\nfrom ibbench.data import load_dataset\nload_dataset('digits', 0)\n"
    code += "print('sklearn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    index = list(range(len(bunch.target)))
    train, test = train_test_split(index, test_size=DIGITS_TEST_FRACTION, stratify=bunch.target, random_state=0)
    x = torch.tensor(bunch.data, dtype=torch.float32).div_(16.0).reshape(-1, 1, 8, 8)
    assert torch.equal(digits.train_x, x[train]) and digits.train_y.tolist() == bunch.target[train].tolist()
    assert torch.equal(digits.test_x, x[test]) and digits.test_y.tolist() == bunch.target[test].tolist()
    for seed, fraction in [(0, 0.25), (1, 0.1), (7, 0.33), (42, 0.5)]:  # ties among remainders broken alike
        ours = stratified_split(bunch.target, fraction, seed)
        theirs = train_test_split(index, test_size=fraction, stratify=bunch.target, random_state=seed)
        assert [a.tolist() for a in ours] == [list(a) for a in theirs], (seed, fraction)


def test_digits(digits) -> None:
    assert len(digits.train_y) + len(digits.test_y) == 1797
    assert digits.train_x.shape[1:] == (1, 8, 8) and digits.info.input_shape == (1, 8, 8)
    assert digits.train_x.min() == 0 and digits.train_x.max() == 1
    assert digits.info.num_classes == 10 and len(digits.info.mean) == 1
    total = Counter(digits.train_y.tolist()) + Counter(digits.test_y.tolist())
    test = Counter(digits.test_y.tolist())
    for c in range(10):
        assert abs(test[c] - 0.25 * total[c]) <= 1


def test_the_digits_split_is_fixed_whatever_the_runs_seed(digits) -> None:
    """Seeds vary the model only: every run seed trains and tests on the same images."""
    for seed in (0, 1, 7):
        again = load_dataset("digits", seed=seed)
        assert torch.equal(again.train_x, digits.train_x) and torch.equal(again.test_y, digits.test_y)
    assert torch.equal(load_dataset("synthetic", seed=3).test_x, load_dataset("synthetic", seed=0).test_x)


def test_the_validation_split_is_stratified_disjoint_and_the_same_for_every_seed(digits) -> None:
    from ibbench.data import with_validation

    split = with_validation(digits, 0.1)
    assert len(split.train_y) + len(split.val_y) == len(digits.train_y)
    assert len(split.val_y) == pytest.approx(0.1 * len(digits.train_y), abs=10)
    counts = torch.bincount(split.val_y, minlength=10).float()
    expected = 0.1 * torch.bincount(digits.train_y, minlength=10).float()
    assert (counts - expected).abs().max() <= 1  # each class keeps its share
    rows = lambda x: {tuple(r.flatten().tolist()) for r in x}  # noqa: E731
    assert not rows(split.val_x) & rows(split.train_x) and not rows(split.val_x) & rows(split.test_x)
    # Fixed per dataset: the same validation images whatever the run's seed.
    for seed in (1, 5):
        assert torch.equal(with_validation(load_dataset("digits", seed=seed), 0.1).val_x, split.val_x)
    with pytest.raises(ValueError, match="fraction"):
        with_validation(digits, 0.0)


# ---------------------------------------------------------------- synthetic


def test_synthetic() -> None:
    ds = make_synthetic(num_classes=4, shape=(2, 5, 6), n_train=40, n_test=12, seed=3)
    assert ds.train_x.shape == (40, 2, 5, 6) and ds.test_x.shape == (12, 2, 5, 6)
    assert ds.train_x.min() >= 0 and ds.train_x.max() <= 1
    assert sorted(Counter(ds.train_y.tolist()).values()) == [10, 10, 10, 10]
    assert ds.info.num_classes == 4 and len(ds.info.mean) == 2
    assert torch.equal(make_synthetic(4, (2, 5, 6), 40, 12, seed=3).train_x, ds.train_x)
    # Same-class images sit closer to each other than to other classes.
    centroids = torch.stack([ds.train_x[ds.train_y == c].mean(0) for c in range(4)]).flatten(1)
    nearest = torch.cdist(ds.test_x.flatten(1), centroids).argmin(1)
    assert torch.equal(nearest, ds.test_y)


def test_registered_datasets() -> None:
    assert DATASETS.names() == ["cifar10", "digits", "synthetic"]
    ds = load_dataset("synthetic", seed=1)
    assert ds.info.input_shape == (3, 32, 32) and ds.info.num_classes == 10
    with pytest.raises(UnknownNameError, match="cifar10, digits, synthetic"):
        load_dataset("mnist")


# ---------------------------------------------------------------- balanced batches


def test_balanced_batches_every_class_equal() -> None:
    y = torch.arange(103) % 5
    g = torch.Generator().manual_seed(0)
    batches = balanced_batches(y, 20, k=3, generator=g)
    assert len(batches) == 103 // 20
    for idx in batches:
        assert idx.shape == (20,) and idx.dtype == torch.int64
        assert len(set(idx.tolist())) == 20
        assert torch.bincount(y[idx], minlength=5).tolist() == [4] * 5


def test_balanced_batches_cycle_small_classes() -> None:
    y = torch.cat([torch.zeros(6, dtype=torch.int64), torch.ones(54, dtype=torch.int64)])
    batches = balanced_batches(y, 12, k=2, generator=torch.Generator().manual_seed(1))
    assert len(batches) == 5
    for idx in batches:
        assert torch.bincount(y[idx], minlength=2).tolist() == [6, 6]
    # The 6 minority samples are reused; the 30 majority picks are distinct.
    picked = torch.cat(batches)
    assert set(picked[y[picked] == 0].tolist()) == set(range(6))
    assert len(set(picked[y[picked] == 1].tolist())) == 30


def test_balanced_batches_deterministic() -> None:
    y = torch.arange(60) % 3
    a = balanced_batches(y, 12, 1, torch.Generator().manual_seed(7))
    b = balanced_batches(y, 12, 1, torch.Generator().manual_seed(7))
    c = balanced_batches(y, 12, 1, torch.Generator().manual_seed(8))
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))


def test_batch_checks() -> None:
    with pytest.raises(ValueError, match=r"batch_size 30 .* 10 classes .* k = 3.*more than k"):
        check_batch(30, 10, 3)
    with pytest.raises(ValueError, match="per class"):
        balanced_batches(torch.arange(100) % 10, 30, k=3)
    with pytest.raises(ValueError, match="not a multiple of the 10 classes"):
        check_batch(64, 10, 3)
    check_batch(40, 10, 3)
    with pytest.raises(ValueError, match="larger than"):
        balanced_batches(torch.arange(10) % 2, 20, k=1)


# ---------------------------------------------------------------- augmentation


def test_augment_is_a_padded_crop_or_its_mirror() -> None:
    x = torch.rand(12, 3, 32, 32)
    out = augment_cifar(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        crops = [padded[i, :, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        candidates = crops + [crop.flip(-1) for crop in crops]
        assert any(torch.equal(c, out[i]) for c in candidates), f"image {i} is no crop of its padded input"
    assert not torch.equal(out, x)


def test_augment_deterministic_and_varied() -> None:
    x = torch.rand(64, 3, 32, 32)
    a = augment_cifar(x, torch.Generator().manual_seed(5))
    b = augment_cifar(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    changed = (a != x).flatten(1).any(1).float().mean()
    assert changed > 0.8  # only the unshifted, unflipped draw (1 in 162) leaves an image as it was
    cl = augment_cifar(x.contiguous(memory_format=torch.channels_last), torch.Generator().manual_seed(5))
    assert torch.equal(cl, a)


# ---------------------------------------------------------------- loader


def test_device_loader_balanced_and_deterministic() -> None:
    ds = make_synthetic(num_classes=4, shape=(3, 8, 8), n_train=100, n_test=8, seed=0)
    loader = DeviceLoader(ds.train_x, ds.train_y, 16, k=3, seed=11)
    assert len(loader) == 6
    epochs = [list(loader), list(loader)]
    assert len(epochs[0]) == 6
    for xb, yb in epochs[0]:
        assert xb.shape == (16, 3, 8, 8) and yb.shape == (16,)
        assert torch.bincount(yb, minlength=4).tolist() == [4] * 4
        # Batches are rows of the split with their own labels.
        row = (ds.train_x.flatten(1)[None] == xb.flatten(1)[:, None]).all(-1)
        assert torch.equal(ds.train_y[row.float().argmax(1)], yb)
    assert not torch.equal(epochs[0][0][0], epochs[1][0][0])  # reshuffled per epoch

    again = DeviceLoader(ds.train_x, ds.train_y, 16, k=3, seed=torch.Generator().manual_seed(11))
    for (xa, ya), (xb, yb) in zip(epochs[0], list(again), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = DeviceLoader(ds.train_x, ds.train_y, 16, k=3, seed=12)
    assert not torch.equal(next(iter(other))[1], epochs[0][0][1])


def test_device_loader_plain_shuffle_covers_split() -> None:
    x, y = torch.rand(50, 1, 4, 4), torch.arange(50) % 3
    loader = DeviceLoader(x, y, 10, balanced=False, seed=0)
    batches = list(loader)
    assert len(loader) == 5
    assert sorted(torch.cat([yb for _, yb in batches]).tolist()) == sorted(y.tolist())


def test_device_loader_refuses_bad_batches() -> None:
    y = torch.arange(40) % 10
    with pytest.raises(ValueError, match="k = 3"):
        DeviceLoader(torch.rand(40, 1, 4, 4), y, 30, k=3)
    with pytest.raises(ValueError, match="between 1 and the 40 samples"):
        DeviceLoader(torch.rand(40, 1, 4, 4), y, 50, balanced=False)


def test_device_loader_augment_and_channels_last() -> None:
    ds = make_synthetic(num_classes=2, shape=(3, 32, 32), n_train=32, n_test=2, seed=0)
    loader = DeviceLoader(ds.train_x, ds.train_y, 8, k=1, augment=augment_cifar, channels_last=True, seed=0)
    plain = DeviceLoader(ds.train_x, ds.train_y, 8, k=1, seed=0)
    changed = False
    for (xb, yb), (xp, yp) in zip(loader, plain, strict=True):
        assert xb.shape == (8, 3, 32, 32) and xb.is_contiguous(memory_format=torch.channels_last)
        assert xb.min() >= 0 and xb.max() <= 1
        assert torch.equal(yb, yp)
        changed |= not torch.equal(xb, xp)
    assert changed


def test_channels_last_is_made_before_the_copy_to_the_device():
    """The layout is converted on the host: the device never holds both layouts of the split."""
    x = torch.rand(40, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(40) % 4
    loader = DeviceLoader(x, y, 8, device="meta", channels_last=True)
    assert loader.x.device.type == "meta" and loader.x.is_contiguous(memory_format=torch.channels_last)
    xb, _ = next(iter(DeviceLoader(x, y, 8, channels_last=True)))
    assert xb.is_contiguous(memory_format=torch.channels_last)
