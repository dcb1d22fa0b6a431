"""Runs a few CosPlace+GRL train steps on every visible device and saves the final parameters.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/scripts/train_steps.py OUT.npz [--fsdp]

Used by tests/test_train.py to compare 1 device with 8 (data parallel, optionally FSDP-sharded
parameters): same initial state, same batches, so the results must agree to fp tolerance.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxvpr import parallel
from jaxvpr.models import build_model, init_variables, model_config
from jaxvpr.models.discriminator import DomainDiscriminator
from jaxvpr.train import cosplace
from jaxvpr.train.config import cosplace_config
from jaxvpr.train.losses import init_cosface_weight


def main(out: str, fsdp: bool):
    config = cosplace_config()
    config.grl.enabled = True
    config.grl.target_batch_size = 8
    config.grl.source_to_discriminator = 8
    config.mesh.shard_params = fsdp
    # A small network with the pieces that matter for sharding: convolutions, BatchNorm, GeM, Linear.
    model_cfg = model_config({"backbone": "resnet18conv4", "head": "gem", "fc_output_dim": 64})
    model = build_model(model_cfg)
    variables = init_variables(model_cfg, jax.random.key(0), image_size=(48, 48))
    txs = cosplace.make_optimizers(config, variables["params"], model_cfg)
    disc = DomainDiscriminator(n_domains=2)
    disc_params = disc.init(jax.random.key(1), jnp.zeros((1, 256)))["params"]
    weight = init_cosface_weight(np.random.default_rng(0), 40, 64)
    state = cosplace.TrainState(
        step=jnp.zeros((), jnp.int32), params=variables["params"], batch_stats=variables["batch_stats"],
        opt_state=txs[0].init(variables["params"]), classifier=jnp.asarray(weight),
        classifier_opt=txs[1].init(jnp.asarray(weight)), disc_params=disc_params, disc_opt=txs[2].init(disc_params))
    mesh = parallel.make_mesh()
    shardings = parallel.state_shardings(state, mesh, fsdp)
    state = jax.device_put(state, shardings)
    step = jax.jit(cosplace.make_train_step(model, disc, txs, config),
                   in_shardings=(shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh)),
                   out_shardings=(shardings, parallel.replicated(mesh)))
    rng = np.random.default_rng(0)
    losses = []
    for i in range(3):
        batch = {"image": rng.normal(size=(16, 48, 48, 3)).astype(np.float32),
                 "label": rng.integers(0, 40, 16).astype(np.int32),
                 "target_image": rng.normal(size=(8, 48, 48, 3)).astype(np.float32)}
        state, metrics = step(state, parallel.global_batch(batch, mesh), jnp.float32(0.5))
        losses.append(float(metrics["loss"]))
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in
            jax.tree_util.tree_leaves_with_path({"params": state.params, "batch_stats": state.batch_stats,
                                                 "classifier": state.classifier, "disc": state.disc_params})}
    flat["__devices__"] = np.array(len(jax.devices()))
    flat["__loss__"] = np.array(losses)
    flat["__lr__"] = np.array([config.train.lr, config.train.classifiers_lr, config.grl.lr])
    np.savez(out, **flat)


if __name__ == "__main__":
    main(sys.argv[1], "--fsdp" in sys.argv)
