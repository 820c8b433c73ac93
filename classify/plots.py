"""Classification plots: confusion matrix and per-class accuracy (results.png comes from utils.plots)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # scripts run headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


def plot_confusion(confusion: np.ndarray, names: list[str], save: Path | str) -> Path:
    """Row-normalised [true, predicted] heatmap; class labels and cell values only when they fit."""
    save = Path(save)
    nc = len(names)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = confusion / confusion.sum(1, keepdims=True)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * nc + 3), max(5, 0.4 * nc + 2.5)), tight_layout=True)
    labels = names if nc <= 60 else False
    sns.heatmap(
        norm, ax=ax, cmap="Blues", vmin=0, vmax=1, square=True, annot=nc <= 20, fmt=".2f",
        annot_kws={"size": 7}, xticklabels=labels, yticklabels=labels, cbar_kws={"shrink": 0.8},
    )
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title("Confusion matrix (normalised per true class)")
    fig.savefig(save, dpi=150)
    plt.close(fig)
    return save


def save_per_class(per_class: np.ndarray, support: np.ndarray, names: list[str], save_dir: Path | str) -> Path:
    """per_class.csv (class, images, top1_acc) and a bar chart per_class.png beside it."""
    save_dir = Path(save_dir)
    df = pd.DataFrame({"class": names, "images": support.astype(int), "top1_acc": per_class})
    csv = save_dir / "per_class.csv"
    df.to_csv(csv, index=False)
    nc = len(names)
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * nc + 2), 4), tight_layout=True)
    sns.barplot(data=df, x="class", y="top1_acc", ax=ax, color="tab:blue")
    ax.set_ylim(0, 1)
    ax.set_title("Top-1 accuracy per class")
    if nc > 60:
        ax.set_xticks([])
    else:
        ax.tick_params(axis="x", labelrotation=90)
    fig.savefig(save_dir / "per_class.png", dpi=150)
    plt.close(fig)
    return csv
