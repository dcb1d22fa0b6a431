"""Pictures of an evaluation: per-query prediction PNGs (frames, names, captions) and the map.

A hand-made split (solid-colour images of known sizes and geotags) with hand-made predictions whose
correctness is known; the PNGs are read back and their frames found by colour, not by layout.
"""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxvpr import visualize as vis
from jaxvpr.data.format import read_split
from jaxvpr.evaluate import Threshold

EAST, NORTH = 500000.0, 4000000.0
# Database image i: east offset (m), heading (deg), (width, height) in pixels.
DATABASE = [(0, 0, (40, 30)), (10, 30, (30, 60)), (20, 60, (50, 50)), (28, 90, (60, 20)),
            (40, 120, (100, 20)), (50, 150, (64, 48))]
QUERIES = [(2, 0, (48, 36)), (41, 110, (36, 48)), (300, 0, (40, 40))]
# Query 0: db0 (2 m, 0 deg) is a positive at 5 m, db3 (26 m) and db1 (8 m) are not: correct.
# Query 1: db2 (21 m) is not, db4 (1 m) is, then no prediction: wrong.  Query 2: nothing: wrong.
PREDICTIONS = np.array([[0, 3, 1, 5], [2, 4, -1, -1], [-1, -1, -1, -1]])


def _name(east, heading):
    return f"@{EAST + east:.2f}@{NORTH:.2f}@10@S@@@@@{heading}@@@@@@.png"


@pytest.fixture
def split(tmp_path):
    for folder, items, colour in (("database", DATABASE, (30, 60, 200)), ("queries", QUERIES, (128, 128, 128))):
        (tmp_path / folder).mkdir()
        for east, heading, size in items:
            Image.new("RGB", size, colour).save(tmp_path / folder / _name(east, heading))
    s = read_split(tmp_path)
    assert [round(e - EAST) for e in s.database.utm[:, 0]] == [d[0] for d in DATABASE]  # rows in list order
    return s


def _frames(path):
    """Left-to-right ``(colour, width, height)`` of the green or red frames in a PNG, found by colour."""
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    green = (g > 140) & (r < 80) & (b < 80)
    red = (r > 160) & (g < 80) & (b < 80)
    label = np.where(green.any(0), "green", np.where(red.any(0), "red", ""))
    frames, x = [], 0
    while x < len(label):
        if not label[x]:
            x += 1
            continue
        start = x
        while x < len(label) and label[x] == label[start]:
            x += 1
        mask = green if label[start] == "green" else red
        rows = np.flatnonzero(mask[:, start])
        frames.append((str(label[start]), x - start, int(rows.max() - rows.min() + 1)))
    return frames


def _has_text_below(path, frame_count):
    """Whether dark pixels (caption text) lie under each frame of the picture."""
    a = np.asarray(Image.open(path).convert("L")).astype(int)
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    coloured = ((rgb[..., 1] > 140) & (rgb[..., 0] < 80)) | ((rgb[..., 0] > 160) & (rgb[..., 1] < 80))
    bottom = np.flatnonzero(coloured.any(1)).max()
    columns = np.flatnonzero(coloured.any(0))
    runs = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)
    assert len(runs) == frame_count
    return [bool((a[bottom + 1:, run.min():run.max() + 1] < 100).any()) for run in runs]


def test_files_are_named_by_query_and_correctness(split, tmp_path):
    out = tmp_path / "pictures"
    written = vis.save_prediction_images(split, PREDICTIONS, Threshold(5.0), out, num_predictions=3)
    assert [p.name for p in written] == ["0000_correct.png", "0001_wrong.png", "0002_wrong.png"]
    assert sorted(p.name for p in out.iterdir()) == ["0000_correct.png", "0001_wrong.png", "0002_wrong.png"]
    # Only the wrong ones, and a second run replaces the first run's pictures.
    written = vis.save_prediction_images(split, PREDICTIONS, Threshold(5.0), out, num_predictions=3, only_wrong=True)
    assert sorted(p.name for p in out.iterdir()) == ["0001_wrong.png", "0002_wrong.png"] == [p.name for p in written]
    vis.save_prediction_images(split, PREDICTIONS, Threshold(5.0), out, num_predictions=3, only_wrong=True,
                               max_queries=1)
    assert sorted(p.name for p in out.iterdir()) == ["0001_wrong.png"]
    # At 25 m query 1's first prediction (db2, 21 m) is a positive too.
    vis.save_prediction_images(split, PREDICTIONS, Threshold(25.0), out, num_predictions=2)
    assert sorted(p.name for p in out.iterdir()) == ["0000_correct.png", "0001_correct.png", "0002_wrong.png"]
    with pytest.raises(ValueError, match="num_predictions"):
        vis.save_prediction_images(split, PREDICTIONS, Threshold(5.0), out, num_predictions=5)


