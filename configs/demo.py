"""The embedded demo: a random-init CosPlace ResNet-18 on the synthetic city, day vs night queries.

    python -m jaxvpr.main --config configs/demo.py --workdir /tmp/jaxvpr_demo

Generates the synthetic `small` city on first use (cached in $JAXVPR_CACHE or ~/.cache/jaxvpr), then
prints recall tables for the daylight test queries and the night test queries.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.recipe = "evaluate"
    c.seed = 0

    c.data = ConfigDict()
    c.data.root = ""                 # empty: $JAXVPR_DATA, else the synthetic city
    c.data.synthetic_preset = "small"
    c.data.synthetic_seed = 0
    c.data.image_size = 128          # synthetic images are 128x128
    c.data.num_workers = 0

    c.model = ConfigDict()
    c.model.name = "cosplace_resnet18_512"
    c.model.checkpoint = ""          # empty: random weights (seeded by c.seed)

    c.eval = ConfigDict()
    c.eval.split = "test"
    c.eval.queries = ("queries", "queries_night")
    c.eval.thresholds = "25"
    c.eval.angles = ""
    c.eval.resize = ""               # native size
    c.eval.batch_size = 32
    return c
