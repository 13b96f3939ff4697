"""Pure contrastive losses and gradient-estimator surrogates.

Every function here is pure (no state, no randomness), returns *per-example*
values (callers reduce), takes its hyperparameters keyword-only, and computes in
float32 whatever the input dtype (bfloat16 embeddings are upcast first), using
``logsumexp`` so that temperatures as small as 0.01 stay finite.

Notation (``shared/design.md``): ``s(u, v) = <u, v>`` on L2-normalised
embeddings, temperature ``tau`` and inverse temperature ``beta = 1 / tau``.

Masks: ``where`` marks the valid (non-padding) rows of a batch. A masked row is
neither an anchor (its loss is 0) nor a negative for anybody else. Reduce with
``jnp.sum(loss) / jnp.sum(where)`` (or :func:`masked_mean`).

This module imports nothing from the rest of emc2jax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

_NEG_INF = -jnp.inf

__all__ = [
    "clip_loss",
    "contrastive_metrics",
    "cosine_similarity_matrix",
    "dcl",
    "emc2_surrogate",
    "infonce",
    "l2_normalize",
    "masked_mean",
    "ntxent",
    "siglip_loss",
    "sogclr_surrogate",
]


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def l2_normalize(x: ArrayLike, *, axis: int = -1, eps: float = 1e-12) -> Array:
    """Rescales ``x`` to unit L2 norm along ``axis`` (in float32).

    ``eps`` bounds the denominator away from zero so that all-zero rows (e.g.
    padding) give zeros rather than NaN, in the value and in the gradient.
    """
    x = jnp.asarray(x, jnp.float32)
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * lax.rsqrt(jnp.maximum(sq, eps * eps))


def _prepare(z: ArrayLike, normalize: bool) -> Array:
    z = jnp.asarray(z, jnp.float32)
    return l2_normalize(z) if normalize else z


def cosine_similarity_matrix(a: ArrayLike, b: ArrayLike, *, normalize: bool = True) -> Array:
    """``S[i, j] = s(a_i, b_j)``: shapes (N, D), (M, D) -> (N, M), float32."""
    a, b = _prepare(a, normalize), _prepare(b, normalize)
    return jnp.einsum("nd,md->nm", a, b, precision=lax.Precision.HIGHEST)


def masked_mean(values: ArrayLike, where: ArrayLike | None = None) -> Array:
    """Mean of ``values`` over the entries where ``where`` is true (0 if none)."""
    values = jnp.asarray(values, jnp.float32)
    if where is None:
        return jnp.mean(values)
    where = jnp.broadcast_to(jnp.asarray(where, bool), values.shape)
    total = jnp.sum(jnp.where(where, values, 0.0))
    return total / jnp.maximum(jnp.sum(where), 1)


def _check_rank(name: str, x: ArrayLike, rank: int) -> None:
    if jnp.ndim(x) != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {jnp.shape(x)}.")


def _check_pair(name_a: str, a: ArrayLike, name_b: str, b: ArrayLike) -> None:
    _check_rank(name_a, a, 2)
    _check_rank(name_b, b, 2)
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape (B, D), "
            f"got {jnp.shape(a)} and {jnp.shape(b)}."
        )


def _check_where(
    where: ArrayLike | None, shape: tuple[int, ...], name: str = "where"
) -> Array | None:
    if where is None:
        return None
    if jnp.shape(where) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {jnp.shape(where)}.")
    return jnp.asarray(where, bool)


def _check_temperature(temperature: ArrayLike) -> None:
    # Only concrete values can be checked; traced temperatures (learnable) pass.
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")


def _cross_entropy_rows(logits: Array, target: Array, valid: Array | None) -> Array:
    """``-logits[i, target_i] + logsumexp_j logits[i, j]`` over columns ``valid[i, j]``."""
    if valid is not None:
        logits = jnp.where(valid, logits, _NEG_INF)
    picked = jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]
    return jax.nn.logsumexp(logits, axis=1) - picked


def _two_view_logits(
    z_a: ArrayLike,
    z_b: ArrayLike,
    temperature: ArrayLike,
    normalize: bool,
    where: ArrayLike | None,
) -> tuple[Array, Array, Array | None]:
    """The (2B, 2B) logits of ``concat(z_a, z_b)``, each row's positive, the valid rows."""
    _check_pair("z_a", z_a, "z_b", z_b)
    _check_temperature(temperature)
    b = jnp.shape(z_a)[0]
    where = _check_where(where, (b,))
    z = jnp.concatenate([jnp.asarray(z_a), jnp.asarray(z_b)], axis=0)
    logits = cosine_similarity_matrix(z, z, normalize=normalize) / temperature
    target = jnp.concatenate([jnp.arange(b) + b, jnp.arange(b)])
    row_valid = None if where is None else jnp.concatenate([where, where])
    return logits, target, row_valid


