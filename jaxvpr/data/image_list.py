"""Image lists for folders of SF-XL's size: :class:`PathList` and the cached list-file reader.

A folder's image list comes from ``<folder>_images_paths.txt`` beside it when that file exists (one
path per line, relative to the folder: SF-XL has 41M images and a directory walk would take hours).
Geotags are kept as numpy columns and paths as one byte buffer with offsets (:class:`PathList`), not
as one Python object per image, so a 41M-image folder fits in memory and is not copied into every
Grain worker. A list file is parsed with numpy (:func:`read_image_list`) and its paths and geotags
are cached in one file beside it (or in the user's cache folder when the dataset is read-only), used
again while the list is unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import logging
import operator
import os
import socket
import struct
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxvpr.data.names import DatasetError, ImageNameError, _geotags_of_name, _parse_lines, _PARSE_ROWS

logger = logging.getLogger(__name__)


def _geotags_of_path_list(paths: PathList):
    """``(utm, heading, error)`` of all paths, block by block; ``error`` as in :func:`_parse_lines`."""
    utms, headings = [np.empty((0, 2))], [np.empty(0)]
    for lo in range(0, len(paths), _PARSE_ROWS):
        hi = min(len(paths), lo + _PARSE_ROWS)
        chars, starts, ends = paths._rows_bytes(lo, hi)
        utm, heading, error = _parse_lines(chars, starts, ends, lambda row: paths[lo + row])
        if error is not None:
            return None, None, (lo + error[0], error[1])
        utms.append(utm)
        headings.append(heading)
    return np.concatenate(utms), np.concatenate(headings), None


def parse_geotags(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The geotags of many names (a list or a :class:`PathList`): only (east, north) in metres and heading in degrees.

    Returns ``utm`` float64 (N, 2) and ``heading`` float64 (N,), NaN where the heading field is empty.
    Headings are wrapped into [0, 360). Vectorised over the names' bytes (a :class:`PathList`); equal
    bit for bit to :func:`parse_geotags_slow`, and a malformed name raises the same
    :class:`ImageNameError` (the first one in list order).
    """
    utm, heading, error = _geotags_of_path_list(PathList.of(paths))
    if error is not None:
        raise error[1]
    return utm, heading


