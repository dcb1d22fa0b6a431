"""Triplet mining of the VG benchmark (Berton et al., CVPR 2022), as pure numpy functions.

Each cache refresh produces one row per sampled query, ``[query, best positive, negs_num_per_query
negatives]``, as the benchmark's ``datasets_ws.py`` does (fact sheet §B.6). The triplet recipe
(``jaxvpr.train.triplet``) runs it in three moves:

1. ``plan(...)`` samples the queries of this refresh and lists which database images need a
   descriptor (``MiningPlan.database``);
2. the recipe describes ``plan.queries`` and ``plan.database`` with the full model in eval mode;
3. ``select(...)`` picks, per query, the best positive and the hardest negatives from those
   descriptors; the recipe then feeds the rows in order, ``batch_size`` at a time, dropping the
   last incomplete batch (§B.7: DataLoader without shuffle, ``drop_last``; the random order of the
   sampled queries is the only shuffle).

Positives (§B.2): a database image is a *hard* positive of a query when it is at most
``train_positives_dist_threshold`` metres away (10 m upstream), a *soft* positive when at most
``val_positive_dist_threshold`` metres (25 m); distances are Euclidean on UTM and a distance equal
to the radius counts. Queries without a hard positive are dropped. The best positive is the hard
positive nearest to the query in descriptor space (L2); negatives are never soft positives.

The three methods (§B.6):

* ``partial`` (the default, used by the thesis): ``cache_refresh_rate`` queries sampled uniformly
  without replacement; ``min(neg_samples_num, Nd)`` database images sampled without replacement and
  shared by all queries of the refresh (the thesis fork's ``min``, §B.11, so that Baidu Mall's 689
  database images work); a query's negatives are the ``negs_num_per_query`` nearest of those images
  once its soft positives are removed. Descriptors needed: sampled images and hard positives.
* ``full``: every database image is described; per query, ``min(neg_samples_num, Nd)`` fresh random
  database images minus its soft positives, together with its previous hardest negatives
  (``neg_cache[q]``, which the caller persists across refreshes and checkpoints), give the
  candidates; the nearest ``negs_num_per_query`` are the negatives and replace ``neg_cache[q]``.
* ``random``: only the hard positives are described (for the best positive); the negatives are the
  first ``negs_num_per_query`` of a random draw of ``negs_num_per_query + #soft positives`` database
  images without replacement, in draw order, after removing the soft positives. No descriptor
  decides them.

There is no margin-violation filter (§B.6). AdAGeo's variant (§A.2.6) would differ there: it samples
its 1000 candidates *with* replacement among images farther than 25 m, keeps of the 10 nearest only
those closer than the positive plus sqrt(0.1), and skips a query when none violates the margin.

Deliberate differences from upstream, none of which changes a result the upstream code produces:
ties in descriptor distance go to the lowest database index (faiss leaves them unspecified); in
``full`` the soft positives are removed after the union with ``neg_cache`` as well (a no-op for a
cache this module wrote); and where too few candidates remain for a query, a ``ValueError`` says
so, instead of numpy's error (``random``) or a short row (``partial``/``full``). ``full`` and
``random`` follow upstream: the fork broke them (§B.11).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxvpr.data.positives import PositiveFinder
from jaxvpr.train.config import ConfigError

METHODS = ("partial", "full", "random")

# Memory bound of one (query chunk x candidates) float64 distance block, and the float64 copy of
# the descriptors it is computed from.
_CHUNK_BYTES = 1 << 26


@dataclasses.dataclass
class TripletDataset:
    """Positives of one training dataset (or the union of several, already coordinate-shifted)."""
    db_utm: np.ndarray            # (Nd, 2) float64 metres
    q_utm: np.ndarray             # (Nq, 2)
    hard_positives: list[np.ndarray]   # per query: sorted db indices within hard_m (train_positives_dist_threshold)
    soft_positives: list[np.ndarray]   # per query: sorted db indices within soft_m (val_positive_dist_threshold)
    valid_queries: np.ndarray     # sorted query indices with at least one hard positive
    num_dropped: int              # queries without a hard positive (dropped, as VG datasets_ws.py does)

    @property
    def num_database(self) -> int:
        return len(self.db_utm)

    @property
    def num_queries(self) -> int:
        return len(self.q_utm)


@dataclasses.dataclass
class MiningPlan:
    queries: np.ndarray      # (Qs,) query indices sampled for this cache refresh (subset of valid_queries)
    database: np.ndarray     # (Nc,) sorted unique db indices whose descriptors are needed
    negative_pool: np.ndarray  # partial: the sampled db images (neg candidates); full: per-query pools are drawn in select; random: empty


def build_triplet_dataset(db_utm, q_utm, hard_m: float, soft_m: float, db_heading=None, q_heading=None,
                          hard_angle_deg: float | None = None) -> TripletDataset:
    """Hard (<= hard_m metres) and soft (<= soft_m metres) positives of every query (§B.2).

    Example: database at east 0, 5, 20 m, a query at 0 m, hard_m 5, soft_m 20 -> hard positives
    [0, 1] (5 m is on the radius and counts), soft positives [0, 1, 2].

    ``hard_angle_deg`` also requires a hard positive's heading within that many degrees of the
    query's (``train.positives_angle_deg``; the VG benchmark and AdAGeo use distance only). Soft
    positives stay distance-only: an image 10 m away looking elsewhere is still no negative.
    """
    if hard_m > soft_m:
        raise ConfigError(
            f"train_positives_dist_threshold (hard, {hard_m} m) must not exceed val_positive_dist_threshold "
            f"(soft, {soft_m} m): a positive farther than the soft radius could also be drawn as a negative. "
            "Lower the first or raise the second.")
    db_utm = np.asarray(db_utm, dtype=np.float64)
    q_utm = np.asarray(q_utm, dtype=np.float64)
    if q_utm.ndim != 2 or q_utm.shape[1] != 2:
        raise ValueError(f"q_utm must be (N, 2) east/north in metres, got shape {q_utm.shape}")
    finder = PositiveFinder(db_utm, db_heading if hard_angle_deg is not None else None)
    hard = finder.positives(q_utm, hard_m, q_heading, hard_angle_deg)
    soft = finder.positives(q_utm, soft_m)
    valid = np.array([i for i, h in enumerate(hard) if len(h)], dtype=np.int64)
    return TripletDataset(db_utm=db_utm, q_utm=q_utm, hard_positives=hard, soft_positives=soft,
                          valid_queries=valid, num_dropped=len(q_utm) - len(valid))


def new_neg_cache(num_queries: int, negs_num_per_query: int) -> np.ndarray:
    """The ``full`` method's memory of each query's hardest negatives: int64 (Nq, k), -1 = none yet."""
    return np.full((num_queries, negs_num_per_query), -1, dtype=np.int64)


def _check_method(method: str):
    if method not in METHODS:
        raise ValueError(f"Unknown mining method {method!r}; choose one of {', '.join(METHODS)}.")


def _check_positive_int(value, name: str):
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def plan(method: str, data: TripletDataset, rng: np.random.Generator, cache_refresh_rate: int,
         neg_samples_num: int, neg_cache: np.ndarray | None = None) -> MiningPlan:
    """Sample this refresh's queries (and, for ``partial``, its negative pool) and list the images to describe.

    The queries are ``min(cache_refresh_rate, #valid queries)`` valid queries drawn uniformly without
    replacement, in draw order (that order is the order of the triplets). The rng is used for the
    queries first, then (``partial`` only) for ``min(neg_samples_num, Nd)`` database images.
    """
    _check_method(method)
    _check_positive_int(cache_refresh_rate, "cache_refresh_rate")
    _check_positive_int(neg_samples_num, "neg_samples_num")
    if len(data.valid_queries) == 0:
        raise ValueError(f"No training query has a hard positive ({data.num_dropped} dropped): check the "
                         "dataset's coordinates or raise train_positives_dist_threshold.")
    if neg_cache is not None and len(neg_cache) != data.num_queries:
        raise ValueError(f"neg_cache has {len(neg_cache)} rows but the dataset has {data.num_queries} queries; "
                         "create it with new_neg_cache(num_queries, negs_num_per_query) for this dataset.")
    num_q = min(int(cache_refresh_rate), len(data.valid_queries))
    queries = rng.choice(data.valid_queries, size=num_q, replace=False).astype(np.int64)
    positives = np.concatenate([data.hard_positives[q] for q in queries]).astype(np.int64)
    empty = np.zeros(0, dtype=np.int64)
    if method == "partial":
        pool = np.sort(rng.choice(data.num_database, size=min(int(neg_samples_num), data.num_database),
                                  replace=False)).astype(np.int64)
        return MiningPlan(queries, np.union1d(pool, positives), pool)
    if method == "full":
        return MiningPlan(queries, np.arange(data.num_database, dtype=np.int64), empty)
    return MiningPlan(queries, np.unique(positives), empty)


def _squared_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) squared L2 distances in float64 (exact for small-integer descriptors).

    ``b`` is converted to float64 in blocks of rows, so its float64 copy stays under _CHUNK_BYTES.
    """
    a = np.asarray(a, dtype=np.float64)
    a2 = (a * a).sum(1)[:, None]
    out = np.empty((len(a), len(b)), dtype=np.float64)
    step = max(1, _CHUNK_BYTES // (8 * max(1, a.shape[1])))
    for start in range(0, len(b), step):
        block = np.asarray(b[start:start + step], dtype=np.float64)
        out[:, start:start + step] = a2 + (block * block).sum(1)[None, :] - 2.0 * (a @ block.T)
    return np.maximum(out, 0.0)


def _rows(database: np.ndarray, idx: np.ndarray, what: str) -> np.ndarray:
    """Rows of ``idx`` in the sorted plan.database; raises if the plan lacks one."""
    rows = np.searchsorted(database, idx)
    rows_ok = np.minimum(rows, len(database) - 1)
    if len(idx) and (len(database) == 0 or (database[rows_ok] != idx).any()):
        raise ValueError(f"The plan's database lacks some {what}; db_desc must come from the plan of the "
                         "same dataset and method.")
    return rows


def _too_few(query: int, found: int, k: int):
    raise ConfigError(
        f"Query {query} has only {found} negative candidates outside its soft positives, fewer than "
        f"negs_num_per_query={k}: lower negs_num_per_query, enlarge neg_samples_num, or lower "
        "val_positive_dist_threshold (the soft radius; a small indoor floor can lie within 25 m of a query).")


def select(method: str, data: TripletDataset, plan: MiningPlan, q_desc: np.ndarray, db_desc: np.ndarray,
           rng: np.random.Generator, negs_num_per_query: int = 10, neg_samples_num: int = 1000,
           neg_cache: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Triplets ``[query, best positive, negatives...]`` (int64, (Qs, 2 + negs_num_per_query)).

    ``q_desc`` rows follow ``plan.queries`` and ``db_desc`` rows ``plan.database``. Returned indices
    are dataset indices (queries / database), not plan rows. The second result is the updated copy
    of ``neg_cache`` for ``full`` and ``neg_cache`` unchanged otherwise.
    """
    _check_method(method)
    _check_positive_int(negs_num_per_query, "negs_num_per_query")
    _check_positive_int(neg_samples_num, "neg_samples_num")
    k = int(negs_num_per_query)
    q_desc = np.asarray(q_desc)
    db_desc = np.asarray(db_desc)
    if q_desc.ndim != 2 or len(q_desc) != len(plan.queries):
        raise ValueError(f"q_desc must be ({len(plan.queries)}, D), one row per plan.queries, got {q_desc.shape}")
    if db_desc.ndim != 2 or len(db_desc) != len(plan.database) or db_desc.shape[1] != q_desc.shape[1]:
        raise ValueError(f"db_desc must be ({len(plan.database)}, {q_desc.shape[1]}), one row per plan.database, "
                         f"got {db_desc.shape}")
    if method == "full":
        if neg_cache is None:
            raise ValueError("Full mining needs neg_cache: create it once with new_neg_cache(num_queries, "
                             "negs_num_per_query) and pass back the returned copy at every refresh.")
        if neg_cache.shape != (data.num_queries, k):
            raise ValueError(f"neg_cache has shape {neg_cache.shape}, expected ({data.num_queries}, {k}) = "
                             "(queries, negs_num_per_query); a changed negs_num_per_query needs a new cache.")

    triplets = np.empty((len(plan.queries), 2 + k), dtype=np.int64)
    triplets[:, 0] = plan.queries
    for i, q in enumerate(plan.queries):
        hard = data.hard_positives[q]
        d = _squared_l2(q_desc[i:i + 1], db_desc[_rows(plan.database, hard, "hard positives")])[0]
        triplets[i, 1] = hard[np.argmin(d)]  # hard is sorted: argmin's first minimum is the lowest index

    if method == "partial":
        triplets[:, 2:] = _partial_negatives(data, plan, q_desc, db_desc, k)
        return triplets, neg_cache
    if method == "random":
        for i, q in enumerate(plan.queries):
            soft = data.soft_positives[q]
            if k + len(soft) > data.num_database:
                _too_few(int(q), data.num_database - len(soft), k)
            draw = rng.choice(data.num_database, size=k + len(soft), replace=False)
            triplets[i, 2:] = draw[~np.isin(draw, soft)][:k]
        return triplets, neg_cache

    # full
    new_cache = np.array(neg_cache, dtype=np.int64, copy=True)
    num_samples = min(int(neg_samples_num), data.num_database)
    # plan.database is sorted and unique, so holding all Nd images means db_desc row j is image j
    _rows(plan.database, np.arange(data.num_database), "database images (full mining needs all of them)")
    chunk = max(1, _CHUNK_BYTES // (8 * data.num_database))
    for start in range(0, len(plan.queries), chunk):
        d = _squared_l2(q_desc[start:start + chunk], db_desc)  # (chunk, Nd), column = db index
        for j, q in enumerate(plan.queries[start:start + chunk]):
            sampled = rng.choice(data.num_database, size=num_samples, replace=False)
            previous = neg_cache[q][neg_cache[q] >= 0]
            cand = np.setdiff1d(np.union1d(sampled, previous), data.soft_positives[q])  # sorted
            if len(cand) < k:
                _too_few(int(q), len(cand), k)
            negs = cand[np.argsort(d[j, cand], kind="stable")[:k]]  # stable on sorted cand: ties -> lowest index
            triplets[start + j, 2:] = negs
            new_cache[q] = negs
    return triplets, new_cache


def violation_mask(triplets: np.ndarray, plan: MiningPlan, q_desc: np.ndarray, db_desc: np.ndarray,
                   margin: float) -> np.ndarray:
    """AdAGeo's filter (§A.2.6, step 4): which negatives of each row violate the margin at mining time.

    A negative n of query q with best positive p is kept when ``||q - n|| < ||q - p|| + margin``
    (L2 distances, not squared: AdAGeo compares square roots of faiss' squared distances, margin
    sqrt(0.1)). Returns bool (Qs, k) for ``triplets`` from :func:`select` on the same ``plan`` and
    descriptors. AdAGeo drops the other negatives and skips a query with none left; jaxvpr keeps the
    batch shape and masks them out of the loss instead (:func:`jaxvpr.train.triplet.triplet_loss_of_descriptors`).
    """
    mask = np.zeros((len(triplets), triplets.shape[1] - 2), dtype=bool)
    for i, row in enumerate(triplets):  # one query at a time: descriptors can be 32k-d
        d = np.sqrt(_squared_l2(q_desc[i:i + 1], db_desc[_rows(plan.database, row[1:], "mined images")])[0])
        mask[i] = d[1:] < d[0] + float(margin)
    return mask


def _partial_negatives(data: TripletDataset, plan: MiningPlan, q_desc, db_desc, k: int) -> np.ndarray:
    """The k nearest of the shared pool minus each query's soft positives, in chunks of queries."""
    pool = np.sort(plan.negative_pool)  # sorted so a stable sort sends ties to the lowest db index
    pool_desc = db_desc[_rows(plan.database, pool, "negative pool images")]
    out = np.empty((len(plan.queries), k), dtype=np.int64)
    chunk = max(1, _CHUNK_BYTES // (8 * max(1, len(pool))))
    for start in range(0, len(plan.queries), chunk):
        d = _squared_l2(q_desc[start:start + chunk], pool_desc)
        for j, q in enumerate(plan.queries[start:start + chunk]):
            excluded = np.isin(pool, data.soft_positives[q])
            d[j, excluded] = np.inf
            if len(pool) - excluded.sum() < k:
                _too_few(int(q), int(len(pool) - excluded.sum()), k)
        out[start:start + chunk] = pool[np.argsort(d, axis=1, kind="stable")[:, :k]]
    return out


def dataset_steps(num_triplets: int, batch_size: int) -> int:
    """Steps over one refresh's triplets with drop_last (§B.7: 1000 triplets, batch 4 -> 250)."""
    _check_positive_int(batch_size, "batch_size")
    return int(num_triplets) // int(batch_size)


def triplet_batch_indices(triplets: np.ndarray, step: int, batch_size: int) -> np.ndarray:
    """Rows ``step*batch_size ... (step+1)*batch_size`` of ``triplets``, in order (no shuffle, drop_last)."""
    steps = dataset_steps(len(triplets), batch_size)
    if not 0 <= step < steps:
        raise ValueError(f"step {step} out of range: {len(triplets)} triplets in batches of {batch_size} "
                         f"give {steps} steps (the last incomplete batch is dropped)")
    return triplets[step * batch_size:(step + 1) * batch_size]
