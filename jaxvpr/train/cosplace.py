"""CosPlace training (Berton et al., CVPR 2022) with optional GRL domain adaptation (thesis ch. 4).

The story of a run, top to bottom:

1. data: the training folder's images are cut into classes and groups (``jaxvpr.data.cosplace``);
   epoch ``e`` trains group ``e mod groups_num``; every batch draws ``batch_size`` classes of that
   group uniformly and one random image of each (``jaxvpr.data.pipeline``), augmented as CosPlace
   (ColorJitter + RandomResizedCrop). With GRL, a second batch of ``target_batch_size`` unlabeled
   target images comes from ``data.target_folder``.
2. model: a ``VPRModel`` (default ResNet-18 + GeM, 512-d), frozen stages excluded from the optimizer;
   one CosFace classifier per group, kept in host memory except the group being trained. Under FSDP
   (``mesh.shard_params``) the group's classifier is padded in the train state to one shape for every
   group (the largest group's classes, rounded up to a multiple of the batch shards), so that the step
   compiles once and every group's rows split alike; the padding rows are masked out of the softmax
   (``losses.cosface_loss(num_classes=)``). Without FSDP the classifier keeps its group's shape (the
   step compiles once per distinct group size): a padded softmax sums in another order, and a
   200-step demo run is sensitive to the last bit of its losses (README, "What the demo shows").
3. the step: ``train_step(state, batch, grl_coeff, num_classes) -> (state, metrics)``, pure, jitted
   once with explicit shardings over the mesh (batch split over the data axis).
   loss = CosFace(source) + lambda * CE(discriminator(GRL(features of source[:8] and target)))
   (thesis eq. 4.1), GRL coefficient from eq. 4.2 with p = epoch / epochs.
4. the loop (``jaxvpr/train/loop.py``, shared with the triplet recipe): validation recall each
   epoch picks the best checkpoint; Orbax checkpoints every ``checkpoint_every`` steps and at epoch
   ends, written in the background; each group's classifier is a checkpoint part written only when
   it changed (the group being trained: every checkpoint; the others: never again until their next
   epoch); the test set is evaluated with the best model.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from ml_collections import ConfigDict

from jaxvpr import parallel
from jaxvpr.data import format as fmt
from jaxvpr.data import pipeline
from jaxvpr.data.augment import cosplace_augment
from jaxvpr.data.device_augment import AUGMENT_ON, DeviceAugment, host_decode, parse_load_size, step_key
from jaxvpr.data.cosplace import cached_group_classes, check_groups_num
from jaxvpr.data.images import ImageSource
from jaxvpr.models import feature_dim, frozen_mask
from jaxvpr.models.discriminator import DomainDiscriminator
from jaxvpr.models.grl import grad_reverse, grl_coefficient, grl_coefficient_at_step
from jaxvpr.train import losses
from jaxvpr.train.config import ConfigError
from jaxvpr.train.loop import (  # noqa: F401  (re-exported: the recipe's public names)
    NonFiniteLossError, Trainer, cast_floats, check_batch_sizes, epoch_seed, frozen_params_mask,
    load_init_checkpoint, run_model_config, stop_frozen)


@flax.struct.dataclass
class TrainState:
    """Everything the step changes. ``classifier`` is the CosFace weight of the group being trained,
    padded to ``CosPlaceTrainer.classifier_rows`` rows under FSDP (``classifier_opt`` alike).

    Checkpoints hold every group's classifier (unpadded) in the recipe's host parts, so the state's
    copy is not written twice (``not_checkpointed``).
    """

    not_checkpointed = ("classifier", "classifier_opt")

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    classifier: jax.Array
    classifier_opt: Any
    disc_params: Any
    disc_opt: Any


# ----------------------------------------------------------------------------- optimizers
def batch_sizes(config: ConfigDict) -> dict[str, int]:
    sizes = {"train.batch_size": int(config.train.batch_size)}
    if config.grl.enabled:
        sizes["grl.target_batch_size"] = int(config.grl.target_batch_size)
    return sizes


def check_topology(config: ConfigDict, mesh) -> None:
    """Global batch sizes must split evenly over the data-parallel devices and the processes."""
    check_batch_sizes(batch_sizes(config), mesh)
    if config.grl.enabled and not 0 < config.grl.source_to_discriminator <= config.train.batch_size:
        raise ConfigError(f"config.grl.source_to_discriminator={config.grl.source_to_discriminator} must be in "
                         f"[1, train.batch_size={config.train.batch_size}].")


def make_optimizers(config: ConfigDict, params, model_cfg: ConfigDict | None = None) -> tuple[optax.GradientTransformation, ...]:
    """Adam for the model (frozen parameters: no update, no state), classifiers and discriminator."""
    mask = frozen_mask(model_cfg if model_cfg is not None else run_model_config(config), params)
    labels = jax.tree.map(lambda frozen: "frozen" if frozen else "train", mask)
    model_tx = optax.multi_transform({"train": optax.adam(config.train.lr), "frozen": optax.set_to_zero()}, labels)
    return model_tx, optax.adam(config.train.classifiers_lr), optax.adam(config.grl.lr)


def make_loss_fn(model, discriminator, config: ConfigDict, frozen=None):
    """The pure loss ``(params, classifier, disc_params, batch_stats, batch, grl_coeff, num_classes) -> (total, aux)``.

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
    README "The discriminator and BatchNorm"). ``num_classes``: the classifier's rows that are classes
    (the rest is padding; None: all). ``aux = (batch_stats, metrics)``.
    """
    grl_on = bool(config.grl.enabled)
    padded = bool(config.mesh.get("shard_params", False))  # padding rows to mask (CosPlaceTrainer.classifier_rows)
    n_src = int(config.grl.source_to_discriminator)
    weight = float(config.grl.weight)
    joint = bool(config.grl.joint_batchnorm)
    s, m = float(config.train.cosface_s), float(config.train.cosface_m)
    compute_dtype = jnp.bfloat16 if config.train.mixed_precision else jnp.float32
    use_features = config.grl.attach == "features"

    def forward(params, batch_stats, images):
        variables = {"params": cast_floats(stop_frozen(params, frozen), compute_dtype), "batch_stats": batch_stats}
        (desc, feats), mutated = model.apply(variables, images.astype(compute_dtype), train=True,
                                             return_features=True, mutable=["batch_stats"])
        return desc.astype(jnp.float32), feats.astype(jnp.float32), mutated.get("batch_stats", batch_stats)

    def loss_fn(params, classifier, disc_params, batch_stats, batch, grl_coeff, num_classes=None):
        n = batch["image"].shape[0]
        if grl_on and joint:
            all_desc, all_feats, batch_stats = forward(
                params, batch_stats, jnp.concatenate([batch["image"], batch["target_image"]]))
            desc, t_desc, feats, t_feats = all_desc[:n], all_desc[n:], all_feats[:n], all_feats[n:]
        else:
            desc, feats, batch_stats = forward(params, batch_stats, batch["image"])
            if grl_on:
                t_desc, t_feats, batch_stats = forward(params, batch_stats, batch["target_image"])
        cosface = losses.cosface_loss(desc, classifier, batch["label"], s, m, num_classes if padded else None)
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


def make_train_step(model, discriminator, txs, config: ConfigDict, frozen=None):
    """The pure step ``(state, batch, grl_coeff, num_classes) -> (state, metrics)`` (loss: :func:`make_loss_fn`;
    ``num_classes``: the current group's classes, the classifier's other rows being padding)."""
    model_tx, cls_tx, disc_tx = txs
    grl_on = bool(config.grl.enabled)
    loss_fn = make_loss_fn(model, discriminator, config, frozen)
    augment = device_augmentation(config)

    grad_fn = jax.grad(loss_fn, argnums=(0, 1, 2), has_aux=True)

    def train_step(state: TrainState, batch: dict, grl_coeff: jax.Array, num_classes: jax.Array | None = None):
        if augment is not None:  # uint8 batches: augmented here, keyed by the step
            batch = augment(batch, state.step)
        (g_params, g_cls, g_disc), (batch_stats, metrics) = grad_fn(
            state.params, state.classifier, state.disc_params, state.batch_stats, batch, grl_coeff, num_classes)
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


def device_augmentation(config: ConfigDict):
    """``(batch, step) -> batch`` augmenting uint8 ``image`` (and ``target_image``) on the device as the
    host's ``cosplace_augment`` would (``data.augment_on="device"``); None when the host augments."""
    on = config.data.get("augment_on", "host")
    if on not in AUGMENT_ON:
        raise ValueError(f"data.augment_on={on!r}: expected one of {AUGMENT_ON}.")
    if on == "host":
        return None
    t, g, size = config.train, config.grl, (int(config.data.image_size),) * 2
    source = DeviceAugment(t.brightness, t.contrast, t.saturation, t.hue, t.random_resized_crop, size)
    target = DeviceAugment(g.target_brightness, g.target_contrast, g.target_saturation, g.target_hue,
                           g.target_random_resized_crop, size)
    seed = int(config.seed)

    def augment(batch: dict, step) -> dict:
        out = dict(batch, image=source(batch["image"], step_key(seed, step, 0)))
        if "target_image" in batch:
            out["target_image"] = target(batch["target_image"], step_key(seed, step, 1))
        return out

    return augment


