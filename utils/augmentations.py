"""Image and label augmentations for detection (pure numpy / OpenCV).

Semantics follow YOLOv5 so that images, boxes and metrics match the reference pixel for pixel.
Boxes handed to these functions are in pixels, rows [cls, x1, y1, x2, y2] unless said otherwise.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

import cv2
import numpy as np

PAD_COLOR = (114, 114, 114)


def letterbox(
    im: np.ndarray,
    new_shape: int | Sequence[int] = (640, 640),
    color: tuple[int, int, int] = PAD_COLOR,
    auto: bool = True,
    scale_fill: bool = False,
    scaleup: bool = True,
    stride: int = 32,
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Resize `im` (HWC) keeping its aspect ratio, then pad it to `new_shape` (h, w).

    auto pads only up to the next multiple of `stride` (minimum rectangle); scale_fill stretches
    without padding; scaleup=False never enlarges (keeps val mAP honest for small images).
    Returns the image, the (w, h) scale ratios and the (left, top) padding before rounding.
    """
    shape = im.shape[:2]  # (h, w)
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    new_h, new_w = int(new_shape[0]), int(new_shape[1])

    r = min(new_h / shape[0], new_w / shape[1])
    if not scaleup:
        r = min(r, 1.0)

    ratio = (r, r)
    # at least one pixel per side: a 20000x20 image would otherwise round to zero width and crash cv2.resize
    new_unpad = (max(int(round(shape[1] * r)), 1), max(int(round(shape[0] * r)), 1))  # (w, h)
    dw, dh = new_w - new_unpad[0], new_h - new_unpad[1]
    if auto:
        dw, dh = np.mod(dw, stride), np.mod(dh, stride)
    elif scale_fill:
        dw, dh = 0.0, 0.0
        new_unpad = (new_w, new_h)
        ratio = (new_w / shape[1], new_h / shape[0])

    dw /= 2  # split the padding between both sides
    dh /= 2

    if shape[::-1] != new_unpad:
        im = cv2.resize(im, new_unpad, interpolation=cv2.INTER_LINEAR)
    # the +-0.1 sends an odd pixel of padding to the bottom/right, as the reference does
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    im = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return im, ratio, (dw, dh)


def augment_hsv(im: np.ndarray, hgain: float = 0.5, sgain: float = 0.5, vgain: float = 0.5) -> np.ndarray:
    """Randomly scale hue, saturation and value of a BGR uint8 image, in place (also returned).

    Look-up tables keep this cheap: one 256-entry table per channel instead of float maths per pixel.
    """
    if not (hgain or sgain or vgain):
        return im
    r = np.random.uniform(-1, 1, 3) * [hgain, sgain, vgain] + 1
    hue, sat, val = cv2.split(cv2.cvtColor(im, cv2.COLOR_BGR2HSV))
    x = np.arange(0, 256, dtype=r.dtype)
    lut_hue = ((x * r[0]) % 180).astype(np.uint8)  # OpenCV hue lives in [0, 180)
    lut_sat = np.clip(x * r[1], 0, 255).astype(np.uint8)
    lut_val = np.clip(x * r[2], 0, 255).astype(np.uint8)
    im_hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    cv2.cvtColor(im_hsv, cv2.COLOR_HSV2BGR, dst=im)
    return im


