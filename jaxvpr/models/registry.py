"""Model registry: named published models, free composition, and ``VPRModel``.

A model is described by an ``ml_collections.ConfigDict`` (see :func:`model_config`):

=====================  ===============================================================
field                  meaning
=====================  ===============================================================
``name``               registry name (free compositions get ``"<backbone>_<head>"``)
``backbone``           one of :data:`BACKBONES` (``resnet18``, ``resnet50conv4``,
                       ``vgg16``, ``alexnet``, ``dinov2_vitb14``, ``dinov2_vitb14_reg``...)
``head``               one of :data:`HEADS`: ``gem``, ``netvlad``, ``mixvpr``,
                       ``convap``, ``salad``, ``anyloc`` (hard-assignment VLAD of a
                       DINOv2 block's facet), ``cls`` (DINOv2 class token),
                       ``cam_netvlad`` (AdAGeo: a scene classifier's CAM attention +
                       NetVLAD on a BasicBlock ResNet, :mod:`jaxvpr.models.adageo`)
``trainable_stages``   how many *trailing* backbone stages receive gradients
                       (``None`` = the whole backbone trains, 0 = frozen backbone).
                       Stages: ResNet ``[stem, layer1, ..., layerN]``; VGG16/AlexNet:
                       the conv layers of the trunk; DINOv2: transformer blocks (the
                       final norm trains with the last block). Defaults reproduce the
                       anchors: CosPlace ResNet 2 (layer3+layer4), ``*conv4`` 1
                       (layer3; also MixVPR's ``layers_to_freeze=2``), VGG16 3
                       (CosPlace's "all but the last 5 layers of features[:-2]" =
                       conv5_1..conv5_3), AlexNet 2 (conv4+conv5: AdAGeo fine-tunes "the
                       last two convolutional blocks"), DINOv2 4 (SALAD).
``image_size``         ``(H, W)`` the model was published for, or ``None`` when any
                       size works (MixVPR (320, 320), SALAD (322, 322)); used by
                       :func:`init_variables`.
``input_norm``         the input normalisation the backbone was trained with, applied
                       by :class:`VPRModel` (:func:`renormalize_input`): ``imagenet``
                       (default: inputs pass unchanged) or ``caffe`` -- RGB in 0-255
                       minus the mean (0.48502, 0.45796, 0.40760) x 255, std 1, the
                       MatConvNet VGG16 of NetVLAD and SFRS (OpenIBL's
                       ``Normalize(mean, std=[1/255]*3)``).
``torch_layout``       PyTorch checkpoint naming for :mod:`jaxvpr.convert`: ``None`` =
                       the head's anchor (see below), ``openibl`` (VGG16 + NetVLAD as
                       OpenIBL's ``EmbedNet``/``EmbedNetPCA``: ``base_model.base.<index>``,
                       ``net_vlad.*``, ``pca_layer.*``) or ``dirtorch`` (a full ResNet +
                       GeM as dirtorch's ``resnet*_rmac``: ``conv1``, ``bn1``,
                       ``layer<i>.*``, ``adpool.p``, ``fc.*``). Names only, not weights.
head options           gem: ``fc_output_dim``, ``l2_before_pool`` (L2 over channels
                       before GeM: CosPlace True, AP-GeM False), ``whiten`` (AP-GeM's
                       PCA whitening + L2 after the FC, :class:`~jaxvpr.models.gem.PCAWhitening`);
                       netvlad: ``num_clusters``, ``pca_dim`` (0 = none; else a 1x1-conv
                       PCA-whitening projection K*C -> pca_dim + L2, SFRS 4096);
                       mixvpr: ``out_channels, mix_depth, mlp_ratio, out_rows, in_h,
                       in_w``; convap: ``out_channels, s1, s2``; salad:
                       ``num_clusters, cluster_dim, token_dim, dropout``; anyloc:
                       ``layer`` (0-based block whose facet is aggregated; later
                       blocks are not run), ``facet`` (``value``, ``query``, ``key``
                       or ``token``), ``num_clusters`` (vocabulary size);
                       ``trainable_stages`` counts blocks ``0..layer`` and defaults
                       to 0 (AnyLoc is not trained); cam_netvlad: ``num_clusters``,
                       ``num_classes`` (the scene classifier's: Places365 365),
                       ``attention`` (False: NetVLAD on the post-BN map).
=====================  ===============================================================

:class:`VPRModel` = backbone + head. Inputs are NHWC float32 ImageNet-normalised
images (every model; a ``caffe`` model converts them first, see ``input_norm``);
outputs are L2-normalised descriptors (B, D) -- except a bare ``dinov2_*``
model (head ``cls``), whose descriptor is the official forward's output, the class
token after the final LayerNorm, *not* L2-normalised (normalise it yourself if you
retrieve with it). Variables: ``{'params', 'batch_stats'}`` (no ``batch_stats`` for
DINOv2-based models); AnyLoc models add ``{'vocabulary': {'head': {'centers': (K, C)}}}``,
the k-means centres (see :mod:`jaxvpr.models.anyloc`). AP-GeM's whitening (``whiten``)
is ``params['head']['whitening']`` = ``{mean, components, explained_variance}``, which
:func:`frozen_mask` always marks frozen: training never changes it.

PyTorch naming (for :mod:`jaxvpr.convert`) follows the head's anchor: ``gem`` and
``netvlad`` use CosPlace / VG-benchmark names (``backbone.<index>``,
``aggregation.*``), ``mixvpr``/``convap`` MixVPR's (``backbone.model.<attr>``,
``aggregator.*``), ``salad`` SALAD's, ``cls`` the DINOv2 hub model's; ``torch_layout``
selects another anchor's names.

Named CNN models and the published weights they load (``python -m jaxvpr.convert from-torch``):

* ``cosplace_{backbone}_{dim}`` (30: ResNet-18 32-512, ResNet-50/101/152 32-2048, VGG16 64-512):
  CosPlace hub / release v1.0 ``{backbone}_{dim}_cosplace.pth``.
* ``eigenplaces_{backbone}_{dim}`` (11: ResNet-18 256/512, ResNet-50/101 128/256/512/2048, VGG16
  512): EigenPlaces hub / release v1.0 ``{backbone}_{dim}_eigenplaces.pth``, CosPlace's network and names.
* ``netvlad_resnet18conv4_64``: the VG benchmark's ResNet-18 (to layer3) + NetVLAD-64.
* ``adageo_resnet18_netvlad_64``: AdAGeo (Berton et al., WACV 2021) phase 2, ResNet-18 (Places365
  classifier kept as the CAM's fc) + CAM attention + NetVLAD-64; ``adageo_resnet18_netvlad_64_noatt``
  its NetVLAD baseline (the same network without attention); ``adageo_alexnet_netvlad_64`` (``_noatt``)
  the paper's AlexNet variant (conv5 before its ReLU as both maps, conv4 + conv5 trained).
* ``netvlad_vgg16_32768`` / ``netvlad_vgg16_4096``: NetVLAD (Arandjelovic et al., CVPR 2016)
  VGG16 conv5_3 + NetVLAD-64, without / with the 4096-d PCA whitening; ``caffe`` input and the
  ``openibl`` layout (``EmbedNet`` / ``EmbedNetPCA``): NetVLAD weights trained with OpenIBL load
  as they are; the MATLAB Pitts30k release (hloc's ``Pitts30K_struct.mat``) converts with
  :mod:`jaxvpr.convert.matconvnet` (``from-torch --weights Pitts30K_struct.mat``).
* ``sfrs_vgg16_4096``: SFRS (Ge et al., ECCV 2020), OpenIBL hub ``vgg16_netvlad`` = release
  v0.1.0-beta ``vgg16_netvlad.pth``; same network as ``netvlad_vgg16_4096``.
* ``apgem_resnet101_2048``: AP-GeM (Revaud et al., ICCV 2019), dirtorch ``Resnet-101-AP-GeM.pt``
  (its ``state_dict``) + the ``Landmarks_clean`` whitening exported to ``.npz``
  (``from-torch --whitening``; see :mod:`jaxvpr.convert.cnn`). ``whiten=False`` gives kapture's
  LM18-style unwhitened descriptors.
* ``mixvpr_resnet50_{128,512,4096}``: MixVPR's ResNet-50 (to layer3) + MixVPR, 320x320
  (``resnet50_MixVPR_{D}_channels({C})_rows({R})``).
* ``convap_resnet50_{512,2048,4096,8192}``: Conv-AP (GSV-Cities) ``resnet50_ConvAP_{D/4}_2x2.ckpt`` as
  VPR-methods-evaluation loads it (``vpr_models/convap.py``): the *full* ResNet-50 (2048 channels)
  + 1x1 conv to D/4 + 2x2 average bins = D, images resized to 320x320.
"""

