"""The benchmark: models x datasets x thresholds, with the thesis' tables (thesis §5.3, Tables 5.2-5.8).

    python -m jaxvpr.benchmark --config configs/benchmark_indoor.py --out results/indoor
    python -m jaxvpr.benchmark --out results/quick --thresholds 1:5,10:30,25:60,1,10,25 \\
        --dataset /data/gangnam_b2/images/test --dataset /data/baidu_mall/images/test \\
        --model "label=eigenplaces checkpoint=ckpt/eigenplaces_resnet50_2048" \\
        --model "label=salad checkpoint=ckpt/salad resize=322,322 batch_size=16"

Inputs
  models      each a set of ``key=value`` fields (a ``--model`` string, or a dict in a config's ``models``):
              ``label`` (unique name of the row), ``method`` (the tables' method column; default the
              label), ``checkpoint`` (a jaxvpr checkpoint: converted published weights or a training
              workdir; ``config:NAME`` = configs/NAME.py trained on first use) or ``model`` +
              ``random_init=true`` (+ ``seed``), ``resize`` (database and queries: ``N`` shorter side,
              ``H,W``, ``N/14`` shorter side N then each side to a multiple of 14, ``/14`` native size
              rounded so, or empty for native size;
              default: the model's published size if it has one, else native), ``queries_resize``
              (``same``), ``batch_size`` (32), ``backbone`` (the table's backbone column; default from the
              model config), ``test_method`` (the VG benchmark's query methods, ``jaxvpr.testtime``:
              hard_resize (default), single_query, central_crop, five_crops, nearest_crop, maj_voting),
              ``majority_weight`` (0.01), ``pca_dim`` (0: none; else PCA fitted on each database).
  datasets    split folders holding ``database/`` and a queries folder (``DIR`` or ``DIR:queries_night``), or
              ``synthetic:indoor_small`` (every floor of the synthetic indoor preset; ``.../station_b2`` one).
  thresholds  ``metres[:degrees]`` list; the thesis' six are ``1:5,10:30,25:60,1,10,25``.

Every (model, dataset) pair is described once. Its descriptors are cached under
``<out>/descriptors/<model>-<key>/<dataset>-<key>/`` where the keys hash the model config, the weights'
identity (checkpoint folder, step, file sizes and times; or registry name and seed) and the
preprocessing, and the dataset's folders and image lists. A second run, a new threshold or a new
model reuses every cached pair; an interrupted run resumes at the first pair not yet described
(the database's descriptors are kept even when the queries were not reached). Several processes
(``launch/local_multiprocess.sh``) split each extraction, as the evaluator does.

Outputs in ``--out``: ``benchmark.md`` (one table per dataset in the thesis' format -- method,
backbone, descriptor dimension, R@1 per threshold, an ``Upper Bounds`` row -- and the ranking by the
average R@1 over datasets and thresholds), ``benchmark.tex`` (the same tables in LaTeX),
``benchmark.json`` (every recall R@1/5/10/20, upper bounds, counts) and ``benchmark.csv`` (one row
per model x dataset x threshold).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from jaxvpr import cli
from jaxvpr import evaluate as ev
from jaxvpr import parallel
from jaxvpr.data.format import SplitDataset, read_split
from jaxvpr.data.images import TRUNCATED_MODES, ShorterSide, set_truncated_mode

THESIS_THRESHOLDS = "1:5,10:30,25:60,1,10,25"
MODEL_FIELDS = ("label", "method", "model", "checkpoint", "random_init", "seed", "resize", "queries_resize",
                "batch_size", "backbone", "test_method", "majority_weight", "pca_dim")


class BenchmarkConfigError(ValueError):
    """A model, dataset or threshold specification that cannot be used (the message says which and why)."""


# ----------------------------------------------------------------------------- inputs
def parse_threshold_spec(spec: str | Sequence[str]) -> list[ev.Threshold]:
    """``"1:5,10:30,25:60,1,10,25"`` -> the thesis' six thresholds (metres, optionally ``:degrees``)."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    distances, angles = [], []
    for item in filter(None, items):
        d, _, a = item.partition(":")
        distances.append(d)
        angles.append(a or "-")
    if not distances:
        raise BenchmarkConfigError(f"No thresholds in {spec!r}; e.g. {THESIS_THRESHOLDS}.")
    try:
        return ev.parse_thresholds(distances, angles)
    except ValueError as e:
        raise BenchmarkConfigError(f"thresholds {spec!r}: {e}") from None


