"""Inference throughput, jaxvpr vs PyTorch, with the same weights, measured in the same run.

    python bench/inference.py                  # default rows, 3-5 minutes on 2 CPU cores
    python bench/inference.py --rows cosplace_resnet50_2048:512:16 --rounds 7 --iters 3
    python bench/inference.py --rows sfrs_vgg16_4096:224:4,apgem_resnet101_2048:224:4,anyloc_dinov2_vitg14_indoor:224:1

A row ``model:size:batch`` times ``batch`` images of ``size`` x ``size`` pixels (``size`` may also be
``HxW``, e.g. ``480x640``) through

* jaxvpr: ``jax.jit(lambda v, x: model.apply(v, x, train=False))`` on NHWC input, timed with
  ``block_until_ready``; compile time (``lower(...).compile()``) is reported on its own;
* PyTorch: the anchor's network with the *same* weights, ``eval()`` + ``torch.inference_mode()``
  on NCHW input --
  CosPlace models (``cosplace_resnet18_512``, ``cosplace_resnet50_2048``): torchvision ResNet
  ``children()[:-2]`` + CosPlace's head (L2Norm, GeM, Flatten, Linear, L2Norm), written below;
  SALAD (``salad_dinov2_vitb14``): Hugging Face ``Dinov2Model`` (random ViT-B/14 weights, SDPA
  attention, the official 0.1-offset position-embedding interpolation installed) + the SALAD head
  written below from the paper (log-domain Sinkhorn, 3 iterations, as the released code);
  SFRS (``sfrs_vgg16_4096``): OpenIBL's ``EmbedNetPCA`` written below (torchvision VGG16
  ``features[:-2]`` + NetVLAD-64 with explicit residuals + the 1x1-conv PCA 32768 -> 4096 + L2), fed
  the same images in OpenIBL's normalisation (RGB 0-255 minus the mean; jaxvpr takes them
  ImageNet-normalised and converts inside the model);
  AP-GeM (``apgem_resnet101_2048``): dirtorch's ``resnet101_rmac`` written below (torchvision
  ResNet-101 + GeM without L2 before + fc + L2) + the ``Landmarks_clean``-style whitening
  ``(x - mean) C^T / var^0.25`` + L2, random whitening arrays;
  AnyLoc (``anyloc_dinov2_vitg14_<domain>``): Hugging Face ``Dinov2Model`` with the ViT-G/14 config
  cut to blocks 0..31 (random weights), the value facet of block 31, the class token dropped, L2,
  and AnyLoc's hard VLAD over 32 centres written below (loop over clusters, intra-L2, global L2).

The PyTorch state dict (CosPlace / SALAD / OpenIBL / dirtorch checkpoint names; for AP-GeM plus the
``whitening.*`` arrays; for AnyLoc the Hugging Face names renamed to the hub layout by
``jaxvpr.convert.dinov2.hf_dinov2_to_official`` plus the centres ``c_centers``) is converted with
``jaxvpr.convert.rules.torch_to_variables``; the table's last column is the largest absolute
difference between the two descriptors of the timed batch (unit-norm descriptors: ~1e-6 expected;
AP-GeM up to ~3e-5 (7e-6 at 224, 3e-5 at 64), the float32 rounding of that network with
calibrated BatchNorm: PyTorch float32 is as far from PyTorch float64; AnyLoc's hard assignment
would show a patch changing cluster as a jump, see ``anyloc_pair``). The random weights of SFRS,
AP-GeM and AnyLoc are chosen so that the descriptors depend on the image (see ``sfrs_pair``,
``apgem_pair``, ``anyloc_pair``), else the check would be weak.

Timing: one warm-up call per side after compilation (excluded), then ``--rounds`` rounds that each
time ``--iters`` calls of jaxvpr and then ``--iters`` calls of PyTorch (interleaved, so a change of
the machine's load hits both sides alike); the table gives the median images/s over rounds and the
ratio jaxvpr / PyTorch of the medians (> 1: jaxvpr is faster). PyTorch uses
``torch.set_num_threads(--threads)`` (default: all cores); XLA's CPU client uses one thread per core
by default (``--xla_cpu_multi_thread_eigen``), i.e. both sides use every core. Measure on an idle
machine: when other processes compete for the cores, PyTorch's OpenMP threads lose far more than
XLA's (dirtorch ResNet-101 at 224, batch 4, beside two other jobs on 2 cores: 0.9 s per call with
``--threads 1``, 5.6 s with 2), and the ratio then says more about the load than about the code.

Full-size options: larger batches (``:32`` at 224, ``:16`` at 512, ``:8`` for SALAD) and more
rounds (``--rounds 10``) give steadier numbers; each row's memory is about batch x (activation
size), e.g. ResNet-50 at 512 with batch 16 needs ~3 GB per framework.

The benchmark baselines are not in the default rows (ViT-G takes ~10 s per image at 224 on 2 CPU
cores). On a CPU use tiny rows (the third command above; ViT-G's weights are made once, in float32:
11.5 GB peak resident memory while converting, 8 GB after). On a GPU (``--torch-device cuda`` puts
PyTorch there too), the sizes the benchmark uses::

    python bench/inference.py --torch-device cuda --rounds 10 --iters 3 --rows \
        anyloc_dinov2_vitg14_indoor:322:8 anyloc_dinov2_vitg14_indoor:518:4 \
        sfrs_vgg16_4096:480x640:16 sfrs_vgg16_4096:512:16 apgem_resnet101_2048:512:16
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F

from jaxvpr import xla_defaults
from jaxvpr.convert.rules import torch_to_variables
from jaxvpr.models import build_model, model_config

DEFAULT_ROWS = (
    "cosplace_resnet18_512:224:16",
    "cosplace_resnet18_512:512:8",
    "cosplace_resnet50_2048:224:16",
    "cosplace_resnet50_2048:512:4",
    "salad_dinov2_vitb14:322:2",
)


# ----------------------------------------------------------------------------- shared bench helpers
def machine_line() -> str:
    """Cores, thread settings, JAX's CPU convolutions and the load average, for the header of every table."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    conv = "XLA's own" if xla_defaults.ynn_setting() == "-individual_convolution" else "jaxlib's choice"
    return (f"{os.cpu_count()} CPU cores; torch {torch.__version__} with {torch.get_num_threads()} threads; "
            f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device), "
            f"{conv} CPU convolutions; load average {load}")


