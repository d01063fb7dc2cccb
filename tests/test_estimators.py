"""The k-NN entropy estimator against closed forms, an independent scipy reference and its own identities."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from scipy.special import digamma, gammaln

from ibbench.estimators import (
    ZERO_ENTROPY_STD,
    add_zero_entropy_noise,
    conditional_knn_entropy,
    knn_entropy,
    knn_neighbours,
    log_unit_ball_volume,
)


def reference_entropy(x: np.ndarray, k: int) -> float:
    """Kraskov eq. 20 with ε = 2r and c_d = V_d/2^d, computed independently in float64 with a k-d tree."""
    n, d = x.shape
    dist, _ = cKDTree(x).query(x, k=k + 1)  # column 0 is the point itself
    log_vd = 0.5 * d * math.log(math.pi) - gammaln(d / 2 + 1)
    return float(digamma(n) - digamma(k) + log_vd + d * np.mean(np.log(dist[:, k])))


def gaussian_entropy(cov: np.ndarray) -> float:
    d = cov.shape[0]
    return 0.5 * (d * math.log(2 * math.pi * math.e) + np.linalg.slogdet(cov)[1])


# Tolerance for closed-form checks, from the estimator's measured behaviour on standard Gaussians (8 seeds per
# cell, d ∈ {1, 2, 5, 10}, N ∈ {1000, 5000}, k ∈ {1, 3, 10}): the bias stays below 0.25 nats (worst at d = 10,
# N = 1000, k = 10, where the k-th neighbour ball is wide enough to see the density's curvature) and the
# standard deviation below 0.1 nats; the largest error seen was 0.42 nats at d = 10. 0.1 + 0.05·d covers bias
# plus four standard deviations, and still catches the classic constant errors: the ψ(N) sign typo (−2ψ(N),
# −13.8 nats at N = 1000) and the radius/diameter mix-up (d·log 2 = 0.69 d).
def closed_form_tol(d: int) -> float:
    return 0.1 + 0.05 * d


@pytest.mark.parametrize("d", [1, 2, 5, 10])
@pytest.mark.parametrize("n", [1000, 5000])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_isotropic_gaussian(d, n, k):
    g = torch.Generator().manual_seed(1000 * d + n + k)
    sigma = 1.7
    z = sigma * torch.randn(n, d, generator=g, dtype=torch.float64)
    true = gaussian_entropy(sigma**2 * np.eye(d))
    assert abs(float(knn_entropy(z, k)) - true) < closed_form_tol(d)


@pytest.mark.parametrize("d", [2, 5, 10])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_gaussian_with_random_covariance(d, k):
    g = torch.Generator().manual_seed(d * 31 + k)
    n = 5000
    # A random rotation and random scales in [0.5, 2]: the estimator is not affine-invariant at finite N, and
    # strongly elongated Gaussians need far more samples (the k-th neighbour ball spans the thin directions).
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = 0.5 + 1.5 * torch.rand(d, generator=g, dtype=torch.float64)
    a = q @ torch.diag(scales)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) @ a.T + 3.0
    true = gaussian_entropy((a @ a.T).numpy())
    assert abs(float(knn_entropy(z, k)) - true) < closed_form_tol(d)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_uniform_cube(d):
    g = torch.Generator().manual_seed(d)
    side = 2.5
    z = side * torch.rand(5000, d, generator=g, dtype=torch.float64)
    # The cube's faces bias the estimate slightly upwards (boundary points see fewer neighbours).
    assert abs(float(knn_entropy(z, 3)) - d * math.log(side)) < closed_form_tol(d)


def test_affine_identity_and_permutation_invariance():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(700, 6, generator=g, dtype=torch.float64)
    h = float(knn_entropy(z, 3))
    for a in (0.01, 3.7, -2.0):
        b = torch.randn(6, generator=g, dtype=torch.float64) * 10
        assert float(knn_entropy(a * z + b, 3)) == pytest.approx(h + 6 * math.log(abs(a)), rel=0, abs=1e-9)
    perm = torch.randperm(700, generator=g)
    assert float(knn_entropy(z[perm], 3)) == pytest.approx(h, rel=0, abs=1e-12)


def _reference_cases():
    g = torch.Generator().manual_seed(7)
    yield "gaussian-d16", torch.randn(2000, 16, generator=g, dtype=torch.float64)
    yield "gaussian-d2", torch.randn(3000, 2, generator=g, dtype=torch.float64)
    yield "gaussian-d1", torch.randn(3000, 1, generator=g, dtype=torch.float64)
    yield "offset-tight", 30.0 + 1e-3 * torch.randn(3000, 10, generator=g, dtype=torch.float64)
    clusters = torch.cat([50 + 1e-3 * torch.randn(1000, 64, generator=g), -50 + 1e-3 * torch.randn(1000, 64)])
    yield "far-tight-clusters", clusters.double()
    yield "d256", torch.randn(1500, 256, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_agrees_with_independent_reference(k, dtype, rel):
    for name, z in _reference_cases():
        z = z.to(dtype)
        ref = reference_entropy(z.double().numpy(), k)  # the same (rounded) values, in float64
        est = float(knn_entropy(z, k))
        assert abs(est - ref) <= rel * abs(ref), (name, est, ref)


def test_blocked_and_unblocked_agree_in_value_and_gradient():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(500, 8, generator=g, dtype=torch.float64)
    grads, values = [], []
    for block in (None, 7, 64, 500):
        z = base.clone().requires_grad_(True)
        h = knn_entropy(z, 3, block_size=block)
        h.backward()
        values.append(float(h.detach()))
        grads.append(z.grad)
    for v, gr in zip(values[1:], grads[1:], strict=True):
        assert v == pytest.approx(values[0], abs=1e-12)
        torch.testing.assert_close(gr, grads[0])


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(40, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: knn_entropy(x, 2), (z,), eps=1e-7, atol=1e-6)
    y = torch.arange(40) % 2
    assert torch.autograd.gradcheck(lambda x: conditional_knn_entropy(x, y, 2), (z,), eps=1e-7, atol=1e-6)


def test_duplicates_give_finite_values_and_gradients():
    z = torch.randn(50, 4)
    z = torch.cat([z, z[:10]]).requires_grad_(True)
    h = knn_entropy(z, 1)
    h.backward()
    assert torch.isfinite(h) and torch.isfinite(z.grad).all()


def test_gradient_only_through_selected_pairs_matches_dense_formula():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(300, 5, generator=g, dtype=torch.float64, requires_grad=True)
    knn_entropy(z, 2).backward()
    idx = knn_neighbours(z, 2)
    zz = z.detach().clone().requires_grad_(True)
    d = zz.shape[1]
    (0.5 * d * torch.log(((zz - zz[idx]) ** 2).sum(1)).mean()).backward()
    torch.testing.assert_close(z.grad, zz.grad)


def test_neighbour_index_matches_kdtree():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(800, 12, generator=g)
    _, ref = cKDTree(z.double().numpy()).query(z.double().numpy(), k=4)
    assert torch.equal(knn_neighbours(z, 3), torch.from_numpy(ref[:, 3]))


def test_collapsed_latent_with_zero_entropy_noise_is_non_negative():
    g = torch.Generator().manual_seed(8)
    d = 8
    collapsed = torch.zeros(4000, d)
    h = float(knn_entropy(add_zero_entropy_noise(collapsed, generator=g), 3))
    # The noise alone has H = 0 exactly; the estimate must not sit below it by more than its known bias.
    assert h >= -closed_form_tol(d)
    assert abs(h) < closed_form_tol(d)
    noise = add_zero_entropy_noise(torch.zeros(20000, 1), generator=g)
    assert float(noise.std()) == pytest.approx(ZERO_ENTROPY_STD, rel=0.02)


def test_without_noise_shrinking_latent_drives_entropy_and_ib_loss_down():
    from ibbench.objectives import ib_terms

    g = torch.Generator().manual_seed(9)
    z = torch.randn(400, 6, generator=g)
    y = torch.arange(400) % 4
    h = [float(knn_entropy(s * z, 2)) for s in (1.0, 1e-2, 1e-4)]
    assert h[0] > h[1] > h[2]
    assert h[2] == pytest.approx(h[0] + 6 * math.log(1e-4), abs=1e-3)  # unbounded below: H(sZ) = H(Z) + d log s
    loss = [float(ib_terms(s * z, y, beta=0.5, k=2)["loss"]) for s in (1.0, 1e-2, 1e-4)]
    assert loss[0] > loss[1] > loss[2]
    noisy = [float(knn_entropy(add_zero_entropy_noise(s * z, generator=g), 2)) for s in (1.0, 1e-2, 1e-4)]
    assert min(noisy) > -closed_form_tol(6)


def test_two_separated_classes_mutual_information_is_log_two():
    g = torch.Generator().manual_seed(10)
    n = 2000
    z = torch.randn(2 * n, 4, generator=g, dtype=torch.float64)
    z[n:] += 100.0
    y = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    mi = float(knn_entropy(z, 3) - conditional_knn_entropy(z, y, 3))
    assert mi == pytest.approx(math.log(2), abs=2e-3)


def test_conditional_entropy_weights_classes_by_frequency():
    g = torch.Generator().manual_seed(11)
    z = torch.randn(600, 3, generator=g, dtype=torch.float64)
    y = torch.cat([torch.zeros(100), torch.ones(500)]).long()
    expected = (100 * knn_entropy(z[:100], 2) + 500 * knn_entropy(z[100:], 2)) / 600
    assert float(conditional_knn_entropy(z, y, 2)) == pytest.approx(float(expected), abs=1e-12)


def test_bf16_input_is_estimated_in_float32():
    z = torch.randn(300, 5)
    assert knn_entropy(z.bfloat16(), 2).dtype == torch.float32


def test_unit_ball_volume():
    assert math.exp(log_unit_ball_volume(1)) == pytest.approx(2.0)
    assert math.exp(log_unit_ball_volume(2)) == pytest.approx(math.pi)
    assert math.exp(log_unit_ball_volume(3)) == pytest.approx(4 / 3 * math.pi)


@pytest.mark.parametrize(
    "z, k, match",
    [
        (torch.randn(10, 2), 0, "k must be"),
        (torch.randn(10, 2), 10, "k = 10 needs at least"),
        (torch.randn(10), 1, "2-D"),
        (torch.randn(2, 3, 4), 1, "2-D"),
        (torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [1.0, 1.0]]), 1, "non-finite"),
        (torch.tensor([[0.0, 1.0], [float("inf"), 0.0], [1.0, 1.0]]), 1, "non-finite"),
        (torch.randint(0, 5, (10, 2)), 1, "floating"),
    ],
)
def test_bad_input_raises_clear_errors(z, k, match):
    with pytest.raises(ValueError, match=match):
        knn_entropy(z, k)


def test_class_with_too_few_samples_is_named():
    z = torch.randn(20, 2)
    y = torch.tensor([0] * 17 + [7] * 3)
    with pytest.raises(ValueError, match="class 7 has 3 samples"):
        conditional_knn_entropy(z, y, 3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_balanced_classes_batched_path_matches_the_per_class_loop(dtype):
    g = torch.Generator().manual_seed(12)
    z = torch.randn(130, 32, generator=g, dtype=dtype)
    z[::2] += 5.0  # an offset half, so classes differ
    y = torch.randperm(130, generator=g) % 10  # 13 per class, shuffled
    z1 = z.clone().requires_grad_(True)
    batched = conditional_knn_entropy(z1, y, 3)
    batched.backward()
    z2 = z.clone().requires_grad_(True)
    loop = torch.stack([knn_entropy(z2[y == c], 3) for c in range(10)]).mean()
    loop.backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert float(batched.detach()) == pytest.approx(float(loop.detach()), abs=tol)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=tol, atol=tol)


def test_balanced_tight_far_clusters_fall_back_to_the_exact_search():
    g = torch.Generator().manual_seed(13)
    centres = torch.tensor([[60.0] * 16, [-60.0] * 16])
    z = (centres.repeat_interleave(200, 0) + 1e-3 * torch.randn(400, 16, generator=g)).float()
    y = torch.arange(400) // 200
    ref = (reference_entropy(z[:200].double().numpy(), 2) + reference_entropy(z[200:].double().numpy(), 2)) / 2
    assert float(conditional_knn_entropy(z, y, 2)) == pytest.approx(ref, rel=1e-4)


# -- the pairwise-distance (KDE) bound of nonlinear IB ---------------------------------------------------------


def test_kde_bound_equals_a_direct_float64_computation():
    from ibbench.estimators import kde_mutual_information

    g = torch.Generator().manual_seed(0)
    h = torch.randn(17, 3, generator=g, dtype=torch.float64) * 0.7 + 5.0  # offset: the centring must hold
    var = 0.3
    for bound, divisor in (("upper", 2.0), ("lower", 8.0)):
        direct = 0.0
        for i in range(17):
            inner = sum(math.exp(-float(((h[i] - h[j]) ** 2).sum()) / (divisor * var)) / 17 for j in range(17))
            direct -= math.log(inner) / 17
        value = kde_mutual_information(h, var, bound)
        assert float(value) == pytest.approx(direct, rel=1e-10, abs=1e-12)
        assert float(kde_mutual_information(h.float(), var, bound)) == pytest.approx(direct, rel=1e-4)
    assert 0.0 <= float(kde_mutual_information(h, var, "lower")) <= float(kde_mutual_information(h, var))
    assert float(kde_mutual_information(h, var)) <= math.log(17)


def test_kde_bound_brackets_the_truth_and_sits_above_the_knn_estimate_on_gaussians():
    """X ~ N(0, s² I_d) as N samples, Z = X + N(0, σ² I) with σ² = 1/(2πe): H(Z|X) = 0, so the k-NN estimate of
    H(Z) estimates I(X;Z) as well. The truth for the empirical mixture (X uniform over the N samples) is a Monte
    Carlo average of log p(z|x) − log p(z); the KDE (KL) bound is above it, the Bhattacharyya bound below, and
    their gap is the bound's known slack."""
    from ibbench.estimators import ZERO_ENTROPY_STD, kde_mutual_information

    g = torch.Generator().manual_seed(3)
    n, d, s = 600, 2, 0.8
    var = ZERO_ENTROPY_STD**2
    x = s * torch.randn(n, d, generator=g, dtype=torch.float64)
    upper, lower = kde_mutual_information(x, var), kde_mutual_information(x, var, "lower")
    # Monte Carlo truth: z = x_i + ε; log p(z|x_i) − log (1/N) Σ_j p(z|x_j).
    draws = 40
    z = x.repeat(draws, 1) + ZERO_ENTROPY_STD * torch.randn(draws * n, d, generator=g, dtype=torch.float64)
    own = -((z - x.repeat(draws, 1)) ** 2).sum(1) / (2 * var)
    pairwise = -torch.cdist(z, x).pow(2) / (2 * var)
    truth = float((own - (torch.logsumexp(pairwise, 1) - math.log(n))).mean())
    assert float(lower) - 0.02 <= truth <= float(upper) + 0.02  # Monte Carlo error ~0.01 nats
    assert float(upper) - truth <= float(upper - lower) + 0.02
    knn = float(knn_entropy(x[:n] + ZERO_ENTROPY_STD * torch.randn(n, d, generator=g, dtype=torch.float64), k=3))
    assert knn <= float(upper) + 0.05  # the k-NN estimate of the same noisy latents is below the upper bound ...
    assert float(upper) - knn <= float(upper - lower) + 0.25  # ... and within the bound's slack (+ its own error)


