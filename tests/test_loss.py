"""Tests for utils/loss.py: IoU variants, focal/smoothing, target assignment and the YOLOv5 loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from utils.loss import ComputeLoss, FocalLoss, bbox_iou, scale_loss_gains, smooth_BCE

HYP = dict(cls_pw=1.0, obj_pw=1.0, fl_gamma=0.0, box=0.05, obj=1.0, cls=0.5, anchor_t=4.0)


# ----------------------------------------------------------------------------------- bbox_iou
def test_identical_boxes_give_one_for_every_variant():
    b = torch.tensor([[10.0, 20.0, 30.0, 15.0]])
    for kw in ({}, {"GIoU": True}, {"DIoU": True}, {"CIoU": True}):
        assert bbox_iou(b, b, **kw).item() == pytest.approx(1.0, abs=1e-6)


def test_disjoint_boxes_known_values():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])  # xyxy
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    assert bbox_iou(a, b, xywh=False).item() == pytest.approx(0.0, abs=1e-7)
    # enclosing box 3x1, union 2 -> GIoU = 0 - (3 - 2) / 3
    assert bbox_iou(a, b, xywh=False, GIoU=True).item() == pytest.approx(-1 / 3, abs=1e-6)
    # centre distance^2 = 4, enclosing diagonal^2 = 10; same aspect so CIoU == DIoU
    assert bbox_iou(a, b, xywh=False, DIoU=True).item() == pytest.approx(-0.4, abs=1e-6)
    assert bbox_iou(a, b, xywh=False, CIoU=True).item() == pytest.approx(-0.4, abs=1e-6)


def test_ciou_aspect_term_by_hand_and_xywh_equivalence():
    a_xyxy = torch.tensor([[0.0, 0.0, 2.0, 1.0]])
    b_xyxy = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    iou = 0.5  # inter 1, union 2
    v = 4 / math.pi**2 * (math.atan(1.0) - math.atan(2.0)) ** 2
    alpha = v / (v - iou + 1)
    rho2, c2 = 0.25, 5.0  # centres (1, .5) vs (.5, .5); enclosing box 2x1
    expected = iou - (rho2 / c2 + v * alpha)
    assert bbox_iou(a_xyxy, b_xyxy, xywh=False, CIoU=True).item() == pytest.approx(expected, abs=1e-5)
    a_xywh = torch.tensor([[1.0, 0.5, 2.0, 1.0]])
    b_xywh = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    assert bbox_iou(a_xywh, b_xywh, CIoU=True).item() == pytest.approx(expected, abs=1e-5)


def test_partial_overlap_and_broadcast_shape():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    out = bbox_iou(a, b, xywh=False)
    assert out.shape == (3, 1)
    assert out[:, 0].tolist() == pytest.approx([1 / 7, 1.0, 0.0], abs=1e-6)


def test_ciou_alpha_carries_no_gradient():
    a = torch.tensor([[1.0, 1.0, 2.0, 1.0]], requires_grad=True)
    b = torch.tensor([[1.2, 0.9, 1.0, 1.5]])
    bbox_iou(a, b, CIoU=True).sum().backward()
    g_lib = a.grad.clone()

    # the same formula written out with alpha detached: gradients must agree
    a2 = a.detach().clone().requires_grad_(True)
    x1, y1, w1, h1 = a2[0]
    x2, y2, w2, h2 = b[0]
    iw = (torch.min(x1 + w1 / 2, x2 + w2 / 2) - torch.max(x1 - w1 / 2, x2 - w2 / 2)).clamp(0)
    ih = (torch.min(y1 + h1 / 2, y2 + h2 / 2) - torch.max(y1 - h1 / 2, y2 - h2 / 2)).clamp(0)
    union = w1 * h1 + w2 * h2 - iw * ih + 1e-7
    iou = iw * ih / union
    cw = torch.max(x1 + w1 / 2, x2 + w2 / 2) - torch.min(x1 - w1 / 2, x2 - w2 / 2)
    ch = torch.max(y1 + h1 / 2, y2 + h2 / 2) - torch.min(y1 - h1 / 2, y2 - h2 / 2)
    rho2 = (x2 - x1) ** 2 + (y2 - y1) ** 2
    v = 4 / math.pi**2 * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    alpha = (v / (v - iou + 1 + 1e-7)).detach()
    (iou - (rho2 / (cw**2 + ch**2 + 1e-7) + v * alpha)).backward()
    assert torch.allclose(g_lib, a2.grad, atol=1e-5)


# ----------------------------------------------------------------------- smoothing, focal, gains
def test_smooth_bce_targets():
    assert smooth_BCE(0.1) == pytest.approx((0.95, 0.05))
    assert smooth_BCE(0.0) == (1.0, 0.0)


def test_focal_loss_hand_value_and_reduction():
    fl = FocalLoss(nn.BCEWithLogitsLoss(), gamma=1.5, alpha=0.25)
    pred, true = torch.zeros(4), torch.ones(4)
    # BCE(0, 1) = ln 2; p_t = 0.5; alpha factor 0.25; modulating (1 - 0.5) ** 1.5
    expected = math.log(2) * 0.25 * 0.5**1.5
    assert fl(pred, true).item() == pytest.approx(expected, rel=1e-6)
    assert fl.reduction == "mean" and fl.loss_fcn.reduction == "none"


def test_scale_loss_gains():
    hyp = dict(HYP)
    same = scale_loss_gains(hyp, nl=3, nc=80, imgsz=640)
    assert (same["box"], same["cls"], same["obj"]) == pytest.approx((0.05, 0.5, 1.0))
    out = scale_loss_gains(hyp, nl=4, nc=20, imgsz=320)
    assert out["box"] == pytest.approx(0.05 * 3 / 4)
    assert out["cls"] == pytest.approx(0.5 * 20 / 80 * 3 / 4)
    assert out["obj"] == pytest.approx(1.0 * 0.25 * 3 / 4)
    assert hyp == HYP and out is not hyp  # a new dict, input untouched


# ---------------------------------------------------------------------- target assignment
class _FakeDetect(nn.Module):
    def __init__(self, anchors: list, nc: int = 1):
        super().__init__()
        self.nc, self.no = nc, nc + 5
        self.nl, self.na = len(anchors), len(anchors[0])
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32))
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.m = nn.ModuleList(nn.Conv2d(1, self.no * self.na, 1) for _ in range(self.nl))


class _FakeModel(nn.Module):
    """Only what ComputeLoss reads: hyp, parameters and model[-1] (the Detect layer)."""

    def __init__(self, anchors: list, nc: int = 1, hyp: dict | None = None):
        super().__init__()
        self.model = nn.ModuleList([_FakeDetect(anchors, nc)])
        self.hyp = dict(hyp or HYP)


# grid-unit anchors for a 64x64 image: grids 8x8, 4x4, 2x2
ANCHORS = [[[1, 1], [2, 2], [8, 8]], [[0.5, 0.5], [1, 2], [3, 3]], [[4, 4], [1, 1], [0.1, 0.1]]]


def _grids(nc: int = 1, bs: int = 1) -> list[torch.Tensor]:
    return [torch.zeros(bs, 3, s, s, nc + 5) for s in (8, 4, 2)]


def test_build_targets_hand_count():
    loss = ComputeLoss(_FakeModel(ANCHORS))
    t = torch.tensor([[0, 0, 0.30, 0.70, 0.25, 0.25]])
    tcls, tbox, indices, anch = loss.build_targets(_grids(), t)
    # P3 8x8: xy (2.4, 5.6), wh (2, 2). Anchors 1 and 2 pass (ratio 2, 1); 8x8 has ratio 4, not < 4.
    #   x frac .4 < .5 and x > 1 -> left cell too; far-side y 8-5.6 = 2.4 frac .4 -> cell below too. 2 x 3 = 6
    # P4 4x4: xy (1.2, 2.8), wh (1, 1). All 3 anchors pass (ratios 2, 2, 3). x frac .2 -> left;
    #   far-side y 4-2.8 = 1.2 frac .2 -> below. 3 x 3 = 9
    # P5 2x2: xy (0.6, 1.4), wh (.5, .5). Only anchor 1 passes (ratio 2; others 8 and 5).
    #   y frac .4 and y > 1 -> above; far-side x 2-0.6 = 1.4 frac .4 -> right. 1 x 3 = 3
    assert [len(c) for c in tcls] == [6, 9, 3]

    b, a, gj, gi = indices[0]
    cells = sorted(set(zip(gi.tolist(), gj.tolist())))
    assert cells == [(1, 5), (2, 5), (2, 6)]
    assert sorted(set(a.tolist())) == [0, 1]
    # each tbox xy is the centre measured from its own cell; wh is the grid-unit size
    for k in range(len(b)):
        assert tbox[0][k, 0].item() == pytest.approx(2.4 - gi[k].item(), abs=1e-5)
        assert tbox[0][k, 1].item() == pytest.approx(5.6 - gj[k].item(), abs=1e-5)
    assert torch.allclose(tbox[0][:, 2:], torch.tensor([2.0, 2.0]))
    assert torch.equal(anch[0], loss.anchors[0][a])

    b, a, gj, gi = indices[2]
    assert sorted(zip(gi.tolist(), gj.tolist())) == [(0, 0), (0, 1), (1, 1)]


def test_anchor_t_controls_matches():
    # anchor_t 6 admits P3's 8x8 anchor (ratio 4) and P5's 0.1 anchor (ratio 5), not P5's 4x4 (ratio 8)
    loss = ComputeLoss(_FakeModel(ANCHORS, hyp={**HYP, "anchor_t": 6.0}))
    t = torch.tensor([[0, 0, 0.30, 0.70, 0.25, 0.25]])
    tcls, *_ = loss.build_targets(_grids(), t)
    assert [len(c) for c in tcls] == [9, 9, 6]


def test_targets_on_the_image_edge_stay_inside_the_grid():
    loss = ComputeLoss(_FakeModel(ANCHORS))
    t = torch.tensor([[0, 0, 1.0, 0.5, 0.25, 0.25], [0, 0, 0.0, 0.0, 0.25, 0.25]])
    _, tbox, indices, _ = loss.build_targets(_grids(), t)
    for (b, a, gj, gi), n in zip(indices, (8, 4, 2)):
        assert int(gi.min()) >= 0 and int(gi.max()) <= n - 1
        assert int(gj.min()) >= 0 and int(gj.max()) <= n - 1
    # x = 1.0 on P3 is 8.0 grid units: clamped to the last cell, offset 1.0 from it
    b, a, gj, gi = indices[0]
    right = gi == 7
    assert right.any() and torch.allclose(tbox[0][right, 0], torch.tensor(1.0))


def test_no_targets_gives_only_objectness():
    loss = ComputeLoss(_FakeModel(ANCHORS, nc=3))
    p = [torch.randn_like(x) for x in _grids(nc=3, bs=2)]
    total, items = loss(p, torch.zeros(0, 6))
    assert torch.isfinite(total).all()
    assert items[0].item() == 0.0 and items[2].item() == 0.0 and items[1].item() > 0


# ----------------------------------------------------------------------------- the full loss
def _logit(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x / (1 - x))


def _perfect_prediction(loss: ComputeLoss, t: torch.Tensor, bs: int, nc: int) -> list[torch.Tensor]:
    """Logits whose decoded boxes equal every assigned target box, very sure obj/cls."""
    p = [torch.full_like(x, -30.0) for x in _grids(nc=nc, bs=bs)]
    tcls, tbox, indices, anch = loss.build_targets(p, t)
    for i, pi in enumerate(p):
        b, a, gj, gi = indices[i]
        pi[b, a, gj, gi, 0:2] = _logit((tbox[i][:, :2] + 0.5) / 2)  # invert 2*sigmoid - 0.5
        pi[b, a, gj, gi, 2:4] = _logit(torch.sqrt(tbox[i][:, 2:] / anch[i]) / 2)  # invert (2*sigmoid)^2 * anchor
        pi[b, a, gj, gi, 4] = 30.0
        pi[b, a, gj, gi, 5 + tcls[i]] = 30.0
    return p


def test_perfect_prediction_gives_near_zero_loss():
    nc = 3
    loss = ComputeLoss(_FakeModel(ANCHORS, nc=nc))
    t = torch.tensor([[0, 2, 0.30, 0.70, 0.25, 0.25]])
    p = _perfect_prediction(loss, t, bs=1, nc=nc)
    total, (lbox, lobj, lcls) = loss(p, t)
    assert lbox.item() < 1e-5
    assert total.item() < 1e-4
    # a wrong class on the same boxes is clearly penalised
    bad = _perfect_prediction(loss, torch.tensor([[0, 1, 0.30, 0.70, 0.25, 0.25]]), bs=1, nc=nc)
    for i, pi in enumerate(bad):
        pi[..., 5:] = p[i][..., 5:]
    assert loss(bad, torch.tensor([[0, 1, 0.30, 0.70, 0.25, 0.25]]))[1][2].item() > 1.0


def test_label_smoothing_and_focal_move_the_class_term():
    nc = 3
    t = torch.tensor([[0, 2, 0.30, 0.70, 0.25, 0.25]])
    plain = ComputeLoss(_FakeModel(ANCHORS, nc=nc))
    p = _perfect_prediction(plain, t, bs=1, nc=nc)
    for pi in p:  # confident but not saturated class logits
        pi[..., 5:] = pi[..., 5:].clamp(-6, 6)
    lcls_plain = plain(p, t)[1][2].item()
    smooth = ComputeLoss(_FakeModel(ANCHORS, nc=nc, hyp={**HYP, "label_smoothing": 0.1}))
    assert (smooth.cp, smooth.cn) == pytest.approx((0.95, 0.05))
    # soft targets penalise the confident correct logits
    assert smooth(p, t)[1][2].item() > lcls_plain * 5
    focal = ComputeLoss(_FakeModel(ANCHORS, nc=nc, hyp={**HYP, "fl_gamma": 1.5}))
    assert isinstance(focal.BCEcls, FocalLoss) and isinstance(focal.BCEobj, FocalLoss)
    # easy examples are down-weighted
    assert focal(p, t)[1][2].item() < lcls_plain * 0.1


def test_single_class_has_no_class_term():
    loss = ComputeLoss(_FakeModel(ANCHORS, nc=1))
    p = [torch.randn_like(x) for x in _grids(nc=1)]
    _, items = loss(p, torch.tensor([[0, 0, 0.5, 0.5, 0.2, 0.2]]))
    assert items[2].item() == 0.0 and items[0].item() > 0


def test_autobalance_keeps_stride16_level_at_one():
    loss = ComputeLoss(_FakeModel(ANCHORS, nc=2), autobalance=True)
    assert loss.ssi == 1
    p = [torch.randn_like(x) for x in _grids(nc=2, bs=2)]
    loss(p, torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.2]]))
    assert loss.balance[1] == pytest.approx(1.0)
    assert loss.balance != [4.0, 1.0, 0.4]


def test_missing_hyp_is_a_clear_error():
    model = _FakeModel(ANCHORS)
    del model.hyp["anchor_t"]
    with pytest.raises(KeyError, match="anchor_t"):
        ComputeLoss(model)


# ------------------------------------------------------------------------- with the real model
@pytest.fixture(scope="module")
def yolo():
    from models.yolo import Model

    torch.manual_seed(0)
    m = Model("yolov5n.yaml", nc=4, verbose=False).train()
    m.hyp = dict(HYP)
    return m


def test_random_predictions_positive_finite_and_grads_reach_every_level(yolo):
    yolo.zero_grad()
    imgs = torch.rand(2, 3, 64, 64)
    p = yolo(imgs)
    t = torch.tensor([[0, 1, 0.5, 0.5, 0.1, 0.2], [1, 3, 0.2, 0.7, 0.6, 0.4], [1, 0, 0.8, 0.3, 0.03, 0.04]])
    total, items = ComputeLoss(yolo)(p, t)
    assert total.shape == (1,) and items.shape == (3,)
    assert torch.isfinite(total).all() and total.item() > 0 and (items > 0).all()
    assert total.item() == pytest.approx(items.sum().item() * 2, rel=1e-5)  # times batch size
    total.backward()
    det = yolo.model[-1]
    for conv in det.m:
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    first = next(yolo.model[0].parameters())  # the gradient flows back through the whole network
    assert first.grad is not None and first.grad.abs().sum() > 0


@pytest.mark.parametrize("level,weight", [(0, 4.0), (1, 1.0), (2, 0.4)])
def test_objectness_level_balance_is_4_1_0_4(level, weight):
    """YOLOv5's objectness balance P3/P4/P5 = 4.0/1.0/0.4, by hand: with no targets every objectness
    target is 0, so a level whose logits are all 0 adds balance * BCE(0, 0) = balance * ln 2, and a
    level at logit -30 adds ~1e-13."""
    loss = ComputeLoss(_FakeModel(ANCHORS, nc=3))
    p = [torch.full_like(x, -30.0) for x in _grids(nc=3, bs=2)]
    p[level][..., 4] = 0.0
    _, items = loss(p, torch.zeros(0, 6))
    assert items[1].item() == pytest.approx(weight * math.log(2) * HYP["obj"], rel=1e-6)


def test_objectness_balance_weights_levels_differently():
    """All three levels at once, each at its own logit: lobj = obj * sum(balance_i * softplus(z_i))."""
    loss = ComputeLoss(_FakeModel(ANCHORS, nc=3))
    p = [torch.zeros_like(x) for x in _grids(nc=3, bs=1)]
    for pi, z in zip(p, (0.0, 1.0, -1.0)):
        pi[..., 4] = z
    _, items = loss(p, torch.zeros(0, 6))
    softplus = lambda z: math.log1p(math.exp(z))  # noqa: E731 - BCE of logit z against target 0
    expected = HYP["obj"] * (4.0 * softplus(0.0) + 1.0 * softplus(1.0) + 0.4 * softplus(-1.0))
    assert items[1].item() == pytest.approx(expected, rel=1e-6)
