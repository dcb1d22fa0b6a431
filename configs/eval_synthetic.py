"""Evaluate a model on the synthetic city's test split, daylight and night queries (no training).

    python -m jaxvpr.main --config configs/eval_synthetic.py --workdir workdir/eval
    python -m jaxvpr.main --config configs/eval_synthetic.py --config.model.checkpoint=workdir/demo

With no checkpoint the model has random weights (seeded by config.seed): the numbers show the
domain gap of the synthetic city for a fixed descriptor.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.recipe = "evaluate"
    c.seed = 0
    c.data = ConfigDict(dict(root="", synthetic_preset="small", synthetic_seed=0, image_size=128, num_workers=0))
    c.model = ConfigDict(dict(name="cosplace_resnet18_512", checkpoint=""))
    c.eval = ConfigDict(dict(split="test", queries=("queries", "queries_night"), thresholds="25", angles="",
                             resize="", batch_size=32))
    return c
