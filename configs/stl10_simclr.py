"""SimCLR on STL-10 in the EMC² paper's setting (ResNet-18 without BN, Adam 1e-4, beta 14.28, batch 32, 100 epochs).

Prepare the data once (needs network and TensorFlow):
  pip install tensorflow && tfds build stl10 --file_format=array_record
Run (GPU/TPU; ~312k steps):
  python -m emc2jax.main --config configs/stl10_simclr.py --workdir runs/stl10_simclr

Expected linear-probe accuracy after 100 epochs (paper, read off the authors'
slides): SimCLR 0.674, SogCLR 0.520, embedding cache 0.611, EMC² 0.714.
The 100k unlabelled images are kept on the accelerator (2.8 GB uint8) so that
EMC² can re-encode carried-over negatives inside the compiled step.
"""

from emc2jax.config import stl10_config


def get_config(arg=None):
    del arg
    return stl10_config("simclr")
