"""Merging into bitsandbytes NF4 bases: dequantised output, and 4-bit output (--quantize nf4).

The oracle for a 4-bit base is bitsandbytes' own dequantisation of the weights transformers
loads (checked before it is trusted, see ``oracles``); PEFT's ``merge_and_unload`` into the same
4-bit model is the peer to beat on delta error. Oracle models use shapes bitsandbytes handles
on the CPU; the product on shapes where it does not is tested against a float64 decode.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import oracles
import pytest
import torch
from builders import llama_model, peft_adapter, save_base
from click.testing import CliRunner
from safetensors.torch import load_file

from adapterctl import nf4
from adapterctl.checkpoint import open_checkpoint
from adapterctl.cli import cli
from adapterctl.formats import read
from adapterctl.merge import merge

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def nf4_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama (hidden 64 so blocks are real), its NF4 checkpoint (compute dtype bf16 and
    fp32) and a QLoRA-style adapter trained on it (random factors)."""
    d = tmp_path_factory.mktemp("nf4")
    model = llama_model(hidden=64, vocab=96)
    base16 = save_base(model, d / "base16")
    out: dict[str, Any] = {"dir": d, "base16": base16}
    for name, compute in (("nf4_bf16", torch.bfloat16), ("nf4_fp32", torch.float32)):
        q = oracles.load_4bit(base16, compute=compute)
        q.save_pretrained(d / name)
        out[name] = d / name
    pm, adapter = peft_adapter(copy.deepcopy(model), d / "adapter", target_modules="all-linear")
    out["adapter"] = adapter
    out["deltas"] = {
        f"{name.removeprefix('base_model.model.')}.weight": m.get_delta_weight("default").detach()
        for name, m in copy.deepcopy(pm).double().named_modules()
        if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})
    }
    return out


def test_default_output_is_dequantised_plus_delta_rounded_once(
    nf4_setup: dict[str, Any], tmp_path: Path
) -> None:
    base = nf4_setup["nf4_bf16"]
    ckpt = open_checkpoint(base)
    assert ckpt.quantization == "nf4"
    report = merge(ckpt, [read(nf4_setup["adapter"])], tmp_path / "o", device="cpu")
    assert any("4-bit" in w for w in report.warnings)
    ours = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert not any(".absmax" in k or "quant_state" in k for k in ours)
    deq = oracles.linear4bit_weights(oracles.load_4bit(base, compute=torch.bfloat16))
    assert deq
    for name, w in deq.items():
        want = (w.double() + nf4_setup["deltas"][name]).to(torch.bfloat16)
        got = ours[name]
        assert got.dtype == torch.bfloat16
        # rounded once: within half a bf16 ulp of the float64 value (plus float32 noise)
        exact = w.double() + nf4_setup["deltas"][name]
        err = (got.double() - exact).abs()
        tol = exact.abs() * 2**-8 + exact.abs().max() * 2e-6  # bf16: eps/2 = 2^-8
        assert bool((err <= tol).all()), name
        assert float((got != want).float().mean()) < 1e-3, name
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert "quantization_config" not in config
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "o")  # loads as a plain 16-bit model


