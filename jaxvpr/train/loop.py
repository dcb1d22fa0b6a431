"""What every training recipe shares: the loop, checkpoints and exact resume, validation, test, logs.

A recipe (``jaxvpr/train/cosplace.py``, ``jaxvpr/train/triplet.py``) is a subclass of :class:`Trainer`
that loads its training data and implements the hooks marked *recipe* below: its state, its pure
``step(state, batch, *args) -> (state, metrics)``, how many steps an epoch has, and the batches of an
epoch. Everything else lives here once. :meth:`Trainer.run` reads top to bottom:

1. the initial state (random or ``model.init_checkpoint`` weights), or the latest checkpoint of the
   workdir (exact resume: model, optimizer states, the recipe's host state such as CosPlace's
   classifiers or the triplet mining cache, and the position within the epoch);
2. the step, ``jax.jit`` once with explicit shardings: state as ``parallel.state_shardings`` (FSDP
   with ``mesh.shard_params``), batch split over the mesh's data axes, step arguments replicated;
3. per epoch: ``start_epoch`` -> steps (metrics of step k fetched and checked while step k+1 runs,
   so logging never waits for the device; a non-finite loss stops the run naming the step; interval
   means every ``log_every`` steps; a checkpoint every ``checkpoint_every`` steps, written while
   training goes on) -> ``end_epoch`` -> validation recall -> best model / early stopping
   (``train.patience``) -> checkpoint;
4. the test query sets with the best model (reusing that epoch's evaluations), ``results.json``,
   ``training.png``.

:meth:`Trainer.fit` wraps that story in what a long run needs: the workdir is locked (a second run
on it stops with :class:`WorkdirInUseError`; the lock dies with its process, so a killed run's lock
never blocks the resume), and the checkpoints in flight are finished however the run ends. A resumed
run is exact: the same parameters bit for bit on CPU (on GPU with ``train.deterministic``), and the
same ``metrics.jsonl`` (records after the checkpoint are dropped; the epoch's metric sums are part of
the checkpoint). ``tests/test_faults.py`` kills runs to check it.

Model selection reads ``R@train.select_recall`` at ``train.select_distance_m`` metres (0: the first
evaluation threshold) on the validation queries; never on test queries.
"""

from __future__ import annotations

import abc
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from jaxvpr import evaluate as ev
from jaxvpr import parallel
from jaxvpr.checkpoint import TrainCheckpointer
from jaxvpr.data import format as fmt
from jaxvpr.models import build_model, descriptor_dim, frozen_mask, init_variables, model_config
from jaxvpr.train.config import ConfigError
from jaxvpr.train.logger import MetricsLogger, plot_run


class NonFiniteLossError(FloatingPointError):
    pass


class WorkdirInUseError(ValueError):
    """Another run is training in the workdir."""


# XLA options of the step with ``train.deterministic`` (GPU; no effect on CPU, which is deterministic
# already): deterministic scatter, reductions, GEMMs and convolutions, and no autotuning (a resumed
# process would time the kernels again and may pick others, which round differently). The same as
# XLA_FLAGS="--xla_gpu_deterministic_ops=true --xla_gpu_autotune_level=0", which also covers
# evaluation and triplet mining (set it in the environment before Python starts).
DETERMINISTIC_GPU_OPTIONS = {"xla_gpu_deterministic_ops": True, "xla_gpu_autotune_level": 0}
DETERMINISTIC_XLA_FLAGS = "--xla_gpu_deterministic_ops=true --xla_gpu_autotune_level=0"


# ----------------------------------------------------------------------------- model set-up
def run_model_config(config: ConfigDict) -> ConfigDict:
    """The model config of a run: a registry name or backbone + head, with the run's overrides."""
    overrides = {}
    if config.model.fc_output_dim:
        overrides["fc_output_dim"] = int(config.model.fc_output_dim)
    if config.model.get("num_classes", 0):
        overrides["num_classes"] = int(config.model.num_classes)  # AdAGeo's scene classifier
    if config.model.get("dropout", -1.0) >= 0:
        overrides["dropout"] = float(config.model.dropout)  # SALAD's head (the fork trains with 0.3)
    if config.model.train_all_layers:
        overrides["trainable_stages"] = None  # CosPlace's --train_all_layers
    elif config.model.trainable_stages != -1:
        overrides["trainable_stages"] = config.model.trainable_stages
    if config.model.backbone or config.model.head:
        if not (config.model.backbone and config.model.head):
            raise ConfigError("config.model.backbone and config.model.head go together (free composition).")
        return model_config({"backbone": config.model.backbone, "head": config.model.head}, **overrides)
    return model_config(config.model.name, **overrides)


