"""Convert weights between PyTorch checkpoints and jaxvpr checkpoints.

    python -m jaxvpr.convert from-torch --model cosplace_resnet18_512 --weights resnet18_512.pth --out ckpt/cosplace_r18
    python -m jaxvpr.convert from-torch --model dinov2_vitb14 --weights model.safetensors --out ckpt/dinov2_b  # HF names too
    python -m jaxvpr.convert from-torch --model cosplace_resnet18_512 --weights resnet18-f37072fd.pth \
        --imagenet --out ckpt/r18_imagenet     # torchvision ImageNet backbone, randomly initialised head
    python -m jaxvpr.convert to-torch --checkpoint ckpt/cosplace_r18 --out resnet18_512.pth   # or .safetensors

``from-torch`` reads ``.pth``/``.pt`` (``torch.load(weights_only=True)``: no arbitrary unpickling),
Lightning ``.ckpt`` (its ``state_dict``) and ``.safetensors``, maps every tensor of the model's
published layout (an error lists missing, unexpected and mis-shaped tensors by name) and writes a
jaxvpr checkpoint that ``jaxvpr.evaluate --checkpoint``, ``jaxvpr.extract`` and training's
``model.init_checkpoint`` load. ``to-torch`` writes the plain state dict of the model's anchor
(loadable with ``strict=True``); ``--checkpoint`` may also be a training workdir (its best model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def torchvision_backbone(state_dict: dict[str, np.ndarray], model_cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """A torchvision ImageNet classifier's tensors placed in the model's layout; head tensors random.

    torchvision names (``conv1``, ``bn1``, ``layerK``, ``features.N``) are matched to the layout's
    ``backbone.N`` (CosPlace/VG sequential crops: conv1=0, bn1=1, layer1..4=4..7; VGG/AlexNet
    ``features.N`` = ``backbone.N``) or ``backbone.model.<name>`` (MixVPR); the classifier (``fc``,
    ``classifier``) and layers the crop drops are ignored. Every backbone tensor must be found.
    """
    import jax

    from jaxvpr.convert.rules import CheckpointMismatchError, expected_torch_shapes, variables_to_torch
    from jaxvpr.models import init_variables

    expected = expected_torch_shapes(model_cfg)
    sequential = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    placed: dict[str, np.ndarray] = {}
    for name, array in state_dict.items():
        first, _, rest = name.partition(".")
        candidates = [f"backbone.model.{name}"]
        if first in sequential:
            candidates.append(f"backbone.{sequential[first]}.{rest}")
        if first == "features":
            candidates.append(f"backbone.{rest}")
        for c in candidates:
            if c in expected:
                placed[c] = np.asarray(array)
    backbone_names = [n for n in expected if n.startswith("backbone.")]
    missing = [n for n in backbone_names if n not in placed]
    if missing:
        raise CheckpointMismatchError(
            f"{len(missing)} backbone tensors of {model_cfg.name!r} are not in the torchvision checkpoint: "
            + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    random_head = variables_to_torch(init_variables(model_cfg, jax.random.key(seed)), model_cfg)
    return {n: placed.get(n, random_head[n]) for n in expected}


def from_torch(args) -> int:
    from jaxvpr.checkpoint import save_model
    from jaxvpr.convert import read_state_dict, torch_to_variables
    from jaxvpr.convert.dinov2 import hf_dinov2_to_official, is_hf_dinov2
    from jaxvpr.models import model_config

    cfg = model_config(args.model)
    state_dict = read_state_dict(args.weights)
    source = "pytorch"
    if cfg.backbone.startswith("dinov2") and cfg.head == "cls" and is_hf_dinov2(state_dict):
        state_dict, source = hf_dinov2_to_official(state_dict), "hf-transformers"
    if args.imagenet:
        state_dict, source = torchvision_backbone(state_dict, cfg, args.seed), "torchvision-imagenet"
    variables = torch_to_variables(state_dict, cfg)
    save_model(args.out, cfg, variables, meta={"source": source, "weights": str(Path(args.weights).absolute())})
    n = sum(int(np.prod(np.shape(v))) for v in state_dict.values())
    print(f"{args.model}: {len(state_dict)} tensors ({n:,} values, {source} layout) -> {args.out}")
    return 0


def to_torch(args) -> int:
    from jaxvpr.checkpoint import load_model
    from jaxvpr.convert import variables_to_torch, write_state_dict

    cfg, variables = load_model(args.checkpoint)
    state_dict = variables_to_torch(variables, cfg)
    write_state_dict(state_dict, args.out)
    print(f"{cfg.name}: {len(state_dict)} tensors -> {args.out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxvpr.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("from-torch", help="PyTorch weights -> jaxvpr checkpoint")
    p.add_argument("--model", required=True, help="model name (python -m jaxvpr.evaluate --list-models)")
    p.add_argument("--weights", required=True, help=".pth/.pt, Lightning .ckpt or .safetensors")
    p.add_argument("--out", required=True, help="output checkpoint folder (must not hold step 0 already)")
    p.add_argument("--imagenet", action="store_true",
                   help="weights are a torchvision ImageNet classifier: take its backbone, random head")
    p.add_argument("--seed", type=int, default=0, help="seed of the random head with --imagenet")
    p.set_defaults(func=from_torch)
    p = sub.add_parser("to-torch", help="jaxvpr checkpoint -> PyTorch state dict")
    p.add_argument("--checkpoint", required=True, help="jaxvpr checkpoint folder or training workdir")
    p.add_argument("--out", required=True, help="FILE.pth or FILE.safetensors")
    p.set_defaults(func=to_torch)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
