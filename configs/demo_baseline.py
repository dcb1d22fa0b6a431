"""The demo's starting point: CosPlace (no GRL) trained by jaxvpr on the synthetic `small` city.

    python -m jaxvpr.main --config configs/demo_baseline.py --workdir workdir/demo_baseline

The thesis fine-tunes a *trained* CosPlace ResNet-18/512 (the PyTorch Hub model) with GRL. No weights
can be downloaded here, so `configs/demo.py` starts from this run instead: it is trained on first use
(``model.init_checkpoint = "config:demo_baseline"``, ~4 minutes on 2 CPU cores), deterministically,
and cached in $JAXVPR_CACHE/runs/ (see jaxvpr/train/baseline.py). Differences from thesis Table 4.1,
each for the 2-core budget or for the synthetic city:

- every stage trains (``train_all_layers``, CosPlace's --train_all_layers): there are no ImageNet
  weights to keep frozen, and frozen random stages never learn;
- Adam 1e-3 (thesis 1e-5, for a pretrained model and 10,000-iteration epochs): 5 epochs of 40 steps;
- 80x80 training crops of the 128x128 images (evaluation at native size). On XLA's CPU backend an
  80 px ResNet-18 step costs half a 96 px one and a 64 px one is pathologically slow (2x2 maps in
  layer4);
- groups N=2, L=2 (thesis N=5): with N=5 the small city's 10 m cells give groups of too few classes;
  L=2 keeps CosPlace's guard against ambiguous classes (classes 30 deg apart never share a group);
  at least 4 images per class (thesis 10: the city has 4 captures per place);
- ColorJitter hue 0.1 and saturation 0.3 (thesis 0.5 and 0.7): facade colour is the city's main cue, and a
  hue shift of up to half the colour wheel makes two facades of the city the same.
"""

from jaxvpr import presets


def get_config():
    return presets.demo_baseline()
