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

Everything that names, sizes, recognises, checks or (de)serialises those tensors asks this
module: the checkpoint reader, the merge planner, and the torch code in the rest of
``adapterctl.nf4``. :func:`parse_state` and :func:`group_problem` hold a stored weight to what
bitsandbytes needs to load it, so a weight missing part of its state is refused rather than
dequantised wrong.
A merge writes the state JSON space-padded to :data:`STATE_BYTES` so every header can be
planned before the data exists; transformers writes it unpadded, and JSON readers ignore the
trailing spaces.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Container, Mapping
from dataclasses import dataclass, replace
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
MAX_STATE_BYTES = 65536  # a quant state read from a checkpoint is refused above this size
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
# safetensors name -> quant_storage name, for the dtypes packed codes may be stored as
_STORAGE_BY_ST = {_ST_NAMES[name]: name for name in STORAGE_DTYPES}


# --------------------------------------------------------------------------------------------
# Names


def st_dtype(dtype: object) -> str:
    """The safetensors name of a torch dtype (or its name): ``torch.uint8`` -> ``"U8"``; the
    name itself when safetensors has none (so comparisons with a stored dtype fail)."""
    name = dtype_name(dtype)
    return _ST_NAMES.get(name, name)


def state_key(weight: str, quant_type: str) -> str:
    """The name of a weight's quant-state tensor (``X.weight.quant_state.bitsandbytes__nf4``)."""
    return f"{weight}{STATE_KEY}{quant_type}"


def parse_state_key(name: str) -> tuple[str, str] | None:
    """(weight, quant_type) when ``name`` is a 4-bit quant state's name, else None."""
    if _STATE_MARK not in name:
        return None
    weight, quant_type = _split_state_key(name)
    if weight and quant_type in QUANT_TYPES and name == state_key(weight, quant_type):
        return weight, quant_type
    return None


def _split_state_key(name: str) -> tuple[str, str]:
    """(weight, what follows ``bitsandbytes__``) of any name holding ``.quant_state.``; the
    second part is only a quant type if ``name`` is one of ``state_key``'s."""
    weight, kind = name.rsplit(_STATE_MARK, 1)
    return weight, kind.removeprefix(STATE_KEY.removeprefix(_STATE_MARK))


@dataclass(frozen=True)
class Group:
    """The stored tensors of one 4-bit weight, as found in a checkpoint."""

    weight: str  # the packed weight's name
    quant_type: str  # from the state's name (anything after ``bitsandbytes__``: checked later)
    state: str  # the quant state's name
    aux: tuple[str, ...]  # the aux tensors present, in ``AUX_SUFFIXES`` order
    more_states: tuple[str, ...] = ()  # further quant states of the same weight (broken)

    @property
    def nested(self) -> bool:
        """Whether the scales are double-quantised."""
        return self.weight + NESTED_ABSMAX in self.aux

    @property
    def statistics(self) -> tuple[str, ...]:
        """Every stored tensor but the packed weight: the aux tensors, then the state(s)."""
        return (*self.aux, self.state, *self.more_states)


def group(weight: str, state: str, names: Container[str]) -> Group:
    """The :class:`Group` of ``weight`` whose quant state is named ``state``, with the aux
    tensors of ``AUX_SUFFIXES`` present in ``names``."""
    aux = tuple(weight + s for s in AUX_SUFFIXES if weight + s in names)
    return Group(weight, _split_state_key(state)[1], state, aux)


