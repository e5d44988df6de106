"""Stable Diffusion LoRA files: kohya and both diffusers namings read with their tools' scales
(ΔW checked in float64, a 3×3 convolution included), round-tripped through kohya naming to an
identical ΔW, and used by the commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from adapterctl.cli import cli
from adapterctl.formats import read

Q = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
OUT = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
CONV = "down_blocks_0_resnets_0_conv1"
FC1 = "text_model_encoder_layers_0_mlp_fc1"


def _rand(rng: np.random.Generator, *shape: int, dtype: type = np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def _kohya(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """A kohya file: a linear module (alpha 2, r=4), a 3×3 convolution in float16 (alpha 1,
    r=4), a text-encoder module without alpha (r=2: alpha = rank). Returns name -> (down, up,
    scale)."""
    rng = np.random.default_rng(0)
    mods = {
        f"lora_unet_{Q}": (_rand(rng, 4, 32), _rand(rng, 32, 4), 2.0),
        f"lora_unet_{CONV}": (
            _rand(rng, 4, 16, 3, 3, dtype=np.float16), _rand(rng, 8, 4, 1, 1, dtype=np.float16), 1.0
        ),
        f"lora_te_{FC1}": (_rand(rng, 2, 32), _rand(rng, 64, 2), None),
    }  # fmt: skip
    tensors = {}
    out = {}
    for name, (down, up, alpha) in mods.items():
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        if alpha is not None:
            tensors[f"{name}.alpha"] = np.asarray(alpha, np.float16)
        out[name] = (down, up, (alpha if alpha is not None else down.shape[0]) / down.shape[0])
    save_file(tensors, str(path))
    return out


def _delta(down: np.ndarray, up: np.ndarray, scale: float) -> np.ndarray:
    """ΔW = scale · up · down in float64, a convolution's as (out, in, kh, kw)."""
    d, u = down.astype(np.float64), up.astype(np.float64)
    flat = scale * (u.reshape(u.shape[0], -1) @ d.reshape(d.shape[0], -1))
    return flat.reshape(u.shape[0], *d.shape[1:])


def _adapter_delta(m: object) -> np.ndarray:
    a = m.a.array().astype(np.float64)  # type: ignore[attr-defined]
    b = m.b.array().astype(np.float64)  # type: ignore[attr-defined]
    flat = m.scale * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))  # type: ignore[attr-defined]
    return flat.reshape(b.shape[0], *a.shape[1:])


def test_kohya_reads_with_alpha_over_rank(tmp_path: Path) -> None:
    want = _kohya(tmp_path / "k.safetensors")
    adapter = read(tmp_path / "k.safetensors")
    assert adapter.format == "kohya" and set(adapter.modules) == set(want)
    assert adapter.modules[f"lora_unet_{CONV}"].layout == "conv"
    for name, (down, up, scale) in want.items():
        assert adapter.modules[name].scale == scale
        np.testing.assert_array_equal(
            _adapter_delta(adapter.modules[name]), _delta(down, up, scale)
        )
    shown = json.loads(
        CliRunner().invoke(cli, ["inspect", str(tmp_path / "k.safetensors"), "--json"]).stdout
    )
    assert shown["format"] == "kohya"


def test_kohya_round_trips_to_the_same_delta(tmp_path: Path) -> None:
    src = tmp_path / "k.safetensors"
    _kohya(src)
    out = tmp_path / "again.safetensors"
    run = CliRunner().invoke(cli, ["convert", str(src), "--to", "kohya", "-o", str(out)])
    assert run.exit_code == 0, run.output
    a, b = read(src), read(out)
    assert b.format == "kohya" and set(a.modules) == set(b.modules)
    for name in a.modules:
        np.testing.assert_array_equal(
            _adapter_delta(a.modules[name]), _adapter_delta(b.modules[name])
        )
    same = CliRunner().invoke(cli, ["diff", str(src), str(out), "--json"])
    assert json.loads(same.stdout)["verdict"] == "identical"


