"""The jaxvpr entry point: a config file in, a run out. Dispatches on ``config.recipe``.

    python -m jaxvpr.main --config configs/demo.py --workdir /tmp/jaxvpr_demo [--config.field=value ...]

Any config field can be overridden on the command line; an unknown field is an error. Recipes:

- ``cosplace``: CosPlace training, with GRL domain adaptation when ``grl.enabled`` (thesis ch. 4);
  see ``jaxvpr/train/cosplace.py`` and ``jaxvpr/train/config.py`` for every field.
- ``triplet``: triplet fine-tuning with the VG benchmark's mining (thesis §5.4), several training
  datasets separated or aggregated; see ``jaxvpr/train/triplet.py`` and ``triplet_config`` in
  ``jaxvpr/train/config.py``.
- ``adageo``: AdAGeo (WACV 2021): phase 1 (DDDA pseudo-targets from a few target images) then the
  attentive NetVLAD with a 3-domain GRL and the triplet loss; see ``jaxvpr/train/adageo.py``.
- ``ddda``: AdAGeo's phase 1 alone; see ``jaxvpr/train/ddda.py``.
- ``evaluate``: describe a split's database and query folders with a model and report recalls.

``config.data.truncated_images`` ("error" or "pil"; the thesis configs set "pil", as CosPlace reads
SF-XL's truncated JPEGs) is the decode mode of truncated images for the whole run. A user error --
a missing folder, a malformed image name, an unknown config field, a checkpoint that does not fit,
a non-finite loss -- ends the run with one line ``error: ...`` and status 1; ``--debug`` or
``JAXVPR_DEBUG=1`` shows its traceback (``jaxvpr/cli.py``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

_START = time.time()  # the reported wall time covers the whole process: city, baselines, imports
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder (logs, checkpoints, results). Default: workdir/<config name>.")


def run_evaluate(config: ConfigDict, workdir: Path) -> dict:
    """Evaluates ``config.model`` (``init_checkpoint``, or random weights) on ``data.test_split``'s queries.

    The fields are the training recipes' (``model.init_checkpoint``, ``data.test_split``,
    ``data.test_queries``, ``data.eval_resize``, ``eval.*``): a training config's test set evaluates as is.
    ``eval.search_index`` (``"flat"``: exact, or a FAISS factory string), ``eval.nprobe``,
    ``eval.ef_search``, ``eval.faiss_gpu`` and ``eval.descriptors_on_disk`` (descriptors streamed to
    the output folder and searched memory-mapped) are those of ``jaxvpr.search`` (SF-XL scale).
    """
    from jaxvpr import evaluate as ev
    from jaxvpr import parallel
    from jaxvpr.data import format as fmt
    from jaxvpr.search import SearchOptions

    main = parallel.is_main_process()  # every process describes its share; process 0 reports

    root = fmt.dataset_root(config.data.root, config.data.synthetic_preset, config.data.synthetic_seed)
    checkpoint = config.model.init_checkpoint or None
    model, variables, _ = ev.load_for_evaluation(checkpoint, config.model.name, checkpoint is None, config.seed,
                                                 image_size=config.data.image_size)
    thresholds = ev.parse_thresholds(config.eval.thresholds, config.eval.angles or None)
    resize = ev.parse_resize(config.data.eval_resize)
    split_dir = fmt.resolve_folder(root, config.data.test_split, "Test")
    search = SearchOptions(config.eval.get("search_index", "flat"), config.eval.get("nprobe", 32),
                           config.eval.get("ef_search", 128), gpu=config.eval.get("faiss_gpu", False))
    all_results = {}
    for queries in [q for q in str(config.data.test_queries).split(",") if q]:
        out = workdir / split_dir.name / queries
        res = ev.evaluate(model, variables, split_dir, queries, thresholds, resize,
                          batch_size=config.eval.batch_size, num_workers=config.data.num_workers,
                          skip_corrupt=config.eval.skip_corrupt, out_dir=out,
                          unreadable_queries=config.eval.unreadable_queries, search_options=search,
                          descriptors_dir=out if config.eval.get("descriptors_on_disk", False) else None)
        if main:
            print(ev.format_table(res["results"], f"\n{split_dir.name}/{queries}: {res['num_queries']} queries, "
                                                  f"{res['num_database']} database images"))
            if "num_queries_skipped" in res:
                print(ev.skipped_summary(res))
        all_results[queries] = res
    if main:
        ev.atomic_write_text(workdir / "results.json", json.dumps(all_results, indent=2) + "\n")
        print(f"\nwrote {workdir / 'results.json'}")
    return all_results


def run_training(config: ConfigDict, workdir: Path) -> dict:
    from jaxvpr.train import train

    return train(config, workdir)


RECIPES = {"cosplace": run_training, "triplet": run_training, "adageo": run_training, "ddda": run_training,
           "evaluate": run_evaluate}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["config"].present:
        raise app.UsageError("--config configs/<name>.py is required.")
    filename = flags.FLAGS["config"].config_filename
    if not Path(filename.split(":")[0]).is_file():
        raise app.UsageError(f"--config {filename}: no such config file (the configs are in configs/).")
    config = _CONFIG.value
    if config.recipe not in RECIPES:
        raise app.UsageError(f"config.recipe={config.recipe!r}; known recipes: {sorted(RECIPES)}")
    from jaxvpr import parallel
    from jaxvpr.data.images import set_truncated_mode

    # The decode mode of truncated images for the whole run (absent: $JAXVPR_TRUNCATED_IMAGES, else "error").
    set_truncated_mode(config.data.get("truncated_images"), "config.data.truncated_images")

    if not flags.FLAGS["verbosity"].present:  # library INFO logs (Orbax, XLA) would drown the run's output
        logging.set_verbosity(logging.WARNING)
    parallel.initialize()
    name = Path(flags.FLAGS["config"].config_filename).stem
    workdir = Path(flags.FLAGS.workdir or Path("workdir") / name)
    workdir.mkdir(parents=True, exist_ok=True)
    logging.info("recipe %s, workdir %s", config.recipe, workdir)
    RECIPES[config.recipe](config, workdir)
    if parallel.is_main_process():
        minutes, seconds = divmod(int(round(time.time() - _START)), 60)
        print(f"{config.recipe} run finished in {minutes} min {seconds:02d} s (workdir {workdir}).", flush=True)


if __name__ == "__main__":
    from jaxvpr import cli

    cli.run_absl(main)
