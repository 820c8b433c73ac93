"""Validate a detection model on a YOLO-format dataset: mAP50, mAP50-95 and small/medium/large AP.

Usage:
    python val.py --weights yolov5n.pt --data ../shared/data/coco128/coco128.yaml --img 640
    python val.py --weights best.onnx --data coco.yaml --save-json      # + pycocotools' 12 numbers
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from models.backends import DetectMultiBackend  # noqa: E402
from utils.boxes import scale_boxes, xywh2xyxy, xyxy2xywh, yolo_label_lines  # noqa: E402
from utils.checkpoints import checkpoint_val_settings  # noqa: E402
from utils.coco import (  # noqa: E402
    COCOStyleEvaluator, append_predictions, coco80_to_coco91_class, run_pycocotools, yolo_labels_to_coco_gt,
)
from utils.data_config import check_dataset  # noqa: E402
from utils.datasets import create_dataloader  # noqa: E402
from utils.errors import UserError, report_user_errors  # noqa: E402
from utils.checks import check_thresholds, check_workers  # noqa: E402
from utils.files import append_text, check_writable, increment_path  # noqa: E402
from utils.names import normalize_names  # noqa: E402
from utils.metrics import ConfusionMatrix, ap_per_class, match_predictions  # noqa: E402
from utils.nms import non_max_suppression  # noqa: E402
from utils.plots import plot_images  # noqa: E402
from utils.torch_utils import check_img_size, select_device, time_sync  # noqa: E402

HEADER = ("%22s" + "%11s" * 6) % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
ROW = "%22s" + "%11i" * 2 + "%11.3g" * 4
TASKS = ("train", "val", "test", "speed", "study")


def format_metric(v: float) -> str:
    """Three significant digits, as YOLOv5's table prints them (7.78e-05, not 0.000); n/a where undefined (-1)."""
    return f"{v:.3g}" if v >= 0 else "n/a"


