"""bfloat16, float16 and float8 as bit arithmetic (``adapterctl.floats``), against torch.

Rounding float32 -> bfloat16 is checked bit for bit on every rounding boundary of every
finite bfloat16 (the exact halfway points and their float32 neighbours, both signs), on the
special values and on a few million random float32 bit patterns; NumPy's float32 -> float16
cast the same way. Widening is checked exhaustively: all 65536 bfloat16 and all 256 patterns
of each float8.

torch is no oracle for which NaN a rounding gives: on CPUs with AVX2 or AVX-512 it writes
0xFFFF for every NaN, without them 0x7FC0. A NaN must stay a NaN; its bits are
``round_bf16``'s own rule (sign, exponent and payload's top bits, quiet bit set), the one the
compiled merge kernel follows (test_fused).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from adapterctl import floats
from adapterctl.tensorfile import DTYPE_SIZES, NUMPY_DTYPE_NAMES, numpy_dtype

SIGN = np.uint32(0x80000000)


def _both_signs(bits: np.ndarray) -> np.ndarray:
    bits = bits.astype(np.uint32)
    return np.concatenate([bits, bits | SIGN])


def _torch_bits(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """torch's rounding of float32 ``x`` into ``dtype``, as uint16 bit patterns."""
    return torch.from_numpy(x.copy()).to(dtype).view(torch.int16).numpy().view(np.uint16)


