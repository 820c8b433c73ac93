"""AutoBatch (`train.py --batch-size -1`): the largest batch that fits a share of the free CUDA memory."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from utils.logging import LOGGER

CPU_BATCH = 16  # YOLOv5's fallback where there is no GPU memory to measure
PROBE_SIZES = (1, 2, 4, 8, 16)


def fit_batch(sizes: list[int], mem_bytes: list[float], budget_bytes: float, lo: int = 1, hi: int = 1024) -> int:
    """Batch size at which a straight line through the (batch, memory) probes reaches `budget_bytes`."""
    slope, intercept = np.polyfit(np.asarray(sizes, float), np.asarray(mem_bytes, float), 1)
    if slope <= 0:  # memory did not grow with the batch: the probe says nothing useful
        return max(lo, min(hi, max(sizes)))
    return int(max(lo, min(hi, np.floor((budget_bytes - intercept) / slope + 1e-6))))  # (+eps: fit round-off)


def _probe(model: nn.Module, imgsz: int, batch: int, device: torch.device, amp: bool) -> float:
    """Peak CUDA memory (bytes) of one training forward and backward at this batch size."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    x = torch.zeros(batch, 3, imgsz, imgsz, device=device)
    with torch.autocast(device_type="cuda", enabled=amp):
        out = model(x)
        loss = sum(o.float().sum() for o in (out if isinstance(out, (list, tuple)) else [out]))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return float(torch.cuda.max_memory_allocated(device))


def autobatch(model: nn.Module, imgsz: int, amp: bool = True, fraction: float = 0.6) -> int:
    """Probe a few batch sizes and pick the one that uses `fraction` of the device's free memory."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        LOGGER.info(f"AutoBatch: no CUDA device, using --batch-size {CPU_BATCH} on {device.type.upper()}")
        return CPU_BATCH
    free, _total = torch.cuda.mem_get_info(device)
    sizes, mems = [], []
    was_training = model.training
    model.train()
    try:
        for b in PROBE_SIZES:
            mems.append(_probe(model, imgsz, b, device, amp))
            sizes.append(b)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
    finally:
        model.train(was_training)
    if len(sizes) < 2:
        LOGGER.info(f"AutoBatch: could not probe the memory use at --img {imgsz}; using --batch-size {CPU_BATCH}")
        return CPU_BATCH
    base = torch.cuda.memory_allocated(device)
    batch = fit_batch(sizes, mems, budget_bytes=base + fraction * free)
    LOGGER.info(f"AutoBatch: --batch-size {batch} for --img {imgsz} fills about {fraction:.0%} of "
          f"{free / 2**30:.1f} GiB free CUDA memory")
    return batch
