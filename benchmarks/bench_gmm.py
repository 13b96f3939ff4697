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
``gmm_vmap_speedup_vs_loop`` = loop time / vmapped time at batch 128 (the
targets' --quick batch; target >= 10 on a 2-core CPU), with rows at other
batch sizes. ``random_draws_share_of_vmapped`` times the same random draws
alone (uniform labels, Gaussian noise for x and x+, threefry on CPU) against
the vmapped sweep: the streamed-data setting draws 2 * batch * d Gaussians per
step and seed, and on this CPU that, not per-call overhead, bounds the sweep
(XLA already runs one seed's ``lax.scan`` at ~20 us per step, so a loop over
seeds has little overhead for vmap to remove). ``speedup_bound`` makes that a
number: loop time over the time the sweep's random numbers alone take at the
best rate this machine draws them (:func:`draw_cost_ns`, one flat jitted
draw), i.e. the speedup a sweep with *free* arithmetic would reach.

Run: ``python benchmarks/bench_gmm.py [--quick] [--out DIR]``.
``EMC2JAX_BENCH_TINY=1`` shrinks it to a smoke test (figures meaningless).
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import bench_main, block, machine_info, time_call  # noqa: E402
from emc2jax import gmm  # noqa: E402

SEEDS = 64
DIM = 20
BATCHES = (16, 64, 128)  # 128: the batch of the gmm_* targets' --quick runs
HEADLINE_BATCH = 128


def training(key: jax.Array, *, steps: int, batch: int) -> dict[str, jax.Array]:
    """One seed: mixture from the key, InfoNCE training; the final encoder and loss."""
    k_mix, k_train = jax.random.split(key)
    mixture = gmm.anisotropic_mixture(
        k_mix, dim=DIM, num_components=4, num_noise_directions=5, noise_variance=25.0
    )
    pairs = functools.partial(gmm.sample_pairs, mixture=mixture, n=batch)
    result = gmm.train_infonce(k_train, pairs, rank=3, steps=steps)
    return {"encoder": result.params["encoder"], "final_loss": result.loss[-1]}


def draws_only(key: jax.Array, *, steps: int, batch: int, dim: int = DIM) -> jax.Array:
    """The random numbers one training draws (uniforms and normals), and nothing else."""

    def body(total, t):
        k = jax.random.fold_in(key, t)
        u = jax.random.uniform(k, (3, batch))
        eps = jax.random.normal(jax.random.fold_in(k, 1), (2, batch, dim))
        return total + jnp.sum(u) + jnp.sum(eps), None

    return jax.lax.scan(body, jnp.float32(0), jnp.arange(steps))[0]


def draw_cost_ns(*, impl: str | None = None, count: int = 1 << 18) -> dict[str, float]:
    """Nanoseconds per float32 of ``jax.random.normal`` / ``uniform`` in one big jitted call.

    The cheapest the random numbers of a training can be on this machine: one
    flat draw, no keys to fold, no scan. It bounds any implementation of the
    streamed-data sweep from below (see :func:`measure`'s ``speedup_bound``).
    """
    key = jax.random.key(0, impl=impl)
    normal = jax.jit(lambda k: jax.random.normal(k, (count,)))
    uniform = jax.jit(lambda k: jax.random.uniform(k, (count,)))
    return {
        "normal_ns": 1e9 * time_call(lambda: normal(key), repeats=9)["min_s"] / count,
        "uniform_ns": 1e9 * time_call(lambda: uniform(key), repeats=9)["min_s"] / count,
    }


def _compile(fn, *args) -> tuple[Any, float]:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def measure(
    *,
    seeds: int,
    steps: int,
    batch: int,
    repeats: int,
    draw_cost: dict[str, float],
    impl: str | None = None,
) -> dict[str, Any]:
    """One row: loop vs vmapped for one batch size (and PRNG), compile times apart.

    ``draw_cost`` is :func:`draw_cost_ns` for ``impl`` (measured once per run).
    """
    fn = functools.partial(training, steps=steps, batch=batch)
    keys = gmm.seed_keys(0, seeds, impl=impl)
    single, compile_single_s = _compile(fn, keys[0])
    vmapped, compile_vmapped_s = _compile(jax.vmap(fn), keys)
    draws, _ = _compile(jax.vmap(functools.partial(draws_only, steps=steps, batch=batch)), keys)

    def loop():
        return [single(k) for k in keys]

    loop_t = time_call(loop, repeats=repeats)
    vmap_t = time_call(lambda: vmapped(keys), repeats=repeats)
    draws_t = time_call(lambda: draws(keys), repeats=repeats)
    # The floor: a vmapped sweep must at least draw its random numbers
    # (2 * batch * d normals and 3 * batch uniforms per seed and step), so
    # loop time / that floor bounds the speedup any implementation can reach.
    floor_s = (
        seeds
        * steps
        * 1e-9
        * (2 * batch * DIM * draw_cost["normal_ns"] + 3 * batch * draw_cost["uniform_ns"])
    )
    looped = block(loop())
    swept = block(vmapped(keys))
    max_abs_diff = max(
        float(np.max(np.abs(np.asarray(swept["encoder"][i]) - np.asarray(r["encoder"]))))
        for i, r in enumerate(looped)
    )
    return {
        "batch": batch,
        "prng": impl or str(jax.config.jax_default_prng_impl),
        "speedup": loop_t["median_s"] / vmap_t["median_s"],
        "speedup_including_compile": (loop_t["median_s"] + compile_single_s)
        / (vmap_t["median_s"] + compile_vmapped_s),
        "loop_s": loop_t["median_s"],
        "vmapped_s": vmap_t["median_s"],
        "compile_single_s": compile_single_s,
        "compile_vmapped_s": compile_vmapped_s,
        # Share of the vmapped sweep spent drawing its random numbers (threefry on CPU).
        "random_draws_share_of_vmapped": draws_t["median_s"] / vmap_t["median_s"],
        "draw_cost_ns": draw_cost,
        "random_draws_floor_s": floor_s,
        "speedup_bound": loop_t["median_s"] / floor_s,
        "max_abs_diff": max_abs_diff,
    }


def run(quick: bool) -> dict[str, Any]:
    """Times the loop and the vmapped sweep side by side, per batch size."""
    tiny = bool(os.environ.get("EMC2JAX_BENCH_TINY"))
    seeds = 4 if tiny else SEEDS
    steps = 5 if tiny else 200 if quick else 500
    batches = (16,) if tiny else BATCHES
    repeats = 1 if tiny else 3 if quick else 5
    cost = draw_cost_ns()
    rows = [
        measure(seeds=seeds, steps=steps, batch=b, repeats=repeats, draw_cost=cost) for b in batches
    ]
    headline = next(r for r in rows if r["batch"] == (batches[0] if tiny else HEADLINE_BATCH))
    return {
        "gmm_vmap_speedup_vs_loop": headline["speedup"],
        "speedup_including_compile": headline["speedup_including_compile"],
        "headline_batch": headline["batch"],
        "random_draws_share_of_vmapped": headline["random_draws_share_of_vmapped"],
        "speedup_bound": headline["speedup_bound"],
        "seeds": seeds,
        "steps": steps,
        "repeats": repeats,
        "rows": rows,
        "load_average": list(os.getloadavg()),
        "machine": machine_info(),
    }


def summarize(result: dict[str, Any]) -> None:
    """Prints the figures of :func:`run`."""
    for row in result["rows"]:
        print(
            f"{result['seeds']} seeds x {result['steps']} steps, batch {row['batch']:4d} "
            f"({row['prng']}): "
            f"loop {row['loop_s']:.2f} s, vmapped {row['vmapped_s']:.3f} s -> "
            f"{row['speedup']:.1f}x (with compile {row['speedup_including_compile']:.1f}x; "
            f"compile single {row['compile_single_s']:.1f} s, vmapped "
            f"{row['compile_vmapped_s']:.1f} s; random draws "
            f"{100 * row['random_draws_share_of_vmapped']:.0f}% of vmapped, bound "
            f"{row['speedup_bound']:.1f}x; "
            f"max |diff| {row['max_abs_diff']:.1e})"
        )
    print(
        f"gmm_vmap_speedup_vs_loop (batch {result['headline_batch']}): "
        f"{result['gmm_vmap_speedup_vs_loop']:.1f}"
    )


if __name__ == "__main__":
    bench_main(__doc__, run, summarize, "bench_gmm")
