"""SimCLR on the 8x8 digits: a baseline of configs/digits_emc2.py (same model, batch, steps).

Run:
  python -m emc2jax.main --config configs/digits_simclr.py --workdir runs/digits_simclr

Expected: linear-probe accuracy >= 0.85 on the digits test split (our runs:
README.md, "Results").
"""

from emc2jax.config import digits_config


def get_config(arg=None):
    del arg
    return digits_config("simclr")
