"""The benchmark command: tables recomputed independently from the cached descriptors, the cache and
resume, report formats, and errors that name what is wrong.

Reference: brute-force numpy (all pairwise descriptor distances, argsort; positives from the image
positions and headings by hand), not the evaluator's FAISS/positives code.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxvpr import benchmark as bm
from jaxvpr import evaluate as ev
from jaxvpr import testtime
from jaxvpr.checkpoint import save_model
from jaxvpr.data.format import read_split
from jaxvpr.models import init_variables, model_config

pytestmark = pytest.mark.slow
THRESHOLDS = "1:5,10:30,25"


@pytest.fixture(scope="module")
def floors(tiny_indoor):
    """Two floors of the synthetic tiny indoor preset (split folders)."""
    found = sorted(p for p in Path(tiny_indoor).iterdir() if (p / "database").is_dir())
    return found[:2]


@pytest.fixture(scope="module")
def first_run(floors, tmp_path_factory):
    """One benchmark: a registry model at random init and a jaxvpr checkpoint, two floors."""
    tmp = tmp_path_factory.mktemp("bench")
    cfg = model_config("cosplace_resnet18_512")
    ckpt = save_model(tmp / "ckpt", cfg, init_variables(cfg, jax.random.key(3)))  # other weights, as a checkpoint
    models = [bm.ModelEntry.from_fields(dict(label="cosplace", model="cosplace_resnet18_512", random_init=True,
                                             resize="64,64")),
              bm.ModelEntry.from_fields(dict(label="r18 (ckpt)", checkpoint=str(ckpt), resize="64,64"))]
    datasets = [bm.DatasetEntry(f) for f in floors]
    out = tmp / "out"
    log = []
    report = bm.run_benchmark(models, datasets, bm.parse_threshold_spec(THRESHOLDS), out, progress=False,
                              log=log.append)
    return dict(report=report, models=models, datasets=datasets, out=out, log=log)


def cached(out: Path, label: str, floor: str) -> dict[str, Path]:
    (folder,) = (out / "descriptors").glob(f"{bm._slug(label)}-*/{floor}-*")
    return {"database": folder / "database.npz", "queries": folder / "queries.npz"}


def brute_force_recalls(db: np.ndarray, q: np.ndarray, split, distance_m: float, angle_deg: float | None):
    """Bounds on R@1/5/10/20 and the upper bound, from every pairwise distance (no FAISS, no PositiveFinder).

    FAISS ranks with float32 distances (|q|^2 + |d|^2 - 2 q.d), so database images whose distances tie
    to ~1e-5 of the squared norms may come in either order (random networks give near-identical
    descriptors). Image j is surely among the first N when fewer than N others are closer than
    d_j + tie, possibly when fewer than N are closer than d_j - tie. Returns ``(low, high, upper_bound)``.
    """
    q64, db64 = q.astype(np.float64), db.astype(np.float64)
    d2 = ((q64[:, None, :] - db64[None, :, :]) ** 2).sum(-1)
    tie = 1e-5 * ((q64 ** 2).sum(1, keepdims=True) + (db64 ** 2).sum(1).max())
    ordered = np.sort(d2, axis=1)
    before_most = np.stack([np.searchsorted(o, row + t, "left") for o, row, t in zip(ordered, d2, tie)]) - 1
    before_least = np.stack([np.searchsorted(o, row - t, "left") for o, row, t in zip(ordered, d2, tie)])
    geo = np.sqrt(((split.queries.utm[:, None, :] - split.database.utm[None, :, :]) ** 2).sum(-1))
    positive = geo <= distance_m
    if angle_deg is not None:
        diff = np.abs(split.queries.heading[:, None] - split.database.heading[None, :]) % 360
        positive &= np.minimum(diff, 360 - diff) <= angle_deg
    low = {str(n): 100.0 * (positive & (before_most < n)).any(1).mean() for n in (1, 5, 10, 20)}
    high = {str(n): 100.0 * (positive & (before_least < n)).any(1).mean() for n in (1, 5, 10, 20)}
    return low, high, 100.0 * positive.any(1).mean()


def test_tables_equal_recalls_recomputed_from_the_cached_descriptors(first_run, floors):
    report, out = first_run["report"], first_run["out"]
    assert report["pairs_described"] == 4 and report["pairs_cached"] == 0
    thresholds = bm.parse_threshold_spec(THRESHOLDS)
    for label in ("cosplace", "r18 (ckpt)"):
        for floor in floors:
            split = read_split(floor)
            files = cached(out, label, floor.name)
            db, q = (np.load(files[k])["values"] for k in ("database", "queries"))
            assert db.shape[0] == len(split.database) and q.shape[0] == len(split.queries)
            got = report["results"][label][floor.name]["results"]
            for t, r in zip(thresholds, got):
                low, high, upper = brute_force_recalls(db, q, split, t.distance_m, t.angle_deg)
                for n in low:
                    assert low[n] - 1e-9 <= r["recall"][n] <= high[n] + 1e-9, (label, floor.name, t, n)
                    assert high[n] - low[n] <= 4.0  # the check is not vacuous: few ties
                assert r["upper_bound"] == pytest.approx(upper, abs=1e-9)
    # ranking = mean R@1 over datasets and thresholds, best first
    means = {m["label"]: m["mean_recall_at_1"] for m in report["models"]}
    for label, mean in means.items():
        r1 = [r["recall"]["1"] for f in floors for r in report["results"][label][f.name]["results"]]
        assert mean == pytest.approx(np.mean(r1))
    assert [m["label"] for m in report["models"]] == sorted(means, key=lambda k: -means[k])
    assert [m["descriptor_dim"] for m in report["models"]] == [512, 512]
    assert {m["backbone"] for m in report["models"]} == {"ResNet18"}


def test_markdown_csv_and_latex_reports_hold_the_same_numbers(first_run, floors):
    report, out = first_run["report"], first_run["out"]
    md = (out / "benchmark.md").read_text()
    heads = ["1 m 5°", "10 m 30°", "25 m"]
    assert "| Method | Backbone | Desc. Dim. | " + " | ".join(heads) + " |" in md
    for floor in floors:
        section = md.split(f"**{floor.name} (Recall@1)**")[1].split("**")[0:]
        text = "**".join(section)
        upper = [f"{r['upper_bound']:.1f}" for r in report["results"]["cosplace"][floor.name]["results"]]
        assert "| Upper Bounds |  |  | " + " | ".join(upper) + " |" in text
        for m in report["models"]:
            cells = [f"{r['recall']['1']:.1f}" for r in report["results"][m["label"]][floor.name]["results"]]
            row = next(line for line in text.splitlines() if line.startswith(f"| {m['label']} |"))
            assert [c.strip().strip("*") for c in row.strip("|").split("|")[3:]] == cells
    rows = list(csv.DictReader(open(out / "benchmark.csv")))
    assert len(rows) == 2 * len(floors) * 3
    one = next(r for r in rows if r["label"] == "cosplace" and r["dataset"] == floors[0].name and r["angle_deg"] == "")
    res = report["results"]["cosplace"][floors[0].name]["results"][2]
    assert float(one["R@5"]) == pytest.approx(res["recall"]["5"]) and float(one["distance_m"]) == 25
    tex = (out / "benchmark.tex").read_text()
    assert tex.count("\\begin{tabular}") == len(floors) + 1 and "1 m 5$^\\circ$" in tex
    assert "r18 (ckpt)" in tex and "Upper Bounds" in tex and "\\midrule" in tex
    saved = json.loads((out / "benchmark.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))


def test_a_resumed_benchmark_reuses_the_cache(first_run, floors, monkeypatch):
    out, models, datasets = first_run["out"], first_run["models"], first_run["datasets"]
    calls = []
    real = ev.extract_descriptors

    def counting(describe, paths, *args, **kwargs):
        calls.append(len(paths))
        return real(describe, paths, *args, **kwargs)

    monkeypatch.setattr(ev, "extract_descriptors", counting)
    monkeypatch.setattr(testtime, "extract_descriptors", counting)  # queries go through the test-time methods
    again = bm.run_benchmark(models, datasets, bm.parse_threshold_spec(THRESHOLDS + ",5"), out, progress=False,
                             log=lambda s: None)
    assert calls == [] and again["pairs_cached"] == 4  # a new threshold costs no extraction
    for label in ("cosplace", "r18 (ckpt)"):
        for floor in floors:
            assert again["results"][label][floor.name]["results"][:3] == \
                first_run["report"]["results"][label][floor.name]["results"]
    # a run killed after one pair's database: only its queries are described again
    files = cached(out, "r18 (ckpt)", floors[1].name)
    files["queries"].unlink()
    before = files["database"].stat().st_mtime_ns
    resumed = bm.run_benchmark(models, datasets, bm.parse_threshold_spec(THRESHOLDS), out, progress=False,
                               log=lambda s: None)
    assert calls == [len(read_split(floors[1]).queries)]
    assert resumed["pairs_described"] == 1 and resumed["pairs_cached"] == 3
    assert files["database"].stat().st_mtime_ns == before
    for label in ("cosplace", "r18 (ckpt)"):
        for floor in floors:
            assert resumed["results"][label][floor.name]["results"] == \
                first_run["report"]["results"][label][floor.name]["results"]


def test_command_line_pictures_cache_and_test_methods(first_run, floors, capsys):
    out = first_run["out"]
    code = bm.main(["--dataset", str(floors[0]), "--thresholds", "25",
                    "--model", "label=cosplace model=cosplace_resnet18_512 random_init=true resize=64,64",
                    "--model", "label=voting model=cosplace_resnet18_512 random_init=true resize=64,64 "
                               "test_method=maj_voting pca_dim=32",
                    "--out", str(out), "--save-predictions", "2", "--only-wrong", "--save-map"])
    printed = capsys.readouterr().out
    assert code == 0 and "1 pairs described, 1 from the cache" in printed
    report = json.loads((out / "benchmark.json").read_text())
    voting = report["results"]["voting"][floors[0].name]
    assert voting["test_method"] == "maj_voting" and voting["pca"]["dim"] == 32 and voting["descriptor_dim"] == 32
    assert np.load(cached(out, "voting", floors[0].name)["queries"])["values"].shape[1:] == (5, 512)  # 5 crops
    pictures = out / "pictures" / "cosplace" / floors[0].name
    assert (pictures / "map.png").is_file()
    wrong = 100 - first_run["report"]["results"]["cosplace"][floors[0].name]["results"][2]["recall"]["1"]
    n_queries = len(read_split(floors[0]).queries)
    assert len(list((pictures / "predictions").glob("*_wrong.png"))) == round(wrong * n_queries / 100)
    assert not list((pictures / "predictions").glob("*_correct.png"))


@pytest.mark.parametrize("args, message", [
    (["--model", "label=a model=cosplace_resnet18_512"], "random_init=true"),
    (["--model", "label=a model=no_such_model random_init=true"], "unknown model"),
    (["--model", "label=a model=cosplace_resnet18_512 random_init=true colour=red"], "unknown field"),
    (["--model", "label=a model=cosplace_resnet18_512 random_init=true",
      "--model", "label=a model=cosplace_resnet18_512 random_init=true"], "unique"),
    (["--model", "label=a checkpoint=/nonexistent/ckpt"], "does not exist"),
    (["--model", "label=a model=cosplace_resnet18_512 random_init=true", "--thresholds", "1:500"], "out of range"),
])
def test_bad_input_is_a_clear_error(args, message, floors, tmp_path, capsys):
    code = bm.main(["--dataset", str(floors[0]), "--out", str(tmp_path / "o"), *args])
    assert code == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "o" / "benchmark.json").exists()


def test_missing_dataset_folder_fails_before_any_extraction(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ev, "extract_descriptors", lambda *a, **k: pytest.fail("described before checking data"))
    monkeypatch.setattr(testtime, "extract_descriptors", lambda *a, **k: pytest.fail("described before checking"))
    code = bm.main(["--dataset", str(tmp_path / "gangnam_b2"), "--out", str(tmp_path / "o"),
                    "--model", "label=a model=cosplace_resnet18_512 random_init=true"])
    assert code == 1 and "gangnam_b2" in capsys.readouterr().err


def test_threshold_and_resize_specs():
    ts = bm.parse_threshold_spec(bm.THESIS_THRESHOLDS)
    assert [(t.distance_m, t.angle_deg) for t in ts] == [(1, 5), (10, 30), (25, 60), (1, None), (10, None), (25, None)]
    assert [bm.threshold_header(t) for t in ts[:4]] == ["1 m 5°", "10 m 30°", "25 m 60°", "1 m"]
    assert bm.parse_resize("480/14") == bm.ShorterSide(480, 14)
    assert bm.parse_resize("322,322") == (322, 322) and bm.parse_resize("") is None
    assert bm.DatasetEntry.parse("/d/x:queries_night").queries == "queries_night"
    assert bm.DatasetEntry.parse("/d/x").split_dir == Path("/d/x")


@pytest.mark.parametrize("name", ["benchmark_synthetic", "benchmark_indoor"])
def test_benchmark_configs_parse(name):
    from jaxvpr.train.baseline import load_config_file

    cfg = load_config_file(name)
    entries = [bm.ModelEntry.from_fields(dict(m)) for m in cfg.models]
    assert len({e.label for e in entries}) == len(entries)
    bm.parse_threshold_spec(cfg.thresholds)
    if name == "benchmark_indoor":
        assert len(entries) == 54  # thesis §5.3: "Out of the 54 configurations tested"
        for e in entries:
            model_config(e.model)  # every configuration has a registry architecture
