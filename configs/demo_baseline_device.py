"""The demo's baseline (configs/demo_baseline.py) with CosPlace's augmentation inside the jitted step.

    python -m jaxvpr.main --config configs/demo_baseline_device.py --workdir workdir/demo_baseline_device

The Grain pipeline only decodes (uint8 batches); ColorJitter + RandomResizedCrop + Normalize run on the
device, keyed by (seed, step, image) -- `data.augment_on="device"`, jaxvpr/data/device_augment.py. The
same operations and distributions as the host path, other random numbers. configs/demo_device.py
fine-tunes it with GRL; README, "Augmentation on the device", gives both demos' tables.
"""

from jaxvpr import presets


def get_config():
    return presets.demo_baseline_device()
