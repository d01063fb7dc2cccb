"""Training objectives: a batch of latents (B, d) and labels (B,) to named scalar terms, "loss" among them.

Each objective is an `nn.Module` built from `ObjectiveSettings` alone; the parameters it owns (the linear head of
the cross-entropy baselines) are its own, so the training loop optimises `encoder.parameters()` and
`objective.parameters()` together and needs no per-objective code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ibbench.estimators import conditional_knn_entropy, knn_entropy
from ibbench.registry import Registry

OBJECTIVES: Registry[type[Objective]] = Registry("objective")


@dataclass(frozen=True)
class ObjectiveSettings:
    """What any objective may need; each reads only its own fields."""

    latent_dim: int  # width of Z: sizes a head
    num_classes: int  # |Y|: sizes a head
    beta: float = 0.0  # β'' of H[Z|Y] + (β'' − 1) H[Z]
    k: int = 1  # neighbour rank of the k-NN entropy estimator
    dropconnect: float = 0.5  # probability of dropping each head weight (ce_dropconnect)


class Objective(nn.Module):
    """Base class: `forward(z, y) -> {"loss": scalar, ...}`; `logits(z)` when the objective has a head."""

    has_head: bool = False
    # RunConfig fields the objective itself reads (beyond those every run uses): elsewhere they mean nothing,
    # and tables show "–" for them.
    fields: tuple[str, ...] = ()

    def __init__(self, settings: ObjectiveSettings):
        super().__init__()
        self.settings = settings

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Class scores (B, C) from the objective's own head."""
        raise TypeError(f"objective {type(self).__name__} has no classification head")


def ib_terms(z: torch.Tensor, y: torch.Tensor, beta: float, k: int = 1) -> dict[str, torch.Tensor]:
    """IB surrogate H[Z|Y] + (β'' − 1) H[Z] of Kirsch et al. (2020) eq. 10, with both entropies in nats."""
    h_z_given_y = conditional_knn_entropy(z, y, k)
    h_z = knn_entropy(z, k)
    loss = h_z_given_y + (beta - 1.0) * h_z
    return {"loss": loss, "h_z": h_z.detach(), "h_z_given_y": h_z_given_y.detach()}


@OBJECTIVES.register("ib")
class IB(Objective):
    """min H[Z|Y] + (β'' − 1) H[Z]: minimising H[Y|Z] + β'' H[Z] up to the constant H[Y], no decoder needed."""

    fields = ("beta", "k")

    def __init__(self, settings: ObjectiveSettings):
        super().__init__(settings)
        if not (0.0 <= settings.beta <= 1.0 and math.isfinite(settings.beta)):
            raise ValueError(f"beta (β'') must lie in [0, 1], got {settings.beta}")

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return ib_terms(z, y, self.settings.beta, self.settings.k)


@OBJECTIVES.register("ce")
class CrossEntropy(Objective):
    """Cross-entropy (nats) through a linear head on the latent: the paper's baseline."""

    has_head = True

    def __init__(self, settings: ObjectiveSettings):
        super().__init__(settings)
        self.head = nn.Linear(settings.latent_dim, settings.num_classes)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.logits(z)
        loss = F.cross_entropy(logits.float(), y)
        accuracy = (logits.argmax(1) == y).float().mean()
        return {"loss": loss, "ce": loss.detach(), "train_acc": accuracy.detach()}


@OBJECTIVES.register("ce_dropconnect")
class CrossEntropyDropConnect(CrossEntropy):
    """Cross-entropy with DropConnect (Wan et al., 2013) on the head's weights: the paper's robustness baseline.

    One Bernoulli mask per batch, rescaled by 1/(1 − p) so that evaluation uses the plain weights (the mean
    network) instead of Wan et al.'s Gaussian moment matching at inference.
    """

    fields = ("dropconnect",)

    def __init__(self, settings: ObjectiveSettings):
        super().__init__(settings)
        if not 0.0 <= settings.dropconnect < 1.0:
            raise ValueError(f"dropconnect rate must lie in [0, 1), got {settings.dropconnect}")

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        p = self.settings.dropconnect
        if not self.training or p == 0.0:
            return self.head(z)
        keep = torch.rand_like(self.head.weight) >= p
        return F.linear(z, self.head.weight * keep / (1.0 - p), self.head.bias)


def unused_fields(name: str) -> tuple[str, ...]:
    """Objective-specific RunConfig fields that objective `name` does not read (shown as "–" for its runs)."""
    own = set(OBJECTIVES.get(name).fields)
    every = dict.fromkeys(f for n in OBJECTIVES.names() for f in OBJECTIVES.get(n).fields)
    return tuple(f for f in every if f not in own)


def make_objective(name: str, settings: ObjectiveSettings) -> Objective:
    """The registered objective `name`, built from settings."""
    return OBJECTIVES.get(name)(settings)
