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

from jaxvpr.train.config import adageo_config


def get_config():
    c = adageo_config()
    c.data.synthetic_preset = "small"
    c.data.synthetic_domains = "night"
    c.data.target_folder = "images/target/{domain}"  # the synthetic city's unlabeled pools
    c.data.num_workers = 2

    c.model.num_classes = 16
    c.adageo.scene_classes = 16
    c.adageo.backbone_checkpoint = "config:demo_baseline"
    c.adageo.scene_images = 800          # gallery images the scene classifier is fitted on (faiss: >= 39 per class)
    c.adageo.kmeans_images = 300
    c.adageo.kmeans_per_image = 16       # a 128 px image has 4 x 4 layer4 positions
    c.adageo.grl_lr = 1e-3               # the discriminator (AdAGeo 1e-5, which learns nothing in 150 steps)
    c.adageo.compare = "adageo_demo_netvlad"

    c.train.epochs = 2
    c.train.lr = 1e-4
    c.train.queries_per_epoch = "200"
    c.train.cache_refresh_rate = 200
    c.train.mining = "partial"           # 1,000 sampled gallery images per refresh (AdAGeo: the whole gallery)
    c.train.neg_samples_num = 1000
    c.train.positives_angle_deg = 30.0   # hard positives also within 30 deg of heading (AdAGeo: distance only)
    c.train.patience = 0
    c.train.log_every = 10
    c.train.checkpoint_every = 1000
    c.eval.batch_size = 64

    d = c.ddda
    d.model.ngf = 16
    d.data.resize = 144
    d.data.crop = 128
    d.train.phase1_epochs = 5            # BiOST's schedule: constant, then linear to 0 at the last epoch
    d.train.phase2_epochs = 5
    d.train.decay_epochs = 2
    d.train.iterations_per_epoch = 50
    d.train.log_every = 50
    return c