def _random_bits(n: int, seed: int) -> np.ndarray:
    """``n`` float32 bit patterns drawn uniformly from all 2^32: a mix of every kind of value
    (NaNs about 0.4 %, infinities, subnormals, zeros by chance)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)


def _bf16_boundaries() -> np.ndarray:
    """For every finite positive bfloat16 k (subnormals to the largest, even and odd): k
    itself, the exact halfway point to k+1 and the float32 values one ulp either side of it
    (for the largest, k+1 is the overflow: 0x7F7F8000 is where rounding reaches inf), and the
    last float32 before k+1; both signs."""
    k = np.arange(0x7F80, dtype=np.uint32) << 16  # (32640,): every finite positive bf16
    offsets = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    return _both_signs((k[:, None] | offsets).reshape(-1))


def _f16_boundaries() -> np.ndarray:
    """The same for float16 (float32 has room for every halfway point): every finite positive
    float16 h, the midpoint to h+1 (65520 above the largest, 65504: the overflow), the float32
    values one ulp either side, both signs."""
    h = np.arange(0x7C00, dtype=np.int64)
    exp, man = h >> 10, h & 0x3FF

    def value(exp: np.ndarray, man: np.ndarray) -> np.ndarray:
        normal = np.ldexp((1024 + man).astype(np.float64), exp - 25)
        return np.where(exp == 0, np.ldexp(man.astype(np.float64), -24), normal)

    lo = value(exp, man)
    hi = value((h + 1) >> 10, (h + 1) & 0x3FF)  # h = 0x7BFF: exponent 31 reads as 65536
    mid = ((lo + hi) / 2).astype(np.float32)  # exact: 12 significant bits
    assert np.array_equal(mid.astype(np.float64), (lo + hi) / 2)
    below = np.nextafter(mid, np.float32(0))
    above = np.nextafter(mid, np.float32(np.inf))
    values = np.concatenate([lo.astype(np.float32), mid, below, above])
    return _both_signs(values.view(np.uint32))


SPECIAL = _both_signs(
    np.array(
        [
            0x00000000,  # 0
            0x7F800000,  # inf
            0x7F7FFFFF,  # float32 max: rounds to inf in bfloat16
            0x7F7F7FFF,  # the largest float32 that rounds to bf16's max
            0x00000001,  # smallest float32 subnormal
            0x007FFFFF,  # largest float32 subnormal
            0x00008000,  # a subnormal tie (to even: 0)
            0x00018000,  # a subnormal tie (to even: up)
            0x00800000,  # smallest float32 normal
            0x7FC00000,  # quiet NaN
            0x7F800001,  # signalling NaN, lowest payload (the carry would make it inf)
            0x7FBFFFFF,  # signalling NaN, highest payload
            0x7FFFFFFF,  # quiet NaN, all payload bits (the carry would wrap the sign)
            0x7FC12345,
            0x7F80FFFF,  # payload only in the bits rounding drops
            0x7FFF8000,
        ],
        dtype=np.uint32,
    )
)


@pytest.mark.parametrize(
    "bits",
    [_bf16_boundaries(), _f16_boundaries(), SPECIAL, _random_bits(3_000_000, 0)],
    ids=["bf16 boundaries", "f16 boundaries", "special", "random"],
)
def test_round_bf16_is_torchs_rounding(bits: np.ndarray) -> None:
    x = bits.view(np.float32)
    ours = floats.round_bf16(x)
    theirs = _torch_bits(x, torch.bfloat16)
    nan = np.isnan(x)
    assert ours.dtype == np.uint16 and ours.shape == x.shape
    assert np.array_equal(ours[~nan], theirs[~nan])  # ±0, subnormals, ties, overflow to ±inf
    assert np.isnan(floats.widen_bf16(theirs[nan])).all()
    assert np.array_equal(ours[nan], ((bits[nan] >> 16) | 0x40).astype(np.uint16))  # quiet NaN


@pytest.mark.parametrize(
    "bits",
    [_f16_boundaries(), _bf16_boundaries(), SPECIAL, _random_bits(3_000_000, 1)],
    ids=["f16 boundaries", "bf16 boundaries", "special", "random"],
)
def test_numpy_float16_cast_is_torchs_rounding(bits: np.ndarray) -> None:
    """NumPy's astype(float16) rounds to nearest even as torch does, subnormals and overflow
    included; a NaN stays a NaN of its sign (NumPy keeps a signalling NaN signalling, torch
    quiets it: only NaN-ness and sign are compared)."""
    x = bits.view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        ours = x.astype(np.float16)
    theirs = _torch_bits(x, torch.float16)
    nan = np.isnan(x)
    assert np.array_equal(ours.view(np.uint16)[~nan], theirs[~nan])
    assert np.isnan(ours[nan]).all()
    assert np.array_equal(np.signbit(ours[nan]), np.signbit(x[nan]))
    assert np.array_equal(theirs[nan] >> 15, (bits[nan] >> 31).astype(np.uint16))


def test_round_bf16_the_ties_go_to_even() -> None:
    """The halfway points alone, spelt out: up from an odd bfloat16, down onto an even one."""
    k = np.arange(0x7F7F, dtype=np.uint32)  # lower neighbours below the largest finite
    ours = floats.round_bf16(((k << 16) | 0x8000).view(np.float32))
    assert np.array_equal(ours, (k + (k & 1)).astype(np.uint16))
    assert floats.round_bf16(np.array([0x7F7F8000], np.uint32).view(np.float32))[0] == 0x7F80


def test_round_bf16_into_out_in_any_shape() -> None:
    x = _random_bits(3 * 70_001, 2).view(np.float32).reshape(3, 70_001)  # 3 blocks and a tail
    out = np.empty((3, 70_001), np.uint16)
    assert floats.round_bf16(x, out=out) is out
    nan = np.isnan(x)
    assert np.array_equal(out[~nan], _torch_bits(x, torch.bfloat16)[~nan])
    strided = x[:, ::3]  # not contiguous: read through a copy
    assert np.array_equal(floats.round_bf16(strided), floats.round_bf16(strided.copy()))
    scalar = floats.round_bf16(np.array(1.0, np.float32))
    assert scalar.shape == () and scalar == 0x3F80
    assert floats.round_bf16(np.empty((0, 4), np.float32)).shape == (0, 4)


def test_round_bf16_refuses_what_it_cannot_round_once() -> None:
    with pytest.raises(TypeError, match="float32"):
        floats.round_bf16(np.ones(4))  # float64 through float32 would round twice
    x = np.ones(4, np.float32)
    for bad in (np.empty(5, np.uint16), np.empty(4, np.int32), np.empty(8, np.uint16)[::2]):
        with pytest.raises(ValueError, match="C-contiguous uint16"):
            floats.round_bf16(x, out=bad)


def test_round_bf16_from_several_threads_at_once() -> None:
    """The merge's workers round their chunks at the same time: no shared state."""
    parts = [_random_bits(500_000, seed).view(np.float32) for seed in range(10, 16)]
    want = [floats.round_bf16(p) for p in parts]
    got: list[np.ndarray | None] = [None] * len(parts)

    def work(i: int) -> None:
        out = np.empty(parts[i].shape, np.uint16)
        for _ in range(3):
            floats.round_bf16(parts[i], out=out)
        got[i] = out

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))


