"""Grain input pipelines: padded evaluation batches and random-access, resumable training batches.

Design
------
*Random access.* Every training batch is a pure function of ``(seed, step)``: the element at
global position ``i`` (batch ``b`` holds positions ``[b B, (b + 1) B)``) is chosen by a sampler
from ``(seed, i)`` alone and augmented with an RNG seeded from ``(seed, i)`` alone. The Grain
pipeline is a ``MapDataset`` over steps (``MapDataset.range(start_step, ...).map(build_batch)``),
so any step can be produced without replaying the ones before it, and the result does not depend
on how many worker processes or prefetch threads produced it.

*Process sharding.* With ``process_count`` hosts, process ``p`` builds rows
``[p B_local, (p + 1) B_local)`` of each global batch (``B_local = B / process_count``), i.e. the
global positions ``b B + p B_local + r``. Concatenating the processes' batches in process order
gives the single-process batch exactly: the contract of ``jax.make_array_from_process_local_data``
with the batch axis sharded over processes.

*Checkpoint state.* Because of random access the iterator state is just the next global step:
``TrainIterator.get_state() == {"step": k, "seed": s, "batch_size": B}`` (JSON). Restoring it with
``set_state`` -- or building the pipeline with ``start_step=k`` -- continues bit for bit, even with
a different number of workers or processes. ``TrainIterator`` is a ``grain.DatasetIterator``, so
Grain's Orbax handlers (``grain.checkpoint.CheckpointHandler``) can save and restore it.

*Workers.* ``num_workers=0`` builds batches in the calling process (one Grain prefetch thread reads
ahead, overlapping the accelerator step); ``num_workers=N > 0`` starts N Grain worker *processes*
(``mp_prefetch``, spawn start method) that build whole batches round-robin; large arrays travel
through shared memory. Each worker is sent the pipeline's paths once, as a
:class:`~jaxvpr.data.format.PathList` (one byte buffer and offsets; a list of str is converted),
and a PathList read from an image-list cache as just the cache file's name, which every worker maps:
SF-XL's 41M paths are not copied into each worker as Python strings.

*Images.* ``paths`` arguments are image paths or any :class:`~jaxvpr.data.images.ImageSource`, e.g.
the records of a packed folder (``read_image_folder(packed).abs_paths()``, :mod:`jaxvpr.data.pack`):
image indices are rows of the source, and a worker process reads the shards itself.

*Corrupt images.* Evaluation raises :class:`~jaxvpr.data.images.CorruptImageError` naming the file
unless ``skip_corrupt=True`` (the row is marked invalid, the path counted and logged). Training
never stops for one: the sampler offers a deterministic replacement (another image of the same
class, or the next uniform draw), the path is logged with ``logging.warning`` once and kept in
``TrainIterator.skipped_paths``. A truncated file is corrupt unless the decode mode ``truncated``
is "pil" (:func:`~jaxvpr.data.images.load_image`); a pipeline fixes the mode when it is built (the
argument, else the process's) and its workers decode with it.

Samplers
--------
* :class:`ClassBalancedSampler` -- CosPlace (thesis §4.3 and Table 4.1): each batch draws classes
  uniformly without replacement within a pass over the group's classes, then one random image of
  each class; the label is the class position in the group (the CosFace classifier's row).
* :class:`UniformSampler` -- an unlabeled folder (GRL target batches, thesis §4.4), reshuffled every
  pass; label -1.
* :class:`SequenceSampler` -- a fixed order chosen elsewhere (the triplet recipe's mined
  ``[query, positive, negatives...]`` rows, flattened); a corrupt image is an error, since no other
  image can take its place in a triplet.
"""

from __future__ import annotations

import collections
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import grain
import numpy as np
from absl import flags

from jaxvpr.data.format import PathList
from jaxvpr.data.images import (CorruptImageError, ImageSource, ResizeSpec, ShorterSide, as_images, normalize,
                                output_size, truncated_mode)
from jaxvpr.data.images import resize as resize_image

logger = logging.getLogger(__name__)

