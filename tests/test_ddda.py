"""AdAGeo phase 1 (DDDA): BiOST's autoencoders, their losses and the BiOST checkpoint converter.

References (never the code under test):
* a PyTorch ``ResnetEncoder``/``ResnetDecoder`` written here from the layer list of
  recipes_facts.md A.1.2 (``nn.Sequential`` named ``model``, ``ResnetBlock.conv_block``), with
  ``ReflectionPad2d``, ``Conv2d``, ``InstanceNorm2d``, ``ConvTranspose2d(output_padding=1)``, ``Tanh``;
* BiOST's loss formulas (A.1.4) evaluated in PyTorch on those networks, and its two-optimiser
  gradients (``loss_G_A.backward()``, zero grads, ``loss_G_B.backward()``);
* properties: init statistics, which params each loss updates, Adam lowering the loss.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from jaxvpr.convert.ddda import ddda_to_torch, torch_to_ddda
from jaxvpr.convert.rules import CheckpointMismatchError
from jaxvpr.models.ddda import (
    DDDAAutoencoder,
    ddda_optimizer,
    decode,
    encode,
    init_autoencoder,
    phase1_loss,
    phase2_grads,
    phase2_init,
    phase2_losses,
    pseudo_target,
)

SMALL = DDDAAutoencoder(ngf=8, n_downsampling=2, n_res_blocks=1)
# compiled once for the whole file (jit caches by function object)
small_init = jax.jit(functools.partial(init_autoencoder, model=SMALL))
small_grads = jax.jit(functools.partial(phase2_grads, feature_cycle=True, model=SMALL))


def images(shape, seed=0) -> np.ndarray:
    """NHWC float32 images in [-1, 1]."""
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def nchw(x) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2)))


def assert_close(actual, expected, rtol=1e-4):
    """Equal up to ``rtol`` of the reference's largest magnitude (float32 summation order)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected))), 1e-6)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def leaves(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


# --------------------------------------------------------------------------- PyTorch reference


def torch_reference():
    """``(Encoder, Decoder)`` classes: BiOST's networks rebuilt from the sheet's layer list (A.1.2),
    in ``bench/torch_ddda.py`` (shared with ``bench/ddda_step.py``)."""
    pytest.importorskip("torch")
    bench = str(Path(__file__).resolve().parents[1] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    from torch_ddda import Decoder, Encoder

    return Encoder, Decoder


def torch_pair(model: DDDAAutoencoder, seed: int):
    """A random PyTorch encoder/decoder of ``model``'s sizes (default init, biases ~ N(0, 0.1))."""
    torch = pytest.importorskip("torch")
    Encoder, Decoder = torch_reference()
    torch.manual_seed(seed)
    sizes = (model.ngf, model.n_downsampling, model.n_res_blocks)
    enc, dec = Encoder(*sizes), Decoder(*sizes)
    with torch.no_grad():
        for m in (enc, dec):
            for name, p in m.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.1)
    return enc, dec


