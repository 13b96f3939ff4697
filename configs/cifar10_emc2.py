"""EMC² on CIFAR-10: ResNet-18 (CIFAR stem, batch norm), batch 256, 500 epochs of AdamW.

Prepare the data once (needs network and TensorFlow):
  pip install tensorflow && tfds build cifar10 --file_format=array_record
Run (GPU/TPU):
  python -m emc2jax.main --config configs/cifar10_emc2.py --workdir runs/cifar10_emc2

Expected: a linear probe in the high 0.8s after 500 epochs (SimCLR-style
ResNet-18 results at batch 256 are 0.88-0.91); not yet measured by us.
"""

from emc2jax.config import resnet_config


def get_config(arg=None):
    del arg
    c = resnet_config(
        "emc2", dataset="cifar10", num_train_images=50_000, epochs=500, batch_size=256
    )
    c.temperature = 0.2
    c.log_every_steps = 200
    c.model.norm = "batch"
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 1e-6
    c.optimizer.warmup_steps = 1_000
    c.optimizer.schedule = "cosine"
    c.eval.batch_size = 512
    return c
