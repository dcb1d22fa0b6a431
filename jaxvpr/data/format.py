"""The community dataset format of visual place recognition (SF-XL, Tokyo 24/7, Pitts30k, MSLS, SVOX, ...).

A dataset split is a folder holding a ``database/`` folder and one or more query folders::

    <root>/images/{train,val,test}/{database,queries,queries_night,...}/

Every image name carries its geotag, fields separated by ``@``::

    @UTM_east@UTM_north@zone_number@zone_letter@lat@lon@pano_id@tile_num@heading@pitch@roll@height@timestamp@note@.jpg

Splitting on ``@`` gives ``["", east, north, zone_number, zone_letter, lat, lon, pano_id, tile_num,
heading, pitch, roll, height, timestamp, note, ".jpg"]``: field 1 is the UTM easting in metres,
field 2 the UTM northing in metres, field 9 the heading in degrees. Any field but east and north may
be empty.

A folder's image list comes from ``<folder>_images_paths.txt`` beside it when that file exists (one
path per line, relative to the folder: SF-XL has 41M images and a directory walk would take hours),
otherwise from a recursive walk, sorted. Only the first and the last listed files are checked when
the list is read (a stat per image of SF-XL would take as long as the walk); another missing file
is an unreadable image when it is decoded (see ``jaxvpr.evaluate`` for what evaluation does with
one). Geotags are kept as numpy columns, not as one Python object per image, so a 41M-image folder
fits in memory.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# Index of each field in ``name.split("@")``.
FIELDS = (
    "UTM_east", "UTM_north", "zone_number", "zone_letter", "lat", "lon", "pano_id", "tile_num",
    "heading", "pitch", "roll", "height", "timestamp", "note",
)
_FIELD_INDEX = {name: i + 1 for i, name in enumerate(FIELDS)}
_FLOAT_FIELDS = {"UTM_east", "UTM_north", "lat", "lon", "heading", "pitch", "roll", "height"}


class DatasetError(ValueError):
    """A dataset folder, list file or image name is not in the expected format."""


class ImageNameError(DatasetError):
    """An image file name that does not follow the ``@east@north@...@`` convention."""

    def __init__(self, path: str, field: str, reason: str):
        self.path, self.field = path, field
        super().__init__(
            f"Malformed image name {path!r}: field {field!r} {reason}. Expected "
            "'@UTM_east@UTM_north@zone_number@zone_letter@lat@lon@pano_id@tile_num@heading@pitch@roll"
            "@height@timestamp@note@.jpg' (UTM_east and UTM_north required, other fields may be empty)."
        )
        self.reason = reason

    def __reduce__(self):  # Keeps (path, field, reason) across processes (Grain workers).
        return (type(self), (self.path, self.field, self.reason))


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """All geotag fields of one image name. Numbers in metres (UTM, height) and degrees (angles)."""

    path: str
    utm_east: float
    utm_north: float
    zone_number: int | None = None
    zone_letter: str = ""
    lat: float | None = None
    lon: float | None = None
    pano_id: str = ""
    tile_num: str = ""
    heading: float | None = None
    pitch: float | None = None
    roll: float | None = None
    height: float | None = None
    timestamp: str = ""
    note: str = ""


def _split_fields(path: str) -> list[str]:
    name = os.path.basename(path)
    parts = name.split("@")
    if len(parts) < 4 or parts[0] != "":
        raise ImageNameError(path, "UTM_east", "is missing (the name must start with '@east@north@')")
    return parts


def _float_field(path: str, parts: list[str], field: str, required: bool) -> float | None:
    index = _FIELD_INDEX[field]
    value = parts[index] if index < len(parts) - 1 else ""
    if value == "":
        if required:
            raise ImageNameError(path, field, "is empty")
        return None
    try:
        number = float(value)
    except ValueError:
        raise ImageNameError(path, field, f"is {value!r}, not a number") from None
    if not np.isfinite(number):
        raise ImageNameError(path, field, f"is {value!r}, not a finite number")
    return number


def parse_image_name(path: str) -> ImageRecord:
    """Parses every geotag field of an image name (a bare name or a path).

    >>> r = parse_image_name("@0543256.96@4178906.83@10@S@37.75@-122.51@pano@@270@@@@2017@@.jpg")
    >>> (r.utm_east, r.utm_north, r.zone_number, r.heading)
    (543256.96, 4178906.83, 10, 270.0)
    """
    parts = _split_fields(path)

    def text(field: str) -> str:
        index = _FIELD_INDEX[field]
        return parts[index] if index < len(parts) - 1 else ""

    zone = text("zone_number")
    if zone and not zone.isdigit():
        raise ImageNameError(path, "zone_number", f"is {zone!r}, not an integer")
    floats = {
        f: _float_field(path, parts, f, required=f in ("UTM_east", "UTM_north")) for f in _FLOAT_FIELDS
    }
    return ImageRecord(
        path=path,
        utm_east=floats["UTM_east"],
        utm_north=floats["UTM_north"],
        zone_number=int(zone) if zone else None,
        zone_letter=text("zone_letter"),
        lat=floats["lat"],
        lon=floats["lon"],
        pano_id=text("pano_id"),
        tile_num=text("tile_num"),
        heading=floats["heading"],
        pitch=floats["pitch"],
        roll=floats["roll"],
        height=floats["height"],
        timestamp=text("timestamp"),
        note=text("note"),
    )


def parse_geotags(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Fast path for large folders: only (east, north) in metres and heading in degrees.

    Returns ``utm`` float64 (N, 2) and ``heading`` float64 (N,), NaN where the heading field is empty.
    Headings are wrapped into [0, 360).
    """
    utm = np.empty((len(paths), 2), dtype=np.float64)
    heading = np.full(len(paths), np.nan, dtype=np.float64)
    for i, path in enumerate(paths):
        parts = _split_fields(path)
        utm[i, 0] = _float_field(path, parts, "UTM_east", required=True)
        utm[i, 1] = _float_field(path, parts, "UTM_north", required=True)
        h = _float_field(path, parts, "heading", required=False)
        if h is not None:
            heading[i] = h % 360.0
    return utm, heading


