"""VGG16 conv trunk, torchvision's ``vgg16().features[:-2]`` (NHWC).

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition" (ICLR 2015), configuration D. CosPlace and the VG benchmark keep
``features[:-2]``: 13 3x3 convs (padding 1) with ReLU and four 2x2 max-pools,
dropping the final ReLU and max-pool -- the output is conv5_3 *before* its ReLU,
(B, H/16, W/16, 512).

Flax names mirror the torch indices: ``features_{i}`` for ``features[i]``. The
freezing stages are the 13 convs; ``trainable_stages=3`` (CosPlace: "all but the
last 5 layers of features[:-2]" frozen) trains conv5_1..conv5_3 (indices 24, 26, 28).
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax

from jaxvpr.models.layers import conv_kaiming_fan_out, max_pool, torch_conv

# features[:-2] as (kind, torch index, out channels): 'C' conv3x3+ReLU, 'M' max-pool.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def _layout(cfg):
    """[(torch_index, 'conv'|'relu'|'pool', channels)] of ``features`` for a VGG cfg."""
    layers, index = [], 0
    for item in cfg:
        if item == "M":
            layers.append((index, "pool", None))
            index += 1
        else:
            layers.append((index, "conv", item))
            layers.append((index + 1, "relu", None))
            index += 2
    return layers


VGG16_LAYERS = tuple(_layout(_VGG16_CFG)[:-1])  # features[:-2]: drop the last ReLU (the pool is not in _VGG16_CFG)
VGG16_CONV_INDICES = tuple(i for i, kind, _ in VGG16_LAYERS if kind == "conv")


class VGG16(nn.Module):
    """``vgg16().features[:-2]``; ``trainable_stages``: last convs that train (None = all)."""

    trainable_stages: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no BatchNorm/dropout in the trunk
        num_convs = len(VGG16_CONV_INDICES)
        trainable = num_convs if self.trainable_stages is None else min(max(self.trainable_stages, 0), num_convs)
        frozen_convs = num_convs - trainable
        convs_seen = 0
        for index, kind, channels in VGG16_LAYERS:
            if kind == "conv":
                if convs_seen == frozen_convs and frozen_convs > 0:
                    x = jax.lax.stop_gradient(x)  # output of the last frozen stage
                x = torch_conv(channels, 3, 1, 1, kernel_init=conv_kaiming_fan_out, name=f"features_{index}")(x)
                convs_seen += 1
            elif kind == "relu":
                x = nn.relu(x)
            else:
                x = max_pool(x, 2, 2)
        if frozen_convs == num_convs:
            x = jax.lax.stop_gradient(x)
        return x


def sequential_frozen_mask(params: Mapping, trainable_stages: int | None) -> dict:
    """Bool pytree over VGG/AlexNet params (``features_{i}``): the convs before the last ``trainable_stages`` are frozen."""
    order = sorted(params, key=lambda name: int(name.split("_")[1]))
    trainable = len(order) if trainable_stages is None else min(max(trainable_stages, 0), len(order))
    frozen = set(order[: len(order) - trainable])
    return {name: jax.tree_util.tree_map(lambda _, f=name in frozen: f, sub) for name, sub in params.items()}
