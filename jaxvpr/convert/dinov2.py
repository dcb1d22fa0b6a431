"""Name mapping between PyTorch DINOv2 / SALAD checkpoints and jaxvpr parameters.

Rules use the conversion framework's format (:mod:`jaxvpr.convert.rules`): a rule is
``(torch_name, flax_path, transform)`` with ``flax_path`` starting with the variable
collection (``'params'``) and ``transform`` one of ``"identity"``, ``"linear"`` (torch
``(out, in)`` <-> flax ``(in, out)``) or ``"conv"`` (torch OIHW <-> flax HWIO).

* :func:`dinov2_rules` covers every tensor of the official ``facebookresearch/dinov2``
  state dict (``cls_token``, ``pos_embed``, ``register_tokens``, ``mask_token``,
  ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``) for :class:`jaxvpr.models.dinov2.DinoV2`.
  The hub checkpoints are saved with ``block_chunks=0`` (flat ``blocks.N``), which is
  what the rules expect.
* :func:`salad_rules` covers SALAD's aggregator (``aggregator.*``); a full SALAD
  checkpoint is ``dinov2_rules(..., prefix="backbone.model.") + salad_rules()``.
* :func:`anyloc_rules` covers what an AnyLoc model uses of the hub DINOv2 state dict (blocks
  up to ``layer``, of block ``layer`` only ``norm1`` and ``attn.qkv`` for a q/k/v facet; no
  final ``norm``) plus the vocabulary as one tensor ``c_centers`` (K, C);
  :func:`unused_anyloc_tensors` names the hub tensors it leaves out.
* :func:`hf_dinov2_to_official` / :func:`official_to_hf_dinov2` translate the Hugging
  Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` naming (both the hub checkpoint
  names ``attention.attention.query`` / ``mlp.weights_in`` and the transformers>=5
  in-memory names ``attention.q_proj`` / ``mlp.gate_proj``) to and from the official
  one, splitting or concatenating the fused ``qkv`` and SwiGLU ``w12`` weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from jaxvpr.models.dinov2 import ViTConfig, resolve_arch

Rule = tuple[str, tuple[str, ...], str]


def _linear(torch_name: str, flax_path: tuple[str, ...]) -> list[Rule]:
    return [
        (f"{torch_name}.weight", (*flax_path, "kernel"), "linear"),
        (f"{torch_name}.bias", (*flax_path, "bias"), "identity"),
    ]


def _layer_norm(torch_name: str, flax_path: tuple[str, ...]) -> list[Rule]:
    return [
        (f"{torch_name}.weight", (*flax_path, "scale"), "identity"),
        (f"{torch_name}.bias", (*flax_path, "bias"), "identity"),
    ]


def _conv(torch_name: str, flax_path: tuple[str, ...]) -> list[Rule]:
    return [
        (f"{torch_name}.weight", (*flax_path, "kernel"), "conv"),
        (f"{torch_name}.bias", (*flax_path, "bias"), "identity"),
    ]


def dinov2_rules(
    arch: str | ViTConfig,
    num_register_tokens: int = 0,
    prefix: str = "",
    flax_prefix: tuple[str, ...] = (),
) -> list[Rule]:
    """Rules for every tensor of an official DINOv2 state dict (in the layout files' order).

    ``prefix`` is prepended to the torch names (``"backbone.model."`` inside SALAD);
    ``flax_prefix`` is the path of the DinoV2 module inside the flax parameter tree.
    """
    cfg = resolve_arch(arch)
    root = ("params", *flax_prefix)
    rules: list[Rule] = [
        (f"{prefix}cls_token", (*root, "cls_token"), "identity"),
        (f"{prefix}pos_embed", (*root, "pos_embed"), "identity"),
    ]
    if num_register_tokens:
        rules.append((f"{prefix}register_tokens", (*root, "register_tokens"), "identity"))
    rules.append((f"{prefix}mask_token", (*root, "mask_token"), "identity"))
    rules += _conv(f"{prefix}patch_embed.proj", (*root, "patch_embed", "proj"))
    ffn_layers = ("w12", "w3") if cfg.ffn == "swiglu" else ("fc1", "fc2")
    for i in range(cfg.depth):
        t, f = f"{prefix}blocks.{i}", (*root, f"blocks_{i}")
        rules += _layer_norm(f"{t}.norm1", (*f, "norm1"))
        rules += _linear(f"{t}.attn.qkv", (*f, "attn", "qkv"))
        rules += _linear(f"{t}.attn.proj", (*f, "attn", "proj"))
        rules.append((f"{t}.ls1.gamma", (*f, "ls1", "gamma"), "identity"))
        rules += _layer_norm(f"{t}.norm2", (*f, "norm2"))
        for layer in ffn_layers:
            rules += _linear(f"{t}.mlp.{layer}", (*f, "mlp", layer))
        rules.append((f"{t}.ls2.gamma", (*f, "ls2", "gamma"), "identity"))
    rules += _layer_norm(f"{prefix}norm", (*root, "norm"))
    return rules


ANYLOC_CENTRES = "c_centers"
"""PyTorch name of AnyLoc's vocabulary (``VLAD.c_centers`` of ``AnyLoc/DINO:utilities.py``; the
release files ``dinov2_vitg14_l31_value_c32_<domain>_c_centers.pt`` hold that bare tensor)."""


def anyloc_rules(
    arch: str | ViTConfig, num_register_tokens: int, layer: int, facet: str
) -> list[Rule]:
    """Rules of an AnyLoc model: the hub DINOv2 tensors it runs, then ``c_centers``.

    Blocks ``0..layer-1`` are complete; block ``layer`` keeps ``norm1`` and ``attn.qkv`` for
    a ``query``/``key``/``value`` facet (all of it for ``token``); later blocks and the final
    ``norm`` are not part of the model. The centres are the ``'vocabulary'`` variable
    ``head/centers``.
    """
    keep_in_last = (f"blocks.{layer}.norm1.", f"blocks.{layer}.attn.qkv.")

    def used(name: str) -> bool:
        match = re.match(r"^blocks\.(\d+)\.", name)
        if match is None:
            return name.split(".")[0] != "norm"
        block = int(match.group(1))
        if block == layer and facet != "token":
            return name.startswith(keep_in_last)
        return block <= layer

    rules = [r for r in dinov2_rules(arch, num_register_tokens, flax_prefix=("backbone",)) if used(r[0])]
    return rules + [(ANYLOC_CENTRES, ("vocabulary", "head", "centers"), "identity")]


def unused_anyloc_tensors(
    state_dict: Mapping[str, object], arch: str | ViTConfig, num_register_tokens: int, layer: int, facet: str
) -> list[str]:
    """Names in ``state_dict`` that belong to the hub DINOv2 layout but are not used by an AnyLoc
    model stopping at block ``layer`` (later blocks, the rest of block ``layer``, ``norm``)."""
    hub = {r[0] for r in dinov2_rules(arch, num_register_tokens)}
    used = {r[0] for r in anyloc_rules(arch, num_register_tokens, layer, facet)}
    return [name for name in state_dict if name in hub and name not in used]


def salad_rules(prefix: str = "aggregator.", flax_prefix: tuple[str, ...] = ()) -> list[Rule]:
    """Rules for SALAD's aggregator tensors (``dust_bin``, ``token_features``, ``cluster_features``, ``score``)."""
    root = ("params", *flax_prefix)
    rules: list[Rule] = [(f"{prefix}dust_bin", (*root, "dust_bin"), "identity")]
    for idx in (0, 2):
        rules += _linear(f"{prefix}token_features.{idx}", (*root, f"token_features_{idx}"))
    for head in ("cluster_features", "score"):
        for idx in (0, 3):
            rules += _conv(f"{prefix}{head}.{idx}", (*root, f"{head}_{idx}"))
    return rules


