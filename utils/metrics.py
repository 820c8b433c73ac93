"""Detection metrics: YOLOv5-style per-class AP, confusion matrix and fitness.

match_predictions, compute_ap, ap_per_class, ConfusionMatrix and fitness follow the reference algorithms step by
step so that mAP numbers agree with YOLOv5's val.py. COCO's AP/APs/APm/APl come from COCOeval (utils/coco.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from utils.curves import smooth
from utils.names import normalize_names

def _greedy_unique_matches(matches: np.ndarray, resort_before_labels: bool) -> np.ndarray:
    """Reduce [label, detection, iou] candidate rows to one-to-one pairs the way YOLOv5 does.

    Rows are sorted by IoU (highest first), the first row per detection is kept, then the first row per label.
    np.unique returns rows ordered by index, so without re-sorting the label pass sees detection order; YOLOv5's
    val.py relies on that order while its ConfusionMatrix re-sorts by IoU first — both are reproduced here.
    """
    matches = matches[matches[:, 2].argsort()[::-1]]
    matches = matches[np.unique(matches[:, 1], return_index=True)[1]]
    if resort_before_labels:
        matches = matches[matches[:, 2].argsort()[::-1]]
    return matches[np.unique(matches[:, 0], return_index=True)[1]]


def match_predictions(detections: torch.Tensor, labels: torch.Tensor, iouv: torch.Tensor) -> torch.Tensor:
    """Mark each detection correct/incorrect at each IoU threshold (YOLOv5 val.py process_batch).

    detections: (N, 6) x1, y1, x2, y2, conf, cls; labels: (M, 5) cls, x1, y1, x2, y2 (same pixel space);
    iouv: (T,) IoU thresholds. Returns an (N, T) bool tensor on iouv's device.
    """
    correct = np.zeros((detections.shape[0], iouv.shape[0]), dtype=bool)
    if detections.shape[0] and labels.shape[0]:
        iou = box_iou(labels[:, 1:], detections[:, :4])
        same_class = labels[:, 0:1] == detections[:, 5]
        for ti in range(len(iouv)):
            li, di = torch.where((iou >= iouv[ti]) & same_class)
            if li.shape[0] == 0:
                continue
            matches = torch.cat((torch.stack((li, di), 1), iou[li, di][:, None]), 1).cpu().numpy()
            if li.shape[0] > 1:
                matches = _greedy_unique_matches(matches, resort_before_labels=False)
            correct[matches[:, 1].astype(int), ti] = True
    return torch.tensor(correct, dtype=torch.bool, device=iouv.device)


def compute_ap(recall: np.ndarray, precision: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Area under one PR curve with COCO's 101-point interpolation. Returns (ap, mpre, mrec)."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))  # monotone precision envelope
    x = np.linspace(0, 1, 101)
    ap = float(np.trapezoid(np.interp(x, mrec, mpre), x))
    return ap, mpre, mrec


def ap_per_class(
    tp: np.ndarray,
    conf: np.ndarray,
    pred_cls: np.ndarray,
    target_cls: np.ndarray,
    plot: bool = False,
    save_dir: Path | str = Path("."),
    names: Mapping[int, str] | Sequence[str] | None = None,
    eps: float = 1e-16,
    prefix: str = "",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 and AP at every IoU column of tp (YOLOv5 ap_per_class).

    tp: (N, T) bool/0-1 correctness; conf, pred_cls: (N,); target_cls: (L,) classes of all labels.
    Returns (tp, fp, p, r, f1, ap, unique_classes) with p/r/f1 taken at the confidence maximising the
    smoothed mean F1, and ap of shape (nc, T) for the classes present in target_cls.
    """
    tp, conf, pred_cls, target_cls = (np.asarray(a) for a in (tp, conf, pred_cls, target_cls))
    if tp.ndim == 1:
        tp = tp[:, None]
    order = np.argsort(-conf)
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]

    unique_classes, nt = np.unique(target_cls, return_counts=True)
    nc = unique_classes.shape[0]
    px, py = np.linspace(0, 1, 1000), []  # confidence axis for curves; py collects PR curves for plotting
    ap, p, r = np.zeros((nc, tp.shape[1])), np.zeros((nc, 1000)), np.zeros((nc, 1000))
    for ci, c in enumerate(unique_classes):
        i = pred_cls == c
        n_l, n_p = nt[ci], i.sum()
        if n_p == 0 or n_l == 0:
            continue
        fpc = (1 - tp[i]).cumsum(0)
        tpc = tp[i].cumsum(0)
        recall = tpc / (n_l + eps)
        r[ci] = np.interp(-px, -conf[i], recall[:, 0], left=0)  # negated: np.interp needs increasing x
        precision = tpc / (tpc + fpc)
        p[ci] = np.interp(-px, -conf[i], precision[:, 0], left=1)
        for j in range(tp.shape[1]):
            ap[ci, j], mpre, mrec = compute_ap(recall[:, j], precision[:, j])
            if plot and j == 0:
                py.append(np.interp(px, mrec, mpre))  # precision at recall px, for the PR plot

    f1 = 2 * p * r / (p + r + eps)
    if plot:
        from utils.plots import plot_mc_curve, plot_pr_curve  # lazy: matplotlib only when plotting

        all_names = normalize_names(names)
        present = {k: v for k, v in all_names.items() if k in unique_classes}
        curve_names = dict(enumerate(present.values()))
        save_dir = Path(save_dir)
        plot_pr_curve(px, py, ap, save_dir / f"{prefix}PR_curve.png", curve_names)
        plot_mc_curve(px, f1, save_dir / f"{prefix}F1_curve.png", curve_names, ylabel="F1")
        plot_mc_curve(px, p, save_dir / f"{prefix}P_curve.png", curve_names, ylabel="Precision")
        plot_mc_curve(px, r, save_dir / f"{prefix}R_curve.png", curve_names, ylabel="Recall")

    mean_f1 = f1.mean(0) if nc else np.zeros(len(px))  # no labels at all: nothing to average
    i = smooth(mean_f1, 0.1).argmax()  # one shared confidence for all classes: max smoothed mean F1
    p, r, f1 = p[:, i], r[:, i], f1[:, i]
    tp = (r * nt).round()
    fp = (tp / (p + eps) - tp).round()
    return tp, fp, p, r, f1, ap, unique_classes.astype(int)


