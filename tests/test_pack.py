"""Packed folders (jaxvpr.data.pack): ArrayRecord shards of a folder's JPEG bytes, read by row.

Folder used throughout (made once per module): 20 JPEGs of 32x40 px with geotagged names, a third
of them in a subfolder, packed into 3 shards. The references are independent of the code under
test: the files' own bytes, the shards read with ``array_record``'s plain reader and the record
layout parsed here from its specification, and the pipelines run over the source folder.
"""

import dataclasses
import io
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxvpr.data import images, pack, pipeline
from jaxvpr.data.format import DatasetError, list_images, read_image_folder, read_split

REPO = Path(__file__).resolve().parents[1]
N = 20


def write_jpegs(folder: Path, n: int, seed: int = 0, size=(32, 40), subfolder_every: int = 3) -> None:
    """``n`` smooth random JPEGs named ``@east@north@10@S@@@p<i>@@heading@@@@@@.jpg``; every
    ``subfolder_every``-th in ``folder/sub``."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        where = folder / "sub" if subfolder_every and i % subfolder_every == 0 else folder
        where.mkdir(parents=True, exist_ok=True)
        east, north, heading = 500000 + rng.uniform(0, 80), 4000000 + rng.uniform(0, 80), rng.uniform(0, 360)
        heading_field = "" if i == 4 else f"{heading:.1f}"  # one image without a heading
        base = rng.integers(0, 200, 3)
        ramp = np.linspace(0, 50, size[1])[None, :, None]
        arr = np.clip(base + ramp + rng.integers(-8, 9, (*size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(where / f"@{east:.2f}@{north:.2f}@10@S@@@p{i}@@{heading_field}@@@@@@.jpg",
                                  quality=90)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    src = root / "images/test/database"
    write_jpegs(src, N)
    out = root / "packed/images/test/database"
    pack.pack(src, out, shards=3, workers=2, progress=False)
    return {"src": src, "out": out, "folder": read_image_folder(src), "packed": read_image_folder(out)}


def shard_records(out: Path) -> list[tuple[str, bytes]]:
    """Every record of the shards in name order, parsed from the layout in the module docstring
    (u32 LE path length, UTF-8 path, file bytes) with array_record's plain reader."""
    from array_record.python import array_record_module

    records = []
    for shard in sorted(out.glob("*.array_record")):
        reader = array_record_module.ArrayRecordReader(str(shard))
        for record in reader.read_all():
            (length,) = struct.unpack("<I", record[:4])
            records.append((record[4:4 + length].decode("utf-8"), record[4 + length:]))
        reader.close()
    return records


