"""VG benchmark test-time methods and PCA (jaxvpr.testtime) against hand-computed merges, torch /
torchvision crops, a brute-force search, an eigendecomposition and end-to-end evaluations."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxvpr import evaluate as ev
from jaxvpr import testtime as tt
from jaxvpr.data.format import read_split
from jaxvpr.data.images import normalize
from jaxvpr.data.images import resize as resize_image


# ----------------------------------------------------------------------------- merging crop predictions
# Five crops, three predictions each: (database index, squared distance).
CROPS = [
    [(7, 0.10), (3, 0.40), (9, 0.90)],
    [(3, 0.20), (7, 0.50), (2, 0.60)],
    [(5, 0.05), (3, 0.30), (7, 0.70)],
    [(9, 0.35), (8, 0.80), (1, 0.95)],
    [(2, 0.45), (6, 0.85), (4, 0.99)],
]


def _arrays(crops):
    indices = np.array([[[i for i, _ in crop] for crop in crops]])
    distances = np.array([[[d for _, d in crop] for crop in crops]], np.float32)
    return distances, indices


def test_nearest_crop_merge_hand_computed():
    # All 15 candidates by distance: 5 .05, 7 .10, 3 .20, 3 .30, 9 .35, 3 .40, 2 .45, 7 .50, 2 .60, ...
    # Keeping each index's first (closest) occurrence: 5, 7, 3, 9, 2, 8, 6, 1, 4.
    d, i = tt.merge_crop_predictions(*_arrays(CROPS), "nearest_crop", k=6)
    assert i.tolist() == [[5, 7, 3, 9, 2, 8]]
    np.testing.assert_allclose(d, [[0.05, 0.10, 0.20, 0.35, 0.45, 0.80]], rtol=1e-6)
    # FAISS's -1 ("no more database images") is never a candidate; missing columns are -1.
    d, i = tt.merge_crop_predictions(np.zeros((1, 5, 3)) + [0.1, 3e38, 3e38], np.array([[[4, -1, -1]] * 5]),
                                     "nearest_crop", k=3)
    assert i.tolist() == [[4, -1, -1]] and d[0, 0] == pytest.approx(0.1) and np.isinf(d[0, 1:]).all()


def test_maj_voting_merge_hand_computed():
    crops = [
        [(1, 1.00), (2, 1.10), (3, 1.20)],
        [(4, 0.95), (2, 1.05), (5, 1.30)],
        [(4, 0.97), (6, 1.40), (7, 1.50)],
        [(8, 0.90), (9, 1.45), (2, 1.55)],
        [(10, 1.60), (11, 1.65), (12, 1.70)],
    ]
    distances, indices = _arrays(crops)
    # Without a vote: 8 .90, 4 .95, 4 .97, 1 1.00, 2 1.05, ...
    assert tt.merge_crop_predictions(distances, indices, "nearest_crop", k=5)[1].tolist() == [[8, 4, 1, 2, 3]]
    # Weight 0.1. top1 (first column 1, 4, 4, 8, 10): 4 twice -> its first-column distances -0.1*2/1.
    # top5 and top10 (the window is all three columns): 2 three times (-0.1*3/5, then -0.1*3/10),
    # 4 twice (-0.1*2/5, then -0.1*2/10). So 4: .95 -> .69, .97 -> .71; 2: 1.05 -> .96, 1.10 -> 1.01,
    # 1.55 -> 1.46. Sorted: 4 .69, 4 .71, 8 .90, 2 .96, 1 1.00, 2 1.01, 3 1.20, ...
    d, i = tt.merge_crop_predictions(distances, indices, "maj_voting", majority_weight=0.1, k=5)
    assert i.tolist() == [[4, 8, 2, 1, 3]]
    np.testing.assert_allclose(d, [[0.69, 0.90, 0.96, 1.00, 1.20]], rtol=1e-6)
    np.testing.assert_array_equal(distances, _arrays(crops)[0])  # the inputs are left alone


def test_crop_search_matches_brute_force():
    """nearest_crop keeps each database image's smallest distance over the crops: a brute-force check."""
    rng = np.random.default_rng(0)
    db = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(7, 5, 16)).astype(np.float32)
    queries[:, 1] = queries[:, 0] + 0.05 * rng.normal(size=(7, 16))  # two crops see nearly the same images
    d, i = tt.search(db, queries, 20, "nearest_crop")
    d2 = ((queries[:, :, None, :].astype(np.float64) - db[None, None]) ** 2).sum(-1)  # (Q, 5, N)
    # Each crop contributes its own top 20; an image keeps its smallest distance among those.
    best = np.full((7, 300), np.inf)
    for q in range(7):
        for c in range(5):
            top = np.argsort(d2[q, c])[:20]
            best[q, top] = np.minimum(best[q, top], d2[q, c, top])
    np.testing.assert_array_equal(i, np.argsort(best, axis=1)[:, :20])
    np.testing.assert_allclose(d, np.sort(best, axis=1)[:, :20], rtol=1e-4)
    with pytest.raises(ValueError, match="do not fit"):
        tt.search(db, queries, 20, "hard_resize")


