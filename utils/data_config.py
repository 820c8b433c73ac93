"""Dataset yaml files: find, validate, resolve paths and (only when data is missing) download.

A dataset yaml holds `path` (dataset root, relative paths resolve against the project root as in
YOLOv5), `train`/`val`/`test` (a folder, a .txt list of images, or a list of either, relative to
`path`), `names` (list or {index: name}), optional `nc`, and an optional `download` step.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterable

import yaml

from utils.errors import UserError
from utils.files import download_file
from utils.logging import LOGGER
from utils.names import normalize_names

ROOT = Path(__file__).resolve().parents[1]  # the project root: holds models/, utils/, data/
DATA_DIR = ROOT / "data"
SPLITS = ("train", "val", "test")
ALLOWED_KEYS = ("path", "train", "val", "test", "nc", "names", "download")
REQUIRED_KEYS = ("train", "val")


def find_yaml(name: str | Path) -> Path:
    """Locate a dataset yaml: as given, then under the project root, then in the project's data/."""
    p = Path(name)
    candidates = [p]
    if not p.is_absolute():
        candidates += [ROOT / p, DATA_DIR / p, DATA_DIR / p.name]
    if not p.suffix:
        candidates += [c.with_suffix(".yaml") for c in candidates]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise UserError(f"dataset yaml '{name}' not found (looked in the current folder, {ROOT} and {DATA_DIR})")


def load_yaml(file: Path) -> dict:
    """Read a yaml mapping, turning parse errors into one clear line."""
    try:
        with open(file, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f"{file}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{file}: a dataset yaml must be a mapping with keys {', '.join(ALLOWED_KEYS)}")
    return data


def normalise_names(names: Any, source: str) -> dict[int, str]:
    """names as a list or {index: name} -> {0: name0, 1: name1, ...} with contiguous indices."""
    if isinstance(names, (list, tuple, dict)):
        try:
            out = normalize_names(names)
        except ValueError:
            raise UserError(f"{source}: 'names' keys must be class indices 0, 1, 2, ...") from None
        if sorted(out) != list(range(len(out))):
            raise UserError(f"{source}: 'names' indices must run 0..{len(out) - 1} without gaps, got {sorted(out)}")
        return out
    raise UserError(f"{source}: 'names' must be a list or a mapping {{index: name}}, got {type(names).__name__}")


