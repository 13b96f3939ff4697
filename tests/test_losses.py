"""Losses against naive NumPy formulas, finite differences, invariances, stability."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from emc2jax import losses

# ---------------------------------------------------------------------------
# Naive NumPy references: double loops, float64, written from the formulas.
# ---------------------------------------------------------------------------


def _np_normalize(z):
    z = np.asarray(z, np.float64)
    return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def _np_logsumexp(values):
    values = np.asarray(values, np.float64)
    top = values.max()
    return top + np.log(np.sum(np.exp(values - top)))


def np_ntxent(za, zb, tau, where=None, decoupled=False):
    b = len(za)
    z = _np_normalize(np.concatenate([za, zb]))
    valid = np.ones(b, bool) if where is None else np.asarray(where)
    valid2 = np.concatenate([valid, valid])
    out = np.zeros(2 * b)
    for i in range(2 * b):
        if not valid2[i]:
            continue
        p = (i + b) % (2 * b)
        terms = [
            z[i] @ z[j] / tau
            for j in range(2 * b)
            if j != i and valid2[j] and not (decoupled and j == p)
        ]
        out[i] = -z[i] @ z[p] / tau + _np_logsumexp(terms)
    return out


def np_infonce(a, p, neg, tau, where=None, neg_where=None):
    a, p = _np_normalize(a), _np_normalize(p)
    b = len(a)
    valid = np.ones(b, bool) if where is None else np.asarray(where)
    out = np.zeros(b)
    for i in range(b):
        if not valid[i]:
            continue
        if neg is None:
            terms = [a[i] @ p[j] / tau for j in range(b) if valid[j]]
        else:
            n = _np_normalize(neg[i])
            terms = [a[i] @ p[i] / tau] + [
                a[i] @ n[k] / tau for k in range(len(n)) if neg_where is None or neg_where[i][k]
            ]
        out[i] = -a[i] @ p[i] / tau + _np_logsumexp(terms)
    return out


def np_siglip(a, b, tau, bias, where=None):
    a, b = _np_normalize(a), _np_normalize(b)
    n = len(a)
    valid = np.ones(n, bool) if where is None else np.asarray(where)
    out = np.zeros(n)
    for i in range(n):
        if not valid[i]:
            continue
        for j in range(n):
            if not valid[j]:
                continue
            y = 1.0 if i == j else -1.0
            x = a[i] @ b[j] / tau + bias
            out[i] += np.log1p(np.exp(-y * x))
    return out


def _pairs(seed, b, d, scale=1.0):
    rng = np.random.default_rng(seed)
    za = rng.normal(size=(b, d)).astype(np.float32) * scale
    zb = (za + 0.5 * rng.normal(size=(b, d))).astype(np.float32)
    return za, zb


SHAPES = [(2, 3), (5, 4), (8, 16)]


# ---------------------------------------------------------------------------
# Values against NumPy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_ntxent_and_dcl_match_numpy(b, d, masked):
    za, zb = _pairs(b * 10 + d, b, d)
    where = ((np.arange(b) % 3 != 1) | (np.arange(b) == b - 1)) if masked else None
    np.testing.assert_allclose(
        losses.ntxent(za, zb, temperature=0.2, where=where),
        np_ntxent(za, zb, 0.2, where),
        rtol=1e-4,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        losses.dcl(za, zb, temperature=0.2, where=where),
        np_ntxent(za, zb, 0.2, where, decoupled=True),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize("b,d", SHAPES)
def test_ntxent_mean_equals_optax(b, d):
    za, zb = _pairs(b + d, b, d)
    labels = jnp.concatenate([jnp.arange(b), jnp.arange(b)])
    expected = optax.ntxent(jnp.concatenate([za, zb]), labels, temperature=0.1)
    np.testing.assert_allclose(
        jnp.mean(losses.ntxent(za, zb, temperature=0.1)), expected, rtol=1e-5
    )


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_infonce_in_batch_and_explicit_match_numpy(b, d, masked):
    za, zb = _pairs(b * 7 + d, b, d)
    neg = np.random.default_rng(b).normal(size=(b, 6, d)).astype(np.float32)
    where = (np.arange(b) % 2 == 0) if masked else None
    neg_where = (np.arange(6)[None, :] + np.arange(b)[:, None]) % 3 != 0 if masked else None
    np.testing.assert_allclose(
        losses.infonce(za, zb, temperature=0.3, where=where),
        np_infonce(za, zb, None, 0.3, where),
        rtol=1e-4,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        losses.infonce(za, zb, neg, temperature=0.3, where=where, negatives_where=neg_where),
        np_infonce(za, zb, neg, 0.3, where, neg_where),
        rtol=1e-4,
        atol=1e-5,
    )


def test_infonce_unnormalized_uses_raw_dot_products():
    za, zb = _pairs(3, 4, 3, scale=0.3)
    logits = za.astype(np.float64) @ zb.T.astype(np.float64) / 0.5
    expected = np.array([-logits[i, i] + _np_logsumexp(logits[i]) for i in range(4)])
    got = losses.infonce(za, zb, temperature=0.5, normalize=False)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_clip_and_siglip_match_numpy(b, d, masked):
    za, zb = _pairs(b * 3 + d, b, d)
    where = (np.arange(b) != 0) if masked else None
    expected_clip = 0.5 * (
        np_infonce(za, zb, None, 0.1, where) + np_infonce(zb, za, None, 0.1, where)
    )
    np.testing.assert_allclose(
        losses.clip_loss(za, zb, temperature=0.1, where=where), expected_clip, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        losses.siglip_loss(za, zb, temperature=0.1, bias=-2.0, where=where),
        np_siglip(za, zb, 0.1, -2.0, where),
        rtol=1e-4,
        atol=1e-5,
    )


def test_clip_is_mean_of_two_directions():
    za, zb = _pairs(11, 6, 5)
    forward = losses.infonce(za, zb, temperature=0.2)
    backward = losses.infonce(zb, za, temperature=0.2)
    np.testing.assert_allclose(
        losses.clip_loss(za, zb, temperature=0.2), 0.5 * (forward + backward), rtol=1e-6
    )


def test_contrastive_metrics_match_numpy():
    za, zb = _pairs(5, 6, 4)
    sim = _np_normalize(za) @ _np_normalize(zb).T
    off = ~np.eye(6, dtype=bool)
    acc = 0.5 * (np.mean(sim.argmax(1) == np.arange(6)) + np.mean(sim.argmax(0) == np.arange(6)))
    metrics = losses.contrastive_metrics(za, zb)
    assert set(metrics) == {"positive_similarity", "negative_similarity", "top1_accuracy"}
    np.testing.assert_allclose(metrics["positive_similarity"], np.diag(sim).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["negative_similarity"], sim[off].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["top1_accuracy"], acc, rtol=1e-6)


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------


def _all_losses():
    return {
        "ntxent": lambda a, b: losses.ntxent(a, b, temperature=0.5),
        "dcl": lambda a, b: losses.dcl(a, b, temperature=0.5),
        "infonce": lambda a, b: losses.infonce(a, b, temperature=0.5),
        "infonce_explicit": lambda a, b: losses.infonce(
            a, b, jnp.stack([b[::-1], 2 * a[::-1]], 1), temperature=0.5
        ),
        "clip": lambda a, b: losses.clip_loss(a, b, temperature=0.5),
        "siglip": lambda a, b: losses.siglip_loss(a, b, temperature=0.5, bias=-1.0),
    }


@pytest.mark.parametrize("name", list(_all_losses()))
def test_gradients_match_finite_differences(name):
    fn = _all_losses()[name]
    za, zb = _pairs(1, 3, 4)
    with jax.enable_x64(True):
        a, b = jnp.asarray(za, jnp.float64), jnp.asarray(zb, jnp.float64)
        # The losses compute in float32 internally; finite differences in float32
        # need a moderate step and tolerance.
        check_grads(
            lambda x, y: jnp.sum(fn(x, y)),
            (a, b),
            order=1,
            modes=("rev",),
            eps=1e-3,
            atol=2e-2,
            rtol=2e-2,
        )


def test_emc2_surrogate_gradient_is_the_estimator():
    """∇ = beta(-∇s(u,v) + sum_k c_k ∇s(u,n_k) / sum c): the design's estimator, by hand."""
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    n = rng.normal(size=(2, 3, 5))
    counts = np.array([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    tau = 0.25

    def surrogate(u):
        pos = jnp.sum(u * v, -1)
        neg = jnp.einsum("bd,bkd->bk", u, n)
        return jnp.sum(losses.emc2_surrogate(pos, neg, temperature=tau, counts=counts))

    grad = jax.grad(surrogate)(jnp.asarray(u, jnp.float32))
    # s(u, x) = <u, x>, so ∇_u s = x.
    expected = np.zeros_like(u)
    for i in range(2):
        neg_mean = (counts[i] @ n[i]) / counts[i].sum() if counts[i].sum() else 0.0
        expected[i] = (-v[i] + neg_mean) / tau
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_emc2_surrogate_without_counts_is_plain_mean():
    pos = jnp.array([0.1, 0.2])
    neg = jnp.array([[0.3, 0.5], [0.0, -0.4]])
    np.testing.assert_allclose(
        losses.emc2_surrogate(pos, neg, temperature=0.5),
        (neg.mean(1) - pos) / 0.5,
        rtol=1e-6,
    )


def test_sogclr_surrogate_gradient_is_the_estimator():
    """∇ = beta(-∇s_ip + mean_j w_ij ∇s_ij) with w = exp(beta s)/u constant."""
    rng = np.random.default_rng(1)
    u, v = rng.normal(size=(3, 4)) * 0.3, rng.normal(size=(3, 4)) * 0.3
    negs = rng.normal(size=(3, 5, 4)) * 0.3
    log_u = rng.normal(size=3)
    beta = 2.0
    mask = np.ones((3, 5), bool)
    mask[0, 1] = False

    def surrogate(u):
        pos = jnp.sum(u * v, -1)
        neg = jnp.einsum("bd,bkd->bk", u, negs)
        weights = jnp.exp(beta * neg - log_u[:, None])
        return jnp.sum(losses.sogclr_surrogate(pos, neg, weights, temperature=1 / beta, where=mask))

    grad = jax.grad(surrogate)(jnp.asarray(u, jnp.float32))
    expected = np.zeros_like(u)
    for i in range(3):
        s = negs[i] @ u[i]
        w = np.exp(beta * s - log_u[i])
        m = mask[i]
        expected[i] = beta * (-v[i] + (w[m, None] * negs[i][m]).sum(0) / m.sum())
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)


def test_sogclr_weights_exp_over_u_make_the_gradient_of_log_mean_exp():
    """With u equal to the batch mean of exp(beta s), SogCLR is exactly ∇[log mean exp(beta s) - beta s_p]."""
    rng = np.random.default_rng(2)
    u, v = rng.normal(size=(2, 4)) * 0.5, rng.normal(size=(2, 4)) * 0.5
    negs = rng.normal(size=(2, 6, 4)) * 0.5
    beta = 3.0

    def exact(u):
        neg = jnp.einsum("bd,bkd->bk", u, negs)
        return jnp.sum(
            jax.nn.logsumexp(beta * neg, axis=1) - jnp.log(6.0) - beta * jnp.sum(u * v, -1)
        )

    def surrogate(u):
        neg = jnp.einsum("bd,bkd->bk", u, negs)
        log_u = jax.nn.logsumexp(beta * neg, axis=1) - jnp.log(6.0)
        weights = jnp.exp(beta * neg - log_u[:, None])
        return jnp.sum(
            losses.sogclr_surrogate(jnp.sum(u * v, -1), neg, weights, temperature=1 / beta)
        )

    u32 = jnp.asarray(u, jnp.float32)
    np.testing.assert_allclose(jax.grad(surrogate)(u32), jax.grad(exact)(u32), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Invariances, stability, composition, errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ntxent", "dcl", "infonce", "clip", "siglip"])
def test_permuting_the_batch_permutes_the_outputs(name):
    fn = _all_losses()[name]
    za, zb = _pairs(3, 6, 4)
    perm = np.random.default_rng(0).permutation(6)
    out = fn(za, zb)
    out_perm = fn(za[perm], zb[perm])
    if out.shape[0] == 12:  # both views are anchors
        perm = np.concatenate([perm, perm + 6])
    np.testing.assert_allclose(out_perm, out[perm], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(_all_losses()))
@pytest.mark.parametrize("case", ["bfloat16", "near_identical"])
def test_finite_at_low_temperature(name, case):
    za, zb = _pairs(4, 4, 8)
    if case == "near_identical":
        za = np.tile(za[:1], (4, 1))
        zb = za + 1e-7
    za, zb = (
        jnp.asarray(za, jnp.bfloat16 if case == "bfloat16" else jnp.float32),
        jnp.asarray(zb, za.dtype),
    )

    def total(a, b):
        fns = {
            "ntxent": lambda: losses.ntxent(a, b, temperature=0.01),
            "dcl": lambda: losses.dcl(a, b, temperature=0.01),
            "infonce": lambda: losses.infonce(a, b, temperature=0.01),
            "infonce_explicit": lambda: losses.infonce(
                a, b, jnp.stack([b[::-1], a[::-1]], 1), temperature=0.01
            ),
            "clip": lambda: losses.clip_loss(a, b, temperature=0.01),
            "siglip": lambda: losses.siglip_loss(a, b, temperature=0.01, bias=-10.0),
        }
        return jnp.sum(fns[name]())

    value, grads = jax.value_and_grad(total, argnums=(0, 1))(za, zb)
    assert value.dtype == jnp.float32
    assert np.isfinite(float(value))
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g, np.float32)))


