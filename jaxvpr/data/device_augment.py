"""Training augmentation on the accelerator, inside the jitted step: ColorJitter and RandomResizedCrop.

The host then only decodes (uint8 batches, a quarter of float32's transfer); each image of the
global batch is augmented on the device holding it, keyed by the step's RNG, so a 512 x 512 CosPlace
step is not bound by host augmentation (~20 ms per 512² image with torchvision on 2 CPU cores; this
module's jitted transform takes ~7 ms on the same cores, ``bench/device_augment.py``).

Numerically the functional ops are torchvision's on float CHW tensors, as the host path
(:mod:`jaxvpr.data.augment`, whose docstrings give the formulas) -- brightness, contrast (blend
with the image's mean grey), saturation, hue (through torchvision's HSV), crop + antialiased
bilinear resize -- in float32; the resize is elementwise sums over its taps (no matrix product, so no
TF32/bf16 passes on GPUs). ``tests/test_device_augment.py`` checks each against torchvision on fixed
parameters. The random parameters follow torchvision's distributions (a random order of the four
colour ops; factors uniform in [max(0, 1 - x), 1 + x], hue in [-x, x]; RandomResizedCrop's 10 tries
of area fraction uniform in ``scale`` and log-uniform aspect ratio, then its centre-crop fallback),
drawn with JAX's RNG: the same distributions as the host path, not the same numbers.

Each image is augmented with its own key, ``fold_in(fold_in(key(seed), step), i)`` for image ``i``
of the global batch: a run resumed at step ``s`` draws the same augmentations as an uninterrupted
one, and the augmentation of an image does not depend on how the batch is split over devices.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxvpr.data.images import IMAGENET_MEAN, IMAGENET_STD


# ----------------------------------------------------------------------------- colour (one image, HWC in [0, 1])
def _blend(img1, img2, ratio):
    return jnp.clip(ratio * img1 + (1.0 - ratio) * img2, 0.0, 1.0)


def rgb_to_grayscale(img):
    return (0.2989 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2])[..., None]


def adjust_brightness(img, factor):
    return _blend(img, 0.0, factor)


def adjust_contrast(img, factor):
    return _blend(img, jnp.mean(rgb_to_grayscale(img)), factor)


def adjust_saturation(img, factor):
    return _blend(img, rgb_to_grayscale(img), factor)


def adjust_hue(img, factor):
    """torchvision's ``adjust_hue`` (RGB -> HSV, hue + factor mod 1, HSV -> RGB), with the round trip
    written without the saturation: HSV -> RGB only ever gives v = max, v (1 - s) = min and
    max - (max - min) * ramp for the third channel, so each output channel is
    ``max - (max - min) * clip(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 h') mod 6`` (n = 5, 3, 1 for
    R, G, B) -- torchvision's values up to float32 rounding (tested to 1e-5), at 60% of the cost
    of its sector selection (one reciprocal instead of four divisions, no six-way selects)."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    maxc = jnp.maximum(jnp.maximum(r, g), b)
    minc = jnp.minimum(jnp.minimum(r, g), b)
    cr = maxc - minc
    inv = 1.0 / jnp.where(cr == 0, 1.0, cr)  # grey pixels: hue 0, and cr = 0 leaves them grey
    h6 = jnp.where(maxc == r, (g - b) * inv, jnp.where(maxc == g, 2.0 + (b - r) * inv, 4.0 + (r - g) * inv))
    h = jnp.fmod(h6 / 6.0 + 1.0, 1.0)
    h6 = jnp.mod(h + factor, 1.0) * 6.0

    def channel(n):
        k = n + h6
        k = jnp.where(k >= 6.0, k - 6.0, k)
        return maxc - cr * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)

    return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def _jitter_range(value: float, hue: bool = False):
    if value < 0 or (hue and value > 0.5):
        raise ValueError(f"ColorJitter: {'hue' if hue else 'factor'} {value} out of range "
                         f"({'[0, 0.5]' if hue else '>= 0'}).")
    if value == 0:
        return None
    return (-value, value) if hue else (max(0.0, 1.0 - value), 1.0 + value)


def colour_jitter_params(key, brightness: float, contrast: float, saturation: float, hue: float):
    """``(order (4,) int32, factors (4,) float32)`` of one image, as ``ColorJitter.get_params``;
    a disabled op (argument 0) gets factor 1 (brightness, contrast, saturation) or 0 (hue): identity."""
    k_order, k_factor = jax.random.split(key)
    ranges = [_jitter_range(brightness), _jitter_range(contrast), _jitter_range(saturation),
              _jitter_range(hue, hue=True)]
    lo = np.array([r[0] if r else (0.0 if i == 3 else 1.0) for i, r in enumerate(ranges)], np.float32)
    hi = np.array([r[1] if r else (0.0 if i == 3 else 1.0) for i, r in enumerate(ranges)], np.float32)
    factors = jax.random.uniform(k_factor, (4,), jnp.float32, lo, hi)
    return jax.random.permutation(k_order, 4).astype(jnp.int32), factors


