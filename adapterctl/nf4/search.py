"""``method="optimal"``: per-block scales that minimise the reconstruction error.

Each block's stored scale is searched (a coarse grid of ratios to its absmax, two halvings of
the step, two Lloyd steps); with double quantisation, each block's 8-bit scale code is then
re-chosen among its neighbours for the least error *after* the round trip the reader does.
The search rounds through a lookup table; the final codes are rounded exactly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from adapterctl.nf4.blocks import as_blocks, chunks, dequantize_nested, double_quantize
from adapterctl.nf4.codes import codes, nearest, pack
from adapterctl.nf4.layout import NESTED_BLOCKSIZE

if TYPE_CHECKING:
    import torch

    from adapterctl.nf4.blocks import Nested


def quantize_optimal(
    weight: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool, grid: int
) -> tuple[torch.Tensor, torch.Tensor, Nested]:
    """Per-block error-minimising scales (see ``nf4.quantize``)."""
    import torch

    blocks = as_blocks(weight.detach(), blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scales = absmax * _search_ratios(blocks, absmax, quant_type, grid)  # (n_blocks,)
    nested: Nested = None
    if double_quant:
        nested_absmax, nested_code, q8, offset = double_quantize(scales)
        q8 = _refine_nested_codes(
            blocks, absmax, quant_type, nested_absmax, nested_code, q8, offset
        )
        nested = (nested_absmax, nested_code, q8, offset)
        scales = dequantize_nested(q8, nested_absmax, nested_code, NESTED_BLOCKSIZE, offset)
    q = torch.empty(blocks.shape, dtype=torch.uint8, device=blocks.device)  # (n_blocks, bs)
    for sl in chunks(blocks.shape[0], blocksize):
        q[sl] = nearest(blocks[sl], scales[sl], quant_type)
    packed = pack(q.reshape(-1)[: weight.numel()]).reshape(-1)
    return packed, (nested[2] if nested is not None else scales), nested


def _search_ratios(
    blocks: torch.Tensor, absmax: torch.Tensor, quant_type: str, grid: int
) -> torch.Tensor:
    """Per block, the ratio t = scale / absmax with the least squared error.

    A coarse grid of ``grid`` ratios in [0.5, 1], two halvings of the step around each block's
    best, then two Lloyd steps (the least-squares scale for the chosen codes). Errors are
    measured on ``u = x / absmax`` (the same per-block ordering as on ``x``).
    """
    import torch

    lut = _lut(quant_type, blocks.device)
    ratios = torch.ones_like(absmax)  # (n_blocks,)
    coarse = torch.linspace(0.5, 1.0, grid).tolist() if grid > 1 else [1.0]
    step = 0.5 / max(grid - 1, 1)
    for sl in chunks(blocks.shape[0], blocks.shape[1]):
        u = _normalised(blocks[sl], absmax[sl])  # (chunk, blocksize)
        best_t = torch.ones(u.shape[0], 1, device=u.device)  # (chunk, 1)
        best_err = torch.full_like(best_t, math.inf)
        for t in coarse:
            best_t, best_err = _keep_better(u, lut, torch.full_like(best_t, t), best_t, best_err)
        for half in (step / 2, step / 4):
            for sign in (-1.0, 1.0):
                cand = best_t + sign * half
                best_t, best_err = _keep_better(u, lut, cand, best_t, best_err)
        for _ in range(2):
            c = _lookup(u, best_t, lut)  # (chunk, blocksize)
            cand = (u * c).sum(dim=1, keepdim=True) / (c * c).sum(dim=1, keepdim=True)
            cand = torch.nan_to_num(cand, nan=1.0)
            best_t, best_err = _keep_better(u, lut, cand, best_t, best_err)
        ratios[sl] = best_t.squeeze(1)
    return ratios


def _refine_nested_codes(
    blocks: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: str,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    q8: torch.Tensor,
    offset: float,
    radius: int = 2,
) -> torch.Tensor:
    """Re-choose each block's 8-bit scale code among its neighbours by post-round-trip error.

    The nested absmax and offset are stored as they are, so any 8-bit code is a legal scale;
    the neighbours of the rounded one are the scales the reader can get near the ideal one.
    """
    import torch

    lut = _lut(quant_type, blocks.device)
    nested_of = torch.arange(q8.numel(), device=q8.device) // NESTED_BLOCKSIZE  # (n_blocks,)
    off = torch.tensor(offset, dtype=torch.float32, device=q8.device)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))  # (n_blocks,)
    best_q = q8.clone()
    for sl in chunks(q8.numel(), blocks.shape[1]):
        u = _normalised(blocks[sl], absmax[sl])  # (chunk, blocksize)
        a2 = nested_absmax[nested_of[sl]]  # (chunk,)
        q0 = q8[sl].long()  # (chunk,)

        def ratio(k: torch.Tensor, sl: slice = sl, a2: torch.Tensor = a2) -> torch.Tensor:
            return ((nested_code[k] * a2 + off) * inv[sl]).unsqueeze(1)  # (chunk, 1)

        best_t = ratio(q0)
        best_err = _ratio_error(u, best_t, lut)  # (chunk, 1)
        chosen = q0
        for step in range(-radius, radius + 1):
            if step == 0:
                continue
            k = (q0 + step).clamp(0, nested_code.numel() - 1)  # (chunk,)
            err = _ratio_error(u, ratio(k), lut)
            better = err < best_err
            chosen = torch.where(better.squeeze(1), k, chosen)
            best_err = torch.where(better, err, best_err)
        best_q[sl] = chosen.to(torch.uint8)
    return best_q


# Bins of the round-to-nearest lookup table used by the scale search (not by the final codes,
# which use exact rounding): a value within 1/_LUT_BINS of a rounding boundary may get the
# other neighbour, which changes its error by a second-order amount.
_LUT_BINS = 4096
_LUTS: dict[tuple[str, torch.device], torch.Tensor] = {}


def _lut(quant_type: str, device: torch.device) -> torch.Tensor:
    """Nearest code value for u = p / (_LUT_BINS / 2) − 1, p = 0.._LUT_BINS: (_LUT_BINS + 1,)."""
    import torch

    key = (quant_type, device)
    if key not in _LUTS:
        _, values, _ = codes(quant_type, device)
        u = torch.arange(_LUT_BINS + 1, dtype=torch.float32, device=device) / (_LUT_BINS / 2) - 1
        _LUTS[key] = values[torch.bucketize(u, (values[:-1] + values[1:]) / 2)]
    return _LUTS[key]


def _normalised(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """x / absmax per block (all-zero blocks stay zero): (chunk, blocksize)."""
    import torch

    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))  # (chunk,)
    return x * inv.unsqueeze(1)


def _lookup(u: torch.Tensor, t: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """The nearest code value of u / t (t > 0), via the lookup table: (chunk, blocksize)."""
    import torch

    h = (lut.numel() - 1) / 2
    v = (u * (h / t)).clamp_(-h, h).add_(h + 0.5)  # (chunk, blocksize)
    return lut.index_select(0, v.to(torch.int32).view(-1)).view_as(u)


def _ratio_error(u: torch.Tensor, t: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Σ (u − t·code(u / t))² per block, +inf where t ≤ 0: (chunk, 1)."""
    import torch

    ok = t > 0
    t_safe = torch.where(ok, t, torch.ones_like(t))  # (chunk, 1)
    d = _lookup(u, t_safe, lut).mul_(-t_safe).add_(u)  # (chunk, blocksize)
    err = (d * d).sum(dim=1, keepdim=True)
    return torch.where(ok, err, torch.full_like(err, math.inf))


def _keep_better(
    u: torch.Tensor,
    lut: torch.Tensor,
    cand: torch.Tensor,
    best: torch.Tensor,
    best_err: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    err = _ratio_error(u, cand, lut)  # (chunk, 1)
    better = err < best_err
    return torch.where(better, cand, best), torch.where(better, err, best_err)