def test_masked_rows_are_zero_and_have_no_influence():
    za, zb = _pairs(9, 5, 3)
    where = np.array([True, True, False, True, False])
    base = losses.ntxent(za, zb, temperature=0.2, where=where)
    junk_a, junk_b = za.copy(), zb.copy()
    junk_a[~where] = 100.0
    junk_b[~where] = -7.0
    np.testing.assert_allclose(
        losses.ntxent(junk_a, junk_b, temperature=0.2, where=where), base, rtol=1e-5
    )
    assert np.all(np.asarray(base)[np.concatenate([~where, ~where])] == 0.0)


@pytest.mark.parametrize("name", list(_all_losses()))
def test_jit_vmap_grad_compose(name):
    fn = _all_losses()[name]
    za, zb = _pairs(12, 3, 4)
    stacked_a, stacked_b = np.stack([za, za * 2]), np.stack([zb, zb[::-1]])
    batched = jax.jit(jax.vmap(fn))(stacked_a, stacked_b)
    np.testing.assert_allclose(batched[0], fn(za, zb), rtol=1e-5)
    grads = jax.jit(jax.vmap(jax.grad(lambda a, b: jnp.sum(fn(a, b)))))(stacked_a, stacked_b)
    assert grads.shape == stacked_a.shape and np.all(np.isfinite(grads))


