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
    c.data.cache_dir = ""              # CosPlace groups cache; default <workdir>/cache

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
    c.train.keep_checkpoints = 2       # the last k, besides the best
    c.train.log_every = 50
    c.train.eval_before_training = False  # evaluate data.monitor before the first step
    c.train.eval_random_init = False   # ... and the randomly initialised network too (demo)

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
    c.eval.recall_values = (1, 5, 10, 20)

    c.mesh = ConfigDict()
    c.mesh.data = -1                   # -1: all devices
    c.mesh.fsdp = 1
    c.mesh.shard_params = False        # FSDP-style: large parameters split over the batch axes
    return c
