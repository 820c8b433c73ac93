"""Dataset report for small-object work: object sizes, what a letterbox to --img does to them, anchor fit per
detection level, label problems, and a recommended set-up (image size, slicing, P2 head, SPD).

    python -m utils.analyze --data ../shared/data/deeppcb/deeppcb.yaml --img 256 [--cfg yolov5n.yaml]

Prints the report and saves it as a picture (runs/analyze/exp*/report.png). Every split of the yaml is read
with the training loader's own checks (utils.labels.load_labels), each image once.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch
import yaml

from utils.autoanchor import _label_wh, _ratio_metric
from utils.data_config import check_dataset
from utils.errors import UserError, report_user_errors
from utils.files import increment_path
from utils.labels import load_labels
from utils.logging import LOGGER

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "models"
TINY = 8.0  # px: AI-TOD's "very tiny", and one cell of the stride-8 P3 level
SMALL = 32.0  # px: COCO's small
MAX_LOST = 0.02  # share of objects a set-up may shrink below TINY px before the report calls for a change
P2_SHARE = 0.05  # share of objects inside one stride-8 cell from which a stride-4 level is worth trying
SPD_SHARE = 0.25  # share of objects under SMALL px from which SPD's lossless downsampling is worth trying
ANCHOR_T = 4.0  # hyp anchor_t: the loss's (and AutoAnchor's) largest label/anchor side ratio

# How a layer changes the stride, for the stride walk over a model yaml (utils must not import models; the
# walk is checked against the built models of every shipped config in tests/test_analyze.py).
_STRIDE_ARG2 = {"Conv", "DWConv", "GhostConv", "CrossConv"}  # args: [c2, k, s, ...]
_HALVING = {"Focus", "SPDConv", "space_to_depth"}  # space-to-depth: resolution / 2 (Focus times its own s)


@dataclass
class Level:
    stride: float
    anchors: np.ndarray | None  # (na, 2) pixels; None when the yaml gives only a count


@dataclass
class Objects:
    """Every labelled object of the dataset (each image once), in original pixels."""

    cls: np.ndarray
    w: np.ndarray
    h: np.ndarray
    long_side: np.ndarray  # of the object's image
    shapes: np.ndarray  # (n_images, 2) w, h
    labels: list[np.ndarray]  # per image, normalised cls cx cy w h (what AutoAnchor reads)

    @property
    def side(self) -> np.ndarray:
        return np.sqrt(self.w * self.h)


@dataclass
class Advice:
    topic: str
    advice: str
    reason: str


@dataclass
class Report:
    data: str
    img: int
    cfg: str
    names: dict[int, str]
    images: dict[str, int]  # per split, and 'unique'
    objects: Objects
    problems: dict[str, int]
    numbers: dict[str, float]
    levels: list[tuple[float, float]]  # (stride, BPR of that level alone)
    bpr: float  # any level: AutoAnchor's best possible recall
    advice: list[Advice] = field(default_factory=list)


def model_levels(cfg: str | Path | dict) -> list[Level]:
    """Detection levels (stride, anchors in pixels) of a model yaml, by walking its layers' strides."""
    if not isinstance(cfg, dict):
        p = Path(cfg)
        cands = [p, MODELS_DIR / p.name, MODELS_DIR / f"{p.name}.yaml"]
        path = next((c for c in cands if c.is_file()), None)
        if path is None:
            raise UserError(f"model config '{cfg}' not found (known: {', '.join(sorted(f.name for f in MODELS_DIR.glob('*.yaml')))})")
        try:
            cfg = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise UserError(f"model config {path} is not valid YAML: {e}") from None
    try:
        rows = list(cfg["backbone"]) + list(cfg["head"])
    except (KeyError, TypeError):
        raise UserError("model config needs 'backbone' and 'head' layer lists") from None
    strides: list[float] = []
    for i, (f, _n, m, args) in enumerate(rows):
        ins = [strides[j] if j >= 0 else (strides[i + j] if i + j >= 0 else 1.0) for j in (f if isinstance(f, list) else [f])]
        s, args = ins[0], list(args or [])
        if m == "Detect":
            anchors = cfg.get("anchors")
            arr = [np.array(a, dtype=np.float64).reshape(-1, 2) for a in anchors] if isinstance(anchors, list) else None
            return [Level(st, arr[k] if arr else None) for k, st in enumerate(ins)]
        if m in _STRIDE_ARG2:
            s *= args[2] if len(args) > 2 else 1
        elif m in _HALVING:
            s *= 2 * (args[2] if m == "Focus" and len(args) > 2 else 1)
        elif m == "nn.Upsample":
            s /= args[1] if len(args) > 1 and args[1] else 2
        elif m == "nn.MaxPool2d":
            s *= args[1] if len(args) > 1 else args[0]
        strides.append(float(s))
    raise UserError("model config has no Detect layer")