from __future__ import annotations

import functools
import importlib
import json
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

# --------------------------------------------------------------------------- backbones

_RESNET_DEPTHS = (18, 34, 50, 101, 152)
_DINOV2_ARCHS = {  # arch -> (width, depth)
    "vits14": (384, 12),
    "vitb14": (768, 12),
    "vitl14": (1024, 24),
    "vitg14": (1536, 40),
}

BACKBONES: tuple[str, ...] = (
    *(f"resnet{d}" for d in _RESNET_DEPTHS),
    *(f"resnet{d}conv4" for d in _RESNET_DEPTHS),
    "vgg16",
    "alexnet",
    *(f"dinov2_{a}" for a in _DINOV2_ARCHS),
    *(f"dinov2_{a}_reg" for a in _DINOV2_ARCHS),
)

HEAD_OPTIONS: dict[str, dict[str, Any]] = {
    "gem": {"fc_output_dim": 512, "l2_before_pool": True, "whiten": False},
    "netvlad": {"num_clusters": 64, "pca_dim": 0},
    "mixvpr": {"out_channels": 1024, "mix_depth": 4, "mlp_ratio": 1, "out_rows": 4, "in_h": 20, "in_w": 20},
    "convap": {"out_channels": 512, "s1": 2, "s2": 2},
    "salad": {"num_clusters": 64, "cluster_dim": 128, "token_dim": 256, "dropout": 0.3},
    "anyloc": {"layer": 31, "facet": "value", "num_clusters": 32},
    "cls": {},
    "cam_netvlad": {"num_clusters": 64, "num_classes": 365, "attention": True},
}
HEADS: tuple[str, ...] = tuple(HEAD_OPTIONS)
COMMON_KEYS: tuple[str, ...] = (
    "name", "backbone", "head", "trainable_stages", "image_size", "input_norm", "torch_layout",
)

