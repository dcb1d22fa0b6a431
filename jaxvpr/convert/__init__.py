"""PyTorch <-> jaxvpr weight conversion.

    from jaxvpr.convert import read_state_dict, torch_to_variables, variables_to_torch
    variables = torch_to_variables(read_state_dict("cosplace_r18_512.pth"), "cosplace_resnet18_512")
    state_dict = variables_to_torch(variables, "cosplace_resnet18_512")   # {name: np.ndarray}

Rules per model family: :mod:`jaxvpr.convert.cnn` (ResNet/VGG/AlexNet + GeM,
NetVLAD, MixVPR, Conv-AP) and :mod:`jaxvpr.convert.dinov2` (DINOv2, SALAD).
"""

from jaxvpr.convert.io import CheckpointFormatError, read_state_dict, strip_module_prefix, write_state_dict
from jaxvpr.convert.rules import (
    TRANSFORMS,
    CheckpointMismatchError,
    Rule,
    apply_rules,
    expected_torch_shapes,
    export_rules,
    torch_rules,
    torch_to_variables,
    variables_to_torch,
)

__all__ = [
    "TRANSFORMS",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "Rule",
    "apply_rules",
    "expected_torch_shapes",
    "export_rules",
    "read_state_dict",
    "strip_module_prefix",
    "torch_rules",
    "torch_to_variables",
    "variables_to_torch",
    "write_state_dict",
]
