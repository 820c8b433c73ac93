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
from utils.annotator import Annotator, colors  # noqa: E402
from utils.boxes import scale_boxes, xyxy2xywh, yolo_label_lines  # noqa: E402
from utils.errors import report_user_errors  # noqa: E402
from utils.checks import check_line_thickness, check_thresholds  # noqa: E402
from utils.files import append_text, check_writable, claim_run_dir, increment_path, open_video_writer, safe_name, write_image  # noqa: E402
from utils.nms import non_max_suppression  # noqa: E402
from utils.sources import LoadImages, LoadStreams, is_stream  # noqa: E402
from utils.torch_utils import check_img_size, select_device, time_sync  # noqa: E402
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
    visualize=False,
    update=False,
    project=ROOT / "runs/detect",
    name="exp",
    exist_ok=False,
    line_thickness=3,
    hide_labels=False,
    hide_conf=False,
    half=False,
    dnn=False,
    vid_stride=1,
    verbose=True,
    trust_weights=False,
) -> dict:
    """Detect objects in `source`; returns {'save_dir', 'results': [(path, det tensor n x 6 in original pixels)]}."""
    source = str(source)
    save_img = not nosave
    webcam = is_stream(source)
    check_thresholds(conf_thres, iou_thres, max_det)
    check_line_thickness(line_thickness)
    check_writable(project)

    device = select_device(device)
    data_dict = None
    if data:
        from utils.data_config import check_dataset

        data_dict = check_dataset(data, autodownload=False)
    model = DetectMultiBackend(weights, device=device, fp16=half, data=data_dict, trust_weights=trust_weights)
    stride, names = model.stride, model.names
    imgsz = check_img_size(imgsz, stride)
    imgsz = imgsz * 2 if len(imgsz) == 1 else imgsz
    if model.pt and verbose:
        print("Fusing layers... ", end="")
        model.model.info(img_size=max(imgsz))
    auto = True
    if model.fixed_imgsz is not None:  # a fixed-shape export can only run at the shape it was traced at
        if tuple(imgsz) != tuple(model.fixed_imgsz):
            print(f"Note: {Path(str(weights)).name} is a fixed-shape export: running at its export size "
                  f"{model.fixed_imgsz[0]}x{model.fixed_imgsz[1]} instead of {imgsz[0]}x{imgsz[1]}")
        imgsz, auto = list(model.fixed_imgsz), False

    if webcam:
        dataset = LoadStreams(source, img_size=imgsz, stride=stride, auto=auto, vid_stride=vid_stride)
    else:
        dataset = LoadImages(source, img_size=imgsz, stride=stride, auto=auto, vid_stride=vid_stride)
    model.warmup(imgsz=(1, 3, *imgsz))
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)  # made only once inputs are known good
    (save_dir / "labels" if save_txt else save_dir).mkdir(parents=True, exist_ok=True)
    claim_run_dir(save_dir)

    seen, dt = 0, [0.0, 0.0, 0.0]
    results = []
    shapes: list[tuple[int, ...]] = []  # the network input shapes that actually ran, for the speed line
    writers: dict[str, cv2.VideoWriter] = {}
    bar = None
    for path, im, im0s, cap, s in dataset:
        t0 = time_sync()
        x = torch.from_numpy(im).to(device)
        x = (x.half() if model.fp16 else x.float()) / 255
        if x.ndim == 3:
            x = x[None]
        if tuple(x.shape) not in shapes:
            shapes.append(tuple(x.shape))
        t1 = time_sync()
        pred = model(x, augment=augment)
        t2 = time_sync()
        pred = non_max_suppression(pred, conf_thres, iou_thres, classes, agnostic_nms, max_det=max_det)
        t3 = time_sync()
        dt[0] += t1 - t0
        dt[1] += t2 - t1
        dt[2] += t3 - t2

        for i, det in enumerate(pred):
            seen += 1
            if webcam:
                p, im0, frame = Path(path[i]), im0s[i].copy(), dataset.count
                s = f"{i}: "
            else:
                p, im0, frame = Path(path), im0s.copy(), getattr(dataset, "frame", 0)
            is_video = cap is not None or webcam
            save_path = str(save_dir / p.name)
            txt_path = save_dir / "labels" / (p.stem + ("" if not is_video else f"_{frame}"))
            s += "%gx%g " % x.shape[2:]
            det[:, :4] = scale_boxes(x.shape[2:], det[:, :4], im0.shape).round()
            s += describe(det, names)
            results.append((str(p) if not is_video else f"{p}:{frame}", det.cpu()))

            if save_txt:
                lines = yolo_label_lines(det.cpu().flip(0), im0.shape, save_conf)  # ascending confidence, as YOLOv5
                if lines:
                    append_text(f"{txt_path}.txt", "\n".join(lines) + "\n")
            annotator = Annotator(im0, line_width=line_thickness)
            if save_img or save_crop or view_img:
                for *xyxy, conf, cls in reversed(det.tolist()):
                    c = int(cls)
                    if save_img or view_img:
                        label = None if hide_labels else (names[c] if hide_conf else f"{names[c]} {conf:.2f}")
                        annotator.box_label(xyxy, label or "", color=colors(c, bgr=True))
                    if save_crop:
                        save_one_box(xyxy, im0s[i] if webcam else im0s, save_dir / "crops" / safe_name(names[c]) / f"{p.stem}.jpg")
            im0 = annotator.result()
            if view_img:
                try:
                    cv2.imshow(str(p), im0)
                    cv2.waitKey(1)
                except cv2.error:
                    print("WARNING: --view-img needs an OpenCV build with GUI support; not showing images")
                    view_img = False
            if save_img:
                if not is_video:
                    write_image(save_path, im0)
                else:
                    if save_path not in writers:
                        for w in writers.values():
                            w.release()
                        writers.clear()
                        fps = cap.get(cv2.CAP_PROP_FPS) if cap is not None else dataset.fps[i]
                        h, w = im0.shape[:2]
                        save_path = str(Path(save_path).with_suffix(".mp4"))
                        writers[str(save_dir / p.name)] = open_video_writer(save_path, fps, (w, h))
                    writers[str(save_dir / p.name)].write(im0)

        if verbose:
            if cap is not None and not webcam:  # a video: one progress bar instead of a line per frame
                if bar is None or bar.desc != str(path):
                    if bar is not None:
                        bar.close()
                    bar = tqdm(total=dataset.frames, desc=str(path), unit="frame")
                bar.update(1)
                bar.set_postfix_str(s.split(": ", 1)[-1][-60:])
            else:
                if bar is not None:
                    bar.close()
                    bar = None
                print(f"{s}, {(t2 - t1) * 1e3:.1f}ms")
    if bar is not None:
        bar.close()
    for w in writers.values():
        w.release()

    if verbose:
        per = tuple(x / max(seen, 1) * 1e3 for x in dt)
        shown = ", ".join(map(str, shapes[:3])) + (f" and {len(shapes) - 3} more" if len(shapes) > 3 else "")
        print(f"Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape{'s' * (len(shapes) > 1)} "
              f"{shown or (1, 3, *imgsz)}" % per)
        if save_txt or save_img:
            n = len(list(save_dir.glob("labels/*.txt")))
            extra = f"\n{n} label{'s' * (n != 1)} saved to {save_dir / 'labels'}" if save_txt else ""
            print(f"Results saved to {save_dir}{extra}")
    return {"save_dir": save_dir, "results": results, "names": names}


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
    opt = parser.parse_args(argv)
    if isinstance(opt.weights, list) and len(opt.weights) == 1:
        opt.weights = opt.weights[0]
    return opt


@report_user_errors
def main(argv: list[str] | None = None) -> dict:
    opt = parse_opt(argv)
    return run(**vars(opt))


if __name__ == "__main__":
    main()
