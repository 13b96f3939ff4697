"""EMC² on scikit-learn's 8x8 digits: the main job, offline, a few minutes on 2 CPU cores.

Run:
  python -m emc2jax.main --config configs/digits_emc2.py --workdir runs/digits

Expected: linear-probe accuracy >= 0.85 on the digits test split (measured
values are in README.md, "Results"); metrics in runs/digits/metrics.jsonl.
"""

from emc2jax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.method = "emc2"
    c.batch_size = 64
    c.total_steps = 1500
    c.temperature = 0.2
    c.log_every_steps = 50
    c.checkpoint_every_steps = 500
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 50
    c.sampler.burn_in = 0.0
    return c
