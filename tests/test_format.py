"""Dataset format: image names, folder listing, positives. References are hand-computed examples."""

import os

import numpy as np
import pytest

from jaxvpr.data import format as fmt
from jaxvpr.data.positives import PositiveFinder, heading_difference, is_positive

NAME = "@0543256.96@4178906.83@10@S@37.7534@-122.5079@pano_x1@03@270.50@-2@0.5@2.5@201807@night@.jpg"


def test_parse_full_name():
    r = fmt.parse_image_name("/some/dir/" + NAME)
    assert (r.utm_east, r.utm_north) == (543256.96, 4178906.83)
    assert (r.zone_number, r.zone_letter) == (10, "S")
    assert (r.lat, r.lon) == (37.7534, -122.5079)
    assert (r.pano_id, r.tile_num, r.heading) == ("pano_x1", "03", 270.5)
    assert (r.pitch, r.roll, r.height) == (-2.0, 0.5, 2.5)
    assert (r.timestamp, r.note) == ("201807", "night")


def test_parse_empty_fields_allowed():
    r = fmt.parse_image_name("@100.5@200.25@@@@@@@@@@@@@.jpg")
    assert (r.utm_east, r.utm_north) == (100.5, 200.25)
    assert r.heading is None and r.zone_number is None and r.note == ""
    # Pitts30k-style short names (fewer trailing fields) still give east/north.
    r = fmt.parse_image_name("@584.0@4477.0@17@T@.jpg")
    assert (r.utm_east, r.utm_north, r.zone_number) == (584.0, 4477.0, 17)


@pytest.mark.parametrize("name, field", [
    ("photo.jpg", "UTM_east"),
    ("@abc@4178906.83@10@S@@@@@@@@@@@.jpg", "UTM_east"),
    ("@543256.96@@10@S@@@@@@@@@@@.jpg", "UTM_north"),
    ("@543256.96@4178906.83@ten@S@@@@@@@@@@@.jpg", "zone_number"),
    ("@543256.96@4178906.83@10@S@@@@@north@@@@@@.jpg", "heading"),
    ("@543256.96@nan@10@S@@@@@@@@@@@.jpg", "UTM_north"),
])
def test_malformed_names_name_file_and_field(name, field):
    with pytest.raises(fmt.ImageNameError) as e:
        fmt.parse_image_name("/data/x/" + name)
    assert e.value.field == field and name in str(e.value) and field in str(e.value)


def _touch(folder, names):
    for n in names:
        p = folder / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_folder_walk_sorted_recursive_and_geotags(tmp_path):
    db = tmp_path / "database"
    _touch(db, ["b/@2@0@@@@@@@90@@@@@@.jpg", "@1@0@@@@@@@370@@@@@@.jpg", "notes.txt", "a/@0@5@@@@@@@@@@@@@@.png"])
    f = fmt.read_image_folder(db)
    assert f.paths == sorted(["b/@2@0@@@@@@@90@@@@@@.jpg", "@1@0@@@@@@@370@@@@@@.jpg", "a/@0@5@@@@@@@@@@@@@@.png"])
    row = f.paths.index("@1@0@@@@@@@370@@@@@@.jpg")
    assert f.utm[row].tolist() == [1.0, 0.0] and f.heading[row] == 10.0  # wrapped into [0, 360)
    assert np.isnan(f.heading[f.paths.index("a/@0@5@@@@@@@@@@@@@@.png")])
    assert all(os.path.isabs(p) for p in f.abs_paths())


def test_images_paths_file_is_used_instead_of_walk(tmp_path):
    db = tmp_path / "database"
    _touch(db, ["@1@1@@@@@@@@@@@@@@.jpg", "@2@2@@@@@@@@@@@@@@.jpg", "@3@3@@@@@@@@@@@@@@.jpg"])
    (tmp_path / "database_images_paths.txt").write_text("@3@3@@@@@@@@@@@@@@.jpg\n@1@1@@@@@@@@@@@@@@.jpg\n")
    f = fmt.read_image_folder(db)
    assert f.paths == ["@3@3@@@@@@@@@@@@@@.jpg", "@1@1@@@@@@@@@@@@@@.jpg"]  # the file's order, not sorted
    assert len(fmt.read_image_folder(db, use_paths_file=False)) == 3


