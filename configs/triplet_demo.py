"""Triplet fine-tuning on synthetic indoor floors (thesis §5.4 in miniature), from a model of the street city.

    python -m jaxvpr.main --config configs/triplet_demo.py --workdir workdir/triplet_demo

The starting point is the CosPlace ResNet-18/512 that the GRL demo trains on the synthetic street
city (``config:demo_baseline``, trained on first use and cached, ~5 min; reused when the GRL demo
ran before). It is fine-tuned with mined triplets on one synthetic station floor (``station_b1``, like
thesis Table 5.9's GB1), validated on a mall floor (``mall_b1``, like HB1) and tested on the other
floors (``station_b2``, ``mall_1f``, ``mall_4f``: GB2, H1F, H4F). The synthetic `indoor_small` floors
are generated on first use (~1 min). It prints R@1 at 1, 5, 10 and 25 m on the test floors before
and after every epoch, with chance levels, and writes training.png.

Settings: the recipe's (partial mining, 10 hardest negatives among 1000 sampled database images,
margin 0.1 on L2 distances, batch 4 x 12 images, layer3 + layer4 trained as CosPlace/EigenPlaces)
with, for the 2-core budget: 3 epochs of 200 queries (one cache refresh, 50 steps each), 96 px
random crops of the 128 px images for training (the fork: shorter side 360 then a random 360 crop)
and native 128 px for evaluation; (hard, soft) thresholds (5, 10) m, one of the thesis' pairs (the
floors span ~45 m: with 25 m almost every image is a soft positive). Model selection: R@1 at 10 m
on the validation floor. Adam 1e-3 (thesis 1e-5, for thousands of steps) was chosen on that
validation floor (best epoch, seed 0): 1e-4 -> 41.0, 1e-3 -> 45.0 R@1 at 10 m; every stage trained
at 1e-3 was worse (37.5 at 96 px evaluation) and twice as slow. The test floors are evaluated
before training and with the best model only (``train.monitor_epochs=False``).
"""

from jaxvpr import presets


def get_config():
    return presets.triplet_demo()
