"""Benchmark: how many merged values differ from the correctly rounded exact result.

Builds a random base with one ≥ 50 M-element weight (4096 × 12288 by default) and r=16 LoRA
adapters (factors in bfloat16, scale 2), merges them with every CPU engine (the compiled
kernel, NumPy alone, the torch engine) and with PEFT (``merge_and_unload`` on a one-layer
model holding the same weight), and counts, per output, the values that are not the correctly
rounded value of the exact W + Σ wᵢ·sᵢ·BᵢAᵢ (round to nearest, ties to even).

The reference is independent of adapterctl's code: the products of the bfloat16 factors are
exact in float64, and their sum with W is carried error-free (TwoSum: a float64 sum plus its
exact rounding errors), which decides every value whose distance to a rounding midpoint exceeds
the tiny error left in the compensation; the undecided rest (exact ties, in practice) is
computed in rationals.

    python bench/rounding.py --workdir /tmp/adapterctl-rounding
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

RANK, ALPHA = 16, 32
FORMATS = {"BF16": (8, -126, 127), "F16": (11, -14, 15), "F32": (24, -126, 127)}
FLAGS = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def build(workdir: Path, rows: int, cols: int, base_dtype: str, adapters: int) -> Path:
    """A base folder (config + one Linear weight) and ``adapters`` PEFT adapters."""
    g = torch.Generator().manual_seed(0)
    base = workdir / f"base-{base_dtype}"
    if not (base / "model.safetensors").exists():
        base.mkdir(parents=True, exist_ok=True)
        w = (torch.randn(rows, cols, generator=g) * 0.02).to(TORCH[base_dtype])
        save_file({"proj.weight": w}, base / "model.safetensors", metadata={"format": "pt"})
        (base / "config.json").write_text(json.dumps({"model_type": "bench"}))
    for i in range(adapters):
        ad = workdir / f"adapter{i}"
        if (ad / "adapter_model.safetensors").exists():
            continue
        ad.mkdir(parents=True, exist_ok=True)
        a = (torch.randn(RANK, cols, generator=g) * 0.02).to(torch.bfloat16)
        b = (torch.randn(rows, RANK, generator=g) * 0.02).to(torch.bfloat16)
        save_file(
            {"base_model.model.proj.lora_A.weight": a, "base_model.model.proj.lora_B.weight": b},
            ad / "adapter_model.safetensors",
            metadata={"format": "pt"},
        )
        cfg = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": ["proj"],
               "base_model_name_or_path": str(base), "task_type": None}  # fmt: skip
        (ad / "adapter_config.json").write_text(json.dumps(cfg))
    return base


def two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """s = fl(a + b) and e with a + b = s + e exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def reference(
    w: np.ndarray, factors: list[tuple[float, np.ndarray, np.ndarray]], fmt: str
) -> tuple[np.ndarray, int]:
    """The correctly rounded exact W + Σ c·B·A of rows ``w`` (float64 exact), as float64
    values of ``fmt``, and how many needed rationals."""
    s = w.copy()
    comp = np.zeros_like(w)
    comp2 = np.zeros_like(w)  # the rounding errors of comp's own sums
    for c, b, a in factors:
        for k in range(b.shape[1]):
            p = np.multiply.outer(c * b[:, k], a[k])  # exact: bf16·bf16·(power of two)·(1.5)
            s, e = two_sum(s, p)
            comp, e2 = two_sum(comp, e)
            comp2 += e2
    s, e = two_sum(s, comp)  # x = s + e + comp2 (+ comp2's own rounding)
    e = e + comp2  # exact wherever comp2 is 0
    slack = np.abs(comp2) * 2.0**-40
    p_bits, emin, _ = FORMATS[fmt]
    mag = np.maximum(np.abs(s), 2.0**emin)
    step = np.ldexp(1.0, np.frexp(mag)[1] - p_bits)  # spacing of fmt at |s|
    low = np.floor(s / step) * step
    mid = low + step / 2
    d = (s - mid) + e
    out = np.where(d > 0, low + step, low)
    tie = (d == 0) & (slack == 0)  # exactly on the midpoint: to the even neighbour
    odd = np.fmod(np.abs(low / step), 2) == 1
    out = np.where(tie & odd, low + step, out)
    undecided = np.flatnonzero((np.abs(d) <= slack) & ~tie)
    flat_out = out.reshape(-1)
    for i in undecided:
        r, col = divmod(int(i), w.shape[1])
        x = Fraction(float(w[r, col]))
        for c, b, a in factors:
            x += Fraction(c) * sum(
                (Fraction(float(b[r, k])) * Fraction(float(a[k, col])) for k in range(b.shape[1])),
                Fraction(0),
            )
        lo, st = Fraction(float(low.reshape(-1)[i])), Fraction(float(step.reshape(-1)[i]))
        cands = [lo - st, lo, lo + st, lo + 2 * st]
        best = min(cands, key=lambda v: (abs(v - x), int(v / st) % 2))
        flat_out[i] = float(best)
    return out, len(undecided)


