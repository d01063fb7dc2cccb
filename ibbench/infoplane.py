"""H[Y|Z] for the information plane by K-fold cross-fitting: K ResFC probes trained at once, each scored on the
fold of latents it never saw, so the estimate is a held-out cross-entropy (an upper bound on H[Y|Z] in
expectation), not the in-sample fit the paper reports. Pure tensor code; nothing here touches the disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-5
BN_MOMENTUM = 0.1


class GroupedResFC(nn.Module):
    """K independent copies of the paper's ResFC decoder evaluated as one: inputs (K, B, d) -> logits (K, B, C).

    Each copy is Linear(d→w), `blocks` residual blocks x + (BN-ReLU-Linear-BN-ReLU-Linear)(x), BN, Linear(w→C), as
    in decoders.ResFCDecoder; the copies share no parameter, so summing their losses trains them independently
    (Adam's per-element steps included) while each step is a handful of batched matmuls instead of K networks.
    Activations are laid out (K, features, B): a linear layer is one baddbmm, and a batch norm over every copy's
    own batch is one fused batch_norm on the free view (1, K·features, B), with no transposes between layers.
    """

    def __init__(self, groups: int, d: int, classes: int, width: int, blocks: int, generator: torch.Generator):
        super().__init__()
        self.groups, self.width, self.blocks = groups, width, blocks
        linears = [(d, width)] + [(width, width)] * (2 * blocks) + [(width, classes)]
        # nn.Linear's default initialisation, U(±1/√fan_in) for weights and biases, drawn from the generator.
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in linears:
            bound = 1.0 / math.sqrt(fan_in)
            w = (torch.rand(groups, fan_out, fan_in, generator=generator) * 2 - 1) * bound
            b = (torch.rand(groups, fan_out, 1, generator=generator) * 2 - 1) * bound
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))
        norms = 2 * blocks + 1  # two per block and one before the output layer
        # Batch-norm parameters and statistics per copy and unit, laid out (norm, copy, unit).
        self.gammas = nn.Parameter(torch.ones(norms, groups, width))
        self.betas = nn.Parameter(torch.zeros(norms, groups, width))
        self.register_buffer("running_mean", torch.zeros(norms, groups, width))
        self.register_buffer("running_var", torch.ones(norms, groups, width))

    def _norm(self, i: int, x: torch.Tensor, g: slice) -> torch.Tensor:
        """Batch norm i of copies g over their own batches: x (G, w, B) as G·w channels of B samples."""
        copies, width, batch = x.shape
        # Views of contiguous slices: batch_norm updates the running statistics in place through them.
        mean = self.running_mean[i, g].reshape(-1)
        var = self.running_var[i, g].reshape(-1)
        out = F.batch_norm(x.reshape(1, copies * width, batch), mean, var, self.gammas[i, g].reshape(-1),
                           self.betas[i, g].reshape(-1), self.training, BN_MOMENTUM, BN_EPS)  # fmt: skip
        return out.view(copies, width, batch)

    def _linear(self, i: int, x: torch.Tensor, g: slice) -> torch.Tensor:
        return torch.baddbmm(self.biases[i][g], self.weights[i][g], x)

    def forward(self, x: torch.Tensor, group: int | None = None) -> torch.Tensor:
        """(K, B, d) standardised latents -> (K, B, C) logits; with group=j, copy j alone: (B, d) -> (B, C)."""
        g = slice(None) if group is None else slice(group, group + 1)
        h = (x if group is None else x.unsqueeze(0)).transpose(1, 2)  # (G, d, B)
        h = self._linear(0, h, g)
        for b in range(self.blocks):
            r = self._linear(1 + 2 * b, F.relu(self._norm(2 * b, h, g), inplace=True), g)
            h = h + self._linear(2 + 2 * b, F.relu(self._norm(2 * b + 1, r, g), inplace=True), g)
        out = self._linear(len(self.weights) - 1, self._norm(2 * self.blocks, h, g), g).transpose(1, 2)
        return out if group is None else out[0]


@dataclass(frozen=True)
class ProbeSettings:
    """The probes' size and training; the defaults are decoders.ResFCDecoder's, the paper's decoder."""

    width: int = 1024
    blocks: int = 5
    folds: int = 5
    max_epochs: int = 100
    patience: int = 5
    batch_size: int = 256
    lr: float = 1e-3
    stop_fraction: float = 0.1  # of each probe's training folds, held out for its early stopping


def stratified_folds(y: torch.Tensor, folds: int, generator: torch.Generator) -> torch.Tensor:
    """Fold index (N,) in [0, folds): each class dealt round-robin over the folds in a random order."""
    fold = torch.empty(len(y), dtype=torch.long)
    start = 0
    for c in torch.unique(y.cpu()):
        members = torch.nonzero(y.cpu() == c).squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        fold[members] = (torch.arange(len(members)) + start) % folds
        start += len(members)  # the next class continues the deal, so fold sizes differ by at most one
    return fold


def _mean_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="mean")


