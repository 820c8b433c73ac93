"""utils.analyze: the dataset report's numbers on a planted dataset against a hand computation, the stride walk
against the built models, and its recommendations on the shared datasets."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import shared_path
from utils.analyze import analyze, format_report, main, model_levels
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

# Three-level toy model: strides 8, 16, 32 and one square anchor per level, so BPR is easy to do by hand.
TOY_CFG = {
    "nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": [[8, 8], [32, 32], [128, 128]],
    "backbone": [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [8, 3, 2]],
                 [-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [8, 3, 2]]],
    "head": [[[2, 3, 4], 1, "Detect", ["nc", "anchors"]]],
}


def _row(cls: int, cx: float, cy: float, w: float, h: float, W: int, H: int) -> str:
    return f"{cls} {cx / W:.8f} {cy / H:.8f} {w / W:.8f} {h / H:.8f}"


@pytest.fixture()
def planted(tmp_path) -> Path:
    """A: 640x320 (scale 0.5 at --img 320), B: 160x160 (scale 2), C: a bad coordinate (skipped as corrupt)."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name, (w, h) in {"a": (640, 320), "b": (160, 160), "c": (200, 200)}.items():
        Image.new("RGB", (w, h), (90, 90, 90)).save(tmp_path / "images" / f"{name}.png")
    A = [_row(0, 100, 100, 40, 40, 640, 320),  # a1: side 40 -> 20 at --img
         _row(0, 300, 100, 12, 12, 640, 320),  # a2: side 12 -> 6 (shrunk below 8; inside one cell)
         _row(1, 400, 100, 6, 24, 640, 320),  # a3: side 12 -> 6 (shrunk below 8; 3x12, not inside one cell)
         _row(0, 630, 100, 40, 40, 640, 320),  # a5: reaches 10 px past the right edge -> outside image
         _row(1, 500, 200, 1, 10, 640, 320),  # a6: 1 px wide -> degenerate; side 3.16 natively
         _row(7, 200, 200, 20, 20, 640, 320)]  # class 7 of 2 -> removed by the loader
    A.insert(1, A[0])  # a duplicate of a1 -> removed by the loader
    (tmp_path / "labels" / "a.txt").write_text("\n".join(A) + "\n")
    (tmp_path / "labels" / "b.txt").write_text(_row(0, 50, 50, 3, 3, 160, 160) + "\n"  # b1: side 3 -> 6
                                               + _row(1, 100, 100, 40, 20, 160, 160) + "\n")  # b2: 28.3 -> 56.6
    (tmp_path / "labels" / "c.txt").write_text("0 1.2 0.5 0.1 0.1\n")
    data = tmp_path / "planted.yaml"
    data.write_text(yaml.safe_dump({"path": str(tmp_path), "train": "images", "val": "images", "names": {0: "x", 1: "y"}}))
    return data


def test_report_numbers_match_a_hand_computation(planted):
    r = analyze(planted, img=320, cfg=TOY_CFG)
    n, o = r.numbers, r.objects
    # kept: a1 a2 a3 a5 a6 b1 b2 (the duplicate, the class-7 row and image c are dropped as the loader drops them)
    assert len(o.cls) == 7 and r.images == {"train": 2, "val": 2, "unique": 2}
    assert sorted(np.round(o.side, 3)) == pytest.approx(sorted([40, 12, 12, 40, 10**0.5, 3, 800**0.5]), abs=1e-3)
    assert list(np.bincount(o.cls)) == [4, 3]
    assert n["below_8_at_img"] == pytest.approx(4 / 7)  # a2 a3 a6 b1
    assert n["below_cell_at_img"] == pytest.approx(3 / 7)  # a2 (6x6), a6 (0.5x5), b1 (6x6)
    assert n["below_32_at_img"] == pytest.approx(6 / 7)  # all but b2 (56.6)
    assert n["below_8_native"] == pytest.approx(2 / 7) and n["below_32_native"] == pytest.approx(5 / 7)
    assert n["shrunk_below_8_count"] == 2 and n["shrunk_below_8_at_img"] == pytest.approx(2 / 7)  # a2, a3
    assert r.problems == {"corrupt": 1, "bad_coordinates": 1, "duplicates": 1, "bad_class": 1, "outside_image": 1,
                          "degenerate_under_2px": 1}
    # BPR (a side ratio within 4 of an anchor): labels at --img are a1 20x20, a2 6x6, a3 3x12, a5 20x20, a6 0.5x5,
    # b1 6x6, b2 80x40. Anchor 8: a1 a2 a3 a5 b1; anchor 32: a1 a5 b2; anchor 128: b2 (40/128 > 1/4); any: all but a6
    assert r.levels == [(8.0, pytest.approx(5 / 7)), (16.0, pytest.approx(3 / 7)), (32.0, pytest.approx(1 / 7))]
    assert r.bpr == pytest.approx(6 / 7)
    text = format_report(r)
    assert "P3/8 0.714, P4/16 0.429, P5/32 0.143; any level 0.857" in text
    assert "letterbox to 320 shrinks 2 objects (28.6%)" in text


