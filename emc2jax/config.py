"""The config schema: shared defaults of every training config, and their validation.

A config file in configs/ starts from :func:`base_config` or one of the recipes
below (:func:`digits_config`, :func:`resnet_config`, :func:`stl10_config`) and
overrides what differs. The keys are documented in README.md ("Config keys");
:func:`validate_config` checks them before anything is compiled.
"""

from __future__ import annotations

import ml_collections

from emc2jax import models, optim


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # simclr | dcl | sogclr | emc2 | embedding_cache | exact | clip
    c.method = "emc2"
    c.seed = 0
    c.batch_size = 256  # global, across all devices and hosts
    c.total_steps = 1000
    # Inverse temperature beta = 1 / temperature; the EMC² paper uses beta = 14.28.
    c.temperature = 0.07
    c.log_every_steps = 50
    c.checkpoint_every_steps = 0  # 0 = no checkpoints
    c.keep_checkpoints = 2
    c.eval_every_steps = 0  # 0 = evaluate once, at the end
    c.parallel_backend = "shard_map"  # or "pmap" (legacy driver; same numbers)

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "digits"
    c.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.dataset.train_split = "train"  # pretraining split; TFDS slicing works ("train[:500]")
    c.dataset.eval_train_split = "train"  # linear probe / kNN fit
    c.dataset.eval_test_split = "test"  # linear probe / kNN score
    # 0 = a fresh augmentation every step; n > 0 = n fixed augmentations per
    # example (the finite-augmentation setting of the EMC² paper's Figure 2).
    c.dataset.num_augmentations = 0
    c.dataset.augmentation = "digits"  # digits | simclr | stl10 | identity
    c.dataset.image_size = 0  # 0 = the dataset's own size
    c.dataset.worker_count = 0  # grain worker processes (0 = in the main process)

    # Model and optimizer keys are defined (and documented) next to the code
    # that reads them; the digits defaults are set here.
    c.model = models.default_model_config()
    c.model.name = "convnet"
    c.model.norm = "none"  # the EMC² paper trains without batch norm
    c.model.width = 32
    c.model.head_hidden_dims = (256,)
    c.model.embedding_dim = 64

    c.optimizer = optim.default_optimizer_config()
    c.optimizer.schedule = "cosine"

    c.sampler = ml_collections.ConfigDict()
    # EMC²: burn-in as a fraction of each anchor's proposals (or a count >= 1).
    c.sampler.burn_in = 0.0
    c.sampler.proposals = "batch"  # batch (the other in-batch views) | uniform (over the dataset)
    c.sampler.num_uniform_proposals = 8  # proposals per anchor in "uniform" mode
    # Recompute the carried-over state's score with the current encoder.
    c.sampler.refresh_score = False
    # Where the carried-over negatives' images come from: "device" (the training
    # set is kept on every device; no host round trip) or "host" (gathered by
    # the input loop each step; for datasets too large for device memory).
    c.sampler.carried_images = "device"
    # SogCLR moving-average rate gamma.
    c.sampler.gamma = 0.9
    # Embedding cache: negatives per anchor and the fraction of rows refreshed per step.
    c.sampler.num_negatives = 1
    c.sampler.refresh_fraction = 0.01

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 512
    c.eval.knn_ks = (200, 10, 1)  # knn_accuracy reports the first
    c.eval.linear_probe = True
    c.eval.global_loss = False  # exact global loss and ||grad||^2 (finite augmentations only)
    return c


METHODS = ("simclr", "dcl", "sogclr", "emc2", "embedding_cache", "exact", "clip")
PROPOSALS = ("batch", "uniform")
BACKENDS = ("shard_map", "pmap")
AUGMENTATIONS = ("digits", "simclr", "stl10", "identity")


