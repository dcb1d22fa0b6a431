"""The procedural geotagged city: jaxvpr's embedded default dataset (SPEC §6).

No public VPR dataset can be downloaded here, so jaxvpr draws its own: a city of
streets and blocks whose buildings have unique facades, photographed like SF-XL
(street-view panoramas along the streets, several passes over the years) and queried
like Tokyo 24/7 / RobotCar (pedestrian phone views in night, rain, snow, fog, low sun
and overcast conditions). The result is written in the community layout (SPEC §1):

    DIR/images/train/database/         street-view crops, `passes` captures of the train district
    DIR/images/train/queries/          pedestrian views, daylight (train district)
    DIR/images/val/database/  DIR/images/val/queries/          (val district, daylight)
    DIR/images/test/database/ DIR/images/test/queries/         (test district, daylight)
    DIR/images/val/queries_<domain>/   the same val viewpoints in each target domain (model selection
                                       of adaptation runs, like Tokyo-XS for Tokyo 24/7)
    DIR/images/test/queries_<domain>/  the same test viewpoints in each target domain
    DIR/images/target/<domain>/        unlabeled target-domain pool (train district,
                                       other positions): what a domain-adaptation
                                       method (GRL, AdAGeo) may see during training
    DIR/city.json                      parameters, seed, version, counts, statistics

Map (all distances in metres, local frame x = east, y = north, origin at a UTM
point of zone 10S, San Francisco): north-south and east-west street centre lines at
irregular spacings (`block_sizes`), all at 5 mod 10 m so that CosPlace's 10 m cells
are centred on the streets. A street is a 10 m road plus 3.5 m sidewalks. Each block
is lined by buildings (axis-aligned boxes: random frontage, depth, height, setback,
sometimes an alley), each with its own facade (see `_building_table`). The city is a
row of districts from west to east: margin | train | buffer | val | buffer | test |
margin; one buffer block (>= 50 m) keeps every train/val/test image farther than
25 m from the other splits.

Cameras:
- Database (SF-XL style, `DB_CAMERA`): a panorama every 5 m (val/test: every
  `eval_db_spacing` m) along the street centre lines of a district, 2.5 m high, cut
  into 12 crops of 90 deg field of view at headings 15 + 30 k deg (the centres of
  CosPlace's 30 deg heading bins). The train district is captured `train_passes`
  times (years 2013, 2015, ...) with <= 1 m position jitter, <= 4 deg heading jitter,
  another sun and other parked cars and pedestrians: each CosPlace class (10 m cell x
  30 deg bin) then holds 2 panoramas x passes images.
- Queries (phone style, `QUERY_CAMERA`): on the sidewalks 0.6-2.2 m from the curb,
  1.45-1.75 m high, 95-105 deg field of view, pitch ~N(3, 4) deg, roll ~N(0, 3) deg;
  70% look along the street (+-15 deg), the rest anywhere; 40% have a partial
  occluder (car hood, passer-by, pole). Daylight queries use a random sun; the test
  viewpoints are rendered once per appearance domain (paired, Tokyo 24/7 style).

Headings follow SF-XL: degrees in [0, 360), 0 = north, 90 = east, clockwise.

Usage:
    python -m jaxvpr.data.synthetic --out DIR --preset tiny --seed 0 [--domains night,rain]
    root = ensure_city("small", seed=0)     # cached under $JAXVPR_CACHE or ~/.cache/jaxvpr
    root = ensure_city("small", domains="night")  # only the night target folders (others on demand)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import pathlib
import shutil
import sys
import time
import uuid
import zlib

import numpy as np
from PIL import Image

from jaxvpr import cli
from jaxvpr.data import utm
from jaxvpr.data.render import CAR, FACADE, PERSON, POLE, Boxes, Camera, City, Style, make_style, render_view

VERSION = 3  # bump whenever the generated images change (it names the cache folder)
DOMAINS = ("night", "rain", "snow", "fog", "sun", "overcast")
SOURCE_DOMAIN = "day"

# Map constants (metres).
ROAD_HALF_WIDTH = 5.0
SIDEWALK_WIDTH = 3.5
ORIGIN_EAST, ORIGIN_NORTH = 549_000.0, 4_179_000.0  # UTM 10S, San Francisco; multiples of 10 m
ZONE_NUMBER, ZONE_LETTER = 10, "S"

# Camera models.
DB_CAMERA = {"height": 2.5, "hfov": 90.0, "crops": 12, "first_heading": 15.0,
             "position_jitter": 1.0, "heading_jitter": 4.0}
QUERY_CAMERA = {"height": (1.45, 1.75), "hfov": (95.0, 105.0), "pitch": (3.0, 4.0, 12.0), "roll": (0.0, 3.0, 8.0),
                "curb_distance": (0.6, 2.2), "along_street": 0.7, "heading_sd": 15.0,
                "occluders": {"hood": 0.15, "person": 0.15, "pole": 0.1}}
POSITIVE_DISTANCE = 25.0  # every val/test query has a database image this close

# Presets. districts: blocks (east, north) per split; train_passes: captures of the
# train district; *_db_spacing: metres between panoramas; queries: pedestrian queries
# per split (test: per domain folder as well); target_per_domain: unlabeled pool size.
PRESETS = {
    "tiny": {
        "description": "CI and unit tests: ~2,900 images, ~25 s on 2 cores",
        "resolution": 128,
        "block_sizes": (50.0, 60.0, 70.0),
        "districts": {"train": (1, 1), "val": (1, 1), "test": (2, 1)},  # blocks east x north
        "train_passes": 2,
        "train_db_spacing": 5.0,
        "eval_db_spacing": 12.5,
        "queries": {"train": 50, "val": 50, "test": 50},
        "target_per_domain": 100,
    },
    "small": {
        "description": "training demo and the GRL seed study: ~14,800 images (300 val and 500 test queries per domain), ~1.5 min on 2 cores",
        "resolution": 128,
        "block_sizes": (50.0, 60.0, 70.0),
        "districts": {"train": (2, 2), "val": (1, 2), "test": (2, 2)},
        "train_passes": 4,
        "train_db_spacing": 5.0,
        "eval_db_spacing": 12.5,
        "queries": {"train": 200, "val": 300, "test": 500},
        "target_per_domain": 300,
    },
}


def _rng(seed: int, *keys) -> np.random.Generator:
    """A generator for one named purpose: independent of the order in which others are used."""
    ints = [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng([int(seed), *ints])


# --------------------------------------------------------------------------------------
# City layout
# --------------------------------------------------------------------------------------


def _hsv_to_rgb(h, s, v) -> np.ndarray:
    """Vectorised HSV (each in [0, 1]) to RGB, (n, 3)."""
    h, s, v = (np.asarray(a, dtype=np.float64) for a in (h, s, v))
    i = np.floor(h * 6.0).astype(int) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return table[i, np.arange(h.size)]


def _building_footprints(rng: np.random.Generator, bx0: float, bx1: float, by0: float, by1: float) -> list:
    """Buildings lining one block interior [bx0, bx1] x [by0, by1] (sidewalks excluded).

    South and north rows run the full width (their corner buildings are `max_depth`
    deep); west and east rows fill the remaining middle. Returns (x0, x1, y0, y1) boxes.
    """
    out = []
    max_depth = min(15.0, (min(bx1 - bx0, by1 - by0) - 2.0) / 2.0)

    def frontage(a: float, b: float):
        """Split [a, b] into lots of 8-20 m, 15% followed by a 1.5-3 m alley: (start, end, is_corner)."""
        x = a
        while b - x > 1.0:
            end = x + rng.uniform(8.0, 20.0)
            if b - end < 7.0:
                end = b
            alley = rng.uniform(1.5, 3.0) if (rng.random() < 0.15 and end < b) else 0.0
            yield x, end - alley, x == a or end == b
            x = end

    for side in ("south", "north"):
        for x0, x1, corner in frontage(bx0, bx1):
            depth = max_depth if corner else rng.uniform(min(9.0, max_depth), max_depth)
            setback = 0.0 if (corner or rng.random() > 0.3) else rng.uniform(0.5, 2.0)
            if side == "south":
                out.append((x0, x1, by0 + setback, by0 + depth))
            else:
                out.append((x0, x1, by1 - depth, by1 - setback))
    for side in ("west", "east"):
        for y0, y1, _ in frontage(by0 + max_depth, by1 - max_depth):
            depth = rng.uniform(min(9.0, max_depth), max_depth)
            setback = 0.0 if rng.random() > 0.3 else rng.uniform(0.5, 2.0)
            if side == "west":
                out.append((bx0 + setback, bx0 + depth, y0, y1))
            else:
                out.append((bx1 - depth, bx1 - setback, y0, y1))
    return [b for b in out if b[1] - b[0] > 2.0 and b[3] - b[2] > 2.0]


def _building_table(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Facade parameters, one row per building (metres; colours RGB in [0, 1]).

    Every building differs: wall/trim/glass colours, storey heights, window size and
    spacing, door size and colour, a shop sign with its own random 5x7 glyph bitmaps.
    """
    hue = rng.uniform(0, 1, n)
    colour = _hsv_to_rgb(hue, rng.uniform(0.25, 0.75, n), rng.uniform(0.45, 0.95, n))
    trim = np.clip(colour * rng.uniform(0.55, 1.3, (n, 1)), 0, 1)
    glass = _hsv_to_rgb(rng.uniform(0.5, 0.7, n), rng.uniform(0.1, 0.4, n), rng.uniform(0.15, 0.4, n))
    floor_h = rng.uniform(3.0, 3.8, n)
    win_h = rng.uniform(1.1, 1.9, n)
    win_h = np.minimum(win_h, floor_h - 1.1)
    win_w = rng.uniform(0.7, 1.9, n)
    n_chars = rng.integers(3, 9, n)
    glyphs = rng.random((n, 8, 7, 5)) < 0.45
    return {
        "colour": colour, "trim": trim, "glass": glass,
        "ground_h": rng.uniform(3.6, 4.6, n), "floor_h": floor_h, "cornice": rng.uniform(0.4, 1.0, n),
        "win_w": win_w, "win_h": win_h, "win_sx": win_w + rng.uniform(0.7, 2.8, n),
        "win_phase": rng.uniform(0, 1, n), "sill": rng.uniform(0.6, 0.9, n),
        "shop_sx": rng.uniform(3.0, 6.0, n),
        "floor_band": np.where(rng.random(n) < 0.5, rng.uniform(0.2, 0.5, n), 0.0),
        "pilaster": np.where(rng.random(n) < 0.4, rng.uniform(0.2, 0.5, n), 0.0),
        "frame": np.where(rng.random(n) < 0.5, rng.uniform(0.08, 0.16, n), 0.0),
        "frame_colour": np.where(rng.random((n, 1)) < 0.5, np.array([[0.92, 0.92, 0.9]]), trim * 0.6),
        "door_w": rng.uniform(1.0, 2.0, n), "door_h": rng.uniform(2.2, 2.7, n),
        "door_colour": _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0.2, 0.8, n), rng.uniform(0.1, 0.6, n)),
        "has_sign": rng.random(n) < 0.75, "sign_h": rng.uniform(0.5, 0.8, n), "n_chars": n_chars,
        "glyphs": glyphs,
        "sign_bg": _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0.3, 0.9, n), rng.uniform(0.3, 0.95, n)),
        "sign_fg": _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0.0, 0.5, n), rng.choice([0.05, 0.95], n)),
        "sign_lit": (rng.random(n) < 0.5).astype(np.float64),
    }


