"""DINOv2 backbone, SALAD head and their checkpoint mapping.

References (never the code under test):
* Hugging Face ``transformers`` ``Dinov2Model`` / ``Dinov2WithRegistersModel`` with random
  weights, loaded into jaxvpr through ``hf_dinov2_to_official`` + ``dinov2_rules``;
* ``torch.nn.functional.interpolate`` for the bicubic position-embedding resampling,
  called with the arguments of the official ``interpolate_pos_encoding``;
* a minimal PyTorch SALAD written below from the paper's equations (probability-domain
  Sinkhorn in float64), with the module names of the checkpoint layout;
* the checkpoint layouts read off the official code (tests/fixtures/checkpoint_layouts).
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvpr.convert.dinov2 import (
    dinov2_rules,
    hf_dinov2_to_official,
    is_hf_dinov2,
    official_to_hf_dinov2,
    salad_rules,
)
from jaxvpr.models.dinov2 import (
    DinoV2,
    ViTConfig,
    dinov2_frozen_mask,
    interpolate_pos_embed,
    resolve_arch,
)
from jaxvpr.models.salad import Salad, log_optimal_transport

torch = pytest.importorskip("torch")
F = torch.nn.functional

LAYOUTS = Path(__file__).parent / "fixtures" / "checkpoint_layouts"
POS_GRID = 37  # 518 / 14, the grid of every published DINOv2 position-embedding table


# ------------------------------------------------------------------ rule application (local)


def _to_flax(array: np.ndarray, transform: str) -> np.ndarray:
    if transform == "linear":
        return array.T
    if transform == "conv":
        return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    assert transform == "identity", transform
    return array


def _to_torch(array: np.ndarray, transform: str) -> np.ndarray:
    if transform == "linear":
        return array.T
    if transform == "conv":
        return array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    return array


def torch_to_flax(state_dict: dict[str, np.ndarray], rules) -> dict:
    assert sorted(state_dict) == sorted(name for name, _, _ in rules), (
        set(state_dict) ^ {name for name, _, _ in rules}
    )
    tree: dict = {}
    for name, path, transform in rules:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(_to_flax(np.asarray(state_dict[name]), transform))
    return tree


def flax_to_torch(tree: dict, rules) -> dict[str, np.ndarray]:
    out = {}
    for name, path, transform in rules:
        node = tree
        for key in path:
            node = node[key]
        out[name] = _to_torch(np.asarray(node), transform)
    return out


def flat_paths(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in leaves}


def random_variables(model, *inputs, seed: int = 0) -> dict:
    """Variables of ``model`` filled with seeded normal noise (cheaper than compiling ``init``)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(np.float32) * 0.3), shapes)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# ------------------------------------------------------------------ Hugging Face helpers


def randomize_(model, seed: int) -> None:
    """Overwrite every parameter with seeded random values of a sensible scale."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2 and "embeddings" not in name:  # linear / conv weights
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight")):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("lambda1"):
                p.copy_(0.5 + 0.3 * noise)
            else:  # biases, class/register/mask tokens, position embeddings
                p.copy_(0.5 * noise)


def hf_model(kind: str, hidden: int, layers: int, heads: int, seed: int, **config):
    transformers = pytest.importorskip("transformers")
    if kind == "registers":
        cfg_cls, model_cls = transformers.Dinov2WithRegistersConfig, transformers.Dinov2WithRegistersModel
    else:
        cfg_cls, model_cls = transformers.Dinov2Config, transformers.Dinov2Model
    cfg = cfg_cls(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        mlp_ratio=4,
        image_size=POS_GRID * 14,
        patch_size=14,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        attn_implementation="eager",
        **config,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    randomize_(model, seed)
    return model


def official_pos_encoding(offset: float, antialias: bool):
    """The official ``DinoVisionTransformer.interpolate_pos_encoding`` arithmetic, written with
    torch's own interpolate, to install on a HF embedding module in place of its version."""

    def interpolate(self, embeddings, height, width):
        pos = self.position_embeddings
        num_pos = pos.shape[1] - 1
        side = int(math.sqrt(num_pos))
        h0, w0 = height // 14, width // 14
        if embeddings.shape[1] - 1 == num_pos and height == width:
            return pos
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if offset:
            kwargs = {"scale_factor": (float(h0 + offset) / side, float(w0 + offset) / side)}
        else:
            kwargs = {"size": (h0, w0)}
        grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)
        assert tuple(grid.shape[-2:]) == (h0, w0)
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)

    return interpolate


