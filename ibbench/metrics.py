"""The names a run reports in each metrics.jsonl row: what a search may optimise and a report may read."""

from __future__ import annotations

from collections.abc import Sequence

HEAD = "head"  # the decoder name under which objectives with a head (ce, ce_dropconnect) report it
# Accuracy of each decoder on each split; acc and test_acc are the same number (acc is DESIGN's name).
PER_DECODER = ("acc", "test_acc", "train_acc", "val_acc")
# Entropies in nats. On the test set: h_z and h_z_given_y (k-NN, latents with the evaluation noise), the
# information-plane point (I(X; Z+ε) and the cross-fitted H[Y|Z], with the in-sample H[Y|Z] for comparison with
# the paper) and the k-NN H[Z] of the noise-free latents. On the validation set: the probes' H[Y|Z].
ESTIMATES = ("h_z", "h_z_given_y", "infoplane/i_xz", "infoplane/h_y_given_z", "infoplane/h_y_given_z_in_sample",
             "infoplane/h_z_noise_free", "val_h_y_given_z")  # fmt: skip
BOOKKEEPING = ("epoch", "time", "lr")
# What a search, a scheduler or a report's "best" may select on: validation and training metrics, never the test set.
SELECTABLE_PREFIXES = ("val_", "train/")


def reported_metrics(objective: str, decoders: Sequence[str]) -> list[str]:
    """The numeric keys of every eval row of a run with this objective and these decoders (train.run writes them)."""
    from ibbench.objectives import OBJECTIVES

    cls = OBJECTIVES.get(objective)
    names = [*decoders, *([HEAD] if cls.has_head else [])]
    return [
        *BOOKKEEPING,
        *(f"train/{term}" for term in cls.terms),
        *(f"{kind}/{name}" for name in names for kind in PER_DECODER),
        *ESTIMATES,
    ]


def selectable_metrics(objective: str, decoders: Sequence[str]) -> list[str]:
    """The reported metrics a search may optimise: measured on the validation or training data only."""
    return [m for m in reported_metrics(objective, decoders) if m.startswith(SELECTABLE_PREFIXES)]
