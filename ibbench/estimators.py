"""Differentiable k-nearest-neighbour entropy estimators (nats) and zero-entropy latent noise.

H(Z) ≈ ψ(N) − ψ(k) + log V_d + (d / 2N) Σ_i log r_i², with r_i the Euclidean distance from z_i to its k-th
nearest other sample and V_d = π^{d/2} / Γ(d/2 + 1) the unit ball's volume: Kraskov et al. (2004) eq. 20 with
ε = 2r and c_d = V_d / 2^d. The paper's eq. 11 prints −ψ(N), a sign typo (see ../shared/DESIGN.md).

The neighbour search runs without gradient in strips of rows scored by one matmul each, over the upper triangle of
the distance matrix only (each pair is scored once and serves both of its samples); the selected pairs' squared
distances are then recomputed from the inputs with gradient, so the backward pass touches N·k pairs, not N².
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch

ZERO_ENTROPY_STD = (2 * math.pi * math.e) ** -0.5  # N(0, σ²I) with σ² = 1/(2πe) has differential entropy 0

# Score-matrix budget per block: large enough that the matmul dominates, small enough for a laptop.
_BLOCK_BYTES = 128 * 2**20
# Rows per strip of the symmetric search, measured on a 2-core CPU at N = 1024–16384, d = 16–256 (384–768 were
# within a few per cent of each other): shorter strips skip more of the lower triangle, taller ones pay less
# per-strip overhead.
_STRIP_ROWS = 512
# A row's float32 search is trusted only when its k-th squared distance is this many float32 rounding units
# above the cancellation error of ‖a‖² + ‖b‖² − 2ab; other rows are searched again in float64.
_SEARCH_SAFETY = 1e4
# Up to this many samples, knn_entropy scores all pairs in one dense matmul (4 MB of scores at most).
_DENSE_ROWS = 1024
# A strip's columns are screened by the minima of groups of this many rows (measured: 8–16 best).
_SCREEN_ROWS = 16


@functools.lru_cache(maxsize=1024)
def _digamma(n: int) -> float:
    """ψ(n) = −γ + Σ_{i<n} 1/i for an integer n ≥ 1, exactly summed, on the host (no tensor, so no device sync)."""
    return math.fsum([-0.5772156649015329, *(1.0 / i for i in range(1, n))])


def log_unit_ball_volume(d: int) -> float:
    """log V_d, the log volume of the d-dimensional Euclidean unit ball."""
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)


def add_zero_entropy_noise(z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z + ε with ε ~ N(0, I/(2πe)), so H(ε) = 0 and H(z + ε) ≥ 0 nats; same shape and dtype as z."""
    noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return z + ZERO_ENTROPY_STD * noise


def _check_input(z: torch.Tensor, k: int, what: str = "z", finite: bool = True) -> None:
    """Shapes, k and dtype (no device sync); with finite, also that z holds no nan or inf (one sync)."""
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
    if finite and not bool(torch.isfinite(z).all()):
        raise ValueError(f"{what} holds non-finite values (nan or inf)")


