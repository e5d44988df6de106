"""bitsandbytes NF4/FP4 (de)quantisation in the serialized format transformers writes.

A 4-bit weight ``X.weight`` is stored by transformers (+ bitsandbytes) as several tensors:

- ``X.weight``: the packed codes, two 4-bit codes per byte (high nibble first), shape
  ``(ceil(numel / 2) / itemsize, 1)`` in the ``quant_storage`` dtype (uint8 by default);
- ``X.weight.absmax``: one scale per block of ``blocksize`` values (float32), or, with double
  quantisation, those scales minus their mean as 8-bit codes (uint8);
- ``X.weight.quant_map``: the 16 code values (bitsandbytes ignores it and uses its built-in
  table for the quant type; so do we);
- ``X.weight.nested_absmax`` / ``X.weight.nested_quant_map``: with double quantisation, the
  float32 scale of each block of 256 scales and the 256-value dynamic 8-bit code;
- ``X.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): a uint8 tensor holding JSON with
  ``quant_type``, ``blocksize``, ``dtype``, ``shape`` and, when nested, ``nested_blocksize``,
  ``nested_dtype`` and ``nested_offset`` (the mean subtracted from the scales).

A value dequantises to ``code[q] * scale`` in float32, where with double quantisation
``scale = nested_code[q8] * nested_absmax + nested_offset``. Everything here reproduces
bitsandbytes bit for bit: :func:`dequantize` equals ``bitsandbytes.functional.dequantize_4bit``
computed in float32, and :func:`quantize` with ``method="absmax"`` equals
``bitsandbytes.functional.quantize_4bit`` (which is what transformers and PEFT use).
``method="optimal"`` searches each block's stored scale to minimise the reconstruction error
after the double-quantisation round trip, which matters when a merge re-quantises ``W + ΔW``.

Functions work on one weight at a time and on whatever device its tensors are on. Absmax
quantisation calls bitsandbytes (pure torch where it has no kernel); dequantisation and the
optimal search are pure torch, which is bit-exact with bitsandbytes' single float32 product.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any, Literal

import torch

from adapterctl.errors import BrokenFile, UsageError

QuantType = Literal["nf4", "fp4"]
Method = Literal["absmax", "optimal"]

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
STATE_KEY = ".quant_state.bitsandbytes__"
AUX_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
_STORAGE_DTYPES = ("uint8", "int8", "float16", "bfloat16", "float32", "float64")
_FLOAT_DTYPES = ("float32", "float16", "bfloat16")

# The 4-bit code tables as bitsandbytes builds them (get_4bit_type): NF4 holds quantiles of
# N(0, 1); FP4 is listed in bit-pattern order (sign, 2 exponent bits, 1 mantissa bit), / 12,
# with +0.0 for the negative zero code, as bitsandbytes has it.
_NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
_FP4_VALUES = (
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0
)  # fmt: skip

# Chunk size (values) for the scale search: bounds the search's temporaries to a few MB.
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------
# Code tables


def code_table(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 float32 values of a 4-bit code, indexed by code, as bitsandbytes defines them.

    Args:
        quant_type: ``"nf4"`` or ``"fp4"``.
        device: where to put the table (default CPU).

    Returns:
        A new float32 tensor of shape (16,), equal to ``bitsandbytes.functional.get_4bit_type``.
    """
    return _code(quant_type, torch.device(device or "cpu")).clone()


