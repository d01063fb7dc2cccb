"""Training objectives (see `base` for the interface): ib, ce, ce_dropconnect, vib, nlib — one file each."""

from __future__ import annotations

from ibbench.objectives import cross_entropy, ib, nlib, vib  # noqa: F401  (registers each objective)
from ibbench.objectives.base import OBJECTIVES, Objective, ObjectiveSettings, make_objective, unused_fields
from ibbench.objectives.ib import ib_terms

__all__ = ["OBJECTIVES", "Objective", "ObjectiveSettings", "ib_terms", "make_objective", "unused_fields"]
