"""Trains CosPlace over two groups of different class counts on every visible device and reports how.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/scripts/fsdp_groups.py ROOT WORKDIR OUT.json

The run (tests/helpers.tiny_cosplace_config, cut to 2 epochs of 2 steps, batch 8) has FSDP on
(``mesh.shard_params``) with a small ``mesh.shard_min_size``, so that the classifier (and most
weights) are split over the devices. OUT.json: the class counts of the groups, the classifier's
rows in the state, how often the step was traced (compiled), and the classifier's sharding in each
epoch. Used by tests/test_train.py.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from helpers import tiny_cosplace_config  # noqa: E402
from jaxvpr.train.cosplace import CosPlaceTrainer  # noqa: E402


def main(root: str, workdir: str, out: str) -> None:
    c = tiny_cosplace_config(root)
    c.train.epochs, c.train.iterations_per_epoch, c.train.checkpoint_every = 2, 2, 1000
    c.train.lr = 1e-4                         # Adam's ~lr moves of near-zero gradients stay small
    c.train.batch_size = c.grl.target_batch_size = c.grl.source_to_discriminator = 8
    c.train.N, c.train.L = 2, 2               # groups of 37 and 33 classes on the tiny dataset
    c.model.fc_output_dim = 32                # fewer columns than rows: FSDP splits the classifier's rows
    c.mesh.shard_params, c.mesh.shard_min_size = True, 1024
    trainer = CosPlaceTrainer(c, workdir)
    traces, specs = [], []
    make_step, place = trainer.make_step, trainer.place

    def counting_make_step():
        step = make_step()

        def traced(*args):  # runs when jax traces the step, i.e. once per compilation
            traces.append(1)
            return step(*args)

        return traced

    def recording_place(state):
        state = place(state)
        specs.append(str(state.classifier.sharding.spec))
        return state

    trainer.make_step, trainer.place = counting_make_step, recording_place
    trainer.fit()
    Path(out).write_text(json.dumps({
        "devices": jax.device_count(), "groups": [len(g) for g in trainer.data.groups],
        "rows": trainer.classifier_rows, "traces": len(traces), "classifier_specs": specs}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
