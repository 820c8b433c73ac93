"""YOLO-format labels: finding images and their label files, checking each pair, and the .npz label cache.

Layout as in YOLOv5: images under .../images/..., labels under the matching .../labels/... with
one `class cx cy w h` row (normalised 0-1) per object, or `class x1 y1 x2 y2 ...` polygons.
"""
from __future__ import annotations

import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError
from tqdm import tqdm

from utils.augmentations import segments2boxes
from utils.errors import UserError
from utils.logging import LOGGER
from utils.sources import IMG_FORMATS, TRUNCATED_JPEG, check_jpeg

NUM_THREADS = min(8, max(1, (os.cpu_count() or 1) - 1))
CACHE_VERSION = 2  # 2: messages stored without "WARNING: ". Bump when the cache layout or the label checks change
_ORIENTATION = next(k for k, v in ExifTags.TAGS.items() if v == "Orientation")
_warned_unwritable: set[str] = set()


class LabelCheck(NamedTuple):
    """Result of checking one image/label pair. labels is None when the image is unusable."""

    im_file: str
    labels: np.ndarray | None  # (n, 5) float32: cls, cx, cy, w, h normalised
    shape: tuple[int, int] | None  # original (w, h), EXIF orientation applied
    segments: list[np.ndarray]  # polygons (k, 2) normalised, one per label or none at all
    nm: int  # 1 if the label file is missing
    nf: int  # 1 if the label file was found
    ne: int  # 1 if the label file is empty
    nc: int  # 1 if the image (or its label file) is corrupt and the image is skipped
    msg: str  # one warning line (without 'WARNING: '), or ''


