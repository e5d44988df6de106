"""The bitsandbytes 4-bit stored layout, described once (pure Python: no torch, no NumPy).

transformers (+ bitsandbytes) stores a 4-bit weight ``X.weight`` as several tensors:

- ``X.weight``: the packed codes, two 4-bit codes per byte (high nibble first), shape
  ``(ceil(numel / 2) / itemsize, 1)`` in the ``quant_storage`` dtype (uint8 by default);
- ``X.weight.absmax``: one scale per block of ``blocksize`` values (float32), or, with double
  quantisation, those scales minus their mean as 8-bit codes (uint8);
- ``X.weight.quant_map``: the 16 code values, float32 (bitsandbytes ignores it and uses its
  built-in table for the quant type; so do we);
- ``X.weight.nested_absmax`` / ``X.weight.nested_quant_map``: with double quantisation, the
  float32 scale of each block of 256 scales and the 256-value dynamic 8-bit code;
- ``X.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): a uint8 tensor holding JSON with
  ``quant_type``, ``blocksize``, ``dtype``, ``shape`` and, when nested, ``nested_blocksize``,
  ``nested_dtype`` and ``nested_offset`` (the mean subtracted from the scales).

Everything that names, sizes, recognises or (de)serialises those tensors asks this module:
the checkpoint reader, the merge planner, and the torch code in the rest of ``adapterctl.nf4``.
A merge writes the state JSON space-padded to :data:`STATE_BYTES` so every header can be
planned before the data exists; transformers writes it unpadded, and JSON readers ignore the
trailing spaces.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Container, Mapping
from dataclasses import dataclass
from typing import Any

from adapterctl.errors import BrokenFile, UsageError
from adapterctl.tensorfile import TORCH_DTYPE_NAMES, tensor_nbytes

QUANT_TYPES = ("nf4", "fp4")
METHODS = ("optimal", "absmax")  # how a merge picks block scales (see ``nf4.quantize``)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # scales per double-quantisation block
CODE_SIZE = 16  # values in a 4-bit code table (``quant_map``)
NESTED_CODE_SIZE = 256  # values in the 8-bit dynamic code (``nested_quant_map``)
STATE_BYTES = 384  # a merge pads the state JSON to this size (a 2-D state takes under 200)
STORAGE_DTYPES = ("uint8", "int8", "float16", "bfloat16", "float32", "float64")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # dtypes a state may dequantise to

ABSMAX = ".absmax"
QUANT_MAP = ".quant_map"
NESTED_ABSMAX = ".nested_absmax"
NESTED_QUANT_MAP = ".nested_quant_map"
AUX_SUFFIXES = (ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_QUANT_MAP)
STATE_KEY = ".quant_state.bitsandbytes__"  # weight + STATE_KEY + quant_type
_STATE_MARK = ".quant_state."

Entry = tuple[str, str, tuple[int, ...], int]
"""A stored tensor: (name, safetensors dtype, shape, nbytes)."""

_ST_NAMES = {torch_name: st for st, torch_name in TORCH_DTYPE_NAMES.items()}


# --------------------------------------------------------------------------------------------
# Names


def state_key(weight: str, quant_type: str) -> str:
    """The name of a weight's quant-state tensor (``X.weight.quant_state.bitsandbytes__nf4``)."""
    return f"{weight}{STATE_KEY}{quant_type}"


def parse_state_key(name: str) -> tuple[str, str] | None:
    """(weight, quant_type) when ``name`` is a 4-bit quant state's name, else None."""
    for quant_type in QUANT_TYPES:
        suffix = STATE_KEY + quant_type
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], quant_type
    return None


@dataclass(frozen=True)
class Group:
    """The stored tensors of one 4-bit weight, as found in a checkpoint."""

    weight: str  # the packed weight's name
    quant_type: str  # from the state's name
    state: str  # the quant state's name
    aux: tuple[str, ...]  # the aux tensors present, in ``AUX_SUFFIXES`` order

    @property
    def nested(self) -> bool:
        """Whether the scales are double-quantised."""
        return self.weight + NESTED_ABSMAX in self.aux

    @property
    def statistics(self) -> tuple[str, ...]:
        """Every stored tensor but the packed weight: the aux tensors, then the state."""
        return (*self.aux, self.state)


