"""letterbox geometry, HSV/perspective/mixup/copy-paste behaviour on hand-made images."""
import random

import cv2
import numpy as np
import pytest

from utils.augmentations import (
    augment_hsv,
    box_candidates,
    copy_paste,
    letterbox,
    mixup,
    random_perspective,
    segments2boxes,
)


def _img(h, w, value=200):
    return np.full((h, w, 3), value, np.uint8)


@pytest.mark.parametrize(
    "hw, new, kw, out_hw, pad",
    [
        ((1080, 810), 640, dict(auto=True), (640, 480), (0, 0)),  # bus.jpg: already a multiple of 32
        ((720, 1280), 640, dict(auto=True), (384, 640), (0, 12)),  # zidane.jpg: 360 -> 384 (12 + 12)
        ((720, 1280), 640, dict(auto=False), (640, 640), (0, 140)),
        ((1080, 810), 640, dict(auto=False), (640, 640), (80, 0)),
        ((100, 200), 640, dict(auto=False, scaleup=False), (640, 640), (220, 270)),  # no enlarging
        ((10, 10), (640, 643), dict(auto=False), (640, 643), (1.5, 0)),  # odd padding: 1 left, 2 right
        ((480, 640), (320, 480), dict(auto=False, scale_fill=True), (320, 480), (0, 0)),
    ],
)
def test_letterbox_shapes_and_padding(hw, new, kw, out_hw, pad):
    im = _img(*hw)
    out, ratio, (dw, dh) = letterbox(im, new, **kw)
    assert out.shape[:2] == out_hw
    assert (dw, dh) == pytest.approx(pad)
    left, top = int(round(dw - 0.1)), int(round(dh - 0.1))
    right, bottom = int(round(dw + 0.1)), int(round(dh + 0.1))
    # padding is the fill colour, the rest is the (uniform) image
    if left:
        assert (out[:, :left] == 114).all()
    if right:
        assert (out[:, -right:] == 114).all()
    if top:
        assert (out[:top] == 114).all()
    if bottom:
        assert (out[-bottom:] == 114).all()
    inner = out[top : out.shape[0] - bottom, left : out.shape[1] - right]
    assert (inner == 200).all()
    if kw.get("scale_fill"):
        assert ratio == pytest.approx((480 / 640, 320 / 480))
    else:
        assert ratio[0] == ratio[1]


def test_letterbox_odd_padding_goes_bottom_right():
    out, _, (dw, dh) = letterbox(_img(10, 10), (643, 640), auto=False)
    assert dh == 1.5
    assert (out[0] == 114).all() and (out[1] == 200).all()  # 1 row on top
    assert (out[-2:] == 114).all() and (out[-3] == 200).all()  # 2 rows at the bottom


def test_letterbox_content_is_linear_resize():
    rng = np.random.default_rng(0)
    im = rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)
    out, (r, _), (dw, dh) = letterbox(im, 320, auto=False)
    expect = cv2.resize(im, (320, 180), interpolation=cv2.INTER_LINEAR)
    top = int(round(dh - 0.1))
    assert r == 2.0 and top == 70
    assert np.array_equal(out[top : top + 180], expect)


def test_letterbox_no_resize_when_size_matches():
    rng = np.random.default_rng(1)
    im = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out, ratio, pad = letterbox(im, 64)
    assert np.array_equal(out, im) and ratio == (1.0, 1.0)


def test_augment_hsv_zero_gain_is_identity_and_gains_change_colour():
    rng = np.random.default_rng(0)
    im = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    same = augment_hsv(im.copy(), 0, 0, 0)
    assert np.array_equal(same, im)
    np.random.seed(3)
    out = augment_hsv(im.copy(), 0.5, 0.7, 0.4)
    assert out.dtype == np.uint8 and out.shape == im.shape and not np.array_equal(out, im)
    np.random.seed(3)
    assert np.array_equal(out, augment_hsv(im.copy(), 0.5, 0.7, 0.4))  # driven by numpy's seed


def test_box_candidates_rules():
    before = np.array([[0, 0, 100, 100]] * 4, float).T
    after = np.array([[0, 0, 50, 50], [0, 0, 1, 50], [0, 0, 20, 20], [0, 0, 99, 0.5]], float).T
    keep = box_candidates(before, after, area_thr=0.1)
    assert keep.tolist() == [True, False, False, False]  # too thin, too small (4%), too flat


def _white_box_image(s, box):
    im = np.zeros((s, s, 3), np.uint8)
    x1, y1, x2, y2 = box
    im[y1:y2, x1:x2] = 255
    return im


def test_random_perspective_identity_keeps_everything():
    im = _white_box_image(64, (10, 20, 30, 40))
    t = np.array([[1, 10, 20, 30, 40]], float)
    out, t2 = random_perspective(im.copy(), t.copy(), degrees=0, translate=0, scale=0, shear=0)
    assert np.array_equal(out, im)
    assert np.allclose(t2, t)


@pytest.mark.parametrize("seed", range(4))
def test_random_perspective_boxes_follow_pixels(seed):
    random.seed(seed)
    box = (40, 50, 80, 70)
    im = _white_box_image(128, box)
    t = np.array([[0, *box]], float)
    out, t2 = random_perspective(im, t, degrees=10, translate=0.1, scale=0.3, shear=0)
    assert len(t2) == 1 and t2[0, 0] == 0
    ys, xs = np.nonzero(out[..., 0] > 127)
    x1, y1, x2, y2 = t2[0, 1:]
    # the warped corners' bounding box encloses the warped white rectangle, within a pixel
    assert xs.min() >= x1 - 1.5 and xs.max() <= x2 + 1.5
    assert ys.min() >= y1 - 1.5 and ys.max() <= y2 + 1.5


def test_random_perspective_border_crops_and_drops_outside_boxes():
    random.seed(0)
    im = np.zeros((128, 128, 3), np.uint8)
    t = np.array([[0, 48, 48, 80, 80], [1, 0, 0, 20, 20]], float)  # centre box kept, corner one cut off
    out, t2 = random_perspective(im, t, degrees=0, translate=0, scale=0, shear=0, border=(-32, -32))
    assert out.shape[:2] == (64, 64)
    assert t2[:, 0].tolist() == [0]
    assert np.allclose(t2[0, 1:], [16, 16, 48, 48])


def test_mixup_blends_and_concatenates():
    np.random.seed(0)
    a, b = _img(8, 8, 0), _img(8, 8, 200)
    im, lb = mixup(a, np.zeros((2, 5)), b, np.ones((3, 5)))
    assert lb.shape == (5, 5)
    assert 60 < im.mean() < 140  # about half way between the two


def test_copy_paste_mirrors_object():
    random.seed(0)
    im = np.zeros((64, 64, 3), np.uint8)
    im[10:20, 5:15] = 255
    seg = np.array([[5, 10], [15, 10], [15, 20], [5, 20]], np.float32)
    labels = np.array([[3, 5, 10, 15, 20]], float)
    out, lb, segs = copy_paste(im, labels, [seg], p=1.0)
    assert len(lb) == 2 and len(segs) == 2
    assert np.allclose(lb[1], [3, 64 - 15, 10, 64 - 5, 20])
    assert out[15, 64 - 10].min() == 255  # pasted pixels on the mirrored side


def test_segments2boxes():
    s = [np.array([[0.1, 0.2], [0.3, 0.2], [0.3, 0.6]])]
    assert np.allclose(segments2boxes(s), [[0.2, 0.4, 0.2, 0.4]])
