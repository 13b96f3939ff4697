"""Random-access data sources by name: TFDS ``data_source`` (array_record).

``load_source(name, split, data_dir=...)`` returns a random-access source
(``len(source)``, ``source[i]``) whose examples are dicts of NumPy arrays:

- ``"image"``: uint8 (H, W, C) for image datasets; for ``gmm`` the point
  itself, float32 (d,) (non-uint8 inputs are taken as already-float);
- ``"label"``: int (-1 where the split is unlabelled, e.g. STL-10
  ``unlabelled``).

Reading needs neither network nor TensorFlow (``tfds.data_source`` over
array_record files). The offline datasets ``digits`` and ``gmm`` are built on
first use (:mod:`emc2jax.data.builders`); the others must be prepared once with
TFDS, which needs network and TensorFlow: a missing one raises
:class:`DatasetNotPreparedError` with the exact command.

Names: ``digits``, ``gmm`` (``gmm/<config>``), ``cifar10``, ``cifar100``,
``stl10``, ``imagenette`` (``imagenette/<tfds config>``), ``imagenet2012``,
and the class subsets of :data:`CLASS_SUBSETS`: ``imagenet100`` (the 100
ImageNet classes of CMC, Tian et al. 2019, used by the EMC² paper), read from
the prepared ``imagenet2012`` with its labels renumbered 0..99.
Splits take TFDS syntax, e.g. ``"unlabelled[:500]"`` (the EMC² paper's
gradient-norm subset).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

__all__ = [
    "CLASS_SUBSETS",
    "ClassSubsetSource",
    "DATASETS",
    "DatasetNotPreparedError",
    "DatasetSpec",
    "ResizedSource",
    "Source",
    "default_data_dir",
    "get_spec",
    "IMAGENET100_CLASSES",
    "class_subset_indices",
    "load_source",
    "resize_center_crop",
]


class Source(Protocol):
    """What the pipeline needs: random access by index to dicts of arrays."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS dataset is not prepared (as array_record) in the data directory."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a dataset known to emc2jax.

    Attributes:
      name: emc2jax name (the key of :data:`DATASETS`, plus ``/config``).
      tfds_name: TFDS builder name, with config where it matters.
      splits: the TFDS split names.
      num_classes: number of labels.
      image_shape: shape of ``"image"``; None when the size varies per image
        (then images are resized to ``default_image_size``, see
        :func:`load_source`).
      pretrain_split / train_split / eval_split: the splits for contrastive
        pretraining, for fitting a probe and for testing it.
      offline: built locally by :mod:`emc2jax.data.builders` (no network).
      default_image_size: square size for variable-size datasets.
      manual_download: how to get the raw files, for datasets TFDS cannot
        download itself.
      class_subset: for a named class subset of a TFDS dataset, the class
        names (TFDS label names, e.g. WordNet ids) kept, in new-label order.
    """

    name: str
    tfds_name: str
    splits: tuple[str, ...]
    num_classes: int
    image_shape: tuple[int, ...] | None
    pretrain_split: str
    train_split: str
    eval_split: str
    offline: bool = False
    default_image_size: int | None = None
    manual_download: str | None = None
    class_subset: tuple[str, ...] | None = None


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        "digits", "digits", ("train", "test"), 10, (8, 8, 1), "train", "train", "test", True
    ),
    "gmm": DatasetSpec(
        "gmm", "gmm/fisher", ("train", "test"), 4, (20,), "train", "train", "test", True
    ),
    "cifar10": DatasetSpec(
        "cifar10", "cifar10", ("train", "test"), 10, (32, 32, 3), "train", "train", "test"
    ),
    "cifar100": DatasetSpec(
        "cifar100", "cifar100", ("train", "test"), 100, (32, 32, 3), "train", "train", "test"
    ),
    "stl10": DatasetSpec(
        "stl10",
        "stl10",
        ("unlabelled", "train", "test"),
        10,
        (96, 96, 3),
        "unlabelled",
        "train",
        "test",
    ),
    "imagenette": DatasetSpec(
        "imagenette",
        "imagenette/320px-v2",
        ("train", "validation"),
        10,
        None,
        "train",
        "train",
        "validation",
        default_image_size=224,
    ),
    "imagenet2012": DatasetSpec(
        "imagenet2012",
        "imagenet2012",
        ("train", "validation"),
        1000,
        None,
        "train",
        "train",
        "validation",
        default_image_size=224,
        manual_download=(
            "ImageNet cannot be downloaded by TFDS: get ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar from https://image-net.org and put them in the manual "
            "dir (default DATA_DIR/downloads/manual, or pass --manual_dir=DIR)."
        ),
    ),
}


# ImageNet-100: the 100 classes of CMC (Tian et al. 2019,
# github.com/HobbitLong/CMC imagenet100.txt), the subset the EMC² paper and
# SogCLR train on. Order = new label order (CMC's file order).
IMAGENET100_CLASSES = (
    "n02869837", "n01749939", "n02488291", "n02107142", "n13037406", "n02091831",
    "n04517823", "n04589890", "n03062245", "n01773797", "n01735189", "n07831146",
    "n07753275", "n03085013", "n04485082", "n02105505", "n01983481", "n02788148",
    "n03530642", "n04435653", "n02086910", "n02859443", "n13040303", "n03594734",
    "n02085620", "n02099849", "n01558993", "n04493381", "n02109047", "n04111531",
    "n02877765", "n04429376", "n02009229", "n01978455", "n02106550", "n01820546",
    "n01692333", "n07714571", "n02974003", "n02114855", "n03785016", "n03764736",
    "n03775546", "n02087046", "n07836838", "n04099969", "n04592741", "n03891251",
    "n02701002", "n03379051", "n02259212", "n07715103", "n03947888", "n04026417",
    "n02326432", "n03637318", "n01980166", "n02113799", "n02086240", "n03903868",
    "n02483362", "n04127249", "n02089973", "n03017168", "n02093428", "n02804414",
    "n02396427", "n04418357", "n02172182", "n01729322", "n02113978", "n03787032",
    "n02089867", "n02119022", "n03777754", "n04238763", "n02231487", "n03032252",
    "n02138441", "n02104029", "n03837869", "n03494278", "n04136333", "n03794056",
    "n03492542", "n02018207", "n04067472", "n03930630", "n03584829", "n02123045",
    "n04229816", "n02100583", "n03642806", "n04336792", "n03259280", "n02116738",
    "n02108089", "n03424325", "n01855672", "n02090622",
)  # fmt: skip

# Named class subsets of the datasets above: same TFDS data, fewer classes.
CLASS_SUBSETS: dict[str, DatasetSpec] = {
    "imagenet100": dataclasses.replace(
        DATASETS["imagenet2012"],
        name="imagenet100",
        num_classes=len(IMAGENET100_CLASSES),
        class_subset=IMAGENET100_CLASSES,
    ),
}


def default_data_dir() -> str:
    """``$TFDS_DATA_DIR`` if set, else ``~/tensorflow_datasets`` (TFDS's default)."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def get_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``name`` (``"base"`` or ``"base/config"``)."""
    if name in CLASS_SUBSETS:
        return CLASS_SUBSETS[name]
    base, _, config = name.partition("/")
    if base not in DATASETS:
        known = sorted([*DATASETS, *CLASS_SUBSETS])
        raise ValueError(f"unknown dataset {name!r}; known: {known}")
    spec = DATASETS[base]
    if not config:
        return spec
    if base == "gmm":
        from emc2jax.data.builders import Gmm  # Lazy: avoids importing builders eagerly.

        configs = {c.name: c for c in Gmm.BUILDER_CONFIGS}
        if config not in configs:
            raise ValueError(f"unknown gmm config {config!r}; known: {sorted(configs)}")
        c = configs[config]
        return dataclasses.replace(
            spec,
            name=name,
            tfds_name=name,
            num_classes=c.num_components,
            image_shape=(c.dim,),
        )
    return dataclasses.replace(
        spec, name=name, tfds_name=f"{spec.tfds_name.split('/')[0]}/{config}"
    )


def _check_split(spec: DatasetSpec, split: str) -> None:
    # TFDS split syntax: "train", "train[:500]", "train[10%:]+test", ...
    for part in split.split("+"):
        base = part.split("[")[0].strip()
        if base not in spec.splits:
            raise ValueError(
                f"dataset {spec.name!r} has no split {base!r} (from {split!r}); "
                f"its splits are {spec.splits}"
            )


def _not_prepared_message(spec: DatasetSpec, data_dir: str, reason: str) -> str:
    manual = f"\n{spec.manual_download}\n" if spec.manual_download else ""
    return (
        f"Dataset {spec.name!r} (TFDS {spec.tfds_name!r}) {reason}.\n"
        f"Prepare it once, as array_record, on a machine with network access and TensorFlow "
        f"installed (preparing needs both; reading afterwards needs neither):\n{manual}\n"
        f"    tfds build {spec.tfds_name} --data_dir={data_dir} --file_format=array_record\n\n"
        f"or in Python:\n\n"
        f"    import tensorflow_datasets as tfds\n"
        f"    tfds.builder({spec.tfds_name!r}, data_dir={data_dir!r}, "
        f"file_format='array_record').download_and_prepare()\n\n"
        f"If you prepare it elsewhere, copy the resulting directory into {data_dir!r}, or "
        f"point data_dir (or $TFDS_DATA_DIR) at an existing TFDS data directory."
    )


def load_source(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    image_size: int | None = None,
) -> Source:
    """Random-access source of ``split`` of dataset ``name``.

    Args:
      name: a key of :data:`DATASETS`, optionally ``/config`` (``gmm/isotropic``,
        ``imagenette/160px-v2``).
      split: TFDS split string (``"train"``, ``"unlabelled[:500]"``).
      data_dir: TFDS data directory; None or "": :func:`default_data_dir`.
      image_size: if set, images are resized (shorter side) and centre-cropped
        to ``image_size`` x ``image_size``; variable-size datasets default to
        their ``default_image_size`` so that batches stack.

    Returns:
      A source with ``len`` and ``__getitem__`` returning dicts of NumPy arrays
      (see the module docstring).

    Raises:
      DatasetNotPreparedError: the dataset needs preparing with TFDS first.
      ValueError: unknown name or split.
    """
    spec = get_spec(name)
    _check_split(spec, split)
    if image_size is not None and (
        image_size < 1 or (spec.image_shape is not None and len(spec.image_shape) != 3)
    ):
        raise ValueError(f"image_size={image_size} needs an image dataset and a size >= 1")
    data_dir = os.fspath(data_dir) if data_dir else default_data_dir()
    if spec.offline:
        from emc2jax.data import builders  # Lazy: sklearn and builders only when used.

        config = spec.tfds_name.partition("/")[2] or None
        source = builders.prepare(spec.tfds_name.split("/")[0], data_dir=data_dir, config=config)
        source = source.as_data_source(split=split)
    else:
        source = _tfds_source(spec, split, data_dir)
    if image_size is None and spec.image_shape is None:
        image_size = spec.default_image_size
    if image_size is not None and (spec.image_shape is None or spec.image_shape[0] != image_size):
        source = ResizedSource(source, image_size)
    return source


def _tfds_source(spec: DatasetSpec, split: str, data_dir: str) -> Source:
    import tensorflow_datasets as tfds

    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    try:
        source = builder.as_data_source(split=split)
    except Exception:  # TFDS's own errors here are confusing, see below.
        # Not prepared, TFDS reports "Random access ... TFRECORD is not supported"
        # (an unprepared dataset defaults to tfrecord), so diagnose it ourselves.
        if not builder.is_prepared():
            reason = (
                f"is not prepared in data_dir {data_dir!r} "
                f"(no dataset at {os.fspath(builder.data_path)})"
            )
        elif builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            reason = (
                f"is prepared at {os.fspath(builder.data_path)} as "
                f"{builder.info.file_format.value}, which has no random access: prepare it "
                f"again as array_record (into another data_dir, or delete that directory)"
            )
        else:
            raise
        # `from None`: the TFDS traceback would only distract from the fix.
        raise DatasetNotPreparedError(_not_prepared_message(spec, data_dir, reason)) from None
    if spec.class_subset is None:
        return source
    labels = _split_labels(spec.tfds_name, data_dir, split)
    if len(labels) != len(source):  # pragma: no cover - a dataset changed under us
        _split_labels.cache_clear()
        labels = _split_labels(spec.tfds_name, data_dir, split)
    indices, new_labels = class_subset_indices(
        labels, builder.info.features["label"].names, spec.class_subset
    )
    return ClassSubsetSource(source, indices, new_labels)


@functools.lru_cache(maxsize=16)
def _split_labels(tfds_name: str, data_dir: str, split: str) -> np.ndarray:
    """(n,) int64 labels of every example of ``split``, images left encoded.

    One pass over the records with the other features' decoding skipped
    (``tfds.decode.SkipDecoding``: no JPEG is decoded), a couple of minutes for
    ImageNet's 1.28M training records; cached per process, because a run
    opens the same split several times (training, probe, evaluation).
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(tfds_name, data_dir=data_dir)
    skip = {k: tfds.decode.SkipDecoding() for k in builder.info.features.keys() if k != "label"}
    records = builder.as_data_source(split=split, decoders=skip)
    n = len(records)
    return np.fromiter((records[i]["label"] for i in range(n)), dtype=np.int64, count=n)


def class_subset_indices(
    labels: np.ndarray, class_names: Sequence[str], subset: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """The examples whose class is in ``subset``, and their renumbered labels.

    Args:
      labels: (n,) int labels of a split, indices into ``class_names``.
      class_names: every class's name in label order (TFDS ``ClassLabel.names``).
      subset: the names to keep, distinct; a kept example's new label is its
        class's position in ``subset``.

    Returns:
      ``(indices, new_labels)``: (k,) int64 positions in the split, ascending,
      and (k,) int32 labels in ``[0, len(subset))``.

    Raises:
      ValueError: a name of ``subset`` is repeated or not a class.
    """
    position = {name: i for i, name in enumerate(class_names)}
    unknown = [name for name in subset if name not in position]
    if unknown:
        raise ValueError(f"class subset names {unknown[:5]} are not classes of the dataset")
    if len(set(subset)) != len(subset):
        raise ValueError("class subset names must be distinct")
    new_label = np.full(len(class_names), -1, np.int32)
    new_label[[position[name] for name in subset]] = np.arange(len(subset), dtype=np.int32)
    labels = np.asarray(labels, np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"labels must lie in [0, {len(class_names)})")
    mapped = new_label[labels]
    indices = np.flatnonzero(mapped >= 0)
    return indices.astype(np.int64), mapped[indices]


@dataclasses.dataclass(frozen=True)
class ClassSubsetSource:
    """The examples of ``source`` at ``indices``, with ``labels`` as their labels.

    A class subset (see :func:`class_subset_indices`): example ``k`` is
    ``source[indices[k]]`` relabelled ``labels[k]``. Picklable like its source
    (grain worker processes).
    """

    source: Any
    indices: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        example = dict(self.source[int(self.indices[index])])
        example["label"] = self.labels[index]
        return example


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes the shorter side to ``size`` (bilinear, antialiased), centre-crops.

    Args:
      image: (H, W, C) uint8.

    Returns:
      (size, size, C) uint8.
    """
    from PIL import Image  # Pillow ships with matplotlib; TFDS decodes with it too.

    h, w, c = image.shape
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    arr = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR))
    arr = arr.reshape(new_h, new_w, c)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(arr[top : top + size, left : left + size])


@dataclasses.dataclass(frozen=True)
class ResizedSource:
    """A source whose ``"image"`` is resized and centre-cropped to a square.

    Host-side and deterministic: the random crops of training happen on device
    (:mod:`emc2jax.data.augment`) on these fixed-size images.
    """

    source: Any
    size: int

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = dict(self.source[index])
        example["image"] = resize_center_crop(np.asarray(example["image"]), self.size)
        return example
