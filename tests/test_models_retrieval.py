"""The retrieval baselines of the indoor benchmark against PyTorch references: SFRS / NetVLAD-VGG16
(OpenIBL) and AP-GeM (dirtorch), plus the registry entries the thesis tables list.

References (never the code under test), written here from the papers and the anchors' layouts:

* OpenIBL's ``EmbedNet`` / ``EmbedNetPCA`` (SFRS, Ge et al. ECCV 2020): torchvision
  ``vgg16().features[:-2]`` as ``base_model.base``, NetVLAD (Arandjelovic et al. eq. 1-2, explicit
  residuals) as ``net_vlad`` returning the raw (N, K, C) sums, then intra-L2, flatten, L2, the 1x1
  conv ``pca_layer`` and L2; inputs normalised with OpenIBL's
  ``Normalize(mean=[0.48502, 0.45796, 0.40760], std=[1/255]*3)``;
* dirtorch's ``ResNet_RMAC`` (``resnet101_rmac``, AP-GeM, Revaud et al. ICCV 2019): torchvision
  ResNet-101 modules under their own names, GeM (Radenovic et al. eq. 3, ``adpool.p``) without L2
  before it, ``fc``, L2; then the whitening in numpy as scikit-learn's ``PCA.transform`` with
  ``whiten=True`` computes it, with dirtorch's exponent 0.25, and L2.

Random weights, randomised BatchNorm statistics, 64x64 images; tolerance 1e-4 relative to the
largest reference value (float32). Layouts: tests/fixtures/checkpoint_layouts/{sfrs_vgg16_4096,
apgem_resnet101_2048}.json, read off the anchors' model code (OpenIBL ``ibl/models/netvlad.py``,
``vgg.py``; dirtorch ``nets/rmac_resnet.py``, ``nets/backbones/resnet.py``).
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
from test_models_cnn import assert_close, jit_apply, nhwc, numpy_state, randomise  # noqa: E402

from jaxvpr.checkpoint import load_model, read_meta, save_model  # noqa: E402
from jaxvpr.convert import expected_torch_shapes, torch_rules, torch_to_variables, variables_to_torch  # noqa: E402
from jaxvpr.convert.__main__ import main as convert  # noqa: E402
from jaxvpr.models import build_model, descriptor_dim, frozen_mask, list_models, model_config  # noqa: E402

LAYOUTS = Path(__file__).parent / "fixtures" / "checkpoint_layouts"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPENIBL_MEAN = (0.48502, 0.45796, 0.40760)  # OpenIBL README / hubconf users; std 1/255


def layout(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((LAYOUTS / f"{name}.json").read_text()).items()}


def rgb_images(batch: int, size: int, seed: int) -> np.ndarray:
    """NCHW RGB in [0, 1], as ``ToTensor`` gives."""
    return np.random.default_rng(seed).random((batch, 3, size, size), dtype=np.float32)


def imagenet_nchw(rgb: np.ndarray) -> np.ndarray:
    """``Normalize(IMAGENET_MEAN, IMAGENET_STD)``: what jaxvpr models (channels last) and dirtorch take."""
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    return (rgb - mean[:, None, None]) / std[:, None, None]


# --------------------------------------------------------------------------- OpenIBL (SFRS)


class OpenIBLNetVLAD(tnn.Module):
    """OpenIBL's NetVLAD: L2 over channels, softmax of a 1x1 conv, sum_i a_k(i) (x_i - c_k) -> (N, K, C)."""

    def __init__(self, num_clusters: int, dim: int):
        super().__init__()
        self.conv = tnn.Conv2d(dim, num_clusters, kernel_size=1, bias=False)
        self.centroids = tnn.Parameter(torch.rand(num_clusters, dim))

    def forward(self, x):
        x = F.normalize(x, dim=1)
        assign = F.softmax(self.conv(x).flatten(2), dim=1)  # N, K, HW
        residuals = x.flatten(2)[:, None] - self.centroids[None, :, :, None]  # N, K, C, HW
        return (assign[:, :, None] * residuals).sum(-1)


