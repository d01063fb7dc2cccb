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
        *("--n", "200", "--batch-size", "100", "--device", "cpu", "--warmup", "1", "--workers", "2", "--epochs", "1"),
        *("--data-dir", str(tmp_path)),  # an empty folder: no CIFAR-10 there, so synthetic data
    )
    assert "data: synthetic" in out and "balanced batches" in out
    seconds = {m.group(1): float(m.group(2)) for m in re.finditer(rf"^(plain|fast) *: *{NUMBER} s/epoch", out, re.M)}
    rates = {m.group(1): float(m.group(2)) for m in re.finditer(rf"^(plain|fast) *:.*?{NUMBER} images/s", out, re.M)}
    assert set(seconds) == set(rates) == {"plain", "fast"}
    for path in seconds:
        assert rates[path] == pytest.approx(200 / seconds[path], rel=0.01)  # 2 steps of 100 images
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
