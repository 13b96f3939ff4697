"""Evaluation: feature extraction, linear probe, kNN, exact global loss and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from emc2jax import evaluate
from emc2jax.data import sources


def test_extract_features_pads_the_last_chunk_and_reads_sources():
    images = np.arange(50 * 4, dtype=np.float32).reshape(50, 4)
    calls = []

    def feature_fn(x):
        calls.append(x.shape)  # Runs at trace time only: one shape, one compile.
        return 2 * x[:, :2]

    feats = evaluate.extract_features(feature_fn, images, batch_size=16)
    np.testing.assert_array_equal(feats, 2 * images[:, :2])
    assert calls == [(16, 4)]
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        source = sources.load_source("cifar10", "test", data_dir="/nonexistent")
        feats = evaluate.extract_features(
            lambda x: x.reshape(x.shape[0], -1).sum(1, keepdims=True), source, batch_size=2
        )
        expected = [source[i]["image"].astype(np.int64).sum() for i in range(5)]
    np.testing.assert_array_equal(feats[:, 0], expected)


def test_linear_probe_separable():
    rng = np.random.default_rng(0)
    k, d = 4, 6
    means = rng.normal(size=(k, d)) * 6.0
    y_train, y_test = rng.integers(0, k, 200), rng.integers(0, k, 100)
    # A huge constant offset and scale: standardisation must take care of it.
    x_train = 1e3 + 50 * (means[y_train] + rng.normal(size=(200, d)))
    x_test = 1e3 + 50 * (means[y_test] + rng.normal(size=(100, d)))
    x_train[:, -1] = 7.0  # A dead feature must not produce NaNs.
    x_test[:, -1] = 7.0
    out = evaluate.linear_probe(
        x_train, y_train, x_test, y_test, num_classes=k, weight_decays=(1e-4, 1e-2)
    )
    assert set(out) == {
        "linear_probe/top1",
        "linear_probe/train_top1",
        "linear_probe/holdout_top1",
        "linear_probe/weight_decay",
    }
    assert all(isinstance(v, float) for v in out.values())
    assert out["linear_probe/top1"] >= 0.99
    assert out["linear_probe/weight_decay"] in (1e-4, 1e-2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        evaluate.linear_probe(x_train, y_train + 1, x_test, y_test, num_classes=k)


def _knn_numpy(train_x, train_y, test_x, k, temperature, num_classes):
    train = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    test = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    predictions = []
    for q in test:
        sims = train @ q
        top = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(num_classes)
        np.add.at(votes, train_y[top], np.exp(sims[top] / temperature))
        predictions.append(np.argmax(votes))
    return np.array(predictions)


def test_knn_exact_on_toy():
    # Two tight direction clusters; every test point has its own class's
    # points as nearest neighbours, so 1-NN and 3-NN are exact.
    train_x = np.array([[1, 0.1], [1, -0.1], [0.9, 0], [0.1, 1], [-0.1, 1], [0, 0.9]])
    train_y = np.array([0, 0, 0, 1, 1, 1])
    test_x = np.array([[1, 0.05], [0.05, 1], [2, 0.0]])
    test_y = np.array([0, 1, 0])
    out = evaluate.knn_accuracy(
        train_x, train_y, test_x, test_y, num_classes=2, ks=(1, 3, 200), chunk_size=2
    )
    # k = 200 > 6 clamps to all six points: three per class, but the
    # exp(s / T) weights still favour the near class.
    assert out == {"knn/top1_k1": 1.0, "knn/top1_k3": 1.0, "knn/top1_k200": 1.0}
    # Random features: agrees with a brute-force NumPy vote for every k.
    rng = np.random.default_rng(1)
    tx, ty = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
    qx, qy = rng.normal(size=(13, 5)), rng.integers(0, 3, 13)
    out = evaluate.knn_accuracy(
        tx, ty, qx, qy, num_classes=3, ks=(1, 5, 40), temperature=0.5, chunk_size=4
    )
    for k in (1, 5, 40):
        want = (_knn_numpy(tx, ty, qx, k, 0.5, 3) == qy).mean()
        assert out[f"knn/top1_k{k}"] == pytest.approx(want)


def _global_loss_numpy(w, views, temperature):
    m, n_aug = views.shape[:2]
    z = views.reshape(m * n_aug, -1) @ w
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    example = np.repeat(np.arange(m), n_aug)
    total = 0.0
    for r in range(m * n_aug):
        s = z @ z[r] / temperature
        positive = (example == example[r]) & (np.arange(m * n_aug) != r)
        negative = example != example[r]
        total += -s[positive].mean() + np.log(np.exp(s[negative]).sum())
    return total / (m * n_aug)


@pytest.mark.parametrize(("n_aug", "chunk_size"), [(2, 4), (3, 64)])
def test_exact_global_loss_and_grad_against_numpy(n_aug, chunk_size):
    # chunk 4 does not divide 5 * 2 views (padding path); chunk 64 > 15 views.
    rng = np.random.default_rng(n_aug)
    m, d_in, d_out, temperature = 5, 6, 3, 0.5
    views = rng.normal(size=(m, n_aug, d_in))
    w = rng.normal(size=(d_in, d_out))
    params = {"w": jnp.asarray(w, jnp.float32)}

    def apply_fn(params, x):
        return x @ params["w"]

    loss, grads = evaluate.exact_global_loss_and_grad(
        apply_fn,
        params,
        jnp.asarray(views, jnp.float32),
        temperature=temperature,
        chunk_size=chunk_size,
    )
    assert float(loss) == pytest.approx(_global_loss_numpy(w, views, temperature), rel=1e-5)
    # Central differences in float64.
    eps, numeric = 1e-6, np.zeros_like(w)
    for idx in np.ndindex(*w.shape):
        plus, minus = w.copy(), w.copy()
        plus[idx] += eps
        minus[idx] -= eps
        numeric[idx] = (
            _global_loss_numpy(plus, views, temperature)
            - _global_loss_numpy(minus, views, temperature)
        ) / (2 * eps)
    np.testing.assert_allclose(grads["w"], numeric, atol=2e-5 * max(1.0, np.abs(numeric).max()))
    metrics = evaluate.exact_global_loss(
        apply_fn, params, views, temperature=temperature, chunk_size=chunk_size
    )
    assert metrics["exact/global_loss"] == pytest.approx(float(loss))
    assert metrics["exact/grad_norm_sq"] == pytest.approx(float(np.sum(numeric**2)), rel=1e-4)


def test_exact_global_loss_bad_views():
    with pytest.raises(ValueError, match="n_aug >= 2"):
        evaluate.exact_global_loss_and_grad(
            lambda p, x: x, {}, jnp.ones((4, 1, 3)), temperature=0.1
        )


def test_exact_global_loss_with_a_flax_model_and_augmented_views():
    # The Figure-2 pipeline end to end on a tiny scale: fixed views of images,
    # a conv encoder, the loss and a finite, non-zero gradient for every leaf.
    import flax.linen as nn

    from emc2jax.data import augment

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3))(x))
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    images = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
    views = augment.finite_views(
        jax.random.key(1), images, jnp.arange(4), n_aug=2, config=augment.digits_preset()
    )
    model = Tiny()
    params = model.init(jax.random.key(2), views[:, 0])
    loss, grads = evaluate.exact_global_loss_and_grad(
        model.apply, params, views, temperature=0.2, chunk_size=3
    )
    assert np.isfinite(float(loss))
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)


def test_digits_offline_end_to_end(tmp_path):
    # The main job's default data path: build digits, stream an augmented
    # batch, then evaluate frozen (here: raw-pixel) features.
    from emc2jax.data import augment, pipeline

    train = sources.load_source("digits", "train", data_dir=str(tmp_path))
    test = sources.load_source("digits", "test", data_dir=str(tmp_path))
    batch = next(iter(pipeline.make_dataset(train, global_batch_size=8, seed=0)))
    views = augment.augment_views(
        jax.random.key(0),
        augment.to_float(batch["image"]),
        batch["index"],
        jnp.zeros(8, jnp.int32),
        augment.digits_preset(),
    )
    assert views.shape == (8, 8, 8, 1)

    def pixels(x):
        return augment.to_float(x).reshape(x.shape[0], -1)

    train_x = evaluate.extract_features(pixels, train, batch_size=512)
    test_x = evaluate.extract_features(pixels, pipeline.to_device_array(test), batch_size=512)
    train_y = pipeline.to_device_array(train, "label")
    test_y = pipeline.to_device_array(test, "label")
    probe = evaluate.linear_probe(train_x, train_y, test_x, test_y, num_classes=10)
    knn = evaluate.knn_accuracy(train_x, train_y, test_x, test_y, num_classes=10)
    # Raw pixels already separate digits well (probe ~0.98, 1-NN ~0.99).
    assert probe["linear_probe/top1"] > 0.93
    assert knn["knn/top1_k1"] > 0.95
