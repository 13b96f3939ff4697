"""Per-example uniform draws that do not depend on batch placement.

Row b of the draws depends only on ``(key, example_index[b])``, like
``fold_in(key, example_index[b])``, so a sampler gives the same numbers for an
example whether it sits on one device or on another. Counter-based: the
Threefry-2x32 hash of the counter pair (position, example index) under two key
words drawn from ``key`` (whatever its PRNG implementation), one hash per two
draws -- a key derivation per example plus one hash per draw made the random
numbers the most expensive part of an EMC² sweep on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p

Array = jax.Array


def uniforms(
    key: Array,
    example_index: Array,
    num: int,
    *,
    time_major: bool = False,
    stream: Array | None = None,
) -> Array:
    """U(0, 1) draws, open interval, float32.

    Args:
      key: a PRNG key.
      example_index: (B,) int dataset indices.
      num: draws per example.
      time_major: return (num, B) instead of (B, num).
      stream: optional (B,) int; rows of one example with different streams
        get independent draws (e.g. the k-th occurrence of an example in a
        batch that repeats it); default 0.

    Returns:
      (B, num) (or (num, B)) float32 in (0, 1): 23 random mantissa bits,
      centred in their bucket so that neither 0 nor 1 occurs (log U and
      log(-log U) stay finite).
    """
    b = example_index.shape[0]
    half = (num + 1) // 2
    k1, k2 = jax.random.bits(key, (2,), jnp.uint32)
    rows = jnp.broadcast_to(example_index.astype(jnp.uint32)[None, :], (half, b))
    # `+ 0 * rows` keeps both counter arrays alike under vmap (threefry2x32's
    # batching rule does not broadcast an unbatched operand).
    counters = jnp.arange(half, dtype=jnp.uint32)[:, None] + 0 * rows
    if stream is not None:
        counters = counters + jnp.uint32(half) * stream.astype(jnp.uint32)[None, :]
    bits1, bits2 = threefry2x32_p.bind(k1, k2, counters, rows)
    bits = jnp.concatenate([bits1, bits2], axis=0)[:num]
    mantissa = (bits >> 9).astype(jnp.float32)
    draws = (mantissa + 0.5) * (1.0 / (1 << 23))
    return draws if time_major else draws.T


def log_uniforms(key: Array, example_index: Array, num: int, *, time_major: bool = False) -> Array:
    """``log`` of :func:`uniforms`: finite, < 0."""
    return jnp.log(uniforms(key, example_index, num, time_major=time_major))


def gumbels(key: Array, example_index: Array, num: int, *, stream: Array | None = None) -> Array:
    """(B, num) standard Gumbel draws ``-log(-log U)``."""
    return -jnp.log(-jnp.log(uniforms(key, example_index, num, stream=stream)))


def occurrence(example_index: Array) -> Array:
    """(B,) int32: how many earlier rows hold the same example (0 for the first)."""
    b = example_index.shape[0]
    earlier = jnp.arange(b)[None, :] < jnp.arange(b)[:, None]
    same = example_index[None, :] == example_index[:, None]
    return jnp.sum(same & earlier, axis=1, dtype=jnp.int32)


__all__ = ["gumbels", "log_uniforms", "occurrence", "uniforms"]
