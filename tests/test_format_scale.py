"""Image lists at SF-XL scale (issue 13 §4): the vectorised geotag parser, PathList, the list cache.

References: a per-name parser written here with Python's ``float`` and ``str.split`` (the format's
definition), the reader before issue 13 (``read_text().splitlines()`` + strip), and the old per-name
loop ``parse_geotags_slow``; equality is bit for bit.
"""

import logging
import math
import os
import pickle
import tempfile

import numpy as np
import pytest
from PIL import Image

from jaxvpr.data import format as fmt
from jaxvpr.data import image_list, pipeline
from jaxvpr.data import names as name_parser

N = 20_000


def reference_geotags(names):
    """(east, north), heading of each name: fields 1, 2 and 9 of ``basename.split("@")`` (heading
    wrapped into [0, 360) with Python's %, NaN when empty or absent)."""
    utm, heading = np.empty((len(names), 2)), np.empty(len(names))
    for i, name in enumerate(names):
        parts = os.path.basename(name).split("@")
        utm[i] = float(parts[1]), float(parts[2])
        h = parts[9] if len(parts) > 10 else ""
        heading[i] = float(h) % 360.0 if h else math.nan
    return utm, heading


def bits(a):
    return np.ascontiguousarray(a).view(np.uint64)


def number(rng) -> str:
    """A decimal string Python's float accepts, in one of many spellings."""
    x = float(rng.uniform(-1e7, 1e7))
    kind = int(rng.integers(0, 10))
    if kind == 0:
        return repr(x)  # 17 significant digits
    if kind == 1:
        return f"{x:.{int(rng.integers(0, 26))}f}"  # up to 25 decimals (longer than 32 chars: per-name path)
    if kind == 2:
        return f"{x:.{int(rng.integers(0, 17))}{'eE'[int(rng.integers(0, 2))]}}"
    if kind == 3:
        return f"{int(rng.integers(1, 10**9))}e{int(rng.integers(-320, 290))}"  # subnormal to huge, finite
    if kind == 4:
        return str(int(x))
    if kind == 5:
        return rng.choice(["+", "", "-"]) + "0" * int(rng.integers(0, 4)) + f"{abs(x):.2f}"
    if kind == 6:
        digits = "".join(rng.choice(list("0123456789"), int(rng.integers(1, 31))))
        cut = int(rng.integers(0, len(digits) + 1))
        return digits[:cut] + "." + digits[cut:] if digits[:cut] + digits[cut:] else "0"
    if kind == 7:
        return rng.choice([".5", "5.", "-.5", "+5.", "1e+05", "1E-05", "-0", "0.0", "1_000.25", " 12.5", "12.5 ",
                           "-1e-20", "-360", "720.5", "0e5", "00.000"])  # -1e-20 % 360.0 == 360.0
    if kind == 8:
        return f"{x:.20g}"
    return f"{x:.2f}"


def random_name(rng) -> str:
    east, north = number(rng), number(rng)
    kind = int(rng.integers(0, 6))
    heading = "" if kind == 0 else str(int(rng.integers(-720, 720))) if kind == 1 else number(rng)
    folder = rng.choice(["", "37.77/-122.41/", "a@b/"])  # an '@' in a folder is not part of the name
    if kind == 2:  # Pitts30k-style short name: no heading field
        return f"{folder}@{east}@{north}@17@T@.jpg"
    if kind == 3:  # the heading is the last part: not a field (no '@' after it)
        return f"{folder}@{east}@{north}@@@@@@@{heading.strip()}"  # (a list's line is stripped)
    return f"{folder}@{east}@{north}@10@S@37.7@-122.5@pano@03@{heading}@-2@0.5@2.5@201807@n@.jpg"


@pytest.fixture(scope="module")
def names():
    rng = np.random.default_rng(0)
    return [random_name(rng) for _ in range(N)]


def write_listed_folder(root, names, text=None):
    """``root/database`` with ``database_images_paths.txt`` listing ``names`` (first and last exist)."""
    folder = root / "database"
    for name in (names[0], names[-1]):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    list_file = root / "database_images_paths.txt"
    list_file.write_bytes(("\n".join(names) + "\n").encode() if text is None else text)
    return folder, list_file


def no_parse(*args):
    raise AssertionError("the list was parsed although its cache is valid")


# ----------------------------------------------------------------------------- the parser
def test_vectorised_parse_is_bit_identical_to_python_float(names):
    utm, heading = fmt.parse_geotags(names)
    ref_utm, ref_heading = reference_geotags(names)
    assert np.array_equal(bits(utm), bits(ref_utm)) and np.array_equal(bits(heading), bits(ref_heading))
    slow_utm, slow_heading = fmt.parse_geotags_slow(names)
    assert np.array_equal(bits(utm), bits(slow_utm)) and np.array_equal(bits(heading), bits(slow_heading))
    assert np.isnan(heading).any() and (heading[~np.isnan(heading)] >= 0).all()