def _resolve_split(value: str | Path, base: Path, yaml_dir: Path | None) -> str:
    """Absolute path for one split entry; relative entries resolve against `base` (the dataset path).

    Falls back, as YOLOv5 does, to dropping a leading '../' and to the yaml's own folder, which makes
    exported yamls like `train: ../train/images` work; the first candidate is kept if none exists.
    """
    p = Path(str(value)).expanduser()
    if p.is_absolute():
        return str(p.resolve())
    candidates = [base / p]
    s = str(value)
    if s.startswith("../"):
        candidates.append(base / s[3:])
    if yaml_dir is not None:
        candidates.append(yaml_dir / p)
    for c in candidates:
        if c.exists():
            return str(c.resolve())
    return str(candidates[0].resolve())


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def check_dataset(data: str | Path | dict, autodownload: bool = True) -> dict:
    """Validate a dataset description and return it with absolute paths and names as {int: str}.

    Raises UserError for unknown keys, inconsistent nc/names, or data that is missing and cannot be
    (or may not be) downloaded. The download step runs only when the val data is missing.
    """
    yaml_dir = None
    if isinstance(data, (str, Path)):
        file = find_yaml(data)
        yaml_dir = file.parent
        source = str(file)
        data = load_yaml(file)
    elif isinstance(data, dict):
        source = "dataset dict"
        data = dict(data)
    else:
        raise UserError(f"dataset must be a yaml path or a dict, got {type(data).__name__}")

    unknown = [k for k in data if k not in ALLOWED_KEYS]
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(map(str, unknown))}; allowed keys are {', '.join(ALLOWED_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if not data.get(k)]
    if missing:
        raise UserError(f"{source}: missing required key(s) {', '.join(missing)}")

    if "names" in data and data["names"] is not None:
        names = normalise_names(data["names"], source)
        if "nc" in data and data["nc"] is not None and int(data["nc"]) != len(names):
            raise UserError(f"{source}: nc is {data['nc']} but {len(names)} names are given")
    elif data.get("nc") is not None:
        names = {i: f"class{i}" for i in range(int(data["nc"]))}  # YOLOv5 allows nc without names
    else:
        raise UserError(f"{source}: give 'names' (a list or {{index: name}})")
    if not names:
        raise UserError(f"{source}: 'names' is empty")
    data["names"] = names
    data["nc"] = len(names)

    path = Path(str(data.get("path") or "")).expanduser()
    if not path.is_absolute():
        path = (ROOT / path).resolve()
    data["path"] = path

    for k in SPLITS:
        v = data.get(k)
        if not v:
            data[k] = None
            continue
        resolved = [_resolve_split(x, path, yaml_dir) for x in _as_list(v)]
        data[k] = resolved if isinstance(v, (list, tuple)) else resolved[0]

    val_missing = [p for p in _as_list(data["val"]) if not Path(p).exists()]
    if val_missing:
        step = data.get("download")
        if not step:
            raise UserError(f"{source}: dataset not found, missing {', '.join(val_missing)} (and no 'download' step)")
        if not autodownload:
            raise UserError(f"{source}: dataset not found, missing {', '.join(val_missing)} (automatic download is off)")
        LOGGER.info(f"Dataset not found, missing {', '.join(val_missing)}; running its download step...")
        run_download_step(step, data, source)
        still = [p for p in _as_list(data["val"]) if not Path(p).exists()]
        if still:
            raise UserError(f"{source}: download step finished but {', '.join(still)} is still missing")
        LOGGER.info(f"Dataset ready in {path}")
    return data


def run_download_step(step: str, data: dict, source: str = "dataset yaml") -> None:
    """Run a yaml `download` value: a .zip URL, a 'bash ...' command, or a Python snippet.

    A Python snippet sees the dataset dict as `yaml` (YOLOv5's convention), with `path` resolved.
    """
    step = str(step).strip()
    root = Path(data["path"]).parent
    if step.startswith(("http://", "https://")) and step.split("?")[0].endswith(".zip"):
        download([step], root, unzip=True, delete=True)
    elif step.startswith("bash "):
        rest = step[5:].strip()
        first = rest.split()[0] if rest else ""
        # YOLOv5's "bash -c '...'" and "bash script.sh" run through bash as written; "bash <command>" runs the command
        cmd = step if first.startswith("-") or (ROOT / first).is_file() or Path(first).is_file() else rest
        r = subprocess.run(cmd, shell=True, cwd=ROOT)
        if r.returncode:
            raise UserError(f"{source}: download command failed with exit status {r.returncode}")
    else:
        try:
            exec(compile(step, f"<{source}: download>", "exec"), {"yaml": data, "__name__": "__download__"})
        except UserError:
            raise
        except Exception as e:  # a snippet can fail in many ways; the user needs one line, not a trace
            raise UserError(f"{source}: download step failed: {type(e).__name__}: {e}") from None


def check_archive(f: Path, dest: Path) -> None:
    """Refuse an archive that would unpack to far more than its size (a zip bomb) or than the free disk."""
    import tarfile
    import zipfile

    from utils.limits import check_limit

    try:
        if zipfile.is_zipfile(f):
            with zipfile.ZipFile(f) as z:
                total = sum(i.file_size for i in z.infolist())
        else:
            with tarfile.open(f) as t:
                total = sum(m.size for m in t.getmembers())
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise UserError(f"could not unpack {f}: {e}") from None
    packed = max(f.stat().st_size, 1)
    if total > 100e6:  # small archives (a few labels) may compress well and harm no one
        check_limit("unzip_ratio", total / packed, f"{f.name} unpacks to {total / 1e9:.1f} GB from {packed / 1e6:.1f} MB: "
                                                  f"its compression ratio {total / packed:.0f}")
    free = shutil.disk_usage(dest).free
    if total > free:
        raise UserError(f"{f.name} unpacks to {total / 1e9:.1f} GB but {dest} has {free / 1e9:.1f} GB free")


def download(
    urls: Iterable[str], dir: str | Path = ".", unzip: bool = True, delete: bool = True, timeout: float = 30.0
) -> list[Path]:
    """Fetch files into `dir` (skipping ones already there), unpacking archives if asked.

    Used by the dataset yamls' download snippets; offline, fails with one UserError line.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    out = []
    for url in urls:
        f = dir / Path(url.split("?")[0]).name
        if not f.exists():
            download_file(url, f, timeout)
        if unzip and f.suffix in (".zip", ".tar", ".gz", ".tgz"):
            check_archive(f, dir)
            try:
                shutil.unpack_archive(str(f), str(dir), **({} if f.suffix == ".zip" else {"filter": "data"}))
            except (shutil.ReadError, ValueError, OSError) as e:
                raise UserError(f"could not unpack {f}: {e}") from None
            if delete:
                f.unlink()
        out.append(f)
    return out
