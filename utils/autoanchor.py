"""AutoAnchor (YOLOv5 v7.0): check how well the anchors fit a dataset and evolve better ones if not.

Both functions measure fit with YOLOv5's ratio metric: a label matches an anchor when neither side
differs by more than `thr` times, the same rule the loss uses (hyp anchor_t) to assign targets.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from utils.logging import LOGGER
from utils.torch_utils import de_parallel

PREFIX = "AutoAnchor: "
BAR_FORMAT = "{l_bar}{bar:10}{r_bar}"


def _ratio_metric(k: torch.Tensor, wh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per label/anchor fit, best fit per label); fit = worst side ratio min(r, 1/r) in (0, 1]."""
    r = wh[:, None] / k[None]
    x = torch.min(r, 1 / r).min(2)[0]
    return x, x.max(1)[0]


def _label_wh(dataset: Any, img_size: int, scale: np.ndarray | None = None) -> np.ndarray:
    """Label widths/heights in pixels after resizing each image so its long side is img_size (with slicing,
    each tile of min(slice_size, long side) pixels: the scale training and sliced inference see objects at)."""
    long_side = dataset.shapes.max(1, keepdims=True)
    tile = getattr(dataset, "slice_size", None)
    shapes = img_size * dataset.shapes / (np.minimum(long_side, tile) if tile else long_side)
    if scale is not None:
        shapes = shapes * scale
    parts = [lb[:, 3:5] * s for s, lb in zip(shapes, dataset.labels) if len(lb)]
    return np.concatenate(parts) if parts else np.zeros((0, 2))


def check_anchor_order(m: nn.Module) -> None:
    """Anchors must grow with stride (P3 smallest); reverse them if a config lists them the other way.

    m: a Detect layer (its anchors and stride)."""
    a = m.anchors.prod(-1).mean(-1).view(-1)
    da = a[-1] - a[0]
    ds = m.stride[-1] - m.stride[0]
    if da and (da.sign() != ds.sign()):
        LOGGER.info(f"{PREFIX}reversing anchor order")
        m.anchors[:] = m.anchors.flip(0)


def check_anchors(dataset: Any, model: nn.Module, thr: float = 4.0, imgsz: int = 640, seed: int | None = 0) -> None:
    """Report anchors/target and Best Possible Recall; evolve new anchors when BPR <= 0.98.

    New anchors replace the model's only when their BPR is higher; the Detect layer keeps
    anchors in grid units, so they are divided by the strides again after the swap.
    `seed` fixes the scale jitter and the evolution; None uses the global numpy/random state.
    """
    m = de_parallel(model).model[-1]  # Detect
    # random 0.9-1.1 rescale mimics the scale jitter training sees
    npr = np.random if seed is None else np.random.RandomState(seed)
    scale = npr.uniform(0.9, 1.1, size=(dataset.shapes.shape[0], 1))
    wh = torch.tensor(_label_wh(dataset, imgsz, scale)).float()
    if len(wh) == 0:
        LOGGER.info(f"{PREFIX}no labels in the dataset, anchors left unchanged")
        return

    def metric(k: torch.Tensor) -> tuple[float, float]:
        x, best = _ratio_metric(k, wh)
        aat = (x > 1 / thr).float().sum(1).mean()  # anchors above threshold, per label
        bpr = (best > 1 / thr).float().mean()  # labels some anchor can learn
        return float(bpr), float(aat)

    stride = m.stride.to(m.anchors.device).view(-1, 1, 1)
    anchors = m.anchors.clone() * stride  # grid units -> pixels
    bpr, aat = metric(anchors.cpu().view(-1, 2))
    s = f"\n{PREFIX}{aat:.2f} anchors/target, {bpr:.3f} Best Possible Recall (BPR). "
    if bpr > 0.98:
        LOGGER.info(f"{s}The current anchors fit this dataset ✅")
        return

    LOGGER.info(f"{s}The anchors fit this dataset poorly ⚠️, evolving new ones...")
    na = m.anchors.numel() // 2
    new = kmean_anchors(dataset, n=na, img_size=imgsz, thr=thr, gen=1000, verbose=False, seed=seed)
    new_bpr = metric(torch.tensor(new))[0]
    if new_bpr > bpr:
        new_t = torch.tensor(new, device=m.anchors.device).type_as(m.anchors)
        m.anchors[:] = new_t.clone().view_as(m.anchors)
        check_anchor_order(m)  # on pixel anchors, where area order must follow stride order
        m.anchors /= stride
        LOGGER.info(f"{PREFIX}Done ✅ new anchors in use (copy them into the model yaml to reuse them)")
    else:
        LOGGER.info(f"{PREFIX}Done ⚠️ the evolved anchors were no better, keeping the original ones")


