"""On-device augmentation: shapes, ranges, determinism per (key, index, id), jit/vmap."""

import colorsys
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emc2jax.data import augment


def _images(batch, size, channels, seed=0):
    return jax.random.uniform(jax.random.key(seed), (batch, size, size, channels))


# (input size, channels, config, output size): digits, a down-sized SimCLR view,
# the EMC² STL-10 recipe (blur on every view) at a small size. One compile each.
CASES = {
    "digits": (8, 1, augment.digits_preset(), 8),
    "simclr": (16, 3, augment.simclr_preset(12), 12),
    "stl10": (24, 3, augment.stl10_preset(24), 24),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_shapes_ranges_determinism_and_ids(case):
    size, channels, config, out = CASES[case]
    key = jax.random.key(42)
    images = _images(6, size, channels)
    # Rows 0/1 repeat (index, id) = (5, 0) in different positions; row 2 is
    # example 5 with another id; rows 3-5 are other examples.
    index = jnp.array([5, 5, 5, 7, 8, 9])
    aug_id = jnp.array([0, 0, 1, 0, 0, 0])
    images = images.at[1].set(images[0]).at[2].set(images[0])
    views = augment.augment_views(key, images, index, aug_id, config)
    assert views.shape == (6, out, out, channels) and views.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(views)))
    assert float(views.min()) >= 0.0 and float(views.max()) <= 1.0
    # Deterministic, and independent of the batch it sits in.
    np.testing.assert_array_equal(views, augment.augment_views(key, images, index, aug_id, config))
    np.testing.assert_array_equal(views[0], views[1])
    shuffled = augment.augment_views(key, images[::-1], index[::-1], aug_id[::-1], config)
    np.testing.assert_array_equal(shuffled[::-1], views)
    # Another augmentation id, or another run key, gives another view.
    assert float(jnp.abs(views[0] - views[2]).mean()) > 1e-3
    other_run = augment.augment_views(jax.random.key(43), images, index, aug_id, config)
    assert float(jnp.abs(other_run[0] - views[0]).mean()) > 1e-3


def test_jit_and_vmap_compose():
    # Same shapes and config as the digits case above: the direct calls hit
    # the jit cache, only the vmapped program compiles.
    size, channels, config, _ = CASES["digits"]
    images = _images(6, size, channels)
    index, aug_id = jnp.arange(6), jnp.ones(6, jnp.int32)
    keys = jax.random.split(jax.random.key(0), 2)
    direct = jnp.stack([augment.augment_views(k, images, index, aug_id, config) for k in keys])

    @jax.jit
    def two_runs(keys, images):
        return jax.vmap(lambda k: augment.augment_views(k, images, index, aug_id, config))(keys)

    np.testing.assert_allclose(two_runs(keys, images), direct, atol=1e-5)


def test_identity_and_resize():
    images = _images(3, 8, 1)
    same = augment.augment_views(
        jax.random.key(0), images, jnp.arange(3), jnp.zeros(3, jnp.int32), augment.identity()
    )
    np.testing.assert_allclose(same, images, atol=1e-6)
    constant = jnp.full((2, 16, 16, 3), 0.25)
    small = augment.augment_views(
        jax.random.key(0), constant, jnp.arange(2), jnp.zeros(2, jnp.int32), augment.identity(8)
    )
    assert small.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(small, 0.25, atol=1e-6)


def test_finite_views_match_augment_views():
    images = _images(3, 8, 1)
    index = jnp.array([10, 11, 12])
    config = augment.digits_preset()
    views = augment.finite_views(jax.random.key(1), images, index, n_aug=2, config=config)
    assert views.shape == (3, 2, 8, 8, 1)
    # The same views from one batch in another order (same shapes: no recompile).
    batch = augment.augment_views(
        jax.random.key(1),
        jnp.concatenate([images, images]),
        jnp.concatenate([index, index]),
        jnp.array([1, 1, 1, 0, 0, 0]),
        config,
    )
    np.testing.assert_allclose(views[:, 1], batch[:3], atol=1e-6)
    np.testing.assert_allclose(views[:, 0], batch[3:], atol=1e-6)


def test_colour_ops():
    rgb = jax.random.uniform(jax.random.key(3), (64, 3))
    to_hsv, to_rgb = jax.jit(augment._rgb_to_hsv), jax.jit(augment._hsv_to_rgb)
    hsv = to_hsv(rgb)
    expected = np.array([colorsys.rgb_to_hsv(*map(float, px)) for px in rgb])
    np.testing.assert_allclose(hsv, expected, atol=1e-5)
    np.testing.assert_allclose(to_rgb(hsv), rgb, atol=1e-5)
    # Grey pixels have hue 0 and saturation 0, not NaN.
    grey = to_hsv(jnp.full((64, 3), 0.5))
    np.testing.assert_array_equal(grey, jnp.broadcast_to(jnp.array([0.0, 0.0, 0.5]), (64, 3)))


def test_to_float_and_normalize():
    u8 = np.array([[0, 255]], np.uint8)
    np.testing.assert_allclose(augment.to_float(u8), [[0.0, 1.0]])
    assert augment.to_float(np.ones(2, np.float64)).dtype == jnp.float32
    x = jnp.ones((2, 2, 3))
    np.testing.assert_allclose(
        augment.normalize(x, (1.0, 0.0, 0.5), (1.0, 2.0, 0.5)),
        jnp.broadcast_to(jnp.array([0.0, 0.5, 1.0]), (2, 2, 3)),
    )
    with pytest.raises(ValueError, match="channels"):
        augment.normalize(jnp.ones((2, 2, 1)))


def test_bad_inputs():
    with pytest.raises(ValueError, match="crop_scale"):
        augment.AugmentConfig(crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="flip_prob"):
        augment.AugmentConfig(flip_prob=1.5)
    with pytest.raises(ValueError, match="hue"):
        augment.AugmentConfig(jitter=(0.4, 0.4, 0.4, 0.7))
    config = augment.identity()
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        augment.augment_views(
            jax.random.key(0), jnp.ones((2, 8, 8)), jnp.arange(2), jnp.arange(2), config
        )
    with pytest.raises(ValueError, match="to_float"):
        augment.augment_views(
            jax.random.key(0),
            jnp.ones((2, 8, 8, 1), jnp.uint8),
            jnp.arange(2),
            jnp.arange(2),
            config,
        )
    with pytest.raises(ValueError, match="example_index"):
        augment.augment_views(
            jax.random.key(0), jnp.ones((2, 8, 8, 1)), jnp.arange(3), jnp.arange(2), config
        )
    assert dataclasses.replace(config, flip_prob=0.5) != config  # Hashable, comparable.
