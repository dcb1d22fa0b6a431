"""AdAGeo phase 1: the few-shot Domain-Driven Data Augmentation (DDDA) autoencoders of BiOST.

Berton et al., "Adaptive-Attentive Geolocalization from few queries" (WACV 2021) §4.1, §5.2,
which adopts the autoencoders of Cohen & Wolf, "Bidirectional One-Shot Unsupervised Domain
Mapping" (BiOST, ICCV 2019). AdAGeo never released this phase; everything here follows the BiOST
code as recorded in ``shared/reference/recipes_facts.md`` §A.1 (cited below as A.1.x).

Domains (A.1.1): BiOST's few-shot domain A is AdAGeo's **target T** (the 5 target queries), the
large domain B is the **source S**. Each domain has its own encoder/decoder pair; the pseudo-target
of a source image is ``Dec_T(Enc_S(x_s))`` (:func:`pseudo_target`).

Architecture (A.1.2; defaults ``ngf=64``, ``n_downsampling=2``, ``n_res_blocks=4``, NHWC, images
in [-1, 1])::

    Enc: ReflectionPad(3) Conv7x7 3->64 IN ReLU | Conv3x3 s2 p1 64->128 IN ReLU
         | Conv3x3 s2 p1 128->256 IN ReLU | 4 x ResnetBlock(256)          -> z (H/4, W/4, 256)
    Dec: 4 x ResnetBlock(256) | ConvT3x3 s2 p1 op1 256->128 IN ReLU
         | ConvT 128->64 IN ReLU | ReflectionPad(3) Conv7x7 64->3 Tanh      -> (H, W, 3)
    ResnetBlock: x + IN(Conv3x3(RPad1(ReLU(IN(Conv3x3(RPad1(x)))))))  (no ReLU after the sum)

IN is ``InstanceNorm2d(affine=False, eps=1e-5)``: per image and channel over H, W with the biased
variance, no parameters, the same at train and test time. Every conv has a bias. The paper (§5.2)
describes the networks as "two convolutional layers and four residual blocks" / "four residual
blocks and two deconvolutional layers": its wording omits the 7x7 input conv and the 7x7 + tanh
output conv, which the code has (A.1.2). The network is fully convolutional: any H, W divisible by
``2 ** n_downsampling`` (4) works (pseudo-targets are made at 384x512, A.1.6).

Initialisation (A.1.2): every Conv/ConvTranspose kernel ~ N(0, 0.02); biases keep PyTorch's
default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), where PyTorch computes the fan-in of a
``ConvTranspose2d`` weight (in, out, k, k) from its dim 1, i.e. ``out * k * k``.

Losses (A.1.4; L1 and MSE are means over all elements, as ``torch.nn.L1Loss``/``MSELoss``):

* phase I, source only: :func:`phase1_loss`.
* phase II, both domains: :func:`phase2_losses` -- AdAGeo eq. (3)-(4) plus a code-only feature
  cycle; :func:`phase2_grads` gives the two gradients with the "frozen" bars of eq. (2).
* the "KL" of the paper (eq. 3, KL(q(z|x) || N(0, I)), weight 0.001) is in the code MUNIT's
  pseudo-KL ``mean(z ** 2)`` over all elements of the encoder output: no sampling, no variance.

Optimiser (A.1.5): Adam lr 2e-4, betas (0.5, 0.999), batch 1 (:func:`ddda_optimizer`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxvpr.models.layers import torch_conv, torch_default_bias_init

KL_WEIGHT = 0.001
"""Weight of the pseudo-KL term ``mean(z ** 2)`` (BiOST ``kl_lambda``; AdAGeo eq. 4)."""
FEATURE_CYCLE_WEIGHT = 0.001
"""Weight of BiOST's feature-cycle MSE (``feat_weight``); not in the AdAGeo paper."""
INSTANCE_NORM_EPS = 1e-5

weight_init = nn.initializers.normal(stddev=0.02)
"""BiOST ``init_type='normal'``: conv and transposed-conv kernels ~ N(0, 0.02)."""


def reflect_pad(x: jax.Array, pad: int) -> jax.Array:
    """``nn.ReflectionPad2d(pad)`` on an NHWC map (the border pixel is not repeated)."""
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


def instance_norm(x: jax.Array, eps: float = INSTANCE_NORM_EPS) -> jax.Array:
    """``nn.InstanceNorm2d(affine=False)``: each image and channel to zero mean, unit (biased) variance over H, W."""
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def _conv(features: int, kernel_size: int, stride: int, padding: int, in_features: int, name: str) -> nn.Conv:
    """``nn.Conv2d(in, features, k, stride, padding)`` (zero padding) with BiOST's init."""
    return torch_conv(features, kernel_size, stride, padding, kernel_init=weight_init, name=name,
                      bias_init=torch_default_bias_init(in_features * kernel_size * kernel_size))


