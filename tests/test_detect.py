"""detect.py end to end on the shared images and a shared video."""
from __future__ import annotations

from collections import Counter

import cv2
import pytest

import detect
from tests.conftest import shared_path


def counts(det, names) -> Counter:
    return Counter(names[int(c)] for c in det[:, 5].tolist())


def test_bus_and_zidane(yolov5n_weights, images_dir, tmp_path):
    out = detect.run(weights=yolov5n_weights, source=images_dir, project=tmp_path, name="exp", save_txt=True,
                     save_conf=True, verbose=False)
    res = {p.split("/")[-1]: d for p, d in out["results"]}
    names = out["names"]
    assert counts(res["bus.jpg"], names) == Counter({"person": 4, "bus": 1})
    assert counts(res["zidane.jpg"], names) == Counter({"person": 2, "tie": 1})
    # annotated images and YOLO-format label lines with confidences
    assert (out["save_dir"] / "bus.jpg").is_file()
    lines = (out["save_dir"] / "labels" / "bus.txt").read_text().splitlines()
    assert len(lines) == 5
    for line in lines:
        cls, *xywhc = line.split()
        assert int(cls) in (0, 5) and len(xywhc) == 5
        assert all(0 <= float(v) <= 1 for v in xywhc)
    # boxes are in original-image pixels: the bus spans most of the 810-px width
    bus = res["bus.jpg"][res["bus.jpg"][:, 5] == 5][0]
    assert bus[2] - bus[0] > 600 and 0 <= bus[0] and bus[2] <= 810


def test_summary_line(yolov5n_weights, images_dir, tmp_path, capsys):
    detect.run(weights=yolov5n_weights, source=images_dir / "bus.jpg", project=tmp_path, nosave=True)
    out = capsys.readouterr().out
    assert "640x480 4 persons, 1 bus, " in out and "ms" in out
    assert "Speed:" in out


def test_video_end_to_end(yolov5n_weights, tmp_path):
    video = shared_path("videos", "car-detection.mp4")
    n_in = int(cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FRAME_COUNT))
    out = detect.run(weights=yolov5n_weights, source=video, imgsz=[128], project=tmp_path, verbose=False)
    saved = out["save_dir"] / "car-detection.mp4"
    cap = cv2.VideoCapture(str(saved))
    n_out = 0
    while cap.read()[0]:
        n_out += 1
    assert n_out == n_in == len(out["results"])
    assert int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 768


def test_bad_source_is_one_line_error(yolov5n_weights, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        detect.main(["--weights", str(yolov5n_weights), "--source", str(tmp_path / "missing.jpg"), "--project", str(tmp_path)])
    assert e.value.code == 2
    assert "does not exist" in capsys.readouterr().err