def load_into_jax(model, arch, num_register_tokens: int = 0) -> dict:
    hf_sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert is_hf_dinov2(hf_sd)
    official = hf_dinov2_to_official(hf_sd)
    assert not is_hf_dinov2(official)
    return torch_to_flax(official, dinov2_rules(arch, num_register_tokens))


def check_tokens_parity(model, jax_model, params, images: np.ndarray, num_registers: int = 0):
    with torch.no_grad():
        ref = model(torch.from_numpy(images).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    patch_map, cls = jax.jit(jax_model.apply)(params, jnp.asarray(images))
    b, h, w, c = patch_map.shape
    assert (h, w) == (images.shape[1] // 14, images.shape[2] // 14)
    assert rel_err(cls, ref[:, 0]) < 1e-4
    assert rel_err(np.asarray(patch_map).reshape(b, h * w, c), ref[:, 1 + num_registers :]) < 1e-4


def images(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, height, width, 3)).astype(np.float32)


# ------------------------------------------------------------------ position embeddings


@pytest.mark.parametrize("grid", [(7, 9), (16, 16), (23, 23), (50, 5)])
@pytest.mark.parametrize("offset, antialias", [(0.1, False), (0.0, True), (0.0, False)])
def test_pos_embed_interpolation_matches_torch(grid, offset, antialias):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((1, 1 + POS_GRID**2, 6)).astype(np.float32)
    h, w = grid
    ours = np.asarray(interpolate_pos_embed(jnp.asarray(table), grid, offset, antialias))

    torch_grid = torch.from_numpy(table[:, 1:]).reshape(1, POS_GRID, POS_GRID, 6).permute(0, 3, 1, 2)
    if offset:  # the official call: scale factors (grid + 0.1) / 37, output floor(37 * s) = grid
        kwargs = {"scale_factor": ((h + offset) / POS_GRID, (w + offset) / POS_GRID)}
    else:
        kwargs = {"size": (h, w)}
    ref = F.interpolate(torch_grid, mode="bicubic", align_corners=False, antialias=antialias, **kwargs)
    ref = ref.permute(0, 2, 3, 1).reshape(1, h * w, 6).numpy()

    assert ours.shape == (1, 1 + h * w, 6)
    np.testing.assert_array_equal(ours[:, 0], table[:, 0])
    np.testing.assert_allclose(ours[:, 1:], ref, atol=2e-5)


def test_pos_embed_offset_changes_the_result_and_native_grid_is_untouched():
    table = jnp.asarray(np.random.default_rng(1).standard_normal((1, 1 + POS_GRID**2, 4)), jnp.float32)
    with_offset = interpolate_pos_embed(table, (7, 9), 0.1, False)
    without = interpolate_pos_embed(table, (7, 9), 0.0, False)
    assert float(jnp.abs(with_offset - without).max()) > 1e-3
    assert interpolate_pos_embed(table, (POS_GRID, POS_GRID), 0.1, False) is table


# ------------------------------------------------------------------ parity with transformers


def test_hf_dinov2_parity_with_native_interpolation():
    """Unmodified HF Dinov2Model on a 7x9 grid; our offset set to whatever this transformers does."""
    import transformers

    source = inspect.getsource(transformers.models.dinov2.modeling_dinov2.Dinov2Embeddings)
    offset = 0.1 if "scale_factor" in source else 0.0  # transformers>=5 passes size=(h, w)
    model = hf_model("plain", hidden=64, layers=3, heads=4, seed=0)
    cfg = ViTConfig(embed_dim=64, depth=3, num_heads=4)
    params = load_into_jax(model, cfg)
    jax_model = DinoV2(cfg, output="tokens", interpolate_offset=offset, interpolate_antialias=False)
    check_tokens_parity(model, jax_model, params, images(2, 98, 126))

    cls_only = DinoV2(cfg, output="cls", interpolate_offset=offset, interpolate_antialias=False)
    with torch.no_grad():
        pooled = model(torch.from_numpy(images(2, 98, 126)).permute(0, 3, 1, 2)).pooler_output.numpy()
    assert rel_err(jax.jit(cls_only.apply)(params, jnp.asarray(images(2, 98, 126))), pooled) < 1e-4


def test_hf_dinov2_parity_official_interpolation_and_native_grid():
    """HF Dinov2Model with the official 0.1-offset resampling installed: our default DinoV2."""
    model = hf_model("plain", hidden=48, layers=2, heads=3, seed=1)
    model.embeddings.interpolate_pos_encoding = official_pos_encoding(0.1, False).__get__(model.embeddings)
    cfg = ViTConfig(embed_dim=48, depth=2, num_heads=3)
    params = load_into_jax(model, cfg)
    check_tokens_parity(model, DinoV2(cfg, output="tokens"), params, images(2, 126, 98, seed=1))
    # 518 x 518: the 37x37 table is used as is, without resampling.
    check_tokens_parity(model, DinoV2(cfg, output="tokens"), params, images(1, 518, 518, seed=2))


def test_hf_dinov2_with_registers_parity():
    """Dinov2WithRegistersModel (size + antialiased bicubic, as the official *_reg hub models)."""
    model = hf_model("registers", hidden=64, layers=2, heads=4, seed=2, num_register_tokens=4)
    cfg = ViTConfig(embed_dim=64, depth=2, num_heads=4)
    params = load_into_jax(model, cfg, num_register_tokens=4)
    jax_model = DinoV2(cfg, num_register_tokens=4, output="tokens")
    check_tokens_parity(model, jax_model, params, images(2, 98, 126, seed=3), num_registers=4)


def test_hf_dinov2_swiglu_parity():
    """ViT-G style SwiGLU FFN (HF use_swiglu_ffn=True; transformers>=5 splits w12 into gate/up)."""
    model = hf_model("plain", hidden=64, layers=2, heads=4, seed=3, use_swiglu_ffn=True)
    model.embeddings.interpolate_pos_encoding = official_pos_encoding(0.1, False).__get__(model.embeddings)
    cfg = ViTConfig(embed_dim=64, depth=2, num_heads=4, ffn="swiglu")
    assert cfg.ffn_hidden_dim == (int(256 * 2 / 3) + 7) // 8 * 8 == 176
    params = load_into_jax(model, cfg)
    assert params["params"]["blocks_0"]["mlp"]["w12"]["kernel"].shape == (64, 2 * 176)
    check_tokens_parity(model, DinoV2(cfg, output="tokens"), params, images(2, 98, 126, seed=4))


def test_vits14_full_size_parity_at_224():
    """The real ViT-S/14 shape (12 blocks, 384 channels, 6 heads), one 224x224 image."""
    model = hf_model("plain", hidden=384, layers=12, heads=6, seed=4)
    model.embeddings.interpolate_pos_encoding = official_pos_encoding(0.1, False).__get__(model.embeddings)
    params = load_into_jax(model, "vits14")
    check_tokens_parity(model, DinoV2("vits14", output="tokens"), params, images(1, 224, 224, seed=5))


@pytest.mark.parametrize("kind, config", [("plain", {}), ("plain", {"use_swiglu_ffn": True}),
                                          ("registers", {"num_register_tokens": 4})])
def test_hf_name_mapping_round_trips(kind, config):
    model = hf_model(kind, hidden=32, layers=2, heads=2, seed=5, **config)
    hf_sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    official = hf_dinov2_to_official(hf_sd)
    assert all(not k.startswith(("embeddings", "encoder", "layernorm")) for k in official)
    assert official["blocks.1.attn.qkv.weight"].shape == (96, 32)
    back = official_to_hf_dinov2(official, naming="transformers5")
    assert sorted(back) == sorted(hf_sd)
    for name, value in hf_sd.items():
        np.testing.assert_array_equal(back[name], value)
    hub = official_to_hf_dinov2(official, naming="hub")
    assert "encoder.layer.0.attention.attention.query.weight" in hub
    again = hf_dinov2_to_official(hub)
    assert sorted(again) == sorted(official)
    for name, value in official.items():
        np.testing.assert_array_equal(again[name], value)


def test_hf_mapping_rejects_unknown_and_incomplete_names():
    with pytest.raises(KeyError, match="unknown"):
        hf_dinov2_to_official({"embeddings.cls_token": np.zeros((1, 1, 4)), "classifier.weight": np.zeros(2)})
    with pytest.raises(KeyError, match="missing"):
        hf_dinov2_to_official({"encoder.layer.0.attention.q_proj.weight": np.zeros((4, 4))})


# ------------------------------------------------------------------ checkpoint layouts


LAYOUT_CASES = [
    ("dinov2_vits14.json", "vits14", 0),
    ("dinov2_vitb14.json", "vitb14", 0),
    ("dinov2_vitb14_reg.json", "vitb14", 4),
    ("dinov2_vitl14.json", "vitl14", 0),
    ("dinov2_vitg14.json", "vitg14", 0),
]


def _flax_shape(torch_shape, transform):
    if transform == "linear":
        return tuple(reversed(torch_shape))
    if transform == "conv":
        o, i, kh, kw = torch_shape
        return (kh, kw, i, o)
    return tuple(torch_shape)


def check_rules_against(layout: dict, rules, flax_shapes: dict) -> None:
    names = [name for name, _, _ in rules]
    assert len(names) == len(set(names))
    assert names == list(layout), "rules must name exactly the layout's tensors"
    covered = [path for _, path, _ in rules]
    assert sorted(covered) == sorted(flax_shapes), "rules must cover exactly the flax parameters"
    for name, path, transform in rules:
        assert flax_shapes[path] == _flax_shape(layout[name], transform), name


@pytest.mark.parametrize("filename, arch, registers", LAYOUT_CASES)
def test_rules_cover_official_layouts(filename, arch, registers):
    layout = json.loads((LAYOUTS / filename).read_text())
    model = DinoV2(arch, num_register_tokens=registers)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 3)))
    check_rules_against(layout, dinov2_rules(arch, registers), flat_paths(shapes))


