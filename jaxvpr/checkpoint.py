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
from absl import logging
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
    """Checkpoints of a training run: ``<workdir>/checkpoints`` (the last ``keep``), ``<workdir>/best``
    and ``<workdir>/host_parts``.

    Every step folder of ``checkpoints`` holds ``model`` (params + batch stats, so ``load_model(workdir)``
    works), ``train`` (every other field of the recipe's train state: step, optimizer states, the GRL
    discriminator, ...), ``host`` (the recipe's small host-side numpy state, e.g. the triplet recipe's
    mining cache) and ``meta`` (model config, run config, progress: epoch, iteration within the epoch --
    the data iterators' position --, the epoch's metric sums, best recall).

    Large host state that changes rarely (CosPlace's per-group classifiers with their Adam moments:
    3 x classes x D x 4 bytes, ~34 GB for SF-XL at D=512) goes in *parts*:
    ``host_parts/<name>/<version>``, written only when its version (the step it last changed at) is
    new; ``meta`` names the version of every part the step needs. A checkpoint is so
    ``checkpoints/<step>`` plus ``host_parts/``: copy both to move it.

    Saves are asynchronous (Orbax): ``save`` returns once the arrays are copied to host memory, and
    the files are written while training goes on; the next save, :meth:`wait` and :meth:`close`
    wait for it. Orbax writes each step to a temporary folder and renames it when complete, so a run
    killed at any moment leaves only whole steps; a step whose parts were not all complete is skipped
    on restore (the one before it is used). A failed write (a full disk) is a :class:`CheckpointError`
    naming the step and the last complete one, raised by the next save, wait or close.
    """

    ITEMS = ("model", "train", "host", "meta")

    def __init__(self, workdir: str | os.PathLike, keep: int = 2):
        self.workdir = Path(workdir).absolute()
        # keep >= 2: the latest step may refer to a part still being written when the process dies;
        # the step before it is then the one restored.
        self.keep = max(int(keep), 2)
        self.manager = self._manager("checkpoints", self.ITEMS, self.keep)
        self.best = self._manager("best", ("model", "meta"), 1)
        self.parts: dict[str, ocp.CheckpointManager] = {}  # name -> its versions (created on first use)
        self.writing: int | None = None  # the step whose asynchronous write may still run
        self.restored_parts: dict[str, int] = {}  # name -> version, of the restored step

    def _manager(self, folder: str, items: tuple[str, ...], keep: int) -> ocp.CheckpointManager:
        # cleanup_tmp_directories: the half-written step of a killed run goes when the next one starts
        # (the workdir lock guarantees that no other run is writing it).
        # barrier_sync_key_prefix: with several processes, Orbax names its barriers by a fixed string
        # (e.g. the "save in progress" flag, set by the saving thread and cleared by the background
        # thread that finalizes); two managers of this class writing at once would meet in the same
        # barrier from two threads ("Barrier ... is already ongoing", or a hang). Each gets its own.
        return ocp.CheckpointManager(self.workdir / folder, item_names=items, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix="jaxvpr_" + folder.replace("/", "_"))))

    def _part(self, name: str) -> ocp.CheckpointManager:
        if name not in self.parts:
            # keep + 1 versions: every kept step finds the version it names (a version is written
            # only with a step, so the kept steps name at most keep of them, plus one in flight).
            self.parts[name] = self._manager(f"host_parts/{name}", ("part",), self.keep + 1)
        return self.parts[name]

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

    def _failed(self, error: BaseException) -> CheckpointError:
        step = self.writing
        latest = [s for s in self.manager.all_steps() if s != step]
        where = f"step {step} to {self.workdir}" if step is not None else f"to {self.workdir}"
        return CheckpointError(
            f"Writing checkpoint {where} failed: {error}. Training stopped. The complete checkpoints are intact "
            f"(latest: {'step ' + str(max(latest)) if latest else 'none'}, in {self.manager.directory}). Free "
            "space on that disk (or resume a copy of the workdir on another one) and run the same command: "
            "the run resumes from the latest complete checkpoint.")

    def save(self, state, host: dict, progress: dict, model_cfg, config, is_best: bool = False,
             parts: dict[str, tuple[int, Any]] | None = None) -> None:
        """Starts writing step ``state.step`` (returns once the arrays are on the host, see the class doc).

        ``parts``: ``{name: (version, tree)}``; a part is written when that version is not on disk yet.
        """
        step = int(state.step)
        model, train = self._split(state)
        parts = parts or {}
        meta = {"format": FORMAT, "model": _as_dict(model_cfg), "progress": dict(progress),
                "config": json.loads(config.to_json_best_effort()),
                "parts": {name: int(version) for name, (version, _) in parts.items()}}
        host = {"_": np.zeros((), np.int32), **jax.tree.map(np.asarray, host)}  # never an empty tree
        self.wait()  # the previous save (Orbax would wait too): its failure is reported as its own
        self.writing = step
        try:
            # The parts and the best model (written rarely) are finished before the step starts, so
            # that at most one manager writes in the background (see _manager).
            for name, (version, tree) in parts.items():
                manager = self._part(name)
                if int(version) not in manager.all_steps():
                    manager.save(int(version), args=ocp.args.Composite(part=ocp.args.StandardSave(tree)))
                    manager.wait_until_finished()
            if is_best and step not in self.best.all_steps():
                self.best.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(model),
                                                             meta=ocp.args.JsonSave(meta)))
                self.best.wait_until_finished()
            if step not in self.manager.all_steps():
                self.manager.save(step, args=ocp.args.Composite(
                    model=ocp.args.StandardSave(model), train=ocp.args.StandardSave(train),
                    host=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta)))
        except Exception as e:
            raise self._failed(e) from e

    def wait(self) -> None:
        """Waits until every started save is on disk (raises CheckpointError if one failed)."""
        try:
            for manager in (*self.parts.values(), self.best, self.manager):
                manager.wait_until_finished()
        except Exception as e:
            raise self._failed(e) from e
        self.writing = None

    def restore_latest(self, state, shardings=None, host_template: dict | None = None,
                       part_templates: dict[str, Any] | None = None):
        """``(state, host, progress)`` from the latest complete step, or None when there is none.

        ``shardings`` (a tree like ``state``, e.g. ``parallel.state_shardings``) says where each array
        goes: Orbax reads each device's part directly, so a run saved on one topology (process and
        device count) resumes on another. The host state comes back as numpy arrays: in the structure
        and shapes of ``host_template`` when given (e.g. optimizer states, whose tuples a restore
        from metadata alone would turn into lists), else as saved; with the parts the step names
        added under their names (restored in the structure of ``part_templates[name]``).

        Steps after the restored one (and part versions newer than it) are deleted: they are what a
        killed run left unfinished, and the resumed run writes them again.
        """
        step = self._latest_usable_step()
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
            host = jax.tree.map(np.asarray, host)
            host.pop("_", None)
            self.restored_parts = dict(r["meta"].get("parts", {}))
            for name, version in self.restored_parts.items():
                template = (part_templates or {}).get(name)
                args = ocp.args.StandardRestore(None if template is None else jax.tree.map(np.asarray, template))
                part = self._part(name).restore(version, args=ocp.args.Composite(part=args))["part"]
                host[name] = jax.tree.map(np.asarray, part)
        except Exception as e:  # a checkpoint of another run or model: say where, keep it intact
            raise CheckpointError(
                f"Cannot resume from {self.manager.directory}/{step}: {e}\nIt was written by a different model or "
                "setting; use another --workdir (nothing was changed in this one).") from e
        self._drop_after(step)
        state = state.replace(params=r["model"]["params"], batch_stats=r["model"]["batch_stats"], **r["train"])
        return state, host, r["meta"]["progress"]

    def _latest_usable_step(self) -> int | None:
        """The latest step whose parts are all on disk (a killed run may have left the newest without)."""
        for step in reversed(self.manager.all_steps()):
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            absent = sorted(n for n in meta.get("parts", {}) if not (self.workdir / "host_parts" / n).is_dir())
            if absent:  # not a killed write: a copy of checkpoints/ alone
                raise CheckpointError(
                    f"Checkpoint {self.manager.directory}/{step} needs its host parts {absent} from "
                    f"{self.workdir / 'host_parts'}, which is missing. A checkpoint is checkpoints/<step> plus "
                    "host_parts/ (classifiers saved only when they change): copy both.")
            missing = {n: v for n, v in meta.get("parts", {}).items() if v not in self._part(n).all_steps()}
            if not missing:
                return step
            logging.warning("checkpoint step %d names host parts that were never completed (%s); using an earlier "
                            "step", step, missing)
        return None

    def _drop_after(self, step: int) -> None:
        for manager in (self.manager, *self.parts.values()):
            for later in [s for s in manager.all_steps() if s > step]:
                manager.delete(later)

    def load_best_variables(self, model_cfg):
        self.wait()  # the best model may still be being written
        step = self.best.latest_step()
        if step is None:
            return None
        return _restore_local(self.best, step, "model", self.best.directory)

    def close(self, failed: bool = False) -> None:
        """Finishes the writes in flight and closes. ``failed``: the run is stopping on an error already;
        a write error is then logged, not raised (it would hide the first)."""
        try:
            self.wait()
        except CheckpointError as e:
            if not failed:
                raise
            logging.error("%s", e)
        finally:
            for manager in (*self.parts.values(), self.best, self.manager):
                try:
                    manager.close()
                except Exception as e:  # already reported by wait()
                    logging.error("closing %s: %s", manager.directory, e)
