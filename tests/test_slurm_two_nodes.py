"""The allocation and array launchers on the local two-node SLURM (partition `two`: nodeA on 127.0.0.2, nodeB on
127.0.0.3, each a slurmd of its own; see slurm/README.md), with the faults injected for real: `scontrol requeue`,
a node's job processes killed, a job held in the queue. No mocks."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from tiny import TINY_RUN

from ibbench import results
from ibbench.cli import main
from ibbench.config import load_sweep
from ibbench.launch.slurm import LEDGER, SLURM_DIR, SlurmError, node_address
from ibbench.sweep import SPEC_FILE, plan

pytestmark = [pytest.mark.slurm, pytest.mark.slow]  # conftest: one xdist worker runs them all, first

NODES = {"nodeA", "nodeB"}
# A run with a few eval epochs: long enough to be caught mid-way, short enough for a test.
LONG = {**TINY_RUN, "eval_every": 10, "fgsm_eps": [0.0]}


@pytest.fixture(scope="module", autouse=True)
def two_nodes(slurm_two_nodes):
    """Every test here submits to partition `two` (started by the session fixture where it can be), from a
    process that has run a local Ray runtime, as a test session (or a notebook) may have: its environment
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, exported to the jobs by sbatch) must not stop the nodes joining."""
    before = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    yield
    if before is None:
        os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    else:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = before


def cluster(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"partition": "two", "time_min": 10, **fields}))
    return path


def two_node_sweep(tmp_path: Path, spec_path: Path, out: Path) -> list[str]:
    """The sweep command for one allocation of both nodes, one CPU (one trial at a time) on each."""
    path = cluster(tmp_path, nodes=2, cpus_per_node=1)
    return ["sweep", str(spec_path), "--launcher", "slurm", "--cluster", str(path), "--out", str(out)]


def write_spec(tmp_path: Path, **spec) -> Path:
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


class Sweep:
    """`ibbench sweep … --wait` in a thread, as a user runs it, so that a test can inject a fault meanwhile."""

    def __init__(self, argv: list[str]):
        self.codes: list[int] = []
        self.thread = threading.Thread(target=lambda: self.codes.append(main([*argv, "--wait"])))
        self.thread.start()

    def join(self, timeout: float = 420) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the sweep did not end in time"
        return self.codes[0]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.3)


def ledger_jobs(root: Path) -> list[str]:
    path = root / SLURM_DIR / LEDGER
    return [json.loads(line)["job_id"] for line in path.read_text().splitlines()] if path.exists() else []


def epochs(run_dir: Path) -> list[int]:
    return [row["epoch"] for row in results.read_metrics(run_dir)]


def eval_epochs(run) -> list[int]:
    """The epochs a run evaluates at, each once: every eval_every-th, and the last."""
    every, last = run.cfg.eval_every, run.cfg.epochs
    return sorted({*range(every, last + 1, every), last})


def fingerprint(run_dir: Path) -> dict[str, str]:
    names = (results.CONFIG, results.METRICS, results.SUMMARY, results.DONE)
    return {n: hashlib.sha256((run_dir / n).read_bytes()).hexdigest() for n in names}


def head_result(root: Path, job_id: str) -> dict:
    """What the allocation's head (task 0) returned: its outcome as JSON."""
    import pickle

    outcome, value = pickle.loads((root / SLURM_DIR / job_id / f"{job_id}_0_result.pkl").read_bytes())
    assert outcome == "success", value
    return json.loads(value)


def checkpointed_not_done(run_dir: Path) -> bool:
    return (run_dir / results.CHECKPOINT).exists() and results.run_state(run_dir) != "done"


