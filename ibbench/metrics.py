"""The names a run reports in each metrics.jsonl row: what a search may optimise and a report may read."""

from __future__ import annotations

from collections.abc import Sequence

HEAD = "head"  # the decoder name under which objectives with a head (ce, ce_dropconnect) report it
PER_DECODER = ("acc", "test_acc", "train_acc")  # accuracy of each decoder; acc and test_acc are the same number
ESTIMATES = ("h_z", "h_z_given_y", "infoplane/i_xz", "infoplane/h_y_given_z")  # test-set entropies, nats
BOOKKEEPING = ("epoch", "time", "lr")


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
