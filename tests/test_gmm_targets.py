"""The four GMM reproduction targets in --quick form write well-formed outputs."""

import json

import pytest

from emc2jax.reproduce import get_target

CLAIM_KEYS = {"claim", "criterion", "observed", "supported"}


def _check_common(out_dir, results, name):
    on_disk = json.loads((out_dir / "results.json").read_text())
    assert on_disk["target"] == name and on_disk["quick"] is True
    assert on_disk["run_time_s"] > 0
    assert on_disk["claims"], "every target states its claims"
    for claim in on_disk["claims"].values():
        assert set(claim) == CLAIM_KEYS and isinstance(claim["supported"], bool)
    report = (out_dir / "report.md").read_text()
    assert "## Claims" in report and "Run time:" in report and "{RUN_TIME}" not in report
    pngs = list(out_dir.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    return on_disk


@pytest.mark.slow
def test_gmm_fisher_quick(tmp_path):
    results = _check_common(tmp_path, get_target("gmm_fisher")(tmp_path, quick=True), "gmm_fisher")
    sin = results["sin_angle_to_fisher"]
    assert set(sin) == {
        "infonce",
        "infonce_cosine",
        "pca",
        "lda",
        "random",
        "simsiam",
        "control_same_point",
        "infonce_off_centre",
    }
    for summary in sin.values():
        assert {"median", "q25", "q75", "min", "max"} <= set(summary)
        assert 0.0 <= summary["min"] <= summary["median"] <= summary["max"] <= 1.0 + 1e-6
    assert results["setting"]["seeds"] >= 16
    assert "isotropic_control" in results


@pytest.mark.slow
def test_gmm_noise_quick(tmp_path):
    results = _check_common(tmp_path, get_target("gmm_noise")(tmp_path, quick=True), "gmm_noise")
    deltas = results["delta"]
    assert deltas[0] == 0.0 and deltas[-1] == pytest.approx(0.9)
    assert len(results["infonce"]["sin_angle"]["median"]) == len(deltas)


@pytest.mark.slow
def test_gmm_rank_quick(tmp_path):
    results = _check_common(tmp_path, get_target("gmm_rank")(tmp_path, quick=True), "gmm_rank")
    ranks = results["setting"]["ranks"]
    assert min(ranks) < 3 < max(ranks)  # both sides of k - 1
    assert set(results["by_rank"]) == {str(r) for r in ranks}


@pytest.mark.slow
def test_gmm_clip_quick(tmp_path):
    results = _check_common(tmp_path, get_target("gmm_clip")(tmp_path, quick=True), "gmm_clip")
    assert {"clip_modality1", "clip_modality2", "pca_modality1", "pca_modality2"} <= set(
        results["leakage"]
    )
