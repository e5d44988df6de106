"""Reading adapters: PEFT folders, bare .safetensors, legacy .bin, configs old and new,
non-LoRA refusals and the adapter digest, with PEFT as the oracle."""

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
from safetensors.torch import load_file

from adapterctl.cli import cli
from adapterctl.config import AdapterConfig, pattern_key
from adapterctl.errors import UnsupportedAdapter, UsageError
from adapterctl.formats import read
from adapterctl.identity import adapter_digest
from adapterctl.introspect import inspect_adapter

PEFT_02_CONFIG = {
    "base_model_name_or_path": "decapoda-research/llama-7b-hf",
    "bias": "none",
    "enable_lora": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "merge_weights": False,
    "modules_to_save": None,
    "peft_type": "LORA",
    "r": 4,
    "target_modules": ["q_proj", "v_proj"],
    "task_type": "CAUSAL_LM",
}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- config: PEFT's resolution of r / alpha / scale, module by module ------------------------


@pytest.mark.parametrize(
    "name", ["llama_patterns", "twoproj_patterns", "llama_rslora", "llama_embedding", "t5", "gpt2"]
)
def test_config_resolution_matches_peft(peft_cases: Any, name: str) -> None:
    case = peft_cases(name)
    adapter = read(case.path)
    cfg = adapter.config
    layers = case.lora_layers()
    assert set(adapter.modules) == set(layers)
    for module, layer in layers.items():
        assert cfg.rank_for(module) == layer.r["default"], module
        assert cfg.alpha_for(module) == layer.lora_alpha["default"], module
        assert cfg.scale_for(module) == pytest.approx(layer.scaling["default"], rel=1e-12)
        mod = adapter.modules[module]
        assert mod.rank == mod.config_rank == layer.r["default"]
        assert mod.scale == pytest.approx(layer.scaling["default"], rel=1e-12)


def test_patterns_cover_the_interesting_cases(peft_cases: Any) -> None:
    """The pattern fixtures really exercise a regex key, a dot boundary and a default."""
    adapter = read(peft_cases("llama_patterns").path)
    ranks = {n: m.rank for n, m in adapter.modules.items()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2  # the regex key
    assert ranks["model.layers.1.self_attn.q_proj"] == 4  # "proj" does not match "q_proj"
    assert ranks["model.layers.0.self_attn.v_proj"] == 6
    alphas = {n: m.alpha for n, m in adapter.modules.items()}
    assert alphas["model.layers.1.mlp.up_proj"] == 32  # regex over a whole layer
    assert alphas["model.layers.1.self_attn.k_proj"] == 5  # first key in the file wins
    assert alphas["model.layers.0.mlp.up_proj"] == 8
    two = read(peft_cases("twoproj_patterns").path)
    assert {n: m.rank for n, m in two.modules.items()} == {
        "layers.0.q_proj": 2,
        "layers.0.xq_proj": 4,
        "layers.1.q_proj": 2,
        "layers.1.xq_proj": 4,
    }


def test_pattern_key_rules() -> None:
    pats = {"q_proj": 1, r"layers\.[0-1]\.k_proj": 2, "(bad": 3}
    assert pattern_key(pats, "layers.0.q_proj") == "q_proj"
    assert pattern_key(pats, "q_proj") == "q_proj"
    assert pattern_key(pats, "layers.0.xq_proj") is None
    assert pattern_key(pats, "layers.1.k_proj") == r"layers\.[0-1]\.k_proj"
    assert pattern_key(pats, "layers.2.k_proj") is None
    assert pattern_key(pats, "model.(bad") == "(bad"  # not a regex: plain suffix match


def test_overlapping_patterns_follow_the_saved_file(tmp_path: Path) -> None:
    """PEFT applies the first matching key, but saves the config with sorted keys: a model
    trained with overlapping keys in another order reloads with other scales. We follow the
    saved file (as ``PeftModel.from_pretrained`` does) and warn."""
    from peft import PeftModel

    alpha_pattern = {r"model\.layers\.1\..*_proj": 32, "k_proj": 5}  # not in sorted order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained, path = builders.peft_adapter(
            builders.llama_model(), tmp_path / "a", target_modules=["k_proj"],
            alpha_pattern=alpha_pattern,
        )  # fmt: skip
        reloaded = PeftModel.from_pretrained(builders.llama_model(), path)
    name = "model.layers.1.self_attn.k_proj"
    trained_scale = trained.base_model.model.model.layers[1].self_attn.k_proj.scaling["default"]
    reload_scale = reloaded.base_model.model.model.layers[1].self_attn.k_proj.scaling["default"]
    assert (trained_scale, reload_scale) == (8.0, 1.25)  # PEFT disagrees with itself
    adapter = read(path)
    assert adapter.modules[name].scale == reload_scale
    assert any("alpha_pattern keys 'k_proj' and" in w for w in adapter.warnings)
    assert not read(builders.edit_config(path, alpha_pattern={"k_proj": 5})).warnings