# Tags separating the independent random streams derived from one seed.
_TAG_PASS = 1  # permutation of a pass over classes / images
_TAG_DRAW = 2  # image drawn within a class, replacement draws
_TAG_AUGMENT = 3  # augmentation of the element at a position

# Consecutive corrupt candidates tolerated at one training position before giving up.
MAX_CORRUPT_RETRIES = 16

AugmentFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _compact(paths: Sequence[str]) -> Sequence[str]:
    """What a builder keeps, and so what each worker process is sent: a list or tuple of str as a
    :class:`~jaxvpr.data.format.PathList` (one byte buffer + offsets, ~9 B per path beyond its
    characters, instead of a Python str object each); a PathList mapped from an image-list cache
    travels as the file's name. Any other sequence is kept as given."""
    if isinstance(paths, (list, tuple)) and all(type(p) is str for p in paths):
        return PathList.from_strings(paths)
    return paths


def _rng(*keys: int) -> np.random.Generator:
    """A numpy Generator seeded by a tuple of non-negative ints (numpy SeedSequence entropy)."""
    return np.random.default_rng([int(k) for k in keys])


def _check_seed(seed: int) -> int:
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    return int(seed)


class _PassPermutations:
    """Permutation of range(n) for each pass, seeded by (seed, pass); the last few are cached."""

    def __init__(self, n: int, keep: int = 2):
        self.n = n
        self._keep = keep
        self._cache: collections.OrderedDict[tuple[int, int], np.ndarray] = collections.OrderedDict()

    def __call__(self, seed: int, pass_index: int) -> np.ndarray:
        key = (seed, pass_index)
        perm = self._cache.get(key)
        if perm is None:
            perm = _rng(seed, _TAG_PASS, pass_index).permutation(self.n)
            self._cache[key] = perm
            while len(self._cache) > self._keep:
                self._cache.popitem(last=False)
        return perm

    def __getstate__(self):  # Workers start with an empty cache.
        return {"n": self.n, "_keep": self._keep, "_cache": collections.OrderedDict()}


class Sampler(Protocol):
    """Maps a global position to candidate (image index, label) pairs, first choice first."""

    def candidates(self, seed: int, position: int) -> Iterator[tuple[int, int]]: ...


class ClassBalancedSampler:
    """CosPlace's sampling of one group: every class once per pass, one random image per class.

    ``classes[c]`` lists the image indices of class ``c`` (indices into the training ``paths``).
    A pass covers ``n_classes`` positions, or with ``batch_size`` the largest multiple of it
    (``n_classes - n_classes % batch_size``: the remainder of a pass is dropped, as CosPlace's
    ``DataLoader(drop_last=True)`` over the classes does), so that a batch never holds a class twice.
    For global position ``i``: pass ``i // per_pass`` permutes the classes with an RNG seeded from
    ``(seed, pass)``, entry ``i % per_pass`` of that permutation is the class, and one image is
    drawn uniformly from it with an RNG seeded from ``(seed, i)``. The label is the class position
    ``c`` in the group.

    Replacement candidates (used only when an image is corrupt): the class's other images in a
    random order from the same RNG; if every image of the class is unreadable, other classes
    (with their own labels) in a random order.
    """

    def __init__(self, classes: Sequence[Sequence[int]], batch_size: int | None = None):
        if len(classes) == 0:
            raise ValueError("ClassBalancedSampler: the group has no classes.")
        sizes = np.asarray([len(c) for c in classes], np.int64)
        if (sizes == 0).any():
            raise ValueError(f"ClassBalancedSampler: class {int(np.argmin(sizes))} has no images.")
        if batch_size is not None and not 0 < batch_size <= len(classes):
            raise ValueError(f"ClassBalancedSampler: batch_size {batch_size} must be in [1, {len(classes)}] "
                             "(the number of classes): a batch holds distinct classes.")
        # Classes stored flat (CSR) so the sampler pickles fast to worker processes.
        self._offsets = np.concatenate([[0], np.cumsum(sizes)])
        self._images = np.concatenate([np.asarray(c, np.int64) for c in classes])
        self._passes = _PassPermutations(len(classes))
        self.per_pass = len(classes) - (len(classes) % batch_size if batch_size else 0)

    @property
    def num_classes(self) -> int:
        return len(self._offsets) - 1

    def class_images(self, label: int) -> np.ndarray:
        """Image indices of class ``label``."""
        return self._images[self._offsets[label] : self._offsets[label + 1]]

    def class_at(self, seed: int, position: int) -> int:
        """The class (position in the group) sampled at global position ``position``."""
        pass_index, k = divmod(int(position), self.per_pass)
        return int(self._passes(seed, pass_index)[k])

    def candidates(self, seed: int, position: int) -> Iterator[tuple[int, int]]:
        label = self.class_at(seed, position)
        rng = _rng(seed, _TAG_DRAW, position)
        images = self.class_images(label)
        first = int(rng.integers(len(images)))
        yield int(images[first]), label
        for k in rng.permutation(len(images)):
            if k != first:
                yield int(images[k]), label
        for other in rng.permutation(self.num_classes):
            if other != label:
                for image in rng.permutation(self.class_images(int(other))):
                    yield int(image), int(other)