def test_a_two_node_sweep_trains_on_both_nodes_skips_held_runs_and_a_requeue_trains_each_run_once(tmp_path, capsys):
    """Two short runs start at once, one per node (one CPU each); then a long run, requeued mid-way with
    `scontrol requeue`: both nodes rejoin under the new attempt's head file, finished runs stay untouched, the long
    run resumes from its checkpoint with no epoch trained twice. A run that a job held in the queue covers is
    left to that job, although it is part of the allocation's grid."""
    out = tmp_path / "out"
    # The held run: an array job that SLURM keeps pending (`--hold`) holds it for the whole test.
    held_spec = write_spec(tmp_path, name="two", base=LONG, grid={"epochs": [20]})
    held_cluster = tmp_path / "held.yaml"
    held_cluster.write_text(yaml.safe_dump({"partition": "two", "time_min": 10, "sbatch": {"hold": True}}))
    assert main(["sweep", str(held_spec), "--launcher", "slurm-array", "--cluster", str(held_cluster),
                 "--out", str(out)]) == 0  # fmt: skip
    root = out / "two"
    (held_job,) = ledger_jobs(root)
    spec_path = write_spec(tmp_path, name="two", base=LONG, grid={"epochs": [10, 11, 30, 20]})
    argv = two_node_sweep(tmp_path, spec_path, out)
    try:
        sweep = Sweep(argv)
        short_a, short_b, long, held = plan(load_sweep(spec_path), out)
        wait_for(lambda: len(ledger_jobs(root)) == 2, "the allocation's submission")
        job = ledger_jobs(root)[-1]
        shorts_done = lambda: all(results.run_state(p.run_dir) == "done" for p in (short_a, short_b))  # noqa: E731
        wait_for(lambda: shorts_done() and checkpointed_not_done(long.run_dir), "short runs done, the long under way")
        before = {p.run_id: fingerprint(p.run_dir) for p in (short_a, short_b)}
        subprocess.run(["scontrol", "requeue", job], check=True)
        assert sweep.join() == 0
    finally:
        subprocess.run(["scancel", held_job], check=False)
    text = capsys.readouterr().out
    assert "1 runs are covered by jobs still queued or running; not resubmitted" in text
    assert f"job {job}: 1 runs were left to other live jobs holding them" in text
    hosts = {p.run_id: results.read_summary(p.run_dir)["hostname"] for p in (short_a, short_b)}
    assert set(hosts.values()) == NODES, hosts  # the two short runs ran side by side, one on each node
    assert {p.run_id: fingerprint(p.run_dir) for p in (short_a, short_b)} == before
    assert results.run_state(long.run_dir) == "done"
    assert epochs(long.run_dir) == eval_epochs(long)
    assert results.read_summary(long.run_dir)["hostname"] in NODES
    assert results.run_state(held.run_dir) == "new"  # never touched by the allocation
    outcome = head_result(root, job)
    assert outcome["nodes_joined"] == 2 and outcome["held"] == [held.run_id]
    logs = (root / SLURM_DIR / job / f"{job}_0_log.err").read_text()
    assert "DUE TO JOB REQUEUE" in logs  # it really was requeued
    # The second attempt's head file replaced the first's.
    assert sorted(p.name for p in (root / SLURM_DIR).glob(f"ray-{job}-*")) == [f"ray-{job}-1.json"]


def _processes_of(job: str, node: str) -> list[int]:
    """Every process of `job` on `node` (its tasks, Ray, the trials), and the slurmstepd above them."""

    def environ(pid: str) -> dict[str, str]:
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return {}
        return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)

    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        env = environ(pid)
        if env.get("SLURM_JOB_ID") == job and env.get("SLURMD_NODENAME") == node:
            found.add(int(pid))
            try:
                parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if Path(f"/proc/{parent}/comm").read_text().strip() == "slurmstepd":
                    found.add(parent)
            except (OSError, ValueError, IndexError):
                pass
    return sorted(found)


