"""Tests of the procedural city (jaxvpr.data.synthetic, render, utm).

The tiny city is generated once per session (~25-50 s on 2 shared cores) through
`ensure_city`, then every test reads it. References are independent of the code under
test: Snyder's published transverse Mercator example, PROJ values for San Francisco,
the community file-name format, geometry of the generated positions, and image
statistics (brightness, contrast, retrieval with a fixed colour descriptor + faiss).
"""

import glob
import json
import math
import os
import pathlib

import faiss
import numpy as np
import pytest
from PIL import Image

from jaxvpr.data import render, synthetic, utm

FIELDS = ("east", "north", "zone_number", "zone_letter", "lat", "lon", "pano_id", "tile_num",
          "heading", "pitch", "roll", "height", "timestamp", "note")


@pytest.fixture(scope="session")
def city_root(tiny_city) -> pathlib.Path:
    return tiny_city  # generated once per session (tests/conftest.py)


def parse(path: str) -> dict:
    """Split a community image name on '@' (SPEC §1), independently of the generator."""
    parts = os.path.basename(path).split("@")
    assert parts[0] == "" and parts[-1] == ".jpg" and len(parts) == len(FIELDS) + 2, path
    return dict(zip(FIELDS, parts[1:-1], strict=True))


def folder_images(root: pathlib.Path, folder: str) -> list[str]:
    return sorted(glob.glob(str(root / "images" / folder / "*.jpg")))


def positions(paths) -> np.ndarray:
    return np.array([(float(parse(p)["east"]), float(parse(p)["north"])) for p in paths])


def expected_folders() -> set[str]:
    base = {"train/database", "train/queries", "val/database", "val/queries", "test/database", "test/queries"}
    return (base | {f"test/queries_{d}" for d in synthetic.DOMAINS} | {f"target/{d}" for d in synthetic.DOMAINS}
            | {f"val/queries_{d}" for d in synthetic.DOMAINS})


# --------------------------------------------------------------------------------------
# UTM converter
# --------------------------------------------------------------------------------------


def test_transverse_mercator_matches_snyder_worked_example():
    # Snyder (1987), "Map Projections: A Working Manual", USGS Professional Paper 1395,
    # Appendix A, numerical example of the ellipsoidal transverse Mercator (eqs. 8-9,
    # 8-10): Clarke 1866, lat 40.5 N, lon 73.5 W, central meridian 75 W, k0 = 0.9996
    # ->  x = 127,106.5 m, y = 4,484,124.4 m.
    a, b = 6378206.4, 6356583.8
    x, y = utm.tm_forward(40.5, -73.5, -75.0, k0=0.9996, a=a, f=1.0 - b / a)
    assert x == pytest.approx(127106.5, abs=0.1)
    assert y == pytest.approx(4484124.4, abs=0.1)
    lat, lon = utm.tm_inverse(x, y, -75.0, k0=0.9996, a=a, f=1.0 - b / a)
    assert lat == pytest.approx(40.5, abs=1e-9) and lon == pytest.approx(-73.5, abs=1e-9)


def test_utm_matches_proj_in_san_francisco():
    # Reference values computed with PROJ 9 (pyproj 3.7.2, EPSG:4326 <-> EPSG:32610) and
    # checked by hand to be in zone 10S near the city's origin.
    lat, lon = utm.utm_to_latlon(550000.0, 4180000.0, 10, northern=True)
    assert lat == pytest.approx(37.765959835736, abs=1e-8)
    assert lon == pytest.approx(-122.432308347825, abs=1e-8)
    east, north, zone, letter = utm.latlon_to_utm(37.7749, -122.4194)
    assert (zone, letter) == (10, "S")
    assert east == pytest.approx(551130.768481, abs=1e-3)
    assert north == pytest.approx(4180998.881499, abs=1e-3)


