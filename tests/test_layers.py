"""``layers.small_map_conv``: the same convolution as ``lax.conv_general_dilated`` on every shape, taken
as a patch matrix product only on output maps of at most 4 positions (XLA's CPU cliff)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxvpr.models.layers import SMALL_MAP_POSITIONS, small_map_conv

NHWC = ("NHWC", "HWIO", "NHWC")


def reference(x, w, strides, padding):
    """The convolution in float64 numpy, by its definition: out[b, y, x, o] = sum_{i, j, c} in * k."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    (top, bottom), (left, right) = padding
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    kh, kw, _, cout = w.shape
    out_h = (xp.shape[1] - kh) // strides[0] + 1
    out_w = (xp.shape[2] - kw) // strides[1] + 1
    out = np.zeros((x.shape[0], out_h, out_w, cout))
    for y in range(out_h):
        for z in range(out_w):
            window = xp[:, y * strides[0]:y * strides[0] + kh, z * strides[1]:z * strides[1] + kw, :]
            out[:, y, z] = np.einsum("bijc,ijco->bo", window, w)
    return out


def conv(fn, x, w, strides, padding):
    return fn(x, w, strides, padding, dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, NHWC))


@pytest.mark.parametrize("in_hw,kernel,strides,padding", [
    ((2, 2), 3, (1, 1), ((1, 1), (1, 1))),   # ResNet layer4 at 33-64 px inputs
    ((4, 4), 3, (2, 2), ((1, 1), (1, 1))),   # layer4's first conv: 4 x 4 -> 2 x 2
    ((1, 1), 3, (1, 1), ((1, 1), (1, 1))),   # 1 x 1 maps (<= 32 px inputs)
    ((3, 2), 3, (2, 1), ((1, 1), (1, 1))),   # 2 x 2 from a non-square map
    ((1, 4), 3, (1, 1), ((1, 1), (0, 0))),   # 1 x 2, asymmetric padding per axis
    ((6, 6), 7, (2, 2), ((3, 3), (3, 3))),   # a 7 x 7 stem-like kernel: 3 x 3 output, 9 positions
])
def test_small_map_conv_is_the_convolution_on_every_shape(in_hw, kernel, strides, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, *in_hw, 5)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 5, 7)).astype(np.float32))
    got = conv(small_map_conv, x, w, strides, padding)
    np.testing.assert_allclose(np.asarray(got), reference(x, w, strides, padding), rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(conv(fn, x, w, strides, padding)))

    got_grads = jax.grad(loss(small_map_conv), argnums=(0, 1))(x, w)
    lax_grads = jax.grad(loss(lax.conv_general_dilated), argnums=(0, 1))(x, w)
    for a, b in zip(got_grads, lax_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def _primitives(fn, *args):
    return {str(eqn.primitive) for eqn in jax.make_jaxpr(fn)(*args).eqns}


def test_only_maps_of_at_most_four_positions_leave_lax_and_larger_ones_are_bit_identical():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(3, 3, 8, 8)).astype(np.float32))
    pad = ((1, 1), (1, 1))
    for hw, small in (((1, 1), True), ((2, 2), True), ((1, 4), True), ((2, 3), False), ((3, 3), False), ((8, 8), False)):
        x = jnp.asarray(rng.normal(size=(2, *hw, 8)).astype(np.float32))
        assert (hw[0] * hw[1] <= SMALL_MAP_POSITIONS) == small
        prims = _primitives(lambda x, w: conv(small_map_conv, x, w, (1, 1), pad), x, w)
        assert ("conv_general_dilated" not in prims) == small, (hw, prims)
        if not small:  # the very same call to lax: the same bits
            np.testing.assert_array_equal(np.asarray(conv(small_map_conv, x, w, (1, 1), pad)),
                                          np.asarray(conv(lax.conv_general_dilated, x, w, (1, 1), pad)))
    # 1 x 1 kernels (already a matrix product), string padding and grouped convolutions go to lax too
    x = jnp.asarray(rng.normal(size=(2, 2, 2, 8)).astype(np.float32))
    assert "conv_general_dilated" in _primitives(
        lambda x, w: conv(small_map_conv, x, w, (1, 1), ((0, 0), (0, 0))), x, w[:1, :1])
    assert "conv_general_dilated" in _primitives(lambda x, w: conv(small_map_conv, x, w, (1, 1), "SAME"), x, w)
    grouped = lambda x, w: small_map_conv(x, w, (1, 1), pad, feature_group_count=2,
                                          dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, NHWC))
    assert "conv_general_dilated" in _primitives(grouped, x, w[:, :, :4])


def test_bfloat16_inputs_stay_bfloat16():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 2, 2, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(3, 3, 16, 4)), jnp.bfloat16)
    got = conv(small_map_conv, x, w, (1, 1), ((1, 1), (1, 1)))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), reference(x.astype(jnp.float32), w.astype(jnp.float32),
                                                                      (1, 1), ((1, 1), (1, 1))), rtol=0.05, atol=0.3)
