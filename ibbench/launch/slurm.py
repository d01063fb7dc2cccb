"""SLURM through submitit: Ray Tune on one allocation (`slurm`), or one array task per run without Ray
(`slurm-array`). Both only decide where `train.run` executes; the run directories are the same as locally.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ibbench import results
from ibbench.config import ClusterConfig, ConfigError, RunConfig, SweepSpec, load_cluster
from ibbench.sweep import PlannedRun, plan, run_sweep, sweep_dir

__all__ = ["AllocationJob", "ClusterConfig", "RunJob", "Submission", "load_cluster", "submit"]

log = logging.getLogger(__name__)

SLURM_DIR = ".slurm"  # <out>/<sweep>/.slurm: submitit's folder, logs, the submissions ledger
LEDGER = "submissions.jsonl"


# -- what runs inside the jobs -----------------------------------------------------------------------------------


class RunJob:
    """One array task: train one run; on timeout or preemption, requeue and resume from its checkpoint."""

    def __init__(self, threads: int):
        self.threads = threads

    def __call__(self, cfg_values: dict[str, Any], run_dir: str) -> str:
        import torch

        from ibbench import train

        torch.set_num_threads(self.threads)
        cfg = RunConfig.from_dict(cfg_values)
        summary = train.run(cfg, Path(run_dir))
        return str(summary.get("status"))

    def checkpoint(self, cfg_values: dict[str, Any], run_dir: str):
        """submitit calls this on timeout/preemption: requeue the same call; checkpoint.pt holds the progress."""
        import submitit

        return submitit.helpers.DelayedSubmission(RunJob(self.threads), cfg_values, run_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _ray_env(single_node: bool, token: str) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    if single_node:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keeps every Ray process on 127.0.0.1
    return env


class AllocationJob:
    """One allocation, one task per node: task 0 runs a Ray head and the sweep driver, the others join as workers."""

    def __init__(self, spec: SweepSpec, out: str, retry_failed: bool, cluster: ClusterConfig):
        self.spec, self.out, self.retry_failed, self.cluster = spec, out, retry_failed, cluster

    def __call__(self) -> str:
        import submitit

        env = submitit.JobEnvironment()
        info = sweep_dir(self.spec, Path(self.out)) / SLURM_DIR / f"ray-{env.job_id}.json"
        single = env.num_nodes == 1
        if env.global_rank == 0:
            return self._head(info, single, env.num_nodes)
        return self._worker(info, single)

    def _ray_start(self, args: list[str], env: dict[str, str], temp_dir: str) -> subprocess.Popen:
        resources = [f"--num-cpus={self.cluster.cpus_per_node}", f"--num-gpus={self.cluster.gpus_per_node}"]
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--include-dashboard=false",
               f"--temp-dir={temp_dir}", *resources, *args]  # fmt: skip
        # Its own session: stopping it must stop this job's Ray processes only, never another user's.
        return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=sys.stdout, stderr=sys.stderr)

    def _head(self, info: Path, single: bool, num_nodes: int) -> str:
        token = secrets.token_hex(16)
        env = _ray_env(single, token)
        # Ray reads these once, at import: the driver's environment is set before ray is imported here.
        os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
                           if k in env})  # fmt: skip
        import ray

        host = "127.0.0.1" if single else socket.gethostbyname(socket.gethostname())
        port = _free_port()
        # Every port chosen free at start, so two users' sweeps on one node never collide.
        ports = [f"--port={port}", f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
                 f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}",
                 f"--min-worker-port={_free_port()}"]  # fmt: skip
        ports.append(f"--max-worker-port={int(ports[-1].split('=')[1]) + 200}")
        temp_dir = f"/tmp/ray-{os.getuid()}-{info.stem}"
        head = self._ray_start(["--head", f"--node-ip-address={host}", *ports], env, temp_dir)
        address = f"{host}:{port}"
        results.write_json(info, {"address": address, "token": token, "finished": False})
        os.chmod(info, 0o600)
        try:
            deadline = time.monotonic() + 300
            _wait_for_port(host, port, head, deadline)
            # _node_ip_address: the driver must use the head's address too (Ray reads its loopback switch at
            # import time, before this job could set it).
            ray.init(address=address, _node_ip_address=host, log_to_driver=False, configure_logging=False)
            while sum(n["Alive"] for n in ray.nodes()) < num_nodes and time.monotonic() < deadline:
                time.sleep(2)
            outcome = run_sweep(self.spec, Path(self.out), retry_failed=self.retry_failed)
            return json.dumps(outcome.states)
        finally:
            results.write_json(info, {"address": address, "token": token, "finished": True})
            if ray.is_initialized():
                ray.shutdown()
            _stop(head)

    def _worker(self, info: Path, single: bool) -> str:
        deadline = time.monotonic() + 600
        while not info.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head never wrote {info}")
            time.sleep(2)
        head = results.read_json(info)
        env = _ray_env(single, head["token"])
        worker = self._ray_start([f"--address={head['address']}"], env, f"/tmp/ray-{os.getuid()}-{info.stem}-w")
        try:
            while not results.read_json(info).get("finished") and worker.poll() is None:
                time.sleep(2)
        finally:
            _stop(worker)
        return "worker done"

    def checkpoint(self):
        """Requeue on timeout/preemption: the sweep resumes from the run directories."""
        import submitit

        return submitit.helpers.DelayedSubmission(AllocationJob(self.spec, self.out, self.retry_failed, self.cluster))


def _wait_for_port(host: str, port: int, proc: subprocess.Popen, deadline: float) -> None:
    """Block until host:port accepts connections; fail fast if the process that should open it has died."""
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start` exited with code {proc.returncode} before its port {port} opened")
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not open {host}:{port} in time") from None
            time.sleep(1)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a `ray start --block` and everything it started (its own process group)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# -- submitting --------------------------------------------------------------------------------------------------


def _executor(spec: SweepSpec, out: Path, cluster: ClusterConfig):
    import submitit

    folder = sweep_dir(spec, out).resolve() / SLURM_DIR / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=cluster.max_requeues)
    params: dict[str, Any] = {
        "timeout_min": cluster.time_min,
        "slurm_setup": list(cluster.setup),
        "slurm_additional_parameters": dict(cluster.sbatch),
        "name": f"ibbench-{spec.name}",
    }
    if cluster.partition:
        params["slurm_partition"] = cluster.partition
    if cluster.account:
        params["slurm_account"] = cluster.account
    if cluster.qos:
        params["slurm_qos"] = cluster.qos
    if cluster.mem_gb:
        params["mem_gb"] = cluster.mem_gb
    executor.update_parameters(**params)
    return executor


def _submission_error(cluster: ClusterConfig, exc: Exception) -> ConfigError:
    """SLURM's own refusal (bad partition, account, limits) as one line about the cluster file."""
    text = str(getattr(exc, "output", b"") or exc)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if "error" in line.lower()] or [text.strip()]
    message = lines[0].removeprefix("sbatch: error: ")
    field = "partition" if "partition" in message.lower() else "account" if "account" in message.lower() else "(sbatch)"
    return ConfigError(cluster.source, field, f"SLURM refused the job: {message}")


