"""The train state, the pure train step, and ``train_and_evaluate(config, workdir)``.

``TrainState`` is a pytree of arrays only (step, params, optimizer state, model
state, sampler state): the checkpoint is exactly the state. The functions that
act on it (model apply, optax transform, the method's objective) are closed
over when the step is built, and the step key is ``fold_in(key(seed), step)``,
so a restored state continues bit-identically.

The per-device step (:func:`make_train_step`) is written with named-axis
collectives over ``"data"``; :mod:`emc2jax.parallel` drives it with
``jax.jit(jax.shard_map(...))`` (default) or ``jax.pmap``.
:func:`build_trainer` assembles a config's model, optimizer, initial state and
step in one call: what the loop, the benchmarks and the tests drive.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from emc2jax import checkpoint as checkpoint_lib
from emc2jax import config as config_lib
from emc2jax import evaluate, methods, models, optim, parallel
from emc2jax.data import augment, pipeline, sources
from emc2jax.samplers import emc2 as emc2_sampler

Array = jax.Array
PyTree = Any
Metrics = dict[str, Array]


class TrainState(NamedTuple):
    """Everything that changes during training; arrays only.

    Attributes:
      step: () int32, the number of updates applied.
      params: model parameters (float32).
      opt_state: optax state.
      model_state: non-trainable model variables (batch statistics), possibly empty.
      sampler_state: the method's sampler state (EMC² chains, SogCLR averages,
        the embedding cache), replicated on every device; () if none.
    """

    step: Array
    params: PyTree
    opt_state: PyTree
    model_state: PyTree
    sampler_state: PyTree


# step(state, batch, table) -> (state, metrics), on one device (see make_train_step).
TrainStep = Callable[[TrainState, dict[str, Array], Array | None], tuple[TrainState, Metrics]]


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite metric; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------
# Building blocks chosen by the config
# ---------------------------------------------------------------------------


def get_method(name: str) -> methods.Method:
    """The :class:`emc2jax.methods.Method` called ``name``."""
    return methods.METHODS[name]


AUGMENTATIONS = {
    "digits": lambda size: augment.digits_preset(),
    "simclr": augment.simclr_preset,
    "stl10": augment.stl10_preset,
    "identity": augment.identity,
}


def augmentation_config(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]):
    """The on-device augmentation for ``config.dataset.augmentation``."""
    size = config.dataset.image_size or image_shape[0]
    return AUGMENTATIONS[config.dataset.augmentation](size)


def augment_key(config: ml_collections.ConfigDict) -> Array:
    """The key every view derives from: view (i, a) uses ``fold_in(fold_in(k, i), a)``."""
    return jax.random.fold_in(jax.random.key(config.seed), 0x5EED)


def augmentation_ids(
    key: Array, step: Array, example_index: Array, num_augmentations: int
) -> Array:
    """(b, 2) augmentation ids of the two views of each example.

    Finite augmentations: two distinct ids drawn from ``0..n_aug-1`` per example
    (randomness from ``fold_in(key, example_index)``). Otherwise fresh ids
    ``2 * step`` and ``2 * step + 1``: unique per step, and a view is a
    deterministic function of (seed, example, id), so a stored id re-creates
    exactly the same view later.
    """
    if not num_augmentations:
        first = (2 * step).astype(jnp.int32)
        ids = jnp.stack([first, first + 1])
        return jnp.broadcast_to(ids, (example_index.shape[0], 2))

    def draw(index):
        k0, k1 = jax.random.split(jax.random.fold_in(key, index))
        a0 = jax.random.randint(k0, (), 0, num_augmentations)
        a1 = (a0 + 1 + jax.random.randint(k1, (), 0, num_augmentations - 1)) % num_augmentations
        return jnp.stack([a0, a1]).astype(jnp.int32)

    return jax.vmap(draw)(example_index)


def make_train_step(
    config: ml_collections.ConfigDict,
    *,
    model: models.FunctionalModel,
    optimizer: optax.GradientTransformation,
    schedule: Callable[[Array], Array],
    augment_config: Any,
    num_examples: int,
    axis_name: str = parallel.DATA_AXIS,
) -> TrainStep:
    """Builds the per-device step ``step(state, batch, table) -> (state, metrics)``.

    ``batch`` holds this device's ``"image"`` (b, ...) and ``"index"`` (b,);
    ``table`` is the whole training set (m, ...) replicated on every device
    (methods that re-encode examples by index need it; None otherwise).
    Metrics are replicated scalars (a flat dict).
    """
    method = get_method(config.method)
    seed_key = jax.random.key(config.seed)
    views_key = augment_key(config)
    num_augmentations = int(config.dataset.num_augmentations)
    burn_in = 0
    if config.method == "emc2":
        burn_in = config_lib.burn_in_count(
            config.sampler.burn_in, config_lib.num_proposals_per_anchor(config)
        )

    def encode(params, model_state, views):
        embeddings, new_state = model.apply(params, model_state, views, train=True)
        return embeddings.projection, new_state

    def views_of(images, example_index, aug_id):
        return augment.augment_views(views_key, images, example_index, aug_id, augment_config)

    def step(state: TrainState, batch: dict[str, Array], table: Array | None):
        key = jax.random.fold_in(seed_key, state.step)
        example_index = batch["index"].astype(jnp.int32)
        ctx = methods.Context(
            images=augment.to_float(batch["image"]),
            example_index=example_index,
            aug_ids=augmentation_ids(key, state.step, example_index, num_augmentations),
            model_state=state.model_state,
            sampler_state=state.sampler_state,
            key=key,
            encode=encode,
            views_of=views_of,
            table=table,
            to_float=augment.to_float,
            temperature=float(config.temperature),
            num_examples=num_examples,
            num_augmentations=num_augmentations,
            axis_name=axis_name,
            sampler_config=config.sampler,
            burn_in=burn_in,
            carried_images=batch.get("carried_image"),
        )
        (value, out), grads = jax.value_and_grad(method.objective, has_aux=True)(state.params, ctx)
        grads = lax.pmean(grads, axis_name)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "objective": lax.pmean(value, axis_name),
            "learning_rate": schedule(state.step),
            "grad_norm": optax.tree.norm(grads),  # optax.global_norm is deprecated
            "param_norm": optax.tree.norm(params),
            **out.metrics,
        }
        new_state = TrainState(
            state.step + 1, params, opt_state, out.model_state, out.sampler_state
        )
        return new_state, metrics

    return step


# ---------------------------------------------------------------------------
# State creation
# ---------------------------------------------------------------------------


def build_model(
    config: ml_collections.ConfigDict, image_shape: tuple[int, ...]
) -> tuple[models.FunctionalModel, PyTree, PyTree]:
    """The functional model and its initial (params, model_state).

    For ``clip`` there are two towers of the same architecture: params and
    model state become ``{"a": ..., "b": ...}`` and the returned model applies
    either (the objective picks the tower).
    """

    def one(seed):
        module = models.build_model(
            config.model, input_shape=image_shape, rngs_seed=seed, axis_name=parallel.DATA_AXIS
        )
        return models.functionalize(module)

    model, params, model_state = one(config.seed)
    if config.method == "clip":
        _, params_b, state_b = one(config.seed + 1)
        params, model_state = {"a": params, "b": params_b}, {"a": model_state, "b": state_b}
    return model, params, model_state


def embedding_dim(
    model: models.FunctionalModel, params: PyTree, model_state: PyTree, image_shape
) -> int:
    """D, the projection's width (by shape inference, nothing is computed)."""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    out = jax.eval_shape(
        lambda p, s, x: model.apply(p, s, x, train=False)[0].projection, params, model_state, x
    )
    return int(out.shape[-1])


