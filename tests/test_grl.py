"""Gradient reversal (Ganin & Lempitsky 2015), the thesis' eq. 4.2 schedule, and the
AdAGeo domain discriminator. References: hand-derived gradients and the thesis' own
statements (§4.4.1: coefficient 0 in the first epoch; Fig. 4.4: 0.9 reached after 9, 6
and 4 of 20 epochs for gamma = 7, 10, 15)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvpr.models import DomainDiscriminator, grad_reverse, grl_coefficient, grl_coefficient_at_step, grl_schedule


def test_forward_is_identity_and_backward_is_minus_coeff():
    x = jnp.arange(6.0).reshape(2, 3)
    w = jnp.array([[1.0, -2.0, 3.0], [0.5, 0.0, -1.5]])
    np.testing.assert_array_equal(grad_reverse(x, 0.7), x)
    for coeff in (0.0, 0.3, 1.0, 2.5):
        gx, gc = jax.grad(lambda x_, c_: jnp.sum(grad_reverse(x_, c_) * w), argnums=(0, 1))(x, jnp.float32(coeff))
        np.testing.assert_allclose(gx, -coeff * w, rtol=1e-6)
        assert float(gc) == 0.0  # the coefficient is a schedule value, not trained


def test_changing_coefficient_does_not_recompile():
    traces = []

    @jax.jit
    def step(x, coeff):
        traces.append(1)  # runs only while tracing
        return jax.grad(lambda x_: jnp.sum(jnp.sin(grad_reverse(x_, coeff))))(x)

    x = jnp.linspace(-1.0, 1.0, 5)
    for epoch in range(6):
        coeff = jnp.float32(grl_coefficient(epoch, 20, gamma=10.0))
        np.testing.assert_allclose(step(x, coeff), -float(coeff) * np.cos(np.asarray(x)), rtol=1e-6, atol=1e-7)
    assert len(traces) == 1


def test_thesis_schedule_is_zero_in_first_epoch_and_matches_figure_4_4():
    for gamma in (5.0, 7.0, 10.0, 12.0, 15.0, 16.0):
        assert grl_coefficient(0, 20, gamma) == 0.0
    # Fig. 4.4: "the 0.9 threshold is reached after 9, 6 and 4 epochs for gamma = 7, 10 and 15"
    # -> with p = epoch_index / 20 the coefficient first reaches 0.9 at epoch index 9, 6, 4.
    for gamma, first in ((7.0, 9), (10.0, 6), (15.0, 4)):
        values = [grl_coefficient(e, 20, gamma) for e in range(20)]
        assert values[first] >= 0.9 and values[first - 1] < 0.9, (gamma, values)
        assert all(b > a for a, b in zip(values, values[1:]))  # increasing towards 1
        assert values[-1] < 1.0
    # Eq. 4.2 by hand: 2 / (1 + e^-5) - 1 at p = 0.5, gamma = 10.
    assert grl_coefficient(10, 20, 10.0) == pytest.approx(2.0 / (1.0 + math.exp(-5.0)) - 1.0)


def test_per_step_schedule_and_traced_progress():
    assert float(grl_coefficient_at_step(0, 1000, 10.0)) == 0.0
    np.testing.assert_allclose(float(grl_coefficient_at_step(500, 1000, 10.0)), math.tanh(2.5), rtol=1e-6)
    jitted = jax.jit(lambda s: grl_coefficient_at_step(s, 1000, 10.0))
    np.testing.assert_allclose(float(jitted(jnp.int32(250))), float(grl_schedule(0.25, 10.0)), rtol=1e-6)
    with pytest.raises(ValueError):
        grl_coefficient(0, 0, 10.0)


def test_discriminator_layers_pooling_and_reversal():
    disc = DomainDiscriminator(n_domains=3)
    fmap = jax.random.normal(jax.random.key(0), (4, 5, 6, 32))
    variables = disc.init(jax.random.key(1), fmap)
    shapes = jax.tree.map(lambda a: a.shape, variables["params"])
    assert shapes == {
        "fc1": {"kernel": (32, 50), "bias": (50,)},
        "fc2": {"kernel": (50, 20), "bias": (20,)},
        "fc3": {"kernel": (20, 3), "bias": (3,)},
    }
    logits = disc.apply(variables, fmap)
    assert logits.shape == (4, 3)
    # A feature map is global-average-pooled: same logits as the pooled (B, C) features.
    np.testing.assert_allclose(disc.apply(variables, fmap.mean(axis=(1, 2))), logits, rtol=1e-5, atol=1e-6)

    def loss(x, coeff):
        return jnp.sum(disc.apply(variables, x, grl_coeff=coeff) ** 2)

    plain = jax.grad(lambda x: jnp.sum(disc.apply(variables, x) ** 2))(fmap)
    np.testing.assert_allclose(jax.grad(loss)(fmap, 0.5), -0.5 * plain, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="feature"):
        disc.apply(variables, jnp.zeros((2, 3, 32)))
