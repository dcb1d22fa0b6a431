"""Procedural indoor floors (a station and a shopping mall): the indoor counterpart of the city.

The thesis' triplet fine-tuning recipe (§5.4, Table 5.9) trains and tests on indoor
datasets captured by NAVER LABS and Baidu: Gangnam Station B1/B2 (GB1, GB2), Hyundai
Department Store B1/1F/4F (HB1, H1F, H4F) and Baidu Mall (BAI): a mapping rig captures
the database, phones capture the queries, and recall is counted at 1 m 5 deg, 10 m
30 deg, 25 m 60 deg and at 1/5/10/25 m. None can be downloaded here, so this module
draws look-alikes with the renderer of the street city (`jaxvpr.data.render`):

    DIR/<floor>/database/*.jpg    mapping-rig views
    DIR/<floor>/queries/*.jpg     handheld phone views
    DIR/indoor.json               preset, seed, VERSION, per-floor counts, upper bounds, layout

Each `DIR/<floor>` is one dataset that `jaxvpr.data.format.read_split(DIR/<floor>)` reads.
Floors (`FLOORS`): station_b1, station_b2 (like GB1, GB2), mall_b1, mall_1f, mall_4f
(like HB1, H1F, H4F); `SPLITS` suggests train / val / test floors as in Table 5.9.

Floor plan (all distances in metres; local frame x = east, y = north, z = up, origin at
the south-west corner of the floor): one storey of blocks of shops separated by a grid
of corridors. North-south and east-west corridor centre lines (`Floor.x_lines`,
`Floor.y_lines`) have their own widths, mostly narrow (3-6 m); a few blocks are left
empty as halls (concourses, atriums) with pillars, wide corridors have pillars along
their walls, and a ring of shops along the outer walls closes the floor. Every shop is
a box as tall as the ceiling (2.9-4.4 m) whose walls are shop fronts: glass panes,
an entrance, a sign with glyphs, a bulkhead band under the ceiling. Shop chains repeat
the same front (same colours and sign) with small differences (pane width, door and
sign position); a building (station or mall) has its chains, each floor uses some of
them plus its own, and its own layout from its own seed. Light is indoor light: a dim
ambient term, warm (mall) or cold (station) ceiling lamps every 4-5 m that pool light
on the floor and the shop fronts (some are off), lit shop windows and signs, a dark
haze far down the corridors; rays that leave above the walls see the ceiling (tiles
and lamp panels). People stand in the corridors.

Cameras:
- Database (`RIG_CAMERA`): a mapping rig drives lanes along every corridor and across
  the halls (the centre line of a narrow corridor; parallel lanes at most
  `lane_spacing` m apart in wide corridors and halls, so that every walkable point is
  within ~1-1.5 m of a lane), one capture every `db_spacing` m (1 m in indoor_tiny,
  1.5 m in indoor_small), each capture with `headings` cameras of 90 deg field of view
  at headings 0, 360/headings, ... deg (4 in indoor_tiny, 8 in indoor_small: the
  corridor axes are always among them), 1.8-2.0 m high, level.
- Queries (`PHONE_CAMERA`): handheld phones at uniform random positions in the
  walkable space (>= 0.6 m from walls and pillars), 1.3-1.6 m high, 65-80 deg field
  of view, pitch ~N(2, 4) deg, roll ~N(0, 3) deg; 80% look along the corridor axis
  (+-N(0, 3) deg), the rest anywhere; 25% have a passer-by 1-2.5 m ahead. Each query
  has its own exposure, white balance and lamp brightness.

UTM fields: the floor's local frame shifted by its building's origin (`BUILDINGS`,
zone 52S, Seoul): floors of one building share the origin (their coordinates overlap,
as with the real floors of one building), the buildings are > 10 km apart. Headings
are degrees in [0, 360), 0 = north (+y), 90 = east, clockwise, as in the street city.
The note field holds the floor name, the timestamp the capture date.

Usage:
    python -m jaxvpr.data.synthetic_indoor --out DIR --preset indoor_tiny --seed 0
    root = ensure_indoor("indoor_small", seed=0)   # cached beside the street city
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
import shutil
import sys
import time
import zlib

import numpy as np
from PIL import Image
from scipy.spatial import cKDTree

from jaxvpr import cli
from jaxvpr.data.positives import PositiveFinder
from jaxvpr.data.render import FACADE, POLE, Boxes, Camera, City, Style, render_view
from jaxvpr.data.synthetic import (
    _building_table,
    _people,
    _rng,
    atomic_output_dir,
    checked_resolution,
    default_cache_dir,
    file_lock,
    handheld_camera,
    image_name,
    render_jobs,
)

VERSION = 1  # bump whenever the generated images change (it names the cache folder)

# Buildings: UTM origin of their floors (zone 52S), look and lighting. Colours RGB in [0, 1].
BUILDINGS = {
    "station": {
        "origin": (323_000.0, 4_151_000.0), "zone": (52, "S"),
        "ceiling_height": (2.9, 3.3), "corridor_widths": (3.0, 3.5, 4.0, 4.0, 5.0, 6.0),
        "lamp_spacing": 4.0, "lamp_colour": (0.82, 0.92, 1.0), "ambient_colour": (0.85, 0.93, 1.05),
        "ceiling_colour": (0.62, 0.64, 0.66), "floor_colour": (0.46, 0.47, 0.49), "floor_tile": 0.6,
        "polish": 0.12, "fog_colour": (0.07, 0.08, 0.1), "pillar_colour": (0.78, 0.8, 0.8),
        "ambient": (0.14, 0.2),
    },
    "mall": {
        "origin": (331_000.0, 4_137_000.0), "zone": (52, "S"),
        "ceiling_height": (3.8, 4.4), "corridor_widths": (3.0, 4.0, 4.0, 5.0, 6.0),
        "lamp_spacing": 5.0, "lamp_colour": (1.0, 0.83, 0.6), "ambient_colour": (1.05, 0.95, 0.84),
        "ceiling_colour": (0.8, 0.76, 0.68), "floor_colour": (0.66, 0.6, 0.5), "floor_tile": 1.2,
        "polish": 0.3, "fog_colour": (0.11, 0.09, 0.07), "pillar_colour": (0.85, 0.8, 0.72),
        "ambient": (0.16, 0.22),
    },
}
# Floor datasets and the thesis dataset each one stands in for.
FLOORS = {
    "station_b1": {"building": "station", "like": "GB1 (Gangnam Station B1)"},
    "station_b2": {"building": "station", "like": "GB2 (Gangnam Station B2)"},
    "mall_b1": {"building": "mall", "like": "HB1 (Hyundai Department Store B1)"},
    "mall_1f": {"building": "mall", "like": "H1F (Hyundai Department Store 1F)"},
    "mall_4f": {"building": "mall", "like": "H4F (Hyundai Department Store 4F)"},
}
CHAINS_PER_BUILDING = 8  # shop chains of a building; each floor uses CHAINS_SHARED of them
CHAINS_SHARED, CHAINS_OWN = 5, 3
CHAIN_SHARE = 0.45  # share of the shops that belong to a chain
OUTER_DEPTH = 6.0  # depth of the ring of shops along the outer walls (m)

RIG_CAMERA = {"height": (1.8, 2.0), "hfov": 90.0, "heading_jitter": 0.5}
PHONE_CAMERA = {"height": (1.3, 1.6), "hfov": (65.0, 80.0), "pitch": (2.0, 4.0, 12.0), "roll": (0.0, 3.0, 8.0),
                "wall_margin": 0.6, "along_axis": 0.8, "heading_sd": 3.0, "person": 0.25}
THRESHOLDS = {"1m_5deg": (1.0, 5.0), "10m_30deg": (10.0, 30.0), "25m_60deg": (25.0, 60.0),
              "1m": (1.0, None), "5m": (5.0, None), "10m": (10.0, None), "25m": (25.0, None)}

# Presets. blocks: shop blocks (east, north) of a floor; block_x/block_y: their size range
# (m); halls: blocks left empty; db_spacing: metres between captures; lane_spacing: the
# largest gap between rig lanes (m); headings: cameras per capture; queries: per floor.
PRESETS = {
    "indoor_tiny": {
        "description": "unit tests: 3 small floors, ~1,400 images of 96 px, ~15 s on 2 cores",
        "resolution": 96,
        "floors": ("station_b1", "station_b2", "mall_b1"),
        "splits": {"train": ("station_b1",), "val": ("mall_b1",), "test": ("station_b2",)},
        "blocks": (2, 1), "block_x": (7.0, 10.0), "block_y": (5.0, 7.0), "halls": 0,
        "db_spacing": 1.0, "lane_spacing": 3.0, "headings": 4, "queries": 50,
    },
    "indoor_small": {
        "description": "training demo (thesis Table 5.9 layout): 5 floors, ~8,400 images of 128 px, "
                       "~1-1.5 min on 2 cores",
        "resolution": 128,
        "floors": ("station_b1", "station_b2", "mall_b1", "mall_1f", "mall_4f"),
        "splits": {"train": ("station_b1",), "val": ("mall_b1",), "test": ("station_b2", "mall_1f", "mall_4f")},
        "blocks": (2, 2), "block_x": (9.0, 12.0), "block_y": (6.0, 8.0), "halls": 1,
        "db_spacing": 1.5, "lane_spacing": 3.0, "headings": 8, "queries": 200,
    },
}


# --------------------------------------------------------------------------------------
# Floor layout
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Floor:
    """One floor dataset: its world and the geometry the cameras need (metres, local frame).

    city: what the renderer draws (shops, pillars, ceiling lights; origin = building origin).
    x_lines, x_widths: centre lines (x) and widths of the north-south corridors;
    y_lines, y_widths: the same for the east-west corridors.
    halls: (H, 4) x0, x1, y0, y1 of the empty blocks (between the corridor walls).
    solids: (S, 4) x0, x1, y0, y1 of the shop blocks and the outer ring: nobody stands there.
    pillars: (P, 4) x0, x1, y0, y1 of the pillars.
    ceiling_height: metres above the floor.
    """

    name: str
    building: str
    city: City
    x_lines: np.ndarray
    x_widths: np.ndarray
    y_lines: np.ndarray
    y_widths: np.ndarray
    halls: np.ndarray
    solids: np.ndarray
    pillars: np.ndarray
    ceiling_height: float

    def free_rects(self) -> np.ndarray:
        """(R, 5) x0, x1, y0, y1, axis of the walkable rectangles: corridors (axis 0 = north-south,
        1 = east-west, from wall to wall and end wall to end wall) and halls with their
        surrounding corridors (axis 2). Their union is the walkable space (minus pillars)."""
        x_lo, x_hi = self.x_lines[0] - self.x_widths[0] / 2, self.x_lines[-1] + self.x_widths[-1] / 2
        y_lo, y_hi = self.y_lines[0] - self.y_widths[0] / 2, self.y_lines[-1] + self.y_widths[-1] / 2
        rects = [(x - w / 2, x + w / 2, y_lo, y_hi, 0) for x, w in zip(self.x_lines, self.x_widths, strict=True)]
        rects += [(x_lo, x_hi, y - w / 2, y + w / 2, 1) for y, w in zip(self.y_lines, self.y_widths, strict=True)]
        for x0, x1, y0, y1 in self.halls:
            i, j = np.searchsorted(self.x_lines, x0), np.searchsorted(self.y_lines, y0)
            rects.append((self.x_lines[i - 1] - self.x_widths[i - 1] / 2, self.x_lines[i] + self.x_widths[i] / 2,
                          self.y_lines[j - 1] - self.y_widths[j - 1] / 2, self.y_lines[j] + self.y_widths[j] / 2, 2))
        return np.asarray(rects, dtype=np.float64)

    def walkable(self, x, y, margin: float = 0.0) -> np.ndarray:
        """bool: (x, y) (m) lies in a corridor or hall at least `margin` m from walls and pillars."""
        x, y = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
        r = self.free_rects()
        inside = ((x[:, None] >= r[:, 0] + margin) & (x[:, None] <= r[:, 1] - margin)
                  & (y[:, None] >= r[:, 2] + margin) & (y[:, None] <= r[:, 3] - margin)).any(axis=1)
        p = self.pillars
        if len(p):
            near = ((x[:, None] > p[:, 0] - margin) & (x[:, None] < p[:, 1] + margin)
                    & (y[:, None] > p[:, 2] - margin) & (y[:, None] < p[:, 3] + margin)).any(axis=1)
            inside &= ~near
        return inside


def _lots(rng: np.random.Generator, a: float, b: float, frontage=(4.0, 9.0)) -> list[tuple[float, float]]:
    """Split [a, b] (m) into shop lots of `frontage` m; the last lot takes a remainder < 3 m."""
    out, x = [], a
    while b - x > 1e-6:
        end = x + rng.uniform(*frontage)
        if b - end < 3.0:
            end = b
        out.append((x, end))
        x = end
    return out


def _shop_rects(rng: np.random.Generator, x0: float, x1: float, y0: float, y1: float) -> list:
    """Shops filling a block [x0, x1] x [y0, y1] (m): two back-to-back rows along its long side."""
    if x1 - x0 >= y1 - y0:
        ym = (y0 + y1) / 2
        return [(a, b, y0, ym) for a, b in _lots(rng, x0, x1)] + [(a, b, ym, y1) for a, b in _lots(rng, x0, x1)]
    xm = (x0 + x1) / 2
    return [(x0, xm, a, b) for a, b in _lots(rng, y0, y1)] + [(xm, x1, a, b) for a, b in _lots(rng, y0, y1)]


def _lane_offsets(width: float, lane_spacing: float, margin: float) -> np.ndarray:
    """Lateral offsets (m) of the rig lanes in a corridor of `width` m: the centres of
    ceil((width - 2 margin) / lane_spacing) equal strips of its walkable width (one lane,
    the centre line, in a narrow corridor)."""
    usable = max(width - 2 * margin, 0.0)
    n = max(1, math.ceil(usable / lane_spacing - 1e-9))
    return -usable / 2 + (np.arange(n) + 0.5) * usable / n


def _shop_table(name: str, building: str, n: int, ceiling: float, seed: int) -> tuple[dict, np.ndarray]:
    """Shop-front parameters, one row per shop (the renderer's facade table, metres).

    A share CHAIN_SHARE of the shops copy the front of a chain (colours, glass, sign
    and its glyphs) with small differences; the others are unique. Returns the table
    and the chain id of each shop (-1 = unique; 0..7 = a chain of the building,
    100 + k = a chain of this floor only).
    """
    building_chains = _building_table(_rng(seed, "chains", building), CHAINS_PER_BUILDING)
    own_chains = _building_table(_rng(seed, "chains", name), CHAINS_OWN)
    table = _building_table(_rng(seed, "shops", name), n)
    rng = _rng(seed, "chain_pick", name)
    shared = rng.choice(CHAINS_PER_BUILDING, CHAINS_SHARED, replace=False)
    choices = [(building_chains, int(k), int(k)) for k in shared]
    choices += [(own_chains, k, 100 + k) for k in range(CHAINS_OWN)]
    chain_id = np.full(n, -1)
    for s in np.nonzero(rng.random(n) < CHAIN_SHARE)[0]:
        src, row, cid = choices[rng.integers(len(choices))]
        chain_id[s] = cid
        for key, col in src.items():
            table[key][s] = col[row]
        table["colour"][s] = np.clip(src["colour"][row] * rng.uniform(0.95, 1.05), 0, 1)
        table["shop_sx"][s] = src["shop_sx"][row] * rng.uniform(0.9, 1.1)
        table["has_sign"][s] = True
    # Indoor shop fronts: the whole wall is a ground floor up to the ceiling, with a 0.3 m
    # bulkhead band under it, panes of glass 2-4 m apart, a wide entrance, a sign above.
    u = _rng(seed, "shop_fronts", name).uniform
    table["ground_h"] = np.full(n, ceiling)
    table["cornice"] = np.full(n, 0.3)
    table["shop_sx"] = np.clip(table["shop_sx"] * 0.65, 2.0, 4.0)
    table["sign_h"] = np.minimum(table["sign_h"], 0.65)
    table["door_w"] = np.where(chain_id >= 0, table["door_w"], u(1.2, 2.0, n)) + 0.8
    table["door_h"] = np.minimum(table["door_h"], ceiling - 0.6)
    return table, chain_id


def build_floor(name: str, preset: str | dict = "indoor_tiny", seed: int = 0) -> Floor:
    """The floor `name` of a preset and seed (deterministic): corridors, halls, shops, pillars, lamps."""
    p = _resolve_preset(preset) if isinstance(preset, str) else preset
    if name not in FLOORS:
        raise ValueError(f"unknown floor '{name}': choose one of {sorted(FLOORS)}")
    building = FLOORS[name]["building"]
    look = BUILDINGS[building]
    rng = _rng(seed, "layout", name)
    nx, ny = p["blocks"]
    ceiling = float(rng.uniform(*look["ceiling_height"]))
    bw, bh = rng.uniform(*p["block_x"], nx), rng.uniform(*p["block_y"], ny)
    wx = rng.choice(look["corridor_widths"], nx + 1)
    wy = rng.choice(look["corridor_widths"], ny + 1)
    x_lines = OUTER_DEPTH + wx[0] / 2 + np.concatenate([[0.0], np.cumsum(wx[:-1] / 2 + bw + wx[1:] / 2)])
    y_lines = OUTER_DEPTH + wy[0] / 2 + np.concatenate([[0.0], np.cumsum(wy[:-1] / 2 + bh + wy[1:] / 2)])
    hall_ids = set(rng.choice(nx * ny, min(p["halls"], nx * ny - 1), replace=False).tolist())

    shops, halls, solids = [], [], []
    for i in range(nx):
        for j in range(ny):
            rect = (x_lines[i] + wx[i] / 2, x_lines[i + 1] - wx[i + 1] / 2,
                    y_lines[j] + wy[j] / 2, y_lines[j + 1] - wy[j + 1] / 2)
            if i * ny + j in hall_ids:
                halls.append(rect)
            else:
                solids.append(rect)
                shops += _shop_rects(rng, *rect)
    # The ring of shops along the outer walls (west and east rows span the full height).
    ex0, ex1 = x_lines[0] - wx[0] / 2, x_lines[-1] + wx[-1] / 2
    ey0, ey1 = y_lines[0] - wy[0] / 2, y_lines[-1] + wy[-1] / 2
    ring = [(ex0 - OUTER_DEPTH, ex0, ey0 - OUTER_DEPTH, ey1 + OUTER_DEPTH),
            (ex1, ex1 + OUTER_DEPTH, ey0 - OUTER_DEPTH, ey1 + OUTER_DEPTH),
            (ex0, ex1, ey0 - OUTER_DEPTH, ey0), (ex0, ex1, ey1, ey1 + OUTER_DEPTH)]
    solids += ring
    for k, (x0, x1, y0, y1) in enumerate(ring):
        if k < 2:
            shops += [(x0, x1, a, b) for a, b in _lots(rng, y0, y1)]
        else:
            shops += [(a, b, y0, y1) for a, b in _lots(rng, x0, x1)]
    r = np.asarray(shops)
    n = len(r)
    table, chain_id = _shop_table(name, building, n, ceiling, seed)
    table["chain"] = chain_id
    shop_boxes = Boxes(
        cx=(r[:, 0] + r[:, 1]) / 2, cy=(r[:, 2] + r[:, 3]) / 2, half_x=(r[:, 1] - r[:, 0]) / 2,
        half_y=(r[:, 3] - r[:, 2]) / 2, angle=np.zeros(n), height=np.full(n, ceiling), kind=np.full(n, FACADE),
        obj=np.arange(n), colour=table["colour"], colour2=table["trim"],
        seed=np.arange(n) + 1_000_000 + zlib.crc32(name.encode()) % 1_000_000,
    )
    pillars = _pillars(_rng(seed, "pillars", name), x_lines, wx, y_lines, wy, halls, p["lane_spacing"])
    paint = np.asarray(look["pillar_colour"])
    m = len(pillars)
    pillar_boxes = Boxes(
        cx=(pillars[:, 0] + pillars[:, 1]) / 2, cy=(pillars[:, 2] + pillars[:, 3]) / 2,
        half_x=(pillars[:, 1] - pillars[:, 0]) / 2, half_y=(pillars[:, 3] - pillars[:, 2]) / 2,
        angle=np.zeros(m), height=np.full(m, ceiling), kind=np.full(m, POLE), obj=np.full(m, -1),
        colour=np.tile(paint, (m, 1)), colour2=np.tile(paint, (m, 1)), seed=np.arange(m),
    )
    boxes = Boxes.concat([shop_boxes, pillar_boxes])
    origin_east, origin_north = look["origin"]
    zone_number, zone_letter = look["zone"]
    city = City(
        x_streets=x_lines, y_streets=y_lines, road_half_width=0.0, sidewalk_width=0.0,
        extent=(float(ex0 - OUTER_DEPTH), float(ex1 + OUTER_DEPTH), float(ey0 - OUTER_DEPTH), float(ey1 + OUTER_DEPTH)),
        buildings=table, boxes=boxes, walls=boxes.walls(), origin_east=origin_east, origin_north=origin_north,
        zone_number=zone_number, zone_letter=zone_letter,
        lights=_ceiling_lamps(_rng(seed, "lamps", name), x_lines, wx, y_lines, wy, halls, look["lamp_spacing"],
                              ceiling),
    )
    return Floor(name=name, building=building, city=city, x_lines=x_lines, x_widths=wx, y_lines=y_lines,
                 y_widths=wy, halls=np.asarray(halls).reshape(-1, 4), solids=np.asarray(solids),
                 pillars=pillars, ceiling_height=ceiling)


def _pillars(rng, x_lines, wx, y_lines, wy, halls, lane_spacing: float) -> np.ndarray:
    """(P, 4) pillar rectangles (m): 0.7-0.8 m square pillars every ~8 m along the walls of
    corridors >= 5 m wide (half in the wall), and rows between the rig lanes of the halls."""
    out = []
    half = rng.uniform(0.35, 0.4)
    for lines, widths, cross, cross_w, axis in ((x_lines, wx, y_lines, wy, 0), (y_lines, wy, x_lines, wx, 1)):
        for c, w in zip(lines, widths, strict=True):
            if w < 5.0:
                continue
            along = np.arange(cross[0] + rng.uniform(2.0, 6.0), cross[-1], 8.0)
            clear = np.min(np.abs(along[:, None] - cross[None, :]) - cross_w[None, :] / 2, axis=1) > half + 0.5
            for a in along[clear]:
                for side in (-1.0, 1.0):
                    x, y = (c + side * w / 2, a) if axis == 0 else (a, c + side * w / 2)
                    out.append((x - half, x + half, y - half, y + half))
    for x0, x1, y0, y1 in halls:
        n_lanes = max(1, math.ceil((y1 - y0) / lane_spacing - 1e-9))
        for k in range(1, n_lanes, 2):  # every other gap between lanes
            y = y0 + k * (y1 - y0) / n_lanes
            for x in np.arange(x0 + 3.0, x1 - 2.0, 7.0):
                out.append((x - half, x + half, y - half, y + half))
    return np.asarray(out, dtype=np.float64).reshape(-1, 4)


def _ceiling_lamps(rng, x_lines, wx, y_lines, wy, halls, spacing: float, ceiling: float) -> np.ndarray:
    """(L, 3) ceiling lamps (m): along every corridor centre line every `spacing` m and in a
    grid over the halls, jittered by 0.3 m; 20% are off (uneven light)."""
    pts = []
    for x in x_lines:
        pts += [(x, y) for y in np.arange(y_lines[0] - wy[0] / 2 + 1.0, y_lines[-1] + wy[-1] / 2, spacing)]
    for y in y_lines:
        pts += [(x, y) for x in np.arange(x_lines[0] - wx[0] / 2 + 1.0, x_lines[-1] + wx[-1] / 2, spacing)]
    for x0, x1, y0, y1 in halls:
        gx, gy = np.meshgrid(np.arange(x0 + spacing / 2, x1, spacing), np.arange(y0 + spacing / 2, y1, spacing))
        pts += list(zip(gx.ravel(), gy.ravel(), strict=True))
    xy = np.asarray(pts) + rng.uniform(-0.3, 0.3, (len(pts), 2))
    xy = xy[rng.random(len(xy)) > 0.2]
    return np.concatenate([xy, np.full((len(xy), 1), ceiling - 0.05)], axis=1)


# --------------------------------------------------------------------------------------
# Cameras, people, light
# --------------------------------------------------------------------------------------


def rig_lanes(floor: Floor, lane_spacing: float) -> np.ndarray:
    """(n, 5) lane segments x0, y0, x1, y1, axis (0 = north-south) that the mapping rig drives."""
    margin = PHONE_CAMERA["wall_margin"]
    segs = []
    for x, w in zip(floor.x_lines, floor.x_widths, strict=True):
        segs += [(x + o, floor.y_lines[0], x + o, floor.y_lines[-1], 0) for o in _lane_offsets(w, lane_spacing, margin)]
    for y, w in zip(floor.y_lines, floor.y_widths, strict=True):
        segs += [(floor.x_lines[0], y + o, floor.x_lines[-1], y + o, 1) for o in _lane_offsets(w, lane_spacing, margin)]
    for x0, x1, y0, y1 in floor.halls:  # east-west lanes across the hall, from corridor to corridor
        i = np.searchsorted(floor.x_lines, x0)
        for o in _lane_offsets(y1 - y0 + 2 * margin, lane_spacing, margin):
            yc = (y0 + y1) / 2 + o
            segs.append((floor.x_lines[i - 1], yc, floor.x_lines[i], yc, 1))
    return np.asarray(segs, dtype=np.float64)


def rig_cameras(floor: Floor, preset: dict, rng: np.random.Generator, resolution: int) -> list[tuple[int, Camera]]:
    """Mapping-rig views: (capture index, camera) for `headings` cameras per capture, one
    capture every `db_spacing` m along every lane (walkable captures only)."""
    spacing, n_head = preset["db_spacing"], preset["headings"]
    height = float(rng.uniform(*RIG_CAMERA["height"]))
    cams, k = [], 0
    for x0, y0, x1, y1, _ in rig_lanes(floor, preset["lane_spacing"]):
        length = math.hypot(x1 - x0, y1 - y0)
        for t in np.arange(spacing / 2, length, spacing) / length:
            x, y = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
            if not floor.walkable(x, y, 0.3)[0]:
                continue
            yaw = float(rng.normal(0.0, RIG_CAMERA["heading_jitter"]))
            for c in range(n_head):
                heading = (c * 360.0 / n_head + yaw) % 360.0
                cams.append((k, Camera(x=float(x), y=float(y), height=height, heading=heading,
                                       hfov=RIG_CAMERA["hfov"], resolution=resolution)))
            k += 1
    return cams


def phone_cameras(floor: Floor, n: int, rng: np.random.Generator, resolution: int) -> list[Camera]:
    """Handheld query views at uniform random walkable positions (module doc, "Queries")."""
    q = PHONE_CAMERA
    rects = floor.free_rects()
    area = (rects[:, 1] - rects[:, 0]) * (rects[:, 3] - rects[:, 2])
    cams = []
    while len(cams) < n:
        r = rects[rng.choice(len(rects), p=area / area.sum())]
        x, y = rng.uniform(r[0], r[1]), rng.uniform(r[2], r[3])
        if not floor.walkable(x, y, q["wall_margin"])[0]:
            continue
        axis = int(r[4]) if r[4] < 2 else int(rng.integers(2))
        if rng.random() < q["along_axis"]:
            heading = 90.0 * axis + rng.choice([0.0, 180.0]) + rng.normal(0.0, q["heading_sd"])
        else:
            heading = rng.uniform(0.0, 360.0)
        cams.append(handheld_camera(x, y, heading, rng, q, resolution))
    return cams


def people(floor: Floor, seed: int, layer: str, keep_clear: np.ndarray, per_m2: float = 0.03) -> Boxes:
    """Passers-by of one capture session (`layer`), at walkable positions >= 1 m from the
    cameras `keep_clear` (n, 2) of that session so that none stands in front of a lens."""
    rng = _rng(seed, "people", floor.name, layer)
    rects = floor.free_rects()
    area = (rects[:, 1] - rects[:, 0]) * (rects[:, 3] - rects[:, 2])
    m = int(per_m2 * area.sum())
    k = rng.choice(len(rects), m, p=area / area.sum())
    x, y = rng.uniform(rects[k, 0], rects[k, 1]), rng.uniform(rects[k, 2], rects[k, 3])
    ok = floor.walkable(x, y, 0.3)
    if len(keep_clear):
        d, _ = cKDTree(keep_clear).query(np.stack([x, y], 1))
        ok &= d > 1.0
    return _people(rng, x[ok], y[ok])


def indoor_style(building: str, ceiling_height: float, rng: np.random.Generator, phone: bool) -> Style:
    """Indoor light of a building (`BUILDINGS`): dim ambient light, ceiling lamps, lit shops,
    a ceiling at `ceiling_height` m.

    phone=False: the mapping rig (fixed exposure and white balance, little noise);
    phone=True: a handheld phone (auto exposure 0.75-1.3, white balance +-6%, more noise,
    the lamps 20% brighter or dimmer).
    """
    look = BUILDINGS[building]
    u = rng.uniform
    if phone:
        exposure, tint, noise = u(0.75, 1.3), tuple(u(0.94, 1.06, 3)), u(0.02, 0.035)
    else:
        exposure, tint, noise = 1.0, (1.0, 1.0, 1.0), 0.015
    return Style(
        name="indoor", sun_elevation=-20.0, sun_intensity=0.0, sun_colour=(0.0, 0.0, 0.0), sun_disc=False,
        ambient=float(u(*look["ambient"])), ambient_colour=look["ambient_colour"],
        sky_zenith=look["fog_colour"], sky_horizon=tuple(0.45 * np.asarray(look["lamp_colour"])),
        fog_distance=float(u(35.0, 55.0)), fog_colour=look["fog_colour"],
        lit_windows=0.5, street_lights=float(0.3 * (u(0.8, 1.2) if phone else 1.0)), lamp_colour=look["lamp_colour"],
        wetness=look["polish"], exposure=float(exposure), tint=tuple(float(t) for t in tint), noise=float(noise),
        ceiling_colour=look["ceiling_colour"], ceiling_height=float(ceiling_height), floor_colour=look["floor_colour"],
        floor_tile=look["floor_tile"], steady_shop_lights=True,
    )


# --------------------------------------------------------------------------------------
# Dataset generation
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """One image to render and save."""

    floor: str
    folder: str  # "<floor>/database" or "<floor>/queries", relative to the output folder
    name: str
    camera: Camera
    style: Style
    layer: str  # people layer: "database" or "queries"
    seed: tuple  # seeds the per-image randomness of the renderer
    extra: Boxes | None = None


def plan_floor(floor: Floor, preset: dict, seed: int, resolution: int) -> tuple[list[Job], dict[str, np.ndarray]]:
    """Every image of one floor in a fixed order, and the camera positions of each people layer."""
    jobs: list[Job] = []
    b = floor.building
    rng = _rng(seed, "rig", floor.name)
    style = indoor_style(b, floor.ceiling_height, _rng(seed, "rig_style", floor.name), phone=False)
    date = f"2019{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    rig = rig_cameras(floor, preset, rng, resolution)
    folder = f"{floor.name}/database"
    for i, (k, cam) in enumerate(rig):
        name = image_name(floor.city, cam, f"c{k:05d}", i % preset["headings"], date, floor.name)
        jobs.append(Job(floor.name, folder, name, cam, style, "database", (seed, zlib.crc32(folder.encode()), i)))

    rng = _rng(seed, "phones", floor.name)
    phones = phone_cameras(floor, preset["queries"], _rng(seed, "phone_poses", floor.name), resolution)
    folder = f"{floor.name}/queries"
    for k, cam in enumerate(phones):
        st = indoor_style(b, floor.ceiling_height, rng, phone=True)
        extra = None
        if rng.random() < PHONE_CAMERA["person"]:  # a passer-by 1-2.5 m ahead
            dist, ang = rng.uniform(1.0, 2.5), math.radians(cam.heading + rng.uniform(-0.3, 0.3) * cam.hfov)
            extra = _people(rng, [cam.x + dist * math.sin(ang)], [cam.y + dist * math.cos(ang)])
        stamp = (f"2020{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
                 f"T{int(rng.integers(10, 22)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}")
        name = image_name(floor.city, cam, f"q{k:05d}", 0, stamp, floor.name)
        jobs.append(Job(floor.name, folder, name, cam, st, "queries", (seed, zlib.crc32(folder.encode()), k), extra))
    layers = {"database": np.array([(c.x, c.y) for _, c in rig]), "queries": np.array([(c.x, c.y) for c in phones])}
    return jobs, layers


def upper_bounds(db_xy, db_heading, q_xy, q_heading) -> dict[str, float]:
    """Share of queries with a database image within each of `THRESHOLDS` (metres, degrees)."""
    finder = PositiveFinder(np.asarray(db_xy), np.asarray(db_heading))
    out = {}
    for key, (dist, angle) in THRESHOLDS.items():
        ok = finder.has_positive(np.asarray(q_xy), dist, np.asarray(q_heading), angle)
        out[key] = round(float(ok.mean()), 4)
    return out


def check_jobs(jobs: list[Job], floors: dict[str, Floor]) -> None:
    """Generator invariants: unique names, every camera in the walkable space."""
    names = collections.Counter((j.folder, j.name) for j in jobs)
    dup = [k for k, c in names.items() if c > 1]
    if dup:
        raise AssertionError(f"duplicate image names, e.g. {dup[:3]}")
    for name, floor in floors.items():
        xy = np.array([(j.camera.x, j.camera.y) for j in jobs if j.floor == name])
        bad = ~floor.walkable(xy[:, 0], xy[:, 1], 0.3)
        if bad.any():
            raise AssertionError(f"{name}: {int(bad.sum())} cameras outside the corridors, e.g. {xy[bad][0]}")


_WORKER: dict = {}


def _init_worker(floors: dict[str, Floor], layers: dict, seed: int, out: str) -> None:
    _WORKER.clear()
    _WORKER.update(floors=floors, layers=layers, seed=seed, out=pathlib.Path(out), cities={})


def _render_job(job: Job) -> str:
    key = (job.floor, job.layer)
    cities = _WORKER["cities"]
    if key not in cities:
        floor = _WORKER["floors"][job.floor]
        crowd = people(floor, _WORKER["seed"], job.layer, _WORKER["layers"][key])
        cities[key] = floor.city.with_objects(crowd)
    city = cities[key] if job.extra is None else cities[key].with_objects(job.extra)
    img = render_view(city, job.camera, job.style, np.random.default_rng(list(job.seed)))
    Image.fromarray(img).save(_WORKER["out"] / job.folder / job.name, quality=90)
    return job.folder


def _resolve_preset(preset: str) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown indoor preset '{preset}': choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def _floor_meta(floor: Floor, jobs: list[Job]) -> dict:
    e0, n0 = floor.city.origin_east, floor.city.origin_north

    def utm_rects(r):
        return [[round(e0 + a, 3), round(e0 + b, 3), round(n0 + c, 3), round(n0 + d, 3)] for a, b, c, d in r[:, :4]]

    db = [j.camera for j in jobs if j.folder.endswith("/database")]
    q = [j.camera for j in jobs if j.folder.endswith("/queries")]
    chains = floor.city.buildings["chain"]
    return {
        "building": floor.building, "like": FLOORS[floor.name]["like"],
        "counts": {"database": len(db), "queries": len(q)},
        "upper_bounds": upper_bounds([(c.x, c.y) for c in db], [c.heading for c in db],
                                     [(c.x, c.y) for c in q], [c.heading for c in q]),
        "ceiling_height_m": round(floor.ceiling_height, 3),
        "utm": {"zone_number": floor.city.zone_number, "zone_letter": floor.city.zone_letter,
                "origin_east": e0, "origin_north": n0},
        "extent_utm": utm_rects(np.asarray([floor.city.extent]))[0],
        "corridors": {"x_lines_east": [round(e0 + v, 3) for v in floor.x_lines], "x_widths_m": floor.x_widths.tolist(),
                      "y_lines_north": [round(n0 + v, 3) for v in floor.y_lines],
                      "y_widths_m": floor.y_widths.tolist()},
        "walkable_utm": utm_rects(floor.free_rects()),
        "halls_utm": utm_rects(floor.halls),
        "solids_utm": utm_rects(floor.solids),
        "pillars_utm": utm_rects(floor.pillars),
        "shops": int(len(chains)), "chain_shops": int((chains >= 0).sum()),
        "chains": sorted({int(c) for c in chains if c >= 0}),
    }


def generate_indoor(out_dir, preset: str = "indoor_tiny", seed: int = 0, resolution: int | None = None,
                    workers: int | None = None, overwrite: bool = False, verbose: bool = False) -> pathlib.Path:
    """Generate the floors of a preset into `out_dir` and return it.

    Writes into a temporary sibling folder, then renames it to `out_dir`, so an
    interrupted run never leaves a folder that looks complete. `resolution` (pixels,
    square images) defaults to the preset's; `workers` (processes) to min(2, cores).
    An existing non-empty `out_dir` is an error unless `overwrite=True`.
    """
    p = _resolve_preset(preset)
    res = checked_resolution(resolution, p)
    out = pathlib.Path(out_dir).expanduser().resolve()
    t0 = time.time()
    with atomic_output_dir(out, overwrite) as tmp:
        floors = {name: build_floor(name, p, seed) for name in p["floors"]}
        jobs, layers = [], {}
        for name, floor in floors.items():
            floor_jobs, floor_layers = plan_floor(floor, p, seed, res)
            jobs += floor_jobs
            layers.update({(name, k): v for k, v in floor_layers.items()})
        check_jobs(jobs, floors)
        for folder in sorted({j.folder for j in jobs}):
            (tmp / folder).mkdir(parents=True, exist_ok=True)
        ordered = sorted(jobs, key=lambda j: (j.floor, j.layer))  # fewer people layers per worker
        render_jobs(ordered, _render_job, _init_worker, (floors, layers, seed, str(tmp)), workers, verbose, every=1000)
        meta = {
            "generator": "jaxvpr.data.synthetic_indoor", "version": VERSION, "preset": preset, "seed": seed,
            "resolution": res, "preset_params": p, "rig_camera": RIG_CAMERA, "phone_camera": PHONE_CAMERA,
            "thresholds": {k: {"distance_m": d, "angle_deg": a} for k, (d, a) in THRESHOLDS.items()},
            "splits": p["splits"], "total_images": len(jobs),
            "floors": {name: _floor_meta(floor, [j for j in jobs if j.floor == name])
                       for name, floor in floors.items()},
        }
        (tmp / "indoor.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    if verbose:
        print(f"wrote {len(jobs)} images to {out} in {time.time() - t0:.1f} s", flush=True)
    return out


def indoor_dirname(preset: str, seed: int, resolution: int) -> str:
    return f"synthetic_indoor-{preset}-seed{seed}-res{resolution}-v{VERSION}"


def ensure_indoor(preset: str = "indoor_small", seed: int = 0, cache_dir=None, resolution: int | None = None,
                  workers: int | None = None, verbose: bool = False) -> pathlib.Path:
    """Root of the indoor floors of (preset, seed, resolution), generated on first use and cached.

    Lives in `cache_dir` (default: $JAXVPR_CACHE or ~/.cache/jaxvpr, as the street city)
    under `indoor_dirname(...)`, which includes VERSION. Safe when several processes call
    it at once: a lock file serialises generation, and a folder only appears (atomic
    rename) once complete. Read a floor with `format.read_split(root / "station_b1")`.
    """
    p = _resolve_preset(preset)
    res = int(resolution or p["resolution"])
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / indoor_dirname(preset, seed, res)
    if (final / "indoor.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / (final.name + ".lock")):
        if (final / "indoor.json").is_file():
            return final
        if final.exists():  # a folder without indoor.json is not ours to trust: regenerate it
            shutil.rmtree(final)
        for stale in root.glob(f".{final.name}.tmp-*"):  # left by an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
        generate_indoor(final, preset, seed, res, workers=workers, verbose=verbose)
    return final


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m jaxvpr.data.synthetic_indoor",
                                description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--preset", default="indoor_tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the preset's)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: min(2, cores))")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)
    out = generate_indoor(args.out, args.preset, args.seed, args.resolution, args.workers, args.overwrite, verbose=True)
    meta = json.loads((out / "indoor.json").read_text())
    for name, f in meta["floors"].items():
        ub = " ".join(f"{k}={100 * v:.1f}%" for k, v in f["upper_bounds"].items())
        print(f"  {name} ({f['like']}): {f['counts']['database']} database, {f['counts']['queries']} queries; "
              f"upper bounds {ub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
