"""Box conversions, letterbox <-> original scaling, and NMS against a brute-force reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.augmentations import letterbox
from utils.boxes import scale_boxes, xywh2xyxy, xywhn2xyxy, xyxy2xywh, xyxy2xywhn
from utils.nms import non_max_suppression


def test_conversions_round_trip():
    rng = np.random.default_rng(0)
    xyxy = np.sort(rng.uniform(0, 500, (20, 4)).reshape(20, 2, 2), axis=1).transpose(0, 2, 1).reshape(20, 4)
    np.testing.assert_allclose(xywh2xyxy(xyxy2xywh(xyxy)), xyxy, atol=1e-9)
    t = torch.tensor(xyxy, dtype=torch.float64)
    torch.testing.assert_close(xywhn2xyxy(xyxy2xywhn(t, w=640, h=480), w=640, h=480), t)


@pytest.mark.parametrize("shape,new", [((1080, 810), 640), ((720, 1280), 640), ((300, 200), 320), ((480, 640), (256, 320))])
@pytest.mark.parametrize("auto", [True, False])
def test_letterbox_and_scale_boxes_round_trip(shape, new, auto):
    im = np.zeros((*shape, 3), np.uint8)
    out, ratio, (dw, dh) = letterbox(im, new, auto=auto, stride=32)
    h, w = out.shape[:2]
    target = (new, new) if isinstance(new, int) else new
    assert h <= target[0] and w <= target[1]
    if auto:
        assert h % 32 == 0 and w % 32 == 0
    else:
        assert (h, w) == tuple(target)
    boxes0 = torch.tensor([[10.0, 20.0, 150.0, 250.0], [0.0, 0.0, shape[1], shape[0]]])
    boxes1 = boxes0.clone()
    boxes1[:, [0, 2]] = boxes1[:, [0, 2]] * ratio[0] + dw
    boxes1[:, [1, 3]] = boxes1[:, [1, 3]] * ratio[1] + dh
    back = scale_boxes(out.shape[:2], boxes1.clone(), shape)
    assert (back - boxes0).abs().max() < 1.0  # within a pixel after padding is rounded


def brute_force_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_thres: float) -> set:
    """Greedy NMS per class, written plainly: the reference the fast path must equal."""
    order = scores.argsort(descending=True).tolist()
    kept = []
    for i in order:
        ok = True
        for j in kept:
            if classes[i] != classes[j]:
                continue
            a, b = boxes[i], boxes[j]
            iw = max(0.0, float(min(a[2], b[2]) - max(a[0], b[0])))
            ih = max(0.0, float(min(a[3], b[3]) - max(a[1], b[1])))
            inter = iw * ih
            union = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
            if inter / union > iou_thres:
                ok = False
                break
        if ok:
            kept.append(i)
    return {tuple(round(v, 3) for v in boxes[i].tolist()) + (int(classes[i]),) for i in kept}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n, nc = 300, 4
    xy = torch.rand(n, 2, generator=g) * 200
    wh = torch.rand(n, 2, generator=g) * 60 + 5
    obj = torch.rand(n, 1, generator=g)
    cls = torch.rand(n, nc, generator=g)
    pred = torch.cat((xy, wh, obj, cls), 1)[None]
    out = non_max_suppression(pred, conf_thres=0.1, iou_thres=0.45, max_det=1000)[0]
    conf, j = (cls * obj).max(1)
    keep = conf > 0.1
    boxes = xywh2xyxy(torch.cat((xy, wh), 1))[keep]
    expected = brute_force_nms(boxes, conf[keep], j[keep], 0.45)
    got = {tuple(round(v, 3) for v in r[:4].tolist()) + (int(r[5]),) for r in out}
    assert got == expected
    assert torch.all(out[:-1, 4] >= out[1:, 4])  # sorted by confidence


def test_nms_multi_label_and_class_filter():
    # one box, two classes above threshold
    pred = torch.tensor([[[50.0, 50.0, 20.0, 20.0, 0.9, 0.8, 0.7, 0.01]]])
    assert len(non_max_suppression(pred, 0.25, 0.45, multi_label=True)[0]) == 2
    single = non_max_suppression(pred, 0.25, 0.45, multi_label=False)[0]
    assert len(single) == 1 and single[0, 5] == 0 and single[0, 4] == pytest.approx(0.72)
    assert len(non_max_suppression(pred, 0.25, 0.45, classes=[2])[0]) == 0
    with pytest.raises(ValueError):
        non_max_suppression(pred, conf_thres=1.5)


def _pred(rows: list[list[float]], nc: int = 2) -> torch.Tensor:
    """(1, n, 5 + nc) Detect-style rows from [x1, y1, x2, y2, score, cls] (obj = score, class prob 1)."""
    out = torch.zeros(1, len(rows), 5 + nc)
    for k, (x1, y1, x2, y2, s, c) in enumerate(rows):
        out[0, k, :5] = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, s])
        out[0, k, 5 + int(c)] = 1.0
    return out


# three pairs far apart; in each, a 100x100 box and one inside it of height h: IoU = h / 100
PAIRS = [[[0, y0, 100, y0 + 100, 0.9, 0], [0, y0, 100, y0 + h, 0.8, 0]] for y0, h in ((0, 25), (300, 50), (600, 75))]


@pytest.mark.parametrize("iou_thres,kept", [(0.1, 3), (0.3, 4), (0.45, 4), (0.6, 5), (0.9, 6)])
def test_nms_iou_threshold_by_hand(iou_thres, kept):
    """IoUs 0.25, 0.5 and 0.75: a pair's second box survives only where its IoU is <= iou_thres."""
    out = non_max_suppression(_pred([r for pair in PAIRS for r in pair]), 0.25, iou_thres)[0]
    assert len(out) == kept
    survivors = sorted(round(float(r[3] - r[1])) for r in out if float(r[4]) < 0.85)
    assert survivors == [h for h in (25, 50, 75) if h / 100 <= iou_thres]


