"""CosPlace + GRL, thesis setting 1 (§4.4.1): SF-XL train -> SF-XL test queries as the target domain.

    JAXVPR_DATA=/data python -m jaxvpr.main --config configs/grl_sfxl.py --workdir workdir/grl_sfxl \
        --config.model.init_checkpoint=ckpt/cosplace_resnet18_512

Source: SF-XL train; unlabeled target: the SF-XL test queries (sf_xl/processed/test/queries_v1);
validation and model selection on SF-XS (sf_xs/test: the same queries, a smaller database); test on
SF-XL test. The grid of Table 4.2: mu in {1e-4, 1e-3, 1e-2} (--config.grl.lr), lambda in {0.1, 1, 10}
(--config.grl.weight), gamma in {7, 10, 15} (--config.grl.gamma); best: (mu 1e-3, lambda 0.1) and
(mu 1e-2, lambda 10). ResNet-18 512-d initialised from the CosPlace PyTorch Hub model converted with
`python -m jaxvpr.convert from-torch --model cosplace_resnet18_512`, fresh classifiers, 20 epochs x
10,000 iterations, target batch 8, 8 source images to the discriminator, discriminator on pooled
backbone features.
"""

from jaxvpr.train.config import cosplace_config


def get_config():
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