def threshold_header(t: ev.Threshold) -> str:
    """The thesis' column title: ``1 m 5°`` or ``25 m``."""
    return f"{t.distance_m:g} m" + ("" if t.angle_deg is None else f" {t.angle_deg:g}°")


def parse_resize(spec: Any):
    """A resize field: ``""``/none (native), ``N``, ``H,W`` or ``N/M`` (shorter side N, sides to multiples
    of M; ``/M``: native size, sides rounded to multiples of M)."""
    if isinstance(spec, (list, tuple)):
        spec = ",".join(str(s) for s in spec)
    text = str(spec if spec is not None else "").strip()
    if "/" in text:
        size, _, multiple = text.partition("/")
        try:
            return ShorterSide(int(size or 0), int(multiple))
        except ValueError:
            raise BenchmarkConfigError(f"resize {spec!r}: expected N/M with integers, e.g. 480/14") from None
    try:
        return ev.parse_resize(text)
    except ValueError as e:
        raise BenchmarkConfigError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One row of the tables: a model with its weights and preprocessing (see the module docstring)."""

    label: str
    method: str = ""
    model: str = ""
    checkpoint: str = ""
    random_init: bool = False
    seed: int = 0
    resize: str = "default"
    queries_resize: str = "same"
    batch_size: int = 32
    backbone: str = ""
    test_method: str = "hard_resize"
    majority_weight: float = 0.01
    pca_dim: int = 0

    @classmethod
    def from_fields(cls, fields: dict) -> "ModelEntry":
        unknown = sorted(set(fields) - set(MODEL_FIELDS))
        if unknown:
            raise BenchmarkConfigError(f"model {fields}: unknown field(s) {unknown}; valid: {', '.join(MODEL_FIELDS)}")
        fields = dict(fields)
        if not fields.get("checkpoint") and not fields.get("model"):
            raise BenchmarkConfigError(f"model {fields}: give checkpoint=PATH, or model=NAME random_init=true.")
        if not fields.get("checkpoint") and not _truthy(fields.get("random_init", False)):
            raise BenchmarkConfigError(
                f"model {fields['model']!r} has no checkpoint: convert published weights with "
                "`python -m jaxvpr.convert from-torch` and give checkpoint=PATH, or set random_init=true.")
        if fields.get("checkpoint") and _truthy(fields.get("random_init", False)):
            raise BenchmarkConfigError(f"model {fields}: checkpoint and random_init exclude each other.")
        label = fields.get("label") or fields.get("model") or Path(str(fields["checkpoint"])).name
        resize = fields.get("resize", "default")
        if isinstance(resize, (list, tuple)):
            resize = ",".join(str(s) for s in resize)
        return cls(label=str(label), method=str(fields.get("method") or label), model=str(fields.get("model", "")),
                   checkpoint=str(fields.get("checkpoint", "")),
                   random_init=_truthy(fields.get("random_init", False)), seed=int(fields.get("seed", 0)),
                   resize="default" if resize is None else str(resize),
                   queries_resize=str(fields.get("queries_resize", "same")),
                   batch_size=int(fields.get("batch_size", 32)), backbone=str(fields.get("backbone", "")),
                   test_method=str(fields.get("test_method", "hard_resize")),
                   majority_weight=float(fields.get("majority_weight", 0.01)), pca_dim=int(fields.get("pca_dim", 0)))


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise BenchmarkConfigError(f"expected true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    return bool(value)


def parse_model_spec(spec: str) -> ModelEntry:
    """``"label=salad checkpoint=ckpt/salad resize=322,322"`` -> :class:`ModelEntry`."""
    fields = {}
    for item in spec.split():
        key, eq, value = item.partition("=")
        if not eq:
            raise BenchmarkConfigError(
                f"--model {spec!r}: {item!r} is not key=value (fields: {', '.join(MODEL_FIELDS)})")
        fields[key] = value
    return ModelEntry.from_fields(fields)


def expand_datasets(spec: str) -> list["DatasetEntry"]:
    """A dataset spec -> split entries. ``DIR[:QUERIES]`` is one split; ``synthetic:PRESET[/FLOOR][:QUERIES]``
    names the synthetic data (generated on first use): every floor of an ``indoor_*`` preset (or one),
    or the street city's ``images/test``."""
    spec = str(spec).strip()
    if not spec.startswith("synthetic:"):
        return [DatasetEntry.parse(spec)]
    from jaxvpr.data.format import dataset_root

    body, _, queries = spec[len("synthetic:"):].partition(":")
    preset, _, floor = body.partition("/")
    root = dataset_root("", preset)
    if not preset.startswith("indoor_"):
        return [DatasetEntry(root / "images" / (floor or "test"), queries or "queries")]
    floors = [floor] if floor else sorted(p.name for p in root.iterdir() if (p / "database").is_dir())
    for f in floors:
        if not (root / f / "database").is_dir():
            raise BenchmarkConfigError(f"{spec}: the synthetic preset {preset} has no floor {f!r}")
    return [DatasetEntry(root / f, queries or "queries") for f in floors]


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """A split folder and the name of its queries folder."""

    split_dir: Path
    queries: str = "queries"

    @classmethod
    def parse(cls, spec: str) -> "DatasetEntry":
        """``DIR`` or ``DIR:QUERIES`` (a queries folder name holds no ``/``)."""
        path, sep, queries = str(spec).rpartition(":")
        if not sep or "/" in queries or not queries:
            path, queries = str(spec), "queries"
        return cls(Path(path).expanduser().absolute(), queries)


