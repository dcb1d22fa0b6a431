"""Vectorised numpy ray-caster for the synthetic city (`jaxvpr.data.synthetic`).

Reading guide (top to bottom):

1. `Camera`: pinhole camera. Position (x = east, y = north, local metres), `height`
   above the ground (m), `heading` (deg, 0 = north, 90 = east, clockwise, as in
   SF-XL), `pitch` (deg, positive looks up), `roll` (deg, positive turns the camera
   clockwise as seen from behind, so the scene appears rotated counter-clockwise),
   `hfov` (horizontal field of view, deg), square images of `resolution` pixels.
2. `Boxes` and `City`: the world is a flat ground plane (z = 0) with upright boxes
   standing on it (buildings, parked cars, pedestrians, poles). Every box side is a
   vertical wall segment from z = 0 to the box height with an outward normal; the
   renderer only knows walls, the ground and the sky.
3. `cast_rays`: the ray caster. All walls stand on the ground, so a ray with
   horizontal direction (azimuth) phi and slope m = dz / |d_xy| hits wall j at
   horizontal distance r_j (a 2-D ray/segment intersection that depends on phi only)
   and height z = cam_z + m r_j. It hits the wall iff 0 <= z <= h_j. For one azimuth,
   sort the walls by r_j: the first wall hit is the first one whose "top slope"
   (h_j - cam_z) / r_j is >= m (a prefix maximum + binary search), unless the ray
   reaches the ground (r_g = cam_z / -m) first. We evaluate the 2-D intersections
   for K sampled azimuths (about one per pixel column) x N walls instead of all
   pixels x walls, drop walls hidden in every row behind a wall taller than all of
   that row's rays, then look up every pixel in its azimuth row with one
   `np.searchsorted`; the exact hit point is recomputed per pixel. Walls are culled
   first (back faces, farther than MAX_VIEW_DISTANCE, outside the field of view).
4. `Style` / `make_style`: appearance (sun, sky, fog, night lights, rain, snow,
   glare, colour grading) for daylight ("day") and the target domains.
5. `render_view`: shading of facades (per-building colours, window grids, doors,
   shop signs with per-building glyph bitmaps), cars, people, poles, the ground
   (asphalt, lane markings, crossings, sidewalks) and the sky, then post-effects.

Units: metres and degrees throughout; colours are floats in [0, 1] until the final
uint8 conversion. Randomness comes only from the `rng` argument.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

FACADE, CAR, PERSON, POLE = 0, 1, 2, 3  # Boxes.kind

MAX_VIEW_DISTANCE = 260.0  # metres; walls and ground farther away are replaced by the horizon/fog colour
_NEAR = 0.05  # metres; intersections closer than this are ignored


# --------------------------------------------------------------------------------------
# Camera
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Camera:
    """Pinhole camera in the city's local frame (x east, y north, z up; metres, degrees)."""

    x: float
    y: float
    height: float = 2.5
    heading: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    hfov: float = 90.0
    resolution: int = 128

    def basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unit (forward, right, up) vectors in world coordinates.

        Heading rotates clockwise about z from north, pitch about the right axis,
        roll about the forward axis (positive roll lowers the right side).
        """
        h, p, r = (math.radians(a) for a in (self.heading, self.pitch, self.roll))
        fwd0 = np.array([math.sin(h), math.cos(h), 0.0])
        right0 = np.array([math.cos(h), -math.sin(h), 0.0])
        up0 = np.array([0.0, 0.0, 1.0])
        fwd = math.cos(p) * fwd0 + math.sin(p) * up0
        up1 = -math.sin(p) * fwd0 + math.cos(p) * up0
        right = math.cos(r) * right0 - math.sin(r) * up1
        up = math.sin(r) * right0 + math.cos(r) * up1
        return fwd, right, up

    @property
    def focal(self) -> float:
        """Focal length in pixels."""
        return 0.5 * self.resolution / math.tan(math.radians(self.hfov) / 2.0)

    def rays(self) -> np.ndarray:
        """Unit ray directions through the pixel centres, (resolution**2, 3), row-major."""
        n = self.resolution
        fwd, right, up = self.basis()
        coords = (np.arange(n) + 0.5 - n / 2.0) / self.focal
        xn, yn = np.meshgrid(coords, -coords)  # x to the right, y up
        d = fwd[None, :] + xn.reshape(-1, 1) * right[None, :] + yn.reshape(-1, 1) * up[None, :]
        return d / np.linalg.norm(d, axis=1, keepdims=True)

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World points (M, 3) -> (column, row, depth along forward axis); depth <= 0 is behind."""
        fwd, right, up = self.basis()
        v = np.asarray(points, dtype=np.float64) - np.array([self.x, self.y, self.height])
        depth = v @ fwd
        safe = np.where(depth > 1e-6, depth, 1e-6)
        col = self.resolution / 2.0 + self.focal * (v @ right) / safe - 0.5
        row = self.resolution / 2.0 - self.focal * (v @ up) / safe - 0.5
        return col, row, depth


# --------------------------------------------------------------------------------------
# World: boxes, walls, city
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Boxes:
    """Upright boxes on the ground. One row per box; all arrays have length n.

    cx, cy: footprint centre (m); half_x, half_y: half sizes along the box axes (m);
    angle: rotation of the box axes, deg counter-clockwise from east; height (m);
    kind: FACADE/CAR/PERSON/POLE; obj: row in `City.buildings` for facades (else -1);
    colour, colour2: (n, 3) paint (car body/glass tint, shirt/trousers, pole paint);
    seed: integer used to randomise per-wall details (door and sign positions).
    """

    cx: np.ndarray
    cy: np.ndarray
    half_x: np.ndarray
    half_y: np.ndarray
    angle: np.ndarray
    height: np.ndarray
    kind: np.ndarray
    obj: np.ndarray
    colour: np.ndarray
    colour2: np.ndarray
    seed: np.ndarray

    def __len__(self) -> int:
        return int(self.cx.shape[0])

    @staticmethod
    def empty() -> "Boxes":
        f = np.zeros(0)
        return Boxes(f, f, f, f, f, f, np.zeros(0, np.int64), np.zeros(0, np.int64),
                     np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0, np.int64))

    @staticmethod
    def concat(parts: list["Boxes"]) -> "Boxes":
        fields = [f.name for f in dataclasses.fields(Boxes)]
        return Boxes(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in fields})

    def walls(self, first_box: int = 0) -> dict[str, np.ndarray]:
        """The 4 side walls of every box, counter-clockwise seen from above.

        For a counter-clockwise footprint, edge direction (ex, ey) has the outward
        normal (ey, -ex) / |e|. `box` is the box row (+ first_box).
        """
        n = len(self)
        sx = np.array([-1.0, 1.0, 1.0, -1.0])
        sy = np.array([-1.0, -1.0, 1.0, 1.0])
        ang = np.radians(self.angle)[:, None]
        lx = sx[None, :] * self.half_x[:, None]
        ly = sy[None, :] * self.half_y[:, None]
        px = self.cx[:, None] + np.cos(ang) * lx - np.sin(ang) * ly  # (n, 4) corners
        py = self.cy[:, None] + np.sin(ang) * lx + np.cos(ang) * ly
        x0, y0 = px.reshape(-1), py.reshape(-1)
        x1, y1 = np.roll(px, -1, axis=1).reshape(-1), np.roll(py, -1, axis=1).reshape(-1)
        ex, ey = x1 - x0, y1 - y0
        length = np.hypot(ex, ey)
        side = np.tile(np.arange(4), n)
        box = np.repeat(np.arange(n), 4)
        return {
            "x0": x0, "y0": y0, "x1": x1, "y1": y1,
            "nx": ey / np.maximum(length, 1e-9), "ny": -ex / np.maximum(length, 1e-9),
            "length": length,
            "height": np.repeat(self.height, 4),
            "box": box + first_box,
            "rand": hash01(np.repeat(self.seed, 4), side),
        }


