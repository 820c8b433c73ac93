"""Exact, function-preserving transfer of plain YOLOv5 weights into the SPD-Conv twin of the model.

Two identities make the transfer exact (up to float summation order):

* Stem. A 2K x 2K stride-2 conv with padding 2p equals `Focus` (space-to-depth of the image, then a
  K x K stride-1 conv with padding p) once the taps are rearranged:
  W'[o, k*C + i, u, v] = W[o, i, 2u + dr_k, 2v + dc_k], where block k of space-to-depth holds the
  pixel phase (dr_k, dc_k) = (0,0), (1,0), (0,1), (1,1) (the SPD-Conv authors' order).
  Proof: Focus reads input pixel (2(y+u-p) + dr, ...) = (2y + (2u+dr) - 2p, ...), which is the
  plain conv's tap a = 2u + dr at padding 2p.
* Downsampling. A k x k (odd k) stride-2 conv gives out[y, x] = full[2y, 2x], where `full` is the same
  conv at stride 1; BN and SiLU act per pixel, so Conv(stride 1) -> space_to_depth puts the plain output
  in channel block 0 (phase (0,0)). Every layer that reads that tensor gets the plain weights on those
  channels and zeros on the other three phases; after a Concat the block moves by the channel offset
  of its Concat input, which is tracked per tensor as a channel embedding (plain channel -> SPD channel).

Layer indices shift by one per inserted `space_to_depth`; they are derived by walking both configs.

The paper-order family (`-spdconv`, `-spdlite`, `-p2`, `-p2-spdconv`) pairs layer for layer instead:
a stride-2 Conv becomes an SPDConv whose kernel holds the same taps in the matching phases
(`spdconv_kernel` = models.space_to_depth.strided_to_spd_kernel, with its proof), and a P2 model's extra
layers start as YOLOv5 initialises them.

Usage:
    python -m models.spd convert --weights yolov5n.pt --cfg yolov5n-spd.yaml --out yolov5n-spd.pt
    python -m models.spd convert --weights yolov5n.pt --cfg yolov5n-p2-spdconv.yaml
"""
from __future__ import annotations

import argparse
import os
import sys
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from models.blocks import CONV_REPEATS, declarations, out_weights, pass_through, transfer_input_readers  # noqa: E402
from models.space_to_depth import rearrange_stem_weight, strided_to_spd_kernel as spdconv_kernel  # noqa: E402
from models.yolo import DetectionModel, load_cfg, parse_model  # noqa: E402
from utils.errors import UserError, report_user_errors  # noqa: E402
from utils.logging import LOGGER  # noqa: E402

_CONSTANTS = {"None": None, "True": True, "False": False}


# --- configs ---------------------------------------------------------------------------------------
def _cfg(cfg: str | Path | dict) -> dict:
    return load_cfg(cfg)


def _name(cfg: dict, default: str) -> str:
    return str(cfg.get("yaml_file") or default)


def _layers(cfg: dict) -> list:
    try:
        layers = list(cfg["backbone"]) + list(cfg["head"])
        return [(f, int(n), str(m), list(args)) for f, n, m, args in layers]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"model config {_name(cfg, '')} has no valid backbone/head layer list ({e})") from None


def _args(args: list) -> list:
    """Config arguments with YOLOv5's string constants ('None', 'True') resolved, for comparison."""
    return [_CONSTANTS.get(a, a) if isinstance(a, str) else a for a in args]


def _froms(f, i: int) -> list[int]:
    """Absolute source indices of layer i (negative entries are relative to i, as in the forward pass)."""
    return [x + i if x < 0 else x for x in ([f] if isinstance(f, int) else f)]


def _conv_geometry(args: list) -> tuple:
    """(c2, k, s, p, extra) of a Conv/Focus argument list, padding resolved the way autopad does it."""
    args = _args(args)
    c2 = args[0]
    k = args[1] if len(args) > 1 else 1
    s = args[2] if len(args) > 2 else 1
    p = args[3] if len(args) > 3 and args[3] is not None else k // 2
    return c2, k, s, p, args[4:]


def is_spd_cfg(cfg: str | Path | dict) -> bool:
    """True for a config with at least one space_to_depth layer (an SPD-Conv model)."""
    return any(m == "space_to_depth" for _, _, m, _ in _layers(_cfg(cfg)))


@dataclass(frozen=True)
class LayerPair:
    """One plain layer and its SPD counterpart: `spd` holds the weights, `out` gives the same output."""

    kind: str  # "same" (identical layer), "stem" (Conv 2Kx2K/s2 -> Focus KxK), "spd" (Conv s2 -> Conv s1 + space_to_depth)
    plain: int
    spd: int
    out: int


