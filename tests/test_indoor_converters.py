"""Indoor converters (kapture, Baidu Mall) → `@` layout.

References: cameras placed by hand at chosen ground positions and headings; kapture poses built from
them with scipy's Rotation (not with the converter's maths) and written with kapture's own writers;
Baidu `.camera` files written out by hand. Expected names are the hand-chosen numbers plus the
documented offset (floor(-min) + 1 m when the minimum is <= 0).
"""

import json
import os
from urllib.parse import unquote

import kapture
import numpy as np
import pytest
from kapture.io.csv import kapture_to_dir
from PIL import Image
from scipy.spatial.transform import Rotation

from jaxvpr.data import baidu
from jaxvpr.data import kapture as kconv
from jaxvpr.data.format import parse_image_name, read_split

R2 = 0.70710678118654752  # sqrt(2) / 2


def _write_jpeg(path, color=(200, 30, 30), fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path, format=fmt)


def _camera_to_world(heading_deg, vertical, pitch_deg=0.0):
    """Camera→world rotation of an upright camera (image-down axis = world down) looking at
    `heading_deg` from the north axis towards the east axis, tilted down by `pitch_deg`.

    vertical "y": world y points down, east = x, north = z (NAVER-like).
    vertical "z": world z points up, east = x, north = y.
    """
    h, p = np.radians(heading_deg), np.radians(pitch_deg)
    if vertical == "y":
        east, north, down = np.eye(3)[0], np.eye(3)[2], np.eye(3)[1]
    else:
        east, north, down = np.eye(3)[0], np.eye(3)[1], -np.eye(3)[2]
    forward = np.cos(p) * (np.sin(h) * east + np.cos(h) * north) + np.sin(p) * down
    image_down = np.cross(forward, np.cross(down, forward))
    image_down /= np.linalg.norm(image_down)
    right = np.cross(image_down, forward)  # camera x = y × z
    return np.stack([right, image_down, forward], axis=1)


def _world_to_camera_pose(centre, heading_deg, vertical, pitch_deg=0.0):
    """kapture PoseTransform (world→camera) of a camera at `centre` (metres) via scipy."""
    rot = Rotation.from_matrix(_camera_to_world(heading_deg, vertical, pitch_deg)).inv()
    t = -rot.apply(np.asarray(centre, dtype=float))
    return kapture.PoseTransform(rot.as_quat(scalar_first=True), t)


def _write_split(folder, cameras, poses, images, rigs=None):
    """A kapture split: `poses` [(timestamp, device, PoseTransform)], `images` [(timestamp, camera, path)]."""
    sensors = kapture.Sensors()
    for cam in cameras:
        sensors[cam] = kapture.Camera(kapture.CameraType.SIMPLE_PINHOLE, [8, 6, 5.0, 4.0, 3.0])
    trajectories = kapture.Trajectories()
    for timestamp, device, pose in poses:
        trajectories[timestamp, device] = pose
    records = kapture.RecordsCamera()
    for timestamp, cam, path in images:
        records[timestamp, cam] = path
        _write_jpeg(folder / "sensors" / "records_data" / path)
    kapture_rigs = None
    if rigs:
        kapture_rigs = kapture.Rigs()
        for rig_id, members in rigs.items():
            for cam, pose in members.items():
                kapture_rigs[rig_id, cam] = pose
    kapture_to_dir(str(folder), kapture.Kapture(sensors=sensors, rigs=kapture_rigs,
                                               trajectories=trajectories, records_camera=records))
    return folder