_DUP = re.compile(r"(\d+) duplicate label row")
_CLS = re.compile(r"(\d+) label row\(s\) with class id")


def gather(data: dict, prefix: str = "") -> tuple[dict[str, int], Objects, dict[str, int]]:
    """Images per split, every object once, and label problems as the loader reports them."""
    nc = len(data["names"])
    images, seen, problems = {}, {}, dict(corrupt=0, bad_coordinates=0, duplicates=0, bad_class=0)
    for split in ("train", "val", "test"):
        if not data.get(split):
            continue
        cache, _ = load_labels(data[split], nc=nc, prefix=f"{prefix}{split}: ")
        images[split] = len(cache["im_files"])
        for f, lb, shape in zip(cache["im_files"], cache["labels"], cache["shapes"]):
            seen.setdefault(f, (np.asarray(lb, dtype=np.float64).reshape(-1, 5), shape))
        if any(data.get(s) == data[split] for s in ("train", "val") if s in images and s != split):
            continue  # the same files as an earlier split: their problems are counted once
        problems["corrupt"] += cache["stats"]["nc"]
        for m in cache["msgs"]:
            problems["bad_coordinates"] += "label coordinates" in m and "corrupt" in m
            problems["duplicates"] += sum(int(x) for x in _DUP.findall(m))
            problems["bad_class"] += sum(int(x) for x in _CLS.findall(m))
    images["unique"] = len(seen)
    labels = [lb for lb, _ in seen.values()]
    shapes = np.array([s for _, s in seen.values()], dtype=np.float64).reshape(-1, 2)
    per = [(lb, np.repeat(s[None], len(lb), 0)) for lb, s in zip(labels, shapes)]
    lb = np.concatenate([p[0] for p in per]) if per else np.zeros((0, 5))
    wh = np.concatenate([p[1] for p in per]) if per else np.zeros((0, 2))
    objs = Objects(lb[:, 0].astype(int), lb[:, 3] * wh[:, 0], lb[:, 4] * wh[:, 1], wh.max(1) if len(wh) else np.zeros(0),
                   shapes, labels)
    x1, x2 = (lb[:, 1] - lb[:, 3] / 2) * wh[:, 0], (lb[:, 1] + lb[:, 3] / 2) * wh[:, 0]
    y1, y2 = (lb[:, 2] - lb[:, 4] / 2) * wh[:, 1], (lb[:, 2] + lb[:, 4] / 2) * wh[:, 1]
    # kept by the loader (centre and size are in 0-1) but reaching past the image by more than half a pixel
    problems["outside_image"] = int(((x1 < -0.5) | (y1 < -0.5) | (x2 > wh[:, 0] + 0.5) | (y2 > wh[:, 1] + 0.5)).sum())
    problems["degenerate_under_2px"] = int(((objs.w < 2) | (objs.h < 2)).sum())
    return images, objs, problems


def shares_at(objs: Objects, scale: np.ndarray) -> dict[str, float]:
    """Shares of objects at a per-object scale: inside one stride-8 cell (both sides < 8 px), side under 8 px,
    side under 32 px, and shrunk below 8 px by the scaling (8 px or more natively)."""
    n = max(len(objs.w), 1)
    side = objs.side
    return {
        "below_cell": float((np.maximum(objs.w, objs.h) * scale < TINY).sum() / n),
        "below_8": float((side * scale < TINY).sum() / n),
        "below_32": float((side * scale < SMALL).sum() / n),
        "shrunk_below_8": float(((side >= TINY) & (side * scale < TINY)).sum() / n),
    }