# --- config compatibility ---------------------------------------------------------------------


def test_peft_02_config_parses(peft_cases: Any, tmp_path: Path) -> None:
    folder = tmp_path / "old"
    folder.mkdir()
    shutil.copy(peft_cases("llama_plain").path / "adapter_model.safetensors", folder)
    (folder / "adapter_config.json").write_text(json.dumps(PEFT_02_CONFIG))
    adapter = read(folder)
    assert adapter.config.r == 4 and adapter.config.lora_alpha == 16
    assert all(m.scale == 4.0 and m.layout == "linear" for m in adapter.modules.values())
    data = adapter.config.to_json_dict()
    for key, value in PEFT_02_CONFIG.items():
        assert data[key] == value and type(data[key]) is type(value), key


def test_config_round_trip_keeps_every_key(peft_cases: Any) -> None:
    original = json.loads((peft_cases("llama_patterns").path / "adapter_config.json").read_text())
    original["a_future_key"] = {"nested": [1, 2.5, None], "flag": True}
    cfg = AdapterConfig.model_validate(original)
    assert json.dumps(cfg.to_json_dict(), sort_keys=True) == json.dumps(original, sort_keys=True)


# --- tensors ----------------------------------------------------------------------------------


def test_peft_folder_tensors(peft_cases: Any) -> None:
    dora = read(peft_cases("llama_dora").path)
    q = dora.modules["model.layers.0.self_attn.q_proj"]
    assert q.is_dora and q.magnitude is not None and q.magnitude.shape == (16,)
    assert q.a.shape == (4, 16) and q.b.shape == (16, 4)
    gpt = read(peft_cases("gpt2").path)
    c_attn = gpt.modules["transformer.h.0.attn.c_attn"]
    assert c_attn.layout == "conv1d" and c_attn.weight_shape == (16, 48)
    assert c_attn.bias is not None and c_attn.bias.shape == (48,)
    emb = read(peft_cases("llama_embedding").path).modules["model.embed_tokens"]
    assert emb.layout == "embedding" and emb.a.shape == (4, 64) and emb.weight_shape == (64, 16)
    t5 = read(peft_cases("t5").path)
    assert "decoder.block.1.layer.1.EncDecAttention.v" in t5.modules


@pytest.mark.parametrize(("name", "dtype"), [("llama_fp16", "F16"), ("llama_bf16", "BF16")])
def test_half_precision_adapters(peft_cases: Any, name: str, dtype: str) -> None:
    case = peft_cases(name)
    adapter = read(case.path)
    assert adapter.dtypes == [dtype]
    for module, layer in case.lora_layers().items():
        mod = adapter.modules[module]
        # float64 on both sides: the half-precision values widen exactly.
        assert torch.equal(mod.A(torch.float64), layer.lora_A["default"].weight.detach())
        assert torch.equal(mod.B(torch.float64), layer.lora_B["default"].weight.detach())


