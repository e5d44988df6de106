"""The compiled merge kernel (``adapterctl_fused._fused``): its sums against float64 math, its
roundings bit for bit against adapterctl's NumPy engine (``floats.round_bf16``, NumPy's float16
cast: torch's, see adapterctl's test_floats), its overflow count, its refusals of malformed
buffers, and the dispatch table (where it pays). That the install built it: adapterctl's
tests/test_merge_cpu.py."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from adapterctl import floats
from adapterctl.merge import numpy_engine, rounding
from adapterctl_fused import FusedKernel

# The kernel's dtypes as NumPy holds them: bfloat16 as its bits (NumPy has no bfloat16).
DTYPES = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}
CODES = {"bfloat16": 0, "float16": 1, "float32": 2}
PAIRS = list(itertools.product(DTYPES, DTYPES))
# (mantissa bits, exponent of the smallest normal value)
PRECISION = {"bfloat16": (7, -126), "float16": (10, -14), "float32": (23, -126)}

fused = pytest.importorskip("adapterctl_fused._fused", reason="built without a C compiler")
KERNEL = numpy_engine.Kernel(FusedKernel(), fused, fused.ISAS[0])


def _tiles(right: np.ndarray) -> np.ndarray:
    """``right`` (r, cols) in the kernel's tiles, as the engine passes it."""
    return numpy_engine._right_tiles(np.asarray(right, np.float64), KERNEL)


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a.view(np.float32)


