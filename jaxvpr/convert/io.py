"""Read and write PyTorch-style state dicts as ``{name: numpy array}``.

Formats: ``.pth``/``.pt``/``.bin`` (``torch.save``), Lightning ``.ckpt`` (its
``'state_dict'``), and ``.safetensors`` (read/written with ``safetensors.numpy``;
no torch needed). Pickle-based files are opened with
``torch.load(weights_only=True)``, which refuses arbitrary Python objects: a
checkpoint that needs them is rejected with :class:`CheckpointFormatError` rather
than unpickled. Torch is optional (``pip install jaxvpr[torch]``).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

_PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".tar")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


class CheckpointFormatError(ValueError):
    """A checkpoint file could not be read as a state dict (wrong format or unsafe content)."""


def require_torch():
    """Import torch or explain how to get it."""
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            "reading/writing .pth/.pt/.ckpt checkpoints needs PyTorch: pip install 'jaxvpr[torch]' "
            "(or convert the file to .safetensors, which needs no torch)"
        ) from err
    return torch


def _is_tensor_dict(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    torch = require_torch()
    return all(isinstance(v, torch.Tensor) for v in obj.values())


def _tensor_to_numpy(name: str, tensor) -> np.ndarray:
    torch = require_torch()
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.to(torch.float32)  # numpy has no bfloat16; float32 holds it exactly
    return tensor.numpy()


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove the ``module.`` prefix ``nn.DataParallel``/DDP add to every name."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict stored in ``path`` as numpy arrays (names without ``module.``).

    Accepts a bare state dict, or a dict wrapping it under ``'state_dict'``
    (Lightning ``.ckpt``), ``'model_state_dict'`` or ``'model'``.

    Raises:
      FileNotFoundError: no such file.
      CheckpointFormatError: unknown suffix, unsafe pickle, or no state dict inside.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        return strip_module_prefix(load_file(path))
    if suffix not in _PICKLE_SUFFIXES:
        raise CheckpointFormatError(
            f"{path}: unknown checkpoint suffix {suffix!r}; expected .safetensors or one of {', '.join(_PICKLE_SUFFIXES)}"
        )
    torch = require_torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError (or RuntimeError for corrupt zips)
        raise CheckpointFormatError(
            f"{path}: could not be loaded with torch.load(weights_only=True): {err}\n"
            "jaxvpr never unpickles arbitrary objects. If the file stores a whole pickled model, "
            "re-save only its weights in PyTorch: torch.save(model.state_dict(), 'weights.pth')."
        ) from err
    state = obj
    if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        for key in _WRAPPER_KEYS:
            if key in obj and _is_tensor_dict(obj[key]):
                state = obj[key]
                break
        else:
            raise CheckpointFormatError(
                f"{path}: holds a dict with keys {sorted(obj)[:10]} but no state dict "
                f"(a tensor dict, possibly under one of {_WRAPPER_KEYS})"
            )
    if not _is_tensor_dict(state):
        raise CheckpointFormatError(f"{path}: does not contain a state dict (got {type(obj).__name__})")
    return strip_module_prefix({name: _tensor_to_numpy(name, t) for name, t in state.items()})


def write_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Save ``{name: array}`` as ``.safetensors`` or as a ``torch.save`` file (``.pth``/``.pt``)."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    arrays = {k: np.asarray(v, order="C") for k, v in state_dict.items()}  # (ascontiguousarray makes 0-d 1-d)
    if suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, path)
        return
    if suffix not in (".pth", ".pt"):
        raise CheckpointFormatError(f"{path}: can only write .safetensors, .pth or .pt, not {suffix!r}")
    torch = require_torch()
    # torch tensors own writable memory: copy read-only arrays (e.g. views of restored checkpoints).
    torch.save({k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in arrays.items()}, path)
