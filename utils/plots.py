"""Training/validation plots: PR and metric-confidence curves, confusion matrix, image mosaics, results.csv
curves and label statistics.

Figures are built with matplotlib's object API (Figure + Agg canvas, no pyplot) so plotting never needs a
display and never touches global pyplot state shared with other code.
"""
from __future__ import annotations

import math
import multiprocessing
import signal
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

import cv2
import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from utils.curves import smooth
from utils.errors import UserError
from utils.logging import LOGGER
from utils.names import normalize_names

_PALETTE = colormaps["tab20"]


class BackgroundPlots:
    """Draws plots in forked child processes while the caller goes on, then waits for them in `join()`.

    Drawing is single-threaded Python (text layout, Agg, PNG encoding), so at the end of a val run one core
    drew while the others idled. Where fork is not available (Windows, macOS's default) or in a daemon process
    (which may not have children) the plots are drawn inline. A plot that fails costs a warning, never the run.
    """

    def __init__(self):
        self._children: list[tuple[str, object]] = []
        methods = multiprocessing.get_all_start_methods()
        self._fork = "fork" in methods and sys.platform == "linux" and not multiprocessing.current_process().daemon

    def submit(self, fn: Callable, *args, **kwargs) -> None:
        name = getattr(fn, "__name__", "plot")
        if not self._fork:
            _draw(fn, args, kwargs)
            return
        child = multiprocessing.get_context("fork").Process(target=_draw_in_child, args=(fn, args, kwargs), daemon=True,
                                                            name=name)
        child.start()
        self._children.append((name, child))

    def join(self) -> None:
        for name, child in self._children:
            child.join()
            if child.exitcode != 0:
                LOGGER.warning(f"{name} failed in its plotting process (exit code {child.exitcode}): its figure is missing")
        self._children.clear()


def _draw(fn: Callable, args: tuple, kwargs: dict) -> bool:
    try:
        fn(*args, **kwargs)
        return True
    except Exception as e:  # a figure is never worth the run
        LOGGER.warning(f"{getattr(fn, '__name__', 'plot')} failed: {e}")
        return False


