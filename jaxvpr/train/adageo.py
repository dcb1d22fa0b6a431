"""AdAGeo (Berton et al., "Adaptive-Attentive Geolocalization from few queries", WACV 2021) end to end.

The story of a run (``config.recipe = "adageo"``, fields in ``adageo_config``):

1. phase 1, DDDA (``jaxvpr/train/ddda.py``, with ``adageo.ddda``): ``adageo.n_target`` images (5)
   drawn from ``data.target_folder`` with the run's seed, BiOST's two autoencoders trained on the
   source training queries and those images, and pseudo-targets ``Dec_T(Enc_S(x))`` written for
   the source training and validation queries (same names, so the same labels) under
   ``<workdir>/ddda/pseudo_targets``. Done once; a resumed run reuses it.
2. the network: ResNet-18 (Places365 weights in the paper: ``model.init_checkpoint``; on the
   synthetic city ``adageo.backbone_checkpoint`` and a scene classifier fitted here,
   ``adageo.scene_classes``) with CAM attention and NetVLAD-64 (``jaxvpr/models/adageo.py``).
   NetVLAD is initialised by k-means (``adageo.kmeans_pool``: the paper's images of the three
   domains, or the code's gallery + queries + pseudo-targets) with the VG benchmark's alpha rule.
3. training: triplets mined as the triplet recipe does (``jaxvpr/train/triplet.py``) from the
   training queries = source queries and their pseudo-targets, with AdAGeo's settings (10 m
   positives, negatives beyond 25 m, persistent hard-negative memory, only negatives violating the
   margin sqrt(0.1) count). With ``adageo.grl`` each step also forwards ``grl_batch_size`` (8)
   images whose domains are drawn uniformly among source queries (0), pseudo-target queries (1)
   and the n target images (2) (without DDDA: source and target) and adds
   ``grl_weight`` (0.1) x the cross-entropy of a 512-50-20-n discriminator on their pooled layer4
   features behind a gradient reversal (coefficient 1). One Adam (1e-5) steps on everything.
4. validation on the pseudo-target validation queries (the source ones without DDDA), R@5 at 25 m,
   early stopping; test on ``data.test_queries`` (the target domain's test queries).

The step is pure, ``train_step(state, batch, grl_coeff) -> (state, metrics)``, jitted once with
explicit shardings by the shared loop (``jaxvpr/train/loop.py``), which also gives resume, NaN stop,
logs, ``training.png`` and ``results.json``.

Where jaxvpr differs from AdAGeo's code, on purpose: a query whose mined negatives all satisfy the
margin stays in the batch with zero weight (the code drops it from the batch; same loss, but its
images still enter the BatchNorm statistics); the candidate negatives are ``neg_samples_num``
gallery images drawn without replacement (the code: 1000 with replacement among those beyond 25 m);
the hard-negative memory persists (the paper-era code; HEAD loses it in DataLoader workers).
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from jaxvpr import evaluate as ev
from jaxvpr import parallel
from jaxvpr.data import format as fmt
from jaxvpr.data import pipeline
from jaxvpr.data.augment import grl_augment
from jaxvpr.data.images import ConcatImages, as_images
from jaxvpr.models import feature_dim
from jaxvpr.models.discriminator import DomainDiscriminator
from jaxvpr.models.grl import grl_coefficient
from jaxvpr.train import losses
from jaxvpr.train.config import ConfigError
from jaxvpr.train.loop import epoch_seed, frozen_params_mask, stop_frozen
from jaxvpr.train.triplet import (TrainingSet, TripletTrainer, make_optimizer, split_list,
                                  triplet_loss_of_descriptors, triplet_positives)

DOMAIN_NAMES = ("source queries", "pseudo-target queries", "target images")


@flax.struct.dataclass
class AdAGeoState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    disc_params: Any
    disc_opt_state: Any


def make_train_step(model, disc: DomainDiscriminator, tx, disc_tx, config: ConfigDict, frozen, grl_on: bool):
    """The pure step ``(state, batch, grl_coeff) -> (state, metrics)``.

    ``batch["image"]`` (B * 12, H, W, 3) triplet images as the triplet recipe's, ``batch["neg_mask"]``
    (B, 10) the negatives that count; with the GRL ``batch["grl_image"]`` (8, H, W, 3) and
    ``batch["grl_domain"]`` (8,). Two train-mode forwards (triplets, then GRL images: BatchNorm
    statistics updated by both, as AdAGeo's code); loss = triplet + grl_weight * CE.
    """
    b = int(config.train.batch_size)
    margin, squared = float(config.train.margin), bool(config.train.squared_distance)
    weight = float(config.adageo.grl_weight)

    def loss_fn(params, disc_params, batch_stats, batch, grl_coeff):
        p = stop_frozen(params, frozen)
        desc, mutated = model.apply({"params": p, "batch_stats": batch_stats}, batch["image"], train=True,
                                    mutable=["batch_stats"])
        triplet = triplet_loss_of_descriptors(desc, b, margin, squared, batch.get("neg_mask"))
        d = desc.reshape(b, -1, desc.shape[-1])
        d_pos = jnp.linalg.norm(d[:, 0] - d[:, 1], axis=-1)
        d_neg = jnp.linalg.norm(d[:, :1] - d[:, 2:], axis=-1)
        metrics = {"triplet_loss": triplet, "pos_distance": d_pos.mean(), "neg_distance": d_neg.mean()}
        if "neg_mask" in batch:
            metrics["counted_negatives"] = jnp.mean(batch["neg_mask"].astype(jnp.float32))
        stats, total = mutated.get("batch_stats", batch_stats), triplet
        if grl_on:
            (_, pooled), mutated = model.apply({"params": p, "batch_stats": stats}, batch["grl_image"], train=True,
                                               return_features=True, mutable=["batch_stats"])
            stats = mutated.get("batch_stats", stats)
            logits = disc.apply({"params": disc_params}, pooled, grl_coeff=grl_coeff)
            ce, accuracy = losses.domain_loss_and_accuracy(logits, batch["grl_domain"])
            total = triplet + weight * ce
            metrics.update(domain_ce=ce, disc_accuracy=accuracy)
        metrics["loss"] = total
        return total, (stats, metrics)

    grad_fn = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)

    def train_step(state: AdAGeoState, batch: dict, grl_coeff: jax.Array):
        (grads, disc_grads), (stats, metrics) = grad_fn(state.params, state.disc_params, state.batch_stats, batch,
                                                        grl_coeff)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        disc_updates, disc_opt_state = disc_tx.update(disc_grads, state.disc_opt_state, state.disc_params)
        metrics["grl_coeff"] = jnp.asarray(grl_coeff, jnp.float32)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             batch_stats=stats, opt_state=opt_state,
                             disc_params=optax.apply_updates(state.disc_params, disc_updates),
                             disc_opt_state=disc_opt_state), metrics

    return train_step


class AdAGeoTrainer(TripletTrainer):
    """AdAGeo's phase 2 on the triplet recipe's mining and the shared loop (module doc)."""

    step_args = 1  # the GRL coefficient

    def __init__(self, config: ConfigDict, workdir: str | os.PathLike):
        a = config.adageo
        if a.grl_coefficient not in ("constant", "schedule"):
            raise ConfigError(f"config.adageo.grl_coefficient={a.grl_coefficient!r}: 'constant' or 'schedule'.")
        if a.kmeans_pool not in ("paper", "code"):
            raise ConfigError(f"config.adageo.kmeans_pool={a.kmeans_pool!r}: 'paper' or 'code'.")
        self.phase1: dict = {}
        super().__init__(config, workdir)  # reads the training data (load_sets), which runs phase 1
        self.disc = DomainDiscriminator(n_domains=len(self.grl_domains))
        self.grl_augment = functools.partial(
            grl_augment, brightness=a.grl_brightness, contrast=a.grl_contrast, saturation=a.grl_saturation,
            hue=a.grl_hue)
        if a.grl:
            self.say("GRL domains: " + ", ".join(f"{i} {name} ({len(paths)})"
                                                 for i, (name, paths) in enumerate(self.grl_domains)))

    # -- data --------------------------------------------------------------------------------
    def _phase1(self) -> dict:
        """DDDA's pseudo-targets and target images (``adageo.ddda``), or the few-shot draw alone."""
        config, a = self.config, self.config.adageo
        target_dir = fmt.resolve_folder(self.root, self.with_domain(config.data.target_folder), "Target-domain")
        from jaxvpr.train import ddda

        targets = ddda.target_images(target_dir, int(a.n_target), int(config.seed))  # as phase 1 draws them
        if not a.ddda:  # the few-shot images alone
            return {"pseudo_targets": {}, "target_images": targets}

        cfg = ConfigDict(config.ddda.to_dict())
        cfg.seed = config.seed
        for key in ("root", "synthetic_preset", "synthetic_seed", "synthetic_domains", "target_folder",
                    "num_workers"):
            cfg.data[key] = config.data[key]
        cfg.data.n_target = int(a.n_target)
        cfg.data.target_folder = self.with_domain(config.data.target_folder)
        cfg.data.source_folders = self._train_queries_folder()
        cfg.data.translate = f"{self._train_queries_folder()},{self._val_queries_folder()}"
        workdir = self.workdir / "ddda"
        # One process trains DDDA and writes the pseudo-targets (hours on real data); the others wait
        # for it, then read what it wrote.
        phase1 = (parallel.on_main_process(lambda: ddda.ensure_pseudo_targets(cfg, workdir),
                                           f"adageo phase 1 in {workdir}") or ddda.ensure_pseudo_targets(cfg, workdir))
        if phase1["target_images"] != list(targets):
            raise ConfigError(f"{workdir / 'target_images.txt'} lists other target images than {target_dir} gives "
                              "now (the folder changed since phase 1 ran): use a new workdir.")
        return {**phase1, "target_images": targets}

    def _train_queries_folder(self) -> str:
        return f"{self.config.data.train_splits}/{self.config.data.train_queries}"

    def _val_queries_folder(self) -> str:
        return f"{self.config.data.val_split}/{self.config.data.val_queries}"

    def _pseudo_folder(self, relative: str) -> fmt.ImageFolder:
        out = self.phase1["pseudo_targets"].get(relative)
        if out is None:
            raise ConfigError(f"Phase 1 made no pseudo-targets of {relative!r} (it made "
                              f"{sorted(self.phase1['pseudo_targets'])}).")
        return fmt.read_image_folder(out)

    def load_sets(self) -> list[TrainingSet]:
        config, a, t = self.config, self.config.adageo, self.config.train
        if len(split_list(config.data.train_splits)) != 1:
            raise ConfigError(f"config.data.train_splits={config.data.train_splits!r}: AdAGeo trains on one "
                              "folder holding database/ and the source queries.")
        split = fmt.read_split(fmt.resolve_folder(self.root, config.data.train_splits, "Training"),
                               config.data.train_queries, config.data.database_folder)
        self.phase1 = self._phase1()
        folders = [split.queries]
        if a.ddda:
            folders.append(self._pseudo_folder(self._train_queries_folder()))
        targets = self.phase1["target_images"]
        self.grl_domains = [(DOMAIN_NAMES[0], split.queries.abs_paths())]
        if a.ddda:
            self.grl_domains.append((DOMAIN_NAMES[1], folders[1].abs_paths()))
        if targets:  # (0 shots, Fig. 5b: the discriminator tells source from pseudo-target only)
            self.grl_domains.append((DOMAIN_NAMES[2], targets))
        if a.grl and len(self.grl_domains) < 2:
            raise ConfigError("adageo.grl needs two domains: with adageo.n_target=0 turn on adageo.ddda "
                              "(source vs pseudo-target) or give target images.")
        q_utm = np.concatenate([f.utm for f in folders])
        positives = triplet_positives(t, split.database.utm, q_utm, split.database.heading,
                                      np.concatenate([f.heading for f in folders]))
        paths = ConcatImages([split.database.abs_paths()] + [f.abs_paths() for f in folders])
        per_epoch = int(t.queries_per_epoch) or math.ceil(len(positives.valid_queries) / float(a.epoch_divider))
        name = "source + pseudo-target queries" if a.ddda else "source queries"
        return [TrainingSet(name, paths, positives.num_database, positives, per_epoch)]

    def validation_split(self):
        """The pseudo-target validation queries with ``adageo.ddda`` (AdAGeo's selection), else the source ones."""
        data = self.config.data
        split_dir = fmt.resolve_folder(self.root, data.val_split, "Validation")
        queries = str(self._pseudo_folder(self._val_queries_folder()).root) if self.config.adageo.ddda else data.val_queries
        return fmt.read_split(split_dir, queries, data.database_folder), queries

    def test_sets(self) -> list[tuple[fmt.SplitDataset, str]]:
        split_dir = fmt.resolve_folder(self.root, self.config.data.test_splits, "Test")
        return [(fmt.read_split(split_dir, q, self.config.data.database_folder), q)
                for q in split_list(self.with_domain(self.config.data.test_queries))]

    def monitor_items(self) -> list[str]:
        return [self.with_domain(item) for item in self.config.data.monitor]

    def with_domain(self, text: str) -> str:
        """``text`` with ``{domain}`` replaced by ``adageo.domain``."""
        return str(text).replace("{domain}", str(self.config.adageo.domain))

    # -- state -------------------------------------------------------------------------------
    def starts_from_trained_weights(self) -> bool:
        return bool(self.config.model.init_checkpoint or self.config.adageo.backbone_checkpoint)

    def batch_sizes(self) -> dict[str, int]:
        sizes = super().batch_sizes()
        if self.config.adageo.grl:
            sizes["adageo.grl_batch_size"] = int(self.config.adageo.grl_batch_size)
        return sizes

    def initial_variables(self) -> dict:
        variables = super().initial_variables()
        if self.checkpointer.manager.latest_step() is not None:
            return variables  # resuming: every weight comes from the checkpoint
        a = self.config.adageo
        if a.backbone_checkpoint:
            variables = self._load_backbone(variables, a.backbone_checkpoint)
        if a.scene_classes:
            variables = self._fit_scene_classifier(variables)
        if a.kmeans_images:
            variables = self._kmeans_netvlad(variables)
        return variables

    def _load_backbone(self, variables: dict, path: str) -> dict:
        from jaxvpr.checkpoint import CheckpointError, check_tree_matches, load_model

        if path.endswith((".pth", ".tar", ".pt", ".safetensors")):
            return load_places365(variables, path, self.model_cfg)
        if path.startswith("config:"):
            from jaxvpr.train.baseline import ensure_trained

            path = str(ensure_trained(path[len("config:"):]))
        cfg, loaded = load_model(path)
        if cfg.backbone != self.model_cfg.backbone:
            raise CheckpointError(f"adageo.backbone_checkpoint {path} has backbone {cfg.backbone!r}, the run "
                                  f"{self.model_cfg.backbone!r}.")
        out = {k: dict(v) for k, v in variables.items()}
        for collection in backbone_collections(variables):
            check_tree_matches(variables[collection]["backbone"], loaded[collection]["backbone"],
                               f"{path} (adageo.backbone_checkpoint, {collection})")
            out[collection]["backbone"] = jax.tree.map(np.asarray, loaded[collection]["backbone"])
        self.say(f"backbone from {path} ({cfg.name})")
        return out

    def _features(self, variables: dict, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Pooled post-BN layer4 features (N, C) and the head's local features (N, 1, h * w, C), eval mode."""
        model, c = self.model, feature_dim(self.model_cfg)
        if getattr(self, "_features_fn", None) is None:  # compiled once for the scene classifier and k-means
            def features(v, x):
                (_, pooled), inter = model.apply(v, x, train=False, return_features=True, mutable=["intermediates"])
                local = inter["intermediates"]["head"]["local_features"][0]
                return jnp.concatenate([pooled, local.reshape(len(x), -1)], axis=1)

            self._features_fn = jax.jit(features)
        apply = self._features_fn
        v = jax.device_put(variables)
        out = ev.extract_descriptors(lambda x: apply(v, x), paths, batch_size=int(self.config.eval.batch_size),
                                     resize=self.eval_resize, num_workers=int(self.config.data.num_workers),
                                     progress=False).values
        out = np.asarray(out, np.float32)
        return out[:, :c], out[:, c:].reshape(len(out), 1, -1, c)  # positions flattened (h * w)

    def _fit_scene_classifier(self, variables: dict) -> dict:
        """No Places365 here: an N-way classifier of pooled features, classes = k-means of the gallery's UTM."""
        import faiss

        from jaxvpr.models.adageo import fit_scene_classifier

        a, s = self.config.adageo, self.sets[0]
        n_classes = int(self.model_cfg.num_classes)
        if int(a.scene_classes) != n_classes:
            raise ConfigError(f"adageo.scene_classes={a.scene_classes} but the model has {n_classes} classes: "
                              f"set --config.model.num_classes={a.scene_classes} too.")
        rng = np.random.default_rng([int(self.config.seed), 31])
        rows = np.sort(rng.choice(s.num_database, size=min(int(a.scene_images), s.num_database), replace=False))
        utm = s.positives.db_utm[rows].astype(np.float32)
        km = faiss.Kmeans(2, n_classes, niter=50, seed=int(self.config.seed))
        km.train(np.ascontiguousarray(utm - utm.mean(0)))
        _, labels = km.index.search(np.ascontiguousarray(utm - utm.mean(0)), 1)
        pooled, _ = self._features(variables, [s.paths[i] for i in rows])
        fc = fit_scene_classifier(pooled, labels[:, 0], n_classes, seed=int(self.config.seed))
        accuracy = float(np.mean(np.argmax(pooled @ fc["kernel"] + fc["bias"], 1) == labels[:, 0]))
        self.say(f"scene classifier: {n_classes} classes (k-means of {len(rows)} gallery positions), training "
                 f"accuracy {100 * accuracy:.0f}%")
        out = {k: dict(v) for k, v in variables.items()}
        out["params"]["head"] = {**variables["params"]["head"], "fc": fc}
        return out

    def _kmeans_pool(self) -> tuple[list[str], bool]:
        """Images whose local features initialise NetVLAD, and whether they are drawn with replacement."""
        s = self.sets[0]
        if self.config.adageo.kmeans_pool == "code":  # gallery + queries (+ pseudo-targets), with replacement
            return s.paths, True
        # paper: images of the 3 domains; a run without GRL never sees the target images
        used = self.grl_domains if self.config.adageo.grl else [d for d in self.grl_domains if d[0] != DOMAIN_NAMES[2]]
        return [p for _, paths in used for p in paths], False

    def _kmeans_netvlad(self, variables: dict) -> dict:
        from jaxvpr.models.netvlad import init_from_features, sample_local_descriptors

        a = self.config.adageo
        pool, replace = self._kmeans_pool()
        rng = np.random.default_rng([int(self.config.seed), 37])
        n = int(a.kmeans_images) if replace else min(int(a.kmeans_images), len(pool))
        picks = rng.choice(len(pool), size=n, replace=replace)
        _, local = self._features(variables, [pool[i] for i in picks])
        per_image = min(int(a.kmeans_per_image), local.shape[1] * local.shape[2])
        descriptors = sample_local_descriptors(local, per_image, rng)
        head = init_from_features(descriptors, int(self.model_cfg.num_clusters), seed=int(self.config.seed))
        self.say(f"NetVLAD: k-means of {len(descriptors)} local features of {n} images ({a.kmeans_pool}'s pool)")
        out = {k: dict(v) for k, v in variables.items()}
        out["params"]["head"] = {**variables["params"]["head"], "netvlad": head}
        return out

    def initial_state(self, variables) -> AdAGeoState:
        params = variables["params"]
        self.tx = make_optimizer(self.config, params, self.model_cfg)
        self.disc_tx = optax.adam(float(self.config.adageo.grl_lr))
        key = jax.random.key(int(self.config.seed) + 11)
        disc_params = self.disc.init(key, jnp.zeros((1, feature_dim(self.model_cfg))))["params"]
        return AdAGeoState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                           opt_state=self.tx.init(params), disc_params=disc_params,
                           disc_opt_state=self.disc_tx.init(disc_params))

    def make_step(self):
        return make_train_step(self.model, self.disc, self.tx, self.disc_tx, self.config,
                               frozen_params_mask(self.model_cfg), bool(self.config.adageo.grl))

    # -- batches -----------------------------------------------------------------------------
    def grl_coeff(self, epoch: int) -> float:
        a = self.config.adageo
        if a.grl_coefficient == "schedule":
            return grl_coefficient(epoch, int(self.config.train.epochs), float(a.grl_gamma))
        return 1.0

    def grl_batches(self, epoch: int, start: int):
        """The GRL images of epoch ``epoch`` from step ``start``: ``{"image", "label"}`` (label = domain)."""
        config, a = self.config, self.config.adageo
        images = ConcatImages([domain for _, domain in self.grl_domains])  # files or packed folders
        return pipeline.train_batches(
            images, pipeline.DomainSampler([len(d) for _, d in self.grl_domains]), int(a.grl_batch_size),
            functools.partial(self.grl_augment, size=self._grl_size()), seed=epoch_seed(config.seed, epoch, 1),
            start_step=start, process_index=jax.process_index(), process_count=jax.process_count(),
            num_workers=config.data.num_workers)

    def batches(self, epoch: int, start: int, current_state):
        grl = self.grl_batches(epoch, start) if self.config.adageo.grl else None
        coeff = jnp.float32(self.grl_coeff(epoch))
        for batch, _ in super().batches(epoch, start, current_state):
            if grl is not None:
                g = next(grl)
                batch["grl_image"], batch["grl_domain"] = g["image"], g["label"]
            yield batch, (coeff,)

    def _grl_size(self) -> tuple[int, int] | None:
        """The source queries' size: GRL images of another size are resized to it (AdAGeo's are all 512x384)."""
        size = as_images(self.grl_domains[0][1]).size(0)
        return None if size is None else (int(size[0]), int(size[1]))

    def log_extras(self) -> dict:
        return {"lr": self.config.train.lr, "grl_lr": self.config.adageo.grl_lr}

    def epoch_summary(self, m: dict) -> str:
        text = (f"triplet loss {m.get('triplet_loss', float('nan')):.4f}, "
                f"{100 * m.get('counted_negatives', float('nan')):.0f}% of the negatives violate the margin")
        if self.config.adageo.grl:
            text += (f", domain CE {m.get('domain_ce', float('nan')):.3f}, discriminator accuracy "
                     f"{100 * m.get('disc_accuracy', float('nan')):.0f}% (chance {100 / len(self.grl_domains):.0f}%)")
        return text


    def fit(self) -> dict:
        """Trains and tests (shared loop), then puts the runs of ``adageo.compare`` beside it."""
        results = super().fit()
        names = split_list(self.config.adageo.compare)
        if not names:
            return results
        from jaxvpr.train.baseline import ensure_trained

        rows = {}
        for name in names:
            done = ensure_trained(name[len("config:"):] if name.startswith("config:") else name)
            rows[name] = json.loads((done / "results.json").read_text())["test"]
        rows[f"this run ({self.config.model.name})"] = results["test"]
        results["compare"] = rows
        if self.is_main:
            print(comparison_table(rows, self.test_sets(), self.thresholds[0]), flush=True)
            ev.atomic_write_text(self.workdir / "results.json", json.dumps(results, indent=2) + "\n")
        return results


def backbone_collections(variables: dict) -> list[str]:
    """The variable collections that hold backbone weights: ``params``, and ``batch_stats`` unless the
    backbone has no BatchNorm (AlexNet)."""
    return [c for c in ("params", "batch_stats") if "backbone" in variables.get(c, {})]


def load_places365(variables: dict, path: str, model_cfg) -> dict:
    """``variables`` with the backbone and the CAM's classifier of a torchvision-layout ResNet file (the
    CSAIL ``resnet18_places365.pth.tar``, AdAGeo's start); NetVLAD keeps its (k-means) initialisation."""
    from jaxvpr.checkpoint import check_tree_matches
    from jaxvpr.convert.cnn import places365_rules
    from jaxvpr.convert.io import read_state_dict
    from jaxvpr.convert.rules import CheckpointMismatchError, apply_rules
    from jaxvpr.models.registry import backbone_family, resnet_spec

    state_dict = read_state_dict(path)
    alexnet = backbone_family(model_cfg.backbone) == "alexnet"
    rules = places365_rules(None if alexnet else resnet_spec(model_cfg.backbone)[0])
    names = {r.torch_name for r in rules}
    missing, unexpected = sorted(names - set(state_dict)), sorted(set(state_dict) - names)
    if missing or unexpected:
        raise CheckpointMismatchError(f"{path} is not a torchvision {model_cfg.backbone} with its fc (Places365 "
                                      f"layout): missing {missing[:5]}, unexpected {unexpected[:5]}.")
    loaded = apply_rules(state_dict, rules)
    out = {k: dict(v) for k, v in variables.items()}
    for collection in backbone_collections(variables):
        check_tree_matches(variables[collection]["backbone"], loaded[collection]["backbone"], f"{path} ({collection})")
        out[collection]["backbone"] = loaded[collection]["backbone"]
    fc = loaded["params"]["head"]["fc"]
    check_tree_matches(variables["params"]["head"]["fc"], fc, f"{path} (fc: set model.num_classes to its classes)")
    out["params"]["head"] = {**variables["params"]["head"], "fc": fc}
    return out


def comparison_table(rows: dict[str, dict], test_sets, threshold) -> str:
    """Test R@1 / R@5 of several runs on the same query sets, with the chance level."""
    keys = [q for _, q in test_sets]
    width = max(24, *(len(n) for n in rows))
    header = f"{'run':>{width}} | " + " | ".join(f"{k + ' R@1/R@5':>22}" for k in keys)
    lines = [header, "-" * len(header)]

    def cell(res):
        r = res["results"][0]["recall"] if res else None
        return f"{r['1']:>10.1f} / {r['5']:<9.1f}" if r else f"{'-':>22}"

    for name, test in rows.items():
        lines.append(f"{name:>{width}} | " + " | ".join(cell(test.get(k)) for k in keys))
    chance = [ev.chance_recalls(split.database, split.queries, threshold, (1, 5)) for split, _ in test_sets]
    lines.append(f"{'chance level':>{width}} | " + " | ".join(f"{c['1']:>10.1f} / {c['5']:<9.1f}" for c in chance))
    return "\n".join(["", *lines, ""])


def train(config: ConfigDict, workdir: str | os.PathLike) -> dict:
    """Runs (or resumes) AdAGeo (phase 1 if needed, then phase 2) in ``workdir``; returns the results."""
    return AdAGeoTrainer(config, workdir).fit()


__all__ = ["AdAGeoState", "AdAGeoTrainer", "make_train_step", "train"]