# Fields of a model config that do not change its parameters: a checkpoint of the same architecture
# initialises a run whatever its name, freezing policy or dropout rate (e.g. the converted CosPlace hub model with
# --config.model.train_all_layers=True).
_NON_ARCHITECTURE_KEYS = ("name", "trainable_stages", "image_size", "dropout", "torch_layout")  # naming only


def load_init_checkpoint(path: str, model_cfg: ConfigDict, expected_variables) -> Any:
    """The variables of ``model.init_checkpoint``, after checking architecture and every shape.

    ``path`` is a jaxvpr checkpoint folder (a training run's workdir, its ``best/``, or a converted
    model), or ``config:NAME``: the best model of ``configs/NAME.py`` trained by jaxvpr itself on
    first use and cached (:func:`jaxvpr.train.baseline.ensure_trained`; the demos' baseline).
    """
    from jaxvpr.checkpoint import CheckpointError, check_tree_matches, load_model

    if path.startswith("config:"):
        from jaxvpr.train.baseline import ensure_trained

        path = str(ensure_trained(path[len("config:"):]))
    cfg, loaded = load_model(path)
    ours, theirs = model_cfg.to_dict(), cfg.to_dict()
    differ = sorted(k for k in set(ours) | set(theirs) if k not in _NON_ARCHITECTURE_KEYS
                    and ours.get(k) != theirs.get(k))
    if differ:
        raise CheckpointError(
            f"model.init_checkpoint {path} holds another architecture than the run's model: "
            + ", ".join(f"{k}: checkpoint {theirs.get(k)!r}, run {ours.get(k)!r}" for k in differ)
            + ". Set config.model.name (or model.backbone/head/fc_output_dim) to match the checkpoint.")
    check_tree_matches(expected_variables, loaded, f"{path} (model.init_checkpoint)")
    return loaded


_UNUSED_PARAMS = ("mask_token",)


def check_no_random_frozen_stages(model_cfg: ConfigDict, params, config: ConfigDict) -> None:
    """Frozen stages with random weights never learn: refuse them unless the config opts in.

    CosPlace freezes the early ResNet stages because they hold ImageNet weights; frozen *random*
    stages only pass random features to the trained ones (the demo of 21f01be did this).
    """
    if config.model.allow_random_frozen:
        return
    mask = frozen_mask(model_cfg, params)["backbone"]
    # DINOv2's mask_token is frozen whatever the policy: it only serves masked-image pre-training and
    # never enters a VPR forward pass.
    frozen = [name for name, sub in mask.items() if all(jax.tree.leaves(sub)) and name not in _UNUSED_PARAMS]
    if frozen:
        raise ConfigError(
            f"The run trains {model_cfg.name} from random weights but keeps stages {frozen} frozen "
            f"(model trainable_stages={model_cfg.trainable_stages}): frozen random layers never learn. Start "
            "from trained weights (config.model.init_checkpoint: a converted CosPlace/ImageNet checkpoint or a "
            "jaxvpr run), train every stage (--config.model.train_all_layers=True), or set "
            "--config.model.allow_random_frozen=True if that is really what you want.")


def check_batch_sizes(sizes: dict[str, int], mesh) -> None:
    """Global batch sizes must split evenly over the data-parallel devices and the processes."""
    shards = parallel.num_batch_shards(mesh)
    procs = jax.process_count()
    for field, size in sizes.items():
        for what, n in (("data-parallel devices (mesh data x fsdp)", shards), ("processes", procs)):
            if size % n:
                raise ConfigError(
                    f"config.{field}={size} is not divisible by the {n} {what} of this topology "
                    f"({parallel.describe_topology(mesh)}): every device holds an equal share of the batch. "
                    f"Use a multiple of {n} (e.g. --config.{field}={-(-size // n) * n}).")


