"""SogCLR: per-example moving averages of the negative partition function.

SogCLR (Yuan et al., ICML 2022, Algorithm 1) optimises the global contrastive
loss with a per-example estimate u_i of the mean negative exp-score
``E_j exp(beta s(u_i, n_j))``. Each time example i is in the batch, with
``g_i = mean_{j in batch negatives} exp(beta s_ij)``:

    u_i <- (1 - gamma) u_i + gamma g_i          (gamma = 1 on the first visit)

and the negative part of the gradient weights ``∇ s_ij`` by
``w_ij = exp(beta s_ij) / u_i`` (stop-gradient), which
``losses.sogclr_surrogate`` consumes. O(m) memory.

u is stored in LOG space (``log_u``): ``exp(beta s)`` overflows float32 at
temperature 0.01 (beta = 100), its log does not; the update is a
``logaddexp`` and the weights ``exp(beta s_ij - log u_i)`` are O(1).

Several rows of one example (both views as anchors: the B rows are the views
stacked, with repeated ``example_index``): each row's weights use that row's
own updated estimate ``(1 - gamma) u_i + gamma g_row``, and the table stores
``(1 - gamma) u_i + gamma mean_rows(g_row)`` -- the average of the rows'
updated estimates, as the official code does (``u1``, ``u2`` per view, table
``(u1 + u2) / 2``). On the first visit gamma = 1 per example (the official
code switches gamma to 1 only when the whole batch is unseen).

Data parallelism: the table is replicated. With ``axis_name`` the rows'
indices and estimates are all-gathered (tiled), the per-example average is
taken over the global batch, and every replica applies the same scatter.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from emc2jax.samplers import _checks, _collective

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = ["SogCLRInfo", "SogCLROutputs", "SogCLRState", "init", "step"]


class SogCLRState(NamedTuple):
    """Per-example moving averages, replicated across devices.

    Attributes:
      log_u: (m,) float32, log of the moving average u_i (0 until seen).
      seen: (m,) bool, whether example i has been in a batch yet.
    """

    log_u: Array
    seen: Array


class SogCLROutputs(NamedTuple):
    """The estimator's weights.

    Attributes:
      weights: (B, N) float32 ``exp(beta s_ij - log u_row)``, stop-gradient; 0
        at masked columns and for rows without a valid negative.
      log_u: (B,) float32, the row's updated log u used for its weights.
    """

    weights: Array
    log_u: Array


class SogCLRInfo(NamedTuple):
    """Scalar diagnostics (global over ``axis_name`` when given).

    Attributes:
      mean_log_u: mean over the rows of the updated log u.
      first_visit_fraction: fraction of rows whose example was unseen.
      mean_weight: mean weight over the valid (row, negative) pairs.
    """

    mean_log_u: Array
    first_visit_fraction: Array
    mean_weight: Array


def init(num_examples: int) -> SogCLRState:
    """Unseen estimates for a dataset of ``num_examples`` examples."""
    m = _checks.check_num_examples(num_examples)
    return SogCLRState(log_u=jnp.zeros((m,), jnp.float32), seen=jnp.zeros((m,), bool))


def _check_gamma(gamma: ArrayLike) -> None:
    if isinstance(gamma, (int, float)) and not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must lie in (0, 1], got {gamma}.")


def step(
    key: Array,
    state: SogCLRState,
    *,
    example_index: ArrayLike,
    negative_log_scores: ArrayLike,
    negative_mask: ArrayLike | None = None,
    gamma: ArrayLike,
    axis_name: str | None = None,
) -> tuple[SogCLRState, SogCLROutputs, SogCLRInfo]:
    """One SogCLR update of the batch's estimates (Yuan et al. 2022, Algorithm 1).

    Per row r (example i = ``example_index[r]``) with valid negatives J_r:

        log g_r   = logsumexp_{j in J_r} l_rj - log |J_r|
        log u_r   = log((1 - gamma) u_i + gamma g_r)    (= log g_r if unseen)
        w_rj      = exp(l_rj - log u_r)
        u_i      <- (1 - gamma) u_i + gamma mean_{rows of i} g_r

    Args:
      key: unused (kept for the samplers' common signature).
      state: the table.
      example_index: (B,) int dataset index of each row; repeated for several
        views of one example.
      negative_log_scores: (B, N) float ``beta * s_ij`` of the in-batch
        negatives (constants; stop-gradient is applied).
      negative_mask: optional (B, N) bool, the columns that are negatives.
      gamma: moving-average rate in (0, 1].
      axis_name: the data-parallel axis, or None.

    Returns:
      ``(new_state, outputs, info)``.
    """
    del key
    m = _checks.table_size("SogCLRState", *state)
    _checks.check_rank("example_index", example_index, 1)
    _checks.check_integer("example_index", example_index)
    _checks.check_index_range("example_index", example_index, m)
    _checks.check_rank("negative_log_scores", negative_log_scores, 2)
    _checks.check_floating("negative_log_scores", negative_log_scores)
    _check_gamma(gamma)
    b, n = jnp.shape(negative_log_scores)
    if jnp.shape(example_index) != (b,):
        raise ValueError(
            f"example_index must have shape (B,) = ({b},) to match negative_log_scores "
            f"{(b, n)}, got {jnp.shape(example_index)}."
        )
    example_index = jnp.asarray(example_index, jnp.int32)
    scores = lax.stop_gradient(jnp.asarray(negative_log_scores, jnp.float32))
    valid = jnp.ones((b, n), bool) if negative_mask is None else negative_mask
    _checks.check_shape("negative_mask", valid, (b, n))
    valid = jnp.asarray(valid, bool) & (scores > -jnp.inf)
    gamma = jnp.asarray(gamma, jnp.float32)

    count = jnp.sum(valid, axis=1)
    has_negatives = count > 0
    log_g = jax.nn.logsumexp(jnp.where(valid, scores, -jnp.inf), axis=1) - jnp.log(
        jnp.maximum(count, 1).astype(jnp.float32)
    )
    log_g = jnp.where(has_negatives, log_g, -jnp.inf)

    def moving_average(index: Array, log_estimate: Array) -> Array:
        old = state.log_u[index]
        blended = jnp.logaddexp(jnp.log1p(-gamma) + old, jnp.log(gamma) + log_estimate)
        return jnp.where(state.seen[index], blended, log_estimate)

    row_log_u = moving_average(example_index, log_g)
    weights = jnp.where(valid & has_negatives[:, None], jnp.exp(scores - row_log_u[:, None]), 0.0)

    all_index, all_log_g, all_ok = (
        _collective.gather_rows(x, axis_name) for x in (example_index, log_g, has_negatives)
    )
    # Average the estimates of the rows that share an example (both views).
    same = (all_index[:, None] == all_index[None, :]) & all_ok[None, :]
    mean_log_g = jax.nn.logsumexp(jnp.where(same, all_log_g[None, :], -jnp.inf), axis=1) - jnp.log(
        jnp.maximum(jnp.sum(same, axis=1), 1).astype(jnp.float32)
    )
    new_log_u = moving_average(all_index, mean_log_g)
    # Rows without any valid negative leave their example untouched (index m: dropped).
    target = jnp.where(all_ok, all_index, m)
    new_state = SogCLRState(
        log_u=state.log_u.at[target].set(new_log_u, mode="drop"),
        seen=state.seen.at[target].set(True, mode="drop"),
    )

    totals = jnp.stack(
        [
            jnp.sum(jnp.where(has_negatives, row_log_u, 0.0)),
            jnp.sum(has_negatives, dtype=jnp.float32),
            jnp.sum(has_negatives & ~state.seen[example_index], dtype=jnp.float32),
            jnp.sum(weights),
            jnp.sum(valid & has_negatives[:, None], dtype=jnp.float32),
        ]
    )
    if axis_name is not None:
        totals = lax.psum(totals, axis_name)
    sum_log_u, rows, first, sum_weights, pairs = totals
    info = SogCLRInfo(
        mean_log_u=sum_log_u / jnp.maximum(rows, 1.0),
        first_visit_fraction=first / jnp.maximum(rows, 1.0),
        mean_weight=sum_weights / jnp.maximum(pairs, 1.0),
    )
    return new_state, SogCLROutputs(weights=weights, log_u=row_log_u), info
