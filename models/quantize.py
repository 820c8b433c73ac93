"""Int8 post-training quantisation of exported detectors: ONNX Runtime (QDQ) and OpenVINO (NNCF).

Both start from the float ONNX export (SPD layers already in their slice-free export form, so the
graph is convolutions plus native SpaceToDepth nodes) and are calibrated on real training images,
letterboxed exactly as detect.py feeds them (`utils.sources.LoadImages`, same size, stride and `auto`).

Mixed precision: the Detect layer stays float, i.e. every node under the ONNX scope `/model.<last>/`
(the three 1x1 output convs and the whole box/score decoding: Sigmoid, grid and anchor arithmetic,
Concat). Why: one output conv emits box offsets, objectness and class logits in a single tensor, so a
per-tensor int8 scale is dominated by the widest channel and the narrow ones (small-object boxes,
low scores) lose most of their levels; after decoding, boxes are pixels up to the image size, where one
int8 step would be several pixels. Those nodes are about 1% of the FLOPs, so keeping them float costs
almost no speed. Everything before them (backbone and neck convs, SiLU, Concat, Resize, MaxPool) is int8,
except the three SiLUs whose outputs the Detect convs read: their Sigmoid and Mul stay float, so the head
sees its input without a last rounding (three element-wise ops; their convs are still int8).

ONNX Runtime activation ranges (measured on coco128 with yolov5n.pt and its yolov5n-spd transfer, see
benchmarks/int8_accuracy_*.md and the README): ORT's default, the global min/max over all calibration images,
lost 0.018 / 0.031 mAP50-95. Two changes, which only helped together, bring that within 0.01:
- 'mean-minmax' (the default --calib-method): each tensor's range is the mean over calibration images of
  that image's min and max (NNCF's default for activations), so one unusual image does not widen every step;
- SILU_FLOOR: a conv output that feeds a SiLU is quantised over [-8, max] (when its calibrated minimum is
  negative). The pre-activations reach -50 and beyond, and on an asymmetric uint8 grid that tail costs the
  positive side, where SiLU carries its information, many of its levels; SiLU(x) for x < -8 is within
  0.003 of 0, far below one int8 step of the SiLU output (about 0.07 here). Measured alternatives: -6 was
  lower than -8 on both models, and max(mean minimum, -8) lower on yolov5n (0.342 against 0.347).
Both keep every conv's output quantised, which ONNX Runtime needs to run Conv as an int8 kernel
(QLinearConv): quantising only conv inputs (NNCF's layout) was as accurate but twice as slow as float.
"""
from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from utils.errors import UserError
from utils.logging import LOGGER

INT8_DEFAULTS = {"calib_images": 300, "method": "mean-minmax", "seed": 0}
CALIB_METHODS = ("mean-minmax", "minmax", "entropy", "percentile")
SILU_FLOOR = -8.0  # low end of a SiLU input's int8 range (module docstring)


# --- calibration images ----------------------------------------------------------------------------
def calibration_files(data: str | Path | dict | None, n: int, seed: int = 0) -> list[str]:
    """`n` image paths from the dataset's train split (a seeded sample, sorted), all of them when fewer."""
    if data is None:
        raise UserError("--int8 needs calibration images: pass --data <dataset.yaml> (its train split is used)")
    if n < 1:
        raise UserError(f"--calib-images must be at least 1, got {n}")
    from utils.data_config import check_dataset
    from utils.labels import collect_images

    d = check_dataset(data, autodownload=False)
    if not d.get("train"):
        raise UserError(f"--int8: dataset {data} has no train split to calibrate on")
    try:
        files = collect_images(d["train"])
    except UserError as e:
        raise UserError(f"--int8 calibration set is empty: {e}") from None
    if len(files) > n:
        files = sorted(random.Random(seed).sample(files, n))
    from utils.sources import read_image

    if not any(read_image(f)[0] is not None for f in files):  # stops at the first good one: cheap
        raise UserError(f"--int8 calibration set is empty: none of the {len(files)} images in {d['train']} "
                        f"could be read")
    elif len(files) < n:
        LOGGER.info(f"int8: the train split has {len(files)} images, fewer than --calib-images {n}: calibrating on all")
    return files


