"""Paper reproductions: ``python -m emc2jax.reproduce NAME --out DIR [--quick]``.

Each target is a function ``run(out_dir: pathlib.Path, *, quick: bool) -> dict``
in a module of this package. It writes ``DIR/results.json`` (the dict it
returns), its figures as PNG and a short ``DIR/report.md`` (setting, numbers,
comparison with the paper), using the helpers in :mod:`emc2jax.reproduce.report`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

# name -> "module:function", imported lazily so `--help` stays instant.
TARGETS: dict[str, str] = {
    "mh_exactness": "emc2jax.reproduce.mh_exactness:run",
    "emc2_gradnorm": "emc2jax.reproduce.emc2_targets:run_gradnorm",
    "emc2_small_batch": "emc2jax.reproduce.emc2_targets:run_small_batch",
    "emc2_ablation": "emc2jax.reproduce.emc2_targets:run_ablation",
    "gmm_fisher": "emc2jax.reproduce.gmm_targets:run_fisher",
    "gmm_noise": "emc2jax.reproduce.gmm_targets:run_noise",
    "gmm_rank": "emc2jax.reproduce.gmm_targets:run_rank",
    "gmm_clip": "emc2jax.reproduce.gmm_targets:run_clip",
}


def get_target(name: str) -> Callable[..., dict]:
    """Returns the ``run`` function of target ``name`` (ValueError if unknown)."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of: {', '.join(sorted(TARGETS))}.")
    module_name, function_name = TARGETS[name].split(":")
    return getattr(importlib.import_module(module_name), function_name)
