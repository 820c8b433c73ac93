"""YOLOv5-style metrics (utils/metrics.py) on hand-made cases, the COCO evaluator on hand cases, and the plots."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from utils.coco import COCOStyleEvaluator
from utils.errors import UserError
from utils.metrics import (
    ConfusionMatrix,
    ap_per_class,
    compute_ap,
    fitness,
    match_predictions,
    smooth,
)
from utils.plots import plot_images, plot_labels, plot_results

IOUV = torch.linspace(0.5, 0.95, 10)


# --- match_predictions ------------------------------------------------------------------------------------

def test_match_predictions_hand_boxes():
    labels = torch.tensor([[0, 0, 0, 10, 10], [1, 20, 20, 30, 30]], dtype=torch.float32)
    dets = torch.tensor(
        [
            [0, 0, 10, 10, 0.9, 0],  # exact hit on label 0
            [0, 0, 10, 8, 0.8, 0],  # IoU 0.8 with label 0, but label 0 is already taken by the exact hit
            [20, 20, 30, 30, 0.7, 0],  # right place, wrong class
            [20.8, 20, 30, 30, 0.6, 1],  # IoU 0.92 with label 1
        ]
    )
    c = match_predictions(dets, labels, IOUV)
    assert c.shape == (4, 10) and c.dtype == torch.bool
    assert c[0].all()
    assert not c[1].any() and not c[2].any()
    assert c[3].tolist() == [True] * 9 + [False]  # 0.92 >= thresholds 0.5..0.9, < 0.95


def test_match_predictions_reference_label_order():
    # Two detections on one label: YOLOv5 dedupes labels in detection-index order after the detection pass, so
    # the lower-IoU detection with the smaller index wins wherever both qualify.
    labels = torch.tensor([[0, 0, 0, 10, 10]], dtype=torch.float32)
    dets = torch.tensor([[0, 0, 10, 6.2, 0.5, 0], [0, 0, 10, 9.2, 0.9, 0]])  # IoU 0.62 and 0.92
    c = match_predictions(dets, labels, IOUV)
    assert c[0].tolist() == [True, True, True] + [False] * 7  # thresholds 0.5, 0.55, 0.6
    assert c[1].tolist() == [False] * 3 + [True] * 6 + [False]  # 0.65 .. 0.9
    assert c.sum(0).tolist() == [1] * 9 + [0]  # exactly one TP per threshold up to 0.9


def test_match_predictions_empty():
    assert match_predictions(torch.zeros(0, 6), torch.zeros(3, 5), IOUV).shape == (0, 10)
    assert not match_predictions(torch.rand(2, 6), torch.zeros(0, 5), IOUV).any()


# --- compute_ap / ap_per_class ----------------------------------------------------------------------------

def test_compute_ap_perfect():
    # Perfect detection: YOLOv5's sentinel point (recall 1, precision 0) coincides with the last real point, and
    # np.interp returns the sentinel's 0 at x = 1, so the last trapezoid is halved: AP = 1 - 0.01/2 = 0.995.
    # YOLOv5 reports the same 0.995 mAP@0.5 for perfect predictions; pycocotools/COCOStyleEvaluator give 1.0.
    ap, mpre, mrec = compute_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0]))
    assert ap == pytest.approx(0.995)
    assert mrec.tolist() == [0, 0.5, 1, 1] and mpre.tolist() == [1, 1, 1, 0]


def test_ap_one_false_positive_hand_computed():
    # 3 labels; ranked detections TP, FP, TP -> recall 1/3, 1/3, 2/3; precision 1, 1/2, 2/3.
    # Sentinel curve mrec = [0, 1/3, 1/3, 2/3, 1], envelope mpre = [1, 1, 2/3, 2/3, 0].
    # Sampled at x = 0, 0.01, ..., 1: 1 for x <= 1/3, 2/3 up to x = 2/3, then the line 2(1 - x) down to 0.
    x = np.linspace(0, 1, 101)
    y = np.where(x <= 1 / 3, 1.0, np.where(x <= 2 / 3, 2 / 3, 2 * (1 - x)))
    expected = sum((y[i] + y[i + 1]) / 2 * 0.01 for i in range(100))  # trapezoid rule written out
    assert expected == pytest.approx(0.33 + 0.0083333 + 0.2133333 + 0.0066333 + 0.1089, abs=1e-6)

    tp = np.array([[1], [0], [1]])
    conf = np.array([0.9, 0.8, 0.7])
    out_tp, out_fp, p, r, f1, ap, classes = ap_per_class(tp, conf, np.zeros(3), np.zeros(3))
    assert ap[0, 0] == pytest.approx(expected, abs=1e-9)
    assert classes.tolist() == [0]
    assert compute_ap(np.array([1 / 3, 1 / 3, 2 / 3]), np.array([1, 0.5, 2 / 3]))[0] == pytest.approx(expected)


def test_ap_per_class_perfect_missing_and_extra_classes():
    # class 0: 2 labels both found; class 1: 1 label never predicted; class 5: predicted but has no labels
    tp = np.array([[1, 1], [1, 1], [0, 0]], dtype=bool)
    conf = np.array([0.9, 0.8, 0.95])
    pred_cls = np.array([0, 0, 5])
    target_cls = np.array([0, 0, 1])
    out_tp, out_fp, p, r, f1, ap, classes = ap_per_class(tp, conf, pred_cls, target_cls)
    assert classes.tolist() == [0, 1]
    assert ap[0].tolist() == pytest.approx([0.995, 0.995]) and ap[1].tolist() == [0.0, 0.0]  # see above
    assert p[0] == pytest.approx(1.0) and r[0] == pytest.approx(1.0) and r[1] == 0
    assert out_tp.tolist() == [2, 0] and out_fp[0] == 0


def test_ap_per_class_picks_f1_maximising_confidence():
    # class 0 with 4 labels: 4 confident TPs then 4 low-confidence FPs. Recall saturates at conf 0.6, so the
    # smoothed-F1 choice must report full recall with clearly better precision than taking every detection.
    tp = np.array([[1]] * 4 + [[0]] * 4)
    conf = np.array([0.9, 0.85, 0.8, 0.75, 0.1, 0.08, 0.06, 0.04])
    out_tp, out_fp, p, r, f1, ap, _ = ap_per_class(tp, conf, np.zeros(8), np.zeros(4))
    assert r[0] == pytest.approx(1.0, abs=0.01) and p[0] > 0.9
    assert out_tp[0] == 4 and out_fp[0] == 0
    assert ap[0, 0] == pytest.approx(0.995)


def test_ap_per_class_degenerate_inputs():
    out = ap_per_class(np.zeros((0, 10)), np.zeros(0), np.zeros(0), np.array([0, 1]))  # no predictions
    assert out[5].shape == (2, 10) and not out[5].any()
    out = ap_per_class(np.ones((2, 10)), np.ones(2), np.zeros(2), np.zeros(0))  # no labels
    assert out[5].shape == (0, 10) and len(out[6]) == 0


def test_smooth_keeps_length_and_constant():
    y = np.full(1000, 0.3)
    assert smooth(y, 0.1).shape == (1000,) and np.allclose(smooth(y, 0.1), 0.3)
    step = np.r_[np.zeros(500), np.ones(500)]
    s = smooth(step, 0.1)
    assert 0 < s[500] < 1 and s[0] == 0 and s[-1] == 1


def test_fitness_weights():
    x = np.array([[0.5, 0.5, 0.6, 0.4], [1, 1, 0, 0]])
    assert fitness(x).tolist() == pytest.approx([0.1 * 0.6 + 0.9 * 0.4, 0.0])


# --- ConfusionMatrix --------------------------------------------------------------------------------------

def test_confusion_matrix_counts(tmp_path, saved_figures):
    cm = ConfusionMatrix(nc=2, conf=0.25, iou_thres=0.45)
    labels = torch.tensor([[0, 0, 0, 10, 10], [1, 20, 20, 30, 30], [1, 50, 50, 60, 60]], dtype=torch.float32)
    dets = torch.tensor(
        [
            [0, 0, 10, 10, 0.9, 0],  # correct class 0
            [20, 20, 30, 30, 0.8, 0],  # label 1 predicted as 0
            [80, 80, 90, 90, 0.9, 1],  # nothing there: FP of class 1
            [50, 50, 60, 60, 0.1, 1],  # below conf: dropped, so the third label is missed
        ]
    )
    cm.process_batch(dets, labels)
    expected = np.zeros((3, 3))
    expected[0, 0] = expected[0, 1] = expected[2, 1] = expected[1, 2] = 1
    assert (cm.matrix == expected).all()
    tp, fp = cm.tp_fp()
    assert tp.tolist() == [1, 0] and fp.tolist() == [1, 1]

    cm.process_batch(None, torch.tensor([0, 1, 1]))  # image without detections: all labels missed
    assert cm.matrix[2].tolist() == [1, 3, 0]
    cm.process_batch(torch.tensor([[0, 0, 5, 5, 0.9, 0]]), torch.zeros(0, 5))  # label-free image: FP
    assert cm.matrix[0, 2] == 1

    out = cm.plot(save_dir=tmp_path, names={0: "a", 1: "b"})
    assert out.name == "confusion_matrix.png" and cv2.imread(str(out)) is not None
    # the heatmap shows each column (true class) normalised to 1, near-zero cells left blank
    ax = saved_figures["confusion_matrix.png"].axes[0]
    norm = cm.matrix / cm.matrix.sum(0, keepdims=True)
    assert [t.get_text() for t in ax.texts] == [f"{v:.2f}" for v in norm.flatten() if v >= 0.005]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "background"]


# --- COCOStyleEvaluator (utils/coco.py) on hand cases (the cross-check on coco128 lives in test_coco.py) -----------------

def test_coco_style_evaluator_hand_cases():
    ev = COCOStyleEvaluator()
    small = np.array([[10, 10, 20, 20]], dtype=float)  # area 100 < 32^2
    large = np.array([[0, 0, 200, 200]], dtype=float)  # area 40000 > 96^2
    ev.update(1, small, [0.9], [0], small, [0])
    ev.update(2, large, [0.8], [1], large, [1])
    s = ev.summarize()
    assert s["AP"] == pytest.approx(1.0) and s["APs"] == pytest.approx(1.0) and s["APl"] == pytest.approx(1.0)
    assert s["APm"] == -1 and s["ARm"] == -1  # no medium ground truth: undefined, as pycocotools reports

    ev = COCOStyleEvaluator()
    ev.update(1, small + 100, [0.9], [0], small, [0])  # misses entirely
    ev.update(2, np.zeros((0, 4)), [], [], large, [1])
    s = ev.summarize()
    assert s["AP"] == 0 and s["AR100"] == 0
    assert len(ev) == 2
    ev.update(3, None, None, None, small, [0])  # no predictions given as None
    with pytest.raises(ValueError, match="twice"):
        ev.update(1, small, [0.9], [0], small, [0])


def test_coco_style_evaluator_half_iou_box():
    # IoU exactly 0.5625 (box 10x10 vs 10x7.5 ... ) counts at 0.5 and 0.55 only -> AP = 2/10
    ev = COCOStyleEvaluator()
    gt = np.array([[0, 0, 40, 40]], dtype=float)
    pred = np.array([[0, 0, 40, 22.5]], dtype=float)  # IoU 22.5/40 = 0.5625
    ev.update(7, pred, [0.5], [3], gt, [3])
    s = ev.summarize()
    assert s["AP50"] == pytest.approx(1.0) and s["AP75"] == 0
    assert s["AP"] == pytest.approx(0.2)


# --- plots ------------------------------------------------------------------------------------------------

@pytest.fixture
def saved_figures(monkeypatch):
    """Every matplotlib Figure saved during the test, by file name, still inspectable (lines, bars, titles)."""
    from matplotlib.figure import Figure

    figs: dict[str, Figure] = {}
    real = Figure.savefig

    def record(self, fname, *a, **k):
        figs[Path(fname).name] = self
        return real(self, fname, *a, **k)

    monkeypatch.setattr(Figure, "savefig", record)
    return figs


def test_ap_per_class_writes_curves(tmp_path, saved_figures):
    rng = np.random.default_rng(0)
    tp = rng.random((60, 10)) < 0.6
    conf = rng.random(60)
    pred_cls = rng.integers(0, 3, 60)
    target_cls = rng.integers(0, 3, 40)
    _, _, p, r, f1, ap, cls = ap_per_class(tp, conf, pred_cls, target_cls, plot=True, save_dir=tmp_path,
                                           names={0: "a", 1: "b", 2: "c"})
    for name in ("PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png"):
        assert cv2.imread(str(tmp_path / name)) is not None  # a real image was written
    # PR curve: one line per class labelled with its AP@0.5, then their mean labelled with the mAP@0.5
    lines = saved_figures["PR_curve.png"].axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == [f"{n} {ap[i, 0]:.3f}" for i, n in enumerate("abc")] + [
        f"all classes {ap[:, 0].mean():.3f} mAP@0.5"]
    per_class = np.stack([ln.get_ydata() for ln in lines[:3]])
    np.testing.assert_allclose(lines[3].get_ydata(), per_class.mean(0))
    assert (np.diff(per_class, axis=1) <= 1e-12).all()  # interpolated precision never rises with recall
    for i in range(3):  # the area under each plotted curve is that class's AP@0.5 (101-point vs 1000-point)
        assert np.trapezoid(per_class[i], lines[i].get_xdata()) == pytest.approx(ap[i, 0], abs=0.02)
    # recall vs confidence: never rises as the threshold rises, starts at each class's final recall
    r_lines = saved_figures["R_curve.png"].axes[0].get_lines()[:3]
    for i, ln in enumerate(r_lines):
        y = ln.get_ydata()
        assert (np.diff(y) <= 1e-12).all()
        keep = pred_cls == cls[i]
        assert y[0] == pytest.approx(tp[keep, 0].sum() / (target_cls == cls[i]).sum(), rel=1e-6)
    # the F1 legend states the maximum of the smoothed mean F1 and where it is
    f1_mean = saved_figures["F1_curve.png"].axes[0].get_lines()[-1]
    k = int(np.argmax(f1_mean.get_ydata()))
    assert f1_mean.get_label() == f"all classes {f1_mean.get_ydata()[k]:.2f} at {f1_mean.get_xdata()[k]:.3f}"
    np.testing.assert_allclose(f1, 2 * p * r / (p + r + 1e-16))


def test_plot_images_mosaic(tmp_path):
    imgs = torch.zeros(3, 3, 64, 96, dtype=torch.uint8)
    labels = torch.tensor([[0, 1, 0.5, 0.5, 0.5, 0.5], [2, 0, 0.2, 0.3, 0.2, 0.2]])
    f = plot_images(imgs, labels, paths=["a.jpg", "b.jpg", "c.jpg"], fname=tmp_path / "b_labels.jpg", names=["x", "y"])
    im = cv2.imread(str(f))
    assert im.shape == (128, 192, 3)  # 2x2 grid of 64x96 tiles
    assert (im[20:44, 30:66] != 0).any()  # the label box of image 0 was drawn on its black tile

    preds = np.array([[1, 0, 48, 32, 40, 30, 0.9], [1, 0, 10, 10, 8, 8, 0.1]])  # pixel xywh + conf
    f = plot_images(imgs.float() / 255, preds, fname=tmp_path / "b_pred.jpg", max_size=96)
    im = cv2.imread(str(f))
    assert im.shape == (64, 96, 3)  # long side capped at max_size: tiles halved to 32x48
    # rows are for image 1 (top-right tile, x offset 48): its pixel box, halved, spans x 62..82, y 8..24
    assert im[6:26, 60:85].max() > 100
    assert im[6:26, 8:40].max() < 60  # image 0's tile got no box


def test_plot_results_and_labels(tmp_path, saved_figures):
    cols = ["epoch", "train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision",
            "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "metrics/APs", "val/box_loss",
            "val/obj_loss", "val/cls_loss", "x/lr0"]
    rows = [[e] + [round(0.1 * e + k * 0.01, 4) for k in range(len(cols) - 1)] for e in range(6)]
    csv = tmp_path / "results.csv"
    csv.write_text(",".join(f"{c:>20}" for c in cols) + "\n" + "\n".join(",".join(map(str, r)) for r in rows))
    out = plot_results(csv)
    assert out == tmp_path / "results.png" and cv2.imread(str(out)) is not None
    # one panel per metric/loss column (the x/ learning-rate column is not a result), each plotting that column
    axes = saved_figures["results.png"].axes
    assert sorted(ax.get_title() for ax in axes) == sorted(cols[1:-1])
    for ax in axes:
        k = cols.index(ax.get_title())
        line = ax.get_lines()[0]
        np.testing.assert_allclose(line.get_xdata(), range(6))
        np.testing.assert_allclose(line.get_ydata(), [r[k] for r in rows])
    with pytest.raises(UserError):
        plot_results(tmp_path / "nope.csv")

    labels = np.array([[0, 0.5, 0.5, 0.2, 0.3], [1, 0.2, 0.7, 0.1, 0.1], [1, 0.8, 0.1, 0.05, 0.4]])
    out = plot_labels(labels, names=["a", "b"], save_dir=tmp_path)
    assert out == tmp_path / "labels.jpg" and cv2.imread(str(out)) is not None
    fig = saved_figures["labels.jpg"]
    assert [b.get_height() for b in fig.axes[0].patches] == [1, 2]  # instances per class
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", "b"]
    canvas = fig.axes[1].get_images()[0].get_array()  # box outlines drawn centred on a white 1000x1000 canvas
    assert (np.asarray(canvas)[350, 400:600] != 255).any() and (np.asarray(canvas)[500, 500] == 255).all()
    plot_labels(np.zeros((0, 5)), save_dir=tmp_path / "empty")
    texts = [t.get_text() for ax in saved_figures["labels.jpg"].axes for t in ax.texts]
    assert texts == ["no labels"] * 4


def test_metrics_and_plots_do_not_import_each_other():
    """plots draws metrics' curves, metrics calls plots when asked to plot: one direction only, no cycle."""
    import ast

    import utils.metrics
    import utils.plots

    def imported(mod) -> set[str]:
        tree = ast.parse(Path(mod.__file__).read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert "utils.plots" in imported(utils.metrics)  # lazily, for plot=True
    assert "utils.metrics" not in imported(utils.plots)


def test_background_plots_draw_in_a_child_and_a_failing_plot_costs_a_warning(tmp_path, monkeypatch):
    from utils import plots

    warnings = []
    monkeypatch.setattr(plots.LOGGER, "warning", warnings.append)
    bg = plots.BackgroundPlots()
    assert bg._fork  # Linux: a forked child draws
    bg.submit(plots.plot_confusion_matrix, np.eye(3) * 5, tmp_path / "good", {0: "a", 1: "b"})
    bg.submit(plots.plot_confusion_matrix, np.eye(3)[None], tmp_path / "bad")  # 3-D: cannot be drawn
    bg.join()
    assert cv2.imread(str(tmp_path / "good" / "confusion_matrix.png")) is not None
    assert not (tmp_path / "bad" / "confusion_matrix.png").exists()
    assert len(warnings) == 1 and "plot_confusion_matrix failed" in warnings[0]

    bg._fork = False  # where fork is not available: drawn inline, a failure is still only a warning
    bg.submit(plots.plot_confusion_matrix, np.eye(3)[None], tmp_path / "bad")
    assert len(warnings) == 2 and "plot_confusion_matrix failed" in warnings[1]


def _slow_write(path: Path) -> None:
    import time

    time.sleep(0.5)
    path.write_text("drawn")


def test_background_plots_join_waits_for_every_child(tmp_path):
    from utils.plots import BackgroundPlots

    bg = BackgroundPlots()
    bg.submit(_slow_write, tmp_path / "a.txt")
    bg.submit(_slow_write, tmp_path / "b.txt")
    assert not (tmp_path / "a.txt").exists()  # the caller went on at once
    bg.join()
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text() == "drawn"
