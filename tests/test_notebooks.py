"""The notebooks of colabs/: stored without outputs, and runnable top to bottom.

Each notebook is executed with nbclient in its small setting (``EMC2JAX_SMOKE=1``:
tiny models, a few steps), in a fresh ``python3`` kernel of this environment, so
an API change that breaks a notebook fails here instead of on a user's Colab.
The kernel sees one CPU device: the notebooks adapt their batch to the device
count, and the multi-device engine has its own tests (``test_train.py``).
"""

from __future__ import annotations

import asyncio
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

COLABS = pathlib.Path(__file__).resolve().parents[1] / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
EXPECTED = {"custom_training", "emc2_quickstart", "gmm_theory"}
# Per cell; the slowest smoke cell (two short trainings with evaluation) takes
# well under a minute on two busy CPU cores.
CELL_TIMEOUT_S = 600
COLAB_URL = "https://colab.research.google.com/github/emc2jax/emc2jax/blob/main/colabs/{}.ipynb"


def _read(path: pathlib.Path):
    return nbformat.read(path, as_version=nbformat.NO_CONVERT)


def test_every_notebook_is_collected():
    assert {p.stem for p in NOTEBOOKS} >= EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_clean(path):
    """Valid nbformat, outputs stripped, and the shared opening: badge, install, runtime check."""
    nb = _read(path)
    nbformat.validate(nb)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(code_cells) if c.outputs or c.execution_count is not None]
    assert not dirty, f"{path.name}: code cells {dirty} carry outputs; strip them"
    assert COLAB_URL.format(path.stem) in nb.cells[0].source, "first cell: Open in Colab badge"
    install = code_cells[0].source
    assert (
        "import emc2jax" in install and "pip install" in install and "except ImportError" in install
    )
    assert "jax.devices()" in code_cells[1].source and "EMC2JAX_SMOKE" in code_cells[1].source


def _smoke_client(path: pathlib.Path, workdir: pathlib.Path):
    client = nbclient.NotebookClient(
        _read(path),
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    )
    env = dict(os.environ)
    # The kernel is a new process: it must not inherit the 8 fake devices of the
    # test session (tests/conftest.py), which would only slow it down.
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", ""
    )
    env.update(
        EMC2JAX_SMOKE="1",
        EMC2JAX_WORKDIR=str(workdir),
        JAX_PLATFORMS="cpu",
        MPLBACKEND="Agg",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    return client.async_execute(env=env)


@pytest.mark.slow
def test_notebooks_run_in_smoke_mode(tmp_path):
    """All notebooks at once, one kernel each: their time is mostly single-threaded
    XLA compilation, so running them side by side uses every core."""
    workdirs = {path: tmp_path / path.stem for path in NOTEBOOKS}
    for workdir in workdirs.values():
        workdir.mkdir()

    async def run_all():
        runs = [_smoke_client(path, workdir) for path, workdir in workdirs.items()]
        return await asyncio.gather(*runs, return_exceptions=True)

    outcomes = asyncio.run(run_all())
    failures = [
        f"{path.name}:\n{outcome}"
        for path, outcome in zip(NOTEBOOKS, outcomes, strict=True)
        if isinstance(outcome, BaseException)
    ]
    if failures:
        pytest.fail("notebooks failed in smoke mode:\n\n" + "\n\n".join(failures), pytrace=False)
