"""What keeps a long training run safe: a guard against NaN/inf steps, and a checkpoint writer that a
Ctrl-C or SIGTERM cannot cut short."""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from utils.checkpoints import atomic_save
from utils.errors import UserError
from utils.logging import LOGGER
from utils.torch_utils import deferred_signals


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM during training: last.pt is saved, then the run exits with a resume hint."""


class StepGuard:
    """Skips optimizer steps whose loss or gradient norm is not finite, and stops after `max_bad` in a row.

    BatchNorm statistics change in the forward pass, before the loss is known: the guard keeps a copy of the
    last good ones, so a skipped step cannot leave NaN running means behind.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_bad: int = 10,
                 last_checkpoint: Path | None = None):
        self.optimizer, self.max_bad, self.last_checkpoint = optimizer, max_bad, last_checkpoint
        self.buffers = list(model.buffers())
        self.good_buffers = [b.detach().clone() for b in self.buffers]
        self.bad_steps = 0

    @staticmethod
    def finite(loss: torch.Tensor, distributed: bool) -> bool:
        """Whether this step's loss is finite on every rank (all ranks must skip together, or the others
        would wait in backward forever)."""
        ok = torch.isfinite(loss.detach()).float().reshape(1)
        if distributed:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def skip(self, why: str, epoch: int, i: int) -> None:
        """Drop this step's gradients and BatchNorm updates; stop the run after `max_bad` in a row."""
        self.bad_steps += 1
        self.optimizer.zero_grad()
        torch._foreach_copy_(self.buffers, self.good_buffers)
        print()  # off the progress bar's line
        LOGGER.warning(f"{why} at epoch {epoch} batch {i}: step skipped ({self.bad_steps} in a row)")
        if self.bad_steps >= self.max_bad:
            last = self.last_checkpoint
            raise UserError(f"{self.max_bad} non-finite losses or gradients in a row: stopping; the last good "
                            f"checkpoint is {last if last and last.exists() else 'not written yet'}. Try a lower --hyp lr0")

    def step_done(self) -> None:
        """A good step: reset the count and keep these BatchNorm statistics as the last good ones."""
        self.bad_steps = 0
        torch._foreach_copy_(self.good_buffers, self.buffers)


class CheckpointWriter:
    """Writes last.pt, best.pt and epochN.pt atomically, and turns SIGINT/SIGTERM into TrainingInterrupted.

    A signal that arrives while a checkpoint is being written is only noted, and raised right after the write:
    raised inside torch.save, the interrupt would be replaced by the zip writer's own error on unwinding.
    Use as a context manager around the epoch loop (on the rank that saves).
    """

    def __init__(self, weights_dir: Path, make_checkpoint: Callable[[int], dict], save_period: int = -1):
        self.dir = Path(weights_dir)
        self.last, self.best = self.dir / "last.pt", self.dir / "best.pt"
        self.make_checkpoint, self.save_period = make_checkpoint, save_period
        self.saved_epoch = -1
        self.previous: dict = {}

    def save(self, epoch: int, is_best: bool, final: bool = False) -> None:
        with deferred_signals(escalate=False):  # an interrupt is raised once the files are written
            ckpt = self.make_checkpoint(epoch)
            atomic_save(ckpt, self.last)
            if is_best:
                atomic_save(ckpt, self.best)
            if self.save_period > 0 and epoch % self.save_period == 0 and not final:
                atomic_save(ckpt, self.dir / f"epoch{epoch}.pt")
            self.saved_epoch = epoch

    def save_interrupted(self, epoch: int) -> None:
        """After an interrupt in `epoch`: last.pt as of the epoch before (the interrupted one is redone on
        resume), unless last.pt already holds it. A second Ctrl-C cannot cut this write short."""
        for s in self.previous:
            signal.signal(s, signal.SIG_IGN)
        partial = epoch - 1
        if self.saved_epoch != epoch and (partial >= 0 or not self.last.exists()):
            atomic_save(self.make_checkpoint(partial), self.last)

    def _on_signal(self, signum, frame) -> None:
        raise TrainingInterrupted(signal.Signals(signum).name)

    def __enter__(self) -> "CheckpointWriter":
        self.previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous = {}
