"""Search at SF-XL scale (jaxvpr/search.py): exact kNN against brute-force numpy, approximate indexes
against the exact search, descriptors streamed to disk against descriptors held in memory."""

import json

import numpy as np
import pytest

from jaxvpr import evaluate as ev
from jaxvpr import search, testtime
from jaxvpr.data.format import read_split
from jaxvpr.search import DescriptorFile, SearchOptions

from test_bad_input import make_split, mean_colour


def _descriptors(n, q, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    db = rng.standard_normal((n, dim)).astype(np.float32)
    queries = (db[rng.integers(0, n, q)] + 0.3 * rng.standard_normal((q, dim))).astype(np.float32)
    return db, queries


def _brute_force(db, queries, k):
    d = ((queries[:, None, :].astype(np.float64) - db[None].astype(np.float64)) ** 2).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


def test_exact_search_is_brute_force_in_query_chunks(monkeypatch):
    db, queries = _descriptors(500, 37)
    monkeypatch.setattr(search, "QUERY_CHUNK", 8)  # 5 chunks, the last one short
    d, i = search.knn(db, queries, 10)
    ref_d, ref_i = _brute_force(db, queries, 10)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(d, ref_d, rtol=1e-4, atol=1e-4)
    _, i = search.knn(db[:4], queries[:3], 6)  # more neighbours than images: -1 padding, as IndexFlatL2
    assert (i[:, 4:] == -1).all() and sorted(i[0, :4]) == [0, 1, 2, 3]


def test_exact_search_of_a_memory_mapped_database_is_the_same(tmp_path):
    db, queries = _descriptors(300, 20)
    np.save(tmp_path / "db.npy", db)
    mapped = np.load(tmp_path / "db.npy", mmap_mode="r")
    np.testing.assert_array_equal(search.knn(mapped, queries, 5)[1], search.knn(db, queries, 5)[1])
    np.testing.assert_array_equal(search.knn(db.astype(np.float64), queries, 5)[1], search.knn(db, queries, 5)[1])


def test_ivf_visiting_every_list_is_exact_and_fewer_lists_approximate():
    db, queries = _descriptors(2000, 50, dim=32)
    exact = search.knn(db, queries, 10)[1]
    full = search.knn(db, queries, 10, SearchOptions("IVF16,Flat", nprobe=16))[1]
    np.testing.assert_array_equal(full, exact)  # all 16 cells visited: an exhaustive search
    one = search.knn(db, queries, 10, SearchOptions("IVF16,Flat", nprobe=1))[1]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(one, exact)])
    assert 0.2 < overlap < 1.0  # one cell of 16: some true neighbours lie in other cells


@pytest.mark.parametrize("spec, floor", [("HNSW16", 0.95), ("IVF8,PQ8", 0.3)])
def test_approximate_indexes_find_most_true_nearest_neighbours(spec, floor):
    db, queries = _descriptors(2000, 50, dim=32)
    exact = search.knn(db, queries, 1)[1][:, 0]
    found = search.knn(db, queries, 10, SearchOptions(spec, nprobe=8, ef_search=64))[1]
    assert np.mean([e in f for e, f in zip(exact, found)]) >= floor  # the true nearest is in the top 10


def test_bad_index_string_and_missing_gpu_are_clear_errors():
    db, queries = _descriptors(50, 2)
    with pytest.raises(ValueError, match="index_factory string"):
        search.knn(db, queries, 5, SearchOptions("IVF-nonsense"))
    with pytest.raises(RuntimeError, match="faiss-gpu-cu12"):
        search.knn(db, queries, 5, SearchOptions(gpu=True))


def test_descriptor_file_written_in_any_order_equals_the_array(tmp_path):
    values = np.random.default_rng(1).standard_normal((23, 3, 4)).astype(np.float32)
    f = DescriptorFile(tmp_path / "d.npy", values.shape)
    assert not (tmp_path / "d.npy").exists()  # written under a temporary name until closed
    order = np.random.default_rng(2).permutation(23)
    for part in np.array_split(order, 5):  # scattered rows, and one run of consecutive rows
        f[part] = values[part]
    f[slice(20, 23)] = values[20:23]
    assert f.close() == tmp_path / "d.npy"
    loaded = f.load()
    assert isinstance(loaded, np.memmap)
    np.testing.assert_array_equal(loaded, values)
    g = DescriptorFile(tmp_path / "e.npy", (4, 2))
    g[[0]] = np.ones((1, 2))
    g.discard()  # a stopped extraction leaves nothing behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npy"]


def test_pca_fitted_on_chosen_rows_copies_only_them():
    x = np.random.default_rng(3).standard_normal((300, 8)).astype(np.float32)
    rows = np.flatnonzero(np.arange(300) % 3 != 0)
    a = testtime.fit_pca(x, 4, max_samples=100, rows=rows)
    b = testtime.fit_pca(x[rows], 4, max_samples=100)  # the earlier way: the subset copied first
    np.testing.assert_allclose(a.components, b.components)
    projected = a.project_descriptors(ev.Descriptors(x, np.ones(300, bool), []))
    np.testing.assert_allclose(projected.values, a.project(x), rtol=1e-6)


def test_evaluation_streamed_to_disk_and_approximate_gives_the_exact_results(tmp_path):
    root = make_split(tmp_path / "split", queries=[(0, 0), (100, 1), (200, 3), (300, 2)])
    split = read_split(root)
    in_memory = ev.evaluate_split(mean_colour, split, progress=False, out_dir=tmp_path / "a", save_descriptors=True)
    out = tmp_path / "b"
    streamed = ev.evaluate_split(mean_colour, split, progress=False, out_dir=out, save_descriptors=True,
                                 descriptors_dir=out, search_options=SearchOptions("IVF2,Flat", nprobe=2))
    assert streamed["search"]["index"] == "IVF2,Flat" and "search" not in in_memory
    assert streamed["results"] == in_memory["results"]
    for name in ("database_descriptors.npy", "queries_descriptors.npy", "predictions.npy"):
        np.testing.assert_array_equal(np.load(out / name), np.load(tmp_path / "a" / name))
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name or ".process" in p.name]
    assert json.loads((out / "results.json").read_text())["search"]["nprobe"] == 2


def test_a_stopped_streamed_extraction_leaves_no_descriptor_file(tmp_path):
    root = make_split(tmp_path / "split")
    (root / "database" / sorted(p.name for p in (root / "database").iterdir())[2]).write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(Exception, match="database"):
        ev.evaluate_split(mean_colour, read_split(root), progress=False, out_dir=out, descriptors_dir=out)
    assert not out.exists() or not list(out.iterdir())
