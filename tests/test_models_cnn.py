"""CNN backbones and heads against PyTorch references.

References (never the code under test):
* torchvision ``resnet18/50`` (``children()[:-2]``, and ``[:-3]`` for the conv4
  crop), ``vgg16().features[:-2]``, ``alexnet().features[:-2]`` with random weights
  and randomised BatchNorm affine parameters and running statistics;
* minimal PyTorch modules written here from the papers' equations, with the module
  names of the published checkpoint layouts (tests/fixtures/checkpoint_layouts):
  CosPlace's GeM head (Radenovic et al. eq. 3 + Linear + L2), NetVLAD
  (Arandjelovic et al. eq. 1-2, explicit residuals), MixVPR (Ali-bey et al. eq. 2),
  Conv-AP (``nn.AdaptiveAvgPool2d``).

Parity tolerance: 1e-4 relative to the magnitude of the reference output (float32).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
import torch.nn as tnn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from jaxvpr.convert.cnn import head_rules, resnet_rules, sequential_conv_rules  # noqa: E402
from jaxvpr.convert.rules import apply_rules, export_rules, torch_to_variables, variables_to_torch  # noqa: E402
from jaxvpr.models import (  # noqa: E402
    build_model,
    descriptor_dim,
    frozen_mask,
    list_models,
    model_config,
    variable_shapes,
)
from jaxvpr.models.alexnet import ALEXNET_CONV_INDICES, AlexNet  # noqa: E402
from jaxvpr.models.convap import ConvAP  # noqa: E402
from jaxvpr.models.gem import GeMHead  # noqa: E402
from jaxvpr.models.mixvpr import MixVPR  # noqa: E402
from jaxvpr.models.netvlad import NetVLAD, init_from_features, sample_local_descriptors  # noqa: E402
from jaxvpr.models.resnet import ResNet  # noqa: E402
from jaxvpr.models.vgg import VGG16, VGG16_CONV_INDICES  # noqa: E402

LAYOUTS = Path(__file__).parent / "fixtures" / "checkpoint_layouts"


# --------------------------------------------------------------------------- helpers


def randomise(module: tnn.Module, seed: int) -> tnn.Module:
    """Random BN affine params and running stats (weights keep torchvision's random init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, tnn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.num_batches_tracked.fill_(int(torch.randint(0, 1000, (1,), generator=gen)))
    return module


def numpy_state(module: tnn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def images(shape, seed=0) -> np.ndarray:
    """NCHW float32 test images."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def nhwc(x_nchw: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(np.transpose(x_nchw, (0, 2, 3, 1)))


def random_variables(cfg, image_size, seed=0):
    """Random variables of a model's shapes without compiling its initialiser (slow on CPU):
    params ~ N(0, 0.1^2), BN running var in [0.5, 1.5], counters 0."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name == "num_batches_tracked":
            return np.zeros((), s.dtype)
        if name == "var":
            return (0.5 + rng.random(s.shape)).astype(s.dtype)
        return (0.1 * rng.standard_normal(s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(fill, variable_shapes(cfg, image_size))


def jit_apply(model):
    """``model.apply`` compiled once (much faster than op-by-op execution on CPU)."""
    return jax.jit(model.apply, static_argnames=("train", "mutable", "return_features"))


def assert_close(actual, expected, rtol=1e-4):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected))), 1e-6)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def assert_state_close(actual: dict, expected: dict, rtol=1e-4):
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        if expected[name].dtype == np.int64:
            np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
        else:
            assert_close(actual[name], expected[name], rtol)


# --------------------------------------------------------------------------- torch references


class L2Norm(tnn.Module):
    def __init__(self, dim=1):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return F.normalize(x, p=2.0, dim=self.dim)


class GeM(tnn.Module):
    """Radenovic et al. eq. 3 with one learnable p."""

    def __init__(self, p=3.0, eps=1e-6):
        super().__init__()
        self.p = tnn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x):
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1), keepdim=True).pow(1.0 / self.p)


class Flatten(tnn.Module):
    def forward(self, x):
        return x.flatten(1)


def gem_head(channels, out_dim):
    """CosPlace aggregation: indices 1 (GeM) and 3 (Linear) as in the checkpoint layout."""
    return tnn.Sequential(L2Norm(), GeM(), Flatten(), tnn.Linear(channels, out_dim), L2Norm())


