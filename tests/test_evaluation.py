"""Evaluation helpers: encode's modes and noise, the information-plane point, decoder accuracy, robustness."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ibbench.attacks import WORST, AttackSettings
from ibbench.decoders import Decoder
from ibbench.estimators import ZERO_ENTROPY_STD
from ibbench.evaluation import (
    EncoderDecoder,
    decoder_accuracy,
    encode,
    fit_decoders,
    information_plane,
    robustness,
    robustness_suite,
    stratified_subset,
)

SMALL_RESFC = {"width": 32, "blocks": 1, "max_epochs": 60}


def blobs(n_per_class: int, d: int, num_classes: int, scale: float, seed: int):
    """Unit Gaussians around centres `scale`·N(0, I); (N, d) float32, (N,) int64."""
    g = torch.Generator().manual_seed(seed)
    centres = scale * torch.randn(num_classes, d, generator=g)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[y] + torch.randn(len(y), d, generator=g), y


def tiny_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6), nn.Dropout(0.3), nn.Linear(6, 3))


def test_information_plane_well_separated_classes():
    torch.manual_seed(0)
    z, y = blobs(150, 4, 3, scale=20.0, seed=0)
    point = information_plane(z, y, num_classes=3, k=3, **SMALL_RESFC, validation=(z[:30], y[:30]))
    assert set(point) == {"i_xz", "h_y_given_z", "h_y_given_z_in_sample", "val_h_y_given_z"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in point.values())
    assert 0.0 <= point["h_y_given_z"] < 0.1


def test_information_plane_uninformative_latents_and_gaussian_entropy():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    d, n, c = 2, 900, 3
    z = torch.randn(n, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)  # labels independent of z: H[Y|Z] = H[Y] ≈ log 3
    point = information_plane(z, y, num_classes=c, k=3, **SMALL_RESFC)
    # Cross-fitted: no probe can beat log C on latents it never saw; fitted on them, it can.
    assert point["h_y_given_z"] == pytest.approx(math.log(c), abs=0.1)
    assert point["h_y_given_z_in_sample"] < point["h_y_given_z"]
    # H of a standard normal in d dims is (d/2) log(2πe) nats
    assert point["i_xz"] == pytest.approx(0.5 * d * math.log(2 * math.pi * math.e), abs=0.2)


def test_encode_restores_modes_and_respects_noise_flag():
    encoder = tiny_encoder()
    encoder.train()
    x = torch.rand(50, 1, 4, 4)
    z1 = encode(encoder, x, batch_size=7)
    z2 = encode(encoder, x, batch_size=50)
    assert encoder.training and all(m.training for m in encoder)
    assert z1.shape == (50, 3) and z1.dtype == torch.float32 and not z1.requires_grad
    torch.testing.assert_close(z1, z2)  # eval mode: BatchNorm and Dropout do not depend on the batch
    noisy = encode(encoder, x, noise=True, generator=torch.Generator().manual_seed(0))
    again = encode(encoder, x, noise=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)
    assert (noisy - z1).std().item() == pytest.approx(ZERO_ENTROPY_STD, rel=0.25)
    encoder.eval()
    encode(encoder, x)
    assert not encoder.training


def test_fit_decoders_accuracy_and_robustness_through_encoder_decoder():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    prototypes = torch.rand(3, 1, 4, 4, generator=g)
    y = torch.arange(3).repeat(60)
    x = (prototypes[y] + 0.05 * torch.randn(len(y), 1, 4, 4, generator=g)).clamp(0, 1)
    encoder = tiny_encoder()
    z = encode(encoder, x)
    decoders = fit_decoders(["gmm", "logreg"], z, y, num_classes=3)
    assert set(decoders) == {"gmm", "logreg"}
    assert all(isinstance(d, Decoder) for d in decoders.values())
    clean = decoder_accuracy(decoders["gmm"], z, y)
    assert clean > 0.9
    eps_list = [0.0, 4 / 255, 0.3]
    curve = robustness(encoder, decoders["gmm"], x, y, eps_list, attack="fgsm", batch_size=64)
    assert list(curve) == eps_list
    assert curve[0.0] == pytest.approx(clean)
    assert all(0.0 <= v <= 1.0 for v in curve.values())
    assert curve[0.3] < curve[0.0]
    pgd_curve = robustness(encoder, decoders["logreg"], x, y, eps_list, attack="pgd")
    fgsm_logreg = robustness(encoder, decoders["logreg"], x, y, eps_list, attack="fgsm")
    assert list(pgd_curve) == eps_list
    assert pgd_curve[0.0] == pytest.approx(decoder_accuracy(decoders["logreg"], z, y))
    assert all(pgd_curve[e] <= fgsm_logreg[e] + 1 / len(y) for e in eps_list)  # PGD is at least FGSM's strength
    assert pgd_curve[0.3] < pgd_curve[0.0] - 0.2  # and an attack at all
    # EncoderDecoder is a plain composition: no noise, so it is deterministic in eval mode.
    model = EncoderDecoder(encoder, decoders["gmm"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), decoders["gmm"](encode(encoder, x)))


def test_stratified_subset_keeps_class_shares_and_is_fixed_by_its_seed():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    index = stratified_subset(y, 10, seed=0)
    assert index.tolist() == sorted(index.tolist()) and len(set(index.tolist())) == 10
    assert torch.bincount(y[index], minlength=3).tolist() == [5, 3, 2]
    assert torch.equal(index, stratified_subset(y, 10, seed=0))
    assert not torch.equal(index, stratified_subset(y, 10, seed=1))
    assert torch.equal(stratified_subset(y, 1000, seed=0), torch.arange(100))  # the default takes all of digits
    uneven = stratified_subset(y, 7, seed=0)
    assert len(uneven) == 7 and set(y[uneven].tolist()) == {0, 1, 2}


def test_eot_model_averages_noise_draws_and_stays_differentiable():
    encoder = tiny_encoder().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    decoder = fit_decoders(["gmm"], encode(encoder, x, noise=True, generator=g), y, num_classes=3)["gmm"]
    plain = EncoderDecoder(encoder, decoder)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), decoder(encoder(x)))
    one = EncoderDecoder(encoder, decoder, noise_draws=1, generator=torch.Generator().manual_seed(3))
    again = EncoderDecoder(encoder, decoder, noise_draws=1, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(one(x), again(x))  # the model's own generator: reproducible draws
        assert not torch.allclose(one(x), plain(x).log_softmax(1))  # the noise is on
    many = EncoderDecoder(encoder, decoder, noise_draws=16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        probs = many(x).exp()
    torch.testing.assert_close(probs.sum(1), torch.ones(40))  # log of the mean softmax: a distribution
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(many(xr).logsumexp(1).sum() - many(xr)[:, 0].sum(), xr)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_robustness_suite_attacks_every_decoder_and_reports_masking():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    prototypes = torch.rand(3, 1, 4, 4, generator=g)
    y = torch.arange(3).repeat(30)
    x = (prototypes[y] + 0.05 * torch.randn(len(y), 1, 4, 4, generator=g)).clamp(0, 1)
    encoder = tiny_encoder()
    decoders = fit_decoders(["gmm", "logreg"], encode(encoder, x), y, num_classes=3)
    settings = AttackSettings(pgd_steps=3, apgd_steps=5, square_queries=20)
    out = robustness_suite(encoder, decoders, x, y, [0.0, 0.1, 0.5], settings, eot_draws=0)
    assert set(out) == {"robustness", "masking"}
    for name in ("gmm", "logreg"):
        curves = out["robustness"][name]
        assert set(curves) == set(settings.attacks) | {WORST}
        assert curves[WORST][0.0] == pytest.approx(decoder_accuracy(decoders[name], encode(encoder, x), y))
        assert curves[WORST][0.5] <= min(curves[a][0.5] for a in settings.attacks)
        assert out["masking"][name]["max_eps"] == 0.5
        assert 0.0 <= out["masking"][name]["zero_grad_share"] <= 1.0
