"""Objectives: the IB surrogate's algebra and the cross-entropy baselines' heads."""

import pytest
import torch

from ibbench.estimators import conditional_knn_entropy, knn_entropy
from ibbench.objectives import OBJECTIVES, ObjectiveSettings, ib_terms, make_objective


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(120, 5, generator=g), torch.arange(120) % 3


def test_ib_limits(batch):
    z, y = batch
    h_zy, h_z = float(conditional_knn_entropy(z, y, 2)), float(knn_entropy(z, 2))
    assert float(ib_terms(z, y, beta=1.0, k=2)["loss"]) == pytest.approx(h_zy, abs=1e-5)
    assert float(ib_terms(z, y, beta=0.0, k=2)["loss"]) == pytest.approx(h_zy - h_z, abs=1e-5)
    terms = make_objective("ib", ObjectiveSettings(latent_dim=5, num_classes=3, beta=0.3, k=2))(z, y)
    assert set(terms) >= {"loss", "h_z", "h_z_given_y"}
    assert float(terms["loss"]) == pytest.approx(h_zy - 0.7 * h_z, abs=1e-5)


def test_ib_has_no_parameters_and_rejects_bad_beta():
    ib = make_objective("ib", ObjectiveSettings(latent_dim=5, num_classes=3, beta=0.5))
    assert not ib.has_head and list(ib.parameters()) == []
    with pytest.raises(ValueError, match="beta"):
        make_objective("ib", ObjectiveSettings(latent_dim=5, num_classes=3, beta=1.5))


@pytest.mark.parametrize("name", ["ce", "ce_dropconnect"])
def test_cross_entropy_objectives_own_a_head_and_learn(name, batch):
    z, y = batch
    z = z + 3 * torch.nn.functional.one_hot(y, 5).float()  # linearly separable
    torch.manual_seed(0)
    obj = make_objective(name, ObjectiveSettings(latent_dim=5, num_classes=3, dropconnect=0.3))
    assert obj.has_head and sum(p.numel() for p in obj.parameters()) == 5 * 3 + 3
    opt = torch.optim.Adam(obj.parameters(), lr=0.05)
    first = float(obj(z, y)["loss"])
    for _ in range(150):
        opt.zero_grad()
        obj(z, y)["loss"].backward()
        opt.step()
    obj.eval()
    assert float(obj(z, y)["loss"]) < 0.5 * first
    assert (obj.logits(z).argmax(1) == y).float().mean() > 0.95


def test_dropconnect_masks_weights_in_training_only(batch):
    z, _ = batch
    torch.manual_seed(0)
    obj = make_objective("ce_dropconnect", ObjectiveSettings(latent_dim=5, num_classes=3, dropconnect=0.5))
    obj.train()
    assert not torch.allclose(obj.logits(z), obj.logits(z))
    obj.eval()
    torch.testing.assert_close(obj.logits(z), obj.head(z))


def test_registry_lists_objectives():
    assert {"ib", "ce", "ce_dropconnect"} <= set(OBJECTIVES.names())
    with pytest.raises(LookupError, match="allowed: .*ce.*ib"):
        OBJECTIVES.get("vib")
