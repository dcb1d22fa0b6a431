"""Does AdAGeo's CAM attention change the NetVLAD descriptor? Measured on a trained jaxvpr model.

    python bench/adageo_attention.py --run workdir/adageo_demo [--images DIR] [--count 200]

recipes_facts §A.2.2 argues that NetVLAD's per-location L2 normalisation cancels a positive
per-location weight: ``normalize(a_i f_i) = normalize(f_i)`` unless ``a_i ||f_i|| < 1e-12``. This script
takes a run's best model (an ``adageo_resnet18_netvlad_64`` with attention), describes ``--count``
images of ``--images`` (default: the run's night test queries) three ways with the same weights, and
prints how far apart they are:

* ``attended``: the model as trained, NetVLAD(a * feat_nbn);
* ``no attention, pre-BN``: NetVLAD(feat_nbn), the attention map left out;
* ``no attention, post-BN``: NetVLAD(feat_bn), what the model without ``--attention`` aggregates;

and the share of local features the attention drives below 1e-12 (they drop out of NetVLAD).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="an adageo run's workdir (its best/ model is used)")
    parser.add_argument("--images", default="", help="an image folder (default: the run's first test query set)")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args(argv)

    from jaxvpr.checkpoint import load_model
    from jaxvpr.data import format as fmt
    from jaxvpr.data.images import load_image, normalize
    from jaxvpr.models import build_model
    from jaxvpr.models.netvlad import NetVLAD

    cfg, variables = load_model(args.run)
    if cfg.head != "cam_netvlad" or not cfg.attention:
        raise SystemExit(f"{args.run} holds {cfg.name}: an AdAGeo model with attention is needed.")
    folder = Path(args.images) if args.images else None
    if folder is None:
        run_config = json.loads((Path(args.run) / "config.json").read_text())
        root = fmt.dataset_root(run_config["data"]["root"], run_config["data"]["synthetic_preset"],
                                run_config["data"]["synthetic_seed"], run_config["data"]["synthetic_domains"])
        queries = run_config["data"]["test_queries"].split(",")[0].replace("{domain}", run_config["adageo"]["domain"])
        folder = root / run_config["data"]["test_splits"] / queries
    paths = fmt.read_image_folder(folder).abs_paths()[: args.count]
    model = build_model(cfg)
    netvlad = NetVLAD(num_clusters=cfg.num_clusters)

    @jax.jit
    def three(v, x):
        attended, inter = model.apply(v, x, mutable=["intermediates"])
        feat_bn, feat_nbn = model.apply(v, x, method=lambda m, y: m.backbone(y, train=False))
        head = {"params": v["params"]["head"]["netvlad"]}
        local = inter["intermediates"]["head"]["local_features"][0]
        vanished = jnp.linalg.norm(local, axis=-1) < 1e-12
        return attended, netvlad.apply(head, feat_nbn), netvlad.apply(head, feat_bn), vanished.mean(axis=(1, 2))

    outs = []
    for start in range(0, len(paths), args.batch):
        x = np.stack([normalize(load_image(p)) for p in paths[start:start + args.batch]])
        outs.append(jax.device_get(three(variables, jnp.asarray(x))))
    attended, nbn, bn, vanished = (np.concatenate(o) for o in zip(*outs))
    cos = lambda a, b: float(np.mean(np.sum(a * b, axis=1)))
    print(f"{args.run} ({cfg.name}), {len(paths)} images of {folder}")
    print("| compared with the attended descriptor | max abs difference | mean cosine |")
    print("|---|---|---|")
    print(f"| NetVLAD(feat_nbn), attention left out | {np.abs(attended - nbn).max():.2e} | {cos(attended, nbn):.6f} |")
    print(f"| NetVLAD(feat_bn), the model without attention | {np.abs(attended - bn).max():.2e} | {cos(attended, bn):.6f} |")
    print(f"local features the attention drives below 1e-12: {100 * float(np.mean(vanished)):.2f}% "
          f"(images with any: {int(np.sum(vanished > 0))} of {len(paths)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
