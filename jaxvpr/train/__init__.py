"""Training recipes. ``train(config, workdir)`` runs the recipe that ``config.recipe`` names.

Each recipe is one module (``cosplace``: CosPlace + GRL, thesis ch. 4; ``triplet``: triplet
fine-tuning, thesis §5.4; ``adageo``: AdAGeo's phase 2 after its phase 1, WACV 2021) on the shared
loop of ``loop.py``; ``ddda`` runs AdAGeo's phase 1 alone (BiOST autoencoders, pseudo-targets).
"""

from __future__ import annotations

import importlib

RECIPES = {"cosplace": "jaxvpr.train.cosplace", "triplet": "jaxvpr.train.triplet", "adageo": "jaxvpr.train.adageo",
           "ddda": "jaxvpr.train.ddda"}


def train(config, workdir) -> dict:
    """Runs (or resumes) ``config.recipe`` in ``workdir``; returns the final results."""
    if config.recipe not in RECIPES:
        from jaxvpr.train.config import ConfigError

        raise ConfigError(f"config.recipe={config.recipe!r} is not a training recipe; known: {sorted(RECIPES)}.")
    return importlib.import_module(RECIPES[config.recipe]).train(config, workdir)
