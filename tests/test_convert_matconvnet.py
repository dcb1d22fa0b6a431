"""NetVLAD's MATLAB release (``Pitts30K_struct.mat``) -> jaxvpr, against a numpy forward of the MATLAB network.

The fake release is written with ``scipy.io.savemat`` in the nesting hloc reads back with
``loadmat(struct_as_record=False, squeeze_me=True)``: a struct ``net`` with ``layers`` (a cell of 35
structs ``name``, ``type``, ``weights`` (a cell), ...) and ``meta.normalization.averageImage``
(224 x 224 x 3, every pixel the VGG16 mean). Its layers follow the release: VGG16 conv1_1..conv5_3 with
max-pool before ReLU (so the convs sit at torchvision's ``features`` indices), ``preL2``,
``vlad:core`` (assignment D x K and the *negated* centres D x K, stored 1 x 1 x D x K), the
intra-normalisation, ``postL2``, ``WPCA`` (1 x 1 x D*K x P) and ``finalL2``. Weights are random with the
real shapes (K = 64 clusters of D = 512), except that the whitening projects to P = 16 dims instead of 4096
(537 MB otherwise); images are 32 x 32.

Reference (numpy, float64), written here from the forward of hloc's ``extractors/netvlad.py`` and
netvlad_tf_open's ``layers.py`` -- it reads the MATLAB arrays as they are: each layer by its ``type``
(3 x 3 convs with the H x W x in x out kernels, ReLU, 2 x 2 max-pool) on RGB in 0-255 minus
``averageImage(1,1,:)``; L2 over channels; a = softmax_k(x . A_k); V[d, k] = sum_i a_ik (x_id + C[d, k])
with the stored (negated) centres C; L2 over d for each k; flattened d-major (hloc's view of its
(B, D, K) sums); L2; then y = v W + b and L2.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

scipy_io = pytest.importorskip("scipy.io")

from jaxvpr.checkpoint import load_model, read_meta  # noqa: E402
from jaxvpr.convert import torch_to_variables  # noqa: E402
from jaxvpr.convert.__main__ import main as convert  # noqa: E402
from jaxvpr.convert.matconvnet import load_matconvnet_net, netvlad_state_dict, read_netvlad_mat  # noqa: E402
from jaxvpr.models import build_model, model_config  # noqa: E402

VGG16_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))  # (convs, channels) of configuration D
DIM, CLUSTERS, WHITENED_DIM = 512, 64, 16
VGG_MEAN = (123.68, 116.779, 103.939)  # the release's averageImage pixel
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def cell(*arrays) -> np.ndarray:
    """A MATLAB cell array (savemat writes an object array as a cell)."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def release_layers(seed: int = 0) -> list[dict]:
    """The 35 layers of ``vd16_pitts30k_conv5_3_vlad_preL2_intra_white`` with random float32 weights."""
    rng = np.random.default_rng(seed)
    layers, in_ch = [], 3
    for block, (convs, out_ch) in enumerate(VGG16_BLOCKS, start=1):
        for j in range(1, convs + 1):
            std = np.sqrt(2.0 / (9 * in_ch)) / (255.0 if in_ch == 3 else 1.0)  # 0-255 input: O(1) activations
            kernel = (rng.standard_normal((3, 3, in_ch, out_ch)) * std).astype(np.float32)
            bias = (rng.standard_normal(out_ch) * 0.1).astype(np.float32)
            layers.append(dict(name=f"conv{block}_{j}", type="conv", weights=cell(kernel, bias),
                               stride=np.array([1.0, 1.0]), pad=np.ones(4)))
            in_ch = out_ch
            relu = dict(name=f"relu{block}_{j}", type="relu", weights=cell(), leak=0.0)
            if j < convs:
                layers.append(relu)
            elif block < len(VGG16_BLOCKS):  # the release pools before the block's last ReLU
                layers.append(dict(name=f"pool{block}", type="pool", weights=cell(), method="max",
                                   pool=np.array([2.0, 2.0]), stride=np.array([2.0, 2.0]), pad=np.zeros(4)))
                layers.append(relu)
    l2_param = np.array([1024, 1e-12, 1, 0.5])
    assignment = (rng.standard_normal((1, 1, DIM, CLUSTERS)) * 3 / np.sqrt(DIM)).astype(np.float32)
    minus_centres = (rng.standard_normal((1, 1, DIM, CLUSTERS)) * 0.05).astype(np.float32)
    projection = rng.standard_normal((1, 1, DIM * CLUSTERS, WHITENED_DIM)).astype(np.float32)
    offset = (rng.standard_normal(WHITENED_DIM) * 0.5).astype(np.float32)
    layers += [
        dict(name="preL2", type="normalize", weights=cell(), param=l2_param),
        dict(name="vlad:core", type="custom", weights=cell(assignment, minus_centres), K=float(CLUSTERS)),
        dict(name="vlad:intranorm", type="normalize", weights=cell(), param=l2_param),
        dict(name="postL2", type="custom", weights=cell()),
        dict(name="WPCA", type="conv", weights=cell(projection, offset), stride=np.array([1.0, 1.0]), pad=0.0),
        dict(name="finalL2", type="custom", weights=cell()),
    ]
    assert len(layers) == 35 and layers[30]["name"] == "vlad:core" and layers[33]["name"] == "WPCA"
    return layers