_HEADER_KEYS = ("nc", "depth_multiple", "width_multiple", "anchors")


def _check_headers(plain: dict, spd: dict, pn: str, sn: str) -> None:
    for key in _HEADER_KEYS:
        if plain.get(key) != spd.get(key):
            raise UserError(f"{pn} and {sn} are not twins: {key} differs ({plain.get(key)} vs {spd.get(key)})")
    for key, default in (("activation", None), ("ch", 3)):
        if plain.get(key, default) != spd.get(key, default):
            a, b = plain.get(key, default), spd.get(key, default)
            raise UserError(f"{pn} and {sn} are not twins: {key} differs ({a} vs {b})")


def pair_layers(plain_cfg: str | Path | dict, spd_cfg: str | Path | dict) -> list[LayerPair]:
    """Walk both layer lists side by side and pair every plain layer with its SPD counterpart.

    Raises UserError if the configs are not twins (header, modules, arguments or wiring differ).
    """
    plain, spd = _cfg(plain_cfg), _cfg(spd_cfg)
    pn, sn = _name(plain, "the plain config"), _name(spd, "the SPD config")
    _check_headers(plain, spd, pn, sn)
    P, S = _layers(plain), _layers(spd)
    pairs: list[LayerPair] = []
    out: dict[int, int] = {-1: -1}  # plain layer -> SPD layer with the same output (-1: the image)
    s = 0
    for i, (f, n, m, args) in enumerate(P):
        if s >= len(S):
            raise UserError(f"{pn} and {sn} are not twins: {sn} ends before plain layer {i} ({m} {args})")
        fs, ns, ms, argss = S[s]
        where = f"plain layer {i} ({m} {args}) vs SPD layer {s} ({ms} {argss})"
        kind = "same"
        if m == "Conv" and ms == "Focus":
            c, k, st, p, extra = _conv_geometry(args)
            cs, ks, sts, ps, extras = _conv_geometry(argss)
            ok = c == cs and st == 2 and sts == 1 and k == 2 * ks and p == 2 * ps
            if not (ok and not extra and not extras and n == ns == 1):
                raise UserError(f"{pn} and {sn} are not twins: {where}; a Focus stem [c, K] (padding p) twins Conv [c, 2K, 2, 2p]")
            kind = "stem"
        elif m == "Conv" and ms == "Conv" and _conv_geometry(args)[2] == 2 and _conv_geometry(argss)[2] == 1:
            c, k, st, p, extra = _conv_geometry(args)
            cs, ks, sts, ps, extras = _conv_geometry(argss)
            nxt = S[s + 1] if s + 1 < len(S) else None
            ok = c == cs and k == ks and k % 2 == 1 and p == ps
            if not (ok and not extra and not extras and n == ns == 1):
                raise UserError(f"{pn} and {sn} are not twins: {where}; stride-2 Conv [c, k, 2] twins Conv [c, k, 1] + space_to_depth")
            if nxt is None or nxt[2] != "space_to_depth" or _froms(nxt[0], s + 1) != [s]:
                raise UserError(f"{pn} and {sn} are not twins: {where} is not followed by space_to_depth of its output")
            kind = "spd"
        elif not (m == ms and n == ns and _args(args) == _args(argss)):
            raise UserError(f"{pn} and {sn} are not twins: {where}")

        want = [out[x] if x in out else None for x in _froms(f, i)]
        if None in want or want != _froms(fs, s):
            raise UserError(f"{pn} and {sn} are not twins: {where} read different layers ({f} vs {fs})")
        o = s + 1 if kind == "spd" else s
        pairs.append(LayerPair(kind, i, s, o))
        out[i] = o
        s = o + 1
    if s != len(S):
        raise UserError(f"{pn} and {sn} are not twins: {sn} has extra layers from {s} on ({S[s][2]} ...)")
    return pairs


def layer_map(plain_cfg: str | Path | dict, spd_cfg: str | Path | dict) -> dict[int, int]:
    """Plain layer index -> index of the SPD layer that takes its weights (and state-dict keys).

    For a stride-2 Conv that is the stride-1 Conv right before its space_to_depth (whose output is
    at index +1); for the 6x6 stem it is the Focus. Raises UserError if the configs are not twins.
    """
    return {p.plain: p.spd for p in pair_layers(plain_cfg, spd_cfg)}


