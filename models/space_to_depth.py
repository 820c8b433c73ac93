"""Space-to-depth: the one place that fixes its channel order, and every weight rearrangement that follows from it.

Channel block k of space-to-depth holds the pixel phase (row, col) = PHASES[k] = (0,0), (1,0), (0,1), (1,1),
the SPD-Conv authors' order (their four strided slices). Checkpoints of SPD models depend on this order,
so every other form (one reshape, ONNX's block-major SpaceToDepth, folded kernels) is derived from it here:

* `space_to_depth_slices` / `space_to_depth_ordered`: the op itself (four slices, or one reshape/permute);
* `to_block_order`, `slice_order_index`: ONNX's block-major order and the channel index between the two;
* `strided_to_spd_kernel`: the kernel of a stride-2 conv as a stride-1 conv on the space-to-depth input
  (the SPD transfer, SPDConv and the ResNet variants), `rearrange_stem_weight` its 2K x 2K stem case;
* `depth_to_space_kernel`: the inverse, a conv on the space-to-depth input as a conv on the full input
  (the export fold).
"""
from __future__ import annotations

import torch

PHASES = ((0, 0), (1, 0), (0, 1), (1, 1))  # (row, col) phase of channel block k = 0..3
# Slice-order channel block of each block-major phase p = 2 * row + col: blocks 1 and 2 trade places.
_SLICE_BLOCK_OF_PHASE = tuple(PHASES.index((p // 2, p % 2)) for p in range(4))


def check_even_hw(x: torch.Tensor, what: str) -> None:
    """SPD needs even spatial sizes; cropping silently would drop a row/column of pixels."""
    h, w = x.shape[-2:]
    if not torch.jit.is_tracing() and (int(h) % 2 or int(w) % 2):
        raise ValueError(
            f"{what} needs even height and width, got {int(h)}x{int(w)}: "
            "use an input size that is a multiple of the model stride"
        )


def _slices(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[..., dr::2, dc::2] for dr, dc in PHASES], -3)


def space_to_depth_slices(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2) in the SPD-Conv authors' channel order (block k = phase PHASES[k])."""
    check_even_hw(x, "space_to_depth")
    return _slices(x)


def space_to_depth_ordered(x: torch.Tensor) -> torch.Tensor:
    """The authors' channel order (same values as the four slices) as one reshape/permute."""
    check_even_hw(x, "space_to_depth")
    b, c, h, w = x.shape
    # block k = dr + 2 * dc (PHASES): the column phase is the outer index
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 5, 3, 1, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def to_block_order(x: torch.Tensor) -> torch.Tensor:
    """Space-to-depth in ONNX SpaceToDepth's block-major order: channel (2 * row + col) * C + c (no size check)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def slice_order_index(c: int, device: torch.device | None = None) -> torch.Tensor:
    """idx such that to_block_order(x) == space_to_depth_slices(x)[:, idx] for x with c channels."""
    return torch.cat([torch.arange(c, device=device) + k * c for k in _SLICE_BLOCK_OF_PHASE])


def depth_to_space_kernel(w: torch.Tensor) -> torch.Tensor:
    """(O, 4C, K, L) kernel over space_to_depth_slices(x) -> (O, C, 2K, 2L) kernel over x (stride and padding double).

    Tap (t, u) of channel k * C + c, phase (dr, dc) = PHASES[k], reads pixel (2t + dr, 2u + dc) of the input.
    """
    o, c4, kh, kw = w.shape
    # slice channel index k * C + c with k = dr + 2 * dc: view as (o, dc, dr, c, t, u)
    return w.view(o, 2, 2, c4 // 4, kh, kw).permute(0, 3, 4, 2, 5, 1).reshape(o, c4 // 4, 2 * kh, 2 * kw)


def rearrange_stem_weight(w: torch.Tensor) -> torch.Tensor:
    """(O, C, 2K, 2K) stride-2 stem kernel -> (O, 4C, K, K) kernel for Focus (space-to-depth then conv).

    W'[o, k*C + i, u, v] = W[o, i, 2u + dr_k, 2v + dc_k] for phase k = (dr_k, dc_k): space-to-depth of the kernel.
    """
    if w.ndim != 4 or w.shape[2] % 2 or w.shape[3] % 2:
        raise ValueError(f"stem kernel must be (O, C, 2K, 2K) with even sides, got {tuple(w.shape)}")
    return _slices(w).contiguous()


def strided_to_spd_kernel(w: torch.Tensor, p: int, k: int) -> tuple[torch.Tensor, bool]:
    """(O, C, kh, kw) kernel of a stride-2 conv with padding p -> (O, 4C, k, k) kernel of an SPDConv(k).

    Returns (kernel, exact). Proof that the SPDConv computes the very same function when exact is True.
    The plain conv is  y[o, Y, X] = sum_{i,a,b} W[o,i,a,b] x[i, 2Y + a - p, 2X + b - p]  (x zero outside).
    Space-to-depth block j holds the phase (r_j, c_j) = PHASES[j]:  x_j[i, Y', X'] = x[i, 2Y' + r_j, 2X' + c_j],
    and for even H, W its zero padding is exactly x's zero padding. The SPDConv, a k x k stride-1 conv with
    padding q = k // 2 on it, is  y'[o, Y, X] = sum_{j,i,u,v} W'[o, jC+i, u, v] x[i, 2Y + 2(u-q) + r_j, 2X + 2(v-q) + c_j].
    Every offset d = a - p is 2(u - q) + r for exactly one r in {0, 1} (r = d mod 2, u = q + floor(d / 2)),
    so W'[o, jC+i, u, v] = W[o,i,a,b] at that (j, u, v), zero elsewhere, makes the two sums equal term by
    term, as long as every u lies in [0, k): offsets -2q .. 2(k-1-q)+1. For k = 3 that is -2..3: a 3x3 conv
    (p=1, offsets -1..1) uses 4 of the 9 taps per phase, YOLOv5's 6x6 stem (p=2, offsets -2..3) all of them
    (which is why a 6x6 stride-2 conv is a 3x3 conv on the space-to-depth input). Output sizes agree too
    (H/2 both); BN and the activation act per channel and pixel, so the whole Conv block carries over.
    For k = 1 only offsets 0 and 1 exist: the -1 taps of a 3x3 conv (and -2, -1, 2, 3 of the stem) have
    no place. exact is then False and each such tap is added to the nearest offset there is (which keeps
    the kernel's sum, i.e. its response to a constant input, so the BN statistics stay roughly right).
    """
    if w.ndim != 4:
        raise ValueError(f"kernel must be (O, C, kh, kw), got {tuple(w.shape)}")
    o, c = w.shape[:2]
    q = k // 2
    lo, hi = -2 * q, 2 * (k - 1 - q) + 1
    out = torch.zeros((o, 4 * c, k, k), dtype=w.dtype, device=w.device)
    exact = True
    for a in range(w.shape[2]):
        for b in range(w.shape[3]):
            da, db = a - p, b - p
            ca, cb = min(max(da, lo), hi), min(max(db, lo), hi)
            exact &= (ca, cb) == (da, db)
            j = PHASES.index((ca % 2, cb % 2))
            out[:, j * c : (j + 1) * c, q + ca // 2, q + cb // 2] += w[:, :, a, b]
    return out, exact
