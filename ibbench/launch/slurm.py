"""SLURM through submitit: Ray Tune on one allocation (`slurm`), or one array task per run without Ray
(`slurm-array`). Both only decide where `train.run` executes; the run directories are the same as locally.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import shlex
import shutil
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
from ibbench.launch.local import keep_ray_logs, ray_temp_dir
from ibbench.sweep import RAY_SCRATCH, PlannedRun, optuna_trial_count, plan, run_sweep, sweep_dir, write_spec

__all__ = ["AllocationJob", "ClusterConfig", "RunJob", "SlurmError", "Submission", "load_cluster", "submit"]

log = logging.getLogger(__name__)

SLURM_DIR = ".slurm"  # <out>/<sweep>/.slurm: submitit's folder, logs, the submissions ledger, the head files
LEDGER = "submissions.jsonl"
SLURM_COMMANDS = ("sbatch", "srun", "squeue", "scontrol", "sacct")  # what the launchers and submitit call
HEAD_WAIT_S = 300  # how long the head waits for the workers to join, and workers for the head's file (x2)


class SlurmError(RuntimeError):
    """SLURM could not be asked (a command missing or failing) or a job cannot go on: one line, exit code 1."""


def _slurm(args: list[str], consequence: str) -> str:
    """stdout of a SLURM client command; SlurmError (one line, saying what it means) when it is missing or fails."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SlurmError(_missing([args[0]])) from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{shlex.join(args)}` did not answer in 120 s; {consequence}") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        said = lines[-1].strip() if lines else "no output"
        raise SlurmError(f"`{shlex.join(args)}` failed (exit {proc.returncode}: {said}); {consequence}")
    return proc.stdout


def _require_slurm() -> None:
    """One line, before anything is changed, when SLURM's client commands are not there."""
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing:
        raise SlurmError(_missing(missing))


def _missing(commands: list[str]) -> str:
    return (f"{', '.join(commands)} not found on PATH: the slurm launchers need SLURM's client commands "
            f"({', '.join(SLURM_COMMANDS)}); run on a login node or load SLURM's module")  # fmt: skip


# -- what runs inside the jobs -----------------------------------------------------------------------------------


def _slurm_gpus() -> list[str]:
    """The GPU ids SLURM gave this task (its CUDA_VISIBLE_DEVICES), for the run's summary."""
    return [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]


