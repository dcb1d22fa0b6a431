"""An @-format dataset as a TFDS dataset (jaxvpr/data/tfds_dataset.py): read back by TFDS itself
(``builder_from_directory`` + ``as_data_source``, and Grain on it) and by jaxvpr's pipelines, against
the folder of files it was built from."""

import pickle

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from jaxvpr import evaluate as ev  # noqa: E402
from jaxvpr.data import images, pipeline  # noqa: E402
from jaxvpr.data import tfds_dataset as td  # noqa: E402
from jaxvpr.data.format import DatasetError, read_image_folder, read_split  # noqa: E402

from test_pack import _assert_same_batches, _train, write_jpegs  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds") / "city"
    write_jpegs(root / "images/test/database", 12, seed=0)
    write_jpegs(root / "images/test/queries", 5, seed=1, subfolder_every=0)
    out = td.build(root, root.parent / "data")
    return {"root": root, "out": out}


def test_splits_hold_the_folders_images_and_geotags_in_row_order(built):
    root, out = built["root"], built["out"]
    assert out == root.parent / "data" / "city" / "1.0.0"
    source = tfds.builder_from_directory(str(out)).as_data_source()
    assert set(source) == {"images_test_database", "images_test_queries"}
    folder = read_image_folder(root / "images/test/database")
    split = source["images_test_database"]
    assert len(split) == len(folder) == 12
    for i in range(len(folder)):
        example = split[i]
        assert example["path"].decode() == folder.paths[i]
        np.testing.assert_array_equal(example["utm"], folder.utm[i])
        np.testing.assert_array_equal(example["heading"], folder.heading[i])  # NaN where the name has none
        np.testing.assert_array_equal(example["image"], images.load_image(folder.abs_paths()[i]))  # TFDS's decode
    import grain

    batch = next(iter(grain.MapDataset.source(split).batch(4)))  # Grain reads the TFDS source as it is
    assert batch["image"].shape == (4, 32, 40, 3)


def test_jaxvpr_reads_a_tfds_split_like_the_folder(built):
    root, out = built["root"], built["out"]
    folder = read_image_folder(root / "images/test/database")
    tf_folder = td.read_tfds_folder(out, "images_test_database")
    assert tf_folder.paths == folder.paths
    np.testing.assert_array_equal(tf_folder.utm, folder.utm)
    np.testing.assert_array_equal(tf_folder.heading, folder.heading)
    sources = tf_folder.abs_paths()
    restored = pickle.loads(pickle.dumps(sources.take([3, 1])))  # as sent to Grain workers
    np.testing.assert_array_equal(restored.load(1), images.load_image(folder.abs_paths()[1]))
    assert restored.size(0) == (32, 40)
    classes = [list(range(c, 12, 4)) for c in range(4)]
    want = _train(folder.abs_paths(), pipeline.ClassBalancedSampler(classes, 4), 0)
    got = _train(sources, pipeline.ClassBalancedSampler(classes, 4), 0)
    _assert_same_batches(got, want)
    # evaluation from the TFDS splits: the folder's recalls
    mean = lambda batch: np.asarray(batch).mean(axis=(1, 2))
    split = td.read_tfds_split(out, "images/test")
    from_tfds = ev.evaluate_split(mean, split, progress=False)
    from_files = ev.evaluate_split(mean, read_split(root / "images/test"), progress=False)
    assert from_tfds["results"] == from_files["results"] and from_tfds["num_queries"] == 5


def test_errors_name_what_is_wrong(built, tmp_path):
    with pytest.raises(DatasetError, match="no split 'images_test_night'"):
        td.read_tfds_folder(built["out"], "images_test_night")
    with pytest.raises(DatasetError, match="--overwrite"):
        td.build(built["root"], built["root"].parent / "data")
    with pytest.raises(DatasetError, match="not a TFDS dataset"):
        td.read_tfds_folder(tmp_path, "x")
    with pytest.raises(DatasetError, match="does not exist"):
        td.build(tmp_path / "missing", tmp_path / "data")


def test_command_line(built, tmp_path, capsys):
    assert td.main([str(built["root"]), "--data-dir", str(tmp_path), "--name", "mycity",
                    "--folders", "images/test/queries"]) == 0
    assert "images_test_queries (5 images)" in capsys.readouterr().out
    assert len(td.read_tfds_folder(tmp_path / "mycity" / "1.0.0", "images_test_queries")) == 5
