"""One inference front end for every weights format, chosen by the file's suffix.

detect.py and val.py call `DetectMultiBackend(weights)(images)` and get the decoded (B, N, 5 + nc)
predictions whatever the format; names, stride and a fixed input size (for fixed-shape exports)
travel inside the exported file:

    .pt                      PyTorch checkpoint (official YOLOv5 or this project's)
    .torchscript             TorchScript (metadata in the archive's extra file config.txt); loading one runs
                             code stored in the file, so it is refused unless trust_weights=True
    .onnx                    ONNX Runtime (metadata in the model's metadata_props)
    *_openvino_model/, .xml  OpenVINO IR (metadata.yaml beside the .xml)

Int8 exports (export.py --int8: *_int8.onnx, *_int8_openvino_model/) load the same way; their metadata
says `int8: true` plus how they were calibrated, exposed as `backend.int8` and `backend.metadata`.
"""
from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import yaml

from models.checkpoints import load_model
from utils.checkpoints import resolve_weights
from utils.errors import UserError
from utils.logging import LOGGER
from utils.names import normalize_names

SUFFIXES = (".pt", ".torchscript", ".onnx", "_openvino_model/ or .xml")
# torch.jit.load runs the archive's own scripted code (e.g. a __setstate__), which can read and write
# files: there is no weights_only mode for TorchScript, so only the user can vouch for such a file.
TORCHSCRIPT_REFUSED = ("refusing to load {w}: loading a TorchScript file runs code stored inside it; "
                       "pass --trust-weights (torch.hub: trust_weights=True) only if you made this file "
                       "or trust whoever did, or use the .pt or .onnx weights instead")


def parse_names(names) -> dict[int, str] | None:
    """Class names from metadata: a dict (JSON or Python literal, keys as str or int) or a list."""
    if names is None:
        return None
    if isinstance(names, str):
        try:
            names = json.loads(names)
        except json.JSONDecodeError:
            try:  # YOLOv5's own exports write str(dict)
                names = ast.literal_eval(names)
            except (ValueError, SyntaxError):
                return None
    if isinstance(names, (dict, list, tuple)):
        try:
            return normalize_names(names)
        except ValueError as e:
            raise UserError(f"in the weights' metadata: {e}") from None
    return None



def _meta_int(meta: dict, key: str, default: int, lo: int, hi: int) -> int:
    """An integer metadata field within [lo, hi]; anything else ('abc', 0, nan) is a one-line UserError."""
    v = meta.get(key, default)
    try:
        f = float(v)
        ok = f == int(f) and lo <= f <= hi
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise UserError(f"the weights' metadata has {key}={str(v)[:40]!r}; expected an integer from {lo} to {hi}")
    return int(f)


def _as_bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes")


def _static_hw(shape) -> tuple[int, int] | None:
    """(h, w) when the last two input dims are fixed numbers, else None."""
    h, w = shape[-2], shape[-1]
    return (int(h), int(w)) if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0 else None


def channels_last(model: nn.Module) -> nn.Module:
    """Store conv weights channels-last: oneDNN's CPU convs then skip a layout reorder per layer (~10%).

    Only the 4-D conv weights are converted (the Detect grids are 5-D); activations follow the weights.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return model


def weights_format(w: Path) -> str:
    """'pt', 'jit', 'onnx' or 'openvino' from the path's suffix (folders: OpenVINO IR)."""
    s = str(w).rstrip("/\\")
    if s.endswith(".pt"):
        return "pt"
    if s.endswith(".torchscript"):
        return "jit"
    if s.endswith(".onnx"):
        return "onnx"
    if s.endswith(".xml") or s.endswith("_openvino_model") or w.is_dir():
        return "openvino"
    raise UserError(f"unsupported weights format '{w.suffix or w.name}' for {w} (supported: {', '.join(SUFFIXES)})")


