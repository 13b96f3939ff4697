"""The CLI and the checks ``train_and_evaluate`` runs before compiling anything.

- Bad configs (unknown method, temperature <= 0, burn-in >= proposals, a batch
  not divisible by the devices, an unknown split), a dataset that is not
  prepared, and a workdir holding a checkpoint of another config are refused
  before the train step is built, let alone compiled.
- ``python -m emc2jax.main`` turns those into one ``error:`` line and exit code
  2, no traceback.
- The digits main job, at 20 steps, end to end through the CLI: per-step
  records and the final evaluation in metrics.jsonl, TensorBoard events.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import struct
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from emc2jax import checkpoint, parallel, train
from emc2jax import config as config_lib
from emc2jax.data import sources

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "configs" / "digits_emc2.py"


def digits_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("digits_emc2", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.update_from_flattened_dict(
        {
            "batch_size": 16,
            "total_steps": 4,
            "optimizer.warmup_steps": 0,
            "dataset.train_split": "train[:64]",
            "dataset.data_dir": data_dir,
            **overrides,
        }
    )
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tfds"))
    sources.load_source("digits", "train", data_dir=path)
    return path


def _fail(*args, **kwargs):
    raise AssertionError("compiled or built the train step before refusing the run")


@pytest.fixture
def no_compile(monkeypatch):
    """Any attempt to build the train step or to jit fails the test."""
    monkeypatch.setattr(train, "make_train_step", _fail)
    monkeypatch.setattr(parallel, "data_parallel", _fail)
    monkeypatch.setattr(jax, "jit", _fail)
    monkeypatch.setattr(jax, "pmap", _fail)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "moco"}, "unknown method 'moco'"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": -0.1}, "temperature=-0.1"),
        # Batch 16: 2B - 2 = 30 in-batch proposals per anchor.
        ({"sampler.burn_in": 30}, "discards 30 of 30 proposals"),
        (
            {
                "sampler.proposals": "uniform",
                "sampler.num_uniform_proposals": 4,
                "sampler.burn_in": 5,
            },
            "discards 5 of 4 proposals",
        ),
        ({"batch_size": 12}, "batch_size=12 is not divisible by the 8 devices"),
        ({"dataset.eval_test_split": "tset"}, "no split 'tset'"),
    ],
)
def test_bad_config_is_refused_before_compiling(tmp_path, data_dir, no_compile, overrides, message):
    config = digits_config(data_dir, **overrides)
    with pytest.raises(config_lib.ConfigError, match=message):
        train.train_and_evaluate(config, tmp_path)


def test_missing_dataset_is_refused_before_compiling(tmp_path, no_compile):
    config = digits_config(str(tmp_path / "empty"), **{"dataset.name": "stl10"})
    config.dataset.train_split = "unlabelled"
    with pytest.raises(sources.DatasetNotPreparedError, match="tfds build stl10"):
        train.train_and_evaluate(config, tmp_path / "work")


def test_checkpoint_of_another_config_is_refused_before_compiling(tmp_path, data_dir, monkeypatch):
    # Another model and another dataset size wrote the workdir's checkpoint.
    other = digits_config(data_dir, **{"model.width": 8, "dataset.train_split": "train[:128]"})
    with checkpoint.Checkpointer(tmp_path / "checkpoints") as ckpt:
        ckpt.save(2, state={"step": np.int32(2)}, config=other)
    # Building the model jits its initialiser, and the step is built with it
    # (train.build_trainer, closures only), so only compiling the step is guarded here.
    monkeypatch.setattr(parallel, "data_parallel", _fail)
    with pytest.raises(checkpoint.IncompatibleCheckpointError) as error:
        train.train_and_evaluate(digits_config(data_dir, checkpoint_every_steps=2), tmp_path)
    assert "model.width: checkpoint 8, now 32" in str(error.value)
    assert "dataset.train_split: checkpoint 'train[:128]', now 'train[:64]'" in str(error.value)


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emc2jax.main", "--config", str(CONFIG_FILE), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_cli_reports_a_user_error_in_one_line_with_exit_code_2(tmp_path):
    result = _cli("--workdir", str(tmp_path), "--config.method=moco")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == [f"error: unknown method 'moco'; choose one of {config_lib.METHODS}."], (
        result.stderr
    )
    assert not (tmp_path / "metrics.jsonl").exists()


def _tensorboard_scalars(directory: pathlib.Path) -> dict[str, list[int]]:
    """{tag: [steps]} read back from the TFRecord event files (no TensorFlow needed)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[int]] = {}
    for path in directory.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):  # Record: length u64, crc u32, payload, crc u32.
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(event.step)
    return scalars


@pytest.mark.slow
def test_digits_main_job_end_to_end_through_the_cli(tmp_path, data_dir):
    # The main job's config as shipped, at 20 steps.
    workdir = tmp_path / "run"
    result = _cli(
        "--workdir",
        str(workdir),
        "--config.total_steps=20",
        "--config.log_every_steps=5",
        "--config.optimizer.warmup_steps=5",
        f"--config.dataset.data_dir={data_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"metrics: {workdir}/metrics.jsonl" in result.stdout
    assert f"tensorboard --logdir {workdir}/tensorboard" in result.stdout

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    training, final = records[:-1], records[-1]
    assert [r["step"] for r in training] == [5, 10, 15, 20]
    for record in training:
        for key in ("objective", "ntxent", "learning_rate", "grad_norm", "sampler/acceptance_rate"):
            assert np.isfinite(record[key]), (key, record)
    assert final["step"] == 20
    # Chance is 0.1; even 20 steps from a random init give far better features.
    assert 0.5 < final["linear_probe_accuracy"] <= 1.0
    assert 0.5 < final["knn_accuracy"] <= 1.0
    assert json.loads(result.stdout[: result.stdout.index("}") + 1]) == {
        k: v for k, v in final.items() if k != "step"
    }

    scalars = _tensorboard_scalars(workdir / "tensorboard")
    assert scalars["objective"] == [5, 10, 15, 20]
    assert scalars["linear_probe_accuracy"] == [20]
    with checkpoint.Checkpointer(workdir / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [20]  # the final state is always saved
