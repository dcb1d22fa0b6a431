"""Triplet fine-tuning step and mining-cache extraction, jaxvpr vs the VG benchmark's PyTorch step.

    python bench/triplet_step.py                                   # EigenPlaces R50, 4 x 12 images at 360
    python bench/triplet_step.py --queries 2 --steps 3 --warmup 1  # lighter, for 2 CPU cores
    python bench/triplet_step.py --model salad_dinov2_vitb14       # DINOv2-B/14 + SALAD at 322
    python bench/triplet_step.py --json triplet.json               # also save the rows

Two kinds of work of the triplet recipe (``jaxvpr/train/triplet.py``; recipes_facts.md §B.7, §B.11)
are timed against PyTorch doing the same work in the same run:

1. **the training step** on a pre-made batch of ``--queries`` x (1 query + 1 positive + 10
   negatives) random normalised images of ``--size`` x ``--size`` pixels (default 360 for
   EigenPlaces, the fork's training crop; 322 = 23 x 14 for SALAD), already on the device (no input
   pipeline):

   * jaxvpr: the recipe's own pieces -- model config ``run_model_config(triplet_config())`` (the
     recipe's freezing policy), ``make_optimizer`` (Adam 1e-5 on the trainable parameters),
     ``make_train_step(model, tx, config, frozen_params_mask(model_cfg))`` jitted as
     ``Trainer.jit_step`` jits it (state and batch shardings on a mesh of all devices, state
     donated). "compile s" is ``lower`` + ``compile`` before the first step.
   * PyTorch: the VG benchmark's ``train.py`` step (§B.7) -- ``model.train()`` (BatchNorm statistics
     over all the batch's images, frozen stages included), frozen parameters ``requires_grad=False``,
     ``Adam(model.parameters(), 1e-5)``; one forward of all images; for each negative slot j,
     ``TripletMarginLoss(margin=0.1, p=2, reduction="sum")`` over the queries' (q, p, n_j), summed
     and divided by queries x 10; ``zero_grad``, ``backward``, ``step``.

2. **the mining extraction** (the cache of each refresh): ``--infer-batch`` (16, VG's
   ``infer_batch_size``) host images of the evaluation size, shorter side 360: 360 x 480 (DINOv2:
   sides rounded to multiples of 14, 364 x 476, as ``ShorterSide(360, 14)`` and the fork's wrapper),
   described in eval mode and copied back to the host --
   jaxvpr: ``jaxvpr.evaluate.Describer(model).bind(variables)`` (what ``TripletTrainer.mine`` uses);
   PyTorch: ``model.eval()``, ``torch.no_grad()``, input ``.to(device)``, output ``.cpu()``.

Models (both sides start from the same random weights: the PyTorch state dict converted with
``jaxvpr.convert.rules.torch_to_variables``, BatchNorm statistics randomised, so the step's losses
and the extraction's descriptors can be compared -- shown in the table's last column):

* ``eigenplaces_resnet50_2048`` (default): EigenPlaces' network (§C.3), torchvision ResNet-50
  ``children()[:-2]`` -> L2 -> GeM (p = 3, learnable) -> Linear(2048, 2048) -> L2, conv1..layer2
  frozen (``TorchCosPlace`` of ``bench/inference.py``: CosPlace and EigenPlaces share the network);
* ``salad_dinov2_vitb14``: ``bench/inference.py``'s Hugging Face ``Dinov2Model`` (ViT-B/14, SDPA)
  + SALAD head written from the paper, with the fork's freezing (§B.11): patch/position embeddings,
  class token and blocks 0-7 ``requires_grad=False`` (the SALAD repo runs them under ``no_grad``:
  the same computation), blocks 8-11, the final norm and the head train. SALAD's head dropout is
  the jaxvpr model config's ``dropout`` on both sides (``nn.Dropout`` in PyTorch where the
  checkpoint layout has its slot). The head below differs from ``bench/inference.py``'s only in
  creating its Sinkhorn marginals on the input's device, so it also runs on CUDA.

Timing: ``--warmup`` steps per side (excluded; jaxvpr's first runs the compiled step), then
``--steps`` rounds of one jaxvpr step (``jax.block_until_ready``) and one PyTorch step
(``torch.cuda.synchronize`` on a GPU), interleaved so that a change of the machine's load hits both
sides; likewise 1 warm-up and ``--infer-rounds`` rounds of one extraction batch per side. The table
gives median images/s over rounds (min-max) and the ratio jaxvpr / PyTorch of the medians (> 1:
jaxvpr faster). PyTorch uses ``torch.set_num_threads(--threads)`` (default: all cores); XLA's CPU
client uses all cores.

GPU: ``--device auto`` (default) puts PyTorch on CUDA when available; jaxvpr runs on
``jax.devices()`` (install ``jax[cuda12]``/``jax[cuda13]`` for the GPU). Both sides run in float32
(``train.mixed_precision`` False, the fork's default without ``--use_amp16``) with each framework's
default float32 precision on the GPU (both may use TF32 for some or all matmuls and convolutions there:
check ``torch.backends`` and ``jax_default_matmul_precision`` before reading a GPU ratio).
Full size on an H100: ``python bench/triplet_step.py --steps 20 --warmup 3 --infer-rounds 20``
and the same with ``--model salad_dinov2_vitb14``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn as tnn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import (  # noqa: E402
    TorchCosPlace,
    TorchSalad,
    interleaved_throughput,
    load_line,
    machine_line,
    median,
    numpy_state_dict,
    randomise_batchnorm_,
    salad_pair,
    spread,
    sync,
    timed,
)

from jaxvpr import parallel  # noqa: E402
from jaxvpr.convert.rules import torch_to_variables  # noqa: E402
from jaxvpr.evaluate import Describer  # noqa: E402
from jaxvpr.models import build_model  # noqa: E402
from jaxvpr.models.registry import backbone_family  # noqa: E402
from jaxvpr.train.config import triplet_config  # noqa: E402
from jaxvpr.train.loop import frozen_params_mask, run_model_config  # noqa: E402
from jaxvpr.train.triplet import TripletState, make_optimizer, make_train_step  # noqa: E402

TRAIN_SIZES = {"eigenplaces_resnet50_2048": 360, "salad_dinov2_vitb14": 322}
EVAL_SHAPE = (360, 480)  # shorter side 360 (VG / the fork's eval resize) of a 3:4 image
NUM_BATCHES = 2  # distinct pre-made step batches, cycled
SALAD_FROZEN_BLOCKS = 8  # DINOv2-B has 12 blocks; the fork trains the last 4


# ----------------------------------------------------------------------------- PyTorch models
def eigenplaces_pair(cfg, seed: int = 0):
    """(PyTorch EigenPlaces ResNet-50 + GeM + FC, jaxvpr variables) with the same weights; conv1..layer2 frozen."""
    depth = int(cfg.backbone[len("resnet"):])
    torch.manual_seed(seed)
    torch_model = TorchCosPlace(depth, cfg.fc_output_dim)
    randomise_batchnorm_(torch_model, seed)
    torch_model.freeze_up_to_layer2()  # EigenPlaces' constructor does the same
    return torch_model, torch_to_variables(numpy_state_dict(torch_model), cfg)


def dinov2_salad_pair(cfg, seed: int = 0):
    """(PyTorch DINOv2-B/14 + SALAD, jaxvpr variables) with the same weights and the fork's freezing."""
    torch_model, salad_cfg, variables = salad_pair(cfg.name, seed)
    if salad_cfg.to_dict() != cfg.to_dict():
        raise SystemExit(f"bench/inference.py's SALAD pair is built for {salad_cfg.to_dict()}, but the triplet "
                         f"recipe's model config is {cfg.to_dict()}: update the PyTorch reference.")
    old = torch_model.head
    head = TorchSalad(768, cfg.num_clusters, cfg.cluster_dim, cfg.token_dim)
    if cfg.dropout > 0:  # the checkpoint layout keeps index 1 of both local MLPs for SALAD's dropout
        head.cluster_features[1] = tnn.Dropout(cfg.dropout)
        head.score[1] = tnn.Dropout(cfg.dropout)
    head.load_state_dict(old.state_dict())
    torch_model.head = head
    backbone = torch_model.backbone
    frozen = [backbone.embeddings, *backbone.encoder.layer[:SALAD_FROZEN_BLOCKS]]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad = False
    return torch_model, variables


