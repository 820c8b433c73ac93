"""Exact plain -> SPD weight transfer: stem taps, phase routing, layer map, whole models, convert CLI."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.common import C3, Conv, Focus, space_to_depth, space_to_depth_slices
from models.space_to_depth import PHASES
from models.spd import (
    is_spd_cfg,
    layer_map,
    main,
    pair_layers,
    plain_twin_of,
    rearrange_stem_weight,
    route_input_channels,
    transfer_checkpoint,
    transfer_state_dict,
)
from models.yolo import DetectionModel, load_cfg
from utils.augmentations import letterbox
from models.checkpoints import load_model, safe_load
from utils.errors import UserError
from utils.nms import non_max_suppression

# plain index -> SPD index of the layer holding its weights, for the v6.0 layout (n, s, m, l, x alike)
V6_MAP = {0: 0, 1: 1, 2: 3, 3: 4, 4: 6, 5: 7, 6: 9, 7: 10, 8: 12, 9: 13, 10: 14, 11: 15, 12: 16,
          13: 17, 14: 18, 15: 19, 16: 20, 17: 21, 18: 22, 19: 24, 20: 25, 21: 26, 22: 28, 23: 29, 24: 30}


def _randomise_bn(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BN affine and running stats, so misplaced BN tensors change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)


def test_phase_order_matches_space_to_depth():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = space_to_depth_slices(x)
    for k, (dr, dc) in enumerate(PHASES):
        assert torch.equal(y[0, k], x[0, 0, dr::2, dc::2])


def test_stem_rearrangement_single_conv():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 48)  # image-like input and a kernel at its usual init scale
    w = torch.randn(16, 3, 6, 6) / 108**0.5
    plain = F.conv2d(x, w, stride=2, padding=2)
    spd = F.conv2d(space_to_depth_slices(x), rearrange_stem_weight(w), stride=1, padding=1)
    assert spd.shape == plain.shape == (2, 16, 32, 24)
    assert (plain - spd).abs().max() < 1e-5
    # in float64 the two agree to rounding: the identity is exact, not approximate
    x64, w64 = x.double(), w.double()
    d64 = F.conv2d(x64, w64, stride=2, padding=2)
    d64 -= F.conv2d(space_to_depth_slices(x64), rearrange_stem_weight(w64), padding=1)
    assert d64.abs().max() < 1e-12
    # the tap formula itself: W'[o, k*C + i, u, v] = W[o, i, 2u + dr_k, 2v + dc_k]
    w2 = rearrange_stem_weight(w)
    o, i, u, v = 5, 2, 1, 2
    for k, (dr, dc) in enumerate(PHASES):
        assert w2[o, k * 3 + i, u, v] == w[o, i, 2 * u + dr, 2 * v + dc]

    # the same through the project's modules, BN included
    conv, focus = Conv(3, 16, 6, 2, 2), Focus(3, 16, 3)
    _randomise_bn(conv, 1)
    state = {f"conv.{k}": v for k, v in conv.state_dict().items()}
    state["conv.conv.weight"] = rearrange_stem_weight(state["conv.conv.weight"])
    focus.load_state_dict(state)
    with torch.no_grad():
        assert (conv.eval()(x) - focus.eval()(x)).abs().max() < 1e-5
    with pytest.raises(ValueError):
        rearrange_stem_weight(torch.randn(4, 3, 3, 3))


def test_phase_routing_conv_then_c3():
    torch.manual_seed(1)
    c1, c, c2 = 8, 16, 24
    plain = torch.nn.Sequential(Conv(c1, c, 3, 2), C3(c, c2, 2)).eval()
    spd = torch.nn.Sequential(Conv(c1, c, 3, 1), space_to_depth(), C3(4 * c, c2, 2)).eval()
    _randomise_bn(plain, 2)
    spd[0].load_state_dict(plain[0].state_dict())
    routed = plain[1].state_dict()
    for key in ("cv1.conv.weight", "cv2.conv.weight"):
        routed[key] = route_input_channels(routed[key], torch.arange(c), 4 * c)
        assert routed[key][:, c:].abs().sum() == 0  # phases (1,0), (0,1), (1,1) get zeros
    spd[2].load_state_dict(routed)
    x = torch.randn(1, c1, 32, 32)
    with torch.no_grad():
        a, b = plain(x), spd(x)
        assert a.shape == b.shape == (1, c2, 16, 16)
        assert (a - b).abs().max() < 1e-5
        # routing onto another phase block must break the equivalence (the check above can fail)
        wrong = plain[1].state_dict()
        for key in ("cv1.conv.weight", "cv2.conv.weight"):
            wrong[key] = route_input_channels(wrong[key], torch.arange(c) + c, 4 * c)
        spd[2].load_state_dict(wrong)
        assert (plain(x) - spd(x)).abs().max() > 1e-2


@pytest.mark.parametrize("size", ["n", "s"])
def test_layer_map(size):
    assert layer_map(f"yolov5{size}.yaml", f"yolov5{size}-spd.yaml") == V6_MAP
    kinds = {p.plain: p.kind for p in pair_layers(f"yolov5{size}.yaml", f"yolov5{size}-spd.yaml")}
    assert kinds[0] == "stem"
    assert [i for i, k in kinds.items() if k == "spd"] == [1, 3, 5, 7, 18, 21]
    outs = {p.plain: p.out for p in pair_layers(f"yolov5{size}.yaml", f"yolov5{size}-spd.yaml")}
    assert outs[1] == 2 and outs[21] == 27 and outs[24] == 30


def test_not_twins_is_a_user_error():
    plain, spd = load_cfg("yolov5n.yaml"), load_cfg("yolov5n-spd.yaml")
    with pytest.raises(UserError, match="width_multiple"):
        layer_map(plain, load_cfg("yolov5s-spd.yaml"))
    with pytest.raises(UserError, match="nc"):
        layer_map(plain, {**spd, "nc": 3})
    rewired = load_cfg("yolov5n-spd.yaml")
    rewired["head"][2] = [[-1, 8], 1, "Concat", [1]]  # the space_to_depth instead of the C3 after it
    with pytest.raises(UserError, match="read different layers"):
        layer_map(plain, rewired)
    with pytest.raises(UserError, match="extra layers|not twins"):
        layer_map(load_cfg("yolov5n.yaml"), {**spd, "head": spd["head"] + [[-1, 1, "nn.Identity", []]]})


def test_plain_twin_and_is_spd():
    for size in "nsmlx":
        twin, plain = plain_twin_of(f"yolov5{size}-spd.yaml"), load_cfg(f"yolov5{size}.yaml")
        assert twin["backbone"] == plain["backbone"] and twin["head"] == plain["head"]
        assert is_spd_cfg(f"yolov5{size}-spd.yaml") and not is_spd_cfg(plain)


def _letterboxed(path, size=640) -> torch.Tensor:
    im = cv2.imread(str(path))
    im = letterbox(im, size, stride=32, auto=True)[0]
    im = np.ascontiguousarray(im[:, :, ::-1].transpose(2, 0, 1))
    return torch.from_numpy(im).float()[None] / 255


@pytest.fixture(scope="module")
def official_pair(yolov5n_weights):
    plain = load_model(yolov5n_weights, fuse=False)
    state, names = transfer_checkpoint(yolov5n_weights, "yolov5n-spd.yaml")
    spd = DetectionModel("yolov5n-spd.yaml", verbose=False)
    spd.load_state_dict(state, strict=True)
    spd.names = names
    return plain, spd.eval()


@torch.no_grad()
def test_official_yolov5n_equivalence(official_pair, images_dir):
    plain, spd = official_pair
    for name in ("bus.jpg", "zidane.jpg", "small-vehicles1.jpeg"):
        x = _letterboxed(images_dir / name)
        (ya, ra), (yb, rb) = plain(x), spd(x)
        assert max((a - b).abs().max() for a, b in zip(ra, rb)) < 1e-3  # raw logits
        assert (ya[..., 4:] - yb[..., 4:]).abs().max() < 1e-4  # scores
        da, db = non_max_suppression(ya)[0], non_max_suppression(yb)[0]
        assert len(da) >= 2 and len(da) == len(db)
        assert (da[:, :4] - db[:, :4]).abs().max() < 0.5
        assert (da[:, 4] - db[:, 4]).abs().max() < 1e-3
        assert torch.equal(da[:, 5], db[:, 5])
    assert spd.names == plain.names


@pytest.mark.parametrize("size,img", [("s", 128), ("m", 64), ("l", 64)])
@torch.no_grad()
def test_random_plain_weights_transfer(size, img):
    torch.manual_seed(3)
    plain = DetectionModel(f"yolov5{size}.yaml", verbose=False)
    _randomise_bn(plain, 4)
    plain.eval()
    state = transfer_state_dict(plain.state_dict(), plain.yaml, f"yolov5{size}-spd.yaml")
    spd = DetectionModel(f"yolov5{size}-spd.yaml", verbose=False)
    assert set(state) == set(spd.state_dict())  # every SPD tensor comes from the plain model
    spd.load_state_dict(state, strict=True)
    spd.eval()
    x = torch.rand(2, 3, img, img)
    (ya, ra), (yb, rb) = plain(x), spd(x)
    for a, b in zip(ra, rb):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max())
    assert (ya - yb).abs().max() <= 1e-3


def test_new_nc_keeps_everything_but_detect_outputs(yolov5n_weights, capsys):
    state, names = transfer_checkpoint(yolov5n_weights, "yolov5n-spd.yaml", nc=3)
    assert "343/349" in capsys.readouterr().out
    model = DetectionModel("yolov5n-spd.yaml", nc=3, verbose=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert sorted(missing) == sorted(f"model.30.m.{k}.{p}" for k in range(3) for p in ("weight", "bias"))
    assert not unexpected
    assert len(names) == 80  # the checkpoint's names; the caller supplies the new ones


@torch.no_grad()
def test_convert_cli(yolov5n_weights, official_pair, tmp_path, capsys):
    out = tmp_path / "yolov5n-spd.pt"
    main(["convert", "--weights", str(yolov5n_weights), "--cfg", "yolov5n-spd.yaml", "--out", str(out)])
    text = capsys.readouterr().out
    assert "Transferred 349/349 plain tensors exactly into yolov5n-spd.yaml" in text and "max abs diff" in text
    assert safe_load(out)["format"] == "yolov5-spd-checkpoint"
    model = load_model(out, fuse=True)  # what detect/val do
    plain, _ = official_pair
    x = torch.rand(1, 3, 256, 320)
    assert (model(x)[0] - plain(x)[0]).abs().max() < 1e-2
    assert model.names == plain.names
    with pytest.raises(UserError, match="already an SPD"):
        main(["convert", "--weights", str(out), "--cfg", "yolov5n-spd.yaml", "--out", str(tmp_path / "x.pt")])
    with pytest.raises(UserError, match="not an SPD config"):
        main(["convert", "--weights", str(yolov5n_weights), "--cfg", "yolov5n.yaml", "--out", str(tmp_path / "x.pt")])
    assert not (tmp_path / "x.pt").exists()
