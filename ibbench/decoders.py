"""Decoders on frozen latents (gmm, logreg, resfc): `fit(z, y)`, then `forward(z)` -> logits, differentiable.

Every decoder is an nn.Module built from (latent_dim, num_classes) with its buffers and parameters already in
their final shapes, so a state_dict round-trips. `fit` trains from scratch on z's device and returns the
module in eval mode; the adversarial attacks backpropagate through `forward`.
"""

from __future__ import annotations

import copy
import logging
import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from ibbench.registry import Registry

log = logging.getLogger(__name__)

DECODERS: Registry = Registry("decoder")

GMM_COVARIANCES = ("full", "tied", "diag")


class Decoder(nn.Module, ABC):
    """Base class: maps latents z (N, latent_dim) to class logits (N, num_classes)."""

    def __init__(self, latent_dim: int, num_classes: int):
        super().__init__()
        if latent_dim < 1 or num_classes < 2:
            raise ValueError(f"need latent_dim ≥ 1 and num_classes ≥ 2, got {latent_dim} and {num_classes}")
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        # A buffer so that a saved state_dict says whether the decoder was fitted; forward reads the host-side
        # flag instead, so that no forward (and no attack step through it) waits for the device.
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._is_fitted = False

    def _mark_fitted(self) -> None:
        self.fitted.fill_(True)  # the one place
        self._is_fitted = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._is_fitted = bool(self.fitted)  # one read when loading, not one per forward

    @abstractmethod
    def fit(self, z: torch.Tensor, y: torch.Tensor) -> Decoder:
        """Fit on latents z (N, latent_dim) float and labels y (N,) int64; returns self in eval mode."""

    @abstractmethod
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for latents z (N, latent_dim), differentiable in z."""

    def _check_fit_inputs(self, z: torch.Tensor, y: torch.Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (N, {self.latent_dim}), got {tuple(z.shape)}")
        if not z.is_floating_point():
            raise ValueError(f"z must be floating point, got {z.dtype}")
        if y.dim() != 1 or y.shape[0] != z.shape[0]:
            raise ValueError(f"y must have shape ({z.shape[0]},), got {tuple(y.shape)}")
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"y must hold integer class labels, got {y.dtype}")
        if y.numel() == 0:
            raise ValueError("cannot fit a decoder on zero samples")
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}], got [{low}, {high}]")
        if not bool(torch.isfinite(z).all()):
            raise ValueError("z holds non-finite values (nan or inf)")

    def _check_forward_input(self, z: torch.Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (N, {self.latent_dim}), got {tuple(z.shape)}")
        if not self._is_fitted:
            raise RuntimeError(f"{type(self).__name__} is used before fit()")


@DECODERS.register("gmm")
class GMMDecoder(Decoder):
    """One Gaussian per class; logits (N, C) = log p̂(c) + log N(z; μ_c, Σ_c): log-posterior up to a constant.

    Covariances are maximum-likelihood estimates ("full": one per class, "tied": one pooled within-class
    matrix, "diag": per-class variances) plus `ridge` × the mean per-dimension within-class variance on the
    diagonal, which keeps Σ_c positive definite when a class has fewer samples than dimensions (prefer "tied"
    then: "full" is PD but very narrow off that class's span). Fitting runs in float64 through Cholesky
    factors; the buffers hold the whitening maps L_c⁻¹ (Σ_c = L_c L_cᵀ), so forward needs no solve.
    """

    def __init__(self, latent_dim: int, num_classes: int, covariance: str = "full", ridge: float = 1e-3):
        super().__init__(latent_dim, num_classes)
        if covariance not in GMM_COVARIANCES:
            raise ValueError(f"unknown covariance {covariance!r}; allowed: {', '.join(GMM_COVARIANCES)}")
        if not ridge > 0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        self.covariance = covariance
        self.ridge = ridge
        d, c = latent_dim, num_classes
        # Latents are centred on the training mean before the quadratic form, so float32 keeps its precision
        # on offset latents.
        self.register_buffer("center", torch.zeros(d))
        self.register_buffer("means", torch.zeros(c, d))
        if covariance == "full":
            self.register_buffer("whiten", torch.zeros(c, d, d))
        elif covariance == "tied":
            self.register_buffer("whiten", torch.zeros(d, d))
        else:
            self.register_buffer("whiten", torch.zeros(c, d))  # 1 / σ per class and dimension
        # log p̂(c) − ½ log det Σ_c − (d/2) log 2π, per class
        self.register_buffer("offsets", torch.zeros(c))

    def fit(self, z: torch.Tensor, y: torch.Tensor) -> GMMDecoder:
        """Estimate class priors, means and covariances from z (N, d), y (N,); returns self in eval mode."""
        self._check_fit_inputs(z, y)
        y = y.long()
        d, c = self.latent_dim, self.num_classes
        z64 = z.detach().to(torch.float64)
        center = z64.mean(0)
        zc = z64 - center
        counts = torch.bincount(y, minlength=c)
        if bool((counts == 0).any()):
            missing = (counts == 0).nonzero().squeeze(1).tolist()
            raise ValueError(f"gmm needs samples of every class; none of class(es) {missing}")
        n = z.shape[0]
        means = torch.zeros(c, d, dtype=torch.float64, device=z.device).index_add_(0, y, zc)
        means /= counts.unsqueeze(1).to(torch.float64)
        resid = zc - means[y]
        # Relative to the within-class spread, the scale it regularises, so it is scale-free. Floors: a share
        # of the total spread for classes collapsed to points (no latent noise), then one for constant z.
        ridge = self.ridge * max(float(resid.pow(2).mean()), 1e-6 * float(zc.pow(2).mean()), 1e-12)
        log_prior = torch.log(counts.to(torch.float64) / n)
        const = 0.5 * d * math.log(2 * math.pi)
        eye = torch.eye(d, dtype=torch.float64, device=z.device)

        if self.covariance == "diag":
            var = torch.zeros(c, d, dtype=torch.float64, device=z.device).index_add_(0, y, resid.pow(2))
            var = var / counts.unsqueeze(1).to(torch.float64) + ridge
            whiten = var.rsqrt()
            log_det = var.log().sum(1)
        elif self.covariance == "tied":
            cov = resid.t() @ resid / n + ridge * eye
            chol = torch.linalg.cholesky(cov)
            whiten = torch.linalg.solve_triangular(chol, eye, upper=False)
            log_det = 2 * chol.diagonal().log().sum().expand(c)
        else:
            whitens, log_dets = [], []
            for label in range(c):
                r = resid[y == label]
                cov = r.t() @ r / r.shape[0] + ridge * eye
                chol = torch.linalg.cholesky(cov)
                whitens.append(torch.linalg.solve_triangular(chol, eye, upper=False))
                log_dets.append(2 * chol.diagonal().log().sum())
            whiten = torch.stack(whitens)
            log_det = torch.stack(log_dets)

        self.to(z.device)
        dtype = self.center.dtype
        self.center.copy_(center.to(dtype))
        self.means.copy_(means.to(dtype))
        self.whiten.copy_(whiten.to(dtype))
        self.offsets.copy_((log_prior - 0.5 * log_det - const).to(dtype))
        self._mark_fitted()
        log.debug("gmm(%s) fitted on N=%d, d=%d, ridge=%.3g", self.covariance, n, d, ridge)
        return self.eval()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Log-posterior logits (N, C) in nats (up to a per-sample constant) for latents z (N, d)."""
        self._check_forward_input(z)
        zc = z.to(self.center.dtype) - self.center
        if self.covariance == "diag":
            diff = zc.unsqueeze(1) - self.means  # (N, C, d)
            maha = (diff * self.whiten).pow(2).sum(2)
        elif self.covariance == "tied":
            # One whitening matmul for all classes; differences are taken after it, not expanded, so close
            # points keep their precision.
            wz = zc @ self.whiten.t()
            wm = self.means @ self.whiten.t()
            maha = (wz.unsqueeze(1) - wm).pow(2).sum(2)
        else:
            # One class at a time keeps memory at N×d instead of N×C×d.
            maha = torch.stack(
                [((zc - self.means[c]) @ self.whiten[c].t()).pow(2).sum(1) for c in range(self.num_classes)],
                dim=1,
            )
        return self.offsets - 0.5 * maha


@DECODERS.register("logreg")
class LogRegDecoder(Decoder):
    """Multinomial logistic regression on standardised latents, fitted full-batch by L-BFGS; logits (N, C)."""

    def __init__(
        self,
        latent_dim: int,
        num_classes: int,
        l2: float = 1e-4,
        max_iter: int = 500,
        tolerance: float = 1e-6,
    ):
        super().__init__(latent_dim, num_classes)
        if l2 < 0 or max_iter < 1 or tolerance <= 0:
            raise ValueError(f"need l2 ≥ 0, max_iter ≥ 1, tolerance > 0; got {l2}, {max_iter}, {tolerance}")
        self.l2 = l2
        self.max_iter = max_iter
        self.tolerance = tolerance
        self.register_buffer("mean", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))
        self.linear = nn.Linear(latent_dim, num_classes)

    def fit(self, z: torch.Tensor, y: torch.Tensor) -> LogRegDecoder:
        """Minimise mean cross-entropy (nats) + (l2/2)‖W‖² on z (N, d), y (N,); returns self in eval mode."""
        self._check_fit_inputs(z, y)
        self.to(z.device)
        z = z.detach().float()
        y = y.long()
        std = z.std(0, unbiased=False)
        # Dimensions with (near) zero spread carry no information; a floor keeps them from blowing up.
        floor = 1e-6 * max(float(std.max()), 1e-12)
        self.mean.copy_(z.mean(0))
        self.scale.copy_(std.clamp_min(floor))
        x = (z - self.mean) / self.scale
        # The problem is convex, so a zero start gives the same optimum without touching the RNG.
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.zero_()
        optimiser = torch.optim.LBFGS(
            self.linear.parameters(),
            lr=1.0,
            max_iter=self.max_iter,
            tolerance_grad=self.tolerance,
            tolerance_change=self.tolerance * 1e-3,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            loss = F.cross_entropy(self.linear(x), y) + 0.5 * self.l2 * self.linear.weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimiser.step(closure)  # returns the loss at the start, not the end
        iterations = optimiser.state[self.linear.weight].get("n_iter", 0)
        if iterations >= self.max_iter:
            log.warning("logreg hit max_iter=%d before tolerance %g", self.max_iter, self.tolerance)
        if log.isEnabledFor(logging.DEBUG):
            with torch.no_grad():
                final = F.cross_entropy(self.linear(x), y) + 0.5 * self.l2 * self.linear.weight.pow(2).sum()
            log.debug("logreg fitted: final loss %.4g nats after %d iterations", float(final), iterations)
        for p in self.linear.parameters():
            p.grad = None
        self._mark_fitted()
        return self.eval()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) for latents z (N, d)."""
        self._check_forward_input(z)
        return self.linear((z - self.mean) / self.scale)


class _ResidualBlock(nn.Module):
    """x + (BN-ReLU-Linear-BN-ReLU-Linear)(x), width preserved."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Linear(width, width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, width) -> (N, width)."""
        return x + self.body(x)


