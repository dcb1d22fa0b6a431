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

from jaxvpr import presets


def get_config():
    return presets.grl_tokyo()
