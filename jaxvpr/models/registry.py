"""Model registry: named published models, free composition, and ``VPRModel``.

A model is described by an ``ml_collections.ConfigDict`` (see :func:`model_config`):

=====================  ===============================================================
field                  meaning
=====================  ===============================================================
``name``               registry name (free compositions get ``"<backbone>_<head>"``)
``backbone``           one of :data:`BACKBONES` (``resnet18``, ``resnet50conv4``,
                       ``vgg16``, ``alexnet``, ``dinov2_vitb14``, ``dinov2_vitb14_reg``...)
``head``               one of :data:`HEADS`: ``gem``, ``netvlad``, ``mixvpr``,
                       ``convap``, ``salad``, ``cls`` (DINOv2 class token)
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
head options           gem: ``fc_output_dim``; netvlad: ``num_clusters``;
                       mixvpr: ``out_channels, mix_depth, mlp_ratio, out_rows, in_h,
                       in_w``; convap: ``out_channels, s1, s2``; salad:
                       ``num_clusters, cluster_dim, token_dim, dropout``.
=====================  ===============================================================

:class:`VPRModel` = backbone + head. Inputs are NHWC float32 ImageNet-normalised
images; outputs are L2-normalised descriptors (B, D) -- except a bare ``dinov2_*``
model (head ``cls``), whose descriptor is the official forward's output, the class
token after the final LayerNorm, *not* L2-normalised (normalise it yourself if you
retrieve with it). Variables: ``{'params', 'batch_stats'}`` (no ``batch_stats`` for
DINOv2-based models).

PyTorch naming (for :mod:`jaxvpr.convert`) follows the head's anchor: ``gem`` and
``netvlad`` use CosPlace / VG-benchmark names (``backbone.<index>``,
``aggregation.*``), ``mixvpr``/``convap`` MixVPR's (``backbone.model.<attr>``,
``aggregator.*``), ``salad`` SALAD's, ``cls`` the DINOv2 hub model's.
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
    "gem": {"fc_output_dim": 512},
    "netvlad": {"num_clusters": 64},
    "mixvpr": {"out_channels": 1024, "mix_depth": 4, "mlp_ratio": 1, "out_rows": 4, "in_h": 20, "in_w": 20},
    "convap": {"out_channels": 512, "s1": 2, "s2": 2},
    "salad": {"num_clusters": 64, "cluster_dim": 128, "token_dim": 256, "dropout": 0.0},
    "cls": {},
}
HEADS: tuple[str, ...] = tuple(HEAD_OPTIONS)
COMMON_KEYS: tuple[str, ...] = ("name", "backbone", "head", "trainable_stages", "image_size")


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
    if head == "netvlad":
        return cfg.num_clusters * feature_dim(cfg)
    if head == "mixvpr":
        return cfg.out_channels * cfg.out_rows
    if head == "convap":
        return cfg.out_channels * cfg.s1 * cfg.s2
    if head == "salad":
        return cfg.num_clusters * cfg.cluster_dim + cfg.token_dim
    return feature_dim(cfg)


# --------------------------------------------------------------------------- named models

_NAMED: dict[str, dict[str, Any]] = {
    # CosPlace (Berton et al., CVPR 2022) torch.hub models.
    "cosplace_resnet18_512": dict(backbone="resnet18", head="gem", fc_output_dim=512),
    "cosplace_resnet50_2048": dict(backbone="resnet50", head="gem", fc_output_dim=2048),
    "cosplace_vgg16_512": dict(backbone="vgg16", head="gem", fc_output_dim=512),
    # EigenPlaces (Berton et al., ICCV 2023): same network as CosPlace.
    "eigenplaces_resnet50_2048": dict(backbone="resnet50", head="gem", fc_output_dim=2048),
    # VG benchmark (Berton et al., CVPR 2022) ResNet-18 cropped after layer3 + NetVLAD-64.
    "netvlad_resnet18conv4_64": dict(backbone="resnet18conv4", head="netvlad", num_clusters=64),
    # MixVPR (Ali-bey et al., WACV 2023): ResNet-50 up to layer3, 320x320 input, 4096-d.
    "mixvpr_resnet50_4096": dict(
        backbone="resnet50conv4", head="mixvpr", image_size=(320, 320),
        out_channels=1024, mix_depth=4, mlp_ratio=1, out_rows=4, in_h=20, in_w=20,
    ),
    # DINOv2 (Oquab et al., 2023) torch.hub backbones; descriptor = class token.
    "dinov2_vits14": dict(backbone="dinov2_vits14", head="cls"),
    "dinov2_vitb14": dict(backbone="dinov2_vitb14", head="cls"),
    "dinov2_vitb14_reg": dict(backbone="dinov2_vitb14_reg", head="cls"),
    "dinov2_vitl14": dict(backbone="dinov2_vitl14", head="cls"),
    "dinov2_vitg14": dict(backbone="dinov2_vitg14", head="cls"),
    # SALAD (Izquierdo & Civera, CVPR 2024): DINOv2 ViT-B/14 + optimal-transport head, 8448-d.
    "salad_dinov2_vitb14": dict(
        backbone="dinov2_vitb14", head="salad", image_size=(322, 322),
        num_clusters=64, cluster_dim=128, token_dim=256, dropout=0.0,
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
        base = {k: v for k, v in base.items() if k in ("backbone", "trainable_stages", "image_size")}
    if "backbone" in overrides and overrides["backbone"] != base.get("backbone"):
        base.pop("trainable_stages", None)  # the default depends on the backbone
        base.pop("name", None)
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
    if head in ("salad", "cls") and family != "dinov2":
        raise ValueError(f"head {head!r} needs a DINOv2 backbone, got {fields['backbone']!r}")
    if family == "dinov2" and head not in ("salad", "cls"):
        raise ValueError(f"DINOv2 backbones work with heads 'salad' or 'cls', got {head!r}")

    out = {
        "name": fields.get("name") or f"{fields['backbone']}_{head}",
        "backbone": fields["backbone"],
        "head": head,
        "trainable_stages": fields.get("trainable_stages", default_trainable_stages(fields["backbone"])),
        "image_size": tuple(fields["image_size"]) if fields.get("image_size") is not None else None,
    }
    stages = num_backbone_stages(out["backbone"])
    if out["trainable_stages"] is not None and not 0 <= out["trainable_stages"] <= stages:
        raise ValueError(
            f"trainable_stages={out['trainable_stages']} is outside [0, {stages}] for backbone "
            f"{out['backbone']!r} (None trains the whole backbone)"
        )
    for key, default in HEAD_OPTIONS[head].items():
        out[key] = fields.get(key, default)
    cfg = ml_collections.ConfigDict(out)
    return cfg


# --------------------------------------------------------------------------- composition


class VPRModel(nn.Module):
    """Backbone + aggregation head.

    Attributes:
      backbone: maps (B, H, W, 3) to an NHWC feature map, or -- for DINOv2 --
        to ``(patch_tokens_map (B, h, w, C), cls_token (B, C))``.
      head: maps the backbone output to (B, D) descriptors; ``None`` for the bare
        DINOv2 model whose descriptor is the class token.
      backbone_output: ``'map'`` (CNNs) or ``'tokens'`` (DINOv2).
    """

    backbone: nn.Module
    head: nn.Module | None
    backbone_output: str = "map"

    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        """Descriptors (B, D); with ``return_features`` also the backbone map pooled to (B, C).

        The pooled features (global average over the feature map / patch tokens)
        are what a domain discriminator attached "before aggregation" sees (thesis §4.3).
        """
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
            return descriptors, jnp.mean(feature_map, axis=(1, 2))
        return descriptors


def build_model(cfg: ml_collections.ConfigDict | str | Mapping[str, Any]) -> VPRModel:
    """A :class:`VPRModel` for a config (a name or mapping is passed through :func:`model_config`)."""
    cfg = model_config(cfg)
    family = backbone_family(cfg.backbone)
    trainable = cfg.trainable_stages

    if family == "resnet":
        from jaxvpr.models.resnet import ResNet

        depth, num_layers = resnet_spec(cfg.backbone)
        backbone = ResNet(depth=depth, num_layers=num_layers, trainable_stages=trainable)
    elif family == "vgg":
        from jaxvpr.models.vgg import VGG16

        backbone = VGG16(trainable_stages=trainable)
    elif family == "alexnet":
        from jaxvpr.models.alexnet import AlexNet

        backbone = AlexNet(trainable_stages=trainable)
    else:
        dinov2 = _import_b2("jaxvpr.models.dinov2", cfg)
        arch, registers = dinov2_spec(cfg.backbone)
        backbone = dinov2.DinoV2(
            arch=arch, num_register_tokens=registers, num_trainable_blocks=trainable, output="tokens"
        )

    head = cfg.head
    if head == "gem":
        from jaxvpr.models.gem import GeMHead

        head_module = GeMHead(fc_output_dim=cfg.fc_output_dim)
    elif head == "netvlad":
        from jaxvpr.models.netvlad import NetVLAD

        head_module = NetVLAD(num_clusters=cfg.num_clusters)
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
    else:
        head_module = None
    return VPRModel(backbone=backbone, head=head_module, backbone_output="tokens" if family == "dinov2" else "map")


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

    Frozen = parameters of backbone stages before the last ``cfg.trainable_stages``.
    The forward pass already stops gradients there (so their gradients are zero);
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
    return mask


def _dinov2_frozen_mask(cfg, backbone_params):
    dinov2 = _import_b2("jaxvpr.models.dinov2", cfg)
    return dinov2.dinov2_frozen_mask(backbone_params, cfg.trainable_stages)
