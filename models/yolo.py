"""YOLOv5 detection model: the Detect head, `parse_model` for the yaml configs, and `DetectionModel`.

Usage:  python models/yolo.py --cfg yolov5s-spd.yaml   (prints the layer table and summary)
"""
from __future__ import annotations

import argparse
import math
import sys
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn as nn
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from models.blocks import CONCAT, CONV_REPEATS, DETECT, NORM, SPACE_TO_DEPTH, conv_like, declarations, declare  # noqa: E402
from models.common import Conv  # noqa: E402
from utils.autoanchor import check_anchor_order  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.limits import check_limit, limit  # noqa: E402
from utils.logging import LOGGER  # noqa: E402
from utils.torch_utils import fuse_conv_and_bn, model_info, scale_img  # noqa: E402

MODELS_DIR = Path(__file__).resolve().parent


@declare(DETECT, input_convs=("m.{slot}",))
class Detect(nn.Module):
    """Per-level 1x1 convs to (na * (5 + nc)) channels; in inference mode also decodes boxes to pixels."""

    stride = None  # set by DetectionModel from a forward pass
    export = False  # export mode returns only the decoded tensor

    def __init__(self, nc: int = 80, anchors=(), ch=()):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.empty(0) for _ in range(self.nl)]
        self.anchor_grid = [torch.empty(0) for _ in range(self.nl)]
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)

    def forward(self, x: list[torch.Tensor]):
        z = []
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                if torch.jit.is_tracing() or self.grid[i].shape[2:4] != x[i].shape[2:4]:
                    self.grid[i], self.anchor_grid[i] = self._make_grid(nx, ny, i)
                y = x[i].sigmoid()
                xy, wh, conf = y.split((2, 2, self.nc + 1), 4)
                xy = (xy * 2 + self.grid[i]) * self.stride[i]  # grid holds the -0.5 offset
                wh = (wh * 2) ** 2 * self.anchor_grid[i]
                z.append(torch.cat((xy, wh, conf), 4).view(bs, self.na * nx * ny, self.no))
        if self.training:
            return x
        return torch.cat(z, 1) if self.export else (torch.cat(z, 1), x)

    def _make_grid(self, nx: int, ny: int, i: int):
        d, t = self.anchors[i].device, self.anchors[i].dtype
        shape = 1, self.na, ny, nx, 2
        yv, xv = torch.meshgrid(torch.arange(ny, device=d, dtype=t), torch.arange(nx, device=d, dtype=t), indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5
        anchor_grid = (self.anchors[i] * self.stride[i]).view((1, self.na, 1, 1, 2)).expand(shape)
        return grid, anchor_grid


def resolve_cfg(cfg: str | Path) -> Path:
    """A config path as given, else a bare name looked up in models/ (with or without .yaml)."""
    p = Path(cfg)
    candidates = [p, MODELS_DIR / p.name, MODELS_DIR / f"{p.name}.yaml", MODELS_DIR / p.with_suffix(".yaml").name]
    for c in candidates:
        if c.is_file():
            return c
    known = ", ".join(sorted(f.name for f in MODELS_DIR.glob("*.yaml")))
    raise UserError(f"model config '{cfg}' not found (known configs: {known})")


def load_cfg(cfg: str | Path | dict) -> dict:
    if isinstance(cfg, dict):
        return deepcopy(cfg)
    path = resolve_cfg(cfg)
    try:
        d = yaml.safe_load(path.read_text(errors="ignore"))
    except yaml.YAMLError as e:
        raise UserError(f"model config {path} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise UserError(f"model config {path} must be a mapping with backbone and head")
    d["yaml_file"] = path.name
    return d


CFG_KEYS = {"nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head", "activation", "ch", "inplace", "yaml_file"}

ACTIVATIONS = {"nn.SiLU()": nn.SiLU, "nn.ReLU()": nn.ReLU, "nn.LeakyReLU(0.1)": lambda: nn.LeakyReLU(0.1), "nn.Hardswish()": nn.Hardswish}


def make_divisible(x: float, divisor: int = 8) -> int:
    """Round channel counts up to a multiple of `divisor` (hardware-friendly widths)."""
    return int(math.ceil(x / divisor) * divisor)


def _check_head(nc, gd, gw, anchors) -> None:
    """nc, the multiples and the anchors of a config: the right types, within the limits."""
    if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
        raise UserError(f"model config: nc must be a positive integer, got {nc!r}")
    check_limit("channels", nc, f"model config: nc={nc} classes")
    for key, v in (("depth_multiple", gd), ("width_multiple", gw)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise UserError(f"model config: {key} must be a positive number, got {v!r}")
        check_limit("multiple", v, f"model config: {key} {v}")
    ok = (isinstance(anchors, int) and not isinstance(anchors, bool) and 0 < anchors <= 16) or (
        isinstance(anchors, list) and anchors and all(isinstance(a, list) and a and len(a) % 2 == 0 and len(a) <= 32
                                                       and all(isinstance(x, (int, float)) for x in a) for a in anchors))
    if not ok:
        raise UserError("model config: anchors must be a number of anchors per level or lists of w,h pairs")


def _layer_rows(d: dict) -> list:
    """backbone + head rows, each [from, number, module, args], or a UserError saying the shape is wrong."""
    rows = (d["backbone"] or []) + (d["head"] or []) if isinstance(d["backbone"], list) and isinstance(d["head"] or [], list) else None
    if not rows or not all(isinstance(x, (list, tuple)) and len(x) == 4 and isinstance(x[3], list) for x in rows):
        raise UserError("model config: backbone and head must be lists of [from, number, module, args] rows")
    return rows


def _build_layer(mod, args: list, n: int, kw: dict, params_so_far: int, c_max: int,
                 inner_repeats: int = 1) -> tuple[nn.Module, int]:
    """Build n copies of a layer, first on the meta device (no memory) when it might be large, so its
    parameters are counted against the limit before any is allocated: a tiny file must not be able
    to ask for gigabytes."""
    def make() -> nn.Module:
        return nn.Sequential(*(mod(*args, **kw) for _ in range(n))) if n > 1 else mod(*args, **kw)

    bound = 16 * 9 * max(n, 1) * max(inner_repeats, 1) * c_max**2  # over every block's 3x3/1x1 convs
    if params_so_far + bound > limit("params"):
        with torch.device("meta"):
            n_params = sum(p.numel() for p in make().parameters())
        check_limit("params", params_so_far + n_params, f"the model config's {params_so_far + n_params:,} parameters")
    m = make()
    return m, sum(p.numel() for p in m.parameters())


def parse_model(d: dict, ch: list[int], verbose: bool = True) -> tuple[nn.Sequential, list[int]]:
    """Build the layer list from a config dict; returns (model, indices of outputs to keep)."""
    unknown = set(d) - CFG_KEYS
    if unknown:
        raise UserError(f"unknown key(s) {sorted(unknown)} in model config; allowed: {sorted(CFG_KEYS)}")
    for key in ("anchors", "backbone", "head", "depth_multiple", "width_multiple", "nc"):
        if key not in d:
            raise UserError(f"model config is missing '{key}'")
    anchors, nc, gd, gw = d["anchors"], d["nc"], d["depth_multiple"], d["width_multiple"]
    _check_head(nc, gd, gw, anchors)
    total_params = 0
    act = d.get("activation")
    act_kw = {}
    if act:
        if act not in ACTIVATIONS:
            raise UserError(f"unknown activation '{act}' (known: {list(ACTIVATIONS)})")
        act_kw = {"act": ACTIVATIONS[act]}  # passed to each block: no class attribute, nothing leaks
    na = (len(anchors[0]) // 2) if isinstance(anchors, list) else anchors
    no = na * (nc + 5)
    names = {"nc": nc, "anchors": anchors, "None": None, "True": True, "False": False}

    if verbose:
        LOGGER.info(f"\n{'':>3}{'from':>18}{'n':>3}{'params':>10}  {'module':<40}{'arguments':<30}")
    layers, save, c2 = [], [], ch[-1]
    layers_cfg, decls, convs = _layer_rows(d), declarations(), conv_like()
    i = 0
    try:
        for i, (f, n, m, args) in enumerate(layers_cfg):
            if not isinstance(m, str) or not isinstance(n, int) or not (isinstance(f, int) or
                                                                       (isinstance(f, list) and all(isinstance(x, int) for x in f))):
                raise UserError(f"model config layer {i}: expected [from (int or list), number (int), module, args], got {[f, n, m, args]}")
            if any(not (-1 <= x < i if x >= 0 or x == -1 else -i <= x) for x in ([f] if isinstance(f, int) else f)):
                raise UserError(f"model config layer {i}: 'from' {f} must name earlier layers (0-{i - 1} or -1)")
            if m not in decls:
                raise UserError(f"layer {i}: unknown module '{m}' (known: {sorted(decls)})")
            mod, kind = decls[m].cls, decls[m].kind
            args = [names.get(a, a) if isinstance(a, str) else a for a in args]
            n = n_ = max(round(n * gd), 1) if n > 1 else n
            if mod in convs:
                c1, c2 = ch[f], args[0]
                if c2 != no:
                    c2 = make_divisible(c2 * gw, 8)
                args = [c1, c2, *args[1:]]
                if kind == CONV_REPEATS:
                    args.insert(2, n)
                    n = 1
            elif kind == NORM:
                args = [ch[f]]  # c2 keeps the previous layer's value, as in YOLOv5
            elif kind == CONCAT:
                c2 = sum(ch[x] for x in f)
            elif kind == DETECT:
                args.append([ch[x] for x in f])
                if isinstance(args[1], int):  # number of anchors per level -> placeholder anchors
                    args[1] = [list(range(args[1] * 2))] * len(f)
            elif kind == SPACE_TO_DEPTH:
                c2 = 4 * ch[f]
            else:
                c2 = ch[f]

            try:
                check_limit("repeats", n, f"model config layer {i}: {n} repeats of {m}")
                check_limit("channels", c2, f"model config layer {i}: {c2} output channels")
                c_max = max([c2] + [ch[x] for x in ([f] if isinstance(f, int) else f)])
                m_, n_params = _build_layer(mod, args, n, act_kw if mod in convs else {}, total_params, c_max,
                                            args[2] if kind == CONV_REPEATS else 1)
                total_params += n_params
            except (TypeError, ValueError, IndexError, KeyError, RuntimeError, ZeroDivisionError) as e:
                raise UserError(f"model config layer {i}: {m} cannot be built from {args} ({type(e).__name__}: {str(e)[:120]})") from None
            m_.i, m_.f, m_.type = i, f, m
            m_.np = sum(x.numel() for x in m_.parameters())
            if verbose:
                LOGGER.info(f"{i:>3}{str(f):>18}{n_:>3}{m_.np:10.0f}  {m:<40}{str(args):<30}")
            save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
            layers.append(m_)
            if i == 0:
                ch = []
            ch.append(c2)
    except (TypeError, ValueError, IndexError, KeyError, AttributeError, ZeroDivisionError) as e:
        # a malformed config reaches layer arithmetic or constructors with values they cannot take
        raise UserError(f"model config layer {i}: cannot be built ({type(e).__name__}: {str(e)[:120]})") from None
    return nn.Sequential(*layers), sorted(save)


class DetectionModel(nn.Module):
    """A YOLOv5 detector built from a yaml config (a path, a bare name in models/, or a dict)."""

    def __init__(self, cfg: str | Path | dict = "yolov5s.yaml", ch: int = 3, nc: int | None = None, anchors=None, verbose: bool = True):
        super().__init__()
        self.yaml = load_cfg(cfg)
        self.yaml_file = self.yaml.get("yaml_file", "")
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc and nc != self.yaml.get("nc"):
            if verbose:
                LOGGER.info(f"Overriding model.yaml nc={self.yaml.get('nc')} with nc={nc}")
            self.yaml["nc"] = nc
        if anchors:
            self.yaml["anchors"] = round(anchors) if isinstance(anchors, float) else anchors
        self.model, self.save = parse_model(deepcopy(self.yaml), ch=[ch], verbose=verbose)
        self.names = {i: str(i) for i in range(self.yaml["nc"])}

        m = self.model[-1]
        if not isinstance(m, Detect):
            raise UserError("the last layer of a detection config must be Detect")
        s = 256  # probe size: large enough for stride 32, even at every level
        self.train()
        with torch.no_grad():
            m.stride = torch.tensor([s / x.shape[-2] for x in self.forward(torch.zeros(1, ch, s, s))])
        check_anchor_order(m)
        m.anchors /= m.stride.view(-1, 1, 1)  # pixels -> grid units
        self.stride = m.stride
        self._initialize_biases()
        initialize_weights(self)
        if verbose:
            self.info()
            LOGGER.info("")

    # --- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, augment: bool = False):
        if augment:
            return self._forward_augment(x)
        return self._forward_once(x)

    def _forward_once(self, x: torch.Tensor):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    def _forward_augment(self, x: torch.Tensor):
        """Test-time augmentation: scales 1, 0.83, 0.67 with a left-right flip on the middle one."""
        img_size = x.shape[-2:]
        gs = int(self.stride.max())
        y = []
        for si, fi in zip((1, 0.83, 0.67), (None, 3, None)):
            xi = scale_img(x.flip(fi) if fi else x, si, gs=gs)
            yi = self._forward_once(xi)[0]
            y.append(self._descale_pred(yi, fi, si, img_size))
        y = self._clip_augmented(y)
        return torch.cat(y, 1), None

    def _descale_pred(self, p: torch.Tensor, flips, scale: float, img_size) -> torch.Tensor:
        p[..., :4] /= scale
        if flips == 2:
            p[..., 1] = img_size[0] - p[..., 1]
        elif flips == 3:
            p[..., 0] = img_size[1] - p[..., 0]
        return p

    def _clip_augmented(self, y: list[torch.Tensor]) -> list[torch.Tensor]:
        """Drop the large-object tail of the largest scale and the small-object head of the smallest."""
        nl = self.model[-1].nl
        g = sum(4**x for x in range(nl))
        i = (y[0].shape[1] // g) * sum(4**x for x in range(1))
        y[0] = y[0][:, :-i]
        i = (y[-1].shape[1] // g) * sum(4 ** (nl - 1 - x) for x in range(1))
        y[-1] = y[-1][:, i:]
        return y

    # --- set-up ----------------------------------------------------------------------------
    def _initialize_biases(self, cf: torch.Tensor | None = None) -> None:
        """Objectness prior of ~8 objects per 640 image; class prior 0.6 / nc (or class frequencies cf)."""
        m = self.model[-1]
        for mi, s in zip(m.m, m.stride):
            b = mi.bias.view(m.na, -1)
            b.data[:, 4] += math.log(8 / (640 / s) ** 2)
            b.data[:, 5 : 5 + m.nc] += math.log(0.6 / (m.nc - 0.99999)) if cf is None else torch.log(cf / cf.sum())
            mi.bias = nn.Parameter(b.view(-1), requires_grad=True)

    def fuse(self) -> "DetectionModel":
        """Fold every BatchNorm into its conv for inference."""
        for m in self.model.modules():
            if isinstance(m, Conv) and hasattr(m, "bn"):
                m.conv = fuse_conv_and_bn(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.forward_fuse
        return self

    def info(self, verbose: bool = False, img_size: int = 640):
        return model_info(self, verbose, img_size)

    def _apply(self, fn):
        # stride, grid and anchor_grid are plain attributes, not buffers: move/cast them with the model
        self = super()._apply(fn)
        m = self.model[-1]
        if isinstance(m, Detect):
            m.stride = fn(m.stride)
            m.grid = [fn(g) for g in m.grid]
            m.anchor_grid = [fn(g) for g in m.anchor_grid]
        return self


Model = DetectionModel  # YOLOv5's historical name, used by official checkpoints and user code


def initialize_weights(model: nn.Module) -> None:
    """YOLOv5's BatchNorm settings (eps 1e-3, momentum 0.03) and in-place activations."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-3
            m.momentum = 0.03
        elif isinstance(m, (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU)):
            m.inplace = True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a model from a config and print its summary")
    parser.add_argument("--cfg", type=str, default="yolov5s-spd.yaml", help="model config (path or bare name)")
    parser.add_argument("--nc", type=int, default=None, help="override the number of classes")
    parser.add_argument("--line-profile", action="store_true", help="print parameter-level detail")
    opt = parser.parse_args(argv)
    model = Model(opt.cfg, nc=opt.nc)
    if opt.line_profile:
        model.info(verbose=True)


if __name__ == "__main__":
    from utils.errors import report_user_errors

    report_user_errors(main)()
