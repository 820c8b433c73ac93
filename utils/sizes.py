"""Object-size bins for evaluation: `--sizes coco|aitod|EDGES`, per-bin AP/AR, their table, csv columns and plots.

A bin is a range of object side, side = sqrt(box area) in original-image pixels, i.e. COCOeval's area range
[lo**2, hi**2]. The numbers come from COCOeval (utils.coco.COCOStyleEvaluator); this module only names the
bins, formats and plots them.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.errors import UserError

BIG = 1e5  # COCO's "no upper limit": areaRng [96**2, 1e5**2] for large

# (edges in side pixels, bin names). AI-TOD's bins as its official evaluator (cocoapi-aitod) scores them:
# very tiny 0-8, tiny 8-16, small 16-32, medium 32+ (its paper names the ranges 2-8 ... 32-64, but the
# evaluation counts everything under 8 px as very tiny and everything from 32 px up as medium).
PRESETS: dict[str, tuple[tuple[float, ...], tuple[str, ...]]] = {
    "coco": ((0, 32, 96, BIG), ("small", "medium", "large")),
    "aitod": ((0, 8, 16, 32, BIG), ("very tiny", "tiny", "small", "medium")),
}
SIZES_HELP = "coco, aitod or increasing side edges in pixels such as 0 8 16 32 64 1e5"


def _edge(x: float) -> str:
    return f"{x:g}"


def _range_labels(edges: Sequence[float]) -> list[str]:
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi >= BIG:
            out.append(f"{_edge(lo)}+")
        elif lo == 0:
            out.append(f"<{_edge(hi)}")
        else:
            out.append(f"{_edge(lo)}-{_edge(hi)}")
    return out


@dataclass(frozen=True)
class SizeBins:
    """Named side ranges [edges[i], edges[i+1]] in original pixels."""

    preset: str  # coco, aitod or custom
    edges: tuple[float, ...]
    names: tuple[str, ...]  # per bin: the preset's word, else its range

    @property
    def ranges(self) -> list[str]:
        """Each bin's range as text: <8, 8-16, 32+ (open ends shown as < and +)."""
        return _range_labels(self.edges)

    def area_ranges(self) -> dict[str, tuple[float, float]]:
        """COCOeval area ranges {key: (lo**2, hi**2)}, keyed by the bin's csv suffix."""
        return {k: (lo * lo, hi * hi) for k, lo, hi in zip(self.keys, self.edges[:-1], self.edges[1:])}

    @property
    def keys(self) -> list[str]:
        """Column suffixes: COCO's s/m/l; edges for every other set (AI-TOD's 'small' is not COCO's APs)."""
        if self.preset == "coco":
            return ["s", "m", "l"]
        return [f"{_edge(lo)}-{_edge(hi)}" if hi < BIG else f"{_edge(lo)}+" for lo, hi in zip(self.edges[:-1], self.edges[1:])]

    def csv_columns(self) -> list[str]:
        """results.csv columns these bins add; COCO's APs/APm/APl already have columns of their own."""
        ap = [] if self.preset == "coco" else [f"metrics/AP_{k}" for k in self.keys]
        ar = [f"metrics/AR{k}" if self.preset == "coco" else f"metrics/AR_{k}" for k in self.keys]
        return ap + ar


def parse_sizes(value: str | Sequence[str] | Sequence[float] | SizeBins | None) -> SizeBins:
    """SizeBins from `--sizes`: a preset name or edges (strings, numbers, or one string of them). UserError if bad."""
    if isinstance(value, SizeBins):
        return value
    if value is None:
        value = "coco"
    items = [value] if isinstance(value, (str, int, float)) else list(value)
    words = [w for x in items for w in re.split(r"[\s,]+", str(x).strip()) if w]
    if len(words) == 1 and words[0].lower() in PRESETS:
        edges, names = PRESETS[words[0].lower()]
        return SizeBins(words[0].lower(), tuple(float(e) for e in edges), names)
    try:
        edges = [float(w) for w in words]
    except ValueError:
        raise UserError(f"--sizes must be {SIZES_HELP}; got {' '.join(words) or 'nothing'!r}") from None
    if len(edges) < 2:
        raise UserError(f"--sizes needs at least two edges (one bin), e.g. 0 8 16 32 64 1e5; got {' '.join(words)!r}")
    if any(math.isnan(e) or e < 0 for e in edges):
        raise UserError(f"--sizes edges must be numbers >= 0 (object side in pixels); got {' '.join(words)!r}")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise UserError(f"--sizes edges must increase strictly; got {' '.join(words)!r}")
    edges = [min(e, BIG) for e in edges]  # inf and anything larger mean "no upper limit", as in COCO
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise UserError(f"--sizes: only the last edge may be {BIG:g} or more; got {' '.join(words)!r}")
    return SizeBins("custom", tuple(edges), tuple(_range_labels(edges)))


COCO_BINS = parse_sizes("coco")


@dataclass
class SizeMetrics:
    """AP (0.5:0.95) and AR (maxDets 100) per bin from COCOeval, -1 where a bin holds no ground truth."""

    bins: SizeBins
    ap: list[float]
    ar: list[float]
    counts: list[int]  # ground truths per bin, counted as COCOeval does (lo**2 <= area <= hi**2)
    sides: np.ndarray = field(default_factory=lambda: np.zeros(0))  # every ground truth's side, original pixels

    def csv_values(self) -> dict[str, float]:
        """Values of bins.csv_columns(); NaN (written as nan) where a bin has no objects."""
        nan = float("nan")
        ap = [] if self.bins.preset == "coco" else [a if a >= 0 else nan for a in self.ap]
        ar = [a if a >= 0 else nan for a in self.ar]
        return dict(zip(self.bins.csv_columns(), ap + ar))


