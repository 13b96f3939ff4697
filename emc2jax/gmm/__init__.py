"""The Gaussian-mixture theory lab: contrastive learning on GMMs, in vmapped simulations.

Bansal, Kavis & Sanghavi, "Understanding Contrastive Learning via Gaussian
Mixture Models" (arXiv 2411.03517): with augmentation = an independent draw
from the same component, InfoNCE on a linear encoder recovers the Fisher (LDA)
subspace of a shared-covariance mixture, even a non-isotropic one where PCA
fails; CLIP recovers (a subset of) each modality's Fisher subspace.

Modules, one job each:

- :mod:`~emc2jax.gmm.mixture`: the mixture pytree and its constructors.
- :mod:`~emc2jax.gmm.sampling`: samples and positive pairs (perfect, noisy, control).
- :mod:`~emc2jax.gmm.subspaces`: Fisher (true parameters), LDA, PCA, random.
- :mod:`~emc2jax.gmm.training`: InfoNCE / SimSiam / CLIP on linear encoders (``lax.scan``).
- :mod:`~emc2jax.gmm.metrics`: principal angles, leakage, effective rank, accuracy.
- :mod:`~emc2jax.gmm.sweep`: vmap an experiment over seeds and a parameter grid.

Example (one seed)::

    import functools, jax
    from emc2jax import gmm

    mix = gmm.anisotropic_mixture(jax.random.key(0), dim=20, num_components=4,
                                  num_noise_directions=5)
    sampler = functools.partial(gmm.sample_pairs, mixture=mix, n=256)
    result = gmm.train_infonce(jax.random.key(1), sampler, rank=3, steps=1000)
    gmm.sin_largest_angle(result.params["encoder"], gmm.fisher_subspace(mix))
"""

from emc2jax.gmm.metrics import (
    effective_rank,
    leakage,
    nearest_class_mean_accuracy,
    principal_angles,
    sin_largest_angle,
    singular_values,
)
from emc2jax.gmm.mixture import (
    GaussianMixture,
    TwoModalMixture,
    anisotropic_mixture,
    covariance,
    isotropic_mixture,
    mixture_from_covariance,
    two_modal_mixture,
)
from emc2jax.gmm.sampling import (
    Pairs,
    sample,
    sample_given_labels,
    sample_labels,
    sample_noisy_copies,
    sample_pairs,
    sample_two_modal_pairs,
)
from emc2jax.gmm.subspaces import (
    class_moments,
    fisher_eigenvalues,
    fisher_subspace,
    lda_from_moments,
    lda_subspace,
    orthonormal_rows,
    pca_from_moments,
    pca_subspace,
    random_subspace,
)
from emc2jax.gmm.sweep import seed_keys, summarize, sweep, vectorize
from emc2jax.gmm.training import (
    TrainResult,
    clip_objective,
    infonce_objective,
    init_encoder,
    simsiam_objective,
    train_clip,
    train_infonce,
    train_simsiam,
)

__all__ = [
    "GaussianMixture",
    "Pairs",
    "TrainResult",
    "TwoModalMixture",
    "anisotropic_mixture",
    "class_moments",
    "clip_objective",
    "covariance",
    "effective_rank",
    "fisher_eigenvalues",
    "fisher_subspace",
    "infonce_objective",
    "init_encoder",
    "isotropic_mixture",
    "lda_from_moments",
    "lda_subspace",
    "leakage",
    "mixture_from_covariance",
    "nearest_class_mean_accuracy",
    "orthonormal_rows",
    "pca_from_moments",
    "pca_subspace",
    "principal_angles",
    "random_subspace",
    "sample",
    "sample_given_labels",
    "sample_labels",
    "sample_noisy_copies",
    "sample_pairs",
    "sample_two_modal_pairs",
    "seed_keys",
    "simsiam_objective",
    "sin_largest_angle",
    "singular_values",
    "summarize",
    "sweep",
    "train_clip",
    "train_infonce",
    "train_simsiam",
    "two_modal_mixture",
    "vectorize",
]
