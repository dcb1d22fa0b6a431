"""AnyLoc-VLAD-DINOv2: facet extraction, hard-assignment VLAD, conversion, vocabulary command.

References (never the code under test):
* Hugging Face ``transformers`` ``Dinov2Model`` / ``Dinov2WithRegistersModel`` with random weights:
  its *separate* query/key/value Linears of block L, read with a forward hook (an independent check
  of the fused-qkv split), with the official 0.1-offset position-embedding resampling installed;
* VLAD written below in float64 numpy from the AnyLoc facts (``AnyLoc/DINO:utilities.py``
  ``VLAD.generate``: argmax cosine to normalised centres, residual to the centre as stored, loop
  over clusters, intra-L2, flatten cluster-major, global L2), and a 2-d case computed by hand;
* the hub DINOv2 layouts read off the official code (tests/fixtures/checkpoint_layouts).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvpr.convert.dinov2 import anyloc_rules, hf_dinov2_to_official
from jaxvpr.convert.rules import Rule, apply_rules, expected_torch_shapes
from jaxvpr.models import VPRModel, build_model, descriptor_dim, frozen_mask, model_config, variable_shapes
from jaxvpr.models.anyloc import AnyLocVLAD, local_descriptors
from jaxvpr.models.dinov2 import DinoV2, ViTConfig

torch = pytest.importorskip("torch")
F = torch.nn.functional

LAYOUTS = Path(__file__).parent / "fixtures" / "checkpoint_layouts"
DOMAINS = ("indoor", "urban", "aerial", "structured", "unstructured", "global")


def reference_vlad(descriptors: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """AnyLoc's VLAD of one image's raw patch descriptors (N, C) -> (K*C,), in float64."""
    x = np.asarray(descriptors, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = np.asarray(centres, np.float64)
    labels = np.argmax(x @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T, axis=1)
    vlad = np.zeros_like(c)
    for k in range(len(c)):
        for i in np.flatnonzero(labels == k):
            vlad[k] += x[i] - c[k]
        vlad[k] /= max(np.linalg.norm(vlad[k]), 1e-12)
    vlad = vlad.reshape(-1)
    return vlad / np.linalg.norm(vlad)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# ------------------------------------------------------------------ VLAD on a hand-computed case


def test_hard_vlad_hand_computed():
    """4 descriptors in 2-d, 3 centres of different norms (one never chosen).

    Unit descriptors x1=(1,0), x2=(0,1), x3=(.8,.6), x4=(.6,-.8), given to the head scaled by 2, 1,
    5, .5 (it normalises them). Centres c1=(.5,0), c2=(0,2), c3=(-1,0). Cosine assignment: x1, x3,
    x4 -> c1 (x3 would go to c2 by raw dot product, .4 < 1.2), x2 -> c2, c3 empty.
    V1 = (x1-c1)+(x3-c1)+(x4-c1) = (0.9, -0.2), V2 = x2-c2 = (0,-1), V3 = 0; intra-L2, then the
    whole vector over sqrt(2).
    """
    scales = np.array([2.0, 1.0, 5.0, 0.5])[:, None]
    unit = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, -0.8]])
    facet_map = (unit * scales).reshape(1, 2, 2, 2).astype(np.float32)
    centres = np.array([[0.5, 0.0], [0.0, 2.0], [-1.0, 0.0]], np.float32)
    head = AnyLocVLAD(num_clusters=3, num_channels=2)
    out = head.apply({"vocabulary": {"centers": centres}}, (jnp.asarray(facet_map), jnp.zeros((1, 2))))
    v1 = np.array([0.9, -0.2]) / math.sqrt(0.85)
    expected = np.concatenate([v1, [0.0, -1.0], [0.0, 0.0]]) / math.sqrt(2.0)
    np.testing.assert_allclose(np.asarray(out)[0], expected, atol=1e-6)
    np.testing.assert_allclose(reference_vlad(unit * scales, centres), expected, atol=1e-12)

    fresh = head.init(jax.random.key(0), (jnp.asarray(facet_map), jnp.zeros((1, 2))))
    assert set(fresh) == {"vocabulary"}  # no trainable parameters; placeholder centres are unit vectors
    np.testing.assert_allclose(np.linalg.norm(fresh["vocabulary"]["centers"], axis=1), 1.0, atol=1e-6)


# ------------------------------------------------------------------ parity with HF transformers


def _official_interpolation(self, embeddings, height, width):
    """The official DINOv2 ``interpolate_pos_encoding`` (0.1 offset, scale factors, no antialias)."""
    pos = self.position_embeddings
    side = int(math.sqrt(pos.shape[1] - 1))
    rows, cols = height // 14, width // 14
    if (rows, cols) == (side, side):
        return pos
    grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic",
                         align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)


def _hf_model(kind: str, hidden: int, layers: int, heads: int, seed: int, **config):
    transformers = pytest.importorskip("transformers")
    if kind == "registers":
        cfg_cls, model_cls = transformers.Dinov2WithRegistersConfig, transformers.Dinov2WithRegistersModel
    else:
        cfg_cls, model_cls = transformers.Dinov2Config, transformers.Dinov2Model
    cfg = cfg_cls(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=4,
                  image_size=37 * 14, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu",
                  attn_implementation="eager", **config)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2 and "embeddings" not in name:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight")):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("lambda1"):
                p.copy_(0.5 + 0.3 * noise)
            else:
                p.copy_(0.5 * noise)
    if kind != "registers":
        model.embeddings.interpolate_pos_encoding = _official_interpolation.__get__(model.embeddings)
    return model


def _hf_facets(model, layer: int, images: np.ndarray, skip: int) -> dict[str, np.ndarray]:
    """Outputs (B, patches, C) of block ``layer``'s separate q/k/v Linears and of the block itself
    (``token``), the first ``skip`` tokens (class, registers) dropped."""
    block = model.encoder.layer[layer]
    names = {"query": ("q_proj", "query"), "key": ("k_proj", "key"), "value": ("v_proj", "value")}
    modules = {f: getattr(block.attention, new, None) or getattr(block.attention.attention, old)
               for f, (new, old) in names.items()}
    modules["token"] = block
    captured, hooks = {}, []
    for facet, module in modules.items():
        def keep(m, i, o, f=facet):
            captured[f] = (o[0] if isinstance(o, tuple) else o).detach()

        hooks.append(module.register_forward_hook(keep))
    with torch.no_grad():
        model(torch.from_numpy(images).permute(0, 3, 1, 2))
    for hook in hooks:
        hook.remove()
    return {f: v[:, skip:].numpy() for f, v in captured.items()}


@pytest.mark.parametrize("kind, registers, layer, config, other_facet", [
    ("plain", 0, 2, {"use_swiglu_ffn": True}, "query"),  # ViT-G style SwiGLU FFN in the blocks before `layer`
    ("registers", 4, 1, {"num_register_tokens": 4}, "token"),  # the block's output
])
def test_descriptor_matches_hf_reference(kind, registers, layer, config, other_facet):
    """The whole descriptor (value facet + VLAD) and the local descriptors of another facet."""
    model = _hf_model(kind, hidden=64, layers=layer + 2, heads=4, seed=layer, **config)
    images = np.random.default_rng(layer).standard_normal((2, 56, 70, 3)).astype(np.float32)  # 4x5 patches
    facets = _hf_facets(model, layer, images, skip=1 + registers)

    official = hf_dinov2_to_official({k: v.detach().numpy() for k, v in model.state_dict().items()})
    ffn = "swiglu" if config.get("use_swiglu_ffn") else "mlp"
    arch = ViTConfig(embed_dim=64, depth=layer + 2, num_heads=4, ffn=ffn)
    rng = np.random.default_rng(10 + layer)
    unit = facets["value"].reshape(-1, 64) / np.linalg.norm(facets["value"].reshape(-1, 64), axis=1, keepdims=True)
    centres = 0.7 * unit[rng.choice(len(unit), 6, replace=False)] + 0.05 * rng.standard_normal((6, 64))
    official["c_centers"] = centres.astype(np.float32)
    for facet in ("value", other_facet):
        rules = [Rule(*r) for r in anyloc_rules(arch, registers, layer, facet)]
        variables = apply_rules(official, rules)  # the later blocks and the final norm are not read
        net = VPRModel(DinoV2(arch, num_register_tokens=registers, output="tokens", facet=facet, facet_layer=layer),
                       AnyLocVLAD(num_clusters=6, num_channels=64), backbone_output="tokens")
        local = jax.jit(lambda v, x: net.apply(v, x, method=local_descriptors))(variables, jnp.asarray(images))
        ref = facets[facet] / np.linalg.norm(facets[facet], axis=-1, keepdims=True)
        assert rel_err(local, ref) < 1e-4, facet
        if facet == "value":
            ours = jax.jit(net.apply)(variables, jnp.asarray(images))

    refs = np.stack([reference_vlad(f, centres) for f in facets["value"]])
    similarity = unit @ (centres / np.linalg.norm(centres, axis=1, keepdims=True)).T
    cosines = np.sort(similarity, axis=1)
    assert (cosines[:, -1] - cosines[:, -2]).min() > 1e-3, "a near-tie would make the check fragile"
    assert len(np.unique(np.argmax(similarity, axis=1))) > 2, "the case should use several clusters"
    assert ours.shape == (2, 6 * 64)
    assert rel_err(ours, refs) < 1e-4


# ------------------------------------------------------------------ registry and model structure


def test_registry_entries_and_vitg_layout():
    for domain in DOMAINS:
        cfg = model_config(f"anyloc_dinov2_vitg14_{domain}")
        assert (cfg.backbone, cfg.head, cfg.layer, cfg.facet, cfg.num_clusters) == (
            "dinov2_vitg14", "anyloc", 31, "value", 32)
        assert cfg.trainable_stages == 0 and descriptor_dim(cfg) == 32 * 1536 == 49152

    layout = json.loads((LAYOUTS / "dinov2_vitg14.json").read_text())
    expected = expected_torch_shapes("anyloc_dinov2_vitg14_indoor")
    assert expected.pop("c_centers") == (32, 1536)
    for name, shape in expected.items():
        assert tuple(layout[name]) == shape, name
    assert expected["blocks.30.mlp.w12.weight"] == (8192, 1536)  # SwiGLU hidden 4096
    assert expected["blocks.31.attn.qkv.weight"] == (3 * 1536, 1536)
    unused = set(layout) - set(expected)
    in_31 = {n for n in unused if n.startswith("blocks.31.")}
    assert {n.split(".", 2)[2] for n in in_31} == {
        "attn.proj.weight", "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias",
        "mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias", "ls2.gamma"}
    later = unused - in_31 - {"norm.weight", "norm.bias"}
    assert {int(n.split(".")[1]) for n in later} == set(range(32, 40))


def test_small_composition_structure_and_errors():
    cfg = model_config({"backbone": "dinov2_vits14", "head": "anyloc", "layer": 3, "num_clusters": 8})
    assert cfg.trainable_stages == 0 and descriptor_dim(cfg) == 8 * 384
    model = build_model("anyloc_dinov2_vits14_l3")
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 56, 70, 3)))
    backbone = shapes["params"]["backbone"]
    assert sorted(k for k in backbone if k.startswith("blocks_")) == [f"blocks_{i}" for i in range(4)]
    assert "norm" not in backbone and set(backbone["blocks_3"]) == {"norm1", "attn"}
    assert set(backbone["blocks_3"]["attn"]) == {"qkv"}
    assert "head" not in shapes["params"] and shapes["vocabulary"]["head"]["centers"].shape == (8, 384)
    assert all(jax.tree.leaves(frozen_mask("anyloc_dinov2_vits14_l3", shapes["params"])))  # nothing trains

    with pytest.raises(ValueError, match="multiples of the patch size 14"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 57, 70, 3)))
    with pytest.raises(ValueError, match=r"layer=40 must be a block index in \[0, 39\]"):
        model_config("anyloc_dinov2_vitg14_indoor", layer=40)
    with pytest.raises(ValueError, match="facet='keys' must be one of"):
        model_config("anyloc_dinov2_vitg14_indoor", facet="keys")
    with pytest.raises(ValueError, match="needs a DINOv2 backbone"):
        model_config({"backbone": "resnet18", "head": "anyloc"})
    with pytest.raises(ValueError, match=r"trainable_stages=5 is outside \[0, 4\]"):
        model_config("anyloc_dinov2_vits14_l3", trainable_stages=5)


# ------------------------------------------------------------------ conversion


def _hub_state_dict(layout_file: str, seed: int = 0) -> dict[str, np.ndarray]:
    layout = json.loads((LAYOUTS / layout_file).read_text())
    rng = np.random.default_rng(seed)
    return {name: (0.02 * rng.standard_normal(shape)).astype(np.float32) for name, shape in layout.items()}


def test_from_torch_hub_layout_with_later_blocks(tmp_path, capsys):
    from jaxvpr.anyloc import main as anyloc_main
    from jaxvpr.checkpoint import load_model
    from jaxvpr.convert.__main__ import main as convert_main
    from jaxvpr.convert.io import read_state_dict

    hub = _hub_state_dict("dinov2_vits14.json")  # 12 blocks of 14 tensors; the model runs 0..3
    torch.save({k: torch.from_numpy(v) for k, v in hub.items()}, tmp_path / "dinov2_vits14_pretrain.pth")
    centres = np.random.default_rng(1).standard_normal((8, 384)).astype(np.float32)
    torch.save(torch.from_numpy(centres), tmp_path / "centres.pt")  # a bare tensor, as AnyLoc's release

    weights = str(tmp_path / "dinov2_vits14_pretrain.pth")
    args = ["from-torch", "--model", "anyloc_dinov2_vits14_l3", "--weights", weights]
    assert convert_main(args + ["--out", str(tmp_path / "no_vocab")]) == 1
    assert "needs its vocabulary: pass --vocabulary" in capsys.readouterr().err

    assert convert_main(args + ["--vocabulary", str(tmp_path / "centres.pt"), "--out", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    # 8 later blocks x 14 + block 3 but for norm1 and attn.qkv (10) + the final norm (2)
    assert "ignored 124 tensors the model does not run: blocks.4-11.*, blocks.3.attn.proj.weight" in out
    assert out.split("\n")[0].endswith("blocks.3.ls2.gamma, norm.weight, norm.bias")

    cfg, variables = load_model(tmp_path / "ckpt")
    assert cfg.name == "anyloc_dinov2_vits14_l3"
    np.testing.assert_array_equal(variables["vocabulary"]["head"]["centers"], centres)
    qkv = variables["params"]["backbone"]["blocks_3"]["attn"]["qkv"]["kernel"]
    np.testing.assert_array_equal(qkv, hub["blocks.3.attn.qkv.weight"].T)

    assert convert_main(["to-torch", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back.pth")]) == 0
    back = read_state_dict(tmp_path / "back.pth")
    used = [n for n in hub if not n.startswith("norm.") and (
        int(n.split(".")[1]) < 3 if n.startswith("blocks.") else True)]
    used += ["blocks.3.norm1.weight", "blocks.3.norm1.bias", "blocks.3.attn.qkv.weight", "blocks.3.attn.qkv.bias"]
    assert sorted(back) == sorted(used + ["c_centers"])
    for name in used:
        np.testing.assert_array_equal(back[name], hub[name])
    np.testing.assert_array_equal(back["c_centers"], centres)

    # The written file converts back without --vocabulary; stray tensors are still errors.
    assert convert_main(["from-torch", "--model", "anyloc_dinov2_vits14_l3", "--weights", str(tmp_path / "back.pth"),
                         "--out", str(tmp_path / "again")]) == 0
    torch.save({**{k: torch.from_numpy(v) for k, v in hub.items()}, "head.fc.weight": torch.zeros(2, 2)},
               tmp_path / "stray.pth")
    assert convert_main(["from-torch", "--model", "anyloc_dinov2_vits14_l3", "--weights", str(tmp_path / "stray.pth"),
                         "--vocabulary", str(tmp_path / "centres.pt"), "--out", str(tmp_path / "stray")]) == 1
    assert "1 unexpected" in capsys.readouterr().err

    # set-vocabulary: .npy centres into a copy; a wrong shape is refused with the expected one.
    np.save(tmp_path / "other.npy", -centres)
    assert anyloc_main(["set-vocabulary", "--checkpoint", str(tmp_path / "ckpt"), "--vocabulary",
                        str(tmp_path / "other.npy"), "--out", str(tmp_path / "other")]) == 0
    np.testing.assert_array_equal(load_model(tmp_path / "other")[1]["vocabulary"]["head"]["centers"], -centres)
    np.save(tmp_path / "wrong.npy", centres[:4])
    assert anyloc_main(["set-vocabulary", "--checkpoint", str(tmp_path / "ckpt"), "--vocabulary",
                        str(tmp_path / "wrong.npy"), "--out", str(tmp_path / "wrong")]) == 1
    assert "expects (8, 384)" in capsys.readouterr().err


# ------------------------------------------------------------------ vocabulary


def test_fit_vocabulary_recovers_separated_clusters():
    from jaxvpr.anyloc import fit_vocabulary

    rng = np.random.default_rng(0)
    directions = rng.standard_normal((4, 32))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    truth = np.repeat(np.arange(4), 150)
    points = directions[truth] + 0.1 * rng.standard_normal((len(truth), 32))
    points *= rng.uniform(0.5, 3.0, (len(points), 1))  # norms do not matter: cosine k-means
    # Lloyd iterations from 4 random points often start two centres in one cluster (a local
    # optimum in about half of the seeds); the best of 5 runs finds the 4 clusters.
    centres = fit_vocabulary(points.astype(np.float32), 4, seed=0, niter=20, nredo=5)
    assert centres.shape == (4, 32) and centres.dtype == np.float32

    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    found = np.argmax(unit @ (centres / np.linalg.norm(centres, axis=1, keepdims=True)).T, axis=1)
    mapping = {t: set(found[truth == t]) for t in range(4)}
    assert all(len(m) == 1 for m in mapping.values()) and len(set.union(*mapping.values())) == 4
    for t in range(4):  # each centre is the plain mean of its unit members (AnyLoc's form, norm < 1)
        k = mapping[t].pop()
        np.testing.assert_allclose(centres[k], unit[truth == t].mean(axis=0), atol=1e-5)
        assert 0.8 < np.linalg.norm(centres[k]) < 1.0  # noise of norm ~0.57 around unit directions
    np.testing.assert_array_equal(fit_vocabulary(points.astype(np.float32), 4, seed=0, niter=20, nredo=5), centres)
    with pytest.raises(ValueError, match="3 descriptors cannot make 4 clusters"):
        fit_vocabulary(points[:3], 4)


def test_vocabulary_command_on_images(tmp_path, capsys):
    from PIL import Image

    from jaxvpr.anyloc import main as anyloc_main
    from jaxvpr.checkpoint import load_model, save_model

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (60, 75, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    # Random weights written as a checkpoint (compiling the model's init would take longer than the test).
    cfg = model_config("anyloc_dinov2_vits14_l3")
    random = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), variable_shapes(cfg))
    save_model(tmp_path / "random", cfg, random)

    assert anyloc_main(["vocabulary", "--checkpoint", str(tmp_path / "random"), "--images", str(folder),
                        "--resize", "none", "--max-descriptors", "45", "--niter", "5", "--quiet",
                        "--out", str(tmp_path / "centres.npy"), "--out-checkpoint", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "3 images, 45 patch descriptors (384-d) -> 8 centres" in out  # 60x75 -> 56x70 crop: 20 patches, 15 kept
    centres = np.load(tmp_path / "centres.npy")
    assert centres.shape == (8, 384) and (np.linalg.norm(centres, axis=1) <= 1 + 1e-6).all()

    cfg, variables = load_model(tmp_path / "ckpt")
    np.testing.assert_array_equal(variables["vocabulary"]["head"]["centers"], centres)
    np.testing.assert_array_equal(variables["params"]["backbone"]["blocks_3"]["attn"]["qkv"]["kernel"],
                                  random["params"]["backbone"]["blocks_3"]["attn"]["qkv"]["kernel"])
    descriptors = jax.jit(build_model(cfg).apply)(variables, jnp.zeros((1, 56, 70, 3)))
    assert descriptors.shape == (1, 8 * 384)
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, atol=1e-5)

    assert anyloc_main(["vocabulary", "--checkpoint", str(tmp_path / "random"), "--images", str(folder),
                        "--num-clusters", "4", "--out", str(tmp_path / "c4.npy"),
                        "--out-checkpoint", str(tmp_path / "c4")]) == 1
    assert "--num-clusters 4 differs from model 'anyloc_dinov2_vits14_l3''s 8" in capsys.readouterr().err
