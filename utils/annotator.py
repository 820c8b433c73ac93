"""Drawing boxes and labels onto images with OpenCV (detect.py output, val/train batch images)."""
from __future__ import annotations

import cv2
import numpy as np

# A fixed, high-contrast palette (matplotlib's tab20 order), so a class keeps its colour across runs.
_PALETTE_HEX = (
    "1F77B4", "FF7F0E", "2CA02C", "D62728", "9467BD", "8C564B", "E377C2", "7F7F7F", "BCBD22", "17BECF",
    "AEC7E8", "FFBB78", "98DF8A", "FF9896", "C5B0D5", "C49C94", "F7B6D2", "C7C7C7", "DBDB8D", "9EDAE5",
)
_PALETTE = [tuple(int(h[i : i + 2], 16) for i in (0, 2, 4)) for h in _PALETTE_HEX]


def colors(i: int, bgr: bool = False) -> tuple[int, int, int]:
    """The palette colour for class index i (RGB, or BGR for OpenCV images)."""
    c = _PALETTE[int(i) % len(_PALETTE)]
    return (c[2], c[1], c[0]) if bgr else c


class Annotator:
    """Draw xyxy boxes with a filled label tag on a BGR uint8 image (a contiguous copy is made)."""

    def __init__(self, im: np.ndarray, line_width: int | None = None):
        self.im = np.ascontiguousarray(im)
        self.lw = line_width or max(round(sum(self.im.shape[:2]) / 2 * 0.003), 2)

    def box_label(self, box, label: str = "", color=(128, 128, 128), txt_color=(255, 255, 255)) -> None:
        p1, p2 = (int(box[0]), int(box[1])), (int(box[2]), int(box[3]))
        cv2.rectangle(self.im, p1, p2, color, thickness=self.lw, lineType=cv2.LINE_AA)
        if label:
            tf = max(self.lw - 1, 1)
            scale = self.lw / 3
            w, h = cv2.getTextSize(label, 0, fontScale=scale, thickness=tf)[0]
            outside = p1[1] - h >= 3  # put the tag above the box unless it would leave the image
            p2 = p1[0] + w, p1[1] - h - 3 if outside else p1[1] + h + 3
            cv2.rectangle(self.im, p1, p2, color, -1, cv2.LINE_AA)
            org = (p1[0], p1[1] - 2 if outside else p1[1] + h + 2)
            cv2.putText(self.im, label, org, 0, scale, txt_color, thickness=tf, lineType=cv2.LINE_AA)

    def text(self, xy: tuple[int, int], text: str, txt_color=(255, 255, 255)) -> None:
        cv2.putText(self.im, text, (int(xy[0]), int(xy[1])), 0, self.lw / 3, txt_color, max(self.lw - 1, 1), cv2.LINE_AA)

    def result(self) -> np.ndarray:
        return self.im
