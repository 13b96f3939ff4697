"""Smoke test of the benchmark suite: every code path of ``benchmarks/run.py``, tiny sizes.

``EMC2JAX_BENCH_TINY=1`` shrinks each benchmark to a few seconds of compiling
(an MLP 64-16 without augmentation, batch 16); the figures themselves mean
nothing and are not asserted (speed belongs in benchmarks/, not in tests).
The GMM benchmark has its own test.
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import bench_train_step  # noqa: E402
from benchmarks import run as suite  # noqa: E402


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMC2JAX_BENCH_TINY", "1")
        try:
            status = suite.main(["--out", str(out), "--only", "train_step", "sampler"])
        finally:
            bench_train_step.clear_runners()
    assert status == 0
    return out


def test_suite_writes_json_with_the_headline_keys(report_dir):
    report = json.loads((report_dir / "benchmarks.json").read_text())
    assert report["errors"] == {}
    assert report["tiny"] is True
    for key in (
        "mh_sweep_speedup_vs_numpy_loop",
        "sampler_fraction_of_emc2_step",
        "emc2_over_simclr_step_time",
        "steps_per_second",
        "examples_per_second",
        "batch_scaling",
        "dataset_scaling",
        "sampler_state_bytes_per_million",
    ):
        assert key in report, key
    assert len(report["load_average_before"]) == 3
    assert set(report["steps_per_second"]["digits_convnet"]) >= {"simclr", "emc2", "emc2_stub"}
    train = report["benchmarks"]["train_step"]
    assert train["retraces"] == 0  # every compiled step was traced exactly once
    # Three int32/float32 words per example for the EMC² chains: 12 bytes.
    assert report["sampler_state_bytes_per_million"]["emc2"] == 12e6
    assert report["sampler_state_bytes_per_million"]["sogclr"] == 5e6
    target = report["targets"]["sampler_fraction_of_emc2_step"]
    assert target["bound"] == "<= 0.05" and target["met"] in (True, False)


def test_suite_writes_markdown_tables(report_dir):
    text = (report_dir / "benchmarks.md").read_text()
    assert text.startswith("# Benchmarks (tiny (smoke test))")
    for heading in ("## Targets", "## Training step throughput", "## EMC² sweep vs the NumPy loop"):
        assert heading in text


def test_stub_sampler_keeps_the_shapes_of_the_real_one():
    import jax
    import jax.numpy as jnp

    from emc2jax.samplers import emc2

    state = emc2.init(10)
    kwargs = dict(
        example_index=jnp.arange(3),
        proposal_log_scores=jnp.zeros((3, 2, 6)),
        proposal_index=jnp.arange(6) % 3 + 3,
        proposal_aug=jnp.zeros(6, jnp.int32),
        proposal_mask=jnp.ones((3, 2, 6), bool),
    )
    # Shapes only (nothing compiled): the stub must be a drop-in for emc2.step.
    real, stub = (
        jax.eval_shape(lambda s, f=f: f(jax.random.key(0), s, **kwargs), state)
        for f in (emc2.step, bench_train_step.stub_emc2_step)
    )
    assert jax.tree.structure(real) == jax.tree.structure(stub)
    assert jax.tree.leaves(jax.tree.map(lambda a, b: a == b, real, stub)) == [True] * len(
        jax.tree.leaves(real)
    )