def test_rules_cover_salad_layout_and_descriptor_size():
    layout = json.loads((LAYOUTS / "salad_dinov2_vitb14.json").read_text())
    backbone = DinoV2("vitb14", num_trainable_blocks=4, output="tokens")
    head = Salad(num_channels=768)

    def init(key, x):
        k1, k2 = jax.random.split(key)
        b = backbone.init(k1, x)
        a = head.init(k2, backbone.apply(b, x))
        return {"params": {"backbone": b["params"], "aggregator": a["params"]}}

    def descriptor(variables, x):
        p = variables["params"]
        return head.apply({"params": p["aggregator"]}, backbone.apply({"params": p["backbone"]}, x))

    x = jnp.zeros((1, 224, 224, 3))
    shapes = jax.eval_shape(init, jax.random.key(0), x)
    rules = dinov2_rules("vitb14", 0, prefix="backbone.model.", flax_prefix=("backbone",))
    rules += salad_rules("aggregator.", flax_prefix=("aggregator",))
    check_rules_against(layout, rules, flat_paths(shapes))
    assert jax.eval_shape(descriptor, shapes, x).shape == (1, 64 * 128 + 256)


def test_rules_round_trip_exactly():
    cfg = ViTConfig(embed_dim=16, depth=2, num_heads=2, ffn="swiglu")
    variables = random_variables(DinoV2(cfg, num_register_tokens=4), jnp.zeros((1, 28, 28, 3)))
    rules = dinov2_rules(cfg, 4, prefix="m.")
    state_dict = flax_to_torch(variables, rules)
    assert state_dict["m.blocks.0.mlp.w12.weight"].shape == (2 * cfg.ffn_hidden_dim, 16)
    assert state_dict["m.patch_embed.proj.weight"].shape == (16, 3, 14, 14)
    back = torch_to_flax(state_dict, rules)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, variables))


