"""The export form of SPD: the same function as the authors' slice-and-concatenate, without the slices.

The SPD-Conv authors write space-to-depth as four strided slices and a concat (channel block k holds
the pixel phase (row, col) = (0,0), (1,0), (0,1), (1,1) for k = 0..3). Every exporter turns that into
four Slice nodes, a Concat and a copy of the feature map, which is slow on CPUs and unknown to some
NPU compilers. `to_export_form(model)` rewrites an inference model so that the function is unchanged
but the slicing is gone, choosing per SPD layer the cheapest exact form:

* folded: when every reader of the SPD output is a plain convolution (the C3 after each backbone SPD,
  the conv inside Focus and SPDConv), space-to-depth followed by a k x k, stride s conv *is* a 2k x 2k conv with
  stride 2s on the full-resolution input; the weights are rearranged and the SPD layer passes its input
  through. No rearrangement is left in any graph (a Focus becomes YOLOv5 v6's 6x6 stride-2 conv).
* blocks: when the readers are convolutions behind a Concat/Upsample (the PAN head), the layer becomes
  ONNX's own SpaceToDepth operator (block-major channel order) and the readers' input channels are
  permuted to match; exporters see one native node.
* ordered: anything else gets a single reshape/permute in the authors' exact channel order, no weight
  change (always correct, merely less fast).

The rewrite is for inference: do it after loading (before or after `fuse()`), never before training
or saving a checkpoint, because the weights no longer have the layout of the yaml model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from models.blocks import export_input_convs, pass_through_types
from models.common import Concat, Conv, Focus, SPDConv, space_to_depth
from models.space_to_depth import (check_even_hw, depth_to_space_kernel, slice_order_index, space_to_depth_ordered,
                                   to_block_order)
from utils.logging import LOGGER


class _SpaceToDepthBlocksFn(torch.autograd.Function):
    """Block-major space-to-depth that the ONNX exporter writes as one SpaceToDepth node."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return to_block_order(x)

    @staticmethod
    def symbolic(g, x):  # noqa: D102 - called by torch.onnx (TorchScript exporter) only
        return g.op("SpaceToDepth", x, blocksize_i=2)


def space_to_depth_blocks(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2), channel (2 * row + col) * C + c: ONNX SpaceToDepth's order."""
    check_even_hw(x, "space_to_depth")
    if torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
        return to_block_order(x)  # TorchScript keeps plain ops; the custom Function is only for the ONNX exporter
    return _SpaceToDepthBlocksFn.apply(x)


class SpaceToDepthFolded(nn.Module):
    """An SPD layer whose readers were folded into stride-2 convs: it only checks the size and passes on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_even_hw(x, "space_to_depth")
        return x


class SpaceToDepthBlocks(nn.Module):
    """An SPD layer in ONNX SpaceToDepth order; its readers' input channels were permuted to match."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return space_to_depth_blocks(x)


