"""Timing helpers shared by the benchmarks: compile once, then median of repeats.

Every figure we report is a *ratio* of two timings taken side by side in the
same process, because the machines are shared and absolute times drift.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def block(tree: Any) -> Any:
    """Waits for every array in ``tree`` (so a timing includes the device work)."""
    return jax.block_until_ready(tree)


def time_call(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Times ``fn()``: the first call (compile + run) and the median of ``repeats`` calls.

    Returns a dict with ``first_call_s`` (includes compilation for a fresh jit),
    ``median_s``, ``min_s`` and ``repeats``.
    """
    start = time.perf_counter()
    block(fn())
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        block(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn())
        samples.append(time.perf_counter() - start)
    return {
        "first_call_s": first,
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "repeats": repeats,
    }


def machine_info() -> dict[str, Any]:
    """Where the figures came from."""
    devices = jax.devices()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d.device_kind) for d in devices],
        "cpu_count": __import__("os").cpu_count(),
    }


def save_json(path: pathlib.Path, payload: dict[str, Any]) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def bench_main(
    doc: str,
    run: Callable[[bool], dict[str, Any]],
    summarize: Callable[[dict[str, Any]], None],
    name: str,
) -> None:
    """The command line of a ``bench_<name>.py`` script: ``[--quick] [--out DIR]``.

    Runs ``run(quick)``, prints ``summarize(result)`` and, with ``--out``,
    saves the result as ``DIR/<name>.json``.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    result = run(args.quick)
    summarize(result)
    if args.out is not None:
        save_json(args.out / f"{name}.json", result)
