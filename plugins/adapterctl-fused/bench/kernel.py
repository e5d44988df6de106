"""Benchmark: the merge's compiled kernel against the NumPy path it replaces, per element.

For Llama-7B weight shapes (4096 x 4096, 4096 x 11008, 11008 x 4096) in bf16 and ranks 16 to
256 (several adapters merged at once add their ranks), times one core merging the whole
weight in the engine's row chunks: the fused kernel (`adapterctl_fused._fused`: L·R summed in
float32, the base added, the error-bound test, the few unproven vectors summed again in
float64, rounded, one pass) in each vector width the CPU runs (AVX-512, AVX2, generic: 16, 8
or 4 values) as the engine runs it (float32 sums up to rank FLOAT32_RANK, float64 above), the
widest also the other way, and NumPy's float64 `matmul` + widening add + roundings + the
midpoint test (`adapterctl.merge.rounding`; bfloat16 held as its bits), all into a bf16
output, OpenBLAS on one thread. Reports ns per merged element (best of --repeat) and NumPy's
time over the widest kernel's; the FMAs alone need rank / 16 cycles per element at one
16-lane float32 FMA per cycle.

    python plugins/adapterctl-fused/bench/kernel.py --repeat 3
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from adapterctl.floats import round_bf16, widen_bf16
from adapterctl.merge import numpy_engine, rounding

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
RANKS = [16, 64, 128, 256]


def _best(fn: Callable[[], None], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    widest = numpy_engine.choose_kernel("auto")
    if widest is None:
        raise SystemExit("no compiled merge kernel: pip install -e plugins/adapterctl-fused")
    rng = np.random.default_rng(0)
    isas = list(widest.module.ISAS)
    kernels = {isa: numpy_engine.Kernel(widest.plugin, widest.module, isa) for isa in isas}
    print(
        "| weight | rank | "
        + " | ".join(f"fused {isa} ns/element" for isa in isas)
        + f" | fused {isas[0]}, the other sums | NumPy ns/element | NumPy ÷ fused |"
    )
    print("|---|---:|" + "---:|" * (len(isas) + 3))
    for rows, cols in SHAPES:
        w = round_bf16(rng.standard_normal((rows, cols), dtype=np.float32) * 0.02)  # bf16 bits
        for rank in RANKS:
            left = rng.standard_normal((rows, rank)) * 0.01  # float64, as the engine passes it
            right = rng.standard_normal((rank, cols)) * 0.01
            tiles = numpy_engine._right_tiles(right, widest)
            chunks = numpy_engine.row_chunks(rows, cols, widest)
            thr, _ = rounding.row_bounds(left, right)
            out = np.empty((rows, cols), np.uint16)
            noted = np.empty(1 << 16, np.int64)

            f32 = numpy_engine.float32_inputs(left, right, tiles)  # left32 ... right_exact

            def fused(
                isa: str, float32_sums: bool = True, w=w, left=left, tiles=tiles,
                chunks=chunks, thr=thr, out=out, cols=cols, rank=rank, noted=noted, f32=f32,
            ) -> None:  # fmt: skip
                for r0, r1 in chunks:
                    fast = (f32[0][r0:r1], f32[1], f32[2][r0:r1], *f32[3:]) if float32_sums else ()
                    kernels[isa].module.addmm_round(
                        out[r0:r1], w[r0:r1], left[r0:r1], tiles, r1 - r0, cols, rank, 0, 0,
                        isa, thr[r0:r1], noted, *fast,
                    )  # fmt: skip

            def numpy_path(w=w, left=left, right=right, chunks=chunks, thr=thr) -> None:
                # the NumPy engine's steps: float64 sums, float32, bfloat16, the midpoint test
                for r0, r1 in chunks:
                    x = left[r0:r1] @ right
                    x += widen_bf16(w[r0:r1])
                    s = x.astype(np.float32)
                    round_bf16(s)
                    np.flatnonzero(rounding.suspect_mask(s, s.view(np.int32), thr[r0:r1], "BF16"))

            with threadpool_limits(limits=1, user_api="blas"):
                fast = rank <= numpy_engine.FLOAT32_RANK  # as the engine chooses
                t_fused = [
                    _best(lambda isa=isa, fast=fast: fused(isa, fast), args.repeat) / w.size * 1e9
                    for isa in isas
                ]
                t_f64 = (
                    _best(lambda fast=fast: fused(isas[0], not fast), args.repeat) / w.size * 1e9
                )
                t_numpy = _best(numpy_path, args.repeat) / w.size * 1e9
            times = [*t_fused, t_f64, t_numpy, t_numpy / t_fused[0]]
            cells = " | ".join(f"{t:.2f}" for t in times)
            print(f"| {rows} × {cols} | {rank} | {cells} |")


if __name__ == "__main__":
    main()