@pytest.mark.parametrize("legacy", [False, True], ids=["lora-naming", "processor-naming"])
def test_diffusers_namings_read_and_write_as_kohya(tmp_path: Path, legacy: bool) -> None:
    rng = np.random.default_rng(1)
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    q = (_rand(rng, 4, 32), _rand(rng, 32, 4))
    o = (_rand(rng, 4, 32), _rand(rng, 32, 4))
    if legacy:  # UNet-only files of the attention processors: no "unet." prefix
        keys = {f"{attn}.processor.to_q_lora": q, f"{attn}.processor.to_out_lora": o}
    else:
        keys = {f"unet.{attn}.to_q.lora": q, f"unet.{attn}.to_out.0.lora": o}
    tensors = {}
    for k, (down, up) in keys.items():
        tensors[f"{k}.down.weight"], tensors[f"{k}.up.weight"] = down, up
    if not legacy:
        tensors[f"unet.{attn}.to_q.alpha"] = np.asarray(8.0, np.float32)  # scale 2
    src = tmp_path / "d.safetensors"
    save_file(tensors, str(src))
    adapter = read(src)
    assert adapter.format == "diffusers"
    assert set(adapter.modules) == {f"unet.{attn}.to_q", f"unet.{attn}.to_out.0"}
    assert adapter.modules[f"unet.{attn}.to_q"].scale == (1.0 if legacy else 2.0)
    out = tmp_path / "k.safetensors"
    assert (
        CliRunner().invoke(cli, ["convert", str(src), "--to", "kohya", "-o", str(out)]).exit_code
        == 0
    )
    kohya = read(out)
    assert set(kohya.modules) == {f"lora_unet_{Q}", f"lora_unet_{OUT}"}
    np.testing.assert_array_equal(
        _adapter_delta(kohya.modules[f"lora_unet_{Q}"]),
        _adapter_delta(adapter.modules[f"unet.{attn}.to_q"]),
    )


