"""SALAD aggregation head: Sinkhorn Algorithm for Locally Aggregated Descriptors.

Izquierdo & Civera, "Optimal Transport Aggregation for Visual Place Recognition"
(CVPR 2024), as released in ``serizba/salad`` (``models/aggregators/salad.py``). Input:
the DINOv2 patch tokens ``t_i`` (an h x w map of C channels, n = h*w) and the class
token ``t_{n+1}``; output a global descriptor of ``m * l + g`` dimensions (64*128 + 256 =
8448 for the published ViT-B model).

1. Global scene token: ``g = W2 relu(W1 t_{n+1})`` (Linear C->512, ReLU,
   Linear 512->g; ``token_features.0/.2``).
2. Local features: ``f_i`` = 1x1 conv C->512, dropout, ReLU, 1x1 conv 512->l
   (``cluster_features.0/.3``).
3. Score matrix: ``S_ij`` = 1x1 conv C->512, dropout, ReLU, 1x1 conv 512->m
   (``score.0/.3``), m clusters x n features.
4. Optimal transport with a dustbin: append a row of the learnable scalar
   ``z`` (``dust_bin``) to S; marginals ``mu = [1]*m + [n - m]`` over the m + 1 rows
   and ``nu = [1]*n`` over the columns, both divided by ``m + n``; 3 log-domain
   Sinkhorn iterations with regularisation 1 (:func:`log_optimal_transport`); the
   assignment ``P = exp(log P) * (m + n)`` with the dustbin row dropped.
5. Aggregation: ``V_jk = sum_i P_ji f_ik`` (m x l), L2-normalised per cluster
   over its l entries, flattened l-major like PyTorch's ``(B, l, m).flatten(1)``
   (index ``k * m + j``), concatenated after the L2-normalised ``g``, and the whole
   vector L2-normalised.

Note on ``dust_bin``: it scores every (dustbin, feature) pair with the same value, and
Sinkhorn starts with a row update, which divides that row by its sum -- so ``z`` cancels
exactly and neither the descriptor nor any gradient depends on it (in the reference code
as here). It is kept as a parameter so checkpoints round-trip.

Flax names mirror the PyTorch ones (``token_features_0`` is ``token_features.0``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvpr.models.layers import l2_normalize, torch_default_bias_init, torch_default_kernel_init

HIDDEN_DIM = 512
"""Width of the hidden layer of SALAD's three small MLPs (fixed in the paper and the code)."""


def log_sinkhorn_iterations(
    log_kernel: jax.Array, log_mu: jax.Array, log_nu: jax.Array, iters: int
) -> jax.Array:
    """Log-domain Sinkhorn-Knopp with entropic regularisation 1 (Cuturi 2013).

    Alternately rescales rows and columns of ``K = exp(log_kernel)`` (B, R, N) towards
    the row marginals ``exp(log_mu)`` (B, R) and column marginals ``exp(log_nu)`` (B, N),
    starting from zero potentials and updating the row potential first:
    ``u = log_mu - logsumexp_j(K_ij + v_j)``, ``v = log_nu - logsumexp_i(K_ij + u_i)``.
    Returns the log transport plan ``K_ij + u_i + v_j``.
    """

    def iteration(_, potentials):
        _, v = potentials
        u = log_mu - jax.nn.logsumexp(log_kernel + v[:, None, :], axis=2)
        v = log_nu - jax.nn.logsumexp(log_kernel + u[:, :, None], axis=1)
        return u, v

    u, v = jax.lax.fori_loop(0, iters, iteration, (jnp.zeros_like(log_mu), jnp.zeros_like(log_nu)))
    return log_kernel + u[:, :, None] + v[:, None, :]


