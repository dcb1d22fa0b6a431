"""Image names of the community format: the geotag of every image is in its file name.

Fields are separated by ``@``::

    @UTM_east@UTM_north@zone_number@zone_letter@lat@lon@pano_id@tile_num@heading@pitch@roll@height@timestamp@note@.jpg

Splitting on ``@`` gives ``["", east, north, zone_number, zone_letter, lat, lon, pano_id, tile_num,
heading, pitch, roll, height, timestamp, note, ".jpg"]``: field 1 is the UTM easting in metres,
field 2 the UTM northing in metres, field 9 the heading in degrees. Any field but east and north may
be empty. :func:`parse_image_name` reads every field of one name, :func:`parse_geotags_slow` the UTM
coordinates and headings of many names one by one; the vectorised parser below reads them from the
names' bytes with numpy (41M-line SF-XL lists; ``jaxvpr.data.image_list.parse_geotags`` drives it
block by block). The errors of the whole data layer are defined here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Sequence

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
