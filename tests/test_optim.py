"""Tests of emc2jax.optim: schedules, weight-decay masks, every optimizer steps."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from emc2jax import optim


def _config(**overrides):
    config = optim.default_optimizer_config()
    config.update(overrides)
    return config


def _params():
    return {
        "conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones((4,))},
        "norm": {"scale": jnp.ones((4,)), "bias": jnp.ones((4,))},
        "dense": {"kernel": jnp.ones((4, 2))},
    }


def test_cosine_schedule_warms_up_then_decays_to_zero():
    config = _config(learning_rate=0.4, schedule="cosine", warmup_steps=10)
    schedule = optim.make_schedule(config, total_steps=110)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(schedule(5), 0.2, rtol=1e-6)
    np.testing.assert_allclose(schedule(10), 0.4, rtol=1e-6)
    t = 35  # a quarter into the decay
    np.testing.assert_allclose(schedule(t), 0.4 * 0.5 * (1 + math.cos(math.pi / 4)), rtol=1e-5)
    np.testing.assert_allclose(schedule(110), 0.0, atol=1e-7)


def test_constant_schedule_with_and_without_warmup():
    np.testing.assert_allclose(optim.make_schedule(_config(), total_steps=5)(0), 1e-3)
    schedule = optim.make_schedule(_config(learning_rate=1.0, warmup_fraction=0.1), total_steps=100)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(99)],
                               [0.0, 0.5, 1.0, 1.0], rtol=1e-6)  # fmt: skip


@pytest.mark.parametrize(
    "overrides,total_steps,match",
    [
        ({"warmup_steps": 3, "warmup_fraction": 0.1}, 10, "only one of"),
        ({"warmup_steps": 30}, 10, "longer than total_steps=10"),
        ({"schedule": "linear"}, 10, "optimizer.schedule='linear' is not one of"),
        ({"learning_rate": 0.0}, 10, "learning_rate must be positive"),
        ({}, 0, "total_steps must be positive"),
    ],
)
def test_bad_schedules_are_refused(overrides, total_steps, match):
    with pytest.raises(ValueError, match=match):
        optim.make_optimizer(_config(**overrides), total_steps=total_steps)


def test_unknown_optimizer_lists_the_choices():
    with pytest.raises(ValueError, match=r"optimizer.name='rmsprop' is not one of.*'lars'"):
        optim.make_optimizer(_config(name="rmsprop"), total_steps=10)


def test_decay_mask_keeps_kernels_only():
    assert optim.decay_mask(_params()) == {
        "conv": {"kernel": True, "bias": False},
        "norm": {"scale": False, "bias": False},
        "dense": {"kernel": True},
    }


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_steps_downhill_and_spares_biases_from_decay(name):
    config = _config(name=name, learning_rate=0.1, weight_decay=0.5, schedule="cosine")
    tx, _ = optim.make_optimizer(config, total_steps=100)
    params = _params()

    @jax.jit
    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # Zero gradients: only weight decay moves anything, and only the kernels.
    # Step 1: the cosine schedule without warm-up starts at the peak rate.
    zeros = jax.tree.map(jnp.zeros_like, params)
    new, _ = step(params, tx.init(params), zeros)
    for path, mask in jax.tree.leaves_with_path(optim.decay_mask(params)):
        moved = not np.allclose(_at(new, path), _at(params, path))
        assert moved == mask, (name, jax.tree_util.keystr(path))

    # A quadratic loss decreases after a few steps.
    loss = lambda p: sum(jnp.sum((x - 3.0) ** 2) for x in jax.tree.leaves(p))  # noqa: E731
    opt_state = tx.init(params)
    p = params
    for _ in range(3):
        p, opt_state = step(p, opt_state, jax.grad(loss)(p))
    assert loss(p) < loss(params)


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_gradient_clipping_bounds_the_update_norm():
    config = _config(name="sgd", learning_rate=1.0, momentum=0.0, grad_clip_norm=2.0)
    tx, _ = optim.make_optimizer(config, total_steps=10)
    params = _params()
    grads = jax.tree.map(lambda x: 100.0 * jnp.ones_like(x), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(optax.tree.norm(updates), 2.0, rtol=1e-5)


def test_learning_rate_follows_the_schedule():
    config = _config(name="sgd", learning_rate=1.0, momentum=0.0, warmup_steps=4)
    tx, schedule = optim.make_optimizer(config, total_steps=8)
    params = {"w": jnp.zeros(())}
    opt_state = tx.init(params)
    for t in range(6):
        updates, opt_state = tx.update({"w": jnp.ones(())}, opt_state, params)
        np.testing.assert_allclose(-updates["w"], schedule(t), rtol=1e-6)