def _district_grid(preset: dict) -> tuple[int, int, dict[str, tuple[int, int, int, int]]]:
    """Blocks east/north and, per district, its street-index rectangle (i0, i1, j0, j1)."""
    d = preset["districts"]
    rows = max(v[1] for v in d.values())
    districts, i = {}, 1  # block column 0 is the western margin
    for name in ("train", "val", "test"):
        east, north = d[name]
        districts[name] = (i, i + east, 1, 1 + north)
        i += east + 1  # one buffer block between districts
    n_cols = i  # the last buffer column is the eastern margin
    return n_cols, rows + 2, districts


def build_city(preset: str | dict = "tiny", seed: int = 0) -> City:
    """The city of a preset and seed (deterministic): streets, buildings, lamp posts."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    rng = _rng(seed, "layout")
    n_cols, n_rows, dist_idx = _district_grid(p)
    sizes = np.asarray(p["block_sizes"])
    x_streets = 5.0 + np.concatenate([[0.0], np.cumsum(rng.choice(sizes, n_cols))])
    y_streets = 5.0 + np.concatenate([[0.0], np.cumsum(rng.choice(sizes, n_rows))])
    edge = ROAD_HALF_WIDTH + SIDEWALK_WIDTH

    rects = []
    for i in range(n_cols):
        for j in range(n_rows):
            rects += _building_footprints(rng, x_streets[i] + edge, x_streets[i + 1] - edge,
                                          y_streets[j] + edge, y_streets[j + 1] - edge)
    r = np.asarray(rects)
    nb = len(r)
    table = _building_table(_rng(seed, "facades"), nb)
    storeys = _rng(seed, "storeys").integers(1, 8, nb) + (_rng(seed, "towers").random(nb) < 0.1) * 5
    height = table["ground_h"] + storeys * table["floor_h"] + table["cornice"]
    buildings = Boxes(
        cx=(r[:, 0] + r[:, 1]) / 2, cy=(r[:, 2] + r[:, 3]) / 2,
        half_x=(r[:, 1] - r[:, 0]) / 2, half_y=(r[:, 3] - r[:, 2]) / 2,
        angle=np.zeros(nb), height=height, kind=np.full(nb, FACADE), obj=np.arange(nb),
        colour=table["colour"], colour2=table["trim"], seed=np.arange(nb) + 1_000_000,
    )
    lamps = _lamp_posts(_rng(seed, "lamps"), x_streets, y_streets)
    boxes = Boxes.concat([buildings, lamps])
    districts = {name: (float(x_streets[i0]), float(x_streets[i1]), float(y_streets[j0]), float(y_streets[j1]))
                 for name, (i0, i1, j0, j1) in dist_idx.items()}
    return City(
        x_streets=x_streets, y_streets=y_streets, road_half_width=ROAD_HALF_WIDTH, sidewalk_width=SIDEWALK_WIDTH,
        extent=(float(x_streets[0]), float(x_streets[-1]), float(y_streets[0]), float(y_streets[-1])),
        buildings=table, boxes=boxes, walls=boxes.walls(), origin_east=ORIGIN_EAST, origin_north=ORIGIN_NORTH,
        zone_number=ZONE_NUMBER, zone_letter=ZONE_LETTER, districts=districts,
    )


def _street_slots(x_streets, y_streets, spacing: float, rng, keep_clear: float):
    """Regularly spaced points along every street (both directions) away from crossings.

    Returns (x, y, street_axis) with street_axis 0 for north-south, 1 for east-west streets.
    """
    xs, ys, axis = [], [], []
    for lines, cross, ax in ((x_streets, y_streets, 0), (y_streets, x_streets, 1)):
        for c in lines:
            along = np.arange(cross[0] + rng.uniform(0, spacing), cross[-1], spacing)
            d = np.min(np.abs(along[:, None] - cross[None, :]), axis=1)
            along = along[d > keep_clear]
            xs.append(np.full(along.size, c) if ax == 0 else along)
            ys.append(along if ax == 0 else np.full(along.size, c))
            axis.append(np.full(along.size, ax))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(axis)


def _lamp_posts(rng, x_streets, y_streets) -> Boxes:
    """Street lamps (5.5 m poles) every 25 m on both sidewalks, next to the curb."""
    x, y, axis = _street_slots(x_streets, y_streets, 25.0, rng, ROAD_HALF_WIDTH + 1.0)
    side = np.tile([1.0, -1.0], x.size)
    x, y, axis = np.repeat(x, 2), np.repeat(y, 2), np.repeat(axis, 2)
    off = side * (ROAD_HALF_WIDTH + 0.45)
    x = x + np.where(axis == 0, off, 0.0)
    y = y + np.where(axis == 1, off, 0.0)
    n = x.size
    paint = np.array([0.2, 0.24, 0.22])
    return Boxes(cx=x, cy=y, half_x=np.full(n, 0.09), half_y=np.full(n, 0.09), angle=np.zeros(n),
                 height=np.full(n, 5.5), kind=np.full(n, POLE), obj=np.full(n, -1),
                 colour=np.tile(paint, (n, 1)), colour2=np.tile(paint, (n, 1)), seed=rng.integers(0, 2**31, n))


_CAR_PAINTS = np.array([[0.9, 0.9, 0.9], [0.08, 0.08, 0.09], [0.6, 0.62, 0.64], [0.65, 0.1, 0.1],
                        [0.12, 0.2, 0.5], [0.35, 0.36, 0.38], [0.8, 0.75, 0.6], [0.2, 0.4, 0.25]])


def clutter(city: City, seed: int, layer: str) -> Boxes:
    """Parked cars and pedestrians of one capture (`layer` names it), deterministic.

    Cars stand in the parking lanes (1.2 m inside the curb, 6.5 m slots, 35% occupied);
    pedestrians on the sidewalks. Different layers (passes, query sessions) differ.
    """
    rng = _rng(seed, "clutter", layer)
    x, y, axis = _street_slots(city.x_streets, city.y_streets, 6.5, rng, ROAD_HALF_WIDTH + 5.0)
    x, y, axis = np.repeat(x, 2), np.repeat(y, 2), np.repeat(axis, 2)
    side = np.tile([1.0, -1.0], x.size // 2)
    keep = rng.random(x.size) < 0.35
    x, y, axis, side = x[keep], y[keep], axis[keep], side[keep]
    off = side * (ROAD_HALF_WIDTH - 1.2)
    n = x.size
    cars = Boxes(
        cx=x + np.where(axis == 0, off, 0.0) + rng.normal(0, 0.1, n),
        cy=y + np.where(axis == 1, off, 0.0) + rng.normal(0, 0.1, n),
        half_x=np.full(n, 2.2), half_y=np.full(n, 0.9),
        angle=np.where(axis == 0, 90.0, 0.0) + rng.normal(0, 1.5, n), height=rng.uniform(1.35, 1.7, n),
        kind=np.full(n, CAR), obj=np.full(n, -1), colour=_CAR_PAINTS[rng.integers(0, len(_CAR_PAINTS), n)],
        colour2=np.tile([0.2, 0.25, 0.3], (n, 1)), seed=rng.integers(0, 2**31, n),
    )
    px, py, paxis = _street_slots(city.x_streets, city.y_streets, 9.0, rng, ROAD_HALF_WIDTH)
    keep = rng.random(px.size) < 0.25
    px, py, paxis = px[keep], py[keep], paxis[keep]
    m = px.size
    off = rng.choice([-1.0, 1.0], m) * (ROAD_HALF_WIDTH + rng.uniform(1.0, SIDEWALK_WIDTH - 0.4, m))
    people = _people(rng, px + np.where(paxis == 0, off, 0.0), py + np.where(paxis == 1, off, 0.0))
    return Boxes.concat([cars, people])


def _people(rng, x, y) -> Boxes:
    m = np.size(x)
    shirts = _hsv_to_rgb(rng.uniform(0, 1, m), rng.uniform(0.2, 0.9, m), rng.uniform(0.2, 0.9, m))
    trousers = _hsv_to_rgb(rng.uniform(0.55, 0.7, m), rng.uniform(0.0, 0.5, m), rng.uniform(0.1, 0.5, m))
    return Boxes(cx=np.asarray(x, float), cy=np.asarray(y, float), half_x=np.full(m, 0.24), half_y=np.full(m, 0.14),
                 angle=rng.uniform(0, 180, m), height=rng.uniform(1.55, 1.9, m), kind=np.full(m, PERSON),
                 obj=np.full(m, -1), colour=shirts, colour2=trousers, seed=rng.integers(0, 2**31, m))


# --------------------------------------------------------------------------------------
# Cameras
# --------------------------------------------------------------------------------------


def district_streets(city: City, district: str) -> np.ndarray:
    """Street centre-line segments (x0, y0, x1, y1) of a district: its grid of streets."""
    x0, x1, y0, y1 = city.districts[district]
    segs = [(x, y0, x, y1) for x in city.x_streets if x0 - 1e-6 <= x <= x1 + 1e-6]
    segs += [(x0, y, x1, y) for y in city.y_streets if y0 - 1e-6 <= y <= y1 + 1e-6]
    return np.asarray(segs)


def panorama_positions(segments: np.ndarray, spacing: float) -> np.ndarray:
    """Points every `spacing` m along each segment, starting spacing/2 from its start: (n, 3) x, y, axis."""
    out = []
    for x0, y0, x1, y1 in segments:
        length = math.hypot(x1 - x0, y1 - y0)
        t = np.arange(spacing / 2.0, length, spacing) / length
        axis = 0.0 if x0 == x1 else 1.0
        out.append(np.stack([x0 + t * (x1 - x0), y0 + t * (y1 - y0), np.full(t.size, axis)], 1))
    return np.concatenate(out)


def database_cameras(city: City, district: str, spacing: float, rng: np.random.Generator, resolution: int,
                     jitter: bool) -> list[tuple[int, Camera]]:
    """SF-XL style crops: (panorama index, camera) for 12 headings per panorama."""
    pos = panorama_positions(district_streets(city, district), spacing)
    cams = []
    j = DB_CAMERA["position_jitter"] if jitter else 0.0
    hj = DB_CAMERA["heading_jitter"] if jitter else 0.0
    for k, (x, y, _) in enumerate(pos):
        dx, dy = np.clip(rng.normal(0, j / 2, 2), -j, j) if j else (0.0, 0.0)
        base = DB_CAMERA["first_heading"] + (rng.uniform(-hj, hj) if hj else 0.0)
        height = DB_CAMERA["height"] + (rng.uniform(-0.1, 0.1) if jitter else 0.0)
        for c in range(DB_CAMERA["crops"]):
            heading = (base + c * 360.0 / DB_CAMERA["crops"]) % 360.0
            cams.append((k, Camera(x=float(x + dx), y=float(y + dy), height=float(height), heading=float(heading),
                                   hfov=DB_CAMERA["hfov"], resolution=resolution)))
    return cams


def pedestrian_cameras(city: City, district: str, n: int, rng: np.random.Generator, resolution: int) -> list[Camera]:
    """Phone-style query cameras on the sidewalks of a district."""
    segs = district_streets(city, district)
    lengths = np.hypot(segs[:, 2] - segs[:, 0], segs[:, 3] - segs[:, 1])
    q = QUERY_CAMERA
    cams = []
    for _ in range(n):
        s = rng.choice(len(segs), p=lengths / lengths.sum())
        x0, y0, x1, y1 = segs[s]
        t = rng.uniform(0, 1)
        ux, uy = (x1 - x0) / lengths[s], (y1 - y0) / lengths[s]
        lateral = rng.choice([-1.0, 1.0]) * (ROAD_HALF_WIDTH + rng.uniform(*q["curb_distance"]))
        x, y = x0 + t * (x1 - x0) + lateral * uy, y0 + t * (y1 - y0) - lateral * ux
        street_heading = math.degrees(math.atan2(ux, uy))
        if rng.random() < q["along_street"]:
            heading = street_heading + rng.choice([0.0, 180.0]) + rng.normal(0.0, q["heading_sd"])
        else:
            heading = rng.uniform(0.0, 360.0)
        cams.append(handheld_camera(x, y, heading, rng, q, resolution))
    return cams


def handheld_camera(x: float, y: float, heading: float, rng: np.random.Generator, spec: dict,
                    resolution: int) -> Camera:
    """A phone held by a pedestrian at (x, y) looking towards ``heading`` (deg): pitch and roll
    ~N(mu, sd) clipped to +-limit, height and field of view uniform in ``spec``'s ranges (deg, m)."""
    mu, sd, lim = spec["pitch"]
    pitch = float(np.clip(rng.normal(mu, sd), -lim, lim))
    mu, sd, lim = spec["roll"]
    roll = float(np.clip(rng.normal(mu, sd), -lim, lim))
    height = float(rng.uniform(*spec["height"]))
    return Camera(x=float(x), y=float(y), height=height, heading=float(heading % 360.0), pitch=pitch, roll=roll,
                  hfov=float(rng.uniform(*spec["hfov"])), resolution=resolution)


