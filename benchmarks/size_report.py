"""The README's size-bin outputs: `utils.analyze` on DeepPCB at --img 256 (text -> benchmarks/analyze_deeppcb.md,
picture -> docs/analyze_deeppcb.png), on deepforest and coco128 at 640, and `val.py --sizes aitod` with yolov5n.pt
on coco128 at 640 (-> benchmarks/sizes_coco128.md). Each names the command, machine and versions.

    python benchmarks/size_report.py
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def machine() -> str:
    from importlib.metadata import version

    import numpy
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}, "
            f"numpy {numpy.__version__}, pycocotools {version('pycocotools')}")


def report_lines(out: str) -> str:
    """The command's own report, without the loader's progress and warnings about the read-only data folder."""
    noise = ("train: ", "val: ", "test: ", "Report picture saved", "Speed:", "Results saved")
    return "\n".join(line.replace("Fusing layers... ", "") for line in out.splitlines()
                     if line.strip() and not line.replace("Fusing layers... ", "").startswith(noise))


def run(cmd: list[str]) -> tuple[str, float]:
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return p.stdout, time.perf_counter() - t


def analyze_md(name: str, img: int, tmp: str, picture: bool = False) -> None:
    """benchmarks/analyze_<name>.md (and docs/analyze_<name>.png) from `python -m utils.analyze`."""
    data = SHARED / "data" / name / f"{name}.yaml"
    out, secs = run([sys.executable, "-m", "utils.analyze", "--data", str(data), "--img", str(img), "--project", tmp,
                     "--name", name])
    pic = ""
    if picture:
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(Path(tmp) / name / "report.png", ROOT / "docs" / f"analyze_{name}.png")
        pic = f"Picture: docs/analyze_{name}.png\n"
    shown = f"python -m utils.analyze --data ../shared/data/{name}/{name}.yaml --img {img}"
    (ROOT / "benchmarks" / f"analyze_{name}.md").write_text(
        f"# Dataset report: {name} at --img {img}\n\nCommand: `{shown}` ({secs:.1f} s wall, label scan included)\n"
        f"Machine: {machine()}\n{pic}\n```\n{report_lines(out)}\n```\n")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        analyze_md("deeppcb", 256, tmp, picture=True)
        analyze_md("deepforest", 640, tmp)
        analyze_md("coco128", 640, tmp)
        weights = SHARED / "weights" / "yolov5n.pt"
        coco = SHARED / "data" / "coco128" / "coco128.yaml"
        cmd = [sys.executable, "val.py", "--weights", str(weights), "--data", str(coco), "--img", "640", "--sizes",
               "aitod", "--workers", "0", "--device", "cpu", "--project", tmp, "--name", "val"]
        out, secs = run(cmd)
        shown = "python val.py --weights yolov5n.pt --data ../shared/data/coco128/coco128.yaml --img 640 --sizes aitod"
        (ROOT / "benchmarks" / "sizes_coco128.md").write_text(
            f"# AP and recall by object size: yolov5n.pt on coco128, AI-TOD bins\n\nCommand: `{shown}`\n"
            f"Machine: {machine()}\n\n```\n{report_lines(out)}\n```\n")
    print("wrote benchmarks/analyze_{deeppcb,deepforest,coco128}.md, benchmarks/sizes_coco128.md, docs/analyze_deeppcb.png")


if __name__ == "__main__":
    main()
