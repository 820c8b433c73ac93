"""Sliced (tiled) inference and training for small objects in large images: tile geometry, merging, sampling.

A 4000-px drone photo letterboxed to 640 shrinks a 30-px car to 5 px; cutting the photo into overlapping tiles
of `size` original pixels and running each tile at the network size keeps the car at (or above) its own
resolution. This module holds the pieces that do not need a model:

- `SliceConfig`: the user's settings (tile size or 'auto', overlap, batch, full-image pass, merge method), checked.
- `tile_windows`: the tiles that cover an image (edge tiles moved inward so every tile has the same size).
- `merge_detections`: per-class greedy NMS or NMM over the boxes of every tile, joining the pieces of an object
  that a tile border cut in two.
- `sample_tile`: the random native-resolution tile and its clipped labels used by `train.py --slice`.
- `tile_dataset`: the offline tiler, `python -m utils.slicing tile --data X.yaml --size 640 --overlap 0.2 --out DIR`.

The model side (batching tiles through a network) is `models.predictor.Predictor`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from utils.boxes import xywhn2xyxy, xyxy2xywhn
from utils.errors import UserError, report_user_errors

MERGE_METHODS = ("nms", "nmm")
MERGE_METRICS = ("iou", "ios")
BORDER_TOL = 2.0  # px: a box edge this close to an inner tile edge was cut by that edge
# Pieces of one object seen from two tiles must agree this well (stricter than the merge threshold: at a low
# confidence threshold loose joins grow boxes into their neighbours)
JOIN_IOU = 0.7
JOIN_MIN_SCORE_RATIO = 0.5  # ... and score at least this share of the other's
AUTO_MAX_SHRINK = 1.5  # --slice auto tiles only images the letterbox would shrink by more than this


def parse_slice_size(value: str | int | None) -> int | str | None:
    """--slice's value: a tile side in original pixels, or 'auto'; None/0/'' means no slicing."""
    if value is None or value in ("", 0, "0", "none", "off"):
        return None
    if str(value).lower() == "auto":
        return "auto"
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise UserError(f"--slice must be a tile size in pixels or 'auto', got '{value}'") from None
    if size < 0:
        raise UserError(f"--slice must be a positive tile size in pixels or 'auto', got {size}")
    return size or None


@dataclass(frozen=True)
class SliceConfig:
    """How to slice: `size` (original pixels, or 'auto'), tile `overlap` (share of the size), tiles per batch,
    whether the whole image is also predicted, and how the boxes of all tiles are merged."""

    size: int | str
    overlap: float = 0.2
    batch: int = 8
    full: bool = True
    merge: str = "nms"
    merge_iou: float = 0.5
    merge_metric: str = "iou"

    def check(self, stride: int) -> SliceConfig:
        """Raise one clear UserError for a setting that cannot work with a model of this stride."""
        if self.size != "auto" and (not isinstance(self.size, int) or self.size < stride):
            raise UserError(f"--slice {self.size} is below the model stride {stride}: a tile must be at least one "
                            f"stride cell (use a size >= {stride}, e.g. 640, or 'auto')")
        if not 0 <= self.overlap < 1:
            raise UserError(f"--slice-overlap must be in [0, 1), got {self.overlap}")
        if self.batch < 1:
            raise UserError(f"--slice-batch must be at least 1, got {self.batch}")
        if self.merge not in MERGE_METHODS:
            raise UserError(f"--slice-merge must be one of {MERGE_METHODS}, got '{self.merge}'")
        if self.merge_metric not in MERGE_METRICS:
            raise UserError(f"--slice-merge-metric must be one of {MERGE_METRICS}, got '{self.merge_metric}'")
        if not 0 < self.merge_iou <= 1:
            raise UserError(f"--slice-merge-iou must be in (0, 1], got {self.merge_iou}")
        return self

    def tile_size(self, h: int, w: int, imgsz: int) -> int | None:
        """The tile side for an h x w image predicted at `imgsz`; None where one pass covers it (no tiling)."""
        if self.size == "auto":
            return auto_tile_size(h, w, imgsz)
        return None if max(h, w) <= self.size else int(self.size)


def slice_config(size: str | int | SliceConfig | None, overlap: float = 0.2, batch: int = 8, full: bool = True,
                 merge: str = "nms", merge_iou: float = 0.5, merge_metric: str = "iou") -> SliceConfig | None:
    """The SliceConfig of the --slice* options of detect.py/val.py (a ready SliceConfig passes through), or None
    without --slice."""
    if isinstance(size, SliceConfig):
        return size
    size = parse_slice_size(size)
    if size is None:
        return None
    return SliceConfig(size=size, overlap=overlap, batch=batch, full=full, merge=merge, merge_iou=merge_iou,
                       merge_metric=merge_metric)


