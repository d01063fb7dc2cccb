"""Fault injection (issue 14): damaged checkpoints, a full disk, pickled code in a checkpoint, the umask, Ctrl-C,
search trials that fail before their run starts, a changed sweep under an old study, locks where flock fails.

Every fault is real: files are truncated on disk, the disk is a tmpfs that fills up, signals go to real
`ibbench` processes, trials run in real Ray and real Optuna, locks are contended by real processes.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import _write_cifar_batch
from tiny import TINY_RUN

from ibbench import results, sweep, train
from ibbench.cli import _run_local_sweep, main
from ibbench.config import RunConfig, load_sweep
from ibbench.errors import ConfigError, RunLocked

IBBENCH = str(Path(sys.executable).parent / "ibbench")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny(**changes) -> RunConfig:
    return RunConfig.from_dict({**TINY_RUN, **changes})


def write_yaml(path: Path, value) -> Path:
    path.write_text(yaml.safe_dump(value, sort_keys=False))
    return path


def interrupt_at(epoch: int):
    """A progress callback that stops a run like Ctrl-C once `epoch` is trained (before its checkpoint)."""

    def progress(terms):
        if terms["epoch"] == epoch:
            raise KeyboardInterrupt

    return progress


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def comparable(rows):
    return [{k: v for k, v in row.items() if k != "time"} for row in rows]


# -- 1. damaged checkpoints --------------------------------------------------------------------------------------


def interrupted_run(run_dir: Path, cfg: RunConfig) -> None:
    """Train epochs 1-2 (checkpoint.prev.pt holds epoch 1, checkpoint.pt epoch 2), then stop in epoch 3."""
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, run_dir, progress=interrupt_at(3))
    assert results.run_state(run_dir) == "incomplete"
    assert torch.load(run_dir / results.CHECKPOINT, weights_only=True)["epoch"] == 2
    assert torch.load(run_dir / results.PREVIOUS_CHECKPOINT, weights_only=True)["epoch"] == 1


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(b"" if how == "empty" else data[: len(data) // 2])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, how):
    cfg = tiny(epochs=3)
    interrupted_run(tmp_path / "r", cfg)
    damage(tmp_path / "r" / results.CHECKPOINT, how)

    summary = train.run(cfg, tmp_path / "r")
    assert summary["status"] == "done" and results.run_state(tmp_path / "r") == "done"
    log = (tmp_path / "r" / results.RUN_LOG).read_text()
    assert "checkpoint.pt is unreadable" in log
    assert "resuming from the previous checkpoint, checkpoint.prev.pt (epoch 1)" in log
    assert "resumed after epoch 1" in log
    if how == "truncated":  # resuming from epoch 1 gives exactly the run that was never interrupted
        train.run(cfg, tmp_path / "straight")
        assert comparable(results.read_metrics(tmp_path / "r")) == comparable(
            results.read_metrics(tmp_path / "straight")
        )
    assert not (tmp_path / "r" / results.PREVIOUS_CHECKPOINT).exists()  # a done run keeps one checkpoint


@pytest.mark.slow
def test_with_no_readable_checkpoint_the_run_restarts_from_scratch(tmp_path):
    cfg = tiny(epochs=3)
    interrupted_run(tmp_path / "r", cfg)
    damage(tmp_path / "r" / results.CHECKPOINT, "empty")
    damage(tmp_path / "r" / results.PREVIOUS_CHECKPOINT, "truncated")
    (tmp_path / "r" / ".checkpoint.pt.0123abcd.tmp").write_bytes(b"half a checkpoint")  # a killed writer's

    train.run(cfg, tmp_path / "r")
    log = (tmp_path / "r" / results.RUN_LOG).read_text()
    assert "checkpoint.pt is unreadable" in log and "checkpoint.prev.pt is unreadable" in log
    assert "removed temporaries a killed writer left: .checkpoint.pt.0123abcd.tmp" in log
    assert log.splitlines()[-2].endswith("started from epoch 1 on " + os.uname().nodename)
    assert [r["epoch"] for r in results.read_metrics(tmp_path / "r")] == [1, 2, 3]
    assert not list((tmp_path / "r").glob(".*.tmp"))


# -- 3. weights_only loading ---------------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates a file: code a writer of a shared run folder could run as whoever resumes."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


@pytest.mark.slow
def test_a_checkpoint_holding_a_pickled_object_is_refused_not_run(tmp_path):
    cfg = tiny(epochs=3)
    interrupted_run(tmp_path / "r", cfg)
    checkpoint = tmp_path / "r" / results.CHECKPOINT
    state = torch.load(checkpoint, weights_only=True)
    marker = tmp_path / "code-ran"
    state["extra"] = Payload(marker)
    torch.save(state, checkpoint)

    train.run(cfg, tmp_path / "r")
    assert not marker.exists()
    log = (tmp_path / "r" / results.RUN_LOG).read_text()
    assert "checkpoint.pt is unreadable (UnpicklingError" in log and "resumed after epoch 1" in log


def test_checkpoints_load_with_weights_only_and_to_the_cpu(tmp_path):
    """Issue 15.1: RNG states stay CPU byte tensors; load_state_dict puts Adam's moments on the parameters' device
    (here `meta`, standing in for a GPU) and leaves its step counter on the CPU."""
    cfg = tiny(epochs=3)
    interrupted_run(tmp_path / "r", cfg)
    state = train._load_checkpoint(tmp_path / "r")
    assert state["epoch"] == 2
    tensors = [state["rng"]["torch"], state["loader_rng"], *state["encoder"].values()]
    assert all(t.device.type == "cpu" for t in tensors)
    assert state["rng"]["torch"].dtype == torch.uint8 and isinstance(state["rng"]["numpy"][1], list)
    assert "cuda" not in state["rng"]  # a CPU run saves no CUDA state

    model = train._build(cfg, train.load_dataset("digits"), torch.device("cpu"))
    model.encoder.to("meta")
    model.objective.to("meta")
    params = list(model.encoder.parameters()) + list(model.objective.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    optimizer.load_state_dict(state["optimizer"])
    moments = optimizer.state[params[0]]
    assert moments["exp_avg"].device.type == "meta" and moments["step"].device.type == "cpu"
    train._set_rng_state(state["rng"], torch.device("cpu"))  # no "RNG state must be a torch.ByteTensor"


# -- 2. a full disk ----------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 640 KiB tmpfs (a tiny run's checkpoint is ~1 MB); skipped where this user cannot mount."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small filesystem")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_disk_full_while_checkpointing(tmp_path, small_disk):
    config = write_yaml(tmp_path / "full.yaml", {**TINY_RUN, "epochs": 2})
    cmd = [IBBENCH, "run", str(config), "--out", str(small_disk)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no space left on device" in lines[0], lines
    assert "Traceback" not in proc.stdout + proc.stderr
    (run_dir,) = (small_disk / "full").iterdir()
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # no partial file keeps it full
    summary = results.read_summary(run_dir)
    assert summary["status"] == "failed" and summary["reason"].startswith("no space left on device")
    assert summary["epochs_done"] == 0

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # space freed
    proc = subprocess.run([*cmd], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert results.run_state(run_dir) == "done"


# -- 4. the umask ------------------------------------------------------------------------------------------------


UMASK_RUNS = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from ibbench import results, train
    from ibbench.config import RunConfig
    for umask in (0o022, 0o002):  # one process, two umasks: each run directory written under its own
        os.umask(umask)
        out = Path(sys.argv[1]) / f"{{umask:03o}}"
        train.run(RunConfig.from_dict({cfg!r}), out / "run")
        results.write_json(out / "sweep.yaml", {{"written": "atomically"}})
    """
)