def test_utm_round_trip_and_zones():
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-79, 83, 200), rng.uniform(-180, 179.99, 200)
    for la, lo in zip(lat, lon, strict=True):
        e, n, z, letter = utm.latlon_to_utm(la, lo)
        la2, lo2 = utm.utm_to_latlon(e, n, z, northern=utm.is_northern(letter))
        assert la2 == pytest.approx(la, abs=1e-9)
        assert ((lo2 - lo + 180) % 360 - 180) == pytest.approx(0.0, abs=1e-9)
        assert 100_000 < e < 900_000
    assert utm.zone_number(60.0, 5.0) == 32  # Norway exception (32V)
    assert utm.zone_number(78.0, 20.0) == 33  # Svalbard
    assert utm.zone_letter(-80.0) == "C" and utm.zone_letter(84.0) == "X" and utm.zone_letter(0.0) == "N"
    with pytest.raises(ValueError, match="outside the UTM range"):
        utm.zone_letter(85.0)


# --------------------------------------------------------------------------------------
# Renderer
# --------------------------------------------------------------------------------------


def one_building_city(colour) -> render.City:
    """A plain building (no windows, doors, signs or ornament) 20 m x 20 m, 30 m high,
    centred 20 m east of the origin, with the given wall colour."""
    table = synthetic._building_table(np.random.default_rng(0), 1)
    table.update(colour=np.array([colour]), trim=np.array([colour]), win_w=np.zeros(1), has_sign=np.zeros(1, bool),
                 door_w=np.zeros(1), shop_sx=np.full(1, 1e9), floor_band=np.zeros(1), pilaster=np.zeros(1),
                 frame=np.zeros(1), ground_h=np.zeros(1), cornice=np.zeros(1))
    boxes = render.Boxes(cx=np.array([20.0]), cy=np.array([0.0]), half_x=np.array([10.0]), half_y=np.array([10.0]),
                         angle=np.zeros(1), height=np.array([30.0]), kind=np.array([render.FACADE]),
                         obj=np.array([0]), colour=np.array([colour]), colour2=np.array([colour]),
                         seed=np.array([1]))
    return render.City(x_streets=np.array([-100.0, 100.0]), y_streets=np.array([-100.0, 100.0]),
                       road_half_width=5.0, sidewalk_width=3.5, extent=(-100.0, 100.0, -100.0, 100.0),
                       buildings=table, boxes=boxes, walls=boxes.walls(), origin_east=550000.0,
                       origin_north=4180000.0, zone_number=10, zone_letter="S")


FLAT_LIGHT = render.Style(name="test", sun_intensity=0.0, ambient=1.0, ambient_colour=(1.0, 1.0, 1.0),
                          fog_distance=1e9, noise=0.0, sun_disc=False)


def test_camera_facing_a_wall_sees_its_colour_and_heading_convention():
    colour = (0.8, 0.2, 0.1)
    city = one_building_city(colour)
    rng = np.random.default_rng(0)
    east = render.render_view(city, render.Camera(x=0.0, y=0.0, heading=90.0, resolution=64), FLAT_LIGHT, rng)
    centre = east[24:40, 24:40].reshape(-1, 3).mean(0) / 255.0
    np.testing.assert_allclose(centre, colour, atol=0.05)  # masonry texture is +-5%
    # Heading 270 (west) looks away from the building: the upper half is sky (blue > red).
    west = render.render_view(city, render.Camera(x=0.0, y=0.0, heading=270.0, resolution=64), FLAT_LIGHT, rng)
    top = west[:20].reshape(-1, 3).mean(0)
    assert top[2] > top[0] + 40
    # Heading 0 (north) with a 60 deg field of view: the building (east) is out of view.
    north = render.render_view(city, render.Camera(x=0.0, y=0.0, heading=0.0, hfov=60.0, resolution=64),
                               FLAT_LIGHT, rng)
    assert north[:20].reshape(-1, 3).mean(0)[2] > 150


def test_building_edge_falls_where_the_pinhole_model_puts_it():
    # The building's west face spans y in [-10, 10] at x = 10; a camera at the origin
    # facing north-east (heading 45, hfov 90) sees its south-west corner (10, -10) at
    # azimuth 135 deg: outside; the corner (10, 10) at azimuth 45 deg, the image centre.
    city = one_building_city((0.9, 0.9, 0.1))
    img = render.render_view(city, render.Camera(x=0.0, y=0.0, heading=45.0, hfov=90.0, resolution=64),
                             FLAT_LIGHT, np.random.default_rng(0))
    row = img[30].astype(float)  # just above the horizon: the corner at x = 10, y = 10 is 14 m away
    yellow = (row[:, 0] > 150) & (row[:, 2] < 100)
    assert yellow[34:].all() and not yellow[:30].any()  # the wall starts at the centre column


