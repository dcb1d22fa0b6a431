"""Test-time methods and PCA of the deep visual geo-localization benchmark (VG benchmark).

Berton et al., "Deep Visual Geo-localization Benchmark", CVPR 2022, code
gmberton/deep-visual-geo-localization-benchmark: ``datasets_ws.py`` (``BaseDataset._test_query_transform``),
``test.py`` (``test``, ``top_n_voting``), ``util.py`` (``compute_pca``). Database images always use
``hard_resize``; the method only changes how queries are described and searched. ``resize`` is the
benchmark's ``--resize H,W`` (default 480,640); ``S = min(resize)``.

==============  ==============================================================================
hard_resize     Queries resized to exactly (H, W): jaxvpr's ``--resize H,W``.
single_query    Shorter side -> S, aspect kept; the benchmark describes one query at a time, jaxvpr
                batches queries of equal size (no padding reaches a descriptor: same result).
central_crop    Normalised h x w image scaled by ``max(H/h, W/w)`` with ``torch.nn.functional.interpolate``'s
                default *nearest* mode, then ``torchvision`` ``center_crop`` to (H, W).
five_crops      Shorter side -> S, ``torchvision`` ``five_crop`` of S x S squares (top-left, top-right,
                bottom-left, bottom-right, centre); the descriptor is the mean of the five crop
                descriptors, not renormalised.
nearest_crop    The five crops are searched one by one (top 20 each, squared L2); the 100 candidates
                are sorted by distance, a database image found by several crops keeps its smallest
                distance, and the first 20 distinct images are the predictions.
maj_voting      As nearest_crop, after a vote: for n = 1, 5, 10 in turn, every database image found
                more than once among the first n predictions of the five crops has each of its
                distances in that window lowered by ``majority_weight * count / n`` (0.01 by
                default); the distances are changed in place, so the three votes add up.
==============  ==============================================================================

PCA (``--pca_dim d``): sklearn's ``PCA(d)`` (centred, not whitened) fitted once on the full
descriptors of up to 2^14 images, applied to database and query descriptors, not renormalised.
The benchmark fits it on ``--pca_dataset_folder``; jaxvpr fits it on the database being evaluated
unless a folder is given.

Where jaxvpr differs from the benchmark's code, and why:

* Resizing: the benchmark resizes the normalised float tensor (``transforms.functional.resize`` on a
  tensor); jaxvpr resizes the uint8 image with PIL's bilinear filter before normalising, like every
  other jaxvpr evaluation (``jaxvpr.data.images``), so resized pixels may differ by about one grey
  level. Nearest interpolation (central_crop) picks pixels, so it is applied to the normalised image
  exactly as the benchmark does.
* Nearest source index: ``min(floor(float32(i) * float32(1 / scale)), n - 1)``, the CPU kernel of
  torch 2 (the benchmark's data loaders run on the CPU); older torch versions special-cased an
  output of exactly n or 2n pixels, which differs only when the scale is within a pixel of 1 or 2.
* Ties: the benchmark sorts the 100 candidates with ``np.argsort``'s default (unstable) quicksort, so
  candidates of exactly equal distance come in an unspecified order; jaxvpr sorts stably (crop order,
  then rank), one of the orders the benchmark can produce.
* Fewer than 20 distinct candidates (a database of fewer than 20 images): the benchmark stops with
  a numpy broadcasting error; jaxvpr pads the predictions with -1.
* PCA: exact SVD (sklearn's ``"auto"`` solver is randomized for large descriptor sets); the fit
  images are a seeded random subset; images of a PCA folder are resized like the database (the
  benchmark uses their native size, 480 x 640 on its datasets, the same as its default resize).
* Batches of crops hold ``batch_size`` queries, i.e. 5 x ``batch_size`` crops, as in the benchmark.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from jaxvpr.data.images import ResizeSpec, normalize
from jaxvpr.data.images import resize as resize_image
from jaxvpr.evaluate import Descriptors, extract_descriptors, knn

TEST_METHODS = ("hard_resize", "single_query", "central_crop", "five_crops", "nearest_crop", "maj_voting")
CROP_SEARCH_METHODS = ("nearest_crop", "maj_voting")  # the five crops are searched one by one
VOTING_WINDOWS = (1, 5, 10)  # top-n windows of maj_voting, applied in this order
PCA_MAX_IMAGES = 2**14  # images whose descriptors fit the PCA (VG util.compute_pca)
PCA_BLOCK = 2**16  # descriptor rows projected at once


# ----------------------------------------------------------------------------- query images
def nearest_indices(size: int, scale: float) -> np.ndarray:
    """Source pixel of each output pixel of ``F.interpolate(x, scale_factor=scale)`` (mode nearest).

    The output has ``floor(size * scale)`` pixels (double precision); pixel i reads
    ``min(floor(float32(i) * float32(1 / scale)), size - 1)`` as torch's CPU kernel does.
    """
    out = int(np.floor(size * scale))
    step = np.float32(1.0 / scale)
    return np.minimum(np.floor(np.arange(out, dtype=np.float32) * step).astype(np.int64), size - 1)


def center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``torchvision.transforms.functional.center_crop`` of an (H, W, C) array to ``size`` = (h, w).

    The top-left corner is ``(round((H - h) / 2), round((W - w) / 2))`` (Python's round, half to
    even); a side shorter than the crop is first padded with zeros, ``(h - H) // 2`` before.
    """
    h, w = size
    height, width = image.shape[:2]
    if h > height or w > width:
        top, left = max(h - height, 0) // 2, max(w - width, 0) // 2
        image = np.pad(image, ((top, max(h - height, 0) - top), (left, max(w - width, 0) - left), (0, 0)))
        height, width = image.shape[:2]
    top, left = int(round((height - h) / 2.0)), int(round((width - w) / 2.0))
    return image[top : top + h, left : left + w]


