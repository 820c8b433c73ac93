"""ImageFolder classification data: split discovery, OpenCV loading, small-image augmentation, loaders.

Layout: <root>/train/<class>/*.jpg and <root>/val/<class>/... (or test/ when there is no val/).
Class names are the sorted folder names of train/. An unreadable image is reported and dropped from
its batch; it never stops a run.
"""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from utils.datasets import WorkerSafeDataLoader
from utils.errors import UserError
from utils.sources import IMG_FORMATS, read_image
from utils.torch_utils import ignore_interrupts

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DatasetSplits:
    root: Path
    train: Path
    val: Path
    val_name: str  # 'val' or 'test': printed so users know which split the metrics come from
    names: list[str]


def class_dirs(split: Path) -> list[str]:
    """Sorted names of the (non-hidden) sub-folders of a split: its classes."""
    return sorted(d.name for d in split.iterdir() if d.is_dir() and not d.name.startswith("."))


def find_splits(data: str | Path) -> DatasetSplits:
    """Locate train/ and val/ (else test/) under an ImageFolder root; bad layouts are a UserError."""
    root = Path(data)
    if not root.is_dir():
        raise UserError(f"dataset '{data}' not found: expected a folder with train/<class>/ and val/ or test/")
    train = root / "train"
    if not train.is_dir():
        raise UserError(f"dataset '{data}' has no train/ folder (expected train/<class>/*.jpg)")
    val_name = next((n for n in ("val", "test") if (root / n).is_dir()), None)
    if val_name is None:
        raise UserError(f"dataset '{data}' has neither val/ nor test/ next to train/")
    names = class_dirs(train)
    if not names:
        raise UserError(f"{train} holds no class folders")
    unknown = sorted(set(class_dirs(root / val_name)) - set(names))
    if unknown:
        raise UserError(f"{root / val_name} has classes missing from train/: {', '.join(unknown[:10])}")
    return DatasetSplits(root, train, root / val_name, val_name, names)


def find_eval_split(data: str | Path, split: str | None = None) -> Path:
    """The folder to evaluate: <data>/<split>, else <data>/val, else <data>/test, else <data> itself
    when it directly holds class folders."""
    root = Path(data)
    if not root.is_dir():
        raise UserError(f"dataset '{data}' not found: expected a folder with val/<class>/ or test/<class>/")
    if split:
        if not (root / split).is_dir():
            raise UserError(f"dataset '{data}' has no {split}/ folder")
        return root / split
    for name in ("val", "test"):
        if (root / name).is_dir():
            return root / name
    if class_dirs(root) and not (root / "train").is_dir():
        return root
    raise UserError(f"dataset '{data}' has neither val/ nor test/")


def list_samples(split: Path, names: list[str], per_class: int | None = None) -> list[tuple[str, int]]:
    """(path, class index) for every image under split/<class>/, sorted; at most `per_class` per class."""
    samples = []
    for i, name in enumerate(names):
        d = split / name
        if not d.is_dir():
            continue
        files = sorted(f for f in d.iterdir() if f.suffix[1:].lower() in IMG_FORMATS)
        samples += [(str(f), i) for f in files[:per_class]]
    return samples


