"""The community dataset format of visual place recognition (SF-XL, Tokyo 24/7, Pitts30k, MSLS, SVOX, ...).

A dataset split is a folder holding a ``database/`` folder and one or more query folders::

    <root>/images/{train,val,test}/{database,queries,queries_night,...}/

Every image name carries its geotag (``@UTM_east@UTM_north@...@.jpg``; the fields and their parser
are in :mod:`jaxvpr.data.names`). A folder's image list comes from ``<folder>_images_paths.txt``
beside it when that file exists, read and cached by :mod:`jaxvpr.data.image_list`, otherwise from a
recursive walk, sorted. Only the first and the last listed files are checked when the list is read
(a stat per image of SF-XL would take as long as the walk); another missing file is an unreadable
image when it is decoded (see ``jaxvpr.evaluate`` for what evaluation does with one).

The names of :mod:`jaxvpr.data.names` and :mod:`jaxvpr.data.image_list` that other modules use are
also reachable from here (``fmt.DatasetError``, ``fmt.PathList``, ...).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from jaxvpr.data.images import FileImages
from jaxvpr.data.image_list import (PathList, _geotags_of_path_list, image_list_caches,  # noqa: F401
                                    parse_geotags, read_image_list)
from jaxvpr.data.names import (FIELDS, IMAGE_EXTENSIONS, DatasetError, ImageNameError,  # noqa: F401
                               ImageRecord, parse_geotags_slow, parse_image_name)

logger = logging.getLogger(__name__)


def images_paths_file(folder: str | os.PathLike) -> Path:
    """The list file that, when present, replaces the directory walk: ``<folder>_images_paths.txt``."""
    folder = Path(folder)
    return folder.parent / f"{folder.name}_images_paths.txt"


def _list_folder(folder: Path, use_paths_file: bool):
    """``(paths, geotags)``: the listed paths and ``(utm, heading, error)`` from the list file, or the
    walk's paths and None."""
    if not folder.is_dir():
        raise DatasetError(f"Image folder {str(folder)!r} does not exist (or is not a folder).")
    if _is_packed(folder):  # records in shards, no files to list
        from jaxvpr.data import pack

        raise pack.not_files_error(folder)
    list_file = images_paths_file(folder)
    if use_paths_file and list_file.exists():
        paths, utm, heading, error = read_image_list(list_file)
        for p in (paths[0], paths[-1]):  # sanity check: the list belongs to this folder
            if not (folder / p).exists():
                raise DatasetError(
                    f"The image list {str(list_file)!r} names {p!r}, which is not in {str(folder)!r}. "
                    "Paths in the list must be relative to the folder; delete the list to walk the folder."
                )
        return paths, (utm, heading, error)
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
    return PathList.from_strings(sorted(paths)), None


def list_images(folder: str | os.PathLike, use_paths_file: bool = True) -> PathList:
    """Relative paths of the images of ``folder``: from its list file if present (cached, see
    :func:`read_image_list`), else a sorted walk."""
    return _list_folder(Path(folder), use_paths_file)[0]


def folder_images(folder: str | os.PathLike):
    """``(images, names)`` of ``folder``, image files or a packed folder alike: an ``ImageSource``
    (``jaxvpr.data.images``) and the images' paths relative to the folder (for a packed folder, to
    the folder it was packed from), in the same order. Names are not parsed: the images need no geotag
    (e.g. an unlabeled target-domain pool)."""
    folder = Path(folder)
    if _is_packed(folder):
        from jaxvpr.data import pack

        packed = pack.read_packed(folder)
        return packed.abs_paths(), packed.paths
    names = list_images(folder)
    return FileImages([os.path.join(str(folder), p) for p in names]), names


@dataclasses.dataclass
class ImageFolder:
    """The images of one folder (a database or a queries folder) with their geotags as columns.

    Attributes:
      root: the folder.
      paths: image paths relative to ``root``, in list-file or sorted order (row order everywhere),
        a :class:`PathList` (a list of str given here is converted).
      utm: float64 (N, 2) UTM (east, north) in metres.
      heading: float64 (N,) heading in degrees in [0, 360); NaN where the name has none.
    """

    root: Path
    paths: PathList
    utm: np.ndarray
    heading: np.ndarray

    def __post_init__(self):
        self.paths = PathList.of(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def abs_paths(self) -> PathList:
        """The paths joined to ``root``; a :class:`PathList` sharing the buffers of ``paths``."""
        return self.paths.with_root(str(self.root))

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
    paths, geotags = _list_folder(folder, use_paths_file)
    utm, heading, error = _geotags_of_path_list(paths) if geotags is None else geotags
    if error is not None:  # the name is relative to the folder: say which folder
        e = error[1]
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