class SpaceToDepthOrdered(nn.Module):
    """An SPD layer as one reshape/permute in the authors' order (readers unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return space_to_depth_ordered(x)


class FocusOrdered(nn.Module):
    """A Focus whose conv could not be folded: reshape/permute instead of slices, same conv."""

    def __init__(self, conv: Conv):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(space_to_depth_ordered(x))


# --- weight rewrites ----------------------------------------------------------------------------------
def _foldable(conv: nn.Conv2d, c_in: int) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple) and conv.in_channels == 4 * c_in)


@torch.no_grad()
def fold_space_to_depth(conv: nn.Conv2d) -> nn.Conv2d:
    """The conv that applied to x equals `conv` applied to space_to_depth_slices(x) (slice order).

    Tap (t, u) of s2d channel k * C + c, phase (dr, dc), reads input pixel (2t + dr, 2u + dc) of the
    block, so the kernel doubles, stride and padding double, and FLOPs stay the same.
    """
    w = depth_to_space_kernel(conv.weight)
    o, c, kh, kw = w.shape
    folded = nn.Conv2d(c, o, (kh, kw), stride=(2 * conv.stride[0], 2 * conv.stride[1]),
                       padding=(2 * conv.padding[0], 2 * conv.padding[1]), bias=conv.bias is not None)
    folded = folded.to(device=conv.weight.device, dtype=conv.weight.dtype)
    folded.weight.copy_(w)
    if conv.bias is not None:
        folded.bias.copy_(conv.bias)
    folded.requires_grad_(conv.weight.requires_grad)
    return folded


@torch.no_grad()
def permute_input_channels(conv: nn.Conv2d, offset: int, c: int) -> None:
    """Make `conv` read channels [offset, offset + 4c) in block order instead of slice order (in place)."""
    idx = slice_order_index(c, conv.weight.device) + offset
    conv.weight[:, offset : offset + 4 * c] = conv.weight[:, idx].clone()


# --- graph analysis ------------------------------------------------------------------------------------
@dataclass
class _Reader:
    owner: nn.Module  # module holding the conv attribute (to swap in a folded conv)
    attr: str  # attribute (or ModuleList index as str) of the conv on owner
    offset: int  # first channel of the SPD output within the conv's input
    direct: bool  # the conv reads the SPD output itself (not through a Concat)

    @property
    def conv(self) -> nn.Conv2d:
        return self.owner[int(self.attr)] if self.attr.isdigit() else getattr(self.owner, self.attr)


def _sources(m: nn.Module) -> list[int]:
    """Absolute indices of the layers m reads (-1 is the previous layer, other negatives count back)."""
    return [m.i + j if j < 0 else j for j in ([m.f] if isinstance(m.f, int) else m.f)]


def _layer_readers(m: nn.Module, slot: int) -> list[tuple[nn.Module, str]] | None:
    """The convs that read input `slot` of layer m linearly over channels, or None if something else does."""
    return export_input_convs(m, slot)  # from the block's declaration (models/blocks.py)


def _channel_counts(model: nn.Module) -> dict[int, int]:
    """Output channels of every layer, from one small probe forward pass."""
    layers = model.model
    counts: dict[int, int] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out: counts.__setitem__(mod.i, out.shape[1]))
             for m in layers if type(m).__name__ != "Detect"]  # Detect returns a tuple, and nothing reads it
    p = next(model.parameters())
    s = int(max(getattr(model, "stride", torch.tensor([32.0])).max(), 32)) * 2
    try:
        with torch.no_grad():
            model(torch.zeros(1, model.yaml.get("ch", 3), s, s, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
    return counts


def _find_readers(layers: nn.Sequential, i: int, counts: dict[int, int], offset: int = 0,
                  direct: bool = True) -> list[_Reader] | None:
    """Every conv that reads the channels produced by layer i, following Concat/Upsample/MaxPool."""
    readers: list[_Reader] = []
    for m in layers[i + 1 :]:
        srcs = _sources(m)
        for slot, src in enumerate(srcs):
            if src != i:
                continue
            if isinstance(m, Concat):
                if m.d != 1:
                    return None
                inner = offset + sum(counts[s] for s in srcs[:slot])
                sub = _find_readers(layers, m.i, counts, inner, direct=False)
            elif isinstance(m, pass_through_types()):  # per-channel: order passes through
                sub = _find_readers(layers, m.i, counts, offset, direct=False)
            else:
                found = _layer_readers(m, slot)
                sub = None if found is None else [_Reader(o, a, offset, direct) for o, a in found]
            if sub is None:
                return None
            readers += sub
    return readers


def _copy_layer_attrs(src: nn.Module, dst: nn.Module, new_type: str) -> nn.Module:
    dst.i, dst.f, dst.type, dst.np = src.i, src.f, new_type, sum(x.numel() for x in dst.parameters())
    return dst


# --- the rewrite -----------------------------------------------------------------------------------------
@torch.no_grad()
def to_export_form(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Rewrite every SPD layer (space_to_depth, Focus, SPDConv) of a DetectionModel into its export form, in place.

    The model's outputs are unchanged up to float rounding (the same products summed in another
    order). Idempotent: a model already in export form is returned as it is. Returns the model.
    """
    layers = getattr(model, "model", None)
    if not isinstance(layers, nn.Sequential) or not any(isinstance(m, (space_to_depth, Focus, SPDConv)) for m in layers):
        return model
    was_training = model.training
    model.eval()
    counts = _channel_counts(model)
    summary = {"folded": 0, "blocks": 0, "ordered": 0}
    for idx, m in enumerate(layers):
        if isinstance(m, (Focus, SPDConv)):  # space-to-depth, then a conv: the same fold either way
            conv = m.conv.conv
            c_in = conv.in_channels // 4
            if _foldable(conv, c_in):
                m.conv.conv = fold_space_to_depth(conv)
                layers[idx] = _copy_layer_attrs(m, m.conv, "Conv")  # a Focus is a Conv on the full image
                summary["folded"] += 1
            else:
                layers[idx] = _copy_layer_attrs(m, FocusOrdered(m.conv), "FocusOrdered")
                summary["ordered"] += 1
        elif isinstance(m, space_to_depth):
            c = counts[m.i] // 4
            readers = _find_readers(layers, m.i, counts)
            if readers and all(r.direct and r.offset == 0 and _foldable(r.conv, c) for r in readers):
                for r in readers:
                    folded = fold_space_to_depth(r.conv)
                    if r.attr.isdigit():
                        r.owner[int(r.attr)] = folded
                    else:
                        setattr(r.owner, r.attr, folded)
                layers[idx] = _copy_layer_attrs(m, SpaceToDepthFolded(), "SpaceToDepthFolded")
                summary["folded"] += 1
            elif readers and all(r.conv.groups == 1 for r in readers):
                for r in readers:
                    permute_input_channels(r.conv, r.offset, c)
                layers[idx] = _copy_layer_attrs(m, SpaceToDepthBlocks(), "SpaceToDepthBlocks")
                summary["blocks"] += 1
            else:
                layers[idx] = _copy_layer_attrs(m, SpaceToDepthOrdered(), "SpaceToDepthOrdered")
                summary["ordered"] += 1
    model.spd_export_form = summary
    model.train(was_training)
    if verbose:
        LOGGER.info(f"SPD export form: {summary['folded']} folded into stride-2 convs, {summary['blocks']} as SpaceToDepth "
                    f"with permuted readers, {summary['ordered']} as one reshape/permute")
    return model


def has_slice_spd(model: nn.Module) -> bool:
    """True while any SPD layer still slices (the authors' form)."""
    return any(isinstance(m, (space_to_depth, Focus, SPDConv)) for m in model.modules())