class UniformSampler:
    """Uniform sampling over ``num_images`` unlabeled images (label -1), reshuffled every pass.

    Position ``i`` takes entry ``i % n`` of the permutation of pass ``i // n`` (seeded from
    ``(seed, pass)``), so each pass visits every image once. Replacement candidates for a corrupt
    image are further uniform draws from an RNG seeded from ``(seed, i)``.
    """

    def __init__(self, num_images: int):
        if num_images <= 0:
            raise ValueError(f"UniformSampler: needs at least one image, got {num_images}.")
        self.num_images = int(num_images)
        self._passes = _PassPermutations(self.num_images)

    def candidates(self, seed: int, position: int) -> Iterator[tuple[int, int]]:
        pass_index, k = divmod(int(position), self.num_images)
        first = int(self._passes(seed, pass_index)[k])
        yield first, -1
        rng = _rng(seed, _TAG_DRAW, position)
        tried = {first}
        while len(tried) < self.num_images:
            index = int(rng.integers(self.num_images))
            if index not in tried:
                tried.add(index)
                yield index, -1


class DomainSampler:
    """AdAGeo's GRL batches (``GrlDataset``, recipes_facts §A.2.5): each position draws a domain
    uniformly, then one of its images uniformly (with replacement: 5 target images recur); the label
    is the domain. ``domain_sizes[d]`` images of domain d sit at indices ``offset_d ... offset_d +
    size_d - 1`` of the paths (domains concatenated in order). Position ``i`` draws from an RNG
    seeded from ``(seed, i)``; replacement candidates are the domain's other images."""

    def __init__(self, domain_sizes: Sequence[int]):
        sizes = np.asarray(domain_sizes, np.int64)
        if len(sizes) == 0 or (sizes <= 0).any():
            raise ValueError(f"DomainSampler: every domain needs images, got sizes {list(sizes)}.")
        self.sizes = sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    def candidates(self, seed: int, position: int) -> Iterator[tuple[int, int]]:
        rng = _rng(seed, _TAG_DRAW, position)
        domain = int(rng.integers(len(self.sizes)))
        first = int(rng.integers(self.sizes[domain]))
        yield int(self.offsets[domain] + first), domain
        for k in rng.permutation(int(self.sizes[domain])):
            if k != first:
                yield int(self.offsets[domain] + k), domain


