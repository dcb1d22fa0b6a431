"""Small layers shared by the backbones and heads, written to match PyTorch exactly.

Everything here is NHWC. The point of this file is numerical parity with the
PyTorch models whose checkpoints we import (see ``jaxvpr.convert``):

* :class:`BatchNorm` reproduces ``torch.nn.BatchNorm2d`` in both modes, including
  the unbiased running-variance update and the ``num_batches_tracked`` counter.
* :func:`l2_normalize` is ``torch.nn.functional.normalize(x, p=2, dim=...)``
  (division by ``max(||x||, 1e-12)``).
* :func:`torch_conv` / :func:`max_pool` use explicit symmetric zero / -inf padding
  as ``nn.Conv2d(padding=p)`` and ``nn.MaxPool2d(padding=p)`` do.
* :func:`adaptive_avg_pool` reproduces ``nn.AdaptiveAvgPool2d`` bin edges.
* :func:`small_map_conv` is ``lax.conv_general_dilated``, computed as one matrix product of the
  patches where the output map has at most 4 positions (XLA's CPU convolution is 27x slower there).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# PyTorch initialisers, so that a model trained from scratch starts where the
# PyTorch anchor would (torchvision's ResNet/VGG init, nn.Linear's default init).
conv_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
"""``nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu')`` (torchvision ResNet/VGG)."""

torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
"""``nn.Linear``/``nn.Conv2d`` default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""


def torch_default_bias_init(fan_in: int):
    """``nn.Linear``/``nn.Conv2d`` default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||_2, eps)`` along ``axis`` (``torch.nn.functional.normalize``).

    PyTorch's order of operations (norm, clamp, divide), so that values and gradients round alike;
    where ``||x||^2 <= eps^2`` the square root is taken of ``eps^2`` instead (the same norm after the
    clamp), so the gradient there is PyTorch's ``x / eps`` term alone rather than NaN from sqrt's
    infinite slope at 0 (AdAGeo's attention drives whole local features to 0, recipes_facts §A.2.2).
    The order matters in practice: the algebraically equal ``x / sqrt(max(||x||^2, eps^2))`` rounds
    differently, and 200 steps of the demo baseline then end 10 validation R@1 points apart.
    """
    squared = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    floor = jnp.asarray(eps, squared.dtype) ** 2
    norm = jnp.sqrt(jnp.where(squared > floor, squared, floor))
    return x / jnp.maximum(norm, eps)


SMALL_MAP_POSITIONS = 4
"""Output maps with at most this many positions are convolved as a patch matrix product."""


def small_map_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` that takes the patches x kernel matrix product on tiny output maps.

    XLA's CPU convolution (jaxlib 0.10, both its own and the YNNPACK path) falls off a cliff on maps
    of 2 x 2 positions: a 3 x 3 convolution of 512 channels on a batch of 8 takes 119 ms, against 7 ms
    on 3 x 3 maps that hold twice the work; its gradient 234 ms. ResNet's layer4 has such maps
    for 33-64 px inputs, so a ResNet-18 described a 64 px image in 48 ms and a 96 px one in 9 ms.
    Here, where the output has at most :data:`SMALL_MAP_POSITIONS` positions, the (kh*kw*cin)
    patches of every position are gathered and multiplied by the kernel reshaped to (kh*kw*cin, cout):
    the same sums (4.3 ms and 9 ms for the case above; ``bench/small_map_conv.py``). Elsewhere -- every
    map of 3 x 3 or more, so every demo and benchmark resolution (>= 72 px) -- it *is*
    ``lax.conv_general_dilated``, bit for bit. Only NHWC/HWIO, ungrouped, undilated convolutions
    with explicit padding take the other route; anything else goes to ``lax`` unchanged.
    """
    plain = (lhs.ndim == 4 and not isinstance(padding, str) and feature_group_count == 1 and not kwargs
             and tuple(lhs_dilation or (1, 1)) == (1, 1) and tuple(rhs_dilation or (1, 1)) == (1, 1)
             and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")))
    if plain:
        kh, kw, cin, cout = rhs.shape
        (top, bottom), (left, right) = padding
        sh, sw = window_strides
        out_h = (lhs.shape[1] + top + bottom - kh) // sh + 1
        out_w = (lhs.shape[2] + left + right - kw) // sw + 1
        plain = kh * kw > 1 and cin == lhs.shape[3] and 0 < out_h * out_w <= SMALL_MAP_POSITIONS
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)
    x = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    patches = jnp.concatenate([x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
                               for i in range(kh) for j in range(kw)], axis=-1)  # (i, j, c): rhs's order
    y = jnp.dot(patches.reshape(-1, kh * kw * cin), rhs.reshape(kh * kw * cin, cout), precision=precision)
    return y.reshape(lhs.shape[0], out_h, out_w, cout)


def torch_conv(
    features: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    use_bias: bool = True,
    kernel_init=conv_kaiming_fan_out,
    name: str | None = None,
    bias_init=nn.initializers.zeros_init(),
) -> nn.Conv:
    """An ``nn.Conv`` configured like ``torch.nn.Conv2d(k, stride, padding)`` (symmetric zero padding)."""
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=bias_init,
        name=name,
        conv_general_dilated=small_map_conv,
    )


