"""EMC² sampler: the kernel against a reference loop, deterministic stubs, parallelism, bad input.

The statistical exactness test (chain visits vs the exact softmax) is in
``test_samplers_mh_exactness.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from emc2jax.samplers import _random, emc2

B, V, NP, M = 6, 2, 7, 30  # anchors, views, proposals per view, dataset size


def reference_sweep(scores, log_u, valid, initial, burn_in):
    """Per-proposal loop (the official code's shape), one chain at a time: (B, V, P) inputs."""
    b, v, p = scores.shape
    counts = np.zeros((b, v, p), np.int64)
    carried = np.zeros((b, v), np.int64)
    final_column = np.full(b, -1)
    final_score = initial.astype(np.float32).copy()
    accepted = np.zeros(b, np.int64)
    score_sum = np.zeros(b)
    for row in range(b):
        column, current = -1, initial[row]
        for w in range(v):
            for j in range(p):
                if valid[row, w, j] and log_u[row, w, j] < scores[row, w, j] - current:
                    column, current = w * p + j, scores[row, w, j]
                    accepted[row] += 1
                if valid[row, w, j] and j >= burn_in and current > -np.inf:
                    score_sum[row] += current
                    if column >= 0:
                        counts[row, w, column % p] += 1
                    else:
                        carried[row, w] += 1
        final_column[row], final_score[row] = column, current
    return counts, carried, final_column, final_score, accepted, score_sum


def random_case(rng, b=B, v=V, p=NP):
    scores = (2.0 * rng.normal(size=(b, v, p))).astype(np.float32)
    log_u = np.log(rng.uniform(size=(b, v, p))).astype(np.float32)
    valid = rng.uniform(size=(b, v, p)) < 0.8
    initial = np.where(rng.uniform(size=b) < 0.5, -np.inf, rng.normal(size=b)).astype(np.float32)
    return scores, log_u, valid, initial


def test_mh_sweep_matches_reference_loop():
    rng = np.random.default_rng(0)
    sweep = jax.jit(emc2.mh_sweep, static_argnames=("burn_in",))
    for trial in range(6):
        scores, log_u, valid, initial = random_case(rng)
        burn_in = trial % 3
        got = sweep(scores, log_u, valid=valid, initial_log_score=initial, burn_in=burn_in)
        counts, carried, column, score, accepted, score_sum = reference_sweep(
            scores, log_u, valid, initial, burn_in
        )
        np.testing.assert_array_equal(got.column_counts, counts)
        np.testing.assert_array_equal(got.carried_counts, carried)
        np.testing.assert_array_equal(got.final_column, column)
        np.testing.assert_array_equal(got.final_log_score, score)
        np.testing.assert_array_equal(got.num_accepted, accepted)
        np.testing.assert_allclose(got.counted_log_score, score_sum, rtol=1e-5)


def _table(rng, m=M, b=B):
    """A chain table with half of the first b chains holding a state."""
    state = emc2.init(m)
    holds = rng.uniform(size=m) < 0.5
    return emc2.EMC2State(
        negative_index=jnp.asarray(np.where(holds, rng.integers(0, m, m), -1), jnp.int32),
        negative_aug=jnp.asarray(np.where(holds, rng.integers(0, 3, m), -1), jnp.int32),
        log_score=jnp.where(holds, jnp.asarray(rng.normal(size=m), jnp.float32), state.log_score),
    )


def _step(key, state, scores, index, **kwargs):
    example_index = kwargs.pop("example_index", jnp.arange(scores.shape[0], dtype=jnp.int32))
    return emc2.step(
        key,
        state,
        example_index=example_index,
        proposal_log_scores=scores,
        proposal_index=index,
        proposal_aug=kwargs.pop("aug", jnp.zeros_like(index)),
        **kwargs,
    )


def test_step_matches_reference_loop_and_writes_back():
    rng = np.random.default_rng(1)
    state = _table(rng)
    scores, _, valid, _ = random_case(rng)
    example_index = jnp.asarray([3, 17, 0, 29, 8, 11], jnp.int32)
    index = jnp.asarray(rng.integers(0, M, size=(B, NP)), jnp.int32)
    aug = jnp.asarray(rng.integers(0, 3, size=(B, NP)), jnp.int32)
    key = jax.random.key(7)
    new_state, out, info = jax.jit(
        lambda s: _step(
            key,
            s,
            scores,
            index,
            aug=aug,
            example_index=example_index,
            proposal_mask=valid,
            burn_in=2,
            chunk_size=4,  # a chunk of 4 + a remainder of 2
        )
    )(state)

    # The same uniforms the step draws (per example, time-major).
    log_u = (
        np.asarray(_random.log_uniforms(key, example_index, V * NP, time_major=True))
        .reshape(V, NP, B)
        .transpose(2, 0, 1)
    )
    initial = np.asarray(state.log_score)[np.asarray(example_index)]
    counts, carried, column, score, accepted, score_sum = reference_sweep(
        scores, log_u, valid, initial, 2
    )
    total = counts.sum(-1) + carried
    np.testing.assert_array_equal(out.num_counted, total)
    np.testing.assert_allclose(out.proposal_weights, counts / np.maximum(total, 1)[..., None])
    np.testing.assert_allclose(out.carried_weights, carried / np.maximum(total, 1))
    np.testing.assert_array_equal(out.final_column, np.where(column >= 0, column % NP, -1))

    old_index = np.asarray(state.negative_index)[np.asarray(example_index)]
    old_aug = np.asarray(state.negative_aug)[np.asarray(example_index)]
    rows = np.arange(B)
    want_index = np.where(
        column >= 0, np.asarray(index)[rows, np.maximum(column, 0) % NP], old_index
    )
    want_aug = np.where(column >= 0, np.asarray(aug)[rows, np.maximum(column, 0) % NP], old_aug)
    np.testing.assert_array_equal(out.negative_index, want_index)
    np.testing.assert_array_equal(new_state.negative_index[example_index], want_index)
    np.testing.assert_array_equal(new_state.negative_aug[example_index], want_aug)
    np.testing.assert_array_equal(new_state.log_score[example_index], score)
    untouched = np.setdiff1d(np.arange(M), np.asarray(example_index))
    for new, old in zip(new_state, state, strict=True):
        np.testing.assert_array_equal(np.asarray(new)[untouched], np.asarray(old)[untouched])

    np.testing.assert_allclose(info.acceptance_rate, accepted.sum() / valid.sum(), rtol=1e-6)
    np.testing.assert_allclose(info.carried_fraction, carried.sum() / total.sum(), rtol=1e-6)
    np.testing.assert_allclose(info.mean_log_score, score_sum.sum() / total.sum(), rtol=1e-5)


def test_all_accept_counts_every_post_burn_in_column():
    # Increasing scores: every proposal beats the current state, so every one is accepted.
    burn_in = 2
    scores = jnp.broadcast_to(jnp.arange(V * NP, dtype=jnp.float32).reshape(V, NP), (B, V, NP))
    index = jnp.arange(NP, dtype=jnp.int32) + 10
    state, out, info = _step(jax.random.key(0), emc2.init(M), scores, index, burn_in=burn_in)
    want = np.zeros((V, NP))
    want[:, burn_in:] = 1.0 / (NP - burn_in)
    np.testing.assert_allclose(out.proposal_weights, np.broadcast_to(want, (B, V, NP)))
    np.testing.assert_array_equal(out.carried_weights, 0.0)
    np.testing.assert_array_equal(out.final_column, NP - 1)
    np.testing.assert_array_equal(state.negative_index[:B], 10 + NP - 1)
    np.testing.assert_array_equal(state.log_score[:B], V * NP - 1)
    assert info.acceptance_rate == 1.0 and info.carried_fraction == 0.0


def test_all_reject_keeps_the_carried_state_and_counts_it_through_burn_in():
    # A carried state far better than every proposal is never left (log u > -17 always).
    state = emc2.init(M)
    state = state._replace(
        negative_index=state.negative_index.at[:B].set(20),
        negative_aug=state.negative_aug.at[:B].set(1),
        log_score=state.log_score.at[:B].set(100.0),
    )
    scores = jnp.zeros((B, V, NP))
    new_state, out, info = _step(
        jax.random.key(0), state, scores, jnp.arange(NP, dtype=jnp.int32), burn_in=3
    )
    # The carried state gets all counted sweeps, burn-in > 0 notwithstanding (the
    # official code would drop it here).
    np.testing.assert_array_equal(out.carried_weights, 1.0)
    np.testing.assert_array_equal(out.proposal_weights, 0.0)
    np.testing.assert_array_equal(out.num_counted, NP - 3)
    np.testing.assert_array_equal(out.final_column, -1)
    for new, old in zip(new_state, state, strict=True):
        np.testing.assert_array_equal(new, old)
    assert info.acceptance_rate == 0.0 and info.carried_fraction == 1.0
    np.testing.assert_allclose(info.mean_log_score, 100.0)


def test_burn_in_fraction_equals_count_and_is_per_view():
    rng = np.random.default_rng(2)
    scores = jnp.asarray(rng.normal(size=(B, V, NP)), jnp.float32)
    index = jnp.arange(NP, dtype=jnp.int32)
    _, by_count, _ = _step(jax.random.key(3), emc2.init(M), scores, index, burn_in=3)
    _, by_fraction, _ = _step(jax.random.key(3), emc2.init(M), scores, index, burn_in=3 / NP + 1e-3)
    for a, b in zip(by_count, by_fraction, strict=True):
        np.testing.assert_array_equal(a, b)
    # Each view's first 3 proposals are never counted as such (a state accepted
    # there may be counted later, at its column, through the chain's stay).
    np.testing.assert_array_equal(by_count.num_counted, NP - 3)


def test_carried_marker_follows_the_chain_across_steps():
    rng = np.random.default_rng(3)
    scores = jnp.asarray(rng.normal(size=(B, V, NP)), jnp.float32)
    index = jnp.asarray(rng.integers(0, M, size=(NP,)), jnp.int32)
    aug = jnp.asarray(rng.integers(0, 4, size=(NP,)), jnp.int32)
    state = emc2.init(M)
    carried_index, carried_aug, carried_valid = emc2.carried_negatives(state, jnp.arange(B))
    assert not carried_valid.any()
    np.testing.assert_array_equal(carried_index, 0)  # safe to gather
    state, out, _ = _step(jax.random.key(0), state, scores, index, aug=aug)
    carried_index, carried_aug, carried_valid = emc2.carried_negatives(state, jnp.arange(B))
    assert carried_valid.all()
    np.testing.assert_array_equal(carried_index, np.asarray(index)[np.asarray(out.final_column)])
    np.testing.assert_array_equal(carried_aug, np.asarray(aug)[np.asarray(out.final_column)])
    # Next step: nothing beats the carried state -> every negative is the carried one.
    _, out2, info = _step(jax.random.key(1), state, scores - 1e3, index, aug=aug)
    np.testing.assert_array_equal(out2.carried_weights, 1.0)
    assert info.carried_fraction == 1.0


def test_refresh_score_replaces_the_stale_cached_score():
    state = emc2.init(M)
    state = state._replace(
        negative_index=state.negative_index.at[:B].set(20),
        negative_aug=state.negative_aug.at[:B].set(0),
        log_score=state.log_score.at[:B].set(100.0),  # stale: looked great when accepted
    )
    scores = jnp.zeros((B, V, NP))
    index = jnp.arange(NP, dtype=jnp.int32)
    _, stale, _ = _step(jax.random.key(0), state, scores, index)
    _, fresh, info = _step(
        jax.random.key(0), state, scores, index, carried_log_score=jnp.full((B,), -100.0)
    )
    np.testing.assert_array_equal(stale.carried_weights, 1.0)
    np.testing.assert_array_equal(fresh.carried_weights, 0.0)  # left at the first proposal
    assert info.acceptance_rate > 0


def test_masked_proposals_are_skipped():
    scores = jnp.zeros((B, V, NP))
    index = jnp.arange(NP, dtype=jnp.int32)
    mask = jnp.zeros((B, V, NP), bool).at[0].set(True)  # only row 0 has proposals
    state, out, info = _step(jax.random.key(0), emc2.init(M), scores, index, proposal_mask=mask)
    np.testing.assert_array_equal(out.num_counted[1:], 0)
    np.testing.assert_array_equal(out.proposal_weights[1:], 0.0)
    np.testing.assert_array_equal(state.negative_index[1:B], -1)  # still empty
    np.testing.assert_array_equal(out.num_counted[0], NP)
    # -inf log-scores are skipped the same way.
    _, out_inf, _ = _step(jax.random.key(0), emc2.init(M), jnp.where(mask, scores, -jnp.inf), index)
    for a, b in zip(out, out_inf, strict=True):
        np.testing.assert_array_equal(a, b)
    # Equal scores: every valid proposal is accepted (log u < 0 = l - l_cur).
    np.testing.assert_allclose(info.acceptance_rate, 1.0)


def test_shapes_dtypes_stable_determinism_and_no_retrace():
    rng = np.random.default_rng(4)
    traces = []

    @jax.jit
    def run(key, state, scores):
        traces.append(1)
        return _step(key, state, scores, jnp.arange(NP, dtype=jnp.int32), burn_in=1)

    state = emc2.init(M)
    spec = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    outs = []
    for t in range(3):
        scores = jnp.asarray(rng.normal(size=(B, V, NP)), jnp.float32)
        state, out, info = run(jax.random.key(t), state, scores)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == spec
        outs.append((scores, state, out))
    assert len(traces) == 1
    assert out.proposal_weights.dtype == jnp.float32 and out.final_column.dtype == jnp.int32
    # Same key and inputs -> same result; another key -> another result.
    scores, _, _ = outs[0]
    a = run(jax.random.key(0), emc2.init(M), scores)
    b = run(jax.random.key(0), emc2.init(M), scores)
    c = run(jax.random.key(99), emc2.init(M), scores)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1].proposal_weights, c[1].proposal_weights)


