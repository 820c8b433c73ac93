"""Classify images, folders, globs and videos with a classify/train.py checkpoint; prints the top-5.

Usage:
    python classify/predict.py --weights runs/train-cls/exp/weights/best.pt --source ../shared/images
    python classify/predict.py --weights best.pt --source ../shared/videos/car-detection.mp4 --vid-stride 10

Annotated copies (top-5 written on the image or video) go to runs/predict-cls/exp*; --save-txt adds
labels/<name>.txt with one "probability class" line per prediction.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # so `models` and `utils` import when run as a script

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from classify.checkpoint import load_classifier  # noqa: E402
from classify.data import preprocess  # noqa: E402
from utils.errors import UserError, report_user_errors  # noqa: E402
from utils.files import increment_path, open_video_writer, write_bytes, write_image  # noqa: E402
from utils.logging import LOGGER  # noqa: E402
from utils.sources import LoadImages  # noqa: E402
from utils.torch_utils import select_device  # noqa: E402


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Top-5 predictions of a ResNet / ResNet-SPD classifier")
    p.add_argument("--weights", required=True, help="checkpoint from classify/train.py")
    p.add_argument("--source", default="../shared/images", help="image, video, folder, glob or .txt list")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=None, help="default: the training size")
    p.add_argument("--topk", type=int, default=5, help="how many classes to print per image")
    p.add_argument("--device", default="", help="cuda device, i.e. 0, or cpu")
    p.add_argument("--nosave", action="store_true", help="do not save annotated images/videos")
    p.add_argument("--save-txt", action="store_true", help="save predictions to labels/*.txt")
    p.add_argument("--vid-stride", type=int, default=1, help="classify every n-th video frame")
    p.add_argument("--project", default="runs/predict-cls")
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true")
    return p.parse_args(argv)


def annotate(im: np.ndarray, top: list[tuple[str, float]]) -> np.ndarray:
    """Write 'prob name' lines in the top-left corner, scaled to the image size."""
    im = im.copy()
    scale = max(im.shape[0], im.shape[1]) / 640
    lh = max(int(22 * scale), 8)
    for i, (name, prob) in enumerate(top):
        org = (max(int(8 * scale), 1), lh * (i + 1))
        txt = f"{prob:.2f} {name}"
        font = (cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale)
        cv2.putText(im, txt, org, *font, (0, 0, 0), max(int(3 * scale), 2), cv2.LINE_AA)  # dark outline: readable
        cv2.putText(im, txt, org, *font, (255, 255, 255), max(int(scale), 1), cv2.LINE_AA)
    return im


def run(
    weights: str | Path,
    source: str | Path,
    imgsz: int | None = None,
    topk: int = 5,
    device: str = "",
    save_dir: Path | None = None,
    save_img: bool = True,
    save_txt: bool = False,
    vid_stride: int = 1,
) -> list[tuple[str, list[tuple[str, float]]]]:
    """Classify every image / video frame of `source`; returns (path, [(class, probability), ...]) per item.

    With save_dir: annotated copies (save_img) and labels/*.txt (save_txt) are written there."""
    dev = select_device(device)
    model, ckpt = load_classifier(weights, dev)
    names = list(ckpt["names"])
    imgsz = imgsz or int(ckpt["imgsz"])
    if ckpt["model"].endswith("-spd") and imgsz % model.stride:
        raise UserError(f"--imgsz {imgsz} must be a multiple of {model.stride} for this {ckpt['model']} model")
    if topk < 1:
        raise UserError(f"--topk must be at least 1, got {topk}")
    k = min(topk, len(names))
    dataset = LoadImages(str(source), img_size=imgsz, stride=model.stride, auto=False, vid_stride=vid_stride)
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        if save_txt:
            (save_dir / "labels").mkdir(exist_ok=True)
    writers: dict[str, cv2.VideoWriter] = {}
    results = []
    for path, _, im0, cap, status in dataset:
        t = time.perf_counter()
        x = preprocess(im0, imgsz)[None].to(dev)
        with torch.inference_mode():
            prob = model(x).float().softmax(1)[0]
        conf, idx = prob.topk(k)
        top = [(names[i], float(c)) for c, i in zip(conf.tolist(), idx.tolist())]
        dt = (time.perf_counter() - t) * 1e3
        LOGGER.info(f"{status}{imgsz}x{imgsz} {', '.join(f'{n} {c:.2f}' for n, c in top)}, {dt:.1f}ms")
        results.append((path, top))
        if save_dir is None:
            continue
        p = Path(path)
        frame = getattr(dataset, "frame", 0)
        if save_txt:
            stem = p.stem if cap is None else f"{p.stem}_{frame}"
            write_bytes(save_dir / "labels" / f"{stem}.txt", "".join(f"{c:.4f} {n}\n" for n, c in top).encode())
        if not save_img:
            continue
        out = annotate(im0, top)
        if cap is None:
            write_image(save_dir / p.name, out)
        else:
            key = str(save_dir / p.with_suffix(".mp4").name)
            if key not in writers:
                fps = (cap.get(cv2.CAP_PROP_FPS) or 30.0) / max(vid_stride, 1)
                writers[key] = open_video_writer(key, fps, (out.shape[1], out.shape[0]))
            writers[key].write(out)
    for w in writers.values():
        w.release()
    if save_dir is not None:
        LOGGER.info(f"Results saved to {save_dir}")
    return results


@report_user_errors
def main(argv: list[str] | None = None) -> list:
    opt = parse_opt(argv)
    save_img, save_txt = not opt.nosave, opt.save_txt
    save_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok) if save_img or save_txt else None
    return run(opt.weights, opt.source, opt.imgsz, opt.topk, opt.device, save_dir, save_img, save_txt, opt.vid_stride)


if __name__ == "__main__":
    main()
