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
    first = float(obj(z, y)["loss"].detach())
    for _ in range(150):
        opt.zero_grad()
        obj(z, y)["loss"].backward()
        opt.step()
    obj.eval()
    assert float(obj(z, y)["loss"].detach()) < 0.5 * first
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
    assert {"ib", "ce", "ce_dropconnect", "vib", "nlib"} <= set(OBJECTIVES.names())
    with pytest.raises(LookupError, match="allowed: .*ce.*ib.*nlib.*vib"):
        OBJECTIVES.get("vae")


# -- vib -------------------------------------------------------------------------------------------------------


def vib(beta: float = 0.1, samples: int = 1, latent_dim: int = 5):
    return make_objective("vib", ObjectiveSettings(latent_dim=latent_dim, num_classes=3, beta=beta,
                                                   vib_samples=samples))  # fmt: skip


def test_vib_kl_matches_the_closed_form():
    from torch.distributions import Normal, kl_divergence

    from ibbench.objectives.vib import SCALE_SHIFT, gaussian_kl_to_standard

    g = torch.Generator().manual_seed(1)
    mean, scale = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.rand(7, 5, generator=g) + 0.2
    expected = kl_divergence(Normal(mean, scale.double()), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(gaussian_kl_to_standard(mean, scale.double()), expected)
    # Through the objective: encoder outputs [μ, s] with σ = softplus(s − 5); the logged KL is the batch mean.
    s_pre = torch.log(torch.expm1(scale.double())) + SCALE_SHIFT  # softplus⁻¹(σ) + 5
    h = torch.cat([mean, s_pre], 1).float()
    terms = vib()(h, torch.zeros(7, dtype=torch.long), torch.Generator().manual_seed(0))
    terms = {k: v.detach() for k, v in terms.items()}
    assert float(terms["kl"]) == pytest.approx(float(expected.mean()), rel=1e-4)
    assert float(terms["i_xz_bound"]) == float(terms["kl"])
    assert float(terms["loss"]) == pytest.approx(float(terms["ce"]) + 0.1 * float(terms["kl"]), rel=1e-6)


def test_vib_gradients_flow_through_the_reparameterised_sample():
    h = torch.randn(12, 10, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    y = torch.arange(12) % 3
    objective = vib(beta=0.0)  # no KL: the scale only gets a gradient through the sample z = μ + σ ε
    objective(h, y, torch.Generator().manual_seed(0))["loss"].backward()
    assert h.grad[:, :5].abs().sum() > 0 and h.grad[:, 5:].abs().sum() > 0
    # The evaluation latent is the mean, and the sample follows the generator.
    torch.testing.assert_close(objective.latent(h), h[:, :5])
    a = objective.sample(h, torch.Generator().manual_seed(3))
    b = objective.sample(h, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, objective.latent(h))
    assert vib(samples=4).sample(h, None).shape == (48, 5)


def test_vib_refuses_its_own_range_and_the_zero_entropy_noise():
    with pytest.raises(ValueError, match="β = -0.1"):
        vib(beta=-0.1)
    with pytest.raises(ValueError, match="noise"):
        make_objective("vib", ObjectiveSettings(latent_dim=5, num_classes=3, noise=True))
    assert OBJECTIVES.get("vib").encoder_width(5) == 10


# -- nlib ------------------------------------------------------------------------------------------------------


def test_nlib_penalises_its_kde_bound_and_can_learn_its_noise():
    from ibbench.estimators import kde_mutual_information

    g = torch.Generator().manual_seed(4)
    h, y = torch.randn(30, 5, generator=g), torch.arange(30) % 3
    settings = dict(latent_dim=5, num_classes=3, beta=0.5)
    plain = make_objective("nlib", ObjectiveSettings(**settings))
    with torch.no_grad():  # values only: the objective's parameters ask for gradients
        terms = plain(h, y, torch.Generator().manual_seed(0))
    bound = kde_mutual_information(h, 1 / (2 * torch.pi * torch.e))
    assert float(terms["i_xz_bound"]) == pytest.approx(float(bound), rel=1e-6)
    assert float(terms["loss"]) == pytest.approx(float(terms["ce"]) + 0.5 * float(bound), rel=1e-5)
    squared = make_objective("nlib", ObjectiveSettings(**settings, nlib_squared=True))
    squared.load_state_dict(plain.state_dict())
    with torch.no_grad():
        terms = squared(h, y, torch.Generator().manual_seed(0))
    assert float(terms["loss"]) == pytest.approx(float(terms["ce"]) + 0.5 * float(bound) ** 2, rel=1e-5)
    assert list(plain.parameters()) != [] and "log_var" not in dict(plain.named_parameters())
    learned = make_objective("nlib", ObjectiveSettings(**settings, nlib_learn_noise=True))
    learned(h, y, torch.Generator().manual_seed(0))["loss"].backward()
    assert learned.log_var.grad is not None and float(learned.log_var.grad) != 0.0
