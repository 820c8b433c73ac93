"""Detection evaluation: the prediction loop over a validation loader and the summary of what it found.

`evaluate()` is what val.py runs after preparing a model and a loader, and what training runs after each
epoch on the EMA model. It never changes the precision of the model it is given (on CUDA it autocasts).
`predict_dataset_sliced()` is the loop of sliced validation (--slice): each image at full resolution, tile by
tile, matched against its labels in the image's own pixels.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from models.predictor import Predictor
from utils.boxes import scale_boxes, xywh2xyxy, xyxy2xywh, yolo_label_lines
from utils.coco import COCOStyleEvaluator, append_predictions
from utils.dataset import read_image
from utils.files import append_text
from utils.logging import LOGGER
from utils.metrics import ConfusionMatrix, ap_per_class, match_predictions
from utils.plots import BackgroundPlots, plot_images
from utils.results import ValResult
from utils.sizes import COCO_BINS, SizeBins, format_metric, format_size_table, parse_sizes, plot_size_metrics

HEADER = ("%22s" + "%11s" * 6) % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
ROW = "%22s" + "%11i" * 2 + "%11.3g" * 4
IOU_THRESHOLDS = torch.linspace(0.5, 0.95, 10)  # mAP@0.5:0.95


@dataclass
class EvalOutputs:
    """What the evaluation writes besides the metrics (all off during training)."""

    save_dir: Path = Path("")
    plots: bool = False
    save_txt: bool = False
    save_conf: bool = False
    save_json: bool = False
    class_map: list[int] = field(default_factory=lambda: list(range(1000)))


@dataclass
class EvalRecord:
    """Everything the prediction loop accumulates, per image, for the summary."""

    nc: int
    stats: list = field(default_factory=list)  # (correct, conf, cls, target cls) per image
    coco: COCOStyleEvaluator = field(default_factory=COCOStyleEvaluator)
    confusion: ConfusionMatrix | None = None
    jdict: list = field(default_factory=list)  # COCO json predictions (--save-json)
    gt_records: list = field(default_factory=list)  # (file, native-space labels, shape) for the COCO ground truth
    seen: int = 0
    loss: torch.Tensor | None = None
    speed: tuple[float, float, float] = (0.0, 0.0, 0.0)  # pre-process, inference, NMS ms per image

    def __post_init__(self):
        self.confusion = ConfusionMatrix(nc=self.nc)


def _record_image(rec: EvalRecord, pred: torch.Tensor, labels: torch.Tensor, input_hw, shape, ratio_pad, path: Path,
                  out: EvalOutputs, single_cls: bool, iouv: torch.Tensor) -> None:
    """Match one image's predictions with its labels, both in the image's own pixels."""
    nl, npr = labels.shape[0], pred.shape[0]
    correct = torch.zeros(npr, len(iouv), dtype=torch.bool, device=pred.device)
    rec.seen += 1
    tbox = xywh2xyxy(labels[:, 1:5])
    scale_boxes(input_hw, tbox, shape, ratio_pad)  # native-space labels
    labelsn = torch.cat((labels[:, 0:1], tbox), 1)
    if out.save_json:
        rec.gt_records.append((str(path), labelsn.cpu().numpy(), shape))
    if npr == 0:
        if nl:
            rec.stats.append((correct, *torch.zeros((2, 0), device=pred.device), labels[:, 0]))
            if out.plots:
                rec.confusion.process_batch(None, labels[:, 0])
        rec.coco.update(len(rec.coco), None, None, None, labelsn[:, 1:], labelsn[:, 0])
        return
    if single_cls:
        pred[:, 5] = 0
    predn = Predictor.to_original(pred, input_hw, shape, ratio_pad)
    if nl:
        correct = match_predictions(predn, labelsn, iouv)
        if out.plots:
            rec.confusion.process_batch(predn, labelsn)
    rec.stats.append((correct, pred[:, 4], pred[:, 5], labels[:, 0]))
    rec.coco.update(len(rec.coco), predn[:, :4], predn[:, 4], predn[:, 5], labelsn[:, 1:], labelsn[:, 0])
    if out.save_txt:
        append_text(out.save_dir / "labels" / f"{path.stem}.txt",
                    "".join(line + "\n" for line in yolo_label_lines(predn.cpu(), shape, out.save_conf)))
    if out.save_json:
        append_predictions(rec.jdict, predn, path, out.class_map)


def _plot_batch(batch_i: int, im, targets, paths, dets: list[torch.Tensor], save_dir: Path, names: dict) -> None:
    plot_images(im, targets, paths, save_dir / f"val_batch{batch_i}_labels.jpg", names)
    rows = [torch.cat((torch.full((len(d), 1), i, device=d.device), d[:, 5:6], xyxy2xywh(d[:, :4]), d[:, 4:5]), 1)
            for i, d in enumerate(dets)]
    plot_images(im, torch.cat(rows, 0) if rows else torch.zeros((0, 7)), paths, save_dir / f"val_batch{batch_i}_pred.jpg",
                names)


def predict_dataset(predictor: Predictor, dataloader, nc: int, names: dict, *, single_cls: bool = False,
                    save_hybrid: bool = False, compute_loss: Callable | None = None,
                    out: EvalOutputs | None = None, coco_max_dets: int = 100) -> EvalRecord:
    """The prediction loop: every batch through the predictor, every image's detections matched to its labels."""
    out = out or EvalOutputs()
    rec = EvalRecord(nc=nc, coco=COCOStyleEvaluator(max_dets=coco_max_dets))
    device = predictor.device
    rec.loss = torch.zeros(3, device=device)
    iouv = IOU_THRESHOLDS.to(device)
    for batch_i, (im, targets, paths, shapes) in enumerate(tqdm(dataloader, desc=HEADER, bar_format="{l_bar}{bar:10}{r_bar}")):
        x = predictor.preprocess(im)
        targets = targets.to(device)
        nb, _, height, width = x.shape
        raw, train_out = predictor.forward(x)
        if compute_loss is not None and train_out is not None:
            rec.loss += compute_loss(train_out, targets)[1]
        targets[:, 2:] *= torch.tensor((width, height, width, height), device=device)
        hybrid = [targets[targets[:, 0] == i, 1:] for i in range(nb)] if save_hybrid else None
        dets = predictor.postprocess(raw, labels=hybrid)
        for si, pred in enumerate(dets):
            _record_image(rec, pred, targets[targets[:, 0] == si, 1:], x[si].shape[1:], shapes[si][0], shapes[si][1],
                          Path(paths[si]), out, single_cls, iouv)
        if out.plots and batch_i < 3:
            _plot_batch(batch_i, x, targets, paths, dets, out.save_dir, names)
    rec.loss = rec.loss.cpu() / max(len(dataloader), 1)
    rec.speed = tuple(x / max(rec.seen, 1) * 1e3 for x in predictor.times)
    return rec


