"""The benchmark on the synthetic indoor floors: four registry models at random init and one model
trained by jaxvpr, at the thesis' six thresholds (the stand-in for thesis §5.3 where no data can be
downloaded).

    python -m jaxvpr.benchmark --config configs/benchmark_synthetic.py --out workdir/benchmark_synthetic

The trained model is the demo's CosPlace baseline (configs/demo_baseline.py, trained on the synthetic
*street* city on first use and cached): a street-trained model meeting indoor floors, as the thesis'
published models do. Random networks are the floor any method must beat. Images are 128 px (the
floors' native size); DINOv2 inputs go to 126 px (a multiple of its 14 px patch).
"""

import ml_collections

from jaxvpr.benchmark import THESIS_THRESHOLDS


def get_config():
    c = ml_collections.ConfigDict()
    c.models = [
        dict(label="cosplace (jaxvpr, street city)", checkpoint="config:demo_baseline"),
        dict(label="cosplace", model="cosplace_resnet18_512", random_init=True),
        dict(label="netvlad", model="netvlad_resnet18conv4_64", random_init=True),
        dict(label="netvlad-alexnet", model="alexnet_netvlad_64", random_init=True),
        dict(label="dinov2", model="dinov2_vits14", random_init=True, resize="128/14"),
    ]
    c.datasets = ["synthetic:indoor_small"]
    c.thresholds = THESIS_THRESHOLDS
    c.out = "workdir/benchmark_synthetic"
    c.num_workers = 0
    c.save_predictions = 0
    return c