def test_quantize_nf4_loads_and_gives_the_logits_its_weights_imply(
    nf4_setup: dict[str, Any], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    base = nf4_setup["nf4_fp32"]
    r = CliRunner().invoke(
        cli,
        ["merge", str(base), str(nf4_setup["adapter"]), "-o", str(tmp_path / "o"),
         "--quantize", "nf4", "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["quantize"] == "nf4" and report["delta_error"] is not None
    assert len(report["layers"]) == len(nf4_setup["deltas"])
    q = oracles.load_4bit(tmp_path / "o", compute=torch.float32)
    stored = load_file(str(tmp_path / "o" / "model.safetensors"))
    deq = oracles.linear4bit_weights(q)
    for name, w in deq.items():
        assert torch.equal(w, nf4.dequantize(stored, name)), name
    # A float32 model holding exactly those weights gives the same logits as the 4-bit one.
    plain = AutoModelForCausalLM.from_pretrained(nf4_setup["base16"]).eval()
    state = plain.state_dict()
    for name, w in deq.items():
        state[name] = w
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        state[name] = stored[name].float()
    plain.load_state_dict(state)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(q(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)


def test_quantize_delta_error_no_worse_than_peft(nf4_setup: dict[str, Any], tmp_path: Path) -> None:
    from peft import PeftModel

    base = nf4_setup["nf4_fp32"]
    before = oracles.linear4bit_weights(oracles.load_4bit(base, compute=torch.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = PeftModel.from_pretrained(
            oracles.load_4bit(base, compute=torch.float32), nf4_setup["adapter"]
        ).merge_and_unload()
    after_peft = oracles.linear4bit_weights(peft_merged)
    report = merge(
        open_checkpoint(base), [read(nf4_setup["adapter"])], tmp_path / "o", quantize="nf4"
    )
    stored = load_file(str(tmp_path / "o" / "model.safetensors"))

    def total(after: dict[str, torch.Tensor]) -> float:
        num = den = 0.0
        for name, w in before.items():
            d = nf4_setup["deltas"][name]
            num += float(((after[name].double() - w.double()) - d).square().sum())
            den += float(d.square().sum())
        return (num / den) ** 0.5

    ours = total({n: nf4.dequantize(stored, n) for n in before})
    peft = total(after_peft)
    assert ours <= peft + 1e-9, (ours, peft)
    assert report.delta_error == pytest.approx(ours, rel=1e-3)


def test_quantize_from_16bit_base_loads(nf4_setup: dict[str, Any], tmp_path: Path) -> None:
    report = merge(
        open_checkpoint(nf4_setup["base16"]), [read(nf4_setup["adapter"])], tmp_path / "o",
        quantize="nf4", quant_method="absmax",
    )  # fmt: skip
    assert report.delta_error is not None
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["load_in_4bit"]
    q = oracles.load_4bit(tmp_path / "o", compute=torch.float32)
    stored = load_file(str(tmp_path / "o" / "model.safetensors"))
    for name, w in oracles.linear4bit_weights(q).items():
        assert torch.equal(w, nf4.dequantize(stored, name))


def test_max_delta_error_fails_and_leaves_nothing(
    nf4_setup: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "o"
    r = CliRunner().invoke(
        cli,
        ["merge", str(nf4_setup["nf4_fp32"]), str(nf4_setup["adapter"]), "-o", str(out),
         "--quantize", "nf4", "--max-delta-error", "0.0001"],
    )  # fmt: skip
    assert r.exit_code == 3
    assert "--max-delta-error" in r.output
    assert not out.exists()
    assert not list(tmp_path.glob(".o.partial-*"))


def test_gpt2_4bit_conv1d_is_written_back_in_conv1d_layout(tmp_path: Path) -> None:
    """transformers stores 4-bit GPT-2 Conv1D layers as Linear (out, in); the dequantised
    merge must write them back as Conv1D (in, out), square c_proj included."""
    import bitsandbytes as bnb
    from builders import gpt2_model
    from transformers import GPT2LMHeadModel

    base16 = save_base(gpt2_model(hidden=64), tmp_path / "base")
    q = oracles.load_4bit(base16, compute=torch.float32)
    q.save_pretrained(tmp_path / "nf4")
    pm, adapter = peft_adapter(
        gpt2_model(hidden=64), tmp_path / "a", target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
    )  # fmt: skip
    merge(open_checkpoint(tmp_path / "nf4"), [read(adapter)], tmp_path / "o", verify=True)
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "o").state_dict()
    ref = dict(copy.deepcopy(pm).double().named_modules())
    checked = 0
    for name, mod in q.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit) and ".h." in f".{name}":
            w = oracles.bnb_dequantize(mod.weight.data, mod.weight.quant_state)  # (out, in)
            delta = ref[f"base_model.model.{name}"].get_delta_weight("default")  # (in, out)
            want = (w.double().T + delta).float()
            torch.testing.assert_close(merged[f"{name}.weight"], want, rtol=0, atol=1e-6)
            checked += 1
    assert checked == 8


@pytest.fixture(scope="module")
def odd_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A Llama of hidden 96 (in-features a multiple of 16 but not of the blocksize 64, where
    bitsandbytes 0.50's CPU dequantize errs; k/v out-features 48, where its AVX512-BF16 forward
    asserts), quantised to NF4 by transformers, and an adapter on every linear layer."""
    d = tmp_path_factory.mktemp("odd")
    model = llama_model(hidden=96, vocab=96)
    base16 = save_base(model, d / "base16")
    q = oracles.load_4bit(base16, compute=torch.float32, check=False)  # quantising only
    q.save_pretrained(d / "nf4")
    stored = load_file(str(d / "nf4" / "model.safetensors"))
    w16 = load_file(str(base16 / "model.safetensors"))
    weights: dict[str, torch.Tensor] = {}
    for key in stored:
        if key.endswith(".quant_state.bitsandbytes__nf4"):
            name = key.split(".quant_state.")[0]
            weights[name], _ = oracles.decode_file(stored, name)
            if not oracles.within_bound(stored, name, w16[name]):  # the oracle's quantisation
                oracles.broken(f"transformers' NF4 quantisation of {name} is off its weight")
    pm, adapter = peft_adapter(copy.deepcopy(model), d / "adapter", target_modules="all-linear")
    deltas = {
        f"{name.removeprefix('base_model.model.')}.weight": m.get_delta_weight("default").detach()
        for name, m in copy.deepcopy(pm).double().named_modules()
        if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})
    }
    assert set(deltas) == set(weights)
    return {"nf4": d / "nf4", "adapter": adapter, "weights": weights, "deltas": deltas}


def test_merges_on_shapes_bitsandbytes_cpu_gets_wrong(
    odd_setup: dict[str, Any], tmp_path: Path
) -> None:
    """The torch engine on this CPU, where bitsandbytes' own dequantize is off: the 16-bit merge
    is the float64 decode of the stored bytes + ΔW, and ``--quantize nf4`` writes bytes whose
    decode lies within the 4-bit bound of that sum, with the delta error it reports."""
    base, adapter = odd_setup["nf4"], odd_setup["adapter"]
    weights, deltas = odd_setup["weights"], odd_setup["deltas"]
    merge(open_checkpoint(base), [read(adapter)], tmp_path / "o16", device="cpu")
    out = load_file(str(tmp_path / "o16" / "model.safetensors"))
    for name, w in weights.items():
        exact = w + deltas[name]
        assert out[name].dtype == torch.float32
        tol = exact.abs() * 2**-23 + float(exact.abs().max()) * 2e-7  # rounded once (+ noise)
        assert bool(((out[name].double() - exact).abs() <= tol).all()), name

    r = CliRunner().invoke(
        cli,
        ["merge", str(base), str(adapter), "-o", str(tmp_path / "o4"), "--quantize", "nf4",
         "--quant-method", "absmax", "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    stored = load_file(str(tmp_path / "o4" / "model.safetensors"))
    num = den = 0.0
    for name, w in weights.items():
        exact = w + deltas[name]
        ref, tol = oracles.decode_file(stored, name)
        assert bool(((nf4.dequantize(stored, name).double() - ref).abs() <= tol).all()), name
        assert oracles.within_bound(stored, name, exact), name
        num += float(((ref - w) - deltas[name]).square().sum())
        den += float(deltas[name].square().sum())
    assert report["delta_error"] == pytest.approx((num / den) ** 0.5, rel=1e-3)


def test_quantising_prints_no_bitsandbytes_start_up_warning(tmp_path: Path) -> None:
    """bitsandbytes logs a warning at import on AVX512-BF16 CPUs (an optional Hub kernel it
    cannot load); a merge that only quantises must not pass it on to the user's terminal."""
    import subprocess
    import sys

    code = (
        "import torch; from adapterctl import nf4; "
        "out = nf4.quantize(torch.randn(32, 64), 'w'); print(sorted(out)[0])"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "w" and run.stderr == ""