def groups(names: Collection[str]) -> dict[str, Group]:
    """The 4-bit weights among a checkpoint's tensor names, each with its stored tensors.

    A weight is 4-bit when a quant state is stored under its name; its aux tensors are those
    of ``AUX_SUFFIXES`` present in ``names``.

    Args:
        names: every tensor name of the checkpoint (a dict of them will do).

    Returns:
        Weight name -> its :class:`Group`, in the order of the states in ``names``.

    Example:
        >>> groups(["w", "w.absmax", "w.quant_map", "w.quant_state.bitsandbytes__nf4"])["w"].aux
        ('w.absmax', 'w.quant_map')
    """
    out: dict[str, Group] = {}
    for name in names:
        parsed = parse_state_key(name)
        if parsed is None:
            continue
        weight, quant_type = parsed
        aux = tuple(weight + s for s in AUX_SUFFIXES if weight + s in names)
        out[weight] = Group(weight, quant_type, name, aux)
    return out


def is_statistic(name: str, weights: Container[str]) -> bool:
    """Whether a stored tensor is 4-bit bookkeeping rather than a model tensor: any quant
    state, or an aux tensor of one of ``weights`` (the 4-bit weights)."""
    if _STATE_MARK in name:
        return True
    return name.endswith(AUX_SUFFIXES) and name.rsplit(".", 1)[0] in weights


# --------------------------------------------------------------------------------------------
# Sizes


