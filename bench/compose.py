"""Benchmark: ``adapterctl compose`` (svd, ties) vs PEFT's ``add_weighted_adapter`` (svd,
ties_svd) on Llama-7B-shaped modules, one module at a time.

For each shape (q_proj 4096×4096, up_proj 11008×4096) two random r=16 adapters (the same
factors for both tools, alpha = r) are combined with weights 0.7 and 0.3 into rank 16:

- ``svd``: the best rank-16 approximation of 0.7·ΔW₁ + 0.3·ΔW₂ (a rank-32 matrix). The error
  is ‖result − exact sum‖_F / ‖exact sum‖_F, computed from stacked factors in float64; the
  optimum (Eckart–Young) is the tail of the exact sum's spectrum.
- ``ties`` (density 0.5, PEFT's convention so both compute the same dense matrix M): the
  error is ‖result − M‖_F / ‖M‖_F. PEFT's dense SVD gives the optimal truncation, ours a
  randomized one; both report how little of a TIES result fits in rank 16.

Times are wall-clock per module, end to end. Ours: median of ``--rounds`` calls after one
untimed warm-up call (reading the adapters, validating them, composing). PEFT: one
``add_weighted_adapter`` call on a one-module model (its dense SVD dominates; too slow to
repeat).

    python bench/compose.py --workdir /tmp/adapterctl-bench-compose --rounds 5
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

SHAPES = {"q_proj": (4096, 4096), "up_proj": (11008, 4096)}  # (out, in)
RANK, WEIGHTS, DENSITY = 16, [0.7, 0.3], 0.5


def factors(out_f: int, in_f: int, seed: int) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(RANK, in_f, generator=g) / in_f**0.5  # (r, in)
    b = 0.01 * torch.randn(out_f, RANK, generator=g)  # (out, r)
    return b, a


def write_adapter(path: Path, name: str, b: Any, a: Any) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": RANK, "lora_alpha": RANK, "target_modules": [name]}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    key = f"base_model.model.{name}"
    save_file({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b},
              str(path / "adapter_model.safetensors"))  # fmt: skip
    return path


def peft_model(name: str, shape: tuple[int, int], pairs: list[tuple[Any, Any]]) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Module()
    setattr(model, name, torch.nn.Linear(shape[1], shape[0], bias=False))
    cfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=[name])
    pm = get_peft_model(model, cfg, adapter_name="a")
    pm.add_adapter("b", cfg)
    layer = getattr(pm.base_model.model, name)
    with torch.no_grad():
        for adapter, (b, a) in zip(("a", "b"), pairs, strict=True):
            layer.lora_A[adapter].weight.copy_(a)
            layer.lora_B[adapter].weight.copy_(b)
    return pm


def timed(fn: Any, rounds: int, warmup: bool = False) -> tuple[float, Any]:
    """Median wall time of ``rounds`` calls (after one untimed call with ``warmup``: the
    first call of ours imports and loads plugins)."""
    if warmup:
        fn()
    times, result = [], None
    for _ in range(rounds):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def run(workdir: Path, rounds: int, shapes: list[str], peft_kinds: list[str]) -> dict[str, Any]:
    import torch

    from adapterctl.compose import compose
    from adapterctl.formats import read
    from adapterctl.lowrank import core_svd, difference_norm, stack_factors

    results: dict[str, Any] = {}
    for name in shapes:
        shape = SHAPES[name]
        pairs = [factors(*shape, seed=s) for s in (1, 2)]
        paths = [write_adapter(workdir / f"{name}-{i}", name, *p) for i, p in enumerate(pairs)]
        row: dict[str, Any] = {"shape": list(shape)}

        # svd: exact sum as stacked factors (float64), its optimum from the small core.
        b64, a64 = stack_factors(
            [(b.double(), a.double(), w) for (b, a), w in zip(pairs, WEIGHTS, strict=True)]
        )
        s = core_svd(b64, a64).s
        norm = float(s.square().sum().sqrt())
        row["svd_optimal_error"] = float(s[RANK:].square().sum().sqrt()) / norm

        def ours(method: str, paths: list[Path] = paths, **opts: Any) -> Any:
            return compose([read(p) for p in paths], WEIGHTS, method, opts, device="cpu")

        sec, res = timed(lambda: ours("svd", rank=RANK), rounds, warmup=True)
        m = res.adapter.modules[name]
        err = difference_norm(m.B(torch.float64), m.A(torch.float64), b64, a64) / norm
        row["ours_svd"] = {"seconds": sec, "error": err}

        sec, res = timed(lambda: ours("ties", rank=RANK, density=DENSITY, convention="peft"),
                         rounds, warmup=True)  # fmt: skip
        m = res.adapter.modules[name]
        deltas = [b @ a for b, a in pairs]  # (out, in) float32
        from adapterctl.methods import get_method, parse_options

        ties = get_method("ties")
        dense = ties.combine_dense(
            deltas, WEIGHTS, parse_options(ties, {"density": DENSITY, "convention": "peft"})
        )
        del deltas
        dnorm = float(torch.linalg.matrix_norm(dense))
        err = float(torch.linalg.matrix_norm(dense - m.B() @ m.A())) / dnorm
        row["ours_ties"] = {"seconds": sec, "error": err, "energy_kept": res.report.energy_kept}

        for kind in peft_kinds:
            pm = peft_model(name, shape, pairs)
            kw: dict[str, Any] = {"svd_rank": RANK}
            if kind == "ties_svd":
                kw.update(density=DENSITY, majority_sign_method="total")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sec, _ = timed(
                    lambda pm=pm, kw=kw, kind=kind: pm.add_weighted_adapter(
                        ["a", "b"], WEIGHTS, f"mix-{kind}", combination_type=kind, **kw
                    ),
                    1,
                )
            layer = getattr(pm.base_model.model, name)
            key = f"mix-{kind}"
            with torch.no_grad():
                pb = layer.lora_B[key].weight.double() * layer.scaling[key]  # (out, r)
                pa = layer.lora_A[key].weight.double()  # (r, in)
            if kind == "svd":
                err = difference_norm(pb, pa, b64, a64) / norm
            else:
                err = float(torch.linalg.matrix_norm(dense - (pb @ pa).float())) / dnorm
            row[f"peft_{kind}"] = {"seconds": sec, "error": err}
            del pm
        del dense
        results[name] = row
        print(json.dumps({name: row}, indent=2), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/adapterctl-bench-compose"))
    parser.add_argument("--rounds", type=int, default=5, help="Rounds of ours (median).")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--peft", nargs="*", default=["svd", "ties_svd"],
                        choices=["svd", "ties_svd"], help="PEFT combinations to time.")  # fmt: skip
    args = parser.parse_args()
    import torch

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    results = run(args.workdir, args.rounds, args.shapes, args.peft)
    summary = {
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "rank": RANK,
        "weights": WEIGHTS,
        "density": DENSITY,
        "results": results,
    }
    print(json.dumps(summary, indent=2))
    for name, row in results.items():
        print(f"\n{name} {row['shape'][0]}×{row['shape'][1]}")
        print(f"  svd optimum (Eckart–Young) error {row['svd_optimal_error']:.4g}")
        for key in ("ours_svd", "peft_svd", "ours_ties", "peft_ties_svd"):
            if key in row:
                r = row[key]
                print(f"  {key:<14} {r['seconds']:9.3f} s   error {r['error']:.4g}")
        if "ours_svd" in row and "peft_svd" in row:
            speedup = row["peft_svd"]["seconds"] / row["ours_svd"]["seconds"]
            print(f"  svd speed-up ×{speedup:.0f} ({math.log10(speedup):.1f} orders of magnitude)")


if __name__ == "__main__":
    main()
