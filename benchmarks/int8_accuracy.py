"""Accuracy cost of int8: mAP50-95 and APs of fp32 vs int8 exports, measured with val.py.

    python benchmarks/int8_accuracy.py --models yolov5n yolov5n-spd --out benchmarks/int8_accuracy

yolov5n is ../shared/weights/yolov5n.pt; yolov5n-spd is its exact SPD transfer
(`python -m models.spd convert --weights yolov5n.pt --cfg yolov5n-spd.yaml`), the same function in
the SPD architecture. Each model is exported at 640 (fixed shape) to fp32 ONNX and int8 ONNX
(ONNX Runtime QDQ, export.py --int8 defaults), and, when openvino/nncf are installed, to fp32 and
int8 OpenVINO (NNCF); int8 is calibrated on --data's train split (coco128: its 128 images, which are
also its val images). Writes <out>.csv and <out>.md naming the command, machine and versions.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import io
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

WEIGHTS = ROOT.parent / "shared" / "weights" / "yolov5n.pt"
DATA = ROOT.parent / "shared" / "data" / "coco128" / "coco128.yaml"


def machine() -> str:
    import os

    from utils.torch_utils import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start"


def versions() -> str:
    import onnxruntime
    import torch

    v = [f"torch {torch.__version__}", f"onnxruntime {onnxruntime.__version__}"]
    for name in ("openvino", "nncf"):
        if importlib.util.find_spec(name):
            v.append(f"{name} {__import__(name).__version__}")
    return ", ".join(v)


def prepare(model: str, folder: Path) -> Path:
    if model.endswith(".pt"):  # a checkpoint of the user's, e.g. fine-tuned on --data
        w = folder / Path(model).name
        shutil.copy(model, w)
        return w
    w = folder / f"{model}.pt"
    if model == "yolov5n":
        shutil.copy(WEIGHTS, w)
    elif model == "yolov5n-spd":
        import subprocess

        subprocess.run([sys.executable, "-m", "models.spd", "convert", "--weights", str(WEIGHTS),
                        "--cfg", "yolov5n-spd.yaml", "--out", str(w)], cwd=ROOT, check=True)
    else:
        raise SystemExit(f"unknown model {model}")
    return w


def evaluate(weights: Path, data: str, imgsz: int) -> tuple[float, float]:
    import val

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        r = val.run(data, weights=str(weights), imgsz=imgsz, batch_size=1, project=weights.parent / "val",
                    plots=False)
    return round(float(r.map), 4), round(float(r.aps), 4)  # mAP50-95, APs


def run(models: list[str], data: str, imgsz: int, calib_images: int, out: str) -> list[dict]:
    import export

    ov = importlib.util.find_spec("openvino") and importlib.util.find_spec("nncf")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            d = Path(tmp) / Path(model).stem
            d.mkdir()
            w = prepare(model, d)
            inc = ["onnx"] + (["openvino"] if ov else [])
            fp32 = export.run(weights=w, imgsz=[imgsz], include=inc)
            int8 = export.run(weights=w, imgsz=[imgsz], include=inc, int8=True, data=data, calib_images=calib_images)
            for fmt in inc:
                m32, s32 = evaluate(fp32[fmt], data, imgsz)
                m8, s8 = evaluate(int8[fmt], data, imgsz)
                rows.append({"model": Path(model).stem, "runtime": "ONNX Runtime" if fmt == "onnx" else "OpenVINO",
                             "fp32_mAP50-95": m32, "int8_mAP50-95": m8, "d_mAP": round(m8 - m32, 4),
                             "fp32_APs": s32, "int8_APs": s8, "d_APs": round(s8 - s32, 4)})
                print(rows[-1], flush=True)
    write(rows, out, models, data, imgsz, calib_images)
    return rows


def sha256(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write(rows: list[dict], out: str, models, data, imgsz, calib_images) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cmd = "python benchmarks/int8_accuracy.py " + " ".join(sys.argv[1:])
    lines = [f"# int8 vs fp32 accuracy ({', '.join(Path(m).stem for m in models)})", "",
             f"Command: `{cmd}`  ", f"Machine: {machine()}  ", f"Versions: {versions()}  ",
             *[f"Weights: {Path(m).name}, sha256 {sha256(m)[:16]}  " for m in models if m.endswith(".pt")],
             f"val.py on {Path(data).name} at {imgsz} (fixed-shape exports, batch 1); int8 calibrated with "
             f"export.py --int8 defaults on the train split (--calib-images {calib_images}); ONNX Runtime: QDQ, "
             "per-channel int8 weights, uint8 activations over mean-minmax ranges with SiLU inputs floored at -8, "
             "the SiLUs feeding Detect in float (models/quantize.py); OpenVINO: NNCF MIXED preset. "
             "Detect layer in float in both.", "",
             "| model | runtime | fp32 mAP50-95 | int8 mAP50-95 | Δ | fp32 APs | int8 APs | Δ |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['runtime']} | {r['fp32_mAP50-95']:.4f} | {r['int8_mAP50-95']:.4f} | "
                     f"{r['d_mAP']:+.4f} | {r['fp32_APs']:.4f} | {r['int8_APs']:.4f} | {r['d_APs']:+.4f} |")
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print(f"Saved {out}.csv and {out}.md")


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["yolov5n", "yolov5n-spd"],
                   help="yolov5n (../shared/weights/yolov5n.pt), yolov5n-spd (its exact SPD transfer) or a .pt file")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--calib-images", type=int, default=300)
    p.add_argument("--out", default=str(ROOT / "runs/benchmarks/int8_accuracy"))
    return p.parse_args(argv)


if __name__ == "__main__":
    run(**vars(parse_opt()))
