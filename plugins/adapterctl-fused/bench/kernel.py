"""Benchmark: the merge's compiled kernel against the NumPy path it replaces, per element.

For Llama-7B weight shapes (4096 x 4096, 4096 x 11008, 11008 x 4096) in bf16 and ranks 16 to
256 (several adapters merged at once add their ranks), times one core merging the whole
weight in the engine's row chunks: the fused kernel (`adapterctl_fused._fused`: widen, add L·R,
round, one pass), in each vector width the CPU runs (AVX-512, AVX2, generic: 16, 8 or 4
floats), against NumPy's `matmul` + widening add + rounding (`adapterctl.floats`: bfloat16
held as its bits), all into a bf16 output, OpenBLAS on one thread. Reports ns per merged
element (best of --repeat) and NumPy's time over the widest kernel's; the FMAs alone need
rank / 16 cycles per element at one 16-lane FMA per cycle.

    python plugins/adapterctl-fused/bench/kernel.py --repeat 3
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from adapterctl.floats import round_bf16
from adapterctl.merge import numpy_engine

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
        + " | NumPy ns/element | NumPy ÷ fused |"
    )
    print("|---|---:|" + "---:|" * (len(isas) + 2))
    for rows, cols in SHAPES:
        w = round_bf16(rng.standard_normal((rows, cols), dtype=np.float32) * 0.02)  # bf16 bits
        for rank in RANKS:
            left = rng.standard_normal((rows, rank), dtype=np.float32) * 0.01
            right = rng.standard_normal((rank, cols), dtype=np.float32) * 0.01
            tiles = numpy_engine._right_tiles(right, widest)
            chunks = numpy_engine.row_chunks(rows, cols, widest)

            def fused(isa: str, w=w, left=left, tiles=tiles, chunks=chunks) -> None:
                for r0, r1 in chunks:
                    numpy_engine._kernel_rows(
                        w[r0:r1], "BF16", left[r0:r1], tiles, "BF16", kernels[isa]
                    )

            def numpy_path(w=w, left=left, right=right, chunks=chunks) -> None:
                for r0, r1 in chunks:
                    chunk = numpy_engine._numpy_rows(w[r0:r1], "BF16", left[r0:r1], right)
                    numpy_engine._round_rows(chunk, "BF16")

            with threadpool_limits(limits=1, user_api="blas"):
                t_fused = [
                    _best(lambda isa=isa: fused(isa), args.repeat) / w.size * 1e9 for isa in isas
                ]
                t_numpy = _best(numpy_path, args.repeat) / w.size * 1e9
            cells = " | ".join(f"{t:.2f}" for t in [*t_fused, t_numpy, t_numpy / t_fused[0]])
            print(f"| {rows} × {cols} | {rank} | {cells} |")


if __name__ == "__main__":
    main()
