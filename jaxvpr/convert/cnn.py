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

Another anchor's names are chosen by the config's ``torch_layout``:

* ``openibl`` (:func:`openibl_rules`; SFRS, NetVLAD trained with OpenIBL): ``EmbedNet`` /
  ``EmbedNetPCA`` of ``ibl/models/netvlad.py`` -- VGG16 ``features[:-2]`` as
  ``base_model.base.<index>``, ``net_vlad.centroids`` (K, C), ``net_vlad.conv.weight``
  (K, C, 1, 1), and with ``pca_dim`` the top-level ``pca_layer.{weight (pca_dim, K*C, 1, 1),
  bias}``. (In the default VG layout the projection is ``aggregation.pca_layer.*``.)
* ``dirtorch`` (:func:`dirtorch_rules`; AP-GeM): ``dirtorch/nets/rmac_resnet.py``
  ``ResNet_RMAC`` -- torchvision attribute names ``conv1``, ``bn1``, ``layer<i>.<j>.*``
  (``module.`` stripped on reading), then ``adpool.p`` (GeM) and ``fc.{weight,bias}``.

The whitening of a GeM head with ``whiten=True`` is not in any PyTorch state dict: dirtorch
keeps it as a pickled scikit-learn ``PCA`` object next to the state dict. Here it is three
plain arrays under the names :data:`WHITENING_NAMES` (``whitening.mean`` (D,),
``whitening.components`` (D, D), ``whitening.explained_variance`` (D,)), which
``python -m jaxvpr.convert`` reads from / writes to an ``.npz`` (``--whitening``) instead of
the ``.pth`` (:func:`read_whitening`, :func:`split_whitening`). jaxvpr never unpickles the
sklearn object: :data:`WHITENING_EXPORT` is the one-off snippet that exports the arrays where
the dirtorch checkpoint loads (``python -m jaxvpr.convert from-torch --help`` prints it).
"""

from __future__ import annotations

import os

import numpy as np

from jaxvpr.convert.rules import Rule

WHITENING_PREFIX = "whitening."
WHITENING_KEYS = ("mean", "components", "explained_variance")
WHITENING_NAMES = tuple(f"{WHITENING_PREFIX}{k}" for k in WHITENING_KEYS)

WHITENING_EXPORT = """\
AP-GeM: dirtorch's Resnet-101-AP-GeM.pt pickles scikit-learn PCA objects next to its weights, which
jaxvpr never unpickles. Export the weights and the Landmarks_clean whitening once, with dirtorch's
requirements and scikit-learn installed:

    import sys, numpy as np, torch, sklearn.decomposition
    sys.modules["sklearn.decomposition.pca"] = sklearn.decomposition._pca  # the pickle's sklearn < 0.24 path
    ckpt = torch.load("Resnet-101-AP-GeM.pt", map_location="cpu", weights_only=False)
    pca = ckpt["pca"]["Landmarks_clean"]   # the whitening VPR-methods-evaluation and hloc use
    variance = pca.explained_variance_ if pca.whiten else np.ones_like(pca.explained_variance_)
    np.savez("apgem_landmarks_clean.npz", mean=pca.mean_, components=pca.components_,
             explained_variance=variance)
    torch.save(ckpt["state_dict"], "apgem_resnet101.pth")   # the weights alone

then
    python -m jaxvpr.convert from-torch --model apgem_resnet101_2048 --weights apgem_resnet101.pth \\
        --whitening apgem_landmarks_clean.npz --out ckpt/apgem
