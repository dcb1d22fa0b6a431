"""CosPlace training-step throughput, jaxvpr vs the anchor's PyTorch step, in the same run.

    python bench/train_step.py                 # default rows + profile, about 5 minutes on 2 CPU cores
    python bench/train_step.py --rows frozen:512:32 --rounds 5 --iters 2
    python bench/train_step.py --rows grl:512:32 --no-profile

A row ``kind:size:batch`` times the ResNet-18 + GeM (512-d) CosPlace training step on pre-made
random batches (no input pipeline) of ``batch`` images of ``size`` x ``size`` pixels:

* ``frozen``: CosPlace's default, conv1, bn1, layer1, layer2 frozen, layer3 + layer4 + head train;
* ``all``: every stage trains (``trainable_stages=None``) -- compared with ``frozen`` it shows
  whether the frozen stages really skip the backward pass (it must be clearly slower);
* ``grl``: ``frozen`` + thesis §4.4 GRL: a second batch of 8 target images through the model in
  training mode, the pooled features of 8 source + 8 target images through gradient reversal and
  the domain discriminator (Linear 512-50-20-2), loss = CosFace + 1.0 * CE(domain), GRL coefficient
  0.5. Its images/s count source + target images (as the trainer's ``images_per_s``);
* ``devaug``: ``frozen`` with CosPlace's augmentation in the step: jaxvpr's ``data.augment_on="device"``
  (uint8 batches, ColorJitter + RandomResizedCrop + Normalize inside the jitted step) vs CosPlace's
  ``train.py``, which applies the torchvision transforms to each image of the batch on the device
  before the forward pass (``frozen`` vs ``devaug`` is the augmentation's cost in the step).

Both sides start from the same weights (the PyTorch state dict converted with
``torch_to_variables``; same CosFace classifier and discriminator) and run the same sequence of
batches, so their losses after the last step agree (shown in the table as a sanity check).

* jaxvpr: ``jaxvpr.train.cosplace.make_train_step`` with ``make_optimizers`` and a ``TrainState``
  built as the trainer does, config ``jaxvpr.train.config.cosplace_config()`` (Adam 1e-5 model,
  1e-2 classifier, CosFace s=30 m=0.4), jitted as the trainer jits it (shardings on a one-device
  mesh, state donated). "compile s" is ``lower`` + ``compile`` of the step (before the first step).
* PyTorch: CosPlace's ``train.py`` step -- ``model.train()`` (frozen BatchNorms use batch statistics),
  frozen parameters ``requires_grad=False``, ``Adam(model.parameters(), 1e-5)``, the classifier
  ``MarginCosineProduct(512, classes, s=30, m=0.4)`` (written below) with ``Adam(1e-2)``,
  ``CrossEntropyLoss``; ``zero_grad``, ``backward``, ``step``.

Timing: one warm-up step per side (excluded), then ``--rounds`` rounds of ``--iters`` jaxvpr steps
(dispatched asynchronously, blocked on at the end of the round) followed by ``--iters`` PyTorch
steps; medians of the per-round images/s and their ratio jaxvpr / PyTorch (> 1: jaxvpr faster).
``torch.set_num_threads(--threads)`` (default: all cores); XLA's CPU client uses all cores.

``--profile`` (default on) then inspects the compiled jaxvpr step at the first row's size (batch
``--profile-batch``, 8; the op counts do not depend on the batch): the
number of convolutions in the compiled program with ``trainable_stages`` 2 vs None (backward
through frozen layers would show up as extra convolutions), host callbacks / infeed / outfeed in
the program, a steady step under ``jax.transfer_guard("disallow")`` (no implicit host<->device
transfer), the Python dispatch time of a step vs its run time, and whether the jitted step
recompiles when the GRL coefficient changes.

Full-size options: ``--rows frozen:512:32 all:512:32 grl:512:32 --classes 5000 --rounds 5``
(CosPlace trains at 512 with batch 32; one such step takes ~10 s per framework on 2 cores).

On a GPU (``bash bench/gpu.sh`` runs the whole GPU set): ``--torch-device cuda`` puts PyTorch on
the GPU (jaxvpr runs on JAX's default backend), ``--channels-last`` gives PyTorch's model and images
channels-last memory order, ``--precision bf16`` compares jaxvpr's ``train.mixed_precision`` (bf16
compute, fp32 parameters and optimizer states) with PyTorch's autocast to bfloat16 (AMP; no
GradScaler is needed in bf16). The losses then agree to bf16 precision only.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import (  # noqa: E402
    TorchCosPlace,
    interleaved_throughput,
    load_line,
    machine_line,
    median,
    numpy_state_dict,
    spread,
    timed,
)

from jaxvpr import parallel  # noqa: E402
from jaxvpr.convert.rules import torch_to_variables  # noqa: E402
from jaxvpr.models import build_model  # noqa: E402
from jaxvpr.models.discriminator import DomainDiscriminator  # noqa: E402
from jaxvpr.train.config import cosplace_config  # noqa: E402
from jaxvpr.train.cosplace import TrainState, make_optimizers, make_train_step, run_model_config  # noqa: E402

KINDS = ("frozen", "all", "grl", "devaug")
DEFAULT_ROWS = ("frozen:224:32", "all:224:32", "grl:224:32", "frozen:512:16")
GRL_COEFF = 0.5
NUM_BATCHES = 3  # distinct pre-made batches, cycled


# ----------------------------------------------------------------------------- PyTorch side
class MarginCosineProduct(tnn.Module):
    """CosFace logits s (cos(theta_j) - m [j == label]) (Wang et al. 2018; CosPlace's classifier)."""

    def __init__(self, in_features: int, out_features: int, s: float = 30.0, m: float = 0.4):
        super().__init__()
        self.s, self.m = s, m
        self.weight = tnn.Parameter(torch.empty(out_features, in_features))
        tnn.init.xavier_uniform_(self.weight)

    def forward(self, x, label):
        cosine = F.linear(F.normalize(x), F.normalize(self.weight))
        one_hot = torch.zeros_like(cosine).scatter_(1, label.view(-1, 1), 1.0)
        return self.s * (cosine - self.m * one_hot)


class GradReverse(torch.autograd.Function):
    """Identity forward, gradient times -coeff backward (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x, coeff):
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coeff * grad, None


def torch_discriminator(in_dim: int) -> tnn.Sequential:
    """AdAGeo's domain discriminator on pooled features: Linear(d, 50), ReLU, Linear(50, 20), ReLU, Linear(20, 2)."""
    return tnn.Sequential(tnn.Linear(in_dim, 50), tnn.ReLU(), tnn.Linear(50, 20), tnn.ReLU(), tnn.Linear(20, 2))


class TorchStep:
    """CosPlace's PyTorch training step (train.py), optionally with GRL (thesis §4.4)."""

    def __init__(self, model: TorchCosPlace, classifier, discriminator, config, frozen: bool, bf16: bool = False):
        self.model, self.classifier, self.discriminator = model, classifier, discriminator
        self.bf16 = bf16
        if frozen:
            model.freeze_up_to_layer2()
        model.train()
        self.model_opt = torch.optim.Adam(model.parameters(), lr=config.train.lr)
        self.cls_opt = torch.optim.Adam(classifier.parameters(), lr=config.train.classifiers_lr)
        self.disc_opt = torch.optim.Adam(discriminator.parameters(), lr=config.grl.lr) if discriminator else None
        self.n_src = config.grl.source_to_discriminator
        self.weight = config.grl.weight

    def __call__(self, batch) -> torch.Tensor:
        self.model_opt.zero_grad()
        self.cls_opt.zero_grad()
        images = batch["image"]
        if "augment" in batch:  # CosPlace train.py: ColorJitter + RandomResizedCrop per image of the batch
            images = torch.stack([batch["augment"](img) for img in images])
        # --precision bf16: autocast to bfloat16 (PyTorch AMP; bf16 needs no GradScaler)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            descriptors, features = self.model(images, return_features=True)
            loss = F.cross_entropy(self.classifier(descriptors, batch["label"]), batch["label"])
            if self.discriminator is not None:
                self.disc_opt.zero_grad()
                _, target_features = self.model(batch["target_image"], return_features=True)
                x = GradReverse.apply(torch.cat([features[: self.n_src], target_features]), GRL_COEFF)
                domains = torch.cat([torch.zeros(self.n_src, dtype=torch.long),
                                     torch.ones(len(target_features), dtype=torch.long)]).to(x.device)
                loss = loss + self.weight * F.cross_entropy(self.discriminator(x), domains)
        loss.backward()
        self.model_opt.step()
        self.cls_opt.step()
        if self.disc_opt is not None:
            self.disc_opt.step()
        return loss.detach()


# ----------------------------------------------------------------------------- jaxvpr side
def run_config(kind: str, size: int, batch: int, bf16: bool = False):
    config = cosplace_config()
    config.train.mixed_precision = bf16  # bf16 compute, fp32 parameters and optimizer states
    config.data.image_size = size
    config.train.batch_size = batch
    if kind == "all":
        config.model.trainable_stages = None
    config.grl.enabled = kind == "grl"
    if kind == "devaug":
        config.data.augment_on = "device"
    return config


def discriminator_params(disc: tnn.Sequential) -> dict:
    """The PyTorch discriminator's weights as ``DomainDiscriminator`` params (fc1..fc3, kernel = W^T)."""
    linears = [m for m in disc if isinstance(m, tnn.Linear)]
    return {f"fc{i + 1}": {"kernel": jnp.asarray(m.weight.detach().numpy().T), "bias": jnp.asarray(m.bias.detach().numpy())}
            for i, m in enumerate(linears)}


def jax_state_and_step(config, torch_model, classifier, discriminator, example_batch):
    """(TrainState, jitted step, shardings) from the PyTorch weights, as ``jaxvpr.train.cosplace.train`` builds them."""
    model_cfg = run_model_config(config)
    model = build_model(model_cfg)
    variables = torch_to_variables(numpy_state_dict(torch_model), model_cfg)
    params = jax.tree.map(jnp.asarray, variables["params"])
    txs = make_optimizers(config, params)
    model_tx, cls_tx, disc_tx = txs
    jax_disc = DomainDiscriminator(n_domains=2)
    if discriminator is not None:
        disc_params = discriminator_params(discriminator)
    else:
        disc_params = jax_disc.init(jax.random.key(1), jnp.zeros((1, 512)))["params"]
    weight = jnp.asarray(classifier.weight.detach().numpy())
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=jax.tree.map(jnp.asarray, variables["batch_stats"]),
        opt_state=model_tx.init(params), classifier=weight, classifier_opt=cls_tx.init(weight),
        disc_params=disc_params, disc_opt=disc_tx.init(disc_params))
    mesh = parallel.make_mesh()
    state_sharding = parallel.state_shardings(state, mesh)
    step_fn = jax.jit(make_train_step(model, jax_disc, txs, config),
                      in_shardings=(state_sharding, parallel.batch_sharding(mesh), parallel.replicated(mesh)),
                      out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=(0,))
    state = jax.device_put(state, state_sharding)
    return state, step_fn, mesh


