"""SLURM launchers against the real one-node SLURM from slurm/local/ (started by .ci/run): no mocks."""

import hashlib
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from tiny import TINY_RUN

from ibbench import results
from ibbench.cli import main
from ibbench.config import ConfigError, load_sweep
from ibbench.launch.slurm import load_cluster
from ibbench.sweep import plan

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

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


def test_array_launcher_runs_to_done_and_a_resubmission_submits_nothing(tmp_path, cluster_file, capsys):
    spec = write_spec(tmp_path / "arr.yaml", name="arr", base=TINY, grid={"beta": [0.05, 0.5, 0.9]})
    out = tmp_path / "out"
    argv = ["sweep", str(spec), "--launcher", "slurm-array", "--cluster", str(cluster_file), "--out", str(out)]
    assert main([*argv, "--wait"]) == 0
    text = capsys.readouterr().out
    assert "submitted 3 runs" in text and "ibbench status" in text and ".slurm" in text
    planned = plan(load_sweep(spec), out)
    assert [p.state for p in planned] == ["done"] * 3
    assert main(argv) == 0
    assert "nothing to submit" in capsys.readouterr().out


def test_allocation_launcher_runs_the_sweep_through_ray_in_a_job(tmp_path, cluster_file, capsys):
    spec = write_spec(tmp_path / "alloc.yaml", name="alloc", base=TINY, grid={"beta": [0.05, 0.5]})
    out = tmp_path / "out"
    argv = ["sweep", str(spec), "--launcher", "slurm", "--cluster", str(cluster_file), "--out", str(out), "--wait"]
    assert main(argv) == 0
    assert "submitted 2 runs as 1 SLURM job" in capsys.readouterr().out
    assert [p.state for p in plan(load_sweep(spec), out)] == ["done", "done"]
    logs = list((out / "alloc" / ".slurm").glob("*/*_0_log.out"))
    assert logs and "Ray runtime started" in logs[0].read_text()
    assert not (out / "alloc" / ".ray").exists() or any((out / "alloc" / ".ray").iterdir())


def test_a_cancelled_job_is_reported_and_a_resubmission_resumes_it(tmp_path, cluster_file, capsys):
    cluster_file.write_text(yaml.safe_dump({"partition": "debug", "time_min": 10, "array_parallelism": 1}))
    base = {**TINY, "encoder": "cnn", "latent_dim": 16, "epochs": 40, "eval_every": 10}
    spec_path = write_spec(tmp_path / "cancel.yaml", name="cancel", base=base, grid={"beta": [0.05, 0.5]})
    spec = load_sweep(spec_path)
    out = tmp_path / "out"
    argv = ["sweep", str(spec_path), "--launcher", "slurm-array", "--cluster", str(cluster_file), "--out", str(out)]
    codes = []
    waiter = threading.Thread(target=lambda: codes.append(main([*argv, "--wait"])))
    waiter.start()
    first, second = plan(spec, out)
    deadline = time.time() + 300
    # array_parallelism 1: the first run finishes, then the second starts; cancel it once it has a checkpoint.
    while time.time() < deadline:
        ckpt = second.run_dir / results.CHECKPOINT
        if results.run_state(first.run_dir) == "done" and ckpt.exists():
            break
        time.sleep(0.5)
    else:
        pytest.fail("the runs did not progress in time")
    jobs = subprocess.run(["squeue", "--noheader", "--array", "--format=%i"], capture_output=True, text=True).stdout
    running = [j for j in jobs.split() if j.endswith("_1")]
    assert running, jobs
    subprocess.run(["scancel", running[0]], check=True)
    waiter.join(timeout=300)
    assert codes == [1]
    err = capsys.readouterr().err
    assert running[0] in err and "CANCELLED" in err and "_log.err" in err
    assert results.run_state(second.run_dir) == "incomplete"
    done_files = fingerprint(first.run_dir)
    import torch

    resumed_from = torch.load(second.run_dir / results.CHECKPOINT, weights_only=False)["epoch"]
    assert resumed_from >= 1

    assert main([*argv, "--wait"]) == 0
    assert "submitted 1 runs" in capsys.readouterr().out
    assert fingerprint(first.run_dir) == done_files
    assert results.run_state(second.run_dir) == "done"
    epochs = [row["epoch"] for row in results.read_metrics(second.run_dir)]
    assert epochs == [10, 20, 30, 40]


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


def test_a_timed_out_job_requeues_itself_and_finishes_from_its_checkpoint(tmp_path, capsys):
    cluster = tmp_path / "short.yaml"
    # time_min 2 with submitit's 90 s warning: SLURM signals USR2 30 s into each attempt, submitit requeues.
    cluster.write_text(yaml.safe_dump({"partition": "debug", "time_min": 2}))
    base = {**TINY, "encoder": "cnn", "latent_dim": 16, "epochs": 600, "eval_every": 200}  # ~80 s of training
    spec_path = write_spec(tmp_path / "rq.yaml", name="rq", base=base, grid={"beta": [0.1]})
    out = tmp_path / "out"
    argv = ["sweep", str(spec_path), "--launcher", "slurm-array", "--cluster", str(cluster), "--out", str(out)]
    assert main([*argv, "--wait"]) == 0
    (run,) = plan(load_sweep(spec_path), out)
    assert run.state == "done"
    logs = "".join(p.read_text() for p in (out / "rq" / ".slurm").glob("*/*_log.*"))
    assert "Requeued job" in logs  # it really ran out of time at least once
    assert [row["epoch"] for row in results.read_metrics(run.run_dir)] == [200, 400, 600]
