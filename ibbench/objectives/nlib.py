"""`nlib`: nonlinear information bottleneck (Kolchinsky, Tracey & Wolpert, Entropy 2019)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ibbench.estimators import kde_mutual_information
from ibbench.objectives.base import OBJECTIVES, Objective, ObjectiveSettings


@OBJECTIVES.register("nlib")
class NonlinearIB(Objective):
    """min CE(head(z), y) + β Î(X;Z) (or β Î(X;Z)² with nlib_squared), z = h(x) + N(0, σ² I).

    Î(X;Z) is the pairwise-distance (KDE) upper bound of Kolchinsky & Tracey on the batch's deterministic codes h
    (nats), logged as `i_xz_bound`; the head is the jointly trained decoder. σ² is `nlib_noise_var`, by default
    1/(2πe), the zero-entropy noise of `ib`: then H(Z|X) = 0 and I(X;Z) = H(Z), so the k-NN estimate of the
    noisy latents and this bound measure the same quantity on the same latents. With `nlib_learn_noise` σ² is a
    parameter (trained through log σ²). At evaluation the latent is h, noise off, as for every encoder.
    """

    label = "NLIB"
    has_head = True
    terms = ("loss", "ce", "i_xz_bound", "noise_var", "train_acc")
    fields = ("beta", "nlib_noise_var", "nlib_learn_noise", "nlib_squared")
    beta_meaning = "β, the weight of the KDE bound Î(X;Z) (or of Î² with nlib_squared)"
    noise_allowed = False  # its Gaussian noise of variance nlib_noise_var is the objective's own

    def __init__(self, settings: ObjectiveSettings):
        super().__init__(settings)
        if not (math.isfinite(settings.nlib_noise_var) and settings.nlib_noise_var > 0):
            raise ValueError(f"nlib_noise_var must be > 0, got {settings.nlib_noise_var}")
        self.head = nn.Linear(settings.latent_dim, settings.num_classes)
        log_var = torch.tensor(math.log(settings.nlib_noise_var))
        if settings.nlib_learn_noise:
            self.log_var = nn.Parameter(log_var)
        else:
            self.register_buffer("log_var", log_var)

    def noise_var(self) -> torch.Tensor:
        return self.log_var.exp()

    def sample(self, h: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(h.shape, generator=generator, device=h.device, dtype=h.dtype)
        return h + self.noise_var().sqrt().to(h.dtype) * eps

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)

    def forward(self, h: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        logits = self.logits(self.sample(h, generator))
        ce = F.cross_entropy(logits.float(), y)
        i_xz = kde_mutual_information(h.float(), self.noise_var())
        penalty = i_xz.pow(2) if self.settings.nlib_squared else i_xz
        accuracy = (logits.argmax(1) == y).float().mean()
        return {"loss": ce + self.settings.beta * penalty, "ce": ce.detach(), "i_xz_bound": i_xz.detach(),
                "noise_var": self.noise_var().detach(), "train_acc": accuracy.detach()}  # fmt: skip
