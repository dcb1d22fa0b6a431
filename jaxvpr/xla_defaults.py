"""XLA CPU settings jaxvpr applies when it is imported: ``JAXVPR_CPU_CONV`` (XLA's own CPU convolutions by default).

**YNNPACK convolutions off** (``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``).
jaxlib 0.10 hands forward convolutions to YNNPACK by default. On this project's 2-core x86-64 CPUs
the CosPlace ResNet-18 training step runs 1.2-2.8x faster with XLA's own convolutions, and only with
them reaches issue 13's targets against PyTorch's step (BENCHMARKS.md, "XLA's own CPU convolutions";
why YNNPACK is slower there was not analysed). The computation is the same; only its float rounding
differs (losses and descriptors match PyTorch's either way).

``JAXVPR_CPU_CONV``:

- unset: ``xla`` on x86-64 (where it was measured), jaxlib's choice on any other CPU (e.g. ARM, not measured);
- ``xla``: add the flag;
- ``jaxlib``: leave the convolutions to jaxlib (YNNPACK), as jaxvpr did before 2026-12-07 — the
  setting that reproduces README figures measured before then to the digit.

The flag exists only in some XLA versions and XLA aborts on an unknown flag, so it is added only for
the jaxlib versions in :data:`TESTED_JAXLIB` (when ``xla`` was asked for explicitly, a warning says it
was not), and never when ``XLA_FLAGS`` already names it (the user's own setting wins). It takes effect
only if jaxvpr is imported before JAX starts its CPU backend (the first computation), as every jaxvpr
command does. It changes nothing on a GPU or TPU (the flag is read by XLA's CPU backend only).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import warnings
from collections.abc import MutableMapping

SWITCH = "JAXVPR_CPU_CONV"  # "xla": XLA's own CPU convolutions; "jaxlib": jaxlib's choice (YNNPACK); unset: see default_choice
CHOICES = ("xla", "jaxlib")
YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = (f"--{YNN_FLAG}=-individual_convolution",)
TESTED_JAXLIB = ("0.10.",)  # jaxlib versions whose XLA knows the flag (measured with 0.10.2)
MEASURED_MACHINES = ("x86_64", "AMD64")  # platform.machine() of the CPUs the default was measured on


def ynn_setting(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """The value ``XLA_FLAGS`` gives ``--xla_cpu_experimental_ynn_fusion_type`` (the last one), or None:
    ``-individual_convolution`` means XLA's own convolutions, None jaxlib's choice."""
    values = re.findall(rf"--{YNN_FLAG}=(\S+)", environ.get("XLA_FLAGS", ""))
    return values[-1] if values else None


def default_choice(machine: str | None = None) -> str:
    """The choice when ``JAXVPR_CPU_CONV`` is unset: ``xla`` on the CPUs it was measured on, else ``jaxlib``."""
    return "xla" if (platform.machine() if machine is None else machine) in MEASURED_MACHINES else "jaxlib"


def apply(environ: MutableMapping[str, str] = os.environ, jaxlib_version: str | None = None,
          machine: str | None = None) -> tuple[str, ...]:
    """Adds :data:`CPU_FLAGS` to ``environ["XLA_FLAGS"]`` when the choice (``environ[SWITCH]``, else
    :func:`default_choice`) is ``xla`` and the jaxlib knows the flag; returns the flags added."""
    asked = environ.get(SWITCH) or None  # set but empty: as if unset
    if asked is not None and asked not in CHOICES:
        raise ValueError(f"{SWITCH}={asked!r}: expected 'xla' (XLA's own CPU convolutions, the default on "
                         "x86-64) or 'jaxlib' (jaxlib's choice, YNNPACK's convolutions).")
    choice = asked or default_choice(machine)
    flags = environ.get("XLA_FLAGS", "")
    if choice == "jaxlib" or YNN_FLAG in flags:
        return ()
    if jaxlib_version is None:
        try:
            jaxlib_version = importlib.metadata.version("jaxlib")
        except importlib.metadata.PackageNotFoundError:
            jaxlib_version = "unknown"
    if not jaxlib_version.startswith(TESTED_JAXLIB):
        if asked == "xla":
            warnings.warn(f"{SWITCH}=xla ignored: jaxlib {jaxlib_version} is not one whose XLA is known to have "
                          f"--{YNN_FLAG} (tested: {', '.join(v + 'x' for v in TESTED_JAXLIB)}); an unknown flag "
                          "would abort XLA.", stacklevel=2)
        return ()
    environ["XLA_FLAGS"] = " ".join([flags, *CPU_FLAGS]).strip()
    return CPU_FLAGS