def numpy_state(module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- (1) parity and conversion


@pytest.mark.torch
def test_default_autoencoder_matches_pytorch_reference_and_round_trips_bit_exactly():
    torch = pytest.importorskip("torch")
    model = DDDAAutoencoder()
    enc, dec = torch_pair(model, seed=0)
    enc_state, dec_state = numpy_state(enc), numpy_state(dec)
    assert "model.10.conv_block.5.weight" in enc_state and "model.11.weight" in dec_state
    variables = torch_to_ddda(enc_state, dec_state)

    x = images((1, 32, 48, 3))
    with torch.no_grad():
        z_ref = enc(torch.from_numpy(nchw(x)))
        y_ref = dec(z_ref)
    y, z = jax.jit(model.apply)(variables, jnp.asarray(x))
    assert z.shape == (1, 8, 12, 256) and y.shape == (1, 32, 48, 3)
    assert_close(nchw(z), z_ref.numpy())
    assert_close(nchw(y), y_ref.numpy())

    enc_back, dec_back = ddda_to_torch(variables)
    for original, back in ((enc_state, enc_back), (dec_state, dec_back)):
        assert list(back) == list(original)
        for name in original:
            assert back[name].dtype == np.float32 and back[name].shape == original[name].shape, name
            np.testing.assert_array_equal(back[name], original[name], err_msg=name)
    enc.load_state_dict({k: torch.from_numpy(v) for k, v in enc_back.items()})  # strict load


@pytest.mark.torch
def test_converter_reports_layout_problems_and_accepts_old_instance_norm_buffers():
    enc, dec = torch_pair(SMALL, seed=1)
    enc_state, dec_state = numpy_state(enc), numpy_state(dec)

    # PyTorch <= 0.3 checkpoints carry InstanceNorm running stats, never used by the forward pass
    old_enc = dict(enc_state, **{"model.2.running_mean": np.zeros(8, np.float32),
                                 "model.10.conv_block.6.running_var": np.ones(32, np.float32)})
    old_dec = dict(dec_state, **{"module.model.2.running_mean": np.zeros(16, np.float32)})
    old_dec = {("module." + k if not k.startswith("module.") else k): v for k, v in old_dec.items()}
    variables = torch_to_ddda(old_enc, old_dec, SMALL)
    enc_back, _ = ddda_to_torch(variables, SMALL)
    assert list(enc_back) == list(enc_state)

    with pytest.raises(CheckpointMismatchError, match="missing model.4.weight"):
        torch_to_ddda({k: v for k, v in enc_state.items() if k != "model.4.weight"}, dec_state, SMALL)
    with pytest.raises(CheckpointMismatchError, match="unexpected model.9.weight"):
        torch_to_ddda(dict(enc_state, **{"model.9.weight": np.zeros(3, np.float32)}), dec_state, SMALL)
    with pytest.raises(CheckpointMismatchError, match="swapped"):
        torch_to_ddda(dec_state, enc_state, SMALL)
    with pytest.raises(CheckpointMismatchError, match="model.1.weight has shape"):
        torch_to_ddda(enc_state, dec_state, DDDAAutoencoder(ngf=16, n_res_blocks=1))


# --------------------------------------------------------------------------- (2) initialisation


def test_init_is_biost_normal_002_with_pytorch_default_biases():
    params = init_autoencoder(jax.random.key(0))
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    big = flat["encoder/res0/conv1/kernel"]
    assert big.shape == (3, 3, 256, 256)
    assert abs(big.std() - 0.02) < 0.0003 and abs(big.mean()) < 0.0003
    for name, value in flat.items():
        if name.endswith("kernel") and value.size >= 5000:
            assert abs(value.std() - 0.02) < 0.002, name

    # bias bounds 1/sqrt(fan_in); ConvTranspose2d's fan-in is weight.shape[1] * k * k = out * 9
    fan_in = {"encoder/conv_in": 3 * 49, "encoder/down0": 64 * 9, "encoder/down1": 128 * 9,
              "encoder/res3/conv2": 256 * 9, "decoder/res0/conv1": 256 * 9,
              "decoder/up0": 128 * 9, "decoder/up1": 64 * 9, "decoder/conv_out": 64 * 49}
    assert flat["decoder/up0/kernel"].shape == (3, 3, 128, 256)
    for layer, fan in fan_in.items():
        bias, bound = flat[f"{layer}/bias"], 1 / np.sqrt(fan)
        assert np.all(np.abs(bias) <= bound), layer
        if bias.size >= 64:
            assert np.abs(bias).max() > 0.9 * bound, layer  # uniform over the whole range
            assert bias.std() == pytest.approx(bound / np.sqrt(3), rel=0.3), layer


@pytest.mark.torch
def test_transposed_conv_bias_bound_is_pytorchs():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layer = torch.nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1, output_padding=1)
    bias = layer.bias.detach().numpy()
    bound = 1 / np.sqrt(128 * 9)  # what jaxvpr uses (not 1 / sqrt(256 * 9))
    assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.9 * bound
    fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(layer.weight)
    assert fan_in == 128 * 9


# --------------------------------------------------------------------------- (3) who updates what


@pytest.fixture(scope="module")
def small_pair():
    p_s, p_t = small_init(jax.random.key(1)), small_init(jax.random.key(2))
    t, s = jnp.asarray(images((1, 16, 16, 3), 3)), jnp.asarray(images((1, 16, 16, 3), 4))
    return p_s, p_t, t, s


