"""The GRL effect measured like a paper reports it: baseline vs no-GRL vs GRL fine-tuning over seeds.

    python bench/grl_effect.py --seeds 0,1,2 --out workdir/grl_effect

For each seed: the CosPlace baseline of configs/study_baseline.py (``--baseline``; the demo's own
configs/demo_baseline.py is shorter, for the demo's 10-minute budget), trained once per seed and
cached like the demo's, then three fine-tunings from it with that seed, at the baseline's crop
size: configs/demo_nogrl.py (the control),
configs/demo.py with lambda = 0 (target images only share the BatchNorm batch: the statistics adapt,
no adversarial gradient; separates that effect from the GRL's) and configs/demo.py (GRL). Each
model is evaluated on the validation queries (pedestrian views of a held-out area, day and night), the day test
queries (pedestrian viewpoints) and the night test queries (the same viewpoints at night), 25 m,
with the model of the best validation epoch (as the trainer selects it: never on test queries).
Also reported, per model: a linear probe's day-vs-night accuracy on held-out descriptors (the test
queries split by viewpoint, half to fit, half to score; 50% = the domains are indistinguishable),
and the chance level of every recall. Prints mean +- std over seeds and writes
``<out>/grl_effect.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxvpr import evaluate as ev  # noqa: E402
from jaxvpr.checkpoint import load_model  # noqa: E402
from jaxvpr.data import format as fmt  # noqa: E402
from jaxvpr.models import build_model, init_variables  # noqa: E402
from jaxvpr.train.baseline import ensure_trained, load_config_file  # noqa: E402
from jaxvpr.train.cosplace import run_model_config, train  # noqa: E402

SETS = (("val", "images/val", "queries"), ("val night", "images/val", "queries_night"),
        ("day", "images/test", "queries"), ("night", "images/test", "queries_night"))


def linear_probe_accuracy(day: np.ndarray, night: np.ndarray, steps: int = 500, l2: float = 1e-3) -> float:
    """Held-out accuracy of an L2-regularised logistic regression telling day from night descriptors.

    ``day[i]`` and ``night[i]`` show the same viewpoint; viewpoints with even index fit, odd score, so
    the probe cannot score on a place it was fitted on.
    """
    x = np.concatenate([day, night]).astype(np.float64)
    y = np.concatenate([np.zeros(len(day)), np.ones(len(night))])
    view = np.concatenate([np.arange(len(day)), np.arange(len(night))])
    fit, score = view % 2 == 0, view % 2 == 1
    mean, std = x[fit].mean(0), x[fit].std(0) + 1e-8
    x = (x - mean) / std
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(steps):  # full-batch gradient descent (convex: the optimum does not depend on tricks)
        p = 1 / (1 + np.exp(-(x[fit] @ w + b)))
        g = p - y[fit]
        w -= 0.5 * (x[fit].T @ g / fit.sum() + l2 * w)
        b -= 0.5 * g.mean()
    pred = (x[score] @ w + b) > 0
    return float(100.0 * np.mean(pred == y[score]))


def mmd_rbf(a: np.ndarray, b: np.ndarray) -> float:
    """Squared maximum mean discrepancy between two descriptor sets, Gaussian kernel with the median
    heuristic bandwidth (unbiased estimate; 0 when the two distributions are the same)."""
    x = np.concatenate([a, b]).astype(np.float64)
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    k = np.exp(-d2 / np.median(d2[np.triu_indices(len(x), 1)]))
    n, m = len(a), len(b)
    kaa, kbb, kab = k[:n, :n], k[n:, n:], k[:n, n:]
    return float((kaa.sum() - np.trace(kaa)) / (n * (n - 1)) + (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
                 - 2 * kab.mean())


def describe_all(model, variables, root: Path, batch_size: int = 64) -> dict:
    """Recall@1/5 of every set and the probe accuracy for one model's variables."""
    describer = ev.Describer(model).bind(variables)
    out, descs, databases = {}, {}, {}
    for name, split_dir, queries in SETS:
        split = fmt.read_split(root / split_dir, queries)
        if split_dir not in databases:  # day and night test queries share the test database
            databases[split_dir] = ev.extract_descriptors(describer, split.database.abs_paths(), batch_size,
                                                          progress=False)
        q = ev.extract_descriptors(describer, split.queries.abs_paths(), batch_size, progress=False, mixed_sizes=True)
        res, _ = ev.evaluate_descriptors(split, databases[split_dir], q, [ev.Threshold(25.0)], queries)
        r = res["results"][0]["recall"]
        out[f"{name}/R@1"], out[f"{name}/R@5"] = r["1"], r["5"]
        descs[name] = q.values
    out["probe_day_vs_night"] = linear_probe_accuracy(descs["day"], descs["night"])
    out["mmd_day_night"] = mmd_rbf(descs["day"], descs["night"])
    return out