def img2label_paths(img_paths: Sequence[str]) -> list[str]:
    """Label path for each image: the last /images/ becomes /labels/ and the suffix .txt."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return [os.path.splitext(sb.join(str(x).rsplit(sa, 1)))[0] + ".txt" for x in img_paths]


def exif_size(img: Image.Image) -> tuple[int, int]:
    """(w, h) of a PIL image as displayed, i.e. swapped when EXIF says it is rotated 90/270 degrees."""
    w, h = img.size
    try:
        if img.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):
            w, h = h, w
    except Exception:  # unreadable EXIF must not make a good image unusable
        pass
    return w, h


def _read_label_rows(lb_file: str) -> list[list[str]]:
    with open(lb_file, encoding="utf-8-sig") as f:  # tolerate a byte-order mark from Windows editors
        return [line.split() for line in f.read().strip().splitlines() if line.strip()]


def verify_image_label(im_file: str, lb_file: str, nc: int | None = None, prefix: str = "") -> LabelCheck:
    """Check one image and its label file; bad images are reported and skipped, bad rows dropped.

    Skipped (counted corrupt): unreadable, zero-byte, non-image, truncated or < 10 px images;
    label rows with the wrong number of columns, non-numbers, NaN/inf, or coordinates outside
    0-1. Dropped with a warning: rows whose class id is negative, fractional or >= nc, and
    duplicate rows. JPEGs are decoded fully (check_jpeg). A JPEG that only lacks its end marker
    is used as is (with a warning): the
    data folder may be read-only, so nothing is ever rewritten.
    """
    nm = nf = ne = 0
    notes: list[str] = []
    segments: list[np.ndarray] = []
    try:
        if os.path.getsize(im_file) == 0:
            raise ValueError("zero-byte image file")
        try:
            with Image.open(im_file) as im:
                im.verify()  # cheap structural check (PNG CRCs etc.) without decoding everything
                shape = exif_size(im)
                fmt = (im.format or "").lower()
        except UnidentifiedImageError:
            raise ValueError("not an image (unrecognised file contents)") from None
        if fmt not in IMG_FORMATS:
            raise ValueError(f"unsupported image format '{fmt}'")
        if shape[0] < 10 or shape[1] < 10:
            raise ValueError(f"image size {shape[0]}x{shape[1]} is under 10 pixels")
        if fmt in ("jpeg", "mpo"):
            usable, note = check_jpeg(im_file)  # a full decode: verify() alone misses cut-off scans
            if not usable:
                raise ValueError(TRUNCATED_JPEG)
            if note:
                notes.append(note)

        if os.path.isfile(lb_file):
            nf = 1
            rows = _read_label_rows(lb_file)
            if rows:
                for k, r in enumerate(rows, 1):
                    if len(r) != 5 and (len(r) < 7 or len(r) % 2 == 0):
                        raise ValueError(
                            f"label line {k} has {len(r)} values; expected 5 (class x y w h) "
                            "or a class followed by x y pairs of a polygon"
                        )
                try:
                    values = [np.array(r, dtype=np.float64) for r in rows]
                except ValueError:
                    raise ValueError("label file holds values that are not numbers") from None
                flat = np.concatenate(values)
                if not np.isfinite(flat).all():
                    raise ValueError("label file holds NaN or infinite values")
                coords = np.concatenate([v[1:] for v in values])
                if (coords < 0).any():
                    raise ValueError("negative label coordinates")
                if (coords > 1).any():
                    raise ValueError(f"label coordinates above 1 (max {coords.max():g}); they must be normalised to 0-1")
                is_poly = [len(v) > 5 for v in values]
                lb = np.zeros((len(values), 5), np.float64)
                lb[:, 0] = [v[0] for v in values]
                polys = [v[1:].reshape(-1, 2) for v in values if len(v) > 5]
                if polys:
                    lb[np.array(is_poly), 1:] = segments2boxes(polys)
                box_rows = ~np.array(is_poly)
                if box_rows.any():
                    lb[box_rows, 1:] = np.stack([v[1:] for v in values if len(v) == 5])
                # keep polygons only when every row has one, so they stay aligned with the boxes
                segments = [v[1:].reshape(-1, 2).astype(np.float32) for v in values] if all(is_poly) else []

                cls = lb[:, 0]
                bad = (cls < 0) | (cls != np.round(cls))
                if nc is not None:
                    bad |= cls >= nc
                if bad.any():
                    ids = ", ".join(f"{c:g}" for c in np.unique(cls[bad]))
                    rng = f"0..{nc - 1}" if nc is not None else "0 or more"
                    notes.append(f"{int(bad.sum())} label row(s) with class id {ids} outside {rng} removed")
                    keep = ~bad
                    lb = lb[keep]
                    segments = [s for s, k in zip(segments, keep) if k] if segments else []
                _, first = np.unique(lb, axis=0, return_index=True)
                if len(first) < len(lb):
                    first = np.sort(first)  # keep the file's order
                    notes.append(f"{len(lb) - len(first)} duplicate label row(s) removed")
                    lb = lb[first]
                    segments = [segments[i] for i in first] if segments else []
                lb = lb.astype(np.float32)
            else:
                ne = 1
                lb = np.zeros((0, 5), np.float32)
        else:
            nm = 1
            lb = np.zeros((0, 5), np.float32)
        msg = f"{prefix}{im_file}: {'; '.join(notes)}" if notes else ""
        return LabelCheck(im_file, lb, shape, segments, nm, nf, ne, 0, msg)
    except (OSError, ValueError, SyntaxError, UnicodeDecodeError, Image.DecompressionBombError) as e:
        msg = f"{prefix}{im_file}: ignoring corrupt image/label: {e}"
        return LabelCheck(im_file, None, None, [], nm, nf, ne, 1, msg)



def is_writeable(folder: str | Path) -> bool:
    """True if we may write into `folder`. Folders without write bits count as read-only even for
    root (who could write anyway): shared data is protected only by its permission bits."""
    try:
        mode = os.stat(folder).st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) and os.access(folder, os.W_OK)


def _files_hash(files: Sequence[str], extra: str = "") -> str:
    """Fingerprint of a file list (paths, sizes, modification times) and of the check settings."""
    h = hashlib.sha256(extra.encode())
    for f in files:
        try:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}\0-\n".encode())
    return h.hexdigest()


def save_label_cache(path: Path, checks: list[LabelCheck], file_hash: str, stats: dict[str, int], msgs: list[str]) -> bool:
    """Store scan results as a plain .npz (arrays only, loadable without pickle); False if not writable."""
    good = [c for c in checks if c.labels is not None]
    seg_lens = [len(s) for c in good for s in c.segments]
    arrays = dict(
        version=np.array(CACHE_VERSION),
        hash=np.array(file_hash),
        im_files=np.array([c.im_file for c in good], dtype=str),
        counts=np.array([len(c.labels) for c in good], dtype=np.int64),
        labels=np.concatenate([c.labels for c in good] or [np.zeros((0, 5), np.float32)]).astype(np.float32),
        shapes=np.array([c.shape for c in good], dtype=np.int64).reshape(-1, 2),
        seg_counts=np.array([len(c.segments) for c in good], dtype=np.int64),
        seg_lens=np.array(seg_lens, dtype=np.int64),
        seg_points=np.concatenate([s for c in good for s in c.segments] or [np.zeros((0, 2), np.float32)]).astype(np.float32),
        msgs=np.array(msgs, dtype=str),
        stats=np.array([stats[k] for k in ("nf", "nm", "ne", "nc")], dtype=np.int64),
    )
    if not is_writeable(path.parent):
        return False
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:  # a file object stops numpy from appending '.npz' to the name
            np.savez(f, **arrays)
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return False


def load_label_cache(path: Path, file_hash: str, im_files: Sequence[str] | None = None,
                     nc: int | None = None) -> dict[str, Any] | None:
    """Read a label cache written by save_label_cache; None if absent, stale, unreadable or invalid.

    An unreadable cache (cut short by an interrupted copy, not an .npz at all) or one whose contents
    fail the checks a fresh scan applies is reported in one line and rebuilt: a matching hash only
    says the files did not change, not that whoever wrote the cache was honest.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != CACHE_VERSION or str(z["hash"]) != file_hash:
                return None
            cache = _unpack_cache(z)
    except Exception as e:  # BadZipFile, EOFError, KeyError, ValueError, OSError, ...: all mean the same
        LOGGER.warning(f"label cache {path} is unreadable ({type(e).__name__}); rebuilding it")
        return None
    why = validate_label_cache(cache, im_files, nc)
    if why:
        LOGGER.warning(f"label cache {path} does not match the dataset ({why}); rebuilding it")
        return None
    return cache


