"""Convert weights between PyTorch checkpoints and jaxvpr checkpoints.

    python -m jaxvpr.convert from-torch --model cosplace_resnet18_512 --weights resnet18_512.pth --out ckpt/cosplace_r18
    python -m jaxvpr.convert from-torch --model dinov2_vitb14 --weights model.safetensors --out ckpt/dinov2_b  # HF names too
    python -m jaxvpr.convert from-torch --model cosplace_resnet18_512 --weights resnet18-f37072fd.pth \
        --imagenet --out ckpt/r18_imagenet     # torchvision ImageNet backbone, randomly initialised head
    python -m jaxvpr.convert from-torch --model anyloc_dinov2_vitg14_indoor --weights dinov2_vitg14_pretrain.pth \
        --vocabulary dinov2_vitg14_l31_value_c32_indoor_c_centers.pt --out ckpt/anyloc_indoor   # or centres .npy
    python -m jaxvpr.convert to-torch --checkpoint ckpt/cosplace_r18 --out resnet18_512.pth   # or .safetensors

``from-torch`` reads ``.pth``/``.pt`` (``torch.load(weights_only=True)``: no arbitrary unpickling),
Lightning ``.ckpt`` (its ``state_dict``) and ``.safetensors``, maps every tensor of the model's
published layout (an error lists missing, unexpected and mis-shaped tensors by name) and writes a
jaxvpr checkpoint that ``jaxvpr.evaluate --checkpoint``, ``jaxvpr.extract`` and training's
``model.init_checkpoint`` load. ``to-torch`` writes the plain state dict of the model's anchor
(loadable with ``strict=True``); ``--checkpoint`` may also be a training workdir (its best model).

AnyLoc models (``anyloc_*``) take the hub DINOv2 state dict (official or Hugging Face names) plus
``--vocabulary`` (AnyLoc's release ``.pt`` tensor or a ``.npy``, see :mod:`jaxvpr.anyloc`); the
hub tensors the model does not run (blocks after ``layer``, the rest of block ``layer``, the final
``norm``) are listed as ignored. Their ``to-torch`` writes the hub DINOv2 names of the tensors the
model uses plus the centres as ``c_centers`` (K, C): load it into the hub model with
``strict=False`` after popping ``c_centers``; ``torch.save`` of that tensor alone is AnyLoc's
vocabulary file. ``from-torch`` reads such a file back without ``--vocabulary``.

NetVLAD's MATLAB release (hloc's ``Pitts30K_struct.mat``, a ``.mat`` suffix) converts to
``netvlad_vgg16_4096`` or ``netvlad_vgg16_32768`` (``--weights Pitts30K_struct.mat``); the layers it
reads, the re-ordering and the mean-image check are in :mod:`jaxvpr.convert.matconvnet`.

AP-GeM (``apgem_resnet101_2048``) keeps its PCA whitening outside the PyTorch state dict: give it
as ``--whitening FILE.npz`` (``mean``, ``components``, ``explained_variance``; ``from-torch --help``
prints the one-off export from dirtorch's checkpoint, :data:`jaxvpr.convert.cnn.WHITENING_EXPORT`)
or convert with ``--no-whitening`` (config ``whiten=False``). Its ``to-torch`` writes dirtorch's
state dict and the whitening beside it (``--whitening-out``, default ``<out>.whitening.npz``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from jaxvpr import cli


def torchvision_backbone(state_dict: dict[str, np.ndarray], model_cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """A torchvision ImageNet classifier's tensors placed in the model's layout; head tensors random.

    torchvision names (``conv1``, ``bn1``, ``layerK``, ``features.N``) are matched to the layout's
    ``backbone.N`` (CosPlace/VG sequential crops: conv1=0, bn1=1, layer1..4=4..7; VGG/AlexNet
    ``features.N`` = ``backbone.N``), ``backbone.model.<name>`` (MixVPR), the names themselves
    (``torch_layout='dirtorch'``) or ``base_model.base.N`` (``'openibl'``); the classifier (``fc``,
    ``classifier``) and layers the crop drops are ignored. Every backbone tensor must be found.
    """
    import jax

    from jaxvpr.convert.rules import CheckpointMismatchError, expected_torch_shapes, torch_rules, variables_to_torch
    from jaxvpr.models import init_variables

    expected = expected_torch_shapes(model_cfg)
    backbone_names = [r.torch_name for r in torch_rules(model_cfg) if r.flax_path[1] == "backbone"]
    is_backbone = set(backbone_names)
    sequential = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    placed: dict[str, np.ndarray] = {}
    for name, array in state_dict.items():
        first, _, rest = name.partition(".")
        candidates = [f"backbone.model.{name}", name]  # MixVPR; dirtorch (torchvision's own names)
        if first in sequential:
            candidates.append(f"backbone.{sequential[first]}.{rest}")
        if first == "features":
            candidates += [f"backbone.{rest}", f"base_model.base.{rest}"]  # CosPlace/VG; OpenIBL
        for c in candidates:
            if c in is_backbone:
                placed[c] = np.asarray(array)
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

    cfg = model_config(args.model, **({"whiten": False} if args.no_whitening else {}))
    if Path(args.weights).suffix.lower() == ".mat":  # NetVLAD's MATLAB release
        from jaxvpr.convert.matconvnet import read_netvlad_mat

        state_dict, source = read_netvlad_mat(args.weights, cfg), "matconvnet"
    else:
        state_dict, source = read_state_dict(args.weights), "pytorch"
    if cfg.backbone.startswith("dinov2") and cfg.head in ("cls", "anyloc") and is_hf_dinov2(state_dict):
        state_dict, source = hf_dinov2_to_official(state_dict), "hf-transformers"
    if args.imagenet:
        state_dict, source = torchvision_backbone(state_dict, cfg, args.seed), "torchvision-imagenet"
    meta = {"source": source, "weights": str(Path(args.weights).absolute())}
    if cfg.head == "anyloc":
        from jaxvpr.anyloc import hub_state_dict_for_anyloc, summarize_names

        state_dict, ignored = hub_state_dict_for_anyloc(state_dict, cfg, args.vocabulary)
        if ignored:
            print(f"ignored {len(ignored)} tensors the model does not run: {summarize_names(ignored)}")
        if args.vocabulary:
            meta["vocabulary"] = str(Path(args.vocabulary).absolute())
    elif args.vocabulary:
        raise ValueError(f"--vocabulary is for AnyLoc models; {cfg.name!r} has head {cfg.head!r}")
    if cfg.head == "cam_netvlad":  # AdAGeo's AttenNetVLAD: a second name of the fc weight, and the discriminator
        extra = [k for k in state_dict if k == "weight_softmax" or k.startswith("grl_discriminator.")]
        if "weight_softmax" in state_dict and "backbone.fc.weight" in state_dict and not np.array_equal(
                state_dict["weight_softmax"], state_dict["backbone.fc.weight"]):
            raise ValueError(f"{args.weights}: weight_softmax differs from backbone.fc.weight (AdAGeo shares them).")
        state_dict = {k: v for k, v in state_dict.items() if k not in extra}
        if extra:
            print(f"ignored {len(extra)} tensors (weight_softmax = backbone.fc.weight; the training-only "
                  "grl_discriminator)")
    if args.whitening:
        from jaxvpr.convert.cnn import read_whitening

        state_dict = {**state_dict, **read_whitening(args.whitening, cfg)}
        meta["whitening"] = str(Path(args.whitening).absolute())
    variables = torch_to_variables(state_dict, cfg)
    save_model(args.out, cfg, variables, meta=meta)
    n = sum(int(np.prod(np.shape(v))) for v in state_dict.values())
    print(f"{args.model}: {len(state_dict)} tensors ({n:,} values, {source} layout) -> {args.out}")
    return 0


def to_torch(args) -> int:
    from jaxvpr.checkpoint import load_model
    from jaxvpr.convert import variables_to_torch, write_state_dict

    from jaxvpr.convert.cnn import split_whitening

    cfg, variables = load_model(args.checkpoint)
    state_dict, whitening = split_whitening(variables_to_torch(variables, cfg))
    write_state_dict(state_dict, args.out)
    print(f"{cfg.name}: {len(state_dict)} tensors -> {args.out}")
    if whitening:
        path = args.whitening_out or f"{Path(args.out).with_suffix('')}.whitening.npz"
        np.savez(path, **whitening)
        print(f"{cfg.name}: whitening ({', '.join(whitening)}) -> {path}")
    return 0


@cli.command
def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m jaxvpr.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from jaxvpr.convert.cnn import WHITENING_EXPORT

    p = sub.add_parser("from-torch", help="PyTorch weights -> jaxvpr checkpoint", epilog=WHITENING_EXPORT,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model name (python -m jaxvpr.evaluate --list-models)")
    p.add_argument("--weights", required=True,
                   help=".pth/.pt, Lightning .ckpt or .safetensors (or NetVLAD's MATLAB .mat release)")
    p.add_argument("--out", required=True, help="output checkpoint folder (must not hold step 0 already)")
    p.add_argument("--imagenet", action="store_true",
                   help="weights are a torchvision ImageNet classifier: take its backbone, random head")
    p.add_argument("--seed", type=int, default=0, help="seed of the random head with --imagenet")
    p.add_argument("--vocabulary", default=None,
                   help="AnyLoc models: centres (K, C) as AnyLoc's release .pt or a .npy")
    p.add_argument("--whitening", default=None,
                   help="AP-GeM: FILE.npz with the PCA whitening's mean, components, explained_variance (see below)")
    p.add_argument("--no-whitening", action="store_true",
                   help="AP-GeM without its whitening (config whiten=False; kapture's LM18 extraction)")
    p.set_defaults(func=from_torch)
    p = sub.add_parser("to-torch", help="jaxvpr checkpoint -> PyTorch state dict")
    p.add_argument("--checkpoint", required=True, help="jaxvpr checkpoint folder or training workdir")
    p.add_argument("--out", required=True, help="FILE.pth or FILE.safetensors")
    p.add_argument("--whitening-out", default=None,
                   help="AP-GeM: where the whitening .npz goes (default: <out without suffix>.whitening.npz)")
    p.set_defaults(func=to_torch)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
