"""Run folders and file-name helpers."""
from __future__ import annotations

import re
from pathlib import Path


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