def create_state(
    config: ml_collections.ConfigDict,
    *,
    model: models.FunctionalModel,
    params: PyTree,
    model_state: PyTree,
    optimizer: optax.GradientTransformation,
    num_examples: int,
    image_shape: tuple[int, ...],
) -> TrainState:
    """The initial train state (step 0) for ``config``."""
    method = get_method(config.method)
    dim = 0
    if config.method == "embedding_cache":
        dim = embedding_dim(model, params, model_state, image_shape)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        model_state=model_state,
        sampler_state=method.init_sampler(num_examples, config.sampler, dim),
    )


class Trainer(NamedTuple):
    """A config's training pieces, built once (:func:`build_trainer`); nothing placed on devices.

    Attributes:
      model: the functional model, ``apply(params, model_state, x, train=...)``
        on (b, *image_shape) images; evaluation and restored states use it too.
      optimizer: the configured optax transformation.
      schedule: step -> () learning rate; only logged (the optimizer has its own).
      state: the step-0 :class:`TrainState`, on the host and unreplicated; it is
        also the ``abstract_state`` a checkpoint is restored into.
      train_step: the per-device step ``(state, batch, table) -> (state, metrics)``
        of :func:`make_train_step`, for :func:`emc2jax.parallel.data_parallel`.
    """

    model: models.FunctionalModel
    optimizer: optax.GradientTransformation
    schedule: Callable[[Array], Array]
    state: TrainState
    train_step: TrainStep