# ----------------------------------------------------------------------------- data
@dataclasses.dataclass
class TrainData:
    folder: fmt.ImageFolder
    groups: list[list[list[int]]]       # per group, per class: image indices
    target_images: ImageSource | None   # unlabeled target images (files or a packed folder)


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
    target_images = None
    if config.grl.enabled:
        if not config.data.target_folder:
            raise ValueError("grl.enabled needs config.data.target_folder (a folder of unlabeled target images).")
        target = fmt.resolve_folder(root, config.data.target_folder, "Target-domain")
        target_images = fmt.folder_images(target)[0]
    logging.info("training images %d, classes per group %s", len(folder), [len(g) for g in groups])
    return TrainData(folder, groups, target_images)


# ----------------------------------------------------------------------------- the run
class CosPlaceTrainer(Trainer):
    """CosPlace (+ GRL): the hooks of :class:`jaxvpr.train.loop.Trainer`; the loop itself lives there.

    Epoch ``e`` trains group ``e mod groups_num``: its classifier (and Adam state) moves from host
    memory into the state (padded) at the start of the epoch and back at every checkpoint; each
    group's classifier is a checkpoint part (``host_parts``) versioned by the step it last changed at.
    """

    step_args = 2  # the GRL coefficient, the current group's number of classes

    def __init__(self, config: ConfigDict, workdir: str | os.PathLike):
        super().__init__(config, workdir)
        check_topology(config, self.mesh)
        cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else self.workdir / "cache"
        self.data = load_train_data(config, self.root, cache_dir)
        self.discriminator = DomainDiscriminator(n_domains=2)
        self.txs = None  # set from the initial parameters (make_optimizers)
        self.classifiers: list[dict] = []  # per group: weight, opt (Adam state), step (when it last changed)
        self.group = 0  # the group being trained (its classifier is in the state)
        # FSDP: one classifier shape for every group, the largest group rounded up so that its rows split
        # over the batch shards. Otherwise each group's own shape (None): no padding, no mask.
        shards = parallel.num_batch_shards(self.mesh)
        self.classifier_rows = (-(-max(len(g) for g in self.data.groups) // shards) * shards
                                if config.mesh.shard_params else None)
        t, g = config.train, config.grl
        if device_augmentation(config) is not None:  # the host decodes; the step augments
            self.augment = self.target_augment = functools.partial(
                host_decode, size=parse_load_size(config.data.get("load_size", "")))
            return
        self.augment = functools.partial(cosplace_augment, cfg=ConfigDict(dict(
            brightness=t.brightness, contrast=t.contrast, saturation=t.saturation, hue=t.hue,
            random_resized_crop=t.random_resized_crop, image_size=config.data.image_size)))
        self.target_augment = functools.partial(cosplace_augment, cfg=ConfigDict(dict(
            brightness=g.target_brightness, contrast=g.target_contrast, saturation=g.target_saturation,
            hue=g.target_hue, random_resized_crop=g.target_random_resized_crop, image_size=config.data.image_size)))

    # -- hooks
    def batch_sizes(self) -> dict[str, int]:
        return batch_sizes(self.config)

    def eval_thresholds(self):
        from jaxvpr.evaluate import Threshold

        return [Threshold(float(self.config.data.positive_dist_threshold))]

    def initial_state(self, variables) -> TrainState:
        """Fresh classifiers for every group (thesis §4.4.1) and the state holding group 0's."""
        params = variables["params"]
        self.txs = make_optimizers(self.config, params, self.model_cfg)
        self.classifiers = self.init_classifiers()
        model_tx, cls_tx, disc_tx = self.txs
        in_dim = feature_dim(self.model_cfg) if self.config.grl.attach == "features" else self.dim
        disc_params = self.discriminator.init(jax.random.key(self.config.seed + 1), jnp.zeros((1, in_dim)))["params"]
        classifier, classifier_opt = pad_classifier(self.classifiers[0], self.classifier_rows)
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
            opt_state=model_tx.init(params), classifier=classifier, classifier_opt=classifier_opt,
            disc_params=disc_params, disc_opt=disc_tx.init(disc_params))

    def init_classifiers(self) -> list[dict]:
        """Host-side CosFace weights and Adam states, one per group (changed at step 0)."""
        out = []
        for g, classes in enumerate(self.data.groups):
            rng = np.random.default_rng([self.config.seed, 1000 + g])
            weight = losses.init_cosface_weight(rng, len(classes), self.dim)
            out.append({"weight": weight, "opt": jax.tree.map(np.asarray, self.txs[1].init(weight)),
                        "step": np.zeros((), np.int64)})
        return out

    def make_step(self):
        return make_train_step(self.model, self.discriminator, self.txs, self.config,
                               frozen_params_mask(self.model_cfg))

    def steps_per_epoch(self, epoch: int) -> int:
        return int(self.config.train.iterations_per_epoch)

    def start_epoch(self, state: TrainState, epoch: int) -> TrainState:
        self.group = epoch % self.config.train.groups_num
        classifier, classifier_opt = pad_classifier(self.classifiers[self.group], self.classifier_rows)
        return state.replace(classifier=classifier, classifier_opt=classifier_opt)

    def host_template(self) -> dict:
        return {}

    def host_parts(self) -> dict:
        # Fresh classifiers have the shapes and optimizer-state structure of the saved ones: they are
        # the restore templates too.
        return {f"group_{g}": (int(c["step"]), c) for g, c in enumerate(self.classifiers)}

    def load_host_state(self, tree: dict) -> None:
        self.classifiers = [tree[f"group_{g}"] for g in range(len(self.classifiers))]

    def save(self, state, progress: dict, is_best: bool = False) -> None:
        # The group being trained lives in the state; every save (mid-epoch and the one ending each
        # epoch) brings it home first, so the next epoch's start_epoch finds it trained. A new host
        # copy, never an in-place update: the previous one may still be being written.
        self.classifiers[self.group] = _to_host_classifier(state, len(self.data.groups[self.group]))
        super().save(state, progress, is_best)

    def images_per_step(self) -> int:
        return int(self.config.train.batch_size) + (
            int(self.config.grl.target_batch_size) if self.config.grl.enabled else 0)

    def batches(self, epoch: int, start: int, current_state):
        config, t = self.config, self.config.train
        pid, pcount = jax.process_index(), jax.process_count()
        group = epoch % t.groups_num
        source = pipeline.train_batches(
            self.data.folder.abs_paths(), pipeline.ClassBalancedSampler(self.data.groups[group], t.batch_size),
            t.batch_size, self.augment, seed=epoch_seed(config.seed, epoch, 0), start_step=start,
            process_index=pid, process_count=pcount, num_workers=config.data.num_workers)
        target = None
        if config.grl.enabled:
            target = pipeline.train_batches(
                self.data.target_images, pipeline.UniformSampler(len(self.data.target_images)),
                config.grl.target_batch_size, self.target_augment, seed=epoch_seed(config.seed, epoch, 1),
                start_step=start, process_index=pid, process_count=pcount, num_workers=config.data.num_workers)
        coeff = grl_coefficient(epoch, t.epochs, config.grl.gamma) if config.grl.enabled else 0.0
        num_classes = jnp.int32(len(self.data.groups[group]))
        for it in range(start, t.iterations_per_epoch):
            local = next(source)
            batch = {"image": local["image"], "label": local["label"]}
            if target is not None:
                batch["target_image"] = next(target)["image"]
            if config.grl.enabled and config.grl.schedule == "step":
                coeff = float(grl_coefficient_at_step(epoch * t.iterations_per_epoch + it,
                                                      t.epochs * t.iterations_per_epoch, config.grl.gamma))
            yield batch, (jnp.float32(coeff), num_classes)

    def log_extras(self) -> dict:
        t = self.config.train
        return {"lr": t.lr, "classifiers_lr": t.classifiers_lr, "grl_lr": self.config.grl.lr}

    def epoch_summary(self, m: dict) -> str:
        text = f"cosface {m.get('cosface_loss', float('nan')):.3f}"
        if self.config.grl.enabled:
            text += (f", domain {m['domain_loss']:.3f}, disc acc {100 * m['disc_accuracy']:.1f}%"
                     f", GRL coeff {m['grl_coeff']:.3f}")
        return text