class ConfigError(ValueError):
    """A config value that cannot work; raised before anything is compiled."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def burn_in_count(burn_in: float, num_proposals: int) -> int:
    """Proposals discarded at the start of each anchor's sweep.

    ``burn_in`` in [0, 1) is a fraction of ``num_proposals``; a value >= 1 is a
    count. Either way at least one proposal must remain after it.
    """
    count = int(burn_in) if burn_in >= 1 else int(burn_in * num_proposals)
    if count >= num_proposals:
        raise ConfigError(
            f"sampler.burn_in={burn_in} discards {count} of {num_proposals} proposals per anchor; "
            "at least one must remain (use a fraction < 1 or a smaller count)."
        )
    return count


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
    """Checks ``config`` and raises :class:`ConfigError` naming the bad value.

    Everything here is decided from the config and the device count alone, so
    it runs before any data is read or any function is compiled.
    """
    _require(
        config.method in METHODS, f"unknown method {config.method!r}; choose one of {METHODS}."
    )
    _require(
        config.temperature > 0,
        f"temperature must be > 0 (beta = 1/temperature), got temperature={config.temperature}.",
    )
    _require(config.batch_size >= 2, f"batch_size must be >= 2, got {config.batch_size}.")
    _require(
        config.batch_size % num_devices == 0,
        f"batch_size={config.batch_size} is not divisible by the {num_devices} devices "
        f"({config.batch_size} = {config.batch_size // num_devices} x {num_devices} "
        f"+ {config.batch_size % num_devices}); use a multiple of {num_devices}.",
    )
    _require(config.total_steps >= 1, f"total_steps must be >= 1, got {config.total_steps}.")
    for key in ("log_every_steps", "checkpoint_every_steps", "eval_every_steps"):
        _require(config[key] >= 0, f"{key} must be >= 0, got {config[key]}.")
    _require(config.log_every_steps >= 1, "log_every_steps must be >= 1.")
    _require(
        config.optimizer.name in optim.OPTIMIZERS,
        f"unknown optimizer.name {config.optimizer.name!r}; choose one of {optim.OPTIMIZERS}.",
    )
    _require(
        config.optimizer.learning_rate > 0,
        f"optimizer.learning_rate must be > 0, got {config.optimizer.learning_rate}.",
    )
    try:  # Schedule arithmetic (warm-up longer than training, ...): no compile involved.
        optim.make_schedule(config.optimizer, total_steps=config.total_steps)
    except ValueError as error:
        raise ConfigError(f"optimizer: {error}") from None
    _require(
        config.parallel_backend in BACKENDS,
        f"unknown parallel_backend {config.parallel_backend!r}; choose one of {BACKENDS}.",
    )
    _require(
        config.dataset.num_augmentations >= 0,
        f"dataset.num_augmentations must be >= 0, got {config.dataset.num_augmentations}.",
    )
    if config.dataset.num_augmentations:
        _require(
            config.dataset.num_augmentations >= 2,
            "dataset.num_augmentations must be 0 (fresh views) or >= 2 (two distinct views per "
            f"example), got {config.dataset.num_augmentations}.",
        )
    _require(
        config.dataset.augmentation in AUGMENTATIONS,
        f"unknown dataset.augmentation {config.dataset.augmentation!r}; choose one of {AUGMENTATIONS}.",
    )
    _require(
        config.model.name in models.MODEL_NAMES,
        f"unknown model.name {config.model.name!r}; choose one of {models.MODEL_NAMES}.",
    )
    _require(
        config.model.norm in models.NORMS,
        f"unknown model.norm {config.model.norm!r}; choose one of {models.NORMS}.",
    )
    sampler = config.sampler
    if config.method == "emc2":
        _require(
            sampler.proposals in PROPOSALS,
            f"unknown sampler.proposals {sampler.proposals!r}; choose one of {PROPOSALS}.",
        )
        _require(sampler.burn_in >= 0, f"sampler.burn_in must be >= 0, got {sampler.burn_in}.")
        burn_in_count(sampler.burn_in, num_proposals_per_anchor(config))
        _require(
            sampler.carried_images in ("device", "host"),
            f"sampler.carried_images must be 'device' or 'host', got {sampler.carried_images!r}.",
        )
        _require(
            sampler.carried_images == "device" or sampler.proposals == "batch",
            "sampler.carried_images='host' needs sampler.proposals='batch' (uniform proposals "
            "are drawn inside the step and read the on-device training set).",
        )
    if config.method == "sogclr":
        _require(0 < sampler.gamma <= 1, f"sampler.gamma must be in (0, 1], got {sampler.gamma}.")
    if config.method == "embedding_cache":
        _require(
            sampler.num_negatives >= 1,
            f"sampler.num_negatives must be >= 1, got {sampler.num_negatives}.",
        )
        _require(
            0 <= sampler.refresh_fraction <= 1,
            f"sampler.refresh_fraction must be in [0, 1], got {sampler.refresh_fraction}.",
        )
    if config.method == "exact":
        _require(
            config.dataset.num_augmentations >= 2,
            "method 'exact' needs a finite-augmentation dataset: set dataset.num_augmentations >= 2.",
        )
    if config.eval.global_loss:
        _require(
            config.dataset.num_augmentations >= 2,
            "eval.global_loss needs a finite-augmentation dataset: set dataset.num_augmentations >= 2.",
        )


def num_proposals_per_anchor(config: ml_collections.ConfigDict) -> int:
    """EMC² proposals per anchor view: the 2B - 2 other in-batch views, or the uniform count."""
    if config.sampler.proposals == "uniform":
        return int(config.sampler.num_uniform_proposals)
    return 2 * int(config.batch_size) - 2


# ---------------------------------------------------------------------------
# Recipes shared by the files in configs/ (one per dataset setting)
# ---------------------------------------------------------------------------


def digits_config(method: str) -> ml_collections.ConfigDict:
    """8x8 digits, small ConvNet, batch 64, 1500 Adam steps: minutes on 2 CPU cores."""
    c = base_config()
    c.method = method
    c.batch_size = 64
    c.total_steps = 1500
    c.temperature = 0.2
    c.log_every_steps = 50
    c.checkpoint_every_steps = 500
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 50
    c.eval.knn_ks = (10, 1, 200)
    return c


def resnet_config(
    method: str,
    *,
    dataset: str,
    num_train_images: int,
    epochs: int,
    batch_size: int,
    train_split: str = "train",
) -> ml_collections.ConfigDict:
    """The EMC² paper's ResNet-18 recipe on a TFDS image dataset (Yau et al. 2024, section 5).

    ResNet-18 (CIFAR stem: 3x3 conv, no max-pool) without batch norm, a
    512-wide one-hidden-layer head to 128 dims, Adam 1e-4 at a constant rate,
    beta = 14.28 (temperature 0.07), SimCLR augmentation; ``epochs`` passes over
    the ``num_train_images`` of ``train_split`` at ``batch_size``; linear probe
    fit on ``train``, scored on ``test``. :func:`stl10_config`,
    configs/cifar10_emc2.py and configs/imagenet100_emc2.py override what differs.
    """
    c = base_config()
    c.method = method
    c.batch_size = batch_size
    c.total_steps = epochs * num_train_images // batch_size
    c.temperature = 1 / 14.28
    c.log_every_steps = 500
    c.checkpoint_every_steps = 5_000
    c.dataset.name = dataset
    c.dataset.train_split = train_split
    c.dataset.augmentation = "simclr"
    c.dataset.worker_count = 4  # image decoding and cropping on the host
    c.model.name = "resnet18"
    c.model.stem = "cifar"
    c.model.norm = "none"
    c.model.width = 64
    c.model.head_hidden_dims = (512,)
    c.model.embedding_dim = 128
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-4
    c.optimizer.schedule = "constant"
    c.eval.batch_size = 256
    return c


def stl10_config(method: str) -> ml_collections.ConfigDict:
    """The EMC² paper's STL-10 setting: :func:`resnet_config` at batch 32 for 100 epochs.

    The 100k ``unlabelled`` images at 96x96 with the paper's augmentation;
    linear probe on ``train``, scored on ``test``.
    """
    c = resnet_config(
        method,
        dataset="stl10",
        train_split="unlabelled",
        num_train_images=100_000,
        epochs=100,
        batch_size=32,
    )
    c.checkpoint_every_steps = 10_000
    c.dataset.augmentation = "stl10"
    return c
