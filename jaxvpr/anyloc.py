"""AnyLoc vocabularies: read the published centres, fit new ones on a folder, put them in a checkpoint.

    # published model: hub DINOv2 ViT-G/14 weights + a release vocabulary -> jaxvpr checkpoint
    python -m jaxvpr.convert from-torch --model anyloc_dinov2_vitg14_indoor \\
        --weights dinov2_vitg14_pretrain.pth --vocabulary dinov2_vitg14_l31_value_c32_indoor_c_centers.pt \\
        --out ckpt/anyloc_indoor
    # a new domain: fit centres on a folder of (database) images, write them and a checkpoint using them
    python -m jaxvpr.anyloc vocabulary --checkpoint ckpt/anyloc_indoor --images /data/mall/database \\
        --resize 320,320 --out mall_centers.npy --out-checkpoint ckpt/anyloc_mall
    # put centres (.npy, or an AnyLoc release .pt) into a copy of a checkpoint
    python -m jaxvpr.anyloc set-vocabulary --checkpoint ckpt/anyloc_indoor --vocabulary mall_centers.npy \\
        --out ckpt/anyloc_mall
    python -m jaxvpr.evaluate --checkpoint ckpt/anyloc_mall --dataset DATA/images/test --resize 322,322

``vocabulary`` follows AnyLoc's recipe (Keetha et al. RA-L 2023; ``AnyLoc/AnyLoc:
scripts/dino_v2_global_vocab_vlad.py``, ``AnyLoc/DINO:utilities.py`` ``VLAD.fit``):

1. images: every image of the folder (walked recursively), or ``--max-images`` of them drawn
   at random with ``--seed``; each is resized (``--resize``, AnyLoc uses 320 x 320), ImageNet-
   normalised and centre-cropped to multiples of 14 (320 -> 308, as AnyLoc's ``CenterCrop``);
2. local descriptors: the model's L2-normalised patch facets (value of block 31 for the
   published model, :func:`jaxvpr.models.anyloc.local_descriptors`); to bound memory at most
   ``ceil(--max-descriptors / images)`` patches per image are kept, drawn at random (AnyLoc
   keeps all patches of its sub-sampled images);
3. cosine k-means (:func:`fit_vocabulary`): faiss ``Kmeans(spherical=True)`` with a fixed seed,
   then one last assignment step whose *means are not renormalised* -- the form of AnyLoc's
   centres (see :func:`fit_vocabulary` for how this differs from ``fast_pytorch_kmeans``).

Differences from AnyLoc's script besides the k-means: images are resized as uint8 with PIL
bilinear *before* normalisation (AnyLoc resizes the normalised tensor), and the patch cap above.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from jaxvpr import cli
from jaxvpr.data import images

PATCH_SIZE = 14


# ----------------------------------------------------------------------------- vocabulary files


def read_vocabulary(path: str | os.PathLike) -> np.ndarray:
    """Centres (K, C) float32 from ``.npy`` or a ``torch.save`` file (``.pt``/``.pth``).

    A torch file may hold the bare tensor (AnyLoc's release files
    ``dinov2_vitg14_l31_value_c32_<domain>_c_centers.pt``) or a dict with a ``c_centers``
    entry (or a single tensor). Torch files are read with ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        centres = np.load(path, allow_pickle=False)
    elif suffix in (".pt", ".pth"):
        from jaxvpr.convert.dinov2 import ANYLOC_CENTRES
        from jaxvpr.convert.io import require_torch

        torch = require_torch()
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError, RuntimeError for corrupt zips
            raise ValueError(f"{path}: not readable with torch.load(weights_only=True): {err}") from err
        if isinstance(obj, dict):
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            obj = tensors.get(ANYLOC_CENTRES, next(iter(tensors.values())) if len(tensors) == 1 else None)
        if not isinstance(obj, torch.Tensor):
            raise ValueError(
                f"{path}: expected a tensor of centres (K, C), or a dict holding {ANYLOC_CENTRES!r}; "
                f"got {type(obj).__name__}"
            )
        centres = obj.detach().cpu().float().numpy()
    else:
        raise ValueError(f"{path}: a vocabulary is a .npy or a torch .pt/.pth file, not {suffix!r}")
    if centres.ndim != 2 or not np.issubdtype(centres.dtype, np.floating):
        raise ValueError(f"{path}: expected float centres of shape (K, C), got {centres.dtype} {centres.shape}")
    return np.ascontiguousarray(centres, dtype=np.float32)