def occluder(camera: Camera, rng: np.random.Generator) -> tuple[Boxes | None, dict | None]:
    """A random partial occluder for a query: (extra boxes, hood) or (None, None).

    "hood": a car hood at the bottom of the image (RobotCar); "person": a passer-by
    1.2-3.5 m ahead; "pole": a post 1-3 m ahead. Probabilities in QUERY_CAMERA.
    """
    p = QUERY_CAMERA["occluders"]
    u = rng.random()
    if u < p["hood"]:
        colour = _CAR_PAINTS[rng.integers(0, len(_CAR_PAINTS))]
        hood = {"top": float(rng.uniform(0.1, 0.22)), "curve": float(rng.uniform(0.03, 0.1)), "colour": tuple(colour)}
        return None, hood
    u -= p["hood"]
    if u < p["person"] + p["pole"]:
        is_person = u < p["person"]
        dist = rng.uniform(1.2, 3.5) if is_person else rng.uniform(1.0, 3.0)
        ang = math.radians(camera.heading + rng.uniform(-0.35, 0.35) * camera.hfov)
        x, y = camera.x + dist * math.sin(ang), camera.y + dist * math.cos(ang)
        if is_person:
            return _people(rng, [x], [y]), None
        paint = np.array([[0.25, 0.25, 0.27]])
        return Boxes(cx=np.array([x]), cy=np.array([y]), half_x=np.array([0.08]), half_y=np.array([0.08]),
                     angle=np.zeros(1), height=np.array([rng.uniform(2.5, 4.0)]), kind=np.array([POLE]),
                     obj=np.array([-1]), colour=paint, colour2=paint, seed=rng.integers(0, 2**31, 1)), None
    return None, None


