"""Reading an SF-XL-sized image list (41M lines): wall time and peak memory, new reader vs the old one.

    python bench/paths_scale.py                    # 41M names (~4.4 GB list, ~5.7 GB cache; ~10 GB of disk)
    python bench/paths_scale.py --n 1000000 --old-n 200000   # a quick run

Writes N synthetic SF-XL-style names (``37.77/-122.41/@0552017.52@4180433.02@10@S@037.77184@-122.40931@
<22-char pano id>@@<heading 000-359>@@@@201311@@.jpg``, ~107 bytes a line) into
``<dir>/database_images_paths.txt`` (``--dir``, default a new temporary folder on the same disk as
``$TMPDIR``), with the first and last images present, and times, each in its own process so that
each peak resident memory (VmHWM, the high-water mark of its resident set) is its own:

* cold: ``read_image_folder`` with no cache (numpy parse; writes the cache file beside the list).
  The lines have one width, so fields are found from the first line's layout, as in a fixed-width
  list; ``--variable-width`` drops the headings' leading zeros so that each line is searched;
* cached: ``read_image_folder`` again (checks the cache's checksums, maps the paths);
* new at ``--old-n``: the cold read of the first ``--old-n`` lines (a list of its own);
* old at ``--old-n``: the reader before issue 13 on the same lines: ``read_text().splitlines()``, a
  list of str, and the per-name parser (``parse_geotags_slow``). 41M names take it minutes and ~10 GB,
  so it runs on a subset; the ratio is measured there and extrapolated to N linearly (said so).

The list file is in the OS page cache when it is read ("cold" means no jaxvpr cache, not a cold disk).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxvpr.data import format as fmt

ROWS_PER_CHUNK = 1_000_000
PANO_ALPHABET = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", np.uint8)
# Each run of a capital letter is filled in (digits, or the pano id's characters).
TEMPLATE = b"AA.BB/-CCC.DD/@EEEEEEE.FF@GGGGGGG.HH@10@S@III.JJJJJ@-KKK.LLLLL@" + b"P" * 22 + b"@@QQQ@@@@201311@@.jpg\n"


def _put_digits(rows: np.ndarray, letter: str, values: np.ndarray) -> None:
    """Writes ``values`` (non-negative ints) zero-padded over the template's run of ``letter``."""
    column, digits = TEMPLATE.index(letter.encode()), TEMPLATE.count(letter.encode())
    for k in range(digits):
        rows[:, column + digits - 1 - k] = 48 + (values // 10**k) % 10


def synthetic_lines(n: int, seed: int) -> np.ndarray:
    """(n, 107) uint8: fixed-width SF-XL-style lines ending in "\\n" (positions within San Francisco)."""
    rng = np.random.default_rng(seed)
    rows = np.tile(np.frombuffer(TEMPLATE, np.uint8), (n, 1))
    east_cm = rng.integers(54_000_000, 56_000_000, n)  # metres * 100
    north_cm = rng.integers(417_000_000, 419_000_000, n)
    lat = rng.integers(3_770_000, 3_781_000, n)  # degrees * 1e5
    lon = rng.integers(12_236_000, 12_252_000, n)  # -degrees * 1e5
    for letter, values in [("A", lat // 100_000), ("B", lat // 1000 % 100), ("C", lon // 100_000),
                           ("D", lon // 1000 % 100), ("E", east_cm // 100), ("F", east_cm % 100),
                           ("G", north_cm // 100), ("H", north_cm % 100), ("I", lat // 100_000),
                           ("J", lat % 100_000), ("K", lon // 100_000), ("L", lon % 100_000),
                           ("Q", rng.integers(0, 360, n))]:  # Q: the heading
        _put_digits(rows, letter, values)
    start = TEMPLATE.index(b"P")
    rows[:, start:start + 22] = PANO_ALPHABET[rng.integers(0, 64, (n, 22))]
    return rows


def unpadded_headings(rows: np.ndarray) -> bytes:
    """The lines with the heading's leading zeros dropped ("045" -> "45"): lines of 105 to 107 bytes."""
    q = TEMPLATE.index(b"Q")
    keep = np.ones(rows.shape, bool)
    keep[:, q] = rows[:, q] != ord("0")
    keep[:, q + 1] = keep[:, q] | (rows[:, q + 1] != ord("0"))
    return rows[keep].tobytes()


def write_list(folder: Path, n: int, seed: int = 0, variable_width: bool = False) -> Path:
    """``<folder>_images_paths.txt`` with n lines; the first and last listed images exist (empty files)."""
    list_file = folder.parent / f"{folder.name}_images_paths.txt"
    folder.mkdir(parents=True, exist_ok=True)
    with open(list_file, "wb") as f:
        for start in range(0, n, ROWS_PER_CHUNK):
            rows = synthetic_lines(min(ROWS_PER_CHUNK, n - start), seed + start)
            f.write(unpadded_headings(rows) if variable_width else rows.tobytes())
    with open(list_file, "rb") as f:
        first = f.readline().decode().strip()
        f.seek(max(0, os.path.getsize(list_file) - 4096))
        last = f.read().decode().splitlines()[-1].strip()
    for rel in (first, last):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).touch()
    return list_file


def peak_rss_gib() -> float:
    """This process's peak resident memory: VmHWM (Linux; ru_maxrss would include the parent's peak,
    as Linux keeps it across exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024**2  # KiB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def phase(name: str, folder: Path) -> dict:
    """One measurement, run in a child process; prints a JSON line."""
    t0 = time.perf_counter()
    if name == "imports":  # the interpreter, numpy and jaxvpr.data alone
        return {"phase": name, "n": 0, "seconds": 0.0, "peak_rss_gib": peak_rss_gib()}
    if name == "old":
        lines = fmt.images_paths_file(folder).read_text().splitlines()
        paths = [line.strip() for line in lines if line.strip()]
        utm, heading = fmt.parse_geotags_slow(paths)
        n, pickled = len(paths), None
    else:
        f = fmt.read_image_folder(folder)
        utm, heading, n = f.utm, f.heading, len(f)
        pickled = len(pickle.dumps(f.abs_paths()))
    seconds = time.perf_counter() - t0
    return {"phase": name, "n": n, "seconds": seconds, "peak_rss_gib": peak_rss_gib(), "pickled_paths_bytes": pickled,
            "utm_sum": float(utm.sum()), "heading_sum": float(np.nansum(heading))}


def run_phase(name: str, folder: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, __file__, "--phase", name, "--folder", str(folder)], env=env,
                         check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {name:>6}: {result['n']:>10,d} names  {result['seconds']:8.2f} s  peak RSS {result['peak_rss_gib']:.2f} GiB",
          flush=True)
    return result


def remove_caches(list_file: Path) -> None:
    for cache in fmt.image_list_caches(list_file):
        cache.unlink(missing_ok=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=41_000_000, help="names in the list (SF-XL train: 41M)")
    parser.add_argument("--old-n", type=int, default=1_000_000, help="names for the old reader and the ratio")
    parser.add_argument("--dir", default="", help="work folder (default: a new temporary folder, removed)")
    parser.add_argument("--variable-width", action="store_true",
                        help="headings without leading zeros: lines of several widths (no fixed-layout shortcut)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, Path(args.folder))))
        return

    work = Path(args.dir or tempfile.mkdtemp(prefix="paths_scale-"))
    os.environ["JAXVPR_CACHE"] = str(work / "user_cache")  # children inherit it: nothing lands in ~/.cache
    print(f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()}; work folder {work}", flush=True)
    try:
        big, small = work / "full" / "database", work / "subset" / "database"
        t0 = time.perf_counter()
        big_list = write_list(big, args.n, variable_width=args.variable_width)
        small_list = write_list(small, args.old_n, variable_width=args.variable_width)
        print(f"wrote {args.n:,d} names ({big_list.stat().st_size / 1e9:.2f} GB) and {args.old_n:,d} names "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
        remove_caches(big_list)
        cold = run_phase("cold", big)
        cache = next(c for c in fmt.image_list_caches(big_list) if c.exists())
        print(f"  cache file {cache.name}: {cache.stat().st_size / 1e9:.2f} GB", flush=True)
        cached = run_phase("cached", big)
        assert (cold["utm_sum"], cold["heading_sum"]) == (cached["utm_sum"], cached["heading_sum"])
        remove_caches(small_list)
        new_small = run_phase("cold", small)
        old_small = run_phase("old", small)
        assert (new_small["utm_sum"], new_small["heading_sum"]) == (old_small["utm_sum"], old_small["heading_sum"])
        base = run_phase("imports", small)["peak_rss_gib"]
        ratio = old_small["seconds"] / new_small["seconds"]
        scale = args.n / args.old_n
        print(f"old/new at {args.old_n:,d} names: {ratio:.1f}x; the old reader extrapolated linearly to "
              f"{args.n:,d} names: {old_small['seconds'] * scale:.0f} s, peak RSS "
              f"{base + (old_small['peak_rss_gib'] - base) * scale:.1f} GiB; paths pickled to a worker: "
              f"{cold['pickled_paths_bytes']:,d} B (mapped cache)", flush=True)
        print(f"load average at the end {os.getloadavg()}", flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