def test_render_is_deterministic_and_depends_on_the_rng():
    city = synthetic.build_city("tiny", seed=0)
    cam = render.Camera(x=city.districts["test"][0], y=city.districts["test"][2] + 20.0, height=1.6, heading=10.0,
                        pitch=4.0, roll=-3.0, hfov=100.0)
    style = render.make_style("rain", np.random.default_rng(3))
    a = render.render_view(city, cam, style, np.random.default_rng(7))
    b = render.render_view(city, cam, style, np.random.default_rng(7))
    c = render.render_view(city, cam, style, np.random.default_rng(8))
    assert a.dtype == np.uint8 and a.shape == (128, 128, 3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).sum() > 0  # other rain streaks


# --------------------------------------------------------------------------------------
# The generated dataset
# --------------------------------------------------------------------------------------


def test_layout_and_counts(city_root):
    import json

    meta = json.loads((city_root / "city.json").read_text())
    assert meta["version"] == synthetic.VERSION and meta["preset"] == "tiny" and meta["seed"] == 0
    found = {str(p.relative_to(city_root / "images")) for p in (city_root / "images").glob("*/*") if p.is_dir()}
    assert found == expected_folders()
    p = synthetic.PRESETS["tiny"]
    for folder in expected_folders():
        n = len(folder_images(city_root, folder))
        assert n == meta["counts"][folder], folder
    assert meta["counts"]["test/queries"] == p["queries"]["test"]
    for d in synthetic.DOMAINS:
        assert meta["counts"][f"test/queries_{d}"] == p["queries"]["test"]
        assert meta["counts"][f"target/{d}"] == p["target_per_domain"]
    assert 600 <= meta["counts"]["train/database"] <= 1200
    assert meta["counts"]["train/database"] % synthetic.DB_CAMERA["crops"] == 0
    assert not list(city_root.rglob("*_images_paths.txt"))  # the directory walk must be exercised
    im = Image.open(folder_images(city_root, "test/queries")[0])
    assert im.size == (128, 128) and im.mode == "RGB"


