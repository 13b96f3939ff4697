"""Exact resume and divergence handling of ``train_and_evaluate``.

- A CLI run killed with SIGKILL (once in the middle of a checkpoint save, once
  from outside at whatever moment a save is under way) and restarted with the
  same command until it completes ends bit-identical to an uninterrupted run:
  same final train state (params, optimizer state, EMC² chains), same metrics
  at every step, same evaluation.
- A run that diverges stops with :class:`emc2jax.train.NonFiniteError` naming
  the step and the metric, and leaves the last good checkpoint restorable.

Tiny shapes: an MLP on 64 digits, global batch 16, 8 CPU devices (the
subprocesses inherit the 8-device XLA flag from tests/conftest.py, so they
compile the same programs as this process).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from emc2jax import checkpoint, train
from emc2jax.data import sources

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "configs" / "digits_emc2.py"
TMP_MARK = ".orbax-checkpoint-tmp"
TOTAL_STEPS = 12
# The digits main job shrunk to a few seconds; shared by the CLI runs (as
# --config.key=value flags) and the in-process runs.
OVERRIDES = {
    "batch_size": 16,
    "total_steps": TOTAL_STEPS,
    "log_every_steps": 1,
    "checkpoint_every_steps": 2,
    "keep_checkpoints": 2,
    "model.name": "mlp",
    "model.hidden_dims": (16,),
    "model.head_hidden_dims": (),
    "model.embedding_dim": 8,
    "optimizer.warmup_steps": 0,
    "dataset.train_split": "train[:64]",
    "dataset.eval_train_split": "train[:64]",
    "dataset.eval_test_split": "test[:32]",
    "eval.linear_probe": False,
    "eval.knn_ks": (1,),
}


def load_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("digits_emc2", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.update_from_flattened_dict({**OVERRIDES, "dataset.data_dir": data_dir, **overrides})
    return config


def cli_command(workdir: pathlib.Path, data_dir: str) -> list[str]:
    flags = {**OVERRIDES, "dataset.data_dir": data_dir}
    return [
        "--config",
        str(CONFIG_FILE),
        "--workdir",
        str(workdir),
        *(f"--config.{k}={v if isinstance(v, str) else repr(v)}" for k, v in flags.items()),
    ]


def abstract_state(config: ml_collections.ConfigDict):
    """The train state's structure for ``config``, to restore checkpoints into."""
    source = sources.load_source(
        config.dataset.name, config.dataset.train_split, data_dir=config.dataset.data_dir
    )
    image_shape = tuple(np.asarray(source[0]["image"]).shape)
    return train.build_trainer(config, image_shape=image_shape, num_examples=len(source)).state


def restore(workdir: pathlib.Path, config, step: int | None = None):
    with checkpoint.Checkpointer(workdir / "checkpoints") as ckpt:
        return ckpt.restore(step, abstract_state=abstract_state(config), config=config)


def metric_records(workdir: pathlib.Path) -> dict[int, dict]:
    """The last record of each step in metrics.jsonl, without the wall-clock rate."""
    records = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("steps_per_second", None)
        records[record["step"]] = {**records.get(record["step"], {}), **record}
    return records


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tfds"))
    sources.load_source("digits", "train", data_dir=path)  # Built once, before any subprocess.
    return path


# Runs the CLI, but SIGKILLs itself when orbax is about to rename the finished
# temporary directory of step $KILL_AT_STEP into place: every file of that
# checkpoint is written (commit_success.txt included), the step is not yet
# visible. The worst moment to die during a save.
_CLI_DYING_IN_SAVE = """
import os, runpy, signal
from orbax.checkpoint._src.path import atomicity

_rename = atomicity.async_path.rename

async def _rename_or_die(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(dst)) == os.environ["KILL_AT_STEP"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return await _rename(src, dst, *args, **kwargs)

atomicity.async_path.rename = _rename_or_die
runpy.run_module("emc2jax.main", run_name="__main__", alter_sys=True)
"""


def _spawn(args: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **env},
    )