def _plain_froms(f, s: int, i: int, out: dict[int, int]):
    """SPD `from` of layer s rewritten for plain layer i: relative -1 stays -1, the rest absolute."""
    if s == 0:
        return f  # the first layer reads the image
    fl = [f] if isinstance(f, int) else list(f)
    srcs = [out[x] for x in _froms(fl, s)]
    nf = [-1 if fx == -1 and x == i - 1 else x for fx, x in zip(fl, srcs)]
    return nf[0] if isinstance(f, int) else nf


def plain_twin_of(spd_cfg: str | Path | dict) -> dict:
    """The plain YOLOv5 config an SPD config was derived from (Focus[c,K] -> Conv[c,2K,2,2p], Conv s1 + SPD -> Conv s2)."""
    spd = _cfg(spd_cfg)
    S = _layers(spd)
    nb = len(spd["backbone"])
    out: dict[int, int] = {}  # SPD layer -> plain layer with the same output
    layers, n_backbone = [], 0
    s = 0
    while s < len(S):
        f, n, m, args = S[s]
        i = len(layers)
        nf = _plain_froms(f, s, i, out)
        step = 1
        if m == "Focus":
            c, k, st, p, extra = _conv_geometry(args)
            if st != 1 or extra:
                raise UserError(f"SPD layer {s} (Focus {args}) has no plain twin (only Focus [c, K] with stride 1)")
            entry = [nf, n, "Conv", [args[0], 2 * k, 2, 2 * p]]
        elif m == "Conv" and s + 1 < len(S) and S[s + 1][2] == "space_to_depth" and _froms(S[s + 1][0], s + 1) == [s]:
            c, k, st, p, extra = _conv_geometry(args)
            if st != 1 or k % 2 == 0 or extra:
                raise UserError(f"SPD layer {s} (Conv {args}) before space_to_depth has no plain twin (needs odd k, s=1)")
            entry = [nf, n, "Conv", [args[0], k, 2] + ([args[3]] if len(args) > 3 else [])]
            step = 2
        elif m == "space_to_depth":
            raise UserError(f"SPD layer {s} (space_to_depth) does not follow a Conv: it has no plain twin")
        else:
            entry = [nf, n, m, list(args)]
        layers.append(entry)
        for j in range(s, s + step):
            out[j] = i
        if s + step <= nb:
            n_backbone = len(layers)
        s += step
    plain = {k: v for k, v in spd.items() if k not in ("backbone", "head")}
    plain["backbone"], plain["head"] = layers[:n_backbone], layers[n_backbone:]
    if "yaml_file" in spd:
        plain["yaml_file"] = str(spd["yaml_file"]).replace("-spd", "")
    return plain


# --- tensors ---------------------------------------------------------------------------------------
def route_input_channels(w: torch.Tensor, positions: torch.Tensor, c_in: int) -> torch.Tensor:
    """Place the input-channel slices of a conv kernel at `positions` of a wider input, zeros elsewhere.

    w: (O, C, kh, kw); positions: (C,) long, plain input channel j -> SPD input channel positions[j].
    """
    if w.shape[1] != len(positions):
        raise ValueError(f"kernel reads {w.shape[1]} channels but {len(positions)} positions were given")
    out = torch.zeros((w.shape[0], c_in, *w.shape[2:]), dtype=w.dtype, device=w.device)
    out[:, positions] = w
    return out


def _sequential(n: int, m: str) -> bool:
    """A module repeated n > 1 times is an nn.Sequential of n copies, unless it takes the repeats inside (C3)."""
    d = declarations().get(m)
    return n > 1 and not (d is not None and d.kind == CONV_REPEATS)


def _prefix(i: int, n: int, m: str) -> str:
    return f"model.{i}.0." if _sequential(n, m) else f"model.{i}."  # of a Sequential, the first reads the input


def _out_channels(shapes: dict, i: int, n: int, m: str, cin: list[int]) -> int | None:
    if m == "Concat":
        return sum(cin)
    if m == "space_to_depth":
        return 4 * cin[0]
    if m in pass_through():
        return cin[0]
    if m == "Detect":
        return None
    out_weight = out_weights().get(m)  # declared per block (models/blocks.py)
    if out_weight:
        last = f"model.{i}.{n - 1}." if _sequential(n, m) else f"model.{i}."
        return int(shapes[last + out_weight][0])
    raise UserError(f"layer {i}: module {m} is not supported by the SPD transfer")


