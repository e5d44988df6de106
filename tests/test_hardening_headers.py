"""Hardening of what is read from safetensors headers, one test per class of problem.

Headers are held to the safetensors format at least as strictly as its reference reader
(``safetensors.deserialize``): a header it refuses is refused here too, with exit 3 and one
``Error:`` line naming the file and the tensor, whether the file is an adapter's or a base
shard, in ``validate``, ``inspect`` and ``merge`` (which leaves no output behind). A property
test holds the two readers against each other on generated headers.

A bitsandbytes 4-bit base must hold every tensor its quant states need, of the sizes they
imply, and states bitsandbytes accepts: otherwise ``validate --base`` reports AC213 and
``inspect``/``merge`` exit 3 naming the tensor, instead of merging silently wrong weights.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterctl.cli import cli
from adapterctl.demo import write_adapter, write_base
from adapterctl.errors import BrokenFile
from adapterctl.tensorfile import DTYPE_BITS, MAX_HEADER_BYTES, parse_header, read_header

ST = "adapter_model.safetensors"
BASE_ST = "model.safetensors"


# --- helpers ---------------------------------------------------------------------------------


def _split(path: Path) -> tuple[dict[str, Any], bytes]:
    """A safetensors file as (its header as a dict, its data bytes)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(text: str, data: bytes) -> bytes:
    """A safetensors file from header text (any text: it may break the rules) and data."""
    raw = text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + data


def _object(pairs: list[tuple[str, Any]]) -> str:
    """JSON object text from key/value pairs, duplicates kept (``json.dumps`` writes NaN and
    Infinity as the bare words, and escapes lone surrogates as ``\\ud800``)."""
    return "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}"


def _tensors(header: dict[str, Any]) -> list[str]:
    """The tensor names of a header, by data offset."""
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"])


def _with(header: dict[str, Any], name: str, **changes: Any) -> list[tuple[str, Any]]:
    """The header's pairs, with entry ``name`` changed."""
    return [(k, {**v, **changes} if k == name else v) for k, v in header.items()]


Breaker = Callable[[dict[str, Any], bytes], tuple[str, bytes, str | None]]
"""(header, data) -> (broken header text, data, the tensor the message must name or None)."""


def _first_entry(**changes: Any) -> Breaker:
    def breaker(header: dict[str, Any], data: bytes) -> tuple[str, bytes, str | None]:
        name = _tensors(header)[0]
        return _object(_with(header, name, **changes)), data, name

    return breaker


def _duplicate_tensor(header: dict[str, Any], data: bytes) -> tuple[str, bytes, str | None]:
    name = _tensors(header)[0]
    return _object([*header.items(), (name, header[name])]), data, name


def _duplicate_field(header: dict[str, Any], data: bytes) -> tuple[str, bytes, str | None]:
    name = _tensors(header)[0]
    entry = header[name]
    inner = _object([("dtype", entry["dtype"]), *entry.items()])
    pairs = [f"{json.dumps(k)}: {inner if k == name else json.dumps(v)}" for k, v in header.items()]
    return "{" + ", ".join(pairs) + "}", data, None


def _lone_surrogate(header: dict[str, Any], data: bytes) -> tuple[str, bytes, str | None]:
    name = _tensors(header)[0]
    pairs = [("\ud800" if k == name else k, v) for k, v in header.items()]
    return _object(pairs), data, "\\ud800"


def _overlap(header: dict[str, Any], data: bytes) -> tuple[str, bytes, str | None]:
    first, second = _tensors(header)[:2]
    begin = header[first]["data_offsets"][0]
    size = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
    moved = _with(header, second, data_offsets=[begin + 4, begin + 4 + size])
    return _object(moved), data, second


def _gap(header: dict[str, Any], data: bytes) -> tuple[str, bytes, str | None]:
    first, second = _tensors(header)[:2]
    pairs = [(k, v) for k, v in header.items() if k != first]
    return _object(pairs), data, second


def _trailing(header: dict[str, Any], data: bytes) -> tuple[str, bytes, str | None]:
    return _object(list(header.items())), data + b"\0" * 8, None


