"""Can the GRL discriminator tell day from night? The diagnostic behind ``grl.joint_batchnorm`` and mu.

    python bench/discriminator.py [--steps 60] [--size 80]

Pooled layer4 features of a random-init ResNet-18 (train-mode BatchNorm, as in the training step)
for 8 augmented source (daylight street-view) + 8 target (`night` pool) images of the synthetic
`small` city per step; the AdAGeo discriminator (512-50-20-2, PyTorch-default init) alone is trained
on them with Adam, for each combination of:

- BatchNorm batches: ``joint`` (one forward of the 16 images: shared statistics) or ``separate``
  (two forwards of 8: each domain normalised by its own statistics, the trainer before the fix);
- mu (discriminator learning rate): 1e-2 (thesis' best on Tokyo) and 1e-3.

Prints the accuracy per block of 10 steps and the share of hidden units still active at the end.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxvpr.data import format as fmt, pipeline  # noqa: E402
from jaxvpr.data.augment import cosplace_augment  # noqa: E402
from jaxvpr.models import build_model, init_variables, model_config  # noqa: E402
from jaxvpr.models.discriminator import DomainDiscriminator  # noqa: E402
from jaxvpr.train import losses  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--size", type=int, default=80)
    args = parser.parse_args(argv)
    root = fmt.dataset_root("", "small", 0)
    src = fmt.read_image_folder(root / "images/train/database").abs_paths()
    night = root / "images/target/night"
    tgt = [str(night / p) for p in fmt.list_images(night)]
    aug_s = functools.partial(cosplace_augment, cfg=dict(brightness=.7, contrast=.7, saturation=.3, hue=.1,
                                                         random_resized_crop=.5, image_size=args.size))
    aug_t = functools.partial(cosplace_augment, cfg=dict(brightness=.7, contrast=.7, saturation=.7, hue=.1,
                                                         random_resized_crop=0., image_size=args.size))
    source = pipeline.train_batches(src, pipeline.UniformSampler(len(src)), 8, aug_s, seed=0)
    target = pipeline.train_batches(tgt, pipeline.UniformSampler(len(tgt)), 8, aug_t, seed=1)
    cfg = model_config("cosplace_resnet18_512", trainable_stages=None)
    model = build_model(cfg)
    variables = init_variables(cfg, jax.random.key(0), image_size=(args.size, args.size))

    @jax.jit
    def pooled(x):
        (_, f), _ = model.apply(variables, x, train=True, return_features=True, mutable=["batch_stats"])
        return f if f.ndim == 2 else f.mean(axis=(1, 2))

    def gap(f):  # ||mean_day - mean_night|| over the mean within-domain standard deviation
        spread = 0.5 * (np.sqrt(f[:8].var(0).sum()) + np.sqrt(f[8:].var(0).sum()))
        return np.linalg.norm(f[:8].mean(0) - f[8:].mean(0)) / spread

    feats = {"joint": [], "separate": []}
    for _ in range(args.steps):
        x = np.concatenate([next(source)["image"], next(target)["image"]])
        feats["joint"].append(np.asarray(pooled(x)))
        feats["separate"].append(np.concatenate([np.asarray(pooled(x[:8])), np.asarray(pooled(x[8:]))]))
    print(f"mean domain gap (||mean_day - mean_night|| / within-domain std): joint "
          f"{np.mean([gap(f) for f in feats['joint']]):.2f}, separate {np.mean([gap(f) for f in feats['separate']]):.2f}")
    disc = DomainDiscriminator(n_domains=2)
    labels = jnp.asarray([0] * 8 + [1] * 8)
    print(f"| BatchNorm | mu | accuracy per 10 steps | active units at the end |\n|---|---|---|---|")
    for mode in ("joint", "separate"):
        for lr in (1e-2, 1e-3):
            params = disc.init(jax.random.key(1), jnp.zeros((1, 512)))["params"]
            tx = optax.adam(lr)
            opt = tx.init(params)

            @jax.jit
            def step(params, opt, x):
                def loss_fn(p):
                    logits, hidden = disc.apply({"params": p}, x, return_hidden=True)
                    loss, acc = losses.domain_loss_and_accuracy(logits, labels)
                    return loss, (acc, jnp.concatenate([jnp.any(h > 0, 0) for h in hidden]).mean())
                (_, (acc, active)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
                updates, opt = tx.update(g, opt, params)
                return optax.apply_updates(params, updates), opt, acc, active

            accs = []
            for f in feats[mode]:
                params, opt, acc, active = step(params, opt, f)
                accs.append(float(acc))
            blocks = np.mean(np.reshape(accs[: len(accs) // 10 * 10], (-1, 10)), axis=1)
            print(f"| {mode} | {lr:g} | {' '.join(f'{a:.2f}' for a in blocks)} | {float(active):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
