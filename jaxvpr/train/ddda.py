"""AdAGeo phase 1: the few-shot Domain-Driven Data Augmentation (DDDA) trainer and the pseudo-targets.

Berton et al., "Adaptive-Attentive Geolocalization from few queries" (WACV 2021) §4.1, §5.2, with
BiOST's autoencoders (``jaxvpr/models/ddda.py``); facts in ``shared/reference/recipes_facts.md``
§A.1 (cited A.1.x). The story of a run, top to bottom (:func:`train`):

1. data (A.1.1): domain **B = source S**, every image of ``data.source_folders`` (default the train
   queries: what is translated later, the recommended choice -- which source images AdAGeo used is
   unknown); domain **A = target T**, ``data.n_target`` images drawn once from the sorted
   ``data.target_folder`` (:func:`select_target_images`), listed in ``<workdir>/target_images.txt``
   so that phase 2 uses the same images as its GRL target domain.
2. phase I (A.1.4): the source autoencoder alone, ``L1(Dec_S(Enc_S(x)), x) + 0.001 mean(z ** 2)``,
   Adam 2e-4 betas (0.5, 0.999), batch 1, ``phase1_epochs`` epochs of ``|B|`` steps.
3. phase II (A.1.4): both autoencoders start from the phase-I one (``phase2_init``); step i pairs
   target image ``A[i mod |A|]`` with a uniformly random source image (BiOST's ``UnalignedDataset``,
   i shuffled per epoch); two Adams, T on loss_T and S on loss_S (``phase2_grads``, the "frozen"
   bars of AdAGeo eq. 2). ``n_target = 0`` skips phase II: the "pseudo-target" is then the phase-I
   reconstruction ``Dec_S(Enc_S(x))`` (a degenerate baseline, no target domain at all).
4. generation (A.1.6): every image of each ``data.translate`` folder (train and val queries)
   becomes ``Dec_T(Enc_S(x))`` at its own resolution, JPEG quality 95, same file name (the
   ``@utm_e@utm_n@...`` name carries the label), in ``<workdir>/pseudo_targets/<folder>``;
   ``results.json`` and ``pseudo_targets.png`` (AdAGeo Fig. 3: sources, pseudo-targets, targets).

Training augmentation (A.1.3, BiOST ``resize_and_crop``): resize to ``resize`` x ``resize`` ignoring
the aspect ratio (bicubic), random ``crop`` x ``crop``, horizontal flip p = 0.5, random rotation
uniform in +-``rotation_deg`` degrees (nearest, black corners), then ``(x / 255 - 0.5) / 0.5`` in [-1, 1].

Learning rate (A.1.5, BiOST ``niter`` / ``niter_decay``): after e completed epochs of a phase of E
epochs the rate is ``lr * (1 - max(0, e + 2 - (E - decay_epochs)) / (decay_epochs + 1))``: with
E = 80, decay 20 constant for 59 epochs then linear, the 80th epoch at 0 (:func:`lr_multiplier`).

The step of each phase is a pure ``step(state, batch) -> (state, metrics)`` jitted once. The data
of step k of epoch e of phase p depends only on ``(seed, p, e, k)``, and checkpoints (Orbax, atomic)
hold params, both Adam states and the position, so re-running the same command in the same workdir
resumes exactly: the final parameters are bit-identical to an uninterrupted run's.

Defaults are BiOST's (= the paper's where it says: lr, batch 1, the 0.001 KL weight). Unknown for
AdAGeo (not in the paper, never released): the source images (B), the training resolution (BiOST:
286 -> 256), the epochs (BiOST: 60 + 20 per phase) and iterations per epoch (BiOST: |B|), the target
sampling seed, and whether the feature cycle was on (BiOST code: yes; the paper's eq. 4: no).
"""

from __future__ import annotations

import concurrent.futures
import collections
import functools
import json
import math
import os
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from ml_collections import ConfigDict
from PIL import Image

from jaxvpr.data import format as fmt
from jaxvpr.data.images import ConcatImages, CorruptImageError, FileImages, ImageSource
from jaxvpr.evaluate import atomic_write_text
from jaxvpr.models import ddda
from jaxvpr.train.config import ConfigError
from jaxvpr.train.loop import NonFiniteLossError, data_root

# Tags separating the random streams derived from the seed.
_TAG_TARGET, _TAG_ORDER, _TAG_SOURCE, _TAG_AUGMENT = 11, 12, 13, 14
MAX_CORRUPT_RETRIES = 16


