"""Subspace estimators: Fisher (true parameters), LDA, PCA and random.

Convention: a subspace of R^d is given by an (r, d) matrix whose *rows* span it,
the same shape as a linear encoder ``f(x) = A x``; the estimators here return
orthonormal rows, so they can be used directly as encoders.

Fisher subspace (the target of Bansal, Kavis & Sanghavi, arXiv 2411.03517):

    F = span{ Sigma^-1 (mu_c - mu_bar) : c = 1..k },   mu_bar = sum_c pi_c mu_c,

of dimension k - 1 in general position. Its directions ranked by
discriminative power are the generalised eigenvectors of the between-class
scatter ``S_b = sum_c pi_c (mu_c - mu_bar)(mu_c - mu_bar)^T`` with respect to
``Sigma`` (Fisher/Rao LDA): ``S_b w = gamma Sigma w``. We solve that problem
by whitening, ``W = Lambda^-1/2 Q^T`` for the true covariance (exact, since the
mixture stores Sigma's eigendecomposition) and ``W = L^-1`` with ``L`` the
Cholesky factor for an estimated within-class covariance, then a symmetric
eigenproblem ``W S_b W^T u = gamma u`` and ``w = W^T u``. All of it runs in
float32 inside ``jit``/``vmap``: the conditioning of these d x d problems is
the covariance's condition number (25 in the design-doc setting), far from
float32's limits; tests check the results against a float64 numpy reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from emc2jax.gmm import _linalg
from emc2jax.gmm.mixture import GaussianMixture

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

_HI = lax.Precision.HIGHEST

__all__ = [
    "class_moments",
    "fisher_eigenvalues",
    "fisher_subspace",
    "lda_from_moments",
    "lda_subspace",
    "orthonormal_rows",
    "pca_from_moments",
    "pca_subspace",
    "random_subspace",
]


def orthonormal_rows(a: ArrayLike) -> Array:
    """An orthonormal basis of the row space of ``a`` (r, d), r <= d: (r, d).

    Uses the SVD (not QR) so that the result is well defined up to the usual
    sign/rotation ambiguity even when ``a`` is badly conditioned.
    """
    a = jnp.asarray(a, jnp.float32)
    if a.ndim != 2 or a.shape[0] > a.shape[1]:
        raise ValueError(f"expected an (r, d) matrix with r <= d, got shape {a.shape}.")
    return _linalg.right_singular_vectors(a)


def _check_rank(rank: int, dim: int, name: str = "rank") -> None:
    if not 1 <= rank <= dim:
        raise ValueError(f"{name} must be in [1, {dim}], got {rank}.")


def _top_generalized_eigvecs(whiten: Array, scatter: Array, rank: int) -> Array:
    """Top-``rank`` solutions of ``scatter w = gamma (whiten^T whiten)^-1 w``, rows orthonormal.

    whiten: (d, d) W with ``W Sigma W^T = I``; scatter: (d, d) between-class scatter.
    """
    m = jnp.einsum("ij,jk,lk->il", whiten, scatter, whiten, precision=_HI)
    _, u = _linalg.eigh(0.5 * (m + m.T))  # ascending eigenvalues
    directions = jnp.einsum("ji,jr->ri", whiten, u[:, ::-1][:, :rank], precision=_HI)
    return orthonormal_rows(directions)


def _between_scatter(weights: Array, means: Array) -> Array:
    centred = means - weights @ means
    return jnp.einsum("c,ci,cj->ij", weights, centred, centred, precision=_HI)


def _true_whitening(mixture: GaussianMixture) -> Array:
    """``W = Lambda^-1/2 Q^T``: ``W Sigma W^T = I`` exactly (Sigma is stored eigendecomposed)."""
    return mixture.cov_rotation.T / jnp.sqrt(mixture.cov_eigvals)[:, None]


def fisher_eigenvalues(mixture: GaussianMixture) -> Array:
    """Fisher discriminant ratios of the true mixture, descending: (k - 1,).

    The nonzero generalised eigenvalues ``gamma`` of ``S_b w = gamma Sigma w``:
    the between-class variance along each Fisher direction in units of the
    noise variance. The smallest one sets how hard the weakest direction of F
    is to estimate (sampling error ~ sqrt(d / (n gamma))).
    """
    whiten = _true_whitening(mixture)
    m = jnp.einsum(
        "ij,jk,lk->il",
        whiten,
        _between_scatter(mixture.weights, mixture.means),
        whiten,
        precision=_HI,
    )
    gammas, _ = _linalg.eigh(0.5 * (m + m.T))
    return gammas[::-1][: mixture.means.shape[-2] - 1]


def fisher_subspace(mixture: GaussianMixture, rank: int | None = None) -> Array:
    """The Fisher subspace of the true mixture: (rank, d) orthonormal rows.

    Args:
      mixture: the shared-covariance mixture.
      rank: how many of the most discriminative directions (static); default
        ``k - 1``, the whole Fisher subspace ``span Sigma^-1 (mu_c - mu_bar)``.
        ``rank < k - 1`` gives the top generalised eigenvectors (the LDA
        subspace of that size); ``rank > k - 1`` is an error.

    Returns:
      (rank, d) float32 with orthonormal rows.
    """
    k, d = mixture.means.shape[-2:]
    rank = k - 1 if rank is None else rank
    _check_rank(rank, min(k - 1, d))
    return _top_generalized_eigvecs(
        _true_whitening(mixture), _between_scatter(mixture.weights, mixture.means), rank
    )


def class_moments(
    x: ArrayLike, labels: ArrayLike, *, num_classes: int
) -> tuple[Array, Array, Array]:
    """Sufficient statistics of LDA: class counts (k,), class sums (k, d), ``sum_i x_i x_i^T`` (d, d).

    They add up over batches, so LDA on more samples than fit in memory is a
    ``lax.scan`` accumulating these (see :func:`lda_from_moments`).
    """
    x = jnp.asarray(x, jnp.float32)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # (n, k)
    sums = jnp.einsum("nk,nd->kd", onehot, x, precision=_HI)
    return jnp.sum(onehot, axis=0), sums, jnp.einsum("ni,nj->ij", x, x, precision=_HI)


def lda_from_moments(
    counts: ArrayLike,
    sums: ArrayLike,
    second_moment: ArrayLike,
    *,
    rank: int,
    ridge: float = 1e-6,
) -> Array:
    """Fisher LDA from :func:`class_moments`: (rank, d) orthonormal rows.

    The plug-in estimator: class frequencies ``n_c / n``, class means
    ``m_c``, pooled within-class covariance
    ``S_w = (sum_i x_i x_i^T - sum_c n_c m_c m_c^T) / n`` (Cholesky-whitened,
    with ``ridge * trace(S_w) / d`` added to its diagonal) and between-class
    scatter; top ``rank`` generalised eigenvectors. For ``rank > k - 1`` the
    extra directions are arbitrary (the scatter has rank k - 1).
    """
    counts = jnp.asarray(counts, jnp.float32)
    sums = jnp.asarray(sums, jnp.float32)
    d = sums.shape[1]
    _check_rank(rank, d)
    n = jnp.sum(counts)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    s_w = (second_moment - jnp.einsum("c,ci,cj->ij", counts, means, means, precision=_HI)) / n
    s_w = 0.5 * (s_w + s_w.T) + ridge * jnp.trace(s_w) / d * jnp.eye(d)
    whiten = _linalg.solve_lower(_linalg.cholesky(s_w), jnp.eye(d))  # L^-1: L^-1 S_w L^-T = I
    return _top_generalized_eigvecs(whiten, _between_scatter(counts / n, means), rank)


def lda_subspace(
    x: ArrayLike,
    labels: ArrayLike,
    *,
    num_classes: int,
    rank: int,
    ridge: float = 1e-6,
) -> Array:
    """Fisher LDA from labelled samples: (rank, d) orthonormal rows.

    Args:
      x: (n, d) samples.
      labels: (n,) int labels in [0, num_classes).
      num_classes: k (static).
      rank: number of directions (static).
      ridge: relative diagonal regularisation of S_w.

    See :func:`lda_from_moments` for the estimator.
    """
    moments = class_moments(x, labels, num_classes=num_classes)
    return lda_from_moments(*moments, rank=rank, ridge=ridge)


def pca_subspace(x: ArrayLike, *, rank: int) -> Array:
    """Top-``rank`` principal directions of the centred samples x (n, d): (rank, d)."""
    x = jnp.asarray(x, jnp.float32)
    _check_rank(rank, x.shape[1])
    centred = x - jnp.mean(x, axis=0)
    cov = jnp.einsum("ni,nj->ij", centred, centred, precision=_HI) / x.shape[0]
    _, vecs = _linalg.eigh(cov)
    return vecs[:, ::-1][:, :rank].T


def pca_from_moments(
    counts: ArrayLike, sums: ArrayLike, second_moment: ArrayLike, *, rank: int
) -> Array:
    """:func:`pca_subspace` from :func:`class_moments` (labels unused): (rank, d).

    Centred covariance ``sum_i x_i x_i^T / n - x_bar x_bar^T`` with
    ``x_bar = sum_c sums_c / n``; top ``rank`` eigenvectors.
    """
    sums = jnp.asarray(sums, jnp.float32)
    _check_rank(rank, sums.shape[1])
    n = jnp.sum(jnp.asarray(counts, jnp.float32))
    mean = jnp.sum(sums, axis=0) / n
    cov = jnp.asarray(second_moment, jnp.float32) / n - jnp.outer(mean, mean)
    _, vecs = _linalg.eigh(0.5 * (cov + cov.T))
    return vecs[:, ::-1][:, :rank].T


def random_subspace(key: ArrayLike, *, dim: int, rank: int) -> Array:
    """A uniformly random ``rank``-dimensional subspace of R^dim: (rank, dim)."""
    _check_rank(rank, dim)
    return orthonormal_rows(jax.random.normal(key, (rank, dim), jnp.float32))