def _check_partition(cluster: ClusterConfig) -> None:
    """Ask SLURM about the partition before submitting, so a typo is one line naming the cluster file."""
    if not cluster.partition:
        return
    proc = subprocess.run(["scontrol", "show", "partition", cluster.partition], capture_output=True, text=True)
    if proc.returncode != 0:
        answer = (proc.stderr or proc.stdout).strip().splitlines()
        names = subprocess.run(["sinfo", "--noheader", "--format=%R"], capture_output=True, text=True).stdout.split()
        raise ConfigError(cluster.source, "partition", f"SLURM says: {answer[0] if answer else 'invalid partition'}",
                          ", ".join(sorted(set(names))) or None)  # fmt: skip


def _active_runs(root: Path) -> set[str]:
    """Run ids whose earlier submission is still queued or running (the ledger, checked against squeue)."""
    ledger = root / SLURM_DIR / LEDGER
    if not ledger.exists():
        return set()
    entries = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
    # One line per array element, for this user only: asking for finished job ids by name makes squeue fail.
    proc = subprocess.run(["squeue", "--array", "--noheader", "--format=%i", f"--user={os.getuid()}"],
                          capture_output=True, text=True)  # fmt: skip
    alive = set(proc.stdout.split())
    return {rid for entry in entries if entry["job_id"] in alive for rid in entry["runs"]}


def _record(root: Path, job_id: str, kind: str, runs: list[str]) -> None:
    ledger = root / SLURM_DIR / LEDGER
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with ledger.open("a") as f:
        f.write(json.dumps({"job_id": job_id, "kind": kind, "runs": runs, "time": time.time()}) + "\n")


@dataclass
class Submission:
    """What a submission did: its jobs, the runs they cover, where their logs go."""

    jobs: list[Any]
    runs: list[str]
    log_dir: Path
    skipped_active: list[str]


def pending_runs(spec: SweepSpec, out: Path, retry_failed: bool) -> list[PlannedRun]:
    return [p for p in plan(spec, out) if p.state in ("new", "incomplete") or (retry_failed and p.state == "failed")]


def submit(spec: SweepSpec, out: Path, cluster: ClusterConfig, launcher: str, retry_failed: bool = False) -> Submission:
    """Submit the sweep's pending runs (not those an earlier, still-active submission covers); returns at once."""
    root = sweep_dir(spec, out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    active = _active_runs(root)
    todo = [p for p in pending_runs(spec, out, retry_failed) if p.run_id not in active]
    log_dir = root / SLURM_DIR
    if spec.search is None and not todo:
        return Submission([], [], log_dir, sorted(active))
    if retry_failed:
        for p in todo:
            if p.state == "failed":
                results.clear_failure(p.run_dir)
    _check_partition(cluster)
    executor = _executor(spec, out, cluster)
    try:
        if launcher == "slurm-array":
            if spec.search is not None:
                raise ConfigError(spec.source, "search", "a search needs Ray: use --launcher slurm", "--launcher slurm")
            executor.update_parameters(
                cpus_per_task=max(1, math.ceil(spec.resources.cpu)),
                gpus_per_node=math.ceil(spec.resources.gpu),
                slurm_array_parallelism=cluster.array_parallelism,
                tasks_per_node=1,
            )
            job = RunJob(max(1, math.ceil(spec.resources.cpu)))
            jobs = executor.map_array(job, [p.cfg.to_dict() for p in todo], [str(p.run_dir) for p in todo])
            for j, p in zip(jobs, todo, strict=True):
                _record(root, j.job_id, "array", [p.run_id])
        else:
            executor.update_parameters(
                nodes=cluster.nodes,
                tasks_per_node=1,
                cpus_per_task=cluster.cpus_per_node,
                gpus_per_node=cluster.gpus_per_node,
            )
            jobs = [executor.submit(AllocationJob(spec, str(Path(out).resolve()), retry_failed, cluster))]
            _record(root, jobs[0].job_id, "allocation", [p.run_id for p in todo])
    except ConfigError:
        raise
    except Exception as exc:  # submitit wraps sbatch's refusal
        if "sbatch" in str(exc).lower() or isinstance(exc, subprocess.CalledProcessError):
            raise _submission_error(cluster, exc) from None
        raise
    return Submission(jobs, [p.run_id for p in todo], log_dir, sorted(active))