def load_line() -> str:
    return "load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def interleaved_throughput(sides: dict, images_per_call: int, iters: int, rounds: int) -> dict:
    """Median images/s of each side's ``call()`` over ``rounds`` interleaved rounds.

    ``sides`` maps a name to a function that runs one batch to completion (it blocks). In each
    round every side runs ``iters`` calls back to back; returns ``{name: [images/s per round]}``.
    """
    out = {name: [] for name in sides}
    for _ in range(rounds):
        for name, call in sides.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                call()
            out[name].append(images_per_call * iters / (time.perf_counter() - t0))
    return out


def median(xs) -> float:
    return float(statistics.median(xs))


def rate(x: float) -> str:
    """Images/s with one decimal, or 2 significant digits below 1 (ViT-G on a CPU: ~0.1 img/s)."""
    return f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def spread(xs) -> str:
    """``min-max`` of the per-round values, to show how noisy a row was."""
    return f"{min(xs):.1f}-{max(xs):.1f}"


def rate_spread(xs) -> str:
    """:func:`spread` with :func:`rate`'s digits."""
    return f"{rate(min(xs))}-{rate(max(xs))}"


def timed(fn):
    """``(result, seconds)`` of one call."""
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def warm_up(sides: dict, warmup: int) -> dict:
    """Each side's first call timed (``{name: seconds}``: compilation included), then ``warmup - 1`` more calls."""
    first = {name: timed(fn)[1] for name, fn in sides.items()}
    for _ in range(warmup - 1):
        for fn in sides.values():
            fn()
    return first


