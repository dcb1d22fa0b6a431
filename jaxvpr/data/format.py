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
one). Geotags are kept as numpy columns and paths as one byte buffer with offsets
(:class:`PathList`), not as one Python object per image, so a 41M-image folder fits in memory and
is not copied into every Grain worker. A list file is parsed with numpy (:func:`read_image_list`)
and its paths and geotags are cached in one file beside it (or in the user's cache folder when the
dataset is read-only), used again while the list is unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

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


def _geotags_of_name(path: str) -> tuple[float, float, float]:
    """(east, north, heading) of one name; the heading wrapped into [0, 360), NaN when empty."""
    parts = _split_fields(path)
    east = _float_field(path, parts, "UTM_east", required=True)
    north = _float_field(path, parts, "UTM_north", required=True)
    heading = _float_field(path, parts, "heading", required=False)
    return east, north, (np.nan if heading is None else heading % 360.0)


def parse_geotags_slow(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`parse_geotags` one name at a time with Python's ``float`` (the reference: 41M names take
    minutes). The vectorised parser hands every name it cannot read itself to the same per-name code."""
    utm = np.empty((len(paths), 2), dtype=np.float64)
    heading = np.full(len(paths), np.nan, dtype=np.float64)
    for i, path in enumerate(paths):
        utm[i, 0], utm[i, 1], heading[i] = _geotags_of_name(path)
    return utm, heading


def parse_geotags(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Fast path for large folders: only (east, north) in metres and heading in degrees.

    Returns ``utm`` float64 (N, 2) and ``heading`` float64 (N,), NaN where the heading field is empty.
    Headings are wrapped into [0, 360). Vectorised over the names' bytes (a :class:`PathList`); equal
    bit for bit to :func:`parse_geotags_slow`, and a malformed name raises the same
    :class:`ImageNameError` (the first one in list order).
    """
    utm, heading, error = _geotags_of_path_list(PathList.of(paths))
    if error is not None:
        raise error[1]
    return utm, heading


# Vectorised parsing. A field of 1 to 32 characters of [0-9.+-eE] is read here: "[+-]digits[.digits]"
# with at most 15 digits exactly as integer / 10**decimals (both exact in float64, so the quotient
# is the correctly rounded value, as Python's float gives; Clinger's fast path), any other (an
# exponent, more digits) by numpy's bytes -> float64 cast (correctly rounded too). Any other name (a
# missing field, spaces, "1_000", "inf", a number numpy rejects, a non-finite one) goes to the
# per-name parser, which gives its value or the precise error.
_PARSE_ROWS = 1 << 18  # rows per vectorised block of a PathList
_MAX_FIELD = 32
_NUMBER_BYTE = np.zeros(256, bool)
_NUMBER_BYTE[np.frombuffer(b"0123456789.+-eE", np.uint8)] = True
_POW10 = 10.0 ** np.arange(16)


