"""CosPlace classes and groups: hand-computed examples and the geometric property of groups."""

import numpy as np
import pytest

from jaxvpr.data.cosplace import cached_group_classes, check_groups_num, class_and_group, group_classes


def test_class_and_group_docstring_example():
    assert class_and_group(543256.9, 4178906.8, 278.0, M=10, alpha=30, N=5, L=2) == (
        (543250, 4178900, 270), (0, 0, 1))
    # 10 m further east and 30 degrees further: next cell, next bin, next group coordinates
    assert class_and_group(543266.9, 4178906.8, 308.0, M=10, alpha=30, N=5, L=2) == (
        (543260, 4178900, 300), (1, 0, 0))
    # 50 m east (M*N): same group again
    assert class_and_group(543306.9, 4178906.8, 278.0, M=10, alpha=30, N=5, L=2)[1] == (0, 0, 1)


def test_group_classes_hand_computed():
    # class A (0,0,0) x3 images, class B (10,0,0) x1, class C (50,0,0) x2, class D (0,0,30) x2
    east = [1, 2, 3, 11, 51, 52, 5, 6]
    north = [1, 1, 1, 1, 1, 1, 1, 1]
    heading = [0, 10, 20, 0, 0, 0, 40, 50]
    classes_per_group, images_per_class = group_classes(east, north, heading, M=10, alpha=30, N=5, L=2,
                                                        min_images_per_class=2)
    assert images_per_class == {(0, 0, 0): [0, 1, 2], (50, 0, 0): [4, 5], (0, 0, 30): [6, 7]}
    # group (0,0,0) holds A and C (50 m apart); B was dropped (1 image) so its group vanishes;
    # group (0,0,1) holds D. Groups ordered by first appearance.
    assert [sorted(g) for g in classes_per_group] == [[(0, 0, 0), (50, 0, 0)], [(0, 0, 30)]]
    with pytest.raises(ValueError, match="no heading"):
        group_classes([1.0], [1.0], [np.nan])


def test_groups_separate_neighbouring_classes():
    rng = np.random.default_rng(0)
    n = 4000
    east, north = rng.uniform(5e5, 5e5 + 300, n), rng.uniform(4e6, 4e6 + 300, n)
    heading = rng.uniform(0, 360, n)
    M, alpha, N, L = 10, 30, 5, 2
    classes_per_group, images_per_class = group_classes(east, north, heading, M=M, alpha=alpha, N=N, L=L,
                                                        min_images_per_class=1)
    assert len(classes_per_group) == N * N * L
    assert sum(len(g) for g in classes_per_group) == len(images_per_class)
    assert sum(len(v) for v in images_per_class.values()) == n
    for group in classes_per_group:
        c = np.array(group)
        for i in range(len(c)):
            d = np.abs(c[i] - c)
            same_place = (d[:, 0] == 0) & (d[:, 1] == 0)
            # two classes of a group in the same cell differ by >= alpha*L degrees ...
            assert (d[same_place, 2][d[same_place, 2] > 0] >= alpha * L).all()
            # ... and classes in different cells are >= M*N metres apart along some axis
            other = ~same_place
            assert (np.maximum(d[other, 0], d[other, 1]) >= M * N).all()
    for class_id, idx in images_per_class.items():
        for i in idx:
            assert class_and_group(east[i], north[i], heading[i], M=M, alpha=alpha, N=N, L=L)[0] == class_id


def test_cache_round_trip_and_groups_num_error(tmp_path):
    rng = np.random.default_rng(1)
    utm = np.stack([rng.uniform(0, 100, 500), rng.uniform(0, 100, 500)], 1)
    heading = rng.uniform(0, 360, 500)
    setting = dict(M=10, alpha=30, N=5, L=2, min_images_per_class=1)
    a = cached_group_classes(tmp_path, "toy", utm, heading, **setting)
    assert len(list(tmp_path.iterdir())) == 1
    b = cached_group_classes(tmp_path, "toy", utm, heading, **setting)
    assert a == b == group_classes(utm[:, 0], utm[:, 1], heading, **setting)
    check_groups_num(a[0], 8, "toy")
    with pytest.raises(ValueError, match="groups_num=99"):
        check_groups_num(a[0], 99, "toy")