class SequenceSampler:
    """Position ``i`` is image ``indices[i]`` with label ``labels[i]`` (default: the position's slot
    ``i % period``); no replacement candidates."""

    def __init__(self, indices: Sequence[int], period: int = 1):
        self.indices = np.asarray(indices, np.int64)
        self.period = int(period)

    def candidates(self, seed: int, position: int) -> Iterator[tuple[int, int]]:
        if not 0 <= position < len(self.indices):
            raise IndexError(f"SequenceSampler: position {position} outside [0, {len(self.indices)}).")
        yield int(self.indices[position]), int(position % self.period)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class _TrainBatchBuilder:
    """step -> this process's rows of global batch ``step`` (a pure function; runs in workers)."""

    def __init__(self, paths, sampler, batch_size, augment_fn, seed, process_index, process_count, truncated=None):
        self.images = as_images(_compact(paths))
        self.truncated = truncated_mode(truncated)
        self.sampler = sampler
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.augment_fn = augment_fn
        self.seed = seed
        self.process_index = process_index
        self._corrupt: set[int] = set()  # Known-bad indices of this worker: not decoded twice.

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_corrupt"] = set()
        return state

    def _element(self, position: int) -> tuple[np.ndarray, int, int, list[int]]:
        skipped: list[int] = []
        for index, label in self.sampler.candidates(self.seed, position):
            if len(skipped) >= MAX_CORRUPT_RETRIES:
                break
            if index in self._corrupt:
                skipped.append(index)
                continue
            try:
                image = self.images.load(index, self.truncated)
            except CorruptImageError:
                self._corrupt.add(index)
                skipped.append(index)
                continue
            rng = _rng(self.seed, _TAG_AUGMENT, position)
            out = np.asarray(self.augment_fn(image, rng) if self.augment_fn is not None else normalize(image))
            # uint8 stays uint8: images to be augmented on the device (jaxvpr.data.device_augment)
            return (out if out.dtype == np.uint8 else out.astype(np.float32, copy=False)), label, index, skipped
        shown = ", ".join(repr(str(self.images[i])) for i in skipped[:5])
        raise CorruptImageError(
            str(self.images[skipped[0]]) if skipped else "<none>",
            f"{len(skipped)} consecutive candidate images at training position {position} are corrupt "
            f"({shown}, ...): the dataset looks damaged",
        )

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        first = step * self.batch_size + self.process_index * self.local_batch_size
        images, labels, indices, skipped = [], [], [], []
        for position in range(first, first + self.local_batch_size):
            image, label, index, bad = self._element(position)
            images.append(image)
            labels.append(label)
            indices.append(index)
            skipped.extend(bad)
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise ValueError(
                f"Training images of step {step} have different shapes {sorted(shapes)} after "
                "augmentation: pass an augment_fn that crops/resizes to a fixed size "
                "(e.g. cosplace_augment with image_size)."
            )
        return {
            "image": np.stack(images),
            "label": np.asarray(labels, np.int32),
            "index": np.asarray(indices, np.int32),
            "skipped": np.asarray(skipped, np.int64),
        }


def _read_options() -> grain.ReadOptions:
    # One element is a whole batch (e.g. 32 x 512 x 512 x 3 float32 = 100 MB): read ahead by two.
    return grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


def _plain(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """Copies arrays that arrived in Grain shared memory into ordinary numpy arrays.

    Shared-memory blocks are then released at once instead of living as long as the caller keeps
    the batch (costs one memcpy per batch, only with worker processes).
    """
    return {k: v if type(v) is np.ndarray else np.array(v, copy=True) for k, v in batch.items()}


def _grain_iterator(source: Callable[[int], Any], start: int, stop: int, num_workers: int):
    ds = grain.MapDataset.range(start, stop).map(source).to_iter_dataset(_read_options())
    if num_workers > 0:
        # Grain's worker processes read absl flags; outside absl.app.run (tests, notebooks) nobody
        # parsed them, so take their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(ds)


class TrainIterator(grain.DatasetIterator):
    """Iterator over training batches; state = next global step (see the module docstring).

    Yields ``{"image": float32 (B_local, H, W, 3), "label": int32 (B_local,), "index": int32
    (B_local,)}``. ``skipped_paths`` lists (in order of discovery) the corrupt files replaced so far.
    """

    def __init__(self, builder: _TrainBatchBuilder, start_step: int, num_steps: int | None, num_workers: int):
        super().__init__()
        self._builder = builder
        self._step = int(start_step)
        self._num_steps = num_steps
        self._num_workers = num_workers
        self._inner = None
        self.skipped_paths: list[str] = []
        self._skipped_indices: set[int] = set()

    @property
    def step(self) -> int:
        """Global step of the next batch."""
        return self._step

    def _ensure_started(self):
        if self._inner is None:
            stop = sys.maxsize if self._num_steps is None else max(self._num_steps, self._step)
            self._inner = _grain_iterator(self._builder, self._step, stop, self._num_workers)

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        if self._num_steps is not None and self._step >= self._num_steps:
            self._close_inner()  # Frees worker processes; set_state can still rewind.
            raise StopIteration
        self._ensure_started()
        batch = _plain(next(self._inner))
        for index in np.asarray(batch.pop("skipped")).tolist():
            if index not in self._skipped_indices:
                self._skipped_indices.add(index)
                path = str(self._builder.images[index])
                self.skipped_paths.append(path)
                logger.warning("Skipping corrupt training image %s (replaced by another draw).", path)
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"step": self._step, "seed": self._builder.seed, "batch_size": self._builder.batch_size}

    def set_state(self, state: dict[str, Any]) -> None:
        for key in ("seed", "batch_size"):
            if key in state and int(state[key]) != self.get_state()[key]:
                raise ValueError(
                    f"Cannot restore the training iterator: checkpoint {key}={state[key]} but this "
                    f"pipeline has {key}={self.get_state()[key]}. Build the pipeline with the "
                    "checkpoint's settings."
                )
        step = int(state["step"])
        if step != self._step or self._inner is None:
            self._close_inner()
            self._step = step

    def start_prefetch(self) -> None:
        self._ensure_started()
        self._inner.start_prefetch()

    def _close_inner(self):
        if self._inner is not None:
            self._inner.close()
            self._inner = None

    def close(self) -> None:
        self._close_inner()
        super().close()

    def __str__(self) -> str:
        return f"TrainIterator(step={self._step}, seed={self._builder.seed}, batch_size={self._builder.batch_size})"