# --------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------


def image_name(city: City, cam: Camera, pano_id: str, tile: int, timestamp: str, note: str) -> str:
    """Community VPR image name (SPEC §1):
    @UTM_east@UTM_north@zone_number@zone_letter@lat@lon@pano_id@tile_num@heading@pitch@roll@height@timestamp@note@.jpg
    """
    east, north = city.origin_east + cam.x, city.origin_north + cam.y
    lat, lon = utm.utm_to_latlon(east, north, city.zone_number, northern=utm.is_northern(city.zone_letter))
    heading = round(cam.heading % 360.0, 2) % 360.0
    fields = [f"{east:.2f}", f"{north:.2f}", str(city.zone_number), city.zone_letter, f"{lat:.7f}", f"{lon:.7f}",
              pano_id, f"{tile:02d}", f"{heading:.2f}", f"{cam.pitch:.2f}", f"{cam.roll:.2f}", f"{cam.height:.2f}",
              timestamp, note]
    return "@" + "@".join(fields) + "@.jpg"


def _query_timestamp(rng, domain: str) -> str:
    hours = {"night": (20, 24), "sun": (7, 9), "fog": (7, 11)}.get(domain, (9, 17))
    months = {"snow": (12, 13), "sun": (9, 12)}.get(domain, (1, 13))
    month = int(rng.integers(*months))
    return (f"{int(rng.integers(2019, 2022))}{month:02d}{int(rng.integers(1, 29)):02d}"
            f"T{int(rng.integers(*hours)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}")


