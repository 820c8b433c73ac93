"""torch.hub from the local checkout, offline: entry points, AutoShape inputs and the Detections object."""
from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.autoshape import AutoShape, Detections
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "yolov5n.pt"
BUS, ZIDANE = SHARED / "images" / "bus.jpg", SHARED / "images" / "zidane.jpg"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test: hub loading must work offline."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_hub_new_spd_model_offline():
    model = torch.hub.load(str(ROOT), "yolov5s_spd", source="local", pretrained=False, _verbose=False)
    assert isinstance(model, AutoShape) and model.stride == 32 and len(model.names) == 80
    assert any(type(m).__name__ == "space_to_depth" for m in model.modules())  # really the SPD config
    small = torch.hub.load(str(ROOT), "yolov5n_spd", source="local", pretrained=False, classes=3,
                           autoshape=False, _verbose=False)
    assert small.model[-1].nc == 3 and not isinstance(small, AutoShape)
    im = np.zeros((120, 200, 3), np.uint8)
    r = model(im, size=128)
    assert isinstance(r, Detections) and r.n == 1 and r.s == (1, 3, 96, 128)


def test_hub_pretrained_spd_without_weights_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no pretrained yolov5n-spd weights"):
        torch.hub.load(str(ROOT), "yolov5n_spd", source="local", pretrained=True, _verbose=False)


@pytest.fixture(scope="module")
def custom_model():
    if not WEIGHTS.is_file():
        pytest.skip("official yolov5n.pt not available")
    return torch.hub.load(str(ROOT), "custom", path=str(WEIGHTS), source="local", _verbose=False)


def test_hub_custom_every_input_kind(custom_model):
    pil = Image.open(ZIDANE)
    arr = np.asarray(pil.convert("RGB"))
    r = custom_model([str(BUS), pil, arr, BUS], size=320)
    assert r.n == len(r) == 4 and r.files[0] == "bus.jpg" and r.files[1] == "zidane.jpg"
    classes = [set(custom_model.names[int(c)] for c in p[:, 5]) for p in r.pred]
    assert {"person", "bus"} <= classes[0] and "person" in classes[1]
    assert torch.allclose(r.xyxy[1], r.xyxy[2])  # PIL and numpy RGB give the same result
    assert torch.allclose(r.xyxy[0], r.xyxy[3])  # str and Path too
    for p, n, im in zip(r.xywhn, r.xyxyn, r.ims):
        assert p[:, :4].min() >= 0 and p[:, :4].max() <= 1 and n[:, :4].max() <= 1
    h, w = r.ims[0].shape[:2]
    assert (h, w) == (1080, 810) and r.xyxy[0][:, [0, 2]].max() <= w and r.xyxy[0][:, [1, 3]].max() <= h
    assert "image 1/4: 1080x810" in str(r) and "Speed:" in str(r)
    single = custom_model(str(BUS))
    assert single.n == 1 and isinstance(custom_model(torch.zeros(1, 3, 64, 64)), torch.Tensor)  # raw tensor path


def test_hub_results_save_crop_pandas(custom_model, tmp_path, capsys):
    r = custom_model([str(BUS), str(ZIDANE)], size=320)
    r.print()
    out = capsys.readouterr().out
    assert "image 2/2: 720x1280" in out and "person" in out
    d = r.save(save_dir=tmp_path / "exp")
    assert sorted(p.name for p in d.iterdir()) == ["bus.jpg", "zidane.jpg"]
    assert r.save(save_dir=tmp_path / "exp") == tmp_path / "exp2"  # never overwrites a previous run
    crops = r.crop(save_dir=tmp_path / "crops")
    assert len(crops) == sum(len(p) for p in r.pred)
    assert all(c["im"].ndim == 3 and c["im"].size for c in crops)
    assert len(list((tmp_path / "crops" / "crops").rglob("*.jpg"))) == len(crops)
    df = r.pandas().xyxy[0]
    assert list(df.columns) == ["xmin", "ymin", "xmax", "ymax", "confidence", "class", "name"]
    assert len(df) == len(r.pred[0]) and "bus" in set(df["name"])
    dfn = r.pandas().xywhn[1]
    assert list(dfn.columns)[:4] == ["xcenter", "ycenter", "width", "height"] and dfn["width"].max() <= 1
    assert isinstance(r.xyxy[0], torch.Tensor)  # pandas() returned a copy
    assert [x.n for x in r.tolist()] == [1, 1]


def test_hub_custom_loads_exports(custom_model, tmp_path):
    import export

    w = Path(shutil.copy(WEIGHTS, tmp_path / "yolov5n.pt"))
    f = export.run(weights=w, imgsz=[256], include=["onnx"], dynamic=True)["onnx"]
    onnx_model = torch.hub.load(str(ROOT), "custom", path=str(f), source="local", _verbose=False)
    a, b = custom_model(str(BUS), size=256), onnx_model(str(BUS), size=256)
    assert torch.equal(a.pred[0][:, 5], b.pred[0][:, 5]) and (a.pred[0][:, :4] - b.pred[0][:, :4]).abs().max() < 1


def test_autoshape_bad_inputs(custom_model, tmp_path):
    with pytest.raises(UserError, match="could not read image"):
        custom_model(str(tmp_path / "missing.jpg"))
    with pytest.raises(UserError, match="unsupported image input"):
        custom_model([12345])
    with pytest.raises(UserError, match="no images"):
        custom_model([])
