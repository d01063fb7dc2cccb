"""`ib`: the paper's objective H[Z|Y] + (β'' − 1) H[Z], both entropies from the k-NN estimator (nats)."""

from __future__ import annotations

import torch

from ibbench.estimators import conditional_knn_entropy, knn_entropy
from ibbench.objectives.base import OBJECTIVES, Objective


def ib_terms(
    z: torch.Tensor, y: torch.Tensor, beta: float, k: int = 1, balanced_classes: int | None = None
) -> dict[str, torch.Tensor]:
    """IB surrogate H[Z|Y] + (β'' − 1) H[Z] of Kirsch et al. (2020) eq. 10, with both entropies in nats.

    balanced_classes: the batch holds that many classes in equal shares (the training loader's batches), so the
    estimates need no look at the labels on the host; nan/inf are then left to the caller's loss check.
    """
    validate = balanced_classes is None
    h_z_given_y = conditional_knn_entropy(z, y, k, balanced_classes=balanced_classes, validate=validate)
    h_z = knn_entropy(z, k, validate=validate)
    loss = h_z_given_y + (beta - 1.0) * h_z
    return {"loss": loss, "h_z": h_z.detach(), "h_z_given_y": h_z_given_y.detach()}


@OBJECTIVES.register("ib")
class IB(Objective):
    """min H[Z|Y] + (β'' − 1) H[Z]: minimising H[Y|Z] + β'' H[Z] up to the constant H[Y], no decoder needed.

    β'' in [0, 1) is 1/β of the IB Lagrangian; at β'' = 1 the H[Z] term vanishes and nothing keeps the classes
    apart, so it is refused.
    """

    label = "IB"
    terms = ("loss", "h_z", "h_z_given_y")
    fields = ("beta", "k")
    beta_meaning = "β'' = 1/β of the IB Lagrangian H[Y|Z] + β'' H[Z]"
    beta_symbol = "β''"
    beta_high = 1.0
    noise_default = True
    knn_batches = True

    def forward(self, h: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        # Training batches are class-balanced over all classes (the loader guarantees it for knn_batches).
        return ib_terms(self.sample(h, generator), y, self.settings.beta, self.settings.k, self.settings.num_classes)
