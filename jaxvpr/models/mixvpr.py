"""MixVPR aggregation (Ali-bey et al., "MixVPR: Feature Mixing for Visual Place
Recognition", WACV 2023).

Input: a (B, H, W, C) map -- for the published 4096-d model, ResNet-50 cropped
after layer3 on 320x320 images: C=1024, H=W=20. Each channel's flattened spatial
map (length HW, row-major h*W+w as PyTorch's ``flatten(2)`` of NCHW) goes through
``mix_depth`` Feature-Mixer blocks (eq. 2):

    X <- X + W2 ReLU(W1 LayerNorm(X))          (per channel, over the HW axis)

then ``channel_proj`` (Linear C -> out_channels, over channels), ``row_proj``
(Linear HW -> out_rows, over space), flatten in (out_channels, out_rows) order
and L2: descriptor size ``out_channels * out_rows`` (1024 x 4 = 4096).

Flax names: ``mix_{i}/{norm, fc1, fc2}``, ``channel_proj``, ``row_proj``
(PyTorch ``aggregator.mix.{i}.mix.{0,1,3}``, ``aggregator.channel_proj``,
``aggregator.row_proj``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvpr.models.layers import l2_normalize, torch_default_bias_init, torch_default_kernel_init

_trunc_normal_002 = nn.initializers.truncated_normal(stddev=0.02, lower=-2.0 / 0.02, upper=2.0 / 0.02)
"""``nn.init.trunc_normal_(w, std=0.02)`` (cut at +-2 absolute, i.e. +-100 sigma: effectively normal)."""


class FeatureMixer(nn.Module):
    """One Feature-Mixer block over the last axis (length ``in_dim``)."""

    mlp_ratio: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        y = nn.LayerNorm(epsilon=1e-5, name="norm")(x)
        y = nn.Dense(int(dim * self.mlp_ratio), kernel_init=_trunc_normal_002, name="fc1")(y)
        y = nn.Dense(dim, kernel_init=_trunc_normal_002, name="fc2")(nn.relu(y))
        return x + y


class MixVPR(nn.Module):
    """(B, in_h, in_w, C) -> (B, out_channels * out_rows) unit-norm descriptor."""

    in_h: int = 20
    in_w: int = 20
    out_channels: int = 1024
    mix_depth: int = 4
    mlp_ratio: float = 1.0
    out_rows: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        batch, height, width, channels = x.shape
        if (height, width) != (self.in_h, self.in_w):
            raise ValueError(
                f"MixVPR was configured for {self.in_h}x{self.in_w} feature maps (e.g. 320x320 images on "
                f"ResNet-50 up to layer3) but got {height}x{width}; resize the images or set in_h/in_w"
            )
        x = jnp.transpose(x.reshape(batch, height * width, channels), (0, 2, 1))  # (B, C, HW)
        for i in range(self.mix_depth):
            x = FeatureMixer(self.mlp_ratio, name=f"mix_{i}")(x)
        x = jnp.transpose(x, (0, 2, 1))  # (B, HW, C)
        x = nn.Dense(
            self.out_channels, kernel_init=torch_default_kernel_init,
            bias_init=torch_default_bias_init(channels), name="channel_proj",
        )(x)
        x = jnp.transpose(x, (0, 2, 1))  # (B, out_channels, HW)
        x = nn.Dense(
            self.out_rows, kernel_init=torch_default_kernel_init,
            bias_init=torch_default_bias_init(height * width), name="row_proj",
        )(x)  # (B, out_channels, out_rows)
        return l2_normalize(x.reshape(batch, -1), axis=-1)
