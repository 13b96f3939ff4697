"""The one collective the samplers need: gather the batch's table updates."""

from __future__ import annotations

import jax
from jax import lax


def gather_rows(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Concatenates ``x`` (n, ...) of every device along ``axis_name`` (device order).

    The result is typed *invariant* over the axis (``to="invarying"``): every
    replica holds the same rows, so a replicated table updated from them is
    provably replicated (``shard_map``'s ``out_specs=P()`` checks pass).
    ``axis_name=None``: ``x`` itself (single device).
    """
    if axis_name is None:
        return x
    return lax.all_gather(x, axis_name, tiled=True, to="invarying")
