"""The README's main job, run as a new user would: the quickstart sweep itself, with a console that is ibbench's own."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ibbench import results
from ibbench.config import load_sweep
from ibbench.sweep import plan

REPO = Path(__file__).resolve().parents[1]
IBBENCH = Path(sys.executable).parent / "ibbench"
# What Ray and Ray Tune print on their own when they are let loose on the console.
RAY_NOISE = ("Configuration for experiment", "View detailed results", "tensorboard", "Token authentication",
             "gcs_client", "raylet", "Started a local Ray instance", "Trial status", "ray.tune")  # fmt: skip


@pytest.mark.slow
def test_the_readme_quickstart_sweep_runs_with_only_ibbench_on_the_console(tmp_path):
    readme = (REPO / "README.md").read_text()
    (command,) = set(re.findall(r"ibbench sweep (sweeps/quickstart\.yaml)\b", readme.split("Run the tests")[0]))
    # A temp folder of its own (short: Ray's socket paths below it are limited to 107 bytes), to see what is left.
    scratch_tmp = Path(tempfile.mkdtemp(prefix="qs-", dir="/tmp"))
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch_tmp)}
    try:
        proc = subprocess.run([str(IBBENCH), "sweep", command, "--out", str(tmp_path)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        left = sorted(p.name for p in scratch_tmp.iterdir())
    finally:
        shutil.rmtree(scratch_tmp, ignore_errors=True)
    assert not [name for name in left if name.startswith(("ibbench-ray-", "ray", "session_"))], left
    assert proc.returncode == 0, proc.stdout + proc.stderr
    console = proc.stdout + proc.stderr
    for noise in RAY_NOISE:
        assert noise.lower() not in console.lower(), f"{noise!r} reached the console:\n{console}"
    assert proc.stderr.strip() == ""
    spec = load_sweep(REPO / command)
    runs = plan(spec, tmp_path)
    assert len(runs) == 14 and {p.state for p in runs} == {"done"}
    # The outcome table: the sweep's metric and time per run, "–" where a field means nothing for the objective.
    assert "val_acc/gmm" in proc.stdout and "time" in proc.stdout and "14 done" in proc.stdout
    outcome = proc.stdout.split("sweep quickstart: outcome", 1)[1]
    for p in runs:
        line = next(line for line in outcome.splitlines() if p.run_id in line)
        accuracy = results.read_summary(p.run_dir)["final"]["val_acc/gmm"]
        assert f"{accuracy:.4g}" in line
        if p.cfg.objective == "ce":
            assert "–" in line and "0.1" not in line.split(p.run_id, 1)[1].split("done")[0]
    # Ray's own output is kept, where the outcome says.
    scratch = tmp_path / "quickstart" / ".ray"
    assert f"{scratch}/" in proc.stdout
    assert "Configuration for experiment" in (scratch / "driver.log").read_text()
    assert list(scratch.glob("logs-*/raylet.out"))


def test_ci_runs_the_readme_test_command_and_its_xdist_is_declared():
    """.ci/run ends with the README's test command, whose plugins (pytest-xdist) the dev extra installs."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("Run the tests", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci[-1] == block, (ci[-1], block)
    if " -n " in block:
        pyproject = (REPO / "pyproject.toml").read_text()
        assert re.search(r'^dev = \[.*"pytest-xdist>=', pyproject, re.M)