class TorchNetVLAD(tnn.Module):
    """Arandjelovic et al. eq. 1-2 with explicit residuals; VG benchmark names."""

    def __init__(self, clusters, dim):
        super().__init__()
        self.conv = tnn.Conv2d(dim, clusters, kernel_size=1, bias=False)
        self.centroids = tnn.Parameter(torch.rand(clusters, dim))

    def forward(self, x):
        x = F.normalize(x, dim=1)
        assign = F.softmax(self.conv(x).flatten(2), dim=1)  # N, K, HW
        residual = x.flatten(2)[:, None] - self.centroids[None, :, :, None]  # N, K, C, HW
        vlad = (residual * assign[:, :, None]).sum(-1)  # N, K, C
        vlad = F.normalize(vlad, dim=2).flatten(1)
        return F.normalize(vlad, dim=1)


class TorchMixer(tnn.Module):
    def __init__(self, dim, ratio):
        super().__init__()
        self.mix = tnn.Sequential(
            tnn.LayerNorm(dim), tnn.Linear(dim, int(dim * ratio)), tnn.ReLU(), tnn.Linear(int(dim * ratio), dim)
        )

    def forward(self, x):
        return x + self.mix(x)


class TorchMixVPR(tnn.Module):
    """Ali-bey et al. eq. 2: mixers over the flattened spatial axis, channel then row projection."""

    def __init__(self, channels, h, w, out_channels, depth, ratio, out_rows):
        super().__init__()
        self.mix = tnn.Sequential(*[TorchMixer(h * w, ratio) for _ in range(depth)])
        self.channel_proj = tnn.Linear(channels, out_channels)
        self.row_proj = tnn.Linear(h * w, out_rows)

    def forward(self, x):
        x = self.mix(x.flatten(2))  # B, C, HW
        x = self.channel_proj(x.permute(0, 2, 1)).permute(0, 2, 1)  # B, out, HW
        x = self.row_proj(x)  # B, out, rows
        return F.normalize(x.flatten(1), dim=-1)


class TorchConvAP(tnn.Module):
    def __init__(self, channels, out_channels, s1, s2):
        super().__init__()
        self.channel_pool = tnn.Conv2d(channels, out_channels, kernel_size=1)
        self.pool = tnn.AdaptiveAvgPool2d((s1, s2))

    def forward(self, x):
        return F.normalize(self.pool(self.channel_pool(x)).flatten(1), dim=1)


class TorchVPRNet(tnn.Module):
    """``backbone`` + ``aggregation``, the CosPlace / VG benchmark GeoLocalizationNet layout."""

    def __init__(self, backbone, aggregation):
        super().__init__()
        self.backbone = backbone
        self.aggregation = aggregation

    def forward(self, x):
        return self.aggregation(self.backbone(x))


def torchvision_trunk(name: str, crop_layer4: bool = False) -> tnn.Sequential:
    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None)
    return randomise(tnn.Sequential(*list(net.children())[: (-3 if crop_layer4 else -2)]), seed=1)


# --------------------------------------------------------------------------- backbones


@pytest.mark.parametrize(
    "name,depth,num_layers,train_dtype",
    [("resnet18", 18, 4, "float32"), ("resnet18", 18, 3, "float32"), ("resnet50", 50, 4, "float64")],
    ids=["resnet18", "resnet18conv4", "resnet50"],
)
def test_resnet_trunk_matches_torchvision_eval_and_train(name, depth, num_layers, train_dtype):
    """Eval mode in float32. Train mode normalises with statistics of tiny batches (2x2 maps
    at layer4), which amplifies float32 rounding to ~2e-4 over ResNet-50's 53 BNs; there the
    train-mode comparison runs in float64, where the two implementations agree to ~1e-12."""
    trunk = torchvision_trunk(name, crop_layer4=num_layers == 3)
    rules = resnet_rules(depth, num_layers, "", sequential=True, flax_root=())
    variables = apply_rules(numpy_state(trunk), rules)
    model = ResNet(depth=depth, num_layers=num_layers, trainable_stages=2)
    x = images((2, 3, 64, 64))

    trunk.eval()
    with torch.no_grad():
        expected = trunk(torch.from_numpy(x)).numpy()
    assert_close(np.transpose(jit_apply(model)(variables, nhwc(x)), (0, 3, 1, 2)), expected)

    # Train mode: batch statistics, and running stats updated with momentum 0.1 (unbiased var).
    with jax.enable_x64(train_dtype == "float64"):
        trunk = trunk.to(getattr(torch, train_dtype)).train()
        state = numpy_state(trunk)
        variables = jax.tree.map(jnp.asarray, apply_rules(state, rules))
        x = x.astype(train_dtype)
        with torch.no_grad():
            expected = trunk(torch.from_numpy(x)).numpy()
        out, updates = jit_apply(model)(variables, nhwc(x), train=True, mutable=("batch_stats",))
        assert out.dtype == train_dtype
        assert_close(np.transpose(out, (0, 3, 1, 2)), expected)
        new_state = export_rules({"params": variables["params"], **updates}, rules)
        assert_state_close(new_state, numpy_state(trunk))


