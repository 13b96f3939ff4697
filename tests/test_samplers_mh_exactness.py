"""EXACTNESS: with frozen embeddings the EMC² chain's visits converge to the exact softmax.

Runs the ``mh_exactness`` reproduction in its quick form: both proposal modes
(uniform over the dataset; in-batch-style shared columns with the own example
masked) with the cached, stale scores, and the refresh-score path. Few
proposals per step and a burn-in make the carried-over states a large share
of the visits, so their bookkeeping is checked too.
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
    for name in ("uniform", "batch", "uniform_refresh"):
        config = results["configs"][name]
        assert max(config["tv_distance"]) <= TOLERANCE, (name, config["tv_distance"])
        assert 0.05 < config["acceptance_rate"] < 0.95, name
    # The check has power: the official handling of carried-over states (dropped
    # when burn-in > 0) is visibly biased on the same visits.
    assert results["tv_distance_dropping_carried"] > 3 * results["tv_noise_scale"]
    assert "two_views_shared_columns" in results["configs"]