def _y_vertical_scene(root):
    """World y vertical (down). Database: (x, z) = (1, 2) heading 0, (5, -3) heading 90;
    query: (-2.5, 4) heading 225, pitched down 10 degrees (the heading ignores pitch)."""
    mapping = _write_split(
        root / "release" / "mapping", ["cam0"],
        poses=[(100, "cam0", _world_to_camera_pose([1, -1.50, 2], 0, "y")),
               (200, "cam0", _world_to_camera_pose([5, -1.52, -3], 90, "y"))],
        images=[(100, "cam0", "cam0/100.jpg"), (200, "cam0", "cam0/200.jpg")])
    validation = _write_split(
        root / "release" / "validation", ["phone"],
        poses=[(7, "phone", _world_to_camera_pose([-2.5, -1.49, 4], 225, "y", pitch_deg=10))],
        images=[(7, "phone", "phone/phone_7.jpg")])
    return mapping, validation


def _names(folder):
    return sorted(os.listdir(folder))


def _records(folder):
    """Name records keyed by their note (the original path)."""
    return {unquote(r.note): r for r in (parse_image_name(n) for n in _names(folder))}


def _check(record, east, north, heading, height):
    assert record.utm_east == pytest.approx(east, abs=1e-6)
    assert record.utm_north == pytest.approx(north, abs=1e-6)
    assert record.heading == pytest.approx(heading, abs=1e-4)
    assert record.height == pytest.approx(height, abs=1e-6)
    assert record.zone_number is None and record.zone_letter == "" and record.lat is None


def test_kapture_y_vertical(tmp_path):
    mapping, validation = _y_vertical_scene(tmp_path / "scene")
    out = tmp_path / "out"
    summary = kconv.convert(mapping, validation, out)
    # east = x + 3 (min -2.5), north = z + 4 (min -3).
    db, q = _records(out / "database"), _records(out / "queries")
    _check(db["cam0/100.jpg"], 4.0, 6.0, 0.0, -1.50)
    _check(db["cam0/200.jpg"], 8.0, 1.0, 90.0, -1.52)
    _check(q["phone/phone_7.jpg"], 0.5, 8.0, 225.0, -1.49)
    assert db["cam0/200.jpg"].pano_id == "cam0" and db["cam0/200.jpg"].timestamp == "200"
    assert summary["vertical_axis"] == "y"
    assert summary["ground_axes"] == {"UTM_east": "x", "UTM_north": "z"}
    assert summary["offset_m"] == {"UTM_east": 3.0, "UTM_north": 4.0}
    assert summary["counts"] == {"database": 2, "queries": 1}
    assert summary["heading_clockwise_seen_from_above"] is True
    assert json.loads((out / "conversion.json").read_text()) == summary

    split = read_split(out)
    assert len(split.database) == 2 and len(split.queries) == 1
    np.testing.assert_allclose(np.sort(split.database.utm[:, 0]), [4.0, 8.0], atol=1e-6)
    np.testing.assert_allclose(split.queries.heading, [225.0], atol=1e-4)
    # Copied byte for byte, not re-encoded.
    src = (mapping / "sensors" / "records_data" / "cam0" / "100.jpg").read_bytes()
    dst = [n for n in _names(out / "database") if n.endswith("cam0%2F100.jpg@.jpg")]
    assert (out / "database" / dst[0]).read_bytes() == src


