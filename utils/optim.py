"""Optimisation pieces of YOLOv5's (v7.0) training recipe: parameter groups, LR schedules,
warm-up, the weight EMA and early stopping."""
from __future__ import annotations

import math
from copy import deepcopy
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from utils.logging import LOGGER
from utils.torch_utils import de_parallel

OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSProp")


def _norm_layer_types() -> tuple[type, ...]:
    """Every torch.nn normalisation layer (BatchNorm*, LayerNorm, GroupNorm, ...)."""
    return tuple(v for k, v in vars(nn).items() if "Norm" in k and isinstance(v, type))


def smart_optimizer(
    model: nn.Module, name: str = "SGD", lr: float = 0.001, momentum: float = 0.9, decay: float = 1e-5
) -> torch.optim.Optimizer:
    """Optimizer with YOLOv5's three parameter groups, in this order in `param_groups`:

    0: biases, no weight decay (first, because warm-up ramps this group's LR down from
       warmup_bias_lr); 1: weights of conv/linear layers with `decay`; 2: weights of
       normalisation layers, no decay (decaying BN scales only shrinks activations).
    """
    g_bn, g_w, g_b = [], [], []  # norm weights (no decay), other weights (decay), biases (no decay)
    norms = _norm_layer_types()
    for module in model.modules():
        for p_name, p in module.named_parameters(recurse=False):
            if p_name == "bias":
                g_b.append(p)
            elif p_name == "weight" and isinstance(module, norms):
                g_bn.append(p)
            else:
                g_w.append(p)

    if name == "Adam":
        optimizer = torch.optim.Adam(g_b, lr=lr, betas=(momentum, 0.999))
    elif name == "AdamW":
        optimizer = torch.optim.AdamW(g_b, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    elif name == "RMSProp":
        optimizer = torch.optim.RMSprop(g_b, lr=lr, momentum=momentum)
    elif name == "SGD":
        optimizer = torch.optim.SGD(g_b, lr=lr, momentum=momentum, nesterov=True)
    else:
        raise ValueError(f"optimizer '{name}' is not known; choose one of {', '.join(OPTIMIZERS)}")
    optimizer.add_param_group({"params": g_w, "weight_decay": decay})
    optimizer.add_param_group({"params": g_bn, "weight_decay": 0.0})
    LOGGER.info(
        f"optimizer: {type(optimizer).__name__}(lr={lr}) with parameter groups "
        f"{len(g_bn)} weight(decay=0.0), {len(g_w)} weight(decay={decay}), {len(g_b)} bias"
    )
    return optimizer


def one_cycle(y1: float = 0.0, y2: float = 1.0, steps: int = 100) -> Callable[[float], float]:
    """Half-cosine ramp from y1 at x=0 to y2 at x=steps (YOLOv5's --cos-lr LR factor)."""
    return lambda x: ((1 - math.cos(x * math.pi / steps)) / 2) * (y2 - y1) + y1


def linear_lr(lrf: float, epochs: int) -> Callable[[float], float]:
    """Straight line from 1 at epoch 0 to lrf at `epochs` (YOLOv5's default LR factor)."""
    return lambda x: (1 - x / epochs) * (1.0 - lrf) + lrf


def warmup(
    ni: int,
    nw: int,
    epoch: int,
    lf: Callable[[float], float],
    optimizer: torch.optim.Optimizer,
    hyp: dict,
    nbs: int,
    batch_size: int,
) -> int:
    """Warm-up step for integrated iteration ni <= nw; returns the gradient-accumulation count.

    Over [0, nw] accumulation rises from 1 to nbs / batch_size, the bias group's LR falls from
    warmup_bias_lr and the other groups' LR rises from 0, both to initial_lr * lf(epoch), and
    momentum rises from warmup_momentum to momentum (groups without momentum, e.g. Adam's, keep
    their betas).
    """
    xi = [0, nw]
    accumulate = max(1, int(np.interp(ni, xi, [1, nbs / batch_size]).round()))
    for j, group in enumerate(optimizer.param_groups):
        group.setdefault("initial_lr", group["lr"])  # set by LR schedulers; here when there is none
        start = hyp["warmup_bias_lr"] if j == 0 else 0.0  # group 0 holds the biases
        group["lr"] = float(np.interp(ni, xi, [start, group["initial_lr"] * lf(epoch)]))
        if "momentum" in group:
            group["momentum"] = float(np.interp(ni, xi, [hyp["warmup_momentum"], hyp["momentum"]]))
    return accumulate


MIN_WARMUP_ITERS = 100  # YOLOv5's floor, so that a tiny dataset still warms up gradually


def warmup_iterations(warmup_epochs: float, batches_per_epoch: int) -> int:
    """Warm-up length in optimiser iterations: YOLOv5's max(epochs x batches, 100); 0 epochs disables it."""
    if warmup_epochs <= 0:
        return 0
    return max(round(warmup_epochs * batches_per_epoch), MIN_WARMUP_ITERS)


def warmup_warning(warmup_iters: int, planned_iters: int) -> str | None:
    """One line when warm-up takes a third or more of the run, where the LR spends most of it far below lr0."""
    if not warmup_iters or planned_iters >= 3 * warmup_iters:
        return None
    share = min(warmup_iters / max(planned_iters, 1), 1.0)
    return (f"WARNING: warm-up is {warmup_iters} iterations, {share:.0%} of the {planned_iters} planned: the learning "
            f"rate stays below lr0 for {'all' if share >= 1 else 'much'} of this run. Train for more epochs, or set "
            f"warmup_epochs lower in --hyp (0 disables warm-up)")


def copy_attr(a: object, b: object, include: tuple = (), exclude: tuple = ()) -> None:
    """Copy b's public attributes onto a (only `include` if given, never `exclude`)."""
    for k, v in b.__dict__.items():
        if (include and k not in include) or k.startswith("_") or k in exclude:
            continue
        setattr(a, k, v)


class ModelEMA:
    """Exponential moving average of a model's weights and buffers (Polyak averaging).

    The decay ramps up as decay * (1 - exp(-updates / tau)) so early, poor weights fade fast.
    `ema.ema` is a plain model: save it (or its state_dict) together with `ema.updates`.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0):
        self.ema = deepcopy(de_parallel(model)).eval()
        self.updates = updates
        self.max_decay = decay
        self.tau = tau
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def decay(self, x: float) -> float:
        """The averaging weight kept from the EMA after x updates."""
        return self.max_decay * (1 - math.exp(-x / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay(self.updates)
        msd = de_parallel(model).state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:  # integer buffers (BN num_batches_tracked) are not averaged
                v *= d
                v += (1 - d) * msd[k].detach()

    def update_attr(self, model: nn.Module, include: tuple = (), exclude: tuple = ("process_group", "reducer")) -> None:
        """Copy non-tensor attributes (names, hyp, nc, ...) so the EMA model is usable alone."""
        copy_attr(self.ema, model, include, exclude)

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict(), "updates": self.updates, "decay": self.max_decay, "tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state["ema"])
        self.updates = state["updates"]
        self.max_decay = state.get("decay", self.max_decay)
        self.tau = state.get("tau", self.tau)


class EarlyStopping:
    """Stop when fitness has not improved for `patience` epochs (patience 0 or None: never)."""

    def __init__(self, patience: int | None = 30):
        self.best_fitness = 0.0
        self.best_epoch = 0
        self.patience = patience or float("inf")
        self.possible_stop = False  # True in the last epoch before a stop

    def __call__(self, epoch: int, fitness: float) -> bool:
        if fitness >= self.best_fitness:  # >= so a plateau at the start (fitness 0) counts
            self.best_epoch = epoch
            self.best_fitness = fitness
        delta = epoch - self.best_epoch
        self.possible_stop = delta >= (self.patience - 1)
        stop = delta >= self.patience
        if stop:
            LOGGER.info(
                f"EarlyStopping: fitness has not improved for {self.patience} epochs (best {self.best_fitness:.5f} "
                f"at epoch {self.best_epoch}, kept as best.pt), so training stops here. "
                f"Train longer with a larger --patience, or turn this off with --patience 0."
            )
        return stop
