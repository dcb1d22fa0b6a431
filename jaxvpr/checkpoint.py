"""Checkpoints on disk (Orbax): one format for converted weights and for training runs.

A checkpoint directory is an Orbax ``CheckpointManager`` directory of numbered steps. Every step holds
at least two items:

- ``model``: the model's variables ``{"params": ..., "batch_stats": ...}`` (a pytree of arrays);
- ``meta``: JSON with ``{"format": "jaxvpr", "model": <model config dict>, ...}`` so a checkpoint
  rebuilds its own architecture.

Training runs (``jaxvpr.train``) add their own items (optimizer states, classifiers, RNG, data
iterator state) to the same steps and keep them under ``<workdir>/checkpoints``. Whatever wrote it,
``load_model(path)`` returns ``(model_config, variables)``; ``path`` may be the checkpoint directory,
one of its step folders, or a training workdir.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

FORMAT = "jaxvpr"


class CheckpointError(ValueError):
    """A path that is not a readable jaxvpr checkpoint."""


def _as_dict(cfg) -> dict:
    return cfg.to_dict() if isinstance(cfg, ConfigDict) else dict(cfg)


def save_model(directory: str | os.PathLike, model_cfg, variables, step: int = 0,
               meta: dict | None = None) -> Path:
    """Writes ``variables`` and the model config as step ``step`` of a checkpoint directory.

    The write is atomic (Orbax writes to a temporary folder and renames it when complete), so an
    interrupted save never leaves a step that looks valid.
    """
    directory = Path(directory).absolute()
    info = {"format": FORMAT, "model": _as_dict(model_cfg), **(meta or {})}
    variables = jax.tree.map(np.asarray, variables)
    with ocp.CheckpointManager(directory, item_names=("model", "meta")) as manager:
        if step in manager.all_steps():
            raise CheckpointError(f"{directory} already holds step {step}; choose another output folder.")
        manager.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(variables),
                                                   meta=ocp.args.JsonSave(info)))
        manager.wait_until_finished()
    return directory


def resolve_checkpoint_dir(path: str | os.PathLike) -> tuple[Path, int | None]:
    """Finds the checkpoint directory behind ``path`` and, if ``path`` names a step, that step."""
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist.")
    if (path / "checkpoints").is_dir():  # a training workdir
        return path / "checkpoints", None
    if (path / "meta").is_dir() and path.name.isdigit():  # one step folder
        return path.parent, int(path.name)
    if any(p.name.isdigit() and (p / "meta").is_dir() for p in path.iterdir()):
        return path, None
    raise CheckpointError(
        f"{str(path)!r} is not a jaxvpr checkpoint: expected numbered step folders holding 'model/' and "
        "'meta/' (written by `python -m jaxvpr.convert from-torch` or by training), or a training "
        "workdir with a 'checkpoints/' folder."
    )


def _choose_step(manager: ocp.CheckpointManager, which: str, directory: Path) -> int:
    steps = manager.all_steps()
    if not steps:
        raise CheckpointError(f"{directory} holds no complete checkpoint.")
    if which == "best":
        best = manager.best_step()
        return best if best is not None else manager.latest_step()
    if which == "latest":
        return manager.latest_step()
    raise ValueError(f"which must be 'best' or 'latest', got {which!r}")


def read_meta(path: str | os.PathLike, which: str = "best") -> tuple[dict, Path, int]:
    """The ``meta`` JSON of the chosen step, with the directory and the step number."""
    directory, step = resolve_checkpoint_dir(path)
    with ocp.CheckpointManager(directory, item_names=("model", "meta")) as manager:
        step = _choose_step(manager, which, directory) if step is None else step
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
        raise CheckpointError(f"Step {step} of {directory} has no jaxvpr model description in 'meta'.")
    return meta, directory, step


def load_model(path: str | os.PathLike, which: str = "best") -> tuple[ConfigDict, Any]:
    """Returns ``(model_config, variables)`` of a checkpoint (the best step of a training run by default).

    Arrays are restored against the shapes the model config builds, so a checkpoint written for
    another architecture is an error that names the mismatching tensors rather than a silent misuse.
    """
    from jaxvpr.models import model_config  # local import: the model zoo imports heavy modules

    meta, directory, step = read_meta(path, which)
    cfg = model_config(meta["model"])
    with ocp.CheckpointManager(directory, item_names=("model", "meta")) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore()))
    variables = restored["model"]
    expected = abstract_variables(cfg)
    check_tree_matches(expected, variables, f"{directory}/{step}/model")
    return cfg, variables


def abstract_variables(cfg, image_size: int = 224):
    """Shapes and dtypes of the variables of the model ``cfg`` builds (no computation)."""
    import jax.numpy as jnp
    from jaxvpr.models import build_model

    model = build_model(cfg)
    size = int(cfg.get("image_size", image_size) or image_size) if hasattr(cfg, "get") else image_size
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def check_tree_matches(expected, actual, where: str) -> None:
    """Raises CheckpointError listing every missing, unexpected or mis-shaped array."""
    exp = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    act = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(actual)}
    missing = sorted(set(exp) - set(act))
    unexpected = sorted(set(act) - set(exp))
    shapes = sorted(
        f"{k}: expected {tuple(exp[k].shape)}, found {tuple(np.shape(act[k]))}"
        for k in set(exp) & set(act) if tuple(exp[k].shape) != tuple(np.shape(act[k]))
    )
    if missing or unexpected or shapes:
        lines = [f"Checkpoint {where} does not match its model:"]
        lines += [f"  missing: {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  wrong shape: {s}" for s in shapes]
        raise CheckpointError("\n".join(lines))
