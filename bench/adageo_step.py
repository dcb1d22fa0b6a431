"""AdAGeo phase-2 training step (triplets + 3-domain GRL): jaxvpr vs a PyTorch reference of AdAGeo's step.

    python bench/adageo_step.py                                   # 4 queries x 12 + 8 GRL images at 128 x 128
    python bench/adageo_step.py --queries 2 --steps 3 --warmup 1  # lighter, for 2 CPU cores
    python bench/adageo_step.py --height 384 --width 512          # SVOX's size (a GPU)
    python bench/adageo_step.py --json adageo.json                # also save the rows

One optimisation step of AdAGeo's phase 2 (``jaxvpr/train/adageo.py``; recipes_facts.md §A.2.4-A.2.8)
on a pre-made batch already on the device (no input pipeline, no mining):

* a train-mode forward (BatchNorm batch statistics) of ``--queries`` x (1 query + 1 positive + 10
  negatives) random normalised images of ``--height`` x ``--width`` through ResNet-18 (noBN last
  block) + CAM attention + NetVLAD-64; triplet loss ``TripletMarginLoss(margin=sqrt(0.1), p=2,
  reduction="sum")`` over the queries x 10 (q, p, n_j) triplets divided by their number (every
  negative counts: jaxvpr gets ``neg_mask`` all True);
* a second train-mode forward of 8 GRL images through the backbone, average pool of the post-BN
  layer4 map, gradient reversal (x -1), discriminator Linear(512, 50)-ReLU-Linear(50, 20)-ReLU-
  Linear(20, 3), cross-entropy (mean) x 0.1 added to the loss;
* one Adam step (lr 1e-5) on layer3, layer4, the CAM's fc, NetVLAD and the discriminator
  (conv1/bn1/layer1/layer2 frozen).

Sides:

* jaxvpr: the recipe's own pieces -- ``adageo_config()`` with ``train.batch_size = --queries``, model
  config ``run_model_config`` (``trainable_stages`` 2), ``make_optimizer`` + ``optax.adam(grl_lr)``,
  ``DomainDiscriminator(n_domains=3)``, ``make_train_step(..., frozen_params_mask(model_cfg),
  grl_on=True)`` jitted once (state donated); "compile s" is ``lower`` + ``compile``.
* PyTorch: AdAGeo's step (``src/train.py``, §A.2.8) on a torchvision ``resnet18(num_classes=365)``
  (the Places365 layout) with AdAGeo's noBN last block and AttenNetVLAD written out below:
  ``model.train()``, frozen parameters ``requires_grad=False``, ``zero_grad`` -> triplet forward ->
  triplet loss -> ``backward`` -> GRL forward -> 0.1 x CE -> ``backward`` (gradients accumulate) ->
  one ``Adam(lr=1e-5)`` step over the model and the discriminator.

Both sides start from the same weights: the random torchvision ResNet-18 is saved to a temporary
``.pth`` and loaded into jaxvpr with ``load_places365`` (backbone + the CAM's fc); NetVLAD's
centroids and 1x1 conv and the discriminator are jaxvpr's initialisation copied into PyTorch. The
images are the same random values (NHWC for jaxvpr, NCHW for PyTorch). Before timing, the bench
checks the step-1 losses of both sides and the NetVLAD descriptors of the first (train-mode)
forward: jaxvpr's come from a separate train-mode ``apply`` of the starting variables, PyTorch's
from its first step. With random weights the descriptors of all images lie close together (the
triplet term is ~ the margin), so the descriptors' difference is the sharper of the two checks.

Timing: ``--warmup`` untimed steps per side (jaxvpr's first runs the compiled step), then
``--steps`` rounds of one jaxvpr step (``jax.block_until_ready``) and one PyTorch step
(``torch.cuda.synchronize`` on a GPU), interleaved so a change of the machine's load hits both
sides; median images/s over rounds (min-max), images = queries x 12 + 8 GRL images per step.
PyTorch uses ``torch.set_num_threads(--threads)``; GPU: PyTorch on CUDA when available
(``--device``), jaxvpr on ``jax.devices()``, both float32 with each framework's default precision.

On a shared CPU, read the ratio with care: PyTorch's OpenMP threads slow down badly when the cores
are oversubscribed (2 cores at load ~6: ``--threads 2`` ran PyTorch's step 6.5x slower than
``--threads 1``, while jaxvpr's was unchanged); run with ``--threads 1`` as well there.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn as tnn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import (  # noqa: E402
    interleaved_throughput, load_line, machine_line, median, spread, sync, timed, warm_up)

from jaxvpr.models import build_model, init_variables  # noqa: E402
from jaxvpr.models.discriminator import DomainDiscriminator  # noqa: E402
from jaxvpr.train.adageo import AdAGeoState, load_places365, make_train_step  # noqa: E402
from jaxvpr.train.config import adageo_config  # noqa: E402
from jaxvpr.train.loop import frozen_params_mask, run_model_config  # noqa: E402
from jaxvpr.train.triplet import make_optimizer  # noqa: E402

NUM_BATCHES = 2  # distinct pre-made step batches, cycled
NEGATIVES = 10
N_DOMAINS = 3


# ----------------------------------------------------------------------------- PyTorch reference
class GradReverse(torch.autograd.Function):
    """Identity forward, gradient x -1 backward (AdAGeo ``src/grl_util.py``)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class TorchAdAGeo(tnn.Module):
    """AdAGeo's network (``src/network.py`` + ``src/netvlad.py``): a torchvision ResNet-18 whose last
    block also gives its pre-BN map, CAM attention from the Places365 fc, NetVLAD-64 (no conv bias),
    and the GRL discriminator on the pooled post-BN layer4 map."""

    def __init__(self, resnet: tnn.Module, num_clusters: int = 64, dim: int = 512):
        super().__init__()
        self.resnet = resnet
        self.num_clusters = num_clusters
        self.conv = tnn.Conv2d(dim, num_clusters, kernel_size=1, bias=False)
        self.centroids = tnn.Parameter(torch.rand(num_clusters, dim))
        self.discriminator = tnn.Sequential(tnn.Linear(dim, 50), tnn.ReLU(), tnn.Linear(50, 20), tnn.ReLU(),
                                            tnn.Linear(20, N_DOMAINS))

    def freeze_up_to_layer2(self) -> None:
        r = self.resnet
        for module in (r.conv1, r.bn1, r.layer1, r.layer2):
            for p in module.parameters():
                p.requires_grad = False

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(feat_bn, feat_nbn) of layer4, NCHW."""
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        x = r.layer4[0](r.layer3(r.layer2(r.layer1(x))))
        block = r.layer4[1]  # noBN: conv2(h) + shortcut, before bn2 and the ReLU
        conv2 = block.conv2(block.relu(block.bn1(block.conv1(x))))
        return F.relu(block.bn2(conv2) + x), conv2 + x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat_bn, feat_nbn = self.maps(x)
        b, c, h, w = feat_bn.shape
        fc = self.resnet.fc
        logits = fc(torch.flatten(F.adaptive_avg_pool2d(feat_bn, 1), 1))
        cls = logits.sort(1, True)[1][:, 0]  # AdAGeo: the top-1 class
        cam = torch.bmm(fc.weight[cls].unsqueeze(1), feat_bn.view(b, c, h * w))
        attention = F.softmax(cam.squeeze(1), dim=1).view(b, 1, h, w)
        feat = F.normalize(feat_nbn * attention, p=2, dim=1)
        assign = F.softmax(self.conv(feat).view(b, self.num_clusters, -1), dim=1)  # (B, K, HW)
        flat = feat.view(b, c, -1)
        vlad = torch.bmm(assign, flat.transpose(1, 2)) - assign.sum(-1, keepdim=True) * self.centroids[None]
        vlad = F.normalize(vlad, p=2, dim=2).view(b, -1)
        return F.normalize(vlad, p=2, dim=1)

    def domain_logits(self, x: torch.Tensor) -> torch.Tensor:
        feat_bn, _ = self.maps(x)
        pooled = torch.flatten(F.adaptive_avg_pool2d(feat_bn, 1), 1)
        return self.discriminator(GradReverse.apply(pooled))


class TorchAdAGeoStep:
    """AdAGeo's optimisation step (``src/train.py:69-107``, recipes_facts §A.2.8), every negative counted."""

    def __init__(self, model: TorchAdAGeo, queries: int, lr: float, margin: float, grl_weight: float, device):
        self.model, self.queries, self.grl_weight, self.device = model, queries, grl_weight, device
        self.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        self.criterion = tnn.TripletMarginLoss(margin=margin, p=2, reduction="sum")
        self.last_descriptors = None

    def __call__(self, images: torch.Tensor, grl_images: torch.Tensor, grl_domains: torch.Tensor):
        self.model.train()
        self.optimizer.zero_grad()
        desc = self.model(images)
        self.last_descriptors = desc.detach()
        d = desc.view(self.queries, 2 + NEGATIVES, -1)  # rows [q, p, n_1 .. n_10] per query
        triplet = sum(self.criterion(d[:, 0], d[:, 1], d[:, 2 + j]) for j in range(NEGATIVES))
        triplet = triplet / (self.queries * NEGATIVES)
        triplet.backward()
        ce = F.cross_entropy(self.model.domain_logits(grl_images), grl_domains)
        (self.grl_weight * ce).backward()
        self.optimizer.step()
        sync(self.device)
        triplet, ce = float(triplet.detach()), float(ce.detach())
        return triplet + self.grl_weight * ce, triplet, ce


