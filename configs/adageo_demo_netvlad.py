"""The NetVLAD baseline of ``configs/adageo_demo.py`` (AdAGeo Table 2's first row on the synthetic city).

    python -m jaxvpr.main --config configs/adageo_demo_netvlad.py --workdir workdir/adageo_demo_netvlad

The same ResNet-18 start, NetVLAD initialisation and schedule, trained with the triplet loss on the
source (daylight) queries only: no pseudo-targets, no attention, no GRL. The 5 night images play no
part. ``configs/adageo_demo.py`` trains it on first use and prints it beside AdAGeo.
"""

from jaxvpr import presets


def get_config():
    return presets.adageo_demo_netvlad()