def _fit(imgsz: int) -> v2.Transform:
    """Shorter side to imgsz, then a centred square crop; a no-op for images already imgsz x imgsz."""

    def fit(x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == (imgsz, imgsz):
            return x
        h, w = x.shape[-2:]
        if max(h, w) > 4 * min(h, w):  # a 20000x20 strip: crop the kept square first, never resize the whole strip
            x = v2.functional.center_crop(x, [min(h, w), min(h, w)])
        return v2.functional.center_crop(v2.functional.resize(x, imgsz, antialias=True), [imgsz, imgsz])

    return v2.Lambda(fit)


def train_transforms(imgsz: int, pad: int | None = None) -> v2.Compose:
    """Small-image augmentation: zero-padded random crop (pad imgsz/8: 4 px at 32) and a horizontal flip."""
    pad = max(1, round(imgsz / 8)) if pad is None else pad
    return v2.Compose(
        [
            _fit(imgsz),
            v2.RandomCrop(imgsz, padding=pad),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transforms(imgsz: int) -> v2.Compose:
    return v2.Compose([_fit(imgsz), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def bgr_to_tensor(im: np.ndarray) -> torch.Tensor:
    """OpenCV HWC BGR uint8 -> CHW RGB uint8 tensor."""
    if im.ndim == 2:
        im = cv2.cvtColor(im, cv2.COLOR_GRAY2BGR)
    return torch.from_numpy(np.ascontiguousarray(im[..., ::-1].transpose(2, 0, 1)))


def preprocess(im_bgr: np.ndarray, imgsz: int) -> torch.Tensor:
    """One OpenCV image -> normalised (3, imgsz, imgsz) float tensor, as val sees it (predict uses this)."""
    return eval_transforms(imgsz)(bgr_to_tensor(im_bgr))


class ClassificationDataset(Dataset):
    """Images of one split; __getitem__ gives (tensor, label) and label -1 for an unreadable file.

    Each unreadable file is reported once per run (not once per epoch): the flags live in shared
    memory, so loader worker processes see what the others already reported.
    """

    def __init__(self, samples: list[tuple[str, int]], imgsz: int, augment: bool):
        self.samples = samples
        self.imgsz = imgsz
        self.transform = train_transforms(imgsz) if augment else eval_transforms(imgsz)
        self.unreadable = torch.zeros(len(samples), dtype=torch.bool).share_memory_()
        self._summarised = False

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        im, why = read_image(path)  # also refuses truncated JPEGs, which OpenCV would pad with grey
        if im is not None:
            try:
                return self.transform(bgr_to_tensor(im)), label
            except (RuntimeError, ValueError, MemoryError) as e:  # one odd image must not end the run
                why = f"cannot be resized ({type(e).__name__})"
        if not self.unreadable[i]:
            self.unreadable[i] = True
            print(f"WARNING: skipping unreadable image {path}: {why}", file=sys.stderr)
        return torch.zeros(3, self.imgsz, self.imgsz), -1

    def summarise(self) -> None:
        """After a full pass: one line counting the skipped files, or an error if none could be read."""
        n = int(self.unreadable.sum())
        if n and n == len(self):
            raise UserError(f"none of the {n} images in {Path(self.samples[0][0]).parent.parent} could be read")
        if n and not self._summarised:
            print(f"WARNING: {n} of {len(self)} images in {Path(self.samples[0][0]).parent.parent} were unreadable "
                  "and skipped", file=sys.stderr)
        self._summarised = True


def collate_skip_bad(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a batch, leaving out samples flagged unreadable (label -1)."""
    good = [(x, y) for x, y in batch if y >= 0]
    if not good:
        return torch.empty(0, *batch[0][0].shape), torch.empty(0, dtype=torch.long)
    xs, ys = zip(*good)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def _seed_worker(worker_id: int) -> None:
    # each worker's torch seed comes from the loader's generator; derive numpy/random from it too
    ignore_interrupts()
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class _SummarisingLoader(WorkerSafeDataLoader):
    """A DataLoader that has its dataset summarise unreadable files after each complete pass."""

    def __iter__(self):
        yield from super().__iter__()
        self.dataset.summarise()


def build_loader(
    dataset: ClassificationDataset, batch_size: int, shuffle: bool, workers: int, seed: int = 0, pin: bool = False
) -> DataLoader:
    """DataLoader with reproducible shuffling and bad-sample filtering; workers capped by CPU count."""
    nw = max(0, min(os.cpu_count() or 1, workers, batch_size))
    g = torch.Generator()
    g.manual_seed(seed)
    return _SummarisingLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=nw,
        pin_memory=pin,
        collate_fn=collate_skip_bad,
        worker_init_fn=_seed_worker,
        generator=g,
        persistent_workers=nw > 0,
    )
