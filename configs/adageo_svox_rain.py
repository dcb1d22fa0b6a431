"""AdAGeo, SVOX -> RobotCar rain (paper Table 2 column); see configs/adageo_svox.py."""

from jaxvpr.train.baseline import load_config_file


def get_config():
    c = load_config_file("adageo_svox")
    c.adageo.domain = "rain"
    return c
