"""Nearest-neighbour search of descriptors at SF-XL scale, and descriptors streamed to disk.

Exact search (``index="flat"``, the default) is FAISS's brute-force L2 search (``faiss.knn``, the
kernel behind ``IndexFlatL2.search``: same distances, same order) run on the database array itself,
in query chunks: no index copy of the database is made, so a 2.8M x 512 float32 database (5.7 GB)
is searched in about its own size of memory. The database may be a memory-mapped ``.npy`` (e.g.
written by :class:`DescriptorFile` during extraction): its pages are then the page cache's.

Approximate search takes a FAISS ``index_factory`` string, e.g. ``"IVF4096,Flat"`` (inverted lists,
exact distances in the visited cells), ``"IVF4096,PQ64"`` (product-quantised: 64 bytes per 512-d
descriptor instead of 2048), ``"HNSW32"`` (graph). Trained (IVF centroids, PQ codebooks) on a seeded
sample of at most ``train_size`` database rows, filled in row blocks; ``nprobe`` (IVF cells visited)
and ``ef_search`` (HNSW) trade recall for time. ``bench/knn_recall.py`` prints each against the exact
search. ``gpu=True`` runs the search on the GPUs (``faiss.knn_gpu``, or the index moved with
``index_cpu_to_all_gpus``): it needs FAISS built with CUDA (``pip install faiss-gpu-cu12`` in place
of ``faiss-cpu``; see README "Evaluation at SF-XL scale").
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import faiss
import numpy as np

EXACT = "flat"
QUERY_CHUNK = 4096  # queries searched at once: bounds the (chunk, k) results and FAISS's distance tiles
ADD_BLOCK = 65536  # database rows copied into an approximate index at once


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """How descriptors are searched (module docstring). ``index="flat"`` is exact."""

    index: str = EXACT
    nprobe: int = 32
    ef_search: int = 128
    train_size: int = 2**18
    gpu: bool = False
    seed: int = 0

    def is_exact(self) -> bool:
        return self.index.strip().lower() == EXACT

    def summary(self) -> dict:
        """What results.json records of the search."""
        out = {"index": EXACT if self.is_exact() else self.index, "gpu": self.gpu}
        if not self.is_exact():
            out.update(nprobe=self.nprobe, ef_search=self.ef_search, train_size=self.train_size, seed=self.seed)
        return out


def check_descriptors(database: np.ndarray, queries: np.ndarray) -> None:
    if database.ndim != 2 or queries.ndim != 2 or database.shape[1] != queries.shape[1]:
        raise ValueError(f"Descriptors must be (N, D) with equal D: database {database.shape}, queries {queries.shape}")


def _float32_rows(array: np.ndarray) -> np.ndarray:
    """``array`` as C-contiguous float32, without a copy when it already is (a memmap stays one)."""
    if array.dtype == np.float32 and array.flags.c_contiguous:
        return array
    return np.ascontiguousarray(array, dtype=np.float32)


def _gpu_resources():
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        raise RuntimeError("gpu search needs FAISS built with CUDA and a visible GPU (faiss.get_num_gpus() is "
                           f"{faiss.get_num_gpus()}): `pip uninstall faiss-cpu && pip install faiss-gpu-cu12`, "
                           "or search on the CPU.")
    return faiss.StandardGpuResources()


def knn(database: np.ndarray, queries: np.ndarray, k: int = 20,
        options: SearchOptions | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(squared L2 distances, indices)``, each (Q, k), nearest first; index -1 where the database
    has fewer than ``k`` images (or an approximate index found fewer)."""
    options = options or SearchOptions()
    check_descriptors(database, queries)
    database = _float32_rows(database)
    queries = _float32_rows(queries)
    if options.is_exact():
        if options.gpu:
            res = _gpu_resources()
            search = lambda q: faiss.knn_gpu(res, q, database, k)
        else:
            search = lambda q: faiss.knn(q, database, k)
    else:
        index = build_index(database, options)
        search = lambda q: index.search(q, k)
    distances = np.empty((len(queries), k), np.float32)
    indices = np.empty((len(queries), k), np.int64)
    for a in range(0, len(queries), QUERY_CHUNK):
        distances[a:a + QUERY_CHUNK], indices[a:a + QUERY_CHUNK] = search(queries[a:a + QUERY_CHUNK])
    return distances, indices


def build_index(database: np.ndarray, options: SearchOptions):
    """An approximate FAISS index of ``database`` (N, D): trained on a sample, filled in row blocks."""
    n, dim = database.shape
    try:
        index = faiss.index_factory(dim, options.index, faiss.METRIC_L2)
    except RuntimeError as e:
        raise ValueError(f"search index {options.index!r} is not a FAISS index_factory string (e.g. "
                         f"'IVF4096,Flat', 'IVF4096,PQ64', 'HNSW32', or 'flat' for exact search): {e}") from None
    if not index.is_trained:
        rows = np.arange(n)
        if n > options.train_size:
            rows = np.sort(np.random.default_rng(options.seed).choice(n, options.train_size, replace=False))
        sample = np.ascontiguousarray(database[rows], dtype=np.float32)
        index.train(sample)
        del sample
    for a in range(0, n, ADD_BLOCK):
        index.add(np.ascontiguousarray(database[a:a + ADD_BLOCK], dtype=np.float32))
    params = faiss.ParameterSpace()
    for name, value in (("nprobe", options.nprobe), ("efSearch", options.ef_search)):
        try:
            params.set_index_parameter(index, name, value)
        except RuntimeError:
            pass  # the index has no such parameter (e.g. nprobe of HNSW)
    if options.gpu:
        _gpu_resources()
        index = faiss.index_cpu_to_all_gpus(index)
    return index


# ----------------------------------------------------------------------------- descriptors on disk
class DescriptorFile:
    """A float32 ``.npy`` of shape ``shape`` written in row blocks, in any order, without holding it.

    Rows are written with ``pwrite`` at their offsets (no memory map, so the written rows are the
    page cache's, not the process's), into ``<path>.tmp<pid>``; :meth:`close` renames the file to
    ``path``, so a killed run never leaves a half-written ``path``. :meth:`load` maps the result.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...]):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(f"{self.path}.tmp{os.getpid()}")
        header = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=np.float32, shape=self.shape)
        self._offset = header.offset
        del header  # the header is written; the data part is a sparse file of zeros
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * 4
        self._fd = os.open(self._tmp, os.O_RDWR)

    def __setitem__(self, rows, values) -> None:
        """``file[rows] = values``: rows an int array (or slice) of row indices, values (len, ...)."""
        rows = np.arange(self.shape[0])[rows] if isinstance(rows, slice) else np.asarray(rows, np.int64)
        values = np.ascontiguousarray(values, dtype=np.float32).reshape((len(rows),) + self.shape[1:])
        if len(rows) == 0:
            return
        order = np.argsort(rows, kind="stable")
        rows, values = rows[order], values[order]
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1  # runs of consecutive rows: one write each
        for run_rows, run_values in zip(np.split(rows, breaks), np.split(values, breaks)):
            data = run_values.tobytes()
            position = self._offset + int(run_rows[0]) * self._row_bytes
            while data:
                written = os.pwrite(self._fd, data, position)
                data, position = data[written:], position + written

    def close(self) -> Path:
        os.fsync(self._fd)
        os.close(self._fd)
        os.replace(self._tmp, self.path)
        return self.path

    def discard(self) -> None:
        os.close(self._fd)
        self._tmp.unlink(missing_ok=True)

    def load(self) -> np.ndarray:
        """The closed file, memory-mapped read-only."""
        return np.load(self.path, mmap_mode="r")
