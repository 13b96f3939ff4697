"""Gaussian-mixture specifications (pytrees) and their constructors.

The model of Bansal, Kavis & Sanghavi (arXiv 2411.03517): ``k``
components with weights ``pi``, means ``mu_c`` in R^d and one shared covariance

    Sigma = Q diag(lambda) Q^T,        x = mu_c + Q diag(sqrt(lambda)) eps,  eps ~ N(0, I).

Storing ``Sigma`` by its eigendecomposition (rather than as a dense matrix) makes
sampling, whitening and ``Sigma^-1`` exact and cheap in float32, and lets the
anisotropy be a traced value, so a sweep over it is one ``vmap``.

Every constructor is a pure function of a PRNG key and traceable: a sweep builds
its mixtures inside the compiled call (one per seed).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from emc2jax.gmm import _linalg

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = [
    "GaussianMixture",
    "TwoModalMixture",
    "anisotropic_mixture",
    "covariance",
    "isotropic_mixture",
    "mixture_from_covariance",
    "two_modal_mixture",
]


class GaussianMixture(NamedTuple):
    """A shared-covariance Gaussian mixture (a pytree; vmap over a leading axis).

    Attributes:
      weights: (k,) mixture weights pi, positive, summing to one.
      means: (k, d) component means mu_c.
      cov_eigvals: (d,) eigenvalues lambda of the shared covariance, positive.
      cov_rotation: (d, d) orthogonal Q whose *columns* are Sigma's eigenvectors.
    """

    weights: Array
    means: Array
    cov_eigvals: Array
    cov_rotation: Array

    @property
    def num_components(self) -> int:
        return self.means.shape[-2]

    @property
    def dim(self) -> int:
        return self.means.shape[-1]


class TwoModalMixture(NamedTuple):
    """Two modalities sharing the component label (2411.03517's CLIP setting).

    A pair is drawn as ``c ~ pi``, ``x ~ N(first.means[c], Sigma_1)``,
    ``y ~ N(second.means[c], Sigma_2)``; the label distribution is
    ``first.weights`` (the constructor makes ``second.weights`` identical).
    The dimensions ``d_1`` and ``d_2`` may differ.
    """

    first: GaussianMixture
    second: GaussianMixture


def covariance(mixture: GaussianMixture) -> Array:
    """The dense shared covariance ``Q diag(lambda) Q^T``: (d, d)."""
    q = mixture.cov_rotation
    return (q * mixture.cov_eigvals[..., None, :]) @ jnp.swapaxes(q, -1, -2)


def _haar_orthogonal(key: ArrayLike, n: int) -> Array:
    """A Haar-random (n, n) rotation: QR of a Gaussian matrix, signs fixed by R's diagonal.

    (``jax.random.orthogonal`` does the same through a batched LAPACK QR, which
    can deadlock under ``vmap`` on CPU: see :mod:`emc2jax.gmm._linalg`.)
    """
    q, r = _linalg.qr(jax.random.normal(key, (n, n), jnp.float32))
    return q * jnp.sign(jnp.diagonal(r))


def _uniform_weights(k: int) -> Array:
    return jnp.full((k,), 1.0 / k, jnp.float32)


def _check_weights(weights: ArrayLike, k: int) -> Array:
    weights = jnp.asarray(weights, jnp.float32)
    if weights.shape != (k,):
        raise ValueError(f"weights must have shape (k,) = ({k},), got {weights.shape}.")
    return weights


def anisotropic_mixture(
    key: ArrayLike,
    *,
    dim: int,
    num_components: int,
    num_noise_directions: int,
    noise_variance: ArrayLike = 25.0,
    signal_variance: ArrayLike = 1.0,
    separation: ArrayLike = 3.0,
    weights: ArrayLike | None = None,
) -> GaussianMixture:
    """A mixture where PCA is provably misled and the Fisher subspace is not.

    With ``Q`` a Haar-random rotation, the first ``num_noise_directions``
    columns of ``Q`` carry variance ``noise_variance`` (the "noise" directions)
    and the other ``d - num_noise_directions`` carry ``signal_variance``. The
    means are drawn *inside the span of the low-variance columns*:

        mu_c = separation * Q_low (u_c - sum_c' pi_c' u_c'),   u_c = g_c / ||g_c||,  g_c ~ N(0, I),

    centred so that the mixture has mean zero, and with
    ``sum_c pi_c ||mu_c||^2 <= separation^2``. The noise directions are
    orthogonal to every mean, hence to the Fisher subspace
    ``span Sigma^-1 (mu_c - mu_bar)`` (Sigma^-1 preserves the low-variance
    eigenspace). The data covariance is ``Sigma + S_b`` with
    ``||S_b|| <= sum_c pi_c ||mu_c||^2 <= separation^2``, so whenever

        noise_variance > signal_variance + separation^2

    every low-variance direction has less variance than every noise direction
    and PCA's top ``min(r, num_noise_directions)`` directions are *orthogonal*
    to the Fisher subspace (provably, not just typically). ``noise_variance =
    signal_variance`` is the isotropic control, where PCA finds the means' span.

    Design doc example: ``dim=20, num_components=4, num_noise_directions=5,
    noise_variance=25`` gives Sigma = Q diag(25 x5, 1 x15) Q^T.

    Args:
      key: PRNG key.
      dim: d (static).
      num_components: k (static), with ``k - 1 <= d - num_noise_directions``.
      num_noise_directions: how many high-variance directions (static).
      noise_variance: their variance (may be traced: sweep the anisotropy).
      signal_variance: the variance of the other directions (may be traced).
      separation: the norm of every mean before centring (may be traced).
      weights: optional (k,) mixture weights; uniform by default.

    Returns:
      A :class:`GaussianMixture` with float32 leaves.
    """
    d_low = dim - num_noise_directions
    if num_noise_directions < 0 or d_low < num_components - 1 or num_components < 2:
        raise ValueError(
            "need num_components >= 2 and 0 <= num_noise_directions <= dim - (num_components - 1), "
            f"got dim={dim}, num_components={num_components}, "
            f"num_noise_directions={num_noise_directions}."
        )
    w = _uniform_weights(num_components) if weights is None else weights
    w = _check_weights(w, num_components)
    k_rot, k_means = jax.random.split(key)
    q = _haar_orthogonal(k_rot, dim)
    g = jax.random.normal(k_means, (num_components, d_low), jnp.float32)
    g = g / jnp.linalg.norm(g, axis=1, keepdims=True)
    # Centred (sum_c pi_c mu_c = 0), as in the theory: an off-centre mixture
    # gives dot-product InfoNCE a use for the global-mean direction Sigma^-1 mu_bar
    # (a constant shift of the embedding biases every negative's logit), and
    # its optimum then leaves F.
    g = g - w @ g
    means = jnp.asarray(separation, jnp.float32) * (g @ q[:, num_noise_directions:].T)
    is_noise = jnp.arange(dim) < num_noise_directions
    eigvals = jnp.where(
        is_noise,
        jnp.asarray(noise_variance, jnp.float32),
        jnp.asarray(signal_variance, jnp.float32),
    )
    return GaussianMixture(w, means, eigvals, q)


def isotropic_mixture(
    key: ArrayLike,
    *,
    dim: int,
    num_components: int,
    variance: ArrayLike = 1.0,
    separation: ArrayLike = 3.0,
    weights: ArrayLike | None = None,
) -> GaussianMixture:
    """Sigma = variance * I with random means of norm about ``separation``.

    The control setting in which PCA's top ``k - 1`` directions approach the
    Fisher subspace (the span of the centred means).
    """
    return anisotropic_mixture(
        key,
        dim=dim,
        num_components=num_components,
        num_noise_directions=0,
        noise_variance=variance,
        signal_variance=variance,
        separation=separation,
        weights=weights,
    )


def mixture_from_covariance(
    weights: ArrayLike, means: ArrayLike, covariance_matrix: ArrayLike
) -> GaussianMixture:
    """A mixture from a dense covariance (eigendecomposed in float64 with numpy).

    For hand-built examples; not traceable (it checks its inputs eagerly).

    Args:
      weights: (k,) positive weights summing to one.
      means: (k, d).
      covariance_matrix: (d, d) symmetric positive definite.
    """
    w = np.asarray(weights, np.float64)
    mu = np.asarray(means, np.float64)
    cov = np.asarray(covariance_matrix, np.float64)
    if mu.ndim != 2 or w.shape != (mu.shape[0],) or cov.shape != (mu.shape[1],) * 2:
        raise ValueError(
            "expected weights (k,), means (k, d), covariance (d, d); got "
            f"{w.shape}, {mu.shape}, {cov.shape}."
        )
    if np.any(w <= 0) or not np.isclose(w.sum(), 1.0):
        raise ValueError(f"weights must be positive and sum to 1, got {w}.")
    if not np.allclose(cov, cov.T):
        raise ValueError("covariance must be symmetric.")
    eigvals, rotation = np.linalg.eigh(cov)
    if eigvals[0] <= 0:
        raise ValueError(f"covariance must be positive definite, eigenvalues {eigvals}.")
    as32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return GaussianMixture(as32(w), as32(mu), as32(eigvals), as32(rotation))


def two_modal_mixture(
    key: ArrayLike,
    *,
    dims: tuple[int, int],
    num_components: int,
    num_noise_directions: tuple[int, int],
    noise_variance: ArrayLike = 25.0,
    separation: ArrayLike = 3.0,
    weights: ArrayLike | None = None,
) -> TwoModalMixture:
    """Two independent :func:`anisotropic_mixture` modalities sharing the label.

    Each modality has its own rotation, means and noise directions, hence its
    own Fisher subspace ``F_m``; CLIP should place encoder m's rows in ``F_m``.
    """
    k1, k2 = jax.random.split(key)
    make = lambda k, d, n: anisotropic_mixture(  # noqa: E731
        k,
        dim=d,
        num_components=num_components,
        num_noise_directions=n,
        noise_variance=noise_variance,
        separation=separation,
        weights=weights,
    )
    return TwoModalMixture(
        make(k1, dims[0], num_noise_directions[0]), make(k2, dims[1], num_noise_directions[1])
    )
