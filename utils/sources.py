"""Inference inputs for detect.py: images, folders, globs, .txt lists, videos, webcams and streams.

Each loader yields (path, letterboxed CHW RGB uint8 array, original BGR image, video capture or None,
a status string) so the detection loop does not care where frames come from.
"""
from __future__ import annotations

import glob
import math
import os
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import cv2
import numpy as np

from utils.augmentations import letterbox
from utils.errors import UserError

IMG_FORMATS = ("bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm")
VID_FORMATS = ("asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv")
STREAM_SCHEMES = ("rtsp://", "rtmp://", "http://", "https://")


def is_stream(source: str) -> bool:
    """A webcam index, a .streams list, or a URL that is not a plain image/video file."""
    s = str(source)
    is_file = Path(urlparse(s).path).suffix[1:].lower() in IMG_FORMATS + VID_FORMATS
    return s.isnumeric() or s.endswith(".streams") or (s.lower().startswith(STREAM_SCHEMES) and not is_file)


TRUNCATED_JPEG = "truncated JPEG (image data ends early)"


def jpeg_end_marker_missing(path: str) -> bool:
    """True when a JPEG file does not end with the end-of-image marker FF D9."""
    with open(path, "rb") as f:
        f.seek(-2, os.SEEK_END)
        return f.read() != b"\xff\xd9"


def jpeg_is_truncated(path: str) -> bool:
    """A JPEG without its end marker: truncated (True) or merely missing the marker (False)?

    libjpeg fills undecodable blocks with zero coefficients, so a cut-off baseline JPEG ends in a
    band of one flat colour; a complete image that only lacks the marker almost never does.
    """
    data = np.fromfile(path, np.uint8)
    im = cv2.imdecode(np.concatenate([data, np.array([0xFF, 0xD9], np.uint8)]), cv2.IMREAD_COLOR)
    if im is None:
        return True
    bottom = im[-8:].reshape(-1, im.shape[-1])
    return bool((bottom == bottom[0]).all())


def read_image(path: str) -> tuple[np.ndarray | None, str]:
    """(BGR image, '') or (None, why it cannot be used): unreadable files and truncated JPEGs.

    OpenCV decodes a cut-off JPEG without complaint, filling the missing part with grey; detections
    on it would be silently wrong, so it is refused here as training refuses it.
    """
    im = cv2.imread(path)  # applies EXIF orientation; grey, 16-bit and CMYK files come back as 8-bit BGR
    if im is None:
        return None, "not a readable image"
    if path.lower().endswith((".jpg", ".jpeg")) and jpeg_end_marker_missing(path) and jpeg_is_truncated(path):
        return None, TRUNCATED_JPEG
    return im, ""


def _expand(path) -> list[str]:
    """A file, a folder, a glob, a .txt list of paths, or a list of any of these -> sorted file paths."""
    if isinstance(path, (list, tuple)):
        return [f for p in path for f in _expand(p)]
    p = str(path)
    if p.endswith(".txt") and Path(p).is_file():
        base = Path(p).parent
        lines = [x.strip() for x in Path(p).read_text().splitlines() if x.strip()]
        return _expand([str(base / x) if not Path(x).is_absolute() else x for x in lines])
    if any(c in p for c in "*?["):
        return sorted(glob.glob(p, recursive=True))
    if Path(p).is_dir():
        return sorted(str(f) for f in Path(p).iterdir() if f.is_file())
    if Path(p).is_file():
        return [p]
    raise UserError(f"source '{p}' does not exist")


