"""Pictures of an evaluation: each query beside its top-N predictions, and a map of the split.

* :func:`save_prediction_images` writes one PNG per query (``0007_wrong.png``, ``0012_correct.png``;
  names sort by query index and say whether the first prediction is a positive): the query, then its
  first N predictions left to right, each framed green when it is a positive of the query at the
  chosen threshold (distance in metres and optionally heading in degrees, as in
  :mod:`jaxvpr.data.positives`) and red when not, with its distance to the query in metres (and the
  heading difference in degrees when both images have a heading) written under it.
* :func:`save_map` plots the database positions (grey dots) and the query positions (green: correct
  at R@1, red: wrong), east and north in metres on an equal scale: the picture of the database and
  query positions of thesis Figs. 4.3 and 5.5, coloured by the result.

From the evaluator's command line (pictures go under ``--out``)::

    python -m jaxvpr.evaluate --dataset DATA/images/test --checkpoint CKPT --out results/ \\
        --save-predictions 5 --only-wrong --save-map

writes ``results/predictions/NNNN_wrong.png`` for every query missed at R@1 and ``results/map.png``.
Only the main process writes; on the others the functions return without drawing.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jaxvpr import parallel
from jaxvpr.data.format import SplitDataset
from jaxvpr.data.images import CorruptImageError, load_image
from jaxvpr.data.positives import heading_difference, is_positive

if TYPE_CHECKING:
    from jaxvpr.evaluate import Threshold

THUMB_HEIGHT = 160          # pixels: every image is scaled to this height (at most 3x as wide)
FRAME = 6                   # pixels of coloured frame around each image
GAP = 12                    # pixels between images and around the picture
CORRECT_COLOUR = (0, 180, 0)
WRONG_COLOUR = (220, 0, 0)
QUERY_COLOUR = (90, 90, 90)
PLACEHOLDER_COLOUR = (215, 215, 215)
PICTURE_NAME = re.compile(r"^\d+_(correct|wrong)\.png$")


@dataclasses.dataclass(frozen=True)
class PictureOptions:
    """Which pictures an evaluation draws into its output folder (the evaluator's flags).

    Attributes:
      num_predictions: ``--save-predictions``: predictions shown per query (0: no per-query pictures).
      only_wrong: ``--only-wrong``: pictures of the queries wrong at R@1 only.
      max_queries: ``--predictions-max-queries``: at most this many pictures (the first queries).
      save_map: ``--save-map``: also ``map.png``.
      threshold: ``--predictions-threshold``; None: the first threshold of the run.
    """

    num_predictions: int = 0
    only_wrong: bool = False
    max_queries: int | None = None
    save_map: bool = False
    threshold: Threshold | None = None

    def __bool__(self) -> bool:
        return self.num_predictions > 0 or self.save_map


def save_pictures(options: PictureOptions, split: SplitDataset, predictions: np.ndarray,
                  thresholds: Sequence[Threshold], out_dir: str | os.PathLike) -> list[Path]:
    """Draws what ``options`` asks for: ``<out_dir>/predictions/*.png`` and ``<out_dir>/map.png``."""
    threshold = options.threshold if options.threshold is not None else thresholds[0]
    written = []
    if options.num_predictions > 0:
        written += save_prediction_images(split, predictions, threshold, Path(out_dir) / "predictions",
                                          options.num_predictions, options.only_wrong, options.max_queries)
    if options.save_map:
        path = save_map(split, predictions, threshold, Path(out_dir) / "map.png")
        written += [path] if path is not None else []
    return written


def prediction_hits(split: SplitDataset, predictions: np.ndarray, threshold: Threshold) -> np.ndarray:
    """bool (Q, K): whether prediction k of query q is a positive at ``threshold`` (-1: never)."""
    return is_positive(split.database.utm, split.queries.utm, predictions, threshold.distance_m,
                       split.database.heading, split.queries.heading, threshold.angle_deg)


def threshold_text(threshold: Threshold) -> str:
    """``"25 m"`` or ``"10 m and 30 deg"`` (ASCII: PIL's default font may lack the degree sign)."""
    text = f"{threshold.distance_m:g} m"
    return text if threshold.angle_deg is None else f"{text} and {threshold.angle_deg:g} deg"


# ----------------------------------------------------------------------------- per-query pictures
def save_prediction_images(split: SplitDataset, predictions: np.ndarray, threshold: Threshold,
                           out_dir: str | os.PathLike, num_predictions: int = 5, only_wrong: bool = False,
                           max_queries: int | None = None, thumb_height: int = THUMB_HEIGHT) -> list[Path]:
    """One PNG per query: the query and its first ``num_predictions`` predictions, framed by correctness.

    ``predictions`` (Q, K) holds database indices per query, best first, -1 where there is none (a
    database smaller than K, or a query skipped as unreadable). A query is correct when its first
    prediction is a positive at ``threshold``. Files are ``<query index>_{correct,wrong}.png``, the
    index zero-padded to sort; pictures of an earlier run in ``out_dir`` (same naming) are removed
    first so the folder shows this run only. Returns the paths written, in query order.
    """
    predictions = np.asarray(predictions)
    if predictions.ndim != 2 or predictions.shape[0] != len(split.queries):
        raise ValueError(f"predictions must be (num queries, K) = ({len(split.queries)}, K), "
                         f"got shape {predictions.shape}.")
    if not 1 <= num_predictions <= predictions.shape[1]:
        raise ValueError(f"num_predictions={num_predictions}: between 1 and the {predictions.shape[1]} "
                         "predictions kept per query.")
    if not parallel.is_main_process():
        return []
    top = predictions[:, :num_predictions]
    hits = prediction_hits(split, top, threshold)
    rows = np.flatnonzero(~hits[:, 0]) if only_wrong else np.arange(len(split.queries))
    if max_queries is not None:
        rows = rows[:max_queries]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        if PICTURE_NAME.match(old.name):
            old.unlink()
    digits = max(4, len(str(len(split.queries) - 1)))
    font = default_font()
    written = []
    for q in rows:
        picture = prediction_picture(split, int(q), top[q], hits[q], threshold, thumb_height, font)
        path = out_dir / f"{q:0{digits}d}_{'correct' if hits[q, 0] else 'wrong'}.png"
        picture.save(path)
        written.append(path)
    return written


def prediction_picture(split: SplitDataset, q: int, predictions: np.ndarray, hits: np.ndarray,
                       threshold: Threshold, thumb_height: int = THUMB_HEIGHT, font=None) -> Image.Image:
    """The picture of query ``q``: a title line, then the query and its predictions in a row.

    Each image sits in a frame of ``FRAME`` pixels (grey for the query, green for a positive, red
    otherwise) with caption lines under it: "query", or the rank, the distance to the query in metres
    and, when both images have a heading, the heading difference in degrees.
    """
    font = default_font() if font is None else font
    db, queries = split.database, split.queries
    q_utm, q_heading = queries.utm[q], queries.heading[q]
    tiles = [(thumbnail(os.path.join(str(queries.root), queries.paths[q]), thumb_height),
              QUERY_COLOUR, ["query"])]
    for rank, (d, hit) in enumerate(zip(predictions, hits), start=1):
        colour = CORRECT_COLOUR if hit else WRONG_COLOUR
        if d < 0:
            tiles.append((None, colour, [f"{rank}. no prediction"]))
            continue
        lines = [f"{rank}. {np.linalg.norm(db.utm[d] - q_utm):.1f} m"]
        if np.isfinite(db.heading[d]) and np.isfinite(q_heading):
            lines.append(f"heading {heading_difference(db.heading[d], q_heading):.0f} deg off")
        tiles.append((thumbnail(os.path.join(str(db.root), db.paths[d]), thumb_height), colour, lines))
    tiles = [(image if image is not None else placeholder(thumb_height), colour, lines)
             for image, colour, lines in tiles]

    title = (f"query {q}: {'correct' if len(hits) and hits[0] else 'wrong'} at R@1 "
             f"(positives within {threshold_text(threshold)})")
    line_height = font.getbbox("Ag")[3] + 4
    caption_lines = max(len(lines) for _, _, lines in tiles)
    # Each image takes the width of its frame or of its longest caption line, whichever is wider.
    slots = [max(image.width + 2 * FRAME, *(int(font.getlength(line)) for line in lines)) for image, _, lines in tiles]
    row_width = sum(slots) + GAP * (len(tiles) - 1)
    width = 2 * GAP + max(row_width, int(font.getlength(title)))
    top = GAP + line_height + GAP // 2
    height = top + thumb_height + 2 * FRAME + 4 + caption_lines * line_height + GAP
    picture = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    draw.text((GAP, GAP), title, fill=(0, 0, 0), font=font)
    x = GAP
    for (image, colour, lines), slot in zip(tiles, slots):
        draw.rectangle((x, top, x + image.width + 2 * FRAME - 1, top + thumb_height + 2 * FRAME - 1), fill=colour)
        picture.paste(image, (x + FRAME, top + FRAME))
        for i, line in enumerate(lines):
            draw.text((x, top + thumb_height + 2 * FRAME + 4 + i * line_height), line, fill=(0, 0, 0), font=font)
        x += slot + GAP
    return picture


def thumbnail(path: str, height: int = THUMB_HEIGHT, max_width: int | None = None) -> Image.Image | None:
    """The image at ``path`` scaled to ``height`` pixels (aspect kept; at most ``max_width`` wide, a
    wider panorama is scaled down to fit and centred on a grey band); None if it cannot be read."""
    max_width = 3 * height if max_width is None else max_width
    try:
        image = Image.fromarray(load_image(path))
    except CorruptImageError:
        return None
    scale = min(height / image.height, max_width / image.width)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.BILINEAR)
    if image.height == height:
        return image
    band = Image.new("RGB", (image.width, height), PLACEHOLDER_COLOUR)
    band.paste(image, (0, (height - image.height) // 2))
    return band


def placeholder(height: int) -> Image.Image:
    """A plain square for a missing prediction or an unreadable image."""
    return Image.new("RGB", (height, height), PLACEHOLDER_COLOUR)


def default_font(size: int = 14):
    """PIL's bundled font (no font file needed); older Pillow without a size gives its bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


# ----------------------------------------------------------------------------- map
def save_map(split: SplitDataset, predictions: np.ndarray, threshold: Threshold,
             path: str | os.PathLike) -> Path | None:
    """The split's positions: database (small grey dots), queries green when correct at R@1, red when
    wrong, black crosses for queries without predictions (skipped as unreadable; not in the recall).

    East and north in metres from a round origin, on an equal scale (thesis Figs. 4.3 and 5.5). The
    legend counts each group; the title names the dataset, the queries folder, R@1 and the threshold.
    Returns the path, or None on a process other than the main one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predictions = np.asarray(predictions)
    if predictions.ndim != 2 or predictions.shape[0] != len(split.queries):
        raise ValueError(f"predictions must be (num queries, K) = ({len(split.queries)}, K), "
                         f"got shape {predictions.shape}.")
    if not parallel.is_main_process():
        return None
    correct = prediction_hits(split, predictions[:, :1], threshold)[:, 0]
    evaluated = (predictions >= 0).any(axis=1)
    db = split.database.utm
    queries = split.queries.utm
    origin = np.floor(np.concatenate([db, queries]).min(axis=0) / 100.0) * 100.0
    db, queries = db - origin, queries - origin

    fig, ax = plt.subplots(figsize=(7, 7))
    ax.plot(db[:, 0], db[:, 1], linestyle="none", marker=".", markersize=2, color="0.6",
            label=f"database ({len(db)})")
    groups = [(evaluated & correct, "o", "tab:green", "correct at R@1"),
              (evaluated & ~correct, "o", "tab:red", "wrong at R@1")]
    if not evaluated.all():
        groups.append((~evaluated, "x", "black", "no prediction"))
    for mask, marker, colour, label in groups:
        ax.plot(queries[mask, 0], queries[mask, 1], linestyle="none", marker=marker, markersize=4,
                color=colour, label=f"{label} ({int(mask.sum())})")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel(f"UTM east - {origin[0]:.0f} (m)")
    ax.set_ylabel(f"UTM north - {origin[1]:.0f} (m)")
    recall = 100.0 * correct[evaluated].mean() if evaluated.any() else 0.0
    queries_folder = Path(split.queries.root).name if split.queries.root is not None else "queries"
    ax.set_title(f"{split.name} / {queries_folder}: R@1 {recall:.1f}% at {threshold.label()}")
    ax.legend(loc="best", fontsize=8, markerscale=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
