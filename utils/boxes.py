"""Box format conversions, clipping and rescaling between letterboxed and original images.

Functions accept torch tensors or numpy arrays and return the same kind.
"""
from __future__ import annotations

import numpy as np
import torch

Array = "torch.Tensor | np.ndarray"


def _empty_like(x):
    return x.clone() if isinstance(x, torch.Tensor) else np.copy(x)


def xyxy2xywh(x):
    """[x1, y1, x2, y2] -> [cx, cy, w, h]."""
    y = _empty_like(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywh2xyxy(x):
    """[cx, cy, w, h] -> [x1, y1, x2, y2]."""
    y = _empty_like(x)
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def xywhn2xyxy(x, w: int = 640, h: int = 640, padw: float = 0, padh: float = 0):
    """Normalised [cx, cy, w, h] -> pixel [x1, y1, x2, y2], with an optional letterbox offset."""
    y = _empty_like(x)
    y[..., 0] = w * (x[..., 0] - x[..., 2] / 2) + padw
    y[..., 1] = h * (x[..., 1] - x[..., 3] / 2) + padh
    y[..., 2] = w * (x[..., 0] + x[..., 2] / 2) + padw
    y[..., 3] = h * (x[..., 1] + x[..., 3] / 2) + padh
    return y


def xyxy2xywhn(x, w: int = 640, h: int = 640, clip: bool = False, eps: float = 0.0):
    """Pixel [x1, y1, x2, y2] -> normalised [cx, cy, w, h]."""
    if clip:
        x = _empty_like(x)
        clip_boxes(x, (h - eps, w - eps))
    y = _empty_like(x)
    y[..., 0] = ((x[..., 0] + x[..., 2]) / 2) / w
    y[..., 1] = ((x[..., 1] + x[..., 3]) / 2) / h
    y[..., 2] = (x[..., 2] - x[..., 0]) / w
    y[..., 3] = (x[..., 3] - x[..., 1]) / h
    return y


def xyn2xy(x, w: int = 640, h: int = 640, padw: float = 0, padh: float = 0):
    """Normalised polygon points -> pixel points."""
    y = _empty_like(x)
    y[..., 0] = w * x[..., 0] + padw
    y[..., 1] = h * x[..., 1] + padh
    return y


def clip_boxes(boxes, shape: tuple) -> None:
    """Clip xyxy boxes in place to an image of shape (h, w)."""
    h, w = shape[:2]
    if isinstance(boxes, torch.Tensor):
        boxes[..., 0].clamp_(0, w)
        boxes[..., 1].clamp_(0, h)
        boxes[..., 2].clamp_(0, w)
        boxes[..., 3].clamp_(0, h)
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, w)
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, h)


def scale_boxes(img1_shape: tuple, boxes, img0_shape: tuple, ratio_pad=None):
    """Map xyxy boxes from a letterboxed image (img1_shape h, w) back to the original (img0_shape).

    ratio_pad = ((gain_h, gain_w), (pad_w, pad_h)) when known exactly (from the dataset); otherwise
    the letterbox gain and centred padding are recomputed from the two shapes.
    """
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        pad = (img1_shape[1] - img0_shape[1] * gain) / 2, (img1_shape[0] - img0_shape[0] * gain) / 2
    else:
        gain = ratio_pad[0][0]
        pad = ratio_pad[1]
    boxes[..., [0, 2]] -= pad[0]
    boxes[..., [1, 3]] -= pad[1]
    boxes[..., :4] /= gain
    clip_boxes(boxes, img0_shape)
    return boxes


def yolo_label_lines(det, shape: tuple, save_conf: bool) -> list[str]:
    """YOLO-format lines 'cls cx cy w h [conf]' for (n, 6) xyxy/conf/cls rows, normalised by image shape (h, w)."""
    gn = torch.tensor(shape[:2])[[1, 0, 1, 0]].float()
    lines = []
    for *xyxy, conf, cls in torch.as_tensor(det).tolist():
        xywh = (xyxy2xywh(torch.tensor(xyxy).view(1, 4)) / gn).view(-1).tolist()
        row = (cls, *xywh, conf) if save_conf else (cls, *xywh)
        lines.append(("%g " * len(row)).rstrip() % row)
    return lines