class TorchTripletStep:
    """The VG benchmark's training step (``train.py``, recipes_facts.md §B.7) on ``(B * (2 + K), 3, H, W)``."""

    def __init__(self, model: tnn.Module, queries: int, negatives: int, lr: float, margin: float, device):
        self.model, self.queries, self.negatives, self.device = model, queries, negatives, device
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)  # frozen ones have no grad: skipped
        self.criterion = tnn.TripletMarginLoss(margin=margin, p=2, reduction="sum")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.model.train()
        self.optimizer.zero_grad()
        desc = self.model(images).view(self.queries, 2 + self.negatives, -1)  # rows [q, p, n_1 .. n_K] per query
        loss = sum(self.criterion(desc[:, 0], desc[:, 1], desc[:, 2 + j]) for j in range(self.negatives))
        loss = loss / (self.queries * self.negatives)
        loss.backward()
        self.optimizer.step()
        sync(self.device)
        return loss.detach()


def trainable_count(torch_model: tnn.Module) -> int:
    return sum(p.numel() for p in torch_model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- the benchmark
def recipe_config(model_name: str, queries: int, size: int):
    config = triplet_config()
    config.model.name = model_name
    config.train.batch_size = queries
    config.data.image_size = size
    return config


def eval_shape(cfg) -> tuple[int, int]:
    """The cache's input shape: 360 x 480, sides rounded to multiples of 14 for DINOv2 (364 x 476)."""
    m = 14 if backbone_family(cfg.backbone) == "dinov2" else 1
    return tuple(max(m, round(s / m) * m) for s in EVAL_SHAPE)


def jax_triplet_step(config, model, cfg, variables, example):
    """(state, compiled step, trace s, compile s) as ``TripletTrainer`` builds and ``Trainer.jit_step`` jits them."""
    params = jax.tree.map(jnp.asarray, variables["params"])
    tx = make_optimizer(config, params, cfg)
    state = TripletState(step=jnp.zeros((), jnp.int32), params=params,
                         batch_stats=jax.tree.map(jnp.asarray, variables.get("batch_stats", {})),
                         opt_state=tx.init(params))
    mesh = parallel.make_mesh()
    state_sharding = parallel.state_shardings(state, mesh)
    step_fn = jax.jit(make_train_step(model, tx, config, frozen_params_mask(cfg)),
                      in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
                      out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=(0,))
    state = jax.device_put(state, state_sharding)
    example = jax.device_put(example, parallel.batch_sharding(mesh))
    lowered, trace_s = timed(lambda: step_fn.lower(state, example))
    compiled, compile_s = timed(lowered.compile)
    return state, compiled, mesh, trace_s, compile_s


def jax_trainable_count(cfg, params) -> int:
    frozen = jax.tree.leaves(frozen_params_mask(cfg))
    return sum(int(np.size(p)) for p, f in zip(jax.tree.leaves(params), frozen) if not f)


def bench_extraction(model, torch_model, variables, shape, batch: int, rounds: int, device) -> dict:
    images = np.random.default_rng(1).standard_normal((batch, *shape, 3)).astype(np.float32)
    images_torch = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    describer = Describer(model)
    describe, bind_s = timed(lambda: describer.bind(variables))
    torch_model.eval()

    def jax_call():
        return np.asarray(jax.device_get(describe(images)))

    def torch_call():
        with torch.no_grad():
            return torch_model(images_torch.to(device)).cpu().numpy()

    jax_desc, jax_first_s = timed(jax_call)  # compiles
    torch_desc, torch_first_s = timed(torch_call)
    max_diff = float(np.abs(jax_desc - torch_desc).max())
    rates = interleaved_throughput({"jax": jax_call, "torch": torch_call}, batch, 1, rounds)
    return dict(work="extraction (eval)", input=f"{shape[0]}x{shape[1]}", batch=str(batch), images=batch,
                jax=rates["jax"], torch=rates["torch"], jax_first_s=jax_first_s, torch_first_s=torch_first_s,
                check=f"max abs diff {max_diff:.1e}", max_abs_diff=max_diff)


def bench_step(config, model, cfg, torch_model, variables, size: int, queries: int, warmup: int, steps: int,
               device) -> dict:
    negatives = int(config.train.negs_num_per_query)
    n_images = queries * (2 + negatives)
    rng = np.random.default_rng(0)
    host = [rng.standard_normal((n_images, size, size, 3), dtype=np.float32) for _ in range(NUM_BATCHES)]
    state, compiled, mesh, trace_s, compile_s = jax_triplet_step(config, model, cfg, variables, {"image": host[0]})
    jax_batches = [jax.device_put({"image": x}, parallel.batch_sharding(mesh)) for x in host]
    torch_batches = [torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device) for x in host]
    torch_step = TorchTripletStep(torch_model, queries, negatives, float(config.train.lr),
                                  float(config.train.margin), device)
    trainable = (jax_trainable_count(cfg, state.params), trainable_count(torch_model))

    counters = {"jax": 0, "torch": 0}
    holder = {"state": state, "metrics": None, "torch_loss": None, "jax_losses": [], "torch_losses": []}
    del state

    def jax_call():
        b = jax_batches[counters["jax"] % NUM_BATCHES]
        holder["state"], holder["metrics"] = compiled(holder["state"], b)
        jax.block_until_ready(holder["metrics"])
        holder["jax_losses"].append(float(holder["metrics"]["loss"]))
        counters["jax"] += 1

    def torch_call():
        loss = torch_step(torch_batches[counters["torch"] % NUM_BATCHES])
        holder["torch_losses"].append(float(loss))
        counters["torch"] += 1

    warm = {"jax": [], "torch": []}
    for _ in range(warmup):
        warm["jax"].append(timed(jax_call)[1])
        warm["torch"].append(timed(torch_call)[1])
    rates = interleaved_throughput({"jax": jax_call, "torch": torch_call}, n_images, 1, steps)
    assert counters["jax"] == counters["torch"]
    jl, tl = holder["jax_losses"], holder["torch_losses"]
    return dict(work="triplet step (train)", input=f"{size}x{size}", batch=f"{queries}x12={n_images}", images=n_images,
                jax=rates["jax"], torch=rates["torch"], trace_s=trace_s, compile_s=compile_s,
                jax_first_s=warm["jax"][0] if warm["jax"] else float("nan"),
                torch_first_s=warm["torch"][0] if warm["torch"] else float("nan"),
                losses={"jax": jl, "torch": tl}, trainable_params={"jax": trainable[0], "torch": trainable[1]},
                check=f"loss step 1 {jl[0]:.4f} / {tl[0]:.4f}, step {len(jl)} {jl[-1]:.4f} / {tl[-1]:.4f}")


