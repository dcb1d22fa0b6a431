"""The GRL study's starting point: configs/demo_baseline.py trained longer, at 96 px.

    python bench/grl_effect.py --seeds 0,1,2      (trains it once per seed, cached like the demo's)

The demo's baseline (5 x 40 steps at 80 px) is what fits the demo's 10-minute budget on 2 CPU cores;
it gains +14.6 R@1 over random init on the validation queries (mean of 3 seeds) with a large
seed-to-seed spread. The study measures the GRL effect from a better-trained model, as the thesis
does from the Hub model: the schedule of issue 9's trial (4 epochs x 100 steps of 32 images, 96 px
crops), everything else as configs/demo_baseline.py (same city, augmentation, groups and
optimizer). ~8 minutes per seed on 2 CPU cores.
"""

from jaxvpr import presets


def get_config():
    return presets.study_baseline()