def calibration_batches(files: list[str], imgsz: list[int], stride: int, batch: int, dynamic: bool
                        ) -> Iterator[np.ndarray]:
    """Float (B, 3, H, W) batches in [0, 1], as DetectMultiBackend receives them from detect.py.

    A fixed-shape export gets exactly its size (auto=False), a dynamic one detect.py's minimal
    rectangle (auto=True, batch 1). A short last batch of a fixed-batch export is padded with zeros,
    as DetectMultiBackend pads it. Unreadable files are skipped with a warning (LoadImages).
    """
    from utils.sources import LoadImages

    b = 1 if dynamic else batch
    chunk: list[np.ndarray] = []
    for _, im, *_ in LoadImages(files, img_size=imgsz, stride=stride, auto=dynamic):
        chunk.append(im.astype(np.float32) / 255)
        if len(chunk) == b:
            yield np.stack(chunk)
            chunk = []
    if chunk:
        yield np.stack(chunk + [np.zeros_like(chunk[0])] * (b - len(chunk)))


class CalibrationReader:
    """onnxruntime.quantization's data reader over `calibration_batches`; counts the real images it fed."""

    def __init__(self, files: list[str], imgsz: list[int], stride: int, batch: int, dynamic: bool,
                 input_name: str = "images"):
        self.args = (files, imgsz, stride, batch, dynamic)
        self.input_name = input_name
        self.rewind()

    def rewind(self) -> None:
        self._it = calibration_batches(*self.args)
        self.images_seen = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        if x is None:
            return None
        self.images_seen += int((x.reshape(len(x), -1).max(1) > 0).sum())  # padding images are all zero
        return {self.input_name: x}


# --- ONNX Runtime ---------------------------------------------------------------------------------------
def head_scope(onnx_model) -> str:
    """The ONNX name scope of the Detect layer: '/model.<i>/' of the last model.<i> in the graph."""
    ids = [int(n.name.split("/")[1].split(".")[1]) for n in onnx_model.graph.node
           if n.name.startswith("/model.") and n.name.split("/")[1].split(".")[1].isdigit()]
    if not ids:
        raise UserError("int8: cannot find the Detect layer in the ONNX graph (node names /model.<i>/...)")
    return f"/model.{max(ids)}/"


def float_nodes(onnx_model) -> list[str]:
    """Nodes kept in float: the Detect layer (output convs and decoding; see the module docstring)."""
    scope = head_scope(onnx_model)
    return [n.name for n in onnx_model.graph.node if n.name.startswith(scope)]



