"""Training recipes. ``train(config, workdir)`` runs the recipe that ``config.recipe`` names.

Each recipe is one module (``cosplace``: CosPlace + GRL, thesis ch. 4; ``triplet``: triplet
fine-tuning, thesis §5.4) on the shared loop of ``loop.py``.
"""

from __future__ import annotations

import importlib

RECIPES = {"cosplace": "jaxvpr.train.cosplace", "triplet": "jaxvpr.train.triplet"}


def train(config, workdir) -> dict:
    """Runs (or resumes) ``config.recipe`` in ``workdir``; returns the final results."""
    if config.recipe not in RECIPES:
        from jaxvpr.train.config import ConfigError

        raise ConfigError(f"config.recipe={config.recipe!r} is not a training recipe; known: {sorted(RECIPES)}.")
    return importlib.import_module(RECIPES[config.recipe]).train(config, workdir)
