"""jaxvpr: visual place recognition with domain adaptation in JAX/Flax.

Where things live: ``jaxvpr.data`` (dataset format, positives, synthetic city, Grain pipelines),
``jaxvpr.models`` (backbones, aggregation heads, gradient reversal), ``jaxvpr.train`` (recipes),
``jaxvpr.evaluate`` (FAISS recall), ``jaxvpr.convert`` (PyTorch interop), ``jaxvpr.parallel``
(mesh and shardings), ``jaxvpr.main`` (the command line entry point), ``jaxvpr.cli`` (how every
command reports a user error: one line, ``--debug`` for the traceback).
"""

__version__ = "0.1.0"

from jaxvpr import xla_defaults as _xla_defaults

_xla_defaults.apply()  # before JAX starts its CPU backend (see jaxvpr/xla_defaults.py)
