"""VG-benchmark triplet mining (jaxvpr.train.mining) against a brute-force reference written here with
explicit loops over queries and full pairwise distance matrices, and against hand-made cases on a line."""

import math

import numpy as np
import pytest

from jaxvpr.train import mining

HARD_M, SOFT_M = 10.0, 25.0
K = 10


# ---------------------------------------------------------------- brute-force reference

def brute_geo(db_utm, q_utm):
    """(Nq, Nd) metres, one pair at a time."""
    d = np.empty((len(q_utm), len(db_utm)))
    for i, q in enumerate(q_utm):
        for j, x in enumerate(db_utm):
            d[i, j] = math.hypot(q[0] - x[0], q[1] - x[1])
    return d


def brute_desc(q_desc, db_desc):
    """(Nq, Nd) squared L2 in float64, one pair at a time."""
    d = np.empty((len(q_desc), len(db_desc)))
    for i, q in enumerate(q_desc):
        for j, x in enumerate(db_desc):
            diff = np.asarray(q, np.float64) - np.asarray(x, np.float64)
            d[i, j] = float(np.dot(diff, diff))
    return d


def brute_best_positive(geo_row, desc_row):
    best = None
    for j in range(len(geo_row)):
        if geo_row[j] <= HARD_M and (best is None or desc_row[j] < desc_row[best]):
            best = j  # strict '<' keeps the lowest index on ties
    return best


def brute_hardest(geo_row, desc_row, candidates, k=K):
    outside = [j for j in set(int(c) for c in candidates) if geo_row[j] > SOFT_M]
    return sorted(outside, key=lambda j: (desc_row[j], j))[:k]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def world():
    """300 db images in a 200 m square, 80 queries of which 8 are 1 km away (no hard positive)."""
    r = np.random.default_rng(123)
    db = r.uniform(0, 200, size=(300, 2)) + [500_000.0, 5_000_000.0]
    q = r.uniform(0, 200, size=(80, 2)) + [500_000.0, 5_000_000.0]
    q[-8:] += 1000.0
    data = mining.build_triplet_dataset(db, q, HARD_M, SOFT_M)
    geo = brute_geo(db, q)
    db_desc = r.normal(size=(300, 16)).astype(np.float32)
    q_desc = r.normal(size=(80, 16)).astype(np.float32)
    return dict(data=data, geo=geo, db=db, q=q, db_desc=db_desc, q_desc=q_desc, desc=brute_desc(q_desc, db_desc))


def line_dataset(n_db=20):
    """db image j at east 10*j m, one query at 0 m: hard positives {0, 1}, soft positives {0, 1, 2}."""
    db = np.stack([10.0 * np.arange(n_db), np.zeros(n_db)], 1)
    return mining.build_triplet_dataset(db, np.zeros((1, 2)), HARD_M, SOFT_M)


def line_descriptors(n_db=20):
    """Query at the origin; db j at distance n_db - j (so 19, 18, ... are the hardest); positives 0 -> 5, 1 -> 3."""
    db = np.stack([n_db - np.arange(n_db, dtype=np.float32), np.zeros(n_db, np.float32)], 1)
    db[0], db[1] = [5, 0], [3, 0]
    return np.zeros((1, 2), np.float32), db


def describe(w, p):
    return w["q_desc"][p.queries], w["db_desc"][p.database]


# ---------------------------------------------------------------- build_triplet_dataset

def test_positives_match_brute_force(world):
    data, geo = world["data"], world["geo"]
    for i in range(len(geo)):
        assert data.hard_positives[i].tolist() == [j for j in range(geo.shape[1]) if geo[i, j] <= HARD_M]
        assert data.soft_positives[i].tolist() == [j for j in range(geo.shape[1]) if geo[i, j] <= SOFT_M]
    valid = [i for i in range(len(geo)) if (geo[i] <= HARD_M).any()]
    assert data.valid_queries.tolist() == valid
    assert data.num_dropped == len(geo) - len(valid) >= 8


def test_positive_exactly_on_the_radius_counts():
    data = line_dataset()
    assert data.hard_positives[0].tolist() == [0, 1]  # db 1 is exactly 10 m away
    assert data.soft_positives[0].tolist() == [0, 1, 2]  # db 2 is 20 m, db 3 is 30 m
    on_edge = mining.build_triplet_dataset([[500_000.0, 0.0], [500_025.0, 0.0]], [[500_015.0, 0.0]], 10.0, 25.0)
    assert on_edge.hard_positives[0].tolist() == [1] and on_edge.soft_positives[0].tolist() == [0, 1]


