"""AdAGeo phase-1 (DDDA) phase-II training step: jaxvpr vs BiOST's step in PyTorch.

    python bench/ddda_step.py                               # BiOST's networks, 256 x 256 crops
    python bench/ddda_step.py --crop 64 --steps 3           # lighter, for 2 CPU cores
    python bench/ddda_step.py --feature-cycle               # with BiOST's code-only feature cycle
    python bench/ddda_step.py --json ddda.json              # also save the rows

One step of phase II (``jaxvpr/train/ddda.py``; recipes_facts.md A.1.4): batch 1, one target image
(BiOST's domain A) and one source image (B), both autoencoders updated by their own Adam (lr 2e-4,
betas 0.5, 0.999) -- 2 images per step. Pre-made random images in [-1, 1] of ``--crop`` x ``--crop``
already on the device (no input pipeline):

* jaxvpr: the recipe's jitted step (``compiled_step(2, ...)``: ``phase2_grads`` + two optax Adams,
  state donated), started from ``phase2_init`` of converted PyTorch weights;
* PyTorch: ``bench/torch_ddda.py``'s ``Phase2Step`` on the same weights (``phase2_losses``, two
  ``torch.autograd.grad`` calls, two ``torch.optim.Adam`` steps).

Both sides start from the same weights (a PyTorch encoder/decoder, converted with
``jaxvpr.convert.ddda.torch_to_ddda``; both domains start equal, as phase II does), so the losses of
the first step agree (last column). Timing: ``--warmup`` untimed steps per side (jaxvpr's first
compiles), then ``--steps`` rounds of one jaxvpr step and one PyTorch step, interleaved; median
images/s over rounds (min-max). PyTorch uses ``torch.set_num_threads(--threads)``; GPU: PyTorch on
CUDA when available (``--device``), jaxvpr on ``jax.devices()``, both float32 with each framework's
default matmul precision.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import (  # noqa: E402
    interleaved_throughput, load_line, machine_line, median, spread, sync, warm_up)
from torch_ddda import Decoder, Encoder, Phase2Step  # noqa: E402

from jaxvpr.convert.ddda import torch_to_ddda  # noqa: E402
from jaxvpr.models.ddda import DDDAAutoencoder  # noqa: E402
from jaxvpr.train.ddda import compiled_step  # noqa: E402

NUM_BATCHES = 2  # distinct pre-made (target, source) pairs, cycled


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crop", type=int, default=256, help="training crop side (BiOST 256; a multiple of 4)")
    parser.add_argument("--ngf", type=int, default=64)
    parser.add_argument("--res-blocks", type=int, default=4)
    parser.add_argument("--feature-cycle", action="store_true", help="BiOST's code-only feature-cycle term")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side (interleaved rounds)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--device", default="auto", help="PyTorch device: auto (cuda if available), cpu, cuda[:i]")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.crop % 4:
        parser.error(f"--crop {args.crop}: a multiple of 4 (two stride-2 convs)")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (jaxvpr's first step compiles)")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.set_num_threads(args.threads)

    # the same start on both sides: one random PyTorch autoencoder, copied into both domains
    torch.manual_seed(0)
    sizes = (args.ngf, 2, args.res_blocks)
    enc, dec = Encoder(args.ngf, 2, args.res_blocks), Decoder(args.ngf, 2, args.res_blocks)
    model = DDDAAutoencoder(*sizes)
    state_dicts = [{k: v.detach().numpy().copy() for k, v in m.state_dict().items()} for m in (enc, dec)]
    params = torch_to_ddda(*state_dicts, model)["params"]
    nets = [copy.deepcopy(m).to(device) for m in (enc, dec, enc, dec)]  # enc_a, dec_a, enc_b, dec_b
    torch_step = Phase2Step(*nets, lr=2e-4, feature_cycle=args.feature_cycle)
    step_fn, init = compiled_step(2, sizes, 2e-4, 1000, 80, 20, bool(args.feature_cycle))
    holder = {"state": jax.device_put(init(params), jax.local_devices()[0]), "jax": [], "torch": []}

    rng = np.random.default_rng(0)
    host = [rng.uniform(-1, 1, (2, 1, args.crop, args.crop, 3)).astype(np.float32) for _ in range(NUM_BATCHES)]
    jax_batches = [jax.device_put({"target": x[0], "source": x[1]}) for x in host]
    torch_batches = [[torch.from_numpy(x[i].transpose(0, 3, 1, 2).copy()).to(device) for i in (0, 1)] for x in host]
    counters = {"jax": 0, "torch": 0}

    def jax_call():
        holder["state"], metrics = step_fn(holder["state"], jax_batches[counters["jax"] % NUM_BATCHES])
        jax.block_until_ready(metrics)
        holder["jax"].append((float(metrics["loss_T"]), float(metrics["loss_S"])))
        counters["jax"] += 1

    def torch_call():
        loss_a, loss_b = torch_step(*torch_batches[counters["torch"] % NUM_BATCHES])
        sync(device)
        holder["torch"].append((float(loss_a), float(loss_b)))
        counters["torch"] += 1

    header = [machine_line(),
              f"DDDA phase-II step: crop {args.crop}x{args.crop}, batch 1 (1 target + 1 source = 2 images), "
              f"ngf {args.ngf}, {args.res_blocks} res blocks, feature cycle {args.feature_cycle}; PyTorch on {device}; "
              f"{args.warmup} warm-up + {args.steps} timed steps per side, interleaved"]
    print("\n".join(header) + "\n", flush=True)
    first = warm_up({"jax": jax_call, "torch": torch_call}, args.warmup)
    rates = interleaved_throughput({"jax": jax_call, "torch": torch_call}, 2, 1, args.steps)
    j, t = median(rates["jax"]), median(rates["torch"])
    (jt, js), (tt, ts) = holder["jax"][0], holder["torch"][0]
    print("| side | images/s (min-max) | ms / step | 1st call s | step-1 loss_T / loss_S |")
    print("|---|---|---|---|---|")
    print(f"| jaxvpr | {j:.2f} ({spread(rates['jax'])}) | {2000 / j:.1f} | {first['jax']:.1f} | {jt:.5f} / {js:.5f} |")
    print(f"| PyTorch | {t:.2f} ({spread(rates['torch'])}) | {2000 / t:.1f} | {first['torch']:.1f} "
          f"| {tt:.5f} / {ts:.5f} |")
    print(f"| ratio jaxvpr / PyTorch | {j / t:.2f} | | | |")
    command = " ".join(["python", Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)])
    print(f"\ncommand: {command}\n{load_line()}")
    if args.json:
        args.json.write_text(json.dumps(dict(command=command, header=header, jax=rates["jax"], torch=rates["torch"],
                                             ratio=j / t, losses={"jax": holder["jax"], "torch": holder["torch"]},
                                             args={k: str(v) for k, v in vars(args).items()}), indent=1))


if __name__ == "__main__":
    main()
