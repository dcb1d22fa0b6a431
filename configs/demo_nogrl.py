"""The demo's control: the same fine-tuning of the same baseline, without gradient reversal.

    python -m jaxvpr.main --config configs/demo_nogrl.py --workdir workdir/demo_nogrl
"""

from jaxvpr import presets


def get_config():
    return presets.demo_nogrl()
