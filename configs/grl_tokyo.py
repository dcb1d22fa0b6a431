"""CosPlace + GRL, thesis setting 2 (§4.4.2): SF-XL train, Tokyo 24/7 queries as the unlabeled target.

    JAXVPR_DATA=/data python -m jaxvpr.main --config configs/grl_tokyo.py --workdir workdir/grl_tokyo \
        --config.model.init_checkpoint=ckpt/cosplace_resnet18_512

Source: SF-XL train (sf_xl/processed/train); unlabeled target: the Tokyo 24/7 test queries
(tokyo247/images/test/queries, used without their labels as the thesis does); validation and model
selection on Tokyo-XS (tokyo_xs/images/test); test on Tokyo 24/7 (tokyo247/images/test). The thesis'
best: mu = 1e-2, lambda = 10, gamma = 10-12, 20 epochs x 10,000 iterations, ResNet-18 512-d
initialised from the CosPlace PyTorch Hub model (the baseline; convert it with
`python -m jaxvpr.convert from-torch --model cosplace_resnet18_512 --weights FILE --out ckpt/cosplace_resnet18_512`),
fresh classifiers. For the ImageNet-initialised variant pass a converted ImageNet checkpoint instead.
Tokyo 24/7 queries are phone photos of varying size: they are described at native size, grouped by size.
"""

from jaxvpr.train.config import cosplace_config


def get_config():
    c = cosplace_config()
    c.data.train_folder = "sf_xl/processed/train"
    c.data.val_split = "tokyo_xs/images/test"
    c.data.val_queries = "queries"
    c.data.test_split = "tokyo247/images/test"
    c.data.test_queries = "queries"
    c.data.target_folder = "tokyo247/images/test/queries"
    c.data.image_size = 512
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