# ----------------------------------------------------------------------------- models
@dataclasses.dataclass
class LoadedModel:
    """A model entry resolved to its config (weights loaded only when some pair needs describing)."""

    entry: ModelEntry
    cfg: Any
    key: str
    resize: Any
    queries_resize: Any
    _variables: Any = None

    def variables(self):
        if self._variables is None:
            if self.entry.checkpoint:
                from jaxvpr.checkpoint import load_model

                self._variables = load_model(checkpoint_path(self.entry.checkpoint))[1]
            else:
                from jaxvpr.models import init_variables

                self._variables = init_variables(self.cfg, jax.random.key(self.entry.seed))
        return self._variables

    def release(self) -> None:
        self._variables = None


def checkpoint_path(checkpoint: str) -> str:
    """A checkpoint folder, or ``config:NAME``: the best model of ``configs/NAME.py``, trained by jaxvpr
    on first use and cached (as the demos' ``model.init_checkpoint``)."""
    if checkpoint.startswith("config:"):
        from jaxvpr.train.baseline import ensure_trained

        return str(ensure_trained(checkpoint[len("config:"):]))
    return checkpoint


def resolve_model(entry: ModelEntry) -> LoadedModel:
    """The entry's model config and cache key, read from the checkpoint's metadata (no weights loaded)."""
    from jaxvpr.models import model_config

    if entry.checkpoint:
        from jaxvpr.checkpoint import read_meta

        meta, directory, step = read_meta(checkpoint_path(entry.checkpoint))
        cfg = model_config(meta["model"])
        step_dir = directory / str(step)
        files = sorted(p for p in step_dir.rglob("*") if p.is_file())
        weights = {"checkpoint": str(directory), "step": step,
                   "files": [(str(p.relative_to(step_dir)), p.stat().st_size, int(p.stat().st_mtime)) for p in files]}
        if entry.model:  # the row names an architecture: the checkpoint must hold it
            from jaxvpr.models import descriptor_dim

            try:
                want = model_config(entry.model)
            except ValueError as e:
                raise BenchmarkConfigError(f"model {entry.label!r}: {e}") from None
            if (want.backbone, want.head, descriptor_dim(want)) != (cfg.backbone, cfg.head, descriptor_dim(cfg)):
                raise BenchmarkConfigError(
                    f"model {entry.label!r}: {entry.checkpoint} holds {cfg.backbone} + {cfg.head} "
                    f"({descriptor_dim(cfg)}-d), not {entry.model} ({want.backbone} + {want.head}, "
                    f"{descriptor_dim(want)}-d)")
    else:
        try:
            cfg = model_config(entry.model)
        except ValueError as e:
            raise BenchmarkConfigError(f"model {entry.label!r}: {e}") from None
        weights = {"random_init": entry.model, "seed": entry.seed}
    if entry.resize == "default":
        resize = tuple(cfg.image_size) if cfg.image_size is not None else None
    else:
        resize = parse_resize(entry.resize)
    queries_resize = resize if entry.queries_resize == "same" else parse_resize(entry.queries_resize)
    from jaxvpr import testtime

    try:
        testtime.query_preparation(entry.test_method, queries_resize)  # fails before any extraction
    except ValueError as e:
        raise BenchmarkConfigError(f"model {entry.label!r}: {e}") from None
    key = _hash({"model": cfg.to_dict(), "weights": weights, "resize": repr(resize),
                 "queries_resize": repr(queries_resize), "test_method": entry.test_method})
    return LoadedModel(entry, cfg, key, resize, queries_resize)


