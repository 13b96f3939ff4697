"""Fisher / LDA / PCA subspaces and the subspace metrics of the GMM lab."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emc2jax import gmm


def _span_distance(a, b) -> float:
    """sin of the largest principal angle, in float64 numpy (the reference)."""
    qa = np.linalg.svd(np.asarray(a, np.float64), full_matrices=False)[2]
    qb = np.linalg.svd(np.asarray(b, np.float64), full_matrices=False)[2]
    if qa.shape[0] > qb.shape[0]:
        qa, qb = qb, qa
    return np.linalg.norm(qa - qa @ qb.T @ qb, 2)


# ----------------------------------------------------------------------------
# Fisher subspace
# ----------------------------------------------------------------------------


def test_fisher_of_a_hand_built_two_component_mixture():
    """mu = +-e1, Sigma = [[2, 1], [1, 2]] (+ an independent third axis):
    Sigma^-1 e1 ∝ (2, -1, 0): the Fisher direction is *not* the mean direction."""
    cov = np.array([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    mix = gmm.mixture_from_covariance([0.5, 0.5], [[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], cov)
    fisher = np.asarray(gmm.fisher_subspace(mix))
    assert fisher.shape == (1, 3)
    expected = np.array([2.0, -1.0, 0.0]) / np.sqrt(5.0)
    np.testing.assert_allclose(abs(fisher[0] @ expected), 1.0, atol=1e-6)


def test_fisher_of_a_hand_built_three_component_mixture():
    """Axis-aligned: Sigma = diag(1, 4, 9, 16), means in the (e1, e2) plane plus a
    component along e3; F = span{Sigma^-1 (mu_c - mu_bar)} computed by hand."""
    cov = np.diag([1.0, 4.0, 9.0, 16.0])
    means = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [-1.0, -1.0, -1.0, 0.0]])
    mix = gmm.mixture_from_covariance([1 / 3, 1 / 3, 1 / 3], means, cov)
    centred = means - means.mean(0)
    by_hand = centred / np.diag(cov)  # Sigma^-1 (mu_c - mu_bar), rows
    fisher = gmm.fisher_subspace(mix)
    assert fisher.shape == (2, 4)
    assert _span_distance(fisher, by_hand) < 1e-5
    np.testing.assert_allclose(np.asarray(fisher)[:, 3], 0.0, atol=1e-6)


def test_fisher_matches_a_float64_cholesky_reference():
    mix = jax.jit(
        functools.partial(
            gmm.anisotropic_mixture,
            dim=12,
            num_components=4,
            num_noise_directions=3,
            noise_variance=50.0,
            signal_variance=0.5,
        )
    )(jax.random.key(0))
    cov = np.asarray(gmm.covariance(mix), np.float64)
    means = np.asarray(mix.means, np.float64)
    weights = np.asarray(mix.weights, np.float64)
    centred = means - weights @ means
    chol = np.linalg.cholesky(cov)
    whitened = np.linalg.solve(chol, centred.T)  # L^-1 (mu_c - mu_bar)
    between = (whitened * weights) @ whitened.T
    gammas, u = np.linalg.eigh(between)
    directions = np.linalg.solve(chol.T, u[:, ::-1]).T  # L^-T u, most discriminative first
    for rank in (1, 2, 3):
        got = gmm.fisher_subspace(mix, rank=rank)
        assert _span_distance(got, directions[:rank]) < 1e-4, rank
    # The whole subspace is the span of Sigma^-1 (mu_c - mu_bar).
    assert _span_distance(gmm.fisher_subspace(mix), np.linalg.solve(cov, centred.T).T) < 1e-4
    with pytest.raises(ValueError, match="rank"):
        gmm.fisher_subspace(mix, rank=4)


def test_lda_converges_to_fisher_and_moments_stream():
    mix = gmm.mixture_from_covariance(
        [0.3, 0.3, 0.4],
        [[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [-1.5, -1.5, 0.0, 0.0]],
        np.diag([1.0, 2.0, 25.0, 25.0]) + 0.5 * np.ones((4, 4)),
    )
    x, y = jax.jit(gmm.sample, static_argnums=2)(jax.random.key(1), mix, 20_000)
    lda = gmm.lda_subspace(x, y, num_classes=3, rank=2)
    # The plug-in error is O(sqrt(d / n)) ~ 0.015 here.
    assert _span_distance(lda, gmm.fisher_subspace(mix)) < 0.05
    # Moments add up over chunks: streaming LDA/PCA equals the one-shot estimators.
    chunks = [
        gmm.class_moments(x[i : i + 5000], y[i : i + 5000], num_classes=3)
        for i in range(0, 20_000, 5000)
    ]
    moments = jax.tree.map(lambda *m: sum(m), *chunks)
    assert _span_distance(gmm.lda_from_moments(*moments, rank=2), lda) < 1e-4
    assert (
        _span_distance(gmm.pca_from_moments(*moments, rank=2), gmm.pca_subspace(x, rank=2)) < 1e-4
    )


def test_pca_and_random_subspaces():
    # Variances 25, 16, 1, ...: the top-2 principal directions are e1, e2.
    x = jax.random.normal(jax.random.key(2), (20_000, 5)) * jnp.array([5.0, 4.0, 1.0, 1.0, 1.0])
    pca = gmm.pca_subspace(x, rank=2)
    assert _span_distance(pca, np.eye(5)[:2]) < 0.05
    rand = np.asarray(gmm.random_subspace(jax.random.key(3), dim=5, rank=3))
    np.testing.assert_allclose(rand @ rand.T, np.eye(3), atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        gmm.pca_subspace(x, rank=6)


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------


def test_principal_angles_on_known_subspaces():
    e = np.eye(4)
    # Identical (up to a change of basis and scale).
    a = np.array([[1.0, 1.0, 0.0, 0.0], [3.0, -1.0, 0.0, 0.0]])
    np.testing.assert_allclose(gmm.principal_angles(a, e[:2]), [0.0, 0.0], atol=1e-3)
    assert gmm.sin_largest_angle(a, e[:2]) < 1e-5
    # Orthogonal.
    np.testing.assert_allclose(gmm.principal_angles(e[:2], e[2:]), [np.pi / 2] * 2, atol=1e-6)
    np.testing.assert_allclose(gmm.sin_largest_angle(e[:2], e[2:]), 1.0, atol=1e-6)
    # Partially overlapping: span{e1, e2} vs span{e1, cos t e2 + sin t e3}.
    for t in (1e-3, 0.3, 1.2):
        b = np.stack([e[0], np.cos(t) * e[1] + np.sin(t) * e[2]])
        np.testing.assert_allclose(gmm.principal_angles(e[:2], b), [0.0, t], atol=2e-6)
        np.testing.assert_allclose(gmm.sin_largest_angle(b, e[:2]), np.sin(t), rtol=1e-4)
    # Different dimensions: a line inside a plane, and a plane containing the line.
    line = np.array([[1.0, 1.0, 0.0, 0.0]])
    assert gmm.principal_angles(line, e[:2]).shape == (1,)
    assert gmm.sin_largest_angle(e[:2], line) < 1e-6
    with pytest.raises(ValueError, match="matrices"):
        gmm.principal_angles(e[:2], np.eye(3)[:2])


def test_leakage_and_effective_rank():
    e = np.eye(3)
    a = np.array([[3.0, 0.0, 0.0], [0.0, 0.0, 4.0]])  # norm 5, of which 4 outside span{e1, e2}
    np.testing.assert_allclose(gmm.leakage(a, e[:2]), 0.8, rtol=1e-6)
    np.testing.assert_allclose(gmm.leakage(a, e), 0.0, atol=1e-6)
    np.testing.assert_allclose(gmm.effective_rank(np.diag([2.0, 2.0, 2.0])), 3.0, rtol=1e-5)
    np.testing.assert_allclose(gmm.effective_rank(np.diag([1.0, 0.0, 0.0])), 1.0, rtol=1e-5)
    spectrum = np.diag([1.0, 1.0, 1.0, 0.05, 0.05, 0.05, 0.05, 0.05])
    p = np.array([1.0] * 3 + [0.05] * 5) / 3.25
    np.testing.assert_allclose(
        gmm.effective_rank(spectrum), np.exp(-(p * np.log(p)).sum()), rtol=1e-5
    )
    np.testing.assert_allclose(
        gmm.effective_rank(spectrum, kind="participation"), 3.0125**2 / (3 + 5 * 0.05**4), rtol=1e-5
    )
    with pytest.raises(ValueError, match="kind"):
        gmm.effective_rank(spectrum, kind="stable")


def test_nearest_class_mean_accuracy():
    key = jax.random.key(4)
    labels = jnp.arange(600) % 3
    z = jnp.eye(3)[labels] * 10.0 + 0.1 * jax.random.normal(key, (600, 3))
    acc = gmm.nearest_class_mean_accuracy(z, labels, z, labels, num_classes=3)
    assert acc == 1.0
    # Whitened NCM is invariant to an invertible linear map of the embedding (up
    # to its relative ridge: keep the map's condition number moderate); Euclidean is not.
    noisy = jnp.eye(3)[labels] + 0.7 * jax.random.normal(key, (600, 3))
    mix = jnp.array([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.5]])
    plain = gmm.nearest_class_mean_accuracy(noisy, labels, noisy, labels, num_classes=3)
    mapped = gmm.nearest_class_mean_accuracy(
        noisy @ mix.T, labels, noisy @ mix.T, labels, num_classes=3
    )
    np.testing.assert_allclose(plain, mapped, atol=1 / 600 + 1e-7)
    euclidean = gmm.nearest_class_mean_accuracy(
        noisy @ mix.T, labels, noisy @ mix.T, labels, num_classes=3, whiten=False
    )
    assert euclidean < plain - 0.1


def test_metrics_vmap_over_many_seeds():
    """A batch big enough for jaxlib's CPU LAPACK to split it across its thread pool
    (which deadlocks with concurrent calls unless gmm._linalg serialises them)."""

    def one(key):
        k1, k2 = jax.random.split(key)
        mix = gmm.anisotropic_mixture(k1, dim=20, num_components=4, num_noise_directions=5)
        x, y = gmm.sample(k2, mix, 256)
        fisher = gmm.fisher_subspace(mix)
        lda = gmm.lda_subspace(x, y, num_classes=4, rank=3)
        pca = gmm.pca_subspace(x, rank=3)
        return jnp.stack([gmm.sin_largest_angle(a, fisher) for a in (lda, pca)])

    keys = jax.random.split(jax.random.key(5), 48)
    batched = jax.jit(jax.vmap(one))(keys)
    looped = jax.jit(one)
    for i in (0, 17, 47):
        np.testing.assert_allclose(batched[i], looped(keys[i]), atol=1e-4)
    assert np.all(np.asarray(batched)[:, 1] > 0.9)  # PCA misled on every seed