def fold_slice_options(opt: argparse.Namespace) -> argparse.Namespace:
    """Replace the parsed --slice* options of detect.py/val.py by one `opt.slice`: a SliceConfig, or None without
    --slice (so their run() takes a single `slice` argument)."""
    options = {name: getattr(opt, f"slice_{name}") for name in ("overlap", "batch", "full", "merge", "merge_iou",
                                                              "merge_metric")}
    for name in options:
        delattr(opt, f"slice_{name}")
    opt.slice = slice_config(opt.slice, **options)
    return opt


def add_slice_arguments(parser: argparse.ArgumentParser) -> None:
    """The --slice* options shared by detect.py and val.py (fold them with fold_slice_options after parsing)."""
    g = parser.add_argument_group("sliced inference (small objects in large images)")
    g.add_argument("--slice", default=None, metavar="SIZE",
                   help="cut each image into overlapping SIZE x SIZE tiles (original pixels) run at --img; 'auto' picks it")
    g.add_argument("--slice-overlap", type=float, default=0.2, help="tile overlap as a share of the tile size, in [0, 1)")
    g.add_argument("--slice-batch", type=int, default=8, help="tiles per forward pass")
    g.add_argument("--slice-full", action=argparse.BooleanOptionalAction, default=True,
                   help="also predict the whole image at --img, for objects larger than a tile (default: on)")
    g.add_argument("--slice-merge", default="nms", choices=MERGE_METHODS,
                   help="merge the tiles' boxes by NMS or by greedy non-maximum merging (union boxes)")
    g.add_argument("--slice-merge-iou", type=float, default=0.5, help="overlap above which two boxes are one object")
    g.add_argument("--slice-merge-metric", default="iou", choices=MERGE_METRICS,
                   help="overlap measure: intersection over union, or over the smaller box")


def auto_tile_size(h: int, w: int, imgsz: int) -> int | None:
    """Tiles of `imgsz` original pixels (objects seen at native resolution) for an image the letterbox would shrink
    by more than AUTO_MAX_SHRINK; None for smaller images, where one pass loses little."""
    return int(imgsz) if max(h, w) > AUTO_MAX_SHRINK * imgsz else None


def _starts(length: int, size: int, step: int) -> list[int]:
    if length <= size:
        return [0]
    starts = list(range(0, length - size, step))
    return starts + [length - size]  # the last tile ends exactly at the border (moved inward, not cut short)


def tile_windows(h: int, w: int, size: int, overlap: float = 0.2) -> np.ndarray:
    """(n, 4) int x1, y1, x2, y2 tiles covering an h x w image, row by row.

    Tiles are `size` square (or the image's side where the image is smaller), consecutive tiles overlap by
    `overlap` of the size, and the last tile of a row or column is moved inward to end at the border.
    """
    if size < 1 or not 0 <= overlap < 1:
        raise ValueError(f"tile size must be >= 1 and overlap in [0, 1), got {size}, {overlap}")
    step = max(1, int(round(size * (1 - overlap))))
    tw, th = min(size, w), min(size, h)
    return np.array([(x, y, x + tw, y + th) for y in _starts(h, size, step) for x in _starts(w, size, step)],
                    dtype=np.int64).reshape(-1, 4)


def cut_edges(boxes: np.ndarray, windows: np.ndarray | Sequence[int], image_hw: Sequence[int],
              tol: float = BORDER_TOL) -> np.ndarray:
    """(n, 4) bool: which of left, top, right, bottom each xyxy box (original pixels) touches on an edge of its
    tile (`windows`: one x1, y1, x2, y2 for all, or one per box) that lies inside the image, i.e. where the tile
    cut through whatever was there."""
    h, w = image_hw
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    win = np.broadcast_to(np.asarray(windows, dtype=np.float64).reshape(-1, 4), b.shape)
    inner = np.stack((win[:, 0] > 0, win[:, 1] > 0, win[:, 2] < w, win[:, 3] < h), 1)
    near = np.stack((b[:, 0] <= win[:, 0] + tol, b[:, 1] <= win[:, 1] + tol, b[:, 2] >= win[:, 2] - tol,
                     b[:, 3] >= win[:, 3] - tol), 1)
    return near & inner