def backbone_label(cfg) -> str:
    """The tables' backbone column: ``ResNet50``, ``VGG16``, ``DINOv2`` (as thesis Tables 5.2-5.8 write them)."""
    name = cfg.backbone
    if name.startswith("resnet"):
        return "ResNet" + re.match(r"resnet(\d+)", name).group(1)
    if name.startswith("dinov2"):
        return "DINOv2"
    return {"vgg16": "VGG16", "alexnet": "AlexNet"}.get(name, name)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


# ----------------------------------------------------------------------------- the descriptor cache
class DescriptorCache:
    """``<root>/<model>-<key>/<dataset>-<key>/{database,queries}.npz``, written atomically."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def folder(self, model: LoadedModel, split: SplitDataset, dataset_key: str) -> Path:
        return self.root / f"{_slug(model.entry.label)}-{model.key}" / f"{_slug(split.name)}-{dataset_key}"

    def load(self, folder: Path, part: str, expected_rows: int) -> ev.Descriptors | None:
        """The cached descriptors, or None. Every process must agree (else all describe again)."""
        path = folder / f"{part}.npz"
        found = None
        if path.is_file():
            try:
                with np.load(path) as data:
                    found = ev.Descriptors(data["values"], data["valid"], [str(s) for s in data["skipped"]])
            except (OSError, ValueError, KeyError):  # a damaged cache file is described again
                found = None
            if found is not None and len(found.values) != expected_rows:
                found = None
        everywhere = parallel.gather_rows(np.array([found is not None]), jax.process_count()).all()
        return found if everywhere else None

    def save(self, folder: Path, part: str, descriptors: ev.Descriptors) -> None:
        if not parallel.is_main_process():
            return
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{part}.tmp{os.getpid()}.npz"
        np.savez(tmp, values=descriptors.values, valid=descriptors.valid,
                 skipped=np.asarray(descriptors.skipped_paths, dtype=str))
        os.replace(tmp, folder / f"{part}.npz")


def dataset_key(split: SplitDataset, dataset: DatasetEntry) -> str:
    """Hash of the split's folders and image lists (a changed folder describes again)."""
    return _hash({"split": str(dataset.split_dir), "queries": dataset.queries,
                  "database": list(split.database.paths), "query_paths": list(split.queries.paths)})


# ----------------------------------------------------------------------------- the run
def describe_pair(model: LoadedModel, split: SplitDataset, folder: Path, cache: DescriptorCache,
                  describer_of, num_workers: int, progress: bool) -> tuple[ev.Descriptors, ev.Descriptors, bool]:
    """Database and query descriptors of one pair: from the cache, or described (and cached) now."""
    db = cache.load(folder, "database", len(split.database))
    q = cache.load(folder, "queries", len(split.queries))
    if db is not None and q is not None:
        return db, q, True
    describe = describer_of(model)
    batch = model.entry.batch_size
    if db is None:
        db = ev.extract_descriptors(describe, split.database.abs_paths(), batch, model.resize, num_workers,
                                    False, f"{split.name} database", progress, mixed_sizes=True)
        cache.save(folder, "database", db)
    if q is None:
        from jaxvpr import testtime

        q = testtime.describe_queries(describe, split.queries.abs_paths(), model.entry.test_method,
                                      model.queries_resize, batch, num_workers, False, f"{split.name} queries",
                                      progress)
        cache.save(folder, "queries", q)
    return db, q, False