def _field_floats(chars: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The numbers ``float(chars[lo[i]:hi[i]])`` and where they were read here (else 0)."""
    length = hi - lo
    good = (length >= 1) & (length <= _MAX_FIELD)
    width = int(length[good].max(initial=0))
    good &= hi >= width  # a window starts inside the buffer (else: the per-name parser)
    values = np.zeros(len(lo), np.float64)
    rows = np.flatnonzero(good)
    if len(rows) == 0:
        return values, good
    windows = np.lib.stride_tricks.sliding_window_view(chars, width)
    text = np.ascontiguousarray(windows[hi[rows] - width].T)  # (width, rows): each field right-aligned
    values[rows], read = _right_aligned_floats(text, length[rows])
    good[rows[~read]] = False
    return values, good


def _right_aligned_floats(text: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Numbers of the fields in ``text[:, i]`` (uint8 (width, N); field i fills its last ``length[i]``
    rows; ``text`` is overwritten) and which were read (finite numbers)."""
    width, m = text.shape
    pad = width - length
    if pad.any():
        text[np.arange(width)[:, None] < pad] = ord("0")  # leading zeros change no number
    digit = text - np.uint8(ord("0"))
    is_digit, is_dot = digit < 10, text == ord(".")
    first = text[pad, np.arange(m)]  # the field's first character
    n_digits, n_dots = is_digit.sum(axis=0), is_dot.sum(axis=0)
    simple = ((n_digits + n_dots + ((first == ord("+")) | (first == ord("-"))) == width)  # a sign only in front
              & (n_dots <= 1) & (n_digits - pad >= 1) & (n_digits - pad <= 15))
    decimals = np.where(simple & (n_dots == 1), width - 1 - is_dot.argmax(axis=0), 0)
    mantissa = np.zeros(m, np.float64)
    for c in range(width):  # Horner over the digits; exact below 2**53
        mantissa = np.where(is_digit[c], mantissa * 10 + digit[c], mantissa)
    numbers = mantissa / _POW10[decimals]
    numbers[first == ord("-")] *= -1  # (-0.0 for "-0", as float gives)
    other = np.flatnonzero(~simple)
    if len(other):  # an exponent, more digits, or not a number: numpy's cast, else one at a time
        shifted = np.arange(width) + pad[other, None]
        left = np.take_along_axis(text[:, other].T, np.minimum(shifted, width - 1), axis=1)
        left[shifted >= width] = 0  # left-aligned, NUL-padded
        plain = (_NUMBER_BYTE[left] | (shifted >= width)).all(axis=1)
        strings = left.view(f"S{width}")[:, 0]
        numbers[other] = np.nan
        try:
            with np.errstate(over="ignore"):
                numbers[other[plain]] = strings[plain].astype(np.float64)
        except ValueError:  # numpy rejects one ("1e", "1.2.3"): one at a time, the bad ones stay NaN
            for k, raw in zip(other[plain].tolist(), strings[plain].tolist()):
                with contextlib.suppress(ValueError):
                    numbers[k] = float(raw)
    return numbers, np.isfinite(numbers)


def _field_spans(chars: np.ndarray, starts: np.ndarray, ends: np.ndarray):
    """``(ok, east, north, heading)``: where the name (after the path's last '/') looks like
    "@east@north@..." (``name.split("@")`` has 4 or more parts), and ``(start, end)`` of fields 1, 2
    and 9 where present, else (0, 0)."""
    n = len(starts)
    slashes = np.flatnonzero(chars == ord("/"))
    ats = np.flatnonzero(chars == ord("@"))
    base = starts.copy()  # where each name starts: after its path's last '/'
    if len(slashes):
        last = np.searchsorted(slashes, ends) - 1
        last_pos = slashes[np.maximum(last, 0)]
        inside = (last >= 0) & (last_pos >= starts)
        base[inside] = last_pos[inside] + 1
    if len(ats) == 0:
        none = np.zeros(n, np.int64)
        return np.zeros(n, bool), (none, none), (none, none), (none, none)
    first = np.searchsorted(ats, base)
    count = np.searchsorted(ats, ends) - first  # '@'s in the name: name.split("@") has count + 1 parts
    ok = (count >= 3) & (ats[np.minimum(first, len(ats) - 1)] == base)
    first = np.where(ok, first, 0)
    at = [ats[np.minimum(first + k, len(ats) - 1)] for k in range(10)]  # the name's first 10 '@'s

    def field(k, present):  # field k lies between the k-th and (k + 1)-th '@'
        return np.where(present, at[k - 1] + 1, 0), np.where(present, at[k], 0)

    return ok, field(1, ok), field(2, ok), field(9, ok & (count >= 10))  # field 9 needs 10 '@'s


def _fixed_layout_fields(chars: np.ndarray, starts: np.ndarray, ends: np.ndarray):
    """:func:`_field_spans` without searching each line, when all lines have one length and '/' and
    '@' in the same columns as the first (fixed-width lists such as SF-XL's) and the first line's
    name is well formed; else None."""
    n, width = len(starts), int(ends[0] - starts[0])
    if len(chars) != n * (width + 1) or not np.all(ends - starts == width):
        return None
    lines = chars.reshape(n, width + 1)
    columns = []
    for symbol in (ord("/"), ord("@")):
        found = np.flatnonzero(lines[0] == symbol)
        if np.count_nonzero(chars == symbol) != n * len(found) or not np.all(lines[:, found] == symbol):
            return None
        columns.append(found)
    slashes, ats = columns
    base = int(slashes[-1]) + 1 if len(slashes) else 0
    ats = ats[ats >= base]
    if len(ats) < 3 or ats[0] != base:
        return None

    def field(k):
        if k >= len(ats):
            return np.zeros(n, np.int64), np.zeros(n, np.int64)
        return starts + (int(ats[k - 1]) + 1), starts + int(ats[k])

    return np.ones(n, bool), field(1), field(2), field(9)


def _parse_lines(chars: np.ndarray, starts: np.ndarray, ends: np.ndarray, name_of: Callable[[int], str]):
    """Geotags of the paths ``chars[starts[i]:ends[i]]`` (uint8 buffer; the name follows the last '/').

    Returns ``(utm (N, 2), heading (N,), error)``: ``error`` is ``(row, ImageNameError)`` of the first
    malformed name (rows from there on are not filled), else None. ``name_of(row)`` gives a row's
    path as the per-name parser (and its error message) should see it.
    """
    n = len(starts)
    utm = np.zeros((n, 2), np.float64)
    heading = np.full(n, np.nan, np.float64)
    spans = _fixed_layout_fields(chars, starts, ends)
    if spans is None:
        spans = _field_spans(chars, starts, ends)
    ok, (e_lo, e_hi), (n_lo, n_hi), (h_lo, h_hi) = spans
    east, east_ok = _field_floats(chars, e_lo, e_hi)
    north, north_ok = _field_floats(chars, n_lo, n_hi)
    h, h_ok = _field_floats(chars, h_lo, h_hi)
    ok = ok & east_ok & north_ok & (h_ok | (h_hi == h_lo))  # an empty heading is NaN
    utm[:, 0], utm[:, 1] = east, north
    filled = ok & (h_hi > h_lo)
    heading[filled] = np.remainder(h[filled], 360.0)  # numpy's float remainder is Python's %
    for row in np.flatnonzero(~ok).tolist():
        try:
            utm[row, 0], utm[row, 1], heading[row] = _geotags_of_name(name_of(row))
        except ImageNameError as e:
            return utm, heading, (row, e)
    return utm, heading, None


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