(--no-whitening instead of --whitening: unwhitened descriptors, as kapture's LM18 extraction).
"""

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


def whitening_rules(flax_root=("head",)) -> list[Rule]:
    """:class:`~jaxvpr.models.gem.PCAWhitening` <-> the arrays of :data:`WHITENING_NAMES`."""
    return [Rule(name, ("params", *flax_root, "whitening", name[len(WHITENING_PREFIX):]), "identity")
            for name in WHITENING_NAMES]


def read_whitening(path: str | os.PathLike, model_cfg) -> dict[str, np.ndarray]:
    """An ``.npz`` with ``mean``, ``components``, ``explained_variance`` as state-dict entries
    (:data:`WHITENING_NAMES`, float32) for a model with ``whiten=True``."""
    if not model_cfg.get("whiten", False):
        raise ValueError(
            f"--whitening is for models with a PCA whitening (whiten=True, e.g. apgem_resnet101_2048); "
            f"{model_cfg.name!r} has none"
        )
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"whitening file not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in WHITENING_KEYS if k not in data.files]
        if missing:
            raise ValueError(
                f"{path}: a whitening .npz holds {', '.join(WHITENING_KEYS)}; missing {', '.join(missing)} "
                f"(found {', '.join(data.files) or 'nothing'}). See `python -m jaxvpr.convert from-torch --help`."
            )
        return {f"{WHITENING_PREFIX}{k}": np.asarray(data[k], np.float32) for k in WHITENING_KEYS}


def split_whitening(state_dict: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(weights, whitening)``: the PyTorch state dict proper, and the whitening arrays by
    ``.npz`` key (empty when the model has none) -- the inverse of :func:`read_whitening`."""
    weights = {k: v for k, v in state_dict.items() if not k.startswith(WHITENING_PREFIX)}
    whitening = {k[len(WHITENING_PREFIX):]: v for k, v in state_dict.items() if k.startswith(WHITENING_PREFIX)}
    return weights, whitening


def head_rules(cfg, torch_prefix: str, flax_root=("head",), pca_prefix: str | None = None) -> list[Rule]:
    """Rules of a CNN aggregation head (``torch_prefix`` ends with a dot).

    ``pca_prefix``: the name of NetVLAD's PCA projection (default ``{torch_prefix}pca_layer``).
    """
    head = cfg.head
    if head == "gem":
        rules = [Rule(f"{torch_prefix}1.p", ("params", *flax_root, "p"), "identity")]
        rules += linear_rules(f"{torch_prefix}3", (*flax_root, "fc"))
        return rules + (whitening_rules(flax_root) if cfg.get("whiten", False) else [])
    if head == "netvlad":
        rules = [
            Rule(f"{torch_prefix}centroids", ("params", *flax_root, "centroids"), "identity"),
            *conv_rules(f"{torch_prefix}conv", (*flax_root, "conv"), bias=False),
        ]
        if cfg.get("pca_dim", 0) > 0:
            pca_prefix = f"{torch_prefix}pca_layer" if pca_prefix is None else pca_prefix
            rules += conv_rules(pca_prefix, (*flax_root, "pca_layer"), bias=True)
        return rules
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


def openibl_rules(cfg) -> list[Rule]:
    """OpenIBL's ``EmbedNet`` / ``EmbedNetPCA``: VGG16 + NetVLAD (+ ``pca_layer``)."""
    from jaxvpr.models.vgg import VGG16_CONV_INDICES

    if cfg.backbone != "vgg16" or cfg.head != "netvlad":
        raise ValueError(f"torch_layout 'openibl' is VGG16 + NetVLAD, not {cfg.backbone} + {cfg.head}")
    rules = sequential_conv_rules(VGG16_CONV_INDICES, "base_model.base.")
    return rules + head_rules(cfg, "net_vlad.", pca_prefix="pca_layer")


def dirtorch_rules(cfg) -> list[Rule]:
    """dirtorch's ``ResNet_RMAC`` (``resnet{18,50,101,152}_rmac``): ResNet + GeM ``adpool`` + ``fc``."""
    from jaxvpr.models.registry import resnet_spec

    if not cfg.backbone.startswith("resnet") or cfg.head != "gem":
        raise ValueError(f"torch_layout 'dirtorch' is a ResNet + GeM, not {cfg.backbone} + {cfg.head}")
    depth, num_layers = resnet_spec(cfg.backbone)
    if num_layers != 4:
        raise ValueError(f"dirtorch's ResNet_RMAC keeps layer4: use backbone 'resnet{depth}', not {cfg.backbone!r}")
    rules = resnet_rules(depth, 4, "", sequential=False)
    rules += [Rule("adpool.p", ("params", "head", "p"), "identity"), *linear_rules("fc", ("head", "fc"))]
    return rules + (whitening_rules() if cfg.whiten else [])


def places365_rules(depth: int | None = 18) -> list[Rule]:
    """A torchvision ResNet with its classifier, as the CSAIL Places365 releases store it
    (``resnet18_places365.pth.tar``: ``conv1``, ``bn1``, ``layer<i>.<j>.*``, ``fc`` 512 -> 365; ``module.``
    stripped on reading): the backbone and the CAM's scene classifier (``head/fc``) of an AdAGeo model.
    ``depth=None``: AdAGeo's AlexNet (``alexnet_057.pth``, never released: torchvision's ``features.<i>``
    convs and the GAP classifier ``fc`` 256 -> 365, the layout of the authors' ``src/alexnet.py``)."""
    from jaxvpr.models.alexnet import ALEXNET_CONV_INDICES

    if depth is None:
        return sequential_conv_rules(ALEXNET_CONV_INDICES, "features.") + linear_rules("fc", ("head", "fc"))
    return resnet_rules(depth, 4, "", sequential=False) + linear_rules("fc", ("head", "fc"))


def adageo_rules(cfg) -> list[Rule]:
    """AdAGeo's ``AttenNetVLAD`` (``src/network.py``): ``backbone.*`` a torchvision ResNet with ``fc``
    (the CAM's classifier), ``netvlad_layer.{centroids, conv.weight}``. Its state dict also holds
    ``weight_softmax`` (the same tensor as ``backbone.fc.weight``) and ``grl_discriminator.*``
    (training only): read it with ``strict=False``."""
    from jaxvpr.models.alexnet import ALEXNET_CONV_INDICES
    from jaxvpr.models.registry import backbone_family, resnet_spec

    if backbone_family(cfg.backbone) == "alexnet":
        rules = sequential_conv_rules(ALEXNET_CONV_INDICES, "backbone.features.")
    else:
        rules = resnet_rules(resnet_spec(cfg.backbone)[0], 4, "backbone.", sequential=False)
    rules += linear_rules("backbone.fc", ("head", "fc"))
    return rules + [Rule("netvlad_layer.centroids", ("params", "head", "netvlad", "centroids"), "identity"),
                    *conv_rules("netvlad_layer.conv", ("head", "netvlad", "conv"), bias=False)]


def cnn_rules(cfg) -> list[Rule]:
    """All rules of a CNN model config (see the module docstring for the naming)."""
    from jaxvpr.models.alexnet import ALEXNET_CONV_INDICES
    from jaxvpr.models.registry import backbone_family, resnet_spec
    from jaxvpr.models.vgg import VGG16_CONV_INDICES

    layout = cfg.get("torch_layout")
    if cfg.head == "cam_netvlad":
        return adageo_rules(cfg)
    if layout == "openibl":
        return openibl_rules(cfg)
    if layout == "dirtorch":
        return dirtorch_rules(cfg)
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
