"""`vib`: the Deep Variational Information Bottleneck (Alemi, Fischer, Dillon & Murphy, ICLR 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ibbench.objectives.base import OBJECTIVES, Objective, ObjectiveSettings

# Alemi et al.'s code takes σ = softplus(s − 5): a small initial scale, so training starts near the deterministic
# network and the KL term pulls the scale up only where it pays.
SCALE_SHIFT = 5.0


def gaussian_kl_to_standard(mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, diag scale²) ‖ N(0, I)) per row (B,), nats: ½ Σ_d (μ² + σ² − 1 − log σ²)."""
    var = scale.pow(2)
    return 0.5 * (mean.pow(2) + var - 1.0 - torch.log(var)).sum(1)


@OBJECTIVES.register("vib")
class VIB(Objective):
    """min E_q[CE(head(z), y)] + β KL(q(z|x) ‖ N(0, I)), q(z|x) = N(μ(x), diag σ(x)²), σ = softplus(s − 5).

    The encoder's last layer gives μ and s (2·latent_dim outputs). The cross-entropy is taken on `vib_samples`
    reparameterised samples z = μ + σ ε (the paper's single-sample estimate by default), so gradients reach the
    encoder through the sample. The KL term, averaged over the batch, is VIB's variational upper bound on I(X;Z)
    and is logged as `i_xz_bound`. At evaluation the latent is the mean μ: decoders, attacks and the information
    plane see it, as for every deterministic encoder. β ≥ 0 weighs the KL term (β = 0: CE with a stochastic layer).
    """

    label = "VIB"
    has_head = True
    terms = ("loss", "ce", "kl", "i_xz_bound", "train_acc")
    fields = ("beta", "vib_samples")
    beta_meaning = "β, the weight of KL(q(z|x) ‖ N(0, I))"
    noise_allowed = False  # its reparameterised sample is its noise

    def __init__(self, settings: ObjectiveSettings):
        super().__init__(settings)
        if settings.vib_samples < 1:
            raise ValueError(f"vib_samples must be ≥ 1, got {settings.vib_samples}")
        self.head = nn.Linear(settings.latent_dim, settings.num_classes)

    @classmethod
    def encoder_width(cls, latent_dim: int) -> int:
        return 2 * latent_dim

    def latent(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, : self.settings.latent_dim]

    def scale(self, h: torch.Tensor) -> torch.Tensor:
        """σ(x) (B, latent_dim), positive."""
        return F.softplus(h[:, self.settings.latent_dim :] - SCALE_SHIFT)

    def sample(self, h: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """vib_samples reparameterised draws per input, stacked: (S·B, latent_dim)."""
        mean, scale = self.latent(h), self.scale(h)
        shape = (self.settings.vib_samples, *mean.shape)
        eps = torch.randn(shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + scale * eps).reshape(-1, mean.shape[1])

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)

    def forward(self, h: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        logits = self.logits(self.sample(h, generator))
        labels = y.repeat(self.settings.vib_samples)
        ce = F.cross_entropy(logits.float(), labels)
        kl = gaussian_kl_to_standard(self.latent(h).float(), self.scale(h).float()).mean()
        accuracy = (logits.argmax(1) == labels).float().mean()
        return {"loss": ce + self.settings.beta * kl, "ce": ce.detach(), "kl": kl.detach(),
                "i_xz_bound": kl.detach(), "train_acc": accuracy.detach()}  # fmt: skip