def test_hard_radius_above_soft_radius_is_refused():
    with pytest.raises(ValueError, match="train_positives_dist_threshold.*val_positive_dist_threshold"):
        mining.build_triplet_dataset(np.zeros((2, 2)), np.zeros((1, 2)), 30.0, 25.0)


def test_hard_positives_within_an_angle_match_brute_force(world):
    """``train.positives_angle_deg``: hard positives also need a heading within the angle (wrapping at
    360), soft positives stay distance-only."""
    geo, r = world["geo"], np.random.default_rng(5)
    db_heading, q_heading = r.uniform(0, 360, geo.shape[1]), r.uniform(0, 360, geo.shape[0])
    data = mining.build_triplet_dataset(world["db"], world["q"], HARD_M, SOFT_M, db_heading, q_heading, 40.0)
    for i in range(len(geo)):
        turn = [min(abs(db_heading[j] - q_heading[i]), 360 - abs(db_heading[j] - q_heading[i]))
                for j in range(geo.shape[1])]
        assert data.hard_positives[i].tolist() == [j for j in range(geo.shape[1])
                                                   if geo[i, j] <= HARD_M and turn[j] <= 40.0]
        assert data.soft_positives[i].tolist() == [j for j in range(geo.shape[1]) if geo[i, j] <= SOFT_M]
    wrap = mining.build_triplet_dataset([[0.0, 0.0], [1.0, 0.0]], [[0.0, 1.0]], 10.0, 25.0, [355.0, 180.0], [10.0],
                                        20.0)
    assert wrap.hard_positives[0].tolist() == [0]  # 355 -> 10 deg is a 15 deg turn

# ---------------------------------------------------------------- plan

@pytest.mark.parametrize("method", mining.METHODS)
def test_plan_sizes_and_subsets(world, method):
    data = world["data"]
    p = mining.plan(method, data, np.random.default_rng(0), cache_refresh_rate=50, neg_samples_num=100)
    assert len(p.queries) == 50 and len(set(p.queries.tolist())) == 50
    assert set(p.queries.tolist()) <= set(data.valid_queries.tolist())
    assert p.database.tolist() == sorted(set(p.database.tolist()))
    positives = set()
    for q in p.queries:
        positives |= set(data.hard_positives[q].tolist())
    if method == "partial":
        pool = p.negative_pool.tolist()
        assert len(pool) == 100 == len(set(pool)) and all(0 <= j < 300 for j in pool)
        assert set(p.database.tolist()) == set(pool) | positives
    elif method == "full":
        assert p.database.tolist() == list(range(300)) and len(p.negative_pool) == 0
    else:
        assert set(p.database.tolist()) == positives and len(p.negative_pool) == 0