def apply_colour_jitter(img, order, factors, enabled=(True, True, True, True)):
    """The four colour ops in ``order`` with ``factors`` (brightness, contrast, saturation, hue); ops
    not ``enabled`` are skipped.

    Brightness, contrast and saturation are one blend each (with black, the mean grey, the grey
    image), so the three are three blends whose targets are selected per image, in their drawn
    order; the hue, the costly op, is applied once, after the first ``k`` of them (``k`` its
    position in ``order``): the same ops in the same order as torchvision, for six blend slots and
    one hue instead of every op in every slot (what ``lax.switch`` under ``vmap`` computes)."""
    enabled_ops = jnp.asarray(enabled)
    blends = order[jnp.argsort(order == 3, stable=True)[:3]]  # the blend ops in their drawn order

    def blend_slot(x, slot, active):
        op = blends[slot]
        gray = rgb_to_grayscale(x)
        target = jnp.where(op == 0, 0.0, jnp.where(op == 1, jnp.mean(gray), gray))
        return jnp.where(active & enabled_ops[op], _blend(x, target, factors[op]), x)

    if not enabled[3]:
        for slot in range(3):
            img = blend_slot(img, slot, True)
        return img
    hue_position = jnp.argmax(order == 3)
    for slot in range(3):
        img = blend_slot(img, slot, slot < hue_position)
    img = adjust_hue(img, factors[3])
    for slot in range(3):
        img = blend_slot(img, slot, slot >= hue_position)
    return img


