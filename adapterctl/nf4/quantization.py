"""Writing a 4-bit weight: quantisation into the tensors transformers serialises, how much of
a merged delta survives it, and the config that goes with a 4-bit checkpoint.

``method="absmax"`` is bitsandbytes' own ``quantize_4bit`` (pure torch where it has no
kernel, bit for bit the same); ``method="optimal"`` is the scale search in ``search``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from adapterctl.errors import UsageError
from adapterctl.nf4 import bnb, layout
from adapterctl.nf4.blocks import CHUNK, as_blocks, chunks, dequantize_nested, double_quantize
from adapterctl.nf4.codes import code, code_table, nearest, pack, unpack
from adapterctl.nf4.search import quantize_optimal

if TYPE_CHECKING:
    import torch

    from adapterctl.nf4.blocks import Nested


def quantize(
    weight: torch.Tensor,
    prefix: str,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compress_statistics: bool | None = None,
    quant_storage: torch.dtype | str = "uint8",
    dtype: torch.dtype | str | None = None,
    method: str = "absmax",
    grid: int = 16,
    pad_state: bool = False,
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
        pad_state: space-pad the quant state to ``layout.STATE_BYTES``, so the tensors are
            exactly those ``layout.stored_tensors`` plans (as a merge writes them).

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
    import torch

    if compress_statistics is not None:
        double_quant = compress_statistics
    layout.check_quant_type(quant_type)
    if blocksize not in layout.BLOCKSIZES:
        raise UsageError(f"blocksize must be one of {layout.BLOCKSIZES}, got {blocksize}")
    if method not in layout.METHODS:
        raise UsageError(f"method must be 'absmax' or 'optimal', got {method!r}")
    if grid < 1:
        raise UsageError(f"grid must be at least 1, got {grid}")
    storage = getattr(torch, layout.storage_name(quant_storage))
    dtype_name = layout.float_name(
        dtype if dtype is not None else weight.dtype, explicit=dtype is not None
    )
    if not weight.is_floating_point():
        raise UsageError(f"{prefix}: cannot quantise a {weight.dtype} tensor")

    packed, scales, nested = _quantize_absmax(weight, quant_type, blocksize, double_quant)
    if method == "optimal":
        best = quantize_optimal(weight, quant_type, blocksize, double_quant, grid)
        if _sq_error(weight, *best, quant_type, blocksize) <= _sq_error(
            weight, packed, scales, nested, quant_type, blocksize
        ):
            packed, scales, nested = best
    state: dict[str, Any] = {
        "quant_type": quant_type,
        "blocksize": blocksize,
        "dtype": dtype_name,
        "shape": tuple(weight.shape),
    }
    return _serialize(prefix, packed.view(storage), scales, nested, state, pad_state)


def _quantize_absmax(
    weight: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, torch.Tensor, Nested]:
    """bitsandbytes' own quantisation: returns (uint8 packed codes, scales, nested state).

    ``scales`` is the float32 absmax when not nested, else the uint8 scale codes.
    """
    import torch

    w = weight.detach()
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        w = w.float()
    try:
        packed, qs = bnb.functional().quantize_4bit(
            w.contiguous(), blocksize=blocksize, compress_statistics=double_quant,
            quant_type=quant_type, quant_storage=torch.uint8,
        )  # fmt: skip
    except (ImportError, NotImplementedError):  # pragma: no cover - no bitsandbytes kernel
        return _quantize_absmax_torch(w, quant_type, blocksize, double_quant)
    nested: Nested = None
    if double_quant:
        nested = (qs.state2.absmax, qs.state2.code, qs.absmax, float(qs.offset.item()))
    return packed.reshape(-1), qs.absmax, nested


def _quantize_absmax_torch(
    w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, torch.Tensor, Nested]:
    """Pure-torch absmax quantisation, for devices bitsandbytes has no kernel for."""
    blocks = as_blocks(w, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    q = nearest(blocks, absmax.clamp(min=1e-38), quant_type)  # (n_blocks, blocksize)
    packed = pack(q.reshape(-1)[: w.numel()]).reshape(-1)
    if not double_quant:
        return packed, absmax, None
    nested = double_quantize(absmax)
    return packed, nested[2], nested


def _sq_error(
    weight: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    nested: Nested,
    quant_type: str,
    blocksize: int,
) -> float:
    """‖dequant − weight‖², in float64, chunk by chunk."""
    import torch

    if nested is not None:
        nested_absmax, nested_code, q8, offset = nested
        scales = dequantize_nested(q8, nested_absmax, nested_code, layout.NESTED_BLOCKSIZE, offset)
    blocks = as_blocks(weight.detach(), blocksize)  # (n_blocks, blocksize)
    table = code(quant_type, blocks.device)
    zero = int(torch.nonzero(table == 0)[0])  # the padding reconstructs to 0, like its input
    q = unpack(packed, weight.numel())
    q = torch.nn.functional.pad(q, (0, blocks.numel() - q.numel()), value=zero)
    q = q.view(blocks.shape)  # (n_blocks, blocksize)
    total = 0.0
    for sl in chunks(blocks.shape[0], blocksize):
        recon = table[q[sl].long()] * scales[sl].unsqueeze(1)  # (chunk, blocksize)
        total += float((blocks[sl] - recon).double().square().sum())
    return total


def _serialize(
    prefix: str,
    packed: torch.Tensor,
    scales: torch.Tensor,
    nested: Nested,
    state: dict[str, Any],
    pad_state: bool,
) -> dict[str, torch.Tensor]:
    """The tensors, keys and JSON exactly as bitsandbytes' ``QuantState.as_dict(packed=True)``.

    ``packed`` is already viewed as the storage dtype; ``state`` holds the core fields.
    """
    import torch

    out = {
        prefix: packed.reshape(-1).unsqueeze(1).contiguous(),
        prefix + layout.ABSMAX: scales.contiguous(),
        prefix + layout.QUANT_MAP: code_table(state["quant_type"], packed.device),
    }
    if nested is not None:
        nested_absmax, nested_code, _, offset = nested
        out[prefix + layout.NESTED_ABSMAX] = nested_absmax.float().contiguous()
        out[prefix + layout.NESTED_QUANT_MAP] = nested_code.float().clone().contiguous()
        state.update(
            nested_blocksize=layout.NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset
        )
    blob = layout.state_blob(state, padded=pad_state)
    out[layout.state_key(prefix, state["quant_type"])] = torch.tensor(list(blob), dtype=torch.uint8)
    return out


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
    step = CHUNK
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
        compute_dtype: ``bnb_4bit_compute_dtype`` (float32, float16 or bfloat16).
        skip_modules: ``llm_int8_skip_modules`` (modules kept unquantised), or None.
        quant_storage: ``bnb_4bit_quant_storage``.

    Returns:
        The dict to store under ``config["quantization_config"]``.

    Raises:
        UsageError: an unknown quant type, compute dtype or storage dtype.
    """
    layout.check_quant_type(quant_type)
    compute = layout.float_name(compute_dtype, explicit=True)
    storage = layout.storage_name(quant_storage)
    return layout.quantization_config(quant_type, double_quant, compute, skip_modules, storage)