# ----------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------


def ntxent(
    z_a: ArrayLike,
    z_b: ArrayLike,
    *,
    temperature: ArrayLike,
    normalize: bool = True,
    where: ArrayLike | None = None,
) -> Array:
    """SimCLR's NT-Xent loss, one value per view.

    Both views are anchors. With ``z = concat(z_a, z_b)`` (2B rows) and
    ``p(i) = i ± B`` the index of row ``i``'s positive:

        l_i = -s(z_i, z_p(i)) / tau + log sum_{j != i} exp(s(z_i, z_j) / tau)

    so the denominator holds the positive and the 2B - 2 other views
    (Chen et al. 2020, eq. 1). ``mean(ntxent(a, b))`` equals
    ``optax.ntxent(concat(a, b), labels=concat(arange(B), arange(B)))``.

    Args:
      z_a: (B, D) embeddings of the first views.
      z_b: (B, D) embeddings of the second views; row i is z_a[i]'s positive.
      temperature: tau > 0.
      normalize: L2-normalise the embeddings first (cosine similarity).
      where: optional (B,) bool, the valid pairs.

    Returns:
      (2B,) float32 losses: rows 0..B-1 for the ``z_a`` anchors, B..2B-1 for
      ``z_b``; 0 for masked pairs.
    """
    logits, target, row_valid = _two_view_logits(z_a, z_b, temperature, normalize, where)
    valid = ~jnp.eye(logits.shape[0], dtype=bool)
    if row_valid is not None:
        valid = valid & row_valid[None, :]
    loss = _cross_entropy_rows(logits, target, valid)
    return loss if row_valid is None else jnp.where(row_valid, loss, 0.0)


def dcl(
    z_a: ArrayLike,
    z_b: ArrayLike,
    *,
    temperature: ArrayLike,
    normalize: bool = True,
    where: ArrayLike | None = None,
) -> Array:
    """Decoupled contrastive loss (Yeh et al. 2022, eq. 6), one value per view.

    NT-Xent with the positive removed from the denominator:

        l_i = -s(z_i, z_p(i)) / tau + log sum_{j != i, p(i)} exp(s(z_i, z_j) / tau)

    Args and returns as :func:`ntxent`: (B, D), (B, D) -> (2B,).
    """
    logits, target, row_valid = _two_view_logits(z_a, z_b, temperature, normalize, where)
    n = logits.shape[0]
    positive = jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]
    negative = ~jnp.eye(n, dtype=bool) & (jnp.arange(n)[None, :] != target[:, None])
    if row_valid is not None:
        negative = negative & row_valid[None, :]
    loss = jax.nn.logsumexp(jnp.where(negative, logits, _NEG_INF), axis=1) - positive
    return loss if row_valid is None else jnp.where(row_valid, loss, 0.0)