def test_kapture_z_vertical_with_rig(tmp_path):
    """Trajectories given for a rig; camR sits 0.5 m right of the rig and looks 90 degrees to its right."""
    # rig→camera poses (rig frame = camL's camera frame: x right, y down, z forward).
    cam_r_to_rig = np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]], dtype=float)  # columns: camR's x, y, z in rig
    rig_to_cam_r = Rotation.from_matrix(cam_r_to_rig).inv()
    rigs = {"rig0": {
        "camL": kapture.PoseTransform([1, 0, 0, 0], [0, 0, 0]),
        "camR": kapture.PoseTransform(rig_to_cam_r.as_quat(scalar_first=True),
                                      -rig_to_cam_r.apply([0.5, 0, 0])),
    }}
    mapping = _write_split(
        tmp_path / "mapping", ["camL", "camR"],
        poses=[(1, "rig0", _world_to_camera_pose([1, 2, 1.60], 0, "z")),
               (2, "rig0", _world_to_camera_pose([5, -3, 1.62], 90, "z"))],
        images=[(1, "camL", "camL/1.jpg"), (1, "camR", "camR/1.jpg"),
                (2, "camL", "camL/2.jpg"), (2, "camR", "camR/2.jpg")],
        rigs=rigs)
    validation = _write_split(
        tmp_path / "validation", ["phone"],
        poses=[(9, "phone", _world_to_camera_pose([-2.5, 4, 1.58], 225, "z"))],
        images=[(9, "phone", "phone/9.jpg")])
    out = tmp_path / "out"
    assert kconv.main(["--mapping", str(mapping), "--validation", str(validation), "--out", str(out)]) == 0
    summary = json.loads((out / "conversion.json").read_text())
    assert summary["vertical_axis"] == "z"
    assert summary["ground_axes"] == {"UTM_east": "x", "UTM_north": "y"}
    # The rig's right (camera x) at heading h, z up: (cos h, -sin h, 0); camR = rig + 0.5 m right.
    # World (x, y): camL (1, 2) 0°, (5, -3) 90°; camR (1.5, 2) 90°, (5, -3.5) 180°; phone (-2.5, 4) 225°.
    # Offsets: east 3 (min -2.5), north 4 (min -3.5).
    db, q = _records(out / "database"), _records(out / "queries")
    _check(db["camL/1.jpg"], 4.0, 6.0, 0.0, 1.60)
    _check(db["camL/2.jpg"], 8.0, 1.0, 90.0, 1.62)
    _check(db["camR/1.jpg"], 4.5, 6.0, 90.0, 1.60)
    _check(db["camR/2.jpg"], 8.0, 0.5, 180.0, 1.62)
    _check(q["phone/9.jpg"], 0.5, 8.0, 225.0, 1.58)
    assert summary["heading_clockwise_seen_from_above"] is True


def test_kapture_pose_maths_against_scipy(tmp_path):
    """Arbitrary tilted poses: centre and heading agree with scipy applied to the stored quaternion."""
    rng = np.random.default_rng(0)
    quats = Rotation.from_euler("xyz", rng.uniform(-20, 20, (6, 3)), degrees=True)  # about camera-upright
    base = Rotation.from_matrix(_camera_to_world(0, "y")).inv()  # world→camera, upright
    world_to_cam = [quats[i] * base for i in range(6)]
    translations = rng.uniform(-10, 10, (6, 3))
    poses = [(i, "c", kapture.PoseTransform(r.as_quat(scalar_first=True), t))
             for i, (r, t) in enumerate(zip(world_to_cam, translations))]
    split = _write_split(tmp_path / "k", ["c"], poses, [(i, "c", f"c/{i}.jpg") for i in range(6)])
    images = kconv.read_kapture_split(split)
    for i, r in enumerate(world_to_cam):
        centre = -r.inv().apply(translations[i])
        axis = r.inv().apply([0, 0, 1])
        np.testing.assert_allclose(images.centres[i], centre, atol=1e-9)
        geo = kconv.ground_geotags(images, vertical=1)
        assert geo["heading"][i] == pytest.approx(np.degrees(np.arctan2(axis[0], axis[2])) % 360, abs=1e-6)


def test_kapture_scene_root_and_link(tmp_path):
    _y_vertical_scene(tmp_path / "scene")
    out = tmp_path / "out"
    assert kconv.main(["--scene-root", str(tmp_path / "scene" / "release"), "--out", str(out), "--link"]) == 0
    name = [n for n in _names(out / "queries")][0]
    src = tmp_path / "scene" / "release" / "validation" / "sensors" / "records_data" / "phone" / "phone_7.jpg"
    assert os.path.samefile(out / "queries" / name, src)
    # A second run into the same folder refuses to mix datasets.
    assert kconv.main(["--scene-root", str(tmp_path / "scene" / "release"), "--out", str(out)]) == 1


