"""An @-format dataset as a TFDS dataset with ArrayRecord files, read by ``tfds.data_source`` + Grain.

    python -m jaxvpr.data.tfds_dataset ROOT --data-dir DIR [--name NAME] [--version 1.0.0]
        [--folders images/test/database,images/test/queries] [--overwrite]

Every image folder under ROOT (a folder holding image files with @-format names, or listed by its
``_images_paths.txt``; or the ``--folders`` given) becomes one split, named by its path relative to
ROOT with ``/`` as ``_`` (``images/test/queries_night`` -> ``images_test_queries_night``), in the
folder's row order (``format.list_images``; TFDS's shuffling is off). An example holds ``image``
(the file's bytes as stored: JPEGs are not re-encoded), ``path`` (relative to its folder, the
@-format name with the geotags), ``utm`` (east, north) float64 metres and ``heading`` float64 degrees
(NaN where the name has none). The dataset lands in ``DIR/NAME/VERSION/`` (TFDS's layout:
``dataset_info.json``, ``features.json``, ``NAME-SPLIT.array_record-000NN-of-000MM``) plus
``jaxvpr_index.npz``, the splits' paths and geotags, so that jaxvpr opens a split without reading
its images. TensorFlow is not needed, neither to build nor to read (``tensorflow-datasets`` only,
the ``tfds`` extra).

Reading it:

* any TFDS user: ``tfds.builder_from_directory("DIR/NAME/1.0.0").as_data_source("images_test_database")``
  (random access; a ``grain.MapDataset.source(...)`` directly), images decoded by TFDS;
* jaxvpr: :func:`read_tfds_folder` gives an ``ImageFolder`` whose ``abs_paths()`` is a
  :class:`TfdsImages` that the pipelines take wherever they take paths, decoding each image's bytes
  with jaxvpr's decoder (so a TFDS image is the file's image, pixel for pixel), and
  :func:`read_tfds_split` a ``SplitDataset`` (database + queries) for evaluation.

Folders, ArrayRecord or TFDS (README "Datasets at SF-XL scale"): a folder of files is simplest and
what the anchors read; ``jaxvpr.data.pack`` shards one folder for network disks and buckets (one
read per image, no open/stat per file); TFDS is the same kind of ArrayRecord shards with TFDS's
metadata, for teams whose other data and tools are TFDS datasets.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxvpr import cli
from jaxvpr.data.format import IMAGE_EXTENSIONS, DatasetError, ImageFolder, SplitDataset, read_image_folder
from jaxvpr.data.images import ImageSource, decode_image, image_size

INDEX = "jaxvpr_index.npz"
DEFAULT_VERSION = "1.0.0"


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError("TFDS datasets need tensorflow-datasets: pip install -e '.[tfds]' "
                          "(TensorFlow itself is not needed).") from None
    return tfds


def split_name(relative: str) -> str:
    """A folder's path relative to the dataset root as a TFDS split name (letters, digits and ``_``)."""
    name = re.sub(r"[^0-9A-Za-z_]", "_", str(relative).strip("/"))
    if not name:
        raise DatasetError(f"Folder {relative!r} gives an empty split name.")
    return name