def five_crop_corners(height: int, width: int, side: int) -> list[tuple[int, int]]:
    """Top-left corners (row, column) of ``torchvision`` ``five_crop``'s side x side squares, in its order:
    top-left, top-right, bottom-left, bottom-right, centre."""
    if side > height or side > width:
        raise ValueError(f"five_crop: a {side} x {side} crop does not fit in a {height} x {width} image.")
    return [(0, 0), (0, width - side), (height - side, 0), (height - side, width - side),
            (int(round((height - side) / 2.0)), int(round((width - side) / 2.0)))]


@dataclasses.dataclass(frozen=True)
class CentralCrop:
    """central_crop: uint8 (H, W, 3) -> normalised float32 ``size`` = (h, w) central crop.

    Scale ``max(h / H, w / W)`` with nearest interpolation, then :func:`center_crop` (VG
    ``datasets_ws.py``, ``_test_query_transform``). Normalising first, as the benchmark does, makes
    any zero padding of the crop zero in normalised units.
    """

    size: tuple[int, int]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        scale = max(self.size[0] / height, self.size[1] / width)
        scaled = normalize(image)[nearest_indices(height, scale)][:, nearest_indices(width, scale)]
        return center_crop(scaled, self.size)


@dataclasses.dataclass(frozen=True)
class FiveCrops:
    """five_crops / nearest_crop / maj_voting: uint8 (H, W, 3) -> normalised float32 (5, S, S, 3).

    Shorter side resized to S = ``side`` (aspect kept), then the five S x S crops of
    :func:`five_crop_corners`.
    """

    side: int

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = normalize(resize_image(image, self.side))
        s = self.side
        return np.stack([image[r : r + s, c : c + s] for r, c in five_crop_corners(*image.shape[:2], s)])


@dataclasses.dataclass(frozen=True)
class QueryPreparation:
    """How a test-time method feeds queries to the pipeline (see ``pipeline.eval_batches``)."""

    resize: ResizeSpec  # the pipeline's resize (None where ``transform`` resizes)
    transform: Callable[[np.ndarray], np.ndarray] | None
    mixed_sizes: bool  # batch queries by size (their sizes differ after ``resize``)


def query_preparation(test_method: str, resize) -> QueryPreparation:
    """The query resize or transform of ``test_method`` for the database resize ``resize``.

    ``resize`` is (H, W) as in the benchmark; single_query and the crop methods also accept an int
    (the shorter side S); hard_resize accepts anything ``jaxvpr.data.images.resize`` does.
    """
    if test_method not in TEST_METHODS:
        raise ValueError(f"Unknown test method {test_method!r}: choose one of {', '.join(TEST_METHODS)}.")
    if test_method == "hard_resize":
        return QueryPreparation(resize, None, True)
    if test_method == "central_crop":
        if not (isinstance(resize, (tuple, list)) and len(resize) == 2):
            raise ValueError(f"Test method central_crop crops queries to --resize H,W; got resize={resize!r}.")
        return QueryPreparation(None, CentralCrop((int(resize[0]), int(resize[1]))), False)
    if isinstance(resize, (int, np.integer)) and not isinstance(resize, bool):
        side = int(resize)
    elif isinstance(resize, (tuple, list)) and len(resize) == 2:
        side = int(min(resize))
    else:
        raise ValueError(f"Test method {test_method} needs --resize H,W (its shorter side is min(H, W)) "
                         f"or --resize N; got resize={resize!r}.")
    if test_method == "single_query":
        return QueryPreparation(side, None, True)
    return QueryPreparation(None, FiveCrops(side), False)


