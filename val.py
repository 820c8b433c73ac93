"""Validate a detection model on a YOLO-format dataset: mAP50, mAP50-95 and small/medium/large AP.

Usage:
    python val.py --weights yolov5n.pt --data ../shared/data/coco128/coco128.yaml --img 640
    python val.py --weights best.onnx --data coco.yaml --save-json      # + pycocotools' 12 numbers
    python val.py --weights best.pt --data deepforest.yaml --slice 640   # sliced, scored on the full-size images
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from engine.evaluate import (EvalOutputs, EvalRecord, format_metric, predict_dataset, predict_dataset_sliced,  # noqa: E402,F401
                             summarize)
from models.backends import DetectMultiBackend  # noqa: E402
from models.predictor import Predictor  # noqa: E402
from models.checkpoints import checkpoint_val_settings  # noqa: E402
from utils.coco import area_range_metrics, coco80_to_coco91_class, pycocotools_eval, yolo_labels_to_coco_gt  # noqa: E402
from utils.names import normalize_names  # noqa: E402
from utils.data_config import check_dataset  # noqa: E402
from utils.datasets import create_dataloader  # noqa: E402
from utils.errors import UserError, report_user_errors  # noqa: E402
from utils.checks import check_thresholds, check_workers  # noqa: E402
from utils.files import check_writable, increment_path  # noqa: E402
from utils.logging import LOGGER, set_verbosity  # noqa: E402
from utils.results import ValResult  # noqa: E402
from utils.slicing import SliceConfig, add_slice_arguments, fold_slice_options, slice_config  # noqa: E402
from utils.sizes import SIZES_HELP, parse_sizes, plot_size_study  # noqa: E402
from utils.torch_utils import check_img_size, select_device  # noqa: E402

TASKS = ("train", "val", "test", "speed", "study")


def is_coco_dataset(data: dict) -> bool:
    val = data.get("val")
    val = val[0] if isinstance(val, list) and val else val
    return isinstance(val, str) and val.replace("\\", "/").endswith("coco/val2017.txt")


def load_val_model(weights, device, half: bool, data: dict, trust_weights: bool, imgsz: int, batch_size: int):
    """The model, and the image size and batch it must run at (a fixed-shape export forces its own)."""
    model = DetectMultiBackend(weights, device=device, fp16=half and device.type != "cpu", data=data,
                               trust_weights=trust_weights)
    imgsz = check_img_size(imgsz, model.stride)
    if model.pt:
        print("Fusing layers... ", end="")
        model.model.info(img_size=imgsz)
    forced = []
    if model.batch and model.batch != batch_size:  # a fixed-batch export is fed exactly that many images at a time
        forced.append(f"batch {model.batch} (not --batch-size {batch_size})")
        batch_size = model.batch
    if model.fixed_imgsz is not None:
        if imgsz != model.fixed_imgsz[0]:
            forced.append(f"size {model.fixed_imgsz[0]} (not --imgsz {imgsz})")
        imgsz = model.fixed_imgsz[0]
    if forced:
        LOGGER.info(f"Note: {Path(str(weights)).name} is a fixed-shape export: evaluating at its export " + " and ".join(forced))
    return model, imgsz, batch_size


def val_names(data: dict, model_names: dict, single_cls: bool) -> dict:
    """Class names to report: the dataset's (else the model's); one 'item' class with --single-cls."""
    if single_cls:
        return {0: "item"}
    return normalize_names(data.get("names") or model_names)


def pycocotools_check(result: ValResult, rec: EvalRecord, data: dict, names: dict, weights, save_dir: Path,
                      class_map: list) -> None:
    """--save-json: write the predictions (and the ground truth, for any YOLO dataset) and let pycocotools
    recompute mAP, the area APs and the size bins' AP/AR, which then replace the ones in `result`."""
    pred_json = save_dir / f"{Path(str(weights)).stem if weights else 'model'}_predictions.json"
    pred_json.write_text(json.dumps(rec.jdict))
    LOGGER.info(f"Saved {len(rec.jdict)} predictions to {pred_json}")
    anno_json = Path(data.get("path", "")) / "annotations" / "instances_val2017.json"
    if not (is_coco_dataset(data) and anno_json.is_file()):  # any YOLO dataset: write its ground truth as COCO json
        g = rec.gt_records
        gt = yolo_labels_to_coco_gt([x[0] for x in g], [x[1] for x in g], [x[2] for x in g], names, class_map=class_map)
        anno_json = save_dir / "ground_truth_coco.json"
        anno_json.write_text(json.dumps(gt))
        LOGGER.info(f"Wrote the ground truth as COCO json to {anno_json}")
    try:
        ranges = result.sizes.bins.area_ranges() if result.sizes is not None else {}
        ev = pycocotools_eval(anno_json, pred_json, area_ranges=ranges)
        cs = [float(x) for x in ev.stats]
        result.map, result.map50 = cs[0], cs[1]
        result.aps, result.apm, result.apl = (max(x, 0.0) for x in cs[3:6])
        if ranges:
            m = area_range_metrics(ev, ranges)
            result.sizes.ap, result.sizes.ar = [m[f"AP_{k}"] for k in ranges], [m[f"AR_{k}"] for k in ranges]
            LOGGER.info("pycocotools, per size bin: " + "   ".join(
                f"{r} AP {format_metric(a)} AR {format_metric(b)}"
                for r, a, b in zip(result.sizes.bins.ranges, result.sizes.ap, result.sizes.ar)))
    except Exception as e:  # pycocotools is a cross-check; its failure must not lose the results above
        LOGGER.warning(f"pycocotools evaluation failed: {e}")


