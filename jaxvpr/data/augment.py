"""Training augmentation on the host, numerically equal to torchvision's tensor transforms.

Images are numpy float32 arrays (H, W, 3) in [0, 1]; randomness comes only from an explicit
``np.random.Generator``. Each functional op reproduces ``torchvision.transforms.functional`` on a
float CHW tensor (same formulas, float32, same operation order), and the random parameters are
drawn from the distributions torchvision draws them from (with numpy instead of torch's RNG, so
the same *distribution*, not the same numbers).

CosPlace (thesis Table 4.1; CosPlace ``train.py``) augments each training image on the fly with
``ColorJitter(brightness=0.7, contrast=0.7, saturation=0.7, hue=0.5)`` then
``RandomResizedCrop(512, scale=(1 - 0.5, 1))`` then ImageNet ``Normalize``: :func:`cosplace_augment`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxvpr.data.images import normalize, to_float01
from jaxvpr.data.images import resize as resize_image

# ---------------------------------------------------------------------------------------------
# Colour: torchvision.transforms.functional.adjust_{brightness,contrast,saturation,hue} (tensors)
# ---------------------------------------------------------------------------------------------


def _blend(img1: np.ndarray, img2: np.ndarray | float, ratio: float) -> np.ndarray:
    """``ratio * img1 + (1 - ratio) * img2`` clamped to [0, 1] (torchvision ``_blend`` for floats)."""
    out = np.float32(ratio) * img1 + np.float32(1.0 - ratio) * np.asarray(img2, np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


def rgb_to_grayscale(img: np.ndarray) -> np.ndarray:
    """Luma (H, W, 1): 0.2989 R + 0.587 G + 0.114 B, torchvision's coefficients (ITU-R 601-2, rounded)."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    gray = np.float32(0.2989) * r + np.float32(0.587) * g + np.float32(0.114) * b
    return gray[..., None]


def adjust_brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """Multiplies by ``factor`` (a blend with black), clamped to [0, 1]."""
    return _blend(img, 0.0, factor)


def adjust_contrast(img: np.ndarray, factor: float) -> np.ndarray:
    """Blends with the mean grey level of the image (the mean of :func:`rgb_to_grayscale`)."""
    mean = np.float32(np.mean(rgb_to_grayscale(img), dtype=np.float64))
    return _blend(img, mean, factor)


def adjust_saturation(img: np.ndarray, factor: float) -> np.ndarray:
    """Blends with the per-pixel grey image: 0 gives greyscale, 1 the original, >1 more saturated."""
    return _blend(img, rgb_to_grayscale(img), factor)


