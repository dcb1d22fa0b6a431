"""Evaluation: descriptors -> FAISS exact kNN (L2) -> recall@{1,5,10,20} per threshold (SPEC §4).

A query counts at N when any of its first N predictions is a positive: a database image within
``distance_m`` metres and, when an angle is paired with the distance, within ``angle_deg`` degrees of
heading (thesis Tables 5.2-5.21). The upper bound is the share of queries that have any positive.

Unreadable images (empty, not an image, truncated, listed but missing): an unreadable database image
stops the evaluation with its name, or with ``skip_corrupt`` is skipped (it cannot be retrieved).
An unreadable query is, by ``unreadable_queries``: ``"miss"`` (default) never found but kept in the
recall's denominator, as CosPlace and the VG benchmark divide by every query; ``"exclude"`` left out
of the denominator (jaxvpr's earlier ``--skip-corrupt``: recalls not comparable with published
ones); ``"error"`` stops the evaluation. Skipped images are counted and listed in results.json. A
truncated JPEG decodes as in CosPlace with ``--truncated-images pil`` (``jaxvpr.data.images``).

Command line::

    python -m jaxvpr.evaluate --dataset DATA/images/test --queries queries_night \\
        --model cosplace_resnet18_512 --random-init --resize 128 --out results/
    python -m jaxvpr.evaluate --dataset /data/gangnam_b2/images/test --checkpoint CKPT \\
        --thresholds 1,10,25,1,10,25 --angles -,-,-,5,30,60
    python -m jaxvpr.evaluate ... --out results/ --save-predictions 5 --only-wrong --save-map  # pictures
    python -m jaxvpr.evaluate ... --resize 480,640 --test-method maj_voting --pca-dim 256  # VG test time
    python -m jaxvpr.evaluate ... --truncated-images pil --skip-corrupt  # SF-XL as CosPlace reads it
    python -m jaxvpr.evaluate ... --descriptors-dir /scratch/sfxl --search-index IVF4096,PQ64  # SF-XL scale
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxvpr import parallel, search
from jaxvpr.data.format import ImageFolder, SplitDataset, read_split
from jaxvpr.data.positives import PositiveFinder, is_positive
from jaxvpr.search import DescriptorFile, SearchOptions

RECALL_VALUES = (1, 5, 10, 20)
UNREADABLE_QUERIES = ("miss", "exclude", "error")  # what an unreadable query counts as (module docstring)


# ----------------------------------------------------------------------------- kNN and recall
def knn(database: np.ndarray, queries: np.ndarray, k: int = max(RECALL_VALUES),
        options: SearchOptions | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 nearest neighbours (FAISS's IndexFlatL2 search, without copying the database), or
    an approximate index's (``options``, :mod:`jaxvpr.search`): ``(squared distances, indices)``,
    each (Q, k). When the database has fewer than ``k`` images, missing columns hold index -1.
    """
    return search.knn(database, queries, k, options)


def recalls_from_hits(hits: np.ndarray, recall_values: Sequence[int] = RECALL_VALUES) -> dict[str, float]:
    """Recall@N in percent from hits (Q, K) bool: a query counts at N if any of its first N hits is True."""
    hits = np.asarray(hits, dtype=bool)
    if hits.shape[0] == 0:
        return {str(n): 0.0 for n in recall_values}
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), np.iinfo(np.int64).max)
    return {str(n): float(100.0 * np.mean(first_hit < n)) for n in recall_values}


@dataclasses.dataclass(frozen=True)
class Threshold:
    """A positive criterion: distance in metres, optionally paired with a heading angle in degrees."""

    distance_m: float
    angle_deg: float | None = None

    def label(self) -> str:
        d = f"{self.distance_m:g}m"
        return d if self.angle_deg is None else f"{d} {self.angle_deg:g}°"