def train_batches(
    paths: Sequence[str] | ImageSource,
    sampler: Sampler,
    batch_size: int,
    augment_fn: AugmentFn | None,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    num_steps: int | None = None,
    truncated: str | None = None,
) -> TrainIterator:
    """Training batches of this process, a pure function of (seed, global step).

    Args:
      paths: image paths, indexed by the sampler's image indices (any picklable sequence; a
        :class:`~jaxvpr.data.format.PathList`, e.g. ``ImageFolder.abs_paths()``, costs least), or an
        :class:`~jaxvpr.data.images.ImageSource` (a packed folder's ``abs_paths()``).
      sampler: :class:`ClassBalancedSampler` or :class:`UniformSampler`.
      batch_size: the *global* batch size B; must be divisible by ``process_count``.
      augment_fn: ``(uint8 HWC image, np.random.Generator) -> float32 HWC`` normalised image,
        e.g. ``functools.partial(cosplace_augment, cfg=config.augmentation)``; None = only
        ImageNet normalisation (images must then share one size). One that returns uint8 (e.g.
        :func:`jaxvpr.data.device_augment.host_decode`) gives uint8 batches, to be augmented on the
        device.
      seed: non-negative int. Use a different seed per epoch/group (e.g. ``seed * 1000 + epoch``)
        if epochs restart at step 0.
      start_step: global step of the first batch (resume).
      process_index, process_count: this host and the number of hosts (``jax.process_index()``,
        ``jax.process_count()``).
      num_workers: Grain worker processes (0 = in this process with one prefetch thread).
      num_steps: stop before this global step (None = infinite).
      truncated: decode mode of truncated files, "error" (replaced like a corrupt file) or "pil";
        None: the process's (:func:`~jaxvpr.data.images.truncated_mode`).

    Returns:
      A :class:`TrainIterator` of ``{"image": float32 (B/P, H, W, 3), "label": int32 (B/P,),
      "index": int32 (B/P,)}``; process p holds rows [p B/P, (p + 1) B/P) of every global batch.
    """
    seed = _check_seed(seed)
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} must be a positive multiple of process_count={process_count} "
            "(each process builds batch_size // process_count rows)."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
    if start_step < 0 or num_workers < 0:
        raise ValueError(f"start_step ({start_step}) and num_workers ({num_workers}) must be >= 0.")
    builder = _TrainBatchBuilder(paths, sampler, batch_size, augment_fn, seed, process_index, process_count, truncated)
    return TrainIterator(builder, start_step, num_steps, num_workers)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