def test_a_worker_node_lost_mid_sweep_has_its_trials_retried_on_the_other(tmp_path, capsys):
    """Both runs under way, one per node; then nodeB is lost: every process of the job there is killed (its
    slurmstepd, the worker task, Ray, the trial) and SLURM is told the node is down, as it would notice a dead
    node. The allocation (submitted with --no-kill) goes on; Ray Tune retries nodeB's trial on nodeA, which
    resumes it from its checkpoint; the sweep completes and says which node was lost and which runs retried."""
    out = tmp_path / "out"
    spec_path = write_spec(tmp_path, name="loss", base=LONG, grid={"epochs": [30, 31]})
    argv = two_node_sweep(tmp_path, spec_path, out)
    root = out / "loss"
    runs = plan(load_sweep(spec_path), out)
    sweep = Sweep(argv)
    try:
        wait_for(lambda: ledger_jobs(root), "the submission")
        (job,) = ledger_jobs(root)
        wait_for(lambda: all(checkpointed_not_done(p.run_dir) for p in runs), "both runs under way")
        victims = _processes_of(job, "nodeB")
        assert victims
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["scontrol", "update", "NodeName=nodeB", "State=DOWN", "Reason=ibbench-test-node-loss"],
                       check=True)  # fmt: skip
        assert sweep.join() == 0
    finally:
        # The node's slurmd is alive: it returns to service on its next registration (ReturnToService=2).
        wait_for(lambda: subprocess.run(["sinfo", "-h", "-n", "nodeB", "-o", "%T"], capture_output=True,
                                        text=True).stdout.strip() in ("idle", "mixed"), "nodeB back", 120)  # fmt: skip
    err = capsys.readouterr().err
    assert f"job {job}: node(s) lost mid-sweep: nodeB; 1 trial(s) retried on the remaining nodes" in err
    for p in runs:
        assert results.run_state(p.run_dir) == "done"
        assert epochs(p.run_dir) == eval_epochs(p), epochs(p.run_dir)  # no epoch twice
        assert results.read_summary(p.run_dir)["hostname"] == "nodeA"  # nodeB's run finished there
    outcome = head_result(root, job)
    assert outcome["lost_nodes"] == ["nodeB"] and len(outcome["retried"]) == 1


def test_fractional_gpus_pack_four_trials_on_two_declared_gpus(tmp_path):
    """A CPU node that SLURM says has 2 GPUs (slurm/local's fake GPUs), Ray started with --num-gpus 2 and 4 CPUs,
    five trials of {cpu: 0.25, gpu: 0.5}: GPUs, not CPUs (16 trials' worth), bound the packing at 4 trials at
    once, each given one of the 2 GPU ids, two to a GPU; torch sees no CUDA, so each run trains on the CPU
    (device: auto)."""
    spec_path = write_spec(tmp_path, name="pack", base={**TINY_RUN, "fgsm_eps": [0.0], "eval_every": 2},
                           grid={"beta": [0.05, 0.2, 0.4, 0.6, 0.8]}, resources={"cpu": 0.25, "gpu": 0.5})  # fmt: skip
    out = tmp_path / "out"
    path = cluster(tmp_path, nodes=1, cpus_per_node=4, gpus_per_node=2)
    assert main(["sweep", str(spec_path), "--launcher", "slurm", "--cluster", str(path), "--out", str(out),
                 "--wait"]) == 0  # fmt: skip
    summaries = [results.read_summary(p.run_dir) for p in plan(load_sweep(spec_path), out)]
    assert all(s["status"] == "done" and s["device"] == "cpu" for s in summaries)
    assert all(len(s["gpu_ids"]) == 1 and s["gpu_ids"][0] in ("0", "1") for s in summaries), summaries
    assert all(s["config"]["device"] == "auto" for s in summaries)  # a trial given a GPU keeps device auto
    spans = [(datetime.fromisoformat(s["started"]), datetime.fromisoformat(s["finished"]), s["gpu_ids"][0])
             for s in summaries]  # fmt: skip

    def peak(gpu: str | None = None) -> int:
        events = sorted([(a, 1) for a, _, g in spans if gpu in (None, g)] + [(b, -1) for _, b, g in spans
                        if gpu in (None, g)], key=lambda e: (e[0], e[1]))  # fmt: skip
        running = top = 0
        for _, step in events:
            running += step
            top = max(top, running)
        return top

    assert peak() == 4
    assert peak("0") == peak("1") == 2  # half a GPU each