def test_vgg16_trunk_matches_torchvision():
    torch.manual_seed(0)
    trunk = tnn.Sequential(*list(torchvision.models.vgg16(weights=None).features.children())[:-2]).eval()
    assert [i for i, m in enumerate(trunk) if isinstance(m, tnn.Conv2d)] == list(VGG16_CONV_INDICES)
    with torch.no_grad():  # torchvision zero-inits VGG biases; randomise them so they are tested
        for m in trunk:
            if isinstance(m, tnn.Conv2d):
                m.bias.normal_(0.0, 0.1)
    variables = apply_rules(numpy_state(trunk), sequential_conv_rules(VGG16_CONV_INDICES, "", flax_root=()))
    x = images((2, 3, 64, 64))
    with torch.no_grad():
        expected = trunk(torch.from_numpy(x)).numpy()
    out = jit_apply(VGG16())(variables, nhwc(x))
    assert_close(np.transpose(out, (0, 3, 1, 2)), expected)
    assert float(np.min(expected)) < 0  # features[:-2] ends before the last ReLU


def test_alexnet_trunk_matches_torchvision():
    torch.manual_seed(0)
    trunk = tnn.Sequential(*list(torchvision.models.alexnet(weights=None).features.children())[:-2]).eval()
    assert [i for i, m in enumerate(trunk) if isinstance(m, tnn.Conv2d)] == list(ALEXNET_CONV_INDICES)
    variables = apply_rules(numpy_state(trunk), sequential_conv_rules(ALEXNET_CONV_INDICES, "", flax_root=()))
    x = images((2, 3, 96, 96))
    with torch.no_grad():
        expected = trunk(torch.from_numpy(x)).numpy()
    out = jit_apply(AlexNet())(variables, nhwc(x))
    assert_close(np.transpose(out, (0, 3, 1, 2)), expected)


# --------------------------------------------------------------------------- heads


def _head_parity(torch_head, flax_head, cfg_like, feature_map_nchw):
    torch_head.eval()
    variables = apply_rules(numpy_state(torch_head), head_rules(cfg_like, "", flax_root=()))
    with torch.no_grad():
        expected = torch_head(torch.from_numpy(feature_map_nchw)).numpy()
    actual = jit_apply(flax_head)(variables, nhwc(feature_map_nchw))
    assert_close(actual, expected)
    np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, rtol=1e-5)
    return actual


def test_gem_head_matches_reference():
    torch.manual_seed(0)
    head = gem_head(32, 16)
    with torch.no_grad():
        head[1].p.fill_(2.5)  # a learned p, not the init value
    fmap = np.abs(images((3, 32, 5, 6)))
    _head_parity(head, GeMHead(fc_output_dim=16), model_config({"backbone": "resnet18", "head": "gem"}), fmap)


def test_netvlad_head_matches_reference():
    torch.manual_seed(0)
    head = TorchNetVLAD(clusters=8, dim=16)
    with torch.no_grad():
        head.conv.weight.mul_(10.0)  # sharper assignments than the default init
    cfg = model_config({"backbone": "resnet18conv4", "head": "netvlad", "num_clusters": 8})
    _head_parity(head, NetVLAD(num_clusters=8), cfg, images((2, 16, 4, 5)))


