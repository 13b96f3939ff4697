"""EMC²: adaptive Metropolis–Hastings negative sampling (Yau et al., ICML 2024).

The global contrastive loss of anchor view u (``shared/design.md``)

    L_u = -beta s(u, v) + log sum_{(j, a): j != i} exp(beta s(u, f(a(x_j))))

has the negative-gradient part ``beta E_{n ~ pi_u}[∇ s(u, n)]`` with
``pi_u(n) ∝ exp(beta s(u, n))``. EMC² (Algorithm 1 of the paper) estimates that
expectation with one Markov chain per training example i, whose state
``(j_i, a_i, l_i)`` is the current negative (dataset index, augmentation id)
and the *cached* log-score ``l_i = beta s`` computed when it was accepted.

One call of :func:`step` runs, for every example of the batch, an independence
Metropolis–Hastings sweep over the proposals:

    for each proposal n' (log-score l' = beta s(u_v, n'), under the current
    encoder, stop-gradient):
        accept with probability min(1, exp(l' - l_cur))
        on accept: state <- n', l_cur <- l'

against the cached, stale ``l_cur`` ("adaptive" MH). The V anchor views of an
example share ONE chain, as in the official code (``mh_step`` is called once
per augmentation on the same chain): the sweep runs view 0's P proposals, then
view 1's P proposals, ... The negatives of anchor view v are the states the
chain visits during view v's segment after its first ``burn_in`` proposals.
Within a step a state is either the CARRIED state (from earlier steps; the
caller encodes it fresh, with gradient, see :func:`carried_negatives`) or one
of the P proposal columns. The columns are shared by the views: column p is
the same candidate for every view (the in-batch views of a step, or the draws
of :func:`uniform_proposals` for an example), so a state accepted during view
0's segment and still held during view 1's is reported as column p of view 1.
With V = 1 (or V segments over independent proposals) each sweep leaves pi_u
invariant: with frozen scores the chain samples pi_u exactly. With V > 1 over
the same columns -- the official sweep -- view 1 re-proposes candidates the
chain has already seen, which is not independent of its state, so the step
is only approximately pi_u-invariant (a small flattening that shrinks as P
grows; ``python -m emc2jax.reproduce mh_exactness`` measures it).

Outputs are visit *fractions*: ``proposal_weights[b, v, p]`` and
``carried_weights[b, v]`` are the fractions of anchor view v's counted sweeps
spent at column p and at the carried state. The estimator (``losses.emc2_surrogate``)
weights fresh similarities with them.

Carried-over states and burn-in: the official PyTorch code
(amazon-science/contrastive_emc2, ``main_mcmc.py``) subtracts the burn-in twice
from the carried state's visit count, so with ``burn_in > 0`` carried-over
states are dropped (or under-counted) while the normaliser still counts their
sweeps. Here the carried state's weight is exactly its share of the counted
post-burn-in sweeps, like any other state.

Masked proposals (``proposal_mask`` False, e.g. the anchor's own views, or a
log-score of -inf) are *skipped*: the chain does not move and the sweep is not
counted (the official code's ``skip_mask``). Skipping keeps MH exact: the
remaining proposals are uniform over the other examples.

Data parallelism: the chain table is replicated. Each device sweeps its own
examples; with ``axis_name`` the rows to write (example indices and new chain
states) are ``lax.all_gather``-ed (tiled) over that axis and every replica
applies the same scatter, so the replicas stay identical. Example indices must
be distinct across the global batch. The randomness of example i depends only
on ``(key, i)`` (a counter-based hash, like ``fold_in(key, i)``), so results do
not depend on how examples are placed on devices.

Implementation: per view segment, two ``lax.scan`` passes over the P
positions carrying O(B) numbers each -- a forward pass for the acceptance
decisions, a backward pass that turns them into visit counts -- with no
per-iteration scatter or gather, vectorised over the anchors and mapped over
chunks of anchors (``chunk_size``) so that a chunk's working set stays in
cache on CPU. ``benchmarks/bench_sampler.py`` times it against the official
code's loop shape.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from emc2jax.samplers import _checks, _collective, _random

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = [
    "EMC2Info",
    "EMC2Outputs",
    "EMC2State",
    "SweepResult",
    "carried_negatives",
    "init",
    "mh_sweep",
    "step",
    "uniform_proposals",
]

# Salt folded into the key of `uniform_proposals` so that passing the same key
# as to `step` cannot correlate the proposals with the acceptance uniforms.
_PROPOSAL_SALT = 0x9E3779B9 & 0x7FFFFFFF
# Anchors per chunk of the sweep on CPU (see `step`'s chunk_size).
_CPU_CHUNK_SIZE = 256


class EMC2State(NamedTuple):
    """Per-example chain table: O(m) memory, replicated across devices.

    Attributes:
      negative_index: (m,) int32, the current negative's dataset index; -1 when
        the chain is still empty (no proposal accepted yet).
      negative_aug: (m,) int32, its augmentation id (-1 when empty).
      log_score: (m,) float32, the cached log-score beta * s(u, negative)
        computed when it was accepted; -inf when empty, so that the first
        proposal is always accepted.
    """

    negative_index: Array
    negative_aug: Array
    log_score: Array


class EMC2Outputs(NamedTuple):
    """What the caller needs to form the estimator.

    Attributes:
      proposal_weights: (B, V, P) float32, fraction of anchor view v's counted
        (post-burn-in, unmasked, chain non-empty) sweeps spent at column p.
      carried_weights: (B, V) float32, the same fraction for the carried state.
        ``proposal_weights[b, v].sum() + carried_weights[b, v]`` is 1, or 0 when
        no sweep was counted (e.g. the chain is still empty).
      num_counted: (B, V) int32, the number of counted sweeps (the normaliser).
      final_column: (B,) int32, the column p of the final state, or -1 when the
        final state is the carried state (or the chain is empty).
      negative_index: (B,) int32, the batch rows' new chain state (index,
      negative_aug: (B,) int32,   augmentation id and cached log-score),
      log_score: (B,) float32     as written to the table.
    """

    proposal_weights: Array
    carried_weights: Array
    num_counted: Array
    final_column: Array
    negative_index: Array
    negative_aug: Array
    log_score: Array


class EMC2Info(NamedTuple):
    """Scalar diagnostics (global over the ``axis_name`` axis when given).

    Attributes:
      acceptance_rate: accepted / unmasked proposals (burn-in included).
      carried_fraction: fraction of the counted sweeps spent at carried-over
        states (the negatives the caller had to encode in an extra pass).
      mean_log_score: mean cached log-score beta * s of the counted states.
    """

    acceptance_rate: Array
    carried_fraction: Array
    mean_log_score: Array


class SweepResult(NamedTuple):
    """Result of :func:`mh_sweep` for B chains over V segments of P proposals.

    Attributes:
      column_counts: (B, V, P) int32, counted sweeps of segment v spent at
        column p (column p of every segment is the same candidate).
      carried_counts: (B, V) int32, counted sweeps of segment v spent at the
        initial (carried) state.
      final_column: (B,) int32, the flat position v * P + p of the last
        accepted proposal, or -1 when no proposal was accepted.
      final_log_score: (B,) float32, the cached log-score of the final state.
      num_accepted: (B,) int32, accepted proposals.
      counted_log_score: (B,) float32, the sum of the state's cached
        log-score over the counted sweeps.
    """

    column_counts: Array
    carried_counts: Array
    final_column: Array
    final_log_score: Array
    num_accepted: Array
    counted_log_score: Array


def init(num_examples: int) -> EMC2State:
    """Empty chains for a dataset of ``num_examples`` examples (m >= 2)."""
    m = _checks.check_num_examples(num_examples, minimum=2)
    return EMC2State(
        negative_index=jnp.full((m,), -1, jnp.int32),
        negative_aug=jnp.full((m,), -1, jnp.int32),
        log_score=jnp.full((m,), -jnp.inf, jnp.float32),
    )


def _num_examples(state: EMC2State) -> int:
    m = _checks.table_size("EMC2State", *state)
    for name, x, dtype in zip(
        EMC2State._fields, state, (jnp.int32, jnp.int32, jnp.float32), strict=True
    ):
        if jnp.ndim(x) != 1 or jnp.result_type(x) != dtype:
            raise ValueError(
                f"EMC2State.{name} must be a (m,) {jnp.dtype(dtype).name} array, got shape "
                f"{jnp.shape(x)} and dtype {jnp.result_type(x)}."
            )
    return m


def _check_example_index(example_index: ArrayLike, m: int) -> Array:
    _checks.check_rank("example_index", example_index, 1)
    _checks.check_integer("example_index", example_index)
    _checks.check_index_range("example_index", example_index, m)
    return jnp.asarray(example_index, jnp.int32)


def carried_negatives(state: EMC2State, example_index: ArrayLike) -> tuple[Array, Array, Array]:
    """The chain states carried over from earlier steps, for the caller to encode.

    The caller encodes ``x_index`` under augmentation ``aug`` *fresh* (with
    gradient) before calling :func:`step`: that embedding is the carried
    state's negative in this step's estimator.

    Args:
      state: the chain table (m rows).
      example_index: (B,) int dataset indices of the batch's examples.

    Returns:
      ``(index, aug, valid)``: (B,) int32, (B,) int32, (B,) bool. Where the chain
      is empty (``valid`` False), index and aug are 0 so they can still be
      gathered; their weights are then 0.
    """
    m = _num_examples(state)
    example_index = _check_example_index(example_index, m)
    index = state.negative_index[example_index]
    aug = state.negative_aug[example_index]
    valid = index >= 0
    return jnp.where(valid, index, 0), jnp.where(valid, aug, 0), valid


def uniform_proposals(
    key: Array,
    example_index: ArrayLike,
    *,
    num_examples: int,
    num_augmentations: int,
    num_proposals: int,
) -> tuple[Array, Array]:
    """P independent uniform draws of (example j != i, augmentation a) per example.

    The "uniform over the dataset" proposal mode: each candidate is drawn
    uniformly from the m - 1 other examples and the ``num_augmentations``
    augmentation ids, independently. The caller scores them (encodes them and
    computes beta * s(u_v, candidate)) and passes them to :func:`step` as
    columns shared by the views. Randomness is per example
    (``fold_in(key, example_index)``, after a fixed salt), so duplicated rows of
    the same example get the same candidates.

    Args:
      key: a PRNG key.
      example_index: (B,) int dataset indices i.
      num_examples: m, the dataset size (>= 2).
      num_augmentations: the number of augmentation ids (>= 1).
      num_proposals: P (>= 1).

    Returns:
      ``(index, aug)``, both (B, P) int32; ``index != example_index[:, None]``.
    """
    m = _checks.check_num_examples(num_examples, minimum=2)
    n_aug = _checks.check_positive_int("num_augmentations", num_augmentations)
    p = _checks.check_positive_int("num_proposals", num_proposals)
    example_index = _check_example_index(example_index, m)
    key = jax.random.fold_in(key, _PROPOSAL_SALT)

    def one(i: Array) -> tuple[Array, Array]:
        k_index, k_aug = jax.random.split(jax.random.fold_in(key, i))
        # Uniform over {0..m-1} \ {i}: draw from m - 1 values and skip i.
        r = jax.random.randint(k_index, (p,), 0, m - 1, dtype=jnp.int32)
        return r + (r >= i).astype(jnp.int32), jax.random.randint(
            k_aug, (p,), 0, n_aug, dtype=jnp.int32
        )

    return jax.vmap(one)(example_index)


def _sweep_time_major(
    scores: Array,
    log_uniforms: Array,
    valid: Array,
    initial_log_score: Array,
    burn_in: int,
    unroll: int,
) -> SweepResult:
    """:func:`mh_sweep` on time-major (V, P, B) inputs.

    Per segment w, two ``lax.scan`` passes over its P positions, each carrying
    O(B) numbers: a forward pass makes the acceptance decisions (as
    ``l_cur < h`` with the threshold ``h = l - log u`` precomputed), a backward
    pass turns them into visit counts (the chain stays at the proposal
    accepted at t until the next acceptance, or the end of the segment). The
    state held when a segment starts gets the sweeps before the segment's
    first acceptance. No scatter, no gather; the loop bodies are a few
    vector ops, so the sweep costs about 2T loop iterations of O(B) work.
    """
    v, p, b = scores.shape
    threshold = jnp.where(valid, scores - log_uniforms, -jnp.inf)
    post_burn_in = jnp.arange(p) >= burn_in
    columns = jnp.arange(p, dtype=jnp.int32)

    def forward(carry, x):
        current, column, num_accepted, score_sum = carry
        h, score, ok, post, position = x
        accept = current < h
        current = jnp.where(accept, score, current)
        column = jnp.where(accept, position, column)
        counted = ok & post & (current > -jnp.inf)
        carry = (
            current,
            column,
            num_accepted + accept.astype(jnp.int32),
            score_sum + jnp.where(counted, current, 0.0),
        )
        # One int8 per step (bit 0: accepted, bit 1: counted): one output
        # write per iteration instead of two, ~15% faster on CPU at B = 256.
        return carry, accept.astype(jnp.int8) + 2 * counted.astype(jnp.int8)

    def backward(run, step_flags):
        # run: counted sweeps from here to the next acceptance (or segment end).
        accept, counted = (step_flags & 1) == 1, step_flags >> 1
        run = run + counted.astype(jnp.int32)
        return jnp.where(accept, 0, run), jnp.where(accept, run, 0)

    # `*_like` keeps the carries' shard_map varying-axis type equal to the inputs'.
    zeros = jnp.zeros_like(initial_log_score, jnp.int32)
    carry = (initial_log_score, zeros - 1, zeros, jnp.zeros_like(initial_log_score))
    column_counts, carried_counts = [], []
    for w in range(v):
        entry_column = carry[1]
        xs = (threshold[w], scores[w], valid[w], post_burn_in, columns + w * p)
        carry, step_flags = lax.scan(forward, carry, xs, unroll=unroll)
        entry_count, at_accept = lax.scan(backward, zeros, step_flags, reverse=True, unroll=unroll)
        # The state held on entry is the carried state (-1) or column entry % p.
        entry_at = jnp.where(entry_column >= 0, entry_column % p, -1)
        entry_hits = columns[:, None] == entry_at[None, :]
        column_counts.append((at_accept + jnp.where(entry_hits, entry_count, 0)).T)
        carried_counts.append(jnp.where(entry_column < 0, entry_count, 0))
    final_score, final_column, num_accepted, score_sum = carry
    return SweepResult(
        column_counts=jnp.stack(column_counts, axis=1),
        carried_counts=jnp.stack(carried_counts, axis=1),
        final_column=final_column,
        final_log_score=final_score,
        num_accepted=num_accepted,
        counted_log_score=score_sum,
    )


def mh_sweep(
    log_scores: ArrayLike,
    log_uniforms: ArrayLike,
    *,
    valid: ArrayLike,
    initial_log_score: ArrayLike,
    burn_in: int = 0,
    unroll: int = 1,
) -> SweepResult:
    """The MH kernel with its randomness passed in: B chains, V * P proposals in order.

    The proposals are visited segment by segment (v = 0..V-1), column by
    column (p = 0..P-1). Proposal (v, p) with log-score ``l = log_scores[b, v, p]``
    is accepted iff it is valid and ``log_uniforms[b, v, p] < l - l_cur``,
    i.e. with probability min(1, exp(l - l_cur)) when ``log_uniforms`` are
    logs of U(0, 1) draws; then the state becomes column p and ``l_cur <- l``.
    A sweep is *counted* when its proposal is valid, ``p >= burn_in`` and the
    chain is non-empty (``l_cur > -inf``); it counts for the state held after
    the proposal.

    Args:
      log_scores: (B, V, P) float32 proposal log-scores (constants).
      log_uniforms: (B, V, P) float32 log U(0, 1) draws.
      valid: (B, V, P) bool; invalid proposals are skipped: the chain does not
        move and the sweep is not counted.
      initial_log_score: (B,) cached log-score of the initial (carried) state,
        -inf for an empty chain (then the first valid proposal is accepted).
      burn_in: proposals at the start of each segment that are not counted.
      unroll: ``lax.scan`` unroll factor (same result; 1 is fastest on CPU).

    Returns:
      A :class:`SweepResult`.
    """
    _checks.check_rank("log_scores", log_scores, 3)
    b, v, p = jnp.shape(log_scores)
    for name, x in (("log_uniforms", log_uniforms), ("valid", valid)):
        _checks.check_shape(name, x, (b, v, p))
    _checks.check_shape("initial_log_score", initial_log_score, (b,))

    def time_major(x: ArrayLike, dtype: jnp.dtype) -> Array:
        return jnp.transpose(jnp.asarray(x, dtype), (1, 2, 0))

    return _sweep_time_major(
        lax.stop_gradient(time_major(log_scores, jnp.float32)),
        time_major(log_uniforms, jnp.float32),
        time_major(valid, bool),
        lax.stop_gradient(jnp.asarray(initial_log_score, jnp.float32)),
        burn_in,
        max(1, unroll),
    )


def _chunked_sweep(
    key: Array,
    scores: Array,
    valid: Array,
    initial: Array,
    example_index: Array,
    burn_in: int,
    unroll: int,
    chunk_size: int,
) -> SweepResult:
    """Draws the uniforms and sweeps (B, V, P) inputs, ``chunk_size`` anchors at a time.

    Written for one chain and vectorised with ``lax.map(..., batch_size=chunk_size)``
    (a ``vmap`` within a chunk, a loop over chunks), so that on CPU a chunk's
    (V, P, chunk) working set stays in cache. (Measured on CPU, the vmapped
    single-chain sweep also beats explicit time-major transposes of the inputs.)
    """
    _, v, p = scores.shape

    def sweep_one(chain: tuple[Array, Array, Array, Array]) -> SweepResult:
        scores_1, valid_1, initial_1, index_1 = chain
        log_u = _random.log_uniforms(key, index_1[None], v * p, time_major=True)
        result = _sweep_time_major(
            scores_1[..., None],
            log_u.reshape(v, p, 1),
            valid_1[..., None],
            initial_1[None],
            burn_in,
            unroll,
        )
        return jax.tree.map(lambda x: x[0], result)

    inputs = (scores, valid, initial, example_index)
    if scores.shape[0] <= chunk_size:
        # One chunk: a plain vmap, without the loop of lax.map around it
        # (10-15% faster at B = 256 on CPU, benchmarks/bench_sampler.py).
        return jax.vmap(sweep_one)(inputs)
    return lax.map(sweep_one, inputs, batch_size=chunk_size)


def _burn_in_count(burn_in: int | float, num_proposals: int) -> int:
    if isinstance(burn_in, bool) or not isinstance(burn_in, (int, float, np.integer, np.floating)):
        raise ValueError(f"burn_in must be an int (count) or a float (fraction), got {burn_in!r}.")
    if isinstance(burn_in, (float, np.floating)):
        if not 0.0 <= burn_in < 1.0:
            raise ValueError(f"a fractional burn_in must lie in [0, 1), got {burn_in}.")
        burn_in = int(burn_in * num_proposals)
    burn_in = int(burn_in)
    if not 0 <= burn_in < num_proposals:
        raise ValueError(
            f"burn_in must satisfy 0 <= burn_in < P = {num_proposals} (the proposals per "
            f"view), got {burn_in}: no state would be counted."
        )
    return burn_in


def step(
    key: Array,
    state: EMC2State,
    *,
    example_index: ArrayLike,
    proposal_log_scores: ArrayLike,
    proposal_index: ArrayLike,
    proposal_aug: ArrayLike,
    proposal_mask: ArrayLike | None = None,
    burn_in: int | float = 0,
    carried_log_score: ArrayLike | None = None,
    axis_name: str | None = None,
    unroll: int = 1,
    chunk_size: int | None = None,
) -> tuple[EMC2State, EMC2Outputs, EMC2Info]:
    """One EMC² sweep for the batch's examples (Yau et al. 2024, Algorithm 1).

    Per example b (chain of ``example_index[b]``), the T = V * P proposals are
    visited in order: view 0's P columns, then view 1's, ... Proposal (v, p)
    has log-score ``proposal_log_scores[b, v, p] = beta * s(u_v, candidate_p)``
    (stop-gradient is applied here) and is accepted with probability
    ``min(1, exp(l - l_cur))`` against the cached score ``l_cur``. The states
    visited after the first ``burn_in`` proposals of view v's segment are
    anchor view v's negatives (see the module docstring for the carried state,
    masking and data parallelism).

    Args:
      key: PRNG key of this step; example b's uniforms depend only on
        ``(key, example_index[b])``.
      state: the chain table.
      example_index: (B,) int32 dataset indices of the batch's examples
        (distinct across the global batch).
      proposal_log_scores: (B, V, P) float beta * s(u_v, candidate_p).
      proposal_index: dataset index of each column: (P,), (B, P), (B, 1, P) or
        (B, V, P); column p must be the same candidate for every view.
      proposal_aug: its augmentation id, same shapes.
      proposal_mask: optional bool, same shapes; False skips the proposal
        (self / own positive). Proposals with log-score -inf are skipped too.
      burn_in: int count (0 <= burn_in < P) or float fraction of P in [0, 1):
        proposals at the start of EACH view's segment whose states are not counted.
      carried_log_score: optional (B,) beta * s(u_0, f(carried)) under the
        current encoder (``refresh_score``): replaces the cached score of the
        carried state before the sweep (ignored for empty chains).
      axis_name: the data-parallel axis (inside ``shard_map``/``pmap``), or None.
      unroll: scan unroll factor of the sweep's loops (1 is fastest on CPU).
      chunk_size: anchors swept together (a ``lax.map`` over chunks of the
        batch); the result does not depend on it. None: 256 on CPU, where a
        chunk's working set then stays in cache, and the whole batch on
        accelerators, where every loop iteration has a fixed launch cost.

    Returns:
      ``(new_state, outputs, info)``: :class:`EMC2State`, :class:`EMC2Outputs`,
      :class:`EMC2Info`.
    """
    m = _num_examples(state)
    example_index = _check_example_index(example_index, m)
    _checks.check_rank("proposal_log_scores", proposal_log_scores, 3)
    _checks.check_floating("proposal_log_scores", proposal_log_scores)
    b, v, p = jnp.shape(proposal_log_scores)
    if b != example_index.shape[0]:
        raise ValueError(
            f"proposal_log_scores (B, V, P) = {jnp.shape(proposal_log_scores)} and "
            f"example_index (B,) = {example_index.shape} must agree on B."
        )
    if v < 1 or p < 1:
        raise ValueError(f"need V >= 1 views and P >= 1 proposals, got V = {v}, P = {p}.")
    burn_in = _burn_in_count(burn_in, p)
    shape = (b, v, p)
    for name, x in (("proposal_index", proposal_index), ("proposal_aug", proposal_aug)):
        _checks.check_integer(name, x)
    _checks.check_index_range("proposal_index", proposal_index, m)
    if _checks.is_concrete(proposal_index) and jnp.ndim(proposal_index) == 3:
        if v > 1 and jnp.shape(proposal_index)[1] == v:
            same = np.all(np.asarray(proposal_index) == np.asarray(proposal_index)[:, :1])
            if not same:
                raise ValueError(
                    "proposal_index must name the same candidate in column p for every "
                    "view (the columns are shared by the views' segments of one chain)."
                )
    column_index = _checks.broadcast_columns("proposal_index", proposal_index, shape)
    column_aug = _checks.broadcast_columns("proposal_aug", proposal_aug, shape)
    scores = lax.stop_gradient(jnp.asarray(proposal_log_scores, jnp.float32))
    valid = scores > -jnp.inf
    if proposal_mask is not None:
        valid = valid & _checks.broadcast_columns("proposal_mask", proposal_mask, shape).astype(
            bool
        )

    carried_index = state.negative_index[example_index]
    carried_aug = state.negative_aug[example_index]
    carried_valid = carried_index >= 0
    initial = state.log_score[example_index]
    if carried_log_score is not None:
        _checks.check_shape("carried_log_score", carried_log_score, (b,))
        refreshed = lax.stop_gradient(jnp.asarray(carried_log_score, jnp.float32))
        initial = jnp.where(carried_valid, refreshed, -jnp.inf)

    if chunk_size is None:
        chunk_size = _CPU_CHUNK_SIZE if jax.default_backend() == "cpu" else b
    chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
    sweep = _chunked_sweep(
        key, scores, valid, initial, example_index, burn_in, max(1, unroll), chunk_size
    )
    num_counted = sweep.column_counts.sum(axis=-1) + sweep.carried_counts
    denominator = jnp.maximum(num_counted, 1).astype(jnp.float32)
    proposal_weights = sweep.column_counts.astype(jnp.float32) / denominator[..., None]
    carried_weights = sweep.carried_counts.astype(jnp.float32) / denominator

    final = sweep.final_column
    moved = final >= 0
    safe = jnp.maximum(final, 0)[:, None]
    picked_index = jnp.take_along_axis(column_index.reshape(b, v * p), safe, 1)[:, 0]
    picked_aug = jnp.take_along_axis(column_aug.reshape(b, v * p), safe, 1)[:, 0]
    new_index = jnp.where(moved, picked_index, carried_index).astype(jnp.int32)
    new_aug = jnp.where(moved, picked_aug, carried_aug).astype(jnp.int32)
    new_score = sweep.final_log_score.astype(jnp.float32)

    rows, index_rows, aug_rows, score_rows = (
        _collective.gather_rows(x, axis_name)
        for x in (example_index, new_index, new_aug, new_score)
    )
    new_state = EMC2State(
        negative_index=state.negative_index.at[rows].set(index_rows),
        negative_aug=state.negative_aug.at[rows].set(aug_rows),
        log_score=state.log_score.at[rows].set(score_rows),
    )

    totals = jnp.stack(
        [
            jnp.sum(sweep.num_accepted, dtype=jnp.float32),
            jnp.sum(valid, dtype=jnp.float32),
            jnp.sum(sweep.carried_counts, dtype=jnp.float32),
            jnp.sum(num_counted, dtype=jnp.float32),
            jnp.sum(sweep.counted_log_score),
        ]
    )
    if axis_name is not None:
        totals = lax.psum(totals, axis_name)
    accepted, proposed, carried, total, score_sum = totals
    info = EMC2Info(
        acceptance_rate=accepted / jnp.maximum(proposed, 1.0),
        carried_fraction=carried / jnp.maximum(total, 1.0),
        mean_log_score=score_sum / jnp.maximum(total, 1.0),
    )
    outputs = EMC2Outputs(
        proposal_weights=proposal_weights,
        carried_weights=carried_weights,
        num_counted=num_counted.astype(jnp.int32),
        final_column=jnp.where(moved, final % p, -1).astype(jnp.int32),
        negative_index=new_index,
        negative_aug=new_aug,
        log_score=new_score,
    )
    return new_state, outputs, info