def parse_thresholds(distances: str | Sequence[float], angles: str | Sequence | None = None) -> list[Threshold]:
    """``"25"`` -> [25 m]; ``"1,10,25"`` with ``"5,30,60"`` -> pairs; ``"-"`` in angles means none.

    With fewer angles than distances, each angle pairs with the distance at the same position and the
    distances left over are used alone; ``"1,10,25"`` + ``"5,30,60"`` gives the three paired
    thresholds, and ``"1,10,25,1,10,25"`` + ``"-,-,-,5,30,60"`` the six of the thesis' tables.
    """
    def split(v):
        if v is None:
            return []
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return list(v)

    def number(value, what: str) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"thresholds {distances!r}, angles {angles!r}: {what} {value!r} is not a number "
                             "(e.g. thresholds 1,10,25 with angles -,30,60).") from None

    ds = [number(d, "distance") for d in split(distances)]
    angs = split(angles)
    if len(angs) > len(ds):
        raise ValueError(f"{len(angs)} angles for {len(ds)} distances: each angle pairs with one distance.")
    out = []
    for i, d in enumerate(ds):
        a = angs[i] if i < len(angs) else None
        a = None if a in (None, "-", "none", "") else number(a, "angle")
        if d <= 0 or (a is not None and not 0 < a <= 180):
            raise ValueError(f"Threshold {d} m / {a}° out of range (distance > 0, 0 < angle <= 180).")
        out.append(Threshold(d, a))
    return out


def compute_results(database: ImageFolder, queries: ImageFolder, predictions: np.ndarray,
                    thresholds: Sequence[Threshold],
                    recall_values: Sequence[int] = RECALL_VALUES) -> list[dict]:
    """Recall@N and upper bound (percent) for each threshold, from kNN predictions (Q, K)."""
    finder = PositiveFinder(database.utm, database.heading)
    out = []
    for t in thresholds:
        hits = is_positive(database.utm, queries.utm, predictions, t.distance_m,
                           database.heading, queries.heading, t.angle_deg)
        upper = finder.has_positive(queries.utm, t.distance_m, queries.heading, t.angle_deg)
        out.append({
            "distance_m": t.distance_m,
            "angle_deg": t.angle_deg,
            "upper_bound": float(100.0 * upper.mean()) if len(upper) else 0.0,
            "recall": recalls_from_hits(hits, recall_values),
        })
    return out


def chance_recalls(database: ImageFolder, queries: ImageFolder, threshold: Threshold = Threshold(25.0),
                   recall_values: Sequence[int] = RECALL_VALUES) -> dict[str, float]:
    """Expected recall@N (percent) of a uniformly random ranking of the database: the chance level.

    A query with P positives among D database images is missed at N with probability
    C(D - P, N) / C(D, N) = prod_{i < N} (D - P - i) / (D - i); the chance recall@N is the mean of
    one minus that over the queries.
    """
    finder = PositiveFinder(database.utm, database.heading)
    found = finder.positives(queries.utm, threshold.distance_m, queries.heading, threshold.angle_deg)
    n_pos = np.asarray([len(p) for p in found], np.float64)
    d = float(len(database))
    out = {}
    for n in recall_values:
        miss = np.ones_like(n_pos)
        for i in range(min(int(n), int(d))):
            miss *= np.clip((d - n_pos - i) / (d - i), 0.0, 1.0)
        out[str(n)] = float(100.0 * np.mean(1.0 - miss)) if len(n_pos) else 0.0
    return out


def skipped_summary(results: dict) -> str:
    """One line on the unreadable images of a results dict that has any (``num_queries_skipped``)."""
    queries = "counted as misses" if results["unreadable_queries"] == "miss" else "left out of the recall"
    return (f"unreadable images: {results['num_database_skipped']} database images skipped, "
            f"{results['num_queries_skipped']} queries {queries}")


