"""Export a trained model to TorchScript, ONNX or OpenVINO, and check every export against PyTorch.

Usage:
    python export.py --weights yolov5n.pt --include torchscript onnx
    python export.py --weights runs/train/exp/weights/best.pt --include onnx --dynamic --simplify
    python export.py --weights yolov5s-spd.pt --include openvino --imgsz 640 --half

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
from models.spd_export import to_export_form  # noqa: E402
from utils.augmentations import letterbox  # noqa: E402
from utils.checkpoints import load_model, resolve_weights  # noqa: E402
from utils.errors import UserError, report_user_errors  # noqa: E402
from utils.torch_utils import select_device  # noqa: E402

FORMATS = ("torchscript", "onnx", "openvino")
DEFAULT_CHECK_IMAGE = ROOT.parent / "shared" / "images" / "bus.jpg"
# Largest differences an export may show against PyTorch on the check image (float rounding only).
TOLERANCE = {"fp32": {"boxes": 0.05, "scores": 1e-3}, "fp16": {"boxes": 2.0, "scores": 2e-2}}


def export_stem(weights: Path) -> Path:
    """Where exports of `weights` go: beside them, unless that folder is marked read-only (no write bits)."""
    folder = weights.resolve().parent
    if os.access(folder, os.W_OK) and folder.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        return weights.with_suffix("")
    print(f"Note: {folder} is read-only; writing exports to the current folder {Path.cwd()}")
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
        print(f"WARNING: --imgsz {imgsz} must be a multiple of max stride {stride}, updating to {new}")
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


def compare(y: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Max abs differences of decoded predictions: box coordinates (pixels) and scores (obj and classes)."""
    d = (y.detach().float().cpu() - ref.detach().float().cpu()).abs()
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
    del m.metadata_props[:]
    for k, v in meta.items():
        entry = m.metadata_props.add()
        entry.key, entry.value = k, v if isinstance(v, str) else json.dumps(v)
    onnx.save(m, str(f))
    return f


def simplify_onnx(m):
    """onnxslim (or onnxsim) when installed; otherwise the graph is kept and one line says why."""
    try:
        import onnxslim

        print(f"ONNX: simplifying with onnxslim {onnxslim.__version__}...")
        return onnxslim.slim(m)
    except ImportError:
        pass
    try:
        import onnxsim

        print(f"ONNX: simplifying with onnxsim {onnxsim.__version__}...")
        m2, ok = onnxsim.simplify(m)
        return m2 if ok else m
    except ImportError:
        print("WARNING: --simplify needs onnxslim (pip install onnxslim); exporting without simplification")
        return m