def tile_scale(objs: Objects, img: int, tile: float | None) -> np.ndarray:
    """Each object's scale when its image (or its tile of `tile` px, for images larger than that) is
    letterboxed to img, as val and sliced inference resize: long side to img."""
    long = objs.long_side if tile is None else np.minimum(objs.long_side, tile)
    return img / np.maximum(long, 1)


def level_bpr(objs: Objects, img: int, levels: Sequence[Level], thr: float = ANCHOR_T) -> tuple[list[tuple[float, float]], float]:
    """AutoAnchor's best possible recall at img (long side resized to img, no jitter), per level and overall."""
    wh = torch.tensor(_label_wh(SimpleNamespace(shapes=objs.shapes, labels=objs.labels), img), dtype=torch.float32)
    if not len(wh) or any(lv.anchors is None for lv in levels):
        return [(lv.stride, float("nan")) for lv in levels], float("nan")
    per = [(lv.stride, float((_ratio_metric(torch.tensor(lv.anchors, dtype=torch.float32), wh)[1] > 1 / thr).float().mean()))
           for lv in levels]
    allk = torch.tensor(np.concatenate([lv.anchors for lv in levels]), dtype=torch.float32)
    return per, float((_ratio_metric(allk, wh)[1] > 1 / thr).float().mean())


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _round32(x: float) -> int:
    return int(np.ceil(x / 32) * 32)


def recommend_size_and_slicing(objs: Objects, img: int) -> tuple[list[Advice], np.ndarray]:
    """Image size and slicing advice, and every object's scale under the advised set-up."""

    def shrunk(size: int, tile: float | None = None) -> float:  # share shrunk below TINY px at that set-up
        return shares_at(objs, tile_scale(objs, size, tile))["shrunk_below_8"]

    lost = shrunk(img)
    largest = _round32(objs.long_side.max()) if len(objs.long_side) else img
    sizes = list(range(64, max(largest, img) + 32, 32))
    need = next((s for s in sizes if shrunk(s) <= MAX_LOST), sizes[-1])
    if lost <= MAX_LOST:
        smaller = f"; --img {need} would still keep them (faster)" if need <= 0.75 * img else ""
        return [Advice("image size", f"--img {img} is fine",
                       f"letterboxing to {img} shrinks {_pct(lost)} of the objects below {TINY:g} px{smaller}"),
                Advice("slicing", "no",
                       f"the whole image at --img {img} keeps the objects (only {_pct(lost)} shrink below {TINY:g} px)")], \
            tile_scale(objs, img, None)
    if need <= 1.5 * img:  # a moderately larger input is simpler than tiles
        return [Advice("image size", f"--img {need}",
                       f"at {img}, letterboxing shrinks {_pct(lost)} of the objects below {TINY:g} px; at {need} "
                       f"{_pct(shrunk(need))}"),
                Advice("slicing", "no", f"--img {need} is enough to keep the objects")], tile_scale(objs, need, None)
    tiles = [t for t in range(img, largest + 32, 32) if shrunk(img, t) <= MAX_LOST]
    tile = max(tiles) if tiles else img  # tiles of img px are never shrunk
    big = float((objs.long_side > tile).mean()) if len(objs.long_side) else 0.0
    return [Advice("image size", f"keep --img {img}, with slicing",
                   f"a whole image would need --img {need} to keep the objects (images up to {largest} px)"),
            Advice("slicing", f"yes: --slice {tile} (tiles of {tile} px letterboxed to {img})",
                   f"letterboxing whole images to {img} shrinks {_pct(lost)} of the objects below {TINY:g} px; "
                   f"{tile} px tiles shrink {_pct(shrunk(img, tile))} ({_pct(big)} of the objects lie in images "
                   f"larger than a tile)")], \
        tile_scale(objs, img, tile)


def _lever(topic: str, share: float, threshold: float, fact: str, already: str | None, worth: str, why: str,
           no: str) -> Advice:
    """Advice on one model change from the share of objects it serves ('<share> of the objects <fact>')."""
    if already:
        return Advice(topic, already, f"{_pct(share)} of the objects {fact}")
    if share >= threshold:
        return Advice(topic, worth, f"{_pct(share)} of the objects {fact} at the advised set-up{why}")
    return Advice(topic, no, f"only {_pct(share)} of the objects {fact} at the advised set-up (threshold {_pct(threshold)})")