def test_list_file_read_with_numpy_equals_reference(names, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXVPR_CACHE", str(tmp_path / "user_cache"))
    folder, list_file = write_listed_folder(tmp_path, names)
    f = fmt.read_image_folder(folder)
    assert len(f) == N and f.paths == names
    ref_utm, ref_heading = reference_geotags(names)
    assert np.array_equal(bits(f.utm), bits(ref_utm)) and np.array_equal(bits(f.heading), bits(ref_heading))


@pytest.mark.parametrize("line_break, pad, odd_name", [
    ("\r\n", "", False), ("\n", " ", False), ("\n\n", "", False), ("\n", "", True)])
def test_other_lists_read_as_before(names, tmp_path, monkeypatch, line_break, pad, odd_name):
    """CRLF, spaces around paths, blank lines, a non-ASCII name: the paths of the old reader."""
    monkeypatch.setenv("JAXVPR_CACHE", str(tmp_path / "user_cache"))
    some = names[:500] + (["vía/@1.5@2.5@@@@@@@٣٠@@@@@@.jpg"] if odd_name else []) + names[500:1000]
    text = line_break.join(pad + n + pad for n in some) + line_break
    folder, list_file = write_listed_folder(tmp_path, some, text.encode())
    old = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    f = fmt.read_image_folder(folder)
    assert f.paths == old == some
    ref_utm, ref_heading = reference_geotags(some)
    assert np.array_equal(bits(f.utm), bits(ref_utm)) and np.array_equal(bits(f.heading), bits(ref_heading))
    if odd_name:
        assert f.heading[500] == 30.0  # Arabic-Indic digits: Python's float reads them


def test_fixed_width_lists_are_read_by_columns(tmp_path, monkeypatch):
    """SF-XL-like lines of one width with '/' and '@' in the same columns: fields are found from the
    first line's layout (``_field_spans`` is not called); same numbers, same errors."""
    monkeypatch.setenv("JAXVPR_CACHE", str(tmp_path / "user_cache"))
    rng = np.random.default_rng(1)
    names = [f"37.77/-122.41/@{e:010.2f}@{n:010.2f}@10@S@037.75492@-122.51058@{'p' * 22}@@{h:03d}@@@@201311@@.jpg"
             for e, n, h in zip(rng.uniform(5e5, 6e5, N), rng.uniform(4.1e6, 4.2e6, N), rng.integers(0, 720, N))]
    names[7] = names[7][:-19] + "-12" + names[7][-16:]  # a negative heading, of the same width
    folder, list_file = write_listed_folder(tmp_path, names)

    def no_search(*args):
        raise AssertionError("the lines were searched one by one")

    monkeypatch.setattr(name_parser, "_field_spans", no_search)
    f = fmt.read_image_folder(folder)
    ref_utm, ref_heading = reference_geotags(names)
    assert np.array_equal(bits(f.utm), bits(ref_utm)) and np.array_equal(bits(f.heading), bits(ref_heading))
    bad = names[:N // 2] + ["37.77/-122.41/@x" + names[0][16:]] + names[N // 2 + 1:]  # x for a digit
    list_file.write_text("\n".join(bad) + "\n")
    with pytest.raises(fmt.ImageNameError, match="'x") as e:
        fmt.read_image_folder(folder)
    assert e.value.field == "UTM_east" and e.value.path.endswith(bad[N // 2])


@pytest.mark.parametrize("bad, field", [
    ("@abc@4178906.83@10@S@@@@@@@@@@@.jpg", "UTM_east"),
    ("@543256.96@@10@S@@@@@@@@@@@.jpg", "UTM_north"),
    ("@543256.96@nan@10@S@@@@@@@@@@@.jpg", "UTM_north"),
    ("@1e999@4178906.83@10@S@@@@@@@@@@@.jpg", "UTM_east"),
    ("@1-2@4178906.83@10@S@@@@@@@@@@@.jpg", "UTM_east"),
    ("@1e@4178906.83@10@S@@@@@@@@@@@.jpg", "UTM_east"),
    ("@543256.96@4178906.83@10@S@@@@@north@@@@@@.jpg", "heading"),
    ("@543256.96@4178906.83@10@S@@@@@1.2.3@@@@@@.jpg", "heading"),
    ("photo.jpg", "UTM_east"),
    ("dir@1@2@3/photo.jpg", "UTM_east"),
])
def test_first_malformed_name_gives_the_per_name_error(names, tmp_path, monkeypatch, bad, field):
    monkeypatch.setenv("JAXVPR_CACHE", str(tmp_path / "user_cache"))
    listed = names[:12345] + [bad] + names[12345:15000] + ["@x@y@.jpg"] + names[15000:]
    folder, _ = write_listed_folder(tmp_path, listed)
    with pytest.raises(fmt.ImageNameError) as got:
        fmt.read_image_folder(folder)
    with pytest.raises(fmt.ImageNameError) as expected:  # the per-name parser on the same path
        fmt.parse_image_name(os.path.join(str(folder), bad))
    assert (got.value.field, str(got.value)) == (field, str(expected.value)) and bad in str(got.value)
    with monkeypatch.context() as m, pytest.raises(fmt.ImageNameError) as again:  # from the cache: the same error
        m.setattr(image_list, "_parse_plain_list", no_parse)
        fmt.read_image_folder(folder)
    assert str(again.value) == str(got.value)
    assert fmt.list_images(folder) == listed  # the paths alone need no geotags
    with pytest.raises(fmt.ImageNameError) as direct:
        fmt.parse_geotags(listed)
    assert direct.value.path == bad


# ----------------------------------------------------------------------------- PathList
def test_path_list_reads_like_a_list_of_str():
    strings = ["a/@1@2@.jpg", "b/ñ.jpg", "", "c/@3@4@.jpg", "line\nbreak.jpg", "z.jpg"]
    p = fmt.PathList.from_strings(strings)
    assert len(p) == 6 and list(p) == strings and p == strings and strings == p and p != strings[:-1]
    assert p[1] == "b/ñ.jpg" and p[-1] == "z.jpg" and p[np.int64(3)] == "c/@3@4@.jpg"
    assert p[1:4] == strings[1:4] and p[::2] == strings[::2] and p[4:1] == [] and p.index("") == 2
    assert p + ["x"] == strings + ["x"] and ["x"] + p == ["x"] + strings
    assert p.with_root("/r")[0] == "/r/a/@1@2@.jpg" and p.with_root("/r")[1:3] == ["/r/b/ñ.jpg", "/r/"]
    with pytest.raises(IndexError):
        p[6]
    for q in (p, p[2:5], p.with_root("/r")):
        assert pickle.loads(pickle.dumps(q)) == q
    many = fmt.PathList.from_strings([f"{i:07d}.jpg" for i in range(N)])
    assert len(pickle.dumps(many)) < many.nbytes + 1000 == 20 * N + 8 + 1000  # 12 B + 8 B offset per path


def test_image_folder_paths_and_abs_paths(names, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXVPR_CACHE", str(tmp_path / "user_cache"))
    folder, _ = write_listed_folder(tmp_path, names)
    f = fmt.read_image_folder(folder)
    assert isinstance(f.paths, fmt.PathList) and f.abs_paths() == [os.path.join(str(folder), n) for n in names]
    built = fmt.ImageFolder(folder, list(names[:3]), f.utm[:3], f.heading[:3])  # a list is converted
    assert isinstance(built.paths, fmt.PathList) and built.paths == names[:3]


# ----------------------------------------------------------------------------- the cache
def test_cache_is_used_when_valid_and_read_again_when_the_list_changes(names, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("JAXVPR_CACHE", str(tmp_path / "user_cache"))
    folder, list_file = write_listed_folder(tmp_path, names)
    first = fmt.read_image_folder(folder)
    beside, user = fmt.image_list_caches(list_file)
    assert beside == tmp_path / "database_images_paths.jaxvpr-cache" and beside.exists() and not user.exists()
    assert not list(tmp_path.glob("*.tmp-*"))

    with monkeypatch.context() as m:
        m.setattr(image_list, "_parse_plain_list", no_parse)
        cached = fmt.read_image_folder(folder)
    assert cached.paths == first.paths == names and cached.paths._mapped is not None
    assert np.array_equal(bits(cached.utm), bits(first.utm)) and np.array_equal(bits(cached.heading), bits(first.heading))
    # a mapped PathList is pickled (to Grain workers) as the cache file's name, not its paths
    sent = pickle.dumps(cached.abs_paths()[5:])
    assert len(sent) < 1000 and pickle.loads(sent) == cached.abs_paths()[5:]
    builder = pipeline._TrainBatchBuilder(cached.abs_paths(), None, 4, None, 0, 0, 1)
    assert len(pickle.dumps(builder)) < 2000

    # an edit in the middle, same size: the mtime (and the hash of the first/last MiB) differ
    edited = list(names)
    edited[N // 2] = "@1.25@2.5@@@@@@@90@@@@@@.jpg".ljust(len(names[N // 2]), "x")
    list_file.write_bytes(("\n".join(edited) + "\n").encode())
    f = fmt.read_image_folder(folder)
    assert f.paths == edited and tuple(f.utm[N // 2]) == (1.25, 2.5) and f.heading[N // 2] == 90.0
    assert np.array_equal(bits(np.delete(f.utm, N // 2, 0)), bits(np.delete(first.utm, N // 2, 0)))
    with monkeypatch.context() as m:  # and the rewritten cache holds the edit
        m.setattr(image_list, "_parse_plain_list", no_parse)
        assert fmt.read_image_folder(folder).paths == edited
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no cache was found damaged


def test_a_killed_writers_temporary_cache_file_is_removed_by_the_next_writer(names, tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys

    monkeypatch.setenv("JAXVPR_CACHE", str(tmp_path / "user_cache"))
    folder, list_file = write_listed_folder(tmp_path, names[:50])
    cache = fmt.image_list_caches(list_file)[0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname().replace("-", "_")
    left = tmp_path / (image_list._temp_prefix(cache, host, int(dead.stdout)) + "x1")  # SIGKILLed mid-write
    running = tmp_path / (image_list._temp_prefix(cache, host, os.getpid()) + "x2")  # being written by a live process
    other = tmp_path / (image_list._temp_prefix(cache, "otherhost", int(dead.stdout)) + "x3")  # another host's (shared disk)
    for f in (left, running, other):
        f.write_bytes(b"partial")
    assert fmt.read_image_folder(folder).paths == names[:50] and cache.exists()
    assert not left.exists() and running.exists() and other.exists()


def test_grain_workers_map_the_cached_paths(tmp_path, monkeypatch):
    """Training batches from a listed folder: workers get the cache file's name, batches are the same."""
    monkeypatch.setenv("JAXVPR_CACHE", str(tmp_path / "user_cache"))
    rng = np.random.default_rng(0)
    names = [f"@{i}.5@{2 * i}.25@@@@@@@{i * 40}@@@@@@.jpg" for i in range(8)]
    folder, _ = write_listed_folder(tmp_path, names)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / name)
    paths = fmt.read_image_folder(folder).abs_paths()
    assert paths._mapped is not None
    batches = [list(pipeline.train_batches(paths, pipeline.UniformSampler(8), 4, None, seed=3, num_steps=2,
                                           num_workers=workers)) for workers in (0, 1)]
    for a, b in zip(*batches):
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["index"], b["index"])


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_cache_is_ignored_and_rewritten(names, tmp_path, monkeypatch, damage):
    monkeypatch.setenv("JAXVPR_CACHE", str(tmp_path / "user_cache"))
    folder, list_file = write_listed_folder(tmp_path, names)
    first = fmt.read_image_folder(folder)
    beside = fmt.image_list_caches(list_file)[0]
    data = bytearray(beside.read_bytes())
    if damage == "truncate":
        del data[len(data) // 2:]
    else:
        data[len(data) // 3] ^= 0x01  # inside the paths
    beside.write_bytes(bytes(data))
    f = fmt.read_image_folder(folder)
    assert f.paths == names and np.array_equal(bits(f.utm), bits(first.utm))
    assert beside.stat().st_size > len(data) if damage == "truncate" else beside.read_bytes() != bytes(data)


def test_read_only_dataset_falls_back_to_the_user_cache(names, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXVPR_CACHE", str(tmp_path / "user_cache"))
    dataset = tmp_path / "dataset"
    folder, list_file = write_listed_folder(dataset, names)
    dataset.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: refuse like a read-only folder would
        make = tempfile.mkstemp

        def refuse(*args, dir=None, **kwargs):
            if os.path.samefile(dir, dataset):
                raise PermissionError(13, "Permission denied", str(dir))
            return make(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    try:
        first = fmt.read_image_folder(folder)
        beside, user = fmt.image_list_caches(list_file)
        assert not beside.exists() and user.exists() and user.parent == tmp_path / "user_cache" / "image_lists"
        assert first.paths._mapped is not None
        again = fmt.read_image_folder(folder)
        assert again.paths == names and np.array_equal(bits(again.utm), bits(first.utm))
        # no place for a cache at all: read into memory, same result
        monkeypatch.setenv("JAXVPR_CACHE", str(list_file))  # a file: no folder can be made there
        alone = fmt.read_image_folder(folder)
        assert alone.paths == names and alone.paths._mapped is None
        assert np.array_equal(bits(alone.utm), bits(first.utm)) and np.array_equal(bits(alone.heading), bits(first.heading))
    finally:
        dataset.chmod(0o755)
