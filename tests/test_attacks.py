"""Attacks: FGSM against a linear model's analytic gradient, box constraints, side effects, PGD vs FGSM; the suite
(margin attacks, torchattacks' APGD and Square), the per-image worst case and the masking diagnostics."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ibbench.attacks import (
    ATTACKS,
    DEFAULT_EPS,
    WORST,
    AttackSettings,
    accuracy_curves,
    apgd,
    attack_suite,
    eval_mode,
    fgsm,
    masking_diagnostics,
    pgd,
    robustness_curve,
    run_attack,
    square,
    worst_case,
    zero_gradient_share,
)


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


@pytest.mark.cuda
def test_attacks_on_cuda_give_the_cpu_curves(digits_model):
    """The same model and images on both devices. FGSM is deterministic and PGD starts from a CPU generator's
    points, so their curves agree up to the images that float rounding flips; the suite's seeded attacks draw
    from the device's own RNG (APGD, Square), so its curves agree up to that randomness."""
    model, x, y = digits_model
    gpu = copy.deepcopy(model).cuda()
    xc, yc = x.cuda(), y.cuda()
    eps = [0.0, 2 / 255, 8 / 255, 32 / 255, 0.3]
    flips = 3 / len(y)  # a few images whose logits tie within float error
    cpu_fgsm = robustness_curve(model, x, y, eps, attack="fgsm", batch_size=128)
    gpu_fgsm = robustness_curve(gpu, xc, yc, eps, attack="fgsm", batch_size=128)
    cpu_pgd = robustness_curve(model, x, y, eps, "pgd", 128, 10, torch.Generator().manual_seed(0))
    gpu_pgd = robustness_curve(gpu, xc, yc, eps, "pgd", 128, 10, torch.Generator().manual_seed(0))
    assert list(gpu_fgsm) == list(gpu_pgd) == eps
    for e in eps:
        assert gpu_fgsm[e] == pytest.approx(cpu_fgsm[e], abs=flips), (e, gpu_fgsm, cpu_fgsm)
        assert gpu_pgd[e] == pytest.approx(cpu_pgd[e], abs=0.02), (e, gpu_pgd, cpu_pgd)
    assert gpu_pgd[32 / 255] < gpu_pgd[0.0] - 0.5  # an attack on CUDA too, not a no-op matching a no-op

    cpu_suite = accuracy_curves(attack_suite(model, x, y, eps, FAST))
    gpu_suite = accuracy_curves(attack_suite(gpu, xc, yc, eps, FAST))
    assert set(gpu_suite) == set(cpu_suite) == set(FAST.attacks) | {WORST}
    for name, curve in cpu_suite.items():
        # Square's random search on another RNG stream breaks a different share of the images it might break
        tolerance = flips if name in ("fgsm", "fgsm_margin") else 0.08 if name == "square" else 0.03
        for e in eps:
            assert gpu_suite[name][e] == pytest.approx(curve[e], abs=tolerance), (name, e, gpu_suite[name], curve)
    assert gpu_suite[WORST][0.3] <= 0.05  # the suite breaks this undefended model on CUDA as on the CPU

    x_adv = pgd(gpu, xc[:8], yc[:8], 0.1, steps=2, generator=torch.Generator().manual_seed(0))
    x_cpu = pgd(model, x[:8], y[:8], 0.1, steps=2, generator=torch.Generator().manual_seed(0))
    assert x_adv.is_cuda and (x_adv - xc[:8]).abs().max() <= 0.1 + 1e-6
    assert (x_adv.cpu() == x_cpu).float().mean() > 0.95  # the same random start and (almost all) the same steps


# -- the suite: margin attacks, torchattacks, worst case, masking diagnostics -----------------------------------


class Saturated(nn.Module):
    """A model's logits × 1000: the float32 softmax saturates and the cross-entropy gradient is exactly zero."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return 1000 * self.model(x)


class Counting(nn.Module):
    """Counts forward calls."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


FAST = AttackSettings(pgd_steps=10, apgd_steps=20, square_queries=100, batch_size=500)