def _unpack_cache(z) -> dict[str, Any]:
    im_files = [str(x) for x in z["im_files"]]
    counts, seg_counts = z["counts"], z["seg_counts"]
    if len(counts) != len(im_files) or len(seg_counts) != len(im_files) or counts.sum() != len(z["labels"]) \
            or seg_counts.sum() != len(z["seg_lens"]) or z["seg_lens"].sum() != len(z["seg_points"]) \
            or (counts < 0).any() or (seg_counts < 0).any() or (z["seg_lens"] < 0).any():
        raise ValueError("inconsistent array lengths")
    labels = np.split(z["labels"], np.cumsum(counts)[:-1]) if len(counts) else []
    points = np.split(z["seg_points"], np.cumsum(z["seg_lens"])[:-1]) if len(z["seg_lens"]) else []
    seg_per_image = np.split(np.arange(len(points)), np.cumsum(seg_counts)[:-1]) if len(seg_counts) else []
    segments = [[points[j] for j in idx] for idx in seg_per_image]
    nf, nm, ne, nc = (int(v) for v in z["stats"])
    return dict(
        im_files=im_files,
        labels=[np.asarray(x, np.float32).reshape(-1, 5) for x in labels],
        shapes=z["shapes"].astype(np.int64).reshape(-1, 2),
        segments=segments,
        msgs=[str(m) for m in z["msgs"]],
        stats=dict(nf=nf, nm=nm, ne=ne, nc=nc),
    )


