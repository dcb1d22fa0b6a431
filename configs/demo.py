"""The embedded demo: the thesis' story on the synthetic city. A trained CosPlace model adapts to
night-time queries with a gradient reversal layer (thesis ch. 4), from unlabeled night images.

    python -m jaxvpr.main --config configs/demo.py --workdir workdir/demo

First use generates the synthetic `small` city (~1.5 min) and trains the starting point,
`configs/demo_baseline.py` (CosPlace without GRL, ~4 min), both cached in $JAXVPR_CACHE
(default ~/.cache/jaxvpr). Then, like thesis §4.4.1 from the Hub model: fresh CosFace classifiers,
CosPlace's default trainable layers (layer3+layer4), and GRL towards the unlabeled pool
images/target/night: loss = CosFace + lambda * CE(domain) (eq. 4.1), GRL coefficient from eq. 4.2
(0 for the whole first epoch: the discriminator learns, BatchNorm statistics adapt). It prints day
(test/queries) and night (test/queries_night) R@1/R@5 of the random network, the baseline, every
epoch and the chance level, and writes training.png. `configs/demo_nogrl.py` is the control: the
same fine-tuning without GRL.

Settings. gamma 10 is the thesis' best on Tokyo 24/7. lambda was chosen among the thesis' grid
{0.1, 1, 10} on the *validation* night queries (val/queries_night; the test queries never chose
anything; seed 0, best epoch): 0.1 -> 21.0, 1 -> 25.0, 10 -> 21.0 R@1 (no GRL: 16.7). With 10 the
trunk overpowers the discriminator (its accuracy falls to ~25%: the features flip domains instead of
aligning) and recall drops. mu (discriminator Adam lr) is 1e-3, also in the thesis' grid, instead of
its best 1e-2: with Adam steps of 1e-2 on post-ReLU (non-negative) pooled features, most units of the
512-50-20-2 discriminator die within a few dozen steps and it stays a constant classifier (README,
"The discriminator and BatchNorm"). Both demo configs select the best epoch on val/queries_night.
Other differences from the thesis, for the 2-core budget: Adam 1e-4 (thesis 1e-5 over 20 epochs of
10,000 steps), 3 epochs of 25 steps, 80 px crops, groups N=2 L=2, hue 0.1 / saturation 0.3 (see
configs/demo_baseline.py for why).
"""

from jaxvpr import presets


def get_config():
    return presets.demo()