def _candidate_pairs(boxes: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) of boxes that overlap or come within `tol` of each other (sweep along x, then y):
    the only pairs a merge can join, found without the full n x n matrix."""
    n = len(boxes)
    order = np.argsort(boxes[:, 0], kind="stable")
    x1 = boxes[order, 0]
    starts = np.arange(1, n + 1)
    counts = np.maximum(np.searchsorted(x1, boxes[order, 2] + tol, side="right") - starts, 0)
    a = np.repeat(np.arange(n), counts)
    offsets = np.arange(len(a)) - np.repeat(np.cumsum(counts) - counts, counts)
    i, j = order[a], order[starts[a] + offsets]
    near_y = (np.minimum(boxes[i, 3], boxes[j, 3]) + tol >= np.maximum(boxes[i, 1], boxes[j, 1]))
    i, j = i[near_y], j[near_y]
    return np.minimum(i, j), np.maximum(i, j)


def _iou_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of each row pair of two (n, 4) xyxy arrays."""
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return inter / np.maximum(union, 1e-9)


def _match_pairs(i: np.ndarray, j: np.ndarray, boxes: np.ndarray, windows: np.ndarray, cut: np.ndarray, metric: str,
                 thres: float) -> tuple[np.ndarray, np.ndarray]:
    """For pairs (i, j), i scored higher: (the same object by overlap, pieces of one object cut by tile borders).

    Pieces: boxes from different tiles, at least one cut by its tile's edge, whose union seen through each box's
    own tile is that box (IoU > JOIN_IOU both ways): what one object straddling the border looks like from either
    side. A larger box that merely contains a piece does not qualify unless it agrees with the piece's uncut
    edges, so a piece is never grown into an unrelated box.
    """
    b, bj = boxes[i], boxes[j]
    iw = np.clip(np.minimum(b[:, 2], bj[:, 2]) - np.maximum(b[:, 0], bj[:, 0]), 0, None)
    ih = np.clip(np.minimum(b[:, 3], bj[:, 3]) - np.maximum(b[:, 1], bj[:, 1]), 0, None)
    inter = iw * ih
    area_i = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    area_j = (bj[:, 2] - bj[:, 0]) * (bj[:, 3] - bj[:, 1])
    if metric == "iou":
        score = inter / np.maximum(area_i + area_j - inter, 1e-9)
    else:
        score = inter / np.maximum(np.minimum(area_i, area_j), 1e-9)
    wi, wj = windows[i], windows[j]
    other_tile = (wi != wj).any(1)
    candidates = np.flatnonzero(other_tile & (cut[i].any(1) | cut[j].any(1)))
    joined = np.zeros(len(i), dtype=bool)
    if len(candidates):
        ci, cj = b[candidates], bj[candidates]
        union = np.concatenate((np.minimum(ci[:, :2], cj[:, :2]), np.maximum(ci[:, 2:], cj[:, 2:])), 1)

        def seen_from(w: np.ndarray) -> np.ndarray:  # the union clipped to a tile
            return np.concatenate((np.maximum(union[:, :2], w[:, :2]), np.minimum(union[:, 2:], w[:, 2:])), 1)

        joined[candidates] = ((_iou_rows(seen_from(wi[candidates]), ci) > JOIN_IOU) &
                              (_iou_rows(seen_from(wj[candidates]), cj) > JOIN_IOU))
    return score > thres, joined


