"""``adapterctl.nf4.layout`` against what transformers and bitsandbytes actually store.

The layout module is the one description of a 4-bit weight's stored tensors that the
checkpoint reader, the merge planner (headers written before the data exists) and the
quantiser share, so it is held against the peers themselves: a tiny Llama quantised by
transformers on the CPU and saved (every tensor of the file, by name, dtype, shape and byte
size), and ``bitsandbytes.functional.quantize_4bit`` for the blocksizes and storage dtypes
transformers does not use by default. Shapes are ones bitsandbytes handles on the CPU (see
``oracles``); the last nested block of scales is ragged (64 or 128 blocks of 64 values).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import builders
import oracles
import pytest
import torch

from adapterctl import nf4
from adapterctl.errors import BrokenFile
from adapterctl.nf4 import layout
from adapterctl.tensorfile import TORCH_DTYPE_NAMES, read_header

pytest.importorskip("bitsandbytes")

_ST = {name: st for st, name in TORCH_DTYPE_NAMES.items()}


def _entry(name: str, t: torch.Tensor) -> layout.Entry:
    """A torch tensor as (name, safetensors dtype, shape, nbytes)."""
    st = _ST[str(t.dtype).removeprefix("torch.")]
    return (name, st, tuple(t.shape), t.numel() * t.element_size())


@pytest.fixture(scope="module")
def base16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = builders.llama_model(hidden=64, vocab=96)
    return builders.save_base(model, tmp_path_factory.mktemp("layout") / "base16")


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False)])
def test_stored_tensors_are_what_transformers_saves(
    base16: Path, tmp_path: Path, quant_type: str, double_quant: bool
) -> None:
    import bitsandbytes as bnb

    # Quantised and saved only: no layer of it is a reference for a forward (check=False).
    model = oracles.load_4bit(
        base16, quant_type=quant_type, double_quant=double_quant, compute=torch.float32,
        check=False,
    )  # fmt: skip
    model.save_pretrained(tmp_path / "q")
    saved = read_header(tmp_path / "q" / "model.safetensors").tensors
    shapes = read_header(base16 / "model.safetensors").tensors
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}

    groups = layout.groups(saved)
    assert set(groups) == linear and len(linear) == 14  # 7 per block, 2 blocks
    planned: set[str] = set()
    for weight, group in groups.items():
        assert (group.quant_type, group.nested) == (quant_type, double_quant)
        blob = saved[group.state].array().tobytes()
        assert len(blob) <= layout.STATE_BYTES  # what a merge plans for holds theirs
        want = layout.stored_tensors(
            weight, shapes[weight].shape, quant_type=quant_type, blocksize=64,
            double_quant=double_quant, state_nbytes=len(blob),
        )  # fmt: skip
        got = [(n, saved[n].dtype, saved[n].shape, saved[n].nbytes) for n, *_ in want]
        assert got == want, weight
        assert [n for n, *_ in want] == [weight, *group.statistics]
        state = layout.parse_state(blob, group.state)
        assert state["shape"] == list(shapes[weight].shape) and state["blocksize"] == 64
        assert ("nested_offset" in state) == double_quant
        planned.update(n for n, *_ in want)
    # Every other tensor is a plain model tensor, and is not taken for 4-bit bookkeeping.
    for name in saved:
        assert layout.is_statistic(name, groups) == (name in planned and name not in groups)
    assert set(saved) - planned == set(shapes) - linear


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
def test_stored_tensors_are_what_bitsandbytes_packs(
    double_quant: bool, blocksize: int, storage: torch.dtype
) -> None:
    """Blocksizes and storage dtypes beyond transformers' defaults, against ``QuantState``."""
    torch.manual_seed(0)
    w = torch.randn(96, 512) * 0.02  # 192 blocks of 256, 768 of 64: ragged nested blocks
    packed, qs = oracles.bnb_quantize(
        w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4",
        quant_storage=storage,
    )  # fmt: skip
    stored = {f"w.{k}": v for k, v in qs.as_dict(packed=True).items()} | {"w": packed}
    state = stored[layout.state_key("w", "nf4")]
    want = layout.stored_tensors(
        "w", (96, 512), blocksize=blocksize, double_quant=double_quant,
        storage=str(storage).removeprefix("torch."), state_nbytes=state.numel(),
    )  # fmt: skip
    assert sorted(_entry(n, t) for n, t in stored.items()) == sorted(want)


@pytest.mark.parametrize("shape", [(32, 64), (37, 101), (3, 70)])
def test_quantize_writes_the_planned_tensors(shape: tuple[int, int]) -> None:
    """What a merge plans (padded state included) is what ``nf4.quantize`` hands it, in order."""
    w = torch.randn(*shape)
    for qt, dq, method in (("nf4", True, "optimal"), ("fp4", False, "absmax")):
        out = nf4.quantize(w, "w", quant_type=qt, double_quant=dq, method=method, pad_state=True)
        want = layout.stored_tensors("w", shape, quant_type=qt, double_quant=dq)
        assert [_entry(n, out[n]) for n, *_ in want] == want and len(out) == len(want)
        unpadded = nf4.quantize(w, "w", quant_type=qt, double_quant=dq, method=method)
        assert nf4.read_state(out, "w") == nf4.read_state(unpadded, "w")
        assert torch.equal(nf4.dequantize(out, "w"), nf4.dequantize(unpadded, "w"))


def test_state_blob_round_trip_and_refusals() -> None:
    state: dict[str, Any] = {
        "quant_type": "nf4", "blocksize": 4096, "dtype": "bfloat16", "shape": [131072, 131072],
        "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": -1.2345678901234e-05,
    }  # fmt: skip
    raw = layout.state_blob(state)
    assert raw == json.dumps(state).encode()  # bitsandbytes' pack_dict_to_tensor
    padded = layout.state_blob(state, padded=True)
    assert len(padded) == layout.STATE_BYTES and padded.startswith(raw)
    assert layout.parse_state(padded, "w") == layout.parse_state(raw, "w") == state
    with pytest.raises(RuntimeError, match="larger than"):
        layout.state_blob({**state, "pad": "x" * layout.STATE_BYTES}, padded=True)
    for bad in (b"{", b"[]", b'{"quant_type": "nf4", "shape": [2]}', b"\xff"):
        with pytest.raises(BrokenFile, match=r"^w\.q: malformed bitsandbytes quant state$"):
            layout.parse_state(bad, "w.q")
    assert layout.parse_state_key("a.weight.quant_state.bitsandbytes__fp4") == ("a.weight", "fp4")
    assert layout.parse_state_key("a.weight.quant_state.bitsandbytes__int8") is None
    assert layout.parse_state_key(".quant_state.bitsandbytes__nf4") is None


def test_the_layout_and_the_package_import_no_torch() -> None:
    code = (
        "import sys, adapterctl.nf4, adapterctl.nf4.layout; "
        "print([m for m in ('torch', 'bitsandbytes', 'numpy') if m in sys.modules])"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert run.stdout.strip() == "[]"