# ----------------------------------------------------------------------------- the same start
def make_pair(config, model_cfg, size: tuple[int, int], seed: int = 0):
    """(PyTorch TorchAdAGeo, jaxvpr variables, discriminator params) with the same weights."""
    import torchvision

    torch.manual_seed(seed)
    resnet = torchvision.models.resnet18(num_classes=365)
    with tempfile.TemporaryDirectory() as tmp:  # the CSAIL Places365 file's layout
        path = os.path.join(tmp, "resnet18_places365.pth.tar")
        torch.save({"state_dict": {f"module.{k}": v for k, v in resnet.state_dict().items()}}, path)
        variables = load_places365(init_variables(model_cfg, jax.random.key(seed), size), path, model_cfg)
    disc = DomainDiscriminator(n_domains=N_DOMAINS)
    disc_params = disc.init(jax.random.key(seed + 11), jnp.zeros((1, 512)))["params"]

    torch_model = TorchAdAGeo(resnet, num_clusters=int(model_cfg.num_clusters))
    head = variables["params"]["head"]["netvlad"]
    with torch.no_grad():
        torch_model.centroids.copy_(torch.from_numpy(np.array(head["centroids"])))
        torch_model.conv.weight.copy_(torch.from_numpy(np.transpose(np.asarray(head["conv"]["kernel"]),
                                                                    (3, 2, 0, 1)).copy()))
        for i, name in zip((0, 2, 4), ("fc1", "fc2", "fc3")):
            layer = torch_model.discriminator[i]
            layer.weight.copy_(torch.from_numpy(np.asarray(disc_params[name]["kernel"]).T.copy()))
            layer.bias.copy_(torch.from_numpy(np.array(disc_params[name]["bias"])))
    torch_model.freeze_up_to_layer2()
    return torch_model, disc, variables, disc_params


