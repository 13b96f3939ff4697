"""Evaluation: features, linear probe, kNN, exact global contrastive loss.

All metrics come back as flat ``dict[str, float]`` with ``/``-namespaced keys
(``"linear_probe/top1"``, ``"knn/top1_k200"``, ``"exact/grad_norm_sq"``), ready
for a metric writer.

- :func:`extract_features`: frozen-encoder features over an array or a data
  source, in jit-compiled fixed-size chunks (the last one padded, so one
  compile), one chunk on the device at a time.
- :func:`linear_probe`: multinomial logistic regression on standardised
  features, full-batch L-BFGS (optax), weight decay picked on a held-out part
  of the train split (the grid is fit in one vmapped solve), then refit.
- :func:`knn_accuracy`: the weighted kNN of Wu et al. 2018 (cosine similarity,
  votes ``exp(s / T)``), the usual 200-NN protocol.
- :func:`exact_global_loss_and_grad`: the global contrastive loss (design.md,
  "GCL") on a finite-augmentation dataset and its exact gradient: the oracle
  of the EMC² paper's gradient-norm figure.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from emc2jax.losses import l2_normalize

__all__ = [
    "exact_global_loss",
    "exact_global_loss_and_grad",
    "extract_features",
    "knn_accuracy",
    "linear_probe",
]

Array = jax.Array
PyTree = Any


# ----------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------


def extract_features(
    feature_fn: Callable[[Array], Array],
    images: np.ndarray | Any,
    *,
    batch_size: int,
    key: str = "image",
) -> np.ndarray:
    """``feature_fn`` over all examples, in chunks of ``batch_size``.

    Args:
      feature_fn: maps a (batch_size, ...) batch, exactly as stored (uint8
        images stay uint8: convert inside, e.g. with ``augment.to_float``, so
        the host sends 4x fewer bytes), to (batch_size, d) features. It is
        jit-compiled once.
      images: (n, ...) array, or a random-access source (its ``key`` feature).
      batch_size: chunk size; the last chunk is padded (with its last row)
        to this size and the padding's features dropped.
      key: the feature to read from a source.

    Returns:
      (n, d) NumPy features, in the input's order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    n = len(images)
    if n == 0:
        raise ValueError("no examples to extract features from")
    is_array = isinstance(images, np.ndarray | jax.Array)
    if not is_array:
        from emc2jax.data.pipeline import gather  # Lazy: keeps grain out of array use.

    jitted = jax.jit(feature_fn)
    chunks = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if is_array:
            batch = np.asarray(images[start:stop])
        else:
            batch = gather(images, np.arange(start, stop))[key]
        if stop - start < batch_size:
            fill = np.repeat(batch[-1:], batch_size - (stop - start), axis=0)
            batch = np.concatenate([batch, fill])
        chunks.append(np.asarray(jitted(batch))[: stop - start])
    return np.concatenate(chunks)


# ----------------------------------------------------------------------------
# Linear probe
# ----------------------------------------------------------------------------


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    # Constant features (dead units) would divide by zero: leave them at 0.
    std = np.where(std > 1e-6 * max(float(std.max()), 1e-30), std, 1.0)
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("num_classes", "max_steps"))
def _fit_logreg(
    x: Array,
    y: Array,
    sample_weight: Array,
    weight_decay: Array,
    *,
    num_classes: int,
    max_steps: int,
    tol: Array,
) -> dict[str, Array]:
    """Weighted multinomial logistic regressions, one per row of the (w, n)
    ``sample_weight`` and (w,) ``weight_decay``, solved in one vmapped L-BFGS.

    Minimises ``sum_n s_n CE_n / sum_n s_n + wd/2 ||W||^2`` (bias not
    decayed) until ``||grad|| < tol`` or ``max_steps``.
    """
    d = x.shape[1]
    labels = jax.nn.one_hot(y, num_classes)

    def fit_one(weights: Array, wd: Array) -> dict[str, Array]:
        def objective(params: dict[str, Array]) -> Array:
            ce = optax.softmax_cross_entropy(x @ params["w"] + params["b"], labels)
            return jnp.sum(weights * ce) / jnp.sum(weights) + 0.5 * wd * jnp.sum(params["w"] ** 2)

        opt = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(objective)

        def cond(carry):
            step, _, _, grad_norm = carry
            return (step < max_steps) & (grad_norm > tol)

        def body(carry):
            step, params, state, _ = carry
            value, grad = value_and_grad(params, state=state)
            updates, state = opt.update(
                grad, state, params, value=value, grad=grad, value_fn=objective
            )
            return step + 1, optax.apply_updates(params, updates), state, optax.tree.norm(grad)

        params = {"w": jnp.zeros((d, num_classes)), "b": jnp.zeros((num_classes,))}
        init = (jnp.asarray(0), params, opt.init(params), jnp.asarray(jnp.inf))
        return lax.while_loop(cond, body, init)[1]

    return jax.vmap(fit_one)(sample_weight, weight_decay)