# input_norm -> the caffe-style mean subtracted from RGB in 0-255 (std 1), None = ImageNet mean/std.
INPUT_NORMS: dict[str, tuple[float, float, float] | None] = {
    "imagenet": None,
    "caffe": (0.48502, 0.45796, 0.40760),  # OpenIBL / hloc / VPR-methods-evaluation SFRS constants
}
# torch_layout -> (heads, backbone families) it names; None (the default) is every head's own anchor.
TORCH_LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "openibl": (("netvlad",), ("vgg",)),
    "dirtorch": (("gem",), ("resnet",)),
}


def backbone_family(backbone: str) -> str:
    """``'resnet'``, ``'vgg'``, ``'alexnet'`` or ``'dinov2'``."""
    _check_backbone(backbone)
    for family in ("resnet", "vgg", "alexnet", "dinov2"):
        if backbone.startswith(family):
            return family
    raise AssertionError(backbone)


def _check_backbone(backbone: str) -> None:
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; valid backbones: {', '.join(BACKBONES)}")


def resnet_spec(backbone: str) -> tuple[int, int]:
    """``'resnet50conv4'`` -> (depth 50, num_layers 3); ``'resnet18'`` -> (18, 4)."""
    body = backbone[len("resnet"):]
    if body.endswith("conv4"):
        return int(body[: -len("conv4")]), 3
    return int(body), 4


def dinov2_spec(backbone: str) -> tuple[str, int]:
    """``'dinov2_vitb14_reg'`` -> (arch ``'vitb14'``, 4 register tokens)."""
    parts = backbone.split("_")
    return parts[1], (4 if backbone.endswith("_reg") else 0)


def default_trainable_stages(backbone: str) -> int:
    """The anchors' freezing defaults (see module docstring)."""
    family = backbone_family(backbone)
    if family == "resnet":
        return 1 if backbone.endswith("conv4") else 2
    if family == "vgg":
        return 3
    if family == "alexnet":
        return 2
    return 4


def num_backbone_stages(backbone: str) -> int:
    """Freezable stages of a backbone (see ``trainable_stages`` in the module docstring)."""
    family = backbone_family(backbone)
    if family == "resnet":
        return 1 + resnet_spec(backbone)[1]
    if family == "vgg":
        return 13
    if family == "alexnet":
        return 5
    return _DINOV2_ARCHS[dinov2_spec(backbone)[0]][1]


def feature_dim(cfg: ml_collections.ConfigDict) -> int:
    """Channels of the backbone output (the input size of a discriminator "before aggregation")."""
    family = backbone_family(cfg.backbone)
    if family == "resnet":
        from jaxvpr.models.resnet import resnet_out_channels

        return resnet_out_channels(*resnet_spec(cfg.backbone))
    if family in ("vgg", "alexnet"):
        return 512 if family == "vgg" else 256
    return _DINOV2_ARCHS[dinov2_spec(cfg.backbone)[0]][0]


def descriptor_dim(cfg: ml_collections.ConfigDict) -> int:
    """Size D of the model's descriptors."""
    head = cfg.head
    if head == "gem":
        return cfg.fc_output_dim
    if head == "netvlad" and cfg.pca_dim > 0:
        return cfg.pca_dim
    if head in ("netvlad", "anyloc", "cam_netvlad"):
        return cfg.num_clusters * feature_dim(cfg)
    if head == "mixvpr":
        return cfg.out_channels * cfg.out_rows
    if head == "convap":
        return cfg.out_channels * cfg.s1 * cfg.s2
    if head == "salad":
        return cfg.num_clusters * cfg.cluster_dim + cfg.token_dim
    return feature_dim(cfg)


# --------------------------------------------------------------------------- named models