def images_paths_file(folder: str | os.PathLike) -> Path:
    """The list file that, when present, replaces the directory walk: ``<folder>_images_paths.txt``."""
    folder = Path(folder)
    return folder.parent / f"{folder.name}_images_paths.txt"


def list_images(folder: str | os.PathLike, use_paths_file: bool = True) -> list[str]:
    """Relative paths of the images of ``folder``: from its list file if present, else a sorted walk."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"Image folder {str(folder)!r} does not exist (or is not a folder).")
    if _is_packed(folder):  # records in shards, no files to list
        from jaxvpr.data import pack

        raise pack.not_files_error(folder)
    list_file = images_paths_file(folder)
    if use_paths_file and list_file.exists():
        try:
            lines = list_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"Cannot read the image list {str(list_file)!r}: {e}") from e
        paths = [line.strip() for line in lines if line.strip()]
        if not paths:
            raise DatasetError(f"The image list {str(list_file)!r} is empty.")
        for p in (paths[0], paths[-1]):  # sanity check: the list belongs to this folder
            if not (folder / p).exists():
                raise DatasetError(
                    f"The image list {str(list_file)!r} names {p!r}, which is not in {str(folder)!r}. "
                    "Paths in the list must be relative to the folder; delete the list to walk the folder."
                )
        return paths
    paths = []

    def unreadable(error: OSError):
        raise DatasetError(f"Cannot read the image folder {str(error.filename)!r}: {error.strerror}. "
                           "Check its permissions (the user running jaxvpr must be able to list it).")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, folder)
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(name if rel == "." else os.path.join(rel, name))
    if not paths:
        raise DatasetError(
            f"Image folder {str(folder)!r} contains no images ({', '.join(IMAGE_EXTENSIONS)})."
        )
    return sorted(paths)


@dataclasses.dataclass
class ImageFolder:
    """The images of one folder (a database or a queries folder) with their geotags as columns.

    Attributes:
      root: the folder.
      paths: image paths relative to ``root``, in list-file or sorted order (row order everywhere).
      utm: float64 (N, 2) UTM (east, north) in metres.
      heading: float64 (N,) heading in degrees in [0, 360); NaN where the name has none.
    """

    root: Path
    paths: list[str]
    utm: np.ndarray
    heading: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def abs_paths(self) -> list[str]:
        root = str(self.root)
        return [os.path.join(root, p) for p in self.paths]

    def record(self, i: int) -> ImageRecord:
        return parse_image_name(os.path.join(str(self.root), self.paths[i]))


def read_image_folder(folder: str | os.PathLike, use_paths_file: bool = True) -> ImageFolder:
    """Lists and geotags the images of a folder. Errors name the folder, list file or image.

    A packed folder (``python -m jaxvpr.data.pack``) gives a ``pack.PackedImageFolder``: the same
    paths and geotags as its source folder, and images read from its shards."""
    folder = Path(folder)
    if _is_packed(folder):
        from jaxvpr.data import pack

        return pack.read_packed(folder)
    paths = list_images(folder, use_paths_file=use_paths_file)
    try:
        utm, heading = parse_geotags(paths)
    except ImageNameError as e:  # the name is relative to the folder: say which folder
        raise ImageNameError(os.path.join(str(folder), e.path), e.field, e.reason) from None
    return ImageFolder(root=folder, paths=paths, utm=utm, heading=heading)


def _is_packed(folder: Path) -> bool:
    """Whether ``folder`` is a packed folder (``jaxvpr.data.pack``), detected by its index file."""
    if not (folder / "index.json").is_file():
        return False
    from jaxvpr.data import pack

    return pack.is_packed(folder)


@dataclasses.dataclass
class SplitDataset:
    """A database folder and a queries folder of one split (e.g. ``images/test`` + ``queries_night``)."""

    name: str
    database: ImageFolder
    queries: ImageFolder


def read_split(split_dir: str | os.PathLike, queries: str = "queries", database: str = "database",
               use_paths_file: bool = True) -> SplitDataset:
    """Reads ``<split_dir>/<database>`` and ``<split_dir>/<queries>``.

    ``split_dir`` is the folder that holds ``database/`` and the queries folder, e.g.
    ``/data/tokyo247/images/test``.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DatasetError(
            f"Dataset split folder {str(split_dir)!r} does not exist. It must hold '{database}/' and "
            f"'{queries}/' (community layout <root>/images/<split>/{{database,queries}}/)."
        )
    for sub in (database, queries):
        if not (split_dir / sub).is_dir():
            present = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
            raise DatasetError(
                f"Folder {str(split_dir / sub)!r} does not exist; {str(split_dir)!r} holds {present}."
            )
    name = f"{split_dir.parent.parent.name}/{split_dir.name}" if split_dir.parent.name == "images" else split_dir.name
    return SplitDataset(
        name=name,
        database=read_image_folder(split_dir / database, use_paths_file),
        queries=read_image_folder(split_dir / queries, use_paths_file),
    )