# ----------------------------------------------------------------------------- geometry
def random_resized_crop_params(key, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """``(top, left, h, w)`` int32 scalars as ``RandomResizedCrop.get_params`` (10 tries, then the
    centre-crop fallback) for a static image size."""
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = height * width
    target = area * jax.random.uniform(k_area, (10,), jnp.float32, scale[0], scale[1])
    aspect = jnp.exp(jax.random.uniform(k_ratio, (10,), jnp.float32, math.log(ratio[0]), math.log(ratio[1])))
    w = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)  # round half to even, as Python's round
    h = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(fits)
    w, h = w[first], h[first]
    top = jnp.floor(jax.random.uniform(k_top) * (height - h + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k_left) * (width - w + 1)).astype(jnp.int32)
    # The fallback (no try fits), static for a static image size.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    ok = fits.any()
    pick = lambda a, b: jnp.where(ok, a, jnp.int32(b))
    return pick(top, (height - fh) // 2), pick(left, (width - fw) // 2), pick(h, fh), pick(w, fw)


def antialias_taps(start, length, in_size: int, out_size: int):
    """Torch's antialiased bilinear resize of the window ``[start, start + length)`` of an axis of
    ``in_size`` pixels to ``out_size`` pixels (traced ``start``, ``length``), as taps: ``(indices,
    weights)``, each (out_size, K), K the most input pixels one output pixel can read. The rule is
    :func:`jaxvpr.data.augment.antialias_weights`' (its dense matrix holds these weights); a gather of
    K rows instead of a dense (out, in) product costs K / in of it."""
    # hi - lo <= ceil(2 support) <= floor(2 support) + 1 when shrinking; exactly 2 when enlarging
    # or keeping the size (lengths <= in_size <= out_size), as RandomResizedCrop mostly does.
    taps = 2 if in_size <= out_size else int(math.floor(2 * in_size / out_size)) + 1
    # The window [lo, hi) = [int(c - support + 0.5), int(c + support + 0.5)) in exact integer
    # arithmetic (c = scale (o + 0.5), scale = length / out): computed in float, XLA may round the
    # copies it makes for the indices and for the weights differently (FMA in one fusion, not in the
    # other) and shift one by a pixel where c - support + 0.5 is an integer. There the tap at the
    # edge weighs 0, so torch's float rounding either way gives the same weights.
    o = jnp.arange(out_size, dtype=jnp.int32)
    up = length < out_size  # enlarging: support 1
    lo_num = jnp.where(up, length * (2 * o + 1) - out_size, length * (2 * o - 1) + out_size)
    hi_num = jnp.where(up, length * (2 * o + 1) + 3 * out_size, length * (2 * o + 3) + out_size)
    lo = jnp.maximum(lo_num // (2 * out_size), 0)  # floor, then >= 0: torch's int() then max(., 0)
    hi = jnp.minimum(hi_num // (2 * out_size), length)
    length_f = length.astype(jnp.float32)
    scale = length_f / out_size
    inv_scale = jnp.where(up, 1.0, 1.0 / scale)
    center = scale * (o.astype(jnp.float32) + 0.5)
    j = lo[:, None] + jnp.arange(taps, dtype=jnp.int32)[None, :]  # window coordinates
    w = jnp.maximum(0.0, 1.0 - jnp.abs((j.astype(jnp.float32) - center[:, None] + 0.5) * inv_scale))
    w = jnp.where(j < hi[:, None], w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)
    index = jnp.clip(j + start, 0, in_size - 1)  # taps past the window weigh 0
    return index, w


def resized_crop(img, top, left, height, width, size: tuple[int, int]):
    """Crop (traced box, inside the image) then antialiased bilinear resize to ``size`` (H', W'):
    ``torchvision.transforms.functional.resized_crop(..., antialias=True)`` on one HWC image. Rows
    first, then columns, as the host path. Each pass is a sum over the K taps of whole gathered rows
    (the columns pass on the transposed image, so it gathers rows too): 2x faster on a CPU than a
    contraction over K, where XLA gathers single pixels and calls a matrix product of inner size K."""
    in_h, in_w, _ = img.shape
    iy, wy = antialias_taps(top, height, in_h, size[0])
    ix, wx = antialias_taps(left, width, in_w, size[1])

    def pass_(x, index, weight):  # (N, W, C) -> (out, W, C) along the first axis
        return sum(weight[:, k, None, None] * x[index[:, k]] for k in range(index.shape[1]))

    rows = pass_(img, iy, wy)  # (H', W, C)
    return jnp.swapaxes(pass_(jnp.swapaxes(rows, 0, 1), ix, wx), 0, 1)  # (H', W', C)


# ----------------------------------------------------------------------------- recipes
@dataclasses.dataclass(frozen=True)
class DeviceAugment:
    """CosPlace's training transform on the device: ColorJitter(brightness, contrast, saturation, hue),
    RandomResizedCrop(size, scale=(1 - random_resized_crop, 1)), ImageNet Normalize -- the host
    :func:`jaxvpr.data.augment.cosplace_augment`. Call on a uint8 (B, H, W, 3) batch with a key and
    the global index of the batch's first image."""

    brightness: float
    contrast: float
    saturation: float
    hue: float
    random_resized_crop: float
    size: tuple[int, int]

    def one(self, image, key):
        x = image.astype(jnp.float32) / 255.0
        k_colour, k_crop = jax.random.split(key)
        enabled = (self.brightness > 0, self.contrast > 0, self.saturation > 0, self.hue > 0)
        if any(enabled):
            order, factors = colour_jitter_params(k_colour, self.brightness, self.contrast, self.saturation, self.hue)
            x = apply_colour_jitter(x, order, factors, enabled)
        if not 0.0 <= self.random_resized_crop < 1.0:
            raise ValueError(f"random_resized_crop must be in [0, 1), got {self.random_resized_crop}.")
        box = random_resized_crop_params(k_crop, x.shape[0], x.shape[1], (1.0 - self.random_resized_crop, 1.0))
        x = resized_crop(x, *box, self.size)
        return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)

    def __call__(self, images, key):
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))
        return jax.vmap(self.one)(images, keys)


def step_key(seed: int, step, stream: int = 0):
    """The augmentation key of a global step (``stream`` tells the source and target batches apart)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), step)


def host_decode(image: np.ndarray, rng: np.random.Generator, size: tuple[int, int] | None = None) -> np.ndarray:
    """The host's part when augmenting on the device: the decoded uint8 image, resized (PIL bilinear,
    as ``torchvision.transforms.Resize``) to ``size`` (H, W) when it has another size, so a batch stacks."""
    del rng
    if size is not None and tuple(image.shape[:2]) != tuple(size):
        from jaxvpr.data.images import resize

        image = resize(image, tuple(int(v) for v in size))
    return np.ascontiguousarray(image, np.uint8)


AUGMENT_ON = ("host", "device")


def parse_load_size(spec: str) -> tuple[int, int] | None:
    """``data.load_size``: ``""`` (as stored) or ``"H,W"``."""
    spec = str(spec or "").strip()
    if not spec:
        return None
    try:
        h, w = (int(v) for v in spec.lower().replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"data.load_size={spec!r}: expected '' (images as stored) or 'H,W'.") from None
    return h, w
