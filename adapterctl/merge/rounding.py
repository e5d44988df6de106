"""One rounding, proven: every merged element is the correctly rounded value of the exact sum.

The value a plain LoRA merge writes for element (i, j) is the exact

    x = W[i, j] + Σᵢ cᵢ·(Bᵢ·Aᵢ)[i, j]        cᵢ = wᵢ·sᵢ, a float64 (merge weight × LoRA scale)

(B and A as stored, W as stored) rounded to nearest, ties to even, into the output dtype —
once. A float32 sum cannot promise that: rounding W + ΔW in float32 and then into bfloat16
rounds twice (PEFT's merge does, and a float32 running sum that starts at W rounds at W's
magnitude on every step). So every engine sums in float64:

    x̂ = fl64(W + Σₖ L[i, k]·R[k, j])      L = c·B rounded once into float64, R = A (exact)

with |x̂ − x| ≤ E = (K+2)·1.01·u·S + min(u·|x̂|, 1.01·S), u = 2⁻⁵³, K the summed rank and
S = Σₖ |L[i, k]|·|R[k, j]| ≤ ‖L[i]‖·‖R[:, j]‖ (Cauchy–Schwarz) — and then rounds x̂. Rounding
x̂ is wrong only where x̂ and x straddle a rounding midpoint of the output dtype. For 16-bit
outputs the engines round x̂ to float32 first (s = fl32(x̂)) and then to the output; that is the
correct rounding of x unless (a) s lands exactly on a 16-bit midpoint, or (b) E is not small
against s's float32 spacing (|s| below ``row_bounds``' threshold: a sum that cancelled almost
to zero). Both are cheap to test on s's bits (``suspect_mask``); for float32 outputs x̂'s own
bits are tested (``f32_suspect_mask``). The few flagged elements — about one in 65,536 — are
settled here (``settle``): recomputed in float64 with their exact S, decided where x̂ ± E lies
on one side of every midpoint, and otherwise (an exact tie, in practice) computed exactly in
rationals.

The compiled kernel (``adapterctl-fused``) sums 16-bit outputs in float32 instead, which is
twice as fast, and proves each value with ``float32_bounds``; the vectors of values it cannot
prove (one to three in a hundred at rank 16) it sums again as above, rounding x̂ to float32 to
odd, so that s lies on a midpoint only where x̂ does and case (a) is an exact tie.

DoRA rescaling, lora biases and ``--method`` combinations are computed in float32 and rounded
once (their norms and divisions have no exact value to round to).
"""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from adapterctl.merge.plan import Job

U64 = 2.0**-53  # float64's unit roundoff
# |s| below (K+3)·2⁻²⁷·‖L[i]‖·max‖R[:, j]‖: E might reach a quarter of s's float32 spacing.
_THRESHOLD = 2.0**-27
# The lowest bits of a float32 that lie below a 16-bit format's last bit, and their midpoint.
_LOW_BITS = {"BF16": (0xFFFF, 0x8000), "F16": (0x1FFF, 0x1000)}
_F16_MIN_NORMAL = 2.0**-14  # below it float16's spacing is fixed (subnormals): all flagged
_EMAX = {"BF16": 128, "F16": 16, "F32": 128}  # 2^EMAX: the first power of two past the max


def exact(job: Job) -> bool:
    """True when the job's value is W + Σ cᵢ·BᵢAᵢ alone (no ``--method``, DoRA or lora bias)
    written in bf16, fp16 or fp32: the values this module rounds correctly."""
    return not (job.combine or job.dora or job.bias_add or job.quantize) and (
        job.out_dtype in _EMAX
    )


