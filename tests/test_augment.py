"""Host augmentation (jaxvpr.data.augment) and resizing (jaxvpr.data.images) vs torchvision.

Reference: torchvision's own functional ops on float CHW tensors (colour ops, resized_crop with
antialias=True), its PIL Resize, ToTensor + Normalize and RandomResizedCrop.get_params.
Tolerances: colour ops 1e-5 (they agree bit for bit here: same float32 formulas and order; the
margin covers other SIMD paths), hue 1e-5 (a 1-ulp change of h at a sector border moves RGB by
~1 ulp too, since HSV->RGB is continuous), antialiased resize 1e-5 (weights computed in float64 here,
float32 in torch: measured <= 4e-6).
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
import torchvision.transforms as T  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402
from PIL import Image  # noqa: E402

from jaxvpr.data import augment, images  # noqa: E402


def _image(seed, h=37, w=53):
    """Random float image in [0, 1] with grey, black, white and tied-channel pixels (HSV edge cases)."""
    rng = np.random.default_rng(seed)
    img = rng.random((h, w, 3), dtype=np.float32)
    img[0, :6] = 0.5  # grey: hue undefined
    img[1, :6] = 1.0
    img[2, :6] = 0.0
    img[3, :10] = np.round(img[3, :10] * 4) / 4  # ties between channels
    img[4, :10, 1] = img[4, :10, 0]  # max in red and green at once
    return img


def _t(img):
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def _np(t):
    return t.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("factor", [0.0, 0.3, 1.0, 1.45, 1.7])
@pytest.mark.parametrize(
    "ours, theirs",
    [
        (augment.adjust_brightness, TF.adjust_brightness),
        (augment.adjust_contrast, TF.adjust_contrast),
        (augment.adjust_saturation, TF.adjust_saturation),
    ],
)
def test_blend_ops_match_torchvision(ours, theirs, factor):
    for seed in range(3):
        img = _image(seed)
        np.testing.assert_allclose(ours(img, factor), _np(theirs(_t(img), factor)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("factor", [-0.5, -0.31, -0.05, 0.0, 0.12, 0.25, 0.5])
def test_hue_matches_torchvision(factor):
    for seed in range(3):
        img = _image(seed)
        np.testing.assert_allclose(augment.adjust_hue(img, factor), _np(TF.adjust_hue(_t(img), factor)), rtol=0, atol=1e-5)


def test_hsv_round_trip():
    img = _image(5)
    np.testing.assert_allclose(augment.hsv_to_rgb(augment.rgb_to_hsv(img)), img, atol=1e-6)


def test_color_jitter_applies_torchvision_ops_in_drawn_order():
    # The documented draw protocol of ColorJitter.get_params: permutation of the 4 ops, then the
    # brightness, contrast, saturation factors and the hue shift; ops applied in permutation order.
    for seed in range(6):
        img = _image(10 + seed)
        out = augment.color_jitter(img, np.random.default_rng(seed), 0.7, 0.6, 0.5, 0.4)
        rng = np.random.default_rng(seed)
        order = rng.permutation(4)
        b, c, s, h = rng.uniform(0.3, 1.7), rng.uniform(0.4, 1.6), rng.uniform(0.5, 1.5), rng.uniform(-0.4, 0.4)
        ref = _t(img)
        for op in order:
            ref = [
                lambda x: TF.adjust_brightness(x, b),
                lambda x: TF.adjust_contrast(x, c),
                lambda x: TF.adjust_saturation(x, s),
                lambda x: TF.adjust_hue(x, h),
            ][op](ref)
        np.testing.assert_allclose(out, _np(ref), rtol=0, atol=1e-5)


def test_color_jitter_factor_ranges():
    # Brightness only, on a mid-grey image: output = 0.5 * factor, factor ~ U[0.3, 1.7].
    rng = np.random.default_rng(0)
    grey = np.full((2, 2, 3), 0.5, np.float32)
    factors = np.array([augment.color_jitter(grey, rng, brightness=0.7)[0, 0, 0] / 0.5 for _ in range(2000)])
    assert factors.min() >= 0.3 - 1e-6 and factors.max() <= 1.7 + 1e-6
    assert abs(factors.mean() - 1.0) < 0.03 and factors.min() < 0.35 and factors.max() > 1.65
    # Contrast 1.5 cannot go below 0: range [0, 2.5].
    assert augment._jitter_range(1.5, "contrast") == (0.0, 2.5)
    with pytest.raises(ValueError, match="hue"):
        augment.color_jitter(grey, rng, hue=0.6)
    # All zero: identity, as torchvision (no op enabled).
    img = _image(1)
    np.testing.assert_array_equal(augment.color_jitter(img, rng), img)


@pytest.mark.parametrize(
    "box, size",
    [
        ((0, 0, 37, 53), (20, 30)),  # shrink ~1.8x
        ((3, 5, 30, 40), (64, 80)),  # enlarge 2x
        ((2, 1, 35, 50), (35, 50)),  # same size: crop only
        ((0, 0, 37, 53), (9, 100)),  # shrink one axis, enlarge the other
        ((5, 3, 20, 45), (13, 7)),  # strong shrink
        ((0, 0, 37, 53), (36, 52)),  # off by one
        ((0, 0, 37, 53), (1, 1)),
        ((-3, 40, 20, 20), (16, 16)),  # partly outside the image: zero padding
    ],
)
def test_resized_crop_matches_torchvision_antialias(box, size):
    img = _image(7)
    ours = augment.resized_crop(img, *box, size)
    theirs = _np(TF.resized_crop(_t(img), *box, list(size), antialias=True))
    assert ours.shape == (*size, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_resize_at_training_scale_matches_torchvision():
    img = np.random.default_rng(3).random((480, 640, 3), dtype=np.float32)
    ours = augment.resized_crop(img, 31, 77, 401, 388, (512, 512))
    theirs = _np(TF.resized_crop(_t(img), 31, 77, 401, 388, [512, 512], antialias=True))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_antialias_weights_rows_sum_to_one():
    for n_in, n_out in [(10, 3), (3, 10), (512, 512), (401, 512), (700, 224)]:
        w = augment.antialias_weights(n_in, n_out)
        assert w.shape == (n_out, n_in)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)


def test_random_resized_crop_params_within_bounds():
    rng = np.random.default_rng(0)
    scale, ratio = (0.5, 1.0), (3 / 4, 4 / 3)
    height, width = 120, 160
    for _ in range(500):
        top, left, h, w = augment.random_resized_crop_params(rng, height, width, scale, ratio)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        # Rounding of w and h to integers moves the area / ratio by at most ~1 px per side.
        area = h * w / (height * width)
        assert scale[0] - 0.02 <= area <= scale[1] + 1e-9
        assert ratio[0] * (1 - 0.02) <= w / h <= ratio[1] * (1 + 0.02)


def test_random_resized_crop_params_distribution():
    # Square image, ratio range symmetric in log space: log(w/h) has mean ~0; areas cover the scale.
    rng = np.random.default_rng(1)
    params = np.array([augment.random_resized_crop_params(rng, 400, 400, (0.5, 1.0)) for _ in range(3000)])
    log_ratio = np.log(params[:, 3] / params[:, 2])
    assert abs(log_ratio.mean()) < 0.02
    area = params[:, 2] * params[:, 3] / 400**2
    assert area.min() < 0.52 and area.max() > 0.97


@pytest.mark.parametrize("shape", [(10, 200), (200, 10), (30, 30)])
def test_random_resized_crop_fallback_matches_torchvision(shape):
    # No crop of area >= 0.9 and ratio within [3/4, 4/3] fits in a 10x200 strip: the centre-crop
    # fallback is deterministic, so torchvision's get_params gives the same box. For 30x30 with
    # scale (1, 1) and ratio (1, 1) the crop is the whole image.
    height, width = shape
    scale, ratio = ((1.0, 1.0), (1.0, 1.0)) if height == width else ((0.9, 1.0), (3 / 4, 4 / 3))
    ours = augment.random_resized_crop_params(np.random.default_rng(0), height, width, scale, ratio)
    theirs = T.RandomResizedCrop.get_params(torch.zeros(3, height, width), list(scale), list(ratio))
    assert ours == tuple(theirs)


def test_cosplace_augment_deterministic_and_shape():
    cfg = dict(brightness=0.7, contrast=0.7, saturation=0.7, hue=0.5, random_resized_crop=0.5, image_size=(48, 40))
    img = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    a = augment.cosplace_augment(img, np.random.default_rng(5), cfg)
    b = augment.cosplace_augment(img, np.random.default_rng(5), cfg)
    c = augment.cosplace_augment(img, np.random.default_rng(6), cfg)
    assert a.shape == (48, 40, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Normalised values map back into [0, 1].
    back = a * np.array([0.229, 0.224, 0.225]) + np.array([0.485, 0.456, 0.406])
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5
    with pytest.raises(KeyError, match="hue"):
        augment.cosplace_augment(img, np.random.default_rng(0), {k: v for k, v in cfg.items() if k != "hue"})


def test_cosplace_augment_without_jitter_is_a_torchvision_crop():
    # With no colour jitter, the output is resized_crop of the torchvision box drawn from the
    # same rng, normalised like ToTensor + Normalize.
    cfg = dict(brightness=0, contrast=0, saturation=0, hue=0, random_resized_crop=0.5, image_size=32)
    img = (np.random.default_rng(2).random((50, 70, 3)) * 255).astype(np.uint8)
    out = augment.cosplace_augment(img, np.random.default_rng(9), cfg)
    rng = np.random.default_rng(9)
    rng.permutation(4)  # ColorJitter still draws its op order.
    box = augment.random_resized_crop_params(rng, 50, 70, (0.5, 1.0))
    tensor = TF.to_tensor(Image.fromarray(img))
    ref = TF.normalize(TF.resized_crop(tensor, *box, [32, 32], antialias=True), images.IMAGENET_MEAN, images.IMAGENET_STD)
    np.testing.assert_allclose(out, _np(ref), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------- images.py


@pytest.mark.parametrize("spec", [(20, 30), (64, 64), 17, 48, 100])
def test_pil_resize_matches_torchvision_resize(spec):
    img = (np.random.default_rng(4).random((45, 61, 3)) * 255).astype(np.uint8)
    ours = images.resize(img, spec)
    size = list(spec) if isinstance(spec, tuple) else spec
    theirs = np.asarray(T.Resize(size)(Image.fromarray(img)))
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)


def test_shorter_side_output_size_matches_torchvision():
    for h, w in [(45, 61), (61, 45), (480, 640), (333, 500), (33, 33), (1, 7)]:
        for n in [1, 7, 224, 480]:
            expected = T.Resize(n)(Image.new("RGB", (w, h))).size[::-1]
            assert images.output_size(n, h, w) == tuple(expected), (h, w, n)


def test_normalize_matches_totensor_normalize():
    img = (np.random.default_rng(8).random((9, 11, 3)) * 255).astype(np.uint8)
    ref = T.Normalize(images.IMAGENET_MEAN, images.IMAGENET_STD)(T.ToTensor()(Image.fromarray(img)))
    np.testing.assert_allclose(images.normalize(img), _np(ref), rtol=0, atol=1e-6)
    assert math.isclose(float(images.normalize(np.zeros((1, 1, 3), np.uint8))[0, 0, 0]), -0.485 / 0.229, rel_tol=1e-6)
