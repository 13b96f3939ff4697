"""Writing a reproduction's outputs: results.json, report.md and PNG figures."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import numpy as np


def _jsonable(value: Any) -> Any:
    """Converts numpy/JAX scalars and arrays to plain JSON types (NaN -> None)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
        array = np.asarray(value)
        return _jsonable(array.item() if array.ndim == 0 else array.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return value


def write_results(out_dir: pathlib.Path, results: dict[str, Any]) -> pathlib.Path:
    """Writes ``results`` as ``out_dir/results.json`` and returns the path."""
    path = pathlib.Path(out_dir) / "results.json"
    path.write_text(json.dumps(_jsonable(results), indent=2, sort_keys=True) + "\n")
    return path


def write_report(out_dir: pathlib.Path, markdown: str) -> pathlib.Path:
    """Writes ``out_dir/report.md``."""
    path = pathlib.Path(out_dir) / "report.md"
    path.write_text(markdown.strip() + "\n")
    return path


def new_figure(*args: Any, **kwargs: Any):
    """A matplotlib (figure, axes) pair on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, out_dir: pathlib.Path, name: str) -> pathlib.Path:
    """Saves ``fig`` as ``out_dir/name.png`` and closes it."""
    import matplotlib.pyplot as plt

    path = pathlib.Path(out_dir) / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