def make_batches(size: int, batch: int, classes: int, grl: bool, target_batch: int, seed: int = 0,
                 augment: bool = False):
    """NUM_BATCHES random batches as (jax device arrays NHWC, torch tensors NCHW), same values. With
    ``augment`` the images are uint8 (jaxvpr: augmented in the step) / float [0, 1] with CosPlace's
    per-image torchvision augmentation (PyTorch: applied in its step, as CosPlace's train.py does)."""
    rng = np.random.default_rng(seed)
    jax_batches, torch_batches = [], []
    for _ in range(NUM_BATCHES):
        labels = rng.choice(classes, batch, replace=False).astype(np.int32)
        if augment:
            import torchvision.transforms as T

            pixels = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
            jb = {"image": pixels, "label": labels}
            tb = {"image": torch.from_numpy(pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255),
                  "label": torch.from_numpy(labels).long(),
                  "augment": T.Compose([T.ColorJitter(0.7, 0.7, 0.7, 0.5),
                                        T.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
                                        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])}
            jax_batches.append(jax.device_put(jb))
            torch_batches.append(tb)
            continue
        images = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
        jb = {"image": images, "label": labels}
        tb = {"image": torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), "label": torch.from_numpy(labels).long()}
        if grl:
            target = rng.standard_normal((target_batch, size, size, 3), dtype=np.float32)
            jb["target_image"] = target
            tb["target_image"] = torch.from_numpy(target.transpose(0, 3, 1, 2).copy())
        jax_batches.append(jax.device_put(jb))
        torch_batches.append(tb)
    return jax_batches, torch_batches