# -- precision safety ------------------------------------------------------------------------------------------


def test_duplicates_and_collapsed_batches_give_the_same_finite_estimate_in_float32_and_float64():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(60, 8, generator=g)
    with_duplicates = torch.cat([base, base[:20]])  # 20 exact duplicates: their k-th distance is 0 for k = 1
    y = torch.arange(80) % 4
    for z32 in (with_duplicates, 1e-20 * with_duplicates, 1e-20 * base):
        z64 = z32.double()
        for fn in (lambda z: knn_entropy(z, 1), lambda z: conditional_knn_entropy(z, y[: len(z)], 1)):
            a32, a64 = z32.clone().requires_grad_(True), z64.clone().requires_grad_(True)
            h32, h64 = fn(a32), fn(a64)
            v32, v64 = float(h32.detach()), float(h64.detach())
            assert math.isfinite(v32) and v32 == pytest.approx(v64, rel=1e-6)
            h32.backward()
            h64.backward()
            assert torch.isfinite(a32.grad).all() and torch.isfinite(a64.grad).all()
    # The collapsed batch is the same batch up to scale: its estimate moves by exactly d·log(1e-20).
    shift = 8 * math.log(1e-20)
    assert float(knn_entropy(1e-20 * base.double(), 1)) == pytest.approx(float(knn_entropy(base.double(), 1)) + shift)


def test_the_tf32_guard_uses_the_new_precision_api():
    """torch 2.14 raises on reading the legacy allow_tf32 flag once the fp32_precision API has been used."""
    from ibbench.estimators import _exact_matmul

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        with _exact_matmul(torch.device("cuda")):  # the flags exist on CPU builds too
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before
