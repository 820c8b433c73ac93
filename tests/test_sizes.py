"""--sizes: AP/AR per object-size bin from the one COCO evaluator, checked against pycocotools' own COCOeval;
n/a for empty bins; one-line errors; the results.csv columns training writes."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
import val
from engine.evaluate import EvalRecord, summarize
from tests.conftest import shared_path
from tests.test_coco import COCO128, _backends, _coco128_gt, _fake_predictions
from utils.coco import COCOStyleEvaluator, append_predictions, coco80_to_coco91_class, image_id_from_path
from utils.coco import yolo_labels_to_coco_gt
from utils.errors import UserError
from utils.logging import RESULT_KEYS, ResultsLogger
from utils.results import ValResult
from utils.sizes import BIG, format_size_table, parse_sizes, size_csv_values

AITOD_AREAS = [[0, 8**2], [8**2, 16**2], [16**2, 32**2], [32**2, 1e5**2]]  # cocoapi-aitod's ranges


def _pycocotools_bins(gt_json: Path, pred_json: Path, areas: list[list[float]]) -> tuple[list[float], list[float]]:
    """AP and AR per area range from pycocotools' own COCOeval.summarize, with no project code in the path:
    each range is put in the place of COCO's 'small' (and the next ones of 'medium', 'large')."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ap, ar = [], []
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        dt = gt.loadRes(str(pred_json))
        for k in range(0, len(areas), 3):
            chunk = areas[k:k + 3]
            ev = COCOeval(gt, dt, "bbox")
            ev.params.areaRng = [[0, 1e5**2], *chunk] + [[0, 1e5**2]] * (3 - len(chunk))
            ev.params.areaRngLbl = ["all", "small", "medium", "large"]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            ap += [float(x) for x in ev.stats[3:3 + len(chunk)]]
            ar += [float(x) for x in ev.stats[9:9 + len(chunk)]]
    return ap, ar


@pytest.fixture(scope="module")
def coco128_fake(tmp_path_factory):
    """coco128's ground truth and fake detections at json precision, as jsons and in the in-memory evaluator."""
    tmp = tmp_path_factory.mktemp("sizes")
    files, labels, shapes = _coco128_gt()
    class_map = coco80_to_coco91_class()
    gt_json = tmp / "gt.json"
    gt_json.write_text(json.dumps(yolo_labels_to_coco_gt(files, labels, shapes, [str(i) for i in range(80)], class_map)))
    rng = np.random.default_rng(1)
    jdict: list[dict] = []
    evs = {b: COCOStyleEvaluator(backend=b) for b in ("pycocotools", "auto")}
    for f, lab, hw in zip(files, labels, shapes):
        p = _fake_predictions(lab, hw, rng)
        append_predictions(jdict, p, f, class_map)
        for ev in evs.values():
            ev.update(image_id_from_path(f), p[:, :4], p[:, 4], p[:, 5], lab[:, 1:], lab[:, 0])
    pred_json = tmp / "pred.json"
    pred_json.write_text(json.dumps(jdict))
    return gt_json, pred_json, evs


@pytest.mark.skipif(not COCO128.is_dir(), reason="coco128 not available")
@pytest.mark.parametrize("backend", ["pycocotools", "auto"])
def test_aitod_bins_equal_pycocotools_cocoeval_on_the_same_json(coco128_fake, backend):
    gt_json, pred_json, evs = coco128_fake
    m = evs[backend].size_metrics("aitod")
    ref_ap, ref_ar = _pycocotools_bins(gt_json, pred_json, AITOD_AREAS)
    assert all(0.01 < a < 0.99 for a in ref_ap), ref_ap  # every bin holds objects and is scored non-trivially
    assert max(abs(a - b) for a, b in zip(m.ap, ref_ap)) < 1e-6, (m.ap, ref_ap)
    assert max(abs(a - b) for a, b in zip(m.ar, ref_ar)) < 1e-6, (m.ar, ref_ar)
    # the bins are AI-TOD's evaluator's: an object of 8-16 px is 'tiny', not 'very tiny'
    assert m.bins.edges == (0, 8, 16, 32, BIG) and m.bins.names[:2] == ("very tiny", "tiny")
    assert sum(m.counts) == len(m.sides) > 500


@pytest.mark.skipif(not COCO128.is_dir(), reason="coco128 not available")
def test_coco_bins_are_todays_aps_apm_apl(coco128_fake):
    _, _, evs = coco128_fake
    ev = evs["auto"]
    today = ev.summarize()  # what val.py printed before --sizes existed
    m = ev.size_metrics("coco")
    assert m.ap == pytest.approx([today["APs"], today["APm"], today["APl"]], abs=1e-12)
    assert m.ar == pytest.approx([today["ARs"], today["ARm"], today["ARl"]], abs=1e-12)
    # custom edges equal to COCO's give the same numbers (a different code path: ranges looked up by value)
    same = ev.size_metrics("0 32 96 100000")
    assert same.ap == pytest.approx(m.ap, abs=1e-12) and same.bins.preset == "custom"


