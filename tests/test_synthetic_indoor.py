"""Tests of the synthetic indoor floors (jaxvpr.data.synthetic_indoor).

`indoor_tiny` is generated once for this module (~15 s on 2 shared cores) through
`ensure_indoor`, then every test reads it. References are independent of the generator:
the community file-name format read by `format.read_split`, upper bounds recomputed
from the written names with `positives.PositiveFinder`, the shop rectangles written to
indoor.json (nobody may stand inside them), and image statistics compared with
daylight renders of the street city.
"""

import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from jaxvpr.data import format as fmt
from jaxvpr.data import render, synthetic, synthetic_indoor
from jaxvpr.data.positives import PositiveFinder

PRESET = "indoor_tiny"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("indoor_cache")


@pytest.fixture(scope="module")
def root(cache_dir) -> pathlib.Path:
    return synthetic_indoor.ensure_indoor(PRESET, seed=0, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def meta(root) -> dict:
    return json.loads((root / "indoor.json").read_text())


@pytest.fixture(scope="module")
def splits(root, meta) -> dict:
    return {floor: fmt.read_split(root / floor) for floor in meta["floors"]}


def test_layout_and_metadata(root, meta, splits):
    floors = synthetic_indoor.PRESETS[PRESET]["floors"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(floors)
    assert meta["version"] == synthetic_indoor.VERSION and meta["preset"] == PRESET and meta["seed"] == 0
    total = 0
    for floor, split in splits.items():
        assert sorted(p.name for p in (root / floor).iterdir()) == ["database", "queries"]
        counts = meta["floors"][floor]["counts"]
        assert (len(split.database), len(split.queries)) == (counts["database"], counts["queries"])
        assert len(split.queries) == synthetic_indoor.PRESETS[PRESET]["queries"]
        total += len(split.database) + len(split.queries)
    assert total == meta["total_images"] <= 1500
    # The recipe's splits name existing floors, and no floor is in two of them (Table 5.9).
    named = [f for fs in meta["splits"].values() for f in fs]
    assert sorted(named) == sorted(floors)


def test_names_parse_with_the_community_format(root, splits):
    for floor, split in splits.items():
        for folder, (h_lo, h_hi) in ((split.database, (1.8, 2.0)), (split.queries, (1.3, 1.6))):
            for i in range(len(folder)):
                r = folder.record(i)
                assert (r.zone_number, r.zone_letter, r.note) == (52, "S", floor)
                assert r.utm_east > 0 and r.utm_north > 0
                assert 0.0 <= r.heading < 360.0
                assert h_lo - 1e-6 <= r.height <= h_hi + 1e-6
                assert 37.0 < r.lat < 38.0 and 126.5 < r.lon < 127.5  # Seoul, UTM zone 52S
                assert abs(r.pitch) <= 12.0 + 1e-6 and abs(r.roll) <= 8.0 + 1e-6
                assert (folder.root / folder.paths[i]).stat().st_size > 500
        # The rig: every capture has the preset's number of cameras, equally spaced in heading.
        n_head = synthetic_indoor.PRESETS[PRESET]["headings"]
        by_capture = {}
        for i in range(len(split.database)):
            by_capture.setdefault(split.database.record(i).pano_id, []).append(split.database.heading[i])
        for headings in by_capture.values():
            steps = np.diff(np.sort(headings))
            assert len(headings) == n_head and np.allclose(steps, 360.0 / n_head, atol=0.05)


def test_upper_bounds_from_the_written_names(meta, splits):
    """Share of queries with a database image within 10 m (>= 95%) and within 1 m and 5 deg (>= 50%)."""
    hits_1m5, n_queries = 0, 0
    for floor, split in splits.items():
        finder = PositiveFinder(split.database.utm, split.database.heading)
        q_utm, q_head = split.queries.utm, split.queries.heading
        at_10m = finder.has_positive(q_utm, 10.0)
        at_1m5 = finder.has_positive(q_utm, 1.0, q_head, 5.0)
        assert at_10m.mean() >= 0.95, floor
        assert at_1m5.mean() >= 0.4, floor
        hits_1m5, n_queries = hits_1m5 + at_1m5.sum(), n_queries + len(q_utm)
        # indoor.json reports the same figures.
        written = meta["floors"][floor]["upper_bounds"]
        assert written["10m"] == pytest.approx(at_10m.mean(), abs=1e-3)
        assert written["1m_5deg"] == pytest.approx(at_1m5.mean(), abs=1e-3)
    assert hits_1m5 / n_queries >= 0.5


def test_every_camera_stands_in_a_corridor_or_hall(meta, splits):
    """No camera inside a shop block, the outer ring of shops or a pillar (rectangles from indoor.json)."""
    for floor, split in splits.items():
        m = meta["floors"][floor]
        e0, e1, n0, n1 = m["extent_utm"]
        solids = np.array(m["solids_utm"] + m["pillars_utm"])
        walkable = np.array(m["walkable_utm"])
        for utm in (split.database.utm, split.queries.utm):
            x, y = utm[:, :1], utm[:, 1:]
            assert ((x > e0) & (x < e1) & (y > n0) & (y < n1)).all()
            inside = ((x > solids[:, 0] - 0.3) & (x < solids[:, 1] + 0.3)
                      & (y > solids[:, 2] - 0.3) & (y < solids[:, 3] + 0.3))
            assert not inside.any(), f"{floor}: {int(inside.any(axis=1).sum())} cameras inside a shop or pillar"
            in_free = ((x >= walkable[:, 0]) & (x <= walkable[:, 1]) & (y >= walkable[:, 2]) & (y <= walkable[:, 3]))
            assert in_free.any(axis=1).all()
        # The shops fill the floor: walkable rectangles and solids do not overlap.
        for a in walkable:
            ox = np.minimum(a[1], solids[:, 1]) - np.maximum(a[0], solids[:, 0])
            oy = np.minimum(a[3], solids[:, 3]) - np.maximum(a[2], solids[:, 2])
            assert not ((ox > 1e-6) & (oy > 1e-6) & (solids[:, 1] - solids[:, 0] > 1.0)).any()
        # Narrow corridors (3-6 m wide).
        widths = m["corridors"]["x_widths_m"] + m["corridors"]["y_widths_m"]
        assert min(widths) >= 3.0 and max(widths) <= 6.0


def test_floors_differ_and_buildings_are_far_apart(root, meta, splits):
    floors = list(splits)
    layouts = {f: tuple(np.round(meta["floors"][f]["solids_utm"], 2).ravel()) for f in floors}
    assert len(set(layouts.values())) == len(floors)
    first = {f: Image.open(splits[f].database.abs_paths()[0]).tobytes() for f in floors}
    assert len(set(first.values())) == len(floors)
    centre = {f: np.mean(np.concatenate([s.database.utm, s.queries.utm]), axis=0) for f, s in splits.items()}
    for a in floors:
        for b in floors:
            if meta["floors"][a]["building"] != meta["floors"][b]["building"]:
                assert np.linalg.norm(centre[a] - centre[b]) > 1000.0
    # Floors of one building share a few shop chains (ids < 100 are the building's chains).
    s1, s2 = (set(c for c in meta["floors"][f]["chains"] if c < 100) for f in ("station_b1", "station_b2"))
    assert s1 & s2
    for f in floors:
        assert meta["floors"][f]["chain_shops"] >= 3


def test_chain_shops_repeat_their_front():
    floor = synthetic_indoor.build_floor("mall_b1", PRESET, seed=0)
    table = floor.city.buildings
    ids, counts = np.unique(table["chain"][table["chain"] >= 0], return_counts=True)
    repeated = ids[counts >= 2]
    assert repeated.size
    for cid in repeated:
        rows = np.nonzero(table["chain"] == cid)[0]
        assert all((table["glyphs"][r] == table["glyphs"][rows[0]]).all() for r in rows)
        assert all((table["sign_bg"][r] == table["sign_bg"][rows[0]]).all() for r in rows)
        assert np.abs(table["colour"][rows] - table["colour"][rows[0]]).max() <= 0.1
    unique = np.nonzero(table["chain"] < 0)[0]
    assert len({table["glyphs"][r].tobytes() for r in unique}) == len(unique)


def test_same_seed_same_bytes_other_seed_differs(root, tmp_path):
    """Re-render a few planned images: same seed -> the files on disk byte for byte; seed 1 -> other images."""
    preset = synthetic_indoor.PRESETS[PRESET]
    floor_name = "station_b2"
    rendered = {}
    for seed in (0, 1):
        floor = synthetic_indoor.build_floor(floor_name, preset, seed)
        jobs, layers = synthetic_indoor.plan_floor(floor, preset, seed, preset["resolution"])
        picks = [jobs[0], jobs[len(jobs) // 2], jobs[-1]]
        out = tmp_path / f"seed{seed}"
        for j in picks:
            (out / j.folder).mkdir(parents=True, exist_ok=True)
        layer_cams = {(floor_name, k): v for k, v in layers.items()}
        synthetic_indoor._init_worker({floor_name: floor}, layer_cams, seed, str(out))
        for j in picks:
            synthetic_indoor._render_job(j)
        rendered[seed] = [(j.folder, j.name, (out / j.folder / j.name).read_bytes()) for j in picks]
    for folder, name, data in rendered[0]:
        assert (root / folder / name).read_bytes() == data
    for (_, name0, data0), (_, name1, data1) in zip(rendered[0], rendered[1], strict=True):
        assert name0 != name1 and data0 != data1


def test_images_are_indoor_dark_and_textured(splits):
    """Pixel std above a floor (not uniform) and mean brightness below daylight street views."""
    indoor_means, rng = [], np.random.default_rng(0)
    for split in splits.values():
        for folder in (split.database, split.queries):
            for i in rng.choice(len(folder), 15, replace=False):
                img = np.asarray(Image.open(folder.abs_paths()[i]).convert("L"), dtype=np.float64)
                assert img.std() > 12.0, folder.abs_paths()[i]
                indoor_means.append(img.mean())
    city = synthetic.build_city("tiny", 0)
    cams = synthetic.pedestrian_cameras(city, "val", 12, synthetic._rng(0, "test_daylight"), 96)
    day = [render.render_view(city, c, render.make_style("day", synthetic._rng(0, "day", k)),
                              np.random.default_rng(k)).mean(axis=2).mean() for k, c in enumerate(cams)]
    assert np.mean(indoor_means) < np.mean(day) - 15.0
    assert 40.0 < np.mean(indoor_means) < 140.0


def test_ensure_indoor_is_cached_and_dataset_root_finds_it(root, cache_dir, monkeypatch):
    stamp = (root / "indoor.json").stat().st_mtime_ns
    assert synthetic_indoor.ensure_indoor(PRESET, seed=0, cache_dir=cache_dir) == root
    assert (root / "indoor.json").stat().st_mtime_ns == stamp
    assert root.parent == cache_dir and root.name == synthetic_indoor.indoor_dirname(PRESET, 0, 96)
    monkeypatch.setenv("JAXVPR_CACHE", str(cache_dir))
    monkeypatch.delenv("JAXVPR_DATA", raising=False)
    assert fmt.dataset_root(synthetic_preset=PRESET) == root


def test_errors_name_the_choices(tmp_path):
    with pytest.raises(ValueError, match="indoor_small"):
        synthetic_indoor.ensure_indoor("indoor_huge", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="station_b1"):
        synthetic_indoor.build_floor("station_b9", PRESET)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        synthetic_indoor.generate_indoor(tmp_path / "full", PRESET)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert os.listdir(tmp_path / "full") == ["x"]
