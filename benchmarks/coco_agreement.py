"""How closely val.py's in-memory COCO numbers agree with pycocotools on the json of a real `val.py --save-json` run.

val.py scores its in-memory (unrounded) predictions with `utils.coco.COCOStyleEvaluator` (COCOeval of
faster-coco-eval when installed, else of pycocotools) and, with --save-json, the json it wrote (boxes rounded
to 3 decimals, scores to 5) with pycocotools. This script runs exactly that and records both sets of 12
numbers and their differences.

Usage:
    python benchmarks/coco_agreement.py --weights ../shared/weights/yolov5n.pt --imgsz 640 --out benchmarks
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import val  # noqa: E402
from utils.coco import COCOStyleEvaluator, cocoeval_classes  # noqa: E402


class _RecordingEvaluator(COCOStyleEvaluator):
    """The evaluator val.py uses, unchanged, except that it keeps a copy of its summary."""

    last: dict[str, float] = {}

    def summarize(self, *a, **k):  # type: ignore[override]
        out = super().summarize(*a, **k)
        _RecordingEvaluator.last = dict(out)
        return out


def measure(weights: str, data: str, imgsz: int, batch_size: int) -> tuple[dict[str, float], list[float]]:
    """Run val.run(save_json=True) once; return (native 12 stats, pycocotools 12 stats)."""
    captured: list[list[float]] = []
    real = val.pycocotools_eval

    def recording(*a, **k):
        ev = real(*a, **k)
        captured.append([float(s) for s in ev.stats])
        return ev

    val.COCOStyleEvaluator, val.pycocotools_eval = _RecordingEvaluator, recording
    with tempfile.TemporaryDirectory() as tmp:
        val.run(data=data, weights=weights, imgsz=imgsz, batch_size=batch_size, save_json=True, half=False,
                device="cpu", workers=2, project=tmp, name="exp", plots=False)
    if not captured:
        raise RuntimeError("pycocotools did not run")
    return _RecordingEvaluator.last, captured[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=str(ROOT.parent / "shared" / "weights" / "yolov5n.pt"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "coco128" / "coco128.yaml"))
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "runs" / "benchmarks"))
    argv = sys.argv[1:]
    opt = p.parse_args(argv)
    native, ref = measure(opt.weights, opt.data, opt.imgsz, opt.batch_size)
    rows = ["| stat | in memory | pycocotools on the json | abs. difference |", "|---|---:|---:|---:|"]
    diffs = []
    for i, k in enumerate(COCOStyleEvaluator.STAT_KEYS):
        d = abs(native[k] - ref[i])
        diffs.append(d)
        rows.append(f"| {k} | {native[k]:.6f} | {ref[i]:.6f} | {d:.1e} |")
    ap_max = max(diffs[:6])
    ar_max = max(diffs[6:])
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"
    try:
        import pycocotools

        machine += f", pycocotools {getattr(pycocotools, '__version__', 'installed')}"
    except ImportError:
        pass
    backend = cocoeval_classes()[2]
    if backend != "pycocotools":
        import faster_coco_eval

        machine += f", in memory: {backend} {faster_coco_eval.__version__}"
    cmd = shlex.join(["python", "benchmarks/coco_agreement.py", *argv])
    md = ("# val.py's in-memory COCO evaluation vs pycocotools on its --save-json output\n\n"
          + "\n".join(rows)
          + f"\n\nLargest difference: {ap_max:.1e} over the six AP numbers, {ar_max:.1e} over the six AR numbers.\n\n"
          f"Weights `{Path(opt.weights).name}`, data `{Path(opt.data).name}`, --imgsz {opt.imgsz}, CPU, fp32. "
          f"Machine: {machine}. {datetime.now():%Y-%m-%d %H:%M}.\n\nCommand: `{cmd}`\n")
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "coco_agreement.md").write_text(md)
    print("\n" + md)


if __name__ == "__main__":
    main()
