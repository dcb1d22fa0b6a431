"""Named training presets: the settings behind ``configs/*.py``, importable from the package.

A config file is a short ``get_config()`` that returns one of these (and its docstring says how it was
chosen); a config that varies another (the demo's control, Tokyo 24/7 after SF-XS, AdAGeo's five
weather domains) calls the preset, never a sibling file. ``load_config_file("demo_baseline")``
(``model.init_checkpoint = "config:demo_baseline"``) falls back to these where no ``configs/`` folder
is at hand (an installed package).

    from jaxvpr import presets
    c = presets.get("adageo_svox", domain="snow")
"""

from __future__ import annotations

from typing import Callable

from ml_collections import ConfigDict

from jaxvpr.train.config import adageo_config, cosplace_config, triplet_config


# --- CosPlace + GRL on the synthetic city (configs/demo_baseline.py, demo.py, demo_nogrl.py) ---

def demo_baseline() -> ConfigDict:
    """The demos' starting point: CosPlace (no GRL) trained on the synthetic `small` city."""
    c = cosplace_config()
    c.data.synthetic_preset = "small"
    c.data.synthetic_domains = "night"  # the demos' target; the city's other domains render when asked for
    c.data.image_size = 80
    c.data.num_workers = 0
    c.data.test_queries = ""  # the demo evaluates the baseline on the test queries (its "start" row)

    c.model.name = "cosplace_resnet18_512"
    c.model.train_all_layers = True

    c.train.epochs = 5
    c.train.iterations_per_epoch = 40
    c.train.batch_size = 32
    c.train.lr = 1e-3
    c.train.N = 2
    c.train.L = 2
    c.train.groups_num = 8
    c.train.min_images_per_class = 4
    c.train.hue = 0.1
    c.train.saturation = 0.3
    c.train.checkpoint_every = 1000
    c.train.log_every = 10

    c.eval.batch_size = 64
    return c


def study_baseline() -> ConfigDict:
    """The GRL study's starting point (bench/grl_effect.py): the demo's baseline trained longer, at 96 px."""
    c = demo_baseline()
    c.data.image_size = 96
    c.train.epochs = 4
    c.train.iterations_per_epoch = 100
    return c


def demo() -> ConfigDict:
    """The embedded demo: the baseline fine-tuned with GRL towards the city's unlabeled night images."""
    c = demo_baseline()
    c.data.target_folder = "images/target/night"
    c.data.val_queries = "queries_night"   # model selection on target-domain validation queries (cf. Tokyo-XS)
    c.data.test_queries = "queries,queries_night"
    c.data.monitor = ("images/test:queries", "images/test:queries_night")

    c.model.init_checkpoint = "config:demo_baseline"  # trained on first use, cached
    c.model.train_all_layers = False                   # CosPlace's default: layer3 + layer4 train

    c.train.epochs = 3
    c.train.iterations_per_epoch = 25
    c.train.lr = 1e-4
    c.train.log_every = 5
    c.train.eval_before_training = True
    c.train.eval_random_init = True

    c.grl.enabled = True
    c.grl.lr = 1e-3          # mu
    c.grl.weight = 1.0       # lambda, chosen on val/queries_night (configs/demo.py)
    c.grl.gamma = 10.0
    c.grl.target_batch_size = 8
    c.grl.source_to_discriminator = 8
    c.grl.attach = "features"
    return c


def demo_nogrl() -> ConfigDict:
    """The demo's control: the same fine-tuning of the same baseline, without gradient reversal."""
    c = demo()
    c.grl.enabled = False
    c.data.target_folder = ""
    return c


def demo_baseline_device() -> ConfigDict:
    """``demo_baseline`` with CosPlace's augmentation inside the jitted step (``data.augment_on="device"``)."""
    c = demo_baseline()
    c.data.augment_on = "device"
    return c


def demo_device() -> ConfigDict:
    """``demo`` with the augmentation on the device, for the baseline and the GRL fine-tuning alike."""
    c = demo()
    c.data.augment_on = "device"
    c.model.init_checkpoint = "config:demo_baseline_device"
    return c


# --- CosPlace + GRL with the thesis' data (configs/grl_sfxl.py, grl_tokyo.py) ---

def grl_sfxl() -> ConfigDict:
    """Thesis setting 1 (§4.4.1): SF-XL train -> SF-XL test queries as the unlabeled target."""
    c = cosplace_config()
    c.data.train_folder = "sf_xl/processed/train"
    c.data.val_split = "sf_xs/test"
    c.data.val_queries = "queries_v1"
    c.data.test_split = "sf_xl/processed/test"
    c.data.test_queries = "queries_v1"
    c.data.target_folder = "sf_xl/processed/test/queries_v1"
    c.data.image_size = 512
    c.data.truncated_images = "pil"  # SF-XL's truncated JPEGs decode as in CosPlace (PIL LOAD_TRUNCATED_IMAGES)
    c.model.name = "cosplace_resnet18_512"
    c.model.init_checkpoint = ""     # path of the converted CosPlace ResNet-18/512 hub checkpoint
    c.train.epochs = 20
    c.grl.enabled = True
    c.grl.lr = 1e-2
    c.grl.weight = 10.0
    c.grl.gamma = 10.0
    c.grl.target_batch_size = 8
    c.grl.source_to_discriminator = 8
    c.grl.attach = "features"
    return c


