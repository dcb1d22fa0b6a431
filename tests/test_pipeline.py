"""Decoding and the Grain input pipelines (jaxvpr.data.images, jaxvpr.data.pipeline).

Folder used throughout (made once per module): 30 JPEGs of 40x48 px, one 32x32 JPEG (a different
size), one file of garbage bytes and one JPEG cut in half (both corrupt).
"""

import functools
import json
import logging
import pickle

import numpy as np
import pytest
from PIL import Image

from jaxvpr.data import augment, images, pipeline

N_GOOD = 30
H, W = 40, 48


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    arrays, paths = [], []
    for i in range(N_GOOD):
        # Smooth content so JPEG round trips are close; each image has its own colour.
        base = rng.integers(0, 256, 3)
        ramp = np.linspace(0, 60, W)[None, :, None]
        arr = np.clip(base[None, None, :] + ramp + rng.integers(-5, 6, (H, W, 3)), 0, 255).astype(np.uint8)
        path = root / f"img_{i:03d}.jpg"
        Image.fromarray(arr).save(path, quality=95)
        arrays.append(np.asarray(Image.open(path).convert("RGB")))
        paths.append(str(path))
    small = root / "small_32x32.jpg"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(small)
    garbage = root / "garbage.jpg"
    garbage.write_bytes(b"this is not an image" * 20)
    truncated = root / "truncated.jpg"
    data = open(paths[0], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    return {
        "good": paths,
        "arrays": arrays,
        "small": str(small),
        "garbage": str(garbage),
        "truncated": str(truncated),
    }


# --------------------------------------------------------------------------------- images.py


def test_load_image_rgb_uint8_and_grey_converted(folder, tmp_path):
    img = images.load_image(folder["good"][3])
    assert img.dtype == np.uint8 and img.shape == (H, W, 3)
    np.testing.assert_array_equal(img, folder["arrays"][3])
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((5, 7), 77, np.uint8), mode="L").save(grey)
    out = images.load_image(str(grey))
    assert out.shape == (5, 7, 3) and (out == 77).all()


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_load_image_corrupt_names_the_file(folder, kind):
    with pytest.raises(images.CorruptImageError) as info:
        images.load_image(folder[kind])
    assert info.value.path == folder[kind]
    assert folder[kind] in str(info.value)
    # Survives pickling (errors raised in Grain worker processes are pickled to the parent).
    again = pickle.loads(pickle.dumps(info.value))
    assert again.path == folder[kind] and again.reason == info.value.reason


def test_normalize_imagenet_statistics():
    x = np.array([[[0, 128, 255]]], np.uint8)
    expected = (np.array([0, 128, 255]) / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    out = images.normalize(x)
    assert out.dtype == np.float32 and out.shape == (1, 1, 3)
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6)
    np.testing.assert_array_equal(images.normalize(x.astype(np.float32) / 255), out)


# ------------------------------------------------------------------------------ evaluation


