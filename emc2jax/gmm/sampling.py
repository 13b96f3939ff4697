"""Samples and positive pairs from a Gaussian mixture.

Augmentation in the model of Bansal, Kavis & Sanghavi (arXiv 2411.03517,
its main setting): the positive ``x+`` of ``x`` is an *independent* draw from the same
component. Its noisy variant redraws the positive's component
from ``pi`` with probability ``delta``, so that

    P(c+ = c | c) = 1 - delta (1 - pi_c).

The negative control :func:`sample_noisy_copies` (``x+ = x + small noise``) is
what image augmentations are often *assumed* to be; with it the shared noise of
``x`` and ``x+`` is the most predictable signal, so contrastive learning locks
onto the high-variance noise directions instead of the Fisher subspace.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from emc2jax.gmm.mixture import GaussianMixture, TwoModalMixture

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = [
    "Pairs",
    "sample",
    "sample_given_labels",
    "sample_labels",
    "sample_noisy_copies",
    "sample_pairs",
    "sample_two_modal_pairs",
]


class Pairs(NamedTuple):
    """A batch of positive pairs.

    Attributes:
      x: (n, d) anchors.
      x_pos: (n, d') positives (d' = d except for two-modal pairs).
      labels: (n,) int32 component of each anchor.
      labels_pos: (n,) int32 component of each positive.
    """

    x: Array
    x_pos: Array
    labels: Array
    labels_pos: Array


def _labels_from_uniform(u: Array, weights: ArrayLike) -> Array:
    """Inverse-CDF labels: u (...,) uniform in [0, 1) -> int32 labels with P(c) = weights[c]."""
    cdf = jnp.cumsum(jnp.asarray(weights, jnp.float32))
    labels = jnp.searchsorted(cdf / cdf[-1], u, side="right", method="compare_all")
    # Guards against cdf[-1] rounding below the largest uniform.
    return jnp.minimum(labels, cdf.shape[0] - 1).astype(jnp.int32)


def _noise(eps: Array, mixture: GaussianMixture) -> Array:
    """``Q diag(sqrt(lambda)) eps`` row by row: (..., d) -> (..., d)."""
    return jnp.matmul(
        eps * jnp.sqrt(mixture.cov_eigvals), mixture.cov_rotation.T, precision=lax.Precision.HIGHEST
    )


def sample_labels(key: ArrayLike, weights: ArrayLike, n: int) -> Array:
    """(n,) int32 component labels drawn from ``weights`` (k,)."""
    return _labels_from_uniform(jax.random.uniform(key, (n,)), weights)


def sample_given_labels(key: ArrayLike, mixture: GaussianMixture, labels: ArrayLike) -> Array:
    """``x_i = mu_{c_i} + Q diag(sqrt(lambda)) eps_i``: labels (n,) -> (n, d) float32."""
    labels = jnp.asarray(labels)
    eps = jax.random.normal(key, (labels.shape[0], mixture.dim), jnp.float32)
    return mixture.means[labels] + _noise(eps, mixture)


def sample(key: ArrayLike, mixture: GaussianMixture, n: int) -> tuple[Array, Array]:
    """``n`` labelled samples: ((n, d) float32, (n,) int32)."""
    k_lab, k_x = jax.random.split(key)
    labels = sample_labels(k_lab, mixture.weights, n)
    return sample_given_labels(k_x, mixture, labels), labels


def _check_delta(delta: ArrayLike) -> None:
    # Only concrete values can be checked; traced deltas (a sweep) pass.
    if isinstance(delta, (int, float)) and not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}.")


def _pair_labels(key: ArrayLike, weights: Array, n: int, delta: ArrayLike) -> tuple[Array, Array]:
    """Anchor labels and positive labels, redrawn from ``weights`` with probability ``delta``.

    One uniform draw of shape (3, n) serves all three decisions: each random
    call costs compile time, and a sweep compiles many of these.
    """
    u = jax.random.uniform(key, (3, n))
    labels = _labels_from_uniform(u[0], weights)
    redraw = u[1] < jnp.asarray(delta, jnp.float32)
    return labels, jnp.where(redraw, _labels_from_uniform(u[2], weights), labels)


def sample_pairs(
    key: ArrayLike, mixture: GaussianMixture, n: int, *, delta: ArrayLike = 0.0
) -> Pairs:
    """``n`` positive pairs: ``x+`` is an independent draw from (usually) x's component.

    Args:
      key: PRNG key.
      mixture: the mixture.
      n: number of pairs (static).
      delta: probability in [0, 1] that the positive's component is redrawn
        from the weights (0: perfect augmentation). May be traced.

    Returns:
      :class:`Pairs` with x, x_pos of shape (n, d).
    """
    _check_delta(delta)
    k_lab, k_eps = jax.random.split(key)
    labels, labels_pos = _pair_labels(k_lab, mixture.weights, n, delta)
    # x and x+ get independent noise: the positive is a fresh draw, not a copy.
    eps = jax.random.normal(k_eps, (2, n, mixture.dim), jnp.float32)
    return Pairs(
        mixture.means[labels] + _noise(eps[0], mixture),
        mixture.means[labels_pos] + _noise(eps[1], mixture),
        labels,
        labels_pos,
    )


def sample_noisy_copies(
    key: ArrayLike, mixture: GaussianMixture, n: int, *, noise_scale: ArrayLike = 0.1
) -> Pairs:
    """Negative control: ``x+ = x + noise_scale * N(0, I)`` (same point, small noise).

    Returns :class:`Pairs` with ``labels_pos == labels``.
    """
    if isinstance(noise_scale, (int, float)) and noise_scale < 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}.")
    k_x, k_noise = jax.random.split(key)
    x, labels = sample(k_x, mixture, n)
    jitter = jnp.asarray(noise_scale, jnp.float32) * jax.random.normal(k_noise, x.shape)
    return Pairs(x, x + jitter, labels, labels)


def sample_two_modal_pairs(
    key: ArrayLike, mixture: TwoModalMixture, n: int, *, delta: ArrayLike = 0.0
) -> Pairs:
    """``n`` CLIP pairs: x from modality 1, x_pos from modality 2, same label.

    With probability ``delta`` the second modality's label is redrawn (a
    mismatched caption). Shapes: x (n, d_1), x_pos (n, d_2).
    """
    _check_delta(delta)
    k_lab, k_x, k_y = jax.random.split(key, 3)
    labels, labels_pos = _pair_labels(k_lab, mixture.first.weights, n, delta)
    return Pairs(
        sample_given_labels(k_x, mixture.first, labels),
        sample_given_labels(k_y, mixture.second, labels_pos),
        labels,
        labels_pos,
    )
