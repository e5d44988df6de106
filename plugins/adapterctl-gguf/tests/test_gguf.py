"""export-gguf: files read back with gguf's own reader, each module's ΔW rebuilt as llama.cpp
applies it (alpha / r, r the pair's rank) and compared with PEFT's ΔW in float64, for plain,
rsLoRA, alpha_pattern and mixed-rank adapters in every written type; what GGUF cannot carry
is refused through the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from adapterctl.cli import cli

HEADS, KV_HEADS, LAYERS = 4, 2, 2
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# relative Frobenius error of ΔW each written type allows (its own rounding)
TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 1.5e-2}
CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "alpha_pattern": {"alpha_pattern": {"q_proj": 4, "down_proj": 40}},
    "mixed_ranks": {"rank_pattern": {"v_proj": 2, "down_proj": 4}},
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A tiny random Llama (grouped-query attention), saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("base") / "llama"
    model.save_pretrained(path)
    return model, path


def _adapter(base: tuple[Any, Path], root: Path, **lora: Any) -> tuple[Any, Path]:
    """A random PEFT LoRA on every linear module (A and B non-zero), saved at ``root``."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(
        copy.deepcopy(base[0]),
        LoraConfig(r=8, lora_alpha=16, target_modules=ALL, init_lora_weights=False, **lora),
    )
    model.save_pretrained(root)
    return model, root


def _permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary reordering of q/k rows (convert_hf_to_gguf.py LlamaModel.permute)."""
    out = rows.shape[0]
    return rows.reshape(heads, 2, out // heads // 2, -1).swapaxes(1, 2).reshape(rows.shape)


def _field(reader: Any, key: str) -> Any:
    f = reader.fields[key]
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types[0].name == "STRING" else value[0]


def _deltas(peft_model: Any) -> dict[str, np.ndarray]:
    """PEFT's ΔW per module (float64), named as the base names the weight."""
    from peft.tuners.lora import LoraLayer

    out = {}
    inner = peft_model.base_model.model
    for name, layer in inner.named_modules():
        if isinstance(layer, LoraLayer):
            with torch.no_grad():
                out[name] = layer.get_delta_weight("default").double().numpy()
    return out


def _gguf_name(name: str) -> str:
    i = name.split(".")[2]
    part = {
        "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
        "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
    }[name.rsplit(".", 1)[1]]  # fmt: skip
    return f"blk.{i}.{part}.weight"


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("case", list(CASES))
def test_delta_w_as_llama_cpp_applies_it(
    base: tuple[Any, Path], tmp_path: Path, case: str, outtype: str
) -> None:
    import gguf

    peft_model, adapter = _adapter(base, tmp_path / "adapter", **CASES[case])
    out = tmp_path / "a.gguf"
    run = CliRunner().invoke(
        cli, ["export-gguf", str(adapter), "--base", str(base[1]), "--outtype", outtype,
              "-o", str(out), "--json"],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    report = json.loads(run.stdout)
    assert report["architecture"] == "llama" and report["alpha"] == 16.0
    # one alpha over per-module ranks is what llama.cpp applies: only the others need folding
    assert bool(report["folded"]) == (case in ("rslora", "alpha_pattern"))
    reader = gguf.GGUFReader(out)
    assert _field(reader, "general.type") == "adapter"
    assert _field(reader, "adapter.type") == "lora"
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "adapter.lora.alpha") == pytest.approx(16.0)
    tensors = {t.name: t for t in reader.tensors}
    want = _deltas(peft_model)
    expected = {_gguf_name(n) + s for n in want for s in (".lora_a", ".lora_b")}
    assert set(tensors) == expected
    for name, delta in want.items():
        a_t, b_t = tensors[_gguf_name(name) + ".lora_a"], tensors[_gguf_name(name) + ".lora_b"]
        a = gguf.quants.dequantize(a_t.data, a_t.tensor_type).astype(np.float64)  # (r, in)
        b = gguf.quants.dequantize(b_t.data, b_t.tensor_type).astype(np.float64)  # (out, r)
        r = a.shape[0]
        assert a.shape == (r, delta.shape[1]) and b.shape == (delta.shape[0], r)
        if name.endswith("q_proj"):
            delta = _permute(delta, HEADS)
        elif name.endswith("k_proj"):
            delta = _permute(delta, KV_HEADS)
        rebuilt = 16.0 / r * (b @ a)  # llama.cpp: alpha / rank of the pair
        err = np.linalg.norm(rebuilt - delta) / np.linalg.norm(delta)
        assert err <= TOLERANCE[outtype], (name, err)


