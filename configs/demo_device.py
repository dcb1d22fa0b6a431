"""The embedded demo (configs/demo.py) with the augmentation on the device, for baseline and fine-tuning.

    python -m jaxvpr.main --config configs/demo_device.py --workdir workdir/demo_device

Trains configs/demo_baseline_device.py on first use (cached in $JAXVPR_CACHE), then the demo's GRL
fine-tuning towards the night pool, source and target batches augmented inside the jitted step
(`data.augment_on="device"`). README, "Augmentation on the device", compares it with the host demo.
"""

from jaxvpr import presets


def get_config():
    return presets.demo_device()
