"""Detection metrics: YOLOv5-style per-class AP, confusion matrix, fitness, and a native COCO bbox evaluator.

The YOLOv5 parts (match_predictions, compute_ap, ap_per_class, ConfusionMatrix, fitness) follow the reference
algorithms step by step so that mAP numbers agree with YOLOv5's val.py. COCOStyleEvaluator follows pycocotools'
COCOeval bbox algorithm so AP/APs/APm/APl agree with pycocotools without needing a json round trip.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO mAP@0.5:0.95 thresholds


def _names_dict(names: Mapping[int, str] | Sequence[str] | None) -> dict[int, str]:
    if names is None:
        return {}
    return dict(names) if isinstance(names, Mapping) else dict(enumerate(names))


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


def smooth(y: np.ndarray, f: float = 0.05) -> np.ndarray:
    """Box-filter y with a window of fraction f of its length, padding the ends with edge values."""
    nf = round(len(y) * f * 2) // 2 + 1  # odd window so the output stays aligned with the input
    pad = np.ones(nf // 2)
    yp = np.concatenate((pad * y[0], y, pad * y[-1]))
    return np.convolve(yp, np.ones(nf) / nf, mode="valid")


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

        all_names = _names_dict(names)
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

        return plot_confusion_matrix(self.matrix, Path(save_dir), _names_dict(names), normalize)

    def print(self) -> None:
        for row in self.matrix:
            print(" ".join(f"{v:.0f}" for v in row))


class COCOStyleEvaluator:
    """Native re-implementation of pycocotools' COCOeval for boxes (AP, AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l).

    Feed one image at a time with update(); boxes are xyxy in original-image pixels and a box's area is w*h.
    All ground truths are treated as non-crowd (YOLO labels carry no crowd flag).
    """

    STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

    def __init__(
        self,
        iou_thrs: np.ndarray = IOU_THRESHOLDS,
        max_dets: Sequence[int] = (1, 10, 100),
        area_ranges: Mapping[str, tuple[float, float]] | None = None,
    ):
        self.iou_thrs = np.asarray(iou_thrs, dtype=float)
        self.rec_thrs = np.linspace(0.0, 1.0, 101)
        self.max_dets = list(max_dets)
        if area_ranges is None:
            area_ranges = {"all": (0, 1e10), "small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, 1e10)}
        self.area_ranges = dict(area_ranges)
        self._images: dict[object, tuple[np.ndarray, ...]] = {}

    def __len__(self) -> int:
        """Number of images recorded so far (handy as a running image id)."""
        return len(self._images)

    @staticmethod
    def _np(x, dtype, shape: tuple[int, ...]) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = np.asarray(x if x is not None else np.zeros(shape), dtype=dtype)
        return x.reshape((-1,) + shape[1:]) if x.size == 0 else x

    def update(
        self,
        image_id: int | str,
        pred_xyxy,
        pred_scores,
        pred_classes,
        gt_xyxy,
        gt_classes,
    ) -> None:
        """Record one image's predictions and ground truths (xyxy, original pixels). Each image_id once."""
        if image_id in self._images:
            raise ValueError(f"COCOStyleEvaluator: image_id {image_id!r} was given twice")
        pb = self._np(pred_xyxy, np.float64, (0, 4))
        ps = self._np(pred_scores, np.float64, (0,)).reshape(-1)
        pc = self._np(pred_classes, np.float64, (0,)).reshape(-1).astype(np.int64)
        gb = self._np(gt_xyxy, np.float64, (0, 4))
        gc = self._np(gt_classes, np.float64, (0,)).reshape(-1).astype(np.int64)
        if not (len(pb) == len(ps) == len(pc)) or len(gb) != len(gc):
            raise ValueError(
                f"COCOStyleEvaluator: image {image_id!r} has {len(pb)} boxes/{len(ps)} scores/{len(pc)} classes "
                f"for predictions and {len(gb)} boxes/{len(gc)} classes for ground truth"
            )
        self._images[image_id] = (pb, ps, pc, gb, gc)

    def _image_order(self) -> list:
        ids = list(self._images)
        try:
            return sorted(ids)  # COCOeval visits images in sorted id order, which decides score-tie order
        except TypeError:  # mixed int/str ids: keep insertion order
            return ids

    def _evaluate_image(
        self, ious: np.ndarray, dt_area: np.ndarray, gt_area: np.ndarray, a_rng: tuple[float, float]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Greedy COCO matching for one image/class/area range; dts are already score-sorted and truncated.

        Returns (dt_matched (T, D) bool, dt_ignore (T, D) bool, gt_ignore (G,) bool).
        """
        T, (D, G) = len(self.iou_thrs), ious.shape
        gt_ig = (gt_area < a_rng[0]) | (gt_area > a_rng[1])
        g_order = np.argsort(gt_ig, kind="mergesort")  # ignored gts last, as COCOeval
        gt_ig = gt_ig[g_order]
        ious = ious[:, g_order]
        dtm = np.zeros((T, D), dtype=bool)
        dt_ig = np.zeros((T, D), dtype=bool)
        if D and G:
            gt_taken = np.zeros((T, G), dtype=bool)
            thr = np.minimum(self.iou_thrs, 1 - 1e-10)[:, None]
            rev = np.arange(G)[::-1]
            # a dt below the lowest threshold with every gt can match nothing: skip it (most low-score dts)
            for d in np.nonzero(ious.max(1) >= thr.min())[0]:
                ok = (~gt_taken) & (ious[d][None, :] >= thr)  # (T, G) candidates at each threshold
                # COCOeval prefers any regular gt over ignored ones and, among equals, the best IoU with ties
                # going to the later gt; scoring reversed columns with argmax reproduces that choice.
                score = np.where(ok, ious[d][None, :], -1.0)
                reg = np.where(~gt_ig[None, :], score, -1.0)
                has_reg = (reg >= 0).any(1)
                pick_src = np.where(has_reg[:, None], reg, score)
                m = rev[np.argmax(pick_src[:, ::-1], axis=1)]
                found = pick_src[np.arange(T), m] >= 0
                t_idx = np.nonzero(found)[0]
                dtm[t_idx, d] = True
                dt_ig[t_idx, d] = gt_ig[m[t_idx]]
                gt_taken[t_idx, m[t_idx]] = True
        out_of_range = (dt_area < a_rng[0]) | (dt_area > a_rng[1])
        dt_ig |= (~dtm) & out_of_range[None, :]
        return dtm, dt_ig, gt_ig

    def evaluate(self) -> dict[str, np.ndarray]:
        """Run matching and accumulation; returns {'precision': (T, R, K, A, M), 'recall': (T, K, A, M)}."""
        T, R, A, M = len(self.iou_thrs), len(self.rec_thrs), len(self.area_ranges), len(self.max_dets)
        max_det = max(self.max_dets)
        a_rngs = list(self.area_ranges.values())
        img_ids = self._image_order()
        classes = sorted({int(c) for v in self._images.values() for c in np.concatenate((v[2], v[4]))})
        K = len(classes)
        precision = -np.ones((T, R, K, A, M))
        recall = -np.ones((T, K, A, M))
        # per (class, area): lists over images of (scores, dtm, dt_ig, gt_ig)
        per_ka: dict[tuple[int, int], list] = {(k, a): [] for k in range(K) for a in range(A)}
        k_of = {c: k for k, c in enumerate(classes)}

        for img in img_ids:
            pb, ps, pc, gb, gc = self._images[img]
            for c in np.unique(np.concatenate((pc, gc))):
                k = k_of[int(c)]
                di = np.nonzero(pc == c)[0]
                di = di[np.argsort(-ps[di], kind="mergesort")][:max_det]
                gi = np.nonzero(gc == c)[0]
                dbox, gbox = pb[di], gb[gi]
                ious = box_iou(torch.from_numpy(dbox), torch.from_numpy(gbox)).numpy()
                ious = np.nan_to_num(ious, nan=0.0)  # zero-area boxes overlap nothing
                d_area = (dbox[:, 2] - dbox[:, 0]) * (dbox[:, 3] - dbox[:, 1])
                g_area = (gbox[:, 2] - gbox[:, 0]) * (gbox[:, 3] - gbox[:, 1])
                for a, rng in enumerate(a_rngs):
                    dtm, dt_ig, gt_ig = self._evaluate_image(ious, d_area, g_area, rng)
                    per_ka[(k, a)].append((ps[di], dtm, dt_ig, gt_ig))

        for (k, a), entries in per_ka.items():
            if not entries:
                continue
            gt_ig = np.concatenate([e[3] for e in entries])
            npig = int(np.count_nonzero(~gt_ig))
            if npig == 0:
                continue
            for m, md in enumerate(self.max_dets):
                scores = np.concatenate([e[0][:md] for e in entries])
                order = np.argsort(-scores, kind="mergesort")
                dtm = np.concatenate([e[1][:, :md] for e in entries], axis=1)[:, order]
                dt_ig = np.concatenate([e[2][:, :md] for e in entries], axis=1)[:, order]
                tps = np.cumsum(dtm & ~dt_ig, axis=1).astype(float)
                fps = np.cumsum(~dtm & ~dt_ig, axis=1).astype(float)
                for t in range(T):
                    tp, fp = tps[t], fps[t]
                    nd = len(tp)
                    rc = tp / npig
                    pr = tp / (fp + tp + np.spacing(1))
                    recall[t, k, a, m] = rc[-1] if nd else 0
                    pr = np.flip(np.maximum.accumulate(np.flip(pr)))  # precision envelope
                    q = np.zeros(R)
                    inds = np.searchsorted(rc, self.rec_thrs, side="left")
                    valid = inds < nd  # recall levels never reached keep precision 0
                    q[valid] = pr[inds[valid]]
                    precision[t, :, k, a, m] = q
        return {"precision": precision, "recall": recall}

    def summarize(self) -> dict[str, float]:
        """The 12 COCO summary numbers keyed by STAT_KEYS; -1 where undefined (no gts in that range)."""
        ev = self.evaluate()
        area_names = list(self.area_ranges)

        def stat(ap: bool, iou: float | None = None, area: str = "all", max_det: int | None = None) -> float:
            if area not in area_names:
                return -1.0
            a = area_names.index(area)
            m = self.max_dets.index(self.max_dets[-1] if max_det is None else max_det)
            s = ev["precision"][..., a, m] if ap else ev["recall"][..., a, m]
            if iou is not None:
                s = s[np.isclose(self.iou_thrs, iou)]
            s = s[s > -1]
            return float(np.mean(s)) if s.size else -1.0

        d1, d10 = self.max_dets[0], self.max_dets[min(1, len(self.max_dets) - 1)]
        vals = [
            stat(True),
            stat(True, 0.5),
            stat(True, 0.75),
            stat(True, area="small"),
            stat(True, area="medium"),
            stat(True, area="large"),
            stat(False, max_det=d1),
            stat(False, max_det=d10),
            stat(False),
            stat(False, area="small"),
            stat(False, area="medium"),
            stat(False, area="large"),
        ]
        return dict(zip(self.STAT_KEYS, vals))

    def format_summary(self, stats: Mapping[str, float]) -> str:
        """The 12 lines pycocotools prints, for stats from summarize()."""
        iou_all = f"{self.iou_thrs[0]:0.2f}:{self.iou_thrs[-1]:0.2f}"
        d1, d10, big = self.max_dets[0], self.max_dets[min(1, len(self.max_dets) - 1)], self.max_dets[-1]
        rows = [  # (kind, iou, area, maxDets) per STAT_KEYS entry
            ("AP", iou_all, "all", big), ("AP", "0.50", "all", big), ("AP", "0.75", "all", big),
            ("AP", iou_all, "small", big), ("AP", iou_all, "medium", big), ("AP", iou_all, "large", big),
            ("AR", iou_all, "all", d1), ("AR", iou_all, "all", d10), ("AR", iou_all, "all", big),
            ("AR", iou_all, "small", big), ("AR", iou_all, "medium", big), ("AR", iou_all, "large", big),
        ]
        lines = []
        for key, (kind, iou, area, md) in zip(self.STAT_KEYS, rows):
            title = "Average Precision" if kind == "AP" else "Average Recall"
            lines.append(f" {title:<18} ({kind}) @[ IoU={iou:<9} | area={area:>6s} | maxDets={md:>3d} ] = {stats[key]:0.3f}")
        return "\n".join(lines)