# Published descriptor sizes per backbone (CosPlace / EigenPlaces hubconf AVAILABLE_TRAINED_MODELS).
_COSPLACE_DIMS = {"resnet18": (32, 64, 128, 256, 512), "vgg16": (64, 128, 256, 512),
                  **{f"resnet{d}": (32, 64, 128, 256, 512, 1024, 2048) for d in (50, 101, 152)}}
_EIGENPLACES_DIMS = {"resnet18": (256, 512), "resnet50": (128, 256, 512, 2048), "resnet101": (128, 256, 512, 2048),
                     "vgg16": (512,)}

_NAMED: dict[str, dict[str, Any]] = {
    # CosPlace (Berton et al., CVPR 2022) and EigenPlaces (Berton et al., ICCV 2023): every published
    # (backbone, dimension) of their torch.hub releases (v1.0/{backbone}_{dim}_{method}.pth); the same
    # network (GeM + FC), CosPlace's layout.
    **{f"{method}_{backbone}_{dim}": dict(backbone=backbone, head="gem", fc_output_dim=dim)
       for method, dims in (("cosplace", _COSPLACE_DIMS), ("eigenplaces", _EIGENPLACES_DIMS))
       for backbone, sizes in dims.items() for dim in sizes},
    # NetVLAD (Arandjelovic et al., CVPR 2016) VGG16 + NetVLAD-64 (+ PCA whitening to 4096) and
    # SFRS (Ge et al., ECCV 2020), the same network: MatConvNet ("caffe") input, OpenIBL names.
    "netvlad_vgg16_32768": dict(
        backbone="vgg16", head="netvlad", num_clusters=64, input_norm="caffe", torch_layout="openibl",
    ),
    "netvlad_vgg16_4096": dict(
        backbone="vgg16", head="netvlad", num_clusters=64, pca_dim=4096, input_norm="caffe", torch_layout="openibl",
    ),
    "sfrs_vgg16_4096": dict(
        backbone="vgg16", head="netvlad", num_clusters=64, pca_dim=4096, input_norm="caffe", torch_layout="openibl",
    ),
    # AP-GeM (Revaud et al., ICCV 2019): ResNet-101 + GeM (no L2 before) + FC + Landmarks_clean whitening.
    "apgem_resnet101_2048": dict(
        backbone="resnet101", head="gem", fc_output_dim=2048, l2_before_pool=False, whiten=True,
        torch_layout="dirtorch",
    ),
    # Conv-AP (Ali-bey et al., GSV-Cities 2022) as VPR-methods-evaluation loads it: full ResNet-50
    # (layer4, 2048 channels), D/4 channels x 2x2 bins, 320x320 input (resnet50_ConvAP_{D/4}_2x2.ckpt).
    **{f"convap_resnet50_{dim}": dict(
        backbone="resnet50", head="convap", image_size=(320, 320), out_channels=dim // 4, s1=2, s2=2,
    ) for dim in (512, 2048, 4096, 8192)},
    # VG benchmark (Berton et al., CVPR 2022) ResNet-18 cropped after layer3 + NetVLAD-64.
    "netvlad_resnet18conv4_64": dict(backbone="resnet18conv4", head="netvlad", num_clusters=64),
    # AdAGeo (Berton et al., WACV 2021): Places365 ResNet-18 (layer3+layer4 train) + CAM + NetVLAD-64.
    "adageo_resnet18_netvlad_64": dict(backbone="resnet18", head="cam_netvlad", num_clusters=64),
    "adageo_resnet18_netvlad_64_noatt": dict(backbone="resnet18", head="cam_netvlad", num_clusters=64,
                                             attention=False),
    # ... and its AlexNet variant (paper Table 2): conv5 before its ReLU, conv4+conv5 train, GAP + fc 256 -> 365.
    "adageo_alexnet_netvlad_64": dict(backbone="alexnet", head="cam_netvlad", num_clusters=64),
    "adageo_alexnet_netvlad_64_noatt": dict(backbone="alexnet", head="cam_netvlad", num_clusters=64,
                                            attention=False),
    # MixVPR (Ali-bey et al., WACV 2023): ResNet-50 up to layer3, 320x320 input; the three released
    # models resnet50_MixVPR_{D}_channels({C})_rows({R}): 4096 = 1024 x 4, 512 = 256 x 2, 128 = 64 x 2.
    **{f"mixvpr_resnet50_{channels * rows}": dict(
        backbone="resnet50conv4", head="mixvpr", image_size=(320, 320),
        out_channels=channels, mix_depth=4, mlp_ratio=1, out_rows=rows, in_h=20, in_w=20,
    ) for channels, rows in ((1024, 4), (256, 2), (64, 2))},
    # DINOv2 (Oquab et al., 2023) torch.hub backbones; descriptor = class token.
    "dinov2_vits14": dict(backbone="dinov2_vits14", head="cls"),
    "dinov2_vitb14": dict(backbone="dinov2_vitb14", head="cls"),
    "dinov2_vitb14_reg": dict(backbone="dinov2_vitb14_reg", head="cls"),
    "dinov2_vitl14": dict(backbone="dinov2_vitl14", head="cls"),
    "dinov2_vitg14": dict(backbone="dinov2_vitg14", head="cls"),
    # SALAD (Izquierdo & Civera, CVPR 2024): DINOv2 ViT-B/14 + optimal-transport head, 8448-d.
    "salad_dinov2_vitb14": dict(
        backbone="dinov2_vitb14", head="salad", image_size=(322, 322),
        num_clusters=64, cluster_dim=128, token_dim=256,
        dropout=0.3,  # SALAD's class default, active in its training (inference: off)
    ),
    # AnyLoc-VLAD-DINOv2 (Keetha et al., RA-L 2023): DINOv2 ViT-G/14 value facet of block 31,
    # hard VLAD over 32 centres, 49152-d. One architecture; the names differ only in the
    # published vocabulary (release v1 dinov2_vitg14_l31_value_c32_<domain>_c_centers.pt)
    # that `python -m jaxvpr.convert from-torch --vocabulary` puts in.
    **{
        f"anyloc_dinov2_vitg14_{domain}": dict(
            backbone="dinov2_vitg14", head="anyloc", layer=31, facet="value", num_clusters=32,
            trainable_stages=0,
        )
        for domain in ("indoor", "urban", "aerial", "structured", "unstructured", "global")
    },
    # A small AnyLoc (ViT-S/14 value facet of block 3, 8 centres; no published vocabulary):
    # for tests and quick runs of `python -m jaxvpr.anyloc vocabulary`.
    "anyloc_dinov2_vits14_l3": dict(
        backbone="dinov2_vits14", head="anyloc", layer=3, facet="value", num_clusters=8, trainable_stages=0,
    ),
    # Free compositions the anchors train often.
    "resnet50_gem_2048": dict(backbone="resnet50", head="gem", fc_output_dim=2048),
    "resnet50conv4_netvlad_64": dict(backbone="resnet50conv4", head="netvlad", num_clusters=64),
    "resnet50conv4_convap_2048": dict(backbone="resnet50conv4", head="convap", out_channels=512, s1=2, s2=2),
    "alexnet_netvlad_64": dict(backbone="alexnet", head="netvlad", num_clusters=64),
    "vgg16_netvlad_64": dict(backbone="vgg16", head="netvlad", num_clusters=64),
}


