"""COCO interop: category-id maps, prediction/ground-truth json in COCO format, and pycocotools evaluation.

yolo_labels_to_coco_gt turns any YOLO dataset into a COCO ground-truth json so every dataset (not only COCO
itself) can be scored with the official pycocotools AP/APs/APm/APl numbers.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from utils.errors import UserError

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
    names = dict(names) if isinstance(names, Mapping) else dict(enumerate(names))
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
        ev.evaluate()
        ev.accumulate()
    if not preds and verbose:
        print(f"WARNING: no predictions in {pred_json_path}; every AP is 0 (or -1 without ground truth)")
    with contextlib.redirect_stdout(io.StringIO()):  # its own print rounds to 3 decimals: 7.8e-05 would read 0.000
        ev.summarize()
    if verbose:
        for label, value in zip(COCO_STAT_LABELS, ev.stats):
            print(f" {label} = {value:.4g}" if value >= 0 else f" {label} = n/a")
    return [float(s) for s in ev.stats]