def _spd_shapes(spd_cfg: dict) -> dict[str, torch.Size]:
    """Key -> shape of the SPD model's state dict, built on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        layers, _ = parse_model(deepcopy(spd_cfg), ch=[int(spd_cfg.get("ch", 3))], verbose=False)
    return {f"model.{k}": v.shape for k, v in layers.state_dict().items()}


def transfer_state_dict(
    plain_state: dict, plain_cfg: str | Path | dict, spd_cfg: str | Path | dict, allow_new_nc: bool = False
) -> dict:
    """Map a plain YOLOv5 state dict onto the SPD twin config; the result computes the same function.

    Every SPD tensor is produced (UserError if the configs are not twins or the state does not fit).
    With allow_new_nc and a different nc in spd_cfg, the Detect output convs are left out (the
    caller keeps their fresh init); everything else is still transferred exactly.
    """
    plain, spd = _cfg(plain_cfg), _cfg(spd_cfg)
    new_nc = allow_new_nc and spd.get("nc") != plain.get("nc")
    pairs = pair_layers(plain, {**spd, "nc": plain.get("nc")} if new_nc else spd)
    target = _spd_shapes(spd)
    plain_shapes = {k: v.shape for k, v in plain_state.items()}
    P, S = _layers(plain), _layers(spd)
    sn = _name(spd, "the SPD config")

    emb: dict[int, torch.Tensor] = {}  # plain layer -> SPD channel of each of its output channels
    spd_ch: dict[int, int] = {}  # SPD layer -> its output channel count
    result: dict = {}
    used: set[str] = set()
    skipped: list[str] = []
    # per block type (models/blocks.py): the weights that read a layer's input, the layers that keep channels
    input_readers, passes = transfer_input_readers(), pass_through()
    for pair in pairs:
        i, s = pair.plain, pair.spd
        f, n, m, _ = P[i]
        fs, ns, ms, _ = S[s]
        src_p, src_s = _froms(f, i), _froms(fs, s)
        if i == 0:
            ch0 = int(spd.get("ch", 3))
            in_emb, in_ch = [torch.arange(ch0)], [ch0]
        else:
            in_emb, in_ch = [emb[x] for x in src_p], [spd_ch[x] for x in src_s]
        routed = any(len(e) != c or not torch.equal(e, torch.arange(c)) for e, c in zip(in_emb, in_ch))

        pre_p, pre_s = f"model.{i}.", f"model.{s}."
        readers: dict[str, tuple[torch.Tensor, int]] = {}  # plain key -> (positions, SPD channels)
        if m == "Detect":
            readers = {f"{pre_p}m.{k}.weight": (in_emb[k], in_ch[k]) for k in range(len(in_emb))}
        elif routed and m in input_readers:
            readers = {_prefix(i, n, m) + r: (in_emb[0], in_ch[0]) for r in input_readers[m]}
        elif routed and m not in passes and m != "Concat":
            raise UserError(f"plain layer {i} ({m}) reads a space-to-depth output, which the transfer cannot route for {m}")

        for key in [k for k in plain_state if k.startswith(pre_p)]:
            rest = key[len(pre_p):]
            v = plain_state[key]
            if pair.kind == "stem":
                tkey = f"{pre_s}conv.{rest}"  # Focus wraps the Conv as .conv
                if rest == "conv.weight":
                    v = rearrange_stem_weight(v)
            else:
                tkey = pre_s + rest
            if key in readers:
                pos, c_in = readers[key]
                if v.shape[1] != len(pos):
                    raise UserError(f"plain layer {i} ({m}): {key} reads {v.shape[1]} channels, expected {len(pos)} "
                                    "(grouped convs cannot be routed)")
                v = route_input_channels(v, pos, c_in)
            if new_nc and m == "Detect" and rest.startswith("m."):
                skipped.append(tkey)
                used.add(key)
                continue
            if tkey not in target:
                raise UserError(f"{key} has no counterpart {tkey} in {sn}")
            if tuple(v.shape) != tuple(target[tkey]):
                raise UserError(f"{key} -> {tkey}: shape {tuple(v.shape)} does not fit {tuple(target[tkey])} in {sn}")
            result[tkey] = v.clone()
            used.add(key)

        # channel bookkeeping for the layers downstream
        if pair.kind == "spd":
            c = _out_channels(plain_shapes, i, n, m, [len(e) for e in in_emb])
            emb[i] = torch.arange(c)  # the plain output is phase (0,0): the first channel block
            spd_ch[s] = _out_channels(target, s, ns, ms, in_ch)
            spd_ch[pair.out] = 4 * spd_ch[s]
        elif m == "Concat":
            offsets = torch.tensor([0] + in_ch[:-1]).cumsum(0).tolist()
            emb[i] = torch.cat([e + o for e, o in zip(in_emb, offsets)])
            spd_ch[s] = sum(in_ch)
        elif m in passes:
            emb[i], spd_ch[s] = in_emb[0], in_ch[0]
        elif m != "Detect":
            c = _out_channels(plain_shapes, i, n, m, [len(e) for e in in_emb])
            emb[i] = torch.arange(c)
            spd_ch[s] = _out_channels(target, s, ns, ms, in_ch)

    unused = sorted(set(plain_state) - used)
    if unused:
        raise UserError(f"plain weights have {len(unused)} tensor(s) the config does not describe, e.g. {unused[0]}")
    missing = sorted(set(target) - set(result) - set(skipped))
    if missing:
        raise UserError(f"transfer into {sn} left {len(missing)} tensor(s) uncovered, e.g. {missing[0]} (are the weights fused?)")
    return result


def transfer_checkpoint(
    weights: str | Path, spd_cfg: str | Path | dict, nc: int | None = None, verbose: bool = True
) -> tuple[dict, dict[int, str]]:
    """Load any plain YOLOv5 checkpoint and return (state dict, class names) for `spd_cfg`.

    `spd_cfg` is an SPD twin (-spd), an SPDConv variant (-spdconv, -spdlite) or a P2 variant of the
    checkpoint's config. With nc different from the checkpoint's, the Detect output convs are left out
    (strict=False load keeps their fresh init), as YOLOv5 does for a new class count; so are the new
    layers of a P2 model. Everything else transfers exactly, except into SPDConv(k=1) layers (said in the log).
    """
    state, names, _ = transfer_plain_weights(weights, spd_cfg, nc, verbose)
    return state, names


def transfer_plain_weights(weights: str | Path, spd_cfg: str | Path | dict, nc: int | None = None,
                           verbose: bool = True) -> tuple[dict, dict[int, str], bool]:
    """transfer_checkpoint, also returning whether the result computes the plain function (on the shared levels)."""
    from models.checkpoints import read_checkpoint
    from utils.checkpoints import resolve_weights

    info = read_checkpoint(resolve_weights(weights))
    plain = {**info["cfg"], "yaml_file": info["cfg"].get("yaml_file") or f"the config in {Path(weights).name}"}
    spd = _cfg(spd_cfg)
    if is_spd_cfg(plain) or uses_spdconv(plain):
        raise UserError(f"{weights} is already an SPD-Conv checkpoint: load it directly instead of transferring")
    if not wants_transfer(plain, spd):
        raise UserError(f"{_name(spd, 'the target config')} has no space_to_depth or SPDConv layer and no extra detection "
                        "level: it is not an SPD config or a P2 model, so there is nothing to transfer")
    if nc is not None:
        spd["nc"] = int(nc)
    try:
        new_nc = int(spd["nc"]) != int(plain["nc"])
        if is_spd_cfg(spd):
            state = transfer_state_dict(info["state_dict"], plain, spd, allow_new_nc=nc is not None)
            exact, new_layers = True, []
        else:
            state, exact, new_layers = transfer_family_state_dict(info["state_dict"], plain, spd, allow_new_nc=nc is not None)
    except (TypeError, ValueError, IndexError, KeyError, AttributeError) as e:  # a damaged config in the file
        raise UserError(f"{weights}: its model config is malformed ({type(e).__name__}: {str(e)[:160]})") from None
    total = len(info["state_dict"])
    detect = f"model.{len(_layers(plain)) - 1}.m."
    done = total - sum(k.startswith(detect) for k in info["state_dict"]) if new_nc else total
    name = _name(spd, "the SPD config")
    extra = [f"the Detect outputs re-initialised for nc={spd['nc']} instead of {plain['nc']}"] if new_nc else []
    if new_layers:
        extra.append(f"new layers {new_layers[0]}-{new_layers[-1]} and the new detection level initialised as YOLOv5 does")
    if exact:
        scope = "function-preserving on the shared levels" if new_layers else "function-preserving"
        msg = f"Transferred {done}/{total} plain tensors exactly into {name} ({'; '.join([scope, *extra])})"
    else:
        msg = (f"Transferred {done}/{total} plain tensors APPROXIMATELY into {name}: an SPDConv(k=1) cannot hold the "
               "outer taps of a stride-2 conv (the -1 taps of a 3x3, the outer ones of the 6x6 stem), so each was added "
               f"to the nearest tap it has. NOT function-preserving: the model starts near, not at, the plain one"
               + "".join(f"; {e}" for e in extra))
    if verbose:  # (train.py reports the transfer itself, in the same words for every path)
        LOGGER.info(msg)
    return state, info["names"], exact


# --- the model family: SPDConv (paper order) and P2 heads, layer for layer -----------------------------
def uses_spdconv(cfg: str | Path | dict) -> bool:
    """True for a config with an SPDConv layer (the paper-order family: -spdconv, -spdlite, -p2-spdconv)."""
    return any(m == "SPDConv" for _, _, m, _ in _layers(_cfg(cfg)))


def _detect_froms(cfg: dict) -> list[int]:
    L = _layers(cfg)
    f, _, m, _ = L[-1]
    if m != "Detect":
        raise UserError(f"the last layer of {_name(cfg, 'the config')} must be Detect")
    return _froms(f, len(L) - 1)


def wants_transfer(source_cfg: str | Path | dict, target_cfg: str | Path | dict) -> bool:
    """True when weights of source_cfg go into target_cfg through transfer_checkpoint, not by key names.

    That is plain weights into an SPD twin (-spd), an SPDConv config or one with more detection levels (P2).
    """
    src, tgt = _cfg(source_cfg), _cfg(target_cfg)
    if is_spd_cfg(src) or uses_spdconv(src):
        return False
    return is_spd_cfg(tgt) or uses_spdconv(tgt) or len(_detect_froms(tgt)) > len(_detect_froms(src))


def _spdconv_geometry(args: list) -> tuple:
    """(c2, k, p, extra) of an SPDConv argument list [c2, k=3, p=None, ...]."""
    args = _args(args)
    k = args[1] if len(args) > 1 else 3
    p = args[2] if len(args) > 2 and args[2] is not None else k // 2
    return args[0], k, p, args[3:]


def _pair_family_layer(i: int, pl: tuple, tl: tuple, where: str) -> str:
    """'same' or 'spdconv' for plain layer pl and target layer tl at the same index; UserError otherwise."""
    (f, n, m, args), (ft, nt, mt, argst) = pl, tl
    if _froms(f, i) != _froms(ft, i) or n != nt:
        raise UserError(f"{where}: they read different layers or repeat differently ({f} x{n} vs {ft} x{nt})")
    if m == mt and _args(args) == _args(argst):
        return "same"
    if m == "Conv" and mt == "SPDConv" and n == 1:
        c, k, s, p, extra = _conv_geometry(args)
        ct, kt, pt, extrat = _spdconv_geometry(argst)
        if c == ct and s == 2 and k in (2 * p + 1, 2 * p + 2) and not extra and not extrat and pt == kt // 2:
            return "spdconv"
    raise UserError(f"{where}; a stride-2 Conv [c, k, 2, p] (k = 2p+1 or 2p+2) twins SPDConv [c, K]")


def pair_family(plain_cfg: str | Path | dict, target_cfg: str | Path | dict) -> tuple[list[str], dict[int, int]]:
    """Pair a plain config with an SPDConv / P2 variant layer for layer (same indices).

    Returns (kind of every plain layer but Detect, plain Detect level -> target Detect level). Target
    layers beyond the plain ones (the P2 stage) are new; shared layers may not read them.
    """
    plain, tgt = _cfg(plain_cfg), _cfg(target_cfg)
    pn, tn = _name(plain, "the plain config"), _name(tgt, "the target config")
    for key, default in (("nc", None), ("depth_multiple", None), ("width_multiple", None), ("activation", None), ("ch", 3)):
        if plain.get(key, default) != tgt.get(key, default):
            raise UserError(f"{pn} and {tn} are not twins: {key} differs ({plain.get(key, default)} vs {tgt.get(key, default)})")
    P, T = _layers(plain), _layers(tgt)
    if len(T) < len(P):
        raise UserError(f"{pn} and {tn} are not twins: {tn} has fewer layers ({len(T)} < {len(P)})")
    kinds = [_pair_family_layer(i, P[i], T[i], f"{pn} and {tn} are not twins: plain layer {i} ({P[i][2]} {P[i][3]}) "
                                f"vs layer {i} ({T[i][2]} {T[i][3]})") for i in range(len(P) - 1)]
    dp, dt = _detect_froms(plain), _detect_froms(tgt)
    if not set(dp) <= set(dt) or [x for x in dt if x in dp] != dp:
        raise UserError(f"{pn} and {tn} are not twins: Detect reads {dt} in {tn}, which does not contain {dp} in order")
    na = lambda a: len(a[0]) // 2 if isinstance(a, list) else int(a)  # noqa: E731
    if na(plain["anchors"]) != na(tgt["anchors"]):
        raise UserError(f"{pn} and {tn} are not twins: {na(plain['anchors'])} vs {na(tgt['anchors'])} anchors per level")
    return kinds, {j: dt.index(x) for j, x in enumerate(dp)}


def _layer_strides(cfg: dict) -> list[float]:
    """Output stride of every layer, from the config alone (no model built)."""
    strides: list[float] = []
    for i, (f, n, m, args) in enumerate(_layers(cfg)):
        src = _froms(f, i)
        s = 1.0 if src[0] == -1 else strides[src[0]]
        a = _args(args)
        if m == "Conv":
            s *= _conv_geometry(args)[2] ** n
        elif m == "Focus":
            s *= 2 * (a[2] if len(a) > 2 else 1)
        elif m in ("SPDConv", "space_to_depth"):
            s *= 2**n
        elif m == "nn.Upsample":
            s /= a[1]
        elif m == "nn.MaxPool2d":
            s *= a[1] if len(a) > 1 and a[1] is not None else a[0]
        strides.append(s)
    return strides


def transfer_family_state_dict(plain_state: dict, plain_cfg: str | Path | dict, target_cfg: str | Path | dict,
                               allow_new_nc: bool = False) -> tuple[dict, bool, list[int]]:
    """Map plain weights onto an SPDConv and/or P2 variant: (state dict, exact, indices of new layers).

    Shared layers keep their keys (an SPDConv's Conv sits one level down, `.conv.`), SPDConv kernels come
    from spdconv_kernel, Detect outputs and anchors go to the level of the same stride. The new layers
    and the new levels' output convs are left out (the caller keeps YOLOv5's fresh init); the new
    levels' anchors are the config's, in grid units. exact is False where an SPDConv(k=1) took part.
    """
    plain, tgt = _cfg(plain_cfg), _cfg(target_cfg)
    new_nc = allow_new_nc and tgt.get("nc") != plain.get("nc")
    kinds, level = pair_family(plain, {**tgt, "nc": plain.get("nc")} if new_nc else tgt)
    P, T = _layers(plain), _layers(tgt)
    target = _spd_shapes(tgt)
    tn = _name(tgt, "the target config")
    dp, dt = len(P) - 1, len(T) - 1
    result: dict = {}
    exact = True
    for key, v in plain_state.items():
        parts = key.split(".")
        if parts[0] != "model" or not parts[1].isdigit() or int(parts[1]) > dp:
            raise UserError(f"plain weights have a tensor the config does not describe: {key}")
        i, rest = int(parts[1]), ".".join(parts[2:])
        if i == dp:
            if rest == "anchors":
                continue  # below, per level
            if rest.startswith("m.") and new_nc:
                continue
            lv = rest.split(".")
            tkey = f"model.{dt}.m.{level[int(lv[1])]}.{'.'.join(lv[2:])}" if lv[0] == "m" else f"model.{dt}.{rest}"
        elif kinds[i] == "spdconv":
            tkey = f"model.{i}.conv.{rest}"
            if rest == "conv.weight":
                _, k, _, p, _ = _conv_geometry(P[i][3])
                v, ok = spdconv_kernel(v, p, _spdconv_geometry(T[i][3])[1])
                exact &= ok
        else:
            tkey = key
        if tkey not in target or tuple(v.shape) != tuple(target[tkey]):
            got = tuple(target[tkey]) if tkey in target else "no such tensor"
            raise UserError(f"{key} -> {tkey}: shape {tuple(v.shape)} does not fit {got} in {tn}")
        result[tkey] = v.clone()
    akey = f"model.{dp}.anchors"
    if akey not in plain_state:
        raise UserError(f"plain weights have no {akey}")
    anchors = _config_anchors(tgt, dt)
    for j, jt in level.items():
        anchors[jt] = plain_state[akey][j].to(anchors.dtype)
    result[f"model.{dt}.anchors"] = anchors
    missing = sorted(set(target) - set(result))
    new_layers = sorted({int(k.split(".")[1]) for k in missing if int(k.split(".")[1]) not in (dt,)})
    if any(x < dp for x in new_layers):
        raise UserError(f"transfer into {tn} left shared layer(s) {[x for x in new_layers if x < dp]} uncovered (are the weights fused?)")
    return result, exact, new_layers


def _config_anchors(cfg: dict, dt: int) -> torch.Tensor:
    """The config's anchors in grid units (pixels / stride of each Detect input), as DetectionModel holds them."""
    a = cfg["anchors"]
    strides = _layer_strides(cfg)
    froms = _detect_froms(cfg)
    if not isinstance(a, list):  # a count: YOLOv5's placeholders, AutoAnchor replaces them before training
        a = [list(range(int(a) * 2))] * len(froms)
    t = torch.tensor(a, dtype=torch.float32).view(len(froms), -1, 2)
    return t / torch.tensor([strides[x] for x in froms]).view(-1, 1, 1)


