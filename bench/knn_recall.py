"""kNN + recall at SF-XL test scale with random descriptors: wall time and peak memory.

    python bench/knn_recall.py                     # 2.8M x 512 database, 1,000 queries (SF-XL test)
    python bench/knn_recall.py --database 100000   # a quick run

Times FAISS exact search (IndexFlatL2) and jaxvpr's recall computation (k-d tree upper bound +
O(Q*K) hit test) separately, and prints peak resident memory. The database descriptors alone take
N * D * 4 bytes (2.8M x 512 -> 5.7 GB).
"""

import argparse
import resource
import time

import faiss
import numpy as np

from jaxvpr.data.format import ImageFolder
from jaxvpr.evaluate import RECALL_VALUES, Threshold, compute_results


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--database", type=int, default=2_800_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="FAISS threads (0: all cores)")
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    t0 = time.time()
    db = rng.standard_normal((args.database, args.dim), dtype=np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    # SF-XL-like geometry: database every few metres over ~15 km x 15 km, queries among them
    db_utm = rng.uniform(0, 15_000, (args.database, 2)) + (540_000, 4_170_000)
    q_utm = db_utm[rng.integers(0, args.database, args.queries)] + rng.normal(0, 10, (args.queries, 2))
    t_make = time.time() - t0

    t0 = time.time()
    index = faiss.IndexFlatL2(args.dim)
    index.add(db)
    t_add = time.time() - t0
    t0 = time.time()
    _, predictions = index.search(q, max(RECALL_VALUES))
    t_search = time.time() - t0

    t0 = time.time()
    folder = lambda utm: ImageFolder(None, [""] * len(utm), utm, np.full(len(utm), np.nan))
    results = compute_results(folder(db_utm), folder(q_utm), predictions, [Threshold(25.0)])
    t_recall = time.time() - t0

    print(f"database {args.database:,} x {args.dim}, queries {args.queries:,}, faiss threads {faiss.omp_get_max_threads()}")
    print(f"| step | seconds |\n|---|---|")
    print(f"| make random descriptors | {t_make:.1f} |")
    print(f"| IndexFlatL2.add | {t_add:.1f} |")
    print(f"| exact search, k=20 | {t_search:.1f} |")
    print(f"| recall@1/5/10/20 + upper bound (25 m) | {t_recall:.1f} |")
    print(f"peak RSS {peak_rss_gb():.1f} GB; R@1 {results[0]['recall']['1']:.2f}% (random descriptors)")


if __name__ == "__main__":
    main()
