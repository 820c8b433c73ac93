"""Offline generator of a small-object detection dataset (the project's default training data).

Small filled shapes (circle, square, triangle, cross), a few to a few tens of pixels wide, on
cluttered backgrounds (noise, lines, blurred blobs, outline distractors). Fully deterministic for a
given seed, and it needs no network: exactly the regime SPD-Conv targets, in seconds on a CPU.

    python -m utils.smallobjects --root datasets/smallobjects
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("circle", "square", "triangle", "cross")
MIN_SIZE, MAX_SIZE = 4, 40  # object extent in pixels (before the 1-px rasterisation margin)


def _background(rng: np.random.Generator, s: int, clutter: float = 1.0) -> np.ndarray:
    """Textured background with lines, blurred blobs and hollow outlines that are not objects."""
    base = rng.integers(40, 216, size=3)
    im = np.empty((s, s, 3), np.float32)
    im[:] = base
    # a low-frequency gradient so the background is not flat
    gx, gy = np.meshgrid(np.linspace(-1, 1, s), np.linspace(-1, 1, s))
    im += (rng.uniform(-30, 30) * gx + rng.uniform(-30, 30) * gy)[..., None]
    blobs = np.zeros((s, s, 3), np.float32)
    for _ in range(rng.integers(2, 7)):  # big soft blobs, blurred together in one pass
        c = tuple(int(v) for v in rng.integers(0, s, 2))
        axes = tuple(int(v) for v in rng.integers(s // 12, s // 3, 2))
        cv2.ellipse(blobs, c, axes, float(rng.uniform(0, 180)), 0, 360, rng.uniform(-50, 50, 3).tolist(), -1)
    im += cv2.GaussianBlur(blobs, (0, 0), sigmaX=s / 30)
    im = np.clip(im, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(4, 16) * clutter)):  # thin lines crossing the scene
        p1 = tuple(int(v) for v in rng.integers(0, s, 2))
        p2 = tuple(int(v) for v in rng.integers(0, s, 2))
        cv2.line(im, p1, p2, tuple(int(v) for v in rng.integers(0, 256, 3)), int(rng.integers(1, 3)), cv2.LINE_AA)
    for _ in range(int(rng.integers(2, 8) * clutter)):  # hollow outlines: shape-like distractors that are not labelled
        c = tuple(int(v) for v in rng.integers(0, s, 2))
        r = int(rng.integers(5, 30))
        cv2.circle(im, c, r, tuple(int(v) for v in rng.integers(0, 256, 3)), 1, cv2.LINE_AA)
    return im


def _draw_shape(mask: np.ndarray, cls: int, cx: int, cy: int, size: int, rng: np.random.Generator) -> None:
    """Rasterise one shape of class `cls` into `mask` (uint8, 255 where the shape is)."""
    h = size / 2
    if cls == 0:  # circle
        cv2.circle(mask, (cx, cy), max(int(round(h)), 2), 255, -1)
    elif cls == 1:  # square, slightly rotated so edges are not always axis-aligned
        rect = ((float(cx), float(cy)), (float(size), float(size)), float(rng.uniform(0, 30)))
        cv2.fillPoly(mask, [cv2.boxPoints(rect).round().astype(np.int32)], 255)
    elif cls == 2:  # triangle pointing up or down
        sign = 1 if rng.random() < 0.5 else -1
        pts = np.array([[cx, cy - sign * h], [cx - h, cy + sign * h], [cx + h, cy + sign * h]])
        cv2.fillPoly(mask, [pts.round().astype(np.int32)], 255)
    else:  # cross: two bars of about a third of the size
        t = max(int(round(size / 6)), 1)
        x1, x2 = int(round(cx - h)), int(round(cx + h))
        y1, y2 = int(round(cy - h)), int(round(cy + h))
        cv2.rectangle(mask, (x1, cy - t), (x2, cy + t), 255, -1)
        cv2.rectangle(mask, (cx - t, y1), (cx + t, y2), 255, -1)


def make_image(rng: np.random.Generator, img_size: int = 320, sizes: tuple[int, int] = (MIN_SIZE, MAX_SIZE),
               clutter: float = 1.0, one_class: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One image and its labels (n, 5): class, cx, cy, w, h normalised, boxes tight on the pixels.

    `sizes` bounds the object extent in pixels (log-uniform, so most are small); `clutter` scales the
    number of lines and hollow outlines in the background; `one_class` labels every shape class 0 ("shape")."""
    s = img_size
    im = _background(rng, s, clutter)
    boxes: list[tuple[int, int, int, int]] = []
    labels = []
    for _ in range(int(rng.integers(3, 16))):
        for _attempt in range(20):  # rejection sampling so objects do not touch
            size = int(round(np.exp(rng.uniform(np.log(sizes[0]), np.log(sizes[1])))))  # mostly small
            cls = int(rng.integers(0, len(CLASSES)))
            m = int(size * 0.75) + 2  # covers the rotated square's diagonal
            cx, cy = (int(v) for v in rng.integers(m, s - m, 2))
            x1, y1, x2, y2 = cx - m, cy - m, cx + m, cy + m
            if all(x1 > b[2] or x2 < b[0] or y1 > b[3] or y2 < b[1] for b in boxes):
                break
        else:
            continue
        mask = np.zeros((2 * m + 1, 2 * m + 1), np.uint8)  # local canvas centred on the object
        _draw_shape(mask, cls, m, m, size, rng)
        ys, xs = np.nonzero(mask)
        if not len(xs):
            continue
        ys, xs = ys + y1, xs + x1  # back to image coordinates
        region = im[ys, xs].astype(np.float32).mean(0)
        # pick a colour that differs clearly from what lies underneath, so every object is visible
        color = rng.integers(0, 256, 3).astype(np.float32)
        if np.abs(color - region).sum() < 150:
            color = np.where(region > 127, region - 110, region + 110)
        im[ys, xs] = np.clip(color, 0, 255).astype(np.uint8)
        bx1, by1, bx2, by2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1  # pixel edges
        boxes.append((x1, y1, x2, y2))
        labels.append([0 if one_class else cls, (bx1 + bx2) / 2 / s, (by1 + by2) / 2 / s, (bx2 - bx1) / s, (by2 - by1) / s])
    # sensor-like noise over everything, objects included, so they are not perfectly flat
    im = np.clip(im + rng.normal(0, rng.uniform(4, 16), im.shape).astype(np.float32), 0, 255).astype(np.uint8)
    return im, np.array(labels, np.float64).reshape(-1, 5)