def test_chunk_size_does_not_change_the_result():
    rng = np.random.default_rng(7)
    scores = jnp.asarray(rng.normal(size=(7, V, NP)), jnp.float32)
    index = jnp.arange(NP, dtype=jnp.int32)
    state = _table(rng)
    results = [
        jax.jit(lambda s, c=c: _step(jax.random.key(0), s, scores, index, burn_in=1, chunk_size=c))(
            state
        )
        for c in (None, 3, 1)  # one chunk; 3 chunks of 3 with 2 padding rows; 7 chunks
    ]
    for other in results[1:]:
        for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(other), strict=True):
            np.testing.assert_array_equal(a, b)


def test_randomness_is_per_example_not_per_row():
    # Permuting the batch permutes the results: the draws follow the example index.
    rng = np.random.default_rng(5)
    scores = jnp.asarray(rng.normal(size=(B, V, NP)), jnp.float32)
    example_index = jnp.arange(B, dtype=jnp.int32) * 4
    perm = rng.permutation(B)
    index = jnp.arange(NP, dtype=jnp.int32)
    s1, o1, _ = _step(jax.random.key(0), emc2.init(M), scores, index, example_index=example_index)
    s2, o2, _ = _step(
        jax.random.key(0), emc2.init(M), scores[perm], index, example_index=example_index[perm]
    )
    np.testing.assert_array_equal(o1.proposal_weights[perm], o2.proposal_weights)
    for a, b in zip(s1, s2, strict=True):
        np.testing.assert_array_equal(a, b)


