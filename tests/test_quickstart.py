"""The README's main job, run as a new user would: the quickstart sweep itself, with a console that is ibbench's own,
then `ibbench report` on what it wrote (end to end, not on a committed snapshot)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from run_files import raw_runs

from ibbench import results
from ibbench.config import load_sweep
from ibbench.sweep import plan

REPO = Path(__file__).resolve().parents[1]
IBBENCH = Path(sys.executable).parent / "ibbench"
# What Ray and Ray Tune print on their own when they are let loose on the console.
RAY_NOISE = ("Configuration for experiment", "View detailed results", "tensorboard", "Token authentication",
             "gcs_client", "raylet", "Started a local Ray instance", "Trial status", "ray.tune")  # fmt: skip


@pytest.mark.slow
def test_the_readme_quickstart_sweep_runs_with_only_ibbench_on_the_console_and_reports_every_number(tmp_path):
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

    # Reported as a user would, the report's numbers are those the runs wrote: a metric renamed in train.py or the
    # report leaves a "–" (NaN) in a measured column, or a mean that no longer matches, and fails here.
    report = tmp_path / "report"
    proc = subprocess.run([str(IBBENCH), "report", str(tmp_path / "quickstart"), "--out", str(report)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _check_the_report(report, raw_runs(tmp_path / "quickstart"))


def _check_the_report(out: Path, raw: list[dict]) -> None:
    tables = {name: pd.read_csv(out / f"{name}.csv") for name in ("accuracy", "robustness", "infoplane")}
    for name, table in tables.items():
        numbers = [c for c in table.columns if f"{c}_se" in table.columns]  # the measured columns
        assert numbers and not table[numbers].isna().any().any(), (name, table)
    # Each number is the mean over the two seeds of what the runs wrote; IB grouped by β'' and noise.
    groups: dict[tuple, list[dict]] = {}
    for run in raw:
        c = run["config"]
        key = (c["objective"], c["beta"], c["noise"]) if c["objective"] == "ib" else ("ce",)
        groups.setdefault(key, []).append(run)
    assert sorted(map(len, groups.values())) == [2] * 7
    accuracy, infoplane = tables["accuracy"], tables["infoplane"]
    for key, runs in groups.items():
        if key[0] == "ce":
            row = accuracy[(accuracy["objective"] == "ce") & (accuracy["decoder"] == "head")]
            expected = np.mean([r["summary"]["final"]["test_acc/head"] for r in runs])
            assert len(row) == 1 and row["test_acc"].iloc[0] == pytest.approx(expected, abs=1e-12)
            continue
        _, beta, noise = key

        def same(t: pd.DataFrame, beta=beta, noise=noise) -> pd.Series:
            return (t["objective"] == "ib") & np.isclose(t["beta"].astype(float), beta) & (t["noise"] == noise)

        row = accuracy[same(accuracy) & (accuracy["decoder"] == "gmm")]
        assert len(row) == 1 and row["n"].iloc[0] == 2, (key, accuracy)
        expected = np.mean([r["summary"]["final"]["test_acc/gmm"] for r in runs])
        assert row["test_acc"].iloc[0] == pytest.approx(expected, abs=1e-12)
        (row,) = [r for _, r in infoplane[same(infoplane)].iterrows()]
        assert row["final_i_xz"] == pytest.approx(np.mean([r["metrics"][-1]["infoplane/i_xz"] for r in runs]))
        # The best epoch is the validation's choice (lowest val H[Y|Z]), its values the test set's at that epoch.
        picks = [min(r["metrics"], key=lambda m: m["val_h_y_given_z"]) for r in runs]
        assert row["best_epoch"] == pytest.approx(np.mean([m["epoch"] for m in picks]))
        assert row["best_h_y_given_z"] == pytest.approx(np.mean([m["infoplane/h_y_given_z"] for m in picks]))


def test_ci_runs_the_readme_test_command_and_its_xdist_is_declared():
    """.ci/run ends with the README's test command, whose plugins (pytest-xdist) the dev extra installs."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("Run the tests", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci[-1] == block, (ci[-1], block)
    if " -n " in block:
        pyproject = (REPO / "pyproject.toml").read_text()
        assert re.search(r'^dev = \[.*"pytest-xdist>=', pyproject, re.M)
