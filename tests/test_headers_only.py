"""Inspecting and validating against a sharded base reads its headers, never its weights.

The base is a Llama-3-70B-shaped checkpoint (all 80 layers, 30 shards, about 141 GB) whose
shards are sparse files: real safetensors headers followed by a hole, so it costs a few
hundred kilobytes of disk. ``BYTES_READ`` (adapterctl's own counter) and a wrapper around
``open`` (which sees any Python-level read of a shard) must both stay tiny.
"""

from __future__ import annotations

import builtins
import io
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from adapterctl import tensorfile
from adapterctl.checkpoint import open_checkpoint
from adapterctl.cli import COMMAND_MODULES, cli
from adapterctl.formats import read

# Llama-3-70B: hidden 8192, 64 query heads and 8 KV heads of 128, MLP 28672, vocab 128256.
HIDDEN, INTER, KV, VOCAB, LAYERS, SHARDS = 8192, 28672, 8 * 128, 128256, 80, 30
BUDGET = 1_000_000  # bytes: all headers plus the adapter's few small tensors
ADAPTED_LAYERS = (
    0,
    41,
    79,
)  # the adapter touches a layer in the first, a middle and the last shard
RANK = 2


def _llama70b_tensors() -> list[tuple[str, tuple[int, ...]]]:
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (f"{p}.self_attn.k_proj.weight", (KV, HIDDEN)),
            (f"{p}.self_attn.v_proj.weight", (KV, HIDDEN)),
            (f"{p}.self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (f"{p}.mlp.gate_proj.weight", (INTER, HIDDEN)),
            (f"{p}.mlp.up_proj.weight", (INTER, HIDDEN)),
            (f"{p}.mlp.down_proj.weight", (HIDDEN, INTER)),
            (f"{p}.input_layernorm.weight", (HIDDEN,)),
            (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
        ]
    return [*out, ("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def _write_sparse_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]]) -> int:
    """A bf16 safetensors file: a real header, then a hole as long as the tensors' data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)  # sparse: the data costs no disk
    return offset


@pytest.fixture(scope="module")
def huge_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-3-70B-shaped base: config.json, 30 sparse shards and their index."""
    root = tmp_path_factory.mktemp("llama70b")
    tensors = _llama70b_tensors()
    n = len(tensors)
    weight_map: dict[str, str] = {}
    total = 0
    for k in range(SHARDS):
        chunk = tensors[k * n // SHARDS : (k + 1) * n // SHARDS]
        name = f"model-{k + 1:05d}-of-{SHARDS:05d}.safetensors"
        total += _write_sparse_shard(root / name, chunk)
        weight_map.update({t: name for t, _ in chunk})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 64,
        "num_key_value_heads": 8, "vocab_size": VOCAB, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "rope_theta": 500000.0, "rms_norm_eps": 1e-05,
    }  # fmt: skip
    (root / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def small_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-2 bf16 LoRA on q_proj/v_proj of three layers of the 70B base (~200 KB)."""
    root = tmp_path_factory.mktemp("adapter70b")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in ADAPTED_LAYERS:
        for mod, out in (("q_proj", HIDDEN), ("v_proj", KV)):
            key = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            a = torch.randn(RANK, HIDDEN, generator=g) / HIDDEN**0.5  # (r, in)
            b = 0.01 * torch.randn(out, RANK, generator=g)  # (out, r)
            tensors[f"{key}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = b.to(torch.bfloat16)
    save_file(tensors, str(root / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "r": RANK, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
        "layers_to_transform": list(ADAPTED_LAYERS), "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "meta-llama/Llama-3.1-70B",
    }  # fmt: skip
    (root / "adapter_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture
def base_reads(huge_base: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Bytes read through Python file objects from the base's shards (``[total]``), whoever
    reads them; and ``BYTES_READ`` reset to zero."""
    counter = [0]
    real_open = builtins.open

    class Counted:
        def __init__(self, fh: Any) -> None:
            self._fh = fh

        def read(self, *args: Any) -> Any:
            data = self._fh.read(*args)
            counter[0] += len(data)
            return data

        def readinto(self, buf: Any) -> Any:
            n = self._fh.readinto(buf)
            counter[0] += n or 0
            return n

        def __enter__(self) -> Counted:
            return self

        def __exit__(self, *exc: object) -> None:
            self._fh.close()

        def __getattr__(self, name: str) -> Any:
            return getattr(self._fh, name)

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        fh = real_open(file, *args, **kwargs)
        is_path = isinstance(file, (str, Path)) and str(file).endswith(".safetensors")
        if is_path and Path(file).resolve().parent == huge_base.resolve():
            return Counted(fh)
        return fh

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    tensorfile.BYTES_READ.value = 0
    yield counter


def test_the_base_is_huge_but_sparse(huge_base: Path) -> None:
    shards = sorted(huge_base.glob("*.safetensors"))
    assert len(shards) == SHARDS
    logical = sum(p.stat().st_size for p in shards)
    on_disk = sum(p.stat().st_blocks * 512 for p in shards)
    assert logical > 140e9  # a 70B model in bf16
    assert on_disk < 20e6  # headers only (a filesystem without holes would fail here)


def test_open_and_bind_read_headers_only(
    huge_base: Path, small_adapter: Path, base_reads: list[int]
) -> None:
    ckpt = open_checkpoint(huge_base)
    assert len(ckpt.shards) == SHARDS
    assert ckpt.num_layers == LAYERS
    assert ckpt.architecture == "LlamaForCausalLM"
    assert ckpt.weights["model.layers.79.mlp.down_proj.weight"] == ((HIDDEN, INTER), "BF16")
    assert ckpt.size_bytes > 140e9

    adapter = read(small_adapter)
    binding = ckpt.bind(adapter)
    assert len(binding.matched) == len(adapter.modules) == 2 * len(ADAPTED_LAYERS)
    for target in binding.matched:
        assert target.shape == adapter.modules[target.module].weight_shape
    # Reading the adapter lazily costs its header; the base costs its 30 headers.
    assert tensorfile.BYTES_READ.value < BUDGET
    assert base_reads[0] < BUDGET


def test_inspect_with_base_reads_headers_only(
    huge_base: Path, small_adapter: Path, base_reads: list[int]
) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(small_adapter), "--base", str(huge_base)])
    assert result.exit_code == 0, result.output
    assert "LlamaForCausalLM" in result.stdout
    assert "model.layers.79.self_attn.q_proj" in result.stdout
    # The adapter's tensors (about 200 KB) are read for the norms; the base's never are.
    assert tensorfile.BYTES_READ.value < BUDGET
    assert base_reads[0] < BUDGET


def test_inspect_json_names_every_base_tensor(
    huge_base: Path, small_adapter: Path, base_reads: list[int]
) -> None:
    result = CliRunner().invoke(
        cli, ["inspect", str(small_adapter), "--base", str(huge_base), "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["base"]["matched_modules"] == 2 * len(ADAPTED_LAYERS)
    assert all(m["base_tensor"] for m in data["modules"])
    assert base_reads[0] < BUDGET


def test_validate_with_base_reads_headers_only(
    huge_base: Path, small_adapter: Path, base_reads: list[int]
) -> None:
    validate_module = pytest.importorskip("adapterctl.validate")
    report = validate_module.validate(read(small_adapter), base=open_checkpoint(huge_base))
    assert report.errors == 0, report.findings
    assert tensorfile.BYTES_READ.value < BUDGET
    assert base_reads[0] < BUDGET


def test_validate_cli_with_base_reads_headers_only(
    huge_base: Path, small_adapter: Path, base_reads: list[int]
) -> None:
    pytest.importorskip("adapterctl.validate")
    if "validate" not in COMMAND_MODULES:
        pytest.skip("no validate command yet")
    result = CliRunner().invoke(cli, ["validate", str(small_adapter), "--base", str(huge_base)])
    assert result.exit_code == 0, result.output
    assert tensorfile.BYTES_READ.value < BUDGET
    assert base_reads[0] < BUDGET
