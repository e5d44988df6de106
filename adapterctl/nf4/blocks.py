"""Blockwise pieces shared by quantisation and dequantisation: a weight as blocks, chunks of
blocks (to bound temporaries), and the double quantisation of the block scales (8-bit dynamic
codes, blocks of 256, centred on their mean) and its inverse."""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapterctl.errors import BrokenFile
from adapterctl.nf4 import bnb
from adapterctl.nf4.codes import nested_code_table
from adapterctl.nf4.layout import NESTED_BLOCKSIZE

if TYPE_CHECKING:
    from typing import TypeAlias

    import torch

    Nested: TypeAlias = tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None
    """(nested_absmax (n_nested,), nested_code (256,), q8 codes (n_blocks,), offset), or None
    when the scales are stored as they are."""

# Chunk size (values) for the scale search and error sums: bounds temporaries to a few MB.
CHUNK = 1 << 20


def as_blocks(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The weight as float32 blocks, the last one zero-padded (zeros cost no error)."""
    import torch

    flat = w.reshape(-1).float()
    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, blocksize)  # (n_blocks, blocksize)


def chunks(n_blocks: int, blocksize: int) -> list[slice]:
    """Slices of about :data:`CHUNK` values over ``n_blocks`` blocks."""
    step = max(1, CHUNK // blocksize)
    return [slice(i, min(i + step, n_blocks)) for i in range(0, n_blocks, step)]


def double_quantize(
    scales: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """bitsandbytes' double quantisation of the scales: 8-bit dynamic, blocks of 256, centred.

    Returns:
        (nested_absmax (n_nested,), nested_code (256,), q8 (n_blocks,), offset).
    """
    import torch

    offset = scales.mean()
    centred = scales - offset  # (n_blocks,)
    try:
        q8, state2 = bnb.functional().quantize_blockwise(centred, blocksize=NESTED_BLOCKSIZE)
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


def dequantize_nested(
    q8: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor, bs: int, offset: float
) -> torch.Tensor:
    """Blockwise 8-bit dequantisation plus the offset, in bitsandbytes' float32 op order."""
    import torch

    n = q8.numel()
    block = torch.arange(n, device=q8.device) // bs  # (n_blocks,)
    if block.numel() and int(block[-1]) >= nested_absmax.numel():
        raise BrokenFile("nested_absmax has fewer entries than the absmax codes need")
    scales = nested_code[q8.long()] * nested_absmax[block]  # (n_blocks,)
    return scales + torch.tensor(offset, dtype=torch.float32, device=q8.device)