def test_surrogates_jit_vmap_grad_compose():
    pos, neg = jnp.ones((2, 3)), jnp.ones((2, 3, 4))
    counts = jnp.ones((2, 3, 4))
    f = jax.jit(
        jax.vmap(lambda p, n, c: jnp.sum(losses.emc2_surrogate(p, n, temperature=0.1, counts=c)))
    )
    assert f(pos, neg, counts).shape == (2,)
    g = jax.vmap(
        jax.grad(lambda p, n, w: jnp.sum(losses.sogclr_surrogate(p, n, w, temperature=0.1)))
    )
    assert g(pos, neg, counts).shape == (2, 3)


@pytest.mark.parametrize(
    "call, fragment",
    [
        (
            lambda: losses.ntxent(jnp.ones((3, 4)), jnp.ones((2, 4)), temperature=0.1),
            r"\(3, 4\) and \(2, 4\)",
        ),
        (lambda: losses.dcl(jnp.ones((3,)), jnp.ones((3,)), temperature=0.1), r"rank 2.*\(3,\)"),
        (
            lambda: losses.infonce(
                jnp.ones((3, 4)), jnp.ones((3, 4)), jnp.ones((2, 5, 4)), temperature=0.1
            ),
            r"\(2, 5, 4\)",
        ),
        (
            lambda: losses.clip_loss(jnp.ones((3, 4)), jnp.ones((3, 5)), temperature=0.1),
            r"\(3, 4\) and \(3, 5\)",
        ),
        (
            lambda: losses.siglip_loss(
                jnp.ones((3, 4)),
                jnp.ones((3, 4)),
                temperature=0.1,
                bias=0.0,
                where=jnp.ones(4, bool),
            ),
            r"\(3,\).*\(4,\)",
        ),
        (
            lambda: losses.ntxent(jnp.ones((3, 4)), jnp.ones((3, 4)), temperature=-1.0),
            "temperature",
        ),
        (
            lambda: losses.emc2_surrogate(jnp.ones(3), jnp.ones((2, 4)), temperature=0.1),
            r"\(3,\) and \(2, 4\)",
        ),
        (
            lambda: losses.emc2_surrogate(
                jnp.ones(2), jnp.ones((2, 4)), temperature=0.1, counts=jnp.ones((2, 3))
            ),
            r"\(2, 3\)",
        ),
        (
            lambda: losses.sogclr_surrogate(
                jnp.ones(2), jnp.ones((2, 4)), jnp.ones((2, 5)), temperature=0.1
            ),
            r"\(2, 5\)",
        ),
    ],
)
def test_bad_shapes_raise_value_error_naming_shapes(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()
