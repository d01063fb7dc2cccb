"""The SLURM launchers when SLURM itself misbehaves: its client commands missing or failing (shims on PATH stand in
for a broken installation: they fake the environment, not ibbench), a torn submissions ledger, a stale head file.
Fast, and independent of the local cluster."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import yaml
from tiny import TINY_RUN

from ibbench import results
from ibbench.cli import main
from ibbench.config import load_sweep
from ibbench.launch import slurm
from ibbench.sweep import SPEC_FILE, plan

COMMANDS = ("sbatch", "srun", "squeue", "scontrol", "sacct", "sinfo")


def shims(tmp_path: Path, **behaviour: str) -> Path:
    """A folder of SLURM client commands that log their call and then run `behaviour[name]` (default: exit 1)."""
    folder = tmp_path / "shims"
    folder.mkdir()
    for name in COMMANDS:
        body = behaviour.get(name, "exit 1")
        script = folder / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{tmp_path}/calls.log"\n{body}\n')
        script.chmod(0o755)
    return folder


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls.log"
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def sweep_with_history(tmp_path):
    """A one-run sweep whose run failed, and whose ledger names an earlier job (so squeue must be asked)."""
    spec_path = tmp_path / "f.yaml"
    spec_path.write_text(yaml.safe_dump({"name": "f", "base": TINY_RUN, "grid": {"beta": [0.1]}}))
    out = tmp_path / "out"
    (run,) = plan(load_sweep(spec_path), out)
    results.write_summary(run.run_dir, {"status": "failed", "reason": "injected failure", "run_id": run.run_id})
    ledger = out / "f" / slurm.SLURM_DIR / slurm.LEDGER
    ledger.parent.mkdir(parents=True)
    ledger.write_text(json.dumps({"job_id": "4242", "kind": "array", "runs": ["0123456789ab"], "time": 0}) + "\n")
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"partition": "debug", "time_min": 5}))
    argv = ["sweep", str(spec_path), "--launcher", "slurm-array", "--cluster", str(cluster), "--out", str(out)]
    return argv, run, ledger


def one_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("error: ") and "Traceback" not in text
    return lines[0]


def test_a_failing_squeue_refuses_the_submission(tmp_path, monkeypatch, capsys, sweep_with_history):
    """squeue failing would make every queued run look idle, and submit it twice: refuse, one line, exit 1."""
    argv, run, ledger = sweep_with_history
    failing = 'echo "squeue: error: slurm_load_jobs error: Unable to contact slurm controller" >&2; exit 1'
    monkeypatch.setenv("PATH", f"{shims(tmp_path, squeue=failing)}:{os.environ['PATH']}")
    ledger_before = ledger.read_text()
    assert main([*argv, "--retry-failed"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "`squeue" in line and "exit 1" in line and "Unable to contact slurm controller" in line
    assert "not submitting" in line
    assert [c.split()[0] for c in calls(tmp_path)] == ["squeue"]  # nothing submitted
    assert ledger.read_text() == ledger_before
    assert results.read_summary(run.run_dir)["reason"] == "injected failure"  # --retry-failed cleared nothing


@pytest.mark.parametrize("launcher", ["slurm", "slurm-array"])
def test_missing_slurm_commands_are_one_line(tmp_path, monkeypatch, capsys, sweep_with_history, launcher):
    argv, run, _ = sweep_with_history
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    argv[argv.index("--launcher") + 1] = launcher
    assert main(argv) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "sbatch, srun, squeue, scontrol, sacct not found on PATH" in line


def test_retry_failed_keeps_the_reasons_when_sbatch_refuses(tmp_path, monkeypatch, capsys, sweep_with_history):
    """--retry-failed clears a failure only in the job that retries it: a refused submission loses nothing."""
    argv, run, ledger = sweep_with_history
    refusal = ('echo "sbatch: error: Batch job submission failed: Invalid account or account/partition combination '
               'specified" >&2; exit 1')  # fmt: skip
    folder = shims(tmp_path, squeue="exit 0", scontrol="exit 0", sbatch=refusal)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    ledger_before = ledger.read_text()
    assert main([*argv, "--retry-failed"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {tmp_path / 'cluster.yaml'}: account: SLURM refused the job: ")
    assert any(c.startswith("sbatch ") for c in calls(tmp_path))  # it really was refused by sbatch
    assert results.read_summary(run.run_dir)["reason"] == "injected failure"
    assert ledger.read_text() == ledger_before
    assert not (run.run_dir.parent / SPEC_FILE).exists()  # nothing written for a sweep that was not submitted


def test_a_torn_ledger_line_is_skipped_and_the_next_entry_stays_whole(tmp_path, caplog):
    root = tmp_path / "sweep"
    ledger = root / slurm.SLURM_DIR / slurm.LEDGER
    ledger.parent.mkdir(parents=True)
    whole = json.dumps({"job_id": "1", "kind": "array", "runs": ["aaa"], "time": 0})
    ledger.write_text(f'{whole}\n{{"job_id": "2", "kind": "arr')  # a submitter killed mid-write: no newline
    slurm._record(root, [("3", "allocation", ["bbb", "ccc"])])
    entries = slurm._read_ledger(root)
    assert [(e["job_id"], e["runs"]) for e in entries] == [("1", ["aaa"]), ("3", ["bbb", "ccc"])]
    assert "skipping an unreadable line" in caplog.text


def test_workers_wait_for_their_own_attempts_head_file(tmp_path):
    """A requeued allocation's workers must not join the previous attempt's (dead) head."""
    stale = slurm.head_file(tmp_path, "77", 0)
    stale.write_text(json.dumps({"address": "127.0.0.2:1", "token": "old", "finished": False}))
    current = slurm.head_file(tmp_path, "77", 1)
    with pytest.raises(slurm.SlurmError, match="never wrote .*ray-77-1.json"):
        slurm._wait_for_head(current, timeout_s=1.5)
    threading.Timer(1.0, lambda: slurm._write_private_json(current, {"address": "127.0.0.2:2", "token": "new",
                                                                        "finished": False})).start()  # fmt: skip
    t0 = time.monotonic()
    assert slurm._wait_for_head(current, timeout_s=30)["token"] == "new"
    assert time.monotonic() - t0 >= 0.5
    assert current.stat().st_mode & 0o777 == 0o600  # it holds the Ray cluster's token
