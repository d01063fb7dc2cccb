"""Sweeps through real Ray Tune and real Optuna: completion, skip on re-run, SIGKILL of the driver, failures."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from tiny import TINY_RUN

from ibbench import results
from ibbench.cli import main
from ibbench.config import load_sweep
from ibbench.sweep import OPTUNA_DB, expand, plan, run_sweep

pytestmark = pytest.mark.slow

TINY_BASE = TINY_RUN


def write_spec(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def tree_fingerprint(run_dir: Path) -> dict[str, tuple[int, str]]:
    return {
        p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(run_dir.iterdir())
        if p.is_file()
    }


def test_grid_sweep_completes_and_a_rerun_trains_nothing(tmp_path, ray_runtime, capsys):
    spec_path = write_spec(
        tmp_path / "four.yaml",
        name="four",
        base=TINY_BASE,
        grid={"beta": [0.05, 0.5], "decoder": ["gmm", "logreg"]},
        baselines=[{"objective": "ce", "noise": False}],
        resources={"cpu": 1},
    )
    spec = load_sweep(spec_path)
    assert len(expand(spec)) == 3  # 2 β'' × 1 seed, decoders folded, + the baseline
    outcome = run_sweep(spec, tmp_path / "out")
    assert outcome.ok and len(outcome.trained) == 3
    for p in plan(spec, tmp_path / "out"):
        assert p.state == "done"
        assert {"acc/gmm", "acc/logreg"} <= set(results.read_metrics(p.run_dir)[-1])
    assert (tmp_path / "out" / "four" / "sweep.yaml").exists()
    stamps = {p.run_id: tree_fingerprint(p.run_dir) for p in plan(spec, tmp_path / "out")}

    assert main(["sweep", str(spec_path), "--out", str(tmp_path / "out")]) == 0
    assert "nothing to train" in capsys.readouterr().out
    again = run_sweep(spec, tmp_path / "out")
    assert again.trained == [] and len(again.skipped) == 3
    assert {p.run_id: tree_fingerprint(p.run_dir) for p in plan(spec, tmp_path / "out")} == stamps

    frame = results.load_runs(tmp_path / "out")
    assert len(frame) == 3 and set(frame["status"]) == {"done"}
    assert main(["status", str(tmp_path / "out" / "four")]) == 0
    status = capsys.readouterr().out
    assert "3 done" in status and "test_acc/gmm" in status and "time" in status
    ce_row = next(line for line in status.splitlines() if " ce " in line)
    assert "–" in ce_row  # β'' and k mean nothing for the baseline
    accuracy = results.read_summary(next(p.run_dir for p in plan(spec, tmp_path / "out")))["final"]["test_acc/gmm"]
    assert f"{accuracy:.4g}" in status


def test_a_failing_run_is_isolated_and_the_exit_code_says_so(tmp_path, ray_runtime, capsys):
    spec_path = write_spec(
        tmp_path / "bad.yaml",
        name="onebad",
        base={**TINY_BASE, "noise": False},
        grid={"lr": [0.001, 1.0e8], "seed": [0, 1]},
    )
    code = main(["sweep", str(spec_path), "--out", str(tmp_path / "out")])
    assert code == 1
    captured = capsys.readouterr()
    states = {p.run_id: p.state for p in plan(load_sweep(spec_path), tmp_path / "out")}
    assert sorted(states.values()) == ["done", "done", "failed", "failed"]
    for rid, state in states.items():
        if state == "failed":
            summary = results.read_summary(tmp_path / "out" / "onebad" / rid)
            assert "non-finite" in summary["reason"]
            assert rid in captured.err
    assert "2 done" in captured.out and "2 failed" in captured.out


def test_optuna_study_persists_and_tops_up(tmp_path, ray_runtime, capsys):
    search = {
        "algorithm": "optuna",
        "num_samples": 4,
        "metric": "test_acc/gmm",
        "mode": "max",
        "space": {"beta": {"uniform": [0.0, 0.9]}, "k": {"int": [1, 4]}},
    }
    spec_path = write_spec(tmp_path / "opt.yaml", name="opt", base={**TINY_BASE, "epochs": 1}, search=search)
    out = tmp_path / "out"
    run_sweep(load_sweep(spec_path), out)
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'opt' / OPTUNA_DB}")
    study = optuna.load_study(study_name="opt", storage=storage)
    assert len(study.trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert len([d for d in (out / "opt").iterdir() if (d / "DONE").exists()]) == 4

    search["num_samples"] = 6
    write_spec(spec_path, name="opt", base={**TINY_BASE, "epochs": 1}, search=search)
    outcome = run_sweep(load_sweep(spec_path), out)
    study = optuna.load_study(study_name="opt", storage=storage)
    assert len(study.trials) == 6 and len(outcome.trained) == 2
    assert 0.0 <= study.best_value <= 1.0
    assert main(["status", str(out / "opt")]) == 0
    text = capsys.readouterr().out
    assert f"optuna-dashboard sqlite:///{(out / 'opt' / OPTUNA_DB).resolve()}" in text.replace("\n", "")


def test_sigkill_of_the_driver_loses_nothing(tmp_path, ray_runtime):
    spec_path = write_spec(
        tmp_path / "kill.yaml",
        name="kill",
        base={**TINY_BASE, "epochs": 10},
        grid={"beta": [0.05, 0.3, 0.6, 0.9]},
        resources={"cpu": 1},
    )
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(
        [str(Path(sys.executable).parent / "ibbench"), "sweep", str(spec_path), "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    spec = load_sweep(spec_path)
    deadline = time.time() + 240
    while time.time() < deadline:
        states = [p.state for p in plan(spec, out)]
        if "done" in states and any(state != "done" for state in states):  # mid-sweep: some done, some not
            break
        if driver.poll() is not None:
            pytest.fail("the sweep finished before it could be killed")
        time.sleep(0.2)
    else:
        pytest.fail(f"no run finished in time: {states}")
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done_before = {p.run_id: tree_fingerprint(p.run_dir) for p in plan(spec, out) if p.state == "done"}
    assert done_before

    outcome = run_sweep(spec, out)
    assert outcome.ok
    after = plan(spec, out)
    assert all(p.state == "done" for p in after)
    for rid, fingerprint in done_before.items():
        assert tree_fingerprint(out / "kill" / rid) == fingerprint
    assert set(outcome.skipped) == set(done_before)


def test_asha_stops_are_final_and_not_retrained(tmp_path, ray_runtime):
    search = {
        "algorithm": "optuna",
        "num_samples": 4,
        "metric": "test_acc/gmm",
        "mode": "max",
        "scheduler": "asha",
        "grace_period": 1,
        "space": {"beta": {"uniform": [0.0, 0.95]}},
    }
    spec_path = write_spec(tmp_path / "asha.yaml", name="asha", base={**TINY_BASE, "epochs": 4}, search=search)
    out = tmp_path / "out"
    outcome = run_sweep(load_sweep(spec_path), out)
    assert outcome.ok, outcome.states
    assert set(outcome.states.values()) <= {"done", "stopped"} and len(outcome.states) == 4
    for rid, state in outcome.states.items():
        if state == "stopped":
            assert "ASHA" in results.read_summary(out / "asha" / rid)["reason"]
    again = run_sweep(load_sweep(spec_path), out)
    assert again.trained == [] and again.states == outcome.states
