"""EMC² on ImageNet-100 in the EMC² paper's ResNet-50 setting (LARS, beta 14.28, no BN).

ImageNet-100 is the dataset name ``imagenet100``: the 100 classes of CMC
(Tian et al. 2019; ``emc2jax.data.sources.IMAGENET100_CLASSES``) read from a
prepared ``imagenet2012``, labels renumbered 0..99 (126,689 train / 5,000
validation images). Selecting them costs one pass over the records' labels
(images not decoded) per split, once per process.

Prepare ImageNet once (needs TensorFlow; the archives must be downloaded by
hand from image-net.org into DATA_DIR/downloads/manual):
  pip install tensorflow && tfds build imagenet2012 --file_format=array_record
Run (GPU/TPU; 200 epochs at batch 256 = 98,975 steps; the argument after the
colon sets the epochs, the official README runs 800):
  python -m emc2jax.main --config configs/imagenet100_emc2.py --workdir runs/in100_emc2
  python -m emc2jax.main --config configs/imagenet100_emc2.py:800 --workdir runs/in100_emc2

Settings of the official command (amazon-science/contrastive_emc2 README):
ResNet-50 with the ImageNet stem and no batch norm, a 2048-wide one-hidden-
layer head to 128 dims, LARS lr 1.2 (10 warm-up epochs, cosine) with weight
decay 1e-6, beta = 14.28, EMC² with in-batch proposals and burn-in 0.5.
Expected: not measured by us (no ImageNet here); compare the linear probe
with the paper's ImageNet-100 table (Yau et al. 2024, section 5).

Memory: EMC² re-encodes each example's carried-over negative by index. With
the default ``sampler.carried_images='device'`` the engine would keep the whole
training set on every accelerator: 126,689 x 224 x 224 x 3 uint8 = 19.1 GB per
device (fits an 80 GB GPU, not a 16-32 GB TPU core). This config sets
``'host'``: the input loop gathers only the batch's B carried-over images on
the host each step (one small device-to-host read of the chain states per
step, which serialises the loop a little). SimCLR and SogCLR need neither.
"""

from emc2jax.config import resnet_config

NUM_TRAIN_IMAGES = 126_689  # ImageNet-100 train split (CMC's count; <= 1300 per class)


def get_config(arg=None):
    epochs = int(arg) if arg else 200
    c = resnet_config(
        "emc2",
        dataset="imagenet100",
        num_train_images=NUM_TRAIN_IMAGES,
        epochs=epochs,
        batch_size=256,
    )
    c.dataset.eval_test_split = "validation"
    c.dataset.image_size = 224
    c.dataset.worker_count = 8  # JPEG decoding and resizing on the host
    c.model.name = "resnet50"
    c.model.stem = "imagenet"
    c.model.head_hidden_dims = (2048,)  # width 64: 2048 features
    c.optimizer.name = "lars"
    c.optimizer.learning_rate = 1.2
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 1e-6
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 10 * NUM_TRAIN_IMAGES // 256
    c.sampler.proposals = "batch"
    c.sampler.burn_in = 0.5
    c.sampler.refresh_score = False
    c.sampler.carried_images = "host"  # 19 GB of images would not fit every device
    return c