# ------------------------------------------------------------------ SALAD


class TorchSalad(torch.nn.Module):
    """Minimal SALAD from the paper's method description (Izquierdo & Civera, CVPR 2024), float64 Sinkhorn.

    Module names follow the checkpoint layout (token_features.0/2, cluster_features.0/3,
    score.0/3, dust_bin). Optimal transport is solved in the probability domain:
    K = exp(S_bar) with S_bar = [S; z 1^T]; a = [1..1, n-m]/(m+n), b = 1/(m+n);
    alternately u = a / (K v), v = b / (K^T u) from u = v = 1; P = (m+n) diag(u) K diag(v).
    """

    def __init__(self, channels: int, clusters: int, cluster_dim: int, token_dim: int):
        super().__init__()
        nn = torch.nn
        self.m, self.l = clusters, cluster_dim
        self.token_features = nn.Sequential(nn.Linear(channels, 512), nn.ReLU(), nn.Linear(512, token_dim))
        self.cluster_features = nn.Sequential(
            nn.Conv2d(channels, 512, 1), nn.Identity(), nn.ReLU(), nn.Conv2d(512, cluster_dim, 1)
        )
        self.score = nn.Sequential(nn.Conv2d(channels, 512, 1), nn.Identity(), nn.ReLU(), nn.Conv2d(512, clusters, 1))
        self.dust_bin = nn.Parameter(torch.tensor(1.0))

    def forward(self, fmap, cls, iters: int = 3):
        b, _, h, w = fmap.shape
        n, m = h * w, self.m
        f = self.cluster_features(fmap).reshape(b, self.l, n).double()
        s = self.score(fmap).reshape(b, m, n).double()
        s_bar = torch.cat([s, self.dust_bin.double().expand(b, 1, n)], dim=1)
        kernel = torch.exp(s_bar)
        a = torch.cat([torch.ones(m, dtype=torch.float64), torch.tensor([n - m], dtype=torch.float64)]) / (m + n)
        bb = torch.ones(n, dtype=torch.float64) / (m + n)
        u = torch.ones(b, m + 1, dtype=torch.float64)
        v = torch.ones(b, n, dtype=torch.float64)
        for _ in range(iters):
            u = a / torch.einsum("brn,bn->br", kernel, v)
            v = bb / torch.einsum("brn,br->bn", kernel, u)
        plan = (m + n) * u[:, :, None] * kernel * v[:, None, :]
        assign = plan[:, :m]  # drop the dustbin
        clusters = torch.einsum("bjn,bkn->bkj", assign, f)  # (B, l, m): V_jk stored at [k, j]
        clusters = clusters / clusters.norm(dim=1, keepdim=True)
        g = self.token_features(cls).double()
        desc = torch.cat([g / g.norm(dim=-1, keepdim=True), clusters.reshape(b, -1)], dim=-1)
        return desc / desc.norm(dim=-1, keepdim=True)


