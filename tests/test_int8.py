"""Int8 export (export.py --int8): calibration, mixed precision, every tool runs the files, clear errors.

Tiny models (random yolov5n-spd, 64x64) and a five-image calibration set keep these fast.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import export
from models.backends import DetectMultiBackend
from models.quantize import CalibrationReader, calibration_files, float_nodes, head_scope
from models.yolo import DetectionModel
from utils.checkpoints import atomic_save, make_checkpoint
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT.parent / "shared" / "data" / "coco128"
IMGSZ = 64


def _installed(*names: str) -> bool:
    return all(importlib.util.find_spec(n) is not None for n in names)


def _checkpoint(folder: Path, cfg: str = "yolov5n-spd.yaml") -> Path:
    torch.manual_seed(0)
    m = DetectionModel(cfg, verbose=False)
    m.names = {i: f"class{i}" for i in range(m.yaml["nc"])}
    f = folder / f"{Path(cfg).stem}.pt"
    atomic_save(make_checkpoint(m, half=False), f)
    return f


def _dataset(folder: Path, n: int = 5) -> Path:
    """A data yaml whose train (= val) split holds the first n coco128 images with their labels."""
    src = sorted((COCO128 / "images" / "train2017").glob("*.jpg"))[:n]
    if len(src) < n:
        pytest.skip("coco128 not available in ../shared")
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for im in src:
        shutil.copy(im, folder / "images" / im.name)
        shutil.copy(COCO128 / "labels" / "train2017" / f"{im.stem}.txt", folder / "labels" / f"{im.stem}.txt")
    names = yaml.safe_load((ROOT / "data" / "coco128.yaml").read_text())["names"] if (
        ROOT / "data" / "coco128.yaml").is_file() else {i: f"class{i}" for i in range(80)}
    f = folder / "tiny.yaml"
    f.write_text(yaml.safe_dump({"path": str(folder), "train": "images", "val": "images", "names": names}))
    return f


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("int8")
    w, data = _checkpoint(d), _dataset(d / "data")
    include = ["onnx"] + (["openvino"] if _installed("openvino", "nncf") else [])
    # in a subprocess: once NNCF is imported it stays in the process, and later tests that start subprocesses
    # crashed (SIGSEGV) in whole-suite runs
    r = subprocess.run([sys.executable, "export.py", "--weights", str(w), "--imgsz", str(IMGSZ), "--include", *include,
                        "--int8", "--data", str(data), "--calib-images", "3"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    files = {"onnx": d / "yolov5n-spd_int8.onnx", "openvino": d / "yolov5n-spd_int8_openvino_model"}
    return w, data, {k: v for k, v in files.items() if k in include and v.exists()}


@pytest.mark.slow
def test_int8_onnx_is_quantised_except_the_detect_layer(int8_export):
    import onnx

    _, _, files = int8_export
    f = files["onnx"]
    assert f.name == "yolov5n-spd_int8.onnx"
    m = onnx.load(str(f))
    nodes = m.graph.node
    producer = {o: n for n in nodes for o in n.output}
    convs = [n for n in nodes if n.op_type == "Conv"]
    scope = head_scope(m)

    def int8_weights(n) -> bool:
        return producer.get(n.input[1]) is not None and producer[n.input[1]].op_type == "DequantizeLinear"

    head = [n for n in convs if n.name.startswith(scope)]
    assert len(head) == 3 and not any(int8_weights(n) for n in head)  # the three output convs: float weights
    assert all(int8_weights(n) for n in convs if n not in head)  # every other conv: int8 weights
    readers = {i for n in nodes if n.op_type == "QuantizeLinear" for i in n.input}
    assert not [n.name for n in nodes if n.name.startswith(scope) and set(n.output) & readers]  # float out
    assert sum(n.op_type == "SpaceToDepth" for n in nodes) == 2  # the slice-free SPD form was quantised
    assert not any(n.op_type == "Slice" for n in nodes)
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["int8"] == "true" and '"calib_images": 3' in meta["quantization"]


@pytest.mark.slow
def test_int8_exports_load_and_detect_through_every_tool(int8_export, tmp_path):
    import detect
    import val

    w, data, files = int8_export
    ref = DetectMultiBackend(w)
    for fmt, f in files.items():
        b = DetectMultiBackend(f)
        assert b.int8 and b.stride == 32 and b.names[3] == "class3" and b.fixed_imgsz == (IMGSZ, IMGSZ), fmt
        x = export.check_input([IMGSZ, IMGSZ], 32, 1, False, None)
        y = b(x)
        assert y.shape == ref(x).shape and torch.isfinite(y).all(), fmt
        out = detect.run(weights=f, source=COCO128 / "images" / "train2017" / "000000000009.jpg", imgsz=(IMGSZ,),
                         project=tmp_path, nosave=True, verbose=False, conf_thres=0.0)
        assert len(out["results"]) == 1 and len(out["results"][0][1]) > 0, fmt  # conf 0: something is detected
        r = val.run(data, weights=str(f), imgsz=IMGSZ, batch_size=2, project=tmp_path, plots=False)
        metrics = [r.precision, r.recall, r.map50, r.map, r.aps, r.apm, r.apl]
        assert all(np.isfinite(metrics)), fmt
        hub = torch.hub.load(str(ROOT), "custom", path=str(f), source="local", _verbose=False)
        r = hub(str(COCO128 / "images" / "train2017" / "000000000009.jpg"), size=IMGSZ)
        assert r.names[3] == "class3" and r.pred[0].shape[1] == 6, fmt


@pytest.mark.slow
@pytest.mark.skipif(not _installed("openvino", "nncf"), reason="openvino and nncf not installed (optional)")
def test_int8_openvino_is_quantised(int8_export):
    import openvino as ov

    _, _, files = int8_export
    folder = files["openvino"]
    assert folder.name == "yolov5n-spd_int8_openvino_model"
    meta = yaml.safe_load((folder / "metadata.yaml").read_text())
    assert meta["int8"] is True and meta["quantization"]["calib_images"] == 3
    model = ov.Core().read_model(str(next(folder.glob("*.xml"))))
    fq = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "FakeQuantize"]
    import onnx

    head = head_scope(onnx.load(str(files["onnx"])))  # both exports come from the same float graph
    assert len(fq) > 20 and not [n for n in fq if n.startswith(head)], fq  # nothing of Detect is quantised


def test_calibration_uses_the_requested_number_of_images(tmp_path, capsys):
    data = _dataset(tmp_path / "data", n=5)
    files = calibration_files(data, 3)
    assert len(files) == 3 and files == sorted(files) and calibration_files(data, 3) == files  # seeded
    assert len(calibration_files(data, 10)) == 5 and "fewer than --calib-images 10" in capsys.readouterr().out
    reader = CalibrationReader(files, [IMGSZ, IMGSZ], 32, batch=2, dynamic=False)
    batches = list(iter(reader.get_next, None))
    assert [b["images"].shape for b in batches] == [(2, 3, IMGSZ, IMGSZ)] * 2  # fixed batch 2, last one padded
    assert reader.images_seen == 3
    x = batches[0]["images"]
    assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert np.isclose(x[0, :, 0, 0], 114 / 255, atol=1e-6).all()  # letterbox pad colour, as detect.py


def test_int8_bad_input_is_one_clear_line(tmp_path, capsys):
    w = _checkpoint(tmp_path)
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "images" / "broken.jpg").write_bytes(b"not a jpeg")  # only unreadable files
    (empty / "images" / "notes.txt").write_text("x")
    bad_yaml = tmp_path / "empty.yaml"
    bad_yaml.write_text(yaml.safe_dump({"path": str(empty), "train": "images", "val": "images", "names": {0: "a"}}))
    no_images = tmp_path / "noimages.yaml"
    (tmp_path / "none").mkdir()
    no_images.write_text(yaml.safe_dump({"path": str(tmp_path / "none"), "train": ".", "val": ".", "names": {0: "a"}}))
    cases = {
        "needs calibration images: pass --data": [],
        "calibration set is empty": ["--data", str(no_images)],
        "none of the 1 images in": ["--data", str(bad_yaml)],
        "--batch-size 4 asks for a fixed batch": ["--data", str(bad_yaml), "--dynamic", "--batch-size", "4"],
    }
    for msg, extra in cases.items():
        with pytest.raises(SystemExit) as e:
            export.main(["--weights", str(w), "--include", "onnx", "--int8", "--imgsz", str(IMGSZ), *extra])
        assert e.value.code != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ERROR:") and msg in err[0], (msg, err)
    assert not list(tmp_path.glob("*.onnx"))  # no half-made export left behind
    with pytest.raises(UserError, match="quantises --include onnx or openvino"):
        export.run(weights=w, include=["torchscript"], int8=True, data=bad_yaml)


def test_missing_openvino_still_writes_onnx_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    """Issue 21: each format that can be exported is written; the others one line each; non-zero exit."""
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    w = _checkpoint(tmp_path, "yolov5n.yaml")
    with pytest.raises(SystemExit) as e:
        export.main(["--weights", str(w), "--include", "onnx", "openvino", "--imgsz", str(IMGSZ)])
    assert e.value.code != 0
    out, err = capsys.readouterr()
    f = tmp_path / "yolov5n.onnx"
    assert DetectMultiBackend(f)(torch.zeros(1, 3, IMGSZ, IMGSZ)).shape[0] == 1  # the ONNX file is complete
    lines = [ln for ln in (out + err).splitlines() if "openvino" in ln.replace(str(tmp_path), "").lower()]
    assert len(lines) == 1 and lines[0].startswith("ERROR:") and "pip install openvino" in lines[0], lines
    assert "yolov5n.onnx" in lines[0]  # and it says what was written
    assert not (tmp_path / "yolov5n_openvino_model").exists()


def test_float_nodes_are_the_detect_layer_only():
    import onnx

    m = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["a"], name="/model.3/conv/Relu"),
         onnx.helper.make_node("Relu", ["a"], ["b"], name="/model.12/m.0/Conv"),
         onnx.helper.make_node("Relu", ["b"], ["y"], name="/model.12/Sigmoid")],
        "g", [onnx.helper.make_tensor_value_info("x", 1, [1])], [onnx.helper.make_tensor_value_info("y", 1, [1])]))
    assert head_scope(m) == "/model.12/"  # numerically last, not lexically ('/model.3/' > '/model.12/')
    assert float_nodes(m) == ["/model.12/m.0/Conv", "/model.12/Sigmoid"]


# --- activation ranges (ONNX Runtime): a two-conv graph small enough to reason about ----------------------
def _silu_graph(tmp_path: Path) -> Path:
    """images -> Conv -> SiLU (Sigmoid, Mul) -> Conv, the second conv named as a Detect layer's output conv."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w0 = numpy_helper.from_array(rng.normal(0, 2, (4, 3, 3, 3)).astype(np.float32), "w0")
    b0 = numpy_helper.from_array(np.zeros(4, np.float32), "b0")
    w1 = numpy_helper.from_array(rng.normal(0, 1, (2, 4, 1, 1)).astype(np.float32), "w1")
    nodes = [helper.make_node("Conv", ["images", "w0", "b0"], ["pre"], name="/model.0/conv/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["pre"], ["sig"], name="/model.0/act/Sigmoid"),
             helper.make_node("Mul", ["pre", "sig"], ["silu"], name="/model.0/act/Mul"),
             helper.make_node("Conv", ["silu", "w1"], ["out"], name="/model.1/m.0/Conv")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 8, 8])], [w0, b0, w1])
    f = tmp_path / "silu.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(f))
    return f


