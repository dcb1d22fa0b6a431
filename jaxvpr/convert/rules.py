"""PyTorch state dict <-> jaxvpr variables, driven by per-tensor rules.

A :class:`Rule` ``(torch_name, flax_path, transform)`` says that the PyTorch
tensor ``torch_name`` is the flax variable at ``flax_path`` (its first element is
the collection, ``'params'`` or ``'batch_stats'``) after ``transform``:

=============  ===========================================  =========================
transform      PyTorch                                      flax
=============  ===========================================  =========================
``identity``   any                                          same array
``linear``     ``nn.Linear.weight`` (out, in)               ``Dense.kernel`` (in, out)
``conv``       ``nn.Conv2d.weight`` (O, I, H, W)            ``Conv.kernel`` (H, W, I, O)
``count``      ``num_batches_tracked``: int64 scalar        int32 scalar
=============  ===========================================  =========================

The rules of a model come from :func:`torch_rules` (CNNs in
:mod:`jaxvpr.convert.cnn`, DINOv2/SALAD in :mod:`jaxvpr.convert.dinov2`). Both
directions check the whole checkpoint at once and raise one
:class:`CheckpointMismatchError` naming every missing, unexpected or mis-shaped
tensor. ``torch -> jax -> torch`` is bit-exact (float32 weights, int64 counters).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import numpy as np


class Rule(NamedTuple):
    """One PyTorch tensor <-> one flax variable."""

    torch_name: str
    flax_path: tuple[str, ...]
    transform: str


class CheckpointMismatchError(ValueError):
    """A state dict or variables tree does not fit the model's layout (lists every problem)."""


class _Transform(NamedTuple):
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # from the flax shape


def _linear_shape(shape):
    if len(shape) != 2:
        raise ValueError(f"'linear' transform needs a 2-d kernel, got shape {shape}")
    return (shape[1], shape[0])


def _conv_shape(shape):
    if len(shape) != 4:
        raise ValueError(f"'conv' transform needs a 4-d kernel, got shape {shape}")
    h, w, i, o = shape
    return (o, i, h, w)


TRANSFORMS: dict[str, _Transform] = {
    "identity": _Transform(lambda a: a, lambda a: a, lambda s: tuple(s)),
    "linear": _Transform(lambda a: np.ascontiguousarray(a.T), lambda a: np.ascontiguousarray(a.T), _linear_shape),
    "conv": _Transform(
        lambda a: np.ascontiguousarray(np.transpose(a, (2, 3, 1, 0))),
        lambda a: np.ascontiguousarray(np.transpose(a, (3, 2, 0, 1))),
        _conv_shape,
    ),
    "count": _Transform(
        lambda a: np.asarray(a, dtype=np.int32),
        lambda a: np.asarray(a, dtype=np.int64),
        lambda s: tuple(s),
    ),
}


# --------------------------------------------------------------------------- rules of a model


def torch_rules(model_cfg) -> list[Rule]:
    """All rules of a model: every tensor of its PyTorch state dict, in the anchor's order.

    CNN backbones and their heads: :func:`jaxvpr.convert.cnn.cnn_rules`.
    DINOv2 backbones (the bare hub model, or SALAD's ``backbone.model.``) and the
    SALAD head (``aggregator.``): :func:`jaxvpr.convert.dinov2.dinov2_rules` /
    :func:`~jaxvpr.convert.dinov2.salad_rules`, rooted at ``backbone``/``head``
    of :class:`~jaxvpr.models.VPRModel`; AnyLoc: :func:`~jaxvpr.convert.dinov2.anyloc_rules`
    (hub names of the blocks it runs, plus ``c_centers``).
    """
    from jaxvpr.models.registry import backbone_family, dinov2_spec, model_config

    cfg = model_config(model_cfg)
    if backbone_family(cfg.backbone) != "dinov2":
        from jaxvpr.convert.cnn import cnn_rules

        return cnn_rules(cfg)

    from jaxvpr.convert import dinov2 as dinov2_conv

    arch, registers = dinov2_spec(cfg.backbone)
    if cfg.head == "cls":
        return _as_rules(dinov2_conv.dinov2_rules(arch, registers, prefix="", flax_prefix=("backbone",)))
    if cfg.head == "salad":
        return _as_rules(
            dinov2_conv.dinov2_rules(arch, registers, prefix="backbone.model.", flax_prefix=("backbone",))
            + dinov2_conv.salad_rules(prefix="aggregator.", flax_prefix=("head",))
        )
    if cfg.head == "anyloc":
        return _as_rules(dinov2_conv.anyloc_rules(arch, registers, cfg.layer, cfg.facet))
    raise ValueError(f"no PyTorch layout for DINOv2 with head {cfg.head!r}")