def _draw_in_child(fn: Callable, args: tuple, kwargs: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and then waits for this plot
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's checkpoint-saving handler
    if not _draw(fn, args, kwargs):
        raise SystemExit(1)


def class_color(i: int) -> tuple[int, int, int]:
    """A stable RGB colour (0-255) per class index."""
    r, g, b, _ = _PALETTE(int(i) % _PALETTE.N)
    return int(r * 255), int(g * 255), int(b * 255)


def _target(save: Path | str, default_name: str) -> Path:
    """Accept a file path or a directory (then default_name inside it); create the parent folder."""
    save = Path(save)
    if save.suffix == "" or save.is_dir():
        save = save / default_name
    save.parent.mkdir(parents=True, exist_ok=True)
    return save


def _new_figure(figsize: tuple[float, float], **kw) -> Figure:
    fig = Figure(figsize=figsize, **kw)
    FigureCanvasAgg(fig)  # attach a raster canvas so savefig works without pyplot
    return fig


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


def plot_pr_curve(
    px: np.ndarray,
    py: Sequence[np.ndarray] | np.ndarray,
    ap: np.ndarray,
    save_dir: Path | str = Path("PR_curve.png"),
    names: Mapping[int, str] | Sequence[str] | None = None,
) -> Path:
    """Precision-recall curve per class (legend for < 21 classes) and their mean; ap is (nc, T) with AP@0.5 in
    column 0. save_dir is the png path (or a folder, then PR_curve.png inside). Returns the saved path."""
    names = normalize_names(names)
    save = _target(save_dir, "PR_curve.png")
    fig = _new_figure((9, 6), tight_layout=True)
    ax = fig.add_subplot(1, 1, 1)
    py = np.stack(py, axis=1) if len(py) else np.zeros((len(px), 0))
    ap = np.asarray(ap).reshape(len(ap), -1) if len(ap) else np.zeros((0, 1))
    if 0 < len(names) < 21:  # a per-class legend is readable only for few classes
        for i, y in enumerate(py.T):
            ax.plot(px, y, linewidth=1, label=f"{names.get(i, i)} {ap[i, 0]:.3f}")
    elif py.shape[1]:
        ax.plot(px, py, linewidth=1, color="grey")
    if py.shape[1]:
        ax.plot(px, py.mean(1), linewidth=3, color="blue", label=f"all classes {ap[:, 0].mean():.3f} mAP@0.5")
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    ax.set_title("Precision-Recall Curve")
    fig.savefig(save, dpi=250)
    return save


def plot_mc_curve(
    px: np.ndarray,
    py: np.ndarray,
    save_dir: Path | str = Path("mc_curve.png"),
    names: Mapping[int, str] | Sequence[str] | None = None,
    xlabel: str = "Confidence",
    ylabel: str = "Metric",
) -> Path:
    """Metric-vs-confidence curve per class (py: (nc, len(px))) plus the smoothed mean, annotated with its
    maximum. save_dir is the png path (or a folder). Returns the saved path."""
    names = normalize_names(names)
    save = _target(save_dir, f"{ylabel}_curve.png")
    fig = _new_figure((9, 6), tight_layout=True)
    ax = fig.add_subplot(1, 1, 1)
    py = np.asarray(py).reshape(-1, len(px))
    if 0 < len(names) < 21:
        for i, y in enumerate(py):
            ax.plot(px, y, linewidth=1, label=f"{names.get(i, i)}")
    elif len(py):
        ax.plot(px, py.T, linewidth=1, color="grey")
    if len(py):
        y = smooth(py.mean(0), 0.05)
        ax.plot(px, y, linewidth=3, color="blue", label=f"all classes {y.max():.2f} at {px[y.argmax()]:.3f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    ax.set_title(f"{ylabel}-{xlabel} Curve")
    fig.savefig(save, dpi=250)
    return save


def plot_confusion_matrix(
    matrix: np.ndarray,
    save_dir: Path | str = Path("."),
    names: Mapping[int, str] | Sequence[str] | None = None,
    normalize: bool = True,
) -> Path:
    """Heatmap of a (nc+1, nc+1) [predicted, true] matrix with background last -> confusion_matrix.png."""
    names = normalize_names(names)
    save = _target(save_dir, "confusion_matrix.png")
    nc = matrix.shape[0] - 1
    array = matrix / (matrix.sum(0).reshape(1, -1) + 1e-9) if normalize else matrix.astype(float)
    array = np.where(array < 0.005, np.nan, array)  # blank near-zero cells so the structure stands out
    fig = _new_figure((12, 9), tight_layout=True)
    ax = fig.add_subplot(1, 1, 1)
    # one image rather than a patch per cell (a seaborn heatmap): an 81x81 COCO matrix draws several times faster
    top = np.nanmax(array, initial=1e-9)
    im = ax.imshow(array, cmap=colormaps["Blues"].with_extremes(bad="white"), vmin=0.0, vmax=top,
                   interpolation="nearest", aspect="equal")
    fig.colorbar(im, ax=ax)
    if nc < 30:
        for (i, j), v in np.ndenumerate(array):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v > top / 2 else "black")
    if 0 < len(names) < 99 and len(names) == nc:
        ticks = [names[i] for i in sorted(names)] + ["background"]
        size = min(10.0, 480 / (nc + 1))  # one row of text per cell: 81 COCO rows fit at about 6 pt
        ax.set_xticks(range(nc + 1), ticks, rotation=90, fontsize=size)
        ax.set_yticks(range(nc + 1), ticks, fontsize=size)
    ax.set_xlabel("True")
    ax.set_ylabel("Predicted")
    ax.set_title("Confusion Matrix" + (" (normalised per true class)" if normalize else ""))
    fig.savefig(save, dpi=250)
    return save


def plot_images(
    images,
    targets,
    paths: Sequence[str | Path] | None = None,
    fname: Path | str = "images.jpg",
    names: Mapping[int, str] | Sequence[str] | None = None,
    max_size: int = 1920,
    max_subplots: int = 16,
) -> Path:
    """Save a mosaic of a batch with its boxes, like YOLOv5's train_batch*.jpg / val_batch*_{labels,pred}.jpg.

    images: (B, C, H, W) uint8 or float (0-1 or 0-255), RGB. targets: rows [img_idx, cls, x, y, w, h(, conf)]
    with xywh box centres either normalised (all <= 1) or in pixels of the batch images. With a conf column
    (predictions) only boxes above 0.25 are drawn and labels show the confidence.
    """
    names = normalize_names(names)
    images = _to_numpy(images).astype(np.float32)
    if images.ndim == 3:
        images = images[None]
    if images.size and images.max() <= 1.0:
        images = images * 255  # normalised input
    targets = _to_numpy(targets).astype(np.float64)
    targets = targets.reshape(-1, targets.shape[-1] if targets.size else 6)
    b, c, h, w = images.shape
    bs = min(b, max_subplots)
    ns = math.ceil(bs**0.5)  # tiles per side
    mosaic = np.full((ns * h, ns * w, 3), 255, dtype=np.uint8)
    for i in range(bs):
        im = images[i].transpose(1, 2, 0).clip(0, 255).astype(np.uint8)
        if c == 1:
            im = np.repeat(im, 3, axis=2)
        x0, y0 = w * (i % ns), h * (i // ns)
        mosaic[y0 : y0 + h, x0 : x0 + w] = im[..., :3]

    scale = max_size / ns / max(h, w)
    if scale < 1:  # cap the mosaic size; boxes are rescaled below
        h, w = math.ceil(scale * h), math.ceil(scale * w)
        mosaic = cv2.resize(mosaic, (w * ns, h * ns), interpolation=cv2.INTER_AREA)
    lw = max(1, round(min(h, w) / 200))
    fs = max(0.3, min(h, w) / 900)  # cv2 font scale
    for i in range(bs):
        x0, y0 = w * (i % ns), h * (i // ns)
        cv2.rectangle(mosaic, (x0, y0), (x0 + w - 1, y0 + h - 1), (255, 255, 255), 2)
        if paths is not None and i < len(paths):
            cv2.putText(mosaic, Path(paths[i]).name[:40], (x0 + 5, y0 + int(20 * fs) + 5),
                        cv2.FONT_HERSHEY_SIMPLEX, fs, (220, 220, 220), max(1, lw // 2), cv2.LINE_AA)
        ti = targets[targets[:, 0] == i] if len(targets) else targets
        if not len(ti):
            continue
        has_conf = ti.shape[1] == 7
        xywh = ti[:, 2:6].astype(np.float64).copy()
        if xywh.max() <= 1.01:  # normalised coordinates
            xywh *= [w, h, w, h]
        elif scale < 1:
            xywh *= scale
        xyxy = np.stack((xywh[:, 0] - xywh[:, 2] / 2, xywh[:, 1] - xywh[:, 3] / 2,
                         xywh[:, 0] + xywh[:, 2] / 2, xywh[:, 1] + xywh[:, 3] / 2), 1)
        xyxy += [x0, y0, x0, y0]
        for j, box in enumerate(xyxy):
            conf = float(ti[j, 6]) if has_conf else None
            if conf is not None and conf <= 0.25:
                continue
            cls = int(ti[j, 1])
            color = class_color(cls)
            p1, p2 = (int(box[0]), int(box[1])), (int(box[2]), int(box[3]))
            cv2.rectangle(mosaic, p1, p2, color, lw, cv2.LINE_AA)
            label = str(names.get(cls, cls)) + (f" {conf:.1f}" if conf is not None else "")
            (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, fs, 1)
            top = p1[1] - th - 3 if p1[1] - th - 3 >= y0 else p1[1] + th + 3  # keep the label inside the tile
            cv2.rectangle(mosaic, (p1[0], top), (p1[0] + tw, top + th + 3), color, -1)
            cv2.putText(mosaic, label, (p1[0], top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, fs,
                        (255, 255, 255), 1, cv2.LINE_AA)
    fname = Path(fname)
    fname.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(fname), cv2.cvtColor(mosaic, cv2.COLOR_RGB2BGR)):
        raise UserError(f"could not write image mosaic to {fname}")
    return fname


# results.csv columns in YOLOv5's panel order; anything else numeric (except lr and epoch) follows.
RESULT_COLUMNS = (
    "train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision", "metrics/recall",
    "val/box_loss", "val/obj_loss", "val/cls_loss", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
    "metrics/APs", "metrics/APm", "metrics/APl",
)


def plot_results(csv_path: Path | str = "results.csv") -> Path:
    """Plot every metric/loss column of a training results.csv against epoch -> results.png beside it."""
    import pandas as pd  # pandas and scipy load here, not in every val.py run
    from scipy.ndimage import gaussian_filter1d

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"results file not found: {csv_path}")
    try:
        df = pd.read_csv(csv_path, skipinitialspace=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {csv_path} as csv: {e}") from e
    df.columns = [str(col).strip() for col in df.columns]
    x = df["epoch"].to_numpy() if "epoch" in df.columns else np.arange(len(df))
    numeric = [col for col in df.columns if pd.api.types.is_numeric_dtype(df[col])]
    extra = [col for col in numeric if col not in RESULT_COLUMNS and col != "epoch" and not col.startswith("x/")]
    cols = [col for col in RESULT_COLUMNS if col in numeric] + extra
    if not cols or not len(df):
        raise UserError(f"{csv_path} has no numeric result columns to plot")
    ncols = 5
    nrows = math.ceil(len(cols) / ncols)
    fig = _new_figure((12, 3 * nrows), tight_layout=True)
    for k, col in enumerate(cols):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        y = df[col].to_numpy(dtype=float)
        ax.plot(x, y, marker=".", label="results", linewidth=2, markersize=8)
        finite = np.isfinite(y)
        if finite.sum() > 2:  # smoothed trend helps read noisy losses
            ax.plot(x[finite], gaussian_filter1d(y[finite], sigma=3), ":", label="smooth", linewidth=2)
        ax.set_title(col, fontsize=12)
    fig.axes[0].legend()
    save = csv_path.with_name("results.png")
    fig.savefig(save, dpi=200)
    return save


def plot_labels(
    labels,
    names: Mapping[int, str] | Sequence[str] | None = None,
    save_dir: Path | str = Path("."),
) -> Path:
    """Dataset label statistics -> labels.jpg: class histogram, box outlines, centre (x, y) and size (w, h)
    densities. labels: (n, 5) rows cls, x, y, w, h normalised."""
    names = normalize_names(names)
    save = _target(save_dir, "labels.jpg")
    labels = _to_numpy(labels).reshape(-1, 5).astype(np.float64)
    fig = _new_figure((8, 8), tight_layout=True)
    axes = [fig.add_subplot(2, 2, k + 1) for k in range(4)]
    if not len(labels):
        for ax in axes:
            ax.text(0.5, 0.5, "no labels", ha="center", va="center")
            ax.axis("off")
        fig.savefig(save, dpi=200)
        return save

    cls = labels[:, 0].astype(int)
    nc = max(int(cls.max()) + 1, len(names))
    counts = np.bincount(cls, minlength=nc)
    axes[0].bar(range(nc), counts, color=[np.array(class_color(i)) / 255 for i in range(nc)])
    axes[0].set_ylabel("instances")
    if 0 < len(names) < 30:
        axes[0].set_xticks(range(nc))
        axes[0].set_xticklabels([str(names.get(i, i)) for i in range(nc)], rotation=90, fontsize=8)
    else:
        axes[0].set_xlabel("classes")

    # up to 1000 boxes drawn centred on one canvas to show the shape distribution
    canvas = np.full((1000, 1000, 3), 255, dtype=np.uint8)
    for c, _, _, bw, bh in labels[:1000]:
        x1, y1 = int((0.5 - bw / 2) * 1000), int((0.5 - bh / 2) * 1000)
        x2, y2 = int((0.5 + bw / 2) * 1000), int((0.5 + bh / 2) * 1000)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), class_color(int(c)), 1)
    axes[1].imshow(canvas)
    axes[1].axis("off")

    import pandas as pd  # here only, like seaborn: val.py never needs them
    import seaborn as sns

    df = pd.DataFrame(labels[:, 1:], columns=["x", "y", "width", "height"])
    sns.histplot(df, x="x", y="y", ax=axes[2], bins=50, pmax=0.9)
    sns.histplot(df, x="width", y="height", ax=axes[3], bins=50, pmax=0.9)
    for ax in axes[2:]:
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    fig.savefig(save, dpi=200)
    return save
