"""NAVER LABS kapture datasets (Gangnam Station B1/B2, Hyundai Department Store B1/1F/4F) → the `@` layout.

    python -m jaxvpr.data.kapture --scene-root GangnamStation/B2/release --out OUT [--link]
    python -m jaxvpr.data.kapture --mapping GangnamStation/B2/release/mapping \
        --validation GangnamStation/B2/release/validation --out OUT [--link]

writes ``OUT/database/*.jpg`` (the kapture ``mapping`` split), ``OUT/queries/*.jpg`` (the ``validation``
split, the one whose poses are public; facts §4.5) and ``OUT/conversion.json``; ``OUT`` is what
``jaxvpr.data.format.read_split`` reads. Images are copied (hard-linked with ``--link``), never
re-encoded unless a source is not a JPEG.

Geometry (facts §4.4). A line of ``trajectories.txt`` is the world→device pose (R, t) of a camera or
of a rig (composed with ``rigs.txt`` by ``kapture.rigs_remove_inplace``), as in COLMAP, so

    camera centre  C = −Rᵀ t            (metres, world frame)
    optical axis   a = Rᵀ [0, 0, 1]     (camera +z in the world frame)

The vertical world axis is found from the data: it is the coordinate of the camera centres with the
smallest standard deviation, which must be below ``VERTICAL_SPREAD_RATIO`` × the next smallest (one
floor: the cameras stay at about the same height); otherwise the conversion stops and
``--vertical-axis`` must name it. The two other axes, in x, y, z order, are the ground plane: the
first is written as ``UTM_east``, the second as ``UTM_north`` (e.g. y vertical → east = x, north = z).

Name fields (``jaxvpr.data.format.FIELDS``):

- ``UTM_east``, ``UTM_north``: ground coordinates in metres, shifted by one offset per axis for the
  whole dataset (database and queries alike) so that they are positive: the offset is 0 when the
  smallest coordinate is already > 0, else ``floor(-min) + 1`` metres (-min rounded to the µm). The
  offsets are in ``conversion.json``; world coordinate = name coordinate − offset.
- ``heading``: degrees in [0, 360), the angle of the optical axis projected on the ground plane,
  measured from the ``UTM_north`` axis towards the ``UTM_east`` axis: ``atan2(a_east, a_north)``.
  This is clockwise seen from the side towards which east × north points (from above for a y-down
  world such as NAVER's, or a z-up one); ``conversion.json`` says which way it turned out
  (``heading_clockwise_seen_from_above``, judged from the cameras' image-down axis). Empty when the
  camera looks straight up or down.
- ``height``: the vertical world coordinate of the centre in metres, not shifted (its sign is that of
  the world axis), so that the 3-D centre can be recovered.
- ``zone_number``, ``zone_letter``, ``lat``, ``lon``: empty (metric local frame, not UTM).
- ``pano_id``: the kapture sensor id; ``timestamp``: the kapture timestamp; ``note``: the image path
  relative to ``<split>/sensors/records_data/``, percent-encoded (``urllib.parse.unquote`` gives it back).

This file also holds what the Baidu Mall converter (``jaxvpr.data.baidu``) shares with it:
``PosedImages``, ``find_vertical_axis``, ``ground_geotags`` and ``write_layout``. The ``kapture``
package (extra ``indoor``) is imported only by ``read_kapture_split``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import quote

import numpy as np

from jaxvpr import cli
from jaxvpr.data.format import FIELDS, DatasetError

AXES = "xyz"
# The vertical axis's std of the camera centres must be below this fraction of the next smallest one.
VERTICAL_SPREAD_RATIO = 0.2
_MAX_NAME_BYTES = 255
_JPEG_MAGIC = b"\xff\xd8\xff"


class ConversionError(DatasetError):
    """Input of a converter that is missing or malformed; the message names the file (and line)."""


@dataclasses.dataclass
class PosedImages:
    """The images of one split with their camera poses.

    Attributes:
      files: the source image files.
      origins: each image's original path, written (percent-encoded) in the ``note`` field.
      devices: the ``pano_id`` field (kapture sensor id; empty for Baidu).
      timestamps: the ``timestamp`` field (kapture timestamp; empty for Baidu).
      rotations: float64 (N, 3, 3) world→camera rotations R.
      centres: float64 (N, 3) camera centres in the world frame, metres.
    """

    files: list[Path]
    origins: list[str]
    devices: list[str]
    timestamps: list[str]
    rotations: np.ndarray
    centres: np.ndarray

    def __len__(self) -> int:
        return len(self.files)

    @property
    def optical_axes(self) -> np.ndarray:
        """(N, 3) camera +z in the world frame: Rᵀ [0, 0, 1], i.e. the third row of R."""
        return self.rotations[:, 2, :]

    @property
    def down_axes(self) -> np.ndarray:
        """(N, 3) camera +y (image down) in the world frame: Rᵀ [0, 1, 0]."""
        return self.rotations[:, 1, :]


def find_vertical_axis(centres: np.ndarray, source: str, override: str = "") -> tuple[int, np.ndarray]:
    """The index (0, 1, 2 for x, y, z) of the vertical world axis and the std of the centres (metres).

    The vertical axis is the one along which the camera centres (N, 3) spread least; its std must be
    below ``VERTICAL_SPREAD_RATIO`` × the next smallest std, else a ``ConversionError`` naming
    ``source``. ``override`` ("x", "y" or "z") skips the test.
    """
    spreads = np.asarray(centres, dtype=np.float64).std(axis=0)
    if override:
        if override not in AXES:
            raise ConversionError(f"--vertical-axis is {override!r}; it must be one of x, y, z.")
        return AXES.index(override), spreads
    smallest, second = np.argsort(spreads)[:2]
    if not spreads[smallest] < VERTICAL_SPREAD_RATIO * spreads[second]:
        described = ", ".join(f"{a}: {s:.3f} m" for a, s in zip(AXES, spreads))
        raise ConversionError(
            f"No world axis is clearly vertical in {source}: the {len(centres)} camera centres spread "
            f"(std) {described}; the vertical axis must spread less than {VERTICAL_SPREAD_RATIO} × the "
            "next smallest. Is this one floor? If you know the vertical axis, pass --vertical-axis."
        )
    return int(smallest), spreads


def ground_axes(vertical: int) -> tuple[int, int]:
    """The (east, north) world axes: the two non-vertical axes in x, y, z order."""
    east, north = (i for i in range(3) if i != vertical)
    return east, north


def ground_geotags(images: PosedImages, vertical: int) -> dict[str, np.ndarray]:
    """Ground coordinates (metres, unshifted), heading (degrees in [0, 360), NaN if the camera looks
    straight up or down) and height (metres) of each image; conventions in the module docstring."""
    east, north = ground_axes(vertical)
    axes = images.optical_axes
    heading = np.degrees(np.arctan2(axes[:, east], axes[:, north])) % 360.0
    heading[np.hypot(axes[:, east], axes[:, north]) < 1e-6] = np.nan
    return {
        "east": images.centres[:, east],
        "north": images.centres[:, north],
        "heading": heading,
        "height": images.centres[:, vertical],
    }


def _positive_offset(values: np.ndarray) -> float:
    """0 m if every value is > 0, else floor(-min) + 1 metres, so that every shifted value is > 0
    (-min is rounded to the micrometre first, so that float noise in -3.0 does not change the offset)."""
    low = float(np.min(values))
    return 0.0 if low > 0 else float(math.floor(round(-low, 6)) + 1)


def image_name(east: float, north: float, heading: float, height: float, device: str, timestamp: str,
               origin: str) -> str:
    """The ``@`` name of one image (fields in ``jaxvpr.data.format.FIELDS`` order)."""
    values = {
        "UTM_east": f"{east:.6f}",
        "UTM_north": f"{north:.6f}",
        "heading": "" if math.isnan(heading) else f"{round(heading, 6) % 360.0:.6f}",
        "height": f"{height:.6f}",
        "pano_id": quote(device, safe=""),
        "timestamp": quote(timestamp, safe=""),
        "note": quote(origin, safe=""),
    }
    return "@" + "@".join(values.get(field, "") for field in FIELDS) + "@.jpg"


def _place_image(src: Path, dst: Path, link: bool) -> bool:
    """Copies (or hard-links) a JPEG, re-encodes anything else to JPEG. Returns True if re-encoded."""
    try:
        with open(src, "rb") as f:
            is_jpeg = f.read(3) == _JPEG_MAGIC
    except OSError as e:
        raise ConversionError(f"Cannot read image {str(src)!r}: {e}") from e
    if not is_jpeg:
        from PIL import Image

        try:
            with Image.open(src) as im:
                im.convert("RGB").save(dst, format="JPEG", quality=95)
        except OSError as e:
            raise ConversionError(f"Image {str(src)!r} is neither a JPEG nor readable by PIL: {e}") from e
        return True
    if link:
        try:
            os.link(src, dst)
        except OSError as e:
            raise ConversionError(
                f"Cannot hard-link {str(src)!r} to {str(dst)!r} ({e}); hard links need the same file "
                "system: choose --out there, or drop --link to copy."
            ) from e
    else:
        shutil.copyfile(src, dst)
    return False


def _check_empty_output(out: Path) -> None:
    for sub in ("database", "queries"):
        folder = out / sub
        if folder.is_dir() and any(folder.iterdir()):
            raise ConversionError(
                f"Output folder {str(folder)!r} is not empty; choose another --out or delete it."
            )


def write_layout(out: str | os.PathLike, database: PosedImages, queries: PosedImages, link: bool,
                 source: str, vertical_override: str = "", extra: dict | None = None) -> dict:
    """Writes ``out/database``, ``out/queries`` and ``out/conversion.json``; returns the summary.

    The vertical axis and the positive offsets are computed over database and queries together, so
    both share one metric frame. ``source`` names the input in error messages; ``extra`` is merged
    into the summary.
    """
    out = Path(out)
    if len(database) == 0 or len(queries) == 0:
        raise ConversionError(
            f"{source}: the database has {len(database)} images, the queries {len(queries)}.")
    _check_empty_output(out)
    centres = np.concatenate([database.centres, queries.centres])
    vertical, spreads = find_vertical_axis(centres, source, vertical_override)
    east_axis, north_axis = ground_axes(vertical)
    offset_east = _positive_offset(centres[:, east_axis])
    offset_north = _positive_offset(centres[:, north_axis])

    # Which way is up: the cameras' image-down axis, averaged, points down if they are upright.
    mean_down = np.concatenate([database.down_axes, queries.down_axes]).mean(axis=0)
    up = -np.sign(mean_down[vertical]) if abs(mean_down[vertical]) > 0.5 else 0.0
    east_cross_north = np.cross(np.eye(3)[east_axis], np.eye(3)[north_axis])[vertical]
    clockwise = None if up == 0.0 else bool(east_cross_north * up > 0)

    counts, reencoded = {}, 0
    extent = {"UTM_east": [math.inf, -math.inf], "UTM_north": [math.inf, -math.inf]}
    for split, images in (("database", database), ("queries", queries)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        geo = ground_geotags(images, vertical)
        east = geo["east"] + offset_east
        north = geo["north"] + offset_north
        seen = set()
        for i in range(len(images)):
            name = image_name(east[i], north[i], geo["heading"][i], geo["height"][i], images.devices[i],
                              images.timestamps[i], images.origins[i])
            if len(name.encode()) > _MAX_NAME_BYTES:
                raise ConversionError(f"The name for {str(images.files[i])!r} is longer than "
                                      f"{_MAX_NAME_BYTES} bytes: {name!r}.")
            if name in seen:
                raise ConversionError(f"Two {split} images get the same name {name!r} "
                                      f"(second: {str(images.files[i])!r}).")
            seen.add(name)
            reencoded += _place_image(images.files[i], folder / name, link)
        counts[split] = len(images)
        for field, values in (("UTM_east", east), ("UTM_north", north)):
            low, high = extent[field]
            extent[field] = [min(low, float(values.min())), max(high, float(values.max()))]

    heights = centres[:, vertical]
    summary = {
        "source": source,
        "counts": counts,
        "vertical_axis": AXES[vertical],
        "centre_std_m": {a: float(s) for a, s in zip(AXES, spreads)},
        "vertical_std_m": float(spreads[vertical]),
        "vertical_range_m": [float(heights.min()), float(heights.max())],
        "ground_axes": {"UTM_east": AXES[east_axis], "UTM_north": AXES[north_axis]},
        "offset_m": {"UTM_east": offset_east, "UTM_north": offset_north},
        "extent_m": extent,
        "heading": (f"degrees in [0, 360) from world {AXES[north_axis]} (UTM_north) towards world "
                    f"{AXES[east_axis]} (UTM_east): atan2(axis_{AXES[east_axis]}, axis_{AXES[north_axis]})"),
        "heading_clockwise_seen_from_above": clockwise,
        "height": f"world {AXES[vertical]} of the camera centre, metres, not shifted",
        "images": "hard-linked" if link else "copied",
        "reencoded_to_jpeg": int(reencoded),
        **(extra or {}),
    }
    (out / "conversion.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------------------------------
# kapture


def _table_rows(path: Path, n_fields: int | None, min_fields: int = 0) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a kapture CSV file, comments and blank lines skipped, as kapture
    parses it; a line with the wrong number of fields is an error naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip() or line.startswith("#"):
                continue
            fields = [field.strip() for field in line.rstrip("\n\r").split(",")]
            if (n_fields is not None and len(fields) != n_fields) or len(fields) < min_fields:
                expected = n_fields if n_fields is not None else f"at least {min_fields}"
                raise ConversionError(f"{path}:{number}: {len(fields)} comma-separated fields, "
                                      f"expected {expected}: {line.strip()!r}")
            rows.append((number, fields))
    return rows


def _check_numbers(path: Path, rows: list[tuple[int, list[str]]], integer: tuple[int, ...],
                   real: tuple[int, ...]) -> None:
    for number, fields in rows:
        for i in integer:
            if not fields[i].lstrip("-").isdigit():
                raise ConversionError(f"{path}:{number}: field {i + 1} is {fields[i]!r}, not an integer.")
        for i in real:
            try:
                ok = math.isfinite(float(fields[i]))
            except ValueError:
                ok = False
            if not ok:
                raise ConversionError(
                    f"{path}:{number}: field {i + 1} is {fields[i]!r}, not a finite number.")


def read_kapture_split(kapture_dir: str | os.PathLike) -> PosedImages:
    """The posed camera images of one kapture split folder (the one holding ``sensors/``).

    Reads ``sensors.txt``, ``rigs.txt`` (optional), ``trajectories.txt`` and ``records_camera.txt``
    with ``kapture.io.csv``, composes rig poses with ``kapture.rigs_remove_inplace``. Every image
    must have a pose, a declared camera and a file; errors name the file and line.
    """
    try:
        import kapture
        import kapture.io.csv as kcsv
        import kapture.io.records as krecords
        import quaternion  # numpy-quaternion, a kapture dependency: kapture poses hold its quaternions
    except ImportError as e:
        raise ConversionError(
            f"The kapture converter needs the 'indoor' extra: pip install -e '.[indoor]' ({e}).") from e

    kapture_dir = Path(kapture_dir)
    if not kapture_dir.is_dir():
        raise ConversionError(f"kapture folder {str(kapture_dir)!r} does not exist.")
    path = {kind: kapture_dir / kcsv.CSV_FILENAMES[kind]
            for kind in (kapture.Sensors, kapture.Rigs, kapture.Trajectories, kapture.RecordsCamera)}
    for kind in (kapture.Sensors, kapture.Trajectories, kapture.RecordsCamera):
        if not path[kind].is_file():
            raise ConversionError(
                f"{str(path[kind])!r} does not exist: {str(kapture_dir)!r} is not a kapture split with poses "
                "(expected sensors/sensors.txt, sensors/trajectories.txt, sensors/records_camera.txt)."
            )

    # Our own pass over the text: line numbers for the errors, and nothing silently dropped
    # (kapture's readers skip records of unknown devices).
    _table_rows(path[kapture.Sensors], None, min_fields=3)  # checks the field counts only
    trajectory_rows = _table_rows(path[kapture.Trajectories], 9)
    _check_numbers(path[kapture.Trajectories], trajectory_rows, integer=(0,), real=tuple(range(2, 9)))
    record_rows = _table_rows(path[kapture.RecordsCamera], 3)
    _check_numbers(path[kapture.RecordsCamera], record_rows, integer=(0,), real=())
    has_rigs = path[kapture.Rigs].is_file()
    rig_rows = _table_rows(path[kapture.Rigs], 9) if has_rigs else []
    _check_numbers(path[kapture.Rigs], rig_rows, integer=(), real=tuple(range(2, 9)))

    def read(kind, reader):
        try:
            return reader(str(path[kind]))
        except (ValueError, AssertionError, KeyError, TypeError) as e:
            raise ConversionError(f"kapture cannot read {str(path[kind])!r}: {type(e).__name__}: {e}") from e

    sensors = read(kapture.Sensors, kcsv.sensors_from_file)
    rigs = read(kapture.Rigs, kcsv.rigs_from_file) if has_rigs else kapture.Rigs()
    trajectories = read(kapture.Trajectories, kcsv.trajectories_from_file)
    records = read(kapture.RecordsCamera, kcsv.records_camera_from_file)

    cameras = {sid for sid, sensor in sensors.items() if sensor.sensor_type == "camera"}
    declared = f"declared in {str(path[kapture.Sensors])!r}"
    for number, (rig_id, sensor_id, *_) in rig_rows:
        if sensor_id not in sensors and sensor_id not in rigs:
            raise ConversionError(f"{path[kapture.Rigs]}:{number}: rig {rig_id!r} holds sensor "
                                  f"{sensor_id!r}, which is not {declared}.")
    for number, (_, device_id, *_) in trajectory_rows:
        if device_id not in sensors and device_id not in rigs:
            raise ConversionError(f"{path[kapture.Trajectories]}:{number}: device {device_id!r} is "
                                  f"neither a sensor {declared} nor a rig of rigs.txt.")
    first_line = {}
    for number, (timestamp, device_id, _) in record_rows:
        key = (int(timestamp), device_id)
        if key in first_line:
            raise ConversionError(f"{path[kapture.RecordsCamera]}:{number}: timestamp {timestamp} and "
                                  f"device {device_id!r} already name an image on line {first_line[key]}.")
        first_line[key] = number
        if device_id not in cameras:
            what = (f"a {sensors[device_id].sensor_type}, not a camera" if device_id in sensors
                    else "not a sensor")
            raise ConversionError(
                f"{path[kapture.RecordsCamera]}:{number}: device {device_id!r} is {what} {declared}.")

    kapture.rigs_remove_inplace(trajectories, rigs)

    files, origins, devices, timestamps, quaternions, translations = [], [], [], [], [], []
    unposed = []
    for number, (timestamp, device_id, _) in record_rows:
        key = (int(timestamp), device_id)
        image_path = records[key]
        pose = trajectories[key] if key in trajectories else None
        if pose is None or pose.r is None or pose.t is None:
            unposed.append(f"{path[kapture.RecordsCamera]}:{number} ({image_path}, "
                           f"timestamp {timestamp}, device {device_id})")
            continue
        image_file = Path(krecords.get_image_fullpath(str(kapture_dir), image_path))
        if not image_file.is_file():
            raise ConversionError(f"{path[kapture.RecordsCamera]}:{number}: image file "
                                  f"{str(image_file)!r} does not exist.")
        files.append(image_file)
        origins.append(image_path)
        devices.append(device_id)
        timestamps.append(timestamp)
        quaternions.append(pose.r)
        translations.append(np.asarray(pose.t, dtype=np.float64).reshape(3))
    if unposed:
        raise ConversionError(
            f"{len(unposed)} image(s) have no pose in {str(path[kapture.Trajectories])!r} (directly or "
            "through a rig of rigs.txt), e.g. " + "; ".join(unposed[:5])
        )
    if not files:
        raise ConversionError(f"{str(path[kapture.RecordsCamera])!r} lists no images.")
    rotations = quaternion.as_rotation_matrix(np.array(quaternions))  # world→camera, normalised
    translations = np.stack(translations)
    centres = -np.einsum("nji,nj->ni", rotations, translations)  # C = −Rᵀ t
    return PosedImages(files, origins, devices, timestamps, rotations, centres)


def convert(mapping: str | os.PathLike, validation: str | os.PathLike, out: str | os.PathLike,
            link: bool = False, vertical_axis: str = "") -> dict:
    """kapture ``mapping`` → ``out/database``, ``validation`` → ``out/queries``; returns the summary."""
    database = read_kapture_split(mapping)
    queries = read_kapture_split(validation)
    source = f"kapture trajectories {str(Path(mapping))!r} + {str(Path(validation))!r}"
    return write_layout(out, database, queries, link, source, vertical_axis,
                        extra={"database_from": str(mapping), "queries_from": str(validation)})


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m jaxvpr.data.kapture",
        description="Convert a NAVER LABS kapture scene (mapping → database, validation → queries) to "
                    "the community '@' layout with metric coordinates.",
    )
    parser.add_argument("--scene-root", help="a scene's release folder, e.g. GangnamStation/B2/release "
                        "(implies --mapping ROOT/mapping --validation ROOT/validation)")
    parser.add_argument("--mapping", help="kapture folder of release/mapping (the database)")
    parser.add_argument("--validation", help="kapture folder of release/validation (the queries)")
    parser.add_argument("--out", required=True,
                        help="output folder: OUT/database, OUT/queries, OUT/conversion.json")
    parser.add_argument("--link", action="store_true", help="hard-link the images instead of copying them")
    parser.add_argument("--vertical-axis", choices=list(AXES), default="",
                        help="the vertical world axis, when it cannot be found from the camera centres")
    args = parser.parse_args(argv)
    mapping, validation = args.mapping, args.validation
    if args.scene_root:
        mapping = mapping or os.path.join(args.scene_root, "mapping")
        validation = validation or os.path.join(args.scene_root, "validation")
    if not (mapping and validation):
        parser.error("give --scene-root, or both --mapping and --validation")
    summary = convert(mapping, validation, args.out, link=args.link, vertical_axis=args.vertical_axis)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
