"""PyTorch <-> jaxvpr conversion: layouts, bit-exact round trips, error reports, file formats.

References: the published checkpoints' layouts (tests/fixtures/checkpoint_layouts,
read off the anchors' own model code) and torchvision's ResNet-101/152 state dicts.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from jaxvpr.convert import (  # noqa: E402
    CheckpointFormatError,
    CheckpointMismatchError,
    expected_torch_shapes,
    read_state_dict,
    torch_rules,
    torch_to_variables,
    variables_to_torch,
    write_state_dict,
)
from jaxvpr.models import build_model, model_config, variable_shapes  # noqa: E402

LAYOUTS = Path(__file__).parent / "fixtures" / "checkpoint_layouts"

# named model -> layout file (EigenPlaces publishes CosPlace's layout)
NAMED_LAYOUTS = {
    "cosplace_resnet18_512": "cosplace_resnet18_512",
    "cosplace_resnet50_2048": "cosplace_resnet50_2048",
    "eigenplaces_resnet50_2048": "cosplace_resnet50_2048",
    "cosplace_vgg16_512": "cosplace_vgg16_512",
    "netvlad_resnet18conv4_64": "netvlad_resnet18conv4_64",
    "mixvpr_resnet50_4096": "mixvpr_resnet50_4096",
    "dinov2_vits14": "dinov2_vits14",
    "dinov2_vitb14": "dinov2_vitb14",
    "dinov2_vitb14_reg": "dinov2_vitb14_reg",
    "dinov2_vitl14": "dinov2_vitl14",
    "dinov2_vitg14": "dinov2_vitg14",
    "salad_dinov2_vitb14": "salad_dinov2_vitb14",
}
CNN_MODELS = [n for n in NAMED_LAYOUTS if not n.startswith(("dinov2", "salad"))]


def layout(name: str) -> dict[str, list[int]]:
    return json.loads((LAYOUTS / f"{NAMED_LAYOUTS[name]}.json").read_text())


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors, and int64 scalars for ``num_batches_tracked``."""
    rng = np.random.default_rng(seed)
    return {
        name: np.asarray(rng.integers(0, 10**6), np.int64)
        if name.endswith("num_batches_tracked")
        else rng.standard_normal(shape).astype(np.float32)
        for name, shape in shapes.items()
    }


def random_variables(cfg, seed: int = 0):
    """Variables with the model's shapes/dtypes filled with random values (no forward pass)."""
    leaves, treedef = jax.tree.flatten(variable_shapes(cfg))
    rng = np.random.default_rng(seed)
    filled = [
        np.asarray(rng.integers(0, 1000), leaf.dtype) if leaf.dtype == jnp.int32
        else rng.standard_normal(leaf.shape).astype(leaf.dtype)
        for leaf in leaves
    ]
    return jax.tree.unflatten(treedef, filled)


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("name", list(NAMED_LAYOUTS))
def test_rules_cover_exactly_the_published_layout(name):
    expected = {k: tuple(v) for k, v in layout(name).items()}
    assert expected_torch_shapes(name) == expected
    assert [r.torch_name for r in torch_rules(name)] == list(expected)  # same order as the anchor


@pytest.mark.parametrize("name", CNN_MODELS)
def test_exported_state_dict_has_every_tensor_with_torch_dtypes(name):
    state = variables_to_torch(random_variables(model_config(name)), name)
    assert {k: list(v.shape) for k, v in state.items()} == layout(name)
    for key, value in state.items():
        assert value.dtype == (np.int64 if key.endswith("num_batches_tracked") else np.float32), key


@pytest.mark.parametrize("depth", [101, 152])
def test_deep_resnets_match_torchvision_layout(depth):
    trunk = torch.nn.Sequential(*list(getattr(torchvision.models, f"resnet{depth}")(weights=None).children())[:-2])
    expected = {f"backbone.{k}": tuple(v.shape) for k, v in trunk.state_dict().items()}
    expected.update({"aggregation.1.p": (1,), "aggregation.3.weight": (2048, 2048), "aggregation.3.bias": (2048,)})
    cfg = model_config({"backbone": f"resnet{depth}", "head": "gem", "fc_output_dim": 2048})
    assert expected_torch_shapes(cfg) == expected


def test_resnet101_tiny_forward_matches_torchvision():
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(*list(torchvision.models.resnet101(weights=None).children())[:-2]).eval()
    cfg = model_config({"backbone": "resnet101", "head": "gem", "fc_output_dim": 16})
    state = {f"backbone.{k}": v.numpy() for k, v in trunk.state_dict().items()}
    rng = np.random.default_rng(0)
    state.update({
        "aggregation.1.p": np.array([3.0], np.float32),
        "aggregation.3.weight": rng.standard_normal((16, 2048)).astype(np.float32),
        "aggregation.3.bias": np.zeros(16, np.float32),
    })
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = trunk(torch.from_numpy(x)).mean(dim=(2, 3)).numpy()
    model = build_model(cfg)
    # Eager (op-by-op) execution: the 30 repeated blocks reuse compiled ops, cheaper than one jit.
    _, features = model.apply(torch_to_variables(state, cfg), jnp.asarray(x.transpose(0, 2, 3, 1)), return_features=True)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", CNN_MODELS + ["salad_dinov2_vitb14"])
