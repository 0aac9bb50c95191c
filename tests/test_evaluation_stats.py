"""Fréchet distance, KID and precision/recall on feature sets with known answers."""

import numpy as np
import pytest

from matryoshka.evaluation.stats import (
    FeatureStats,
    frechet_distance,
    frechet_distance_of,
    gaussian,
    kernel_distance,
    precision_recall,
    trace_sqrt_product,
)


def closed_form_commuting(mu1, d1, mu2, d2):
    """FD of Gaussians whose covariances share eigenvectors, with eigenvalues d1 and d2."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2))


def test_feature_stats_streaming_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(1000.0, 2.0, size=(300, 7))  # a large mean: the shifted accumulation keeps precision
    stats = FeatureStats()
    for chunk in np.array_split(x, 7):
        stats.update(chunk)
    assert stats.count == 300
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)


def test_fd_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(1).normal(size=(400, 32))
    assert frechet_distance_of(x, x) == pytest.approx(0.0, abs=1e-8)
    # fewer samples than dimensions: a singular covariance is fine too
    y = np.random.default_rng(2).normal(size=(10, 64))
    assert frechet_distance_of(y, y) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance_of(y, y + 1) == pytest.approx(64.0, rel=1e-9)


def test_fd_diagonal_covariances_closed_form():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    d1, d2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = closed_form_commuting(mu1, d1, mu2, d2)
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-10)


def test_fd_commuting_covariances_closed_form():
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))  # a random rotation shared by both covariances
    d1, d2 = rng.uniform(0.0, 2, 8), rng.uniform(0.5, 4, 8)
    d1[0] = 0.0  # one singular direction
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    expected = closed_form_commuting(mu1, d1, mu2, d2)
    got = frechet_distance(mu1, q @ np.diag(d1) @ q.T, mu2, q @ np.diag(d2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_trace_sqrt_product_matches_scipy_for_general_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(20, 12)), rng.normal(size=(30, 12))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = np.trace(linalg.sqrtm(s1 @ s2)).real
    assert trace_sqrt_product(s1, s2) == pytest.approx(reference, rel=1e-8)


def test_fd_of_gaussian_samples_approaches_the_closed_form():
    rng = np.random.default_rng(6)
    d1, d2 = np.array([1.0, 2.0, 0.5]), np.array([0.25, 1.0, 2.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, -1.0, 0.5])
    x = mu1 + rng.normal(size=(200_000, 3)) * np.sqrt(d1)
    y = mu2 + rng.normal(size=(200_000, 3)) * np.sqrt(d2)
    assert frechet_distance_of(x, y) == pytest.approx(closed_form_commuting(mu1, d1, mu2, d2), rel=0.01)


# ----------------------------------------------------------------------------- KID
def polynomial_kernel(a, b):
    return (a @ b.T / a.shape[1] + 1) ** 3


def brute_force_mmd(x, y):
    m, n = len(x), len(y)
    kxx = sum(polynomial_kernel(x[i : i + 1], x[j : j + 1])[0, 0] for i in range(m) for j in range(m) if i != j)
    kyy = sum(polynomial_kernel(y[i : i + 1], y[j : j + 1])[0, 0] for i in range(n) for j in range(n) if i != j)
    kxy = sum(polynomial_kernel(x[i : i + 1], y[j : j + 1])[0, 0] for i in range(m) for j in range(n))
    return kxx / (m * (m - 1)) + kyy / (n * (n - 1)) - 2 * kxy / (m * n)


def test_kid_on_whole_sets_is_the_unbiased_mmd():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(9, 5)), rng.normal(0.3, 1.0, size=(9, 5))
    kid = kernel_distance(x, y, subset_size=100)
    assert (kid.subsets, kid.subset_size, kid.std) == (1, 9, 0.0)
    assert kid.mean == pytest.approx(brute_force_mmd(x, y), rel=1e-10)


def population_mmd(points, shift):
    """MMD^2 between the uniform distribution on ``points`` and on ``points + shift``."""
    moved = points + shift
    return (
        polynomial_kernel(points, points).mean()
        + polynomial_kernel(moved, moved).mean()
        - 2 * polynomial_kernel(points, moved).mean()
    )


def test_kid_is_unbiased_zero_for_one_distribution_and_the_mmd_under_a_shift():
    rng = np.random.default_rng(8)
    support = rng.normal(size=(6, 4))
    shift = np.array([0.8, -0.5, 0.3, 0.0])
    expected = population_mmd(support, shift)
    # samples with every support point equally often, in random order
    draw = lambda: support[rng.permutation(np.repeat(np.arange(len(support)), 500))]  # noqa: E731
    real, same, shifted = draw(), draw(), draw() + shift

    kid_same = kernel_distance(real, same, subset_size=300, subsets=50)
    kid_shift = kernel_distance(real, shifted, subset_size=300, subsets=50)
    assert abs(kid_same.mean) < 0.02 * expected  # unbiased: no positive offset for equal distributions
    assert kid_shift.mean == pytest.approx(expected, rel=0.05)
    assert kid_shift.std > 0


# ----------------------------------------------------------------------------- precision / recall
def test_precision_recall_known_cases():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(200, 8))
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)
    # samples collapsed onto a small part of the data: precise, but low recall
    centre = x[np.argsort(np.linalg.norm(x, axis=1))[:20]]
    precision, recall = precision_recall(x, centre, k=3)
    assert precision == 1.0 and recall < 0.5
    with pytest.raises(ValueError):
        precision_recall(x[:3], x, k=3)


def test_metrics_do_not_depend_on_the_order_of_the_samples():
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(300, 16)), rng.normal(0.2, 1.1, size=(250, 16))
    px, py = x[rng.permutation(300)], y[rng.permutation(250)]
    assert frechet_distance_of(px, py) == pytest.approx(frechet_distance_of(x, y), rel=1e-10)
    kid, kid_permuted = kernel_distance(x, y, 100, 20), kernel_distance(px, py, 100, 20)
    assert kid_permuted.mean == pytest.approx(kid.mean, rel=1e-12)
    assert kid_permuted.std == pytest.approx(kid.std, rel=1e-9)
    assert precision_recall(px, py) == precision_recall(x, y)


def test_gaussian_and_errors():
    x = np.arange(12.0).reshape(6, 2)
    mean, cov = gaussian(x)
    np.testing.assert_allclose(mean, [5, 6])
    with pytest.raises(ValueError):
        frechet_distance(mean, cov, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError):
        _ = FeatureStats().update(x[:1]).cov


def test_fd_to_samples_equals_fd_with_the_full_covariance():
    from matryoshka.evaluation.stats import frechet_distance_to_samples

    rng = np.random.default_rng(11)
    reference = rng.normal(size=(80, 40))
    mu, cov = gaussian(reference)
    for count in (5, 39, 60):  # fewer rows than dimensions (the fast path) and more
        samples = rng.normal(0.3, 1.2, size=(count, 40))
        expected = frechet_distance(mu, cov, *gaussian(samples))
        assert frechet_distance_to_samples(mu, cov, samples) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance_to_samples(mu, cov, reference) == pytest.approx(0.0, abs=1e-9)
