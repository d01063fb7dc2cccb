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
# Rows per strip of the symmetric search (measured on a 2-core CPU at N = 1024–16384, d = 16–256): shorter strips
# skip more of the lower triangle, taller ones run the matmul and the reductions at a better rate.
_STRIP_ROWS = 512
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
    """Rows per search strip: the measured best height, lowered so one (rows × N) score strip stays ≤ 128 MB."""
    return max(1, min(n, _STRIP_ROWS, _BLOCK_BYTES // max(1, n * itemsize)))


def _augmented(zc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [−2a, 1, ‖a‖²] and rows [b, ‖b‖², 1]: one matmul a_aug @ b_aug.T yields ‖a‖² + ‖b‖² − 2ab."""
    ones = torch.ones(zc.shape[0], 1, dtype=zc.dtype, device=zc.device)
    sq = (zc * zc).sum(1, keepdim=True)
    return torch.cat([-2.0 * zc, ones, sq], 1), torch.cat([zc, sq, ones], 1)


class _KSmallest:
    """Each row's k smallest squared distances seen so far and their sample indices, ascending."""

    def __init__(self, n: int, k: int, like: torch.Tensor) -> None:
        self.k = k
        self.values = torch.full((n, k), math.inf, dtype=like.dtype, device=like.device)
        self.indices = torch.zeros((n, k), dtype=torch.long, device=like.device)

    def bound(self, rows: slice) -> torch.Tensor:
        """The k-th smallest so far: a candidate must be below it to enter."""
        return self.values[rows, -1]

    def offer(self, rows: slice | torch.Tensor, scores: torch.Tensor, first_sample: int) -> None:
        """Merge candidates from scores (one row per given row; column c is sample first_sample + c)."""
        if self.k == 1:
            values, cols = scores.min(1, keepdim=True)
            better = values < self.values[rows]
            self.values[rows] = torch.where(better, values, self.values[rows])
            self.indices[rows] = torch.where(better, cols + first_sample, self.indices[rows])
            return
        # A strip narrower than k offers all its columns; the merge below keeps the k best.
        values, cols = torch.topk(scores, min(self.k, scores.shape[1]), dim=1, largest=False)
        values = torch.cat([self.values[rows], values], 1)
        indices = torch.cat([self.indices[rows], cols + first_sample], 1)
        values, order = torch.topk(values, self.k, dim=1, largest=False)  # sorted ascending
        self.values[rows] = values
        self.indices[rows] = indices.gather(1, order)


def _symmetric_search(rows_aug: torch.Tensor, cols_aug: torch.Tensor, k: int, strip: int) -> torch.Tensor:
    """Index of every sample's k-th nearest other sample, scoring each pair once.

    Strip s holds rows [i0, i1) against samples [i0, N): its rows give candidates to samples [i0, i1) and its
    columns beyond the diagonal block give candidates to samples [i1, N), so only the upper triangle is computed.
    """
    n = rows_aug.shape[0]
    best = _KSmallest(n, k, rows_aug)
    for i0 in range(0, n, strip):
        i1 = min(i0 + strip, n)
        scores = rows_aug[i0:i1] @ cols_aug[i0:].t()  # (i1 − i0, N − i0) full squared distances
        scores.diagonal().fill_(math.inf)  # self-pairs masked by index
        best.offer(slice(i0, i1), scores, i0)
        if i1 == n:
            break
        below = scores[:, i1 - i0 :]  # pairs (i, j) with i in this strip, j ≥ i1: candidates for the j
        # Reducing along dim 0 is slow for topk and argmin but fast for amin: find the columns that can improve
        # their sample's k-th distance, and give only those a row-wise pass (late strips improve few).
        improves = (below.amin(0) < best.bound(slice(i1, n))).nonzero().squeeze(1)
        if improves.numel():
            best.offer(improves + i1, below.t()[improves], i0)
    return best.indices[:, k - 1]


def _rows_search(
    rows_aug: torch.Tensor, row_ids: torch.Tensor, cols_aug: torch.Tensor, k: int, block_size: int
) -> torch.Tensor:
    """Index of the k-th nearest other sample for the given rows only, in (block_size × N) score blocks."""
    out = torch.empty(row_ids.numel(), dtype=torch.long, device=rows_aug.device)
    for start in range(0, row_ids.numel(), block_size):
        ids = row_ids[start : start + block_size]
        scores = rows_aug[ids] @ cols_aug.t()
        scores[torch.arange(ids.numel(), device=ids.device), ids] = math.inf  # self-pairs masked by index
        if k == 1:
            out[start : start + ids.numel()] = scores.argmin(1)
        else:
            out[start : start + ids.numel()] = torch.topk(scores, k, dim=1, largest=False).indices[:, k - 1]
    return out


def knn_neighbours(z: torch.Tensor, k: int = 1, block_size: int | None = None) -> torch.Tensor:
    """Index (N,) of each sample's k-th nearest other sample (Euclidean), found without gradient.

    The search scores samples in strips of block_size rows against the N samples (a score matrix of at most
    block_size × N); block_size=None picks the measured best height, capped so a strip stays near 128 MB.
    """
    _check_input(z, k)
    with torch.no_grad(), _exact_matmul(z.device):
        search_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        zc = z.detach().to(search_dtype)
        zc = zc - zc.mean(0, keepdim=True)  # centring keeps ‖a‖² small next to the distances
        n = zc.shape[0]
        block = block_size or default_block_size(n, zc.element_size())
        index = _symmetric_search(*_augmented(zc), k, block)
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
                rows64 = (block_size // 2 or 1) if block_size else default_block_size(n, 8)
                index[rows] = _rows_search(a64, rows, b64, k, rows64)
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
