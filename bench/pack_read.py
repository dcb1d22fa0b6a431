"""Reading images from a folder of files vs from its packed ArrayRecord shards (jaxvpr.data.pack).

    python bench/pack_read.py                        # the synthetic city's train database, 2,000 reads
    python bench/pack_read.py --folder DIR --reads 5000 --rounds 5

Packs the folder into a temporary directory (timed), then reads ``--reads`` images in a random
order (as training does: random access by row), single process, alternating the two sides
``--rounds`` times, in two ways:

* read only: the bytes (``open(path).read()`` vs one record of ``ArrayRecordDataSource``);
* read + decode: ``jaxvpr.data.images.load_image(path)`` vs ``PackedImages.load(row)``, i.e. the
  same PIL decode of the same bytes (what the pipelines do per image).

The default folder is the synthetic city's ``images/train/database`` (``small`` preset, under
``$JAXVPR_CACHE``, default ``~/.cache/jaxvpr``) when it exists, else ``--generate`` JPEGs of
``--size`` px written to a temporary folder. Files and shards are both in the page cache after the
first round (the table gives medians), so this measures the per-file system-call cost of a local
disk, not a network disk's or a bucket's latency, where the gap is expected to be much larger.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from jaxvpr.data import pack
from jaxvpr.data.format import read_image_folder
from jaxvpr.data.images import load_image


def default_folder() -> Path | None:
    cache = Path(os.environ.get("JAXVPR_CACHE") or Path.home() / ".cache/jaxvpr")
    folder = cache / "synthetic_city-small-seed0-res128-v3/images/train/database"
    return folder if folder.is_dir() else None


def generate(folder: Path, count: int, size: int) -> Path:
    """``count`` size x size JPEGs (quality 90) of smooth colour with texture, geotagged names."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        base = rng.integers(0, 200, 3)
        ramp = np.linspace(0, 50, size)[None, :, None]
        arr = np.clip(base + ramp + rng.integers(-12, 13, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"@{500000 + i:.2f}@{4000000 + i % 97:.2f}@10@S@@@p{i}@@0@@@@@@.jpg",
                                  quality=90)
    return folder


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "?"


def rate(fn, rows) -> float:
    start = time.perf_counter()
    for row in rows:
        fn(int(row))
    return len(rows) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=None, help="an image folder (default: the synthetic city's, else generated)")
    parser.add_argument("--reads", type=int, default=2000, help="images read per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--generate", type=int, default=2000, help="JPEGs to generate when there is no folder")
    parser.add_argument("--size", type=int, default=256, help="side of the generated JPEGs")
    parser.add_argument("--shard-size-mb", type=float, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(args.folder) if args.folder else default_folder()
        if src is None:
            src = generate(Path(tmp) / "database", args.generate, args.size)
        folder = read_image_folder(src)
        start = time.perf_counter()
        packed = pack.pack(src, Path(tmp) / "packed", shard_size_mb=args.shard_size_mb, progress=False)
        pack_s = time.perf_counter() - start
        files, records = folder.abs_paths(), packed.abs_paths()
        data = records._data  # the ArrayRecordDataSource the records are read from
        mb = sum(os.path.getsize(p) for p in files) / 2**20
        rows = np.random.default_rng(0).integers(0, len(folder), args.reads)

        def read_file(i):
            with open(files[i], "rb") as f:
                return f.read()

        sides = {
            ("files", "read only"): lambda i: read_file(i),
            ("shards", "read only"): lambda i: data[i],
            ("files", "read + decode"): lambda i: load_image(files[i]),
            ("shards", "read + decode"): lambda i: records.load(i),
        }
        runs = {key: [] for key in sides}
        for r in range(args.rounds):
            for key in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                runs[key].append(rate(sides[key], rows))

    print(f"folder {src}: {len(folder)} images, {mb:.1f} MB; packed in {pack_s:.1f} s "
          f"({len(folder) / pack_s:.0f} img/s) into {len(packed.shard_files)} shard(s)")
    print(f"{cpu_model()}, {os.cpu_count()} cores; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{args.reads} reads in random order per round, {args.rounds} rounds, single process\n")
    print("| work | files img/s (min-max) | shards img/s (min-max) | shards/files |")
    print("|---|---|---|---|")
    for work in ("read only", "read + decode"):
        f, s = runs[("files", work)], runs[("shards", work)]
        print(f"| {work} | {statistics.median(f):.0f} ({min(f):.0f}-{max(f):.0f}) | "
              f"{statistics.median(s):.0f} ({min(s):.0f}-{max(s):.0f}) | {statistics.median(s) / statistics.median(f):.2f} |")


if __name__ == "__main__":
    main()