# --------------------------------------------------------------------------------------
# Dataset generation
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """One image to render and save."""

    folder: str  # relative to DIR/images
    name: str
    camera: Camera
    style: Style
    layer: str  # clutter layer (parked cars, pedestrians)
    seed: tuple  # seeds the per-image randomness of the renderer
    extra: Boxes | None = None
    hood: dict | None = None


def plan_jobs(city: City, preset: dict, seed: int, resolution: int) -> list[Job]:
    """Every image of the dataset, in a fixed order (deterministic in `seed`)."""
    jobs: list[Job] = []

    def add_database(split: str, folder: str, spacing: float, passes: int):
        for p in range(passes):
            rng = _rng(seed, "database", split, p)
            style = make_style(SOURCE_DOMAIN, _rng(seed, "database_style", split, p))
            year = 2013 + 2 * p if split == "train" else 2017
            timestamp = f"{year}{int(rng.integers(1, 13)):02d}"
            cams = database_cameras(city, split, spacing, rng, resolution, jitter=passes > 1)
            for i, (k, cam) in enumerate(cams):
                tile = i % DB_CAMERA["crops"]
                name = image_name(city, cam, f"{split[:2]}{p}p{k:05d}", tile, timestamp, "")
                image_seed = (seed, zlib.crc32(folder.encode()), len(jobs))
                jobs.append(Job(folder, name, cam, style, f"{split}_db_{p}", image_seed))

    def add_queries(folder: str, cams: list[Camera], domain: str, id_prefix: str, layer: str):
        rng = _rng(seed, "queries", folder)
        for k, cam in enumerate(cams):
            style = make_style(domain, rng, heading=cam.heading)
            extra, hood = occluder(cam, rng)
            note = "" if domain == SOURCE_DOMAIN else domain
            name = image_name(city, cam, f"{id_prefix}{k:05d}", 0, _query_timestamp(rng, domain), note)
            jobs.append(Job(folder, name, cam, style, layer, (seed, zlib.crc32(folder.encode()), k), extra, hood))

    add_database("train", "train/database", preset["train_db_spacing"], preset["train_passes"])
    add_database("val", "val/database", preset["eval_db_spacing"], 1)
    add_database("test", "test/database", preset["eval_db_spacing"], 1)
    nq = preset["queries"]
    val_cams = []
    for split in ("train", "val"):
        cams = pedestrian_cameras(city, split, nq[split], _rng(seed, "query_poses", split), resolution)
        add_queries(f"{split}/queries", cams, SOURCE_DOMAIN, f"{split[:2]}q", f"{split}_queries")
        val_cams = cams
    # Test queries: the same viewpoints in daylight and in every target domain.
    test_cams = pedestrian_cameras(city, "test", nq["test"], _rng(seed, "query_poses", "test"), resolution)
    add_queries("test/queries", test_cams, SOURCE_DOMAIN, "teq", "test_queries_day")
    for domain in DOMAINS:
        add_queries(f"test/queries_{domain}", test_cams, domain, f"teq{domain[:2]}", f"test_queries_{domain}")
    # Unlabeled target pools: train district, other positions than any test query.
    for domain in DOMAINS:
        poses_rng = _rng(seed, "target_poses", domain)
        cams = pedestrian_cameras(city, "train", preset["target_per_domain"], poses_rng, resolution)
        add_queries(f"target/{domain}", cams, domain, f"ta{domain[:2]}", f"target_{domain}")
    # Validation queries of every target domain (the val viewpoints again): model selection for
    # adaptation runs, as Tokyo-XS validates the thesis' Tokyo 24/7 runs. Planned last, so every image
    # above is the same as in version 2.
    for domain in DOMAINS:
        add_queries(f"val/queries_{domain}", val_cams, domain, f"vaq{domain[:2]}", f"val_queries_{domain}")
    return jobs


