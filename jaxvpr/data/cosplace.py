"""CosPlace's classes and groups (Berton et al., CVPR 2022; thesis Table 4.1, SPEC §3).

The training area is cut into square cells of side ``M`` metres and heading bins of ``alpha``
degrees; each (cell, bin) is a class. Classes are dealt into ``N * N * L`` groups so that two
classes of one group are at least ``M * (N - 1)`` metres apart (or ``alpha * (L - 1)`` degrees):
neighbouring classes, which look alike, never compete in the same classifier.

Example with the defaults (M=10 m, alpha=30°, N=5, L=2): an image at east 543256.9 m, north
4178906.8 m, heading 278° is in class (543250, 4178900, 270) and group
(543250 % 50 // 10, 4178900 % 50 // 10, 270 % 60 // 30) = (0, 0, 1).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

ClassId = tuple[int, int, int]


def class_and_group(utm_east: float, utm_north: float, heading: float, *, M: int, alpha: int, N: int,
                    L: int) -> tuple[ClassId, tuple[int, int, int]]:
    """Class id (east, north, heading floored to multiples of M metres / alpha degrees) and group id."""
    east = int(utm_east // M * M)
    north = int(utm_north // M * M)
    head = int(heading // alpha * alpha)
    return (east, north, head), (east % (M * N) // M, north % (M * N) // M, head % (alpha * L) // alpha)


def group_classes(utm_east, utm_north, heading, *, M: int = 10, alpha: int = 30, N: int = 5, L: int = 2,
                  min_images_per_class: int = 10) -> tuple[list[list[ClassId]], dict[ClassId, list[int]]]:
    """CosPlace's partition of the training images, for images given in sorted-path order.

    Returns ``(classes_per_group, images_per_class)``: ``classes_per_group`` has one list of class ids
    per group, groups in the order in which they first appear over the images (classes with fewer
    than ``min_images_per_class`` images dropped; a group left empty disappears), classes within a
    group in the order CosPlace's ``list(set(...))`` gives them; ``images_per_class`` maps each kept
    class id to the indices of its images, in input order.
    """
    utm_east = np.asarray(utm_east, dtype=np.float64)
    utm_north = np.asarray(utm_north, dtype=np.float64)
    heading = np.asarray(heading, dtype=np.float64)
    if np.isnan(heading).any():
        raise ValueError(f"{int(np.isnan(heading).sum())} training images have no heading: CosPlace "
                         "classes need the heading field (9) of every image name.")
    ids = [class_and_group(e, n, h, M=M, alpha=alpha, N=N, L=L)
           for e, n, h in zip(utm_east.tolist(), utm_north.tolist(), heading.tolist())]
    images_per_class: dict[ClassId, list[int]] = defaultdict(list)
    for index, (class_id, _) in enumerate(ids):
        images_per_class[class_id].append(index)
    images_per_class = {c: v for c, v in images_per_class.items() if len(v) >= min_images_per_class}
    classes_per_group: dict[tuple, set] = defaultdict(set)
    for class_id, group_id in ids:
        if class_id in images_per_class:
            classes_per_group[group_id].add(class_id)
    return [list(c) for c in classes_per_group.values()], images_per_class


def cached_group_classes(cache_dir: str | os.PathLike, dataset_key: str, utm: np.ndarray, heading: np.ndarray,
                         **setting) -> tuple[list[list[ClassId]], dict[ClassId, list[int]]]:
    """``group_classes`` cached on disk per dataset and setting, as CosPlace caches it.

    The cache file name holds the setting (``M10_N5_alpha30_L2_mipc10``) and a hash of the geotags, so
    a changed folder never reuses a stale partition. Written atomically.
    """
    key = "_".join(f"{k}{setting[k]}" for k in sorted(setting))
    digest = hashlib.sha1(np.ascontiguousarray(utm).tobytes() + np.ascontiguousarray(heading).tobytes()).hexdigest()[:12]
    path = Path(cache_dir) / f"{dataset_key}_{key}_{digest}.json"
    if path.exists():
        data = json.loads(path.read_text())
        classes_per_group = [[tuple(c) for c in group] for group in data["classes_per_group"]]
        images_per_class = {tuple(c): idx for c, idx in data["images_per_class"]}
        return classes_per_group, images_per_class
    classes_per_group, images_per_class = group_classes(utm[:, 0], utm[:, 1], heading, **setting)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"classes_per_group": classes_per_group,
                               "images_per_class": [[list(c), v] for c, v in images_per_class.items()]}))
    os.replace(tmp, path)
    return classes_per_group, images_per_class


def check_groups_num(classes_per_group: list, groups_num: int, where: str) -> None:
    """Asking for more groups than the data has is a clear error."""
    if groups_num > len(classes_per_group):
        sizes = [len(g) for g in classes_per_group]
        raise ValueError(
            f"train.groups_num={groups_num}, but {where} has only {len(classes_per_group)} non-empty groups "
            f"(classes per group: {sizes}). Lower train.groups_num, or lower train.min_images_per_class."
        )
