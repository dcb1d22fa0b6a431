"""Generalized-mean (GeM) pooling and the GeM aggregation heads of CosPlace and AP-GeM.

GeM: Radenovic et al., "Fine-tuning CNN Image Retrieval with No Human
Annotation" (TPAMI 2018), eq. 3:  f_c = ( mean_{h,w} max(x_{hwc}, eps)^p )^(1/p),
with a single learnable ``p`` (initialised to 3) shared by all channels.

The default head is CosPlace's ``aggregation`` (Berton et al., CVPR 2022):
``Sequential(L2Norm(dim=1), GeM(p=3, eps=1e-6), Flatten(), Linear(C, D), L2Norm())``
-- L2 over channels at every location, GeM, a fully connected layer to the
descriptor size ``D`` (``fc_output_dim``), and a final L2 normalisation.
EigenPlaces uses the same head. Flax names: ``p`` (torch ``aggregation.1.p``)
and ``fc`` (torch ``aggregation.3``).

AP-GeM (Revaud et al., "Learning with Average Precision", ICCV 2019; dirtorch's
``resnet101_rmac`` with ``pooling='gem'``) differs in two places: no L2 over
channels before pooling (``l2_before_pool=False``), and a PCA whitening learned
on landmark descriptors after the final L2 (``whiten=True``, :class:`PCAWhitening`),
followed by another L2.
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


def _identity(key, shape, dtype=jnp.float32):
    del key
    return jnp.eye(shape[0], shape[1], dtype=dtype)


class PCAWhitening(nn.Module):
    """PCA whitening of descriptors, then L2: ``y = (x - mean) components^T / explained_variance^power``.

    This is scikit-learn's ``PCA(whiten=True).transform`` with dirtorch's exponent
    (``dirtorch.utils.common.whiten_features``: ``whitenp = power``, ``whitenm = 1``; sklearn
    itself uses ``power = 0.5``). AP-GeM evaluations (VPR-methods-evaluation, hloc) use the
    ``Landmarks_clean`` PCA with ``power = 0.25``.

    Variables (``params``, but frozen: :func:`jaxvpr.models.frozen_mask` marks them, so training
    never changes them): ``mean`` (D,), ``components`` (D, D) -- one principal axis per row, as
    sklearn's ``components_`` --, ``explained_variance`` (D,). The initial values (0, identity, 1)
    make the layer an L2 normalisation.
    """

    power: float = 0.25

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        mean = self.param("mean", nn.initializers.zeros, (dim,))
        components = self.param("components", _identity, (dim, dim))
        variance = self.param("explained_variance", nn.initializers.ones, (dim,))
        projected = jnp.dot(x - mean, components.T, precision=jax.lax.Precision.HIGHEST)
        return l2_normalize(projected / jnp.power(variance, self.power), axis=-1)


class GeMHead(nn.Module):
    """(L2 over channels) -> GeM -> Linear(C, fc_output_dim) -> L2 (-> PCA whitening -> L2).

    Input (B, H, W, C) feature map; output (B, fc_output_dim) unit-norm descriptors.
    CosPlace/EigenPlaces: the defaults. AP-GeM: ``l2_before_pool=False, whiten=True``.
    """

    fc_output_dim: int = 512
    l2_before_pool: bool = True
    whiten: bool = False
    whiten_power: float = 0.25
    p_init: float = 3.0
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        if self.l2_before_pool:
            x = l2_normalize(x, axis=-1)
        p = self.param("p", lambda key, shape: jnp.full(shape, self.p_init, jnp.float32), (1,))
        x = gem(x, p, self.eps)
        x = nn.Dense(
            self.fc_output_dim,
            kernel_init=torch_default_kernel_init,
            bias_init=torch_default_bias_init(channels),
            name="fc",
        )(x)
        x = l2_normalize(x, axis=-1)
        if self.whiten:
            x = PCAWhitening(power=self.whiten_power, name="whitening")(x)
        return x
