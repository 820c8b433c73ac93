"""One prediction path for detect.py, val.py and torch.hub: images in, boxes in original-image pixels out.

    predictor = Predictor(model, conf_thres=0.25, iou_thres=0.45)
    x = predictor.preprocess(letterboxed_uint8_batch)        # (B, 3, h, w) float in [0, 1] on the model's device
    raw, train_out = predictor.forward(x)
    dets = predictor.postprocess(raw)                        # per image (n, 6) xyxy, conf, cls in input pixels
    boxes = predictor.to_original(dets[0], x.shape[2:], im0.shape)

`predict_images` does all of it for a list of HWC uint8 images (letterboxed to one shared shape); this is the
place where tiled (sliced) inference plugs in, so detect.py, val.py and AutoShape get it at once. The three
timings (pre-process, inference, NMS) are summed in `times` for the speed line.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from utils.augmentations import letterbox
from utils.boxes import scale_boxes
from utils.nms import non_max_suppression


class Predictor:
    """Pre-processing, inference and NMS around any detection model (DetectionModel or DetectMultiBackend)."""

    def __init__(self, model: nn.Module, *, conf_thres: float = 0.25, iou_thres: float = 0.45, max_det: int = 1000,
                 classes: Sequence[int] | None = None, agnostic: bool = False, multi_label: bool = False,
                 augment: bool = False, half: bool = False, amp: bool = False):
        self.model = model
        self.conf_thres, self.iou_thres, self.max_det = conf_thres, iou_thres, max_det
        self.classes, self.agnostic, self.multi_label = classes, agnostic, multi_label
        self.augment = augment
        self.half = half  # feed fp16 inputs (a model already in fp16)
        self.amp = amp  # autocast on CUDA, leaving the model's own precision alone
        self.times = [0.0, 0.0, 0.0]  # pre-process, inference, NMS seconds, summed over calls

    @property
    def device(self) -> torch.device:
        device = getattr(self.model, "device", None)  # DetectMultiBackend's (an ONNX model has no parameters)
        if isinstance(device, torch.device):
            return device
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def preprocess(self, im: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 CHW / BCHW (numpy or tensor) -> float BCHW in [0, 1] on the model's device."""
        t0 = time.perf_counter()
        x = torch.from_numpy(im) if isinstance(im, np.ndarray) else im
        x = x.to(self.device, non_blocking=True)
        x = (x.half() if self.half else x.float()) / 255
        if x.ndim == 3:
            x = x[None]
        self.times[0] += time.perf_counter() - t0
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list | None]:
        """Raw predictions, plus the per-level training outputs when the model returns them (for val losses)."""
        t0 = time.perf_counter()
        with torch.autocast(x.device.type, enabled=self.amp and x.device.type == "cuda"):
            out = self.model(x, augment=self.augment)
        raw, train_out = (out[0], out[1]) if isinstance(out, (list, tuple)) else (out, None)
        self.times[1] += time.perf_counter() - t0
        return raw, train_out

    def postprocess(self, raw: torch.Tensor, labels: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """NMS: per image an (n, 6) tensor of x1, y1, x2, y2, conf, cls in network-input pixels."""
        t0 = time.perf_counter()
        dets = non_max_suppression(raw, self.conf_thres, self.iou_thres, self.classes, self.agnostic,
                                   self.multi_label, labels=labels or (), max_det=self.max_det)
        self.times[2] += time.perf_counter() - t0
        return dets

    @staticmethod
    def to_original(det: torch.Tensor, input_hw: Sequence[int], orig_shape: Sequence[int],
                    ratio_pad: tuple | None = None) -> torch.Tensor:
        """A copy of `det` with its boxes mapped from the network input back to the original image."""
        out = det.clone()
        scale_boxes(tuple(input_hw), out[:, :4], tuple(orig_shape), ratio_pad)
        return out

    def predict(self, im: np.ndarray | torch.Tensor, orig_shapes: Sequence[Sequence[int]],
                ratio_pads: Sequence[tuple] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A letterboxed uint8 batch -> (its float input, detections in original pixels per image)."""
        x = self.preprocess(im)
        dets = self.postprocess(self.forward(x)[0])
        pads = ratio_pads or [None] * len(dets)
        return x, [self.to_original(d, x.shape[2:], s, p) for d, s, p in zip(dets, orig_shapes, pads)]

    def predict_images(self, images: Sequence[np.ndarray], size: Sequence[int], stride: int,
                       fixed_shape: Sequence[int] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """HWC uint8 images of any sizes -> (the batch that ran, detections in each image's own pixels).

        Every image is letterboxed to one shape: the largest of them scaled to `size`, rounded up to `stride`
        (or a fixed-shape export's own input shape).
        """
        t0 = time.perf_counter()
        if fixed_shape is not None:
            shape = list(fixed_shape)
        else:
            scaled = [[im.shape[0] * max(size) / max(im.shape[:2]), im.shape[1] * max(size) / max(im.shape[:2])]
                      for im in images]
            shape = [int(-(-int(round(x)) // stride) * stride) for x in np.array(scaled).max(0)]
        batch = np.stack([letterbox(im, shape, auto=False)[0] for im in images])
        batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
        self.times[0] += time.perf_counter() - t0
        return self.predict(batch, [im.shape for im in images])
