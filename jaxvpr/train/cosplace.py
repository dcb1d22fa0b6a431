"""CosPlace training (Berton et al., CVPR 2022) with optional GRL domain adaptation (thesis ch. 4).

The story of a run, top to bottom:

1. data: the training folder's images are cut into classes and groups (``jaxvpr.data.cosplace``);
   epoch ``e`` trains group ``e mod groups_num``; every batch draws ``batch_size`` classes of that
   group uniformly and one random image of each (``jaxvpr.data.pipeline``), augmented as CosPlace
   (ColorJitter + RandomResizedCrop). With GRL, a second batch of ``target_batch_size`` unlabeled
   target images comes from ``data.target_folder``.
2. model: a ``VPRModel`` (default ResNet-18 + GeM, 512-d), frozen stages excluded from the optimizer;
   one CosFace classifier per group, kept in host memory except the group being trained.
3. the step: ``train_step(state, batch, grl_coeff) -> (state, metrics)``, pure, jitted once with
   explicit shardings over the mesh (batch split over the data axis).
   loss = CosFace(source) + lambda * CE(discriminator(GRL(features of source[:8] and target)))
   (thesis eq. 4.1), GRL coefficient from eq. 4.2 with p = epoch / epochs.
4. the loop: validation recall each epoch picks the best checkpoint; Orbax checkpoints every
   ``checkpoint_every`` steps and at epoch ends; the test set is evaluated with the best model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from ml_collections import ConfigDict

from jaxvpr import evaluate as ev
from jaxvpr import parallel
from jaxvpr.checkpoint import TrainCheckpointer
from jaxvpr.data import format as fmt
from jaxvpr.data import pipeline
from jaxvpr.data.augment import cosplace_augment
from jaxvpr.data.cosplace import cached_group_classes, check_groups_num
from jaxvpr.models import build_model, descriptor_dim, feature_dim, frozen_mask, init_variables, model_config
from jaxvpr.models.discriminator import DomainDiscriminator
from jaxvpr.models.grl import grad_reverse, grl_coefficient, grl_schedule
from jaxvpr.train import losses
from jaxvpr.train.config import ConfigError
from jaxvpr.train.logger import MetricsLogger, plot_run


class NonFiniteLossError(FloatingPointError):
    pass


@flax.struct.dataclass
class TrainState:
    """Everything the step changes. ``classifier`` is the CosFace weight of the group being trained."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    classifier: jax.Array
    classifier_opt: Any
    disc_params: Any
    disc_opt: Any


# ----------------------------------------------------------------------------- model and optimizers
def run_model_config(config: ConfigDict) -> ConfigDict:
    overrides = {}
    if config.model.fc_output_dim:
        overrides["fc_output_dim"] = int(config.model.fc_output_dim)
    if config.model.train_all_layers:
        overrides["trainable_stages"] = None  # CosPlace's --train_all_layers
    elif config.model.trainable_stages != -1:
        overrides["trainable_stages"] = config.model.trainable_stages
    if config.model.backbone or config.model.head:
        if not (config.model.backbone and config.model.head):
            raise ValueError("config.model.backbone and config.model.head go together (free composition).")
        return model_config({"backbone": config.model.backbone, "head": config.model.head}, **overrides)
    return model_config(config.model.name, **overrides)


# Fields of a model config that do not change its parameters: a checkpoint of the same architecture
# initialises a run whatever its name or freezing policy (e.g. the converted CosPlace hub model with
# --config.model.train_all_layers=True).
_NON_ARCHITECTURE_KEYS = ("name", "trainable_stages", "image_size")