def generate(root: Path, n_train: int = 256, n_val: int = 64, img_size: int = 320, seed: int = 0,
             sizes: tuple[int, int] = (MIN_SIZE, MAX_SIZE), clutter: float = 1.0, one_class: bool = False) -> Path:
    """Write images/{train,val}/*.jpg and labels/{train,val}/*.txt under `root`; returns `root`.

    Built in a sibling '.partial' folder and moved into place at the end, so an interrupted run
    never leaves a half-written dataset that looks complete.
    """
    root = Path(root)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for split_id, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
        (tmp / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([seed, split_id, i])  # per-image stream: order-independent
            im, labels = make_image(rng, img_size, sizes, clutter, one_class)
            stem = f"{split}_{i:05d}"
            cv2.imwrite(str(tmp / "images" / split / f"{stem}.jpg"), im, [cv2.IMWRITE_JPEG_QUALITY, 95])
            lines = [f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}" for c, x, y, w, h in labels]
            (tmp / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "labels"):
        for split in ("train", "val"):
            dst = root / sub / split
            shutil.rmtree(dst, ignore_errors=True)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(tmp / sub / split), str(dst))
    for stale in root.glob("labels/*.cache"):  # label caches of an older generation are invalid
        stale.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description="Generate the offline small-object dataset.")
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1] / "datasets" / "smallobjects")
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-val", type=int, default=64)
    ap.add_argument("--img-size", type=int, default=320)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(generate(a.root, a.n_train, a.n_val, a.img_size, a.seed))


if __name__ == "__main__":
    main()