def test_mixvpr_head_matches_reference():
    torch.manual_seed(0)
    head = TorchMixVPR(channels=24, h=4, w=5, out_channels=12, depth=2, ratio=1, out_rows=3)
    cfg = model_config({"backbone": "resnet50conv4", "head": "mixvpr", "mix_depth": 2})
    flax_head = MixVPR(in_h=4, in_w=5, out_channels=12, mix_depth=2, mlp_ratio=1, out_rows=3)
    out = _head_parity(head, flax_head, cfg, images((2, 24, 4, 5)))
    assert out.shape == (2, 36)
    with pytest.raises(ValueError, match="4x5 feature maps"):
        flax_head.init(jax.random.key(0), jnp.zeros((1, 5, 5, 24)))


def test_convap_head_matches_reference_with_uneven_bins():
    torch.manual_seed(0)
    head = TorchConvAP(channels=16, out_channels=8, s1=2, s2=3)
    cfg = model_config({"backbone": "resnet50conv4", "head": "convap", "out_channels": 8, "s1": 2, "s2": 3})
    # 5x7 -> 2x3: overlapping PyTorch bins [0,3),[2,5) x [0,3),[2,5),[4,7)
    _head_parity(head, ConvAP(out_channels=8, s1=2, s2=3), cfg, images((2, 16, 5, 7)))


# --------------------------------------------------------------------------- whole models


def test_cosplace_model_matches_torch_and_exports_strictly():
    """Import a CosPlace-layout torch model, compare descriptors, export and load strict=True."""
    torch_model = TorchVPRNet(torchvision_trunk("resnet18"), gem_head(512, 512)).eval()
    layout = json.loads((LAYOUTS / "cosplace_resnet18_512.json").read_text())
    assert {k: list(v.shape) for k, v in torch_model.state_dict().items()} == layout

    cfg = model_config("cosplace_resnet18_512")
    variables = torch_to_variables(numpy_state(torch_model), cfg)
    model = build_model(cfg)
    apply = jit_apply(model)
    x = images((2, 3, 64, 64), seed=3)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x)).numpy()
        expected_features = torch_model.backbone(torch.from_numpy(x)).mean(dim=(2, 3)).numpy()
    descriptors, features = apply(variables, nhwc(x), return_features=True)
    assert_close(descriptors, expected)
    assert_close(features, expected_features)

    # Change the jax weights, export, load into a fresh torch model with strict=True.
    variables["params"]["head"]["p"] = variables["params"]["head"]["p"] + 0.5
    fresh = TorchVPRNet(torchvision_trunk("resnet18"), gem_head(512, 512)).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in variables_to_torch(variables, cfg).items()}, strict=True)
    with torch.no_grad():
        expected = fresh(torch.from_numpy(x)).numpy()
    assert_close(apply(variables, nhwc(x)), expected)


def test_netvlad_model_matches_torch_in_train_mode():
    """VG benchmark layout (resnet18conv4 + NetVLAD-64): train-mode descriptors and running stats."""
    torch_model = TorchVPRNet(torchvision_trunk("resnet18", crop_layer4=True), TorchNetVLAD(64, 256))
    layout = json.loads((LAYOUTS / "netvlad_resnet18conv4_64.json").read_text())
    assert {k: list(v.shape) for k, v in torch_model.state_dict().items()} == layout
    cfg = model_config("netvlad_resnet18conv4_64")
    variables = torch_to_variables(numpy_state(torch_model), cfg)
    x = images((2, 3, 64, 64), seed=4)
    torch_model.train()
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x)).numpy()
    out, updates = jit_apply(build_model(cfg))(variables, nhwc(x), train=True, mutable=("batch_stats",))
    assert_close(out, expected)
    assert_state_close(variables_to_torch({**variables, **updates}, cfg), numpy_state(torch_model))