def test_widen_bf16_is_torchs_for_every_bit_pattern() -> None:
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)  # (65536,)
    want = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    for arg in (bits, bits.view(np.int16)):  # int16 must not sign-extend
        got = floats.widen_bf16(arg)
        assert got.dtype == np.float32 and got.shape == bits.shape
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))  # NaN payloads too
    out = np.full((256, 256), 7.0, np.float32)
    assert floats.widen_bf16(bits.reshape(256, 256), out=out) is out
    assert np.array_equal(out.reshape(-1).view(np.uint32), want.view(np.uint32))
    assert np.array_equal(floats.round_bf16(want)[~np.isnan(want)], bits[~np.isnan(want)])


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"),
    [("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)],
)
def test_widen_f8_is_torchs_for_every_bit_pattern(dtype: str, torch_dtype: torch.dtype) -> None:
    bits = np.arange(256, dtype=np.uint32).astype(np.uint8)
    want = torch.from_numpy(bits).view(torch_dtype).float().numpy()
    got = floats.widen_f8(bits.reshape(16, 16), dtype)
    assert got.dtype == np.float32 and got.shape == (16, 16)
    assert np.array_equal(got.reshape(-1).view(np.uint32), want.view(np.uint32))  # NaNs too
    signed = floats.widen_f8(bits.view(np.int8), dtype)
    assert np.array_equal(signed.view(np.uint32), want.view(np.uint32))
    assert np.isnan(got).sum() == (2 if dtype == "F8_E4M3" else 6)
    assert np.isinf(got).sum() == (0 if dtype == "F8_E4M3" else 2)
    assert np.nanmax(got[np.isfinite(got)]) == (448 if dtype == "F8_E4M3" else 57344)


def test_widen_f8_names_the_float8_dtypes() -> None:
    with pytest.raises(ValueError, match="not a float8 dtype"):
        floats.widen_f8(np.zeros(2, np.uint8), "BF16")


def test_widen_dispatches_on_the_safetensors_name() -> None:
    h = np.array([0x3F80, 0xC000], np.uint16)
    assert np.array_equal(floats.widen(h, "BF16"), [1.0, -2.0])
    assert np.array_equal(floats.widen(np.array([0x38], np.uint8), "F8_E4M3"), [1.0])
    assert np.array_equal(floats.widen(np.array([0x3C], np.uint8), "F8_E5M2"), [1.0])
    for same in (h, h.view(np.float16), np.ones(2, np.float32), np.arange(2)):
        assert floats.widen(same, "U16") is same


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"),
    [
        ("BF16", torch.bfloat16),
        ("F16", torch.float16),
        ("F32", torch.float32),
        ("F64", torch.float64),
        ("F8_E4M3", torch.float8_e4m3fn),
        ("F8_E5M2", torch.float8_e5m2),
    ],
)
def test_eps_is_torchs(dtype: str, torch_dtype: torch.dtype) -> None:
    assert floats.eps(dtype) == torch.finfo(torch_dtype).eps


def test_numpy_dtype_holds_the_missing_floats_as_their_bits() -> None:
    """``numpy_dtype`` is the storage dtype: same bytes per element as safetensors says, the
    floats NumPy lacks as unsigned integers of their width."""
    assert numpy_dtype("BF16") == np.uint16
    assert numpy_dtype("F8_E4M3") == numpy_dtype("F8_E5M2") == np.uint8
    assert numpy_dtype("F16") == np.float16
    for name in NUMPY_DTYPE_NAMES:
        assert numpy_dtype(name).itemsize == DTYPE_SIZES[name], name
