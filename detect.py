"""Run detection on images, folders, globs, .txt lists, videos, webcams and streams.

Usage:
    python detect.py --weights yolov5n.pt --source ../shared/images/bus.jpg
    python detect.py --weights yolov5s-spd.pt --source path/to/video.mp4 --save-txt --save-conf
    python detect.py --weights yolov5n.onnx --source 0   # webcam
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from models.backends import DetectMultiBackend  # noqa: E402
from models.predictor import Predictor  # noqa: E402
from utils.annotator import Annotator, colors  # noqa: E402
from utils.boxes import xyxy2xywh, yolo_label_lines  # noqa: E402
from utils.errors import UserError, report_user_errors  # noqa: E402
from utils.checks import check_line_thickness, check_thresholds  # noqa: E402
from utils.files import append_text, check_writable, claim_run_dir, increment_path, open_video_writer, safe_name, write_image  # noqa: E402
from utils.logging import LOGGER, set_verbosity  # noqa: E402
from utils.slicing import add_slice_arguments, fold_slice_options, slice_config  # noqa: E402
from utils.sources import LoadImages, LoadStreams, is_stream  # noqa: E402
from utils.torch_utils import check_img_size, select_device  # noqa: E402
from utils.words import plural  # noqa: E402


def describe(det: torch.Tensor, names: dict) -> str:
    """'4 persons, 1 bus' in YOLOv5's form (counts per class in class order)."""
    parts = []
    for c in det[:, 5].unique():
        n = int((det[:, 5] == c).sum())
        parts.append(f"{n} {plural(str(names[int(c)]), n)}")
    return ", ".join(parts) if parts else "(no detections)"


def save_one_box(xyxy, im: np.ndarray, file: Path, gain: float = 1.02, pad: int = 10) -> np.ndarray:
    """Save the crop of a box (slightly enlarged, clipped to the image) as a jpg; returns the crop."""
    b = xyxy2xywh(torch.tensor(xyxy, dtype=torch.float32).view(-1, 4))
    b[:, 2:] = b[:, 2:] * gain + pad
    x1, y1 = (b[0, 0] - b[0, 2] / 2).clamp(0, im.shape[1]), (b[0, 1] - b[0, 3] / 2).clamp(0, im.shape[0])
    x2, y2 = (b[0, 0] + b[0, 2] / 2).clamp(0, im.shape[1]), (b[0, 1] + b[0, 3] / 2).clamp(0, im.shape[0])
    crop = im[int(y1) : int(y2), int(x1) : int(x2)]
    file.parent.mkdir(parents=True, exist_ok=True)
    stem, n = file.with_suffix(""), 2
    while file.exists():  # several crops of one class in one image
        file = Path(f"{stem}{n}.jpg")
        n += 1
    if crop.size:  # a box clipped to nothing has no pixels to save
        write_image(file, crop)
    return crop


class DetectionWriter:
    """Everything detect.py writes for one detection result: label txt, annotated image or video, crops."""

    def __init__(self, save_dir: Path, names: dict, *, save_img: bool, save_txt: bool, save_conf: bool,
                 save_crop: bool, view_img: bool, line_thickness: int, hide_labels: bool, hide_conf: bool):
        self.save_dir, self.names = save_dir, names
        self.save_img, self.save_txt, self.save_conf, self.save_crop = save_img, save_txt, save_conf, save_crop
        self.view_img, self.line_thickness = view_img, line_thickness
        self.hide_labels, self.hide_conf = hide_labels, hide_conf
        self.videos: dict[str, cv2.VideoWriter] = {}  # one open writer: the video being read

    def write(self, p: Path, im0: np.ndarray, im_raw: np.ndarray, det: torch.Tensor, frame: int, fps) -> None:
        """`det`: (n, 6) in original pixels, highest confidence first; `fps` is None for still images."""
        is_video = fps is not None
        if self.save_txt:
            txt_path = self.save_dir / "labels" / (p.stem + ("" if not is_video else f"_{frame}"))
            lines = yolo_label_lines(det.cpu().flip(0), im0.shape, self.save_conf)  # ascending confidence, as YOLOv5
            if lines:
                append_text(f"{txt_path}.txt", "\n".join(lines) + "\n")
        annotator = Annotator(im0, line_width=self.line_thickness)
        if self.save_img or self.save_crop or self.view_img:
            for *xyxy, conf, cls in reversed(det.tolist()):
                c = int(cls)
                if self.save_img or self.view_img:
                    label = None if self.hide_labels else (self.names[c] if self.hide_conf else f"{self.names[c]} {conf:.2f}")
                    annotator.box_label(xyxy, label or "", color=colors(c, bgr=True))
                if self.save_crop:
                    save_one_box(xyxy, im_raw, self.save_dir / "crops" / safe_name(self.names[c]) / f"{p.stem}.jpg")
        im0 = annotator.result()
        if self.view_img:
            self._show(str(p), im0)
        if self.save_img:
            self._save(self.save_dir / p.name, im0, fps)

    def _show(self, title: str, im: np.ndarray) -> None:
        try:
            cv2.imshow(title, im)
            cv2.waitKey(1)
        except cv2.error:
            LOGGER.warning("--view-img needs an OpenCV build with GUI support; not showing images")
            self.view_img = False

    def _save(self, path: Path, im: np.ndarray, fps) -> None:
        if fps is None:
            write_image(str(path), im)
            return
        if str(path) not in self.videos:  # a new video: close the previous one
            self.close()
            h, w = im.shape[:2]
            self.videos[str(path)] = open_video_writer(str(path.with_suffix(".mp4")), fps, (w, h))
        self.videos[str(path)].write(im)

    def close(self) -> None:
        for w in self.videos.values():
            w.release()
        self.videos.clear()