@torch.no_grad()
def run(
    data,
    weights=None,
    batch_size=32,
    imgsz=640,
    conf_thres=0.001,
    iou_thres=0.6,
    max_det=300,
    task="val",
    device="",
    workers=8,
    single_cls=False,
    augment=False,
    verbose=False,
    save_txt=False,
    save_hybrid=False,
    save_conf=False,
    save_json=False,
    project=ROOT / "runs/val",
    name="exp",
    exist_ok=False,
    half=True,
    plots=True,
    trust_weights=False,
    quiet=False,
    dataloader=None,
    coco_max_dets=100,
    slice=None,  # noqa: A002 (the --slice option's name)
    sizes="coco",
) -> ValResult:
    """Evaluate `weights` on the `task` split of `data`; returns a ValResult (metrics, per-class mAP, speed).

    `dataloader`: a ready loader of that split (train.py passes its own, so bad files are not reported twice).
    `slice` (a tile size, 'auto' or a SliceConfig): sliced validation, every metric on the full-size images.
    `sizes`: object-size bins for AP/AR by size (coco, aitod or side edges in pixels; see utils.sizes).
    """
    if task not in TASKS:
        raise UserError(f"--task must be one of {TASKS}, got '{task}'")
    slicing = slice_config(slice)
    check_slice_options(slicing, task=task, save_hybrid=save_hybrid, augment=augment)
    if coco_max_dets < 1:
        raise UserError(f"--coco-max-dets must be at least 1, got {coco_max_dets}")
    if weights is None:
        raise UserError("--weights is required")
    check_thresholds(conf_thres, iou_thres, max_det)
    check_workers(workers)
    sizes = parse_sizes(sizes)
    check_writable(project)
    device = select_device(device, batch_size=batch_size)
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
    data = check_dataset(data)
    model, imgsz, batch_size = load_val_model(weights, device, half, data, trust_weights, imgsz, batch_size)
    if slicing is not None:
        slicing.check(model.stride)
    (save_dir / "labels" if save_txt else save_dir).mkdir(parents=True, exist_ok=True)
    model.eval()
    nc = 1 if single_cls else int(data["nc"])
    if not single_cls and len(model.names) != nc:
        raise UserError(f"{weights} has {len(model.names)} classes but the dataset has {nc}: pass matching --data or --single-cls")
    names = val_names(data, dict(model.names), single_cls)
    split = task if task in ("train", "val", "test") else "val"
    if not data.get(split):
        raise UserError(f"dataset has no '{split}' split")
    rect = model.fixed_imgsz is None and task != "speed"  # rectangular batches for any format that accepts any shape
    if dataloader is None:
        dataloader = create_dataloader(data[split], imgsz, batch_size, model.stride, single_cls,
                                       pad=0.0 if task == "speed" else 0.5, rect=rect, workers=workers,
                                       prefix=f"{split}: ", nc=int(data["nc"]))[0]

    class_map = coco80_to_coco91_class() if is_coco_dataset(data) else list(range(1000))
    out = EvalOutputs(save_dir=save_dir, plots=plots, save_txt=save_txt, save_conf=save_conf, save_json=save_json,
                      class_map=class_map)
    predictor = Predictor(model, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det, multi_label=True,
                          agnostic=single_cls, augment=augment, half=model.fp16, slicing=slicing)
    if slicing is None:
        rec = predict_dataset(predictor, dataloader, nc, names, single_cls=single_cls, save_hybrid=save_hybrid, out=out,
                              coco_max_dets=coco_max_dets)
    else:
        LOGGER.info(f"Sliced validation: {slicing.size} px tiles, overlap {slicing.overlap}, run at --img {imgsz}"
                    f"{' plus the whole image' if slicing.full else ''}, merged by {slicing.merge} "
                    f"({slicing.merge_metric} > {slicing.merge_iou}); metrics on the full-size images and labels")
        rec = predict_dataset_sliced(predictor, dataloader.dataset, nc, names, imgsz=imgsz, stride=model.stride,
                                     fixed_shape=model.fixed_imgsz, single_cls=single_cls, out=out,
                                     coco_max_dets=coco_max_dets)
    result = summarize(rec, names, plots=plots, save_dir=save_dir, verbose=verbose, per_class=nc < 50, task=task,
                       sizes=sizes)
    shape = f"tiles at {imgsz}" if slicing is not None else str((batch_size, 3, imgsz, imgsz))
    print(f"Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape {shape}" % result.speed)
    if save_json and len(rec.jdict):
        pycocotools_check(result, rec, data, names, weights, save_dir, class_map)
    n = len(list(save_dir.glob("labels/*.txt")))
    LOGGER.info(f"Results saved to {save_dir}" + (f"\n{n} labels saved to {save_dir / 'labels'}" if save_txt else ""))
    return result


