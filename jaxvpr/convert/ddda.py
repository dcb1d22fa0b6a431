"""BiOST autoencoder checkpoints (PyTorch) <-> :class:`jaxvpr.models.ddda.DDDAAutoencoder` variables.

BiOST saves each of its four networks on its own (``{epoch}_net_Enc_b.pth``, ``Dec_b``, ``Enc_a``,
``Dec_a``; b = source S, a = target T in AdAGeo's roles, recipes_facts.md A.1.1), each the state
dict of a ``ResnetEncoder``/``ResnetDecoder`` whose layers form one ``nn.Sequential`` named
``model``. Padding, norm and activation layers take indices too. With ``n_downsampling = n``
and ``n_res_blocks = r`` (defaults 2 and 4):

* encoder ``model.1``: the 7x7 Conv2d (ReflectionPad at ``0``, IN ``2``, ReLU ``3``) -> ``conv_in``;
* encoder ``model.{4 + 3i}``, i < n: the 3x3 stride-2 Conv2d (IN, ReLU follow) -> ``down{i}``;
* encoder ``model.{4 + 3n + j}``, j < r: ResnetBlock -> ``res{j}``;
* decoder ``model.{j}``, j < r: ResnetBlock -> ``res{j}``;
* decoder ``model.{r + 3i}``, i < n: the 3x3 stride-2 ConvTranspose2d (IN, ReLU follow) -> ``up{i}``;
* decoder ``model.{r + 3n + 1}``: the 7x7 Conv2d (ReflectionPad before, Tanh after) -> ``conv_out``;
* in a block, ``conv_block.1`` / ``conv_block.5``: the two 3x3 Conv2d (ReflectionPads at ``0``, ``4``,
  IN at ``2``, ``6``, ReLU at ``3``) -> ``conv1`` / ``conv2``.

So with the defaults the encoder's tensors are ``model.{1,4,7}`` and ``model.{10..13}.conv_block.{1,5}``,
the decoder's ``model.{0..3}.conv_block.{1,5}`` and ``model.{4,7,11}``.

Every layer has ``weight`` and ``bias``. ``Conv2d.weight`` (out, in, k, k) and
``ConvTranspose2d.weight`` (in, out, k, k) both become a flax kernel by the ``conv`` transform
(k, k, dim 1, dim 0): for the transposed conv that is the (k, k, out, in) kernel of
``nn.ConvTranspose(transpose_kernel=True)``. ``InstanceNorm2d(affine=False)`` has no
parameters; checkpoints of old PyTorch versions (BiOST's era, <= 0.3) may still carry its
``running_mean``/``running_var`` buffers, which that norm never used in its forward pass: they are
accepted on reading and not written.
``torch -> jax -> torch`` is bit exact.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxvpr.convert.cnn import conv_rules
from jaxvpr.convert.io import strip_module_prefix
from jaxvpr.convert.rules import TRANSFORMS, CheckpointMismatchError, Rule, apply_rules, export_rules
from jaxvpr.models.ddda import DDDAAutoencoder

_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _block_rules(torch_prefix: str, flax_path: tuple[str, ...]) -> list[Rule]:
    return (conv_rules(f"{torch_prefix}.conv_block.1", (*flax_path, "conv1"), bias=True)
            + conv_rules(f"{torch_prefix}.conv_block.5", (*flax_path, "conv2"), bias=True))


def encoder_rules(n_downsampling: int = 2, n_res_blocks: int = 4, flax_root=("encoder",)) -> list[Rule]:
    """Rules of a BiOST ``ResnetEncoder`` state dict (see the module docstring)."""
    rules = conv_rules("model.1", (*flax_root, "conv_in"), bias=True)
    for i in range(n_downsampling):
        rules += conv_rules(f"model.{4 + 3 * i}", (*flax_root, f"down{i}"), bias=True)
    for j in range(n_res_blocks):
        rules += _block_rules(f"model.{4 + 3 * n_downsampling + j}", (*flax_root, f"res{j}"))
    return rules


def decoder_rules(n_downsampling: int = 2, n_res_blocks: int = 4, flax_root=("decoder",)) -> list[Rule]:
    """Rules of a BiOST ``ResnetDecoder`` state dict (see the module docstring)."""
    rules = []
    for j in range(n_res_blocks):
        rules += _block_rules(f"model.{j}", (*flax_root, f"res{j}"))
    for i in range(n_downsampling):
        rules += conv_rules(f"model.{n_res_blocks + 3 * i}", (*flax_root, f"up{i}"), bias=True)
    rules += conv_rules(f"model.{n_res_blocks + 3 * n_downsampling + 1}", (*flax_root, "conv_out"), bias=True)
    return rules


def _instance_norm_names(n_downsampling: int, n_res_blocks: int) -> tuple[set[str], set[str]]:
    """Module names of the InstanceNorm layers of the encoder and of the decoder."""
    def blocks(first):
        return {f"model.{first + j}.conv_block.{k}" for j in range(n_res_blocks) for k in (2, 6)}

    encoder = {"model.2"} | {f"model.{5 + 3 * i}" for i in range(n_downsampling)} | blocks(4 + 3 * n_downsampling)
    decoder = blocks(0) | {f"model.{n_res_blocks + 3 * i + 1}" for i in range(n_downsampling)}
    return encoder, decoder


def _flax_shapes(model: DDDAAutoencoder) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{('params', ..., name): shape}`` of the model's variables (traced, nothing computed)."""
    size = 4 * 2 ** model.n_downsampling
    dummy = jax.ShapeDtypeStruct((1, size, size, model.image_channels), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), dummy)
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def _rules_of(model: DDDAAutoencoder):
    return (encoder_rules(model.n_downsampling, model.n_res_blocks, ("encoder",)),
            decoder_rules(model.n_downsampling, model.n_res_blocks, ("decoder",)))


