"""PyTorch helpers: devices, seeding, Conv+BN fusion, model summaries and FLOP counting."""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from utils.errors import UserError
from utils.logging import LOGGER

LOCAL_RANK = int(os.getenv("LOCAL_RANK", -1))
RANK = int(os.getenv("RANK", -1))
WORLD_SIZE = int(os.getenv("WORLD_SIZE", 1))


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), for benchmark reports."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                platform.processor() or platform.machine())


def select_device(device: str | int | torch.device = "", batch_size: int = 0) -> torch.device:
    """'' (best available), 'cpu', '0' or '0,1,2,3' -> torch.device; a device that is not there is a UserError."""
    if isinstance(device, torch.device):
        return device
    spec = str(device).strip().lower().replace("cuda:", "").replace("none", "")
    if spec == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"  # so libraries that look at CUDA do not grab a GPU
        return torch.device("cpu")
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError("--device mps requested but Apple MPS is not available on this machine")
        return torch.device("mps")
    if spec:
        ids = [s for s in spec.split(",") if s != ""]
        if not all(s.isdigit() for s in ids):
            raise UserError(f"invalid --device '{device}': use 'cpu', a CUDA index like 0, or a list like 0,1")
        n = torch.cuda.device_count()
        missing = [s for s in ids if int(s) >= n]
        if missing:
            have = f"{n} CUDA device(s)" if n else "no CUDA device"
            raise UserError(f"--device {device} requested but this machine has {have}; use --device cpu")
        if batch_size and len(ids) > 1 and batch_size % len(ids):
            raise UserError(f"--batch-size {batch_size} must be a multiple of the GPU count {len(ids)}")
        return torch.device(f"cuda:{ids[0]}" if LOCAL_RANK < 0 else f"cuda:{LOCAL_RANK}")
    if torch.cuda.is_available():
        return torch.device(f"cuda:{max(LOCAL_RANK, 0)}")
    return torch.device("cpu")


def init_seeds(seed: int = 0, deterministic: bool = False) -> None:
    """Seed every RNG the pipeline touches; `deterministic` also asks cuDNN/torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        os.environ["PYTHONHASHSEED"] = str(seed)


def ignore_interrupts() -> None:
    """For DataLoader workers: the main process owns Ctrl-C/SIGTERM and shuts its workers down itself.

    A terminal sends SIGINT to the whole process group; a worker that raised on it would die mid-batch
    and turn the main process's clean stop into 'DataLoader worker exited unexpectedly' tracebacks.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def deferred_signals(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM), escalate: bool = True):
    """Holds SIGINT/SIGTERM back until the block ends, then delivers the first one to the handler of before.

    With `escalate` a second signal inside the block is delivered at once: whoever presses Ctrl-C twice while a
    batch is awaited means it. Without, the block always runs to its end (a checkpoint being written).
    Outside the main thread (where handlers cannot be set) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # an ignored signal has nothing to hold back; a handler installed from C reads as None and could not be put back
    previous = {s: h for s in signums if (h := signal.getsignal(s)) not in (None, signal.SIG_IGN)}
    pending: list[int] = []

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)

    def note(signum, frame) -> None:
        if pending and escalate:
            pending.clear()
            restore()
            signal.raise_signal(signum)
        elif not pending:
            pending.append(signum)

    for s in previous:
        signal.signal(s, note)
    try:
        yield
    finally:
        restore()
        if pending:
            signal.raise_signal(pending[0])


def time_sync() -> float:
    """Wall time after waiting for queued CUDA work, so timings measure the work itself."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.time()


def is_parallel(model: nn.Module) -> bool:
    return isinstance(model, (nn.parallel.DataParallel, nn.parallel.DistributedDataParallel))


def de_parallel(model: nn.Module) -> nn.Module:
    """The underlying model of a DP/DDP wrapper (or the model itself)."""
    return model.module if is_parallel(model) else model


@contextlib.contextmanager
def torch_distributed_zero_first(local_rank: int):
    """Let rank 0 do a one-time job (download, cache) while the other ranks wait for it."""
    if local_rank not in (-1, 0):
        dist.barrier()
    yield
    if local_rank == 0:
        dist.barrier()