def write_vocabulary(centres: np.ndarray, path: str | os.PathLike) -> None:
    """``.npy``, or ``.pt``/``.pth`` holding the bare tensor as AnyLoc's release files do."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    centres = np.ascontiguousarray(centres, dtype=np.float32)
    if path.suffix.lower() == ".npy":
        np.save(path, centres)
    elif path.suffix.lower() in (".pt", ".pth"):
        from jaxvpr.convert.io import require_torch

        torch = require_torch()
        torch.save(torch.from_numpy(centres), path)
    else:
        raise ValueError(f"--out {path}: write the centres as .npy or .pt")


def with_vocabulary(model_cfg, variables: dict, centres: np.ndarray) -> dict:
    """``variables`` with the AnyLoc centres replaced by ``centres`` (shape checked)."""
    if model_cfg.head != "anyloc":
        raise ValueError(f"model {model_cfg.name!r} has head {model_cfg.head!r}; a vocabulary needs an AnyLoc model")
    current = variables["vocabulary"]["head"]["centers"]
    if tuple(centres.shape) != tuple(current.shape):
        raise ValueError(
            f"the vocabulary has shape {tuple(centres.shape)} but model {model_cfg.name!r} expects "
            f"{tuple(current.shape)} (num_clusters x width): fit it with --num-clusters {current.shape[0]} "
            "on this backbone"
        )
    vocabulary = {"head": {"centers": np.asarray(centres, dtype=np.float32)}}
    return {**variables, "vocabulary": vocabulary}


def hub_state_dict_for_anyloc(state_dict: dict[str, np.ndarray], model_cfg,
                              vocabulary: str | os.PathLike | None) -> tuple[dict[str, np.ndarray], list[str]]:
    """A hub DINOv2 state dict (official names) -> the AnyLoc model's layout, and the names left out.

    The tensors the model does not run (blocks after ``layer``, the rest of block ``layer``, the
    final ``norm``) are dropped and returned; anything else unknown stays in and is reported as
    unexpected by the conversion. The centres come from ``vocabulary`` (see :func:`read_vocabulary`),
    else from a ``c_centers`` entry of ``state_dict`` (what ``to-torch`` writes).
    """
    from jaxvpr.convert.dinov2 import ANYLOC_CENTRES, unused_anyloc_tensors
    from jaxvpr.models.registry import dinov2_spec

    arch, registers = dinov2_spec(model_cfg.backbone)
    ignored = unused_anyloc_tensors(state_dict, arch, registers, model_cfg.layer, model_cfg.facet)
    dropped = set(ignored)
    out = {k: v for k, v in state_dict.items() if k not in dropped}
    if vocabulary is not None:
        out[ANYLOC_CENTRES] = read_vocabulary(vocabulary)
    elif ANYLOC_CENTRES not in out:
        raise ValueError(
            f"model {model_cfg.name!r} needs its vocabulary: pass --vocabulary FILE (an AnyLoc release "
            "file such as dinov2_vitg14_l31_value_c32_indoor_c_centers.pt, or a .npy written by "
            "`python -m jaxvpr.anyloc vocabulary`)"
        )
    return out, ignored


def summarize_names(names: Sequence[str]) -> str:
    """``blocks.32-39.*, blocks.31.attn.proj.weight, ..., norm.bias``: whole blocks as ranges."""
    per_block: dict[int, list[str]] = {}
    others = []
    for name in names:
        parts = name.split(".")
        if parts[0] == "blocks" and len(parts) > 2 and parts[1].isdigit():
            per_block.setdefault(int(parts[1]), []).append(name)
        else:
            others.append(name)
    counts = {b: len(v) for b, v in per_block.items()}
    full = max(counts.values(), default=0)  # a complete block has the most tensors
    whole = sorted(b for b, c in counts.items() if c == full and len(counts) > 1)
    items = []
    for lo, hi in _ranges(whole):
        items.append(f"blocks.{lo}.*" if lo == hi else f"blocks.{lo}-{hi}.*")
    for block in sorted(set(per_block) - set(whole)):
        items.extend(per_block[block])
    return ", ".join(items + others)


def _ranges(values: Iterable[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for v in values:
        if out and v == out[-1][1] + 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


# ----------------------------------------------------------------------------- descriptors


def crop_to_patch_multiple(image: np.ndarray, patch: int = PATCH_SIZE) -> np.ndarray:
    """Centre crop of an (H, W, C) image to ``(H // patch * patch, W // patch * patch)``, the corner
    at ``round((H - h) / 2)`` like ``torchvision.transforms.CenterCrop`` (AnyLoc's crop)."""
    from jaxvpr.testtime import center_crop

    height, width = image.shape[:2]
    h, w = height // patch * patch, width // patch * patch
    if h == 0 or w == 0:
        raise ValueError(f"an image of {height}x{width} pixels is smaller than one {patch}x{patch} patch")
    return center_crop(image, (h, w))


def sample_paths(paths: Sequence[str], max_images: int | None, seed: int) -> list[str]:
    """All ``paths``, or ``max_images`` of them drawn without replacement (kept in listing order)."""
    if max_images is None or len(paths) <= max_images:
        return list(paths)
    keep = np.sort(np.random.default_rng(seed).choice(len(paths), size=max_images, replace=False))
    return [paths[i] for i in keep]


def extract_local_descriptors(model, variables, paths: Sequence[str], resize=None,
                              max_descriptors: int | None = None, seed: int = 0,
                              batch_size: int = 8, progress: bool = True) -> np.ndarray:
    """L2-normalised patch descriptors (M, C) of the images at ``paths`` (step 1-2 of the module docstring).

    Images are decoded, resized (``resize`` as :func:`jaxvpr.data.images.resize`), ImageNet-
    normalised and cropped to multiples of 14; consecutive images of one size are batched. With
    ``max_descriptors`` each image contributes at most ``ceil(max_descriptors / len(paths))``
    patches, drawn at random (seeded).
    """
    import jax
    from tqdm.auto import tqdm

    from jaxvpr.data.images import load_image, normalize
    from jaxvpr.data.images import resize as resize_image
    from jaxvpr.models.anyloc import local_descriptors

    if not paths:
        raise ValueError("no images to build a vocabulary from")
    per_image = None if max_descriptors is None else max(1, math.ceil(max_descriptors / len(paths)))
    rng = np.random.default_rng(seed)
    describe = jax.jit(lambda v, x: model.apply(v, x, method=local_descriptors))
    kept: list[np.ndarray] = []
    batch: list[np.ndarray] = []

    def flush():
        if not batch:
            return
        images = np.stack(batch)
        n = len(batch)
        if n < batch_size:  # pad so every batch of a size compiles once
            images = np.concatenate([images, np.zeros((batch_size - n,) + images.shape[1:], images.dtype)])
        local = np.asarray(jax.device_get(describe(variables, images)))[:n]
        for patches in local:
            if per_image is not None and len(patches) > per_image:
                patches = patches[np.sort(rng.choice(len(patches), size=per_image, replace=False))]
            kept.append(patches.astype(np.float32))
        batch.clear()

    for path in tqdm(paths, desc="vocabulary images", unit="img", disable=not progress):
        image = crop_to_patch_multiple(normalize(resize_image(load_image(path), resize)))
        if batch and (image.shape != batch[0].shape or len(batch) == batch_size):
            flush()
        batch.append(image)
    flush()
    return np.concatenate(kept)


# ----------------------------------------------------------------------------- k-means


def fit_vocabulary(descriptors: np.ndarray, num_clusters: int, seed: int = 0, niter: int = 100,
                   nredo: int = 1) -> np.ndarray:
    """Cosine k-means centres (K, C) of ``descriptors`` (M, C), in AnyLoc's form.

    AnyLoc (``VLAD.fit``) runs ``fast_pytorch_kmeans.KMeans(mode="cosine")``: assign every
    normalised descriptor to the centre of highest cosine similarity, move each centre to the
    plain mean of its members, until the squared centre shift is below 1e-4 (at most 100 steps).
    Here faiss ``Kmeans(spherical=True)`` iterates the same assignments (it renormalises the
    means, which does not change any cosine), then one last step writes the members' means
    without renormalising, so ``||c_k|| < 1`` as in AnyLoc's release files -- the VLAD residuals
    ``x - c_k`` use the centre as stored. Remaining differences: the initial centres (faiss draws
    K descriptors with ``seed``; fast_pytorch_kmeans draws them with torch's global RNG), the
    stopping rule (``niter`` steps here), and empty clusters (faiss splits a large cluster;
    fast_pytorch_kmeans leaves a zero centre that is never assigned again). Lloyd iterations can
    settle in a local optimum (two initial centres in one true cluster); ``nredo > 1`` runs that
    many seeded initialisations and keeps the one of highest total cosine (AnyLoc runs once).
    """
    import faiss

    x = np.asarray(descriptors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"descriptors must be (M, C), got shape {x.shape}")
    if len(x) < num_clusters:
        raise ValueError(
            f"{len(x)} descriptors cannot make {num_clusters} clusters: use more images, a larger "
            "--max-descriptors or fewer --num-clusters"
        )
    x = np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    kmeans = faiss.Kmeans(
        x.shape[1], num_clusters, niter=niter, nredo=nredo, seed=seed, spherical=True, verbose=False,
        max_points_per_centroid=math.ceil(len(x) / num_clusters) + 1,  # no faiss subsampling
    )
    kmeans.train(x)
    directions = kmeans.centroids / np.maximum(np.linalg.norm(kmeans.centroids, axis=1, keepdims=True), 1e-12)
    members = np.concatenate([
        np.argmax(chunk @ directions.T, axis=1) for chunk in np.array_split(x, max(1, len(x) // 65536))
    ])
    sums = np.zeros_like(directions, dtype=np.float64)
    np.add.at(sums, members, x)
    counts = np.bincount(members, minlength=num_clusters)
    centres = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], directions)
    return centres.astype(np.float32)


# ----------------------------------------------------------------------------- command line


def _load_model(args) -> tuple[Any, Any]:
    import jax

    from jaxvpr.models import init_variables, model_config

    if args.checkpoint:
        from jaxvpr.checkpoint import load_model

        return load_model(args.checkpoint)
    if not (args.model and args.random_init):
        raise ValueError("give --checkpoint CKPT, or --model NAME --random-init (random weights, for tests)")
    cfg = model_config(args.model)
    return cfg, init_variables(cfg, jax.random.key(args.seed))


def vocabulary_command(args) -> int:
    from jaxvpr.checkpoint import save_model
    from jaxvpr.data.format import list_images
    from jaxvpr.data.images import set_truncated_mode
    from jaxvpr.evaluate import parse_resize
    from jaxvpr.models import build_model

    set_truncated_mode(args.truncated_images, "--truncated-images")
    cfg, variables = _load_model(args)
    if cfg.head != "anyloc":
        raise ValueError(f"model {cfg.name!r} has head {cfg.head!r}; `vocabulary` needs an AnyLoc model")
    num_clusters = args.num_clusters or cfg.num_clusters
    if args.out_checkpoint and num_clusters != cfg.num_clusters:
        raise ValueError(
            f"--num-clusters {num_clusters} differs from model {cfg.name!r}'s {cfg.num_clusters}: the "
            "checkpoint could not hold the centres (drop --out-checkpoint, or fit with its cluster count)"
        )
    folder = Path(args.images)
    paths = sample_paths([str(folder / p) for p in list_images(folder)], args.max_images, args.seed)
    descriptors = extract_local_descriptors(
        build_model(cfg), variables, paths, parse_resize(args.resize), args.max_descriptors, args.seed,
        args.batch_size, progress=not args.quiet,
    )
    centres = fit_vocabulary(descriptors, num_clusters, seed=args.seed, niter=args.niter, nredo=args.nredo)
    write_vocabulary(centres, args.out)
    print(f"{cfg.name}: {len(paths)} images, {len(descriptors):,} patch descriptors ({descriptors.shape[1]}-d) "
          f"-> {num_clusters} centres -> {args.out}")
    if args.out_checkpoint:
        meta = {"source": "jaxvpr.anyloc vocabulary", "vocabulary_images": str(folder.absolute())}
        save_model(args.out_checkpoint, cfg, with_vocabulary(cfg, variables, centres), meta=meta)
        print(f"checkpoint with these centres -> {args.out_checkpoint}")
    return 0


def set_vocabulary_command(args) -> int:
    from jaxvpr.checkpoint import load_model, save_model

    cfg, variables = load_model(args.checkpoint)
    centres = read_vocabulary(args.vocabulary)
    meta = {"source": f"jaxvpr.anyloc set-vocabulary of {Path(args.checkpoint).absolute()}",
            "vocabulary": str(Path(args.vocabulary).absolute())}
    save_model(args.out, cfg, with_vocabulary(cfg, variables, centres), meta=meta)
    print(f"{cfg.name}: {centres.shape[0]} centres from {args.vocabulary} -> {args.out}")
    return 0


@cli.command
def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m jaxvpr.anyloc", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("vocabulary", help="fit AnyLoc centres on a folder of images")
    p.add_argument("--checkpoint", help="jaxvpr checkpoint of an AnyLoc model (e.g. from `jaxvpr.convert from-torch`)")
    p.add_argument("--model", help="AnyLoc model name, with --random-init (random weights: tests only)")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--images", required=True, help="folder of images (walked recursively)")
    p.add_argument("--out", required=True, help="centres file: .npy, or .pt (a bare tensor, like AnyLoc's)")
    p.add_argument("--out-checkpoint", help="also write a checkpoint of the model with these centres")
    p.add_argument("--num-clusters", type=int, default=None, help="default: the model's num_clusters")
    p.add_argument("--resize", default="320,320", help="N (shorter side), H,W, or none; then cropped to x14")
    p.add_argument("--max-images", type=int, default=None, help="images drawn at random (default: all)")
    p.add_argument("--max-descriptors", type=int, default=200_000,
                   help="cap on patch descriptors kept for k-means (spread evenly over the images)")
    p.add_argument("--niter", type=int, default=100, help="k-means iterations")
    p.add_argument("--nredo", type=int, default=1, help="k-means runs from different seeds, the best kept")
    p.add_argument("--seed", type=int, default=0, help="image/patch sampling, k-means init, random weights")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--truncated-images", choices=images.TRUNCATED_MODES, default=None,
                   help="a truncated image: error, or pil (decoded as PIL does); default $JAXVPR_TRUNCATED_IMAGES or error")
    p.set_defaults(func=vocabulary_command)
    p = sub.add_parser("set-vocabulary", help="copy a checkpoint with other centres")
    p.add_argument("--checkpoint", required=True, help="jaxvpr checkpoint of an AnyLoc model")
    p.add_argument("--vocabulary", required=True, help=".npy or AnyLoc release .pt of centres (K, C)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.set_defaults(func=set_vocabulary_command)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
