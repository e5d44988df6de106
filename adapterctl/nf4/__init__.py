"""bitsandbytes NF4/FP4 (de)quantisation in the serialized format transformers writes.

``layout`` describes the stored tensors (names, dtypes, shapes, the JSON quant state) and is
pure Python; the rest works on torch tensors, one weight at a time, on whatever device they
are on, and imports torch (and bitsandbytes) only when called:

- ``codes``: the 4-bit code tables, packing two codes per byte, rounding to the nearest code;
- ``blocks``: blocking a weight, and the double quantisation of its block scales;
- ``dequantization``: :func:`read_state` and :func:`dequantize`;
- ``quantization``: :func:`quantize`, :func:`delta_error`, :func:`quantization_config`;
- ``search``: the scale search behind ``quantize(method="optimal")``;
- ``bnb``: the quiet import of bitsandbytes.

A value dequantises to ``code[q] * scale`` in float32, where with double quantisation
``scale = nested_code[q8] * nested_absmax + nested_offset``. Everything here reproduces
bitsandbytes bit for bit: :func:`dequantize` equals ``bitsandbytes.functional.dequantize_4bit``
computed in float32, and :func:`quantize` with ``method="absmax"`` equals
``bitsandbytes.functional.quantize_4bit`` (which is what transformers and PEFT use).
``method="optimal"`` searches each block's stored scale to minimise the reconstruction error
after the double-quantisation round trip, which matters when a merge re-quantises ``W + ΔW``.
Absmax quantisation calls bitsandbytes (pure torch where it has no kernel); dequantisation and
the optimal search are pure torch, which is bit-exact with bitsandbytes' single float32
product.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Literal

from adapterctl.nf4 import layout
from adapterctl.nf4.layout import (
    AUX_SUFFIXES,
    BLOCKSIZES,
    NESTED_BLOCKSIZE,
    QUANT_TYPES,
    STATE_KEY,
)

if TYPE_CHECKING:
    from adapterctl.nf4.codes import code_table, nested_code_table, pack, unpack
    from adapterctl.nf4.dequantization import dequantize, read_state
    from adapterctl.nf4.quantization import delta_error, quantization_config, quantize

# The math modules load on first use: reading a checkpoint needs only ``layout`` (``validate``
# starts in a few tenths of a second; these add 10 ms).
_LAZY = {
    "code_table": "codes", "nested_code_table": "codes", "pack": "codes", "unpack": "codes",
    "dequantize": "dequantization", "read_state": "dequantization",
    "delta_error": "quantization", "quantization_config": "quantization",
    "quantize": "quantization",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"adapterctl.nf4.{module}"), name)


QuantType = Literal["nf4", "fp4"]
Method = Literal["absmax", "optimal"]

__all__ = [
    "AUX_SUFFIXES",
    "BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "QUANT_TYPES",
    "STATE_KEY",
    "Method",
    "QuantType",
    "code_table",
    "delta_error",
    "dequantize",
    "layout",
    "nested_code_table",
    "pack",
    "quantization_config",
    "quantize",
    "read_state",
    "unpack",
]
