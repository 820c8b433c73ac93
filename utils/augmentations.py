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
    new_unpad = (int(round(shape[1] * r)), int(round(shape[0] * r)))  # (w, h)
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
