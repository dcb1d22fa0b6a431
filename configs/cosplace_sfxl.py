"""CosPlace on SF-XL, the thesis' Table 4.1 setting without domain adaptation (the baseline).

    JAXVPR_DATA=/data python -m jaxvpr.main --config configs/cosplace_sfxl.py --workdir workdir/cosplace_sfxl

Expects, under $JAXVPR_DATA (or --config.data.root), SF-XL as the CosPlace authors distribute it:
sf_xl/processed/train/ (with train_images_paths.txt beside it, recommended), sf_xl/processed/val/
{database,queries}/ and sf_xl/processed/test/{database,queries_v1}/. ResNet-18, 512-d, cells M=10 m,
alpha=30 deg, N=5, L=2, 8 groups, classes with >= 10 images, batch 32, Adam 1e-5 / 1e-2, ColorJitter
0.7/0.7/0.7/0.5, RandomResizedCrop scale 0.5-1 to 512x512, 10,000 iterations per epoch.
Initialise the backbone with ImageNet weights converted from torchvision (see README, "Converting weights, extracting descriptors")
through --config.model.init_checkpoint=CKPT.
"""

from jaxvpr.train.config import cosplace_config


def get_config():
    c = cosplace_config()
    c.data.train_folder = "sf_xl/processed/train"
    c.data.val_split = "sf_xl/processed/val"
    c.data.val_queries = "queries"
    c.data.test_split = "sf_xl/processed/test"
    c.data.test_queries = "queries_v1"
    c.data.image_size = 512
    c.data.truncated_images = "pil"  # SF-XL's truncated JPEGs decode as in CosPlace (PIL LOAD_TRUNCATED_IMAGES)
    c.model.name = "cosplace_resnet18_512"
    c.train.epochs = 20
    c.grl.enabled = False
    return c