def _past_end(header: dict[str, Any], data: bytes) -> tuple[str, bytes, str | None]:
    last = _tensors(header)[-1]
    return _object(list(header.items())), data[:-4], last


def _metadata(value: Any) -> Breaker:
    def breaker(header: dict[str, Any], data: bytes) -> tuple[str, bytes, str | None]:
        pairs = [
            ("__metadata__", value),
            *((k, v) for k, v in header.items() if k != "__metadata__"),
        ]
        return _object(pairs), data, None

    return breaker


def _not_utf8(header: dict[str, Any], data: bytes) -> tuple[str, bytes, str | None]:
    name = _tensors(header)[0]
    # A raw surrogate, which ``_join`` writes as bytes no UTF-8 decoder accepts.
    text = _object(list(header.items())).replace(json.dumps(name), f'"{name}\udcff"', 1)
    return text, data, None


# Each class of problem: (id, breaker, what the message says).
NUMBERS: list[tuple[str, Breaker, str]] = [
    ("float-shape", _first_entry(shape=[8.9, 64.2]), "shape entry 8.9, not an integer"),
    ("whole-float-shape", _first_entry(shape=[8.0, 64]), "shape entry 8.0, not an integer"),
    ("infinity-shape", _first_entry(shape=[math.inf, 64]), "shape entry Infinity, not an"),
    ("nan-offset", _first_entry(data_offsets=[0, math.nan]), "data_offsets entry NaN, not an"),
    ("minus-infinity-offset", _first_entry(data_offsets=[-math.inf, 0]), "entry -Infinity"),
    ("bool-shape", _first_entry(shape=[True, 64]), "shape entry True, not an integer"),
    ("string-offset", _first_entry(data_offsets=["0", 16]), "data_offsets entry '0', not an"),
    ("negative-shape", _first_entry(shape=[-8, -64]), "negative shape entry"),
    ("past-64-bits", _first_entry(shape=[2**64, 0]), "past the format's 64-bit range"),
    ("three-offsets", _first_entry(data_offsets=[0, 8, 16]), "two data_offsets"),
    ("reversed-offsets", _first_entry(data_offsets=[16, 0]), "byte range does not match"),
    ("sub-byte", _first_entry(dtype="F4", shape=[3]), "whole number of bytes"),
    ("unknown-dtype", _first_entry(dtype="F12"), "unknown dtype 'F12'"),
]
RANGES: list[tuple[str, Breaker, str]] = [
    ("overlap", _overlap, "overlap"),
    ("gap", _gap, "belong to no tensor (the format allows no gap)"),
    ("trailing-bytes", _trailing, "8 bytes after the last tensor's data belong to no tensor"),
    ("past-the-end", _past_end, "truncated"),
]
KEYS_AND_TEXT: list[tuple[str, Breaker, str]] = [
    ("duplicate-tensor", _duplicate_tensor, "twice"),
    ("duplicate-field", _duplicate_field, "the key 'dtype' twice"),
    ("lone-surrogate-name", _lone_surrogate, "is not valid UTF-8"),
    ("not-utf8", _not_utf8, "header is not UTF-8"),
    ("metadata-list", _metadata(["pt"]), "__metadata__ must map strings to strings"),
    ("metadata-number", _metadata({"format": 1}), "'format' is 1"),
    ("metadata-surrogate", _metadata({"format": "\udc00"}), "not valid UTF-8"),
    ("metadata-nan", _metadata({"format": math.nan}), "holds NaN"),
]


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A good adapter and a good single-file base, written once; tests break copies."""
    root = tmp_path_factory.mktemp("originals")
    return write_adapter(root / "adapter"), write_base(root / "base", shards=1)


@pytest.fixture
def pair(originals: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    adapter = Path(shutil.copytree(originals[0], tmp_path / "in" / "adapter"))
    base = Path(shutil.copytree(originals[1], tmp_path / "in" / "base"))
    return adapter, base


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _one_line_error(result: Result, *says: str) -> str:
    """Exit 3, nothing on stdout, one ``Error:`` line on stderr holding every ``says``."""
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for s in says:
        assert s in lines[0], (s, lines[0])
    assert lines[0].startswith("Error: ")
    return lines[0]


def _refused_everywhere(pair: tuple[Path, Path], where: str, breaker: Breaker, says: str) -> None:
    """Break the adapter's file or the base's, then: validate, inspect and merge each exit 3
    with one line naming the file (and the tensor), and merge writes nothing."""
    adapter, base = pair
    target = adapter / ST if where == "adapter" else base / BASE_ST
    text, data, tensor = breaker(*_split(target))
    target.write_bytes(_join(text, data))
    names = [str(target), says] + ([tensor] if tensor else [])
    before = _snapshot(adapter.parent)
    out = adapter.parent.parent / "merged"
    runs = [
        ["validate", str(adapter), "--base", str(base)],
        ["inspect", str(adapter), "--base", str(base)],
        ["merge", str(base), str(adapter), "-o", str(out)],
    ]
    if where == "adapter":
        runs += [["validate", str(adapter)], ["inspect", str(adapter), "--json"]]
    for args in runs:
        _one_line_error(CliRunner().invoke(cli, args), *names)
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == ["in"]  # no partial output beside it
    assert _snapshot(adapter.parent) == before  # inputs untouched


# --- the header classes, end to end ----------------------------------------------------------


@pytest.mark.parametrize("where", ["adapter", "base"])
@pytest.mark.parametrize(("breaker", "says"), [c[1:] for c in NUMBERS], ids=[c[0] for c in NUMBERS])
def test_shapes_and_offsets_must_be_unsigned_integers_of_a_known_dtype(
    pair: tuple[Path, Path], where: str, breaker: Breaker, says: str
) -> None:
    _refused_everywhere(pair, where, breaker, says)


@pytest.mark.parametrize("where", ["adapter", "base"])
@pytest.mark.parametrize(("breaker", "says"), [c[1:] for c in RANGES], ids=[c[0] for c in RANGES])
def test_data_ranges_must_tile_the_data_to_the_end_of_the_file(
    pair: tuple[Path, Path], where: str, breaker: Breaker, says: str
) -> None:
    _refused_everywhere(pair, where, breaker, says)


@pytest.mark.parametrize("where", ["adapter", "base"])
@pytest.mark.parametrize(
    ("breaker", "says"), [c[1:] for c in KEYS_AND_TEXT], ids=[c[0] for c in KEYS_AND_TEXT]
)
def test_keys_are_unique_and_text_is_utf8_strings(
    pair: tuple[Path, Path], where: str, breaker: Breaker, says: str
) -> None:
    _refused_everywhere(pair, where, breaker, says)


def test_header_length_is_capped(pair: tuple[Path, Path]) -> None:
    adapter, _ = pair
    # A length past the cap is refused before anything is read or allocated.
    (adapter / ST).write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    result = CliRunner().invoke(cli, ["validate", str(adapter)])
    _one_line_error(result, str(adapter / ST), "over the safetensors limit of 100000000 bytes")


# --- the readers agree: at least as strict as safetensors, and no stricter on good files ------

_DTYPES = sorted(DTYPE_BITS)


@st.composite
def _files(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A safetensors file built by hand: 1-3 tensors laid out correctly, then maybe one flaw
    (a shifted, swapped or dropped range, a wrong shape, trailing or missing bytes, a
    duplicate). Returns (file bytes, whether it was built without a flaw)."""
    n = draw(st.integers(1, 3))
    pairs: list[tuple[str, Any]] = []
    offset = 0
    for i in range(n):
        dtype = draw(st.sampled_from(_DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        bits = DTYPE_BITS[dtype] * math.prod(shape)
        if bits % 8:
            shape = [*shape, 4]  # the 4/6-bit floats: a whole number of bytes
            bits *= 4
        size = bits // 8
        pairs.append(
            (f"t{i}", {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]})
        )
        offset += size
    if draw(st.booleans()):
        pairs.insert(0, ("__metadata__", {"format": "pt"}))
    flaw = draw(
        st.sampled_from(["none", "begin", "end", "swap", "drop", "shape", "tail", "cut", "dup"])
    )
    data = bytes(offset)
    k = draw(st.integers(0, n - 1))
    name, entry = [p for p in pairs if p[0] != "__metadata__"][k]
    delta = draw(st.sampled_from([-2, -1, 1, 2]))
    begin, end = entry["data_offsets"]
    if flaw == "begin":
        entry["data_offsets"] = [max(0, begin + delta), end]
    elif flaw == "end":
        entry["data_offsets"] = [begin, max(0, end + delta)]
    elif flaw == "swap":
        entry["data_offsets"] = [end, begin]
    elif flaw == "drop":
        pairs = [p for p in pairs if p[0] != name]
    elif flaw == "shape":
        entry["shape"] = [*entry["shape"], 2]
    elif flaw == "tail":
        data += b"\0" * draw(st.integers(1, 9))
    elif flaw == "cut":
        data = data[: max(0, len(data) - draw(st.integers(1, 9)))]
    elif flaw == "dup":
        pairs.append((name, entry))
    if draw(st.booleans()):  # order in the header does not matter, offsets do
        pairs.reverse()
    return _join(_object(pairs), data), flaw == "none"


def _theirs(raw: bytes) -> bool:
    try:
        safetensors.deserialize(raw)
    except Exception:  # the reference reader's errors are plain exceptions of several kinds
        return False
    return True


def _ours(raw: bytes) -> bool:
    try:
        parse_header(Path("f.safetensors"), len(raw), lambda s, e: raw[s:e])
    except BrokenFile:
        return False
    return True


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_files())
def test_whatever_we_accept_safetensors_accepts(built: tuple[bytes, bool]) -> None:
    raw, sound = built
    ours, theirs = _ours(raw), _theirs(raw)
    assert not ours or theirs  # never laxer than the reference reader
    if sound:
        assert ours and theirs  # and never stricter on a well-formed file