def n_blocks(numel: int, blocksize: int) -> int:
    """Scales of a weight of ``numel`` values: one per block, the last one possibly short."""
    return -(-numel // blocksize)


def packed_nbytes(numel: int) -> int:
    """Bytes of ``numel`` packed 4-bit codes (two per byte, the last half-filled if odd)."""
    return (numel + 1) // 2


def stored_tensors(
    weight: str,
    shape: tuple[int, ...],
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    storage: str = "uint8",
    state_nbytes: int = STATE_BYTES,
) -> list[Entry]:
    """The tensors one 4-bit weight is stored as, in the order a merge writes them.

    Args:
        weight: the weight's name, e.g. ``"model.layers.0.mlp.up_proj.weight"``.
        shape: its logical (unpacked) shape.
        quant_type: ``"nf4"`` or ``"fp4"``.
        blocksize: values per scale.
        double_quant: whether the scales are double-quantised.
        storage: the dtype the packed codes are stored as (``bnb_4bit_quant_storage``).
        state_nbytes: the quant state's length (a merge pads it to :data:`STATE_BYTES`;
            transformers writes the JSON's own length).

    Returns:
        (name, safetensors dtype, shape, nbytes) of the packed weight, ``absmax``,
        ``quant_map``, with double quantisation ``nested_absmax`` and ``nested_quant_map``,
        and the quant state.

    Example:
        >>> [e[1:] for e in stored_tensors("w", (32, 64), double_quant=False)]
        [('U8', (1024, 1), 1024), ('F32', (32,), 128), ('F32', (16,), 64), ('U8', (384,), 384)]
    """
    numel = 1
    for d in shape:
        numel *= d
    blocks = n_blocks(numel, blocksize)
    packed_dtype = _ST_NAMES[storage_name(storage)]
    itemsize = tensor_nbytes(packed_dtype, (1,))
    out: list[tuple[str, str, tuple[int, ...]]] = [
        (weight, packed_dtype, (packed_nbytes(numel) // itemsize, 1)),
        (weight + ABSMAX, "U8" if double_quant else "F32", (blocks,)),
        (weight + QUANT_MAP, "F32", (CODE_SIZE,)),
    ]
    if double_quant:
        out += [
            (weight + NESTED_ABSMAX, "F32", (n_blocks(blocks, NESTED_BLOCKSIZE),)),
            (weight + NESTED_QUANT_MAP, "F32", (NESTED_CODE_SIZE,)),
        ]
    out.append((state_key(weight, quant_type), "U8", (state_nbytes,)))
    return [(n, d, s, tensor_nbytes(d, s)) for n, d, s in out]


# --------------------------------------------------------------------------------------------
# The quant state


def state_blob(state: Mapping[str, Any], *, padded: bool = False) -> bytes:
    """A quant state's bytes, as bitsandbytes writes them (``json.dumps``, UTF-8).

    Args:
        state: ``quant_type``, ``blocksize``, ``dtype``, ``shape`` (and ``nested_*``).
        padded: space-pad to :data:`STATE_BYTES`, the size a merge plans for.

    Raises:
        RuntimeError: ``padded`` and the JSON is longer than :data:`STATE_BYTES` (a planning
            bug: the headers were written with that size).
    """
    blob = json.dumps(dict(state)).encode("utf-8")
    if not padded:
        return blob
    if len(blob) > STATE_BYTES:
        raise RuntimeError(f"internal: 4-bit quant state larger than {STATE_BYTES} bytes")
    return blob + b" " * (STATE_BYTES - len(blob))


def parse_state(blob: bytes, where: str) -> dict[str, Any]:
    """Decode a quant state (padded or not).

    Args:
        blob: the state tensor's bytes.
        where: what to name in the error (the state's name, and its file if known).

    Returns:
        The state, with ``blocksize`` an int and ``shape`` a list of ints.

    Raises:
        BrokenFile: not JSON, or ``quant_type``, ``blocksize`` or ``shape`` missing or bad.
    """
    try:
        state = json.loads(blob.decode("utf-8"))
        state["blocksize"] = int(state["blocksize"])
        state["shape"] = [int(d) for d in state["shape"]]
        str(state["quant_type"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise BrokenFile(f"{where}: malformed bitsandbytes quant state") from None
    if not isinstance(state, dict):
        raise BrokenFile(f"{where}: malformed bitsandbytes quant state")
    return state


# --------------------------------------------------------------------------------------------
# Arguments and config


def check_quant_type(quant_type: str, where: str = "") -> None:
    """Refuse a quant type other than nf4/fp4: a broken file when ``where`` names the tensor
    it came from, else a usage error."""
    if quant_type not in QUANT_TYPES:
        if where:
            raise BrokenFile(f"{where}: unknown 4-bit quant type {quant_type!r} (nf4 or fp4)")
        raise UsageError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def dtype_name(dtype: object) -> str:
    """A dtype's name as bitsandbytes and transformers write it (``torch.bfloat16`` ->
    ``"bfloat16"``; a string is taken as it is)."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def storage_name(storage: object) -> str:
    """The name of a ``quant_storage`` dtype (torch dtype or name), checked."""
    name = dtype_name(storage)
    if name not in STORAGE_DTYPES:
        raise UsageError(f"quant_storage must be one of {STORAGE_DTYPES}, got {name!r}")
    return name


def float_name(dtype: object, *, explicit: bool) -> str:
    """The dtype a state records: ``dtype``'s name if a 16/32-bit float, else float32 (or,
    when the caller asked for ``dtype`` ``explicit``-ly, a usage error)."""
    name = dtype_name(dtype)
    if name in FLOAT_DTYPES:
        return name
    if explicit:
        raise UsageError(f"dtype must be one of {FLOAT_DTYPES}, got {name!r}")
    return "float32"


def quantization_config(
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: object = "bfloat16",
    skip_modules: list[str] | None = None,
    quant_storage: object = "uint8",
) -> dict[str, Any]:
    """The ``quantization_config`` transformers writes to ``config.json`` for a 4-bit model.

    Mirrors ``BitsAndBytesConfig(load_in_4bit=True, ...).to_dict()``. Values are written as
    given (dtypes by name); ``nf4.quantization_config`` checks them first. The blocksize is
    not part of it: transformers reads each weight's own from its quant state.
    """
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": dtype_name(compute_dtype),
        "bnb_4bit_quant_storage": dtype_name(quant_storage),
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
