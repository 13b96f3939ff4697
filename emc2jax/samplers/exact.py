"""The exact negative distribution over a finite negative set: the oracle.

For anchor u and a finite set of candidate negatives n_1..n_N (e.g. every
view of every other example, on a small dataset with a fixed number of
augmentations), the target of EMC²'s chain is the softmax

    pi_u(n_k) = exp(beta s(u, n_k)) / sum_{k'} exp(beta s(u, n_k')),

and the global contrastive loss (``shared/design.md``) is

    L_u = -beta s(u, v) + log sum_k exp(beta s(u, n_k)).

This module computes both exactly: the MH exactness tests compare the chain's
visit frequencies with :func:`exact_negative_distribution`, and
:func:`global_contrastive_loss` gives the loss whose autodiff gradient is the
exact GCL gradient (the reference for gradient-error measurements). The
``init``/``step`` pair gives the exact distribution the samplers' shape:
stateless, its weights are pi_u (``losses.emc2_surrogate(pos, sims, counts=weights)``
then has the exact GCL gradient).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from emc2jax import losses
from emc2jax.samplers import _checks

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = [
    "ExactInfo",
    "ExactOutputs",
    "ExactState",
    "exact_negative_distribution",
    "global_contrastive_loss",
    "init",
    "log_normalizer",
    "own_example_mask",
    "step",
    "total_variation",
]


class ExactState(NamedTuple):
    """Stateless: an empty pytree (kept for the samplers' common shape)."""


class ExactOutputs(NamedTuple):
    """The exact weights.

    Attributes:
      weights: (B, N) float32 pi_u over the valid candidates (rows sum to 1, or
        0 when a row has no valid candidate).
      log_normalizer: (B,) float32 ``logsumexp`` of the valid log-scores.
    """

    weights: Array
    log_normalizer: Array


class ExactInfo(NamedTuple):
    """Scalar diagnostics.

    Attributes:
      mean_entropy: mean over the rows of the entropy of pi_u (nats).
    """

    mean_entropy: Array


def _masked_scores(log_scores: ArrayLike, mask: ArrayLike | None) -> Array:
    _checks.check_rank("anchor_log_scores", log_scores, 2)
    scores = jnp.asarray(log_scores, jnp.float32)
    if mask is not None:
        _checks.check_shape("mask", mask, scores.shape)
        scores = jnp.where(jnp.asarray(mask, bool), scores, -jnp.inf)
    return scores


def log_normalizer(anchor_log_scores: ArrayLike, mask: ArrayLike | None = None) -> Array:
    """``log sum_k exp(l_k)`` over the valid candidates: (B, N) -> (B,)."""
    return jax.nn.logsumexp(_masked_scores(anchor_log_scores, mask), axis=1)


def exact_negative_distribution(
    anchor_log_scores: ArrayLike, mask: ArrayLike | None = None
) -> Array:
    """pi_u(n_k) ∝ exp(l_k) over the valid candidates, per row.

    Args:
      anchor_log_scores: (B, N) log-scores ``beta * s(u_b, n_k)``.
      mask: optional (B, N) bool, the valid candidates.

    Returns:
      (B, N) float32 probabilities; 0 at masked candidates; a row without any
      valid candidate is all zeros.
    """
    scores = _masked_scores(anchor_log_scores, mask)
    log_z = jax.nn.logsumexp(scores, axis=1, keepdims=True)
    return jnp.where(jnp.isfinite(log_z), jnp.exp(scores - log_z), 0.0)


def own_example_mask(anchor_index: ArrayLike, candidate_index: ArrayLike) -> Array:
    """(B, N) bool: candidate k is a negative of anchor b (another example)."""
    _checks.check_rank("anchor_index", anchor_index, 1)
    _checks.check_rank("candidate_index", candidate_index, 1)
    return jnp.asarray(candidate_index)[None, :] != jnp.asarray(anchor_index)[:, None]


def total_variation(p: ArrayLike, q: ArrayLike, *, axis: int = -1) -> Array:
    """``0.5 * sum |p - q|`` along ``axis``."""
    if jnp.shape(p) != jnp.shape(q):
        raise ValueError(
            f"p and q must have the same shape, got {jnp.shape(p)} and {jnp.shape(q)}."
        )
    return 0.5 * jnp.sum(jnp.abs(jnp.asarray(p, jnp.float32) - jnp.asarray(q, jnp.float32)), axis)


def init(num_examples: int | None = None) -> ExactState:
    """The (empty) state; ``num_examples`` is accepted for the common signature."""
    del num_examples
    return ExactState()


def step(
    key: Array,
    state: ExactState,
    *,
    negative_log_scores: ArrayLike,
    negative_mask: ArrayLike | None = None,
) -> tuple[ExactState, ExactOutputs, ExactInfo]:
    """The exact distribution as a (stateless) sampler: weights = pi_u.

    Args:
      key: unused.
      state: :class:`ExactState`.
      negative_log_scores: (B, N) ``beta * s(u_b, n_k)`` (stop-gradient applied).
      negative_mask: optional (B, N) bool valid candidates.

    Returns:
      ``(state, outputs, info)``.
    """
    del key
    scores = lax.stop_gradient(_masked_scores(negative_log_scores, negative_mask))
    log_z = jax.nn.logsumexp(scores, axis=1)
    weights = jnp.where(jnp.isfinite(log_z)[:, None], jnp.exp(scores - log_z[:, None]), 0.0)
    entropy = -jnp.sum(jnp.where(weights > 0, weights * (scores - log_z[:, None]), 0.0), axis=1)
    return state, ExactOutputs(weights, log_z), ExactInfo(mean_entropy=jnp.mean(entropy))


def global_contrastive_loss(
    anchors: ArrayLike,
    positives: ArrayLike,
    bank: ArrayLike,
    *,
    anchor_index: ArrayLike,
    bank_index: ArrayLike,
    temperature: ArrayLike,
    normalize: bool = True,
    chunk_size: int | None = None,
) -> Array:
    """The global contrastive loss of each anchor against a full negative bank.

        L_b = -beta s(u_b, v_b) + log sum_{k : bank_index[k] != anchor_index[b]}
                                       exp(beta s(u_b, bank_k))

    (the GCL of ``shared/design.md`` with the expectation over augmentations
    replaced by the bank's fixed views). Differentiable in ``anchors``,
    ``positives`` and ``bank``: its gradient is the exact GCL gradient.

    Args:
      anchors: (B, D) anchor views u.
      positives: (B, D) their positives v.
      bank: (N, D) every candidate negative view (e.g. all m * n_aug views).
      anchor_index: (B,) dataset index of each anchor.
      bank_index: (N,) dataset index of each bank row (rows of the anchor's own
        example are excluded from its sum).
      temperature: tau = 1 / beta.
      normalize: L2-normalise the embeddings first (cosine similarity).
      chunk_size: evaluate the sum over the bank in chunks of this many rows
        under ``jax.checkpoint`` (memory O(B * chunk) in the backward pass);
        None: in one piece.

    Returns:
      (B,) float32 losses.
    """
    _checks.check_rank("anchors", anchors, 2)
    _checks.check_rank("bank", bank, 2)
    b, d = jnp.shape(anchors)
    n = jnp.shape(bank)[0]
    _checks.check_shape("positives", positives, (b, d))
    _checks.check_shape("bank", bank, (n, d))
    _checks.check_shape("anchor_index", anchor_index, (b,))
    _checks.check_shape("bank_index", bank_index, (n,))
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")

    def prepare(x: ArrayLike) -> Array:
        x = jnp.asarray(x, jnp.float32)
        return losses.l2_normalize(x) if normalize else x

    u, v, bank = prepare(anchors), prepare(positives), prepare(bank)
    anchor_index = jnp.asarray(anchor_index, jnp.int32)
    bank_index = jnp.asarray(bank_index, jnp.int32)
    positive = jnp.sum(u * v, axis=1) / temperature

    def log_sum(rows: Array, index: Array, real: Array) -> Array:
        # log sum_k exp(beta s(u_b, rows_k)) over the rows of other examples.
        logits = jnp.einsum("bd,nd->bn", u, rows, precision=lax.Precision.HIGHEST) / temperature
        valid = (index[None, :] != anchor_index[:, None]) & real[None, :]
        return jax.nn.logsumexp(jnp.where(valid, logits, -jnp.inf), axis=1)

    if chunk_size is None or chunk_size >= n:
        return log_sum(bank, bank_index, jnp.ones((n,), bool)) - positive
    chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n
    rows = jnp.pad(bank, ((0, pad), (0, 0))).reshape(num_chunks, chunk_size, d)
    index = jnp.pad(bank_index, (0, pad)).reshape(num_chunks, chunk_size)
    real = (jnp.arange(num_chunks * chunk_size) < n).reshape(num_chunks, chunk_size)
    # Recompute each chunk's logits in the backward pass instead of storing them.
    per_chunk = lax.map(jax.checkpoint(lambda x: log_sum(*x)), (rows, index, real))
    return jax.nn.logsumexp(per_chunk, axis=0) - positive
