"""On-device image augmentation: pure JAX, vmapped over the batch, jit-compiled.

Each view is a deterministic function of ``(base_key, example_index, aug_id)``:
its key is ``fold_in(fold_in(base_key, example_index), aug_id)``. That makes a
*finite-augmentation dataset* possible (``n_aug`` fixed views per example, the
setting of the EMC² paper's gradient-norm figure): draw ``aug_id`` in
``0..n_aug-1`` per step and the same id always gives the same view, on any
device, in any batch.

The operations follow torchvision (which the EMC² and SimCLR reference code
use), applied in this order:

1. random resized crop (area fraction ``crop_scale``, aspect ratio
   ``crop_ratio``; 10 tries, else the whole image), resampled bilinearly with
   antialiasing to the output size;
2. horizontal flip with probability ``flip_prob``;
3. with probability ``jitter_prob``, colour jitter: brightness, contrast,
   saturation, hue factors ``U[1-s, 1+s]`` (hue: shift ``U[-h, h]``), the four
   applied in a random order;
4. grayscale with probability ``grayscale_prob``;
5. Gaussian blur with probability ``blur_prob``, ``sigma ~ U[blur_sigma]``
   pixels, kernel 10% of the image size (SimCLR) unless set;
6. additive Gaussian noise ``noise_std`` (for the digits preset).

Inputs and outputs are float32 in [0, 1], NHWC; any size from 8x8 up. For
1-channel images the colour-only operations (saturation, hue, grayscale) are
no-ops.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.special import ndtri

__all__ = [
    "AugmentConfig",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "augment_views",
    "digits_preset",
    "finite_views",
    "identity",
    "normalize",
    "simclr_preset",
    "stl10_preset",
    "to_float",
]

Array = jax.Array

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ITU-R 601 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
# torchvision's RandomResizedCrop tries this many times before falling back.
_CROP_TRIES = 10


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation hyperparameters (hashable: a static argument under jit).

    Attributes:
      output_size: side of the square output; None keeps the input's (H, W).
      crop_scale: range of the crop's area as a fraction of the image's.
      crop_ratio: range of the crop's aspect ratio (width / height).
      flip_prob: probability of a horizontal flip.
      jitter: (brightness, contrast, saturation, hue) strengths; hue <= 0.5.
      jitter_prob: probability of applying the colour jitter.
      grayscale_prob: probability of converting to grayscale.
      blur_prob: probability of a Gaussian blur.
      blur_sigma: range of the blur's standard deviation, in pixels.
      blur_kernel_size: odd kernel size; None: 10% of the output size (SimCLR),
        at least 3.
      noise_std: standard deviation of additive Gaussian noise (0: none).
    """

    output_size: int | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int | None = None
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"AugmentConfig: {msg}")

        if self.output_size is not None and self.output_size < 1:
            raise bad(f"output_size={self.output_size} must be >= 1")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise bad(f"crop_scale={self.crop_scale} must satisfy 0 < lo <= hi <= 1")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise bad(f"crop_ratio={self.crop_ratio} must satisfy 0 < lo <= hi")
        for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob"):
            p = getattr(self, name)
            if not 0 <= p <= 1:
                raise bad(f"{name}={p} must lie in [0, 1]")
        if len(self.jitter) != 4 or min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise bad(f"jitter={self.jitter} must be 4 values >= 0 with hue <= 0.5")
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi:
            raise bad(f"blur_sigma={self.blur_sigma} must satisfy 0 < lo <= hi")
        k = self.blur_kernel_size
        if k is not None and (k < 1 or k % 2 == 0):
            raise bad(f"blur_kernel_size={k} must be odd and positive")
        if self.noise_std < 0:
            raise bad(f"noise_std={self.noise_std} must be >= 0")


def simclr_preset(size: int) -> AugmentConfig:
    """SimCLR's ImageNet recipe (Chen et al. 2020, appendix A), colour strength 1."""
    return AugmentConfig(
        output_size=size,
        crop_scale=(0.08, 1.0),
        flip_prob=0.5,
        jitter=(0.8, 0.8, 0.8, 0.2),
        jitter_prob=0.8,
        grayscale_prob=0.2,
        blur_prob=0.5,
        blur_sigma=(0.1, 2.0),
    )