def sync(device) -> None:
    """Waits for a CUDA device's queued work (timings of asynchronous PyTorch calls)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- PyTorch CosPlace
class L2Norm(tnn.Module):
    """``F.normalize(x, p=2, dim=dim)`` (CosPlace's ``L2Norm``)."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return F.normalize(x, p=2.0, dim=self.dim)


class GeM(tnn.Module):
    """GeM pooling (Radenovic et al., eq. 3) with one learnable p, as CosPlace's ``GeM``."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = tnn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x):
        pooled = F.avg_pool2d(x.clamp(min=self.eps).pow(self.p), (x.size(-2), x.size(-1)))
        return pooled.pow(1.0 / self.p)


class TorchCosPlace(tnn.Module):
    """CosPlace's ``GeoLocalizationNet`` for a ResNet: ``backbone`` = torchvision ResNet
    ``children()[:-2]``, ``aggregation`` = L2Norm, GeM, Flatten, Linear(C, D), L2Norm.

    ``forward(x, return_features=True)`` also returns the backbone map averaged over space (the
    input of a GRL discriminator attached before aggregation, thesis §4.3).
    """

    def __init__(self, depth: int = 18, fc_output_dim: int = 512):
        super().__init__()
        import torchvision

        resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        self.backbone = tnn.Sequential(*list(resnet.children())[:-2])
        channels = 512 if depth in (18, 34) else 2048
        self.aggregation = tnn.Sequential(L2Norm(), GeM(), tnn.Flatten(), tnn.Linear(channels, fc_output_dim), L2Norm())

    def forward(self, x, return_features: bool = False):
        feature_map = self.backbone(x)
        descriptors = self.aggregation(feature_map)
        if return_features:
            return descriptors, feature_map.mean(dim=(2, 3))
        return descriptors

    def freeze_up_to_layer2(self) -> None:
        """CosPlace's default freezing: conv1, bn1, layer1, layer2 get ``requires_grad=False``."""
        for index in range(6):  # 0 conv1, 1 bn1, 2 relu, 3 maxpool, 4 layer1, 5 layer2
            for p in self.backbone[index].parameters():
                p.requires_grad = False


def randomise_batchnorm_(model: tnn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and affine weights, so eval-mode parity is a real check."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, tnn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))


def numpy_state_dict(module: tnn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def cosplace_pair(name: str, seed: int = 0):
    """(PyTorch CosPlace model, jaxvpr model config, jaxvpr variables) with the same weights."""
    cfg = model_config(name)
    depth = int(cfg.backbone[len("resnet"):])
    torch.manual_seed(seed)
    torch_model = TorchCosPlace(depth, cfg.fc_output_dim)
    randomise_batchnorm_(torch_model, seed)
    variables = torch_to_variables(numpy_state_dict(torch_model), cfg)
    return torch_model, cfg, variables


# ----------------------------------------------------------------------------- PyTorch DINOv2 + SALAD
class TorchSalad(tnn.Module):
    """SALAD aggregation (Izquierdo & Civera, CVPR 2024) with the checkpoint's module names.

    Scores S (m x n) and local features f (l x n) from two 1x1-conv MLPs, a dustbin row of the
    scalar ``dust_bin``, 3 log-domain Sinkhorn iterations with marginals
    ``a = [1]*m + [n - m]``, ``b = [1]*n`` (both / (m + n)), assignment P = exp(log P) (m + n)
    without the dustbin row, V = f P^T (l x m) L2-normalised per cluster, flattened l-major,
    after the L2-normalised global token; the whole vector L2-normalised.
    """

    def __init__(self, channels=768, clusters=64, cluster_dim=128, token_dim=256, hidden=512, iters=3):
        super().__init__()
        self.clusters, self.iters = clusters, iters
        self.token_features = tnn.Sequential(tnn.Linear(channels, hidden), tnn.ReLU(), tnn.Linear(hidden, token_dim))
        self.cluster_features = tnn.Sequential(
            tnn.Conv2d(channels, hidden, 1), tnn.Identity(), tnn.ReLU(), tnn.Conv2d(hidden, cluster_dim, 1))
        self.score = tnn.Sequential(
            tnn.Conv2d(channels, hidden, 1), tnn.Identity(), tnn.ReLU(), tnn.Conv2d(hidden, clusters, 1))
        self.dust_bin = tnn.Parameter(torch.tensor(1.0))

    def forward(self, feature_map, cls_token):
        b, dev = feature_map.shape[0], feature_map.device
        f = self.cluster_features(feature_map).flatten(2)  # (B, l, n)
        s = self.score(feature_map).flatten(2)  # (B, m, n)
        m, n = s.shape[1], s.shape[2]
        s = torch.cat([s, self.dust_bin.expand(b, 1, n)], dim=1)  # (B, m + 1, n)
        log_norm = -math.log(m + n)
        log_a = torch.full((m + 1,), log_norm, device=dev)  # on the input's device: runs on CUDA too
        log_a[-1] += math.log(n - m)
        log_b = torch.full((n,), log_norm, device=dev)
        u, v = torch.zeros(b, m + 1, device=dev), torch.zeros(b, n, device=dev)
        for _ in range(self.iters):
            u = log_a - torch.logsumexp(s + v[:, None, :], dim=2)
            v = log_b - torch.logsumexp(s + u[:, :, None], dim=1)
        assignment = torch.exp(s + u[:, :, None] + v[:, None, :] - log_norm)[:, :m]  # (B, m, n)
        clusters = F.normalize(torch.einsum("bmn,bln->blm", assignment, f), dim=1).flatten(1)
        token = F.normalize(self.token_features(cls_token), dim=-1)
        return F.normalize(torch.cat([token, clusters], dim=-1), dim=-1)


def _official_pos_encoding(self, embeddings, height, width):
    """DINOv2's position-embedding resampling (bicubic, scale factor (grid + 0.1) / 37), the one
    jaxvpr reproduces; installed on the Hugging Face embeddings, which resample to ``size``."""
    pos = self.position_embeddings
    side = int(math.sqrt(pos.shape[1] - 1))
    h, w = height // 14, width // 14
    if (h, w) == (side, side):
        return pos
    grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic",
                         align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)


class TorchDinoSalad(tnn.Module):
    """Hugging Face ``Dinov2Model`` (final LayerNorm included) -> patch map + class token -> SALAD."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        tokens = self.backbone(pixel_values=x).last_hidden_state
        b, _, h, w = x.shape
        patch_map = tokens[:, 1:].reshape(b, h // 14, w // 14, -1).permute(0, 3, 1, 2)
        return self.head(patch_map, tokens[:, 0])


def salad_pair(name: str = "salad_dinov2_vitb14", seed: int = 0):
    """(PyTorch DINOv2-B/14 + SALAD, jaxvpr config, jaxvpr variables) with the same weights."""
    import transformers

    from jaxvpr.convert.dinov2 import hf_dinov2_to_official

    cfg = model_config(name)
    torch.manual_seed(seed)
    hf_cfg = transformers.Dinov2Config(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, image_size=518,
        patch_size=14, layerscale_value=1.0, layer_norm_eps=1e-6, hidden_act="gelu", attn_implementation="sdpa")
    backbone = transformers.Dinov2Model(hf_cfg)
    backbone.embeddings.interpolate_pos_encoding = _official_pos_encoding.__get__(backbone.embeddings)
    head = TorchSalad(768, cfg.num_clusters, cfg.cluster_dim, cfg.token_dim)
    with torch.no_grad():  # scores far from uniform, so the transport plan matters in the check
        head.score[3].weight.mul_(5.0)
    torch_model = TorchDinoSalad(backbone, head)
    official = hf_dinov2_to_official(numpy_state_dict(backbone))
    state = {f"backbone.model.{k}": v for k, v in official.items()}
    state.update(numpy_state_dict(head, "aggregator."))
    return torch_model, cfg, torch_to_variables(state, cfg)


# ----------------------------------------------------------------------------- PyTorch OpenIBL (SFRS)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's constants
OPENIBL_MEAN = (0.48502, 0.45796, 0.40760)  # OpenIBL's Normalize(mean, std=[1/255] * 3)


def openibl_input(images_nhwc: np.ndarray) -> np.ndarray:
    """ImageNet-normalised NHWC images -> what OpenIBL feeds VGG16: NCHW, RGB in 0-255 minus the mean
    (``ToTensor`` then ``Normalize(OPENIBL_MEAN, std=[1/255] * 3)`` of the same picture)."""
    rgb = images_nhwc * np.float32(IMAGENET_STD) + np.float32(IMAGENET_MEAN)
    return np.ascontiguousarray(((rgb - np.float32(OPENIBL_MEAN)) * 255.0).transpose(0, 3, 1, 2), np.float32)


class OpenIBLNetVLAD(tnn.Module):
    """OpenIBL's ``NetVLAD`` (``ibl/models/netvlad.py``; Arandjelovic et al. eq. 1-2): L2 over channels,
    softmax over K of a 1x1 conv, explicit residuals x_i - c_k weighted and summed -> (N, K, C)."""

    def __init__(self, num_clusters: int = 64, dim: int = 512):
        super().__init__()
        self.conv = tnn.Conv2d(dim, num_clusters, kernel_size=1, bias=False)
        self.centroids = tnn.Parameter(torch.rand(num_clusters, dim))

    def forward(self, x):
        n, c = x.shape[:2]
        x = F.normalize(x, p=2, dim=1)
        soft_assign = F.softmax(self.conv(x).view(n, self.centroids.shape[0], -1), dim=1)  # (N, K, HW)
        x_flat = x.view(n, c, -1)
        residual = x_flat[:, None] - self.centroids[None, :, :, None]  # (N, K, C, HW)
        return (residual * soft_assign[:, :, None]).sum(dim=-1)


class OpenIBLVGG(tnn.Module):
    """``ibl/models/vgg.py``: ``base`` = torchvision ``vgg16().features`` without its last ReLU and
    max-pool (conv5_3 output), built from torchvision's ``make_layers(cfgs['D'])`` -- the same
    layers ``vgg16().features`` holds, without allocating the 120M-parameter classifier."""

    def __init__(self):
        super().__init__()
        import torchvision

        features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
        self.base = tnn.Sequential(*list(features.children())[:-2])


class OpenIBLEmbedNetPCA(tnn.Module):
    """OpenIBL's ``EmbedNetPCA`` (SFRS, Ge et al., ECCV 2020): VGG16 conv5_3 -> NetVLAD -> intra-L2,
    flatten k-major, L2 -> 1x1 conv ``pca_layer`` (K*C -> pca_dim, with bias) -> L2."""

    def __init__(self, num_clusters: int = 64, pca_dim: int = 4096):
        super().__init__()
        self.base_model = OpenIBLVGG()
        self.net_vlad = OpenIBLNetVLAD(num_clusters, 512)
        self.pca_layer = tnn.Conv2d(num_clusters * 512, pca_dim, kernel_size=1)

    def forward(self, x):
        vlad = F.normalize(self.net_vlad(self.base_model.base(x)), p=2, dim=2).view(x.shape[0], -1)
        vlad = F.normalize(vlad, p=2, dim=1)
        return F.normalize(self.pca_layer(vlad[:, :, None, None]).flatten(1), p=2, dim=-1)


def sfrs_pair(name: str, images_nchw: np.ndarray, seed: int = 0):
    """(PyTorch OpenIBL ``EmbedNetPCA``, jaxvpr config, jaxvpr variables) with the same weights.

    Random weights, chosen so that descriptors depend on the image (with PyTorch's default init and
    ``torch.rand`` centroids of norm ~13 the residuals are ~ -c_k and every image gets nearly the same
    descriptor, which would make the comparison weak): VGG convs Kaiming (fan-in), the first divided
    by 60 (inputs in 0-255 minus the mean, std ~60 here), biases N(0, 0.01); NetVLAD initialised as
    the VG benchmark / OpenIBL do from local features -- centroids near the L2-normalised conv5_3
    features of the first two timed images (norm ~0.85), assignment conv 30 x the unit centroids;
    the PCA layer keeps PyTorch's default init.
    """
    cfg = model_config(name)
    torch.manual_seed(seed)
    net = OpenIBLEmbedNetPCA(cfg.num_clusters, cfg.pca_dim).eval()
    with torch.no_grad():
        for m in net.base_model.base:
            if isinstance(m, tnn.Conv2d):
                tnn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.in_channels == 3:
                    m.weight.div_(60.0)
                m.bias.normal_(0.0, 0.01)
        features = net.base_model.base(torch.from_numpy(images_nchw[:2]))
        local = F.normalize(features, p=2, dim=1).permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        gen = torch.Generator().manual_seed(seed)
        k, c = net.net_vlad.centroids.shape
        picks = (torch.randperm(local.shape[0], generator=gen)[:k] if local.shape[0] >= k
                 else torch.randint(local.shape[0], (k,), generator=gen))
        centroids = 0.8 * local[picks] + 0.3 * torch.randn(k, c, generator=gen) / math.sqrt(c)
        net.net_vlad.centroids.copy_(centroids)
        net.net_vlad.conv.weight.copy_(30.0 * F.normalize(centroids, p=2, dim=1)[:, :, None, None])
    return net, cfg, torch_to_variables(numpy_state_dict(net), cfg)


# ----------------------------------------------------------------------------- PyTorch dirtorch (AP-GeM)
class DirtorchRMAC(tnn.Module):
    """dirtorch's ``resnet101_rmac`` with GeM pooling (AP-GeM, Revaud et al., ICCV 2019): the torchvision
    ResNet modules under their own names, ``adpool`` = GeM (Radenovic et al. eq. 3, one p, clamp 1e-6)
    without L2 before it, ``fc``, L2 -- then the ``Landmarks_clean`` PCA whitening as dirtorch applies
    it (scikit-learn ``PCA.transform`` with exponent 0.25): ``(x - mean) components^T /
    explained_variance^0.25``, L2. The whitening arrays are buffers (``whitening_*``), not checkpoint
    tensors; :func:`apgem_pair` hands them to the converter as ``whitening.*``."""

    def __init__(self, depth: int = 101, out_dim: int = 2048, power: float = 0.25):
        super().__init__()
        import torchvision

        resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(resnet, name))
        self.adpool = GeM()
        self.fc = tnn.Linear(resnet.fc.in_features, out_dim)
        self.power = power
        self.register_buffer("whitening_mean", torch.zeros(out_dim), persistent=False)
        self.register_buffer("whitening_components", torch.eye(out_dim), persistent=False)
        self.register_buffer("whitening_explained_variance", torch.ones(out_dim), persistent=False)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.normalize(self.fc(self.adpool(x).flatten(1)), p=2, dim=-1)
        x = (x - self.whitening_mean) @ self.whitening_components.T / self.whitening_explained_variance ** self.power
        return F.normalize(x, p=2, dim=-1)


def calibrate_batchnorm_(model: tnn.Module, images_nchw: torch.Tensor) -> None:
    """BatchNorm running statistics = those of ``images_nchw`` (one train-mode pass, cumulative
    average), affine weights kept. Through ResNet-101's 33 blocks, random running statistics leave
    descriptors that hardly depend on the image (cosine ~0.99995 between two images); calibrated
    ones, like trained ones, keep activations normalised (cosine ~0.9 at 64 x 64)."""
    norms = [m for m in model.modules() if isinstance(m, tnn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(images_nchw)
    for m in norms:
        m.momentum = 0.1
    model.eval()


def apgem_pair(name: str, images_nchw: np.ndarray, seed: int = 0):
    """(PyTorch dirtorch AP-GeM + whitening, jaxvpr config, jaxvpr variables) with the same weights.

    Random weights and BatchNorm affine parameters, running statistics calibrated on the first two
    timed images (:func:`calibrate_batchnorm_`); a random whitening (components with rows of norm
    ~1, decreasing variances in [1e-4, 1e-2], the order of magnitude of the Landmarks_clean PCA's).
    """
    cfg = model_config(name)
    depth = int(cfg.backbone[len("resnet"):])
    torch.manual_seed(seed)
    net = DirtorchRMAC(depth, cfg.fc_output_dim)
    randomise_batchnorm_(net, seed)
    calibrate_batchnorm_(net, torch.from_numpy(images_nchw[:2]))
    dim, gen = cfg.fc_output_dim, torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        net.whitening_mean.copy_(0.02 * torch.randn(dim, generator=gen))
        net.whitening_components.copy_(torch.randn(dim, dim, generator=gen) / math.sqrt(dim))
        net.whitening_explained_variance.copy_((1e-4 + 1e-2 * torch.rand(dim, generator=gen)).sort(descending=True)[0])
    state = numpy_state_dict(net)
    for key in ("mean", "components", "explained_variance"):
        state[f"whitening.{key}"] = getattr(net, f"whitening_{key}").numpy()
    return net, cfg, torch_to_variables(state, cfg)


# ----------------------------------------------------------------------------- PyTorch DINOv2 + AnyLoc-VLAD
class TorchAnyLoc(tnn.Module):
    """AnyLoc-VLAD-DINOv2 (Keetha et al., RA-L 2023) on a Hugging Face ``Dinov2Model``, as the released
    ``AnyLoc/DINO`` code computes it (``dinov2_extractor.py``, ``utilities.py`` ``VLAD``):

    local descriptors = the value facet of block ``layer`` (that block's value projection of its
    ``norm1`` input; AnyLoc hooks the third of the fused ``qkv``), class token dropped, L2 per patch;
    labels = argmax cosine similarity to the L2-normalised centres; per image and cluster the sum of
    the residuals x_i - c_k (centre as stored) over its members (a loop over clusters, as
    ``VLAD.generate``), intra-L2, flatten cluster-major, global L2. Blocks after ``layer`` and the
    rest of block ``layer`` are not run.
    """

    def __init__(self, backbone, layer: int, num_clusters: int):
        super().__init__()
        self.backbone, self.layer = backbone, layer
        self.register_buffer("centres", torch.zeros(num_clusters, backbone.config.hidden_size), persistent=False)

    def local_descriptors(self, x):
        hidden = self.backbone.embeddings(x)
        for block in self.backbone.encoder.layer[: self.layer]:
            out = block(hidden)
            hidden = out[0] if isinstance(out, tuple) else out  # older transformers return tuples
        block = self.backbone.encoder.layer[self.layer]
        attention = block.attention
        value = getattr(attention, "v_proj", None) or attention.attention.value  # transformers >= 5 / older
        return F.normalize(value(block.norm1(hidden))[:, 1:], p=2, dim=-1)

    def forward(self, x):
        descriptors = self.local_descriptors(x)  # (B, N, C)
        centres = self.centres
        labels = torch.argmax(descriptors @ F.normalize(centres, p=2, dim=1).T, dim=-1)  # (B, N)
        out = []
        for desc, lab in zip(descriptors, labels):
            residuals = desc[:, None, :] - centres[None]  # (N, K, C)
            vlad = torch.zeros_like(centres)
            for k in range(centres.shape[0]):
                members = lab == k
                if members.any():
                    vlad[k] = residuals[members, k].sum(dim=0)
            out.append(F.normalize(F.normalize(vlad, p=2, dim=1).flatten(), p=2, dim=0))
        return torch.stack(out)


def anyloc_pair(name: str, images_nchw: torch.Tensor, device: torch.device, seed: int = 0):
    """(PyTorch DINOv2 ViT-G/14 cut at block ``layer`` + AnyLoc-VLAD, jaxvpr config, jaxvpr variables).

    The Hugging Face model has the ViT-G/14 config (width 1536, 24 heads, SwiGLU FFN of 4096, layer
    scale) with ``layer + 1`` blocks (0..31 for the published model: the 8 later blocks are never run,
    so they are never made), random weights (transformers' init), the official 0.1-offset
    position-embedding interpolation installed. Centres: 32 patch descriptors of the timed images,
    shrunk to norm ~0.76 with noise (like k-means means of unit vectors), so that assignments are
    not near-ties between random directions; the smallest top-2 cosine gap is printed on stderr (a
    gap below float32 noise could flip one patch's cluster between the two frameworks).

    Memory (ViT-G, 32 blocks, float32): 3.7 GB of PyTorch weights, the converted copy (3.6 GB) and,
    while converting, the fused qkv / w12 concatenations (2.5 GB, freed afterwards). The pass that
    picks the centres runs the PyTorch model once, so the table's "PyTorch 1st call" is its second.
    """
    import transformers

    from jaxvpr.convert.dinov2 import hf_dinov2_to_official

    cfg = model_config(name)
    width, heads = {"vits14": (384, 6), "vitb14": (768, 12), "vitl14": (1024, 16), "vitg14": (1536, 24)}[
        cfg.backbone.split("_")[1]]
    torch.manual_seed(seed)
    hf_cfg = transformers.Dinov2Config(
        hidden_size=width, num_hidden_layers=cfg.layer + 1, num_attention_heads=heads, mlp_ratio=4,
        use_swiglu_ffn=cfg.backbone == "dinov2_vitg14", image_size=518, patch_size=14, layerscale_value=1.0,
        layer_norm_eps=1e-6, hidden_act="gelu", attn_implementation="sdpa")
    backbone = transformers.Dinov2Model(hf_cfg)
    backbone.embeddings.interpolate_pos_encoding = _official_pos_encoding.__get__(backbone.embeddings)
    net = TorchAnyLoc(backbone, cfg.layer, cfg.num_clusters).eval().to(device)

    with torch.inference_mode():
        unit = net.local_descriptors(images_nchw.to(device)).flatten(0, 1).float().cpu()  # (B*N, C)
    if unit.shape[0] < cfg.num_clusters:
        raise SystemExit(f"{name}: the centres are picked among the timed batch's {unit.shape[0]} patches, fewer "
                         f"than {cfg.num_clusters}; use a larger size or batch (224 gives 16 x 16 patches per image).")
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(unit.shape[0], generator=gen)[: cfg.num_clusters]
    centres = 0.7 * unit[picks] + 0.3 * torch.randn(cfg.num_clusters, width, generator=gen) / math.sqrt(width)
    net.centres.copy_(centres.to(device))
    cosines = (unit @ F.normalize(centres, dim=1).T).topk(2, dim=1).values
    print(f"    {name}: smallest top-2 cosine gap over {unit.shape[0]} patches "
          f"{float((cosines[:, 0] - cosines[:, 1]).min()):.1e}", file=sys.stderr, flush=True)

    official = hf_dinov2_to_official(numpy_state_dict(backbone))
    official["c_centers"] = centres.numpy()
    # strict=False: the final LayerNorm and the unused part of block `layer` (attn.proj, norm2, mlp,
    # layer scales) are in the state dict but not in the model; missing or mis-shaped tensors still raise.
    variables = torch_to_variables(official, cfg, strict=False)
    del official
    return net, cfg, variables


# ----------------------------------------------------------------------------- the benchmark
@dataclass
class Row:
    model: str
    height: int
    width: int
    batch: int


def parse_row(text: str) -> Row:
    """``model:size:batch`` with ``size`` = ``S`` (S x S) or ``HxW`` (e.g. ``sfrs_vgg16_4096:480x640:4``)."""
    try:
        model, size, batch = text.split(":")
        height, width = size.split("x") if "x" in size else (size, size)
        return Row(model, int(height), int(width), int(batch))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a row is model:size:batch with size S or HxW (e.g. cosplace_resnet18_512:224:16 or "
            f"sfrs_vgg16_4096:480x640:4), got {text!r}")


REFERENCES = ("cosplace_resnet*", "salad_dinov2_vitb14", "sfrs_vgg16_4096", "apgem_resnet101_2048",
              "anyloc_dinov2_vitg14_*")


def reference_pair(model: str, images: np.ndarray, device: torch.device):
    """(PyTorch model, jaxvpr config, jaxvpr variables, PyTorch input NCHW) for a row's model.

    ``images`` are the jaxvpr input (NHWC, ImageNet-normalised); the PyTorch input is the same
    images in the reference's own normalisation (OpenIBL's for SFRS, ImageNet's otherwise).
    """
    nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    if model.startswith("cosplace_resnet"):
        return (*cosplace_pair(model), nchw)
    if model == "salad_dinov2_vitb14":
        return (*salad_pair(model), nchw)
    if model == "sfrs_vgg16_4096":
        torch_input = openibl_input(images)
        return (*sfrs_pair(model, torch_input), torch_input)
    if model == "apgem_resnet101_2048":
        return (*apgem_pair(model, nchw), nchw)
    if model.startswith("anyloc_dinov2_vitg14_"):  # one network; the domains differ only in their vocabulary
        return (*anyloc_pair(model, torch.from_numpy(nchw), device), nchw)
    raise SystemExit(f"bench/inference.py has a PyTorch reference only for {', '.join(REFERENCES)}, not {model!r}.")


def to_device(variables: dict) -> dict:
    """``jax.device_put`` leaf by leaf, dropping each host array as soon as it is copied (keeps the peak
    memory of ViT-G at one copy of the weights, not two)."""
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    del variables
    for i in range(len(leaves)):
        leaves[i] = jax.device_put(leaves[i])
        leaves[i].block_until_ready()
    return jax.tree_util.tree_unflatten(treedef, leaves)


def bench_row(row: Row, iters: int, rounds: int, device: torch.device) -> dict:
    images = np.random.default_rng(0).standard_normal((row.batch, row.height, row.width, 3)).astype(np.float32)
    torch_model, cfg, variables, torch_input = reference_pair(row.model, images, device)
    torch_model.eval().to(device)
    model = build_model(cfg)

    x_jax = jax.device_put(jnp.asarray(images))
    variables = to_device(variables)
    jitted = jax.jit(lambda v, x: model.apply(v, x, train=False))
    compiled, compile_s = timed(lambda: jitted.lower(variables, x_jax).compile())
    jax_desc = np.asarray(compiled(variables, x_jax).block_until_ready())  # warm-up

    x_torch = torch.from_numpy(torch_input).to(device)

    def torch_call():
        with torch.inference_mode():
            out = torch_model(x_torch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    torch_desc, torch_first_s = timed(torch_call)  # warm-up
    torch_desc = torch_desc.float().cpu().numpy()
    max_diff = float(np.abs(jax_desc - torch_desc).max())

    rates = interleaved_throughput(
        {"jax": lambda: compiled(variables, x_jax).block_until_ready(), "torch": torch_call},
        row.batch, iters, rounds)
    return dict(row=row, jax=rates["jax"], torch=rates["torch"], compile_s=compile_s,
                torch_first_s=torch_first_s, max_diff=max_diff, dim=jax_desc.shape[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS),
                        help="model:size:batch rows, separated by spaces or commas (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=1, help="calls per side per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--torch-device", default="cpu",
                        help="where PyTorch runs (cpu, or cuda to compare with jaxvpr on a GPU)")
    args = parser.parse_args(argv)
    try:
        rows = [parse_row(text) for group in args.rows for text in group.split(",") if text]
    except argparse.ArgumentTypeError as err:
        parser.error(f"--rows: {err}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.torch_device)

    print(machine_line())
    print(f"PyTorch on {device}; rounds {args.rounds} x {args.iters} calls per side, interleaved; "
          "medians over rounds\n")
    results = []
    for row in rows:
        print(f"... {row.model} {row.height}x{row.width} batch {row.batch}", file=sys.stderr, flush=True)
        results.append(bench_row(row, args.iters, args.rounds, device))

    print("| model | input | batch | jaxvpr img/s (min-max) | PyTorch img/s (min-max) | jax/torch "
          "| jaxvpr compile s | PyTorch 1st call s | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        row, j, t = r["row"], median(r["jax"]), median(r["torch"])
        print(f"| {row.model} | {row.height}x{row.width} | {row.batch} | {rate(j)} ({rate_spread(r['jax'])}) "
              f"| {rate(t)} ({rate_spread(r['torch'])}) | {j / t:.2f} | {r['compile_s']:.1f} "
              f"| {r['torch_first_s']:.1f} | {r['max_diff']:.1e} |")
    print("\n" + load_line())


if __name__ == "__main__":
    main()
