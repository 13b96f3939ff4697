"""Embedding cache: writes, round-robin refresh, Gumbel-top-k draws (hand-computed cases)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from emc2jax.samplers import cache, exact


def _unit(angles):
    return np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


def _step(key, state, index, anchors, fresh=None, k=1, temperature=1.0, **kwargs):
    return cache.step(
        key,
        state,
        example_index=jnp.asarray(index, jnp.int32),
        anchors=jnp.asarray(anchors, jnp.float32),
        fresh_embeddings=None if fresh is None else jnp.asarray(fresh, jnp.float32),
        num_negatives=k,
        temperature=temperature,
        **kwargs,
    )


def test_write_refresh_rows_and_cursor():
    state = cache.init(5, 2)
    rows = cache.refresh_rows(state, refresh_fraction=0.4)  # ceil(0.4 * 5) = 2 rows
    np.testing.assert_array_equal(rows, [0, 1])
    emb = _unit(np.array([0.0, 1.0]))
    state, _, _ = _step(
        jax.random.key(0),
        state,
        [3],
        emb[:1],
        fresh=emb[1:],
        refresh_index=rows,
        refresh_embeddings=emb,
    )
    np.testing.assert_array_equal(state.filled, [True, True, False, True, False])
    np.testing.assert_allclose(state.embeddings[jnp.array([0, 1, 3])], emb[[0, 1, 1]])
    assert int(state.cursor) == 2
    np.testing.assert_array_equal(cache.refresh_rows(state, refresh_fraction=0.6), [2, 3, 4])
    state = state._replace(cursor=jnp.asarray(4, jnp.int32))
    np.testing.assert_array_equal(cache.refresh_rows(state, refresh_fraction=0.6), [4, 0, 1])


def test_duplicates_last_occurrence_wins_and_batch_beats_refresh():
    state = cache.init(4, 2)
    emb = _unit(np.array([0.0, 1.0, 2.0]))
    state = cache.write(state, jnp.array([1, 2, 1]), emb)
    np.testing.assert_allclose(state.embeddings[1], emb[2])
    state, _, _ = _step(
        jax.random.key(0),
        state,
        [2],
        emb[:1],
        fresh=emb[:1],
        refresh_index=jnp.array([2]),
        refresh_embeddings=emb[1:2],
    )
    np.testing.assert_allclose(state.embeddings[2], emb[0])  # the batch row, not the refresh


def test_draws_exclude_own_example_and_unfilled_rows():
    state = cache.write(cache.init(6, 2), jnp.array([0, 1, 2, 4]), _unit(np.arange(4.0)))
    # Anchor of example 1: eligible rows are {0, 2, 4}; K = 3 draws them all.
    _, out, info = _step(jax.random.key(0), state, [1], _unit(np.array([0.3])), k=3)
    assert set(np.asarray(out.negative_index[0]).tolist()) == {0, 2, 4}
    assert out.valid.all()
    # K larger than the eligible rows: the extra draws are marked invalid.
    _, out, info = _step(jax.random.key(0), state, [1], _unit(np.array([0.3])), k=5)
    np.testing.assert_array_equal(out.valid, [[True, True, True, False, False]])
    np.testing.assert_allclose(info.valid_fraction, 0.6)
    np.testing.assert_allclose(info.filled_fraction, 4 / 6)


def _draw_distribution(k, num_keys=4000):
    """Frequencies of the first draw and of the K-sets, over many keys."""
    table = _unit(np.array([0.0, 2.0, 1.0, 3.0]))  # row 3 is the anchor's own example
    state = cache.write(cache.init(4, 2), jnp.arange(4), table)
    anchor = _unit(np.array([0.0]))
    beta = 2.0

    def draw(key):
        _, out, _ = _step(key, state, [3], anchor, k=k, temperature=1 / beta)
        return out.negative_index[0], out.log_scores[0], out.log_normalizer[0]

    index, log_scores, log_z = jax.jit(jax.vmap(draw))(
        jax.random.split(jax.random.key(1), num_keys)
    )
    scores = beta * table[:3] @ anchor[0]
    probs = np.exp(scores) / np.exp(scores).sum()
    np.testing.assert_allclose(log_z, np.log(np.exp(scores).sum()), rtol=1e-5)
    np.testing.assert_allclose(log_scores, scores[np.asarray(index)], rtol=1e-5)
    return np.asarray(index), probs


def test_first_draw_is_a_softmax_sample():
    index, probs = _draw_distribution(k=1)
    freq = np.bincount(index[:, 0], minlength=3) / len(index)
    # 4000 draws over 3 cells: the sd of each frequency is <= 0.008.
    assert exact.total_variation(freq, probs) < 0.03


def test_k_draws_are_a_softmax_sample_without_replacement():
    index, p = _draw_distribution(k=2)
    # P({a, b}) = p_a p_b / (1 - p_a) + p_b p_a / (1 - p_b), by hand.
    sets = {frozenset(s) for s in itertools.combinations(range(3), 2)}
    want = {s: sum(p[a] * p[b] / (1 - p[a]) for a, b in itertools.permutations(s)) for s in sets}
    got = {s: np.mean([frozenset(row) == s for row in index.tolist()]) for s in sets}
    for s in sets:
        assert abs(got[s] - want[s]) < 0.03, (s, got[s], want[s])


def test_one_device_and_eight_devices_agree():
    rng = np.random.default_rng(0)
    m, b, d = 40, 16, 3
    state = cache.write(cache.init(m, d), jnp.arange(0, m, 2), rng.normal(size=(m // 2, d)))
    index = rng.permutation(m)[:b].astype(np.int32)
    anchors = rng.normal(size=(b, d)).astype(np.float32)
    refresh = np.arange(8, dtype=np.int32)
    refresh_emb = rng.normal(size=(8, d)).astype(np.float32)

    def run(s, i, a, r, re, axis_name=None):
        return _step(
            jax.random.key(3),
            s,
            i,
            a,
            fresh=a,
            k=4,
            refresh_index=r,
            refresh_embeddings=re,
            axis_name=axis_name,
        )

    ref = jax.jit(run)(state, index, anchors, refresh, refresh_emb)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    sharded = jax.jit(
        jax.shard_map(
            lambda s, i, a, r, re: run(s, i, a, r, re, axis_name="data"),
            mesh=mesh,
            in_specs=(P(), P("data"), P("data"), P("data"), P("data")),
            out_specs=(P(), P("data"), P()),
        )
    )
    got = sharded(
        jax.tree.map(lambda x: put(x, P()), state),
        *(put(x, P("data")) for x in (index, anchors, refresh, refresh_emb)),
    )
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert int(got[0].cursor) == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k=0), "num_negatives"),
        (dict(k=5), "num_negatives must be <= m - 1"),
        (dict(temperature=0.0), "temperature"),
        (dict(anchors=np.zeros((1, 3))), "anchors must have shape"),
        (dict(index=[5]), "example_index must lie in"),
        (dict(refresh_index=jnp.array([0])), "given together"),
    ],
)
def test_bad_input_raises_value_error(kwargs, message):
    args = dict(index=[0], anchors=np.zeros((1, 2)), k=1, temperature=1.0)
    args.update(kwargs)
    extra = {k: args.pop(k) for k in ("refresh_index",) if k in args}
    with pytest.raises(ValueError, match=message):
        _step(
            jax.random.key(0),
            cache.init(5, 2),
            args["index"],
            args["anchors"],
            k=args["k"],
            temperature=args["temperature"],
            **extra,
        )
    with pytest.raises(ValueError, match="refresh_fraction"):
        cache.refresh_rows(cache.init(5, 2), refresh_fraction=1.5)


def test_repeated_example_rows_draw_independently():
    # Both views of an example as anchors: same anchor embedding here, yet
    # independent Gumbel noise (the k-th occurrence uses its own stream).
    table = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32) * 0.01
    state = cache.write(cache.init(50, 2), jnp.arange(50), table)
    _, out, _ = _step(jax.random.key(0), state, [3, 3], np.ones((2, 2)), k=5)
    assert not np.array_equal(out.negative_index[0], out.negative_index[1])