class LoadImages:
    """Images and video files from paths; videos are read frame by frame (every vid_stride-th)."""

    def __init__(self, path, img_size: int | tuple = 640, stride: int = 32, auto: bool = True, vid_stride: int = 1):
        files = _expand(path)
        images = [f for f in files if f.split(".")[-1].lower() in IMG_FORMATS]
        videos = [f for f in files if f.split(".")[-1].lower() in VID_FORMATS]
        if not images and not videos:
            raise UserError(f"no images or videos found in '{path}' (supported: {IMG_FORMATS + VID_FORMATS})")
        self.files = images + videos
        self.nf, self.nv = len(self.files), len(videos)
        self.video_flag = [False] * len(images) + [True] * len(videos)
        self.img_size, self.stride, self.auto, self.vid_stride = img_size, stride, auto, max(int(vid_stride), 1)
        self.cap = None
        self.frame = self.frames = 0
        self.fps = 30.0
        self.skipped: list[tuple[str, str]] = []  # (file, reason): reported once each and counted at the end
        self.used = 0

    def _skip(self, path: str, why: str) -> None:
        print(f"WARNING: skipping {path}: {why}")
        self.skipped.append((path, why))

    def _finish(self) -> None:
        """End of the source: one summary line of what was skipped; an error if nothing was usable."""
        if self.skipped:
            print(f"WARNING: {len(self.skipped)} of {self.nf} files skipped as unreadable "
                  f"({', '.join(sorted({Path(p).name for p, _ in self.skipped})[:5])}{', ...' if len(self.skipped) > 5 else ''})")
            if self.used == 0:
                raise UserError(f"none of the {self.nf} files in the source could be read")

    def __len__(self) -> int:
        return self.nf

    def __iter__(self):
        self.count = 0
        self.skipped, self.used = [], 0
        return self

    def _open_video(self, path: str) -> bool:
        self.cap = cv2.VideoCapture(path)
        if not self.cap.isOpened():
            self.cap = None
            return False
        self.frame = 0
        self.frames = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT) / self.vid_stride)
        self.fps = self.cap.get(cv2.CAP_PROP_FPS) or 30.0
        return True

    def __next__(self):
        while True:
            if self.count == self.nf:
                self._finish()
                raise StopIteration
            path = self.files[self.count]
            if self.video_flag[self.count]:
                if self.cap is None and not self._open_video(path):
                    self._skip(path, "not a readable video")
                    self.count += 1
                    continue
                for _ in range(self.vid_stride - 1):
                    self.cap.grab()
                ok, im0 = self.cap.read()
                if not ok:  # end of this video: move on to the next file
                    self.cap.release()
                    self.cap = None
                    self.count += 1
                    continue
                self.frame += 1
                s = f"video {self.count + 1}/{self.nf} ({self.frame}/{self.frames}) {path}: "
                cap = self.cap
            else:
                self.count += 1
                im0, why = read_image(path)
                if im0 is None:  # report it and go on with the rest
                    self._skip(path, why)
                    continue
                s = f"image {self.count}/{self.nf} {path}: "
                cap = None
            im = letterbox(im0, self.img_size, stride=self.stride, auto=self.auto)[0]
            im = np.ascontiguousarray(im.transpose((2, 0, 1))[::-1])  # HWC BGR -> CHW RGB
            self.used += 1
            return path, im, im0, cap, s


class LoadStreams:
    """Webcams and network streams, each read on its own thread so a slow one does not stall the rest."""

    def __init__(self, sources: str = "0", img_size: int | tuple = 640, stride: int = 32, auto: bool = True,
                 vid_stride: int = 1, timeout: float = 10.0):
        src = str(sources)
        srcs = [x.strip() for x in Path(src).read_text().split() if x.strip()] if os.path.isfile(src) else [src]
        self.sources = srcs
        self.img_size, self.stride, self.auto, self.vid_stride = img_size, stride, auto, max(int(vid_stride), 1)
        n = len(srcs)
        self.imgs, self.fps, self.frames, self.threads = [None] * n, [0.0] * n, [0] * n, [None] * n
        self.running = True
        for i, s in enumerate(srcs):
            cap = cv2.VideoCapture(int(s) if s.isnumeric() else s)
            if not cap.isOpened():
                raise UserError(f"could not open stream '{s}'")
            fps = cap.get(cv2.CAP_PROP_FPS)
            self.fps[i] = fps if math.isfinite(fps) and fps > 0 else 30.0
            self.frames[i] = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or float("inf")
            ok, self.imgs[i] = cap.read()
            if not ok:
                raise UserError(f"stream '{s}' opened but gave no frame")
            self.threads[i] = threading.Thread(target=self._update, args=(i, cap), daemon=True)
            print(f"{i + 1}/{n}: {s}... Success ({self.frames[i]} frames {self.imgs[i].shape[1]}x{self.imgs[i].shape[0]} at {self.fps[i]:.2f} FPS)")
            self.threads[i].start()
        self.timeout = timeout

    def _update(self, i: int, cap) -> None:
        n = 0
        while self.running and cap.isOpened():
            n += 1
            cap.grab()
            if n % self.vid_stride == 0:
                ok, im = cap.retrieve()
                if ok:
                    self.imgs[i] = im
                else:
                    print(f"WARNING: stream {self.sources[i]} stopped answering")
                    self.imgs[i] = None
                    break
            time.sleep(0.0)
        cap.release()

    def __iter__(self):
        self.count = -1
        return self

    def __next__(self):
        self.count += 1
        if not all(t.is_alive() for t in self.threads) or any(im is None for im in self.imgs):
            self.running = False
            raise StopIteration
        im0 = [im.copy() for im in self.imgs]
        ims = [letterbox(x, self.img_size, stride=self.stride, auto=self.auto)[0] for x in im0]
        im = np.ascontiguousarray(np.stack(ims).transpose((0, 3, 1, 2))[:, ::-1])
        return self.sources, im, im0, None, ""

    def __len__(self) -> int:
        return len(self.sources)