def grl_tokyo() -> ConfigDict:
    """Thesis setting 2 (§4.4.2): setting 1's training and GRL, Tokyo 24/7 as target and test, Tokyo-XS val."""
    c = grl_sfxl()
    c.data.val_split = "tokyo_xs/images/test"
    c.data.val_queries = "queries"
    c.data.test_split = "tokyo247/images/test"
    c.data.test_queries = "queries"
    c.data.target_folder = "tokyo247/images/test/queries"
    return c


# --- AdAGeo (configs/adageo_demo.py, adageo_demo_netvlad.py, ddda_demo.py, adageo_svox*.py) ---

def adageo_demo() -> ConfigDict:
    """AdAGeo on the synthetic city: 5 unlabeled night images adapt a street-view model to night."""
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


def adageo_demo_netvlad() -> ConfigDict:
    """AdAGeo Table 2's first row on the synthetic city: the same start and schedule, source queries only."""
    c = adageo_demo()
    c.model.name = "adageo_resnet18_netvlad_64_noatt"
    c.adageo.ddda = False
    c.adageo.grl = False
    c.adageo.compare = ""
    return c


def ddda_demo() -> ConfigDict:
    """AdAGeo's phase 1 alone (DDDA) with the settings of the AdAGeo demo."""
    adageo = adageo_demo()
    c = adageo.ddda
    c.data.synthetic_preset = adageo.data.synthetic_preset
    c.data.synthetic_domains = adageo.data.synthetic_domains
    c.data.target_folder = adageo.data.target_folder.replace("{domain}", adageo.adageo.domain)
    c.data.n_target = adageo.adageo.n_target
    return c


SVOX_DOMAINS = ("snow", "rain", "sun", "night", "overcast")


def adageo_svox(domain: str = "night") -> ConfigDict:
    """AdAGeo on SVOX -> RobotCar ``domain`` with the paper's settings (WACV 2021 §5.2; code defaults)."""
    if domain not in SVOX_DOMAINS:
        raise ValueError(f"adageo_svox: domain {domain!r}; AdAGeo's are {', '.join(SVOX_DOMAINS)}")
    c = adageo_config()
    c.data.database_folder = "gallery"
    c.data.target_folder = "images/train/queries_{domain}"
    c.data.test_queries = "queries_{domain}"
    c.adageo.domain = domain
    c.adageo.backbone_checkpoint = ""   # the Places365 ResNet-18 file (required: --config.adageo.backbone_checkpoint)
    c.adageo.kmeans_pool = "paper"
    return c


# --- Triplet fine-tuning on the synthetic indoor floors (configs/triplet_demo.py) ---

def triplet_demo() -> ConfigDict:
    """Triplet fine-tuning on one synthetic station floor from the street city's CosPlace model."""
    c = triplet_config()
    c.data.synthetic_preset = "indoor_small"
    c.data.train_splits = "station_b1"
    c.data.val_split = "mall_b1"
    c.data.test_splits = "station_b2,mall_1f,mall_4f"
    c.data.monitor = ("station_b2", "mall_1f", "mall_4f")
    c.data.train_resize = 0
    c.data.train_crop = 96
    c.data.eval_resize = ""
    c.data.image_size = 96
    c.data.num_workers = 0

    c.model.name = "cosplace_resnet18_512"
    c.model.init_checkpoint = "config:demo_baseline"  # trained on first use, cached

    c.train.epochs = 3
    c.train.lr = 1e-3
    c.train.queries_per_epoch = "200"
    c.train.cache_refresh_rate = 0
    c.train.train_positives_dist_threshold = 5.0
    c.train.val_positive_dist_threshold = 10.0
    c.train.select_recall = 1
    c.train.select_distance_m = 10.0
    c.train.patience = 0
    c.train.log_every = 5
    c.train.checkpoint_every = 1000
    c.train.eval_before_training = True
    c.train.eval_random_init = True
    c.train.monitor_epochs = False  # test floors before training and with the best model; val every epoch
    c.eval.batch_size = 64
    return c


PRESETS: dict[str, Callable[..., ConfigDict]] = {
    f.__name__: f for f in (demo_baseline, study_baseline, demo, demo_nogrl, demo_baseline_device, demo_device,
                            grl_sfxl, grl_tokyo, adageo_demo, adageo_demo_netvlad, ddda_demo, adageo_svox, triplet_demo)
}
PRESETS.update({f"adageo_svox_{d}": (lambda d=d: adageo_svox(d)) for d in SVOX_DOMAINS})


def get(name: str, **kwargs) -> ConfigDict:
    """The preset ``name`` (one of :data:`PRESETS`)."""
    if name not in PRESETS:
        raise KeyError(f"no preset {name!r}; jaxvpr.presets has {', '.join(sorted(PRESETS))}")
    return PRESETS[name](**kwargs)
