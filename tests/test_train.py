"""Tests of the training engine's step (emc2jax.train, emc2jax.methods).

- every method takes steps on 8 devices: state layout kept, metrics finite,
  sampler state updated, and the per-device step traced once (no retracing);
- the shard_map driver, the pmap driver and a 1-device mesh give the same state
  for methods with cross-device coupling (EMC², SimCLR with batch norm, whose
  statistics are pmean-ed over devices, and CLIP).

Everything is tiny (an MLP 64 -> 16 with a linear head to 8 dims, global batch
16 out of 32 digits, the real digits augmentation) and each (method, backend, devices) run is compiled once per
module and shared between the tests that read it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import ml_collections
import numpy as np
import pytest

from emc2jax import config as config_lib
from emc2jax import methods, parallel, train
from emc2jax.data import pipeline, sources

BATCH = 16
# Two steps make an epoch: the third revisits examples, so the EMC² chains
# carry negatives over from earlier steps (and re-encode them).
NUM_STEPS = 3
TRAIN_SPLIT = "train[:32]"


# SimCLR runs with batch norm (cross-device statistics): the parity test then
# covers it too, at no extra compile. The EMC² paper's setting, no norm, for
# the others.
NORMS = {"simclr": "batch"}


def tiny_config(method: str) -> ml_collections.ConfigDict:
    c = config_lib.base_config()
    c.method = method
    c.batch_size = BATCH
    c.total_steps = 10
    c.temperature = 0.2
    c.dataset.train_split = TRAIN_SPLIT
    # An MLP rather than the ConvNet: convolutions over augmented views triple
    # the compile time, and the encoders have their own tests.
    c.model.name = "mlp"
    c.model.hidden_dims = (16,)
    c.model.norm = NORMS.get(method, "none")
    c.model.head_hidden_dims = ()
    c.model.embedding_dim = 8
    # SGD rather than Adam for the parity checks: Adam's first update is
    # lr * sign(g), which turns a float-rounding sign flip of a near-zero
    # gradient component into a 2 * lr difference.
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.1
    c.optimizer.schedule = "constant"
    if method == "exact":
        c.dataset.num_augmentations = 2
    if method == "embedding_cache":
        c.sampler.num_negatives = 2
        c.sampler.refresh_fraction = 0.1
    return c


@dataclasses.dataclass(frozen=True)
class Run:
    initial: Any  # host copy of the step-0 state
    first: Any  # host copy of the state after the first step
    final: Any  # host copy of the state after NUM_STEPS steps
    metrics: list[dict[str, np.ndarray]]  # per step, host
    first_indices: np.ndarray  # dataset indices of the first batch


class Runs:
    """Builds and runs (method, backend, devices) once; later calls reuse it."""

    def __init__(self, data_dir: str):
        self.source = sources.load_source("digits", TRAIN_SPLIT, data_dir=data_dir)
        iterator = iter(pipeline.make_dataset(self.source, global_batch_size=BATCH, seed=0))
        self.batches = [
            {"image": b["image"], "index": b["index"].astype(np.int32)}
            for b in (next(iterator) for _ in range(NUM_STEPS))
        ]
        self.table = pipeline.to_device_array(self.source, key="image")
        self._cache: dict[tuple, Run] = {}

    def get(self, method: str, backend: str, num_devices: int) -> Run:
        key = (method, backend, num_devices)
        if key not in self._cache:
            self._cache[key] = self._run(tiny_config(method), backend, num_devices)
        return self._cache[key]

    def _run(self, config, backend: str, num_devices: int) -> Run:
        mesh = parallel.make_data_mesh(num_devices)
        config_lib.validate_config(config, num_devices=num_devices)
        image_shape = tuple(self.batches[0]["image"].shape[1:])
        trainer = train.build_trainer(
            config, image_shape=image_shape, num_examples=len(self.source)
        )
        # The wrapper's trace counter is keyed by where it is applied (here),
        # so it is shared by every run of this module: reset it per run.
        chex.clear_trace_counter()
        step = parallel.data_parallel(
            chex.assert_max_traces(trainer.train_step, n=1),
            mesh=mesh,
            backend=backend,
            num_replicated_args=1,
        )
        initial = jax.device_get(trainer.state)  # before donation invalidates it
        table = self.table if methods.METHODS[config.method].needs_table else None
        if table is not None:
            table = parallel.replicate(table, mesh)
        state = parallel.replicate(trainer.state, mesh)
        history, states = [], []
        for batch in self.batches:
            state, metrics = step(state, parallel.shard_batch(batch, mesh), table)
            history.append(parallel.to_host(metrics))
            states.append(parallel.to_host(state))
        return Run(initial, states[0], states[-1], history, self.batches[0]["index"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(str(tmp_path_factory.mktemp("tfds")))


def _layout(tree):
    return jax.tree.map(lambda x: (np.shape(x), np.asarray(x).dtype), tree)


@pytest.mark.parametrize("method", config_lib.METHODS)
def test_every_method_steps_on_8_devices_without_retracing(runs, method):
    # The per-device step is wrapped in chex.assert_max_traces(n=1): the three
    # steps would raise on a retrace (a changed dtype, weak type or sharding
    # of the returned state).
    run = runs.get(method, "shard_map", 8)

    assert jax.tree.structure(run.final) == jax.tree.structure(run.initial)
    assert _layout(run.final) == _layout(run.initial)
    assert int(run.final.step) == NUM_STEPS
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), run.initial.params, run.final.params
    )
    assert all(jax.tree.leaves(changed)), "every parameter should have moved"

    for metrics in run.metrics:
        assert {"objective", "learning_rate", "grad_norm", "param_norm"} <= set(metrics)
        for name, value in metrics.items():
            assert np.shape(value) == (), name
            assert np.isfinite(value), (name, value)
    assert np.isclose(run.metrics[0]["learning_rate"], 0.1)
    if method in NORMS:  # The batch statistics moved, in place.
        moved = jax.tree.map(
            lambda a, b: not np.array_equal(a, b), run.initial.model_state, run.final.model_state
        )
        assert jax.tree.leaves(moved) and all(jax.tree.leaves(moved))

    # After the first step: the first batch's per-example state is written,
    # nobody else's.
    seen = run.first_indices
    unseen = np.setdiff1d(np.arange(len(runs.source)), seen)
    sampler = run.first.sampler_state
    if method == "emc2":
        # Empty chains accept their first proposal: every visited example now
        # holds a negative, another example; the others are still empty.
        assert np.all(sampler.negative_index[seen] >= 0)
        assert np.all(sampler.negative_index[seen] != seen)
        assert np.all(np.isfinite(sampler.log_score[seen]))
        assert np.all(sampler.negative_index[unseen] == -1)
        assert 0.0 <= run.metrics[-1]["sampler/acceptance_rate"] <= 1.0
        # Third step, second epoch: some sweeps start at (and stay on) a
        # negative carried over from the first epoch.
        assert run.metrics[0]["sampler/carried_fraction"] == 0
        assert run.metrics[-1]["sampler/carried_fraction"] > 0
    elif method == "sogclr":
        assert np.all(sampler.seen[seen]) and not np.any(sampler.seen[unseen])
        assert np.all(np.isfinite(sampler.log_u[seen]))
    elif method == "embedding_cache":
        assert np.all(sampler.filled[seen])
        norms = np.linalg.norm(sampler.embeddings[seen], axis=-1)
        np.testing.assert_allclose(norms, 1.0, rtol=1e-5)  # projections are L2-normalised
    else:
        assert sampler == ()


def _assert_same_state(actual, expected, err_msg: str) -> None:
    def check(path, a, b):
        where = f"{err_msg}: {jax.tree_util.keystr(path)}"
        if np.issubdtype(np.asarray(a).dtype, np.floating):
            # Float32 sums in another order (per-device partial sums, then the
            # all-reduce), amplified over three steps by batch norm's division
            # by the batch std: ~1e-5 relative. A semantic difference (a
            # gradient scaled by the device count, per-device batch statistics)
            # shows at the 1e-1 level.
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=where)
        else:  # Chain indices, step counters: discrete, so exactly equal.
            np.testing.assert_array_equal(a, b, err_msg=where)

    jax.tree_util.tree_map_with_path(check, actual, expected)


@pytest.mark.parametrize(
    "method, backends",
    [("simclr", ("shard_map", "pmap")), ("emc2", ("shard_map", "pmap")), ("clip", ("shard_map",))],
)
def test_drivers_and_device_counts_give_the_same_state(runs, method, backends):
    # Per-anchor randomness is fold_in(step_key, example_index), the gradient
    # is pmean-ed so that it is the global batch's gradient, and batch
    # statistics are pmean-ed: 8 devices x 2 examples must reproduce 1 device
    # x 16 examples, under either driver.
    reference = runs.get(method, "shard_map", 1).final
    for backend in backends:
        _assert_same_state(
            runs.get(method, backend, 8).final, reference, f"{backend} x8 vs 1 device"
        )
