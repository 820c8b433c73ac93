"""Bounds on what a checkpoint, a model config, an archive or --imgsz may ask for.

A 1.4 KB file can describe a model of billions of parameters or a zip that unpacks to gigabytes; these
limits turn such requests into one line naming the limit and the environment variable that lifts it.
"""
from __future__ import annotations

import math
import os

from utils.errors import UserError

# name: (environment variable, default). Defaults sit far above every published YOLOv5 model/dataset.
LIMITS: dict[str, tuple[str, float]] = {
    "imgsz": ("YOLOV5_MAX_IMGSZ", 8192),  # pixels per image side (YOLOv5 P6 models train at 1280)
    "params": ("YOLOV5_MAX_PARAMS", 500e6),  # yolov5x6 has 141M
    "multiple": ("YOLOV5_MAX_MULTIPLE", 4.0),  # depth_multiple / width_multiple (yolov5x: 1.33 / 1.25)
    "repeats": ("YOLOV5_MAX_REPEATS", 100),  # blocks in one layer after depth_multiple (yolov5x: 12)
    "channels": ("YOLOV5_MAX_CHANNELS", 16384),  # channels of one layer after width_multiple (yolov5x: 1280)
    "unzip_ratio": ("YOLOV5_MAX_UNZIP_RATIO", 100),  # unpacked / packed size of a downloaded archive
}


def limit(name: str) -> float:
    env, default = LIMITS[name]
    try:
        v = float(os.environ.get(env, default))
        return v if v > 0 and not math.isnan(v) else default
    except ValueError:
        return default


def check_limit(name: str, value: float, what: str) -> None:
    """Raise one UserError line when value exceeds the named limit, saying how to lift it."""
    lim = limit(name)
    if value > lim:
        env = LIMITS[name][0]
        raise UserError(f"{what} is over the limit of {lim:g}; if this is intended, set {env}={math.ceil(value)} "
                        "(environment variable) to lift it")