def load_init_checkpoint(path: str, model_cfg: ConfigDict, expected_variables) -> Any:
    """The variables of ``model.init_checkpoint``, after checking architecture and every shape.

    ``path`` is a jaxvpr checkpoint folder (a training run's workdir, its ``best/``, or a converted
    model), or ``config:NAME``: the best model of ``configs/NAME.py`` trained by jaxvpr itself on
    first use and cached (:func:`jaxvpr.train.baseline.ensure_trained`; the demo's baseline).
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


def check_no_random_frozen_stages(model_cfg: ConfigDict, params, config: ConfigDict) -> None:
    """Frozen stages with random weights never learn: refuse them unless the config opts in.

    CosPlace freezes the early ResNet stages because they hold ImageNet weights; frozen *random*
    stages only pass random features to the trained ones (the demo of 21f01be did this).
    """
    if config.model.allow_random_frozen:
        return
    mask = frozen_mask(model_cfg, params)["backbone"]
    frozen = [name for name, sub in mask.items() if all(jax.tree.leaves(sub))]
    if frozen:
        raise ConfigError(
            f"The run trains {model_cfg.name} from random weights but keeps stages {frozen} frozen "
            f"(model trainable_stages={model_cfg.trainable_stages}): frozen random layers never learn. Start "
            "from trained weights (config.model.init_checkpoint: a converted CosPlace/ImageNet checkpoint or a "
            "jaxvpr run), train every stage (--config.model.train_all_layers=True), or set "
            "--config.model.allow_random_frozen=True if that is really what you want.")


def check_topology(config: ConfigDict, mesh) -> None:
    """Global batch sizes must split evenly over the data-parallel devices and the processes."""
    shards = parallel.num_batch_shards(mesh)
    procs = jax.process_count()
    sizes = {"train.batch_size": int(config.train.batch_size)}
    if config.grl.enabled:
        sizes["grl.target_batch_size"] = int(config.grl.target_batch_size)
    for field, size in sizes.items():
        for what, n in (("data-parallel devices (mesh data x fsdp)", shards), ("processes", procs)):
            if size % n:
                raise ConfigError(
                    f"config.{field}={size} is not divisible by the {n} {what} of this topology "
                    f"({parallel.describe_topology(mesh)}): every device holds an equal share of the batch. "
                    f"Use a multiple of {n} (e.g. --config.{field}={-(-size // n) * n}).")
    if config.grl.enabled and not 0 < config.grl.source_to_discriminator <= config.train.batch_size:
        raise ConfigError(f"config.grl.source_to_discriminator={config.grl.source_to_discriminator} must be in "
                         f"[1, train.batch_size={config.train.batch_size}].")


def make_optimizers(config: ConfigDict, params, model_cfg: ConfigDict | None = None) -> tuple[optax.GradientTransformation, ...]:
    """Adam for the model (frozen parameters: no update, no state), classifiers and discriminator."""
    mask = frozen_mask(model_cfg if model_cfg is not None else run_model_config(config), params)
    labels = jax.tree.map(lambda frozen: "frozen" if frozen else "train", mask)
    model_tx = optax.multi_transform({"train": optax.adam(config.train.lr), "frozen": optax.set_to_zero()}, labels)
    return model_tx, optax.adam(config.train.classifiers_lr), optax.adam(config.grl.lr)


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_loss_fn(model, discriminator, config: ConfigDict):
    """The pure loss ``(params, classifier, disc_params, batch_stats, batch, grl_coeff) -> (total, aux)``.

    Thesis eq. 4.1: ``total = CosFace(source) + lambda * CE(D(GRL(f)), domain)`` where ``f`` are the
    features (pooled backbone map, or descriptors) of ``source[:source_to_discriminator]`` and of the
    target images. The GRL is the identity forward and multiplies the gradient by ``-grl_coeff``
    backward, so ``d total / d trunk = dCosFace - lambda * coeff * dCE``, ``d total / d disc =
    lambda * dCE``, and the CosFace classifier gets no CE gradient.

    ``batch``: ``image`` (B,H,W,3) normalised, ``label`` (B,) class position in the group, and with
    GRL ``target_image`` (Bt,H,W,3). With ``grl.joint_batchnorm`` (default) source and target go
    through the model in one train-mode forward of the concatenated images, so every BatchNorm
    normalises both domains with the same statistics and the domain difference survives into the
    features the discriminator sees (with two passes each domain is normalised by its own batch
    statistics, which removes exactly the first and second moments that tell day from night; see
    README "The discriminator and BatchNorm"). ``aux = (batch_stats, metrics)``.
    """
    grl_on = bool(config.grl.enabled)
    n_src = int(config.grl.source_to_discriminator)
    weight = float(config.grl.weight)
    joint = bool(config.grl.joint_batchnorm)
    s, m = float(config.train.cosface_s), float(config.train.cosface_m)
    compute_dtype = jnp.bfloat16 if config.train.mixed_precision else jnp.float32
    use_features = config.grl.attach == "features"

    def forward(params, batch_stats, images):
        variables = {"params": _cast(params, compute_dtype), "batch_stats": batch_stats}
        (desc, feats), mutated = model.apply(variables, images.astype(compute_dtype), train=True,
                                             return_features=True, mutable=["batch_stats"])
        return desc.astype(jnp.float32), feats.astype(jnp.float32), mutated.get("batch_stats", batch_stats)

    def loss_fn(params, classifier, disc_params, batch_stats, batch, grl_coeff):
        n = batch["image"].shape[0]
        if grl_on and joint:
            all_desc, all_feats, batch_stats = forward(
                params, batch_stats, jnp.concatenate([batch["image"], batch["target_image"]]))
            desc, t_desc, feats, t_feats = all_desc[:n], all_desc[n:], all_feats[:n], all_feats[n:]
        else:
            desc, feats, batch_stats = forward(params, batch_stats, batch["image"])
            if grl_on:
                t_desc, t_feats, batch_stats = forward(params, batch_stats, batch["target_image"])
        cosface = losses.cosface_loss(desc, classifier, batch["label"], s, m)
        metrics = {"cosface_loss": cosface}
        total = cosface
        if grl_on:
            src, tgt = (feats, t_feats) if use_features else (desc, t_desc)
            x = grad_reverse(jnp.concatenate([src[:n_src], tgt]), grl_coeff)
            logits, hidden = discriminator.apply({"params": disc_params}, x, return_hidden=True)
            domains = jnp.concatenate([jnp.zeros(n_src, jnp.int32), jnp.ones(tgt.shape[0], jnp.int32)])
            domain_loss, accuracy = losses.domain_loss_and_accuracy(logits, domains)
            total = cosface + weight * domain_loss
            metrics.update(domain_loss=domain_loss, disc_accuracy=accuracy,
                           **discriminator_diagnostics(src[:n_src], tgt, hidden))
        metrics["loss"] = total
        return total, (batch_stats, metrics)

    return loss_fn


def discriminator_diagnostics(source: jax.Array, target: jax.Array, hidden: list) -> dict:
    """What tells the domains apart, and whether the discriminator can use it (logged per step).

    ``disc_active_units``: share of hidden units (over both hidden layers) active on at least one image
    of the batch (dead ReLUs make it drop); ``domain_mean_gap``: distance between the two domains' mean
    features divided by their within-domain standard deviation (near 0 when the domains' first
    moments match, which separate train-mode BatchNorm passes bring about).
    """
    if source.ndim == 4:
        source, target = source.mean(axis=(1, 2)), target.mean(axis=(1, 2))
    active = jnp.concatenate([jnp.any(h > 0, axis=0) for h in hidden]).mean()
    gap = jnp.linalg.norm(source.mean(0) - target.mean(0))
    spread = 0.5 * (jnp.sqrt(source.var(0).sum()) + jnp.sqrt(target.var(0).sum())) + 1e-12
    return {"disc_active_units": active, "domain_mean_gap": gap / spread}


def make_train_step(model, discriminator, txs, config: ConfigDict):
    """The pure step ``(state, batch, grl_coeff) -> (state, metrics)`` (loss: :func:`make_loss_fn`)."""
    model_tx, cls_tx, disc_tx = txs
    grl_on = bool(config.grl.enabled)
    loss_fn = make_loss_fn(model, discriminator, config)

    grad_fn = jax.grad(loss_fn, argnums=(0, 1, 2), has_aux=True)

    def train_step(state: TrainState, batch: dict, grl_coeff: jax.Array):
        (g_params, g_cls, g_disc), (batch_stats, metrics) = grad_fn(
            state.params, state.classifier, state.disc_params, state.batch_stats, batch, grl_coeff)
        updates, opt_state = model_tx.update(g_params, state.opt_state, state.params)
        cls_updates, classifier_opt = cls_tx.update(g_cls, state.classifier_opt, state.classifier)
        new = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
            classifier=optax.apply_updates(state.classifier, cls_updates),
            classifier_opt=classifier_opt,
        )
        if grl_on:
            disc_updates, disc_opt = disc_tx.update(g_disc, state.disc_opt, state.disc_params)
            new = new.replace(disc_params=optax.apply_updates(state.disc_params, disc_updates), disc_opt=disc_opt)
        metrics["grl_coeff"] = jnp.asarray(grl_coeff, jnp.float32)
        return new, metrics

    return train_step


# ----------------------------------------------------------------------------- data
def data_root(config: ConfigDict) -> Path:
    return fmt.dataset_root(config.data.root, config.data.synthetic_preset, config.data.synthetic_seed)


@dataclasses.dataclass
class TrainData:
    folder: fmt.ImageFolder
    groups: list[list[list[int]]]       # per group, per class: image indices
    target_paths: list[str] | None


def load_train_data(config: ConfigDict, root: Path, cache_dir: Path) -> TrainData:
    folder = fmt.read_image_folder(fmt.resolve_folder(root, config.data.train_folder, "Training"))
    t = config.train
    setting = dict(M=t.M, alpha=t.alpha, N=t.N, L=t.L, min_images_per_class=t.min_images_per_class)
    key = Path(config.data.train_folder).name + f"_{len(folder)}"
    classes_per_group, images_per_class = cached_group_classes(cache_dir, key, folder.utm, folder.heading, **setting)
    check_groups_num(classes_per_group, t.groups_num, str(folder.root))
    groups = [[images_per_class[c] for c in classes_per_group[g]] for g in range(t.groups_num)]
    for g, classes in enumerate(groups):
        if len(classes) < t.batch_size:
            raise ValueError(
                f"Group {g} has {len(classes)} classes, fewer than train.batch_size={t.batch_size}: a batch holds "
                "distinct classes. Lower train.batch_size or train.min_images_per_class.")
    target_paths = None
    if config.grl.enabled:
        if not config.data.target_folder:
            raise ValueError("grl.enabled needs config.data.target_folder (a folder of unlabeled target images).")
        target = fmt.resolve_folder(root, config.data.target_folder, "Target-domain")
        target_paths = [str(target / p) for p in fmt.list_images(target)]
    logging.info("training images %d, classes per group %s", len(folder), [len(g) for g in groups])
    return TrainData(folder, groups, target_paths)


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, stream): streams 0 source, 1 target."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


# ----------------------------------------------------------------------------- the run
class Trainer:
    """Holds what does not change during a run: data, model, jitted step, evaluators, checkpointer."""

    def __init__(self, config: ConfigDict, workdir: str | os.PathLike):
        self.config = config
        self.workdir = Path(workdir)
        self.is_main = jax.process_index() == 0
        self.mesh = parallel.mesh_from_config(config.mesh)
        self.model_cfg = run_model_config(config)
        check_topology(config, self.mesh)  # configs that cannot run fail before any work
        if not config.model.init_checkpoint:
            from jaxvpr.models import variable_shapes

            check_no_random_frozen_stages(self.model_cfg, variable_shapes(self.model_cfg)["params"], config)
        self.root = data_root(config)
        cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else self.workdir / "cache"
        self.data = load_train_data(config, self.root, cache_dir)
        self.model = build_model(self.model_cfg)
        self.dim = descriptor_dim(self.model_cfg)
        self.discriminator = DomainDiscriminator(n_domains=2)
        self.txs = None  # set from the initial parameters (make_optimizers)
        self.logger = MetricsLogger(self.workdir, enabled=self.is_main)
        self.checkpointer = TrainCheckpointer(self.workdir, keep=config.train.keep_checkpoints)
        self.describer = ev.Describer(self.model)  # per-process extraction, gathered
        self.val_split = fmt.read_split(fmt.resolve_folder(self.root, config.data.val_split, "Validation"),
                                        config.data.val_queries)
        self.thresholds = [ev.Threshold(float(config.data.positive_dist_threshold))]
        self.eval_resize = ev.parse_resize(config.data.eval_resize)

    # -- state
    def initial_variables(self):
        size = (self.config.data.image_size,) * 2
        variables = init_variables(self.model_cfg, jax.random.key(self.config.seed), image_size=size)
        if self.config.model.init_checkpoint:
            loaded = load_init_checkpoint(self.config.model.init_checkpoint, self.model_cfg, variables)
            variables = jax.tree.map(lambda _, x: np.asarray(x), variables, loaded)
        return variables

    def init_classifiers(self) -> list[dict]:
        """Host-side CosFace weights and Adam states, one per group (fresh classifiers, thesis §4.4.1)."""
        out = []
        for g, classes in enumerate(self.data.groups):
            rng = np.random.default_rng([self.config.seed, 1000 + g])
            weight = losses.init_cosface_weight(rng, len(classes), self.dim)
            out.append({"weight": weight, "opt": jax.tree.map(np.asarray, self.txs[1].init(weight))})
        return out

    def initial_state(self, variables, classifier: dict) -> TrainState:
        params = variables["params"]
        self.txs = make_optimizers(self.config, params, self.model_cfg)
        model_tx, cls_tx, disc_tx = self.txs
        in_dim = feature_dim(self.model_cfg) if self.config.grl.attach == "features" else self.dim
        disc_params = self.discriminator.init(jax.random.key(self.config.seed + 1), jnp.zeros((1, in_dim)))["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
            opt_state=model_tx.init(params), classifier=jnp.asarray(classifier["weight"]),
            classifier_opt=jax.tree.map(jnp.asarray, classifier["opt"]),
            disc_params=disc_params, disc_opt=disc_tx.init(disc_params))

    def place(self, state: TrainState) -> TrainState:
        shardings = parallel.state_shardings(state, self.mesh, self.config.mesh.shard_params)
        return jax.device_put(state, shardings)

    def variables(self, state: TrainState) -> dict:
        return {"params": state.params, "batch_stats": state.batch_stats}

    def say(self, text: str) -> None:
        """Prints on the main process only."""
        if self.is_main:
            print(text, flush=True)

    # -- evaluation
    def recall(self, state: TrainState, split: fmt.SplitDataset, queries: str) -> dict:
        describe = self.describer.bind(self.variables(state))
        return ev.evaluate_split(describe, split, queries, self.thresholds, self.eval_resize,
                                 batch_size=self.config.eval.batch_size,
                                 num_workers=self.config.data.num_workers, progress=False)

    def recall_many(self, state: TrainState | dict, named_splits: list[tuple[str, fmt.SplitDataset]]) -> list[dict]:
        """Recalls of several ``(".../<queries folder>", split)``; a database shared by several is described once."""
        describe = self.describer.bind(state if isinstance(state, dict) else self.variables(state))
        return ev.evaluate_query_sets(describe, [(split, name.split("/")[-1]) for name, split in named_splits],
                                      self.thresholds, self.eval_resize, batch_size=self.config.eval.batch_size,
                                      num_workers=self.config.data.num_workers)

    def monitor_splits(self) -> list[tuple[str, fmt.SplitDataset]]:
        out = []
        for item in self.config.data.monitor:
            split_dir, _, queries = item.partition(":")
            split = fmt.read_split(fmt.resolve_folder(self.root, split_dir, "Monitored"), queries or "queries")
            out.append((f"{Path(split_dir).name}/{queries or 'queries'}", split))
        return out


def _recall_row(res: dict) -> dict:
    r = res["results"][0]["recall"]
    return {"R@1": r["1"], "R@5": r["5"]}


def train(config: ConfigDict, workdir: str | os.PathLike) -> dict:
    """Runs (or resumes) a CosPlace/GRL training in ``workdir`` and returns the final results."""
    t = config.train
    trainer = Trainer(config, workdir)
    workdir = trainer.workdir
    if trainer.is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    variables = trainer.initial_variables()
    trainer.txs = make_optimizers(config, variables["params"], trainer.model_cfg)
    classifiers = trainer.init_classifiers()
    state = trainer.initial_state(variables, classifiers[0])
    progress = {"epoch": 0, "step_in_epoch": 0, "best_recall": -1.0, "best_epoch": -1}

    shardings = parallel.state_shardings(state, trainer.mesh, config.mesh.shard_params)
    restored = trainer.checkpointer.restore_latest(state, classifiers, shardings)
    if restored is not None:
        state, classifiers, progress = restored
        logging.info("resumed from step %d (epoch %d, iteration %d)", int(state.step), progress["epoch"],
                     progress["step_in_epoch"])
        trainer.say(f"Resuming {workdir} at epoch {progress['epoch']}, iteration {progress['step_in_epoch']}.")
    state = trainer.place(state)
    if jax.process_count() > 1 or jax.device_count() > 1:
        trainer.say(f"Topology: {parallel.describe_topology(trainer.mesh)}; global batch {t.batch_size} "
                    f"({t.batch_size // jax.process_count()} per process)"
                    + (f" + {config.grl.target_batch_size} target" if config.grl.enabled else "") + ".")
    data_sharding = parallel.batch_sharding(trainer.mesh)
    state_sharding = parallel.state_shardings(state, trainer.mesh, config.mesh.shard_params)
    step_fn = jax.jit(make_train_step(trainer.model, trainer.discriminator, trainer.txs, config),
                      in_shardings=(state_sharding, data_sharding, parallel.replicated(trainer.mesh)),
                      out_shardings=(state_sharding, parallel.replicated(trainer.mesh)),
                      donate_argnums=(0,))
    monitors = trainer.monitor_splits()
    table: list[tuple[str, dict]] = []

    # Results of this process's epochs, by epoch: the final val/test of the best epoch reuses them
    # instead of describing the same images again with the same weights.
    evaluated: dict[int, dict] = {}

    def monitor(label: str, state: TrainState | dict, epoch: int | None = None) -> dict:
        row = {}
        for (name, split), res in zip(monitors, trainer.recall_many(state, monitors)):
            for k, v in _recall_row(res).items():
                row[f"{name}/{k}"] = v
            if epoch is not None:
                evaluated.setdefault(epoch, {})[(str(split.database.root), name.split("/")[-1])] = res
        if row:
            table.append((label, row))
            if trainer.is_main:
                print_monitor_table(table, chance)
        return row

    chance = {}  # the chance level of each monitored recall (a random ranking of the database)
    for name, split in monitors:
        for k, v in ev.chance_recalls(split.database, split.queries, trainer.thresholds[0], (1, 5)).items():
            chance[f"{name}/R@{k}"] = v
    if restored is None and (t.eval_before_training and monitors):
        if t.eval_random_init:  # the untrained network, for scale (a random ResNet + GeM is no chance-level descriptor)
            monitor("random init", init_variables(trainer.model_cfg, jax.random.key(config.seed),
                                                  image_size=(config.data.image_size,) * 2))
        monitor("start" if config.model.init_checkpoint else "before training", state)

    augment_cfg = ConfigDict(dict(brightness=t.brightness, contrast=t.contrast, saturation=t.saturation,
                                  hue=t.hue, random_resized_crop=t.random_resized_crop,
                                  image_size=config.data.image_size))
    augment = functools.partial(cosplace_augment, cfg=augment_cfg)
    g = config.grl
    target_augment = functools.partial(cosplace_augment, cfg=ConfigDict(dict(
        brightness=g.target_brightness, contrast=g.target_contrast, saturation=g.target_saturation,
        hue=g.target_hue, random_resized_crop=g.target_random_resized_crop, image_size=config.data.image_size)))
    src_paths = trainer.data.folder.abs_paths()
    pid, pcount = jax.process_index(), jax.process_count()

    for epoch in range(progress["epoch"], t.epochs):
        group = epoch % t.groups_num
        state = state.replace(classifier=jax.device_put(jnp.asarray(classifiers[group]["weight"])),
                              classifier_opt=jax.tree.map(jnp.asarray, classifiers[group]["opt"]))
        state = trainer.place(state)
        coeff = grl_coefficient(epoch, t.epochs, config.grl.gamma) if config.grl.enabled else 0.0
        start = progress["step_in_epoch"] if epoch == progress["epoch"] else 0
        source = pipeline.train_batches(
            src_paths, pipeline.ClassBalancedSampler(trainer.data.groups[group], t.batch_size), t.batch_size, augment,
            seed=epoch_seed(config.seed, epoch, 0), start_step=start, process_index=pid, process_count=pcount,
            num_workers=config.data.num_workers)
        target = None
        if config.grl.enabled:
            target = pipeline.train_batches(
                trainer.data.target_paths, pipeline.UniformSampler(len(trainer.data.target_paths)),
                config.grl.target_batch_size, target_augment, seed=epoch_seed(config.seed, epoch, 1), start_step=start,
                process_index=pid, process_count=pcount, num_workers=config.data.num_workers)
        sums: dict[str, float] = {}       # this epoch's metric sums (epoch means)
        interval: dict[str, float] = {}   # sums since the last "train" record (interval means)
        count, pending, t0, seen = 0, None, time.time(), 0

        def take(metrics, it):  # fetch one step's metrics (checks the loss) into both sums
            nonlocal count
            for k, v in _accumulate(sums, metrics, epoch, it).items():
                interval[k] = interval.get(k, 0.0) + v
            interval["_n"] = interval.get("_n", 0) + 1
            count += 1

        for it in range(start, t.iterations_per_epoch):
            local = next(source)
            batch = {"image": local["image"], "label": local["label"]}
            if target is not None:
                batch["target_image"] = next(target)["image"]
            batch = parallel.global_batch(batch, trainer.mesh)
            if config.grl.enabled and config.grl.schedule == "step":
                total = t.epochs * t.iterations_per_epoch
                coeff = float(grl_schedule((epoch * t.iterations_per_epoch + it) / total, config.grl.gamma))
            state, metrics = step_fn(state, batch, jnp.float32(coeff))
            if pending is not None:  # check the previous step while this one runs
                take(pending, it - 1)
            pending = metrics
            seen += t.batch_size + (config.grl.target_batch_size if target is not None else 0)
            step = int(epoch * t.iterations_per_epoch + it + 1)
            if step % t.log_every == 0:  # the mean of every step since the last record
                take(pending, it)
                pending = None
                n = interval.pop("_n")
                trainer.logger.write("train", step, epoch=epoch, images_per_s=seen / (time.time() - t0),
                                     lr=t.lr, classifiers_lr=t.classifiers_lr, grl_lr=config.grl.lr,
                                     steps_averaged=n, **{k: v / n for k, v in interval.items()})
                interval.clear()
            if step % t.checkpoint_every == 0 and it + 1 < t.iterations_per_epoch:
                if pending is not None:
                    take(pending, it)
                    pending = None
                classifiers[group] = _to_host_classifier(state)
                trainer.checkpointer.save(state, classifiers, dict(progress, epoch=epoch, step_in_epoch=it + 1),
                                          trainer.model_cfg, config)
        if pending is not None:
            take(pending, t.iterations_per_epoch - 1)
        seconds = time.time() - t0
        classifiers[group] = _to_host_classifier(state)
        val = trainer.recall(state, trainer.val_split, config.data.val_queries)
        val_r = val["results"][0]["recall"]
        epoch_metrics = {k: v / max(count, 1) for k, v in sums.items()}
        epoch_metrics.update({"val/R@1": val_r["1"], "val/R@5": val_r["5"], "grl_coeff": coeff,
                              "images_per_s": seen / max(seconds, 1e-9), "group": group})
        evaluated.setdefault(epoch, {})["val"] = val
        epoch_metrics.update(monitor(f"epoch {epoch + 1}", state, epoch))
        is_best = val_r["1"] > progress["best_recall"]
        if is_best:
            progress.update(best_recall=val_r["1"], best_epoch=epoch)
        progress.update(epoch=epoch + 1, step_in_epoch=0)
        trainer.logger.write("epoch", int(state.step), epoch=epoch, **epoch_metrics)
        trainer.checkpointer.save(state, classifiers, progress, trainer.model_cfg, config, is_best=is_best)
        logging.info("epoch %d: %s", epoch, json.dumps({k: round(float(v), 4) for k, v in epoch_metrics.items()}))
        trainer.say(f"epoch {epoch + 1}/{t.epochs}: cosface {epoch_metrics.get('cosface_loss', float('nan')):.3f}"
              + (f", domain {epoch_metrics['domain_loss']:.3f}, disc acc {100 * epoch_metrics['disc_accuracy']:.1f}%"
                 f", GRL coeff {coeff:.3f}" if config.grl.enabled else "")
              + f", val R@1 {val_r['1']:.1f} R@5 {val_r['5']:.1f}, {epoch_metrics['images_per_s']:.1f} img/s")

    # test with the best model
    best_variables = trainer.checkpointer.load_best_variables(trainer.model_cfg)
    if best_variables is None:
        best_variables = trainer.variables(state)
    describe = trainer.describer.bind(best_variables)
    results = {"best_epoch": progress["best_epoch"], "best_val_recall@1": progress["best_recall"], "test": {}}
    best = evaluated.get(progress["best_epoch"], {})
    results["val"] = best.get("val") or ev.evaluate_split(
        describe, trainer.val_split, config.data.val_queries, trainer.thresholds, trainer.eval_resize,
        batch_size=config.eval.batch_size, num_workers=config.data.num_workers, progress=False)
    test_dir = fmt.resolve_folder(trainer.root, config.data.test_split, "Test")
    queries_list = [q for q in str(config.data.test_queries).split(",") if q]
    splits = [(fmt.read_split(test_dir, queries), queries) for queries in queries_list]
    todo = [(split, q) for split, q in splits if (str(split.database.root), q) not in best]
    described = iter(ev.evaluate_query_sets(describe, todo, trainer.thresholds, trainer.eval_resize,
                                            batch_size=config.eval.batch_size, num_workers=config.data.num_workers))
    tests = [best.get((str(split.database.root), q)) or next(described) for split, q in splits]
    for (split, queries), res in zip(splits, tests):
        results["test"][queries] = res
        trainer.say(ev.format_table(res["results"], f"test {split.name}/{queries} (best epoch {progress['best_epoch'] + 1})"))
    if trainer.is_main:
        ev.atomic_write_text(workdir / "results.json", json.dumps(results, indent=2) + "\n")
        plot_run(workdir)
    trainer.logger.close()
    trainer.checkpointer.close()
    return results


def _to_host_classifier(state: TrainState) -> dict:
    """The group's classifier and its Adam state as host numpy (gathered if sharded over processes)."""
    return {"weight": parallel.to_host(state.classifier), "opt": parallel.to_host(state.classifier_opt)}


def _accumulate(sums: dict, metrics, epoch: int, it: int) -> dict:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not np.isfinite(values["loss"]):
        raise NonFiniteLossError(
            f"The loss became {values['loss']} at epoch {epoch}, iteration {it} ({values}). Training stopped; "
            "the checkpoints already written are intact (the last good one is the latest in <workdir>/checkpoints). "
            "Lower the learning rates (train.lr, train.classifiers_lr, grl.lr) or grl.weight, and resume.")
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + v
    return values


def print_monitor_table(table: list[tuple[str, dict]], chance: dict | None = None) -> None:
    keys = list(table[0][1])
    header = f"{'':>16} | " + " | ".join(f"{k:>18}" for k in keys)
    print("\n" + header + "\n" + "-" * len(header))
    for label, row in table + ([("chance level", chance)] if chance else []):
        print(f"{label:>16} | " + " | ".join(f"{row.get(k, float('nan')):18.1f}" for k in keys))
    print(flush=True)
