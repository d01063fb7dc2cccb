"""The metric names a run reports: what `search.metric` is validated against matches what train.run writes."""

from __future__ import annotations

import pytest
from tiny import TINY_RUN

from ibbench import results, train
from ibbench.config import RunConfig
from ibbench.metrics import reported_metrics


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["ib", "ce"])
def test_reported_metrics_are_the_numeric_keys_of_a_real_row(tmp_path, objective):
    cfg = RunConfig.from_dict({**TINY_RUN, "epochs": 1, "objective": objective, "decoders": ["gmm", "logreg"]})
    train.run(cfg, tmp_path / "r")
    (row,) = results.read_metrics(tmp_path / "r")
    numeric = {k for k, v in row.items() if isinstance(v, (int, float))}
    assert set(reported_metrics(objective, cfg.decoders)) == numeric


def test_objectives_with_a_head_report_it_as_a_decoder():
    assert "test_acc/head" in reported_metrics("ce", ["gmm"])
    assert "test_acc/head" not in reported_metrics("ib", ["gmm"])
    assert "train/h_z" in reported_metrics("ib", ["gmm"]) and "train/ce" in reported_metrics("ce", ["gmm"])
