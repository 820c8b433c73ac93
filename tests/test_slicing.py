"""Sliced (tiled) inference, validation and training: tile geometry, merging across tile borders, the predictor's
tiled path, sliced validation against full-resolution labels, the training tile sampler and the offline tiler."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from torchvision.ops import nms

from engine.evaluate import predict_dataset_sliced, summarize
from models.predictor import Predictor
from utils.boxes import xywhn2xyxy
from utils.dataset import LoadImagesAndLabels
from utils.errors import UserError
from utils.slicing import (SliceConfig, auto_tile_size, clip_to_window, cut_edges, merge_detections, parse_slice_size,
                           sample_tile, slice_config, tile_dataset, tile_windows)
from utils.slicing import _candidate_pairs  # the sweep is checked against brute force

WHITE = 255


# ----- geometry --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w,size,overlap", [(2472, 2299, 640, 0.2), (580, 1068, 640, 0.2), (480, 640, 640, 0.2),
                                              (100, 50, 640, 0.0), (1001, 999, 256, 0.5), (700, 640, 640, 0.9),
                                              (33, 2000, 32, 0.0), (1, 1, 64, 0.2)])
def test_tiles_cover_the_whole_image(h, w, size, overlap):
    win = tile_windows(h, w, size, overlap)
    covered = np.zeros((h, w), dtype=bool)
    for x1, y1, x2, y2 in win:
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert (x2 - x1, y2 - y1) == (min(size, w), min(size, h))  # every tile the same size, edge tiles included
        covered[y1:y2, x1:x2] = True
    assert covered.all()
    assert win[:, 2].max() == w and win[:, 3].max() == h  # the last column/row ends at the border
    if h <= size and w <= size:
        assert len(win) == 1  # an image smaller than a tile is one tile: itself
    step = max(1, round(size * (1 - overlap)))
    xs = np.unique(win[:, 0])
    assert (np.diff(xs) <= step).all()  # consecutive tiles overlap at least as asked


def test_auto_tile_size_only_for_large_images():
    assert auto_tile_size(580, 1068, 640) == 640  # shrunk 1.67x by a letterbox to 640: tile it
    assert auto_tile_size(480, 640, 640) is None and auto_tile_size(900, 900, 640) is None
    assert SliceConfig("auto").tile_size(2472, 2299, 640) == 640
    assert SliceConfig(1280).tile_size(1080, 810, 640) is None  # fits one tile


def test_cut_edges_only_on_inner_tile_borders():
    boxes = np.array([[0.0, 10, 20, 30], [590, 10, 600, 30], [100, 100, 200, 200]])
    cut = cut_edges(boxes, (0, 0, 600, 600), (600, 1000))  # tile touches the image's left, top and bottom
    assert cut.tolist() == [[False, False, False, False], [False, False, True, False], [False, False, False, False]]
    cut = cut_edges(boxes, (0, 0, 600, 600), (1000, 1000))
    assert cut[1].tolist() == [False, False, True, False] and not cut[0].any()
    per_box = cut_edges(boxes, np.array([[0.0, 0, 600, 600], [0, 0, 1000, 1000], [100, 100, 500, 500]]), (1000, 1000))
    assert per_box.tolist() == [[False] * 4, [False] * 4, [True, True, False, False]]


# ----- merging ---------------------------------------------------------------------------------------------------
def _det(rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)


def _wins(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def test_merge_joins_an_object_split_by_a_border_without_overlap():
    # tiles [0, 500) and [500, 1000) of a 500 x 1000 image: an object at x 450..550 comes back as two pieces
    det = _det([[450, 100, 500, 160, 0.9, 0], [500, 101, 550, 160, 0.8, 0]])
    wins = _wins([0, 0, 500, 500], [500, 0, 1000, 500])
    assert len(nms(det[:, :4], det[:, 4], 0.5)) == 2  # plain NMS keeps both pieces: the border rule is needed
    out = merge_detections(det, wins, (500, 1000), method="nms")
    assert out.shape == (1, 6)
    assert out[0, :4].tolist() == [450, 100, 550, 160] and out[0, 4] == pytest.approx(0.9)


def test_merge_takes_a_cut_piece_into_the_whole_object_from_the_overlapping_tile():
    # tiles [0, 600) and [400, 1000): tile 0 sees 520..600 of an object at 520..640 that tile 1 sees whole
    det = _det([[520, 50, 600, 90, 0.95, 3], [520, 50, 640, 90, 0.7, 3]])
    wins = _wins([0, 0, 600, 600], [400, 0, 1000, 600])
    out = merge_detections(det, wins, (600, 1000), method="nms", threshold=0.5)
    assert out.shape == (1, 6) and out[0, :4].tolist() == [520, 50, 640, 90] and out[0, 5] == 3


def test_merge_never_grows_a_piece_into_an_unrelated_box():
    # a piece cut at x=600 inside a much taller box of the other tile (scored alike, so only the geometry
    # decides): not that box seen from the piece's tile
    det = _det([[560, 100, 600, 140, 0.9, 0], [540, 20, 660, 300, 0.8, 0]])
    wins = _wins([0, 0, 600, 600], [400, 0, 1000, 600])
    out = merge_detections(det, wins, (600, 1000), method="nms")
    assert [560, 100, 600, 140] in out[:, :4].tolist() and len(out) == 2


def test_merge_does_not_reshape_a_strong_box_by_a_weak_one():
    # the two halves of test_merge_joins_an_object_split_by_a_border_without_overlap, the second at 1/10 the score
    det = _det([[450, 100, 500, 160, 0.9, 0], [500, 101, 550, 160, 0.09, 0]])
    wins = _wins([0, 0, 500, 500], [500, 0, 1000, 500])
    out = merge_detections(det, wins, (500, 1000))
    assert out[:, :4].tolist() == [[450, 100, 500, 160], [500, 101, 550, 160]]


def test_merge_keeps_neighbours_apart():
    # two different objects either side of a border, not overlapping across it; and two classes on one spot
    det = _det([[440, 100, 499, 150, 0.9, 0], [501, 300, 560, 350, 0.8, 0],
                [10, 10, 50, 50, 0.9, 0], [10, 10, 50, 50, 0.8, 1]])
    wins = _wins([0, 0, 500, 500], [500, 0, 1000, 500], [0, 0, 500, 500], [500, 0, 1000, 500])
    out = merge_detections(det, wins, (500, 1000))
    assert len(out) == 4
    assert len(merge_detections(det, wins, (500, 1000), agnostic=True)) == 3
    # two boxes of one tile cut by its border are that tile's own business (its NMS kept both): never joined as
    # pieces, although their union agrees with each of them (IoU 0.83)
    det2 = _det([[560, 100, 600, 150, 0.9, 0], [560, 110, 600, 160, 0.8, 0]])
    w2 = _wins([0, 0, 600, 600], [0, 0, 600, 600])
    assert len(merge_detections(det2, w2, (600, 1000), threshold=0.9)) == 2
    assert len(merge_detections(det2, _wins([0, 0, 600, 600], [0, 0, 600, 601]), (600, 1000), threshold=0.9)) == 1


def test_merge_nms_keeps_the_best_box_nmm_grows_to_the_union():
    det = _det([[100, 100, 200, 200, 0.9, 0], [110, 110, 210, 210, 0.6, 0], [105, 100, 205, 200, 0.5, 0]])
    wins = _wins([0, 0, 1000, 1000], [0, 0, 1000, 1000], [0, 0, 1000, 1000])  # the full-image pass: nothing cut
    out = merge_detections(det, wins, (1000, 1000), method="nms")
    assert out.tolist() == [[100, 100, 200, 200, pytest.approx(0.9), 0]]
    out = merge_detections(det, wins, (1000, 1000), method="nmm")
    assert out[:, :4].tolist() == [[100, 100, 210, 210]]
    # ios: a small box inside a big one is one object by ios, two by iou
    det2 = _det([[0, 0, 100, 100, 0.9, 0], [10, 10, 40, 40, 0.8, 0]])
    w2 = _wins([0, 0, 1000, 1000], [0, 0, 1000, 1000])
    assert len(merge_detections(det2, w2, (1000, 1000), metric="iou")) == 2
    assert len(merge_detections(det2, w2, (1000, 1000), metric="ios")) == 1
    assert len(merge_detections(det, wins, (1000, 1000), method="nms", max_det=0)) == 0


def test_candidate_sweep_finds_every_touching_pair():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 500, (300, 2))
    boxes = np.concatenate((xy, xy + rng.uniform(1, 60, (300, 2))), 1)
    i, j = _candidate_pairs(boxes, 2.0)
    got = set(zip(i.tolist(), j.tolist()))
    want = set()
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):
            if (min(boxes[a, 2], boxes[b, 2]) + 2 >= max(boxes[a, 0], boxes[b, 0])
                    and min(boxes[a, 3], boxes[b, 3]) + 2 >= max(boxes[a, 1], boxes[b, 1])):
                want.add((a, b))
    assert got == want and len(want) > 100


# ----- the predictor's tiled path ---------------------------------------------------------------------------------
class WhiteBoxDetector(nn.Module):
    """A stand-in detector: one box around the white pixels of each input (conf 0.9), raw YOLO output."""

    stride = torch.tensor([8.0, 16.0, 32.0])
    names = {0: "white"}

    def forward(self, x, augment=False):
        out = torch.zeros((x.shape[0], 1, 6))
        for b in range(x.shape[0]):
            ys, xs = torch.nonzero(x[b].mean(0) > 0.99, as_tuple=True)
            if len(xs):
                x1, y1, x2, y2 = xs.min().float(), ys.min().float(), xs.max().float() + 1, ys.max().float() + 1
                out[b, 0] = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, 0.9, 1.0])
        return out


def _canvas(h, w, *rects):
    im = np.full((h, w, 3), 30, np.uint8)
    for x1, y1, x2, y2 in rects:
        im[y1:y2, x1:x2] = WHITE
    return im


@pytest.mark.parametrize("overlap,size,rect", [(0.0, 512, (430, 120, 570, 180)),   # tiles [0, 512) [512, 1024)
                                               (0.2, 640, (300, 120, 700, 180))])  # [0, 640) [384, 1024)
def test_object_split_by_a_tile_border_comes_back_as_one_box(overlap, size, rect):
    im = _canvas(size, 1024, rect)  # wider than the tiles' overlap: no tile sees it whole
    p = Predictor(WhiteBoxDetector(), conf_thres=0.25, slicing=SliceConfig(size, overlap=overlap, full=False))
    _, det = p.predict_sliced(im, size, 32)
    assert p.last_tiles == 2
    assert det.shape == (1, 6)
    assert det[0, :4].tolist() == pytest.approx(list(rect), abs=0.5)


def test_sliced_boxes_are_in_original_pixels_and_inside_the_image():
    im = _canvas(900, 1500, (1400, 820, 1500, 900))  # in the bottom-right corner tile
    p = Predictor(WhiteBoxDetector(), conf_thres=0.25, slicing=SliceConfig(256, overlap=0.25, full=False))
    _, det = p.predict_sliced(im, 128, 32)  # tiles shrunk 2x: mapping back must undo it
    assert det[0, :4].tolist() == pytest.approx([1400, 820, 1500, 900], abs=2.5)
    assert (det[:, [0, 2]] <= 1500).all() and (det[:, [1, 3]] <= 900).all() and (det[:, :4] >= 0).all()


@pytest.fixture(scope="module")
def yolov5n(yolov5n_weights):
    from models.backends import DetectMultiBackend

    return DetectMultiBackend(yolov5n_weights)


@pytest.fixture(scope="module")
def vehicles(images_dir):
    return np.ascontiguousarray(cv2.imread(str(images_dir / "small-vehicles1.jpeg"))[..., ::-1])


def test_image_within_one_tile_equals_plain_prediction(yolov5n, images_dir):
    im = np.ascontiguousarray(cv2.imread(str(images_dir / "bus.jpg"))[..., ::-1])  # 1080 x 810
    for cfg, size in ((SliceConfig(1280), 640), (SliceConfig(1080), 320), (SliceConfig("auto"), 1280)):
        plain = Predictor(yolov5n).predict_images([im], [size, size], 32)[1][0]
        p = Predictor(yolov5n, slicing=cfg)
        sliced = p.predict_images([im], [size, size], 32)[1][0]
        assert len(plain) > 3 and torch.equal(plain, sliced) and p.last_tiles == 0


def test_batched_and_one_by_one_tiles_give_the_same_boxes(yolov5n, vehicles):
    runs = []
    for batch in (8, 1):
        p = Predictor(yolov5n, slicing=SliceConfig(320, batch=batch))
        runs.append(p.predict_sliced(vehicles, 320, 32)[1])
        assert p.last_tiles == 12  # 4 x 3 tiles of the 1068 x 580 image: one batch of 8 and one of 4
    a, b = runs
    assert len(a) == len(b) > 10
    assert torch.allclose(a, b, atol=1e-3)


def test_slicing_finds_more_cars_than_one_pass(yolov5n, vehicles):
    plain = Predictor(yolov5n).predict_images([vehicles], [640, 640], 32)[1][0]
    sliced = Predictor(yolov5n, slicing=SliceConfig(640)).predict_images([vehicles], [640, 640], 32)[1][0]
    cars = lambda d: int((d[:, 5] == 2).sum())  # noqa: E731
    assert cars(sliced) > cars(plain)
    h, w = vehicles.shape[:2]
    assert (sliced[:, :4] >= 0).all() and (sliced[:, [0, 2]] <= w).all() and (sliced[:, [1, 3]] <= h).all()


@pytest.mark.slow
def test_detect_slice_exports_give_the_pt_boxes(yolov5n_weights, images_dir, tmp_path):
    """detect.py --slice with fixed-shape ONNX, TorchScript and (where installed) OpenVINO exports: the .pt's
    boxes within 1 px; and more cars than one pass."""
    import importlib.util

    import detect
    import export
    from torchvision.ops import box_iou

    w = tmp_path / "yolov5n.pt"
    shutil.copy(yolov5n_weights, w)
    formats = ["onnx", "torchscript"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
    files = export.run(weights=w, imgsz=[640], include=formats)
    src = images_dir / "small-vehicles1.jpeg"

    def sliced(f):
        return detect.run(weights=f, source=src, slice=640, project=tmp_path, nosave=True, quiet=True,
                          trust_weights=True)["results"][0][1]

    a = sliced(w)
    for fmt in formats:
        b = sliced(files[fmt])
        assert len(a) == len(b) > 0, fmt
        match = box_iou(a[:, :4], b[:, :4]).argmax(1)
        assert (a[:, :4] - b[match, :4]).abs().max() <= 1 and torch.equal(a[:, 5], b[match, 5]), fmt
    plain = detect.run(weights=w, source=src, project=tmp_path, nosave=True, quiet=True)["results"][0][1]
    assert (a[:, 5] == 2).sum() > (plain[:, 5] == 2).sum()  # more cars
    h, w_ = cv2.imread(str(src)).shape[:2]
    assert (a[:, :2] >= 0).all() and (a[:, 2] <= w_).all() and (a[:, 3] <= h).all()


# ----- sliced validation -------------------------------------------------------------------------------------------
def _planted_dataset(root: Path, size=(1200, 1600), rects=((100, 200, 140, 236), (900, 500, 1010, 620),
                                                             (1550, 1150, 1600, 1200))) -> Path:
    h, w = size
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "big.png"), _canvas(h, w, *rects))
    rows = [f"0 {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
            for x1, y1, x2, y2 in rects]
    (root / "labels" / "big.txt").write_text("\n".join(rows) + "\n")
    return root / "images"


class _OraclePredictor:
    """Predicts a fixed set of boxes in original pixels (what a perfect sliced prediction would return)."""

    device = torch.device("cpu")

    def __init__(self, boxes):
        self.boxes, self.times, self.calls = boxes, [0.0, 0.0, 0.0], []

    def predict_sliced(self, im, size, stride, fixed_shape=None):
        self.calls.append(im.shape)
        return None, torch.tensor([[*b, 0.9, 0.0] for b in self.boxes], dtype=torch.float32)


def test_sliced_validation_scores_against_full_resolution_labels(tmp_path):
    rects = ((100, 200, 140, 236), (900, 500, 1010, 620), (1550, 1150, 1600, 1200))
    ds = LoadImagesAndLabels(_planted_dataset(tmp_path, rects=rects), img_size=320, rect=True, batch_size=1)
    oracle = _OraclePredictor([list(map(float, r)) for r in rects])
    rec = predict_dataset_sliced(oracle, ds, 1, {0: "obj"}, imgsz=320, stride=32)
    assert oracle.calls == [(1200, 1600, 3)]  # the full-size image, not the 320-px letterbox
    res = summarize(rec, {0: "obj"})
    assert res.map50 > 0.99 and res.map > 0.99 and res.apm == pytest.approx(1.0)  # (YOLOv5 AP tops out at 0.995)
    # the same boxes at letterbox scale (what scoring against resized labels would accept) score nothing
    r = 320 / 1600
    shrunk = _OraclePredictor([[v * r for v in b] for b in rects])
    assert summarize(predict_dataset_sliced(shrunk, ds, 1, {0: "obj"}, imgsz=320, stride=32), {0: "obj"}).map50 < 0.01


def test_sliced_validation_skips_an_image_broken_after_the_scan(tmp_path, capsys):
    rects = ((100, 200, 140, 236),)
    images = _planted_dataset(tmp_path, rects=rects)
    shutil.copy(images / "big.png", images / "big2.png")
    shutil.copy(tmp_path / "labels" / "big.txt", tmp_path / "labels" / "big2.txt")
    ds = LoadImagesAndLabels(images, img_size=320, batch_size=1)
    (images / "big2.png").write_bytes(b"\x89PNG broken")  # after the label scan accepted it
    rec = predict_dataset_sliced(_OraclePredictor([list(map(float, rects[0]))]), ds, 1, {0: "obj"}, imgsz=320, stride=32)
    out = capsys.readouterr().out  # LOGGER writes to stdout
    assert rec.seen == 1 and "cannot read image" in out and "1 of 2 images could not be read" in out


def test_val_run_slice_end_to_end(tmp_path, yolov5n_weights, capsys):
    import val

    _planted_dataset(tmp_path / "d")
    data = tmp_path / "d.yaml"
    data.write_text(yaml.safe_dump({"path": str(tmp_path / "d"), "train": "images", "val": "images",
                                    "names": {i: str(i) for i in range(80)}}))
    val.run(data=str(data), weights=yolov5n_weights, imgsz=320, batch_size=1, slice=640, project=tmp_path / "runs",
            plots=False)
    out = capsys.readouterr().out
    assert "tiles at 320" in out  # the sliced path ran (the oracle test above checks its scoring)
    assert [r.split()[:3] for r in out.splitlines() if r.strip().startswith("all")] == [["all", "1", "3"]]


# ----- bad input -----------------------------------------------------------------------------------------------
def test_bad_slice_settings_get_one_clear_line():
    with pytest.raises(UserError, match="below the model stride 32"):
        SliceConfig(16).check(32)
    for overlap in (-0.1, 1.0, 1.5):
        with pytest.raises(UserError, match=r"--slice-overlap must be in \[0, 1\)"):
            SliceConfig(640, overlap=overlap).check(32)
    with pytest.raises(UserError, match="--slice-batch"):
        SliceConfig(640, batch=0).check(32)
    with pytest.raises(UserError, match="tile size in pixels or 'auto'"):
        parse_slice_size("big")
    assert parse_slice_size(None) is None and parse_slice_size("0") is None and parse_slice_size("AUTO") == "auto"
    assert slice_config(None) is None and slice_config("640").size == 640


def test_val_refuses_slice_with_an_incompatible_option(tmp_path, yolov5n_weights):
    import val

    with pytest.raises(UserError, match="--slice cannot be combined with --save-hybrid"):
        val.run(data="x.yaml", weights=yolov5n_weights, slice=640, save_hybrid=True)
    with pytest.raises(UserError, match="--task speed"):
        val.run(data="x.yaml", weights=yolov5n_weights, slice=640, task="speed")


def test_detect_refuses_bad_slices(yolov5n_weights, images_dir, tmp_path):
    import detect

    with pytest.raises(UserError, match="below the model stride"):
        detect.run(weights=yolov5n_weights, source=images_dir / "bus.jpg", slice=8, project=tmp_path)
    with pytest.raises(UserError, match="--augment"):
        detect.run(weights=yolov5n_weights, source=images_dir / "bus.jpg", slice=640, augment=True, project=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written for a refused run


def test_train_refuses_slice_with_rect():
    import train

    with pytest.raises(UserError, match="--slice .* --rect"):
        train.parse_opt(["--slice", "640", "--rect", "--epochs", "1"])
    with pytest.raises(UserError, match="--slice-min-visibility"):
        train.parse_opt(["--slice", "640", "--slice-min-visibility", "0", "--epochs", "1"])
    with pytest.raises(UserError, match="--slice-empty"):
        train.parse_opt(["--slice", "640", "--slice-empty", "1.5", "--epochs", "1"])
    from argparse import Namespace

    from engine.state import train_tile_size

    with pytest.raises(UserError, match="--slice 16 is below the model stride 32"):
        train_tile_size(Namespace(slice="16"), 320, 32)
    assert train_tile_size(Namespace(slice="auto"), 320, 32) == 320 and train_tile_size(Namespace(slice=None), 320, 32) is None


# ----- training tiles ----------------------------------------------------------------------------------------------
def test_clip_to_window_keeps_visible_boxes_clipped():
    boxes = np.array([[10, 10, 50, 50],      # inside
                      [90, 10, 130, 50],     # 25% inside (x 90..100 of 90..130)
                      [80, 60, 120, 100],    # 50% inside: kept at 0.5
                      [200, 200, 220, 220]])  # outside
    clipped, kept = clip_to_window(boxes, (0, 0, 100, 100), 0.5)
    assert kept.tolist() == [0, 2]
    assert clipped.tolist() == [[10, 10, 50, 50], [80, 60, 100, 100]]
    clipped, kept = clip_to_window(boxes, (50, 0, 150, 100), 0.5)  # window offset: boxes in its own pixels
    assert kept.tolist() == [1, 2] and clipped.tolist() == [[40, 10, 80, 50], [30, 60, 70, 100]]


def test_sample_tile_is_inside_and_keeps_every_visible_box():
    rng = random.Random(0)
    boxes = np.array([[x, y, x + 30, y + 20] for x in range(0, 1000, 97) for y in range(0, 800, 83)], dtype=float)
    cls = np.arange(len(boxes)) % 3
    labels = np.column_stack((cls, (boxes[:, 0] + boxes[:, 2]) / 2000, (boxes[:, 1] + boxes[:, 3]) / 1600,
                              (boxes[:, 2] - boxes[:, 0]) / 1000, (boxes[:, 3] - boxes[:, 1]) / 800))
    boxes = xywhn2xyxy(labels[:, 1:], 1000, 800)  # exactly what the labels say (a box half inside stays decided)
    for _ in range(50):
        (x1, y1, x2, y2), tile = sample_tile(rng, (800, 1000), labels, 256, 0.5)
        assert 0 <= x1 and x2 <= 1000 and 0 <= y1 and y2 <= 800 and (x2 - x1, y2 - y1) == (256, 256)
        clipped, want = clip_to_window(boxes, (x1, y1, x2, y2), 0.5)
        assert len(want) and tile[:, 0].tolist() == cls[want].tolist()
        got = np.column_stack(((tile[:, 1] - tile[:, 3] / 2) * 256, (tile[:, 2] - tile[:, 4] / 2) * 256,
                               (tile[:, 1] + tile[:, 3] / 2) * 256, (tile[:, 2] + tile[:, 4] / 2) * 256))
        assert np.allclose(got, clipped, atol=1e-3)  # clipped to the tile, in its own pixels


def test_sliced_training_dataset_samples_native_tiles(tmp_path):
    rects = [(x, y, x + 24, y + 18) for x in range(20, 1580, 130) for y in range(30, 1180, 150)]
    images = _planted_dataset(tmp_path, rects=rects)
    ds = LoadImagesAndLabels(images, img_size=320, batch_size=4, augment=True, slice_size=320, seed=3,
                             hyp={"mosaic": 0.0, "fliplr": 0.0, "flipud": 0.0})
    assert len(ds) == 5 * 4  # one item per grid tile of the 1600 x 1200 image
    for k in range(6):
        img, labels, _, shapes = ds[k]
        assert shapes[0] == (320, 320)  # a native-resolution tile, not the image shrunk to 320
        im = img.numpy().transpose(1, 2, 0)
        assert len(labels)
        for _, _, cx, cy, w, h in labels.tolist():  # every label box is on white pixels of the tile ...
            x1, y1, x2, y2 = (int(round(v)) for v in ((cx - w / 2) * 320, (cy - h / 2) * 320, (cx + w / 2) * 320,
                                                      (cy + h / 2) * 320))
            assert (im[y1 + 1:y2 - 1, x1 + 1:x2 - 1] == WHITE).all()
        white = (im == WHITE).all(2)  # ... and every fully visible object has its label
        n_full = sum(1 for x1, y1, x2, y2 in _blobs(white) if x2 - x1 >= 24 and y2 - y1 >= 18)
        assert len(labels) >= n_full


def _blobs(mask):
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
    return [(x, y, x + w, y + h) for x, y, w, h, _ in stats[1:]]


def test_slice_training_scales_autoanchor_to_tiles(tmp_path):
    from utils.autoanchor import _label_wh

    ds = LoadImagesAndLabels(_planted_dataset(tmp_path), img_size=320, slice_size=320)
    wh = _label_wh(ds, 320)
    assert wh[0].tolist() == pytest.approx([40, 36], abs=0.1)  # native size: tiles of 320 run at 320


# ----- the offline tiler --------------------------------------------------------------------------------------------
def test_offline_tiler_writes_a_yolo_dataset(tmp_path):
    rects = ((100, 200, 140, 236), (590, 500, 650, 560))
    images = _planted_dataset(tmp_path / "src", size=(700, 1000), rects=rects)
    data = tmp_path / "src.yaml"
    data.write_text(yaml.safe_dump({"path": str(tmp_path / "src"), "train": "images", "val": "images", "names": {0: "w"}}))
    out = tile_dataset(data, 640, 0.2, tmp_path / "tiles")
    cfg = yaml.safe_load(out.read_text())
    assert cfg["names"] == {0: "w"} and cfg["train"] == "images/train"
    tiles = sorted((tmp_path / "tiles" / "images" / "train").glob("*.png"))
    assert sorted(t.stem for t in tiles) == ["big_0_0", "big_0_60", "big_360_0", "big_360_60"]
    # the object at x 590..650 is whole in the tiles starting at x=360, clipped (>= 0.5 visible) in those at 0
    lb = (tmp_path / "tiles" / "labels" / "train" / "big_360_0.txt").read_text().split("\n")
    boxes = [list(map(float, r.split()[1:])) for r in lb if r]
    assert [round(b[0] * 640 - b[2] * 320) for b in boxes] == [230]  # x1 = 590 - 360
    assert images.exists()
    with pytest.raises(UserError, match="--overlap"):
        tile_dataset(data, 640, 1.0, tmp_path / "bad")


@pytest.mark.slow
def test_train_slice_end_to_end(tmp_path, yolov5n_weights, capsys):
    """train.py --slice: random tiles for training, sliced validation of the full-size images, a hint with --slice."""
    import train

    rects = [(x, y, x + 30, y + 24) for x in range(40, 760, 180) for y in range(60, 560, 170)]
    _planted_dataset(tmp_path / "d", size=(600, 800), rects=rects)
    data = tmp_path / "d.yaml"
    data.write_text(yaml.safe_dump({"path": str(tmp_path / "d"), "train": "images", "val": "images", "names": {0: "w"}}))
    train.main(["--data", str(data), "--weights", str(yolov5n_weights), "--epochs", "1", "--img", "128",
                "--slice", "256", "--batch", "4", "--workers", "0", "--noplots", "--project", str(tmp_path / "runs"),
                "--name", "s", "--hyp", "hyp.finetune-few.yaml"])
    out = capsys.readouterr().out
    assert "tiles at 128" in out  # best.pt's final validation was sliced ...
    assert out.count("\n                   all          1         " + str(len(rects))) >= 2  # ... on the full-size labels
    run = tmp_path / "runs" / "s"
    assert (run / "weights" / "best.pt").is_file() and (run / "results.csv").is_file()
    opt = yaml.safe_load((run / "opt.yaml").read_text())
    assert opt["slice"] == "256"  # --resume re-creates the same sliced run


def test_coco_max_dets_counts_crowded_images():
    """--coco-max-dets: an image with 150 objects, all found, scores AP 1 only when more than 100 detections count."""
    from utils.coco import COCOStyleEvaluator

    xy = np.array([[x, y] for x in range(0, 1500, 100) for y in range(0, 1000, 100)], dtype=float)
    gt = np.concatenate((xy, xy + 40), 1)
    aps = {}
    for n in (100, 1000):
        ev = COCOStyleEvaluator(max_dets=n)
        ev.update(0, gt, np.linspace(0.9, 0.5, len(gt)), np.zeros(len(gt)), gt, np.zeros(len(gt)))
        aps[n] = ev.summarize()["AP"]
    assert aps[1000] == pytest.approx(1.0) and aps[100] < 0.7


def test_val_refuses_coco_max_dets_below_one(yolov5n_weights):
    import val

    with pytest.raises(UserError, match="--coco-max-dets must be at least 1"):
        val.run(data="x.yaml", weights=yolov5n_weights, coco_max_dets=0)