def run_benchmark(models: Sequence[ModelEntry], datasets: Sequence[DatasetEntry], thresholds: Sequence[ev.Threshold],
                  out: str | os.PathLike, num_workers: int = 0, progress: bool = True, pictures=None,
                  log=print) -> dict:
    """Describes every (model, dataset) pair (or reuses its cache), evaluates and writes the reports.

    ``pictures`` (a :class:`jaxvpr.visualize.PictureOptions`) draws each pair's predictions and map
    into ``<out>/pictures/<model>/<dataset>/``. Returns the content of ``benchmark.json``.
    """
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise BenchmarkConfigError(f"model labels must be unique: {labels}")
    if not models or not datasets:
        raise BenchmarkConfigError("the benchmark needs at least one model and one dataset")
    out = Path(out)
    splits = []
    for d in datasets:  # read every dataset first: a missing folder fails before any extraction
        splits.append(read_split(d.split_dir, d.queries))
    names = [s.name if d.queries == "queries" else f"{s.name}/{d.queries}" for s, d in zip(splits, datasets)]
    if len(set(names)) != len(names):
        raise BenchmarkConfigError(f"two datasets have the same name: {names}")
    resolved = [resolve_model(m) for m in models]
    cache = DescriptorCache(out / "descriptors")
    describers: dict[str, Any] = {}

    def describer_of(model: LoadedModel):
        if model.entry.label not in describers:
            from jaxvpr.models import build_model

            describers[model.entry.label] = ev.Describer(build_model(model.cfg)).bind(model.variables())
        return describers[model.entry.label]

    results: dict[str, dict[str, dict]] = {}
    described = reused = 0
    start = time.time()
    for model in resolved:
        results[model.entry.label] = {}
        for split, dataset, name in zip(splits, datasets, names):
            folder = cache.folder(model, split, dataset_key(split, dataset))
            t0 = time.time()
            db, q, cached = describe_pair(model, split, folder, cache, describer_of, num_workers, progress)
            pca = None
            if model.entry.pca_dim:  # fitted on this database's descriptors (VG --pca_dim), no extraction
                from jaxvpr import testtime

                pca = testtime.fit_pca(db.values[db.valid], model.entry.pca_dim)
                db, q = pca.project_descriptors(db), pca.project_descriptors(q)
            res, predictions = ev.evaluate_descriptors(split, db, q, thresholds, dataset.queries,
                                                       model.entry.test_method, model.entry.majority_weight)
            if pca is not None:
                res["pca"] = pca.summary("database")
            res["seconds"] = round(time.time() - t0, 2)
            res["cached"] = cached
            results[model.entry.label][name] = res
            reused += cached
            described += not cached
            if parallel.is_main_process():
                r1 = " ".join(f"{r['recall']['1']:5.1f}" for r in res["results"])
                how = "cached" if cached else f"described in {res['seconds']:.1f} s"
                log(f"{model.entry.label:>24} | {name:<24} | R@1 {r1} | {how}")
                if pictures is not None:
                    from jaxvpr import visualize

                    visualize.save_pictures(pictures, split, predictions, thresholds,
                                            out / "pictures" / _slug(model.entry.label) / _slug(name))
        model.release()
        describers.pop(model.entry.label, None)
    report = build_report(resolved, names, thresholds, results)
    report["seconds"] = round(time.time() - start, 2)
    report["pairs_described"], report["pairs_cached"] = described, reused
    if parallel.is_main_process():
        write_reports(report, out)
    return report


