"""Augmentation on the device (jaxvpr.data.device_augment) vs torchvision on fixed parameters, and its
random parameters against torchvision's definitions.

Tolerances as tests/test_augment.py: the same float32 formulas (colour 1e-5; the resize 1e-5, its
weights float32 as torch's)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvpr.data import augment
from jaxvpr.data import device_augment as da

torch = pytest.importorskip("torch")
TF = pytest.importorskip("torchvision.transforms.functional")

from test_augment import _image, _np, _t  # noqa: E402  (the same test images and layouts)


@pytest.mark.parametrize("op, theirs, factors", [
    (da.adjust_brightness, TF.adjust_brightness, (0.0, 0.3, 1.0, 1.7)),
    (da.adjust_contrast, TF.adjust_contrast, (0.0, 0.3, 1.0, 1.7)),
    (da.adjust_saturation, TF.adjust_saturation, (0.0, 0.3, 1.0, 1.7)),
    (da.adjust_hue, TF.adjust_hue, (-0.5, -0.31, 0.0, 0.12, 0.5)),
])
def test_colour_ops_match_torchvision(op, theirs, factors):
    fn = jax.jit(op)
    for seed in range(2):
        img = _image(seed)
        for f in factors:
            np.testing.assert_allclose(np.asarray(fn(img, jnp.float32(f))), _np(theirs(_t(img), f)), rtol=0, atol=1e-5)


def test_colour_jitter_applies_the_ops_in_the_drawn_order():
    img = _image(7)
    order, factors = np.array([2, 0, 3, 1]), np.array([1.3, 0.6, 1.4, -0.2], np.float32)
    out = jax.jit(da.apply_colour_jitter)(img, jnp.asarray(order), jnp.asarray(factors))
    ref = _t(img)
    for op in order:
        ref = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue][op](ref, float(factors[op]))
    np.testing.assert_allclose(np.asarray(out), _np(ref), rtol=0, atol=1e-5)


@pytest.mark.parametrize("box, size", [
    ((0, 0, 37, 53), (37, 53)),     # identity
    ((3, 5, 30, 40), (16, 24)),     # shrink: antialiased
    ((1, 2, 20, 17), (45, 60)),     # enlarge: plain bilinear
    ((10, 0, 27, 53), (27, 20)),    # one axis each way
])
def test_resized_crop_matches_torchvision(box, size):
    img = _image(3)
    out = jax.jit(da.resized_crop, static_argnums=5)(img, *map(jnp.int32, box), size)
    ref = TF.resized_crop(_t(img), *box, list(size), antialias=True)
    np.testing.assert_allclose(np.asarray(out), _np(ref), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out), augment.resized_crop(img, *box, size), rtol=0, atol=1e-5)


def test_crop_parameters_follow_random_resized_crop():
    # torchvision's rule: area fraction in scale and aspect ratio in ratio when a try fits (then the
    # box is inside the image), else the centre-crop fallback.
    keys = jax.random.split(jax.random.key(0), 2000)
    scale, ratio = (0.5, 1.0), (3 / 4, 4 / 3)
    top, left, h, w = map(np.asarray, jax.jit(jax.vmap(
        lambda k: da.random_resized_crop_params(k, 48, 64, scale, ratio)))(keys))
    assert ((top >= 0) & (left >= 0) & (top + h <= 48) & (left + w <= 64)).all()
    frac = h * w / (48 * 64)
    assert frac.min() >= 0.5 - 0.03 and frac.max() <= 1.0
    aspect = w / h
    assert aspect.min() >= 0.75 - 0.05 and aspect.max() <= 4 / 3 + 0.05
    assert len(np.unique(top)) > 5 and len(np.unique(left)) > 5  # positions spread over the image
    # scale (1, 1) on a square image: almost never fits exactly, so the whole image (fallback)
    box = np.asarray(jax.vmap(lambda k: jnp.stack(da.random_resized_crop_params(k, 32, 32, (1.0, 1.0))))(keys[:50]))
    assert (box == [0, 0, 32, 32]).mean(axis=0).min() > 0.9


def test_colour_factors_follow_colour_jitter():
    keys = jax.random.split(jax.random.key(1), 4000)
    order, factors = map(np.asarray, jax.vmap(lambda k: da.colour_jitter_params(k, 0.7, 0.6, 0.0, 0.4))(keys))
    assert (np.sort(order, axis=1) == np.arange(4)).all()  # a permutation
    assert len({tuple(o) for o in order}) == 24  # every order occurs
    for i, (lo, hi) in enumerate([(0.3, 1.7), (0.4, 1.6), (1.0, 1.0), (-0.4, 0.4)]):
        assert lo <= factors[:, i].min() and factors[:, i].max() <= hi
        assert factors[:, i].mean() == pytest.approx((lo + hi) / 2, abs=0.03)


def test_device_augment_of_a_batch_equals_the_host_ops_on_its_drawn_parameters():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    aug = jax.jit(da.DeviceAugment(0.7, 0.7, 0.7, 0.5, 0.5, (24, 24)))
    key = da.step_key(0, 5)
    out = np.asarray(aug(images, key))
    assert out.shape == (3, 24, 24, 3)
    params = jax.jit(lambda k: (da.colour_jitter_params(k, 0.7, 0.7, 0.7, 0.5),
                                da.random_resized_crop_params(k, 40, 56, (0.5, 1.0))))
    for i in range(3):
        k_colour, k_crop = jax.random.split(jax.random.fold_in(key, i))
        order, factors = map(np.asarray, params(k_colour)[0])
        box = [int(v) for v in params(k_crop)[1]]
        x = images[i].astype(np.float32) / 255
        for op in order:
            x = [augment.adjust_brightness, augment.adjust_contrast, augment.adjust_saturation,
                 augment.adjust_hue][op](x, float(factors[op]))
        ref = augment.normalize(augment.resized_crop(x, *box, (24, 24)))
        np.testing.assert_allclose(out[i], ref, rtol=0, atol=1e-4)
    # the same step key gives the same batch; another step another one; an image's augmentation
    # does not depend on the batch it is in
    np.testing.assert_array_equal(np.asarray(aug(images, key)), out)
    assert not np.allclose(np.asarray(aug(images, da.step_key(0, 6))), out)
    np.testing.assert_allclose(np.asarray(aug(images[:2], key)), out[:2], rtol=0, atol=1e-5)


def test_taps_hold_the_dense_weights():
    # Every window length of each axis size (so every scale, up- and downsampling): K = floor(2 *
    # support) + 1 taps hold every non-zero weight of the host path's dense matrix.
    for n_in, n_out in [(37, 11), (53, 30), (64, 64), (40, 24), (24, 40)]:
        taps = jax.jit(da.antialias_taps, static_argnums=(2, 3))
        for length in range(1, n_in + 1):
            start = (n_in - length) // 2
            index, w = map(np.asarray, taps(jnp.int32(start), jnp.int32(length), n_in, n_out))
            assert index.shape[1] == (2 if n_in <= n_out else math.floor(2 * n_in / n_out) + 1)
            dense = np.zeros((n_out, n_in), np.float32)
            np.add.at(dense, (np.arange(n_out)[:, None].repeat(index.shape[1], 1), index), w)
            ref = np.zeros((n_out, n_in), np.float32)
            ref[:, start:start + length] = augment.antialias_weights(length, n_out)
            np.testing.assert_allclose(dense, ref, atol=5e-6, err_msg=f"{n_in} -> {n_out}, length {length}")


def test_cosplace_trains_with_the_augmentation_on_the_device(tiny_root, tmp_path):
    """data.augment_on="device": the pipeline yields uint8 batches and the jitted step augments them."""
    import json

    from helpers import tiny_cosplace_config
    from jaxvpr.train.cosplace import CosPlaceTrainer, device_augmentation

    c = tiny_cosplace_config(tiny_root)
    c.data.augment_on = "device"
    c.train.epochs = 1
    c.train.iterations_per_epoch = 2
    trainer = CosPlaceTrainer(c, tmp_path / "run")
    batch, _ = next(trainer.batches(0, 0, None))
    assert batch["image"].dtype == np.uint8 and batch["target_image"].dtype == np.uint8
    trainer.fit()
    train = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert len(train) == 2 and all(np.isfinite(r["cosface_loss"]) for r in train)
    c.data.augment_on = "gpu"
    with pytest.raises(ValueError, match="augment_on='gpu'"):
        device_augmentation(c)
