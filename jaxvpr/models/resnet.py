"""ResNet-18/34/50/101/152 trunks exactly as torchvision builds them (NHWC).

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), in
torchvision's "v1.5" form: the stride of a bottleneck block sits on its 3x3
conv; BatchNorm eps 1e-5, momentum 0.1 (:class:`~jaxvpr.models.layers.BatchNorm`).

The trunk is torchvision's ``children()[:-2]`` -- conv1, bn1, relu, maxpool,
layer1..layer4 -- as CosPlace/EigenPlaces use it; ``num_layers=3`` drops layer4
(the VG benchmark's ``resnet18conv4``/``resnet50conv4`` and MixVPR's
ResNet-50 cropped after layer3). Output: the last feature map, (B, H/16 or H/32,
W/16 or W/32, C).

Stages for freezing are ``[stem (conv1+bn1), layer1, ..., layerN]``; with
``trainable_stages = k`` only the last ``k`` stages receive gradients: a
``stop_gradient`` is applied to the output of the last frozen stage, so no
backward pass runs through the frozen part. Frozen BatchNorms still normalise
with batch statistics and update their running statistics in training mode, as
in PyTorch ``model.train()`` with ``requires_grad=False``.

Flax names mirror torchvision: ``conv1``, ``bn1``, ``layer{i}_{j}`` blocks with
``conv1/bn1/conv2/bn2[/conv3/bn3]`` and ``downsample_conv``/``downsample_bn``.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxvpr.models.layers import BatchNorm, max_pool, torch_conv

# depth -> (block type, blocks per layer)
RESNET_SPECS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STAGE_WIDTHS = (64, 128, 256, 512)


def resnet_out_channels(depth: int, num_layers: int = 4) -> int:
    """Channels of the trunk's output map (e.g. 512 for ResNet-18, 1024 for ResNet-50 up to layer3)."""
    block, _ = RESNET_SPECS[depth]
    return STAGE_WIDTHS[num_layers - 1] * (4 if block == "bottleneck" else 1)


def resnet_num_stages(num_layers: int = 4) -> int:
    """Number of freezable stages: the stem plus ``num_layers`` residual layers."""
    return 1 + num_layers


def resnet_stage_of(param_name: str) -> int:
    """Stage index of a top-level ResNet submodule name (``conv1``/``bn1`` -> 0, ``layer3_1`` -> 3)."""
    if param_name in ("conv1", "bn1"):
        return 0
    if param_name.startswith("layer"):
        return int(param_name[len("layer"):].split("_")[0])
    raise ValueError(f"not a ResNet submodule name: {param_name!r}")


