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
from utils.names import normalize_names as _names_dict

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
        raise UserError(f"{path} is not a readable checkpoint ({not_a_checkpoint_reason(path)})") from None
    except Exception as e:  # EOFError (empty file), KeyError (text read as a pickle), zip errors, ...
        raise UserError(f"{path} is not a readable checkpoint ({not_a_checkpoint_reason(path, e)})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} does not hold a checkpoint dict (got {type(ckpt).__name__})")
    return ckpt


def not_a_checkpoint_reason(path: str | Path, e: BaseException | None = None) -> str:
    """Why torch.load failed, in words: empty, text (a Git LFS pointer, an HTML error page), or the error."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as err:
        return err.strerror or type(err).__name__
    if not head:
        return "the file is empty (0 bytes)"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the weights: run git lfs pull"
    if b"\0" not in head and all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        return "it is a text file, not a torch.save file"
    msg = str(e).strip().splitlines()[0][:200] if e is not None and str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if e is not None and msg else (type(e).__name__ if e is not None else "not a torch.save file")


def _own_format_problem(ckpt: dict, state) -> str:
    """'' when a checkpoint of this project's format has what loading needs, else what is missing."""
    missing = [k for k in ("cfg", "names", "model") if k not in ckpt]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
    if not isinstance(ckpt["cfg"], dict):
        return f"'cfg' must be a model config mapping, got {type(ckpt['cfg']).__name__}"
    if not isinstance(ckpt["names"], (dict, list, tuple)):
        return f"'names' must be a dict or list, got {type(ckpt['names']).__name__}"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "'model' must be a dict of tensors"
    return ""


def read_checkpoint(path: str | Path) -> dict:
    """Normalise an official or own checkpoint to {'cfg', 'names', 'stride', 'state_dict', 'ckpt'}."""
    ckpt = safe_load(path)
    if ckpt.get("format") == FORMAT:
        state = ckpt.get("ema") or ckpt.get("model")
        problem = _own_format_problem(ckpt, state)
        if problem:
            raise UserError(f"{path} is a damaged {FORMAT} file: {problem}")
        try:
            names = _names_dict(ckpt["names"])
        except (TypeError, ValueError, AttributeError):
            raise UserError(f"{path} is a damaged {FORMAT} file: 'names' must map class ids (integers) to names") from None
        return {"cfg": ckpt["cfg"], "names": names, "stride": ckpt.get("stride"),
                "state_dict": state, "ckpt": ckpt, "official": False}
    model = ckpt.get("ema") or ckpt.get("model")
    if not isinstance(model, nn.Module) or not hasattr(model, "yaml"):
        raise UserError(f"{path} is neither a YOLOv5 checkpoint nor one of this project's")
    names = getattr(model, "names", None) or [str(i) for i in range(model.yaml["nc"])]
    return {"cfg": dict(model.yaml), "names": _names_dict(names), "stride": [float(s) for s in model.stride],
            "state_dict": {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}, "ckpt": ckpt, "official": True}


def checkpoint_val_settings(path: str | Path) -> dict:
    """The settings of a training run's own validation ({'batch_size', 'imgsz', 'single_cls'}), {} if none."""
    ckpt = safe_load(path)
    val = ckpt.get("val") if ckpt.get("format") == FORMAT else None
    return dict(val) if isinstance(val, dict) else {}


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
    try:
        model = DetectionModel(info["cfg"], nc=info["cfg"].get("nc"), verbose=verbose)
    except UserError as e:
        raise UserError(f"{weights}: its model config is invalid: {e}") from None
    except Exception as e:  # a malformed config reaches layer constructors with values they cannot take
        raise UserError(f"{weights}: its model config is malformed ({type(e).__name__}: {str(e)[:160]})") from None
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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)) and _disk_problem(path.parent, e):
            raise UserError(f"cannot save {path}: {_disk_problem(path.parent, e)}; "
                            f"{'the previous ' + path.name + ' is kept' if path.exists() else 'nothing was overwritten'}") from None
        raise
    # temporaries left by a writer that was killed (of this file or a sibling such as best.pt next to last.pt)
    for stale in path.parent.glob(f".*{glob.escape(path.suffix)}.*.tmp"):
        stale.unlink(missing_ok=True)


def _disk_problem(folder: Path, e: BaseException) -> str:
    """'the disk is full' / 'read-only' when that is why a write failed (torch's zip writer hides errno)."""
    import errno
    import shutil

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "the folder is read-only"
    try:
        if shutil.disk_usage(folder).free < 64 * 2**20:  # torch reports "unexpected pos", "file write failed", ...
            return f"the disk is full ({shutil.disk_usage(folder).free / 2**20:.0f} MB free)"
    except OSError:
        pass
    return ""


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
