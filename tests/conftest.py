import os
import tempfile

import pytest

# Tests run on the CPU with one device unless a test sets up more in a subprocess.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Most of the suite's time is XLA compiling the same ResNet steps in many tests and their subprocesses:
# one persistent compilation cache for the session, both workers and every subprocess (they inherit
# the environment). It changes no result: an executable loaded from it is the one XLA compiled.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _base = os.environ.get("JAXVPR_CACHE") or os.path.join(tempfile.gettempdir(), "jaxvpr-tests")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_base, "xla-compilation-cache")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture(scope="session")
def tiny_city(tmp_path_factory):
    """The synthetic `tiny` city, generated once per session ($JAXVPR_CACHE if set, else a temp dir)."""
    from jaxvpr.data import synthetic

    cache = os.environ.get("JAXVPR_CACHE") or tmp_path_factory.mktemp("jaxvpr_cache")
    return synthetic.ensure_city("tiny", seed=0, cache_dir=cache)


@pytest.fixture(scope="session")
def tiny_indoor(tmp_path_factory):
    """The synthetic `indoor_tiny` floors, generated once per session (like tiny_city)."""
    from jaxvpr.data import synthetic_indoor

    cache = os.environ.get("JAXVPR_CACHE") or tmp_path_factory.mktemp("jaxvpr_cache")
    return synthetic_indoor.ensure_indoor("indoor_tiny", seed=0, cache_dir=cache)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """Random 48 px images in the community layout, for wiring tests of the trainers (helpers.write_tiny_dataset)."""
    from helpers import write_tiny_dataset

    return write_tiny_dataset(tmp_path_factory.mktemp("tinydata"))