def merge_detections(det: torch.Tensor, windows: torch.Tensor, image_hw: Sequence[int], *, method: str = "nms",
                     threshold: float = 0.5, metric: str = "iou", agnostic: bool = False,
                     max_det: int | None = None) -> torch.Tensor:
    """One box per object from the (n, 6) x1, y1, x2, y2, conf, cls boxes of all passes (original pixels).

    `windows`: (n, 4) the tile each box was predicted in (the whole image for the full-image pass). Greedy by
    confidence, per class (unless `agnostic`): a box takes over every lower-scored box it matches (`metric`
    above `threshold`); NMS keeps the winner's box, NMM grows it to the union. Pieces of one object cut by tile
    borders (see `_match_pairs`) are resolved in both modes: a piece of an object another tile saw whole gives
    way to that whole box (keeping the higher score), and pieces of an object no tile saw whole are joined into
    their union, so an object split by a border comes back as one box. Only boxes that overlap or touch are
    compared (a sweep along x), and the greedy pass walks only the boxes that have a match.
    """
    if method not in MERGE_METHODS or metric not in MERGE_METRICS:
        raise ValueError(f"merge method/metric must be in {MERGE_METHODS}/{MERGE_METRICS}, got {method}/{metric}")
    if len(det) == 0:
        return det
    device = det.device
    d = det.detach().cpu().double().numpy()
    wins = windows.detach().cpu().double().numpy().reshape(-1, 4)
    order = np.argsort(-d[:, 4], kind="stable")
    d, wins = d[order], wins[order]
    cuts = cut_edges(d[:, :4], wins, image_hw)
    boxes = d[:, :4].copy()
    if not agnostic:  # classes apart by more than the image: boxes of different classes never touch
        shift = (max(image_hw) + 2 * BORDER_TOL + 1) * d[:, 5:6]
        boxes += shift
        wins = wins + shift
    i, j = _candidate_pairs(boxes, BORDER_TOL)
    same, joined = _match_pairs(i, j, boxes, wins, cuts, metric, threshold)
    # two views of one object score alike: a far weaker box (junk at a low conf_thres) does not reshape a strong one
    joined &= d[j, 4] >= JOIN_MIN_SCORE_RATIO * d[i, 4]
    piece_i, piece_j = cuts[i].any(1), cuts[j].any(1)
    halves = joined & piece_i & piece_j  # no tile saw the object whole: its pieces join into their union
    whole_j = joined & piece_i & ~piece_j  # the lower-scored box is the whole object the winner is a piece of
    taken = same | joined
    grow = halves | (same if method == "nmm" else np.zeros_like(same))
    grow_set = set(zip(i[grow].tolist(), j[grow].tolist()))
    whole_of = {}
    for a, b in zip(i[whole_j].tolist(), j[whole_j].tolist()):
        whole_of.setdefault(a, b)  # the best-scored whole box (pairs come in j order within an i)
    partners: dict[int, list[int]] = {}
    for a, b in zip(i[taken].tolist(), j[taken].tolist()):
        partners.setdefault(a, []).append(b)
    alive = np.ones(len(d), dtype=bool)
    out = d.copy()
    for i in sorted(partners):  # descending confidence; boxes without partners are kept as they are
        if not alive[i]:
            continue
        js = [j for j in partners[i] if alive[j]]
        alive[js] = False
        if i in whole_of and whole_of[i] in js:  # a piece wins: it takes the whole object's box, at its own score
            out[i, :4] = out[whole_of[i], :4]
        grow = [j for j in js if (i, j) in grow_set]
        if grow:
            out[i, :2] = np.minimum(out[i, :2], out[grow, :2].min(0))
            out[i, 2:4] = np.maximum(out[i, 2:4], out[grow, 2:4].max(0))
    out = out[alive]
    if max_det is not None:
        out = out[:max_det]
    return torch.from_numpy(out).to(device=device, dtype=det.dtype)


# ----- training on tiles --------------------------------------------------------------------------------------
def clip_to_window(boxes_xyxy: np.ndarray, window: Sequence[int], min_visibility: float) -> tuple[np.ndarray, np.ndarray]:
    """(boxes clipped to `window` in its own pixels, index of the boxes kept): a box is kept when at least
    `min_visibility` of its area lies inside the window."""
    x1, y1, x2, y2 = window
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    clipped = np.stack((np.clip(b[:, 0], x1, x2), np.clip(b[:, 1], y1, y2), np.clip(b[:, 2], x1, x2),
                        np.clip(b[:, 3], y1, y2)), 1)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    kept = np.flatnonzero((inside > 0) & (inside >= min_visibility * np.maximum(area, 1e-9)))
    return clipped[kept] - np.array([x1, y1, x1, y1], dtype=np.float64), kept


def pixel_boxes(labels: np.ndarray, image_hw: Sequence[int]) -> np.ndarray:
    """(n, 4) xyxy pixel boxes of YOLO labels [cls, cx, cy, w, h] normalised to an h x w image."""
    h, w = image_hw
    return xywhn2xyxy(labels[:, 1:5], w, h) if len(labels) else np.zeros((0, 4))


def window_labels(labels: np.ndarray, boxes_xyxy: np.ndarray, window: Sequence[int],
                  min_visibility: float) -> np.ndarray:
    """(m, 5) YOLO labels [cls, cx, cy, w, h] normalised to `window`: the boxes (`boxes_xyxy`, the labels in image
    pixels) at least `min_visibility` inside it, clipped to it."""
    clipped, kept = clip_to_window(boxes_xyxy, window, min_visibility)
    out = np.zeros((len(kept), 5), dtype=np.float32)
    if len(kept):
        out[:, 0] = labels[kept, 0]
        out[:, 1:] = xyxy2xywhn(clipped, window[2] - window[0], window[3] - window[1])
    return out