def describe(jobs: list[Job]) -> str:
    """How a merge's values were rounded, for its report: the one correct rounding of every
    plain LoRA value, and what the other kinds of tensor got."""
    plain = other = quantized = False
    for job in jobs:
        if not (job.deltas or job.bias_add or job.dora or job.combine):
            continue
        if job.quantize is not None:
            quantized = True
        elif exact(job):
            plain = True
        else:
            other = True
    parts = []
    if plain:
        parts.append("correctly rounded exact sums (float64, undecided values settled exactly)")
    if other:
        parts.append("DoRA, lora bias and --method tensors: float32, rounded once")
    if quantized:
        parts.append("4-bit outputs: quantised from float32")
    return "; ".join(parts) or "nothing merged"


Norms = tuple["np.ndarray[Any, Any]", "np.ndarray[Any, Any]"]


def norms(left: np.ndarray[Any, Any], right: np.ndarray[Any, Any]) -> Norms:
    """‖L[i]‖ per row of L (rows, K) and ‖R[:, j]‖ per column of R (K, cols), float64: the
    Cauchy–Schwarz factors of every bound here (computed once per tensor, passed to both)."""
    import numpy as np

    with np.errstate(over="ignore", invalid="ignore"):
        return np.sqrt(np.einsum("ik,ik->i", left, left)), np.sqrt(
            np.einsum("kj,kj->j", right, right)
        )