def to_torch_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    """A PyTorch batch on ``device`` (images in channels-last memory order with ``channels_last``)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if channels_last and v.ndim == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def bench_row(kind: str, size: int, batch: int, classes: int, iters: int, rounds: int,
              torch_device: str = "cpu", bf16: bool = False, channels_last: bool = False) -> dict:
    config = run_config(kind, size, batch, bf16)
    grl = kind == "grl"
    torch.manual_seed(0)
    torch_model = TorchCosPlace(18, 512)
    classifier = MarginCosineProduct(512, classes, config.train.cosface_s, config.train.cosface_m)
    discriminator = torch_discriminator(512) if grl else None
    jax_batches, torch_batches = make_batches(size, batch, classes, grl, config.grl.target_batch_size,
                                              augment=kind == "devaug")
    state, step_fn, _ = jax_state_and_step(config, torch_model, classifier, discriminator, jax_batches[0])
    device = torch.device(torch_device)
    for module in (torch_model, classifier, discriminator):
        if module is not None:
            module.to(device)
    if channels_last:
        torch_model.to(memory_format=torch.channels_last)
    torch_batches = [to_torch_device(b, device, channels_last) for b in torch_batches]
    torch_step = TorchStep(torch_model, classifier, discriminator, config, frozen=kind != "all", bf16=bf16)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    coeff = jnp.float32(GRL_COEFF)

    lowered, trace_s = timed(lambda: step_fn.lower(state, jax_batches[0], coeff))
    compiled, compile_s = timed(lowered.compile)

    counters = {"jax": 0, "torch": 0}
    holder = {"state": state, "metrics": None, "torch_loss": None}

    def jax_call():
        b = jax_batches[counters["jax"] % NUM_BATCHES]
        holder["state"], holder["metrics"] = compiled(holder["state"], b, coeff)
        counters["jax"] += 1

    def torch_call():
        holder["torch_loss"] = torch_step(torch_batches[counters["torch"] % NUM_BATCHES])
        counters["torch"] += 1

    def jax_round():  # dispatch `iters` steps, then wait for the last
        for _ in range(iters):
            jax_call()
        jax.block_until_ready(holder["metrics"])

    def torch_round():  # `iters` steps, then wait for the device (asynchronous on a GPU)
        for _ in range(iters):
            torch_call()
        sync()

    (jax_call(), jax.block_until_ready(holder["metrics"]))  # warm-up step (compiled already)
    first_jax_loss = float(holder["metrics"]["loss"])
    torch_call()
    sync()
    first_torch_loss = float(holder["torch_loss"])
    images = batch + (config.grl.target_batch_size if grl else 0)
    rates = interleaved_throughput({"jax": jax_round, "torch": torch_round}, images * iters, 1, rounds)
    assert counters["jax"] == counters["torch"]
    return dict(kind=kind, size=size, batch=batch, images=images, jax=rates["jax"], torch=rates["torch"],
                trace_s=trace_s, compile_s=compile_s, steps=counters["jax"],
                losses=(first_jax_loss, first_torch_loss, float(holder["metrics"]["loss"]), float(holder["torch_loss"])))


# ----------------------------------------------------------------------------- profile
CONV_RE = re.compile(r"= \S+ convolution\(")


def count_ops(hlo_text: str) -> dict:
    """Convolutions and host-interaction ops in a compiled HLO module's text."""
    callbacks = re.findall(r'custom_call_target="([^"]*(?:callback|Callback|host)[^"]*)"', hlo_text)
    return {
        "convolutions": len(CONV_RE.findall(hlo_text)),
        "custom-call convolutions": len(re.findall(r'custom_call_target="[^"]*conv[^"]*"', hlo_text, re.I)),
        "host callbacks": len(callbacks),
        "infeed/outfeed/send/recv": len(re.findall(r"= \S+ (?:infeed|outfeed|send|recv)\(", hlo_text)),
    }


