"""LyCORIS LoHa and LoKr files: each module's ΔW equals the float64 Hadamard/Kronecker product
(linear, 3×3 convolutions flat and Tucker, full and low-rank Kronecker factors), with the
scales the SD tools apply; parts that are not a LoRA/LoHa/LoKr update are refused; the commands
work on them, and a merge into a tiny UNet checkpoint is the correctly rounded W + ΔW."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from adapterctl.cli import cli
from adapterctl.formats import read

F64 = np.float64


def _r(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (0.5 * rng.standard_normal(shape)).astype(np.float32)


def _tucker(t: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """LyCORIS's Tucker rebuild: W[p, q, k…] = Σᵢⱼ t[i, j, k…]·up[i, p]·down[j, q]."""
    return np.einsum("ij...,ip,jq->pq...", t.astype(F64), up.astype(F64), down.astype(F64))


def lycoris_file(path: Path) -> dict[str, np.ndarray]:
    """A LyCORIS file in kohya naming with one module of each storage, and the ΔW each
    should have (float64, in the base weight's shape: out × in, or out × in × 3 × 3)."""
    rng = np.random.default_rng(0)
    t: dict[str, np.ndarray] = {}
    want: dict[str, np.ndarray] = {}

    def f(k: str) -> np.ndarray:
        return t[k].astype(F64)

    # LoHa, linear 24 -> 32, r 4, alpha 2: scale 1/2
    m = "lora_unet_down_blocks_0_attentions_0_proj_in"
    t |= {f"{m}.hada_w1_a": _r(rng, 32, 4), f"{m}.hada_w1_b": _r(rng, 4, 24),
          f"{m}.hada_w2_a": _r(rng, 32, 4), f"{m}.hada_w2_b": _r(rng, 4, 24),
          f"{m}.alpha": np.asarray(2.0, np.float16)}  # fmt: skip
    want[m] = (
        0.5
        * (f(f"{m}.hada_w1_a") @ f(f"{m}.hada_w1_b"))
        * (f(f"{m}.hada_w2_a") @ f(f"{m}.hada_w2_b"))
    )
    # LoHa, 3×3 convolution stored flat (r, in·9), 6 -> 8, r 2, no alpha: scale 1
    m = "lora_unet_down_blocks_0_resnets_0_conv1"
    t |= {f"{m}.hada_w1_a": _r(rng, 8, 2), f"{m}.hada_w1_b": _r(rng, 2, 54),
          f"{m}.hada_w2_a": _r(rng, 8, 2), f"{m}.hada_w2_b": _r(rng, 2, 54)}  # fmt: skip
    want[m] = ((f(f"{m}.hada_w1_a") @ f(f"{m}.hada_w1_b")) * (
        f(f"{m}.hada_w2_a") @ f(f"{m}.hada_w2_b")
    )).reshape(8, 6, 3, 3)  # fmt: skip
    # LoHa with Tucker cores, 3×3 convolution 6 -> 8, r 3, alpha 0 (LyCORIS: alpha = rank)
    m = "lora_unet_down_blocks_0_resnets_0_conv2"
    t |= {f"{m}.hada_w1_a": _r(rng, 3, 8), f"{m}.hada_w1_b": _r(rng, 3, 6),
          f"{m}.hada_t1": _r(rng, 3, 3, 3, 3), f"{m}.hada_w2_a": _r(rng, 3, 8),
          f"{m}.hada_w2_b": _r(rng, 3, 6), f"{m}.hada_t2": _r(rng, 3, 3, 3, 3),
          f"{m}.alpha": np.asarray(0.0, np.float32)}  # fmt: skip
    want[m] = _tucker(t[f"{m}.hada_t1"], t[f"{m}.hada_w1_a"], t[f"{m}.hada_w1_b"]) * _tucker(
        t[f"{m}.hada_t2"], t[f"{m}.hada_w2_a"], t[f"{m}.hada_w2_b"]
    )
    # LoKr, full w1 (4×2) ⊗ low-rank w2 (8×12, r 2), alpha 1: scale 1/2; 24 -> 32
    m = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    t |= {f"{m}.lokr_w1": _r(rng, 4, 2), f"{m}.lokr_w2_a": _r(rng, 8, 2),
          f"{m}.lokr_w2_b": _r(rng, 2, 12), f"{m}.alpha": np.asarray(1.0, np.float32)}  # fmt: skip
    want[m] = 0.5 * np.kron(f(f"{m}.lokr_w1"), f(f"{m}.lokr_w2_a") @ f(f"{m}.lokr_w2_b"))
    # LoKr, low-rank w1 (4×3, r 1) ⊗ full w2 (8×8), alpha 3: scale 3; 24 -> 32
    m = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    t |= {f"{m}.lokr_w1_a": _r(rng, 4, 1), f"{m}.lokr_w1_b": _r(rng, 1, 3),
          f"{m}.lokr_w2": _r(rng, 8, 8), f"{m}.alpha": np.asarray(3.0, np.float32)}  # fmt: skip
    want[m] = 3.0 * np.kron(f(f"{m}.lokr_w1_a") @ f(f"{m}.lokr_w1_b"), f(f"{m}.lokr_w2"))
    # LoKr, both full (scale 1 whatever alpha says), 3×3 convolution: w1 2×2, w2 4×3×3×3
    m = "lora_unet_down_blocks_0_resnets_1_conv1"
    t |= {f"{m}.lokr_w1": _r(rng, 2, 2), f"{m}.lokr_w2": _r(rng, 4, 3, 3, 3),
          f"{m}.alpha": np.asarray(7.0, np.float32)}  # fmt: skip
    want[m] = np.kron(f(f"{m}.lokr_w1")[:, :, None, None], f(f"{m}.lokr_w2"))
    # LoKr, low-rank w1 ⊗ Tucker w2 (3×3), alpha 2 over r 2: scale 1; 6 -> 8
    m = "lora_unet_down_blocks_0_resnets_1_conv2"
    t |= {f"{m}.lokr_w1_a": _r(rng, 2, 2), f"{m}.lokr_w1_b": _r(rng, 2, 2),
          f"{m}.lokr_w2_a": _r(rng, 2, 4), f"{m}.lokr_w2_b": _r(rng, 2, 3),
          f"{m}.lokr_t2": _r(rng, 2, 2, 3, 3),
          f"{m}.alpha": np.asarray(2.0, np.float32)}  # fmt: skip
    want[m] = np.kron(
        (f(f"{m}.lokr_w1_a") @ f(f"{m}.lokr_w1_b"))[:, :, None, None],
        _tucker(t[f"{m}.lokr_t2"], t[f"{m}.lokr_w2_a"], t[f"{m}.lokr_w2_b"]),
    )
    # A plain LoCon module in the same file, read as kohya's
    m = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v"
    t |= {f"{m}.lora_down.weight": _r(rng, 2, 24), f"{m}.lora_up.weight": _r(rng, 32, 2),
          f"{m}.alpha": np.asarray(1.0, np.float32)}  # fmt: skip
    want[m] = 0.5 * f(f"{m}.lora_up.weight") @ f(f"{m}.lora_down.weight")
    save_file(t, str(path))
    return want