def count_wrong(
    got: torch.Tensor, base: Path, adapters: list[tuple[Path, float]], fmt: str, block: int
) -> tuple[int, int]:
    """(values of ``got`` that differ from the reference, values decided in rationals)."""
    w_all = load_file(base / "model.safetensors")["proj.weight"]
    factors = []
    for path, weight in adapters:
        t = load_file(path / "adapter_model.safetensors")
        b = t["base_model.model.proj.lora_B.weight"].double().numpy()
        a = t["base_model.model.proj.lora_A.weight"].double().numpy()
        factors.append((weight * ALPHA / RANK, b, a))
    wrong = exact = 0
    for r0 in range(0, got.shape[0], block):
        w = w_all[r0 : r0 + block].double().numpy()
        part = [(c, b[r0 : r0 + block], a) for c, b, a in factors]
        ref, n = reference(w, part, fmt)
        ours = got[r0 : r0 + block].double().numpy()
        wrong += int(np.count_nonzero(ours != ref))
        exact += n
    return wrong, exact


def peft_merge(base: Path, adapters: list[tuple[Path, float]], fmt: str) -> torch.Tensor:
    """PEFT's merge of the same weight: a one-layer model, ``merge_and_unload``."""
    from peft import PeftModel

    w = load_file(base / "model.safetensors")["proj.weight"]

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)

    model = One()
    with torch.no_grad():
        model.proj.weight.copy_(w)
    model = model.to(TORCH[fmt])
    pm = PeftModel.from_pretrained(model, str(adapters[0][0]), adapter_name="a0")
    for i, (path, _) in enumerate(adapters[1:], start=1):
        pm.load_adapter(str(path), adapter_name=f"a{i}")
    if len(adapters) > 1:  # PEFT merges each adapter in turn, scaled by its weight
        for i, (_, weight) in enumerate(adapters):
            pm.base_model.model.proj.scaling[f"a{i}"] *= weight
        merged = pm.merge_and_unload(adapter_names=[f"a{i}" for i in range(len(adapters))])
    else:
        merged = pm.merge_and_unload()
    return merged.proj.weight.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/adapterctl-rounding"))
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=12288)
    ap.add_argument("--block", type=int, default=256, help="reference rows per step")
    args = ap.parse_args()
    from adapterctl.merge import merge, numpy_engine

    cases = [  # (label, base dtype, output dtype, adapters with weights)
        ("bf16 → bf16", "BF16", "BF16", [1.0]),
        ("bf16 → fp16", "BF16", "F16", [1.0]),
        ("fp32 → fp32", "F32", "F32", [1.0]),
        ("bf16 → bf16, 2 adapters (0.5, 1.5)", "BF16", "BF16", [0.5, 1.5]),
    ]
    engines = [("fused kernel", "numpy", "auto"), ("NumPy", "numpy", "none"),
               ("torch (CPU)", "torch", None)]  # fmt: skip
    if numpy_engine.choose_kernel("auto") is None:
        engines = engines[1:]
    print(f"weight {args.rows} × {args.cols} = {args.rows * args.cols / 1e6:.1f} M values; "
          f"r={RANK}, bf16 factors, scale {ALPHA / RANK:g}")  # fmt: skip
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {platform.python_version()}")
    print("\n| merge | engine | values not correctly rounded | decided in rationals | s |")
    print("|---|---|---:|---:|---:|")
    for label, base_dtype, fmt, weights in cases:
        base = build(args.workdir, args.rows, args.cols, base_dtype, len(weights))
        adapters = [(args.workdir / f"adapter{i}", wt) for i, wt in enumerate(weights)]
        for name, engine, kernel in engines:
            out = args.workdir / "out"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            merge(base, [p for p, _ in adapters], out, weights=weights, dtype=FLAGS[fmt],
                  engine=engine, kernel=kernel, device="cpu")  # fmt: skip
            took = time.perf_counter() - t0
            got = load_file(out / "model.safetensors")["proj.weight"]
            wrong, exact = count_wrong(got, base, adapters, fmt, args.block)
            print(f"| {label} | {name} | {wrong} | {exact} | {took:.1f} |", flush=True)
        got = peft_merge(base, adapters, fmt)
        wrong, exact = count_wrong(got, base, adapters, fmt, args.block)
        print(f"| {label} | PEFT merge_and_unload | {wrong} | {exact} | |", flush=True)
    shutil.rmtree(args.workdir / "out", ignore_errors=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