def _conv_transpose_x2(features: int, name: str) -> nn.ConvTranspose:
    """``nn.ConvTranspose2d(in, features, 3, stride=2, padding=1, output_padding=1)``: doubles H and W.

    PyTorch's transposed conv is a conv of the 2x-dilated input with the spatially flipped kernel,
    padded by ``k - 1 - padding = 1`` before and ``k - 1 - padding + output_padding = 2`` after;
    ``transpose_kernel=True`` flips the kernel and takes it in PyTorch's order: flax kernel
    (k, k, out, in) is the torch weight (in, out, k, k) transposed as a conv weight.
    The bias bound uses PyTorch's fan-in of that weight, ``out * 3 * 3``.
    """
    return nn.ConvTranspose(
        features,
        (3, 3),
        strides=(2, 2),
        padding=((1, 2), (1, 2)),
        transpose_kernel=True,
        kernel_init=weight_init,
        bias_init=torch_default_bias_init(features * 3 * 3),
        name=name,
    )


class ResnetBlock(nn.Module):
    """BiOST ``ResnetBlock`` (reflect padding, no dropout): ``x + IN(conv2(RPad(ReLU(IN(conv1(RPad(x)))))))``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        y = _conv(channels, 3, 1, 0, channels, "conv1")(reflect_pad(x, 1))
        y = nn.relu(instance_norm(y))
        y = _conv(channels, 3, 1, 0, channels, "conv2")(reflect_pad(y, 1))
        return x + instance_norm(y)


def _check_image(x: jax.Array, factor: int, channels: int, what: str) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"{what} takes NHWC images with {channels} channels, got shape {x.shape}")
    if x.shape[1] % factor or x.shape[2] % factor:
        raise ValueError(
            f"{what}: image height and width must be multiples of {factor} (2 ** n_downsampling) so that "
            f"the decoder gives back the input size; got {x.shape[1]}x{x.shape[2]}. Resize or crop the images."
        )


class DDDAEncoder(nn.Module):
    """BiOST ``ResnetEncoder``: images (B, H, W, 3) in [-1, 1] -> latent z (B, H/4, W/4, 256) (A.1.2).

    Flax names: ``conv_in`` (7x7), ``down{i}`` (3x3 stride 2), ``res{j}/conv{1,2}``.
    """

    ngf: int = 64
    n_downsampling: int = 2
    n_res_blocks: int = 4
    image_channels: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check_image(x, 2 ** self.n_downsampling, self.image_channels, "DDDAEncoder")
        x = _conv(self.ngf, 7, 1, 0, self.image_channels, "conv_in")(reflect_pad(x, 3))
        x = nn.relu(instance_norm(x))
        for i in range(self.n_downsampling):
            width = self.ngf * 2 ** i
            x = _conv(2 * width, 3, 2, 1, width, f"down{i}")(x)
            x = nn.relu(instance_norm(x))
        for j in range(self.n_res_blocks):
            x = ResnetBlock(name=f"res{j}")(x)
        return x


class DDDADecoder(nn.Module):
    """BiOST ``ResnetDecoder``: latent z (B, h, w, 256) -> images (B, 4h, 4w, 3) in [-1, 1] (tanh) (A.1.2).

    Flax names: ``res{j}/conv{1,2}``, ``up{i}`` (transposed 3x3 stride 2), ``conv_out`` (7x7).
    """

    ngf: int = 64
    n_downsampling: int = 2
    n_res_blocks: int = 4
    image_channels: int = 3

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        latent_channels = self.ngf * 2 ** self.n_downsampling
        if z.ndim != 4 or z.shape[-1] != latent_channels:
            raise ValueError(f"DDDADecoder takes NHWC latents with {latent_channels} channels, got shape {z.shape}")
        x = z
        for j in range(self.n_res_blocks):
            x = ResnetBlock(name=f"res{j}")(x)
        for i in range(self.n_downsampling):
            x = _conv_transpose_x2(self.ngf * 2 ** (self.n_downsampling - i - 1), f"up{i}")(x)
            x = nn.relu(instance_norm(x))
        x = _conv(self.image_channels, 7, 1, 0, self.ngf, "conv_out")(reflect_pad(x, 3))
        return jnp.tanh(x)


class DDDAAutoencoder(nn.Module):
    """One domain's encoder/decoder pair; params ``{'encoder': ..., 'decoder': ...}``.

    ``__call__(x)`` returns ``(Dec(Enc(x)), Enc(x))``; ``encode``/``decode`` run one half
    (``model.apply({'params': p}, x, method='encode')``). Both domains use the same module with
    their own params (``params_S``, ``params_T``).
    """

    ngf: int = 64
    n_downsampling: int = 2
    n_res_blocks: int = 4
    image_channels: int = 3

    def setup(self):
        sizes = dict(ngf=self.ngf, n_downsampling=self.n_downsampling, n_res_blocks=self.n_res_blocks,
                     image_channels=self.image_channels)
        self.encoder = DDDAEncoder(**sizes)
        self.decoder = DDDADecoder(**sizes)

    def encode(self, x: jax.Array) -> jax.Array:
        return self.encoder(x)

    def decode(self, z: jax.Array) -> jax.Array:
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        z = self.encoder(x)
        return self.decoder(z), z


def _model(model: DDDAAutoencoder | None) -> DDDAAutoencoder:
    return DDDAAutoencoder() if model is None else model


def init_autoencoder(key: jax.Array, model: DDDAAutoencoder | None = None, image_size: int | None = None) -> dict:
    """Fresh params ``{'encoder', 'decoder'}`` of one domain (BiOST init, see the module docstring).

    ``image_size`` only sizes the dummy input (the params do not depend on it); default
    ``4 * 2 ** n_downsampling``.
    """
    model = _model(model)
    image_size = 4 * 2 ** model.n_downsampling if image_size is None else image_size
    dummy = jnp.zeros((1, image_size, image_size, model.image_channels), jnp.float32)
    return model.init(key, dummy)["params"]


def phase2_init(phase1_params: dict) -> tuple[dict, dict]:
    """``(params_S, params_T)`` for phase II: both domains start from the phase-I source autoencoder (A.1.4).

    ``params_T`` is a copy (separate buffers, so a jitted step may donate both trees).
    """
    return phase1_params, jax.tree_util.tree_map(jnp.copy, phase1_params)


def encode(params: dict, images: jax.Array, model: DDDAAutoencoder | None = None) -> jax.Array:
    """``Enc(images)`` with one domain's params."""
    return _model(model).apply({"params": params}, images, method="encode")


