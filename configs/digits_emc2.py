"""EMC² on scikit-learn's 8x8 digits: the main job, offline, a few minutes on 2 CPU cores.

Run:
  python -m emc2jax.main --config configs/digits_emc2.py --workdir runs/digits

Expected: linear-probe accuracy >= 0.85 on the digits test split (our runs:
README.md, "Results"); metrics in runs/digits/metrics.jsonl.
"""

from emc2jax.config import digits_config


def get_config(arg=None):
    del arg
    c = digits_config("emc2")
    # Proposals: the 2B - 2 other in-batch views; no burn-in; stale scores (the paper's defaults).
    c.sampler.proposals = "batch"
    c.sampler.burn_in = 0.0
    c.sampler.refresh_score = False
    return c