def _finish(child: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    _, err = child.communicate(timeout=timeout)
    return child.returncode, err.decode(errors="replace")


def _kill_when_a_save_is_under_way(child: subprocess.Popen, directory: pathlib.Path) -> str:
    """SIGKILLs ``child`` as soon as a checkpoint of step >= 6 is being written
    (its temporary directory appears), or has been written if the poll missed it."""
    deadline = time.monotonic() + 240
    while child.poll() is None and time.monotonic() < deadline:
        names = os.listdir(directory) if directory.is_dir() else []
        steps = [int(n.split(".")[0]) for n in names if n.split(".")[0].isdigit()]
        if any(TMP_MARK in n and int(n.split(".")[0]) >= 6 for n in names):
            child.send_signal(signal.SIGKILL)
            return "during a save"
        if any(s >= 6 for s in steps):
            child.send_signal(signal.SIGKILL)
            return "between saves"
        time.sleep(0.002)
    return "not killed (finished first)"


@pytest.mark.slow
def test_sigkill_and_restart_is_bit_identical_to_an_uninterrupted_run(tmp_path, data_dir):
    config = load_config(data_dir)
    reference_dir, workdir = tmp_path / "reference", tmp_path / "interrupted"
    reference_results = train.train_and_evaluate(config, reference_dir)

    command = ["-m", "emc2jax.main", *cli_command(workdir, data_dir)]
    checkpoints = workdir / "checkpoints"
    # The restarts load the compiled step from JAX's persistent cache, as a
    # restarted job would: half the cost of compiling, and a cached executable
    # must continue bit-identically too.
    cache = {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }

    # 1. Dies inside the save of step 4: step 2 is the latest complete one.
    rc, err = _finish(_spawn(["-c", _CLI_DYING_IN_SAVE, *command[2:]], KILL_AT_STEP="4", **cache))
    assert rc == -signal.SIGKILL, err
    names = os.listdir(checkpoints)
    assert any(n.startswith(f"4{TMP_MARK}") for n in names), names
    assert "2" in names and "4" not in names, names

    # 2. Restarts (cleaning up step 4's leftovers, resuming from step 2) and is
    #    killed from outside while a later save is under way.
    child = _spawn(command, **cache)
    when = _kill_when_a_save_is_under_way(child, checkpoints)
    rc, err = _finish(child)
    assert rc in (0, -signal.SIGKILL), err

    # 3. The same command again, until it completes.
    for _ in range(3):
        rc, err = _finish(_spawn(command, **cache))
        if rc == 0:
            break
    assert rc == 0, err

    expected = restore(reference_dir, config)
    actual = restore(workdir, config)
    assert int(actual.state.step) == int(expected.state.step) == TOTAL_STEPS
    mismatched = [
        jax.tree_util.keystr(path)
        for path, equal in jax.tree_util.tree_leaves_with_path(
            jax.tree.map(np.array_equal, actual.state, expected.state)
        )
        if not equal
    ]
    assert not mismatched, f"resumed run (second kill {when}) differs in {mismatched}"
    assert actual.data_iterator_state == expected.data_iterator_state
    # Every step's metrics (the last record written for it) and the final evaluation.
    assert metric_records(workdir) == metric_records(reference_dir)
    assert metric_records(workdir)[TOTAL_STEPS]["knn_accuracy"] == reference_results["knn_accuracy"]
    assert not any(TMP_MARK in n for n in os.listdir(checkpoints))


def test_divergence_stops_with_the_step_and_metric_and_keeps_the_last_good_checkpoint(
    tmp_path, data_dir, monkeypatch
):
    # From the 5th update on, the step's parameters and objective turn NaN
    # (what a blown-up learning rate does, on a schedule we control).
    bad_from = 4  # state.step before the 5th update
    build = train.make_train_step

    def make_diverging_step(*args, **kwargs):
        step = build(*args, **kwargs)

        def diverging(state, batch, table):
            new_state, metrics = step(state, batch, table)
            bad = state.step >= bad_from
            poison = lambda x: jnp.where(bad, jnp.nan, x)  # noqa: E731
            new_state = new_state._replace(params=jax.tree.map(poison, new_state.params))
            metrics = {**metrics, "objective": poison(metrics["objective"])}
            return new_state, metrics

        return diverging

    monkeypatch.setattr(train, "make_train_step", make_diverging_step)
    config = load_config(data_dir, total_steps=8)
    with pytest.raises(train.NonFiniteError, match=r"objective=nan.* at step 5\b"):
        train.train_and_evaluate(config, tmp_path)

    with checkpoint.Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2, 4]  # nothing saved after the bad step
    restored = restore(tmp_path, config)
    assert int(restored.state.step) == bad_from
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored.state.params))
    assert max(metric_records(tmp_path)) == bad_from  # the bad step was not logged


@pytest.mark.slow
def test_carried_images_from_the_host_match_the_on_device_table(tmp_path, data_dir):
    # sampler.carried_images="host" (for datasets too large for device memory)
    # must train exactly like the default on-device lookup: same chains, same
    # re-encoded negatives, bit-identical state.
    finals = {}
    for mode in ("device", "host"):
        config = load_config(
            data_dir,
            **{"total_steps": 6, "checkpoint_every_steps": 6, "sampler.carried_images": mode},
        )
        train.train_and_evaluate(config, tmp_path / mode)
        finals[mode] = restore(tmp_path / mode, config).state
    assert np.all(finals["host"].sampler_state.negative_index >= 0)  # chains carried negatives
    jax.tree.map(np.testing.assert_array_equal, finals["host"], finals["device"])
