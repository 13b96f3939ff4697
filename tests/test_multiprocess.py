"""Two processes on localhost train EMC² together like one process with all devices.

Processes 0 and 1 (2 CPU devices each, ``jax.distributed`` with JAX's default
CPU collectives, gloo over TCP) run ``train_and_evaluate``; a third, single
process with 4 devices is the reference. Each process records every local
copy of its final replicated train state (when the final checkpoint is saved):
all four copies must be bit-identical across devices and processes, and equal
to the single-process state up to float32 reduction order (gloo's all-reduce
sums in another order than the in-process one).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import portpicker
import pytest

from emc2jax.data import sources

REPO = pathlib.Path(__file__).resolve().parents[1]

# Runs train_and_evaluate under the JAX_* multi-process environment (if any)
# and saves every addressable copy of the final state: leaf i of device d as
# "i/d" in OUT/state_<process>.npz.
_DRIVER = """
import json, sys
import numpy as np
from emc2jax import parallel

parallel.initialize_distributed()  # JAX_COORDINATOR_ADDRESS etc., or single-process
import jax
from emc2jax import checkpoint, config as config_lib, train

out, data_dir = sys.argv[1], sys.argv[2]
config = config_lib.base_config()
config.update_from_flattened_dict({**json.loads(sys.argv[3]), "dataset.data_dir": data_dir})
copies = {}
save = checkpoint.Checkpointer.save

def save_and_record(self, step, *, state, **kwargs):
    if step == config.total_steps:
        for i, leaf in enumerate(jax.tree.leaves(state)):
            for shard in leaf.addressable_shards:
                copies[f"{i}/{shard.device.id}"] = np.asarray(shard.data)
    return save(self, step, state=state, **kwargs)

checkpoint.Checkpointer.save = save_and_record
train.train_and_evaluate(config, out + "/workdir")
np.savez(f"{out}/state_{jax.process_index()}.npz", **copies)
print(json.dumps({"devices": jax.device_count(), "local": jax.local_device_count()}))
"""

CONFIG = {
    "method": "emc2",
    "batch_size": 16,
    "total_steps": 4,
    "temperature": 0.2,
    "log_every_steps": 1,
    "checkpoint_every_steps": 4,
    "model.name": "mlp",
    "model.hidden_dims": (16,),
    "model.head_hidden_dims": (),
    "model.embedding_dim": 8,
    "dataset.train_split": "train[:64]",
    "dataset.eval_train_split": "train[:64]",
    "dataset.eval_test_split": "test[:32]",
    "eval.linear_probe": False,
    "eval.knn_ks": (1,),
}


def _env(num_devices: int, **extra: str) -> dict[str, str]:
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
    )
    return {
        **os.environ,
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={num_devices}".strip(),
        "JAX_PLATFORMS": "cpu",
        **extra,
    }


def _start(out: pathlib.Path, data_dir: str, env: dict[str, str]) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(out), data_dir, json.dumps(CONFIG)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _load(path: pathlib.Path) -> dict[int, list[np.ndarray]]:
    """{leaf: [copy on each device, by device id]}."""
    leaves: dict[int, list[tuple[int, np.ndarray]]] = {}
    with np.load(path) as data:
        for name in data.files:
            leaf, device = map(int, name.split("/"))
            leaves.setdefault(leaf, []).append((device, data[name]))
    return {leaf: [x for _, x in sorted(copies)] for leaf, copies in leaves.items()}


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_devices(tmp_path):
    data_dir = str(tmp_path / "tfds")
    sources.load_source("digits", "train", data_dir=data_dir)  # Built before the processes start.
    address = f"localhost:{portpicker.pick_unused_port()}"
    multi = {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2"}
    children = [  # Both processes share one output directory (workdir, checkpoints).
        _start(tmp_path / "multi", data_dir, _env(2, **multi, JAX_PROCESS_ID=str(rank)))
        for rank in range(2)
    ]
    children.append(_start(tmp_path / "single", data_dir, _env(4)))
    try:
        outputs = [child.communicate(timeout=300) for child in children]
    finally:
        for child in children:
            child.kill()
    for child, (_, stderr) in zip(children, outputs, strict=True):
        assert child.returncode == 0, stderr[-3000:]
    topology = [json.loads(stdout.splitlines()[-1]) for stdout, _ in outputs]
    assert topology == [{"devices": 4, "local": 2}] * 2 + [{"devices": 4, "local": 4}]

    process0 = _load(tmp_path / "multi" / "state_0.npz")
    process1 = _load(tmp_path / "multi" / "state_1.npz")
    single = _load(tmp_path / "single" / "state_0.npz")
    assert process0.keys() == process1.keys() == single.keys()
    for leaf, copies in process0.items():
        replicas = copies + process1[leaf]
        assert len(replicas) == 4
        for copy in replicas[1:]:  # One replicated state, bit for bit.
            np.testing.assert_array_equal(copy, replicas[0], err_msg=f"leaf {leaf}")
        if np.issubdtype(replicas[0].dtype, np.floating):
            np.testing.assert_allclose(
                replicas[0], single[leaf][0], rtol=1e-5, atol=1e-6, err_msg=f"leaf {leaf}"
            )
        else:  # Step counter, EMC² chain indices: discrete.
            np.testing.assert_array_equal(replicas[0], single[leaf][0], err_msg=f"leaf {leaf}")