def stl10_preset(size: int = 96) -> AugmentConfig:
    """The EMC² paper's STL-10 recipe (``contrastive_emc2/data.py``).

    RandomResizedCrop(size), flip, jitter (0.8, 0.8, 0.8, 0.2) with p = 0.8,
    grayscale p = 0.2, and a Gaussian blur with sigma ~ U[0.1, 2] applied to
    every view (their blur has no probability), no normalisation.
    """
    return dataclasses.replace(simclr_preset(size), blur_prob=1.0)


def digits_preset() -> AugmentConfig:
    """For 8x8 grayscale digits: mild zoom/shift crops, brightness/contrast, noise.

    No flip (a mirrored 2 is not a 2) and large crops only (scale >= 0.6, so at
    least ~5x5 of the 8x8 pixels survive): the digit stays recognisable.
    """
    return AugmentConfig(
        output_size=8,
        crop_scale=(0.6, 1.0),
        crop_ratio=(0.8, 1.25),
        flip_prob=0.0,
        jitter=(0.3, 0.2, 0.0, 0.0),
        jitter_prob=0.8,
        grayscale_prob=0.0,
        blur_prob=0.0,
        noise_std=0.05,
    )


def identity(size: int | None = None) -> AugmentConfig:
    """No augmentation (a resize to ``size`` if given): the evaluation view."""
    return AugmentConfig(
        output_size=size,
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        flip_prob=0.0,
        jitter=(0.0, 0.0, 0.0, 0.0),
        jitter_prob=0.0,
        grayscale_prob=0.0,
        blur_prob=0.0,
    )


def to_float(images: jax.typing.ArrayLike) -> Array:
    """uint8 images to float32 in [0, 1]; float inputs are cast to float32 as is."""
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def normalize(
    images: jax.typing.ArrayLike,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> Array:
    """Per-channel ``(x - mean) / std`` on (..., C) float images."""
    images = jnp.asarray(images, jnp.float32)
    mean_arr, std_arr = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    if mean_arr.shape != std_arr.shape or mean_arr.shape[-1:] != images.shape[-1:]:
        raise ValueError(
            f"mean {mean_arr.shape} and std {std_arr.shape} must match the channels of "
            f"images {images.shape}"
        )
    return (images - mean_arr) / std_arr


# ----------------------------------------------------------------------------
# Single-image operations: (H, W, C) float32 in [0, 1].
# ----------------------------------------------------------------------------


def _random_resized_crop(
    u: Array, image: Array, out_hw: tuple[int, int], config: AugmentConfig
) -> Array:
    """``u``: (2 * _CROP_TRIES + 2,) uniforms on [0, 1)."""
    h_in, w_in = image.shape[:2]
    if config.crop_scale == (1.0, 1.0):
        # The whole image: no randomness, exact identity when sizes agree.
        y0 = x0 = jnp.float32(0.0)
        h, w = jnp.float32(h_in), jnp.float32(w_in)
    else:
        u_scale, u_ratio = u[:_CROP_TRIES], u[_CROP_TRIES : 2 * _CROP_TRIES]
        lo, hi = config.crop_scale
        area = h_in * w_in * (lo + (hi - lo) * u_scale)
        log_lo, log_hi = math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])
        ratio = jnp.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = jnp.sqrt(area * ratio)
        h = jnp.sqrt(area / ratio)
        ok = (w <= w_in) & (h <= h_in)
        first = jnp.argmax(ok)
        # No try fits: torchvision falls back to a centre crop of the whole image.
        h = jnp.where(ok.any(), h[first], h_in)
        w = jnp.where(ok.any(), w[first], w_in)
        y0 = u[2 * _CROP_TRIES] * (h_in - h)
        x0 = u[2 * _CROP_TRIES + 1] * (w_in - w)
    scale = jnp.stack([out_hw[0] / h, out_hw[1] / w])
    translation = -jnp.stack([y0, x0]) * scale
    # Maps input pixel-edge coordinate v to v * scale + translation: the box
    # [y0, y0 + h] x [x0, x0 + w] lands exactly on the output grid.
    return jax.image.scale_and_translate(
        image,
        (*out_hw, image.shape[2]),
        spatial_dims=(0, 1),
        scale=scale,
        translation=translation,
        method="linear",
        antialias=True,
    )


def _grayscale(image: Array) -> Array:
    """(H, W, 3) -> (H, W, 1) luma."""
    return image @ jnp.asarray(_LUMA, image.dtype)[:, None]


def _blend(a: Array, b: Array, factor: Array) -> Array:
    return jnp.clip(factor * a + (1.0 - factor) * b, 0.0, 1.0)


