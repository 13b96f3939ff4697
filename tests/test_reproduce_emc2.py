"""The EMC² reproduction targets (emc2jax.reproduce.emc2_targets).

- the estimator diagnostics: ``gradient_recorder`` keeps θ fixed and sums
  the gradients; ``estimator_error`` recovers a known bias and variance;
- ``epoch_batches`` never repeats an example within a batch;
- each target, in a reduced form (a couple of steps, one or two runs, one
  method each: SimCLR, SogCLR and EMC² between them, to keep compiles few),
  writes a well-formed ``results.json``, its figures and ``report.md``.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from emc2jax.reproduce import TARGETS, emc2_targets, get_target


def test_targets_are_registered():
    for name, function in (
        ("emc2_gradnorm", emc2_targets.run_gradnorm),
        ("emc2_small_batch", emc2_targets.run_small_batch),
        ("emc2_ablation", emc2_targets.run_ablation),
    ):
        assert name in TARGETS
        assert get_target(name) is function


def test_gradient_recorder_sums_and_never_moves():
    recorder = emc2_targets.gradient_recorder()
    params = {"w": jnp.ones(3), "b": jnp.zeros(())}
    state = recorder.init(params)
    grads = [{"w": jnp.array([1.0, 2.0, 3.0]), "b": jnp.array(2.0)}, {"w": -jnp.ones(3), "b": 0.0}]
    for g in grads:
        updates, state = recorder.update(g, state, params)
        assert optax.tree.norm(updates) == 0.0
    np.testing.assert_allclose(state.total["w"], [0.0, 1.0, 2.0])
    assert float(state.total["b"]) == 2.0
    assert float(state.num_draws) == 2.0
    assert float(state.squared_norm) == pytest.approx(14.0 + 4.0 + 3.0)


def test_estimator_error_recovers_bias_and_variance():
    # ĝ = ∇L + b + noise, noise ~ N(0, σ² I_d): bias² = ||b||², variance = d σ².
    rng = np.random.default_rng(0)
    d, n, sigma = 50, 4000, 0.5
    exact = {"w": jnp.asarray(rng.normal(size=d), jnp.float32)}
    bias = np.zeros(d, np.float32)
    bias[:2] = [0.3, 0.4]  # ||b||² = 0.25
    recorder = emc2_targets.gradient_recorder()
    state = recorder.init(exact)
    draws = exact["w"] + bias + sigma * rng.normal(size=(n, d)).astype(np.float32)
    for g in draws:
        _, state = recorder.update({"w": jnp.asarray(g)}, state)
    error = emc2_targets.estimator_error(state, exact)
    # Standard errors: variance ~ d σ² sqrt(2 / (n d)); bias² ~ 2 ||b|| σ / sqrt(n).
    assert error["variance"] == pytest.approx(d * sigma**2, rel=4 * np.sqrt(2 / (n * d)))
    assert error["bias_sq"] == pytest.approx(0.25, abs=4 * 2 * 0.5 * sigma / np.sqrt(n) + 0.01)
    assert error["mse"] == pytest.approx(error["bias_sq"] + error["variance"])
    assert error["num_draws"] == n


def test_epoch_batches_are_distinct_within_a_batch_and_cover_each_epoch():
    batches = emc2_targets.epoch_batches(10, 3, 4, seed=0)
    assert batches.shape == (4 * 3, 3) and batches.dtype == np.int32
    for batch in batches:
        assert len(set(batch.tolist())) == 3
    for epoch in batches.reshape(4, 9):
        assert len(set(epoch.tolist())) == 9  # one permutation, the last example dropped
    with pytest.raises(ValueError, match="batch_size=11"):
        emc2_targets.epoch_batches(10, 11, 1, seed=0)


def _read(out_dir):
    results = json.loads((out_dir / "results.json").read_text())
    assert (out_dir / "report.md").read_text().startswith("# ")
    return results


@pytest.mark.slow
def test_gradnorm_reduced(tmp_path):
    budget = emc2_targets.GradnormBudget(
        num_steps=2,
        eval_every=2,
        num_draws=2,
        extra_seeds=(),
        long_steps=0,
        methods=("simclr",),
        probe=False,
    )
    returned = emc2_targets.run_gradnorm(tmp_path, quick=True, budget=budget)
    results = _read(tmp_path)
    assert results["final_grad_norm_sq"] == pytest.approx(returned["final_grad_norm_sq"])
    curve = results["methods"]["simclr"]["curve"]
    assert curve["iteration"] == [0, 2]
    assert all(np.isfinite(curve["grad_norm_sq"])) and min(curve["grad_norm_sq"]) > 0
    assert results["final_grad_norm_sq"]["simclr"] == curve["grad_norm_sq"][-1]
    assert results["final_global_loss"]["simclr"] == curve["global_loss"][-1]
    spread = results["methods"]["simclr"]["over_seeds"]
    assert spread["seeds"] == [0]
    assert spread["final_grad_norm_sq"]["values"] == [curve["grad_norm_sq"][-1]]
    estimator = results["methods"]["simclr"]["estimator_at_final"]
    assert estimator["num_draws"] == 2 and estimator["variance"] >= 0
    assert results["paper_final_grad_norm_sq"]["simclr"] == 11.3
    for figure in ("gradnorm.png", "gradnorm_estimator.png"):
        assert (tmp_path / figure).stat().st_size > 0


@pytest.mark.slow
def test_small_batch_reduced(tmp_path):
    budget = emc2_targets.SmallBatchBudget(
        batch_sizes=(8,), seeds=(0, 1), num_epochs=1, max_steps=2, methods=("sogclr",)
    )
    emc2_targets.run_small_batch(tmp_path, quick=True, budget=budget)
    results = _read(tmp_path)
    assert [(r["method"], r["batch_size"], r["seed"]) for r in results["runs"]] == [
        ("sogclr", 8, 0),
        ("sogclr", 8, 1),
    ]
    row = results["summary"]["sogclr"]["8"]
    for key in ("linear_probe", "knn_k10", "knn_k200"):
        assert 0.0 <= row[key]["mean"] <= 1.0 and len(row[key]["values"]) == 2
    assert row["seconds_per_epoch"]["mean"] > 0
    assert 0.5 < results["baselines"]["raw_pixels"]["linear_probe"] <= 1.0
    for figure in ("small_batch_accuracy.png", "small_batch_wall_time.png"):
        assert (tmp_path / figure).stat().st_size > 0


@pytest.mark.slow
def test_ablation_reduced(tmp_path):
    budget = emc2_targets.AblationBudget(
        num_steps=2, eval_every=2, num_draws=0, seeds=(0,), variants=("stale_scores",), probe=False
    )
    emc2_targets.run_ablation(tmp_path, quick=True, budget=budget)
    results = _read(tmp_path)
    variant = results["variants"]["stale_scores"]
    assert results["setting"]["variants"] == {"stale_scores": {"refresh_score": False}}
    assert len(variant["runs"]) == 1
    assert np.isfinite(variant["summary"]["final_grad_norm_sq"]["mean"])
    assert (tmp_path / "ablation.png").stat().st_size > 0


def test_ablation_configs_change_one_thing():
    base = emc2_targets.ablation_config("base", num_steps=10)
    for variant, changes in emc2_targets.ABLATIONS.items():
        config = emc2_targets.ablation_config(variant, num_steps=10)
        differs = {k for k, v in config.sampler.to_dict().items() if base.sampler.to_dict()[k] != v}
        assert differs == set(changes), variant
    assert base.sampler.num_uniform_proposals == 2 * base.batch_size - 2
