"""Detection data loaders: create_dataloader, with a shuffle order and augmentations seeded per epoch.

The parts live in utils/labels.py (finding, checking and caching labels) and utils/dataset.py (the dataset and
its augmentation calls); their YOLOv5 names are importable from here as before.
"""
from __future__ import annotations

import os
import random
import weakref
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, distributed

from utils.checks import check_loader_args
from utils.dataset import LoadImagesAndLabels, epoch_seed
from utils.labels import collect_images, img2label_paths, verify_image_label
from utils.logging import LOGGER
from utils.torch_utils import deferred_signals, ignore_interrupts, torch_distributed_zero_first

__all__ = ["EpochDataLoader", "EpochSampler", "LoadImagesAndLabels", "collect_images", "create_dataloader",
           "img2label_paths", "seed_worker", "verify_image_label"]

RANK = int(os.getenv("RANK", -1))


class EpochSampler(Sampler[int]):
    """A random order of range(n) that depends only on (seed, epoch), as DistributedSampler's does under DDP."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class WorkerSafeDataLoader(DataLoader):
    """A DataLoader whose workers cannot spoil a clean stop: a Ctrl-C reaches the main process between
    batches, and persistent workers are stopped by the loader itself."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stops_workers = None  # the iterator whose persistent workers a finalizer stops (see __iter__)

    def __iter__(self):
        # Signals wait while the workers are started and handed their first indices, and until the finalizer
        # below is registered: an interrupt raised in between left persistent workers that nothing stopped.
        with deferred_signals():
            it = super().__iter__()
            if self.persistent_workers and self._iterator is not None and self._stops_workers is not self._iterator:
                # The workers ignore SIGTERM (ignore_interrupts), and multiprocessing's exit handler stops leftover
                # children with SIGTERM and then joins them: a loader still alive at interpreter exit (held by a
                # reference cycle the collector had not freed) made train.py hang after its last line. A finalizer
                # stops them first: when the loader is collected, or at exit (weakref's exit hook is registered
                # after multiprocessing's, so it runs before it).
                weakref.finalize(self, _stop_workers, self._iterator)
                self._stops_workers = self._iterator
        return _batches_between_signals(it) if self.num_workers > 0 else it


def _batches_between_signals(batches: Iterator) -> Iterator:
    """A worker hands each batch's shared memory over a socket of its own. A Ctrl-C raised in the main process
    in the middle of that handshake closed the socket under the worker, which printed a ConnectionResetError
    traceback from its resource-sharer thread onto a clean stop. Held back while each batch is received, the
    interrupt is raised as soon as the batch is in."""
    while True:
        with deferred_signals():
            try:
                batch = next(batches)
            except StopIteration:
                return
        yield batch


def _stop_workers(iterator) -> None:
    iterator._shutdown_workers()  # what the iterator does itself when it is garbage collected


class EpochDataLoader(WorkerSafeDataLoader):
    """A DataLoader whose batches depend only on (seed, epoch): call set_epoch(epoch) before each epoch, so a
    resumed run sees the batches an uninterrupted one would. An iteration without set_epoch takes the epoch
    after the previous iteration's (0 first), so plain `for epoch ...: for batch in loader` still varies."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pinned_epoch: int | None = None
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._pinned_epoch = int(epoch)

    def __iter__(self):
        epoch = self._next_epoch if self._pinned_epoch is None else self._pinned_epoch
        self._pinned_epoch, self._next_epoch = None, epoch + 1
        if hasattr(self.sampler, "set_epoch"):  # EpochSampler, DistributedSampler
            self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)  # before super().__iter__(): workers get their first indices there
        return super().__iter__()


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
    slice_size: int | None = None,
    slice_min_visibility: float = 0.5,
    slice_empty_keep: float = 0.1,
) -> tuple[EpochDataLoader, LoadImagesAndLabels]:
    """Dataset plus an EpochDataLoader with persistent workers (DistributedSampler under DDP); the shuffle order
    and the augmentations depend only on (seed, epoch[, rank]): call loader.set_epoch(epoch) before each epoch."""
    check_loader_args(batch_size, workers, quad)
    if rect and shuffle:
        LOGGER.warning("--rect is incompatible with shuffling, not shuffling", extra={"prefix": prefix})
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
            prefix=prefix,
            nc=nc,
            seed=seed,
            slice_size=slice_size,
            slice_min_visibility=slice_min_visibility,
            slice_empty_keep=slice_empty_keep,
        )
    batch_size = min(batch_size, len(dataset))
    nd = torch.cuda.device_count()
    nw = min((os.cpu_count() or 1) // max(nd, 1), batch_size if batch_size > 1 else 0, workers)
    if rank != -1:
        sampler = distributed.DistributedSampler(dataset, shuffle=shuffle, seed=seed)
    else:
        sampler = EpochSampler(len(dataset), seed) if shuffle else None
    generator = torch.Generator()  # only seeds the workers' own RNGs; items reseed theirs (utils.dataset.seed_item)
    generator.manual_seed(seed + max(RANK, 0))
    loader = EpochDataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=nw,
        sampler=sampler,
        pin_memory=torch.cuda.is_available(),
        collate_fn=LoadImagesAndLabels.collate_fn4 if quad else LoadImagesAndLabels.collate_fn,
        worker_init_fn=seed_worker,
        generator=generator,
        persistent_workers=nw > 0,
    )
    return loader, dataset