def device_lines(device: torch.device) -> list[str]:
    jd = jax.devices()[0]
    torch_dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [machine_line(),
             f"processor {platform.processor() or platform.machine()!r}, {os.cpu_count()} CPUs; "
             f"jax {jax.__version__} on {jd.platform} ({jd.device_kind}); torch {torch.__version__} on {torch_dev}"]
    if (jd.platform == "gpu") != (device.type == "cuda"):
        lines.append(f"WARNING: jaxvpr runs on {jd.platform} but PyTorch on {device.type}: the ratio compares two "
                     "different machines (install the matching jax/torch GPU build or pass --device).")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(TRAIN_SIZES), default="eigenplaces_resnet50_2048")
    parser.add_argument("--size", type=int, default=None,
                        help="training crop side in pixels (default: 360 EigenPlaces, 322 SALAD; DINOv2: a multiple of 14)")
    parser.add_argument("--queries", type=int, default=4, help="queries per step (each 12 images); the recipe's 4")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (interleaved rounds)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--infer-batch", type=int, default=16, help="extraction batch (VG infer_batch_size)")
    parser.add_argument("--infer-rounds", type=int, default=5, help="timed extraction batches per side")
    parser.add_argument("--skip", choices=("step", "extraction"), action="append", default=[],
                        help="leave out a part (repeatable)")
    parser.add_argument("--device", default="auto", help="PyTorch device: auto (cuda if available), cpu, cuda[:i]")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and the machine to this file")
    args = parser.parse_args(argv)
    size = args.size or TRAIN_SIZES[args.model]
    if args.warmup < 1 and "step" not in args.skip:
        parser.error("--warmup must be at least 1 (the first step's loss is the sanity check, and PyTorch's "
                     "first step initialises its kernels)")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.set_num_threads(args.threads)

    config = recipe_config(args.model, args.queries, size)
    cfg = run_model_config(config)
    if backbone_family(cfg.backbone) == "dinov2" and size % 14:
        parser.error(f"--size {size}: {args.model} takes sides that are multiples of 14 (e.g. 322 = 23 x 14, 364)")
    model = build_model(cfg)
    pair = dinov2_salad_pair if args.model.startswith("salad") else eigenplaces_pair
    torch_model, variables = pair(cfg)
    torch_model.to(device)

    header = device_lines(device)
    header.append(f"{args.model} (trainable_stages {cfg.trainable_stages}); step: {args.warmup} warm-up + {args.steps} "
                  f"timed steps per side, interleaved; extraction: 1 warm-up + {args.infer_rounds} batches per side; "
                  f"medians over rounds")
    print("\n".join(header) + "\n", flush=True)

    rows = []
    if "extraction" not in args.skip:  # first: both sides still hold the same weights
        print(f"... extraction {eval_shape(cfg)} batch {args.infer_batch}", file=sys.stderr, flush=True)
        rows.append(bench_extraction(model, torch_model, variables, eval_shape(cfg), args.infer_batch,
                                     args.infer_rounds, device))
    if "step" not in args.skip:
        print(f"... triplet step {size}x{size}, {args.queries} x 12 images", file=sys.stderr, flush=True)
        rows.append(bench_step(config, model, cfg, torch_model, variables, size, args.queries, args.warmup,
                               args.steps, device))

    print("| work | model | input | batch | jaxvpr img/s (min-max) | PyTorch img/s (min-max) | jax/torch "
          "| jaxvpr compile s | 1st call s (jax / torch) | check (jax / torch) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        j, t = median(r["jax"]), median(r["torch"])
        r.update(jax_median=j, torch_median=t, ratio=j / t)
        compile_s = f"{r['trace_s']:.1f} + {r['compile_s']:.1f}" if "compile_s" in r else "in 1st call"
        print(f"| {r['work']} | {args.model} | {r['input']} | {r['batch']} | {j:.2f} ({spread(r['jax'])}) "
              f"| {t:.2f} ({spread(r['torch'])}) | {j / t:.2f} | {compile_s} "
              f"| {r['jax_first_s']:.1f} / {r['torch_first_s']:.1f} | {r['check']} |")
    for r in rows:
        if "trainable_params" in r:
            tp = r["trainable_params"]
            print(f"\ntrainable parameters: jaxvpr {tp['jax']:,}, PyTorch {tp['torch']:,}")
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    peak = f"peak host RSS {rss_gib:.1f} GiB (both sides, one process)"
    if device.type == "cuda":
        peak += f"; PyTorch peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    print("\n" + peak)
    footer = load_line()
    print("\n" + footer)

    if args.json:
        out = dict(command=" ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), header=header, footer=footer,
                   jax=jax.__version__, torch=torch.__version__, processor=platform.processor(),
                   cpu_count=os.cpu_count(), jax_platform=jax.devices()[0].platform, torch_device=str(device),
                   args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   model=args.model, size=size, rows=rows)
        args.json.write_text(json.dumps({**out, "peak": peak}, indent=1))
        print(f"rows written to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
