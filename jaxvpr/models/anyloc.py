"""AnyLoc-VLAD: hard-assignment VLAD over DINOv2 value facets with a fixed vocabulary.

Keetha et al., "AnyLoc: Towards Universal Visual Place Recognition" (RA-L 2023), as released
in ``AnyLoc/DINO`` (``dinov2_extractor.py``, ``utilities.py`` class ``VLAD``,
``model_wrapper.py``). The published AnyLoc-VLAD-DINOv2 is DINOv2 ViT-G/14 cut inside block
31 plus this head with 32 centres, a 32 x 1536 = 49,152-d descriptor:

1. local descriptors ``x_i``: the ``value`` third of block 31's ``attn.qkv`` output for every
   patch token (the class token and any registers dropped), L2-normalised -- the backbone
   part, :class:`jaxvpr.models.dinov2.DinoV2` with ``facet='value', facet_layer=31``;
2. hard assignment ``a(i) = argmax_k <x_i, c_k / ||c_k||>`` (cosine similarity to the
   normalised centres; ties go to the lowest index, as ``torch.argmax``);
3. ``V_k = sum_{i: a(i)=k} (x_i - c_k)`` with the centre *as stored* (AnyLoc's centres are
   k-means means of unit vectors, so ``||c_k|| < 1``; they are not renormalised here);
4. intra-normalisation ``V_k / ||V_k||`` (an empty cluster stays zero), flatten
   cluster-major (index ``k * C + c``), global L2 normalisation.

The centres ``c`` (K, C) are the vocabulary of a domain (AnyLoc publishes ``indoor``, ``urban``,
``aerial``, ``structured``, ``unstructured`` and ``global`` ones). They live in the variable
collection ``'vocabulary'`` (``{'vocabulary': {'head': {'centers': ...}}}`` inside a
:class:`~jaxvpr.models.VPRModel`), not in ``'params'``: they are fitted by k-means
(:mod:`jaxvpr.anyloc`), never by gradient descent. The head has no parameters.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvpr.models.layers import l2_normalize

VOCABULARY = "vocabulary"
"""Name of the variable collection holding the centres."""


def _random_unit_centres(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
    return l2_normalize(jax.random.normal(key, shape, jnp.float32), axis=-1)


def hard_vlad(descriptors: jax.Array, centres: jax.Array) -> jax.Array:
    """AnyLoc's VLAD (steps 2-4 of the module docstring) of (B, N, C) unit descriptors -> (B, K*C).

    ``descriptors`` are expected L2-normalised (the residuals use them as given); ``centres``
    (K, C) are used as stored for the residuals and normalised only for the assignment.
    """
    num_clusters = centres.shape[0]
    hi = jax.lax.Precision.HIGHEST  # full float32 on GPUs too: near-ties must resolve as in PyTorch
    similarity = jnp.einsum("bnc,kc->bnk", descriptors, l2_normalize(centres, axis=-1), precision=hi)
    assignment = jax.nn.one_hot(jnp.argmax(similarity, axis=-1), num_clusters, dtype=descriptors.dtype)
    sums = jnp.einsum("bnk,bnc->bkc", assignment, descriptors, precision=hi)
    counts = jnp.sum(assignment, axis=1)  # (B, K)
    residuals = sums - counts[..., None] * centres[None]  # sum_i (x_i - c_k) over the members of k
    vlad = l2_normalize(residuals, axis=-1).reshape(descriptors.shape[0], -1)
    return l2_normalize(vlad, axis=-1)


class AnyLocVLAD(nn.Module):
    """``__call__((facet_map (B, h, w, C), cls (B, C)), train=False)`` -> (B, K*C), unit norm.

    ``facet_map`` is the backbone's raw facet (e.g. value) map; it is L2-normalised per patch
    here (AnyLoc's ``norm_descs=True``), the class-token entry is ignored. Freshly initialised
    centres are random unit vectors (a placeholder until a vocabulary is loaded).
    """

    num_clusters: int = 32
    num_channels: int = 1536

    @nn.compact
    def __call__(self, features: tuple[jax.Array, jax.Array], train: bool = False) -> jax.Array:
        del train
        facet_map, _ = features
        batch, height, width, channels = facet_map.shape
        if channels != self.num_channels:
            raise ValueError(
                f"AnyLocVLAD(num_channels={self.num_channels}) got a facet map with {channels} channels "
                f"{tuple(facet_map.shape)}; the vocabulary must match the backbone's width."
            )
        centres = self.variable(
            VOCABULARY, "centers",
            lambda: _random_unit_centres(self.make_rng("params"), (self.num_clusters, self.num_channels)),
        ).value
        descriptors = l2_normalize(facet_map.reshape(batch, height * width, channels).astype(jnp.float32))
        return hard_vlad(descriptors, centres.astype(jnp.float32))


def local_descriptors(model: nn.Module, images: jax.Array) -> jax.Array:
    """The L2-normalised patch descriptors (B, h*w, C) an AnyLoc :class:`~jaxvpr.models.VPRModel`
    aggregates (step 1), for building a vocabulary::

        model.apply(variables, images, method=local_descriptors)

    ``images`` are ImageNet-normalised like the model's own input.
    """
    from jaxvpr.models.registry import renormalize_input

    facet_map, _ = model.backbone(renormalize_input(images, model.input_norm))
    batch, height, width, channels = facet_map.shape
    return l2_normalize(facet_map.reshape(batch, height * width, channels).astype(jnp.float32))
