"""Run folders and file-name helpers."""
from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

import cv2
import numpy as np

from utils.errors import UserError


def increment_path(path: str | Path, exist_ok: bool = False, sep: str = "", mkdir: bool = False) -> Path:
    """runs/exp -> runs/exp2, runs/exp3, ... (the first free one), unless exist_ok."""
    path = Path(path)
    if path.exists() and not exist_ok:
        stem, suffix = (path.with_suffix(""), path.suffix) if path.is_file() else (path, "")
        taken = {int(m.group(1)) for p in path.parent.glob(f"{stem.name}{sep}*")
                 if (m := re.fullmatch(rf"{re.escape(stem.name)}{re.escape(sep)}(\d+)", p.with_suffix("").name if p.is_file() else p.name))}
        n = 2
        while n in taken or Path(f"{stem}{sep}{n}{suffix}").exists():
            n += 1
        path = Path(f"{stem}{sep}{n}{suffix}")
    if mkdir:
        path.mkdir(parents=True, exist_ok=True)
    return path


_UNSAFE_CHARS = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')


def safe_name(name: object, max_len: int = 100) -> str:
    """A class name (data from weights or a dataset) as one harmless path component.

    Names come from files strangers make: '../../x', '/abs/x', 'C:\\x' or control characters must
    not choose where outputs land, so separators and other unsafe characters become '_' and the
    result is never '', '.', '..' or hidden.
    """
    s = _UNSAFE_CHARS.sub("_", str(name)).strip().lstrip(".")[:max_len].strip()
    return s or "_"


def _write_failed(path: str | Path, e: OSError) -> UserError:
    why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (
        "the folder is read-only" if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else e.strerror or str(e))
    return UserError(f"cannot write {path}: {why} (results written before this one are kept)")


def write_bytes(path: str | Path, data: bytes, mode: str = "wb") -> None:
    """Write (or append) data, or raise a one-line UserError; a half-written new file is removed."""
    existed = os.path.exists(path)
    try:
        with open(path, mode) as f:
            f.write(data)
    except OSError as e:
        if not existed:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise _write_failed(path, e) from None


def write_image(path: str | Path, im: np.ndarray, params: tuple = ()) -> Path:
    """cv2.imwrite that cannot fail silently: encode in memory, write with Python, report errors.

    A suffix OpenCV cannot encode (.mpo, .dng, ...) is saved as .jpg instead; returns the path written.
    """
    path = Path(path)
    try:
        ok, buf = cv2.imencode(path.suffix or ".jpg", im, list(params))
    except cv2.error:
        ok = False
    if not ok:
        path = path.with_suffix(".jpg")
        ok, buf = cv2.imencode(".jpg", im, list(params))
        if not ok:
            raise UserError(f"cannot encode the image for {path}")
    write_bytes(path, buf.tobytes())
    return path


def check_writable(folder: str | Path, what: str = "--project") -> None:
    """Fail early, with one line, when `folder` (or its first existing parent) cannot be written.

    Write bits are checked as well as os.access, so a read-only folder counts as read-only for root too.
    """
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise UserError(f"{what} {folder}: {p} is not a folder")
    mode = p.stat().st_mode
    if not (mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) or not os.access(p, os.W_OK):
        raise UserError(f"{what} {folder} is not writable ({p} is read-only); choose another --project")


def append_text(path: str | Path, text: str) -> None:
    """Append to a text file (label files), or raise a one-line UserError."""
    write_bytes(path, text.encode(), mode="ab")


def open_video_writer(path: str | Path, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
    """An mp4 writer that is known to be open; a writer that failed to open would drop every frame silently."""
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not w.isOpened():
        raise UserError(f"cannot write video {path} (disk full, read-only folder or no mp4v encoder)")
    return w


_claimed: set[Path] = set()


def claim_run_dir(save_dir: str | Path) -> None:
    """Refuse a second live run writing into the same folder (two `--name x --exist-ok` at once would
    interleave results.csv and labels silently). A lock file holds the owner's pid; a lock left by a
    process that has died is taken over; the same process may claim a folder again."""
    import atexit

    lock = Path(save_dir) / ".run.lock"
    try:
        pid = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    if pid and pid != os.getpid() and _alive(pid):
        raise UserError(f"another run (pid {pid}) is writing into {save_dir} right now; wait for it to finish "
                        f"or choose another --name")
    write_bytes(lock, str(os.getpid()).encode())
    if lock not in _claimed:
        _claimed.add(lock)
        atexit.register(_release, lock)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _release(lock: Path) -> None:
    try:
        if lock.read_text().strip() == str(os.getpid()):
            lock.unlink()
    except OSError:
        pass


def download_file(url: str, dest: str | Path, timeout: float = 30.0) -> Path:
    """Fetch url to dest through dest.part, so an interrupted download never looks complete; offline or on an
    HTTP error, one UserError line (callers wanting other advice catch it)."""
    import urllib.error
    import urllib.request

    from tqdm import tqdm

    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as fo:
            total = int(r.headers.get("Content-Length") or 0)
            with tqdm(total=total or None, unit="B", unit_scale=True, desc=f"Downloading {dest.name}") as bar:
                while chunk := r.read(1 << 20):
                    fo.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise UserError(f"could not download {url}: {reason} (no internet connection?)") from None
    return dest