def decode(params: dict, latents: jax.Array, model: DDDAAutoencoder | None = None) -> jax.Array:
    """``Dec(latents)`` with one domain's params."""
    return _model(model).apply({"params": params}, latents, method="decode")


def pseudo_target(params_S: dict, params_T: dict, images: jax.Array, model: DDDAAutoencoder | None = None) -> jax.Array:
    """Pseudo-targets ``Dec_T(Enc_S(x_s))`` of source images in [-1, 1] (AdAGeo §4.1; BiOST ``fake_BA``; A.1.6)."""
    return decode(params_T, encode(params_S, images, model), model)


def _l1(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(a - b))


def pseudo_kl(z: jax.Array) -> jax.Array:
    """MUNIT's pseudo-KL ``mean(z ** 2)`` over all elements (BiOST ``compute_kl``), the "KL" of AdAGeo eq. (3)."""
    return jnp.mean(jnp.square(z))


def phase1_loss(params: dict, images: jax.Array, model: DDDAAutoencoder | None = None) -> tuple[jax.Array, dict]:
    """Phase-I loss of the source autoencoder, ``L1(Dec(Enc(x)), x) + 0.001 * mean(Enc(x) ** 2)`` (A.1.4).

    Returns ``(loss, {'rec', 'kl'})`` (for ``jax.grad(..., has_aux=True)``); ``kl`` is unweighted.
    """
    reconstruction, z = _model(model).apply({"params": params}, images)
    rec, kl = _l1(reconstruction, images), pseudo_kl(z)
    return rec + KL_WEIGHT * kl, {"rec": rec, "kl": kl}


