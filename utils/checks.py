"""Range checks for command-line values shared by detect.py, val.py and train.py: one clear line each."""
from __future__ import annotations

import math

from utils.errors import UserError


def check_thresholds(conf_thres: float, iou_thres: float, max_det: int | None = None) -> None:
    """--conf-thres and --iou-thres are probabilities in [0, 1]; --max-det keeps at least one box."""
    for flag, v in (("--conf-thres", conf_thres), ("--iou-thres", iou_thres)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 1):
            raise UserError(f"{flag} must be between 0 and 1, got {v}")
    if max_det is not None and int(max_det) < 1:
        raise UserError(f"--max-det must be at least 1, got {max_det}")


def check_line_thickness(lw: int | None) -> None:
    """0 or None picks a width from the image size; negatives crash OpenCV's text drawing."""
    if lw is not None and (int(lw) < 0 or int(lw) > 100):
        raise UserError(f"--line-thickness must be between 0 (automatic) and 100 pixels, got {lw}")


def check_workers(workers: int) -> None:
    if int(workers) < 0:
        raise UserError(f"--workers must be 0 (load in the main process) or more, got {workers}")
