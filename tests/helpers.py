"""Helpers shared by test modules (importable: pytest puts tests/ on sys.path for its conftest)."""

from pathlib import Path

import numpy as np


def final_params(workdir):
    """``(step, {key path: array})`` of the model variables in a run's latest checkpoint."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(Path(workdir) / "checkpoints", item_names=("model",)) as m:
        step = m.latest_step()
        restored = m.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore()))
    return step, {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(restored["model"])}


def assert_same_training(a, b, steps=4, lr=1e-4, min_close=0.99):
    """Equal to fp tolerance. Adam moves a weight by about lr per step whatever its gradient's size,
    so a weight whose gradient is ~0 may differ by up to ~lr per step between two summation orders:
    such weights must be rare (every stage trains, so BatchNorm running statistics downstream of them
    move too: at most a share 1 - ``min_close`` of an array), and none may differ by more than
    2 * steps * lr."""
    assert a.keys() == b.keys()
    for k in a:
        close = np.isclose(a[k], b[k], rtol=2e-4, atol=2e-5)
        assert close.mean() >= min_close, (k, close.size - close.sum())
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=2 * steps * lr, err_msg=k)
