"""The objective interface: a batch of encoder outputs (B, w) and labels (B,) to named scalar terms, "loss" among
them; the registry; the settings every objective is built from.

Each objective is an `nn.Module` built from `ObjectiveSettings` alone. It owns what it trains besides the encoder
(a head, a learned noise scale), maps the encoder's output to the latent Z it trains (`sample`) and to the
deterministic latent that decoders, attacks and the information plane use (`latent`), and declares the RunConfig
fields it reads and the meaning and range of `beta`. The training loop, the sweep and the report use only this
interface, so a new objective is one new file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ibbench.estimators import add_zero_entropy_noise
from ibbench.registry import Registry

OBJECTIVES: Registry[type[Objective]] = Registry("objective")

INF = math.inf


@dataclass(frozen=True)
class ObjectiveSettings:
    """What any objective may need; each reads only its own fields."""

    latent_dim: int  # width of Z: sizes a head
    num_classes: int  # |Y|: sizes a head
    beta: float = 0.0  # the objective's trade-off parameter: β'' for ib, β for vib and nlib
    k: int = 1  # neighbour rank of the k-NN entropy estimator
    dropconnect: float = 0.5  # probability of dropping each head weight (ce_dropconnect)
    dropconnect_per_example: bool = False  # ce_dropconnect: one mask per example instead of per batch
    noise: bool = False  # add zero-entropy noise N(0, I/2πe) to Z while training
    vib_samples: int = 1  # vib: reparameterised samples of z per input
    nlib_noise_var: float = 1 / (2 * math.pi * math.e)  # nlib: variance of its Gaussian noise (zero-entropy)
    nlib_learn_noise: bool = False  # nlib: learn the noise variance (log-parameterised) instead of fixing it
    nlib_squared: bool = False  # nlib: penalise Î(X;Z)² (squared-IB) instead of Î(X;Z)


class Objective(nn.Module):
    """Base class: `forward(h, y, generator) -> {"loss": scalar, ...}`; `logits(z)` when it has a head."""

    label: str = "?"  # how reports name it
    has_head: bool = False
    terms: tuple[str, ...] = ("loss",)  # the keys forward() returns (metrics.jsonl's train/<term>)
    # RunConfig fields the objective itself reads (beyond those every run uses): elsewhere they mean nothing,
    # and tables show "–" for them.
    fields: tuple[str, ...] = ()
    # What `beta` means for this objective, its symbol in tables and its valid range [low, high) (high excluded
    # unless beta_high_inclusive); None when the objective has no beta.
    beta_meaning: str | None = None
    beta_symbol: str = "β"
    beta_low: float = 0.0
    beta_high: float = INF
    beta_high_inclusive: bool = False
    noise_default: bool = False  # the zero-entropy training noise when a run does not say (RunConfig.noise)
    noise_allowed: bool = True  # False: the objective's own stochasticity replaces it; noise: true is refused
    knn_batches: bool = False  # batches need more than k samples of every class (a per-class k-NN estimate)

    def __init__(self, settings: ObjectiveSettings):
        super().__init__()
        self.check_beta(settings.beta)
        if settings.noise and not self.noise_allowed:
            raise ValueError(f"objective {type(self).__name__} adds its own noise; noise must be false")
        self.settings = settings

    @classmethod
    def beta_allowed(cls) -> str:
        """The valid range of beta, in words, for error messages."""
        high = "" if cls.beta_high == INF else (" ≤ " if cls.beta_high_inclusive else " < ") + f"{cls.beta_high:g}"
        return f"{cls.beta_low:g} ≤ beta{high} ({cls.beta_meaning})"

    @classmethod
    def check_beta(cls, beta: float) -> None:
        """ValueError naming the range when beta is outside it (the one place each objective's range lives)."""
        if cls.beta_meaning is None:
            return
        above = beta > cls.beta_high if cls.beta_high_inclusive else beta >= cls.beta_high
        if not math.isfinite(beta) or beta < cls.beta_low or above:
            raise ValueError(f"{cls.beta_symbol} = {beta} is outside the range of {cls.label}: {cls.beta_allowed()}")

    @classmethod
    def encoder_width(cls, latent_dim: int) -> int:
        """Width of the encoder output this objective needs for a latent of latent_dim."""
        return latent_dim

    def latent(self, h: torch.Tensor) -> torch.Tensor:
        """The deterministic latent (B, latent_dim) of encoder outputs h: what decoders and attacks see."""
        return h

    def sample(self, h: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The latent the objective trains: latent(h), with the zero-entropy noise when the run asks for it."""
        z = self.latent(h)
        return add_zero_entropy_noise(z, generator) if self.settings.noise else z

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Class scores (B, C) from the objective's own head."""
        raise TypeError(f"objective {type(self).__name__} has no classification head")


def unused_fields(name: str) -> tuple[str, ...]:
    """Objective-specific RunConfig fields that objective `name` does not read (shown as "–" for its runs)."""
    own = set(OBJECTIVES.get(name).fields)
    every = dict.fromkeys(f for n in OBJECTIVES.names() for f in OBJECTIVES.get(n).fields)
    return tuple(f for f in every if f not in own)


def make_objective(name: str, settings: ObjectiveSettings) -> Objective:
    """The registered objective `name`, built from settings."""
    return OBJECTIVES.get(name)(settings)
