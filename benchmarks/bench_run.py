"""One short IB run through train.run, timed by phase: training, evaluation, attacks, checkpointing.

    python benchmarks/bench_run.py                    # CPU: digits (MLP) and ResNet18 on CIFAR-shaped synthetic data
    python benchmarks/bench_run.py --device cuda      # the same two runs on a GPU, ResNet18 at CIFAR-10's size
    python benchmarks/bench_run.py --quick            # tiny sizes: a smoke test, not a measurement

Each case is one real train.run (a fresh run directory, deleted afterwards) with timing hooks wrapped around
train.py's own phases, not a re-implementation of its loop:
  train       train._train_epoch (every epoch: forward, estimator, backward, Adam)
  evaluate    train._evaluate (eval epochs): encoding both splits ("encode"), fitting the decoders ("decoders"),
              the information-plane point ("infoplane": H[Z] and the H[Y|Z] probe); the rest of it is the
              decoders' accuracies and the k-NN entropies
  attack      train._robustness: the attack suite on the fixed test subset, once, at the end
  checkpoint  train._save_checkpoint (here after every epoch, checkpoint_every_s = 0 unless --checkpoint-every:
              what checkpointing costs per epoch; the library's default writes one every 300 s and at the end)
  other       the rest of the run's wall time: data loading, building the model, config/metrics/summary files
A 1-epoch digits run goes first, untimed: one-time costs of a fresh process (importing torch._dynamo on the first
Adam, scikit-learn, torchattacks: ~8 s on a CPU) would otherwise land in the first case's "other".
Shares are of the run's total (they sum to 100 %). Wall seconds are synchronised with the device (CUDA) at each
phase boundary; CPU seconds are this process's (all its threads): on a shared machine other processes stretch
wall time but not CPU time, so both are printed. The library's own record, summary.json's phase_time, is printed
beside the hooks' wall times as a cross-check.

The ResNet18 case replaces the dataset loader with make_synthetic at --n/--n-test images (class blobs, 3×32×32,
10 classes): the step cost does not depend on the pixels, and no CIFAR-10 download is needed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from ibbench import results, train
from ibbench.config import RunConfig
from ibbench.data import make_synthetic

PHASES = train.PHASES  # train, evaluate, attack, checkpoint: summary.json's phase_time keys
PARTS = {"encode": "encode", "decoders": "fit_decoders", "infoplane": "information_plane"}  # inside evaluate
HOOKS = {"train": "_train_epoch", "evaluate": "_evaluate", "attack": "_robustness", "checkpoint": "_save_checkpoint"}
MIB = 2**20


class PhaseClock:
    """Wall and CPU seconds and calls of train.py functions while installed: {phase: [wall, cpu, calls]}."""

    def __init__(self, hooks: dict[str, str], device: torch.device):
        self.hooks, self.device = hooks, device
        self.times = {phase: [0.0, 0.0, 0] for phase in hooks}
        self.originals: dict[str, Callable] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _wrap(self, phase: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self._sync()
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                entry = self.times[phase]
                entry[0] += time.perf_counter() - wall
                entry[1] += time.process_time() - cpu
                entry[2] += 1

        return timed

    def __enter__(self) -> PhaseClock:
        for phase, name in self.hooks.items():
            self.originals[name] = getattr(train, name)
            setattr(train, name, self._wrap(phase, self.originals[name]))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self.originals.items():
            setattr(train, name, fn)


@contextmanager
def synthetic_data(n_train: int, n_test: int) -> Iterator[None]:
    """train.run's dataset replaced by make_synthetic(n_train, n_test): CIFAR-shaped class blobs, 10 classes."""
    original = train.load_dataset
    train.load_dataset = lambda *args, **kwargs: make_synthetic(shape=(3, 32, 32), n_train=n_train, n_test=n_test)
    try:
        yield
    finally:
        train.load_dataset = original


def cases(args: argparse.Namespace, device: torch.device) -> list[tuple[str, dict, tuple[int, int] | None]]:
    """(label, RunConfig values, synthetic sizes or None) of each run, digits first."""
    every = {"device": device.type, "checkpoint_every_s": args.checkpoint_every}
    # The quickstart's settings (sweeps/quickstart.yaml: IB with noise, β'' = 0.05, its attack budgets) but fewer
    # epochs: evaluated twice, attacked once.
    digits = dict(dataset="digits", encoder="mlp", latent_dim=16, objective="ib", beta=0.05, k=3, batch_size=100,
                  lr=1e-3, probe_width=64, augment=False, decoders=["gmm"], pgd_steps=10, apgd_steps=20,
                  square_queries=100, attack_images=300, epochs=6, eval_every=3,
                  fgsm_eps=[0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 0.2], **every)  # fmt: skip
    # ResNet18 at the RunConfig defaults (the paper's recipe, the full attack suite at AutoAttack's budgets), on a
    # few steps: 3 epochs evaluated each (the information plane's ResFC probe at its paper width, 1024).
    resnet = dict(dataset="synthetic", encoder="resnet18", objective="ib", epochs=3, eval_every=1, **every)
    n, n_test = args.n, args.n_test
    if device.type == "cpu":  # CPU-sized: a ResNet18 step on 100 images takes seconds, its attacks minutes
        resnet |= dict(batch_size=100, epochs=2, attack_images=20, pgd_steps=10, apgd_steps=10, square_queries=50,
                       fgsm_eps=[0.0, 8 / 255])  # fmt: skip
        n, n_test = n or 500, n_test or 200
    else:
        resnet |= dict(amp="bf16", channels_last=True, attack_images=500, square_queries=500)
        n, n_test = n or 50_000, n_test or 10_000
    if args.quick:
        digits |= dict(epochs=2, eval_every=1, attack_images=60, fgsm_eps=[0.0, 0.1], square_queries=20,
                       apgd_steps=5, pgd_steps=3)  # fmt: skip
        resnet |= dict(batch_size=50, epochs=1, probe_width=64, attack_images=10, pgd_steps=2, apgd_steps=2,
                       square_queries=5, fgsm_eps=[0.0, 0.1])  # fmt: skip
        n, n_test = args.n or 100, args.n_test or 50
    return [("digits", digits, None), ("resnet18", resnet, (n, n_test))]


