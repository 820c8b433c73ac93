"""Checkpoints and models: the allow-list official YOLOv5 pickles are read with, and building this
project's DetectionModel from any supported checkpoint.

Official YOLOv5 `.pt` files pickle whole model objects; `safe_load` reads them with `torch.load(weights_only=True)`
and an explicit allow-list of the YOLOv5 module classes (mapped onto this project's classes of the same names,
from the block declarations in models/blocks.py); any other global is refused before it can be called.
"""
from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch
import torch.nn as nn

from models.blocks import allow_listed_blocks
from models.yolo import DetectionModel
from utils.checkpoints import FORMAT, load_weights_only, resolve_weights
from utils.names import normalize_names
from utils.errors import UserError


def _official_allow_list() -> list:
    """(class, pickled path) pairs an official YOLOv5 checkpoint may name, and nothing else."""
    models = [(DetectionModel, "models.yolo.Model"), (DetectionModel, "models.yolo.DetectionModel")]
    activations = [nn.SiLU, nn.ReLU, nn.LeakyReLU, nn.Hardswish]  # the ones a config may ask for (models.yolo.ACTIVATIONS)
    containers = [nn.Conv2d, nn.Sequential, nn.ModuleList]
    return models + allow_listed_blocks() + activations + containers + [set, collections.OrderedDict, argparse.Namespace]


def safe_load(path: str | Path) -> dict:
    """torch.load with weights_only=True and the official allow-list; anything else is a UserError."""
    ckpt = load_weights_only(path, _official_allow_list(), allowed="a YOLOv5 model class or tensor type")
    if not isinstance(ckpt, dict):
        raise UserError(f"{Path(path)} does not hold a checkpoint dict (got {type(ckpt).__name__})")
    return ckpt


def _own_format_problem(ckpt: dict, state) -> str:
    """'' when a checkpoint of this project's format has what loading needs, else what is missing."""
    missing = [k for k in ("cfg", "names", "model") if k not in ckpt]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
    if not isinstance(ckpt["cfg"], dict):
        return f"'cfg' must be a model config mapping, got {type(ckpt['cfg']).__name__}"
    if not isinstance(ckpt["names"], (dict, list, tuple)):
        return f"'names' must be a dict or list, got {type(ckpt['names']).__name__}"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "'model' must be a dict of tensors"
    return ""


def read_checkpoint(path: str | Path) -> dict:
    """Normalise an official or own checkpoint to {'cfg', 'names', 'stride', 'state_dict', 'ckpt'}."""
    ckpt = safe_load(path)
    if ckpt.get("format") == FORMAT:
        state = ckpt.get("ema") or ckpt.get("model")
        problem = _own_format_problem(ckpt, state)
        if problem:
            raise UserError(f"{path} is a damaged {FORMAT} file: {problem}")
        try:
            names = normalize_names(ckpt["names"])
        except (TypeError, ValueError, AttributeError):
            raise UserError(f"{path} is a damaged {FORMAT} file: 'names' must map class ids (integers) to names") from None
        return {"cfg": ckpt["cfg"], "names": names, "stride": ckpt.get("stride"),
                "state_dict": state, "ckpt": ckpt, "official": False}
    model = ckpt.get("ema") or ckpt.get("model")
    if not isinstance(model, nn.Module) or not hasattr(model, "yaml"):
        raise UserError(f"{path} is neither a YOLOv5 checkpoint nor one of this project's")
    names = getattr(model, "names", None) or [str(i) for i in range(model.yaml["nc"])]
    return {"cfg": dict(model.yaml), "names": normalize_names(names), "stride": [float(s) for s in model.stride],
            "state_dict": {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}, "ckpt": ckpt, "official": True}


def checkpoint_val_settings(path: str | Path) -> dict:
    """The settings of a training run's own validation ({'batch_size', 'imgsz', 'single_cls'}), {} if none."""
    ckpt = safe_load(path)
    val = ckpt.get("val") if ckpt.get("format") == FORMAT else None
    return dict(val) if isinstance(val, dict) else {}


def load_model(weights: str | Path, device: torch.device | str = "cpu", fuse: bool = True, verbose: bool = False):
    """Build this project's DetectionModel from any supported checkpoint, in eval mode."""
    info = read_checkpoint(resolve_weights(weights))
    try:
        model = DetectionModel(info["cfg"], nc=info["cfg"].get("nc"), verbose=verbose)
    except UserError as e:
        raise UserError(f"{weights}: its model config is invalid: {e}") from None
    except Exception as e:  # a malformed config reaches layer constructors with values they cannot take
        raise UserError(f"{weights}: its model config is malformed ({type(e).__name__}: {str(e)[:160]})") from None
    try:
        model.load_state_dict(info["state_dict"], strict=True)
    except RuntimeError as e:
        raise UserError(f"{weights}: weights do not match their own model config ({str(e).splitlines()[0]})") from None
    model.names = info["names"]
    model = model.float().to(device).eval()
    if fuse:
        model.fuse()
    return model
