"""AdAGeo's phase 1 alone (DDDA, BiOST's autoencoders) with the settings of configs/adageo_demo.py.

    python -m jaxvpr.main --config configs/ddda_demo.py --workdir workdir/ddda_demo

5 images drawn from the synthetic city's unlabeled night pool, 250 + 250 steps of a 16-channel model
on 128 px crops, then pseudo-night versions of the training and validation queries in
<workdir>/pseudo_targets/ and the Fig. 3-style grid <workdir>/pseudo_targets.png. jaxvpr/train/ddda.py
has every field; ``configs/adageo_demo.py`` runs this phase itself before training phase 2.
"""

from jaxvpr import presets


def get_config():
    return presets.ddda_demo()
