"""Checkpoint files, independent of any model: the one safe reader, atomic writes, this project's
plain-tensor format and the official weights' download.

Official YOLOv5 `.pt` files pickle whole model objects, so opening one with plain `pickle` would run
whatever code a stranger put in it. Every load goes through `load_weights_only` (`torch.load(weights_only=True)`);
the allow-list of YOLOv5 module classes that official files need, and building models from checkpoints,
live next to the models (models/checkpoints.py): `utils` never imports `models`.
"""
from __future__ import annotations

import glob
import os
import pickle
import re
import tempfile
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn

from utils.errors import UserError
from utils.files import download_file
from utils.logging import LOGGER
from utils.names import normalize_names

FORMAT = "yolov5-spd-checkpoint"
FORMAT_VERSION = 1
OFFICIAL_RELEASE_URL = "https://github.com/ultralytics/yolov5/releases/download/v7.0/"
OFFICIAL_NAMES = {f"yolov5{s}{p6}.pt" for s in "nsmlx" for p6 in ("", "6")}


def _refused_global(err: Exception) -> str | None:
    m = re.search(r"GLOBAL ([\w.]+)", str(err))
    return m.group(1) if m else None


def load_weights_only(path: str | Path, allow: list | tuple = (), allowed: str = "a tensor or plain value",
                      what: str = "checkpoint"):
    """The one checkpoint reader: torch.load(weights_only=True) with the globals in `allow` permitted.

    A file naming any other global is refused before it can run ('it names X, which is not <allowed>');
    empty, text, truncated or foreign files are one UserError line saying which (`what` names the file's role).
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        bad = _refused_global(e)
        if bad:
            raise UserError(f"refusing to load {path}: it names '{bad}', which is not {allowed} "
                            "(loading it could run arbitrary code)") from None
        raise UserError(f"{path} is not a readable {what} ({not_a_checkpoint_reason(path)})") from None
    except Exception as e:  # EOFError (empty file), KeyError (text read as a pickle), zip errors, ...
        raise UserError(f"{path} is not a readable {what} ({not_a_checkpoint_reason(path, e)})") from None


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




def resolve_weights(weights: str | Path) -> Path:
    """A weights path that exists; official names are fetched from the YOLOv5 release when missing."""
    p = Path(str(weights).strip())
    if p.is_file():
        return p
    if p.is_dir():
        return p  # an exported OpenVINO folder; the backend checks it
    if p.name in OFFICIAL_NAMES:
        url = OFFICIAL_RELEASE_URL + p.name
        try:
            return download_file(url, p, timeout=15)
        except UserError as e:  # offline, proxy, HTTP error: all end in the same advice
            raise UserError(f"weights '{weights}' are not on disk and {str(e)[0].lower()}{str(e)[1:]}; "
                            f"download that file yourself and place it at {p.resolve()}") from None
    raise UserError(f"weights file '{weights}' not found")


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
        "names": normalize_names(model.names),
        "stride": [float(s) for s in model.stride],
        "model": tensors(model),
        "ema": tensors(ema_model) if ema_model is not None else None,
        "date": datetime.now().isoformat(timespec="seconds"),
        **extra,
    }