def ddda_config() -> ConfigDict:
    """Every field of a DDDA run, with BiOST's defaults (see the module docstring for what is unknown)."""
    c = ConfigDict()
    c.recipe = "ddda"
    c.seed = 0

    # Data: folders relative to data.root ($JAXVPR_DATA; or the synthetic city of synthetic_preset).
    c.data = ConfigDict()
    c.data.root = ""
    c.data.synthetic_preset = ""
    c.data.synthetic_seed = 0
    c.data.synthetic_domains = ""          # the synthetic city's target domains to render ("" all)
    c.data.source_folders = "images/train/queries"   # BiOST domain B = source S, comma-separated (A.1.1)
    c.data.target_folder = "images/target/night"     # BiOST domain A = target T: the few shots come from here
    c.data.n_target = 5                    # target images drawn (AdAGeo: 5); -1 all; 0 none: no phase II
    c.data.translate = "images/train/queries,images/val/queries"  # folders turned into pseudo-targets (A.1.6)
    c.data.resize = 286                    # training: resize to resize x resize (aspect ignored, bicubic) ...
    c.data.crop = 256                      # ... then a random crop x crop (A.1.3); a multiple of 4
    c.data.hflip = True                    # random horizontal flip, p = 0.5
    c.data.rotation_deg = 7.0              # random rotation in +-rotation_deg degrees (0: none)
    c.data.num_workers = 2                 # threads loading and augmenting training images / pseudo-targets

    # BiOST's networks (A.1.2); smaller sizes only for tests and benchmarks.
    c.model = ConfigDict()
    c.model.ngf = 64
    c.model.n_downsampling = 2
    c.model.n_res_blocks = 4

    c.train = ConfigDict()
    c.train.phase1_epochs = 80             # BiOST niter + niter_decay = 60 + 20 (AdAGeo: unknown)
    c.train.phase2_epochs = 80
    c.train.decay_epochs = 20              # niter_decay: the lr decays linearly to 0 over these last epochs
    c.train.iterations_per_epoch = 0       # 0: |B| (BiOST); a demo caps it
    c.train.lr = 2e-4                      # Adam, betas (0.5, 0.999), batch 1 (AdAGeo §5.2)
    c.train.feature_cycle = False          # False: the paper's eq. 4; True: BiOST's code (+0.001 MSE)
    c.train.checkpoint_every = 1000        # steps; also at every epoch end
    c.train.keep_checkpoints = 2
    c.train.log_every = 100

    c.generate = ConfigDict()
    c.generate.batch_size = 8              # images of one size translated together
    c.generate.jpeg_quality = 95
    c.generate.preview_images = 4          # columns of pseudo_targets.png
    return c


# Fields that change what a run computes: resuming a workdir with other values is refused.
MATTERS = ("seed", "data.root", "data.synthetic_preset", "data.synthetic_seed", "data.source_folders",
           "data.target_folder", "data.n_target", "data.resize", "data.crop", "data.hflip", "data.rotation_deg",
           "model.ngf", "model.n_downsampling", "model.n_res_blocks", "train.phase1_epochs", "train.phase2_epochs",
           "train.decay_epochs", "train.iterations_per_epoch", "train.lr", "train.feature_cycle")


# ----------------------------------------------------------------------------- data
def split_list(text: str) -> list[str]:
    return [s.strip() for s in str(text).split(",") if s.strip()]


def select_target_images(paths: list[str], n_target: int, seed: int) -> list[str]:
    """The few-shot target images: ``n_target`` of ``paths`` (sorted first) drawn without replacement
    with ``numpy.random.default_rng([seed, 11])``, kept in folder order; -1 all, 0 none.

    >>> select_target_images([f"{i:02d}.jpg" for i in range(10)], 3, seed=0)
    ['01.jpg', '02.jpg', '04.jpg']
    """
    paths = sorted(paths)
    n = int(n_target)
    if n == -1:
        return paths
    if n < -1 or n > len(paths):
        raise ConfigError(f"config.data.n_target={n_target}: choose 0..{len(paths)} (the target folder holds "
                          f"{len(paths)} images) or -1 for all of them.")
    chosen = np.random.default_rng([int(seed), _TAG_TARGET]).choice(len(paths), size=n, replace=False)
    return [paths[i] for i in sorted(chosen)]


def target_images(folder, n_target: int, seed: int) -> ImageSource:
    """The few-shot target images of ``folder`` (image files or a packed folder) chosen by
    :func:`select_target_images` from the folder's relative paths; their names are
    ``<folder>/<relative path>``."""
    images, names = fmt.folder_images(folder)
    row = {p: i for i, p in enumerate(names)}
    return images.take([row[p] for p in select_target_images(list(names), n_target, seed)])


