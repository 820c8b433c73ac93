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


def check_loader_args(batch_size: int, workers: int, quad: bool = False) -> None:
    check_workers(workers)
    if quad and batch_size > 0 and batch_size % 4:  # (-1, AutoBatch, is checked once it has picked one)
        raise UserError(f"--quad joins 4 images into one: --batch-size must be a multiple of 4, got {batch_size}")


def check_freeze(freeze: list[int], n_layers: int) -> None:
    """--freeze N freezes layers 0..N-1; --freeze a b c freezes those layers; all must exist."""
    top = freeze[0] if len(freeze) == 1 else max(freeze) + 1
    if min(freeze) < 0 or top > n_layers - 1:
        raise UserError(f"--freeze {' '.join(map(str, freeze))}: this model has layers 0-{n_layers - 1} and the last "
                        f"(Detect) must train; freeze at most {n_layers - 1} layers (backbone: --freeze 10)")


def check_resume_nc(ckpt_nc: int, data_nc: int, last: str, data: str) -> None:
    if int(ckpt_nc) != int(data_nc):
        raise UserError(f"--resume: {last} was trained with nc={ckpt_nc} classes but {data} now has nc={data_nc}; "
                        "resume with the original dataset, or start a new run with --weights last.pt")
