"""Dataset names, offline TFDS builders (no TensorFlow), the missing-dataset error."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from emc2jax.data import builders, sources


@pytest.mark.parametrize("name", sorted(sources.DATASETS))
def test_every_name_resolves_under_mock_data(name):
    spec = sources.get_spec(name)
    for split in (spec.pretrain_split, spec.train_split, spec.eval_split):
        assert split in spec.splits
    if spec.offline:
        return  # Built for real in the tests below.
    # The TFDS builder exists and agrees with our spec.
    info = tfds.builder(spec.tfds_name, data_dir="/nonexistent").info
    assert info.features["label"].num_classes == spec.num_classes
    if spec.image_shape is not None:
        assert tuple(info.features["image"].shape) == spec.image_shape
    # And a source loads (mocked: no files), in the pipeline's fixed shape.
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        source = sources.load_source(name, spec.pretrain_split, data_dir="/nonexistent")
        example = source[2]
    expected = spec.image_shape or (spec.default_image_size, spec.default_image_size, 3)
    assert len(source) == 3
    assert example["image"].shape == expected and example["image"].dtype == np.uint8


def test_config_names_and_bad_names():
    assert sources.get_spec("gmm/isotropic").image_shape == (10,)
    assert sources.get_spec("gmm/isotropic").num_classes == 3
    assert sources.get_spec("imagenette/160px-v2").tfds_name == "imagenette/160px-v2"
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        sources.get_spec("mnist")
    with pytest.raises(ValueError, match="unknown gmm config"):
        sources.get_spec("gmm/nope")
    with pytest.raises(ValueError, match="no split 'validation'"):
        sources.load_source("cifar10", "validation", data_dir="/nonexistent")


def test_default_data_dir_honours_env(monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", "/some/where")
    assert sources.default_data_dir() == "/some/where"
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert sources.default_data_dir() == os.path.expanduser("~/tensorflow_datasets")


def test_missing_dataset_error_says_how_to_prepare(tmp_path):
    with pytest.raises(sources.DatasetNotPreparedError) as info:
        sources.load_source("stl10", "unlabelled", data_dir=str(tmp_path))
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert f"tfds build stl10 --data_dir={tmp_path} --file_format=array_record" in message
    assert "download_and_prepare()" in message
    assert "network" in message and "TensorFlow" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_imagenet_mentions_manual_download(tmp_path):
    with pytest.raises(sources.DatasetNotPreparedError, match="ILSVRC2012_img_train.tar"):
        sources.load_source("imagenet2012", "train", data_dir=str(tmp_path))


# Builds and reads in a fresh interpreter: proves TensorFlow is never imported
# (it is not installed here, but the check must hold wherever the suite runs).
_BUILD_AND_READ = textwrap.dedent(
    """
    import json, sys
    from emc2jax.data import sources
    out = {}
    for name in ("digits", "gmm"):
        for split in ("train", "test"):
            s = sources.load_source(name, split, data_dir=sys.argv[1])
            ex = s[len(s) - 1]
            out[f"{name}/{split}"] = [len(s), list(ex["image"].shape), str(ex["image"].dtype),
                                      int(ex["label"]), float(ex["image"].sum())]
    out["tensorflow_imported"] = "tensorflow" in sys.modules
    print(json.dumps(out))
    """
)


def _spawn(data_dir):
    return subprocess.Popen(
        [sys.executable, "-c", _BUILD_AND_READ, str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_offline_builders_build_concurrently_idempotently_without_tensorflow(tmp_path):
    # Two processes build the same data_dir at once (the lock serialises them),
    # then a third run finds everything prepared: all three read the same data.
    first, second = _spawn(tmp_path), _spawn(tmp_path)
    results = []
    for proc in (first, second, _spawn(tmp_path)):
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert results[0] == results[1] == results[2]
    got = results[0]
    assert got["tensorflow_imported"] is False
    assert got["digits/train"][:3] == [1437, [8, 8, 1], "uint8"]
    assert got["digits/test"][:3] == [360, [8, 8, 1], "uint8"]
    assert got["gmm/train"][:3] == [4000, [20], "float32"]
    assert got["gmm/test"][:3] == [1000, [20], "float32"]
    # One prepared copy per dataset, no leftover temporary directories.
    assert [p.name for p in (tmp_path / "digits").iterdir()] == ["1.0.0"]
    assert [p.name for p in (tmp_path / "gmm" / "fisher").iterdir()] == ["1.0.0"]
    assert not [p for p in tmp_path.rglob("*incomplete*")]


def test_digits_content_matches_sklearn(tmp_path):
    from sklearn.datasets import load_digits

    train = sources.load_source("digits", "train", data_dir=str(tmp_path))
    test = sources.load_source("digits", "test", data_dir=str(tmp_path))
    images = np.stack(
        [train[i]["image"] for i in range(len(train))]
        + [test[i]["image"] for i in range(len(test))]
    )
    labels = np.array(
        [train[i]["label"] for i in range(len(train))]
        + [test[i]["label"] for i in range(len(test))]
    )
    data = load_digits()
    expected = np.rint(data.images * 255 / 16).astype(np.uint8)[..., None]
    # Same multiset of (image, label) pairs: the split is a partition of sklearn's.
    assert images.shape == expected.shape and images.max() == 255
    got = sorted(zip(map(bytes, images.reshape(len(labels), -1)), labels.tolist(), strict=True))
    want = sorted(
        zip(map(bytes, expected.reshape(len(labels), -1)), data.target.tolist(), strict=True)
    )
    assert got == want
    # A second call on a prepared dir is a pure read.
    again = sources.load_source("digits", "train", data_dir=str(tmp_path))
    np.testing.assert_array_equal(again[7]["image"], train[7]["image"])


def test_gmm_samples_follow_their_parameters(tmp_path):
    config = builders.GmmConfig(
        name="tiny", dim=6, num_components=3, num_high=2, num_train=3000, num_test=10
    )
    builder = builders.prepare("gmm", data_dir=str(tmp_path), config=config)
    source = builder.as_data_source(split="train")
    x = np.stack([source[i]["image"] for i in range(len(source))]).astype(np.float64)
    y = np.array([source[i]["label"] for i in range(len(source))])
    params = builders.gmm_parameters(config)
    np.testing.assert_allclose(params.cov_sqrt @ params.cov_sqrt, params.cov, atol=1e-10)
    n = len(y)
    # Component frequencies: within 5 binomial standard deviations of 1/3.
    freq = np.bincount(y, minlength=3) / n
    assert np.all(np.abs(freq - 1 / 3) < 5 * np.sqrt(2 / 9 / n))
    # Class means: within 5 standard errors (largest variance 25) per coordinate.
    for c in range(3):
        xc = x[y == c]
        se = np.sqrt(np.diag(params.cov) / len(xc))
        assert np.all(np.abs(xc.mean(0) - params.means[c]) < 5 * se)
    # Pooled within-class covariance ~ Sigma (relative Frobenius error).
    centred = x - params.means[y]
    cov = centred.T @ centred / n
    assert np.linalg.norm(cov - params.cov) / np.linalg.norm(params.cov) < 0.1