def _rgb_to_hsv(rgb: Array) -> Array:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc = jnp.max(rgb, axis=-1)
    minc = jnp.min(rgb, axis=-1)
    delta = maxc - minc
    s = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
    safe = jnp.where(delta > 0, delta, 1.0)  # Grey pixels: hue 0, no 0/0.
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = jnp.where(r == maxc, bc - gc, jnp.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.where(delta > 0, jnp.mod(h / 6.0, 1.0), 0.0)
    return jnp.stack([h, s, maxc], axis=-1)


def _hsv_to_rgb(hsv: Array) -> Array:
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    i = jnp.mod(i, 6).astype(jnp.int32)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = jnp.choose(i, [v, q, p, p, t, v], mode="clip")
    g = jnp.choose(i, [t, v, v, q, p, p], mode="clip")
    b = jnp.choose(i, [p, p, t, v, v, q], mode="clip")
    return jnp.stack([r, g, b], axis=-1)


def _color_jitter(u: Array, image: Array, strengths: tuple[float, ...]) -> Array:
    """torchvision ColorJitter: factors drawn once, the ops in a random order.

    ``u``: (8,) uniforms on [0, 1): four factors, then four sort keys whose
    argsort is a uniformly random order of the ops.
    """
    color = image.shape[-1] == 3
    b, c, s, h = strengths

    def factor(ui: Array, strength: float) -> Array:
        lo = max(0.0, 1.0 - strength)
        return lo + (1.0 + strength - lo) * ui

    ops = []
    if b > 0:
        fb = factor(u[0], b)
        ops.append(lambda x: jnp.clip(x * fb, 0.0, 1.0))
    if c > 0:
        fc = factor(u[1], c)
        ops.append(lambda x: _blend(x, jnp.mean(_grayscale(x) if color else x), fc))
    if s > 0 and color:
        fs = factor(u[2], s)
        ops.append(lambda x: _blend(x, _grayscale(x), fs))
    if h > 0 and color:
        fh = h * (2.0 * u[3] - 1.0)

        def hue(x: Array) -> Array:
            hsv = _rgb_to_hsv(x)
            hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + fh, 1.0))
            return _hsv_to_rgb(hsv)

        ops.append(hue)
    if not ops:
        return image
    order = jnp.argsort(u[4 : 4 + len(ops)])
    # A loop, not an unrolled sequence: under vmap each switch evaluates every
    # branch, and one loop body compiles ~len(ops) times faster.
    return lax.fori_loop(0, len(ops), lambda i, x: lax.switch(order[i], ops, x), image)


def _blur_kernel_size(config: AugmentConfig, size: int) -> int:
    if config.blur_kernel_size is not None:
        k = config.blur_kernel_size
    else:
        k = max(3, int(0.1 * size) // 2 * 2 + 1)
    # Reflect padding needs the radius below the image side.
    return min(k, 2 * (size - 1) + 1) if size > 1 else 1


def _gaussian_blur(u: Array, image: Array, config: AugmentConfig) -> Array:
    """Separable Gaussian blur, reflect padding (as torchvision's GaussianBlur).

    ``u``: a uniform on [0, 1) that sets ``sigma``.
    """
    lo, hi = config.blur_sigma
    sigma = lo + (hi - lo) * u
    for axis in (0, 1):
        size = image.shape[axis]
        radius = _blur_kernel_size(config, size) // 2
        if radius == 0:
            continue
        offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
        weights = jnp.exp(-0.5 * (offsets / sigma) ** 2)
        weights = weights / jnp.sum(weights)
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius, radius)
        padded = jnp.pad(image, pad, mode="reflect")
        image = sum(
            weights[k] * lax.slice_in_dim(padded, k, k + size, axis=axis)
            for k in range(2 * radius + 1)
        )
    return image


# Layout of the one vector of uniforms each view draws: every jax.random call
# adds a threefry circuit to the program, and compile time grows with them.
_U_CROP = slice(0, 2 * _CROP_TRIES + 2)
_U_FLIP, _U_JITTER_ON, _U_GRAY, _U_BLUR_ON, _U_BLUR = range(_U_CROP.stop, _U_CROP.stop + 5)
_U_JITTER = slice(_U_BLUR + 1, _U_BLUR + 9)
_NUM_UNIFORMS = _U_JITTER.stop


