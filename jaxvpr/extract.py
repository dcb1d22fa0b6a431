"""Descriptors of a folder of images, or of a .npy array of images, with a jaxvpr checkpoint.

    python -m jaxvpr.extract --checkpoint CKPT --images DIR --out desc.npy [--resize 480,640]
    python -m jaxvpr.extract --checkpoint WORKDIR --images images.npy --out desc.npy

A folder is walked recursively (or read from ``<DIR>_images_paths.txt``); the row order is written
beside the output as ``<out stem>_paths.txt``. Images of differing sizes are described at their own
size, grouped by size. A ``.npy`` file holds uint8 images (N, H, W, 3), described at their own size
after ImageNet normalisation. ``--checkpoint`` is a converted checkpoint or a training workdir (its
best model, else its latest checkpoint). An unreadable image is an error naming it, or with
``--skip-corrupt`` a row of zeros (listed); ``--truncated-images pil`` decodes truncated JPEGs as
CosPlace does. The outputs are written only once every image is described (each atomically).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from jaxvpr import cli


def describe_array(describe, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Descriptors of uint8 images (N, H, W, 3), batches padded to ``batch_size``."""
    import jax

    from jaxvpr.data.images import normalize

    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    out = []
    for start in range(0, len(images), batch_size):
        chunk = np.stack([normalize(im) for im in images[start:start + batch_size]])
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(jax.device_get(describe(chunk)))[:n])
    return np.concatenate(out).astype(np.float32)


@cli.command
def main(argv=None) -> int:
    from jaxvpr.data.images import TRUNCATED_MODES

    parser = cli.ArgumentParser(prog="python -m jaxvpr.extract", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", required=True, help="a folder of images or a .npy of uint8 (N,H,W,3)")
    parser.add_argument("--out", required=True, help="output .npy of float32 descriptors (N, D)")
    parser.add_argument("--resize", default=None, help="N (shorter side), H,W, or none (folders only)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images (rows of zeros)")
    parser.add_argument("--truncated-images", choices=TRUNCATED_MODES, default=None,
                        help="a truncated image: error, or pil (decoded as CosPlace's PIL does); "
                             "default $JAXVPR_TRUNCATED_IMAGES or error")
    args = parser.parse_args(argv)

    from jaxvpr.checkpoint import load_model
    from jaxvpr.data.format import list_images
    from jaxvpr.data.images import set_truncated_mode
    from jaxvpr.evaluate import (Describer, atomic_save_npy, atomic_write_text, extract_descriptors,
                                 parse_resize)
    from jaxvpr.models import build_model

    set_truncated_mode(args.truncated_images, "--truncated-images")
    source = Path(args.images)
    out = Path(args.out if args.out.endswith(".npy") else args.out + ".npy")  # as np.save names it
    if source.suffix == ".npy":
        if args.resize:
            raise ValueError("--resize applies to folders; a .npy is described at its own size")
        images, rel = np.load(source, allow_pickle=False), None
    else:
        rel = list_images(source)  # a missing or empty folder fails before the model is loaded
    cfg, variables = load_model(args.checkpoint)
    describe = Describer(build_model(cfg)).bind(variables)
    if rel is None:
        descriptors = describe_array(describe, images, args.batch_size)
    else:
        result = extract_descriptors(describe, [str(source / p) for p in rel], args.batch_size,
                                     parse_resize(args.resize), args.num_workers, args.skip_corrupt,
                                     source.name, mixed_sizes=True)
        descriptors = result.values
        if result.skipped_paths:
            print(f"skipped {len(result.skipped_paths)} unreadable images (zero rows): {result.skipped_paths[:5]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(out, descriptors)
    if rel is not None:
        atomic_write_text(out.with_name(out.stem + "_paths.txt"), "\n".join(rel) + "\n")
    print(f"{cfg.name}: {descriptors.shape[0]} descriptors of dimension {descriptors.shape[1]} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
