"""Where the time of CosPlace's augmentation goes: jaxvpr's jitted ``DeviceAugment`` op by op vs torchvision.

    python bench/device_augment.py                   # 512 x 512, batch 16, 5 rounds
    python bench/device_augment.py --size 224 --batch 32

Each row times one part of CosPlace's training transform on uint8 RGB images of ``--size``²
(random pixels: the ops do the same work whatever the content):

* jaxvpr: the op under ``jax.jit`` + ``vmap`` on a batch of ``--batch`` images (the batch is on the
  device; what the train step does with ``data.augment_on="device"``), each image with its own key;
* torchvision: the same op with the functional API on each float CHW tensor of the batch in turn
  (CosPlace's transforms on the host; ``torch.set_num_threads`` = all cores).

Rows: the uint8 -> float conversion; the hue alone (factor 0.1); ColorJitter(0.7, 0.7, 0.7, 0.5)
(random order and factors); RandomResizedCrop(size, scale=(0.5, 1)) with its antialiased resize; and the
whole transform (ColorJitter, RandomResizedCrop, Normalize), the conversion included. The sides
alternate round by round; medians of ``--rounds`` rounds, in ms per image, and torchvision / jaxvpr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import load_line, machine_line, median  # noqa: E402
from pipeline import CROP_SCALE as SCALE, IMAGENET_MEAN as MEAN, IMAGENET_STD as STD, JITTER  # noqa: E402  (CosPlace's transform)


def jax_ops(size: int):
    import jax
    import jax.numpy as jnp

    from jaxvpr.data import device_augment as da

    def per_image(fn):
        def batch(images, key):
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))
            return jax.vmap(fn)(images, keys)
        return jax.jit(batch)

    to_float = lambda im: im.astype(jnp.float32) / 255.0

    def jitter(im, key):
        order, factors = da.colour_jitter_params(key, *JITTER.values())
        return da.apply_colour_jitter(to_float(im), order, factors)

    def crop(im, key):
        box = da.random_resized_crop_params(key, size, size, SCALE)
        return da.resized_crop(to_float(im), *box, (size, size))

    full = da.DeviceAugment(**JITTER, random_resized_crop=1.0 - SCALE[0], size=(size, size))
    return {
        "uint8 -> float": per_image(lambda im, key: to_float(im)),
        "hue (0.1)": per_image(lambda im, key: da.adjust_hue(to_float(im), 0.1)),
        "ColorJitter": per_image(jitter),
        "RandomResizedCrop": per_image(crop),
        "whole transform": jax.jit(full.__call__),
    }


def torch_ops(size: int):
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF

    jitter = T.ColorJitter(**JITTER)
    crop = T.RandomResizedCrop(size, scale=SCALE, antialias=True)
    full = T.Compose([jitter, crop, T.Normalize(MEAN, STD)])
    to_float = lambda im: im.permute(2, 0, 1).float() / 255.0
    return {
        "uint8 -> float": to_float,
        "hue (0.1)": lambda im: TF.adjust_hue(to_float(im), 0.1),
        "ColorJitter": lambda im: jitter(to_float(im)),
        "RandomResizedCrop": lambda im: crop(to_float(im)),
        "whole transform": lambda im: full(to_float(im)),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    import jax

    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    on_device = jax.device_put(images)
    torch_images = [torch.from_numpy(im) for im in images]
    print(machine_line())
    print(f"{args.batch} images of {args.size}x{args.size}; {args.rounds} rounds per side, alternating; medians\n")
    ours, theirs = jax_ops(args.size), torch_ops(args.size)
    print("| op | jaxvpr ms/img (jit, vmap over the batch) | torchvision ms/img (one image at a time) | torchvision / jaxvpr |")
    print("|---|---|---|---|")
    for name in ours:
        fn, ref = ours[name], theirs[name]
        keys = [jax.random.key(r) for r in range(args.rounds + 1)]  # made before timing (fold_in compiles on first use)
        jax.block_until_ready(fn(on_device, keys[-1]))  # compile
        with torch.no_grad():
            ref(torch_images[0])  # torch's first call
        times = {"jax": [], "torch": []}
        for r in range(args.rounds):
            for side in (("jax", "torch") if r % 2 == 0 else ("torch", "jax")):
                t0 = time.perf_counter()
                if side == "jax":
                    jax.block_until_ready(fn(on_device, keys[r]))
                else:
                    with torch.no_grad():
                        for im in torch_images:
                            ref(im)
                times[side].append((time.perf_counter() - t0) * 1000 / args.batch)
        a, b = median(times["jax"]), median(times["torch"])
        print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f} |", flush=True)
    print("\n" + load_line())


if __name__ == "__main__":
    main()