def frozen_params_mask(model_cfg: ConfigDict):
    """True for every parameter the run does not train (the recipe's freezing policy)."""
    from jaxvpr.models import variable_shapes

    return frozen_mask(model_cfg, variable_shapes(model_cfg)["params"])


def stop_frozen(params, frozen):
    """Frozen parameters behind ``stop_gradient``: XLA then skips the backward pass of the frozen
    stages (their gradient is discarded anyway), and their BatchNorm statistics still update in
    train mode as PyTorch's ``model.train()`` does. ``frozen`` None: nothing is frozen."""
    if frozen is None:
        return params
    return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)


def cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, stream), e.g. streams 0 source, 1 target."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def data_root(config: ConfigDict) -> Path:
    return fmt.dataset_root(config.data.root, config.data.synthetic_preset, config.data.synthetic_seed,
                            config.data.get("synthetic_domains", ""))


def recall_row(res: dict, thresholds) -> dict:
    """``{"R@1": .., "R@5": ..}`` with one threshold, else ``{"R@1 <threshold>": ..}`` per threshold."""
    if len(res["results"]) == 1:
        r = res["results"][0]["recall"]
        return {"R@1": r["1"], "R@5": r["5"]}
    return {f"R@1 {t.label()}": r["recall"]["1"] for t, r in zip(thresholds, res["results"])}


def print_monitor_table(table: list[tuple[str, dict]], chance: dict | None = None) -> None:
    """The monitored recalls so far, one row per evaluation; with many columns one block per query set."""
    keys = list(table[0][1])
    groups = [keys]
    if len(keys) > 6:  # e.g. 3 test floors x 4 thresholds: one block per floor
        prefixes = list(dict.fromkeys(k.rsplit("/", 1)[0] for k in keys))
        groups = [[k for k in keys if k.rsplit("/", 1)[0] == p] for p in prefixes]
    for group in groups:
        short = len(groups) > 1
        names = [k.rsplit("/", 1)[1] if short else k for k in group]
        width = max(10, *(len(n) for n in names))
        title = group[0].rsplit("/", 1)[0] if short else ""
        header = f"{title:>16} | " + " | ".join(f"{n:>{width}}" for n in names)
        print("\n" + header + "\n" + "-" * len(header))
        for label, row in table + ([("chance level", chance)] if chance else []):
            print(f"{label:>16} | " + " | ".join(f"{row.get(k, float('nan')):{width}.1f}" for k in group))
    print(flush=True)


# ----------------------------------------------------------------------------- a run's workdir and metrics
class WorkdirLock:
    """An exclusive lock on ``<workdir>/.lock`` while a run trains there (taken by process 0; with
    several processes every one of them learns the answer).

    ``fcntl.flock``: the operating system releases it when the process ends however it ends, so the
    lock of a killed run never blocks its resume. (File systems without ``flock``, e.g. some network
    mounts, make it advisory only.)
    """

    def __init__(self, workdir: Path, enabled: bool = True):
        self.path = Path(workdir) / ".lock"
        self.enabled = enabled
        self.file = None

    def __enter__(self) -> "WorkdirLock":
        holder = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a+")
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.file.seek(0)
                holder = self.file.read().strip() or "another process"
                self.file.close()
                self.file = None
            else:
                self.file.truncate(0)
                self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                self.file.flush()
        busy = holder is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            busy = bool(multihost_utils.broadcast_one_to_all(np.int32(busy)))
        if busy:
            self.__exit__()
            raise WorkdirInUseError(
                f"Another run is training in {self.path.parent} ({holder or 'held by process 0 of another run'}; "
                f"lock file {self.path}). Wait for it to end, stop it, or choose another --workdir.")
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