def validate_label_cache(cache: dict[str, Any], im_files: Sequence[str] | None, nc: int | None) -> str:
    """'' when cached labels pass the checks of verify_image_label, else the first problem found."""
    if im_files is not None:
        outside = set(cache["im_files"]) - set(im_files)
        if outside:
            return f"{len(outside)} image(s) not in the dataset, e.g. {sorted(outside)[0]}"
    if len(cache["shapes"]) != len(cache["im_files"]) or len(cache["segments"]) != len(cache["im_files"]):
        return "inconsistent array lengths"
    if len(cache["shapes"]) and (cache["shapes"] < 10).any():
        return "image sizes under 10 pixels"
    for f, lb, segs in zip(cache["im_files"], cache["labels"], cache["segments"]):
        if not len(lb) and not segs:
            continue
        if not np.isfinite(lb).all():
            return f"NaN or infinite label values for {f}"
        cls = lb[:, 0]
        if (cls < 0).any() or (cls != np.round(cls)).any() or (nc is not None and (cls >= nc).any()):
            return f"class id {cls.max():g} outside 0..{(nc - 1) if nc is not None else 'n'} for {f}"
        if (lb[:, 1:] < 0).any() or (lb[:, 1:] > 1).any():
            return f"label coordinates outside 0-1 for {f}"
        if segs and (len(segs) != len(lb) or any(s.ndim != 2 or s.shape[-1] != 2 or not np.isfinite(s).all()
                                                 or (s < 0).any() or (s > 1).any() for s in segs)):
            return f"invalid polygons for {f}"
    return ""


def orphan_labels(im_files: Sequence[str], label_files: Sequence[str]) -> list[str]:
    """Label .txt files in the label folders of `label_files` that belong to no image (sorted).

    Folders that also hold the images are skipped: there, other .txt files (lists, notes) are normal.
    """
    expected = set(label_files)
    image_dirs = {os.path.dirname(f) for f in im_files}
    found = []
    for d in sorted({os.path.dirname(f) for f in label_files} - image_dirs):
        try:
            # classes.txt is labelImg's class list, not a label file
            found += [e.path for e in os.scandir(d)
                      if e.name.endswith(".txt") and e.name != "classes.txt" and e.path not in expected]
        except OSError:  # no label folder at all: every image is a background, reported elsewhere
            continue
    return sorted(found)


def collect_images(path: str | Path | Sequence[str | Path], prefix: str = "") -> list[str]:
    """Image files from folders (recursive), .txt lists and single files; sorted, absolute."""
    files: list[str] = []
    for p in path if isinstance(path, (list, tuple)) else [path]:
        p = Path(p).expanduser()
        if p.is_dir():
            files += [str(x) for x in p.rglob("*.*")]
        elif p.is_file() and p.suffix.lower() == ".txt":
            parent = p.resolve().parent
            with open(p, encoding="utf-8") as f:
                for line in f.read().strip().splitlines():
                    line = line.strip()
                    if line:
                        q = Path(line)
                        files.append(str(q if q.is_absolute() else (parent / q)))
        elif p.is_file():
            files.append(str(p))
        else:
            raise UserError(f"{prefix}{p} does not exist")
    ims = sorted(os.path.normpath(os.path.abspath(f)) for f in files if f.rsplit(".", 1)[-1].lower() in IMG_FORMATS)
    if not ims:
        raise UserError(f"{prefix}no images found in {path} (supported formats: {', '.join(IMG_FORMATS)})")
    return ims



