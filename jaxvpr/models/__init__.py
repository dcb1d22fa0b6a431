"""jaxvpr models: CNN/ViT backbones, aggregation heads, GRL and discriminator.

Start with :func:`model_config` / :func:`build_model`::

    cfg = model_config("cosplace_resnet18_512")
    model = build_model(cfg)
    variables = init_variables(cfg, jax.random.key(0))
    descriptors = model.apply(variables, images)            # (B, 512), unit norm

See :mod:`jaxvpr.models.registry` for the config fields (``trainable_stages``
controls freezing) and the list of named models.
"""

from jaxvpr.models.discriminator import DomainDiscriminator
from jaxvpr.models.grl import grad_reverse, grl_coefficient, grl_coefficient_at_step, grl_schedule
from jaxvpr.models.registry import (
    BACKBONES,
    HEADS,
    VPRModel,
    backbone_family,
    build_model,
    default_image_size,
    descriptor_dim,
    feature_dim,
    frozen_mask,
    init_variables,
    list_models,
    model_config,
    num_backbone_stages,
    variable_shapes,
)

__all__ = [
    "DomainDiscriminator",
    "grad_reverse",
    "grl_coefficient",
    "grl_coefficient_at_step",
    "grl_schedule",
    "BACKBONES",
    "HEADS",
    "VPRModel",
    "backbone_family",
    "build_model",
    "default_image_size",
    "descriptor_dim",
    "feature_dim",
    "frozen_mask",
    "init_variables",
    "list_models",
    "model_config",
    "num_backbone_stages",
    "variable_shapes",
]