def test_folder_errors(tmp_path):
    with pytest.raises(fmt.DatasetError, match="does not exist"):
        fmt.read_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(fmt.DatasetError, match="contains no images"):
        fmt.read_image_folder(tmp_path / "empty")
    db = tmp_path / "database"
    _touch(db, ["@1@1@@@@@@@@@@@@@@.jpg"])
    (tmp_path / "database_images_paths.txt").write_text("elsewhere/@9@9@@@@@@@@@@@@@@.jpg\n")
    with pytest.raises(fmt.DatasetError, match="database_images_paths.txt"):
        fmt.read_image_folder(db)
    (tmp_path / "database_images_paths.txt").write_text("\n")
    with pytest.raises(fmt.DatasetError, match="is empty"):
        fmt.read_image_folder(db)
    (tmp_path / "database_images_paths.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(fmt.DatasetError, match="Cannot read"):
        fmt.read_image_folder(db)
    with pytest.raises(fmt.DatasetError, match="queries"):
        fmt.read_split(tmp_path)


def test_heading_difference_wraps():
    assert heading_difference(359, 1) == 2
    assert heading_difference(10, 190) == 180
    assert heading_difference(0, 360) == 0
    np.testing.assert_allclose(heading_difference([350, 20], [10, 340]), [20, 40])


def test_positives_distance_and_angle_hand_computed():
    db_utm = np.array([[0, 0], [3, 4], [10, 0], [0, 30], [500000.5, 4e6]], dtype=float)
    db_head = np.array([0, 100, 355, 0, 0], dtype=float)
    q_utm = np.array([[0, 0], [6, 8], [500000.0, 4e6], [1000, 1000]], dtype=float)
    q_head = np.array([5, 90, 10, 0], dtype=float)
    finder = PositiveFinder(db_utm, db_head)
    pos = finder.positives(q_utm, 10.0)
    # from q0: 0, 5, 10, 30 m; from q1: 10, 5, 8.9, 22.8 m -> within 10 m ("within" is <=).
    assert [p.tolist() for p in pos] == [[0, 1, 2], [0, 1, 2], [4], []]
    pos = finder.positives(q_utm, 10.0, q_head, angle_deg=10)
    # q0 heading 5: db0 (5° off) yes, db1 (95°) no, db2 (10° off via wrap) yes.
    assert [p.tolist() for p in pos] == [[0, 2], [1], [4], []]
    assert finder.has_positive(q_utm, 10.0).tolist() == [True, True, True, False]
    assert finder.has_positive(q_utm, 0.4).tolist() == [True, False, False, False]
    assert finder.has_positive(q_utm, 10.0, q_head, 5).tolist() == [True, False, False, False]
    hits = is_positive(db_utm, q_utm, np.array([[3, 0], [0, 1], [4, -1], [0, 4]]), 10.0)
    assert hits.tolist() == [[False, True], [True, True], [True, False], [False, False]]
    hits = is_positive(db_utm, q_utm, np.array([[1, 2]] * 4), 10.0, db_head, q_head, 10)
    assert hits.tolist() == [[False, True], [True, False], [False, False], [False, False]]


def test_angle_threshold_needs_headings():
    finder = PositiveFinder(np.zeros((2, 2)), np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="empty heading"):
        finder.positives(np.zeros((1, 2)), 5.0, np.array([0.0]), angle_deg=5)


def test_positives_match_brute_force_on_random_points():
    rng = np.random.default_rng(0)
    db, q = rng.uniform(0, 200, (3000, 2)) + 4e6, rng.uniform(0, 200, (300, 2)) + 4e6
    dh, qh = rng.uniform(0, 360, 3000), rng.uniform(0, 360, 300)
    finder = PositiveFinder(db, dh)
    dist = np.linalg.norm(q[:, None] - db[None], axis=-1)
    ang = np.abs(qh[:, None] - dh[None]) % 360
    ang = np.minimum(ang, 360 - ang)
    for d, a in [(10, None), (25, None), (25, 60), (1, 5)]:
        ref = (dist <= d) & ((ang <= a) if a is not None else True)
        got = finder.positives(q, d, qh, a, chunk=64)
        assert [g.tolist() for g in got] == [np.flatnonzero(r).tolist() for r in ref]
        np.testing.assert_array_equal(finder.has_positive(q, d, qh, a), ref.any(1))


def test_aggregate_shifts_east_by_dataset_index():
    a, b = np.array([[1.0, 2.0]]), np.array([[1.0, 2.0]])
    sa, sb = fmt.aggregate_utm([a, b])
    assert sa.tolist() == [[1.0, 2.0]] and sb.tolist() == [[100001.0, 2.0]]
    assert a.tolist() == [[1.0, 2.0]]  # inputs untouched
