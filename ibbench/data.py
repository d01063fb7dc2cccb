"""Datasets as whole tensors in [0, 1], class-balanced batching and a loader that lives on the device."""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ibbench.errors import ConfigError
from ibbench.registry import Registry

logger = logging.getLogger(__name__)

# Where cifar10 looks when no data_dir is given; "~" is expanded when loading.
DEFAULT_CIFAR10_DIR = Path("~/.cache/ibbench/cifar10")
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")

# A quarter of digits is ~450 test images, ~45 per class: enough for a per-class k-NN entropy with k up to
# ~40 and a 0.2 % accuracy resolution, while 1347 images stay for training.
DIGITS_TEST_FRACTION = 0.25
# Data splits are fixed per dataset, drawn with this seed, never the run's: all seeds of a configuration see the
# same training, validation and test sets, so seeds vary the model only.
SPLIT_SEED = 0


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset; mean/std are per channel over the train split, in [0, 1] pixel units."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Dataset:
    """The splits as tensors: x (N, C, H, W) float32 in [0, 1], y (N,) int64 in [0, num_classes).

    val_x/val_y, when present, were carved out of the training split (with_validation): what runs select on.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    info: DatasetInfo
    val_x: Tensor | None = None
    val_y: Tensor | None = None

    def __post_init__(self) -> None:
        splits = [("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)]
        if self.val_x is not None or self.val_y is not None:
            splits.append(("val", self.val_x, self.val_y))
        for split, x, y in splits:
            if tuple(x.shape[1:]) != self.info.input_shape or x.dtype != torch.float32:
                raise ValueError(f"{split}_x is {x.dtype} {tuple(x.shape)}, not float32 (N, *{self.info.input_shape})")
            if y.shape != (x.shape[0],) or y.dtype != torch.int64:
                raise ValueError(f"{split}_y is {y.dtype} {tuple(y.shape)}, not int64 ({x.shape[0]},)")


class DatasetLoader(Protocol):
    """Loads one dataset; loaders that need no files ignore data_dir and download."""

    num_classes: int  # known without loading, so configs are checked before any data is read

    def __call__(self, data_dir: str | Path | None, download: bool, seed: int) -> Dataset: ...


def _classes(n: int) -> Callable[[Callable[..., Dataset]], DatasetLoader]:
    """Attach the class count to a loader."""

    def attach(loader):
        loader.num_classes = n
        return loader

    return attach


DATASETS: Registry[DatasetLoader] = Registry("dataset")


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = False, seed: int = 0) -> Dataset:
    """Dataset `name` with its fixed splits (independent of seed, kept for the loaders' signature)."""
    dataset = DATASETS.get(name)(data_dir, download, seed)
    logger.info(
        "dataset %s: %d train, %d test, shape %s, %d classes",
        name,
        len(dataset.train_y),
        len(dataset.test_y),
        dataset.info.input_shape,
        dataset.info.num_classes,
    )
    return dataset


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of x (N, C, H, W), accumulated in float64."""
    means, stds = [], []
    # One channel at a time: a float64 copy of all of CIFAR-10 would take 1.2 GB.
    for c in range(x.shape[1]):
        xc = x[:, c]
        mean = xc.mean(dtype=torch.float64)
        var = xc.square().mean(dtype=torch.float64) - mean.square()
        means.append(float(mean))
        stds.append(float(var.clamp_min(0.0).sqrt()))
    return tuple(means), tuple(stds)


def _make_dataset(
    name: str, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, classes: Sequence[str]
) -> Dataset:
    """Dataset with info derived from the tensors; statistics from the train split only."""
    mean, std = channel_stats(train_x)
    c, h, w = train_x.shape[1:]
    info = DatasetInfo(name, (c, h, w), len(classes), mean, std, tuple(classes))
    return Dataset(train_x, train_y, test_x, test_y, info)


def cifar10_root(data_dir: str | Path | None, download: bool) -> Path:
    """The CIFAR-10 root folder; ConfigError naming it when the files are missing and download is off."""
    root = (DEFAULT_CIFAR10_DIR if data_dir is None else Path(data_dir)).expanduser()
    folder = root / CIFAR10_FOLDER
    if not download and not all((folder / name).is_file() for name in CIFAR10_FILES):
        raise ConfigError(
            str(root),
            "data_dir",
            f"CIFAR-10 not found (expected {folder})",
            "a folder holding cifar-10-batches-py; fetch it with download: true on a machine with internet, "
            "or copy it there",
        )
    return root


def check_available(name: str, data_dir: str | Path | None = None, download: bool = False) -> None:
    """ConfigError now, rather than in every trial later, when a dataset's files are missing offline."""
    if name == "cifar10":
        cifar10_root(data_dir, download)


@DATASETS.register("cifar10")
@_classes(10)
def load_cifar10(data_dir: str | Path | None, download: bool, seed: int) -> Dataset:
    """CIFAR-10 from <data_dir>/cifar-10-batches-py (default ~/.cache/ibbench/cifar10): 50000/10000 images."""
    del seed  # the official split is fixed
    root = cifar10_root(data_dir, download)
    # Imported here: torchvision costs seconds to import and only this loader needs it.
    from torchvision.datasets import CIFAR10

    class CIFAR10Files(CIFAR10):
        """torchvision's CIFAR-10 reader that checks the batch files exist instead of re-hashing them."""

        # torchvision hashes all 178 MB on every construction, and the pinned MD5s reject any other file in
        # the same layout (such as the test fixture). download() still checks the archive's MD5.
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    splits = []
    for train in (True, False):
        split = CIFAR10Files(root=str(root), train=train, download=download and train)
        # data is (N, 32, 32, 3) uint8 HWC; the permuted copy is NCHW-contiguous.
        x = torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous().to(torch.float32).div_(255.0)
        splits.append((x, torch.tensor(split.targets, dtype=torch.int64), list(split.classes)))
    (train_x, train_y, classes), (test_x, test_y, _) = splits
    return _make_dataset("cifar10", train_x, train_y, test_x, test_y, classes)


@DATASETS.register("digits")
@_classes(10)
def load_digits(data_dir: str | Path | None, download: bool, seed: int) -> Dataset:
    """scikit-learn's bundled digits: 1797 images 1x8x8, 0..16 scaled to [0, 1]; a fixed stratified split."""
    del data_dir, download, seed  # bundled with scikit-learn; the split does not depend on the run's seed
    data = np.loadtxt(_sklearn_data_file("digits.csv.gz"), delimiter=",")
    x = torch.tensor(data[:, :-1], dtype=torch.float32).div_(16.0).reshape(-1, 1, 8, 8)
    labels = data[:, -1].astype(np.int64)
    y = torch.from_numpy(labels)
    train_idx, test_idx = stratified_split(labels, DIGITS_TEST_FRACTION, SPLIT_SEED)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    classes = [str(c) for c in range(10)]
    return _make_dataset("digits", x[train_idx], y[train_idx], x[test_idx], y[test_idx], classes)


def _sklearn_data_file(name: str) -> Path:
    """A data file that scikit-learn bundles, found without importing scikit-learn (1.5-2 s in every trial)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the digits dataset is the one scikit-learn bundles: pip install scikit-learn")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of a stratified shuffle split: scikit-learn's `train_test_split(..., stratify=y,
    random_state=seed)`, index for index (tested against it), without importing scikit-learn."""
    n = len(y)
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    _, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i, count in enumerate(class_counts):
        members = class_indices[i].take(rng.permutation(count), mode="clip")
        train.extend(members[: n_i[i]])
        test.extend(members[n_i[i] : n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Draws per class for n_draws stratified draws: the floor of each class's share, the rest to the largest
    remainders (ties broken by rng), as scikit-learn's `_approximate_mode`."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def make_synthetic(
    num_classes: int = 10,
    shape: tuple[int, int, int] = (3, 32, 32),
    n_train: int = 500,
    n_test: int = 200,
    seed: int = 0,
    noise: float = 0.2,
) -> Dataset:
    """Class blobs: a uniform random prototype per class plus N(0, noise²) per pixel, clipped to [0, 1]."""
    if num_classes < 1 or n_train < 1 or n_test < 1:
        raise ValueError(f"need positive num_classes, n_train, n_test; got {num_classes}, {n_train}, {n_test}")
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.rand((num_classes, *shape), generator=generator)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        # Labels cycle through the classes so every class gets floor or ceil of n / num_classes images.
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)]
        x = prototypes[y] + noise * torch.randn((n, *shape), generator=generator)
        return x.clamp_(0.0, 1.0), y

    train_x, train_y = sample(n_train)
    test_x, test_y = sample(n_test)
    classes = [f"class_{c}" for c in range(num_classes)]
    return _make_dataset("synthetic", train_x, train_y, test_x, test_y, classes)


