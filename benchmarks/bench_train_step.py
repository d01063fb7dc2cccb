"""Training-step cost of `ib` (and `vib`, `nlib`) against `ce` on the same encoder and batches, and the share of a
run spent evaluating.

Everything is measured in one run through train.py's own pieces (`_build`, `_train_epoch`, `_evaluate`), so the
step is exactly the one train.run takes: a DeviceLoader batch (with augmentation on 32×32), the encoder forward,
the float32 latent, zero-entropy noise, the registry objective, backward and an Adam step.

    python benchmarks/bench_train_step.py [--quick] [--device cpu|cuda] [--steps S] [--repeats R] [--threads T]
                                          [--objectives ib,vib,nlib]

Batch size: train.run always draws class-balanced batches (batch_size a multiple of the class count, for `ce`
too), so the "batch 128" of the issue is run as 130 = 13 per class for both objectives.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import torch

from ibbench import train
from ibbench.config import RunConfig
from ibbench.data import Dataset, DeviceLoader, load_dataset, make_synthetic, with_validation
from ibbench.evaluation import encode, information_plane

TARGET_RATIO = 1.05  # the target: IB's step at most 5 % slower than CE's
# A β in each objective's own range (β'' for ib), mid-sweep values: the step cost does not depend on it.
OBJECTIVE_BETA = {"ce": 0.1, "ce_dropconnect": 0.1, "ib": 0.1, "vib": 1e-3, "nlib": 0.1}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one fn() call, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def endless(loader: DeviceLoader) -> Iterator:
    """The loader's batches, epoch after epoch (each epoch reshuffled as in train.run)."""
    while True:
        yield from loader


class Trainer:
    """One objective's encoder, objective, optimiser and batch stream, built as train.run builds them."""

    def __init__(self, cfg: RunConfig, data: Dataset, device: torch.device):
        self.cfg, self.data, self.device = cfg, data, device
        train.seed_everything(cfg.seed)  # the same initial encoder for every objective
        self.model = train._build(cfg, data, device)
        params = list(self.model.encoder.parameters()) + list(self.model.objective.parameters())
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr)
        self.loader = train.make_loader(cfg, data, device)
        self.batches = endless(self.loader)
        self.epoch = 0

    def steps(self, n: int) -> float:
        """Seconds for n training steps through train._train_epoch."""
        chunk: Iterable = itertools.islice(self.batches, n)  # batches are drawn inside the timed call, as in run
        self.epoch += 1
        return timed(
            lambda: train._train_epoch(self.cfg, self.model, chunk, self.optimizer, self.device, self.epoch),
            self.device,
        )

    def epoch_seconds(self) -> float:
        """Seconds for one whole training epoch over the loader."""
        self.epoch += 1
        return timed(
            lambda: train._train_epoch(self.cfg, self.model, self.loader, self.optimizer, self.device, self.epoch),
            self.device,
        )

    def objective_only(self, repeats: int) -> float:
        """Median seconds of the objective's forward + backward on a fixed encoder output: its own cost alone."""
        xb, yb = next(self.batches)
        with torch.no_grad():
            h0 = self.model.encoder(xb).float()
        times = []
        for _ in range(repeats + 1):
            h = h0.clone().requires_grad_(True)
            step = lambda h=h: self.model.objective(h, yb)["loss"].backward()  # noqa: E731
            times.append(timed(step, self.device))
        return statistics.median(times[1:])


def compare_step(
    label: str,
    base: RunConfig,
    data: Dataset,
    device: torch.device,
    steps: int,
    repeats: int,
    objectives: tuple[str, ...] = ("ib",),
    warmup: bool = True,
) -> dict[str, float]:
    """Median seconds per step of each objective and of ce, timed in rotating chunks; prints each ratio to ce."""
    names = ("ce", *objectives)
    trainers = {name: Trainer(base.replace(objective=name, beta=OBJECTIVE_BETA[name], noise=None), data, device)
                for name in names}  # fmt: skip
    for trainer in trainers.values() if warmup else ():  # warm-up: allocator, first-call overheads, cudnn autotune
        trainer.steps(max(1, min(steps, 2)))
    per_step: dict[str, list[float]] = {name: [] for name in trainers}
    pair_ratios: dict[str, list[float]] = {name: [] for name in objectives}
    for r in range(repeats):
        # Rotate which objective goes first, so drift in a shared machine's load hits all alike.
        order = names[r % len(names) :] + names[: r % len(names)]
        got = {name: trainers[name].steps(steps) / steps for name in order}
        for name, seconds in got.items():
            per_step[name].append(seconds)
        for name in objectives:
            pair_ratios[name].append(got[name] / got["ce"])
    med = {name: statistics.median(v) for name, v in per_step.items()}
    obj = {name: t.objective_only(max(5, repeats)) for name, t in trainers.items()}
    b = base.batch_size
    print(f"\n{label}: batch {b}, latent {base.latent_dim}, k {base.k}, {repeats} × {steps} steps per objective")
    for name in names:
        spread = max(per_step[name]) / min(per_step[name])
        print(
            f"  {name:>4}: {1e3 * med[name]:9.2f} ms/step  {b / med[name]:9.1f} images/s  "
            f"(max/min over repeats {spread:.2f}; objective fwd+bwd alone {1e3 * obj[name]:.2f} ms)"
        )
    out = {name: med[name] for name in names}
    for name in objectives:
        # Headline: the median of ratios of adjacent chunks, which saw the same load on a shared machine. The only
        # difference between two steps is the objective, so its own cost over the ce step is a load-independent
        # estimate of the same ratio.
        ratio = statistics.median(pair_ratios[name])
        from_parts = 1.0 + (obj[name] - obj["ce"]) / med["ce"]
        print(f"  {name}: ratio of medians {med[name] / med['ce']:.3f}; from the objective's own cost: "
              f"{from_parts:.3f} ({1e3 * (obj[name] - obj['ce']):+.2f} ms per step)")  # fmt: skip
        target = f"; target ≤ {TARGET_RATIO}: {'met' if ratio <= TARGET_RATIO else 'missed'}" if name == "ib" else ""
        print(f"ratio {name}/ce {label}: {ratio:.3f} (median of {repeats} paired ratios{target})")
        out[f"ratio_{name}"] = ratio
    return out