def test_torch_jax_torch_round_trip_is_bit_exact(name):
    original = random_state_dict(expected_torch_shapes(name), seed=1)
    variables = torch_to_variables(original, name)
    if "batch_stats" in variables:
        counters = [x for p, x in jax.tree_util.tree_leaves_with_path(variables["batch_stats"])
                    if p[-1].key == "num_batches_tracked"]
        assert counters and all(c.dtype == np.int32 and c.shape == () for c in counters)
    back = variables_to_torch(variables, name)
    assert list(back) == list(original)
    for key in original:
        assert back[key].dtype == original[key].dtype, key
        assert back[key].shape == original[key].shape, key
        assert back[key].tobytes() == original[key].tobytes(), key


def test_transforms_put_torch_axes_where_flax_expects_them():
    shapes = expected_torch_shapes("cosplace_resnet18_512")
    state = random_state_dict(shapes)
    variables = torch_to_variables(state, "cosplace_resnet18_512")
    conv = variables["params"]["backbone"]["conv1"]["kernel"]  # torch OIHW (64,3,7,7) -> HWIO
    np.testing.assert_array_equal(conv[2, 5, 1, 7], state["backbone.0.weight"][7, 1, 2, 5])
    fc = variables["params"]["head"]["fc"]["kernel"]  # torch (out, in) -> (in, out)
    np.testing.assert_array_equal(fc[3, 11], state["aggregation.3.weight"][11, 3])
    bn = variables["batch_stats"]["backbone"]["layer2_0"]["downsample_bn"]
    np.testing.assert_array_equal(bn["var"], state["backbone.5.0.downsample.1.running_var"])


# --------------------------------------------------------------------------- error reports


def test_mismatches_are_reported_together():
    state = random_state_dict(expected_torch_shapes("cosplace_resnet18_512"))
    del state["backbone.4.0.conv1.weight"]
    state["aggregation.3.weight"] = np.zeros((256, 512), np.float32)
    state["classifier.weight"] = np.zeros((10, 512), np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        torch_to_variables(state, "cosplace_resnet18_512")
    message = str(info.value)
    assert "backbone.4.0.conv1.weight (expected shape [64, 64, 3, 3])" in message
    assert "aggregation.3.weight: checkpoint has [256, 512], model expects [512, 512]" in message
    assert "classifier.weight" in message and "1 unexpected" in message
    # non-strict ignores only the unexpected tensor
    with pytest.raises(CheckpointMismatchError, match="1 missing") as info:
        torch_to_variables(state, "cosplace_resnet18_512", strict=False)
    assert "classifier.weight" not in str(info.value)

    # The wrong model for a checkpoint: every difference is named.
    with pytest.raises(CheckpointMismatchError, match="fc_output_dim"):
        torch_to_variables(random_state_dict(expected_torch_shapes("cosplace_resnet18_512")), "cosplace_resnet50_2048")


def test_export_reports_missing_and_misshaped_variables():
    cfg = model_config("netvlad_resnet18conv4_64")
    variables = random_variables(cfg)
    del variables["params"]["head"]["centroids"]
    variables["params"]["head"]["conv"]["kernel"] = np.zeros((1, 1, 256, 32), np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        variables_to_torch(variables, cfg)
    assert "params/head/centroids" in str(info.value)
    assert "params/head/conv/kernel: variables have [1, 1, 256, 32]" in str(info.value)


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_write_then_read_is_bit_exact(tmp_path, suffix):
    original = random_state_dict(expected_torch_shapes("netvlad_resnet18conv4_64"))
    path = tmp_path / f"model{suffix}"
    write_state_dict(original, path)
    loaded = read_state_dict(path)
    assert sorted(loaded) == sorted(original)  # (safetensors does not keep the insertion order)
    for key in original:
        assert loaded[key].dtype == original[key].dtype and loaded[key].tobytes() == original[key].tobytes()
    torch_to_variables(loaded, "netvlad_resnet18conv4_64")


def test_read_unwraps_lightning_and_training_checkpoints_and_dataparallel(tmp_path):
    tensors = {"backbone.0.weight": torch.randn(4, 3, 1, 1), "backbone.1.num_batches_tracked": torch.tensor(7)}
    torch.save({"epoch": 3, "global_step": 10, "state_dict": tensors, "hyper_parameters": {"lr": 1e-5}},
               tmp_path / "lightning.ckpt")
    torch.save({"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in tensors.items()}}, tmp_path / "run.pth")
    for name in ("lightning.ckpt", "run.pth"):
        loaded = read_state_dict(tmp_path / name)
        assert sorted(loaded) == sorted(tensors)
        np.testing.assert_array_equal(loaded["backbone.0.weight"], tensors["backbone.0.weight"].numpy())
        assert loaded["backbone.1.num_batches_tracked"].dtype == np.int64


class _Arbitrary:
    """Stands for a pickled object that loading must never execute."""


def test_read_refuses_arbitrary_pickles_and_unknown_files(tmp_path):
    path = tmp_path / "whole_model.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Arbitrary()}, f, protocol=2)
    with pytest.raises(CheckpointFormatError, match="never unpickles"):
        read_state_dict(path)
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointFormatError, match="unknown checkpoint suffix"):
        read_state_dict(tmp_path / "weights.npz")
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "absent.pth")
    torch.save({"epoch": 1}, tmp_path / "no_weights.pth")
    with pytest.raises(CheckpointFormatError, match="no state dict"):
        read_state_dict(tmp_path / "no_weights.pth")