class EpochMetrics:
    """One epoch's metrics: fetched from the device one step late, checked, summed, logged.

    ``push`` hands over the metrics of the step just dispatched (still being computed) and fetches
    those of the step before, which are ready: logging never drains the device queue. ``flush``
    fetches the last one (before a checkpoint, at the epoch's end). The sums -- of the epoch (epoch
    means) and since the last "train" record (interval means) -- with the images and seconds so far
    are part of a mid-epoch checkpoint (``progress()``), so a run resumed there logs what an
    uninterrupted run logs.
    """

    def __init__(self, epoch: int, log_every: int, images_per_step: int, saved: dict | None = None):
        saved = saved or {}
        self.epoch, self.log_every, self.images_per_step = epoch, int(log_every), images_per_step
        self.sums: dict[str, float] = dict(saved.get("sums", {}))
        self.interval: dict[str, float] = dict(saved.get("interval", {}))
        self.count = int(saved.get("count", 0))
        self.interval_count = int(saved.get("interval_count", 0))
        self.images = int(saved.get("images", 0))
        self.seconds_before = float(saved.get("seconds", 0.0))  # of the epoch, before a resume
        self.t0 = time.time()
        self.pending = None  # (metrics on the device, iteration, global step)

    def seconds(self) -> float:
        return self.seconds_before + time.time() - self.t0

    def push(self, metrics, it: int, step: int) -> tuple[int, dict] | None:
        """Queues step ``step`` (iteration ``it``); returns the previous step's ``flush()``."""
        record = self.flush()
        self.pending = (metrics, it, step)
        return record

    def flush(self) -> tuple[int, dict] | None:
        """Fetches the queued step; returns ``(step, record)`` when it ends a log interval, else None."""
        if self.pending is None:
            return None
        metrics, it, step = self.pending
        self.pending = None
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(values["loss"]):
            raise NonFiniteLossError(
                f"The loss became {values['loss']} at epoch {self.epoch}, iteration {it} ({values}). Training "
                "stopped; the checkpoints already written are intact (the last good one is the latest in "
                "<workdir>/checkpoints). Lower the learning rates (train.lr and the recipe's other rates) and resume.")
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.interval[k] = self.interval.get(k, 0.0) + v
        self.count += 1
        self.interval_count += 1
        self.images += self.images_per_step
        if step % self.log_every:
            return None
        n = self.interval_count
        record = dict(epoch=self.epoch, images_per_s=self.images / max(self.seconds(), 1e-9), steps_averaged=n,
                      **{k: v / n for k, v in self.interval.items()})
        self.interval, self.interval_count = {}, 0
        return step, record

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def progress(self) -> dict:
        """The sums so far (JSON: floats round-trip exactly), for a mid-epoch checkpoint."""
        assert self.pending is None, "flush() first"
        return {"sums": self.sums, "interval": self.interval, "count": self.count,
                "interval_count": self.interval_count, "images": self.images, "seconds": self.seconds()}