def run_case(label: str, values: dict, sizes: tuple[int, int] | None, device: torch.device) -> None:
    cfg = RunConfig.from_dict(values)
    data = f"synthetic 3x32x32, {sizes[0]} train / {sizes[1]} test" if sizes else cfg.dataset
    settings = train.attack_settings(cfg)
    print(f"\n[{label}, {device.type}] {cfg.encoder} on {data}, objective {cfg.objective}, batch {cfg.batch_size}, "
          f"{cfg.epochs} epochs, eval every {cfg.eval_every} (decoders {list(cfg.decoders)}, probe width "
          f"{cfg.probe_width}), amp {cfg.amp}; attacks {', '.join(settings.attacks)} on {cfg.attack_images} images, "
          f"{sum(e > 0 for e in cfg.fgsm_eps)} radii; checkpoint_every_s {cfg.checkpoint_every_s:g}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, PhaseClock(HOOKS | PARTS, device) as clock:
        run_dir = Path(tmp) / "run"
        with synthetic_data(*sizes) if sizes else nullcontext():
            wall, cpu = time.perf_counter(), time.process_time()
            summary = train.run(cfg, run_dir)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        checkpoint_mib = (run_dir / results.CHECKPOINT).stat().st_size / MIB
    times = clock.times
    other = [wall - sum(times[p][0] for p in PHASES), cpu - sum(times[p][1] for p in PHASES), 1]
    print(f"  {'phase':<12}{'calls':>6}{'wall s':>10}{'share':>9}{'CPU s':>10}{'share':>9}")
    for phase, (w, c, calls) in [*((p, times[p]) for p in PHASES), ("other", other)]:
        print(f"  {phase:<12}{calls:>6}{w:>10.3f}{100 * w / wall:>8.1f}%{c:>10.3f}{100 * c / cpu:>8.1f}%")
        if phase == "evaluate":
            for part in PARTS:
                w2, c2, calls2 = times[part]
                print(f"    {part:<10}{calls2:>6}{w2:>10.3f}{100 * w2 / wall:>8.1f}%{c2:>10.3f}{100 * c2 / cpu:>8.1f}%")
    print(f"  {'total':<12}{'':>6}{wall:>10.3f}{100.0:>8.1f}%{cpu:>10.3f}{100.0:>8.1f}%")
    recorded = summary["phase_time"]
    print("  summary.json phase_time (wall s): " + ", ".join(f"{p} {recorded[p]:.3f}" for p in PHASES))
    writes = times["checkpoint"][2]
    per_write = times["checkpoint"][0] / max(writes, 1)
    per_epoch = times["train"][0] / max(times["train"][2], 1)
    per_eval = times["evaluate"][0] / max(times["evaluate"][2], 1)
    print(f"  per unit: epoch {per_epoch:.3f} s, evaluation {per_eval:.3f} s, checkpoint {per_write:.3f} s "
          f"({checkpoint_mib:.1f} MiB), attack phase {times['attack'][0]:.3f} s")  # fmt: skip
    shares = [f"{p} {100 * times[p][0] / wall:.1f} %" for p in PHASES] + [f"other {100 * other[0] / wall:.1f} %"]
    print(f"share [{label}, {device.type}]: " + ", ".join(shares))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    parser.add_argument("--only", choices=["digits", "resnet18"], help="run one case only")
    parser.add_argument("--n", type=int, help="ResNet18 training images (default 500 on CPU, 50000 on CUDA)")
    parser.add_argument("--n-test", type=int, help="ResNet18 test images (default 200 on CPU, 10000 on CUDA)")
    parser.add_argument("--checkpoint-every", type=float, default=0.0,
                        help="checkpoint_every_s of the runs (default 0: every epoch, to see its cost)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {device} ({name}), {torch.get_num_threads()} CPU thread(s), "
          f"load average {os.getloadavg()[0]:.1f}" + (", --quick" if args.quick else ""))  # fmt: skip
    every = cases(args, device)
    warm = RunConfig.from_dict({**every[0][1], "epochs": 1, "eval_every": 1, "attack_images": 20})  # digits
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        train.run(warm, Path(tmp) / "warm-up")
        print(f"warm-up (untimed 1-epoch digits run, one-time imports): {time.perf_counter() - started:.1f} s wall")
    for label, values, sizes in every:
        if args.only in (None, label):
            run_case(label, values, sizes, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
