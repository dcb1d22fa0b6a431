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