def _hsv_planes(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h, s, v) planes of an RGB (H, W, 3) image, as torchvision's ``_rgb2hsv`` (hue 0 for grey pixels)."""
    r, g, b = np.moveaxis(np.asarray(img, np.float32), -1, 0).copy()  # Contiguous planes: faster.
    maxc = np.maximum(np.maximum(r, g), b)
    minc = np.minimum(np.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    one = np.float32(1.0)
    s = cr / np.where(eqc, one, maxc)
    cr_divisor = np.where(eqc, one, cr)
    rc = (maxc - r) / cr_divisor
    gc = (maxc - g) / cr_divisor
    bc = (maxc - b) / cr_divisor
    # Hue sextant by the channel holding the maximum (red first, then green).
    h = np.where(maxc == r, bc - gc, np.where(maxc == g, np.float32(2.0) + rc - bc, np.float32(4.0) + gc - rc))
    h = np.fmod(h / np.float32(6.0) + one, one)
    return h, s, maxc


# (R, G, B) of each hue sector i = floor(6 h) mod 6, as indices into the candidates (v, q, p, t).
_SECTOR_RGB = np.array([[0, 3, 2], [1, 0, 2], [2, 0, 3], [2, 1, 0], [3, 2, 0], [0, 2, 1]], np.intp)


def _rgb_from_hsv_planes(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) from h, s, v planes in [0, 1], as torchvision's ``_hsv2rgb``."""
    h6 = h * np.float32(6.0)
    i = np.floor(h6)
    f = h6 - i
    sector = i.astype(np.int32) % 6
    one = np.float32(1.0)
    candidates = np.empty(h.shape + (4,), np.float32)
    candidates[..., 0] = v
    np.clip(v * (one - s * f), 0.0, 1.0, out=candidates[..., 1])  # q
    np.clip(v * (one - s), 0.0, 1.0, out=candidates[..., 2])  # p
    np.clip(v * (one - s * (one - f)), 0.0, 1.0, out=candidates[..., 3])  # t
    return np.take_along_axis(candidates, _SECTOR_RGB[sector], axis=-1)


def rgb_to_hsv(img: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) -> HSV (H, W, 3), all channels in [0, 1], as torchvision's ``_rgb2hsv``."""
    return np.stack(_hsv_planes(img), axis=-1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """HSV (H, W, 3) -> RGB (H, W, 3), inverse of :func:`rgb_to_hsv`, as torchvision's ``_hsv2rgb``."""
    hsv = np.asarray(hsv, np.float32)
    return _rgb_from_hsv_planes(hsv[..., 0], hsv[..., 1], hsv[..., 2])


def adjust_hue(img: np.ndarray, factor: float) -> np.ndarray:
    """Rotates the hue by ``factor`` turns (factor in [-0.5, 0.5]) through HSV space.

    h' = (h + factor) mod 1 (Python/torch modulo, always in [0, 1)).
    """
    if not -0.5 <= factor <= 0.5:
        raise ValueError(f"hue factor must be in [-0.5, 0.5] (turns of the colour wheel), got {factor}.")
    h, s, v = _hsv_planes(img)
    h = np.mod(h + np.float32(factor), np.float32(1.0))
    return _rgb_from_hsv_planes(h, s, v)


def _jitter_range(value: float, name: str, hue: bool = False) -> tuple[float, float] | None:
    """torchvision's ``ColorJitter._check_input`` for a scalar; None (op disabled) when value is 0.

    Brightness, contrast, saturation: [max(0, 1 - x), 1 + x]. Hue: [-x, x] with x <= 0.5.
    """
    if value < 0:
        raise ValueError(f"color_jitter: {name} must be non-negative, got {value}.")
    if hue and value > 0.5:
        raise ValueError(f"color_jitter: hue must be in [0, 0.5] (turns of the colour wheel), got {value}.")
    if value == 0:
        return None
    return (-value, value) if hue else (max(0.0, 1.0 - value), 1.0 + value)


def color_jitter(
    img: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    hue: float = 0.0,
) -> np.ndarray:
    """``torchvision.transforms.ColorJitter(brightness, contrast, saturation, hue)`` on one image.

    As ``ColorJitter.get_params``: a random order of the four ops (a permutation of 4), then
    brightness, contrast and saturation factors uniform in [max(0, 1 - x), 1 + x] and a hue shift
    uniform in [-hue, hue] (hue <= 0.5). An argument of 0 disables that op (no draw for it).
    """
    b_range = _jitter_range(brightness, "brightness")
    c_range = _jitter_range(contrast, "contrast")
    s_range = _jitter_range(saturation, "saturation")
    h_range = _jitter_range(hue, "hue", hue=True)
    order = rng.permutation(4)
    b = None if b_range is None else float(rng.uniform(*b_range))
    c = None if c_range is None else float(rng.uniform(*c_range))
    s = None if s_range is None else float(rng.uniform(*s_range))
    h = None if h_range is None else float(rng.uniform(*h_range))
    img = np.asarray(img, np.float32)
    for op in order:
        if op == 0 and b is not None:
            img = adjust_brightness(img, b)
        elif op == 1 and c is not None:
            img = adjust_contrast(img, c)
        elif op == 2 and s is not None:
            img = adjust_saturation(img, s)
        elif op == 3 and h is not None:
            img = adjust_hue(img, h)
    return img


# ---------------------------------------------------------------------------------------------
# Geometry: RandomResizedCrop with torch's antialiased bilinear interpolation
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2048)
def antialias_weights(in_size: int, out_size: int) -> np.ndarray:
    """Dense (out_size, in_size) float32 matrix of torch's antialiased bilinear resampling along one axis.

    Output pixel i has its centre at c = s (i + 0.5) in input pixel units, s = in_size / out_size
    (``align_corners=False``). The triangle filter max(0, 1 - |x|) is stretched by s when
    shrinking (support s, as PIL and ``torch.nn.functional.interpolate(..., antialias=True)``),
    left at support 1 when enlarging (plain bilinear), evaluated at the input pixel centres
    j + 0.5 inside the window [int(c - support + 0.5), int(c + support + 0.5)) clipped to the
    image, and normalised to sum to 1. Cached per (in_size, out_size).
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size) + 0.5)
    lo = np.maximum((center - support + 0.5).astype(np.int64), 0)  # int() truncation, as torch
    hi = np.minimum((center + support + 0.5).astype(np.int64), in_size)
    j = lo[:, None] + np.arange(int((hi - lo).max()))[None, :]  # taps of each output pixel
    w = np.maximum(0.0, 1.0 - np.abs((j - center[:, None] + 0.5) * inv_scale))
    w = np.where(j < hi[:, None], w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    weights = np.zeros((out_size, in_size), np.float64)
    rows = np.broadcast_to(np.arange(out_size)[:, None], j.shape)
    valid = j < hi[:, None]
    weights[rows[valid], j[valid]] = w[valid]
    weights = weights.astype(np.float32)
    weights.setflags(write=False)
    return weights


def resize_antialias(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float (H, W, C) image to ``size`` = (H', W') with antialiasing.

    Equals ``torchvision.transforms.functional.resize(tensor, size, antialias=True)`` (bilinear):
    two separable matrix products with :func:`antialias_weights`.
    """
    out_h, out_w = int(size[0]), int(size[1])
    h, w, c = img.shape
    if (h, w) == (out_h, out_w):
        return np.asarray(img, np.float32)
    rows = antialias_weights(h, out_h) @ np.asarray(img, np.float32).reshape(h, w * c)  # (H', W*C)
    # Width pass as one large matrix product: (W', W) @ (W, H'*C), then back to (H', W', C).
    cols = np.ascontiguousarray(rows.reshape(out_h, w, c).transpose(1, 0, 2)).reshape(w, out_h * c)
    out = (antialias_weights(w, out_w) @ cols).reshape(out_w, out_h, c).transpose(1, 0, 2)
    return np.ascontiguousarray(out, dtype=np.float32)


def crop(img: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """``torchvision.transforms.functional.crop`` on (H, W, C): the region outside the image is zero."""
    h, w = img.shape[:2]
    if 0 <= top and 0 <= left and top + height <= h and left + width <= w:
        return img[top : top + height, left : left + width]
    out = np.zeros((height, width) + img.shape[2:], img.dtype)
    y0, y1 = max(top, 0), min(top + height, h)
    x0, x1 = max(left, 0), min(left + width, w)
    if y0 < y1 and x0 < x1:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = img[y0:y1, x0:x1]
    return out


def resized_crop(img: np.ndarray, top: int, left: int, height: int, width: int, size: tuple[int, int]) -> np.ndarray:
    """Crop then antialiased bilinear resize to ``size`` = (H', W'), as
    ``torchvision.transforms.functional.resized_crop(tensor, top, left, height, width, size, antialias=True)``."""
    return resize_antialias(crop(img, top, left, height, width), size)


def random_resized_crop_params(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) as ``torchvision.transforms.RandomResizedCrop.get_params``.

    Up to 10 attempts: area fraction uniform in ``scale``, aspect ratio (w / h) log-uniform in
    ``ratio``, w = round(sqrt(A r)), h = round(sqrt(A / r)); the first crop that fits is placed
    uniformly. Otherwise a centre crop: the whole image if its ratio lies within ``ratio``, else the
    largest centred crop with the nearest allowed ratio.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    img: np.ndarray,
    rng: np.random.Generator,
    size: tuple[int, int],
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """``torchvision.transforms.RandomResizedCrop(size, scale, ratio, antialias=True)`` on one float image."""
    top, left, h, w = random_resized_crop_params(rng, img.shape[0], img.shape[1], scale, ratio)
    return resized_crop(img, top, left, h, w, size)


# ---------------------------------------------------------------------------------------------
# The CosPlace recipe
# ---------------------------------------------------------------------------------------------


def _size_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    h, w = image_size
    return int(h), int(w)


def _field(cfg: Any, name: str) -> Any:
    if isinstance(cfg, dict):
        if name not in cfg:
            raise KeyError(f"cosplace_augment: augmentation config has no field {name!r}.")
        return cfg[name]
    if not hasattr(cfg, name):
        raise KeyError(f"cosplace_augment: augmentation config has no field {name!r}.")
    return getattr(cfg, name)


def cosplace_augment(img: np.ndarray, rng: np.random.Generator, cfg: Any) -> np.ndarray:
    """CosPlace's training augmentation of one image -> float32 (H', W', 3), ImageNet-normalised.

    ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue), then
    RandomResizedCrop(cfg.image_size, scale=(1 - cfg.random_resized_crop, 1)), then Normalize
    (thesis Table 4.1: 0.7, 0.7, 0.7, 0.5, 0.5, 512). ``img`` is uint8 (H, W, 3) or float in [0, 1];
    ``cfg`` is a ConfigDict, a dict or any object with those attributes; ``image_size`` an int or
    (H, W).
    """
    x = to_float01(img)
    x = color_jitter(
        x, rng, _field(cfg, "brightness"), _field(cfg, "contrast"), _field(cfg, "saturation"), _field(cfg, "hue")
    )
    rrc = float(_field(cfg, "random_resized_crop"))
    if not 0.0 <= rrc < 1.0:
        raise ValueError(f"cosplace_augment: random_resized_crop must be in [0, 1) (crop scale (1 - x, 1)), got {rrc}.")
    x = random_resized_crop(x, rng, _size_hw(_field(cfg, "image_size")), scale=(1.0 - rrc, 1.0))
    return normalize(x)


def round_to_multiple(size: int, multiple: int) -> int:
    """``round(size / multiple) * multiple`` (at least ``multiple``): DINOv2 inputs, 360 -> 364 with 14."""
    return max(multiple, int(round(size / multiple)) * multiple)


def triplet_augment(img: np.ndarray, rng: np.random.Generator, resize: int, crop: int,
                    patch_multiple: int = 0) -> np.ndarray:
    """The thesis fork's training transform of every triplet image -> float32 (H, W, 3), normalised.

    ``Resize(resize)`` (shorter side, PIL bilinear as torchvision) then ``RandomCrop(crop)`` (a
    ``crop`` x ``crop`` square at a uniform position, ``torch.randint(0, h - crop + 1)`` as
    torchvision draws it); ``resize`` or ``crop`` 0 skips that part. With ``patch_multiple`` (14 for
    DINOv2) each side is then resized (antialiased bilinear, as the fork's SALAD wrapper does on
    the batch) to the nearest multiple: 360 -> 364.
    """
    if resize:
        img = resize_image(img, int(resize))
    h, w = img.shape[:2]
    if crop:
        if crop > min(h, w):
            raise ValueError(f"triplet_augment: crop {crop} is larger than the image ({h}x{w} after resize {resize}).")
        top = int(rng.integers(0, h - crop + 1))
        left = int(rng.integers(0, w - crop + 1))
        img = img[top:top + crop, left:left + crop]
    x = to_float01(img)
    if patch_multiple:
        h, w = x.shape[:2]
        size = (round_to_multiple(h, patch_multiple), round_to_multiple(w, patch_multiple))
        if size != (h, w):
            x = resize_antialias(x, size)
    return normalize(x)


def grl_augment(img: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float, saturation: float,
                hue: float, size: tuple[int, int] | None = None) -> np.ndarray:
    """AdAGeo's transform of the GRL images (``grl_util.py``, recipes_facts §A.2.5) -> float32, normalised.

    RandomHorizontalFlip(0.5), ColorJitter(brightness, contrast, saturation, hue) (AdAGeo: 0.7, 0.7,
    0.7, 0.1), no crop; AdAGeo has no resize either (all its domains are 512x384). ``size`` (H, W)
    resizes images of another size (antialiased bilinear) so that a batch stacks.
    """
    x = to_float01(img)
    if rng.random() < 0.5:
        x = x[:, ::-1]
    x = color_jitter(x, rng, brightness, contrast, saturation, hue)
    if size is not None and tuple(x.shape[:2]) != tuple(size):
        x = resize_antialias(x, tuple(size))
    return normalize(np.ascontiguousarray(x))
