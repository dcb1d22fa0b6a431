"""Image decoding, resizing and ImageNet normalisation on the host (numpy, HWC).

Every model in jaxvpr sees images the way the PyTorch anchors (CosPlace, EigenPlaces, the VG
benchmark) see them after ``PIL.Image.open(path).convert("RGB")``, an optional
``torchvision.transforms.Resize`` on the PIL image, ``ToTensor`` and
``Normalize(IMAGENET_MEAN, IMAGENET_STD)`` -- except that arrays stay channels-last (H, W, 3).

* :func:`load_image` decodes the whole file (:func:`decode_image` the same bytes held in memory, e.g.
  a record of a packed folder); an unreadable or corrupt file raises :class:`CorruptImageError`
  naming it. A truncated file (SF-XL holds some truncated JPEGs) is an error too, unless the
  decode mode ``truncated_images`` is ``"pil"``: then it decodes as PIL does
  with ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` -- what CosPlace sets, so the recalls compare with
  its published ones -- the part present in the file, the rest filled by the decoder (grey for a
  JPEG). The mode is an argument, else the process's ``$JAXVPR_TRUNCATED_IMAGES``
  (:func:`set_truncated_mode`; Grain's worker processes inherit it), else ``"error"``.
* :func:`resize` is torchvision's ``Resize`` on a PIL image, i.e. PIL's own bilinear resampling,
  which low-pass filters when shrinking (the "antialias" of torchvision).
* :func:`normalize` is ``ToTensor`` + ``Normalize`` with the ImageNet statistics, computed in
  float32 in the same order, so it agrees bit for bit.

EXIF orientation tags are ignored, as in the anchors (``Image.open`` does not apply them).

The pipelines read images through an :class:`ImageSource`, a sequence of image names with
``load(i)``: :class:`FileImages` holds paths (a plain list of paths is one, see :func:`as_images`),
``jaxvpr.data.pack.PackedImages`` the records of ArrayRecord shards.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import io
import os
import threading
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MEAN = np.asarray(IMAGENET_MEAN, np.float32)
_STD = np.asarray(IMAGENET_STD, np.float32)



@dataclasses.dataclass(frozen=True)
class ShorterSide:
    """Resize so the shorter side is ``size``, then each side to the nearest multiple of ``multiple``
    (DINOv2 needs multiples of its patch, 14: the thesis fork's SALAD inputs, 360 x 480 -> 364 x 476).
    ``size`` 0 keeps the native size and only rounds the sides (VPR-methods-evaluation's resizing
    wrapper for DINOv2 models: 768 x 1024 -> 770 x 1022)."""

    size: int
    multiple: int = 1


ResizeSpec = None | int | tuple[int, int] | Sequence[int] | ShorterSide

TRUNCATED_MODES = ("error", "pil")
TRUNCATED_ENV = "JAXVPR_TRUNCATED_IMAGES"


class _DecodeGate:
    """PIL reads ``ImageFile.LOAD_TRUNCATED_IMAGES``, a module global, while it decodes. Decodes of
    one mode run together (threads decode in parallel: PIL releases the GIL); a decode of the other
    mode waits until they end. The global is set by the first decode in and restored by the last out."""

    def __init__(self):
        self._changed = threading.Condition()
        self._running = 0
        self._saved = False

    @contextlib.contextmanager
    def mode(self, load_truncated: bool):
        with self._changed:
            self._changed.wait_for(lambda: not self._running or ImageFile.LOAD_TRUNCATED_IMAGES == load_truncated)
            if not self._running:
                self._saved = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = load_truncated
            self._running += 1
        try:
            yield
        finally:
            with self._changed:
                self._running -= 1
                if not self._running:
                    ImageFile.LOAD_TRUNCATED_IMAGES = self._saved
                    self._changed.notify_all()


_DECODE_GATE = _DecodeGate()


class CorruptImageError(OSError):
    """An image file that cannot be decoded completely (unreadable, truncated or not an image).

    Attributes:
      path: the file.
      reason: what the decoder said.
    """

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(
            f"Corrupt or unreadable image {self.path!r}: {self.reason}. Re-download or remove the "
            "file (or drop it from the folder's *_images_paths.txt list). Evaluation skips unreadable "
            "database images with --skip-corrupt and counts unreadable queries as misses; "
            "truncated_images='pil' (--truncated-images pil) decodes a truncated JPEG as CosPlace does."
        )

    def __reduce__(self):  # Keeps (path, reason) when raised in a Grain worker process.
        return (type(self), (self.path, self.reason))


def truncated_mode(mode: str | None = None, field: str = "truncated_images") -> str:
    """The decode mode of truncated files: ``mode``, else ``$JAXVPR_TRUNCATED_IMAGES``, else "error".

    Raises:
      ValueError: not one of :data:`TRUNCATED_MODES` (the message names ``field`` or the variable).
    """
    chosen = mode or os.environ.get(TRUNCATED_ENV) or "error"
    if chosen not in TRUNCATED_MODES:
        where = field if mode else f"${TRUNCATED_ENV}"
        raise ValueError(
            f"{where}={chosen!r}: expected 'error' (a truncated image is an error) or 'pil' (decoded as "
            "PIL with ImageFile.LOAD_TRUNCATED_IMAGES=True does, as CosPlace does).")
    return chosen


def set_truncated_mode(mode: str | None, field: str = "truncated_images") -> str:
    """Makes ``truncated_mode(mode)`` the decode mode of this process and of the worker processes it
    starts (through ``$JAXVPR_TRUNCATED_IMAGES``); returns it. Commands call it once, from a flag or
    a config field (None: keep the variable's, checked)."""
    os.environ[TRUNCATED_ENV] = truncated_mode(mode, field)
    return os.environ[TRUNCATED_ENV]


def load_image(path: str, truncated: str | None = None) -> np.ndarray:
    """Decodes an image file completely into a uint8 RGB array of shape (H, W, 3).

    Grey, palette, CMYK and RGBA images are converted with ``PIL.Image.convert("RGB")`` (alpha is
    dropped), exactly as the PyTorch anchors open their images. ``truncated`` ("error" or "pil",
    default :func:`truncated_mode`) says what a truncated file gives (see the module docstring).

    Raises:
      CorruptImageError: the file is missing, empty, not an image, otherwise undecodable, or
        truncated in mode "error".
    """
    return _decode(path, path, truncated)


def decode_image(data: bytes, name: str, truncated: str | None = None) -> np.ndarray:
    """:func:`load_image` of the bytes of an image file held in memory (same decoder, same modes and
    errors); ``name`` is what a :class:`CorruptImageError` names."""
    return _decode(io.BytesIO(data), name, truncated)


def _decode(file: str | BinaryIO, name: str, truncated: str | None) -> np.ndarray:
    with _DECODE_GATE.mode(truncated_mode(truncated) == "pil"):
        try:
            with Image.open(file) as img:
                img.load()  # Forces the full decode: truncated data raises here (mode "error").
                rgb = img.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise CorruptImageError(name, f"{type(e).__name__}: {e}") from e
    return np.asarray(rgb, dtype=np.uint8)


def image_size(path: str | BinaryIO) -> tuple[int, int] | None:
    """(height, width) of an image (a path or an open file) read from its header only (no decode);
    None if unreadable."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, SyntaxError, ValueError):
        return None
    return height, width


class ImageSource(Sequence):
    """Images by row: ``source[i]`` is the name of image i (a path, for messages and logs),
    ``load(i)`` decodes it as :func:`load_image` does, ``size(i)`` reads its header. A slice, and
    ``take(rows)``, are sources of those rows. Sources pickle small: the pipelines' worker
    processes receive them and read the images themselves."""

    @abc.abstractmethod
    def load(self, i: int, truncated: str | None = None) -> np.ndarray:
        """Image i as uint8 (H, W, 3); raises :class:`CorruptImageError` naming it."""

    @abc.abstractmethod
    def size(self, i: int) -> tuple[int, int] | None:
        """(height, width) of image i from its header; None if unreadable."""

    @abc.abstractmethod
    def take(self, rows: Sequence[int]) -> ImageSource:
        """The source of images ``rows`` (in that order)."""


class FileImages(ImageSource):
    """Image files: ``paths[i]`` is image i."""

    def __init__(self, paths: Sequence[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        return FileImages(self.paths[i]) if isinstance(i, slice) else self.paths[i]

    def load(self, i: int, truncated: str | None = None) -> np.ndarray:
        return load_image(self.paths[i], truncated)

    def size(self, i: int) -> tuple[int, int] | None:
        return image_size(self.paths[i])

    def take(self, rows: Sequence[int]) -> FileImages:
        return FileImages([self.paths[i] for i in rows])


class ImageRows(ImageSource):
    """Rows ``rows`` of another source, in that order (a view: nothing is copied or re-listed)."""

    def __init__(self, source: ImageSource, rows: Sequence[int]):
        self.source = source
        self.rows = np.asarray(rows, np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.take(range(*i.indices(len(self)))) if isinstance(i, slice) else self.source[int(self.rows[i])]

    def load(self, i: int, truncated: str | None = None) -> np.ndarray:
        return self.source.load(int(self.rows[i]), truncated)

    def size(self, i: int) -> tuple[int, int] | None:
        return self.source.size(int(self.rows[i]))

    def take(self, rows: Sequence[int]) -> ImageRows:
        return ImageRows(self.source, self.rows[np.asarray(rows, np.int64)])


class ConcatImages(ImageSource):
    """Several sources one after the other (e.g. a training set's database folders then its query
    folders, image files or packed shards alike), indexed by one row number."""

    def __init__(self, sources: Sequence[Sequence[str] | ImageSource]):
        self.sources = [as_images(s) for s in sources]
        self._ends = np.cumsum([len(s) for s in self.sources], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _locate(self, i: int) -> tuple[ImageSource, int]:
        i = int(i) + (len(self) if i < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"image {i} of {len(self)}")
        k = int(np.searchsorted(self._ends, i, side="right"))
        return self.sources[k], i - (int(self._ends[k - 1]) if k else 0)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        source, j = self._locate(i)
        return source[j]

    def load(self, i: int, truncated: str | None = None) -> np.ndarray:
        source, j = self._locate(i)
        return source.load(j, truncated)

    def size(self, i: int) -> tuple[int, int] | None:
        source, j = self._locate(i)
        return source.size(j)

    def take(self, rows: Sequence[int]) -> ImageRows:
        return ImageRows(self, rows)


def as_images(paths: Sequence[str] | ImageSource) -> ImageSource:
    """``paths`` itself if it is an :class:`ImageSource` (e.g. a packed folder's ``abs_paths()``),
    else the files at ``paths``."""
    return paths if isinstance(paths, ImageSource) else FileImages(paths)


def output_size(spec: ResizeSpec, height: int, width: int) -> tuple[int, int]:
    """(height, width) after :func:`resize` with ``spec`` on an image of (height, width) pixels.

    * ``None``: unchanged.
    * ``(H, W)``: exactly that.
    * an int ``N``: the shorter side becomes ``N`` and the longer ``int(N * long / short)``,
      rounded *down* as torchvision's ``Resize(N)`` does (``_compute_resized_output_size``); a
      square image becomes N x N.
    """
    if spec is None:
        return height, width
    if isinstance(spec, ShorterSide):
        h, w = output_size(int(spec.size), height, width) if spec.size else (height, width)
        m = int(spec.multiple)
        return max(m, int(round(h / m)) * m), max(m, int(round(w / m)) * m)
    if isinstance(spec, (int, np.integer)):
        n = int(spec)
        if n <= 0:
            raise ValueError(f"resize: the shorter side must be a positive int, got {spec}.")
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = n, int(n * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        return new_h, new_w
    size = tuple(int(s) for s in spec)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"resize: expected None, an int (shorter side) or (height, width); got {spec!r}.")
    return size


def resize(image: np.ndarray, spec: ResizeSpec) -> np.ndarray:
    """Resizes a uint8 (H, W, 3) image as ``torchvision.transforms.Resize(spec)`` does on a PIL image.

    That is PIL ``Image.resize(size, BILINEAR)``: a triangle filter whose support grows with the
    shrink factor (antialiased when downsampling), rounding to uint8. See :func:`output_size` for
    the meaning of ``spec`` and the rounding of the longer side when ``spec`` is an int.
    """
    height, width = image.shape[:2]
    new_h, new_w = output_size(spec, height, width)
    if (new_h, new_w) == (height, width):
        return image
    pil = Image.fromarray(np.asarray(image, np.uint8))
    return np.asarray(pil.resize((new_w, new_h), Image.BILINEAR), dtype=np.uint8)


def to_float01(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [0, 1] as ``ToTensor`` (x / 255 in float32); floats pass through as float32."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255.0)
    return np.asarray(image, np.float32)


def normalize(image: np.ndarray) -> np.ndarray:
    """ImageNet normalisation, channels last: ``(x - mean) / std`` per channel, float32.

    Accepts uint8 in [0, 255] (divided by 255 first, like ``ToTensor``) or floats in [0, 1].
    Mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).
    """
    return (to_float01(image) - _MEAN) / _STD