def job_domain(job: Job) -> str:
    """The appearance domain of a job's folder: ``test/queries_night`` and ``target/night`` -> night."""
    last = job.folder.split("/")[-1]
    for domain in DOMAINS:
        if last in (domain, f"queries_{domain}"):
            return domain
    return SOURCE_DOMAIN


def parse_domains(domains) -> tuple[str, ...]:
    """``None``/``""``/"all" -> every domain; ``"night,rain"`` or a sequence -> those (checked)."""
    if domains is None or (isinstance(domains, str) and domains.strip() in ("", "all")):
        return DOMAINS
    names = [d.strip() for d in domains.split(",")] if isinstance(domains, str) else list(domains)
    unknown = [d for d in names if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown target domain(s) {unknown}: choose among {', '.join(DOMAINS)}")
    return tuple(d for d in DOMAINS if d in names)


def check_jobs(jobs: list[Job]) -> None:
    """Generator invariants: unique names, and every val/test query within 25 m of a database image."""
    names = collections.Counter((j.folder, j.name) for j in jobs)
    dup = [k for k, c in names.items() if c > 1]
    if dup:
        raise AssertionError(f"duplicate image names, e.g. {dup[:3]}")
    for split in ("val", "test"):
        db = np.array([(j.camera.x, j.camera.y) for j in jobs if j.folder == f"{split}/database"])
        for folder in sorted({j.folder for j in jobs if j.folder.startswith(f"{split}/queries")}):
            q = np.array([(j.camera.x, j.camera.y) for j in jobs if j.folder == folder])
            d = np.sqrt(((q[:, None, :] - db[None, :, :]) ** 2).sum(-1)).min(axis=1)
            if d.max() > POSITIVE_DISTANCE - 0.5:
                raise AssertionError(f"{folder}: a query is {d.max():.1f} m from the nearest database image "
                                     f"(must be < {POSITIVE_DISTANCE} m)")


def images_per_class(names: list[str], cell_m: float = 10.0, bin_deg: float = 30.0) -> dict:
    """Images per CosPlace class (thesis Table 4.1: M = 10 m cells x alpha = 30 deg heading bins)."""
    keys = collections.Counter()
    for n in names:
        f = n.split("@")
        e, no, h = float(f[1]), float(f[2]), float(f[9])
        keys[(math.floor(e / cell_m), math.floor(no / cell_m), math.floor(h / bin_deg))] += 1
    counts = np.array(sorted(keys.values()))
    return {
        "cell_m": cell_m, "heading_bin_deg": bin_deg, "classes": int(counts.size),
        "min": int(counts.min()), "median": float(np.median(counts)), "mean": round(float(counts.mean()), 2),
        "max": int(counts.max()),
        "classes_with_at_least": {str(k): int((counts >= k).sum()) for k in (2, 4, 6, 8, 10)},
        "histogram": {str(k): int(v) for k, v in sorted(collections.Counter(counts.tolist()).items())},
    }


_WORKER: dict = {}


def _init_worker(city: City, seed: int, out_images: str) -> None:
    _WORKER.clear()
    _WORKER.update(city=city, seed=seed, out=pathlib.Path(out_images), layers={})


def _layer_city(layer: str) -> City:
    cache = _WORKER["layers"]
    if layer not in cache:
        cache[layer] = _WORKER["city"].with_objects(clutter(_WORKER["city"], _WORKER["seed"], layer))
    return cache[layer]


def _render_job(job: Job) -> str:
    city = _layer_city(job.layer)
    if job.extra is not None:
        city = city.with_objects(job.extra)
    img = render_view(city, job.camera, job.style, np.random.default_rng(list(job.seed)), hood=job.hood)
    Image.fromarray(img).save(_WORKER["out"] / job.folder / job.name, quality=90)
    return job.folder


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork is fastest; but never fork a process in which JAX may already run threads.
    if sys.platform.startswith("linux") and "jax" not in sys.modules:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _resolve_preset(preset: str) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}': choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def checked_resolution(resolution: int | None, preset: dict) -> int:
    """Image side in pixels: ``resolution`` or the preset's; at least 16."""
    res = int(resolution or preset["resolution"])
    if res < 16:
        raise ValueError(f"resolution must be >= 16 pixels, got {res}")
    return res


