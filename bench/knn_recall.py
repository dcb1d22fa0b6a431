"""kNN + recall at SF-XL test scale: exact and approximate search side by side, time and peak memory.

    python bench/knn_recall.py                                  # 2.8M x 512 database, 1,000 queries
    python bench/knn_recall.py --database 200000 --indexes "flat;IVF256,Flat;HNSW32"   # a quick run
    python bench/knn_recall.py --indexes "flat;IVF4096,PQ64" --nprobe 64   # 8-bit PQ: slow to train

The descriptors are synthetic but structured like a trained model's: each image's descriptor is a
smooth function of its position (512 random Fourier features of UTM, wavelengths 20 m to 2 km)
plus per-image noise, L2-normalised; queries lie within ~10 m of a database image and are noisier.
So exact search has a meaningful recall (not the ~0 of random descriptors), and an approximate
index's loss of recall is measured against it. They are written once, streamed in row blocks, to a
``.npy`` beside ``--workdir`` (as ``jaxvpr.evaluate --descriptors-dir`` writes them).

Each search runs in its own process (peak memory is per process): ``IndexFlatL2`` is the search
jaxvpr used before (the database copied into the index, ~2x the matrix); ``flat`` is jaxvpr's exact
search now (FAISS brute force on the matrix, no copy) of descriptors held in memory, ``flat-mmap``
the same on the memory-mapped file (``--descriptors-dir``); the approximate indexes read the
memory-mapped file too (their build copies it into the index); the others are FAISS
index_factory strings with ``--nprobe``/``--ef-search``. Columns: build and search seconds, recall
@1/5/10/20 at 25 m, the change of R@1 against exact search, the share of queries whose top-1 is the
exact top-1, the process's peak resident memory from the search's start (Linux VmHWM reset by
``clear_refs``; it includes the interpreter and its imports, whose resident size before the search
is in brackets) and that peak as a multiple of the descriptor matrix.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BLOCK = 65536


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def status_gb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, anonymous and file pages."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def reset_peak() -> bool:
    """Resets this process's peak resident memory (Linux ``clear_refs`` 5), so that VmHWM measures the
    search alone, not the imports."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def features(utm: np.ndarray, freqs: np.ndarray, phases: np.ndarray) -> np.ndarray:
    angle = utm @ freqs + phases
    return np.concatenate([np.cos(angle), np.sin(angle)], axis=1).astype(np.float32)


