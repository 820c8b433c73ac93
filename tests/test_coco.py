"""COCO interop (utils/coco.py) and the in-memory COCOStyleEvaluator checked against the json route."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.coco import (
    COCOStyleEvaluator,
    append_predictions,
    coco80_to_coco91_class,
    image_id_from_path,
    predictions_to_coco_json,
    run_pycocotools,
    yolo_labels_to_coco_gt,
)
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT.parent / "shared" / "data" / "coco128"


def test_coco80_to_coco91_known_ids():
    m = coco80_to_coco91_class()
    assert len(m) == 80 and len(set(m)) == 80
    assert m[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13]  # 12 (street sign) is skipped
    assert m[24] == 27 and m[40] == 46 and m[60] == 67 and m[79] == 90
    assert sorted(m) == m


def test_image_id_from_path():
    assert image_id_from_path("/a/b/000000000009.jpg") == 9
    assert image_id_from_path("dir/img_7.png") == "img_7"


def test_append_predictions_format():
    jdict: list[dict] = []
    predn = torch.tensor([[10.12345, 20.0, 50.5, 80.25, 0.8765432, 2.0]])
    append_predictions(jdict, predn, "x/000000000042.jpg", coco80_to_coco91_class())
    assert jdict == [{"image_id": 42, "category_id": 3, "bbox": [10.123, 20.0, 40.377, 60.25], "score": 0.87654}]
    # identity class map and the records wrapper give the same boxes
    out = predictions_to_coco_json([("a/5.jpg", predn), ("a/6.jpg", torch.zeros(0, 6))])
    assert len(out) == 1 and out[0]["category_id"] == 2 and out[0]["image_id"] == 5


def test_yolo_labels_to_coco_gt_structure():
    labels = [np.array([[0, 10, 20, 50, 60], [1, 0, 0, 5, 4]]), np.zeros((0, 5))]
    gt = yolo_labels_to_coco_gt(["d/1.jpg", "d/cat.jpg"], labels, [(100, 200), (30, 40)], ["a", "b"])
    assert gt["images"] == [
        {"id": 1, "file_name": "1.jpg", "width": 200, "height": 100},
        {"id": "cat", "file_name": "cat.jpg", "width": 40, "height": 30},
    ]
    a0, a1 = gt["annotations"]
    assert a0["bbox"] == [10, 20, 40, 40] and a0["area"] == 1600 and a0["iscrowd"] == 0 and a0["id"] == 1
    assert a1["category_id"] == 1 and a1["area"] == 20 and a1["image_id"] == 1
    assert [c["name"] for c in gt["categories"]] == ["a", "b"]
    with pytest.raises(UserError, match="share COCO image id"):
        yolo_labels_to_coco_gt(["a/1.jpg", "b/1.png"], [np.zeros((0, 5))] * 2, [(10, 10)] * 2, ["a"])


def _write(tmp_path: Path, name: str, obj) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


def test_pycocotools_perfect_and_empty(tmp_path, capsys):
    labels = [np.array([[0, 10, 10, 20, 20], [0, 100, 100, 300, 300]])]  # one small, one large box
    gt = yolo_labels_to_coco_gt(["1.jpg"], labels, [(400, 400)], ["a"])
    gtp = _write(tmp_path, "gt.json", gt)
    preds = predictions_to_coco_json([("1.jpg", np.array([[10, 10, 20, 20, 0.9, 0], [100, 100, 300, 300, 0.8, 0]]))])
    stats = run_pycocotools(gtp, _write(tmp_path, "pred.json", preds))
    assert stats[0] == pytest.approx(1.0) and stats[3] == pytest.approx(1.0) and stats[5] == pytest.approx(1.0)
    assert stats[4] == -1  # no medium gts: undefined
    assert "Average Precision" in capsys.readouterr().out

    stats = run_pycocotools(gtp, _write(tmp_path, "none.json", []))  # no predictions: clean zeros
    assert stats[0] == 0 and stats[3] == 0 and stats[4] == -1

    bad = [{"image_id": 999, "category_id": 0, "bbox": [0, 0, 1, 1], "score": 0.5}]
    with pytest.raises(UserError, match="not in"):
        run_pycocotools(gtp, _write(tmp_path, "bad.json", bad))
    with pytest.raises(UserError, match="not found"):
        run_pycocotools(tmp_path / "missing.json", gtp)


def _coco128_gt() -> tuple[list[Path], list[np.ndarray], list[tuple[int, int]]]:
    files = sorted((COCO128 / "images" / "train2017").glob("*.jpg"))
    labels, shapes = [], []
    for f in files:
        w, h = Image.open(f).size
        lf = COCO128 / "labels" / "train2017" / f"{f.stem}.txt"
        lab = np.loadtxt(lf, ndmin=2) if lf.is_file() and lf.stat().st_size else np.zeros((0, 5))
        c, x, y, bw, bh = lab.T
        xyxy = np.stack((c, (x - bw / 2) * w, (y - bh / 2) * h, (x + bw / 2) * w, (y + bh / 2) * h), 1)
        labels.append(xyxy)
        shapes.append((h, w))
    return files, labels, shapes


def _fake_predictions(labels: np.ndarray, hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Jittered copies of the gts (some dropped, some duplicated, some with wrong class) plus random FPs of all
    sizes, already rounded as the COCO json rounds them so both evaluators see identical numbers."""
    h, w = hw
    rows = []
    for c, x1, y1, x2, y2 in labels:
        if rng.random() < 0.15:
            continue  # missed object
        for _ in range(1 + (rng.random() < 0.2)):  # sometimes a duplicate detection
            bw, bh = x2 - x1, y2 - y1
            cx, cy = (x1 + x2) / 2 + rng.normal(0, 0.08) * bw, (y1 + y2) / 2 + rng.normal(0, 0.08) * bh
            bw, bh = bw * np.exp(rng.normal(0, 0.12)), bh * np.exp(rng.normal(0, 0.12))
            cls = c if rng.random() < 0.9 else rng.integers(0, 80)
            rows.append([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2, rng.uniform(0.05, 1), cls])
    for _ in range(rng.poisson(4)):
        s = np.exp(rng.uniform(np.log(4), np.log(400)))  # false positives from tiny to large
        bw, bh = s * rng.uniform(0.5, 2), s * rng.uniform(0.5, 2)
        x1, y1 = rng.uniform(0, w - 1), rng.uniform(0, h - 1)
        cls = rng.choice(labels[:, 0]) if len(labels) and rng.random() < 0.5 else rng.integers(0, 80)
        rows.append([x1, y1, x1 + bw, y1 + bh, rng.uniform(0.01, 0.9), cls])
    p = np.array(rows, dtype=np.float64).reshape(-1, 6)
    p[:, :4] = p[:, :4].round(3)
    p[:, 4] = p[:, 4].round(5)
    return p