def format_table(results: list[dict], title: str = "") -> str:
    """A plain-text table: one row per threshold, columns R@N and the upper bound."""
    keys = list(results[0]["recall"]) if results else [str(n) for n in RECALL_VALUES]
    header = f"{'threshold':>12} | " + " | ".join(f"R@{k:>3}" for k in keys) + " | upper bound"
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    for r in results:
        label = Threshold(r["distance_m"], r["angle_deg"]).label()
        lines.append(f"{label:>12} | " + " | ".join(f"{r['recall'][k]:5.1f}" for k in keys)
                     + f" | {r['upper_bound']:5.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- descriptors
@dataclasses.dataclass
class Descriptors:
    """Descriptors of a folder: ``values`` (N, D) float32; ``valid`` False where an image was skipped."""

    values: np.ndarray
    valid: np.ndarray
    skipped_paths: list[str]


class Describer:
    """Jitted inference ``(variables, images) -> descriptors`` of one model, compiled once per shape.

    Batches whose size is a multiple of the device count are split over the mesh's batch axes;
    variables are replicated. Build one per model and reuse it (e.g. every epoch of a training run).
    """

    def __init__(self, model, mesh=None):
        # Each process describes its own share of the images on its own devices (see
        # extract_descriptors), so the default mesh holds this process's devices only.
        self.mesh = parallel.local_mesh() if mesh is None else mesh
        self._shards = parallel.num_batch_shards(self.mesh)
        self._batch = parallel.batch_sharding(self.mesh)
        self._replicated = parallel.replicated(self.mesh)
        self._apply = jax.jit(lambda v, x: model.apply(v, x, train=False))

    def bind(self, variables) -> Callable[[np.ndarray], jax.Array]:
        variables = jax.device_put(parallel.to_host(variables), self._replicated)

        def describe(images: np.ndarray) -> jax.Array:
            if images.shape[0] % self._shards == 0:
                images = jax.device_put(images, self._batch)
            return self._apply(variables, images)

        return describe


def extract_descriptors(describe: Callable, paths: list[str], batch_size: int = 32, resize=None,
                        num_workers: int = 0, skip_corrupt: bool = False, desc: str = "images",
                        progress: bool = True, mixed_sizes: bool = False, transform=None,
                        store: str | os.PathLike | None = None) -> Descriptors:
    """Descriptors of the images at ``paths`` (absolute), in order, batched with a padded last batch.

    With several processes, each describes one block of the paths and the blocks are gathered, so
    every process ends with all descriptors (and the same recalls as one process).
    With ``mixed_sizes`` (queries such as Tokyo 24/7's phone photos at native size), images are
    grouped by size from their headers and each size is batched on its own (one compilation per
    distinct size); otherwise every batch must hold one size (a fixed ``resize`` guarantees it).
    A ``transform`` replaces resize and normalisation (``pipeline.eval_batches``); one that gives V
    views of each image (a test-time method's crops, ``jaxvpr.testtime``) makes ``values`` (N, V, D).

    With ``store`` (a ``.npy`` path) the descriptors stream to that file batch by batch, written
    once complete (atomically), and ``values`` is the file memory-mapped: an SF-XL database (2.8M x
    512) is never held in the process's memory. With several processes the blocks are gathered into
    it in row chunks; processes other than the first keep their copy in an unlinked file beside it.
    """
    from tqdm.auto import tqdm

    from jaxvpr.data import pipeline

    start, stop, per = parallel.process_rows(len(paths))
    mine = paths[start:stop]
    values = None
    valid = np.zeros(per, dtype=bool)
    single = jax.process_count() == 1
    if mine:
        make = pipeline.eval_batches_by_size if mixed_sizes else pipeline.eval_batches
        batches = make(mine, batch_size=batch_size, resize=resize, num_workers=num_workers, skip_corrupt=skip_corrupt,
                       transform=transform)
        show = progress and parallel.is_main_process()
        try:
            with tqdm(total=len(mine), desc=f"describing {desc}", unit="img", disable=not show) as bar:
                for batch in batches:
                    images = batch["image"]  # (B, H, W, 3), or (B, V, H, W, 3): views described together
                    out = describe(images.reshape((-1,) + images.shape[-3:]))
                    out = np.asarray(jax.device_get(out), dtype=np.float32)
                    out = out.reshape(images.shape[:-3] + out.shape[1:])
                    if values is None:
                        shape = (per,) + out.shape[1:]
                        values = (np.zeros(shape, dtype=np.float32) if store is None else
                                  DescriptorFile(store if single else _process_store(store, "block"), shape))
                    keep = batch["valid"]
                    values[batch["index"][keep]] = out[keep]
                    valid[batch["index"][keep]] = True
                    bar.update(int((batch["index"] >= 0).sum()))
        except BaseException:
            if isinstance(values, DescriptorFile):
                values.discard()
            raise
    # (views or 0, dim) of the descriptors, known to every process, also one that read no image.
    row_shape = (-1, -1) if values is None else ((0,) + values.shape[1:])[-2:]
    views, dim = parallel.gather_rows(np.array([row_shape]), jax.process_count()).max(axis=0)
    if dim < 0:
        raise ValueError(f"No image of {desc} could be read ({len(paths)} listed).")
    row = (views, dim) if views else (dim,)
    valid = parallel.gather_rows(valid, len(paths))
    if store is None:
        if values is None:
            values = np.zeros((per,) + row, dtype=np.float32)
        values = parallel.gather_rows(values, len(paths))
    else:
        if values is None:  # this process read no image: an empty block of the right shape
            values = DescriptorFile(_process_store(store, "block"), (per,) + row)
        values = values.close()
        values = np.load(values, mmap_mode="r") if single else _gather_store(values, store, len(paths), per, row)
    skipped = [paths[i] for i in np.flatnonzero(~valid)]
    return Descriptors(values, valid, skipped)


def _process_store(store, what: str) -> Path:
    """This process's file ``<store stem>.<what>.process<i>.npy`` beside ``store``."""
    store = Path(store)
    return store.with_name(f"{store.stem}.{what}.process{jax.process_index()}.npy")


GATHER_ROWS = 65536  # rows of each process's block gathered at once into a descriptor file


def _gather_store(block_path: Path, store, total: int, per: int, row: tuple) -> np.ndarray:
    """Every process's block file -> the full descriptor file of every process (mapped), in row chunks."""
    block = np.load(block_path, mmap_mode="r")
    final = Path(store) if parallel.is_main_process() else _process_store(store, "all")
    out = DescriptorFile(final, (total,) + row)
    try:
        for a in range(0, per, GATHER_ROWS):
            chunk = np.asarray(block[a:a + GATHER_ROWS])  # every process's block has `per` rows: equal chunks
            processes = jax.process_count()
            stacked = parallel.gather_rows(chunk, processes * len(chunk)).reshape((processes,) + chunk.shape)
            for p, rows in enumerate(stacked):
                first = p * per + a
                rows = rows[:max(0, min(len(rows), total - first))]
                out[np.arange(first, first + len(rows))] = rows
    except BaseException:
        out.discard()
        raise
    del block
    block_path.unlink()
    out.close()
    mapped = np.load(final, mmap_mode="r")
    if not parallel.is_main_process():  # a private copy: unlinked while mapped (freed when unmapped)
        final.unlink()
    return mapped


def check_unreadable_queries(unreadable_queries: str) -> str:
    if unreadable_queries not in UNREADABLE_QUERIES:
        raise ValueError(f"unreadable_queries={unreadable_queries!r}: expected 'miss' (counted in the recall, "
                         "never found), 'exclude' (left out of the recall) or 'error' (stop).")
    return unreadable_queries


def evaluate_descriptors(split: SplitDataset, db: Descriptors, q: Descriptors,
                         thresholds: Sequence[Threshold], queries_folder: str = "queries",
                         test_method: str = "hard_resize", majority_weight: float = 0.01,
                         unreadable_queries: str = "miss",
                         search_options: SearchOptions | None = None) -> tuple[dict, np.ndarray]:
    """results.json content and the top-K predictions (indices into the database), from descriptors.

    Skipped (unreadable) database images cannot be retrieved. Skipped queries have no predictions
    (-1) and, with ``unreadable_queries="miss"``, stay in the recall as misses: ``num_queries``, the
    recall's denominator, is every query; with ``"exclude"`` they are left out of the recall and of
    ``num_queries``. Either way they are counted in ``num_queries_skipped``. Crop descriptors
    (Q, 5, D) of nearest_crop and maj_voting are searched and merged as ``jaxvpr.testtime.search``
    describes. ``search_options`` picks an approximate index or the GPU (:mod:`jaxvpr.search`; default
    exact on the CPU), recorded in results.json as ``search``.
    """
    from jaxvpr import testtime

    check_unreadable_queries(unreadable_queries)
    db_rows = np.flatnonzero(db.valid)
    q_rows = np.flatnonzero(q.valid)
    k = max(RECALL_VALUES)
    database = db.values if len(db_rows) == len(db.valid) else db.values[db_rows]  # no copy when all were read
    queries = q.values if len(q_rows) == len(q.valid) else q.values[q_rows]
    _, found = testtime.search(database, queries, k, test_method, majority_weight, search_options)
    del database
    full_predictions = np.full((len(split.queries), k), -1, dtype=np.int64)
    full_predictions[q_rows] = np.where(found >= 0, db_rows[np.maximum(found, 0)], -1)
    counted = q_rows if unreadable_queries == "exclude" else np.arange(len(split.queries))
    queries = ImageFolder(split.queries.root, [split.queries.paths[i] for i in counted],
                          split.queries.utm[counted], split.queries.heading[counted])
    results = {
        "dataset": split.name,
        "queries_folder": queries_folder,
        "num_database": int(len(db_rows)),
        "num_queries": int(len(counted)),
        "descriptor_dim": int(db.values.shape[1]),
        "test_method": test_method,
        "results": compute_results(split.database, queries, full_predictions[counted], thresholds),
    }
    if test_method == "maj_voting":
        results["majority_weight"] = majority_weight
    if search_options is not None and (not search_options.is_exact() or search_options.gpu):
        results["search"] = search_options.summary()
    if len(db.skipped_paths) or len(q.skipped_paths):
        results["num_database_skipped"] = len(db.skipped_paths)
        results["num_queries_skipped"] = len(q.skipped_paths)
        results["unreadable_queries"] = "exclude" if unreadable_queries == "exclude" else "miss"
        results["skipped_paths"] = db.skipped_paths + q.skipped_paths
    return results, full_predictions


def evaluate_split(describe: Callable, split: SplitDataset, queries_folder: str = "queries",
                   thresholds: Sequence[Threshold] = (Threshold(25.0),), resize=None, queries_resize="same",
                   batch_size: int = 32, num_workers: int = 0, skip_corrupt: bool = False,
                   out_dir: str | os.PathLike | None = None, save_descriptors: bool = False,
                   progress: bool = True, pictures=None, test_method: str = "hard_resize",
                   majority_weight: float = 0.01, pca_dim: int | None = None, pca_folder: str | None = None,
                   unreadable_queries: str = "miss", search_options: SearchOptions | None = None,
                   descriptors_dir: str | os.PathLike | None = None) -> dict:
    """Describes the split's database and queries with ``describe`` and computes the results dict.

    ``skip_corrupt`` skips unreadable database (and PCA) images; ``unreadable_queries`` says what an
    unreadable query is (module docstring). ``pictures`` (a :class:`jaxvpr.visualize.PictureOptions`)
    draws the per-query predictions and the map into ``out_dir`` as well. ``test_method`` is one of
    the VG benchmark's ways to describe and search queries (``jaxvpr.testtime``; the database always
    uses ``resize``). ``pca_dim`` projects all descriptors on the principal axes of the database's
    descriptors, or of the images of ``pca_folder`` (VG ``--pca_dim``, ``--pca_dataset_folder``).
    ``search_options``: exact (default) or approximate search (:mod:`jaxvpr.search`). With
    ``descriptors_dir`` the descriptors stream to ``database_descriptors.npy`` and
    ``queries_descriptors.npy`` there and are searched memory-mapped (SF-XL scale), and are kept.
    """
    from jaxvpr import testtime

    q_resize = resize if queries_resize == "same" else queries_resize
    testtime.query_preparation(test_method, q_resize)  # a wrong method or resize fails before any extraction
    check_unreadable_queries(unreadable_queries)
    pca_paths = testtime.pca_folder_paths(pca_folder) if pca_dim and pca_folder else None
    start = time.time()
    stores = ({} if descriptors_dir is None else
              {w: Path(descriptors_dir) / f"{w}_descriptors.npy" for w in ("database", "queries")})
    db = extract_descriptors(describe, split.database.abs_paths(), batch_size, resize, num_workers,
                             skip_corrupt, "database", progress, store=stores.get("database"))
    q = testtime.describe_queries(describe, split.queries.abs_paths(), test_method, q_resize, batch_size,
                                  num_workers, unreadable_queries != "error", queries_folder, progress,
                                  store=stores.get("queries"))
    if pca_dim:  # fitted once, applied to database and queries, not renormalised
        pca = (testtime.fit_pca(db.values, pca_dim, rows=np.flatnonzero(db.valid)) if pca_paths is None else
               testtime.fit_pca_on_images(describe, pca_paths, pca_dim, resize, batch_size, num_workers,
                                          skip_corrupt, progress))
        db, q = pca.project_descriptors(db), pca.project_descriptors(q)
    results, predictions = evaluate_descriptors(split, db, q, thresholds, queries_folder, test_method,
                                                majority_weight, unreadable_queries, search_options)
    if pca_dim:
        results["pca"] = pca.summary(pca_folder or "database")
    results["seconds"] = round(time.time() - start, 2)
    if out_dir is not None and parallel.is_main_process():  # every process holds the same results
        write_results(out_dir, results, split, db, q, predictions, save_descriptors)
        if pictures:
            from jaxvpr import visualize

            visualize.save_pictures(pictures, split, predictions, thresholds, out_dir)
    return results


def evaluate_query_sets(describe: Callable, items: Sequence[tuple[SplitDataset, str]],
                        thresholds: Sequence[Threshold] = (Threshold(25.0),), resize=None, batch_size: int = 32,
                        num_workers: int = 0, progress: bool = False, unreadable_queries: str = "miss") -> list[dict]:
    """Results of several ``(split, queries_folder)`` pairs, describing each distinct database once.

    E.g. day and night test queries against one test database (the demo's per-epoch monitor, or
    Tokyo 24/7's day/sunset/night sets) cost one database extraction, not one per query set.
    """
    databases: dict[str, Descriptors] = {}
    out = []
    for split, queries in items:
        key = str(split.database.root)
        if key not in databases:
            databases[key] = extract_descriptors(describe, split.database.abs_paths(), batch_size, resize, num_workers,
                                                 False, "database", progress)
        q = extract_descriptors(describe, split.queries.abs_paths(), batch_size, resize, num_workers,
                                unreadable_queries != "error", queries, progress, mixed_sizes=True)
        out.append(evaluate_descriptors(split, databases[key], q, thresholds, queries,
                                        unreadable_queries=unreadable_queries)[0])
    return out


def evaluate(model, variables, split_dir: str | os.PathLike, queries_folder: str = "queries",
             thresholds: Sequence[Threshold] = (Threshold(25.0),), resize=None, queries_resize="same",
             batch_size: int = 32, num_workers: int = 0, skip_corrupt: bool = False,
             out_dir: str | os.PathLike | None = None, save_descriptors: bool = False,
             progress: bool = True, pictures=None, test_method: str = "hard_resize",
             majority_weight: float = 0.01, pca_dim: int | None = None, pca_folder: str | None = None,
             unreadable_queries: str = "miss", search_options: SearchOptions | None = None,
             descriptors_dir: str | os.PathLike | None = None) -> dict:
    """Evaluates a model on ``<split_dir>/database`` vs ``<split_dir>/<queries_folder>``.

    Returns the results dict (see module docstring); with ``out_dir`` writes ``results.json`` there and,
    with ``save_descriptors``, the descriptors, top-20 predictions and the row order of each. See
    :func:`evaluate_split` for unreadable images, the test-time method, the PCA and the search.
    """
    split = read_split(split_dir, queries_folder)
    return evaluate_split(Describer(model).bind(variables), split, queries_folder, thresholds, resize,
                          queries_resize, batch_size, num_workers, skip_corrupt, out_dir, save_descriptors,
                          progress, pictures, test_method=test_method, majority_weight=majority_weight,
                          pca_dim=pca_dim, pca_folder=pca_folder, unreadable_queries=unreadable_queries,
                          search_options=search_options, descriptors_dir=descriptors_dir)


def write_results(out_dir, results: dict, split: SplitDataset, db: Descriptors, q: Descriptors,
                  predictions: np.ndarray, save_descriptors: bool) -> None:
    """Writes optionally descriptors, predictions and row orders, then results.json, each atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if save_descriptors:
        for name, values in (("database", db.values), ("queries", q.values)):
            path = out_dir / f"{name}_descriptors.npy"
            if not (isinstance(values, np.memmap) and path.exists() and path.samefile(values.filename)):
                atomic_save_npy(path, values)  # (streamed there already with descriptors_dir = out_dir)
        atomic_save_npy(out_dir / "predictions.npy", predictions)
        atomic_write_text(out_dir / "database_paths.txt", "\n".join(split.database.paths) + "\n")
        atomic_write_text(out_dir / "queries_paths.txt", "\n".join(split.queries.paths) + "\n")
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    """Writes via a temporary file and a rename: a killed run never leaves a half-written file."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` via a temporary file and a rename, as :func:`atomic_write_text`."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- command line
def parse_resize(spec: str | None):
    """``""``/``none`` -> None; ``"N"`` -> shorter side to N; ``"H,W"`` or ``"HxW"`` -> (H, W)."""
    if spec is None or str(spec).strip().lower() in ("", "none"):
        return None
    parts = str(spec).lower().replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--resize {spec!r}: expected N (shorter side), H,W, or none") from None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return tuple(values)
    raise ValueError(f"--resize {spec!r}: expected N (shorter side), H,W, or none")


def load_for_evaluation(checkpoint: str | None, model_name: str | None, random_init: bool, seed: int,
                        image_size: int = 224):
    """``(model, variables, model_config)`` from a checkpoint, or an architecture with random weights."""
    from jaxvpr.models import build_model, model_config

    if checkpoint:
        from jaxvpr.checkpoint import load_model

        cfg, variables = load_model(checkpoint)
        return build_model(cfg), variables, cfg
    if not model_name:
        raise ValueError("Give --checkpoint CKPT, or --model NAME --random-init.")
    if not random_init:
        raise ValueError(
            f"--model {model_name} without --checkpoint: pass --random-init to evaluate random weights, "
            "or convert published weights with `python -m jaxvpr.convert from-torch` and pass --checkpoint."
        )
    cfg = model_config(model_name)
    model = build_model(cfg)
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(seed))
    return model, variables, cfg