def describe_queries(describe: Callable, paths: list[str], test_method: str = "hard_resize", resize=None,
                     batch_size: int = 32, num_workers: int = 0, skip_corrupt: bool = False,
                     desc: str = "queries", progress: bool = True, store=None) -> Descriptors:
    """Query descriptors under ``test_method``: (Q, D), or (Q, 5, D) for nearest_crop and maj_voting.

    five_crops returns the mean of the five crop descriptors (VG ``test.py``: ``features.mean``), not
    renormalised. With several processes each describes its share (``extract_descriptors``), and
    ``store`` streams them to a ``.npy`` file (the crops' mean of five_crops is held in memory).
    """
    prep = query_preparation(test_method, resize)
    q = extract_descriptors(describe, paths, batch_size, prep.resize, num_workers, skip_corrupt, desc, progress,
                            mixed_sizes=prep.mixed_sizes, transform=prep.transform, store=store)
    if test_method == "five_crops":
        q = dataclasses.replace(q, values=q.values.mean(axis=1))
    return q


# ----------------------------------------------------------------------------- search
def majority_vote(indices: np.ndarray, distances: np.ndarray, n: int, majority_weight: float) -> None:
    """One vote of maj_voting on one query, in place (VG ``test.py``, ``top_n_voting``).

    ``indices``/``distances``: (crops, K) predictions and squared distances of each crop. Every
    database index found more than once in the window ``[:, :n]`` has each of its distances in the
    window lowered by ``majority_weight * count / n``.
    """
    window = indices[:, :n]
    ids, counts = np.unique(window[window >= 0], return_counts=True)
    for i, count in zip(ids[counts > 1], counts[counts > 1]):
        distances[:, :n][window == i] -= majority_weight * count / n