def recommend_model(objs: Objects, scale: np.ndarray, cfg: str, levels: Sequence[Level]) -> list[Advice]:
    # cfg: the config's file name (it decides whether the model already has P2 or SPD)
    """P2 and SPD advice from the object sizes under the advised set-up (scale per object)."""
    s, name = shares_at(objs, scale), Path(cfg).name
    finest = min(lv.stride for lv in levels) if levels else 8
    p2 = _lever("P2 head", s["below_cell"], P2_SHARE, "fit inside one stride-8 cell",
                f"{name} already has a stride-{finest:g} level" if finest <= 4 else None,
                "worth trying (e.g. models/yolov5n-p2.yaml, a stride-4 level)",
                " (both sides < 8 px); a stride-4 level gives them cells of their own", "not needed")
    spd = _lever("SPD", s["below_32"], SPD_SHARE, f"are under {SMALL:g} px",
                 f"{name} is already an SPD model" if "spd" in name.lower() else None,
                 "worth trying (e.g. models/yolov5n-spd.yaml or -spdlite)",
                 ": strided convolutions drop pixels of these, space-to-depth keeps them", "little to gain")
    return [p2, spd]


def analyze(data: str | Path | dict, img: int = 640, cfg: str | Path | dict = "yolov5n.yaml") -> Report:
    """The full report for a dataset at --img with a model config's detection levels."""
    if img < 32:
        raise UserError(f"--img must be at least 32, got {img}")
    d = check_dataset(data, autodownload=False)
    levels = model_levels(cfg)
    cfg = Path(cfg).name if isinstance(cfg, (str, Path)) else "the given model"
    images, objs, problems = gather(d)
    if not len(objs.w):
        raise UserError(f"{data}: no labelled objects to analyse")
    img_scale = tile_scale(objs, img, None)
    at_img = shares_at(objs, img_scale)
    native = shares_at(objs, np.ones(len(objs.w)))
    numbers = {**{f"{k}_at_img": v for k, v in at_img.items()}, **{f"{k}_native": v for k, v in native.items()},
               "shrunk_below_8_count": float(((objs.side >= TINY) & (objs.side * img_scale < TINY)).sum())}
    per_level, bpr = level_bpr(objs, img, levels)
    size_adv, scale = recommend_size_and_slicing(objs, img)
    advice = size_adv + recommend_model(objs, scale, cfg, levels)
    if bpr == bpr:
        advice.append(Advice("anchors", "fit" if bpr > 0.98 else "re-fit (AutoAnchor does it at train time)",
                             f"best possible recall {bpr:.3f} at --img {img} (AutoAnchor's threshold 0.98)"))
    return Report(str(data), img, cfg, dict(d["names"]), images, objs, problems, numbers, per_level, bpr, advice)


def _quantiles(x: np.ndarray) -> str:
    q = np.percentile(x, [0, 10, 50, 90, 100]) if len(x) else np.zeros(5)
    return "min {:.1f}  p10 {:.1f}  median {:.1f}  p90 {:.1f}  max {:.1f}".format(*q)


def _class_counts(counts: np.ndarray, names: dict[int, str], most: int = 12) -> str:
    order = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i]]
    out = ", ".join(f"{names.get(i, i)} {counts[i]}" for i in order[:most])
    if len(order) > most:
        out += f", ... ({len(order) - most} more classes)"
    none = int((counts == 0).sum())
    return out + (f"; {none} classes without instances" if none else "")


