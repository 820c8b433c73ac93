"""Sliced inference on large images: this project against SAHI, and full-image against sliced prediction.

The same weights, tile size, overlap, thresholds and merge go through this project's sliced predictor
(models.predictor.Predictor with a utils.slicing.SliceConfig) and through SAHI's `get_sliced_prediction`, with
the model wrapped in SAHI's custom-model interface (sahi.models.base.DetectionModel, one tile per call, as SAHI
runs a custom model). Both are scored by the project's one COCO evaluator (utils.coco.COCOStyleEvaluator) on
the full-resolution validation images and labels, and timed in the same run, alternating the two (order
flipped every round), as wall seconds per megapixel of input. Every weights file also gets a full-image row
(letterboxed to --img, no slicing), so the table shows what slicing buys for plain and SPD models.

SAHI is a benchmark-only dependency (pip install sahi); without it its rows are skipped. At a confidence
threshold below 0.1 SAHI itself switches its merge to NMS with IoU, so the default comparison is NMS/IoU 0.5.

Usage (deepforest: train on three crops, validate on one 2299x2472 image with 574 trees):
    python benchmarks/sliced_inference.py --weights runs/train/df-slice/weights/best.pt \
        runs/train/df-spd-slice/weights/best.pt --img 320 --slice 640 --out benchmarks/sliced_inference
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from models.backends import DetectMultiBackend  # noqa: E402
from models.predictor import Predictor  # noqa: E402
from utils.boxes import xywhn2xyxy  # noqa: E402
from utils.coco import COCOStyleEvaluator  # noqa: E402
from utils.data_config import check_dataset  # noqa: E402
from utils.dataset import read_image  # noqa: E402
from utils.torch_utils import cpu_model  # noqa: E402
from utils.errors import UserError, report_user_errors  # noqa: E402
from utils.labels import load_labels  # noqa: E402
from utils.slicing import SliceConfig  # noqa: E402


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "deepforest" / "deepforest.yaml"))
    p.add_argument("--weights", nargs="+", required=True, help="trained .pt files (each gets full-image and sliced rows)")
    p.add_argument("--img", type=int, default=320, help="network input size (tiles and the full image)")
    p.add_argument("--slice", type=int, default=640, help="tile side in original pixels")
    p.add_argument("--overlap", type=float, default=0.2)
    p.add_argument("--conf", type=float, default=0.001, help="confidence threshold (val.py's)")
    p.add_argument("--iou", type=float, default=0.6, help="per-pass NMS IoU (val.py's)")
    p.add_argument("--max-det", type=int, default=1000, help="detections per pass and per image, and COCO maxDets")
    p.add_argument("--merge", default="nms", choices=("nms", "nmm"))
    p.add_argument("--merge-iou", type=float, default=0.5)
    p.add_argument("--merge-metric", default="iou", choices=("iou", "ios"))
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported), each method once per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-sahi", action="store_true", help="skip SAHI's rows even when it is installed")
    p.add_argument("--out", default="runs/benchmarks/sliced_inference", help="writes <out>.csv and <out>.md")
    return p.parse_args(argv)


def sahi_model_class():
    """A SAHI DetectionModel running one tile through this project's (unsliced) Predictor; None without SAHI."""
    try:
        from sahi.models.base import DetectionModel
        from sahi.prediction import ObjectPrediction
        from sahi.utils.compatibility import fix_full_shape_list, fix_shift_amount_list
    except ImportError:
        return None

    class ProjectModel(DetectionModel):
        def __init__(self, predictor: Predictor, imgsz: int, stride: int, names: dict, **kw):
            self.predictor, self.imgsz, self.stride = predictor, imgsz, stride
            super().__init__(model=predictor.model, category_mapping={str(k): v for k, v in names.items()}, **kw)

        def set_model(self, model, **kwargs) -> None:
            self.model = model

        def load_model(self) -> None:
            self.model = self.predictor.model

        def perform_inference(self, image: np.ndarray) -> None:
            self._original_predictions = self.predictor.predict_images([image], self.imgsz, self.stride)[1][0].cpu()

        def _create_object_prediction_list_from_original_predictions(self, shift_amount_list=[[0, 0]],  # noqa: B006
                                                                      full_shape_list=None) -> None:
            # SAHI passes [x, y] for a whole image and [[x, y]] for tiles; its helpers make both nested
            shifts, fulls = fix_shift_amount_list(shift_amount_list), fix_full_shape_list(full_shape_list)
            shift = [int(v) for v in (shifts[0] if shifts else [0, 0])]
            full = [int(v) for v in fulls[0]] if fulls else None
            preds = []
            for x1, y1, x2, y2, score, cls in self._original_predictions.tolist():
                if x2 > x1 and y2 > y1:
                    preds.append(ObjectPrediction(bbox=[x1, y1, x2, y2], category_id=int(cls),
                                                  category_name=self.category_mapping[str(int(cls))], score=score,
                                                  shift_amount=shift, full_shape=full))
            self._object_prediction_list_per_image = [preds]

    return ProjectModel


