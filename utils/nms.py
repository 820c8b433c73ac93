"""Non-maximum suppression over raw Detect outputs, built on torchvision.ops.nms."""
from __future__ import annotations

import time

import torch
import torchvision

from utils.boxes import xywh2xyxy
from utils.logging import LOGGER

MAX_WH = 7680  # class offset for batched NMS: larger than any image side
MAX_NMS_INPUT = 30000  # boxes kept by score before NMS, bounding its cost


def non_max_suppression(
    prediction: torch.Tensor | list | tuple,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    classes: list[int] | None = None,
    agnostic: bool = False,
    multi_label: bool = False,
    labels: tuple = (),
    max_det: int = 300,
    time_limit: float | None = None,
) -> list[torch.Tensor]:
    """Filter (B, N, 5 + nc) predictions [cx, cy, w, h, obj, cls...] into per-image (n, 6) tensors.

    Rows of the result are [x1, y1, x2, y2, conf, cls], conf = obj * cls. With multi_label a box
    may appear once for each class whose score clears conf_thres (used for mAP); otherwise only its
    best class. `labels` are per-image (n, 5) [cls, cx, cy, w, h] apriori boxes for --save-hybrid.
    """
    if not 0 <= conf_thres <= 1:
        raise ValueError(f"conf_thres must be in [0, 1], got {conf_thres}")
    if not 0 <= iou_thres <= 1:
        raise ValueError(f"iou_thres must be in [0, 1], got {iou_thres}")
    if isinstance(prediction, (list, tuple)):  # Detect in inference mode returns (decoded, raw)
        prediction = prediction[0]

    bs = prediction.shape[0]
    nc = prediction.shape[2] - 5
    multi_label &= nc > 1
    candidates = prediction[..., 4] > conf_thres
    output = [torch.zeros((0, 6), device=prediction.device)] * bs
    start = time.time()
    for xi, x in enumerate(prediction):
        x = x[candidates[xi]]
        if labels and len(labels[xi]):
            lb = labels[xi]
            v = torch.zeros((len(lb), nc + 5), device=x.device)
            v[:, :4] = lb[:, 1:5]
            v[:, 4] = 1.0
            v[range(len(lb)), lb[:, 0].long() + 5] = 1.0
            x = torch.cat((x, v), 0)
        if not x.shape[0]:
            continue
        x = x.float()  # half-precision scores lose resolution in the product below
        x[:, 5:] *= x[:, 4:5]
        box = xywh2xyxy(x[:, :4])
        if multi_label:
            i, j = (x[:, 5:] > conf_thres).nonzero(as_tuple=False).T
            x = torch.cat((box[i], x[i, j + 5, None], j[:, None].float()), 1)
        else:
            conf, j = x[:, 5:].max(1, keepdim=True)
            x = torch.cat((box, conf, j.float()), 1)[conf.view(-1) > conf_thres]
        if classes is not None:
            x = x[(x[:, 5:6] == torch.tensor(classes, device=x.device)).any(1)]
        if not x.shape[0]:
            continue
        x = x[x[:, 4].argsort(descending=True)[:MAX_NMS_INPUT]]
        offsets = x[:, 5:6] * (0 if agnostic else MAX_WH)
        keep = torchvision.ops.nms(x[:, :4] + offsets, x[:, 4], iou_thres)[:max_det]
        output[xi] = x[keep]
        if time_limit is not None and time.time() - start > time_limit:
            LOGGER.warning(f"NMS time limit {time_limit:.3f}s exceeded")
            break
    return output