def test_nms_agnostic_merges_classes():
    rows = [[0, 0, 100, 100, 0.9, 0], [0, 0, 100, 90, 0.8, 1], [300, 0, 400, 100, 0.7, 1]]  # first two: IoU 0.9
    per_class = non_max_suppression(_pred(rows), 0.25, 0.45, agnostic=False)[0]
    assert per_class[:, 5].tolist() == [0, 1, 1]  # different classes never suppress each other
    agnostic = non_max_suppression(_pred(rows), 0.25, 0.45, agnostic=True)[0]
    assert agnostic[:, 4].tolist() == pytest.approx([0.9, 0.7]) and agnostic[:, 5].tolist() == [0, 1]


def test_nms_max_det_keeps_the_best():
    rows = [[200 * k, 0, 200 * k + 100, 100, s, k % 2] for k, s in enumerate((0.3, 0.9, 0.5, 0.8, 0.6, 0.4))]
    out = non_max_suppression(_pred(rows), 0.25, 0.45, max_det=4)[0]
    assert out[:, 4].tolist() == pytest.approx([0.9, 0.8, 0.6, 0.5])
    assert len(non_max_suppression(_pred(rows), 0.25, 0.45, max_det=1)[0]) == 1
    assert len(non_max_suppression(_pred(rows), 0.25, 0.45)[0]) == 6


def test_nms_labels_are_added_as_certain_boxes():
    """--save-hybrid: apriori labels (cls, cx, cy, w, h) join their own image's candidates with conf 1."""
    pred = torch.cat((_pred([[0, 0, 100, 100, 0.6, 1]]), _pred([[0, 0, 100, 100, 0.6, 1]])), 0)
    labels = [torch.tensor([[1.0, 52, 50, 100, 100], [0.0, 450, 450, 60, 40]]), torch.zeros((0, 5))]
    out = non_max_suppression(pred, 0.25, 0.45, labels=labels)
    # image 0: the label box (conf 1) suppresses the overlapping prediction of its class; the other label stays
    assert out[0][:, 4].tolist() == pytest.approx([1.0, 1.0]) and sorted(out[0][:, 5].tolist()) == [0, 1]
    torch.testing.assert_close(out[0][out[0][:, 5] == 0, :4], torch.tensor([[420.0, 430, 480, 470]]))
    torch.testing.assert_close(out[0][out[0][:, 5] == 1, :4], torch.tensor([[2.0, 0, 102, 100]]))
    assert len(out[1]) == 1 and out[1][0, 4].item() == pytest.approx(0.6)  # image 1 has no labels


@pytest.mark.parametrize("shape,new,unpad", [((1000, 667), 640, (427, 640)), ((333, 500), 320, (320, 213)),
                                             ((101, 203), 64, (64, 32))])
@pytest.mark.parametrize("auto", [False, True])
def test_letterbox_rounds_sizes_that_do_not_scale_to_integers(shape, new, unpad, auto):
    """667 * 0.64 = 426.88 -> 427 columns (int() would give 426); 333 * 0.64 = 213.1 -> 213; 101 * 64/203
    = 31.8 -> 32. The image area and the returned padding must both follow round()."""
    im = np.full((*shape, 3), 255, np.uint8)
    out, ratio, (dw, dh) = letterbox(im, new, auto=auto, stride=32)
    content = (out == 255).all(2)
    assert (int(content.any(0).sum()), int(content.any(1).sum())) == unpad  # (w, h) of the resized image
    target_w = out.shape[1] if auto else new
    target_h = out.shape[0] if auto else new
    assert dw == pytest.approx((target_w - unpad[0]) / 2) and dh == pytest.approx((target_h - unpad[1]) / 2)
    assert ratio[0] == pytest.approx(min(new / shape[0], new / shape[1]))