class ProgressReport:
    """A line per image, or one progress bar per video (a line per frame would flood the terminal)."""

    def __init__(self, verbose: bool):
        self.verbose, self.bar = verbose, None

    def update(self, path: str, line: str, is_video_file: bool, frames: int, infer_s: float) -> None:
        if not self.verbose:
            return
        if is_video_file:
            if self.bar is None or self.bar.desc != str(path):
                self.close()
                self.bar = tqdm(total=frames, desc=str(path), unit="frame")
            self.bar.update(1)
            self.bar.set_postfix_str(line.split(": ", 1)[-1][-60:])
        else:
            self.close()
            print(f"{line}, {infer_s * 1e3:.1f}ms")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def load_detector(weights, device, data, half: bool, trust_weights: bool, imgsz, verbose: bool):
    """The model and the input size it will run at (a fixed-shape export runs at its own)."""
    data_dict = None
    if data:
        from utils.data_config import check_dataset

        data_dict = check_dataset(data, autodownload=False)
    model = DetectMultiBackend(weights, device=device, fp16=half, data=data_dict, trust_weights=trust_weights)
    imgsz = check_img_size(imgsz, model.stride)
    imgsz = imgsz * 2 if len(imgsz) == 1 else imgsz
    if model.pt and verbose:
        print("Fusing layers... ", end="")
        model.model.info(img_size=max(imgsz))
    auto = True
    if model.fixed_imgsz is not None:  # a fixed-shape export can only run at the shape it was traced at
        if tuple(imgsz) != tuple(model.fixed_imgsz):
            LOGGER.info(f"Note: {Path(str(weights)).name} is a fixed-shape export: running at its export size "
                        f"{model.fixed_imgsz[0]}x{model.fixed_imgsz[1]} instead of {imgsz[0]}x{imgsz[1]}")
        imgsz, auto = list(model.fixed_imgsz), False
    return model, list(imgsz), auto


@torch.inference_mode()
def run(
    weights="yolov5s.pt",
    source="../shared/images",
    data=None,
    imgsz=(640, 640),
    conf_thres=0.25,
    iou_thres=0.45,
    max_det=1000,
    device="",
    view_img=False,
    save_txt=False,
    save_conf=False,
    save_crop=False,
    nosave=False,
    classes=None,
    agnostic_nms=False,
    augment=False,
    project=ROOT / "runs/detect",
    name="exp",
    exist_ok=False,
    line_thickness=3,
    hide_labels=False,
    hide_conf=False,
    half=False,
    vid_stride=1,
    verbose=True,
    trust_weights=False,
    quiet=False,
    slice=None,  # noqa: A002 (the --slice option's name)
) -> dict:
    """Detect objects in `source`; returns {'save_dir', 'results': [(path, det tensor n x 6 in original pixels)]}.

    `slice` (a tile size in original pixels, 'auto' or a SliceConfig): sliced inference, see utils/slicing.py."""
    source, webcam = str(source), is_stream(str(source))
    verbose = verbose and not quiet
    slicing = slice_config(slice)
    if slicing is not None and augment:
        raise UserError("--slice cannot be combined with --augment: each tile is one plain pass (drop one of them)")
    check_thresholds(conf_thres, iou_thres, max_det)
    check_line_thickness(line_thickness)
    check_writable(project)
    model, imgsz, auto = load_detector(weights, select_device(device), data, half, trust_weights, imgsz, verbose)
    if slicing is not None:
        slicing.check(model.stride)
    loader = LoadStreams if webcam else LoadImages
    dataset = loader(source, img_size=imgsz, stride=model.stride, auto=auto, vid_stride=vid_stride)
    model.warmup(imgsz=(1, 3, *imgsz))
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)  # made only once inputs are known good
    (save_dir / "labels" if save_txt else save_dir).mkdir(parents=True, exist_ok=True)
    claim_run_dir(save_dir)

    names = model.names
    predictor = Predictor(model, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det, classes=classes,
                          agnostic=agnostic_nms, augment=augment, half=model.fp16, slicing=slicing)
    writer = DetectionWriter(save_dir, names, save_img=not nosave, save_txt=save_txt, save_conf=save_conf,
                             save_crop=save_crop, view_img=view_img, line_thickness=line_thickness,
                             hide_labels=hide_labels, hide_conf=hide_conf)
    progress = ProgressReport(verbose)
    seen, results = 0, []
    shapes: list[tuple[int, ...]] = []  # the network input shapes that actually ran, for the speed line
    for path, im, im0s, cap, s in dataset:
        infer_before = predictor.times[1]
        if slicing is None:
            x, dets = predictor.predict(im, [x.shape for x in im0s] if webcam else [im0s.shape])
        else:  # tiles are cut from the original frames (RGB, as the letterboxed input is)
            originals = [np.ascontiguousarray(o[..., ::-1]) for o in (im0s if webcam else [im0s])]
            x, dets = predictor.predict_images(originals, imgsz, model.stride, model.fixed_imgsz)
        if tuple(x.shape) not in shapes:
            shapes.append(tuple(x.shape))
        for i, det in enumerate(dets):
            seen += 1
            if webcam:
                p, im0, frame, s = Path(path[i]), im0s[i].copy(), dataset.count, f"{i}: "
            else:
                p, im0, frame = Path(path), im0s.copy(), getattr(dataset, "frame", 0)
            is_video = cap is not None or webcam
            det[:, :4] = det[:, :4].round()
            s += "%gx%g " % x.shape[2:] + (f"({predictor.last_tiles} tiles) " if predictor.last_tiles else "")
            s += describe(det, names)
            results.append((str(p) if not is_video else f"{p}:{frame}", det.cpu()))
            fps = (cap.get(cv2.CAP_PROP_FPS) if cap is not None else dataset.fps[i]) if is_video else None
            writer.write(p, im0, im0s[i] if webcam else im0s, det, frame, fps)
        progress.update(path, s, cap is not None and not webcam, getattr(dataset, "frames", 0),
                        predictor.times[1] - infer_before)
    progress.close()
    writer.close()
    if verbose:
        print_summary(predictor.times, seen, shapes, imgsz, save_dir, save_txt, save_txt or not nosave)
    return {"save_dir": save_dir, "results": results, "names": names}


