"""Sweep overhead: N short digits runs sequentially in one process vs through `ibbench sweep` (Ray Tune).

Prints the fixed cost of a sweep invocation, Ray's overhead per trial and the speed-up from 2 concurrent
trials, all measured in this run. Usage:
    python benchmarks/bench_sweep.py [--runs N] [--epochs E] [--quickstart]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from ibbench import train
from ibbench.config import load_sweep
from ibbench.sweep import expand

BASE = {
    "dataset": "digits",
    "encoder": "mlp",
    "latent_dim": 16,
    "k": 3,
    "batch_size": 100,
    "eval_every": 2,
    "probe_width": 32,
    "augment": False,
    "decoders": ["gmm"],
    "fgsm_eps": [0.0, 0.02],
}
IBBENCH = str(Path(sys.executable).parent / "ibbench")


def write_spec(folder: Path, name: str, runs: int, epochs: int, cpu: int) -> Path:
    spec = {
        "name": name,
        "base": {**BASE, "epochs": epochs},
        "grid": {"seed": list(range(runs))},
        "resources": {"cpu": cpu},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def timed_sweep(spec: Path, out: Path, extra: list[str] = ()) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([IBBENCH, "sweep", str(spec), "--out", str(out), *extra], capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"sweep failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--quickstart", action="store_true", help="also time sweeps/quickstart.yaml end to end")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seq_spec = load_sweep(write_spec(tmp, "sequential", args.runs, args.epochs, 1))
        torch.set_num_threads(1)  # as each Ray trial does with cpu: 1
        t0 = time.perf_counter()
        for cfg in expand(seq_spec):
            train.run(cfg, tmp / "seq" / str(cfg.seed))
        sequential = time.perf_counter() - t0
        per_run = sequential / args.runs

        half = max(1, args.runs // 2)
        # Serial sweeps (cpu: 2 per trial, so one at a time) of N/2 and N runs: T(n) = fixed + n · per_trial.
        serial_half = timed_sweep(write_spec(tmp, "serial_half", half, args.epochs, 2), tmp / "out")
        one_at_a_time = timed_sweep(write_spec(tmp, "serial", args.runs, args.epochs, 2), tmp / "out")
        two_at_a_time = timed_sweep(write_spec(tmp, "pair", args.runs, args.epochs, 1), tmp / "out")
        nothing = timed_sweep(tmp / "serial.yaml", tmp / "out")  # all DONE: answered from the files, no Ray

    per_trial = (one_at_a_time - serial_half) / (args.runs - half)
    fixed = one_at_a_time - args.runs * per_trial
    overhead = per_trial - per_run
    print(f"torch {torch.__version__}; {args.runs} digits runs of {args.epochs} epochs (mlp, eval every 2)")
    print(f"sequential train.run, one process:        {sequential:7.1f} s  ({per_run:.2f} s per run)")
    print(f"ibbench sweep, {half} runs one at a time:      {serial_half:7.1f} s")
    print(f"ibbench sweep, {args.runs} runs one at a time:      {one_at_a_time:7.1f} s")
    print(f"ibbench sweep, {args.runs} runs two at a time:      {two_at_a_time:7.1f} s")
    print(f"ibbench sweep, all done (no Ray started): {nothing:7.1f} s")
    print(f"fixed cost of a sweep invocation (Ray start, Tuner, exit): {fixed:.1f} s")
    print(
        f"cost per trial {per_trial:.2f} s = train.run {per_run:.2f} s + Ray overhead {overhead:.2f} s (target ≤ 1.5 s)"
    )
    print(f"speed-up from 2 concurrent trials: {(one_at_a_time - fixed) / (two_at_a_time - fixed):.2f}×")
    if args.quickstart:
        with tempfile.TemporaryDirectory() as tmp:
            quick = timed_sweep(Path("sweeps/quickstart.yaml"), Path(tmp))
        print(f"sweeps/quickstart.yaml end to end: {quick:.1f} s (target ≤ 300 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
