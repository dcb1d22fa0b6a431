"""AdAGeo on the synthetic city: 5 unlabeled night images adapt a street-view place recognizer to night.

    python -m jaxvpr.main --config configs/adageo_demo.py --workdir workdir/adageo_demo

The stand-in for SVOX -> RobotCar (AdAGeo Table 1): the city's street-view database and daylight
pedestrian queries are the source (SVOX), its night queries the target (RobotCar night). Phase 1
(DDDA) draws 5 images from the unlabeled night pool (images/target/night), trains BiOST's two
autoencoders and writes pseudo-night versions of the training and validation queries
(<workdir>/ddda/pseudo_targets, and a Fig. 3-style grid <workdir>/ddda/pseudo_targets.png). Phase 2
trains ResNet-18 + CAM attention + NetVLAD-64 with the triplet loss on the source and pseudo-night
queries and a 3-domain GRL, selects the epoch on the pseudo-night validation queries, and tests on the
night test queries (images/test/queries_night). At the end it prints night R@1/R@5 beside the NetVLAD
baseline, ``configs/adageo_demo_netvlad.py`` (the same network without attention, trained on the
source queries only), trained on first use and cached.

Starting point: no Places365 weights can be downloaded here, so the ResNet-18 is the demos' CosPlace
model trained by jaxvpr on the same city (``config:demo_baseline``, ~4 min once, cached) and the CAM's
scene classifier is fitted here (16 classes: k-means regions of the training gallery). Differences from
the paper for the 2-core budget, each a field below: DDDA with 16 base channels (paper 64) at the
city's 128 px (crops 128 of 144), 5 epochs of 50 steps per phase; phase 2 with Adam 1e-4 (paper 1e-5) for 2 epochs of
200 queries, hard negatives mined among 1,000 sampled gallery images (AdAGeo: the whole gallery), hard
positives within 10 m and 30 deg of heading (AdAGeo: 10 m; the city's gallery has ~180 images of every
heading within 10 m of a query, which made mining describe all of it each epoch). Measured (README):
night R@1 AdAGeo 12.8 +- 2.0 over seeds 0-2 against NetVLAD's 8.3 +- 0.9; ~15 minutes with the CosPlace model cached.
"""

from jaxvpr import presets


def get_config():
    return presets.adageo_demo()