def test_the_commands_work_on_kohya_files(tmp_path: Path) -> None:
    """compose (linear, exact) and resize on kohya inputs; a non-SD adapter is not written in
    kohya naming (exit 2)."""
    pytest.importorskip("torch")
    src = tmp_path / "k.safetensors"
    _kohya(src)
    composed = tmp_path / "twice"
    run = CliRunner().invoke(
        cli, ["compose", str(src), str(src), "--method", "linear", "-w", "0.5", "-w", "0.5",
              "-o", str(composed)],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    same = CliRunner().invoke(cli, ["diff", str(src), str(composed), "--tol", "1e-6", "--json"])
    assert json.loads(same.stdout)["verdict"] == "identical"
    resized = CliRunner().invoke(
        cli, ["resize", str(src), "--rank", "2", "-o", str(tmp_path / "r2")]
    )
    assert resized.exit_code == 0, resized.output
    llama = tmp_path / "llama.safetensors"
    save_file(
        {"model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 8), np.float32),
         "model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((8, 2), np.float32)},
        str(llama),
    )  # fmt: skip
    run = CliRunner().invoke(
        cli, ["convert", str(llama), "--alpha", "2", "--to", "kohya", "-o", str(tmp_path / "x")]
    )
    assert run.exit_code == 2 and "kohya naming is for Stable Diffusion modules" in run.output
    assert not (tmp_path / "x").exists()


def _diffusers_module(key: str) -> str:
    """The dotted module a key of diffusers' converted state dict (a factor, or an alpha of
    ``network_alphas``) belongs to."""
    import re

    key = key.removesuffix(".alpha")
    for marker in (".lora.", ".lora_linear_layer.", "_lora."):
        key = key.split(marker)[0]
    return re.sub(
        r"\.processor\.(to_[qkv]|to_out)$", lambda m: "." + m[1].replace("to_out", "to_out.0"), key
    )


def test_diffusers_reads_the_kohya_file_written_here_as_written(tmp_path: Path) -> None:
    """The oracle: diffusers' own kohya conversion (``StableDiffusionPipeline.lora_state_dict``)
    of a file this plugin wrote finds every module under the diffusers name that maps back to
    its kohya name, with the same factors and the same alpha (so the same ΔW)."""
    pytest.importorskip("diffusers")
    from adapterctl_diffusers.sd import kohya_name
    from diffusers import StableDiffusionPipeline

    src = tmp_path / "k.safetensors"
    _kohya(src)
    out = tmp_path / "written.safetensors"
    assert (
        CliRunner().invoke(cli, ["convert", str(src), "--to", "kohya", "-o", str(out)]).exit_code
        == 0
    )
    ours = read(out)
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(out))
    found: dict[str, dict[str, np.ndarray]] = {}
    for key, t in state.items():
        part = key.rsplit(".", 2)[-2]  # down / up
        found.setdefault(kohya_name(_diffusers_module(key)), {})[part] = t.float().numpy()
    alpha = {kohya_name(_diffusers_module(k)): v for k, v in alphas.items()}
    assert set(found) == set(alpha) == set(ours.modules)
    for name, m in ours.modules.items():
        np.testing.assert_array_equal(found[name]["down"], m.a.array())
        np.testing.assert_array_equal(found[name]["up"], m.b.array())
        assert alpha[name] / m.rank == m.scale, name


def test_a_written_kohya_file_loads_in_diffusers_as_merged_here(
    tmp_path: Path, unet: Path, diffusers_fuse: Any
) -> None:
    """The oracle: diffusers' ``load_lora_weights`` + ``fuse_lora`` of a kohya file written
    by ``convert --to kohya`` gives the weights this merge writes (to float32 rounding: the
    merge rounds W + ΔW once, diffusers adds in float32), and the UNet computes the same."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    rng = np.random.default_rng(3)
    attn = "down_blocks_0_attentions_0_transformer_blocks_0"
    mods = {  # name -> (down, up); one alpha for all (see README: diffusers' alpha_pattern)
        f"lora_unet_{attn}_attn1_to_q": (_rand(rng, 4, 32), _rand(rng, 32, 4)),
        f"lora_unet_{attn}_attn2_to_k": (_rand(rng, 4, 32), _rand(rng, 32, 4)),
        f"lora_unet_{attn}_ff_net_0_proj": (_rand(rng, 4, 32), _rand(rng, 256, 4)),
        "lora_unet_down_blocks_0_resnets_0_conv1":
            (_rand(rng, 4, 32, 3, 3), _rand(rng, 32, 4, 1, 1)),
        "lora_unet_mid_block_attentions_0_proj_in":
            (_rand(rng, 4, 64, 1, 1), _rand(rng, 64, 4, 1, 1)),
    }  # fmt: skip
    tensors = {}
    for name, (down, up) in mods.items():
        tensors[f"{name}.lora_down.weight"] = 0.05 * down
        tensors[f"{name}.lora_up.weight"] = 0.05 * up
        tensors[f"{name}.alpha"] = np.asarray(2.0, np.float32)  # scale 1/2
    src, written = tmp_path / "k.safetensors", tmp_path / "written.safetensors"
    save_file(tensors, str(src))
    runner = CliRunner()
    assert (
        runner.invoke(cli, ["convert", str(src), "--to", "kohya", "-o", str(written)]).exit_code
        == 0
    )
    merged = tmp_path / "merged"
    run = runner.invoke(cli, ["merge", str(unet), str(written), "-o", str(merged)])
    assert run.exit_code == 0, run.output

    torch.manual_seed(0)
    x, t, e = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 32)
    outputs = []

    def run_with_lora(model: Any) -> None:
        with torch.no_grad():
            outputs.append(model(x, t, e).sample)

    theirs = diffusers_fuse(unet, written, run_with_lora)
    (with_lora,) = outputs
    ours = diffusers.UNet2DConditionModel.from_pretrained(merged)
    base = diffusers.UNet2DConditionModel.from_pretrained(unet).state_dict()
    fused, mine = theirs.state_dict(), ours.state_dict()
    assert set(fused) == set(mine)
    changed = {k for k in mine if not torch.equal(mine[k], base[k])}
    assert len(changed) == len(mods)  # each module's weight, nothing else
    for k in mine:  # diffusers fuses in float32: a few ulps from the correctly rounded sum
        tol = 4e-7 * base[k].abs().max().item() + 1e-12
        torch.testing.assert_close(mine[k], fused[k], rtol=0, atol=tol)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, e).sample, with_lora, rtol=1e-5, atol=1e-5)
        plain = diffusers.UNet2DConditionModel.from_pretrained(unet)(x, t, e).sample
    assert not torch.allclose(plain, with_lora, rtol=1e-3, atol=1e-3)  # the LoRA did something


def test_text_encoder_modules_do_not_merge_into_a_unet(tmp_path: Path, unet: Path) -> None:
    """A file with text-encoder modules merged into a UNet: exit 3 naming one, nothing written."""
    src = tmp_path / "k.safetensors"
    _kohya(src)
    out = tmp_path / "merged"
    run = CliRunner().invoke(cli, ["merge", str(unet), str(src), "-o", str(out)])
    assert run.exit_code == 3 and "lora_te_" in run.output and "the base has no" in run.output
    assert not out.exists()


def test_text_encoder_modules_validate_and_merge_into_a_clip_text_encoder(tmp_path: Path) -> None:
    """kohya's ``lora_te_text_model_…`` names bind to a CLIP text encoder saved by
    transformers; the merge is W + ΔW rounded once, the rest of the encoder untouched."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16,
    )  # fmt: skip
    encoder = tmp_path / "text_encoder"
    transformers.CLIPTextModel(config).save_pretrained(encoder)
    rng = np.random.default_rng(4)
    mods = {  # kohya name -> (weight, down, up); alpha 1 over r 2
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj":
            ("text_model.encoder.layers.1.self_attn.q_proj.weight",
             _rand(rng, 2, 32), _rand(rng, 32, 2)),
        "lora_te_text_model_encoder_layers_0_mlp_fc1":
            ("text_model.encoder.layers.0.mlp.fc1.weight", _rand(rng, 2, 32), _rand(rng, 64, 2)),
    }  # fmt: skip
    tensors = {}
    for name, (_, down, up) in mods.items():
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                    f"{name}.alpha": np.asarray(1.0, np.float32)}  # fmt: skip
    src = tmp_path / "te.safetensors"
    save_file(tensors, str(src))
    runner = CliRunner()
    ok = runner.invoke(cli, ["validate", str(src), "--base", str(encoder)])
    assert ok.exit_code == 0 and "2 modules matched" in ok.output, ok.output
    out = tmp_path / "merged"
    run = runner.invoke(cli, ["merge", str(encoder), str(src), "-o", str(out)])
    assert run.exit_code == 0, run.output
    base, merged = (
        load_file(str(encoder / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    # transformers 5 saves the encoder without its "text_model." prefix; SD repositories'
    # text_encoder folders have it: the kohya name's longest matching suffix binds either way
    if not any(k.startswith("text_model.") for k in base):
        mods = {k: (w.removeprefix("text_model."), d, u) for k, (w, d, u) in mods.items()}
    for weight, down, up in mods.values():
        exact = base[weight].astype(np.float64) + 0.5 * (up.astype(np.float64) @ down)
        np.testing.assert_array_max_ulp(merged[weight], exact.astype(np.float32), maxulp=1)
    touched = {w for w, _, _ in mods.values()}
    assert all(np.array_equal(merged[k], v) for k, v in base.items() if k not in touched)


def test_peft_style_diffusers_files_read_with_their_saved_config(
    tmp_path: Path, unet: Path, diffusers_fuse: Any
) -> None:
    """The file diffusers' ``save_lora_weights`` writes from a PEFT-wrapped UNet
    (``unet.….lora_A.weight``, its LoraConfig in the header): every module's ΔW is PEFT's own
    scaling · B·A (rank and alpha patterns included); saved without the config, alpha = rank;
    merged into the UNet it gives what diffusers' ``load_lora_weights`` + ``fuse_lora`` gives."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file
    from safetensors.torch import save_file as save_torch

    model = diffusers.UNet2DConditionModel.from_pretrained(unet)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"],
        rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 2}, init_lora_weights=False,
    )  # fmt: skip
    torch.manual_seed(5)
    model.add_adapter(config)
    want = {}  # "unet.<module>" -> float64 ΔW as PEFT scales it
    for name, layer in model.named_modules():
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            a = layer.lora_A["default"].weight.detach().double()
            b = layer.lora_B["default"].weight.detach().double()
            flat = layer.scaling["default"] * (b.flatten(1) @ a.flatten(1))
            want[f"unet.{name}"] = flat.numpy()
    folder = tmp_path / "saved"
    diffusers.StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(model),
        unet_lora_adapter_metadata=config.to_dict(),
    )  # fmt: skip
    src = folder / "pytorch_lora_weights.safetensors"
    adapter = read(src)
    assert adapter.format == "diffusers-peft" and set(adapter.modules) == set(want)
    scales = set()
    for name, d in want.items():
        left, right = adapter.modules[name].factors(dtype="float64")
        np.testing.assert_allclose(left @ right, d, rtol=0, atol=1e-12 * np.abs(d).max())
        scales.add(adapter.modules[name].scale)
    assert scales == {2.0, 4.0, 0.5}  # 8/4; to_k: 8/2; to_v: 2/4

    bare = tmp_path / "no-config.safetensors"  # as older diffusers saved: no config
    save_torch(load_file(str(src)), str(bare))
    with safe_open(str(bare), "np") as f:
        assert "lora_adapter_metadata" not in (f.metadata() or {})
    assert {m.scale for m in read(bare).modules.values()} == {1.0}

    merged = tmp_path / "merged"
    run = CliRunner().invoke(cli, ["merge", str(unet), str(src), "-o", str(merged)])
    assert run.exit_code == 0, run.output
    theirs = diffusers_fuse(unet, src)
    ours = diffusers.UNet2DConditionModel.from_pretrained(merged).state_dict()
    base = diffusers.UNet2DConditionModel.from_pretrained(unet).state_dict()
    fused = theirs.state_dict()
    assert sum(not torch.equal(ours[k], base[k]) for k in ours) == len(want)
    for k in ours:
        tol = 4e-7 * base[k].abs().max().item() + 1e-12
        torch.testing.assert_close(ours[k], fused[k], rtol=0, atol=tol)
