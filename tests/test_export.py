"""Export and deployment: the SPD export form, export.py's formats and checks, DetectMultiBackend."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import export
from models.backends import DetectMultiBackend, parse_names
from models.common import Focus, space_to_depth, space_to_depth_slices
from models.spd_export import (SpaceToDepthBlocks, SpaceToDepthFolded, SpaceToDepthOrdered, fold_space_to_depth,
                               has_slice_spd, slice_order_index, space_to_depth_blocks, space_to_depth_ordered,
                               to_export_form)
from models.yolo import DetectionModel
from utils.checkpoints import atomic_save, make_checkpoint
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "yolov5n.pt"
IMAGES = SHARED / "images"


def _random_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics, so fused convs carry real scales and biases."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def _fused(cfg, seed: int = 0) -> DetectionModel:
    torch.manual_seed(seed)
    return _random_bn(DetectionModel(cfg, verbose=False), seed).eval().fuse()


# --- the export form of SPD ---------------------------------------------------------------------------
def test_space_to_depth_orders():
    x = torch.randn(2, 5, 6, 8)
    s = space_to_depth_slices(x)
    assert torch.equal(space_to_depth_ordered(x), s)  # the authors' order, no slices
    assert torch.equal(space_to_depth_blocks(x), s[:, slice_order_index(5)])  # ONNX SpaceToDepth order
    assert not torch.equal(space_to_depth_blocks(x), s)  # the two orders really differ (blocks 1 and 2)


def test_fold_space_to_depth_conv_is_exact():
    conv = torch.nn.Conv2d(4 * 3, 7, 3, 1, 1, bias=True).double()
    x = torch.randn(1, 3, 10, 12, dtype=torch.float64)
    folded = fold_space_to_depth(conv)
    assert folded.kernel_size == (6, 6) and folded.stride == (2, 2) and folded.padding == (2, 2)
    assert (folded(x) - conv(space_to_depth_slices(x))).abs().max() < 1e-12


def test_export_form_matches_slice_form():
    slice_model = _fused("yolov5n-spd.yaml")
    export_model = to_export_form(copy.deepcopy(slice_model))
    assert export_model.spd_export_form == {"folded": 5, "blocks": 2, "ordered": 0}
    assert not has_slice_spd(export_model) and has_slice_spd(slice_model)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        (a, raw_a), (b, raw_b) = slice_model(x), export_model(x)
    assert max((u - v).abs().max().item() for u, v in zip(raw_a, raw_b)) < 1e-5  # logits
    assert (a[..., 4:] - b[..., 4:]).abs().max() < 1e-5  # scores
    assert ((a[..., :4] - b[..., :4]).abs() / a[..., :4].abs().clamp(min=1)).max() < 1e-5  # boxes, relative
    with torch.no_grad():  # in float64 the two forms agree to rounding: the same function
        a64 = copy.deepcopy(slice_model).double()(x.double())[0]
        b64 = copy.deepcopy(export_model).double()(x.double())[0]
    assert (a64 - b64).abs().max() < 1e-9
    assert to_export_form(export_model) is export_model  # idempotent: a second pass changes nothing
    with torch.no_grad():
        assert torch.equal(export_model(x)[0], b)


def test_export_form_fallbacks_stay_exact():
    """SPD read by a depth-wise conv or a residual block cannot be folded/permuted: one exact reshape instead."""
    cfg = {
        "nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": [[10, 13, 16, 30, 33, 23]],
        "backbone": [
            [-1, 1, "Focus", [8, 3]],  # folded
            [-1, 1, "Conv", [8, 3, 1]],
            [-1, 1, "space_to_depth", [1]],  # read by a depth-wise conv: ordered
            [-1, 1, "DWConv", [32, 3, 1]],
            [-1, 1, "space_to_depth", [1]],  # read by a residual bottleneck: ordered
            [-1, 1, "Bottleneck", [128]],
            [-1, 1, "space_to_depth", [1]],  # read through an upsample by a conv: SpaceToDepth + permuted conv
            [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
            [-1, 1, "Conv", [16, 1, 1]],
        ],
        "head": [[[-1], 1, "Detect", ["nc", "anchors"]]],
    }
    slice_model = _fused(cfg, seed=1)
    export_model = to_export_form(copy.deepcopy(slice_model))
    assert export_model.spd_export_form == {"folded": 1, "blocks": 1, "ordered": 2}
    types = [type(m) for m in export_model.model]
    assert types.count(SpaceToDepthOrdered) == 2 and types.count(SpaceToDepthBlocks) == 1
    assert not any(isinstance(m, (space_to_depth, Focus)) for m in export_model.modules())
    x = torch.rand(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        a = copy.deepcopy(slice_model).double()(x)[0]
        b = copy.deepcopy(export_model).double()(x)[0]
    assert (a - b).abs().max() < 1e-9


def test_plain_model_untouched_and_odd_sizes_still_refused():
    m = _fused("yolov5n.yaml")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    to_export_form(m)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    spd = to_export_form(_fused("yolov5n-spd.yaml"))
    assert any(isinstance(l, SpaceToDepthFolded) for l in spd.model)
    with pytest.raises(ValueError, match="even height and width"):
        SpaceToDepthFolded()(torch.zeros(1, 3, 7, 8))


# --- export.py -----------------------------------------------------------------------------------------------
def _spd_checkpoint(folder: Path, cfg: str = "yolov5n-spd.yaml") -> Path:
    torch.manual_seed(0)
    m = _random_bn(DetectionModel(cfg, verbose=False))
    m.names = {i: f"class{i}" for i in range(m.yaml["nc"])}
    f = folder / f"{Path(cfg).stem}.pt"
    atomic_save(make_checkpoint(m, half=False), f)
    return f


@pytest.fixture(scope="module")
def spd_weights(tmp_path_factory) -> Path:
    return _spd_checkpoint(tmp_path_factory.mktemp("spd"))


def _check_spd_exports(files: dict, w: Path) -> None:
    """Every exported file reloads with its metadata and matches PyTorch on a non-square input."""
    x = torch.rand(1, 3, 96, 128)
    ref = DetectMultiBackend(w)(x)
    for f in files.values():
        b = DetectMultiBackend(f)
        assert b.names[3] == "class3" and b.fixed_imgsz is None and b.stride == 32
        d = export.compare(b(x), ref)
        assert d["boxes"] < 0.05 and d["scores"] < 1e-3, (f, d)


def _onnx_ops(f: Path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(f)).graph.node]


def test_spd_onnx_graph_has_no_slices(spd_weights):
    """yolov5n-spd to ONNX: no SPD slicing left; the slice form keeps the authors' slices."""
    w = spd_weights
    files = export.run(weights=w, imgsz=[128], include=["onnx"], dynamic=True, simplify=False)
    ops = _onnx_ops(files["onnx"])
    assert ops.count("Slice") == 0  # nothing sliced at all, so certainly not by space_to_depth
    assert ops.count("SpaceToDepth") == 2  # the two head SPDs; the other five were folded into convs
    _check_spd_exports(files, w)
    f_slice = export.run(weights=w, imgsz=[128], include=["onnx"], spd_form="slice")["onnx"]
    assert _onnx_ops(f_slice).count("Slice") >= 7 * 4  # the authors' form


