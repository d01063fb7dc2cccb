"""The dependency floors pyproject.toml declares are ones ibbench runs on (numpy's, installed and used)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny import TINY_RUN

REPO = Path(__file__).resolve().parents[1]


def declared_floor(package: str) -> str:
    # Python 3.10 (which pyproject admits) has no tomllib: the dependency lines are plain enough for a regex.
    (floor,) = re.findall(rf'^\s*"{package}>=([0-9][0-9.]*)', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    return floor


@pytest.mark.slow
def test_the_report_and_a_run_work_on_the_declared_numpy_floor(tmp_path):
    floor = declared_floor("numpy")
    target = tmp_path / "floor"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                           f"numpy=={floor}"], capture_output=True, text=True, timeout=600)  # fmt: skip
    if proc.returncode != 0:
        reason = f"pip could not install numpy=={floor}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    script = textwrap.dedent(
        f"""
        import numpy
        assert numpy.__version__ == {floor!r}, numpy.__version__
        from ibbench import report, train
        from ibbench.config import RunConfig
        report.write_report({str(REPO / "tests/fixtures/report_sweep")!r}, {str(tmp_path / "report")!r})
        cfg = RunConfig.from_dict({ {**TINY_RUN, "epochs": 1}!r})
        print(train.run(cfg, {str(tmp_path / "run")!r})["status"])
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(REPO)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("done")
    assert (tmp_path / "report" / "report.html").stat().st_size > 0
