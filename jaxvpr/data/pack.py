"""Packed image folders: a folder's image files as ArrayRecord shards that the pipelines read by row.

    python -m jaxvpr.data.pack SRC_FOLDER OUT_DIR [--shards N | --shard-size-mb M] [--workers K] [--overwrite]

At SF-XL's scale (41M JPEGs of ~30 KB) opening files one by one on a network disk or a bucket costs
more than decoding them; a few hundred shards read at random through Grain's
``ArrayRecordDataSource`` (one read per image, no open/stat per file) do not. Packing copies the
files' bytes and re-encodes nothing, so an image decoded from a packed folder is the one decoded
from its file, pixel for pixel (same decoder, same handling of truncated files:
:func:`jaxvpr.data.images.decode_image`).

OUT_DIR holds

* ``<name>-00000-of-000NN.array_record``, ... (``name``: the source folder's name, e.g.
  ``database``): the folder's images in row order (``format.list_images``: its
  ``_images_paths.txt`` order, else sorted) cut into contiguous runs, so record ``i`` of the shards
  taken in order is row ``i``. A record is the image's path relative to the folder and the file's
  bytes: a ``u32`` (little-endian) byte length of the UTF-8 path, the path, then the bytes. The
  shards are written with ``group_size:1`` (a record is read without its neighbours) and
  uncompressed (JPEG bytes do not compress).
* ``index.npz``: the rows' columns as ``format.read_image_folder`` gives them for the source folder:
  ``paths`` (the relative paths, UTF-8, NUL-separated, as uint8), ``utm`` float64 (N, 2) metres,
  ``heading`` float64 (N,) degrees in [0, 360), NaN where the name has none.
* ``index.json``: format name and version, the source folder, the shard files and their record
  counts. Written last: its presence makes OUT_DIR a packed folder.

Every file is written under a temporary name and renamed at the end: a failed pack leaves no
packed folder. ``format.read_image_folder(OUT_DIR)`` returns a :class:`PackedImageFolder` (an
``ImageFolder`` with the source's paths, utm and heading) whose ``abs_paths()`` is a
:class:`PackedImages`, which ``jaxvpr.data.pipeline`` takes wherever it takes image paths, so a
split of packed ``database/`` and ``queries/`` folders is read by ``format.read_split`` as usual.
Worker processes receive no image bytes and no path list: they open the shards themselves.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import io
import json
import os
import re
import struct
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxvpr import cli
from jaxvpr.data.format import DatasetError, ImageFolder, read_image_folder
from jaxvpr.data.images import CorruptImageError, ImageSource, decode_image, image_size

FORMAT = "jaxvpr.packed_images"
VERSION = 1
INDEX = "index.json"
COLUMNS = "index.npz"
SHARD_PATTERN = re.compile(r".+-\d{5}-of-\d{5}\.array_record")
WRITER_OPTIONS = "group_size:1,uncompressed"
DEFAULT_SHARD_SIZE_MB = 256.0
_LENGTH = struct.Struct("<I")


def shard_name(name: str, k: int, n: int) -> str:
    """``<name>-0000k-of-0000n.array_record``."""
    return f"{name}-{k:05d}-of-{n:05d}.array_record"


def encode_record(rel_path: str, data: bytes) -> bytes:
    """One record: u32 little-endian length of the UTF-8 path, the path, the file's bytes."""
    name = rel_path.encode("utf-8", "surrogateescape")
    return _LENGTH.pack(len(name)) + name + data


def decode_record(record: bytes) -> tuple[str, bytes]:
    """(relative path, file bytes) of a record (:func:`encode_record`); ValueError if malformed."""
    if len(record) < _LENGTH.size:
        raise ValueError(f"a record of {len(record)} bytes has no header")
    (length,) = _LENGTH.unpack_from(record)
    if _LENGTH.size + length > len(record):
        raise ValueError(f"the record's path length {length} exceeds its {len(record)} bytes")
    name = record[_LENGTH.size:_LENGTH.size + length].decode("utf-8", "surrogateescape")
    return name, record[_LENGTH.size + length:]


