"""Device memory of one ResNet18 trial, measured on the CPU: data on the device, weights + Adam, activations.

What a trial holds on its GPU, for checking a sweep's `resources: {gpu: …}` against a card:
  data         both splits as float32 tensors, resident on the device (DeviceLoader and evaluation)
  model        weights, gradients and Adam's two moments (4 × parameters × 4 bytes)
  activations  the tensors autograd saves in one training step for its backward pass, at the given batch size,
               counted with torch.autograd.graph.saved_tensors_hooks under the run's precision (bf16 autocast or
               float32); the allocator's peak also holds a few transient buffers and cuDNN workspace on top.
The CUDA context (≈ 0.5 GiB) comes on top. Sizes in GiB (2³⁰ bytes).

    python benchmarks/bench_memory.py [--batch-size 500] [--latent 256]
"""

from __future__ import annotations

import argparse
import sys

import torch

from ibbench import train
from ibbench.config import RunConfig
from ibbench.data import make_synthetic

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
