"""Block declarations (models/blocks.py): the config parser's, SPD transfer's, export rewrite's and checkpoint
allow-list's tables come from one declaration per block; and `activation:` reaches every block explicitly."""
from __future__ import annotations

import argparse
import collections
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from models import blocks, checkpoints
from models.common import C3, SPPF, Bottleneck, Conv, DWConv, Focus, SPDConv, make_act
from models.spd import transfer_state_dict
from models.spd_export import _layer_readers
from models.yolo import Detect, DetectionModel, load_cfg, parse_model
from utils.errors import UserError

MODELS = Path(__file__).resolve().parents[1] / "models"

# The tables as they were written out by hand before the declarations: the derived ones must equal them.
OLD_INPUT_READERS = {"Conv": ("conv.weight",), "C3": ("cv1.conv.weight", "cv2.conv.weight"),
                     "SPP": ("cv1.conv.weight",), "SPPF": ("cv1.conv.weight",)}
OLD_PASS_THROUGH = {"nn.Upsample", "nn.MaxPool2d", "nn.Identity"}
OLD_OUT_WEIGHT = {"Conv": "conv.weight", "DWConv": "conv.weight", "C3": "cv3.conv.weight", "SPP": "cv2.conv.weight",
                  "SPPF": "cv2.conv.weight", "Bottleneck": "cv2.conv.weight", "Focus": "conv.conv.weight",
                  "SPDConv": "conv.conv.weight", "nn.BatchNorm2d": "weight"}
OLD_MODULES = {"Conv", "DWConv", "Bottleneck", "C3", "SPP", "SPPF", "Focus", "SPDConv", "Concat", "space_to_depth",
               "Detect", "nn.Upsample", "nn.BatchNorm2d", "nn.MaxPool2d", "nn.Identity"}
OLD_CONV_LIKE = {"Conv", "DWConv", "Bottleneck", "C3", "SPP", "SPPF", "Focus", "SPDConv"}


def _allow_entries() -> set:
    return {(e[0], e[1]) if isinstance(e, tuple) else e for e in checkpoints._official_allow_list()}


def test_derived_tables_equal_the_hand_written_ones():
    assert set(blocks.config_modules()) == OLD_MODULES
    assert {c.__name__ for c in blocks.conv_like()} == OLD_CONV_LIKE
    assert blocks.transfer_input_readers() == OLD_INPUT_READERS
    assert blocks.out_weights() == OLD_OUT_WEIGHT
    assert blocks.pass_through() == OLD_PASS_THROUGH
    common = {(cls, f"models.common.{cls.__name__}") for name, cls in blocks.config_modules().items()
              if cls.__module__ == "models.common"}
    assert len(common) == 10
    expected = common | {(DetectionModel, "models.yolo.Model"), (DetectionModel, "models.yolo.DetectionModel"),
                         (Detect, "models.yolo.Detect")} | {
        nn.Conv2d, nn.BatchNorm2d, nn.SiLU, nn.ReLU, nn.LeakyReLU, nn.Hardswish, nn.Identity, nn.MaxPool2d,
        nn.Upsample, nn.Sequential, nn.ModuleList, set, collections.OrderedDict, argparse.Namespace}
    assert _allow_entries() == expected


def test_every_block_a_config_names_is_declared():
    used = set()
    for cfg in MODELS.glob("*.yaml"):
        d = yaml.safe_load(cfg.read_text())
        used |= {row[2] for row in d["backbone"] + d["head"]}
    assert used and used <= set(blocks.config_modules())


def test_export_readers_follow_the_declarations():
    conv, c3, sppf = Conv(8, 16, 3), C3(8, 16), SPPF(8, 16)
    assert _layer_readers(conv, 0) == [(conv, "conv")]
    assert _layer_readers(c3, 0) == [(c3.cv1, "conv"), (c3.cv2, "conv")]
    assert _layer_readers(sppf, 0) == [(sppf.cv1, "conv")]
    assert _layer_readers(Bottleneck(8, 8, shortcut=True), 0) is None  # the residual add reads the input too
    b = Bottleneck(8, 16)
    assert _layer_readers(b, 0) == [(b.cv1, "conv")]
    assert _layer_readers(DWConv(8, 16), 0) is None  # grouped
    assert _layer_readers(Focus(8, 16), 0) is None and _layer_readers(SPDConv(8, 16), 0) is None
    det = Detect(80, [[10, 13, 16, 30, 33, 23]] * 2, (8, 16))
    assert _layer_readers(det, 1) == [(det.m, "1")]
    seq = nn.Sequential(Conv(8, 8), Conv(8, 8))
    assert _layer_readers(seq, 0) == [(seq[0], "conv")]


