"""Classifier checkpoints: plain dicts of tensors and Python values, so `torch.load(weights_only=True)`
reads them and a file that tries to run code on load is refused."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn

from models.resnet import MODEL_NAMES, ResNet, build_model, transfer_weights
from utils.checkpoints import load_weights_only
from utils.errors import UserError

FORMAT = "yolov5-spd-classifier"


def plain(value):
    """Args and values reduced to str/int/float/bool/None/list/dict so weights_only loading accepts them."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def make_checkpoint(
    model: ResNet,
    names: list[str],
    imgsz: int,
    epoch: int,
    best_fitness: float,
    optimizer: torch.optim.Optimizer | None = None,
    opt: dict | None = None,
    ema_updates: int = 0,
) -> dict:
    """Everything needed to rebuild, evaluate and resume a classifier, as plain data."""
    return {
        "format": FORMAT,
        **model.cfg,  # model, nc, stem, spd_shortcut, dropout, stages
        "names": list(names),
        "imgsz": int(imgsz),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "epoch": int(epoch),
        "best_fitness": float(best_fitness),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "ema_updates": int(ema_updates),
        "opt": plain(opt or {}),
        "date": datetime.now().isoformat(timespec="seconds"),
        "torch": str(torch.__version__),
    }


def read_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True; missing, corrupt, unsafe or foreign files are a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    ckpt = load_weights_only(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or ckpt.get("model") not in MODEL_NAMES:
        raise UserError(
            f"{path} is not a classifier checkpoint from classify/train.py "
            f"(expected a dict with 'model' in {MODEL_NAMES} and 'state_dict')"
        )
    return ckpt


def model_from_checkpoint(ckpt: dict) -> ResNet:
    """Rebuild the architecture recorded in the checkpoint and load its weights (strictly)."""
    stem = ckpt.get("stem", "small")
    w = ckpt["state_dict"].get("stem.0.conv.weight") if isinstance(ckpt["state_dict"], dict) else None
    if stem == "small" and isinstance(w, torch.Tensor) and w.dim() == 4 and w.shape[1] == 3 and w.shape[-1] == 3:
        stem = "plain-small"  # written before -spd models got an SPD small stem: keep the architecture it holds
    model = build_model(
        ckpt["model"],
        int(ckpt["nc"]),
        stem=stem,
        spd_shortcut=bool(ckpt.get("spd_shortcut", True)),
        dropout=float(ckpt.get("dropout", 0.0)),
        stages=int(ckpt.get("stages", 4)),
    )
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not fit a {ckpt['model']} model: {str(e).splitlines()[0]}") from None
    return model


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[ResNet, dict]:
    """(model in eval mode on device, checkpoint dict) from a classify/train.py checkpoint."""
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt).to(device).eval()
    return model, ckpt


def load_pretrained(model: nn.Module, source: str) -> str:
    """Initialise from our checkpoint, a torchvision ResNet state dict file, or 'torchvision' (ImageNet
    weights through torchvision's download cache). Returns a one-line summary of what was transferred."""
    if source == "torchvision":
        arch = model.cfg["model"].replace("-spd", "")
        try:
            from torchvision.models import get_model_weights

            weights = get_model_weights(arch).DEFAULT
            state = weights.get_state_dict(progress=True)
        except Exception as e:  # offline, proxy, missing cache: one clear line
            raise UserError(
                f"could not get torchvision's ImageNet weights for {arch} ({type(e).__name__}); "
                "download them elsewhere and pass the .pth file to --pretrained"
            ) from None
        label = f"torchvision {arch} {weights.name}"
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"--pretrained file not found: {source}")
        state = load_weights_only(path, what="weights file")
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise UserError(f"{path} holds no state dict")
        label = str(path)
    loaded, total = transfer_weights(model, state)
    if loaded == 0:
        raise UserError(f"--pretrained {source}: no tensor fits a {model.cfg['model']} model")
    return f"pretrained: transferred {loaded}/{total} tensors from {label}"
