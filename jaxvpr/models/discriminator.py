"""Domain discriminator for adversarial adaptation (AdAGeo, Berton et al. WACV 2021, §3.3).

avg-pool (if given a feature map) -> Linear(d, 50) -> ReLU -> Linear(50, 20) ->
ReLU -> Linear(20, n_domains) logits. Put :func:`jaxvpr.models.grl.grad_reverse`
in front of it, so the backbone learns domain-invariant features. It attaches
before aggregation (pooled backbone map, thesis §4.3; AdAGeo uses 3 domains:
source, pseudo-target, target) or after it (on the descriptors (B, D)).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvpr.models.grl import grad_reverse
from jaxvpr.models.layers import torch_default_bias_init, torch_default_kernel_init


class DomainDiscriminator(nn.Module):
    """Logits (B, n_domains) from features (B, D) or an NHWC map (B, H, W, C).

    ``__call__(x, grl_coeff=None, return_hidden=False)``: if ``grl_coeff`` is given, the input
    first goes through ``grad_reverse(x, grl_coeff)``; with ``return_hidden`` the post-ReLU
    activations of the hidden layers come back too (``(logits, [h1, h2])``), for diagnostics such
    as the share of active units.
    """

    n_domains: int = 2
    hidden: tuple[int, ...] = (50, 20)

    @nn.compact
    def __call__(self, x: jax.Array, grl_coeff: jax.Array | float | None = None, return_hidden: bool = False):
        if grl_coeff is not None:
            x = grad_reverse(x, grl_coeff)
        if x.ndim == 4:
            x = jnp.mean(x, axis=(1, 2))  # global average pool
        elif x.ndim != 2:
            raise ValueError(f"DomainDiscriminator takes (B, D) features or (B, H, W, C) maps, got shape {x.shape}")
        hidden = []
        for i, width in enumerate(self.hidden):
            x = nn.Dense(
                width, kernel_init=torch_default_kernel_init,
                bias_init=torch_default_bias_init(x.shape[-1]), name=f"fc{i + 1}",
            )(x)
            x = nn.relu(x)
            hidden.append(x)
        logits = nn.Dense(
            self.n_domains, kernel_init=torch_default_kernel_init,
            bias_init=torch_default_bias_init(x.shape[-1]), name=f"fc{len(self.hidden) + 1}",
        )(x)
        return (logits, hidden) if return_hidden else logits
