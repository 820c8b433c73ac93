"""Tests for utils/autoanchor.py: k-means + evolution recovers clusters; check_anchors decisions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.autoanchor import check_anchors, kmean_anchors

CENTRES = np.array([[12.0, 10.0], [60.0, 30.0], [200.0, 220.0]])  # pixels at img_size 640


class SyntheticDataset:
    """What AutoAnchor reads from a dataset: original (w, h) shapes and normalised labels."""

    def __init__(self, centres: np.ndarray = CENTRES, n_img: int = 40, per_img: int = 6, seed: int = 0, tiny: int = 0):
        rng = np.random.default_rng(seed)
        self.shapes = np.tile([[640.0, 480.0]], (n_img, 1))  # long side 640: pixels stay pixels
        self.labels = []
        for i in range(n_img):
            c = centres[rng.integers(0, len(centres), per_img)] * rng.uniform(0.9, 1.1, (per_img, 2))
            lb = np.zeros((per_img, 5), np.float32)
            lb[:, 1:3] = 0.5
            lb[:, 3:5] = c / self.shapes[i]
            if i < tiny:  # one sub-2-pixel box in the first `tiny` images
                lb[0, 3:5] = 1.0 / self.shapes[i]
            self.labels.append(lb)


def test_kmeans_recovers_separated_clusters_sorted_by_area():
    k = kmean_anchors(SyntheticDataset(), n=3, img_size=640, gen=200, verbose=False)
    assert k.shape == (3, 2) and k.dtype == np.float32
    assert (np.diff(k.prod(1)) > 0).all()
    assert np.allclose(k, CENTRES, rtol=0.15), k


def test_kmeans_is_reproducible_and_seed_matters():
    ds = SyntheticDataset(seed=1)
    a = kmean_anchors(ds, n=6, gen=100, verbose=False, seed=3)
    b = kmean_anchors(ds, n=6, gen=100, verbose=False, seed=3)
    c = kmean_anchors(ds, n=6, gen=100, verbose=False, seed=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_tiny_boxes_warned_and_filtered(capsys):
    ds = SyntheticDataset(tiny=5)
    kmean_anchors(ds, n=3, gen=10, verbose=False)
    out = capsys.readouterr().out
    assert "5 of 240 labels are under 3 pixels" in out
    assert "on 235 label sizes" in out  # the 1x1 px boxes are not clustered


def test_fewer_labels_than_anchors_falls_back_to_random_start(capsys):
    ds = SyntheticDataset(n_img=1, per_img=2)
    k = kmean_anchors(ds, n=9, gen=20, verbose=False)
    assert k.shape == (9, 2) and np.isfinite(k).all()
    assert "kmeans failed" in capsys.readouterr().out


@pytest.fixture()
def yolo():
    from models.yolo import Model

    return Model("yolov5n.yaml", nc=2, verbose=False)


def _pixel_anchors(model) -> np.ndarray:
    m = model.model[-1]
    return (m.anchors * m.stride.view(-1, 1, 1)).view(-1, 2).numpy()


def test_check_anchors_keeps_good_anchors(yolo, capsys):
    before = yolo.model[-1].anchors.clone()
    ds = SyntheticDataset(centres=_pixel_anchors(yolo))  # labels shaped like the model's own anchors
    check_anchors(ds, yolo, thr=4.0, imgsz=640)
    out = capsys.readouterr().out
    assert "anchors/target, 1.000 Best Possible Recall (BPR)" in out
    assert torch.equal(yolo.model[-1].anchors, before)


def test_check_anchors_replaces_poor_anchors(yolo, capsys):
    m = yolo.model[-1]
    m.anchors *= 40  # far too large for the data
    check_anchors(SyntheticDataset(), yolo, thr=4.0, imgsz=640)
    out = capsys.readouterr().out
    assert "poorly" in out and "new anchors in use" in out
    new = _pixel_anchors(yolo)
    area = new.prod(1)
    assert (np.diff(area) >= 0).all()  # small anchors on P3, large on P5
    # every cluster of the data now has an anchor within anchor_t
    ratio = CENTRES[:, None] / new[None]
    assert (np.minimum(ratio, 1 / ratio).min(2).max(1) > 0.5).all()
    assert m.anchors.max() < 40  # stored in grid units again


def test_kmean_anchors_from_dataset_yaml(tmp_path, capsys):
    """A planted YOLO dataset on disk (640x480 images, boxes drawn from three known sizes): the anchors
    k-means finds through the yaml sit on those sizes, scaled to img_size, and every label fits one."""
    import cv2
    import yaml

    rng = np.random.default_rng(0)
    img_dir, lb_dir = tmp_path / "images" / "train", tmp_path / "labels" / "train"
    img_dir.mkdir(parents=True)
    lb_dir.mkdir(parents=True)
    blank = np.zeros((480, 640, 3), np.uint8)
    for i in range(12):
        cv2.imwrite(str(img_dir / f"{i}.jpg"), blank)
        wh = CENTRES[rng.integers(0, 3, 8)] * rng.uniform(0.95, 1.05, (8, 2)) / [640, 480]
        (lb_dir / f"{i}.txt").write_text("".join(f"0 0.5 0.5 {w:.6f} {h:.6f}\n" for w, h in wh))
    yml = tmp_path / "planted.yaml"
    yml.write_text(yaml.safe_dump({"path": str(tmp_path), "train": "images/train", "val": "images/train",
                                   "names": ["box"]}))
    k = kmean_anchors(str(yml), n=3, img_size=320, gen=100, verbose=False)
    # long side 640 -> 320 halves every pixel size
    np.testing.assert_allclose(k, CENTRES / 2, rtol=0.1)
    labels = np.concatenate([np.loadtxt(f, ndmin=2)[:, 3:5] for f in sorted(lb_dir.glob("*.txt"))]) * [320, 240]
    ratio = labels[:, None] / k[None]
    best = np.minimum(ratio, 1 / ratio).min(2).max(1)  # YOLOv5's anchor-label fit
    assert (best > 0.9).all()  # every label within 10% of an anchor (thr 4 only asks for 25%)
    assert "1.0000 best possible recall" in capsys.readouterr().out