class ImageSizeMismatchError(ValueError):
    """Images of one evaluation batch have different sizes (so they cannot be stacked)."""


class _EvalBatchBuilder:
    """batch number -> padded batch of decoded, resized, normalised images (runs in workers).

    A ``transform`` (decoded uint8 image -> normalised float32 (H, W, 3), or (V, H, W, 3) views)
    replaces the resize and the normalisation.
    """

    def __init__(self, paths, batch_size, resize, skip_corrupt, transform=None, truncated=None):
        self.images = as_images(_compact(paths))
        self.batch_size = batch_size
        self.resize = resize
        self.skip_corrupt = skip_corrupt
        self.transform = transform
        self.truncated = truncated_mode(truncated)

    def __call__(self, b: int) -> dict[str, np.ndarray]:
        lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, len(self.images))
        images: list[np.ndarray | None] = []
        for i in range(lo, hi):
            try:
                image = self.images.load(i, self.truncated)
            except CorruptImageError:
                if not self.skip_corrupt:
                    raise
                images.append(None)
                continue
            images.append(resize_image(image, self.resize) if self.transform is None else self.transform(image))
        sizes = {}
        for i, image in zip(range(lo, hi), images):
            if image is not None:
                sizes.setdefault(image.shape[:-1], i)
        if len(sizes) > 1:
            (s1, i1), (s2, i2) = [("x".join(map(str, s)), i) for s, i in list(sizes.items())[:2]]
            raise ImageSizeMismatchError(
                f"Evaluation batch {b} mixes image sizes: {self.images[i1]!r} is {s1} (HxW) "
                f"but {self.images[i2]!r} is {s2} (after resize={self.resize!r}). Use "
                "batch_size=1, a fixed resize=(H, W), or eval_batches_by_size() to batch equal sizes."
            )
        shape = next(iter(sizes), (1, 1))  # (1, 1): placeholder, the batch has no valid image.
        out = np.zeros((self.batch_size, *shape, 3), np.float32)
        index = np.full(self.batch_size, -1, np.int32)
        valid = np.zeros(self.batch_size, bool)
        index[: hi - lo] = np.arange(lo, hi)
        for row, image in enumerate(images):
            if image is not None:
                out[row] = normalize(image) if self.transform is None else image
                valid[row] = True
        return {"image": out, "index": index, "valid": valid}


class EvalIterator:
    """Iterator over padded evaluation batches, in path order; counts skipped corrupt images.

    Yields ``{"image": float32 (B, H, W, 3) (or (B, V, H, W, 3), see eval_batches' transform),
    "index": int32 (B,), "valid": bool (B,)}``:
    ``index`` is the position in ``paths`` (-1 for padding rows of the last batch), ``valid`` is
    False for padding and for skipped corrupt images (whose ``index`` stays >= 0). Batches without
    any valid image are not yielded. ``skipped_paths``/``num_skipped`` report the corrupt files.
    """

    def __init__(self, segments, num_workers: int):
        # segments: list of (builder, original index of each of the builder's paths).
        self._segments = segments
        self._num_workers = num_workers
        self._generator = self._run()
        self._inner = None
        self.skipped_paths: list[str] = []

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_paths)

    def _run(self):
        for builder, original in self._segments:
            num_batches = -(-len(builder.images) // builder.batch_size)
            self._inner = _grain_iterator(builder, 0, num_batches, self._num_workers)
            try:
                for batch in self._inner:
                    batch = _plain(batch)
                    local = batch["index"]
                    bad = (local >= 0) & ~batch["valid"]
                    for i in local[bad].tolist():
                        path = str(builder.images[i])
                        self.skipped_paths.append(path)
                        logger.warning("Skipping corrupt evaluation image %s.", path)
                    if not batch["valid"].any():
                        continue
                    batch["index"] = np.where(local >= 0, original[np.maximum(local, 0)], -1).astype(np.int32)
                    yield batch
            finally:
                self._inner.close()
                self._inner = None

    def __iter__(self) -> EvalIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._generator)

    def close(self) -> None:
        self._generator.close()