def print_summary(times: list, seen: int, shapes: list, imgsz: list, save_dir: Path, save_txt: bool, saved: bool) -> None:
    per = tuple(x / max(seen, 1) * 1e3 for x in times)
    shown = ", ".join(map(str, shapes[:3])) + (f" and {len(shapes) - 3} more" if len(shapes) > 3 else "")
    print(f"Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape{'s' * (len(shapes) > 1)} "
          f"{shown or (1, 3, *imgsz)}" % per)
    if saved:
        n = len(list(save_dir.glob("labels/*.txt")))
        extra = f"\n{n} label{'s' * (n != 1)} saved to {save_dir / 'labels'}" if save_txt else ""
        LOGGER.info(f"Results saved to {save_dir}{extra}")


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", nargs="+", type=str, default="yolov5s.pt", help="model path(s)")
    parser.add_argument("--source", type=str, default="../shared/images", help="file/dir/glob/.txt/URL, 0 for webcam")
    parser.add_argument("--data", type=str, default=None, help="(optional) dataset.yaml for class names")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640], help="inference size h,w")
    parser.add_argument("--conf-thres", type=float, default=0.25, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.45, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=1000, help="maximum detections per image")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--view-img", action="store_true", help="show results")
    parser.add_argument("--save-txt", action="store_true", help="save results to *.txt")
    parser.add_argument("--save-conf", action="store_true", help="save confidences in --save-txt labels")
    parser.add_argument("--save-crop", action="store_true", help="save cropped prediction boxes")
    parser.add_argument("--nosave", action="store_true", help="do not save images/videos")
    parser.add_argument("--classes", nargs="+", type=int, help="filter by class: --classes 0, or --classes 0 2 3")
    parser.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    parser.add_argument("--augment", action="store_true", help="augmented inference")
    parser.add_argument("--project", default=ROOT / "runs/detect", help="save results to project/name")
    parser.add_argument("--name", default="exp", help="save results to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    parser.add_argument("--line-thickness", default=3, type=int, help="bounding box thickness (pixels)")
    parser.add_argument("--hide-labels", default=False, action="store_true", help="hide labels")
    parser.add_argument("--hide-conf", default=False, action="store_true", help="hide confidences")
    parser.add_argument("--half", action="store_true", help="use FP16 half-precision inference (CUDA only)")
    parser.add_argument("--vid-stride", type=int, default=1, help="video frame-rate stride")
    parser.add_argument("--trust-weights", action="store_true", help="allow TorchScript weights (loading them runs their code)")
    parser.add_argument("--quiet", action="store_true", help="print only warnings and errors")
    add_slice_arguments(parser)
    opt = fold_slice_options(parser.parse_args(argv))
    if isinstance(opt.weights, list) and len(opt.weights) == 1:
        opt.weights = opt.weights[0]
    return opt


@report_user_errors
def main(argv: list[str] | None = None) -> dict:
    opt = parse_opt(argv)
    set_verbosity(opt.quiet)
    return run(**vars(opt))


if __name__ == "__main__":
    main()