# ----------------------------------------------------------------------------- reports
def build_report(models: Sequence[LoadedModel], datasets: Sequence[str], thresholds: Sequence[ev.Threshold],
                 results: dict) -> dict:
    """benchmark.json: inputs, every result, and the ranking by mean R@1 over datasets and thresholds."""
    from jaxvpr.models import descriptor_dim

    rows = []
    for m in models:
        per_dataset = {d: float(np.mean([r["recall"]["1"] for r in results[m.entry.label][d]["results"]]))
                       for d in datasets}
        rows.append({"label": m.entry.label, "method": m.entry.method, "model": m.cfg.name,
                     "backbone": m.entry.backbone or backbone_label(m.cfg),
                     "descriptor_dim": int(m.entry.pca_dim or descriptor_dim(m.cfg)),
                     "test_method": m.entry.test_method,
                     "checkpoint": m.entry.checkpoint, "random_init": m.entry.random_init,
                     "resize": repr(m.resize), "queries_resize": repr(m.queries_resize),
                     "mean_recall_at_1": float(np.mean(list(per_dataset.values()))),
                     "mean_recall_at_1_per_dataset": per_dataset})
    ranking = sorted(rows, key=lambda r: -r["mean_recall_at_1"])
    for rank, row in enumerate(ranking, 1):
        row["rank"] = rank
    upper = {d: [r["upper_bound"] for r in results[models[0].entry.label][d]["results"]] for d in datasets}
    return {"thresholds": [dataclasses.asdict(t) for t in thresholds], "datasets": datasets,
            "models": ranking, "upper_bounds": upper, "results": results}


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def dataset_table(report: dict, dataset: str, latex: bool = False) -> str:
    """One dataset's R@1 table in thesis order (models ranked overall), best value per column in bold."""
    thresholds = [ev.Threshold(**t) for t in report["thresholds"]]
    heads = [threshold_header(t) for t in thresholds]
    values = [[r["recall"]["1"] for r in report["results"][m["label"]][dataset]["results"]] for m in report["models"]]
    best = np.max(np.asarray(values), axis=0) if values else []
    bold = (lambda s: f"\\textbf{{{s}}}") if latex else (lambda s: f"**{s}**")
    body = []
    for m, vals in zip(report["models"], values):
        cells = [bold(_fmt(v)) if len(values) > 1 and v == b else _fmt(v) for v, b in zip(vals, best)]
        body.append([m["method"], m["backbone"], str(m["descriptor_dim"]), *cells])
    body.append(["Upper Bounds", "", "", *[_fmt(u) for u in report["upper_bounds"][dataset]]])
    header = ["Method", "Backbone", "Desc. Dim.", *heads]
    if latex:
        return _latex_table(header, body, f"{dataset} (Recall@1)")
    return _markdown_table(header, body, f"{dataset} (Recall@1)")


def ranking_table(report: dict, latex: bool = False) -> str:
    datasets = report["datasets"]
    header = ["Rank", "Method", "Backbone", "Desc. Dim.", "Mean R@1", *datasets]
    body = [[str(m["rank"]), m["method"], m["backbone"], str(m["descriptor_dim"]), _fmt(m["mean_recall_at_1"]),
             *[_fmt(m["mean_recall_at_1_per_dataset"][d]) for d in datasets]] for m in report["models"]]
    title = "Ranking by mean R@1 over datasets and thresholds"
    return _latex_table(header, body, title) if latex else _markdown_table(header, body, title)


def _markdown_table(header: list[str], body: list[list[str]], title: str) -> str:
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _latex_escape(text: str) -> str:
    return text.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&") \
        .replace("#", "\\#").replace("°", "$^\\circ$")