class BasicBlock(nn.Module):
    """Two 3x3 convs with identity/projection shortcut (ResNet-18/34)."""

    width: int
    stride: int = 1
    downsample: bool = False
    pre_bn_output: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = torch_conv(self.width, 3, self.stride, 1, use_bias=False, name="conv1")(x)
        y = nn.relu(BatchNorm(name="bn1")(y, train))
        conv2 = torch_conv(self.width, 3, 1, 1, use_bias=False, name="conv2")(y)
        y = BatchNorm(name="bn2")(conv2, train)
        if self.downsample:
            x = torch_conv(self.width, 1, self.stride, 0, use_bias=False, name="downsample_conv")(x)
            x = BatchNorm(name="downsample_bn")(x, train)
        if self.pre_bn_output:  # AdAGeo's noBN block: also conv2 + residual, without bn2 and ReLU
            return nn.relu(y + x), conv2 + x
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 (x4 channels) with shortcut (ResNet-50/101/152)."""

    width: int
    stride: int = 1
    downsample: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = torch_conv(self.width, 1, 1, 0, use_bias=False, name="conv1")(x)
        y = nn.relu(BatchNorm(name="bn1")(y, train))
        y = torch_conv(self.width, 3, self.stride, 1, use_bias=False, name="conv2")(y)
        y = nn.relu(BatchNorm(name="bn2")(y, train))
        y = torch_conv(self.width * 4, 1, 1, 0, use_bias=False, name="conv3")(y)
        y = BatchNorm(name="bn3")(y, train)
        if self.downsample:
            x = torch_conv(self.width * 4, 1, self.stride, 0, use_bias=False, name="downsample_conv")(x)
            x = BatchNorm(name="downsample_bn")(x, train)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """torchvision ResNet trunk up to ``layer{num_layers}`` (no avgpool/fc).

    Attributes:
      depth: 18, 34, 50, 101 or 152.
      num_layers: residual layers kept (4 = full trunk, 3 = "conv4" crop).
      trainable_stages: last stages that train (``None`` = all); see module doc.
      pre_bn_output: return ``(map, pre_bn_map)``: the last block (BasicBlock only) also gives
        ``conv2(h) + shortcut`` before its last BatchNorm and ReLU (AdAGeo's ``noBN`` ResNet-18,
        whose CAM-attended NetVLAD branch reads it; recipes_facts §A.2.1).
    """

    depth: int = 18
    num_layers: int = 4
    trainable_stages: int | None = None
    pre_bn_output: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.depth not in RESNET_SPECS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_SPECS)}, got {self.depth}")
        if not 1 <= self.num_layers <= 4:
            raise ValueError(f"ResNet num_layers must be in 1..4, got {self.num_layers}")
        block_type, counts = RESNET_SPECS[self.depth]
        block_cls = BasicBlock if block_type == "basic" else Bottleneck
        expansion = 4 if block_type == "bottleneck" else 1
        num_stages = resnet_num_stages(self.num_layers)
        trainable = num_stages if self.trainable_stages is None else self.trainable_stages
        last_frozen_stage = num_stages - min(max(trainable, 0), num_stages) - 1  # -1: none frozen

        x = torch_conv(64, 7, 2, 3, use_bias=False, name="conv1")(x)
        x = nn.relu(BatchNorm(name="bn1")(x, train))
        x = max_pool(x, 3, 2, 1)
        if last_frozen_stage == 0:
            x = jax.lax.stop_gradient(x)

        if self.pre_bn_output and block_cls is not BasicBlock:
            raise ValueError("pre_bn_output needs a BasicBlock ResNet (18 or 34), as AdAGeo's noBN ResNet-18")
        in_channels, pre_bn = 64, None
        for layer in range(1, self.num_layers + 1):
            width = STAGE_WIDTHS[layer - 1]
            for j in range(counts[layer - 1]):
                stride = 2 if (j == 0 and layer > 1) else 1
                downsample = j == 0 and (stride != 1 or in_channels != width * expansion)
                last = self.pre_bn_output and layer == self.num_layers and j == counts[layer - 1] - 1
                kw = {"pre_bn_output": True} if last else {}
                x = block_cls(width, stride, downsample, name=f"layer{layer}_{j}", **kw)(x, train)
                if last:
                    x, pre_bn = x
                in_channels = width * expansion
            if last_frozen_stage == layer:
                x = jax.lax.stop_gradient(x)
        return (x, pre_bn) if self.pre_bn_output else x


def resnet_frozen_mask(params: dict, num_layers: int, trainable_stages: int | None) -> dict:
    """Bool pytree over a ResNet's params: True for params of frozen stages."""
    num_stages = resnet_num_stages(num_layers)
    trainable = num_stages if trainable_stages is None else min(max(trainable_stages, 0), num_stages)
    first_trainable = num_stages - trainable
    return {
        name: jax.tree_util.tree_map(lambda _, f=resnet_stage_of(name) < first_trainable: f, sub)
        for name, sub in params.items()
    }


__all__ = [
    "RESNET_SPECS",
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "resnet_out_channels",
    "resnet_num_stages",
    "resnet_frozen_mask",
]
