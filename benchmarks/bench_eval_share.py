"""The share of a quickstart run spent evaluating (decoders + entropies + information plane), beside training and
attacking, measured in CPU time through train.run itself.

    python benchmarks/bench_eval_share.py [--repeats 3]

train.run is timed whole; its evaluation (train._evaluate) and robustness phase (train._robustness) are timed by
wrapping them, so the script runs on any version of the code with those two functions (PYTHONPATH=<checkout>
compares two checkouts in the same session). CPU time (time.process_time), one torch thread: robust to a shared
machine's load, unlike wall time. The run: sweeps/quickstart.yaml's base with β'' = 0.05, noise on, seed 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from ibbench import train
from ibbench.config import RunConfig

QUICKSTART = Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml"


def timed_run(cfg: RunConfig) -> dict[str, float]:
    """CPU seconds of one train.run and of its evaluation and robustness phases."""
    spent = {"evaluate": 0.0, "robustness": 0.0}

    def wrap(name: str):
        inner = getattr(train, f"_{name}")

        def timed(*args, **kwargs):
            t0 = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[name] += time.process_time() - t0

        return inner, timed

    originals = {}
    for name in spent:
        originals[name], wrapper = wrap(name)
        setattr(train, f"_{name}", wrapper)
    try:
        with tempfile.TemporaryDirectory() as folder:
            t0 = time.process_time()
            train.run(cfg, Path(folder) / "run")
            total = time.process_time() - t0
    finally:
        for name, inner in originals.items():
            setattr(train, f"_{name}", inner)
    return {"total": total, **spent, "train": total - spent["evaluate"] - spent["robustness"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = yaml.safe_load(QUICKSTART.read_text())["base"]
    cfg = RunConfig.from_dict({**base, "beta": 0.05, "noise": True, "seed": 0, "device": "cpu"})
    runs = [timed_run(cfg) for _ in range(args.repeats)]
    med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    import ibbench

    print(f"ibbench from {Path(ibbench.__file__).parent}; quickstart IB run, {cfg.epochs} epochs, eval_every "
          f"{cfg.eval_every}, probe_width {cfg.probe_width}; CPU seconds, median of {args.repeats}")  # fmt: skip
    for key in ("train", "evaluate", "robustness", "total"):
        print(f"  {key:10s} {med[key]:7.2f} s  {100 * med[key] / med['total']:5.1f} %")
    print(f"share evaluating: {100 * med['evaluate'] / med['total']:.1f} % of the run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
