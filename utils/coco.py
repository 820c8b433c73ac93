"""COCO interop: category-id maps, prediction/ground-truth json in COCO format, and pycocotools evaluation.

yolo_labels_to_coco_gt turns any YOLO dataset into a COCO ground-truth json so every dataset (not only COCO
itself) can be scored with the official pycocotools AP/APs/APm/APl numbers.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np
import torch

from utils.errors import UserError
from utils.logging import LOGGER
from utils.names import normalize_names

if TYPE_CHECKING:
    from utils.sizes import SizeMetrics

# COCO's 91-id category space has 11 ids without annotations in detection (12, 26, 29, 30, 45, 66, 68, 69, 71,
# 83 are unused; 91 is never reached); the 80 detection classes are the remaining ids 1..90 in order.
_COCO91_UNUSED = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco80_to_coco91_class() -> list[int]:
    """Map YOLO's contiguous 80 COCO class indices to the original COCO category ids (index -> id)."""
    return [i for i in range(1, 91) if i not in _COCO91_UNUSED]


def image_id_from_path(path: str | Path) -> int | str:
    """COCO image id for an image file: int of the stem when it is numeric (COCO names), else the stem."""
    stem = Path(path).stem
    return int(stem) if stem.isnumeric() else stem


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def append_predictions(
    jdict: list[dict],
    predn_xyxy,
    path: str | Path,
    class_map: Sequence[int] | None = None,
) -> list[dict]:
    """Append one image's predictions (N, 6: x1, y1, x2, y2, conf, cls in original pixels) to jdict in COCO
    results format ([x, y, w, h] top-left corner). class_map maps class index -> category id (None: identity)."""
    p = _as_numpy(predn_xyxy).reshape(-1, 6)
    image_id = image_id_from_path(path)
    for x1, y1, x2, y2, conf, cls in p.tolist():
        c = int(cls)
        jdict.append(
            {
                "image_id": image_id,
                "category_id": int(class_map[c]) if class_map is not None else c,
                "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                "score": round(conf, 5),
            }
        )
    return jdict


def predictions_to_coco_json(
    records: Iterable[tuple[str | Path, object]],
    class_map: Sequence[int] | None = None,
) -> list[dict]:
    """COCO results list from (image path, predn_xyxy) records; see append_predictions."""
    jdict: list[dict] = []
    for path, predn in records:
        append_predictions(jdict, predn, path, class_map)
    return jdict