def sahi_predict(sahi_model, image: np.ndarray, opt: argparse.Namespace) -> torch.Tensor:
    from sahi.predict import get_sliced_prediction

    res = get_sliced_prediction(image, sahi_model, slice_height=opt.slice, slice_width=opt.slice,
                                overlap_height_ratio=opt.overlap, overlap_width_ratio=opt.overlap,
                                perform_standard_pred=True, postprocess_type=opt.merge.upper(),
                                postprocess_match_metric=opt.merge_metric.upper(),
                                postprocess_match_threshold=opt.merge_iou, postprocess_class_agnostic=False,
                                verbose=0, force_postprocess_type=True)
    rows = [[*p.bbox.to_xyxy(), p.score.value, p.category.id] for p in res.object_prediction_list]
    det = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    return det[det[:, 4].argsort(descending=True)][:opt.max_det]


def score(dets: list[torch.Tensor], labels: list[np.ndarray], shapes: list[tuple], max_det: int) -> dict:
    ev = COCOStyleEvaluator(max_dets=max_det)
    for k, (d, lb, (h, w)) in enumerate(zip(dets, labels, shapes)):
        gt = xywhn2xyxy(lb[:, 1:5], w, h) if len(lb) else np.zeros((0, 4))
        ev.update(k, d[:, :4].numpy(), d[:, 4].numpy(), d[:, 5].numpy(), gt, lb[:, 0] if len(lb) else np.zeros(0))
    s = ev.summarize()
    return {k: round(max(s[k], 0.0), 4) for k in ("AP", "AP50", "APs", "APm")}


def methods_for(weights: str, opt: argparse.Namespace, sahi_cls) -> dict:
    model = DetectMultiBackend(weights)
    stride = int(model.stride)
    cfg = SliceConfig(opt.slice, overlap=opt.overlap, batch=8, full=True, merge=opt.merge, merge_iou=opt.merge_iou,
                      merge_metric=opt.merge_metric).check(stride)

    def predictor(slicing=None) -> Predictor:
        return Predictor(model, conf_thres=opt.conf, iou_thres=opt.iou, max_det=opt.max_det, multi_label=True,
                         slicing=slicing)

    full, sliced = predictor(), predictor(cfg)
    out = {"full image": lambda im: full.predict_images([im], opt.img, stride)[1][0].cpu(),
           "sliced": lambda im: sliced.predict_images([im], opt.img, stride)[1][0].cpu()}
    if sahi_cls is not None:
        sahi_model = sahi_cls(predictor(), opt.img, stride, dict(model.names), confidence_threshold=opt.conf,
                              device="cpu")
        out["sliced (SAHI)"] = lambda im: sahi_predict(sahi_model, im, opt)
    return out