def cross_fitted_h_y_given_z(
    z: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    settings: ProbeSettings,
    generator: torch.Generator,
    z_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
) -> dict[str, float]:
    """Cross-entropies (nats) of K ResFC probes fitted on K−1 folds of (z (N, d), y (N,)) each.

    h_y_given_z: every latent scored by the probe that did not see it (the cross-fitted estimate);
    h_y_given_z_in_sample: each probe on its own training latents, averaged (what fitting and scoring on the
    same data, as the paper does, gives); val_h_y_given_z: the probes' mean cross-entropy on (z_val, y_val),
    data none of them saw (None when not given). Each probe early-stops on a slice of its own training folds, so
    neither its scored fold nor the validation set selects anything. Randomness from `generator` (CPU) only.
    """
    device = z.device
    n, d = z.shape
    k = settings.folds
    if not 2 <= k <= n:
        raise ValueError(f"need 2 ≤ folds ≤ N, got {k} folds for N = {n}")
    z = z.detach().float()
    y = y.long()
    fold = stratified_folds(y, k, generator).to(device)
    # Per probe: its training folds, split into fitting and early-stopping indices.
    fit_sets, stop_sets = [], []
    for j in range(k):
        pool = torch.nonzero(fold != j).squeeze(1).cpu()
        pool = pool[torch.randperm(len(pool), generator=generator)]
        n_stop = int(round(settings.stop_fraction * len(pool))) if len(pool) - 2 >= 2 else 0
        stop_sets.append(pool[:n_stop].to(device))
        fit_sets.append(pool[n_stop:].to(device))
    # Each probe standardises with its own fitting latents (mean, and one scale for all dimensions).
    means = torch.stack([z[s].mean(0) for s in fit_sets]).unsqueeze(1)  # (K, 1, d)
    scales = torch.stack([z[s].std(0, unbiased=False).mean().clamp_min(1e-12) for s in fit_sets]).view(k, 1, 1)

    def standardised(idx: torch.Tensor) -> torch.Tensor:
        """(K, B) indices -> (K, B, d) inputs, each probe's own standardisation."""
        return (z[idx] - means) / scales

    probes = GroupedResFC(k, d, num_classes, settings.width, settings.blocks, generator).to(device)
    optimiser = torch.optim.Adam(probes.parameters(), lr=settings.lr, foreach=True)  # few kernels per step
    longest = max(len(s) for s in fit_sets)
    steps = max(1, math.ceil(longest / settings.batch_size))
    best = [math.inf] * k
    best_mean, best_mean_epoch = math.inf, 0
    best_state = {name: t.detach().clone() for name, t in probes.state_dict().items()}

    def probe_losses(sets: list[torch.Tensor]) -> list[float]:
        """Each probe's mean cross-entropy on its own index set, in one batched forward (probes in eval mode).

        The sets differ in size by a sample or two; each is cut to the shortest so that they stack.
        """
        shortest = min(len(idx) for idx in sets)
        if shortest == 0:
            return [math.nan] * k
        idx = torch.stack([s[:shortest] for s in sets])
        with torch.no_grad():
            losses = F.cross_entropy(probes(standardised(idx)).transpose(1, 2), y[idx], reduction="none").mean(1)
        return losses.tolist()

    with torch.enable_grad():
        for epoch in range(1, settings.max_epochs + 1):
            probes.train()
            # A fresh permutation of each probe's fitting set, cycled to the longest one's length.
            order = torch.stack([
                s[torch.randperm(len(s), generator=generator).to(device).repeat(math.ceil(longest / len(s)))[:longest]]
                for s in fit_sets
            ])  # fmt: skip
            for step in range(steps):
                idx = order[:, step * settings.batch_size : (step + 1) * settings.batch_size]
                if idx.shape[1] < 2:
                    continue  # batch norm cannot normalise a batch of one
                logits = probes(standardised(idx))
                # Summed over probes, each its own mean: every probe gets its own gradient.
                loss = F.cross_entropy(logits.flatten(0, 1), y[idx].flatten(), reduction="sum") / idx.shape[1]
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            if not any(len(s) for s in stop_sets):
                continue
            probes.eval()
            losses = probe_losses(stop_sets)
            state = probes.state_dict()
            improved = [value < best[j] for j, value in enumerate(losses)]
            if any(improved):  # each probe keeps the weights of its own best epoch: one masked copy per tensor
                best = [min(b, value) for b, value in zip(best, losses, strict=True)]
                mask = torch.tensor(improved, device=device)
                for name, tensor in state.items():
                    _copy_groups(best_state[name], tensor, name, mask)
            # The group stops together, when the probes' mean stopping loss has not improved for `patience` epochs:
            # about when one probe trained alone would, where waiting for the slowest of K would cost twice that.
            mean = sum(losses) / k
            if mean < best_mean:
                best_mean, best_mean_epoch = mean, epoch
            elif epoch - best_mean_epoch >= settings.patience:
                break
    if any(len(s) for s in stop_sets):
        probes.load_state_dict(best_state)
    probes.eval()
    held_out = torch.zeros((), device=device)
    with torch.no_grad():
        for j in range(k):
            idx = torch.nonzero(fold == j).squeeze(1)
            logits = probes((z[idx] - means[j]) / scales[j], j)
            held_out = held_out + F.cross_entropy(logits, y[idx], reduction="sum")
    out = {
        "h_y_given_z": float(held_out) / n,
        "h_y_given_z_in_sample": float(sum(probe_losses(fit_sets)) / k),
        "val_h_y_given_z": None,
    }
    if z_val is not None and y_val is not None and len(y_val):
        zv = z_val.detach().float()
        with torch.no_grad():
            values = [float(_mean_ce(probes((zv - means[j]) / scales[j], j), y_val.long())) for j in range(k)]
        out["val_h_y_given_z"] = sum(values) / k
    return out


def _copy_groups(target: torch.Tensor, source: torch.Tensor, name: str, mask: torch.Tensor) -> None:
    """Copy the slices of the copies where mask (K,) is true, of a GroupedResFC state tensor (the copy axis is 0
    for weights and biases, 1 for the stacked batch-norm tensors)."""
    axis = 1 if name.split(".")[0] in ("gammas", "betas", "running_mean", "running_var") else 0
    shape = [1] * source.dim()
    shape[axis] = -1
    target.copy_(torch.where(mask.view(shape), source, target))