def _eight_device_case():
    rng = np.random.default_rng(6)
    b = 16
    example_index = jnp.asarray(rng.permutation(M)[:b], jnp.int32)
    scores = jnp.asarray(rng.normal(size=(b, V, NP)), jnp.float32)
    index = jnp.asarray(rng.integers(0, M, size=(b, NP)), jnp.int32)
    return _table(rng), example_index, scores, index


def _sharded_step(key, state, example_index, scores, index, axis_name=None):
    return _step(
        key,
        state,
        scores,
        index,
        example_index=example_index,
        burn_in=1,
        carried_log_score=scores[:, 0, 0],
        axis_name=axis_name,
    )


def _assert_same(reference, other):
    ref_leaves, leaves = jax.tree.leaves(reference), jax.tree.leaves(other)
    assert len(ref_leaves) == len(leaves)
    for a, b in zip(ref_leaves, leaves, strict=True):
        a, b = np.asarray(a), np.asarray(b).reshape(np.shape(a))
        if a.dtype == np.float32 and a.ndim == 0:  # psum'd scalars: summation order
            np.testing.assert_allclose(a, b, rtol=1e-6)
        else:
            np.testing.assert_array_equal(a, b)


def test_one_device_and_eight_devices_under_shard_map_agree():
    state, example_index, scores, index = _eight_device_case()
    key = jax.random.key(0)
    reference = jax.jit(_sharded_step)(key, state, example_index, scores, index)

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))  # noqa: E731
    replicate = lambda x: jax.device_put(x, NamedSharding(mesh, P()))  # noqa: E731
    sharded = jax.jit(
        jax.shard_map(
            lambda k, s, e, c, i: _sharded_step(k, s, e, c, i, axis_name="data"),
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data"), P("data")),
            out_specs=(P(), P("data"), P()),  # the table comes out replicated
        )
    )
    result = sharded(
        key, jax.tree.map(replicate, state), shard(example_index), shard(scores), shard(index)
    )
    _assert_same(reference, result)

    # The same per-device function also runs under pmap (legacy API).
    pmapped = jax.pmap(
        lambda k, s, e, c, i: _sharded_step(k, s, e, c, i, axis_name="data"),
        axis_name="data",
        in_axes=(None, None, 0, 0, 0),
        out_axes=(None, 0, None),
    )
    split = lambda x: x.reshape(8, -1, *x.shape[1:])  # noqa: E731
    _assert_same(reference, pmapped(key, state, split(example_index), split(scores), split(index)))