@contextlib.contextmanager
def atomic_output_dir(out_dir, overwrite: bool = False):
    """Yields a temporary sibling folder of ``out_dir``, renamed to ``out_dir`` when the block completes.

    An interrupted generation never leaves a folder that looks complete (the temporary one is
    removed). An existing non-empty ``out_dir`` is an error unless ``overwrite``.
    """
    out = pathlib.Path(out_dir).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty: remove it, choose another --out, or pass "
                              "--overwrite (overwrite=True)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if out.exists():
            if overwrite:
                shutil.rmtree(out)
            else:
                out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def render_jobs(jobs: list, render, init, initargs: tuple, workers: int | None, verbose: bool = False,
                every: int = 500) -> None:
    """Runs ``render(job)`` for every job, in ``workers`` processes (default min(2, cores)) each set up
    by ``init(*initargs)``, or in this process (one worker, or inside a daemonic process)."""
    t0 = time.time()
    n_workers = int(workers or min(2, os.cpu_count() or 1))
    if multiprocessing.current_process().daemon:  # daemonic processes cannot have children
        n_workers = 1
    pool = None
    if n_workers <= 1:
        init(*initargs)
        results = map(render, jobs)
    else:
        pool = _pool_context().Pool(n_workers, initializer=init, initargs=initargs)
        results = pool.imap_unordered(render, jobs, chunksize=16)
    try:
        for k, _ in enumerate(results):
            if verbose and k % every == 0:
                print(f"  {k}/{len(jobs)} images, {time.time() - t0:.0f} s", flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()


def generate_city(out_dir, preset: str = "tiny", seed: int = 0, resolution: int | None = None,
                  workers: int | None = None, overwrite: bool = False, verbose: bool = False,
                  domains=None) -> pathlib.Path:
    """Generate the dataset into `out_dir` and return it.

    Writes into a temporary sibling folder, then renames it to `out_dir`, so an
    interrupted run never leaves a folder that looks complete. `resolution` (pixels,
    square images) defaults to the preset's; `workers` (processes) to min(2, cores).
    An existing non-empty `out_dir` is an error unless `overwrite=True`. `domains`
    (default all of DOMAINS) limits the target-domain folders (`val/queries_<d>`,
    `test/queries_<d>`, `target/<d>`) to those domains; :func:`add_domains` adds the
    others later. Every image is the same whichever domains are generated with it.
    """
    p = _resolve_preset(preset)
    res = checked_resolution(resolution, p)
    out = pathlib.Path(out_dir).expanduser().resolve()
    t0 = time.time()
    with atomic_output_dir(out, overwrite) as tmp:
        city = build_city(p, seed)
        jobs = plan_jobs(city, p, seed, res)
        check_jobs(jobs)
        wanted = parse_domains(domains)
        jobs = [j for j in jobs if job_domain(j) in (SOURCE_DOMAIN, *wanted)]
        for folder in sorted({j.folder for j in jobs}):
            (tmp / "images" / folder).mkdir(parents=True, exist_ok=True)
        ordered = sorted(jobs, key=lambda j: j.layer)  # fewer clutter layers per worker
        render_jobs(ordered, _render_job, _init_worker, (city, seed, str(tmp / "images")), workers, verbose)
        counts = dict(sorted(collections.Counter(j.folder for j in jobs).items()))
        train_names = [j.name for j in jobs if j.folder == "train/database"]
        meta = {
            "generator": "jaxvpr.data.synthetic", "version": VERSION, "preset": preset, "seed": seed,
            "resolution": res, "preset_params": p, "domains": list(DOMAINS), "source_domain": SOURCE_DOMAIN,
            "domains_generated": list(wanted),
            "utm": {"zone_number": ZONE_NUMBER, "zone_letter": ZONE_LETTER, "origin_east": ORIGIN_EAST,
                    "origin_north": ORIGIN_NORTH},
            "districts_utm": {k: {"east": [ORIGIN_EAST + v[0], ORIGIN_EAST + v[1]],
                                  "north": [ORIGIN_NORTH + v[2], ORIGIN_NORTH + v[3]]}
                              for k, v in city.districts.items()},
            "map": {"road_half_width_m": ROAD_HALF_WIDTH, "sidewalk_width_m": SIDEWALK_WIDTH,
                    "x_streets_east": [ORIGIN_EAST + float(v) for v in city.x_streets],
                    "y_streets_north": [ORIGIN_NORTH + float(v) for v in city.y_streets],
                    "buildings": int(len(city.buildings["colour"]))},
            "database_camera": DB_CAMERA, "query_camera": QUERY_CAMERA,
            "positive_distance_m": POSITIVE_DISTANCE,
            "target_pools": "target/<domain>: unlabeled pedestrian views of the TRAIN district in that domain "
                            "(disjoint from the test district and its queries)",
            "counts": counts, "total_images": len(jobs),
            "train_images_per_class": images_per_class(train_names),
        }
        (tmp / "city.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    if verbose:
        print(f"wrote {len(jobs)} images to {out} in {time.time() - t0:.1f} s", flush=True)
    return out


def default_cache_dir() -> pathlib.Path:
    """$JAXVPR_CACHE, else ~/.cache/jaxvpr."""
    return pathlib.Path(os.environ.get("JAXVPR_CACHE") or "~/.cache/jaxvpr").expanduser()


def city_dirname(preset: str, seed: int, resolution: int) -> str:
    return f"synthetic_city-{preset}-seed{seed}-res{resolution}-v{VERSION}"


@contextlib.contextmanager
def file_lock(path: pathlib.Path):
    """Exclusive inter-process lock (fcntl); a no-op where fcntl is missing (rename stays atomic)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def generated_domains(root: pathlib.Path) -> tuple[str, ...]:
    """The target domains a generated city holds (cities written before lazy domains hold all)."""
    meta = json.loads((pathlib.Path(root) / "city.json").read_text())
    return tuple(meta.get("domains_generated", meta.get("domains", DOMAINS)))


def add_domains(root, domains, workers: int | None = None, verbose: bool = False) -> None:
    """Renders the missing target-domain folders of ``domains`` into the generated city ``root``.

    The new folders are rendered into a temporary sibling and moved in one by one; ``city.json``
    (rewritten atomically, last) only then lists the domains, so an interrupted call leaves a city
    that says what it holds. Callers hold the city's lock (:func:`ensure_city` does).
    """
    root = pathlib.Path(root)
    meta = json.loads((root / "city.json").read_text())
    have = generated_domains(root)
    missing = [d for d in parse_domains(domains) if d not in have]
    if not missing:
        return
    p, seed, res = meta["preset_params"], int(meta["seed"]), int(meta["resolution"])
    city = build_city(p, seed)
    jobs = [j for j in plan_jobs(city, p, seed, res) if job_domain(j) in missing]
    tmp = root.parent / f".{root.name}.tmp-domains-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for folder in sorted({j.folder for j in jobs}):
            (tmp / "images" / folder).mkdir(parents=True, exist_ok=True)
        render_jobs(sorted(jobs, key=lambda j: j.layer), _render_job, _init_worker,
                    (city, seed, str(tmp / "images")), workers, verbose)
        for folder in sorted({j.folder for j in jobs}):
            target = root / "images" / folder
            if target.exists():  # left by an interrupted call: not listed in city.json, replace it
                shutil.rmtree(target)
            os.rename(tmp / "images" / folder, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts = collections.Counter(j.folder for j in jobs)
    meta["counts"] = dict(sorted({**meta["counts"], **counts}.items()))
    meta["total_images"] = int(sum(meta["counts"].values()))
    meta["domains_generated"] = [d for d in DOMAINS if d in (*have, *missing)]
    text = json.dumps(meta, indent=1, sort_keys=True) + "\n"
    tmp_json = root / f"city.json.tmp{os.getpid()}"
    tmp_json.write_text(text)
    os.replace(tmp_json, root / "city.json")


def ensure_city(preset: str = "small", seed: int = 0, cache_dir=None, resolution: int | None = None,
                workers: int | None = None, verbose: bool = False, domains=None) -> pathlib.Path:
    """Dataset root of (preset, seed, resolution), generated on first use and cached.

    Lives in `cache_dir` (default: $JAXVPR_CACHE or ~/.cache/jaxvpr) under
    `city_dirname(...)`, which includes the generator VERSION. Safe when several
    processes call it at once: a lock file serialises generation, and a folder only
    appears (atomic rename) once complete. `domains` (default: all) names the target
    domains the caller needs; a city generated with fewer gets the missing ones added
    (the demo needs only `night`: the other five domains' 5,500 images of the `small`
    city are rendered when something asks for them).
    """
    p = _resolve_preset(preset)
    res = int(resolution or p["resolution"])
    wanted = parse_domains(domains)
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / city_dirname(preset, seed, res)

    def complete() -> bool:
        return (final / "city.json").is_file() and set(wanted) <= set(generated_domains(final))

    if complete():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / (final.name + ".lock")):
        if complete():
            return final
        if (final / "city.json").is_file():
            add_domains(final, wanted, workers=workers, verbose=verbose)
            return final
        if final.exists():  # a folder without city.json is not ours to trust: regenerate it
            shutil.rmtree(final)
        for stale in root.glob(f".{final.name}.tmp-*"):  # left by an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
        generate_city(final, preset, seed, res, workers=workers, verbose=verbose, domains=wanted)
    return final


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m jaxvpr.data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output dataset root (must not exist or be empty)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side in pixels (default: the preset's, 128)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: min(2, cores))")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--domains", default="", help=f"target domains to render, comma-separated (default all: "
                                                       f"{','.join(DOMAINS)})")
    args = parser.parse_args(argv)
    try:
        domains = parse_domains(args.domains)
    except ValueError as e:
        parser.error(str(e))
    out = generate_city(args.out, args.preset, args.seed, args.resolution, args.workers, args.overwrite, verbose=True,
                        domains=domains)
    meta = json.loads((out / "city.json").read_text())
    for folder, count in meta["counts"].items():
        print(f"  images/{folder}: {count}")
    print("  train images per class (10 m x 30 deg):", json.dumps({k: meta["train_images_per_class"][k]
                                                               for k in ("classes", "min", "median", "mean", "max")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
