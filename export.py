"""Export a trained model to TorchScript, ONNX or OpenVINO, and check every export against PyTorch.

Usage:
    python export.py --weights yolov5n.pt --include torchscript onnx
    python export.py --weights runs/train/exp/weights/best.pt --include onnx --dynamic --simplify
    python export.py --weights yolov5s-spd.pt --include openvino --imgsz 640 --half
    python export.py --weights yolov5n.pt --include onnx openvino --int8 --data coco128.yaml  # int8, calibrated

Exports are written next to the weights (into the current folder when the weights' folder is read-only).
SPD layers are written in their exact export form (models/spd_export.py): no slicing in any graph.
Each file is reloaded after writing, run on a letterboxed image and compared with the PyTorch model;
the maximum absolute differences are printed. Use the files with detect.py and val.py:
    python detect.py --weights yolov5n.onnx
    python val.py --weights yolov5n.onnx --data coco128.yaml
"""
from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import tempfile
import time
import warnings
from copy import deepcopy
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from models.backends import DetectMultiBackend  # noqa: E402
from models.checkpoints import load_model  # noqa: E402
from models.quantize import (CALIB_METHODS, INT8_DEFAULTS, CalibrationReader, calibration_files, head_scope,  # noqa: E402
                             quantize_onnx, quantize_openvino)
from models.spd_export import to_export_form  # noqa: E402
from utils.augmentations import letterbox  # noqa: E402
from utils.checkpoints import resolve_weights  # noqa: E402
from utils.logging import LOGGER, set_verbosity  # noqa: E402
from utils.errors import UserError, report_user_errors  # noqa: E402
from utils.torch_utils import select_device  # noqa: E402

FORMATS = ("torchscript", "onnx", "openvino")
INT8_FORMATS = ("onnx", "openvino")
DEFAULT_CHECK_IMAGE = ROOT.parent / "shared" / "images" / "bus.jpg"
# Largest differences an export may show against PyTorch on the check image (float rounding only).
# int8 is judged on confident predictions only (see compare); its limits are quantisation noise, not bugs.
TOLERANCE = {"fp32": {"boxes": 0.05, "scores": 1e-3}, "fp16": {"boxes": 2.0, "scores": 2e-2},
             "int8": {"boxes": 20.0, "scores": 0.3, "confident": 0.25}}


def export_stem(weights: Path) -> Path:
    """Where exports of `weights` go: beside them, unless that folder is marked read-only (no write bits)."""
    folder = weights.resolve().parent
    if os.access(folder, os.W_OK) and folder.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        return weights.with_suffix("")
    LOGGER.info(f"Note: {folder} is read-only; writing exports to the current folder {Path.cwd()}")
    return Path.cwd() / weights.stem


def _short(p: Path) -> Path:
    """p relative to the current folder when it lies inside it (what a user would type)."""
    try:
        return p.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return p