@dataclasses.dataclass(frozen=True)
class City:
    """Everything the renderer needs to draw the city (built by `synthetic.build_city`).

    Local frame: x east, y north, metres, origin at UTM (origin_east, origin_north).
    x_streets / y_streets: centre lines of the north-south / east-west streets.
    A street is a road of half width `road_half_width` with a sidewalk of
    `sidewalk_width` on each side; blocks of buildings fill the space in between.
    buildings: facade table, one row per building (see `synthetic.py`).
    boxes: every upright box (buildings, lamp posts, and any added objects).
    walls: the boxes' side walls (derived from `boxes`).
    districts: named areas (train/val/test) as (x_min, x_max, y_min, y_max) rectangles
    whose sides are street centre lines.
    lights: optional (L, 3) light positions (m) that replace the lamp-post heads, e.g. the
    ceiling lamps of an indoor floor (`synthetic_indoor`); None = the street lamps.
    """

    x_streets: np.ndarray
    y_streets: np.ndarray
    road_half_width: float
    sidewalk_width: float
    extent: tuple[float, float, float, float]
    buildings: dict[str, np.ndarray]
    boxes: Boxes
    walls: dict[str, np.ndarray]
    origin_east: float
    origin_north: float
    zone_number: int
    zone_letter: str
    districts: dict = dataclasses.field(default_factory=dict)
    lights: np.ndarray | None = None

    def with_objects(self, objects: Boxes) -> "City":
        """The same city with extra boxes (parked cars, pedestrians, occluders) added."""
        if len(objects) == 0:
            return self
        extra = objects.walls(first_box=len(self.boxes))
        walls = {k: np.concatenate([self.walls[k], extra[k]]) for k in self.walls}
        return dataclasses.replace(self, boxes=Boxes.concat([self.boxes, objects]), walls=walls)

    def lamp_heads(self) -> np.ndarray:
        """(L, 3) light positions: `lights` if given, else the tops of poles taller than 4 m."""
        if self.lights is not None:
            return self.lights
        b = self.boxes
        sel = (b.kind == POLE) & (b.height > 4.0)
        return np.stack([b.cx[sel], b.cy[sel], b.height[sel]], axis=1)


def hash01(*keys) -> np.ndarray:
    """Deterministic hash of integer arrays to floats in [0, 1) (splitmix64 finaliser)."""
    h = np.full(np.broadcast(*[np.asarray(k) for k in keys]).shape, 0x9E3779B97F4A7C15, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in keys:
            h = h ^ np.asarray(k).astype(np.int64).astype(np.uint64)
            h = h * np.uint64(0xBF58476D1CE4E5B9)
            h = h ^ (h >> np.uint64(31))
            h = h * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(29))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


# --------------------------------------------------------------------------------------
# Ray casting
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Hits:
    """Per-pixel result of `cast_rays` (arrays of length P = pixels)."""

    what: np.ndarray  # -1 sky, -2 ground, else wall index
    dist: np.ndarray  # distance along the ray (m); inf for sky
    r: np.ndarray  # horizontal distance (m)
    px: np.ndarray  # hit point x, y, z (m)
    py: np.ndarray
    pz: np.ndarray
    u: np.ndarray  # position along the wall from its first corner (m); 0 if not a wall


SKY, GROUND = -1, -2


def _visible_walls(walls: dict, cam: Camera, az_lo: float, az_hi: float) -> np.ndarray:
    """Indices of walls that may be seen: front-facing, near enough, inside the azimuth range."""
    cx, cy = cam.x, cam.y
    x0, y0, x1, y1 = walls["x0"], walls["y0"], walls["x1"], walls["y1"]
    facing = walls["nx"] * (cx - x0) + walls["ny"] * (cy - y0) > 1e-9
    ex, ey = x1 - x0, y1 - y0
    t = np.clip(((cx - x0) * ex + (cy - y0) * ey) / np.maximum(ex * ex + ey * ey, 1e-12), 0.0, 1.0)
    near = np.hypot(x0 + t * ex - cx, y0 + t * ey - cy) < MAX_VIEW_DISTANCE
    keep = facing & near
    # Azimuth interval of the segment relative to the heading (radians in (-pi, pi]).
    h = math.radians(cam.heading)
    a0 = _wrap(np.arctan2(x0 - cx, y0 - cy) - h)
    a1 = _wrap(np.arctan2(x1 - cx, y1 - cy) - h)
    lo, hi = np.minimum(a0, a1), np.maximum(a0, a1)
    straddles_back = hi - lo > math.pi  # the segment passes behind the camera: keep it
    margin = 0.02
    overlaps = (hi >= az_lo - margin) & (lo <= az_hi + margin)
    keep &= overlaps | straddles_back
    return np.nonzero(keep)[0]


def _wrap(a):
    """Wrap angles (radians) to (-pi, pi]."""
    return np.pi - np.mod(np.pi - a, 2.0 * np.pi)


@functools.lru_cache(maxsize=16)
def _ray_frame(resolution: int, hfov: float, pitch: float, roll: float) -> dict[str, np.ndarray]:
    """Ray geometry of a camera looking north (heading 0), shared by all headings.

    Rotating a camera about the vertical axis shifts every ray's azimuth by the same
    angle and keeps its slope, so azimuths relative to the heading, slopes and the
    azimuth sampling of `cast_rays` depend on (resolution, hfov, pitch, roll) only.
    """
    dirs = Camera(0.0, 0.0, heading=0.0, pitch=pitch, roll=roll, hfov=hfov, resolution=resolution).rays()
    rho = np.maximum(np.hypot(dirs[:, 0], dirs[:, 1]), 1e-9)
    slope = np.clip(dirs[:, 2] / rho, -500.0, 500.0)
    rel = np.arctan2(dirs[:, 0], dirs[:, 1])  # azimuth relative to the heading, radians
    az_lo, az_hi = float(rel.min()), float(rel.max())
    n_az = resolution + 1  # about one azimuth sample per pixel column
    k_pix = np.rint((rel - az_lo) / max(az_hi - az_lo, 1e-12) * (n_az - 1)).astype(np.int64)
    row_max_slope = np.full(n_az, -np.inf)
    np.maximum.at(row_max_slope, k_pix, slope)
    frame = {"dirs": dirs, "rho": rho, "slope": slope, "k_pix": k_pix, "row_max_slope": row_max_slope,
             "az_grid": np.linspace(az_lo, az_hi, n_az), "az_range": np.array([az_lo, az_hi])}
    for v in frame.values():
        v.flags.writeable = False
    return frame


def _camera_frame(cam: Camera) -> tuple[dict, np.ndarray]:
    """(`_ray_frame` of the camera, world ray directions (P, 3))."""
    frame = _ray_frame(int(cam.resolution), float(cam.hfov), float(cam.pitch), float(cam.roll))
    h = math.radians(cam.heading)
    d0 = frame["dirs"]
    dirs = np.empty_like(d0)
    dirs[:, 0] = d0[:, 0] * math.cos(h) + d0[:, 1] * math.sin(h)  # clockwise rotation by the heading
    dirs[:, 1] = -d0[:, 0] * math.sin(h) + d0[:, 1] * math.cos(h)
    dirs[:, 2] = d0[:, 2]
    return frame, dirs


