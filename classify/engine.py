"""Training and evaluation loops for the classifiers (called by train.py, val.py and the benchmark)."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.optim import ModelEMA, linear_lr, smart_optimizer

TQDM_FORMAT = "{l_bar}{bar:10}{r_bar}"
LRF = 0.01  # final LR = lr0 * LRF, reached linearly (YOLOv5 classify's schedule)


def training_setup(
    model: nn.Module,
    epochs: int,
    optimizer: str = "Adam",
    lr0: float = 0.001,
    momentum: float = 0.9,
    decay: float = 5e-5,
    label_smoothing: float = 0.1,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, ModelEMA, nn.Module]:
    """The recipe shared by train.py and the benchmark: YOLOv5 parameter groups, linear LR decay to
    lr0 * LRF over `epochs` (stepped once per epoch), weight EMA, label-smoothed cross-entropy."""
    opt = smart_optimizer(model, optimizer, lr0, momentum, decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=linear_lr(LRF, epochs))
    return opt, scheduler, ModelEMA(model), nn.CrossEntropyLoss(label_smoothing=label_smoothing)


@dataclass
class EvalResult:
    top1: float  # fraction correct, 0-1
    top5: float
    loss: float
    n: int
    confusion: np.ndarray = field(repr=False)  # [true, predicted] counts

    @property
    def per_class(self) -> np.ndarray:
        """Top-1 accuracy of each true class (nan for a class with no images)."""
        support = self.confusion.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.diag(self.confusion) / support

    @property
    def support(self) -> np.ndarray:
        return self.confusion.sum(1)


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> int:
    """How many targets are among the k highest logits (k is capped at the class count)."""
    k = min(k, logits.shape[1])
    return int((logits.topk(k, 1).indices == targets[:, None]).any(1).sum())


def _autocast(device: torch.device):
    # mixed precision only where it is fast and safe; CPU runs stay in float32
    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    nc: int,
    criterion: nn.Module | None = None,
    desc: str = "val",
    progress: bool = True,
) -> EvalResult:
    """Top-1/top-5 accuracy, mean loss and a confusion matrix over one pass of `loader`."""
    was_training = model.training
    model.eval()
    criterion = criterion or nn.CrossEntropyLoss()
    confusion = torch.zeros(nc, nc, dtype=torch.long)
    c1 = c5 = n = 0
    loss_sum = 0.0
    bar = tqdm(loader, desc=f"{desc:>12}", bar_format=TQDM_FORMAT, disable=not progress, leave=progress)
    for x, y in bar:
        if not len(y):
            continue
        x, y = x.to(device, non_blocking=True), y.to(device)
        with _autocast(device):
            logits = model(x)
        logits = logits.float()
        loss_sum += float(criterion(logits, y)) * len(y)
        c1 += topk_correct(logits, y, 1)
        c5 += topk_correct(logits, y, 5)
        n += len(y)
        pred = logits.argmax(1).cpu()
        confusion += torch.bincount(y.cpu() * nc + pred, minlength=nc * nc).view(nc, nc)
        bar.set_postfix_str(f"top1 {c1 / n:.3f} top5 {c5 / n:.3f}")
    model.train(was_training)
    if n == 0:
        return EvalResult(float("nan"), float("nan"), float("nan"), 0, confusion.numpy())
    return EvalResult(c1 / n, c5 / n, loss_sum / n, n, confusion.numpy())


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    device: torch.device,
    ema: ModelEMA | None = None,
    scaler: torch.amp.GradScaler | None = None,
    desc: str = "train",
    progress: bool = True,
) -> float:
    """One pass over `loader`; returns the mean training loss."""
    model.train()
    loss_sum, n = 0.0, 0
    bar = tqdm(loader, desc=f"{desc:>12}", bar_format=TQDM_FORMAT, disable=not progress, leave=progress)
    for x, y in bar:
        if not len(y):
            continue
        x, y = x.to(device, non_blocking=True), y.to(device)
        with _autocast(device):
            loss = criterion(model(x).float(), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {float(loss)}: lower --lr0")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
            optimizer.step()
        if ema is not None:
            ema.update(model)
        loss_sum += loss.item() * len(y)
        n += len(y)
        mem = f"{torch.cuda.memory_reserved() / 1e9:.2f}G" if device.type == "cuda" else ""
        bar.set_postfix_str(f"loss {loss_sum / n:.4f} {mem}".strip())
    return loss_sum / max(n, 1)


def format_per_class(result: EvalResult, names: list[str]) -> str:
    """A YOLOv5-style table: Class, Images, top1_acc (per class) with an 'all' row first."""
    lines = [f"{'Class':>24}{'Images':>12}{'top1_acc':>12}{'top5_acc':>12}"]
    lines.append(f"{'all':>24}{result.n:>12}{result.top1:>12.3g}{result.top5:>12.3g}")
    for name, n, acc in zip(names, result.support, result.per_class):
        lines.append(f"{name:>24}{int(n):>12}{acc:>12.3g}")
    return "\n".join(lines)
