"""Models that jaxvpr trains itself on first use and caches, like the synthetic city.

The thesis starts GRL fine-tuning from a *trained* CosPlace model (the PyTorch Hub ResNet-18/512,
thesis §4.4.1). No weights can be downloaded here, so the demo's starting point is a CosPlace model
trained by jaxvpr on the synthetic city: ``model.init_checkpoint = "config:demo_baseline"`` names
``configs/demo_baseline.py``, whose run is made once (deterministic in its config) and reused::

    $JAXVPR_CACHE/runs/demo_baseline-<hash of the config>/   (a training workdir: best/, results.json)

The hash covers the whole config and the synthetic city's generator version, so a changed config
or city trains a new baseline instead of silently reusing a stale one. A run killed half way
resumes from its checkpoints on the next use.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
from pathlib import Path

import jax
from ml_collections import ConfigDict

from jaxvpr import xla_defaults

DONE = "baseline_done.json"


def configs_dir() -> Path:
    """The repository's ``configs/`` (next to the package in a source checkout), else ``./configs``."""
    here = Path(__file__).resolve().parents[2] / "configs"
    return here if here.is_dir() else Path.cwd() / "configs"


def load_config_file(name: str) -> ConfigDict:
    """``get_config()`` of ``configs/<name>.py`` (or of a path to a config file).

    Without a ``configs/`` folder (an installed package) a name falls back to :mod:`jaxvpr.presets`.
    """
    path = Path(name) if name.endswith(".py") else configs_dir() / f"{name}.py"
    if not path.is_file():
        from jaxvpr import presets

        if name in presets.PRESETS:
            return presets.get(name)
        raise FileNotFoundError(f"Config {name!r}: no file {path} (expected a config in {configs_dir()}, "
                                f"or a preset of jaxvpr.presets: {', '.join(sorted(presets.PRESETS))}).")
    spec = importlib.util.spec_from_file_location(f"jaxvpr_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def config_hash(config: ConfigDict) -> str:
    from jaxvpr.data.synthetic import VERSION
    from jaxvpr.data.synthetic_indoor import VERSION as INDOOR_VERSION

    versions = {"city_version": VERSION}
    if (convolutions := xla_defaults.ynn_setting()) is not None:
        # A run with other CPU convolutions rounds differently, and a short run amplifies that: train
        # its own baseline rather than reuse one cached before XLA's own became the default
        # (keys of runs with jaxlib's convolutions are unchanged).
        versions["cpu_convolutions"] = convolutions
    if str(config.data.synthetic_preset).startswith("indoor_"):
        versions["indoor_version"] = INDOOR_VERSION
    text = json.dumps({"config": json.loads(config.to_json_best_effort(sort_keys=True)), **versions}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_root() -> Path:
    from jaxvpr.data.synthetic import default_cache_dir

    return Path(default_cache_dir()) / "runs"


def ensure_trained(name: str, config: ConfigDict | None = None, verbose: bool = True) -> Path:
    """The workdir of the finished run of ``configs/<name>.py`` (or of ``config``), trained if absent."""
    from jaxvpr.train import train

    config = load_config_file(name) if config is None else config
    workdir = cache_root() / f"{Path(name).stem}-{config_hash(config)}"
    if (workdir / DONE).is_file():
        return workdir
    workdir.mkdir(parents=True, exist_ok=True)
    with _lock(workdir.parent / f"{workdir.name}.lock"):
        if (workdir / DONE).is_file():  # made by another process meanwhile
            return workdir
        if verbose and jax.process_index() == 0:
            print(f"Training the baseline {name} once (cached in {workdir}) ...", flush=True)
        results = train(config, workdir)
        if jax.process_index() == 0:
            (workdir / DONE).write_text(json.dumps({"name": name, "best_epoch": results["best_epoch"],
                                                    "selection": results["selection"],
                                                    "best_val_selection": results["best_val_selection"]}) + "\n")
    return workdir


@contextlib.contextmanager
def _lock(path: Path):
    """Serialises concurrent single-process runs; with several processes they train together instead."""
    if jax.process_count() > 1:
        yield
        return
    from jaxvpr.data.synthetic import file_lock

    with file_lock(path):
        yield