# --------------------------------------------------------------------------------------
# Hugging Face transformers naming <-> official naming
# --------------------------------------------------------------------------------------

_HF_GLOBAL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}

# Per-layer names that map one to one (HF suffix -> official suffix), both HF spellings.
_HF_LAYER_RENAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",  # hub checkpoints
    "attention.o_proj": "attn.proj",  # transformers >= 5
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",  # hub checkpoints (SwiGLU)
    "mlp.weights_out": "mlp.w3",
    "mlp.down_proj": "mlp.w3",  # transformers >= 5 (SwiGLU)
}

# Per-layer tensors concatenated along dim 0 into one official tensor: official name -> the
# HF parts in concatenation order, for each HF spelling.
_HF_FUSED_GROUPS = {
    "attn.qkv": [
        ("attention.attention.query", "attention.attention.key", "attention.attention.value"),  # hub
        ("attention.q_proj", "attention.k_proj", "attention.v_proj"),  # transformers >= 5
    ],
    "mlp.w12": [("mlp.gate_proj", "mlp.up_proj")],  # transformers >= 5 (SwiGLU)
}
_HF_FUSED_PART = {
    part: (official, group) for official, groups in _HF_FUSED_GROUPS.items() for group in groups for part in group
}

_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")


def is_hf_dinov2(state_dict: Mapping[str, object]) -> bool:
    """True if ``state_dict`` uses Hugging Face ``Dinov2Model`` names (``embeddings.*``, ``encoder.layer.*``)."""
    return any(k.startswith(("embeddings.patch_embeddings.", "encoder.layer.")) for k in state_dict)


