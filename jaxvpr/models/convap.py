"""Conv-AP aggregation (Ali-bey et al., "GSV-Cities", Neurocomputing 2022).

A 1x1 conv reduces the channels to ``out_channels``, an adaptive average pool
(PyTorch bin rule) shrinks the map to ``s1 x s2``, the result is flattened in
PyTorch's channel-major (C, s1, s2) order and L2-normalised:
descriptor size ``out_channels * s1 * s2`` (defaults 512 x 2 x 2 = 2048, as in
the MixVPR/GSV-Cities code). PyTorch names: ``aggregator.channel_pool``.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxvpr.models.layers import (
    adaptive_avg_pool,
    l2_normalize,
    nhwc_to_torch_flat,
    torch_default_bias_init,
    torch_default_kernel_init,
)


class ConvAP(nn.Module):
    """(B, H, W, C) -> (B, out_channels * s1 * s2) unit-norm descriptor."""

    out_channels: int = 512
    s1: int = 2
    s2: int = 2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Conv(
            self.out_channels, (1, 1), kernel_init=torch_default_kernel_init,
            bias_init=torch_default_bias_init(x.shape[-1]), name="channel_pool",
        )(x)
        x = adaptive_avg_pool(x, (self.s1, self.s2))
        return l2_normalize(nhwc_to_torch_flat(x), axis=-1)