def image_folders(root: Path) -> list[str]:
    """The folders under ``root`` (relative paths, sorted) that hold image files or an image list."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in filenames):
            # images in nested subfolders belong to the folder listing them (SF-XL's train/ layout)
            found.add(os.path.relpath(dirpath, root))
        for f in filenames:
            if f.endswith("_images_paths.txt"):
                found.add(os.path.relpath(os.path.join(dirpath, f[: -len("_images_paths.txt")]), root))
    # a folder whose parent is already one (nested images) is part of the parent
    keep = [f for f in sorted(found) if not any(f.startswith(g + os.sep) for g in found if g != f and g != ".")]
    return [f for f in keep if f != "."]


def _builder_class(name: str, version: str, splits: dict[str, ImageFolder]):
    tfds = _tfds()

    class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)
        RELEASE_NOTES = {version: "Written by jaxvpr.data.tfds_dataset."}

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "path": tfds.features.Text(),
                    # raw bytes: tf.train.Example's float lists are float32 (UTM metres need float64)
                    "utm": tfds.features.Tensor(shape=(2,), dtype=np.float64, encoding=tfds.features.Encoding.BYTES),
                    "heading": tfds.features.Tensor(shape=(), dtype=np.float64, encoding=tfds.features.Encoding.BYTES),
                }),
                description="An @-format visual place recognition dataset (jaxvpr.data.tfds_dataset).",
                disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(folder) for split, folder in splits.items()}

        def _generate_examples(self, folder: ImageFolder):
            for i, (rel, path) in enumerate(zip(folder.paths, folder.abs_paths())):
                try:
                    data = Path(path).read_bytes()
                except OSError as e:
                    raise DatasetError(f"Cannot read {path}: {e}") from e
                yield i, {"image": data, "path": rel, "utm": folder.utm[i].astype(np.float64),
                          "heading": np.float64(folder.heading[i])}

    Builder.name = name
    return Builder


def build(root: str | os.PathLike, data_dir: str | os.PathLike, name: str | None = None,
          version: str = DEFAULT_VERSION, folders: Sequence[str] | None = None, overwrite: bool = False) -> Path:
    """Writes the TFDS dataset of ``root``'s image folders; returns ``data_dir/name/version``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Dataset folder {str(root)!r} does not exist.")
    name = split_name(name or root.name).lower()
    folders = list(folders) if folders else image_folders(root)
    if not folders:
        raise DatasetError(f"No image folder under {str(root)!r}.")
    splits = {}
    for rel in folders:
        split = split_name(rel)
        if split in splits:
            raise DatasetError(f"Folders {rel!r} and another one give the same split name {split!r}.")
        splits[split] = read_image_folder(root / rel)
    out = Path(data_dir) / name / version
    if out.exists():
        if not overwrite:
            raise DatasetError(f"{out} exists: pass --overwrite to replace it.")
        shutil.rmtree(out)
    builder = _builder_class(name, version, splits)(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    index = {}
    for split, folder in splits.items():
        index[f"{split}/paths"] = np.frombuffer("\0".join(folder.paths).encode("utf-8", "surrogateescape"), np.uint8)
        index[f"{split}/utm"], index[f"{split}/heading"] = folder.utm, folder.heading
    tmp = out / (INDEX + ".tmp.npz")
    np.savez(tmp, **index)
    os.replace(tmp, out / INDEX)
    return out


class TfdsImages(ImageSource):
    """The images of one split of a TFDS dataset written by :func:`build`, by row (a view of rows).

    Each process opens the split's ArrayRecord data source itself on first use (workers receive the
    directory, the split and the rows); the image bytes are decoded by jaxvpr's decoder."""

    def __init__(self, directory: str, split: str, names: Sequence[str], rows=None):
        self.directory, self.split, self.names = str(directory), split, names
        self.rows = np.arange(len(names), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        self._source = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None
        return state

    def _data_source(self):
        if self._source is None:
            tfds = _tfds()
            builder = tfds.builder_from_directory(self.directory)
            self._source = builder.as_data_source(self.split, decoders={"image": tfds.decode.SkipDecoding()})
        return self._source

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        return f"{self.directory}[{self.split}]/{self.names[int(self.rows[i])]}"

    def take(self, rows: Sequence[int]) -> TfdsImages:
        return TfdsImages(self.directory, self.split, self.names, self.rows[np.asarray(rows, np.int64)])

    def _bytes(self, i: int) -> bytes:
        return self._data_source()[int(self.rows[i])]["image"]

    def load(self, i: int, truncated: str | None = None) -> np.ndarray:
        return decode_image(self._bytes(i), self[i], truncated)

    def size(self, i: int) -> tuple[int, int] | None:
        return image_size(io.BytesIO(self._bytes(i)))


@dataclasses.dataclass
class TfdsImageFolder(ImageFolder):
    """An ``ImageFolder`` of a TFDS split: the source folder's paths and geotags; ``abs_paths()`` reads
    the images from the split's ArrayRecord files."""

    directory: str = ""
    split: str = ""

    def abs_paths(self) -> TfdsImages:
        return TfdsImages(self.directory, self.split, self.paths)


def read_tfds_folder(directory: str | os.PathLike, split: str) -> TfdsImageFolder:
    """The split ``split`` of the TFDS dataset at ``directory`` (``DATA_DIR/NAME/VERSION``)."""
    directory = Path(directory)
    if not (directory / INDEX).is_file():
        raise DatasetError(f"{directory} is not a TFDS dataset written by jaxvpr.data.tfds_dataset (no {INDEX}).")
    with np.load(directory / INDEX) as index:
        splits = sorted({k.rsplit("/", 1)[0] for k in index.files})
        if split not in splits:
            raise DatasetError(f"TFDS dataset {directory} has no split {split!r}; it has {splits}.")
        paths = index[f"{split}/paths"].tobytes().decode("utf-8", "surrogateescape").split("\0")
        utm, heading = np.asarray(index[f"{split}/utm"], np.float64), np.asarray(index[f"{split}/heading"], np.float64)
    return TfdsImageFolder(root=directory / split, paths=paths, utm=utm, heading=heading,
                           directory=str(directory), split=split)


def read_tfds_split(directory: str | os.PathLike, split_dir: str, queries: str = "queries",
                    database: str = "database") -> SplitDataset:
    """Database and queries of the split folder ``split_dir`` (e.g. ``images/test``) from the TFDS
    dataset at ``directory``: its splits ``<split_dir>_database`` and ``<split_dir>_<queries>``."""
    db = read_tfds_folder(directory, split_name(f"{split_dir}/{database}"))
    q = read_tfds_folder(directory, split_name(f"{split_dir}/{queries}"))
    return SplitDataset(f"{Path(directory).parent.name}/{split_dir}", db, q)


@cli.command
def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m jaxvpr.data.tfds_dataset", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="the dataset folder (e.g. sf_xl/small, or a split folder)")
    parser.add_argument("--data-dir", required=True, help="TFDS data_dir: the dataset goes to DATA_DIR/NAME/VERSION")
    parser.add_argument("--name", default=None, help="dataset name (default: the root folder's name)")
    parser.add_argument("--version", default=DEFAULT_VERSION)
    parser.add_argument("--folders", default="", help="comma-separated image folders relative to ROOT "
                                                      "(default: every image folder under it)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    folders = [f.strip() for f in args.folders.split(",") if f.strip()] or None
    out = build(args.root, args.data_dir, args.name, args.version, folders, args.overwrite)
    with np.load(out / INDEX) as index:
        counts = {k.rsplit("/", 1)[0]: len(index[k]) for k in index.files if k.endswith("/heading")}
    print(f"wrote {out}: " + ", ".join(f"{s} ({n} images)" for s, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