def yolo_labels_to_coco_gt(
    im_files: Sequence[str | Path],
    labels_xyxy_pixels_per_image: Sequence,
    shapes_hw_per_image: Sequence[tuple[int, int]],
    names: Mapping[int, str] | Sequence[str],
    class_map: Sequence[int] | None = None,
) -> dict:
    """A COCO ground-truth dict for a YOLO dataset.

    labels_xyxy_pixels_per_image[i]: (M, 5) cls, x1, y1, x2, y2 in original pixels of im_files[i], whose
    (height, width) is shapes_hw_per_image[i]. Boxes become [x, y, w, h] with area = w * h and iscrowd = 0.
    """
    if not (len(im_files) == len(labels_xyxy_pixels_per_image) == len(shapes_hw_per_image)):
        raise UserError(
            f"yolo_labels_to_coco_gt: {len(im_files)} images, {len(labels_xyxy_pixels_per_image)} label arrays "
            f"and {len(shapes_hw_per_image)} shapes must have the same length"
        )
    names = normalize_names(names)
    cat = (lambda c: int(class_map[c])) if class_map is not None else (lambda c: int(c))
    images, annotations, seen = [], [], {}
    for f, labels, (h, w) in zip(im_files, labels_xyxy_pixels_per_image, shapes_hw_per_image):
        image_id = image_id_from_path(f)
        if image_id in seen:  # pred json only carries the id, so two files with one id could not be told apart
            raise UserError(f"images {seen[image_id]} and {f} share COCO image id {image_id!r} (same file stem)")
        seen[image_id] = f
        images.append({"id": image_id, "file_name": Path(f).name, "width": int(w), "height": int(h)})
        for c, x1, y1, x2, y2 in _as_numpy(labels).reshape(-1, 5).tolist():
            bw, bh = x2 - x1, y2 - y1
            annotations.append(
                {
                    "id": len(annotations) + 1,  # COCOeval treats id 0 as "unmatched", so ids start at 1
                    "image_id": image_id,
                    "category_id": cat(int(c)),
                    "bbox": [x1, y1, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": cat(k), "name": str(v), "supercategory": "none"} for k, v in sorted(names.items())]
    return {"info": {"description": "converted from YOLO labels"}, "images": images,
            "annotations": annotations, "categories": categories}


def _read_json(path: str | Path, what: str):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} json not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} json {path} is not valid json: {e}") from e


COCO_STAT_LABELS = tuple(
    f"Average {kind:<9} ({'AR' if kind == 'Recall' else 'AP'}) @[ IoU={iou:<9} | area={area:>6} | maxDets={dets:>3} ]"
    for kind, iou, area, dets in [
        ("Precision", "0.50:0.95", "all", 100), ("Precision", "0.50", "all", 100), ("Precision", "0.75", "all", 100),
        ("Precision", "0.50:0.95", "small", 100), ("Precision", "0.50:0.95", "medium", 100),
        ("Precision", "0.50:0.95", "large", 100), ("Recall", "0.50:0.95", "all", 1), ("Recall", "0.50:0.95", "all", 10),
        ("Recall", "0.50:0.95", "all", 100), ("Recall", "0.50:0.95", "small", 100),
        ("Recall", "0.50:0.95", "medium", 100), ("Recall", "0.50:0.95", "large", 100),
    ]
)


def run_pycocotools(gt_json_path: str | Path, pred_json_path: str | Path, verbose: bool = True) -> list[float]:
    """Official COCO bbox evaluation; prints the standard 12-line summary and returns the 12 stats
    (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl; -1 where undefined)."""
    return [float(s) for s in pycocotools_eval(gt_json_path, pred_json_path, verbose=verbose).stats]


def pycocotools_eval(gt_json_path: str | Path, pred_json_path: str | Path, verbose: bool = True,
                     area_ranges: Mapping[str, tuple[float, float]] | None = None):
    """pycocotools' COCOeval on a ground-truth and a results json, evaluated, accumulated and summarized, with
    `area_ranges` added as COCOStyleEvaluator adds them (read them with area_range_metrics). `verbose` prints
    the standard 12-line summary."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = _read_json(gt_json_path, "ground-truth")
    preds = _read_json(pred_json_path, "prediction")
    if not isinstance(gt, dict) or not {"images", "annotations", "categories"} <= gt.keys():
        raise UserError(f"{gt_json_path} is not a COCO ground-truth json (needs images, annotations, categories)")
    if not isinstance(preds, list):
        raise UserError(f"{pred_json_path} is not a COCO results json (a list of detections)")

    # pycocotools sorts image ids, which fails on a mix of int and str ids; strings compare fine.
    id_types = {type(im["id"]) for im in gt["images"]} | {type(p["image_id"]) for p in preds}
    if len(id_types) > 1:
        for im in gt["images"]:
            im["id"] = str(im["id"])
        for a in gt["annotations"]:
            a["image_id"] = str(a["image_id"])
        for p in preds:
            p["image_id"] = str(p["image_id"])
    unknown = {p["image_id"] for p in preds} - {im["id"] for im in gt["images"]}
    if unknown:
        raise UserError(
            f"{len(unknown)} image id(s) in {pred_json_path} are not in {gt_json_path}, e.g. {sorted(map(str, unknown))[:3]}"
        )

    quiet = contextlib.redirect_stdout(io.StringIO())  # silence pycocotools' loading chatter
    with quiet:
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if preds:
            coco_dt = coco_gt.loadRes(preds)
        else:  # loadRes cannot take an empty list; an empty result set still scores 0 (or -1) honestly
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        add_area_ranges(ev, area_ranges or {})
        ev.evaluate()
        ev.accumulate()
    if not preds and verbose:
        LOGGER.warning(f"no predictions in {pred_json_path}; every AP is 0 (or -1 without ground truth)")
    with contextlib.redirect_stdout(io.StringIO()):  # its own print rounds to 3 decimals: 7.8e-05 would read 0.000
        ev.summarize()
    if verbose:
        for label, value in zip(COCO_STAT_LABELS, ev.stats):
            print(f" {label} = {value:.4g}" if value >= 0 else f" {label} = n/a")
    return ev


def cocoeval_classes(backend: str = "auto") -> tuple[type, type, str]:
    """(COCO, COCOeval, backend name): faster-coco-eval's drop-in classes when installed (and backend is 'auto'
    or 'faster_coco_eval'), else pycocotools'. Both give the same numbers (tests/test_coco.py checks it)."""
    if backend in ("auto", "faster_coco_eval"):
        try:
            from faster_coco_eval import COCO, COCOeval_faster

            return COCO, COCOeval_faster, "faster_coco_eval"
        except ImportError:
            if backend != "auto":
                raise
    if backend not in ("auto", "pycocotools"):
        raise ValueError(f"COCO evaluation backend must be auto, pycocotools or faster_coco_eval, got {backend!r}")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval, "pycocotools"


