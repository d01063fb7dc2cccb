"""SLURM launchers against the real one-node SLURM from slurm/local/ (started by .ci/run): no mocks."""

import contextlib
import hashlib
import json
import subprocess
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from tiny import TINY_RUN

from ibbench import results
from ibbench.cli import main
from ibbench.config import ConfigError, load_sweep
from ibbench.launch.slurm import load_cluster
from ibbench.sweep import OPTUNA_DB, plan

pytestmark = [pytest.mark.slurm, pytest.mark.slow]  # conftest: one xdist worker runs them all, first

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def local_slurm(slurm_cluster):
    """Every test here submits to the local SLURM (started by the session fixture where it can be)."""


TINY = TINY_RUN


@pytest.fixture
def cluster_file(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"partition": "debug", "time_min": 10, "cpus_per_node": 2, "array_parallelism": 2}))
    return path


def write_spec(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def fingerprint(run_dir: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.iterdir()) if p.is_file()}


def test_allocation_launcher_runs_a_search_sweep_through_ray_and_optuna_in_a_job(tmp_path, cluster_file, capsys):
    """The allocation launcher drives an Optuna search inside the job: Ray Tune runs the trials there, the study
    (next to the runs) records each as complete, and a resubmission of the finished search submits nothing."""
    search = {"algorithm": "optuna", "num_samples": 2, "metric": "val_acc/gmm", "mode": "max",
              "space": {"beta": {"uniform": [0.05, 0.9]}}}  # fmt: skip
    spec = write_spec(tmp_path / "alloc.yaml", name="alloc", base=TINY, search=search)
    out = tmp_path / "out"
    argv = ["sweep", str(spec), "--launcher", "slurm", "--cluster", str(cluster_file), "--out", str(out), "--wait"]
    assert main(argv) == 0
    assert "as 1 SLURM job" in capsys.readouterr().out
    logs = list((out / "alloc" / ".slurm").glob("*/*_0_log.out"))
    assert logs and "Ray runtime started" in logs[0].read_text()
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'alloc' / OPTUNA_DB}")
    trials = optuna.load_study(study_name="alloc", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    run_dirs = [d for d in (out / "alloc").iterdir() if (d / results.CONFIG).exists()]
    assert len(run_dirs) == 2 and all(results.run_state(d) == "done" for d in run_dirs)
    betas = sorted(results.read_summary(d)["config"]["beta"] for d in run_dirs)
    assert betas == sorted(t.params["beta"] for t in trials) and betas[0] != betas[1]
    # The trials went through Ray Tune inside the job: its experiment state lists both.
    (state,) = (out / "alloc" / ".ray").glob("tune-*/experiment_state*.json")
    assert sum(d.name in state.read_text() for d in run_dirs) == 2
    assert main(argv) == 0  # the search has its trials: no second job
    assert "nothing to submit" in capsys.readouterr().out
    assert len(optuna.load_study(study_name="alloc", storage=storage).trials) == 2


def submitted_jobs(sweep_folder: Path) -> dict[str, str]:
    """run_id -> the SLURM job id ibbench submitted it as (from the sweep's ledger): the only jobs a test may touch."""
    ledger = sweep_folder / ".slurm" / "submissions.jsonl"
    if not ledger.exists():
        return {}
    jobs = {}
    for line in ledger.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            jobs.update({rid: entry["job_id"] for rid in entry["runs"]})
    return jobs


def wait_until(ready, what: str, waiter: threading.Thread, timeout: float = 300) -> None:
    """Poll for an explicit signal that the runs write; fail at once if the submitting thread gave up."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not waiter.is_alive():
            pytest.fail(f"the sweep ended before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_a_cancelled_job_is_reported_a_resubmission_resumes_it_and_another_submits_nothing(
    tmp_path, cluster_file, capsys
):
    cluster_file.write_text(yaml.safe_dump({"partition": "debug", "time_min": 10, "array_parallelism": 1}))
    base = {**TINY, "encoder": "cnn", "latent_dim": 16, "epochs": 20, "eval_every": 5}
    spec_path = write_spec(tmp_path / "cancel.yaml", name="cancel", base=base, grid={"beta": [0.05, 0.5]})
    spec = load_sweep(spec_path)
    out = tmp_path / "out"
    argv = ["sweep", str(spec_path), "--launcher", "slurm-array", "--cluster", str(cluster_file), "--out", str(out)]
    codes = []
    waiter = threading.Thread(target=lambda: codes.append(main([*argv, "--wait"])))
    waiter.start()
    first, second = plan(spec, out)
    # array_parallelism 1: the first run finishes, then the second starts; cancel it once it has a checkpoint.
    wait_until(lambda: results.run_state(first.run_dir) == "done" and (second.run_dir / results.CHECKPOINT).exists(),
               "the first run to finish and the second to checkpoint", waiter)  # fmt: skip
    job = submitted_jobs(out / "cancel")[second.run_id]  # this test's own job, never anyone else's
    subprocess.run(["scancel", job], check=True)
    waiter.join(timeout=300)
    assert codes == [1]
    err = capsys.readouterr().err
    assert job in err and "CANCELLED" in err and "_log.err" in err
    assert results.run_state(second.run_dir) == "incomplete"
    done_files = fingerprint(first.run_dir)

    assert main([*argv, "--wait"]) == 0
    text = capsys.readouterr().out
    assert "submitted 1 runs" in text and "ibbench status" in text and ".slurm" in text
    assert fingerprint(first.run_dir) == done_files
    assert results.run_state(second.run_dir) == "done"
    epochs = [row["epoch"] for row in results.read_metrics(second.run_dir)]
    assert epochs == [5, 10, 15, 20]
    assert main(argv) == 0  # every run done: a third submission submits nothing
    assert "nothing to submit" in capsys.readouterr().out
    assert {p.state for p in plan(spec, out)} == {"done"}


def test_bad_cluster_files_and_an_unknown_partition_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("partition: debug\nnodez: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: nodez: unknown field; allowed: partition"):
        load_cluster(bad)
    bad.write_text("time_min: -5\n")
    with pytest.raises(ConfigError, match="time_min"):
        load_cluster(bad)

    spec = write_spec(tmp_path / "p.yaml", name="p", base=TINY, grid={"beta": [0.1]})
    nowhere = tmp_path / "nowhere.yaml"
    nowhere.write_text("partition: nosuchpartition\ntime_min: 5\n")
    code = main(["sweep", str(spec), "--launcher", "slurm-array", "--cluster", str(nowhere), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {nowhere}: partition: ")
    assert "nosuchpartition" in lines[0] and "allowed: debug" in lines[0]
    code = main(["sweep", str(spec), "--launcher", "slurm", "--cluster", str(bad), "--out", str(tmp_path)])
    assert code == 2


def test_a_job_signalled_before_its_time_limit_requeues_itself_and_finishes_from_its_checkpoint(tmp_path, capsys):
    """SLURM warns a job before its time limit with SIGUSR2 (submitit asks for it); the test sends that signal
    itself at a known point, so the outcome does not depend on how fast this machine trains. With the default
    checkpoint interval no checkpoint exists yet then: the signal itself must make the run checkpoint before
    submitit requeues the job."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"partition": "debug", "time_min": 10}))
    base = {**{k: v for k, v in TINY.items() if k != "checkpoint_every_s"}, "epochs": 30, "eval_every": 3}
    spec_path = write_spec(tmp_path / "rq.yaml", name="rq", base=base, grid={"beta": [0.1]})
    out = tmp_path / "out"
    argv = ["sweep", str(spec_path), "--launcher", "slurm-array", "--cluster", str(cluster), "--out", str(out)]
    codes = []
    waiter = threading.Thread(target=lambda: codes.append(main([*argv, "--wait"])))
    waiter.start()
    (run,) = plan(load_sweep(spec_path), out)
    # The explicit point: two evaluated epochs on disk (6 of 30), no checkpoint yet (the default interval is
    # minutes).
    wait_until(lambda: len(results.read_metrics(run.run_dir)) >= 2, "two evaluated epochs of the run", waiter)
    before = results.read_metrics(run.run_dir)
    assert not (run.run_dir / results.CHECKPOINT).exists()
    job = submitted_jobs(out / "rq")[run.run_id]
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    waiter.join(timeout=600)
    assert codes == [0], capsys.readouterr().err
    assert results.run_state(run.run_dir) == "done"
    logs = "".join(p.read_text() for p in (out / "rq" / ".slurm").glob("*/*_log.*"))
    assert "Caught signal SIGUSR2" in logs and "Requeued" in logs  # submitit checkpointed and requeued it
    run_log = (run.run_dir / results.RUN_LOG).read_text()
    assert "SIGUSR2 received: checkpointed epoch" in run_log and "resumed after epoch" in run_log
    rows = results.read_metrics(run.run_dir)
    assert [row["epoch"] for row in rows] == list(range(3, 31, 3))  # every evaluated epoch once
    assert rows[0] == before[0]  # the epochs before the signal were kept, not trained again