def check_slice_options(slicing: SliceConfig | None, *, task: str = "val", save_hybrid: bool = False,
                        augment: bool = False) -> None:
    """One clear line for an option sliced validation cannot honour."""
    if slicing is None:
        return
    clash = [name for name, on in (("--save-hybrid", save_hybrid), ("--augment", augment),
                                   (f"--task {task}", task in ("speed", "study"))) if on]
    if clash:
        raise UserError(f"--slice cannot be combined with {', '.join(clash)}: sliced validation predicts each full-size "
                        f"image tile by tile (drop {clash[0]} or --slice)")


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=str, default="coco128.yaml", help="dataset.yaml path")
    parser.add_argument("--weights", nargs="+", type=str, default="yolov5s.pt", help="model path(s)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size (default: a checkpoint's own final validation batch, else 32)")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=None,
                        help="inference size in pixels (default: a checkpoint's training size, else 640)")
    parser.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.6, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=300, help="maximum detections per image")
    parser.add_argument("--task", default="val", help="train, val, test, speed or study")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--workers", type=int, default=8, help="max dataloader workers")
    parser.add_argument("--single-cls", action="store_true", help="treat as single-class dataset")
    parser.add_argument("--augment", action="store_true", help="augmented inference")
    parser.add_argument("--verbose", action="store_true", help="report mAP by class")
    parser.add_argument("--save-txt", action="store_true", help="save results to *.txt")
    parser.add_argument("--save-hybrid", action="store_true", help="save label+prediction hybrid results to *.txt")
    parser.add_argument("--save-conf", action="store_true", help="save confidences in --save-txt labels")
    parser.add_argument("--save-json", action="store_true", help="save a COCO-JSON results file (and run pycocotools)")
    parser.add_argument("--project", default=ROOT / "runs/val", help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    parser.add_argument("--half", action="store_true", help="use FP16 half-precision inference (CUDA only)")
    parser.add_argument("--trust-weights", action="store_true", help="allow TorchScript weights (loading them runs their code)")
    parser.add_argument("--quiet", action="store_true", help="print only warnings, errors and the results table")
    parser.add_argument("--coco-max-dets", type=int, default=100,
                        help="detections per image the COCO APs count (COCO's 100; raise it for crowded images)")
    add_slice_arguments(parser)
    parser.add_argument("--sizes", nargs="+", default=["coco"], help=f"object-size bins for AP/AR by size: {SIZES_HELP}")
    opt = fold_slice_options(parser.parse_args(argv))
    parse_sizes(opt.sizes)  # a bad value is reported before any model is loaded
    opt.save_txt |= opt.save_hybrid
    if opt.batch_size is not None and opt.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {opt.batch_size}")
    if isinstance(opt.weights, list) and len(opt.weights) == 1:
        opt.weights = opt.weights[0]
    return opt


def study(opt: argparse.Namespace) -> None:
    """mAP and speed against image size (256..1536), saved as study_<data>_<weights>.txt and a plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, by_size = [], []
    for size in range(256, 1536 + 128, 128):
        LOGGER.info(f"\nRunning at --imgsz {size}...")
        r = run(**{**vars(opt), "imgsz": size, "task": "val", "plots": False})
        rows.append([size, r.precision, r.recall, r.map50, r.map, r.aps, r.apm, r.apl, *r.speed])
        by_size.append(r.sizes)
    name = f"study_{Path(str(opt.data)).stem}_{Path(str(opt.weights)).stem}"
    out = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok, mkdir=True)
    np.savetxt(out / f"{name}.txt", np.array(rows), fmt="%10.4g")
    arr = np.array(rows)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4), tight_layout=True)
    ax[0].plot(arr[:, 0], arr[:, 4], ".-", label="mAP50-95")
    ax[0].plot(arr[:, 0], arr[:, 5], ".-", label="APs")
    ax[0].set_xlabel("image size")
    ax[0].legend()
    ax[1].plot(arr[:, 0], arr[:, 9], ".-")
    ax[1].set_xlabel("image size")
    ax[1].set_ylabel("inference ms / image")
    fig.savefig(out / f"{name}.png", dpi=150)
    plot_size_study([int(x) for x in arr[:, 0]], by_size, out / f"{name}_sizes.png")
    LOGGER.info(f"Study saved to {out}")


def apply_training_settings(opt: argparse.Namespace) -> argparse.Namespace:
    """Fill --batch-size/--imgsz the user left out from the checkpoint's final validation in training.

    Rectangular val batches depend on the batch size, so this is what makes a plain `val.py --weights best.pt`
    reproduce the numbers printed at the end of training.
    """
    settings = {}
    if (opt.batch_size is None or opt.imgsz is None) and Path(str(opt.weights)).suffix == ".pt" and Path(str(opt.weights)).is_file():
        try:
            settings = checkpoint_val_settings(opt.weights)
        except UserError:
            settings = {}  # the model loader below reports a bad file in its own words
    used = []
    if opt.batch_size is None:
        opt.batch_size = int(settings.get("batch_size") or 32)
        used += [f"batch size {opt.batch_size}"] if settings.get("batch_size") else []
    if opt.imgsz is None:
        opt.imgsz = int(settings.get("imgsz") or 640)
        used += [f"--img {opt.imgsz}"] if settings.get("imgsz") else []
    if settings.get("single_cls") and not opt.single_cls:
        opt.single_cls = True
        used.append("--single-cls")
    if used:
        LOGGER.info(f"Using {', '.join(used)} from the training's final validation in {Path(str(opt.weights)).name} "
              f"(pass --batch-size/--img to change)")
    return opt


@report_user_errors
def main(argv: list[str] | None = None):
    opt = parse_opt(argv)
    set_verbosity(opt.quiet)
    opt = apply_training_settings(opt)
    if opt.task in ("train", "val", "test"):
        return run(**vars(opt))
    if opt.task == "speed":
        return run(**{**vars(opt), "conf_thres": 0.25, "iou_thres": 0.45, "save_json": False, "plots": False})
    if opt.task == "study":
        return study(opt)
    raise UserError(f"--task must be one of {TASKS}, got '{opt.task}'")


if __name__ == "__main__":
    main()