# ----------------------------------------------------------------------------- the trainer
class Trainer(abc.ABC):
    """Holds what does not change during a run and runs it (:meth:`fit`). Subclass per recipe; the
    abstract methods are the hooks every recipe must give."""

    step_args = 0  # replicated scalars the step takes after the batch (CosPlace: the GRL coefficient)

    def __init__(self, config: ConfigDict, workdir: str | os.PathLike):
        self.config = config
        self.workdir = Path(workdir)
        self.is_main = jax.process_index() == 0
        self.mesh = parallel.mesh_from_config(config.mesh)
        self.model_cfg = run_model_config(config)
        check_batch_sizes(self.batch_sizes(), self.mesh)  # configs that cannot run fail before any work
        if not self.starts_from_trained_weights():
            from jaxvpr.models import variable_shapes

            check_no_random_frozen_stages(self.model_cfg, variable_shapes(self.model_cfg)["params"], config)
        self.root = data_root(config)
        self.model = build_model(self.model_cfg)
        self.dim = descriptor_dim(self.model_cfg)
        self.describer = ev.Describer(self.model)  # per-process extraction, gathered
        self.thresholds = self.eval_thresholds()
        self.eval_resize = ev.parse_resize(config.data.eval_resize)
        self.val_split, self.val_queries = None, None  # read by fit(), after the recipe has read its training data
        self.select_index = self._select_threshold_index()
        self.checkpointer: TrainCheckpointer | None = None  # opened by fit(), under the workdir lock
        self.logger: MetricsLogger | None = None             # opened by run(), knowing the resumed step

    # -- recipe hooks ------------------------------------------------------------------------
    @abc.abstractmethod
    def batch_sizes(self) -> dict[str, int]:
        """Global batch sizes by config field, checked against the topology (recipe)."""

    @abc.abstractmethod
    def eval_thresholds(self) -> list[ev.Threshold]:
        """Positive thresholds of validation and test (recipe; first = default selection threshold)."""

    @abc.abstractmethod
    def initial_state(self, variables):
        """The state (a flax struct with ``step``, ``params``, ``batch_stats``, ...) from model variables (recipe)."""

    @abc.abstractmethod
    def make_step(self) -> Callable:
        """The pure ``step(state, batch, *args) -> (state, metrics)``; ``metrics["loss"]`` is checked (recipe)."""

    @abc.abstractmethod
    def steps_per_epoch(self, epoch: int) -> int:
        """Steps of epoch ``epoch`` (recipe; may differ per epoch, e.g. per training dataset)."""

    @abc.abstractmethod
    def batches(self, epoch: int, start: int, current_state: Callable[[], Any]) -> Iterator[tuple[dict, tuple]]:
        """``(this process's rows of the batch, step args)`` for steps ``start, start+1, ...`` of ``epoch``.

        ``current_state()`` returns the latest state (the triplet recipe mines with it) (recipe).
        """

    def starts_from_trained_weights(self) -> bool:
        """Whether the backbone starts trained (else frozen stages are refused): ``model.init_checkpoint``."""
        return bool(self.config.model.init_checkpoint)

    def start_epoch(self, state, epoch: int):
        return state

    def end_epoch(self, state, epoch: int):
        return state

    def host_state(self) -> dict:
        """Small host (numpy) state saved with every checkpoint, e.g. the mining cache."""
        return {}

    def host_parts(self) -> dict[str, tuple[int, Any]]:
        """Large host state saved in parts ``{name: (version, tree)}``, each written only when its version
        (the step it last changed at) is new, e.g. the classifiers of the groups not being trained."""
        return {}

    def load_host_state(self, tree: dict) -> None:
        """The restored host state: ``host_state()``'s keys and ``host_parts()``'s names."""

    def host_template(self) -> dict | None:
        """The host state's structure and shapes for restoring it (None: as saved; shapes that vary)."""
        return None

    def images_per_step(self) -> int:
        return int(self.config.train.batch_size)

    def log_extras(self) -> dict:
        """Constant values written with every "train" record (learning rates)."""
        return {"lr": self.config.train.lr}

    def epoch_summary(self, metrics: dict) -> str:
        """The recipe's part of the line printed after each epoch."""
        return f"loss {metrics.get('loss', float('nan')):.4f}"

    def validation_split(self) -> tuple[fmt.SplitDataset, str]:
        """``(split, queries folder)`` of model selection: ``data.val_split`` with ``data.val_queries``."""
        split_dir = fmt.resolve_folder(self.root, self.config.data.val_split, "Validation")
        return fmt.read_split(split_dir, self.config.data.val_queries), self.config.data.val_queries

    def test_sets(self) -> list[tuple[fmt.SplitDataset, str]]:
        """``(split, queries folder)`` pairs evaluated with the best model at the end."""
        test_dir = fmt.resolve_folder(self.root, self.config.data.test_split, "Test")
        queries = [q for q in str(self.config.data.test_queries).split(",") if q]
        return [(fmt.read_split(test_dir, q), q) for q in queries]

    def monitor_items(self) -> list[str]:
        """The ``"split_dir:queries"`` entries of ``data.monitor``."""
        return list(self.config.data.monitor)

    def monitor_splits(self) -> list[tuple[str, fmt.SplitDataset]]:
        """``(label, split)`` evaluated before training and after every epoch (``data.monitor``)."""
        out = []
        for item in self.monitor_items():
            split_dir, _, queries = item.partition(":")
            split = fmt.read_split(fmt.resolve_folder(self.root, split_dir, "Monitored"), queries or "queries")
            out.append((f"{Path(split_dir).name}/{queries or 'queries'}", split))
        return out

    # -- shared pieces -----------------------------------------------------------------------
    def _select_threshold_index(self) -> int:
        d = float(self.config.train.select_distance_m)
        if d == 0:
            return 0
        for i, t in enumerate(self.thresholds):
            if t.distance_m == d:
                return i
        raise ConfigError(f"config.train.select_distance_m={d} is not one of the evaluation thresholds "
                          f"{[t.label() for t in self.thresholds]}; choose one of them (0: the first).")

    def selection_recall(self, res: dict) -> float:
        return float(res["results"][self.select_index]["recall"][str(self.config.train.select_recall)])

    def selection_label(self) -> str:
        return f"R@{self.config.train.select_recall} {self.thresholds[self.select_index].label()}"

    def initial_variables(self) -> dict:
        size = (self.config.data.image_size,) * 2
        variables = init_variables(self.model_cfg, jax.random.key(self.config.seed), image_size=size)
        if self.config.model.init_checkpoint:
            loaded = load_init_checkpoint(self.config.model.init_checkpoint, self.model_cfg, variables)
            variables = jax.tree.map(lambda _, x: np.asarray(x), variables, loaded)
        return variables

    def shardings(self, state):
        return parallel.state_shardings(state, self.mesh, self.config.mesh.shard_params,
                                        int(self.config.mesh.get("shard_min_size", 2**18)))

    def place(self, state):
        return jax.device_put(state, self.shardings(state))

    def variables(self, state) -> dict:
        return {"params": state.params, "batch_stats": state.batch_stats}

    def say(self, text: str) -> None:
        """Prints on the main process only."""
        if self.is_main:
            print(text, flush=True)

    def recall(self, state, split: fmt.SplitDataset, queries: str) -> dict:
        describe = self.describer.bind(self.variables(state))
        return ev.evaluate_split(describe, split, queries, self.thresholds, self.eval_resize,
                                 batch_size=self.config.eval.batch_size,
                                 num_workers=self.config.data.num_workers, progress=False)

    def recall_many(self, variables: dict, items: list[tuple[fmt.SplitDataset, str]]) -> list[dict]:
        """Recalls of several ``(split, queries folder)``; a database shared by several is described once."""
        return ev.evaluate_query_sets(self.describer.bind(variables), items, self.thresholds, self.eval_resize,
                                      batch_size=self.config.eval.batch_size,
                                      num_workers=self.config.data.num_workers)

    def jit_step(self, state):
        """The step, jitted once: every state of the run has the shapes and shardings of ``state``."""
        replicated = parallel.replicated(self.mesh)
        state_sharding = self.shardings(state)
        options = DETERMINISTIC_GPU_OPTIONS if self.config.train.get("deterministic", False) else None
        return jax.jit(self.make_step(),
                       in_shardings=(state_sharding, parallel.batch_sharding(self.mesh)) + (replicated,) * self.step_args,
                       out_shardings=(state_sharding, replicated), donate_argnums=(0,), compiler_options=options)

    def save(self, state, progress: dict, is_best: bool = False) -> None:
        self.checkpointer.save(state, self.host_state(), progress, self.model_cfg, self.config, is_best=is_best,
                               parts=self.host_parts())

    # -- the run -----------------------------------------------------------------------------
    def fit(self) -> dict:
        """Runs (or resumes) the training in ``workdir`` and returns the final results.

        The workdir is locked meanwhile; checkpoints in flight are finished however the run ends.
        """
        with WorkdirLock(self.workdir, enabled=self.is_main):
            self.checkpointer = TrainCheckpointer(self.workdir, keep=self.config.train.keep_checkpoints)
            try:
                results = self.run()
            except BaseException:
                self.close(failed=True)
                raise
            self.close()
            return results

    def close(self, failed: bool = False) -> None:
        if self.logger is not None:
            self.logger.close()
        if self.checkpointer is not None:
            self.checkpointer.close(failed=failed)

    def run(self) -> dict:
        """The run itself (module doc, steps 1-4); :meth:`fit` opens and closes the workdir around it."""
        config, t, workdir = self.config, self.config.train, self.workdir
        self.val_split, self.val_queries = self.validation_split()
        if self.is_main:
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        if t.get("deterministic", False) and jax.default_backend() == "gpu" and \
                "xla_gpu_deterministic_ops=true" not in os.environ.get("XLA_FLAGS", ""):
            self.say(f"train.deterministic: the step is compiled deterministically; for evaluation and mining too, "
                     f"start the run with XLA_FLAGS=\"{DETERMINISTIC_XLA_FLAGS}\".")

        # 1. state: initial, or the latest checkpoint of this workdir
        state = self.initial_state(self.initial_variables())
        progress = {"epoch": 0, "step_in_epoch": 0, "best_recall": -1.0, "best_epoch": -1, "bad_epochs": 0}
        restored = self.checkpointer.restore_latest(state, self.shardings(state), self.host_template(),
                                                    {name: tree for name, (_, tree) in self.host_parts().items()})
        if restored is not None:
            state, host, saved = restored
            progress.update(saved)
            self.load_host_state(host)
            logging.info("resumed from step %d (epoch %d, iteration %d)", int(state.step), progress["epoch"],
                         progress["step_in_epoch"])
            self.say(f"Resuming {workdir} at epoch {progress['epoch']}, iteration {progress['step_in_epoch']}.")
        epoch_sums = progress.pop("metrics", None)  # of the epoch resumed mid-way
        self.logger = MetricsLogger(workdir, enabled=self.is_main,
                                    resume_step=None if restored is None else int(state.step))
        state = self.place(state)
        if jax.process_count() > 1 or jax.device_count() > 1:
            self.say(f"Topology: {parallel.describe_topology(self.mesh)}; global batch " + ", ".join(
                f"{k.split('.')[-1]} {v} ({v // jax.process_count()} per process)"
                for k, v in self.batch_sizes().items()) + ".")

        # 2. the step, compiled once
        step_fn = self.jit_step(state)

        # Monitored query sets (before training and after every epoch) with their chance levels.
        monitors = self.monitor_splits()
        table: list[tuple[str, dict]] = []
        evaluated: dict[int, dict] = {}  # per epoch: results, reused by the final val/test of the best epoch
        chance = {}
        for name, split in monitors:
            for th in self.thresholds:
                values = ev.chance_recalls(split.database, split.queries, th, (1, 5))
                if len(self.thresholds) == 1:
                    chance.update({f"{name}/R@{k}": v for k, v in values.items()})
                else:
                    chance[f"{name}/R@1 {th.label()}"] = values["1"]

        def monitor(label: str, variables: dict, epoch: int | None = None) -> dict:
            row = {}
            items = [(split, name.split("/")[-1]) for name, split in monitors]
            for (name, split), res in zip(monitors, self.recall_many(variables, items)):
                row.update({f"{name}/{k}": v for k, v in recall_row(res, self.thresholds).items()})
                if epoch is not None:
                    evaluated.setdefault(epoch, {})[(str(split.database.root), name.split("/")[-1])] = res
            if row:
                table.append((label, row))
                if self.is_main:
                    print_monitor_table(table, chance)
            return row

        if restored is None and t.eval_before_training and monitors:
            if t.eval_random_init:  # the untrained network, for scale
                monitor("random init", init_variables(self.model_cfg, jax.random.key(config.seed),
                                                      image_size=(config.data.image_size,) * 2))
            monitor("start" if config.model.init_checkpoint else "before training", self.variables(state))

        def log(record):  # a "train" record: the mean of every step since the last one
            if record is not None:
                step, values = record
                self.logger.write("train", step, **values, **self.log_extras())

        # 3. epochs
        for epoch in range(progress["epoch"], t.epochs):
            state = self.place(self.start_epoch(state, epoch))
            n_steps = self.steps_per_epoch(epoch)
            first_step = sum(self.steps_per_epoch(e) for e in range(epoch))
            start = progress["step_in_epoch"] if epoch == progress["epoch"] else 0
            metrics_so_far = EpochMetrics(epoch, t.log_every, self.images_per_step(), epoch_sums if start else None)
            batches = self.batches(epoch, start, lambda: state)
            for it in range(start, n_steps):
                local, args = next(batches)
                batch = parallel.global_batch(local, self.mesh)
                state, metrics = step_fn(state, batch, *args)
                step = first_step + it + 1
                log(metrics_so_far.push(metrics, it, step))  # fetches the previous step while this one runs
                if step % t.checkpoint_every == 0 and it + 1 < n_steps:
                    log(metrics_so_far.flush())
                    self.save(state, dict(progress, epoch=epoch, step_in_epoch=it + 1,
                                          metrics=metrics_so_far.progress()))
            log(metrics_so_far.flush())
            seconds = metrics_so_far.seconds()
            state = self.end_epoch(state, epoch)

            # validation, best model, early stopping
            val = self.recall(state, self.val_split, self.val_queries)
            evaluated.setdefault(epoch, {})["val"] = val
            selected = self.selection_recall(val)
            epoch_metrics = metrics_so_far.means()
            epoch_metrics.update({f"val/{k}": v for k, v in recall_row(val, self.thresholds).items()})
            epoch_metrics.update({"val/selection": selected, "images_per_s": metrics_so_far.images / max(seconds, 1e-9)})
            if t.get("monitor_epochs", True):
                epoch_metrics.update(monitor(f"epoch {epoch + 1}", self.variables(state), epoch))
            is_best = selected > progress["best_recall"]
            if is_best:
                progress.update(best_recall=selected, best_epoch=epoch, bad_epochs=0)
            else:
                progress["bad_epochs"] += 1
            progress.update(epoch=epoch + 1, step_in_epoch=0)
            self.logger.write("epoch", int(state.step), epoch=epoch, **epoch_metrics)
            self.save(state, progress, is_best=is_best)
            logging.info("epoch %d: %s", epoch, json.dumps({k: round(float(v), 4) for k, v in epoch_metrics.items()}))
            self.say(f"epoch {epoch + 1}/{t.epochs}: {self.epoch_summary(epoch_metrics)}, val "
                     f"{self.selection_label()} {selected:.1f}, {epoch_metrics['images_per_s']:.1f} img/s")
            if t.patience and progress["bad_epochs"] >= t.patience:
                self.say(f"Early stop: val {self.selection_label()} did not improve for {t.patience} epochs "
                         f"(best {progress['best_recall']:.1f} at epoch {progress['best_epoch'] + 1}).")
                break

        # 4. test with the best model
        results = self.final_results(state, progress, evaluated)
        if table:  # the monitored sets that were also tested, with the best model: the "after" row
            tested = {(r["dataset"], r["queries_folder"]): r for r in results["test"].values()}
            row = {}
            for name, split in monitors:
                res = tested.get((split.name, name.split("/")[-1]))
                if res is not None:
                    row.update({f"{name}/{k}": v for k, v in recall_row(res, self.thresholds).items()})
            if row.keys() == table[0][1].keys():
                table.append((f"best (epoch {progress['best_epoch'] + 1})", row))
                if self.is_main:
                    print_monitor_table(table, chance)
        results["monitor"] = table  # [label, {set/recall: value}] rows: before training, epochs, best
        if self.is_main:
            ev.atomic_write_text(workdir / "results.json", json.dumps(results, indent=2) + "\n")
            plot_run(workdir)
        return results

    def final_results(self, state, progress: dict, evaluated: dict) -> dict:
        best_variables = self.checkpointer.load_best_variables(self.model_cfg)
        if best_variables is None:
            best_variables = self.variables(state)
        results = {"best_epoch": progress["best_epoch"], "selection": self.selection_label(),
                   "best_val_selection": progress["best_recall"], "test": {}}
        best = evaluated.get(progress["best_epoch"], {})
        results["val"] = best.get("val") or self.recall_many(
            best_variables, [(self.val_split, self.val_queries)])[0]
        sets = self.test_sets()
        todo = [(split, q) for split, q in sets if (str(split.database.root), q) not in best]
        described = iter(self.recall_many(best_variables, todo))
        for split, queries in sets:
            res = best.get((str(split.database.root), queries)) or next(described)
            key = queries if len({s.name for s, _ in sets}) == 1 else f"{split.name}/{queries}"
            results["test"][key] = res
            self.say(ev.format_table(res["results"], f"test {split.name}/{queries} (best epoch {progress['best_epoch'] + 1})"))
        return results