def test_uniform_proposals():
    example_index = jnp.asarray([0, 5, 9, 5], jnp.int32)
    index, aug = emc2.uniform_proposals(
        jax.random.key(0), example_index, num_examples=10, num_augmentations=3, num_proposals=400
    )
    assert index.shape == aug.shape == (4, 400) and index.dtype == jnp.int32
    assert not np.any(np.asarray(index) == np.asarray(example_index)[:, None])
    assert index.min() >= 0 and index.max() < 10 and aug.min() >= 0 and aug.max() < 3
    # Every other example and every augmentation shows up; rows of one example agree.
    assert set(np.asarray(index[0]).tolist()) == set(range(1, 10))
    assert set(np.asarray(aug[0]).tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(index[1], index[3])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(example_index=jnp.asarray([0, 1, 2, 3, 4, M])), "example_index must lie in"),
        (dict(index=jnp.arange(NP) + M), "proposal_index must lie in"),
        (dict(burn_in=NP), "burn_in must satisfy"),
        (dict(burn_in=1.0), "fractional burn_in"),
        (dict(scores=jnp.zeros((B, V, 0))), "P >= 1"),
        (dict(scores=jnp.zeros((B + 1, V, NP))), "must agree on B"),
        (dict(scores=jnp.zeros((B, NP))), "rank 3"),
        (dict(index=jnp.zeros((B, V, NP), jnp.int32).at[:, 1].set(1)), "same candidate"),
        (dict(index=jnp.zeros((NP + 1,), jnp.int32)), "proposal_index must have shape"),
        (dict(carried_log_score=jnp.zeros((B + 1,))), "carried_log_score"),
        (dict(state=emc2.init(M)._replace(log_score=jnp.zeros((M + 1,)))), "leading size"),
        (dict(state=emc2.init(4)), "example_index must lie in"),
    ],
)
def test_bad_input_raises_value_error(change, message):
    args = dict(
        state=emc2.init(M),
        scores=jnp.zeros((B, V, NP)),
        index=jnp.arange(NP, dtype=jnp.int32),
        example_index=jnp.arange(B, dtype=jnp.int32),
    )
    args.update(change)
    state, scores, index = args.pop("state"), args.pop("scores"), args.pop("index")
    with pytest.raises(ValueError, match=message):
        _step(jax.random.key(0), state, scores, index, **args)


def test_bad_input_raises_at_trace_time_under_jit():
    with pytest.raises(ValueError, match="burn_in must satisfy"):
        jax.jit(lambda s: _step(jax.random.key(0), emc2.init(M), s, jnp.arange(NP), burn_in=NP))(
            jnp.zeros((B, V, NP))
        )
    with pytest.raises(ValueError, match="num_examples"):
        emc2.init(1)
    with pytest.raises(ValueError, match="num_proposals"):
        emc2.uniform_proposals(
            jax.random.key(0), jnp.arange(2), num_examples=5, num_augmentations=1, num_proposals=0
        )