# ----------------------------------------------------------------------------- (a) the shards
def test_records_are_the_files_bytes_in_row_order(packed):
    src, out, folder = packed["src"], packed["out"], packed["folder"]
    assert sorted(p.name for p in out.glob("*.array_record")) == [
        f"database-{k:05d}-of-00003.array_record" for k in range(3)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    records = shard_records(out)
    assert [rel for rel, _ in records] == folder.paths
    assert any(rel.startswith("sub/") for rel in folder.paths)
    for rel, data in records:
        assert data == (src / rel).read_bytes(), rel
    assert packed["packed"].shard_records == (7, 7, 6)


# ----------------------------------------------------------------------------- (c) the index
def test_read_image_folder_gives_the_folders_paths_and_geotags(packed):
    folder, got = packed["folder"], packed["packed"]
    assert isinstance(got, pack.PackedImageFolder)
    assert got.paths == folder.paths and len(got) == N
    np.testing.assert_array_equal(got.utm, folder.utm)
    np.testing.assert_array_equal(got.heading, folder.heading)  # NaN where the name has no heading
    assert np.isnan(got.heading).sum() == 1
    assert got.source == str(packed["src"].resolve())
    a, b = got.record(3), folder.record(3)  # every field, from the name
    assert a.path == str(packed["out"] / folder.paths[3]) and a == dataclasses.replace(b, path=a.path)


def test_read_split_of_packed_folders(packed, tmp_path):
    split = tmp_path / "images/test"
    write_jpegs(split / "queries", 4, seed=1, subfolder_every=0)
    pack.pack(packed["src"], split / "database", shards=2, progress=False)
    s = read_split(split)
    assert isinstance(s.database, pack.PackedImageFolder) and not isinstance(s.queries, pack.PackedImageFolder)
    assert s.database.paths == packed["folder"].paths and len(s.queries) == 4


def test_images_source_names_slices_and_sizes(packed):
    images_ = packed["packed"].abs_paths()
    names = [os.path.join(str(packed["out"]), p) for p in packed["folder"].paths]
    assert len(images_) == N and list(images_) == names and images_[-1] == names[-1]
    part = images_[5:12]
    assert len(part) == 7 and list(part) == names[5:12]
    np.testing.assert_array_equal(part.load(0), images.load_image(packed["folder"].abs_paths()[5]))
    taken = part.take([6, 0])
    assert list(taken) == [names[11], names[5]]
    assert taken.size(0) == (32, 40)


def test_packed_and_file_folders_concatenated_as_one_source(packed):
    """A triplet or AdAGeo training set (database then queries) over packed and plain folders alike."""
    files, shards = packed["folder"].abs_paths(), packed["packed"].abs_paths()
    both = images.ConcatImages([shards, files])  # rows 0..N-1 packed, N..2N-1 files
    assert len(both) == 2 * N and both[N] == files[0] and both[-1] == files[-1] and both[N - 1] == shards[-1]
    rows = [2 * N - 1, 3, N + 4, 0]
    taken = both.take(rows)
    assert list(taken) == [both[r] for r in rows] and taken[1:3].take([1])[0] == both[N + 4]
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(taken.load(i), images.load_image(files[r % N]))
        assert taken.size(i) == (32, 40)
    with pytest.raises(IndexError):
        both[2 * N]
    restored = pickle.loads(pickle.dumps(taken))  # as sent to Grain workers
    np.testing.assert_array_equal(restored.load(2), taken.load(2))


def test_folder_images_of_packed_and_plain_folders(packed, tmp_path):
    """``format.folder_images``, how the GRL target pools and DDDA's folders are read: a packed folder
    gives the source folder's relative paths and the same images; names need no geotag."""
    from jaxvpr.data.format import folder_images

    (files, names), (shards, packed_names) = folder_images(packed["src"]), folder_images(packed["out"])
    assert list(packed_names) == list(names) == list(packed["folder"].paths)
    assert shards[0] == str(packed["out"] / names[0]) and files[0] == str(packed["src"] / names[0])
    for i in (0, N - 1):
        np.testing.assert_array_equal(shards.load(i), files.load(i))
    Image.new("RGB", (8, 6)).save(tmp_path / "night_0001.jpg")  # an unlabeled pool: plain names
    pool, pool_names = folder_images(tmp_path)
    assert list(pool_names) == ["night_0001.jpg"] and pool.size(0) == (6, 8)


# ----------------------------------------------------------------------------- (b) the pipelines
def _assert_same_batches(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _train(paths, sampler, workers):
    it = pipeline.train_batches(paths, sampler, batch_size=4, augment_fn=None, seed=5, num_steps=3,
                                num_workers=workers)
    batches = list(it)
    it.close()
    return batches


@pytest.mark.parametrize("sampler,workers", [("class_balanced", 0), ("uniform", 0), ("class_balanced", 2)])
def test_train_batches_packed_equal_folder(packed, sampler, workers):
    classes = [list(range(c, N, 5)) for c in range(5)]
    make = {"class_balanced": lambda: pipeline.ClassBalancedSampler(classes, 4),
            "uniform": lambda: pipeline.UniformSampler(N)}[sampler]
    want = _train(packed["folder"].abs_paths(), make(), 0)
    got = _train(packed["packed"].abs_paths(), make(), workers)
    _assert_same_batches(got, want)
    assert want[0]["image"].shape == (4, 32, 40, 3)


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_batches_packed_equal_folder(packed, workers):
    kw = dict(batch_size=6, resize=(16, 20))
    want = list(pipeline.eval_batches(packed["folder"].abs_paths(), **kw))  # (workers: test_pipeline.py)
    got = list(pipeline.eval_batches(packed["packed"].abs_paths(), num_workers=workers, **kw))
    _assert_same_batches(got, want)
    assert len(got) == 4 and got[-1]["valid"].sum() == 2  # 20 = 3 x 6 + 2, padded


def test_eval_batches_by_size_packed_equal_folder(tmp_path):
    src = tmp_path / "queries"
    write_jpegs(src, 5, seed=2, subfolder_every=0)
    write_jpegs(src / "big", 3, seed=3, size=(36, 24), subfolder_every=0)
    pack.pack(src, tmp_path / "packed", progress=False)
    folder, packed_ = read_image_folder(src), read_image_folder(tmp_path / "packed")
    assert len(packed_.shard_files) == 1  # the default 256 MB shard
    want = list(pipeline.eval_batches_by_size(folder.abs_paths(), batch_size=2))
    got = list(pipeline.eval_batches_by_size(packed_.abs_paths(), batch_size=2))
    _assert_same_batches(got, want)
    assert {b["image"].shape[1:3] for b in got} == {(32, 40), (36, 24)}


# ----------------------------------------------------------------------------- (d) bad input
def test_corrupt_jpeg_in_a_shard_names_its_path_and_shard(tmp_path):
    src = tmp_path / "db"
    write_jpegs(src, 6, subfolder_every=0)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(buffer, "JPEG")
    data = buffer.getvalue()
    cut = src / "sub" / "@500001.00@4000001.00@10@S@@@cut@@@@@@@@.jpg"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])  # a truncated JPEG (the scan cut, the header whole)
    out = tmp_path / "packed"
    pack.pack(src, out, shards=2, progress=False)
    packed_ = read_image_folder(out)
    rel = "sub/@500001.00@4000001.00@10@S@@@cut@@@@@@@@.jpg"
    row = packed_.paths.index(rel)
    with pytest.raises(images.CorruptImageError) as info:
        list(pipeline.eval_batches(packed_.abs_paths(), batch_size=7))
    message = str(info.value)
    assert rel in message and "db-00001-of-00002.array_record" in message
    assert str(cut) in message  # the source file
    # Skipped like a corrupt file: the same rows invalid, the packed name logged.
    it = pipeline.eval_batches(packed_.abs_paths(), batch_size=7, skip_corrupt=True)
    batch = next(it)
    assert not batch["valid"][row] and batch["valid"].sum() == 6
    assert it.skipped_paths == [str(out / rel)]
    # truncated="pil" decodes it as from the file.
    np.testing.assert_array_equal(packed_.abs_paths().load(row, "pil"), images.load_image(str(cut), "pil"))
    # Training replaces it by another draw and names it (a pass of 7 positions visits every row).
    train = pipeline.train_batches(packed_.abs_paths(), pipeline.UniformSampler(7), 2, None, seed=0, num_steps=4)
    for batch in train:
        assert row not in batch["index"]
    assert train.skipped_paths == [str(out / rel)]


