"""Test session setup: 8 fake CPU devices, forced before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Matplotlib must never try to open a window in the test process.
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

if jax.device_count() != 8:  # pragma: no cover - a broken environment, not a test
    raise RuntimeError(
        f"tests need 8 CPU devices, found {jax.device_count()}: JAX was imported before "
        "tests/conftest.py could set XLA_FLAGS=--xla_force_host_platform_device_count=8."
    )