def test_each_domain_steps_on_its_own_loss_through_the_other_domains_modules(small_pair):
    p_s, p_t, t, s = small_pair
    grads = small_grads
    losses = functools.partial(phase2_losses, feature_cycle=True, model=SMALL)
    g_s, g_t, terms = grads(p_s, p_t, t, s)

    # full Jacobian of (loss_T, loss_S) w.r.t. (params_S, params_T): row 0 is loss_T, row 1 loss_S
    jac_s, jac_t = jax.jit(jax.jacrev(lambda ps, pt: jnp.stack(losses(ps, pt, t, s)[:2]), argnums=(0, 1)))(p_s, p_t)
    t_wrt_s, s_wrt_s = (jax.tree_util.tree_map(lambda j, r=row: j[r], jac_s) for row in (0, 1))
    t_wrt_t, s_wrt_t = (jax.tree_util.tree_map(lambda j, r=row: j[r], jac_t) for row in (0, 1))
    assert_close(leaves(g_t), leaves(t_wrt_t), rtol=1e-5)
    assert_close(leaves(g_s), leaves(s_wrt_s), rtol=1e-5)
    # the cross terms exist (each loss depends on the other domain) but are not used
    assert np.abs(leaves(t_wrt_s)).max() > 1e-4 and np.abs(leaves(s_wrt_t)).max() > 1e-4
    assert not np.allclose(leaves(g_s), leaves(s_wrt_s) + leaves(t_wrt_s), rtol=1e-3, atol=1e-6)
    assert float(terms["loss_T"]) == pytest.approx(float(losses(p_s, p_t, t, s)[0]), rel=1e-5)

    # the tst-cycle runs through Dec_S: other Dec_S weights, other gradient for Enc_T
    p_s2 = dict(p_s, decoder=jax.tree_util.tree_map(lambda a: a * 1.5, p_s["decoder"]))
    _, g_t2, _ = grads(p_s2, p_t, t, s)
    delta = leaves(g_t2["encoder"]) - leaves(g_t["encoder"])
    assert np.abs(delta).max() > 1e-3 * np.abs(leaves(g_t["encoder"])).max()


def test_pseudo_target_and_phase2_start(small_pair):
    p_s, p_t, _, s = small_pair
    x = jnp.concatenate([s, jnp.asarray(images((1, 16, 16, 3), 5))])
    pt = pseudo_target(p_s, p_t, x, SMALL)
    assert pt.shape == x.shape and float(jnp.max(jnp.abs(pt))) <= 1.0
    np.testing.assert_allclose(pt, decode(p_t, encode(p_s, x, SMALL), SMALL), rtol=1e-6, atol=1e-6)

    start_s, start_t = phase2_init(p_s)
    assert leaves(start_t).tolist() == leaves(p_s).tolist()
    reconstruction, _ = SMALL.apply({"params": p_s}, x)
    np.testing.assert_allclose(pseudo_target(start_s, start_t, x, SMALL), reconstruction, rtol=1e-6, atol=1e-6)


def test_fully_convolutional_but_needs_multiples_of_four(small_pair):
    p_s = small_pair[0]
    y, z = SMALL.apply({"params": p_s}, jnp.zeros((1, 24, 40, 3)))
    assert y.shape == (1, 24, 40, 3) and z.shape == (1, 6, 10, 32)
    with pytest.raises(ValueError, match="multiples of 4"):
        SMALL.apply({"params": p_s}, jnp.zeros((1, 26, 40, 3)))


# --------------------------------------------------------------------------- (4) losses against PyTorch


