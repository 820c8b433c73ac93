"""Inference inputs for detect.py: images, folders, globs, .txt lists, videos, webcams and streams.

Each loader yields (path, letterboxed CHW RGB uint8 array, original BGR image, video capture or None,
a status string) so the detection loop does not care where frames come from.
"""
from __future__ import annotations

import glob
import io
import math
import os
import re
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import cv2
import numpy as np

from utils.augmentations import letterbox
from utils.errors import UserError
from utils.logging import LOGGER

IMG_FORMATS = ("bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm")
VID_FORMATS = ("asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv")
STREAM_SCHEMES = ("rtsp://", "rtmp://", "http://", "https://")


def is_stream(source: str) -> bool:
    """A webcam index, a .streams list, or a URL that is not a plain image/video file."""
    s = str(source)
    is_file = Path(urlparse(s).path).suffix[1:].lower() in IMG_FORMATS + VID_FORMATS
    return s.isnumeric() or s.endswith(".streams") or (s.lower().startswith(STREAM_SCHEMES) and not is_file)


TRUNCATED_JPEG = "truncated JPEG (image data ends early)"
_EOI = b"\xff\xd9"
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker after entropy-coded data (not stuffing, RSTn, fill)
_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (DHT, JPG, DAC excluded)


def jpeg_end_marker_missing(path: str) -> bool:
    """True when a JPEG file does not end with the end-of-image marker FF D9."""
    with open(path, "rb") as f:
        f.seek(-2, os.SEEK_END)
        return f.read() != _EOI


