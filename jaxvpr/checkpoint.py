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

import dataclasses
import json
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


def resolve_checkpoint_dir(path: str | os.PathLike, which: str = "best") -> tuple[Path, int | None]:
    """Finds the checkpoint directory behind ``path`` and, if ``path`` names a step, that step.

    A training workdir gives ``<workdir>/best`` for ``which="best"`` (when a best model was saved),
    else ``<workdir>/checkpoints``.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist.")
    if (path / "checkpoints").is_dir() or (path / "best").is_dir():  # a training workdir
        best = path / "best"
        if which == "best" and best.is_dir() and _has_steps(best):
            return best, None
        return path / "checkpoints", None
    if (path / "meta").is_dir() and path.name.isdigit():  # one step folder
        return path.parent, int(path.name)
    if _has_steps(path):
        return path, None
    raise CheckpointError(
        f"{str(path)!r} is not a jaxvpr checkpoint: expected numbered step folders holding 'model/' and "
        "'meta/' (written by `python -m jaxvpr.convert from-torch` or by training), or a training "
        "workdir with a 'checkpoints/' folder."
    )


def _has_steps(path: Path) -> bool:
    return path.is_dir() and any(p.name.isdigit() and (p / "meta").is_dir() for p in path.iterdir())


def _choose_step(manager: ocp.CheckpointManager, which: str, directory: Path) -> int:
    steps = manager.all_steps()
    if not steps:
        raise CheckpointError(f"{directory} holds no complete checkpoint.")
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    return manager.latest_step()


def read_meta(path: str | os.PathLike, which: str = "best") -> tuple[dict, Path, int]:
    """The ``meta`` JSON of the chosen step, with the directory and the step number."""
    directory, step = resolve_checkpoint_dir(path, which)
    with ocp.CheckpointManager(directory, item_names=("model", "meta")) as manager:
        step = _choose_step(manager, which, directory) if step is None else step
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
        raise CheckpointError(f"Step {step} of {directory} has no jaxvpr model description in 'meta'.")
    return meta, directory, step


def load_model(path: str | os.PathLike, which: str = "best") -> tuple[ConfigDict, Any]:
    """Returns ``(model_config, variables)`` of a checkpoint (the best model of a training run by default).

    Arrays are restored against the shapes the model config builds, so a checkpoint written for
    another architecture is an error that names the mismatching tensors rather than a silent misuse.
    They land on this process's first device whatever the topology that wrote them (a run on 8
    devices or 4 hosts loads on a laptop); callers place them where they need them.
    """
    from jaxvpr.models import model_config  # local import: the model zoo imports heavy modules

    meta, directory, step = read_meta(path, which)
    cfg = model_config(meta["model"])
    with ocp.CheckpointManager(directory, item_names=("model", "meta")) as manager:
        variables = _restore_local(manager, step, "model", directory)
    check_tree_matches(abstract_variables(cfg), variables, f"{directory}/{step}/model")
    return cfg, variables


def _restore_local(manager: ocp.CheckpointManager, step: int, item: str, directory) -> Any:
    """Restores ``item`` of ``step`` onto this process's first device, shapes as saved."""
    handler = ocp.StandardCheckpointHandler()
    meta_tree = handler.metadata(Path(directory) / str(step) / item)
    meta_tree = getattr(meta_tree, "tree", meta_tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), meta_tree)
    restored = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
    return restored[item]


def abstract_variables(cfg):
    """Shapes and dtypes of the variables of the model ``cfg`` builds (no computation)."""
    from jaxvpr.models import variable_shapes

    return variable_shapes(cfg)


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


