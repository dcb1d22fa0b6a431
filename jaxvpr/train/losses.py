"""Losses shared by the recipes. Pure functions of arrays.

- CosFace (Wang et al., CVPR 2018) as CosPlace uses it: logits = s * (cos(theta) - m * onehot).
- Domain cross-entropy for the GRL discriminator (thesis §4.4, AdAGeo eq. 7).
- Triplet margin loss on L2 distances (VG benchmark) or squared distances (AdAGeo eq. 8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def init_cosface_weight(rng: np.random.Generator, num_classes: int, dim: int) -> np.ndarray:
    """A CosFace classifier (num_classes, dim), Xavier-uniform as torch's ``xavier_uniform_``.

    Host-side numpy: classifiers of the groups not being trained stay in host memory.
    """
    bound = float(np.sqrt(6.0 / (num_classes + dim)))
    return rng.uniform(-bound, bound, size=(num_classes, dim)).astype(np.float32)


def _l2n(x, axis=-1, eps=1e-12):
    # torch.nn.functional.normalize: x / max(||x||, eps)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def cosface_logits(descriptors: jax.Array, weight: jax.Array, labels: jax.Array, s: float = 30.0,
                   m: float = 0.4) -> jax.Array:
    """s * (cos(theta_j) - m [j == label]), cos between the descriptor and each class weight."""
    cosine = _l2n(descriptors) @ _l2n(weight).T
    one_hot = jax.nn.one_hot(labels, weight.shape[0], dtype=cosine.dtype)
    return s * (cosine - m * one_hot)


def cosface_loss(descriptors, weight, labels, s: float = 30.0, m: float = 0.4, num_classes=None) -> jax.Array:
    """Mean cross-entropy of the CosFace logits (CosPlace's criterion).

    ``num_classes`` (a traced scalar allowed): only the first ``num_classes`` rows of ``weight`` are
    classes, the rest padding (CosPlace pads every group's classifier to one shape): their logits are
    -inf, so they take no probability and get no gradient.
    """
    logits = cosface_logits(descriptors, weight, labels, s, m)
    if num_classes is not None:
        logits = jnp.where(jnp.arange(weight.shape[0]) < num_classes, logits, -jnp.inf)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def domain_loss_and_accuracy(logits: jax.Array, domains: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy over domains and the discriminator's accuracy (in [0, 1])."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, domains).mean()
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == domains)
    return loss, accuracy


def triplet_loss(anchor, positive, negatives, margin: float = 0.1, squared: bool = False,
                 reduction: str = "sum") -> jax.Array:
    """max(0, d(a, p) - d(a, n) + margin) over every (anchor, negative) pair.

    ``anchor``/``positive`` (B, D), ``negatives`` (B, K, D). ``squared=False`` is PyTorch's
    ``TripletMarginLoss(p=2)`` (its distance adds eps=1e-6 to the difference, as here);
    ``squared=True`` is AdAGeo eq. 8. ``reduction`` "sum" (VG benchmark sums over a query's triplets)
    or "mean", "none" the (B, K) hinges.
    """
    def dist(a, b):
        diff = a - b + 1e-6
        d2 = jnp.sum(diff * diff, axis=-1)
        return d2 if squared else jnp.sqrt(d2)

    d_pos = dist(anchor, positive)[:, None]
    d_neg = dist(anchor[:, None, :], negatives)
    losses = jnp.maximum(d_pos - d_neg + margin, 0.0)
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()