def format_report(r: Report) -> str:
    """The report as terminal text."""
    o, n = r.objects, r.numbers
    at = o.side * tile_scale(o, r.img, None)
    counts = np.bincount(o.cls, minlength=len(r.names))
    long = o.shapes.max(1)
    common = {}
    for w, h in o.shapes.astype(int).tolist():
        common[(w, h)] = common.get((w, h), 0) + 1
    top = ", ".join(f"{w}x{h} ({c})" for (w, h), c in sorted(common.items(), key=lambda x: -x[1])[:3])
    lines = [
        f"Dataset report: {r.data} at --img {r.img}, levels of {Path(r.cfg).name}",
        "images: " + ", ".join(f"{k} {v}" for k, v in r.images.items()) + f"; sizes {top}; long side {_quantiles(long)}",
        f"instances: {len(o.cls)}: " + _class_counts(counts, r.names),
        f"object side sqrt(w*h), original px: {_quantiles(o.side)}",
        f"object side at --img {r.img}:        {_quantiles(at)}",
        f"at --img {r.img}: {_pct(n['below_cell_at_img'])} inside one stride-8 cell (both sides < 8 px), "
        f"{_pct(n['below_8_at_img'])} under 8 px, {_pct(n['below_32_at_img'])} under 32 px "
        f"(original: {_pct(n['below_8_native'])} under 8 px, {_pct(n['below_32_native'])} under 32 px)",
        f"letterbox to {r.img} shrinks {int(n['shrunk_below_8_count'])} objects ({_pct(n['shrunk_below_8_at_img'])}) "
        f"from 8 px or more to under 8 px",
        "anchors, best possible recall (ratio < 4) per level: "
        + ", ".join(f"P{int(np.log2(s))}/{s:g} {b:.3f}" for s, b in r.levels) + f"; any level {r.bpr:.3f}",
        "label problems (as the loader counts them): " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in r.problems.items()),
        "recommendation:",
    ]
    lines += [f"  {a.topic:<11} {a.advice}\n  {'':<11} because {a.reason}" for a in r.advice]
    return "\n".join(lines)


def plot_report(r: Report, save: Path) -> Path:
    """The report as a picture: size histograms with the AI-TOD/COCO edges, classes, image sizes, BPR, advice."""
    from utils.plots import _new_figure
    from utils.sizes import draw_size_histogram, parse_sizes

    fig = _new_figure((16, 10), tight_layout=True)
    o = r.objects
    ax = fig.add_subplot(2, 3, 1)
    bins = parse_sizes("0 8 16 32 96 1e5")
    draw_size_histogram(ax, o.side, bins, label="original pixels", alpha=0.6)
    draw_size_histogram(ax, o.side * tile_scale(o, r.img, None), bins, label=f"at --img {r.img}", alpha=0.6)
    ax.legend()
    ax.set_title("object sizes (edges 8, 16, 32, 96 px dashed)")
    ax = fig.add_subplot(2, 3, 2)
    counts = np.bincount(o.cls, minlength=len(r.names))
    ax.bar(range(len(counts)), counts)
    ax.set_xticks(range(len(counts)))
    ax.set_xticklabels([str(r.names.get(i, i)) for i in range(len(counts))] if len(counts) < 30 else [], rotation=90, fontsize=8)
    ax.set_title(f"instances per class ({len(o.cls)})")
    ax = fig.add_subplot(2, 3, 3)
    ax.scatter(o.shapes[:, 0], o.shapes[:, 1], s=8, alpha=0.5)
    ax.set_xlabel("image width")
    ax.set_ylabel("image height")
    ax.set_title(f"image sizes ({r.images['unique']} images)")
    ax = fig.add_subplot(2, 3, 4)
    ax.bar([f"P{int(np.log2(s))}/{s:g}" for s, _ in r.levels], [b if b == b else 0 for _, b in r.levels])
    ax.axhline(0.98, color="k", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"best possible recall per level, any level {r.bpr:.3f}")
    ax = fig.add_subplot(2, 3, (5, 6))
    ax.axis("off")
    text = format_report(r).split("\n")
    ax.text(0, 1, "\n".join(_wrap(t, 110) for t in text[5:]), va="top", family="monospace", fontsize=8.5)
    fig.suptitle(text[0])
    save.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(save, dpi=110)
    return save


def _wrap(line: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(line, width, subsequent_indent="      ")) or line


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset.yaml path")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="train/val image size (pixels)")
    p.add_argument("--cfg", default="yolov5n.yaml", help="model.yaml whose detection levels and anchors are checked")
    p.add_argument("--project", default=ROOT / "runs/analyze", help="save the picture to project/name")
    p.add_argument("--name", default="exp", help="save the picture to project/name")
    p.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    return p.parse_args(argv)


@report_user_errors
def main(argv: list[str] | None = None) -> Report:
    opt = parse_opt(argv)
    r = analyze(opt.data, opt.imgsz, opt.cfg)
    print(format_report(r))
    save = plot_report(r, increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok) / "report.png")
    LOGGER.info(f"Report picture saved to {save}")
    return r


if __name__ == "__main__":
    main()
