"""The torch.hub front end: `AutoShape` takes images in any everyday form, `Detections` holds the results.

    model = torch.hub.load('.', 'custom', path='best.pt', source='local')
    results = model(['bus.jpg', PIL.Image.open('zidane.jpg'), np_rgb_array])
    results.print(); results.save(); crops = results.crop(); df = results.pandas().xyxy[0]

Inputs: a file path or http(s) URL, a PIL image, an HWC numpy array (RGB, as PIL gives it), a list of
any of these, or a ready (B, 3, H, W) float tensor in [0, 1] (passed straight to the model, raw output).
"""
from __future__ import annotations

import io
import time
import urllib.request
from copy import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps

from utils.annotator import Annotator, colors
from models.predictor import Predictor
from utils.boxes import xyxy2xywh
from utils.errors import UserError
from utils.files import increment_path, safe_name, write_image
from utils.slicing import SliceConfig, slice_config


def _read_image(im, i: int) -> tuple[np.ndarray, str]:
    """One input -> (HWC RGB uint8 array, file name for saving)."""
    name = f"image{i}.jpg"
    if isinstance(im, (str, Path)):
        s = str(im)
        name = Path(s.split("?")[0]).name or name
        try:
            if s.startswith(("http://", "https://")):
                with urllib.request.urlopen(s, timeout=15) as r:
                    im = Image.open(io.BytesIO(r.read()))
            else:
                im = Image.open(s)
            im.load()
        except (OSError, ValueError) as e:
            raise UserError(f"could not read image '{s}': {e}") from None
    if isinstance(im, Image.Image):
        name = Path(getattr(im, "filename", "") or name).name
        im = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    if not isinstance(im, np.ndarray):
        raise UserError(f"unsupported image input of type {type(im).__name__}: use a path, URL, PIL image or numpy array")
    if im.ndim == 2:
        im = np.repeat(im[..., None], 3, 2)
    elif im.ndim == 3 and im.shape[0] in (1, 3, 4) and im.shape[2] not in (1, 3, 4):
        im = im.transpose(1, 2, 0)  # CHW -> HWC
    if im.ndim != 3 or im.shape[2] not in (1, 3, 4):
        raise UserError(f"image {i} has shape {im.shape}; expected HWC with 1, 3 or 4 channels")
    if im.shape[2] == 1:
        im = np.repeat(im, 3, 2)
    elif im.shape[2] == 4:
        im = im[..., :3]  # drop alpha
    if im.dtype != np.uint8:
        im = (im * 255 if im.max() <= 1.0 else im).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(im), name


