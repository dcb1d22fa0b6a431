import os
import tempfile

import pytest

# Tests run on the CPU with one device unless a test sets up more in a subprocess.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Most of the suite's time is XLA compiling the same ResNet steps in many tests and their subprocesses:
# one persistent compilation cache for the session, both workers and every subprocess (they inherit
# the environment). It changes no result: an executable loaded from it is the one XLA compiled.
_BASE = os.environ.get("JAXVPR_CACHE") or os.path.join(tempfile.gettempdir(), "jaxvpr-tests")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_BASE, "xla-compilation-cache")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jaxvpr  # noqa: E402,F401  (its import applies JAXVPR_CPU_CONV before any test starts JAX)

# pytest-xdist's --dist loadfile hands the files to the two workers in collection order: the longest
# files go first (measured wall times, 2026-12-06), so that the short ones fill the end and the
# workers finish together instead of one running a 7-minute file alone.
_LONGEST_FIRST = ("test_multiprocess.py", "test_triplet.py", "test_benchmark.py", "test_adageo.py",
                  "test_faults.py", "test_train.py", "test_grl_learning.py", "test_synthetic.py",
                  "test_device_augment.py", "test_ddda_train.py", "test_evaluate.py", "test_test_methods.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


@pytest.fixture(scope="session")
def tiny_city():
    """The synthetic `tiny` city, generated once ($JAXVPR_CACHE if set, else <tmp>/jaxvpr-tests, shared by
    both workers: generation takes a lock, and a city appears by an atomic rename once complete)."""
    from jaxvpr.data import synthetic

    return synthetic.ensure_city("tiny", seed=0, cache_dir=_BASE)


@pytest.fixture(scope="session")
def tiny_indoor():
    """The synthetic `indoor_tiny` floors, generated once per session (like tiny_city)."""
    from jaxvpr.data import synthetic_indoor

    return synthetic_indoor.ensure_indoor("indoor_tiny", seed=0, cache_dir=_BASE)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """Random 48 px images in the community layout, for wiring tests of the trainers (helpers.write_tiny_dataset)."""
    from helpers import write_tiny_dataset

    return write_tiny_dataset(tmp_path_factory.mktemp("tinydata"))