def phase2_losses(
    params_S: dict,
    params_T: dict,
    target_img: jax.Array,
    source_img: jax.Array,
    feature_cycle: bool = False,
    model: DDDAAutoencoder | None = None,
) -> tuple[jax.Array, jax.Array, dict]:
    """The two phase-II losses of BiOST (A.1.4; AdAGeo eq. 3-4), ``(loss_T, loss_S, terms)``.

    With ``t`` a target and ``s`` a source image (BiOST's a and b)::

        z_t = Enc_T(t)                          z_s = Enc_S(s)
        fake_TS  = Dec_S(z_t)                   fake_ST  = Dec_T(z_s)        (the pseudo-target)
        fake_TST = Dec_T(Enc_S(fake_TS))        fake_STS = Dec_S(Enc_T(fake_ST))
        loss_T = L1(fake_TST, t) + L1(Dec_T(z_t), t) + 0.001 mean(z_t ** 2)
                 [+ 0.001 MSE(Enc_T(fake_ST), stop_gradient(z_s))   if feature_cycle]
        loss_S = L1(fake_STS, s) + L1(Dec_S(z_s), s) + 0.001 mean(z_s ** 2)

    i.e. tst-cycle + reconstruction + pseudo-KL per domain, all weights 1 except the 0.001s. The
    feature-cycle term is in the BiOST code but **not** in the AdAGeo paper (eq. 4), hence off by
    default. The paper sums over images; with batch 1 the code's means are per-pixel means.
    ``terms`` holds every part, unweighted (``cycle_T``, ``rec_T``, ``kl_T``, ``feat_T``,
    ``cycle_S``, ``rec_S``, ``kl_S``) and ``loss_T``/``loss_S``. Which loss updates which params:
    :func:`phase2_grads`.
    """
    model = _model(model)
    z_t = encode(params_T, target_img, model)
    z_s = encode(params_S, source_img, model)
    fake_ts = decode(params_S, z_t, model)
    fake_st = decode(params_T, z_s, model)
    fake_tst = decode(params_T, encode(params_S, fake_ts, model), model)
    z_st = encode(params_T, fake_st, model)
    fake_sts = decode(params_S, z_st, model)

    terms = {
        "cycle_T": _l1(fake_tst, target_img),
        "rec_T": _l1(decode(params_T, z_t, model), target_img),
        "kl_T": pseudo_kl(z_t),
        "feat_T": jnp.mean(jnp.square(z_st - jax.lax.stop_gradient(z_s))),
        "cycle_S": _l1(fake_sts, source_img),
        "rec_S": _l1(decode(params_S, z_s, model), source_img),
        "kl_S": pseudo_kl(z_s),
    }
    loss_t = terms["cycle_T"] + terms["rec_T"] + KL_WEIGHT * terms["kl_T"]
    if feature_cycle:
        loss_t = loss_t + FEATURE_CYCLE_WEIGHT * terms["feat_T"]
    loss_s = terms["cycle_S"] + terms["rec_S"] + KL_WEIGHT * terms["kl_S"]
    terms.update(loss_T=loss_t, loss_S=loss_s)
    return loss_t, loss_s, terms


def phase2_grads(
    params_S: dict,
    params_T: dict,
    target_img: jax.Array,
    source_img: jax.Array,
    feature_cycle: bool = False,
    model: DDDAAutoencoder | None = None,
) -> tuple[dict, dict, dict]:
    """``(grads_S, grads_T, terms)``: d loss_S / d params_S and d loss_T / d params_T (AdAGeo eq. 2).

    The "frozen" bars of eq. (2) and BiOST's two optimisers (A.1.4): optimiser T (Enc_T + Dec_T)
    steps on loss_T only, optimiser S (Enc_S + Dec_S) on loss_S only. Each loss still
    back-propagates *through* the other domain's modules (the tst-cycle reaches Enc_T through Dec_T,
    Enc_S and Dec_S), but d loss_T / d params_S and d loss_S / d params_T are dropped.

    Both gradients are taken at the same params. The original code ran backward(loss_T), stepped
    T, then backward(loss_S), whose graph (PyTorch 0.x) already saw T's weights changed in place;
    the difference is second order in the learning rate.

    One backward pass: the gradient of ``loss_T(sg(params_S), params_T) + loss_S(params_S,
    sg(params_T))`` (``sg`` = stop_gradient) is exactly the pair above; the sum itself means nothing.
    """

    def surrogate(p_s, p_t):
        sg = jax.lax.stop_gradient
        loss_t, _, terms_t = phase2_losses(sg(p_s), p_t, target_img, source_img, feature_cycle, model)
        _, loss_s, terms_s = phase2_losses(p_s, sg(p_t), target_img, source_img, feature_cycle, model)
        terms = {k: v for k, v in terms_t.items() if k.endswith("_T")}
        terms.update({k: v for k, v in terms_s.items() if k.endswith("_S")})
        return loss_t + loss_s, terms

    (grads_s, grads_t), terms = jax.grad(surrogate, argnums=(0, 1), has_aux=True)(params_S, params_T)
    return grads_s, grads_t, terms


def ddda_optimizer(learning_rate: float | optax.Schedule = 2e-4) -> optax.GradientTransformation:
    """BiOST's Adam (A.1.5): lr 2e-4, betas (0.5, 0.999), no weight decay; one per domain in phase II."""
    return optax.adam(learning_rate, b1=0.5, b2=0.999)
