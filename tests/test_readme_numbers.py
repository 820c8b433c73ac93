"""The README's latency and int8 figures are the committed benchmark outputs, digit for digit."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_latency_table_is_the_committed_run():
    rows = [ln for ln in (ROOT / "benchmarks" / "export_latency.md").read_text().splitlines() if ln.startswith("|")]
    assert len(rows) > 2
    missing = [r for r in rows if r not in README.splitlines()]
    assert not missing, f"README's latency table differs from benchmarks/export_latency.md: {missing}"


@pytest.mark.parametrize("stem,label", [("int8_accuracy_yolov5n", "| yolov5n.pt |"),
                                        ("int8_accuracy_yolov5n-spd", "| its exact yolov5n-spd transfer |"),
                                        ("int8_accuracy_deeppcb", "| yolov5n fine-tuned on DeepPCB |")])
def test_int8_accuracy_rows_are_the_committed_runs(stem, label):
    with open(ROOT / "benchmarks" / f"{stem}.csv", newline="") as f:
        runs = {r["runtime"]: r for r in csv.DictReader(f)}
    (row,) = [ln for ln in README.splitlines() if ln.startswith(label)]
    cells = [c.strip() for c in row.strip("|").split("|")]
    ort, ov = runs["ONNX Runtime"], runs["OpenVINO"]
    assert cells[2] == f"{float(ort['fp32_mAP50-95']):.4f} / {float(ort['fp32_APs']):.4f}"
    assert cells[3] == f"{float(ort['int8_mAP50-95']):.4f} / {float(ort['int8_APs']):.4f}"
    assert cells[5] == f"{float(ov['int8_mAP50-95']):.4f} / {float(ov['int8_APs']):.4f}"
    for cell, r in ((cells[4], ort), (cells[6], ov)):
        assert cell == f"{float(r['d_mAP']):+.4f} / {float(r['d_APs']):+.4f}".replace("-", "−")
