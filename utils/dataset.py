"""The YOLO-format detection dataset: images (optionally cached), letterbox/mosaic and the augmentation calls.

Augmentation randomness is seeded per item from (seed, epoch, index) -- see set_epoch -- so a resumed run
sees the same samples as an uninterrupted one.

With `slice_size` (train.py --slice) every sample is a random tile of that many original pixels
(utils.slicing.sample_tile), resized to img_size, instead of the whole image shrunk to img_size: the model
learns objects at the scale sliced inference will show them. Mosaic is then built from four tiles.
"""
from __future__ import annotations

import hashlib
import math
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from utils.augmentations import augment_hsv, copy_paste, letterbox, mixup, random_perspective
from utils.boxes import xyn2xy, xywhn2xyxy, xyxy2xywhn
from utils.errors import UserError
from utils.labels import NUM_THREADS, img2label_paths, is_writeable, load_labels
from utils.logging import LOGGER
from utils.slicing import sample_tile

ROOT = Path(__file__).resolve().parents[1]


def read_image(f: str) -> np.ndarray | None:
    """cv2.imread that returns None instead of raising on a decoder error (huge declared sizes)."""
    try:
        return cv2.imread(f)
    except (cv2.error, MemoryError):
        return None


def epoch_seed(seed: int, epoch: int, *more: int) -> int:
    """A 32-bit seed that depends only on its arguments (a hash, so neighbouring epochs/items are unrelated)."""
    return int(np.random.SeedSequence([seed % 2**64, epoch % 2**64, *(m % 2**64 for m in more)]).generate_state(1)[0])


