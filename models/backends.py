"""One inference front end for every weights format, chosen by the file's suffix.

detect.py and val.py call `DetectMultiBackend(weights)(images)` and get the decoded (B, N, 5 + nc)
predictions whatever the format; names, stride and a fixed input size (for fixed-shape exports)
travel with the weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from utils.checkpoints import load_model, resolve_weights
from utils.errors import UserError


class DetectMultiBackend(nn.Module):
    """PyTorch `.pt` checkpoints (official YOLOv5 or this project's)."""

    def __init__(self, weights: str | Path = "yolov5s.pt", device: torch.device = torch.device("cpu"),
                 fp16: bool = False, fuse: bool = True, data: dict | None = None):
        super().__init__()
        w = Path(str(weights[0] if isinstance(weights, (list, tuple)) else weights))
        self.device = device
        self.fp16 = fp16 and device.type != "cpu"
        self.fixed_imgsz = None  # (h, w) for exports traced at one shape; None when any shape works
        self.pt = w.suffix == ".pt"
        if not self.pt:
            raise UserError(f"unsupported weights format '{w.suffix}' for {w} (supported: .pt)")
        self.model = load_model(resolve_weights(w), device=device, fuse=fuse)
        if self.fp16:
            self.model.half()
        self.stride = int(self.model.stride.max())
        self.names = dict(self.model.names)
        if data and data.get("names") and self.names == {i: str(i) for i in range(len(self.names))}:
            self.names = {int(k): v for k, v in data["names"].items()}

    def forward(self, im: torch.Tensor, augment: bool = False) -> torch.Tensor:
        if self.fp16 and im.dtype != torch.float16:
            im = im.half()
        y = self.model(im, augment=augment)
        return y[0] if isinstance(y, (list, tuple)) else y

    def warmup(self, imgsz: tuple = (1, 3, 640, 640)) -> None:
        """One throw-away pass so the first timed image does not pay for lazy initialisation."""
        if self.device.type != "cpu":
            im = torch.zeros(*imgsz, dtype=torch.half if self.fp16 else torch.float, device=self.device)
            self.forward(im)
