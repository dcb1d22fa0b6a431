"""Training input pipeline throughput: jaxvpr's Grain pipeline vs torchvision + torch DataLoader.

    python bench/pipeline.py                     # 200 JPEGs, 3 timed batches of 32, workers 0 and 2
    python bench/pipeline.py --batches 20 --rounds 3 --workers 0 2 4

Each side decodes 512x512 JPEGs and applies CosPlace's training augmentation to every image --
ColorJitter(brightness=0.7, contrast=0.7, saturation=0.7, hue=0.5), RandomResizedCrop(512,
scale=(0.5, 1)), ImageNet Normalize -- then stack batches of ``--batch-size`` (32) float32 images:

* jaxvpr: ``jaxvpr.data.pipeline.train_batches`` with a ``ClassBalancedSampler`` and
  ``jaxvpr.data.augment.cosplace_augment`` (numpy, NHWC), ``num_workers`` Grain worker processes
  (0: built in the calling process with one prefetch thread);
* jaxvpr, device augmentation (``data.augment_on="device"``): the same pipeline with
  ``jaxvpr.data.device_augment.host_decode`` (uint8 batches), then the jitted ``DeviceAugment``
  on each batch (on this machine the device is the same CPU, so the two share its cores; with a
  GPU the host does only the decode, whose rate the "host decode only" column gives);
* PyTorch: a ``Dataset`` doing ``PIL.Image.open(...).convert("RGB")`` + ``torchvision.transforms``
  ``ToTensor, ColorJitter, RandomResizedCrop(antialias=True), Normalize`` on each image (NCHW),
  batched by ``torch.utils.data.DataLoader`` with the same ``num_workers`` and batch size (worker
  processes started with ``spawn``, like Grain's: this process has JAX's threads running, so
  ``fork`` could deadlock).

Note: CosPlace itself decodes in DataLoader workers and runs ColorJitter/RandomResizedCrop on the
GPU batch; with no accelerator here, the PyTorch baseline is the same per-image torchvision CPU
transforms (on float tensors, as CosPlace's), which is what a CPU run of CosPlace would do.

The images are synthetic: smooth random colour fields with texture, saved as JPEG quality 90, so
decoding costs about what a street-view JPEG of that size costs. Per configuration the first
``max(1, workers)`` batches (worker start-up included; its time is reported as "first batch s")
are excluded, then ``--batches`` batches are timed; ``--rounds`` repeats each configuration,
alternating which side runs first, and the table reports medians. ``torch.set_num_threads`` is set
to all cores (it matters with 0 workers; torch DataLoader workers use one thread each). The
consumer does nothing with the batches, so this is the pipeline's peak rate.

Full-size options: ``--images 2000 --batches 30 --rounds 3`` (about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import load_line, machine_line, median  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JITTER = dict(brightness=0.7, contrast=0.7, saturation=0.7, hue=0.5)
CROP_SCALE = (0.5, 1.0)


def make_jpegs(folder: Path, count: int, size: int = 512, seed: int = 0) -> list[str]:
    """``count`` size x size JPEGs (quality 90) of smooth random colour with fine texture."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        mid = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)
        fine = rng.normal(0, 12, (size, size, 3))
        pixels = 0.6 * np.asarray(coarse, np.float32) + 0.4 * np.asarray(mid, np.float32) + fine
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


# ----------------------------------------------------------------------------- jaxvpr
def jaxvpr_batches(paths, batch_size: int, image_size: int, num_workers: int, seed: int):
    from jaxvpr.data.augment import cosplace_augment
    from jaxvpr.data.pipeline import ClassBalancedSampler, train_batches

    classes = [list(range(i, min(i + 4, len(paths)))) for i in range(0, len(paths), 4)]  # 4 images per class
    if len(classes) < batch_size:
        raise SystemExit(f"--images must give at least {batch_size} classes of 4 images (>= {4 * batch_size}).")
    cfg = dict(JITTER, random_resized_crop=1.0 - CROP_SCALE[0], image_size=image_size)
    augment = functools.partial(cosplace_augment, cfg=cfg)
    iterator = train_batches(paths, ClassBalancedSampler(classes), batch_size, augment, seed=seed,
                             num_workers=num_workers)
    return (batch["image"] for batch in iterator), iterator


def device_batches(paths, batch_size: int, image_size: int, num_workers: int, seed: int, augment_on_device=True):
    """``data.augment_on="device"``: the host decodes (uint8 batches), the jitted DeviceAugment does
    ColorJitter + RandomResizedCrop + Normalize (here on the CPU, the only device); without
    ``augment_on_device`` the host's decode alone (what a GPU run asks of the host)."""
    import jax

    from jaxvpr.data.device_augment import DeviceAugment, host_decode, step_key
    from jaxvpr.data.pipeline import ClassBalancedSampler, train_batches

    classes = [list(range(i, min(i + 4, len(paths)))) for i in range(0, len(paths), 4)]
    iterator = train_batches(paths, ClassBalancedSampler(classes), batch_size, host_decode, seed=seed,
                             num_workers=num_workers)
    augment = jax.jit(DeviceAugment(**JITTER, random_resized_crop=1.0 - CROP_SCALE[0], size=(image_size,) * 2))

    def gen():
        for step, batch in enumerate(iterator):
            if augment_on_device:
                yield jax.block_until_ready(augment(batch["image"], step_key(seed, step)))
            else:
                yield batch["image"]

    return gen(), iterator