class OpenIBLVGG(tnn.Module):
    """``ibl/models/vgg.py``: ``base`` = torchvision ``vgg16().features`` minus the last ReLU and max-pool
    (built with torchvision's own ``make_layers(cfgs['D'])``, without the 120M-parameter classifier)."""

    def __init__(self):
        super().__init__()
        features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
        self.base = tnn.Sequential(*list(features.children())[:-2])


class EmbedNetPCA(tnn.Module):
    """OpenIBL's ``EmbedNetPCA`` (``EmbedNet`` when ``pca_dim`` is None)."""

    def __init__(self, num_clusters: int = 64, pca_dim: int | None = 4096):
        super().__init__()
        self.base_model = OpenIBLVGG()
        self.net_vlad = OpenIBLNetVLAD(num_clusters, 512)
        if pca_dim is not None:
            self.pca_layer = tnn.Conv2d(num_clusters * 512, pca_dim, kernel_size=1)

    def forward(self, x):
        vlad = F.normalize(self.net_vlad(self.base_model.base(x)), dim=2).flatten(1)  # intra-L2, k-major
        vlad = F.normalize(vlad, dim=1)
        if not hasattr(self, "pca_layer"):
            return vlad
        return F.normalize(self.pca_layer(vlad[:, :, None, None]).flatten(1), dim=1)


def shared_state(module: tnn.Module) -> dict[str, np.ndarray]:
    """``state_dict()`` as numpy views (no copy: SFRS's PCA alone is 537 MB)."""
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def load_strictly(module_class, state: dict[str, np.ndarray], *args) -> tnn.Module:
    """A fresh ``module_class(*args)`` holding ``state``, loaded with ``strict=True`` (built on the meta
    device: no random initialisation of tensors that are replaced anyway)."""
    with torch.device("meta"):
        module = module_class(*args)
    module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=True, assign=True)
    return module


def openibl_input(rgb: np.ndarray) -> torch.Tensor:
    """OpenIBL's test transform after ``ToTensor``: ``Normalize(OPENIBL_MEAN, std=[1/255]*3)``."""
    return torchvision.transforms.functional.normalize(torch.from_numpy(rgb), OPENIBL_MEAN, [1 / 255] * 3)


def random_embed_net(num_clusters=64, pca_dim=4096, seed=0) -> EmbedNetPCA:
    torch.manual_seed(seed)
    net = EmbedNetPCA(num_clusters, pca_dim)
    with torch.no_grad():
        for m in net.base_model.base:
            if isinstance(m, tnn.Conv2d):
                if m.in_channels == 3:
                    m.weight.div_(255.0)  # 0-255 inputs: activations O(1), so the biases matter
                m.bias.normal_(0.0, 0.1)  # torchvision zero-inits VGG biases
        net.net_vlad.conv.weight.mul_(20.0)  # sharper assignments than the default init
    return net.eval()


def test_sfrs_by_name_matches_openibl_reference_and_round_trips():
    """``sfrs_vgg16_4096`` from an OpenIBL-layout state dict: same descriptors from ImageNet-normalised
    images as the reference from OpenIBL-normalised ones; export is bit-exact and loads strictly."""
    net = random_embed_net()
    state = shared_state(net)
    assert {k: tuple(v.shape) for k, v in state.items()} == layout("sfrs_vgg16_4096")
    assert list(state) == list(layout("sfrs_vgg16_4096"))

    cfg = model_config("sfrs_vgg16_4096")
    variables = torch_to_variables(state, cfg)
    rgb = rgb_images(2, 64, seed=1)
    with torch.no_grad():
        expected = net(openibl_input(rgb)).numpy()
    actual = jit_apply(build_model(cfg))(variables, nhwc(imagenet_nchw(rgb)))
    assert actual.shape == (2, 4096) == (2, descriptor_dim(cfg))
    assert_close(actual, expected)

    back = variables_to_torch(variables, cfg)
    assert list(back) == list(state)
    assert all(back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k]) for k in state)
    load_strictly(EmbedNetPCA, back)