def build_trainer(
    config: ml_collections.ConfigDict, *, image_shape: tuple[int, ...], num_examples: int
) -> Trainer:
    """The model, optimizer, initial state and per-device step that ``config`` describes.

    What :func:`train_and_evaluate` trains, for loops and benchmarks of their
    own. ``image_shape`` is one example's (h, w, c) as stored (uint8);
    ``num_examples`` is m, the training-set size the samplers' per-example
    state is sized by. Builds closures and initial arrays only: nothing is
    compiled until the step is driven (:func:`emc2jax.parallel.data_parallel`).
    """
    model, params, model_state = build_model(config, image_shape)
    optimizer, schedule = optim.make_optimizer(config.optimizer, total_steps=config.total_steps)
    state = create_state(
        config,
        model=model,
        params=params,
        model_state=model_state,
        optimizer=optimizer,
        num_examples=num_examples,
        image_shape=image_shape,
    )
    train_step = make_train_step(
        config,
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        augment_config=augmentation_config(config, image_shape),
        num_examples=num_examples,
    )
    return Trainer(model, optimizer, schedule, state, train_step)


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


class _MetricsWriter:
    """``metrics.jsonl`` (one JSON object per logged step) plus TensorBoard events."""

    def __init__(self, workdir: pathlib.Path, *, enabled: bool):
        self.path = workdir / "metrics.jsonl"
        self._enabled = enabled
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self._enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in metrics.items():
            self._tb.add_scalar(name, float(value), int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _check_finite(step: int, metrics: dict[str, float], checkpoint_dir: pathlib.Path) -> None:
    bad = [name for name, value in metrics.items() if not np.isfinite(value)]
    if bad:
        raise NonFiniteError(
            f"non-finite {', '.join(f'{n}={metrics[n]}' for n in bad)} at step {step}; training "
            f"stopped. The last good checkpoint (if any) is intact in {checkpoint_dir}."
        )


def evaluate_model(
    config: ml_collections.ConfigDict,
    *,
    model: models.FunctionalModel,
    params: PyTree,
    model_state: PyTree,
) -> dict[str, float]:
    """Linear probe and kNN accuracy of the frozen features (before the head)."""
    data_dir = config.dataset.data_dir
    train = sources.load_source(
        config.dataset.name, config.dataset.eval_train_split, data_dir=data_dir
    )
    test = sources.load_source(
        config.dataset.name, config.dataset.eval_test_split, data_dir=data_dir
    )
    if config.method == "clip":  # Evaluate tower a.
        params, model_state = params["a"], model_state["a"]
    # Off the training mesh: evaluation runs on one device, chunk by chunk.
    params, model_state = jax.device_get((params, model_state))
    features_fn = jax.jit(lambda x: model.features(params, model_state, augment.to_float(x)))
    train_x = evaluate.extract_features(features_fn, train, batch_size=config.eval.batch_size)
    test_x = evaluate.extract_features(features_fn, test, batch_size=config.eval.batch_size)
    train_y = pipeline.to_device_array(train, key="label")
    test_y = pipeline.to_device_array(test, key="label")
    num_classes = sources.get_spec(config.dataset.name).num_classes
    results: dict[str, float] = {}
    results.update(
        evaluate.knn_accuracy(
            train_x, train_y, test_x, test_y, ks=tuple(config.eval.knn_ks), num_classes=num_classes
        )
    )
    results["knn_accuracy"] = results[f"knn/top1_k{config.eval.knn_ks[0]}"]
    if config.eval.linear_probe:
        results.update(
            evaluate.linear_probe(
                train_x, train_y, test_x, test_y, num_classes=num_classes, seed=config.seed
            )
        )
        results["linear_probe_accuracy"] = results["linear_probe/top1"]
    if config.eval.global_loss:
        results.update(
            global_loss_metrics(config, model=model, params=params, model_state=model_state)
        )
    return results


def global_loss_metrics(
    config: ml_collections.ConfigDict,
    *,
    model: models.FunctionalModel,
    params: PyTree,
    model_state: PyTree,
) -> dict[str, float]:
    """Exact global contrastive loss and ||∇L||² over all m * n_aug training views.

    The EMC² paper's stationarity measure (its Figure 2), on the
    finite-augmentation training set the run optimises.
    """
    source = sources.load_source(
        config.dataset.name, config.dataset.train_split, data_dir=config.dataset.data_dir
    )
    images = augment.to_float(pipeline.to_device_array(source, key="image"))
    image_shape = tuple(images.shape[1:])
    views = augment.finite_views(
        augment_key(config),
        images,
        jnp.arange(images.shape[0]),
        n_aug=int(config.dataset.num_augmentations),
        config=augmentation_config(config, image_shape),
    )
    return evaluate.exact_global_loss(
        _projection_fn(model, model_state),
        params,
        views,
        temperature=float(config.temperature),
        chunk_size=config.eval.batch_size,
    )


def _projection_fn(model: models.FunctionalModel, model_state: PyTree):
    def apply(params, x):
        return model.apply(params, model_state, x, train=False)[0].projection

    return apply


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> dict[str, float]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluates.

    Writes ``workdir/metrics.jsonl``, TensorBoard events in
    ``workdir/tensorboard`` and checkpoints in ``workdir/checkpoints``. Returns
    the final evaluation metrics (``linear_probe_accuracy``, ``knn_accuracy``...).
    Raises :class:`emc2jax.config.ConfigError` for a bad config and
    :class:`emc2jax.data.sources.DatasetNotPreparedError` for a missing dataset,
    both before anything is compiled; :class:`NonFiniteError` if training diverges.
    """
    workdir = pathlib.Path(workdir)
    mesh = parallel.make_data_mesh()
    num_devices = mesh.devices.size
    config_lib.validate_config(config, num_devices=num_devices)
    is_lead = jax.process_index() == 0

    # Data first: a missing dataset or a bad name or split fails here, before
    # any compile. The evaluation splits are opened now too (opening is lazy
    # and cheap), or a typo in one would surface only after training.
    try:
        source, *_ = (
            sources.load_source(config.dataset.name, split, data_dir=config.dataset.data_dir)
            for split in (
                config.dataset.train_split,
                config.dataset.eval_train_split,
                config.dataset.eval_test_split,
            )
        )
    except ValueError as error:  # Unknown dataset or split: a config error.
        raise config_lib.ConfigError(f"dataset: {error}") from None
    num_examples = len(source)
    if num_examples < config.batch_size:
        raise config_lib.ConfigError(
            f"batch_size={config.batch_size} exceeds the {num_examples} training examples of "
            f"{config.dataset.name}:{config.dataset.train_split}."
        )
    method = get_method(config.method)
    carried_from_host = config.method == "emc2" and config.sampler.carried_images == "host"
    table = None
    if method.needs_table and not carried_from_host:
        table = pipeline.to_device_array(source, key="image")
    image_shape = tuple(np.asarray(source[0]["image"]).shape)

    trainer = build_trainer(config, image_shape=image_shape, num_examples=num_examples)
    model, state = trainer.model, trainer.state
    dataset = pipeline.make_dataset(
        source,
        global_batch_size=config.batch_size,
        seed=config.seed,
        worker_count=config.dataset.worker_count,
    )
    iterator = iter(dataset)

    checkpoints = None
    if config.checkpoint_every_steps:
        checkpoints = checkpoint_lib.Checkpointer(
            workdir / "checkpoints", max_to_keep=config.keep_checkpoints
        )
        if checkpoints.latest_step() is not None:
            # Refuses a checkpoint of another config before reading any array.
            restored = checkpoints.restore(abstract_state=state, config=config)
            state = restored.state
            iterator.set_state(restored.data_iterator_state)
    start_step = int(state.step)

    train_step = parallel.data_parallel(
        trainer.train_step, mesh=mesh, backend=config.parallel_backend, num_replicated_args=1
    )
    state = parallel.replicate(state, mesh)
    if table is not None:
        table = parallel.replicate(jnp.asarray(table), mesh)

    fetch_carried = _host_carried_fetcher(source) if carried_from_host else None

    workdir.mkdir(parents=True, exist_ok=True)
    writer = _MetricsWriter(workdir, enabled=is_lead)
    progress = _progress_bar(config.total_steps, start_step, enabled=is_lead)
    tick, tick_step = time.perf_counter(), start_step
    try:
        for step in range(start_step + 1, config.total_steps + 1):
            inputs = _model_inputs(next(iterator))
            if fetch_carried is not None:
                inputs["carried_image"] = fetch_carried(state.sampler_state, inputs["index"])
            state, metrics = train_step(state, parallel.shard_batch(inputs, mesh), table)
            log_now = step % config.log_every_steps == 0 or step == config.total_steps
            save_now = bool(checkpoints) and (
                step % config.checkpoint_every_steps == 0 or step == config.total_steps
            )
            if log_now or save_now:
                # The only device-to-host transfer of the loop: at log/save steps.
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                _check_finite(step, host, workdir / "checkpoints")
                now = time.perf_counter()
                host["steps_per_second"] = (step - tick_step) / max(now - tick, 1e-9)
                tick, tick_step = now, step
                if log_now:
                    writer.write(step, host)
                    progress.set_postfix(_short(host), refresh=False)
            if save_now:
                checkpoints.save(
                    step, state=state, data_iterator_state=iterator.get_state(), config=config
                )
            if (
                config.eval_every_steps
                and step % config.eval_every_steps == 0
                and step != config.total_steps
            ):
                writer.write(
                    step,
                    evaluate_model(
                        config, model=model, params=state.params, model_state=state.model_state
                    ),
                )
            progress.update(1)
    finally:
        progress.close()
        if checkpoints is not None:
            checkpoints.close()
    results = evaluate_model(
        config, model=model, params=state.params, model_state=state.model_state
    )
    writer.write(config.total_steps, results)
    writer.close()
    return results


def _host_carried_fetcher(source: sources.Source):
    """Host-side lookup of the EMC² chains' carried-over negatives' images.

    For datasets too large to keep on the accelerator: before each step the
    loop reads the batch's chain states (B int pairs, one small device-to-host
    transfer, which waits for the previous step) and gathers those images from
    the random-access source, so they reach the step with the batch.
    """
    lookup = jax.jit(emc2_sampler.carried_negatives)

    def fetch(sampler_state, example_index: np.ndarray) -> np.ndarray:
        # The table is replicated: read this process's first copy, so that each
        # process looks up its own examples without a cross-process program.
        local = jax.tree.map(lambda x: x.addressable_data(0), sampler_state)
        index, _, _ = jax.device_get(lookup(local, example_index))
        return pipeline.gather(source, np.asarray(index))["image"]

    return fetch


def _model_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fields the step reads; labels stay on the host (self-supervised training)."""
    return {"image": batch["image"], "index": batch["index"].astype(np.int32)}


def _short(metrics: dict[str, float]) -> dict[str, str]:
    keys = ("objective", "ntxent", "sampler/acceptance_rate", "steps_per_second")
    return {k.split("/")[-1]: f"{metrics[k]:.3g}" for k in keys if k in metrics}


def _progress_bar(total: int, initial: int, *, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