def ddda_augment(image: np.ndarray, rng: np.random.Generator, resize: int, crop: int, rotation_deg: float = 7.0,
                 hflip: bool = True) -> np.ndarray:
    """BiOST's training transform (A.1.3) of a uint8 (H, W, 3) image -> float32 (crop, crop, 3) in [-1, 1].

    ``Resize([resize, resize], BICUBIC)`` (aspect ignored; ``resize`` 0: keep the size), ``RandomCrop(crop)``,
    ``RandomHorizontalFlip()``, ``RandomRotation(rotation_deg)`` (PIL nearest, zero fill),
    ``ToTensor``, ``Normalize(0.5, 0.5)``. The random numbers (crop position, flip, angle) are
    always drawn in that order, so a stream gives the same draws whatever the options.
    """
    pil = Image.fromarray(np.asarray(image, np.uint8))
    if resize and pil.size != (resize, resize):
        pil = pil.resize((int(resize), int(resize)), Image.BICUBIC)
    w, h = pil.size
    if crop > min(h, w):
        raise ValueError(f"ddda_augment: crop {crop} is larger than the image ({h}x{w} after resize {resize}).")
    top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    flip = bool(rng.random() < 0.5)
    angle = float(rng.uniform(-rotation_deg, rotation_deg))
    pil = pil.crop((left, top, left + crop, top + crop))
    if hflip and flip:
        pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
    if rotation_deg:
        pil = pil.rotate(angle, resample=Image.NEAREST, expand=False, fillcolor=(0, 0, 0))
    x = np.asarray(pil, np.float32) / np.float32(255.0)
    return (x - np.float32(0.5)) / np.float32(0.5)


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (``ToTensor`` + ``Normalize(0.5, 0.5)``)."""
    return (np.asarray(image, np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] (tanh output) -> uint8 [0, 255], rounded."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def load_train_image(images: ImageSource, index: int) -> tuple[np.ndarray, int]:
    """``(image, index)`` of image ``index``; a corrupt one is logged and the next one taken."""
    for attempt in range(MAX_CORRUPT_RETRIES):
        i = (index + attempt) % len(images)
        try:
            return images.load(i), i
        except CorruptImageError as e:
            logging.warning("skipping %s", e)
    raise CorruptImageError(images[index], f"it and the {MAX_CORRUPT_RETRIES - 1} images after it are unreadable")


class StepData:
    """The images of every step, a pure function of ``(seed, phase, epoch, step)`` (exact resume).

    Phase 1: epoch e visits the source images in the permutation ``rng(seed, 12, 1, e, pass)``.
    Phase 2 (BiOST ``UnalignedDataset`` with ``shuffle=True``): epoch e visits the items
    i = 0..max(|A|, |B|) - 1 in a permutation; item i is target ``A[i mod |A|]`` and a source image
    drawn uniformly by ``rng(seed, 13, e, step)``. Augmentation: ``rng(seed, 14, phase, e, step, domain)``.
    """

    def __init__(self, config: ConfigDict, sources: ImageSource, targets: ImageSource):
        d = config.data
        self.seed, self.sources, self.targets = int(config.seed), sources, targets
        self.augment = functools.partial(ddda_augment, resize=int(d.resize), crop=int(d.crop),
                                         rotation_deg=float(d.rotation_deg), hflip=bool(d.hflip))
        self._perms = collections.OrderedDict()

    def _perm(self, *key: int) -> np.ndarray:
        if key not in self._perms:
            n = len(self.sources) if key[0] == 1 else max(len(self.sources), len(self.targets))
            self._perms[key] = np.random.default_rng([self.seed, _TAG_ORDER, *key]).permutation(n)
            while len(self._perms) > 4:
                self._perms.popitem(last=False)
        return self._perms[key]

    def _image(self, images, index, phase, epoch, step, domain) -> np.ndarray:
        image, _ = load_train_image(images, int(index))
        rng = np.random.default_rng([self.seed, _TAG_AUGMENT, phase, epoch, step, domain])
        return self.augment(image, rng)[None]

    def __call__(self, phase: int, epoch: int, step: int) -> dict[str, np.ndarray]:
        if phase == 1:
            n = len(self.sources)
            index = self._perm(1, epoch, step // n)[step % n]
            return {"image": self._image(self.sources, index, 1, epoch, step, 0)}
        n = max(len(self.sources), len(self.targets))
        item = int(self._perm(2, epoch, step // n)[step % n])
        source = np.random.default_rng([self.seed, _TAG_SOURCE, epoch, step]).integers(len(self.sources))
        return {"target": self._image(self.targets, item % len(self.targets), 2, epoch, step, 0),
                "source": self._image(self.sources, source, 2, epoch, step, 1)}


def prefetched(fn, keys: list, workers: int):
    """``fn(*key)`` for each key in order, computed ``2 * workers`` ahead on threads (0: inline)."""
    if workers <= 0:
        for key in keys:
            yield fn(*key)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        queue = collections.deque()
        it = iter(keys)
        for key in it:
            queue.append(pool.submit(fn, *key))
            if len(queue) >= 2 * workers:
                break
        for key in it:
            yield queue.popleft().result()
            queue.append(pool.submit(fn, *key))
        while queue:
            yield queue.popleft().result()


# ----------------------------------------------------------------------------- the steps
def lr_multiplier(epochs_done, epochs: int, decay_epochs: int):
    """BiOST's ``lambda_rule`` (A.1.5): ``1 - max(0, e + 2 - (epochs - decay)) / (decay + 1)`` after e epochs.

    With 80 epochs and decay 20: 1 for e = 0..58, then 20/21, ..., 0 at e = 79. Works on ints and jnp arrays.
    """
    niter = epochs - decay_epochs
    return 1.0 - jnp.maximum(0, epochs_done + 2 - niter) / float(decay_epochs + 1)


def make_optimizer(lr: float, steps_per_epoch: int, epochs: int, decay_epochs: int) -> optax.GradientTransformation:
    """``ddda_optimizer`` (Adam, betas 0.5, 0.999) with the per-epoch BiOST schedule on Adam's own count."""
    schedule = lambda count: lr * lr_multiplier(count // steps_per_epoch, epochs, decay_epochs)  # noqa: E731
    return ddda.ddda_optimizer(schedule)


def make_phase1_step(model: ddda.DDDAAutoencoder, tx: optax.GradientTransformation):
    """``step({'params', 'opt'}, {'image'}) -> (state, metrics)``: one Adam step on the phase-I loss."""

    def step(state, batch):
        grad_fn = jax.value_and_grad(ddda.phase1_loss, has_aux=True)
        (loss, terms), grads = grad_fn(state["params"], batch["image"], model)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, dict(terms, loss=loss)

    return step


def make_phase2_step(model: ddda.DDDAAutoencoder, tx: optax.GradientTransformation, feature_cycle: bool):
    """``step({'params_S', 'params_T', 'opt_S', 'opt_T'}, {'target', 'source'}) -> (state, metrics)``.

    Both gradients at the same params (``phase2_grads``), then both Adams (BiOST steps T first and
    S after, through T's already-updated weights: a second-order difference, see ``phase2_grads``).
    """

    def step(state, batch):
        g_s, g_t, terms = ddda.phase2_grads(state["params_S"], state["params_T"], batch["target"], batch["source"],
                                            feature_cycle, model)
        up_s, opt_s = tx.update(g_s, state["opt_S"], state["params_S"])
        up_t, opt_t = tx.update(g_t, state["opt_T"], state["params_T"])
        return {"params_S": optax.apply_updates(state["params_S"], up_s),
                "params_T": optax.apply_updates(state["params_T"], up_t),
                "opt_S": opt_s, "opt_T": opt_t}, terms

    return step


@functools.lru_cache(maxsize=8)
def compiled_step(phase: int, sizes: tuple, lr: float, steps_per_epoch: int, epochs: int, decay: int,
                  feature_cycle: bool):
    """``(step, init)`` of a phase, each jitted once (cached: a resumed run or a test reuses them).

    ``init(seed)`` (phase 1) gives the fresh source autoencoder and its Adam state; ``init(params)``
    (phase 2) both autoencoders from the phase-I params (``phase2_init``) and their Adam states.
    The init draws from an ``rbg`` key of the seed: the same distributions (BiOST's init), but XLA
    compiles it in seconds where the ~30 threefry draws take ~15 s on a CPU.
    """
    model = ddda.DDDAAutoencoder(*sizes)
    tx = make_optimizer(lr, steps_per_epoch, epochs, decay)
    if phase == 1:
        def init(seed):
            params = ddda.init_autoencoder(jax.random.key(seed, impl="rbg"), model)
            return {"params": params, "opt": tx.init(params)}

        return jax.jit(make_phase1_step(model, tx), donate_argnums=(0,)), jax.jit(init)

    def init(phase1_params):
        p_s, p_t = ddda.phase2_init(phase1_params)
        return {"params_S": p_s, "params_T": p_t, "opt_S": tx.init(p_s), "opt_T": tx.init(p_t)}

    return jax.jit(make_phase2_step(model, tx, feature_cycle), donate_argnums=(0,)), jax.jit(init)


def on_device(state: dict) -> dict:
    """The state committed to the first local device, whether fresh or restored, so that the jitted
    step sees the same kind of argument (and compiles once) in a new and in a resumed run."""
    return jax.device_put(state, jax.local_devices()[0])


# ----------------------------------------------------------------------------- checkpoints
class PhaseCheckpoints:
    """``<workdir>/checkpoints/phase{1,2}``: Orbax steps numbered by the steps done in the phase,
    items ``state`` (params and Adam states) and ``meta`` (position, logged losses, seconds). Orbax
    writes each step to a temporary folder and renames it: a killed run leaves only whole steps.

    DDDA runs in one process (in a multi-process AdAGeo run, process 0 while the others wait at a
    barrier): the manager is that process's alone (``active_processes``), or Orbax's save would wait
    at a barrier for processes that never come."""

    def __init__(self, workdir: Path, phase: int, keep: int = 2):
        me = jax.process_index()
        folder = workdir / "checkpoints" / f"phase{phase}"
        folder.mkdir(parents=True, exist_ok=True)  # (Orbax's create=True is refused with active_processes)
        self.manager = ocp.CheckpointManager(
            folder, item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=False,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"jaxvpr_ddda_phase{phase}")))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, done: int, state: dict, meta: dict) -> None:
        if done in self.manager.all_steps():
            return
        # as host numpy arrays: Orbax refuses a process-local jax.Array once several processes exist
        self.manager.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(jax.device_get(state)),
                                                        meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, template: dict, step: int | None = None) -> tuple[dict, dict]:
        """``(state, meta)`` of ``step`` (default the latest) in the structure of ``template``."""
        step = self.latest() if step is None else step
        abstract = jax.tree.map(lambda x: np.zeros(np.shape(x), x.dtype), template)  # restored as numpy (on_device)
        try:
            r = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                   meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise ConfigError(f"Cannot resume from {self.manager.directory}/{step}: {e}\nIt was written by another "
                              "model or setting; use another workdir (nothing was changed in this one).") from e
        return r["state"], r["meta"]

    def close(self) -> None:
        self.manager.close()


