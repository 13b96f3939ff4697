"""Tests of emc2jax.checkpoint: round trips, retention, config checks, crash safety."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from emc2jax import checkpoint

TMP_MARK = ".orbax-checkpoint-tmp"


def _config(**overrides):
    config = ml_collections.ConfigDict(
        {
            "method": "emc2",
            "seed": 0,
            "batch_size": 32,
            "total_steps": 100,
            "model": {"name": "convnet", "width": 16, "head_hidden_dims": (32,)},
            "dataset": {"name": "digits", "num_examples": 1797, "data_dir": "/data"},
            "sampler": {"num_proposals": 8, "burn_in": 2},
            "optimizer": {"name": "adam", "learning_rate": 1e-3},
        }
    )
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def _state(step=0):
    return {
        "step": jnp.int32(step),
        "params": {"layers": {0: {"kernel": jnp.full((3, 4), step, jnp.float32)}}},
        "half": jnp.arange(5, dtype=jnp.bfloat16),
        "table": {"index": jnp.arange(7, dtype=jnp.int32) + step, "logp": -jnp.ones(7)},
        "key_data": np.arange(2, dtype=np.uint32),
    }


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_of_state_iterator_state_and_config(tmp_path):
    config = _config()
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(10, state=_state(10), data_iterator_state={"pos": 320}, config=config)
        ckpt.wait_until_finished()
    # A new Checkpointer (a restarted run) finds it.
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() == 10
        restored = ckpt.restore(abstract_state=jax.eval_shape(_state), config=config)
    _assert_trees_equal(restored.state, _state(10))
    assert restored.data_iterator_state == {"pos": 320}
    assert restored.config == checkpoint.config_to_json_dict(config)
    assert restored.config["model"]["head_hidden_dims"] == [32]


def test_bytes_iterator_state_and_restoring_onto_a_mesh(tmp_path):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    replicated = NamedSharding(mesh, P())
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state=_state(1), data_iterator_state=b'{"a": 1}\x00', config=_config())
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
            jax.eval_shape(_state),
        )
        restored = ckpt.restore(1, abstract_state=abstract)
    assert restored.data_iterator_state == b'{"a": 1}\x00'
    assert restored.state["params"]["layers"][0]["kernel"].sharding == replicated
    _assert_trees_equal(restored.state, _state(1))


def test_keeps_the_last_n_and_refuses_to_overwrite_a_step(tmp_path):
    with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in range(1, 6):
            ckpt.save(step, state=_state(step), data_iterator_state={"pos": step})
        assert ckpt.save(5, state=_state(99)) is False
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [4, 5]
        restored = ckpt.restore(abstract_state=_state())
        assert int(restored.state["step"]) == 5 and restored.data_iterator_state == {"pos": 5}
        with pytest.raises(FileNotFoundError, match=r"no complete checkpoint of step 2 .*\[4, 5\]"):
            ckpt.restore(2, abstract_state=_state())


def test_empty_directory_has_nothing_to_restore(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(FileNotFoundError, match="no complete checkpoint in"):
            ckpt.restore(abstract_state=_state())


def test_incompatible_config_is_refused_naming_the_keys(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state=_state(3), config=_config())
        other = _config(**{"model.width": 32, "dataset.num_examples": 500})
        with pytest.raises(checkpoint.IncompatibleCheckpointError) as info:
            ckpt.restore(abstract_state=_state(), config=other)
    message = str(info.value)
    assert "model.width: checkpoint 16, now 32" in message
    assert "dataset.num_examples: checkpoint 1797, now 500" in message
    assert "seed" not in message


@pytest.mark.parametrize(
    "overrides,differs",
    [
        ({"method": "simclr"}, "method"),
        ({"batch_size": 64}, "batch_size"),
        ({"sampler.burn_in": 0}, "sampler.burn_in"),
        ({"optimizer.name": "sgd"}, "optimizer.name"),
        ({"model.head_hidden_dims": (16,)}, "model.head_hidden_dims"),
        ({"dataset.name": "stl10"}, "dataset.name"),
    ],
)
def test_check_compatible_catches_each_shape_key(overrides, differs):
    saved = checkpoint.config_to_json_dict(_config())
    with pytest.raises(ValueError, match=differs):
        checkpoint.check_compatible(saved, _config(**overrides))


def test_check_compatible_allows_harmless_changes():
    saved = checkpoint.config_to_json_dict(_config())
    harmless = {
        "seed": 1,
        "total_steps": 200,
        "optimizer.learning_rate": 0.1,
        "dataset.data_dir": "/elsewhere",
    }
    checkpoint.check_compatible(saved, _config(**harmless))


def test_leftover_temporary_directory_is_ignored_and_cleaned(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(4, state=_state(4), data_iterator_state={"pos": 4})
    # What a save killed half-way leaves behind: an unfinished temporary directory.
    leftover = tmp_path / f"8{TMP_MARK}-1234567890"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "garbage").write_bytes(b"\x00" * 10)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [4]
        restored = ckpt.restore(abstract_state=_state())
    _assert_trees_equal(restored.state, _state(4))
    assert not leftover.exists()


_SAVE_FOREVER = textwrap.dedent(
    """
    import sys
    import jax.numpy as jnp
    from emc2jax.checkpoint import Checkpointer

    ckpt = Checkpointer(sys.argv[1], max_to_keep=2)
    step = 1
    while True:
        state = {"x": jnp.full((2_000_000,), step, jnp.float32), "step": jnp.int32(step)}
        ckpt.save(step, state=state, data_iterator_state={"pos": step}, config={"a": 1})
        if step == 1:
            ckpt.wait_until_finished()
            print("first", flush=True)
        step += 1
    """
)


def test_kill_during_an_async_save_leaves_the_previous_checkpoint_usable(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", _SAVE_FOREVER, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    try:
        assert child.stdout.readline().strip() == b"first"
        # Wait until a save is in flight, then SIGKILL the process mid-write.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(TMP_MARK in name for name in os.listdir(tmp_path)):
                break
            time.sleep(0.001)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        step = ckpt.latest_step()
        assert step is not None and step >= 1
        restored = ckpt.restore(abstract_state={"x": jnp.zeros(2_000_000), "step": jnp.int32(0)})
    assert int(restored.state["step"]) == step
    np.testing.assert_array_equal(restored.state["x"], np.full(2_000_000, step, np.float32))
    assert restored.data_iterator_state == {"pos": step}
    assert not any(TMP_MARK in name for name in os.listdir(tmp_path))
