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