def _delta(module: object, shape: tuple[int, ...]) -> np.ndarray:
    left, right = module.factors(dtype="float64")  # type: ignore[attr-defined]
    return (left @ right).reshape(shape)


def test_loha_and_lokr_deltas_are_the_float64_products(tmp_path: Path) -> None:
    src = tmp_path / "ly.safetensors"
    want = lycoris_file(src)
    adapter = read(src)
    assert adapter.format == "lycoris" and set(adapter.modules) == set(want)
    for name, w in want.items():
        got = _delta(adapter.modules[name], w.shape)
        # every factor entry is one exact product; only the float64 sums' order differs
        np.testing.assert_allclose(got, w, rtol=0, atol=1e-14 * np.abs(w).max(), err_msg=name)
    loha = adapter.modules["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert (loha.rank, loha.scale) == (16, 0.5)  # r1·r2, alpha / r
    tucker = adapter.modules["lora_unet_down_blocks_0_resnets_0_conv2"]
    assert tucker.layout == "conv" and tucker.weight_shape == (8, 6, 3, 3)
    assert tucker.scale == 1.0  # alpha 0 reads as alpha = rank


def _refused(tmp_path: Path, tensors: dict[str, np.ndarray], message: str) -> None:
    src = tmp_path / "bad.safetensors"
    save_file(tensors, str(src))
    run = CliRunner().invoke(cli, ["inspect", str(src)])
    assert run.exit_code == 3 and message in run.output, run.output
    assert "Traceback" not in run.output and len(run.output.strip().splitlines()) == 1


def test_parts_that_are_not_an_exact_update_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    m = "lora_unet_mid_block_attentions_0_proj_in"
    loha = {f"{m}.hada_w1_a": _r(rng, 8, 2), f"{m}.hada_w1_b": _r(rng, 2, 8),
            f"{m}.hada_w2_a": _r(rng, 8, 2), f"{m}.hada_w2_b": _r(rng, 2, 8)}  # fmt: skip
    _refused(tmp_path, loha | {f"{m}.dora_scale": _r(rng, 8, 1)}, "dora_scale (DoRA)")
    _refused(
        tmp_path, {f"{m}.lora_down.weight": _r(rng, 2, 8), f"{m}.lora_up.weight": _r(rng, 8, 2),
                   f"{m}.lora_mid.weight": _r(rng, 2, 2, 3, 3)}, "lora_mid",
    )  # fmt: skip
    _refused(tmp_path, {f"{m}.diff": _r(rng, 8, 8), f"{m}.hada_w1_a": _r(rng, 8, 2)}, "diff")
    _refused(tmp_path, {k: v for k, v in loha.items() if "w2_b" not in k}, "without hada_w2_b")
    _refused(tmp_path, loha | {f"{m}.hada_w2_b": _r(rng, 3, 8)}, "LoHa factors do not fit")
    _refused(
        tmp_path, {f"{m}.lokr_w1_a": _r(rng, 2, 2), f"{m}.lokr_w1_b": _r(rng, 3, 2),
                   f"{m}.lokr_w2": _r(rng, 4, 4)}, "disagree on the rank",
    )  # fmt: skip
    _refused(tmp_path, {f"{m}.lokr_w1": _r(rng, 2, 2)}, "neither lokr_w2 nor")


def test_the_commands_work_on_lycoris_files(tmp_path: Path) -> None:
    """inspect, diff, compose (linear), resize, convert --to kohya; written factors are float32,
    so the exact pair's ΔW comes back to float32 rounding."""
    pytest.importorskip("torch")
    src = tmp_path / "ly.safetensors"
    lycoris_file(src)
    runner = CliRunner()
    shown = json.loads(runner.invoke(cli, ["inspect", str(src), "--json"]).stdout)
    assert shown["format"] == "lycoris" and len(shown["modules"]) == 8
    from safetensors.numpy import load_file

    stored = load_file(str(src))  # the file's own dtypes and parameters, not the pair's
    assert shown["dtypes"] == ["F32"]  # the factors; the alpha tensors are float16
    assert shown["trainable_parameters"] == sum(
        v.size for k, v in stored.items() if not k.endswith(".alpha")
    )
    halves = tmp_path / "halves"
    run = runner.invoke(cli, ["compose", str(src), str(src), "--method", "linear",
                              "-w", "0.5", "-w", "0.5", "-o", str(halves)])  # fmt: skip
    assert run.exit_code == 0, run.output
    same = runner.invoke(cli, ["diff", str(src), str(halves), "--tol", "1e-6", "--json"])
    assert json.loads(same.stdout)["verdict"] == "identical", same.stdout
    resized = runner.invoke(cli, ["resize", str(src), "--rank", "2", "-o", str(tmp_path / "r2")])
    assert resized.exit_code == 0, resized.output
    kohya = tmp_path / "k.safetensors"
    run = runner.invoke(cli, ["convert", str(src), "--to", "kohya", "-o", str(kohya)])
    assert run.exit_code == 0, run.output
    close = runner.invoke(cli, ["diff", str(src), str(kohya), "--tol", "1e-6", "--json"])
    assert json.loads(close.stdout)["verdict"] == "identical", close.stdout


def unet_lycoris(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """A LyCORIS file for ``tiny_unet``: module -> (UNet weight, float64 ΔW)."""
    rng = np.random.default_rng(2)
    t: dict[str, np.ndarray] = {}
    out = {}
    m, w = "lora_unet_down_blocks_0_resnets_0_conv1", "down_blocks.0.resnets.0.conv1.weight"
    t |= {f"{m}.hada_w1_a": _r(rng, 32, 2), f"{m}.hada_w1_b": _r(rng, 2, 32 * 9),
          f"{m}.hada_w2_a": _r(rng, 32, 2), f"{m}.hada_w2_b": _r(rng, 2, 32 * 9),
          f"{m}.alpha": np.asarray(1.0, np.float32)}  # fmt: skip
    d = (t[f"{m}.hada_w1_a"].astype(F64) @ t[f"{m}.hada_w1_b"]) * (
        t[f"{m}.hada_w2_a"].astype(F64) @ t[f"{m}.hada_w2_b"]
    )
    out[m] = (w, 0.5 * d.reshape(32, 32, 3, 3))
    m = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj"
    w = "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"  # 512 × 64
    t |= {f"{m}.lokr_w1": _r(rng, 8, 4), f"{m}.lokr_w2_a": _r(rng, 64, 2),
          f"{m}.lokr_w2_b": _r(rng, 2, 16)}  # fmt: skip
    d = np.kron(
        t[f"{m}.lokr_w1"].astype(F64), t[f"{m}.lokr_w2_a"].astype(F64) @ t[f"{m}.lokr_w2_b"]
    )
    out[m] = (w, d)
    save_file(t, str(path))
    return out


def test_lycoris_merges_into_a_unet_checkpoint_correctly_rounded(
    tmp_path: Path, unet: Path
) -> None:
    """validate against the UNet, then merge: each touched weight is W + ΔW (float64 products)
    rounded once to float32; the rest are the base's bytes; diffusers loads the result."""
    from safetensors.numpy import load_file

    src = tmp_path / "ly.safetensors"
    want = unet_lycoris(src)
    runner = CliRunner()
    ok = runner.invoke(cli, ["validate", str(src), "--base", str(unet)])
    assert ok.exit_code == 0 and "2 modules matched" in ok.output, ok.output
    out = tmp_path / "merged"
    run = runner.invoke(cli, ["merge", str(unet), str(src), "-o", str(out)])
    assert run.exit_code == 0, run.output
    base = load_file(str(unet / "diffusion_pytorch_model.safetensors"))
    merged = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert set(merged) == set(base)
    touched = {w for w, _ in want.values()}
    for _, (w, d) in want.items():
        exact = base[w].astype(F64) + d
        np.testing.assert_array_max_ulp(merged[w], exact.astype(np.float32), maxulp=1)
        assert np.mean(merged[w] == exact.astype(np.float32)) > 0.999
    assert all(np.array_equal(merged[k], base[k]) for k in base if k not in touched)
    import diffusers

    diffusers.UNet2DConditionModel.from_pretrained(out)