def profile(size: int, batch: int, classes: int, steps: int) -> list[str]:
    lines = [f"Profile of the jaxvpr step at {size}x{size}, batch {batch}:", ""]
    rows = {}
    for kind in ("frozen", "all"):
        config = run_config(kind, size, batch)
        torch.manual_seed(0)
        torch_model = TorchCosPlace(18, 512)
        classifier = MarginCosineProduct(512, classes)
        jax_batches, _ = make_batches(size, batch, classes, False, 8)
        state, step_fn, _ = jax_state_and_step(config, torch_model, classifier, None, jax_batches[0])
        coeff = jnp.float32(0.0)
        compiled = step_fn.lower(state, jax_batches[0], coeff).compile()
        ops = count_ops(compiled.as_text())
        state, metrics = compiled(state, jax_batches[0], coeff)
        jax.block_until_ready(metrics)
        # steady steps: how long the Python call takes to return vs the step's run time
        dispatch, total = [], []
        with jax.transfer_guard("disallow"):  # any implicit host<->device transfer raises
            for i in range(steps):
                t0 = time.perf_counter()
                state, metrics = compiled(state, jax_batches[i % NUM_BATCHES], coeff)
                dispatch.append(time.perf_counter() - t0)
                jax.block_until_ready(metrics)
                total.append(time.perf_counter() - t0)
        rows[kind] = dict(ops=ops, dispatch=median(dispatch), step=median(total))
        if kind == "frozen":  # recompilation check on the trainer's jit path (a new coefficient each call)
            state2, _, _ = jax_state_and_step(config, torch_model, classifier, None, jax_batches[0])
            for i, c in enumerate((0.0, 0.3, 0.9)):
                state2, m = step_fn(state2, jax_batches[i % NUM_BATCHES], jnp.float32(c))
            jax.block_until_ready(m)
            rows[kind]["cache"] = step_fn._cache_size()
            del state2
        del state

    lines.append("| trainable_stages | convolutions in compiled step | step s (median) | Python dispatch s "
                 "| host callbacks | infeed/outfeed/send/recv |")
    lines.append("|---|---|---|---|---|---|")
    for kind, label in (("frozen", "2 (layer3+layer4)"), ("all", "None (all)")):
        r = rows[kind]
        convs = r["ops"]["convolutions"] + r["ops"]["custom-call convolutions"]
        lines.append(f"| {label} | {convs} | {r['step']:.2f} | {r['dispatch']:.4f} | {r['ops']['host callbacks']} "
                     f"| {r['ops']['infeed/outfeed/send/recv']} |")
    lines.append("")
    lines.append(f"ResNet-18 has 20 convolutions (17 main + 3 downsample); their backward adds one weight-gradient "
                 f"convolution per trained conv and one input-gradient convolution per conv below which something "
                 f"trains. Step time all/frozen: {rows['all']['step'] / rows['frozen']['step']:.2f}x. "
                 f"Steady steps ran under jax.transfer_guard('disallow') without error (no implicit transfers). "
                 f"Jitted step compiled {rows['frozen']['cache']} time(s) for 3 calls with different GRL coefficients.")
    return lines