def predict_dataset_sliced(predictor: Predictor, dataset, nc: int, names: dict, *, imgsz: int, stride: int,
                           fixed_shape=None, single_cls: bool = False, out: EvalOutputs | None = None,
                           coco_max_dets: int = 100) -> EvalRecord:
    """Sliced validation: every image of `dataset` (a LoadImagesAndLabels) read at full resolution, predicted
    tile by tile by `predictor` (which has a `slicing`), and matched with its untouched labels in original pixels.
    No losses: the tiles have no training targets. An unreadable image is reported and skipped."""
    out = out or EvalOutputs()
    rec = EvalRecord(nc=nc, coco=COCOStyleEvaluator(max_dets=coco_max_dets))
    device = predictor.device
    iouv = IOU_THRESHOLDS.to(device)
    skipped = 0
    for i, f in enumerate(tqdm(dataset.im_files, desc=HEADER, bar_format="{l_bar}{bar:10}{r_bar}")):
        im = read_image(f)
        if im is None:
            LOGGER.warning(f"cannot read image {f}, skipped")
            skipped += 1
            continue
        t0 = time.perf_counter()
        im = np.ascontiguousarray(im[..., ::-1])  # the model takes RGB, as the loader gives it
        predictor.times[0] += time.perf_counter() - t0
        _, pred = predictor.predict_sliced(im, imgsz, stride, fixed_shape)
        h, w = im.shape[:2]
        labels = torch.as_tensor(np.asarray(dataset.labels[i], dtype=np.float32).reshape(-1, 5), device=device).clone()
        labels[:, 1:] *= torch.tensor((w, h, w, h), device=device)  # cls, cx, cy, w, h in original pixels
        identity = ((1.0, 1.0), (0.0, 0.0))  # predictions and labels are both in original pixels already
        if out.plots and i < 3:
            x = torch.from_numpy(im.transpose(2, 0, 1).copy())[None]
            targets = torch.cat((torch.zeros((len(labels), 1), device=device), labels), 1)
            _plot_batch(i, x, targets.cpu(), [f], [pred.cpu()], out.save_dir, names)
        _record_image(rec, pred, labels, (h, w), (h, w), identity, Path(f), out, single_cls, iouv)
    if skipped:
        LOGGER.warning(f"{skipped} of {len(dataset.im_files)} images could not be read and were skipped")
    rec.loss = torch.zeros(3)
    rec.speed = tuple(x / max(rec.seen, 1) * 1e3 for x in predictor.times)
    return rec