def chance_levels(root: Path) -> dict:
    out = {}
    for name, split_dir, queries in SETS:
        split = fmt.read_split(root / split_dir, queries)
        c = ev.chance_recalls(split.database, split.queries, ev.Threshold(25.0), (1, 5))
        out[f"{name}/R@1"], out[f"{name}/R@5"] = c["1"], c["5"]
    out["probe_day_vs_night"] = 50.0
    out["mmd_day_night"] = 0.0
    return out


def run_seed(seed: int, out: Path, baseline_name: str = "study_baseline") -> dict:
    base_cfg = load_config_file(baseline_name)
    base_cfg.seed = seed
    root = fmt.dataset_root("", base_cfg.data.synthetic_preset, base_cfg.data.synthetic_seed)
    rows = {}
    model_cfg = run_model_config(base_cfg)
    model = build_model(model_cfg)
    size = base_cfg.data.image_size
    rows["random init"] = describe_all(model, init_variables(model_cfg, jax.random.key(seed), image_size=(size, size)),
                                       root)
    baseline = ensure_trained(baseline_name, base_cfg)
    rows["baseline"] = describe_all(model, load_model(baseline)[1], root)
    arms = (("no-GRL fine-tuning", "demo_nogrl", None),
            ("target in BatchNorm only (GRL, lambda 0)", "demo", 0.0),
            ("GRL fine-tuning", "demo", None))
    for label, name, weight in arms:
        cfg = load_config_file(name)
        cfg.seed = seed
        cfg.data.image_size = size
        if weight is not None:
            cfg.grl.weight = weight
        cfg.model.init_checkpoint = str(baseline)
        cfg.data.monitor = ()
        cfg.train.eval_before_training = False
        cfg.train.eval_random_init = False
        workdir = out / (f"{name}-seed{seed}" if weight is None else f"{name}-weight{weight:g}-seed{seed}")
        start = time.time()
        train(cfg, workdir)
        rows[label] = describe_all(model, load_model(workdir)[1], root)
        rows[label]["minutes"] = (time.time() - start) / 60
    return {"rows": rows, "chance": chance_levels(root)}


def _mean_std(key: str, values: list) -> str:
    digits = 3 if key == "mmd_day_night" else 1
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="workdir/grl_effect")
    parser.add_argument("--baseline", default="study_baseline",
                        help="config of the CosPlace baseline (configs/<name>.py); demo_baseline = the demo's")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = {}
    for seed in seeds:
        path = out / f"seed{seed}.json"
        if not path.exists():  # a finished seed is not run again
            path.write_text(json.dumps(run_seed(seed, out, args.baseline), indent=2) + "\n")
        per_seed[seed] = json.loads(path.read_text())
        print(f"seed {seed} done", flush=True)
    labels = list(per_seed[seeds[0]]["rows"])
    keys = [f"{s}/R@{n}" for s, _, _ in SETS for n in (1, 5)] + ["probe_day_vs_night", "mmd_day_night"]
    table = {label: {k: [per_seed[s]["rows"][label][k] for s in seeds] for k in keys} for label in labels}
    chance = per_seed[seeds[0]]["chance"]
    header = "| model | " + " | ".join(keys) + " |"
    lines = [f"Baseline configs/{args.baseline}.py; seeds {seeds}; mean ± std; recalls in % at 25 m; "
             "probe = held-out day-vs-night accuracy (%); "
             "MMD = squared MMD between day and night test-query descriptors (RBF kernel, median bandwidth)",
             header, "|" + " --- |" * (len(keys) + 1)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(_mean_std(k, v) for k, v in table[label].items()) + " |")
    lines.append("| chance level | " + " | ".join(f"{chance[k]:.1f}" if k != "mmd_day_night" else "0"
                                                  for k in keys) + " |")
    text = "\n".join(lines)
    print(text)
    (out / "grl_effect.json").write_text(json.dumps({"seeds": seeds, "table": table, "chance": chance}, indent=2) + "\n")
    (out / "grl_effect.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
