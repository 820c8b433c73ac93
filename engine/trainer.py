"""One training epoch over a TrainState, as torchvision's detection references write it."""
from __future__ import annotations

import math
import random
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from engine.guards import StepGuard
from engine.state import NOMINAL_BATCH, TrainState
from utils.dataset import epoch_seed
from utils.optim import warmup
from utils.plots import plot_images
from utils.sampling import labels_to_image_weights
from utils.torch_utils import RANK, WORLD_SIZE, de_parallel

PROGRESS_HEADER = ("\n" + "%11s" * 7) % ("Epoch", "GPU_mem", "box_loss", "obj_loss", "cls_loss", "Instances", "Size")


def multi_scale(imgs: torch.Tensor, imgsz: int, gs: int, rng: random.Random) -> torch.Tensor:
    """--multi-scale: the batch resized to a random size in [0.5, 1.5] x imgsz, a multiple of the grid size."""
    sz = rng.randrange(int(imgsz * 0.5), int(imgsz * 1.5) + gs) // gs * gs
    sf = sz / max(imgs.shape[2:])
    if sf != 1:
        ns = [math.ceil(x * sf / gs) * gs for x in imgs.shape[2:]]
        imgs = nn.functional.interpolate(imgs, size=ns, mode="bilinear", align_corners=False)
    return imgs


def epoch_rng(seed: int, epoch: int) -> random.Random:
    """The training loop's own draws (multi-scale sizes, image weights) for one epoch: they depend only on
    (seed, epoch, rank), so a resumed run draws what an uninterrupted one would."""
    return random.Random(epoch_seed(seed, epoch, max(RANK, 0)))


def reweight_images(state: TrainState, rng: random.Random) -> None:
    """--image-weights: draw this epoch's images by how poorly their classes did in the last validation."""
    dataset = state.dataset
    cw = de_parallel(state.model).class_weights.cpu().numpy() * (1 - state.maps) ** 2 / state.nc
    iw = labels_to_image_weights(dataset.labels, nc=state.nc, class_weights=cw)
    dataset.indices = rng.choices(range(dataset.n), weights=iw, k=len(dataset.indices))


def _optimizer_step(state: TrainState, guard: StepGuard, epoch: int, i: int) -> bool:
    """Unscale, clip and step; False when the gradient norm is not finite and the step was skipped."""
    state.scaler.unscale_(state.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), max_norm=10.0)
    if not state.amp and not torch.isfinite(norm):  # (with AMP the scaler skips such steps itself)
        guard.skip(f"non-finite gradient norm {norm.item()}", epoch, i)
        return False
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad()
    if state.ema:
        state.ema.update(state.model)
    return True


def train_one_epoch(state: TrainState, epoch: int, guard: StepGuard, *, rng: random.Random,
                    multi_scale_on: bool = False, quad: bool = False, plots_dir: Path | None = None,
                    show_progress: bool = True) -> tuple[torch.Tensor, int]:
    """Train `epoch`; returns (mean box/obj/cls losses, batches trained on this rank).

    `rng`: the epoch's own draws (see epoch_rng); `plots_dir`: where the first three batches of the run are
    drawn (None: not drawn).
    """
    model, nb, device = state.model, state.nb, state.device
    model.train()
    mloss = torch.zeros(3, device=device)
    trained = 0
    batches = enumerate(state.train_loader)
    if show_progress:
        print(PROGRESS_HEADER)
        batches = tqdm(batches, total=nb, bar_format="{l_bar}{bar:10}{r_bar}")
    state.optimizer.zero_grad()
    for i, (imgs, targets, paths, _) in batches:
        ni = i + nb * epoch  # integrated batches since the start of training
        imgs = imgs.to(device, non_blocking=True).float() / 255
        if state.nw and ni <= state.nw:
            state.accumulate = warmup(ni, state.nw, epoch, state.lf, state.optimizer, state.hyp, NOMINAL_BATCH,
                                      state.batch_size)
        if multi_scale_on:
            imgs = multi_scale(imgs, state.imgsz, state.gs, rng)
        with torch.autocast(device_type=device.type, enabled=state.amp):
            loss, loss_items = state.compute_loss(model(imgs), targets.to(device))
            if RANK != -1:
                loss *= WORLD_SIZE  # DDP averages gradients across ranks
            if quad:
                loss *= 4.0
        if not guard.finite(loss, distributed=RANK != -1):  # a NaN/inf step would poison the weights: skip it
            guard.skip(f"non-finite loss {loss.item()}", epoch, i)
            continue
        state.scaler.scale(loss).backward()
        if ni - state.last_opt_step >= state.accumulate:
            if not _optimizer_step(state, guard, epoch, i):
                continue
            state.last_opt_step = ni
        guard.step_done()
        trained += 1
        if show_progress:
            mloss = (mloss * i + loss_items) / (i + 1)
            mem = f"{torch.cuda.memory_reserved() / 1e9 if torch.cuda.is_available() else 0:.3g}G"
            batches.set_description(("%11s" * 2 + "%11.4g" * 5) % (f"{epoch}/{state.epochs - 1}", mem, *mloss,
                                                                     targets.shape[0], imgs.shape[-1]))
            if ni < 3 and plots_dir is not None:
                plot_images(imgs, targets, paths, plots_dir / f"train_batch{ni}.jpg", state.names)
    return mloss, trained
