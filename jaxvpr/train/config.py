"""The full set of fields of a CosPlace (+ GRL) run, with the thesis' defaults (Table 4.1, §4.4).

Config files in ``configs/`` start from :func:`cosplace_config` and change what their experiment
changes; every field is listed here once, so an unknown ``--config.x=y`` is an error.
"""

from __future__ import annotations

from ml_collections import ConfigDict


class ConfigError(ValueError):
    """A config that cannot run (as written, or on this topology); the message names the field and the fix."""


def cosplace_config() -> ConfigDict:
    c = ConfigDict()
    c.recipe = "cosplace"
    c.seed = 0

    # Data. Folders are relative to data.root (or absolute); data.root empty means $JAXVPR_DATA, and
    # with that unset too, the synthetic city of data.synthetic_preset.
    c.data = ConfigDict()
    c.data.root = ""
    c.data.synthetic_preset = ""       # "tiny" | "small": generate/use the synthetic city
    c.data.synthetic_seed = 0
    c.data.synthetic_domains = ""      # the synthetic city's target domains to render ("" all; e.g. "night")
    c.data.train_folder = "images/train/database"
    c.data.val_split = "images/val"    # holds database/ and the val queries folder
    c.data.val_queries = "queries"
    c.data.test_split = "images/test"
    c.data.test_queries = "queries"
    c.data.target_folder = ""          # unlabeled target-domain images (GRL)
    c.data.monitor = ()                # extra "split_dir:queries" pairs evaluated every epoch (demo)
    c.data.image_size = 512            # training crops are image_size x image_size
    c.data.eval_resize = ""            # evaluation resize: "" native, "N" shorter side, "H,W"
    c.data.positive_dist_threshold = 25.0  # metres
    c.data.num_workers = 2
    c.data.truncated_images = "error"  # "pil": a truncated JPEG decodes as PIL with LOAD_TRUNCATED_IMAGES (CosPlace)
    c.data.cache_dir = ""              # CosPlace groups cache; default <workdir>/cache
    # Where the training augmentation runs: "host" (Grain workers, numpy) or "device" (ColorJitter and
    # RandomResizedCrop inside the jitted step, jaxvpr/data/device_augment.py; the host only decodes).
    c.data.augment_on = "host"
    c.data.load_size = ""              # augment_on="device": "H,W" host resize of images of other sizes

    c.model = ConfigDict()
    c.model.name = "cosplace_resnet18_512"  # a registry name (python -m jaxvpr.evaluate --list-models)
    c.model.backbone = ""              # with head: free composition instead of a name, e.g. resnet50 + gem
    c.model.head = ""
    c.model.init_checkpoint = ""       # jaxvpr checkpoint (e.g. converted CosPlace hub weights)
    c.model.fc_output_dim = 0          # 0: the named model's descriptor size
    c.model.trainable_stages = -1      # -1: the model's default (CosPlace ResNet: layer3+layer4)
    c.model.train_all_layers = False   # CosPlace's --train_all_layers: every backbone stage trains
    c.model.allow_random_frozen = False  # permit frozen stages with random weights (no init_checkpoint)

    c.train = ConfigDict()
    c.train.epochs = 50
    c.train.iterations_per_epoch = 10_000
    c.train.batch_size = 32
    c.train.lr = 1e-5                  # backbone + head (Adam)
    c.train.classifiers_lr = 1e-2      # CosFace classifiers (Adam, one per group)
    c.train.M = 10                     # cell side, metres
    c.train.alpha = 30                 # heading bin, degrees
    c.train.N = 5
    c.train.L = 2
    c.train.groups_num = 8
    c.train.min_images_per_class = 10
    c.train.cosface_s = 30.0
    c.train.cosface_m = 0.4
    c.train.brightness = 0.7
    c.train.contrast = 0.7
    c.train.saturation = 0.7
    c.train.hue = 0.5
    c.train.random_resized_crop = 0.5  # crop scale in (1 - x, 1)
    c.train.mixed_precision = False    # bf16 compute, fp32 parameters and optimizer states
    c.train.checkpoint_every = 1000    # steps; also at every epoch end
    c.train.keep_checkpoints = 2       # the last k (at least 2), besides the best
    # Bit-exact resume on GPU: the step compiled with deterministic ops and no autotuning (slower;
    # CPU is deterministic anyway). See jaxvpr/train/loop.py DETERMINISTIC_XLA_FLAGS.
    c.train.deterministic = False
    c.train.log_every = 50
    c.train.eval_before_training = False  # evaluate data.monitor before the first step
    c.train.eval_random_init = False   # ... and the randomly initialised network too (demo)
    # Model selection on the validation queries: R@select_recall at select_distance_m metres (0: the
    # first threshold, here data.positive_dist_threshold). patience: stop after that many epochs
    # without improvement (0: never; CosPlace trains every epoch).
    c.train.select_recall = 1
    c.train.select_distance_m = 0.0
    c.train.patience = 0

    c.grl = ConfigDict()
    c.grl.enabled = False
    c.grl.lr = 1e-3                    # mu: discriminator Adam learning rate
    c.grl.weight = 1.0                 # lambda: total = CosFace + lambda * CE(domain)   (eq. 4.1)
    c.grl.gamma = 10.0                 # eq. 4.2
    c.grl.schedule = "epoch"           # "epoch": p = epoch / epochs (thesis); "step": per step
    c.grl.target_batch_size = 8
    c.grl.source_to_discriminator = 8
    c.grl.attach = "features"          # "features": pooled backbone map; "descriptors"
    # One train-mode forward of source + target (shared BatchNorm statistics) or two separate ones.
    # Separate passes normalise each domain by its own statistics and hide the domain difference from
    # the discriminator (README, "The discriminator and BatchNorm"); keep True unless reproducing that.
    c.grl.joint_batchnorm = True
    # Augmentation of the target images: AdAGeo's GRL transform (ColorJitter 0.7/0.7/0.7, hue 0.1, no
    # crop: the image is resized whole to image_size); the source augmentation's hue 0.5 would recolour
    # exactly the cues (e.g. night lighting) that define the target domain.
    c.grl.target_brightness = 0.7
    c.grl.target_contrast = 0.7
    c.grl.target_saturation = 0.7
    c.grl.target_hue = 0.1
    c.grl.target_random_resized_crop = 0.0

    c.eval = ConfigDict()
    c.eval.batch_size = 32

    c.mesh = ConfigDict()
    c.mesh.data = -1                   # -1: all devices
    c.mesh.fsdp = 1
    c.mesh.shard_params = False        # FSDP-style: large parameters split over the batch axes
    c.mesh.shard_min_size = 2**18      # ... those of at least this many elements
    return c