def groups(names: Collection[str]) -> dict[str, Group]:
    """The 4-bit weights among a checkpoint's tensor names, each with its stored tensors.

    A weight is 4-bit when a quant state is stored under its name (any
    ``X.quant_state.…`` tensor, so that an unknown quant type or a second state is found
    and reported by :func:`group_problem` rather than taken for a model tensor); its aux
    tensors are those of ``AUX_SUFFIXES`` present in ``names``.

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
        if _STATE_MARK not in name:
            continue
        weight = _split_state_key(name)[0]
        if weight in out:
            first = out[weight]
            out[weight] = replace(first, more_states=(*first.more_states, name))
        else:
            out[weight] = group(weight, name, names)
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
    nested_blocksize: int = NESTED_BLOCKSIZE,
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
        nested_blocksize: scales per double-quantisation block (bitsandbytes: 256).

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
            (weight + NESTED_ABSMAX, "F32", (n_blocks(blocks, nested_blocksize),)),
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
    """Decode a quant state (padded or not) and check every field bitsandbytes reads.

    Args:
        blob: the state tensor's bytes.
        where: what to name in the error (the state's name, and its file if known).

    Returns:
        The state: ``quant_type`` nf4/fp4, ``blocksize`` one of :data:`BLOCKSIZES`, ``dtype``
        one of :data:`FLOAT_DTYPES`, ``shape`` a list of non-negative ints and, when
        double-quantised, ``nested_blocksize`` (one of :data:`BLOCKSIZES`), ``nested_dtype``
        and a finite ``nested_offset``.

    Raises:
        BrokenFile: not a JSON object or a field missing ("malformed bitsandbytes quant
            state"), or a field bitsandbytes would refuse or misread (the message says which).
    """
    try:
        state = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BrokenFile(f"{where}: malformed bitsandbytes quant state") from None
    if not isinstance(state, dict) or not all(k in state for k in _STATE_FIELDS):
        raise BrokenFile(f"{where}: malformed bitsandbytes quant state")
    problem = _state_problem(state)
    if problem is not None:
        raise BrokenFile(f"{where}: {problem}")
    return state


# The fields of a quant state's JSON (bitsandbytes ``QuantState.as_dict``): always, and with
# double quantisation.
_STATE_FIELDS = ("quant_type", "blocksize", "dtype", "shape")
_NESTED_FIELDS = ("nested_blocksize", "nested_dtype", "nested_offset")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _state_problem(state: dict[str, Any]) -> str | None:
    """What in a decoded state bitsandbytes would refuse or misread, or None."""
    unknown = sorted(k for k in state if k not in _STATE_FIELDS + _NESTED_FIELDS)
    if unknown:
        return f"unknown quant state field {unknown[0]!r:.40}"
    if state["quant_type"] not in QUANT_TYPES:
        return f"quant_type {state['quant_type']!r:.40} is not one of {', '.join(QUANT_TYPES)}"
    for key in ("blocksize", "nested_blocksize"):
        if key in state and not (_is_int(state[key]) and state[key] in BLOCKSIZES):
            allowed = ", ".join(map(str, BLOCKSIZES))
            return f"{key} {state[key]!r:.40} is not one of bitsandbytes' {allowed}"
    for key in ("dtype", "nested_dtype"):
        if key in state and state[key] not in FLOAT_DTYPES:
            return f"{key} {state[key]!r:.40} is not one of {', '.join(FLOAT_DTYPES)}"
    shape = state["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        return f"shape {shape!r:.60} is not a list of non-negative integers"
    nested = [k for k in _NESTED_FIELDS if k in state]
    if nested and len(nested) != len(_NESTED_FIELDS):
        missing = next(k for k in _NESTED_FIELDS if k not in state)
        return f"double-quantised ({nested[0]}) but {missing} is missing"
    offset = state.get("nested_offset", 0.0)
    if (
        isinstance(offset, bool)
        or not isinstance(offset, (int, float))
        or not math.isfinite(offset)
    ):
        return f"nested_offset {offset!r:.40} is not a finite number"
    return None


def is_nested(state: Mapping[str, Any]) -> bool:
    """Whether a (parsed) quant state says its scales are double-quantised."""
    return "nested_offset" in state


def group_problem(
    found: Group,
    stored: Mapping[str, tuple[str, tuple[int, ...]]],
    state: Mapping[str, Any] | None = None,
) -> str | None:
    """What is missing or inconsistent in one 4-bit weight's stored tensors, or None.

    Called twice by a reader: before the state is read (``state`` None: its name and the
    state tensor itself: a known quant type, one state, uint8, at most
    :data:`MAX_STATE_BYTES`), then with the state ``parse_state`` decoded (its quant type
    agrees with its name; the packed weight, ``absmax``, ``quant_map`` and, exactly when the
    state is double-quantised, ``nested_absmax`` and ``nested_quant_map`` are there, with the
    dtypes and sizes its shape and blocksizes give).

    Args:
        found: the weight's tensors, from :func:`groups`.
        stored: name -> (safetensors dtype, shape) of the tensors at hand (the checkpoint's).
        state: the decoded quant state, for the second call.

    Returns:
        One line naming the tensor and what is wrong with it, or None.

    Example:
        >>> state = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 64]}
        >>> stored = {"w": ("U8", (2048, 1)), "w.quant_map": ("F32", (16,)),
        ...           "w.quant_state.bitsandbytes__nf4": ("U8", (70,))}
        >>> group_problem(groups(stored)["w"], stored, state)
        'w.absmax: missing'
    """
    if state is None:
        if parse_state_key(found.state) is None:
            return (
                f"{found.state}: not a bitsandbytes quant state (its name should end in "
                f"{STATE_KEY}nf4 or {STATE_KEY}fp4)"
            )
        if found.more_states:
            return f"{found.weight}: two quant states, {found.state} and {found.more_states[0]}"
        dtype, shape = stored[found.state]
        if dtype != "U8" or len(shape) != 1 or shape[0] > MAX_STATE_BYTES:
            return (
                f"{found.state}: {dtype} {list(shape)} is not a quant state (uint8 JSON, at "
                f"most {MAX_STATE_BYTES} bytes)"
            )
        return None
    w = found.weight
    if state["quant_type"] != found.quant_type:
        said = state["quant_type"]
        return f"{found.state}: says quant_type {said!r} but is named for {found.quant_type!r}"
    if w not in stored:
        return f"{w}: missing (the packed 4-bit codes of {found.state})"
    storage = _STORAGE_BY_ST.get(stored[w][0])
    if storage is None:
        return (
            f"{w}: packed 4-bit codes stored as {stored[w][0]}, not one of "
            f"{', '.join(_STORAGE_BY_ST)}"
        )
    nested = is_nested(state)
    blocksize = state["blocksize"]
    want = stored_tensors(
        w, tuple(state["shape"]), quant_type=found.quant_type, blocksize=blocksize,
        double_quant=nested, storage=storage,
        nested_blocksize=state.get("nested_blocksize", NESTED_BLOCKSIZE),
    )[:-1]  # fmt: skip
    for name, dtype, _, nbytes in want:
        if name not in stored:
            why = " although its quant state is double-quantised" if nested else ""
            return f"{name}: missing{why}"
        got_dtype, got_shape = stored[name]
        if got_dtype != dtype or tensor_nbytes(got_dtype, got_shape) != nbytes:
            return (
                f"{name}: {got_dtype} {list(got_shape)} and the quant state (shape "
                f"{state['shape']}, blocksize {blocksize}) do not fit: expected {dtype} with "
                f"{nbytes} bytes"
            )
    extra = [w + s for s in (NESTED_ABSMAX, NESTED_QUANT_MAP) if w + s in stored]
    if extra and not nested:
        return f"{extra[0]}: stored, but {found.state} is not double-quantised (no nested_offset)"
    return None


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