def _jpeg_scans_complete(data: bytes) -> bool:
    """Do the file's scans cover the whole image? Walks the markers; no pixel is decoded.

    Sequential JPEGs need a scan for every component; progressive ones need every DCT coefficient of
    every component refined to full precision (a scan with Al = 0). A progressive file cut between
    scans, even with an end marker appended, decodes without a decoder warning but lacks detail.
    """
    i, n, sof, comps, done = 2, len(data), None, [], {}
    while i + 4 <= n and data[i] == 0xFF:
        m = data[i + 1]
        if m == 0xFF:
            i += 1
            continue
        if m == 0xD9:
            break
        if 0xD0 <= m <= 0xD7 or m == 0x01:
            i += 2
            continue
        seg = data[i + 4 : i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")]
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if m in _SOF and len(seg) >= 6:
            sof, comps = m, [seg[6 + 3 * k] for k in range(seg[5]) if 6 + 3 * k < len(seg)]
            done = {c: set() for c in comps}
        elif m == 0xDA and len(seg) >= 1:
            ns = seg[0]
            if len(seg) < 4 + 2 * ns:
                return False
            ss, se, al = seg[1 + 2 * ns], seg[2 + 2 * ns], seg[3 + 2 * ns] & 0x0F
            for k in range(ns):
                if seg[1 + 2 * k] in done and (al == 0 or sof not in (0xC2, 0xC6, 0xCA, 0xCE)):
                    done[seg[1 + 2 * k]].update(range(ss, se + 1) if sof in (0xC2, 0xC6, 0xCA, 0xCE) else range(64))
            nxt = _NEXT_MARKER.search(data, i)
            i = nxt.start() if nxt else n
    return bool(comps) and all(len(v) == 64 for v in done.values())


def _strict_decode_error(data: bytes) -> str:
    """'' when libjpeg decodes every byte without a warning, else the warning; 'unsupported' if it cannot tell."""
    try:
        import simplejpeg
    except ImportError:
        return "unsupported"
    try:
        cs = simplejpeg.decode_jpeg_header(data)[2]
        # DCT scaling (1/8 size) still reads every scan, so truncation is found at a fraction of the cost
        simplejpeg.decode_jpeg(data, colorspace="CMYK" if cs in ("CMYK", "YCCK") else "GRAY", min_factor=8, strict=True)
        return ""
    except ValueError as e:
        msg = str(e)
        return msg if ("premature end" in msg.lower() or "corrupt" in msg.lower() or "bogus" in msg.lower()) else "unsupported"
    except Exception:
        return "unsupported"


def _pil_decodes(data: bytes) -> bool:
    """PIL's verify() and a full load(), with truncated images refused (the fallback check)."""
    from PIL import Image, ImageFile

    if ImageFile.LOAD_TRUNCATED_IMAGES:  # a setting some other library may have flipped
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:
        return False


def check_jpeg(path: str) -> tuple[bool, str]:
    """(usable, note) for a JPEG file: decode it fully and believe the decoder, not heuristics.

    Refused: any libjpeg warning ('Premature end of JPEG file', 'Corrupt JPEG data: premature end of
    data segment' for a cut file with an end marker appended) or scans that do not cover the image.
    Kept: complete files with trailing bytes or flat areas; a complete file that only lacks its end
    marker is kept with a note (it decodes cleanly once the marker is added).
    """
    data = Path(path).read_bytes()
    err = _strict_decode_error(data)
    note = ""
    if err and err != "unsupported" and not data.endswith(_EOI) and "premature end of jpeg file" in err.lower():
        data += _EOI  # the decoder ran out of data: was only the end marker missing?
        err = _strict_decode_error(data)
        note = "JPEG end marker missing, the image itself is complete; used as is"
    if err == "unsupported":  # no simplejpeg, or a colour space it cannot convert: PIL's full decode
        if not _pil_decodes(data):
            if data.endswith(_EOI) or not _pil_decodes(data + _EOI):
                return False, ""
            data, note = data + _EOI, "JPEG end marker missing, the image itself is complete; used as is"
    elif err:
        return False, ""
    if not _jpeg_scans_complete(data):
        return False, ""
    return True, note


def jpeg_is_truncated(path: str) -> bool:
    """True when a JPEG cannot be decoded completely (see check_jpeg)."""
    return not check_jpeg(path)[0]


def read_image(path: str) -> tuple[np.ndarray | None, str]:
    """(BGR image, '') or (None, why it cannot be used): unreadable files and truncated JPEGs.

    OpenCV decodes a cut-off JPEG without complaint, filling the missing part with grey; detections
    on it would be silently wrong, so it is refused here as training refuses it. Decoder errors (a
    header declaring 100000x100000 pixels makes cv2.imread raise) are a reason, never an exception.
    """
    if os.path.islink(path) and not os.path.exists(path):
        return None, "broken symbolic link"
    try:
        im = cv2.imread(path)  # applies EXIF orientation; grey, 16-bit and CMYK files come back as 8-bit BGR
    except cv2.error as e:
        return None, f"the decoder refused it ({_cv_reason(e)})"
    except MemoryError:
        return None, "too large to decode in the memory available"
    if im is None:
        return None, "not a readable image"
    if path.lower().endswith((".jpg", ".jpeg")):
        try:
            if not check_jpeg(path)[0]:
                return None, TRUNCATED_JPEG
        except OSError as e:
            return None, f"cannot read it ({e.strerror})"
    return im, ""


def _cv_reason(e: Exception) -> str:
    """The useful part of an OpenCV error: the failed assertion, not the source path."""
    s = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return s.split("error: ", 1)[-1][:160]


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
    if Path(p).is_dir():  # broken links are kept so that they are reported and counted, not dropped
        return sorted(str(f) for f in Path(p).iterdir() if f.is_file() or (f.is_symlink() and not f.exists()))
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
        LOGGER.warning(f"skipping {path}: {why}")
        self.skipped.append((path, why))

    def _finish(self) -> None:
        """End of the source: one summary line of what was skipped; an error if nothing was usable."""
        if self.skipped:
            LOGGER.warning(f"{len(self.skipped)} of {self.nf} files skipped as unreadable "
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
            try:
                im = letterbox(im0, self.img_size, stride=self.stride, auto=self.auto)[0]
            except (cv2.error, MemoryError) as e:  # one odd image must not end the run
                if cap is None:
                    self._skip(path, f"cannot be resized ({_cv_reason(e)})")
                    continue
                raise
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
        self.seq, self.last = [1] * n, [0] * n  # frames received / frames handed out, per stream
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
            LOGGER.info(f"{i + 1}/{n}: {s}... Success ({self.frames[i]} frames {self.imgs[i].shape[1]}x{self.imgs[i].shape[0]} at {self.fps[i]:.2f} FPS)")
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
                    self.seq[i] += 1
                else:
                    LOGGER.warning(f"stream {self.sources[i]} stopped answering")
                    self.imgs[i] = None
                    break
            time.sleep(0.0)
        cap.release()

    def __iter__(self):
        self.count = -1
        return self

    def __next__(self):
        self.count += 1
        self._wait_for_new_frames()
        self.last = list(self.seq)
        im0 = [im.copy() for im in self.imgs]
        ims = [letterbox(x, self.img_size, stride=self.stride, auto=self.auto)[0] for x in im0]
        im = np.ascontiguousarray(np.stack(ims).transpose((0, 3, 1, 2))[:, ::-1])
        return self.sources, im, im0, None, ""

    def _wait_for_new_frames(self) -> None:
        """Block until every stream has a frame not yet handed out; a stream silent for `timeout`
        seconds ends the run with one line (re-processing its last frame would repeat old results)."""
        deadline = time.monotonic() + self.timeout
        while True:
            if not all(t.is_alive() for t in self.threads) or any(im is None for im in self.imgs):
                self.running = False
                raise StopIteration
            if all(s > last for s, last in zip(self.seq, self.last)):
                return
            if time.monotonic() > deadline:
                stalled = [src for src, s, last in zip(self.sources, self.seq, self.last) if s <= last]
                LOGGER.warning(f"stream {', '.join(stalled)} sent no new frame for {self.timeout:g}s; stopping")
                self.running = False
                raise StopIteration
            time.sleep(0.002)

    def __len__(self) -> int:
        return len(self.sources)