def cast_rays(city: City, cam: Camera) -> Hits:
    """First intersection of every pixel ray (`Camera.rays()` order) with the walls, the
    ground or the sky (module doc, step 3)."""
    frame, dirs = _camera_frame(cam)
    rho, slope, k_pix = frame["rho"], frame["slope"], frame["k_pix"]
    hx, hy = dirs[:, 0] / rho, dirs[:, 1] / rho  # unit horizontal directions
    heading = math.radians(cam.heading)
    az_grid = frame["az_grid"]
    n_az = az_grid.size

    walls = city.walls
    idx = _visible_walls(walls, cam, *frame["az_range"].tolist())
    n_pix = dirs.shape[0]
    with np.errstate(divide="ignore"):
        r_ground = np.where(slope < 0, cam.height / -slope, np.inf)
    wall_id = np.full(n_pix, -1, dtype=np.int64)
    r_wall = np.full(n_pix, np.inf)

    if idx.size:
        # 2-D ray/segment intersections for every sampled azimuth x wall: o + r d = p0 + s e.
        x0, y0 = walls["x0"][idx], walls["y0"][idx]
        ex, ey = walls["x1"][idx] - x0, walls["y1"][idx] - y0
        wx, wy = x0 - cam.x, y0 - cam.y
        sx = np.sin(heading + az_grid)[:, None]  # (K, 1) horizontal ray directions
        sy = np.cos(heading + az_grid)[:, None]
        denom = sx * ey[None, :] - sy * ex[None, :]  # d x e
        with np.errstate(divide="ignore", invalid="ignore"):
            r = (wx * ey - wy * ex)[None, :] / denom  # (w x e) / (d x e)
            s = (wx[None, :] * sy - wy[None, :] * sx) / denom  # (w x d) / (d x e)
        ok = (r > _NEAR) & (s >= -1e-9) & (s <= 1 + 1e-9) & (r < MAX_VIEW_DISTANCE)
        r = np.where(ok, r, np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            top = np.where(ok, (walls["height"][idx][None, :] - cam.height) / r, -1e3)  # "top slope"
        # Occlusion culling: a wall whose top is above every ray of its azimuth row hides
        # everything behind it; drop walls that are hidden in every row.
        blocking = np.where(top >= frame["row_max_slope"][:, None], r, np.inf).min(axis=1)
        cols = np.nonzero((r <= blocking[:, None]).any(axis=0))[0]
        r, top, idx = r[:, cols], top[:, cols], idx[cols]
        n_w = idx.size
        order = np.argsort(r, axis=1)
        flat = (order + (np.arange(n_az) * n_w)[:, None]).reshape(-1)
        r_sorted = r.reshape(-1)[flat]
        prefix = np.maximum.accumulate(np.clip(top, -1e3, 1e3).reshape(-1)[flat].reshape(n_az, n_w), axis=1)
        # First wall (in distance order) whose top slope >= the pixel's slope: one binary
        # search in the concatenated rows, kept apart by an offset larger than any slope.
        stride = 4000.0
        keys = (prefix + stride * np.arange(n_az)[:, None]).reshape(-1)
        pos = np.searchsorted(keys, stride * k_pix + slope, side="left")
        found = pos < (k_pix + 1) * n_w
        pos = np.minimum(pos, keys.size - 1)
        cand_r = r_sorted[pos]
        found &= np.isfinite(cand_r) & (cand_r <= r_ground)
        wall_id[found] = idx[order.reshape(-1)[pos[found]]]
        r_wall[found] = cand_r[found]

    what = np.full(n_pix, SKY, dtype=np.int64)
    is_wall = wall_id >= 0
    what[is_wall] = wall_id[is_wall]
    is_ground = ~is_wall & (slope < 0) & (r_ground < MAX_VIEW_DISTANCE)
    what[is_ground] = GROUND

    # Exact intersection for each wall pixel with its own azimuth (the table was sampled).
    u = np.zeros(n_pix)
    r_hit = np.where(is_wall, r_wall, np.where(is_ground, r_ground, np.inf))
    if is_wall.any():
        w = wall_id[is_wall]
        rw = r_wall[is_wall]
        x0, y0 = walls["x0"][w], walls["y0"][w]
        ex, ey = walls["x1"][w] - x0, walls["y1"][w] - y0
        wx, wy = x0 - cam.x, y0 - cam.y
        px_, py_ = hx[is_wall], hy[is_wall]
        denom = px_ * ey - py_ * ex
        with np.errstate(divide="ignore", invalid="ignore"):
            r_exact = (wx * ey - wy * ex) / denom
            s_exact = (wx * py_ - wy * px_) / denom
        good = np.isfinite(r_exact) & (r_exact > _NEAR) & (np.abs(r_exact - rw) < 2.0 + 0.1 * rw)
        r_hit[is_wall] = np.where(good, r_exact, rw)
        length = walls["length"][w]
        s_fallback = ((cam.x + px_ * rw - x0) * ex + (cam.y + py_ * rw - y0) * ey) / np.maximum(length**2, 1e-12)
        u[is_wall] = np.clip(np.where(good, s_exact, s_fallback), 0.0, 1.0) * length

    finite = np.isfinite(r_hit)
    r_safe = np.where(finite, r_hit, 0.0)
    px = cam.x + hx * r_safe
    py = cam.y + hy * r_safe
    pz = np.where(is_ground, 0.0, cam.height + slope * r_safe)
    if is_wall.any():
        pz[is_wall] = np.clip(pz[is_wall], 0.0, walls["height"][wall_id[is_wall]])
    dist = np.where(finite, r_safe / rho, np.inf)
    return Hits(what=what, dist=dist, r=r_hit, px=px, py=py, pz=pz, u=u)


# --------------------------------------------------------------------------------------
# Appearance styles
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Style:
    """Appearance of one image. Colours are RGB floats in [0, 1]; angles in degrees."""

    name: str = "day"
    sun_azimuth: float = 135.0  # 0 = north, clockwise
    sun_elevation: float = 40.0
    sun_intensity: float = 0.9  # direct light on a wall facing the sun
    sun_colour: tuple = (1.0, 0.97, 0.9)
    ambient: float = 0.55  # diffuse sky light
    ambient_colour: tuple = (0.9, 0.95, 1.05)
    sky_zenith: tuple = (0.28, 0.47, 0.85)
    sky_horizon: tuple = (0.72, 0.80, 0.90)
    sun_disc: bool = True  # draw the sun and its halo in the sky
    fog_distance: float = 400.0  # e-folding distance of the distance fog (m)
    fog_colour: tuple = (0.72, 0.80, 0.90)
    sky_fog: float = 0.0  # share of the sky replaced by the fog colour
    lit_windows: float = 0.0  # probability that a window is lit (night)
    street_lights: float = 0.0  # intensity of street lamps (0 = off)
    headlights: int = 0  # number of oncoming cars with headlights
    wetness: float = 0.0  # ground reflectivity (rain)
    rain_streaks: int = 0
    snow: float = 0.0  # snow cover of the ground and ledges, 0..1
    snowflakes: int = 0
    glare: float = 0.0  # low-sun veiling glare and lens flare strength
    exposure: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    tint: tuple = (1.0, 1.0, 1.0)
    noise: float = 0.01  # sensor noise standard deviation
    lamp_colour: tuple = (1.0, 0.82, 0.55)  # colour of the lamps (`City.lamp_heads`)
    # Indoor scenes (`synthetic_indoor`); the defaults keep the outdoor renderer unchanged.
    ceiling_colour: tuple | None = None  # a flat ceiling at `ceiling_height` replaces the sky
    ceiling_height: float = 3.5  # metres above the floor
    floor_colour: tuple | None = None  # a tiled floor replaces the streets
    floor_tile: float = 0.6  # floor tile size (m)
    steady_shop_lights: bool = False  # a shop window is lit or not per shop, not per image


def make_style(domain: str, rng: np.random.Generator, heading: float | None = None) -> Style:
    """Sample an appearance for `domain` ("day" or one of synthetic.DOMAINS).

    `heading` (deg) is the camera heading; the "sun" domain puts the low sun within
    +-40 deg of it so that glare is in view.
    """
    u = rng.uniform
    sun_az = float(u(0.0, 360.0))
    if domain == "day":
        z = u(0.9, 1.1)
        return Style(
            name="day", sun_azimuth=sun_az, sun_elevation=float(u(25.0, 65.0)),
            sun_intensity=float(u(0.35, 0.55)), ambient=float(u(0.6, 0.75)),
            sky_zenith=(0.25 * z, 0.45 * z, float(u(0.78, 0.9))), sky_horizon=(0.72, 0.80, float(u(0.86, 0.94))),
            fog_distance=float(u(300.0, 500.0)), fog_colour=(0.72, 0.80, 0.90),
            exposure=float(u(0.92, 1.08)), noise=0.01,
        )
    if domain == "night":
        return Style(
            name="night", sun_azimuth=sun_az, sun_elevation=-20.0, sun_intensity=0.0, sun_colour=(0, 0, 0),
            ambient=float(u(0.03, 0.06)), ambient_colour=(0.6, 0.7, 1.0),
            sky_zenith=(0.01, 0.012, 0.03), sky_horizon=(0.09, 0.07, 0.08), sun_disc=False,
            fog_distance=float(u(120.0, 200.0)), fog_colour=(0.05, 0.045, 0.05),
            lit_windows=float(u(0.2, 0.45)), street_lights=float(u(0.8, 1.2)),
            headlights=int(rng.integers(1, 4)), exposure=float(u(0.9, 1.1)), noise=0.03,
        )
    if domain == "rain":
        return Style(
            name="rain", sun_azimuth=sun_az, sun_elevation=40.0, sun_intensity=0.05,
            ambient=float(u(0.5, 0.6)), ambient_colour=(0.95, 0.97, 1.0),
            sky_zenith=(0.38, 0.40, 0.43), sky_horizon=(0.55, 0.57, 0.60), sun_disc=False,
            fog_distance=float(u(60.0, 90.0)), fog_colour=(0.52, 0.54, 0.57), sky_fog=0.3,
            wetness=float(u(0.45, 0.7)), rain_streaks=int(rng.integers(150, 300)),
            exposure=float(u(0.7, 0.8)), contrast=0.8, saturation=0.75, noise=0.02,
        )
    if domain == "snow":
        return Style(
            name="snow", sun_azimuth=sun_az, sun_elevation=25.0, sun_intensity=float(u(0.1, 0.3)),
            ambient=float(u(0.7, 0.8)), ambient_colour=(0.95, 0.98, 1.05),
            sky_zenith=(0.72, 0.74, 0.78), sky_horizon=(0.85, 0.86, 0.88), sun_disc=False,
            fog_distance=float(u(80.0, 140.0)), fog_colour=(0.85, 0.86, 0.88), sky_fog=0.5,
            snow=float(u(0.8, 1.0)), snowflakes=int(rng.integers(250, 500)),
            exposure=1.0, contrast=0.9, saturation=0.7, noise=0.015,
        )
    if domain == "fog":
        return Style(
            name="fog", sun_azimuth=sun_az, sun_elevation=30.0, sun_intensity=0.1,
            ambient=float(u(0.7, 0.8)), sky_zenith=(0.78, 0.79, 0.80), sky_horizon=(0.78, 0.79, 0.80),
            sun_disc=False, fog_distance=float(u(12.0, 22.0)), fog_colour=(0.78, 0.79, 0.80), sky_fog=1.0,
            contrast=0.7, saturation=0.7, noise=0.015,
        )
    if domain == "sun":
        az = (heading if heading is not None else sun_az) + float(u(-40.0, 40.0))
        return Style(
            name="sun", sun_azimuth=az % 360.0, sun_elevation=float(u(3.0, 10.0)),
            sun_intensity=float(u(1.2, 1.5)), sun_colour=(1.0, 0.82, 0.6), ambient=float(u(0.2, 0.3)),
            ambient_colour=(0.8, 0.85, 1.0), sky_zenith=(0.2, 0.35, 0.7), sky_horizon=(1.0, 0.85, 0.65),
            sun_disc=True, fog_distance=250.0, fog_colour=(0.95, 0.82, 0.65),
            glare=float(u(0.7, 1.0)), contrast=1.35, saturation=1.15, tint=(1.05, 0.97, 0.85), noise=0.01,
        )
    if domain == "overcast":
        return Style(
            name="overcast", sun_azimuth=sun_az, sun_elevation=40.0, sun_intensity=0.05,
            ambient=float(u(0.8, 0.9)), ambient_colour=(1.0, 1.0, 1.0),
            sky_zenith=(0.70, 0.71, 0.73), sky_horizon=(0.78, 0.79, 0.80), sun_disc=False,
            fog_distance=float(u(180.0, 250.0)), fog_colour=(0.76, 0.77, 0.78), sky_fog=0.6,
            contrast=0.85, saturation=0.65, noise=0.012,
        )
    raise ValueError(f"unknown appearance domain '{domain}': use 'day' or one of night, rain, snow, fog, sun, overcast")


# --------------------------------------------------------------------------------------
# Shading
# --------------------------------------------------------------------------------------


def _sun_vector(style: Style) -> np.ndarray:
    az, el = math.radians(style.sun_azimuth), math.radians(style.sun_elevation)
    return np.array([math.sin(az) * math.cos(el), math.cos(az) * math.cos(el), math.sin(el)])


def _sky(style: Style, dirs: np.ndarray) -> np.ndarray:
    """Sky colour for unit ray directions (M, 3): zenith/horizon gradient plus sun halo."""
    elev = np.clip(dirs[:, 2], 0.0, 1.0)
    t = np.sqrt(elev)[:, None]
    c = (1 - t) * np.array(style.sky_horizon) + t * np.array(style.sky_zenith)
    if style.sun_disc and style.sun_elevation > -2:
        cos_a = dirs @ _sun_vector(style)
        ang = np.arccos(np.clip(cos_a, -1, 1))
        halo = 0.35 * np.exp(-ang / 0.12) + 2.0 * (ang < 0.02)
        c = c + halo[:, None] * np.array(style.sun_colour)
    if style.sky_fog > 0:
        c = (1 - style.sky_fog) * c + style.sky_fog * np.array(style.fog_colour)
    return c


def _ceiling(style: Style, camera: Camera, dirs: np.ndarray, lights: np.ndarray, ambient: np.ndarray) -> np.ndarray:
    """Indoor ceiling seen by unit rays (M, 3) that leave above the walls (`Style.ceiling_colour`).

    A flat ceiling at `style.ceiling_height` (m) with 0.6 m acoustic tiles, lit by the
    ambient light (x 1.8: light bounced off the floor), with a bright 0.7 m square panel at
    every light (`City.lights`), and the distance fog of the walls. Rays at or below the
    horizontal see the fog colour.
    """
    up = np.maximum(dirs[:, 2], 1e-6)
    t = (style.ceiling_height - camera.height) / up  # distance along the ray (m)
    cx, cy = camera.x + t * dirs[:, 0], camera.y + t * dirs[:, 1]
    footprint = t * 2.0 * math.tan(math.radians(camera.hfov) / 2.0) / camera.resolution / np.clip(up, 0.05, 1.0)
    joint = ((np.mod(cx, 0.6) < 0.03) | (np.mod(cy, 0.6) < 0.03)) * (1 - _lod(footprint, 0.1))
    col = np.array(style.ceiling_colour)[None, :] * (1.0 - 0.25 * joint)[:, None] * ambient[None, :] * 1.8
    near = lights[np.hypot(lights[:, 0] - camera.x, lights[:, 1] - camera.y) < 60.0] if len(lights) else lights
    panel = np.zeros(cx.shape, dtype=bool)
    for lx, ly, _ in near:
        panel |= (np.abs(cx - lx) < 0.35) & (np.abs(cy - ly) < 0.35)
    col[panel] = 1.1 * np.array(style.lamp_colour)
    f = 1.0 - np.exp(-np.minimum(t, MAX_VIEW_DISTANCE) / style.fog_distance)
    f[dirs[:, 2] <= 1e-6] = 1.0
    return col + f[:, None] * (np.array(style.fog_colour)[None, :] - col)


def _floor_albedo(gx: np.ndarray, gy: np.ndarray, footprint: np.ndarray, style: Style) -> np.ndarray:
    """Albedo of an indoor tiled floor at (gx, gy) (m): `style.floor_tile` tiles whose shade
    varies by +-8 %, with darker joints that fade out when pixels are larger than 0.1 m."""
    size = style.floor_tile
    ix, iy = np.floor(gx / size), np.floor(gy / size)
    shade = 1.0 + 0.16 * (hash01(ix, iy, 11) - 0.5) + 0.08 * ((ix + iy) % 2 - 0.5)
    joint = ((gx - ix * size < 0.025) | (gy - iy * size < 0.025)) * (1 - _lod(footprint, 0.1))
    return np.array(style.floor_colour)[None, :] * (shade * (1.0 - 0.35 * joint))[:, None]


def _lod(footprint: np.ndarray, feature) -> np.ndarray:
    """0 where a pattern of size `feature` (m) is resolved by pixels of `footprint` (m), 1 where it must be averaged."""
    return np.clip((footprint / np.maximum(feature, 1e-6) - 0.3) / 0.7, 0.0, 1.0)


# Paints of a facade: index into the per-building palette built by `_facade_palette`.
WALL, TRIM, GLASS, FRAME, DOOR, SIGN_BG, SIGN_FG, SNOW = range(8)


def _facade_palette(t: dict) -> np.ndarray:
    """(buildings, 8, 3) colours of the paints WALL..SNOW (glass before sky reflection)."""
    n = t["colour"].shape[0]
    return np.stack([t["colour"], t["trim"], 0.65 * t["glass"], t["frame_colour"], t["door_colour"],
                     t["sign_bg"], t["sign_fg"], np.full((n, 3), 0.95)], axis=1).astype(np.float32)


def _shade_facades(city: City, b: np.ndarray, u: np.ndarray, z: np.ndarray, wall_rand: np.ndarray,
                   length: np.ndarray, height: np.ndarray, footprint: np.ndarray, style: Style,
                   light: np.ndarray, image_seed: int, sky_col: np.ndarray):
    """Facade colour and emitted light for wall pixels of buildings.

    b: building rows; u, z: position on the wall (m from the wall's first corner, m above
    ground); footprint: pixel size on the wall (m), used to average patterns that a
    pixel cannot resolve (windows far away) instead of aliasing them. Each pixel picks
    a paint (WALL, TRIM, ...) from its building's palette. Returns (lit colour (M, 3),
    emission (M, 3)).
    """
    t = city.buildings
    paint = np.full(b.shape, WALL, dtype=np.int64)
    gh, fh, cornice = t["ground_h"][b], t["floor_h"][b], t["cornice"][b]

    # Upper floors: a window grid per building (window width/height/spacing per building).
    ww, wh, sx, sill = t["win_w"][b], t["win_h"][b], t["win_sx"][b], t["sill"][b]
    zf = z - gh
    floor_i = np.floor(zf / fh)
    zin = zf - floor_i * fh
    uu = u - t["win_phase"][b] * sx
    col_i = np.floor(uu / sx)
    uin = uu - col_i * sx
    upper = (z > gh) & (z < height - cornice - 0.1) & (u > 0.5) & (u < length - 0.5)
    in_win = upper & (uin < ww) & (zin > sill) & (zin < sill + wh)
    # Ornament (per building, 0 = none): floor bands, pilasters between window columns,
    # window frames; a trim band under the cornice and above the ground floor.
    band_t, pil_w, frame_t = t["floor_band"][b], t["pilaster"][b], t["frame"][b]
    ornament = upper & ((zin < band_t) | (np.abs(uin - ww - 0.5 * (sx - ww)) < 0.5 * pil_w))
    paint[ornament | (z > height - cornice) | ((z > gh - 0.3) & (z < gh))] = TRIM
    near_win = (uin < ww + frame_t) | (uin >= sx - frame_t)
    paint[upper & near_win & (zin > sill - frame_t) & (zin < sill + wh + frame_t)] = FRAME
    if style.snow > 0:
        paint[upper & (uin < ww) & (zin > sill - 0.15) & (zin <= sill)] = SNOW  # snow on the sills
    paint[in_win] = GLASS

    # Ground floor: shop windows, one door per wall, a shop sign with glyphs.
    ground = z < gh - 0.3
    shop_sx = t["shop_sx"][b]
    su = u - 0.8
    s_in = su - np.floor(su / shop_sx) * shop_sx
    shop = ground & (z > 0.5) & (z < gh - 1.3) & (s_in < shop_sx - 1.0) & (u > 0.8) & (u < length - 0.8)
    paint[shop] = GLASS
    dw = t["door_w"][b]
    du = 0.5 + wall_rand * np.maximum(length - dw - 1.0, 0.0)
    paint[(u > du) & (u < du + dw) & (z < t["door_h"][b])] = DOOR

    sign_h = t["sign_h"][b]
    cw = 0.8 * sign_h  # character cell width (m): 5 glyph columns + 1 spacing column
    nch = t["n_chars"][b]
    sign_len = nch * cw + 0.4
    s0 = 0.3 + np.mod(wall_rand * 7.31, 1.0) * np.maximum(length - sign_len - 0.6, 0.0)
    z_top = gh - 0.35
    sign = t["has_sign"][b] & (u > s0) & (u < s0 + sign_len) & (z < z_top) & (z > z_top - sign_h) & (u < length)
    sign_idx = np.nonzero(sign)[0]
    if sign_idx.size:
        bs = b[sign_idx]
        us = u[sign_idx] - s0[sign_idx] - 0.2
        cws = cw[sign_idx]
        ch = np.floor(us / cws).astype(np.int64)
        gx = np.floor((us - ch * cws) / cws * 6).astype(np.int64)
        gy = np.floor((z_top[sign_idx] - z[sign_idx]) / sign_h[sign_idx] * 9).astype(np.int64) - 1
        valid = (ch >= 0) & (ch < nch[sign_idx]) & (gx >= 0) & (gx < 5) & (gy >= 0) & (gy < 7)
        bit = np.zeros(bs.shape, dtype=bool)
        bit[valid] = t["glyphs"][bs[valid], ch[valid], gy[valid], gx[valid]]
        paint[sign_idx] = np.where(bit, SIGN_FG, SIGN_BG)

    palette = _facade_palette(t)
    col = palette[b, paint]
    sky_reflection = (0.245 * sky_col).astype(np.float32)
    col += (paint == GLASS)[:, None] * sky_reflection
    # Fine masonry texture (0.33 m cells, +-5%), faded out when pixels are larger.
    tex = hash01(b, np.floor(u * 3), np.floor(z * 3)) - 0.5
    col *= (1.0 + 0.10 * tex * (1 - _lod(footprint, 0.33)))[:, None]

    # Level of detail: far windows blend into the building's average upper-floor colour.
    blur = _lod(footprint, np.minimum(np.minimum(ww, wh), sx - ww))
    fill = (ww / sx) * (wh / fh)
    frame_share = np.clip(2 * frame_t * (ww + wh + 2 * frame_t) / (sx * fh), 0, 1)
    orn_share = np.clip(band_t / fh + pil_w / sx, 0, 1) * (1 - fill - frame_share)
    pb = palette[b]
    avg = ((1 - fill - frame_share - orn_share)[:, None] * pb[:, WALL] + orn_share[:, None] * pb[:, TRIM]
           + frame_share[:, None] * pb[:, FRAME] + fill[:, None] * (pb[:, GLASS] + sky_reflection))
    mix = (blur * upper)[:, None]
    col = (1 - mix) * col + mix * avg
    if sign_idx.size:  # glyph strokes average out as well
        gblur = _lod(footprint[sign_idx], sign_h[sign_idx] / 9)[:, None]
        avg_sign = 0.7 * palette[bs, SIGN_BG] + 0.3 * palette[bs, SIGN_FG]
        col[sign_idx] = (1 - gblur) * col[sign_idx] + gblur * avg_sign

    lit_col = col * light
    emis = np.zeros_like(lit_col)
    if style.lit_windows > 0:
        if sign_idx.size:  # illuminated signs at night
            emis[sign_idx] += 0.5 * col[sign_idx] * t["sign_lit"][bs][:, None]
        # Lit windows at night: hash of (building, wall, floor, column, image) < probability.
        wall_key = np.floor(wall_rand * 1e6)
        lit = hash01(b, wall_key, floor_i, col_i, image_seed) < style.lit_windows
        warm = np.stack([np.ones_like(u), 0.75 + 0.1 * hash01(b, floor_i, 7), 0.35 + 0.2 * hash01(b, col_i, 9)], 1)
        strength = 0.55 + 0.45 * hash01(b, floor_i, col_i, image_seed + 1)
        emis += ((in_win & lit) * strength * (1 - blur))[:, None] * warm
        emis += (blur * fill * style.lit_windows * upper)[:, None] * warm * 0.7
        shop_key = 2 if style.steady_shop_lights else image_seed + 2
        shop_lit = shop & (hash01(b, wall_key, shop_key) < 0.6)
        emis += shop_lit[:, None] * np.array([0.9, 0.8, 0.6], dtype=np.float32) * 0.6
    return lit_col, emis


def _shade_objects(kind: np.ndarray, u: np.ndarray, z: np.ndarray, length: np.ndarray, height: np.ndarray,
                   c1: np.ndarray, c2: np.ndarray, sky_col: np.ndarray) -> np.ndarray:
    """Albedo of cars (body, glass, tyres), people (trousers, shirt, head) and poles."""
    col = c1.copy()
    car = kind == CAR
    glass = car & (z > 0.85) & (z < height - 0.08) & (u > 0.35) & (u < length - 0.35)
    col[glass] = 0.5 * c2[glass] + 0.3 * sky_col
    tyre = car & (z < 0.35)
    col[tyre] = 0.06
    person = kind == PERSON
    legs = person & (z < 0.45 * height)
    col[legs] = c2[legs]
    head = person & (z > height - 0.25)
    col[head] = np.array([0.78, 0.6, 0.48])
    return col


# Ground materials: index into _GROUND_PALETTE.
_OPEN, _ASPHALT, _WHITE_PAINT, _YELLOW_PAINT, _CONCRETE, _TILE_JOINT, _CURB = range(7)
_GROUND_PALETTE = np.array([[0.33, 0.36, 0.28], [0.27, 0.27, 0.28], [0.85, 0.85, 0.8], [0.85, 0.77, 0.36],
                            [0.58, 0.56, 0.53], [0.46, 0.45, 0.42], [0.7, 0.7, 0.68]], dtype=np.float32)


def _ground_albedo(city: City, gx: np.ndarray, gy: np.ndarray, footprint: np.ndarray, style: Style) -> np.ndarray:
    """Albedo of the ground at (gx, gy): asphalt with lane markings and zebra crossings,
    concrete sidewalks with tile joints and curbs, open ground inside the blocks."""
    def dist_to(lines, v):
        i = np.clip(np.searchsorted(lines, v), 1, len(lines) - 1)
        return np.minimum(np.abs(v - lines[i - 1]), np.abs(v - lines[i]))

    rh, sw = city.road_half_width, city.sidewalk_width
    adx = dist_to(city.x_streets, gx)  # distance to the nearest north-south street centre line
    ady = dist_to(city.y_streets, gy)
    on_ns, on_ew = adx < rh, ady < rh
    road = on_ns | on_ew
    sidewalk = ~road & ((adx < rh + sw) | (ady < rh + sw))
    fine = 1 - _lod(footprint, 0.33)  # 1 where 0.33 m details are resolved

    mat = np.full(gx.shape, _OPEN, dtype=np.int64)
    mat[road] = _ASPHALT
    # Dashed yellow centre lines away from intersections, white edge lines, zebra crossings.
    dash = ((on_ns & (adx < 0.09) & (np.mod(gy, 9.0) < 4.5) & (ady > rh + 4.5)) |
            (on_ew & (ady < 0.09) & (np.mod(gx, 9.0) < 4.5) & (adx > rh + 4.5)))
    zebra = ((on_ns & (ady > rh + 0.8) & (ady < rh + 3.8) & (np.mod(gx, 1.0) < 0.5) & (adx < rh - 0.3)) |
             (on_ew & (adx > rh + 0.8) & (adx < rh + 3.8) & (np.mod(gy, 1.0) < 0.5) & (ady < rh - 0.3)))
    edge = (((adx > rh - 0.35) & (adx < rh - 0.25) & on_ns & (ady > rh)) |
            ((ady > rh - 0.35) & (ady < rh - 0.25) & on_ew & (adx > rh)))
    mat[zebra | edge] = _WHITE_PAINT
    mat[dash] = _YELLOW_PAINT
    mat[sidewalk] = _CONCRETE
    tile = (np.mod(gx, 1.5) < 0.06) | (np.mod(gy, 1.5) < 0.06)
    mat[sidewalk & tile & (fine > 0.5)] = _TILE_JOINT
    mat[sidewalk & ((adx < rh + 0.25) | (ady < rh + 0.25))] = _CURB

    col = _GROUND_PALETTE[mat]
    # Thin paint fades into the asphalt when pixels are much larger than the 0.18 m lines.
    is_paint = (mat == _WHITE_PAINT) | (mat == _YELLOW_PAINT)
    fade = (0.7 * _lod(footprint, 0.18) * is_paint)[:, None]
    col = (1 - fade) * col + fade * _GROUND_PALETTE[_ASPHALT]
    noise = hash01(np.floor(gx * 3), np.floor(gy * 3)) - 0.5
    col *= (1 + 0.12 * noise * fine)[:, None]

    if style.snow > 0:
        s = style.snow
        white = np.array([0.93, 0.94, 0.97], dtype=np.float32) * (1 + 0.04 * noise)[:, None]
        lane = np.mod(np.where(on_ns, adx, ady), 3.5)
        track = (road & (np.abs(np.abs(lane - 1.75) - 0.8) < 0.18))[:, None]  # two wheel tracks per lane
        snowy = white - track * 0.25 * (white - col)
        col = (1 - s) * col + s * snowy
    if style.wetness > 0:
        col = col * (1 - 0.45 * style.wetness)
    return col


def _add_glows(img: np.ndarray, centres: np.ndarray, radii: np.ndarray, colours: np.ndarray) -> None:
    """Additive Gaussian light blobs in image space (lamp heads, headlights, flares). img: (H, W, 3)."""
    if len(centres) == 0:
        return
    n = img.shape[0]
    yy, xx = np.mgrid[0:n, 0:n]
    for (cx, cy), rad, colour in zip(centres, radii, colours, strict=True):
        lo_x, hi_x = int(max(cx - 3 * rad, 0)), int(min(cx + 3 * rad + 1, n))
        lo_y, hi_y = int(max(cy - 3 * rad, 0)), int(min(cy + 3 * rad + 1, n))
        if lo_x >= hi_x or lo_y >= hi_y:
            continue
        d2 = (xx[lo_y:hi_y, lo_x:hi_x] - cx) ** 2 + (yy[lo_y:hi_y, lo_x:hi_x] - cy) ** 2
        img[lo_y:hi_y, lo_x:hi_x] += np.exp(-d2 / (2 * rad * rad))[..., None] * colour


def _point_visible(cam: Camera, depth_img: np.ndarray, col: float, row: float, dist: float) -> bool:
    n = cam.resolution
    c, r = int(round(col)), int(round(row))
    if not (0 <= c < n and 0 <= r < n):
        return False
    return depth_img[r, c] > dist - 1.0


def render_view(city: City, camera: Camera, style: Style, rng: np.random.Generator,
                hood: dict | None = None) -> np.ndarray:
    """Render one image: uint8 array (resolution, resolution, 3).

    city: the world (use `City.with_objects` to add cars/pedestrians/occluders);
    camera: pose and intrinsics; style: appearance (`make_style`); rng: source of the
    per-image randomness (sensor noise, rain streaks, snowflakes, lit windows,
    headlights). hood: optional car-hood occluder at the image bottom (RobotCar
    style), a dict with "top" (fraction of the image height covered at the centre),
    "curve" (extra fraction at the sides) and "colour" (RGB).
    """
    n = camera.resolution
    _, dirs = _camera_frame(camera)
    hits = cast_rays(city, camera)
    n_pix = dirs.shape[0]
    image_seed = int(rng.integers(0, 2**31 - 1))
    colour = np.zeros((n_pix, 3))
    sun = _sun_vector(style)
    amb = style.ambient * np.array(style.ambient_colour)
    sun_col = style.sun_intensity * np.array(style.sun_colour)
    horizon = np.array(style.sky_horizon)
    pix_angle = 2.0 * math.tan(math.radians(camera.hfov) / 2.0) / n  # radians per pixel
    lamps = city.lamp_heads() if style.street_lights > 0 else np.zeros((0, 3))
    if len(lamps):
        # The 10 nearest lamps that are ahead of the camera or within 15 m of it.
        fwd = camera.basis()[0]
        vx, vy = lamps[:, 0] - camera.x, lamps[:, 1] - camera.y
        dist_l = np.hypot(vx, vy)
        useful = (dist_l < 60.0) & ((vx * fwd[0] + vy * fwd[1] > 0) | (dist_l < 15.0))
        lamps = lamps[useful][np.argsort(dist_l[useful])[:10]]

    def lamp_light(px, py, pz, nx=None, ny=None):
        """Irradiance from the street lamps: intensity * cos(incidence) / (d^2 + 4 m^2)."""
        total = np.zeros(px.shape, dtype=np.float32)
        for lx, ly, lz in lamps.astype(np.float32):
            vx, vy, vz = lx - px, ly - py, lz - pz
            d2 = vx * vx + vy * vy + vz * vz
            along = vz if nx is None else vx * nx + vy * ny  # ground normal is up
            total += np.maximum(along, 0.0) / np.sqrt(d2) * (18.0 / (d2 + 4.0))
        return style.street_lights * total

    lamp_colour = np.array(style.lamp_colour)

    # Sky (or the ceiling indoors).
    sky = hits.what == SKY
    if style.ceiling_colour is None:
        colour[sky] = _sky(style, dirs[sky])
    else:
        colour[sky] = _ceiling(style, camera, dirs[sky], city.lamp_heads(), amb)

    # Ground.
    ground = hits.what == GROUND
    if ground.any():
        cos_g = np.clip(-dirs[ground, 2], 0.05, 1.0)
        fp = hits.dist[ground] * pix_angle / cos_g
        if style.floor_colour is None:
            alb = _ground_albedo(city, hits.px[ground], hits.py[ground], fp, style)
        else:
            alb = _floor_albedo(hits.px[ground], hits.py[ground], fp, style)
        light = amb + sun_col * max(sun[2], 0.0)
        c = alb * light[None, :]
        if len(lamps):
            c += alb * lamp_light(hits.px[ground].astype(np.float32), hits.py[ground].astype(np.float32),
                                  np.zeros(int(ground.sum()), np.float32))[:, None] * lamp_colour
        colour[ground] = c

    # Walls.
    wall = hits.what >= 0
    if wall.any():
        w = hits.what[wall]
        W = city.walls
        box = W["box"][w]
        nx, ny = W["nx"][w], W["ny"][w]
        cos_i = np.abs(nx * dirs[wall, 0] + ny * dirs[wall, 1])
        fp = hits.dist[wall] * pix_angle / np.clip(cos_i, 0.15, 1.0)
        sun_dot = np.clip(nx * sun[0] + ny * sun[1], 0.0, 1.0) * (style.sun_elevation > 0)
        light = amb[None, :] + sun_dot[:, None] * sun_col[None, :]
        if len(lamps):
            light = light + lamp_light(hits.px[wall].astype(np.float32), hits.py[wall].astype(np.float32),
                                       hits.pz[wall].astype(np.float32), nx.astype(np.float32),
                                       ny.astype(np.float32))[:, None] * lamp_colour
        kind = city.boxes.kind[box]
        u, z = hits.u[wall], hits.pz[wall]
        length, height = W["length"][w], W["height"][w]
        wc = np.zeros((w.size, 3))
        fac = kind == FACADE
        if fac.any():
            lit, emis = _shade_facades(city, city.boxes.obj[box[fac]], u[fac], z[fac], W["rand"][w[fac]],
                                       length[fac], height[fac], fp[fac], style, light[fac], image_seed, horizon)
            wc[fac] = lit + emis
        obj = ~fac
        if obj.any():
            alb = _shade_objects(kind[obj], u[obj], z[obj], length[obj], height[obj],
                                 city.boxes.colour[box[obj]], city.boxes.colour2[box[obj]], horizon)
            wc[obj] = alb * light[obj]
        colour[wall] = wc

    # Distance fog (also hides the end of the world at MAX_VIEW_DISTANCE); the sky is not fogged here.
    d = np.minimum(hits.dist, MAX_VIEW_DISTANCE)
    f = 1.0 - np.exp(-d / style.fog_distance)
    f = np.maximum(f, np.clip((d - 0.8 * MAX_VIEW_DISTANCE) / (0.2 * MAX_VIEW_DISTANCE), 0, 1))
    f[sky] = 0.0
    fog_col = np.array(style.fog_colour)
    target = fog_col if style.sky_fog >= 1 else 0.5 * fog_col + 0.5 * np.array(style.sky_horizon)
    colour += f[:, None] * (target[None, :] - colour)

    img = colour.reshape(n, n, 3)
    depth = np.where(np.isfinite(hits.dist), hits.dist, np.inf).reshape(n, n)

    # Wet ground reflects what stands above the horizon (screen-space mirror per column).
    if style.wetness > 0 and ground.any():
        fwd, right, up = camera.basis()
        xs = (np.arange(n) + 0.5 - n / 2.0) / camera.focal
        with np.errstate(divide="ignore", invalid="ignore"):
            yn = -(fwd[2] + xs * right[2]) / up[2]
        horizon_row = n / 2.0 - yn * camera.focal - 0.5
        rows = np.arange(n)[:, None]
        mirror = np.clip(np.rint(2 * horizon_row[None, :] - rows), 0, n - 1).astype(np.int64)
        refl = img[mirror, np.arange(n)[None, :]]
        g = ground.reshape(n, n)
        grazing = np.clip(1.0 - 3.0 * np.abs(dirs[:, 2]).reshape(n, n), 0.0, 1.0)
        k = (style.wetness * (0.25 + 0.5 * grazing) * g)[..., None]
        img = (1 - k) * img + k * refl

    # Night lights: lamp heads and oncoming headlights as glows (if not occluded).
    if style.street_lights > 0 and len(lamps):
        c, r, dep = camera.project(lamps)
        dist = np.linalg.norm(lamps - np.array([camera.x, camera.y, camera.height]), axis=1)
        cen, rad, cols = [], [], []
        for i in range(len(lamps)):
            if dep[i] > 0.5 and _point_visible(camera, depth, c[i], r[i], dist[i]):
                cen.append((c[i], r[i]))
                rad.append(max(0.6, camera.focal * 0.35 / dist[i]))
                cols.append(lamp_colour * 1.3 * style.street_lights)
        _add_glows(img, np.array(cen).reshape(-1, 2), np.array(rad), np.array(cols).reshape(-1, 3))
    if style.headlights > 0:
        _draw_headlights(img, city, camera, style, rng, depth)

    if hood is not None:
        _draw_hood(img, hood, style, horizon)
    if style.rain_streaks:
        _draw_rain(img, style, camera, rng)
    if style.snowflakes:
        _draw_snowflakes(img, style, rng)
    if style.glare > 0:
        _draw_glare(img, camera, style, sky.reshape(n, n))

    # Colour grading, sensor noise, quantisation.
    img = img * style.exposure * np.array(style.tint)
    if style.saturation != 1.0:
        lum = img @ np.array([0.299, 0.587, 0.114])
        img = lum[..., None] + style.saturation * (img - lum[..., None])
    if style.contrast != 1.0:
        mid = 0.45
        img = mid + style.contrast * (img - mid)
    img = img + style.noise * rng.standard_normal(img.shape, dtype=np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _draw_headlights(img, city: City, camera: Camera, style: Style, rng, depth) -> None:
    """Pairs of headlights of cars on the nearest street ahead, 10-70 m away."""
    h = math.radians(camera.heading)
    cen, rad, cols = [], [], []
    for _ in range(style.headlights):
        dist = rng.uniform(10.0, 70.0)
        px = camera.x + dist * math.sin(h) + rng.uniform(-5, 5)
        py = camera.y + dist * math.cos(h) + rng.uniform(-5, 5)
        ix = city.x_streets[np.argmin(np.abs(city.x_streets - px))]
        iy = city.y_streets[np.argmin(np.abs(city.y_streets - py))]
        lane = rng.choice([-1.75, 1.75])
        if abs(px - ix) < abs(py - iy):  # on a north-south street: lights side by side along x
            base = np.array([ix + lane, py])
            offs = np.array([[-0.75, 0.0], [0.75, 0.0]])
        else:
            base = np.array([px, iy + lane])
            offs = np.array([[0.0, -0.75], [0.0, 0.75]])
        pts = np.concatenate([base[None, :] + offs, np.full((2, 1), 0.7)], axis=1)
        c, r, dep = camera.project(pts)
        dists = np.linalg.norm(pts - np.array([camera.x, camera.y, camera.height]), axis=1)
        for i in range(2):
            if dep[i] > 0.5 and _point_visible(camera, depth, c[i], r[i], dists[i]):
                cen.append((c[i], r[i]))
                rad.append(max(0.7, camera.focal * 0.3 / dists[i]))
                cols.append(np.array([1.0, 0.97, 0.9]) * 2.0)
    _add_glows(img, np.array(cen).reshape(-1, 2), np.array(rad), np.array(cols).reshape(-1, 3))


def _draw_hood(img, hood: dict, style: Style, horizon: np.ndarray) -> None:
    """Car hood at the bottom of the image: a dark curved panel reflecting the sky."""
    n = img.shape[0]
    x = (np.arange(n) + 0.5) / n - 0.5
    top = (1.0 - hood["top"] - hood["curve"] * 4 * x * x) * n  # hood edge row per column
    rows = np.arange(n)[:, None] + 0.5
    mask = rows > top[None, :]
    shade = np.clip((rows - top[None, :]) / (0.2 * n), 0, 1)
    paint = np.array(hood["colour"]) * (style.ambient + 0.5 * style.sun_intensity)
    col = (1 - shade)[..., None] * (0.6 * horizon + 0.4 * paint) + shade[..., None] * paint
    img[mask] = col[mask]


def _draw_rain(img, style: Style, camera: Camera, rng) -> None:
    """Semi-transparent slanted streaks of rain (rasterised by sampling points along each)."""
    n = img.shape[0]
    m = style.rain_streaks
    x0, y0 = rng.uniform(0, n, m), rng.uniform(-0.1 * n, n, m)
    ang = np.radians(rng.normal(8.0, 4.0, m) - camera.roll)
    length = rng.uniform(0.04, 0.12, m) * n
    strength = rng.uniform(0.08, 0.2, m)
    t = np.linspace(0.0, 1.0, 24)[None, :]
    xs = np.rint(x0[:, None] + np.sin(ang)[:, None] * length[:, None] * t).astype(np.int64)
    ys = np.rint(y0[:, None] + np.cos(ang)[:, None] * length[:, None] * t).astype(np.int64)
    ok = (xs >= 0) & (xs < n) & (ys >= 0) & (ys < n)
    layer = np.zeros((n, n))
    np.add.at(layer, (ys[ok], xs[ok]), np.broadcast_to(strength[:, None], xs.shape)[ok] / 2.0)
    img += np.clip(layer, 0, 0.35)[..., None] * np.array([0.85, 0.88, 0.92])


def _draw_snowflakes(img, style: Style, rng) -> None:
    """White flakes of 1-2 pixels, blended over the image."""
    n = img.shape[0]
    m = style.snowflakes
    xs, ys = rng.integers(0, n, m), rng.integers(0, n, m)
    alpha = rng.uniform(0.5, 0.95, m)
    big = rng.uniform(size=m) < 0.3
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        sel = big if (dx or dy) else np.ones(m, bool)
        x, y = np.clip(xs[sel] + dx, 0, n - 1), np.clip(ys[sel] + dy, 0, n - 1)
        a = alpha[sel][:, None]
        img[y, x] = (1 - a) * img[y, x] + a * 0.97


def _draw_glare(img, camera: Camera, style: Style, sky_mask: np.ndarray) -> None:
    """Low-sun veiling glare around the sun's image position and lens-flare ghosts."""
    n = img.shape[0]
    sun_pt = np.array([[camera.x, camera.y, camera.height]]) + 1e4 * _sun_vector(style)[None, :]
    c, r, dep = camera.project(sun_pt)
    if dep[0] <= 0:
        return
    sc, sr = float(np.clip(c[0], -n, 2 * n)), float(np.clip(r[0], -n, 2 * n))
    inside = 0 <= sc < n and 0 <= sr < n
    if inside:
        y0, y1 = int(max(sr - 6, 0)), int(min(sr + 7, n))
        x0, x1 = int(max(sc - 6, 0)), int(min(sc + 7, n))
        open_sky = float(sky_mask[y0:y1, x0:x1].mean()) if (y1 > y0 and x1 > x0) else 0.0
    else:
        open_sky = 0.3
    g = style.glare * (0.4 + 0.6 * open_sky)
    yy, xx = np.mgrid[0:n, 0:n]
    d = np.hypot(xx - sc, yy - sr) / n
    warm = np.array(style.sun_colour)
    img += (g * (0.9 * np.exp(-d / 0.12) + 0.25 * np.exp(-d / 0.5)))[..., None] * warm
    # Ghosts along the line from the sun through the image centre.
    centre = np.array([n / 2.0, n / 2.0])
    for t_, rad, tone in ((0.6, 0.05, (0.5, 0.8, 0.6)), (1.2, 0.09, (0.7, 0.5, 0.9)),
                          (1.5, 0.03, (0.9, 0.7, 0.4)), (1.9, 0.13, (0.4, 0.6, 0.9))):
        p = np.array([sc, sr]) + t_ * (centre - np.array([sc, sr]))
        rp = rad * n
        x0, x1 = int(max(p[0] - rp, 0)), int(min(p[0] + rp + 1, n))
        y0, y1 = int(max(p[1] - rp, 0)), int(min(p[1] + rp + 1, n))
        if x0 >= x1 or y0 >= y1:
            continue
        dd = np.hypot(xx[y0:y1, x0:x1] - p[0], yy[y0:y1, x0:x1] - p[1]) / n
        disc = np.sqrt(np.clip(1.0 - dd / rad, 0, 1))
        img[y0:y1, x0:x1] += (0.12 * g * disc)[..., None] * np.array(tone)