@pytest.mark.slow
def test_every_written_file_respects_the_umask(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(UMASK_RUNS.format(cfg={**TINY_RUN, "epochs": 1}))
    subprocess.run([sys.executable, str(script), str(tmp_path)], env=ENV, check=True, timeout=300)
    for umask in (0o022, 0o002):
        written = list((tmp_path / f"{umask:03o}").rglob("*"))
        assert {p.name for p in written} >= {"config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "DONE",
                                             "run.log", ".lock", "sweep.yaml"}  # fmt: skip
        for path in written:
            mode = stat.S_IMODE(path.stat().st_mode)
            expected = (0o777 if path.is_dir() else 0o666) & ~umask
            assert mode == expected, f"umask {umask:03o}: {path.name}: {mode:o}, expected {expected:o}"


# -- 5. Ctrl-C ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_during_ibbench_run_exits_130_and_resumes(tmp_path):
    values = {**TINY_RUN, "epochs": 40, "eval_every": 40}
    config = write_yaml(tmp_path / "long.yaml", values)
    out = tmp_path / "out"
    proc = subprocess.Popen([IBBENCH, "run", str(config), "--out", str(out)], env=ENV, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    run_dir = out / "long" / results.run_id(RunConfig.from_dict(values))
    wait_for(lambda: (run_dir / results.CHECKPOINT).exists(), 240, "a first checkpoint", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert results.run_state(run_dir) == "incomplete" and results.read_summary(run_dir) is None
    assert not (run_dir / results.LOCK_FILE).exists()
    epoch = train._load_checkpoint(run_dir)["epoch"]
    assert "interrupted after epoch" in (run_dir / results.RUN_LOG).read_text()

    train.run(RunConfig.from_dict(values), run_dir)
    assert results.run_state(run_dir) == "done"
    assert f"resumed after epoch {epoch}" in (run_dir / results.RUN_LOG).read_text()


@pytest.mark.slow
def test_sigterm_to_ibbench_run_checkpoints_the_epoch_then_terminates_and_resumes_exactly(tmp_path):
    """Issue 15.8: SIGTERM (scancel, preemption) long before the first periodic checkpoint: the run checkpoints at
    the end of the epoch it is in, then dies of the signal as it would have; the resumed run trains each epoch once
    and writes the rows an uninterrupted run writes."""
    values = {**TINY_RUN, "epochs": 6, "eval_every": 1, "checkpoint_every_s": 3600}
    config = write_yaml(tmp_path / "term.yaml", values)
    out = tmp_path / "out"
    proc = subprocess.Popen([IBBENCH, "run", str(config), "--out", str(out)], env=ENV, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    cfg = RunConfig.from_dict(values)
    run_dir = out / "term" / results.run_id(cfg)
    wait_for(lambda: len(results.read_metrics(run_dir)) >= 1, 240, "a first epoch", proc)
    assert not (run_dir / results.CHECKPOINT).exists()  # nothing periodic yet: only the signal can make one
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM, err  # the default action, after the checkpoint
    epoch = train._load_checkpoint(run_dir)["epoch"]
    assert 1 <= epoch < 6
    assert [r["epoch"] for r in results.read_metrics(run_dir)] == list(range(1, epoch + 1))
    assert f"SIGTERM received: checkpointed epoch {epoch}" in (run_dir / results.RUN_LOG).read_text()
    assert results.run_state(run_dir) == "incomplete"

    trained = []
    train.run(cfg, run_dir, progress=lambda terms: trained.append(terms["epoch"]))
    assert trained == list(range(epoch + 1, 7))  # nothing trained twice
    train.run(cfg, tmp_path / "straight")
    assert comparable(results.read_metrics(run_dir)) == comparable(results.read_metrics(tmp_path / "straight"))
    summaries = [results.read_summary(d) for d in (run_dir, tmp_path / "straight")]
    assert summaries[0]["robustness"] == summaries[1]["robustness"]


@pytest.mark.slow
def test_ctrl_c_during_a_search_sweep_ends_the_trial_and_a_rerun_asks_it_again(tmp_path, ray_runtime):
    spec_path = write_yaml(tmp_path / "cc.yaml", {
        "name": "cc", "base": {**TINY_RUN, "epochs": 40, "eval_every": 40},
        "search": {"num_samples": 1, "metric": "val_acc/gmm", "space": {"beta": {"uniform": [0.0, 0.5]}}},
        "resources": {"cpu": 1},
    })  # fmt: skip
    out = tmp_path / "out"
    proc = subprocess.Popen([IBBENCH, "sweep", str(spec_path), "--out", str(out)], env=ENV, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    wait_for(lambda: any((out / "cc").glob("*/checkpoint.pt")), 300, "a trial's first checkpoint", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    (run_dir,) = results.iter_run_dirs(out / "cc")
    assert results.run_state(run_dir) == "incomplete"  # not "stopped": nothing decided to stop it
    study = optuna.load_study(study_name="cc", storage=f"sqlite:///{out / 'cc' / sweep.OPTUNA_DB}")
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    (trial,) = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert trial.user_attrs[sweep.INTERRUPTED]
    (queued,) = study.get_trials(states=(optuna.trial.TrialState.WAITING,))  # its point, asked again next time
    assert queued.system_attrs["fixed_params"] == trial.params
    assert sweep.optuna_trial_count(load_sweep(spec_path), out) == 0  # the budget is untouched

    outcome = sweep.run_sweep(load_sweep(spec_path), out)
    assert outcome.ok and outcome.states == {run_dir.name: "done"}  # the same point, resumed
    assert "resumed after epoch" in (run_dir / results.RUN_LOG).read_text()
    study = optuna.load_study(study_name="cc", storage=f"sqlite:///{out / 'cc' / sweep.OPTUNA_DB}")
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 1 and complete[0].params == trial.params


# -- 6/7. search sweeps: failures before the run starts, the metric, the study's fingerprint --------------------


def fake_cifar10(root: Path, per_file: int = 40) -> Path:
    """A CIFAR-10 folder big enough for class-balanced batches and k = 1 on the test split."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = torch.randint(0, 256, (per_file, 3072), generator=generator, dtype=torch.uint8).numpy()
        _write_cifar_batch(folder / name, data, [(i + b) % 10 for i in range(per_file)], f"batch {b + 1}")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": per_file}, f, protocol=2)
    return root


def cifar_search(path: Path, data_dir: Path) -> Path:
    base = {**TINY_RUN, "dataset": "cifar10", "data_dir": str(data_dir), "k": 1, "epochs": 1, "fgsm_eps": [0.0]}
    return write_yaml(path, {
        "name": "nodata", "base": base, "resources": {"cpu": 1},
        "search": {"num_samples": 2, "metric": "val_acc/gmm", "space": {"beta": {"uniform": [0.0, 0.5]}}},
    })  # fmt: skip


@pytest.mark.slow
def test_trials_failing_before_their_run_starts_are_reported_and_replaced(tmp_path, ray_runtime, capsys):
    """The data is missing where the trials run: each trial fails before its run directory holds anything.
    The real ConfigError comes back through Ray (item 7), the sweep says so and exits 1, the budget is untouched,
    and a rerun (same study: data_dir is a placement field) replaces the failed trials."""
    missing = tmp_path / "nowhere"
    missing.mkdir()
    spec = load_sweep(cifar_search(tmp_path / "s.yaml", missing))
    out = tmp_path / "out"
    assert _run_local_sweep(spec, out, "val_acc/gmm", "max", retry_failed=False) == 1
    err = capsys.readouterr().err
    failures = [line for line in err.splitlines() if line.startswith("failed before its run started: trial beta=")]
    assert len(failures) == 2 and all("ConfigError" in line and "CIFAR-10 not found" in line for line in failures), err
    assert "TypeError" not in err
    assert sweep.optuna_trial_count(spec, out) == 0

    spec = load_sweep(cifar_search(tmp_path / "s.yaml", fake_cifar10(tmp_path / "data")))
    outcome = sweep.run_sweep(spec, out)
    assert outcome.ok, (outcome.states, outcome.trial_failures)
    assert len(outcome.states) == 2 and set(outcome.states.values()) == {"done"}
    assert sweep.optuna_trial_count(spec, out) == 2


def test_ibbench_errors_survive_pickling():
    import inspect

    import ibbench.errors as errors

    made = {
        errors.ConfigError: errors.ConfigError("f.yaml", "beta", "too big", "0 ≤ beta < 1"),
        errors.UnknownNameError: errors.UnknownNameError("decoder", "gmn", ["gmm", "logreg"]),
        errors.TrainingFailed: errors.TrainingFailed("non-finite loss"),
        errors.RunLocked: errors.RunLocked("held by pid 1 on node7"),
    }
    classes = {c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, Exception)}
    assert classes == set(made)  # a new exception class needs a line here
    for cls, exc in made.items():
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is cls and str(back) == str(exc) and vars(back) == vars(exc)


@pytest.mark.slow
def test_a_config_error_raised_in_a_ray_task_arrives_whole(ray_runtime):
    import ray

    @ray.remote
    def bad():
        RunConfig.from_dict({**TINY_RUN, "beta": 2.0}, "trial.yaml")

    with pytest.raises(ConfigError) as info:
        ray.get(bad.remote())
    assert info.value.field == "beta" and "trial.yaml: beta: β'' = 2.0" in str(info.value)


def test_a_misspelled_search_metric_is_refused_before_any_work(tmp_path, capsys):
    spec_path = write_yaml(tmp_path / "typo.yaml", {
        "name": "typo", "base": TINY_RUN,
        "search": {"num_samples": 2, "metric": "test_acc/gmn", "space": {"beta": {"uniform": [0.0, 0.5]}}},
    })  # fmt: skip
    assert main(["sweep", str(spec_path), "--out", str(tmp_path / "out")]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert line.startswith(f"error: {spec_path}: search.metric: 'test_acc/gmn' is not a metric the runs report")
    assert "allowed: " in line and "val_acc/gmm" in line and "infoplane/i_xz" not in line  # test: not selectable
    assert not (tmp_path / "out").exists()


def test_a_changed_sweep_under_an_old_study_stops_with_one_line(tmp_path, capsys):
    search = {"num_samples": 2, "metric": "val_acc/gmm", "space": {"beta": {"uniform": [0.0, 0.5]}}}
    spec_path = write_yaml(tmp_path / "fp.yaml", {"name": "fp", "base": TINY_RUN, "search": search})
    out = tmp_path / "out"
    root = out / "fp"
    root.mkdir(parents=True)
    sweep._prepare_study(load_sweep(spec_path), root)  # the study as a first invocation leaves it
    assert main(["sweep", str(spec_path), "--out", str(out), "--dry-run"]) == 0
    assert main(["sweep", str(spec_path), "--out", str(out), "--dry-run", "--set", "device=cpu"]) == 0  # placement
    capsys.readouterr()

    for change, where in [({"base": {**TINY_RUN, "epochs": 3}}, "base.epochs"),
                          ({"search": {**search, "space": {"beta": {"uniform": [0.0, 0.9]}}}}, "search.space.beta"),
                          ({"search": {**search, "mode": "min"}}, "search.mode")]:  # fmt: skip
        write_yaml(spec_path, {"name": "fp", "base": TINY_RUN, "search": search, **change})
        assert main(["sweep", str(spec_path), "--out", str(out)]) == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert line.startswith(f"error: {spec_path}: {where}: ") and "--new-study" in line, line
        with pytest.raises(ConfigError, match=where):  # the library refuses it too, before any trial
            sweep._prepare_study(load_sweep(spec_path), root)
    write_yaml(spec_path, {"name": "fp", "base": TINY_RUN, "search": search})
    assert main(["sweep", str(spec_path), "--out", str(out), "--set", "epochs=4", "--dry-run"]) == 2
    assert "base.epochs" in capsys.readouterr().err

    kept = sweep.archive_study(load_sweep(spec_path), out)  # what --new-study does before the search starts
    assert kept.exists() and kept.parent == root and not (root / sweep.OPTUNA_DB).exists()
    sweep._prepare_study(load_sweep(spec_path), root)
    assert main(["sweep", str(spec_path), "--out", str(out), "--dry-run"]) == 0


# -- 10. locks ---------------------------------------------------------------------------------------------------


HOLDER = textwrap.dedent(
    """
    import sys, time
    from ibbench import results
    with results.run_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
    """
)


def hold_lock(run_dir: Path, env=None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env=env or ENV)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_keeps_another_process_out_and_a_dead_ones_lock_is_taken_over(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        owner = results.lock_owner(tmp_path)
        assert owner["pid"] == holder.pid and owner["host"] == socket.gethostname()
        with pytest.raises(RunLocked, match=f"pid {holder.pid} on {socket.gethostname()}"):
            with results.run_lock(tmp_path, wait_s=1.0):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert results.lock_owner(tmp_path)["pid"] == holder.pid  # a SIGKILLed holder leaves its lock file
    started = time.monotonic()
    with results.run_lock(tmp_path, wait_s=30.0):  # dead pid on this host: taken over at once, not after stale_s
        assert results.lock_owner(tmp_path)["pid"] == os.getpid()
    assert time.monotonic() - started < 10
    assert "took over a stale lock" in (tmp_path / results.RUN_LOG).read_text()
    assert results.lock_owner(tmp_path) is None


HEARTBEAT = textwrap.dedent(
    """
    import json, sys, time
    path = sys.argv[1]
    beat = 0
    while True:  # a holder on another node: alive only through its heartbeat
        with open(path, "w") as f:
            json.dump({"host": "node-b", "pid": 1, "job_id": "4242", "token": "b", "heartbeat": beat}, f)
        beat += 1
        time.sleep(0.1)
    """
)


def test_a_lock_from_another_node_is_taken_over_only_when_its_heartbeat_stops(tmp_path):
    beating = subprocess.Popen([sys.executable, "-c", HEARTBEAT, str(tmp_path / results.LOCK_FILE)])
    try:
        wait_for(lambda: results.lock_owner(tmp_path) is not None, 30, "the other node's lock")
        with pytest.raises(RunLocked, match="pid 1 on node-b, SLURM job 4242"):
            with results.run_lock(tmp_path, wait_s=2.0, stale_s=0.6):
                pass
    finally:
        beating.kill()
        beating.wait()
    started = time.monotonic()
    with results.run_lock(tmp_path, wait_s=20.0, stale_s=0.6):
        assert time.monotonic() - started >= 0.6  # only after the heartbeat was seen unchanged for stale_s
        assert results.lock_owner(tmp_path)["host"] == socket.gethostname()


@pytest.mark.slow
def test_a_lock_from_an_earlier_attempt_of_the_same_slurm_job_is_taken_over_at_once(tmp_path, monkeypatch):
    """A requeued job's next attempt starts only once SLURM ended every process of the previous one: a lock that
    attempt left on another node is gone, not to be waited out. The same attempt's lock (a trial retried after
    its node was lost, which may yet be alive) and another job's lock still wait for their heartbeat to stop."""
    path = tmp_path / results.LOCK_FILE

    def left_by(job_id: str, restart) -> None:
        path.write_text(json.dumps({"host": "node-b", "pid": 1, "job_id": job_id, "restart": restart, "token": "b"}))

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for job_id, restart in (("4242", 1), ("4243", 0), ("4242", None)):  # same attempt, another job, no attempt
        left_by(job_id, restart)
        with pytest.raises(RunLocked, match="pid 1 on node-b"):
            with results.run_lock(tmp_path, wait_s=1.0, stale_s=60):
                pass
    left_by("4242", 0)
    started = time.monotonic()
    with results.run_lock(tmp_path, wait_s=10.0, stale_s=60):
        assert time.monotonic() - started < 5
        owner = results.lock_owner(tmp_path)
        assert (owner["host"], owner["job_id"], owner["restart"]) == (socket.gethostname(), "4242", 1)
    assert "took over a stale lock (pid 1 on node-b, SLURM job 4242" in (tmp_path / results.RUN_LOG).read_text()


def test_a_holder_renews_its_lock_and_notices_when_it_was_taken_over(tmp_path):
    lock = results.RunLock(tmp_path, heartbeat_s=0.05).acquire()
    try:
        wait_for(lambda: (results.lock_owner(tmp_path) or {}).get("beats", 0) >= 2, 10, "two heartbeats")
        assert not lock.lost
        # Another process judged it stale (this one was frozen) and took over:
        (tmp_path / results.LOCK_FILE).write_text(json.dumps({"host": "node-b", "pid": 1, "token": "theirs"}))
        wait_for(lambda: lock.lost, 10, "the holder to notice")
    finally:
        lock.release()
    assert results.lock_owner(tmp_path)["token"] == "theirs"  # releasing leaves the new holder's file alone


FAILING_FLOCK = r"""
#include <errno.h>
int flock(int fd, int operation) { errno = ERRNO; return -1; }
"""


@pytest.fixture(params=["ENOLCK", "ENOSYS"])
def flock_fails(request, tmp_path):
    """An environment whose flock() always fails like a filesystem without it (LD_PRELOAD of a tiny shim)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the failing-flock shim")
    source = tmp_path / "flock.c"
    source.write_text(FAILING_FLOCK.replace("ERRNO", request.param))
    library = tmp_path / "libflock.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return {**ENV, "LD_PRELOAD": str(library), "FLOCK_ERRNO": request.param}


@pytest.mark.slow
def test_where_flock_fails_the_lock_file_still_keeps_runs_apart(tmp_path, flock_fails):
    probe = "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'a'), fcntl.LOCK_EX)"
    proc = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "x")], env=flock_fails, capture_output=True)
    assert proc.returncode != 0 and "OSError" in proc.stderr.decode()  # the shim works: flock itself fails

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = hold_lock(run_dir, env=flock_fails)
    try:
        contender = "import sys; from ibbench import results\nwith results.run_lock(sys.argv[1], wait_s=1.0): pass"
        proc = subprocess.run([sys.executable, "-c", contender, str(run_dir)], env=flock_fails, capture_output=True,
                              text=True)  # fmt: skip
        assert proc.returncode != 0 and "RunLocked" in proc.stderr and f"pid {holder.pid}" in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    if flock_fails["FLOCK_ERRNO"] != "ENOLCK":
        return  # one training run under a failing flock is enough
    train_one = "import sys; from ibbench import train; from ibbench.config import RunConfig\n" \
                f"train.run(RunConfig.from_dict({dict(TINY_RUN, epochs=1)!r}), sys.argv[1])"  # fmt: skip
    subprocess.run([sys.executable, "-c", train_one, str(run_dir)], env=flock_fails, check=True, timeout=300)
    assert results.run_state(run_dir) == "done"
    assert "took over a stale lock" in (run_dir / results.RUN_LOG).read_text()  # the killed holder's


# -- small: epochs_done --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_epochs_done_counts_only_finished_epochs_of_a_failed_run(tmp_path):
    def fail_in_epoch_2(terms):
        if terms["epoch"] == 2:
            raise RuntimeError("injected")

    with pytest.raises(train.TrainingFailed, match="RuntimeError: injected"):
        train.run(tiny(epochs=3), tmp_path / "late", progress=fail_in_epoch_2)
    assert json.loads((tmp_path / "late" / "summary.json").read_text())["epochs_done"] == 1

    with pytest.raises(train.TrainingFailed, match="non-finite"):
        train.run(tiny(epochs=3, lr=1e20, noise=False), tmp_path / "early")  # the latents overflow float32
    assert results.read_summary(tmp_path / "early")["epochs_done"] == 0
