"""``inspect`` against PEFT as the oracle: ranks, scales, ‖ΔW‖_F, spectra, trainable counts."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from adapterctl.cli import cli
from adapterctl.formats import read
from adapterctl.introspect import InspectReport, inspect_adapter

ORACLE_CASES = [
    "llama_plain",
    "llama_rslora",
    "llama_dora",
    "llama_patterns",
    "twoproj_patterns",
    "llama_embedding",
    "llama_fp16",
    "llama_bf16",
    "bert_cls",
    "gpt2",
    "gpt2_bias_all",
    "t5",
    "conv",
]


def _check_against_peft(report: InspectReport, case: Any, spectrum: bool) -> None:
    oracle = case.oracle()
    modules = {m.name: m for m in report.modules}
    assert set(modules) == set(oracle)
    for name, o in oracle.items():
        m = modules[name]
        delta = o["delta"]  # PEFT's ΔW in float64, in the base weight's layout
        assert m.rank == o["r"], name
        assert m.scale == pytest.approx(o["scale"], rel=1e-12), name
        assert m.shape == list(delta.shape), name
        assert m.norm == pytest.approx(float(torch.linalg.norm(delta)), rel=1e-6), name
        if spectrum:
            # conv kernels flatten into the input: (out, in, k, k) -> (out, in·k·k)
            sv = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))  # descending
            ours = torch.tensor(m.spectrum, dtype=torch.float64)
            top = float(sv[0])
            k = ours.numel()
            assert k == min(o["r"], *delta.reshape(delta.shape[0], -1).shape)
            assert torch.allclose(ours, sv[:k], rtol=0, atol=1e-6 * top), name
            assert all(float(x) <= 1e-6 * top for x in sv[k:])
    assert report.trainable_parameters == case.trainable


@pytest.mark.parametrize("name", ORACLE_CASES)
def test_inspect_matches_peft(peft_cases: Any, name: str) -> None:
    case = peft_cases(name)
    report = inspect_adapter(read(case.path), spectrum=True)
    _check_against_peft(report, case, spectrum=True)


@pytest.mark.parametrize("name", ["llama_patterns", "gpt2", "bert_cls", "llama_bf16"])
def test_inspect_json_matches_peft(peft_cases: Any, name: str) -> None:
    case = peft_cases(name)
    result = CliRunner().invoke(cli, ["inspect", str(case.path), "--json", "--spectrum"])
    assert result.exit_code == 0, result.output
    report = InspectReport.model_validate(json.loads(result.stdout))
    _check_against_peft(report, case, spectrum=True)


def test_inspect_summary_fields(peft_cases: Any) -> None:
    report = inspect_adapter(read(peft_cases("llama_dora").path))
    assert report.peft_type == "LORA"
    assert report.use_dora and all(m.dora for m in report.modules)
    assert report.ranks == [4] and report.alphas == [8.0]
    assert report.digest.startswith("sha256:")
    assert report.dtypes == ["F32"]
    assert report.targets == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    rs = inspect_adapter(read(peft_cases("llama_rslora").path))
    assert rs.scaling_rule == "alpha/sqrt(r)"
    assert inspect_adapter(read(peft_cases("llama_bf16").path)).dtypes == ["BF16"]
    assert inspect_adapter(read(peft_cases("llama_fp16").path)).dtypes == ["F16"]


def test_modules_to_save_and_biases(peft_cases: Any) -> None:
    cls = inspect_adapter(read(peft_cases("bert_cls").path))
    assert cls.modules_to_save == ["classifier.bias", "classifier.weight"]
    gpt = inspect_adapter(read(peft_cases("gpt2").path))
    assert gpt.lora_bias and all(m.lora_bias for m in gpt.modules)
    assert all(m.layout == "conv1d" for m in gpt.modules)
    bias_all = inspect_adapter(read(peft_cases("gpt2_bias_all").path))
    # bias="all" trains every bias of the model, the wrapped layers' ones included.
    assert "transformer.h.0.attn.c_attn.bias" in bias_all.trained_biases
    assert "transformer.h.0.ln_1.bias" in bias_all.trained_biases
    assert "transformer.h.1.mlp.c_fc.bias" in bias_all.trained_biases
    assert bias_all.modules_to_save == ["transformer.ln_f.bias", "transformer.ln_f.weight"]
    assert "transformer.ln_f.bias" not in bias_all.trained_biases  # the copy is, once
    assert bias_all.saved_base_layers == ["transformer.ln_f.bias"]  # the frozen original
    emb = inspect_adapter(read(peft_cases("llama_embedding").path))
    # PEFT saves the embedding's frozen base layer next to its LoRA: a copy, not trained.
    assert emb.saved_base_layers == ["model.embed_tokens.weight"]
    assert {m.name: m.layout for m in emb.modules}["model.embed_tokens"] == "embedding"


def test_zero_factor_flags_are_honest(peft_cases: Any) -> None:
    """PEFT's default init zeroes lora_B (linear) and lora_embedding_A (embedding)."""
    case = peft_cases("llama_init")
    report = inspect_adapter(read(case.path))
    mods = {m.name: m for m in report.modules}
    emb = mods["model.embed_tokens"]
    assert emb.zero_a and not emb.zero_b and emb.norm == 0.0
    q = mods["model.layers.0.self_attn.q_proj"]
    assert q.zero_b and not q.zero_a and q.norm == 0.0
    assert report.zero_b_modules == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert report.zero_update_modules == ["model.embed_tokens", *report.zero_b_modules]
    # A trained adapter has no such flags.
    plain = inspect_adapter(read(peft_cases("llama_plain").path))
    assert plain.zero_b_modules == [] and plain.zero_update_modules == []


