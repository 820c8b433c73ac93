"""One prediction path for detect.py, val.py and torch.hub: images in, boxes in original-image pixels out.

    predictor = Predictor(model, conf_thres=0.25, iou_thres=0.45)
    x = predictor.preprocess(letterboxed_uint8_batch)        # (B, 3, h, w) float in [0, 1] on the model's device
    raw, train_out = predictor.forward(x)
    dets = predictor.postprocess(raw)                        # per image (n, 6) xyxy, conf, cls in input pixels
    boxes = predictor.to_original(dets[0], x.shape[2:], im0.shape)

`predict_images` does all of it for a list of HWC uint8 images (letterboxed to one shared shape). Given a
`slicing` (utils.slicing.SliceConfig) it predicts each image tile by tile instead (`predict_sliced`): tiles
batched through the model, boxes mapped back to the image and merged, so detect.py, val.py and AutoShape all
get sliced inference from this one place. The three timings (pre-process, inference, NMS and merging) are
summed in `times` for the speed line.
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
from utils.slicing import SliceConfig, merge_detections, tile_windows


class Predictor:
    """Pre-processing, inference and NMS around any detection model (DetectionModel or DetectMultiBackend)."""

    def __init__(self, model: nn.Module, *, conf_thres: float = 0.25, iou_thres: float = 0.45, max_det: int = 1000,
                 classes: Sequence[int] | None = None, agnostic: bool = False, multi_label: bool = False,
                 augment: bool = False, half: bool = False, amp: bool = False, slicing: SliceConfig | None = None):
        self.model = model
        self.slicing = slicing  # tile large images (predict_images) instead of shrinking them whole
        self.conf_thres, self.iou_thres, self.max_det = conf_thres, iou_thres, max_det
        self.classes, self.agnostic, self.multi_label = classes, agnostic, multi_label
        self.augment = augment
        self.half = half  # feed fp16 inputs (a model already in fp16)
        self.amp = amp  # autocast on CUDA, leaving the model's own precision alone
        self.times = [0.0, 0.0, 0.0]  # pre-process, inference, NMS seconds, summed over calls
        self.last_tiles = 0  # tiles the last sliced image was cut into (0: it was predicted whole)

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

    def predict_images(self, images: Sequence[np.ndarray], size: Sequence[int] | int, stride: int,
                       fixed_shape: Sequence[int] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """HWC uint8 images of any sizes -> (the batch that ran last, detections in each image's own pixels).

        Every image is letterboxed to one shape: the largest of them scaled to `size`, rounded up to `stride`
        (or a fixed-shape export's own input shape). With `slicing`, each image is predicted tile by tile.
        """
        if self.slicing is not None:
            runs = [self.predict_sliced(im, size, stride, fixed_shape) for im in images]
            return runs[-1][0], [det for _, det in runs]
        return self._predict_letterboxed(images, size, stride, fixed_shape)

    def _predict_letterboxed(self, images: Sequence[np.ndarray], size: Sequence[int] | int, stride: int,
                             fixed_shape: Sequence[int] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        t0 = time.perf_counter()
        long_side = max(size) if isinstance(size, Sequence) else int(size)
        if fixed_shape is not None:
            shape = list(fixed_shape)
        else:
            scaled = [[im.shape[0] * long_side / max(im.shape[:2]), im.shape[1] * long_side / max(im.shape[:2])]
                      for im in images]
            shape = [int(-(-int(round(x)) // stride) * stride) for x in np.array(scaled).max(0)]
        batch = np.stack([letterbox(im, shape, auto=False)[0] for im in images])
        batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
        self.times[0] += time.perf_counter() - t0
        return self.predict(batch, [im.shape for im in images])

    def predict_sliced(self, image: np.ndarray, size: Sequence[int] | int, stride: int,
                       fixed_shape: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One HWC uint8 image, tile by tile -> (the last batch that ran, (n, 6) detections in its pixels).

        Tiles of `slicing.tile_size` original pixels (see utils.slicing.tile_windows) are letterboxed to `size`
        (exactly that shape, as a fixed-shape export runs) and run `slicing.batch` at a time; with `slicing.full`
        the whole image is predicted too, for objects larger than a tile. The boxes of every pass are merged per
        class (utils.slicing.merge_detections) and `max_det` applies to each pass and to the merged result. An
        image that fits one tile is predicted as is.
        """
        cfg = self.slicing
        h, w = image.shape[:2]
        long_side = max(size) if isinstance(size, Sequence) else int(size)
        tile = cfg.tile_size(h, w, long_side)
        # every pass at the one --img shape (not the smallest stride-multiple rectangle): the .pt model then sees
        # exactly what a fixed-shape export does, so all runtimes give the same boxes
        hw = [size[0], size[-1]] if isinstance(size, Sequence) else [long_side, long_side]
        pass_shape = list(fixed_shape) if fixed_shape is not None else [-(-int(v) // stride) * stride for v in hw]
        windows = tile_windows(h, w, tile, cfg.overlap) if tile else np.zeros((1, 4))
        self.last_tiles = len(windows) if len(windows) > 1 else 0
        if len(windows) == 1:
            x, dets = self._predict_letterboxed([image], size, stride, fixed_shape)
            return x, dets[0]
        parts, wins = [], []
        for start in range(0, len(windows), cfg.batch):
            chunk = windows[start:start + cfg.batch]
            x, dets = self._predict_letterboxed([image[y1:y2, x1:x2] for x1, y1, x2, y2 in chunk], size, stride,
                                                pass_shape)
            for win, det in zip(chunk, dets):
                det[:, [0, 2]] += float(win[0])
                det[:, [1, 3]] += float(win[1])
                parts.append(det)
                wins.append(torch.tensor(win, dtype=det.dtype, device=det.device).expand(len(det), 4))
        if cfg.full:
            _, (det,) = self._predict_letterboxed([image], size, stride, pass_shape)
            parts.append(det)
            wins.append(torch.tensor([0, 0, w, h], dtype=det.dtype, device=det.device).expand(len(det), 4))
        t0 = time.perf_counter()
        merged = merge_detections(torch.cat(parts), torch.cat(wins), (h, w), method=cfg.merge,
                                  threshold=cfg.merge_iou, metric=cfg.merge_metric, agnostic=self.agnostic,
                                  max_det=self.max_det)
        self.times[2] += time.perf_counter() - t0
        return x, merged
