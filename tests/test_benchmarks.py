"""Smoke tests: the training-step and GPU-epoch benchmarks run at tiny sizes on CPU and print their ratio lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def run_script(name: str, *args: str, timeout: float = 120) -> str:
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
def test_bench_train_step_quick_prints_ratios():
    out = run_script("bench_train_step.py", "--quick", "--device", "cpu")
    lines = out.splitlines()
    for case in ("resnet18", "cnn"):
        assert any(line.startswith("ratio ib/ce") and case in line and "target ≤ 1.05" in line for line in lines), out
    assert sum(line.startswith("ratio eval/epoch") and "eval_every=5" in line for line in lines) == 2, out
    assert "images/s" in out


@pytest.mark.slow
def test_bench_gpu_epoch_tiny_on_cpu_prints_ratio(tmp_path):
    out = run_script(
        "bench_gpu_epoch.py",
        *("--n", "200", "--batch-size", "100", "--device", "cpu", "--warmup", "1", "--workers", "2"),
        *("--data-dir", str(tmp_path)),  # an empty folder: no CIFAR-10 there, so synthetic data
    )
    assert "data: synthetic" in out
    ratio = [line for line in out.splitlines() if line.startswith("ratio plain/fast epoch:")]
    assert len(ratio) == 1 and "not meaningful on cpu" in ratio[0], out
    assert out.count("images/s") == 2


@pytest.mark.slow
def test_bench_attacks_quick_prints_shares():
    out = run_script("bench_attacks.py", "--quick", timeout=300)
    lines = [line for line in out.splitlines() if line.startswith("share attacking")]
    assert sum("quickstart" in line for line in lines) == 2, out
    assert sum("resnet18" in line for line in lines) == 4, out  # ib and ce, measured and bound
    assert all("target ≤ 30 %" in line for line in lines)