def infonce(
    anchors: ArrayLike,
    positives: ArrayLike,
    negatives: ArrayLike | None = None,
    *,
    temperature: ArrayLike,
    normalize: bool = True,
    where: ArrayLike | None = None,
    negatives_where: ArrayLike | None = None,
) -> Array:
    """One-directional InfoNCE (van den Oord et al. 2018, eq. 4).

    With in-batch negatives (``negatives=None``) the logits of anchor i are
    ``s(a_i, p_j) / tau`` over all positives j, the target being j = i:

        l_i = -s(a_i, p_i) / tau + log sum_j exp(s(a_i, p_j) / tau).

    With explicit negatives the denominator holds the positive and the K
    negatives of that anchor:

        l_i = -s(a_i, p_i) / tau + log(exp(s(a_i, p_i) / tau) + sum_k exp(s(a_i, n_ik) / tau)).

    Args:
      anchors: (B, D).
      positives: (B, D).
      negatives: None, or (B, K, D) negatives per anchor.
      temperature: tau > 0.
      normalize: L2-normalise all embeddings first.
      where: optional (B,) bool, the valid pairs (masked pairs are neither
        anchors nor in-batch negatives).
      negatives_where: optional (B, K) bool, the valid explicit negatives.

    Returns:
      (B,) float32 losses, 0 for masked anchors.
    """
    _check_pair("anchors", anchors, "positives", positives)
    _check_temperature(temperature)
    b, d = jnp.shape(anchors)
    where = _check_where(where, (b,))
    a, p = _prepare(anchors, normalize), _prepare(positives, normalize)
    if negatives is None:
        if negatives_where is not None:
            raise ValueError("negatives_where requires explicit negatives.")
        logits = jnp.einsum("bd,cd->bc", a, p, precision=lax.Precision.HIGHEST) / temperature
        valid = None if where is None else jnp.broadcast_to(where[None, :], (b, b))
        loss = _cross_entropy_rows(logits, jnp.arange(b), valid)
    else:
        _check_rank("negatives", negatives, 3)
        nb, k, nd = jnp.shape(negatives)
        if (nb, nd) != (b, d):
            raise ValueError(
                f"negatives must have shape (B, K, D) = ({b}, K, {d}), got {jnp.shape(negatives)}."
            )
        negatives_where = _check_where(negatives_where, (b, k), "negatives_where")
        n = _prepare(negatives, normalize)
        pos = jnp.sum(a * p, axis=-1) / temperature
        neg = jnp.einsum("bd,bkd->bk", a, n, precision=lax.Precision.HIGHEST) / temperature
        if negatives_where is not None:
            neg = jnp.where(negatives_where, neg, _NEG_INF)
        logits = jnp.concatenate([pos[:, None], neg], axis=1)
        loss = jax.nn.logsumexp(logits, axis=1) - pos
    return loss if where is None else jnp.where(where, loss, 0.0)


def clip_loss(
    z_a: ArrayLike,
    z_b: ArrayLike,
    *,
    temperature: ArrayLike,
    normalize: bool = True,
    where: ArrayLike | None = None,
) -> Array:
    """Symmetric two-tower (CLIP) loss (Radford et al. 2021), one value per pair.

        l_i = ( infonce(a -> b)_i + infonce(b -> a)_i ) / 2

    Args:
      z_a: (B, D) first-modality embeddings.
      z_b: (B, D) second-modality embeddings; row i pairs with z_a[i].
      temperature: tau > 0 (may be a traced, learnable value).
      normalize: L2-normalise first.
      where: optional (B,) bool valid pairs.

    Returns:
      (B,) float32 losses.
    """
    forward = infonce(z_a, z_b, temperature=temperature, normalize=normalize, where=where)
    backward = infonce(z_b, z_a, temperature=temperature, normalize=normalize, where=where)
    return 0.5 * (forward + backward)


