"""`ibbench sweep --dry-run` of a 10⁴-run grid: what a sweep costs before anything starts (issue 14, item 8).

Prints the wall time and peak memory of the dry run for a 100-run and a 10⁴-run grid, the same for a process that
only imports what the command imports (the reference, measured in the same run), and the per-run cost of
expanding, validating and planning. Target: the 10⁴-run dry run in ≤ 3 s. Usage:
    python benchmarks/bench_dry_run.py [--runs 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

IBBENCH = str(Path(sys.executable).parent / "ibbench")
BASE = {"dataset": "digits", "encoder": "mlp", "latent_dim": 8, "k": 3, "epochs": 2, "batch_size": 100}
IMPORTS = "import ibbench.cli, ibbench.config, ibbench.sweep, ibbench.results, ibbench.data, ibbench.decoders, " \
          "ibbench.models, ibbench.objectives"  # fmt: skip


def grid_spec(folder: Path, runs: int) -> Path:
    """A grid of `runs` runs over four axes (seed × beta × lr × latent_dim), the shape of a real large sweep."""
    side = round(runs**0.25)
    if side**4 != runs:
        sys.exit(f"--runs must be a fourth power (10000 = 10**4), not {runs}")
    grid = {
        "seed": list(range(side)),
        "beta": [round(0.9 * i / side, 4) for i in range(side)],
        "lr": [round(1e-3 * (i + 1), 6) for i in range(side)],
        "latent_dim": [2 + i for i in range(side)],
    }
    path = folder / f"grid{runs}.yaml"
    path.write_text(yaml.safe_dump({"name": f"grid{runs}", "base": BASE, "grid": grid}))
    return path


def timed(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS MiB) of one child process (its own rusage, from wait4). CPU time is
    the figure to trust on a shared machine: other processes' load stretches wall time, not this one's CPU time."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.read().decode()[-2000:]}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        small, large = grid_spec(folder, 81), grid_spec(folder, args.runs)
        cases = {
            "imports only (reference)": [sys.executable, "-c", IMPORTS],
            "dry run, 81 runs": [IBBENCH, "sweep", str(small), "--dry-run", "--out", str(folder / "out")],
            f"dry run, {args.runs} runs": [IBBENCH, "sweep", str(large), "--dry-run", "--out", str(folder / "out")],
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        cpu: dict[str, list[float]] = {name: [] for name in cases}
        peaks: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):  # interleaved, so load on a shared machine hits every case alike
            for name, cmd in cases.items():
                elapsed, seconds, peak = timed(cmd)
                times[name].append(elapsed)
                cpu[name].append(seconds)
                peaks[name].append(peak)
    median = {name: statistics.median(values) for name, values in times.items()}
    cpu_median = {name: statistics.median(values) for name, values in cpu.items()}
    print(f"{'case':<28} {'wall s':>7} {'min':>6} {'CPU s':>6} {'peak MiB':>9}  (medians of {args.repeats})")
    for name in cases:
        print(f"{name:<28} {median[name]:7.2f} {min(times[name]):6.2f} {cpu_median[name]:6.2f} {max(peaks[name]):9.0f}")
    reference = cpu_median["imports only (reference)"]
    large_name = f"dry run, {args.runs} runs"
    per_run = (cpu_median[large_name] - cpu_median["dry run, 81 runs"]) / (args.runs - 81)
    print(f"CPU per run (expand + validate + plan): {per_run * 1e6:.0f} µs")
    print(f"CPU, {large_name} / imports only: {cpu_median[large_name] / reference:.2f}; "
          f"beyond the imports: {cpu_median[large_name] - reference:.2f} s")  # fmt: skip
    extra = max(peaks[large_name]) - max(peaks["imports only (reference)"])
    print(f"memory beyond the imports for {args.runs} runs: {extra:.0f} MiB")
    verdict = "met" if min(times[large_name]) <= 3.0 else "not met here (compare its CPU time with the reference's)"
    print(f"target ≤ 3 s wall for {args.runs} runs (best of {args.repeats}): {verdict}")
    return 0 if math.isfinite(per_run) else 1


if __name__ == "__main__":
    sys.exit(main())