class RunJob:
    """One array task: train one run; on timeout or preemption, requeue and resume from its checkpoint."""

    def __init__(self, threads: int, retry_failed: bool = False):
        self.threads, self.retry_failed = threads, retry_failed

    def __call__(self, cfg_values: dict[str, Any], run_dir: str) -> str:
        import torch

        from ibbench import train

        torch.set_num_threads(self.threads)
        cfg = RunConfig.from_dict(cfg_values)
        if self.retry_failed and results.run_state(Path(run_dir)) == "failed":
            results.clear_failure(Path(run_dir))  # only now, in the accepted and running job (--retry-failed)
        summary = train.run(cfg, Path(run_dir), gpu_ids=_slurm_gpus())
        return str(summary.get("status"))

    def checkpoint(self, cfg_values: dict[str, Any], run_dir: str):
        """submitit calls this on timeout/preemption: requeue the same call; checkpoint.pt holds the progress."""
        import submitit

        return submitit.helpers.DelayedSubmission(RunJob(self.threads, self.retry_failed), cfg_values, run_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


RAY_PORTS = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port")  # fmt: skip
WORKER_PORTS = 200  # ports for a node's Ray worker processes, one per worker


def _ray_ports() -> tuple[list[str], int]:
    """`ray start` arguments for every port a Ray node opens, each chosen free now, and one more free port (the
    head's --port). Ray binds them on all addresses, so two nodes (or two users' sweeps) on one machine must never
    share a fixed default, and Ray refuses a port inside the workers' range."""
    low = _free_port()
    chosen: list[int] = []
    while len(chosen) <= len(RAY_PORTS):
        port = _free_port()
        if not low <= port <= low + WORKER_PORTS and port not in chosen:
            chosen.append(port)
    args = [f"--{name}={port}" for name, port in zip(RAY_PORTS, chosen, strict=False)]
    return [*args, f"--min-worker-port={low}", f"--max-worker-port={low + WORKER_PORTS}"], chosen[-1]


def _ray_env(single_node: bool, token: str) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    if single_node:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keeps every Ray process on 127.0.0.1
    else:
        # A submitting process that ran a local Ray runtime passes its "0" on (sbatch exports the environment);
        # with it a worker's `ray start` refuses to join a multi-node cluster.
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    return env


def _resolve(name: str) -> str:
    try:
        return socket.getaddrinfo(name, None, socket.AF_INET)[0][4][0]
    except (socket.gaierror, IndexError):
        raise SlurmError(f"node address {name!r} does not resolve to an IPv4 address") from None


def _node_addr(node: str) -> str:
    """The address SLURM reaches `node` at: its NodeAddr (the node's name when slurm.conf sets none)."""
    text = _slurm(["scontrol", "show", "node", "--oneliner", node], "cannot find the node's address")
    found = re.search(r"\bNodeAddr=(\S+)", text)
    return found.group(1) if found else node


def _is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


def node_address(node: str, peers: list[str]) -> str:
    """An IPv4 address of `node` that the allocation's other nodes (`peers`) can reach; SlurmError if none.

    SLURM's NodeAddr first. A loopback answer is accepted only when it is SLURM's own configured NodeAddr other
    than 127.0.0.1 (several slurmds on one machine, as in slurm/local/, where SLURM itself reaches the node there);
    a name that resolves to loopback (Debian's 127.0.1.1 alias of the hostname) is the classic trap: then the
    address of the interface that routes towards a peer is used, and if that is loopback too, the job stops.
    """
    configured = _node_addr(node)
    ip = _resolve(configured)
    if not _is_loopback(ip):
        return ip
    if configured == ip and ip != "127.0.0.1":
        return ip
    for peer in peers:
        peer_ip = _resolve(_node_addr(peer))
        if _is_loopback(peer_ip):
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer_ip, 9))  # UDP: no packet is sent, the kernel only picks the route
            local = s.getsockname()[0]
        if not _is_loopback(local):
            return local
    raise SlurmError(
        f"node {node}: no address the other nodes can reach (SLURM's NodeAddr {configured} is "
        f"the loopback address {ip}); give it a routable NodeAddr in slurm.conf or fix its /etc/hosts"
    )


def head_file(slurm_dir: Path, job_id: str, restart: int) -> Path:
    """Where the Ray head of one attempt of an allocation publishes its address and token.

    Keyed by job id and restart count: a requeued allocation's workers wait for their own attempt's head, never
    the previous attempt's file (whose address is dead).
    """
    return slurm_dir / f"ray-{job_id}-{restart}.json"


def _write_private_json(path: Path, value: dict[str, Any]) -> None:
    """Atomic, fsynced and 0600 from the start: the file holds the Ray cluster's token."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(value))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_head(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) and ("address" in value or "error" in value) else None


def _wait_for_head(path: Path, timeout_s: float) -> dict[str, Any]:
    """The head file of this attempt, once its head has written it; SlurmError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while (head := _read_head(path)) is None:
        if time.monotonic() > deadline:
            raise SlurmError(f"the Ray head of this attempt never wrote {path}")
        time.sleep(1)
    return head


class AllocationJob:
    """One allocation of `nodes` nodes. Its job step runs on the first node: a Ray head and the sweep driver, which
    starts one more job step per other node, a Ray worker (run_worker) joining the head.

    Separate steps, because SLURM ends a whole step when one of its nodes fails: a lost worker node then ends
    only its own step, and the head (in a job submitted with --no-kill) goes on with the nodes left.
    """

    def __init__(self, spec: SweepSpec, out: str, retry_failed: bool, cluster: ClusterConfig):
        self.spec, self.out, self.retry_failed, self.cluster = spec, out, retry_failed, cluster

    def __call__(self) -> str:
        import submitit

        env = submitit.JobEnvironment()
        restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        info = head_file(sweep_dir(self.spec, Path(self.out)) / SLURM_DIR, env.job_id, restart)
        nodes = list(env.hostnames)
        me = os.environ.get("SLURMD_NODENAME") or env.hostname
        return self._head(info, me, [n for n in nodes if n != me], env.job_id, restart)

    def _head(self, info: Path, me: str, peers: list[str], job_id: str, restart: int) -> str:
        token = secrets.token_hex(16)
        single = not peers
        env = _ray_env(single, token)
        # Ray reads these once, at import: the driver's environment is set before ray is imported here. The
        # workers' steps inherit them too.
        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
            if key in env:
                os.environ[key] = env[key]
            else:  # dropped by _ray_env for a multi-node cluster
                os.environ.pop(key, None)
        import ray

        root = sweep_dir(self.spec, Path(self.out))
        # A fresh private folder (never a predictable name in the shared /tmp); short, since Ray's socket paths
        # must fit in 107 bytes.
        temp_dir = ray_temp_dir()
        head, address, error, workers = None, None, None, {}
        try:
            host = "127.0.0.1" if single else node_address(me, peers)
            ports, port = _ray_ports()
            args = ["--head", "--include-dashboard=false", f"--node-ip-address={host}", f"--port={port}", *ports]
            head = _ray_start(args, env, temp_dir, self.cluster.cpus_per_node, self.cluster.gpus_per_node)
            address = f"{host}:{port}"
            _write_private_json(info, {"address": address, "token": token, "finished": False, "node": me})
            for old in info.parent.glob(f"ray-{job_id}-*"):  # earlier attempts' heads are gone
                attempt = old.name.removeprefix(f"ray-{job_id}-").split(".")[0]
                if attempt.isdigit() and int(attempt) != restart:
                    old.unlink(missing_ok=True)
            deadline = time.monotonic() + HEAD_WAIT_S
            _wait_for_port(host, port, head, deadline)
            workers = {peer: self._start_worker(info, peer, [me, *peers], job_id) for peer in peers}
            # _node_ip_address: the driver must use the head's address too (Ray reads its loopback switch at
            # import time, before this job could set it).
            ray.init(address=address, _node_ip_address=host, log_to_driver=False, configure_logging=False)
            joined = _wait_for_nodes(ray, list(workers.values()), len(peers) + 1, deadline)
            if joined < len(peers) + 1:
                log.warning("only %d of %d nodes joined the Ray cluster; the sweep runs on those",
                            joined, len(peers) + 1)  # fmt: skip
            held = _held_by_other_jobs(root, job_id)
            if held:
                log.warning("%d runs are held by other live SLURM jobs; not training them here", len(held))
            outcome = run_sweep(self.spec, Path(self.out), retry_failed=self.retry_failed, skip=held)
            lost = sorted(n.get("NodeManagerHostname", "?") for n in ray.nodes() if not n["Alive"])
            if lost:
                log.warning("nodes lost during the sweep: %s; %d trials were retried on the remaining nodes",
                            ", ".join(lost), len(outcome.retried))  # fmt: skip
            return json.dumps({"states": outcome.states, "nodes_joined": joined, "nodes": len(peers) + 1,
                               "lost_nodes": lost, "retried": outcome.retried, "held": sorted(held),
                               "reasons": outcome.reasons})  # fmt: skip
        except Exception as exc:
            error = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise
        finally:
            # Workers leave when they read this; with an error they never wait for a head that is not coming.
            _write_private_json(info, {"address": address, "token": token, "finished": True, "node": me,
                                       **({"error": error} if error else {})})  # fmt: skip
            if ray.is_initialized():
                ray.shutdown()
            for step in workers.values():
                _end_step(step)
            if head is not None:
                _stop(head)
            keep_ray_logs(temp_dir, root / RAY_SCRATCH, f"logs-{me}-")

    def _start_worker(self, info: Path, node: str, nodes: list[str], job_id: str) -> subprocess.Popen:
        """A job step of one task on `node`: a Ray worker that joins this attempt's head (run_worker)."""
        log_file = info.parent / job_id / f"{job_id}_worker_{node}.log"
        code = "import sys; from ibbench.launch.slurm import run_worker; run_worker(*sys.argv[1:])"
        resources = [str(self.cluster.cpus_per_node), str(self.cluster.gpus_per_node)]
        cmd = ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={node}", "--kill-on-bad-exit=0", "--unbuffered",
               f"--output={log_file}", sys.executable, "-u", "-c", code, str(info), ",".join(nodes),
               *resources]  # fmt: skip
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL)

    def checkpoint(self):
        """Requeue on timeout/preemption: the sweep resumes from the run directories."""
        import submitit

        return submitit.helpers.DelayedSubmission(AllocationJob(self.spec, self.out, self.retry_failed, self.cluster))


def run_worker(info: str, nodes: str, cpus: str, gpus: str) -> None:
    """A worker node's job step: wait for this attempt's head file, run a Ray worker until the head finishes."""
    # SLURM's time-limit warning (USR2) is for the head's submitit, which requeues the whole job; here, and in the
    # Ray processes started below (which inherit the ignored signal), it must not end the node early.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    path = Path(info)
    me = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    head = _wait_for_head(path, HEAD_WAIT_S)
    if head.get("finished"):
        log.warning("the head had finished already (%s)", head.get("error") or "done")
        return
    ip = node_address(me, [n for n in nodes.split(",") if n != me])
    temp_dir = ray_temp_dir()
    worker = _ray_start([f"--address={head['address']}", f"--node-ip-address={ip}", *_ray_ports()[0]],
                        _ray_env(False, head["token"]), temp_dir, int(cpus), int(gpus))  # fmt: skip
    # SLURM ends a step with SIGTERM (a requeue, a cancel, the head stopping its srun): stop this node's Ray at
    # once, rather than leave it to drain for 30 s outside the step (it runs in its own session) while the job
    # waits to leave COMPLETING.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        while not (finished := (_read_head(path) or {}).get("finished")) and worker.poll() is None:
            time.sleep(2)
    finally:
        _stop(worker)
        keep_ray_logs(temp_dir, path.parent.parent / RAY_SCRATCH, f"logs-{me}-")
    if not finished:
        raise SlurmError(f"node {me}: `ray start` exited with code {worker.returncode} before the sweep ended")


def _ray_start(args: list[str], env: dict[str, str], temp_dir: str, cpus: int, gpus: int) -> subprocess.Popen:
    """`ray start --block` for one node with `cpus` CPUs and `gpus` GPUs declared."""
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats",
           f"--temp-dir={temp_dir}", f"--num-cpus={cpus}", f"--num-gpus={gpus}", *args]  # fmt: skip
    # Its own session: stopping it must stop this job's Ray processes only, never another user's. SLURM's
    # time-limit warning (USR2) is for submitit: Ray ignores it and runs on until the job is requeued.
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=sys.stdout, stderr=sys.stderr,
                            preexec_fn=_ignore_usr2)  # fmt: skip


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def _ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _end_step(step: subprocess.Popen, grace_s: float = 30) -> None:
    """Wait for a worker's job step to end (it does once it reads the finished head file), else stop its srun."""
    try:
        step.wait(grace_s)
    except subprocess.TimeoutExpired:
        step.terminate()  # srun passes SIGTERM on to the step's task
        try:
            step.wait(15)
        except subprocess.TimeoutExpired:
            step.kill()


def _alive_nodes(ray) -> int:
    return sum(bool(n["Alive"]) for n in ray.nodes())


def _wait_for_nodes(ray, workers: list[subprocess.Popen], expected: int, deadline: float) -> int:
    """Until `expected` Ray nodes are alive, or every missing one's job step has ended, or the deadline."""
    while (alive := _alive_nodes(ray)) < expected and time.monotonic() < deadline:
        if alive + sum(w.poll() is not None for w in workers) >= expected:
            break
        time.sleep(1)
    return alive


def _held_by_other_jobs(root: Path, own_job: str) -> frozenset[str]:
    """Runs that other live jobs (the ledger, checked against squeue) hold; none when squeue cannot answer here,
    where each run's lock still keeps two trainers apart."""
    try:
        return frozenset(rid for entry in _live_entries(root) if entry["job_id"] != own_job for rid in entry["runs"])
    except SlurmError as exc:
        log.warning("cannot tell which runs other jobs hold (%s); relying on the runs' locks", exc)
        return frozenset()


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
    """Stop a `ray start --block` and everything it started (its own process group).

    Only when the sweep is over (or cannot go on): nothing in Ray is worth its 30 s drain on SIGTERM.
    """
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
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
    field = "account" if "account" in message.lower() else "partition" if "partition" in message.lower() else "(sbatch)"
    return ConfigError(cluster.source, field, f"SLURM refused the job: {message}")


def _check_partition(cluster: ClusterConfig) -> None:
    """Ask SLURM about the partition before submitting, so a typo is one line naming the cluster file."""
    if not cluster.partition:
        return
    proc = subprocess.run(["scontrol", "show", "partition", cluster.partition], capture_output=True, text=True)
    if proc.returncode != 0:
        answer = (proc.stderr or proc.stdout).strip().splitlines()
        said = answer[0] if answer else "invalid partition"
        if "not found" not in said.lower() and "invalid partition" not in said.lower():
            raise SlurmError(f"`scontrol show partition {cluster.partition}` failed ({said}); not submitting")
        names = subprocess.run(["sinfo", "--noheader", "--format=%R"], capture_output=True, text=True).stdout.split()
        raise ConfigError(cluster.source, "partition", f"SLURM says: {said}", ", ".join(sorted(set(names))) or None)


def _read_ledger(root: Path) -> list[dict[str, Any]]:
    """The ledger's entries; a torn or garbled line (a submitter killed mid-write) is skipped with a warning."""
    ledger = root / SLURM_DIR / LEDGER
    if not ledger.exists():
        return []
    entries = []
    for number, line in enumerate(ledger.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            entries.append({"job_id": str(entry["job_id"]), "kind": entry.get("kind", "?"),
                            "runs": list(entry.get("runs") or []), "user": entry.get("user")})  # fmt: skip
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            log.warning("%s:%d: skipping an unreadable line (a write cut short?)", ledger, number)
    return entries


def _live_entries(root: Path) -> list[dict[str, Any]]:
    """Ledger entries whose job is still queued or running; SlurmError when squeue cannot tell."""
    entries = _read_ledger(root)
    if not entries:
        return []
    users = sorted({str(e["user"]) for e in entries if e["user"] is not None} | {str(os.getuid())})
    alive = _listed_jobs(users, "not submitting: runs still queued or running would be submitted twice")
    return [e for e in entries if e["job_id"] in alive]


def _listed_jobs(users: list[str], consequence: str) -> set[str]:
    """Job ids squeue lists for users (queued, running or completing), one per array element; asking for
    finished job ids by number makes squeue fail, so it is asked by user."""
    return set(_slurm(["squeue", "--array", "--noheader", "--format=%i", f"--user={','.join(users)}"],
                      consequence).split())  # fmt: skip


def wait_until_gone(job_ids: list[str], timeout_s: float = 120) -> bool:
    """Block until none of job_ids is listed by squeue any more (a job that ended is COMPLETING for a while: its
    processes may still be alive, and it still holds its runs against a resubmission); False on timeout."""
    deadline = time.monotonic() + timeout_s
    wanted = set(job_ids)
    while True:
        try:
            listed = _listed_jobs([str(os.getuid())], "cannot tell whether the jobs have left the queue")
        except SlurmError as exc:
            log.warning("%s", exc)
            return False
        if wanted.isdisjoint(listed):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(1)


def _active_runs(root: Path) -> set[str]:
    """Run ids whose earlier submission is still queued or running (the ledger, checked against squeue)."""
    return {rid for entry in _live_entries(root) for rid in entry["runs"]}


def _record(root: Path, entries: list[tuple[str, str, list[str]]]) -> None:
    """Append (job_id, kind, runs) entries to the ledger in one fsynced write, after a torn last line if any."""
    ledger = root / SLURM_DIR / LEDGER
    ledger.parent.mkdir(parents=True, exist_ok=True)
    now, user = time.time(), os.getuid()
    text = "".join(json.dumps({"job_id": j, "kind": k, "runs": r, "time": now, "user": user}) + "\n"
                   for j, k, r in entries)  # fmt: skip
    with ledger.open("a+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                text = "\n" + text  # a torn last line stays alone on its line, unreadable, and this one is kept
        f.write(text.encode())
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Submission:
    """What a submission did: its jobs, the runs they cover, where their logs go, what it left to live jobs."""

    jobs: list[Any]
    runs: list[str]
    log_dir: Path
    skipped_active: list[str]
    live_driver: str | None = None  # a search sweep's live allocation job: no second driver was started


def pending_runs(spec: SweepSpec, out: Path, retry_failed: bool) -> list[PlannedRun]:
    return [p for p in plan(spec, out) if p.state in ("new", "incomplete") or (retry_failed and p.state == "failed")]


def submit(spec: SweepSpec, out: Path, cluster: ClusterConfig, launcher: str, retry_failed: bool = False) -> Submission:
    """Submit the sweep's pending runs (not those an earlier, still-active submission covers); returns at once.

    Nothing on disk changes unless SLURM accepts the jobs: failed runs are cleared (with --retry-failed) by the
    jobs themselves when they start.
    """
    _require_slurm()
    if launcher == "slurm-array" and spec.search is not None:
        raise ConfigError(spec.source, "search", "a search needs Ray: use --launcher slurm", "--launcher slurm")
    root = sweep_dir(spec, out).resolve()
    log_dir = root / SLURM_DIR
    live = _live_entries(root)
    active = sorted({rid for entry in live for rid in entry["runs"]})
    if spec.search is not None and optuna_trial_count(spec, out) >= spec.search.num_samples:
        # The search has all its trials (its job may still be leaving the queue): a driver would have none to ask.
        return Submission([], [], log_dir, active)
    if spec.search is not None:
        drivers = [e["job_id"] for e in live if e["kind"] == "allocation"]
        if drivers:  # a second driver would re-ask the live one's trials and mark them failed
            return Submission([], [], log_dir, active, live_driver=drivers[-1])
    todo = [p for p in pending_runs(spec, out, retry_failed) if p.run_id not in set(active)]
    if spec.search is None and not todo:
        return Submission([], [], log_dir, active)
    _check_partition(cluster)
    root.mkdir(parents=True, exist_ok=True)
    executor = _executor(spec, out, cluster)
    try:
        # submitit prints sbatch's refusal to stderr; the error raised below holds it, as one line
        with contextlib.redirect_stderr(io.StringIO()):
            if launcher == "slurm-array":
                executor.update_parameters(
                    cpus_per_task=max(1, math.ceil(spec.resources.cpu)),
                    gpus_per_node=math.ceil(spec.resources.gpu),
                    slurm_array_parallelism=cluster.array_parallelism,
                    tasks_per_node=1,
                )
                job = RunJob(max(1, math.ceil(spec.resources.cpu)), retry_failed)
                jobs = executor.map_array(job, [p.cfg.to_dict() for p in todo], [str(p.run_dir) for p in todo])
                _record(root, [(j.job_id, "array", [p.run_id]) for j, p in zip(jobs, todo, strict=True)])
            else:
                executor.update_parameters(
                    nodes=cluster.nodes,
                    tasks_per_node=1,
                    cpus_per_task=cluster.cpus_per_node,
                    gpus_per_node=cluster.gpus_per_node,
                    # submitit's step: the head, on the first node only; it starts the workers' steps itself.
                    slurm_srun_args=["--nodes=1", "--ntasks=1"],
                )
                if cluster.nodes > 1:
                    # SLURM ends a whole job when one of its nodes fails; --no-kill keeps the Ray head (and the
                    # sweep) going on the nodes left, which retry the lost node's trials.
                    executor.update_parameters(slurm_additional_parameters={"no_kill": True, **dict(cluster.sbatch)})
                jobs = [executor.submit(AllocationJob(spec, str(Path(out).resolve()), retry_failed, cluster))]
                _record(root, [(jobs[0].job_id, "allocation", [p.run_id for p in todo])])
    except (ConfigError, SlurmError):
        raise
    except Exception as exc:  # submitit wraps sbatch's refusal
        if "sbatch" in str(exc).lower() or isinstance(exc, subprocess.CalledProcessError):
            raise _submission_error(cluster, exc) from None
        raise
    write_spec(spec, root)  # `status` ranks by the sweep's metric, whichever launcher ran it
    return Submission(jobs, [p.run_id for p in todo], log_dir, active)