def test_kapture_image_without_pose(tmp_path):
    mapping, validation = _y_vertical_scene(tmp_path / "scene")
    records = mapping / "sensors" / "records_camera.txt"
    with open(records, "a") as f:
        f.write("300, cam0, cam0/300.jpg\n")
    _write_jpeg(mapping / "sensors" / "records_data" / "cam0" / "300.jpg")
    line = len(records.read_text().splitlines())
    with pytest.raises(kconv.ConversionError, match=rf"records_camera\.txt:{line} \(cam0/300\.jpg") as e:
        kconv.convert(mapping, validation, tmp_path / "out")
    assert "trajectories.txt" in str(e.value)


def test_kapture_missing_image_file(tmp_path):
    mapping, validation = _y_vertical_scene(tmp_path / "scene")
    (validation / "sensors" / "records_data" / "phone" / "phone_7.jpg").unlink()
    expected = r"records_camera\.txt:\d+: image file .*phone_7\.jpg.* does not exist"
    with pytest.raises(kconv.ConversionError, match=expected):
        kconv.convert(mapping, validation, tmp_path / "out")


def test_kapture_unknown_sensor(tmp_path):
    mapping, validation = _y_vertical_scene(tmp_path / "scene")
    with open(validation / "sensors" / "records_camera.txt", "a") as f:
        f.write("7, ghost, ghost/7.jpg\n")
    expected = r"validation/sensors/records_camera\.txt:\d+: device 'ghost' is not a sensor"
    with pytest.raises(kconv.ConversionError, match=expected):
        kconv.convert(mapping, validation, tmp_path / "out")


def test_kapture_malformed_line(tmp_path):
    mapping, validation = _y_vertical_scene(tmp_path / "scene")
    trajectories = mapping / "sensors" / "trajectories.txt"
    with open(trajectories, "a") as f:
        f.write("300, cam0, 1, 0, 0, 0, 1, 2\n")
    line = len(trajectories.read_text().splitlines())
    expected = rf"mapping/sensors/trajectories\.txt:{line}: 8 comma-separated fields, expected 9"
    with pytest.raises(kconv.ConversionError, match=expected):
        kconv.convert(mapping, validation, tmp_path / "out")


def test_kapture_no_clear_vertical_axis(tmp_path):
    # Centres (0, 0, 0), (4, 0, 4), (0, 4, 4): the same spread along x, y and z.
    mapping = _write_split(
        tmp_path / "mapping", ["c"],
        poses=[(1, "c", _world_to_camera_pose([0, 0, 0], 0, "y")),
               (2, "c", _world_to_camera_pose([4, 0, 4], 0, "y"))],
        images=[(1, "c", "c/1.jpg"), (2, "c", "c/2.jpg")])
    validation = _write_split(
        tmp_path / "validation", ["c"], poses=[(3, "c", _world_to_camera_pose([0, 4, 4], 0, "y"))],
        images=[(3, "c", "c/3.jpg")])
    expected = r"No world axis is clearly vertical in kapture trajectories '.*mapping'"
    with pytest.raises(kconv.ConversionError, match=expected):
        kconv.convert(mapping, validation, tmp_path / "out")
    # Naming the axis overrides the test.
    summary = kconv.convert(mapping, validation, tmp_path / "out", vertical_axis="y")
    assert summary["vertical_axis"] == "y"


# ----------------------------------------------------------------------------------------------------
# Baidu Mall: world z up; R (camera→world) rows written by hand for upright cameras.

R_HEADING = {  # heading (deg) → rows of R: columns are camera x (right), y (down), z (forward) in world
    0: "1 0 0\n0 0 1\n0 -1 0",
    90: "0 0 1\n-1 0 0\n0 -1 0",
    225: f"-{R2} 0 -{R2}\n{R2} 0 -{R2}\n0 -1 0",
}


def _camera_file(path, heading, cop):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"500 0 4\n0 500 3\n0 0 1\n0 0 0\n{R_HEADING[heading]}\n{cop}\n8 6\n")


