"""Offline TFDS builders that ship with emc2jax: ``digits`` and ``gmm``.

Both are ordinary ``tfds.core.GeneratorBasedBuilder`` subclasses, written so
that building and reading them needs neither network nor TensorFlow:

- features are ``tfds.features.Tensor`` / ``ClassLabel`` only (an ``Image``
  feature would PNG-encode through TensorFlow);
- files are written as ``array_record`` (``file_format="array_record"``), the
  format ``tfds.data_source`` reads by random access;
- ``DatasetInfo`` is built directly (``dataset_info_from_configs`` would look
  for metadata files next to this module);
- ``disable_shuffling=True`` keeps the record order of the generator, so the
  dataset index of an example is its position in the split (reproducible, and
  the training pipeline shuffles anyway).

The builders are not registered in the TFDS catalogue (``skip_registration``):
emc2jax reaches them through :func:`prepare` / ``sources.load_source`` only,
which keeps a user's own TFDS datasets of the same name untouched.

:func:`prepare` builds on first use and is idempotent; two processes starting
at once serialise on a lock file beside the data, and TFDS itself writes into
a temporary directory that it renames into place when complete, so a reader
never sees a half-written dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

__all__ = [
    "Digits",
    "Gmm",
    "GmmConfig",
    "GmmParameters",
    "OFFLINE_BUILDERS",
    "gmm_parameters",
    "prepare",
    "sample_gmm",
]

_DIGITS_TEST_SIZE = 360  # 20% of sklearn's 1797 images.
_DIGITS_SPLIT_SEED = 0


class _OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of our builders: a ``code_path`` that works for an installed package.

    TFDS's own ``code_path`` probes ``importlib_resources`` (a package TFDS
    4.9.10 does not depend on) for builders living in a package; TFDS's
    fallback, the class's source file, is what we return directly. It only
    locates an (absent) checksums file: our builders download nothing.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path | None:
        return epath.Path(inspect.getfile(cls))


class Digits(_OfflineBuilder, skip_registration=True):
    """scikit-learn's bundled 8x8 handwritten digits as a TFDS dataset.

    1797 images, 10 classes; a fixed random split (seed 0) into 1437 ``train``
    and 360 ``test`` images. Pixel values 0..16 are rescaled to uint8 0..255
    (``round(v * 255 / 16)``), so the images look like any other uint8 image.

    Features: ``image`` uint8 (8, 8, 1), ``label`` int64 in 0..9.
    """

    name = "digits"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "sklearn digits, fixed 1437/360 split."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn 8x8 digits (UCI optdigits test set), offline.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        del dl_manager  # Everything ships with scikit-learn.
        from sklearn.datasets import load_digits  # Lazy: sklearn is slow to import.

        data = load_digits()
        images = np.rint(data.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        labels = data.target.astype(np.int64)
        perm = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(labels))
        test, train = np.sort(perm[:_DIGITS_TEST_SIZE]), np.sort(perm[_DIGITS_TEST_SIZE:])
        return {
            "train": self._generate_examples(images[train], labels[train]),
            "test": self._generate_examples(images[test], labels[test]),
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray
    ) -> Iterator[tuple[int, dict]]:
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": image, "label": label}


# Not frozen: TFDS's BuilderConfig base is a mutable dataclass.
@dataclasses.dataclass(eq=False)
class GmmConfig(tfds.core.BuilderConfig):
    """Parameters of a Gaussian mixture with a shared non-isotropic covariance.

    Components have equal weights; means ``mu_c ~ N(0, mean_scale^2 I_d)``;
    the shared covariance is ``Sigma = Q diag(high_variance x num_high,
    1 x (dim - num_high)) Q^T`` with ``Q`` a random orthogonal matrix. All of it
    is drawn from ``param_seed``; the samples from ``sample_seed``. With
    ``high_variance`` large the top principal directions are noise, not the
    class means (design.md, "GMM model": PCA fails, LDA/InfoNCE succeed).
    """

    dim: int = 20
    num_components: int = 4
    mean_scale: float = 2.0
    high_variance: float = 25.0
    num_high: int = 5
    num_train: int = 4000
    num_test: int = 1000
    param_seed: int = 0
    sample_seed: int = 1


class GmmParameters(NamedTuple):
    """Ground truth of a :class:`GmmConfig`.

    Attributes:
      weights: (k,) mixture weights.
      means: (k, d) component means.
      cov: (d, d) shared covariance.
      cov_sqrt: (d, d) symmetric square root of ``cov``.
    """

    weights: np.ndarray
    means: np.ndarray
    cov: np.ndarray
    cov_sqrt: np.ndarray


def gmm_parameters(config: GmmConfig) -> GmmParameters:
    """The mixture's parameters, a deterministic function of ``config`` (NumPy)."""
    if not 0 <= config.num_high <= config.dim:
        raise ValueError(f"num_high={config.num_high} must lie in [0, dim={config.dim}]")
    if config.num_components < 2 or config.high_variance <= 0:
        raise ValueError(
            f"need num_components >= 2 and high_variance > 0, got "
            f"{config.num_components=}, {config.high_variance=}"
        )
    rng = np.random.default_rng(config.param_seed)
    d, k = config.dim, config.num_components
    means = config.mean_scale * rng.standard_normal((k, d))
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    q = q * np.sign(np.diag(r))  # Haar-distributed orthogonal matrix.
    variances = np.r_[np.full(config.num_high, config.high_variance), np.ones(d - config.num_high)]
    cov = (q * variances) @ q.T
    cov_sqrt = (q * np.sqrt(variances)) @ q.T
    return GmmParameters(np.full(k, 1.0 / k), means, cov, cov_sqrt)


