"""Reading a serialized 4-bit weight: its quant state, its scales, and its float32 values.

Pure torch, bit-exact with bitsandbytes' ``dequantize_4bit`` computed in float32 (its single
float32 product ``code[q] * scale``), on whatever device the tensors are on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from adapterctl.errors import BrokenFile
from adapterctl.nf4 import layout
from adapterctl.nf4.blocks import dequantize_nested
from adapterctl.nf4.codes import code, unpack

if TYPE_CHECKING:
    import torch


def read_state(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """Decode the JSON quant state of one weight, after checking that every tensor it needs
    is there and fits it (``layout.group_problem``: the checkpoint reader's rules).

    Args:
        tensors: the weight's serialized tensors (other tensors may be present too).
        prefix: the weight's name, e.g. ``"model.layers.0.mlp.up_proj.weight"``.

    Returns:
        The state dict (``quant_type``, ``blocksize``, ``dtype``, ``shape``, and the
        ``nested_*`` fields when double-quantised).

    Raises:
        BrokenFile: no quant state for ``prefix``, a state bitsandbytes would refuse, or a
            missing or ill-fitting packed weight, ``absmax``, ``quant_map``, ``nested_absmax``
            or ``nested_quant_map``.
    """
    import torch

    keys = [layout.state_key(prefix, qt) for qt in layout.QUANT_TYPES]
    found = [k for k in keys if k in tensors]
    if len(found) != 1:
        raise BrokenFile(
            f"{prefix}: expected one of {', '.join(keys)} in the checkpoint, found {len(found)}; "
            "re-save the 4-bit model with transformers"
        )
    group = layout.group(prefix, found[0], tensors)
    stored = {
        name: (layout.st_dtype(t.dtype), tuple(t.shape))
        for name in (prefix, *group.statistics)
        if (t := tensors.get(name)) is not None
    }
    fix = "re-save the 4-bit model with transformers"
    problem = layout.group_problem(group, stored)
    if problem is not None:
        raise BrokenFile(f"{problem}; {fix}")
    raw = tensors[found[0]].detach().to("cpu", torch.uint8).numpy()
    try:
        state = layout.parse_state(bytes(raw), found[0])
    except BrokenFile as exc:
        raise BrokenFile(f"{exc}; {fix}") from None
    problem = layout.group_problem(group, stored, state)
    if problem is not None:
        raise BrokenFile(f"{problem}; {fix}")
    return state


def _need(tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise BrokenFile(f"{key}: missing from the 4-bit checkpoint; re-save it with transformers")
    return tensors[key]


def _scales(
    tensors: Mapping[str, torch.Tensor], prefix: str, state: dict[str, Any], device: Any
) -> torch.Tensor:
    """The float32 per-block scales as bitsandbytes dequantises them."""
    absmax = _need(tensors, prefix + layout.ABSMAX).to(device)
    if not layout.is_nested(state):
        return absmax.float().reshape(-1)  # (n_blocks,)
    nested_absmax = _need(tensors, prefix + layout.NESTED_ABSMAX).to(device).float().reshape(-1)
    nested_code = _need(tensors, prefix + layout.NESTED_QUANT_MAP).to(device).float().reshape(-1)
    offset = float(state["nested_offset"])
    nested_bs = int(state["nested_blocksize"])
    return dequantize_nested(absmax.reshape(-1), nested_absmax, nested_code, nested_bs, offset)


def dequantize(
    tensors: Mapping[str, torch.Tensor],
    prefix: str,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dequantise one serialized 4-bit weight to float32 in its logical shape.

    Bit-exact with ``bitsandbytes.functional.dequantize_4bit`` run in float32 on the same
    state (what transformers' ``Linear4bit`` computes before casting to its ``dtype``; the
    bitsandbytes result in a 16-bit ``dtype`` equals this one cast to that dtype).

    Args:
        tensors: the weight's serialized tensors, keyed as in the file (``prefix``,
            ``prefix.absmax``, ``prefix.quant_map``, optionally ``prefix.nested_absmax`` and
            ``prefix.nested_quant_map``, and ``prefix.quant_state.bitsandbytes__nf4|fp4``).
        prefix: the weight's name.
        device: where to compute (default: the packed weight's device).

    Returns:
        The float32 weight, shaped as the quant state's ``shape``.

    Raises:
        BrokenFile: missing tensors, a malformed quant state, or sizes that do not agree.

    Example:
        >>> w = dequantize(tensors, "model.layers.0.self_attn.q_proj.weight")
        >>> w.shape, w.dtype
        (torch.Size([2048, 2048]), torch.float32)
    """
    import torch

    state = read_state(tensors, prefix)
    quant_type = str(state["quant_type"])
    layout.check_quant_type(quant_type, prefix)
    blocksize = int(state["blocksize"])
    shape = tuple(state["shape"])
    packed = _need(tensors, prefix)
    device = torch.device(device) if device is not None else packed.device
    packed_u8 = packed.to(device).contiguous().reshape(-1).view(torch.uint8)  # (ceil(n/2),)
    n = math.prod(shape)
    scales = _scales(tensors, prefix, state, device)  # (n_blocks,)
    n_scales = layout.n_blocks(n, blocksize)
    if packed_u8.numel() != layout.packed_nbytes(n) or scales.numel() != n_scales:
        raise BrokenFile(
            f"{prefix}: packed size {packed_u8.numel()} / {scales.numel()} scales do not fit "
            f"shape {list(shape)} with blocksize {blocksize}; re-save the 4-bit model"
        )
    return _dequantize_codes(packed_u8, scales, quant_type, blocksize, shape)


def _dequantize_codes(
    packed_u8: torch.Tensor,
    scales: torch.Tensor,
    quant_type: str,
    blocksize: int,
    shape: tuple[int, ...],
) -> torch.Tensor:
    """``code[q] * scale`` per block, in float32 (the same single rounding as bitsandbytes)."""
    import torch

    n = math.prod(shape)
    q = unpack(packed_u8, n)  # (n,)
    values = code(quant_type, packed_u8.device)[q.long()]  # (n,)
    pad = -n % blocksize
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    out = values.view(-1, blocksize) * scales.view(-1, 1)  # (n_blocks, blocksize)
    return out.reshape(-1)[:n].reshape(shape)