def train(config: ConfigDict, workdir: str | os.PathLike) -> dict:
    """Runs (or resumes) a CosPlace/GRL training in ``workdir`` and returns the final results."""
    return CosPlaceTrainer(config, workdir).fit()


def pad_classifier(group: dict, rows: int | None) -> tuple[jax.Array, Any]:
    """A group's classifier and Adam state with ``rows`` rows: its classes, then padding rows of ones
    (any non-zero row: a zero row's normalisation has a NaN gradient) with zero Adam moments. The
    loss masks the padding, which so gets zero gradients, zero moments and no update. ``rows=None``:
    as they are."""
    def pad(x, value):
        x = np.asarray(x)
        if x.ndim != 2 or rows is None:  # Adam's step count
            return jnp.asarray(x)
        return jnp.asarray(np.concatenate([x, np.full((rows - x.shape[0], x.shape[1]), value, x.dtype)]))

    return pad(group["weight"], 1.0), jax.tree.map(lambda x: pad(x, 0.0), group["opt"])


def _to_host_classifier(state: TrainState, num_classes: int) -> dict:
    """The group's classifier and its Adam state as host numpy without the padding rows (gathered if
    sharded over processes), marked as changed at the state's step."""
    unpad = lambda x: x[:num_classes] if x.ndim == 2 else x
    return {"weight": unpad(parallel.to_host(state.classifier)),
            "opt": jax.tree.map(unpad, parallel.to_host(state.classifier_opt)),
            "step": np.asarray(int(state.step), np.int64)}