def test_eval_batches_padding_valid_mask_and_order(folder):
    paths = folder["good"][:11]
    batches = list(pipeline.eval_batches(paths, batch_size=4))
    assert len(batches) == 3
    for b in batches:
        assert b["image"].shape == (4, H, W, 3) and b["image"].dtype == np.float32
        assert b["index"].dtype == np.int32 and b["valid"].dtype == bool
    index = np.concatenate([b["index"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    np.testing.assert_array_equal(index, list(range(11)) + [-1])
    np.testing.assert_array_equal(valid, [True] * 11 + [False])
    last = batches[-1]
    assert (last["image"][3] == 0).all()
    for b in batches:
        for row in np.flatnonzero(b["valid"]):
            np.testing.assert_array_equal(b["image"][row], images.normalize(folder["arrays"][b["index"][row]]))


def test_eval_batches_resize(folder):
    paths = folder["good"][:3] + [folder["small"]]
    (b,) = list(pipeline.eval_batches(paths, batch_size=4, resize=(20, 24)))
    assert b["image"].shape == (4, 20, 24, 3) and b["valid"].all()
    np.testing.assert_array_equal(b["image"][0], images.normalize(images.resize(folder["arrays"][0], (20, 24))))


def test_eval_corrupt_image_error_names_file(folder):
    paths = folder["good"][:5] + [folder["garbage"]] + folder["good"][5:7]
    with pytest.raises(images.CorruptImageError, match="garbage.jpg"):
        list(pipeline.eval_batches(paths, batch_size=4))


def test_eval_skip_corrupt_counts_and_marks_invalid(folder, caplog):
    paths = folder["good"][:5] + [folder["garbage"]] + folder["good"][5:7] + [folder["truncated"]]
    it = pipeline.eval_batches(paths, batch_size=4, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        batches = list(it)
    index = np.concatenate([b["index"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    # The third batch (truncated.jpg + 3 padding rows) has no valid image: it is not yielded.
    np.testing.assert_array_equal(index, list(range(8)))
    np.testing.assert_array_equal(valid, [True] * 5 + [False] + [True] * 2)
    assert it.num_skipped == 2
    assert it.skipped_paths == [folder["garbage"], folder["truncated"]]
    assert folder["garbage"] in caplog.text and folder["truncated"] in caplog.text


def test_eval_worker_processes_keep_order_and_report_errors(folder):
    # Batches 0 and 1 are fine, batch 2 holds garbage.jpg: two workers build batches 0/2 and 1.
    paths = folder["good"][:9] + [folder["garbage"]] + folder["good"][9:14]
    zero = list(pipeline.eval_batches(paths, batch_size=4, skip_corrupt=True))
    it = pipeline.eval_batches(paths, batch_size=4, num_workers=2)
    two = [next(it), next(it)]
    for x, y in zip(zero, two):
        for key in ("image", "index", "valid"):
            np.testing.assert_array_equal(x[key], y[key])
    # The error raised in a worker process reaches the caller with its type and file name.
    with pytest.raises(images.CorruptImageError, match="garbage.jpg"):
        next(it)
    it.close()


def test_eval_differing_sizes_error_and_batch_one(folder):
    paths = folder["good"][:2] + [folder["small"]] + folder["good"][2:4]
    with pytest.raises(pipeline.ImageSizeMismatchError, match="batch_size=1") as info:
        list(pipeline.eval_batches(paths, batch_size=4))
    assert "small_32x32.jpg" in str(info.value)
    # Batch size 1 keeps every image at its native size.
    batches = list(pipeline.eval_batches(paths, batch_size=1))
    assert [b["image"].shape[1:3] for b in batches] == [(H, W), (H, W), (32, 32), (H, W), (H, W)]
    assert [int(b["index"][0]) for b in batches] == [0, 1, 2, 3, 4]


def test_eval_batches_by_size_groups_equal_sizes(folder):
    paths = folder["good"][:3] + [folder["small"]] + folder["good"][3:6] + [folder["garbage"]]
    it = pipeline.eval_batches_by_size(paths, batch_size=4, skip_corrupt=True)
    batches = list(it)
    seen = []
    for b in batches:
        # A size group of fewer images than the batch is one batch of its own size, not padded to 4.
        expected_rows = 1 if b["image"].shape[1:3] == (32, 32) else 4
        assert b["image"].shape[0] == expected_rows
        rows = np.flatnonzero(b["valid"])
        for row in rows:
            i = int(b["index"][row])
            seen.append(i)
            expected = images.normalize(images.load_image(paths[i]))
            np.testing.assert_array_equal(b["image"][row], expected)
    assert sorted(seen) == [0, 1, 2, 3, 4, 5, 6]
    assert it.skipped_paths == [folder["garbage"]]
    assert {b["image"].shape[1:3] for b in batches} == {(H, W), (32, 32)}


def test_class_balanced_sampler_never_repeats_a_class_within_a_batch():
    # 10 classes, batches of 4: a pass uses 8 positions (the remainder of 2 is dropped, as CosPlace's
    # DataLoader(drop_last=True)), so no batch straddles two passes.
    sampler = pipeline.ClassBalancedSampler([[i] for i in range(10)], batch_size=4)
    assert sampler.per_pass == 8
    for b in range(50):
        labels = [sampler.class_at(7, 4 * b + r) for r in range(4)]
        assert len(set(labels)) == 4, (b, labels)
    # Without batch_size a pass covers all classes (then batches can repeat a class across passes).
    assert pipeline.ClassBalancedSampler([[i] for i in range(10)]).per_pass == 10
    with pytest.raises(ValueError, match="distinct classes"):
        pipeline.ClassBalancedSampler([[0], [1]], batch_size=3)


def test_resize_shorter_side_output_sizes():
    # torchvision Resize(N): shorter side N, longer side int(N * long / short) (rounded down).
    assert images.output_size(20, 40, 48) == (20, 24)
    assert images.output_size(7, 40, 48) == (7, 8)  # 7 * 48 / 40 = 8.4 -> 8
    assert images.output_size(7, 48, 40) == (8, 7)
    assert images.output_size(10, 33, 33) == (10, 10)
    assert images.output_size(None, 5, 6) == (5, 6)


# ------------------------------------------------------------------------------- samplers


def _classes():
    # 7 classes of 2..6 images each over the 30 good images.
    sizes = [4, 2, 6, 5, 3, 4, 6]
    out, start = [], 0
    for s in sizes:
        out.append(list(range(start, start + s)))
        start += s
    return out


def test_class_balanced_sampler_every_class_once_per_pass():
    classes = _classes()
    sampler = pipeline.ClassBalancedSampler(classes)
    n = len(classes)
    orders = []
    for p in range(4):
        labels = [sampler.class_at(5, p * n + k) for k in range(n)]
        assert sorted(labels) == list(range(n))
        orders.append(labels)
    assert len({tuple(o) for o in orders}) > 1  # reshuffled between passes
    for position in range(4 * n):
        index, label = next(sampler.candidates(5, position))
        assert label == sampler.class_at(5, position) and index in classes[label]


def test_class_balanced_sampler_draws_uniformly_within_class():
    sampler = pipeline.ClassBalancedSampler([[10, 11, 12, 13]])
    counts = np.bincount([next(sampler.candidates(1, i))[0] - 10 for i in range(4000)], minlength=4)
    assert counts.min() > 850 and counts.max() < 1150  # 1000 each expected


def test_sampler_deterministic_by_seed():
    sampler = pipeline.ClassBalancedSampler(_classes())
    draw = lambda seed: [next(sampler.candidates(seed, i)) for i in range(50)]  # noqa: E731
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
    fresh = pipeline.ClassBalancedSampler(_classes())
    assert [next(fresh.candidates(3, i)) for i in range(50)] == draw(3)


def test_uniform_sampler_visits_every_image_per_pass():
    sampler = pipeline.UniformSampler(13)
    for p in range(3):
        drawn = [next(sampler.candidates(9, p * 13 + k)) for k in range(13)]
        assert sorted(i for i, _ in drawn) == list(range(13))
        assert all(label == -1 for _, label in drawn)
    # Replacement draws: all other images, no repeats.
    cands = list(sampler.candidates(9, 5))
    assert sorted(i for i, _ in cands) == list(range(13))


# ------------------------------------------------------------------------------- training

AUG = functools.partial(
    augment.cosplace_augment,
    cfg=dict(brightness=0.7, contrast=0.7, saturation=0.7, hue=0.5, random_resized_crop=0.5, image_size=24),
)


def _train(folder, steps, **kw):
    kw = {"batch_size": 8, "augment_fn": AUG, "seed": 11, "num_steps": steps, **kw}
    return pipeline.train_batches(folder["good"], pipeline.ClassBalancedSampler(_classes()), **kw)


def test_train_batches_content(folder):
    classes = _classes()
    batches = list(_train(folder, 4))
    assert len(batches) == 4
    for b in batches:
        assert b["image"].shape == (8, 24, 24, 3) and b["image"].dtype == np.float32
        assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32
        assert set(b) == {"image", "label", "index"}
        for label, index in zip(b["label"], b["index"]):
            assert index in classes[label]
    labels = np.concatenate([b["label"] for b in batches])
    # 32 positions over 7 classes: passes 0..3 complete -> each class 4 times in the first 28.
    assert np.bincount(labels[:28], minlength=7).tolist() == [4] * 7


def test_train_deterministic_and_seed_dependent(folder):
    a = list(_train(folder, 2))
    b = list(_train(folder, 2))
    c = list(_train(folder, 2, seed=12))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["index"], y["index"])
    assert not all(np.array_equal(x["index"], z["index"]) for x, z in zip(a, c))
    assert not np.array_equal(a[0]["image"], c[0]["image"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_sharding_concatenates_to_single_process_batch(folder, process_count):
    single = list(_train(folder, 3))
    shards = [list(_train(folder, 3, process_index=p, process_count=process_count)) for p in range(process_count)]
    for step in range(3):
        for key in ("image", "label", "index"):
            joined = np.concatenate([shards[p][step][key] for p in range(process_count)])
            np.testing.assert_array_equal(joined, single[step][key])
        assert shards[0][step]["image"].shape[0] == 8 // process_count


def test_resume_from_state_and_start_step(folder):
    reference = list(_train(folder, 6))
    it = _train(folder, 6)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
    assert state["step"] == 3
    fresh = _train(folder, 6)
    fresh.set_state(state)
    resumed = list(fresh)
    direct = list(_train(folder, 6, start_step=3))
    assert len(resumed) == len(direct) == 3
    for got, also, want in zip(resumed, direct, reference[3:]):
        for key in ("image", "label", "index"):
            np.testing.assert_array_equal(got[key], want[key])
            np.testing.assert_array_equal(also[key], want[key])
    with pytest.raises(ValueError, match="seed"):
        _train(folder, 6, seed=99).set_state(state)


def test_workers_zero_and_two_identical(folder):
    zero = list(_train(folder, 4))
    it = _train(folder, 4, num_workers=2)
    two = list(it)
    it.close()
    assert len(two) == 4
    for x, y in zip(zero, two):
        for key in ("image", "label", "index"):
            np.testing.assert_array_equal(x[key], y[key])


def test_training_skips_corrupt_image_and_logs_it(folder, caplog):
    paths = folder["good"][:6] + [folder["garbage"]]
    # Class 1 = {5, 6}: image 6 is corrupt, so every draw of class 1 must return image 5.
    sampler = pipeline.ClassBalancedSampler([[0, 1, 2], [5, 6], [3, 4]])
    it = pipeline.train_batches(paths, sampler, batch_size=6, augment_fn=AUG, seed=2, num_steps=5)
    with caplog.at_level(logging.WARNING):
        batches = list(it)
    assert len(batches) == 5
    index = np.concatenate([b["index"] for b in batches])
    label = np.concatenate([b["label"] for b in batches])
    assert 6 not in index
    assert (index[label == 1] == 5).all() and (label == 1).sum() == 10
    assert it.skipped_paths == [folder["garbage"]]
    assert folder["garbage"] in caplog.text


def test_uniform_sampler_training_skips_corrupt(folder):
    paths = folder["good"][:5] + [folder["truncated"]]
    it = pipeline.train_batches(paths, pipeline.UniformSampler(6), batch_size=4, augment_fn=AUG, seed=0, num_steps=3)
    batches = list(it)
    index = np.concatenate([b["index"] for b in batches])
    assert 5 not in index and (np.concatenate([b["label"] for b in batches]) == -1).all()
    assert it.skipped_paths == [folder["truncated"]]


def test_train_batch_size_must_divide_processes(folder):
    with pytest.raises(ValueError, match="multiple of process_count"):
        _train(folder, 1, batch_size=6, process_count=4)
