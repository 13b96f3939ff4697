"""Mixture constructors and pair samplers of the GMM lab (emc2jax.gmm.mixture / sampling)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emc2jax import gmm


def _binomial_tolerance(p: float, n: int, z: float = 5.0) -> float:
    """z standard errors of a frequency estimated from n draws."""
    return z * np.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def mixture():
    make = functools.partial(
        gmm.anisotropic_mixture,
        dim=8,
        num_components=3,
        num_noise_directions=2,
        noise_variance=16.0,
        separation=2.0,
    )
    # Jitted: one compile instead of one per primitive (eager mode is slow to start).
    return jax.jit(make)(jax.random.key(0), weights=jnp.array([0.5, 0.3, 0.2]))


def test_anisotropic_mixture_structure(mixture):
    q = np.asarray(mixture.cov_rotation, np.float64)
    np.testing.assert_allclose(q.T @ q, np.eye(8), atol=1e-5)
    np.testing.assert_allclose(mixture.cov_eigvals, [16, 16, 1, 1, 1, 1, 1, 1])
    means = np.asarray(mixture.means, np.float64)
    weights = np.asarray(mixture.weights, np.float64)
    # Centred, and every mean orthogonal to the high-variance (noise) directions.
    np.testing.assert_allclose(weights @ means, 0.0, atol=1e-5)
    np.testing.assert_allclose(means @ q[:, :2], 0.0, atol=1e-5)
    # The PCA-misleading condition: between-class energy <= separation^2 < 16 - 1.
    assert weights @ np.sum(means**2, axis=1) <= 2.0**2 + 1e-5


def mixture_for_errors():
    return gmm.mixture_from_covariance([0.5, 0.5], np.eye(2), np.eye(2))


def test_constructor_rejects_bad_shapes():
    # Checked at trace time, before anything is compiled.
    with pytest.raises(ValueError, match="num_noise_directions"):
        gmm.anisotropic_mixture(jax.random.key(0), dim=4, num_components=4, num_noise_directions=2)
    with pytest.raises(ValueError, match="weights"):
        gmm.isotropic_mixture(jax.random.key(0), dim=4, num_components=3, weights=jnp.ones(2) / 2)
    with pytest.raises(ValueError, match="positive definite"):
        gmm.mixture_from_covariance([0.5, 0.5], np.zeros((2, 2)), np.diag([1.0, -1.0]))
    with pytest.raises(ValueError, match="delta"):
        gmm.sample_pairs(jax.random.key(0), mixture_for_errors(), 4, delta=1.5)
    with pytest.raises(ValueError, match="sum to 1"):
        gmm.mixture_from_covariance([0.5, 0.6], np.zeros((2, 2)), np.eye(2))


def test_mixture_from_covariance_round_trip():
    cov = np.array([[2.0, 1.0], [1.0, 2.0]])
    mix = gmm.mixture_from_covariance([0.5, 0.5], [[1.0, 0.0], [-1.0, 0.0]], cov)
    np.testing.assert_allclose(gmm.covariance(mix), cov, atol=1e-6)


def test_samples_have_the_mixture_statistics(mixture):
    n = 40_000
    x, labels = jax.jit(gmm.sample, static_argnums=2)(jax.random.key(1), mixture, n)
    x, labels = np.asarray(x, np.float64), np.asarray(labels)
    for c, p in enumerate([0.5, 0.3, 0.2]):
        assert abs(np.mean(labels == c) - p) < _binomial_tolerance(p, n)
    within = x - np.asarray(mixture.means)[labels]
    cov = within.T @ within / n
    # Entry (i, j) of a sample covariance has standard error <= sqrt(2 / n) * max variance.
    np.testing.assert_allclose(cov, gmm.covariance(mixture), atol=5 * 16 * np.sqrt(2 / n))


@pytest.mark.parametrize("delta", [0.0, 0.4, 1.0])
def test_same_component_rate(mixture, delta):
    """P(c+ = c | c) = 1 - delta (1 - pi_c), per component."""
    n = 40_000
    pairs = jax.jit(gmm.sample_pairs, static_argnums=2)(jax.random.key(2), mixture, n, delta=delta)
    labels, labels_pos = np.asarray(pairs.labels), np.asarray(pairs.labels_pos)
    for c, pi in enumerate([0.5, 0.3, 0.2]):
        mask = labels == c
        expected = 1 - delta * (1 - pi)
        observed = np.mean(labels_pos[mask] == c)
        assert abs(observed - expected) <= _binomial_tolerance(expected, mask.sum()) + 1e-12


def test_positive_is_an_independent_draw_and_the_control_is_not(mixture):
    """The pitfall of the design doc: x+ must not share x's noise."""
    n = 20_000
    key = jax.random.key(3)
    pairs = jax.jit(gmm.sample_pairs, static_argnums=2)(key, mixture, n)
    copies = jax.jit(gmm.sample_noisy_copies, static_argnums=2)(key, mixture, n)
    means = np.asarray(mixture.means)
    noise_dir = np.asarray(mixture.cov_rotation)[:, 0]  # a variance-16 direction

    def noise_correlation(p):
        a = (np.asarray(p.x) - means[np.asarray(p.labels)]) @ noise_dir
        b = (np.asarray(p.x_pos) - means[np.asarray(p.labels_pos)]) @ noise_dir
        return np.corrcoef(a, b)[0, 1]

    assert abs(noise_correlation(pairs)) < 5 / np.sqrt(n)
    assert noise_correlation(copies) > 0.99
    np.testing.assert_array_equal(copies.labels, copies.labels_pos)


def test_two_modal_pairs_share_labels():
    @jax.jit
    def draw(key):
        k1, k2 = jax.random.split(key)
        mix = gmm.two_modal_mixture(k1, dims=(6, 5), num_components=3, num_noise_directions=(1, 2))
        return mix, gmm.sample_two_modal_pairs(k2, mix, 64)

    mix, pairs = draw(jax.random.key(4))
    assert pairs.x.shape == (64, 6) and pairs.x_pos.shape == (64, 5)
    np.testing.assert_array_equal(pairs.labels, pairs.labels_pos)
    np.testing.assert_array_equal(mix.first.weights, mix.second.weights)


def test_samplers_vmap_over_mixtures_and_delta():
    @jax.jit
    def draw(keys, deltas):
        mixtures = jax.vmap(functools.partial(gmm.isotropic_mixture, dim=4, num_components=2))(keys)
        return jax.vmap(lambda k, m, d: gmm.sample_pairs(k, m, 16, delta=d))(keys, mixtures, deltas)

    pairs = draw(jax.random.split(jax.random.key(6), 3), jnp.array([0.0, 0.5, 1.0]))
    assert pairs.x.shape == (3, 16, 4)
    np.testing.assert_array_equal(pairs.labels[0], pairs.labels_pos[0])