@DATASETS.register("synthetic")
@_classes(10)
def load_synthetic(data_dir: str | Path | None, download: bool, seed: int) -> Dataset:
    """make_synthetic's defaults (10 classes, 3x32x32, 500 train / 200 test): small enough for CPU tests."""
    del data_dir, download, seed  # generated in memory, the same data for every run seed
    return make_synthetic(seed=SPLIT_SEED)


def with_validation(data: Dataset, fraction: float) -> Dataset:
    """data with a class-stratified `fraction` of its training split moved to val_x/val_y.

    Fixed per dataset (drawn with SPLIT_SEED, never the run's seed): every run of a dataset, whatever its seed, has
    the same validation set, disjoint from train and test. Each class keeps round(fraction · its count) images, at
    least one and never all.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the validation fraction must lie in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    held = []
    for c in torch.unique(data.train_y):
        members = torch.nonzero(data.train_y == c).squeeze(1)
        count = min(max(1, round(fraction * len(members))), len(members) - 1)
        held.append(members[torch.randperm(len(members), generator=generator)[:count]])
    val = torch.sort(torch.cat(held)).values
    keep = torch.ones(len(data.train_y), dtype=torch.bool)
    keep[val] = False
    return Dataset(data.train_x[keep], data.train_y[keep], data.test_x, data.test_y, data.info,
                   data.train_x[val], data.train_y[val])  # fmt: skip


def augment_cifar(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad-4 random crop and random horizontal flip of x (N, C, H, W), batched on x's device."""
    pad = 4
    n, c, h, w = x.shape
    # Offsets are drawn on the generator's device (CPU usually), so a seed gives the same crops on any device.
    rand_device = generator.device if generator is not None else x.device
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=rand_device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=rand_device)
    flip = torch.rand((n,), generator=generator, device=rand_device) < 0.5
    if rand_device.type == "cpu" and x.is_cuda:  # one non-blocking copy from pinned memory: no wait per step
        dy, dx, flip = torch.stack([dy, dx, flip.long()]).pin_memory().to(x.device, non_blocking=True).unbind(0)
        flip = flip.bool()
    else:
        dy, dx, flip = dy.to(x.device), dx.to(x.device), flip.to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols_fwd = torch.arange(w, device=x.device)
    cols = dx[:, None] + torch.where(flip[:, None], cols_fwd.flip(0), cols_fwd)  # (N, W)
    # One gather for the whole batch instead of a Python loop over images or offsets.
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def check_batch(batch_size: int, num_classes: int, k: int) -> None:
    """Raise ValueError unless batch_size splits into equal per-class shares of more than k samples."""
    if batch_size < 1 or num_classes < 1 or k < 0:
        raise ValueError(f"need batch_size >= 1, classes >= 1, k >= 0; got {batch_size}, {num_classes}, {k}")
    if batch_size % num_classes:
        raise ValueError(
            f"batch_size {batch_size} is not a multiple of the {num_classes} classes: class-balanced batches "
            f"hold batch_size // classes samples of every class"
        )
    per_class = batch_size // num_classes
    if per_class <= k:
        raise ValueError(
            f"batch_size {batch_size} with {num_classes} classes gives {per_class} samples per class but "
            f"k = {k}: each class needs more than k samples per batch because the k-NN entropy of H[Z|y] "
            f"is estimated per class; use batch_size >= {num_classes * (k + 1)}"
        )


