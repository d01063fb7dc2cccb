"""The benchmark scripts run at tiny sizes on CPU, and what they print is consistent with itself: a ratio is the
quotient of the times it names, a rate is images over seconds, a share is a fraction of the whole."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


def run_script(name: str, *args: str, timeout: float = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_bench_train_step_quick_prints_consistent_ratios():
    out = run_script("bench_train_step.py", "--quick", "--device", "cpu")
    for case in ("resnet18", "cnn"):
        block = out.split(f"\n[{case},", 1)[1].split("\n\n", 1)[0]  # this case's paragraph
        ms = {m.group(1): float(m.group(2)) for m in re.finditer(rf"^\s+(\w+):\s+{NUMBER} ms/step", block, re.M)}
        assert {"ce", "ib", "vib", "nlib"} <= set(ms), block
        for objective in ("ib", "vib", "nlib"):
            (ratio,) = re.findall(rf"^ratio {objective}/ce \[{case},.*?: {NUMBER} \(", block, re.M)
            # --quick times one chunk per objective, so the paired ratio is that chunk's quotient.
            assert float(ratio) == pytest.approx(ms[objective] / ms["ce"], rel=0.02), (objective, ratio, ms)
        for name, millis in ms.items():
            (rate,) = re.findall(rf"^\s+{name}:\s+{NUMBER} ms/step\s+{NUMBER} images/s", block, re.M)
            assert float(rate[1]) == pytest.approx(20 / (millis / 1e3), rel=0.01)  # --quick batch 20
    shares = [float(s) for s in re.findall(rf"eval_every=\d+: {NUMBER} %", out)]
    assert len(shares) == 4 and all(0 < s < 100 for s in shares)
    assert out.count("ratio eval/epoch") == 2


@pytest.mark.slow
def test_bench_gpu_epoch_tiny_on_cpu_prints_a_consistent_ratio(tmp_path):
    out = run_script(
        "bench_gpu_epoch.py",
        *("--n", "40", "--batch-size", "20", "--device", "cpu", "--warmup", "1", "--workers", "2", "--epochs", "1"),
        *("--data-dir", str(tmp_path)),  # an empty folder: no CIFAR-10 there, so synthetic data
    )
    assert "data: synthetic" in out and "balanced batches" in out
    seconds = {m.group(1): float(m.group(2)) for m in re.finditer(rf"^(plain|fast) *: *{NUMBER} s/epoch", out, re.M)}
    rates = {m.group(1): float(m.group(2)) for m in re.finditer(rf"^(plain|fast) *:.*?{NUMBER} images/s", out, re.M)}
    assert set(seconds) == set(rates) == {"plain", "fast"}
    for path in seconds:
        assert rates[path] == pytest.approx(40 / seconds[path], rel=0.01)  # 2 steps of 20 images
    (ratio,) = re.findall(rf"^ratio plain/fast epoch: {NUMBER}x", out, re.M)
    assert float(ratio) == pytest.approx(seconds["plain"] / seconds["fast"], abs=0.01)
    assert "not meaningful on cpu" in out and math.isfinite(float(ratio))


@pytest.mark.slow
def test_bench_attacks_quick_prints_shares():
    out = run_script("bench_attacks.py", "--quick", timeout=300)
    lines = [line for line in out.splitlines() if line.startswith("share attacking")]
    assert sum("quickstart" in line for line in lines) == 2, out
    assert sum("resnet18" in line for line in lines) == 4, out  # ib and ce, measured and bound
    assert all("target ≤ 30 %" in line for line in lines)


@pytest.mark.slow
def test_bench_run_quick_prints_phase_shares_that_add_up():
    out = run_script("bench_run.py", "--quick", timeout=300)
    row = re.compile(rf"^\s+(\w+)\s+(\d+)\s+{NUMBER}\s+{NUMBER}%\s+{NUMBER}\s+{NUMBER}%$", re.M)
    for case in ("digits", "resnet18"):
        block = out.split(f"\n[{case}, cpu]", 1)[1].split("\n\n", 1)[0]  # this case's paragraph
        epochs, every = map(int, re.search(r"(\d+) epochs, eval every (\d+)", block).groups())
        rows = {m.group(1): (int(m.group(2)), *map(float, m.groups()[2:])) for m in row.finditer(block)}
        (total_wall, total_cpu) = map(float, re.search(rf"^\s+total\s+{NUMBER}\s+100\.0%\s+{NUMBER}\s+100\.0%$",
                                                        block, re.M).groups())  # fmt: skip
        phases = ["train", "evaluate", "attack", "checkpoint", "other"]
        assert set(phases) | {"encode", "decoders", "infoplane"} == set(rows), block
        for column, total in ((1, total_wall), (3, total_cpu)):  # wall, then CPU: seconds, then share
            assert sum(rows[p][column + 1] for p in phases) == pytest.approx(100, abs=0.3), block
            assert sum(rows[p][column] for p in phases) == pytest.approx(total, abs=0.003), block
            for name, values in rows.items():
                assert 0 <= values[column + 1] <= 100
                # seconds are printed to 1 ms: on a total of a fraction of a second that moves a share visibly
                assert values[column + 1] == pytest.approx(100 * values[column] / total, abs=0.06 + 0.1 / total), name
        parts = sum(rows[p][1] for p in ("encode", "decoders", "infoplane"))
        assert 0 < parts <= rows["evaluate"][1] + 0.002  # the breakdown lies inside the evaluation
        # One call per epoch (training, and checkpointing at interval 0), per eval epoch, one attack phase.
        evals = len([e for e in range(1, epochs + 1) if e % every == 0 or e == epochs])
        assert [rows[p][0] for p in ("train", "evaluate", "attack", "checkpoint")] == [epochs, evals, 1, epochs]
        recorded = dict(re.findall(rf"(\w+) {NUMBER}", block.split("phase_time (wall s): ", 1)[1].split("\n")[0]))
        for phase in ("train", "evaluate", "attack", "checkpoint"):  # the library's record of the same calls
            assert float(recorded[phase]) == pytest.approx(rows[phase][1], abs=0.01), (phase, recorded)
        (shares,) = re.findall(rf"^share \[{case}, cpu\]: (.*)$", out, re.M)
        assert dict(re.findall(rf"(\w+) {NUMBER} %", shares)) == {p: f"{rows[p][2]:.1f}" for p in phases}