def triplet_config() -> ConfigDict:
    """Triplet fine-tuning (thesis §5.4; the VG benchmark's training as the thesis fork runs it).

    Defaults are the VG benchmark's (``parser.py``) with the fork's changes: images resized to a
    shorter side of 360 then randomly cropped to 360 x 360 for training, evaluated at shorter side
    360, positives counted at 1, 5, 10, 25 m. See ``jaxvpr/train/triplet.py`` for the recipe.
    """
    c = ConfigDict()
    c.recipe = "triplet"
    c.seed = 0

    # Data. Every dataset is a folder holding database/ and queries/ (jaxvpr.data.format.read_split;
    # the kapture and Baidu converters and the synthetic indoor floors write that), relative to
    # data.root ($JAXVPR_DATA; or the synthetic indoor preset "indoor_tiny" / "indoor_small").
    c.data = ConfigDict()
    c.data.root = ""
    c.data.synthetic_preset = ""
    c.data.synthetic_seed = 0
    c.data.train_splits = ""           # comma-separated training datasets, e.g. "gangnam_b1,hyundai_b1"
    c.data.val_split = ""              # the validation dataset (model selection, early stopping)
    c.data.val_queries = "queries"
    c.data.test_splits = ""            # comma-separated test datasets, evaluated with the best model
    c.data.test_queries = "queries"
    c.data.monitor = ()                # extra "dataset:queries" pairs evaluated before training and every epoch
    c.data.train_resize = 360          # training: shorter side (0: native), then ...
    c.data.train_crop = 360            # ... a random train_crop x train_crop square (0: none)
    c.data.patch_multiple = -1         # -1: the model's (14 for DINOv2: sides rounded, 360 -> 364); 0: none
    c.data.eval_resize = "360"         # cache, validation and test: "" native, "N" shorter side, "H,W"
    c.data.image_size = 360            # random-init trace size (and the demo's random-init row)
    c.data.num_workers = 2
    c.data.truncated_images = "error"  # "pil": a truncated JPEG decodes as PIL with LOAD_TRUNCATED_IMAGES (CosPlace)

    c.model = ConfigDict()
    c.model.name = "eigenplaces_resnet50_2048"
    c.model.backbone = ""
    c.model.head = ""
    c.model.init_checkpoint = ""       # converted hub weights or a jaxvpr run ("config:NAME": trained on first use)
    c.model.fc_output_dim = 0
    c.model.trainable_stages = -1      # -1: the paper's policy (EigenPlaces layer3+4; SALAD the last 4 blocks)
    c.model.dropout = -1.0             # SALAD head dropout in training; -1: the named model's (SALAD 0.3, as the anchor)
    c.model.train_all_layers = False
    c.model.allow_random_frozen = False

    c.train = ConfigDict()
    c.train.epochs = 1000              # VG: epochs_num (early stopping ends the run)
    c.train.batch_size = 4             # queries per step (VG train_batch_size); each brings 1 + 1 + negs images
    c.train.lr = 1e-5                  # Adam over the trainable parameters
    c.train.margin = 0.1               # triplet margin (L2 distances; not sqrt(0.1))
    c.train.squared_distance = False   # True: squared L2 distances (AdAGeo eq. 8)
    c.train.violating_only = False     # True: only negatives violating the margin at mining time count (AdAGeo)
    c.train.mining = "partial"         # "partial" | "full" | "random" (jaxvpr/train/mining.py)
    c.train.queries_per_epoch = "5000"  # one value, or one per training dataset (the fork's table)
    c.train.cache_refresh_rate = 1000  # queries mined per cache; 0: queries_per_epoch (one refresh per epoch)
    c.train.negs_num_per_query = 10
    c.train.neg_samples_num = 1000     # database images sampled per refresh (partial, full); min(., database)
    c.train.train_positives_dist_threshold = 10.0  # metres: hard positives
    c.train.val_positive_dist_threshold = 25.0     # metres: soft positives (never negatives)
    c.train.positives_angle_deg = 0.0              # > 0: hard positives also within this heading difference (deg)
    c.train.multi_dataset = "separated"  # "separated": epoch e trains dataset e mod N; "aggregated": one union
    c.train.aggregate_offset_m = 1e5   # aggregated: dataset k's easting shifted by k * this
    c.train.mixed_precision = False
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 2
    c.train.deterministic = False      # GPU: bit-exact resume (deterministic ops, no autotuning)
    c.train.log_every = 50
    c.train.eval_before_training = False
    c.train.eval_random_init = False
    c.train.monitor_epochs = True      # evaluate data.monitor after every epoch (False: before and best only)
    # Selection / early stopping: the fork's rule, R@5 at its first test threshold (1 m), patience 3.
    c.train.select_recall = 5
    c.train.select_distance_m = 0.0    # 0: the first of eval.thresholds
    c.train.patience = 3

    c.eval = ConfigDict()
    c.eval.batch_size = 16             # VG infer_batch_size (cache, validation, test)
    c.eval.thresholds = "1,5,10,25"    # metres (the fork's test_positive_thresholds)
    c.eval.angles = ""                 # optional heading limits per threshold, e.g. "5,30,60"

    c.mesh = ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.shard_params = False
    c.mesh.shard_min_size = 2**18
    return c


