"""EXACTNESS: with frozen embeddings the EMC² chain's visits converge to the exact softmax.

Runs the ``mh_exactness`` reproduction in its quick form (both proposal modes
and the refresh-score path; V = 2 view segments per step with burn-in, so the
carried-over states, masking and burn-in all enter the counts).
"""

import json

import pytest

from emc2jax.reproduce import get_target

TOLERANCE = 0.05


@pytest.mark.slow
def test_chain_visits_match_the_exact_softmax(tmp_path):
    results = get_target("mh_exactness")(tmp_path, quick=True)

    assert (
        json.loads((tmp_path / "results.json").read_text())["tv_distance"] == results["tv_distance"]
    )
    assert (tmp_path / "mh_exactness.png").stat().st_size > 0
    assert "TV" in (tmp_path / "report.md").read_text()

    assert results["num_candidates"] >= 32
    # The target is far from uniform ...
    assert results["tv_distance_uniform"] > 0.3
    # ... the sample is large enough that the tolerance is several noise scales ...
    assert results["tv_noise_scale"] < TOLERANCE / 3
    # ... and every configuration and anchor is within tolerance.
    assert set(results["configs"]) == {"uniform", "batch", "uniform_refresh"}
    for name, config in results["configs"].items():
        assert max(config["tv_distance"]) <= TOLERANCE, (name, config["tv_distance"])
        assert 0.05 < config["acceptance_rate"] < 0.95, name