@pytest.mark.parametrize("cfg", ["yolov5n.yaml", "yolov5n-p2.yaml", "yolov5n-spd.yaml", "yolov5n-spdlite.yaml",
                                 "yolov5n-spdconv.yaml", "yolov5n-p2-spdconv.yaml", "yolov5x-p2.yaml"])
def test_stride_walk_over_the_yaml_agrees_with_the_built_model(cfg):
    from models.yolo import DetectionModel

    model = DetectionModel(cfg, verbose=False)
    det = model.model[-1]
    levels = model_levels(cfg)
    assert [lv.stride for lv in levels] == det.stride.tolist()
    built = (det.anchors * det.stride.view(-1, 1, 1)).detach().numpy()
    assert np.allclose(np.stack([lv.anchors for lv in levels]), built)


def test_recommends_slicing_with_a_tile_for_deepforest_at_640():
    r = analyze(shared_path("data", "deepforest", "deepforest.yaml"), img=640)
    adv = {a.topic: a for a in r.advice}
    m = re.match(r"yes: --slice (\d+) ", adv["slicing"].advice)
    assert m, adv["slicing"]
    tile = int(m.group(1))
    assert 640 <= tile < 2472 and tile % 32 == 0  # tiles smaller than the 2299x2472 val image, >= --img
    assert r.numbers["shrunk_below_8_at_img"] > 0.1  # why: whole-image letterboxing loses the trees
    assert "keep --img 640" in adv["image size"].advice


def test_recommends_no_slicing_for_coco128_at_640():
    r = analyze(shared_path("data", "coco128", "coco128.yaml"), img=640)
    adv = {a.topic: a for a in r.advice}
    assert adv["slicing"].advice == "no" and adv["image size"].advice == "--img 640 is fine"
    assert r.numbers["shrunk_below_8_at_img"] == 0  # every coco128 image is at most 640 px
    assert 0.98 < r.bpr <= 1


def test_bad_inputs_are_one_line(planted, capsys, tmp_path):
    with pytest.raises(UserError, match="--img"):
        analyze(planted, img=16)
    for argv in (["--data", str(planted), "--cfg", "nope.yaml"], ["--data", str(tmp_path / "missing.yaml")]):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--project", str(tmp_path / "runs")])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ERROR: "), err


@pytest.mark.slow
def test_cli_report_on_deeppcb_at_256(tmp_path):
    data = shared_path("data", "deeppcb", "deeppcb.yaml")
    p = subprocess.run([sys.executable, "-m", "utils.analyze", "--data", str(data), "--img", "256",
                        "--project", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "instances: 10013" in p.stdout and "images: train 1000, val 500, unique 1500" in p.stdout
    assert re.search(r"slicing\s+no", p.stdout) and re.search(r"SPD\s+worth trying", p.stdout)
    png = tmp_path / "exp" / "report.png"
    with Image.open(png) as im:
        assert im.size[0] > 1000