def jax_trainable_count(model_cfg, params, disc_params) -> int:
    frozen = jax.tree.leaves(frozen_params_mask(model_cfg))
    model = sum(int(np.size(p)) for p, f in zip(jax.tree.leaves(params), frozen) if not f)
    return model + sum(int(np.size(p)) for p in jax.tree.leaves(disc_params))


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """max over rows of ||a_i - b_i|| / ||b_i||."""
    return float(np.max(np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)))


# ----------------------------------------------------------------------------- the benchmark
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=4, help="queries per step (AdAGeo 4), 12 images each")
    parser.add_argument("--height", type=int, default=128, help="image height (SVOX 384)")
    parser.add_argument("--width", type=int, default=128, help="image width (SVOX 512)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side (interleaved rounds)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--device", default="auto", help="PyTorch device: auto (cuda if available), cpu, cuda[:i]")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the step-1 check runs in it)")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.set_num_threads(args.threads)

    config = adageo_config()
    config.train.batch_size = args.queries
    model_cfg = run_model_config(config)
    a = config.adageo
    grl_batch = int(a.grl_batch_size)
    n_triplet = args.queries * (2 + NEGATIVES)
    n_images = n_triplet + grl_batch
    size = (args.height, args.width)

    torch_model, disc, variables, disc_params = make_pair(config, model_cfg, size)
    torch_model.to(device)
    model = build_model(model_cfg)

    rng = np.random.default_rng(0)
    host = [dict(image=rng.standard_normal((n_triplet, *size, 3), dtype=np.float32),
                 grl_image=rng.standard_normal((grl_batch, *size, 3), dtype=np.float32),
                 grl_domain=rng.integers(0, N_DOMAINS, grl_batch).astype(np.int32),
                 neg_mask=np.ones((args.queries, NEGATIVES), bool)) for _ in range(NUM_BATCHES)]
    jax_batches = [jax.device_put(x) for x in host]
    torch_batches = [(torch.from_numpy(x["image"].transpose(0, 3, 1, 2).copy()).to(device),
                      torch.from_numpy(x["grl_image"].transpose(0, 3, 1, 2).copy()).to(device),
                      torch.from_numpy(x["grl_domain"].astype(np.int64)).to(device)) for x in host]

    # the first forward's descriptors (train mode, the starting weights), for the check
    jax_desc0, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, jax_batches[0]["image"])
    jax_desc0 = np.asarray(jax_desc0)

    # jaxvpr: the recipe's step, jitted once
    params = jax.tree.map(jnp.asarray, variables["params"])
    tx = make_optimizer(config, params, model_cfg)
    disc_tx = optax.adam(float(a.grl_lr))
    state = AdAGeoState(step=jnp.zeros((), jnp.int32), params=params,
                        batch_stats=jax.tree.map(jnp.asarray, variables["batch_stats"]), opt_state=tx.init(params),
                        disc_params=disc_params, disc_opt_state=disc_tx.init(disc_params))
    step_fn = jax.jit(make_train_step(model, disc, tx, disc_tx, config, frozen_params_mask(model_cfg), True),
                      donate_argnums=(0,))
    coeff = jnp.float32(1.0)  # AdAGeo's constant reversal
    lowered, trace_s = timed(functools.partial(step_fn.lower, state, jax_batches[0], coeff))
    compiled, compile_s = timed(lowered.compile)
    torch_step = TorchAdAGeoStep(torch_model, args.queries, float(config.train.lr), float(config.train.margin),
                                 float(a.grl_weight), device)
    trainable = (jax_trainable_count(model_cfg, params, disc_params),
                 sum(p.numel() for p in torch_model.parameters() if p.requires_grad))
    del params, variables

    holder = {"state": state, "jax": [], "torch": [], "torch_desc0": None}
    del state
    counters = {"jax": 0, "torch": 0}

    def jax_call():
        holder["state"], metrics = compiled(holder["state"], jax_batches[counters["jax"] % NUM_BATCHES], coeff)
        jax.block_until_ready(metrics)
        holder["jax"].append((float(metrics["loss"]), float(metrics["triplet_loss"]), float(metrics["domain_ce"])))
        counters["jax"] += 1

    def torch_call():
        holder["torch"].append(torch_step(*torch_batches[counters["torch"] % NUM_BATCHES]))
        if holder["torch_desc0"] is None:
            holder["torch_desc0"] = torch_step.last_descriptors.cpu().numpy()
        counters["torch"] += 1

    header = [machine_line(),
              f"AdAGeo phase-2 step: {args.height}x{args.width}, {args.queries} queries x 12 + {grl_batch} GRL = "
              f"{n_images} images, ResNet-18 (layer3+4 train) + CAM + NetVLAD-64 + 3-domain GRL; PyTorch on "
              f"{device}; {args.warmup} warm-up + {args.steps} timed steps per side, interleaved"]
    print("\n".join(header) + "\n", flush=True)
    first = warm_up({"jax": jax_call, "torch": torch_call}, args.warmup)

    (jl, jt, jc), (tl, tt, tc) = holder["jax"][0], holder["torch"][0]
    desc_rel = relative_difference(jax_desc0, holder["torch_desc0"])
    desc_abs = float(np.abs(jax_desc0 - holder["torch_desc0"]).max())
    loss_rel = abs(jl - tl) / abs(tl)
    print(f"step-1 loss: jaxvpr {jl:.7f} (triplet {jt:.7f} + 0.1 x CE {jc:.7f}), "
          f"PyTorch {tl:.7f} (triplet {tt:.7f} + 0.1 x CE {tc:.7f}); relative difference {loss_rel:.1e}")
    print(f"first forward's NetVLAD descriptors ({jax_desc0.shape[0]} x {jax_desc0.shape[1]}): max relative "
          f"L2 difference per descriptor {desc_rel:.1e}, max abs difference {desc_abs:.1e}")
    if loss_rel > 1e-4 or desc_rel > 1e-4:
        print("WARNING: the two sides disagree by more than 1e-4 relative", flush=True)
    print(flush=True)

    rates = interleaved_throughput({"jax": jax_call, "torch": torch_call}, n_images, 1, args.steps)
    assert counters["jax"] == counters["torch"]
    j, t = median(rates["jax"]), median(rates["torch"])
    last_j, last_t = holder["jax"][-1][0], holder["torch"][-1][0]
    n = len(holder["jax"])
    print("| side | input | images / step | images/s (min-max) | ms / step | compile s | 1st call s "
          f"| loss step 1 / step {n} |")
    print("|---|---|---|---|---|---|---|---|")
    shape = f"{args.height}x{args.width}"
    per_step = f"{args.queries}x12+{grl_batch}={n_images}"
    print(f"| jaxvpr | {shape} | {per_step} | {j:.2f} ({spread(rates['jax'])}) | {1000 * n_images / j:.0f} "
          f"| {trace_s:.1f} + {compile_s:.1f} | {first['jax']:.1f} | {jl:.5f} / {last_j:.5f} |")
    print(f"| PyTorch | {shape} | {per_step} | {t:.2f} ({spread(rates['torch'])}) | {1000 * n_images / t:.0f} "
          f"| - | {first['torch']:.1f} | {tl:.5f} / {last_t:.5f} |")
    print(f"| ratio jaxvpr / PyTorch | | | {j / t:.2f} | | | | |")
    print(f"\ntrainable parameters: jaxvpr {trainable[0]:,}, PyTorch {trainable[1]:,}")
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"peak host RSS {rss_gib:.1f} GiB (both sides, one process)")
    command = " ".join(["python", Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)])
    print(f"\ncommand: {command}\n{load_line()}")
    if args.json:
        args.json.write_text(json.dumps(dict(
            command=command, header=header, jax=rates["jax"], torch=rates["torch"], ratio=j / t,
            trace_s=trace_s, compile_s=compile_s, first_call_s=first, trainable_params=trainable,
            losses={"jax": holder["jax"], "torch": holder["torch"]}, step1_loss_rel_diff=loss_rel,
            desc_rel_diff=desc_rel, desc_abs_diff=desc_abs,
            args={k: str(v) for k, v in vars(args).items()}), indent=1))


if __name__ == "__main__":
    main()