class TrainCheckpointer:
    """Checkpoints of a training run: ``<workdir>/checkpoints`` (the last ``keep``) and ``<workdir>/best``.

    Every step folder holds ``model`` (params + batch stats, so ``load_model(workdir)`` works),
    ``train`` (every other field of the recipe's train state: step, optimizer states, the GRL
    discriminator, ...), ``host`` (the recipe's host-side numpy state: CosPlace's per-group
    classifiers and their Adam states, the triplet recipe's mining cache) and ``meta`` (model config,
    run config, progress: epoch, iteration within the epoch -- the data iterators' position --, best
    recall). Orbax writes each step to a temporary folder and renames it when complete: a run killed
    at any moment leaves only whole steps.
    """

    ITEMS = ("model", "train", "host", "meta")

    def __init__(self, workdir: str | os.PathLike, keep: int = 2):
        workdir = Path(workdir).absolute()
        self.manager = ocp.CheckpointManager(
            workdir / "checkpoints", item_names=self.ITEMS,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
        self.best = ocp.CheckpointManager(
            workdir / "best", item_names=("model", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

    @staticmethod
    def _split(state) -> tuple[dict, dict]:
        """``state`` (a flax struct dataclass) -> (model variables, the other fields by name).

        Fields the state class lists in ``not_checkpointed`` are left out (the recipe keeps them in
        its host state, e.g. CosPlace's classifier of the current group).
        """
        model = {"params": state.params, "batch_stats": state.batch_stats}
        skip = ("params", "batch_stats", *getattr(type(state), "not_checkpointed", ()))
        train = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name not in skip}
        return model, train

    def save(self, state, host: dict, progress: dict, model_cfg, config, is_best: bool = False) -> None:
        step = int(state.step)
        model, train = self._split(state)
        meta = {"format": FORMAT, "model": _as_dict(model_cfg), "progress": dict(progress),
                "config": json.loads(config.to_json_best_effort())}
        host = {"_": np.zeros((), np.int32), **jax.tree.map(np.asarray, host)}  # never an empty tree
        if is_best and step not in self.best.all_steps():
            self.best.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(model),
                                                         meta=ocp.args.JsonSave(meta)))
            self.best.wait_until_finished()
        if step not in self.manager.all_steps():
            self.manager.save(step, args=ocp.args.Composite(
                model=ocp.args.StandardSave(model), train=ocp.args.StandardSave(train),
                host=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta)))
            self.manager.wait_until_finished()

    def restore_latest(self, state, shardings=None, host_template: dict | None = None):
        """``(state, host, progress)`` from the latest step, or None when there is none.

        ``shardings`` (a tree like ``state``, e.g. ``parallel.state_shardings``) says where each array
        goes: Orbax reads each device's part directly, so a run saved on one topology (process and
        device count) resumes on another. The host state comes back as numpy arrays: in the structure
        and shapes of ``host_template`` when given (e.g. optimizer states, whose tuples a restore
        from metadata alone would turn into lists), else as saved.
        """
        step = self.manager.latest_step()
        if step is None:
            return None
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree.map(lambda _: device, state)
        model_t, train_t = self._split(state)
        model_s, train_s = self._split(shardings)
        to_abstract = lambda tree, sh: jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, sh)
        try:
            r = self.manager.restore(step, args=ocp.args.Composite(
                model=ocp.args.StandardRestore(to_abstract(model_t, model_s)),
                train=ocp.args.StandardRestore(to_abstract(train_t, train_s)),
                meta=ocp.args.JsonRestore()))
            if host_template is None:
                host = _restore_local(self.manager, step, "host", self.manager.directory)
            else:
                template = {"_": np.zeros((), np.int32), **jax.tree.map(np.asarray, host_template)}
                host = self.manager.restore(step, args=ocp.args.Composite(
                    host=ocp.args.StandardRestore(template)))["host"]
        except Exception as e:  # a checkpoint of another run or model: say where, keep it intact
            raise CheckpointError(
                f"Cannot resume from {self.manager.directory}/{step}: {e}\nIt was written by a different model or "
                "setting; use another --workdir (nothing was changed in this one).") from e
        state = state.replace(params=r["model"]["params"], batch_stats=r["model"]["batch_stats"], **r["train"])
        host = jax.tree.map(np.asarray, host)
        host.pop("_", None)
        return state, host, r["meta"]["progress"]

    def load_best_variables(self, model_cfg):
        step = self.best.latest_step()
        if step is None:
            return None
        return _restore_local(self.best, step, "model", self.best.directory)

    def close(self) -> None:
        self.manager.close()
        self.best.close()