def _as_rows(x, width: int) -> np.ndarray:
    return _as_numpy(np.zeros((0, width)) if x is None else x).reshape(-1, width)


class COCOStyleEvaluator:
    """COCO bbox AP/AR (AP, AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l) by COCOeval, in memory, no json.

    Feed one image at a time with update(); boxes are xyxy in original-image pixels, a box's area is w*h and every
    ground truth is non-crowd (YOLO labels carry no crowd flag). `area_ranges` adds named ranges {name: (lo, hi)}
    in pixels^2, reported as AP_<name>. `max_dets`: the detections per image AP is computed over (COCO's 100;
    raise it for images with more objects than that, such as aerial tree or car counts).
    """

    STAT_KEYS = STAT_NAMES

    def __init__(self, area_ranges: Mapping[str, tuple[float, float]] | None = None, backend: str = "auto",
                 max_dets: int = 100):
        self.area_ranges = dict(area_ranges or {})
        self.max_dets = int(max_dets)
        self.backend = backend
        self._images: dict[object, tuple[np.ndarray, ...]] = {}

    def __len__(self) -> int:
        """Number of images recorded so far (handy as a running image id)."""
        return len(self._images)

    def update(self, image_id: int | str, pred_xyxy, pred_scores, pred_classes, gt_xyxy, gt_classes) -> None:
        """Record one image's predictions and ground truths (xyxy, original pixels; None: none). Each image_id once."""
        if image_id in self._images:
            raise ValueError(f"COCOStyleEvaluator: image_id {image_id!r} was given twice")
        pb, gb = _as_rows(pred_xyxy, 4), _as_rows(gt_xyxy, 4)
        ps, pc, gc = (_as_rows(x, 1)[:, 0] for x in (pred_scores, pred_classes, gt_classes))
        if not (len(pb) == len(ps) == len(pc)) or len(gb) != len(gc):
            raise ValueError(
                f"COCOStyleEvaluator: image {image_id!r} has {len(pb)} boxes/{len(ps)} scores/{len(pc)} classes "
                f"for predictions and {len(gb)} boxes/{len(gc)} classes for ground truth"
            )
        self._images[image_id] = (pb, ps, pc.astype(np.int64), gb, gc.astype(np.int64))

    def _datasets(self) -> tuple[dict, np.ndarray]:
        """COCO ground-truth dict and the (N, 7) [image, x, y, w, h, score, class] result rows loadRes takes.

        Images get ids 1.. in sorted id order (insertion order for unsortable mixes of int and str), the order
        COCOeval walks them in, which decides how equal scores are ranked."""
        ids = list(self._images)
        try:
            ids = sorted(ids)
        except TypeError:
            pass
        images, anns, dets, classes = [], [], [], set()
        for k, key in enumerate(ids, 1):
            pb, ps, pc, gb, gc = self._images[key]
            images.append({"id": k})
            classes.update(pc.tolist(), gc.tolist())
            wh = gb[:, 2:] - gb[:, :2]
            for (x1, y1), (w, h), c in zip(gb[:, :2].tolist(), wh.tolist(), gc.tolist()):
                # ids from 1: COCOeval reads a match with id 0 as no match
                anns.append({"id": len(anns) + 1, "image_id": k, "category_id": c, "bbox": [x1, y1, w, h],
                             "area": w * h, "iscrowd": 0})
            dets.append(np.column_stack((np.full(len(pb), k), pb[:, :2], pb[:, 2:] - pb[:, :2], ps, pc)))
        gt = {"images": images, "annotations": anns, "categories": [{"id": c} for c in sorted(classes)]}
        return gt, np.concatenate(dets) if dets else np.zeros((0, 7))

    def evaluate(self, area_ranges: Mapping[str, tuple[float, float]] | None = None):
        """The evaluated and accumulated COCOeval object (its .eval and .stats are filled), scored on COCO's
        area ranges plus `area_ranges` (default: the constructor's); see range_index for where each one is."""
        COCO, COCOeval, _ = cocoeval_classes(self.backend)
        gt, dets = self._datasets()
        with contextlib.redirect_stdout(io.StringIO()):  # COCOeval reports every step on stdout
            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            if len(dets):
                coco_dt = coco_gt.loadRes(dets)
            else:  # loadRes cannot take an empty result set
                coco_dt = COCO()
                coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
                coco_dt.createIndex()
            ev = COCOeval(coco_gt, coco_dt, "bbox")
            if self.max_dets != 100:
                ev.params.maxDets = [1, 10, self.max_dets]
            add_area_ranges(ev, self.area_ranges if area_ranges is None else area_ranges)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return ev

    def summarize(self, area_ranges: Mapping[str, tuple[float, float]] | None = None) -> dict[str, float]:
        """The 12 COCO summary numbers keyed by STAT_KEYS, then AP_<name> and AR_<name> per extra area range;
        -1 where undefined (no ground truth in that range)."""
        ranges = self.area_ranges if area_ranges is None else dict(area_ranges)
        ev = self.evaluate(ranges)
        stats = [float(s) for s in ev.stats]
        if len(stats) > 12:  # faster-coco-eval lists an AP and an AR for every area range: AP..., AR...
            n = len(ev.params.areaRng) - 4
            stats = stats[:6] + stats[6 + n:12 + n]
        out = dict(zip(self.STAT_KEYS, stats))
        out.update(area_range_metrics(ev, ranges))
        return out

    def gt_sides(self) -> np.ndarray:
        """Every ground truth's side sqrt(w * h), original pixels, in image order."""
        parts = [g[:, 2:] - g[:, :2] for *_, g, _ in self._images.values()]
        wh = np.concatenate(parts) if parts else np.zeros((0, 2))
        return np.sqrt(np.clip(wh[:, 0] * wh[:, 1], 0, None))

    def size_metrics(self, bins, summary: Mapping[str, float] | None = None) -> "SizeMetrics":
        """AP/AR per object-size bin (utils.sizes.SizeBins or a --sizes value), with the ground truths' sides
        for plots. `summary`: what summarize(bins.area_ranges()) returned, so COCOeval runs once, not twice."""
        from utils.sizes import SizeMetrics, count_in_bins, parse_sizes

        bins = parse_sizes(bins)
        ranges = bins.area_ranges()
        m = summary if summary is not None else self.summarize(ranges)
        sides = self.gt_sides()
        return SizeMetrics(bins, [m[f"AP_{k}"] for k in ranges], [m[f"AR_{k}"] for k in ranges],
                           count_in_bins(sides, bins), sides)