def test_the_upstream_layout_for_a_plain_adapter(base: tuple[Any, Path], tmp_path: Path) -> None:
    """A plain LoRA's f32 factors are written as they are (B of q/k row-permuted)."""
    import gguf
    from safetensors.numpy import load_file

    _, adapter = _adapter(base, tmp_path / "adapter")
    out = tmp_path / "a.gguf"
    assert (
        CliRunner()
        .invoke(cli, ["export-gguf", str(adapter), "--base", str(base[1]), "-o", str(out)])
        .exit_code
        == 0
    )
    stored = load_file(adapter / "adapter_model.safetensors")
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
    key = "base_model.model.model.layers.1.mlp.down_proj"
    assert np.array_equal(tensors["blk.1.ffn_down.weight.lora_a"], stored[f"{key}.lora_A.weight"])
    assert np.array_equal(tensors["blk.1.ffn_down.weight.lora_b"], stored[f"{key}.lora_B.weight"])


def test_refusals_and_convert(base: tuple[Any, Path], tmp_path: Path) -> None:
    """DoRA and an unknown architecture are refused (exit 3) with the reason; no base to be
    found is exit 2; ``convert --to gguf`` takes the base from the adapter's config; nothing
    is left behind by a refusal."""
    _, dora = _adapter(base, tmp_path / "dora", use_dora=True)
    out = tmp_path / "x.gguf"
    run = CliRunner().invoke(
        cli, ["export-gguf", str(dora), "--base", str(base[1]), "-o", str(out)]
    )
    assert run.exit_code == 3 and "is a DoRA module" in run.output
    _, plain = _adapter(base, tmp_path / "plain")
    cfg = json.loads((base[1] / "config.json").read_text())
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    for f in base[1].glob("*.safetensors"):
        (other / f.name).write_bytes(f.read_bytes())
    run = CliRunner().invoke(cli, ["export-gguf", str(plain), "--base", str(other), "-o", str(out)])
    assert run.exit_code == 3 and "architecture 'gpt2' is not one export-gguf writes" in run.output
    no_layers = {k: v for k, v in cfg.items() if k != "num_hidden_layers"}
    (other / "config.json").write_text(json.dumps(no_layers))
    run = CliRunner().invoke(cli, ["export-gguf", str(plain), "--base", str(other), "-o", str(out)])
    assert run.exit_code == 3 and "needs positive integers num_hidden_layers" in run.output
    (other / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 3}))
    run = CliRunner().invoke(cli, ["export-gguf", str(plain), "--base", str(other), "-o", str(out)])
    assert run.exit_code == 3 and "do not split into rotary halves" in run.output
    config = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": ""})
    )
    run = CliRunner().invoke(cli, ["export-gguf", str(plain), "-o", str(out)])
    assert run.exit_code == 2 and "pass --base BASE" in run.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dora", "gpt2", "plain"]
    config["base_model_name_or_path"] = str(base[1])
    (plain / "adapter_config.json").write_text(json.dumps(config))
    run = CliRunner().invoke(cli, ["convert", str(plain), "--to", "gguf", "-o", str(out)])
    assert run.exit_code == 0, run.output
    assert "peft -> gguf" in run.output and out.stat().st_size > 0