def picture_options(FLAGS):
    """The pictures asked for by --save-predictions/--only-wrong/--save-map (None: none), checked early."""
    if not (FLAGS.save_predictions or FLAGS.save_map):
        return None
    from jaxvpr.visualize import PictureOptions

    if not FLAGS.out:
        raise SystemExit("--save-predictions and --save-map draw into the output folder: give --out FOLDER.")
    if not 0 <= FLAGS.save_predictions <= max(RECALL_VALUES):
        raise SystemExit(f"--save-predictions {FLAGS.save_predictions}: between 1 and {max(RECALL_VALUES)} "
                         "predictions per query (the evaluation keeps the top 20).")
    threshold = None
    if FLAGS.predictions_threshold:
        distance, _, angle = FLAGS.predictions_threshold.partition(",")
        threshold = parse_thresholds(distance, angle or None)[0]
    return PictureOptions(FLAGS.save_predictions, FLAGS.only_wrong, FLAGS.predictions_max_queries,
                          FLAGS.save_map, threshold)


def main(argv):
    del argv
    from absl import flags

    from jaxvpr.data.images import set_truncated_mode

    FLAGS = flags.FLAGS
    if FLAGS.list_models:
        from jaxvpr.models import list_models

        print("\n".join(list_models()))
        return 0
    if not FLAGS.dataset:
        raise SystemExit("--dataset SPLIT_DIR is required (the folder holding database/ and the queries folder).")
    if FLAGS.faiss_gpu:
        search._gpu_resources()  # no GPU FAISS: said before any extraction
    pictures = picture_options(FLAGS)
    set_truncated_mode(FLAGS.truncated_images, "--truncated-images")
    parallel.initialize()  # several processes split the extraction (launch/local_multiprocess.sh sets it up)
    thresholds = parse_thresholds(FLAGS.thresholds, FLAGS.angles)
    resize = parse_resize(FLAGS.resize)
    q_resize = "same" if FLAGS.queries_resize == "same" else parse_resize(FLAGS.queries_resize)
    split = read_split(FLAGS.dataset, FLAGS.queries)  # a wrong folder or image name fails before the model
    model, variables, _ = load_for_evaluation(FLAGS.checkpoint, FLAGS.model, FLAGS.random_init, FLAGS.seed)
    search_options = SearchOptions(FLAGS.search_index, FLAGS.nprobe, FLAGS.ef_search, gpu=FLAGS.faiss_gpu)
    results = evaluate_split(Describer(model).bind(variables), split, FLAGS.queries, thresholds, resize,
                             q_resize, FLAGS.batch_size, FLAGS.num_workers, FLAGS.skip_corrupt, FLAGS.out,
                             FLAGS.save_descriptors, pictures=pictures, test_method=FLAGS.test_method,
                             majority_weight=FLAGS.majority_weight, pca_dim=FLAGS.pca_dim,
                             pca_folder=FLAGS.pca_folder, unreadable_queries=FLAGS.unreadable_queries,
                             search_options=search_options, descriptors_dir=FLAGS.descriptors_dir)
    if not parallel.is_main_process():
        return 0
    title = (f"{results['dataset']} / {results['queries_folder']}: {results['num_queries']} queries, "
             f"{results['num_database']} database images, {results['descriptor_dim']}-d")
    if results["test_method"] != "hard_resize":
        title += f", queries by {results['test_method']}"
    print(format_table(results["results"], title))
    if "num_queries_skipped" in results:
        print(skipped_summary(results) + (" (listed in results.json)" if FLAGS.out else ""))
    if FLAGS.out:
        print(f"wrote {Path(FLAGS.out) / 'results.json'}")
    if pictures and pictures.num_predictions:
        print(f"wrote prediction pictures to {Path(FLAGS.out) / 'predictions'}")
    if pictures and pictures.save_map:
        print(f"wrote {Path(FLAGS.out) / 'map.png'}")
    return 0


