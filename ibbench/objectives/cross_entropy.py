"""The cross-entropy baselines: `ce` (a linear head on Z) and `ce_dropconnect` (DropConnect on that head)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ibbench.objectives.base import OBJECTIVES, Objective, ObjectiveSettings


@OBJECTIVES.register("ce")
class CrossEntropy(Objective):
    """Cross-entropy (nats) through a linear head on the latent: the paper's baseline."""

    label = "CE"
    has_head = True
    terms = ("loss", "ce", "train_acc")

    def __init__(self, settings: ObjectiveSettings):
        super().__init__(settings)
        self.head = nn.Linear(settings.latent_dim, settings.num_classes)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)

    def forward(self, h: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        logits = self.logits(self.sample(h, generator))
        loss = F.cross_entropy(logits.float(), y)
        accuracy = (logits.argmax(1) == y).float().mean()
        return {"loss": loss, "ce": loss.detach(), "train_acc": accuracy.detach()}


@OBJECTIVES.register("ce_dropconnect")
class CrossEntropyDropConnect(CrossEntropy):
    """Cross-entropy with DropConnect (Wan et al., 2013) on the head's weights: the paper's robustness baseline.

    Bernoulli masks rescaled by 1/(1 − p), so that evaluation uses the plain weights (the mean network) instead of
    Wan et al.'s Gaussian moment matching at inference. Wan et al. draw one mask per example
    (`dropconnect_per_example`); one mask per batch is cheaper and kept as the default for comparability.
    """

    label = "CE+DropConnect"
    fields = ("dropconnect", "dropconnect_per_example")

    def __init__(self, settings: ObjectiveSettings):
        super().__init__(settings)
        if not 0.0 <= settings.dropconnect < 1.0:
            raise ValueError(f"dropconnect rate must lie in [0, 1), got {settings.dropconnect}")
        self._generator: torch.Generator | None = None

    def forward(self, h: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        self._generator = generator  # the masks come from the training stream, like the noise
        try:
            return super().forward(h, y, generator)
        finally:
            self._generator = None

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        p = self.settings.dropconnect
        if not self.training or p == 0.0:
            return self.head(z)
        w = self.head.weight
        if self.settings.dropconnect_per_example:
            # (B, C, d) masks: each example sees its own thinned head.
            keep = torch.rand((z.shape[0], *w.shape), generator=self._generator, device=w.device) >= p
            return torch.einsum("bcd,bd->bc", w * keep / (1.0 - p), z) + self.head.bias
        keep = torch.rand(w.shape, generator=self._generator, device=w.device) >= p
        return F.linear(z, w * keep / (1.0 - p), self.head.bias)