# ----------------------------------------------------------------------------- query crops vs torch
def _tensor(image):
    """The VG benchmark's base_transform: ToTensor + Normalize -> (3, H, W)."""
    import torchvision.transforms.functional as TF

    from jaxvpr.data.images import IMAGENET_MEAN, IMAGENET_STD

    return TF.normalize(TF.to_tensor(Image.fromarray(image)), IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.torch
@pytest.mark.parametrize("shape, target", [
    ((37, 53), (24, 32)),    # shrink, width decides
    ((60, 41), (32, 48)),    # portrait query, landscape crop
    ((22, 40), (30, 40)),    # 22 * (30 / 22) = 29.999...: torch's output is one row short, center_crop pads
    ((479, 300), (480, 300)),  # scale just above 1: the width keeps 300 pixels but not the identity map
    ((16, 24), (32, 48)),    # exactly twice
])
def test_central_crop_matches_torch_interpolate_and_center_crop(shape, target):
    torch = pytest.importorskip("torch")
    import torchvision.transforms.functional as TF

    image = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    x = _tensor(image)
    scale = max(target[0] / shape[0], target[1] / shape[1])
    ref = TF.center_crop(torch.nn.functional.interpolate(x[None], scale_factor=scale)[0], list(target))
    ours = tt.CentralCrop(target)(image)
    assert ours.shape == (*target, 3)
    np.testing.assert_allclose(ours, ref.permute(1, 2, 0).numpy(), rtol=0, atol=1e-6)


@pytest.mark.torch
def test_five_crops_match_torchvision_five_crop():
    torch = pytest.importorskip("torch")
    import torchvision.transforms.functional as TF

    rng = np.random.default_rng(2)
    for height, width, side in [(37, 53, 20), (61, 20, 20), (45, 46, 40), (33, 80, 16)]:
        # The corners alone, on an image of positions: every parity of H - s and W - s.
        grid = np.arange(height * width, dtype=np.float32).reshape(1, height, width)
        ref = TF.five_crop(torch.from_numpy(grid), [side, side])
        assert [(int(c[0, 0, 0]) // width, int(c[0, 0, 0]) % width) for c in ref] == \
            tt.five_crop_corners(height, width, side)
        # The transform: shorter side -> side (PIL bilinear, as torchvision's Resize on a PIL image), then crops.
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        resized = TF.resize(Image.fromarray(image), side)
        ref = TF.five_crop(_tensor(np.asarray(resized)), [side, side])
        ours = tt.FiveCrops(side)(image)
        assert ours.shape == (5, side, side, 3)
        for o, r in zip(ours, ref, strict=True):
            np.testing.assert_allclose(o, r.permute(1, 2, 0).numpy(), rtol=0, atol=1e-6)


def test_query_preparation_checks_method_and_resize():
    assert tt.query_preparation("hard_resize", (32, 48)).resize == (32, 48)
    assert tt.query_preparation("single_query", (48, 32)).resize == 32
    assert tt.query_preparation("maj_voting", (480, 640)).transform == tt.FiveCrops(480)
    assert tt.query_preparation("five_crops", 100).transform == tt.FiveCrops(100)
    with pytest.raises(ValueError, match="central_crop"):
        tt.query_preparation("central_crop", 480)
    with pytest.raises(ValueError, match="five_crops"):
        tt.query_preparation("five_crops", None)
    with pytest.raises(ValueError, match="Unknown test method"):
        tt.query_preparation("ten_crops", (480, 640))


# ----------------------------------------------------------------------------- descriptors of crops
def _describe(images):
    """A small deterministic descriptor: channel means, channel mean squares, top/bottom halves; L2-normalised."""
    images = np.asarray(images, np.float64)
    half = images.shape[1] // 2
    f = np.concatenate([images.mean((1, 2)), (images**2).mean((1, 2)),
                        images[:, :half].mean((1, 2, 3))[:, None], images[:, half:].mean((1, 2, 3))[:, None]], 1)
    return (f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)).astype(np.float32)  # padding: 0


def _write_images(folder, sizes, seed=0, utm=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        east, north = (i * 10.0, 0.0) if utm is None else utm[i]
        # Smooth images (a random colour ramp plus noise), stored losslessly.
        ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(0, 255, 3) + rng.uniform(0, 60, (h, w, 3))
        path = folder / f"@{east:.1f}@{north:.1f}@@@@@@@@@@@@@.png"
        Image.fromarray(np.clip(ramp, 0, 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_five_crops_descriptor_is_the_mean_of_the_crops(tmp_path):
    paths = _write_images(tmp_path / "q", [(36, 48), (50, 30), (36, 48)])
    five = tt.describe_queries(_describe, paths, "five_crops", (24, 32), batch_size=2, progress=False)
    crops = tt.describe_queries(_describe, paths, "nearest_crop", (24, 32), batch_size=2, progress=False)
    assert five.values.shape == (3, 8) and crops.values.shape == (3, 5, 8)
    for q, path in enumerate(paths):
        image = np.asarray(Image.open(path).convert("RGB"))
        resized = normalize(resize_image(image, 24))
        views = [resized[r : r + 24, c : c + 24] for r, c in tt.five_crop_corners(*resized.shape[:2], 24)]
        expected = _describe(np.stack(views))
        np.testing.assert_allclose(crops.values[q], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(five.values[q], expected.mean(0), rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(five.values, axis=1).min() < 0.99  # a mean of unit vectors, not renormalised


# ----------------------------------------------------------------------------- PCA
def _correlated(n, d, seed=3):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) * np.linspace(3, 0.1, d)) @ np.linalg.qr(rng.normal(size=(d, d)))[0] + 5


def test_pca_matches_an_eigendecomposition_of_the_covariance():
    x = _correlated(400, 12)
    pca = tt.fit_pca(x, 4)
    # Reference: eigenvectors of the sample covariance, largest eigenvalues first.
    centred = x - x.mean(0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    values, vectors = values[::-1], vectors[:, ::-1]
    kept, dropped = centred @ vectors[:, :4], centred @ vectors[:, 4:]
    ours = pca.project(x).astype(np.float64)
    np.testing.assert_allclose(np.abs(ours), np.abs(kept), rtol=1e-4, atol=1e-4)  # each axis up to its sign
    np.testing.assert_allclose(pca.explained_variance_ratio, values[:4] / values.sum(), rtol=1e-8)
    # Squared distances: projected + dropped components = original (the PCA is a rotation, cut).
    a, b = np.arange(0, 200), np.arange(200, 400)
    full = ((x[a] - x[b]) ** 2).sum(1)
    np.testing.assert_allclose(((ours[a] - ours[b]) ** 2).sum(1) + ((dropped[a] - dropped[b]) ** 2).sum(1), full,
                               rtol=1e-5)
    # All axes kept: every distance is preserved.
    everything = tt.fit_pca(x, 12).project(x).astype(np.float64)
    np.testing.assert_allclose(((everything[a] - everything[b]) ** 2).sum(1), full, rtol=1e-5)
    with pytest.raises(ValueError, match="13 dimensions"):
        tt.fit_pca(x, 13)


def test_pca_equals_sklearn():
    decomposition = pytest.importorskip("sklearn.decomposition")
    x = _correlated(300, 10)
    ref = decomposition.PCA(5, svd_solver="full").fit(x)
    ours = tt.fit_pca(x, 5)
    signs = np.sign((ref.components_ * ours.components).sum(1))
    np.testing.assert_allclose(ours.components * signs[:, None], ref.components_, atol=1e-10)
    np.testing.assert_allclose(ours.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-10)
    np.testing.assert_allclose(ours.project(x) * signs, ref.transform(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- end to end
def _tiny_split(root):
    """10 database images (36 x 48) every 10 m; 3 queries of three sizes near database images 1, 4, 8."""
    _write_images(root / "database", [(36, 48)] * 10, seed=0)
    _write_images(root / "queries", [(36, 48), (50, 30), (40, 70)], seed=1,
                  utm=[(12.0, 1.0), (38.0, 2.0), (81.0, 0.0)])
    return read_split(root)


@pytest.mark.parametrize("method", tt.TEST_METHODS)
def test_evaluate_split_with_each_method_writes_results(tmp_path, method):
    split = _tiny_split(tmp_path / "split")
    pca_dim = 4 if method in ("five_crops", "maj_voting") else None
    res = ev.evaluate_split(_describe, split, resize=(24, 32), batch_size=4, out_dir=tmp_path / "out",
                            progress=False, test_method=method, pca_dim=pca_dim, majority_weight=0.02)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["test_method"] == method and written["num_queries"] == 3
    assert written["descriptor_dim"] == (pca_dim or 8)
    assert ("pca" in written) == bool(pca_dim) and ("majority_weight" in written) == (method == "maj_voting")
    for r in res["results"]:
        assert all(0.0 <= v <= 100.0 for v in r["recall"].values())
        assert r["recall"]["20"] == 100.0  # 10 database images: all of them are predicted


def test_cli_maj_voting_with_pca_from_a_folder(tmp_path):
    """python -m jaxvpr.evaluate with a test-time method and a PCA fitted on another folder."""
    _tiny_split(tmp_path / "split")
    _write_images(tmp_path / "pca" / "sub", [(36, 48)] * 6, seed=5)
    out = tmp_path / "res"
    r = subprocess.run([sys.executable, "-m", "jaxvpr.evaluate", "--dataset", str(tmp_path / "split"),
                        "--model", "cosplace_resnet18_512", "--random-init", "--resize", "32,48",
                        "--test-method", "maj_voting", "--majority-weight", "0.05", "--pca-dim", "5",
                        "--pca-folder", str(tmp_path / "pca"), "--save-descriptors", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "queries by maj_voting" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["test_method"] == "maj_voting" and res["majority_weight"] == 0.05
    assert res["pca"]["dim"] == 5 and res["pca"]["num_samples"] == 6 and res["pca"]["fit_on"] == str(tmp_path / "pca")
    assert res["descriptor_dim"] == 5 and all(0 <= v <= 100 for v in res["results"][0]["recall"].values())
    assert np.load(out / "queries_descriptors.npy").shape == (3, 5, 5)  # 3 queries x 5 crops x 5 dimensions
    assert np.load(out / "predictions.npy").shape == (3, 20)


@pytest.mark.slow
def test_two_processes_describe_crops_like_one(tmp_path):
    """maj_voting + PCA split over 2 processes (the second has no query to describe) equals 1 process."""
    import os
    import socket

    _write_images(tmp_path / "split" / "database", [(36, 48)] * 10, seed=0)
    _write_images(tmp_path / "split" / "queries", [(40, 70)], seed=1, utm=[(38.0, 2.0)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAXVPR_COORDINATOR", "JAXVPR_NUM_PROCESSES", "JAXVPR_PROCESS_ID")}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "jaxvpr.evaluate", "--dataset", str(tmp_path / "split"), "--model",
           "cosplace_resnet18_512", "--random-init", "--resize", "32,48", "--test-method", "maj_voting",
           "--pca-dim", "6", "--save-descriptors"]
    subprocess.run(cmd + ["--out", str(tmp_path / "one")], env=env, check=True, capture_output=True, timeout=600)
    procs = [subprocess.Popen(cmd + ["--out", str(tmp_path / "two")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**env, "JAXVPR_COORDINATOR": f"127.0.0.1:{port}",
                                              "JAXVPR_NUM_PROCESSES": "2", "JAXVPR_PROCESS_ID": str(i)})
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    for name in ("queries_descriptors.npy", "database_descriptors.npy"):
        one, two = np.load(tmp_path / "one" / name), np.load(tmp_path / "two" / name)
        assert one.shape == two.shape
        np.testing.assert_allclose(one, two, rtol=1e-4, atol=1e-5)
    assert np.load(tmp_path / "one" / "queries_descriptors.npy").shape == (1, 5, 6)
    np.testing.assert_array_equal(np.load(tmp_path / "one" / "predictions.npy")[:, :3],
                                  np.load(tmp_path / "two" / "predictions.npy")[:, :3])
