"""Detection datasets in YOLO format: scanning and checking labels, caching, augmentation, loaders.

Layout as in YOLOv5: images under .../images/..., labels under the matching .../labels/... with
one `class cx cy w h` row (normalised 0-1) per object, or `class x1 y1 x2 y2 ...` polygons.
"""
from __future__ import annotations

import hashlib
import math
import os
import random
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import cv2
import numpy as np
import psutil
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, distributed
from tqdm import tqdm

from utils.augmentations import (
    augment_hsv,
    copy_paste,
    letterbox,
    mixup,
    random_perspective,
    segments2boxes,
)
from utils.boxes import xyn2xy, xywhn2xyxy, xyxy2xywhn
from utils.checks import check_loader_args
from utils.errors import UserError
from utils.sources import IMG_FORMATS, TRUNCATED_JPEG, check_jpeg
from utils.torch_utils import ignore_interrupts, torch_distributed_zero_first

ROOT = Path(__file__).resolve().parents[1]
RANK = int(os.getenv("RANK", -1))
NUM_THREADS = min(8, max(1, (os.cpu_count() or 1) - 1))
CACHE_VERSION = 1  # bump when the cache layout or the label checks change
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
    msg: str  # one warning line, or ''


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
        msg = f"{prefix}WARNING: {im_file}: {'; '.join(notes)}" if notes else ""
        return LabelCheck(im_file, lb, shape, segments, nm, nf, ne, 0, msg)
    except (OSError, ValueError, SyntaxError, UnicodeDecodeError, Image.DecompressionBombError) as e:
        msg = f"{prefix}WARNING: {im_file}: ignoring corrupt image/label: {e}"
        return LabelCheck(im_file, None, None, [], nm, nf, ne, 1, msg)


def _imread(f: str) -> np.ndarray | None:
    """cv2.imread that returns None instead of raising on a decoder error (huge declared sizes)."""
    try:
        return cv2.imread(f)
    except (cv2.error, MemoryError):
        return None


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
        print(f"WARNING: label cache {path} is unreadable ({type(e).__name__}); rebuilding it")
        return None
    why = validate_label_cache(cache, im_files, nc)
    if why:
        print(f"WARNING: label cache {path} does not match the dataset ({why}); rebuilding it")
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


