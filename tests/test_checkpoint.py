"""Base checkpoints from headers: binding adapter modules onto tensor names (prefixes, GPT-2
Conv1D layouts, seq2seq and classifier heads), the base fingerprint and NF4 logical shapes."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import builders
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from adapterctl.checkpoint import open_checkpoint
from adapterctl.cli import cli
from adapterctl.formats import read
from adapterctl.identity import base_fingerprint
from adapterctl.introspect import inspect_adapter


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Base folders, each saved the way a real one is found on the Hub."""
    root = tmp_path_factory.mktemp("bases")
    out = {
        "llama": builders.save_base(builders.llama_model(), root / "llama"),
        "llama_again": builders.save_base(builders.llama_model(), root / "llama_again"),
        "llama_3_layers": builders.save_base(builders.llama_model(layers=3), root / "llama3"),
        "gpt2_lm": builders.save_base(builders.gpt2_model(), root / "gpt2_lm"),
        # The public gpt2 checkpoint: GPT2Model's names, no "transformer." prefix.
        "gpt2_bare": builders.save_base(builders.gpt2_model().transformer, root / "gpt2_bare"),
        "t5": builders.save_base(builders.t5_model(), root / "t5"),
        "bert_cls": builders.save_base(builders.bert_classifier(), root / "bert_cls"),
    }
    # The LM-head checkpoint with its keys rewritten to drop the prefix (config unchanged).
    renamed = shutil.copytree(out["gpt2_lm"], root / "gpt2_renamed")
    state = load_file(renamed / "model.safetensors")
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in state.items()}
    save_file(state, renamed / "model.safetensors", metadata={"format": "pt"})
    out["gpt2_renamed"] = renamed
    return out


def _gpt2_no_fifo(peft_cases: Any, tmp_path: Path) -> Path:
    """The GPT-2 adapter with its config claiming fan_in_fan_out=false (as some tools write)."""
    folder = shutil.copytree(peft_cases("gpt2").path, tmp_path / "gpt2_no_fifo")
    return builders.edit_config(folder, fan_in_fan_out=False)


@pytest.mark.parametrize("base", ["gpt2_bare", "gpt2_renamed", "gpt2_lm"])
def test_gpt2_binds_with_conv1d_layout(
    peft_cases: Any, bases: dict[str, Path], tmp_path: Path, base: str
) -> None:
    adapter = read(_gpt2_no_fifo(peft_cases, tmp_path))
    assert {m.layout for m in adapter.modules.values()} == {"linear"}  # as the config says
    ckpt = open_checkpoint(bases[base])
    binding = ckpt.bind(adapter)
    assert len(binding.matched) == len(adapter.modules) == 8
    prefix = "transformer." if base == "gpt2_lm" else ""
    assert binding.strip == ("" if base == "gpt2_lm" else "transformer.")
    for name, target in binding.targets.items():
        assert target.tensor == prefix + name.removeprefix("transformer.") + ".weight"
        # Conv1D stores in×out; attn.c_proj is square (16×16), so only model_type tells.
        assert target.layout == "conv1d", name
        assert target.shape == ckpt.weights[target.tensor][0]
    assert ckpt.weights[prefix + "h.0.attn.c_proj.weight"][0] == (16, 16)