def row_bounds(
    left: np.ndarray[Any, Any], right: np.ndarray[Any, Any], given: Norms | None = None
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Per row of L (rows, K) float64, with max_j ‖R[:, j]‖ of R (K, cols): the float32 |s|
    below which a 16-bit rounding is flagged (case (b) above; rounded up), and E's bound for
    the row (float64), used to flag float32 roundings. ``given``: ``norms(left, right)``."""
    import numpy as np

    k = right.shape[0]
    if k == 0:
        zeros = np.zeros(left.shape[0])
        return zeros.astype(np.float32), zeros
    lrow, rcol = norms(left, right) if given is None else given
    rmax = float(rcol.max())  # max_j ‖R[:, j]‖
    row = rmax * lrow  # (rows,) ≥ S on the row, by Cauchy–Schwarz
    thr = ((k + 3) * _THRESHOLD * 1.01 * row).astype(np.float32)
    return np.nextafter(thr, np.float32(np.inf)), (k + 3) * 1.01 * U64 * row


U32 = 2.0**-24  # float32's unit roundoff
_F32_MAX = 3.0e38  # a bound past it is "no bound": everything it covers is flagged


def float32_bounds(
    left: np.ndarray[Any, Any], right: np.ndarray[Any, Any], given: Norms | None = None
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The float32 sums' error bound as a product e[i]·c[j] (float32, rounded up): for L
    (rows, K) and R (K, cols) float64 rounded to float32 and summed in float32 (any order,
    FMA or not), |D̂ − L·R| ≤ (K+2)·u·(1+…)·S ≤ e[i]·c[j], S ≤ ‖L[i]‖·‖R[:, j]‖.

    The compiled kernel's fast path (16-bit outputs) sums in float32 and adds W, giving v
    within half a float32 step (≤ |v|·2⁻²⁴) of W + D̂; a value is proven correctly rounded
    where its distance d to the nearest 16-bit midpoint exceeds e·c + |v|·2⁻²³ (twice the
    step term, which covers the test's own float32 roundings; e·c carries 1% room): then
    |x − v| < d, so x stays on v's side of that midpoint (and |v| is checked against the
    row's limit for the midpoints beyond). Others are summed again in float64. Non-finite
    or huge norms give the largest bound. ``given``: ``norms(left, right)``."""
    import numpy as np

    k = right.shape[0]
    g = (k + 3) * U32 / (1 - (k + 3) * U32) * 1.01  # γ, with room for the roundings here
    lrow, c = norms(left, right) if given is None else given
    with np.errstate(over="ignore", invalid="ignore"):
        e = g * lrow
    floor = 2.0**-60  # e·c stays a normal float32 (underflowed products err by < 2⁻¹⁴⁹)
    e = np.nan_to_num(np.clip(e, floor, _F32_MAX), nan=_F32_MAX)
    c = np.nan_to_num(np.clip(c, floor, _F32_MAX), nan=_F32_MAX)
    up = np.float32(np.inf)
    return np.nextafter(e.astype(np.float32), up), np.nextafter(c.astype(np.float32), up)


def float32_limits(e: np.ndarray[Any, Any], cmax: float, out_dtype: str) -> np.ndarray[Any, Any]:
    """Per row, the float32 |v| below which a float32 sum is not proven by the distance test
    of ``float32_unproven`` (the kernel's ``fast_range``): there |v|·2⁻¹⁰ (2⁻¹³ for float16),
    the least distance to a midpoint other than the nearest, may be within e·cmax + |v|·2⁻²³;
    float16 also keeps its subnormals out. Rounded up."""
    import numpy as np

    k = 1.0 / ((2.0**-13 if out_dtype == "F16" else 2.0**-10) - 2.0**-23)
    with np.errstate(over="ignore", invalid="ignore"):
        lim = np.nan_to_num(e.astype(np.float64) * cmax * k * 1.0001, nan=np.inf)
    if out_dtype == "F16":
        lim = np.maximum(lim, _F16_MIN_NORMAL)
    return np.nextafter(lim.astype(np.float32), np.float32(np.inf))


def float32_unproven(
    v: np.ndarray[Any, Any],
    e: np.ndarray[Any, Any],
    c: np.ndarray[Any, Any],
    lim: np.ndarray[Any, Any],
    out_dtype: str,
    scratch: tuple[np.ndarray[Any, Any], ...] | None = None,
) -> np.ndarray[Any, Any]:
    """Which finite float32 sums v (rows, cols) = fl32(W + D̂), D̂ summed in float32, are not
    proven to round into ``out_dtype`` (``BF16``/``F16``) as the exact sum does: the kernel's
    test in NumPy (``float32_bounds``): the distance to the nearest 16-bit midpoint not above
    e[i]·c[j] + |v|·2⁻²³, or |v| below the row's ``lim`` (``float32_limits``).

    ``scratch``: three float32 and two bool arrays of v's shape to work in (the result is the
    first bool one); without it they are allocated."""
    import numpy as np

    f1, f2, f3, flag, b = scratch or (
        *(np.empty(v.shape, np.float32) for _ in range(3)),
        *(np.empty(v.shape, bool) for _ in range(2)),
    )
    u, m = v.view(np.uint32), f1.view(np.uint32)
    keep, mid = (0xFFFFE000, 0x1000) if out_dtype == "F16" else (0xFFFF0000, 0x8000)
    np.bitwise_and(u, np.uint32(keep), out=m)
    np.bitwise_or(m, np.uint32(mid), out=m)  # the nearest midpoint: same binade as v
    np.subtract(v, f1, out=f1)
    np.abs(f1, out=f1)  # d, exact
    np.abs(v, out=f2)  # |v|
    np.less(f2, lim[:, None], out=b)
    np.multiply(f2, np.float32(2.0**-23), out=f2)
    np.multiply(e[:, None], c[None, :], out=f3)
    np.add(f2, f3, out=f2)  # e·c + |v|·2⁻²³
    with np.errstate(invalid="ignore"):
        np.greater(f1, f2, out=flag)
        np.logical_not(flag, out=flag)
        flag |= b
        np.isfinite(v, out=b)  # non-finite sums round as they are (and are counted)
        flag &= b
    return flag


def to_odd32(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """float64 ``x`` rounded to float32 to odd (truncated, the last bit set where inexact),
    as the kernel does: a float32 with 13 or more bits to spare then rounds to 16 bits as
    ``x`` itself would, and lies on a 16-bit midpoint only where ``x`` does."""
    import numpy as np

    with np.errstate(over="ignore", invalid="ignore"):
        t = x.astype(np.float32)
        away = np.abs(t.astype(np.float64)) > np.abs(x)  # rounded away from zero: step back
        t[away] = np.nextafter(t[away], np.float32(0))
        inexact = (t.astype(np.float64) != x) & np.isfinite(t)
    return (t.view(np.uint32) | inexact.astype(np.uint32)).view(np.float32)


def suspect_mask(s: Any, bits: Any, thr: Any, out_dtype: str) -> Any:
    """Which float32 sums ``s`` (rows, cols) must be settled before rounding into
    ``out_dtype`` (``BF16``/``F16``): s exactly on a midpoint, |s| below its row's threshold
    ``thr`` (rows,), or (float16) in the subnormal range; never a non-finite s. NumPy arrays
    or torch tensors alike; ``bits`` is s viewed as int32."""
    mask, mid = _LOW_BITS[out_dtype]
    mag = abs(s)
    flag = ((bits & mask) == mid) | (mag < thr[:, None])
    if out_dtype == "F16":
        flag |= mag < _F16_MIN_NORMAL
    return flag & (s - s == 0)


def f32_suspect_mask(x: Any, bits: Any, err: Any) -> Any:
    """Which float64 sums ``x`` (rows, cols) must be settled before rounding into float32:
    within the row's bound ``err`` (rows,) plus two float64 steps of a float32 midpoint, or in
    float32's subnormal range; never a non-finite x. NumPy or torch; ``bits``: x as int64."""
    mag = abs(x)
    low = (bits & ((1 << 29) - 1)) - (1 << 28)  # position within float32's last bit
    # distance to the midpoint in float64 steps, each at least |x|·2⁻⁵³
    flag = abs(low) * (mag * U64) <= err[:, None] + 2 * U64 * mag
    return (flag | (mag < 2.0**-126)) & (x - x == 0)


def settle(
    job: Job,
    left: np.ndarray[Any, Any],
    right: np.ndarray[Any, Any],
    w: np.ndarray[Any, Any],
    rows: np.ndarray[Any, Any],
    cols: np.ndarray[Any, Any],
    out_dtype: str,
) -> np.ndarray[Any, Any]:
    """The correctly rounded W + L·R of the elements (rows[n], cols[n]), in ``out_dtype``'s
    storage (bfloat16 as its bits).

    Args:
        job: the merge job (its deltas give the unrounded factors for the exact fallback).
        left: L (tensor rows, K) float64: c·B folded in (``math.update(..., "float64")``).
        right: R (K, tensor cols) float64.
        w: W at those elements, (n,) float64 (exact: widened from storage).
        rows, cols: the elements' row and column in the tensor flattened to 2-D, (n,).
        out_dtype: ``BF16``, ``F16`` or ``F32``.
    """
    import numpy as np

    lg, rg = left[rows], right[:, cols].T  # (n, K), (n, K)
    x = w + np.einsum("nk,nk->n", lg, rg)
    s_abs = np.einsum("nk,nk->n", np.abs(lg), np.abs(rg))
    k = left.shape[1]
    err = (k + 2) * 1.01 * U64 * s_abs + np.minimum(U64 * np.abs(x), 1.01 * s_abs)
    r = nearest(x, out_dtype)
    down, up = neighbours(r, out_dtype)
    # decided where x ± E lies strictly between the midpoints around r
    decided = ((down + r) / 2 < x - err) & (x + err < (r + up) / 2)
    undecided = np.flatnonzero(~decided)
    if len(undecided):
        terms = _terms(job)
        # Most undecided values are exact ties whose float64 sum made no rounding error at
        # all: found error-free (every product and sum checked exact), they round directly.
        xs, ok = _error_free(terms, w[undecided], rows[undecided], cols[undecided])
        r[undecided[ok]] = _round_known(xs[ok], out_dtype)
        for n in undecided[~ok]:
            exact = _exact(terms, float(w[n]), int(rows[n]), int(cols[n]))
            r[n] = _round_exact(exact, out_dtype)
    return store(r, out_dtype)


def _error_free(
    terms: list[tuple[Fraction, Any, Any]], w: Any, rows: Any, cols: Any
) -> tuple[Any, Any]:
    """x = W + Σᵢ cᵢ·(Lᵢ·Rᵢ) at the elements in float64, and where that value is exact: every
    product and every sum checked error-free (Dekker's product, Knuth's sum)."""
    import numpy as np

    x = w.astype(np.float64)
    ok = np.isfinite(x)
    for coeff, left, right in terms:
        dot = np.zeros_like(x)
        for k in range(right.shape[0]):
            a, b = left[rows, k], right[k, cols]  # (n,), (n,)
            p = a * b
            ok &= _product_exact(a, b, p)
            dot, e = _two_sum(dot, p)
            ok &= e == 0
        c = float(coeff)
        t = c * dot
        ok &= _product_exact(np.full_like(dot, c), dot, t)
        x, e = _two_sum(x, t)
        ok &= e == 0
    return x, ok & np.isfinite(x)


def _two_sum(a: Any, b: Any) -> tuple[Any, Any]:
    """s = fl(a + b) and its error e: a + b = s + e exactly."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _product_exact(a: Any, b: Any, p: Any) -> Any:
    """Whether p = fl(a·b) is a·b exactly (Dekker's error term is zero; tiny or huge values,
    where the split is not exact, count as not)."""
    import numpy as np

    def split(v: Any) -> tuple[Any, Any]:
        t = v * 134217729.0  # 2^27 + 1
        hi = t - (t - v)
        return hi, v - hi

    with np.errstate(over="ignore", invalid="ignore"):
        ah, al = split(a)
        bh, bl = split(b)
        err = ((ah * bh - p) + ah * bl + al * bh) + al * bl
        safe = (np.abs(a) < 2.0**990) & (np.abs(b) < 2.0**990)
        safe &= (p == 0) | (np.abs(p) > 2.0**-960)
    return (err == 0) & safe & ((p != 0) | (a == 0) | (b == 0))


def _round_known(x: Any, out_dtype: str) -> Any:
    """Exact float64 values x rounded to nearest ``out_dtype`` value, ties to even."""
    import numpy as np

    r = nearest(x, out_dtype)
    down, up = neighbours(r, out_dtype)
    lo_mid, hi_mid = (down + r) / 2, (r + up) / 2
    r = np.where(x > hi_mid, up, np.where(x < lo_mid, down, r))
    down, up = neighbours(r, out_dtype)
    lo_mid, hi_mid = (down + r) / 2, (r + up) / 2
    odd = _odd(r, out_dtype)
    r = np.where((x == hi_mid) & odd, up, r)
    return np.where((x == lo_mid) & odd, down, r)


def _odd(r: Any, out_dtype: str) -> Any:
    """Whether each ``out_dtype`` value r (float64) has an odd last significand bit."""
    import numpy as np

    bits = store(r, out_dtype)
    bits = bits.view(np.uint32 if out_dtype == "F32" else np.uint16)
    finite = np.abs(r) < 2.0 ** _EMAX[out_dtype]
    return (bits % 2 == 1) & finite


def nearest(x: np.ndarray[Any, Any], out_dtype: str) -> np.ndarray[Any, Any]:
    """Values of ``out_dtype`` next to the float64 values x (the nearest, but for double
    rounding: ``settle`` checks), as float64; ±2^EMAX for values past the largest finite."""
    import numpy as np

    with np.errstate(over="ignore"):
        if out_dtype == "F16":
            r = x.astype(np.float16).astype(np.float64)
        elif out_dtype == "F32":
            r = x.astype(np.float32).astype(np.float64)
        else:  # BF16: float32's rounding, truncated to bfloat16, then the nearer neighbour
            t = (x.astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
            t64 = t.astype(np.float64)
            down, up = neighbours(t64, out_dtype)
            other = np.where(x < t64, down, up)
            r = np.where(np.abs(other - x) < np.abs(t64 - x), other, t64)
    emax = 2.0 ** _EMAX[out_dtype]
    return np.where(np.isinf(r), np.copysign(emax, r), r)


def neighbours(r: np.ndarray[Any, Any], out_dtype: str) -> tuple[Any, Any]:
    """(before, after): the ``out_dtype`` values either side of each value r (float64), as
    float64, with ±2^EMAX for the overflow past the largest finite value."""
    import numpy as np

    emax = 2.0 ** _EMAX[out_dtype]
    finite = np.clip(r, -np.finfo(np.float64).max, np.finfo(np.float64).max)
    with np.errstate(over="ignore"):
        if out_dtype == "BF16":
            bits = (finite.astype(np.float32).view(np.uint32) >> 16).astype(np.int64)  # exact
            neg = bits >= 0x8000
            zero = (bits & 0x7FFF) == 0
            # sign and magnitude: up is a larger magnitude when positive, smaller when
            # negative, and crosses zero to the smallest subnormal of the other sign
            up_bits = np.where(neg, np.where(zero, 1, bits - 1), bits + 1)
            down_bits = np.where(neg, bits + 1, np.where(zero, 0x8001, bits - 1))
            up, down = _widen16(up_bits), _widen16(down_bits)
        else:
            t = np.float16 if out_dtype == "F16" else np.float32
            rt = finite.astype(t)
            up = np.nextafter(rt, t(np.inf)).astype(np.float64)
            down = np.nextafter(rt, t(-np.inf)).astype(np.float64)
    up = np.where(np.isinf(up), emax, up)
    down = np.where(np.isinf(down), -emax, down)
    at_max = np.abs(r) >= emax  # the overflow value itself: no further values past it
    up = np.where(at_max & (r > 0), np.inf, up)
    down = np.where(at_max & (r < 0), -np.inf, down)
    return down, up


def _widen16(bits: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """bfloat16 bit patterns (int64) as float64 values."""
    import numpy as np

    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _terms(job: Job) -> list[tuple[Fraction, Any, Any]]:
    """(cᵢ, Lᵢ, Rᵢ) of each delta: its coefficient and its stored factors, unscaled, in the
    weight's layout (float64: exact)."""
    return [
        (Fraction(d.weight * d.module.scale), *d.module.factors(1.0, "float64")) for d in job.deltas
    ]


def _exact(terms: list[tuple[Fraction, Any, Any]], w: float, row: int, col: int) -> Fraction:
    """The exact W + Σᵢ cᵢ·(Lᵢ·Rᵢ) at one element, in rationals."""
    total = Fraction(w)
    for coeff, left, right in terms:
        dot = sum(
            (Fraction(float(left[row, k])) * Fraction(float(right[k, col]))
             for k in range(right.shape[0])),
            Fraction(0),
        )  # fmt: skip
        total += coeff * dot
    return total


def _round_exact(x: Fraction, out_dtype: str) -> float:
    """x rounded to nearest ``out_dtype`` value, ties to even (±2^EMAX: overflow)."""
    import numpy as np

    x64 = np.array([float(x)])  # correctly rounded: x lies within half a float64 step of it
    r = nearest(x64, out_dtype)
    down, up = neighbours(r, out_dtype)
    cand = [float(v[0]) for v in (down, r, up) if np.isfinite(v[0])]
    return min(cand, key=lambda c: (abs(Fraction(c) - x), bool(_odd(np.array([c]), out_dtype)[0])))


def store(value: np.ndarray[Any, Any], out_dtype: str) -> np.ndarray[Any, Any]:
    """Values of ``out_dtype`` given as float64 (±2^EMAX: overflow, stored as ±inf) in its
    storage: bfloat16 as uint16 bits, float16, float32."""
    import numpy as np

    emax = 2.0 ** _EMAX[out_dtype]
    value = np.where(np.abs(value) >= emax, np.copysign(np.inf, value), value)
    if out_dtype == "F16":
        return value.astype(np.float16)
    v32 = value.astype(np.float32)  # exact
    if out_dtype == "F32":
        return v32
    return (v32.view(np.uint32) >> 16).astype(np.uint16)
