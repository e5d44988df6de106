"""Bad input never crashes: one ``Error: …`` line naming the file and the fix, the documented
exit code (3 broken/malformed, 4 missing, 2 usage), and no traceback."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file

from adapterctl.cli import cli
from adapterctl.demo import write_adapter, write_base

ST = "adapter_model.safetensors"
BIN = "adapter_model.bin"
CFG = "adapter_config.json"
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


class NotATensor:
    """An arbitrary class: ``torch.load(weights_only=True)`` must refuse to build it."""

    def __init__(self) -> None:
        self.payload = "anything"


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A good adapter and a good two-shard base, written once; tests break copies."""
    root = tmp_path_factory.mktemp("originals")
    return write_adapter(root / "adapter"), write_base(root / "base", shards=2)


@pytest.fixture
def adapter(originals: tuple[Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(originals[0], tmp_path / "adapter"))


@pytest.fixture
def base(originals: tuple[Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(originals[1], tmp_path / "base"))


def assert_one_line_error(result: Result, code: int, names: Path | str, fix: str) -> str:
    """Exit ``code``, nothing on stdout, one ``Error:`` line on stderr naming ``names`` and
    ending with the fix."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("Error: "), line
    assert str(names) in line, line
    assert fix in line, line
    return line


def inspect(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, ["inspect", *map(str, args)])


def _header(obj: object, data: int = 16) -> bytes:
    raw = json.dumps(obj).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * data


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _put(d: Path, name: str, data: bytes | str) -> Path:
    p = d / name
    if isinstance(data, str):
        p.write_text(data)
    else:
        p.write_bytes(data)
    return p


def _as_bin(d: Path, payload: bytes) -> Path:
    (d / ST).unlink()
    return _put(d, BIN, payload)


def _config_with(d: Path, **changes: object) -> Path:
    cfg = json.loads((d / CFG).read_text())
    cfg.update(changes)
    return _put(d, CFG, json.dumps(cfg))


def _truncated(d: Path) -> Path:
    data = (d / ST).read_bytes()
    return _put(d, ST, data[: len(data) - 100])  # cut inside the last tensor's data


def _pickled_class(d: Path) -> Path:
    buf = io.BytesIO()
    pickle.dump({"w": NotATensor()}, buf)
    return _as_bin(d, buf.getvalue())


def _truncated_bin(d: Path) -> Path:
    data = _torch_bytes({"base_model.model.x.lora_A.weight": torch.zeros(4, 8)})
    return _as_bin(d, data[: len(data) // 2])


def _config_only(d: Path) -> Path:
    (d / ST).unlink()
    return d


def _nothing(d: Path) -> Path:
    for f in d.iterdir():
        f.unlink()
    _put(d, "README.md", "notes, no adapter here")
    return d


_entry = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
ADAPTER_CASES: list[tuple[str, Callable[[Path], Path], int, str]] = [
    ("truncated", _truncated, 3, "truncated"),
    ("header-too-long", lambda d: _put(d, ST, struct.pack("<Q", 10**6) + b"{}" * 20), 3,
     "header length 1000000 is larger than the file"),
    ("header-not-json", lambda d: _put(d, ST, struct.pack("<Q", 10) + b"not json!!" + b"\0" * 8),
     3, "header is not valid JSON"),
    ("header-not-object", lambda d: _put(d, ST, _header([1, 2])), 3, "not a JSON object"),
    ("offsets-past-end", lambda d: _put(d, ST, _header({"x.lora_A.weight": {
        **_entry, "data_offsets": [0, 999]}})), 3, "byte range does not match"),
    ("offsets-reversed", lambda d: _put(d, ST, _header({"x.lora_A.weight": {
        **_entry, "data_offsets": [16, 0]}})), 3, "byte range does not match"),
    ("offsets-not-numbers", lambda d: _put(d, ST, _header({"x.lora_A.weight": {
        **_entry, "data_offsets": "0-16"}})), 3, "malformed header entry"),
    ("entry-not-object", lambda d: _put(d, ST, _header({"x.lora_A.weight": 5})), 3,
     "malformed header entry"),
    ("unknown-dtype", lambda d: _put(d, ST, _header({"x.lora_A.weight": {
        **_entry, "dtype": "Q99"}})), 3, "unknown dtype 'Q99'"),
    ("negative-shape", lambda d: _put(d, ST, _header({"x.lora_A.weight": {
        **_entry, "shape": [-2, -2]}})), 3, "negative shape"),
    ("config-invalid-json", lambda d: _put(d, CFG, "{not json"), 3, "invalid JSON"),
    ("config-not-object", lambda d: _put(d, CFG, "[1, 2]"), 3, "expected a JSON object"),
    ("config-wrong-type", lambda d: _config_with(d, r="eight"), 3, "invalid field 'r'"),
    ("config-rank-zero", lambda d: _config_with(d, r=0), 3, "invalid field 'r'"),
    ("config-alpha-nan", lambda d: _put(d, CFG, '{"r": 8, "lora_alpha": NaN}'), 3,
     "invalid field 'lora_alpha'"),
    ("config-deeply-nested", lambda d: _put(d, CFG, "[" * 100_000 + "]" * 100_000), 3,
     "invalid JSON"),
    ("config-only", _config_only, 3, "no adapter_model.safetensors"),
    ("nothing-adapter-like", _nothing, 3, "no adapter weights found"),
    ("empty-safetensors", lambda d: _put(d, ST, b""), 3, "file is empty"),
    ("lfs-pointer", lambda d: _put(d, ST, b"version https://git-lfs.github.com/spec/v1\n"
     b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
     b"size 12345\n"), 3, "git lfs pull"),
    ("bin-list", lambda d: _as_bin(d, _torch_bytes([torch.zeros(2)])), 3, "holds a list"),
    ("bin-string-value", lambda d: _as_bin(d, _torch_bytes({"a": "hello"})), 3,
     "entry 'a' holds a str"),
    ("bin-arbitrary-class", _pickled_class, 3, "weights_only=True"),
    ("bin-garbage", lambda d: _as_bin(d, b"garbage" * 10), 3, "weights_only=True"),
    ("bin-truncated", _truncated_bin, 3, "truncated or not a torch checkpoint"),
    ("ranks-disagree", lambda d: save_file({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(8, 64),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(64, 4),
    }, str(d / ST)) or d, 3, "lora_A [8, 64] and lora_B [64, 4]"),
    ("zero-dim-factors", lambda d: save_file({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.tensor(1.0),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.tensor(1.0),
    }, str(d / ST)) or d, 3, "with one rank r >= 1"),
]  # fmt: skip

# What each case's message must end with: the next thing to do.
FIXES = ("re-download", "re-save", "fix", "git lfs pull", "copy the weights", "point at")


@pytest.mark.parametrize("with_base", [False, True], ids=["alone", "with-base"])
@pytest.mark.parametrize(
    ("breaker", "code", "says"), [c[1:] for c in ADAPTER_CASES], ids=[c[0] for c in ADAPTER_CASES]
)
def test_broken_adapter(
    adapter: Path,
    base: Path,
    breaker: Callable[[Path], Path],
    code: int,
    says: str,
    with_base: bool,
) -> None:
    named = breaker(adapter)
    args = ["--base", str(base)] if with_base else []
    line = assert_one_line_error(inspect(adapter, *args), code, named, says)
    assert any(fix in line.split(": ", 1)[1] for fix in FIXES), line


def test_broken_adapter_json_mode_keeps_stdout_empty(adapter: Path) -> None:
    _truncated(adapter)
    result = inspect(adapter, "--json")
    assert_one_line_error(result, 3, adapter / ST, "re-download")


def test_folder_where_a_file_should_be_is_an_operational_error(adapter: Path) -> None:
    (adapter / ST).unlink()
    (adapter / ST).mkdir()
    assert_one_line_error(inspect(adapter), 1, adapter / ST, "check the path")


def _pickle_only(b: Path) -> Path:
    for f in [*b.glob("*.safetensors"), b / INDEX]:
        f.unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4)}, b / "pytorch_model.bin")
    return b


def _single_file(b: Path, tensors: dict[str, torch.Tensor]) -> Path:
    for f in [*b.glob("*.safetensors"), b / INDEX]:
        f.unlink()
    save_file(tensors, str(b / "model.safetensors"))
    return b


def _gptq_config(b: Path) -> Path:
    cfg = json.loads((b / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    _put(b, "config.json", json.dumps(cfg))
    return b


def _gptq_tensors(b: Path) -> Path:
    q = "model.layers.0.self_attn.q_proj"
    return _single_file(
        b,
        {
            f"{q}.qweight": torch.zeros(8, 64, dtype=torch.int32),
            f"{q}.qzeros": torch.zeros(1, 8, dtype=torch.int32),
            f"{q}.scales": torch.ones(1, 64, dtype=torch.float16),
        },
    )


def _fp8_tensors(b: Path) -> Path:
    q = "model.layers.0.self_attn.q_proj"
    return _single_file(
        b,
        {
            f"{q}.weight": torch.zeros(64, 64).to(torch.float8_e4m3fn),
            f"{q}.weight_scale_inv": torch.ones(1, 1),
        },
    )


def _config_field(b: Path, **changes: object) -> Path:
    cfg = json.loads((b / "config.json").read_text())
    cfg.update(changes)
    return _put(b, "config.json", json.dumps(cfg))


def _no_weights(b: Path) -> Path:
    for f in [*b.glob("*.safetensors"), b / INDEX]:
        f.unlink()
    return b


BASE_CASES: list[tuple[str, Callable[[Path], Path], int, str]] = [
    ("pickle-only", _pickle_only, 3, "pickle-only checkpoint"),
    ("missing-shard", lambda b: (b / SHARD2).unlink() or b, 4, f"shard {SHARD2}"),
    ("index-invalid-json", lambda b: _put(b, INDEX, "{bad"), 3, "malformed index"),
    ("index-no-weight-map", lambda b: _put(b, INDEX, '{"metadata": {}}'), 3, "malformed index"),
    ("index-bad-values", lambda b: _put(b, INDEX, '{"weight_map": {"w": 5}}'), 3,
     "malformed index"),
    ("gptq-config", _gptq_config, 3, "GPTQ-quantised base"),
    ("gptq-tensors", _gptq_tensors, 3, "GPTQ/AWQ-quantised base"),
    ("fp8-tensors", _fp8_tensors, 3, "FP8-quantised base"),
    ("config-invalid-json", lambda b: _put(b, "config.json", "{oops"), 3, "invalid JSON"),
    ("config-not-object", lambda b: _put(b, "config.json", "[]"), 3, "expected a JSON object"),
    ("config-wrong-type", lambda b: _config_field(b, architectures=5), 3,
     "architectures should be a list of strings"),
    ("config-layers-not-int", lambda b: _config_field(b, num_hidden_layers="two"), 3,
     "num_hidden_layers should be int"),
    ("shard-truncated", lambda b: _put(b, SHARD1, (b / SHARD1).read_bytes()[:5000]), 3,
     "truncated"),
    ("shard-lfs-pointer", lambda b: _put(b, SHARD1, b"version https://git-lfs.github.com/spec/v1\n"),
     3, "git lfs pull"),
    ("shard-bad-dtype", lambda b: _put(b, SHARD1, _header({"w": {**_entry, "dtype": "X"}})), 3,
     "unknown dtype"),
    ("no-weights", _no_weights, 4, "no model.safetensors"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("breaker", "code", "says"), [c[1:] for c in BASE_CASES], ids=[c[0] for c in BASE_CASES]
)
def test_broken_base(
    adapter: Path, base: Path, breaker: Callable[[Path], Path], code: int, says: str
) -> None:
    named = breaker(base)
    line = assert_one_line_error(inspect(adapter, "--base", base), code, named, says)
    fixes = (*FIXES, "download it", "convert it", "use the 16-bit original", "is this a base")
    assert any(fix in line for fix in fixes), line


def test_missing_base_is_not_found(adapter: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert_one_line_error(inspect(adapter, "--base", missing), 4, missing, "check the path")


def test_bad_flag_is_usage_error(adapter: Path) -> None:
    result = inspect(adapter, "--rank", "0")
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_subprocess_prints_no_traceback(adapter: Path) -> None:
    """A real process: nothing but the one line on stderr."""
    _truncated(adapter)
    env = {k: v for k, v in os.environ.items() if k != "ADAPTERCTL_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-m", "adapterctl", "inspect", str(adapter)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"Error: {adapter / ST}: truncated")


def test_refused_pickle_emits_no_warnings(adapter: Path) -> None:
    """torch warns about pickle protocols when it refuses a file; none of that may leak out
    (a warning would be a second stderr line in a real process)."""
    _pickled_class(adapter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = inspect(adapter)
    assert_one_line_error(result, 3, adapter / BIN, "re-save the adapter as safetensors")
    assert [str(w.message) for w in caught] == []


def _boom(*args: object, **kwargs: object) -> None:
    raise RuntimeError("something nobody expected\nsecond line")


def test_unexpected_exception_is_internal_error(
    adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ADAPTERCTL_DEBUG", raising=False)
    monkeypatch.setattr("adapterctl.introspect.inspect_adapter", _boom)
    result = inspect(adapter)
    assert result.exit_code == 70
    assert result.stderr == (
        "Error: internal error: RuntimeError: something nobody expected; "
        "set ADAPTERCTL_DEBUG=1 for a traceback and report it\n"
    )


def test_debug_env_prints_traceback(adapter: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERCTL_DEBUG", "1")
    monkeypatch.setattr("adapterctl.introspect.inspect_adapter", _boom)
    result = inspect(adapter)
    assert result.exit_code == 70
    assert "Traceback (most recent call last)" in result.stderr
    assert "something nobody expected" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("Error: internal error:")


def test_debug_env_prints_traceback_for_broken_input(
    adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADAPTERCTL_DEBUG", "1")
    _truncated(adapter)
    result = inspect(adapter)
    assert result.exit_code == 3
    assert "Traceback" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("Error: ")
