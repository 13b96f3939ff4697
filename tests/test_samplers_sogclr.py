"""SogCLR sampler against hand-computed moving averages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from emc2jax import losses
from emc2jax.samplers import sogclr


def _step(state, index, scores, mask=None, gamma=0.5, axis_name=None):
    return sogclr.step(
        jax.random.key(0),
        state,
        example_index=jnp.asarray(index, jnp.int32),
        negative_log_scores=jnp.asarray(scores, jnp.float32),
        negative_mask=mask,
        gamma=gamma,
        axis_name=axis_name,
    )


def test_first_visit_then_moving_average_by_hand():
    state = sogclr.init(5)
    scores = np.log(np.array([[1.0, 2.0, 3.0], [4.0, 4.0, 1.0]]))  # exp-scores by hand
    mask = np.array([[True, True, True], [True, False, True]])
    state, out, info = _step(state, [3, 1], scores, mask)
    # First visit: u = g = mean of the valid exp-scores.
    u3, u1 = (1 + 2 + 3) / 3, (4 + 1) / 2
    np.testing.assert_allclose(np.exp(state.log_u[jnp.array([3, 1])]), [u3, u1], rtol=1e-6)
    np.testing.assert_array_equal(state.seen, [False, True, False, True, False])
    np.testing.assert_allclose(
        out.weights, [[1 / u3, 2 / u3, 3 / u3], [4 / u1, 0, 1 / u1]], rtol=1e-6
    )
    np.testing.assert_allclose(info.first_visit_fraction, 1.0)

    # Second visit of example 3 with gamma = 0.5: u = 0.5 * 2 + 0.5 * g.
    state, out, info = _step(state, [3], np.log([[6.0, 6.0, 6.0]]), gamma=0.5)
    u3_new = 0.5 * u3 + 0.5 * 6.0
    np.testing.assert_allclose(np.exp(state.log_u[3]), u3_new, rtol=1e-6)
    np.testing.assert_allclose(out.weights, [[6 / u3_new] * 3], rtol=1e-6)
    np.testing.assert_allclose(np.exp(state.log_u[1]), u1, rtol=1e-6)  # untouched
    assert info.first_visit_fraction == 0.0


def test_both_views_of_an_example_share_one_update():
    # Rows 0 and 1 are two views of example 2: per-row u for the weights, the
    # table stores (1 - gamma) u + gamma * mean(g_0, g_1) (the official code).
    state = sogclr.init(4)
    state, _, _ = _step(state, [2], np.log([[2.0, 2.0]]))  # u_2 = 2
    gamma = 0.25
    state, out, _ = _step(state, [2, 2], np.log([[4.0, 4.0], [8.0, 8.0]]), gamma=gamma)
    u_rows = (1 - gamma) * 2 + gamma * np.array([4.0, 8.0])
    np.testing.assert_allclose(np.exp(out.log_u), u_rows, rtol=1e-6)
    np.testing.assert_allclose(out.weights, [[4 / u_rows[0]] * 2, [8 / u_rows[1]] * 2], rtol=1e-6)
    np.testing.assert_allclose(np.exp(state.log_u[2]), u_rows.mean(), rtol=1e-6)


def test_log_space_survives_temperature_001_and_feeds_the_surrogate():
    # beta = 100: exp(beta * s) overflows float32, log u does not.
    beta = 100.0
    sims = jnp.array([[0.99, 0.95, -0.5], [0.2, 0.9, 0.97]])
    state, out, _ = _step(sogclr.init(2), [0, 1], beta * sims, gamma=1.0)
    assert np.all(np.isfinite(out.weights)) and np.all(np.isfinite(state.log_u))
    np.testing.assert_allclose(out.weights.mean(axis=1), 1.0, rtol=1e-5)  # first visit: mean 1
    value = losses.sogclr_surrogate(jnp.array([0.9, 0.8]), sims, out.weights, temperature=1 / beta)
    assert np.all(np.isfinite(value))


def test_rows_without_negatives_do_not_update():
    mask = np.array([[False, False], [True, True]])
    state, out, _ = _step(sogclr.init(3), [0, 1], np.zeros((2, 2)), mask)
    np.testing.assert_array_equal(state.seen, [False, True, False])
    np.testing.assert_array_equal(out.weights[0], 0.0)


def test_one_device_and_eight_devices_agree():
    rng = np.random.default_rng(0)
    index = np.concatenate([rng.permutation(20)[:8]] * 2)  # both views of 8 examples
    scores = rng.normal(size=(16, 12)).astype(np.float32)
    state, _, _ = _step(sogclr.init(20), index[:4], scores[:4])  # some seen, some not
    ref = jax.jit(lambda s, i, x: _step(s, i, x))(state, index, scores)

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    sharded = jax.jit(
        jax.shard_map(
            lambda s, i, x: _step(s, i, x, axis_name="data"),
            mesh=mesh,
            in_specs=(P(), P("data"), P("data")),
            out_specs=(P(), P("data"), P()),
        )
    )
    got = sharded(
        jax.tree.map(lambda x: put(x, P()), state), put(index, P("data")), put(scores, P("data"))
    )
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gamma=0.0), "gamma"),
        (dict(gamma=1.5), "gamma"),
        (dict(index=[0, 7]), "example_index must lie in"),
        (dict(index=[0, 1, 2]), "example_index must have shape"),
        (dict(mask=np.ones((2, 3), bool)), "negative_mask must have shape"),
    ],
)
def test_bad_input_raises_value_error(kwargs, message):
    args = dict(index=[0, 1], scores=np.zeros((2, 2)), mask=None, gamma=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        _step(sogclr.init(5), args["index"], args["scores"], args["mask"], gamma=args["gamma"])