def fitness(x: np.ndarray) -> np.ndarray:
    """Model fitness as YOLOv5 weighs it: 0.1 * mAP@0.5 + 0.9 * mAP@0.5:0.95 over columns [P, R, mAP50, mAP]."""
    w = np.array([0.0, 0.0, 0.1, 0.9])
    x = np.asarray(x, dtype=float)
    return (x[..., :4] * w).sum(-1)


class ConfusionMatrix:
    """Detection confusion matrix with a background class (YOLOv5 semantics).

    matrix[pred, true]: row/column nc is background. A label with no matching detection counts as
    (background, true); a detection above conf matching no label counts as (pred, background).
    """

    def __init__(self, nc: int, conf: float = 0.25, iou_thres: float = 0.45):
        self.nc = nc
        self.conf = conf
        self.iou_thres = iou_thres
        self.matrix = np.zeros((nc + 1, nc + 1))

    def process_batch(self, detections: torch.Tensor | None, labels: torch.Tensor) -> None:
        """Add one image. detections: (N, 6) x1, y1, x2, y2, conf, cls or None (then every label is missed);
        labels: (M, 5) cls, x1, y1, x2, y2 — or just the (M,) classes when detections is None."""
        if detections is None:
            classes = labels[:, 0] if labels.ndim == 2 else labels
            for gc in classes.int().tolist():
                self.matrix[self.nc, gc] += 1
            return

        detections = detections[detections[:, 4] > self.conf]
        gt_classes = labels[:, 0].int().tolist()
        det_classes = detections[:, 5].int().tolist()
        iou = box_iou(labels[:, 1:], detections[:, :4])
        li, di = torch.where(iou > self.iou_thres)
        if li.shape[0]:
            matches = torch.cat((torch.stack((li, di), 1), iou[li, di][:, None]), 1).cpu().numpy()
            if li.shape[0] > 1:
                matches = _greedy_unique_matches(matches, resort_before_labels=True)
        else:
            matches = np.zeros((0, 3))
        m_label, m_det = matches[:, 0].astype(int), matches[:, 1].astype(int)

        for i, gc in enumerate(gt_classes):
            hit = m_label == i
            if hit.sum() == 1:
                self.matrix[det_classes[int(m_det[hit][0])], gc] += 1
            else:
                self.matrix[self.nc, gc] += 1  # missed: predicted background
        # Unmatched detections are false positives even when nothing in the image matched; the reference
        # skipped them in that case, which hid FPs on label-free images.
        for i, dc in enumerate(det_classes):
            if not (m_det == i).any():
                self.matrix[dc, self.nc] += 1

    def tp_fp(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-class true positives and false positives (background excluded)."""
        tp = self.matrix.diagonal()
        fp = self.matrix.sum(1) - tp
        return tp[:-1], fp[:-1]

    def plot(
        self,
        normalize: bool = True,
        save_dir: Path | str = Path("."),
        names: Mapping[int, str] | Sequence[str] | None = None,
    ) -> Path:
        """Save confusion_matrix.png (columns normalised to sum 1 when normalize) and return its path."""
        from utils.plots import plot_confusion_matrix

        return plot_confusion_matrix(self.matrix, Path(save_dir), normalize_names(names), normalize)

    def print(self) -> None:
        for row in self.matrix:
            print(" ".join(f"{v:.0f}" for v in row))