def check_imgsz(imgsz: list[int], stride: int) -> list[int]:
    sizes = list(imgsz) * 2 if len(imgsz) == 1 else list(imgsz)
    if len(sizes) != 2 or any(int(s) <= 0 for s in sizes):
        raise UserError(f"--imgsz takes one or two positive sizes (h w), got {imgsz}")
    new = [int(-(-int(s) // stride) * stride) for s in sizes]
    if new != sizes:
        LOGGER.warning(f"--imgsz {imgsz} must be a multiple of max stride {stride}, updating to {new}")
    return new


def synthetic_image(h: int = 480, w: int = 640) -> np.ndarray:
    """A deterministic BGR test picture (gradients and shapes), when no real image is at hand."""
    y, x = np.mgrid[0:h, 0:w]
    im = np.stack(((x * 255 // w), (y * 255 // h), ((x + y) * 127 // (w + h))), -1).astype(np.uint8)
    cv2.circle(im, (w // 3, h // 2), min(h, w) // 6, (40, 200, 40), -1)
    cv2.rectangle(im, (w // 2, h // 4), (w * 7 // 8, h * 3 // 4), (200, 60, 30), -1)
    return im


def check_input(imgsz: list[int], stride: int, batch: int, dynamic: bool, image: str | Path | None) -> torch.Tensor:
    """A letterboxed real image (B, 3, H, W) float in [0, 1]: at the export size, or any valid shape if dynamic."""
    path = Path(image) if image else DEFAULT_CHECK_IMAGE
    im0 = cv2.imread(str(path)) if path.is_file() else None
    if im0 is None:
        if image:
            raise UserError(f"--check-image {image} is not a readable image")
        im0 = synthetic_image()
    im = letterbox(im0, imgsz, stride=stride, auto=dynamic)[0]  # dynamic: a rectangle, not the export shape
    im = np.ascontiguousarray(im.transpose(2, 0, 1)[::-1])
    return torch.from_numpy(im).float().div(255)[None].repeat(batch, 1, 1, 1)


def compare(y: torch.Tensor, ref: torch.Tensor, confident: float | None = None) -> dict[str, float]:
    """Max abs differences of decoded predictions: box coordinates (pixels) and scores (obj and classes).

    With `confident`, only anchors whose score (obj * best class) exceeds it in either output count:
    int8 noise moves background anchors a lot, and those never survive the confidence threshold.
    """
    y, ref = y.detach().float().cpu(), ref.detach().float().cpu()
    d = (y - ref).abs()
    if confident is not None:
        keep = torch.zeros(d.shape[:-1], dtype=torch.bool)
        for t in (y, ref):
            keep |= t[..., 4] * t[..., 5:].max(-1).values > confident
        d = d[keep]
    if not d.numel():
        return {"boxes": 0.0, "scores": 0.0}
    return {"boxes": float(d[..., :4].max()), "scores": float(d[..., 4:].max())}


# --- the exporters ------------------------------------------------------------------------------------
def export_torchscript(model, im: torch.Tensor, stem: Path, meta: dict) -> Path:
    f = stem.with_suffix(".torchscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; the file is checked below
        ts = torch.jit.trace(model, im, strict=False)
    config = {"shape": list(im.shape), **meta}
    ts.save(str(f), _extra_files={"config.txt": json.dumps(config)})
    return f


def export_onnx(model, im: torch.Tensor, f: Path, meta: dict, opset: int, dynamic: bool, simplify: bool) -> Path:
    import onnx

    axes = None
    if dynamic:
        axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 1: "anchors"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, im, str(f), verbose=False,
                          opset_version=opset, do_constant_folding=True, input_names=["images"],
                          output_names=["output0"], dynamic_axes=axes, dynamo=False)
    m = onnx.load(str(f))
    onnx.checker.check_model(m)
    if simplify:
        m = simplify_onnx(m)
    _set_onnx_metadata(m, meta)
    onnx.save(m, str(f))
    return f


def simplify_onnx(m):
    """onnxslim (or onnxsim) when installed; otherwise the graph is kept and one line says why."""
    try:
        import onnxslim

        LOGGER.info(f"ONNX: simplifying with onnxslim {onnxslim.__version__}...")
        return onnxslim.slim(m)
    except ImportError:
        pass
    try:
        import onnxsim

        LOGGER.info(f"ONNX: simplifying with onnxsim {onnxsim.__version__}...")
        m2, ok = onnxsim.simplify(m)
        return m2 if ok else m
    except ImportError:
        LOGGER.warning("--simplify needs onnxslim (pip install onnxslim); exporting without simplification")
        return m


def _set_onnx_metadata(m, meta: dict) -> None:
    del m.metadata_props[:]
    for k, v in meta.items():
        entry = m.metadata_props.add()
        entry.key, entry.value = k, v if isinstance(v, str) else json.dumps(v)


def export_onnx_int8(src: Path, f: Path, meta: dict, q: dict) -> Path:
    """Static int8 (QDQ) quantisation of the float ONNX export, calibrated on q['files']."""
    import onnx

    reader = CalibrationReader(q["files"], q["imgsz"], q["stride"], q["batch"], q["dynamic"])
    LOGGER.info(f"ONNX int8: calibrating on {len(q['files'])} images ({q['method']}), Detect layer kept in float...")
    info = quantize_onnx(src, f, reader, method=q["method"])
    m = onnx.load(str(f))
    _set_onnx_metadata(m, {**meta, "int8": True, "quantization": {"runtime": "onnxruntime", **info}})
    onnx.save(m, str(f))
    LOGGER.info(f"ONNX int8: {info['calib_images']} calibration images, {info['quantize_nodes']} QuantizeLinear nodes, "
                f"{info['float_nodes']} nodes in float (Detect {info['float_scope']} and the SiLUs it reads), "
                f"{info['floored_tensors']} SiLU inputs floored at {info['silu_floor']}")
    return f


def export_openvino(src: Path, stem: Path, meta: dict, half: bool, q: dict | None = None) -> Path:
    """OpenVINO IR converted from the float ONNX graph (SPD already native SpaceToDepth); NNCF int8 with q."""
    try:
        import openvino as ov
    except ImportError:
        raise UserError("OpenVINO export needs the openvino package: pip install openvino") from None
    ov_model = ov.convert_model(str(src))
    if q:
        import onnx

        LOGGER.info(f"OpenVINO int8: calibrating on {len(q['files'])} images (NNCF), Detect layer kept in float...")
        head = head_scope(onnx.load(str(src)))
        ov_model, info = quantize_openvino(ov_model, q["files"], q["imgsz"], q["stride"], q["batch"], q["dynamic"], head)
        meta = {**meta, "int8": True, "quantization": {"runtime": "openvino-nncf", **info}}
    folder = Path(f"{stem}{'_int8' if q else ''}_openvino_model")
    folder.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov_model, str(folder / f"{stem.name}.xml"), compress_to_fp16=half)
    (folder / "metadata.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return folder


# --- the command ------------------------------------------------------------------------------------------
def _check_options(include: list[str], spd_form: str, batch_size: int, int8: bool, half: bool, dynamic: bool) -> None:
    """Refuse contradictory or unknown options before anything is read or written."""
    unknown = [x for x in include if x not in FORMATS]
    if unknown or not include:
        raise UserError(f"--include {' '.join(unknown) or '(nothing)'}: choose from {', '.join(FORMATS)}")
    if spd_form not in ("export", "slice"):
        raise UserError(f"--spd-form must be 'export' or 'slice', got '{spd_form}'")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if int8:
        if not any(x in include for x in INT8_FORMATS):
            raise UserError(f"--int8 quantises --include {' or '.join(INT8_FORMATS)}, got --include {' '.join(include)}")
        if half:
            raise UserError("--int8 and --half are two different precisions: pass one of them")
        if dynamic and batch_size > 1:  # which batch to calibrate and check would be a guess
            raise UserError(f"--int8 --dynamic makes the batch free, but --batch-size {batch_size} asks for a fixed "
                            f"batch: drop --dynamic (fixed batch {batch_size}) or --batch-size")


def _export_one(fmt: str, model, x: torch.Tensor, stem: Path, meta: dict, opset: int, dynamic: bool, half: bool,
                simplify: bool, tmp: Path, int8: dict | None) -> Path:
    """One format's export (int8 when `int8` holds the calibration settings); raises on failure."""
    if fmt == "torchscript":
        return export_torchscript(model, x, stem, meta)
    fp32_onnx = tmp / f"{stem.name}.onnx"  # float source of the int8 and OpenVINO exports
    if not fp32_onnx.is_file():
        if fmt == "onnx" and not int8:
            fp32_onnx = stem.with_suffix(".onnx")
        export_onnx(model, x, fp32_onnx, meta, opset, dynamic, simplify and fmt == "onnx")
    if fmt == "onnx":
        return export_onnx_int8(fp32_onnx, Path(f"{stem}_int8.onnx"), meta, int8) if int8 else fp32_onnx
    return export_openvino(fp32_onnx, stem, meta, half, int8)


def _missing_package(fmt: str, int8: bool) -> str | None:
    """Why `fmt` cannot be exported here (an optional package is not installed), or None."""
    import importlib.util

    need = {"openvino": ["openvino"] + (["nncf"] if int8 else [])}.get(fmt, [])
    for name in need:
        try:
            if importlib.util.find_spec(name) is None:
                raise ImportError
            __import__(name)
        except (ImportError, ValueError):  # ValueError: find_spec of a module blocked in sys.modules
            return f"{'int8 ' if name == 'nncf' else ''}OpenVINO export needs the {name} package: pip install {name}"
    return None


def _print_usage(written: dict[str, Path]) -> None:
    for fmt, f in written.items():
        f = _short(f)
        LOGGER.info(f"{fmt:12s} {f}\n{'':12s} detect: python detect.py --weights {f}\n{'':12s} validate: python val.py --weights {f}")


@torch.no_grad()
def prepare_model(w: Path, device: torch.device, imgsz, batch_size: int, spd_form: str, gpu_half: bool):
    """(reference model, model to export, example input, checked image size); prints the starting point."""
    reference = load_model(w, device=device, fuse=True)  # the authors' SPD form: what the exports must match
    stride = int(reference.stride.max())
    imgsz = check_imgsz([int(x) for x in (imgsz if isinstance(imgsz, (list, tuple)) else [imgsz])], stride)
    model = deepcopy(reference)
    if spd_form == "export":
        to_export_form(model, verbose=True)
    model.model[-1].export = True  # the graph returns only the decoded (B, N, 5 + nc) tensor
    model.eval().requires_grad_(False)
    if gpu_half:
        model.half()
    im = torch.zeros(batch_size, 3, *imgsz, device=device)
    x = im.half() if gpu_half else im
    for _ in range(2):  # dry runs build the Detect grids
        y = model(x)
    n_params = sum(p.numel() for p in model.parameters())
    LOGGER.info(f"\nPyTorch: starting from {w} with output shape {tuple(y.shape)} ({w.stat().st_size / 1e6:.1f} MB, "
          f"{n_params:,} parameters, SPD form '{spd_form}')")
    return reference, model, x, imgsz


def _export_reported(fmt: str, model, x, stem: str, meta: dict, opset: int, dynamic: bool, half: bool, simplify: bool,
                     tmp: Path, q: dict | None) -> Path | str:
    """Export one format with its progress lines; returns the file, or why it failed (the others still run)."""
    t = time.time()
    LOGGER.info(f"\n{fmt}: exporting{' int8' if q else ''} with torch {torch.__version__}...")
    try:
        f = _export_one(fmt, model, x, stem, meta, opset, dynamic, half, simplify, tmp, q)
    except UserError as e:  # e.g. an optional package missing
        return str(e)
    except Exception as e:  # one format failing must not lose the others
        LOGGER.info(f"{fmt}: export FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return "export failed (see above)"
    size = sum(p.stat().st_size for p in f.rglob("*")) if f.is_dir() else f.stat().st_size
    LOGGER.info(f"{fmt}: export success in {time.time() - t:.1f}s, saved as {_short(f)} ({size / 1e6:.1f} MB)")
    return f


def run(
    weights: str | Path = "yolov5s.pt",
    imgsz: tuple | list = (640, 640),
    batch_size: int = 1,
    device: str = "cpu",
    include: tuple | list = ("torchscript", "onnx"),
    half: bool = False,
    inplace: bool = False,
    dynamic: bool = False,
    simplify: bool = False,
    opset: int = 17,
    spd_form: str = "export",
    check_image: str | Path | None = None,
    int8: bool = False,
    data: str | Path | dict | None = None,
    calib_images: int = INT8_DEFAULTS["calib_images"],
    calib_method: str = INT8_DEFAULTS["method"],
) -> dict[str, Path]:
    """Export `weights` to each format in `include`, check each file; returns {format: path} of the good ones.

    Every format that can be exported is written; the others are named in one final error (non-zero exit).
    """
    t0 = time.time()
    include = [x.lower() for x in ([include] if isinstance(include, str) else include)]
    _check_options(include, spd_form, batch_size, int8, half, dynamic)
    device = select_device(device)
    if half and device.type == "cpu" and any(x in include for x in ("torchscript", "onnx")):
        raise UserError("--half TorchScript/ONNX export needs a CUDA device (--device 0); "
                        "on CPU only --include openvino supports --half")
    gpu_half = half and device.type != "cpu"
    calib = None
    if int8:  # the calibration set is checked before anything is exported
        calib = {"files": calibration_files(data, calib_images), "method": calib_method, "batch": batch_size}
        if "torchscript" in include:
            LOGGER.info("Note: --int8 applies to ONNX and OpenVINO; TorchScript is exported in float")

    w = resolve_weights(weights)
    if w.suffix != ".pt":
        raise UserError(f"export reads PyTorch .pt weights, got {w}")
    reference, model, x, imgsz = prepare_model(w, device, imgsz, batch_size, spd_form, gpu_half)
    stride, names = int(reference.stride.max()), dict(reference.names)
    meta = {"stride": stride, "names": names, "nc": len(names), "imgsz": imgsz, "batch": batch_size,
            "dynamic": dynamic, "half": half, "spd_form": spd_form,
            "source": w.name, "date": datetime.now().isoformat(timespec="seconds"), "producer": "yolov5-spd export.py"}
    written: dict[str, Path] = {}
    failed: dict[str, str] = {}  # format -> why, reported in the final error line
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in (f for f in FORMATS if f in include):
            q = {**calib, "imgsz": imgsz, "stride": stride, "dynamic": dynamic} if calib and fmt in INT8_FORMATS else None
            why = _missing_package(fmt, bool(q))  # reported once, in the final error line
            f = None if why else _export_reported(fmt, model, x, export_stem(w), meta, opset, dynamic, half, simplify,
                                                  Path(tmp), q)
            if f is None or isinstance(f, str):
                failed[fmt] = why or f
                continue
            tol = TOLERANCE["int8" if q else "fp16" if half else "fp32"]
            if check_export(f, reference, imgsz, stride, batch_size, dynamic, check_image, device, tol):
                written[fmt] = f
            else:
                failed[fmt] = "did not match PyTorch (see above)"

    LOGGER.info(f"\nExport complete ({time.time() - t0:.1f}s)")
    _print_usage(written)
    if failed:
        done = f"; written: {', '.join(str(_short(f)) for f in written.values())}" if written else ""
        raise UserError("not exported: " + "; ".join(f"{k} ({v})" for k, v in failed.items()) + done)
    return written


def check_export(f: Path, reference, imgsz, stride, batch, dynamic, image, device, tol: dict) -> bool:
    """Reload an export, run it on a letterboxed image, compare with the PyTorch model; print the differences."""
    try:
        backend = DetectMultiBackend(f, device=device, trust_weights=True)  # the file this run just wrote
        x = check_input(imgsz, stride, batch, dynamic, image).to(device)
        y = backend(x)
        ref = reference(x)[0]
    except UserError:
        raise
    except Exception as e:
        LOGGER.info(f"  check FAILED: {f.name} did not load or run: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return False
    if y.shape != ref.shape:
        LOGGER.info(f"  check FAILED: output shape {tuple(y.shape)} differs from PyTorch {tuple(ref.shape)}")
        return False
    d = compare(y, ref, tol.get("confident"))
    ok = d["boxes"] <= tol["boxes"] and d["scores"] <= tol["scores"]
    fixed = "" if dynamic else " (fixed shape)"
    LOGGER.info(f"  check {'passed' if ok else 'FAILED'}: reloaded, ran on a letterboxed {tuple(x.shape)} image{fixed}; "
          f"max abs diff vs PyTorch{' (confident anchors)' if tol.get('confident') else ''}: "
          f"boxes {d['boxes']:.2e} px, scores {d['scores']:.2e}"
          + ("" if ok else f" (allowed {tol['boxes']} px, {tol['scores']})"))
    return ok


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=str, default="yolov5s.pt", help="model.pt path")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640], help="image (h, w)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size")
    parser.add_argument("--device", default="cpu", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--half", action="store_true", help="FP16 half-precision export")
    parser.add_argument("--inplace", action="store_true", help="accepted for YOLOv5 compatibility (no effect: the exported Detect decodes out of place)")
    parser.add_argument("--dynamic", action="store_true", help="dynamic batch and image size")
    parser.add_argument("--simplify", action="store_true", help="simplify the ONNX model (onnxslim)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    parser.add_argument("--include", nargs="+", default=["torchscript", "onnx"], help=f"formats: {', '.join(FORMATS)}")
    parser.add_argument("--spd-form", default="export", choices=("export", "slice"),
                        help="SPD layers as exact export form (default) or the authors' slices")
    parser.add_argument("--check-image", default=None, help="image for the post-export check (default bus.jpg)")
    parser.add_argument("--int8", action="store_true", help="int8 ONNX (ONNX Runtime QDQ) / OpenVINO (NNCF) export")
    parser.add_argument("--data", default=None, help="dataset.yaml whose train split calibrates --int8")
    parser.add_argument("--calib-images", type=int, default=INT8_DEFAULTS["calib_images"],
                        help="number of train images to calibrate --int8 on")
    parser.add_argument("--calib-method", default=INT8_DEFAULTS["method"], choices=CALIB_METHODS,
                        help="ONNX Runtime calibration method for --int8")
    parser.add_argument("--quiet", action="store_true", help="print only warnings and errors")
    return parser.parse_args(argv)


@report_user_errors
def main(argv: list[str] | None = None) -> dict[str, Path]:
    opt = parse_opt(argv)
    set_verbosity(opt.quiet)
    return run(**{k: v for k, v in vars(opt).items() if k != "quiet"})


if __name__ == "__main__":
    main()