def test_gpt2_inspect_with_base_matches_peft(
    peft_cases: Any, bases: dict[str, Path], tmp_path: Path
) -> None:
    case = peft_cases("gpt2")
    folder = _gpt2_no_fifo(peft_cases, tmp_path)
    args = ["inspect", str(folder), "--base", str(bases["gpt2_bare"]), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["base"]["matched_modules"] == 8
    assert report["base"]["fingerprint"] == base_fingerprint(open_checkpoint(bases["gpt2_bare"]))
    oracle = case.oracle()
    for m in report["modules"]:
        delta = oracle[m["name"]]["delta"]  # PEFT's ΔW, (in, out) like the Conv1D weight
        assert m["layout"] == "conv1d"
        assert m["shape"] == list(delta.shape)
        assert m["base_tensor"] == m["name"].removeprefix("transformer.") + ".weight"
        assert m["norm"] == pytest.approx(float(torch.linalg.norm(delta)), rel=1e-6)


def test_gpt2model_adapter_binds_onto_lm_head_base(bases: dict[str, Path], tmp_path: Path) -> None:
    """The reverse: an adapter trained on GPT2Model (no prefix) onto a GPT2LMHeadModel base."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, path = builders.peft_adapter(
            builders.gpt2_model().transformer, tmp_path / "a", target_modules=["c_attn"]
        )
    adapter = read(path)
    assert sorted(adapter.modules) == ["h.0.attn.c_attn", "h.1.attn.c_attn"]
    binding = open_checkpoint(bases["gpt2_lm"]).bind(adapter)
    assert binding.add == "transformer."
    assert [t.tensor for t in binding.matched] == [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.1.attn.c_attn.weight",
    ]


def test_square_linear_stays_linear(peft_cases: Any, bases: dict[str, Path]) -> None:
    """Square weights of a non-Conv1D model keep the linear layout, even if the config says
    fan_in_fan_out (PEFT ignores it for nn.Linear)."""
    binding = open_checkpoint(bases["llama"]).bind(read(peft_cases("llama_rslora").path))
    assert len(binding.matched) == 14
    assert {t.layout for t in binding.targets.values()} == {"linear"}
    q = binding.targets["model.layers.0.self_attn.q_proj"]
    assert q.shape == (16, 16) and q.dtype == "F32"


def test_embedding_binds(peft_cases: Any, bases: dict[str, Path]) -> None:
    adapter = read(peft_cases("llama_embedding").path)
    binding = open_checkpoint(bases["llama"]).bind(adapter)
    emb = binding.targets["model.embed_tokens"]
    assert (emb.tensor, emb.layout, emb.shape) == (
        "model.embed_tokens.weight",
        "embedding",
        (64, 16),
    )
    assert adapter.modules["model.embed_tokens"].weight_shape == emb.shape
    assert binding.extras == {"model.embed_tokens.weight": "model.embed_tokens.weight"}


def test_seq2seq_binds(peft_cases: Any, bases: dict[str, Path]) -> None:
    adapter = read(peft_cases("t5").path)
    binding = open_checkpoint(bases["t5"]).bind(adapter)
    assert len(adapter.modules) == 12  # q, v of 2 encoder + 2×2 decoder attentions
    assert len(binding.matched) == len(adapter.modules)
    assert (binding.strip, binding.add) == ("", "")
    for name, target in binding.targets.items():
        assert target.tensor == name + ".weight" and target.layout == "linear"


def test_sequence_classifier_binds(peft_cases: Any, bases: dict[str, Path]) -> None:
    adapter = read(peft_cases("bert_cls").path)
    binding = open_checkpoint(bases["bert_cls"]).bind(adapter)
    assert len(binding.matched) == len(adapter.modules) == 4
    assert binding.extras == {
        "classifier.weight": "classifier.weight",
        "classifier.bias": "classifier.bias",
    }
    report = inspect_adapter(adapter, base=open_checkpoint(bases["bert_cls"]))
    assert report.base is not None and report.base.architecture == "BertForSequenceClassification"


def test_base_fingerprint(bases: dict[str, Path]) -> None:
    llama = base_fingerprint(open_checkpoint(bases["llama"]))
    assert llama == base_fingerprint(open_checkpoint(bases["llama_again"]))
    assert llama != base_fingerprint(open_checkpoint(bases["llama_3_layers"]))
    assert llama.startswith("sha256:")
    # Names matter: the same tensors without the LM head's prefix are another base.
    lm, bare = (base_fingerprint(open_checkpoint(bases[k])) for k in ("gpt2_lm", "gpt2_bare"))
    assert lm != bare


@pytest.fixture(scope="module")
def nf4_base(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Llama base quantised to NF4 by transformers + bitsandbytes on the CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=True,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            bases["llama"], quantization_config=quant, device_map="cpu"
        )
    out = tmp_path_factory.mktemp("nf4") / "llama-nf4"
    model.save_pretrained(out)
    return out


def test_nf4_base_reports_logical_shapes(bases: dict[str, Path], nf4_base: Path) -> None:
    ckpt, full = open_checkpoint(nf4_base), open_checkpoint(bases["llama"])
    assert ckpt.quantization == "nf4"
    assert len(ckpt.quant) == 14  # every linear layer of the 2 blocks
    q = "model.layers.0.self_attn.q_proj.weight"
    assert ckpt.tensors[q].dtype == "U8" and ckpt.tensors[q].shape != (16, 16)  # packed
    assert ckpt.weights == full.weights  # unpacked shapes, compute dtype, no aux tensors
    assert base_fingerprint(ckpt) == base_fingerprint(full)
    assert ckpt.quant[q].nested and ckpt.quant[q].blocksize == 64


def _flat_conv_adapter(folder: Path) -> Path:
    """A bare file of one flat-named linear pair (r=2) whose in-features (3·3·3) are a 3×3
    convolution's, and one plain linear pair; PEFT-shaped keys, alpha 2 (scale 1)."""
    g = torch.Generator().manual_seed(0)
    t = {
        "block_0_conv.lora_A.weight": torch.randn(2, 27, generator=g),
        "block_0_conv.lora_B.weight": torch.randn(4, 2, generator=g),
        "block_0_attn_to_q.lora_A.weight": torch.randn(2, 5, generator=g),
        "block_0_attn_to_q.lora_B.weight": torch.randn(5, 2, generator=g),
    }
    folder.mkdir()
    save_file(t, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                    "target_modules": ["block_0_conv", "block_0_attn_to_q"]})
    )  # fmt: skip
    return folder