def list_models() -> list[str]:
    """Names accepted by :func:`model_config`."""
    return sorted(_NAMED)


def _valid_keys(head: str) -> tuple[str, ...]:
    return COMMON_KEYS + tuple(HEAD_OPTIONS[head])


def model_config(name_or_cfg: str | Mapping[str, Any], **overrides: Any) -> ml_collections.ConfigDict:
    """The full, validated config of a model.

    Args:
      name_or_cfg: a name from :func:`list_models` (its published config), or a
        mapping with at least ``backbone`` and ``head`` plus any head options
        (free composition; missing options get the defaults of :data:`HEAD_OPTIONS`).
      **overrides: fields to change (e.g. ``fc_output_dim=128``, ``trainable_stages=None``).

    Raises:
      ValueError: unknown name, backbone, head or key (the message lists valid ones).
    """
    if isinstance(name_or_cfg, str):
        if name_or_cfg not in _NAMED:
            raise ValueError(f"unknown model {name_or_cfg!r}; known models: {', '.join(list_models())}")
        base = dict(_NAMED[name_or_cfg], name=name_or_cfg)
    elif isinstance(name_or_cfg, Mapping) or isinstance(name_or_cfg, ml_collections.ConfigDict):
        base = dict(name_or_cfg.items()) if isinstance(name_or_cfg, Mapping) else name_or_cfg.to_dict()
        for key in ("backbone", "head"):
            if key not in base:
                raise ValueError(f"a model config needs {key!r} (got keys {sorted(base)})")
    else:
        raise TypeError(f"model_config takes a model name or a mapping, got {type(name_or_cfg).__name__}")

    if "head" in overrides and overrides["head"] != base.get("head"):
        # Switching heads: the old head's options (and the model's name) do not apply any more.
        base = {k: v for k, v in base.items() if k in ("backbone", "trainable_stages", "image_size", "input_norm")}
    if "backbone" in overrides and overrides["backbone"] != base.get("backbone"):
        base.pop("trainable_stages", None)  # the default depends on the backbone
        base.pop("name", None)
        base.pop("input_norm", None)  # what the old backbone's weights expected
        base.pop("torch_layout", None)
    fields = {**base, **overrides}

    head = fields["head"]
    if head not in HEAD_OPTIONS:
        raise ValueError(f"unknown head {head!r}; valid heads: {', '.join(HEADS)}")
    _check_backbone(fields["backbone"])
    unknown = sorted(set(fields) - set(_valid_keys(head)))
    if unknown:
        raise ValueError(
            f"unknown model config key(s) {unknown} for head {head!r}; valid keys: {', '.join(_valid_keys(head))}"
        )
    family = backbone_family(fields["backbone"])
    if head in ("salad", "anyloc", "cls") and family != "dinov2":
        raise ValueError(f"head {head!r} needs a DINOv2 backbone, got {fields['backbone']!r}")
    if head == "cam_netvlad" and not (family == "alexnet" or (family == "resnet" and
                                                               resnet_spec(fields["backbone"])[0] in (18, 34))):
        raise ValueError(f"head 'cam_netvlad' needs a BasicBlock ResNet (resnet18/resnet34, AdAGeo's noBN "
                         f"ResNet-18) or alexnet, got {fields['backbone']!r}")
    if family == "dinov2" and head not in ("salad", "anyloc", "cls"):
        raise ValueError(f"DINOv2 backbones work with heads 'salad', 'anyloc' or 'cls', got {head!r}")
    if head == "anyloc":
        _check_anyloc(fields)
    _check_input_norm_and_layout(fields, head, family)

    out = {
        "name": fields.get("name") or f"{fields['backbone']}_{head}",
        "backbone": fields["backbone"],
        "head": head,
        "trainable_stages": fields.get(
            "trainable_stages", 0 if head == "anyloc" else default_trainable_stages(fields["backbone"])
        ),
        "image_size": tuple(fields["image_size"]) if fields.get("image_size") is not None else None,
        "input_norm": fields.get("input_norm", "imagenet"),  # checkpoints older than the field: ImageNet
        "torch_layout": fields.get("torch_layout"),
    }
    stages = num_backbone_stages(out["backbone"])
    if head == "anyloc":  # only blocks 0..layer run
        stages = fields.get("layer", HEAD_OPTIONS["anyloc"]["layer"]) + 1
    if out["trainable_stages"] is not None and not 0 <= out["trainable_stages"] <= stages:
        raise ValueError(
            f"trainable_stages={out['trainable_stages']} is outside [0, {stages}] for backbone "
            f"{out['backbone']!r} (None trains the whole backbone)"
        )
    for key, default in HEAD_OPTIONS[head].items():
        out[key] = fields.get(key, default)
    cfg = ml_collections.ConfigDict(out)
    return cfg