def test_salad_matches_paper_reference():
    torch.manual_seed(0)
    ref_model = TorchSalad(channels=24, clusters=8, cluster_dim=6, token_dim=10).eval()
    with torch.no_grad():  # sharpen the scores so the transport plan is far from uniform
        ref_model.score[3].weight.mul_(10.0)
        ref_model.score[3].bias.mul_(10.0)
        ref_model.dust_bin.fill_(0.37)
    rng = np.random.default_rng(0)
    fmap = rng.standard_normal((2, 5, 7, 24)).astype(np.float32)  # n = 35 features >= m = 8
    cls = rng.standard_normal((2, 24)).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(fmap).permute(0, 3, 1, 2), torch.from_numpy(cls)).numpy()

    state = {k: v.detach().numpy() for k, v in ref_model.state_dict().items()}
    params = torch_to_flax(state, salad_rules(prefix=""))
    head = Salad(num_channels=24, num_clusters=8, cluster_dim=6, token_dim=10)
    apply = jax.jit(head.apply)
    ours = np.asarray(apply(params, (jnp.asarray(fmap), jnp.asarray(cls))))
    assert ours.shape == (2, 8 * 6 + 10)
    assert rel_err(ours, ref) < 1e-4
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, rtol=1e-5)

    # The iteration count matters: one Sinkhorn iteration gives another descriptor.
    with torch.no_grad():
        one_iter = ref_model(torch.from_numpy(fmap).permute(0, 3, 1, 2), torch.from_numpy(cls), iters=1).numpy()
    assert rel_err(one_iter, ref) > 1e-3
    # The dustbin score is a constant row, which the first row update of Sinkhorn cancels:
    # the descriptor (and the gradient w.r.t. dust_bin) does not depend on it.
    params["params"]["dust_bin"] = jnp.asarray(2.0)
    assert rel_err(apply(params, (jnp.asarray(fmap), jnp.asarray(cls))), ref) < 1e-4
    grad = jax.jit(jax.grad(lambda p: apply(p, (jnp.asarray(fmap), jnp.asarray(cls)))[:, -1].sum()))(params)
    assert abs(float(grad["params"]["dust_bin"])) < 1e-5


