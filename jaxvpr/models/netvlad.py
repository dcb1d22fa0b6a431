"""NetVLAD aggregation (Arandjelovic et al., CVPR 2016), as the VG benchmark builds it.

For a local-feature map x (B, H, W, C), L2-normalised over channels at every
location, K clusters with centroids c_k (K, C) and a 1x1 conv W (no bias):

    a_k(i)   = softmax_k( W_k . x_i )                              (eq. 2, soft assignment)
    V[k, :]  = sum_i a_k(i) (x_i - c_k)                            (eq. 1)
    V[k, :] <- V[k, :] / ||V[k, :]||                               (intra-normalisation)
    v        = flatten(V) / ||flatten(V)||                         (K*C descriptor, k-major)

The VG benchmark (Berton et al., CVPR 2022) keeps the centroids and the conv
weight as separate parameters (``aggregation.centroids`` (K, C),
``aggregation.conv.weight`` (K, C, 1, 1)) and initialises them from k-means on
local features (:func:`init_from_features`). OpenIBL's ``NetVLAD`` + ``EmbedNet``
(SFRS, Ge et al., ECCV 2020) compute exactly the same descriptor.

``pca_dim > 0`` appends the PCA-whitening projection of the published 4096-d
NetVLAD descriptors ("NetVLAD + whitening"), as OpenIBL's ``EmbedNetPCA`` stores it: a 1x1 conv
``pca_layer`` (K*C -> pca_dim, with bias) whose weight is the whitened PCA basis
(U diag(lambda^-1/2))^T and whose bias is -(U diag(lambda^-1/2))^T mu, followed by L2:

    v_pca    = (W_pca v + b_pca) / ||W_pca v + b_pca||                 (pca_dim descriptor)
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvpr.models.layers import l2_normalize, torch_default_bias_init, torch_default_kernel_init


def _uniform01(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype)  # torch.rand, the benchmark's placeholder init


class NetVLAD(nn.Module):
    """NetVLAD head: (B, H, W, C) feature map -> (B, num_clusters * C) unit-norm descriptor,
    or (B, pca_dim) after the PCA-whitening projection when ``pca_dim > 0``."""

    num_clusters: int = 64
    pca_dim: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        batch, _, _, channels = x.shape
        centroids = self.param("centroids", _uniform01, (self.num_clusters, channels))
        x = l2_normalize(x, axis=-1)
        logits = nn.Conv(
            self.num_clusters, (1, 1), use_bias=False, kernel_init=torch_default_kernel_init, name="conv"
        )(x)
        assign = jax.nn.softmax(logits, axis=-1).reshape(batch, -1, self.num_clusters)  # (B, HW, K)
        local = x.reshape(batch, -1, channels)  # (B, HW, C)
        vlad = jnp.einsum("bnk,bnc->bkc", assign, local) - jnp.sum(assign, axis=1)[..., None] * centroids
        vlad = l2_normalize(vlad, axis=-1)  # intra-normalisation
        vlad = l2_normalize(vlad.reshape(batch, -1), axis=-1)
        if self.pca_dim <= 0:
            return vlad
        pca = nn.Conv(
            self.pca_dim, (1, 1), kernel_init=torch_default_kernel_init,
            bias_init=torch_default_bias_init(vlad.shape[-1]), name="pca_layer",
        )
        return l2_normalize(pca(vlad[:, None, None, :]).reshape(batch, -1), axis=-1)


def sample_local_descriptors(
    feature_maps: np.ndarray, per_image: int, rng: np.random.Generator
) -> np.ndarray:
    """L2-normalised local descriptors, ``per_image`` random locations of each map.

    ``feature_maps``: (B, H, W, C) backbone outputs. The VG benchmark draws 100
    locations from each of ceil(50000/100) = 500 random database images (AdAGeo:
    500 embeddings); concatenate the results of several batches.
    """
    maps = np.asarray(feature_maps, np.float32)
    batch, height, width, channels = maps.shape
    local = maps.reshape(batch, height * width, channels)
    local = local / np.maximum(np.linalg.norm(local, axis=-1, keepdims=True), 1e-12)
    picks = [local[b, rng.choice(height * width, per_image, replace=False)] for b in range(batch)]
    return np.concatenate(picks, axis=0)


def init_from_features(
    descriptors: np.ndarray, num_clusters: int, *, niter: int = 100, seed: int = 0
) -> dict:
    """NetVLAD params from local descriptors, the VG benchmark's rule.

    1. ``centroids`` = k-means (faiss, ``niter`` iterations) of ``descriptors`` (N, C).
    2. With unit-norm centroids u_k and, per descriptor, its two largest dots
       d1 >= d2 with the u_k:  alpha = -log(0.01) / mean(d1 - d2)
       (a descriptor is assigned 100x more to its nearest centroid than to the
       second, on average).
    3. conv weight W_k = alpha * u_k (no bias).

    Returns ``{'centroids': (K, C), 'conv': {'kernel': (1, 1, C, K)}}`` to put at
    ``params['head']`` of a NetVLAD model.
    """
    import faiss

    descriptors = np.ascontiguousarray(descriptors, dtype=np.float32)
    if descriptors.ndim != 2 or len(descriptors) < num_clusters:
        raise ValueError(
            f"need a (N, C) array with N >= num_clusters={num_clusters} descriptors, got shape {descriptors.shape}"
        )
    kmeans = faiss.Kmeans(descriptors.shape[1], num_clusters, niter=niter, verbose=False, seed=seed)
    kmeans.train(descriptors)
    centroids = np.asarray(kmeans.centroids, np.float32)
    # (an empty cluster can leave a zero centroid: it keeps a zero weight instead of NaNs)
    unit = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    dots = descriptors @ unit.T  # (N, K)
    top2 = -np.sort(-dots, axis=1)[:, :2]
    alpha = float(-math.log(0.01) / np.mean(top2[:, 0] - top2[:, 1]))
    kernel = (alpha * unit).T[None, None]  # (1, 1, C, K)
    return {"centroids": centroids, "conv": {"kernel": kernel.astype(np.float32)}}