class PathList(Sequence):
    """Paths (str) kept as one UTF-8 byte buffer and int64 offsets, for lists of SF-XL's size.

    41M paths as a list of str cost ~70 B each beyond their characters (~3 GB), and that again in
    every Grain worker process; here they cost their bytes plus 8 B each. Path i is
    ``data[offsets[i]:offsets[i + 1] - 1]`` (each path is followed by one separator byte, "\\n"; the
    last one's may be missing), joined to ``root`` (``os.path.join``) when a root is set
    (:meth:`ImageFolder.abs_paths`). It reads like a list of str: ``len``, indexing (numpy ints too),
    slicing (a view), iteration, ``==`` against any sequence of str, ``+`` (which gives a list).
    Pickled (to Grain workers) as the two arrays, or, when they are mapped from an image-list cache
    file, as the file's name: workers then map the same file and share its pages.

    >>> p = PathList.from_strings(["a/@1@2@.jpg", "@3@4@.jpg"])
    >>> (len(p), p[1], p.with_root("/data")[0], p == ["a/@1@2@.jpg", "@3@4@.jpg"])
    (2, '@3@4@.jpg', '/data/a/@1@2@.jpg', True)
    """

    __slots__ = ("_data", "_offsets", "_root", "_mapped")
    __hash__ = None  # equality as a list's

    def __init__(self, data, offsets, root: str | None = None, _mapped=None):
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = np.frombuffer(data, np.uint8)
        self._data, self._offsets = data, np.asarray(offsets, np.int64)
        if data.dtype != np.uint8 or data.ndim != 1 or self._offsets.ndim != 1 or len(self._offsets) < 1:
            raise ValueError("PathList(data, offsets): data must be 1-D uint8 and offsets 1-D int64 of N + 1 values.")
        self._root = root
        self._mapped = _mapped  # (cache file reference, first row) when mapped from a cache file

    @classmethod
    def from_strings(cls, strings: Sequence[str], root: str | None = None) -> PathList:
        encoded = [os.fspath(s).encode("utf-8", "surrogateescape") for s in strings]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)) + 1, out=offsets[1:])
        return cls(b"\n".join(encoded), offsets, root)

    @classmethod
    def of(cls, paths: Sequence[str]) -> PathList:
        """``paths`` if it is a PathList, else a PathList of the same strings."""
        return paths if isinstance(paths, PathList) else cls.from_strings(paths)

    @property
    def root(self) -> str | None:
        return self._root

    def with_root(self, root: str | None) -> PathList:
        """The same paths joined to ``root`` (the buffers are shared)."""
        return PathList(self._data, self._offsets, root, self._mapped)

    @property
    def nbytes(self) -> int:
        """Bytes held for these paths: their characters and separators, and the offsets."""
        return int(self._offsets[-1] - self._offsets[0]) + self._offsets.nbytes

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def _decode(self, raw: bytes) -> str:
        text = raw.decode("utf-8", "surrogateescape")
        return text if self._root is None else os.path.join(self._root, text)

    def __getitem__(self, i):
        n = len(self)
        if isinstance(i, slice):
            start, stop, step = i.indices(n)
            if step != 1:
                return PathList.from_strings([self[k] for k in range(start, stop, step)])
            stop = max(start, stop)
            mapped = None if self._mapped is None else (self._mapped[0], self._mapped[1] + start)
            return PathList(self._data, self._offsets[start:stop + 1], self._root, mapped)
        i = operator.index(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"PathList index {i} out of range ({n} paths)")
        return self._decode(self._data[self._offsets[i]:self._offsets[i + 1] - 1].tobytes())

    def __iter__(self):
        n, block = len(self), 1 << 16
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            names = self._data[self._offsets[lo]:self._offsets[hi]].tobytes().split(b"\n")
            if self._offsets[hi] <= len(self._data):
                names.pop()  # after the last separator
            if len(names) != hi - lo:
                yield from (self[k] for k in range(lo, hi))  # a path holding "\n" (from_strings only)
            else:
                yield from map(self._decode, names[:hi - lo])

    def __eq__(self, other) -> bool:
        if isinstance(other, (str, bytes)) or not isinstance(other, (Sequence, np.ndarray)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __add__(self, other) -> list[str]:
        return list(self) + list(other)

    def __radd__(self, other) -> list[str]:
        return list(other) + list(self)

    def __repr__(self) -> str:
        shown = [repr(p) for p in self[:3]] + ([] if len(self) <= 3 else ["...", repr(self[-1])])
        return f"PathList({len(self)} paths: [{', '.join(shown)}])"

    def _rows_bytes(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows [lo, hi) as (buffer, starts, ends), positions in the buffer (the paths without root)."""
        a = self._offsets[lo]
        return self._data[a:self._offsets[hi]], self._offsets[lo:hi] - a, self._offsets[lo + 1:hi + 1] - 1 - a

    def __reduce__(self):
        if self._mapped is not None:
            return _mapped_path_list, (self._mapped[0], self._mapped[1], len(self), self._root)
        a, b = int(self._offsets[0]), int(self._offsets[-1])
        return PathList, (self._data[a:min(b, len(self._data))], self._offsets - a, self._root)


# ----------------------------------------------------------------------------- image lists
# A list file is read in blocks of whole lines. A block of plain lines (printable ASCII, "\n" line
# ends, no blank lines, no spaces around a path) is split with numpy; any other list is read by the
# general reader (str.splitlines and str.strip of the UTF-8 text), which gives the same paths.
_LIST_BLOCK_BYTES = 64 << 20


class _NotPlain(Exception):
    """The list needs the general reader."""


class _SinkFailed(Exception):
    """The cache could not be written (read-only folder, disk full): try the next place, or memory."""


def _read_error(list_file: Path, error: Exception) -> DatasetError:
    return DatasetError(f"Cannot read the image list {str(list_file)!r}: {error}")


def _parse_plain_list(list_file: Path, sink):
    """Streams a plain list into ``sink`` (its bytes; each path followed by "\\n") and parses its
    geotags block by block until the first malformed name. Returns ``(offsets, utms, headings,
    error)``: lists of per-block arrays (offsets with the final end) and ``(row, ImageNameError)``."""
    offsets, utms, headings, error = [], [], [], None
    total_bytes, rows, kept = 0, 0, 0  # kept: bytes of an unfinished line at the buffer's front
    buffer = bytearray(_LIST_BLOCK_BYTES)
    try:
        f = open(list_file, "rb")
    except OSError as e:
        raise _read_error(list_file, e) from e
    with f:
        while True:
            if kept == len(buffer):  # a line longer than the buffer
                buffer = buffer + bytes(len(buffer))
            try:
                got = f.readinto(memoryview(buffer)[kept:])
            except OSError as e:
                raise _read_error(list_file, e) from e
            size = kept + got
            if got == 0:  # the end: what is kept is a last line without "\n"
                if size == 0:
                    break
                if size == len(buffer):
                    buffer = buffer + b"\n"
                buffer[size] = ord("\n")
                size = cut = size + 1
            else:
                cut = buffer.rfind(b"\n", 0, size) + 1
                if cut == 0:
                    kept = size
                    continue
            lines = memoryview(buffer)[:cut]
            chars = np.frombuffer(lines, np.uint8)
            ends = np.flatnonzero(chars < 32)  # line ends, if the only control character is "\n"
            starts = np.empty_like(ends)
            starts[0], starts[1:] = 0, ends[:-1] + 1
            if (np.any(chars[ends] != ord("\n")) or chars.max() > 127 or np.any(ends == starts)
                    or np.any(chars[starts] == ord(" ")) or np.any(chars[ends - 1] == ord(" "))):
                raise _NotPlain()
            if error is None:
                utm, heading, error = _parse_lines(
                    chars, starts, ends, lambda row: bytes(lines[starts[row]:ends[row]]).decode("ascii"))
                if error is not None:
                    error = (rows + error[0], error[1])
                utms.append(utm)
                headings.append(heading)
            offsets.append(starts + total_bytes)
            sink.write(lines)
            total_bytes += cut
            rows += len(starts)
            del chars, lines
            kept = size - cut
            buffer[:kept] = buffer[cut:size]
    offsets.append(np.array([total_bytes], np.int64))
    return offsets, utms, headings, error


def _read_general_list(list_file: Path) -> PathList:
    """Any list: UTF-8 text, one path per line (any line break), surrounding whitespace and blank lines dropped."""
    try:
        text = list_file.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _read_error(list_file, e) from e
    return PathList.from_strings([line.strip() for line in text.splitlines() if line.strip()])


# The image-list cache: one file, written under a temporary name and renamed when whole. Layout:
# [paths: the list's paths, each followed by "\n"] [offsets: int64 (N + 1,)] [utm: float64 (N, 2)]
# [heading: float64 (N,)] [JSON: the list's real path, its signature, N, the row of the first
# malformed name (then utm and heading are empty), each section's (start, bytes, CRC-32)]
# [uint64 little-endian: bytes of the JSON] [_CACHE_MAGIC]. Sections start at multiples of 64 bytes.
_CACHE_MAGIC = b"\njaxvpr image-list cache v1\n"
_CACHE_SUFFIX = ".jaxvpr-cache"
_SIGNATURE_BYTES = 1 << 20


def image_list_caches(list_file: str | os.PathLike) -> list[Path]:
    """Where the parsed list ``list_file`` is cached, in the order tried: beside it
    (``<folder>_images_paths.jaxvpr-cache``), else (a read-only dataset) in
    ``$JAXVPR_CACHE/image_lists/`` (default ``~/.cache/jaxvpr``) under a name keyed by its real path."""
    from jaxvpr.data.synthetic import default_cache_dir

    list_file = Path(list_file).resolve()
    key = hashlib.sha256(os.fsencode(list_file)).hexdigest()[:16]
    return [list_file.with_name(list_file.stem + _CACHE_SUFFIX),
            default_cache_dir() / "image_lists" / f"{list_file.stem}-{key}{_CACHE_SUFFIX}"]


def _list_signature(list_file: Path) -> dict:
    """Size, mtime (ns) and SHA-256 of the first and last MiB: a cache of another version is not used."""
    try:
        with open(list_file, "rb") as f:
            st = os.fstat(f.fileno())
            head = f.read(_SIGNATURE_BYTES)
            f.seek(max(0, st.st_size - _SIGNATURE_BYTES))
            tail = f.read(_SIGNATURE_BYTES)
    except OSError as e:
        raise _read_error(list_file, e) from e
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_tail_sha256": hashlib.sha256(head + tail).hexdigest()}


def _crc_of_range(f, start: int, nbytes: int) -> int:
    crc, buffer = 0, bytearray(min(nbytes, 16 << 20))
    f.seek(start)
    while nbytes > 0:
        got = f.readinto(memoryview(buffer)[:min(nbytes, len(buffer))])
        if not got:
            raise ValueError("the file ends inside a section")
        crc = zlib.crc32(memoryview(buffer)[:got], crc)
        nbytes -= got
    return crc


def _read_section(f, section: list[int], shape: tuple[int, ...]) -> np.ndarray:
    start, nbytes, crc = section
    out = np.empty(shape, np.float64)
    f.seek(start)
    if (out.nbytes and f.readinto(memoryview(out).cast("B")) != nbytes) or zlib.crc32(out) != crc:
        raise ValueError("a geotag section is cut short or its checksum differs")
    return out


def _map_sections(f, ref) -> PathList:
    paths_start, paths_bytes, offsets_start, count = ref[4:]
    data = np.memmap(f, np.uint8, "r", offset=paths_start, shape=(paths_bytes,)).view(np.ndarray)
    offsets = np.memmap(f, np.int64, "r", offset=offsets_start, shape=(count + 1,)).view(np.ndarray)
    return PathList(data, offsets, None, (ref, 0))


def _open_cache(path: Path, list_file: Path, signature: dict, verify: bool = True):
    """``(paths, utm, heading, error)`` from the cache file ``path`` when it is whole (checksums), of
    this list and of this version of it; else None (a damaged file is logged). Paths are mapped."""
    try:
        f = open(path, "rb")
    except OSError:
        return None
    with f:
        try:
            st = os.fstat(f.fileno())
            end = st.st_size - len(_CACHE_MAGIC) - 8
            if end < 0:
                raise ValueError("shorter than its end marker")
            f.seek(end)
            tail = f.read()
            if tail[8:] != _CACHE_MAGIC:
                raise ValueError("no end marker (cut short?)")
            meta_bytes = struct.unpack("<Q", tail[:8])[0]
            if meta_bytes > end:
                raise ValueError("bad header length")
            f.seek(end - meta_bytes)
            meta = json.loads(f.read(meta_bytes))
            if meta["list_file"] != str(list_file.resolve()) or meta["signature"] != signature:
                logger.info("The image-list cache %s is of another version of %s: reading the list.", path, list_file)
                return None
            count, sections, bad_row = int(meta["count"]), meta["sections"], meta["error_row"]
            rows = count if bad_row is None else 0
            for name, nbytes in (("paths", None), ("offsets", 8 * (count + 1)), ("utm", 16 * rows), ("heading", 8 * rows)):
                start, size, _ = sections[name]
                if not 0 <= start <= start + size <= end - meta_bytes or nbytes not in (None, size):
                    raise ValueError(f"section {name} does not fit the file")
            if verify:
                for name in ("paths", "offsets"):
                    if _crc_of_range(f, *sections[name][:2]) != sections[name][2]:
                        raise ValueError(f"the checksum of section {name} differs")
            utm = _read_section(f, sections["utm"], (rows, 2))
            heading = _read_section(f, sections["heading"], (rows,))
            ref = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, sections["paths"][0], sections["paths"][1],
                   sections["offsets"][0], count)
            paths = _map_sections(f, ref)
            if count < 1 or paths._offsets[0] != 0 or paths._offsets[-1] != sections["paths"][1]:
                raise ValueError("its offsets do not span its paths")
            error = None
            if bad_row is not None:
                utm = heading = None
                try:
                    _geotags_of_name(paths[bad_row])
                except ImageNameError as e:
                    error = (bad_row, e)
                if error is None:
                    raise ValueError(f"row {bad_row} is recorded as malformed but is not")
        except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:  # (JSON errors are ValueErrors)
            logger.warning("Ignoring the damaged image-list cache %s (%s); it will be rewritten.", path, e)
            return None
    return paths, utm, heading, error


def _mapped_path_list(ref, first: int, count: int, root: str | None) -> PathList:
    """Unpickles a PathList mapped from a cache file (in a Grain worker): maps the same file."""
    path, ino, size, mtime_ns = ref[:4]
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if (st.st_ino, st.st_size, st.st_mtime_ns) != (ino, size, mtime_ns):
            raise DatasetError(f"The image-list cache {path!r} was replaced after the paths were read from it "
                               "(did its image list change?): start the run again.")
        paths = _map_sections(f, ref)
    return paths[first:first + count].with_root(root)


class _MemorySink:
    """Keeps the list's bytes in memory (no place could take a cache file)."""

    def __init__(self):
        self.buffer = bytearray()

    def write(self, data) -> None:
        self.buffer += data

    def reset(self) -> None:
        self.buffer = bytearray()

    def abort(self) -> None:
        self.buffer = bytearray()

    def finish(self, list_file, signature, offsets, utms, headings, error):
        paths = PathList(np.frombuffer(self.buffer, np.uint8), np.concatenate(offsets))
        if error is not None:
            return paths, None, None, error
        return paths, np.concatenate(utms), np.concatenate(headings), None


def _temp_prefix(path: Path, host: str, pid: int) -> str:
    return f"{path.name}.tmp-{host}-{pid}-"


def _remove_stale_temps(path: Path) -> None:
    """Deletes the temporary cache files of killed writers on this host (its pid no longer runs): a
    SIGKILL mid-write cannot clean up, the next writer does. Other hosts' files (a shared disk) are left."""
    host = socket.gethostname().replace("-", "_")
    for tmp in path.parent.glob(glob.escape(f"{path.name}.tmp-{host}-") + "*"):
        pid = tmp.name[len(f"{path.name}.tmp-{host}-"):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                tmp.unlink()
                logger.info("Removed %s, left by a killed image-list cache writer.", tmp)
        except OSError:
            pass  # it runs (as another user)


class _CacheSink:
    """Writes an image-list cache file under a temporary name (host and pid in it); ``finish`` renames
    it into place. Temporary files of killed writers are removed first (:func:`_remove_stale_temps`)."""

    def __init__(self, path: Path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temps(path)
            prefix = _temp_prefix(path, socket.gethostname().replace("-", "_"), os.getpid())
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix)
        except OSError as e:
            raise _SinkFailed(e) from e
        self.path, self.tmp, self.file = path, Path(tmp), os.fdopen(fd, "wb")
        self.size, self.crc = 0, 0

    def write(self, data) -> None:
        try:
            self.file.write(data)
        except OSError as e:
            raise _SinkFailed(e) from e
        self.size += memoryview(data).nbytes
        self.crc = zlib.crc32(data, self.crc)

    def reset(self) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.size, self.crc = 0, 0

    def abort(self) -> None:
        self.file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()

    def _section(self, parts) -> list[int]:
        self.write(b"\0" * (-self.size % 64))
        start, self.crc = self.size, 0
        for part in parts:
            self.write(memoryview(np.ascontiguousarray(part)).cast("B"))
        return [start, self.size - start, self.crc]

    def finish(self, list_file, signature, offsets, utms, headings, error):
        count = sum(map(len, offsets)) - 1
        if error is not None:
            utms, headings = [], []
        sections = {"paths": [0, self.size, self.crc]}
        sections["offsets"], sections["utm"], sections["heading"] = map(self._section, (offsets, utms, headings))
        meta = json.dumps({"list_file": str(list_file.resolve()), "signature": signature, "count": count,
                           "error_row": None if error is None else error[0], "sections": sections}).encode()
        self.write(meta + struct.pack("<Q", len(meta)) + _CACHE_MAGIC)
        try:
            self.file.close()
            os.chmod(self.tmp, 0o644)
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise _SinkFailed(e) from e
        del offsets[:], utms[:], headings[:]  # freed before the geotags are read back
        opened = _open_cache(self.path, list_file, signature, verify=False)
        if opened is None:
            raise _SinkFailed(f"{self.path} could not be read back")
        return opened


def _parse_list_into(list_file: Path, sink, signature: dict):
    """Reads ``list_file`` into ``sink``: ``(paths, utm, heading, error)`` (see :func:`read_image_list`)."""
    try:
        offsets, utms, headings, error = _parse_plain_list(list_file, sink)
    except _NotPlain:
        sink.reset()
        paths = _read_general_list(list_file)
        sink.write(paths._data)
        sink.write(b"\n")
        utm, heading, error = _geotags_of_path_list(paths)
        offsets, utms, headings = [paths._offsets], [utm], [heading]
        del paths
    if sum(map(len, offsets)) == 1:
        raise DatasetError(f"The image list {str(list_file)!r} is empty.")
    st = os.stat(list_file)
    if (st.st_size, st.st_mtime_ns) != (signature["size"], signature["mtime_ns"]):
        raise DatasetError(f"The image list {str(list_file)!r} changed while it was read; read it again.")
    return sink.finish(list_file, signature, offsets, utms, headings, error)


def read_image_list(list_file: str | os.PathLike):
    """The paths and geotags of an image list file (``<folder>_images_paths.txt``), cached.

    Returns ``(paths, utm, heading, error)``: a :class:`PathList` of the paths as listed (blank
    lines and surrounding whitespace dropped), the geotags as :func:`parse_geotags` gives them, and
    ``error``, None or ``(row, ImageNameError)`` of the first malformed name (``utm`` and ``heading``
    are then None; a list of names without geotags still gives its paths).

    The result is cached in one file (:func:`image_list_caches`: beside the list, else in the user's
    cache folder) written atomically after a parse, and used while the list's size, mtime and first
    and last MiB are unchanged and the file's checksums hold; a stale or damaged cache is read again
    and rewritten. The cached paths are memory-mapped, so worker processes share them. SF-XL's 41M
    paths: see BENCHMARKS.md, "Dataset lists at SF-XL scale".
    """
    list_file = Path(list_file)
    signature = _list_signature(list_file)
    places = image_list_caches(list_file)
    for place in places:
        cached = _open_cache(place, list_file, signature)
        if cached is not None:
            return cached
    for make_sink in [*(functools.partial(_CacheSink, place) for place in places), _MemorySink]:
        try:
            sink = make_sink()
        except _SinkFailed as e:
            logger.info("Cannot write an image-list cache there (%s).", e)
            continue
        try:
            return _parse_list_into(list_file, sink, signature)
        except _SinkFailed as e:
            logger.warning("Writing the image-list cache %s failed (%s).", sink.path, e)
            sink.abort()
        except BaseException:
            sink.abort()
            raise
    raise AssertionError("unreachable: the memory sink does not fail")