_CODES: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _codes(
    quant_type: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cached (code (16,), ascending values (16,), their code indices as int32 (16,))."""
    key = (quant_type, device)
    if key not in _CODES:
        _check_quant_type(quant_type)
        values = _NF4_VALUES if quant_type == "nf4" else _FP4_VALUES
        table = torch.tensor(values, dtype=torch.float32, device=device)
        table = table / table.abs().max()  # (16,)
        order = torch.argsort(table, stable=True)  # (16,)
        _CODES[key] = (table, table[order], order.to(torch.int32))
    return _CODES[key]


def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    return _codes(quant_type, device)[0]


def nested_code_table(device: torch.device | str | None = None) -> torch.Tensor:
    """The 256-value signed dynamic 8-bit code bitsandbytes uses for double quantisation."""
    return _bitsandbytes().create_dynamic_map(signed=True).to(device)  # (256,)


def _bitsandbytes() -> ModuleType:
    """``bitsandbytes.functional``, imported without its start-up warnings.

    On CPUs with AVX512-BF16, bitsandbytes 0.49+ tries at import to load an optional inference
    kernel from the Hub and logs a warning when it cannot (offline, or not trusted). We only
    quantise, which does not use that kernel, so the warning would be noise on the user's
    terminal.

    Raises:
        ImportError: bitsandbytes is not installed.
    """
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as functional
    finally:
        log.setLevel(level)
    return functional


# --------------------------------------------------------------------------------------------
# Reading the serialized state


def read_state(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """Decode the JSON quant state of one weight.

    Args:
        tensors: the weight's serialized tensors (other tensors may be present too).
        prefix: the weight's name, e.g. ``"model.layers.0.mlp.up_proj.weight"``.

    Returns:
        The state dict (``quant_type``, ``blocksize``, ``dtype``, ``shape``, and the
        ``nested_*`` fields when double-quantised).

    Raises:
        BrokenFile: no quant state for ``prefix``, or it is not valid JSON.
    """
    keys = [f"{prefix}{STATE_KEY}{qt}" for qt in QUANT_TYPES]
    found = [k for k in keys if k in tensors]
    if len(found) != 1:
        raise BrokenFile(
            f"{prefix}: expected one of {', '.join(keys)} in the checkpoint, found {len(found)}; "
            "re-save the 4-bit model with transformers"
        )
    raw = tensors[found[0]]
    try:
        state = json.loads(bytes(raw.detach().to("cpu", torch.uint8).numpy()).decode("utf-8"))
        state["blocksize"] = int(state["blocksize"])
        state["shape"] = [int(d) for d in state["shape"]]
        str(state["quant_type"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise BrokenFile(f"{found[0]}: malformed bitsandbytes quant state") from None
    if not isinstance(state, dict):
        raise BrokenFile(f"{found[0]}: malformed bitsandbytes quant state")
    return state


def _need(tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise BrokenFile(f"{key}: missing from the 4-bit checkpoint; re-save it with transformers")
    return tensors[key]


def _scales(
    tensors: Mapping[str, torch.Tensor], prefix: str, state: dict[str, Any], device: Any
) -> torch.Tensor:
    """The float32 per-block scales as bitsandbytes dequantises them."""
    absmax = _need(tensors, f"{prefix}.absmax").to(device)
    if f"{prefix}.nested_absmax" not in tensors:
        return absmax.float().reshape(-1)  # (n_blocks,)
    nested_absmax = tensors[f"{prefix}.nested_absmax"].to(device).float().reshape(-1)
    nested_code = _need(tensors, f"{prefix}.nested_quant_map").to(device).float().reshape(-1)
    try:
        offset = float(state["nested_offset"])
        nested_bs = int(state.get("nested_blocksize", NESTED_BLOCKSIZE))
    except (KeyError, TypeError, ValueError):
        raise BrokenFile(f"{prefix}: quant state lacks nested_offset/nested_blocksize") from None
    return _dequantize_nested(absmax.reshape(-1), nested_absmax, nested_code, nested_bs, offset)


def _dequantize_nested(
    q8: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor, bs: int, offset: float
) -> torch.Tensor:
    """Blockwise 8-bit dequantisation plus the offset, in bitsandbytes' float32 op order."""
    n = q8.numel()
    block = torch.arange(n, device=q8.device) // bs  # (n_blocks,)
    if block.numel() and int(block[-1]) >= nested_absmax.numel():
        raise BrokenFile("nested_absmax has fewer entries than the absmax codes need")
    scales = nested_code[q8.long()] * nested_absmax[block]  # (n_blocks,)
    return scales + torch.tensor(offset, dtype=torch.float32, device=q8.device)


# --------------------------------------------------------------------------------------------
# Dequantisation


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
    state = read_state(tensors, prefix)
    quant_type = str(state["quant_type"])
    _check_quant_type(quant_type, prefix)
    blocksize = int(state["blocksize"])
    shape = tuple(state["shape"])
    packed = _need(tensors, prefix)
    device = torch.device(device) if device is not None else packed.device
    packed_u8 = packed.to(device).contiguous().reshape(-1).view(torch.uint8)  # (ceil(n/2),)
    n = math.prod(shape)
    n_blocks = -(-n // blocksize)
    scales = _scales(tensors, prefix, state, device)  # (n_blocks,)
    if packed_u8.numel() != (n + 1) // 2 or scales.numel() != n_blocks:
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
    n = math.prod(shape)
    q = unpack(packed_u8, n)  # (n,)
    values = _code(quant_type, packed_u8.device)[q.long()]  # (n,)
    pad = -n % blocksize
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    out = values.view(-1, blocksize) * scales.view(-1, 1)  # (n_blocks, blocksize)
    return out.reshape(-1)[:n].reshape(shape)


def unpack(packed_u8: torch.Tensor, n: int) -> torch.Tensor:
    """Split packed bytes into ``n`` 4-bit codes (uint8), high nibble first."""
    packed_u8 = packed_u8.reshape(-1)
    q = torch.stack((packed_u8 >> 4, packed_u8 & 0xF), dim=1)  # (n_bytes, 2)
    return q.reshape(-1)[:n]


def pack(q: torch.Tensor, quant_storage: torch.dtype = torch.uint8) -> torch.Tensor:
    """Pack 4-bit codes two per byte (high nibble first) into bitsandbytes' ``(m, 1)`` layout.

    Args:
        q: the codes (any integer dtype, values 0..15), flattened in row-major order.
        quant_storage: the dtype the packed bytes are viewed as (``bnb_4bit_quant_storage``).

    Returns:
        The packed tensor, shape ``(ceil(n / 2) / itemsize, 1)`` in ``quant_storage``.
    """
    q = q.reshape(-1).to(torch.uint8)
    if q.numel() % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    packed = (q[0::2] << 4) | q[1::2]  # (ceil(n/2),)
    if quant_storage != torch.uint8:
        packed = packed.view(quant_storage)
    return packed.unsqueeze(1)


# --------------------------------------------------------------------------------------------
# Quantisation


def quantize(
    weight: torch.Tensor,
    prefix: str,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compress_statistics: bool | None = None,
    quant_storage: torch.dtype | str = torch.uint8,
    dtype: torch.dtype | str | None = None,
    method: str = "absmax",
    grid: int = 16,
) -> dict[str, torch.Tensor]:
    """Quantise one weight to 4 bits and return its tensors as transformers serialises them.

    With ``method="absmax"`` the result is exactly ``bitsandbytes.functional.quantize_4bit``
    (each block scaled by its absolute maximum, codes rounded to nearest), which is what
    transformers does when loading with ``load_in_4bit`` and what PEFT's ``merge_and_unload``
    does for a 4-bit base. ``method="optimal"`` picks, per block, the stored scale that
    minimises the block's squared reconstruction error: ``grid`` ratios ``t`` in [0.5, 1] of the
    block's absmax, two halvings of the grid step around the best, and two Lloyd steps (the
    least-squares scale for the chosen codes). With double quantisation the scales are then
    8-bit quantised as bitsandbytes does, each block's 8-bit scale code is re-chosen among its
    ±2 neighbours for the least error *after* that round trip, and the 4-bit codes are rounded
    for the scale the reader will actually use. The absmax result is kept for the rare weight
    where it is better, so ``optimal`` is never worse than ``absmax``. It costs about eight
    times as much (a 4096×4096 weight: ~3 s on two CPU cores, ~0.4 s for absmax).

    Args:
        weight: the weight (any float dtype, any device), in its logical shape.
        prefix: the weight's name; output keys are ``prefix`` and ``prefix.<aux>``.
        quant_type: ``"nf4"`` or ``"fp4"``.
        blocksize: values per scale: 32, 64, 128, 256, 512, 1024, 2048 or 4096.
        double_quant: quantise the scales too (``bnb_4bit_use_double_quant``).
        compress_statistics: bitsandbytes' name for ``double_quant``; overrides it if given.
        quant_storage: dtype the packed bytes are stored as (``bnb_4bit_quant_storage``).
        dtype: the dtype recorded in the quant state, which bitsandbytes dequantises to
            (default: the weight's dtype if 16/32-bit float, else float32). The weight's
            values are quantised as given (in float32), whatever this says.
        method: ``"absmax"`` or ``"optimal"``.
        grid: number of coarse candidate ratios per block for ``"optimal"``.

    Returns:
        ``{prefix: packed, prefix.absmax, prefix.quant_map, [prefix.nested_absmax,
        prefix.nested_quant_map,] prefix.quant_state.bitsandbytes__<type>}`` on the weight's
        device, contiguous, ready for ``safetensors.torch.save_file``.

    Raises:
        UsageError: an unknown quant type, blocksize, method, storage or dtype.

    Example:
        >>> out = quantize(w, "model.layers.0.mlp.up_proj.weight", method="optimal")
        >>> dequantize(out, "model.layers.0.mlp.up_proj.weight").shape == w.shape
        True
    """
    if compress_statistics is not None:
        double_quant = compress_statistics
    _check_quant_type(quant_type)
    if blocksize not in BLOCKSIZES:
        raise UsageError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if method not in ("absmax", "optimal"):
        raise UsageError(f"method must be 'absmax' or 'optimal', got {method!r}")
    if grid < 1:
        raise UsageError(f"grid must be at least 1, got {grid}")
    storage = _storage_dtype(quant_storage)
    dtype_name = _dtype_name(
        dtype if dtype is not None else weight.dtype, explicit=dtype is not None
    )
    if not weight.is_floating_point():
        raise UsageError(f"{prefix}: cannot quantise a {weight.dtype} tensor")

    packed, scales, nested = _quantize_absmax(weight, quant_type, blocksize, double_quant)
    if method == "optimal":
        best = _quantize_optimal(weight, quant_type, blocksize, double_quant, grid)
        if _sq_error(weight, *best, quant_type, blocksize) <= _sq_error(
            weight, packed, scales, nested, quant_type, blocksize
        ):
            packed, scales, nested = best
    return _serialize(
        prefix, packed, scales, nested, quant_type, blocksize, tuple(weight.shape), dtype_name,
        storage,
    )  # fmt: skip


_Nested = tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None
"""(nested_absmax (n_nested,), nested_code (256,), q8 codes (n_blocks,), offset) or None."""


def _quantize_absmax(
    weight: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, torch.Tensor, _Nested]:
    """bitsandbytes' own quantisation: returns (uint8 packed codes, scales, nested state).

    ``scales`` is the float32 absmax when not nested, else the uint8 scale codes.
    """
    w = weight.detach()
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        w = w.float()
    try:
        packed, qs = _bitsandbytes().quantize_4bit(
            w.contiguous(), blocksize=blocksize, compress_statistics=double_quant,
            quant_type=quant_type, quant_storage=torch.uint8,
        )  # fmt: skip
    except (ImportError, NotImplementedError):  # pragma: no cover - no bitsandbytes kernel
        return _quantize_absmax_torch(w, quant_type, blocksize, double_quant)
    nested: _Nested = None
    if double_quant:
        nested = (qs.state2.absmax, qs.state2.code, qs.absmax, float(qs.offset.item()))
    return packed.reshape(-1), qs.absmax, nested


def _quantize_absmax_torch(
    w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, torch.Tensor, _Nested]:
    """Pure-torch absmax quantisation, for devices bitsandbytes has no kernel for."""
    blocks = _blocks(w, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    q = _nearest(blocks, absmax.clamp(min=1e-38), quant_type)  # (n_blocks, blocksize)
    packed = pack(q.reshape(-1)[: w.numel()]).reshape(-1)
    if not double_quant:
        return packed, absmax, None
    nested = _double_quantize(absmax)
    return packed, nested[2], nested


def _quantize_optimal(
    weight: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool, grid: int
) -> tuple[torch.Tensor, torch.Tensor, _Nested]:
    """Per-block error-minimising scales (see :func:`quantize`)."""
    blocks = _blocks(weight.detach(), blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scales = absmax * _search_ratios(blocks, absmax, quant_type, grid)  # (n_blocks,)
    nested: _Nested = None
    if double_quant:
        nested_absmax, nested_code, q8, offset = _double_quantize(scales)
        q8 = _refine_nested_codes(
            blocks, absmax, quant_type, nested_absmax, nested_code, q8, offset
        )
        nested = (nested_absmax, nested_code, q8, offset)
        scales = _dequantize_nested(q8, nested_absmax, nested_code, NESTED_BLOCKSIZE, offset)
    q = torch.empty(blocks.shape, dtype=torch.uint8, device=blocks.device)  # (n_blocks, bs)
    for sl in _chunks(blocks.shape[0], blocksize):
        q[sl] = _nearest(blocks[sl], scales[sl], quant_type)
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
    lut = _lut(quant_type, blocks.device)
    ratios = torch.ones_like(absmax)  # (n_blocks,)
    coarse = torch.linspace(0.5, 1.0, grid).tolist() if grid > 1 else [1.0]
    step = 0.5 / max(grid - 1, 1)
    for sl in _chunks(blocks.shape[0], blocks.shape[1]):
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
    lut = _lut(quant_type, blocks.device)
    nested_of = torch.arange(q8.numel(), device=q8.device) // NESTED_BLOCKSIZE  # (n_blocks,)
    off = torch.tensor(offset, dtype=torch.float32, device=q8.device)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))  # (n_blocks,)
    best_q = q8.clone()
    for sl in _chunks(q8.numel(), blocks.shape[1]):
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
    key = (quant_type, device)
    if key not in _LUTS:
        _, values, _ = _codes(quant_type, device)
        u = torch.arange(_LUT_BINS + 1, dtype=torch.float32, device=device) / (_LUT_BINS / 2) - 1
        _LUTS[key] = values[torch.bucketize(u, (values[:-1] + values[1:]) / 2)]
    return _LUTS[key]


def _normalised(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """x / absmax per block (all-zero blocks stay zero): (chunk, blocksize)."""
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))  # (chunk,)
    return x * inv.unsqueeze(1)


def _lookup(u: torch.Tensor, t: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """The nearest code value of u / t (t > 0), via the lookup table: (chunk, blocksize)."""
    h = (lut.numel() - 1) / 2
    v = (u * (h / t)).clamp_(-h, h).add_(h + 0.5)  # (chunk, blocksize)
    return lut.index_select(0, v.to(torch.int32).view(-1)).view_as(u)


def _ratio_error(u: torch.Tensor, t: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Σ (u − t·code(u / t))² per block, +inf where t ≤ 0: (chunk, 1)."""
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
    err = _ratio_error(u, cand, lut)  # (chunk, 1)
    better = err < best_err
    return torch.where(better, cand, best), torch.where(better, err, best_err)


def _double_quantize(
    scales: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """bitsandbytes' double quantisation of the scales: 8-bit dynamic, blocks of 256, centred.

    Returns:
        (nested_absmax (n_nested,), nested_code (256,), q8 (n_blocks,), offset).
    """
    offset = scales.mean()
    centred = scales - offset  # (n_blocks,)
    try:
        q8, state2 = _bitsandbytes().quantize_blockwise(centred, blocksize=NESTED_BLOCKSIZE)
        return state2.absmax, state2.code, q8, float(offset.item())
    except (ImportError, NotImplementedError):  # pragma: no cover - device bitsandbytes lacks
        pass
    code = nested_code_table(scales.device)
    pad = -centred.numel() % NESTED_BLOCKSIZE
    nb = torch.nn.functional.pad(centred, (0, pad)).view(-1, NESTED_BLOCKSIZE)  # (n_nested, 256)
    nested_absmax = nb.abs().amax(dim=1)  # (n_nested,)
    scaled = (nb * (1.0 / nested_absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1)
    q8 = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)  # (n_nested, 256)
    return nested_absmax, code, q8.reshape(-1)[: centred.numel()], float(offset.item())


def _blocks(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The weight as float32 blocks, the last one zero-padded (zeros cost no error)."""
    flat = w.reshape(-1).float()
    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, blocksize)  # (n_blocks, blocksize)


def _chunks(n_blocks: int, blocksize: int) -> list[slice]:
    step = max(1, _CHUNK // blocksize)
    return [slice(i, min(i + step, n_blocks)) for i in range(0, n_blocks, step)]


def _nearest(x: torch.Tensor, scales: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Round-to-nearest 4-bit codes (uint8) of ``x / scale`` per block, as bitsandbytes does.

    Args:
        x: (n_blocks, blocksize) values.
        scales: (n_blocks,) scales; a zero scale gives the zero code.
    """
    _, values, order = _codes(quant_type, x.device)
    inv = torch.where(scales != 0, 1.0 / scales, torch.zeros_like(scales))  # (n_blocks,)
    scaled = (x * inv.unsqueeze(1)).clamp(-1, 1)  # (n_blocks, blocksize)
    idx = torch.bucketize(scaled, (values[:-1] + values[1:]) / 2, out_int32=True)
    if quant_type != "nf4":  # NF4's table is already sorted
        idx = order[idx]
    return idx.to(torch.uint8)


def _sq_error(
    weight: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    nested: _Nested,
    quant_type: str,
    blocksize: int,
) -> float:
    """‖dequant − weight‖², in float64, chunk by chunk."""
    if nested is not None:
        nested_absmax, nested_code, q8, offset = nested
        scales = _dequantize_nested(q8, nested_absmax, nested_code, NESTED_BLOCKSIZE, offset)
    blocks = _blocks(weight.detach(), blocksize)  # (n_blocks, blocksize)
    code = _code(quant_type, blocks.device)
    zero = int(torch.nonzero(code == 0)[0])  # the padding reconstructs to 0, like its input
    q = unpack(packed, weight.numel())
    q = torch.nn.functional.pad(q, (0, blocks.numel() - q.numel()), value=zero)
    q = q.view(blocks.shape)  # (n_blocks, blocksize)
    total = 0.0
    for sl in _chunks(blocks.shape[0], blocksize):
        recon = code[q[sl].long()] * scales[sl].unsqueeze(1)  # (chunk, blocksize)
        total += float((blocks[sl] - recon).double().square().sum())
    return total


def _serialize(
    prefix: str,
    packed: torch.Tensor,
    scales: torch.Tensor,
    nested: _Nested,
    quant_type: str,
    blocksize: int,
    shape: tuple[int, ...],
    dtype_name: str,
    storage: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The tensors, keys and JSON exactly as bitsandbytes' ``QuantState.as_dict(packed=True)``."""
    device = packed.device
    state: dict[str, Any] = {
        "quant_type": quant_type,
        "blocksize": blocksize,
        "dtype": dtype_name,
        "shape": shape,
    }
    stored = packed.reshape(-1) if storage == torch.uint8 else packed.reshape(-1).view(storage)
    out = {
        prefix: stored.unsqueeze(1).contiguous(),
        f"{prefix}.absmax": scales.contiguous(),
        f"{prefix}.quant_map": code_table(quant_type, device),
    }
    if nested is not None:
        nested_absmax, nested_code, _, offset = nested
        out[f"{prefix}.nested_absmax"] = nested_absmax.float().contiguous()
        out[f"{prefix}.nested_quant_map"] = nested_code.float().clone().contiguous()
        state.update(
            nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset
        )
    blob = json.dumps(state).encode("utf-8")
    out[f"{prefix}{STATE_KEY}{quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
    return out


# --------------------------------------------------------------------------------------------
# Metrics and config


def delta_error(w_base: torch.Tensor, delta: torch.Tensor, w_requant: torch.Tensor) -> float:
    """How much of a merged delta survives re-quantisation: ‖(Q − W) − ΔW‖ / ‖ΔW‖.

    ``W`` is the base as the model sees it (the dequantised NF4 weight for a 4-bit base),
    ``Q`` the dequantised re-quantised merge. 0 means the delta arrived intact; 1 means it is
    as wrong as dropping it. Computed in float64, row chunk by row chunk.

    Args:
        w_base: W, any shape.
        delta: ΔW, same shape.
        w_requant: dequant(quantize(W + ΔW)), same shape.

    Returns:
        The relative error (0.0 when ΔW and the error are both zero; inf if only ΔW is).
    """
    if not (w_base.shape == delta.shape == w_requant.shape):
        raise UsageError(
            f"delta_error needs equal shapes, got {list(w_base.shape)}, "
            f"{list(delta.shape)}, {list(w_requant.shape)}"
        )
    w, d, q = (t.detach().reshape(-1) for t in (w_base, delta, w_requant))
    num = den = 0.0
    step = _CHUNK
    for i in range(0, w.numel(), step):
        dd = d[i : i + step].double()
        num += float(((q[i : i + step].double() - w[i : i + step].double()) - dd).square().sum())
        den += float(dd.square().sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


def quantization_config(
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | str = "bfloat16",
    skip_modules: list[str] | None = None,
    quant_storage: torch.dtype | str = "uint8",
) -> dict[str, Any]:
    """The ``quantization_config`` transformers writes to ``config.json`` for a 4-bit model.

    Mirrors ``BitsAndBytesConfig(load_in_4bit=True, ...).to_dict()``. The blocksize is not
    part of it: transformers always quantises with 64 and reads each weight's own blocksize
    from its quant state, so a checkpoint may hold any blocksize :func:`quantize` allows.

    Args:
        quant_type: ``"nf4"`` or ``"fp4"`` (``bnb_4bit_quant_type``).
        double_quant: ``bnb_4bit_use_double_quant``.
        compute_dtype: ``bnb_4bit_compute_dtype``.
        skip_modules: ``llm_int8_skip_modules`` (modules kept unquantised), or None.
        quant_storage: ``bnb_4bit_quant_storage``.

    Returns:
        The dict to store under ``config["quantization_config"]``.
    """
    _check_quant_type(quant_type)
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": _dtype_name(compute_dtype, explicit=True),
        "bnb_4bit_quant_storage": str(_storage_dtype(quant_storage)).removeprefix("torch."),
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": bool(double_quant),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": list(skip_modules) if skip_modules is not None else None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


# --------------------------------------------------------------------------------------------
# Argument checks


def _check_quant_type(quant_type: str, where: str = "") -> None:
    if quant_type not in QUANT_TYPES:
        if where:
            raise BrokenFile(f"{where}: unknown 4-bit quant type {quant_type!r} (nf4 or fp4)")
        raise UsageError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def _storage_dtype(storage: torch.dtype | str) -> torch.dtype:
    name = storage if isinstance(storage, str) else str(storage).removeprefix("torch.")
    if name not in _STORAGE_DTYPES:
        raise UsageError(f"quant_storage must be one of {_STORAGE_DTYPES}, got {name!r}")
    dt = getattr(torch, name)
    assert isinstance(dt, torch.dtype)
    return dt


def _dtype_name(dtype: torch.dtype | str, *, explicit: bool) -> str:
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name in _FLOAT_DTYPES:
        return name
    if explicit:
        raise UsageError(f"dtype must be one of {_FLOAT_DTYPES}, got {name!r}")
    return "float32"