def test_an_array_spreads_over_both_nodes_retries_a_failed_run_and_writes_sweep_yaml(tmp_path, capsys):
    """slurm-array on partition `two`: the tasks land on both nodes (3 of a node's 4 CPUs each: one per node,
    whichever node an earlier test's job may still hold for a moment); with --retry-failed a failed run's reason
    is kept until its job runs, which retrains it; sweep.yaml is written, so `status` ranks by the sweep's metric;
    a ledger with a garbled and a torn line (a submitter killed mid-write) does not stop the submission."""
    base = {**TINY_RUN, "decoders": ["logreg"]}
    spec_path = write_spec(tmp_path, name="arr2", base=base, grid={"beta": [0.05, 0.5]}, resources={"cpu": 3})
    out = tmp_path / "out"
    root = out / "arr2"
    first, second = plan(load_sweep(spec_path), out)
    results.write_summary(second.run_dir, {"status": "failed", "reason": "injected failure", "run_id": second.run_id})
    ledger = root / SLURM_DIR / LEDGER
    ledger.parent.mkdir(parents=True)
    ledger.write_text('not json at all\n{"job_id": "123", "kind": "array", "ru')  # torn: no newline
    path = cluster(tmp_path, array_parallelism=2)
    argv = ["sweep", str(spec_path), "--launcher", "slurm-array", "--cluster", str(path), "--out", str(out)]
    assert main([*argv, "--retry-failed"]) == 0  # returns once SLURM accepted the jobs
    assert "submitted 2 runs" in capsys.readouterr().out
    assert (root / SPEC_FILE).exists()
    jobs = ledger_jobs_tolerant(ledger)
    assert len(jobs) == 2
    wait_for(lambda: all(results.run_state(p.run_dir) == "done" for p in (first, second)), "both runs done")
    hosts = {results.read_summary(p.run_dir)["hostname"] for p in (first, second)}
    assert hosts == NODES
    assert main(argv) == 0
    assert "nothing to submit" in capsys.readouterr().out  # the entries after the torn line were read
    assert main(["status", str(root)]) == 0
    assert "by val_acc/logreg (max)" in capsys.readouterr().out


def ledger_jobs_tolerant(ledger: Path) -> list[str]:
    jobs = []
    for line in ledger.read_text().splitlines():
        try:
            jobs.append(json.loads(line)["job_id"])
        except (json.JSONDecodeError, KeyError):
            continue
    return jobs


def test_a_live_search_sweep_gets_no_second_driver(tmp_path, capsys):
    """While a search sweep's allocation is queued (held here), submitting the sweep again starts no second
    driver, which would re-ask the live one's trials and mark them failed."""
    search = {"algorithm": "optuna", "num_samples": 2, "metric": "val_acc/gmm", "mode": "max",
              "space": {"beta": {"uniform": [0.0, 0.9]}}}  # fmt: skip
    spec_path = write_spec(tmp_path, name="srch", base=TINY_RUN, search=search)
    held = tmp_path / "held.yaml"
    held.write_text(yaml.safe_dump({"partition": "two", "time_min": 10, "sbatch": {"hold": True}}))
    out = tmp_path / "out"
    argv = ["sweep", str(spec_path), "--launcher", "slurm", "--cluster", str(held), "--out", str(out)]
    assert main(argv) == 0
    (job,) = ledger_jobs(out / "srch")
    try:
        capsys.readouterr()
        assert main(argv) == 0
        assert f"live SLURM job {job} is driving this search; not starting a second driver" in capsys.readouterr().out
        assert ledger_jobs(out / "srch") == [job]
    finally:
        subprocess.run(["scancel", job], check=False)


def test_the_head_address_is_where_slurm_reaches_the_node_never_127_0_0_1():
    """nodeA and nodeB: their NodeAddr, which SLURM itself uses (distinct loopback addresses, one machine); the
    `debug` node's NodeAddr is 127.0.0.1, which no other node could reach: one line, no address."""
    assert node_address("nodeA", ["nodeB"]) == "127.0.0.2"
    assert node_address("nodeB", ["nodeA"]) == "127.0.0.3"
    debug = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%N"], capture_output=True, text=True).stdout.strip()
    with pytest.raises(SlurmError, match=r"^node \S+: no address the other nodes can reach .*127\.0\.0\.1") as err:
        node_address(debug, ["nodeA"])
    assert "\n" not in str(err.value)