def _one_class_record(gt_sides: list[float], hit: list[bool]) -> EvalRecord:
    """An evaluation record of one image: square ground truths of the given sides, found where hit is True."""
    rec = EvalRecord(nc=1)
    gt = np.array([[10 + 60 * i, 10, 10 + 60 * i + s, 10 + s] for i, s in enumerate(gt_sides)], dtype=np.float64)
    pred = gt[np.array(hit)]
    rec.coco.update(0, pred, np.full(len(pred), 0.9), np.zeros(len(pred)), gt, np.zeros(len(gt)))
    rec.stats.append((torch.ones(len(pred), 10, dtype=torch.bool), torch.full((len(pred),), 0.9),
                      torch.zeros(len(pred)), torch.zeros(len(gt))))
    rec.seen, rec.loss = 1, torch.zeros(3)
    return rec


def test_bins_without_objects_print_na_never_zero_or_minus_one(capsys):
    rec = _one_class_record([12.0, 20.0, 40.0], [True, False, True])  # nothing under 8 px, nothing in 64+
    result = summarize(rec, {0: "a"}, sizes="0 8 16 32 64 1e5")
    out = capsys.readouterr().out
    ap_row = next(line for line in out.splitlines() if line.strip().startswith("AP "))
    cells = ap_row.split()[1:6]
    assert cells == ["n/a", "1", "0", "1", "n/a"], ap_row  # found: 1, missed: 0, empty bins: n/a
    assert not {"-1", "-1.0", "-1.00"} & set(out.split("Small objects")[1].split())
    inst = next(line for line in out.splitlines() if line.strip().startswith("Instances")).split()[1:]
    assert inst == ["0", "1", "1", "1", "0"]
    row = result.csv_values()
    assert math.isnan(row["metrics/AP_0-8"]) and math.isnan(row["metrics/AR_64+"])
    assert row["metrics/AP_8-16"] == pytest.approx(1) and row["metrics/AP_16-32"] == 0
    assert list(row)[:10] == list(RESULT_KEYS[3:13])  # today's columns first, in their order


@pytest.mark.parametrize("value", ["tiny", "16 8", "0 8 8 16", "8", "-4 8 16", "nan 8", "0 8 1e6 1e7", "0 8 x", ""])
def test_bad_sizes_value_is_one_clear_line(value, capsys):
    with pytest.raises(UserError, match="--sizes"):
        parse_sizes(value)
    for main in (val.main, train.main):  # rejected by both scripts before anything is loaded or written
        with pytest.raises(SystemExit) as e:
            main(["--sizes", *value.split()] if value else ["--sizes", ""])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ERROR: --sizes"), err


def test_sizes_values_parse_as_documented():
    assert parse_sizes("aitod").ranges == ["<8", "8-16", "16-32", "32+"]
    assert parse_sizes(["0", "8", "16", "inf"]).edges == (0, 8, 16, BIG)  # inf: no upper limit, as COCO's 1e5
    assert parse_sizes("0,8,16").keys == ["0-8", "8-16"]
    assert parse_sizes("COCO").csv_columns() == ["metrics/ARs", "metrics/ARm", "metrics/ARl"]  # APs/APm/APl exist
    assert parse_sizes("aitod").area_ranges()["8-16"] == (64.0, 256.0)


def test_results_csv_keeps_todays_columns_and_adds_the_bins(tmp_path):
    bins = parse_sizes("aitod")
    rec = _one_class_record([6.0, 12.0, 40.0], [True, True, False])
    with contextlib.redirect_stdout(io.StringIO()):
        res = summarize(rec, {0: "a"}, sizes=bins)
    logger = ResultsLogger(tmp_path, tensorboard=False)
    base = {k: 0.5 for k in RESULT_KEYS}
    logger.log(0, {**base, **size_csv_values(bins, res.sizes)})
    logger.log(1, {**base, **size_csv_values(bins, ValResult().sizes)})  # a --noval epoch: empty cells
    # a resume (a new logger on the file) under other bins keeps the file's own columns
    ResultsLogger(tmp_path, start_epoch=2, tensorboard=False).log(2, {**base, **size_csv_values(parse_sizes("coco"), None)})
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:17] == ["epoch", *RESULT_KEYS]
    assert list(rows[0])[17:] == bins.csv_columns()
    assert float(rows[0]["metrics/AP_0-8"]) == pytest.approx(1) and float(rows[0]["metrics/AP_32+"]) == 0
    assert rows[1]["metrics/AP_0-8"] == "nan" and rows[2]["metrics/AR_8-16"] == "nan" and len(rows) == 3
    assert float(rows[2]["metrics/APs"]) == 0.5