def log_optimal_transport(scores: jax.Array, dust_bin: jax.Array, iters: int) -> jax.Array:
    """Log assignment (B, m + 1, n) of n features to m clusters plus a dustbin (SALAD step 4).

    ``scores`` (B, m, n); ``dust_bin`` a scalar score for every (dustbin, feature) pair.
    Marginals: every cluster row receives mass ``1 / (m + n)``, the dustbin
    ``(n - m) / (m + n)``, every feature column gives ``1 / (m + n)``. The returned plan
    is scaled by ``m + n`` so that each feature's column sums to one. Needs ``n >= m``
    (the dustbin's mass ``n - m`` cannot be negative).
    """
    batch, m, n = scores.shape
    if n < m:
        raise ValueError(
            f"SALAD needs at least as many local features as clusters: got n={n} patch tokens "
            f"for m={m} clusters. Use larger images (e.g. 224x224 gives 16x16=256 tokens) or fewer clusters."
        )
    dtype = scores.dtype
    bins = jnp.broadcast_to(dust_bin.astype(dtype), (batch, 1, n))
    couplings = jnp.concatenate([scores, bins], axis=1)
    log_norm = -jnp.log(jnp.asarray(m + n, dtype))
    log_mu = jnp.concatenate(
        [jnp.full((m,), log_norm, dtype), (jnp.log(jnp.asarray(n - m, dtype)) + log_norm)[None]]
    )
    log_nu = jnp.full((n,), log_norm, dtype)
    log_mu = jnp.broadcast_to(log_mu, (batch, m + 1))
    log_nu = jnp.broadcast_to(log_nu, (batch, n))
    plan = log_sinkhorn_iterations(couplings, log_mu, log_nu, iters)
    return plan - log_norm


class Salad(nn.Module):
    """SALAD head. ``__call__((patch_map (B, h, w, C), cls_token (B, C)), train=False)``
    -> (B, num_clusters * cluster_dim + token_dim), L2-normalised.

    ``dropout`` applies after the first 1x1 conv of both local MLPs in training (the
    SALAD class default is 0.3, which its training script leaves in place); it needs a
    ``'dropout'`` PRNG stream when ``train=True`` and ``dropout > 0``.
    """

    num_channels: int = 768
    num_clusters: int = 64
    cluster_dim: int = 128
    token_dim: int = 256
    dropout: float = 0.0
    sinkhorn_iters: int = 3

    @nn.compact
    def __call__(self, features: tuple[jax.Array, jax.Array], train: bool = False) -> jax.Array:
        patch_map, cls_token = features
        batch, height, width, channels = patch_map.shape
        if channels != self.num_channels or cls_token.shape != (batch, channels):
            raise ValueError(
                f"Salad(num_channels={self.num_channels}) got a patch map {patch_map.shape} and a "
                f"class token {cls_token.shape}; expected (B, h, w, {self.num_channels}) and "
                f"(B, {self.num_channels})."
            )

        def linear(features: int, fan_in: int, name: str) -> nn.Dense:
            return nn.Dense(
                features,
                kernel_init=torch_default_kernel_init,
                bias_init=torch_default_bias_init(fan_in),
                name=name,
            )

        def conv1x1(features: int, fan_in: int, name: str) -> nn.Conv:
            return nn.Conv(
                features,
                (1, 1),
                kernel_init=torch_default_kernel_init,
                bias_init=torch_default_bias_init(fan_in),
                name=name,
            )

        def local_mlp(x: jax.Array, out: int, prefix: str, last: int) -> jax.Array:
            h = conv1x1(HIDDEN_DIM, self.num_channels, f"{prefix}_0")(x)
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
            return conv1x1(out, HIDDEN_DIM, f"{prefix}_{last}")(nn.relu(h))

        token = linear(HIDDEN_DIM, self.num_channels, "token_features_0")(cls_token)
        token = linear(self.token_dim, HIDDEN_DIM, "token_features_2")(nn.relu(token))

        n = height * width
        local = local_mlp(patch_map, self.cluster_dim, "cluster_features", 3).reshape(batch, n, -1)
        scores = local_mlp(patch_map, self.num_clusters, "score", 3).reshape(batch, n, -1)
        dust_bin = self.param("dust_bin", nn.initializers.constant(1.0), ())

        log_plan = log_optimal_transport(jnp.swapaxes(scores, 1, 2), dust_bin, self.sinkhorn_iters)
        assignment = jnp.exp(log_plan)[:, :-1, :]  # (B, m, n), dustbin dropped

        clusters = jnp.einsum("bnl,bmn->blm", local, assignment)  # (B, l, m)
        clusters = l2_normalize(clusters, axis=1).reshape(batch, -1)  # l-major flatten
        descriptor = jnp.concatenate([l2_normalize(token, axis=-1), clusters], axis=-1)
        return l2_normalize(descriptor, axis=-1)