def adageo_config() -> ConfigDict:
    """AdAGeo (Berton et al., WACV 2021) phase 2 with its phase 1 (DDDA) run first, on a SVOX-style layout.

    Defaults are the paper's and its code's (``src/parser.py``, recipes_facts §A.2.12; the recipe is
    ``jaxvpr/train/adageo.py``): ResNet-18 + CAM attention + NetVLAD-64, layer3+layer4 trained, Adam
    1e-5, 4 queries x (1 + 1 + 10) per step, positives 10 m, negatives beyond 25 m, margin sqrt(0.1)
    on L2 distances with only margin-violating negatives, 3-domain GRL (source queries, pseudo-target
    queries, the n target images; 8 images per step, CE weight 0.1, coefficient 1), R@N at 25 m,
    early stopping on the pseudo-target validation queries (R@5). The dataset layout is SVOX's
    (recipes_facts §A.2.11): ``images/train/{database,queries,queries_<domain>}``,
    ``images/val/{database,queries}``, ``images/test/{database,queries_<domain>}``; the synthetic city
    has the same folders plus ``images/target/<domain>`` (its unlabeled pools).
    """
    from jaxvpr.train.ddda import ddda_config

    c = triplet_config()
    c.recipe = "adageo"
    c.data.synthetic_domains = ""      # the synthetic city's target domains to render ("" all)
    c.data.train_splits = "images/train"   # one folder: database/ (SVOX gallery) and the source queries
    c.data.train_queries = "queries"   # source training queries (SVOX train/queries)
    c.data.database_folder = "database"  # the gallery's folder in every split (AdAGeo's own SVOX: "gallery")
    # Folders may name {domain} (adageo.domain): one config serves every target domain.
    c.data.target_folder = "images/train/queries_{domain}"  # the target domain's images; n_target are drawn
    c.data.val_split = "images/val"
    c.data.val_queries = "queries"     # source val queries; with adageo.ddda their pseudo-targets validate
    c.data.test_splits = "images/test"
    c.data.test_queries = "queries_{domain}"  # comma-separated query folders of the test split
    c.data.train_resize = 0            # AdAGeo: no resize, no augmentation of the triplet images
    c.data.train_crop = 0
    c.data.eval_resize = ""            # native size (SVOX/RobotCar 512x384)
    c.data.image_size = 224

    c.model.name = "adageo_resnet18_netvlad_64"   # ..._noatt: NetVLAD without the CAM attention
    c.model.num_classes = 0            # the scene classifier's classes (0: the model's, Places365 365)
    c.model.init_checkpoint = ""       # a converted Places365 AdAGeo/ResNet-18 model, or a jaxvpr run

    c.train.epochs = 100
    c.train.lr = 1e-5
    c.train.margin = 0.1 ** 0.5        # AdAGeo: TripletMarginLoss(margin=sqrt(0.1)) on L2 distances
    c.train.violating_only = True      # only negatives violating the margin at mining time count
    c.train.mining = "full"            # every gallery image described, persistent hard-negative memory
    c.train.queries_per_epoch = "0"    # 0: the training queries / adageo.epoch_divider
    c.train.cache_refresh_rate = 1000
    c.train.select_recall = 5          # early stopping on R@5 of the (pseudo-target) validation queries
    # AdAGeo stops at the 4th validation in a row without improvement with its patience 3 (the check
    # comes before the increment, recipes_facts §A.2.9); jaxvpr's patience counts those epochs.
    c.train.patience = 4
    c.eval.thresholds = "25"
    c.eval.batch_size = 24

    c.adageo = ConfigDict()
    c.adageo.domain = "night"          # the target domain: fills {domain} in data.target_folder, test_queries, monitor
    c.adageo.ddda = True               # phase 1: pseudo-targets join the training queries (Table 3 "DDDA")
    c.adageo.n_target = 5              # target images DDDA and the GRL see (-1: all of data.target_folder)
    c.adageo.grl = True                # the domain discriminator behind a GRL (Table 3 "DA")
    c.adageo.grl_weight = 0.1          # alpha: loss = triplet + alpha * CE(domain)
    c.adageo.grl_batch_size = 8
    c.adageo.grl_lr = 1e-5             # AdAGeo trains the discriminator with the model's Adam (1e-5)
    c.adageo.grl_coefficient = "constant"  # "constant": 1 (AdAGeo); "schedule": thesis eq. 4.2 per epoch
    c.adageo.grl_gamma = 10.0
    c.adageo.grl_brightness = 0.7      # AdAGeo's GRL transform: flip + ColorJitter(0.7, 0.7, 0.7, 0.1)
    c.adageo.grl_contrast = 0.7
    c.adageo.grl_saturation = 0.7
    c.adageo.grl_hue = 0.1
    c.adageo.backbone_checkpoint = ""  # a checkpoint whose backbone (same ResNet) initialises this one's
    c.adageo.scene_classes = 0         # N > 0: fit an N-way scene classifier as the CAM's fc (no Places365)
    c.adageo.scene_images = 2000       # training database images it is fitted on (classes: k-means of UTM)
    c.adageo.kmeans_pool = "paper"     # "paper": images of the 3 domains; "code": gallery + queries + pseudo
    c.adageo.kmeans_images = 500       # paper 500; code 1250 (with replacement)
    c.adageo.kmeans_per_image = 100    # local features per image (code 40)
    c.adageo.epoch_divider = 4         # an epoch is 1/epoch_divider of the training queries (README 4)
    c.adageo.compare = ""              # configs (comma-separated names) trained if needed and tested beside this run

    c.ddda = ddda_config()             # phase 1; its data fields follow data.* and adageo.n_target
    return c