def count_in_bins(sides: np.ndarray, bins: SizeBins) -> list[int]:
    """Objects per bin with COCOeval's inclusive edges (an object exactly on an edge is in both bins)."""
    area = np.asarray(sides, dtype=np.float64) ** 2
    return [int(((area >= lo) & (area <= hi)).sum()) for lo, hi in bins.area_ranges().values()]


def size_csv_values(bins: SizeBins, metrics: SizeMetrics | None) -> dict[str, float]:
    """The bins' results.csv columns, NaN when this epoch was not validated with these bins."""
    got = metrics.csv_values() if metrics is not None and metrics.bins == bins else {}
    return {c: got.get(c, float("nan")) for c in bins.csv_columns()}


def format_metric(v: float) -> str:
    """Three significant digits, as YOLOv5's table prints them (7.78e-05, not 0.000); n/a where undefined (-1)."""
    return f"{v:.3g}" if v >= 0 else "n/a"


def format_size_table(m: SizeMetrics, max_dets: int = 100) -> str:
    """Rows under YOLOv5's table: bin names, ranges, instances, AP and AR per bin; n/a for empty bins."""
    cols = "%11s" * len(m.counts)
    title = {"coco": "COCO", "aitod": "AI-TOD"}.get(m.bins.preset, "custom")
    rows = []
    if m.bins.preset != "custom":
        rows.append(("%22s" + cols) % (f"{title} size bins", *m.bins.names))
    rows += [
        ("%22s" + cols + "   %s") % ("side px (sqrt area)", *m.bins.ranges, "original-image pixels"),
        ("%22s" + cols) % ("Instances", *m.counts),
        ("%22s" + cols + "   %s") % ("AP", *(format_metric(v) for v in m.ap), f"AP@0.5:0.95, COCOeval, maxDets {max_dets}"),
        ("%22s" + cols) % ("AR", *(format_metric(v) for v in m.ar)),
    ]
    return "\n".join(rows)


def _figure(figsize: tuple[float, float]):
    from utils.plots import _new_figure  # matplotlib only when a plot is asked for

    return _new_figure(figsize, tight_layout=True)


def draw_size_histogram(ax, sides: np.ndarray, bins: SizeBins, label: str = "objects", **kw) -> None:
    """Histogram of object sides on a log axis with the bin edges drawn as dashed lines."""
    sides = np.asarray(sides, dtype=np.float64)
    sides = sides[sides > 0]
    if len(sides):
        lo, hi = max(sides.min(), 0.5), max(sides.max(), 1.0)
        ax.hist(sides, bins=np.geomspace(lo, hi * 1.01, 40), label=label, **kw)
        ax.set_xscale("log")
    for e in bins.edges:
        if 0 < e < BIG:
            ax.axvline(e, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("object side sqrt(w*h), pixels")
    ax.set_ylabel("objects")


def _bar_labels(bins: SizeBins) -> list[str]:
    return [f"{n}\n{r}" if n != r else r for n, r in zip(bins.names, bins.ranges)]


def plot_size_metrics(m: SizeMetrics, save_dir: Path | str) -> Path:
    """sizes.png in save_dir: AP and AR per bin (n/a bins left empty and marked) and the labels' size histogram."""
    fig = _figure((12, 4.5))
    ax = fig.add_subplot(1, 2, 1)
    x = np.arange(len(m.ap))
    for off, vals, name in ((-0.2, m.ap, "AP@0.5:0.95"), (0.2, m.ar, "AR@100")):
        ax.bar(x + off, [v if v >= 0 else 0 for v in vals], width=0.4, label=name)
    for i, (a, n) in enumerate(zip(m.ap, m.counts)):
        ax.text(i, (a if a >= 0 else 0) + 0.02, "n/a" if a < 0 else f"n={n}", ha="center", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(_bar_labels(m.bins), fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("AP and recall by object size (original pixels)")
    ax.legend()
    draw_size_histogram(fig.add_subplot(1, 2, 2), m.sides, m.bins, label="val labels")
    fig.axes[1].set_title("object sizes of the val labels, bins dashed")
    save = Path(save_dir) / "sizes.png"
    save.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(save, dpi=150)
    return save


def plot_size_study(imgsz: Sequence[int], metrics: Sequence[SizeMetrics], save: Path | str) -> Path:
    """--task study: AP and AR of every bin against --img, beside the val labels' size histogram."""
    fig = _figure((15, 4.5))
    bins = metrics[0].bins
    for k, what in enumerate(("ap", "ar")):
        ax = fig.add_subplot(1, 3, k + 1)
        for i, lbl in enumerate(_bar_labels(bins)):
            y = np.array([getattr(m, what)[i] for m in metrics], dtype=float)
            y[y < 0] = np.nan  # an empty bin is not a zero
            ax.plot(imgsz, y, ".-", label=lbl.replace("\n", " "))
        ax.set_xlabel("--img")
        ax.set_ylabel("AP@0.5:0.95" if what == "ap" else "AR@100")
        ax.set_title(f"{'AP' if what == 'ap' else 'recall'} by object size against image size")
        ax.legend(fontsize=8)
    draw_size_histogram(fig.add_subplot(1, 3, 3), metrics[0].sides, bins, label="val labels")
    save = Path(save)
    fig.savefig(save, dpi=150)
    return save
