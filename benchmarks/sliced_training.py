"""Does slicing pay? Trained weights validated whole and sliced on a large-image val set, in one table.

Give it the best.pt of runs trained with and without `train.py --slice` (same data, epochs and settings
otherwise); every one is validated by val.run without and with `--slice`, all metrics on the full-size val
images. Each row names the run's training options (read from its opt.yaml) and the weights' sha256.

Usage (deepforest; the two runs of the README):
    python train.py --weights ../shared/weights/yolov5n.pt --data ../shared/data/deepforest/deepforest.yaml \
        --hyp hyp.finetune-few.yaml --optimizer AdamW --img 320 --epochs 200 --batch 64 --noval --name df-slice --slice 640
    python train.py ... (the same without --slice) --name df-plain
    python benchmarks/sliced_training.py --weights runs/train/df-slice/weights/best.pt runs/train/df-plain/weights/best.pt \
        --img 320 --slice 640 --out benchmarks/sliced_training_deepforest
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import val  # noqa: E402
from utils.torch_utils import cpu_model  # noqa: E402

TRAIN_KEYS = ("cfg", "hyp", "optimizer", "imgsz", "epochs", "batch_size", "slice")


def training_of(weights: Path) -> str:
    """The run's training options that matter here, from the opt.yaml beside weights/."""
    f = weights.parent.parent / "opt.yaml"
    if not f.is_file():
        return "?"
    opt = yaml.safe_load(f.read_text())
    return " ".join(f"{k}={Path(str(opt.get(k))).name if k in ('cfg', 'hyp') else opt.get(k)}" for k in TRAIN_KEYS
                    if opt.get(k) not in (None, ""))


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "deepforest" / "deepforest.yaml"))
    p.add_argument("--weights", nargs="+", required=True)
    p.add_argument("--img", type=int, default=320)
    p.add_argument("--slice", default="640")
    p.add_argument("--max-det", type=int, default=1000, help="val --max-det and --coco-max-dets")
    p.add_argument("--out", default="runs/benchmarks/sliced_training")
    opt = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in map(Path, opt.weights):
            for sliced in (None, opt.slice):
                with contextlib.redirect_stdout(io.StringIO()):
                    r = val.run(data=opt.data, weights=w, imgsz=opt.img, batch_size=1, max_det=opt.max_det,
                                coco_max_dets=opt.max_det, slice=sliced, project=tmp, plots=False, quiet=True)
                rows.append({"run": w.parent.parent.name, "training": training_of(w),
                             "sha256": hashlib.sha256(w.read_bytes()).hexdigest()[:12],
                             "validation": f"--slice {sliced}" if sliced else "whole image",
                             "mAP50": round(r.map50, 4), "mAP50-95": round(r.map, 4), "APs": round(r.aps, 4),
                             "APm": round(r.apm, 4), "P": round(r.precision, 4), "R": round(r.recall, 4)})
                print(rows[-1])
    df = pd.DataFrame(rows)
    out = Path(opt.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)
    cpu = cpu_model()
    lines = ["# Sliced training and sliced validation", "",
             f"Command: `python benchmarks/sliced_training.py {' '.join(sys.argv[1:] if argv is None else argv)}`  ",
             f"Machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}  ",
             f"Data: {opt.data} (val: full-size images and labels). val.run at --img {opt.img}, --max-det and "
             f"--coco-max-dets {opt.max_det}; mAP50, mAP50-95, P, R: YOLOv5's table; APs, APm: COCOeval.", "",
             "| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"Saved {out.with_suffix('.csv')} and {out.with_suffix('.md')}")
    return df


if __name__ == "__main__":
    main()