# ----------------------------------------------------------------------------- PyTorch
class TorchJpegs(torch.utils.data.Dataset):
    """Images ``paths[i % len(paths)]`` through ``transform``; ``length`` items."""

    def __init__(self, paths, transform, length):
        self.paths, self.transform, self.length = paths, transform, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        with Image.open(self.paths[i % len(self.paths)]) as img:
            return self.transform(img.convert("RGB"))


def torch_batches(paths, batch_size: int, image_size: int, num_workers: int, seed: int, num_batches: int):
    import torchvision.transforms as T

    transform = T.Compose([
        T.ToTensor(),
        T.ColorJitter(**JITTER),
        T.RandomResizedCrop(image_size, scale=CROP_SCALE, antialias=True),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    dataset = TorchJpegs(paths, transform, batch_size * num_batches)
    # spawn, as Grain's workers: forking a process that has started JAX's threads can deadlock.
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                         drop_last=True, generator=torch.Generator().manual_seed(seed),
                                         multiprocessing_context="spawn" if num_workers else None)
    return iter(loader), None


# ----------------------------------------------------------------------------- timing
def run(side: str, paths, args, workers: int, seed: int) -> dict:
    warm = max(1, workers)
    if side == "jaxvpr":
        batches, closer = jaxvpr_batches(paths, args.batch_size, args.image_size, workers, seed)
    elif side in ("device", "decode"):
        batches, closer = device_batches(paths, args.batch_size, args.image_size, workers, seed, side == "device")
    else:
        batches, closer = torch_batches(paths, args.batch_size, args.image_size, workers, seed, warm + args.batches)
    t0 = time.perf_counter()
    first = next(batches)
    first_s = time.perf_counter() - t0
    for _ in range(warm - 1):
        next(batches)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        last = next(batches)
    rate = args.batches * args.batch_size / (time.perf_counter() - t0)
    if closer is not None:
        closer.close()
    last = np.asarray(last)
    if side == "torch":
        last = last.transpose(0, 2, 3, 1)
    return dict(rate=rate, first_s=first_s, shape=tuple(np.asarray(first).shape),
                mean=float(last.mean()), std=float(last.std()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="JPEGs to generate (4 per class)")
    parser.add_argument("--batches", type=int, default=3, help="timed batches per configuration")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=512, help="JPEG side and crop output side")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts to compare")
    parser.add_argument("--rounds", type=int, default=1, help="repeats per configuration, alternating order")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--dir", default="", help="existing folder for the JPEGs (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="jaxvpr_bench_") as tmp:
        folder = Path(args.dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        paths = make_jpegs(folder, args.images, args.image_size)
        kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
        print(machine_line())
        print(f"{len(paths)} JPEGs {args.image_size}x{args.image_size}, {kb:.0f} KB each on average "
              f"(made in {time.perf_counter() - t0:.1f} s); batch {args.batch_size}; {args.batches} timed batches "
              f"x {args.rounds} round(s) per configuration\n")
        rows = []
        for workers in args.workers:
            results = {"jaxvpr": [], "torch": [], "device": [], "decode": []}
            for r in range(args.rounds):
                order = ("jaxvpr", "torch", "device", "decode") if r % 2 == 0 else ("decode", "device", "torch", "jaxvpr")
                for side in order:
                    print(f"... {side}, {workers} workers, round {r + 1}", file=sys.stderr, flush=True)
                    results[side].append(run(side, paths, args, workers, seed=r))
            rows.append((workers, results))

    print("| workers | jaxvpr host aug img/s | jaxvpr device aug img/s | host decode only img/s | PyTorch img/s "
          "| host/torch | device/torch | jaxvpr first batch s | PyTorch first batch s "
          "| batch mean / std (host; device; PyTorch) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for workers, res in rows:
        rate = {k: median([x["rate"] for x in v]) for k, v in res.items()}
        j, t, d = rate["jaxvpr"], rate["torch"], rate["device"]
        jf, tf = median([x["first_s"] for x in res["jaxvpr"]]), median([x["first_s"] for x in res["torch"]])
        lj, ld, lt = res["jaxvpr"][-1], res["device"][-1], res["torch"][-1]
        print(f"| {workers} | {j:.1f} | {d:.1f} | {rate['decode']:.1f} | {t:.1f} | {j / t:.2f} | {d / t:.2f} "
              f"| {jf:.1f} | {tf:.1f} | {lj['mean']:.2f} / {lj['std']:.2f}; {ld['mean']:.2f} / {ld['std']:.2f}; "
              f"{lt['mean']:.2f} / {lt['std']:.2f} |")
    print(f"\nbatch shapes: jaxvpr {rows[0][1]['jaxvpr'][0]['shape']} (NHWC), "
          f"PyTorch {rows[0][1]['torch'][0]['shape']} (NCHW)")
    print(load_line())


if __name__ == "__main__":
    main()
