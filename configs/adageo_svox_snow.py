"""AdAGeo, SVOX -> RobotCar snow (paper Table 2 column); see configs/adageo_svox.py."""

from jaxvpr import presets


def get_config():
    return presets.adageo_svox("snow")
