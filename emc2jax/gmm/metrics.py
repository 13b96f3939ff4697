"""How close a linear encoder is to the Fisher subspace, and what it is worth.

All metrics take encoders/subspaces as (r, d) matrices whose rows span the
subspace (``f(x) = A x``), are pure and traceable (vmap over seeds).

- :func:`principal_angles` / :func:`sin_largest_angle`: the canonical angles
  between two row spaces (Björck & Golub 1973); the design doc's headline
  metric is ``sin`` of the largest angle between A's row space and F.
- :func:`leakage`: ``||A (I - P_F)||_F / ||A||_F``, the fraction of the
  encoder's norm outside F. Unlike the angles it weighs directions by how much
  the encoder uses them, so it is the meaningful containment measure when
  ``r != k - 1`` (Bansal et al., arXiv 2411.03517: with r < k - 1 the
  rows lie *inside* F; with r > k - 1 the extra rows should vanish).
- :func:`effective_rank`: entropy effective rank (Roy & Vetterli 2007) or
  participation ratio of A's singular values.
- :func:`nearest_class_mean_accuracy`: downstream accuracy in the projected space.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from emc2jax.gmm import _linalg
from emc2jax.gmm.subspaces import orthonormal_rows

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

_HI = lax.Precision.HIGHEST

__all__ = [
    "effective_rank",
    "leakage",
    "nearest_class_mean_accuracy",
    "principal_angles",
    "sin_largest_angle",
    "singular_values",
]


def _check_same_dim(a: Array, b: Array) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected (p, d) and (q, d) matrices, got {a.shape} and {b.shape}.")


def principal_angles(a: ArrayLike, b: ArrayLike) -> Array:
    """Principal angles between the row spaces of a (p, d) and b (q, d), ascending.

    With orthonormal bases U, V of the two row spaces (p <= q after a swap),
    ``cos theta_i`` are the singular values of ``U V^T`` and ``sin theta_i``
    those of ``U (I - V^T V)``. Each angle is ``atan2(sin, cos)`` of the
    matching pair, accurate for small *and* for near-right angles (arccos
    alone loses half the digits near 0).

    Returns:
      (min(p, q),) float32 angles in [0, pi/2], ascending.
    """
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    _check_same_dim(a, b)
    u, v = orthonormal_rows(a), orthonormal_rows(b)
    if u.shape[0] > v.shape[0]:
        u, v = v, u
    cos = _linalg.singular_values(jnp.matmul(u, v.T, precision=_HI))  # descending
    residual = u - jnp.matmul(jnp.matmul(u, v.T, precision=_HI), v, precision=_HI)
    sin = _linalg.singular_values(residual)[::-1]  # ascending
    return jnp.arctan2(jnp.clip(sin, 0.0, 1.0), jnp.clip(cos, 0.0, 1.0))


def sin_largest_angle(a: ArrayLike, b: ArrayLike) -> Array:
    """``sin`` of the largest principal angle between the row spaces: scalar in [0, 1].

    0 when the smaller space lies inside the larger, 1 when some direction of
    the smaller one is orthogonal to the whole larger one.
    """
    return jnp.sin(principal_angles(a, b)[-1])


def leakage(a: ArrayLike, subspace: ArrayLike) -> Array:
    """``||A (I - P)||_F / ||A||_F`` with P the projector onto ``subspace``'s row space.

    Args:
      a: (r, d) encoder.
      subspace: (q, d) rows spanning the reference subspace (e.g. Fisher).

    Returns:
      scalar in [0, 1]: 0 when every row of A lies in the subspace.
    """
    a, s = jnp.asarray(a, jnp.float32), jnp.asarray(subspace, jnp.float32)
    _check_same_dim(a, s)
    v = orthonormal_rows(s)
    outside = a - jnp.matmul(jnp.matmul(a, v.T, precision=_HI), v, precision=_HI)
    return jnp.linalg.norm(outside) / jnp.maximum(jnp.linalg.norm(a), 1e-30)


def singular_values(a: ArrayLike) -> Array:
    """Singular values of an encoder a (r, d), descending: (min(r, d),) float32."""
    return _linalg.singular_values(jnp.asarray(a, jnp.float32))


def effective_rank(a: ArrayLike, *, kind: str = "entropy") -> Array:
    """Effective rank of a (r, d) from its singular values sigma_i: scalar in [1, min(r, d)].

    ``kind="entropy"``: ``exp(-sum_i p_i log p_i)`` with ``p_i = sigma_i / sum_j sigma_j``
    (Roy & Vetterli 2007). ``kind="participation"``: the participation ratio
    of the energies, ``(sum_i sigma_i^2)^2 / sum_i sigma_i^4``. Both equal the
    rank when the nonzero singular values are equal and shrink continuously as
    some of them vanish; the entropy form weighs small singular values more
    (three equal ones plus five at 5% of them: entropy 4.1, participation
    3.0), the participation ratio counts directions by the energy they carry.
    """
    if kind not in ("entropy", "participation"):
        raise ValueError(f"kind must be 'entropy' or 'participation', got {kind!r}.")
    s = singular_values(a)
    if kind == "participation":
        energy = s * s
        return jnp.sum(energy) ** 2 / jnp.maximum(jnp.sum(energy * energy), 1e-30)
    p = s / jnp.maximum(jnp.sum(s), 1e-30)
    return jnp.exp(-jnp.sum(jax.scipy.special.xlogy(p, p)))


def nearest_class_mean_accuracy(
    z_train: ArrayLike,
    labels_train: ArrayLike,
    z_test: ArrayLike,
    labels_test: ArrayLike,
    *,
    num_classes: int,
    whiten: bool = True,
    ridge: float = 1e-6,
) -> Array:
    """Accuracy of the nearest-class-mean classifier in the embedding space.

    Class means are estimated on ``z_train`` (n, r); each test point goes to
    the class with the nearest mean. With ``whiten=True`` the distance is the
    Mahalanobis distance under the pooled within-class covariance of the
    training embeddings (plus ``ridge * trace / r``, which matters only for
    nearly singular embeddings), which makes the accuracy invariant to any
    well-conditioned invertible linear map of the embedding: it measures the
    class information the *subspace* retains, not how the encoder scales it.
    ``whiten=False`` is the plain Euclidean rule.

    Returns:
      scalar float32 accuracy in [0, 1].
    """
    z_train = jnp.asarray(z_train, jnp.float32)
    z_test = jnp.asarray(z_test, jnp.float32)
    n, r = z_train.shape
    onehot = jax.nn.one_hot(labels_train, num_classes, dtype=jnp.float32)
    counts = jnp.maximum(jnp.sum(onehot, axis=0), 1.0)
    means = (onehot.T @ z_train) / counts[:, None]  # (k, r)
    if whiten:
        within = z_train - onehot @ means
        cov = jnp.einsum("ni,nj->ij", within, within, precision=_HI) / n
        cov = cov + (ridge * jnp.trace(cov) / r + 1e-30) * jnp.eye(r)
        chol = _linalg.cholesky(cov)
        solve = lambda z: _linalg.solve_lower(chol, z.T).T  # noqa: E731
        z_test, means = solve(z_test), solve(means)
    dist = jnp.sum((z_test[:, None, :] - means[None, :, :]) ** 2, axis=-1)
    return jnp.mean(jnp.argmin(dist, axis=1) == jnp.asarray(labels_test))
