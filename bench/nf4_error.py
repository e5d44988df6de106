"""How much of a LoRA delta survives re-quantisation to NF4: absmax vs optimal vs PEFT.

For a Gaussian ``size``×``size`` weight and a rank-``rank`` ΔW with ‖ΔW‖/‖W‖ = 0.5%, 1%, 5%,
re-quantise W + ΔW to NF4 (blocksize 64, double quantisation) and report

- delta error = ‖(Q − W) − ΔW‖ / ‖ΔW‖ (0: the delta arrived intact; 1: as if dropped), and
- reconstruction error = ‖Q − (W + ΔW)‖ / ‖W + ΔW‖,

for two bases: W an NF4-dequantised weight (the QLoRA case: the base is a 4-bit checkpoint)
and W a 16-bit (bf16) weight. In the QLoRA case W is the ``q_proj`` of a one-layer Llama
loaded in NF4 by transformers, and PEFT's ``merge_and_unload`` of the same ΔW (a PEFT LoRA
whose factors are set to ours) is measured on the very same weights.

Run:  python bench/nf4_error.py [--size 4096] [--rank 16] [--no-peft]
Prints a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from adapterctl import nf4

METHODS = ("absmax", "optimal")


def low_rank_delta(w: torch.Tensor, rank: int, ratio: float, seed: int) -> tuple[Any, Any]:
    """Factors (B (out, r), A (r, in)) with ‖B @ A‖ = ratio · ‖w‖."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(w.shape[0], rank, generator=g)  # (out, r)
    a = torch.randn(rank, w.shape[1], generator=g)  # (r, in)
    b *= ratio * float(w.norm()) / float((b @ a).norm())
    return b, a


def measure(w: torch.Tensor, delta: torch.Tensor) -> dict[str, tuple[float, float, float]]:
    """method -> (delta error, reconstruction error, seconds to quantise)."""
    target = w + delta  # (out, in)
    out = {}
    for method in METHODS:
        t0 = time.perf_counter()
        tensors = nf4.quantize(target, "w", method=method, dtype="bfloat16")
        seconds = time.perf_counter() - t0
        q = nf4.dequantize(tensors, "w")  # (out, in)
        rec = float((q - target).norm() / target.norm())
        out[method] = (nf4.delta_error(w, delta, q), rec, seconds)
        del tensors, q
    return out


def llama_dir(size: int, root: Path) -> Path:
    """A one-layer Llama whose q_proj is size×size (Gaussian init, std 0.02), saved in fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32, hidden_size=size, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=max(1, size // 128), num_key_value_heads=1,
        tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    return root / "base"


def load_nf4(path: Path) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=qc, device_map="cpu", dtype=torch.float32
        )


def dequant_f32(weight: Any) -> torch.Tensor:
    import copy

    from bitsandbytes.functional import dequantize_4bit

    qs = copy.copy(weight.quant_state)
    qs.dtype = torch.float32
    return dequantize_4bit(weight.data, qs)


def peft_merge(path: Path, b: torch.Tensor, a: torch.Tensor) -> tuple[Any, Any, Any]:
    """(W, ΔW, merged) for q_proj: PEFT LoRA with our factors, merge_and_unload into NF4."""
    from peft import LoraConfig, get_peft_model

    model = load_nf4(path)
    cfg = LoraConfig(r=a.shape[0], lora_alpha=a.shape[0], target_modules=["q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, cfg)
        layer = pm.base_model.model.model.layers[0].self_attn.q_proj
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
            w = dequant_f32(layer.get_base_layer().weight)
            delta = layer.get_delta_weight("default").float()
            merged = pm.merge_and_unload()
    return w, delta, dequant_f32(merged.model.layers[0].self_attn.q_proj.weight)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.005, 0.01, 0.05])
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = None if args.no_peft else llama_dir(args.size, Path(tmp))
        torch.manual_seed(1)
        w16 = (torch.randn(args.size, args.size) * 0.02).bfloat16().float()  # (size, size)
        w_nf4 = None
        if base is not None:
            w_q = dequant_f32(load_nf4(base).model.layers[0].self_attn.q_proj.weight)
        for i, ratio in enumerate(args.ratios):
            if base is not None:
                b, a = low_rank_delta(w_q, args.rank, ratio, seed=10 + i)
                w_nf4, delta, merged = peft_merge(base, b, a)
                peft_err = nf4.delta_error(w_nf4, delta, merged)
                peft_rec = float((merged - w_nf4 - delta).norm() / (w_nf4 + delta).norm())
            else:
                if w_nf4 is None:
                    w0 = torch.randn(args.size, args.size) * 0.02
                    w_nf4 = nf4.dequantize(nf4.quantize(w0, "w"), "w")
                b, a = low_rank_delta(w_nf4, args.rank, ratio, seed=10 + i)
                delta = b @ a  # (size, size)
                peft_err = peft_rec = None
            rows.append(("NF4 (QLoRA)", ratio, measure(w_nf4, delta), peft_err, peft_rec))
            b, a = low_rank_delta(w16, args.rank, ratio, seed=20 + i)
            rows.append(("bf16", ratio, measure(w16, b @ a), None, None))

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.2f}%"

    cpu = platform.processor() or platform.machine()
    print(
        f"NF4 re-quantisation of W + ΔW: {args.size}×{args.size} Gaussian W (std 0.02), "
        f"rank-{args.rank} ΔW, blocksize 64, double quantisation; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {cpu}\n"
    )
    print(
        "| base W | ‖ΔW‖/‖W‖ | delta error absmax | delta error optimal | delta error PEFT "
        "merge | recon. error absmax | recon. error optimal | recon. error PEFT | "
        "time absmax | time optimal |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, ratio, m, peft_err, peft_rec in rows:
        (da, ra, ta), (do, ro, to) = m["absmax"], m["optimal"]
        print(
            f"| {kind} | {pct(ratio)} | {pct(da)} | {pct(do)} | {pct(peft_err)} | {pct(ra)} | "
            f"{pct(ro)} | {pct(peft_rec)} | {ta:.2f} s | {to:.2f} s |"
        )


if __name__ == "__main__":
    main()
