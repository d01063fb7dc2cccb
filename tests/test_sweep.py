"""Sweeps through real Ray Tune and real Optuna: completion, skip on re-run, SIGKILL of the driver, failures."""

import hashlib
import json
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
        # device: auto, and Ray gave the trial no GPU: it ran as device cpu (never on a GPU it did not reserve)
        assert p.cfg.device == "auto" and results.read_summary(p.run_dir)["config"]["device"] == "cpu"
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
    assert "3 done" in status and "val_acc/gmm" in status and "time" in status
    ce_row = next(line for line in status.splitlines() if " ce " in line)
    assert "–" in ce_row  # β'' and k mean nothing for the baseline
    accuracy = results.read_summary(next(p.run_dir for p in plan(spec, tmp_path / "out")))["final"]["val_acc/gmm"]
    assert f"{accuracy:.4g}" in status


def test_a_failing_run_is_isolated_and_the_exit_code_says_so(tmp_path, ray_runtime, capsys):
    spec_path = write_spec(
        tmp_path / "bad.yaml",
        name="onebad",
        base={**TINY_BASE, "noise": False},
        grid={"lr": [0.001, 1.0e20], "seed": [0, 1]},  # 1e20: the latents overflow float32
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
    assert "before starting" not in captured.out and "before its run started" not in captured.err  # they did start
    # A run that failed on its own ends its trial without an error: Tune (which retries errors, for dead nodes)
    # never restarted it, and wrote no error file.
    assert not list((tmp_path / "out" / "onebad" / ".ray").rglob("error.txt"))

    # status: ranked by the sweep's metric, --top cuts the list, failed runs listed with their reasons.
    assert main(["status", str(tmp_path / "out" / "onebad"), "--top", "1"]) == 0
    status = capsys.readouterr().out
    root = tmp_path / "out" / "onebad"
    accuracy = {rid: results.read_summary(root / rid)["final"]["val_acc/gmm"] for rid, s in states.items()
                if s == "done"}  # fmt: skip
    best = max(accuracy, key=accuracy.get)
    assert "best 1 by val_acc/gmm (max)" in status and best in status
    assert (set(accuracy) - {best}).isdisjoint(status.split("best 1 by", 1)[1].split("failed", 1)[0])
    failed = [rid for rid, s in states.items() if s == "failed"]
    assert all(f"failed {rid}: non-finite" in status for rid in failed)

    # --retry-failed trains the failed runs again (they fail again, the same way) and leaves the done ones alone.
    done_files = {rid: tree_fingerprint(root / rid) for rid in accuracy}
    started = {rid: results.read_summary(root / rid)["started"] for rid in failed}
    time.sleep(1.1)  # "started" has a resolution of one second
    assert main(["sweep", str(spec_path), "--out", str(tmp_path / "out"), "--retry-failed"]) == 1
    assert all(results.read_summary(root / rid)["started"] != started[rid] for rid in failed)
    assert all(results.run_state(root / rid) == "failed" for rid in failed)
    assert {rid: tree_fingerprint(root / rid) for rid in accuracy} == done_files
    assert "trained 2, skipped 2" in capsys.readouterr().out


def optuna_search(space: dict, num_samples: int, **extra) -> dict:
    """A search section: Optuna maximising the GMM decoder's validation accuracy over `space`."""
    return {"algorithm": "optuna", "num_samples": num_samples, "metric": "val_acc/gmm", "mode": "max",
            "space": space, **extra}  # fmt: skip


def test_optuna_study_persists_and_tops_up(tmp_path, ray_runtime, capsys):
    search = optuna_search({"beta": {"uniform": [0.0, 0.9]}, "k": {"int": [1, 4]}}, num_samples=2)
    spec_path = write_spec(tmp_path / "opt.yaml", name="opt", base={**TINY_BASE, "epochs": 1}, search=search)
    out = tmp_path / "out"
    run_sweep(load_sweep(spec_path), out)
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'opt' / OPTUNA_DB}")
    study = optuna.load_study(study_name="opt", storage=storage)
    assert len(study.trials) == 2
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert len([d for d in (out / "opt").iterdir() if (d / "DONE").exists()]) == 2

    search["num_samples"] = 3
    write_spec(spec_path, name="opt", base={**TINY_BASE, "epochs": 1}, search=search)
    outcome = run_sweep(load_sweep(spec_path), out)
    study = optuna.load_study(study_name="opt", storage=storage)
    assert len(study.trials) == 3 and len(outcome.trained) == 1
    assert 0.0 <= study.best_value <= 1.0
    assert main(["status", str(out / "opt")]) == 0
    text = capsys.readouterr().out
    assert f"optuna-dashboard sqlite:///{(out / 'opt' / OPTUNA_DB).resolve()}" in text.replace("\n", "")


def test_a_search_trial_whose_run_diverges_is_a_failed_optuna_trial_and_is_not_restarted(tmp_path, ray_runtime, capsys):
    search = optuna_search({"lr": {"choice": [0.001, 1.0e20]}}, num_samples=2, seed=0)  # seed 0 draws both points
    base = {**TINY_BASE, "epochs": 1, "noise": False, "fgsm_eps": [0.0]}
    spec_path = write_spec(tmp_path / "div.yaml", name="div", base=base, search=search)
    out = tmp_path / "out"
    assert main(["sweep", str(spec_path), "--out", str(out)]) == 1
    assert "1 failed" in capsys.readouterr().out
    study = optuna.load_study(study_name="div", storage=f"sqlite:///{out / 'div' / OPTUNA_DB}")
    states = {t.params["lr"]: t.state for t in study.trials}
    runs = {json.loads((d / results.CONFIG).read_text())["lr"]: results.run_state(d)
            for d in results.iter_run_dirs(out / "div")}  # fmt: skip
    for lr, state in runs.items():  # Optuna's record of each trial agrees with its run's
        assert states[lr] == (optuna.trial.TrialState.FAIL if state == "failed" else optuna.trial.TrialState.COMPLETE)
    assert sorted(runs.values()) == ["done", "failed"]
    assert not list((out / "div" / ".ray").rglob("error.txt"))
    assert all(not (t.state == optuna.trial.TrialState.COMPLETE and t.value != t.value) for t in study.trials)