def _latex_table(header: list[str], body: list[list[str]], title: str) -> str:
    def cell(s: str) -> str:
        return s if s.startswith("\\textbf") else _latex_escape(s)

    lines = ["\\begin{table}[t]", "\\centering", "\\begin{tabular}{lll" + "r" * (len(header) - 3) + "}",
             "\\toprule", " & ".join(_latex_escape(h) for h in header) + " \\\\", "\\midrule"]
    for row in body:
        if row[0] == "Upper Bounds":
            lines.append("\\midrule")
        lines.append(" & ".join(cell(c) for c in row) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", f"\\caption{{{_latex_escape(title)}}}", "\\end{table}"]
    return "\n".join(lines)


def markdown_report(report: dict, latex: bool = False) -> str:
    parts = [dataset_table(report, d, latex) for d in report["datasets"]] + [ranking_table(report, latex)]
    return "\n\n".join(parts) + "\n"


def csv_report(report: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["label", "method", "backbone", "descriptor_dim", "dataset", "distance_m", "angle_deg",
                     "R@1", "R@5", "R@10", "R@20", "upper_bound", "num_queries", "num_database"])
    for m in report["models"]:
        for d in report["datasets"]:
            res = report["results"][m["label"]][d]
            for r in res["results"]:
                writer.writerow([m["label"], m["method"], m["backbone"], m["descriptor_dim"], d, r["distance_m"],
                                 "" if r["angle_deg"] is None else r["angle_deg"],
                                 *[r["recall"].get(k, "") for k in ("1", "5", "10", "20")], r["upper_bound"],
                                 res["num_queries"], res["num_database"]])
    return buf.getvalue()


def write_reports(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ev.atomic_write_text(out / "benchmark.json", json.dumps(report, indent=2) + "\n")
    ev.atomic_write_text(out / "benchmark.csv", csv_report(report))
    ev.atomic_write_text(out / "benchmark.md", markdown_report(report))
    ev.atomic_write_text(out / "benchmark.tex", markdown_report(report, latex=True))


# ----------------------------------------------------------------------------- command line
def load_config(path: str):
    """``get_config()`` of a benchmark config file (fields ``models``, ``datasets``, ``thresholds``...)."""
    from jaxvpr.train.baseline import load_config_file

    try:
        return load_config_file(path)
    except FileNotFoundError as e:
        raise BenchmarkConfigError(str(e)) from None


@cli.command
def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m jaxvpr.benchmark", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", help="a benchmark config file (configs/benchmark_*.py)")
    parser.add_argument("--model", action="append", default=[], help='"label=... checkpoint=... resize=..." (repeat)')
    parser.add_argument("--dataset", action="append", default=[], help="split folder[:queries folder] (repeat)")
    parser.add_argument("--thresholds", help=f"metres[:degrees] list (default {THESIS_THRESHOLDS})")
    parser.add_argument("--out", help="output folder (reports, descriptor cache)")
    parser.add_argument("--num-workers", type=int, default=None, help="image decoding processes")
    parser.add_argument("--save-predictions", type=int, default=None,
                        help="N: a picture per query with its top-N predictions (at the first threshold)")
    parser.add_argument("--only-wrong", action="store_true", help="pictures only of queries wrong at R@1")
    parser.add_argument("--save-map", action="store_true", help="a map per model and dataset")
    parser.add_argument("--truncated-images", choices=TRUNCATED_MODES, default=None,
                        help="a truncated image: error, or pil (decoded as CosPlace's PIL does); "
                             "default the config's truncated_images, else $JAXVPR_TRUNCATED_IMAGES or error")
    args = parser.parse_args(argv)
    cfg = load_config(args.config) if args.config else None
    models = [parse_model_spec(s) for s in args.model]
    if not models and cfg is not None:
        models = [ModelEntry.from_fields(dict(m)) for m in cfg.models]
    specs = [s for spec in args.dataset for s in spec.split(",")] or (list(cfg.datasets) if cfg else [])
    datasets = [d for spec in specs for d in expand_datasets(spec)]
    thresholds = parse_threshold_spec(args.thresholds or (cfg.thresholds if cfg is not None else THESIS_THRESHOLDS))
    out = args.out or (cfg.out if cfg is not None and cfg.get("out") else None)
    if not out:
        raise BenchmarkConfigError("give --out FOLDER (reports and the descriptor cache go there)")
    num_workers = args.num_workers if args.num_workers is not None else int(cfg.get("num_workers", 0) if cfg else 0)
    save_predictions = args.save_predictions if args.save_predictions is not None else \
        int(cfg.get("save_predictions", 0) if cfg else 0)
    pictures = None
    if save_predictions or args.save_map:
        from jaxvpr.visualize import PictureOptions

        pictures = PictureOptions(num_predictions=save_predictions, only_wrong=args.only_wrong,
                                  save_map=args.save_map)
    set_truncated_mode(args.truncated_images or (cfg.get("truncated_images") if cfg is not None else None),
                       "--truncated-images" if args.truncated_images else "truncated_images")
    parallel.initialize()
    report = run_benchmark(models, datasets, thresholds, out, num_workers, pictures=pictures)
    if parallel.is_main_process():
        print()
        print(markdown_report(report))
        print(f"{report['pairs_described']} pairs described, {report['pairs_cached']} from the cache, "
              f"{report['seconds']:.0f} s; wrote {Path(out) / 'benchmark.md'} (.json .csv .tex)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