def test_plan_is_deterministic_for_a_seed(world):
    a = mining.plan("partial", world["data"], np.random.default_rng(7), 40, 100)
    b = mining.plan("partial", world["data"], np.random.default_rng(7), 40, 100)
    c = mining.plan("partial", world["data"], np.random.default_rng(8), 40, 100)
    for f in ("queries", "database", "negative_pool"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert a.queries.tolist() != c.queries.tolist()


def test_plan_caps_queries_and_negative_samples():
    # Baidu Mall: 689 database images but neg_samples_num 1000 (the fork's min)
    r = np.random.default_rng(1)
    data = mining.build_triplet_dataset(r.uniform(0, 300, (689, 2)), r.uniform(0, 300, (30, 2)), HARD_M, SOFT_M)
    p = mining.plan("partial", data, np.random.default_rng(0), cache_refresh_rate=1000, neg_samples_num=1000)
    assert p.negative_pool.tolist() == list(range(689)) and p.database.tolist() == list(range(689))
    assert sorted(p.queries.tolist()) == data.valid_queries.tolist()


def test_plan_refuses_unknown_method(world):
    with pytest.raises(ValueError, match="partial, full, random"):
        mining.plan("msls_weighted", world["data"], np.random.default_rng(0), 10, 10)


# ---------------------------------------------------------------- select

@pytest.fixture(params=["one block", "tiny blocks"])
def chunking(request, monkeypatch):
    """Run twice: with the default memory bound and with one so small that every loop over blocks runs."""
    if request.param == "tiny blocks":
        monkeypatch.setattr(mining, "_CHUNK_BYTES", 8 * 16 * 7)  # 7 rows of 16-d float64


def test_partial_matches_brute_force(world, chunking):
    data, geo, desc = world["data"], world["geo"], world["desc"]
    p = mining.plan("partial", data, np.random.default_rng(3), cache_refresh_rate=60, neg_samples_num=120)
    triplets, cache = mining.select("partial", data, p, *describe(world, p), np.random.default_rng(4))
    assert triplets.dtype == np.int64 and triplets.shape == (60, 2 + K) and cache is None
    for row in triplets:
        q = row[0]
        assert row[1] == brute_best_positive(geo[q], desc[q])
        assert row[2:].tolist() == brute_hardest(geo[q], desc[q], p.negative_pool)
        assert (geo[q, row[2:]] > SOFT_M).all()
    np.testing.assert_array_equal(triplets[:, 0], p.queries)


def test_full_with_the_whole_database_sampled_matches_brute_force(world, chunking):
    data, geo, desc = world["data"], world["geo"], world["desc"]
    p = mining.plan("full", data, np.random.default_rng(3), cache_refresh_rate=60, neg_samples_num=1000)
    cache0 = mining.new_neg_cache(80, K)
    triplets, cache = mining.select("full", data, p, *describe(world, p), np.random.default_rng(4),
                                    neg_samples_num=1000, neg_cache=cache0)
    assert (cache0 == -1).all()  # the caller's array is not modified
    for row in triplets:
        q = row[0]
        assert row[1] == brute_best_positive(geo[q], desc[q])
        assert row[2:].tolist() == brute_hardest(geo[q], desc[q], range(300))
        assert cache[q].tolist() == row[2:].tolist()
    untouched = np.setdiff1d(np.arange(80), p.queries)
    assert (cache[untouched] == -1).all()


def test_full_keeps_previous_hardest_negatives_across_refreshes(world, chunking):
    data, geo, desc = world["data"], world["geo"], world["desc"]
    q_all = data.valid_queries
    cache = mining.new_neg_cache(80, K)
    rng = np.random.default_rng(5)
    previous = {}
    for refresh in range(2):
        p = mining.plan("full", data, np.random.default_rng(refresh), cache_refresh_rate=1000, neg_samples_num=30)
        assert sorted(p.queries.tolist()) == q_all.tolist()
        # brute force with a copy of the rng: one draw of 30 db images per query, in plan order (VG's order)
        twin = np.random.Generator(np.random.PCG64())
        twin.bit_generator.state = rng.bit_generator.state
        triplets, cache = mining.select("full", data, p, *describe(world, p), rng, neg_samples_num=30,
                                        neg_cache=cache)
        for row in triplets:
            q = row[0]
            sampled = twin.choice(300, size=30, replace=False)
            candidates = set(sampled.tolist()) | set(previous.get(q, []))
            assert row[2:].tolist() == brute_hardest(geo[q], desc[q], candidates)
            if q in previous:  # old negatives stay candidates: the k-th nearest can only get nearer
                assert desc[q, row[2:]].max() <= desc[q, previous[q]].max()
            previous[q] = row[2:].tolist()
    assert all(cache[q].tolist() == previous[q] for q in q_all)


def test_random_negatives(world):
    data, geo, desc = world["data"], world["geo"], world["desc"]
    p = mining.plan("random", data, np.random.default_rng(3), cache_refresh_rate=60, neg_samples_num=1000)
    rng = np.random.default_rng(9)
    twin = np.random.Generator(np.random.PCG64())
    twin.bit_generator.state = rng.bit_generator.state
    triplets, _ = mining.select("random", data, p, *describe(world, p), rng)
    for row in triplets:
        q = row[0]
        assert row[1] == brute_best_positive(geo[q], desc[q])
        n_soft = int((geo[q] <= SOFT_M).sum())
        draw = twin.choice(300, size=K + n_soft, replace=False)
        assert row[2:].tolist() == [j for j in draw.tolist() if geo[q, j] > SOFT_M][:K]
        assert len(set(row[2:].tolist())) == K


@pytest.mark.parametrize("method", mining.METHODS)
def test_line_has_the_obvious_answer(method):
    data = line_dataset()
    q_desc, db_desc = line_descriptors()
    p = mining.plan(method, data, np.random.default_rng(0), cache_refresh_rate=5, neg_samples_num=1000)
    triplets, _ = mining.select(method, data, p, q_desc, db_desc[p.database], np.random.default_rng(0),
                                neg_cache=mining.new_neg_cache(1, K))
    assert triplets[0, :2].tolist() == [0, 1]  # db 1 (desc 3) beats db 0 (desc 5)
    if method == "random":
        assert not set(triplets[0, 2:].tolist()) & {0, 1, 2}
    else:
        assert triplets[0, 2:].tolist() == list(range(19, 9, -1))  # db 2 is nearer but inside 25 m


@pytest.mark.parametrize("method", ["partial", "full"])
def test_ties_go_to_the_lowest_db_index(method):
    data = line_dataset()
    q_desc, db_desc = line_descriptors()
    db_desc[0] = db_desc[1]  # equal positives
    db_desc[3:] = [7, 0]  # all candidates equally far
    p = mining.plan(method, data, np.random.default_rng(0), 5, 1000)
    triplets, _ = mining.select(method, data, p, q_desc, db_desc[p.database], np.random.default_rng(0),
                                neg_cache=mining.new_neg_cache(1, K))
    assert triplets[0].tolist() == [0, 0] + list(range(3, 13))


def test_full_cache_survives_a_poor_sample():
    data = line_dataset()
    q_desc, db_desc = line_descriptors()
    cache = mining.new_neg_cache(1, K)
    for samples in (1000, 1):  # the second refresh draws one image; the ten remembered ones remain
        p = mining.plan("full", data, np.random.default_rng(samples), 5, samples)
        triplets, cache = mining.select("full", data, p, q_desc, db_desc, np.random.default_rng(samples),
                                        neg_samples_num=samples, neg_cache=cache)
        assert triplets[0, 2:].tolist() == list(range(19, 9, -1)) == cache[0].tolist()


@pytest.mark.parametrize("method", mining.METHODS)
def test_too_few_candidates_is_an_error(method):
    data = line_dataset(n_db=12)  # 12 images, 3 soft positives: 9 candidates < 10
    q_desc, db_desc = line_descriptors(n_db=12)
    p = mining.plan(method, data, np.random.default_rng(0), 5, 1000)
    with pytest.raises(ValueError, match=r"Query 0 .*lower negs_num_per_query, enlarge neg_samples_num"):
        mining.select(method, data, p, q_desc, db_desc[p.database], np.random.default_rng(0),
                      neg_cache=mining.new_neg_cache(1, K))
    triplets, _ = mining.select(method, data, p, q_desc, db_desc[p.database], np.random.default_rng(0),
                                negs_num_per_query=9, neg_cache=mining.new_neg_cache(1, 9))
    assert sorted(triplets[0, 2:].tolist()) == list(range(3, 12))


def test_full_needs_a_cache_and_descriptors_must_match_the_plan(world):
    data = world["data"]
    p = mining.plan("full", data, np.random.default_rng(0), 10, 100)
    q_desc, db_desc = describe(world, p)
    with pytest.raises(ValueError, match="new_neg_cache"):
        mining.select("full", data, p, q_desc, db_desc, np.random.default_rng(0))
    with pytest.raises(ValueError, match="db_desc"):
        mining.select("partial", data, p, q_desc, db_desc[:-1], np.random.default_rng(0))


# ---------------------------------------------------------------- batches

def test_batches_are_in_order_and_drop_the_last():
    triplets = np.arange(1003 * 12).reshape(1003, 12)
    assert mining.dataset_steps(1000, 4) == 250 and mining.dataset_steps(1003, 4) == 250
    np.testing.assert_array_equal(mining.triplet_batch_indices(triplets, 0, 4), triplets[0:4])
    np.testing.assert_array_equal(mining.triplet_batch_indices(triplets, 249, 4), triplets[996:1000])
    with pytest.raises(ValueError, match="out of range"):
        mining.triplet_batch_indices(triplets, 250, 4)