def test_zero_flags_in_text_output(peft_cases: Any) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(peft_cases("llama_init").path)])
    assert result.exit_code == 0, result.output
    assert "[zero A]" in result.stdout and "[zero B]" in result.stdout
    assert "3 module(s) have a zero LoRA factor" in result.stdout


def test_inspect_text_output(peft_cases: Any) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(peft_cases("llama_plain").path), "--spectrum"])
    assert result.exit_code == 0, result.output
    assert "model.layers.0.self_attn.q_proj" in result.stdout
    assert "alpha/r" in result.stdout


def test_modules_are_listed_in_natural_order(tmp_path: Any) -> None:
    """layers.2 before layers.10 in inspect, diff and validate's findings (JSON and text)."""
    import numpy as np
    from safetensors.numpy import save_file

    from adapterctl.adapter import natural_key

    assert sorted(["a.10.b", "a.2.b", "a.1.c", "b"], key=natural_key) == [
        "a.1.c", "a.2.b", "a.10.b", "b"
    ]  # fmt: skip
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(12):
        key = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = rng.standard_normal((2, 8)).astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = rng.standard_normal((8, 2)).astype(np.float32)
    src, broken = tmp_path / "a.safetensors", tmp_path / "nan.safetensors"
    save_file(tensors, str(src))
    for i in (2, 10):  # one finding each
        tensors[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"][0, 0] = np.nan
    save_file(tensors, str(broken))
    runner = CliRunner()

    def layers(names: list[str]) -> list[int]:
        return [int(n.split(".")[2]) for n in names]

    shown = json.loads(runner.invoke(cli, ["inspect", str(src), "--alpha", "2", "--json"]).stdout)
    assert layers([m["name"] for m in shown["modules"]]) == list(range(12))
    diff = runner.invoke(cli, ["diff", str(src), str(src), "--alpha", "2", "--json"])
    assert layers([m["name"] for m in json.loads(diff.stdout)["modules"]]) == list(range(12))
    found = runner.invoke(cli, ["validate", str(broken), "--alpha", "2", "--json"])
    nan = [f["module"] for f in json.loads(found.stdout)["findings"] if f["code"] == "AC104"]
    assert layers(nan) == [2, 10]
    text = runner.invoke(cli, ["inspect", str(src), "--alpha", "2"]).output
    assert text.index("layers.2.") < text.index("layers.10.")