def write_release(path, layers, mean=VGG_MEAN) -> str:
    average_image = np.broadcast_to(np.asarray(mean, np.float32), (224, 224, 3)).copy()
    net = {"layers": cell(*layers), "meta": {"normalization": {"averageImage": average_image}}}
    scipy_io.savemat(path, {"net": net})
    return str(path)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(path of the fake ``Pitts30K_struct.mat``, its layers as written)."""
    layers = release_layers()
    return write_release(tmp_path_factory.mktemp("netvlad") / "Pitts30K_struct.mat", layers), layers


# --------------------------------------------------------------------------- the reference


def conv3x3(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """MatConvNet conv (correlation, pad 1, stride 1): x (B, H, W, in), kernel (3, 3, in, out)."""
    b, h, w, c = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))  # B, H, W, C, 3, 3
    patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(b * h * w, 9 * c)
    return (patches @ kernel.reshape(9 * c, -1) + bias).reshape(b, h, w, -1)


def max_pool2x2(x: np.ndarray) -> np.ndarray:
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def l2(x: np.ndarray, axis: int) -> np.ndarray:
    return x / np.sqrt(np.sum(x * x, axis=axis, keepdims=True) + 1e-12)


def matlab_netvlad(path: str, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(32768-d VLAD in the MATLAB/hloc order, whitened descriptor) of RGB images (B, H, W, 3) in [0, 1]."""
    net = scipy_io.loadmat(path, struct_as_record=False, squeeze_me=True)["net"]
    layers = net.layers
    x = rgb.astype(np.float64) * 255.0 - net.meta.normalization.averageImage[0, 0].astype(np.float64)
    for layer in layers[:29]:
        if layer.type == "conv":
            x = conv3x3(x, layer.weights[0].astype(np.float64), layer.weights[1].astype(np.float64))
        elif layer.type == "relu":
            x = np.maximum(x, 0.0)
        else:
            assert layer.type == "pool"
            x = max_pool2x2(x)
    local = l2(x.reshape(x.shape[0], -1, x.shape[-1]), axis=-1)  # preL2: (B, N, D)
    assignment, stored_centres = (w.astype(np.float64) for w in layers[30].weights)  # (D, K) each
    logits = local @ assignment  # (B, N, K)
    soft = np.exp(logits - logits.max(-1, keepdims=True))
    soft /= soft.sum(-1, keepdims=True)
    vlad = np.einsum("bnk,bnd->bdk", soft, local) + soft.sum(1)[:, None, :] * stored_centres  # x + C
    vlad = l2(vlad, axis=1)  # intra-normalisation over d
    vlad = l2(vlad.reshape(len(vlad), -1), axis=-1)  # d-major, as hloc's desc.view(b, -1)
    projection, offset = layers[33].weights
    whitened = l2(vlad @ projection.astype(np.float64) + offset.astype(np.float64), axis=-1)
    return vlad, whitened


def rgb_images(batch: int = 2, size: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, size, size, 3))


