"""Which database images are positives of a query: within a distance (metres) and optionally an angle.

A database image is a positive of a query when their UTM positions are at most ``distance_m`` metres
apart and, if ``angle_deg`` is given, their headings differ by at most ``angle_deg`` degrees (with
wrap-around at 360°). Indoor benchmarks pair the two (thesis Tables 5.2-5.6: 1 m 5°, 10 m 30°,
25 m 60°); outdoor benchmarks use 25 m alone.

Nothing here allocates a queries x database matrix: SF-XL test has 2.8M database images. Positions go
into a k-d tree (scipy, float64 so UTM coordinates keep centimetre precision) and queries are served
in chunks.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def heading_difference(a, b) -> np.ndarray:
    """Absolute difference of headings in degrees, in [0, 180] (359° and 1° differ by 2°)."""
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) % 360.0
    return np.minimum(d, 360.0 - d)


def _check_headings(heading, what: str) -> np.ndarray:
    heading = np.asarray(heading, dtype=np.float64)
    if np.isnan(heading).any():
        n = int(np.isnan(heading).sum())
        raise ValueError(
            f"An angle threshold needs headings, but {n} {what} image names have an empty heading field."
        )
    return heading


class PositiveFinder:
    """Finds positives of queries in a database. Build once per database, query per threshold."""

    def __init__(self, db_utm: np.ndarray, db_heading: np.ndarray | None = None):
        self.db_utm = np.asarray(db_utm, dtype=np.float64)
        if self.db_utm.ndim != 2 or self.db_utm.shape[1] != 2:
            raise ValueError(f"db_utm must be (N, 2) east/north in metres, got shape {self.db_utm.shape}")
        self.db_heading = None if db_heading is None else np.asarray(db_heading, dtype=np.float64)
        self.tree = cKDTree(self.db_utm)

    def positives(self, q_utm, distance_m: float, q_heading=None, angle_deg: float | None = None,
                  chunk: int = 4096) -> list[np.ndarray]:
        """Sorted database indices of the positives of each query (one int64 array per query)."""
        q_utm = np.asarray(q_utm, dtype=np.float64)
        if angle_deg is not None:
            db_heading = _check_headings(self.db_heading, "database")
            q_heading = _check_headings(q_heading, "query")
        result: list[np.ndarray] = []
        for start in range(0, len(q_utm), chunk):
            lists = self.tree.query_ball_point(q_utm[start:start + chunk], r=distance_m, return_sorted=True)
            for j, idx in enumerate(lists):
                idx = np.asarray(idx, dtype=np.int64)
                if angle_deg is not None and len(idx):
                    keep = heading_difference(db_heading[idx], q_heading[start + j]) <= angle_deg
                    idx = idx[keep]
                result.append(idx)
        return result

    def has_positive(self, q_utm, distance_m: float, q_heading=None, angle_deg: float | None = None) -> np.ndarray:
        """bool (Q,): whether each query has at least one positive (its share is the upper bound)."""
        q_utm = np.asarray(q_utm, dtype=np.float64)
        if angle_deg is None:
            dist, _ = self.tree.query(q_utm, k=1, distance_upper_bound=np.nextafter(distance_m, np.inf))
            return np.isfinite(dist) & (dist <= distance_m)
        return np.array([len(p) > 0 for p in self.positives(q_utm, distance_m, q_heading, angle_deg)], dtype=bool)


def is_positive(db_utm, q_utm, predictions, distance_m: float, db_heading=None, q_heading=None,
                angle_deg: float | None = None) -> np.ndarray:
    """bool (Q, K): whether prediction k of query q is a positive. O(Q*K) memory, no positives lists.

    ``predictions`` holds database indices (Q, K); -1 (FAISS's "no result") counts as not positive.
    """
    predictions = np.asarray(predictions)
    valid = predictions >= 0
    safe = np.where(valid, predictions, 0)
    db_utm = np.asarray(db_utm, dtype=np.float64)
    q_utm = np.asarray(q_utm, dtype=np.float64)
    dist = np.linalg.norm(db_utm[safe] - q_utm[:, None, :], axis=-1)
    ok = valid & (dist <= distance_m)
    if angle_deg is not None:
        db_heading = _check_headings(db_heading, "database")
        q_heading = _check_headings(q_heading, "query")
        ok &= heading_difference(db_heading[safe], q_heading[:, None]) <= angle_deg
    return ok