def max_pool(x: jax.Array, kernel_size: int, stride: int, padding: int = 0) -> jax.Array:
    """``nn.MaxPool2d(kernel_size, stride, padding)`` with ``ceil_mode=False``; padding is -inf."""
    return nn.max_pool(
        x,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
    )


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
    """``nn.AdaptiveAvgPool2d(output_size)`` on an NHWC map.

    Output bin ``i`` of an axis of length ``L`` split into ``S`` bins averages the
    input range ``[floor(i*L/S), ceil((i+1)*L/S))`` -- PyTorch's rule, which lets
    bins overlap when ``L`` is not a multiple of ``S``.
    """
    _, height, width, _ = x.shape
    out_h, out_w = output_size
    rows = []
    for i in range(out_h):
        h0, h1 = (i * height) // out_h, -((-(i + 1) * height) // out_h)
        cols = []
        for j in range(out_w):
            w0, w1 = (j * width) // out_w, -((-(j + 1) * width) // out_w)
            cols.append(jnp.mean(x[:, h0:h1, w0:w1, :], axis=(1, 2)))
        rows.append(jnp.stack(cols, axis=1))
    return jnp.stack(rows, axis=1)


def nhwc_to_torch_flat(x: jax.Array) -> jax.Array:
    """Flatten an NHWC map in PyTorch's NCHW (channel-major) order: ``x.permute(0,3,1,2).flatten(1)``.

    Use before any layer whose PyTorch counterpart follows a ``flatten`` of an NCHW
    tensor, so the converted weights apply unchanged.
    """
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm2d`` (eps 1e-5, momentum 0.1) over the last axis.

    Variables: ``params/{scale,bias}`` (torch ``weight``, ``bias``) and
    ``batch_stats/{mean,var,num_batches_tracked}`` (torch ``running_mean``,
    ``running_var``, ``num_batches_tracked``; the counter is an int32 scalar).

    * ``train=False``: normalise with the running statistics.
    * ``train=True``: normalise with the batch mean and the *biased* batch variance;
      update ``mean <- (1-m) mean + m batch_mean`` and
      ``var <- (1-m) var + m batch_var_unbiased`` (``m`` = ``momentum``, torch
      convention, i.e. flax momentum ``1-m``) and add 1 to ``num_batches_tracked``.
      Statistics are not updated while the module is being initialised. Call
      ``apply(..., mutable=['batch_stats'])`` to receive the new statistics.

    Under ``jax.jit`` with a batch-sharded input the means are global over all
    devices (GSPMD inserts the reductions). Inside ``shard_map``/``pmap`` set
    ``axis_name`` to average the per-device moments over that axis.
    """

    epsilon: float = 1e-5
    momentum: float = 0.1
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        counter = self.variable(
            "batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32)
        )

        compute_dtype = jnp.promote_types(x.dtype, jnp.float32)  # bf16 inputs: statistics in float32
        if train:
            xf = x.astype(compute_dtype)
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            if self.axis_name is not None:
                mean = jax.lax.pmean(mean, self.axis_name)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            count = math.prod(x.shape[:-1])
            if self.axis_name is not None:
                var = jax.lax.pmean(var, self.axis_name)
                count = count * jax.lax.psum(1, self.axis_name)
            if not self.is_initializing():
                unbiased = var * (count / jnp.maximum(count - 1, 1))
                m = self.momentum
                running_mean.value = (1.0 - m) * running_mean.value + m * mean
                running_var.value = (1.0 - m) * running_var.value + m * unbiased
                counter.value = counter.value + 1
        else:
            mean, var = running_mean.value, running_var.value

        inv = jax.lax.rsqrt(var + self.epsilon) * scale
        y = (x.astype(compute_dtype) - mean) * inv + bias
        return y.astype(x.dtype)