@pytest.mark.torch
def test_losses_and_gradients_match_biost_in_pytorch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    enc_a, dec_a = torch_pair(SMALL, seed=2)  # A = target T
    enc_b, dec_b = torch_pair(SMALL, seed=3)  # B = source S
    p_t = torch_to_ddda(numpy_state(enc_a), numpy_state(dec_a), SMALL)["params"]
    p_s = torch_to_ddda(numpy_state(enc_b), numpy_state(dec_b), SMALL)["params"]
    t, s = images((1, 16, 16, 3), 6), images((1, 16, 16, 3), 7)
    a, b = torch.from_numpy(nchw(t)), torch.from_numpy(nchw(s))

    # phase I on B: L1(Dec_B(Enc_B(b)), b) + 0.001 mean(Enc_B(b)^2)
    with torch.no_grad():
        z = enc_b(b)
        ref1 = F.l1_loss(dec_b(z), b) + 0.001 * torch.mean(z ** 2)
    loss1, _ = jax.jit(functools.partial(phase1_loss, model=SMALL))(p_s, jnp.asarray(s))
    assert float(loss1) == pytest.approx(float(ref1), rel=1e-5)

    # phase II (BiOST backward_G)
    enc_a_out, enc_b_out = enc_a(a), enc_b(b)
    fake_ab, fake_ba = dec_b(enc_a_out), dec_a(enc_b_out)
    enc_ba = enc_a(fake_ba)
    fake_aba, fake_bab = dec_a(enc_b(fake_ab)), dec_b(enc_ba)
    loss_a = (F.l1_loss(fake_aba, a) + F.l1_loss(dec_a(enc_a_out), a) + 0.001 * torch.mean(enc_a_out ** 2)
              + 0.001 * F.mse_loss(enc_ba, enc_b_out.detach()))
    loss_b = F.l1_loss(fake_bab, b) + F.l1_loss(dec_b(enc_b_out), b) + 0.001 * torch.mean(enc_b_out ** 2)
    nets = (enc_a, dec_a, enc_b, dec_b)
    for net in nets:
        net.zero_grad()
    loss_a.backward(retain_graph=True)
    grads_a = [{k: p.grad.numpy().copy() for k, p in net.named_parameters()} for net in (enc_a, dec_a)]
    for net in nets:
        net.zero_grad()
    loss_b.backward()
    grads_b = [{k: p.grad.numpy().copy() for k, p in net.named_parameters()} for net in (enc_b, dec_b)]

    g_s, g_t, terms = small_grads(p_s, p_t, jnp.asarray(t), jnp.asarray(s))
    assert float(terms["loss_T"]) == pytest.approx(loss_a.item(), rel=1e-5)
    assert float(terms["loss_S"]) == pytest.approx(loss_b.item(), rel=1e-5)
    loss_t, loss_s, _ = phase2_losses(p_s, p_t, jnp.asarray(t), jnp.asarray(s), model=SMALL)  # paper: no feature cycle
    assert float(loss_t) == pytest.approx(loss_a.item() - 0.001 * F.mse_loss(enc_ba, enc_b_out).item(), rel=1e-5)
    assert float(loss_s) == pytest.approx(loss_b.item(), rel=1e-5)

    # A conv bias followed by InstanceNorm has a zero gradient in exact arithmetic (the norm removes
    # per-channel constants): both sides give float noise there, hence a floor at 1e-5 of the largest.
    for ours, ref in ((g_t, grads_a), (g_s, grads_b)):
        enc_g, dec_g = ddda_to_torch({"params": ours}, SMALL)
        for ours_state, ref_state in ((enc_g, ref[0]), (dec_g, ref[1])):
            assert list(ours_state) == list(ref_state)
            floor = 1e-5 * max(np.abs(g).max() for g in ref_state.values())
            for name in ref_state:
                tensor_scale = np.abs(ref_state[name]).max()
                np.testing.assert_allclose(ours_state[name], ref_state[name], rtol=1e-3,
                                           atol=1e-3 * tensor_scale + floor, err_msg=name)


# --------------------------------------------------------------------------- (5) training lowers the loss


def test_a_few_adam_steps_of_phase1_lower_the_reconstruction_loss(small_pair):
    params = small_pair[0]
    x = jnp.asarray(images((1, 16, 16, 3), 8))
    optimizer = ddda_optimizer()
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state):
        (loss, terms), grads = jax.value_and_grad(phase1_loss, has_aux=True)(params, x, SMALL)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, terms["rec"]

    recs = []
    for _ in range(12):
        params, opt_state, rec = step(params, opt_state)
        recs.append(float(rec))
    assert recs[-1] < recs[0] - 0.01, recs
    assert all(b < a for a, b in zip(recs, recs[1:])), recs