def test_size_table_names_the_bins_and_their_ranges():
    rec = _one_class_record([5.0], [True])
    m = rec.coco.size_metrics("aitod")
    table = format_size_table(m)
    assert "very tiny" in table and "<8" in table and "32+" in table
    assert table.splitlines()[3].split()[1:5] == ["1", "n/a", "n/a", "n/a"]


@pytest.mark.slow
def test_val_sizes_aitod_on_coco128_matches_pycocotools_on_its_json(tmp_path, capsys, yolov5n_weights):
    """val.py --sizes aitod --save-json on coco128 with yolov5n: its per-bin AP/AR are pycocotools' on the jsons it
    wrote (1e-6), and the in-memory numbers it printed first agree to json rounding; sizes.png is written."""
    data = shared_path("data", "coco128", "coco128.yaml")
    r = val.run(data, weights=yolov5n_weights, imgsz=640, batch_size=32, workers=0, sizes="aitod", save_json=True,
                project=tmp_path, name="v", half=False, device="cpu")
    out = capsys.readouterr().out
    run = tmp_path / "v"
    ref_ap, ref_ar = _pycocotools_bins(run / "ground_truth_coco.json", run / "yolov5n_predictions.json", AITOD_AREAS)
    assert all(a > 0.01 for a in ref_ap), ref_ap
    assert max(abs(a - b) for a, b in zip(r.sizes.ap, ref_ap)) < 1e-6, (r.sizes.ap, ref_ap)
    assert max(abs(a - b) for a, b in zip(r.sizes.ar, ref_ar)) < 1e-6, (r.sizes.ar, ref_ar)
    printed = next(line for line in out.splitlines() if line.strip().startswith("AP ")).split()[1:5]
    assert [float(x) for x in printed] == pytest.approx(ref_ap, abs=2e-3)  # 3 significant digits, unrounded boxes
    assert (run / "sizes.png").stat().st_size > 10_000
    for f in ("confusion_matrix.png", "PR_curve.png", "F1_curve.png"):  # the matrix is drawn in a child process
        assert (run / f).stat().st_size > 10_000, f


def test_study_plots_ap_and_recall_by_size_against_image_size(tmp_path, monkeypatch):
    """--task study: one val per --img; the size bins of every run go into study_*_sizes.png (empty bins as gaps)."""
    import argparse

    from utils.sizes import SizeMetrics

    bins, seen = parse_sizes("aitod"), []

    def fake_run(**kw):
        seen.append(kw["imgsz"])
        ap = [-1.0, kw["imgsz"] / 2000, 0.3, 0.5]
        return ValResult(map=0.3, sizes=SizeMetrics(bins, ap, ap, [0, 3, 4, 5], np.array([9.0, 20, 40])))

    monkeypatch.setattr(val, "run", fake_run)
    opt = argparse.Namespace(data="x.yaml", weights="w.pt", project=str(tmp_path), name="s", exist_ok=False,
                             sizes=["aitod"], imgsz=640)
    val.study(opt)
    assert seen == list(range(256, 1536 + 128, 128))
    with Image.open(next((tmp_path / "s").glob("study_x_w_sizes.png"))) as im:
        assert im.size[0] > 1500


@pytest.mark.slow
def test_training_writes_the_bins_into_results_csv(tmp_path, yolov5n_weights):
    coco8 = shared_path("data", "coco8", "coco8.yaml")
    train.main(["--data", str(coco8), "--cfg", "yolov5n.yaml", "--weights", str(yolov5n_weights), "--epochs", "2",
                "--img", "128", "--batch", "4", "--workers", "0", "--noautoanchor", "--device", "cpu", "--noplots",
                "--sizes", "aitod", "--project", str(tmp_path), "--name", "t"])
    with open(tmp_path / "t" / "results.csv", newline="") as f:
        rows = [{k.strip(): v.strip() for k, v in r.items()} for r in csv.DictReader(f)]
    assert len(rows) == 2
    assert list(rows[0])[1:17] == list(RESULT_KEYS)  # YOLOv5's columns where they always were
    assert list(rows[0])[17:] == parse_sizes("aitod").csv_columns()
    for r in rows:
        vals = [float(r[c]) for c in parse_sizes("aitod").csv_columns()]
        assert all(math.isnan(v) or 0 <= v <= 1 for v in vals) and not all(math.isnan(v) for v in vals)