def test_netvlad_vgg16_configs_share_the_openibl_layout():
    """``netvlad_vgg16_32768`` = ``EmbedNet`` (no ``pca_layer``), ``netvlad_vgg16_4096`` = SFRS's layout."""
    no_pca = {k: v for k, v in layout("sfrs_vgg16_4096").items() if not k.startswith("pca_layer.")}
    assert expected_torch_shapes("netvlad_vgg16_32768") == no_pca
    assert expected_torch_shapes("netvlad_vgg16_4096") == layout("sfrs_vgg16_4096")
    assert [r.torch_name for r in torch_rules("sfrs_vgg16_4096")] == list(layout("sfrs_vgg16_4096"))
    for name, dim in (("netvlad_vgg16_32768", 32768), ("netvlad_vgg16_4096", 4096), ("sfrs_vgg16_4096", 4096)):
        cfg = model_config(name)
        assert (cfg.input_norm, cfg.torch_layout, descriptor_dim(cfg)) == ("caffe", "openibl", dim)
    # The VG-benchmark layout names the projection inside the head.
    vg = model_config({"backbone": "vgg16", "head": "netvlad", "num_clusters": 8, "pca_dim": 16})
    shapes = expected_torch_shapes(vg)
    assert shapes["aggregation.pca_layer.weight"] == (16, 8 * 512, 1, 1) and "backbone.28.bias" in shapes


def test_openibl_to_torch_cli_loads_strictly_into_the_reference(tmp_path):
    """``python -m jaxvpr.convert to-torch`` of a small OpenIBL-layout checkpoint (8 clusters, PCA 16)."""
    cfg = model_config({"backbone": "vgg16", "head": "netvlad", "num_clusters": 8, "pca_dim": 16,
                        "input_norm": "caffe", "torch_layout": "openibl"})
    net = random_embed_net(num_clusters=8, pca_dim=16, seed=2)
    save_model(tmp_path / "ckpt", cfg, torch_to_variables(numpy_state(net), cfg))
    assert convert(["to-torch", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "net.pth")]) == 0
    assert not list(tmp_path.glob("*.npz"))  # no whitening to write
    fresh = load_strictly(EmbedNetPCA, torch.load(tmp_path / "net.pth", weights_only=True), 8, 16)
    for key, value in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


# --------------------------------------------------------------------------- dirtorch (AP-GeM)


class DirtorchGeM(tnn.Module):
    """``GeneralizedMeanPoolingP``: trainable p (init 3), clamp 1e-6, adaptive average to 1x1."""

    def __init__(self):
        super().__init__()
        self.p = tnn.Parameter(torch.ones(1) * 3)

    def forward(self, x):
        return F.adaptive_avg_pool2d(x.clamp(min=1e-6).pow(self.p), 1).pow(1.0 / self.p)


class DirtorchRMAC(tnn.Module):
    """dirtorch ``resnet*_rmac`` with GeM: the ResNet modules (no avgpool/fc of their own), ``adpool``,
    ``fc`` -- registered in dirtorch's order, so ``state_dict()`` lists them as the checkpoint does."""

    def __init__(self, depth: int = 101, out_dim: int = 2048):
        super().__init__()
        resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(resnet, name))
        self.adpool = DirtorchGeM()
        self.fc = tnn.Linear(resnet.fc.in_features, out_dim)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.adpool(x).flatten(1)  # norm_features=False: no L2 before the FC
        return F.normalize(self.fc(x), dim=-1)


def random_rmac(depth: int, out_dim: int, seed: int) -> DirtorchRMAC:
    torch.manual_seed(seed)
    net = randomise(DirtorchRMAC(depth, out_dim), seed=seed + 1)
    with torch.no_grad():
        net.adpool.p.fill_(2.6)  # a learned p, not the init value
    return net.eval()


