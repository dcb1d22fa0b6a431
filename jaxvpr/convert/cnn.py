"""Conversion rules for the CNN backbones (ResNet, VGG16, AlexNet) and CNN heads.

PyTorch naming follows the anchor that publishes each head:

* ``gem`` (CosPlace/EigenPlaces ``GeoLocalizationNet``) and ``netvlad`` (VG
  benchmark ``GeoLocalizationNet``): the trunk is an ``nn.Sequential`` named
  ``backbone`` -- ResNet children ``0`` conv1, ``1`` bn1, ``4..7`` layer1..layer4;
  VGG16/AlexNet ``features`` indices -- and the head is ``aggregation``
  (GeM head: ``aggregation.1.p``, ``aggregation.3.{weight,bias}``; NetVLAD:
  ``aggregation.centroids``, ``aggregation.conv.weight``).
* ``mixvpr`` and ``convap`` (MixVPR's ``VPRModel``): the trunk is a torchvision
  ResNet kept as ``backbone.model`` (``backbone.model.conv1``, ``.layer1``...),
  the head is ``aggregator`` (MixVPR: ``mix.{i}.mix.{0: LayerNorm, 1: Linear,
  3: Linear}``, ``channel_proj``, ``row_proj``; Conv-AP: ``channel_pool``).
"""

from __future__ import annotations

from jaxvpr.convert.rules import Rule

_SEQUENTIAL_HEADS = ("gem", "netvlad")
_TORCHVISION_HEADS = ("mixvpr", "convap")


def conv_rules(torch_prefix: str, flax_path: tuple[str, ...], bias: bool) -> list[Rule]:
    """``nn.Conv2d`` <-> ``nn.Conv``."""
    rules = [Rule(f"{torch_prefix}.weight", ("params", *flax_path, "kernel"), "conv")]
    if bias:
        rules.append(Rule(f"{torch_prefix}.bias", ("params", *flax_path, "bias"), "identity"))
    return rules


def linear_rules(torch_prefix: str, flax_path: tuple[str, ...]) -> list[Rule]:
    """``nn.Linear`` <-> ``nn.Dense``."""
    return [
        Rule(f"{torch_prefix}.weight", ("params", *flax_path, "kernel"), "linear"),
        Rule(f"{torch_prefix}.bias", ("params", *flax_path, "bias"), "identity"),
    ]


def layernorm_rules(torch_prefix: str, flax_path: tuple[str, ...]) -> list[Rule]:
    """``nn.LayerNorm`` <-> ``nn.LayerNorm`` (weight -> scale)."""
    return [
        Rule(f"{torch_prefix}.weight", ("params", *flax_path, "scale"), "identity"),
        Rule(f"{torch_prefix}.bias", ("params", *flax_path, "bias"), "identity"),
    ]


def batchnorm_rules(torch_prefix: str, flax_path: tuple[str, ...]) -> list[Rule]:
    """``nn.BatchNorm2d`` <-> :class:`jaxvpr.models.layers.BatchNorm` (all five tensors)."""
    return [
        Rule(f"{torch_prefix}.weight", ("params", *flax_path, "scale"), "identity"),
        Rule(f"{torch_prefix}.bias", ("params", *flax_path, "bias"), "identity"),
        Rule(f"{torch_prefix}.running_mean", ("batch_stats", *flax_path, "mean"), "identity"),
        Rule(f"{torch_prefix}.running_var", ("batch_stats", *flax_path, "var"), "identity"),
        Rule(f"{torch_prefix}.num_batches_tracked", ("batch_stats", *flax_path, "num_batches_tracked"), "count"),
    ]


