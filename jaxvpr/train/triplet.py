"""Triplet fine-tuning for indoor VPR (thesis §5.4): the VG benchmark's recipe as the thesis fork runs it.

The story of a run, top to bottom:

1. data: each training dataset is a folder with ``database/`` and ``queries/``. A query's hard
   positives are the database images within ``train_positives_dist_threshold`` metres, its soft
   positives those within ``val_positive_dist_threshold``; queries without a hard positive are
   dropped (counted in the log). Several datasets train ``separated`` (epoch e trains dataset
   e mod N, mining inside it) or ``aggregated`` (one database and one query set, dataset k's easting
   shifted by k * 10^5 m so that no positive crosses datasets: thesis §5.4).
2. mining (``jaxvpr/train/mining.py``): an epoch is ceil(queries_per_epoch / cache_refresh_rate)
   cache refreshes. Each samples ``cache_refresh_rate`` queries (and for ``partial`` mining
   ``neg_samples_num`` database images), describes them with the current model in eval mode -- with
   jaxvpr's evaluator, each process its share, gathered -- and makes one triplet per query
   ``[query, nearest hard positive, 10 nearest negatives outside the soft positives]``.
3. the step: ``train_step(state, batch) -> (state, metrics)``, pure, jitted once with explicit
   shardings. ``batch["image"]`` holds ``batch_size`` triplets of 12 images (query, positive, 10
   negatives), one train-mode forward of all of them (BatchNorm statistics over the 48 images, as
   the VG benchmark), loss = the triplet margin loss (margin 0.1 on L2 distances) summed over the
   ``batch_size * negs_num_per_query`` (q, p, n) triplets (``TripletMarginLoss(reduction="sum")``)
   and divided by their number (VG ``train.py``). Adam 1e-5 on the trainable parameters.
4. the loop (``jaxvpr/train/loop.py``, shared with CosPlace): validation recall after every epoch,
   best model on ``R@train.select_recall`` at ``train.select_distance_m`` (default the fork's: R@5 at
   the first threshold, 1 m), early stopping after ``patience`` epochs without improvement, then the
   test datasets at every threshold with the best model. Checkpoints hold the current refresh's
   triplets (and ``full`` mining's negative memory), so a killed run resumes mid-refresh exactly.

Training images: shorter side ``data.train_resize`` (360) then a random ``train_crop`` (360) square,
every image of a triplet independently (the fork); DINOv2 inputs to the nearest multiple of 14 per
side (360 -> 364). Cache, validation and test: shorter side ``data.eval_resize`` (360).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from ml_collections import ConfigDict

from jaxvpr import evaluate as ev
from jaxvpr.data import format as fmt
from jaxvpr.data import pipeline
from jaxvpr.data.augment import triplet_augment
from jaxvpr.data.images import ConcatImages, ImageSource, as_images
from jaxvpr.data.images import ShorterSide
from jaxvpr.models import frozen_mask
from jaxvpr.models.registry import backbone_family
from jaxvpr.train import losses, mining
from jaxvpr.train.config import ConfigError
from jaxvpr.train.loop import Trainer, cast_floats, epoch_seed, frozen_params_mask, stop_frozen


@flax.struct.dataclass
class TripletState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


# ----------------------------------------------------------------------------- the step
def make_optimizer(config: ConfigDict, params, model_cfg: ConfigDict) -> optax.GradientTransformation:
    """Adam on the trainable parameters; frozen ones get no update and no state."""
    labels = jax.tree.map(lambda frozen: "frozen" if frozen else "train", frozen_mask(model_cfg, params))
    return optax.multi_transform({"train": optax.adam(config.train.lr), "frozen": optax.set_to_zero()}, labels)


def triplet_loss_of_descriptors(desc: jax.Array, batch_size: int, margin: float, squared: bool,
                                neg_mask: jax.Array | None = None) -> jax.Array:
    """Mean hinge over the (q, p, n_j) triplets of ``desc`` (batch_size * (2 + K), D), rows grouped
    per query as [q, p, n_1 .. n_K]: the VG benchmark's summed TripletMarginLoss divided by B * K.

    ``neg_mask`` (B, K) bool: only those triplets count, and the sum is divided by their number
    (AdAGeo's violating negatives, ``train.violating_only``; 0 when none is left)."""
    d = desc.reshape(batch_size, -1, desc.shape[-1])
    k = d.shape[1] - 2
    if neg_mask is None:
        total = losses.triplet_loss(d[:, 0], d[:, 1], d[:, 2:], margin=margin, squared=squared, reduction="sum")
        return total / (batch_size * k)
    hinges = losses.triplet_loss(d[:, 0], d[:, 1], d[:, 2:], margin=margin, squared=squared, reduction="none")
    mask = neg_mask.astype(hinges.dtype)
    return jnp.sum(hinges * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_train_step(model, tx: optax.GradientTransformation, config: ConfigDict, frozen):
    """The pure step ``(state, batch) -> (state, metrics)``; ``batch["image"]`` (B * 12, H, W, 3).

    Frozen parameters enter the forward behind ``stop_gradient`` (``loop.stop_frozen``). The dropout stream (SALAD's head) is keyed by the
    seed and the step, so a resumed run draws the same masks.
    """
    b = int(config.train.batch_size)
    margin, squared = float(config.train.margin), bool(config.train.squared_distance)
    compute_dtype = jnp.bfloat16 if config.train.mixed_precision else jnp.float32
    base_key = jax.random.key(int(config.seed) + 7)

    def loss_fn(params, batch_stats, images, step, neg_mask=None):
        variables = {"params": cast_floats(stop_frozen(params, frozen), compute_dtype), "batch_stats": batch_stats}
        desc, mutated = model.apply(variables, images.astype(compute_dtype), train=True, mutable=["batch_stats"],
                                    rngs={"dropout": jax.random.fold_in(base_key, step)})
        desc = desc.astype(jnp.float32)
        loss = triplet_loss_of_descriptors(desc, b, margin, squared, neg_mask)
        d = desc.reshape(b, -1, desc.shape[-1])
        d_pos = jnp.linalg.norm(d[:, 0] - d[:, 1], axis=-1)
        d_neg = jnp.linalg.norm(d[:, :1] - d[:, 2:], axis=-1)
        metrics = {"loss": loss, "triplet_loss": loss, "pos_distance": d_pos.mean(), "neg_distance": d_neg.mean(),
                   "active_triplets": jnp.mean((d_pos[:, None] - d_neg + margin) > 0)}
        return loss, (mutated.get("batch_stats", batch_stats), metrics)

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def train_step(state: TripletState, batch: dict):
        grads, (batch_stats, metrics) = grad_fn(state.params, state.batch_stats, batch["image"], state.step,
                                                batch.get("neg_mask"))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             batch_stats=batch_stats, opt_state=opt_state), metrics

    return train_step


# ----------------------------------------------------------------------------- data
@dataclasses.dataclass
class TrainingSet:
    """One mining unit: a dataset (separated) or the union of all (aggregated)."""

    name: str
    paths: ImageSource                  # database images first, then queries (files or packed folders)
    num_database: int
    positives: mining.TripletDataset
    queries_per_epoch: int

    def query_path_index(self, q: np.ndarray) -> np.ndarray:
        return self.num_database + np.asarray(q)


def split_list(text: str) -> list[str]:
    return [s.strip() for s in str(text).split(",") if s.strip()]


def triplet_positives(t: ConfigDict, db_utm, q_utm, db_heading, q_heading) -> mining.TripletDataset:
    """Hard and soft positives with the fields of ``config.train`` (``positives_angle_deg`` 0: distance only)."""
    angle = float(t.positives_angle_deg) or None
    return mining.build_triplet_dataset(db_utm, q_utm, float(t.train_positives_dist_threshold),
                                        float(t.val_positive_dist_threshold), db_heading, q_heading, angle)


def load_training_sets(config: ConfigDict, root) -> list[TrainingSet]:
    """The training datasets as mining units, with their positives (``separated``: one per dataset)."""
    t = config.train
    names = split_list(config.data.train_splits)
    if not names:
        raise ConfigError("config.data.train_splits is empty: name the training dataset folder(s) (each holding "
                          "database/ and queries/), comma-separated.")
    splits = [fmt.read_split(fmt.resolve_folder(root, n, "Training"), "queries") for n in names]
    qpe = [int(v) for v in split_list(t.queries_per_epoch)]
    if len(qpe) not in (1, len(names)):
        raise ConfigError(f"config.train.queries_per_epoch={t.queries_per_epoch!r}: give one value or one per "
                          f"training dataset ({len(names)}: {names}).")
    qpe = qpe * len(names) if len(qpe) == 1 else qpe
    if t.multi_dataset not in ("separated", "aggregated"):
        raise ConfigError(f"config.train.multi_dataset={t.multi_dataset!r}: 'separated' or 'aggregated'.")

    def unit(name, dbs, qs, db_utm, q_utm, n_queries):
        positives = triplet_positives(t, db_utm, q_utm, np.concatenate([f.heading for f in dbs]),
                                      np.concatenate([f.heading for f in qs]))
        paths = ConcatImages([f.abs_paths() for f in dbs] + [f.abs_paths() for f in qs])  # files or packed shards
        logging.info("training set %s: %d database images, %d queries, %d dropped (no hard positive within %g m)",
                     name, positives.num_database, positives.num_queries, positives.num_dropped,
                     t.train_positives_dist_threshold)
        return TrainingSet(name, paths, positives.num_database, positives, n_queries)

    if t.multi_dataset == "separated" or len(splits) == 1:
        return [unit(n, [s.database], [s.queries], s.database.utm, s.queries.utm, q)
                for n, s, q in zip(names, splits, qpe)]
    # aggregated: one database, one query set; dataset k shifted by k * offset metres (thesis §5.4).
    # Queries per epoch: the smallest of the datasets' values, as the fork's aggregated launcher does.
    db_utm = fmt.aggregate_utm([s.database.utm for s in splits], float(t.aggregate_offset_m))
    q_utm = fmt.aggregate_utm([s.queries.utm for s in splits], float(t.aggregate_offset_m))
    return [unit("+".join(names), [s.database for s in splits], [s.queries for s in splits],
                 np.concatenate(db_utm), np.concatenate(q_utm), min(qpe))]


def check_same_on_every_process(array: np.ndarray, what: str) -> None:
    """Every process must train on the same triplets: they all mine from the same gathered descriptors
    with the same seed, so a difference is a bug; stop rather than train on mismatched batches."""
    if jax.process_count() == 1:
        return
    from jaxvpr import parallel

    digest = np.frombuffer(hashlib.sha256(np.ascontiguousarray(array).tobytes()).digest()[:8], np.int64)
    digests = parallel.gather_rows(digest[None], jax.process_count())
    if (digests != digests[0]).any():
        raise RuntimeError(f"The processes disagree on {what}: every process must mine the same triplets.")


# ----------------------------------------------------------------------------- the trainer
class TripletTrainer(Trainer):
    """The triplet recipe's hooks on :class:`jaxvpr.train.loop.Trainer`."""

    def __init__(self, config: ConfigDict, workdir: str | os.PathLike):
        super().__init__(config, workdir)
        t = config.train
        if t.mining not in mining.METHODS:
            raise ConfigError(f"config.train.mining={t.mining!r}; choose one of {', '.join(mining.METHODS)}.")
        self.sets = self.load_sets()
        self.patch_multiple = self._patch_multiple()
        if self.patch_multiple:
            self.eval_resize = self._patch_eval_resize(self.eval_resize)
        self.augment = functools.partial(triplet_augment, resize=int(config.data.train_resize),
                                         crop=int(config.data.train_crop), patch_multiple=self.patch_multiple)
        self.tx = None
        # The mining cache of the refresh in progress (checkpointed): which epoch/refresh it belongs to.
        self.cache: dict[str, np.ndarray] = {}
        self.neg_caches = {s.name: mining.new_neg_cache(s.positives.num_queries, t.negs_num_per_query)
                           for s in self.sets} if t.mining == "full" else {}
        for s in self.sets:
            self.say(f"training set {s.name}: {s.num_database} database images, {s.positives.num_queries} queries "
                     f"({s.positives.num_dropped} without a hard positive within {t.train_positives_dist_threshold:g} m, "
                     f"dropped), {self.refreshes(s)} cache refreshes x {self.steps_per_refresh(s)} steps per epoch")

    def load_sets(self) -> list[TrainingSet]:
        """The mining units (``data.train_splits``; AdAGeo adds its pseudo-target queries)."""
        return load_training_sets(self.config, self.root)

    def _patch_eval_resize(self, spec):
        """Evaluation sizes for a patch model: shorter side N then sides rounded to the patch multiple."""
        m = self.patch_multiple
        if isinstance(spec, int):
            return ShorterSide(spec, m)
        if spec is None or any(int(v) % m for v in spec):
            raise ConfigError(f"config.data.eval_resize={self.config.data.eval_resize!r}: {self.model_cfg.name} takes "
                              f"sides that are multiples of {m}; give a shorter side (e.g. '360': sides rounded to "
                              f"multiples of {m}, as the thesis fork) or H,W multiples of {m}.")
        return spec

    def _patch_multiple(self) -> int:
        pm = int(self.config.data.patch_multiple)
        if pm >= 0:
            return pm
        return 14 if backbone_family(self.model_cfg.backbone) == "dinov2" else 0

    # -- sizes
    def refresh_rate(self, s: TrainingSet) -> int:
        """Queries sampled per cache refresh (``cache_refresh_rate``; 0: the epoch's queries)."""
        return int(self.config.train.cache_refresh_rate) or s.queries_per_epoch

    def refresh_size(self, s: TrainingSet) -> int:
        return min(self.refresh_rate(s), len(s.positives.valid_queries))

    def refreshes(self, s: TrainingSet) -> int:
        return max(1, math.ceil(s.queries_per_epoch / self.refresh_rate(s)))

    def steps_per_refresh(self, s: TrainingSet) -> int:
        steps = mining.dataset_steps(self.refresh_size(s), int(self.config.train.batch_size))
        if steps == 0:
            raise ConfigError(f"Training set {s.name} has {len(s.positives.valid_queries)} usable queries, fewer than "
                              f"train.batch_size={self.config.train.batch_size}: nothing to train on.")
        return steps

    def training_set(self, epoch: int) -> TrainingSet:
        return self.sets[epoch % len(self.sets)]

    # -- hooks
    def batch_sizes(self) -> dict[str, int]:
        t = self.config.train
        return {"train.batch_size x (2 + negs_num_per_query)": int(t.batch_size) * (2 + int(t.negs_num_per_query))}

    def eval_thresholds(self):
        return ev.parse_thresholds(self.config.eval.thresholds, self.config.eval.angles or None)

    def initial_state(self, variables) -> TripletState:
        params = variables["params"]
        self.tx = make_optimizer(self.config, params, self.model_cfg)
        return TripletState(step=jnp.zeros((), jnp.int32), params=params,
                            batch_stats=variables.get("batch_stats", {}), opt_state=self.tx.init(params))

    def make_step(self):
        return make_train_step(self.model, self.tx, self.config, frozen_params_mask(self.model_cfg))

    def steps_per_epoch(self, epoch: int) -> int:
        s = self.training_set(epoch)
        return self.refreshes(s) * self.steps_per_refresh(s)

    def images_per_step(self) -> int:
        return self.batch_sizes()["train.batch_size x (2 + negs_num_per_query)"]

    def host_state(self) -> dict:
        out = dict(self.cache)
        out.update({f"neg_cache/{k}": v for k, v in self.neg_caches.items()})
        return out

    def load_host_state(self, tree: dict) -> None:
        self.cache = {k: np.asarray(v) for k, v in tree.items() if not k.startswith("neg_cache/")}
        for k, v in tree.items():
            if k.startswith("neg_cache/"):
                self.neg_caches[k[len("neg_cache/"):]] = np.asarray(v)

    def mine(self, s: TrainingSet, epoch: int, refresh: int, state) -> np.ndarray:
        """One cache refresh: sample, describe (eval mode, sharded over processes), select triplets."""
        t = self.config.train
        rng = np.random.default_rng([int(self.config.seed), epoch, refresh, 17])
        neg_cache = self.neg_caches.get(s.name)
        plan = mining.plan(t.mining, s.positives, rng, self.refresh_rate(s), int(t.neg_samples_num), neg_cache)
        describe = self.describer.bind(self.variables(state))
        kw = dict(batch_size=int(self.config.eval.batch_size), resize=self.eval_resize,
                  num_workers=int(self.config.data.num_workers), progress=False, mixed_sizes=True)
        # Every method needs the sampled queries' descriptors (best positive); the database rows are the
        # plan's: the negative pool and the hard positives (partial), all (full), the positives (random).
        images = as_images(s.paths)
        q_desc = ev.extract_descriptors(describe, images.take(s.query_path_index(plan.queries)),
                                        desc="mining queries", **kw).values
        db_desc = ev.extract_descriptors(describe, images.take(plan.database), desc="mining database",
                                         **kw).values
        triplets, new_cache = mining.select(t.mining, s.positives, plan, q_desc, db_desc, rng,
                                            int(t.negs_num_per_query), int(t.neg_samples_num), neg_cache)
        if neg_cache is not None:
            self.neg_caches[s.name] = new_cache
        check_same_on_every_process(triplets, f"the triplets mined for epoch {epoch}, refresh {refresh}")
        out = {"triplets": triplets}
        if t.violating_only:
            out["neg_mask"] = mining.violation_mask(triplets, plan, q_desc, db_desc, float(t.margin))
        return out

    def batches(self, epoch: int, start: int, current_state):
        config, t = self.config, self.config.train
        s = self.training_set(epoch)
        per_refresh = self.steps_per_refresh(s)
        group = 2 + int(t.negs_num_per_query)
        images_per_step = int(t.batch_size) * group
        it, n_steps = start, self.steps_per_epoch(epoch)
        while it < n_steps:
            refresh, step_in_refresh = divmod(it, per_refresh)
            key = np.array([epoch, refresh], np.int64)
            if not ("key" in self.cache and np.array_equal(self.cache["key"], key)):
                self.cache = {"key": key, **self.mine(s, epoch, refresh, current_state())}
            # (resumed mid-refresh, the cache holds the checkpointed triplets and masks)
            triplets, neg_mask = self.cache["triplets"], self.cache.get("neg_mask")
            rows = triplets[: per_refresh * int(t.batch_size)]
            # triplet rows -> image indices into s.paths: the query is a query image, the rest database images
            images = np.concatenate([s.query_path_index(rows[:, :1]), rows[:, 1:]], axis=1).reshape(-1)
            source = pipeline.train_batches(
                s.paths, pipeline.SequenceSampler(images, period=group), images_per_step, self.augment,
                seed=epoch_seed(config.seed, epoch, 2 + refresh), start_step=step_in_refresh,
                process_index=jax.process_index(), process_count=jax.process_count(),
                num_workers=config.data.num_workers, num_steps=per_refresh)
            b, pid, pcount = int(t.batch_size), jax.process_index(), jax.process_count()
            for local in source:
                batch = {"image": local["image"]}
                if neg_mask is not None:  # this process's queries: the same share as its images
                    k = it - refresh * per_refresh
                    rows_mask = neg_mask[k * b:(k + 1) * b]
                    batch["neg_mask"] = rows_mask[pid * b // pcount:(pid + 1) * b // pcount]
                yield batch, ()
                it += 1

    def test_sets(self) -> list[tuple[fmt.SplitDataset, str]]:
        q = self.config.data.test_queries
        return [(fmt.read_split(fmt.resolve_folder(self.root, n, "Test"), q), q)
                for n in split_list(self.config.data.test_splits)]

    def epoch_summary(self, m: dict) -> str:
        return (f"triplet loss {m.get('triplet_loss', float('nan')):.4f}, "
                f"{100 * m.get('active_triplets', float('nan')):.0f}% triplets violate the margin")


def train(config: ConfigDict, workdir: str | os.PathLike) -> dict:
    """Runs (or resumes) triplet fine-tuning in ``workdir`` and returns the final results."""
    return TripletTrainer(config, workdir).fit()