@torch.no_grad()
def fuse_conv_and_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Fold a BatchNorm into the preceding convolution: y = gamma * (Wx - mean) / std + beta."""
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
    ).requires_grad_(False).to(conv.weight.device)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
    conv_bias = torch.zeros(conv.out_channels, device=conv.weight.device) if conv.bias is None else conv.bias
    fused.bias.copy_(bn.bias + (conv_bias - bn.running_mean) * scale)
    return fused


def count_flops(model: nn.Module, img_size: int | tuple = 640, ch: int = 3) -> float:
    """GFLOPs of one forward pass at img_size, counted as 2 x multiply-accumulates (convs, matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    p = next(model.parameters())
    x = torch.zeros(1, ch, h, w, device=p.device, dtype=p.dtype)
    m = deepcopy(model).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(x)
    return counter.get_total_flops() / 1e9


def model_info(model: nn.Module, verbose: bool = False, img_size: int = 640) -> tuple[int, int, int, float]:
    """Print and return (layers, parameters, gradients, GFLOPs) in YOLOv5's summary form."""
    n_p = sum(x.numel() for x in model.parameters())
    n_g = sum(x.numel() for x in model.parameters() if x.requires_grad)
    n_l = len(list(model.modules()))
    if verbose:
        print(f"{'layer':>5} {'name':>40} {'gradient':>9} {'parameters':>12} {'shape':>20} {'mu':>10} {'sigma':>10}")
        for i, (name, p) in enumerate(model.named_parameters()):
            print(
                f"{i:5g} {name:>40} {str(p.requires_grad):>9} {p.numel():12g} {str(list(p.shape)):>20} "
                f"{p.mean().item():10.3g} {p.std().item() if p.numel() > 1 else 0:10.3g}"
            )
    try:
        stride = int(max(getattr(model, "stride", torch.tensor([32])).max(), 32))
        flops = count_flops(model, stride) * (img_size / stride) ** 2
    except Exception:  # a model that cannot run at the stride size still gets a summary
        flops = float("nan")
    name = getattr(model, "yaml_file", "") or "Model"
    LOGGER.info(f"{name} summary: {n_l} layers, {n_p:,} parameters, {n_g:,} gradients, {flops:.1f} GFLOPs")
    return n_l, n_p, n_g, flops


def intersect_dicts(da: dict, db: dict, exclude: tuple = ()) -> dict:
    """Entries of da whose key is in db with the same shape (and not excluded): a partial transfer."""
    return {k: v for k, v in da.items() if k in db and all(x not in k for x in exclude) and v.shape == db[k].shape}


def describe_transfer(loaded: dict, model_state: dict, source: str, target: str, detect_prefix: str,
                      nc_from: int, nc_to: int, exact: bool = True) -> str:
    """One line for every weight transfer: how many tensors came over exactly, how many start fresh and why."""
    fresh = [k for k in model_state if k not in loaded]
    groups: dict[str, int] = {}
    for k in fresh:
        if k.startswith(detect_prefix) and k.endswith("anchors"):
            why = "anchors (from this run's config/AutoAnchor)"
        elif k.startswith(detect_prefix):
            why = (f"Detect outputs (nc={nc_to}, the weights have nc={nc_from})" if nc_to != nc_from
                   else "Detect outputs of a new level or shape")
        else:
            why = "tensors of layers new to this architecture (initialised as YOLOv5 does)"
        groups[why] = groups.get(why, 0) + 1
    how = "exactly" if exact else "approximately (nearest kernel taps: the model starts near, not at, the plain one)"
    line = f"Transferred {len(loaded)}/{len(model_state)} tensors {how} from {source} into {target}"
    if groups:
        line += "; re-initialised " + ", ".join(f"{n} {why}" for why, n in groups.items())
    return line


def scale_img(img: torch.Tensor, ratio: float = 1.0, same_shape: bool = False, gs: int = 32) -> torch.Tensor:
    """Resize a BCHW batch by `ratio`, padding to a multiple of gs with ImageNet-mean grey (for TTA)."""
    if ratio == 1.0:
        return img
    h, w = img.shape[2:]
    s = (int(h * ratio), int(w * ratio))
    img = torch.nn.functional.interpolate(img, size=s, mode="bilinear", align_corners=False)
    if not same_shape:
        h, w = (math.ceil(x * ratio / gs) * gs for x in (h, w))
    return torch.nn.functional.pad(img, [0, w - s[1], 0, h - s[0]], value=0.447)


def check_img_size(imgsz, stride: int = 32, floor: int = 0):
    """Round an image size (int) or sizes (list) up to a multiple of the stride, at least `floor`, warning on change."""
    single = isinstance(imgsz, int)
    sizes = [imgsz] if single else [int(s) for s in imgsz]
    if any(s <= 0 for s in sizes):
        raise UserError(f"--imgsz must be positive, got {imgsz}")
    from utils.limits import check_limit

    check_limit("imgsz", max(sizes), f"--imgsz {max(sizes)} (pixels per side)")
    new = [max(int(math.ceil(s / stride) * stride), floor) for s in sizes]
    out = new[0] if single else new
    if new != sizes:
        LOGGER.warning(f"--imgsz {imgsz} must be a multiple of max stride {stride}, updating to {out}")
    return out


@torch.inference_mode()
def forward_times_ms(model: nn.Module, x: torch.Tensor, runs: int, warmup: int = 3) -> list[float]:
    """Wall-clock milliseconds of each of `runs` forward passes of model(x), after `warmup` untimed ones
    (allocator and kernel selection)."""
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def ddp_rank_summary(model: nn.Module, batches: int) -> list[tuple[int, float]] | None:
    """Under DDP, every rank's (batches it trained on, sum of its weights), gathered on all ranks.

    Shows that each rank really trained and that gradient all-reduce kept the replicas identical;
    None outside DDP. Every rank must call it (it is a collective).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    params = [p.detach().reshape(-1) for p in de_parallel(model).parameters()]
    flat = torch.cat(params).double()
    mine = torch.stack((torch.tensor(float(batches), dtype=torch.float64, device=flat.device), flat.sum()))
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [(int(t[0].item()), float(t[1].item())) for t in gathered]