def test_flat_names_and_flat_convolutions_bind_to_a_diffusers_model(tmp_path: Path) -> None:
    """Modules named with underscores for dots bind onto the dotted weight (the longest
    matching suffix wins over a shorter one); a flat (r, in·kh·kw) pair onto a 3×3 convolution
    is viewed as that convolution; a diffusers folder's ``diffusion_pytorch_model`` weights are
    found, and a merge writes under the same names (sharded: with diffusers' index name)."""
    g = torch.Generator().manual_seed(1)
    base = tmp_path / "unet"
    base.mkdir()
    weights = {
        "down.block.0.conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "block.0.conv.weight": torch.randn(4, 3, 3, 3, generator=g),  # a shorter suffix
        "down.block.0.attn.to_q.weight": torch.randn(5, 5, generator=g),
        "down.block.0.attn.to_q.bias": torch.randn(5, generator=g),
    }
    save_file(weights, str(base / "diffusion_pytorch_model.safetensors"))
    (base / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    adapter = read(_flat_conv_adapter(tmp_path / "a"))
    for name in list(adapter.modules):  # rename to kohya-like flat names
        adapter.modules["lora_unet_down_" + name] = adapter.modules.pop(name)
    ckpt = open_checkpoint(base)
    binding = ckpt.bind(adapter)
    conv = binding.targets["lora_unet_down_block_0_conv"]
    assert conv.tensor == "down.block.0.conv.weight" and conv.layout == "conv"
    assert adapter.modules["lora_unet_down_block_0_conv"].weight_shape == (4, 3, 3, 3)
    assert binding.targets["lora_unet_down_block_0_attn_to_q"].tensor == (
        "down.block.0.attn.to_q.weight"
    )
    src = _flat_conv_adapter(tmp_path / "b")
    # Through the CLI: a bare PEFT-keyed file named like the base's weights, flattened.
    t = load_file(str(src / "adapter_model.safetensors"))
    save_file({f"down_{k}": v for k, v in t.items()}, str(src / "adapter_model.safetensors"))
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["target_modules"] = [f"down_{m}" for m in cfg["target_modules"]]
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    for extra, names in (
        ([], ["diffusion_pytorch_model.safetensors"]),
        (["--max-shard-size", "200B"], ["diffusion_pytorch_model-00001-of-00003.safetensors",
         "diffusion_pytorch_model-00002-of-00003.safetensors",
         "diffusion_pytorch_model-00003-of-00003.safetensors",
         "diffusion_pytorch_model.safetensors.index.json"]),
    ):  # fmt: skip
        out = tmp_path / f"merged{len(extra)}"
        run = CliRunner().invoke(cli, ["merge", str(base), str(src), "-o", str(out), *extra])
        assert run.exit_code == 0, run.output
        assert sorted(p.name for p in out.iterdir() if "pytorch" in p.name) == names
        merged = open_checkpoint(out)
        w = merged.tensors["down.block.0.conv.weight"].load().double()
        a = t["block_0_conv.lora_A.weight"].double()
        b = t["block_0_conv.lora_B.weight"].double()
        want = (weights["down.block.0.conv.weight"].double() + (b @ a).reshape(4, 3, 3, 3)).float()
        torch.testing.assert_close(w.float(), want, rtol=0, atol=0)
        assert torch.equal(
            merged.tensors["block.0.conv.weight"].load(), weights["block.0.conv.weight"]
        )