def define_flags():
    from absl import flags

    from jaxvpr.data.images import TRUNCATED_MODES
    from jaxvpr.testtime import TEST_METHODS

    flags.DEFINE_string("dataset", None, "Split folder holding database/ and the queries folder, e.g. DATA/images/test.")
    flags.DEFINE_string("queries", "queries", "Name of the queries folder inside --dataset.")
    flags.DEFINE_string("thresholds", "25", "Distance thresholds in metres, comma separated.")
    flags.DEFINE_string("angles", None, "Heading thresholds in degrees paired with --thresholds ('-' for none).")
    flags.DEFINE_string("resize", None, "Resize images: N (shorter side to N), H,W, or none (native size).")
    flags.DEFINE_string("queries_resize", "same", "Resize for queries if different from --resize ('same').")
    flags.DEFINE_integer("batch_size", 32, "Images per batch (images of differing sizes go one at a time).")
    flags.DEFINE_integer("num_workers", 0, "Decoding worker processes (0: in the main process).")
    flags.DEFINE_boolean("skip_corrupt", False, "Skip unreadable database images (counted in the report) instead "
                         "of stopping; unreadable queries follow --unreadable_queries.")
    flags.DEFINE_enum("unreadable_queries", "miss", UNREADABLE_QUERIES, "An unreadable query: 'miss' (kept in the "
                      "recall's denominator, never found, as CosPlace), 'exclude' (left out of the recall), 'error'.")
    flags.DEFINE_enum("truncated_images", None, TRUNCATED_MODES, "A truncated image: 'error' (unreadable) or 'pil' "
                      "(decoded as PIL with LOAD_TRUNCATED_IMAGES does, as CosPlace); default $JAXVPR_TRUNCATED_IMAGES "
                      "or 'error'.")
    flags.DEFINE_string("out", None, "Folder for results.json (and descriptors with --save_descriptors).")
    flags.DEFINE_boolean("save_descriptors", False, "Also write descriptors, top-20 predictions and row orders.")
    flags.DEFINE_enum("test_method", "hard_resize", TEST_METHODS, "How queries are described and searched, as in "
                      "the VG benchmark (see jaxvpr/testtime.py); the database always uses --resize.")
    flags.DEFINE_float("majority_weight", 0.01, "maj_voting: distance bonus per vote (VG --majority_weight).")
    flags.DEFINE_integer("pca_dim", None, "Project descriptors on this many principal axes (VG --pca_dim).")
    flags.DEFINE_string("pca_folder", None, "Fit the PCA on the images of this folder (VG --pca_dataset_folder) "
                        "instead of the database.")
    flags.DEFINE_string("search_index", "flat", "'flat': exact L2 search (FAISS brute force, no copy of the "
                        "database); or a FAISS index_factory string for approximate search, e.g. 'IVF4096,Flat', "
                        "'IVF4096,PQ64', 'HNSW32' (jaxvpr/search.py; bench/knn_recall.py compares them).")
    flags.DEFINE_integer("nprobe", 32, "IVF indexes: inverted lists visited per query.")
    flags.DEFINE_integer("ef_search", 128, "HNSW indexes: search breadth.")
    flags.DEFINE_boolean("faiss_gpu", False, "Search on the GPUs (needs faiss-gpu-cu12 in place of faiss-cpu).")
    flags.DEFINE_string("descriptors_dir", None, "Stream descriptors to <dir>/{database,queries}_descriptors.npy "
                        "and search them memory-mapped (an SF-XL database is never held in memory); kept.")
    flags.DEFINE_string("checkpoint", None, "A jaxvpr checkpoint (converted weights or a training workdir).")
    flags.DEFINE_string("model", None, "Model name (see --list_models) to evaluate with --random_init.")
    flags.DEFINE_boolean("random_init", False, "Use random weights for --model.")
    flags.DEFINE_integer("seed", 0, "Seed of the random weights.")
    flags.DEFINE_boolean("list_models", False, "Print the names of the registered models and exit.")
    flags.DEFINE_integer("save_predictions", 0, "Write <out>/predictions/NNNN_{correct,wrong}.png: each query "
                         "and its top N predictions, framed green (positive) or red (0: none).")
    flags.DEFINE_boolean("only_wrong", False, "With --save_predictions: only the queries wrong at R@1.")
    flags.DEFINE_integer("predictions_max_queries", None, "With --save_predictions: at most this many pictures.")
    flags.DEFINE_string("predictions_threshold", None, "Positive criterion of the pictures, DIST or DIST,ANGLE "
                        "(metres, degrees); default: the first of --thresholds/--angles.")
    flags.DEFINE_boolean("save_map", False, "Write <out>/map.png: database and query positions, queries "
                         "coloured by correct/wrong at R@1.")


def underscore_flags(argv: list[str]) -> list[str]:
    """Accepts ``--save-descriptors`` as well as absl's ``--save_descriptors``."""
    out = []
    for a in argv:
        if a.startswith("--") and not a.startswith("--config."):
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + value
        out.append(a)
    return out


if __name__ == "__main__":
    import sys

    from jaxvpr import cli

    define_flags()
    cli.run_absl(main, underscore_flags(sys.argv))
