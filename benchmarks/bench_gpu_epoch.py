"""One ResNet18 `ib` training epoch: device-resident loader + bf16 autocast + channels_last against a plain DataLoader.

Both epochs run train.py's own `_train_epoch` (encoder forward, float32 latent, zero-entropy noise, the ib objective,
backward, Adam) on the same data, the same initial weights and the same pad-4 crop + flip augmentation:

  fast  : ibbench's DeviceLoader (the whole split on the device, class-balanced batches, augment_cifar batched on
          the device, channels_last), bf16 autocast of the encoder, channels_last weights, cudnn.benchmark on.
  plain : what a typical script does: a CPU TensorDataset through torch's DataLoader(batch_size, shuffle=True,
          num_workers, pin_memory) with a per-batch .to(device, non_blocking=True), the same augment_cifar applied
          on the device after the copy, float32, contiguous (NCHW) memory, cudnn.benchmark off. Workers start anew
          each epoch (no persistent_workers), as in most scripts. Its batches are class-balanced too (a batch
          sampler over the same balanced_batches), so both paths run the same batched estimator and the ratio
          measures the loader, autocast and layout only.

Data: CIFAR-10's training split when it is found (--data-dir, or ibbench's default folder), else synthetic
CIFAR-sized class blobs (make_synthetic); the step cost does not depend on the pixels. Evaluation is not timed.

    python benchmarks/bench_gpu_epoch.py                      # on a GPU machine; the goal is ≤ 3 s/epoch on an H200
    python benchmarks/bench_gpu_epoch.py --n 200 --batch-size 100 --device cpu --warmup 1   # smoke test
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, TensorDataset

from ibbench import train
from ibbench.config import RunConfig
from ibbench.data import Dataset, DeviceLoader, augment_cifar, balanced_batches, load_dataset, make_synthetic
from ibbench.errors import ConfigError

GOAL_SECONDS = 3.0  # the goal for the fast epoch on an H200


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def get_data(n: int, data_dir: str | None, seed: int) -> tuple[Dataset, str]:
    """CIFAR-10 (first n training images) when found, else n synthetic 3×32×32 images in 10 classes."""
    try:
        data = load_dataset("cifar10", data_dir)
    except ConfigError as exc:
        if data_dir is not None:
            print(f"note: {exc}; using synthetic data", file=sys.stderr)
        return make_synthetic(shape=(3, 32, 32), n_train=n, n_test=10, seed=seed), f"synthetic 3x32x32, n={n}"
    if n < len(data.train_y):
        data = Dataset(data.train_x[:n], data.train_y[:n], data.test_x, data.test_y, data.info)
    return data, f"CIFAR-10 train split, n={len(data.train_y)}"


class BalancedBatches:
    """A batch sampler of class-balanced index batches (ibbench's balanced_batches), reshuffled each epoch."""

    def __init__(self, y: torch.Tensor, batch_size: int, k: int, seed: int):
        self.y, self.batch_size, self.k = y.cpu(), batch_size, k
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.y) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for batch in balanced_batches(self.y, self.batch_size, self.k, self.generator):
            yield batch.tolist()