def test_sinkhorn_marginals():
    """After a column update every feature's mass (clusters + dustbin) is one; with many
    iterations cluster rows carry mass 1 and the dustbin n - m (scaled by m + n)."""
    scores = jax.random.normal(jax.random.key(0), (2, 5, 12))
    solve = jax.jit(log_optimal_transport, static_argnames="iters")
    plan = jnp.exp(solve(scores, jnp.asarray(0.5), iters=3))
    np.testing.assert_allclose(plan.sum(axis=1), 1.0, rtol=1e-5)
    plan = jnp.exp(solve(scores, jnp.asarray(0.5), iters=200))
    np.testing.assert_allclose(plan.sum(axis=2), np.tile([1, 1, 1, 1, 1, 7.0], (2, 1)), rtol=1e-4)


def test_salad_dropout_and_errors():
    head = Salad(num_channels=8, num_clusters=4, cluster_dim=3, token_dim=5, dropout=0.5)
    feats = (jnp.ones((1, 3, 3, 8)), jnp.ones((1, 8)))
    variables = random_variables(head, feats)
    apply = jax.jit(head.apply, static_argnames="train")
    det = apply(variables, feats)
    assert jnp.allclose(det, apply(variables, feats, train=False))
    dropped = apply(variables, feats, train=True, rngs={"dropout": jax.random.key(1)})
    assert float(jnp.abs(dropped - det).max()) > 1e-4
    with pytest.raises(ValueError, match="at least as many local features"):
        jax.eval_shape(Salad(num_channels=8, num_clusters=16).init, jax.random.key(0), feats)
    with pytest.raises(ValueError, match="num_channels"):
        jax.eval_shape(Salad(num_channels=16).init, jax.random.key(0), feats)


# ------------------------------------------------------------------ freezing and input checks


def test_frozen_blocks_get_zero_gradients_and_mask_matches():
    cfg = ViTConfig(embed_dim=16, depth=3, num_heads=2)
    x = jnp.asarray(images(1, 28, 42, seed=6))
    variables = random_variables(DinoV2(cfg), x, seed=1)
    reference_tokens = jax.jit(DinoV2(cfg, output="tokens").apply)(variables, x)
    for n_train in (1, None, 0):
        model = DinoV2(cfg, num_trainable_blocks=n_train, output="tokens")

        def loss(params):
            patch_map, cls = model.apply({"params": params}, x)
            return jnp.sum(patch_map**2) + jnp.sum(jnp.sin(cls))

        grads = jax.jit(jax.grad(loss))(variables["params"])
        zero_grad = jax.tree.map(lambda g: not np.any(np.asarray(g)), grads)
        mask = dinov2_frozen_mask(variables, n_train)["params"]
        assert mask == zero_grad, n_train  # frozen exactly where no gradient arrives
        if n_train == 1:
            assert all(mask[f"blocks_{i}"]["attn"]["qkv"]["kernel"] for i in (0, 1))
            assert not mask["blocks_2"]["attn"]["qkv"]["kernel"]
            assert mask["patch_embed"]["proj"]["kernel"] and mask["pos_embed"] and mask["cls_token"]
            assert not mask["norm"]["scale"]
        # Freezing never changes the forward pass.
        np.testing.assert_array_equal(
            jax.jit(model.apply)(variables, x)[1], reference_tokens[1]
        )
    with pytest.raises(ValueError, match="num_trainable_blocks"):
        DinoV2(cfg, num_trainable_blocks=4).init(jax.random.key(0), x)


def test_input_checks_and_arch_names():
    with pytest.raises(ValueError, match="multiples of the patch size 14"):
        DinoV2(ViTConfig(16, 1, 2)).init(jax.random.key(0), jnp.zeros((1, 30, 28, 3)))
    assert resolve_arch("dinov2_vitg14") == resolve_arch("vitg14")
    assert resolve_arch("vitg14").ffn_hidden_dim == 4096
    with pytest.raises(ValueError, match="Unknown DINOv2 architecture"):
        resolve_arch("vith14")
