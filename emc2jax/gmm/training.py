"""Training linear encoders on Gaussian-mixture pairs: InfoNCE, SimSiam, CLIP.

Each trainer is one ``lax.scan`` over optimisation steps, so a whole training
run is a single pure function of a PRNG key. Jit it with the static arguments
bound (``functools.partial``) and ``vmap`` it over seeds and over the
continuous hyperparameters (learning rate, temperature, the sampler's
``delta``): see :mod:`emc2jax.gmm.sweep`.

Data is streamed: step ``t`` draws a fresh batch with ``sample_batch(fold_in(key, t))``
(the population setting of Bansal, Kavis & Sanghavi, arXiv 2411.03517), so the
sampler decides the augmentation (perfect, noisy with ``delta``, or the
"same point plus noise" control) and the trainer never sees labels.

Stable defaults. With dot-product similarity (``normalize=False``) the InfoNCE
logits grow like ``||A||^2 ||x||^2``. From a large init they start huge (a
loss in the hundreds at d = 20, init scale 3), the softmax saturates and a
small Adam step does not recover: after 300 steps the row space is still at
sin angle 0.6-0.99 from F, against 0.05-0.08 from the default init
(d = 20, k = 4, batch 128, 4 seeds). Hence: a small init
(``init_scale / sqrt(d)`` Gaussian rows), Adam with gradient clipping by
global norm, and a cosine learning-rate decay to 0 (it lets the encoder
settle below the constant-step noise floor).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from emc2jax import losses
from emc2jax.gmm.sampling import Pairs

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
PairSampler = Callable[[Array], Pairs]

_HI = lax.Precision.HIGHEST

__all__ = [
    "TrainResult",
    "clip_objective",
    "infonce_objective",
    "init_encoder",
    "simsiam_objective",
    "train_clip",
    "train_infonce",
    "train_simsiam",
]


class TrainResult(NamedTuple):
    """What a trainer returns.

    Attributes:
      params: the trained parameters (a dict of matrices; see each trainer).
      loss: (steps,) float32 training loss at every step (before its update).
    """

    params: Any
    loss: Array


def init_encoder(key: ArrayLike, *, dim: int, rank: int, scale: ArrayLike = 1e-2) -> Array:
    """A small random linear encoder ``A``: (rank, dim), entries N(0, scale^2 / dim)."""
    if rank < 1 or dim < 1:
        raise ValueError(f"rank and dim must be >= 1, got rank={rank}, dim={dim}.")
    return jnp.asarray(scale, jnp.float32) * jax.random.normal(key, (rank, dim)) / jnp.sqrt(dim)


def _encode(a: Array, x: Array) -> Array:
    return jnp.einsum("rd,nd->nr", a, x, precision=_HI)


def infonce_objective(
    encoder: Array, pairs: Pairs, *, temperature: ArrayLike, normalize: bool
) -> Array:
    """Mean in-batch InfoNCE of the linear encoder on a batch of pairs: scalar.

    ``mean_i [ -s(A x_i, A x+_i) / tau + log sum_j exp(s(A x_i, A x+_j) / tau) ]``
    (van den Oord et al. 2018, eq. 4; the loss of 2411.03517), with ``s`` the dot
    product (``normalize=False``, the paper's linear setting) or the cosine.
    """
    return jnp.mean(
        losses.infonce(
            _encode(encoder, pairs.x),
            _encode(encoder, pairs.x_pos),
            temperature=temperature,
            normalize=normalize,
        )
    )


def simsiam_objective(params: dict[str, Array], pairs: Pairs) -> Array:
    """Symmetrised SimSiam loss of a linear encoder + linear predictor: scalar.

    ``-1/2 [cos(P A x, sg(A x+)) + cos(P A x+, sg(A x))]`` averaged over the
    batch (Chen & He 2021, Algorithm 1), ``params = {"encoder": A (r, d),
    "predictor": P (r, r)}``. No negatives: the stop-gradient and the
    predictor are what keep it from collapsing.
    """
    a, p = params["encoder"], params["predictor"]
    z1, z2 = _encode(a, pairs.x), _encode(a, pairs.x_pos)
    h1, h2 = _encode(p, z1), _encode(p, z2)

    def neg_cos(h: Array, z: Array) -> Array:
        h, z = losses.l2_normalize(h), losses.l2_normalize(lax.stop_gradient(z))
        return -jnp.sum(h * z, axis=-1)

    return jnp.mean(0.5 * (neg_cos(h1, z2) + neg_cos(h2, z1)))


def clip_objective(
    params: dict[str, Array], pairs: Pairs, *, temperature: ArrayLike, normalize: bool
) -> Array:
    """Mean symmetric CLIP loss of two linear encoders on two-modal pairs: scalar.

    ``params = {"first": A_1 (r, d_1), "second": A_2 (r, d_2)}``; the pairs'
    ``x`` is modality 1 and ``x_pos`` modality 2 (Radford et al. 2021;
    2411.03517's CLIP setting).
    """
    return jnp.mean(
        losses.clip_loss(
            _encode(params["first"], pairs.x),
            _encode(params["second"], pairs.x_pos),
            temperature=temperature,
            normalize=normalize,
        )
    )


def _fit(
    key: Array,
    params: Any,
    objective: Callable[[Any, Pairs], Array],
    sample_batch: PairSampler,
    *,
    steps: int,
    learning_rate: ArrayLike,
    clip_norm: ArrayLike,
    weight_decay: ArrayLike,
) -> TrainResult:
    """Adam (cosine-decayed, clipped, optional decoupled weight decay) in one ``lax.scan``."""
    schedule = optax.cosine_decay_schedule(jnp.asarray(learning_rate, jnp.float32), steps)
    tx = optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, weight_decay=weight_decay),
    )
    grad_fn = jax.value_and_grad(objective)

    def step(carry, t):
        params, opt_state = carry
        loss, grads = grad_fn(params, sample_batch(jax.random.fold_in(key, t)))
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), loss = lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
    return TrainResult(params, loss)


def _pair_dims(sample_batch: PairSampler, steps: int) -> tuple[int, int]:
    """The pairs' dimensions (d, d') from the sampler's output shapes; checks ``steps``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    shapes = jax.eval_shape(sample_batch, jax.random.key(0))
    return shapes.x.shape[-1], shapes.x_pos.shape[-1]


def train_infonce(
    key: ArrayLike,
    sample_batch: PairSampler,
    *,
    rank: int,
    steps: int,
    learning_rate: ArrayLike = 1e-2,
    temperature: ArrayLike = 1.0,
    normalize: bool = False,
    init_scale: ArrayLike = 1e-2,
    clip_norm: ArrayLike = 1.0,
) -> TrainResult:
    """Trains ``f(x) = A x`` with in-batch InfoNCE on streamed pairs.

    Args:
      key: PRNG key (init and the batches).
      sample_batch: ``key -> Pairs`` drawing one batch (static: close over the
        mixture and the batch size, e.g. ``functools.partial(sample_pairs,
        mixture=m, n=256, delta=0.1)``).
      rank: r, the embedding dimension (static).
      steps: optimisation steps (static).
      learning_rate: Adam's peak step, cosine-decayed to 0 (may be traced).
      temperature: tau (may be traced). With dot products it only rescales A.
      normalize: cosine similarity if True, dot product (the theory's setting) if False.
      init_scale: rows of the initial A are N(0, init_scale^2 / d).
      clip_norm: gradient clipping threshold (global norm).

    Returns:
      :class:`TrainResult` with ``params = {"encoder": A (r, d)}``.
    """
    dim, _ = _pair_dims(sample_batch, steps)
    k_init, k_data = jax.random.split(key)
    params = {"encoder": init_encoder(k_init, dim=dim, rank=rank, scale=init_scale)}

    def objective(p, pairs):
        return infonce_objective(p["encoder"], pairs, temperature=temperature, normalize=normalize)

    return _fit(
        k_data,
        params,
        objective,
        sample_batch,
        steps=steps,
        learning_rate=learning_rate,
        clip_norm=clip_norm,
        weight_decay=0.0,
    )


def train_simsiam(
    key: ArrayLike,
    sample_batch: PairSampler,
    *,
    rank: int,
    steps: int,
    learning_rate: ArrayLike = 1e-2,
    weight_decay: ArrayLike = 1e-3,
    init_scale: ArrayLike = 1e-1,
    clip_norm: ArrayLike = 1.0,
) -> TrainResult:
    """Trains a linear SimSiam (encoder A, predictor P, stop-gradient) on streamed pairs.

    The predictor starts at the identity (plus ``init_scale``-sized noise):
    with a random small predictor linear SimSiam typically collapses before the
    encoder has learnt anything (Tian et al. 2021, "Understanding
    self-supervised learning dynamics without contrastive pairs"); decoupled
    weight decay is what shrinks the directions the predictor cannot use.

    Returns:
      :class:`TrainResult` with ``params = {"encoder": A (r, d), "predictor": P (r, r)}``.
    """
    dim, _ = _pair_dims(sample_batch, steps)
    k_enc, k_pred, k_data = jax.random.split(key, 3)
    params = {
        "encoder": init_encoder(k_enc, dim=dim, rank=rank, scale=init_scale),
        "predictor": jnp.eye(rank) + init_encoder(k_pred, dim=rank, rank=rank, scale=init_scale),
    }
    return _fit(
        k_data,
        params,
        simsiam_objective,
        sample_batch,
        steps=steps,
        learning_rate=learning_rate,
        clip_norm=clip_norm,
        weight_decay=weight_decay,
    )


def train_clip(
    key: ArrayLike,
    sample_batch: PairSampler,
    *,
    rank: int,
    steps: int,
    learning_rate: ArrayLike = 1e-2,
    temperature: ArrayLike = 1.0,
    normalize: bool = False,
    init_scale: ArrayLike = 1e-2,
    clip_norm: ArrayLike = 1.0,
) -> TrainResult:
    """Trains two linear encoders with the symmetric CLIP loss on two-modal pairs.

    Args as :func:`train_infonce`; ``sample_batch`` yields pairs whose ``x``
    is modality 1 (d_1) and ``x_pos`` modality 2 (d_2), e.g.
    ``functools.partial(sample_two_modal_pairs, mixture=m, n=256)``.

    Returns:
      :class:`TrainResult` with ``params = {"first": A_1 (r, d_1), "second": A_2 (r, d_2)}``.
    """
    dim_1, dim_2 = _pair_dims(sample_batch, steps)
    k1, k2, k_data = jax.random.split(key, 3)
    params = {
        "first": init_encoder(k1, dim=dim_1, rank=rank, scale=init_scale),
        "second": init_encoder(k2, dim=dim_2, rank=rank, scale=init_scale),
    }

    def objective(p, pairs):
        return clip_objective(p, pairs, temperature=temperature, normalize=normalize)

    return _fit(
        k_data,
        params,
        objective,
        sample_batch,
        steps=steps,
        learning_rate=learning_rate,
        clip_norm=clip_norm,
        weight_decay=0.0,
    )