# --- convert CLI -----------------------------------------------------------------------------------
def _lossless_half(state: dict) -> bool:
    """fp16 storage loses nothing when every float tensor already holds fp16 values (official weights do)."""
    return all(torch.equal(v, v.half().to(v.dtype)) for v in state.values() if v.is_floating_point())


@torch.no_grad()
def level_outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[float, torch.Tensor]:
    """Decoded eval outputs (boxes in pixels, scores) of each detection level, keyed by its stride."""
    z, raw = model.eval()(x)
    counts = [r.shape[1] * r.shape[2] * r.shape[3] for r in raw]
    return {float(s): zi for s, zi in zip(model.stride, z.split(counts, 1))}


@torch.no_grad()
def compare_models(a: torch.nn.Module, b: torch.nn.Module, size: int = 256, seed: int = 0) -> float:
    """Max abs difference of the decoded eval outputs (pixels and scores) of two models on a random image.

    Only the detection levels both have (same stride) are compared: a P2 model's P3-P5 against plain's.
    """
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    ya, yb = level_outputs(a, x), level_outputs(b, x)
    shared = sorted(set(ya) & set(yb))
    if not shared:
        raise UserError("the two models have no detection level of the same stride to compare")
    return max(float((ya[s] - yb[s]).abs().max()) for s in shared)