# ----------------------------------------------------------------------------- reading
def is_packed(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a packed folder: an ``index.json`` of this format."""
    index = Path(folder) / INDEX
    if not index.is_file():
        return False
    try:
        meta = json.loads(index.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def not_files_error(folder: str | os.PathLike) -> DatasetError:
    """The error of a command that needs image files and was given a packed folder."""
    try:
        source = json.loads((Path(folder) / INDEX).read_text()).get("source", "?")
    except (OSError, ValueError):
        source = "?"
    return DatasetError(f"{str(folder)!r} is a packed folder (python -m jaxvpr.data.pack): its images are records "
                        "in shards, not files, and this reads image files. Give it the folder it was packed from "
                        f"({source!r}); datasets read with format.read_image_folder / read_split take packed folders.")


@dataclasses.dataclass
class PackedImageFolder(ImageFolder):
    """An image folder packed into shards (module docstring). ``root`` is the packed folder,
    ``paths`` are relative to the source folder ``source``; ``abs_paths()`` gives the images
    (:class:`PackedImages`), not file paths."""

    source: str = ""
    shard_files: tuple[str, ...] = ()
    shard_records: tuple[int, ...] = ()

    def abs_paths(self) -> PackedImages:
        return PackedImages(self)


def read_packed(folder: str | os.PathLike) -> PackedImageFolder:
    """Reads a packed folder's index. Errors (a missing shard, an index that disagrees with itself,
    a newer format) name the file."""
    folder = Path(folder)
    index = folder / INDEX
    try:
        meta = json.loads(index.read_text())
        shard_files = tuple(str(s["file"]) for s in meta["shards"])
        shard_records = tuple(int(s["records"]) for s in meta["shards"])
        version, num_images, source = int(meta["version"]), int(meta["num_images"]), str(meta["source"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"Cannot read the packed folder's index {str(index)!r}: {type(e).__name__}: {e}. "
                           "Pack the folder again (python -m jaxvpr.data.pack SRC OUT --overwrite).") from e
    if version > VERSION:
        raise DatasetError(f"{str(index)!r} is format version {version}; this jaxvpr reads version {VERSION}. "
                           "Update jaxvpr or pack the folder again with this one.")
    for name in shard_files:
        if not (folder / name).is_file():
            raise DatasetError(f"Shard {str(folder / name)!r} listed in {str(index)!r} is missing. Copy the "
                               "whole packed folder, or pack the folder again.")
    columns = folder / COLUMNS
    try:
        with np.load(columns, allow_pickle=False) as z:
            blob, utm, heading = z["paths"], np.asarray(z["utm"], np.float64), np.asarray(z["heading"], np.float64)
        paths = blob.tobytes().decode("utf-8", "surrogateescape").split("\0")
    except (OSError, ValueError, KeyError) as e:
        raise DatasetError(f"Cannot read the packed folder's columns {str(columns)!r}: {type(e).__name__}: {e}. "
                           "Pack the folder again.") from e
    counts = {"index.json num_images": num_images, "sum of the shards' records": sum(shard_records),
              "paths": len(paths), "utm rows": len(utm), "heading rows": len(heading)}
    if len(set(counts.values())) != 1 or utm.shape != (num_images, 2):
        raise DatasetError(f"The packed folder {str(folder)!r} disagrees with itself ({counts}, utm shape "
                           f"{utm.shape}). Pack the folder again.")
    return PackedImageFolder(root=folder, paths=paths, utm=utm, heading=heading, source=source,
                             shard_files=shard_files, shard_records=shard_records)


class PackedImages(ImageSource):
    """The images of a packed folder by row: ``images[i]`` is ``<packed folder>/<relative path>``
    (a name for messages and logs, not a file), ``load(i)`` reads record i from its shard (Grain's
    ``ArrayRecordDataSource``, random access) and decodes it as ``load_image`` decodes the file.

    A corrupt image, or a record that cannot be read, raises :class:`CorruptImageError` naming the
    image, the record and shard, and the source file. Pickled (to Grain's worker processes) it
    carries the shard paths and its rows, not the path list, which a worker reads from
    ``index.npz`` only to name images in a message.
    """

    def __init__(self, folder: PackedImageFolder):
        import grain

        self.root = str(folder.root)
        self.source = folder.source
        self._paths: list[str] | None = folder.paths
        self._shards = tuple(os.path.join(self.root, f) for f in folder.shard_files)
        self._ends = np.cumsum(folder.shard_records)
        self._rows: range | np.ndarray = range(len(folder.paths))
        # "file[0:n]" instructions: no shard is opened until a record is read.
        self._data = grain.sources.ArrayRecordDataSource(
            [f"{s}[0:{n}]" for s, n in zip(self._shards, folder.shard_records)])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_paths"] = None
        return state

    def _view(self, rows) -> PackedImages:
        view = copy.copy(self)  # shares the data source and the path list
        view._rows = rows
        return view

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._view(self._rows[i])
        return self._name(int(self._rows[i]))

    def take(self, rows: Sequence[int]) -> PackedImages:
        rows = np.asarray(rows, np.int64).reshape(-1)
        if len(rows) and not (-len(self) <= rows.min() and rows.max() < len(self)):
            raise IndexError(f"PackedImages.take: rows outside [0, {len(self)}).")
        rows = rows % max(len(self), 1)
        if isinstance(self._rows, range):
            return self._view(self._rows.start + self._rows.step * rows)
        return self._view(self._rows[rows])

    def _name(self, row: int, rel: str | None = None) -> str:
        if rel is None:
            if self._paths is None:  # a worker process: read the list once, to name an image
                self._paths = read_packed(self.root).paths
            rel = self._paths[row]
        return os.path.join(self.root, rel)

    def _where(self, row: int) -> str:
        k = int(np.searchsorted(self._ends, row, side="right"))
        first = int(self._ends[k - 1]) if k else 0
        return f"record {row - first} of shard {os.path.basename(self._shards[k])!r}"

    def _read(self, row: int) -> tuple[str, bytes]:
        try:
            return decode_record(self._data[row])
        except (OSError, RuntimeError, ValueError) as e:  # a damaged or truncated shard
            raise CorruptImageError(
                self._name(row), f"{self._where(row)} cannot be read ({type(e).__name__}: {e}); the shard is "
                "damaged: pack the folder again") from e

    def load(self, i: int, truncated: str | None = None) -> np.ndarray:
        row = int(self._rows[i])
        rel, data = self._read(row)
        name = self._name(row, rel)
        try:
            return decode_image(data, name, truncated)
        except CorruptImageError as e:
            raise CorruptImageError(name, f"{self._where(row)}, packed from "
                                    f"{os.path.join(self.source, rel)!r}: {e.reason}") from e.__cause__

    def size(self, i: int) -> tuple[int, int] | None:
        try:
            _, data = self._read(int(self._rows[i]))
        except CorruptImageError:
            return None
        return image_size(io.BytesIO(data))


# ----------------------------------------------------------------------------- writing
def plan_shards(sizes: np.ndarray | None, num_images: int, shards: int | None = None,
                shard_size_mb: float | None = None) -> list[int]:
    """Records per shard: ``shards`` runs of near-equal counts (the first ``num_images % shards``
    one longer), or consecutive runs of about ``shard_size_mb`` MB of file bytes (``sizes``): image
    i goes to shard ``floor(bytes before i / shard size)``, renumbered without gaps (an image larger
    than a shard is a shard)."""
    if shards is not None:
        if not 1 <= shards <= num_images:
            raise ValueError(f"--shards {shards}: must be in [1, {num_images}] (the folder's images).")
        return [num_images // shards + (k < num_images % shards) for k in range(shards)]
    target = (DEFAULT_SHARD_SIZE_MB if shard_size_mb is None else shard_size_mb) * 2**20
    if not target > 0:
        raise ValueError(f"--shard-size-mb {shard_size_mb}: must be > 0.")
    starts = np.cumsum(sizes) - sizes
    _, counts = np.unique(starts // target, return_counts=True)
    return [int(c) for c in counts]


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError as e:
        raise _unreadable(path, e) from e


def _unreadable(path: str, error: OSError) -> DatasetError:
    return DatasetError(f"Cannot read image {path!r}: {error.strerror or error}. Fix or remove it (or drop it "
                        "from the folder's *_images_paths.txt list), then pack again.")


def _write_shard(folder: ImageFolder, lo: int, hi: int, path: Path, stop: threading.Event, bar) -> int:
    """Writes rows [lo, hi) of ``folder`` into the ArrayRecord file ``path``; returns the bytes read."""
    from array_record.python import array_record_module

    root, total = str(folder.root), 0
    writer = array_record_module.ArrayRecordWriter(str(path), WRITER_OPTIONS)
    try:
        for i in range(lo, hi):
            if stop.is_set():
                return total
            file = os.path.join(root, folder.paths[i])
            try:
                with open(file, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise _unreadable(file, e) from e
            writer.write(encode_record(folder.paths[i], data))
            total += len(data)
            bar.update(1)
    finally:
        ok = writer.ok()
        try:
            writer.close()  # flushes the last chunk and the footer
        except RuntimeError:
            ok = False
    if not ok:
        raise OSError(f"Writing the shard {str(path)!r} failed (disk full?).")
    return total


def _existing_pack(out: Path) -> list[Path]:
    """The files of a packed folder already in ``out``: its index files and shards."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name in (INDEX, COLUMNS) or SHARD_PATTERN.fullmatch(p.name))


def pack(src: str | os.PathLike, out_dir: str | os.PathLike, shards: int | None = None,
         shard_size_mb: float | None = None, workers: int = 4, overwrite: bool = False,
         progress: bool | None = None) -> PackedImageFolder:
    """Packs the image folder ``src`` into ``out_dir`` (module docstring) and returns it, read back.

    ``shards`` or ``shard_size_mb`` (default 256 MB of file bytes) sets the cut; ``workers``
    threads write shards in parallel (reading files is I/O); ``overwrite`` replaces a packed folder
    already in ``out_dir`` (it is refused otherwise). ``progress``: a progress bar on stderr
    (None: when stderr is a terminal).

    Raises:
      DatasetError: ``src`` missing, empty, already packed, or with a malformed name; an unreadable
        image (named); ``out_dir`` holding a packed folder without ``overwrite``.
    """
    from tqdm.auto import tqdm

    if shards is not None and shard_size_mb is not None:
        raise ValueError("Give --shards or --shard-size-mb, not both.")
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be >= 1.")
    src, out = Path(src), Path(out_dir)
    folder = read_image_folder(src)  # a missing or empty folder, a bad list or name: DatasetError
    if isinstance(folder, PackedImageFolder):
        raise DatasetError(f"{str(src)!r} is already a packed folder (packed from {folder.source!r}).")
    if out.exists() and out.resolve() == src.resolve():
        raise DatasetError(f"OUT_DIR {str(out)!r} is the image folder itself: choose another folder.")
    existing = _existing_pack(out)
    if existing and not overwrite:
        raise DatasetError(f"{str(out)!r} already holds a packed folder ({existing[0].name}, ...): pass "
                           "--overwrite to replace it, or choose another OUT_DIR.")
    name = src.resolve().name
    n = len(folder)
    abs_paths = folder.abs_paths()
    sizes = None
    if shards is None:  # cut by bytes: stat every file first (in chunks, on the threads)
        chunks = [abs_paths[i:i + 4096] for i in range(0, n, 4096)]
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            sizes = np.concatenate([np.asarray(s, np.int64) for s in
                                    pool.map(lambda chunk: [_file_size(p) for p in chunk], chunks)])
    counts = plan_shards(sizes, n, shards, shard_size_mb)
    ends = np.cumsum(counts)
    finals = [shard_name(name, k, len(counts)) for k in range(len(counts))]
    out.mkdir(parents=True, exist_ok=True)
    tmp = {f: out / f".{f}.tmp{os.getpid()}" for f in finals + [COLUMNS, INDEX]}
    stop = threading.Event()  # set on the first error: the other shards stop at their next image
    show = sys.stderr.isatty() if progress is None else progress
    try:
        with tqdm(total=n, unit="img", desc=f"packing {name}", disable=not show) as bar, \
                concurrent.futures.ThreadPoolExecutor(workers) as pool:
            try:
                jobs = [pool.submit(_write_shard, folder, int(end - count), int(end), tmp[f], stop, bar)
                        for f, count, end in zip(finals, counts, ends)]
                concurrent.futures.wait(jobs, return_when=concurrent.futures.FIRST_EXCEPTION)
                if any(job.done() and job.exception() for job in jobs):
                    stop.set()
                written = [job.result() for job in jobs]  # the first failed shard's error
            except BaseException:
                stop.set()
                raise
        with open(tmp[COLUMNS], "wb") as f:
            blob = "\0".join(folder.paths).encode("utf-8", "surrogateescape")
            np.savez(f, paths=np.frombuffer(blob, np.uint8), utm=folder.utm, heading=folder.heading)
        meta = {
            "format": FORMAT, "version": VERSION, "name": name, "source": str(src.resolve()), "num_images": n,
            "record": "u32 little-endian byte length of the UTF-8 relative path, the path, the file's bytes",
            "columns": COLUMNS,
            "shards": [{"file": f, "records": int(c), "bytes": int(b)} for f, c, b in zip(finals, counts, written)],
        }
        tmp[INDEX].write_text(json.dumps(meta, indent=1) + "\n")
        for old in sorted(existing, key=lambda p: p.name != INDEX):  # the old index first: no longer a pack
            old.unlink()
        for final, path in tmp.items():  # index.json last
            os.replace(path, out / final)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return read_packed(out)


@cli.command
def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m jaxvpr.data.pack", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", metavar="SRC_FOLDER", help="an image folder (a database or queries folder)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the packed folder to write (created if missing)")
    cut = parser.add_mutually_exclusive_group()
    cut.add_argument("--shards", type=int, default=None, help="number of shards")
    cut.add_argument("--shard-size-mb", type=float, default=None,
                     help=f"MB of image bytes per shard (default {DEFAULT_SHARD_SIZE_MB:g})")
    parser.add_argument("--workers", type=int, default=4, help="threads writing shards (default 4)")
    parser.add_argument("--overwrite", action="store_true", help="replace a packed folder already in OUT_DIR")
    args = parser.parse_args(argv)
    packed = pack(args.src, args.out_dir, args.shards, args.shard_size_mb, args.workers, args.overwrite)
    mb = sum(os.path.getsize(os.path.join(packed.root, f)) for f in packed.shard_files) / 2**20
    print(f"packed {len(packed)} images of {packed.source} into {len(packed.shard_files)} shards "
          f"({mb:.1f} MB) in {packed.root}")
    return 0


if __name__ == "__main__":
    # Run the importable module's main: its classes are the ones format.read_image_folder returns.
    from jaxvpr.data import pack as _module

    sys.exit(_module.main())
