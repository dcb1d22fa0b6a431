"""Helpers shared by test modules (importable: pytest puts tests/ on sys.path for its conftest)."""

from pathlib import Path

import numpy as np


def final_params(workdir):
    """``(step, {key path: array})`` of the model variables in a run's latest checkpoint (saved on any
    topology: they load on this process's first device)."""
    import jax

    from jaxvpr.checkpoint import load_model, read_meta

    _, _, step = read_meta(Path(workdir) / "checkpoints", "latest")
    _, variables = load_model(Path(workdir) / "checkpoints", "latest")
    return step, {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(variables)}


def assert_same_training(a, b, steps=4, lr=1e-4, min_close=0.99):
    """Equal to fp tolerance. Adam moves a weight by about lr per step whatever its gradient's size,
    so a weight whose gradient is ~0 may differ by up to ~lr per step between two summation orders:
    such weights must be rare (at most a share 1 - ``min_close`` of a parameter array), and no value
    may differ by more than 2 * steps * lr. BatchNorm running statistics are held to that bound plus
    2e-3 of their value only: each integrates every weight upstream of it, so where a few of those
    differ by ~lr, many running means differ by ~1e-4 on values of ~0.1-0.5 (on an AVX-512 EPYC,
    2026-12-07: up to 45% of a 64-channel array beyond rtol 2e-4, at most 4.3e-4 apart, for 8 devices
    against 1), and running variances of ~2 by ~1e-3 (the same machine with XLA's own convolutions, the default since)."""
    assert a.keys() == b.keys()
    for k in a:
        if "batch_stats" in k:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-3, atol=2 * steps * lr, err_msg=k)
            continue
        close = np.isclose(a[k], b[k], rtol=2e-4, atol=2e-5)
        assert close.mean() >= min_close, (k, close.size - close.sum())
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=2 * steps * lr, err_msg=k)


# ----------------------------------------------------------------------------- a tiny dataset and runs on it
def _write_images(folder, n, rng, spread, size=48):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        e, nn, h = 500000 + rng.uniform(0, spread), 4000000 + rng.uniform(0, spread), rng.uniform(0, 360)
        img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"@{e:.2f}@{nn:.2f}@10@S@@@p{i}@@{h:.1f}@@@@@@.jpg")


def write_tiny_dataset(root):
    """Random 48 px images with UTM names in the community layout (about a second to write):
    ``images/train/database`` (300, over 100 m: CosPlace classes), ``images/{val,test}/{database,queries}``,
    ``images/target/night`` (16) and ``floor/{database,queries}`` (a triplet training set: 64 + 16
    images over 40 m, so that queries have hard positives)."""
    root = Path(root)
    rng = np.random.default_rng(0)
    _write_images(root / "images/train/database", 300, rng, spread=100)
    for split in ("val", "test"):
        _write_images(root / f"images/{split}/database", 24, rng, spread=60)
        _write_images(root / f"images/{split}/queries", 8, rng, spread=60)
    _write_images(root / "images/target/night", 16, rng, spread=60)
    _write_images(root / "floor/database", 64, rng, spread=40)
    _write_images(root / "floor/queries", 16, rng, spread=40)
    return root


def tiny_cosplace_config(root):
    """A CosPlace + GRL run on :func:`write_tiny_dataset` (the fault suite's, the trainer tests'): ResNet-18
    cut after layer3 + GeM (64-d), 48 px, 3 epochs of 4 steps over 2 groups, a checkpoint every 2
    steps, a record every step."""
    from jaxvpr.train.config import cosplace_config

    c = cosplace_config()
    c.data.root = str(root)
    c.data.image_size = 48
    c.data.num_workers = 0
    c.data.target_folder = "images/target/night"
    c.model.backbone, c.model.head, c.model.fc_output_dim = "resnet18conv4", "gem", 64
    c.model.train_all_layers = True
    c.train.epochs = 3
    c.train.iterations_per_epoch = 4
    c.train.batch_size = 4
    c.train.lr = 1e-3
    c.train.groups_num = 2
    c.train.min_images_per_class = 1
    c.train.checkpoint_every = 2
    c.train.log_every = 1
    c.grl.enabled = True
    c.grl.target_batch_size = 4
    c.grl.source_to_discriminator = 4
    c.eval.batch_size = 8
    return c


def tiny_triplet_config(root):
    """A triplet run on :func:`write_tiny_dataset`'s ``floor`` (the fault suite's): the same small network,
    2 epochs of 2 cache refreshes of 2 steps (4 queries x 12 images), a checkpoint every 3 steps."""
    from jaxvpr.train.config import triplet_config

    c = triplet_config()
    c.data.root = str(root)
    c.data.train_splits = "floor"
    c.data.val_split = "images/val"
    c.data.test_splits = "images/test"
    c.data.train_resize = 0
    c.data.train_crop = 40
    c.data.eval_resize = ""
    c.data.image_size = 48
    c.data.num_workers = 0
    c.model.name = ""
    c.model.backbone, c.model.head, c.model.fc_output_dim = "resnet18conv4", "gem", 64
    c.model.train_all_layers = True
    c.train.epochs = 2
    c.train.lr = 1e-3
    c.train.queries_per_epoch = "16"
    c.train.cache_refresh_rate = 8
    c.train.neg_samples_num = 64
    c.train.train_positives_dist_threshold = 8.0
    c.train.val_positive_dist_threshold = 10.0
    c.train.select_recall = 1
    c.train.patience = 0
    c.train.checkpoint_every = 3
    c.train.log_every = 1
    c.eval.thresholds = "25"
    c.eval.batch_size = 16
    return c


def checkpoint_steps(workdir) -> list[int]:
    """The complete steps in ``<workdir>/checkpoints`` (Orbax renames a step folder when it is whole)."""
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