def test_netvlad_init_from_features_recovers_clusters_and_alpha():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 16)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    maps = centres[rng.integers(0, 4, size=(8, 6, 6))] + 0.05 * rng.standard_normal((8, 6, 6, 16)).astype(np.float32)
    descriptors = sample_local_descriptors(maps, per_image=25, rng=rng)
    assert descriptors.shape == (200, 16)
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, rtol=1e-5)

    params = init_from_features(descriptors, num_clusters=4, seed=0)
    centroids, kernel = params["centroids"], params["conv"]["kernel"]
    assert centroids.shape == (4, 16) and kernel.shape == (1, 1, 16, 4)
    # k-means fixed point: each centroid is the mean of the descriptors nearest to it.
    nearest = np.argmin(((descriptors[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    for k in np.unique(nearest):
        np.testing.assert_allclose(centroids[k], descriptors[nearest == k].mean(0), atol=1e-4)
    unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    # alpha = -log(0.01) / mean(top1 - top2 dot gap), computed here by brute force.
    gaps = []
    for d in descriptors:
        dots = sorted((float(np.dot(u, d)) for u in unit), reverse=True)
        gaps.append(dots[0] - dots[1])
    alpha = -np.log(0.01) / np.mean(gaps)
    np.testing.assert_allclose(kernel[0, 0], alpha * unit.T, rtol=1e-4)


# --------------------------------------------------------------------------- freezing


def test_frozen_stages_get_no_gradient_but_bn_stats_still_update():
    # ResNet-18 up to layer3 (smaller graph to compile) training its last 2 stages, layer2+layer3.
    cfg = model_config({"backbone": "resnet18conv4", "head": "gem", "fc_output_dim": 8, "trainable_stages": 2})
    model = build_model(cfg)
    variables = random_variables(cfg, (64, 64))
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))

    def loss(params):
        out, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(out[:, :4]), updates

    grads, updates = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    mask = frozen_mask(cfg, variables["params"])
    frozen = {k for k, v in mask["backbone"].items() if all(jax.tree.leaves(v))}
    assert frozen == {"conv1", "bn1", "layer1_0", "layer1_1"}
    assert not any(jax.tree.leaves(mask["head"]))
    for name, g in grads["backbone"].items():
        norms = [float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(g)]
        if name in frozen:
            assert max(norms) == 0.0, name
        else:
            assert max(norms) > 0.0, name
    new_bn1 = updates["batch_stats"]["backbone"]["bn1"]
    old_bn1 = variables["batch_stats"]["backbone"]["bn1"]
    assert int(new_bn1["num_batches_tracked"]) == int(old_bn1["num_batches_tracked"]) + 1 == 1
    exported = variables_to_torch({"params": variables["params"], **updates}, cfg)
    assert exported["backbone.1.num_batches_tracked"].dtype == np.int64
    assert int(exported["backbone.1.num_batches_tracked"]) == 1
    assert not np.allclose(new_bn1["mean"], old_bn1["mean"])


def test_frozen_mask_of_the_named_models():
    cosplace = model_config("cosplace_resnet18_512")
    params = variable_shapes(cosplace, (64, 64))["params"]
    mask = frozen_mask(cosplace, params)
    trainable = {k for k, v in mask["backbone"].items() if not any(jax.tree.leaves(v))}
    assert trainable == {"layer3_0", "layer3_1", "layer4_0", "layer4_1"}  # CosPlace: layer3 + layer4

    vgg = model_config("cosplace_vgg16_512")
    params = variable_shapes(vgg, (32, 32))["params"]
    mask = frozen_mask(vgg, params)
    trainable = sorted(int(k.split("_")[1]) for k, v in mask["backbone"].items() if not any(jax.tree.leaves(v)))
    assert trainable == [24, 26, 28]  # CosPlace: all but the last 5 layers of features[:-2] frozen

    conv4 = model_config("netvlad_resnet18conv4_64")
    params = variable_shapes(conv4, (64, 64))["params"]
    mask = frozen_mask(conv4, params)
    assert {k for k, v in mask["backbone"].items() if not any(jax.tree.leaves(v))} == {"layer3_0", "layer3_1"}

    salad = model_config("salad_dinov2_vitb14")  # DINOv2: the last 4 blocks (+ final norm) train
    params = variable_shapes(salad, (126, 126))["params"]
    mask = frozen_mask(salad, params)
    blocks = {k for k, v in mask["backbone"].items() if k.startswith("blocks_") and not any(jax.tree.leaves(v))}
    assert blocks == {"blocks_8", "blocks_9", "blocks_10", "blocks_11"}
    assert not any(jax.tree.leaves(mask["head"]))

    everything = model_config("cosplace_resnet18_512", trainable_stages=None)
    params = variable_shapes(everything, (64, 64))["params"]
    assert not any(jax.tree.leaves(frozen_mask(everything, params)))


def test_batchnorm_init_matches_torch_defaults_and_does_not_count():
    from jaxvpr.models.layers import BatchNorm

    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 5))
    variables = BatchNorm().init(jax.random.key(1), x, train=True)
    reference = tnn.BatchNorm2d(5)
    stats = variables["batch_stats"]
    np.testing.assert_array_equal(stats["mean"], reference.running_mean.numpy())
    np.testing.assert_array_equal(stats["var"], reference.running_var.numpy())
    np.testing.assert_array_equal(variables["params"]["scale"], reference.weight.detach().numpy())
    np.testing.assert_array_equal(variables["params"]["bias"], reference.bias.detach().numpy())
    assert stats["num_batches_tracked"].dtype == jnp.int32 and int(stats["num_batches_tracked"]) == 0


