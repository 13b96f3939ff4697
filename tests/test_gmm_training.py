"""Training linear encoders on GMM pairs, and vmapped sweeps (emc2jax.gmm.training / sweep)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emc2jax import gmm, losses

# A small discriminative setting: d = 8, k = 3, r = k - 1 = 2, two noise directions of
# variance 16 > 1 + separation^2 = 10, so PCA's top-2 directions are orthogonal to F.
DIM, K, RANK = 8, 3, 2
# A fixed mixture for the tests that do not need a random one (no QR to compile).
FIXED = gmm.mixture_from_covariance(
    np.ones(K) / K,
    np.array(
        [[3.0, 0, 0, 0, 0, 0, 0, 0], [-1.5, 2.6, 0, 0, 0, 0, 0, 0], [-1.5, -2.6, 0, 0, 0, 0, 0, 0]]
    ),
    np.diag([1.0] * 6 + [16.0] * 2),
)
make_mixture = functools.partial(
    gmm.anisotropic_mixture,
    dim=DIM,
    num_components=K,
    num_noise_directions=2,
    noise_variance=16.0,
    separation=3.0,
)


def _experiment(key, learning_rate, *, steps, batch):
    k_mix, k_train, k_fit = jax.random.split(key, 3)
    mixture = make_mixture(k_mix)
    fisher = gmm.fisher_subspace(mixture)
    pairs = functools.partial(gmm.sample_pairs, mixture=mixture, n=batch)
    result = gmm.train_infonce(k_train, pairs, rank=RANK, steps=steps, learning_rate=learning_rate)
    x, y = gmm.sample(k_fit, mixture, steps * batch)
    encoders = {
        "infonce": result.params["encoder"],
        "lda": gmm.lda_subspace(x, y, num_classes=K, rank=RANK),
        "pca": gmm.pca_subspace(x, rank=RANK),
    }
    sin = {name: gmm.sin_largest_angle(a, fisher) for name, a in encoders.items()}
    return {
        "sin": sin,
        "loss": result.loss,
        "encoder": result.params["encoder"],
        "weakest_fisher_ratio": gmm.fisher_eigenvalues(mixture)[-1],
    }


def test_infonce_objective_is_the_project_loss():
    @jax.jit
    def both(key):
        k1, k3 = jax.random.split(key)
        pairs = gmm.sample_pairs(k1, FIXED, 16)
        a = jax.random.normal(k3, (RANK, DIM))
        expected = jnp.mean(
            losses.infonce(pairs.x @ a.T, pairs.x_pos @ a.T, temperature=0.5, normalize=False)
        )
        return gmm.infonce_objective(a, pairs, temperature=0.5, normalize=False), expected

    got, expected = both(jax.random.key(0))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_infonce_reaches_fisher_where_pca_does_not():
    """Seeded, 4 seeds vmapped. Tolerance from the setting: InfoNCE saw n = steps * batch
    pairs; a plug-in estimate of F's weakest direction (Fisher ratio gamma) from n
    samples tilts out of F by ~ sqrt((d - k + 1)(1 + 1 / gamma) / n) (0.02 to 0.04 here).
    LDA on n labelled samples must be within 3x of that, InfoNCE within 6x (no labels,
    and from a small init a weak direction is learnt last; gmm_fisher measures InfoNCE
    at ~2x LDA). PCA's top-2 directions are provably noise directions."""
    steps, batch = 250, 64
    out = gmm.sweep(
        functools.partial(_experiment, steps=steps, batch=batch, learning_rate=1e-2),
        gmm.seed_keys(0, 4),
    )
    sin = {k: np.asarray(v) for k, v in out["sin"].items()}
    gamma = np.asarray(out["weakest_fisher_ratio"])
    scale = np.sqrt((DIM - K + 1) * (1 + 1 / gamma) / (steps * batch))
    assert np.all(sin["lda"] < 3 * scale), (sin, scale)
    assert np.all(sin["infonce"] < 6 * scale), (sin, scale)
    assert np.all(sin["pca"] > 0.95), sin
    loss = np.asarray(out["loss"])
    assert np.all(loss[:, -20:].mean(1) < loss[:, :5].mean(1) - 0.1)  # it learnt something


def _train(key, learning_rate, *, steps, batch):
    pairs = functools.partial(gmm.sample_pairs, mixture=FIXED, n=batch)
    result = gmm.train_infonce(key, pairs, rank=RANK, steps=steps, learning_rate=learning_rate)
    return {"loss": result.loss, "encoder": result.params["encoder"]}


def test_vmapped_sweep_equals_python_loop():
    """One compiled call over (lr grid x seeds) == the same trainings one by one."""
    run = functools.partial(_train, steps=30, batch=16)
    keys = gmm.seed_keys(1, 3)
    lrs = jnp.array([1e-2, 3e-2])
    swept = gmm.sweep(run, keys, learning_rate=lrs)
    single = jax.jit(run)
    for i, lr in enumerate(lrs):
        for s, key in enumerate(keys):
            one = single(key, lr)
            np.testing.assert_allclose(swept["encoder"][i, s], one["encoder"], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(swept["loss"][i, s], one["loss"], rtol=1e-5, atol=1e-5)
    assert swept["loss"].shape == (2, 3, 30)


def test_sweep_rejects_non_vector_grids():
    with pytest.raises(ValueError, match="1-D"):
        gmm.sweep(lambda key, lr: lr, gmm.seed_keys(0, 2), lr=jnp.ones((2, 2)))


def test_simsiam_and_clip_trainers_run():
    @jax.jit
    def run(key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        mixture = make_mixture(k1)
        pairs = functools.partial(gmm.sample_pairs, mixture=mixture, n=32)
        simsiam = gmm.train_simsiam(k2, pairs, rank=RANK, steps=20)
        two = gmm.two_modal_mixture(
            k3, dims=(DIM, 6), num_components=K, num_noise_directions=(2, 1)
        )
        clip = gmm.train_clip(
            k4,
            functools.partial(gmm.sample_two_modal_pairs, mixture=two, n=32),
            rank=RANK,
            steps=20,
            normalize=True,
            temperature=0.5,
        )
        return simsiam, clip

    simsiam, clip = run(jax.random.key(3))
    assert simsiam.params["encoder"].shape == (RANK, DIM)
    assert simsiam.params["predictor"].shape == (RANK, RANK)
    assert clip.params["first"].shape == (RANK, DIM) and clip.params["second"].shape == (RANK, 6)
    for result in (simsiam, clip):
        assert result.loss.shape == (20,) and np.all(np.isfinite(result.loss))
    assert np.all(np.asarray(simsiam.loss) >= -1.0 - 1e-5)  # a negative cosine


def test_trainer_rejects_zero_steps():
    pairs = functools.partial(gmm.sample_pairs, mixture=FIXED, n=8)
    with pytest.raises(ValueError, match="steps"):
        gmm.train_infonce(jax.random.key(0), pairs, rank=RANK, steps=0)