class _Batches:
    """A calibration reader over fixed arrays (CalibrationReader's interface)."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.rewind()

    def rewind(self):
        self._it, self.images_seen = iter(self.arrays), 0

    def get_next(self):
        x = next(self._it, None)
        if x is None:
            return None
        self.images_seen += 1
        return {"images": x}


def test_mean_minmax_averages_per_image_ranges(tmp_path):
    from models.quantize import activation_ranges

    f = _silu_graph(tmp_path)
    a, b = np.full((1, 3, 8, 8), 0.25, np.float32), np.full((1, 3, 8, 8), 0.25, np.float32)
    a[..., 0, 0], b[..., 0, 0] = 1.0, 3.0  # per-image max 1 and 3
    mean = activation_ranges(f, _Batches([a, b]), "mean-minmax")["images"]
    glob = activation_ranges(f, _Batches([a, b]), "minmax")["images"]
    assert mean == pytest.approx((0.25, 2.0)) and glob == pytest.approx((0.25, 3.0))


def test_silu_inputs_floored_and_the_silus_feeding_detect_stay_float(tmp_path):
    import onnx
    from onnx import numpy_helper

    from models.quantize import SILU_FLOOR, head_input_silus, quantize_onnx, silu_inputs

    f = _silu_graph(tmp_path)
    m = onnx.load(str(f))
    assert silu_inputs(m) == ["pre"]
    assert head_input_silus(m) == ["/model.0/act/Sigmoid", "/model.0/act/Mul"]
    rng = np.random.default_rng(1)
    reader = _Batches([rng.uniform(0, 1, (1, 3, 8, 8)).astype(np.float32) * 20 for _ in range(3)])
    info = quantize_onnx(f, tmp_path / "q.onnx", reader)
    assert info["calib_images"] == 3 and info["floored_tensors"] == 1 and info["method"] == "mean-minmax"
    q = onnx.load(str(tmp_path / "q.onnx"))
    init = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    (qpre,) = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "pre"]
    scale, zp = float(init[qpre.input[1]]), int(init[qpre.input[2]])
    assert -zp * scale == pytest.approx(SILU_FLOOR, abs=scale)  # the grid starts at the floor, not at the minimum
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert "sig" not in quantized and "silu" not in quantized  # Detect reads the SiLU in float
    assert any(n.op_type == "DequantizeLinear" and n.output[0] in
               next(c for c in q.graph.node if c.name == "/model.0/conv/Conv").input for n in q.graph.node)