class AutoShape(nn.Module):
    """Pre-processing, inference and NMS around a detection model (DetectionModel or DetectMultiBackend)."""

    conf = 0.25  # NMS confidence threshold
    iou = 0.45  # NMS IoU threshold
    agnostic = False  # class-agnostic NMS
    multi_label = False  # several labels per box
    classes = None  # keep only these class indices, e.g. [0, 15, 16]
    max_det = 1000  # detections per image
    amp = False  # autocast on CUDA

    def __init__(self, model: nn.Module, verbose: bool = True):
        super().__init__()
        if verbose:
            print("Adding AutoShape... ")
        self.model = model.eval()
        self.pt = bool(getattr(model, "pt", True))
        s = getattr(model, "stride", 32)
        self.stride = int(s.max()) if isinstance(s, torch.Tensor) else int(s)
        self.names = dict(getattr(model, "names", {}))
        self.fixed_imgsz = getattr(model, "fixed_imgsz", None)

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.model.parameters(), None)
        if p is not None:
            return p.device, p.dtype
        return getattr(self.model, "device", torch.device("cpu")), torch.half if getattr(self.model, "fp16", False) else torch.float

    @torch.no_grad()
    def forward(self, ims, size: int | tuple = 640, augment: bool = False, profile: bool = False,
                slice: int | str | SliceConfig | None = None, **slice_options):  # noqa: A002
        """Detect objects in `ims`; returns a Detections object (or the raw output for a tensor input).

        `slice`: sliced inference, tiles of that many original pixels ('auto' picks), run at `size`;
        `slice_options`: overlap, batch, full, merge, merge_iou, merge_metric (see utils.slicing.SliceConfig)."""
        device, dtype = self._device_dtype()
        t0 = time.perf_counter()
        if isinstance(ims, torch.Tensor):  # already a batch: no pre-processing, raw model output
            with torch.autocast(device.type, enabled=self.amp and device.type == "cuda"):
                return self.model(ims.to(device).type(dtype), augment=augment)

        batch = list(ims) if isinstance(ims, (list, tuple)) else [ims]
        if not batch:
            raise UserError("no images given")
        size = (size, size) if isinstance(size, int) else tuple(size)
        slicing = slice_config(slice, **slice_options)
        if slicing is not None:
            if augment:
                raise UserError("slice cannot be combined with augment: each tile is one plain pass")
            slicing.check(int(self.stride))
        images, files = [], []
        for i, im in enumerate(batch):
            im, name = _read_image(im, i)
            images.append(im)
            files.append(Path(name).with_suffix(".jpg").name)
        predictor = Predictor(self.model, conf_thres=self.conf, iou_thres=self.iou, max_det=self.max_det,
                              classes=self.classes, agnostic=self.agnostic, multi_label=self.multi_label,
                              augment=augment, half=dtype == torch.half, amp=self.amp, slicing=slicing)
        t_read = time.perf_counter()
        x, pred = predictor.predict_images(images, size, self.stride, self.fixed_imgsz)
        t1 = t_read + predictor.times[0]
        t2, t3 = t1 + predictor.times[1], t1 + predictor.times[1] + predictor.times[2]
        return Detections(images, pred, files, (t0, t1, t2, t3), self.names, tuple(x.shape))