def seed_item(seed: int, epoch: int, index: int) -> None:
    """Seed python's and numpy's global RNGs (which the augmentations draw from) for one sample, so that its
    augmentation depends only on (seed, epoch, index): not on the worker that loads it, nor on what ran before."""
    s = epoch_seed(seed, epoch, index)
    random.seed(s)
    np.random.seed(s)


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
        prefix: str = "",
        nc: int | None = None,
        seed: int = 0,
        slice_size: int | None = None,
        slice_min_visibility: float = 0.5,
        slice_empty_keep: float = 0.1,
    ):
        self.img_size = img_size
        # tiles of the original images instead of whole images (whole images are then loaded at full size)
        self.slice_size, self.slice_min_visibility, self.slice_empty_keep = slice_size, slice_min_visibility, slice_empty_keep
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
        if slice_size and rect:
            raise UserError(f"{prefix}--slice trains on square tiles: it cannot be combined with --rect")

        cache, self.cache_path = load_labels(path, nc, prefix)
        self.im_files: list[str] = cache["im_files"]
        self.labels: list[np.ndarray] = cache["labels"]
        self.shapes = np.asarray(cache["shapes"], dtype=np.int64).reshape(-1, 2)  # original (w, h)
        self.segments: list[list[np.ndarray]] = cache["segments"]
        self.label_files = img2label_paths(self.im_files)

        if single_cls:
            for lb in self.labels:
                lb[:, 0] = 0

        n = len(self.im_files)
        self.n = n
        self.batch = np.floor(np.arange(n) / batch_size).astype(int)  # batch index of each image
        self.batch_shapes = None
        if self.rect:
            self._make_rect(img_size, stride, pad)

        self.mosaic = bool(augment and not self.rect)
        # Shared memory, so that persistent loader workers see what the main process sets each epoch: the
        # re-weighted indices (--image-weights) and the epoch that seeds the augmentations (set_epoch).
        self._indices = torch.as_tensor(self._sample_images(), dtype=torch.int64).share_memory_()
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

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

    def _sample_images(self) -> np.ndarray:
        """The image of each item of an epoch: every image once, or with slicing once per tile of a grid over it
        (so an epoch covers about the whole area of the data, a random tile at a time)."""
        if not self.slice_size:
            return np.arange(self.n)
        s = self.slice_size
        tiles = [math.ceil(w / s) * math.ceil(h / s) for w, h in self.shapes]
        return np.repeat(np.arange(self.n), tiles)

    def _select(self, idx: Sequence[int]) -> None:
        self.im_files = [self.im_files[i] for i in idx]
        self.label_files = [self.label_files[i] for i in idx]
        self.labels = [self.labels[i] for i in idx]
        self.segments = [self.segments[i] for i in idx]
        self.shapes = self.shapes[np.asarray(idx, dtype=int)].reshape(-1, 2)

    def _make_rect(self, img_size: int, stride: int, pad: float) -> None:
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

    # ----- shared state -------------------------------------------------------------------------
    @property
    def indices(self) -> np.ndarray:
        return self._indices.numpy()

    @indices.setter
    def indices(self, value: Sequence[int]) -> None:
        v = torch.as_tensor(np.asarray(value, dtype=np.int64))
        if v.shape != self._indices.shape:
            raise ValueError(f"indices must have {len(self._indices)} entries, got {tuple(v.shape)}")
        self._indices.copy_(v)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Seed the augmentations of the coming epoch; seen by persistent workers too (shared memory)."""
        self._epoch[0] = int(epoch)

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
        LOGGER.info(f"{self.prefix}Cached {self.n} images ({total / 1e9:.2f} GB {mode})")

    def _ram_fits(self, safety: float = 0.1) -> bool:
        """Estimate the RAM cache size from a sample of images; warn and skip caching if it won't fit."""
        sample = random.Random(self.seed).sample(range(self.n), min(self.n, 30))
        b = 0
        for i in sample:
            im = read_image(self.im_files[i])
            if im is None:
                continue
            r = 1 if self.slice_size else self.img_size / max(im.shape[:2])
            b += im.nbytes * r**2
        need = b * self.n / max(len(sample), 1)
        avail = psutil.virtual_memory().available
        if need * (1 + safety) < avail:
            return True
        LOGGER.warning(f"{self.prefix}caching images needs {need / 1e9:.1f} GB of RAM, {avail / 1e9:.1f} GB free; not caching")
        return False

    def _save_npy(self, i: int) -> int:
        f = self.npy_files[i]
        if not f.exists():
            im = read_image(self.im_files[i])
            if im is None:
                return 0
            f.parent.mkdir(parents=True, exist_ok=True)
            np.save(f, im)
        return f.stat().st_size

    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """Image i as BGR, resized so its long side is img_size (kept at full size when slicing: the tiles are
        cut from it); returns (im, (h0, w0), (h, w))."""
        im = self.ims[i]
        if im is not None:
            return im, self.im_hw0[i], self.im_hw[i]
        fn = self.npy_files[i]
        if fn is not None and fn.exists():
            im = np.load(fn, allow_pickle=False)
        else:
            im = read_image(self.im_files[i])
            if im is None:
                raise UserError(f"{self.prefix}cannot read image {self.im_files[i]}")
        h0, w0 = im.shape[:2]
        r = 1 if self.slice_size else self.img_size / max(h0, w0)
        if r != 1:
            # area averaging shrinks cleanly for validation; linear is faster and fine under augmentation
            interp = cv2.INTER_LINEAR if (self.augment or r > 1) else cv2.INTER_AREA
            im = cv2.resize(im, (math.ceil(w0 * r), math.ceil(h0 * r)), interpolation=interp)
        return im, (h0, w0), im.shape[:2]

    def load_sample(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int], np.ndarray, list]:
        """(image, (h0, w0), (h, w), labels [cls, cx, cy, w, h] normalised to it, segments) for item i: the
        whole image, or with slicing a random tile of it (boxes clipped, kept at slice_min_visibility). The labels
        are the caller's to change; the segments are the dataset's own (copy them first)."""
        img, hw0, hw = self.load_image(i)
        if not self.slice_size:
            return img, hw0, hw, self.labels[i].copy(), self.segments[i]
        (x1, y1, x2, y2), tile_labels = sample_tile(random, hw0, self.labels[i], self.slice_size,
                                                    self.slice_min_visibility, self.slice_empty_keep)
        tile = img[y1:y2, x1:x2]
        th, tw = tile.shape[:2]
        r = self.img_size / max(th, tw)
        if r != 1:
            tile = cv2.resize(tile, (math.ceil(tw * r), math.ceil(th * r)), interpolation=cv2.INTER_LINEAR)
        return tile, (th, tw), tile.shape[:2], tile_labels, []  # polygons are not clipped to tiles: boxes only

    def load_mosaic(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """4 images around a random centre on a 2s x 2s canvas, then warped/cropped to s x s."""
        s = self.img_size
        yc, xc = (int(random.uniform(-x, 2 * s + x)) for x in self.mosaic_border)
        idx = [index] + random.choices(self.indices, k=3)
        random.shuffle(idx)
        labels4, segments4 = [], []
        img4 = None
        for i, j in enumerate(idx):
            img, _, (h, w), labels, segments = self.load_sample(j)
            segments = [x.copy() for x in segments]
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
        img4, labels4 = random_perspective(img4, labels4, segments4, border=self.mosaic_border, **self._geometry())
        return img4, labels4

    def _geometry(self) -> dict[str, float]:
        """random_perspective's settings from the hyperparameters (0: that change is off)."""
        return {k: self.hyp.get(k, 0.0) for k in ("degrees", "translate", "scale", "shear", "perspective")}

    # ----- items ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int):
        """(image uint8 tensor 3xHxW RGB, labels (n, 6) [0, cls, cx, cy, w, h] normalised, file, shapes)."""
        seed_item(self.seed, self.epoch, index)
        index = int(self.indices[index])
        for attempt in range(min(self.n, 10)):
            try:
                return self._get(index)
            except UserError as e:  # a file broken after scanning must not stop a long run
                LOGGER.warning(f"{self.prefix}{e}; using another image instead")
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
            img, (h0, w0), (h, w), labels, _ = self.load_sample(index)
            shape = self.batch_shapes[self.batch[index]] if self.rect else self.img_size
            img, ratio, pad = letterbox(img, shape, auto=False, scaleup=self.augment)
            shapes = (h0, w0), ((h / h0, w / w0), pad)  # what val needs to map boxes back to the original
            if labels.size:
                labels[:, 1:] = xywhn2xyxy(labels[:, 1:], ratio[0] * w, ratio[1] * h, padw=pad[0], padh=pad[1])
            if self.augment:
                img, labels = random_perspective(img, labels, **self._geometry())

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