def export_openvino(model, im: torch.Tensor, stem: Path, meta: dict, opset: int, dynamic: bool, half: bool,
                    onnx_file: Path | None) -> Path:
    try:
        import openvino as ov
    except ImportError:
        raise UserError("OpenVINO export needs the openvino package: pip install openvino") from None
    folder = Path(f"{stem}_openvino_model")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = onnx_file
        if src is None:  # convert from an ONNX graph, where SPD is already a native SpaceToDepth
            src = export_onnx(model, im, Path(tmp) / f"{stem.name}.onnx", meta, opset, dynamic, simplify=False)
        ov_model = ov.convert_model(str(src))
        ov.save_model(ov_model, str(folder / f"{stem.name}.xml"), compress_to_fp16=half)
    (folder / "metadata.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return folder


# --- the command ------------------------------------------------------------------------------------------
@torch.no_grad()
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
) -> dict[str, Path]:
    """Export `weights` to each format in `include`, check each file; returns {format: path} of the good ones."""
    t0 = time.time()
    include = [x.lower() for x in ([include] if isinstance(include, str) else include)]
    unknown = [x for x in include if x not in FORMATS]
    if unknown or not include:
        raise UserError(f"--include {' '.join(unknown) or '(nothing)'}: choose from {', '.join(FORMATS)}")
    if spd_form not in ("export", "slice"):
        raise UserError(f"--spd-form must be 'export' or 'slice', got '{spd_form}'")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if "openvino" in include:
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise UserError("--include openvino needs the openvino package: pip install openvino") from None
    device = select_device(device)
    if half and device.type == "cpu" and any(x in include for x in ("torchscript", "onnx")):
        raise UserError("--half TorchScript/ONNX export needs a CUDA device (--device 0); "
                        "on CPU only --include openvino supports --half")
    gpu_half = half and device.type != "cpu"

    w = resolve_weights(weights)
    if w.suffix != ".pt":
        raise UserError(f"export reads PyTorch .pt weights, got {w}")
    reference = load_model(w, device=device, fuse=True)  # the authors' SPD form: what the exports must match
    stride, names = int(reference.stride.max()), dict(reference.names)
    imgsz = check_imgsz([int(x) for x in (imgsz if isinstance(imgsz, (list, tuple)) else [imgsz])], stride)
    model = deepcopy(reference)
    if spd_form == "export":
        to_export_form(model, verbose=True)
    detect = model.model[-1]
    detect.inplace = inplace
    detect.export = True  # the graph returns only the decoded (B, N, 5 + nc) tensor
    model.eval().requires_grad_(False)
    if gpu_half:
        model.half()

    im = torch.zeros(batch_size, 3, *imgsz, device=device)
    for _ in range(2):  # dry runs build the Detect grids
        y = model(im.half() if gpu_half else im)
    meta = {"stride": stride, "names": names, "nc": len(names), "imgsz": imgsz, "batch": batch_size,
            "dynamic": dynamic, "half": half, "spd_form": spd_form,
            "source": w.name, "date": datetime.now().isoformat(timespec="seconds"), "producer": "yolov5-spd export.py"}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\nPyTorch: starting from {w} with output shape {tuple(y.shape)} ({w.stat().st_size / 1e6:.1f} MB, "
          f"{n_params:,} parameters, SPD form '{spd_form}')")

    stem = export_stem(w)
    x = im.half() if gpu_half else im
    written: dict[str, Path] = {}
    failed: list[str] = []
    for fmt in FORMATS:
        if fmt not in include:
            continue
        t = time.time()
        print(f"\n{fmt}: exporting with torch {torch.__version__}...")
        try:
            if fmt == "torchscript":
                f = export_torchscript(model, x, stem, meta)
            elif fmt == "onnx":
                f = export_onnx(model, x, stem.with_suffix(".onnx"), meta, opset, dynamic, simplify)
            else:
                f = export_openvino(model, x, stem, meta, opset, dynamic, half, written.get("onnx"))
        except UserError:
            raise
        except Exception as e:  # one format failing must not lose the others
            print(f"{fmt}: export FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            failed.append(fmt)
            continue
        size = sum(p.stat().st_size for p in f.rglob("*")) if f.is_dir() else f.stat().st_size
        print(f"{fmt}: export success in {time.time() - t:.1f}s, saved as {_short(f)} ({size / 1e6:.1f} MB)")
        ok = check_export(f, reference, imgsz, stride, batch_size, dynamic, check_image, device,
                          TOLERANCE["fp16" if half else "fp32"])
        if ok:
            written[fmt] = f
        else:
            failed.append(fmt)

    print(f"\nExport complete ({time.time() - t0:.1f}s)")
    for fmt, f in written.items():
        f = _short(f)
        print(f"{fmt:12s} {f}\n{'':12s} detect: python detect.py --weights {f}\n{'':12s} validate: python val.py --weights {f}")
    if failed:
        raise UserError(f"export failed or did not match PyTorch for: {', '.join(failed)} (see above)")
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
        print(f"  check FAILED: {f.name} did not load or run: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return False
    if y.shape != ref.shape:
        print(f"  check FAILED: output shape {tuple(y.shape)} differs from PyTorch {tuple(ref.shape)}")
        return False
    d = compare(y, ref)
    ok = d["boxes"] <= tol["boxes"] and d["scores"] <= tol["scores"]
    fixed = "" if dynamic else " (fixed shape)"
    print(f"  check {'passed' if ok else 'FAILED'}: reloaded, ran on a letterboxed {tuple(x.shape)} image{fixed}; "
          f"max abs diff vs PyTorch: boxes {d['boxes']:.2e} px, scores {d['scores']:.2e}"
          + ("" if ok else f" (allowed {tol['boxes']} px, {tol['scores']})"))
    return ok


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=str, default="yolov5s.pt", help="model.pt path")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640], help="image (h, w)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size")
    parser.add_argument("--device", default="cpu", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--half", action="store_true", help="FP16 half-precision export")
    parser.add_argument("--inplace", action="store_true", help="set YOLOv5 Detect() inplace=True")
    parser.add_argument("--dynamic", action="store_true", help="dynamic batch and image size")
    parser.add_argument("--simplify", action="store_true", help="simplify the ONNX model (onnxslim)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    parser.add_argument("--include", nargs="+", default=["torchscript", "onnx"], help=f"formats: {', '.join(FORMATS)}")
    parser.add_argument("--spd-form", default="export", choices=("export", "slice"),
                        help="SPD layers as exact export form (default) or the authors' slices")
    parser.add_argument("--check-image", default=None, help="image for the post-export check (default bus.jpg)")
    return parser.parse_args(argv)


@report_user_errors
def main(argv: list[str] | None = None) -> dict[str, Path]:
    opt = parse_opt(argv)
    return run(**vars(opt))


if __name__ == "__main__":
    main()