class Detections:
    """Detections for a batch of images: boxes as xyxy/xywh in pixels and normalised, plus helpers."""

    def __init__(self, ims: list[np.ndarray], pred: list[torch.Tensor], files: list[str],
                 times: tuple = (0, 0, 0, 0), names: dict | None = None, shape: tuple | None = None):
        self.ims = ims  # RGB uint8 HWC
        self.pred = pred  # per image (n, 6): x1, y1, x2, y2, conf, cls
        self.names = names or {}
        self.files = files
        self.n = len(pred)
        self.s = shape  # the batch shape the model saw
        self.times = times
        self.t = tuple((times[i + 1] - times[i]) * 1000 / max(self.n, 1) for i in range(3))  # ms per image
        gn = [torch.tensor([im.shape[1], im.shape[0], im.shape[1], im.shape[0], 1, 1], device=p.device) for im, p in zip(ims, pred)]
        self.xyxy = pred
        self.xywh = [torch.cat((xyxy2xywh(p[:, :4]), p[:, 4:]), 1) for p in pred]
        self.xyxyn = [p / g for p, g in zip(self.xyxy, gn)]
        self.xywhn = [p / g for p, g in zip(self.xywh, gn)]

    # --- reporting -----------------------------------------------------------------------------
    def _summary(self, i: int) -> str:
        im, p = self.ims[i], self.pred[i]
        s = f"image {i + 1}/{self.n}: {im.shape[0]}x{im.shape[1]} "
        if not len(p):
            return s + "(no detections)"
        parts = []
        for c in p[:, 5].unique():
            k = int((p[:, 5] == c).sum())
            parts.append(f"{k} {self.names.get(int(c), int(c))}{'s' * (k > 1)}")
        return s + ", ".join(parts)

    def __str__(self) -> str:
        lines = [self._summary(i) for i in range(self.n)]
        lines.append(f"Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape {self.s}" % self.t)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self.n} image(s)>\n{self}"

    def __len__(self) -> int:
        return self.n

    def print(self) -> None:
        print(str(self))

    # --- drawing and saving ------------------------------------------------------------------------
    def _annotated(self, i: int, labels: bool = True) -> np.ndarray:
        """Image i with its boxes drawn, RGB."""
        ann = Annotator(self.ims[i].copy())
        for *box, conf, cls in reversed(self.pred[i].tolist()):
            c = int(cls)
            ann.box_label(box, f"{self.names.get(c, c)} {conf:.2f}" if labels else "", color=colors(c))
        return ann.result()

    def render(self, labels: bool = True) -> list[np.ndarray]:
        """Draw the boxes onto self.ims (RGB) and return them."""
        self.ims = [self._annotated(i, labels) for i in range(self.n)]
        return self.ims

    def show(self, labels: bool = True) -> None:
        for i in range(self.n):
            Image.fromarray(self._annotated(i, labels)).show(title=self.files[i])

    def save(self, labels: bool = True, save_dir: str | Path = "runs/detect/exp", exist_ok: bool = False) -> Path:
        """Write the annotated images to save_dir (incremented unless exist_ok); returns the folder."""
        save_dir = increment_path(save_dir, exist_ok=exist_ok, mkdir=True)
        for i in range(self.n):
            write_image(save_dir / safe_name(self.files[i]), self._annotated(i, labels)[..., ::-1])
        print(f"Saved {self.n} image{'s' * (self.n > 1)} to {save_dir}")
        return save_dir

    def crop(self, save: bool = True, save_dir: str | Path = "runs/detect/exp", exist_ok: bool = False,
             gain: float = 1.02, pad: int = 10) -> list[dict]:
        """Each box's crop (slightly enlarged, clipped), RGB; with save=True also written under save_dir/crops/<class>/."""
        save_dir = increment_path(save_dir, exist_ok=exist_ok, mkdir=True) if save else None
        crops = []
        for i, (im, p) in enumerate(zip(self.ims, self.pred)):
            h, w = im.shape[:2]
            for j, (*box, conf, cls) in enumerate(p.tolist()):
                c = int(cls)
                b = xyxy2xywh(torch.tensor(box).view(1, 4))[0]
                b[2:] = b[2:] * gain + pad
                x1, y1 = int(max(b[0] - b[2] / 2, 0)), int(max(b[1] - b[3] / 2, 0))
                x2, y2 = int(min(b[0] + b[2] / 2, w)), int(min(b[1] + b[3] / 2, h))
                crop = im[y1:y2, x1:x2]
                label = f"{self.names.get(c, c)} {conf:.2f}"
                entry = {"box": box, "conf": conf, "cls": c, "label": label, "im": crop, "image": i}
                if save_dir is not None and crop.size:
                    f = save_dir / "crops" / safe_name(self.names.get(c, c)) / f"{safe_name(Path(self.files[i]).stem)}_{j}.jpg"
                    f.parent.mkdir(parents=True, exist_ok=True)
                    write_image(f, crop[..., ::-1])
                    entry["file"] = f
                crops.append(entry)
        if save_dir is not None:
            print(f"Saved {len(crops)} crop{'s' * (len(crops) != 1)} to {save_dir / 'crops'}")
        return crops

    # --- other views -----------------------------------------------------------------------------
    def pandas(self) -> "Detections":
        """A copy whose xyxy, xyxyn, xywh, xywhn are lists of pandas DataFrames (one per image)."""
        import pandas as pd

        new = copy(self)
        cols = {"xyxy": ("xmin", "ymin", "xmax", "ymax"), "xywh": ("xcenter", "ycenter", "width", "height")}
        for attr in ("xyxy", "xyxyn", "xywh", "xywhn"):
            names = [*cols[attr[:4]], "confidence", "class", "name"]
            frames = []
            for p in getattr(self, attr):
                rows = [[*r[:5], int(r[5]), self.names.get(int(r[5]), str(int(r[5])))] for r in p.tolist()]
                frames.append(pd.DataFrame(rows, columns=names))
            setattr(new, attr, frames)
        return new

    def tolist(self) -> list["Detections"]:
        """One Detections object per image."""
        return [Detections([self.ims[i]], [self.pred[i]], [self.files[i]], self.times, self.names, self.s)
                for i in range(self.n)]