def merge_crop_predictions(distances: np.ndarray, indices: np.ndarray, test_method: str = "nearest_crop",
                           majority_weight: float = 0.01, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """nearest_crop / maj_voting: per-crop kNN results (Q, crops, K) -> merged ``(distances, indices)`` (Q, k).

    Candidates (crop-major, then rank) are sorted by distance (stable), each database index keeps its
    first (closest) occurrence, and the first ``k`` distinct indices are kept; -1 (FAISS's "none")
    is never a candidate, and missing columns hold index -1 and distance inf. maj_voting first
    applies :func:`majority_vote` for n = 1, 5, 10; the merged distances are the voted ones.
    """
    if test_method not in CROP_SEARCH_METHODS:
        raise ValueError(f"merge_crop_predictions: test method {test_method!r} is not one of {CROP_SEARCH_METHODS}.")
    distances = np.array(distances, dtype=np.float32)  # a copy: the vote changes it
    indices = np.asarray(indices, dtype=np.int64)
    if distances.ndim != 3 or distances.shape != indices.shape:
        raise ValueError(f"merge_crop_predictions: distances {distances.shape} and indices {indices.shape} "
                         "must both be (queries, crops, K).")
    merged_d = np.full((len(indices), k), np.inf, np.float32)
    merged_i = np.full((len(indices), k), -1, np.int64)
    for q in range(len(indices)):
        if test_method == "maj_voting":
            for n in VOTING_WINDOWS:
                majority_vote(indices[q], distances[q], n, majority_weight)
        order = np.argsort(distances[q].ravel(), kind="stable")
        ids, dists = indices[q].ravel()[order], distances[q].ravel()[order]
        found = ids >= 0
        ids, dists = ids[found], dists[found]
        first = np.sort(np.unique(ids, return_index=True)[1])[:k]
        merged_i[q, : len(first)] = ids[first]
        merged_d[q, : len(first)] = dists[first]
    return merged_d, merged_i


def search(database: np.ndarray, queries: np.ndarray, k: int = 20, test_method: str = "hard_resize",
           majority_weight: float = 0.01, options=None) -> tuple[np.ndarray, np.ndarray]:
    """L2 search ``(squared distances, indices)`` (Q, k), exact unless ``options`` (a
    :class:`jaxvpr.search.SearchOptions`) says otherwise; crop descriptors (Q, crops, D) are
    searched crop by crop (top ``k`` each) and merged by :func:`merge_crop_predictions`."""
    if queries.ndim == 2 and test_method not in CROP_SEARCH_METHODS:
        return knn(database, queries, k, options)
    if queries.ndim != 3 or test_method not in CROP_SEARCH_METHODS:
        raise ValueError(f"Query descriptors of shape {queries.shape} do not fit test method {test_method!r}: "
                         f"{', '.join(CROP_SEARCH_METHODS)} search (queries, crops, D), the others (queries, D).")
    num_queries, crops, dim = queries.shape
    d, i = knn(database, queries.reshape(num_queries * crops, dim), k, options)
    return merge_crop_predictions(d.reshape(num_queries, crops, k), i.reshape(num_queries, crops, k),
                                  test_method, majority_weight, k)


# ----------------------------------------------------------------------------- PCA
@dataclasses.dataclass(frozen=True)
class PCA:
    """A fitted PCA: ``project(x) = (x - mean) @ components.T`` (sklearn ``PCA.transform``, no whitening).

    Attributes:
      mean: (D,) float64 mean of the fitted descriptors.
      components: (d, D) float64 principal axes, largest variance first (rows orthonormal).
      explained_variance_ratio: (d,) share of the total variance along each axis.
      num_samples: number of descriptors fitted.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance_ratio: np.ndarray
    num_samples: int

    def project(self, x: np.ndarray) -> np.ndarray:
        """(..., D) -> (..., d) float32 (not renormalised)."""
        return ((np.asarray(x, np.float64) - self.mean) @ self.components.T).astype(np.float32)

    def project_descriptors(self, descriptors: Descriptors) -> Descriptors:
        """The projected descriptors, computed in row blocks (a memory-mapped SF-XL database is
        never converted to float64 whole)."""
        x = descriptors.values
        out = np.empty(x.shape[:-1] + (len(self.components),), np.float32)
        for a in range(0, len(x), PCA_BLOCK):
            out[a:a + PCA_BLOCK] = self.project(x[a:a + PCA_BLOCK])
        return dataclasses.replace(descriptors, values=out)

    def summary(self, fit_on: str) -> dict:
        """What results.json records of the PCA."""
        return {"dim": int(len(self.components)), "fit_on": str(fit_on), "num_samples": int(self.num_samples),
                "explained_variance": float(self.explained_variance_ratio.sum())}


def fit_pca(descriptors: np.ndarray, dim: int, max_samples: int = PCA_MAX_IMAGES, seed: int = 0,
            rows: np.ndarray | None = None) -> PCA:
    """Principal axes of up to ``max_samples`` rows of ``descriptors`` (N, D), a seeded random subset
    (of ``rows`` when given, e.g. the images that could be read); only the subset is copied.

    Exact SVD of the centred float64 rows (sklearn ``PCA(dim, svd_solver="full")``, up to the sign of
    each axis, which no distance sees).
    """
    if rows is not None or len(descriptors) > max_samples:
        rows = np.arange(len(descriptors)) if rows is None else np.asarray(rows)
        if len(rows) > max_samples:
            rows = np.sort(np.random.default_rng(seed).choice(rows, max_samples, replace=False))
        descriptors = descriptors[rows]
    x = np.asarray(descriptors, np.float64)
    if x.ndim != 2 or not 1 <= dim <= min(x.shape):
        raise ValueError(f"PCA to {dim} dimensions needs at least {dim} descriptors of at least {dim} "
                         f"dimensions; got {x.shape}.")
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    variance = s**2
    return PCA(mean, vt[:dim], variance[:dim] / variance.sum(), len(x))


def pca_folder_paths(folder: str, max_images: int = PCA_MAX_IMAGES, seed: int = 0) -> list[str]:
    """Absolute paths of up to ``max_images`` images of ``folder`` (walked recursively), a seeded subset."""
    from jaxvpr.data.format import list_images

    paths = [str(Path(folder) / p) for p in list_images(folder, use_paths_file=False)]
    if len(paths) > max_images:
        paths = [paths[i] for i in np.sort(np.random.default_rng(seed).choice(len(paths), max_images, replace=False))]
    return paths


def fit_pca_on_images(describe: Callable, paths: Sequence[str], dim: int, resize=None, batch_size: int = 32,
                      num_workers: int = 0, skip_corrupt: bool = False, progress: bool = True) -> PCA:
    """PCA of the descriptors of the images at ``paths`` (e.g. :func:`pca_folder_paths`), resized by ``resize``."""
    found = extract_descriptors(describe, list(paths), batch_size, resize, num_workers, skip_corrupt, "PCA images",
                                progress, mixed_sizes=True)
    return fit_pca(found.values[found.valid], dim)