def check_resumable(config: ConfigDict, workdir: Path) -> None:
    """Writes ``<workdir>/ddda_config.json`` on the first run; later runs must agree on :data:`MATTERS`."""
    path = workdir / "ddda_config.json"
    current = config.to_dict()
    if not path.exists():
        atomic_write_text(path, json.dumps(json.loads(config.to_json_best_effort()), indent=2) + "\n")
        return
    saved = json.loads(path.read_text())

    def get(tree, dotted):
        for k in dotted.split("."):
            tree = tree.get(k, "<missing>") if isinstance(tree, dict) else "<missing>"
        return tree

    diffs = [f"{f}: saved {get(saved, f)!r}, now {get(current, f)!r}" for f in MATTERS
             if json.dumps(get(saved, f)) != json.dumps(get(current, f))]
    if diffs:
        raise ConfigError(f"{workdir} holds a DDDA run with another config; refusing to resume it:\n  "
                          + "\n  ".join(diffs) + "\nUse another workdir, or restore these values.")


# ----------------------------------------------------------------------------- the loop of one phase
class JsonlLog:
    """``<workdir>/ddda_log.jsonl``: one JSON object per ``log_every`` steps (interval means), also printed."""

    def __init__(self, workdir: Path):
        self.file = open(workdir / "ddda_log.jsonl", "a", buffering=1)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        print(f"ddda {shown}", flush=True)

    def close(self) -> None:
        self.file.close()


