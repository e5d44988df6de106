"""MLX-LM adapters read with the ΔW mlx-lm applies: written by mlx-lm itself (pinned in the
test extra) and fused by it as the oracle; both config generations written by hand from its
source (the current mlx-lm writes only the newer); converted to a PEFT folder that PEFT loads.
Other tools' namings are named, never read as 0 modules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from adapterctl.cli import cli
from adapterctl.formats import read

NEW_CONFIG = {  # mlx_lm >= 0.19: num_layers, fine_tune_type; scale applied as is
    "fine_tune_type": "lora",
    "num_layers": 2,
    "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]},
    "model": "tiny-llama",
}
OLD_CONFIG = {  # the versions whose lora_parameters carry alpha: scale · alpha / rank
    "lora_layers": 2,
    "lora_parameters": {"rank": 4, "alpha": 16, "scale": 0.5, "dropout": 0.0},
}


def _mlx_from_peft(peft_dir: Path, out: Path, config: dict[str, Any]) -> Path:
    """The PEFT adapter's factors in MLX's layout: lora_a = Aᵀ (in, r), lora_b = Bᵀ (r, out)."""
    out.mkdir()
    tensors = load_file(peft_dir / "adapter_model.safetensors")
    mlx = {}
    for key, t in tensors.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        part = "lora_a" if ".lora_A." in key else "lora_b"
        mlx[f"{module}.{part}"] = np.ascontiguousarray(t.T)
    save_file(mlx, str(out / "adapters.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("config", [NEW_CONFIG, OLD_CONFIG], ids=["num_layers", "lora_layers"])
def test_mlx_reads_with_the_peft_delta(
    peft_cases: Any, tmp_path: Path, config: dict[str, Any]
) -> None:
    case = peft_cases("llama_plain")  # r=4, alpha=8: PEFT's scale is 2, as both configs give
    mlx = _mlx_from_peft(case.path, tmp_path / "mlx", config)
    adapter = read(mlx)
    assert adapter.format == "mlx"
    oracle = case.oracle()
    assert set(adapter.modules) == set(oracle)
    for name, m in adapter.modules.items():
        assert m.scale == 2.0 and m.rank == 4
        delta = m.scale * (m.b.array().astype(np.float64) @ m.a.array().astype(np.float64))
        np.testing.assert_allclose(delta, oracle[name]["delta"].numpy(), rtol=1e-6, atol=1e-9)
    shown = json.loads(CliRunner().invoke(cli, ["inspect", str(mlx), "--json"]).stdout)
    assert shown["format"] == "mlx"
    same = CliRunner().invoke(cli, ["diff", str(case.path), str(mlx), "--json"])
    assert json.loads(same.stdout)["verdict"] == "identical", same.output


def test_mlx_converts_to_a_peft_folder_peft_loads(peft_cases: Any, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel

    from tests import builders

    case = peft_cases("llama_plain")
    mlx = _mlx_from_peft(case.path, tmp_path / "mlx", NEW_CONFIG)
    out = tmp_path / "peft"
    run = CliRunner().invoke(cli, ["convert", str(mlx), "--to", "peft", "-o", str(out)])
    assert run.exit_code == 0, run.output
    assert "mlx -> peft" in run.output
    model = PeftModel.from_pretrained(builders.llama_model(), out).double()
    for name, layer in model.base_model.model.named_modules():
        if hasattr(layer, "get_delta_weight") and "default" in getattr(layer, "r", {}):
            with torch.no_grad():
                got = layer.get_delta_weight("default").double().numpy()
            want = case.oracle()[name]["delta"].numpy()
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_mlx_refusals(peft_cases: Any, tmp_path: Path) -> None:
    case = peft_cases("llama_plain")
    dora = _mlx_from_peft(case.path, tmp_path / "dora", {**NEW_CONFIG, "fine_tune_type": "dora"})
    run = CliRunner().invoke(cli, ["inspect", str(dora)])
    assert run.exit_code == 3 and "an MLX dora adapter" in run.output
    bad = _mlx_from_peft(case.path, tmp_path / "bad", {"lora_parameters": {"scale": 1.0}})
    run = CliRunner().invoke(cli, ["inspect", str(bad)])
    assert run.exit_code == 3 and "needs a numeric rank and scale" in run.output


@pytest.mark.parametrize(
    ("key", "what", "fix"),
    [
        ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "a kohya-style LoRA",
         "pip install adapterctl-diffusers"),
        ("lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_a", "a LyCORIS LoHa/LoKr file",
         "pip install adapterctl-diffusers"),
        ("unet.down_blocks.0.attentions.0.processor.to_q_lora.down.weight", "diffusers-style",
         "pip install adapterctl-diffusers"),
        ("model.layers.0.self_attn.q_proj.lora_a", "MLX-LM adapter weights",
         "adapter_config.json next to it"),
    ],
)  # fmt: skip
def test_other_namings_are_named_not_read_as_empty(
    tmp_path: Path, key: str, what: str, fix: str
) -> None:
    """A LoRA file in another tool's naming, with no plugin that reads it (built-ins only):
    exit 4 saying what it is and which plugin reads it, never "0 modules"."""
    import os
    import subprocess
    import sys

    path = tmp_path / "lora.safetensors"
    save_file({key: np.zeros((4, 8), np.float32)}, str(path))
    env = {**os.environ, "ADAPTERCTL_LOAD_PLUGINS": ""}
    run = subprocess.run(
        [sys.executable, "-m", "adapterctl", "inspect", str(path), "--alpha", "8"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert run.returncode == 4, run.stderr
    assert what in run.stderr and "no installed format reads it" in run.stderr
    assert fix in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_an_adapter_mlx_lm_writes_reads_as_mlx_lm_fuses_it(tmp_path: Path) -> None:
    """mlx-lm itself: LoRA layers on a tiny MLX Llama (its own ``linear_to_lora_layers``),
    saved as its trainer and ``mlx_lm.lora`` save them; each module's ΔW as adapterctl reads
    it equals what mlx-lm's ``LoRALinear.fuse`` adds to the weight, and the PEFT folder
    ``convert`` writes carries the same ΔW."""
    mx = pytest.importorskip("mlx.core")
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import llama
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters
    from mlx_lm.utils import save_config

    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=64,
    )  # fmt: skip
    mx.random.seed(0)
    model = llama.Model(args)
    base = dict(tree_flatten(model.parameters()))
    model.freeze()
    params = {
        "rank": 4,
        "scale": 3.0,
        "dropout": 0.0,
        "keys": ["self_attn.q_proj", "mlp.down_proj"],
    }
    linear_to_lora_layers(model, 2, params)
    # lora_b starts at zero: give it values, as training would
    trained = {
        k: mx.random.normal(v.shape) * 0.1 for k, v in tree_flatten(model.trainable_parameters())
    }
    model.update(tree_unflatten(list(trained.items())))
    out = tmp_path / "mlx"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), trained)
    save_config(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": params, "model": "tiny"},
        out / "adapter_config.json",
    )
    fresh = llama.Model(args)
    fresh.update(tree_unflatten(list(base.items())))
    load_adapters(fresh, str(out))
    want = {}
    for name, layer in fresh.named_modules():
        if isinstance(layer, LoRALinear):
            fused = layer.fuse()
            want[name] = np.array(fused.weight - layer.linear.weight, dtype=np.float64)
    adapter = read(out)
    assert set(adapter.modules) == set(want) and len(want) == 4
    for name, m in adapter.modules.items():
        delta = m.scale * (m.b.array().astype(np.float64) @ m.a.array().astype(np.float64))
        np.testing.assert_allclose(delta, want[name], rtol=1e-5, atol=1e-6)
    peft = tmp_path / "peft"
    assert (
        CliRunner().invoke(cli, ["convert", str(out), "--to", "peft", "-o", str(peft)]).exit_code
        == 0
    )
    same = CliRunner().invoke(cli, ["diff", str(out), str(peft), "--json"])
    assert json.loads(same.stdout)["verdict"] == "identical"