def make_data(args, folder: Path) -> None:
    """Database and query descriptors (streamed to .npy) and their UTM, seeded."""
    from jaxvpr.search import DescriptorFile

    rng = np.random.default_rng(0)
    half = args.dim // 2
    wavelength = np.exp(rng.uniform(np.log(20.0), np.log(2000.0), half))
    direction = rng.uniform(0, 2 * np.pi, half)
    freqs = np.stack([np.cos(direction), np.sin(direction)]) * (2 * np.pi / wavelength)
    phases = rng.uniform(0, 2 * np.pi, half)
    side = 15_000.0 * np.sqrt(args.database / 2_800_000)  # SF-XL test: ~2.8M images over ~15 x 15 km
    db_utm = rng.uniform(0, side, (args.database, 2))
    out = DescriptorFile(folder / "database.npy", (args.database, args.dim))
    for a in range(0, args.database, BLOCK):
        x = features(db_utm[a:a + BLOCK], freqs, phases)
        x += args.noise * rng.standard_normal(x.shape, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[np.arange(a, a + len(x))] = x
    out.close()
    q_utm = db_utm[rng.integers(0, args.database, args.queries)] + rng.normal(0, 10, (args.queries, 2))
    q = features(q_utm, freqs, phases)
    q += 2 * args.noise * rng.standard_normal(q.shape, dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    np.save(folder / "queries.npy", q)
    np.save(folder / "database_utm.npy", db_utm + (540_000, 4_170_000))
    np.save(folder / "queries_utm.npy", q_utm + (540_000, 4_170_000))


def run_one(folder: Path, index: str, nprobe: int, ef_search: int, k: int = 20) -> dict:
    """One search in this process: seconds, predictions (saved), recalls and peak memory."""
    import faiss

    from jaxvpr.data.format import ImageFolder
    from jaxvpr.evaluate import Threshold, compute_results
    from jaxvpr.search import SearchOptions, build_index, knn

    start_gb = status_gb("VmRSS")  # the interpreter, numpy, FAISS and jaxvpr's imports (JAX among them)
    reset = reset_peak()
    db = np.load(folder / "database.npy", mmap_mode="r")
    q = np.load(folder / "queries.npy")
    t0 = time.time()
    if index == "IndexFlatL2":  # jaxvpr's search before: the database read into memory and copied
        db = np.load(folder / "database.npy")
        idx = faiss.IndexFlatL2(db.shape[1])
        idx.add(db)
        search = lambda x: idx.search(x, k)[1]
    elif index == "flat":  # jaxvpr's exact search of descriptors held in memory: nothing to build
        db = np.load(folder / "database.npy")
        search = lambda x: knn(db, x, k)[1]
    elif index == "flat-mmap":  # ... of descriptors streamed to disk (--descriptors-dir), memory-mapped
        search = lambda x: knn(db, x, k)[1]
    else:
        idx = build_index(db, SearchOptions(index, nprobe, ef_search))
        search = lambda x: idx.search(x, k)[1]
    t_build = time.time() - t0
    t0 = time.time()
    predictions = search(q)
    t_search = time.time() - t0
    utm = lambda name: np.load(folder / name)
    folder_of = lambda u: ImageFolder(None, [""] * len(u), u, np.full(len(u), np.nan))
    result = compute_results(folder_of(utm("database_utm.npy")), folder_of(utm("queries_utm.npy")), predictions,
                             [Threshold(25.0)])[0]
    return {"index": index, "build_s": t_build, "search_s": t_search, "recall": result["recall"],
            "top1": predictions[:, 0].tolist(), "start_gb": start_gb,
            "peak_gb": status_gb("VmHWM") if reset else peak_rss_gb()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", type=int, default=2_800_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--noise", type=float, default=1.0, help="per-image noise of each feature (queries: 2x); "
                        "1.0 gives an exact R@1 near 60%%")
    parser.add_argument("--indexes", default="IndexFlatL2;flat;flat-mmap;IVF1024,Flat;IVF1024,PQ64x4fs",
                        help="searches separated by ';' (a FAISS factory string holds commas)")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--ef-search", type=int, default=128)
    parser.add_argument("--workdir", default="/tmp/jaxvpr-knn-bench")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one search, print JSON
    args = parser.parse_args()
    folder = Path(args.workdir) / f"{args.database}x{args.dim}-{args.queries}-{args.noise:g}"
    if args.one:
        print("RESULT " + json.dumps(run_one(folder, args.one, args.nprobe, args.ef_search)))
        return
    if not (folder / "queries_utm.npy").exists():
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        make_data(args, folder)
        print(f"made the descriptors in {time.time() - t0:.0f} s -> {folder}")
    matrix_gb = args.database * args.dim * 4 / 1024**3
    import faiss

    print(f"database {args.database:,} x {args.dim} float32 ({matrix_gb:.2f} GiB), {args.queries:,} queries, "
          f"faiss {faiss.__version__} on {os.cpu_count()} CPU threads; nprobe {args.nprobe}, efSearch {args.ef_search}")
    rows, exact = [], None
    for index in [s for s in args.indexes.split(";") if s]:
        cmd = [sys.executable, __file__, "--database", str(args.database), "--queries", str(args.queries),
               "--dim", str(args.dim), "--noise", str(args.noise), "--workdir", args.workdir, "--one", index,
               "--nprobe", str(args.nprobe), "--ef-search", str(args.ef_search)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            print(f"{index}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(line[0][len("RESULT "):])
        if index in ("flat", "flat-mmap", "IndexFlatL2") and exact is None:
            exact = r
        rows.append(r)
    print("\n| search | build s | search s | R@1 | R@5 | R@10 | R@20 | ΔR@1 vs exact | same top-1 | peak GiB "
          "(before the search) | peak / matrix |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rec = r["recall"]
        delta = f"{rec['1'] - exact['recall']['1']:+.1f}" if exact else "-"
        same = f"{100 * np.mean(np.equal(r['top1'], exact['top1'])):.1f}%" if exact else "-"
        print(f"| {r['index']} | {r['build_s']:.1f} | {r['search_s']:.1f} | {rec['1']:.1f} | {rec['5']:.1f} | "
              f"{rec['10']:.1f} | {rec['20']:.1f} | {delta} | {same} | {r['peak_gb']:.2f} ({r['start_gb']:.2f}) | "
              f"{r['peak_gb'] / matrix_gb:.2f} |")


if __name__ == "__main__":
    main()
