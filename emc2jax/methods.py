"""One objective per contrastive method: views -> embeddings -> sampler -> estimator.

Each method is a :class:`Method`: ``init_sampler(num_examples)`` builds its
sampler state, and ``objective(params, ctx)`` is the per-device function that
:mod:`emc2jax.train` differentiates. It returns the scalar whose gradient is
the method's estimator of the loss gradient (a surrogate for EMC², SogCLR and
the embedding cache: see :mod:`emc2jax.losses`) and, as auxiliaries, the new
model state, the new sampler state and a flat dict of metrics.

Data parallelism: the objective runs on one device's share of the batch
(``b = B / n`` examples) and uses named-axis collectives over
``ctx.axis_name``. Embeddings are all-gathered so that every anchor sees the
whole global batch as negatives/proposals; the transpose of ``all_gather`` is a
reduce-scatter, so gradients reach the devices that computed the embeddings.
Every device's objective is scaled so that the mean of the per-device
gradients (``pmean``) is the gradient of the global objective.

Views: example i's two views use augmentation ids ``(a0_i, a1_i)``; a view is a
deterministic function of ``(augment_key, i, a)`` (see
:func:`emc2jax.data.augment.augment_views`), which is what lets the EMC² chain
store a negative as ``(index, augmentation id)`` and re-encode it later.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from emc2jax import losses
from emc2jax.samplers import cache as cache_sampler
from emc2jax.samplers import emc2 as emc2_sampler
from emc2jax.samplers import sogclr as sogclr_sampler

Array = jax.Array
PyTree = Any

# Range of fresh augmentation ids when the dataset has infinitely many views.
_FRESH_AUG_RANGE = 2**30


@dataclasses.dataclass(frozen=True)
class Context:
    """Everything an objective needs besides the parameters, for one device.

    Attributes:
      images: (b, H, W, C) float32 local batch in [0, 1] (or (b, d) vectors).
      example_index: (b,) int32 global dataset indices of the local batch.
      aug_ids: (b, 2) int32 augmentation ids of the two views.
      model_state: model variables that are not parameters (batch statistics).
      sampler_state: the method's sampler state (replicated).
      key: this step's key (``fold_in(key(seed), step)``), same on every device.
      encode: ``encode(params, model_state, views) -> (projections (N, D)
        L2-normalised, new_model_state)`` in training mode.
      views_of: ``views_of(images, example_index, aug_id) -> views``: the
        deterministic augmentation.
      table: (m, ...) the training set on device (uint8 or float), replicated;
        None for methods that never look up images by index.
      to_float: converts rows of ``table`` to the float inputs of ``views_of``.
      temperature: tau (beta = 1 / tau).
      num_examples: m.
      num_augmentations: 0 for fresh views every step, else the finite count.
      axis_name: the data-parallel axis.
      sampler_config: the ``config.sampler`` ConfigDict, read as a mapping.
      burn_in: EMC² burn-in proposals per anchor view (already resolved).
      paired: (b, ...) float second-modality inputs for CLIP, or None.
      carried_images: (b, ...) raw images (as stored in the dataset) of the
        EMC² chains' carried-over negatives, fetched by the host loop
        (``sampler.carried_images = "host"``), or None to read them from
        ``table`` inside the step.
    """

    images: Array
    example_index: Array
    aug_ids: Array
    model_state: PyTree
    sampler_state: PyTree
    key: Array
    encode: Callable[..., tuple[Array, PyTree]]
    views_of: Callable[[Array, Array, Array], Array]
    table: Array | None
    to_float: Callable[[Array], Array]
    temperature: float
    num_examples: int
    num_augmentations: int
    axis_name: str
    sampler_config: Any
    burn_in: int = 0
    paired: Array | None = None
    carried_images: Array | None = None


class ObjectiveOutput(NamedTuple):
    model_state: PyTree
    sampler_state: PyTree
    metrics: dict[str, Array]


class Method(NamedTuple):
    """A contrastive method: its sampler state and its per-device objective."""

    name: str
    # init_sampler(num_examples, sampler_config, embedding_dim) -> sampler state
    init_sampler: Callable[[int, Any, int], PyTree]
    objective: Callable[[PyTree, Context], tuple[Array, ObjectiveOutput]]
    needs_table: bool


# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------


def _all_gather(x: Array, axis_name: str) -> Array:
    return lax.all_gather(x, axis_name, tiled=True)


def _num_devices(axis_name: str) -> int:
    return lax.axis_size(axis_name)


def _encode_views(params, ctx: Context, extra: tuple[Array, ...] = ()):
    """Encodes the two views of the local batch plus ``extra`` inputs in one pass.

    Returns (z0 (b, D), z1 (b, D), [extra embeddings...], new_model_state).
    """
    views = [
        ctx.views_of(ctx.images, ctx.example_index, ctx.aug_ids[:, 0]),
        ctx.views_of(ctx.images, ctx.example_index, ctx.aug_ids[:, 1]),
        *extra,
    ]
    sizes = [v.shape[0] for v in views]
    z, model_state = ctx.encode(params, ctx.model_state, jnp.concatenate(views, axis=0))
    pieces = jnp.split(z, _offsets(sizes))
    return pieces[0], pieces[1], pieces[2:], model_state


def _offsets(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for size in sizes[:-1]:
        total += size
        out.append(total)
    return out


def _views_by_index(ctx: Context, index: Array, aug: Array) -> Array:
    """Re-creates the views ``(index, aug)`` from the on-device training set."""
    rows = ctx.table[jnp.clip(index, 0, ctx.num_examples - 1)]
    return ctx.views_of(ctx.to_float(rows), index, aug)


def _monitoring(z0: Array, z1: Array, temperature: float) -> dict[str, Array]:
    """In-batch NT-Xent and similarity statistics of the global batch (no gradient)."""
    z0, z1 = lax.stop_gradient(z0), lax.stop_gradient(z1)
    metrics = {"ntxent": jnp.mean(losses.ntxent(z0, z1, temperature=temperature))}
    metrics.update(losses.contrastive_metrics(z0, z1))
    return metrics


def _global_batch(ctx: Context, z0: Array, z1: Array):
    """All-gathers the views: columns (2B, D) = [Z0; Z1] with their (index, aug) ids."""
    gathered0 = _all_gather(z0, ctx.axis_name)
    gathered1 = _all_gather(z1, ctx.axis_name)
    index = _all_gather(ctx.example_index, ctx.axis_name)
    aug = _all_gather(ctx.aug_ids, ctx.axis_name)
    columns = jnp.concatenate([gathered0, gathered1], axis=0)
    column_index = jnp.concatenate([index, index])
    column_aug = jnp.concatenate([aug[:, 0], aug[:, 1]])
    return gathered0, gathered1, columns, column_index, column_aug


def _fresh_aug_ids(key: Array, shape: tuple[int, ...], num_augmentations: int) -> Array:
    high = num_augmentations if num_augmentations else _FRESH_AUG_RANGE
    return jax.random.randint(key, shape, 0, high, dtype=jnp.int32)


# ---------------------------------------------------------------------------
# In-batch methods: SimCLR, DCL, CLIP
# ---------------------------------------------------------------------------


def _in_batch_objective(loss_fn: Callable[..., Array]):
    def objective(params, ctx: Context):
        z0, z1, _, model_state = _encode_views(params, ctx)
        gathered0, gathered1, *_ = _global_batch(ctx, z0, z1)
        # Every device evaluates the same global loss L from the gathered
        # embeddings. The transpose of all_gather is a reduce-scatter that sums
        # the n identical cotangents, so device k's gradient is n times the
        # part of dL/dθ that flows through its own examples; the pmean of these
        # over the n devices is exactly dL/dθ. So L is not divided by n
        # (tests/test_train.py checks 8 devices against 1).
        value = jnp.mean(loss_fn(gathered0, gathered1, temperature=ctx.temperature))
        metrics = _monitoring(gathered0, gathered1, ctx.temperature)
        return value, ObjectiveOutput(model_state, ctx.sampler_state, metrics)

    return objective


def _no_sampler(num_examples: int, sampler_config: Any, embedding_dim: int) -> PyTree:
    del num_examples, sampler_config, embedding_dim
    return ()


# ---------------------------------------------------------------------------
# EMC²
# ---------------------------------------------------------------------------


def _emc2_objective(params, ctx: Context):
    """EMC² (Yau et al. 2024, Algorithm 1) on one device's share of the batch.

    1. Encode both views of the local examples and, in the same forward pass,
       each example's carried-over negative (the chain state from an earlier
       step, re-created from its (index, augmentation id)).
    2. Score the proposals under the current encoder (stop-gradient inside the
       sampler) and run the MH sweep: view 0's proposals, then view 1's.
    3. The estimator: for each anchor view, beta * (-∇s(u, v) + mean over its
       post-burn-in states of ∇s(u, state)), with fresh embeddings for
       in-batch states and for the carried-over state.
    """
    cfg = ctx.sampler_config
    beta = 1.0 / ctx.temperature
    carried_index, carried_aug, _ = emc2_sampler.carried_negatives(
        ctx.sampler_state, ctx.example_index
    )
    if ctx.carried_images is not None:  # Fetched by the host for this batch.
        carried_views = ctx.views_of(ctx.to_float(ctx.carried_images), carried_index, carried_aug)
    else:
        carried_views = _views_by_index(ctx, carried_index, carried_aug)
    extra = [carried_views]
    uniform = cfg.proposals == "uniform"
    if uniform:
        # One set of P candidates per example, shared by both anchor views: the
        # chain's state must be a column of every view's segment (see
        # emc2jax.samplers.emc2, "several views").
        b, p = ctx.example_index.shape[0], int(cfg.num_uniform_proposals)
        prop_index, prop_aug = emc2_sampler.uniform_proposals(
            jax.random.fold_in(ctx.key, 1),
            ctx.example_index,
            num_examples=ctx.num_examples,
            num_augmentations=ctx.num_augmentations or _FRESH_AUG_RANGE,
            num_proposals=p,
        )
        extra.append(_views_by_index(ctx, prop_index.reshape(-1), prop_aug.reshape(-1)))
    z0, z1, extras, model_state = _encode_views(params, ctx, tuple(extra))
    carried = extras[0]
    gathered0, gathered1, columns, column_index, column_aug = _global_batch(ctx, z0, z1)

    anchors = jnp.stack([z0, z1], axis=1)  # (b, 2, D)
    if uniform:
        candidates = extras[1].reshape(b, p, -1)
        sims = jnp.einsum("bvd,bpd->bvp", anchors, candidates)
        proposal_index, proposal_aug = prop_index, prop_aug  # (b, P): same for both views
        proposal_mask = None
    else:
        sims = jnp.einsum("bvd,cd->bvc", anchors, columns)  # (b, 2, 2B)
        proposal_index, proposal_aug = column_index, column_aug
        # Self and own positive are not negatives.
        proposal_mask = jnp.broadcast_to(
            column_index[None, None, :] != ctx.example_index[:, None, None], sims.shape
        )
    carried_sim = jnp.einsum("bvd,bd->bv", anchors, carried)  # (b, 2)
    sampler_state, out, info = emc2_sampler.step(
        jax.random.fold_in(ctx.key, 2),
        ctx.sampler_state,
        example_index=ctx.example_index,
        proposal_log_scores=beta * sims,
        proposal_index=proposal_index,
        proposal_aug=proposal_aug,
        proposal_mask=proposal_mask,
        burn_in=ctx.burn_in,
        carried_log_score=beta * carried_sim[:, 0] if cfg.refresh_score else None,
        axis_name=ctx.axis_name,
    )
    positive = jnp.sum(z0 * z1, axis=-1)
    negative_sim = jnp.concatenate([sims, carried_sim[..., None]], axis=-1)
    counts = jnp.concatenate([out.proposal_weights, out.carried_weights[..., None]], axis=-1)
    surrogate = losses.emc2_surrogate(
        jnp.concatenate([positive, positive]),
        jnp.concatenate([negative_sim[:, 0], negative_sim[:, 1]]),
        temperature=ctx.temperature,
        counts=jnp.concatenate([counts[:, 0], counts[:, 1]]),
    )
    metrics = _monitoring(gathered0, gathered1, ctx.temperature)
    metrics.update({f"sampler/{k}": v for k, v in info._asdict().items()})
    return jnp.mean(surrogate), ObjectiveOutput(model_state, sampler_state, metrics)


def _emc2_init(num_examples: int, sampler_config: Any, embedding_dim: int) -> PyTree:
    del sampler_config, embedding_dim
    return emc2_sampler.init(num_examples)


# ---------------------------------------------------------------------------
# SogCLR
# ---------------------------------------------------------------------------


def _sogclr_objective(params, ctx: Context):
    """SogCLR (Yuan et al. 2022): in-batch negatives reweighted by exp(beta s) / u_i."""
    beta = 1.0 / ctx.temperature
    z0, z1, _, model_state = _encode_views(params, ctx)
    gathered0, gathered1, columns, column_index, _ = _global_batch(ctx, z0, z1)
    anchors = jnp.concatenate([z0, z1], axis=0)  # (2b, D): both views anchor
    anchor_index = jnp.concatenate([ctx.example_index, ctx.example_index])
    sims = anchors @ columns.T  # (2b, 2B)
    mask = column_index[None, :] != anchor_index[:, None]
    sampler_state, out, info = sogclr_sampler.step(
        jax.random.fold_in(ctx.key, 2),
        ctx.sampler_state,
        example_index=anchor_index,
        negative_log_scores=beta * sims,
        negative_mask=mask,
        gamma=ctx.sampler_config.gamma,
        axis_name=ctx.axis_name,
    )
    positive = jnp.sum(z0 * z1, axis=-1)
    surrogate = losses.sogclr_surrogate(
        jnp.concatenate([positive, positive]),
        sims,
        out.weights,
        temperature=ctx.temperature,
        where=mask,
    )
    metrics = _monitoring(gathered0, gathered1, ctx.temperature)
    metrics.update({f"sampler/{k}": v for k, v in info._asdict().items()})
    return jnp.mean(surrogate), ObjectiveOutput(model_state, sampler_state, metrics)


def _sogclr_init(num_examples: int, sampler_config: Any, embedding_dim: int) -> PyTree:
    del sampler_config, embedding_dim
    return sogclr_sampler.init(num_examples)


# ---------------------------------------------------------------------------
# Exact global loss (small finite-augmentation datasets)
# ---------------------------------------------------------------------------


def _exact_objective(params, ctx: Context):
    """The global contrastive loss of the batch's anchors, with all m * n_aug views.

    For anchor view (i, a) with positive (i, a'): ``-beta s + log sum_{j != i, a''}
    exp(beta s(u, z_{j,a''}))`` — every negative of the dataset, encoded in
    this step with gradient. The oracle the samplers approximate; affordable
    only for small m * n_aug.
    """
    n_aug, m = ctx.num_augmentations, ctx.num_examples
    all_index = jnp.repeat(jnp.arange(m, dtype=jnp.int32), n_aug)
    all_aug = jnp.tile(jnp.arange(n_aug, dtype=jnp.int32), m)
    z0, z1, (z_all,), model_state = _encode_views(
        params, ctx, (_views_by_index(ctx, all_index, all_aug),)
    )
    gathered0, gathered1, *_ = _global_batch(ctx, z0, z1)
    beta = 1.0 / ctx.temperature
    anchors = jnp.concatenate([z0, z1])
    anchor_index = jnp.concatenate([ctx.example_index, ctx.example_index])
    logits = beta * anchors @ z_all.T  # (2b, m * n_aug)
    logits = jnp.where(all_index[None, :] == anchor_index[:, None], -jnp.inf, logits)
    positive = beta * jnp.sum(z0 * z1, axis=-1)
    loss = jax.nn.logsumexp(logits, axis=1) - jnp.concatenate([positive, positive])
    metrics = _monitoring(gathered0, gathered1, ctx.temperature)
    return jnp.mean(loss), ObjectiveOutput(model_state, ctx.sampler_state, metrics)


# ---------------------------------------------------------------------------
# CLIP: two towers
# ---------------------------------------------------------------------------


def _clip_objective(params, ctx: Context):
    """Symmetric CLIP loss between tower ``a`` on view 0 and tower ``b`` on view 1.

    ``params`` and the model state are ``{"a": ..., "b": ...}``. With paired
    data (a second modality under ``"paired"`` in the batch, see
    :class:`Context`) tower ``b`` encodes that instead of a second view.
    """
    first = ctx.views_of(ctx.images, ctx.example_index, ctx.aug_ids[:, 0])
    second = (
        ctx.paired
        if ctx.paired is not None
        else ctx.views_of(ctx.images, ctx.example_index, ctx.aug_ids[:, 1])
    )
    za, state_a = ctx.encode(params["a"], ctx.model_state["a"], first)
    zb, state_b = ctx.encode(params["b"], ctx.model_state["b"], second)
    gathered_a = _all_gather(za, ctx.axis_name)
    gathered_b = _all_gather(zb, ctx.axis_name)
    value = jnp.mean(losses.clip_loss(gathered_a, gathered_b, temperature=ctx.temperature))
    metrics = losses.contrastive_metrics(
        lax.stop_gradient(gathered_a), lax.stop_gradient(gathered_b)
    )
    metrics["clip_loss"] = lax.stop_gradient(value)
    output = ObjectiveOutput({"a": state_a, "b": state_b}, ctx.sampler_state, metrics)
    # Same global loss on every device: no 1/n, see _in_batch_objective.
    return value, output


# ---------------------------------------------------------------------------
# Embedding cache
# ---------------------------------------------------------------------------


def _cache_objective(params, ctx: Context):
    """Negative cache: K negatives per anchor view drawn from a stale m x d table.

    The draw is Gumbel-top-K over beta * s(u, C_j) (an exact sample of the
    softmax over the *stale* table); the drawn examples are re-encoded with
    gradient under a fresh augmentation, and the estimator is
    ``beta * (-∇s(u, v) + mean_k ∇s(u, n_k))``. The batch's rows are written
    back, plus ``refresh_fraction * m`` rows round-robin (shared out across
    devices, encoded without gradient).
    """
    cfg = ctx.sampler_config
    m, n = ctx.num_examples, _num_devices(ctx.axis_name)
    state = ctx.sampler_state
    z0, z1, _, model_state = _encode_views(params, ctx)
    gathered0, gathered1, *_ = _global_batch(ctx, z0, z1)

    # Round-robin refresh rows, padded to a multiple of the device count so
    # that every device encodes the same number of them.
    rows = cache_sampler.num_refresh_rows(m, cfg.refresh_fraction)
    refresh_index = refresh_embeddings = None
    if rows:
        per_device = -(-rows // n)
        all_rows = (state.cursor + jnp.arange(per_device * n, dtype=jnp.int32)) % m
        refresh_index = all_rows.reshape(n, per_device)[lax.axis_index(ctx.axis_name)]
        refresh_aug = _fresh_aug_ids(
            jax.random.fold_in(ctx.key, 3), (per_device,), ctx.num_augmentations
        )
        refresh_embeddings, _ = ctx.encode(
            params, model_state, _views_by_index(ctx, refresh_index, refresh_aug)
        )
        refresh_embeddings = lax.stop_gradient(refresh_embeddings)

    anchors = jnp.concatenate([z0, z1])
    anchor_index = jnp.concatenate([ctx.example_index, ctx.example_index])
    state, out, info = cache_sampler.step(
        jax.random.fold_in(ctx.key, 2),
        state,
        example_index=anchor_index,
        anchors=anchors,
        fresh_embeddings=anchors,
        num_negatives=int(cfg.num_negatives),
        temperature=ctx.temperature,
        refresh_index=refresh_index,
        refresh_embeddings=refresh_embeddings,
        axis_name=ctx.axis_name,
    )
    k = out.negative_index.shape[1]
    negative_aug = _fresh_aug_ids(
        jax.random.fold_in(ctx.key, 4), out.negative_index.shape, ctx.num_augmentations
    )
    negatives, model_state = ctx.encode(
        params,
        model_state,
        _views_by_index(ctx, out.negative_index.reshape(-1), negative_aug.reshape(-1)),
    )
    negative_sim = jnp.einsum("rd,rkd->rk", anchors, negatives.reshape(-1, k, negatives.shape[-1]))
    positive = jnp.sum(z0 * z1, axis=-1)
    surrogate = losses.emc2_surrogate(
        jnp.concatenate([positive, positive]),
        negative_sim,
        temperature=ctx.temperature,
        counts=out.valid,
    )
    metrics = _monitoring(gathered0, gathered1, ctx.temperature)
    metrics.update({f"sampler/{k}": v for k, v in info._asdict().items()})
    return jnp.mean(surrogate), ObjectiveOutput(model_state, state, metrics)


def _cache_init(num_examples: int, sampler_config: Any, embedding_dim: int) -> PyTree:
    del sampler_config
    return cache_sampler.init(num_examples, embedding_dim)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


METHODS: dict[str, Method] = {
    "simclr": Method("simclr", _no_sampler, _in_batch_objective(losses.ntxent), False),
    "dcl": Method("dcl", _no_sampler, _in_batch_objective(losses.dcl), False),
    "clip": Method("clip", _no_sampler, _clip_objective, False),
    "emc2": Method("emc2", _emc2_init, _emc2_objective, True),
    "sogclr": Method("sogclr", _sogclr_init, _sogclr_objective, False),
    "embedding_cache": Method("embedding_cache", _cache_init, _cache_objective, True),
    "exact": Method("exact", _no_sampler, _exact_objective, True),
}