def summarize(rec: EvalRecord, names: dict, *, plots: bool = False, save_dir: Path = Path(""), verbose: bool = False,
              per_class: bool = False, task: str = "val", sizes: SizeBins = COCO_BINS) -> ValResult:
    """mAPs from YOLOv5's ap_per_class, COCO area APs and AP/AR per `sizes` bin; prints the table. `per_class`: a
    row per labelled class."""
    nc, sizes = rec.nc, parse_sizes(sizes)
    stats = [torch.cat(x, 0).cpu().numpy() for x in zip(*rec.stats)]
    ap_class, ap = np.array([], dtype=int), np.zeros((0, len(IOU_THRESHOLDS)))
    p = r = ap50 = np.zeros(0)
    mp = mr = map50 = mapv = 0.0
    background = BackgroundPlots()
    if plots:  # drawn on another core while the curves, COCOeval and the size table are computed here
        background.submit(rec.confusion.plot, save_dir=save_dir, names=list(names.values()))
    if len(stats) and stats[0].any():
        tp, fp, p, r, f1, ap, ap_class = ap_per_class(*stats, plot=plots, save_dir=save_dir, names=names)
        ap50, ap = ap[:, 0], ap.mean(1)
        mp, mr, map50, mapv = p.mean(), r.mean(), ap50.mean(), ap.mean()
    nt = np.bincount(stats[3].astype(int), minlength=nc) if len(stats) else np.zeros(nc, dtype=int)
    area = rec.coco.summarize(sizes.area_ranges())  # one COCOeval for the COCO areas and the size bins

    print(HEADER)
    print(ROW % ("all", rec.seen, nt.sum(), mp, mr, map50, mapv))
    if nt.sum() == 0:
        LOGGER.warning(f"no labels found in {task} set, cannot compute metrics without labels")
    if (verbose or per_class) and nc > 1 and len(stats):
        row_of = {int(c): i for i, c in enumerate(ap_class)}
        for c in np.flatnonzero(nt):  # every class with labels, also those without a single true positive
            i = row_of.get(int(c))
            print(ROW % (names[c], rec.seen, nt[c], *((p[i], r[i], ap50[i], ap[i]) if i is not None else (0, 0, 0, 0))))
    fmt = format_metric
    print(f"{'Small objects (COCO areas)':>22}   APs {fmt(area['APs'])}   APm {fmt(area['APm'])}   APl {fmt(area['APl'])}"
          f"   (AP {fmt(area['AP'])}, AP50 {fmt(area['AP50'])}, COCO-style 101-point, maxDets {rec.coco.max_dets})")
    size_metrics = rec.coco.size_metrics(sizes, area)
    print(format_size_table(size_metrics, rec.coco.max_dets))
    if plots:
        plot_size_metrics(size_metrics, save_dir)
    background.join()

    maps = np.zeros(nc) + mapv
    for i, c in enumerate(ap_class):
        maps[c] = ap[i]
    box, obj, cls = rec.loss.tolist() if rec.loss is not None else (0.0, 0.0, 0.0)
    return ValResult(precision=mp, recall=mr, map50=map50, map=mapv, box_loss=box, obj_loss=obj, cls_loss=cls, maps=maps,
                     speed=rec.speed, sizes=size_metrics, **{k.lower(): max(area[k], 0.0) for k in ("APs", "APm", "APl")})


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataloader, nc: int, names: dict, *, conf_thres: float = 0.001,
             iou_thres: float = 0.6, max_det: int = 300, single_cls: bool = False, amp: bool = False,
             compute_loss: Callable | None = None, verbose: bool = False, sizes: SizeBins = COCO_BINS,
             slicing=None, imgsz: int = 640) -> ValResult:
    """Validation during training: `model` (the EMA) is evaluated as it is, autocast on CUDA when `amp`.
    With `slicing` (a utils.slicing.SliceConfig) the loader's images are validated sliced at full resolution."""
    model.eval()
    predictor = Predictor(model, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det, multi_label=True,
                          agnostic=single_cls, amp=amp, slicing=slicing)
    if slicing is not None:
        stride = int(max(model.stride)) if hasattr(model, "stride") else 32
        rec = predict_dataset_sliced(predictor, dataloader.dataset, nc, names, imgsz=imgsz, stride=stride,
                                     single_cls=single_cls)
    else:
        rec = predict_dataset(predictor, dataloader, nc, names, single_cls=single_cls, compute_loss=compute_loss)
    return summarize(rec, names, verbose=verbose, sizes=sizes)