def _baidu_root(root):
    _write_jpeg(root / "training_images_undistort" / "nikon5300a_undistor_DSC_0001.jpg")
    _camera_file(root / "training_gt" / "nikon5300a_undistor_DSC_0001.camera", 0, "1 2 1.6")
    _write_jpeg(root / "training_images_undistort" / "nikon5300b_undistor_DSC_0002.jpg")
    _camera_file(root / "training_gt" / "nikon5300b_undistor_DSC_0002.camera", 90, "5 -3 1.55")
    _write_jpeg(root / "query_images_undistort" / "IMG_0007.png", fmt="PNG")  # not a JPEG: re-encoded
    _camera_file(root / "query_gt" / "IMG_0007.camera", 225, "-2.5 4 1.62")
    return root


def test_baidu(tmp_path):
    root = _baidu_root(tmp_path / "IDL_dataset_cvpr17_3852")
    out = tmp_path / "out"
    assert baidu.main(["--root", str(root), "--out", str(out)]) == 0
    db, q = _records(out / "database"), _records(out / "queries")
    # east = x + 3 (min -2.5), north = y + 4 (min -3).
    _check(db["training_images_undistort/nikon5300a_undistor_DSC_0001.jpg"], 4.0, 6.0, 0.0, 1.6)
    _check(db["training_images_undistort/nikon5300b_undistor_DSC_0002.jpg"], 8.0, 1.0, 90.0, 1.55)
    _check(q["query_images_undistort/IMG_0007.png"], 0.5, 8.0, 225.0, 1.62)
    summary = json.loads((out / "conversion.json").read_text())
    assert summary["vertical_axis"] == "z" and summary["reencoded_to_jpeg"] == 1
    assert summary["heading_clockwise_seen_from_above"] is True
    with Image.open(out / "queries" / _names(out / "queries")[0]) as im:
        assert im.format == "JPEG"
    split = read_split(out)
    assert (len(split.database), len(split.queries)) == (2, 1)


def test_baidu_image_without_camera_file(tmp_path):
    root = _baidu_root(tmp_path / "b")
    (root / "query_gt" / "IMG_0007.camera").unlink()
    expected = r"IMG_0007\.png' has no pose: '.*query_gt/IMG_0007\.camera' does not exist"
    with pytest.raises(kconv.ConversionError, match=expected):
        baidu.convert(root, tmp_path / "out")


def test_baidu_camera_file_without_image(tmp_path):
    root = _baidu_root(tmp_path / "b")
    (root / "training_images_undistort" / "nikon5300b_undistor_DSC_0002.jpg").unlink()
    expected = r"nikon5300b_undistor_DSC_0002\.camera' has no image"
    with pytest.raises(kconv.ConversionError, match=expected):
        baidu.convert(root, tmp_path / "out")


def test_baidu_malformed_camera_file(tmp_path):
    root = _baidu_root(tmp_path / "b")
    camera = root / "training_gt" / "nikon5300a_undistor_DSC_0001.camera"
    camera.write_text(camera.read_text().replace("1 2 1.6", "1 2"))
    expected = r"nikon5300a_undistor_DSC_0001\.camera:8: '1 2' should hold 3"
    with pytest.raises(kconv.ConversionError, match=expected):
        baidu.convert(root, tmp_path / "out")


def test_baidu_no_clear_vertical_axis(tmp_path):
    root = _baidu_root(tmp_path / "b")
    _camera_file(root / "training_gt" / "nikon5300a_undistor_DSC_0001.camera", 0, "0 0 0")
    _camera_file(root / "training_gt" / "nikon5300b_undistor_DSC_0002.camera", 90, "4 0 4")
    _camera_file(root / "query_gt" / "IMG_0007.camera", 225, "0 4 4")
    expected = r"No world axis is clearly vertical in Baidu Mall poses '.*training_gt'"
    with pytest.raises(kconv.ConversionError, match=expected):
        baidu.convert(root, tmp_path / "out")
