"""The small-object family: SPDConv, the -spdconv/-spdlite/-p2/-p2-spdconv configs, exact transfer, export, README."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.common import Conv, SPDConv, space_to_depth_slices
from models.spd import (
    compare_models,
    level_outputs,
    pair_family,
    spdconv_kernel,
    transfer_checkpoint,
    transfer_family_state_dict,
    wants_transfer,
)
from models.spd_export import has_slice_spd, to_export_form
from models.yolo import DetectionModel
from tests.conftest import ROOT, shared_path
from tests.test_spd_transfer import _letterboxed, _randomise_bn
from models.checkpoints import load_model
from utils.errors import UserError
from utils.nms import non_max_suppression
from utils.torch_utils import model_info

SIZES = "nsmlx"
FAMILIES = ("spdconv", "spdlite", "p2", "p2-spdconv")
CONFIGS = [f"yolov5{s}-{f}" for s in SIZES for f in FAMILIES]
SPD_FAMILIES = ("spdconv", "spdlite", "p2-spdconv")


# --- the identity ------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,p", [(3, 1), (6, 2), (4, 1), (5, 2)])
def test_stride2_conv_is_spdconv_k3_exactly(k, p):
    torch.manual_seed(k)
    x = torch.rand(2, 3, 16, 12, dtype=torch.float64)
    w = torch.randn(5, 3, k, k, dtype=torch.float64)
    w3, exact = spdconv_kernel(w, p, 3)
    assert exact and w3.shape == (5, 12, 3, 3)
    plain = F.conv2d(x, w, stride=2, padding=p)
    spd = F.conv2d(space_to_depth_slices(x), w3, padding=1)
    assert plain.shape == spd.shape == (2, 5, 8, 6)
    assert (plain - spd).abs().max() < 1e-12
    # every plain tap lands once: a 3x3 fills 4 of 9 taps per phase, the 6x6 stem all 36
    assert (w3 != 0).sum() == w.numel()


def test_spdlite_kernel_is_nearest_not_exact():
    torch.manual_seed(0)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    w1, exact = spdconv_kernel(w, 1, 1)
    assert not exact and w1.shape == (4, 8, 1, 1)
    # the kernel's sum (its response to a constant image) is kept, so only edges/texture differ
    torch.testing.assert_close(w1.sum((1, 2, 3)), w.sum((1, 2, 3)))
    x = torch.ones(1, 2, 8, 8, dtype=torch.float64)
    inner = F.conv2d(x, w, stride=2, padding=1)[..., 1:, 1:]  # away from the zero padding
    torch.testing.assert_close(F.conv2d(space_to_depth_slices(x), w1)[..., 1:, 1:], inner)
    x = torch.rand(1, 2, 8, 8, dtype=torch.float64)
    assert (F.conv2d(x, w, stride=2, padding=1) - F.conv2d(space_to_depth_slices(x), w1)).abs().max() > 1e-3


def test_spdconv_block_with_bn_matches_conv_block():
    torch.manual_seed(1)
    conv, spd = Conv(8, 16, 3, 2), SPDConv(8, 16, 3)
    _randomise_bn(conv, 2)
    state = {f"conv.{k}": v for k, v in conv.state_dict().items()}
    state["conv.conv.weight"] = spdconv_kernel(state["conv.conv.weight"], 1, 3)[0]
    spd.load_state_dict(state)
    x = torch.rand(2, 8, 20, 16)
    with torch.no_grad():
        assert (conv.eval()(x) - spd.eval()(x)).abs().max() < 1e-5


# --- configs -------------------------------------------------------------------------------------------
def _readme_table() -> dict[str, tuple[int, int, float]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### The small-object family", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(yolov5\w-[\w-]+)\.yaml` \| (\d+) \| ([\d,]+) \| ([\d.]+) \|", section, re.M)
    return {name: (int(lay), int(par.replace(",", "")), float(g)) for name, lay, par, g in rows}


def test_readme_lists_every_new_config():
    assert sorted(_readme_table()) == sorted(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_and_matches_readme(name):
    torch.manual_seed(0)
    model = DetectionModel(f"{name}.yaml", verbose=False)
    layers, params, _, gflops = model_info(model)
    assert (layers, params, round(gflops, 1)) == _readme_table()[name]
    strides = [4.0, 8.0, 16.0, 32.0] if "p2" in name else [8.0, 16.0, 32.0]
    assert model.stride.tolist() == strides
    assert len(model.yaml["backbone"]) + len(model.yaml["head"]) == (29 if "p2" in name else 25)
    if "spd" in name:  # all seven stride-2 convs became SPDConv, none is left strided
        assert sum(isinstance(m, SPDConv) for m in model.modules()) == 7
        assert not [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.stride != (1, 1)]
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 64, 96))[0]
    assert out.shape[1] == 3 * sum((64 // s) * (96 // s) for s in strides)


@pytest.mark.parametrize("size", SIZES)
def test_spdlite_costs_at_most_plain(size):
    _, p_plain, _, g_plain = model_info(DetectionModel(f"yolov5{size}.yaml", verbose=False))
    _, p_lite, _, g_lite = model_info(DetectionModel(f"yolov5{size}-spdlite.yaml", verbose=False))
    assert g_lite <= g_plain and p_lite <= p_plain


# --- transfer ------------------------------------------------------------------------------------------
def test_wants_transfer_and_pairing_errors():
    assert wants_transfer("yolov5n.yaml", "yolov5n-spdconv.yaml") and wants_transfer("yolov5n.yaml", "yolov5n-p2.yaml")
    assert wants_transfer("yolov5n.yaml", "yolov5n-spd.yaml") and wants_transfer("yolov5n-p2.yaml", "yolov5n-p2-spdconv.yaml")
    assert not wants_transfer("yolov5n.yaml", "yolov5s.yaml") and not wants_transfer("yolov5n-spdconv.yaml", "yolov5n-p2-spdconv.yaml")
    kinds, level = pair_family("yolov5n.yaml", "yolov5n-p2-spdconv.yaml")
    assert [i for i, k in enumerate(kinds) if k == "spdconv"] == [0, 1, 3, 5, 7, 18, 21] and level == {0: 1, 1: 2, 2: 3}
    with pytest.raises(UserError, match="width_multiple differs"):
        pair_family("yolov5s.yaml", "yolov5n-spdconv.yaml")
    from models.yolo import load_cfg

    bad = load_cfg("yolov5n-spdconv.yaml")
    bad["backbone"][3] = [-1, 1, "SPDConv", [192, 3]]  # a wider SPDConv has no plain twin
    with pytest.raises(UserError, match="not twins: plain layer 3"):
        pair_family("yolov5n.yaml", bad)


def _plain(size: str, seed: int) -> DetectionModel:
    torch.manual_seed(seed)
    m = DetectionModel(f"yolov5{size}.yaml", verbose=False)
    _randomise_bn(m, seed + 1)
    return m.eval()


@pytest.mark.parametrize("size,img", [("s", 128), ("m", 64), ("l", 64)])
@torch.no_grad()
def test_random_plain_weights_transfer_exactly(size, img):
    plain = _plain(size, 3)
    x = torch.rand(2, 3, img, img)
    ref = level_outputs(plain, x)
    for fam in ("spdconv", "p2", "p2-spdconv"):
        state, exact, new = transfer_family_state_dict(plain.state_dict(), plain.yaml, f"yolov5{size}-{fam}.yaml")
        torch.manual_seed(9)
        model = DetectionModel(f"yolov5{size}-{fam}.yaml", verbose=False)
        fresh = copy.deepcopy(model.state_dict())
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert exact and not unexpected
        if "p2" in fam:  # the P2 stage and its output conv keep YOLOv5's initialisation
            assert new == [24, 27] and {k.split(".")[1] for k in missing} == {"24", "27", "28"}
            assert all(torch.equal(model.state_dict()[k], fresh[k]) for k in missing)
            assert all(k.startswith("model.28.m.0.") or not k.startswith("model.28.") for k in missing)
        else:
            assert not missing and not new
        got = level_outputs(model.eval(), x)
        for s, y in ref.items():
            assert (y - got[s]).abs().max() <= 1e-3 * max(1.0, float(y.abs().max())), (fam, s)


@torch.no_grad()
def test_spdlite_transfer_is_approximate_and_says_so(yolov5n_weights, capsys):
    state, _ = transfer_checkpoint(yolov5n_weights, "yolov5n-spdlite.yaml")
    assert "APPROXIMATELY" in capsys.readouterr().out
    model = DetectionModel("yolov5n-spdlite.yaml", verbose=False)
    model.load_state_dict(state, strict=True)
    diff = compare_models(load_model(yolov5n_weights, fuse=False), model)
    assert diff > 1.0  # far from exact: the log's warning is not a formality


@pytest.fixture(scope="module")
def official(yolov5n_weights):
    return load_model(yolov5n_weights, fuse=False)


@pytest.mark.parametrize("cfg", ["yolov5n-spdconv.yaml", "yolov5n-p2-spdconv.yaml", "yolov5n-p2.yaml"])
@torch.no_grad()
def test_official_yolov5n_detections_reproduced(cfg, official, yolov5n_weights, images_dir, capsys):
    state, names = transfer_checkpoint(yolov5n_weights, cfg)
    assert "exactly" in capsys.readouterr().out
    torch.manual_seed(0)
    model = DetectionModel(cfg, verbose=False)
    model.load_state_dict(state, strict="p2" not in cfg)
    model.eval()
    for name in ("bus.jpg", "zidane.jpg", "small-vehicles1.jpeg"):
        x = _letterboxed(images_dir / name)
        la, lb = level_outputs(official, x), level_outputs(model, x)
        assert set(la) <= set(lb) and len(lb) == len(la) + ("p2" in cfg)
        ya = torch.cat([la[s] for s in sorted(la)], 1)
        yb = torch.cat([lb[s] for s in sorted(la)], 1)  # the three shared levels
        da, db = non_max_suppression(ya)[0], non_max_suppression(yb)[0]
        assert len(da) >= 2 and len(da) == len(db)
        assert (da[:, :4] - db[:, :4]).abs().max() < 0.5
        assert (da[:, 4] - db[:, 4]).abs().max() < 1e-3
        assert torch.equal(da[:, 5], db[:, 5])


@pytest.mark.slow
def test_val_coco128_same_map_for_spdconv(yolov5n_weights, tmp_path):
    import val
    from models.spd import convert

    data = shared_path("data", "coco128", "coco128.yaml")
    w = convert(yolov5n_weights, "yolov5n-spdconv.yaml", tmp_path / "yolov5n-spdconv.pt")
    maps = [val.run(data, weights=x, batch_size=16, imgsz=640, workers=0, plots=False, half=False,
                    project=tmp_path, name="v").map for x in (yolov5n_weights, w)]
    assert maps[0] > 0.2 and abs(maps[0] - maps[1]) <= 0.001, maps


# --- export ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [c for c in CONFIGS if c.split("-", 1)[1] in SPD_FAMILIES])
@torch.no_grad()
def test_export_form_is_slice_free_and_equal(name):
    torch.manual_seed(0)
    model = DetectionModel(f"{name}.yaml", verbose=False)
    _randomise_bn(model, 5)
    model.eval().fuse()
    x = torch.rand(1, 3, 64, 64)
    ref = model(x)[0]
    ex = to_export_form(copy.deepcopy(model))
    assert has_slice_spd(model) and not has_slice_spd(ex) and ex.spd_export_form["folded"] == 7
    assert (ex(x)[0] - ref).abs().max() <= 1e-3 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("fam", SPD_FAMILIES)
def test_onnx_export_has_no_slice(fam, tmp_path):
    onnx = pytest.importorskip("onnx")
    import export
    from utils.checkpoints import atomic_save, make_checkpoint

    torch.manual_seed(0)
    m = DetectionModel(f"yolov5n-{fam}.yaml", verbose=False)
    m.names = {i: str(i) for i in range(80)}
    atomic_save(make_checkpoint(m, half=False), tmp_path / "m.pt")
    f = export.run(weights=tmp_path / "m.pt", imgsz=[128], include=["onnx"])["onnx"]
    ops = [n.op_type for n in onnx.load(str(f)).graph.node]
    assert ops.count("Slice") == 0 and ops.count("SpaceToDepth") == 0  # all seven folded into convs


# --- the user's path: train, val, detect, export --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("fam", FAMILIES)
def test_train_val_detect_export_from_coco_weights(fam, yolov5n_weights, tmp_path, capsys):
    import detect
    import export
    import train
    import val

    coco8 = shared_path("data", "coco8", "coco8.yaml")
    train.main(["--data", str(coco8), "--cfg", f"yolov5n-{fam}.yaml", "--weights", str(yolov5n_weights), "--epochs", "1",
                "--img", "128", "--batch", "4", "--workers", "0", "--device", "cpu", "--noplots",
                "--project", str(tmp_path), "--name", "r"])
    log = capsys.readouterr().out
    line = [ln for ln in log.splitlines() if ln.startswith("Transferred ")]  # one transfer line, as for every path
    assert len(line) == 1 and f"from yolov5n.pt into yolov5n-{fam}.yaml" in line[0]
    assert line[0].split(" tensors ")[1].startswith("approximately" if fam == "spdlite" else "exactly")
    best = tmp_path / "r" / "weights" / "best.pt"
    metrics = val.run(coco8, weights=best, imgsz=128, batch_size=4, workers=0, project=tmp_path, plots=False)
    assert 0 <= metrics.map <= 1
    out = detect.run(weights=best, source=shared_path("images", "bus.jpg"), imgsz=[128], project=tmp_path,
                     nosave=True, verbose=False)
    assert len(out["results"]) == 1
    f = export.run(weights=best, imgsz=[128], include=["onnx"])["onnx"]
    assert Path(f).is_file()


def test_pickled_spdconv_model_loads_with_weights_only(tmp_path):
    """A YOLOv5-style pickle (whole model objects) of an SPDConv model passes the checkpoint allow-list."""
    from models.checkpoints import read_checkpoint

    torch.manual_seed(0)
    m = DetectionModel("yolov5n-p2-spdconv.yaml", verbose=False)
    torch.save({"model": m, "epoch": -1}, tmp_path / "pickled.pt")
    info = read_checkpoint(tmp_path / "pickled.pt")
    assert info["official"] and info["state_dict"].keys() == m.state_dict().keys()
    assert torch.equal(info["state_dict"]["model.0.conv.conv.weight"], m.state_dict()["model.0.conv.conv.weight"])
