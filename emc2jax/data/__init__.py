"""Input data: TFDS sources, the grain pipeline, on-device augmentation.

Modules (import the one you need; they pull in different heavy libraries):

- :mod:`emc2jax.data.sources`: ``load_source(name, split, data_dir=...)``,
  random access to TFDS datasets (array_record, no TensorFlow to read).
- :mod:`emc2jax.data.builders`: the offline TFDS builders ``digits`` and
  ``gmm``, built on first use.
- :mod:`emc2jax.data.pipeline`: ``make_dataset`` (grain: shuffle, repeat,
  per-process batches with global indices, checkpointable iterator),
  ``gather`` (random access by index), ``to_device_array``.
- :mod:`emc2jax.data.augment`: pure-JAX augmentations, each view a function
  of (key, example index, augmentation id); SimCLR / STL-10 / digits presets.
"""