def inline_constant_identities(model) -> int:
    """Drop Identity nodes that forward an initializer (torch.onnx writes some shared conv biases so)."""
    inits = {i.name for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    alias = {n.output[0]: n.input[0] for n in model.graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return 0
    keep = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for n in keep:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return len(alias)


def _consumers(model) -> dict[str, list]:
    users: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    return users


def silu_inputs(model) -> list[str]:
    """Conv outputs that feed a SiLU (x * sigmoid(x) as torch.onnx writes it): their ranges get SILU_FLOOR."""
    users = _consumers(model)
    return [n.output[0] for n in model.graph.node if n.op_type == "Conv"
            and any(u.op_type == "Sigmoid" for u in users.get(n.output[0], []))
            and any(u.op_type == "Mul" for u in users.get(n.output[0], []))]


def head_input_silus(model) -> list[str]:
    """The Sigmoid and Mul nodes of the SiLUs whose outputs the Detect layer's convs read (kept float)."""
    scope = head_scope(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    names = []
    for conv in (n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith(scope)):
        mul = producer.get(conv.input[0])
        if mul is None or mul.op_type != "Mul":
            continue
        sig = [producer[i] for i in mul.input if i in producer and producer[i].op_type == "Sigmoid"]
        if sig and sig[0].input[0] in mul.input:  # x * sigmoid(x): a SiLU, not some other product
            names += [sig[0].name, mul.name]
    return names


def activation_ranges(src: Path, reader: CalibrationReader, method: str) -> dict[str, tuple[float, float]]:
    """{tensor: (min, max)} from ONNX Runtime's calibrators over every image `reader` gives."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    methods = {"mean-minmax": CalibrationMethod.MinMax, "minmax": CalibrationMethod.MinMax,
               "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory() as tmp:
        # moving_average with every image kept is the plain mean of the per-image ranges (ORT's nanmean)
        calibrator = create_calibrator(Path(src), None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=methods[method],
                                       extra_options={"moving_average": method == "mean-minmax"})
        calibrator.collect_data(reader)
        data = calibrator.compute_data()
    return {k: tuple(float(np.asarray(x).item()) for x in v.range_value) for k, v in data.data.items()}


class _OneBatch:
    """The first batch of a reader: quantize_static calibrates again although every range is overridden."""

    def __init__(self, reader: CalibrationReader):
        reader.rewind()
        self._batch = reader.get_next()

    def get_next(self):
        batch, self._batch = self._batch, None
        return batch


def _quantize(src, dst, reader, keep, op_types, symmetric, reduce_range, overrides) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(str(src), str(dst), _OneBatch(reader), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=reduce_range, op_types_to_quantize=op_types,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=keep,
                    extra_options={"ActivationSymmetric": symmetric, "TensorQuantOverrides": overrides})


def quantize_onnx(src: Path, dst: Path, reader: CalibrationReader, method: str = INT8_DEFAULTS["method"],
                  exclude: list[str] | None = None, op_types: list[str] | None = None,
                  symmetric: bool = False, reduce_range: bool = False, silu_floor: float | None = SILU_FLOOR) -> dict:
    """Static QDQ quantisation, int8 per-channel weights, uint8 activations; returns what was done.

    Activation ranges come from `method` over the calibration images (module docstring), SiLU inputs
    floored at `silu_floor` (None: not floored). `exclude` replaces the default float nodes (the Detect
    layer and the SiLUs feeding it); `op_types` limits which op types are quantised (default: every type
    ONNX Runtime can); `symmetric` uses int8 symmetric activations.
    """
    import onnx

    if method not in CALIB_METHODS:
        raise UserError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, got '{method}'")
    src = Path(src)
    model = onnx.load(str(src))
    keep = float_nodes(model) + head_input_silus(model) if exclude is None else exclude
    if inline_constant_identities(model):  # conv biases behind Identity nodes would stay float, unfused
        src = Path(dst).with_name(f".{Path(dst).stem}_prep.onnx")
        onnx.save(model, str(src))
    try:
        ranges = activation_ranges(src, reader, method)
        calib_images = reader.images_seen
        if calib_images == 0:
            raise UserError("--int8 calibration set is empty: none of its images could be read")
        # SiLU inputs that reach below 0 start their grid at the floor (module docstring)
        floored = {t for t in silu_inputs(model) if t in ranges and ranges[t][0] < 0} if silu_floor is not None else set()
        overrides = {name: [{"rmin": np.float32(silu_floor if name in floored else lo), "rmax": np.float32(hi)}]
                     for name, (lo, hi) in ranges.items()}
        _quantize(src, dst, reader, keep, op_types, symmetric, reduce_range, overrides)
    finally:
        if src.name.startswith("."):
            src.unlink(missing_ok=True)
    q = onnx.load(str(dst))
    n_q = sum(n.op_type == "QuantizeLinear" for n in q.graph.node)
    return {"method": method, "calib_images": calib_images, "float_nodes": len(keep),
            "float_scope": head_scope(model), "quantize_nodes": n_q, "silu_floor": silu_floor,
            "floored_tensors": len(floored)}


# --- OpenVINO (NNCF) -------------------------------------------------------------------------------------
def quantize_openvino(ov_model, files: list[str], imgsz: list[int], stride: int, batch: int, dynamic: bool,
                      head: str):
    """NNCF post-training quantisation of an OpenVINO model; the Detect scope `head` stays float.

    Preset MIXED: symmetric int8 weights, asymmetric activations (SiLU outputs are not centred on 0).
    """
    try:
        import nncf
    except ImportError:
        raise UserError("--int8 --include openvino needs the nncf package: pip install nncf") from None
    import re

    batches = list(calibration_batches(files, imgsz, stride, batch, dynamic))
    if not batches:
        raise UserError("--int8 calibration set is empty: none of its images could be read")
    ds = nncf.Dataset(batches)
    q = nncf.quantize(ov_model, ds, subset_size=len(batches), preset=nncf.QuantizationPreset.MIXED,
                      ignored_scope=nncf.IgnoredScope(patterns=[re.escape(head) + ".*"], validate=False))
    n_images = int(sum((b.reshape(len(b), -1).max(1) > 0).sum() for b in batches))
    return q, {"method": "nncf", "calib_images": n_images, "float_scope": head}
