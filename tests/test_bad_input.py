"""The bad-input corpus (issue 14): each bad input gives its one-line error, or the documented skip.

Every case checks that nothing is written half-way and no earlier result is lost. The commands run
as subprocesses where their output is the point: exit status 1 (2 for argparse usage errors), the
last line of stderr ``error: ...`` naming the file, field or folder, no Python traceback -- and the
traceback with ``JAXVPR_DEBUG=1`` or ``--debug``. Run alone with ``pytest -m faults``.

The truncated-JPEG mode is checked against PIL with ``ImageFile.LOAD_TRUNCATED_IMAGES = True``
(what CosPlace sets) and against the intact file's decode; the recall's denominator against a
hand-computed example.
"""

import ast
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from jaxvpr import cli
from jaxvpr import evaluate as ev
from jaxvpr.data import images, pipeline
from jaxvpr.data.format import DatasetError, ImageFolder, SplitDataset, read_split

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
# Solid colours, one per database image: a query's mean-colour descriptor finds the image of its colour.
COLOURS = [(250, 20, 20), (20, 250, 20), (20, 20, 250), (250, 250, 20)]


def run(module: str, *args: str, **env) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository, on the CPU, with ``env`` added."""
    environ = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          env=environ, timeout=300)


def assert_one_line_error(r: subprocess.CompletedProcess, *names: str, status: int = 1) -> str:
    """The command failed with ``status``, no traceback, and its last stderr line is ``error: ...``
    naming each of ``names``; returns that line."""
    assert r.returncode == status, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr[-3000:]
    for name in names:
        assert name in last, (name, last)
    return last


def jpeg(colour=None, size=(32, 32), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (np.broadcast_to(np.asarray(colour, np.uint8), (*size, 3)) if colour is not None
           else rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def name(east: float, north: float = 0.0) -> str:
    return f"@{east:.1f}@{north:.1f}@@@@@@@@@@@@@.jpg"


def make_split(root: Path, n_database: int = 4, queries=None) -> Path:
    """database/: image i at east 100 i m in COLOURS[i]; queries/: query j 1 m east of ``east``, in
    COLOURS[colour], for each (east, colour) of ``queries`` (default: one on each database image)."""
    queries = [(100.0 * i, i) for i in range(n_database)] if queries is None else queries
    for i in range(n_database):
        (root / "database").mkdir(parents=True, exist_ok=True)
        (root / "database" / name(100.0 * i)).write_bytes(jpeg(COLOURS[i]))
    (root / "queries").mkdir(parents=True, exist_ok=True)
    for j, (east, colour) in enumerate(queries):
        query_path(root, east, j).write_bytes(jpeg(COLOURS[colour]))
    return root


def query_path(root: Path, east: float, j: int) -> Path:
    return root / "queries" / name(east + 1.0, j)


def mean_colour(batch):
    """A descriptor any test can compute by hand: the mean normalised colour of each image (B, 3)."""
    return np.asarray(batch).mean(axis=(1, 2))


def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(autouse=True)
def defaults(monkeypatch):
    """Strict decoding and no debug, whatever the environment; restored after each test (a command run
    in-process sets $JAXVPR_TRUNCATED_IMAGES)."""
    monkeypatch.setenv(images.TRUNCATED_ENV, "error")
    monkeypatch.setenv("JAXVPR_DEBUG", "0")


# ----------------------------------------------------------------------------- images: the decode modes
def test_truncated_jpeg_decodes_as_pil_with_load_truncated_images(tmp_path):
    intact, cut = tmp_path / "intact.jpg", tmp_path / "cut.jpg"
    intact.write_bytes(jpeg(size=(64, 48)))
    cut.write_bytes(intact.read_bytes())
    truncate(cut)
    with pytest.raises(images.CorruptImageError, match="cut.jpg"):
        images.load_image(str(cut))  # mode "error", the default
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # the reference: CosPlace's setting, set by hand
    try:
        with Image.open(cut) as img:
            reference = np.asarray(img.convert("RGB"))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    decoded = images.load_image(str(cut), "pil")
    np.testing.assert_array_equal(decoded, reference)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # the global is PIL's default again
    full = images.load_image(str(intact))
    np.testing.assert_array_equal(decoded[:16], full[:16])  # the first row of 16 x 16 blocks is in the file
    assert (decoded[-8:] == 128).all()  # the rest: the decoder's grey
    with pytest.raises(images.CorruptImageError, match="cut.jpg"):
        images.load_image(str(cut), "error")  # the mode of one call does not stick


def test_threads_decoding_in_both_modes_each_get_their_own(tmp_path):
    import concurrent.futures

    cut = tmp_path / "cut.jpg"
    cut.write_bytes(jpeg(size=(256, 256)))
    truncate(cut)

    def decode(mode):
        try:
            return mode, images.load_image(str(cut), mode).shape
        except images.CorruptImageError:
            return mode, None

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(decode, ["error", "pil"] * 40))
    assert all((shape is None) == (mode == "error") for mode, shape in results)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("content", [b"", b"GIF89a not really", b"\xff\xd8\xff\xe0 a JPEG header and nothing"])
def test_empty_and_non_image_files_stay_unreadable_in_pil_mode(tmp_path, content):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(content)
    for mode in images.TRUNCATED_MODES:
        with pytest.raises(images.CorruptImageError, match="bad.jpg"):
            images.load_image(str(bad), mode)


def test_decode_mode_of_the_process_and_its_errors(tmp_path, monkeypatch):
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(jpeg(size=(64, 48)))
    truncate(cut)
    monkeypatch.setenv(images.TRUNCATED_ENV, "pil")
    assert images.load_image(str(cut)).shape == (64, 48, 3)
    monkeypatch.setenv(images.TRUNCATED_ENV, "lenient")
    with pytest.raises(ValueError, match=r"\$JAXVPR_TRUNCATED_IMAGES='lenient'"):
        images.load_image(str(cut))
    with pytest.raises(ValueError, match=r"config.data.truncated_images='PIL'"):
        images.set_truncated_mode("PIL", "config.data.truncated_images")


def test_a_grain_worker_decodes_with_the_pipelines_mode_and_its_error_names_the_file(tmp_path):
    cut, empty = tmp_path / "cut.jpg", tmp_path / "empty.jpg"
    cut.write_bytes(jpeg(size=(32, 32)))
    truncate(cut)
    empty.write_bytes(b"")
    batches = pipeline.eval_batches([str(cut), str(empty)], batch_size=1, num_workers=1, truncated="pil")
    assert next(batches)["valid"].all()  # decoded in the worker process, in the pipeline's mode
    with pytest.raises(images.CorruptImageError) as info:  # the same class and message as in the worker
        next(batches)
    assert info.value.path == str(empty) and "empty.jpg" in cli.one_line(info.value)


# ----------------------------------------------------------------------------- the recall's denominator
def test_unreadable_queries_count_as_misses_hand_computed():
    """4 database images 100 m apart, 4 queries 1 m from one each (threshold 25 m). Query 0 and 1
    find their image first, query 2 second, query 3 is unreadable.

    miss (default): R@1 = 2/4 = 50 %, R@5 = 3/4 = 75 %; exclude: R@1 = 2/3, R@5 = 3/3."""
    db = ImageFolder(Path("db"), [f"d{i}.jpg" for i in range(4)], np.array([[100.0 * i, 0] for i in range(4)]),
                     np.full(4, np.nan))
    queries = ImageFolder(Path("q"), [f"q{i}.jpg" for i in range(4)],
                          np.array([[100.0 * i + 1, 0] for i in range(4)]), np.full(4, np.nan))
    split = SplitDataset("hand", db, queries)
    db_desc = ev.Descriptors(np.eye(4, dtype=np.float32), np.ones(4, bool), [])
    q_values = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0.4, 0.6], [0, 0, 0, 0]], np.float32)
    q_desc = ev.Descriptors(q_values, np.array([True, True, True, False]), ["q/q3.jpg"])
    thresholds = [ev.Threshold(25.0)]
    res, predictions = ev.evaluate_descriptors(split, db_desc, q_desc, thresholds)
    assert res["num_queries"] == 4 and res["num_queries_skipped"] == 1 and res["unreadable_queries"] == "miss"
    assert res["results"][0]["recall"]["1"] == pytest.approx(50.0)
    assert res["results"][0]["recall"]["5"] == pytest.approx(75.0)
    assert res["results"][0]["upper_bound"] == 100.0
    assert (predictions[3] == -1).all() and predictions[2][:2].tolist() == [3, 2]
    res, _ = ev.evaluate_descriptors(split, db_desc, q_desc, thresholds, unreadable_queries="exclude")
    assert res["num_queries"] == 3 and res["num_queries_skipped"] == 1 and res["unreadable_queries"] == "exclude"
    assert res["results"][0]["recall"]["1"] == pytest.approx(200 / 3)
    assert res["results"][0]["recall"]["5"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="unreadable_queries='skip'"):
        ev.evaluate_descriptors(split, db_desc, q_desc, thresholds, unreadable_queries="skip")


def test_evaluation_of_a_folder_with_truncated_and_empty_queries(tmp_path, monkeypatch):
    # Queries: 0 and 1 right, 2 in the colour of database image 3 (a miss at R@1), 3 truncated, 4 empty.
    queries = [(0, 0), (100, 1), (200, 3), (300, 3), (0, 0)]
    root = make_split(tmp_path / "split", queries=queries)
    cut, empty = query_path(root, 300, 3), query_path(root, 0, 4)
    cut.write_bytes(jpeg(size=(32, 32)))  # noise: the cut falls in the image data, past the header
    truncate(cut)
    empty.write_bytes(b"")

    def recall_at_1(**kwargs):
        res = ev.evaluate_split(mean_colour, read_split(root), progress=False, **kwargs)
        return res, res["results"][0]["recall"]["1"]

    res, r1 = recall_at_1()
    assert (res["num_queries"], res["num_queries_skipped"], r1) == (5, 2, pytest.approx(40.0))  # 2 of 5
    assert sorted(res["skipped_paths"]) == sorted([str(cut), str(empty)])
    res, r1 = recall_at_1(unreadable_queries="exclude")
    assert (res["num_queries"], res["num_queries_skipped"], r1) == (3, 2, pytest.approx(200 / 3))
    monkeypatch.setenv(images.TRUNCATED_ENV, "pil")  # as the thesis configs: the truncated query is described
    res, _ = recall_at_1()
    assert (res["num_queries"], res["num_queries_skipped"]) == (5, 1)
    assert res["skipped_paths"] == [str(empty)]
    with pytest.raises(images.CorruptImageError, match=empty.name):
        recall_at_1(unreadable_queries="error")


def test_an_unreadable_database_image_stops_and_keeps_the_earlier_results(tmp_path):
    root = make_split(tmp_path / "split")
    bad = root / "database" / name(200.0)
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}\n')
    bad.write_bytes(b"")
    with pytest.raises(images.CorruptImageError, match=bad.name):
        ev.evaluate_split(mean_colour, read_split(root), out_dir=out, save_descriptors=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # nothing half-written
    assert json.loads((out / "results.json").read_text()) == {"earlier": True}
    res = ev.evaluate_split(mean_colour, read_split(root), skip_corrupt=True, out_dir=out, progress=False)
    assert (res["num_database"], res["num_database_skipped"], res["skipped_paths"]) == (3, 1, [str(bad)])
    assert res["results"][0]["recall"]["1"] == pytest.approx(75.0)  # query 2's image cannot be retrieved


def test_images_paths_list_naming_missing_files(tmp_path):
    root = make_split(tmp_path / "split")
    names = sorted(p.name for p in (root / "database").iterdir())
    listing = root / "database_images_paths.txt"
    listing.write_text("\n".join(["missing_first.jpg"] + names) + "\n")
    with pytest.raises(DatasetError, match="missing_first.jpg"):  # the list is checked when read
        read_split(root)
    listing.write_text("\n".join(names[:2] + [name(12345.0)] + names[2:]) + "\n")
    split = read_split(root)  # a missing file inside the list is found when decoded
    with pytest.raises(images.CorruptImageError, match="12345.0"):
        ev.evaluate_split(mean_colour, split, progress=False)


# ----------------------------------------------------------------------------- folders and names
def test_empty_missing_and_unreadable_folders(tmp_path, monkeypatch):
    root = make_split(tmp_path / "split")
    with pytest.raises(DatasetError, match="does not exist"):
        read_split(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"queries_night.*does not exist"):
        read_split(root, "queries_night")
    (root / "queries_empty").mkdir()
    with pytest.raises(DatasetError, match=r"queries_empty.*contains no images"):
        read_split(root, "queries_empty")
    # An unreadable folder (root reads every folder, so the refusal is simulated at os.scandir).
    locked, scandir = str(root / "queries"), os.scandir

    def refusing_scandir(path="."):
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing_scandir)
    with pytest.raises(DatasetError, match=r"Cannot read the image folder .*queries.*Permission denied"):
        read_split(root)


@pytest.mark.parametrize("bad_name, field", [
    ("@12.x@0.0@@@@@@@@@@@@@.jpg", "UTM_east"),   # malformed
    ("@100.0@@.jpg", "UTM_north"),                # partial: the northing is missing
    ("@100.0@.jpg.part", None),                   # not an image name at all: not listed
    ("photo.jpg", "UTM_east"),                    # no @ fields
])
def test_malformed_and_partial_names(tmp_path, bad_name, field):
    root = make_split(tmp_path / "split")
    (root / "queries" / bad_name).write_bytes(jpeg(COLOURS[0]))
    if field is None:
        assert len(read_split(root).queries) == 4
        return
    with pytest.raises(DatasetError) as info:
        read_split(root)
    assert str(root / "queries" / bad_name) in str(info.value) and repr(field) in str(info.value)


# ----------------------------------------------------------------------------- the commands
def test_evaluate_command_on_an_empty_folder_and_a_malformed_name(tmp_path):
    root = make_split(tmp_path / "split")
    for p in (root / "queries").iterdir():
        p.unlink()
    r = run("jaxvpr.evaluate", "--dataset", str(root), "--model", "cosplace_resnet18_32", "--random-init")
    assert_one_line_error(r, str(root / "queries"), "contains no images")
    (root / "queries" / "@1.0@x@@@@@@@@@@@@@.jpg").write_bytes(jpeg(COLOURS[0]))
    r = run("jaxvpr.evaluate", "--dataset", str(root), "--model", "cosplace_resnet18_32", "--random-init")
    assert_one_line_error(r, "@1.0@x@", "'UTM_north'")
    r = run("jaxvpr.evaluate", "--dataset", str(root), "--model", "cosplace_resnet18_32", "--random-init",
            JAXVPR_DEBUG="1")
    assert r.returncode == 1 and "Traceback" in r.stderr and "ImageNameError" in r.stderr


def test_evaluate_command_on_a_truncated_image_in_a_grain_worker(tmp_path):
    """The issue's case: a truncated database image, decoded in a Grain worker process, used to end
    in a traceback under Grain's frames. Now its one line names it, and the earlier results stay."""
    root = make_split(tmp_path / "split")
    bad = root / "database" / name(100.0)
    bad.write_bytes(jpeg(size=(32, 32)))  # noise: the cut falls in the image data, past the header
    truncate(bad, 0.5)
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}\n')
    r = run("jaxvpr.evaluate", "--dataset", str(root), "--model", "cosplace_resnet18_32", "--random-init",
            "--resize", "32", "--batch-size", "2", "--num-workers", "1", "--out", str(out))
    assert_one_line_error(r, str(bad), "truncated", "--truncated-images pil")
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert json.loads((out / "results.json").read_text()) == {"earlier": True}