def siglip_loss(
    z_a: ArrayLike,
    z_b: ArrayLike,
    *,
    temperature: ArrayLike,
    bias: ArrayLike,
    normalize: bool = True,
    where: ArrayLike | None = None,
) -> Array:
    """Pairwise sigmoid loss (Zhai et al. 2023, SigLIP, Algorithm 1), one value per row.

    With logits ``x_ij = s(a_i, b_j) / tau + bias`` and labels ``y_ij = +1`` on
    the diagonal, ``-1`` elsewhere:

        l_i = -sum_j log sigmoid(y_ij * x_ij)

    so ``mean(l)`` is the paper's loss (normalised by the batch size).

    Args:
      z_a, z_b: (B, D).
      temperature: tau > 0 (SigLIP's ``t = 1 / tau``).
      bias: scalar logit bias (SigLIP initialises it at -10).
      normalize: L2-normalise first.
      where: optional (B,) bool valid pairs.

    Returns:
      (B,) float32 losses.
    """
    _check_pair("z_a", z_a, "z_b", z_b)
    _check_temperature(temperature)
    b = jnp.shape(z_a)[0]
    where = _check_where(where, (b,))
    logits = cosine_similarity_matrix(z_a, z_b, normalize=normalize) / temperature + bias
    labels = 2.0 * jnp.eye(b, dtype=jnp.float32) - 1.0
    pairwise = -jax.nn.log_sigmoid(labels * logits)
    if where is not None:
        pairwise = jnp.where(where[:, None] & where[None, :], pairwise, 0.0)
    return jnp.sum(pairwise, axis=1)


# ----------------------------------------------------------------------------
# Gradient-estimator surrogates
# ----------------------------------------------------------------------------


def _check_scores(positive_sim: ArrayLike, negative_sim: ArrayLike) -> None:
    _check_rank("positive_sim", positive_sim, 1)
    _check_rank("negative_sim", negative_sim, 2)
    if jnp.shape(positive_sim)[0] != jnp.shape(negative_sim)[0]:
        raise ValueError(
            "positive_sim (B,) and negative_sim (B, K) must agree on B, got "
            f"{jnp.shape(positive_sim)} and {jnp.shape(negative_sim)}."
        )


def emc2_surrogate(
    positive_sim: ArrayLike,
    negative_sim: ArrayLike,
    *,
    temperature: ArrayLike,
    counts: ArrayLike | None = None,
) -> Array:
    """Surrogate whose gradient is the EMC² estimator of the global loss gradient.

    For anchor u with positive v and the chain's post-burn-in states
    n_1..n_K (drawn, approximately, from pi_u(n) ∝ exp(beta s(u, n))):

        value_i = beta * ( -s(u, v) + sum_k c_ik s(u, n_k) / sum_k c_ik )

    where ``c_ik`` counts how many post-burn-in sweeps the chain spent at
    candidate k (all ones: the plain mean over samples). Its gradient
    ``beta * (-∇s(u, v) + mean_k ∇s(u, n_k))`` is the stochastic gradient of
    the global contrastive loss used by EMC² (Yau et al. 2024, Algorithm 1;
    ``shared/design.md``, "EMC² chain"), since ∇ log Z_u = beta E_{pi_u}[∇s(u, n)].
    The *value* is not the global loss and should not be reported as one.

    Args:
      positive_sim: (B,) s(u_i, v_i), with gradient.
      negative_sim: (B, K) s(u_i, n_ik) for the candidate negatives, with
        gradient (fresh embeddings, not the chain's cached scores).
      temperature: tau = 1 / beta.
      counts: optional (B, K) non-negative visit counts or weights (bool is
        fine: the samples that count, e.g. after burn-in); treated as
        constants. A row whose counts are all zero contributes only its
        positive term.

    Returns:
      (B,) float32 surrogate values.
    """
    _check_scores(positive_sim, negative_sim)
    _check_temperature(temperature)
    pos = jnp.asarray(positive_sim, jnp.float32)
    neg = jnp.asarray(negative_sim, jnp.float32)
    if counts is None:
        neg_term = jnp.mean(neg, axis=1)
    else:
        if jnp.shape(counts) != jnp.shape(negative_sim):
            raise ValueError(
                f"counts must have the shape of negative_sim {jnp.shape(negative_sim)}, "
                f"got {jnp.shape(counts)}."
            )
        c = lax.stop_gradient(jnp.asarray(counts, jnp.float32))
        total = jnp.sum(c, axis=1)
        neg_term = jnp.sum(c * neg, axis=1) / jnp.where(total > 0, total, 1.0)
    return (neg_term - pos) / temperature