def _check_finite(metrics: dict, phase: int, epoch: int, step: int, keys) -> dict:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = {k: values[k] for k in keys if not math.isfinite(values[k])}
    if bad:
        raise NonFiniteLossError(
            f"DDDA phase {'I' if phase == 1 else 'II'}: the loss became non-finite ({bad}) at epoch {epoch}, step "
            f"{step} of the epoch (both counted from 0). Training stopped; the checkpoints already written are "
            f"intact (the last good one is the latest in <workdir>/checkpoints/phase{phase}). Lower train.lr and "
            "use a new workdir.")
    return values


def run_phase(phase: int, state: dict, meta: dict, step_fn, data: StepData, ckpt: PhaseCheckpoints, log: JsonlLog,
              config: ConfigDict, epochs: int, steps_per_epoch: int) -> tuple[dict, dict]:
    """Epochs of one phase from the position in ``meta``; returns the final ``(state, meta)``.

    ``meta``: ``done`` (steps done in the phase), ``start`` (the first step's losses), ``end`` (the
    mean losses of the last complete epoch), ``epoch_sums`` / ``epoch_count`` (the epoch in
    progress), ``seconds``. The loss of step k is checked while step k + 1 runs, and always before
    a checkpoint, so no checkpoint holds params that gave a non-finite loss.
    """
    t = config.train
    keys = ("loss",) if phase == 1 else ("loss_T", "loss_S")
    total = epochs * steps_per_epoch
    done = int(meta["done"])
    if done >= total:
        return state, meta
    positions = [(phase, g // steps_per_epoch, g % steps_per_epoch) for g in range(done, total)]
    batches = prefetched(data, positions, int(config.data.num_workers))
    interval, pending, t0, t_log = {}, None, time.time(), time.time()

    def take(pending):
        (p_epoch, p_step, metrics) = pending
        values = _check_finite(metrics, phase, p_epoch, p_step, keys)
        if not meta.get("start"):
            meta["start"] = values
        for k, v in values.items():
            interval[k] = interval.get(k, 0.0) + v
            meta["epoch_sums"][k] = meta["epoch_sums"].get(k, 0.0) + v
        interval["_n"] = interval.get("_n", 0) + 1
        meta["epoch_count"] += 1

    try:
        for (_, epoch, k), batch in zip(positions, batches):
            state, metrics = step_fn(state, batch)
            if pending is not None:
                take(pending)
            pending = (epoch, k, metrics)
            done += 1
            end_of_epoch = k + 1 == steps_per_epoch
            if done % int(t.log_every) == 0 or end_of_epoch or done % int(t.checkpoint_every) == 0:
                take(pending)
                pending = None
            if done % int(t.log_every) == 0:
                n = interval.pop("_n")
                lr = float(t.lr) * float(lr_multiplier(epoch, epochs, int(t.decay_epochs)))
                log.write({"phase": phase, "epoch": epoch, "step": k + 1, "done": done, "lr": lr,
                           "steps_averaged": n, "images_per_s": n * (1 if phase == 1 else 2) / (time.time() - t_log),
                           **{name: v / n for name, v in interval.items()}})
                interval.clear()
                t_log = time.time()
            if end_of_epoch:
                meta["end"] = {name: v / meta["epoch_count"] for name, v in meta["epoch_sums"].items()}
                meta["epoch_sums"], meta["epoch_count"] = {}, 0
            if end_of_epoch or done % int(t.checkpoint_every) == 0:
                meta.update(done=done, seconds=meta["seconds"] + time.time() - t0)
                t0 = time.time()
                ckpt.save(done, state, meta)
    finally:
        batches.close()
    return state, meta


def _new_meta() -> dict:
    return {"done": 0, "start": {}, "end": {}, "epoch_sums": {}, "epoch_count": 0, "seconds": 0.0}


# ----------------------------------------------------------------------------- pseudo-targets
@functools.lru_cache(maxsize=4)
def _translate_fn(sizes: tuple):
    model = ddda.DDDAAutoencoder(*sizes)
    return jax.jit(functools.partial(ddda.pseudo_target, model=model))


def translate_images(params_S: dict, params_T: dict, images: np.ndarray, sizes: tuple = (64, 2, 4)) -> np.ndarray:
    """Pseudo-targets ``Dec_T(Enc_S(x))`` of uint8 images (N, H, W, 3) of one size -> uint8 (N, H, W, 3).

    Sides that are not multiples of ``2 ** n_downsampling`` are padded reflectively at the bottom
    and right, and the output cropped back.
    """
    n, h, w, _ = images.shape
    m = 2 ** sizes[1]
    ph, pw = -h % m, -w % m
    x = to_unit_range(images)
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect")
    y = _translate_fn(tuple(sizes))(params_S, params_T, jnp.asarray(x))
    return to_uint8(np.asarray(y)[:, :h, :w])


def generate_pseudo_targets(params_S: dict, params_T: dict, source_folder, out_folder, sizes: tuple = (64, 2, 4),
                            batch_size: int = 8, quality: int = 95, num_workers: int = 2) -> int:
    """Writes the pseudo-target of every image of ``source_folder`` (image files or a packed folder)
    into ``out_folder`` (AdAGeo §4.1, A.1.6) as image files.

    Same relative paths and file names (JPEG, ``quality``), each at its source's resolution. Images
    of equal size go through the network ``batch_size`` at a time (a short last batch is padded by
    repeating its first image, so each size compiles once). Everything is written into the sibling
    ``<out_folder>.tmp-<pid>`` and renamed when complete: ``out_folder`` exists only whole, and an
    existing one is kept (returns its image count). Returns the number of images.
    """
    from jaxvpr.data.pipeline import group_by_size

    source_folder, out_folder = Path(source_folder), Path(out_folder)
    images, rel_paths = fmt.folder_images(source_folder)
    if out_folder.is_dir():
        return len(fmt.list_images(out_folder))
    out_folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_folder.parent.glob(f"{out_folder.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_folder.parent / f"{out_folder.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    groups = group_by_size(images)
    if None in groups:
        raise CorruptImageError(images[int(groups[None][0])], "its header cannot be read")
    workers = max(1, int(num_workers))

    def write(rel: str, image: np.ndarray) -> None:
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target, format="JPEG", quality=int(quality))

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        writes = []
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                chunk = [int(i) for i in indices[start:start + batch_size]]
                loaded = list(pool.map(images.load, chunk))
                padded = loaded + [loaded[0]] * (min(batch_size, len(indices)) - len(loaded))
                out = translate_images(params_S, params_T, np.stack(padded), sizes)
                writes += [pool.submit(write, rel_paths[i], out[j]) for j, i in enumerate(chunk)]
        for f in writes:
            f.result()
    os.rename(tmp, out_folder)
    return len(rel_paths)


def preview_grid(sources: ImageSource, pseudo: ImageSource, targets: ImageSource, out_path: Path,
                 height: int = 160) -> None:
    """AdAGeo Fig. 3 as a PNG: source images (row 1), their pseudo-targets (row 2), targets (row 3)."""
    rows = [r for r in (sources, pseudo, targets) if len(r)]
    first_h, first_w = sources.size(0) or sources.load(0).shape[:2]
    tile = (max(1, round(first_w * height / first_h)), height)
    gap = 4
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * (tile[0] + gap) + gap, len(rows) * (tile[1] + gap) + gap), (255, 255, 255))
    for r, images in enumerate(rows):
        for c in range(len(images)):
            img = Image.fromarray(images.load(c)).resize(tile, Image.BICUBIC)
            grid.paste(img, (gap + c * (tile[0] + gap), gap + r * (tile[1] + gap)))
    tmp = out_path.parent / f"{out_path.name}.tmp{os.getpid()}.png"
    grid.save(tmp)
    os.replace(tmp, out_path)


def output_folder(workdir: Path, root: Path, folder: str) -> tuple[str, Path]:
    """``(folder relative to the dataset root, <workdir>/pseudo_targets/<that>)``."""
    path = Path(folder).expanduser()
    if path.is_absolute():
        try:
            rel = path.relative_to(root)
        except ValueError:
            rel = Path(*path.parts[1:])
    else:
        rel = path
    return rel.as_posix(), workdir / "pseudo_targets" / rel


# ----------------------------------------------------------------------------- the run
def _sizes(config: ConfigDict) -> tuple:
    m = config.model
    return int(m.ngf), int(m.n_downsampling), int(m.n_res_blocks)


def write_target_list(workdir: Path, targets: list[str]) -> None:
    """Writes ``target_images.txt`` (absolute paths), or checks that the saved one is the same."""
    path = workdir / "target_images.txt"
    text = "".join(p + "\n" for p in targets)
    if path.exists() and path.read_text() != text:
        raise ConfigError(f"{path} lists other target images than this run draws (the target folder changed?); "
                          "use another workdir.")
    if not path.exists():
        atomic_write_text(path, text)


def train(config: ConfigDict, workdir) -> dict:
    """Runs (or resumes) phases I and II in ``workdir``, then writes the pseudo-targets; returns results.json."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    d, t = config.data, config.train
    if int(d.crop) % 2 ** int(config.model.n_downsampling):
        raise ConfigError(f"config.data.crop={d.crop} must be a multiple of {2 ** int(config.model.n_downsampling)}.")
    check_resumable(config, workdir)
    root = data_root(config)
    sizes, seed = _sizes(config), int(config.seed)

    # 1. data
    sources = ConcatImages([fmt.folder_images(fmt.resolve_folder(root, name, "DDDA source (data.source_folders)"))[0]
                            for name in split_list(d.source_folders)])
    if not len(sources):
        raise ConfigError("config.data.source_folders is empty: name the source image folder(s), comma-separated.")
    targets = ConcatImages([])
    if int(d.n_target) != 0:
        targets = target_images(fmt.resolve_folder(root, d.target_folder, "DDDA target (data.target_folder)"),
                                d.n_target, seed)
    write_target_list(workdir, list(targets))
    steps_per_epoch = int(t.iterations_per_epoch) or len(sources)
    print(f"DDDA: {len(sources)} source images, {len(targets)} target images, {steps_per_epoch} steps per epoch, "
          f"{t.phase1_epochs} + {t.phase2_epochs if targets else 0} epochs; workdir {workdir}", flush=True)
    data = StepData(config, sources, targets)
    log = JsonlLog(workdir)
    keep = int(t.get("keep_checkpoints", 2))
    results = {"recipe": "ddda", "n_source": len(sources), "n_target": len(targets), "target_images": list(targets),
               "steps_per_epoch": steps_per_epoch}
    ckpt1, ckpt2 = PhaseCheckpoints(workdir, 1, keep), PhaseCheckpoints(workdir, 2, keep)
    try:
        # 2. phase I: the source autoencoder
        step1, init1 = compiled_step(1, sizes, float(t.lr), steps_per_epoch, int(t.phase1_epochs),
                                     int(t.decay_epochs), False)
        state1 = on_device(init1(seed))
        phase2_started = bool(len(targets)) and ckpt2.latest() is not None
        if phase2_started:
            meta1 = ckpt1.restore(state1)[1] if ckpt1.latest() is not None else _new_meta()
        else:
            state1, meta1 = ckpt1.restore(state1) if ckpt1.latest() is not None else (state1, _new_meta())
            state1 = on_device(state1)
            state1, meta1 = run_phase(1, state1, meta1, step1, data, ckpt1, log, config, int(t.phase1_epochs),
                                      steps_per_epoch)
        results["phase1"] = {k: meta1[k] for k in ("start", "end", "seconds")}
        results["phase1"]["steps"] = int(meta1["done"])

        # 3. phase II: both autoencoders
        if len(targets):
            step2, init2 = compiled_step(2, sizes, float(t.lr), steps_per_epoch, int(t.phase2_epochs),
                                         int(t.decay_epochs), bool(t.feature_cycle))
            state2 = init2(state1["params"])
            state2, meta2 = ckpt2.restore(state2) if phase2_started else (state2, _new_meta())
            state2 = on_device(state2)
            state2, meta2 = run_phase(2, state2, meta2, step2, data, ckpt2, log, config, int(t.phase2_epochs),
                                      steps_per_epoch)
            params_S, params_T = state2["params_S"], state2["params_T"]
            results["phase2"] = {k: meta2[k] for k in ("start", "end", "seconds")}
            results["phase2"]["steps"] = int(meta2["done"])
        else:  # degenerate: no target domain, the "pseudo-target" is the phase-I reconstruction
            params_S = params_T = state1["params"]
            results["phase2"] = {"skipped": "data.n_target = 0: pseudo-targets are phase-I reconstructions"}
    finally:
        log.close()
        ckpt1.close()
        ckpt2.close()

    # 4. pseudo-targets, the preview, results.json
    t0 = time.time()
    g = config.generate
    results["pseudo_targets"] = {}
    for folder in split_list(d.translate):
        source_dir = fmt.resolve_folder(root, folder, "Folder to translate (data.translate)")
        rel, out = output_folder(workdir, root, folder)
        count = generate_pseudo_targets(params_S, params_T, source_dir, out, sizes, int(g.batch_size),
                                        int(g.jpeg_quality), int(d.num_workers))
        results["pseudo_targets"][rel] = {"source": str(source_dir), "folder": str(out), "images": count}
        print(f"DDDA: {count} pseudo-targets of {source_dir} in {out}", flush=True)
    results["generation_seconds"] = time.time() - t0
    if results["pseudo_targets"] and int(g.preview_images) > 0:
        first = next(iter(results["pseudo_targets"].values()))
        n = int(g.preview_images)
        sources_, names = fmt.folder_images(first["source"])
        preview_grid(sources_[:n], FileImages([os.path.join(first["folder"], p) for p in names[:n]]), targets[:n],
                     workdir / "pseudo_targets.png")
        results["preview"] = str(workdir / "pseudo_targets.png")
    atomic_write_text(workdir / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def ensure_pseudo_targets(config: ConfigDict, workdir) -> dict:
    """What AdAGeo phase 2 needs from phase 1, running or resuming :func:`train` unless it is done.

    Returns ``{"pseudo_targets": {source folder relative to the root: absolute output folder},
    "target_images": [absolute paths]}`` (the few-shot targets, phase 2's GRL target domain).
    """
    workdir = Path(workdir).absolute()
    path = workdir / "results.json"
    results = json.loads(path.read_text()) if path.exists() else None
    wanted = split_list(config.data.translate)
    if results is not None:
        check_resumable(config, workdir)
        root = data_root(config)
        if any(output_folder(workdir, root, f)[0] not in results["pseudo_targets"] for f in wanted):
            results = None
    if results is None:
        results = train(config, workdir)
    return {"pseudo_targets": {rel: v["folder"] for rel, v in results["pseudo_targets"].items()},
            "target_images": list(results["target_images"])}