def random_whitening(dim: int, seed: int) -> dict[str, np.ndarray]:
    """Random PCA arrays: components with unit-norm-ish rows, decreasing positive variances."""
    rng = np.random.default_rng(seed)
    return {
        "mean": (0.02 * rng.standard_normal(dim)).astype(np.float32),
        "components": (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32),
        "explained_variance": np.sort(rng.uniform(1e-4, 1e-2, dim))[::-1].astype(np.float32),
    }


def sklearn_whiten(x: np.ndarray, pca: dict[str, np.ndarray], power: float = 0.25) -> np.ndarray:
    """``PCA.transform`` with ``whiten=True`` (``(x - mean_) @ components_.T / explained_variance_ ** p``,
    sklearn p = 0.5, dirtorch ``whitenp``), then dirtorch's L2; in float64."""
    x = x.astype(np.float64) - pca["mean"]
    y = x @ pca["components"].T.astype(np.float64) / pca["explained_variance"].astype(np.float64) ** power
    return y / np.linalg.norm(y, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def apgem_reference():
    """A random ``resnet101_rmac`` (2048-d) and a random 2048-d whitening."""
    return random_rmac(101, 2048, seed=3), random_whitening(2048, seed=4)


def test_apgem_by_name_matches_dirtorch_and_sklearn_whitening(apgem_reference):
    net, pca = apgem_reference
    state = numpy_state(net)
    assert {k: tuple(v.shape) for k, v in state.items()} == layout("apgem_resnet101_2048")
    assert list(state) == list(layout("apgem_resnet101_2048"))

    cfg = model_config("apgem_resnet101_2048")
    with_whitening = {**state, **{f"whitening.{k}": v for k, v in pca.items()}}
    variables = torch_to_variables(with_whitening, cfg)
    x = imagenet_nchw(rgb_images(2, 64, seed=5))  # dirtorch's preprocess is ImageNet's
    with torch.no_grad():
        unwhitened = net(torch.from_numpy(x)).numpy()
    expected = sklearn_whiten(unwhitened, pca)
    # Eager execution: ResNet-101's repeated blocks reuse compiled ops (cheaper than one jit on CPU).
    actual = build_model(cfg).apply(variables, nhwc(x))
    assert actual.shape == (2, 2048)
    assert_close(actual, expected)
    assert np.abs(expected - unwhitened).max() > 0.1  # the whitening is not a no-op here

    back = variables_to_torch(variables, cfg)
    assert list(back) == list(with_whitening)
    assert all(back[k].tobytes() == with_whitening[k].tobytes() for k in with_whitening)


def test_apgem_cli_needs_whitening_and_exports_dirtorch_state_dict(tmp_path, apgem_reference, capsys):
    net, pca = apgem_reference
    torch.save(net.state_dict(), tmp_path / "apgem.pth")
    np.savez(tmp_path / "pca.npz", **pca)
    args = ["from-torch", "--model", "apgem_resnet101_2048", "--weights", str(tmp_path / "apgem.pth")]

    assert convert(args + ["--out", str(tmp_path / "refused")]) == 1
    assert "--whitening FILE.npz" in capsys.readouterr().err
    np.savez(tmp_path / "partial.npz", mean=pca["mean"])
    assert convert(args + ["--whitening", str(tmp_path / "partial.npz"), "--out", str(tmp_path / "refused")]) == 1
    assert "missing components, explained_variance" in capsys.readouterr().err

    assert convert(args + ["--whitening", str(tmp_path / "pca.npz"), "--out", str(tmp_path / "ckpt")]) == 0
    model = read_meta(tmp_path / "ckpt")[0]["model"]
    assert model["whiten"] and not model["l2_before_pool"] and model["torch_layout"] == "dirtorch"
    out = tmp_path / "back.pth"
    assert convert(["to-torch", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    fresh = load_strictly(DirtorchRMAC, torch.load(out, weights_only=True), 101, 2048)
    for key, value in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with np.load(tmp_path / "back.whitening.npz") as exported:
        assert sorted(exported.files) == sorted(pca)
        for key in pca:
            assert exported[key].tobytes() == pca[key].tobytes(), key

    # kapture's LM18 extraction: the dirtorch state dict alone, no whitening.
    assert convert(args + ["--no-whitening", "--out", str(tmp_path / "plain")]) == 0
    assert read_meta(tmp_path / "plain")[0]["model"]["whiten"] is False


def test_apgem_without_whitening_is_dirtorch_layout_exactly():
    """``whiten=False`` (kapture's LM18 extraction) converts the dirtorch state dict alone."""
    assert expected_torch_shapes(model_config("apgem_resnet101_2048", whiten=False)) == layout("apgem_resnet101_2048")
    with_whitening = expected_torch_shapes("apgem_resnet101_2048")
    assert {k: with_whitening[k] for k in ("whitening.mean", "whitening.components", "whitening.explained_variance")} \
        == {"whitening.mean": (2048,), "whitening.components": (2048, 2048), "whitening.explained_variance": (2048,)}


def test_small_rmac_with_whitening_matches_reference_in_jit():
    """The AP-GeM head on ResNet-18 (dirtorch's ``resnet18_rmac``), jitted, with a 16-d FC and whitening."""
    net = random_rmac(18, 16, seed=6)
    pca = random_whitening(16, seed=7)
    cfg = model_config({"backbone": "resnet18", "head": "gem", "fc_output_dim": 16, "l2_before_pool": False,
                        "whiten": True, "torch_layout": "dirtorch"})
    variables = torch_to_variables({**numpy_state(net), **{f"whitening.{k}": v for k, v in pca.items()}}, cfg)
    x = imagenet_nchw(rgb_images(3, 64, seed=8))
    with torch.no_grad():
        unwhitened = net(torch.from_numpy(x)).numpy()
    assert_close(jit_apply(build_model(cfg))(variables, nhwc(x)), sklearn_whiten(unwhitened, pca))


def test_whitening_is_frozen_in_training():
    """``frozen_mask`` marks the whitening; the recipes' ``stop_frozen`` + optimiser leave it as it is
    (it has a gradient otherwise) and train the FC. The head alone runs: no backbone to compile."""
    import optax
    from ml_collections import ConfigDict

    from jaxvpr.models import variable_shapes
    from jaxvpr.models.gem import GeMHead
    from jaxvpr.train.loop import stop_frozen
    from jaxvpr.train.triplet import make_optimizer

    cfg = model_config({"backbone": "resnet18conv4", "head": "gem", "fc_output_dim": 8, "l2_before_pool": False,
                        "whiten": True}, trainable_stages=1)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
                          variable_shapes(cfg, (32, 32))["params"])
    params["head"]["whitening"]["explained_variance"] = jnp.arange(1.0, 9.0)
    mask = frozen_mask(cfg, params)
    assert all(jax.tree.leaves(mask["head"]["whitening"]))
    assert not any(jax.tree.leaves({k: v for k, v in mask["head"].items() if k != "whitening"}))

    head = GeMHead(fc_output_dim=8, l2_before_pool=False, whiten=True)  # what build_model(cfg) puts as head
    feature_map = jax.random.uniform(jax.random.key(1), (2, 2, 2, 256))

    def loss(p):
        return jnp.sum(head.apply({"params": p["head"]}, feature_map)[:, 0])

    tx = make_optimizer(ConfigDict({"train": {"lr": 1e-2}}), params, cfg)

    @jax.jit
    def step(p):  # a recipe's step: the loss of stop_frozen(params), one optimiser update
        grads = jax.grad(lambda q: loss(stop_frozen(q, mask)))(p)
        updates, _ = tx.update(grads, tx.init(p), p)
        return optax.apply_updates(p, updates), jax.grad(loss)(p)["head"]["whitening"]

    new, unfrozen_grads = step(params)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(unfrozen_grads))
    for key in ("mean", "components", "explained_variance"):
        np.testing.assert_array_equal(new["head"]["whitening"][key], params["head"]["whitening"][key])
    assert not np.allclose(new["head"]["fc"]["kernel"], params["head"]["fc"]["kernel"])


# --------------------------------------------------------------------------- registry


def test_registry_lists_the_thesis_baselines():
    names = list_models()
    expected = {
        "sfrs_vgg16_4096": ("vgg16", "netvlad", 4096),
        "netvlad_vgg16_32768": ("vgg16", "netvlad", 32768),
        "netvlad_vgg16_4096": ("vgg16", "netvlad", 4096),
        "apgem_resnet101_2048": ("resnet101", "gem", 2048),
        "eigenplaces_resnet101_2048": ("resnet101", "gem", 2048),
        "eigenplaces_resnet101_512": ("resnet101", "gem", 512),
        "eigenplaces_resnet101_256": ("resnet101", "gem", 256),
        "eigenplaces_vgg16_512": ("vgg16", "gem", 512),
        "convap_resnet50_4096": ("resnet50", "convap", 4096),
        "cosplace_vgg16_512": ("vgg16", "gem", 512),
        "mixvpr_resnet50_4096": ("resnet50conv4", "mixvpr", 4096),
    }
    for name, (backbone, head, dim) in expected.items():
        assert name in names, name
        cfg = model_config(name)
        assert (cfg.backbone, cfg.head, descriptor_dim(cfg)) == (backbone, head, dim), name
    for name in names:  # everything else keeps the ImageNet input
        if not name.startswith(("sfrs_", "netvlad_vgg16_")):
            assert model_config(name).input_norm == "imagenet", name
    # EigenPlaces publishes CosPlace's network and names.
    assert expected_torch_shapes("eigenplaces_vgg16_512") == layout("cosplace_vgg16_512")

    with pytest.raises(ValueError, match="valid: imagenet, caffe"):
        model_config("cosplace_resnet18_512", input_norm="bgr")
    with pytest.raises(ValueError, match="torch_layout 'openibl' names head"):
        model_config("cosplace_resnet18_512", torch_layout="openibl")
    with pytest.raises(ValueError, match="keeps layer4"):
        expected_torch_shapes(model_config({"backbone": "resnet50conv4", "head": "gem", "torch_layout": "dirtorch"}))
    assert model_config("sfrs_vgg16_4096", backbone="resnet18").torch_layout is None  # names of VGG16 only


def test_convap_4096_is_the_full_resnet50_in_mixvpr_names():
    """VPR-methods-evaluation's Conv-AP: ``backbone.model`` = torchvision ResNet-50 with layer4 (its fc
    and avgpool replaced by Identity), ``aggregator.channel_pool`` 2048 -> 1024, 2x2 bins, 320x320."""
    resnet = torchvision.models.resnet50(weights=None)
    expected = {f"backbone.model.{k}": tuple(v.shape) for k, v in resnet.state_dict().items()
                if not k.startswith("fc.")}
    expected.update({"aggregator.channel_pool.weight": (1024, 2048, 1, 1), "aggregator.channel_pool.bias": (1024,)})
    assert expected_torch_shapes("convap_resnet50_4096") == expected
    assert model_config("convap_resnet50_4096").image_size == (320, 320)


def test_checkpoints_saved_before_the_new_fields_still_load(tmp_path):
    """A model config written without ``input_norm``/``torch_layout``/``l2_before_pool``/``whiten``
    (older jaxvpr) loads as the ImageNet-normalised CosPlace-style model it was."""
    old = {"name": "old_r18", "backbone": "resnet18conv4", "head": "gem", "fc_output_dim": 8,
           "trainable_stages": 1, "image_size": None}
    cfg = model_config(old)
    assert (cfg.input_norm, cfg.torch_layout, cfg.l2_before_pool, cfg.whiten) == ("imagenet", None, True, False)
    shapes = jax.eval_shape(lambda: build_model(cfg).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    save_model(tmp_path / "ckpt", old, variables)  # the meta holds exactly the old keys
    loaded_cfg, _ = load_model(tmp_path / "ckpt")
    assert loaded_cfg.input_norm == "imagenet" and not loaded_cfg.whiten