class _Doubler(nn.Module):
    """A block declared only once (below): two convs read its input, their outputs are concatenated."""

    def __init__(self, c1: int, c2: int, act=True):
        super().__init__()
        self.a = Conv(c1, c2 // 2, 1, act=act)
        self.b = Conv(c1, c2 - c2 // 2, 3, act=act)
        self.out = Conv(c2, c2, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat((self.a(x), self.b(x)), 1))


@pytest.fixture
def doubler():
    blocks.declare(blocks.CONV, input_convs=("a.conv", "b.conv"), out_weight="out.conv.weight")(_Doubler)
    yield _Doubler
    blocks.undeclare("_Doubler")


def _doubler_cfg(spd: bool) -> dict:
    down = [[-1, 1, "Conv", [16, 3, 1]], [-1, 1, "space_to_depth", [1]]] if spd else [[-1, 1, "Conv", [16, 3, 2]]]
    return {"nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": [[10, 13, 16, 30, 33, 23]],
            "backbone": [[-1, 1, "Conv", [16, 3, 2]], *down, [-1, 1, "_Doubler", [32]]],
            "head": [[[-1], 1, "Detect", ["nc", "anchors"]]], "yaml_file": f"doubler{'-spd' if spd else ''}.yaml"}


def test_a_block_declared_once_reaches_every_table(doubler, tmp_path):
    assert blocks.config_modules()["_Doubler"] is doubler and doubler in blocks.conv_like()
    assert blocks.transfer_input_readers()["_Doubler"] == ("a.conv.weight", "b.conv.weight")
    assert blocks.out_weights()["_Doubler"] == "out.conv.weight"
    assert (doubler, f"{__name__}._Doubler") in _allow_entries()
    # the parser builds it with the config's width, and the activation
    layers, _ = parse_model(dict(_doubler_cfg(False), activation="nn.ReLU()"), ch=[3], verbose=False)
    assert isinstance(layers[2], doubler) and layers[2].out.conv.out_channels == 32
    assert not any(isinstance(m, nn.SiLU) for m in layers.modules())
    # the SPD transfer routes its input convs: the SPD twin computes the plain function
    plain = DetectionModel(_doubler_cfg(False), verbose=False).eval()
    state = transfer_state_dict(plain.state_dict(), _doubler_cfg(False), _doubler_cfg(True))
    spd = DetectionModel(_doubler_cfg(True), verbose=False).eval()
    spd.load_state_dict(state)
    x = torch.rand(1, 3, 64, 64)
    assert (plain(x)[0] - spd(x)[0]).abs().max() < 1e-4
    # an official-style pickle of a model holding it loads through the allow-list
    path = tmp_path / "doubler.pt"
    torch.save({"model": plain}, path)
    assert isinstance(checkpoints.safe_load(path)["model"].model[2], doubler)


def test_a_dropped_declaration_leaves_every_table(doubler, tmp_path):
    path = tmp_path / "doubler.pt"
    torch.save({"model": DetectionModel(_doubler_cfg(False), verbose=False)}, path)
    blocks.undeclare("_Doubler")
    assert "_Doubler" not in blocks.config_modules() and "_Doubler" not in blocks.out_weights()
    assert _layer_readers(doubler(8, 16), 0) is None
    with pytest.raises(UserError, match="unknown module '_Doubler'"):
        parse_model(_doubler_cfg(False), ch=[3], verbose=False)
    with pytest.raises(UserError, match="_Doubler"):
        checkpoints.safe_load(path)


def test_a_block_name_is_declared_once():
    with pytest.raises(ValueError, match="declared twice"):
        blocks.declare(blocks.CONV, "Conv")(type("Conv", (nn.Module,), {}))
    with pytest.raises(ValueError, match="unknown block kind"):
        blocks.declare("convolution")


# --- activation: an explicit argument, never a class attribute -------------------------------------------
def _act_types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, (nn.SiLU, nn.ReLU, nn.LeakyReLU, nn.Hardswish))}


@pytest.mark.parametrize("cfg", ["yolov5n-spd.yaml", "yolov5n-spdconv.yaml"])
def test_relu_config_has_no_silu_and_the_next_model_is_untouched(cfg):
    default_act = Conv.default_act
    relu = DetectionModel(dict(load_cfg(cfg), activation="nn.ReLU()"), verbose=False)
    assert _act_types(relu) == {nn.ReLU}
    acts = [m.act for m in relu.modules() if isinstance(m, Conv)]
    assert len({id(a) for a in acts}) == len(acts)  # one instance per layer, as timm's act_layer gives
    assert Conv.default_act is default_act and isinstance(Conv.default_act, nn.SiLU)
    assert _act_types(DetectionModel(cfg, verbose=False)) == {nn.SiLU}
    assert isinstance(Conv(3, 8).act, nn.SiLU)


def test_blocks_take_act_layer_explicitly():
    assert _act_types(C3(8, 16, n=2, act=nn.Hardswish)) == {nn.Hardswish}
    assert _act_types(Focus(3, 8, act=nn.ReLU)) == {nn.ReLU} and _act_types(SPDConv(3, 8, act=nn.ReLU)) == {nn.ReLU}
    assert isinstance(Conv(3, 8, act=False).act, nn.Identity)
    leaky = nn.LeakyReLU(0.2)
    assert Conv(3, 8, act=leaky).act is leaky and isinstance(make_act(lambda: nn.LeakyReLU(0.1)), nn.LeakyReLU)
    with pytest.raises(UserError, match="unknown activation"):
        DetectionModel(dict(load_cfg("yolov5n.yaml"), activation="nn.GELU()"), verbose=False)


def test_pickled_blocks_keep_their_yolov5_paths():
    # official checkpoints name these exact paths; the declarations must not move them
    for name in ("Conv", "C3", "SPPF", "Focus", "Concat", "space_to_depth"):
        assert blocks.config_modules()[name].__module__ == "models.common"
    assert (Detect, "models.yolo.Detect") in _allow_entries() and Detect.__module__ == "models.yolo"
