"""Class-frequency weights for the loss prior and for --image-weights sampling."""
from __future__ import annotations

import numpy as np
import torch


def labels_to_class_weights(labels: list[np.ndarray], nc: int = 80) -> torch.Tensor:
    """Inverse class frequency, normalised to sum 1 (classes with no labels count as one)."""
    if not len(labels) or all(len(x) == 0 for x in labels):
        return torch.ones(nc) / nc
    classes = np.concatenate([x[:, 0] for x in labels if len(x)]).astype(int)
    counts = np.bincount(classes, minlength=nc).astype(float)
    counts[counts == 0] = 1
    w = 1 / counts
    return torch.from_numpy(w / w.sum()).float()


def labels_to_image_weights(labels: list[np.ndarray], nc: int, class_weights: np.ndarray) -> np.ndarray:
    """An image's weight is the sum of its labels' class weights: images of rare/poorly-learned classes come more often."""
    counts = np.array([np.bincount(x[:, 0].astype(int), minlength=nc) for x in labels]) if labels else np.zeros((0, nc))
    return (np.asarray(class_weights).reshape(1, nc) * counts).sum(1)