def _check_input_norm_and_layout(fields: Mapping[str, Any], head: str, family: str) -> None:
    input_norm = fields.get("input_norm", "imagenet")
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"unknown input_norm {input_norm!r}; valid: {', '.join(INPUT_NORMS)}")
    layout = fields.get("torch_layout")
    if layout is None:
        return
    if layout not in TORCH_LAYOUTS:
        raise ValueError(
            f"unknown torch_layout {layout!r}; valid: None (the head's anchor), {', '.join(TORCH_LAYOUTS)}"
        )
    heads, families = TORCH_LAYOUTS[layout]
    if head not in heads or family not in families:
        raise ValueError(
            f"torch_layout {layout!r} names head(s) {', '.join(heads)} on {', '.join(families)} backbones, "
            f"not head {head!r} on {fields['backbone']!r}; leave torch_layout=None for the head's own anchor"
        )


def _check_anyloc(fields: Mapping[str, Any]) -> None:
    from jaxvpr.models.dinov2 import FACETS

    depth = _DINOV2_ARCHS[dinov2_spec(fields["backbone"])[0]][1]
    layer = fields.get("layer", HEAD_OPTIONS["anyloc"]["layer"])
    if not isinstance(layer, int) or not 0 <= layer < depth:
        raise ValueError(f"anyloc: layer={layer!r} must be a block index in [0, {depth - 1}] for {fields['backbone']!r}")
    facet = fields.get("facet", HEAD_OPTIONS["anyloc"]["facet"])
    if facet not in FACETS:
        raise ValueError(f"anyloc: facet={facet!r} must be one of {', '.join(FACETS)}")


# --------------------------------------------------------------------------- composition


