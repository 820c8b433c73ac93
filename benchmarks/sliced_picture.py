"""The README's picture: full-image against sliced detections on one image, side by side, with the counts.

Both halves come from detect.py's own run() (the same weights, thresholds and --img); the right one adds
--slice. Writes the side-by-side JPEG and a one-line markdown record of the command and the counts.

Usage:
    python benchmarks/sliced_picture.py --weights ../shared/weights/yolov5n.pt \
        --source ../shared/images/small-vehicles1.jpeg --slice 640 --out benchmarks/sliced_small_vehicles.jpg
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import detect  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=str(ROOT.parent / "shared" / "weights" / "yolov5n.pt"))
    p.add_argument("--source", default=str(ROOT.parent / "shared" / "images" / "small-vehicles1.jpeg"))
    p.add_argument("--img", type=int, default=640)
    p.add_argument("--slice", default="640")
    p.add_argument("--conf", type=float, default=0.25)
    p.add_argument("--out", default="benchmarks/sliced_small_vehicles.jpg")
    opt = p.parse_args(argv)
    torch.set_num_threads(2)
    halves, counts = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, slicing in (("full image", None), (f"sliced {opt.slice}", opt.slice)):
            r = detect.run(weights=opt.weights, source=opt.source, imgsz=[opt.img], conf_thres=opt.conf, project=tmp,
                           name=name.replace(" ", "_"), slice=slicing, line_thickness=1, hide_conf=True, quiet=True)
            det = r["results"][0][1]
            counts.append({r["names"][int(c)]: int((det[:, 5] == c).sum()) for c in det[:, 5].unique()})
            im = cv2.imread(str(next(Path(r["save_dir"]).glob(Path(opt.source).stem + ".*"))))
            label = f"{name}: {len(det)} objects, {counts[-1].get('car', 0)} cars"
            cv2.rectangle(im, (0, 0), (12 * len(label) + 10, 34), (255, 255, 255), -1)
            cv2.putText(im, label, (6, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 2, cv2.LINE_AA)
            halves.append(im)
    out = Path(opt.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), np.concatenate(halves, 1), [cv2.IMWRITE_JPEG_QUALITY, 85])
    line = (f"`python benchmarks/sliced_picture.py {' '.join(sys.argv[1:] if argv is None else argv)}`: "
            f"full image {counts[0]}, sliced {counts[1]} (conf {opt.conf}, --img {opt.img}, torch {torch.__version__})")
    out.with_suffix(".md").write_text(line + "\n")
    print(line)
    return out


if __name__ == "__main__":
    main()
