"""Image decoding, resizing and ImageNet normalisation on the host (numpy, HWC).

Every model in jaxvpr sees images the way the PyTorch anchors (CosPlace, EigenPlaces, the VG
benchmark) see them after ``PIL.Image.open(path).convert("RGB")``, an optional
``torchvision.transforms.Resize`` on the PIL image, ``ToTensor`` and
``Normalize(IMAGENET_MEAN, IMAGENET_STD)`` -- except that arrays stay channels-last (H, W, 3).

* :func:`load_image` decodes the whole file (a truncated or corrupt file raises
  :class:`CorruptImageError` naming it, never a half-grey image).
* :func:`resize` is torchvision's ``Resize`` on a PIL image, i.e. PIL's own bilinear resampling,
  which low-pass filters when shrinking (the "antialias" of torchvision).
* :func:`normalize` is ``ToTensor`` + ``Normalize`` with the ImageNet statistics, computed in
  float32 in the same order, so it agrees bit for bit.

EXIF orientation tags are ignored, as in the anchors (``Image.open`` does not apply them).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

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

_warned_truncated_flag = False


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
            "file (or drop it from the folder's *_images_paths.txt list); evaluation can skip such "
            "files with skip_corrupt=True, training skips them and logs their paths."
        )

    def __reduce__(self):  # Keeps (path, reason) when raised in a Grain worker process.
        return (type(self), (self.path, self.reason))


def load_image(path: str) -> np.ndarray:
    """Decodes an image file completely into a uint8 RGB array of shape (H, W, 3).

    Grey, palette, CMYK and RGBA images are converted with ``PIL.Image.convert("RGB")`` (alpha is
    dropped), exactly as the PyTorch anchors open their images.

    Raises:
      CorruptImageError: the file is missing, not an image, truncated or otherwise undecodable.
    """
    global _warned_truncated_flag
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated_flag:
        _warned_truncated_flag = True
        logging.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by another library): truncated image "
            "files will decode with grey padding instead of raising CorruptImageError."
        )
    try:
        with Image.open(path) as img:
            img.load()  # Forces the full decode: truncated data raises here.
            rgb = img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(path, f"{type(e).__name__}: {e}") from e
    return np.asarray(rgb, dtype=np.uint8)


def image_size(path: str) -> tuple[int, int] | None:
    """(height, width) of an image read from its header only (no decode); None if unreadable."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, SyntaxError, ValueError):
        return None
    return height, width


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