def box_candidates(
    box1: np.ndarray,
    box2: np.ndarray,
    wh_thr: float = 2,
    ar_thr: float = 100,
    area_thr: float = 0.1,
    eps: float = 1e-16,
) -> np.ndarray:
    """Mask of boxes worth keeping after a warp: box1 before (4, n), box2 after (4, n), both xyxy.

    A box survives if it is wider and taller than wh_thr px, kept more than area_thr of its
    (scaled) area and is not a sliver (aspect ratio under ar_thr).
    """
    w1, h1 = box1[2] - box1[0], box1[3] - box1[1]
    w2, h2 = box2[2] - box2[0], box2[3] - box2[1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


def segment2box(segment: np.ndarray, width: int = 640, height: int = 640) -> np.ndarray:
    """Tight xyxy box around the points of one polygon (n, 2) that fall inside the image."""
    x, y = segment.T
    inside = (x >= 0) & (y >= 0) & (x <= width) & (y <= height)
    x, y = x[inside], y[inside]
    if not len(x):
        return np.zeros(4, dtype=segment.dtype)
    return np.array([x.min(), y.min(), x.max(), y.max()], dtype=segment.dtype)


def segments2boxes(segments: Sequence[np.ndarray]) -> np.ndarray:
    """Polygons [(n, 2), ...] -> boxes (m, 4) as [cx, cy, w, h] in the polygons' units."""
    boxes = []
    for s in segments:
        x, y = s.T
        boxes.append([x.min(), y.min(), x.max(), y.max()])
    b = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack(((b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]), 1)


def resample_segments(segments: Sequence[np.ndarray], n: int = 1000) -> list[np.ndarray]:
    """Resample each closed polygon to n points so that warped outlines stay smooth."""
    out = []
    for s in segments:
        s = np.concatenate((s, s[0:1, :]), axis=0)  # close the polygon
        x = np.linspace(0, len(s) - 1, n)
        xp = np.arange(len(s))
        out.append(np.stack([np.interp(x, xp, s[:, i]) for i in range(2)], 1).astype(np.float32))
    return out


def bbox_ioa(box1: np.ndarray, box2: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Intersection of one xyxy box (4,) with boxes (n, 4), over the area of each box2."""
    b1_x1, b1_y1, b1_x2, b1_y2 = box1
    b2_x1, b2_y1, b2_x2, b2_y2 = box2.T
    inter = (np.minimum(b1_x2, b2_x2) - np.maximum(b1_x1, b2_x1)).clip(0) * (
        np.minimum(b1_y2, b2_y2) - np.maximum(b1_y1, b2_y1)
    ).clip(0)
    return inter / ((b2_x2 - b2_x1) * (b2_y2 - b2_y1) + eps)


def random_perspective(
    im: np.ndarray,
    targets: np.ndarray = np.zeros((0, 5)),
    segments: Sequence[np.ndarray] = (),
    degrees: float = 10,
    translate: float = 0.1,
    scale: float = 0.1,
    shear: float = 10,
    perspective: float = 0.0,
    border: tuple[int, int] = (0, 0),
) -> tuple[np.ndarray, np.ndarray]:
    """Random rotation, scale, shear, translation and perspective of an image and its boxes.

    targets are rows [cls, x1, y1, x2, y2] in pixels. `border` (negative under mosaic) crops the
    output: a 2s x 2s mosaic with border -s/2 comes out s x s. Boxes are re-fitted around the
    warped corners (or warped polygons when every box has one) and degenerate ones dropped.
    """
    height = im.shape[0] + border[0] * 2
    width = im.shape[1] + border[1] * 2

    C = np.eye(3)  # move the image centre to the origin so rotation/scale act about it
    C[0, 2] = -im.shape[1] / 2
    C[1, 2] = -im.shape[0] / 2

    P = np.eye(3)
    P[2, 0] = random.uniform(-perspective, perspective)
    P[2, 1] = random.uniform(-perspective, perspective)

    R = np.eye(3)
    a = random.uniform(-degrees, degrees)
    s = random.uniform(1 - scale, 1 + scale)
    R[:2] = cv2.getRotationMatrix2D(angle=a, center=(0, 0), scale=s)

    S = np.eye(3)
    S[0, 1] = math.tan(random.uniform(-shear, shear) * math.pi / 180)
    S[1, 0] = math.tan(random.uniform(-shear, shear) * math.pi / 180)

    T = np.eye(3)
    T[0, 2] = random.uniform(0.5 - translate, 0.5 + translate) * width
    T[1, 2] = random.uniform(0.5 - translate, 0.5 + translate) * height

    M = T @ S @ R @ P @ C  # right to left: centre, perspective, rotate, shear, translate
    if border[0] != 0 or border[1] != 0 or (M != np.eye(3)).any():
        if perspective:
            im = cv2.warpPerspective(im, M, dsize=(width, height), borderValue=PAD_COLOR)
        else:
            im = cv2.warpAffine(im, M[:2], dsize=(width, height), borderValue=PAD_COLOR)

    n = len(targets)
    if n:
        use_segments = len(segments) == n and any(x.any() for x in segments)
        new = np.zeros((n, 4))
        if use_segments:
            for i, segment in enumerate(resample_segments(segments)):
                xy = np.ones((len(segment), 3))
                xy[:, :2] = segment
                xy = xy @ M.T
                xy = xy[:, :2] / xy[:, 2:3] if perspective else xy[:, :2]
                new[i] = segment2box(xy, width, height)
        else:
            xy = np.ones((n * 4, 3))
            xy[:, :2] = targets[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(n * 4, 2)  # the 4 corners
            xy = xy @ M.T
            xy = (xy[:, :2] / xy[:, 2:3] if perspective else xy[:, :2]).reshape(n, 8)
            x, y = xy[:, [0, 2, 4, 6]], xy[:, [1, 3, 5, 7]]
            new = np.stack((x.min(1), y.min(1), x.max(1), y.max(1)), 1)
            new[:, [0, 2]] = new[:, [0, 2]].clip(0, width)
            new[:, [1, 3]] = new[:, [1, 3]].clip(0, height)

        keep = box_candidates(box1=targets[:, 1:5].T * s, box2=new.T, area_thr=0.01 if use_segments else 0.10)
        targets = targets[keep]
        targets[:, 1:5] = new[keep]
    return im, targets


def mixup(im: np.ndarray, labels: np.ndarray, im2: np.ndarray, labels2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blend two same-size images (ratio ~ Beta(32, 32), so close to 50/50) and keep both label sets."""
    r = np.random.beta(32.0, 32.0)
    im = (im * r + im2 * (1 - r)).astype(np.uint8)
    return im, np.concatenate((labels, labels2), 0)


def copy_paste(
    im: np.ndarray, labels: np.ndarray, segments: list[np.ndarray], p: float = 0.5
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Copy-paste augmentation (Ghiasi et al. 2021) on one image: a fraction p of the objects are
    mirrored left-right and pasted where they overlap existing boxes by less than 30%.

    Needs polygon segments (pixels) for every label; labels are [cls, x1, y1, x2, y2] pixels.
    """
    n = len(segments)
    if not (p and n):
        return im, labels, segments
    h, w, _ = im.shape
    mask = np.zeros(im.shape, np.uint8)
    for j in random.sample(range(n), k=round(p * n)):
        lb, seg = labels[j], segments[j]
        box = np.array([w - lb[3], lb[2], w - lb[1], lb[4]])
        ioa = bbox_ioa(box, labels[:, 1:5])
        if (ioa < 0.30).all():
            labels = np.concatenate((labels, [[lb[0], *box]]), 0)
            segments.append(np.concatenate((w - seg[:, 0:1], seg[:, 1:2]), 1))
            cv2.drawContours(mask, [seg.astype(np.int32)], -1, (1, 1, 1), cv2.FILLED)
    flipped = cv2.flip(im, 1)
    sel = cv2.flip(mask, 1).astype(bool)
    im[sel] = flipped[sel]
    return im, labels, segments