def test_missing_or_empty_folder_and_unreadable_file(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match="nope"):
        pack.pack(tmp_path / "nope", out, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="contains no images"):
        pack.pack(tmp_path / "empty", out, progress=False)
    assert not out.exists()
    src = tmp_path / "src"
    write_jpegs(src, 4, subfolder_every=0)
    dangling = src / "@500002.00@4000002.00@10@S@@@gone@@@@@@@@.jpg"
    dangling.symlink_to(tmp_path / "nowhere.jpg")
    for kw in ({"shards": 2}, {}):  # read while writing, and stat while sizing the shards
        with pytest.raises(DatasetError, match="gone"):
            pack.pack(src, out, progress=False, **kw)
        assert list(out.iterdir()) == []  # nothing half-written, no temporary file


def test_refuses_to_overwrite_unless_asked(packed, tmp_path):
    out = tmp_path / "out"
    pack.pack(packed["src"], out, shards=3, progress=False)
    with pytest.raises(DatasetError, match="already holds a packed folder.*--overwrite"):
        pack.pack(packed["src"], out, shards=2, progress=False)
    assert len(list(out.glob("*.array_record"))) == 3
    pack.pack(packed["src"], out, shards=2, overwrite=True, progress=False)
    assert sorted(p.name for p in out.glob("*.array_record")) == [
        "database-00000-of-00002.array_record", "database-00001-of-00002.array_record"]
    assert [rel for rel, _ in shard_records(out)] == packed["folder"].paths
    with pytest.raises(DatasetError, match="already a packed folder"):
        pack.pack(out, tmp_path / "again", progress=False)


def test_damaged_packed_folder_errors(packed, tmp_path):
    out = tmp_path / "out"
    pack.pack(packed["src"], out, shards=2, progress=False)
    with pytest.raises(DatasetError, match="packed folder.*read_image_folder"):
        list_images(out)  # commands that need files say so
    shard = out / "database-00001-of-00002.array_record"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # a shard cut short: its records cannot be read
    with pytest.raises(images.CorruptImageError, match="database-00001-of-00002.array_record.*cannot be read"):
        read_image_folder(out).abs_paths().load(N - 1)
    shard.unlink()
    with pytest.raises(DatasetError, match="database-00001-of-00002.array_record.*missing"):
        read_image_folder(out)


# ----------------------------------------------------------------------------- (e) the list file
def test_images_paths_file_order_is_kept(tmp_path):
    src = tmp_path / "db"
    write_jpegs(src, 8)
    walked = list_images(src)
    listed = walked[::-1][:6]  # another order, and not every file
    (tmp_path / "db_images_paths.txt").write_text("\n".join(listed) + "\n")
    pack.pack(src, tmp_path / "packed", shards=2, progress=False)
    packed_ = read_image_folder(tmp_path / "packed")
    assert packed_.paths == listed
    assert [(rel, data) for rel, data in shard_records(tmp_path / "packed")] == [
        (rel, (src / rel).read_bytes()) for rel in listed]


# ----------------------------------------------------------------------------- the command
def test_command_end_to_end(packed, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "jaxvpr.data.pack", *map(str, args)], capture_output=True,
                              text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)

    out = tmp_path / "out"
    r = run(packed["src"], out, "--shards", 2, "--workers", 2)
    assert r.returncode == 0, r.stderr
    assert "packed 20 images" in r.stdout and "2 shards" in r.stdout
    assert read_image_folder(out).paths == packed["folder"].paths
    for args, says in (((packed["src"], out), "--overwrite"), ((out, tmp_path / "again"), "already a packed folder")):
        r = run(*args)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and says in last, last
