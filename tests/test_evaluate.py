"""Evaluator: kNN + recall against hand-computed cases and a brute-force numpy reference."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxvpr import evaluate as ev
from jaxvpr.data.format import ImageFolder


def _folder(utm, heading=None):
    utm = np.asarray(utm, dtype=float)
    heading = np.full(len(utm), np.nan) if heading is None else np.asarray(heading, dtype=float)
    return ImageFolder(root=None, paths=[f"{i}.jpg" for i in range(len(utm))], utm=utm, heading=heading)


def test_recalls_from_hits_hand_computed():
    hits = np.array([
        [True, False, False],   # found at 1
        [False, False, True],   # found at 3
        [False, False, False],  # never
        [False, True, True],    # found at 2
    ])
    r = ev.recalls_from_hits(hits, (1, 2, 3))
    assert r == {"1": 25.0, "2": 50.0, "3": 75.0}


def test_knn_is_exact_l2():
    db = np.array([[0, 0], [1, 0], [0, 2], [5, 5]], dtype=np.float32)
    q = np.array([[0.9, 0.1], [0, 1.8]], dtype=np.float32)
    d, i = ev.knn(db, q, k=3)
    assert i.tolist() == [[1, 0, 2], [2, 0, 1]]
    np.testing.assert_allclose(d[0], [0.02, 0.82, 4.42], rtol=1e-5)  # squared L2
    _, i = ev.knn(db, q, k=6)  # more neighbours than images: -1 padding
    assert (i[:, 4:] == -1).all()


def test_compute_results_hand_computed():
    # Database on a line every 10 m; query 0 stands at 3 m, query 1 at 48 m, query 2 far away.
    database = _folder([[0, 0], [10, 0], [20, 0], [30, 0], [40, 0], [50, 0]], [0, 90, 180, 270, 0, 90])
    queries = _folder([[3, 0], [48, 0], [1000, 0]], [10, 80, 0])
    predictions = np.array([
        [5, 3, 0, 1],   # db0 (3 m) at rank 3
        [5, 4, 0, 1],   # db5 (2 m) at rank 1
        [0, 1, 2, 3],   # nothing within 25 m
    ])
    res = ev.compute_results(database, queries, predictions,
                             [ev.Threshold(5.0), ev.Threshold(25.0), ev.Threshold(25.0, 30.0)], (1, 2, 3))
    assert res[0] == {"distance_m": 5.0, "angle_deg": None, "upper_bound": pytest.approx(200 / 3),
                      "recall": {"1": pytest.approx(100 / 3), "2": pytest.approx(100 / 3), "3": pytest.approx(200 / 3)}}
    # 25 m: query 0's db3 (27 m) at rank 2 is too far, db0 (3 m) at rank 3; query 1: db5 at rank 1.
    assert res[1]["recall"] == {"1": pytest.approx(100 / 3), "2": pytest.approx(100 / 3), "3": pytest.approx(200 / 3)}
    # 25 m + 30°: query 0 (10°) matches db0 (0°) and db4 is too far; query 1 (80°) matches db5 (90°).
    assert res[2]["recall"]["1"] == pytest.approx(100 / 3)
    assert res[2]["recall"]["3"] == pytest.approx(200 / 3)
    assert res[2]["upper_bound"] == pytest.approx(200 / 3)


def test_chance_recalls_hand_computed_and_by_simulation():
    # 6 database images every 10 m. Query 0 at 3 m: positives within 15 m are db0, db1 (P = 2);
    # query 1 far away: P = 0. R@1 = mean(2/6, 0); R@2 = mean(1 - (4/6)(3/5), 0) = mean(0.6, 0).
    database = _folder([[0, 0], [10, 0], [20, 0], [30, 0], [40, 0], [50, 0]], [0] * 6)
    queries = _folder([[3, 0], [1000, 0]], [0, 0])
    c = ev.chance_recalls(database, queries, ev.Threshold(15.0), (1, 2, 6))
    assert c["1"] == pytest.approx(100 * (2 / 6) / 2)
    assert c["2"] == pytest.approx(100 * 0.6 / 2)
    assert c["6"] == pytest.approx(50.0)
    # Monte Carlo: random rankings of the database.
    rng = np.random.default_rng(0)
    hits = [[bool({0, 1} & set(rng.permutation(6)[:2].tolist())), False] for _ in range(20000)]
    assert 100 * np.mean(hits) == pytest.approx(c["2"], abs=1.0)


def _brute_force_recalls(db_desc, q_desc, db_utm, q_utm, thr, ks):
    d2 = ((q_desc[:, None, :] - db_desc[None, :, :]) ** 2).sum(-1)
    order = np.argsort(d2, axis=1, kind="stable")
    geo = np.linalg.norm(q_utm[:, None] - db_utm[None], axis=-1) <= thr
    out = {}
    for k in ks:
        out[str(k)] = 100.0 * np.mean([geo[i, order[i, :k]].any() for i in range(len(q_desc))])
    return out, 100.0 * geo.any(1).mean()


def test_recall_matches_brute_force_on_random_descriptors():
    rng = np.random.default_rng(1)
    n_db, n_q, dim = 2000, 300, 64
    db_utm = rng.uniform(0, 300, (n_db, 2))
    q_utm = db_utm[rng.integers(0, n_db, n_q)] + rng.normal(0, 8, (n_q, 2))
    db_desc = rng.normal(size=(n_db, dim)).astype(np.float32)
    # queries resemble their nearest database image, with noise: recall is neither 0 nor 100
    nearest = np.argmin(np.linalg.norm(q_utm[:, None] - db_utm[None], axis=-1), axis=1)
    q_desc = (db_desc[nearest] + rng.normal(0, 2.5, (n_q, dim))).astype(np.float32)
    _, predictions = ev.knn(db_desc, q_desc, 20)
    for thr in (5.0, 25.0):
        res = ev.compute_results(_folder(db_utm), _folder(q_utm), predictions, [ev.Threshold(thr)])[0]
        ref, upper = _brute_force_recalls(db_desc, q_desc, db_utm, q_utm, thr, ev.RECALL_VALUES)
        for k in ref:
            assert res["recall"][k] == pytest.approx(ref[k], abs=1e-9)
        assert res["upper_bound"] == pytest.approx(upper)
    assert 5 < res["recall"]["1"] < 95


def test_parse_thresholds_and_resize():
    assert ev.parse_thresholds("25") == [ev.Threshold(25.0)]
    t = ev.parse_thresholds("1,10,25,1,10,25", "-,-,-,5,30,60")
    assert [x.label() for x in t] == ["1m", "10m", "25m", "1m 5°", "10m 30°", "25m 60°"]
    assert ev.parse_thresholds("1,10,25", "5,30,60")[2] == ev.Threshold(25.0, 60.0)
    with pytest.raises(ValueError):
        ev.parse_thresholds("25", "5,30")
    assert ev.parse_resize(None) is None and ev.parse_resize("none") is None
    assert ev.parse_resize("480") == 480 and ev.parse_resize("480,640") == (480, 640)
    assert ev.parse_resize("480x640") == (480, 640)
    with pytest.raises(ValueError):
        ev.parse_resize("big")


def test_format_table_lists_every_threshold():
    res = [{"distance_m": 25.0, "angle_deg": None, "upper_bound": 100.0, "recall": {"1": 50.0, "5": 75.0}},
           {"distance_m": 10.0, "angle_deg": 30.0, "upper_bound": 90.0, "recall": {"1": 40.0, "5": 60.0}}]
    table = ev.format_table(res, "title")
    assert "25m" in table and "10m 30°" in table and "75.0" in table and "90.0" in table
    json.dumps(res)


def test_cli_on_the_synthetic_city_writes_results_and_descriptors(tiny_city, tmp_path):
    """End to end: a random-init CosPlace ResNet-18 on the tiny city's night queries."""
    import subprocess
    import sys

    out = tmp_path / "res"
    r = subprocess.run([sys.executable, "-m", "jaxvpr.evaluate", "--dataset", str(tiny_city / "images/test"),
                        "--queries", "queries_night", "--model", "cosplace_resnet18_512", "--random-init",
                        "--thresholds", "10,25,25", "--angles", "-,-,60", "--batch-size", "64",
                        "--save-descriptors", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "25m 60°" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["queries_folder"] == "queries_night" and res["descriptor_dim"] == 512
    assert res["num_queries"] == 50 and res["num_database"] == 384
    assert [(x["distance_m"], x["angle_deg"]) for x in res["results"]] == [(10.0, None), (25.0, None), (25.0, 60.0)]
    assert res["results"][1]["upper_bound"] == 100.0  # every test query has a database image within 25 m
    db = np.load(out / "database_descriptors.npy")
    q = np.load(out / "queries_descriptors.npy")
    pred = np.load(out / "predictions.npy")
    assert db.shape == (384, 512) and q.shape == (50, 512) and pred.shape == (50, 20)
    np.testing.assert_allclose(np.linalg.norm(db, axis=1), 1.0, rtol=1e-5)
    # predictions are the exact L2 neighbours of the saved descriptors
    d2 = ((q[:, None] - db[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(pred[:, 0], d2.argmin(1))
    assert len((out / "database_paths.txt").read_text().split()) == 384

    # The evaluate recipe (configs/eval_synthetic.py, training's field names) gives the same table.
    work = tmp_path / "recipe"
    r = subprocess.run([sys.executable, "-m", "jaxvpr.main", "--config", "configs/eval_synthetic.py",
                        "--workdir", str(work), f"--config.data.root={tiny_city}", "--config.data.test_queries=queries_night",
                        "--config.eval.thresholds=10,25,25", "--config.eval.angles=-,-,60", "--config.eval.batch_size=64"],
                       capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    recipe = json.loads((work / "results.json").read_text())["queries_night"]
    assert recipe["results"] == res["results"] and (work / "test" / "queries_night").is_dir()
    # ... and with the descriptors streamed to disk and an IVF index visiting every list: the same
    r = subprocess.run([sys.executable, "-m", "jaxvpr.main", "--config", "configs/eval_synthetic.py",
                        "--workdir", str(tmp_path / "ivf"), f"--config.data.root={tiny_city}",
                        "--config.data.test_queries=queries_night", "--config.eval.thresholds=10,25,25",
                        "--config.eval.angles=-,-,60", "--config.eval.batch_size=64",
                        "--config.eval.descriptors_on_disk=True", "--config.eval.search_index=IVF4,Flat",
                        "--config.eval.nprobe=4"], capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    ivf = json.loads((tmp_path / "ivf" / "results.json").read_text())["queries_night"]
    assert ivf["results"] == res["results"] and ivf["search"]["index"] == "IVF4,Flat"
    np.testing.assert_allclose(np.load(tmp_path / "ivf" / "test" / "queries_night" / "database_descriptors.npy"), db,
                               rtol=1e-5, atol=1e-6)
    # The evaluation-only schema of earlier versions is refused with the new name beside it.
    r = subprocess.run([sys.executable, "-m", "jaxvpr.main", "--config", "configs/eval_synthetic.py",
                        "--workdir", str(work), "--config.model.checkpoint=x"],
                       capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert r.returncode != 0 and "checkpoint" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]


def test_corrupt_image_is_an_error_unless_skipped(tmp_path):
    """A corrupt database image stops the evaluation with its name, or is skipped and counted."""
    import subprocess
    import sys

    from PIL import Image

    rng = np.random.default_rng(0)
    for folder, n in (("database", 6), ("queries", 3)):
        (tmp_path / folder).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(
                tmp_path / folder / f"@{i * 3}.0@0.0@@@@@@@@@@@@@.jpg")
    bad = tmp_path / "database" / "@100.0@0.0@@@@@@@@@@@@@.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cmd = [sys.executable, "-m", "jaxvpr.evaluate", "--dataset", str(tmp_path), "--model", "cosplace_resnet18_512",
           "--random-init", "--batch-size", "4", "--out", str(tmp_path / "res")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and bad.name in r.stderr
    r = subprocess.run(cmd + ["--skip-corrupt"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "res/results.json").read_text())
    assert res["num_database_skipped"] == 1 and res["num_database"] == 6 and str(bad) in res["skipped_paths"]
