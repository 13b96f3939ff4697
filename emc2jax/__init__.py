"""emc2jax: functional JAX/Flax contrastive learning.

EMC² (efficient MCMC negative sampling for the global contrastive loss), its
baselines, and the Gaussian-mixture theory lab. See README.md for a map.
"""

__version__ = "0.1.0"
