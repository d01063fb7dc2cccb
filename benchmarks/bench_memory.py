"""Device memory of one ResNet18 trial, measured on the CPU: data on the device, weights + Adam, activations.

What a trial holds on its GPU, for checking a sweep's `resources: {gpu: …}` against a card:
  data         both splits as float32 tensors, resident on the device (DeviceLoader and evaluation)
  model        weights, gradients and Adam's two moments (4 × parameters × 4 bytes)
  activations  the tensors autograd saves in one training step for its backward pass, at the given batch size,
               counted with torch.autograd.graph.saved_tensors_hooks under the run's precision (bf16 autocast or
               float32); the allocator's peak also holds a few transient buffers and cuDNN workspace on top.
The CUDA context (≈ 0.5 GiB) comes on top. Sizes in GiB (2³⁰ bytes). Where torch sees a GPU, the prediction is
checked against it: torch.cuda.max_memory_allocated over two training steps of a trial built as train.run builds
it (both CIFAR-sized splits resident, channels_last, cudnn.benchmark), for each precision.

    python benchmarks/bench_memory.py [--batch-size 500] [--latent 256]
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from ibbench import train
from ibbench.config import RunConfig
from ibbench.data import Dataset, make_synthetic

GIB = 2**30


def saved_activation_bytes(cfg: RunConfig, batch: int) -> int:
    """Bytes autograd saves for backward in one forward of encoder + objective at this batch (distinct storages)."""
    data = make_synthetic(shape=(3, 32, 32), n_train=batch, n_test=10, seed=0)
    model = train._build(cfg, data, torch.device("cpu"))
    x, y = data.train_x[:batch], data.train_y[:batch]
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    amp = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.amp == "bf16" else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        h = model.encoder(x)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.objective(h.float(), y)["loss"]
    return sum(seen.values())


def measured_peak(cfg: RunConfig, data: Dataset, device: torch.device) -> tuple[int, int]:
    """Peak bytes (allocated, reserved) on the GPU over two training steps of a trial, both splits resident."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    torch.backends.cudnn.benchmark = True  # as train.run sets it on CUDA
    train.set_precision(cfg, device)
    model = train._build(cfg, data, device)
    loader = train.make_loader(cfg, data, device)
    test_x = data.test_x.to(device)  # evaluation's split, resident too
    optimizer = torch.optim.Adam([*model.encoder.parameters(), *model.objective.parameters()], lr=cfg.lr)
    train._train_epoch(cfg, model, itertools.islice(iter(loader), 2), optimizer, device, 1)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    del model, loader, test_x, optimizer
    torch.cuda.empty_cache()
    return peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--latent", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data_bytes = (50_000 + 10_000) * 3 * 32 * 32 * 4  # CIFAR-10's splits as float32
    base = dict(dataset="synthetic", encoder="resnet18", latent_dim=args.latent, batch_size=args.batch_size)
    params = sum(p.numel() for p in train._build(RunConfig.from_dict(base), make_synthetic(), torch.device("cpu"))
                 .encoder.parameters())  # fmt: skip
    print(f"ResNet18 (CIFAR stem), latent {args.latent}, batch {args.batch_size}, objective ib; CIFAR-10 on the device")
    print(f"  data        {data_bytes / GIB:6.2f} GiB  (50000 + 10000 images, float32)")
    print(f"  model       {4 * params * 4 / GIB:6.2f} GiB  ({params / 1e6:.2f} M parameters × weights, grads, Adam)")
    for amp in ("bf16", "off"):
        act = saved_activation_bytes(RunConfig.from_dict({**base, "amp": amp}), args.batch_size)
        total = data_bytes + 16 * params + act
        label = "bf16 autocast" if amp == "bf16" else "float32"
        print(f"  activations {act / GIB:6.2f} GiB  ({label}); trial total {total / GIB:.2f} GiB + CUDA context")
    if torch.cuda.is_available():
        device = torch.device("cuda")
        data = make_synthetic(shape=(3, 32, 32), n_train=50_000, n_test=10_000, seed=0)
        for amp in ("bf16", "off"):
            cfg = RunConfig.from_dict({**base, "amp": amp, "channels_last": True, "device": "cuda"})
            allocated, reserved = measured_peak(cfg, data, device)
            label = "bf16 autocast" if amp == "bf16" else "float32"
            print(
                f"  measured on {torch.cuda.get_device_name(device)} ({label}): peak {allocated / GIB:.2f} GiB "
                f"allocated, {reserved / GIB:.2f} GiB reserved (two training steps; CUDA context on top)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