def test_spd_onnx_simplified_with_onnxslim(spd_weights, tmp_path):
    pytest.importorskip("onnxslim", reason="onnxslim not installed (pip install onnxslim): --simplify branch untested")
    w = Path(shutil.copy(spd_weights, tmp_path / spd_weights.name))
    files = export.run(weights=w, imgsz=[128], include=["onnx"], dynamic=True, simplify=True)
    ops = _onnx_ops(files["onnx"])
    assert ops.count("Slice") == 0 and ops.count("SpaceToDepth") == 2
    _check_spd_exports(files, w)


def test_spd_openvino_export(spd_weights, tmp_path):
    pytest.importorskip("openvino", reason="openvino not installed (pip install openvino): OpenVINO export untested")
    w = Path(shutil.copy(spd_weights, tmp_path / spd_weights.name))
    files = export.run(weights=w, imgsz=[128], include=["openvino"], dynamic=True)
    assert files["openvino"].name == "yolov5n-spd_openvino_model"
    meta = yaml.safe_load((files["openvino"] / "metadata.yaml").read_text())
    assert meta["names"][3] == "class3" and int(meta["stride"]) == 32
    _check_spd_exports(files, w)


@pytest.fixture(scope="module")
def yolov5n_exports(tmp_path_factory):
    """yolov5n.pt exported once to dynamic TorchScript and ONNX (the issue's command, at 256 for speed)."""
    if not WEIGHTS.is_file():
        pytest.skip("official yolov5n.pt not available")
    d = tmp_path_factory.mktemp("yolov5n")
    w = Path(shutil.copy(WEIGHTS, d / "yolov5n.pt"))
    files = export.run(weights=w, imgsz=[256], include=["torchscript", "onnx"], dynamic=True)
    return w, files


