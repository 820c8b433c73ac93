"""ResNet-18/50 classifiers and their SPD-Conv variants (Sunkara & Luo 2022, "No More Strided
Convolutions or Pooling").

The paper's change to ResNet: each stride-2 convolution becomes SPD-Conv (space_to_depth, then a
stride-1 convolution over 4x the channels) and the stride-2 max-pool is removed, because 32x32 and
64x64 inputs need no early pooling. Here the projection shortcut of every downsampling block goes
through SPD too (default), so an SPD model has no layer with stride > 1 at all; the authors'
released code keeps a stride-2 1x1 convolution in that shortcut, which `spd_shortcut=False`
reproduces.

Two layouts for the SPD variants. 'paper' (`resnet18-spd`, `resnet50-spd`): SPD comes first, then a
stride-1 conv over 4x the channels (SPD -> Conv -> BN). 'authors' (`resnet18-spd-authors`,
`resnet50-spd-authors`): the authors' released code, Conv3x3 (stride 1) -> SPD -> BN(4c) with the next
conv reading 4c channels, a Focus(3, 64, k=1) stem, stride-2 1x1 shortcuts, and Bottleneck [3, 4, 6, 3]
for both names (their "resnet18_spd" is ResNet-50-deep).

Stems: 'imagenet' (7x7 stride-2 conv + 3x3 stride-2 max-pool, torchvision's layout; SPD-Conv(7x7), no
pool, in the paper-form SPD variants), 'small' (CIFAR: one 3x3 stride-1 conv in the plain models,
SPD -> 3x3 stride-1 conv in the SPD variants, so the stem halves the image without dropping a pixel, as
the authors' Focus stem does), 'plain-small' (one 3x3 stride-1 conv in every model: the resolution
schedule of the plain CIFAR ResNet, which lets a plain model convert exactly into an SPD one) and
'focus' (space_to_depth -> 1x1 conv, the authors' stem; the only stem of the 'authors' models).
The blocks are the detector's `Conv` (conv + BN + activation, ReLU here) and `space_to_depth`, so
state-dict keys read `layer2.0.cv1.conv.weight`; `torchvision_to_ours` renames torchvision keys.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from models.common import Conv, space_to_depth
from models.space_to_depth import strided_to_spd_kernel

# name -> (block type, blocks per stage)
ARCHITECTURES: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
# the authors' released "resnet18_spd" and "resnet50_spd" are both Bottleneck [3, 4, 6, 3]
AUTHORS_ARCHITECTURE = ("bottleneck", (3, 4, 6, 3))
MODEL_NAMES = ("resnet18", "resnet18-spd", "resnet50", "resnet50-spd", "resnet18-spd-authors", "resnet50-spd-authors")
STEMS = ("small", "imagenet", "plain-small", "focus")
WIDTHS = (64, 128, 256, 512)


def _relu() -> nn.Module:
    return nn.ReLU(inplace=True)


class SPDConv(Conv):
    """space_to_depth followed by a stride-1 Conv over 4*c1 channels: a stride-2 conv that keeps every pixel.

    A subclass of Conv (same `conv`/`bn`/`act` attributes) so its state-dict keys match the strided
    Conv it replaces; only the weight's input-channel count differs (4*c1 instead of c1).
    """

    def __init__(self, c1: int, c2: int, k: int = 3, act: bool | nn.Module = True):
        super().__init__(4 * c1, c2, k, 1, act=act)
        self.spd = space_to_depth()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.spd(x))

    def forward_fuse(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward_fuse(self.spd(x))


class ConvSPD(nn.Module):
    """The authors' released SPD block: Conv (stride 1, c1 -> c2, no BN) -> space_to_depth -> BN(4*c2) -> act.

    Outputs 4*c2 channels at half the resolution; the layer after it reads all 4*c2.
    """

    def __init__(self, c1: int, c2: int, k: int = 3, act: bool | nn.Module = True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, 1, k // 2, bias=False)
        self.spd = space_to_depth()
        self.bn = nn.BatchNorm2d(4 * c2)
        self.act = act if isinstance(act, nn.Module) else (_relu() if act else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.spd(self.conv(x))))


def downsample_conv(c1: int, c2: int, k: int, spd: bool, act: bool | nn.Module) -> Conv:
    """The layer that halves H and W: a stride-2 Conv, or SPDConv in the SPD variants."""
    return SPDConv(c1, c2, k, act=act) if spd else Conv(c1, c2, k, 2, act=act)


def projection(c1: int, c2: int, stride: int, spd: bool) -> nn.Module:
    """Shortcut branch: identity when shapes match, else a 1x1 conv + BN (no activation)."""
    if stride == 1 and c1 == c2:
        return nn.Identity()
    if stride == 1:
        return Conv(c1, c2, 1, 1, act=False)
    return downsample_conv(c1, c2, 1, spd, act=False)


class BasicBlock(nn.Module):
    """ResNet-18/34 block: 3x3 -> 3x3, residual add, ReLU. Stride sits on the first 3x3."""

    expansion = 1

    def __init__(self, c1: int, c: int, stride: int = 1, spd: bool = False, spd_shortcut: bool = True):
        super().__init__()
        c2 = c * self.expansion
        self.cv1 = downsample_conv(c1, c, 3, spd, _relu()) if stride == 2 else Conv(c1, c, 3, 1, act=_relu())
        self.cv2 = Conv(c, c2, 3, 1, act=False)
        self.shortcut = projection(c1, c2, stride, spd and spd_shortcut)
        self.act = _relu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.cv2(self.cv1(x)) + self.shortcut(x))


class BottleneckBlock(nn.Module):
    """ResNet-50 block (v1.5, torchvision): 1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand x4."""

    expansion = 4

    def __init__(self, c1: int, c: int, stride: int = 1, spd: bool = False, spd_shortcut: bool = True,
                 layout: str = "paper"):
        super().__init__()
        c2 = c * self.expansion
        self.cv1 = Conv(c1, c, 1, 1, act=_relu())
        authors = spd and layout == "authors" and stride == 2
        if authors:  # Conv3x3 s1 -> SPD -> BN(4c); the 1x1 expand then reads 4c channels
            self.cv2 = ConvSPD(c, c, 3, _relu())
        else:
            self.cv2 = downsample_conv(c, c, 3, spd, _relu()) if stride == 2 else Conv(c, c, 3, 1, act=_relu())
        self.cv3 = Conv(4 * c if authors else c, c2, 1, 1, act=False)
        self.shortcut = projection(c1, c2, stride, spd and spd_shortcut)
        self.act = _relu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.cv3(self.cv2(self.cv1(x))) + self.shortcut(x))


def parse_model_name(name: str) -> tuple[str, bool]:
    """'resnet18-spd' -> ('resnet18', True); unknown names raise ValueError listing the valid ones."""
    key = name.lower().strip()
    if key.endswith("-authors") and key[: -len("-authors")].endswith("-spd"):
        key = key[: -len("-authors")]
    spd = key.endswith("-spd")
    arch = key[: -len("-spd")] if spd else key
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown classification model '{name}'; choose one of {', '.join(MODEL_NAMES)}")
    return arch, spd


def model_layout(name: str) -> str:
    """'authors' for the *-spd-authors names (the authors' released code), else 'paper'."""
    return "authors" if name.lower().strip().endswith("-spd-authors") else "paper"


def make_stem(stem: str, spd: bool, layout: str) -> tuple[nn.Sequential, int, str]:
    """(stem module, its downsampling factor, the stem name recorded in cfg) for a model variant."""
    c = WIDTHS[0]
    if layout == "authors" and stem != "plain-small":
        stem = "focus"  # the authors use Focus(3, 64, k=1) for CIFAR and Tiny ImageNet alike
    if stem == "focus":  # space_to_depth -> 1x1 conv over 12 channels
        return nn.Sequential(SPDConv(3, c, 1, act=_relu())), 2, stem
    if stem == "plain-small" or (stem == "small" and not spd):  # keeps resolution
        return nn.Sequential(Conv(3, c, 3, 1, act=_relu())), 1, stem
    if stem == "small":  # SPD idea on CIFAR: halve the image by folding pixels into channels, not dropping them
        return nn.Sequential(SPDConv(3, c, 3, act=_relu())), 2, stem
    if spd:  # paper: 7x7 stride-2 conv -> SPD-Conv, max-pool removed
        return nn.Sequential(SPDConv(3, c, 7, act=_relu())), 2, stem
    return nn.Sequential(Conv(3, c, 7, 2, act=_relu()), nn.MaxPool2d(3, 2, 1)), 4, stem


class ResNet(nn.Module):
    """ResNet-18/50 (optionally SPD) with an avg-pool -> dropout -> linear head over `nc` classes.

    `stages` (1-4) keeps only the first stages before the head (train.py's --cutoff).
    """

    def __init__(
        self,
        name: str = "resnet18",
        nc: int = 1000,
        stem: str = "small",
        spd_shortcut: bool = True,
        dropout: float = 0.0,
        stages: int = 4,
    ):
        super().__init__()
        arch, spd = parse_model_name(name)
        layout = model_layout(name)
        if stem not in STEMS:
            raise ValueError(f"unknown stem '{stem}'; choose one of {', '.join(STEMS)}")
        if not 1 <= stages <= 4:
            raise ValueError(f"stages must be 1-4, got {stages}")
        if nc < 1:
            raise ValueError(f"nc must be at least 1, got {nc}")
        kind, depths = AUTHORS_ARCHITECTURE if layout == "authors" else ARCHITECTURES[arch]
        block = BasicBlock if kind == "basic" else BottleneckBlock
        if layout == "authors":
            spd_shortcut = False  # the released code keeps stride-2 1x1 shortcuts
        self.stem, stride, stem = make_stem(stem, spd, layout)
        self.cfg = {
            "model": (f"{arch}-spd" if spd else arch) + ("-authors" if layout == "authors" else ""),
            "nc": int(nc),
            "stem": stem,
            "spd_shortcut": bool(spd_shortcut),
            "dropout": float(dropout),
            "stages": int(stages),
        }

        c1 = WIDTHS[0]
        for i in range(4):
            if i < stages:
                s = 1 if i == 0 else 2
                layers = []
                for j in range(depths[i]):
                    extra = {"layout": layout} if block is BottleneckBlock else {}
                    layers.append(block(c1, WIDTHS[i], s if j == 0 else 1, spd, spd_shortcut, **extra))
                    c1 = WIDTHS[i] * block.expansion
                stride *= s
                setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            else:
                setattr(self, f"layer{i + 1}", nn.Identity())
        self.stride = stride  # total downsampling; SPD variants need inputs divisible by it
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(c1, nc)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's default init (He-normal convs, BN at weight 1 / bias 0), so the plain
        # variants train like the torchvision models users compare against.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def head(self, f: torch.Tensor) -> torch.Tensor:
        """Global average pool -> dropout -> linear: feature map to class logits."""
        return self.fc(self.drop(torch.flatten(self.pool(f), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(
    name: str, nc: int, stem: str = "small", spd_shortcut: bool = True, dropout: float = 0.0, stages: int = 4
) -> ResNet:
    """Model factory used by the scripts: name is one of MODEL_NAMES."""
    return ResNet(name, nc, stem=stem, spd_shortcut=spd_shortcut, dropout=dropout, stages=stages)


_STRIDED_TYPES = (
    nn.modules.conv._ConvNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._LPPoolNd,
)


def strided_layers(model: nn.Module) -> list[str]:
    """Names of conv/pool layers with any stride > 1: empty for an SPD model with SPD shortcuts."""
    out = []
    for n, m in model.named_modules():
        if isinstance(m, _STRIDED_TYPES):
            s = m.stride if m.stride is not None else m.kernel_size  # pools default stride to kernel
            ss = (s,) if isinstance(s, int) else tuple(s)
            if any(int(v) > 1 for v in ss):
                out.append(n)
    return out


def spd_weight_from_strided(w: torch.Tensor) -> torch.Tensor:
    """Weights for an SPD-Conv (k x k, stride 1, pad k//2) that computes exactly what a k x k stride-2
    conv (pad k//2) with weights `w` computes, for odd k.

    Input row 2i + d of the strided conv is row i + floor(d/2) of space-to-depth phase d mod 2 (the proof
    is in models.space_to_depth.strided_to_spd_kernel). So a pretrained baseline converts to an SPD model
    that starts as the same function (with the small stem, where the max-pool does not exist).
    """
    k, k2 = w.shape[2:]
    if k != k2 or k % 2 == 0:
        raise ValueError(f"need a square odd kernel, got {k}x{k2}")
    return strided_to_spd_kernel(w, k // 2, k)[0]


_TV_RULES = [
    (r"^conv1\.", "stem.0.conv."),
    (r"^bn1\.", "stem.0.bn."),
    (r"^(layer\d\.\d+)\.conv(\d)\.", lambda m: f"{m.group(1)}.cv{m.group(2)}.conv."),
    (r"^(layer\d\.\d+)\.bn(\d)\.", lambda m: f"{m.group(1)}.cv{m.group(2)}.bn."),
    (r"^(layer\d\.\d+)\.downsample\.0\.", r"\1.shortcut.conv."),
    (r"^(layer\d\.\d+)\.downsample\.1\.", r"\1.shortcut.bn."),
]


def torchvision_to_ours(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision resnet18/resnet50 state dict to this module's keys (fc.* keeps its name)."""
    out = {}
    for k, v in state_dict.items():
        for pat, rep in _TV_RULES:
            k2, n = re.subn(pat, rep, k)
            if n:
                k = k2
                break
        out[k] = v
    return out


def transfer_weights(model: ResNet, state_dict: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Load every tensor that fits into `model`; strided conv weights are converted for SPD layers.

    Accepts our own keys or torchvision's. Returns (tensors loaded, tensors in model's state dict);
    mismatches (e.g. the classifier for a different nc, a 7x7 stem into a 3x3 one) are skipped.
    """
    if any(k.startswith(("conv1.", "bn1.")) for k in state_dict):
        state_dict = torchvision_to_ours(state_dict)
    own = model.state_dict()
    spd_keys = {f"{n}.conv.weight" for n, m in model.named_modules() if isinstance(m, SPDConv)}
    new = {}
    for k, v in state_dict.items():
        if k not in own or not isinstance(v, torch.Tensor):
            continue
        target = own[k]
        if v.shape == target.shape:
            new[k] = v
        elif k in spd_keys and v.dim() == 4 and (v.shape[0], 4 * v.shape[1], *v.shape[2:]) == tuple(target.shape):
            new[k] = spd_weight_from_strided(v)
    model.load_state_dict(new, strict=False)
    return len(new), len(own)