def run(opt: argparse.Namespace) -> pd.DataFrame:
    torch.set_num_threads(opt.threads)
    sahi_cls = None if opt.no_sahi else sahi_model_class()
    if sahi_cls is None:
        print("SAHI not installed (pip install sahi) or --no-sahi: its rows are skipped")
    data = check_dataset(opt.data, autodownload=False)
    cache, _ = load_labels(data["val"], int(data["nc"]), prefix="val: ")
    images = [np.ascontiguousarray(read_image(f)[..., ::-1]) for f in cache["im_files"]]  # RGB, as detect.py feeds
    shapes = [im.shape[:2] for im in images]
    mpix = sum(h * w for h, w in shapes) / 1e6
    load0 = os.getloadavg()[0]
    rows = []
    for w in opt.weights:
        methods = methods_for(w, opt, sahi_cls)
        names = list(methods)
        for f in methods.values():  # warm-up: first-call allocations out of the timings
            f(images[0])
        times = {n: [] for n in names}
        dets = {}
        for r in range(opt.rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                out = [methods[n](im) for im in images]
                times[n].append(time.perf_counter() - t0)
                dets.setdefault(n, out)
        for n in names:
            s_per_mp = statistics.median(times[n]) / mpix
            rows.append({"weights": Path(w).parent.parent.name if Path(w).parent.name == "weights" else Path(w).stem,
                         "sha256": hashlib.sha256(Path(w).read_bytes()).hexdigest()[:12], "method": n,
                         **score(dets[n], cache["labels"], shapes, opt.max_det),
                         "detections": int(sum(len(d) for d in dets[n])), "s_per_MP": round(s_per_mp, 3)})
        base = next(r["s_per_MP"] for r in rows[-len(names):] if r["method"] == "sliced")
        for r in rows[-len(names):]:
            r["time_vs_sliced"] = round(r["s_per_MP"] / base, 2)
        print(pd.DataFrame(rows[-len(names):]).to_string(index=False))
    df = pd.DataFrame(rows)
    write(df, opt, load0, mpix)
    return df


def write(df: pd.DataFrame, opt: argparse.Namespace, load0: float, mpix: float) -> None:
    out = Path(opt.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)
    cpu = cpu_model()
    vers = [f"torch {torch.__version__}"]
    try:
        import sahi

        vers.append(f"sahi {sahi.__version__}")
    except ImportError:
        pass
    lines = ["# Sliced inference: this project vs SAHI, full image vs sliced", "",
             f"Command: `python benchmarks/sliced_inference.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {cpu}, {os.cpu_count()} cores, {opt.threads} torch threads; load average {load0:.1f} at "
             f"start, {os.getloadavg()[0]:.1f} at end  ", f"Versions: {', '.join(vers)}  ",
             f"Data: {opt.data} val ({mpix:.2f} megapixels). Input {opt.img} px; tiles {opt.slice} px, overlap "
             f"{opt.overlap}, plus the whole image; conf {opt.conf}, per-pass NMS IoU {opt.iou}, max {opt.max_det} "
             f"detections; merge {opt.merge} / {opt.merge_metric} {opt.merge_iou}, per class.  ",
             "AP, AP50, APs, APm: the project's COCO evaluator (COCOeval) on the full-resolution labels, maxDets "
             f"{opt.max_det}. s/MP: wall seconds per megapixel, median of {opt.rounds} rounds alternating the "
             "methods. time_vs_sliced: s/MP over this project's sliced s/MP for the same weights.", "",
             "| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"Saved {out.with_suffix('.csv')} and {out.with_suffix('.md')}")


@report_user_errors
def main(argv: list[str] | None = None) -> pd.DataFrame:
    opt = parse_opt(argv)
    for w in opt.weights:
        if not Path(w).is_file():
            raise UserError(f"weights {w} not found: train them first (see the usage in this script's docstring)")
    return run(opt)


if __name__ == "__main__":
    main()