def eval_share(
    base: RunConfig, data: Dataset, device: torch.device, widths: list[int], repeats: int, eval_repeats: int
) -> None:
    """One _evaluate call against one training epoch, per probe width; the share of a run spent evaluating."""
    trainer = Trainer(base, data, device)
    for _ in range(2):  # a couple of epochs so the latents are not those of a random encoder
        trainer.epoch_seconds()
    epoch = statistics.median(trainer.epoch_seconds() for _ in range(repeats))
    steps = len(trainer.loader)
    print(
        f"\nevaluation share: {base.encoder} on {base.dataset} ({len(data.train_y)} train / {len(data.test_y)} test), "
        f"objective {base.objective}, batch {base.batch_size} ({steps} steps/epoch), decoders {list(base.decoders)}, "
        f"k {base.k}"
    )
    print(f"  training epoch: {epoch:.3f} s (median of {repeats})")
    default_every = RunConfig().eval_every
    # Evaluation decoders select on a validation split: carve one as train.run does (from the training split).
    held = data if data.val_x is not None else with_validation(data, base.val_fraction)
    splits = train._Splits(
        trainer.loader.x, trainer.loader.y, held.val_x.to(device), held.val_y.to(device), data.test_x.to(device),
        data.test_y.to(device), data.info.num_classes,
    )  # fmt: skip
    for width in widths:
        cfg = base.replace(probe_width=width)
        evals, planes = [], []
        for r in range(eval_repeats):
            train.seed_everything(r)
            evals.append(timed(lambda cfg=cfg: train._evaluate(cfg, trainer.model, splits, 1), device))
            z = encode(trainer.model.latent, data.test_x.to(device), noise=True)
            y = data.test_y.to(device)
            train.seed_everything(r)
            probe = lambda z=z, y=y, k=cfg.k, w=width: information_plane(z, y, data.info.num_classes, k, width=w)  # noqa: E731
            planes.append(timed(probe, device))
        t_eval, t_plane = statistics.median(evals), statistics.median(planes)
        shares = {every: t_eval / (every * epoch + t_eval) for every in sorted({1, default_every})}
        share_text = ", ".join(f"eval_every={e}: {100 * s:.1f} %" for e, s in shares.items())
        tag = " (RunConfig default)" if width == RunConfig().probe_width else ""
        print(
            f"  probe_width {width}{tag}: one _evaluate {t_eval:.3f} s (median of {eval_repeats}); the "
            f"information-plane point alone (k-NN H[Z] + ResFC probe fit) {t_plane:.3f} s"
        )
        print(f"ratio eval/epoch probe_width={width}: {t_eval / epoch:.2f}; share of a run evaluating: {share_text}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    parser.add_argument(
        "--steps", type=int, help="steps per timed chunk (default: 1 for resnet18, 20 for cnn; 1-2 with --quick)"
    )
    parser.add_argument("--repeats", type=int, help="timed chunks per objective (default 9; 1 with --quick)")
    parser.add_argument("--objectives", default="ib,vib,nlib", help="objectives timed against ce (comma-separated)")
    parser.add_argument("--eval-repeats", type=int, help="_evaluate calls per probe width (default 3; 1 with --quick)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads on CPU (default 1: on a shared 2-core machine, 2 threads beside a busy "
        "process made a ResNet18 step 2-4x slower than 1 thread)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 9)
    eval_repeats = args.eval_repeats or (1 if args.quick else 3)
    batch = 20 if args.quick else 130
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}"
        + (", --quick (smoke sizes, not a measurement)" if args.quick else "")
    )

    common = dict(latent_dim=256, batch_size=batch, device=device.type, k=1, beta=0.1)
    # ResNet18 on CIFAR-sized synthetic images (the step cost does not depend on the pixels).
    n_cifar = 4 * batch
    cifar = make_synthetic(shape=(3, 32, 32), n_train=n_cifar, n_test=max(100, batch), seed=0)
    resnet = RunConfig.from_dict(dict(dataset="synthetic", encoder="resnet18", **common))
    objectives = tuple(args.objectives.split(","))
    warmup = not args.quick  # --quick: a smoke test of the code path, its first steps' overheads included
    compare_step(f"[resnet18, 3x32x32, batch {batch}]", resnet, cifar, device, args.steps or 1, repeats, objectives,
                 warmup)  # fmt: skip
    digits = load_dataset("digits")
    cnn = RunConfig.from_dict(dict(dataset="digits", encoder="cnn", **common))
    cnn_steps = args.steps or (2 if args.quick else 20)
    compare_step(f"[cnn, digits 1x8x8, batch {batch}]", cnn, digits, device, cnn_steps, repeats, objectives, warmup)

    # Evaluation: the RunConfig defaults (decoders, probe_width, k, latent 256) on digits with the cnn; batch 100
    # (13 steps per epoch over digits' 1347 training images), the size the repository's digits configs use.
    widths = [64, 16] if args.quick else [RunConfig().probe_width, 128]
    eval_cfg = RunConfig.from_dict(
        dict(dataset="digits", encoder="cnn", objective="ib", batch_size=100, device=device.type)
    )
    eval_share(eval_cfg, digits, device, widths, max(1, min(repeats, 5)), eval_repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