def _as_rules(rules) -> list[Rule]:
    return [Rule(name, tuple(path), transform) for name, path, transform in rules]


# --------------------------------------------------------------------------- conversion


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def apply_rules(state_dict: Mapping[str, Any], rules: list[Rule]) -> dict:
    """Low-level: build a variables tree from ``state_dict`` with ``rules`` (no layout checks).

    Every rule's tensor must be present. Useful for a sub-module (e.g. one head) whose
    rules you built yourself; whole models go through :func:`torch_to_variables`.
    """
    return _unflatten(
        {r.flax_path: TRANSFORMS[r.transform].to_flax(np.asarray(state_dict[r.torch_name])) for r in rules}
    )


def export_rules(variables: Mapping[str, Any], rules: list[Rule]) -> dict[str, np.ndarray]:
    """Low-level inverse of :func:`apply_rules`: a state dict from ``variables`` (no layout checks)."""
    flat = _flatten(variables)
    return {r.torch_name: TRANSFORMS[r.transform].to_torch(np.asarray(flat[r.flax_path])) for r in rules}


def _check_rules(rules: list[Rule], flax_shapes: Mapping[tuple[str, ...], Any], model_name: str) -> None:
    """Rules and the model's variables must correspond one to one (a bug in the rules otherwise)."""
    seen = {}
    problems = []
    for rule in rules:
        if rule.transform not in TRANSFORMS:
            problems.append(f"{rule.torch_name}: unknown transform {rule.transform!r} (known: {sorted(TRANSFORMS)})")
        if rule.flax_path in seen:
            problems.append(f"{rule.torch_name} and {seen[rule.flax_path]} both map to {'/'.join(rule.flax_path)}")
        seen[rule.flax_path] = rule.torch_name
        if rule.flax_path not in flax_shapes:
            problems.append(f"{rule.torch_name}: the model has no variable {'/'.join(rule.flax_path)}")
    for path in flax_shapes:
        if path not in seen:
            problems.append(f"model variable {'/'.join(path)} has no PyTorch counterpart in the rules")
    if problems:
        raise CheckpointMismatchError(
            f"conversion rules of model {model_name!r} do not match its variables (a jaxvpr bug):\n  "
            + "\n  ".join(problems)
        )


def expected_torch_shapes(model_cfg) -> dict[str, tuple[int, ...]]:
    """``{torch_name: shape}`` of the PyTorch state dict of a model, in rule order."""
    from jaxvpr.models.registry import model_config, variable_shapes

    cfg = model_config(model_cfg)
    rules = torch_rules(cfg)
    flax_shapes = _flatten(variable_shapes(cfg))
    _check_rules(rules, flax_shapes, cfg.name)
    return {r.torch_name: TRANSFORMS[r.transform].torch_shape(tuple(flax_shapes[r.flax_path].shape)) for r in rules}