def test_saturated_decoder_blinds_ce_fgsm_but_not_the_margin_attacks(digits_model):
    model, x, y = digits_model
    saturated = Saturated(model)
    share = zero_gradient_share(saturated, x, y)
    assert share >= 0.5
    assert zero_gradient_share(model, x, y) < 0.01
    eps = [0.0, 0.3]
    settings = dataclasses.replace(FAST, attacks=("fgsm", "fgsm_margin", "pgd_margin", "apgd_dlr"))
    curves = accuracy_curves(attack_suite(saturated, x, y, eps, settings))
    clean = curves["fgsm"][0.0]
    assert clean > 0.9
    assert curves["fgsm"][0.3] >= 0.5  # blind: most images do not move at all
    assert min(curves["fgsm_margin"][0.3], curves["apgd_dlr"][0.3]) <= 0.05
    assert curves[WORST][0.3] <= 0.05
    diagnostics = masking_diagnostics(curves, share)
    assert diagnostics["ce_blind"] and diagnostics["zero_grad_share"] == share
    assert not diagnostics["unreliable"]  # the worst case is honest: the margin attacks broke it
    # The paper's FGSM alone on the same model: its worst case at ε = 0.3 is far above 0 %: unreliable.
    alone = accuracy_curves(attack_suite(saturated, x, y, eps, dataclasses.replace(FAST, attacks=("fgsm",))))
    flagged = masking_diagnostics(alone, share)
    assert flagged["unreliable"] and "worst-case accuracy" in flagged["reasons"][0]


def test_worst_case_is_per_image_not_a_minimum_of_rates():
    first_half = torch.tensor([False] * 5 + [True] * 5)
    per_image = {"fgsm": {0.1: first_half}, "square": {0.1: ~first_half}}  # each breaks a disjoint half
    worst = worst_case(per_image)
    assert worst[0.1].sum() == 0
    curves = accuracy_curves({**per_image, WORST: worst})
    assert curves["fgsm"][0.1] == curves["square"][0.1] == 0.5 and curves[WORST][0.1] == 0.0
    assert not worst_case({"fgsm": first_half, "square": ~first_half}).any()  # one radius: masks directly


def test_worst_case_is_never_above_any_attack(digits_model):
    model, x, y = digits_model
    eps = [0.0, 4 / 255, 0.1]
    per_image = attack_suite(model, x[:120], y[:120], eps, FAST)
    assert set(per_image) == set(FAST.attacks) | {WORST}
    curves = accuracy_curves(per_image)
    for e in eps:
        assert all(curves[WORST][e] <= curves[a][e] for a in FAST.attacks)
        robust_somewhere = torch.stack([per_image[a][e] for a in FAST.attacks])
        assert torch.equal(per_image[WORST][e], robust_somewhere.all(0))
    assert len({curves[a][0.0] for a in per_image}) == 1  # ε = 0: clean accuracy for every attack
    for a in per_image:  # an example found at a small radius lies in every larger ball: monotone per image
        assert not (per_image[a][0.1] & ~per_image[a][4 / 255]).any()


def test_larger_radii_attack_only_the_images_still_standing():
    model = Counting(linear_model())
    x = torch.rand(64, 1, 3, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)  # every image clean-correct
    model.calls = 0
    settings = AttackSettings(attacks=("pgd_margin",), pgd_steps=2)
    per_image = attack_suite(model, x, y, [0.5, 0.0, 0.05], settings)["pgd_margin"]
    assert list(per_image) == [0.5, 0.0, 0.05]  # the caller's order
    assert per_image[0.5].sum() < per_image[0.05].sum() <= 64
    assert model.calls == 1 + 2 * (2 + 1)  # clean, then 2 steps and a prediction at each radius


@pytest.mark.parametrize("steps", [1, 3])
def test_pgd_takes_the_configured_number_of_steps(steps):
    model = Counting(linear_model())
    x = torch.rand(8, 1, 3, 4)
    y = torch.randint(0, 3, (8,))
    pgd(model, x, y, 0.1, steps=steps, loss="margin")
    assert model.calls == steps
    model.calls = 0
    settings = AttackSettings(attacks=("pgd_margin",), pgd_steps=steps)
    run_attack("pgd_margin", model, x, y, 0.1, settings)
    assert model.calls == steps
    model.calls = 0
    pgd(model, x, y, 0.1, steps=steps, restarts=2)
    assert model.calls == 2 * (steps + 1)  # each restart's steps, then one forward to keep what it broke


