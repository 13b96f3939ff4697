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
>= 3 on a 2-core CPU). The share of the sweep in a full EMC² training step
(target <= 5%, digits ConvNet, B = 256) needs the training step: see
:func:`time_emc2_train_step`, the hook that fills ``sweep_share_of_train_step``.

Run: ``python benchmarks/bench_sampler.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import block, machine_info, save_json, time_call  # noqa: E402
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


def _jax_step(problem: dict[str, np.ndarray], burn_in: int):
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
    def sweep(key, state, scores, example_index, column_index, mask):
        return emc2.step(
            key,
            state,
            example_index=example_index,
            proposal_log_scores=scores,
            proposal_index=column_index,
            proposal_aug=jnp.zeros_like(column_index),
            proposal_mask=mask,
            burn_in=burn_in,
        )

    keys = iter(jax.random.split(jax.random.key(0), 10_000))
    return lambda: sweep(next(keys), state, *args)


def time_emc2_train_step(batch_size: int, quick: bool) -> float | None:
    """Seconds of one full EMC² training step (digits ConvNet, batch ``batch_size``).

    Hook for the training engine: return the median seconds of a jitted EMC²
    train step on the digits ConvNet, or None while it is not available (the
    share is then reported as None).
    """
    del batch_size, quick
    return None


def _alternating_seconds(jax_fn, numpy_fn, rounds: int) -> dict[str, float]:
    """Times the two in alternating blocks of warm calls (drift in load hits both alike).

    Each round runs a block of 4 calls of each (the first call of a block only
    warms the caches and is not kept); medians and minima over all kept calls.
    """
    samples: dict[str, list[float]] = {"jax": [], "numpy": []}
    for _ in range(rounds):
        for name, fn in (("jax", lambda: block(jax_fn())), ("numpy", numpy_fn)):
            for call in range(4):
                start = time.perf_counter()
                fn()
                if call:
                    samples[name].append(time.perf_counter() - start)
    return {
        "jax_s": statistics.median(samples["jax"]),
        "jax_min_s": min(samples["jax"]),
        "numpy_loop_s": statistics.median(samples["numpy"]),
        "numpy_loop_min_s": min(samples["numpy"]),
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Times the sweep for B in {64, 256, 1024} (quick: {64, 256}); returns the figures."""
    sizes = (64, 256) if quick else (64, 256, 1024)
    rows = []
    for b in sizes:
        problem = in_batch_problem(b)
        p = problem["scores"].shape[-1]
        burn_in = 0
        step = _jax_step(problem, burn_in)
        compile_s = time_call(step, repeats=1, warmup=2)["first_call_s"]
        rng = np.random.default_rng(1)

        def numpy_loop(problem=problem, rng=rng):
            return numpy_mh_sweep(problem["scores"], problem["mask"], problem["cached"], 0, rng)

        rounds = (2 if b >= 1024 else 4) if quick else (3 if b >= 1024 else 10)
        timing = _alternating_seconds(step, numpy_loop, rounds)
        rows.append(
            {
                "batch_size": b,
                "proposals_per_chain": NUM_VIEWS * p,
                "valid_proposals_per_chain": NUM_VIEWS * (p - 2),
                **timing,
                "jax_compile_and_first_call_s": compile_s,
                "speedup_vs_numpy_loop": timing["numpy_loop_s"] / timing["jax_s"],
                "speedup_vs_numpy_loop_min": timing["numpy_loop_min_s"] / timing["jax_min_s"],
                "jax_ns_per_proposal": 1e9 * timing["jax_s"] / (b * NUM_VIEWS * p),
            }
        )
    at_256 = next(r for r in rows if r["batch_size"] == 256)
    train_step_s = time_emc2_train_step(256, quick)
    return {
        "benchmark": "bench_sampler",
        "quick": quick,
        "machine": machine_info(),
        "setting": "in-batch proposals: V=2 views x P=2B columns, self and positive masked "
        "(2*(2B-2) valid proposals per chain), burn-in 0; jitted emc2.step (uniform draws, "
        "sweep, weights, table write-back, info) vs the NumPy per-proposal loop; medians of "
        "warm calls timed in alternating blocks",
        "rows": rows,
        "mh_sweep_speedup_vs_numpy_loop": at_256["speedup_vs_numpy_loop"],
        "mh_sweep_s_at_256": at_256["jax_s"],
        "train_step_s_at_256": train_step_s,
        "sweep_share_of_train_step": None
        if train_step_s is None
        else at_256["jax_s"] / train_step_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    result = run(quick=args.quick)
    for row in result["rows"]:
        print(
            f"B={row['batch_size']:5d}  jax {1e3 * row['jax_s']:8.2f} ms   "
            f"numpy loop {1e3 * row['numpy_loop_s']:8.2f} ms   "
            f"speedup {row['speedup_vs_numpy_loop']:5.1f}x"
        )
    print(f"mh_sweep_speedup_vs_numpy_loop (B=256): {result['mh_sweep_speedup_vs_numpy_loop']:.2f}")
    if args.out is not None:
        save_json(args.out / "bench_sampler.json", result)


if __name__ == "__main__":
    main()