# ----------------------------------------------------------------------------- main
def parse_row(text: str):
    try:
        kind, size, batch = text.split(":")
        if kind not in KINDS:
            raise ValueError
        return kind, int(size), int(batch)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a row is kind:size:batch with kind in {KINDS} (e.g. frozen:224:32), got {text!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=parse_row, nargs="+", default=[parse_row(r) for r in DEFAULT_ROWS],
                        help="kind:size:batch rows (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=1000, help="classes of the group's CosFace classifier")
    parser.add_argument("--iters", type=int, default=1, help="steps per side per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--torch-device", default="cpu", help="where PyTorch runs (cpu, or cuda on a GPU machine; "
                        "jaxvpr runs on JAX's default backend)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: jaxvpr's train.mixed_precision (bf16 compute, fp32 parameters) vs PyTorch autocast "
                        "to bfloat16 (AMP)")
    parser.add_argument("--channels-last", action="store_true",
                        help="PyTorch model and images in channels-last memory order (faster convolutions on GPUs)")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="inspect the compiled jaxvpr step (at the first row's size)")
    parser.add_argument("--profile-batch", type=int, default=8, help="batch of the profiled step")
    parser.add_argument("--profile-steps", type=int, default=3, help="timed steady steps per profiled variant")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(machine_line())
    print(f"ResNet-18 + GeM 512-d, CosFace over {args.classes} classes; {args.rounds} rounds x {args.iters} step(s) "
          f"per side, interleaved; medians over rounds; PyTorch on {args.torch_device}"
          f"{', channels-last' if args.channels_last else ''}; precision {args.precision}\n")
    results = []
    for kind, size, batch in args.rows:
        print(f"... {kind} {size}x{size} batch {batch}", file=sys.stderr, flush=True)
        results.append(bench_row(kind, size, batch, args.classes, args.iters, args.rounds, args.torch_device,
                                 args.precision == "bf16", args.channels_last))

    labels = {"frozen": "layer3+layer4 train", "all": "all stages train", "grl": "layer3+layer4 + GRL (target 8)",
              "devaug": "layer3+layer4 train + CosPlace augmentation in the step"}
    print("| step | input | batch | jaxvpr img/s (min-max) | PyTorch img/s (min-max) | jax/torch "
          "| jaxvpr trace + compile s | loss step 1 (jax / torch) | loss step N (jax / torch) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        j, t = median(r["jax"]), median(r["torch"])
        batch = f"{r['batch']}+8" if r["kind"] == "grl" else str(r["batch"])
        l1j, l1t, lnj, lnt = r["losses"]
        print(f"| {labels[r['kind']]} | {r['size']}x{r['size']} | {batch} | {j:.1f} ({spread(r['jax'])}) "
              f"| {t:.1f} ({spread(r['torch'])}) | {j / t:.2f} | {r['trace_s']:.1f} + {r['compile_s']:.1f} "
              f"| {l1j:.4f} / {l1t:.4f} | N={r['steps']}: {lnj:.4f} / {lnt:.4f} |")
    print()
    if args.profile:
        size = args.rows[0][1]
        print(f"... profile at {size}x{size} batch {args.profile_batch}", file=sys.stderr, flush=True)
        print("\n".join(profile(size, args.profile_batch, args.classes, args.profile_steps)))
        print()
    print(load_line())


if __name__ == "__main__":
    main()
