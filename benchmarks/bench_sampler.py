"""EMC² sweep: the jit-compiled sampler against the paper's per-proposal loop.

One EMC² sweep over the in-batch proposals of a SimCLR-shaped step: B
examples, V = 2 anchor views each, and the P = 2B views of the batch as the
proposal columns of each view's segment, with the anchor's own two views
masked (skipped). So every chain sees 2 * (2B - 2) valid proposals per step,
exactly the official code's ``negative_sample_img`` (which calls ``mh_step``
once per view on the same chain).

- ``jax``: ``emc2.step`` under ``jax.jit`` (random draws, the sweep, the visit
  weights, the chain-table write-back, the diagnostics).
- ``numpy``: the shape of the official PyTorch sampler (``sampler.py``,
  ``MCMC_BatchController.mh_step``): a Python loop over the proposal columns,
  each iteration vectorised over the B anchors in NumPy (one uniform draw per
  anchor, the acceptance test, the state update, the record of the visited
  state), the same log-space arithmetic, then the visit counts per column.

The headline figure is ``mh_sweep_speedup_vs_numpy_loop`` at B = 256 (target
>= 3 on a 2-core CPU). ``sweep_share_of_train_step`` divides the jitted sweep's
time by a full EMC² training step's (digits ConvNet, B = 256, timed by
``benchmarks/bench_train_step.py``): the suite's ``sampler_fraction_of_emc2_step``.
``bench_train_step`` cross-checks it inside the fused step, against a step
whose sampler is stubbed out (a difference of two close timings, so noisier).
``sweep_options`` times the sweep's
``unroll`` and ``chunk_size`` settings side by side (the defaults, 1 and 256 on
CPU, come from it).

Run: ``python benchmarks/bench_sampler.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import bench_main, block, machine_info, time_call  # noqa: E402
from emc2jax.samplers import emc2  # noqa: E402

NUM_VIEWS = 2


def in_batch_problem(batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Scores and masks of one in-batch EMC² step (beta = 14.28, random unit embeddings)."""
    rng = np.random.default_rng(seed)
    b = batch_size
    z = rng.normal(size=(2 * b, 32)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    beta = 14.28
    # Anchor rows: view 0 of example i is row i, view 1 is row B + i.
    anchors = np.stack([z[:b], z[b:]], axis=1)  # (B, 2, D)
    scores = beta * np.einsum("bvd,cd->bvc", anchors, z)  # (B, 2, 2B)
    example_index = np.arange(b, dtype=np.int32)
    column_index = np.concatenate([example_index, example_index])  # (2B,)
    mask = np.broadcast_to(
        column_index[None, None, :] != example_index[:, None, None], scores.shape
    )
    return {
        "scores": scores.astype(np.float32),
        "mask": np.ascontiguousarray(mask),
        "example_index": example_index,
        "column_index": column_index,
        # Carried-over chains from an earlier step: half empty, half holding a state.
        "cached": np.where(rng.random(b) < 0.5, -np.inf, beta * rng.uniform(-0.3, 0.3, b)).astype(
            np.float32
        ),
    }


def numpy_mh_sweep(
    scores: np.ndarray,
    mask: np.ndarray,
    cached: np.ndarray,
    burn_in: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The official sampler's loop shape in NumPy: one iteration per proposal column.

    Args:
      scores: (B, V, P) log-scores beta * s.
      mask: (B, V, P) bool, False = skipped proposal.
      cached: (B,) cached log-score of the carried state (-inf: empty chain).
      burn_in: proposals per view not counted.
      rng: NumPy generator for the uniforms.

    Returns:
      ``(proposal_weights (B, V, P), carried_weights (B, V), final_column (B,),
      final_log_score (B,))`` as ``emc2.step`` defines them.
    """
    b, v, p = scores.shape
    current = cached.copy()
    column = np.full(b, -1, np.int64)
    rows = np.arange(b)
    weights = np.zeros((b, v, p + 1), np.float32)
    for view in range(v):
        visited = np.empty((p, b), np.int64)
        counted = np.empty((p, b), bool)
        for j in range(p):
            new = scores[:, view, j]
            accepted = mask[:, view, j] & (np.log(rng.random(b)) < new - current)
            current[accepted] = new[accepted]
            column[accepted] = j
            visited[j] = column
            counted[j] = mask[:, view, j] & (j >= burn_in) & (current > -np.inf)
        slots = np.where(visited >= 0, visited, p)  # p = the carried state
        flat = (rows[None, :] * (p + 1) + slots)[counted]
        weights[:, view] = np.bincount(flat, minlength=b * (p + 1)).reshape(b, p + 1)
    total = weights.sum(axis=-1, keepdims=True)
    weights /= np.maximum(total, 1.0)
    return weights[..., :p], weights[..., p], column, current


def _jax_step(
    problem: dict[str, np.ndarray], burn_in: int, *, unroll: int = 1, chunk_size: int | None = None
):
    b = problem["scores"].shape[0]
    state = emc2.init(4 * b)
    state = state._replace(log_score=state.log_score.at[:b].set(problem["cached"]))
    state = state._replace(
        negative_index=jnp.where(state.log_score > -jnp.inf, 2 * b, -1).astype(jnp.int32),
        negative_aug=jnp.where(state.log_score > -jnp.inf, 0, -1).astype(jnp.int32),
    )
    args = (
        jnp.asarray(problem["scores"]),
        jnp.asarray(problem["example_index"]),
        jnp.asarray(problem["column_index"]),
        jnp.asarray(problem["mask"]),
    )

    @jax.jit
    def sweep(call, state, scores, example_index, column_index, mask):
        return emc2.step(
            jax.random.fold_in(jax.random.key(0), call),  # a fresh key per call
            state,
            example_index=example_index,
            proposal_log_scores=scores,
            proposal_index=column_index,
            proposal_aug=jnp.zeros_like(column_index),
            proposal_mask=mask,
            burn_in=burn_in,
            unroll=unroll,
            chunk_size=chunk_size,
        )

    calls = itertools.count()
    return lambda: sweep(next(calls), state, *args)


def time_emc2_train_step(batch_size: int, quick: bool) -> float | None:
    """Median seconds of one full EMC² training step (digits ConvNet, batch ``batch_size``).

    The compiled data-parallel step of ``benchmarks/bench_train_step.py`` (one
    device, state donated), shared with that benchmark when both run in one
    process (``benchmarks/run.py``).
    """
    from benchmarks import bench_train_step

    return bench_train_step.emc2_step_seconds(batch_size, rounds=2 if quick else 4)


def sweep_options(
    batch_size: int,
    *,
    unrolls: tuple[int, ...] = (1, 2, 4),
    chunk_sizes: tuple[int, ...] = (64, 256, 1024),
    rounds: int = 4,
    skip_unrolled_small_chunks: bool = False,
    compiled: dict[tuple[int, int], Any] | None = None,
) -> dict[str, Any]:
    """The sweep's time for each ``unroll`` x ``chunk_size``, side by side (CPU defaults).

    Returns rows ``{unroll, chunk_size, jax_s, jax_cpu_s}`` (chunk sizes above
    B are the same program as chunk_size = B and are skipped; with
    ``skip_unrolled_small_chunks``, unroll > 1 only at the largest chunk) and
    the fastest. ``compiled`` maps ``(unroll, chunk_size)`` to sweeps already
    built by :func:`_jax_step` on :func:`in_batch_problem` (batch_size), reused.
    """
    problem = in_batch_problem(batch_size)
    chunks = sorted({min(c, batch_size) for c in chunk_sizes})
    compiled = compiled or {}
    steps = {
        (u, c): compiled.get((u, c)) or _jax_step(problem, 0, unroll=u, chunk_size=c)
        for u in unrolls
        for c in chunks
        if u == 1 or c == chunks[-1] or not skip_unrolled_small_chunks
    }
    compile_s = {k: time_call(fn, repeats=1, warmup=2)["first_call_s"] for k, fn in steps.items()}
    wall: dict[tuple[int, int], list[float]] = {k: [] for k in steps}
    cpu: dict[tuple[int, int], list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, fn in steps.items():
            for call in range(4):
                start, start_cpu = time.perf_counter(), time.process_time()
                block(fn())
                if call:
                    wall[k].append(time.perf_counter() - start)
                    cpu[k].append(time.process_time() - start_cpu)
    rows = [
        {
            "unroll": u,
            "chunk_size": c,
            "jax_s": statistics.median(wall[(u, c)]),
            "jax_cpu_s": statistics.median(cpu[(u, c)]),
            "compile_s": compile_s[(u, c)],
        }
        for u, c in steps
    ]
    best = min(rows, key=lambda row: row["jax_cpu_s"])
    return {
        "batch_size": batch_size,
        "rows": rows,
        "fastest": {"unroll": best["unroll"], "chunk_size": best["chunk_size"]},
    }


def _alternating_seconds(jax_fn, numpy_fn, rounds: int) -> dict[str, float]:
    """Times the two in alternating blocks of warm calls (drift in load hits both alike).

    Each round runs a block of 4 calls of each (the first call of a block only
    warms the caches and is not kept). Returns medians and minima of the
    wall-clock times, medians of the process's CPU times, and the speedups
    (NumPy / JAX) as medians over the rounds of the per-round ratios of the
    blocks' means, which cancels drift between rounds.
    """
    wall: dict[str, list[float]] = {"jax": [], "numpy": []}
    cpu: dict[str, list[float]] = {"jax": [], "numpy": []}
    blocks: dict[str, list[tuple[float, float]]] = {"jax": [], "numpy": []}
    for _ in range(rounds):
        for name, fn in (("jax", lambda: block(jax_fn())), ("numpy", numpy_fn)):
            kept_wall, kept_cpu = [], []
            for call in range(4):
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                if call:
                    kept_wall.append(time.perf_counter() - start)
                    kept_cpu.append(time.process_time() - start_cpu)
            wall[name] += kept_wall
            cpu[name] += kept_cpu
            blocks[name].append((statistics.fmean(kept_wall), statistics.fmean(kept_cpu)))
    paired = [
        (n[0] / j[0], n[1] / j[1]) for j, n in zip(blocks["jax"], blocks["numpy"], strict=True)
    ]
    return {
        "jax_s": statistics.median(wall["jax"]),
        "jax_min_s": min(wall["jax"]),
        "jax_cpu_s": statistics.median(cpu["jax"]),
        "numpy_loop_s": statistics.median(wall["numpy"]),
        "numpy_loop_min_s": min(wall["numpy"]),
        "numpy_loop_cpu_s": statistics.median(cpu["numpy"]),
        "speedup": statistics.median(r[0] for r in paired),
        "speedup_cpu": statistics.median(r[1] for r in paired),
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Times the sweep for B in {64, 256, 1024} (quick: {64, 256}); returns the figures.

    ``EMC2JAX_BENCH_TINY=1`` (the smoke test): B = 16 only.
    """
    tiny = bool(os.environ.get("EMC2JAX_BENCH_TINY"))
    sizes = (16,) if tiny else (64, 256) if quick else (64, 256, 1024)
    headline_b = sizes[-1] if tiny else 256
    rows, default_steps = [], {}
    for b in sizes:
        problem = in_batch_problem(b)
        p = problem["scores"].shape[-1]
        burn_in = 0
        step = _jax_step(problem, burn_in)
        compile_s = time_call(step, repeats=1, warmup=2)["first_call_s"]
        # The defaults: unroll 1, chunk_size min(B, 256) on CPU (see emc2.step).
        default_steps[b] = {(1, min(b, 256)): step}
        rng = np.random.default_rng(1)

        def numpy_loop(problem=problem, rng=rng):
            return numpy_mh_sweep(problem["scores"], problem["mask"], problem["cached"], 0, rng)

        rounds = 1 if tiny else (2 if b >= 1024 else 6) if quick else (3 if b >= 1024 else 10)
        timing = _alternating_seconds(step, numpy_loop, rounds)
        speedup, speedup_cpu = timing.pop("speedup"), timing.pop("speedup_cpu")
        rows.append(
            {
                "batch_size": b,
                "proposals_per_chain": NUM_VIEWS * p,
                "valid_proposals_per_chain": NUM_VIEWS * (p - 2),
                **timing,
                "jax_compile_and_first_call_s": compile_s,
                "speedup_vs_numpy_loop": speedup,
                "speedup_vs_numpy_loop_min": timing["numpy_loop_min_s"] / timing["jax_min_s"],
                "speedup_vs_numpy_loop_cpu": speedup_cpu,
                "jax_ns_per_proposal": 1e9 * timing["jax_s"] / (b * NUM_VIEWS * p),
            }
        )
    head = next(r for r in rows if r["batch_size"] == headline_b)
    train_step_s = time_emc2_train_step(headline_b, quick)
    options = sweep_options(
        headline_b,
        unrolls=(1,) if tiny else (1, 2) if quick else (1, 2, 4, 8),
        chunk_sizes=(256,) if tiny else (64, 256) if quick else (32, 64, 128, 256),
        skip_unrolled_small_chunks=quick,
        compiled=default_steps[headline_b] if jax.default_backend() == "cpu" else None,
        rounds=1 if tiny else 3 if quick else 6,
    )
    return {
        "benchmark": "bench_sampler",
        "quick": quick,
        "machine": machine_info(),
        "setting": "in-batch proposals: V=2 views x P=2B columns, self and positive masked "
        "(2*(2B-2) valid proposals per chain), burn-in 0; jitted emc2.step (uniform draws, "
        "sweep, weights, table write-back, info) vs the NumPy per-proposal loop; medians of "
        "warm calls timed in alternating blocks",
        "rows": rows,
        "headline_batch_size": headline_b,
        "mh_sweep_speedup_vs_numpy_loop": head["speedup_vs_numpy_loop"],
        "mh_sweep_speedup_vs_numpy_loop_cpu": head["speedup_vs_numpy_loop_cpu"],
        "mh_sweep_s": head["jax_s"],
        "train_step_s": train_step_s,
        "sweep_share_of_train_step": None if train_step_s is None else head["jax_s"] / train_step_s,
        "sweep_options": options,
    }


def summarize(result: dict[str, Any]) -> None:
    """Prints the figures of :func:`run`."""
    for row in result["rows"]:
        print(
            f"B={row['batch_size']:5d}  jax {1e3 * row['jax_s']:8.2f} ms   "
            f"numpy loop {1e3 * row['numpy_loop_s']:8.2f} ms   "
            f"speedup {row['speedup_vs_numpy_loop']:5.1f}x"
        )
    print(f"mh_sweep_speedup_vs_numpy_loop (B=256): {result['mh_sweep_speedup_vs_numpy_loop']:.2f}")
    print(f"sweep_share_of_train_step: {result['sweep_share_of_train_step']:.3f}")
    print(f"fastest sweep options: {result['sweep_options']['fastest']}")


if __name__ == "__main__":
    bench_main(__doc__, run, summarize, "bench_sampler")
