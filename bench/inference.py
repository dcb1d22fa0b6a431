"""Inference throughput, jaxvpr vs PyTorch, with the same weights, measured in the same run.

    python bench/inference.py                  # default rows, 3-5 minutes on 2 CPU cores
    python bench/inference.py --rows cosplace_resnet50_2048:512:16 --rounds 7 --iters 3

A row ``model:size:batch`` times ``batch`` images of ``size`` x ``size`` pixels through

* jaxvpr: ``jax.jit(lambda v, x: model.apply(v, x, train=False))`` on NHWC input, timed with
  ``block_until_ready``; compile time (``lower(...).compile()``) is reported on its own;
* PyTorch: the anchor's network with the *same* weights, ``eval()`` + ``torch.inference_mode()``
  on NCHW input --
  CosPlace models (``cosplace_resnet18_512``, ``cosplace_resnet50_2048``): torchvision ResNet
  ``children()[:-2]`` + CosPlace's head (L2Norm, GeM, Flatten, Linear, L2Norm), written below;
  SALAD (``salad_dinov2_vitb14``): Hugging Face ``Dinov2Model`` (random ViT-B/14 weights, SDPA
  attention, the official 0.1-offset position-embedding interpolation installed) + the SALAD head
  written below from the paper (log-domain Sinkhorn, 3 iterations, as the released code).

The PyTorch state dict (CosPlace / SALAD checkpoint names) is converted with
``jaxvpr.convert.rules.torch_to_variables``; the table's last column is the largest absolute
difference between the two descriptors of the timed batch (unit-norm descriptors: ~1e-6 expected).

Timing: one warm-up call per side after compilation (excluded), then ``--rounds`` rounds that each
time ``--iters`` calls of jaxvpr and then ``--iters`` calls of PyTorch (interleaved, so a change of
the machine's load hits both sides alike); the table gives the median images/s over rounds and the
ratio jaxvpr / PyTorch of the medians (> 1: jaxvpr is faster). PyTorch uses
``torch.set_num_threads(--threads)`` (default: all cores); XLA's CPU client uses one thread per core
by default (``--xla_cpu_multi_thread_eigen``), i.e. both sides use every core.

Full-size options: larger batches (``:32`` at 224, ``:16`` at 512, ``:8`` for SALAD) and more
rounds (``--rounds 10``) give steadier numbers; each row's memory is about batch x (activation
size), e.g. ResNet-50 at 512 with batch 16 needs ~3 GB per framework.
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
    """Cores, thread settings and the load average, for the header of every table."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPU cores; torch {torch.__version__} with {torch.get_num_threads()} threads; "
            f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device); "
            f"load average {load}")


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


def spread(xs) -> str:
    """``min-max`` of the per-round values, to show how noisy a row was."""
    return f"{min(xs):.1f}-{max(xs):.1f}"


def timed(fn):
    """``(result, seconds)`` of one call."""
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


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


# ----------------------------------------------------------------------------- the benchmark
@dataclass
class Row:
    model: str
    size: int
    batch: int


def parse_row(text: str) -> Row:
    try:
        model, size, batch = text.split(":")
        return Row(model, int(size), int(batch))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a row is model:size:batch (e.g. cosplace_resnet18_512:224:16), got {text!r}")


def bench_row(row: Row, iters: int, rounds: int) -> dict:
    if row.model.startswith("cosplace_resnet"):
        torch_model, cfg, variables = cosplace_pair(row.model)
    elif row.model == "salad_dinov2_vitb14":
        torch_model, cfg, variables = salad_pair(row.model)
    else:
        raise SystemExit(f"bench/inference.py has a PyTorch reference only for cosplace_resnet18_512, "
                         f"cosplace_resnet50_2048 and salad_dinov2_vitb14, not {row.model!r}.")
    torch_model.eval()
    model = build_model(cfg)
    images = np.random.default_rng(0).standard_normal((row.batch, row.size, row.size, 3)).astype(np.float32)

    x_jax = jax.device_put(jnp.asarray(images))
    variables = jax.device_put(variables)
    jitted = jax.jit(lambda v, x: model.apply(v, x, train=False))
    compiled, compile_s = timed(lambda: jitted.lower(variables, x_jax).compile())
    jax_desc = np.asarray(compiled(variables, x_jax).block_until_ready())  # warm-up

    x_torch = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

    def torch_call():
        with torch.inference_mode():
            return torch_model(x_torch)

    torch_desc, torch_first_s = timed(torch_call)  # warm-up
    torch_desc = torch_desc.numpy()
    max_diff = float(np.abs(jax_desc - torch_desc).max())

    rates = interleaved_throughput(
        {"jax": lambda: compiled(variables, x_jax).block_until_ready(), "torch": torch_call},
        row.batch, iters, rounds)
    return dict(row=row, jax=rates["jax"], torch=rates["torch"], compile_s=compile_s,
                torch_first_s=torch_first_s, max_diff=max_diff, dim=jax_desc.shape[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=parse_row, nargs="+", default=[parse_row(r) for r in DEFAULT_ROWS],
                        help="model:size:batch rows (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=1, help="calls per side per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(machine_line())
    print(f"rounds {args.rounds} x {args.iters} calls per side, interleaved; medians over rounds\n")
    results = []
    for row in args.rows:
        print(f"... {row.model} {row.size}x{row.size} batch {row.batch}", file=sys.stderr, flush=True)
        results.append(bench_row(row, args.iters, args.rounds))

    print("| model | input | batch | jaxvpr img/s (min-max) | PyTorch img/s (min-max) | jax/torch "
          "| jaxvpr compile s | PyTorch 1st call s | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        row, j, t = r["row"], median(r["jax"]), median(r["torch"])
        print(f"| {row.model} | {row.size}x{row.size} | {row.batch} | {j:.1f} ({spread(r['jax'])}) "
              f"| {t:.1f} ({spread(r['torch'])}) | {j / t:.2f} | {r['compile_s']:.1f} | {r['torch_first_s']:.1f} "
              f"| {r['max_diff']:.1e} |")
    print("\n" + load_line())


if __name__ == "__main__":
    main()
