"""XLA's CPU convolution on tiny maps, and ``layers.small_map_conv``'s patch product in its place.

    python bench/small_map_conv.py [--batch 8] [--rounds 5]

Two tables, both measured in this run with the same inputs:

1. one 3 x 3 convolution (stride 1, padding 1), C -> C channels, on maps of 1 x 1 to 4 x 4:
   ``lax.conv_general_dilated`` against the patches x kernel product, forward and gradient;
2. ResNet-18 (``cosplace_resnet18_512``) on 48 to 128 px images, ms per image, forward and the
   gradient of the descriptors with respect to the parameters, with the switch off (``SMALL_MAP_POSITIONS = 0``: every convolution is
   XLA's) and on (the default: maps of <= 4 positions take the patch product).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def timed(fn, *args, rounds: int) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(rounds):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / rounds * 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    import jaxvpr  # noqa: F401  (applies JAXVPR_CPU_CONV's choice of CPU convolutions)
    from jaxvpr.models import layers
    from jaxvpr.models.registry import build_model, init_variables, model_config

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; batch {args.batch}; mean of {args.rounds}")
    print("\n| channels | map | lax conv ms | patch product ms | ratio | lax grad ms | patch grad ms | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(0)
    pad = ((1, 1), (1, 1))
    for channels in (128, 256, 512):
        for hw in (1, 2, 3, 4):
            x = jnp.asarray(rng.normal(size=(args.batch, hw, hw, channels)).astype(np.float32))
            w = jnp.asarray(rng.normal(size=(3, 3, channels, channels)).astype(np.float32))
            dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
            saved, layers.SMALL_MAP_POSITIONS = layers.SMALL_MAP_POSITIONS, 16  # force the patch product
            try:
                row = []
                for fn in (lax.conv_general_dilated, layers.small_map_conv):
                    conv = lambda x, w, fn=fn: fn(x, w, (1, 1), pad, dimension_numbers=dn)
                    grad = jax.grad(lambda x, w, conv=conv: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))
                    row += [timed(conv, x, w, rounds=args.rounds), timed(grad, x, w, rounds=args.rounds)]
            finally:
                layers.SMALL_MAP_POSITIONS = saved
            print(f"| {channels} | {hw} x {hw} | {row[0]:.2f} | {row[2]:.2f} | {row[0] / row[2]:.1f}x "
                  f"| {row[1]:.2f} | {row[3]:.2f} | {row[1] / row[3]:.1f}x |", flush=True)

    cfg = model_config("cosplace_resnet18_512")
    model = build_model(cfg)
    variables = init_variables(cfg, jax.random.key(0))
    print("\n| ResNet-18 input | layer4 map | forward ms/img, XLA | patch product | ratio "
          "| gradient ms/img, XLA | patch product | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in (48, 64, 96, 128):
        images = jnp.asarray(rng.random((args.batch, size, size, 3)).astype(np.float32))
        row = []
        for positions in (0, layers.SMALL_MAP_POSITIONS):
            saved, layers.SMALL_MAP_POSITIONS = layers.SMALL_MAP_POSITIONS, positions
            try:
                forward = lambda v, x: model.apply(v, x, train=False)
                grad = jax.grad(lambda p, x: jnp.sum(model.apply({**variables, "params": p}, x, train=False) ** 3))
                row += [timed(forward, variables, images, rounds=args.rounds) / args.batch,
                        timed(grad, variables["params"], images, rounds=args.rounds) / args.batch]
            finally:
                layers.SMALL_MAP_POSITIONS = saved
        side = -(-size // 32)
        print(f"| {size} px | {side} x {side} | {row[0]:.1f} | {row[2]:.1f} | {row[0] / row[2]:.1f}x "
              f"| {row[1]:.1f} | {row[3]:.1f} | {row[1] / row[3]:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