def _backends():
    try:
        import faster_coco_eval  # noqa: F401

        fast = "faster_coco_eval"
    except ImportError:
        fast = pytest.param("faster_coco_eval", marks=pytest.mark.skip(reason="faster-coco-eval not installed"))
    return ["pycocotools", fast]


@pytest.mark.skipif(not COCO128.is_dir(), reason="coco128 not available")
@pytest.mark.parametrize("backend", _backends())
def test_in_memory_evaluator_matches_pycocotools_json_on_coco128(tmp_path, capsys, backend):
    files, labels, shapes = _coco128_gt()
    class_map = coco80_to_coco91_class()
    names = [str(i) for i in range(80)]
    gt_json = _write(tmp_path, "gt.json", yolo_labels_to_coco_gt(files, labels, shapes, names, class_map))

    rng = np.random.default_rng(0)
    jdict: list[dict] = []
    ev = COCOStyleEvaluator(area_ranges={"small_again": (0, 32**2), "tiny": (0, 16**2)}, backend=backend)
    for f, lab, hw in zip(files, labels, shapes):
        p = _fake_predictions(lab, hw, rng)
        append_predictions(jdict, p, f, class_map)
        ev.update(image_id_from_path(f), p[:, :4], p[:, 4], p[:, 5], lab[:, 1:], lab[:, 0])
    assert len(jdict) > 500
    ref = run_pycocotools(gt_json, _write(tmp_path, "pred.json", jdict), verbose=False)
    capsys.readouterr()
    mem = ev.summarize()
    assert capsys.readouterr().out == ""  # COCOeval's own chatter is kept off stdout
    # the data must exercise every size bucket, with imperfect but non-trivial AP
    assert all(0.05 < ref[i] < 0.95 for i in range(6)), ref
    # the same boxes (rounded as in the json), ids in the same order: the same numbers
    assert max(abs(mem[k] - ref[i]) for i, k in enumerate(COCOStyleEvaluator.STAT_KEYS)) < 1e-9, (mem, ref)
    # an extra area range is scored like the built-in one it copies; a narrower one differs
    assert mem["AP_small_again"] == pytest.approx(mem["APs"], abs=1e-12)
    assert 0 <= mem["AP_tiny"] != pytest.approx(mem["APs"])
