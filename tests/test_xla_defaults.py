"""``JAXVPR_CPU_CONV`` (jaxvpr/xla_defaults.py): when its XLA flag is added, and that it reaches XLA."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxvpr import xla_defaults

REPO = Path(__file__).resolve().parents[1]
ON = {xla_defaults.SWITCH: "xla"}


def test_the_flag_is_added_on_request_for_tested_jaxlib_versions_and_never_over_the_users_choice():
    env = dict(ON, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    assert xla_defaults.apply(env, "0.10.2") == xla_defaults.CPU_FLAGS
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 " + " ".join(xla_defaults.CPU_FLAGS)
    assert xla_defaults.apply(env, "0.10.2") == ()  # already there: not added twice
    env = dict(ON)
    xla_defaults.apply(env, "0.10.0", machine="aarch64")  # asked for: added on any CPU
    assert env["XLA_FLAGS"] == " ".join(xla_defaults.CPU_FLAGS)
    off = {xla_defaults.SWITCH: "jaxlib"}  # jaxlib's own choice
    assert xla_defaults.apply(off, "0.10.2", machine="x86_64") == () and "XLA_FLAGS" not in off
    for version in ("0.9.2", "0.11.0", "1.0.0"):  # an XLA that may not know the flag aborts on it
        env = dict(ON, XLA_FLAGS="--a=1")
        with pytest.warns(UserWarning, match=f"jaxlib {version} is not one"):
            assert xla_defaults.apply(env, version) == ()
        assert env["XLA_FLAGS"] == "--a=1"
    users = dict(ON, XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution")
    assert xla_defaults.apply(dict(users), "0.10.2") == ()
    for wrong in ("fast", "default"):
        with pytest.raises(ValueError, match=f"JAXVPR_CPU_CONV='{wrong}'"):
            xla_defaults.apply({xla_defaults.SWITCH: wrong}, "0.10.2")


def test_unset_means_xla_on_the_measured_x86_64_cpus_only_and_quietly_nothing_on_other_jaxlibs():
    for machine in ("x86_64", "AMD64"):
        env = {xla_defaults.SWITCH: ""} if machine == "AMD64" else {}  # set but empty: as if unset
        assert xla_defaults.apply(env, "0.10.2", machine=machine) == xla_defaults.CPU_FLAGS
        assert env["XLA_FLAGS"] == " ".join(xla_defaults.CPU_FLAGS)
    for machine in ("aarch64", "arm64"):  # not measured there: jaxlib's choice
        env = {}
        assert xla_defaults.default_choice(machine) == "jaxlib"
        assert xla_defaults.apply(env, "0.10.2", machine=machine) == () and "XLA_FLAGS" not in env
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nobody asked for the flag: no warning where it cannot be added
        env = {}
        assert xla_defaults.apply(env, "0.11.0", machine="x86_64") == () and "XLA_FLAGS" not in env


PROBE = """
import sys
if sys.argv[1] == "import":
    import jaxvpr  # noqa: F401
import jax, jax.numpy as jnp
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
hlo = jax.jit(conv).lower(jnp.ones((2, 32, 32, 64)), jnp.ones((3, 3, 64, 64))).compile().as_text()
print("ynn" if "ynn_fusion" in hlo else "xla")
"""


@pytest.mark.skipif(not xla_defaults.apply(dict(ON)), reason="the installed jaxlib is not one the flag is added for")
def test_jaxvpr_imported_takes_convolutions_from_ynnpack_to_xla_unless_told_jaxlib():
    """The optimized program of a convolution: a YNNPACK fusion without jaxvpr (jaxlib's choice, what
    the switch is for) and with ``JAXVPR_CPU_CONV=jaxlib``; XLA's own convolution with jaxvpr imported
    on this machine's CPU by default (on x86-64) and with ``JAXVPR_CPU_CONV=xla``."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_defaults.SWITCH)}
    env["JAX_PLATFORMS"] = "cpu"

    def probe(mode, **extra):
        r = subprocess.run([sys.executable, "-c", PROBE, mode], env=dict(env, **extra), cwd=REPO,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.split()[-1]

    assert probe("plain", **ON) == "ynn"  # the switch acts through jaxvpr's import
    assert probe("import", **{xla_defaults.SWITCH: "jaxlib"}) == "ynn"
    assert probe("import", **ON) == "xla"
    assert probe("import") == {"xla": "xla", "jaxlib": "ynn"}[xla_defaults.default_choice()]


def test_a_cached_baseline_is_keyed_by_the_cpu_convolutions_it_was_trained_with(monkeypatch):
    """``jaxvpr.train.baseline`` caches trained baselines by config: a run with XLA's own convolutions
    must not reuse one trained with jaxlib's (cached before they became the default), whose key stays
    what it was."""
    from jaxvpr.presets import get
    from jaxvpr.train.baseline import config_hash

    config = get("demo_baseline")
    keys = {}
    for name, flags in (("jaxlib", ""), ("xla", " ".join(xla_defaults.CPU_FLAGS)),
                        ("xla, more flags", "--xla_force_host_platform_device_count=8 " + " ".join(xla_defaults.CPU_FLAGS))):
        monkeypatch.setenv("XLA_FLAGS", flags)
        keys[name] = config_hash(config)
    assert keys["xla"] == keys["xla, more flags"] != keys["jaxlib"]
    monkeypatch.setenv("XLA_FLAGS", f"--{xla_defaults.YNN_FLAG}=individual_dot")  # the user's own choice
    assert config_hash(config) not in (keys["xla"], keys["jaxlib"])