def torch_to_variables(state_dict: Mapping[str, Any], model_cfg, strict: bool = True) -> dict:
    """A PyTorch state dict (name -> numpy array) as jaxvpr variables ``{'params', 'batch_stats'?}``.

    Args:
      state_dict: tensors as numpy arrays (see :func:`jaxvpr.convert.io.read_state_dict`).
      model_cfg: a model name or config (:func:`jaxvpr.models.model_config`).
      strict: if False, tensors the model does not use are ignored instead of reported.

    Raises:
      CheckpointMismatchError: listing all missing, unexpected and mis-shaped tensors.
    """
    from jaxvpr.models.registry import model_config, variable_shapes

    cfg = model_config(model_cfg)
    rules = torch_rules(cfg)
    flax_shapes = _flatten(variable_shapes(cfg))
    _check_rules(rules, flax_shapes, cfg.name)

    missing, misshaped = [], []
    flat = {}
    for rule in rules:
        transform = TRANSFORMS[rule.transform]
        target = flax_shapes[rule.flax_path]
        want = transform.torch_shape(tuple(target.shape))
        if rule.torch_name not in state_dict:
            missing.append(f"{rule.torch_name} (expected shape {list(want)})")
            continue
        array = np.asarray(state_dict[rule.torch_name])
        if tuple(array.shape) != want:
            misshaped.append(f"{rule.torch_name}: checkpoint has {list(array.shape)}, model expects {list(want)}")
            continue
        value = transform.to_flax(array)
        if rule.transform != "count":
            value = value.astype(target.dtype, copy=False)
        flat[rule.flax_path] = value
    known = {r.torch_name for r in rules}
    unexpected = [name for name in state_dict if name not in known] if strict else []
    _raise_if_problems(cfg.name, missing, unexpected, misshaped)
    return _unflatten(flat)


def variables_to_torch(variables: Mapping[str, Any], model_cfg) -> dict[str, np.ndarray]:
    """jaxvpr variables as a PyTorch state dict ``{name: numpy array}`` in the anchor's order.

    The arrays have the dtypes PyTorch expects (float32 weights, int64
    ``num_batches_tracked``); turn them into tensors with ``torch.from_numpy`` or
    :func:`jaxvpr.convert.io.write_state_dict`.
    """
    from jaxvpr.models.registry import model_config, variable_shapes

    cfg = model_config(model_cfg)
    rules = torch_rules(cfg)
    flax_shapes = _flatten(variable_shapes(cfg))
    _check_rules(rules, flax_shapes, cfg.name)
    flat = _flatten(variables)

    missing, misshaped = [], []
    out: dict[str, np.ndarray] = {}
    for rule in rules:
        want = tuple(flax_shapes[rule.flax_path].shape)
        if rule.flax_path not in flat:
            missing.append(f"{'/'.join(rule.flax_path)} (for {rule.torch_name}, expected shape {list(want)})")
            continue
        array = np.asarray(flat[rule.flax_path])
        if want != tuple(array.shape):
            misshaped.append(f"{'/'.join(rule.flax_path)}: variables have {list(array.shape)}, model expects {list(want)}")
            continue
        out[rule.torch_name] = TRANSFORMS[rule.transform].to_torch(array)
    unexpected = ["/".join(p) for p in flat if p not in flax_shapes]
    _raise_if_problems(cfg.name, missing, unexpected, misshaped, what="variables")
    return out


def _raise_if_problems(model_name, missing, unexpected, misshaped, what="checkpoint") -> None:
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{what} does not match model {model_name!r}:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines.extend(f"    {item}" for item in items)
    hint = (
        "Check that the model name/config matches the checkpoint (e.g. backbone depth, "
        "fc_output_dim, num_clusters, image_size for MixVPR)."
    )
    if what == "checkpoint" and any(item.startswith("whitening.") for item in missing):
        hint += (
            "\nThe whitening of an AP-GeM model is not in the PyTorch state dict: pass it as an .npz "
            "(`python -m jaxvpr.convert from-torch ... --whitening FILE.npz`; the export snippet is in "
            "jaxvpr/convert/cnn.py), or convert without it (--no-whitening, config whiten=False)."
        )
    raise CheckpointMismatchError("\n".join(lines) + "\n" + hint)
