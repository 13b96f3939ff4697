"""Embedding cache: negatives drawn from a stale table of embeddings.

The baseline "negative cache" of the EMC² paper (official code: ``cache.py``,
``EmbeddingCache``): an m x d table C of embeddings, written whenever an
example is encoded. For anchor u of example i, K negatives are drawn WITHOUT
replacement from

    q_u(j) ∝ exp(beta <u, C_j>)     over the filled rows j != i

by Gumbel-top-k: ``top_k_j(beta <u, C_j> + G_j)`` with G_j i.i.d. standard
Gumbel (the first draw is a softmax sample, the K draws are a sample of the
softmax without replacement). The caller re-encodes the drawn examples WITH
gradient: the table only decides which negatives to use. The table is stale:
each step writes the batch's fresh embeddings plus ``refresh_fraction * m``
rows refreshed round-robin.

Keeping ``step`` pure, the refresh is split in two: :func:`refresh_rows`
names the rows due for a refresh (from ``state.cursor``), the caller encodes
them (no gradient), and :func:`step` writes them together with the batch rows
and moves the cursor past the last refreshed row.

Without replacement the K draws are not i.i.d. from q_u; the outputs carry the
stale log-scores of the drawn rows and the log-normaliser over the eligible
rows, from which a caller can form importance weights
(``exp(log_scores - log_normalizer)``, the official code's ``cumu_weights``).

Data parallelism: the table is replicated; with ``axis_name`` the rows to
write (batch rows and refresh rows) are all-gathered (tiled) and every replica
applies the same scatter. Sampling needs no communication. The Gumbel noise of
an anchor depends only on ``(key, example_index)`` (and on the occurrence of a
repeated example among the device's rows, so two views draw independently).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from emc2jax.samplers import _checks, _collective, _random

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = [
    "CacheInfo",
    "CacheOutputs",
    "CacheState",
    "init",
    "num_refresh_rows",
    "refresh_rows",
    "step",
    "write",
]


class CacheState(NamedTuple):
    """The stale embedding table, replicated across devices.

    Attributes:
      embeddings: (m, d) float32 table C.
      filled: (m,) bool, rows written at least once (only those are sampled).
      cursor: () int32, the next row of the round-robin refresh.
    """

    embeddings: Array
    filled: Array
    cursor: Array


class CacheOutputs(NamedTuple):
    """The drawn negatives.

    Attributes:
      negative_index: (B, K) int32 dataset indices, in Gumbel order (the first
        is a sample of q_u); 0 where not valid.
      valid: (B, K) bool, False when fewer than K rows were eligible.
      log_scores: (B, K) float32 stale ``beta <u, C_j>`` of the drawn rows
        (-inf where not valid).
      log_normalizer: (B,) float32 ``logsumexp`` of the stale log-scores over
        the eligible rows (-inf if none).
    """

    negative_index: Array
    valid: Array
    log_scores: Array
    log_normalizer: Array


class CacheInfo(NamedTuple):
    """Scalar diagnostics (global over ``axis_name`` when given).

    Attributes:
      filled_fraction: fraction of the table's rows written so far.
      valid_fraction: fraction of the B * K draws that are valid.
      mean_log_score: mean stale log-score of the valid draws.
    """

    filled_fraction: Array
    valid_fraction: Array
    mean_log_score: Array


def init(num_examples: int, dim: int) -> CacheState:
    """An empty (m, d) table."""
    m = _checks.check_num_examples(num_examples, minimum=2)
    d = _checks.check_positive_int("dim", dim)
    return CacheState(
        embeddings=jnp.zeros((m, d), jnp.float32),
        filled=jnp.zeros((m,), bool),
        cursor=jnp.zeros((), jnp.int32),
    )


def _table_shape(state: CacheState) -> tuple[int, int]:
    if jnp.ndim(state.embeddings) != 2 or jnp.shape(state.cursor) != ():
        raise ValueError(
            "CacheState must hold an (m, d) embeddings table and a scalar cursor, got "
            f"shapes {jnp.shape(state.embeddings)} and {jnp.shape(state.cursor)}."
        )
    m = _checks.table_size("CacheState", state.embeddings, state.filled)
    return m, int(jnp.shape(state.embeddings)[1])


def num_refresh_rows(num_examples: int, refresh_fraction: float) -> int:
    """R = ceil(rho * m): the rows refreshed per step (at least one when rho > 0)."""
    if not 0.0 <= refresh_fraction <= 1.0:
        raise ValueError(f"refresh_fraction must lie in [0, 1], got {refresh_fraction}.")
    return int(math.ceil(refresh_fraction * num_examples - 1e-9))


def refresh_rows(state: CacheState, *, refresh_fraction: float) -> Array:
    """The rows due for the round-robin refresh: ``(cursor + arange(R)) % m``.

    The caller encodes these examples (no gradient) and passes them to
    :func:`step` as ``refresh_index`` / ``refresh_embeddings`` (under data
    parallelism each device may pass its own slice, in device order).

    Returns:
      (R,) int32 row indices, R = ceil(refresh_fraction * m) (static).
    """
    m, _ = _table_shape(state)
    r = num_refresh_rows(m, refresh_fraction)
    return (state.cursor + jnp.arange(r, dtype=jnp.int32)) % m


def _last_occurrence(index: Array) -> Array:
    """(n,) bool: True where no later entry has the same index (the one to write)."""
    n = index.shape[0]
    later = jnp.arange(n)[None, :] > jnp.arange(n)[:, None]
    return ~jnp.any((index[:, None] == index[None, :]) & later, axis=1)


def write(
    state: CacheState,
    index: ArrayLike,
    embeddings: ArrayLike,
    *,
    axis_name: str | None = None,
) -> CacheState:
    """Writes ``embeddings`` (n, d) into rows ``index`` (n,) and marks them filled.

    When an index occurs several times the last occurrence wins (a scatter
    with duplicates would leave the choice to the backend, and replicas must
    agree). With ``axis_name`` the rows of all devices are written, in device
    order. The cursor is unchanged.
    """
    m, d = _table_shape(state)
    _checks.check_rank("index", index, 1)
    _checks.check_integer("index", index)
    _checks.check_index_range("index", index, m)
    _checks.check_shape("embeddings", embeddings, (jnp.shape(index)[0], d))
    index = jnp.asarray(index, jnp.int32)
    embeddings = jnp.asarray(embeddings, jnp.float32)
    index = _collective.gather_rows(index, axis_name)
    embeddings = _collective.gather_rows(embeddings, axis_name)
    return _write_rows(state, index, embeddings)


def _write_rows(state: CacheState, index: Array, embeddings: Array) -> CacheState:
    m = state.filled.shape[0]
    target = jnp.where(_last_occurrence(index), index, m)  # m: dropped
    return state._replace(
        embeddings=state.embeddings.at[target].set(lax.stop_gradient(embeddings), mode="drop"),
        filled=state.filled.at[target].set(True, mode="drop"),
    )


def step(
    key: Array,
    state: CacheState,
    *,
    example_index: ArrayLike,
    anchors: ArrayLike,
    fresh_embeddings: ArrayLike | None,
    num_negatives: int,
    temperature: ArrayLike,
    refresh_index: ArrayLike | None = None,
    refresh_embeddings: ArrayLike | None = None,
    axis_name: str | None = None,
) -> tuple[CacheState, CacheOutputs, CacheInfo]:
    """Writes the fresh rows, then draws K negatives per anchor from the table.

    1. Write ``refresh_embeddings`` into ``refresh_index`` and the batch's
       ``fresh_embeddings`` into ``example_index`` (batch rows win over refresh
       rows of the same example); the cursor moves past the last refresh row.
    2. For anchor b (example i): Gumbel-top-K over the filled rows j != i of
       ``beta <anchors[b], C_j>`` (``beta = 1 / temperature``), with the
       Gumbel noise depending only on ``(key, i)`` and, for a repeated
       example, on which of its rows this is (its views draw independently).

    Args:
      key: PRNG key of this step.
      state: the table.
      example_index: (B,) int dataset index of each anchor (rows may repeat,
        e.g. both views as anchors; for writing, the last row wins).
      anchors: (B, d) anchor embeddings (stop-gradient is applied).
      fresh_embeddings: (B, d) embeddings to write at ``example_index``, or None.
      num_negatives: K, 1 <= K <= m - 1.
      temperature: tau > 0.
      refresh_index: optional (R,) int rows from :func:`refresh_rows`.
      refresh_embeddings: (R, d) their embeddings (required with ``refresh_index``).
      axis_name: the data-parallel axis, or None.

    Returns:
      ``(new_state, outputs, info)``.
    """
    m, d = _table_shape(state)
    _checks.check_rank("example_index", example_index, 1)
    _checks.check_integer("example_index", example_index)
    _checks.check_index_range("example_index", example_index, m)
    b = jnp.shape(example_index)[0]
    _checks.check_shape("anchors", anchors, (b, d))
    k = _checks.check_positive_int("num_negatives", num_negatives)
    if k > m - 1:
        raise ValueError(f"num_negatives must be <= m - 1 = {m - 1} (distinct negatives), got {k}.")
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if (refresh_index is None) != (refresh_embeddings is None):
        raise ValueError("refresh_index and refresh_embeddings must be given together.")
    example_index = jnp.asarray(example_index, jnp.int32)

    def gathered(x: ArrayLike, dtype: jnp.dtype) -> Array:
        return _collective.gather_rows(jnp.asarray(x, dtype), axis_name)

    # Refresh rows first, then the batch rows (over all devices): the batch's
    # embeddings win where an example is in both.
    rows, values = [], []
    if refresh_index is not None:
        _checks.check_rank("refresh_index", refresh_index, 1)
        _checks.check_integer("refresh_index", refresh_index)
        _checks.check_index_range("refresh_index", refresh_index, m)
        _checks.check_shape(
            "refresh_embeddings", refresh_embeddings, (jnp.shape(refresh_index)[0], d)
        )
        rows.append(gathered(refresh_index, jnp.int32))
        values.append(gathered(refresh_embeddings, jnp.float32))
    if fresh_embeddings is not None:
        _checks.check_shape("fresh_embeddings", fresh_embeddings, (b, d))
        rows.append(gathered(example_index, jnp.int32))
        values.append(gathered(fresh_embeddings, jnp.float32))
    if rows:
        state = _write_rows(state, jnp.concatenate(rows), jnp.concatenate(values))
    if refresh_index is not None and jnp.shape(refresh_index)[0] > 0:
        # Past the last refresh row: right whether each device passed its own
        # slice of `refresh_rows` (in device order) or all of it.
        last = rows[0][-1]
        state = state._replace(cursor=((last + 1) % m).astype(jnp.int32))

    beta = 1.0 / jnp.asarray(temperature, jnp.float32)
    u = lax.stop_gradient(jnp.asarray(anchors, jnp.float32))
    scores = beta * jnp.einsum("bd,md->bm", u, state.embeddings, precision=lax.Precision.HIGHEST)
    eligible = state.filled[None, :] & (jnp.arange(m)[None, :] != example_index[:, None])
    # Rows repeating an example (its two views) get independent noise streams.
    noise = _random.gumbels(key, example_index, m, stream=_random.occurrence(example_index))
    perturbed = jnp.where(eligible, scores + noise, -jnp.inf)
    top, drawn = lax.top_k(perturbed, k)
    valid = top > -jnp.inf
    drawn_scores = jnp.where(valid, jnp.take_along_axis(scores, drawn, axis=1), -jnp.inf)
    outputs = CacheOutputs(
        negative_index=jnp.where(valid, drawn, 0).astype(jnp.int32),
        valid=valid,
        log_scores=drawn_scores,
        log_normalizer=jax.nn.logsumexp(jnp.where(eligible, scores, -jnp.inf), axis=1),
    )

    totals = jnp.stack(
        [
            jnp.sum(valid, dtype=jnp.float32),
            jnp.asarray(b * k, jnp.float32),
            jnp.sum(jnp.where(valid, drawn_scores, 0.0)),
        ]
    )
    if axis_name is not None:
        totals = lax.psum(totals, axis_name)
    num_valid, num_draws, score_sum = totals
    info = CacheInfo(
        filled_fraction=jnp.mean(state.filled, dtype=jnp.float32),
        valid_fraction=num_valid / jnp.maximum(num_draws, 1.0),
        mean_log_score=score_sum / jnp.maximum(num_valid, 1.0),
    )
    return state, outputs, info