def test_frames_are_green_for_positives_and_red_otherwise(split, tmp_path):
    h, f = vis.THUMB_HEIGHT, vis.FRAME
    out = tmp_path / "pictures"
    vis.save_prediction_images(split, PREDICTIONS, Threshold(5.0), out, num_predictions=4)
    # Widths follow each image's aspect at height h: db0 40x30 -> 213, db3 60x20 -> 480, db1 30x60 -> 80,
    # db5 64x48 -> 213; db4 100x20 is a panorama wider than 3:1, shrunk to 480 wide.
    assert _frames(out / "0000_correct.png") == [("green", 213 + 2 * f, h + 2 * f), ("red", 480 + 2 * f, h + 2 * f),
                                                 ("red", 80 + 2 * f, h + 2 * f), ("red", 213 + 2 * f, h + 2 * f)]
    # -1: a red-framed square placeholder.
    assert _frames(out / "0001_wrong.png") == [("red", 160 + 2 * f, h + 2 * f), ("green", 480 + 2 * f, h + 2 * f),
                                               ("red", h + 2 * f, h + 2 * f), ("red", h + 2 * f, h + 2 * f)]
    assert [c for c, _, _ in _frames(out / "0002_wrong.png")] == ["red"] * 4
    # Heading: db1 (8 m, 30 deg off query 0) is a positive at 10 m 30 deg, not at 10 m 20 deg.
    vis.save_prediction_images(split, PREDICTIONS, Threshold(10.0, 30.0), out, num_predictions=3)
    assert [c for c, _, _ in _frames(out / "0000_correct.png")] == ["green", "red", "green"]
    vis.save_prediction_images(split, PREDICTIONS, Threshold(10.0, 20.0), out, num_predictions=3)
    assert [c for c, _, _ in _frames(out / "0000_correct.png")] == ["green", "red", "red"]


def test_captions_under_every_image_and_heading_line_only_with_headings(split, tmp_path):
    with_headings = vis.save_prediction_images(split, PREDICTIONS, Threshold(5.0), tmp_path / "a", 3)
    assert _has_text_below(with_headings[0], 3) == [True] * 3
    no_heading = dataclasses.replace(
        split, database=dataclasses.replace(split.database, heading=np.full(len(DATABASE), np.nan)))
    without = vis.save_prediction_images(no_heading, PREDICTIONS, Threshold(5.0), tmp_path / "b", 3)
    tall, short = Image.open(with_headings[0]), Image.open(without[0])
    assert tall.height > short.height  # one caption line more
    # Query 2 has no prediction: no distance, so no heading line either.
    assert Image.open(with_headings[2]).height == Image.open(without[2]).height


def test_map_is_written_with_both_colours(split, tmp_path):
    path = vis.save_map(split, PREDICTIONS, Threshold(5.0), tmp_path / "maps" / "map.png")
    assert path == tmp_path / "maps" / "map.png" and path.stat().st_size > 10_000
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert (np.abs(a - (44, 160, 44)).sum(-1) < 30).any()   # a correct query (matplotlib's tab:green)
    assert (np.abs(a - (214, 39, 40)).sum(-1) < 30).any()   # a wrong query (tab:red)


def test_save_pictures_follows_the_options(split, tmp_path):
    thresholds = [Threshold(25.0), Threshold(5.0)]
    written = vis.save_pictures(vis.PictureOptions(2, only_wrong=True, save_map=True), split, PREDICTIONS,
                                thresholds, tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == ["map.png", "predictions/0002_wrong.png"]
    written = vis.save_pictures(vis.PictureOptions(2, only_wrong=True, threshold=Threshold(5.0)), split, PREDICTIONS,
                                thresholds, tmp_path)
    assert [p.name for p in written] == ["0001_wrong.png", "0002_wrong.png"]


def test_cli_saves_pictures_of_the_wrong_queries_and_the_map(tmp_path):
    """End to end: random-init CosPlace ResNet-18; which queries are wrong is read back from predictions.npy."""
    rng = np.random.default_rng(0)
    data = tmp_path / "split"
    for folder, easts in (("database", [0, 20, 40, 60, 80, 100]), ("queries", [5, 45, 95, 1000])):
        (data / folder).mkdir(parents=True)
        for e in easts:
            grey = rng.integers(0, 256, (80, 96, 1), dtype=np.uint8).repeat(3, axis=-1)  # no red or green pixel
            Image.fromarray(grey).save(data / folder / _name(e, ""))
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "jaxvpr.evaluate", "--dataset", str(data), "--model", "cosplace_resnet18_512",
           "--random-init", "--resize", "64", "--batch-size", "8", "--thresholds", "25", "--save-descriptors",
           "--save-predictions", "3", "--only-wrong", "--save-map"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "--out" in r.stderr  # pictures need a folder
    r = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    predictions = np.load(out / "predictions.npy")
    first = np.array([0, 20, 40, 60, 80, 100])[predictions[:, 0]]
    wrong = [q for q, e in enumerate([5, 45, 95, 1000]) if abs(first[q] - e) > 25]
    assert 3 in wrong  # the query 1 km away
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [f"{q:04d}_wrong.png" for q in wrong]
    assert len(_frames(out / "predictions" / "0003_wrong.png")) == 3
    results = json.loads((out / "results.json").read_text())
    assert results["results"][0]["recall"]["1"] == pytest.approx(100 * (4 - len(wrong)) / 4)
    assert Image.open(out / "map.png").size[0] > 100


def test_evaluator_flags_become_picture_options():
    from types import SimpleNamespace

    from jaxvpr.evaluate import picture_options

    flags = dict(save_predictions=3, only_wrong=True, predictions_max_queries=None, save_map=False, out="res",
                 predictions_threshold="10,30")
    assert picture_options(SimpleNamespace(**flags)) == vis.PictureOptions(3, True, None, False, Threshold(10.0, 30.0))
    assert picture_options(SimpleNamespace(**{**flags, "predictions_threshold": None})).threshold is None
    assert picture_options(SimpleNamespace(**{**flags, "save_predictions": 0})) is None
    for wrong in ({"out": None}, {"save_predictions": 21}):
        with pytest.raises(SystemExit):
            picture_options(SimpleNamespace(**{**flags, **wrong}))
