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

from jaxvpr import presets


def get_config():
    return presets.grl_sfxl()