def _check_eval_args(paths, batch_size, num_workers):
    if len(paths) == 0:
        raise ValueError("eval_batches: the list of image paths is empty.")
    if batch_size <= 0 or num_workers < 0:
        raise ValueError(f"eval_batches: batch_size ({batch_size}) must be > 0 and num_workers ({num_workers}) >= 0.")


def eval_batches(
    paths: Sequence[str] | ImageSource,
    batch_size: int,
    resize: ResizeSpec = None,
    num_workers: int = 0,
    skip_corrupt: bool = False,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    truncated: str | None = None,
) -> EvalIterator:
    """Evaluation batches of ``paths`` in order, the last one padded to ``batch_size``.

    Each image is decoded (:func:`~jaxvpr.data.images.load_image`), resized (``resize``: None,
    (H, W) or shorter side N, see :func:`~jaxvpr.data.images.resize`) and ImageNet-normalised.
    Padding keeps every batch the same shape, so a jitted model compiles once.

    A ``transform`` (picklable: it runs in the workers) replaces the resize and the normalisation:
    it maps the decoded uint8 (H, W, 3) image to a normalised float32 (h, w, 3) image or to V views
    (V, h, w, 3) of one size, e.g. a test-time method's crops (:mod:`jaxvpr.testtime`); ``image``
    is then (B, h, w, 3) or (B, V, h, w, 3). ``truncated`` is the decode mode of truncated files
    ("error" or "pil"; None: the process's, :func:`~jaxvpr.data.images.truncated_mode`).

    Raises (while iterating):
      CorruptImageError: an unreadable image (unless ``skip_corrupt``), naming the file.
      ImageSizeMismatchError: a batch mixes sizes (no or a shorter-side resize); use
        ``batch_size=1``, a fixed ``resize=(H, W)``, or :func:`eval_batches_by_size`.
    """
    _check_eval_args(paths, batch_size, num_workers)
    builder = _EvalBatchBuilder(paths, batch_size, resize, skip_corrupt, transform, truncated)
    return EvalIterator([(builder, np.arange(len(paths)))], num_workers)


def group_by_size(paths: Sequence[str] | ImageSource, resize: ResizeSpec = None
                  ) -> dict[tuple[int, int] | None, np.ndarray]:
    """Indices of ``paths`` grouped by (H, W) after ``resize``, read from the file headers only.

    Groups are in order of first appearance, indices ascending; unreadable headers go to key None.
    """
    images = as_images(paths)
    groups: dict[tuple[int, int] | None, list[int]] = {}
    for i in range(len(images)):
        size = images.size(i)
        key = None if size is None else output_size(resize, *size)
        groups.setdefault(key, []).append(i)
    return {k: np.asarray(v, np.int64) for k, v in groups.items()}


def eval_batches_by_size(
    paths: Sequence[str] | ImageSource,
    batch_size: int,
    resize: ResizeSpec = None,
    num_workers: int = 0,
    skip_corrupt: bool = False,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    truncated: str | None = None,
) -> EvalIterator:
    """Like :func:`eval_batches` for images of differing sizes (e.g. queries at native resolution).

    Images are grouped by size (:func:`group_by_size`); each group is batched and padded on its
    own, so every batch has one size and a jitted model compiles once per distinct size; a group of
    fewer than ``batch_size`` images is one batch of exactly its size, not padded (use
    ``batch_size=1`` when nearly every query has its own size). ``index`` refers to ``paths``.
    With a ``transform`` (whose output has one size) this is :func:`eval_batches`.
    """
    _check_eval_args(paths, batch_size, num_workers)
    if transform is not None or (resize is not None and not isinstance(resize, (int, np.integer, ShorterSide))):
        return eval_batches(paths, batch_size, resize, num_workers, skip_corrupt, transform, truncated)  # One size.
    segments = []
    images = as_images(paths)
    for indices in group_by_size(images, resize).values():
        sub_paths = images.take(indices)
        # A size group smaller than the batch is batched at its own size (one image is not padded to 32).
        segments.append((_EvalBatchBuilder(sub_paths, min(batch_size, len(sub_paths)), resize, skip_corrupt,
                                           truncated=truncated), indices))
    return EvalIterator(segments, num_workers)
