"""Decoders: accuracy on problems with known answers, the Bayes rule for GMM, gradients, registry errors."""

from __future__ import annotations

import math

import pytest
import torch

from ibbench.decoders import (
    DECODERS,
    GMMDecoder,
    LogRegDecoder,
    ResFCDecoder,
    fit_decoder,
    make_decoder,
)
from ibbench.registry import UnknownNameError


def gaussian_blobs(n_per_class, d, num_classes, separation, seed, sample_seed=None):
    """Isotropic unit Gaussians around centres (from seed) `separation` apart on average; (N, d), (N,)."""
    centres = separation * torch.randn(num_classes, d, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed if sample_seed is None else sample_seed)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    z = centres[y] / math.sqrt(2) + torch.randn(len(y), d, generator=g)
    return z, y


def accuracy(decoder, z, y) -> float:
    with torch.no_grad():
        return float((decoder(z).argmax(1) == y).float().mean())


@pytest.mark.parametrize("covariance", ["full", "tied", "diag"])
def test_gmm_separates_well_separated_gaussians(covariance):
    z, y = gaussian_blobs(200, 8, 4, separation=12.0, seed=0)
    z_test, y_test = gaussian_blobs(200, 8, 4, separation=12.0, seed=0, sample_seed=1)
    decoder = GMMDecoder(8, 4, covariance=covariance).fit(z, y)
    assert not decoder.training
    assert accuracy(decoder, z_test, y_test) >= 0.99


def _two_class_equal_covariance(n: int, seed: int):
    """Two classes, equal priors, shared non-diagonal covariance: the Bayes rule is linear and known."""
    g = torch.Generator().manual_seed(seed)
    d = 4
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(123))
    cov = a @ a.t() + 0.5 * torch.eye(d)
    chol = torch.linalg.cholesky(cov)
    means = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -0.5, 0.8, 0.3]])
    y = torch.randint(0, 2, (n,), generator=g)
    z = means[y] + torch.randn(n, d, generator=g) @ chol.t()
    w = torch.linalg.solve(cov, means[1] - means[0])
    b = -0.5 * (means[1] + means[0]) @ w
    bayes = (z @ w + b > 0).long()
    return z, y, bayes


@pytest.mark.parametrize("covariance", ["tied", "full"])
def test_gmm_matches_analytic_bayes_rule(covariance):
    z, y, _ = _two_class_equal_covariance(20000, seed=0)
    z_test, y_test, bayes = _two_class_equal_covariance(4000, seed=1)
    decoder = GMMDecoder(4, 2, covariance=covariance).fit(z, y)
    with torch.no_grad():
        pred = decoder(z_test).argmax(1)
    assert float((pred == bayes).float().mean()) >= 0.99
    # The problem overlaps (Bayes accuracy well below 1), so agreement is not just "both are always right".
    assert float((bayes == y_test).float().mean()) < 0.95


def test_gmm_logits_are_log_posteriors_up_to_a_constant():
    z, y, _ = _two_class_equal_covariance(5000, seed=2)
    decoder = GMMDecoder(4, 2, covariance="full").fit(z, y)
    z64 = z.double()
    with torch.no_grad():
        logits = decoder(z[:50]).double()
    means = torch.stack([z64[y == c].mean(0) for c in range(2)])
    ridge = decoder.ridge * float((z64 - means[y]).pow(2).mean())  # relative to the within-class variance
    expected = []
    for c in range(2):
        zc = z64[y == c]
        cov = (zc - means[c]).t() @ (zc - means[c]) / len(zc) + ridge * torch.eye(4, dtype=torch.float64)
        mean = means[c]
        dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
        expected.append(math.log(len(zc) / len(z)) + dist.log_prob(z64[:50]))
    torch.testing.assert_close(logits, torch.stack(expected, 1), atol=1e-3, rtol=1e-4)


def test_gmm_with_fewer_samples_than_dimensions_and_offset_latents():
    g = torch.Generator().manual_seed(0)
    d = 20
    centres = 5 * torch.randn(3, d, generator=g)
    y = torch.tensor([0] * 5 + [1] * 5 + [2] * 30)
    z = 1000.0 + centres[y] + torch.randn(len(y), d, generator=g)  # far from the origin on purpose
    for covariance in ("full", "tied", "diag"):
        decoder = GMMDecoder(d, 3, covariance=covariance).fit(z, y)
        logits = decoder(z)
        assert torch.isfinite(logits).all()
        assert accuracy(decoder, z, y) == 1.0


