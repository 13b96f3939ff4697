"""The exact negative distribution and the exact global contrastive loss (the oracle)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emc2jax import losses
from emc2jax.samplers import exact


def test_distribution_by_hand_with_mask_and_empty_row():
    scores = jnp.log(jnp.array([[1.0, 3.0, 4.0], [2.0, 2.0, 2.0], [1.0, 1.0, 1.0]]))
    mask = jnp.array([[True, True, True], [True, False, True], [False, False, False]])
    probs = exact.exact_negative_distribution(scores, mask)
    np.testing.assert_allclose(probs, [[1 / 8, 3 / 8, 4 / 8], [0.5, 0, 0.5], [0, 0, 0]], rtol=1e-6)
    np.testing.assert_allclose(exact.log_normalizer(scores[:2], mask[:2]), np.log([8.0, 4.0]))
    _, out, info = exact.step(
        jax.random.key(0), exact.init(3), negative_log_scores=scores, negative_mask=mask
    )
    np.testing.assert_allclose(out.weights, probs, rtol=1e-6)
    entropy = [-(np.array([1, 3, 4]) / 8 * np.log(np.array([1, 3, 4]) / 8)).sum(), np.log(2), 0]
    np.testing.assert_allclose(info.mean_entropy, np.mean(entropy), rtol=1e-6)
    # Large log-scores (temperature 0.01) stay finite.
    assert np.all(np.isfinite(exact.exact_negative_distribution(100.0 * scores)))


def test_total_variation_and_own_example_mask():
    np.testing.assert_allclose(
        exact.total_variation(jnp.array([0.5, 0.5]), jnp.array([1.0, 0])), 0.5
    )
    np.testing.assert_array_equal(
        exact.own_example_mask(jnp.array([0, 2]), jnp.array([0, 1, 2, 0])),
        [[False, True, True, False], [True, True, False, True]],
    )
    with pytest.raises(ValueError, match="same shape"):
        exact.total_variation(jnp.zeros(2), jnp.zeros(3))


def _views(rng, b=6, d=5):
    return rng.normal(size=(b, d)).astype(np.float32), rng.normal(size=(b, d)).astype(np.float32)


def test_global_loss_over_the_batch_bank_is_dcl():
    # Bank = all 2B views of the batch; excluding the anchor's own example removes
    # the anchor and its positive: exactly the decoupled contrastive loss.
    z_a, z_b = _views(np.random.default_rng(0))
    b = z_a.shape[0]
    anchors = np.concatenate([z_a, z_b])
    positives = np.concatenate([z_b, z_a])
    ids = np.concatenate([np.arange(b), np.arange(b)])
    got = exact.global_contrastive_loss(
        anchors, positives, anchors, anchor_index=ids, bank_index=ids, temperature=0.2
    )
    np.testing.assert_allclose(got, losses.dcl(z_a, z_b, temperature=0.2), rtol=1e-5)


def test_chunked_global_loss_matches_value_and_gradient():
    rng = np.random.default_rng(1)
    anchors, positives = _views(rng)
    bank = rng.normal(size=(23, 5)).astype(np.float32)
    anchor_index = np.arange(6)
    bank_index = rng.integers(0, 10, size=23)

    def total(a, p, k, chunk_size):
        return jnp.sum(
            exact.global_contrastive_loss(
                a,
                p,
                k,
                anchor_index=anchor_index,
                bank_index=bank_index,
                temperature=0.1,
                chunk_size=chunk_size,
            )
        )

    grad = jax.grad(total, argnums=(0, 1, 2))
    for chunk in (None, 5, 23):
        np.testing.assert_allclose(
            total(anchors, positives, bank, chunk), total(anchors, positives, bank, None), rtol=1e-5
        )
        for g, g_ref in zip(
            grad(anchors, positives, bank, chunk), grad(anchors, positives, bank, None), strict=True
        ):
            np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)


def test_exact_weights_in_the_emc2_surrogate_give_the_global_gradient():
    # With the chain's counts replaced by pi_u, the EMC² estimator is the exact
    # GCL gradient (w.r.t. the anchors, the bank being held fixed).
    rng = np.random.default_rng(2)
    anchors, positives = _views(rng)
    bank = rng.normal(size=(12, 5)).astype(np.float32)
    anchor_index, bank_index = np.arange(6), np.arange(12) % 9
    tau = 0.3

    def gcl(a):
        return jnp.sum(
            exact.global_contrastive_loss(
                a,
                positives,
                bank,
                anchor_index=anchor_index,
                bank_index=bank_index,
                temperature=tau,
            )
        )

    def surrogate(a):
        u = losses.l2_normalize(a)
        v = losses.l2_normalize(positives)
        n = losses.l2_normalize(bank)
        sims = u @ n.T
        mask = exact.own_example_mask(anchor_index, bank_index)
        _, out, _ = exact.step(
            None, exact.init(), negative_log_scores=sims / tau, negative_mask=mask
        )
        return jnp.sum(
            losses.emc2_surrogate(jnp.sum(u * v, 1), sims, temperature=tau, counts=out.weights)
        )

    np.testing.assert_allclose(
        jax.grad(surrogate)(anchors), jax.grad(gcl)(anchors), rtol=1e-4, atol=1e-6
    )


def test_bad_input():
    with pytest.raises(ValueError, match="rank 2"):
        exact.exact_negative_distribution(jnp.zeros(3))
    with pytest.raises(ValueError, match="mask must have shape"):
        exact.exact_negative_distribution(jnp.zeros((2, 3)), jnp.ones((2, 2), bool))
    with pytest.raises(ValueError, match="temperature"):
        exact.global_contrastive_loss(
            jnp.zeros((2, 3)),
            jnp.zeros((2, 3)),
            jnp.zeros((4, 3)),
            anchor_index=jnp.arange(2),
            bank_index=jnp.arange(4),
            temperature=0.0,
        )