def sample_gmm(
    params: GmmParameters, num: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draws ``num`` labelled points: ``x = mu_c + Sigma^{1/2} eps``.

    Returns:
      x: (num, d) float32 samples; labels: (num,) int64 components.
    """
    labels = rng.choice(len(params.weights), size=num, p=params.weights)
    eps = rng.standard_normal((num, params.means.shape[1]))
    x = params.means[labels] + eps @ params.cov_sqrt.T
    return x.astype(np.float32), labels.astype(np.int64)


class Gmm(_OfflineBuilder, skip_registration=True):
    """Labelled samples of a Gaussian mixture (see :class:`GmmConfig`).

    Features: ``image`` float32 (d,) -- the point itself, under the same key as
    image datasets so the training pipeline needs no special case (non-uint8
    inputs are taken as already-float) -- and ``label`` int64, its component.
    The mixture's parameters are recomputed with :func:`gmm_parameters`.
    """

    name = "gmm"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Shared non-isotropic covariance, equal weights."}
    BUILDER_CONFIGS = [
        GmmConfig(
            name="fisher",
            description="d=20, k=4, Sigma = Q diag(25 x5, 1 x15) Q^T: PCA misses the "
            "Fisher subspace (design.md discriminative setting).",
        ),
        GmmConfig(
            name="isotropic",
            description="d=10, k=3, Sigma = I: PCA and LDA agree.",
            dim=10,
            num_components=3,
            mean_scale=2.0,
            high_variance=1.0,
            num_high=0,
        ),
    ]
    DEFAULT_CONFIG_NAME = "fisher"

    def _info(self) -> tfds.core.DatasetInfo:
        config: GmmConfig = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Gaussian mixture samples: {config.description}",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(config.dim,), dtype=np.float32),
                    "label": tfds.features.ClassLabel(num_classes=config.num_components),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        del dl_manager
        config: GmmConfig = self.builder_config
        params = gmm_parameters(config)
        # One stream per split, so resizing one split leaves the other unchanged.
        train_rng, test_rng = np.random.default_rng(config.sample_seed).spawn(2)
        return {
            "train": self._generate_examples(*sample_gmm(params, config.num_train, train_rng)),
            "test": self._generate_examples(*sample_gmm(params, config.num_test, test_rng)),
        }

    def _generate_examples(self, x: np.ndarray, labels: np.ndarray) -> Iterator[tuple[int, dict]]:
        for i, (xi, label) in enumerate(zip(x, labels, strict=True)):
            yield i, {"image": xi, "label": label}


OFFLINE_BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "digits": Digits,
    "gmm": Gmm,
}


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (POSIX ``flock``).

    Remote data dirs (``gs://...``) cannot hold a lock file; there we rely on
    TFDS's write-to-temporary-then-rename alone (a concurrent duplicate build
    then wastes time but cannot corrupt the result).
    """
    if "://" in path:
        yield
        return
    import fcntl  # POSIX only; imported lazily so the module imports anywhere.

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(name: str, *, data_dir: str, config: str | GmmConfig | None = None):
    """Builds the offline dataset ``name`` into ``data_dir`` unless already there.

    Args:
      name: ``"digits"`` or ``"gmm"``.
      data_dir: TFDS data directory (the dataset lands in
        ``data_dir/name/[config/]version``).
      config: a builder config name (``"fisher"``, ``"isotropic"``) or a
        :class:`GmmConfig` instance for ``gmm``; None for the default.

    Returns:
      A ``tfds.core.DatasetBuilder`` reading the prepared files (use
      ``builder.as_data_source(split)``).
    """
    if name not in OFFLINE_BUILDERS:
        raise ValueError(f"unknown offline dataset {name!r}; known: {sorted(OFFLINE_BUILDERS)}")
    cls = OFFLINE_BUILDERS[name]
    kwargs: dict[str, Any] = {"data_dir": os.fspath(data_dir), "file_format": "array_record"}
    if config is not None:
        kwargs["config"] = config
    lock = os.path.join(os.fspath(data_dir), f".{name}.build.lock")
    with _file_lock(lock):
        # A fresh builder inside the lock: one created before another process
        # finished building would not see the splits it wrote.
        builder = cls(**kwargs)
        if not builder.is_prepared():
            builder.download_and_prepare(file_format="array_record")
    return cls(**kwargs)
