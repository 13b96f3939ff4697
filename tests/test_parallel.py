"""Tests of emc2jax.parallel: shard_map, pmap and one device agree; errors come early."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from emc2jax import parallel

B, D, M = 16, 3, 32  # global batch, feature dim, "dataset" size of the table


def _toy_step(state, batch):
    """One SGD step on a least-squares loss, plus a replicated table written with the
    all-gathered per-example values (the pattern of the sampler chain updates)."""
    x, idx = batch["x"], batch["index"]

    def loss_fn(w):
        return jnp.mean((x @ w - 1.0) ** 2)

    loss, grad = jax.value_and_grad(loss_fn)(state["w"])
    grad = lax.pmean(grad, parallel.DATA_AXIS)
    values = lax.all_gather(x @ state["w"], parallel.DATA_AXIS, tiled=True)
    indices = lax.all_gather(idx, parallel.DATA_AXIS, tiled=True)
    new_state = {
        "w": state["w"] - 0.1 * grad,
        "table": state["table"].at[indices].set(values),
        "step": state["step"] + 1,
    }
    metrics = {"loss": lax.pmean(loss, parallel.DATA_AXIS), "grad_norm": jnp.linalg.norm(grad)}
    return new_state, metrics


def _init_state():
    return {"w": jnp.array([0.5, -0.2, 0.1]), "table": jnp.zeros(M), "step": jnp.int32(0)}


def _batches(num):
    keys = jax.random.split(jax.random.key(0), num)
    return [
        {
            "x": jax.random.normal(k, (B, D)),
            "index": jax.random.permutation(jax.random.fold_in(k, 1), M)[:B],
        }
        for k in keys
    ]


def _run(step, mesh, batches):
    state = parallel.replicate(_init_state(), mesh)
    history = []
    for batch in batches:
        state, metrics = step(state, parallel.shard_batch(batch, mesh))
        history.append(parallel.to_host(metrics))
    return parallel.to_host(state), history


def _reference(batches):
    """The same computation on the full batch, no collectives."""
    state = jax.tree.map(np.asarray, _init_state())
    history = []
    for batch in batches:
        x, idx = np.asarray(batch["x"], np.float64), np.asarray(batch["index"])
        w = state["w"].astype(np.float64)
        residual = x @ w - 1.0
        grad = 2.0 * x.T @ residual / (B * 1.0)
        table = state["table"].copy()
        table[idx] = x @ w
        history.append({"loss": np.mean(residual**2) / 1.0, "grad_norm": np.linalg.norm(grad)})
        state = {"w": w - 0.1 * grad, "table": table, "step": state["step"] + 1}
    return state, history


def test_mesh_has_the_data_axis_and_explicit_type():
    mesh = parallel.make_data_mesh()
    assert mesh.axis_names == (parallel.DATA_AXIS,) and mesh.size == jax.device_count() == 8
    assert mesh.axis_types == (jax.sharding.AxisType.Explicit,)
    assert parallel.make_data_mesh(2).size == 2
    with pytest.raises(ValueError, match=r"num_devices=9 must be in \[1, 8\]"):
        parallel.make_data_mesh(9)


@pytest.mark.parametrize(
    "backend,num_devices", [("shard_map", 8), ("pmap", 8), ("shard_map", 1), ("pmap", 2)]
)
def test_backends_and_device_counts_agree_with_the_full_batch_computation(backend, num_devices):
    mesh = parallel.make_data_mesh(num_devices)
    chex.clear_trace_counter()
    # One trace for all the steps: the compiled step is reused, never retraced.
    per_device = chex.assert_max_traces(_toy_step, n=1)
    step = parallel.data_parallel(per_device, mesh=mesh, backend=backend)
    batches = _batches(3)
    state, history = _run(step, mesh, batches)
    ref_state, ref_history = _reference(batches)
    assert int(state["step"]) == 3
    np.testing.assert_allclose(state["w"], ref_state["w"], rtol=1e-5)
    np.testing.assert_allclose(state["table"], ref_state["table"], rtol=1e-5, atol=1e-6)
    for got, want in zip(history, ref_history, strict=True):
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-5)


def test_shard_map_and_pmap_give_identical_states():
    mesh = parallel.make_data_mesh()
    batches = _batches(4)
    a, _ = _run(parallel.data_parallel(_toy_step, mesh=mesh), mesh, batches)
    b, _ = _run(parallel.data_parallel(_toy_step, mesh=mesh, backend="pmap"), mesh, batches)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


def _step_with_table(state, batch, table):
    """Reads a replicated table (like the image table of the carried-over negatives)."""
    rows = table[batch["index"]]
    grad = lax.pmean(jnp.mean(rows, axis=0), parallel.DATA_AXIS)
    return {**state, "w": state["w"] - grad}, {"rows": lax.psum(jnp.sum(rows), parallel.DATA_AXIS)}


@pytest.mark.parametrize("backend", parallel.BACKENDS)
def test_replicated_extra_arguments(backend):
    mesh = parallel.make_data_mesh()
    table = parallel.replicate(jnp.arange(M * D, dtype=jnp.float32).reshape(M, D), mesh)
    step = parallel.data_parallel(
        _step_with_table, mesh=mesh, backend=backend, num_replicated_args=1
    )
    batch = _batches(1)[0]
    state, metrics = step(parallel.replicate(_init_state(), mesh), batch, table)
    rows = np.asarray(table)[np.asarray(batch["index"])]
    np.testing.assert_allclose(state["w"], np.asarray(_init_state()["w"]) - rows.mean(0), rtol=1e-6)
    np.testing.assert_allclose(metrics["rows"], rows.sum(), rtol=1e-6)
    assert not table.is_deleted(), "replicated extras are never donated"
    with pytest.raises(TypeError, match=r"1 replicated argument\(s\), got 0"):
        step(state, batch)


def test_indivisible_batch_is_refused_before_tracing():
    traces = []

    def per_device(state, batch):
        traces.append(1)
        return _toy_step(state, batch)

    mesh = parallel.make_data_mesh()
    step = parallel.data_parallel(per_device, mesh=mesh)
    batch = {"x": jnp.zeros((12, D)), "index": jnp.arange(12)}
    with pytest.raises(ValueError, match=r"global batch size 12 is not divisible by the 8 dev"):
        step(_init_state(), batch)
    assert not traces


def test_check_batch_divisible_suggests_sizes():
    parallel.check_batch_divisible(32, 8)
    with pytest.raises(ValueError, match=r"batch size 20 .* 8 devices.*use e.g. 16 or 24"):
        parallel.check_batch_divisible(20, 8)
    with pytest.raises(ValueError, match=r"use e.g. 8"):
        parallel.check_batch_divisible(4, 8)
    assert parallel.per_device_batch_size(32, parallel.make_data_mesh()) == 4


def test_unknown_backend_and_ragged_batches_are_refused():
    mesh = parallel.make_data_mesh()
    with pytest.raises(ValueError, match=r"backend='xmap' is not one of"):
        parallel.data_parallel(_toy_step, mesh=mesh, backend="xmap")
    step = parallel.data_parallel(_toy_step, mesh=mesh)
    with pytest.raises(ValueError, match="share one leading"):
        step(_init_state(), {"x": jnp.zeros((16, D)), "index": jnp.arange(8)})


def test_placement_helpers_and_donation():
    mesh = parallel.make_data_mesh()
    state = parallel.replicate(_init_state(), mesh)
    assert state["w"].sharding == NamedSharding(mesh, P())
    batch = parallel.shard_batch({"x": np.ones((B, D), np.float32), "index": np.arange(B)}, mesh)
    assert batch["x"].sharding == NamedSharding(mesh, P(parallel.DATA_AXIS))
    assert batch["x"].shape == (B, D)
    step = parallel.data_parallel(_toy_step, mesh=mesh, donate_state=True)
    new_state, _ = step(state, batch)
    assert new_state["w"].sharding.is_fully_replicated
    assert state["w"].is_deleted(), "the input state's buffers were donated"
    host = parallel.to_host(new_state)
    assert isinstance(host["w"], np.ndarray)


def test_initialize_distributed_is_a_no_op_on_one_process(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed() is False
    assert parallel.initialize_distributed("localhost:1234", 1, 0) is False
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    with pytest.raises(ValueError, match=r"missing \['num_processes', 'process_id'\]"):
        parallel.initialize_distributed()
    with pytest.raises(ValueError, match=r"process_id=3 must be in \[0, num_processes=2\)"):
        parallel.initialize_distributed(num_processes=2, process_id=3)
