"""DINOv2 vision transformers (ViT-S/B/L/G, patch 14), exactly as the official repository builds them.

Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision" (TMLR 2024),
and Darcet et al., "Vision Transformers Need Registers" (ICLR 2024) for the register
tokens. The architecture follows ``facebookresearch/dinov2`` (``DinoVisionTransformer``
as built by ``dinov2/hub/backbones.py``: image size 518, so the learned position
embeddings form a 37x37 grid plus one for the class token; LayerScale initialised to 1):

1. patch embedding: a 14x14 convolution with stride 14 (``patch_embed.proj``);
   input sides must be multiples of 14 (the official ``PatchEmbed`` asserts it);
2. prepend the class token, add the position embeddings, interpolated bicubically
   to the input grid (:func:`interpolate_pos_embed`);
3. optionally insert ``num_register_tokens`` register tokens right after the class
   token (they get no position embedding);
4. ``depth`` pre-norm blocks ``x += ls1 * attn(norm1(x)); x += ls2 * ffn(norm2(x))``
   (LayerNorm eps 1e-6; multi-head self-attention with a fused ``qkv`` projection;
   FFN = Linear-GELU(erf)-Linear with hidden 4C, or for ViT-G the SwiGLU FFN
   ``w3(silu(x1) * x2)`` with ``[x1, x2] = w12(x)`` and hidden width
   ``(int(4C * 2/3) + 7) // 8 * 8`` = 4096);
5. a final LayerNorm (``norm``).

Position-embedding interpolation differs between the official hub variants and we
reproduce both: plain models use ``scale_factor = (grid + 0.1) / 37`` with
non-antialiased bicubic (the "0.1 offset" kludge of the DINO repository); register
models (``*_reg``) use an output ``size`` with antialiased bicubic (offset 0). When the
input grid is 37x37 and square the table is used as is (no resampling), as upstream.

Freezing (SALAD, Izquierdo & Civera CVPR 2024, ``models/backbones/dinov2.py``): with
``num_trainable_blocks = N`` the tokens entering block ``depth - N`` are passed through
``jax.lax.stop_gradient`` (SALAD runs the first blocks under ``torch.no_grad`` and
detaches), so the patch embedding, tokens, position embeddings and the first
``depth - N`` blocks get no gradient and no backward pass runs through them; the last
``N`` blocks and the final norm train. :func:`dinov2_frozen_mask` gives the matching
optimizer mask.

Intermediate facets (AnyLoc, Keetha et al. RA-L 2023, ``AnyLoc/DINO:dinov2_extractor.py``):
``facet='value', facet_layer=31`` stops the network inside block 31 and returns the value
third of its ``attn.qkv`` output, what AnyLoc's forward hook on ``blocks[31].attn.qkv``
captures; see :mod:`jaxvpr.models.anyloc`.

Flax parameter names mirror the official PyTorch names (``blocks_3/attn/qkv`` is
``blocks.3.attn.qkv``); see :mod:`jaxvpr.convert.dinov2` for the exact mapping.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvpr.models.layers import torch_default_bias_init, torch_default_kernel_init

LAYER_NORM_EPS = 1e-6
QKV_FACETS = ("query", "key", "value")
FACETS = (*QKV_FACETS, "token")
"""Intermediate features :class:`DinoV2` can return instead of its final output (``facet``):
a third of block ``facet_layer``'s ``attn.qkv`` output, or that block's output tokens."""


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Shape of a DINOv2 vision transformer.

    ``pos_grid`` is the side of the learned position-embedding grid (518 / 14 = 37 for
    every published DINOv2 checkpoint). ``ffn`` is ``"mlp"`` or ``"swiglu"``.
    """

    embed_dim: int
    depth: int
    num_heads: int
    ffn: str = "mlp"
    mlp_ratio: float = 4.0
    patch_size: int = 14
    pos_grid: int = 37

    @property
    def ffn_hidden_dim(self) -> int:
        """Hidden width of the FFN: ``C * mlp_ratio``, or for SwiGLU the official
        ``SwiGLUFFNFused`` rounding ``(int(C * mlp_ratio * 2/3) + 7) // 8 * 8``."""
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.ffn == "swiglu":
            return (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden


DINOV2_ARCHS: dict[str, ViTConfig] = {
    "vits14": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vitb14": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vitl14": ViTConfig(embed_dim=1024, depth=24, num_heads=16),
    "vitg14": ViTConfig(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}


def resolve_arch(arch: str | ViTConfig) -> ViTConfig:
    """``'vitb14'`` (or ``'dinov2_vitb14'``) -> its :class:`ViTConfig`; a ViTConfig passes through."""
    if isinstance(arch, ViTConfig):
        return arch
    name = arch.removeprefix("dinov2_")
    if name not in DINOV2_ARCHS:
        raise ValueError(
            f"Unknown DINOv2 architecture {arch!r}: use one of {sorted(DINOV2_ARCHS)} "
            "(or pass a jaxvpr.models.dinov2.ViTConfig for a custom size)."
        )
    return DINOV2_ARCHS[name]


def default_interpolation(num_register_tokens: int) -> tuple[float, bool]:
    """(offset, antialias) of the official hub models: (0.1, False) plain, (0.0, True) with registers."""
    return (0.0, True) if num_register_tokens > 0 else (0.1, False)


# --------------------------------------------------------------------------------------
# Bicubic resampling exactly as torch.nn.functional.interpolate(mode="bicubic",
# align_corners=False) computes it on the CPU.
# --------------------------------------------------------------------------------------


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel W(x) with parameter ``a`` (Keys, IEEE TASSP 1981)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def bicubic_resize_matrix(
    in_size: int,
    out_size: int,
    scale_factor: float | None = None,
    antialias: bool = False,
) -> np.ndarray:
    """Matrix ``R`` (out_size, in_size), float32, such that ``R @ x`` resizes ``x`` along one axis.

    Reproduces PyTorch's bicubic interpolation with ``align_corners=False``:

    * the sampling step is ``1 / scale_factor`` when a scale factor is given (PyTorch
      uses the given factor, not ``in/out``, for the coordinates), else ``in / out``;
      output pixel ``o`` samples the input at ``step * (o + 0.5) - 0.5``;
    * ``antialias=False``: Keys' kernel with ``a = -0.75`` on the 4 nearest samples,
      indices clamped to the border (replicate padding);
    * ``antialias=True``: Keys' kernel with ``a = -0.5`` (PIL), support ``2 * max(step, 1)``
      stretched by ``step`` when downsampling, taps outside the image dropped and the
      weights renormalised to sum to one.

    Arithmetic is done in float32 like PyTorch's CPU kernel for float inputs.
    """
    f32 = np.float32
    if scale_factor is not None and scale_factor > 0:
        step = f32(1.0 / scale_factor)
    else:
        step = f32(in_size) / f32(out_size)
    out_idx = np.arange(out_size, dtype=f32)
    matrix = np.zeros((out_size, in_size), np.float64)

    if not antialias:
        src = (step * (out_idx + f32(0.5)) - f32(0.5)).astype(f32)
        base = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
        frac = np.clip(src - base.astype(f32), f32(0.0), f32(1.0)).astype(np.float64)
        # Tap k sits at integer offset base - 1 + k; its distance to the sample is |frac + 1 - k|.
        for k in range(4):
            weight = _keys_cubic(frac + 1.0 - k, a=-0.75)
            cols = np.clip(base - 1 + k, 0, in_size - 1)
            np.add.at(matrix, (np.arange(out_size), cols), weight)
        return matrix.astype(f32)

    support = 2.0 * float(step) if step >= 1.0 else 2.0
    stretch = 1.0 / float(step) if step >= 1.0 else 1.0
    centers = (step * (out_idx + f32(0.5))).astype(np.float64)
    for o, center in enumerate(centers):
        lo = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C++ does
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        weight = _keys_cubic((taps - center + 0.5) * stretch, a=-0.5)
        total = weight.sum()
        matrix[o, lo:hi] = weight / total if total != 0.0 else weight
    return matrix.astype(f32)


def interpolate_pos_embed(
    pos_embed: jax.Array,
    grid_hw: tuple[int, int],
    offset: float = 0.1,
    antialias: bool = False,
) -> jax.Array:
    """Resample a (1, 1 + M*M, C) position-embedding table to an ``(h, w)`` patch grid.

    The official ``DinoVisionTransformer.interpolate_pos_encoding``: the class-token
    entry is kept; the M x M patch grid is resized bicubically (``align_corners=False``)
    with ``scale_factor = ((h + offset) / M, (w + offset) / M)`` when ``offset > 0``
    (output size ``floor(M * scale) = h, w``; the sampling step is ``M / (h + offset)``),
    or to ``size=(h, w)`` when ``offset == 0``. An ``h == w == M`` grid is returned
    unchanged (only reached for square inputs, as upstream). Returns (1, 1 + h*w, C).
    """
    num_pos = pos_embed.shape[1] - 1
    side = int(math.isqrt(num_pos))
    if side * side != num_pos:
        raise ValueError(f"pos_embed has {num_pos} patch entries, not a square grid.")
    h, w = grid_hw
    if (h, w) == (side, side):
        return pos_embed
    if offset:
        rows = bicubic_resize_matrix(side, h, (h + offset) / side, antialias)
        cols = bicubic_resize_matrix(side, w, (w + offset) / side, antialias)
    else:
        rows = bicubic_resize_matrix(side, h, None, antialias)
        cols = bicubic_resize_matrix(side, w, None, antialias)
    grid = pos_embed[0, 1:].astype(jnp.float32).reshape(side, side, -1)
    resized = jnp.einsum(
        "ym,xn,mnc->yxc", rows, cols, grid, precision=jax.lax.Precision.HIGHEST
    )
    patch_pos = resized.reshape(1, h * w, -1).astype(pos_embed.dtype)
    return jnp.concatenate([pos_embed[:, :1], patch_pos], axis=1)


# --------------------------------------------------------------------------------------
# Modules. Names mirror the official PyTorch module names.
# --------------------------------------------------------------------------------------

_linear_init = nn.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)
"""``trunc_normal_(std=0.02)`` of the official ``init_weights_vit_timm`` (bounds +-2 absolute = +-100 std)."""


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=_linear_init, bias_init=nn.initializers.zeros, name=name)


