"""Trace-time input checks shared by the samplers.

Shapes, dtypes and static hyperparameters are always checked; index *values*
only when they are concrete (outside ``jit``), since a traced value cannot be
read without a host sync.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


def is_concrete(x: ArrayLike) -> bool:
    """True when ``x`` holds values that can be read now (not a tracer)."""
    return not isinstance(x, jax.core.Tracer)


def check_rank(name: str, x: ArrayLike, rank: int) -> None:
    if jnp.ndim(x) != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {jnp.shape(x)}.")


def check_shape(name: str, x: ArrayLike, shape: tuple[int, ...]) -> None:
    if tuple(jnp.shape(x)) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(jnp.shape(x))}.")


def check_integer(name: str, x: ArrayLike) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {jnp.result_type(x)}.")


def check_floating(name: str, x: ArrayLike) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{name} must be a floating array, got dtype {jnp.result_type(x)}.")


def check_num_examples(num_examples: int, minimum: int = 1) -> int:
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)):
        raise ValueError(f"num_examples must be a Python int, got {num_examples!r}.")
    if num_examples < minimum:
        raise ValueError(f"num_examples must be >= {minimum}, got {num_examples}.")
    return int(num_examples)


def check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return int(value)


def check_index_range(name: str, index: ArrayLike, num_examples: int) -> None:
    """Raises if a concrete ``index`` has values outside ``[0, num_examples)``."""
    if not is_concrete(index) or np.size(index) == 0:
        return
    values = np.asarray(index)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= num_examples:
        bad = values[(values < 0) | (values >= num_examples)]
        raise ValueError(
            f"{name} must lie in [0, {num_examples}) (the sampler state's dataset size), "
            f"got out-of-range values {np.unique(bad)[:8].tolist()}."
        )


def table_size(name: str, *tables: ArrayLike) -> int:
    """The common leading size m of a sampler state's per-example tables."""
    sizes = {int(jnp.shape(t)[0]) if jnp.ndim(t) >= 1 else -1 for t in tables}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(
            f"{name}: the per-example tables must share their leading size m, got shapes "
            f"{[tuple(jnp.shape(t)) for t in tables]}."
        )
    return sizes.pop()


def broadcast_columns(name: str, x: ArrayLike, shape: tuple[int, int, int]) -> Array:
    """Broadcasts a per-column array given as (P,), (B, P), (B, 1, P) or (B, V, P)."""
    b, v, p = shape
    x = jnp.asarray(x)
    if x.ndim == 1 and x.shape == (p,):
        x = x[None, None, :]
    elif x.ndim == 2 and x.shape == (b, p):
        x = x[:, None, :]
    elif x.ndim != 3 or x.shape not in {(b, v, p), (b, 1, p), (1, 1, p), (1, v, p)}:
        raise ValueError(
            f"{name} must have shape (P,), (B, P), (B, 1, P) or (B, V, P) = "
            f"({p},), ({b}, {p}), ({b}, 1, {p}) or {shape}, got {tuple(x.shape)}."
        )
    return jnp.broadcast_to(x, shape)
