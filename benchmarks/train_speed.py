"""Training throughput: process wall time of a short from-scratch run, and training images per second.

Usage:
    python benchmarks/train_speed.py                      # yolov5n and yolov5n-spd on coco128, 320 px, 2 epochs
    python benchmarks/train_speed.py --cfgs yolov5s.yaml --epochs 1
Each run is a separate `train.py` process (as a user would start it), timed from launch to exit.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def time_run(cfg: str, data: str, imgsz: int, batch: int, epochs: int, workers: int, project: Path) -> dict:
    cmd = [sys.executable, "train.py", "--data", data, "--cfg", cfg, "--weights", "", "--img", str(imgsz),
           "--batch", str(batch), "--epochs", str(epochs), "--workers", str(workers), "--project", str(project),
           "--name", Path(cfg).stem, "--device", "cpu"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{cfg} failed:\n{r.stderr[-2000:]}")
    m = re.search(r"train: .*?(\d+) images", r.stdout + r.stderr)
    n_images = int(m.group(1)) if m else float("nan")
    return {"cfg": cfg, "imgsz": imgsz, "batch": batch, "epochs": epochs, "wall_s": round(wall, 1),
            "train_images_per_s": round(n_images * epochs / wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfgs", nargs="+", default=["yolov5n.yaml", "yolov5n-spd.yaml"])
    parser.add_argument("--data", default="../shared/data/coco128/coco128.yaml")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "runs" / "benchmarks" / "train_speed.csv"))
    opt = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [time_run(c, opt.data, opt.imgsz, opt.batch, opt.epochs, opt.workers, Path(tmp)) for c in opt.cfgs]
    df = pd.DataFrame(rows)
    print(df.to_string(index=False))
    Path(opt.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(opt.out, index=False)
    print(f"saved {opt.out}")


if __name__ == "__main__":
    main()