def hf_dinov2_to_official(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename a Hugging Face DINOv2 state dict to the official ``facebookresearch/dinov2`` names.

    Accepts the hub checkpoint spelling (``encoder.layer.N.attention.attention.query``,
    ``attention.output.dense``, ``mlp.weights_in/out``) and the transformers>=5 one
    (``attention.q_proj/k_proj/v_proj/o_proj``, ``mlp.gate_proj/up_proj/down_proj``);
    ``layer_scale{1,2}.lambda1`` become ``ls{1,2}.gamma``. q, k, v (and gate, up) are
    concatenated along the output dimension into ``attn.qkv`` (``mlp.w12``), the
    official fused layout. Raises ``KeyError`` naming any tensor it does not know or any
    incomplete q/k/v group.
    """
    out: dict[str, np.ndarray] = {}
    pending: dict[tuple[str, tuple[str, ...]], dict[str, np.ndarray]] = {}
    unknown: list[str] = []
    for name, value in state_dict.items():
        if name in _HF_GLOBAL:
            out[_HF_GLOBAL[name]] = np.asarray(value)
            continue
        match = _HF_LAYER.match(name)
        if match is None:
            unknown.append(name)
            continue
        layer, module, kind = match.groups()
        block = f"blocks.{layer}"
        if kind == "lambda1":
            if module not in ("layer_scale1", "layer_scale2"):
                unknown.append(name)
                continue
            out[f"{block}.ls{module[-1]}.gamma"] = np.asarray(value)
        elif module in _HF_LAYER_RENAMES:
            out[f"{block}.{_HF_LAYER_RENAMES[module]}.{kind}"] = np.asarray(value)
        elif module in _HF_FUSED_PART:
            official, group = _HF_FUSED_PART[module]
            pending.setdefault((f"{block}.{official}.{kind}", group), {})[module] = np.asarray(value)
        else:
            unknown.append(name)
    if unknown:
        raise KeyError(f"hf_dinov2_to_official: tensors with unknown Hugging Face DINOv2 names: {unknown}")
    for (official_name, group), parts in pending.items():
        missing = [p for p in group if p not in parts]
        if missing:
            raise KeyError(
                f"hf_dinov2_to_official: {official_name} needs {list(group)} but {missing} are missing."
            )
        out[official_name] = np.concatenate([parts[p] for p in group], axis=0)
    return out


def official_to_hf_dinov2(state_dict: Mapping[str, np.ndarray], naming: str = "hub") -> dict[str, np.ndarray]:
    """Inverse of :func:`hf_dinov2_to_official`.

    ``naming="hub"`` writes the names of the checkpoints on the Hugging Face hub
    (``attention.attention.query``, ``mlp.weights_in``), which every transformers
    version loads; ``naming="transformers5"`` writes the in-memory names of
    transformers>=5 (``attention.q_proj``, ``mlp.gate_proj``), i.e. what
    ``Dinov2Model.state_dict()`` returns there.
    """
    if naming not in ("hub", "transformers5"):
        raise ValueError(f"naming must be 'hub' or 'transformers5', got {naming!r}.")
    hub = naming == "hub"
    global_names = {v: k for k, v in _HF_GLOBAL.items()}
    block_re = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$")
    out: dict[str, np.ndarray] = {}
    for name, value in state_dict.items():
        value = np.asarray(value)
        if name in global_names:
            out[global_names[name]] = value
            continue
        match = block_re.match(name)
        if match is None:
            raise KeyError(f"official_to_hf_dinov2: unknown official DINOv2 tensor {name!r}")
        layer, module, kind = match.groups()
        base = f"encoder.layer.{layer}"
        if kind == "gamma" and module in ("ls1", "ls2"):
            out[f"{base}.layer_scale{module[-1]}.lambda1"] = value
        elif module == "attn.qkv":
            names = _HF_FUSED_GROUPS["attn.qkv"][0 if hub else 1]
            for part, chunk in zip(names, np.split(value, 3, axis=0)):
                out[f"{base}.{part}.{kind}"] = chunk
        elif module == "attn.proj":
            out[f"{base}.{'attention.output.dense' if hub else 'attention.o_proj'}.{kind}"] = value
        elif module == "mlp.w12":
            if hub:
                out[f"{base}.mlp.weights_in.{kind}"] = value
            else:
                gate, up = np.split(value, 2, axis=0)
                out[f"{base}.mlp.gate_proj.{kind}"] = gate
                out[f"{base}.mlp.up_proj.{kind}"] = up
        elif module == "mlp.w3":
            out[f"{base}.{'mlp.weights_out' if hub else 'mlp.down_proj'}.{kind}"] = value
        elif module in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            out[f"{base}.{module}.{kind}"] = value
        else:
            raise KeyError(f"official_to_hf_dinov2: unknown official DINOv2 tensor {name!r}")
    return out
