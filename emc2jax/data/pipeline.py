"""grain input pipeline over a random-access source, plus random access by index.

``make_dataset`` orders the examples of all processes as ONE global stream

    source --(tag global index)--> shuffle(seed) --> repeat --> global batches

and process ``p`` of ``P`` reads rows ``[p * B/P, (p+1) * B/P)`` of every global
batch of size ``B``. So the global batch sequence depends on ``(seed, B)`` only,
not on how many hosts share the run (a run restarted on another topology sees the
same data), the per-process shards are disjoint and cover each global batch, and
no process ever reads another's examples. grain implements the row split as
``batch(B/P)[p::P]`` on a ``MapDataset``, so it is exact and lazy.

Every example carries ``"index"``, its position in the source (the global
dataset index the samplers key their per-example state on). The iterator is a
grain ``DatasetIterator``: ``it.get_state()`` / ``it.set_state(state)``
checkpoint it, and a restored iterator continues with exactly the next batch.
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import numpy as np

from emc2jax.data.sources import Source

__all__ = ["gather", "make_dataset", "standardize_example", "to_device_array"]


def standardize_example(index: int, example: dict[str, Any]) -> dict[str, np.ndarray]:
    """The example as the pipeline yields it: ``image``, ``label``, ``index``.

    Other features (file names, TFDS ids) are dropped: they are strings, which
    cannot go to a device. A missing label becomes -1.
    """
    return {
        "image": np.asarray(example["image"]),
        "label": np.asarray(example.get("label", -1), dtype=np.int32),
        "index": np.asarray(index, dtype=np.int32),
    }


def _tag_global_index(index: int, example: dict[str, Any], *, size: int) -> dict[str, np.ndarray]:
    return standardize_example(index % size, example)


def make_dataset(
    source: Source,
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """The training/eval stream of this process's per-process batches.

    Args:
      source: random-access source (``sources.load_source``), ``m`` examples.
      global_batch_size: ``B``, the batch summed over processes; must divide
        by ``process_count``.
      seed: shuffle seed; each epoch is reshuffled (grain folds the epoch in).
      shuffle: shuffle (training) or keep source order (evaluation).
      num_epochs: passes over the data; None repeats forever.
      process_index / process_count: this process's place among the hosts;
        default ``jax.process_index()`` / ``jax.process_count()``.
      worker_count: grain worker processes reading and batching (0: threads of
        this process only). The batches are the same for any count, but the
        iterator state's format is not: restore with the count it was saved
        with. Close such an iterator (``it.close()``) to stop its workers.
      drop_remainder: with a finite ``num_epochs``, drop the last partial
        global batch (otherwise its rows are split in ``B/P`` chunks, so some
        processes may get one batch fewer or a short one). Batches run across
        epoch boundaries: batch ``t`` is elements ``[tB, (t+1)B)`` of the
        repeated stream.

    Returns:
      A grain ``IterDataset``; its iterator yields dicts
      ``{"image": (B/P, ...) source dtype, "label": (B/P,) int32,
      "index": (B/P,) int32 global dataset index}``.
    """
    if process_index is None or process_count is None:
        import jax  # Lazy: the pipeline itself needs no accelerator.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be positive and divisible by "
            f"process_count={process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs={num_epochs} must be positive (or None: forever)")
    if worker_count < 0:
        raise ValueError(f"worker_count={worker_count} must be >= 0")
    if len(source) == 0:
        raise ValueError("the source is empty")

    # grain passes indices past the end on later epochs (shuffle and repeat
    # index the parent modulo its length), hence the modulo. A partial of a
    # module-level function, not a lambda: worker processes pickle it.
    tag = functools.partial(_tag_global_index, size=len(source))
    ds = grain.MapDataset.source(source).map_with_index(tag)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if num_epochs is not None and drop_remainder:
        # Cut to whole global batches so every process gets the same count.
        ds = ds[: len(ds) // global_batch_size * global_batch_size]
    local_batch_size = global_batch_size // process_count
    ds = ds.batch(local_batch_size, drop_remainder=drop_remainder)
    ds = ds[process_index::process_count]
    iter_ds = ds.to_iter_dataset()
    if worker_count > 0:
        from absl import flags

        # grain's workers read absl flags; outside an absl app (notebooks,
        # plain scripts) they are unparsed and grain raises. Defaults it is.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter_ds


def _stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


def gather(source: Source, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Examples of ``source`` by global index, stacked like a pipeline batch.

    The EMC² sampler needs the images of carried-over negatives, which live
    anywhere in the dataset: this is its random access path.

    Args:
      source: random-access source, ``m`` examples.
      indices: (n,) integer indices in ``[0, m)``.

    Returns:
      ``{"image": (n, ...), "label": (n,) int32, "index": (n,) int32}``.
    """
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(
            f"indices must be a 1-D integer array, got {indices.dtype} {indices.shape}"
        )
    if indices.size == 0:
        raise ValueError("indices is empty")
    m = len(source)
    if indices.min() < 0 or indices.max() >= m:
        raise ValueError(f"indices must lie in [0, {m}), got [{indices.min()}, {indices.max()}]")
    # One read per index: TFDS's batched `__getitems__` is not implemented by
    # every source (sliced, resized or mocked ones), and the sampler's reads are
    # few (one per carried-over negative).
    return _stack([standardize_example(int(i), source[int(i)]) for i in indices])


def to_device_array(source: Source, key: str = "image") -> np.ndarray:
    """Feature ``key`` of every example, stacked: (m, ...) host array.

    For small datasets (digits, gmm) that the engine keeps resident on the
    device and augments there; ``"label"`` gives the (m,) int32 labels.
    """
    m = len(source)
    if m == 0:
        raise ValueError("the source is empty")
    if key in ("label", "index"):
        return gather(source, np.arange(m))[key]
    first = source[0]
    if key not in first:
        raise ValueError(f"no feature {key!r}; the examples have {sorted(first)}")
    return np.stack([np.asarray(source[i][key]) for i in range(m)])
