"""Baidu Mall (Sun et al., CVPR'17, ``IDL_dataset_cvpr17_3852``) → the `@` layout.

    python -m jaxvpr.data.baidu --root IDL_dataset_cvpr17_3852 --out OUT [--link]

writes ``OUT/database/*.jpg`` (``training_images_undistort/``, 689 Nikon images, poses in
``training_gt/``), ``OUT/queries/*.jpg`` (``query_images_undistort/``, 2292 phone images, poses in
``query_gt/``) and ``OUT/conversion.json`` (facts §4.6). The pose of ``<images>/<path>/<stem>.jpg`` is
``<gt>/<path>/<stem>.camera``, nine lines of numbers separated by spaces::

    fx 0 cx
    0 fy cy
    0 0 1
    0 0 0
    r11 r12 r13   \
    r21 r22 r23    > R, the camera→world rotation (kapture imports it as PoseTransform(R, cop).inverse())
    r31 r32 r33   /
    x y z         cop, the camera centre in the world frame (metres)
    w h           image size (pixels)

so the world→camera rotation is Rᵀ and the optical axis in the world frame is R [0, 0, 1]. The
vertical axis, the ground coordinates (shifted to be positive), the heading convention and the
other name fields are those of ``jaxvpr.data.kapture`` (its module docstring); ``pano_id`` and
``timestamp`` are empty, ``note`` is the image path relative to ``--root`` (percent-encoded).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from jaxvpr import cli
from jaxvpr.data.format import IMAGE_EXTENSIONS
from jaxvpr.data.kapture import AXES, ConversionError, PosedImages, write_layout

SPLITS = {"database": ("training_images_undistort", "training_gt"),
          "queries": ("query_images_undistort", "query_gt")}
_CAMERA_LINE_LENGTHS = (3, 3, 3, 3, 3, 3, 3, 3, 2)  # numbers per line of a .camera file
_ROTATION_TOLERANCE = 1e-2  # max |RᵀR − I| entry accepted for the camera→world rotation


def read_camera_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(R camera→world (3, 3), camera centre cop (3,) in metres) of a ``.camera`` file.

    Blank lines are skipped; a line with the wrong count of numbers, a non-number or an R that is not
    a rotation is an error naming the file (and line).
    """
    path = Path(path)
    rows = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"Cannot read {str(path)!r}: {e}") from e
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(rows) == len(_CAMERA_LINE_LENGTHS):
            raise ConversionError(f"{path}:{number}: more than {len(_CAMERA_LINE_LENGTHS)} lines of numbers "
                                  "(a .camera file is K (3 lines), 0 0 0, R (3 lines), cop, w h).")
        expected = _CAMERA_LINE_LENGTHS[len(rows)]
        fields = line.split()
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise ConversionError(f"{path}:{number}: {line.strip()!r} is not a line of numbers.") from None
        if len(values) != expected or not np.all(np.isfinite(values)):
            raise ConversionError(f"{path}:{number}: {line.strip()!r} should hold {expected} finite numbers.")
        rows.append(values)
    if len(rows) != len(_CAMERA_LINE_LENGTHS):
        raise ConversionError(f"{path}: {len(rows)} lines of numbers, expected {len(_CAMERA_LINE_LENGTHS)} "
                              "(K (3 lines), 0 0 0, R (3 lines), cop, w h).")
    rotation = np.array(rows[4:7], dtype=np.float64)
    if np.abs(rotation.T @ rotation - np.eye(3)).max() > _ROTATION_TOLERANCE or np.linalg.det(rotation) < 0:
        raise ConversionError(f"{path}: lines 5-7 (R) are not a rotation matrix: {rotation.tolist()}.")
    return rotation, np.array(rows[7], dtype=np.float64)


def read_baidu_split(root: str | os.PathLike, images_dir: str, gt_dir: str) -> PosedImages:
    """The images of ``root/images_dir`` with the poses of ``root/gt_dir``. Every image needs its
    ``.camera`` file and every ``.camera`` file its image; errors name the missing file."""
    root = Path(root)
    images_root, gt_root = root / images_dir, root / gt_dir
    for folder in (images_root, gt_root):
        if not folder.is_dir():
            raise ConversionError(f"Folder {str(folder)!r} does not exist: is {str(root)!r} the unpacked "
                                  "IDL_dataset_cvpr17_3852 (training_images_undistort/, training_gt/, "
                                  "query_images_undistort/, query_gt/)?")
    images = sorted(p for p in images_root.rglob("*")
                    if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    cameras = sorted(p for p in gt_root.rglob("*.camera") if p.is_file())
    stems = {p.relative_to(images_root).with_suffix("") for p in images}
    for camera in cameras:
        if camera.relative_to(gt_root).with_suffix("") not in stems:
            expected = images_root / camera.relative_to(gt_root).with_suffix(".jpg")
            raise ConversionError(f"{str(camera)!r} has no image: no {str(expected)!r} "
                                  "(nor another image extension).")
    if not images:
        raise ConversionError(
            f"Folder {str(images_root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    rotations, centres, origins = [], [], []
    for image in images:
        camera = gt_root / image.relative_to(images_root).with_suffix(".camera")
        if not camera.is_file():
            raise ConversionError(f"Image {str(image)!r} has no pose: {str(camera)!r} does not exist.")
        camera_to_world, cop = read_camera_file(camera)
        rotations.append(camera_to_world.T)  # world→camera
        centres.append(cop)
        origins.append(image.relative_to(root).as_posix())
    n = len(images)
    return PosedImages(files=images, origins=origins, devices=[""] * n, timestamps=[""] * n,
                       rotations=np.stack(rotations), centres=np.stack(centres))


def convert(root: str | os.PathLike, out: str | os.PathLike, link: bool = False,
            vertical_axis: str = "") -> dict:
    """Baidu Mall training images → ``out/database``, query images → ``out/queries``; returns the
    summary."""
    database = read_baidu_split(root, *SPLITS["database"])
    queries = read_baidu_split(root, *SPLITS["queries"])
    root = Path(root)
    gt_folders = [str(root / gt) for _, gt in SPLITS.values()]
    source = f"Baidu Mall poses {gt_folders[0]!r} + {gt_folders[1]!r}"
    return write_layout(out, database, queries, link, source, vertical_axis, extra={"root": str(root)})


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m jaxvpr.data.baidu",
        description="Convert Baidu Mall (IDL_dataset_cvpr17_3852) to the community '@' layout with "
                    "metric coordinates.",
    )
    parser.add_argument("--root", required=True, help="the unpacked IDL_dataset_cvpr17_3852 folder")
    parser.add_argument("--out", required=True,
                        help="output folder: OUT/database, OUT/queries, OUT/conversion.json")
    parser.add_argument("--link", action="store_true", help="hard-link the images instead of copying them")
    parser.add_argument("--vertical-axis", choices=list(AXES), default="",
                        help="the vertical world axis, when it cannot be found from the camera centres")
    args = parser.parse_args(argv)
    summary = convert(args.root, args.out, link=args.link, vertical_axis=args.vertical_axis)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