def label_cache_path(path: str | Path | Sequence[str | Path], label_files: Sequence[str]) -> Path:
    """Where the label cache of a dataset lives: beside a .txt image list, else beside the first label folder."""
    p = Path(path) if isinstance(path, (str, Path)) else None
    if p is not None and p.is_file():
        return p.with_name(p.stem + ".cache")
    lb_dir = Path(label_files[0]).parent
    return lb_dir.with_name(lb_dir.name + ".cache")


def scan_labels(im_files: list[str], label_files: list[str], nc: int | None, file_hash: str, cache_path: Path,
                prefix: str = "") -> dict[str, Any]:
    """Check every image/label pair (threaded) and store the results in the label cache when it is writable."""
    stats = dict(nf=0, nm=0, ne=0, nc=0)
    msgs: list[str] = []
    checks: list[LabelCheck] = []
    desc = f"{prefix}Scanning {Path(im_files[0]).parent.as_posix()}..."
    with ThreadPoolExecutor(NUM_THREADS) as pool:
        # messages are stored without the prefix: the same cache serves 'train: ' and 'val: '
        it = pool.map(lambda a: verify_image_label(a[0], a[1], nc), zip(im_files, label_files))
        for c in tqdm(it, desc=desc, total=len(im_files), leave=False, unit="img", mininterval=0.5):
            checks.append(c)
            stats["nf"] += c.nf
            stats["nm"] += c.nm
            stats["ne"] += c.ne
            stats["nc"] += c.nc
            if c.msg:
                msgs.append(c.msg)
    if not save_label_cache(cache_path, checks, file_hash, stats, msgs):
        key = str(cache_path.parent)
        if key not in _warned_unwritable:
            _warned_unwritable.add(key)
            LOGGER.warning(f"cannot write the label cache {cache_path} (read-only folder?); labels are re-scanned "
                           "each run", extra={"prefix": prefix})
    good = [c for c in checks if c.labels is not None]
    return dict(
        im_files=[c.im_file for c in good],
        labels=[c.labels for c in good],
        shapes=np.array([c.shape for c in good], dtype=np.int64).reshape(-1, 2),
        segments=[c.segments for c in good],
        msgs=msgs,
        stats=stats,
    )


def load_labels(path: str | Path | Sequence[str | Path], nc: int | None = None, prefix: str = "") -> tuple[dict[str, Any], Path]:
    """The checked labels of a dataset, from its cache when still valid, else from a fresh scan; reports the
    counts and every warning. Returns (cache dict as load_label_cache gives it, cache path)."""
    im_files = collect_images(path, prefix)
    label_files = img2label_paths(im_files)
    cache_path = label_cache_path(path, label_files)
    file_hash = _files_hash(im_files + label_files, extra=f"nc={nc}")  # nc decides which rows are dropped
    cache = load_label_cache(cache_path, file_hash, im_files, nc) if cache_path.is_file() else None
    if cache is None:
        cache = scan_labels(im_files, label_files, nc, file_hash, cache_path, prefix)
        p = Path(path) if isinstance(path, (str, Path)) else None
        where = Path(p if p is not None else im_files[0]).as_posix()
    else:
        where = f"{cache_path.as_posix()} (cached)"
    st = cache["stats"]
    LOGGER.info(f"{prefix}Scanning {where}... {st['nf']} images, {st['nm'] + st['ne']} backgrounds, {st['nc']} corrupt")
    for m in cache["msgs"]:
        LOGGER.warning(m, extra={"prefix": prefix})
    orphans = orphan_labels(im_files, label_files)
    if orphans:  # often a renamed or missing image folder: the user should hear about it
        LOGGER.warning(f"{len(orphans)} label file(s) without an image are ignored, e.g. {orphans[0]}", extra={"prefix": prefix})
    if not cache["im_files"]:
        raise UserError(f"{prefix}no usable images in {path}: all {st['nc']} were corrupt")
    if st["nf"] == 0:
        LOGGER.warning(f"no labels found for {path}; training on it will not learn anything", extra={"prefix": prefix})
    return cache, cache_path
