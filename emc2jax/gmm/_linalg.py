"""The lab's small dense linear algebra, made safe to ``vmap`` on CPU.

Why not call ``jnp.linalg`` directly: jaxlib 0.10's CPU LAPACK kernels split a
*batched* call (what ``vmap`` produces) into chunks scheduled on XLA's
intra-op thread pool, and block the pool thread that runs the call until the
chunks are done (``ParallelBatchMap`` in ``jaxlib/cpu/lapack_kernels.cc``; it
only kicks in once the batch holds ~2e5 flops, e.g. 32 seeds of 20 x 20).
A vmapped experiment has several independent LAPACK calls; when as many of
them run concurrently as the pool has threads, every thread waits for chunks
nobody can run and the process hangs with idle CPUs (seen here: a 32-seed
sweep on a 2-core machine, all workers in ``BlockingCounter::Wait``).

Our matrices are tiny (d x d with d ~ 20), so each wrapper below is a
``jax.custom_batching.sequential_vmap``: under ``vmap`` it becomes a
``lax.map`` loop of *unbatched* calls, which LAPACK runs inline on the calling
thread. The cost is negligible next to training. These wrappers are for
analysis, not for differentiation (``custom_vmap`` has no reverse-mode rule).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_batching import sequential_vmap
from jax.scipy.linalg import solve_triangular

Array = jax.Array


@sequential_vmap
def eigh(a: Array) -> tuple[Array, Array]:
    """Eigenvalues (ascending) and eigenvectors (columns) of a symmetric (n, n)."""
    return jnp.linalg.eigh(a)


@sequential_vmap
def qr(a: Array) -> tuple[Array, Array]:
    """Reduced QR decomposition of a (m, n), m >= n: Q (m, n), R (n, n)."""
    return jnp.linalg.qr(a)


@sequential_vmap
def right_singular_vectors(a: Array) -> Array:
    """``V^T`` of the thin SVD of a (m, n), m <= n: (m, n) with orthonormal rows."""
    return jnp.linalg.svd(a, full_matrices=False)[2]


@sequential_vmap
def singular_values(a: Array) -> Array:
    """Singular values of a (m, n), descending: (min(m, n),)."""
    return jnp.linalg.svd(a, compute_uv=False)


@sequential_vmap
def cholesky(a: Array) -> Array:
    """Lower Cholesky factor L of a symmetric positive definite (n, n): a = L L^T."""
    return jnp.linalg.cholesky(a)


@sequential_vmap
def solve_lower(lower: Array, b: Array) -> Array:
    """``L^-1 b`` for lower-triangular L (n, n) and b (n, m)."""
    return solve_triangular(lower, b, lower=True)
