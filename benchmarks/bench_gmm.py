"""GMM lab: a 64-seed sweep in one vmapped call against a Python loop of the same training.

Each "training" is one seed of the theory lab's inner loop: build an
anisotropic mixture (d = 20, k = 4) from the seed, then train a rank-3 linear
encoder with dot-product InfoNCE for ``steps`` Adam steps on fresh batches
(:func:`emc2jax.gmm.train_infonce`, one ``lax.scan``).

- ``loop``: ``jax.jit(training)`` compiled once, then called for each of the
  64 seeds one after another (Python loop, results blocked on at the end).
- ``vmapped``: ``jax.jit(jax.vmap(training))`` over the 64 seeds, one call.

Both are compiled before timing (``compile_*_s`` report that separately) and
give the same encoders (``max_abs_diff``). The headline figure is
``gmm_vmap_speedup_vs_loop`` = loop time / vmapped time (target >= 10 on a
2-core CPU): a single seed's steps are too small to keep the cores busy, so
per-op overhead dominates the loop, while the vmapped sweep pays it once for
all seeds.

Run: ``python benchmarks/bench_gmm.py [--quick] [--out DIR]``.
``EMC2JAX_BENCH_TINY=1`` shrinks it to a smoke test (figures meaningless).
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import block, machine_info, save_json, time_call  # noqa: E402
from emc2jax import gmm  # noqa: E402


def training(key: jax.Array, *, steps: int, batch: int) -> dict[str, jax.Array]:
    """One seed: mixture from the key, InfoNCE training; the final encoder and loss."""
    k_mix, k_train = jax.random.split(key)
    mixture = gmm.anisotropic_mixture(
        k_mix, dim=20, num_components=4, num_noise_directions=5, noise_variance=25.0
    )
    pairs = functools.partial(gmm.sample_pairs, mixture=mixture, n=batch)
    result = gmm.train_infonce(k_train, pairs, rank=3, steps=steps)
    return {"encoder": result.params["encoder"], "final_loss": result.loss[-1]}


def _compile(fn, *args) -> tuple[Any, float]:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def run(quick: bool) -> dict[str, Any]:
    """Times the loop and the vmapped sweep side by side; returns the figures."""
    tiny = bool(os.environ.get("EMC2JAX_BENCH_TINY"))
    seeds = 4 if tiny else 64
    steps = 5 if tiny else 200 if quick else 500
    batch = 16 if tiny else 64
    repeats = 1 if tiny else 3 if quick else 5
    fn = functools.partial(training, steps=steps, batch=batch)
    keys = gmm.seed_keys(0, seeds)

    single, compile_single_s = _compile(fn, keys[0])
    vmapped, compile_vmapped_s = _compile(jax.vmap(fn), keys)

    def loop():
        return [single(k) for k in keys]

    loop_t = time_call(loop, repeats=repeats)
    vmap_t = time_call(lambda: vmapped(keys), repeats=repeats)

    looped = block(loop())
    swept = block(vmapped(keys))
    max_abs_diff = max(
        float(np.max(np.abs(np.asarray(swept["encoder"][i]) - np.asarray(r["encoder"]))))
        for i, r in enumerate(looped)
    )
    speedup = loop_t["median_s"] / vmap_t["median_s"]
    with_compile = (loop_t["median_s"] + compile_single_s) / (
        vmap_t["median_s"] + compile_vmapped_s
    )
    return {
        "gmm_vmap_speedup_vs_loop": speedup,
        "speedup_including_compile": with_compile,
        "seeds": seeds,
        "steps": steps,
        "batch": batch,
        "loop_s": loop_t["median_s"],
        "vmapped_s": vmap_t["median_s"],
        "compile_single_s": compile_single_s,
        "compile_vmapped_s": compile_vmapped_s,
        "max_abs_diff": max_abs_diff,
        "repeats": repeats,
        "load_average": list(os.getloadavg()),
        "machine": machine_info(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    result = run(quick=args.quick)
    print(
        f"{result['seeds']} seeds x {result['steps']} steps (batch {result['batch']}): "
        f"loop {result['loop_s']:.2f} s, vmapped {result['vmapped_s']:.3f} s -> "
        f"gmm_vmap_speedup_vs_loop {result['gmm_vmap_speedup_vs_loop']:.1f}x "
        f"(compile: single {result['compile_single_s']:.1f} s, vmapped "
        f"{result['compile_vmapped_s']:.1f} s; with compile "
        f"{result['speedup_including_compile']:.1f}x; max |diff| {result['max_abs_diff']:.1e})"
    )
    if args.out is not None:
        save_json(args.out / "bench_gmm.json", result)


if __name__ == "__main__":
    main()
