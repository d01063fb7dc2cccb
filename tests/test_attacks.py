"""Attacks: FGSM against a linear model's analytic gradient, box constraints, side effects, PGD vs FGSM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ibbench.attacks import DEFAULT_EPS, eval_mode, fgsm, pgd, robustness_curve


def linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))


@pytest.fixture(scope="module")
def digits_model():
    """A small MLP trained in about a second on sklearn digits scaled to [0, 1]; (model, x_test, y_test)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimiser.zero_grad()
        F.cross_entropy(model(x[train]), y[train]).backward()
        optimiser.step()
    model.zero_grad(set_to_none=True)
    return model, x[test], y[test]


def test_fgsm_moves_each_pixel_by_eps_along_the_analytic_gradient_sign():
    model = linear_model()
    g = torch.Generator().manual_seed(1)
    x = 0.4 + 0.2 * torch.rand(16, 1, 3, 4, generator=g)  # mid-range, so eps = 0.05 never clamps
    y = torch.randint(0, 3, (16,), generator=g)
    eps = 0.05
    x_adv = fgsm(model, x, y, eps)
    linear = model[1]
    with torch.no_grad():
        probs = torch.softmax(model(x), 1)
        # d CE / d x = Wᵀ (softmax(Wx + b) − onehot(y)) per sample
        grad = ((probs - F.one_hot(y, 3).float()) @ linear.weight).reshape(x.shape)
    assert (grad != 0).all()
    torch.testing.assert_close(x_adv - x, eps * grad.sign(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_adversarial_inputs_stay_in_box_and_eps_ball(attack):
    model = linear_model()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(32, 1, 3, 4, generator=g)
    x[0] = 0.0
    x[1] = 1.0
    y = torch.randint(0, 3, (32,), generator=g)
    for eps in (1 / 255, 0.1, 0.5):
        if attack == "fgsm":
            x_adv = fgsm(model, x, y, eps)
        else:
            x_adv = pgd(model, x, y, eps, steps=5, generator=torch.Generator().manual_seed(0))
        assert x_adv.shape == x.shape
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert (x_adv - x).abs().max() <= eps + 1e-6


def test_eps_zero_returns_input_and_clean_accuracy(digits_model):
    model, x, y = digits_model
    assert torch.equal(fgsm(model, x, y, 0.0), x)
    assert torch.equal(pgd(model, x, y, 0.0), x)
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    assert clean > 0.9
    for attack in ("fgsm", "pgd"):
        curve = robustness_curve(model, x, y, [0.0], attack=attack, batch_size=100)
        assert curve == {0.0: pytest.approx(clean)}


def test_attacks_leave_parameter_grads_and_modes_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, 3))
    model.train()
    model[2].eval()  # a mixed-mode model: each submodule's own flag must come back
    model[1].weight.grad = torch.full_like(model[1].weight, 7.0)
    x = torch.rand(10, 1, 3, 4)
    y = torch.randint(0, 3, (10,))
    running_mean = model[3].running_mean.clone()
    fgsm(model, x, y, 0.1)
    pgd(model, x, y, 0.1, steps=3)
    robustness_curve(model, x, y, [0.0, 0.1], attack="pgd", batch_size=4, pgd_steps=2)
    assert [m.training for m in model] == [True, True, False, True, True]
    assert torch.equal(model[1].weight.grad, torch.full_like(model[1].weight, 7.0))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "1.weight")
    # Eval mode during the attack means BatchNorm's running statistics were not updated.
    assert torch.equal(model[3].running_mean, running_mean)


def test_eval_mode_restores_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training
        raise RuntimeError("boom")
    assert model.training and model[1].training


def test_pgd_is_at_least_as_strong_as_fgsm_and_monotone(digits_model):
    model, x, y = digits_model
    eps_list = [0.0, 2 / 255, 8 / 255, 16 / 255, 32 / 255]
    fgsm_curve = robustness_curve(model, x, y, eps_list, attack="fgsm", batch_size=128)
    pgd_curve = robustness_curve(model, x, y, eps_list, attack="pgd", batch_size=128, pgd_steps=10)
    assert list(pgd_curve) == eps_list
    for eps in eps_list:
        assert pgd_curve[eps] <= fgsm_curve[eps] + 0.01
    # PGD searches nested eps-balls, so its accuracy falls with eps (up to its own randomness). FGSM is a
    # single linearised step with no such guarantee, so only its endpoints are compared.
    values = list(pgd_curve.values())
    assert all(b <= a + 0.01 for a, b in zip(values, values[1:], strict=False))
    assert fgsm_curve[eps_list[-1]] < fgsm_curve[0.0]
    assert pgd_curve[eps_list[-1]] < pgd_curve[0.0] - 0.2


def test_pgd_random_start_follows_the_generator():
    model = linear_model()
    x = torch.rand(8, 1, 3, 4)
    y = torch.randint(0, 3, (8,))
    # A step much smaller than eps, so the random start is not projected away.
    a = pgd(model, x, y, 0.1, steps=1, alpha=0.01, generator=torch.Generator().manual_seed(5))
    b = pgd(model, x, y, 0.1, steps=1, alpha=0.01, generator=torch.Generator().manual_seed(5))
    c = pgd(model, x, y, 0.1, steps=1, alpha=0.01, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_robustness_curve_rejects_unknown_attack_and_defaults_eps():
    model = linear_model()
    x = torch.rand(4, 1, 3, 4)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="fgsm, pgd"):
        robustness_curve(model, x, y, [0.0], attack="cw")
    curve = robustness_curve(model, x, y)
    assert list(curve) == [float(e) for e in DEFAULT_EPS]
    assert DEFAULT_EPS[-1] == pytest.approx(16 / 255)
    assert all(0.0 <= v <= 1.0 for v in curve.values())
    with pytest.raises(ValueError, match="eps"):
        fgsm(model, x, y, -0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attacks_on_cuda_with_a_cpu_generator():
    model = linear_model().cuda()
    x = torch.rand(8, 1, 3, 4, device="cuda")
    y = torch.randint(0, 3, (8,), device="cuda")
    x_adv = pgd(model, x, y, 0.1, steps=2, generator=torch.Generator().manual_seed(0))
    assert x_adv.is_cuda and (x_adv - x).abs().max() <= 0.1 + 1e-6
    generator = torch.Generator().manual_seed(0)
    curve = robustness_curve(model, x, y, [0.0, 0.1], attack="pgd", generator=generator)
    assert list(curve) == [0.0, 0.1]