def test_files_safetensors_writes_still_read(tmp_path: Path) -> None:
    """Empty tensors, scalars, metadata, every torch dtype, written by safetensors itself."""
    from safetensors.torch import save_file

    tensors = {
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(1.5),
        "bf16": torch.ones(3, 5, dtype=torch.bfloat16),
        "f8": torch.zeros(7).to(torch.float8_e4m3fn),
        "i64": torch.arange(5),
        "flag": torch.tensor([True, False]),
        "other_empty": torch.zeros(2, 0, dtype=torch.float16),
    }
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt", "note": "é"})
    header = read_header(tmp_path / "x.safetensors")
    assert set(header.tensors) == set(tensors)
    assert header.metadata == {"format": "pt", "note": "é"}
    for name, t in tensors.items():
        got = header.tensors[name].load()
        assert got.shape == t.shape and got.dtype == t.dtype
        assert (
            got.reshape(-1).view(torch.uint8).tolist() == t.reshape(-1).view(torch.uint8).tolist()
        )


# --- inconsistent 4-bit state -----------------------------------------------------------------

W = "model.layers.0.self_attn.q_proj.weight"
STATE = W + ".quant_state.bitsandbytes__nf4"


def _state(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    return json.loads(bytes(sd[STATE].tolist()))


def _put_state(sd: dict[str, torch.Tensor], state: dict[str, Any] | bytes) -> None:
    blob = state if isinstance(state, bytes) else json.dumps(state).encode()
    sd[STATE] = torch.tensor(list(blob), dtype=torch.uint8)


def _drop(*suffixes: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(sd: dict[str, torch.Tensor]) -> None:
        for s in suffixes:
            del sd[W + s]

    return edit


def _field(**changes: Any) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(sd: dict[str, torch.Tensor]) -> None:
        state = _state(sd)
        for k, v in changes.items():
            if v is _DELETE:
                del state[k]
            else:
                state[k] = v
        _put_state(sd, state)

    return edit


_DELETE = object()


def _shorten(suffix: str, by: int) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(sd: dict[str, torch.Tensor]) -> None:
        sd[W + suffix] = sd[W + suffix][:-by].clone()

    return edit


def _rename_state(quant_type: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(sd: dict[str, torch.Tensor]) -> None:
        sd[W + ".quant_state.bitsandbytes__" + quant_type] = sd.pop(STATE)

    return edit


def _second_state(sd: dict[str, torch.Tensor]) -> None:
    sd[W + ".quant_state.bitsandbytes__fp4"] = sd[STATE].clone()


def _state_as_float(sd: dict[str, torch.Tensor]) -> None:
    sd[STATE] = sd[STATE].float()


def _state_not_json(sd: dict[str, torch.Tensor]) -> None:
    _put_state(sd, b"{not json")


Edit = Callable[[dict[str, torch.Tensor]], None]
MISSING: list[tuple[str, Edit, str]] = [
    # The example: without them the uint8 scales were read as floats, 2,142x off.
    ("no-nested-state", _drop(".nested_absmax", ".nested_quant_map"),
     f"{W}.nested_absmax: missing although its quant state is double-quantised"),
    ("no-nested-quant-map", _drop(".nested_quant_map"), f"{W}.nested_quant_map: missing"),
    ("no-absmax", _drop(".absmax"), f"{W}.absmax: missing"),
    ("no-quant-map", _drop(".quant_map"), f"{W}.quant_map: missing"),
    ("no-packed-weight", _drop(""), f"{W}: missing (the packed 4-bit codes"),
    ("nested-tensors-state-not", _field(nested_offset=_DELETE, nested_blocksize=_DELETE,
     nested_dtype=_DELETE), f"{W}.absmax: U8"),
]  # fmt: skip
STATES: list[tuple[str, Edit, str]] = [
    ("blocksize-zero", _field(blocksize=0), "blocksize 0 is not one of bitsandbytes' 32, 64"),
    ("blocksize-abc", _field(blocksize="abc"), "blocksize 'abc' is not one of"),
    ("blocksize-48", _field(blocksize=48), "blocksize 48 is not one of"),
    ("blocksize-true", _field(blocksize=True), "blocksize True is not one of"),
    ("blocksize-missing", _field(blocksize=_DELETE), "malformed bitsandbytes quant state"),
    ("quant-type-int3", _field(quant_type="int3"), "quant_type 'int3' is not one of nf4, fp4"),
    ("quant-type-other", _field(quant_type="fp4"), "says quant_type 'fp4' but is named for"),
    ("dtype-int8", _field(dtype="int8"), "dtype 'int8' is not one of"),
    ("shape-text", _field(shape="64x64"), "shape '64x64' is not a list"),
    ("shape-negative", _field(shape=[-64, -64]), "is not a list of non-negative integers"),
    ("nested-blocksize-zero", _field(nested_blocksize=0), "nested_blocksize 0 is not one of"),
    ("nested-offset-nan", _field(nested_offset=math.nan), "nested_offset nan is not a finite"),
    ("nested-half", _field(nested_dtype=_DELETE), "nested_dtype is missing"),
    ("unknown-field", _field(extra=1), "unknown quant state field 'extra'"),
    ("not-json", _state_not_json, "malformed bitsandbytes quant state"),
    ("state-int3", _rename_state("int3"), "not a bitsandbytes quant state"),
    ("two-states", _second_state, f"{W}: two quant states"),
    ("state-not-uint8", _state_as_float, "is not a quant state (uint8 JSON"),
]
SIZES: list[tuple[str, Edit, str]] = [
    ("absmax-short", _shorten(".absmax", 1), f"{W}.absmax: U8"),
    ("packed-short", _shorten("", 2), f"{W}: U8"),
    ("nested-absmax-short", _shorten(".nested_absmax", 1), f"{W}.nested_absmax: F32"),
    ("quant-map-short", _shorten(".quant_map", 1), f"{W}.quant_map: F32 [15]"),
    ("state-shape-wider", _field(shape=[64, 128]), "shape [64, 128], blocksize 64) do not fit"),
]


@pytest.fixture(scope="module")
def nf4(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama's NF4 (double-quantised) checkpoint, as transformers saves it, and an
    adapter for it."""
    pytest.importorskip("bitsandbytes")
    import oracles
    from builders import llama_model, peft_adapter, save_base

    d = tmp_path_factory.mktemp("nf4")
    model = llama_model(hidden=64, vocab=96)
    base16 = save_base(model, d / "base16")
    oracles.load_4bit(base16, compute=torch.float32, check=False).save_pretrained(d / "nf4")
    _, adapter = peft_adapter(model, d / "adapter")
    return {"nf4": d / "nf4", "adapter": adapter}


def _broken_base(nf4: dict[str, Path], tmp_path: Path, edit: Edit) -> Path:
    from safetensors.torch import load_file, save_file

    base = Path(shutil.copytree(nf4["nf4"], tmp_path / "in" / "base"))
    sd = load_file(str(base / BASE_ST))
    edit(sd)
    save_file(sd, str(base / BASE_ST), metadata={"format": "pt"})
    return base


def _refused_4bit(nf4: dict[str, Path], tmp_path: Path, edit: Edit, says: str) -> None:
    """validate --base reports AC213 for the weight; inspect and merge exit 3 with one line
    naming it; merge writes nothing and changes no input."""
    base = _broken_base(nf4, tmp_path, edit)
    adapter = Path(shutil.copytree(nf4["adapter"], tmp_path / "in" / "adapter"))
    before = _snapshot(tmp_path / "in")
    runner = CliRunner()

    result = runner.invoke(cli, ["validate", str(adapter), "--base", str(base)])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and errors[0].startswith(f"ERROR AC213 {W}: "), result.stdout
    assert says in errors[0] and errors[0].endswith("or use its 16-bit original"), errors[0]
    listed = runner.invoke(cli, ["validate", str(adapter), "--base", str(base), "--json"])
    findings = json.loads(listed.stdout)["findings"]
    assert [(f["code"], f["module"]) for f in findings if f["severity"] == "error"] == [
        ("AC213", W)
    ]

    _one_line_error(runner.invoke(cli, ["inspect", str(adapter), "--base", str(base)]), says)
    out = tmp_path / "merged"
    for extra in ([], ["--quantize", "nf4"], ["--verify"], ["--dry-run"]):
        merged = runner.invoke(cli, ["merge", str(base), str(adapter), "-o", str(out), *extra])
        _one_line_error(merged, "AC213", says)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    assert _snapshot(tmp_path / "in") == before


@pytest.mark.parametrize(("edit", "says"), [c[1:] for c in MISSING], ids=[c[0] for c in MISSING])
def test_a_4bit_base_missing_part_of_a_state_is_refused(
    nf4: dict[str, Path], tmp_path: Path, edit: Edit, says: str
) -> None:
    _refused_4bit(nf4, tmp_path, edit, says)


@pytest.mark.parametrize(("edit", "says"), [c[1:] for c in STATES], ids=[c[0] for c in STATES])
def test_a_quant_state_bitsandbytes_would_refuse_is_refused(
    nf4: dict[str, Path], tmp_path: Path, edit: Edit, says: str
) -> None:
    _refused_4bit(nf4, tmp_path, edit, says)


@pytest.mark.parametrize(("edit", "says"), [c[1:] for c in SIZES], ids=[c[0] for c in SIZES])
def test_4bit_tensors_must_fit_their_state(
    nf4: dict[str, Path], tmp_path: Path, edit: Edit, says: str
) -> None:
    _refused_4bit(nf4, tmp_path, edit, says)


def test_the_sound_4bit_base_passes(nf4: dict[str, Path], tmp_path: Path) -> None:
    """The control: the same checks pass the checkpoint transformers saved."""
    result = CliRunner().invoke(cli, ["validate", str(nf4["adapter"]), "--base", str(nf4["nf4"])])
    assert result.exit_code == 0, result.output
    assert "AC213" not in result.output


@pytest.mark.parametrize(
    ("edit", "says"),
    [MISSING[0][1:], STATES[0][1:], SIZES[0][1:]],
    ids=["no-nested-state", "blocksize-zero", "absmax-short"],
)
def test_the_torch_reader_refuses_the_same_states(
    nf4: dict[str, Path], tmp_path: Path, edit: Edit, says: str
) -> None:
    """``nf4.dequantize`` (what the merge engine and ``--verify`` read 4-bit weights with)
    applies the same rules to tensors at hand."""
    from safetensors.torch import load_file

    from adapterctl import nf4 as nf4_lib

    sd = load_file(str(nf4["nf4"] / BASE_ST))
    nf4_lib.dequantize(sd, W)  # sound
    edit(sd)
    with pytest.raises(BrokenFile, match=r"re-save the 4-bit model with transformers$") as caught:
        nf4_lib.dequantize(sd, W)
    assert says in str(caught.value)
