"""Differentiable k-nearest-neighbour entropy estimators (nats) and zero-entropy latent noise.

H(Z) ≈ ψ(N) − ψ(k) + log V_d + (d / 2N) Σ_i log r_i², with r_i the Euclidean distance from z_i to its k-th
nearest other sample and V_d = π^{d/2} / Γ(d/2 + 1) the unit ball's volume: Kraskov et al. (2004) eq. 20 with
ε = 2r and c_d = V_d / 2^d. The paper's eq. 11 prints −ψ(N), a sign typo (see ../shared/DESIGN.md).

The neighbour search runs without gradient in row blocks scored by one matmul each; the selected pairs' squared
distances are then recomputed from the inputs with gradient, so the backward pass touches N·k pairs, not N².
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

ZERO_ENTROPY_STD = (2 * math.pi * math.e) ** -0.5  # N(0, σ²I) with σ² = 1/(2πe) has differential entropy 0

# Score-matrix budget per block: large enough that the matmul dominates, small enough for a laptop.
_BLOCK_BYTES = 128 * 2**20
# A row's float32 search is trusted only when its k-th squared distance is this many float32 rounding units
# above the cancellation error of ‖a‖² + ‖b‖² − 2ab; other rows are searched again in float64.
_SEARCH_SAFETY = 1e4


def log_unit_ball_volume(d: int) -> float:
    """log V_d, the log volume of the d-dimensional Euclidean unit ball."""
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)


def add_zero_entropy_noise(z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z + ε with ε ~ N(0, I/(2πe)), so H(ε) = 0 and H(z + ε) ≥ 0 nats; same shape and dtype as z."""
    noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return z + ZERO_ENTROPY_STD * noise


def _check_input(z: torch.Tensor, k: int, what: str = "z") -> None:
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"{what} must be a 2-D tensor (N samples, d dims), got shape {shape}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer ≥ 1, got {k!r}")
    n = z.shape[0]
    if k >= n:
        raise ValueError(f"k = {k} needs at least k + 1 = {k + 1} samples, {what} has N = {n}")
    if not z.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {z.dtype}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError(f"{what} holds non-finite values (nan or inf)")


@contextlib.contextmanager
def _exact_matmul(device: torch.device) -> Iterator[None]:
    """Keep TF32 and autocast off for the search: a 10-bit mantissa picks the wrong neighbours."""
    with torch.autocast(device_type=device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous


def default_block_size(n: int, itemsize: int = 4) -> int:
    """Rows per search block so one (block × N) score matrix stays near 128 MB."""
    return max(1, min(n, _BLOCK_BYTES // max(1, n * itemsize)))


def _augmented(zc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [−2a, 1] and columns [b, ‖b‖²], so one matmul yields ‖b‖² − 2ab with no bias-copy pass."""
    ones = torch.ones(zc.shape[0], 1, dtype=zc.dtype, device=zc.device)
    sq = (zc * zc).sum(1, keepdim=True)
    return torch.cat([-2.0 * zc, ones], 1), torch.cat([zc, sq], 1).t().contiguous()


def _kth_neighbour_search(
    rows_aug: torch.Tensor, row_ids: torch.Tensor, cols_aug_t: torch.Tensor, k: int, block_size: int
) -> torch.Tensor:
    """Index of the k-th nearest other sample for each given row; ‖a‖² is constant along a row, so omitted."""
    out = torch.empty(row_ids.numel(), dtype=torch.long, device=rows_aug.device)
    for start in range(0, row_ids.numel(), block_size):
        ids = row_ids[start : start + block_size]
        scores = rows_aug[ids] @ cols_aug_t
        scores[torch.arange(ids.numel(), device=ids.device), ids] = math.inf  # self-pairs masked by index
        if k == 1:
            out[start : start + ids.numel()] = scores.argmin(1)
        else:
            out[start : start + ids.numel()] = torch.topk(scores, k, dim=1, largest=False).indices[:, k - 1]
    return out


def knn_neighbours(z: torch.Tensor, k: int = 1, block_size: int | None = None) -> torch.Tensor:
    """Index (N,) of each sample's k-th nearest other sample (Euclidean), found without gradient."""
    _check_input(z, k)
    with torch.no_grad(), _exact_matmul(z.device):
        search_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        zc = z.detach().to(search_dtype)
        zc = zc - zc.mean(0, keepdim=True)  # centring keeps ‖a‖² small next to the distances
        n = zc.shape[0]
        block = block_size or default_block_size(n, zc.element_size())
        all_rows = torch.arange(n, device=z.device)
        rows_aug, cols_aug_t = _augmented(zc)
        index = _kth_neighbour_search(rows_aug, all_rows, cols_aug_t, k, block)
        if search_dtype == torch.float32:
            # The expanded form's rounding error scales with ‖a‖² + ‖b‖². Rows whose neighbour distance is
            # not far above it (tight clusters far from the centre; low d with large N) are searched again
            # in float64, where that error is 2⁻²⁹ times smaller.
            sq = (zc * zc).sum(1)
            exact = (zc - zc[index]).pow(2).sum(1)
            unsure = exact <= _SEARCH_SAFETY * torch.finfo(torch.float32).eps * (sq + sq.max())
            if bool(unsure.any()):
                rows = unsure.nonzero().squeeze(1)
                z64 = z.detach().to(torch.float64)
                a64, b64 = _augmented(z64 - z64.mean(0, keepdim=True))
                index[rows] = _kth_neighbour_search(a64, rows, b64, k, block // 2 or 1)
    return index


def knn_entropy(z: torch.Tensor, k: int = 1, block_size: int | None = None) -> torch.Tensor:
    """Kozachenko–Leonenko/Kraskov entropy of samples z (N, d) in nats; a differentiable 0-d tensor."""
    _check_input(z, k)
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()  # bf16/fp16 latents under autocast: the estimator itself stays in float32
    n, d = z.shape
    index = knn_neighbours(z, k, block_size)
    with torch.autocast(device_type=z.device.type, enabled=False):
        # Differences of the raw inputs are exact for close pairs (Sterbenz), unlike the expanded form.
        r2 = (z - z[index]).pow(2).sum(1)
        # Only duplicates reach the floor; it keeps log finite and its gradient zero there.
        r2 = r2.clamp_min(torch.finfo(z.dtype).tiny)
        const = torch.special.digamma(torch.tensor(float(n), dtype=torch.float64)) - torch.special.digamma(
            torch.tensor(float(k), dtype=torch.float64)
        )
        const = float(const) + log_unit_ball_volume(d)
        return const + 0.5 * d * torch.log(r2).mean()


def conditional_knn_entropy(
    z: torch.Tensor, y: torch.Tensor, k: int = 1, block_size: int | None = None
) -> torch.Tensor:
    """H[Z|Y] = Σ_y p̂(y) H[Z | Y=y] over the classes present in y (N,), nats; a differentiable 0-d tensor."""
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != z.shape[0]:
        raise ValueError(f"y must be a 1-D tensor with one label per row of z (N = {z.shape[0]})")
    classes, counts = torch.unique(y, return_counts=True)
    n = y.shape[0]
    terms = []
    for label, count in zip(classes.tolist(), counts.tolist(), strict=True):
        if count <= k:
            raise ValueError(
                f"class {label} has {count} samples in this batch; the k-NN estimate of H[Z|Y={label}] needs "
                f"more than k = {k}"
            )
        terms.append((count / n) * knn_entropy(z[y == label], k, block_size))
    return torch.stack(terms).sum()
