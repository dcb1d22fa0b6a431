"""AdAGeo's retrieval head: CAM attention (eq. 5-6) in front of NetVLAD (Berton et al., WACV 2021, §4.2).

The backbone is a ResNet-18 whose last block also returns its pre-BatchNorm map
(:class:`jaxvpr.models.resnet.ResNet` with ``pre_bn_output``; AdAGeo's ``noBN`` ResNet), so the head
receives ``(feat_bn, feat_nbn)``, both (B, h, w, 512):

* ``feat_bn`` = ReLU(bn2(conv2(h)) + shortcut), the ordinary block output;
* ``feat_nbn`` = conv2(h) + shortcut, before the last BatchNorm and ReLU.

The head, as AdAGeo's code (``src/network.py``, recipes_facts §A.2.2)::

    logits = fc(avgpool(feat_bn))                    the scene classifier (Places365: 512 -> 365)
    c      = argmax(logits)                          top-1 class (index only, no gradient)
    cam_i  = fc.kernel[:, c] . feat_bn_i             class activation at each of the h*w positions
    a      = softmax_i(cam)                          over the positions of the image (sums to 1)
    f_i    = a_i * feat_nbn_i                        attended features (eq. 6)
    desc   = NetVLAD(f)                              64 clusters: 32768-d

AdAGeo's AlexNet variant (paper Table 2; the authors' ``src/alexnet.py``, recipes_facts §A.2.1) has
no BatchNorm: its conv5 map *before* the ReLU is both ``feat_bn`` and ``feat_nbn``
(``shared_map=True``: the head takes that one map), and its classifier is GAP + Linear(256, 365).

The CAM is not upsampled (the paper's upsampling is for its figures). Without ``attention`` the head
is NetVLAD on ``feat_bn``. **NetVLAD cancels the attention** (§A.2.2): it L2-normalises each local
feature first, and ``a_i > 0`` is one scalar per position, so ``normalize(a_i f_i) = normalize(f_i)``
except where ``a_i ||f_i|| < 1e-12`` (there the feature becomes ~0). What attention changes in
practice is the features NetVLAD reads: ``feat_nbn`` instead of ``feat_bn``. jaxvpr keeps the
``max(||x||, 1e-12)`` of PyTorch's ``F.normalize`` (:func:`jaxvpr.models.layers.l2_normalize`),
so the cancellation is exactly the code's; ``tests/test_adageo.py`` measures it.

The attended local features are sown as ``intermediates/local_features`` (NetVLAD's k-means
initialisation reads them, as the code's ``mode="feat"``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvpr.models.layers import torch_default_bias_init, torch_default_kernel_init
from jaxvpr.models.netvlad import NetVLAD


def cam_attention(feat_bn: jax.Array, kernel: jax.Array, logits: jax.Array) -> jax.Array:
    """Eq. 5-6 weights: softmax over the h*w positions of ``w_c . feat_bn`` with c the top class.

    ``feat_bn`` (B, h, w, C), ``kernel`` (C, classes) (the fc's, Flax layout), ``logits`` (B, classes).
    Returns (B, h, w), each image's map summing to 1.
    """
    top = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)  # index only, as torch.sort(...)[1][:, 0]
    w = jnp.take(kernel, top, axis=1).T                        # (B, C)
    cam = jnp.einsum("bhwc,bc->bhw", feat_bn, w)
    b, h, wd = cam.shape
    return jax.nn.softmax(cam.reshape(b, h * wd), axis=-1).reshape(b, h, wd)


class CamNetVLAD(nn.Module):
    """``(feat_bn, feat_nbn)`` -> NetVLAD descriptor, with the CAM attention of AdAGeo (module doc);
    with ``shared_map`` one map that is both (AdAGeo's AlexNet: conv5 before its ReLU)."""

    num_clusters: int = 64
    num_classes: int = 365
    attention: bool = True
    shared_map: bool = False

    @nn.compact
    def __call__(self, maps, train: bool = False) -> jax.Array:
        if self.shared_map:
            maps = (maps, maps)
        if not isinstance(maps, tuple):
            raise ValueError("CamNetVLAD takes (feat_bn, feat_nbn): build the ResNet with pre_bn_output=True")
        feat_bn, feat_nbn = maps
        channels = feat_bn.shape[-1]
        fc = nn.Dense(self.num_classes, kernel_init=torch_default_kernel_init,
                      bias_init=torch_default_bias_init(channels), name="fc")
        logits = fc(jnp.mean(feat_bn, axis=(1, 2)))
        if self.attention:
            a = cam_attention(feat_bn, fc.variables["params"]["kernel"], logits)
            local = feat_nbn * a[..., None]
        else:
            local = feat_bn
        self.sow("intermediates", "local_features", local)
        self.sow("intermediates", "scene_logits", logits)
        return NetVLAD(num_clusters=self.num_clusters, name="netvlad")(local, train=train)


def fit_scene_classifier(features: np.ndarray, labels: np.ndarray, num_classes: int, *, steps: int = 300,
                         lr: float = 0.05, seed: int = 0, label_smoothing: float = 0.1) -> dict:
    """A linear softmax classifier ``features (N, C) -> labels`` (full-batch Adam on the cross-entropy).

    The synthetic city has no Places365: jaxvpr trains its own scene classifier on pooled layer4
    features of the training database and uses it as the CAM's fc (the AdAGeo recipe's
    ``adageo.scene_classes``). Label smoothing keeps its logits moderate, as a classifier trained on
    1.8M images is: separable classes would otherwise grow the weights, and with them the CAM's
    values, until the softmax over positions zeroes most local features.
    Returns ``{"kernel": (C, num_classes), "bias": (num_classes,)}``.
    """
    import optax

    x = jnp.asarray(features, jnp.float32)
    mean, scale = x.mean(0), x.std(0).mean() + 1e-6  # fit on standardised features, fold back at the end
    xs = (x - mean) / scale
    y = jnp.asarray(labels, jnp.int32)
    key = jax.random.key(seed)
    params = {"kernel": 0.01 * jax.random.normal(key, (x.shape[1], num_classes)), "bias": jnp.zeros(num_classes)}
    tx = optax.adam(lr)

    targets = optax.smooth_labels(jax.nn.one_hot(y, num_classes), label_smoothing)

    def loss(p):
        return optax.softmax_cross_entropy(xs @ p["kernel"] + p["bias"], targets).mean()

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    kernel = params["kernel"] / scale  # logits = x @ (k / s) + (b - mean @ k / s)
    bias = params["bias"] - mean @ kernel
    return {"kernel": np.asarray(kernel, np.float32), "bias": np.asarray(bias, np.float32)}


__all__ = ["CamNetVLAD", "cam_attention", "fit_scene_classifier"]
