"""Runs a few train steps of a recipe on every visible device and saves the final parameters.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/scripts/train_steps.py OUT.npz \
        [--recipe cosplace|triplet] [--fsdp] [--bf16]

Used by tests/test_train.py and tests/test_triplet.py to compare 1 device with 8 (data parallel,
optionally FSDP-sharded parameters) and fp32 with bf16 compute: same initial state, same batches, so
the results must agree to the tolerance of the comparison. The step is the recipe's own
(``make_train_step``), jitted with the shardings the trainer uses (``parallel.state_shardings``).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jaxvpr import parallel
from jaxvpr.models import build_model, init_variables, model_config
from jaxvpr.train.loop import frozen_params_mask

# A small network with the pieces that matter for sharding: convolutions, BatchNorm, GeM, Linear.
MODEL = {"backbone": "resnet18conv4", "head": "gem", "fc_output_dim": 64}
SIZE = 48


def cosplace_run(config, model_cfg, model, variables, mesh, fsdp, rng):
    from jaxvpr.models.discriminator import DomainDiscriminator
    from jaxvpr.train import cosplace
    from jaxvpr.train.losses import init_cosface_weight

    config.grl.enabled = True
    config.grl.target_batch_size = 8
    config.grl.source_to_discriminator = 8
    txs = cosplace.make_optimizers(config, variables["params"], model_cfg)
    disc = DomainDiscriminator(n_domains=2)
    disc_params = disc.init(jax.random.key(1), jnp.zeros((1, 256)))["params"]
    weight = init_cosface_weight(np.random.default_rng(0), 40, 64)
    state = cosplace.TrainState(
        step=jnp.zeros((), jnp.int32), params=variables["params"], batch_stats=variables["batch_stats"],
        opt_state=txs[0].init(variables["params"]), classifier=jnp.asarray(weight),
        classifier_opt=txs[1].init(jnp.asarray(weight)), disc_params=disc_params, disc_opt=txs[2].init(disc_params))
    shardings = parallel.state_shardings(state, mesh, fsdp)
    step = jax.jit(cosplace.make_train_step(model, disc, txs, config),
                   in_shardings=(shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh)),
                   out_shardings=(shardings, parallel.replicated(mesh)))
    state = jax.device_put(state, shardings)
    losses = []
    for _ in range(3):
        batch = {"image": rng.normal(size=(16, SIZE, SIZE, 3)).astype(np.float32),
                 "label": rng.integers(0, 40, 16).astype(np.int32),
                 "target_image": rng.normal(size=(8, SIZE, SIZE, 3)).astype(np.float32)}
        state, metrics = step(state, parallel.global_batch(batch, mesh), jnp.float32(0.5))
        losses.append(float(metrics["loss"]))
    trees = {"params": state.params, "batch_stats": state.batch_stats, "classifier": state.classifier,
             "disc": state.disc_params}
    return trees, losses, [config.train.lr, config.train.classifiers_lr, config.grl.lr]


def triplet_run(config, model_cfg, model, variables, mesh, fsdp, rng):
    from jaxvpr.train import triplet

    config.train.lr = 1e-4
    tx = triplet.make_optimizer(config, variables["params"], model_cfg)
    state = triplet.TripletState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                                 batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))
    shardings = parallel.state_shardings(state, mesh, fsdp)
    step = jax.jit(triplet.make_train_step(model, tx, config, frozen_params_mask(model_cfg)),
                   in_shardings=(shardings, parallel.batch_sharding(mesh)),
                   out_shardings=(shardings, parallel.replicated(mesh)))
    state = jax.device_put(state, shardings)
    n = int(config.train.batch_size) * (2 + int(config.train.negs_num_per_query))  # 4 x 12 images
    # Structured triplets, so that the loss has something to learn: each query's positive is a noisy
    # copy of it, the negatives are other images.
    losses = []
    for _ in range(4):
        images = rng.normal(size=(n, SIZE, SIZE, 3)).astype(np.float32)
        images[1::12] = images[0::12] + rng.normal(size=images[0::12].shape)
        state, metrics = step(state, parallel.global_batch({"image": images}, mesh))
        losses.append(float(metrics["loss"]))
    return {"params": state.params, "batch_stats": state.batch_stats}, losses, [config.train.lr]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--recipe", default="cosplace", choices=["cosplace", "triplet"])
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()
    from jaxvpr.train.config import cosplace_config, triplet_config

    config = cosplace_config() if args.recipe == "cosplace" else triplet_config()
    config.mesh.shard_params = args.fsdp
    config.train.mixed_precision = args.bf16
    model_cfg = model_config(dict(MODEL, trainable_stages=None) if args.recipe == "triplet" else MODEL)
    model = build_model(model_cfg)
    variables = init_variables(model_cfg, jax.random.key(0), image_size=(SIZE, SIZE))
    mesh = parallel.make_mesh()
    run = cosplace_run if args.recipe == "cosplace" else triplet_run
    trees, losses, lrs = run(config, model_cfg, model, variables, mesh, args.fsdp, np.random.default_rng(0))
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(trees)}
    flat["__devices__"] = np.array(len(jax.devices()))
    flat["__loss__"] = np.array(losses)
    flat["__lr__"] = np.array(lrs)
    flat["__dtypes__"] = np.array(sorted({str(v.dtype) for v in jax.tree.leaves(trees)}))
    np.savez(args.out, **flat)


if __name__ == "__main__":
    main()
