"""Tests of emc2jax.models: shapes, normalisation, dtypes, purity, cross-device BN.

Shapes of the ResNets are checked abstractly (``eval_shape``: tracing, no XLA
compilation) to keep the suite fast on two CPU cores; numerics use tiny MLPs/ConvNets.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from emc2jax import models


def _config(name, **overrides):
    config = models.default_model_config()
    config.name = name
    config.width = 2
    config.hidden_dims = (8, 6)
    config.head_hidden_dims = (8,)
    config.embedding_dim = 5
    config.group_norm_groups = 2
    config.update(overrides)
    return config


def _abstract(config, input_shape, axis_name=None):
    model = nnx.eval_shape(
        lambda: models.build_model(
            config, input_shape=input_shape, rngs_seed=0, axis_name=axis_name
        )
    )
    return models.functionalize(model)


CASES = [
    ("linear", (20,), {}),
    ("mlp", (8, 8), {}),
    ("convnet", (8, 8, 1), {}),
    ("convnet", (8, 8), {}),
    ("resnet18", (8, 8, 3), {"stem": "cifar"}),
    ("resnet18", (16, 16, 3), {"stem": "imagenet"}),
    ("resnet50", (8, 8, 3), {"stem": "cifar"}),
    ("resnet50", (16, 16, 3), {"stem": "imagenet"}),
]


# Every encoder with every norm, except the ResNet-50 ImageNet stem with group/none
# norms: the stem is covered elsewhere and ResNet-50 tracing is the slow part.
SHAPE_CASES = [
    pytest.param(*case, norm, id="-".join([case[0], *map(str, case[1]), *case[2].values(), norm]))
    for case in CASES
    for norm in models.NORMS
    if not (case[0] == "resnet50" and case[2]["stem"] == "imagenet" and norm != "batch")
]


@pytest.mark.parametrize("name,input_shape,overrides,norm", SHAPE_CASES)
def test_every_encoder_has_the_documented_shapes(name, input_shape, overrides, norm):
    config = _config(name, norm=norm, **overrides)
    fmodel, params, model_state = _abstract(config, input_shape)
    x = jax.ShapeDtypeStruct((3, *input_shape), jnp.float32)
    for train in (True, False):
        out, new_state = jax.eval_shape(
            functools.partial(fmodel.apply, train=train), params, model_state, x
        )
        assert out.features.shape == (3, models.features_dim(config))
        assert out.projection.shape == (3, config.embedding_dim)
        assert out.features.dtype == out.projection.dtype == jnp.float32
        assert jax.tree.structure(new_state) == jax.tree.structure(model_state)
    features = jax.eval_shape(fmodel.features, params, model_state, x)
    assert features.shape == (3, fmodel.features_dim)
    has_stats = bool(jax.tree.leaves(model_state))
    assert has_stats == (norm == "batch"), "only BatchNorm carries model state"


def test_resnet_feature_dims_match_the_architectures():
    assert models.features_dim(_config("resnet18", width=64)) == 512
    assert models.features_dim(_config("resnet50", width=64)) == 2048


def test_projection_is_l2_normalised_and_features_come_before_the_head():
    config = _config("mlp", norm="none")
    fmodel, params, state = models.functionalize(
        models.build_model(config, input_shape=(6,), rngs_seed=0)
    )
    x = jax.random.normal(jax.random.key(1), (7, 6))
    out, _ = fmodel.apply(params, state, 10.0 * x, train=True)
    np.testing.assert_allclose(jnp.linalg.norm(out.projection, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out.features, fmodel.features(params, state, 10.0 * x), rtol=1e-6)
    assert out.features.shape == (7, 6)  # the last hidden layer, not the head's width


def test_no_head_projects_the_normalised_features():
    config = _config("linear", width=3, embedding_dim=0, head_hidden_dims=(), norm="none")
    fmodel, params, state = models.functionalize(
        models.build_model(config, input_shape=(5,), rngs_seed=0)
    )
    assert jax.tree.map(jnp.shape, params) == {"encoder": {"dense": {"kernel": (5, 3)}}}
    x = jax.random.normal(jax.random.key(0), (4, 5))
    out, _ = fmodel.apply(params, state, x, train=False)
    a = params["encoder"]["dense"]["kernel"]
    np.testing.assert_allclose(out.features, x @ a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        out.projection,
        out.features / jnp.linalg.norm(out.features, axis=-1, keepdims=True),
        rtol=1e-6,
    )
    assert fmodel.embedding_dim == 3


def test_bfloat16_computes_in_bfloat16_with_float32_params():
    config = _config("convnet", dtype="bfloat16", norm="batch")
    fmodel, params, state = models.functionalize(
        models.build_model(config, input_shape=(8, 8, 1), rngs_seed=0)
    )
    for leaf in jax.tree.leaves((params, state)):
        assert leaf.dtype == jnp.float32
    x = jnp.ones((2, 8, 8, 1))
    apply = functools.partial(fmodel.apply, train=True)
    jaxpr = str(jax.make_jaxpr(apply)(params, state, x))
    assert "conv_general_dilated" in jaxpr and "bf16" in jaxpr
    out, new_state = jax.eval_shape(apply, params, state, x)
    assert out.features.dtype == out.projection.dtype == jnp.float32
    for leaf in jax.tree.leaves(new_state):
        assert leaf.dtype == jnp.float32  # running statistics stay float32


def test_apply_is_pure_and_jittable():
    config = _config("mlp", norm="batch")
    fmodel, params, state = models.functionalize(
        models.build_model(config, input_shape=(6,), rngs_seed=0)
    )
    before = jax.tree.map(np.array, (params, state))
    apply = jax.jit(fmodel.apply, static_argnames="train")
    x = jax.random.normal(jax.random.key(0), (4, 6)) + 2.0
    out1, state1 = apply(params, state, x, train=True)
    out2, state2 = apply(params, state, x, train=True)
    jax.tree.map(np.testing.assert_array_equal, (out1, state1), (out2, state2))
    # The inputs are untouched; the running statistics moved.
    jax.tree.map(np.testing.assert_array_equal, before, (params, state))
    assert not np.allclose(state1["encoder"]["layers"][0]["norm"]["layer"]["mean"], 0.0)
    # Eval mode uses running statistics: an example's output ignores its batch mates.
    eval_out, eval_state = apply(params, state1, x, train=False)
    single, _ = apply(params, state1, x[:1], train=False)
    np.testing.assert_allclose(single.projection, eval_out.projection[:1], rtol=1e-5, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, eval_state, state1)


def test_same_seed_same_params_other_seed_other_params():
    config = _config("mlp", norm="group")
    build = functools.partial(models.build_model, config, input_shape=(6,))
    p0 = models.functionalize(build(rngs_seed=0))[1]
    p0_again = models.functionalize(build(rngs_seed=0))[1]
    p1 = models.functionalize(build(rngs_seed=1))[1]
    jax.tree.map(np.testing.assert_array_equal, p0, p0_again)
    assert not np.allclose(p0["encoder"]["layers"][0]["dense"]["kernel"],
                           p1["encoder"]["layers"][0]["dense"]["kernel"])  # fmt: skip


def test_batch_norm_averages_statistics_across_devices():
    """Under shard_map over "data", BN normalises with the *global* batch statistics:
    outputs and running averages equal the single-device full-batch computation."""
    config = _config("mlp", norm="batch", hidden_dims=(6,), head_hidden_dims=(4,))
    fmodel1, params, state = models.functionalize(
        models.build_model(config, input_shape=(5,), rngs_seed=0, axis_name=None)
    )
    fmodel8, params8, _ = models.functionalize(
        models.build_model(config, input_shape=(5,), rngs_seed=0, axis_name="data")
    )
    jax.tree.map(np.testing.assert_array_equal, params, params8)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    # (x - 3) * scale: statistics far from the initial (0, 1) running averages and
    # different on every device, so a per-device mean would be visibly wrong.
    x = jax.random.normal(jax.random.key(0), (16, 5)) * jnp.arange(1.0, 6.0) + 3.0
    x = x + jnp.repeat(jnp.arange(8.0), 2)[:, None]

    def per_device(params, state, x):
        return fmodel8.apply(params, state, x, train=True)

    sharded = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P(), P("data")),
            out_specs=(P("data"), P()),
            check_vma=False,
        )
    )
    x_sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data")))
    out8, state8 = sharded(params, state, x_sharded)
    out1, state1 = fmodel1.apply(params, state, x, train=True)
    np.testing.assert_allclose(out8.projection, out1.projection, rtol=1e-4, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), state8, state1
    )
    # Sanity: per-device statistics would differ.
    local, _ = fmodel1.apply(params, state, x[:2], train=True)
    assert not np.allclose(local.projection, out1.projection[:2], atol=1e-3)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"name": "vit"}, "model.name='vit' is not one of"),
        ({"norm": "layer"}, "model.norm='layer' is not one of"),
        ({"stem": "tiny"}, "model.stem='tiny'"),
        ({"dtype": "float16"}, "model.dtype='float16'"),
        ({"width": 0}, "model.width must be positive"),
        ({"embedding_dim": 0}, "contradicts"),
    ],
)
def test_bad_config_is_refused_with_the_offending_value(overrides, match):
    config = _config("mlp")
    config.update(overrides)
    with pytest.raises(ValueError, match=match):
        models.build_model(config, input_shape=(4,), rngs_seed=0)


def test_image_encoder_refuses_vector_inputs_and_wrong_batch_shapes():
    with pytest.raises(ValueError, match=r"input_shape=\(64,\)"):
        models.build_model(_config("convnet"), input_shape=(64,), rngs_seed=0)
    fmodel, params, state = _abstract(_config("convnet", norm="none"), (8, 8, 1))
    with pytest.raises(ValueError, match=r"expected inputs of shape"):
        jax.eval_shape(
            functools.partial(fmodel.apply, train=False),
            params,
            state,
            jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32),
        )