class VPRModel(nn.Module):
    """Backbone + aggregation head.

    Attributes:
      backbone: maps (B, H, W, 3) to an NHWC feature map, or -- for DINOv2 --
        to ``(patch_tokens_map (B, h, w, C), cls_token (B, C))``.
      head: maps the backbone output to (B, D) descriptors; ``None`` for the bare
        DINOv2 model whose descriptor is the class token.
      backbone_output: ``'map'`` (CNNs) or ``'tokens'`` (DINOv2).
      input_norm: a key of :data:`INPUT_NORMS`, see :func:`renormalize_input`.
    """

    backbone: nn.Module
    head: nn.Module | None
    backbone_output: str = "map"
    input_norm: str = "imagenet"

    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        """Descriptors (B, D) of ImageNet-normalised images; with ``return_features`` also the
        backbone map pooled to (B, C).

        The pooled features (global average over the feature map / patch tokens)
        are what a domain discriminator attached "before aggregation" sees (thesis §4.3).
        """
        x = renormalize_input(x, self.input_norm)
        if self.backbone_output == "map":
            feature_map = self.backbone(x, train=train)
            descriptors = self.head(feature_map, train=train)
        else:
            feature_map, cls_token = self.backbone(x, train=train)
            if self.head is None:
                descriptors = cls_token
            else:
                descriptors = self.head((feature_map, cls_token), train=train)
        if return_features:
            if isinstance(feature_map, tuple):  # (map, pre-BN map) of AdAGeo's ResNet: pool the map
                feature_map = feature_map[0]
            return descriptors, jnp.mean(feature_map, axis=(1, 2))
        return descriptors


def renormalize_input(x: jax.Array, input_norm: str) -> jax.Array:
    """ImageNet-normalised images -> the input a backbone trained with ``input_norm`` expects.

    ``imagenet``: unchanged. ``caffe``: back to RGB in [0, 1] (``x * IMAGENET_STD + IMAGENET_MEAN``),
    then ``255 * (rgb - mean)`` with the mean of :data:`INPUT_NORMS` -- OpenIBL's
    ``Normalize(mean, std=[1/255]*3)`` on the ``ToTensor`` image.
    """
    caffe_mean = INPUT_NORMS[input_norm]
    if caffe_mean is None:
        return x
    from jaxvpr.data.images import IMAGENET_MEAN, IMAGENET_STD

    rgb = x * jnp.asarray(IMAGENET_STD, x.dtype) + jnp.asarray(IMAGENET_MEAN, x.dtype)
    return (rgb - jnp.asarray(caffe_mean, x.dtype)) * 255.0


def build_model(cfg: ml_collections.ConfigDict | str | Mapping[str, Any]) -> VPRModel:
    """A :class:`VPRModel` for a config (a name or mapping is passed through :func:`model_config`)."""
    cfg = model_config(cfg)
    family = backbone_family(cfg.backbone)
    trainable = cfg.trainable_stages

    if family == "resnet":
        from jaxvpr.models.resnet import ResNet

        depth, num_layers = resnet_spec(cfg.backbone)
        backbone = ResNet(depth=depth, num_layers=num_layers, trainable_stages=trainable,
                          pre_bn_output=cfg.head == "cam_netvlad")
    elif family == "vgg":
        from jaxvpr.models.vgg import VGG16

        backbone = VGG16(trainable_stages=trainable)
    elif family == "alexnet":
        from jaxvpr.models.alexnet import AlexNet

        backbone = AlexNet(trainable_stages=trainable)
    else:
        dinov2 = _import_b2("jaxvpr.models.dinov2", cfg)
        arch, registers = dinov2_spec(cfg.backbone)
        facet = dict(facet=cfg.facet, facet_layer=cfg.layer) if cfg.head == "anyloc" else {}
        backbone = dinov2.DinoV2(
            arch=arch, num_register_tokens=registers, num_trainable_blocks=trainable, output="tokens", **facet
        )

    head = cfg.head
    if head == "gem":
        from jaxvpr.models.gem import GeMHead

        head_module = GeMHead(fc_output_dim=cfg.fc_output_dim, l2_before_pool=cfg.l2_before_pool, whiten=cfg.whiten)
    elif head == "netvlad":
        from jaxvpr.models.netvlad import NetVLAD

        head_module = NetVLAD(num_clusters=cfg.num_clusters, pca_dim=cfg.pca_dim)
    elif head == "mixvpr":
        from jaxvpr.models.mixvpr import MixVPR

        head_module = MixVPR(
            in_h=cfg.in_h, in_w=cfg.in_w, out_channels=cfg.out_channels,
            mix_depth=cfg.mix_depth, mlp_ratio=cfg.mlp_ratio, out_rows=cfg.out_rows,
        )
    elif head == "convap":
        from jaxvpr.models.convap import ConvAP

        head_module = ConvAP(out_channels=cfg.out_channels, s1=cfg.s1, s2=cfg.s2)
    elif head == "salad":
        salad = _import_b2("jaxvpr.models.salad", cfg)
        head_module = salad.Salad(
            num_channels=feature_dim(cfg), num_clusters=cfg.num_clusters,
            cluster_dim=cfg.cluster_dim, token_dim=cfg.token_dim, dropout=cfg.dropout,
        )
    elif head == "cam_netvlad":
        from jaxvpr.models.adageo import CamNetVLAD

        head_module = CamNetVLAD(num_clusters=cfg.num_clusters, num_classes=cfg.num_classes, attention=cfg.attention,
                                 shared_map=family == "alexnet")
    elif head == "anyloc":
        anyloc = _import_b2("jaxvpr.models.anyloc", cfg)
        head_module = anyloc.AnyLocVLAD(num_clusters=cfg.num_clusters, num_channels=feature_dim(cfg))
    else:
        head_module = None
    return VPRModel(
        backbone=backbone, head=head_module, backbone_output="tokens" if family == "dinov2" else "map",
        input_norm=cfg.input_norm,
    )