def _accuracy(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(w, n) correctness of each of a stack of (w,) parameter sets."""
    logits = np.einsum("nd,wdk->wnk", x, params["w"]) + params["b"][:, None]
    return logits.argmax(-1) == y[None]


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    num_classes: int,
    seed: int = 0,
    weight_decays: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
    holdout_fraction: float = 0.2,
    max_steps: int = 500,
    tol: float = 1e-5,
) -> dict[str, float]:
    """Top-1 accuracy of a multinomial logistic regression on frozen features.

    Features are standardised with the train statistics. Each weight decay of
    the grid is fit on a random ``1 - holdout_fraction`` of the train split;
    the one with the best held-out accuracy (ties: the larger decay) is refit
    on the whole train split and scored on the test split. The grid's fits and
    refits run as ONE vmapped full-batch L-BFGS solve (the held-out rows get
    sample weight 0), so a probe compiles once; the refits of the decays not
    chosen are wasted, but cheap next to a compile. The (n, d) features sit on
    the device: fine up to ~1e5 x 2048.

    Args:
      train_x, test_x: (n, d), (n_test, d) features.
      train_y, test_y: (n,), (n_test,) int labels in ``[0, num_classes)``.
      seed: seed of the held-out split.
      weight_decays: the L2 penalty grid.
      max_steps, tol: L-BFGS stops at ``max_steps`` or ``||grad|| < tol``.

    Returns:
      ``linear_probe/top1`` (test), ``linear_probe/train_top1``,
      ``linear_probe/holdout_top1`` (of the chosen decay),
      ``linear_probe/weight_decay``.
    """
    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    train_y, test_y = np.asarray(train_y, np.int32), np.asarray(test_y, np.int32)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be (n, d) alike, got {train_x.shape}, {test_x.shape}")
    if train_y.shape != train_x.shape[:1] or test_y.shape != test_x.shape[:1]:
        raise ValueError(
            f"labels {train_y.shape}, {test_y.shape} do not match features "
            f"{train_x.shape}, {test_x.shape}"
        )
    for y in (train_y, test_y):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    n = len(train_x)
    n_holdout = int(round(holdout_fraction * n))
    if not 0 < holdout_fraction < 1 or not 0 < n_holdout < n:
        raise ValueError(f"{n} train examples cannot be split with {holdout_fraction=}")
    if not weight_decays or min(weight_decays) < 0:
        raise ValueError(f"weight_decays={tuple(weight_decays)} must be non-empty and >= 0")

    holdout = np.zeros(n, bool)
    holdout[np.random.default_rng(seed).permutation(n)[:n_holdout]] = True
    tx, sx = _standardize(train_x, test_x)
    grid = np.asarray(weight_decays, np.float32)
    g = len(grid)
    # Rows 0..g-1: fit without the held-out part; rows g..2g-1: refit on all.
    sample_weight = np.concatenate([np.tile(~holdout, (g, 1)), np.ones((g, n), bool)])
    params = _fit_logreg(
        tx,
        train_y,
        sample_weight.astype(np.float32),
        np.tile(grid, 2),
        num_classes=num_classes,
        max_steps=max_steps,
        tol=jnp.float32(tol),
    )
    params = jax.device_get(params)
    holdout_acc = _accuracy(params, tx[holdout], train_y[holdout])[:g].mean(-1)
    best = max(range(g), key=lambda i: (holdout_acc[i], grid[i]))
    final = jax.tree.map(lambda p: p[g + best : g + best + 1], params)
    return {
        "linear_probe/top1": float(_accuracy(final, sx, test_y).mean()),
        "linear_probe/train_top1": float(_accuracy(final, tx, train_y).mean()),
        "linear_probe/holdout_top1": float(holdout_acc[best]),
        "linear_probe/weight_decay": float(weight_decays[best]),
    }


# ----------------------------------------------------------------------------
# kNN
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("ks", "num_classes"))
def _knn_predict(
    query: Array,
    bank: Array,
    bank_labels: Array,
    *,
    ks: tuple[int, ...],
    num_classes: int,
    temperature: float,
) -> Array:
    """(c, d) normalised queries -> (len(ks), c) predicted labels."""
    sims = query @ bank.T  # (c, n) cosine similarities.
    top_sims, top_idx = lax.top_k(sims, max(ks))
    votes = (
        jax.nn.one_hot(bank_labels[top_idx], num_classes)
        * jnp.exp(
            (top_sims - 1.0) / temperature  # exp(s/T) up to a constant: no overflow.
        )[..., None]
    )
    cumulative = jnp.cumsum(votes, axis=1)  # (c, kmax, classes): votes of the top k.
    return jnp.stack([jnp.argmax(cumulative[:, k - 1], axis=-1) for k in ks])


def knn_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    num_classes: int,
    ks: Sequence[int] = (1, 10, 200),
    temperature: float = 0.07,
    chunk_size: int = 256,
) -> dict[str, float]:
    """Weighted kNN top-1 accuracy (Wu et al. 2018, the 200-NN protocol).

    Each test feature's ``k`` most cosine-similar train features vote for
    their labels with weight ``exp(s / temperature)``; the most voted label is
    the prediction (ties: the smallest label). ``k`` larger than the train set
    is clamped to its size (the key keeps the requested ``k``).

    Args:
      train_x, test_x: (n, d), (n_test, d) features (normalised here).
      train_y, test_y: (n,), (n_test,) int labels in ``[0, num_classes)``.
      chunk_size: test rows per similarity block ((chunk_size, n) on device).

    Returns:
      ``knn/top1_k{k}`` for each ``k``.
    """
    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    train_y, test_y = np.asarray(train_y, np.int32), np.asarray(test_y, np.int32)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be (n, d) alike, got {train_x.shape}, {test_x.shape}")
    if train_y.shape != train_x.shape[:1] or test_y.shape != test_x.shape[:1]:
        raise ValueError("labels must have one entry per feature row")
    if not ks or min(ks) < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(
            f"need ks >= 1, temperature > 0, chunk_size >= 1: {ks=}, {temperature=}, {chunk_size=}"
        )
    n, n_test = len(train_x), len(test_x)
    clamped = tuple(min(k, n) for k in ks)
    bank = l2_normalize(jnp.asarray(train_x))
    bank_labels = jnp.asarray(train_y)
    queries = np.asarray(l2_normalize(test_x))
    predictions = []
    for start in range(0, n_test, chunk_size):
        chunk = queries[start : start + chunk_size]
        pad = chunk_size - len(chunk)
        chunk = np.pad(chunk, ((0, pad), (0, 0)))  # One compile for every chunk.
        pred = _knn_predict(
            chunk,
            bank,
            bank_labels,
            ks=clamped,
            num_classes=num_classes,
            temperature=temperature,
        )
        predictions.append(np.asarray(pred)[:, : chunk_size - pad])
    correct = np.concatenate(predictions, axis=1) == test_y[None]
    return {f"knn/top1_k{k}": float(acc) for k, acc in zip(ks, correct.mean(1), strict=True)}


# ----------------------------------------------------------------------------
# Exact global contrastive loss on a finite-augmentation dataset
# ----------------------------------------------------------------------------


def _tree_sum(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


@functools.partial(jax.jit, static_argnames=("apply_fn", "chunk_size"))
def _exact_global_loss_and_grad(
    apply_fn: Callable[[PyTree, Array], Array],
    params: PyTree,
    views: Array,
    temperature: Array,
    *,
    chunk_size: int,
) -> tuple[Array, PyTree]:
    m, n_aug = views.shape[:2]
    total = m * n_aug
    num_chunks = -(-total // chunk_size)
    padded = num_chunks * chunk_size
    flat = views.reshape(total, *views.shape[2:])
    flat = jnp.concatenate([flat, jnp.zeros((padded - total, *flat.shape[1:]), flat.dtype)])
    chunks = flat.reshape(num_chunks, chunk_size, *flat.shape[1:])

    def embed(p: PyTree, x: Array) -> Array:
        return l2_normalize(apply_fn(p, x))

    # 1. All m * n_aug embeddings, no gradient (chunked: one encoder batch at
    #    a time on the device).
    z = lax.map(functools.partial(embed, params), chunks).reshape(padded, -1)

    # 2. The loss as a function of the embeddings and its gradient dL/dz,
    #    anchor block by anchor block. Rematerialised: the backward pass
    #    recomputes each (chunk, padded) logit block instead of storing all.
    view_id = jnp.arange(padded)
    example_id = view_id // n_aug
    valid = view_id < total
    beta = 1.0 / temperature

    def loss_of_z(z: Array) -> Array:
        @jax.checkpoint
        def block(rows: Array) -> Array:
            logits = beta * (z[rows] @ z.T)  # (chunk, padded)
            same = example_id[rows][:, None] == example_id[None, :]
            negative = ~same & valid[None, :]
            positive = same & (rows[:, None] != view_id[None, :]) & valid[None, :]
            lse = jax.nn.logsumexp(jnp.where(negative, logits, -jnp.inf), axis=1)
            pos = jnp.sum(jnp.where(positive, logits, 0.0), axis=1) / (n_aug - 1)
            return jnp.sum(jnp.where(valid[rows], lse - pos, 0.0))

        rows = view_id.reshape(num_chunks, chunk_size)
        return jnp.sum(lax.map(block, rows)) / total

    loss, dz = jax.value_and_grad(loss_of_z)(z)

    # 3. Chain rule through the encoder, chunk by chunk: sum_c J_c^T dz_c.
    def backprop(grads: PyTree, inputs: tuple[Array, Array]) -> tuple[PyTree, None]:
        x, dz_chunk = inputs
        _, vjp = jax.vjp(lambda p: embed(p, x), params)
        return _tree_sum(grads, vjp(dz_chunk)[0]), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = lax.scan(backprop, zeros, (chunks, dz.reshape(num_chunks, chunk_size, -1)))
    return loss, grads


def exact_global_loss_and_grad(
    apply_fn: Callable[[PyTree, Array], Array],
    params: PyTree,
    views: jax.typing.ArrayLike,
    *,
    temperature: float,
    chunk_size: int = 256,
) -> tuple[Array, PyTree]:
    r"""The global contrastive loss of a finite-augmentation dataset, exactly.

    With ``m`` examples, ``n_aug`` fixed views each, ``z_{i,a}`` the
    L2-normalised embedding of view ``a`` of example ``i`` and
    ``beta = 1 / temperature`` (design.md, "GCL"; EMC² paper Figure 2 setting):

    .. math::

       L(\theta) = \frac{1}{m n} \sum_{i, a} \Big[
         -\frac{\beta}{n - 1} \sum_{a' \ne a} \langle z_{i,a}, z_{i,a'} \rangle
         + \log \sum_{j \ne i} \sum_{a''} \exp(\beta \langle z_{i,a}, z_{j,a''} \rangle)
       \Big]

    every view is an anchor, its positives are the other views of its example
    (for ``n_aug = 2``, the one other view), its negatives all ``(m - 1) n``
    views of the other examples. The gradient is exact: all ``m n`` views are
    encoded (``chunk_size`` at a time), ``dL/dz`` is computed on the
    embeddings, then pulled back through the encoder chunk by chunk, so the
    memory is one encoder chunk plus a (chunk_size, m n) logit block.

    Args:
      apply_fn: ``apply_fn(params, x) -> (c, d)`` raw embeddings of a (c, ...)
        batch (normalised here). Static under jit: pass the same function
        object each call to avoid recompiling.
      params: pytree of parameters.
      views: (m, n_aug, ...) views (``augment.finite_views``); ``n_aug >= 2``.
      temperature: ``tau``.
      chunk_size: encoder batch and anchor block size.

    Returns:
      ``(loss, grads)``: scalar float32 loss, gradient pytree like ``params``.
    """
    views = jnp.asarray(views)
    if views.ndim < 3 or views.shape[1] < 2 or views.shape[0] < 2:
        raise ValueError(
            f"views must be (m, n_aug, ...) with m >= 2 examples and n_aug >= 2 views "
            f"each, got {views.shape}"
        )
    if temperature <= 0 or chunk_size < 1:
        raise ValueError(f"need temperature > 0 and chunk_size >= 1: {temperature=}, {chunk_size=}")
    chunk_size = min(chunk_size, views.shape[0] * views.shape[1])
    return _exact_global_loss_and_grad(
        apply_fn, params, views, jnp.float32(temperature), chunk_size=chunk_size
    )


def exact_global_loss(
    apply_fn: Callable[[PyTree, Array], Array],
    params: PyTree,
    views: jax.typing.ArrayLike,
    *,
    temperature: float,
    chunk_size: int = 256,
) -> dict[str, float]:
    """:func:`exact_global_loss_and_grad` as metrics.

    Returns:
      ``exact/global_loss`` and ``exact/grad_norm_sq`` (``||grad L||^2`` over
      all parameters, the EMC² paper's stationarity measure).
    """
    loss, grads = exact_global_loss_and_grad(
        apply_fn, params, views, temperature=temperature, chunk_size=chunk_size
    )
    return {
        "exact/global_loss": float(loss),
        "exact/grad_norm_sq": float(optax.tree.norm(grads, squared=True)),
    }