def test_main_command_unknown_and_mistyped_config_fields(tmp_path):
    workdir = tmp_path / "w"
    r = run("jaxvpr.main", "--config", "configs/demo.py", "--workdir", str(workdir), "--config.data.nope=1")
    last = assert_one_line_error(r, "--config.data.nope", "'nope'", "num_workers")
    r = run("jaxvpr.main", "--config", "configs/demo.py", "--workdir", str(workdir), "--config.trian.epochs=1")
    last = assert_one_line_error(r, "'trian'", "did you mean config.train")
    r = run("jaxvpr.main", "--config", "configs/demo.py", "--workdir", str(workdir), "--config.train.epochs=two")
    last = assert_one_line_error(r, "--config.train.epochs=two")
    r = run("jaxvpr.main", "--config", "configs/no_such_config.py", "--workdir", str(workdir))
    last = assert_one_line_error(r, "configs/no_such_config.py")
    assert "no such config file" in last and not workdir.exists()
    r = run("jaxvpr.main", "--config", "configs/demo.py", "--workdir", str(workdir), "--config.data.nope=1",
            "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_an_argparse_command_refuses_to_overwrite_and_keeps_the_folder(tmp_path):
    out = tmp_path / "city"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    r = run("jaxvpr.data.synthetic", "--out", str(out))
    assert_one_line_error(r, str(out), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["earlier.txt"]
    r = run("jaxvpr.data.synthetic", "--out", str(out), "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr and "FileExistsError" in r.stderr
    r = run("jaxvpr.data.synthetic", "--out", str(out), "--preset", "huge")
    assert_one_line_error(r, "--preset", "huge", status=2)  # a usage error: argparse's status, our last line


# ----------------------------------------------------------------------------- checkpoints and pickles
def test_weights_of_another_architecture_are_refused_by_name(tmp_path, capsys):
    from safetensors.numpy import save_file

    from jaxvpr.convert.__main__ import main as convert

    vgg = {"features.0.weight": np.zeros((64, 3, 3, 3), np.float32), "features.0.bias": np.zeros(64, np.float32)}
    save_file(vgg, str(tmp_path / "vgg.safetensors"))
    assert convert(["from-torch", "--model", "cosplace_resnet18_32", "--weights", str(tmp_path / "vgg.safetensors"),
                    "--out", str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "features.0.weight" in err[0]
    assert not (tmp_path / "ckpt").exists()


def test_pickles_that_run_code_are_refused(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from jaxvpr.anyloc import read_vocabulary
    from jaxvpr.convert.__main__ import main as convert
    from jaxvpr.extract import main as extract

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"weight": Payload()}, tmp_path / "evil.pth")
    assert convert(["from-torch", "--model", "cosplace_resnet18_32", "--weights", str(tmp_path / "evil.pth"),
                    "--out", str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "evil.pth" in err[0] and "weights_only" in err[0]
    with pytest.raises(ValueError, match="weights_only"):
        read_vocabulary(tmp_path / "evil.pth")
    np.save(tmp_path / "evil.npy", np.array([Payload()], dtype=object), allow_pickle=True)
    assert extract(["--checkpoint", str(tmp_path / "none"), "--images", str(tmp_path / "evil.npy"),
                    "--out", str(tmp_path / "d.npy")]) == 1
    assert "allow_pickle" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "ckpt").exists() and not (tmp_path / "d.npy").exists()


def test_every_torch_load_refuses_arbitrary_objects():
    """Every ``torch.load`` call of the package passes ``weights_only=True`` (read from the source)."""
    calls = []
    for path in (REPO / "jaxvpr").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", safe))
    assert calls and all(safe for _, safe in calls), calls


# ----------------------------------------------------------------------------- the error runner
def test_a_non_finite_loss_and_wrapped_errors_are_one_line(capsys):
    from jaxvpr.train.loop import NonFiniteLossError

    @cli.command
    def diverges(argv):
        raise NonFiniteLossError("loss is nan at step 12 (config.train.lr=10.0): lower the learning rate.\n"
                                 "The last checkpoint (step 10) is kept.")

    assert diverges([]) == 1
    assert capsys.readouterr().err == ("error: loss is nan at step 12 (config.train.lr=10.0): lower the learning "
                                       "rate. The last checkpoint (step 10) is kept.\n")
    with pytest.raises(NonFiniteLossError):
        diverges(["--debug"])

    @cli.command
    def wraps(argv):
        try:
            images.load_image("/nowhere/x.jpg")
        except images.CorruptImageError as e:
            raise RuntimeError("worker failed") from e

    assert wraps([]) == 1 and "'/nowhere/x.jpg'" in capsys.readouterr().err

    @cli.command
    def bug(argv):
        return {}["key"]

    with pytest.raises(KeyError):  # a bug keeps its traceback
        bug([])