def test_gmm_rejects_missing_class_and_unknown_covariance():
    z, y = gaussian_blobs(10, 3, 2, separation=5.0, seed=0)
    with pytest.raises(ValueError, match="class"):
        GMMDecoder(3, 3).fit(z, y)
    with pytest.raises(ValueError, match="full, tied, diag"):
        GMMDecoder(3, 2, covariance="spherical")


def test_logreg_learns_linearly_separable_problem_at_any_scale():
    g = torch.Generator().manual_seed(0)
    d = 10
    w = torch.randn(d, generator=g)
    z = torch.randn(3000, d, generator=g)
    margin = z @ w / w.norm()
    keep = margin.abs() > 0.2
    z, y = z[keep], (margin[keep] > 0).long()
    z_train, y_train, z_test, y_test = z[:1500], y[:1500], z[1500:], y[1500:]
    for scale, offset in ((1.0, 0.0), (1e3, -5e3)):
        decoder = LogRegDecoder(d, 2).fit(scale * z_train + offset, y_train)
        assert accuracy(decoder, scale * z_test + offset, y_test) >= 0.98


def test_logreg_multiclass_blobs():
    z, y = gaussian_blobs(150, 6, 5, separation=10.0, seed=3)
    decoder = fit_decoder("logreg", z, y, 5)
    assert isinstance(decoder, LogRegDecoder)
    assert accuracy(decoder, z, y) >= 0.98


def _xor(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.rand(n, 2, generator=g) - 1
    keep = (z.abs() > 0.1).all(1)  # a small gap around the axes keeps the labels unambiguous
    z = z[keep]
    return z, ((z[:, 0] > 0) ^ (z[:, 1] > 0)).long()


def small_resfc(d: int, c: int) -> ResFCDecoder:
    return ResFCDecoder(d, c, width=32, blocks=2, max_epochs=40, patience=5, batch_size=64, lr=3e-3)


def test_resfc_learns_xor_and_returns_in_eval_mode():
    torch.manual_seed(0)
    z, y = _xor(800, seed=0)
    z_test, y_test = _xor(600, seed=1)
    decoder = small_resfc(2, 2).fit(z, y)
    assert not decoder.training
    assert accuracy(decoder, z_test, y_test) >= 0.95
    # A linear decoder cannot do XOR: the problem really needs the nonlinearity.
    assert accuracy(LogRegDecoder(2, 2).fit(z, y), z_test, y_test) < 0.7


def test_resfc_is_deterministic_under_a_seed():
    z, y = gaussian_blobs(40, 3, 2, separation=3.0, seed=0)
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)
        decoder = ResFCDecoder(3, 2, width=16, blocks=1, max_epochs=3, batch_size=16).fit(z, y)
        with torch.no_grad():
            outputs.append(decoder(z))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gmm", "logreg", "resfc"])
def test_every_decoder_has_finite_nonzero_gradients_in_z(name):
    torch.manual_seed(0)
    z, y = gaussian_blobs(50, 5, 3, separation=4.0, seed=0)
    decoder = small_resfc(5, 3) if name == "resfc" else make_decoder(name, 5, 3)
    decoder.fit(z, y)
    parameters_before = [p.detach().clone() for p in decoder.parameters()]
    z_in = z.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(decoder(z_in), y)
    (grad,) = torch.autograd.grad(loss, z_in)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    for before, after in zip(parameters_before, decoder.parameters(), strict=True):
        assert torch.equal(before, after)


def test_registry_names_and_unknown_name_lists_valid_ones():
    assert DECODERS.names() == ["gmm", "logreg", "resfc"]
    with pytest.raises(UnknownNameError, match="gmm, logreg, resfc"):
        make_decoder("knn", 4, 2)


