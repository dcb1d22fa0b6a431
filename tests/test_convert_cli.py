"""The conversion and extraction command lines, end to end against PyTorch.

Reference: torchvision's ResNet-18 cropped as CosPlace does (``children()[:-2]``) followed by a
minimal CosPlace head written here from the paper's equations and the published layout
(``aggregation.1.p``, ``aggregation.3.weight/bias``): L2 over channels -> GeM(p) -> flatten ->
Linear -> L2. No package ships this head.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
nn = torch.nn
F = torch.nn.functional


class GeM(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * 3)

    def forward(self, x):
        return F.avg_pool2d(x.clamp(min=1e-6).pow(self.p), (x.size(-2), x.size(-1))).pow(1.0 / self.p)


class L2(nn.Module):
    def forward(self, x):
        return F.normalize(x, p=2, dim=1)


class CosPlaceNet(nn.Module):
    def __init__(self, dim=512):
        super().__init__()
        self.backbone = nn.Sequential(*list(torchvision.models.resnet18().children())[:-2])
        self.aggregation = nn.Sequential(L2(), GeM(), nn.Flatten(), nn.Linear(512, dim), L2())

    def forward(self, x):
        return self.aggregation(self.backbone(x))


def _random_net(seed=0):
    torch.manual_seed(seed)
    net = CosPlaceNet()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.num_batches_tracked.fill_(7)
        net.aggregation[1].p.fill_(2.7)
    return net.eval()


def test_from_torch_extract_to_torch_round_trip(tmp_path):
    from jaxvpr.convert.__main__ import main as convert
    from jaxvpr.extract import main as extract

    net = _random_net()
    weights = tmp_path / "cosplace_r18.pth"
    torch.save(net.state_dict(), weights)
    ckpt = tmp_path / "ckpt"
    assert convert(["from-torch", "--model", "cosplace_resnet18_512", "--weights", str(weights), "--out", str(ckpt)]) == 0

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 80, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    out = tmp_path / "desc.npy"
    assert extract(["--checkpoint", str(ckpt), "--images", str(tmp_path / "images.npy"), "--out", str(out),
                    "--batch-size", "2"]) == 0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = torch.tensor(((images / 255.0 - mean) / std).transpose(0, 3, 1, 2), dtype=torch.float32)
    with torch.no_grad():
        ref = net(x).numpy()
    got = np.load(out)
    assert got.shape == (3, 512)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-5)

    for suffix in (".pth", ".safetensors"):
        back = tmp_path / f"back{suffix}"
        assert convert(["to-torch", "--checkpoint", str(ckpt), "--out", str(back)]) == 0
        if suffix == ".pth":
            state = torch.load(back, weights_only=True)
        else:
            from safetensors.torch import load_file

            state = load_file(back)
        fresh = CosPlaceNet()
        fresh.load_state_dict(state, strict=True)  # every tensor, num_batches_tracked included
        for name, tensor in net.state_dict().items():
            assert state[name].dtype == tensor.dtype, name
            assert torch.equal(state[name], tensor), name  # bit-exact round trip


def test_from_torch_reports_mismatches_by_name(tmp_path, capsys):
    from jaxvpr.convert.__main__ import main as convert

    state = _random_net().state_dict()
    del state["aggregation.3.bias"]
    state["extra.weight"] = torch.zeros(2)
    state["backbone.0.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    assert convert(["from-torch", "--model", "cosplace_resnet18_512", "--weights", str(tmp_path / "bad.pth"),
                    "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "aggregation.3.bias" in err and "extra.weight" in err and "backbone.0.weight" in err
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_from_torch_refuses_pickled_objects(tmp_path, capsys):
    from jaxvpr.convert.__main__ import main as convert

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    assert convert(["from-torch", "--model", "cosplace_resnet18_512", "--weights", str(tmp_path / "evil.pth"),
                    "--out", str(tmp_path / "c")]) == 1
    captured = capsys.readouterr()
    assert "unpickled!" not in captured.out


def test_imagenet_backbone_import(tmp_path):
    import jax

    from jaxvpr.checkpoint import load_model
    from jaxvpr.convert.__main__ import main as convert

    torch.manual_seed(1)
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    assert convert(["from-torch", "--model", "cosplace_resnet18_512", "--weights", str(tmp_path / "r18.pth"),
                    "--imagenet", "--out", str(tmp_path / "c")]) == 0
    cfg, variables = load_model(tmp_path / "c")
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(variables)}
    conv1 = tv.conv1.weight.detach().numpy().transpose(2, 3, 1, 0)
    assert any(v.shape == conv1.shape and np.array_equal(v, conv1) for v in flat.values())
