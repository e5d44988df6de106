"""Types of the compiled merge kernel (``_fused.c``)."""

from typing_extensions import Buffer

DTYPES: tuple[str, str, str]  # the dtype numbers' names: 0 bfloat16, 1 float16, 2 float32
FLOAT16: int  # 1 where the compiler has _Float16 (float16 in or out), else 0
ISAS: tuple[str, ...]  # the vector widths this CPU runs, widest first: "avx512", "avx2", "generic"
TILE_ROWS: int  # rows merged at once: the engine's chunks hold a multiple of them
TILE_COLS: int  # `right` comes in tiles of this many columns: (ceil(cols / T), rank, T)
FACTORS_FLOAT64: int  # 1: left and right are float64
FLOAT32_SUMS: int  # 2: 16-bit outputs take the float32 fast path's inputs (left32 ... right_exact)

def addmm_round(
    out: Buffer,
    base: Buffer,
    left: Buffer,
    right: Buffer,
    rows: int,
    cols: int,
    rank: int,
    base_dtype: int,
    out_dtype: int,
    isa: str | None = None,
    thr: Buffer | None = None,
    suspects: Buffer | None = None,
    left32: Buffer | None = None,
    right32: Buffer | None = None,
    err: Buffer | None = None,
    cnorm: Buffer | None = None,
    right_exact: bool = False,
    /,
) -> tuple[int, int]: ...
def addmm_round_into(
    fd: int,
    offset: int,
    buffer: Buffer,
    base: Buffer,
    left: Buffer,
    right: Buffer,
    rows: int,
    cols: int,
    rank: int,
    base_dtype: int,
    out_dtype: int,
    isa: str | None = None,
    thr: Buffer | None = None,
    suspects: Buffer | None = None,
    left32: Buffer | None = None,
    right32: Buffer | None = None,
    err: Buffer | None = None,
    cnorm: Buffer | None = None,
    right_exact: bool = False,
    /,
) -> tuple[int, int]: ...