def range_index(ev, lo_hi: tuple[float, float]) -> int:
    """Index of an area range in ev.params.areaRng (by value)."""
    for i, r in enumerate(ev.params.areaRng):
        if float(r[0]) == float(lo_hi[0]) and float(r[1]) == float(lo_hi[1]):
            return i
    raise KeyError(f"area range {lo_hi} was not evaluated")


def add_area_ranges(ev, area_ranges: Mapping[str, tuple[float, float]]) -> None:
    """Add area ranges to a COCOeval's params before evaluate(); one already there (COCO's own small, medium,
    large) is reused, not scored twice, so `--sizes coco` costs nothing extra."""
    rngs, lbls = [list(map(float, r)) for r in ev.params.areaRng], list(ev.params.areaRngLbl)
    for name, (lo, hi) in area_ranges.items():
        if [float(lo), float(hi)] not in rngs:
            rngs.append([float(lo), float(hi)])
            lbls.append(name)
    ev.params.areaRng, ev.params.areaRngLbl = rngs, lbls


def area_range_metrics(ev, area_ranges: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """AP_<name> (IoU 0.5:0.95) and AR_<name> (at the largest maxDets, COCO's 100) of an accumulated COCOeval for each area range,
    as COCOeval's summarize averages them (over IoUs and the classes that have ground truth there); -1 where
    the range holds no ground truth."""
    out = {}
    precision, recall = ev.eval["precision"], ev.eval["recall"]  # (T, R, K, A, M), (T, K, A, M)
    m = len(ev.params.maxDets) - 1  # the largest: 100, or COCOStyleEvaluator's max_dets
    for name, lo_hi in area_ranges.items():
        a = range_index(ev, lo_hi)
        for key, arr in (("AP", precision[:, :, :, a, m]), ("AR", recall[:, :, a, m])):
            v = arr[arr > -1]
            out[f"{key}_{name}"] = float(np.mean(v)) if v.size else -1.0
    return out