def _load_dataset(data: str | Path) -> Any:
    """The training split of a dataset yaml (only its label sizes and image shapes are read)."""
    from utils.data_config import check_dataset
    from utils.dataset import LoadImagesAndLabels

    d = check_dataset(data)
    # augmentation changes nothing AutoAnchor reads, and would need a hyp dict
    return LoadImagesAndLabels(d["train"], augment=False, rect=True, nc=len(d["names"]), prefix=PREFIX)


def kmean_anchors(
    dataset: Any = "./data/coco128.yaml",
    n: int = 9,
    img_size: int = 640,
    thr: float = 4.0,
    gen: int = 1000,
    verbose: bool = True,
    seed: int | None = 0,
) -> np.ndarray:
    """Evolve n anchors (pixels, (n, 2), sorted by area) for a dataset or dataset yaml.

    k-means on whitened label sizes gives a start; a genetic search then mutates the anchors
    (each value with probability 0.9, sigma 0.1) and keeps a mutation when the fitness, the mean
    best-ratio of labels above 1/thr, rises. `seed` makes the result reproducible; None uses the
    global numpy/random state (as YOLOv5 does).
    """
    from scipy.cluster.vq import kmeans

    if seed is None:
        npr, rand = np.random, random.random
    else:
        npr = np.random.RandomState(seed)
        rand = npr.random_sample
    thr = 1 / thr

    def anchor_fitness(k: np.ndarray) -> float:
        _, best = _ratio_metric(torch.tensor(k, dtype=torch.float32), wh)
        return float((best * (best > thr).float()).mean())

    def print_results(k: np.ndarray, verbose: bool = True) -> np.ndarray:
        k = k[np.argsort(k.prod(1))]  # small to large
        x, best = _ratio_metric(torch.tensor(k, dtype=torch.float32), wh0)
        bpr, aat = (best > thr).float().mean(), (x > thr).float().mean() * n
        past = x[x > thr]
        s = (
            f"{PREFIX}thr={thr:.2f}: {bpr:.4f} best possible recall, {aat:.2f} anchors past thr\n"
            f"{PREFIX}n={n}, img_size={img_size}, fit all={x.mean():.3f} best={best.mean():.3f}, "
            f"fit past thr={past.mean() if len(past) else 0.0:.3f}, anchors: "
        )
        s += ", ".join(f"{round(float(a[0]))},{round(float(a[1]))}" for a in k)
        if verbose:
            LOGGER.info(s)
        return k

    if isinstance(dataset, (str, Path)):
        dataset = _load_dataset(dataset)

    wh0 = _label_wh(dataset, img_size)
    if len(wh0) == 0:
        raise ValueError(f"{PREFIX}the dataset has no labels to fit anchors to")
    i = (wh0 < 3.0).any(1).sum()
    if i:
        LOGGER.warning(f"{PREFIX}{i} of {len(wh0)} labels are under 3 pixels on a side at img_size={img_size}")
    wh = wh0[(wh0 >= 2.0).any(1)].astype(np.float32)  # boxes under 2 px on both sides carry no shape

    try:
        LOGGER.info(f"{PREFIX}k-means for {n} anchors on {len(wh)} label sizes...")
        if n > len(wh):
            raise ValueError("fewer labels than anchors")
        s = wh.std(0)  # whiten so width and height weigh equally, then undo
        k = kmeans(wh / s, n, iter=30, seed=npr if seed is not None else None)[0] * s
        if len(k) != n:  # kmeans drops empty clusters
            raise ValueError("kmeans returned fewer clusters than requested")
    except Exception:
        LOGGER.warning(f"{PREFIX}kmeans failed, starting the evolution from random anchors")
        k = np.sort(npr.rand(n * 2)).reshape(n, 2) * img_size
    wh, wh0 = (torch.tensor(x, dtype=torch.float32) for x in (wh, wh0))
    k = print_results(k, verbose=False)

    f, sh, mp, s = anchor_fitness(k), k.shape, 0.9, 0.1  # fitness, shape, mutation prob, sigma
    pbar = tqdm(range(gen), bar_format=BAR_FORMAT, disable=gen == 0)
    for _ in pbar:
        v = np.ones(sh)
        while (v == 1).all():  # a mutation must change something
            v = ((npr.random_sample(sh) < mp) * rand() * npr.randn(*sh) * s + 1).clip(0.3, 3.0)
        kg = (k.copy() * v).clip(min=2.0)
        fg = anchor_fitness(kg)
        if fg > f:
            f, k = fg, kg.copy()
            pbar.desc = f"{PREFIX}evolving anchors, fitness {f:.4f}"
            if verbose:
                print_results(k, verbose)
    return print_results(k).astype(np.float32)