def is_coco_dataset(data: dict) -> bool:
    val = data.get("val")
    val = val[0] if isinstance(val, list) and val else val
    return isinstance(val, str) and val.replace("\\", "/").endswith("coco/val2017.txt")


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
    model=None,
    dataloader=None,
    save_dir=Path(""),
    plots=True,
    compute_loss=None,
    trust_weights=False,
):
    """Evaluate; returns ((P, R, mAP50, mAP50-95, APs, APm, APl, *val_losses), per-class mAP50-95, (pre, inf, nms) ms).

    Called by train.py with `model` (a DetectionModel) and `dataloader`; otherwise builds both from
    `weights` and `data`.
    """
    training = model is not None
    if training:
        device = next(model.parameters()).device
        half &= device.type != "cpu"
        model.half() if half else model.float()
        stride = int(model.stride.max())
        names = dict(model.names)
        pt = True
    else:
        if task not in TASKS:
            raise UserError(f"--task must be one of {TASKS}, got '{task}'")
        if weights is None:
            raise UserError("--weights is required")
        check_thresholds(conf_thres, iou_thres, max_det)
        check_workers(workers)
        check_writable(project)
        device = select_device(device, batch_size=batch_size)
        save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
        data = check_dataset(data)
        model = DetectMultiBackend(weights, device=device, fp16=half and device.type != "cpu", data=data,
                                   trust_weights=trust_weights)
        half = model.fp16
        stride, names = model.stride, dict(model.names)
        pt = model.fixed_imgsz is None  # rectangular batches for any format that accepts any shape
        imgsz = check_img_size(imgsz, stride)
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
            pt = False  # no rectangular batches for a fixed input shape
        if forced:
            print(f"Note: {Path(str(weights)).name} is a fixed-shape export: evaluating at its export " + " and ".join(forced))
        (save_dir / "labels" if save_txt else save_dir).mkdir(parents=True, exist_ok=True)
    if isinstance(data, (str, Path)):
        data = check_dataset(data)
    model.eval()
    nc = 1 if single_cls else int(data["nc"])
    if not training and not single_cls and len(names) != nc:
        raise UserError(f"{weights} has {len(names)} classes but the dataset has {nc}: pass matching --data or --single-cls")
    data_names = data.get("names") or names
    names = normalize_names(data_names)
    if single_cls:
        names = {0: "item"}
    iouv = torch.linspace(0.5, 0.95, 10, device=device)
    niou = iouv.numel()

    if dataloader is None:
        split = task if task in ("train", "val", "test") else "val"
        if not data.get(split):
            raise UserError(f"dataset has no '{split}' split")
        pad, rect = (0.0, False) if task == "speed" else (0.5, pt)
        dataloader = create_dataloader(data[split], imgsz, batch_size, stride, single_cls, pad=pad, rect=rect,
                                       workers=workers, prefix=f"{split}: ", nc=int(data["nc"]))[0]

    is_coco = is_coco_dataset(data)
    class_map = coco80_to_coco91_class() if is_coco else list(range(1000))
    confusion_matrix = ConfusionMatrix(nc=nc)
    coco_eval = COCOStyleEvaluator()
    seen = 0
    dt = [0.0, 0.0, 0.0]
    loss = torch.zeros(3, device=device)
    stats, jdict, gt_records = [], [], []
    p = r = mp = mr = map50 = ap50 = mapv = 0.0
    bar = tqdm(dataloader, desc=HEADER, bar_format="{l_bar}{bar:10}{r_bar}")
    for batch_i, (im, targets, paths, shapes) in enumerate(bar):
        t1 = time_sync()
        im = im.to(device, non_blocking=True)
        targets = targets.to(device)
        im = (im.half() if half else im.float()) / 255
        nb, _, height, width = im.shape
        t2 = time_sync()
        dt[0] += t2 - t1

        if training:
            out = model(im, augment=augment)
            preds, train_out = (out[0], out[1]) if isinstance(out, (list, tuple)) else (out, None)
        else:
            preds, train_out = model(im, augment=augment), None
        dt[1] += time_sync() - t2

        if compute_loss is not None and train_out is not None:
            loss += compute_loss(train_out, targets)[1]

        targets[:, 2:] *= torch.tensor((width, height, width, height), device=device)
        lb = [targets[targets[:, 0] == i, 1:] for i in range(nb)] if save_hybrid else []
        t3 = time_sync()
        preds = non_max_suppression(preds, conf_thres, iou_thres, labels=lb, multi_label=True, agnostic=single_cls,
                                    max_det=max_det)
        dt[2] += time_sync() - t3

        for si, pred in enumerate(preds):
            labels = targets[targets[:, 0] == si, 1:]
            nl, npr = labels.shape[0], pred.shape[0]
            path, shape = Path(paths[si]), shapes[si][0]
            correct = torch.zeros(npr, niou, dtype=torch.bool, device=device)
            seen += 1
            tbox = xywh2xyxy(labels[:, 1:5])
            scale_boxes(im[si].shape[1:], tbox, shape, shapes[si][1])  # native-space labels
            labelsn = torch.cat((labels[:, 0:1], tbox), 1)
            if save_json:
                gt_records.append((str(path), labelsn.cpu().numpy(), shape))

            if npr == 0:
                if nl:
                    stats.append((correct, *torch.zeros((2, 0), device=device), labels[:, 0]))
                    if plots:
                        confusion_matrix.process_batch(None, labels[:, 0])
                coco_eval.update(len(coco_eval), None, None, None, labelsn[:, 1:], labelsn[:, 0])
                continue

            if single_cls:
                pred[:, 5] = 0
            predn = pred.clone()
            scale_boxes(im[si].shape[1:], predn[:, :4], shape, shapes[si][1])  # native-space predictions
            if nl:
                correct = match_predictions(predn, labelsn, iouv)
                if plots:
                    confusion_matrix.process_batch(predn, labelsn)
            stats.append((correct, pred[:, 4], pred[:, 5], labels[:, 0]))
            coco_eval.update(len(coco_eval), predn[:, :4], predn[:, 4], predn[:, 5], labelsn[:, 1:], labelsn[:, 0])

            if save_txt:
                append_text(save_dir / "labels" / f"{path.stem}.txt",
                            "".join(line + "\n" for line in yolo_label_lines(predn.cpu(), shape, save_conf)))
            if save_json:
                append_predictions(jdict, predn, path, class_map)

        if plots and batch_i < 3:
            plot_images(im, targets, paths, save_dir / f"val_batch{batch_i}_labels.jpg", names)
            pred_rows = [torch.cat((torch.full((len(d), 1), i, device=d.device), d[:, 5:6], xyxy2xywh(d[:, :4]), d[:, 4:5]), 1)
                         for i, d in enumerate(preds)]
            plot_images(im, torch.cat(pred_rows, 0) if pred_rows else torch.zeros((0, 7)), paths,
                        save_dir / f"val_batch{batch_i}_pred.jpg", names)

    # metrics
    stats = [torch.cat(x, 0).cpu().numpy() for x in zip(*stats)]
    ap_class = np.array([], dtype=int)
    ap = np.zeros((0, niou))
    if len(stats) and stats[0].any():
        tp, fp, p, r, f1, ap, ap_class = ap_per_class(*stats, plot=plots, save_dir=save_dir, names=names)
        ap50, ap = ap[:, 0], ap.mean(1)
        mp, mr, map50, mapv = p.mean(), r.mean(), ap50.mean(), ap.mean()
    nt = np.bincount(stats[3].astype(int), minlength=nc) if len(stats) else np.zeros(nc, dtype=int)
    area = coco_eval.summarize()
    aps, apm, apl = (max(area[k], 0.0) for k in ("APs", "APm", "APl"))

    print(HEADER)
    print(ROW % ("all", seen, nt.sum(), mp, mr, map50, mapv))
    if nt.sum() == 0:
        print(f"WARNING: no labels found in {task} set, cannot compute metrics without labels")
    if (verbose or (nc < 50 and not training)) and nc > 1 and len(stats):
        row_of = {int(c): i for i, c in enumerate(ap_class)}
        for c in np.flatnonzero(nt):  # every class with labels, also those without a single true positive
            i = row_of.get(int(c))
            print(ROW % (names[c], seen, nt[c], *((p[i], r[i], ap50[i], ap[i]) if i is not None else (0, 0, 0, 0))))
    fmt = format_metric
    print(f"{'Small objects (COCO areas)':>22}   APs {fmt(area['APs'])}   APm {fmt(area['APm'])}   APl {fmt(area['APl'])}"
          f"   (AP {fmt(area['AP'])}, AP50 {fmt(area['AP50'])}, COCO-style 101-point, maxDets 100)")

    t = tuple(x / max(seen, 1) * 1e3 for x in dt)
    if not training:
        shape = (batch_size, 3, imgsz, imgsz)
        print(f"Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape {shape}" % t)
    if plots:
        confusion_matrix.plot(save_dir=save_dir, names=list(names.values()))

    if save_json and len(jdict):
        pred_json = save_dir / f"{Path(str(weights)).stem if weights else 'model'}_predictions.json"
        pred_json.write_text(json.dumps(jdict))
        print(f"Saved {len(jdict)} predictions to {pred_json}")
        anno_json = Path(data.get("path", "")) / "annotations" / "instances_val2017.json"
        if not (is_coco and anno_json.is_file()):  # any YOLO dataset: write its ground truth as COCO json
            im_files = [g[0] for g in gt_records]
            gt = yolo_labels_to_coco_gt(im_files, [g[1] for g in gt_records], [g[2] for g in gt_records], names,
                                        class_map=class_map)
            anno_json = save_dir / "ground_truth_coco.json"
            anno_json.write_text(json.dumps(gt))
            print(f"Wrote the ground truth as COCO json to {anno_json}")
        try:
            cs = run_pycocotools(anno_json, pred_json)
            mapv, map50 = cs[0], cs[1]
            aps, apm, apl = (max(x, 0.0) for x in cs[3:6])
        except Exception as e:  # pycocotools is a cross-check; its failure must not lose the results above
            print(f"WARNING: pycocotools evaluation failed: {e}")

    model.float()
    if not training:
        n = len(list(save_dir.glob("labels/*.txt")))
        extra = f"\n{n} labels saved to {save_dir / 'labels'}" if save_txt else ""
        print(f"Results saved to {save_dir}{extra}")
    maps = np.zeros(nc) + mapv
    for i, c in enumerate(ap_class):
        maps[c] = ap[i]
    losses = (loss.cpu() / max(len(dataloader), 1)).tolist()
    return (mp, mr, map50, mapv, aps, apm, apl, *losses), maps, t


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
    opt = parser.parse_args(argv)
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

    rows = []
    for size in range(256, 1536 + 128, 128):
        print(f"\nRunning at --imgsz {size}...")
        metrics, _, t = run(**{**vars(opt), "imgsz": size, "task": "val", "plots": False})
        rows.append([size, *metrics[:7], *t])
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
    print(f"Study saved to {out}")


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
        print(f"Using {', '.join(used)} from the training's final validation in {Path(str(opt.weights)).name} "
              f"(pass --batch-size/--img to change)")
    return opt


@report_user_errors
def main(argv: list[str] | None = None):
    opt = apply_training_settings(parse_opt(argv))
    if opt.task in ("train", "val", "test"):
        return run(**vars(opt))
    if opt.task == "speed":
        return run(**{**vars(opt), "conf_thres": 0.25, "iou_thres": 0.45, "save_json": False, "plots": False})
    if opt.task == "study":
        return study(opt)
    raise UserError(f"--task must be one of {TASKS}, got '{opt.task}'")


if __name__ == "__main__":
    main()