class DetectMultiBackend(nn.Module):
    """Decoded detections from .pt, TorchScript, ONNX Runtime or OpenVINO weights."""

    def __init__(self, weights: str | Path = "yolov5s.pt", device: torch.device = torch.device("cpu"),
                 fp16: bool = False, fuse: bool = True, data: dict | None = None, trust_weights: bool = False):
        super().__init__()
        w = Path(str(weights[0] if isinstance(weights, (list, tuple)) else weights))
        self.format = weights_format(w)
        self.pt, self.jit, self.onnx, self.openvino = (self.format == f for f in ("pt", "jit", "onnx", "openvino"))
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self.fp16 = fp16 and self.device.type != "cpu"
        self.fixed_imgsz: tuple[int, int] | None = None  # (h, w) for exports traced at one shape
        self.batch: int | None = None  # a fixed batch size of the export, None when any batch works
        self.metadata: dict = {}
        self.int8 = False  # an int8 (quantised) export, from its metadata
        self._warned_augment = False
        if self.format != "openvino" or not w.exists():
            w = resolve_weights(w)
        self.weights = w

        names: dict | None = None
        stride = 32
        if self.pt:
            with torch.no_grad():  # fused weights must not carry autograd history into every forward
                self.model = load_model(w, device=self.device, fuse=fuse)
                if fuse:  # fused for inference: use the exact, faster export form of every SPD layer
                    from models.spd_export import to_export_form

                    to_export_form(self.model)
            self.model.requires_grad_(False)  # an inference front end: no autograd graph per call
            if fuse and self.device.type == "cpu":
                channels_last(self.model)
            if self.fp16:
                self.model.half()
            stride, names = int(self.model.stride.max()), dict(self.model.names)
        elif self.jit:
            if not trust_weights:
                raise UserError(TORCHSCRIPT_REFUSED.format(w=w))
            names, stride = self._load_torchscript(w)
        elif self.onnx:
            names, stride = self._load_onnx(w)
        else:
            names, stride = self._load_openvino(w)
        self.stride = int(stride)
        self.names = names or {i: str(i) for i in range(_meta_int(self.metadata, "nc", 80, 1, 100000))}
        if data and data.get("names") and self.names == {i: str(i) for i in range(len(self.names))}:
            self.names = {int(k): v for k, v in data["names"].items()}

    # --- loaders -------------------------------------------------------------------------------
    def _apply_metadata(self, meta: dict, input_shape=None) -> tuple[dict | None, int]:
        """Common handling of export metadata; the input's static shape, when known, wins over it."""
        self.metadata = meta
        self.int8 = _as_bool(meta.get("int8", False))
        imgsz = meta.get("imgsz") or (list(meta["shape"][-2:]) if meta.get("shape") else None)
        dynamic = _as_bool(meta.get("dynamic", False))
        if input_shape is not None:
            self.fixed_imgsz = _static_hw(input_shape)
            self.batch = input_shape[0] if isinstance(input_shape[0], int) and input_shape[0] > 0 else None
        elif imgsz and not dynamic:  # TorchScript: no shape in the graph, trust what was exported
            try:
                self.fixed_imgsz = (int(imgsz[0]), int(imgsz[-1]))
                b = meta.get("batch") or (meta["shape"][0] if meta.get("shape") else None)
                self.batch = int(b) if b else None
            except (TypeError, ValueError, IndexError, KeyError):
                raise UserError(f"the weights' metadata has an unreadable imgsz/batch ({str(imgsz)[:40]})") from None
        return parse_names(meta.get("names")), _meta_int(meta, "stride", 32, 1, 1024)

    def _load_torchscript(self, w: Path):
        extra = {"config.txt": ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice, on every load
                self.model = torch.jit.load(str(w), _extra_files=extra, map_location=self.device).eval()
        except (RuntimeError, ValueError) as e:
            raise UserError(f"{w} is not a readable TorchScript file ({str(e).splitlines()[0]})") from None
        meta = json.loads(extra["config.txt"]) if extra["config.txt"] else {}
        if _as_bool(meta.get("half", False)):
            if self.device.type == "cpu":
                raise UserError(f"{w} is a half-precision (FP16) TorchScript export and needs a CUDA device")
            self.fp16 = True
        return self._apply_metadata(meta)

    def _load_onnx(self, w: Path):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()  # follow torch.set_num_threads, like the .pt path
        try:
            self.session = ort.InferenceSession(str(w), sess_options=so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise UserError(f"{w} is not a readable ONNX model ({str(e).splitlines()[0][:200]})") from None
        inp = self.session.get_inputs()[0]
        self._in_name, self._out_names = inp.name, [o.name for o in self.session.get_outputs()]
        self._in_dtype = np.float16 if "float16" in inp.type else np.float32
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        out_shape = self.session.get_outputs()[0].shape
        if "nc" not in meta and isinstance(out_shape[-1], int):
            meta["nc"] = out_shape[-1] - 5
        return self._apply_metadata(meta, input_shape=inp.shape)

    def _load_openvino(self, w: Path):
        try:
            import openvino as ov
        except ImportError:
            raise UserError("OpenVINO weights need the openvino package: pip install openvino") from None
        xml = w if w.suffix == ".xml" else next(iter(sorted(w.glob("*.xml"))), None)
        if xml is None or not xml.is_file():
            raise UserError(f"no OpenVINO model (.xml) found in {w}")
        core = ov.Core()
        model = core.read_model(str(xml))
        # f32 inference: the CPU plugin would otherwise pick bf16 on CPUs that have it, changing results
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        self.session = core.compile_model(model, "CPU", config)
        meta_file = xml.parent / "metadata.yaml"
        meta = yaml.safe_load(meta_file.read_text()) if meta_file.is_file() else {}
        ps = model.inputs[0].get_partial_shape()
        shape = [d.get_length() if d.is_static else "?" for d in ps]
        if "nc" not in meta and model.outputs[0].get_partial_shape()[-1].is_static:
            meta["nc"] = model.outputs[0].get_partial_shape()[-1].get_length() - 5
        return self._apply_metadata(meta or {}, input_shape=shape)

    # --- inference ---------------------------------------------------------------------------
    def forward(self, im: torch.Tensor, augment: bool = False) -> torch.Tensor:
        if augment and not self.pt and not self._warned_augment:
            LOGGER.warning(f"augmented inference needs .pt weights; ignored for {self.weights.name}")
            self._warned_augment = True
        if self.fixed_imgsz is not None and tuple(im.shape[-2:]) != tuple(self.fixed_imgsz):
            h, w = self.fixed_imgsz
            raise UserError(f"{self.weights.name} is a fixed-shape export for {h}x{w} images, got "
                            f"{im.shape[-2]}x{im.shape[-1]}: run at --imgsz {h} {w} or re-export with --dynamic")
        if self.batch is not None and im.shape[0] != self.batch:
            return self._forward_fixed_batch(im)
        if self.pt:
            if self.fp16 and im.dtype != torch.float16:
                im = im.half()
            y = self.model(im, augment=augment)
        elif self.jit:
            y = self.model(im.half() if self.fp16 else im.float())
        else:
            x = im.detach().cpu().numpy().astype(self._in_dtype if self.onnx else np.float32, copy=False)
            if self.onnx:
                y = self.session.run(self._out_names[:1], {self._in_name: x})[0]
            else:
                y = self.session(x)[0]
            y = torch.from_numpy(np.asarray(y)).to(self.device)
        return y[0] if isinstance(y, (list, tuple)) else y

    def _forward_fixed_batch(self, im: torch.Tensor) -> torch.Tensor:
        """An export with a fixed batch b: run the images b at a time, padding the last chunk."""
        b, out = self.batch, []
        for chunk in im.split(b):
            n = chunk.shape[0]
            if n < b:
                chunk = torch.cat((chunk, chunk.new_zeros((b - n, *chunk.shape[1:]))))
            out.append(self.forward(chunk)[:n])
        return torch.cat(out)

    def warmup(self, imgsz: tuple = (1, 3, 640, 640)) -> None:
        """One throw-away pass so the first timed image does not pay for lazy initialisation."""
        if self.device.type != "cpu" or not self.pt:
            shape = list(imgsz)
            if self.fixed_imgsz is not None:
                shape[-2:] = self.fixed_imgsz
            im = torch.zeros(*shape, dtype=torch.half if self.fp16 else torch.float, device=self.device)
            self.forward(im)
