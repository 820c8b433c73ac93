"""Building blocks shared by every model in the project.

Class and attribute names follow YOLOv5 (`Conv.conv`, `Conv.bn`, `C3.cv1`, ...) because official
checkpoints are pickles of these very objects and their state-dict keys are derived from these names.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from models.blocks import CONCAT, CONV, CONV_REPEATS, SPACE_TO_DEPTH, declare
from models.space_to_depth import space_to_depth_slices


def autopad(k: int | tuple, p: int | tuple | None = None, d: int = 1) -> int | list:
    """'Same' padding for an odd kernel at stride 1 (and the YOLOv5 convention for even kernels)."""
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


def make_act(act=True) -> nn.Module:
    """The activation a block asked for: True -> SiLU (YOLOv5's default), a module as given, a class
    or factory (timm's act_layer style, e.g. nn.ReLU or `lambda: nn.LeakyReLU(0.1)`) -> a new instance
    per layer, False/None -> Identity. Passed explicitly so one config's choice never leaks into the next."""
    if act is True:
        return nn.SiLU()
    if isinstance(act, nn.Module):
        return act
    if callable(act):
        return act()
    return nn.Identity()


def _ungrouped(m: nn.Module) -> bool:
    return m.conv.groups == 1  # a grouped conv's input channels cannot be moved to other positions


def _no_residual(m: nn.Module) -> bool:
    return not m.add  # the residual add reads the input too


@declare(CONV, input_convs=("conv",), out_weight="conv.weight")
class Conv(nn.Module):
    """Conv2d -> BatchNorm2d -> SiLU (or `act`). After `fuse()` the BN is folded into the conv (forward_fuse)."""

    default_act = nn.SiLU()  # YOLOv5's name; read by nothing here (the act argument decides)

    def __init__(self, c1: int, c2: int, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


@declare(CONV, input_convs=("conv",), input_convs_if=_ungrouped, out_weight="conv.weight")
class DWConv(Conv):
    """Depth-wise convolution: groups = gcd(c1, c2)."""

    def __init__(self, c1: int, c2: int, k=1, s=1, d=1, act=True):
        super().__init__(c1, c2, k, s, g=math.gcd(c1, c2), d=d, act=act)


@declare(CONV, input_convs=("cv1.conv",), input_convs_if=_no_residual, out_weight="cv2.conv.weight")
class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 expand, optional residual when the channel counts allow it."""

    def __init__(self, c1: int, c2: int, shortcut=True, g=1, e=0.5, act=True):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c_, c2, 3, 1, g=g, act=act)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


@declare(CONV_REPEATS, input_convs=("cv1.conv", "cv2.conv"), out_weight="cv3.conv.weight")
class C3(nn.Module):
    """CSP bottleneck with three convolutions: two 1x1 branches, n bottlenecks on one, 1x1 merge."""

    def __init__(self, c1: int, c2: int, n=1, shortcut=True, g=1, e=0.5, act=True):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c1, c_, 1, 1, act=act)
        self.cv3 = Conv(2 * c_, c2, 1, act=act)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0, act=act) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


@declare(CONV, input_convs=("cv1.conv",), out_weight="cv2.conv.weight")
class SPP(nn.Module):
    """Spatial pyramid pooling with parallel max-pools of several sizes."""

    def __init__(self, c1: int, c2: int, k=(5, 9, 13), act=True):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c_ * (len(k) + 1), c2, 1, 1, act=act)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.cv2(torch.cat([x] + [m(x) for m in self.m], 1))


@declare(CONV, input_convs=("cv1.conv",), out_weight="cv2.conv.weight")
class SPPF(nn.Module):
    """SPP-Fast: one max-pool applied three times in series equals SPP(5, 9, 13), cheaper."""

    def __init__(self, c1: int, c2: int, k=5, act=True):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c_ * 4, c2, 1, 1, act=act)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


@declare(CONV, out_weight="conv.conv.weight")  # its conv reads the space-to-depth of the input
class Focus(nn.Module):
    """Space-to-depth of the input image followed by a Conv: the SPD-Conv stem."""

    def __init__(self, c1: int, c2: int, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(space_to_depth_slices(x))


@declare(CONV, out_weight="conv.conv.weight")
class SPDConv(nn.Module):
    """SPD-Conv in the paper's order: space-to-depth (scale 2), then a non-strided Conv over the 4*c1 channels.

    Halves the resolution without discarding a pixel (the authors' released YOLOv5 layout puts the conv
    first, at full resolution). With k=3 it holds any 3x3 (or 6x6) stride-2 conv exactly (models/spd.py);
    with k=1 it is the cheapest lossless downsampling (4*c1*c2 MACs per output pixel against 9*c1*c2).
    """

    def __init__(self, c1: int, c2: int, k=3, p=None, g=1, act=True):
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, 1, p, g, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(space_to_depth_slices(x))


@declare(SPACE_TO_DEPTH)
class space_to_depth(nn.Module):  # noqa: N801 - name fixed by the SPD-Conv configs and checkpoints
    """The SPD layer: every 2x2 block of pixels becomes 4 channels; no information is dropped."""

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return space_to_depth_slices(x)


@declare(CONCAT)
class Concat(nn.Module):
    """Concatenate a list of tensors along a dimension (channels by default)."""

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)
