"""The training state, built once: model, EMA, optimizer, scheduler, gradient scaler, loss and loaders.

`build_train_state()` does in order what a YOLOv5 training run does before its first epoch; `checkpoint()`
and `restore()` save and resume every stateful part through its own state_dict().
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from models.yolo import Model, load_cfg
from utils.autoanchor import check_anchors
from utils.autobatch import autobatch
from models.checkpoints import read_checkpoint, safe_load
from utils.checkpoints import atomic_save, make_checkpoint, resolve_weights
from utils.checks import check_freeze, check_resume_nc
from utils.datasets import create_dataloader
from utils.errors import UserError
from utils.logging import LOGGER, colorstr
from utils.loss import ComputeLoss, scale_loss_gains
from utils.optim import ModelEMA, linear_lr, one_cycle, smart_optimizer, warmup_iterations
from utils.plots import plot_labels
from utils.sampling import labels_to_class_weights
from utils.slicing import SliceConfig, parse_slice_size
from utils.torch_utils import LOCAL_RANK, RANK, WORLD_SIZE, check_img_size, de_parallel, describe_transfer, intersect_dicts

NOMINAL_BATCH = 64  # gradients accumulate up to it and weight decay scales with it (YOLOv5's nbs)


@dataclass
class TrainState:
    """Everything a training epoch reads and updates."""

    model: nn.Module  # DDP-wrapped under DDP; de_parallel(model) is the DetectionModel
    ema: ModelEMA | None  # on the saving rank only
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    compute_loss: ComputeLoss
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader | None
    lf: Callable[[float], float]  # the LR schedule: a factor of lr0 per epoch
    hyp: dict
    nc: int
    names: dict
    imgsz: int
    gs: int  # grid size: the largest stride
    batch_size: int
    val_batch: int
    device: torch.device
    amp: bool
    epochs: int
    accumulate: int = 1
    slicing: SliceConfig | None = None  # train.py --slice: validation is sliced with the training tile size
    nw: int = 0  # warm-up iterations
    start_epoch: int = 0
    best_fitness: float = 0.0
    last_opt_step: int = -1
    maps: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per-class mAP of the last validation

    @property
    def dataset(self):
        return self.train_loader.dataset

    @property
    def nb(self) -> int:
        return len(self.train_loader)


def _float_state(state: dict) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def build_model(opt: argparse.Namespace, hyp: dict, nc: int, device: torch.device, resume_ckpt: dict | None) -> nn.Module:
    """The model to train: from a config, from weights (their own architecture unless --cfg names another), or
    from plain weights transferred into an SPD, SPDConv or P2 variant."""
    verbose = RANK in {-1, 0}
    if resume_ckpt is not None:
        check_resume_nc(resume_ckpt["cfg"].get("nc", nc), nc, opt.weights, opt.data)
        model = Model(resume_ckpt["cfg"], ch=3, nc=nc, verbose=verbose).to(device)
        model.load_state_dict(_float_state(resume_ckpt["model"]))
        return model
    weights = str(opt.weights).strip()
    if not weights:
        return Model(opt.cfg, ch=3, nc=nc, anchors=hyp.get("anchors"), verbose=verbose).to(device)

    path = resolve_weights(weights)
    info = read_checkpoint(path)
    model = Model(opt.cfg or info["cfg"], ch=3, nc=nc, anchors=hyp.get("anchors"), verbose=verbose).to(device)
    from models.spd import transfer_plain_weights, wants_transfer

    exclude = ["anchor"] if (opt.cfg or hyp.get("anchors")) else []
    exact = True
    if opt.cfg and wants_transfer(info["cfg"], load_cfg(opt.cfg)):  # SPD, SPDConv or P2 variant of plain weights
        state, _, exact = transfer_plain_weights(path, load_cfg(opt.cfg), nc=nc, verbose=False)
        exclude = ["anchor"] if hyp.get("anchors") else []
    else:
        state = info["state_dict"]
    csd = intersect_dicts(state, model.state_dict(), exclude=exclude)
    model.load_state_dict(csd, strict=False)
    target = Path(str(opt.cfg)).name if opt.cfg else f"its own architecture ({info['cfg'].get('yaml_file') or 'from the weights'})"
    LOGGER.info(describe_transfer(csd, model.state_dict(), source=Path(weights).name, target=target,
                                  detect_prefix=f"model.{len(model.model) - 1}.", nc_from=len(info["names"]), nc_to=nc,
                                  exact=exact))
    return model


def freeze_layers(model: nn.Module, freeze: list[int]) -> None:
    """--freeze N (the first N layers) or --freeze i j k (those layers)."""
    check_freeze(freeze, len(model.model))
    prefixes = [f"model.{x}." for x in (freeze if len(freeze) > 1 else range(freeze[0]))]
    for k, v in model.named_parameters():
        v.requires_grad = True
        if any(x in k for x in prefixes):
            LOGGER.info(f"freezing {k}")
            v.requires_grad = False


def train_tile_size(opt: argparse.Namespace, imgsz: int, gs: int) -> int | None:
    """train.py --slice: the side of the random training tiles ('auto': --img, objects at native scale)."""
    size = parse_slice_size(getattr(opt, "slice", None))
    if size == "auto":
        return imgsz
    if size is not None and size < gs:
        raise UserError(f"--slice {size} is below the model stride {gs}: use a tile size >= {gs}, e.g. 640")
    return size


def build_loaders(opt: argparse.Namespace, hyp: dict, data: dict, imgsz: int, batch_size: int, val_batch: int,
                  gs: int, nc: int):
    """The training loader (every rank) and the validation loader (the saving rank only)."""
    train_loader, dataset = create_dataloader(
        data["train"], imgsz, batch_size // WORLD_SIZE, gs, opt.single_cls, hyp=hyp, augment=True, cache=opt.cache,
        rect=opt.rect, rank=LOCAL_RANK, workers=opt.workers, image_weights=opt.image_weights, quad=opt.quad,
        prefix=colorstr("train: "), shuffle=True, seed=opt.seed, nc=int(data["nc"]),
        slice_size=train_tile_size(opt, imgsz, gs), slice_min_visibility=getattr(opt, "slice_min_visibility", 0.5),
        slice_empty_keep=getattr(opt, "slice_empty", 0.1),
    )
    labels = np.concatenate([x for x in dataset.labels if len(x)], 0) if any(len(x) for x in dataset.labels) else np.zeros((0, 5))
    if len(labels) and int(labels[:, 0].max()) >= nc:
        raise UserError(f"label class {int(labels[:, 0].max())} exceeds nc={nc} in {opt.data}; possible class labels are 0-{nc - 1}")
    val_loader = None
    if RANK in {-1, 0}:
        val_loader = create_dataloader(
            data["val"], imgsz, val_batch, gs, opt.single_cls, hyp=hyp, cache=None if opt.noval else opt.cache,
            rect=True, rank=-1, workers=opt.workers * 2, pad=0.5, prefix=colorstr("val: "), nc=int(data["nc"]),
        )[0]
    return train_loader, val_loader, labels


def build_train_state(opt: argparse.Namespace, hyp: dict, data: dict, names: dict, device: torch.device,
                      save_dir: Path, resume_ckpt: dict | None = None,
                      on_batch_size: Callable[[int], None] | None = None) -> TrainState:
    """Model, optimizer, schedule, EMA and loaders, in YOLOv5's order (seeded runs depend on it)."""
    nc = 1 if opt.single_cls else int(data["nc"])
    model = build_model(opt, hyp, nc, device, resume_ckpt)
    amp = device.type == "cuda"
    freeze_layers(model, opt.freeze)
    gs = max(int(model.stride.max()), 32)
    imgsz = check_img_size(opt.imgsz, gs, floor=gs * 2)
    batch_size = opt.batch_size
    if batch_size == -1:  # YOLOv5's AutoBatch
        batch_size = autobatch(model, imgsz, amp=amp)
        if on_batch_size:
            on_batch_size(batch_size)
    accumulate = max(round(NOMINAL_BATCH / batch_size), 1)
    hyp["weight_decay"] *= batch_size * accumulate / NOMINAL_BATCH
    optimizer = smart_optimizer(model, opt.optimizer, hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
    lf = one_cycle(1, hyp["lrf"], opt.epochs) if opt.cos_lr else linear_lr(hyp["lrf"], opt.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lf)
    scheduler.last_epoch = -1  # YOLOv5's: the first epoch trains at lf(0) after warm-up, each epoch steps it once
    ema = ModelEMA(model) if RANK in {-1, 0} else None
    state = TrainState(model=model, ema=ema, optimizer=optimizer, scheduler=scheduler,
                       scaler=torch.amp.GradScaler("cuda", enabled=amp), compute_loss=None, train_loader=None,
                       val_loader=None, lf=lf, hyp=hyp, nc=nc, names=names, imgsz=imgsz, gs=gs, batch_size=batch_size,
                       val_batch=batch_size // WORLD_SIZE * 2, device=device, amp=amp, epochs=opt.epochs,
                       accumulate=accumulate, maps=np.zeros(nc))
    if resume_ckpt is not None:
        restore(state, resume_ckpt, opt.weights)
    if RANK != -1 and opt.sync_bn:
        state.model = nn.SyncBatchNorm.convert_sync_batchnorm(state.model).to(device)
        LOGGER.info("Using SyncBatchNorm()")
    state.train_loader, state.val_loader, labels = build_loaders(opt, hyp, data, imgsz, batch_size, state.val_batch, gs, nc)
    tile = state.dataset.slice_size
    state.slicing = SliceConfig(size=tile).check(gs) if tile else None
    if RANK in {-1, 0} and resume_ckpt is None:
        if not opt.noautoanchor:
            check_anchors(state.dataset, model=state.model, thr=hyp["anchor_t"], imgsz=imgsz)
        state.model.half().float()  # pre-reduce anchor precision, as stored checkpoints will
        if not opt.noplots:
            plot_labels(labels, names, save_dir)
    _finish_model(state, opt)
    return state


def _finish_model(state: TrainState, opt: argparse.Namespace) -> None:
    """DDP wrapping, loss gains scaled to the model, model attributes, warm-up length and the loss."""
    if RANK != -1:
        cuda = state.device.type == "cuda"
        state.model = nn.parallel.DistributedDataParallel(state.model, device_ids=[LOCAL_RANK] if cuda else None,
                                                          output_device=LOCAL_RANK if cuda else None)
    m = de_parallel(state.model)
    state.hyp = scale_loss_gains(state.hyp, nl=m.model[-1].nl, nc=state.nc, imgsz=state.imgsz)
    state.hyp["label_smoothing"] = opt.label_smoothing
    m.nc, m.hyp, m.names = state.nc, state.hyp, state.names
    m.class_weights = labels_to_class_weights(state.dataset.labels, state.nc).to(state.device) * state.nc
    state.nw = warmup_iterations(state.hyp["warmup_epochs"], state.nb)
    state.compute_loss = ComputeLoss(state.model)


def restore(state: TrainState, ckpt: dict, weights: str) -> None:
    """Resume: optimizer, EMA, scheduler and scaler state, best fitness and the next epoch from a last.pt."""
    if ckpt.get("optimizer"):
        state.optimizer.load_state_dict(ckpt["optimizer"])
    if state.ema and ckpt.get("ema"):
        state.ema.load_state_dict({"ema": _float_state(ckpt["ema"]), "updates": int(ckpt.get("updates") or 0)})
    if ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    state.best_fitness = float(ckpt.get("best_fitness") or 0.0)
    state.last_opt_step = int(ckpt.get("last_opt_step", -1))
    state.start_epoch = int(ckpt["epoch"]) + 1
    if state.start_epoch >= state.epochs:
        raise UserError(f"{weights} has already trained {state.start_epoch} of {state.epochs} epochs: nothing to resume")
    LOGGER.info(f"Resuming training from {weights} at epoch {state.start_epoch} of {state.epochs}")
    if ckpt.get("scheduler"):
        state.scheduler.load_state_dict(ckpt["scheduler"])
    else:  # a checkpoint from before schedulers were saved
        state.scheduler.last_epoch = state.start_epoch - 1


def checkpoint(state: TrainState, epoch: int, opt: argparse.Namespace, half: bool = False) -> dict:
    """A resumable checkpoint (full precision while training; `strip_checkpoint` halves the final files)."""
    ema = state.ema
    return make_checkpoint(
        de_parallel(state.model), ema.ema, half=half, epoch=epoch, best_fitness=float(state.best_fitness),
        updates=ema.updates, optimizer=state.optimizer.state_dict(), scheduler=state.scheduler.state_dict(),
        scaler=state.scaler.state_dict(), last_opt_step=state.last_opt_step,
        opt={k: str(v) if isinstance(v, Path) else v for k, v in vars(opt).items()}, hyp=state.hyp,
        val={"batch_size": state.val_batch, "imgsz": state.imgsz, "single_cls": bool(opt.single_cls)},
    )


def strip_checkpoint(path: Path) -> None:
    """A finished run's checkpoint, as it is used from now on: fp16 weights, no optimizer, scheduler or scaler."""
    ckpt = safe_load(path)
    for k in ("model", "ema"):
        if ckpt.get(k):
            ckpt[k] = {n: v.half() if v.is_floating_point() else v for n, v in ckpt[k].items()}
    ckpt.update(optimizer=None, scheduler=None, scaler=None)
    atomic_save(ckpt, path)