def jaxvpr_descriptors(cfg, variables, rgb: np.ndarray) -> np.ndarray:
    """The model on the ImageNet-normalised images every jaxvpr model takes (NHWC)."""
    x = ((rgb - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    return np.asarray(jax.jit(build_model(cfg).apply)(variables, x))


def assert_close(actual, expected, rtol=1e-4):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * float(np.max(np.abs(expected))))


# --------------------------------------------------------------------------- tests


def test_release_converts_to_whitened_netvlad_matching_the_matlab_forward(release):
    """``netvlad_vgg16_4096`` (whitening shrunk to 16 dims) from the .mat: hloc's whitened descriptor."""
    path, _ = release
    cfg = model_config("netvlad_vgg16_4096", pca_dim=WHITENED_DIM)
    variables = torch_to_variables(read_netvlad_mat(path, cfg), cfg)  # strict: every tensor, nothing else
    rgb = rgb_images()
    _, expected = matlab_netvlad(path, rgb)
    actual = jaxvpr_descriptors(cfg, variables, rgb)
    assert actual.shape == (2, WHITENED_DIM)
    assert_close(actual, expected)


def test_cli_converts_the_release_for_netvlad_vgg16_32768(release, tmp_path, capsys):
    """``from-torch --weights X.mat``: the 32768-d VLAD holds hloc's values, cluster by cluster."""
    path, _ = release
    out = tmp_path / "ckpt"
    assert convert(["from-torch", "--model", "netvlad_vgg16_32768", "--weights", path, "--out", str(out)]) == 0
    assert "matconvnet" in capsys.readouterr().out
    assert read_meta(out)[0]["source"] == "matconvnet"
    cfg, variables = load_model(out)
    rgb = rgb_images()
    expected, _ = matlab_netvlad(path, rgb)  # index d * K + k
    actual = jaxvpr_descriptors(cfg, variables, rgb)  # index k * D + d
    assert actual.shape == (2, CLUSTERS * DIM)
    assert_close(actual.reshape(2, CLUSTERS, DIM).transpose(0, 2, 1).reshape(2, -1), expected)


def test_a_release_missing_a_layer_is_refused_by_name(release, tmp_path, capsys):
    """A file cut after vlad:core has no WPCA for the whitened model, one cut before has no NetVLAD; a
    whitening of another size, a layer without its weights and a file without `net` are named too."""
    _, layers = release
    no_whitening = write_release(tmp_path / "no_wpca.mat", layers[:33])
    code = convert(["from-torch", "--model", "netvlad_vgg16_4096", "--weights", no_whitening,
                    "--out", str(tmp_path / "ckpt")])
    err = capsys.readouterr().err
    assert code == 1 and "no_wpca.mat" in err and "WPCA in net.layers[33]" in err and "netvlad_vgg16_32768" in err
    assert not (tmp_path / "ckpt").exists()

    net = load_matconvnet_net(no_whitening)
    net.layers = net.layers[:30]
    with pytest.raises(ValueError, match=r"has 30 layers; 'netvlad_vgg16_32768' needs the NetVLAD layer vlad:core "
                                         r"in net.layers\[30\]"):
        netvlad_state_dict(net, "netvlad_vgg16_32768")
    net = load_matconvnet_net(no_whitening)
    net.layers[30].weights = net.layers[30].weights[:1]  # assignment only, no centres
    with pytest.raises(ValueError, match=r"net.layers\[30\] \(vlad:core, type custom\) holds 1 weight arrays"):
        netvlad_state_dict(net, "netvlad_vgg16_32768")

    with pytest.raises(ValueError, match=r"net.layers\[33\] \(WPCA, type conv\) weights\{1\} has shape \[32768, 16\], "
                                         r"the model expects \[32768, 4096\]"):
        netvlad_state_dict(load_matconvnet_net(release[0]), "netvlad_vgg16_4096")  # whitening to 16, not 4096

    scipy_io.savemat(tmp_path / "other.mat", {"weights": np.zeros(3)})
    with pytest.raises(ValueError, match=r"holds a variable 'net'; found \['weights'\]"):
        load_matconvnet_net(tmp_path / "other.mat")


def test_a_mean_image_other_than_the_models_is_refused(release):
    """The release's averageImage pixel equals the caffe mean; AlexNet-NetVLAD's first pixel does not."""
    path, _ = release
    net = load_matconvnet_net(path)
    netvlad_state_dict(net, "netvlad_vgg16_32768")  # VGG16 mean: within 0.001 of (0.48502, 0.45796, 0.40760) x 255
    net.meta.normalization.averageImage = np.broadcast_to(
        np.asarray([117.3785, 117.6438, 110.1771], np.float32), (224, 224, 3))  # Relja/netvlad#18
    with pytest.raises(ValueError, match=r"averageImage\(1,1,:\) = \[117.37"):
        netvlad_state_dict(net, "netvlad_vgg16_32768")
    del net.meta.normalization.averageImage
    with pytest.raises(ValueError, match="net.meta.normalization.averageImage is missing"):
        netvlad_state_dict(net, "netvlad_vgg16_32768")
    with pytest.raises(ValueError, match="input_norm='caffe' and torch_layout='openibl'"):
        netvlad_state_dict(net, {"backbone": "vgg16", "head": "netvlad"})