class PlainLoader:
    """A plain torch DataLoader over CPU tensors, each batch copied to the device and augmented there."""

    def __init__(self, data: Dataset, batch_size: int, device: torch.device, workers: int, seed: int, k: int):
        self.device = device
        self.aug_generator = torch.Generator().manual_seed(seed + 1)
        self.loader = DataLoader(
            TensorDataset(data.train_x, data.train_y),
            batch_sampler=BalancedBatches(data.train_y, batch_size, k, seed),  # the same N // batch_size steps
            num_workers=workers,
            pin_memory=device.type == "cuda",
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for xb, yb in self.loader:
            xb = xb.to(self.device, non_blocking=True)
            yb = yb.to(self.device, non_blocking=True)
            yield augment_cifar(xb, self.aug_generator), yb


def run_path(
    name: str, cfg: RunConfig, data: Dataset, loader, device: torch.device, warmup: int, epochs: int
) -> list[float]:
    """Seconds of each timed epoch of train._train_epoch, after `warmup` untimed steps."""
    train.seed_everything(cfg.seed)  # the same initial weights on both paths
    train.set_precision(cfg, device)  # as train.run sets it
    model = train._build(cfg, data, device)
    params = list(model.encoder.parameters()) + list(model.objective.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    if warmup:
        train._train_epoch(cfg, model, itertools.islice(iter(loader), warmup), optimizer, device, 0)
    times = []
    for epoch in range(1, epochs + 1):
        sync(device)
        t0 = time.perf_counter()
        train._train_epoch(cfg, model, loader, optimizer, device, epoch)
        sync(device)
        times.append(time.perf_counter() - t0)
        print(f"  {name} epoch {epoch}: {times[-1]:.3f} s", flush=True)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="training images (default 50000, CIFAR-10's size)")
    parser.add_argument("--batch-size", type=int, default=500, help="class-balanced batch (default 500 = 50/class)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--data-dir", help="folder holding cifar-10-batches-py (default: ibbench's default folder)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per path after the warm-up (default 3)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per path first (cudnn autotune)")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers of the plain path (default 4)")
    parser.add_argument("--k", type=int, default=1, help="neighbour rank of the estimator (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads when --device cpu (default 1)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(args.threads)

    data, source = get_data(args.n, args.data_dir, seed=0)
    base = dict(
        dataset="cifar10", encoder="resnet18", latent_dim=256, objective="ib", k=args.k, batch_size=args.batch_size
    )
    try:
        fast_cfg = RunConfig.from_dict(dict(base, amp="bf16", channels_last=True, device=device.type))
        plain_cfg = RunConfig.from_dict(dict(base, amp="off", channels_last=False, device=device.type))
        fast_loader = DeviceLoader(
            data.train_x,
            data.train_y,
            args.batch_size,
            device=device,
            k=args.k,
            augment=augment_cifar,
            seed=0,
            channels_last=device.type == "cuda",
        )
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plain_loader = PlainLoader(data, args.batch_size, device, args.workers, seed=0, k=args.k)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    steps = len(fast_loader)
    images = steps * args.batch_size
    print(f"torch {torch.__version__}, device {device} ({name}); data: {source}")
    print(
        f"ResNet18 (CIFAR stem), latent 256, objective ib (k {args.k}), batch {args.batch_size}, {steps} steps "
        f"= {images} images per epoch; warm-up {args.warmup} steps, {args.epochs} timed epoch(s) per path"
    )
    if device.type == "cuda":
        print("fast : DeviceLoader + bf16 autocast + channels_last + cudnn.benchmark")
        print(f"plain: DataLoader(num_workers={args.workers}, pin_memory, balanced batches) + .to(device) + fp32 "
              "(IEEE, no TF32), NCHW")  # fmt: skip
    else:  # train.py applies bf16 autocast and channels_last on CUDA only
        print("fast : DeviceLoader, float32 (bf16 autocast and channels_last are CUDA-only in train.py)")
        print(f"plain: DataLoader(num_workers={args.workers}, balanced batches), float32")

    torch.backends.cudnn.benchmark = False
    plain = run_path("plain", plain_cfg, data, plain_loader, device, args.warmup, args.epochs)
    torch.backends.cudnn.benchmark = True
    fast = run_path("fast ", fast_cfg, data, fast_loader, device, args.warmup, args.epochs)

    t_plain, t_fast = statistics.median(plain), statistics.median(fast)
    for label, seconds in (("plain", t_plain), ("fast ", t_fast)):
        print(f"{label}: {seconds:8.3f} s/epoch  {images / seconds:10.1f} images/s")
    if device.type == "cuda":
        verdict = "met" if t_fast <= GOAL_SECONDS else "missed"
        goal = f"goal ≤ {GOAL_SECONDS:g} s/epoch (H200): {verdict} on {name}"
        if args.n != 50_000:
            goal += f" (but n={args.n}, not 50000)"
    else:
        goal = f"goal ≤ {GOAL_SECONDS:g} s/epoch (H200): not meaningful on {device.type}"
    print(f"ratio plain/fast epoch: {t_plain / t_fast:.2f}x (fast {t_fast:.3f} s, plain {t_plain:.3f} s); {goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
