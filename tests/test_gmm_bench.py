"""Smoke test of benchmarks/bench_gmm.py at tiny sizes (figures not asserted: speed
belongs in benchmarks/, not in tests)."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import bench_gmm  # noqa: E402


@pytest.mark.slow
def test_bench_gmm_tiny(monkeypatch):
    monkeypatch.setenv("EMC2JAX_BENCH_TINY", "1")
    result = bench_gmm.run(quick=True)
    assert result["gmm_vmap_speedup_vs_loop"] > 0
    assert result["seeds"] == 4 and len(result["rows"]) == 1
    row = result["rows"][0]
    for key in ("loop_s", "vmapped_s", "compile_single_s", "compile_vmapped_s", "speedup_bound"):
        assert row[key] > 0
    # The floor counts 2 * batch * d normals and 3 * batch uniforms per seed and step.
    cost = row["draw_cost_ns"]
    per_step_ns = 2 * row["batch"] * bench_gmm.DIM * cost["normal_ns"]
    per_step_ns += 3 * row["batch"] * cost["uniform_ns"]
    expected = result["seeds"] * result["steps"] * per_step_ns * 1e-9
    assert row["random_draws_floor_s"] == pytest.approx(expected)
    assert row["speedup_bound"] == pytest.approx(row["loop_s"] / expected)
    # The vmapped sweep computes the same trainings as the loop.
    assert row["max_abs_diff"] < 1e-4