def start_sweep(spec_path: Path, out: Path) -> subprocess.Popen:
    """`ibbench sweep` as a user runs it, in its own process group (its Ray processes with it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "ibbench"), "sweep", str(spec_path), "--out", str(out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


def kill_group_when(driver: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL the driver's whole process group once ready() holds (an explicit signal written by the runs)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if driver.poll() is not None:
            pytest.fail(f"the sweep ended (exit {driver.returncode}) before it could be killed")
        if time.monotonic() > deadline:
            os.killpg(driver.pid, signal.SIGKILL)
            pytest.fail("the runs did not reach the point to kill at in time")
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()


def test_sigkill_of_the_driver_loses_nothing(tmp_path, ray_runtime):
    spec_path = write_spec(
        tmp_path / "kill.yaml",
        name="kill",
        base={**TINY_BASE, "epochs": 6},
        grid={"beta": [0.05, 0.5, 0.9]},
        resources={"cpu": 1},
        max_concurrent=1,  # one run at a time: when the first is DONE, two are not
    )
    out = tmp_path / "out"
    spec = load_sweep(spec_path)
    driver = start_sweep(spec_path, out)
    kill_group_when(driver, lambda: any((p.run_dir / results.DONE).exists() for p in plan(spec, out)))
    done_before = {p.run_id: tree_fingerprint(p.run_dir) for p in plan(spec, out) if p.state == "done"}
    assert done_before and len(done_before) < 3

    outcome = run_sweep(spec, out)
    assert outcome.ok
    after = plan(spec, out)
    assert all(p.state == "done" for p in after)
    for rid, fingerprint in done_before.items():
        assert tree_fingerprint(out / "kill" / rid) == fingerprint
    assert set(outcome.skipped) == set(done_before)
    for p in after:  # every run trained each epoch once
        assert [row["epoch"] for row in results.read_metrics(p.run_dir)] == list(range(1, 7))


def test_a_search_whose_driver_was_killed_resumes_its_running_trial(tmp_path, ray_runtime):
    search = {"algorithm": "optuna", "num_samples": 2, "metric": "val_acc/gmm", "mode": "max",
              "space": {"beta": {"uniform": [0.0, 0.9]}}}  # fmt: skip
    spec_path = write_spec(tmp_path / "sk.yaml", name="sk", base={**TINY_BASE, "epochs": 8}, search=search,
                           resources={"cpu": 1}, max_concurrent=1)  # fmt: skip
    out = tmp_path / "out"
    driver = start_sweep(spec_path, out)
    # Killed once the first trial's run has checkpointed an epoch: its Optuna trial is RUNNING then.
    kill_group_when(driver, lambda: any((out / "sk").glob("*/checkpoint.pt")))
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'sk' / OPTUNA_DB}")
    (running,) = optuna.load_study(study_name="sk", storage=storage).get_trials(
        states=(optuna.trial.TrialState.RUNNING,)
    )
    (run_dir,) = [d for d in (out / "sk").iterdir() if (d / "checkpoint.pt").exists()]
    assert results.run_state(run_dir) == "incomplete"

    outcome = run_sweep(load_sweep(spec_path), out)
    assert outcome.ok and len(outcome.states) == 2 and set(outcome.states.values()) == {"done"}
    study = optuna.load_study(study_name="sk", storage=storage)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 2  # the budget is met: the interrupted trial did not use it up
    assert any(t.params == running.params for t in complete)  # re-asked with the same parameters ...
    assert [row["epoch"] for row in results.read_metrics(run_dir)] == list(range(1, 9))  # ... resumed, not redone


def test_asha_stops_are_final_and_not_retrained(tmp_path, ray_runtime):
    # Trials run one at a time and much of the space cannot learn (lr near 1e-7): once a better trial has reported
    # at a rung, ASHA must stop any that does worse there. The sampler is seeded, so the test is deterministic.
    search = {
        "algorithm": "optuna",
        "num_samples": 4,
        "metric": "val_acc/gmm",
        "mode": "max",
        "scheduler": "asha",
        "grace_period": 1,
        "seed": 0,
        "space": {"lr": {"loguniform": [1.0e-7, 0.003]}},
    }
    base = {**TINY_BASE, "epochs": 4, "noise": False}
    spec_path = write_spec(tmp_path / "asha.yaml", name="asha", base=base, search=search, max_concurrent=1)
    out = tmp_path / "out"
    outcome = run_sweep(load_sweep(spec_path), out)
    assert outcome.ok, outcome.states
    assert set(outcome.states.values()) <= {"done", "stopped"} and len(outcome.states) == 4
    stopped = [rid for rid, state in outcome.states.items() if state == "stopped"]
    assert stopped, "ASHA stopped nothing"
    for rid, state in outcome.states.items():
        epochs = [row["epoch"] for row in results.read_metrics(out / "asha" / rid)]
        if state == "stopped":
            assert "ASHA" in results.read_summary(out / "asha" / rid)["reason"]
            assert epochs[-1] < 4  # really stopped early, before its last epoch
        else:
            assert epochs == [1, 2, 3, 4]
    again = run_sweep(load_sweep(spec_path), out)
    assert again.trained == [] and again.states == outcome.states
