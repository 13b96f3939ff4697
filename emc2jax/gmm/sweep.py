"""One compiled call per sweep: vmap an experiment over seeds and a parameter grid.

An *experiment* is a pure function ``fn(key, **params) -> pytree of arrays``
(typically: build a mixture from the key, train, return metrics). Static
settings (d, k, r, batch, steps) are bound beforehand with
``functools.partial``; the swept parameters (delta, temperature, anisotropy,
learning rate, ...) are traced scalars, so :func:`sweep` runs the whole grid x
seeds in one ``jit(vmap(...))`` instead of a Python loop of trainings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = ["seed_keys", "summarize", "sweep", "vectorize"]


def seed_keys(seed: int, num_seeds: int, *, impl: str | None = None) -> Array:
    """``num_seeds`` independent PRNG keys derived from ``seed``: (num_seeds,) keys.

    ``impl`` picks the PRNG (``jax.random.key``'s argument; default: JAX's,
    threefry2x32). Any counter-based implementation (threefry, philox) keeps
    a vmapped sweep equal to the Python loop over the same keys; ``"rbg"``
    does not (see ``jax.random``'s documentation).
    """
    return jax.random.split(jax.random.key(seed, impl=impl), num_seeds)


def vectorize(fn: Callable[..., Any], names: tuple[str, ...]) -> Callable[..., Any]:
    """``g(keys, *values)`` with ``g(...)[i_1, ..., i_m, s] = fn(keys[s], **{names[j]: values[j][i_j]})``.

    The seed axis is innermost, each named parameter adds one outer grid axis
    (in the order of ``names``). Not jitted: compose with ``jax.jit``.
    """

    def call(key, *values):
        return fn(key, **dict(zip(names, values, strict=True)))

    vectorized = jax.vmap(call, in_axes=(0,) + (None,) * len(names))
    for j in reversed(range(len(names))):
        axes = (None,) + tuple(0 if i == j else None for i in range(len(names)))
        vectorized = jax.vmap(vectorized, in_axes=axes)
    return vectorized


def sweep(fn: Callable[..., Any], keys: ArrayLike, **grid: ArrayLike) -> Any:
    """Runs ``fn`` on every (grid point, seed) in one compiled call.

    Args:
      fn: ``fn(key, **params) -> pytree`` (pure, traceable).
      keys: (S,) PRNG keys, one per seed (the same keys at every grid point,
        so differences along the grid are paired comparisons).
      **grid: each a 1-D array of values for the keyword of that name.

    Returns:
      ``fn``'s pytree with leading axes ``(len(grid[name_1]), ..., S)``.

    Each call traces and compiles afresh; to rerun the same sweep on new keys
    or values, keep ``jax.jit(vectorize(fn, names))`` and call it instead.

    Example::

        run = functools.partial(experiment, dim=20, rank=3)  # statics bound
        out = sweep(run, seed_keys(0, 16), delta=jnp.linspace(0, 0.9, 10))
        out["sin_angle"].shape  # (10, 16)
    """
    names = tuple(grid)
    values = []
    for name in names:
        value = jnp.asarray(grid[name])
        if value.ndim != 1:
            raise ValueError(f"grid value {name!r} must be 1-D, got shape {value.shape}.")
        values.append(value)
    return jax.jit(vectorize(fn, names))(keys, *values)


def summarize(values: ArrayLike, axis: int = -1) -> dict[str, Any]:
    """Median and spread over seeds (``axis``): median, q25, q75, min, max (numpy)."""
    v = np.asarray(values, np.float64)
    q = np.quantile(v, [0.0, 0.25, 0.5, 0.75, 1.0], axis=axis)
    return {"median": q[2], "q25": q[1], "q75": q[3], "min": q[0], "max": q[4]}
