"""Generalized-mean (GeM) pooling and the CosPlace/EigenPlaces aggregation head.

GeM: Radenovic et al., "Fine-tuning CNN Image Retrieval with No Human
Annotation" (TPAMI 2018), eq. 3:  f_c = ( mean_{h,w} max(x_{hwc}, eps)^p )^(1/p),
with a single learnable ``p`` (initialised to 3) shared by all channels.

The head is CosPlace's ``aggregation`` (Berton et al., CVPR 2022):
``Sequential(L2Norm(dim=1), GeM(p=3, eps=1e-6), Flatten(), Linear(C, D), L2Norm())``
-- L2 over channels at every location, GeM, a fully connected layer to the
descriptor size ``D`` (``fc_output_dim``), and a final L2 normalisation.
EigenPlaces uses the same head. Flax names: ``p`` (torch ``aggregation.1.p``)
and ``fc`` (torch ``aggregation.3``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvpr.models.layers import l2_normalize, torch_default_bias_init, torch_default_kernel_init


def gem(x: jax.Array, p: jax.Array, eps: float = 1e-6) -> jax.Array:
    """GeM pooling of an NHWC map to (B, C): ``mean_{h,w}(clamp(x, eps)^p)^(1/p)``."""
    pooled = jnp.mean(jnp.power(jnp.maximum(x, eps), p), axis=(1, 2))
    return jnp.power(pooled, 1.0 / p)


class GeMHead(nn.Module):
    """CosPlace head: L2 over channels -> GeM -> Linear(C, fc_output_dim) -> L2.

    Input (B, H, W, C) feature map; output (B, fc_output_dim) unit-norm descriptors.
    """

    fc_output_dim: int = 512
    p_init: float = 3.0
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        x = l2_normalize(x, axis=-1)
        p = self.param("p", lambda key, shape: jnp.full(shape, self.p_init, jnp.float32), (1,))
        x = gem(x, p, self.eps)
        x = nn.Dense(
            self.fc_output_dim,
            kernel_init=torch_default_kernel_init,
            bias_init=torch_default_bias_init(channels),
            name="fc",
        )(x)
        return l2_normalize(x, axis=-1)
