"""grain pipeline under tfds.testing.mock_data: shapes, indices, shards, checkpoints."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from emc2jax.data import pipeline, sources

# USE_CODE: the mock builds the dataset from the builder's code (no metadata
# files needed) and patches the array_record reader behind `tfds.data_source`.
_MOCK = dict(policy=tfds.testing.MockPolicy.USE_CODE)


# The mocked source keeps working after the mock is undone, and the mock must
# not outlive the fixture: it patches every TFDS builder (ours included).
@pytest.fixture(scope="module")
def cifar10():
    with tfds.testing.mock_data(num_examples=24, **_MOCK):
        return sources.load_source("cifar10", "train", data_dir="/nonexistent")


@pytest.fixture(scope="module")
def stl10():
    with tfds.testing.mock_data(num_examples=12, **_MOCK):
        return sources.load_source("stl10", "unlabelled", data_dir="/nonexistent")


def _epoch_per_process(source, *, batch, processes, seed=0):
    out = []
    for p in range(processes):
        ds = pipeline.make_dataset(
            source,
            global_batch_size=batch,
            seed=seed,
            num_epochs=1,
            process_index=p,
            process_count=processes,
        )
        out.append(list(ds))
    return out


def test_batches_shapes_dtypes(cifar10, stl10):
    for source, shape in ((cifar10, (32, 32, 3)), (stl10, (96, 96, 3))):
        ds = pipeline.make_dataset(source, global_batch_size=4, seed=0)  # jax: 1 process.
        batch = next(iter(ds))
        assert set(batch) == {"image", "label", "index"}
        assert batch["image"].shape == (4, *shape) and batch["image"].dtype == np.uint8
        assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
        assert batch["index"].shape == (4,) and batch["index"].dtype == np.int32
        # Each row is the source's example at that global index.
        for row, i in enumerate(batch["index"]):
            np.testing.assert_array_equal(batch["image"][row], source[int(i)]["image"])


def test_process_shards_are_disjoint_and_cover_an_epoch(cifar10):
    per_process = _epoch_per_process(cifar10, batch=8, processes=2)
    indices = [np.concatenate([b["index"] for b in batches]) for batches in per_process]
    assert [len(b) for b in per_process] == [3, 3]
    assert all(b["image"].shape[0] == 4 for batches in per_process for b in batches)
    assert not set(indices[0]) & set(indices[1])
    assert sorted(np.concatenate(indices)) == list(range(24))  # Unique within the epoch.


def test_global_order_does_not_depend_on_process_count(cifar10):
    # Global batch t = concatenation of the processes' batch t, for any count.
    one = _epoch_per_process(cifar10, batch=8, processes=1)[0]
    for processes in (2, 4):
        shards = _epoch_per_process(cifar10, batch=8, processes=processes)
        for t, batch in enumerate(one):
            joined = np.concatenate([shard[t]["index"] for shard in shards])
            np.testing.assert_array_equal(joined, batch["index"])


def test_epochs_reshuffle_and_seeds_differ(cifar10):
    ds = pipeline.make_dataset(
        cifar10, global_batch_size=24, seed=0, num_epochs=2, process_index=0, process_count=1
    )
    first, second = (b["index"] for b in ds)
    assert sorted(first) == sorted(second) == list(range(24))
    assert not np.array_equal(first, second)
    other = next(
        iter(
            pipeline.make_dataset(
                cifar10, global_batch_size=24, seed=1, process_index=0, process_count=1
            )
        )
    )
    assert not np.array_equal(other["index"], first)
    ordered = next(
        iter(
            pipeline.make_dataset(
                cifar10,
                global_batch_size=24,
                seed=0,
                shuffle=False,
                process_index=0,
                process_count=1,
            )
        )
    )
    np.testing.assert_array_equal(ordered["index"], np.arange(24))


def test_finite_epochs_drop_or_keep_the_remainder(cifar10):
    kw = dict(global_batch_size=10, seed=0, num_epochs=2, process_index=0, process_count=1)
    assert [len(b["index"]) for b in pipeline.make_dataset(cifar10, **kw)] == [10] * 4
    kept = list(pipeline.make_dataset(cifar10, drop_remainder=False, **kw))
    assert [len(b["index"]) for b in kept] == [10, 10, 10, 10, 8]


def test_iterator_checkpoint_round_trip(stl10):
    ds = pipeline.make_dataset(stl10, global_batch_size=4, seed=3, process_index=0, process_count=1)
    it = iter(ds)
    for _ in range(4):  # Past the first epoch boundary (12 examples).
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # What a checkpoint stores.
    expected = [next(it) for _ in range(3)]
    restored = iter(ds)
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_gather_and_to_device_array(cifar10):
    batch = pipeline.gather(cifar10, np.array([5, 0, 5]))
    np.testing.assert_array_equal(batch["index"], [5, 0, 5])
    np.testing.assert_array_equal(batch["image"][0], cifar10[5]["image"])
    np.testing.assert_array_equal(batch["image"][0], batch["image"][2])
    assert batch["label"].dtype == np.int32
    images = pipeline.to_device_array(cifar10)
    assert images.shape == (24, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[7], cifar10[7]["image"])
    labels = pipeline.to_device_array(cifar10, "label")
    assert labels.shape == (24,) and labels[7] == cifar10[7]["label"]
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 24\)"):
        pipeline.gather(cifar10, np.array([3, 24]))
    with pytest.raises(ValueError, match="1-D integer"):
        pipeline.gather(cifar10, np.array([1.0]))
    with pytest.raises(ValueError, match="no feature 'caption'"):
        pipeline.to_device_array(cifar10, "caption")


def test_bad_arguments(cifar10):
    with pytest.raises(ValueError, match="divisible by process_count=3"):
        pipeline.make_dataset(
            cifar10, global_batch_size=8, seed=0, process_index=0, process_count=3
        )
    with pytest.raises(ValueError, match=r"process_index=2 not in \[0, 2\)"):
        pipeline.make_dataset(
            cifar10, global_batch_size=8, seed=0, process_index=2, process_count=2
        )
    with pytest.raises(ValueError, match="num_epochs=0"):
        pipeline.make_dataset(cifar10, global_batch_size=8, seed=0, num_epochs=0)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_restore(tmp_path):
    source = sources.load_source("digits", "train", data_dir=str(tmp_path))
    assert (tmp_path / "digits" / "1.0.0").is_dir()  # Real files, no mock.
    kw = dict(global_batch_size=16, seed=0, process_index=0, process_count=1)
    plain = iter(pipeline.make_dataset(source, **kw))
    workers = iter(pipeline.make_dataset(source, worker_count=1, **kw))
    restored = iter(pipeline.make_dataset(source, worker_count=1, **kw))
    try:
        for _ in range(3):
            np.testing.assert_array_equal(next(workers)["index"], next(plain)["index"])
        restored.set_state(workers.get_state())
        np.testing.assert_array_equal(next(restored)["index"], next(plain)["index"])
    finally:
        workers.close()
        restored.close()
