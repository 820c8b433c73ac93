"""torch.hub entry points, from a local checkout (no network needed):

    model = torch.hub.load('.', 'yolov5s_spd', source='local', pretrained=False)   # a new SPD model
    model = torch.hub.load('.', 'custom', path='best.pt', source='local')          # any trained/exported weights
    results = model('../shared/images/zidane.jpg')
    results.print(); results.pandas().xyxy[0]
"""
from __future__ import annotations

import sys
from pathlib import Path

dependencies = ["torch", "torchvision", "numpy", "cv2", "yaml", "PIL"]

_ROOT = Path(__file__).resolve().parent
if str(_ROOT) not in sys.path:
    sys.path.append(str(_ROOT))


def _device(device):
    from utils.torch_utils import select_device

    return select_device("" if device is None else device)


def _wrap(model, autoshape: bool, verbose: bool):
    from models.autoshape import AutoShape

    return AutoShape(model, verbose=verbose) if autoshape else model


def _create(name: str, pretrained: bool = True, channels: int = 3, classes: int = 80, autoshape: bool = True,
            verbose: bool = True, device=None):
    """A model named like its config in models/ (e.g. 'yolov5s-spd'), new or with pretrained weights."""
    from models.backends import DetectMultiBackend
    from models.yolo import DetectionModel
    from models.checkpoints import load_model
    from utils.checkpoints import OFFICIAL_NAMES, resolve_weights
    from utils.errors import UserError
    from utils.torch_utils import intersect_dicts

    dev = _device(device)
    if not pretrained:
        model = DetectionModel(f"{name}.yaml", ch=channels, nc=classes, verbose=verbose)
        return _wrap(model, autoshape, verbose).to(dev)

    w = Path(f"{name}.pt")
    if not w.is_file() and w.name not in OFFICIAL_NAMES:
        raise UserError(f"no pretrained {name} weights are published: train one (python train.py --cfg {name}.yaml) "
                        f"and load it with torch.hub.load('.', 'custom', path='best.pt', source='local'), "
                        f"or pass pretrained=False for a new model")
    w = resolve_weights(w)
    if channels == 3 and classes == 80:
        if autoshape:  # inference front end: fused, SPD in export form
            return _wrap(DetectMultiBackend(w, device=dev, fuse=True), True, verbose)
        return load_model(w, device=dev, fuse=False)
    # other input channels or classes: new model, transfer every weight whose shape still fits
    src = load_model(w, device="cpu", fuse=False)
    model = DetectionModel(f"{name}.yaml", ch=channels, nc=classes, verbose=verbose)
    state = intersect_dicts(src.state_dict(), model.state_dict(), exclude=("anchors",))
    model.load_state_dict(state, strict=False)
    if verbose:
        from utils.logging import LOGGER

        LOGGER.info(f"Transferred {len(state)}/{len(model.state_dict())} items from {w}")
    if classes == len(src.names):
        model.names = src.names
    return _wrap(model, autoshape, verbose).to(dev)


def custom(path: str = "path/to/model.pt", autoshape: bool = True, _verbose: bool = True, device=None,
           trust_weights: bool = False):
    """Weights in any supported format (.pt, .torchscript, .onnx, OpenVINO folder).

    TorchScript runs code stored in the file when loaded: refused unless trust_weights=True."""
    from models.backends import DetectMultiBackend
    from models.checkpoints import load_model

    dev = _device(device)
    if autoshape:
        return _wrap(DetectMultiBackend(path, device=dev, fuse=True, trust_weights=trust_weights), True, _verbose)
    if not str(path).endswith(".pt"):
        return DetectMultiBackend(path, device=dev, fuse=False, trust_weights=trust_weights)
    return load_model(path, device=dev, fuse=False)


def _entry(name: str):
    def create(pretrained: bool = True, channels: int = 3, classes: int = 80, autoshape: bool = True,
               _verbose: bool = True, device=None):
        return _create(name, pretrained, channels, classes, autoshape, _verbose, device)

    create.__name__ = name.replace("-", "_")
    create.__doc__ = f"{name} (models/{name}.yaml); pretrained=True needs {name}.pt in the current folder" + (
        "" if name.endswith("-spd") else " or downloads the official release")
    return create


yolov5n = _entry("yolov5n")
yolov5s = _entry("yolov5s")
yolov5m = _entry("yolov5m")
yolov5l = _entry("yolov5l")
yolov5x = _entry("yolov5x")
yolov5n_spd = _entry("yolov5n-spd")
yolov5s_spd = _entry("yolov5s-spd")
yolov5m_spd = _entry("yolov5m-spd")
yolov5l_spd = _entry("yolov5l-spd")
yolov5x_spd = _entry("yolov5x-spd")