class LoadImagesAndLabels(Dataset):
    """YOLO-format detection dataset for training (augmented) and validation (letterboxed)."""

    def __init__(
        self,
        path: str | Path | Sequence[str | Path],
        img_size: int = 640,
        batch_size: int = 16,
        augment: bool = False,
        hyp: dict | None = None,
        rect: bool = False,
        image_weights: bool = False,
        cache_images: str | bool | None = None,
        single_cls: bool = False,
        stride: int = 32,
        pad: float = 0.0,
        min_items: int = 0,
        prefix: str = "",
        nc: int | None = None,
        seed: int = 0,
    ):
        self.img_size = img_size
        self.augment = augment
        self.hyp = hyp or {}
        self.image_weights = image_weights
        self.rect = False if image_weights else rect  # weighted sampling breaks the batch-shape grouping
        self.mosaic_border = [-img_size // 2, -img_size // 2]
        self.stride = stride
        self.path = path
        self.prefix = prefix
        self.seed = seed
        if augment and not hyp:
            raise UserError(f"{prefix}augment=True needs hyperparameters (hyp)")

        im_files = collect_images(path, prefix)
        label_files = img2label_paths(im_files)
        p = Path(path) if isinstance(path, (str, Path)) else None
        if p is not None and p.is_file():
            cache_path = p.with_name(p.stem + ".cache")
        else:
            lb_dir = Path(label_files[0]).parent
            cache_path = lb_dir.with_name(lb_dir.name + ".cache")
        self.cache_path = cache_path

        file_hash = _files_hash(im_files + label_files, extra=f"nc={nc}")  # nc decides which rows are dropped
        cache = load_label_cache(cache_path, file_hash, im_files, nc) if cache_path.is_file() else None
        if cache is None:
            cache = self._scan(im_files, label_files, nc, file_hash, cache_path)
            where = Path(p if p is not None else im_files[0]).as_posix()
        else:
            where = f"{cache_path.as_posix()} (cached)"
        st = cache["stats"]
        print(f"{prefix}Scanning {where}... {st['nf']} images, {st['nm'] + st['ne']} backgrounds, {st['nc']} corrupt")
        for m in cache["msgs"]:
            print(f"{prefix}{m}")
        orphans = orphan_labels(im_files, label_files)
        if orphans:  # often a renamed or missing image folder: the user should hear about it
            print(f"{prefix}WARNING: {len(orphans)} label file(s) without an image are ignored, e.g. {orphans[0]}")
        if not cache["im_files"]:
            raise UserError(f"{prefix}no usable images in {path}: all {st['nc']} were corrupt")
        if st["nf"] == 0:
            print(f"{prefix}WARNING: no labels found for {path}; training on it will not learn anything")

        self.im_files: list[str] = cache["im_files"]
        self.labels: list[np.ndarray] = cache["labels"]
        self.shapes = np.asarray(cache["shapes"], dtype=np.int64).reshape(-1, 2)  # original (w, h)
        self.segments: list[list[np.ndarray]] = cache["segments"]
        self.label_files = img2label_paths(self.im_files)

        if min_items:
            keep = [i for i, lb in enumerate(self.labels) if len(lb) >= min_items]
            print(f"{prefix}{len(self.labels) - len(keep)}/{len(self.labels)} images with fewer than {min_items} labels left out")
            self._select(keep)
        if single_cls:
            for lb in self.labels:
                lb[:, 0] = 0

        n = len(self.im_files)
        self.n = n
        self.batch = np.floor(np.arange(n) / batch_size).astype(int)  # batch index of each image
        self.batch_shapes = None
        if self.rect:
            self._make_rect(batch_size, img_size, stride, pad)

        # Shared memory, so that persistent loader workers see changes made in the main process
        # (close_mosaic() near the end of training, re-weighted indices each epoch).
        self._mosaic = torch.tensor([bool(augment and not self.rect)], dtype=torch.bool).share_memory_()
        self._indices = torch.arange(n, dtype=torch.int64).share_memory_()

        self.ims: list[np.ndarray | None] = [None] * n
        self.im_hw0: list[tuple[int, int] | None] = [None] * n
        self.im_hw: list[tuple[int, int] | None] = [None] * n
        self.npy_files: list[Path | None] = [None] * n
        if cache_images is True:
            cache_images = "ram"
        if cache_images in ("ram", "disk"):
            self._cache_images(cache_images)
        elif cache_images:
            raise UserError(f"{prefix}cache_images must be 'ram', 'disk' or None, got {cache_images!r}")

    # ----- scanning -------------------------------------------------------------------------
    def _scan(self, im_files: list[str], label_files: list[str], nc: int | None, file_hash: str, cache_path: Path) -> dict:
        stats = dict(nf=0, nm=0, ne=0, nc=0)
        msgs: list[str] = []
        checks: list[LabelCheck] = []
        desc = f"{self.prefix}Scanning {Path(im_files[0]).parent.as_posix()}..."
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
                print(f"{self.prefix}WARNING: cannot write the label cache {cache_path} (read-only folder?); labels are re-scanned each run")
        good = [c for c in checks if c.labels is not None]
        return dict(
            im_files=[c.im_file for c in good],
            labels=[c.labels for c in good],
            shapes=np.array([c.shape for c in good], dtype=np.int64).reshape(-1, 2),
            segments=[c.segments for c in good],
            msgs=msgs,
            stats=stats,
        )

    def _select(self, idx: Sequence[int]) -> None:
        self.im_files = [self.im_files[i] for i in idx]
        self.label_files = [self.label_files[i] for i in idx]
        self.labels = [self.labels[i] for i in idx]
        self.segments = [self.segments[i] for i in idx]
        self.shapes = self.shapes[np.asarray(idx, dtype=int)].reshape(-1, 2)

    def _make_rect(self, batch_size: int, img_size: int, stride: int, pad: float) -> None:
        """Sort images by aspect ratio and give each batch the smallest stride-multiple shape that fits."""
        ar = self.shapes[:, 1] / self.shapes[:, 0]  # h / w
        order = ar.argsort()  # numpy's default sort, as the reference, so equal ratios batch the same way
        self._select(order)
        ar = ar[order]
        nb = int(self.batch[-1]) + 1
        shapes = [[1.0, 1.0]] * nb
        for i in range(nb):
            ari = ar[self.batch == i]
            lo, hi = ari.min(), ari.max()
            if hi < 1:  # all wide: height shrinks
                shapes[i] = [hi, 1.0]
            elif lo > 1:  # all tall: width shrinks
                shapes[i] = [1.0, 1.0 / lo]
        self.batch_shapes = (np.ceil(np.array(shapes) * img_size / stride + pad).astype(int) * stride)  # (h, w)

    # ----- shared flags -----------------------------------------------------------------------
    @property
    def mosaic(self) -> bool:
        return bool(self._mosaic[0])

    @mosaic.setter
    def mosaic(self, value: bool) -> None:
        self._mosaic[0] = bool(value)

    def close_mosaic(self) -> None:
        """Switch mosaic off (YOLOv5-style last epochs), visible to already-running workers too."""
        self.mosaic = False

    @property
    def indices(self) -> np.ndarray:
        return self._indices.numpy()

    @indices.setter
    def indices(self, value: Sequence[int]) -> None:
        v = torch.as_tensor(np.asarray(value, dtype=np.int64))
        if v.shape != self._indices.shape:
            raise ValueError(f"indices must have {self.n} entries, got {tuple(v.shape)}")
        self._indices.copy_(v)

    # ----- images ---------------------------------------------------------------------------------
    def _npy_path(self, i: int) -> Path:
        """Where the .npy copy of image i lives: beside it, or under datasets/ when that is read-only."""
        f = Path(self.im_files[i])
        if is_writeable(f.parent):
            return f.with_suffix(".npy")
        tag = hashlib.sha1(str(f.parent).encode()).hexdigest()[:12]
        return ROOT / "datasets" / ".npy_cache" / tag / (f.stem + ".npy")

    def _cache_images(self, mode: str) -> None:
        if mode == "ram" and not self._ram_fits():
            return
        if mode == "disk":
            self.npy_files = [self._npy_path(i) for i in range(self.n)]
        fn = self._save_npy if mode == "disk" else self.load_image
        total = 0
        with ThreadPoolExecutor(NUM_THREADS) as pool:
            bar = tqdm(enumerate(pool.map(fn, range(self.n))), total=self.n, leave=False, desc=f"{self.prefix}Caching images")
            for i, x in bar:
                if mode == "disk":
                    total += x
                else:
                    self.ims[i], self.im_hw0[i], self.im_hw[i] = x
                    total += self.ims[i].nbytes
        print(f"{self.prefix}Cached {self.n} images ({total / 1e9:.2f} GB {mode})")

    def _ram_fits(self, safety: float = 0.1) -> bool:
        """Estimate the RAM cache size from a sample of images; warn and skip caching if it won't fit."""
        sample = random.Random(self.seed).sample(range(self.n), min(self.n, 30))
        b = 0
        for i in sample:
            im = _imread(self.im_files[i])
            if im is None:
                continue
            r = self.img_size / max(im.shape[:2])
            b += im.nbytes * r**2
        need = b * self.n / max(len(sample), 1)
        avail = psutil.virtual_memory().available
        if need * (1 + safety) < avail:
            return True
        print(f"{self.prefix}WARNING: caching images needs {need / 1e9:.1f} GB of RAM, {avail / 1e9:.1f} GB free; not caching")
        return False

    def _save_npy(self, i: int) -> int:
        f = self.npy_files[i]
        if not f.exists():
            im = _imread(self.im_files[i])
            if im is None:
                return 0
            f.parent.mkdir(parents=True, exist_ok=True)
            np.save(f, im)
        return f.stat().st_size

    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """Image i as BGR, resized so its long side is img_size; returns (im, (h0, w0), (h, w))."""
        im = self.ims[i]
        if im is not None:
            return im, self.im_hw0[i], self.im_hw[i]
        fn = self.npy_files[i]
        if fn is not None and fn.exists():
            im = np.load(fn, allow_pickle=False)
        else:
            im = _imread(self.im_files[i])
            if im is None:
                raise UserError(f"{self.prefix}cannot read image {self.im_files[i]}")
        h0, w0 = im.shape[:2]
        r = self.img_size / max(h0, w0)
        if r != 1:
            # area averaging shrinks cleanly for validation; linear is faster and fine under augmentation
            interp = cv2.INTER_LINEAR if (self.augment or r > 1) else cv2.INTER_AREA
            im = cv2.resize(im, (math.ceil(w0 * r), math.ceil(h0 * r)), interpolation=interp)
        return im, (h0, w0), im.shape[:2]

    def load_mosaic(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """4 images around a random centre on a 2s x 2s canvas, then warped/cropped to s x s."""
        s = self.img_size
        yc, xc = (int(random.uniform(-x, 2 * s + x)) for x in self.mosaic_border)
        idx = [index] + random.choices(self.indices, k=3)
        random.shuffle(idx)
        labels4, segments4 = [], []
        img4 = None
        for i, j in enumerate(idx):
            img, _, (h, w) = self.load_image(j)
            if img4 is None:
                img4 = np.full((s * 2, s * 2, img.shape[2]), 114, dtype=np.uint8)
            if i == 0:  # top left: image's bottom-right corner at the centre
                x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
                x1b, y1b, x2b, y2b = w - (x2a - x1a), h - (y2a - y1a), w, h
            elif i == 1:  # top right
                x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, s * 2), yc
                x1b, y1b, x2b, y2b = 0, h - (y2a - y1a), min(w, x2a - x1a), h
            elif i == 2:  # bottom left
                x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(s * 2, yc + h)
                x1b, y1b, x2b, y2b = w - (x2a - x1a), 0, w, min(y2a - y1a, h)
            else:  # bottom right
                x1a, y1a, x2a, y2a = xc, yc, min(xc + w, s * 2), min(s * 2, yc + h)
                x1b, y1b, x2b, y2b = 0, 0, min(w, x2a - x1a), min(y2a - y1a, h)
            img4[y1a:y2a, x1a:x2a] = img[y1b:y2b, x1b:x2b]
            padw, padh = x1a - x1b, y1a - y1b
            labels = self.labels[j].copy()
            segments = [x.copy() for x in self.segments[j]]
            if labels.size:
                labels[:, 1:] = xywhn2xyxy(labels[:, 1:], w, h, padw, padh)
                segments = [xyn2xy(x, w, h, padw, padh) for x in segments]
            labels4.append(labels)
            segments4.extend(segments)
        labels4 = np.concatenate(labels4, 0)
        for x in (labels4[:, 1:], *segments4):
            np.clip(x, 0, 2 * s, out=x)  # boxes of the parts cut off by the canvas edge shrink to fit
        hyp = self.hyp
        img4, labels4, segments4 = copy_paste(img4, labels4, segments4, p=hyp.get("copy_paste", 0.0))
        img4, labels4 = random_perspective(
            img4,
            labels4,
            segments4,
            degrees=hyp.get("degrees", 0.0),
            translate=hyp.get("translate", 0.0),
            scale=hyp.get("scale", 0.0),
            shear=hyp.get("shear", 0.0),
            perspective=hyp.get("perspective", 0.0),
            border=self.mosaic_border,
        )
        return img4, labels4

    # ----- items ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        """(image uint8 tensor 3xHxW RGB, labels (n, 6) [0, cls, cx, cy, w, h] normalised, file, shapes)."""
        index = int(self.indices[index])
        for attempt in range(min(self.n, 10)):
            try:
                return self._get(index)
            except UserError as e:  # a file broken after scanning must not stop a long run
                print(f"{self.prefix}WARNING: {e}; using another image instead")
                index = (index + 1) % self.n
        raise UserError(f"{self.prefix}{min(self.n, 10)} images in a row could not be read, near {self.im_files[index]}")

    def _get(self, index: int):
        hyp = self.hyp
        mosaic = self.mosaic and random.random() < hyp.get("mosaic", 0.0)
        if mosaic:
            img, labels = self.load_mosaic(index)
            shapes = None
            if random.random() < hyp.get("mixup", 0.0):
                img, labels = mixup(img, labels, *self.load_mosaic(int(random.choice(self.indices))))
        else:
            img, (h0, w0), (h, w) = self.load_image(index)
            shape = self.batch_shapes[self.batch[index]] if self.rect else self.img_size
            img, ratio, pad = letterbox(img, shape, auto=False, scaleup=self.augment)
            shapes = (h0, w0), ((h / h0, w / w0), pad)  # what val needs to map boxes back to the original
            labels = self.labels[index].copy()
            if labels.size:
                labels[:, 1:] = xywhn2xyxy(labels[:, 1:], ratio[0] * w, ratio[1] * h, padw=pad[0], padh=pad[1])
            if self.augment:
                img, labels = random_perspective(
                    img,
                    labels,
                    degrees=hyp.get("degrees", 0.0),
                    translate=hyp.get("translate", 0.0),
                    scale=hyp.get("scale", 0.0),
                    shear=hyp.get("shear", 0.0),
                    perspective=hyp.get("perspective", 0.0),
                )

        nl = len(labels)
        if nl:
            labels[:, 1:5] = xyxy2xywhn(labels[:, 1:5], w=img.shape[1], h=img.shape[0], clip=True, eps=1e-3)
            if self.augment:  # clipping can leave zero-area slivers at the borders: useless targets
                labels = labels[(labels[:, 3] > 0) & (labels[:, 4] > 0)]
                nl = len(labels)

        if self.augment:
            augment_hsv(img, hgain=hyp.get("hsv_h", 0.0), sgain=hyp.get("hsv_s", 0.0), vgain=hyp.get("hsv_v", 0.0))
            if random.random() < hyp.get("flipud", 0.0):
                img = np.flipud(img)
                if nl:
                    labels[:, 2] = 1 - labels[:, 2]
            if random.random() < hyp.get("fliplr", 0.0):
                img = np.fliplr(img)
                if nl:
                    labels[:, 1] = 1 - labels[:, 1]

        labels_out = torch.zeros((nl, 6))
        if nl:
            labels_out[:, 1:] = torch.from_numpy(np.asarray(labels, dtype=np.float32))
        img = np.ascontiguousarray(img.transpose((2, 0, 1))[::-1])  # HWC BGR -> CHW RGB
        return torch.from_numpy(img), labels_out, self.im_files[index], shapes

    # ----- batching -----------------------------------------------------------------------------------
    @staticmethod
    def collate_fn(batch):
        """Stack images; concatenate labels with column 0 set to the image's index in the batch."""
        im, label, path, shapes = zip(*batch)
        for i, lb in enumerate(label):
            lb[:, 0] = i
        return torch.stack(im, 0), torch.cat(label, 0), path, shapes

    @staticmethod
    def collate_fn4(batch):
        """--quad: every 4 images become one of twice the size (a 2x2 tile, or one image upscaled)."""
        im, label, path, shapes = zip(*batch)
        n = len(shapes) // 4
        im4, label4, path4, shapes4 = [], [], path[:n], shapes[:n]
        down = torch.tensor([[0.0, 0, 0, 1, 0, 0]])  # shifts y by one image height
        right = torch.tensor([[0.0, 0, 1, 0, 0, 0]])  # shifts x by one image width
        half = torch.tensor([[1.0, 1, 0.5, 0.5, 0.5, 0.5]])  # back to 0-1 on the doubled canvas
        for i in range(n):
            k = 4 * i
            if random.random() < 0.5:
                im1 = F.interpolate(im[k].unsqueeze(0).float(), scale_factor=2.0, mode="bilinear", align_corners=False)[0]
                im1 = im1.round().clamp(0, 255).to(im[k].dtype)
                lb = label[k].clone()
            else:
                im1 = torch.cat((torch.cat((im[k], im[k + 1]), 1), torch.cat((im[k + 2], im[k + 3]), 1)), 2)
                lb = torch.cat((label[k], label[k + 1] + down, label[k + 2] + right, label[k + 3] + down + right), 0) * half
            im4.append(im1)
            label4.append(lb)
        for i, lb in enumerate(label4):
            lb[:, 0] = i
        return torch.stack(im4, 0), torch.cat(label4, 0), path4, shapes4


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in each loader worker from torch's per-worker seed (set by the generator)."""
    ignore_interrupts()
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def create_dataloader(
    path: str | Path | Sequence[str | Path],
    imgsz: int,
    batch_size: int,
    stride: int,
    single_cls: bool = False,
    hyp: dict | None = None,
    augment: bool = False,
    cache: str | bool | None = None,
    pad: float = 0.0,
    rect: bool = False,
    rank: int = -1,
    workers: int = 8,
    image_weights: bool = False,
    quad: bool = False,
    prefix: str = "",
    shuffle: bool = False,
    seed: int = 0,
    nc: int | None = None,
    min_items: int = 0,
) -> tuple[DataLoader, LoadImagesAndLabels]:
    """Dataset plus a DataLoader with seeded, persistent workers (DistributedSampler under DDP)."""
    check_loader_args(batch_size, workers, quad)
    if rect and shuffle:
        print(f"{prefix}WARNING: --rect is incompatible with shuffling, not shuffling")
        shuffle = False
    with torch_distributed_zero_first(rank):  # rank 0 scans and writes the cache first
        dataset = LoadImagesAndLabels(
            path,
            imgsz,
            batch_size,
            augment=augment,
            hyp=hyp,
            rect=rect,
            cache_images=cache,
            single_cls=single_cls,
            stride=int(stride),
            pad=pad,
            image_weights=image_weights,
            min_items=min_items,
            prefix=prefix,
            nc=nc,
            seed=seed,
        )
    batch_size = min(batch_size, len(dataset))
    nd = torch.cuda.device_count()
    nw = min((os.cpu_count() or 1) // max(nd, 1), batch_size if batch_size > 1 else 0, workers)
    sampler = None if rank == -1 else distributed.DistributedSampler(dataset, shuffle=shuffle, seed=seed)
    generator = torch.Generator()
    generator.manual_seed(seed + max(RANK, 0))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        num_workers=nw,
        sampler=sampler,
        pin_memory=torch.cuda.is_available(),
        collate_fn=LoadImagesAndLabels.collate_fn4 if quad else LoadImagesAndLabels.collate_fn,
        worker_init_fn=seed_worker,
        generator=generator,
        persistent_workers=nw > 0,
    )
    return loader, dataset
