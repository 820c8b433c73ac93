"""Block declarations: what the config parser, the SPD transfer, the export rewrite and the checkpoint
allow-list need to know about each block type, said once per block.

A block class is declared with `@declare(...)` next to its definition (models/common.py, models/yolo.py);
torch layers a config may name are declared below. The tables those four parts used to keep by hand are
computed from the declarations (`config_modules`, `conv_like`, `transfer_input_readers`, `out_weights`,
`pass_through`, `export_input_convs`, `allow_listed_blocks`), so a new block is one declaration.

A new block goes in models/common.py with a declaration; that is all the parser, the transfer, the export
rewrite and the loader of official checkpoints need.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

# how parse_model sizes a block from the config row
CONV = "conv"  # args [c2, ...]: c1 from the input, c2 scaled by width_multiple, gets the activation
CONV_REPEATS = "conv_repeats"  # as CONV, and the row's repeat count goes inside the block (C3's n)
NORM = "norm"  # args [c1]: the input's channels
CONCAT = "concat"  # output channels: the sum of the inputs'
DETECT = "detect"  # the detection head: the input channel list is appended to its args
SPACE_TO_DEPTH = "space_to_depth"  # output channels: 4x the input's
SAME = "same"  # output channels: the input's (spatial ops)
KINDS = (CONV, CONV_REPEATS, NORM, CONCAT, DETECT, SPACE_TO_DEPTH, SAME)


@dataclass(frozen=True)
class BlockDecl:
    """One block type. Attribute paths are relative to the block (state-dict keys without 'model.i.').

    input_convs: the convs that read the block's input, all of it and only them (linear over its
      channels), e.g. ("cv1.conv", "cv2.conv") for C3; "{slot}" stands for the input's index (Detect).
      Empty: something else reads the input (the transfer and the export rewrite cannot reorder it).
    input_convs_if: a condition on a built block for input_convs to hold (Bottleneck: no residual add);
      the SPD transfer, which works from configs alone, routes only blocks without one.
    out_weight: the tensor whose first dimension is the block's output channel count.
    pass_through: every output channel is the input channel at the same index (spatial ops only).
    pickled_as: the names official YOLOv5 checkpoints pickle it under ('' for torch's own layers).
    """

    cls: type
    name: str  # the name a config row uses
    kind: str
    input_convs: tuple[str, ...] = ()
    input_convs_if: Callable[[nn.Module], bool] | None = None
    out_weight: str | None = None
    pass_through: bool = False
    pickled_as: tuple[str, ...] = ()


_DECLS: dict[str, BlockDecl] = {}


def declare(kind: str, name: str | None = None, *, input_convs: tuple[str, ...] = (),
            input_convs_if: Callable[[nn.Module], bool] | None = None, out_weight: str | None = None,
            pass_through: bool = False, pickled: bool = True) -> Callable[[type], type]:
    """Class decorator: declare a block (`name` defaults to the class name; pickled under its module path)."""
    if kind not in KINDS:
        raise ValueError(f"unknown block kind {kind!r}; one of {KINDS}")

    def register(cls: type) -> type:
        key = name or cls.__name__
        if key in _DECLS and _DECLS[key].cls is not cls:
            raise ValueError(f"block '{key}' is declared twice ({_DECLS[key].cls} and {cls})")
        pickled_as = (f"{cls.__module__}.{cls.__name__}",) if pickled else ()
        _DECLS[key] = BlockDecl(cls, key, kind, tuple(input_convs), input_convs_if, out_weight, pass_through, pickled_as)
        return cls

    return register


def undeclare(name: str) -> None:
    """Remove a declaration (tests declare throw-away blocks)."""
    _DECLS.pop(name, None)


def declarations() -> dict[str, BlockDecl]:
    """Every declared block by config name (models.common and models.yolo declare theirs when imported)."""
    return dict(_DECLS)


def declaration_of(m: nn.Module) -> BlockDecl | None:
    """The declaration of a built block's class, or of the nearest declared base class."""
    by_cls = {d.cls: d for d in _DECLS.values()}
    return next((by_cls[c] for c in type(m).__mro__ if c in by_cls), None)


# --- the tables, derived ----------------------------------------------------------------------------------
def config_modules() -> dict[str, type]:
    """Module names a config may use -> class (a registry rather than eval(), so a config cannot run code)."""
    return {k: d.cls for k, d in declarations().items()}


def conv_like() -> tuple[type, ...]:
    """Blocks parse_model sizes as convolutions (c1 from the input, c2 scaled) and gives the activation."""
    return tuple(d.cls for d in declarations().values() if d.kind in (CONV, CONV_REPEATS))


def transfer_input_readers() -> dict[str, tuple[str, ...]]:
    """Config name -> weights reading the layer's input, for blocks the SPD transfer can route from a config."""
    return {k: tuple(f"{p}.weight" for p in d.input_convs) for k, d in declarations().items()
            if d.input_convs and d.input_convs_if is None and not any("{slot}" in p for p in d.input_convs)}


def out_weights() -> dict[str, str]:
    """Config name -> the weight whose first dimension is the layer's output channel count."""
    return {k: d.out_weight for k, d in declarations().items() if d.out_weight}


def pass_through() -> set[str]:
    """Config names of layers whose output keeps each input channel where it is."""
    return {k for k, d in declarations().items() if d.pass_through}


def pass_through_types() -> tuple[type, ...]:
    return tuple(d.cls for d in declarations().values() if d.pass_through)


def export_input_convs(m: nn.Module, slot: int) -> list[tuple[nn.Module, str]] | None:
    """(owner, attribute) of every conv that reads input `slot` of the built block m linearly, or None."""
    if isinstance(m, nn.Sequential):  # n > 1 repeats of one module: only the first sees the input
        return export_input_convs(m[0], slot) if len(m) else None
    d = declaration_of(m)
    if d is None or not d.input_convs or (d.input_convs_if is not None and not d.input_convs_if(m)):
        return None
    found = []
    for path in d.input_convs:
        *owner_path, attr = path.format(slot=slot).split(".")
        owner = m
        for p in owner_path:
            owner = getattr(owner, p)
        found.append((owner, attr))
    return found


def allow_listed_blocks() -> list:
    """What official checkpoints may name for the declared blocks: (class, pickled path) pairs, torch classes."""
    out: list = []
    for d in declarations().values():
        out += [(d.cls, path) for path in d.pickled_as] if d.pickled_as else [d.cls]
    return out


# torch layers a config may name, declared here because their classes are torch's
declare(SAME, "nn.Upsample", pass_through=True, pickled=False)(nn.Upsample)
declare(NORM, "nn.BatchNorm2d", out_weight="weight", pickled=False)(nn.BatchNorm2d)
declare(SAME, "nn.MaxPool2d", pass_through=True, pickled=False)(nn.MaxPool2d)
declare(SAME, "nn.Identity", pass_through=True, pickled=False)(nn.Identity)