def _layer_norm(name: str) -> nn.LayerNorm:
    # Two-pass variance (not E[x^2]-E[x]^2): DINOv2 activations have large per-channel offsets.
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, name=name)


class PatchEmbed(nn.Module):
    """``patch_embed``: a ``patch_size`` x ``patch_size`` conv with equal stride (``proj``)."""

    embed_dim: int
    patch_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        return nn.Conv(
            self.embed_dim,
            (p, p),
            strides=(p, p),
            padding="VALID",
            kernel_init=torch_default_kernel_init,
            bias_init=torch_default_bias_init(3 * p * p),
            name="proj",
        )(x)


class LayerScale(nn.Module):
    """``x * gamma`` with a per-channel ``gamma`` (Touvron et al. CaiT), initialised to ``init_value``."""

    init_value: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
        return x * gamma


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` Linear (rows ordered q, k, v; heads
    contiguous inside each) and an output ``proj``; logits scaled by ``head_dim ** -0.5``.

    ``facet='query' | 'key' | 'value'`` returns that third of the ``qkv`` output instead,
    (B, N, C) channels ``[0:C]``, ``[C:2C]`` or ``[2C:3C]`` (AnyLoc's facets); ``proj`` is
    then neither called nor created.
    """

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array, facet: str | None = None) -> jax.Array:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = _dense(3 * dim, "qkv")(x)
        if facet is not None:
            third = QKV_FACETS.index(facet)
            return qkv[..., third * dim : (third + 1) * dim]
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, heads, head_dim)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (head_dim**-0.5)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, dim)
        return _dense(dim, "proj")(out)


class Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))`` with the exact (erf) GELU."""

    hidden_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.gelu(_dense(self.hidden_dim, "fc1")(x), approximate=False)
        return _dense(x.shape[-1], "fc2")(h)


class SwiGLUFFN(nn.Module):
    """``w3(silu(x1) * x2)`` with ``[x1, x2] = split(w12(x), 2)`` (Shazeer 2020; DINOv2 ViT-G)."""

    hidden_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x12 = _dense(2 * self.hidden_dim, "w12")(x)
        x1, x2 = jnp.split(x12, 2, axis=-1)
        return _dense(x.shape[-1], "w3")(nn.silu(x1) * x2)


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches.

    ``facet='query' | 'key' | 'value'`` stops inside the block and returns that third of
    ``attn.qkv(norm1(x))``: only ``norm1`` and ``attn.qkv`` are used (and created).
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array, facet: str | None = None) -> jax.Array:
        cfg = self.config
        if cfg.ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ViTConfig.ffn must be 'mlp' or 'swiglu', got {cfg.ffn!r}.")
        if facet is not None:
            return Attention(cfg.num_heads, name="attn")(_layer_norm("norm1")(x), facet=facet)
        ffn = SwiGLUFFN if cfg.ffn == "swiglu" else Mlp
        x = x + LayerScale(name="ls1")(Attention(cfg.num_heads, name="attn")(_layer_norm("norm1")(x)))
        x = x + LayerScale(name="ls2")(ffn(cfg.ffn_hidden_dim, name="mlp")(_layer_norm("norm2")(x)))
        return x


class DinoV2(nn.Module):
    """DINOv2 backbone on NHWC images.

    Attributes:
      arch: ``'vits14' | 'vitb14' | 'vitl14' | 'vitg14'`` (or a :class:`ViTConfig`).
      num_register_tokens: 0, or 4 for the ``*_reg`` checkpoints.
      num_trainable_blocks: ``None`` trains everything; ``N`` trains only the last N
        blocks and the final norm (stop-gradient before block ``depth - N``, as SALAD).
      output: ``'cls'`` -> normalised class token (B, C) (the official ``forward``'s
        ``x_norm_clstoken``); ``'tokens'`` -> ``(patch_map (B, h, w, C), cls (B, C))``,
        both after the final norm (registers dropped), what SALAD consumes.
      interpolate_offset / interpolate_antialias: position-embedding resampling; ``None``
        picks the official hub setting for the variant (see :func:`default_interpolation`).
      facet / facet_layer: with ``facet`` one of :data:`FACETS` the network stops at block
        ``facet_layer`` (0-based) and ``output`` refers to that block's ``facet`` instead of
        the final normalised tokens (AnyLoc, Keetha et al. RA-L 2023: ``'value'`` of block 31
        of ViT-G/14): ``'query' | 'key' | 'value'`` is that third of ``attn.qkv(norm1(x))``
        (only ``norm1`` and ``attn.qkv`` of that block exist), ``'token'`` the block's output.
        Later blocks and the final norm are neither run nor created, and
        ``num_trainable_blocks`` counts back from block ``facet_layer``.

    ``__call__(x, train=False)``: ``x`` is (B, H, W, 3) float32, ImageNet-normalised,
    H and W multiples of 14 (patch grid h = H/14, w = W/14). ``train`` is accepted for a
    uniform model API; the published models use no dropout or stochastic depth.
    """

    arch: Any = "vitb14"
    num_register_tokens: int = 0
    num_trainable_blocks: int | None = None
    output: str = "cls"
    interpolate_offset: float | None = None
    interpolate_antialias: bool | None = None
    facet: str | None = None
    facet_layer: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        del train
        cfg = resolve_arch(self.arch)
        if self.output not in ("cls", "tokens"):
            raise ValueError(f"DinoV2.output must be 'cls' or 'tokens', got {self.output!r}.")
        if self.facet is not None:
            if self.facet not in FACETS:
                raise ValueError(f"DinoV2.facet must be one of {FACETS} or None, got {self.facet!r}.")
            if self.facet_layer is None or not 0 <= self.facet_layer < cfg.depth:
                raise ValueError(
                    f"DinoV2.facet_layer must be a block index in [0, {cfg.depth - 1}] when facet is "
                    f"set, got {self.facet_layer!r}."
                )
        num_blocks = cfg.depth if self.facet is None else self.facet_layer + 1  # blocks that run
        n_train = self.num_trainable_blocks
        if n_train is not None and not 0 <= n_train <= num_blocks:
            raise ValueError(
                f"num_trainable_blocks={n_train} is outside [0, {num_blocks}] for this architecture"
                + ("." if self.facet is None else f" stopping at block {self.facet_layer}.")
            )
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"DinoV2 expects NHWC RGB images (B, H, W, 3), got shape {x.shape}.")
        batch, height, width, _ = x.shape
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(
                f"DinoV2 input height and width must be multiples of the patch size {p}, got "
                f"{height}x{width}: resize or crop the images (SALAD uses 224x224 for training "
                f"and 322x322 for evaluation)."
            )
        grid_h, grid_w = height // p, width // p
        dim = cfg.embed_dim
        num_pos = cfg.pos_grid * cfg.pos_grid + 1

        cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, dim))
        pos_embed = self.param("pos_embed", _linear_init, (1, num_pos, dim))
        registers = None
        if self.num_register_tokens:
            registers = self.param(
                "register_tokens", nn.initializers.normal(1e-6), (1, self.num_register_tokens, dim)
            )
        # Used only by DINOv2's masked-image pre-training; kept so checkpoints round-trip.
        self.param("mask_token", nn.initializers.zeros, (1, dim))

        patches = PatchEmbed(dim, p, name="patch_embed")(x).reshape(batch, grid_h * grid_w, dim)
        tokens = jnp.concatenate([jnp.broadcast_to(cls_token, (batch, 1, dim)), patches], axis=1)
        default_offset, default_aa = default_interpolation(self.num_register_tokens)
        offset = default_offset if self.interpolate_offset is None else self.interpolate_offset
        antialias = default_aa if self.interpolate_antialias is None else self.interpolate_antialias
        tokens = tokens + interpolate_pos_embed(pos_embed, (grid_h, grid_w), offset, antialias)
        if registers is not None:
            regs = jnp.broadcast_to(registers, (batch, self.num_register_tokens, dim))
            tokens = jnp.concatenate([tokens[:, :1], regs, tokens[:, 1:]], axis=1)

        n_frozen = None if n_train is None else num_blocks - n_train
        qkv_facet = self.facet if self.facet in QKV_FACETS else None
        for i in range(num_blocks):
            if i == n_frozen:
                # SALAD runs the frozen part under torch.no_grad() and detaches: nothing before
                # block depth - N (embeddings included) receives a gradient.
                tokens = jax.lax.stop_gradient(tokens)
            tokens = Block(cfg, name=f"blocks_{i}")(tokens, facet=qkv_facet if i == num_blocks - 1 else None)
        if n_frozen == num_blocks:
            tokens = jax.lax.stop_gradient(tokens)
        if self.facet is None:
            tokens = _layer_norm("norm")(tokens)

        cls_out = tokens[:, 0]
        if self.output == "cls":
            return cls_out
        patch_out = tokens[:, 1 + self.num_register_tokens :].reshape(batch, grid_h, grid_w, dim)
        return patch_out, cls_out


def dinov2_frozen_mask(params: Any, num_trainable_blocks: int | None) -> Any:
    """Boolean pytree like ``params`` (True = frozen) matching ``DinoV2(num_trainable_blocks=N)``.

    Frozen: ``patch_embed``, ``cls_token``, ``pos_embed``, ``register_tokens`` and blocks
    ``0 .. depth-N-1`` (they get no gradient through the stop-gradient), and always
    ``mask_token`` (never read by the forward pass; freezing it keeps weight decay from
    changing it, as PyTorch optimisers skip parameters whose grad is None). Trainable:
    the last ``N`` blocks and the final ``norm``. ``N=None`` freezes only ``mask_token``.

    ``params`` is the DinoV2 parameter dict (keys ``cls_token``, ``blocks_0``, ...) or a
    ``{'params': ...}`` variables dict around it.
    """
    if set(params) == {"params"}:
        return {"params": dinov2_frozen_mask(params["params"], num_trainable_blocks)}
    block_ids = sorted(int(k.split("_")[1]) for k in params if k.startswith("blocks_"))
    if not block_ids:
        raise ValueError(
            f"dinov2_frozen_mask: no 'blocks_<i>' entries in the given params (keys: {sorted(params)}); "
            "pass the DinoV2 parameter subtree."
        )
    depth = len(block_ids)
    if num_trainable_blocks is not None and not 0 <= num_trainable_blocks <= depth:
        raise ValueError(f"num_trainable_blocks={num_trainable_blocks} is outside [0, {depth}].")
    first_trainable = 0 if num_trainable_blocks is None else depth - num_trainable_blocks

    def frozen(name: str) -> bool:
        if name == "mask_token":
            return True
        if name.startswith("blocks_"):
            return int(name.split("_")[1]) < first_trainable
        if name == "norm":
            return False
        return num_trainable_blocks is not None  # patch_embed, cls_token, pos_embed, register_tokens

    return {name: jax.tree.map(lambda _, f=frozen(name): f, sub) for name, sub in params.items()}
