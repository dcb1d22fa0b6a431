"""XLA CPU settings jaxvpr can apply when it is imported: ``JAXVPR_CPU_CONV=xla`` (off by default).

**YNNPACK convolutions off** (``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``).
jaxlib 0.10 hands forward convolutions to YNNPACK by default. On this project's 2-core CPU the
CosPlace ResNet-18 training step runs 1.4-2.8x faster with XLA's own convolutions, ahead of
PyTorch's step (BENCHMARKS.md, "XLA's own CPU convolutions"; why YNNPACK is slower here was not analysed).

It is not the default because it changes float rounding, and the demo's short baseline is
chaotically sensitive to rounding: with it, seed 0 of ``configs/demo.py`` ends its baseline at
validation R@1 36.7 instead of 43.3 and below the random init on night queries (README, "What the
demo shows"). Every figure in README.md was measured without it.

The flag exists only in some XLA versions and XLA aborts on an unknown flag, so it is added only for
the jaxlib versions in :data:`TESTED_JAXLIB` (otherwise a warning says it was not), and never when
``XLA_FLAGS`` already names it (the user's own setting wins). It takes effect only if jaxvpr is
imported before JAX starts its CPU backend (the first computation), as every jaxvpr command does.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from collections.abc import MutableMapping

SWITCH = "JAXVPR_CPU_CONV"  # "xla": XLA's own CPU convolutions; unset or "default": jaxlib's choice
YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = (f"--{YNN_FLAG}=-individual_convolution",)
TESTED_JAXLIB = ("0.10.",)  # jaxlib versions whose XLA knows the flag (measured with 0.10.2)


def apply(environ: MutableMapping[str, str] = os.environ, jaxlib_version: str | None = None) -> tuple[str, ...]:
    """Adds :data:`CPU_FLAGS` to ``environ["XLA_FLAGS"]`` when ``environ[SWITCH] == "xla"``; returns the flags added."""
    choice = environ.get(SWITCH, "default")
    if choice not in ("xla", "default"):
        raise ValueError(f"{SWITCH}={choice!r}: expected 'xla' (XLA's own CPU convolutions) or 'default'.")
    flags = environ.get("XLA_FLAGS", "")
    if choice == "default" or YNN_FLAG in flags:
        return ()
    if jaxlib_version is None:
        try:
            jaxlib_version = importlib.metadata.version("jaxlib")
        except importlib.metadata.PackageNotFoundError:
            jaxlib_version = "unknown"
    if not jaxlib_version.startswith(TESTED_JAXLIB):
        warnings.warn(f"{SWITCH}=xla ignored: jaxlib {jaxlib_version} is not one whose XLA is known to have "
                      f"--{YNN_FLAG} (tested: {', '.join(v + 'x' for v in TESTED_JAXLIB)}); an unknown flag would "
                      "abort XLA.", stacklevel=2)
        return ()
    environ["XLA_FLAGS"] = " ".join([flags, *CPU_FLAGS]).strip()
    return CPU_FLAGS
