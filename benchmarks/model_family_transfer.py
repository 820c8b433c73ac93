"""How exactly plain COCO weights start each variant of the small-object family: val mAP and detection gaps.

For each config, yolov5n.pt is transferred (`python -m models.spd convert`), then val.py runs on coco128 and
the detections on ../shared/images are compared with the plain model's (shared levels only for P2 models).
Writes model_family_transfer.{md,csv} next to this file.

Usage:
    python benchmarks/model_family_transfer.py
    python benchmarks/model_family_transfer.py --cfgs yolov5n-spdconv.yaml --imgsz 320   # quicker
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import val as validate  # noqa: E402
from models.spd import convert, level_outputs  # noqa: E402
from models.checkpoints import load_model  # noqa: E402
from utils.errors import report_user_errors  # noqa: E402
from utils.nms import non_max_suppression  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from spd_study import machine  # noqa: E402

CFGS = ("yolov5n-spdconv.yaml", "yolov5n-p2.yaml", "yolov5n-p2-spdconv.yaml", "yolov5n-spdlite.yaml")


def letterboxed(path: Path, size: int = 640) -> torch.Tensor:
    import cv2
    import numpy as np

    from utils.augmentations import letterbox

    im = letterbox(cv2.imread(str(path)), size, stride=32, auto=True)[0]
    return torch.from_numpy(np.ascontiguousarray(im[:, :, ::-1].transpose(2, 0, 1))).float()[None] / 255


@torch.no_grad()
def detection_gap(plain: torch.nn.Module, model: torch.nn.Module, images: Path) -> dict:
    """Over the sample images: detections of each (after NMS on the shared levels) and their largest gaps."""
    out = {"n_plain": 0, "n_variant": 0, "max_box_px": 0.0, "max_score": 0.0, "max_raw_score": 0.0}
    for f in sorted(images.iterdir()):
        x = letterboxed(f)
        la, lb = level_outputs(plain, x), level_outputs(model, x)
        ya = torch.cat([la[s] for s in sorted(la)], 1)
        yb = torch.cat([lb[s] for s in sorted(la)], 1)  # plain's levels only
        out["max_raw_score"] = max(out["max_raw_score"], float((ya[..., 4:] - yb[..., 4:]).abs().max()))
        da, db = non_max_suppression(ya)[0], non_max_suppression(yb)[0]
        out["n_plain"] += len(da)
        out["n_variant"] += len(db)
        if len(da) == len(db) and len(da):
            out["max_box_px"] = max(out["max_box_px"], float((da[:, :4] - db[:, :4]).abs().max()))
            out["max_score"] = max(out["max_score"], float((da[:, 4] - db[:, 4]).abs().max()))
        elif len(da) != len(db):
            out["max_box_px"] = out["max_score"] = float("nan")
    return out


def run(cfgs: list[str], weights: Path, data: str, images: Path, imgsz: int) -> pd.DataFrame:
    rows = []
    plain = load_model(weights, fuse=False)
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in ["plain", *cfgs]:
            w = weights if cfg == "plain" else convert(weights, cfg, Path(tmp) / f"{Path(cfg).stem}.pt")
            r = validate.run(data, weights=w, batch_size=16, imgsz=imgsz, workers=2, plots=False, half=False,
                             project=Path(tmp), name="val")
            ap50, ap = r.map50, r.map
            row = {"model": "yolov5n (yolov5n.pt)" if cfg == "plain" else Path(cfg).stem, "mAP50": ap50, "mAP50-95": ap}
            if cfg != "plain":
                row.update(detection_gap(plain, load_model(w, fuse=False), images))
            rows.append(row)
    return pd.DataFrame(rows)


def _g(v: float) -> str:
    return "n/a" if v != v else f"{v:.3g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfgs", nargs="+", default=list(CFGS))
    parser.add_argument("--weights", default=str(ROOT.parent / "shared" / "weights" / "yolov5n.pt"))
    parser.add_argument("--data", default="../shared/data/coco128/coco128.yaml")
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "images"))
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--out", default=str(Path(__file__).with_name("model_family_transfer")))
    opt = parser.parse_args(argv)
    torch.set_num_threads(2)
    df = run(opt.cfgs, Path(opt.weights), opt.data, Path(opt.images), opt.imgsz)
    df.to_csv(f"{opt.out}.csv", index=False)
    base = df.iloc[0]["mAP50-95"]
    lines = ["# Plain yolov5n.pt transferred into the small-object family", "",
             "| model | mAP50 | mAP50-95 | Δ mAP50-95 vs plain | detections (plain / variant) | max box gap px | max score gap |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for r in df.to_dict("records"):
        if r["model"].startswith("yolov5n (yolov5n.pt)"):
            lines.append(f"| {r['model']} | {r['mAP50']:.4f} | {r['mAP50-95']:.4f} | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['mAP50']:.4f} | {r['mAP50-95']:.4f} | {r['mAP50-95'] - base:+.4f} | "
                     f"{int(r['n_plain'])} / {int(r['n_variant'])} | {_g(r['max_box_px'])} | {_g(r['max_score'])} |")
    lines += ["", f"Command: `{shlex.join(['python', 'benchmarks/model_family_transfer.py', *(argv or sys.argv[1:])])}`; "
              f"val.py on {opt.data} at {opt.imgsz} px (conf 0.001, IoU 0.6); detections: NMS (conf 0.25, IoU 0.45) on "
              f"the letterboxed images of {opt.images}, P2 models on their P3-P5 levels (the levels plain has). "
              "Box/score gaps are over matched detections of all images (n/a when the counts differ).",
              f"Machine: {machine()}; {datetime.now().isoformat(timespec='minutes')}.", ""]
    Path(f"{opt.out}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    report_user_errors(main)()