def test_legacy_bin_reads_with_a_warning(peft_cases: Any, tmp_path: Path) -> None:
    src = peft_cases("llama_dora").path
    folder = _copy(src, tmp_path / "legacy")
    state = load_file(folder / "adapter_model.safetensors")
    torch.save(state, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    adapter = read(folder)
    assert adapter.weight_files == [folder / "adapter_model.bin"]
    assert any("legacy pickle" in w for w in adapter.warnings)
    ours, ref = inspect_adapter(adapter, spectrum=True), inspect_adapter(read(src), spectrum=True)
    assert ours.trainable_parameters == ref.trainable_parameters
    assert [m.model_dump() for m in ours.modules] == [m.model_dump() for m in ref.modules]
    result = CliRunner().invoke(cli, ["inspect", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    assert "Warning: adapter_model.bin is a legacy pickle" in result.stderr
    assert json.loads(result.stdout)["total_norm"] == ref.total_norm


# --- bare .safetensors ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bare_file(peft_cases: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama_patterns' weights (ranks 2, 4 and 6) alone, with no config."""
    out = tmp_path_factory.mktemp("bare") / "lora.safetensors"
    shutil.copy(peft_cases("llama_patterns").path / "adapter_model.safetensors", out)
    return out


def test_bare_needs_alpha(bare_file: Path) -> None:
    with pytest.raises(UsageError, match="pass --alpha"):
        read(bare_file)
    result = CliRunner().invoke(cli, ["inspect", str(bare_file)])
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert "--alpha" in result.stderr


def test_bare_with_alpha(bare_file: Path) -> None:
    adapter = read(bare_file, alpha=12)
    assert adapter.format == "safetensors"
    assert len(adapter.modules) == 14
    for mod in adapter.modules.values():
        # Each module's rank comes from its tensors; scale is alpha/r for that rank.
        assert mod.config_rank == mod.rank
        assert mod.scale == pytest.approx(12 / mod.rank, rel=1e-15)
    assert {m.rank for m in adapter.modules.values()} == {2, 4, 6}
    result = CliRunner().invoke(cli, ["inspect", str(bare_file), "--alpha", "12", "--json"])
    assert result.exit_code == 0, result.output
    mods = {m["name"]: m for m in json.loads(result.stdout)["modules"]}
    assert mods["model.layers.0.self_attn.v_proj"]["scale"] == 2.0


def test_bare_rank_disagreeing_with_tensors_is_visible(bare_file: Path) -> None:
    adapter = read(bare_file, alpha=16, rank=8)
    q = adapter.modules["model.layers.1.self_attn.q_proj"]
    assert (q.config_rank, q.rank, q.scale) == (8, 4, 2.0)
    args = ["inspect", str(bare_file), "--alpha", "16", "--rank", "8"]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    mods = {m["name"]: m for m in json.loads(result.stdout)["modules"]}
    assert (mods[q.name]["rank"], mods[q.name]["config_rank"]) == (4, 8)
    assert "[config r=8]" in CliRunner().invoke(cli, args).stdout
    agreeing = read(bare_file, alpha=16)  # ranks from the tensors: nothing to flag
    assert inspect_adapter(agreeing).modules[0].config_rank is None


# --- refusals ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def non_lora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real IA3 and a real prompt-tuning adapter, saved by PEFT."""
    from peft import IA3Config, PromptTuningConfig, get_peft_model

    root = tmp_path_factory.mktemp("non_lora")
    configs = {
        "IA3": IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        "PROMPT_TUNING": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }
    out = {}
    for name, config in configs.items():
        get_peft_model(builders.llama_model(), config).save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("peft_type", ["IA3", "PROMPT_TUNING"])
def test_non_lora_is_refused(non_lora: dict[str, Path], peft_type: str) -> None:
    with pytest.raises(UnsupportedAdapter, match=f"peft_type {peft_type} is not LoRA"):
        read(non_lora[peft_type])
    result = CliRunner().invoke(cli, ["inspect", str(non_lora[peft_type])])
    assert result.exit_code == 3
    assert result.stderr.count("\n") == 1 and peft_type in result.stderr


# --- identity ---------------------------------------------------------------------------------


def test_adapter_digest(peft_cases: Any, tmp_path: Path) -> None:
    src = peft_cases("llama_plain").path
    one, two = _copy(src, tmp_path / "one"), _copy(src, tmp_path / "two")
    a, b = read(one), read(two)
    digest = adapter_digest(a.files, one)
    assert digest == adapter_digest(b.files, two) == inspect_adapter(a).digest
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    weights = two / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one tensor
    weights.write_bytes(bytes(data))
    assert adapter_digest(read(two).files, two) != digest
    bare = tmp_path / "bare.safetensors"
    shutil.copy(src / "adapter_model.safetensors", bare)
    assert inspect_adapter(read(bare, alpha=8)).digest == adapter_digest([bare], bare)