def _mismatch(problems: list[str], model: DDDAAutoencoder) -> CheckpointMismatchError:
    return CheckpointMismatchError(
        "BiOST checkpoint does not match DDDAAutoencoder("
        f"ngf={model.ngf}, n_downsampling={model.n_downsampling}, n_res_blocks={model.n_res_blocks}):\n  "
        + "\n  ".join(problems)
        + "\nCheck ngf / n_downsampling / n_res_blocks against the BiOST options (--ngf, --n_downsampling, "
        "--n_res_blocks) and that the encoder and decoder files are not swapped."
    )


def torch_to_ddda(
    encoder_state: Mapping[str, Any], decoder_state: Mapping[str, Any], model: DDDAAutoencoder | None = None
) -> dict:
    """One domain's BiOST ``Enc``/``Dec`` state dicts (name -> array) as variables ``{'params': {...}}``.

    The losses of :mod:`jaxvpr.models.ddda` take ``variables['params']``.

    Raises:
      CheckpointMismatchError: listing every missing, unexpected and mis-shaped tensor.
    """
    model = DDDAAutoencoder() if model is None else model
    shapes = _flax_shapes(model)
    norm_names = _instance_norm_names(model.n_downsampling, model.n_res_blocks)
    problems, flat = [], {}
    for which, state, rules, norms in zip(("encoder", "decoder"), (encoder_state, decoder_state),
                                          _rules_of(model), norm_names):
        state = strip_module_prefix(state)
        for rule in rules:
            want = TRANSFORMS[rule.transform].torch_shape(shapes[rule.flax_path])
            if rule.torch_name not in state:
                problems.append(f"{which}: missing {rule.torch_name} (expected shape {list(want)})")
            elif tuple(np.shape(state[rule.torch_name])) != want:
                got = list(np.shape(state[rule.torch_name]))
                problems.append(f"{which}: {rule.torch_name} has shape {got}, expected {list(want)}")
        known = {r.torch_name for r in rules}
        for name in state:
            prefix, _, leaf = name.rpartition(".")
            if name not in known and not (leaf in _NORM_BUFFERS and prefix in norms):
                problems.append(f"{which}: unexpected {name}")
        if not problems:
            flat.update(traverse_util.flatten_dict(apply_rules(state, rules)))
    if problems:
        raise _mismatch(problems, model)
    return traverse_util.unflatten_dict({k: v.astype(np.float32, copy=False) for k, v in flat.items()})


def ddda_to_torch(variables: Mapping[str, Any], model: DDDAAutoencoder | None = None) -> tuple[dict, dict]:
    """``(encoder_state, decoder_state)``: one domain's variables as BiOST state dicts (float32 numpy arrays).

    Load them with ``ResnetEncoder.load_state_dict({k: torch.from_numpy(v) ...})``.
    """
    model = DDDAAutoencoder() if model is None else model
    shapes = _flax_shapes(model)
    flat = traverse_util.flatten_dict(dict(variables)) if "params" in variables else {}
    problems = []
    if not flat:
        problems.append("variables have no 'params' collection (pass {'params': params})")
    else:
        for path, value in flat.items():
            if path not in shapes:
                problems.append(f"unexpected variable {'/'.join(path)}")
            elif tuple(np.shape(value)) != shapes[path]:
                problems.append(f"{'/'.join(path)} has shape {list(np.shape(value))}, expected {list(shapes[path])}")
        problems += [f"missing variable {'/'.join(path)}" for path in shapes if path not in flat]
    if problems:
        raise _mismatch(problems, model)
    encoder, decoder = _rules_of(model)
    return export_rules(variables, encoder), export_rules(variables, decoder)
