"""Flax NNX encoders with a projection head, used as pure functions of pytrees.

Encoders (``model.name``):

- ``linear``: ``f(x) = A x`` with ``A`` of shape (width, d), no bias: the encoder
  of the Gaussian-mixture analysis (Bansal et al. 2024, arXiv 2411.03517, Sec. 3).
- ``mlp``: flattened input, ``hidden_dims`` Dense -> norm -> ReLU layers.
- ``convnet``: three 3x3 conv layers (width, 2 width, 4 width; strides 1, 2, 2) and
  global average pooling, sized for the 8x8x1 digits.
- ``resnet18`` / ``resnet50``: He et al. 2016, basic / bottleneck blocks, stage widths
  ``width * (1, 2, 4, 8)``. ``stem="cifar"`` is a 3x3 stride-1 conv and no max-pool
  (CIFAR/STL-10, as in SimCLR's CIFAR variant and the EMC² code); ``stem="imagenet"`` is
  the 7x7 stride-2 conv followed by a 3x3 stride-2 max-pool.

Every encoder produces *features* ``h = f_θ(x)`` (B, F), the representation used for
evaluation (linear probe, kNN); the projection head ``g`` maps them to the embedding
``z = g(h) / ||g(h)||`` (B, D) on which the contrastive losses of ``shared/design.md``
compute ``s(u, v) = <u, v>``.

Normalisation (``model.norm``): ``"batch"`` (BatchNorm; with ``axis_name`` its batch
statistics are averaged over that named axis, i.e. over the global batch, when the model
runs under ``jax.shard_map``/``jax.pmap``), ``"group"`` (GroupNorm, no state), ``"none"``
(what the EMC² paper trains with; convolutions then carry a bias).

Why NNX used through ``nnx.split``/``nnx.merge``: modules are written as plain Python
objects, yet :func:`functionalize` turns one into a :class:`FunctionalModel` whose
``apply(params, model_state, x, train=...)`` is a pure function of two nested dicts of
arrays, so the train step stays a pure, jit/shard_map-able function of a pytree
``TrainState`` and the checkpoint is exactly that pytree.

Mixed precision: ``dtype="bfloat16"`` computes activations in bfloat16 while the
parameters (and BatchNorm statistics) stay float32; features and embeddings are
returned in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from emc2jax.losses import l2_normalize

Array = jax.Array
Params = dict[str, Any]
ModelState = dict[str, Any]

MODEL_NAMES = ("linear", "mlp", "convnet", "resnet18", "resnet50")
STEMS = ("cifar", "imagenet")
NORMS = ("batch", "group", "none")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

_RESNET_STAGES = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}
_BOTTLENECK_EXPANSION = 4
# He-normal on fan-out, as torchvision initialises ResNet convolutions.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

__all__ = [
    "DTYPES",
    "MODEL_NAMES",
    "NORMS",
    "STEMS",
    "ContrastiveModel",
    "Embeddings",
    "FunctionalModel",
    "build_model",
    "default_model_config",
    "features_dim",
    "functionalize",
]


class Embeddings(NamedTuple):
    """Outputs of the model for a batch of B inputs.

    Attributes:
      features: (B, F) float32, encoder output before the head (for evaluation).
      projection: (B, D) float32, L2-normalised head output (for the losses).
    """

    features: Array
    projection: Array


def default_model_config() -> ml_collections.ConfigDict:
    """Default ``model.*`` config (a ResNet-18 with the CIFAR stem, SimCLR head).

    Keys:
      name: one of ``MODEL_NAMES``.
      stem: ``"cifar"`` (3x3 conv, no max-pool) or ``"imagenet"`` (7x7/2 conv +
        3x3/2 max-pool); ResNets only.
      norm: ``"batch"``, ``"group"`` or ``"none"`` (encoder and head hidden layers).
      width: linear: output dim r; convnet: channels of the first layer (features
        4 width); resnet: channels of the first stage (features 8 width for
        resnet18, 32 width for resnet50).
      hidden_dims: MLP hidden layer sizes; the last one is the feature dim.
      head_hidden_dims: hidden layers of the projection head (Dense -> norm ->
        ReLU); ``()`` gives a linear head.
      embedding_dim: D, the head's output dim; 0 means no head (the projection is
        the normalised features, e.g. for the linear GMM encoder).
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"`` (params stay float32).
      group_norm_groups: GroupNorm groups (reduced to gcd(groups, channels)).
      batch_norm_momentum: running-average decay (0.9 is PyTorch's momentum 0.1).
      batch_norm_epsilon: BatchNorm epsilon.
    """
    config = ml_collections.ConfigDict()
    config.name = "resnet18"
    config.stem = "cifar"
    config.norm = "batch"
    config.width = 64
    config.hidden_dims = (256, 256)
    config.head_hidden_dims = (512,)
    config.embedding_dim = 128
    config.dtype = "float32"
    config.group_norm_groups = 32
    config.batch_norm_momentum = 0.9
    config.batch_norm_epsilon = 1e-5
    return config


def features_dim(model_config: ml_collections.ConfigDict) -> int:
    """F, the dimension of :attr:`Embeddings.features` for ``model_config``."""
    name, width = model_config.name, model_config.width
    if name == "linear":
        return width
    if name == "mlp":
        return tuple(model_config.hidden_dims)[-1]
    if name == "convnet":
        return 4 * width
    if name == "resnet18":
        return 8 * width
    if name == "resnet50":
        return 8 * width * _BOTTLENECK_EXPANSION
    raise ValueError(f"model.name={name!r} is not one of {MODEL_NAMES}")


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LayerOptions:
    """What every layer of one model shares (static)."""

    norm: str
    dtype: Any
    axis_name: str | None
    group_norm_groups: int
    batch_norm_momentum: float
    batch_norm_epsilon: float

    @property
    def use_bias(self) -> bool:
        # A bias before a normalisation with a shift is redundant.
        return self.norm == "none"


class Norm(nnx.Module):
    """BatchNorm, GroupNorm or the identity, called with an explicit ``train`` flag."""

    def __init__(self, num_features: int, opts: _LayerOptions, *, rngs: nnx.Rngs):
        self.kind = opts.norm
        if opts.norm == "batch":
            self.layer = nnx.BatchNorm(
                num_features,
                momentum=opts.batch_norm_momentum,
                epsilon=opts.batch_norm_epsilon,
                dtype=opts.dtype,
                param_dtype=jnp.float32,
                axis_name=opts.axis_name,
                rngs=rngs,
            )
        elif opts.norm == "group":
            self.layer = nnx.GroupNorm(
                num_features,
                num_groups=math.gcd(opts.group_norm_groups, num_features),
                dtype=opts.dtype,
                param_dtype=jnp.float32,
                rngs=rngs,
            )
        else:
            self.layer = None

    def __call__(self, x: Array, *, train: bool) -> Array:
        if self.kind == "batch":
            # Training normalises with (cross-device) batch statistics and updates
            # the running averages; evaluation uses the running averages.
            return self.layer(x, use_running_average=not train)
        if self.kind == "group":
            return self.layer(x)
        return x


def _conv(
    cin: int, cout: int, kernel: int, stride: int, opts: _LayerOptions, rngs: nnx.Rngs
) -> nnx.Conv:
    # Explicit symmetric padding (k // 2) as in PyTorch: "SAME" would pad stride-2
    # convolutions of even inputs asymmetrically.
    pad = kernel // 2
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        use_bias=opts.use_bias,
        dtype=opts.dtype,
        param_dtype=jnp.float32,
        kernel_init=_conv_init,
        rngs=rngs,
    )


def _dense(din: int, dout: int, *, use_bias: bool, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class DenseBlock(nnx.Module):
    """Dense -> norm -> ReLU: (B, din) -> (B, dout)."""

    def __init__(self, din: int, dout: int, opts: _LayerOptions, *, rngs: nnx.Rngs):
        self.dense = _dense(din, dout, use_bias=opts.use_bias, dtype=opts.dtype, rngs=rngs)
        self.norm = Norm(dout, opts, rngs=rngs)

    def __call__(self, x: Array, *, train: bool) -> Array:
        return jax.nn.relu(self.norm(self.dense(x), train=train))


class ConvBlock(nnx.Module):
    """Conv -> norm -> ReLU on (B, H, W, C) images."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, opts: _LayerOptions, *, rngs):
        self.conv = _conv(cin, cout, kernel, stride, opts, rngs)
        self.norm = Norm(cout, opts, rngs=rngs)

    def __call__(self, x: Array, *, train: bool) -> Array:
        return jax.nn.relu(self.norm(self.conv(x), train=train))


class BasicBlock(nnx.Module):
    """ResNet-18/34 residual block: two 3x3 convs, projection shortcut if needed."""

    def __init__(self, cin: int, cout: int, stride: int, opts: _LayerOptions, *, rngs):
        self.conv1 = _conv(cin, cout, 3, stride, opts, rngs)
        self.norm1 = Norm(cout, opts, rngs=rngs)
        self.conv2 = _conv(cout, cout, 3, 1, opts, rngs)
        self.norm2 = Norm(cout, opts, rngs=rngs)
        self.shortcut = _Shortcut(cin, cout, stride, opts, rngs=rngs)

    def __call__(self, x: Array, *, train: bool) -> Array:
        y = jax.nn.relu(self.norm1(self.conv1(x), train=train))
        y = self.norm2(self.conv2(y), train=train)
        return jax.nn.relu(y + self.shortcut(x, train=train))


class Bottleneck(nnx.Module):
    """ResNet-50 block: 1x1 reduce, 3x3 (strided), 1x1 expand by 4."""

    def __init__(self, cin: int, mid: int, stride: int, opts: _LayerOptions, *, rngs):
        cout = mid * _BOTTLENECK_EXPANSION
        self.conv1 = _conv(cin, mid, 1, 1, opts, rngs)
        self.norm1 = Norm(mid, opts, rngs=rngs)
        self.conv2 = _conv(mid, mid, 3, stride, opts, rngs)
        self.norm2 = Norm(mid, opts, rngs=rngs)
        self.conv3 = _conv(mid, cout, 1, 1, opts, rngs)
        self.norm3 = Norm(cout, opts, rngs=rngs)
        self.shortcut = _Shortcut(cin, cout, stride, opts, rngs=rngs)

    def __call__(self, x: Array, *, train: bool) -> Array:
        y = jax.nn.relu(self.norm1(self.conv1(x), train=train))
        y = jax.nn.relu(self.norm2(self.conv2(y), train=train))
        y = self.norm3(self.conv3(y), train=train)
        return jax.nn.relu(y + self.shortcut(x, train=train))


class _Shortcut(nnx.Module):
    """Identity, or 1x1 strided conv -> norm when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, opts: _LayerOptions, *, rngs):
        self.project = stride != 1 or cin != cout
        if self.project:
            self.conv = _conv(cin, cout, 1, stride, opts, rngs)
            self.norm = Norm(cout, opts, rngs=rngs)

    def __call__(self, x: Array, *, train: bool) -> Array:
        if not self.project:
            return x
        return self.norm(self.conv(x), train=train)


# ----------------------------------------------------------------------------
# Encoders: (B, *input_shape) -> (B, F) in the compute dtype
# ----------------------------------------------------------------------------


class LinearEncoder(nnx.Module):
    """``h = A x``, A of shape (r, d) stored as the (d, r) kernel; input flattened."""

    def __init__(self, input_shape: Sequence[int], width: int, opts: _LayerOptions, *, rngs):
        self.dense = _dense(
            math.prod(input_shape), width, use_bias=False, dtype=opts.dtype, rngs=rngs
        )

    def __call__(self, x: Array, *, train: bool) -> Array:
        del train
        return self.dense(x.reshape(x.shape[0], -1))


class MLPEncoder(nnx.Module):
    """Flattened input through ``hidden_dims`` Dense -> norm -> ReLU layers."""

    def __init__(
        self, input_shape: Sequence[int], hidden_dims: Sequence[int], opts: _LayerOptions, *, rngs
    ):
        dims = (math.prod(input_shape), *hidden_dims)
        self.layers = nnx.List(
            [DenseBlock(a, b, opts, rngs=rngs) for a, b in zip(dims[:-1], dims[1:], strict=True)]
        )

    def __call__(self, x: Array, *, train: bool) -> Array:
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            x = layer(x, train=train)
        return x


class ConvNetEncoder(nnx.Module):
    """Three conv blocks (width, 2w, 4w channels; strides 1, 2, 2) + global mean pool.

    On 8x8 digits the maps are 8x8, 4x4, 2x2: small enough to train on two CPU cores.
    """

    def __init__(self, channels: int, width: int, opts: _LayerOptions, *, rngs):
        self.blocks = nnx.List(
            [
                ConvBlock(channels, width, 3, 1, opts, rngs=rngs),
                ConvBlock(width, 2 * width, 3, 2, opts, rngs=rngs),
                ConvBlock(2 * width, 4 * width, 3, 2, opts, rngs=rngs),
            ]
        )

    def __call__(self, x: Array, *, train: bool) -> Array:
        for block in self.blocks:
            x = block(x, train=train)
        return jnp.mean(x, axis=(1, 2))


class ResNetEncoder(nnx.Module):
    """ResNet-18/50 trunk up to global average pooling (no classifier)."""

    def __init__(
        self, channels: int, name: str, stem: str, width: int, opts: _LayerOptions, *, rngs
    ):
        self.imagenet_stem = stem == "imagenet"
        kernel, stride = (7, 2) if self.imagenet_stem else (3, 1)
        self.stem = ConvBlock(channels, width, kernel, stride, opts, rngs=rngs)
        bottleneck = name == "resnet50"
        expansion = _BOTTLENECK_EXPANSION if bottleneck else 1
        blocks = []
        cin = width
        for stage, num_blocks in enumerate(_RESNET_STAGES[name]):
            mid = width * 2**stage
            for b in range(num_blocks):
                stride = 2 if (stage > 0 and b == 0) else 1
                block_cls = Bottleneck if bottleneck else BasicBlock
                blocks.append(block_cls(cin, mid, stride, opts, rngs=rngs))
                cin = mid * expansion
        self.blocks = nnx.List(blocks)

    def __call__(self, x: Array, *, train: bool) -> Array:
        x = self.stem(x, train=train)
        if self.imagenet_stem:
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for block in self.blocks:
            x = block(x, train=train)
        return jnp.mean(x, axis=(1, 2))


class ProjectionHead(nnx.Module):
    """``g``: hidden Dense -> norm -> ReLU layers, then a linear map to D dims."""

    def __init__(
        self, din: int, hidden_dims: Sequence[int], dout: int, opts: _LayerOptions, *, rngs
    ):
        dims = (din, *hidden_dims)
        self.hidden = nnx.List(
            [DenseBlock(a, b, opts, rngs=rngs) for a, b in zip(dims[:-1], dims[1:], strict=True)]
        )
        self.out = _dense(dims[-1], dout, use_bias=True, dtype=opts.dtype, rngs=rngs)

    def __call__(self, h: Array, *, train: bool) -> Array:
        for layer in self.hidden:
            h = layer(h, train=train)
        return self.out(h)


class ContrastiveModel(nnx.Module):
    """Encoder + projection head: (B, *input_shape) -> :class:`Embeddings`."""

    def __init__(
        self,
        encoder: nnx.Module,
        head: ProjectionHead | None,
        *,
        input_shape: tuple[int, ...],
        features_dim: int,
        embedding_dim: int,
        dtype: Any,
    ):
        self.encoder = encoder
        self.head = head
        self.input_shape = input_shape
        self.features_dim = features_dim
        self.embedding_dim = embedding_dim
        self.dtype = dtype

    def _prepare(self, x: Array) -> Array:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"expected inputs of shape (B, *{self.input_shape}), got {tuple(x.shape)}"
            )
        x = jnp.asarray(x, self.dtype)
        # (H, W) images: the conv encoders want a channel axis.
        needs_channel = isinstance(self.encoder, ConvNetEncoder | ResNetEncoder)
        return x[..., None] if needs_channel and len(self.input_shape) == 2 else x

    def encode(self, x: Array, *, train: bool) -> Array:
        """Features h = f(x): (B, *input_shape) -> (B, F) float32."""
        return self.encoder(self._prepare(x), train=train).astype(jnp.float32)

    def __call__(self, x: Array, *, train: bool) -> Embeddings:
        h = self.encoder(self._prepare(x), train=train)
        z = h if self.head is None else self.head(h, train=train)
        return Embeddings(features=h.astype(jnp.float32), projection=l2_normalize(z))


# ----------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------


def _image_channels(name: str, input_shape: tuple[int, ...]) -> int:
    # (H, W) images get a channel axis in `FunctionalModel`; (H, W, C) are used as is.
    if len(input_shape) == 2:
        return 1
    if len(input_shape) == 3:
        return input_shape[-1]
    raise ValueError(
        f"model.name={name!r} needs image inputs of shape (H, W) or (H, W, C); "
        f"got input_shape={input_shape}"
    )


def _validate(config: ml_collections.ConfigDict) -> None:
    checks = {"name": MODEL_NAMES, "stem": STEMS, "norm": NORMS, "dtype": tuple(DTYPES)}
    for key, choices in checks.items():
        if config[key] not in choices:
            raise ValueError(f"model.{key}={config[key]!r} is not one of {choices}")
    if config.width <= 0:
        raise ValueError(f"model.width must be positive, got {config.width}")
    if config.name == "mlp" and not tuple(config.hidden_dims):
        raise ValueError("model.name='mlp' needs a non-empty model.hidden_dims")
    if config.embedding_dim < 0:
        raise ValueError(f"model.embedding_dim must be >= 0, got {config.embedding_dim}")
    if config.embedding_dim == 0 and tuple(config.head_hidden_dims):
        raise ValueError(
            "model.embedding_dim=0 (no head) contradicts "
            f"model.head_hidden_dims={tuple(config.head_hidden_dims)}"
        )


def _construct(
    model_config: ml_collections.ConfigDict,
    input_shape: tuple[int, ...],
    axis_name: str | None,
    key: Array,
) -> ContrastiveModel:
    dtype = DTYPES[model_config.dtype]
    opts = _LayerOptions(
        norm=model_config.norm,
        dtype=dtype,
        axis_name=axis_name,
        group_norm_groups=model_config.group_norm_groups,
        batch_norm_momentum=model_config.batch_norm_momentum,
        batch_norm_epsilon=model_config.batch_norm_epsilon,
    )
    rngs = nnx.Rngs(params=key)
    name, width = model_config.name, model_config.width
    if name == "linear":
        encoder = LinearEncoder(input_shape, width, opts, rngs=rngs)
    elif name == "mlp":
        encoder = MLPEncoder(input_shape, tuple(model_config.hidden_dims), opts, rngs=rngs)
    elif name == "convnet":
        encoder = ConvNetEncoder(_image_channels(name, input_shape), width, opts, rngs=rngs)
    else:
        channels = _image_channels(name, input_shape)
        encoder = ResNetEncoder(channels, name, model_config.stem, width, opts, rngs=rngs)
    head = None
    if model_config.embedding_dim:
        head = ProjectionHead(
            features_dim(model_config),
            tuple(model_config.head_hidden_dims),
            model_config.embedding_dim,
            opts,
            rngs=rngs,
        )
    return ContrastiveModel(
        encoder,
        head,
        input_shape=input_shape,
        features_dim=features_dim(model_config),
        embedding_dim=model_config.embedding_dim or features_dim(model_config),
        dtype=dtype,
    )


@functools.lru_cache(maxsize=16)
def _initializer(
    model_config: ml_collections.FrozenConfigDict,
    input_shape: tuple[int, ...],
    axis_name: str | None,
) -> tuple[nnx.GraphDef, Callable[[Array], nnx.State]]:
    """The model's structure and a compiled ``key -> variables`` initialiser.

    One compiled program instead of hundreds of eager ops (each compiling on first
    use), cached per (config, input shape), so building the same model again with
    another seed costs no compilation.
    """

    def construct(key: Array) -> ContrastiveModel:
        return _construct(model_config, input_shape, axis_name, key)

    graphdef, _ = nnx.split(nnx.eval_shape(lambda: construct(jax.random.key(0))))
    return graphdef, jax.jit(lambda key: nnx.state(construct(key)))


def build_model(
    model_config: ml_collections.ConfigDict,
    *,
    input_shape: tuple[int, ...],
    rngs_seed: int,
    axis_name: str | None = None,
) -> ContrastiveModel:
    """Builds the encoder + head described by ``model_config`` (see
    :func:`default_model_config` for the keys).

    Args:
      model_config: the ``model.*`` ConfigDict.
      input_shape: one example's shape, without the batch axis: (d,) for vectors,
        (H, W) or (H, W, C) for images.
      rngs_seed: seed of the parameter initialisation.
      axis_name: the named axis BatchNorm averages its statistics over (``"data"``
        when the model runs inside a data-parallel ``shard_map``/``pmap``); None on
        one device. With an axis name the model can only be applied in train mode
        inside such a map; eval mode never communicates.

    Returns:
      A ``ContrastiveModel``; use :func:`functionalize` to get pure functions.

    Raises:
      ValueError: an unknown name/stem/norm/dtype, or inputs the encoder cannot take.
    """
    _validate(model_config)
    input_shape = tuple(int(s) for s in input_shape)
    if model_config.name in ("convnet", "resnet18", "resnet50"):
        _image_channels(model_config.name, input_shape)
    graphdef, init = _initializer(
        ml_collections.FrozenConfigDict(model_config), input_shape, axis_name
    )
    return nnx.merge(graphdef, init(jax.random.key(rngs_seed)))


# ----------------------------------------------------------------------------
# Functional view
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FunctionalModel:
    """Pure functions of ``(params, model_state)``, both nested dicts of arrays.

    ``params`` holds the trainable ``nnx.Param`` leaves (float32); ``model_state``
    everything else (BatchNorm running statistics; ``{}`` for group/none norms).
    Both are plain pytrees: jit/shard_map arguments, optax targets, checkpoint items.

    Attributes:
      graphdef: the static structure of the module (hashable, no arrays).
      input_shape: one example's shape.
      features_dim: F.
      embedding_dim: D (F when the model has no head).
    """

    graphdef: nnx.GraphDef
    input_shape: tuple[int, ...]
    features_dim: int
    embedding_dim: int

    def apply(
        self, params: Params, model_state: ModelState, x: Array, *, train: bool
    ) -> tuple[Embeddings, ModelState]:
        """Encodes a batch.

        Args:
          params: the ``params`` pytree of :func:`functionalize`.
          model_state: the ``model_state`` pytree of :func:`functionalize`.
          x: (B, *input_shape) inputs (any float dtype; cast to the compute dtype).
          train: batch statistics (and their running-average update) if True,
            running averages if False.

        Returns:
          ``(Embeddings(features (B, F), projection (B, D)), new_model_state)``; in
          eval mode ``new_model_state is model_state``.
        """
        module = nnx.merge(self.graphdef, params, model_state)
        out = module(x, train=train)
        if not train:
            return out, model_state
        return out, nnx.to_pure_dict(nnx.state(module, nnx.Not(nnx.Param)))

    def features(self, params: Params, model_state: ModelState, x: Array) -> Array:
        """Eval-mode features h (B, F) float32, taken before the projection head."""
        return nnx.merge(self.graphdef, params, model_state).encode(x, train=False)


def functionalize(model: ContrastiveModel) -> tuple[FunctionalModel, Params, ModelState]:
    """Splits ``model`` into a :class:`FunctionalModel` and its two array pytrees.

    Returns:
      ``(fmodel, params, model_state)``: ``params`` are the ``nnx.Param`` leaves,
      ``model_state`` all other variables (BatchNorm statistics), as nested dicts.
    """
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    fmodel = FunctionalModel(
        graphdef=graphdef,
        input_shape=model.input_shape,
        features_dim=model.features_dim,
        embedding_dim=model.embedding_dim,
    )
    return fmodel, nnx.to_pure_dict(params), nnx.to_pure_dict(model_state)
