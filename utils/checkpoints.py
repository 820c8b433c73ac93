"""Checkpoint files: loading official YOLOv5 pickles safely, and this project's own plain-tensor format.

Official YOLOv5 `.pt` files pickle whole model objects, so opening one with plain `pickle` would run
whatever code a stranger put in it. Here every load goes through `torch.load(weights_only=True)`:
official files additionally get an explicit allow-list of the YOLOv5 module classes (mapped onto this
project's classes of the same names); any other global is refused before it can be called.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import pickle
import re
import tempfile
import urllib.request
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn

from utils.errors import UserError

FORMAT = "yolov5-spd-checkpoint"
FORMAT_VERSION = 1
OFFICIAL_RELEASE_URL = "https://github.com/ultralytics/yolov5/releases/download/v7.0/"
OFFICIAL_NAMES = {f"yolov5{s}{p6}.pt" for s in "nsmlx" for p6 in ("", "6")}


def _official_allow_list() -> list:
    """(class, pickled path) pairs an official YOLOv5 checkpoint may name, and nothing else."""
    from models import common, yolo

    ours = [
        (yolo.DetectionModel, "models.yolo.Model"),
        (yolo.DetectionModel, "models.yolo.DetectionModel"),
        (yolo.Detect, "models.yolo.Detect"),
    ]
    for name in ("Conv", "DWConv", "Bottleneck", "C3", "SPP", "SPPF", "Focus", "SPDConv", "Concat", "space_to_depth"):
        ours.append((getattr(common, name), f"models.common.{name}"))
    torch_layers = [
        nn.Conv2d, nn.BatchNorm2d, nn.SiLU, nn.ReLU, nn.LeakyReLU, nn.Hardswish, nn.Identity,
        nn.MaxPool2d, nn.Upsample, nn.Sequential, nn.ModuleList,
    ]
    return ours + torch_layers + [set, collections.OrderedDict, argparse.Namespace]


def _refused_global(err: Exception) -> str | None:
    m = re.search(r"GLOBAL ([\w.]+)", str(err))
    return m.group(1) if m else None


def safe_load(path: str | Path) -> dict:
    """torch.load with weights_only=True and the official allow-list; anything else is a UserError."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_official_allow_list()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        bad = _refused_global(e)
        if bad:
            raise UserError(
                f"refusing to load {path}: it names '{bad}', which is not a YOLOv5 model class or tensor type "
                "(loading it could run arbitrary code)"
            ) from None
        raise UserError(f"{path} is not a readable checkpoint: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError) as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} does not hold a checkpoint dict (got {type(ckpt).__name__})")
    return ckpt


def _names_dict(names) -> dict[int, str]:
    if isinstance(names, dict):
        return {int(k): str(v) for k, v in names.items()}
    return {i: str(n) for i, n in enumerate(names)}


def read_checkpoint(path: str | Path) -> dict:
    """Normalise an official or own checkpoint to {'cfg', 'names', 'stride', 'state_dict', 'ckpt'}."""
    ckpt = safe_load(path)
    if ckpt.get("format") == FORMAT:
        state = ckpt.get("ema") or ckpt["model"]
        return {"cfg": ckpt["cfg"], "names": _names_dict(ckpt["names"]), "stride": ckpt.get("stride"),
                "state_dict": state, "ckpt": ckpt, "official": False}
    model = ckpt.get("ema") or ckpt.get("model")
    if not isinstance(model, nn.Module) or not hasattr(model, "yaml"):
        raise UserError(f"{path} is neither a YOLOv5 checkpoint nor one of this project's")
    names = getattr(model, "names", None) or [str(i) for i in range(model.yaml["nc"])]
    return {"cfg": dict(model.yaml), "names": _names_dict(names), "stride": [float(s) for s in model.stride],
            "state_dict": {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}, "ckpt": ckpt, "official": True}


def resolve_weights(weights: str | Path) -> Path:
    """A weights path that exists; official names are fetched from the YOLOv5 release when missing."""
    p = Path(str(weights).strip())
    if p.is_file():
        return p
    if p.is_dir():
        return p  # an exported OpenVINO folder; the backend checks it
    if p.name in OFFICIAL_NAMES:
        url = OFFICIAL_RELEASE_URL + p.name
        print(f"Downloading {url} to {p}...")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(url, timeout=15) as r, open(p.with_suffix(".part"), "wb") as f:
                f.write(r.read())
            os.replace(p.with_suffix(".part"), p)
            return p
        except Exception as e:  # offline, proxy, HTTP error: all end in the same advice
            p.with_suffix(".part").unlink(missing_ok=True)
            raise UserError(
                f"weights '{weights}' are not on disk and the download from {url} failed ({type(e).__name__}); "
                f"download that file yourself and place it at {p.resolve()}"
            ) from None
    raise UserError(f"weights file '{weights}' not found")


def load_model(weights: str | Path, device: torch.device | str = "cpu", fuse: bool = True, verbose: bool = False):
    """Build this project's DetectionModel from any supported checkpoint, in eval mode."""
    from models.yolo import DetectionModel

    info = read_checkpoint(resolve_weights(weights))
    model = DetectionModel(info["cfg"], nc=info["cfg"]["nc"], verbose=verbose)
    try:
        model.load_state_dict(info["state_dict"], strict=True)
    except RuntimeError as e:
        raise UserError(f"{weights}: weights do not match their own model config ({str(e).splitlines()[0]})") from None
    model.names = info["names"]
    model.pt_path = str(weights)
    model = model.float().to(device).eval()
    if fuse:
        model.fuse()
    return model


def atomic_save(obj: dict, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; a checkpoint should be as readable as any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # temporaries left by a writer that was killed (of this file or a sibling such as best.pt next to last.pt)
    for stale in path.parent.glob(f".*{glob.escape(path.suffix)}.*.tmp"):
        stale.unlink(missing_ok=True)


def make_checkpoint(model: nn.Module, ema_model: nn.Module | None = None, half: bool = True, **extra) -> dict:
    """A plain-data checkpoint: config, names, stride and tensors, loadable with weights_only=True."""
    def tensors(m: nn.Module) -> dict:
        return {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).cpu().clone()
                for k, v in m.state_dict().items()}

    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "cfg": dict(model.yaml),
        "names": _names_dict(model.names),
        "stride": [float(s) for s in model.stride],
        "model": tensors(model),
        "ema": tensors(ema_model) if ema_model is not None else None,
        "date": datetime.now().isoformat(timespec="seconds"),
        **extra,
    }