def test_dynamic_exports_match_pt(yolov5n_exports):
    w, files = yolov5n_exports
    assert files["torchscript"].suffix == ".torchscript" and files["onnx"].suffix == ".onnx"
    pt = DetectMultiBackend(w)
    x = torch.rand(2, 3, 256, 384)  # another batch and a rectangle: really dynamic
    ref = pt(x)
    for f in files.values():
        b = DetectMultiBackend(f, trust_weights=True)  # our own TorchScript export, vouched for
        assert b.stride == 32 and b.names[0] == "person" and len(b.names) == 80
        assert b.fixed_imgsz is None
        y = b(x)
        assert y.shape == ref.shape
        d = export.compare(y, ref)
        assert d["boxes"] < 0.05 and d["scores"] < 1e-3, (f, d)


def test_detect_with_exports_matches_pt(yolov5n_exports, tmp_path):
    import detect

    w, files = yolov5n_exports
    runs = {}
    for f in [w, *files.values()]:
        runs[f.suffix] = detect.run(weights=f, source=IMAGES, imgsz=(320, 320), project=tmp_path, nosave=True,
                                    verbose=False, trust_weights=True)["results"]
    base = runs[".pt"]
    assert sum(len(d) for _, d in base) > 0
    for suffix, res in runs.items():
        assert [p for p, _ in res] == [p for p, _ in base]
        for (_, d), (_, d0) in zip(res, base):
            assert d.shape == d0.shape, suffix
            assert torch.equal(d[:, 5], d0[:, 5]), suffix  # same classes
            assert (d[:, :4] - d0[:, :4]).abs().max() <= 1, suffix  # boxes within 1 px


def test_fixed_shape_onnx_export(yolov5n_exports, tmp_path, capsys):
    import detect

    w, _ = yolov5n_exports
    w = Path(shutil.copy(w, tmp_path / "fixed.pt"))
    f = export.run(weights=w, imgsz=[160, 192], batch_size=2, include=["onnx"])["onnx"]
    b = DetectMultiBackend(f)
    assert b.fixed_imgsz == (160, 192) and b.batch == 2
    x = torch.rand(3, 3, 160, 192)
    y = b(x)  # a batch of 3 through a batch-2 export: chunked and padded
    assert y.shape[0] == 3 and export.compare(y, DetectMultiBackend(w)(x))["scores"] < 1e-3
    with pytest.raises(UserError, match="fixed-shape export for 160x192"):
        b(torch.rand(1, 3, 192, 192))
    capsys.readouterr()
    out = detect.run(weights=f, source=IMAGES, imgsz=(640, 640), project=tmp_path, nosave=True, verbose=False)
    assert len(out["results"]) == 3
    assert capsys.readouterr().out.count("fixed-shape export") == 1


def test_export_metadata_and_yolov5_names():
    assert parse_names('{"0": "person", "1": "bicycle"}') == {0: "person", 1: "bicycle"}
    assert parse_names("{0: 'person', 1: 'bicycle'}") == {0: "person", 1: "bicycle"}  # YOLOv5's str(dict)
    assert parse_names(["a", "b"]) == {0: "a", 1: "b"}
    assert parse_names("not names") is None


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    w = tmp_path / "model.pt"  # these errors come before the weights are read
    w.write_bytes(b"")
    with pytest.raises(UserError, match="choose from torchscript, onnx, openvino"):
        export.run(weights=w, include=["tflite"])
    with pytest.raises(UserError, match="needs a CUDA device"):
        export.run(weights=w, include=["onnx"], half=True, device="cpu")
    with pytest.raises(UserError, match="not found"):
        export.run(weights=tmp_path / "missing.pt")
    with pytest.raises(SystemExit) as e:
        export.main(["--weights", str(w), "--include", "tflite"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR:")
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(UserError, match="not a readable ONNX model"):
        DetectMultiBackend(bad)
    with pytest.raises(UserError, match="unsupported weights format"):
        DetectMultiBackend(tmp_path / "model.tflite")


def test_export_writes_to_cwd_when_weights_folder_read_only(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    w = ro / "yolov5n-spd.pt"
    w.write_bytes(b"")
    ro.chmod(0o555)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    try:
        assert export.export_stem(w) == out / "yolov5n-spd"
    finally:
        ro.chmod(0o755)
    assert export.export_stem(w) == ro / "yolov5n-spd"


def test_check_input_is_letterboxed_real_image():
    x = export.check_input([320, 320], 32, 2, dynamic=True, image=IMAGES / "bus.jpg")
    assert x.shape == (2, 3, 320, 256) and 0 <= float(x.min()) and float(x.max()) <= 1  # bus.jpg is portrait
    x = export.check_input([320, 320], 32, 1, dynamic=False, image=None)
    assert x.shape == (1, 3, 320, 320)
    with pytest.raises(UserError, match="not a readable image"):
        export.check_input([320, 320], 32, 1, dynamic=False, image=IMAGES / "missing.jpg")
    assert isinstance(export.synthetic_image(), np.ndarray)
