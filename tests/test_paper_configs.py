"""The paper-scale configs in configs/ and the ImageNet-100 class subset.

- every paper config validates as written (8 devices) and its header says how
  to run it;
- each distinct paper recipe trains for 2 steps and evaluates through
  ``train.train_and_evaluate`` under ``tfds.testing.mock_data``, with only its
  sizes shrunk (width, batch, steps, warm-up, evaluation); the three STL-10
  configs differ only in the method;
- the ``imagenet100`` class subset keeps exactly the listed classes and
  renumbers their labels.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from emc2jax import config as config_lib
from emc2jax import train
from emc2jax.data import sources

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
PAPER_CONFIGS = (
    "stl10_emc2",
    "stl10_simclr",
    "stl10_sogclr",
    "cifar10_emc2",
    "imagenet100_emc2",
)
_MOCK = dict(policy=tfds.testing.MockPolicy.USE_CODE)


def load_config(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(f"configs.{name}", CONFIG_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.get_config(arg)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_config_validates_and_says_how_to_run(name):
    module, config = load_config(name)
    config_lib.validate_config(config, num_devices=8)
    assert f"python -m emc2jax.main --config configs/{name}.py" in module.__doc__
    assert "Expected" in module.__doc__
    sources.get_spec(config.dataset.name)  # a known dataset name


def test_imagenet100_recipe_and_epochs_argument():
    _, config = load_config("imagenet100_emc2")
    assert config.dataset.name == "imagenet100"
    assert sources.get_spec("imagenet100").num_classes == 100
    assert (config.model.name, config.model.stem, config.model.norm) == (
        "resnet50",
        "imagenet",
        "none",
    )
    assert config.optimizer.name == "lars" and config.batch_size == 256
    assert config.total_steps == 200 * 126_689 // 256
    _, longer = load_config("imagenet100_emc2", "800")
    assert longer.total_steps == 800 * 126_689 // 256


def _subset_labels_for_mock(tfds_name: str, data_dir: str, split: str) -> np.ndarray:
    # The TFDS mock cannot serve records with a decoder (it re-encodes images,
    # which needs TensorFlow), so the label pass reads the decoded mock source.
    source = tfds.builder(tfds_name, data_dir=data_dir).as_data_source(split=split)
    return np.asarray([source[i]["label"] for i in range(len(source))], np.int64)


def test_class_subset_indices_keep_and_renumber():
    names = ["a", "b", "c", "d", "e"]
    labels = np.array([4, 0, 2, 2, 1, 3, 4])
    indices, new = sources.class_subset_indices(labels, names, ["e", "c"])
    np.testing.assert_array_equal(indices, [0, 2, 3, 6])
    np.testing.assert_array_equal(new, [0, 1, 1, 0])
    with pytest.raises(ValueError, match=r"\['z'\] are not classes"):
        sources.class_subset_indices(labels, names, ["a", "z"])
    with pytest.raises(ValueError, match="distinct"):
        sources.class_subset_indices(labels, names, ["a", "a"])
    with pytest.raises(ValueError, match="labels must lie"):
        sources.class_subset_indices(np.array([5]), names, ["a"])


def test_imagenet100_source_under_mock_data(monkeypatch):
    monkeypatch.setattr(sources, "_split_labels", _subset_labels_for_mock)
    with tfds.testing.mock_data(num_examples=60, **_MOCK):
        full = sources.load_source("imagenet2012", "validation", data_dir="/nonexistent")
        subset = sources.load_source("imagenet100", "validation", data_dir="/nonexistent")
        names = tfds.builder("imagenet2012", data_dir="/nonexistent").info.features["label"].names
        full_labels = [names[int(full[i]["label"])] for i in range(len(full))]
        kept = [i for i, n in enumerate(full_labels) if n in sources.IMAGENET100_CLASSES]
        assert len(subset) == len(kept) > 0
        for k, i in enumerate(kept):
            example = subset[k]
            assert sources.IMAGENET100_CLASSES[int(example["label"])] == full_labels[i]
            np.testing.assert_array_equal(example["image"], full[i]["image"])
        assert subset[-1]["image"].shape == (224, 224, 3)


def _all_in_subset(tfds_name: str, data_dir: str, split: str) -> np.ndarray:
    # Every mock example in the subset (example i in its class i % 100), so a
    # handful of mock examples fill the batches.
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    names = builder.info.features["label"].names
    n = len(builder.as_data_source(split=split))
    classes = sources.IMAGENET100_CLASSES
    return np.array([names.index(classes[i % len(classes)]) for i in range(n)], np.int64)


def shrink(config):
    """The config's recipe at test size: only sizes change."""
    config.batch_size = 8
    config.total_steps = 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 0
    config.eval_every_steps = 0
    config.dataset.worker_count = 0
    config.model.width = 2
    config.model.head_hidden_dims = (8,)
    config.model.embedding_dim = 8
    config.optimizer.warmup_steps = 0
    config.eval.batch_size = 8
    config.eval.knn_ks = (3,)
    # The probe's L-BFGS solve compiles for seconds and is tested elsewhere.
    config.eval.linear_probe = False
    return config


def test_stl10_configs_differ_only_in_the_method():
    # So training one of them under mock data (below) covers the recipe; each
    # method's step has its own tests (tests/test_train.py).
    _, reference = load_config("stl10_emc2")
    for name in ("stl10_simclr", "stl10_sogclr"):
        _, config = load_config(name)
        assert config.method == name.split("_")[1]
        config.method = reference.method
        assert config.to_dict() == reference.to_dict()


# One per distinct recipe: STL-10 (ResNet-18, no BN, Adam), CIFAR-10 (batch
# norm, AdamW, SimCLR augmentation), ImageNet-100 (ResNet-50, ImageNet stem,
# LARS, the class subset).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["stl10_emc2", "cifar10_emc2", "imagenet100_emc2"])
def test_config_trains_under_mock_data(name, tmp_path, monkeypatch):
    _, config = load_config(name)
    config = shrink(config)
    monkeypatch.setattr(sources, "_split_labels", _all_in_subset)
    with tfds.testing.mock_data(num_examples=16, **_MOCK):
        results = train.train_and_evaluate(config, tmp_path / "run")
    assert 0.0 <= results["knn_accuracy"] <= 1.0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 2  # steps 1 and 2 logged (and the evaluation)
