"""k-NN entropy estimator: ibbench's knn_entropy against scipy cKDTree, scikit-learn brute force and a matmul.

Every figure is measured in the same run, so ratios hold on a noisy machine. Usage:
    python benchmarks/bench_estimator.py [--quick] [--device cpu|cuda] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import statistics
import sys
import time

import numpy as np
import torch
from scipy.spatial import cKDTree
from scipy.special import digamma, gammaln
from sklearn.neighbors import NearestNeighbors

from ibbench.estimators import knn_entropy


def entropy_from_radii(r: np.ndarray, n: int, d: int, k: int) -> float:
    """The same Kraskov estimate from k-th neighbour distances (float64)."""
    log_vd = 0.5 * d * math.log(math.pi) - gammaln(d / 2 + 1)
    return float(digamma(n) - digamma(k) + log_vd + d * np.mean(np.log(r)))


def ckdtree_entropy(x: np.ndarray, k: int) -> float:
    """As users write it: scipy's defaults, so the query runs on one worker."""
    dist, _ = cKDTree(x).query(x, k=k + 1)
    return entropy_from_radii(dist[:, k], *x.shape, k)


def sklearn_entropy(x: np.ndarray, k: int) -> float:
    nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", n_jobs=-1).fit(x)
    dist, _ = nn.kneighbors(x)
    return entropy_from_radii(dist[:, k], *x.shape, k)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device: str, repeats: int, warmup: bool = True) -> float:
    """Median wall seconds of fn(), after one warm-up call unless warmup is False."""
    if warmup:
        fn()
        sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(device: str, repeats: int) -> float:
    """float32 2048³ matmul rate (GFLOP/s) with TF32 off: the machine's reference for this run."""
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)
    seconds = best_time(lambda: a @ b, device, max(repeats, 5))
    return 2 * 2048**3 / seconds / 1e9


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_child(n: int, d: int, k: int, device: str, queue) -> None:
    torch.manual_seed(0)
    # Warm up on a tiny input (several strips, so every search path runs) before the baseline, so the library
    # code and allocator pools that the first call pulls in are not counted as the estimator's memory.
    tiny = torch.randn(256, d, device=device, requires_grad=True)
    knn_entropy(tiny, k, block_size=64).backward()
    del tiny
    z = torch.randn(n, d, device=device, requires_grad=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        knn_entropy(z, k).backward()
        torch.cuda.synchronize()
        queue.put((torch.cuda.max_memory_allocated() - base) / 2**20)
        return
    # The process's high-water mark still holds the imports' peak; "5" in clear_refs resets it (Linux ≥ 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    base = _status_mib("VmRSS")
    knn_entropy(z, k).backward()
    if reset:
        peak = _status_mib("VmHWM")
    else:  # a lifetime maximum: it can only overstate the peak
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    queue.put(peak - base)


def peak_memory_mib(n: int, d: int, k: int, device: str) -> float:
    """Peak memory (MiB) that one forward+backward adds above the input, measured in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(n, d, k, device, queue))
    proc.start()
    value = queue.get(timeout=600)
    proc.join()
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N ∈ {1024, 4096} only (a smoke test)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    device = args.device
    sizes = [1024, 4096] if args.quick else [1024, 4096, 16384]
    rate = matmul_gflops(device, args.repeats)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print(f"reference: float32 2048³ matmul {rate:.1f} GFLOP/s\n")
    header = (
        f"{'N':>6} {'d':>4} {'k':>3} | {'ibbench fwd':>11} {'fwd+bwd':>9} {'sklearn':>9} {'cKDTree':>9} | "
        f"{'×sklearn':>8} {'×cKDTree':>8} {'%matmul':>7} | {'peak MiB':>8} | {'|ΔH| nats':>9}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for n in sizes:
        for d in (16, 256):
            for k in (1, 10):
                torch.manual_seed(0)
                z = torch.randn(n, d, device=device)
                x = z.double().cpu().numpy()
                zg = z.clone().requires_grad_(True)
                fwd = best_time(lambda z=z, k=k: knn_entropy(z, k), device, args.repeats)
                fwdbwd = best_time(lambda zg=zg, k=k: knn_entropy(zg, k).backward(), device, args.repeats)
                sk = best_time(lambda x=x, k=k: sklearn_entropy(x, k), "cpu", 1 if n > 4096 else args.repeats)
                kd_value = []
                kd = best_time(lambda x=x, k=k, out=kd_value: out.append(ckdtree_entropy(x, k)), "cpu", 1, False)
                ours = float(knn_entropy(z.double(), k))
                delta = abs(ours - kd_value[-1])
                effective = 2 * n * n * d / fwd / 1e9  # the dense search's flops over our forward time
                peak = peak_memory_mib(n, d, k, device)
                row = dict(
                    n=n,
                    d=d,
                    k=k,
                    fwd_s=fwd,
                    fwdbwd_s=fwdbwd,
                    sklearn_s=sk,
                    ckdtree_s=kd,
                    speedup_sklearn=sk / fwd,
                    speedup_ckdtree=kd / fwd,
                    matmul_share=effective / rate,
                    peak_mib=peak,
                    abs_diff_nats=delta,
                    matmul_gflops=rate,
                )
                rows.append(row)
                print(
                    f"{n:>6} {d:>4} {k:>3} | {fwd:>10.4f}s {fwdbwd:>8.4f}s {sk:>8.4f}s {kd:>8.3f}s | "
                    f"{sk / fwd:>7.1f}× {kd / fwd:>7.1f}× {100 * effective / rate:>6.0f}% | {peak:>8.0f} | "
                    f"{delta:>9.1e}",
                    flush=True,
                )
    print(
        "\n×sklearn, ×cKDTree: how many times faster ibbench's forward is. sklearn: NearestNeighbors(brute, "
        "n_jobs=-1), median of the repeats (one run at N > 4096). cKDTree: cKDTree(x).query(x, k + 1) with scipy's "
        "default single worker, one run. Both on float64 input. %matmul: 2N²d flops over the forward time, as a "
        "share of the reference matmul rate (above 100 % is possible: the search scores each pair once). peak: "
        "extra memory of one forward+backward above the input, in a fresh process after a warm-up on a tiny "
        "input, from the high-water mark reset just before the call. |ΔH|: float64 ibbench vs cKDTree estimate."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