def test_names_parse_and_agree_with_utm(city_root):
    all_paths = sorted(glob.glob(str(city_root / "images" / "*" / "*" / "*.jpg")))
    names = [os.path.basename(p) for p in all_paths]
    assert len(set(names)) == len(names)  # unique across the whole dataset
    for path in all_paths[:: max(1, len(all_paths) // 400)]:
        f = parse(path)
        folder = os.path.basename(os.path.dirname(path))
        assert (f["zone_number"], f["zone_letter"]) == ("10", "S")
        east, north = float(f["east"]), float(f["north"])
        assert 540_000 < east < 560_000 and 4_170_000 < north < 4_190_000
        assert len(f["east"].split(".")[1]) == 2 and len(f["lat"].split(".")[1]) >= 6
        lat, lon = utm.utm_to_latlon(east, north, 10)
        assert float(f["lat"]) == pytest.approx(lat, abs=2e-7) and float(f["lon"]) == pytest.approx(lon, abs=2e-7)
        assert 0.0 <= float(f["heading"]) < 360.0
        float(f["pitch"]), float(f["roll"]), int(f["tile_num"])
        assert 1.0 < float(f["height"]) < 3.0
        assert f["timestamp"][:4].isdigit() and len(f["timestamp"]) in (6, 15)
        domain = folder.replace("queries_", "") if folder.startswith("queries_") else folder
        assert f["note"] == (domain if domain in synthetic.DOMAINS else "")
    # A database panorama: 12 crops 30 deg apart, at 2.5 m.
    db = [parse(p) for p in folder_images(city_root, "val/database")[:400]]
    pano = [f for f in db if f["pano_id"] == db[0]["pano_id"]]
    assert sorted(int(f["tile_num"]) for f in pano) == list(range(12))
    headings = sorted(float(f["heading"]) for f in pano)
    np.testing.assert_allclose(np.diff(headings), 30.0, atol=0.02)


def test_splits_cover_disjoint_areas(city_root):
    split_folders = {"train": ["train/database", "train/queries"] + [f"target/{d}" for d in synthetic.DOMAINS],
                     "val": ["val/database", "val/queries"] + [f"val/queries_{d}" for d in synthetic.DOMAINS],
                     "test": ["test/database", "test/queries"] + [f"test/queries_{d}" for d in synthetic.DOMAINS]}
    pts = {s: np.concatenate([positions(folder_images(city_root, f)) for f in fs]) for s, fs in split_folders.items()}
    boxes = {s: (p[:, 0].min(), p[:, 0].max(), p[:, 1].min(), p[:, 1].max()) for s, p in pts.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        ba, bb = boxes[a], boxes[b]
        overlap = ba[0] <= bb[1] and bb[0] <= ba[1] and ba[2] <= bb[3] and bb[2] <= ba[3]
        assert not overlap, (a, b, ba, bb)
        gap = np.sqrt(((pts[a][:, None, :] - pts[b][None, :, :]) ** 2).sum(-1)).min()
        assert gap > 25.0, (a, b, gap)  # no positive crosses splits


def test_every_eval_query_has_a_database_image_within_25m(city_root):
    for split in ("val", "test"):
        db = positions(folder_images(city_root, f"{split}/database"))
        folders = [f"{split}/queries"] + [f"{split}/queries_{d}" for d in synthetic.DOMAINS]
        for folder in folders:
            q = positions(folder_images(city_root, folder))
            nearest = np.sqrt(((q[:, None, :] - db[None, :, :]) ** 2).sum(-1)).min(1)
            assert nearest.max() < 25.0, folder


def test_target_pools_are_disjoint_from_test_queries(city_root):
    test_q = np.concatenate([positions(folder_images(city_root, f"test/queries_{d}")) for d in synthetic.DOMAINS])
    for d in synthetic.DOMAINS:
        pool = positions(folder_images(city_root, f"target/{d}"))
        assert np.sqrt(((pool[:, None, :] - test_q[None, :, :]) ** 2).sum(-1)).min() > 25.0


def test_train_database_forms_cosplace_classes(city_root):
    # Thesis Table 4.1: classes are 10 m x 10 m cells x 30 deg heading bins.
    counts = {}
    for p in folder_images(city_root, "train/database"):
        f = parse(p)
        key = (math.floor(float(f["east"]) / 10), math.floor(float(f["north"]) / 10),
               math.floor(float(f["heading"]) / 30))
        counts[key] = counts.get(key, 0) + 1
    n = np.array(list(counts.values()))
    passes = synthetic.PRESETS["tiny"]["train_passes"]
    print(f"\ntiny train database: {n.size} classes, images per class min {n.min()} median {np.median(n)} "
          f"max {n.max()}")
    assert n.min() >= 2 * passes  # 2 panoramas per cell per pass, one crop per heading bin
    timestamps = {parse(p)["timestamp"][:4] for p in folder_images(city_root, "train/database")}
    assert len(timestamps) == passes  # one capture year per pass


def test_train_passes_revisit_places_with_other_appearance(city_root):
    by_id = {}
    for p in folder_images(city_root, "train/database"):
        f = parse(p)
        by_id[(f["pano_id"], f["tile_num"])] = (f, p)
    pairs = [(v, by_id[("tr1" + k[0][3:], k[1])]) for k, v in by_id.items() if k[0].startswith("tr0")]
    assert len(pairs) == len(by_id) // 2
    diffs = []
    for (f0, p0), (f1, p1) in pairs[::10]:
        d = math.hypot(float(f0["east"]) - float(f1["east"]), float(f0["north"]) - float(f1["north"]))
        dh = abs((float(f0["heading"]) - float(f1["heading"]) + 180) % 360 - 180)
        assert d <= 2 * math.sqrt(2) + 0.01 and dh <= 8.01  # <= 1 m and 4 deg jitter per pass
        diffs.append(np.abs(load_images([p0]) - load_images([p1])).mean())
    assert min(diffs) > 0.0 and np.mean(diffs) > 0.03  # other sun, other parked cars


def test_file_lock_serialises_processes_on_the_same_cache(tmp_path):
    import threading
    import time

    events = []

    def worker(name):
        with synthetic.file_lock(tmp_path / "city.lock"):
            events.append(("enter", name))
            time.sleep(0.2)
            events.append(("leave", name))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e[0] for e in events] == ["enter", "leave", "enter", "leave"]  # never overlapping


def test_other_resolutions_render():
    city = synthetic.build_city("tiny", seed=0)
    x0, _, y0, _ = city.districts["val"]
    for res in (48, 224):
        cam = render.Camera(x=x0, y=y0 + 12.0, heading=30.0, resolution=res)
        style = render.make_style("night", np.random.default_rng(0))
        img = render.render_view(city, cam, style, np.random.default_rng(0))
        assert img.shape == (res, res, 3) and img.dtype == np.uint8


def test_generation_is_deterministic(city_root, tmp_path):
    preset = synthetic.PRESETS["tiny"]
    city = synthetic.build_city(preset, seed=0)
    jobs_a = synthetic.plan_jobs(city, preset, 0, 128)
    jobs_b = synthetic.plan_jobs(synthetic.build_city(preset, seed=0), preset, 0, 128)
    assert [(j.folder, j.name) for j in jobs_a] == [(j.folder, j.name) for j in jobs_b]
    on_disk = {(str(pathlib.Path(p).parent.relative_to(city_root / "images")), os.path.basename(p))
               for p in glob.glob(str(city_root / "images" / "*" / "*" / "*.jpg"))}
    assert on_disk == {(j.folder, j.name) for j in jobs_a}
    other = synthetic.plan_jobs(synthetic.build_city(preset, seed=1), preset, 1, 128)
    assert {j.name for j in other}.isdisjoint({j.name for j in jobs_a})
    # Re-render a sample (one per folder) in this process: byte-identical JPEG files.
    synthetic._init_worker(city, 0, str(tmp_path))
    seen = set()
    for j in jobs_a:
        if j.folder in seen:
            continue
        seen.add(j.folder)
        (tmp_path / j.folder).mkdir(parents=True, exist_ok=True)
        synthetic._render_job(j)
        assert (tmp_path / j.folder / j.name).read_bytes() == (city_root / "images" / j.folder / j.name).read_bytes()


def test_ensure_city_reuses_the_cache_and_generate_refuses_to_overwrite(city_root, tmp_path):
    stamp = (city_root / "city.json").stat().st_mtime_ns
    again = synthetic.ensure_city("tiny", seed=0, cache_dir=city_root.parent)
    assert again == city_root and (city_root / "city.json").stat().st_mtime_ns == stamp
    assert city_root.name == synthetic.city_dirname("tiny", 0, 128) and f"v{synthetic.VERSION}" in city_root.name
    # no half-written folder of this city left (other workers may be building other cities beside it)
    assert not list(city_root.parent.glob(f".{city_root.name}.tmp-*"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        synthetic.generate_city(tmp_path / "busy", "tiny")
    with pytest.raises(ValueError, match="unknown preset"):
        synthetic.ensure_city("huge", cache_dir=tmp_path)
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path / "x"), "--preset", "huge"])


# --------------------------------------------------------------------------------------
# Appearance and the domain gap
# --------------------------------------------------------------------------------------


def load_images(paths) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths])