def convert(weights: str | Path, cfg: str | Path, out: str | Path, tol: float = 1e-2) -> Path:
    """Write a project-format checkpoint of the SPD/P2 variant of `weights`, verified against the plain model.

    Exact transfers must reproduce the plain outputs (on the shared levels) within tol or nothing is
    written; an approximate one (SPDConv(k=1)) is written with its measured distance in the log.
    """
    from models.checkpoints import load_model
    from utils.checkpoints import atomic_save, make_checkpoint, resolve_weights

    src, out = resolve_weights(weights), Path(out)
    if out.exists() and out.resolve() == src.resolve():
        raise UserError(f"--out {out} is the input checkpoint; choose another file name")
    state, names, exact = transfer_plain_weights(src, cfg, None)
    spd_cfg = _cfg(cfg)
    with torch.random.fork_rng(devices=[]):
        model = DetectionModel(spd_cfg, verbose=False)
    missing, _ = model.load_state_dict(state, strict=not wants_new_layers(spd_cfg, state))
    model.names = names
    half = _lossless_half(model.state_dict())
    how = "function-preserving" if exact else "approximate (SPDConv k=1: nearest taps)"
    ckpt = make_checkpoint(model, half=half, converted_from=str(weights), transfer=f"{how} plain -> {_name(spd_cfg, 'cfg')}")

    # write next to the target, verify that file, and only then replace any existing --out
    tmp = out.with_name(f".{out.name}.verify.pt")
    try:
        atomic_save(ckpt, tmp)
        diff = compare_models(load_model(src, fuse=False), load_model(tmp, fuse=False))
        if exact and not diff <= tol:
            raise UserError(f"verification failed: SPD and plain outputs differ by {diff:.3g} (> {tol}); {out} not written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    what = "verified against" if exact else "NOT exact; measured against"
    scope = "the shared detection levels" if missing else "decoded boxes and scores"
    LOGGER.info(f"Saved {out} ({'fp16' if half else 'fp32'}, {len(names)} classes); "
                f"{what} {weights}: max abs diff {diff:.3g} on a random 256x256 input ({scope})")
    return out


def wants_new_layers(cfg: dict, state: dict) -> bool:
    """True when the transferred state leaves layers to YOLOv5's fresh init (the P2 stage)."""
    with torch.device("meta"):
        keys = set(parse_model(deepcopy(cfg), ch=[int(cfg.get("ch", 3))], verbose=False)[0].state_dict())
    return bool({f"model.{k}" for k in keys} - set(state))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.spd", description="SPD-Conv weight tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="transfer plain YOLOv5 weights into an SPD, SPDConv or P2 config")
    p.add_argument("--weights", required=True, help="plain YOLOv5 checkpoint (official or this project's)")
    p.add_argument("--cfg", required=True, help="target config, e.g. yolov5n-spd.yaml, yolov5n-spdconv.yaml, yolov5n-p2.yaml")
    p.add_argument("--out", default=None, help="output checkpoint (default: <cfg name>.pt in the current folder)")
    opt = parser.parse_args(argv)
    out = opt.out or f"{Path(opt.cfg).stem}.pt"
    convert(opt.weights, opt.cfg, out)


if __name__ == "__main__":
    report_user_errors(main)()
