"""The 4-bit code tables as bitsandbytes defines them, packing codes two per byte, and
rounding values to their nearest code."""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapterctl.nf4 import bnb
from adapterctl.nf4.layout import check_quant_type

if TYPE_CHECKING:
    import torch

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


def code_table(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 float32 values of a 4-bit code, indexed by code, as bitsandbytes defines them.

    Args:
        quant_type: ``"nf4"`` or ``"fp4"``.
        device: where to put the table (default CPU).

    Returns:
        A new float32 tensor of shape (16,), equal to ``bitsandbytes.functional.get_4bit_type``.
    """
    import torch

    return code(quant_type, torch.device(device or "cpu")).clone()


_CODES: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def codes(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cached (code (16,), ascending values (16,), their code indices as int32 (16,))."""
    import torch

    key = (quant_type, device)
    if key not in _CODES:
        check_quant_type(quant_type)
        values = _NF4_VALUES if quant_type == "nf4" else _FP4_VALUES
        table = torch.tensor(values, dtype=torch.float32, device=device)
        table = table / table.abs().max()  # (16,)
        order = torch.argsort(table, stable=True)  # (16,)
        _CODES[key] = (table, table[order], order.to(torch.int32))
    return _CODES[key]


def code(quant_type: str, device: torch.device) -> torch.Tensor:
    """The cached code table (16,): do not modify it (:func:`code_table` gives a copy)."""
    return codes(quant_type, device)[0]


def nested_code_table(device: torch.device | str | None = None) -> torch.Tensor:
    """The 256-value signed dynamic 8-bit code bitsandbytes uses for double quantisation."""
    return bnb.functional().create_dynamic_map(signed=True).to(device)  # (256,)


def unpack(packed_u8: torch.Tensor, n: int) -> torch.Tensor:
    """Split packed bytes into ``n`` 4-bit codes (uint8), high nibble first."""
    import torch

    packed_u8 = packed_u8.reshape(-1)
    q = torch.stack((packed_u8 >> 4, packed_u8 & 0xF), dim=1)  # (n_bytes, 2)
    return q.reshape(-1)[:n]


def pack(q: torch.Tensor, quant_storage: torch.dtype | None = None) -> torch.Tensor:
    """Pack 4-bit codes two per byte (high nibble first) into bitsandbytes' ``(m, 1)`` layout.

    Args:
        q: the codes (any integer dtype, values 0..15), flattened in row-major order.
        quant_storage: the dtype the packed bytes are viewed as (``bnb_4bit_quant_storage``;
            default uint8).

    Returns:
        The packed tensor, shape ``(ceil(n / 2) / itemsize, 1)`` in ``quant_storage``.
    """
    import torch

    q = q.reshape(-1).to(torch.uint8)
    if q.numel() % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    packed = (q[0::2] << 4) | q[1::2]  # (ceil(n/2),)
    if quant_storage is not None and quant_storage != torch.uint8:
        packed = packed.view(quant_storage)
    return packed.unsqueeze(1)


def nearest(x: torch.Tensor, scales: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Round-to-nearest 4-bit codes (uint8) of ``x / scale`` per block, as bitsandbytes does.

    Args:
        x: (n_blocks, blocksize) values.
        scales: (n_blocks,) scales; a zero scale gives the zero code.
    """
    import torch

    _, values, order = codes(quant_type, x.device)
    inv = torch.where(scales != 0, 1.0 / scales, torch.zeros_like(scales))  # (n_blocks,)
    scaled = (x * inv.unsqueeze(1)).clamp(-1, 1)  # (n_blocks, blocksize)
    idx = torch.bucketize(scaled, (values[:-1] + values[1:]) / 2, out_int32=True)
    if quant_type != "nf4":  # NF4's table is already sorted
        idx = order[idx]
    return idx.to(torch.uint8)