def _round(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``x`` rounded into ``dtype`` as held (DTYPES): the NumPy engine's rounding."""
    x = np.asarray(x, np.float32)
    if dtype == "bfloat16":
        return floats.round_bf16(x)
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(DTYPES[dtype])


def _widen(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a``, held as DTYPES[dtype], as float32 (exactly)."""
    return floats.widen_bf16(a) if dtype == "bfloat16" else a.astype(np.float32)


def _run(
    base: np.ndarray,
    base_dtype: str,
    left: np.ndarray,
    right: np.ndarray,
    out_dtype: str,
    isa: str | None = None,
    noted: list[np.ndarray] | None = None,
    float32_sums: bool = True,
) -> tuple[np.ndarray, int]:
    """out = round(W + L·R) by the kernel; the flat indices it notes for settling go to
    ``noted`` (none may be lost: the buffer holds every element). 16-bit outputs take the
    float32 sums as the engine passes them, unless ``float32_sums`` is False (float64)."""
    if "float16" in (base_dtype, out_dtype) and not fused.FLOAT16:
        pytest.skip("built by a compiler without _Float16: float16 merges use NumPy")
    rows, cols = base.shape
    out = np.empty((rows, cols), DTYPES[out_dtype])
    left = np.ascontiguousarray(left, np.float64)
    right = np.asarray(right, np.float64)
    thr, _ = rounding.row_bounds(left, right)
    suspects = np.empty(max(1, rows * cols), np.int64)
    tiles = _tiles(right)
    fast = numpy_engine.float32_inputs(left, right, tiles) if float32_sums else ()
    inf, n = fused.addmm_round(
        _bits(out), _bits(base), left, tiles, rows, cols, right.shape[0],
        CODES[base_dtype], CODES[out_dtype], isa, thr, suspects, *fast,
    )  # fmt: skip
    assert n <= suspects.size
    if noted is not None:
        noted.append(suspects[:n].copy())
    return out, inf


def _patterns(base_dtype: str) -> np.ndarray:
    """Every class of value of ``base_dtype``: random bit patterns, the values halfway between
    two bfloat16 / float16 neighbours (ties), subnormals, extremes, ±0, ±inf, NaNs."""
    rng = np.random.default_rng(1)
    if base_dtype == "float32":
        bits = rng.integers(0, 2**32, size=60_000, dtype=np.uint64).astype(np.uint32)
        bf16_ties = (bits[:5000] & 0xFFFF0000) | 0x8000
        f16_ties = (bits[5000:10000] & 0xFFFFE000) | 0x1000
        special = np.array(
            [
                0x7F800000,
                0xFF800000,
                0x7FC00000,
                0xFFC00001,
                0x7F800001,
                0x00000001,
                0x80008000,
                0x00018000,
                0x7F7FFFFF,
                0xFF7FFFFF,
                0x80000000,
                0,
                0x477FF000,
                0x477FEFFF,
            ],
            dtype=np.uint32,
        )
        return np.concatenate([bits, bf16_ties, f16_ties, special]).view(np.float32)
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16)  # all 65536 values
    return every.view(DTYPES[base_dtype])  # bfloat16: held as these bits


# Every vector width this CPU runs (AVX-512 with and without BF16, AVX2, generic on x86-64):
# each is its own code.
ISAS = pytest.mark.parametrize("isa", fused.ISAS)


def test_the_widest_vectors_run_by_default() -> None:
    assert fused.ISAS[-1] == "generic"
    if os.uname().machine == "x86_64":
        assert set(fused.ISAS) <= {"avx512bf16", "avx512", "avx2", "generic"}
        flags = ""
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as fh:
                flags = fh.read()
        if " avx2 " in flags and " fma " in flags and " f16c " in flags:
            assert "avx2" in fused.ISAS
        if " avx512bw " in flags and " avx512vl " in flags and " avx512dq " in flags:
            assert "avx512" in fused.ISAS
            # the BF16 build where the CPU has it (and the compiler could build it)
            assert fused.ISAS[0] == ("avx512bf16" if " avx512_bf16 " in flags else "avx512")
    with pytest.raises(ValueError, match="cannot run isa"):
        fused.addmm_round(bytearray(4), bytes(4), b"", b"", 1, 1, 0, 2, 2, "avx1024")


@ISAS
@pytest.mark.parametrize(("base_dtype", "out_dtype"), PAIRS)
def test_conversions_are_the_reference_roundings(base_dtype: str, out_dtype: str, isa: str) -> None:
    """With rank 0 the kernel only widens and rounds: bit for bit what the NumPy engine does
    (``floats.round_bf16``, NumPy's float16 cast), which is what torch does; a NaN stays a NaN
    of the same sign, rounded into bfloat16 to the very bits ``round_bf16`` gives."""
    values = _patterns(base_dtype)
    cols = 37  # whole 32-column tiles and a scalar tail
    values = values[: values.size // cols * cols].reshape(-1, cols)
    ours, _ = _run(
        values, base_dtype, np.empty((len(values), 0)), np.empty((0, cols)), out_dtype, isa
    )
    wide = _widen(values, base_dtype)
    ref = _round(wide, out_dtype)
    nan = np.isnan(wide)
    assert np.array_equal(_bits(ours)[~nan], _bits(ref)[~nan])
    got = _widen(ours, out_dtype)[nan]
    assert np.isnan(got).all()
    assert np.array_equal(np.signbit(got), np.signbit(wide[nan]))
    if out_dtype == "bfloat16":  # NaNs too: NumPy and kernel merges write the same bytes
        assert np.array_equal(ours, ref)


def _ulp(x: np.ndarray, dtype: str) -> np.ndarray:
    """The spacing of ``dtype`` at |x| (float64), for normal and subnormal values alike."""
    nmant, min_exp = PRECISION[dtype]
    exp = np.floor(np.log2(np.maximum(np.abs(x), 2.0**min_exp)))
    return np.exp2(exp - nmant)


@ISAS
@pytest.mark.parametrize(("base_dtype", "out_dtype"), PAIRS)
@pytest.mark.parametrize(
    ("rows", "cols", "rank"),
    [
        *[(1, 1, 1), (3, 31, 2), (4, 32, 16), (5, 33, 3), (7, 100, 16), (9, 64, 1)],
        (13, 97, 40),
        (6, 4200, 70),  # two panels of columns (1 MiB of `right` in the first), a short one
    ],
)
def test_sums_are_float64_math_rounded_once(
    base_dtype: str, out_dtype: str, rows: int, cols: int, rank: int, isa: str
) -> None:
    """W + L·R summed in float64: within half an output ulp plus float64 noise of the exact
    sum, and the correct rounding of the float64 sum wherever the kernel noted nothing to
    settle, for tiles of 1, 2 or 4 rows cut short, column tails, panels of columns and ranks
    from 1 to 70."""
    rng = np.random.default_rng(rows * 1000 + cols + rank)
    base = _round(rng.standard_normal((rows, cols)) * 0.5, base_dtype)
    left = rng.standard_normal((rows, rank)).astype(np.float32)
    right = (rng.standard_normal((rank, cols)) * 0.05).astype(np.float32)
    noted: list[np.ndarray] = []
    ours, inf = _run(base, base_dtype, left, right, out_dtype, isa, noted)
    terms = left.astype(np.float64)[:, :, None] * right.astype(np.float64)[None]  # (rows, r, c)
    wide = _widen(base, base_dtype).astype(np.float64)
    exact = wide + terms.sum(axis=1)
    noise = (rank + 2) * np.finfo(np.float64).eps * (np.abs(wide) + np.abs(terms).sum(axis=1))
    keep = np.ones(exact.shape, bool)  # the noted values are settled by the engine after
    keep.reshape(-1)[noted[0]] = False
    err = np.abs(_widen(ours, out_dtype).astype(np.float64) - exact)
    assert (err <= 0.5 * _ulp(exact, out_dtype) + noise)[keep].all()
    assert inf == 0
    if out_dtype != "float32":  # every element not noted is the nearest value of the sum
        fmt = {"bfloat16": "BF16", "float16": "F16"}[out_dtype]
        near = rounding.store(rounding.nearest(exact.reshape(-1), fmt), fmt).reshape(exact.shape)
        assert np.array_equal(_bits(ours)[keep], near.view(_bits(ours).dtype)[keep])


FORMAT = {"bfloat16": "BF16", "float16": "F16"}


@ISAS
@pytest.mark.parametrize("float32_sums", [True, False], ids=["float32-sums", "float64-sums"])
@pytest.mark.parametrize(
    ("base_dtype", "out_dtype"),
    [(b, o) for b in DTYPES for o in ("bfloat16", "float16")],
)
def test_sums_on_or_beside_a_midpoint_round_correctly(
    base_dtype: str, out_dtype: str, float32_sums: bool, isa: str
) -> None:
    """W + L·R built to land on a 16-bit midpoint, or 2⁻³⁰ or 2⁻⁶⁰ of it away (beyond float32,
    and beyond float64, sums), or elsewhere: every value the kernel does not note for
    settling is the correctly rounded exact sum (computed here in rationals), through the
    float32 sums (their flagged vectors summed again in float64) and the float64 ones."""
    rows, cols = 6, 70  # two tiles of columns and a tail
    fmt = FORMAT[out_dtype]
    rng = np.random.default_rng(sum(map(ord, base_dtype + out_dtype)))
    base = _round(rng.standard_normal((rows, cols)) * 0.5, base_dtype)
    w = _widen(base, base_dtype).astype(np.float64)
    y = w + rng.standard_normal((rows, cols)) * 0.01 * np.abs(w)
    r = rounding.nearest(y.reshape(-1), fmt)
    mid = ((r + rounding.neighbours(r, fmt)[1]) / 2).reshape(rows, cols)  # a midpoint near y
    away = rng.choice([0.0, 2.0**-30, -(2.0**-30), 2.0**-60, -(2.0**-60), 0.37], (rows, cols))
    # element (i, j) = L[i, j]·1 + L[i, cols + j]·1: the step to the midpoint, then the offset
    left = np.concatenate([mid - w, away * np.abs(mid)], axis=1)  # (rows, 2·cols)
    right = np.concatenate([np.eye(cols), np.eye(cols)])  # (2·cols, cols)
    noted: list[np.ndarray] = []
    ours, _ = _run(base, base_dtype, left, right, out_dtype, isa, noted, float32_sums)
    settle = np.zeros(rows * cols, bool)
    settle[noted[0]] = True
    if float32_sums:  # summed again in float64, rounded to odd: off the midpoint, not noted
        tiles = np.arange(cols) < cols // 32 * 32  # (the tail's float64 sums round to nearest)
        off = (np.abs(away) == 2.0**-30) & tiles
        assert not (settle.reshape(rows, cols) & off).any()
    for i, j in zip(*np.nonzero(~settle.reshape(rows, cols)), strict=True):
        exact = (
            Fraction(float(w[i, j]))
            + Fraction(float(left[i, j]))
            + Fraction(float(left[i, cols + j]))
        )
        want = rounding.store(np.array([rounding._round_exact(exact, fmt)]), fmt)
        assert _bits(ours)[i, j] == want.view(_bits(ours).dtype)[0], (i, j, away[i, j])


@ISAS
@pytest.mark.parametrize(
    ("out_dtype", "first", "bound"),
    [
        ("bfloat16", 1 + 2.0**-7, 0.0015),  # d = 2⁻⁸ > 0.0015 + |v|·2⁻²³ > |v|·2⁻¹⁰ (lim)
        ("float16", 1 + 2.0**-10, 3.5e-4),  # d = 2⁻¹¹ > 3.5e-4 + |v|·2⁻²³ > |v|·2⁻¹³ (lim)
        ("float16", 2.0**-20, 1e-30),  # a float16 subnormal
        # one float32 step past a midpoint: d = 2⁻²³ > e·c, but not > e·c + |v|·2⁻²³
        ("bfloat16", 1 + 2.0**-8 + 2.0**-23, 6e-8),
        ("float16", 1 + 2.0**-11 + 2.0**-23, 6e-8),
    ],
)
def test_float32_sums_flag_what_they_cannot_prove(
    out_dtype: str, first: float, bound: float, isa: str
) -> None:
    """A float32 sum just past a power of two, whose error bound e·c is below the distance
    to its nearest midpoint above but could reach the one below it, is summed again (and so
    is a float16 subnormal); values the bound proves are not. A threshold of +inf makes every
    lane of a vector summed again show up among the noted values."""
    if not fused.FLOAT16 and out_dtype == "float16":
        pytest.skip("built by a compiler without _Float16")
    rows, cols = 2, 32
    base = np.full((rows, cols), 3.0, np.float32)  # 3 ± half a step: far from both bounds
    base[0, 0] = first
    left, right = np.zeros((rows, 1)), _tiles(np.zeros((1, cols)))
    fast = (
        np.zeros((rows, 1), np.float32), right.astype(np.float32),
        np.full(rows, bound, np.float32), np.ones(cols, np.float32),
    )  # fmt: skip
    out = np.empty((rows, cols), DTYPES[out_dtype])
    suspects = np.empty(rows * cols, np.int64)
    thr = np.full(rows, np.inf, np.float32)
    _, n = fused.addmm_round(
        _bits(out), base, left, right, rows, cols, 1, CODES["float32"], CODES[out_dtype], isa,
        thr, suspects, *fast,
    )  # fmt: skip
    noted = set(suspects[:n].tolist())
    assert 0 in noted
    assert not noted & set(range(cols, rows * cols))  # row 1: proven, never summed again
    assert np.array_equal(_bits(out), _bits(_round(base, out_dtype)))


@ISAS
@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_float16_overflow_is_counted(base_dtype: str, isa: str) -> None:
    """Finite sums beyond float16's range are counted; ±inf and NaN inputs are not."""
    row = np.array([7e4, -7e4, 1.0, np.inf, np.nan, 65504.0, 65520.0, -1e5], np.float32)
    base = _round(np.tile(row, (3, 5)), base_dtype)  # (3, 40): tile and tail
    out, inf = _run(base, base_dtype, np.zeros((3, 1)), np.zeros((1, 40)), "float16", isa)
    wide = _widen(base, base_dtype)  # in bfloat16 65504 is 65536: it overflows as well
    over = np.isfinite(wide) & (np.abs(wide) >= 65520)  # 65520 is the tie that rounds up
    assert inf == over.sum() == 3 * 5 * (4 if base_dtype == "float32" else 5)
    assert np.array_equal(np.isinf(out.astype(np.float32)), over | np.isinf(wide))


def test_float16_without_compiler_support_is_refused() -> None:
    """A build without _Float16 refuses float16 (the engine then uses NumPy for it)."""
    if fused.FLOAT16:
        pytest.skip("this build has _Float16")
    with pytest.raises(NotImplementedError, match="float16 not supported"):
        fused.addmm_round(bytearray(2), bytes(2), bytes(0), bytes(0), 1, 1, 0, 1, 1)
    assert numpy_engine._kernel_dtype("F16", "F16", KERNEL) is None


def test_malformed_buffers_are_refused() -> None:
    base = np.zeros((4, 8), np.float32)
    left = np.zeros((4, 2), np.float64)
    right = _tiles(np.zeros((2, 8), np.float32))  # (1, 2, 32) float64: 512 bytes
    out = np.zeros((4, 8), np.float32)
    assert fused.addmm_round(out, base, left, right, 4, 8, 2, 2, 2) == (0, 0)
    with pytest.raises(ValueError, match="out holds 128 bytes, expected 160"):
        fused.addmm_round(out, base, left, right, 5, 8, 2, 2, 2)
    with pytest.raises(ValueError, match="base holds 128 bytes, expected 64"):
        fused.addmm_round(np.zeros(32, np.uint16), base, left, right, 4, 8, 2, 0, 0)
    with pytest.raises(ValueError, match="left holds 64 bytes, expected 96"):
        fused.addmm_round(out, base, left, right, 4, 8, 3, 2, 2)
    with pytest.raises(ValueError, match="right holds 64 bytes, expected 512"):
        fused.addmm_round(out, base, left, np.zeros((2, 8), np.float32), 4, 8, 2, 2, 2)
    bf16 = np.zeros((4, 8), np.uint16)
    with pytest.raises(ValueError, match="16-bit outputs need thr and suspects"):
        fused.addmm_round(bf16, bf16, left, right, 4, 8, 2, 0, 0)
    with pytest.raises(ValueError, match="thr holds 8 bytes, expected 16"):
        fused.addmm_round(
            bf16, bf16, left, right, 4, 8, 2, 0, 0, None, np.zeros(2, np.float32),
            np.zeros(4, np.int64),
        )  # fmt: skip
    with pytest.raises((TypeError, BufferError)):  # a read-only suspects buffer
        fused.addmm_round(
            bf16, bf16, left, right, 4, 8, 2, 0, 0, None, np.zeros(4, np.float32), bytes(32)
        )
    checks = (np.zeros(4, np.float32), np.zeros(32, np.int64))
    fast = [np.zeros((4, 2), np.float32), np.zeros((1, 2, 32), np.float32)]
    fast += [np.ones(4, np.float32), np.ones(32, np.float32)]
    with pytest.raises(ValueError, match="left32, right32, err and cnorm come together"):
        fused.addmm_round(bf16, bf16, left, right, 4, 8, 2, 0, 0, None, *checks, *fast[:3])
    with pytest.raises(ValueError, match="cnorm holds 16 bytes, expected 128"):
        fused.addmm_round(bf16, bf16, left, right, 4, 8, 2, 0, 0, None, *checks, *fast[:3],
                          np.ones(4, np.float32))  # fmt: skip
    for bad in (np.nan, np.inf, -1.0):  # a column norm that bounds nothing
        cnorm = np.ones(32, np.float32)
        cnorm[5] = bad
        with pytest.raises(ValueError, match="cnorm holds"):
            fused.addmm_round(bf16, bf16, left, right, 4, 8, 2, 0, 0, None, *checks, *fast[:3],
                              cnorm)  # fmt: skip
    assert fused.addmm_round(bf16, bf16, left, right, 4, 8, 2, 0, 0, None, *checks, *fast)[0] == 0
    with pytest.raises(ValueError, match="bad shape or dtype code"):
        fused.addmm_round(out, base, left, right, 4, 8, 2, 2, 7)
    with pytest.raises(ValueError, match="bad shape or dtype code"):
        fused.addmm_round(out, base, left, right, -4, 8, 2, 2, 2)
    with pytest.raises(TypeError):  # read-only output
        fused.addmm_round(bytes(128), base, left, right, 4, 8, 2, 2, 2)
    with pytest.raises(ValueError, match="not C-contiguous"):
        fused.addmm_round(out, np.zeros((4, 16), np.float32)[:, ::2], left, right, 4, 8, 2, 2, 2)


@ISAS
@pytest.mark.parametrize(("rows", "cols", "block_rows"), [(13, 97, 4), (9, 64, 1), (5, 33, 40)])
def test_into_a_file_equals_the_kernel_in_memory(
    rows: int, cols: int, block_rows: int, isa: str, tmp_path: pytest.TempPathFactory
) -> None:
    """addmm_round_into writes, block of rows by block of rows at the offset given, exactly
    what addmm_round computes in memory."""
    rng = np.random.default_rng(rows + cols)
    base = _round(rng.standard_normal((rows, cols)), "bfloat16")
    left = rng.standard_normal((rows, 7))
    right = rng.standard_normal((7, cols))
    noted: list[np.ndarray] = []
    ref, _ = _run(base, "bfloat16", left, right, "bfloat16", isa, noted)
    thr, _ = rounding.row_bounds(left, right)
    suspects = np.empty(rows * cols, np.int64)
    path = tmp_path / "out.bin"  # type: ignore[operator]
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, b"head", 0)
        buffer = np.empty(block_rows * cols, np.uint16)
        inf, n = fused.addmm_round_into(
            fd, 4, buffer, _bits(base), left, _tiles(right), rows, cols, 7,
            0, 0, isa, thr, suspects,
        )  # fmt: skip
    finally:
        os.close(fd)
    data = path.read_bytes()  # type: ignore[union-attr]
    assert inf == 0 and data[:4] == b"head"
    assert np.array_equal(np.sort(suspects[:n]), np.sort(noted[0]))
    assert data[4:] == _bits(ref).tobytes()


@pytest.mark.parametrize(("rows", "cols"), [(0, 8), (3, 0)])
def test_into_a_file_writes_nothing_for_an_empty_tensor(rows: int, cols: int) -> None:
    empty = np.zeros(0, np.uint16)
    left = np.zeros((rows, 2), np.float64)
    right = _tiles(np.zeros((2, cols), np.float32))
    thr, noted = np.zeros(rows, np.float32), np.zeros(1, np.int64)
    result = fused.addmm_round_into(-1, 0, empty, empty, left, right, rows, cols, 2, 0, 0, None,
                                    thr, noted)  # fmt: skip
    assert result == (0, 0)


def test_into_a_file_refuses_bad_input(tmp_path: pytest.TempPathFactory) -> None:
    base = np.zeros((4, 8), np.float32)
    left = np.zeros((4, 2), np.float64)
    right = _tiles(np.zeros((2, 8), np.float32))
    buffer = np.zeros(32, np.float32)
    with pytest.raises(OSError) as err:  # a closed file
        fused.addmm_round_into(999_999, 0, buffer, base, left, right, 4, 8, 2, 2, 2)
    assert err.value.errno == 9  # EBADF
    with pytest.raises(ValueError, match="less than a row"):
        fused.addmm_round_into(1, 0, np.zeros(7, np.float32), base, left, right, 4, 8, 2, 2, 2)
    with pytest.raises(ValueError, match="less than a row"):
        fused.addmm_round_into(1, -1, buffer, base, left, right, 4, 8, 2, 2, 2)
    with pytest.raises(ValueError, match="left holds 64 bytes, expected 96"):
        fused.addmm_round_into(1, 0, buffer, base, left, right, 4, 8, 3, 2, 2)
    with pytest.raises(TypeError):  # a read-only buffer
        fused.addmm_round_into(1, 0, bytes(128), base, left, right, 4, 8, 2, 2, 2)


@pytest.mark.parametrize(
    ("isa", "rank", "cols", "pays"),
    [
        ("avx512bf16", 16, 4096, True),  # the AVX-512 code, its bfloat16 stores by the CPU
        ("avx512", 16, 4096, True),  # measured 5-5.8x faster than NumPy
        ("avx512", 64, 11008, True),
        ("avx512", 128, 4096, True),  # measured 1.5x
        ("avx512", 256, 4096, True),  # measured 1.1-1.25x
        ("avx2", 64, 4096, True),  # measured 1.1-1.3x
        ("avx2", 128, 4096, False),  # measured 0.75x: NumPy wins
        ("generic", 16, 4096, True),  # measured 2.2x
        ("generic", 64, 4096, False),  # measured 0.7x
        ("generic", 256, 11008, False),
    ],
)
def test_the_kernel_runs_only_where_it_was_measured_faster(
    isa: str, rank: int, cols: int, pays: bool
) -> None:
    """The dispatch table follows bench/kernel.py's measurements (RESULTS.md)."""
    assert FusedKernel().pays(isa, rank, cols) is pays
    assert numpy_engine.Kernel(FusedKernel(), fused, isa).pays(rank, cols) is pays


def test_the_plugin_registers_the_kernel_with_adapterctl() -> None:
    """Installed, the plugin is found through adapterctl's entry points, and loading it does not
    import the compiled module until a merge asks for it."""
    code = (
        "import sys; from adapterctl.plugins import collect; "
        "ks = collect('register_merge_kernels'); "
        "print([k.name for k in ks], 'adapterctl_fused._fused' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "['fused'] False", out.stderr


def test_plugins_lists_the_kernel() -> None:
    code = "from adapterctl.cli import main; main()"
    out = subprocess.run(
        [sys.executable, "-c", code, "plugins", "--json"], capture_output=True, text=True
    )
    (kernel,) = json.loads(out.stdout)["kernels"]
    assert kernel["name"] == "fused" and kernel["built"] and kernel["widths"] == list(fused.ISAS)


@ISAS
@pytest.mark.parametrize("out_dtype", ["bfloat16", "float16"])
def test_overflow_is_counted_among_finite_values(out_dtype: str, isa: str) -> None:
    """Vectors of finite sums where a few lanes round to ±inf: counted, and stored as ±inf
    (the float32 sums' proof leaves overflows to the full store); the largest float32 that
    rounds to a finite value stays finite."""
    big = np.float32(3.4e38 if out_dtype == "bfloat16" else 7e4)  # rounds to inf, no tie
    top = 0x7F7F7FFF if out_dtype == "bfloat16" else 0x477FEFFF  # float16: below 65520, a tie
    near = np.uint32(top).view(np.float32)
    base = np.full((4, 64), 1.5, np.float32)
    base[0, 3], base[1, 40], base[3, 17] = big, -big, near
    out, inf = _run(base, "float32", np.zeros((4, 1)), np.zeros((1, 64)), out_dtype, isa)
    wide = out.astype(np.float32) if out_dtype == "float16" else floats.widen_bf16(out)
    assert inf == 2
    assert np.array_equal(np.isinf(wide), np.isin(np.arange(base.size), [3, 104]).reshape(4, 64))


@ISAS
def test_bfloat16_overflow_is_counted(isa: str) -> None:
    """Finite float32 sums past bfloat16's largest value round to ±inf and are counted."""
    row = np.array([3.4e38, -3.4e38, 1.0, np.inf, 3.3e38, -3.39e38, np.nan, 2.0], np.float32)
    base = np.tile(row, (3, 5))  # (3, 40): tile and tail
    out, inf = _run(base, "float32", np.zeros((3, 1)), np.zeros((1, 40)), "bfloat16", isa)
    over = np.isfinite(base) & np.isinf(floats.widen_bf16(out))
    assert inf == over.sum() == 3 * 5 * 2
