"""Model building blocks, configs and the SPD layer."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.common import Conv, Focus, space_to_depth
from models.yolo import Detect, Model, resolve_cfg
from utils.errors import UserError
from utils.torch_utils import count_flops

PARAMS = {
    "yolov5n": 1_872_157, "yolov5s": 7_235_389, "yolov5m": 21_190_557, "yolov5l": 46_563_709, "yolov5x": 86_749_405,
    "yolov5n-spd": 2_256_157, "yolov5s-spd": 8_771_389, "yolov5m-spd": 24_646_557, "yolov5l-spd": 52_707_709,
    "yolov5x-spd": 96_349_405,
}
# 2 x MACs at 640x640 as count_flops measures them (torch.utils.flop_counter); 64 px x 100 is exact here
GFLOPS = {"yolov5n": 4.4681, "yolov5s": 16.4336, "yolov5m": 48.8724, "yolov5l": 108.9937, "yolov5x": 205.4482,
          "yolov5n-spd": 8.7935, "yolov5s-spd": 33.7351, "yolov5m-spd": 87.8008, "yolov5l-spd": 178.1998,
          "yolov5x-spd": 313.5826}


def test_space_to_depth_channel_order_and_shape():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    y = space_to_depth()(x)
    assert y.shape == (2, 12, 2, 3)
    c = 3
    torch.testing.assert_close(y[:, 0:c], x[..., 0::2, 0::2])  # (row 0, col 0)
    torch.testing.assert_close(y[:, c : 2 * c], x[..., 1::2, 0::2])  # (row 1, col 0)
    torch.testing.assert_close(y[:, 2 * c : 3 * c], x[..., 0::2, 1::2])  # (row 0, col 1)
    torch.testing.assert_close(y[:, 3 * c :], x[..., 1::2, 1::2])  # (row 1, col 1)
    # nothing lost: every input value appears exactly once
    assert torch.equal(y.flatten().sort().values, x.flatten().sort().values)


@pytest.mark.parametrize("shape", [(1, 3, 5, 4), (1, 3, 4, 7)])
def test_space_to_depth_rejects_odd_sizes(shape):
    with pytest.raises(ValueError, match="even height and width"):
        space_to_depth()(torch.zeros(shape))


def test_focus_uses_the_same_order():
    torch.manual_seed(0)
    f = Focus(3, 8, 3).eval()
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(f(x), f.conv(space_to_depth()(x)))


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts_exact(name):
    model = Model(f"{name}.yaml", verbose=False)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert model.stride.tolist() == [8.0, 16.0, 32.0]


@pytest.mark.parametrize("name", sorted(GFLOPS))
def test_gflops_pinned(name):
    model = Model(f"{name}.yaml", verbose=False)
    g = count_flops(model, 64) * (640 / 64) ** 2
    assert g == pytest.approx(GFLOPS[name], abs=5e-4), g


def test_readme_model_table_matches_the_models():
    """The README's Models table states exactly these parameter counts and (rounded) GFLOPs."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = dict((m.group(1), (m.group(2), m.group(3)))
                for m in re.finditer(r"^\| `(yolov5\w+(?:-spd)?)\.yaml` \| \d+ \| ([\d,]+) \| ([\d.]+) \|$", text, re.M))
    assert sorted(rows) == sorted(GFLOPS)
    for name, (params, gflops) in rows.items():
        assert int(params.replace(",", "")) == PARAMS[name] and gflops == f"{GFLOPS[name]:.1f}", name


def test_spd_configs_have_no_strided_layers():
    model = Model("yolov5n-spd.yaml", verbose=False)
    strided = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.stride != (1, 1)]
    assert strided == []
    n_spd = sum(isinstance(m, (space_to_depth, Focus)) for m in model.modules())
    assert n_spd == 7  # Focus stem + 4 backbone + 2 neck


def test_parse_model_every_config_runs_forward():
    x = torch.zeros(1, 3, 64, 96)
    for name in ("yolov5n", "yolov5n-spd"):
        model = Model(f"{name}.yaml", nc=3, verbose=False).eval()
        y, raw = model(x)
        n = 3 * sum((64 // s) * (96 // s) for s in (8, 16, 32))
        assert y.shape == (1, n, 8)
        assert [r.shape[2:4] for r in raw] == [(8, 12), (4, 6), (2, 3)]


def test_bare_name_and_missing_config():
    assert resolve_cfg("yolov5s-spd.yaml").name == "yolov5s-spd.yaml"
    assert resolve_cfg("yolov5s-spd").name == "yolov5s-spd.yaml"
    with pytest.raises(UserError, match="not found"):
        Model("yolov5q.yaml", verbose=False)


def test_config_typo_key_is_clear_error():
    import yaml

    from models.yolo import resolve_cfg as rc

    d = yaml.safe_load(rc("yolov5n.yaml").read_text())
    d["depht_multiple"] = d.pop("depth_multiple")
    with pytest.raises(UserError, match="depht_multiple"):
        Model(d, verbose=False)


def test_fuse_equivalence():
    torch.manual_seed(0)
    model = Model("yolov5n-spd.yaml", verbose=False)
    for m in model.modules():  # non-trivial BN statistics so fusion is really tested
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.rand(1, 3, 128, 96)
    with torch.no_grad():
        a = model(x)[0]
        model.fuse()
        b = model(x)[0]
    assert not any(hasattr(m, "bn") for m in model.modules() if isinstance(m, Conv))
    assert (a - b).abs().max().item() < 1e-4 * max(1.0, a.abs().max().item() / 100)


def test_detect_decode_formula():
    det = Detect(nc=1, anchors=([10, 13, 16, 30, 33, 23],), ch=(4,))
    det.stride = torch.tensor([8.0])
    det.anchors /= 8.0
    det.eval()
    with torch.no_grad():
        det.m[0].weight.zero_()
        det.m[0].bias.zero_()  # all logits 0 -> sigmoid 0.5
        y, _ = det([torch.zeros(1, 4, 2, 3)])
    y = y.view(1, 3, 2, 3, 6)
    # xy = (2 * 0.5 - 0.5 + grid) * stride = (0.5 + grid) * 8 ; wh = (2 * 0.5)^2 * anchor = anchor
    assert y[0, 0, 1, 2, 0].item() == pytest.approx((0.5 + 2) * 8)
    assert y[0, 0, 1, 2, 1].item() == pytest.approx((0.5 + 1) * 8)
    assert y[0, 1, 0, 0, 2:4].tolist() == pytest.approx([16, 30])