def resnet_rules(depth: int, num_layers: int, torch_prefix: str, sequential: bool, flax_root=("backbone",)) -> list[Rule]:
    """A torchvision ResNet trunk (see :mod:`jaxvpr.models.resnet`).

    ``sequential=True`` names the stem and layers by their index in
    ``children()`` (``0``, ``1``, ``4``..``7``); otherwise by attribute
    (``conv1``, ``bn1``, ``layer1``..). ``torch_prefix`` ends with a dot or is empty.
    """
    from jaxvpr.models.resnet import RESNET_SPECS

    block_type, counts = RESNET_SPECS[depth]
    convs = ("conv1", "conv2") if block_type == "basic" else ("conv1", "conv2", "conv3")
    stem_conv, stem_bn = ("0", "1") if sequential else ("conv1", "bn1")
    rules = conv_rules(f"{torch_prefix}{stem_conv}", (*flax_root, "conv1"), bias=False)
    rules += batchnorm_rules(f"{torch_prefix}{stem_bn}", (*flax_root, "bn1"))
    for layer in range(1, num_layers + 1):
        layer_name = str(3 + layer) if sequential else f"layer{layer}"
        for j in range(counts[layer - 1]):
            block_t = f"{torch_prefix}{layer_name}.{j}"
            block_f = (*flax_root, f"layer{layer}_{j}")
            for k, conv in enumerate(convs, start=1):
                rules += conv_rules(f"{block_t}.{conv}", (*block_f, conv), bias=False)
                rules += batchnorm_rules(f"{block_t}.bn{k}", (*block_f, f"bn{k}"))
            has_downsample = j == 0 and (layer > 1 or block_type == "bottleneck")
            if has_downsample:
                rules += conv_rules(f"{block_t}.downsample.0", (*block_f, "downsample_conv"), bias=False)
                rules += batchnorm_rules(f"{block_t}.downsample.1", (*block_f, "downsample_bn"))
    return rules


def sequential_conv_rules(conv_indices: tuple[int, ...], torch_prefix: str, flax_root=("backbone",)) -> list[Rule]:
    """VGG16/AlexNet ``features`` convs: torch ``{prefix}{i}`` <-> flax ``features_{i}``."""
    rules = []
    for i in conv_indices:
        rules += conv_rules(f"{torch_prefix}{i}", (*flax_root, f"features_{i}"), bias=True)
    return rules


def head_rules(cfg, torch_prefix: str, flax_root=("head",)) -> list[Rule]:
    """Rules of a CNN aggregation head (``torch_prefix`` ends with a dot)."""
    head = cfg.head
    if head == "gem":
        return [Rule(f"{torch_prefix}1.p", ("params", *flax_root, "p"), "identity")] + linear_rules(
            f"{torch_prefix}3", (*flax_root, "fc")
        )
    if head == "netvlad":
        return [
            Rule(f"{torch_prefix}centroids", ("params", *flax_root, "centroids"), "identity"),
            *conv_rules(f"{torch_prefix}conv", (*flax_root, "conv"), bias=False),
        ]
    if head == "mixvpr":
        rules = []
        for i in range(cfg.mix_depth):
            mixer_t, mixer_f = f"{torch_prefix}mix.{i}.mix", (*flax_root, f"mix_{i}")
            rules += layernorm_rules(f"{mixer_t}.0", (*mixer_f, "norm"))
            rules += linear_rules(f"{mixer_t}.1", (*mixer_f, "fc1"))
            rules += linear_rules(f"{mixer_t}.3", (*mixer_f, "fc2"))
        rules += linear_rules(f"{torch_prefix}channel_proj", (*flax_root, "channel_proj"))
        rules += linear_rules(f"{torch_prefix}row_proj", (*flax_root, "row_proj"))
        return rules
    if head == "convap":
        return conv_rules(f"{torch_prefix}channel_pool", (*flax_root, "channel_pool"), bias=True)
    raise ValueError(f"head {head!r} is not a CNN head")


def cnn_rules(cfg) -> list[Rule]:
    """All rules of a CNN model config (see the module docstring for the naming)."""
    from jaxvpr.models.alexnet import ALEXNET_CONV_INDICES
    from jaxvpr.models.registry import backbone_family, resnet_spec
    from jaxvpr.models.vgg import VGG16_CONV_INDICES

    if cfg.head in _SEQUENTIAL_HEADS:
        backbone_prefix, sequential, head_prefix = "backbone.", True, "aggregation."
    elif cfg.head in _TORCHVISION_HEADS:
        backbone_prefix, sequential, head_prefix = "backbone.model.", False, "aggregator."
    else:
        raise ValueError(f"head {cfg.head!r} has no PyTorch layout with a CNN backbone")

    family = backbone_family(cfg.backbone)
    if family == "resnet":
        depth, num_layers = resnet_spec(cfg.backbone)
        rules = resnet_rules(depth, num_layers, backbone_prefix, sequential)
    elif family in ("vgg", "alexnet"):
        if not sequential:
            raise ValueError(f"{cfg.backbone} with head {cfg.head!r} has no PyTorch layout (only ResNets)")
        indices = VGG16_CONV_INDICES if family == "vgg" else ALEXNET_CONV_INDICES
        rules = sequential_conv_rules(indices, backbone_prefix)
    else:
        raise ValueError(f"{cfg.backbone} is not a CNN backbone")
    return rules + head_rules(cfg, head_prefix)