def test_forward_before_fit_fails_and_state_dict_round_trips():
    z, y = gaussian_blobs(30, 4, 2, separation=6.0, seed=0)
    with pytest.raises(RuntimeError, match="before fit"):
        make_decoder("gmm", 4, 2)(z)
    fitted = fit_decoder("gmm", z, y, 2)
    restored = make_decoder("gmm", 4, 2)
    restored.load_state_dict(fitted.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(restored(z), fitted(z))


def test_fit_rejects_bad_inputs():
    decoder = make_decoder("logreg", 4, 2)
    with pytest.raises(ValueError, match="shape"):
        decoder.fit(torch.zeros(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        decoder.fit(torch.zeros(5, 4), torch.full((5,), 2))


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["gmm", "logreg", "resfc"])
def test_decoders_fitted_on_cuda_match_the_cpu(name):
    """Overlapping classes (accuracy ≈ 0.9, room to differ), held-out test points. GMM (float64 moments) and the
    logistic regression (convex, from zero) are deterministic fits: the same logits up to float error. The ResFC
    initialises from the device's RNG, so it matches in accuracy, within what its seeds spread on the CPU (±0.02)."""
    z, y = gaussian_blobs(100, 5, 3, separation=1.5, seed=0)
    z_test, y_test = gaussian_blobs(100, 5, 3, separation=1.5, seed=0, sample_seed=1)

    def fitted(device: str):
        torch.manual_seed(0)
        decoder = small_resfc(5, 3) if name == "resfc" else make_decoder(name, 5, 3)
        return decoder.fit(z.to(device), y.to(device))

    cpu, gpu = fitted("cpu"), fitted("cuda")
    assert all(t.is_cuda for t in gpu.state_dict().values())
    acc_cpu = accuracy(cpu, z_test, y_test)
    acc_gpu = accuracy(gpu, z_test.cuda(), y_test.cuda())
    assert 0.8 < acc_cpu < 0.97
    if name == "resfc":
        assert acc_gpu == pytest.approx(acc_cpu, abs=0.04)
    else:
        with torch.no_grad():
            torch.testing.assert_close(gpu(z_test.cuda()).cpu(), cpu(z_test), rtol=1e-3, atol=1e-3)
        assert acc_gpu == pytest.approx(acc_cpu, abs=1 / len(y_test))  # a point on the boundary may tie
    z_in = z_test.cuda().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(gpu(z_in), y_test.cuda()), z_in)
    z_ref = z_test.clone().requires_grad_(True)
    (grad_cpu,) = torch.autograd.grad(torch.nn.functional.cross_entropy(cpu(z_ref), y_test), z_ref)
    assert grad.is_cuda and torch.isfinite(grad).all()
    if name != "resfc":  # what the attacks follow: the same input gradient on both devices
        torch.testing.assert_close(grad.cpu(), grad_cpu, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", ["gmm", "logreg", "resfc"])
def test_a_fitted_decoder_forward_never_reads_the_device(name):
    """Attacks differentiate through forward hundreds of times: it must not wait for the device (on CUDA)."""
    from host_reads import HostReads

    z, y = gaussian_blobs(60, 5, 3, separation=10.0, seed=0)
    decoder = small_resfc(5, 3) if name == "resfc" else make_decoder(name, 5, 3)
    decoder.fit(z, y)
    z_in = z.clone().requires_grad_(True)
    with HostReads() as reads:
        torch.autograd.grad(torch.nn.functional.cross_entropy(decoder(z_in), y), z_in)
    assert reads.count == 0
    restored = small_resfc(5, 3) if name == "resfc" else make_decoder(name, 5, 3)
    restored.load_state_dict(decoder.state_dict())  # fitted through the state_dict alone
    restored(z)


def test_the_logistic_regression_log_reports_the_final_loss(caplog):
    z, y = gaussian_blobs(60, 5, 3, separation=3.0, seed=1)
    with caplog.at_level("DEBUG", logger="ibbench.decoders"):
        decoder = make_decoder("logreg", 5, 3).fit(z, y)
    (message,) = [r.getMessage() for r in caplog.records if "logreg fitted" in r.getMessage()]
    reported = float(message.split("final loss ")[1].split(" nats")[0])
    with torch.no_grad():
        x = (z - decoder.mean) / decoder.scale
        penalty = 0.5 * decoder.l2 * decoder.linear.weight.pow(2).sum()
        final = torch.nn.functional.cross_entropy(decoder.linear(x), y) + penalty
    assert reported == pytest.approx(float(final), rel=1e-3) and reported < math.log(3)  # not the initial log C