def _augment_one(key: Array, image: Array, config: AugmentConfig) -> Array:
    """One view of one (H, W, C) image; the config's zero-probability steps vanish."""
    h, w, channels = image.shape
    out_hw = (config.output_size, config.output_size) if config.output_size else (h, w)
    num_noise = math.prod(out_hw) * channels if config.noise_std > 0 else 0
    # minval > 0: the noise's uniforms go through the inverse normal CDF.
    u = jax.random.uniform(key, (_NUM_UNIFORMS + num_noise,), minval=1e-7)
    image = _random_resized_crop(u[_U_CROP], image, out_hw, config)
    if config.flip_prob > 0:
        image = jnp.where(u[_U_FLIP] < config.flip_prob, image[:, ::-1], image)
    if config.jitter_prob > 0 and any(config.jitter):
        jittered = _color_jitter(u[_U_JITTER], image, config.jitter)
        image = jnp.where(u[_U_JITTER_ON] < config.jitter_prob, jittered, image)
    if config.grayscale_prob > 0 and channels == 3:
        gray = jnp.broadcast_to(_grayscale(image), image.shape)
        image = jnp.where(u[_U_GRAY] < config.grayscale_prob, gray, image)
    if config.blur_prob > 0:
        blurred = _gaussian_blur(u[_U_BLUR], image, config)
        image = jnp.where(u[_U_BLUR_ON] < config.blur_prob, blurred, image)
    if config.noise_std > 0:
        normal = ndtri(u[_NUM_UNIFORMS:]).reshape(image.shape)
        image = image + config.noise_std * normal
    return jnp.clip(image, 0.0, 1.0)


@functools.partial(jax.jit, static_argnames="config")
def augment_views(
    base_key: Array,
    images: jax.typing.ArrayLike,
    example_index: jax.typing.ArrayLike,
    aug_id: jax.typing.ArrayLike,
    config: AugmentConfig,
) -> Array:
    """Augmented views of a batch, view ``b`` a function of (key, index, id).

    Args:
      base_key: PRNG key of the run (or of the finite-augmentation dataset).
      images: (B, H, W, C) float32 in [0, 1], C in {1, 3} (see :func:`to_float`).
      example_index: (B,) int global dataset indices.
      aug_id: (B,) int augmentation ids.
      config: static :class:`AugmentConfig`.

    Returns:
      (B, H', W', C) float32 in [0, 1]; ``H' = W' = config.output_size`` if set.
      View ``b`` uses key ``fold_in(fold_in(base_key, example_index[b]),
      aug_id[b])``: equal (index, id) pairs give equal views.
    """
    images = jnp.asarray(images)
    example_index = jnp.asarray(example_index)
    aug_id = jnp.asarray(aug_id)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (B, H, W, C) with C in (1, 3), got {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be float in [0, 1] (use to_float), got {images.dtype}")
    batch = images.shape[0]
    if example_index.shape != (batch,) or aug_id.shape != (batch,):
        raise ValueError(
            f"example_index {example_index.shape} and aug_id {aug_id.shape} must be "
            f"({batch},) like the batch of images {images.shape}"
        )

    def view_key(index: Array, aid: Array) -> Array:
        return jax.random.fold_in(jax.random.fold_in(base_key, index), aid)

    keys = jax.vmap(view_key)(example_index, aug_id)
    one = functools.partial(_augment_one, config=config)
    return jax.vmap(one)(keys, images.astype(jnp.float32))


def finite_views(
    base_key: Array,
    images: jax.typing.ArrayLike,
    example_index: jax.typing.ArrayLike,
    *,
    n_aug: int,
    config: AugmentConfig,
) -> Array:
    """All ``n_aug`` fixed views of each image: the finite-augmentation dataset.

    Args:
      images: (m, H, W, C) float32 in [0, 1].
      example_index: (m,) global indices.

    Returns:
      (m, n_aug, H', W', C): ``[i, a]`` is view ``a`` of example ``i``, the
      same view :func:`augment_views` gives for (``example_index[i]``, ``a``).
    """
    if n_aug < 1:
        raise ValueError(f"n_aug={n_aug} must be >= 1")
    images = jnp.asarray(images)
    m = images.shape[0]
    index = jnp.repeat(jnp.asarray(example_index), n_aug)
    aug_id = jnp.tile(jnp.arange(n_aug, dtype=np.int32), m)
    views = augment_views(base_key, jnp.repeat(images, n_aug, axis=0), index, aug_id, config)
    return views.reshape(m, n_aug, *views.shape[1:])