def _import_b2(module: str, cfg) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"model {cfg.name!r} needs {module}, which could not be imported: {err}") from err


def default_image_size(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
    """``cfg.image_size`` or 224x224 when the model takes any size."""
    return tuple(cfg.image_size) if cfg.image_size is not None else (224, 224)


def init_variables(
    cfg: ml_collections.ConfigDict | str,
    rng: jax.Array,
    image_size: tuple[int, int] | None = None,
    batch_size: int = 1,
) -> dict:
    """Fresh variables ``{'params', 'batch_stats'?}`` of a model (random init, eval-mode trace).

    ``image_size`` defaults to :func:`default_image_size`; it matters only for
    heads whose parameter shapes depend on the feature-map size (MixVPR).
    """
    cfg = cfg if isinstance(cfg, ml_collections.ConfigDict) else model_config(cfg)
    height, width = image_size or default_image_size(cfg)
    model = build_model(cfg)
    dummy = jnp.zeros((batch_size, height, width, 3), jnp.float32)
    init = jax.jit(lambda key, images: model.init(key, images, train=False))  # one compile, not op by op
    return dict(init(rng, dummy))


def variable_shapes(cfg: ml_collections.ConfigDict | str, image_size: tuple[int, int] | None = None) -> dict:
    """``jax.ShapeDtypeStruct`` pytree of :func:`init_variables` (traced once per config, no computation)."""
    cfg = model_config(cfg)
    key = json.dumps({**cfg.to_dict(), "_image_size": image_size}, sort_keys=True, default=list)
    return jax.tree_util.tree_map(lambda leaf: leaf, _variable_shapes_cached(key))  # fresh containers


@functools.lru_cache(maxsize=64)
def _variable_shapes_cached(key: str) -> dict:
    fields = json.loads(key)
    image_size = fields.pop("_image_size")
    cfg = model_config(fields)
    return jax.eval_shape(lambda rng: init_variables(cfg, rng, image_size), jax.random.key(0))


# --------------------------------------------------------------------------- freezing


def frozen_mask(cfg: ml_collections.ConfigDict | str, params: Mapping[str, Any]) -> Any:
    """Bool pytree shaped like ``params`` (the ``'params'`` collection): True = frozen.

    Frozen = parameters of backbone stages before the last ``cfg.trainable_stages``,
    and a head's fixed statistics (AP-GeM's PCA ``whitening``), whatever the policy.
    The forward pass already stops gradients in the backbone (so their gradients are zero);
    use this mask to keep the optimiser from touching them (e.g. weight decay), e.g.
    ``optax.masked(opt, jax.tree.map(lambda f: not f, mask))``.
    """
    cfg = cfg if isinstance(cfg, ml_collections.ConfigDict) else model_config(cfg)
    if "backbone" not in params:
        raise ValueError(
            f"frozen_mask expects the 'params' collection of a VPRModel (keys 'backbone', 'head'), got keys {sorted(params)}"
        )
    family = backbone_family(cfg.backbone)
    backbone_params = params["backbone"]
    trainable = cfg.trainable_stages
    if family == "resnet":
        from jaxvpr.models.resnet import resnet_frozen_mask

        backbone_mask = resnet_frozen_mask(backbone_params, resnet_spec(cfg.backbone)[1], trainable)
    elif family in ("vgg", "alexnet"):
        from jaxvpr.models.vgg import sequential_frozen_mask

        backbone_mask = sequential_frozen_mask(backbone_params, trainable)
    else:
        backbone_mask = _dinov2_frozen_mask(cfg, backbone_params)
    mask = {k: jax.tree_util.tree_map(lambda _: False, v) for k, v in params.items()}
    mask["backbone"] = backbone_mask
    if "whitening" in params.get("head", {}):  # learned offline on landmark descriptors, never trained here
        whitening = jax.tree_util.tree_map(lambda _: True, params["head"]["whitening"])
        mask["head"] = {**mask["head"], "whitening": whitening}
    return mask


def _dinov2_frozen_mask(cfg, backbone_params):
    dinov2 = _import_b2("jaxvpr.models.dinov2", cfg)
    return dinov2.dinov2_frozen_mask(backbone_params, cfg.trainable_stages)