def sample_tile(rng, image_hw: Sequence[int], labels: np.ndarray, size: int, min_visibility: float = 0.5,
                empty_keep: float = 0.1, tries: int = 10) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """A random `size` tile of an image and its labels: (window, labels normalised to the tile).

    `labels` are the image's YOLO labels. Tiles without a visible enough box are drawn again (up to `tries`),
    keeping an empty one only with probability `empty_keep`, so training sees some background without being
    flooded by it. `rng` is a `random.Random` (the dataset's per-item seeded generator).
    """
    h, w = image_hw
    tw, th = min(size, w), min(size, h)
    boxes = pixel_boxes(labels, image_hw)
    window, tile_labels = (0, 0, tw, th), np.zeros((0, 5), dtype=np.float32)
    for _ in range(max(tries, 1)):
        x1, y1 = rng.randint(0, w - tw), rng.randint(0, h - th)
        window = (x1, y1, x1 + tw, y1 + th)
        tile_labels = window_labels(labels, boxes, window, min_visibility)
        if len(tile_labels) or rng.random() < empty_keep:
            break
    return window, tile_labels


# ----- the offline tiler ----------------------------------------------------------------------------------------
def tile_dataset(data: str | Path, size: int, overlap: float, out: str | Path, min_visibility: float = 0.5,
                 empty_keep: float = 1.0, seed: int = 0) -> Path:
    """Write a YOLO-format tiled copy of every split of `data` (a dataset yaml) under `out`, with its yaml.

    Every tile of `tile_windows` is written as `<image stem>_<x1>_<y1>.<ext>` with its clipped labels (kept at
    `min_visibility`); a share `empty_keep` of the tiles without labels is kept (all by default).
    """
    import random

    import cv2
    import yaml

    from utils.data_config import check_dataset
    from utils.labels import load_labels

    if size < 1:
        raise UserError(f"--size must be a positive tile size in pixels, got {size}")
    if not 0 <= overlap < 1:
        raise UserError(f"--overlap must be in [0, 1), got {overlap}")
    cfg = check_dataset(str(data), autodownload=False)
    out = Path(out)
    rng = random.Random(seed)
    new = {"path": str(out.resolve()), "names": cfg["names"], "nc": cfg["nc"]}
    for split in ("train", "val", "test"):
        if not cfg.get(split):
            continue
        cache, _ = load_labels(cfg[split], int(cfg["nc"]), prefix=f"{split}: ")
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        n_tiles = n_boxes = 0
        for f, labels in zip(cache["im_files"], cache["labels"]):
            im = cv2.imread(f)
            if im is None:
                continue  # the label scan already reported it
            h, w = im.shape[:2]
            boxes = pixel_boxes(labels, (h, w))
            for win in tile_windows(h, w, size, overlap):
                rows = window_labels(labels, boxes, win, min_visibility)
                if not len(rows) and rng.random() >= empty_keep:
                    continue
                x1, y1, x2, y2 = (int(v) for v in win)
                stem = f"{Path(f).stem}_{x1}_{y1}"
                cv2.imwrite(str(out / "images" / split / f"{stem}{Path(f).suffix}"), im[y1:y2, x1:x2])
                (out / "labels" / split / f"{stem}.txt").write_text(
                    "".join("%g %.6f %.6f %.6f %.6f\n" % tuple(r) for r in rows))
                n_tiles, n_boxes = n_tiles + 1, n_boxes + len(rows)
        new[split] = f"images/{split}"
        print(f"{split}: {len(cache['im_files'])} images -> {n_tiles} tiles of {size} px with {n_boxes} boxes")
    yaml_path = out / f"{Path(str(data)).stem}-tiles{size}.yaml"
    yaml_path.write_text(yaml.safe_dump(new, sort_keys=False))
    print(f"Tiled dataset written to {out}, yaml {yaml_path}")
    return yaml_path


@report_user_errors
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m utils.slicing", description="Tile a YOLO dataset for sliced training.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tile", help="write a YOLO-format tiled copy of a dataset and its yaml")
    t.add_argument("--data", required=True, help="dataset.yaml path")
    t.add_argument("--size", type=int, default=640, help="tile side in original pixels")
    t.add_argument("--overlap", type=float, default=0.2, help="tile overlap as a share of the size, in [0, 1)")
    t.add_argument("--out", required=True, help="output folder (images/, labels/ and the yaml)")
    t.add_argument("--min-visibility", type=float, default=0.5, help="keep a clipped box when this share is inside")
    t.add_argument("--empty-keep", type=float, default=1.0, help="share of tiles without labels to keep")
    opt = parser.parse_args(argv)
    return tile_dataset(opt.data, opt.size, opt.overlap, opt.out, opt.min_visibility, opt.empty_keep)


if __name__ == "__main__":
    main()