def sogclr_surrogate(
    positive_sim: ArrayLike,
    negative_sim: ArrayLike,
    weights: ArrayLike,
    *,
    temperature: ArrayLike,
    where: ArrayLike | None = None,
) -> Array:
    """Surrogate whose gradient is SogCLR's estimator (Yuan et al. 2022, eq. 5).

    With ``w_ij = exp(beta s_ij) / u_i`` precomputed by the SogCLR sampler
    (``u_i`` the moving average of the mean negative exp-score):

        value_i = beta * ( -s(u_i, v_i) + mean_{j : where_ij} sg(w_ij) * s_ij )

    Gradient: ``beta * (-∇s_ip + mean_j w_ij ∇s_ij)`` — the gradient of
    ``log(mean_j exp(beta s_ij)) - beta s_ip`` with the batch estimate of the
    normaliser replaced by ``u_i``. The value is not a loss.

    Args:
      positive_sim: (B,) s(u_i, v_i), with gradient.
      negative_sim: (B, N) similarities to the in-batch negatives, with gradient.
      weights: (B, N) weights; treated as constants (stop-gradient).
      temperature: tau = 1 / beta.
      where: optional (B, N) bool, the columns that are negatives.

    Returns:
      (B,) float32 surrogate values.
    """
    _check_scores(positive_sim, negative_sim)
    _check_temperature(temperature)
    if jnp.shape(weights) != jnp.shape(negative_sim):
        raise ValueError(
            f"weights must have the shape of negative_sim {jnp.shape(negative_sim)}, "
            f"got {jnp.shape(weights)}."
        )
    where = _check_where(where, jnp.shape(negative_sim))
    pos = jnp.asarray(positive_sim, jnp.float32)
    neg = jnp.asarray(negative_sim, jnp.float32)
    weighted = lax.stop_gradient(jnp.asarray(weights, jnp.float32)) * neg
    if where is None:
        neg_term = jnp.mean(weighted, axis=1)
    else:
        count = jnp.sum(where, axis=1)
        neg_term = jnp.sum(jnp.where(where, weighted, 0.0), axis=1) / jnp.maximum(count, 1)
    return (neg_term - pos) / temperature


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------


def contrastive_metrics(
    z_a: ArrayLike,
    z_b: ArrayLike,
    *,
    normalize: bool = True,
    where: ArrayLike | None = None,
) -> dict[str, Array]:
    """Similarity statistics and retrieval accuracy of paired embeddings.

    Args:
      z_a, z_b: (B, D) paired embeddings (row i of each is a positive pair).
      normalize: L2-normalise first.
      where: optional (B,) bool valid pairs.

    Returns:
      A flat dict of float32 scalars: ``positive_similarity`` (mean s(a_i, b_i)),
      ``negative_similarity`` (mean s(a_i, b_j), i != j), and
      ``top1_accuracy`` (fraction of a_i whose nearest b_j is b_i, and
      symmetrically; the mean of the two directions).
    """
    _check_pair("z_a", z_a, "z_b", z_b)
    b = jnp.shape(z_a)[0]
    where = _check_where(where, (b,))
    valid = jnp.ones((b,), bool) if where is None else where
    sim = cosine_similarity_matrix(z_a, z_b, normalize=normalize)
    pair_valid = valid[:, None] & valid[None, :]
    off_diagonal = pair_valid & ~jnp.eye(b, dtype=bool)
    masked = jnp.where(pair_valid, sim, _NEG_INF)
    hit_ab = jnp.argmax(masked, axis=1) == jnp.arange(b)
    hit_ba = jnp.argmax(masked, axis=0) == jnp.arange(b)
    return {
        "positive_similarity": masked_mean(jnp.diagonal(sim), valid),
        "negative_similarity": masked_mean(sim, off_diagonal),
        "top1_accuracy": 0.5 * (masked_mean(hit_ab, valid) + masked_mean(hit_ba, valid)),
    }