def test_night_is_dark_and_fog_lowers_contrast(city_root):
    day = load_images(folder_images(city_root, "test/queries"))
    night = load_images(folder_images(city_root, "test/queries_night"))
    fog = load_images(folder_images(city_root, "test/queries_fog"))
    snow = load_images(folder_images(city_root, "test/queries_snow"))
    assert night.mean() < 0.4 * day.mean()

    def rms_contrast(x):  # per-image standard deviation of the luminance, averaged
        return x.mean(-1).reshape(len(x), -1).std(1).mean()

    def edge_contrast(x):  # mean absolute luminance difference of neighbouring pixels
        g = x.mean(-1)
        return np.abs(np.diff(g, axis=1)).mean() + np.abs(np.diff(g, axis=2)).mean()

    assert rms_contrast(fog) < 0.85 * rms_contrast(day)
    assert edge_contrast(fog) < 0.75 * edge_contrast(day)
    assert snow[:, -32:].mean() > day[:, -32:].mean() + 0.1  # white ground


def colour_layout_descriptor(images: np.ndarray, grid: int = 2, bins: int = 4) -> np.ndarray:
    """A fixed descriptor: joint RGB histograms (4 bins per channel) in a 2 x 2 grid of
    image cells, square-rooted and L2-normalised (Hellinger embedding)."""
    n, h, w, _ = images.shape
    q = np.minimum((images * bins).astype(np.int64), bins - 1)
    code = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    out = []
    for i in range(grid):
        for j in range(grid):
            cell = code[:, i * h // grid:(i + 1) * h // grid, j * w // grid:(j + 1) * w // grid].reshape(n, -1)
            out.append(np.stack([np.bincount(c, minlength=bins**3) for c in cell]))
    d = np.sqrt(np.concatenate(out, axis=1).astype(np.float32))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def recall_at_1(db_desc, db_pos, q_desc, q_pos, threshold=25.0) -> tuple[float, float]:
    index = faiss.IndexFlatL2(db_desc.shape[1])
    index.add(db_desc)
    _, nn = index.search(q_desc, 1)
    positive = np.sqrt(((q_pos[:, None, :] - db_pos[None, :, :]) ** 2).sum(-1)) <= threshold
    return float(positive[np.arange(len(q_pos)), nn[:, 0]].mean()), float(positive.mean())


def test_domain_gap_is_real(city_root):
    db_paths = folder_images(city_root, "test/database")
    db_desc, db_pos = colour_layout_descriptor(load_images(db_paths)), positions(db_paths)
    r1 = {}
    for folder in ["test/queries"] + [f"test/queries_{d}" for d in synthetic.DOMAINS]:
        paths = folder_images(city_root, folder)
        q_desc = colour_layout_descriptor(load_images(paths))
        r1[folder], chance = recall_at_1(db_desc, db_pos, q_desc, positions(paths))
    print("\nR@1 (25 m), fixed colour-layout descriptor + faiss IndexFlatL2 on tiny/test: chance %.2f, " % chance
          + ", ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in r1.items()))
    day, night = r1["test/queries"], r1["test/queries_night"]
    assert day >= chance + 0.2 and day >= 2.0 * chance
    assert night <= day - 0.2
    assert night <= chance + 0.1


def test_target_domains_render_on_demand_with_the_same_images(city_root, tmp_path):
    """A city made with only `night` holds no other domain folder; asking for `rain` later adds it;
    every image equals the one of the city generated with all domains at once."""
    root = synthetic.ensure_city("tiny", seed=0, cache_dir=tmp_path, domains="night")
    folders = {p.relative_to(root / "images").as_posix() for p in (root / "images").glob("*/*") if p.is_dir()}
    assert {"test/queries_night", "val/queries_night", "target/night"} <= folders
    others = {f"{s}/queries_{d}" for s in ("val", "test") for d in synthetic.DOMAINS if d != "night"}
    others |= {f"target/{d}" for d in synthetic.DOMAINS if d != "night"}
    assert not folders & others, folders & others
    assert synthetic.generated_domains(root) == ("night",)
    again = synthetic.ensure_city("tiny", seed=0, cache_dir=tmp_path, domains=["rain", "night"])
    assert again == root and synthetic.generated_domains(root) == ("night", "rain")
    meta = json.loads((root / "city.json").read_text())
    assert meta["counts"]["target/rain"] == len(list((root / "images/target/rain").iterdir()))
    assert meta["total_images"] == sum(meta["counts"].values())
    for folder in ("test/queries_night", "target/night", "test/queries_rain", "val/queries_rain", "train/database"):
        names = sorted(p.name for p in (root / "images" / folder).iterdir())
        assert names == sorted(p.name for p in (city_root / "images" / folder).iterdir()), folder
        for name in names[:: max(1, len(names) // 5)]:
            assert (root / "images" / folder / name).read_bytes() == (city_root / "images" / folder / name).read_bytes()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    with pytest.raises(ValueError, match="unknown target domain"):
        synthetic.ensure_city("tiny", seed=0, cache_dir=tmp_path, domains="dusk")
    assert synthetic.parse_domains("") == synthetic.DOMAINS