@pytest.mark.parametrize("attack", ATTACKS)
def test_every_attack_stays_in_the_eps_ball_and_the_box(attack):
    model = linear_model()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(32, 1, 3, 4, generator=g)
    x[0], x[1] = 0.0, 1.0
    y = torch.randint(0, 3, (32,), generator=g)
    for eps in (1 / 255, 0.1, 0.5):
        x_adv = run_attack(attack, model, x, y, eps, FAST, torch.Generator().manual_seed(0))
        assert x_adv.shape == x.shape
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert (x_adv - x).abs().max() <= eps + 1e-6
    if attack != "fgsm":  # the margin loss and APGD/Square: a linear 3-class model falls at ε = 0.5
        x_adv = run_attack(attack, model, x, y, 0.5, FAST, torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert (model(x_adv).argmax(1) == y).float().mean() < (model(x).argmax(1) == y).float().mean()


def test_torchattacks_leave_the_global_rng_and_module_modes_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, 3))
    model.train()
    model[2].eval()
    x = torch.rand(10, 1, 3, 4)
    y = torch.randint(0, 3, (10,))
    state = torch.get_rng_state()
    a = apgd(model, x, y, 0.1, "dlr", steps=5, seed=3)
    b = square(model, x, y, 0.1, queries=20, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # torchattacks reseeds the global RNG: undone
    assert [m.training for m in model] == [True, True, False, True, True]
    assert torch.equal(a, apgd(model, x, y, 0.1, "dlr", steps=5, seed=3))  # its own seed makes it repeatable
    assert torch.equal(b, square(model, x, y, 0.1, queries=20, seed=3))
    with pytest.raises(ValueError, match="images"):
        apgd(model, x.flatten(1), y, 0.1)


def test_apgd_and_square_are_torchattacks_own_without_the_package_imported():
    """A process that attacks loads torchattacks' APGD and Square files alone (not its __init__, whose TIFGSM
    imports scipy.stats), and they attack exactly as `torchattacks.APGD` and `torchattacks.Square` do."""
    import subprocess
    import sys

    code = (
        "import sys, torch\nfrom torch import nn\nfrom ibbench.attacks import apgd, square\n"
        "torch.manual_seed(0)\nmodel = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))\n"
        "x, y = torch.rand(10, 1, 3, 4), torch.randint(0, 3, (10,))\n"
        "a, b = apgd(model, x, y, 0.2, 'ce', steps=5, seed=1), square(model, x, y, 0.2, queries=20, seed=1)\n"
        "before = [m for m in ('torchattacks', 'scipy') if m in sys.modules]\n"
        "import torchattacks\n"
        "with torch.random.fork_rng():\n"
        "    ta = torchattacks.APGD(model.eval(), norm='Linf', eps=0.2, steps=5, seed=1, loss='ce', eot_iter=1)(x, y)\n"
        "    tb = torchattacks.Square(model, norm='Linf', eps=0.2, n_queries=20, loss='margin', seed=1)(x, y)\n"
        "print(before, torch.equal(a, ta), torch.equal(b, tb), bool((a != x).any()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[] True True True"


def test_masking_diagnostics_flag_a_stronger_black_box_attack():
    curves = {
        "fgsm": {0.0: 0.9, 0.1: 0.8, 0.2: 0.04},
        "apgd_dlr": {0.0: 0.9, 0.1: 0.7, 0.2: 0.03},
        "square": {0.0: 0.9, 0.1: 0.4, 0.2: 0.02},
        WORST: {0.0: 0.9, 0.1: 0.4, 0.2: 0.02},
    }
    found = masking_diagnostics(curves, 0.0)
    assert found["square_gap"] == pytest.approx(0.3) and found["square_gap_eps"] == 0.1
    assert found["unreliable"] and "Square" in found["reasons"][0]
    assert found["worst_at_max_eps"] == 0.02 and found["max_eps"] == 0.2 and not found["ce_blind"]
    honest = {**curves, "square": {0.0: 0.9, 0.1: 0.75, 0.2: 0.03}, WORST: {0.0: 0.9, 0.1: 0.7, 0.2: 0.02}}
    assert not masking_diagnostics(honest, 0.0)["unreliable"]
    assert masking_diagnostics(honest, 0.2)["ce_blind"]


def test_a_chance_level_model_is_not_called_masked():
    # A collapsed model that predicts one class: attacks cannot flip that class's images (10 % of them).
    flat = {0.0: 0.1, 0.1: 0.1, 0.2: 0.1}
    curves = {"fgsm": flat, "apgd_dlr": flat, "square": flat, WORST: flat}
    at_chance = masking_diagnostics(curves, 1.0, chance=0.1)
    assert at_chance["chance_level"] and not at_chance["unreliable"] and at_chance["clean"] == 0.1
    assert masking_diagnostics(curves, 1.0)["unreliable"]  # without the class shares it cannot tell
    above = {0.0: 0.9, 0.1: 0.5, 0.2: 0.1}
    masked = masking_diagnostics({"fgsm": above, "square": above, WORST: above}, 0.0, chance=0.1)
    assert masked["unreliable"] and not masked["chance_level"]