def aggregate_utm(utms: list[np.ndarray], offset_m: float = 1e5) -> list[np.ndarray]:
    """Shifts the easting of dataset k by k * offset_m metres so no positive crosses datasets (SPEC §1)."""
    shifted = []
    for k, utm in enumerate(utms):
        utm = np.array(utm, dtype=np.float64, copy=True)
        utm[:, 0] += k * offset_m
        shifted.append(utm)
    return shifted


def dataset_root(root: str = "", synthetic_preset: str = "", synthetic_seed: int = 0,
                 synthetic_domains: str = "") -> Path:
    """The dataset root: ``root``, else ``$JAXVPR_DATA``, else the synthetic city of ``synthetic_preset``
    (generated on first use, see ``jaxvpr.data.synthetic.ensure_city``); a preset named ``indoor_*``
    gives the synthetic indoor floors instead (``jaxvpr.data.synthetic_indoor.ensure_indoor``: one
    ``<root>/<floor>/{database,queries}`` dataset per floor). ``synthetic_domains`` ("" = all) names the
    street city's target domains the run needs; the others are rendered only when asked for."""
    root = root or os.environ.get("JAXVPR_DATA", "")
    if root:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise DatasetError(f"Dataset root {str(path)!r} (config.data.root or $JAXVPR_DATA) does not exist.")
        return path
    if synthetic_preset.startswith("indoor_"):
        from jaxvpr.data.synthetic_indoor import ensure_indoor

        return Path(ensure_indoor(preset=synthetic_preset, seed=synthetic_seed))
    if synthetic_preset:
        from jaxvpr.data.synthetic import ensure_city

        return Path(ensure_city(preset=synthetic_preset, seed=synthetic_seed, domains=synthetic_domains or None))
    raise DatasetError(
        "No dataset: set config.data.root (or $JAXVPR_DATA) to a folder in the community layout, or "
        "config.data.synthetic_preset=small to use the synthetic city."
    )


def resolve_folder(root: str | os.PathLike, folder: str, what: str) -> Path:
    """``folder`` (absolute, or relative to ``root``), which must exist; the error says how to get it."""
    path = Path(folder).expanduser()
    path = path if path.is_absolute() else Path(root) / path
    if not path.is_dir():
        raise DatasetError(
            f"{what} folder {str(path)!r} does not exist (dataset root {str(root)!r}). Download the dataset "
            "and convert it to the community layout (see README, 'Datasets': SF-XL comes from the CosPlace "
            "authors on request; the VG benchmark's scripts download and convert Pitts30k, MSLS, SVOX, "
            "Tokyo 24/7), then point config.data.root or $JAXVPR_DATA at the folder holding it."
        )
    return path
