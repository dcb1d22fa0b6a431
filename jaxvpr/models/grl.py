"""Gradient Reversal Layer and its coefficient schedule.

Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation" (ICML
2015); thesis §3.2 and §4.4. The layer is the identity in the forward pass and
multiplies the incoming gradient by ``-coeff`` in the backward pass, so the
feature extractor is trained to *maximise* the domain classifier's loss.

The coefficient follows thesis eq. 4.2 (Ganin & Lempitsky eq. 14):

    coeff(p) = 2 / (1 + exp(-gamma * p)) - 1,     p = training progress in [0, 1]

In the thesis p = epoch / epochs with the 0-based epoch index, constant within an
epoch: the coefficient is exactly 0 for the whole first epoch (§4.4.1, "no
adversarial training actually happens") and reaches 0.9 after 9, 6 and 4 of 20
epochs for gamma = 7, 10, 15 (Fig. 4.4): coeff >= 0.9 iff p >= ln(19)/gamma.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


@jax.custom_vjp
def grad_reverse(x: jax.Array, coeff: jax.Array | float) -> jax.Array:
    """Identity forward; backward multiplies the cotangent of ``x`` by ``-coeff``.

    ``coeff`` is an ordinary (traced) input, so changing it between calls of a
    jitted step does not recompile; it receives a zero cotangent (it is a
    schedule value, not a parameter).
    """
    return x


def _grad_reverse_fwd(x, coeff):
    return x, coeff


def _grad_reverse_bwd(coeff, cotangent):
    scale = -jnp.asarray(coeff, dtype=cotangent.dtype)
    return scale * cotangent, jnp.zeros_like(jnp.asarray(coeff))


grad_reverse.defvjp(_grad_reverse_fwd, _grad_reverse_bwd)


def grl_schedule(progress, gamma: float):
    """Thesis eq. 4.2: ``2 / (1 + exp(-gamma * progress)) - 1`` (numpy/jax scalar or array)."""
    return 2.0 / (1.0 + jnp.exp(-gamma * jnp.asarray(progress, jnp.float32))) - 1.0


def grl_coefficient(epoch: int, epochs: int, gamma: float) -> float:
    """The thesis' per-epoch GRL coefficient: eq. 4.2 with p = epoch / epochs.

    ``epoch`` is the 0-based epoch index, so the first epoch gets exactly 0.
    Returns a Python float (computed in float64 on the host).
    """
    if epochs <= 0 or not 0 <= epoch:
        raise ValueError(f"need epochs > 0 and epoch >= 0, got epoch={epoch}, epochs={epochs}")
    return 2.0 / (1.0 + math.exp(-gamma * epoch / epochs)) - 1.0


def grl_coefficient_at_step(step, total_steps: int, gamma: float):
    """Per-step variant (Ganin & Lempitsky's original): eq. 4.2 with p = step / total_steps.

    Works on traced ``step`` too. The CosPlace trainer uses it under ``grl.schedule = "step"``.
    """
    return grl_schedule(jnp.asarray(step, jnp.float32) / total_steps, gamma)