@DECODERS.register("resfc")
class ResFCDecoder(Decoder):
    """The paper's fully-connected ResNet decoder: Linear(d→width), residual blocks, BN, Linear(width→C).

    Inputs are standardised with the training latents' mean and spread (buffers) first: an affine map folded
    into the first Linear, so the function class is the paper's, but Adam no longer cares how far the latents
    have shrunk or grown. Trained with Adam on minibatches, early-stopped on the validation cross-entropy of a
    held-out slice of the training latents (the best epoch's weights are kept). Initialisation, the split and
    shuffling use the global torch RNG, so callers seed it for determinism.
    """

    def __init__(
        self,
        latent_dim: int,
        num_classes: int,
        width: int = 1024,
        blocks: int = 5,
        max_epochs: int = 100,
        patience: int = 5,
        batch_size: int = 256,
        lr: float = 1e-3,
        val_fraction: float = 0.1,
    ):
        super().__init__(latent_dim, num_classes)
        if width < 1 or blocks < 0 or max_epochs < 1 or patience < 1 or batch_size < 2 or lr <= 0:
            raise ValueError(
                "need width ≥ 1, blocks ≥ 0, max_epochs ≥ 1, patience ≥ 1, batch_size ≥ 2, lr > 0; got "
                f"{width}, {blocks}, {max_epochs}, {patience}, {batch_size}, {lr}"
            )
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.lr = lr
        self.val_fraction = val_fraction
        self.register_buffer("mean", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))
        self.net = nn.Sequential(
            nn.Linear(latent_dim, width),
            *[_ResidualBlock(width) for _ in range(blocks)],
            nn.BatchNorm1d(width),
            nn.Linear(width, num_classes),
        )

    def _reset(self) -> None:
        for module in self.net.modules():
            if isinstance(module, (nn.Linear, nn.BatchNorm1d)):
                module.reset_parameters()

    def _mean_loss(self, z: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            total = sum(
                float(F.cross_entropy(self.net(z[i : i + 4096]), y[i : i + 4096], reduction="sum"))
                for i in range(0, z.shape[0], 4096)
            )
        return total / z.shape[0]

    def fit(self, z: torch.Tensor, y: torch.Tensor) -> ResFCDecoder:
        """Train from scratch on z (N, d), y (N,) with early stopping; returns self in eval mode."""
        self._check_fit_inputs(z, y)
        self.to(z.device)
        self._reset()
        z = z.detach().float()
        y = y.long()
        self.mean.copy_(z.mean(0))
        # One scale for all dimensions keeps their relative sizes; the floor only matters for constant z.
        self.scale.fill_(max(float(z.std(0, unbiased=False).mean()), 1e-12))
        z = (z - self.mean) / self.scale
        n = z.shape[0]
        n_val = int(round(self.val_fraction * n))
        if n - n_val < 2:
            n_val = 0  # too few samples to hold any out; train for max_epochs instead
        order = torch.randperm(n).to(z.device)
        z_val, y_val = z[order[:n_val]], y[order[:n_val]]
        z_fit, y_fit = z[order[n_val:]], y[order[n_val:]]
        n_fit = z_fit.shape[0]
        optimiser = torch.optim.Adam(self.parameters(), lr=self.lr)
        best_loss, best_state, best_epoch, epoch = math.inf, None, 0, 0
        with torch.enable_grad():
            for epoch in range(1, self.max_epochs + 1):
                self.train()
                perm = torch.randperm(n_fit).to(z.device)
                for start in range(0, n_fit, self.batch_size):
                    idx = perm[start : start + self.batch_size]
                    if idx.numel() < 2:
                        continue  # BatchNorm cannot normalise a batch of one
                    loss = F.cross_entropy(self.net(z_fit[idx]), y_fit[idx])
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                if n_val == 0:
                    continue
                self.eval()
                val_loss = self._mean_loss(z_val, y_val)
                if val_loss < best_loss:
                    best_loss, best_epoch = val_loss, epoch
                    best_state = copy.deepcopy(self.net.state_dict())
                elif epoch - best_epoch >= self.patience:
                    break
        if best_state is not None:
            self.net.load_state_dict(best_state)
        for p in self.parameters():
            p.grad = None
        log.debug("resfc fitted: %d epochs, best epoch %d, val loss %.4g nats", epoch, best_epoch, best_loss)
        self._mark_fitted()
        return self.eval()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) for latents z (N, d); BatchNorm uses its running statistics in eval mode."""
        self._check_forward_input(z)
        return self.net((z - self.mean) / self.scale)


def make_decoder(name: str, latent_dim: int, num_classes: int) -> Decoder:
    """An unfitted decoder `name` (see DECODERS.names()) with its default options."""
    return DECODERS.get(name)(latent_dim, num_classes)


def fit_decoder(name: str, z: torch.Tensor, y: torch.Tensor, num_classes: int) -> Decoder:
    """Decoder `name` fitted on latents z (N, d) and labels y (N,), on z's device, in eval mode."""
    return make_decoder(name, z.shape[1], num_classes).fit(z, y)