def balanced_batches(y: Tensor, batch_size: int, k: int, generator: torch.Generator | None = None) -> list[Tensor]:
    """One epoch of index tensors (batch_size,) on y's device, each with batch_size // C samples per class.

    An epoch is N // batch_size batches, as with plain shuffling. Each class contributes a fresh permutation
    of its samples per epoch: larger classes are subsampled (a different subset each epoch), smaller ones are
    re-permuted and cycled until they fill their share. C counts the labels present in y.
    """
    labels = y.cpu()
    classes = torch.unique(labels)
    check_batch(batch_size, len(classes), k)
    num_batches = len(labels) // batch_size
    if num_batches == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {len(labels)} samples")
    per_class = batch_size // len(classes)
    need = num_batches * per_class
    shares = []
    for c in classes:
        members = torch.nonzero(labels == c).squeeze(1)
        repeats = -(-need // len(members))
        cycled = torch.cat([members[torch.randperm(len(members), generator=generator)] for _ in range(repeats)])
        shares.append(cycled[:need].reshape(num_batches, per_class))
    grouped = torch.cat(shares, dim=1)  # (batches, batch_size), class-blocked
    # Mix the classes within each batch so no consumer can depend on a class-sorted order.
    order = torch.rand(grouped.shape, generator=generator).argsort(dim=1)
    return list(grouped.gather(1, order).to(y.device).unbind(0))


class DeviceLoader:
    """A whole split held as one tensor on `device`, yielding (xb, yb) batches; no worker processes."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        balanced: bool = True,
        k: int = 0,
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        seed: int | torch.Generator = 0,
        channels_last: bool = False,
    ):
        """x (N, C, H, W) in [0, 1], y (N,); k = 0 where no per-class k-NN estimate constrains batches."""
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if batch_size < 1 or len(y) < batch_size:
            raise ValueError(f"batch_size {batch_size} must be between 1 and the {len(y)} samples")
        if balanced:
            check_batch(batch_size, len(torch.unique(y)), k)
        target = torch.device(device) if device is not None else x.device
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # Layout first, on the host: converting after the copy would hold both layouts on the device at once
        # (CIFAR-10's train split is 0.6 GB); .to() keeps the layout.
        self.x = x.contiguous(memory_format=memory_format).to(target)
        self.y = y.to(target)
        self.batch_size = batch_size
        self.balanced = balanced
        self.k = k
        self.augment = augment
        self.channels_last = channels_last
        # The training stream: batch order from a CPU generator (indices are drawn once an epoch), augmentation
        # (and the objective's noise, drawn by train.py) from one on the device, so that no step copies random
        # numbers from the host. Their states are the loader's whole randomness: save both to resume mid-run.
        self.generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
        kind = target if target.type in ("cpu", "cuda") else torch.device("cpu")  # no generators on `meta`
        self.device_generator = torch.Generator(device=kind).manual_seed(self.generator.initial_seed() + 1)

    def __len__(self) -> int:
        """Batches per epoch: N // batch_size (the remainder is left out, a different one each epoch)."""
        return len(self.y) // self.batch_size

    def _epoch_indices(self) -> list[Tensor]:
        if self.balanced:
            return balanced_batches(self.y, self.batch_size, self.k, self.generator)
        order = torch.randperm(len(self.y), generator=self.generator)[: len(self) * self.batch_size]
        return list(order.to(self.y.device).reshape(len(self), self.batch_size).unbind(0))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of (xb (B, C, H, W), yb (B,)), reshuffled on every call."""
        for idx in self._epoch_indices():
            xb, yb = self.x[idx], self.y[idx]
            if self.augment is not None:
                xb = self.augment(xb, self.device_generator)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb
