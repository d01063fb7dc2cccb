"""The allocation launcher on one node against two: the time from submission to the first trial running on the
second node, and trials per minute for short digits runs, all measured in this run on the local SLURM's partition
`two` (slurm/local/start.sh --nodes 2). Usage:
    python benchmarks/bench_slurm_nodes.py [--runs N] [--epochs E] [--out DIR]

Three sweeps of the same N runs: one node with C CPUs (the reference), two nodes with C CPUs each (twice the
trial slots), two nodes with C/2 CPUs each (the reference's slots, split over two nodes: what the multi-node layer
itself costs). On slurm/local every node is the same machine, so a second node adds slots, not cores: the
two-node figures here measure overhead and scheduling, not a speed-up that real nodes would bring.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

IBBENCH = str(Path(sys.executable).parent / "ibbench")
BASE = {
    "dataset": "digits",
    "encoder": "mlp",
    "latent_dim": 8,
    "k": 3,
    "batch_size": 100,
    "eval_every": 5,
    "probe_width": 16,
    "augment": False,
    "fgsm_eps": [0.0],
}


def sweep(folder: Path, name: str, runs: int, epochs: int, nodes: int, cpus: int) -> dict:
    """Submit one sweep with --wait; its submission time, end time and each run's host, start and end."""
    spec = folder / f"{name}.yaml"
    spec.write_text(yaml.safe_dump({"name": name, "base": {**BASE, "epochs": epochs},
                                    "grid": {"seed": list(range(runs))}, "resources": {"cpu": 1}}))  # fmt: skip
    cluster = folder / f"{name}-cluster.yaml"
    cluster.write_text(yaml.safe_dump({"partition": "two", "nodes": nodes, "cpus_per_node": cpus, "time_min": 30}))
    out = folder / "out"
    submitted = time.time()
    proc = subprocess.run([IBBENCH, "sweep", str(spec), "--launcher", "slurm", "--cluster", str(cluster), "--out",
                           str(out), "--wait"], capture_output=True, text=True)  # fmt: skip
    ended = time.time()
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    spans = []
    for summary in (out / name).glob("*/summary.json"):
        s = json.loads(summary.read_text())
        start, end = (datetime.fromisoformat(s[k]).timestamp() for k in ("started", "finished"))
        spans.append((s["hostname"], start, end))
    assert len(spans) == runs, f"{name}: {len(spans)} of {runs} runs have a summary"
    return {"submitted": submitted, "ended": ended, "spans": spans}


def rates(result: dict) -> tuple[float, float]:
    """Trials per minute: end to end (submission to the command's return), and while trials ran."""
    spans = result["spans"]
    first, last = min(s for _, s, _ in spans), max(e for _, _, e in spans)
    return 60 * len(spans) / (result["ended"] - result["submitted"]), 60 * len(spans) / (last - first)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=12, help="runs per sweep (seeds)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs (trial slots) of the one-node reference")
    parser.add_argument("--out", help="keep the sweeps here (default: a temporary folder)")
    args = parser.parse_args()
    up = subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "slurm/local/status.sh"), "--nodes", "2"],
                        capture_output=True, text=True)  # fmt: skip
    if up.returncode != 0:
        sys.exit(f"needs the local two-node SLURM (slurm/local/start.sh --nodes 2): {up.stdout.strip()}")
    folder = Path(args.out or tempfile.mkdtemp(prefix="bench-slurm-nodes-"))
    folder.mkdir(parents=True, exist_ok=True)
    cases = [("one", 1, args.cpus), ("two", 2, args.cpus), ("two_split", 2, max(1, args.cpus // 2))]
    results = {}
    for name, nodes, cpus in cases:
        results[name] = sweep(folder, f"bench-{name}", args.runs, args.epochs, nodes, cpus)
        e2e, running = rates(results[name])
        hosts = sorted({h for h, _, _ in results[name]["spans"]})
        print(f"{name:9s} nodes={nodes} cpus/node={cpus}: {e2e:5.1f} trials/min end to end, {running:5.1f} while "
              f"running; {len(results[name]['spans'])} runs on {','.join(hosts)}", flush=True)  # fmt: skip
    second = results["two"]
    hosts = sorted({h for h, _, _ in second["spans"]})
    on_second = [s for h, s, _ in second["spans"] if h == hosts[-1]]
    print(f"submission to the first trial running on the second node ({hosts[-1]}): "
          f"{min(on_second) - second['submitted']:.1f} s (to the first trial on any node: "
          f"{min(s for _, s, _ in second['spans']) - second['submitted']:.1f} s)")  # fmt: skip
    reference = rates(results["one"])
    for name in ("two", "two_split"):
        e2e, running = rates(results[name])
        print(f"ratio {name}/one trials/min: {e2e / reference[0]:.2f} end to end, {running / reference[1]:.2f} while "
              f"running")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