@contextlib.contextmanager
def _exact_matmul(device: torch.device) -> Iterator[None]:
    """Keep TF32 and autocast off for the search: a 10-bit mantissa picks the wrong neighbours.

    Through torch's fp32_precision setting where it exists (torch ≥ 2.9): reading the legacy allow_tf32 flag
    raises once a process has used the new API.
    """
    with torch.autocast(device_type=device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        matmul = torch.backends.cuda.matmul
        new_api = hasattr(matmul, "fp32_precision")
        previous = matmul.fp32_precision if new_api else matmul.allow_tf32
        if new_api:
            matmul.fp32_precision = "ieee"
        else:
            matmul.allow_tf32 = False
        try:
            yield
        finally:
            if new_api:
                matmul.fp32_precision = previous
            else:
                matmul.allow_tf32 = previous


def _unit_scale(zc: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """zc divided by its largest |entry| over dims: neighbours are unchanged, and float32 products of latents that
    collapsed to 1e-20 no longer underflow."""
    scale = zc.abs().amax(dims, keepdim=True)
    return zc / torch.where(scale > 0, scale, torch.ones_like(scale))


def default_block_size(n: int, itemsize: int = 4) -> int:
    """Rows per search strip: the measured best height, lowered so one (rows × N) score strip stays ≤ 128 MB."""
    return max(1, min(n, _STRIP_ROWS, _BLOCK_BYTES // max(1, n * itemsize)))


def _augmented(zc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [−2a, 1, ‖a‖²] and rows [b, ‖b‖², 1]: one matmul a_aug @ b_aug.T yields ‖a‖² + ‖b‖² − 2ab."""
    ones = torch.ones(zc.shape[0], 1, dtype=zc.dtype, device=zc.device)
    sq = (zc * zc).sum(1, keepdim=True)
    return torch.cat([-2.0 * zc, ones, sq], 1), torch.cat([zc, sq, ones], 1)


def _smallest(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The min(k, width) smallest values of each row of x, ascending, and their columns."""
    if k == 1:
        return x.min(1, keepdim=True)
    return torch.topk(x, min(k, x.shape[1]), dim=1, largest=False)


class _KSmallest:
    """Each row's k smallest squared distances seen so far and their sample indices, ascending."""

    def __init__(self, n: int, k: int, like: torch.Tensor) -> None:
        self.k = k
        self.values = torch.full((n, k), math.inf, dtype=like.dtype, device=like.device)
        self.indices = torch.zeros((n, k), dtype=torch.long, device=like.device)

    def bound(self, rows: slice) -> torch.Tensor:
        """The k-th smallest so far: a candidate must be below it to enter."""
        return self.values[rows, -1]

    def offer(self, rows: slice | torch.Tensor, scores: torch.Tensor, indices: torch.Tensor | int) -> None:
        """Candidates for the given rows: one row of scores each, column c against sample indices[:, c] (an index
        tensor shaped like scores) or sample indices + c (an int)."""
        values, cols = _smallest(scores, self.k)
        cols = cols + indices if isinstance(indices, int) else indices.gather(1, cols)
        if self.k == 1:
            better = values < self.values[rows]
            self.values[rows] = torch.where(better, values, self.values[rows])
            self.indices[rows] = torch.where(better, cols, self.indices[rows])
            return
        values = torch.cat([self.values[rows], values], 1)
        cols = torch.cat([self.indices[rows], cols], 1)
        values, order = torch.topk(values, self.k, dim=1, largest=False)  # sorted ascending
        self.values[rows] = values
        self.indices[rows] = cols.gather(1, order)

    def offer_pairs(self, rows: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
        """Scattered candidates: values[m] is the squared distance from sample rows[m] to sample indices[m]."""
        if rows.numel() == 0:
            return
        rows, order = torch.sort(rows, stable=True)
        touched, counts = torch.unique_consecutive(rows, return_counts=True)
        # Lay each row's candidates out in one row of a padded (touched rows × most candidates) matrix.
        group = torch.repeat_interleave(torch.arange(touched.numel(), device=rows.device), counts)
        slot = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[group]
        width = int(counts.max())
        padded = values.new_full((touched.numel(), width), math.inf)
        padded_indices = indices.new_zeros((touched.numel(), width))
        padded[group, slot] = values[order]
        padded_indices[group, slot] = indices[order]
        self.offer(touched, padded, padded_indices)


def _symmetric_search(
    rows_aug: torch.Tensor, cols_aug: torch.Tensor, k: int, strip: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's k-th nearest other sample and its squared distance as scored, scoring each pair once.

    The strip of rows [i0, i1) is scored against samples [i0, N) only: the upper triangle, about half the
    matmul of a full search. Its rows give samples [i0, i1) their candidates among [i0, N) (a row-wise min or
    topk, fast). Its columns right of the diagonal block give each later sample j its candidates among [i0, i1);
    a column-wise min or topk (or a transposed copy) would cost as much as the matmul saved, but strips run
    bottom-up, so j has already seen all of [i1, N) and only the few entries below its k-th distance so far
    can enter. Those are found by comparing that bound with the minima of groups of 16 rows (a column-wise amin,
    which vectorises well), then with the entries of the groups that pass.
    """
    n = rows_aug.shape[0]
    best = _KSmallest(n, k, rows_aug)
    buffer = rows_aug.new_empty(min(strip, n) * n)  # one allocation: fresh pages for every strip cost time
    for i0 in reversed(range(0, n, strip)):
        i1 = min(i0 + strip, n)
        rows, width = i1 - i0, n - i0
        scores = torch.mm(rows_aug[i0:i1], cols_aug[i0:].t(), out=buffer[: rows * width].view(rows, width))
        scores.diagonal().fill_(math.inf)  # self-pairs masked by index
        best.offer(slice(i0, i1), scores, i0)
        if i1 == n:
            continue
        right = scores[:, rows:]  # (i, j) holds sample i0 + i against sample i1 + j
        bound = best.bound(slice(i1, n))
        group = math.gcd(rows, _SCREEN_ROWS)  # a divisor of the strip height: 16 for the default heights
        grouped = right.unflatten(0, (-1, group))  # (cell, t, j) holds sample i0 + cell · group + t against i1 + j
        cells, j = (grouped.amin(1) < bound).nonzero(as_tuple=True)
        values = grouped[cells, :, j]  # (passing cells, group)
        c, t = (values < bound[j].unsqueeze(1)).nonzero(as_tuple=True)
        best.offer_pairs(j[c] + i1, values[c, t], cells[c] * group + t + i0)
    return best.indices[:, k - 1], best.values[:, k - 1]


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

    block_size bounds the score matrix to block_size rows × N columns (block_size // 2 rows in the float64
    re-search of unsure rows). block_size=None uses 512 rows (measured best), fewer where N is so large that a
    strip would exceed 128 MB.
    """
    _check_input(z, k)
    with torch.no_grad(), _exact_matmul(z.device):
        search_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        zc = z.detach().to(search_dtype)
        zc = _unit_scale(zc - zc.mean(0, keepdim=True), (0, 1))  # centring keeps ‖a‖² small next to the distances
        n = zc.shape[0]
        block = block_size or default_block_size(n, zc.element_size())
        rows_aug, cols_aug = _augmented(zc)
        index, found = _symmetric_search(rows_aug, cols_aug, k, block)
        if search_dtype == torch.float32:
            # The expanded form's rounding error scales with ‖a‖² + ‖b‖². Rows whose neighbour distance (as
            # scored, so off by at most that error) is not far above it (tight clusters far from the centre; low d
            # with large N) are searched again in float64, where that error is 2⁻²⁹ times smaller.
            sq = cols_aug[:, -2]
            unsure = found <= _SEARCH_SAFETY * torch.finfo(torch.float32).eps * (sq + sq.max())
            if bool(unsure.any()):
                rows = unsure.nonzero().squeeze(1)
                z64 = z.detach().to(torch.float64)
                a64, b64 = _augmented(_unit_scale(z64 - z64.mean(0, keepdim=True), (0, 1)))
                rows64 = (block_size // 2 or 1) if block_size else default_block_size(n, 8)
                index[rows] = _rows_search(a64, rows, b64, k, rows64)
    return index


# Two float32 latents of magnitude |z| that differ at all differ by at least about eps₃₂·|z| per coordinate.
_RESOLUTION = torch.finfo(torch.float32).eps


def _entropy_of_neighbours(z: torch.Tensor, neighbours: torch.Tensor, n: int, k: int, d: int) -> torch.Tensor:
    """ψ(N) − ψ(k) + log V_d + (d/2N) Σ log r_i² over the last two dims of z and its k-th neighbours (…, N, d).

    Precision-safe: r² is taken from differences of the inputs in float64 (exact for float32 and bf16-produced
    latents, and no underflow for latents collapsed to 1e-20), and floored at d·(eps₃₂)²·mean(z²), the squared
    distance below which two float32 latents of that magnitude cannot differ, rather than at a dtype's `tiny`.
    So exact duplicates (a collapsed batch without noise) count the same in float32, float64 and bf16 runs and
    keep a finite, zero gradient, and the result does not depend on the dtype. Returned in z's dtype.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        z64, nb64 = z.double(), neighbours.double()
        r2 = (z64 - nb64).pow(2).sum(-1)
        magnitude = z64.detach().pow(2).mean((-2, -1))
        floor = d * _RESOLUTION**2 * torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude))
        const = math.fsum([_digamma(n), -_digamma(k), log_unit_ball_volume(d)])
        out = const + 0.5 * d * torch.log(torch.maximum(r2, floor.unsqueeze(-1))).mean(-1)
    return out.to(z.dtype if z.dtype in (torch.float32, torch.float64) else torch.float32)


def knn_entropy(z: torch.Tensor, k: int = 1, block_size: int | None = None, validate: bool = True) -> torch.Tensor:
    """Kozachenko–Leonenko/Kraskov entropy of samples z (N, d) in nats; a differentiable 0-d tensor.

    validate=False skips the check for nan/inf (a device sync): the training loop checks its losses itself.
    """
    _check_input(z, k, finite=validate)
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()  # bf16/fp16 latents under autocast: the estimator itself stays in float32
    n, d = z.shape
    if block_size is None and n <= _DENSE_ROWS:
        # A training batch: one dense (N × N) search has far fewer ops than the strip search, which pays off
        # only when the score matrix is large.
        dense = _grouped_knn_entropy(z.unsqueeze(0), k)
        if dense is not None:
            return dense[0]
    index = knn_neighbours(z, k, block_size)
    return _entropy_of_neighbours(z, z[index], n, k, d)


def _grouped_knn_entropy(zg: torch.Tensor, k: int) -> torch.Tensor | None:
    """Entropies (G,) of G equal-size groups zg (G, n, d) from one batched search, or None if a row needs the
    float64 re-search (then the caller estimates group by group)."""
    g, n, d = zg.shape
    with torch.no_grad(), _exact_matmul(zg.device):
        zc = zg.detach()
        zc = _unit_scale(zc - zc.mean(1, keepdim=True), (1, 2))
        sq = (zc * zc).sum(2)  # (G, n)
        scores = torch.baddbmm(sq.unsqueeze(1), zc, zc.transpose(1, 2), alpha=-2.0)  # ‖b‖² − 2ab, row term omitted
        scores.diagonal(dim1=1, dim2=2).fill_(math.inf)  # self-pairs masked by index
        found, index = torch.topk(scores, k, dim=2, largest=False)
        found, index = found[..., k - 1] + sq, index[..., k - 1]  # (G, n)
        if zg.dtype == torch.float32:
            unsure = found <= _SEARCH_SAFETY * torch.finfo(torch.float32).eps * (sq + sq.amax(1, keepdim=True))
            if bool(unsure.any()):
                return None
    neighbours = torch.gather(zg, 1, index.unsqueeze(2).expand(-1, -1, d))
    return _entropy_of_neighbours(zg, neighbours, n, k, d)


def conditional_knn_entropy(
    z: torch.Tensor,
    y: torch.Tensor,
    k: int = 1,
    block_size: int | None = None,
    *,
    balanced_classes: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """H[Z|Y] = Σ_y p̂(y) H[Z | Y=y] over the classes present in y (N,), nats; a differentiable 0-d tensor.

    Class-balanced batches (every class the same count, score tensor within the block budget) are estimated in
    one batched search instead of a loop over classes. A caller that knows its batch holds balanced_classes
    classes of N / balanced_classes samples each (the training loader's batches) passes it: then neither the
    labels nor the values are read on the host, and a training step costs no device sync here beyond the search's
    precision check. validate=False skips the nan/inf check.
    """
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != z.shape[0]:
        raise ValueError(f"y must be a 1-D tensor with one label per row of z (N = {z.shape[0]})")
    n = y.shape[0]
    if balanced_classes is not None:
        if balanced_classes < 1 or n % balanced_classes or n // balanced_classes <= k:
            raise ValueError(f"a batch of {n} does not split into {balanced_classes} classes of more than k = {k}")
        sizes = [n // balanced_classes] * balanced_classes
    else:
        classes, counts = torch.unique(y, return_counts=True)
        sizes = counts.tolist()
        for label, count in zip(classes.tolist(), sizes, strict=True):
            if count <= k:
                raise ValueError(
                    f"class {label} has {count} samples in this batch; the k-NN estimate of H[Z|Y={label}] needs "
                    f"more than k = {k}"
                )
    if len(set(sizes)) == 1 and len(sizes) * sizes[0] ** 2 * z.element_size() <= _BLOCK_BYTES:
        _check_input(z, k, finite=validate)
        zf = z if z.dtype in (torch.float32, torch.float64) else z.float()
        grouped = zf[torch.argsort(y, stable=True)].reshape(len(sizes), sizes[0], z.shape[1])
        entropies = _grouped_knn_entropy(grouped, k)
        if entropies is not None:
            return entropies.mean()  # equal counts: p̂(y) = 1/C
    classes, counts = torch.unique(y, return_counts=True)
    terms = [
        (count / n) * knn_entropy(z[y == label], k, block_size, validate)
        for label, count in zip(classes.tolist(), counts.tolist(), strict=True)
    ]
    return torch.stack(terms).sum()


def kde_mutual_information(h: torch.Tensor, noise_var: float | torch.Tensor, bound: str = "upper") -> torch.Tensor:
    """Pairwise-distance bound on I(X; Z), Z = h(X) + N(0, σ² I), X uniform over the N rows of h (N, d); nats.

    Kolchinsky & Tracey (2017): with equal-covariance Gaussian components, H(Z) − H(Z|X) is bounded above by
    −(1/N) Σ_i log (1/N) Σ_j exp(−KL_ij), KL_ij = ‖h_i − h_j‖² / (2σ²) (the KDE estimator of the nonlinear-IB
    paper), and below by the same with the Bhattacharyya distance ‖h_i − h_j‖² / (8σ²). Both lie in [0, log N].
    Differentiable in h (and in σ² when it is a tensor).
    """
    if bound not in ("upper", "lower"):
        raise ValueError(f"bound must be 'upper' or 'lower', got {bound!r}")
    if h.dim() != 2 or h.shape[0] < 1:
        raise ValueError(f"h must be a 2-D tensor (N ≥ 1 samples, d dims), got shape {tuple(h.shape)}")
    n = h.shape[0]
    # The expanded ‖a‖² + ‖b‖² − 2ab of centred codes: one matmul. Its rounding only touches tiny distances,
    # whose terms exp(−d²/scale) ≈ 1 it cannot change; the neighbour search's cancellation problem does not arise.
    hc = h - h.mean(0, keepdim=True)
    sq = (hc * hc).sum(1)
    with torch.autocast(device_type=h.device.type, enabled=False):
        d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * hc @ hc.t()).clamp_min(0.0)
    scale = (2.0 if bound == "upper" else 8.0) * noise_var
    return math.log(n) - torch.logsumexp(-d2 / scale, dim=1).mean()
