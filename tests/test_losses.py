"""Losses against hand-computed values and PyTorch's own implementations."""

import numpy as np
import pytest
import jax.numpy as jnp

from jaxvpr.train import losses


def test_cosface_hand_computed():
    desc = jnp.array([[3.0, 4.0]])          # unit: (0.6, 0.8)
    weight = jnp.array([[1.0, 0.0], [0.0, 2.0]])  # unit rows: e1, e2
    logits = losses.cosface_logits(desc, weight, jnp.array([1]), s=30.0, m=0.4)
    np.testing.assert_allclose(logits, [[30 * 0.6, 30 * (0.8 - 0.4)]], rtol=1e-6)
    z = np.array([18.0, 12.0])
    expected = -(z[1] - np.log(np.exp(z).sum()))
    np.testing.assert_allclose(losses.cosface_loss(desc, weight, jnp.array([1])), expected, rtol=1e-6)


def test_cosface_weight_init_bounds():
    w = losses.init_cosface_weight(np.random.default_rng(0), 1000, 512)
    bound = np.sqrt(6 / 1512)
    assert w.shape == (1000, 512) and w.dtype == np.float32
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert abs(w.std() - bound / np.sqrt(3)) < 0.01 * bound


def test_domain_loss_and_accuracy():
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [1.0, 0.0]])
    loss, acc = losses.domain_loss_and_accuracy(logits, jnp.array([0, 1, 1, 0]))
    assert float(acc) == 0.75
    ref = np.mean([np.log1p(np.exp(-2)), np.log1p(np.exp(-1)), np.log1p(np.exp(3)), np.log1p(np.exp(-1))])
    np.testing.assert_allclose(loss, ref, rtol=1e-6)


def test_triplet_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    a, p = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=(3, 8)).astype(np.float32)
    n = rng.normal(size=(3, 10, 8)).astype(np.float32)
    ref = torch.nn.TripletMarginLoss(margin=0.1, p=2, reduction="sum")(
        torch.tensor(a).repeat_interleave(10, 0), torch.tensor(p).repeat_interleave(10, 0),
        torch.tensor(n.reshape(30, 8)))
    got = losses.triplet_loss(jnp.array(a), jnp.array(p), jnp.array(n), margin=0.1)
    np.testing.assert_allclose(got, ref.item(), rtol=1e-5)
    # squared distances (AdAGeo eq. 8), hand formula
    d = lambda x, y: ((x - y + 1e-6) ** 2).sum(-1)
    ref_sq = np.maximum(d(a, p)[:, None] - d(a[:, None], n) + 0.1, 0).sum()
    np.testing.assert_allclose(losses.triplet_loss(a, p, n, 0.1, squared=True), ref_sq, rtol=1e-5)