# --------------------------------------------------------------------------- registry


def test_registry_names_configs_and_errors():
    names = list_models()
    for required in (
        "cosplace_resnet18_512", "cosplace_resnet50_2048", "cosplace_vgg16_512", "eigenplaces_resnet50_2048",
        "netvlad_resnet18conv4_64", "mixvpr_resnet50_4096", "dinov2_vits14", "dinov2_vitb14",
        "dinov2_vitb14_reg", "dinov2_vitl14", "dinov2_vitg14", "salad_dinov2_vitb14",
    ):
        assert required in names
    assert model_config("mixvpr_resnet50_4096").image_size == (320, 320)
    assert model_config("salad_dinov2_vitb14").image_size == (322, 322)
    assert descriptor_dim(model_config("mixvpr_resnet50_4096")) == 4096
    assert descriptor_dim(model_config("salad_dinov2_vitb14")) == 64 * 128 + 256
    assert descriptor_dim(model_config("netvlad_resnet18conv4_64")) == 64 * 256

    cfg = model_config("cosplace_resnet18_512", fc_output_dim=128)
    assert cfg.fc_output_dim == 128 and cfg.trainable_stages == 2
    free = model_config({"backbone": "resnet34", "head": "gem"})
    assert free.fc_output_dim == 512 and free.name == "resnet34_gem"
    switched = model_config("cosplace_resnet18_512", head="netvlad")
    assert "fc_output_dim" not in switched and switched.num_clusters == 64

    with pytest.raises(ValueError, match="valid keys: .*fc_output_dim"):
        model_config("cosplace_resnet18_512", num_clusters=3)
    with pytest.raises(ValueError, match="known models"):
        model_config("cosplace_resnet19")
    with pytest.raises(ValueError, match="valid backbones"):
        model_config({"backbone": "resnet19", "head": "gem"})
    with pytest.raises(ValueError, match="needs a DINOv2 backbone"):
        model_config({"backbone": "resnet18", "head": "salad"})
    with pytest.raises(ValueError, match=r"outside \[0, 4\]"):
        model_config("netvlad_resnet18conv4_64", trainable_stages=5)


def test_registry_wires_dinov2_backbones():
    """A bare ``dinov2_*`` model returns DinoV2's own class-token output; features pool the patches."""
    from jaxvpr.models.dinov2 import DinoV2

    cfg = model_config("dinov2_vits14")
    assert cfg.trainable_stages == 4
    model = build_model(cfg)
    variables = random_variables(cfg, (28, 42))
    x = jax.random.normal(jax.random.key(1), (2, 28, 42, 3))
    descriptors, features = jit_apply(model)(variables, x, return_features=True)
    backbone_vars = {"params": variables["params"]["backbone"]}
    patches, cls = jit_apply(DinoV2(arch="vits14", output="tokens"))(backbone_vars, x)
    assert patches.shape == (2, 2, 3, 384)
    np.testing.assert_allclose(descriptors, cls, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(features, patches.mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)


def test_descriptor_shapes_of_small_compositions():
    for cfg in (
        model_config({"backbone": "alexnet", "head": "netvlad", "num_clusters": 4}),
        model_config({"backbone": "resnet18conv4", "head": "convap", "out_channels": 8}),
        model_config({"backbone": "vgg16", "head": "gem", "fc_output_dim": 32}),
    ):
        model = build_model(cfg)
        shapes = jax.eval_shape(
            lambda k, c=cfg, m=model: m.init_with_output(k, jnp.zeros((2, 64, 64, 3)))[0], jax.random.key(0)
        )
        assert shapes.shape == (2, descriptor_dim(cfg)), cfg.name
