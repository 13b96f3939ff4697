"""Checkpoints: the only module that imports orbax.

A checkpoint of step t is one directory ``<workdir>/checkpoints/<t>/`` holding three
items saved together (``ocp.args.Composite``):

- ``state``: the train state, a pytree of arrays (params, optimizer state, model
  state, sampler tables), via ``StandardSave``;
- ``data``: the data iterator's state (a grain iterator's ``get_state()``: a dict,
  or bytes for ``DataLoader`` iterators), one JSON file *per process*, since in a
  multi-host run every process reads its own slice of the data;
- ``config``: the run's config as JSON, to refuse resuming under another config
  (:func:`check_compatible`).

Atomicity: orbax writes a step into ``<t>.orbax-checkpoint-tmp-<id>/`` and renames it
to ``<t>/`` only once every item is written (on object stores, which cannot
rename, it writes a ``commit_success.txt`` last instead). A process killed during a
save therefore leaves at most a temporary directory, which is never listed as a
step and is deleted when the next :class:`Checkpointer` opens the directory: the
previous complete checkpoint stays the latest one.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp

__all__ = [
    "COMPATIBILITY_KEYS",
    "Checkpointer",
    "IncompatibleCheckpointError",
    "Restored",
    "check_compatible",
    "config_to_json_dict",
]

# Config keys (dotted prefixes) that must match for a checkpoint to be resumed:
# they fix the shapes of the state (model, dataset size -> sampler tables, batch
# size, optimizer state) or what the state means (method, sampler).
COMPATIBILITY_KEYS = (
    "method",
    "batch_size",
    "model",
    "sampler",
    "dataset",
    "optimizer.name",
)
# Keys under those prefixes that only say where or how fast to read the data.
IGNORED_KEYS = (
    "dataset.data_dir",
    "dataset.num_workers",
    "dataset.worker_count",
    "dataset.prefetch",
    "dataset.prefetch_buffer_size",
    "dataset.worker_buffer_size",
    "dataset.download",
)


class IncompatibleCheckpointError(ValueError):
    """The checkpoint was written under a config with another state layout."""


class Restored(NamedTuple):
    """What :meth:`Checkpointer.restore` returns.

    Attributes:
      state: the train state, with the structure, shapes, dtypes and shardings of
        ``abstract_state``.
      data_iterator_state: this process's iterator state as saved (dict or bytes),
        or None when none was saved.
      config: the saved config as a JSON dict.
    """

    state: Any
    data_iterator_state: dict | bytes | None
    config: dict


# ----------------------------------------------------------------------------
# Per-process JSON item (data iterator states)
# ----------------------------------------------------------------------------


def _process_filename() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class _ProcessLocalJsonHandler(ocp.handlers.JsonCheckpointHandler):
    """Like orbax's JSON handler, but every process writes (and reads) its own file
    instead of the primary host writing one for all."""

    async def _save_fn(self, x, directory):
        (directory / _process_filename()).write_text(json.dumps(x))

    def restore(self, directory, item=None, args=None):
        del item, args
        path = directory / _process_filename()
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: was the checkpoint written by another number of "
                f"processes than the {jax.process_count()} of this run?"
            )
        return json.loads(path.read_text())


@ocp.args.register_with_handler(_ProcessLocalJsonHandler, for_save=True)
@dataclasses.dataclass
class _ProcessLocalJsonSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(_ProcessLocalJsonHandler, for_restore=True)
@dataclasses.dataclass
class _ProcessLocalJsonRestore(ocp.args.CheckpointArgs):
    item: Any = None


def _encode_iterator_state(state: Mapping | bytes | None) -> dict:
    # JSON snapshot taken now: the iterator keeps moving while the save runs async.
    if state is None:
        return {"kind": "none"}
    if isinstance(state, bytes | bytearray):
        return {"kind": "bytes", "value": base64.b64encode(bytes(state)).decode("ascii")}
    if isinstance(state, Mapping):
        return {"kind": "json", "value": json.loads(json.dumps(state))}
    raise TypeError(
        f"data_iterator_state must be a JSON-able dict, bytes or None, got {type(state)}"
    )


def _decode_iterator_state(saved: dict) -> dict | bytes | None:
    if saved["kind"] == "bytes":
        return base64.b64decode(saved["value"])
    return saved.get("value")


# ----------------------------------------------------------------------------
# Config compatibility
# ----------------------------------------------------------------------------


def config_to_json_dict(config: ml_collections.ConfigDict | Mapping) -> dict:
    """The config as plain JSON types (tuples become lists), as it is saved."""
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat if flat or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def _selected(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def check_compatible(
    saved_config: Mapping,
    config: ml_collections.ConfigDict | Mapping,
    *,
    keys: Iterable[str] = COMPATIBILITY_KEYS,
    ignored: Iterable[str] = IGNORED_KEYS,
) -> None:
    """Refuses to resume a checkpoint written under an incompatible config.

    Args:
      saved_config: the config stored in the checkpoint (JSON dict).
      config: the current run's config.
      keys: dotted key prefixes that must agree (default :data:`COMPATIBILITY_KEYS`).
      ignored: dotted keys under those prefixes that may differ.

    Raises:
      IncompatibleCheckpointError (a ValueError) naming every differing key with
      its saved and current values.
    """
    keys, ignored = tuple(keys), tuple(ignored)
    saved = _flatten(config_to_json_dict(saved_config))
    current = _flatten(config_to_json_dict(config))
    missing = object()
    differences = []
    for key in sorted(set(saved) | set(current)):
        if not _selected(key, keys) or _selected(key, ignored):
            continue
        old, new = saved.get(key, missing), current.get(key, missing)
        if old != new:
            show = lambda v: "<absent>" if v is missing else repr(v)  # noqa: E731
            differences.append(f"{key}: checkpoint {show(old)}, now {show(new)}")
    if differences:
        raise IncompatibleCheckpointError(
            "the checkpoint was written under a different config, whose state does not "
            "fit this run:\n  "
            + "\n  ".join(differences)
            + "\nUse another workdir, or rerun with the checkpoint's config."
        )


# ----------------------------------------------------------------------------
# Checkpointer
# ----------------------------------------------------------------------------


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves and restores (train state, data iterator state, config) by step.

    Saves are asynchronous: :meth:`save` returns once the arrays are copied off the
    devices and the files are written in the background; call
    :meth:`wait_until_finished` (or :meth:`close`) before reading them from
    another process or exiting.

    Usable as a context manager (closes on exit).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
    ):
        """
        Args:
          directory: where the step directories go (created if absent).
          max_to_keep: keep the latest N complete checkpoints (None keeps all).
          async_save: write in a background thread.
        """
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        policy = ocp.checkpoint_managers.LatestN(max_to_keep) if max_to_keep else None
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            create=True,
            # Leftovers of a save that was killed are deleted, never restored.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The latest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def save(
        self,
        step: int,
        *,
        state: Any,
        data_iterator_state: Mapping | bytes | None = None,
        config: ml_collections.ConfigDict | Mapping | None = None,
    ) -> bool:
        """Starts saving a checkpoint of ``step``.

        Args:
          step: the training step the state corresponds to.
          state: pytree of arrays (``jax.Array`` or numpy).
          data_iterator_state: the data iterator's ``get_state()`` (JSON-able dict or
            bytes), or None.
          config: the run's config (ConfigDict or dict).

        Returns:
          False when a checkpoint of ``step`` already exists (nothing is written),
          True otherwise.
        """
        step = int(step)
        if step in self._manager.all_steps():
            logging.info("checkpoint of step %d already exists in %s", step, self.directory)
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=_ProcessLocalJsonSave(_encode_iterator_state(data_iterator_state)),
            config=ocp.args.JsonSave(config_to_json_dict(config or {})),
        )
        return bool(self._manager.save(step, args=args, force=True))

    def _step_or_latest(self, step: int | None) -> int:
        self._manager.wait_until_finished()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no complete checkpoint of step {step} in {self.directory}; "
                f"steps: {self.all_steps()}"
            )
        return step

    def read_config(self, step: int | None = None) -> dict:
        """The config saved with ``step`` (default: the latest), without the state."""
        step = self._step_or_latest(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return restored.config

    def restore(
        self,
        step: int | None = None,
        *,
        abstract_state: Any,
        config: ml_collections.ConfigDict | Mapping | None = None,
    ) -> Restored:
        """Restores the checkpoint of ``step`` (default: the latest complete one).

        Args:
          step: which checkpoint; None for the latest.
          abstract_state: the state's structure: a pytree of arrays (e.g. a freshly
            initialised train state) or ``jax.ShapeDtypeStruct`` (with shardings to
            restore onto a mesh, e.g. replicated).
          config: when given, the saved config is checked against it first
            (:func:`check_compatible`) and the state is not read if they differ.

        Returns:
          :class:`Restored` ``(state, data_iterator_state, config)``.

        Raises:
          FileNotFoundError: no such complete checkpoint.
          IncompatibleCheckpointError: ``config`` differs from the saved one.
        """
        step = self._step_or_latest(step)
        if config is not None:
            check_compatible(self.read_config(step), config)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(abstract_state)),
            data=_ProcessLocalJsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        restored = self._manager.restore(step, args=args)
        return Restored(
            state=restored.state,
            data_iterator_state=_decode_iterator_state(restored.data),
            config=restored.config,
        )

    def wait_until_finished(self) -> None:
        """Blocks until the pending asynchronous save (if any) is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's resources."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
