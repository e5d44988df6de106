/* adapterctl_fused._fused: the fused kernel of adapterctl's NumPy merge engine.
 *
 * One call merges a block of rows of a 16/32-bit weight in a single pass over memory:
 *
 *     x[i, j]   = double(base[i, j]) + sum_k left[i, k] * right[k, j]     (float64)
 *     out[i, j] = round_out( float(x[i, j]) )
 *
 * base (rows, cols) in bfloat16, float16 or float32; left (rows, rank) and right (rank, cols)
 * in float64: the LoRA factors with their coefficients (adapterctl.merge.math), right
 * passed in tiles of 32 columns, (ceil(cols / 32), rank, 32) zero-padded, so that the values
 * a tile of the output needs lie side by side (numpy_engine._right_tiles). The sum runs from
 * zero in float64 and the base is added last; x is rounded to float32 and then into out
 * (rows, cols): bfloat16 to nearest even with NaN kept quiet (as torch and adapterctl.floats
 * round), float16 by the compiler's IEEE conversion (needs _Float16: GCC 12+, Clang 15+;
 * elsewhere float16 is refused and the engine uses NumPy for it), or float32. For 16-bit
 * outputs the two roundings are the one correct rounding of the exact sum except where the
 * float32 value lands exactly on a 16-bit midpoint or lies below its row's threshold `thr`
 * (a sum that cancelled): those elements' flat indices are recorded in `suspects` for
 * adapterctl.merge.rounding to settle (about one in 65,536). NumPy does the same in several
 * passes (matmul, widening add, roundings, tests); this is one, with the running sums in
 * registers. The code is compiled for three vector widths and the
 * widest the CPU runs is used (ISAS; `isa` picks another, for tests and benchmarks).
 *
 * The float32 fast path (16-bit outputs, when left32, right32, err and cnorm are given: the
 * engine always gives them): the sum runs in float32 from zero, v = fl32(sum + base), and v
 * rounds correctly into out wherever its distance to the nearest 16-bit midpoint exceeds
 * err[i]·cnorm[j] and |v| is not below the row's limit (adapterctl.merge.rounding.
 * float32_bounds has the proof). A vector of sums with any lane it cannot prove is summed
 * again in float64 as above, but rounded to float32 to odd (truncated, the last bit set if
 * inexact): that one rounding then equals rounding the float64 sum itself, so only a float64
 * sum exactly on a midpoint, or one that cancelled, is left for `suspects`.
 *
 * Built as an optional extension: where it cannot be compiled, the engine uses NumPy alone.
 * The GIL is released while the kernel runs, so the engine's worker threads run it at once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__)
/* Wide vectors are only passed between inlined helpers: no ABI is crossed. */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(__FLT16_MAX__)
#define HAVE_FLOAT16 1
#else
#define HAVE_FLOAT16 0
#endif

enum { BF16 = 0, F16 = 1, F32 = 2 };

/* ---- scalar conversions (column tails); the vector ones below do the same arithmetic ---- */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest, ties to even; a NaN stays NaN (sign kept, quiet bit set). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    uint32_t quiet = (u >> 16) | 0x40u;
    return (uint16_t)(f != f ? quiet : rounded);
}

#if HAVE_FLOAT16
static inline float f16_to_f32(uint16_t h) {
    _Float16 x;
    memcpy(&x, &h, sizeof x);
    return (float)x;
}

static inline uint16_t f32_to_f16(float f) {
    _Float16 x = (_Float16)f;
    uint16_t h;
    memcpy(&h, &x, sizeof h);
    return h;
}
#endif

#define F32_LOAD(x) (x)
#define F32_STORE(x) (x)
/* A float16 result is ±inf while its float32 sum was finite: the value overflowed. */
#define F16_INF(h, f) (((h) & 0x7FFFu) == 0x7C00u && (f) - (f) == 0.0f)
#define NO_COUNT(h, f) 0
/* A bfloat16 result is ±inf while its float32 sum was finite. */
#define BF16_INF(h, f) (((h) & 0x7FFFu) == 0x7F80u && (f) - (f) == 0.0f)

/* ---- one kernel per instruction set ----
 *
 * The same code is compiled for three vector widths, chosen when the module loads: 16 floats
 * (AVX-512), 8 (AVX2 + FMA + F16C) and 4 (SSE2, NEON, or whatever the compiler targets by
 * default). Every width works on tiles of TILE_COLS = 32 columns with eight running sums in
 * registers: 4 rows x 2 vectors, 2 rows x 4, or 1 row x 8. Eight sums hide the FMA latency,
 * and each vector of `right` is loaded once for the tile's rows. (GCC vector types of a width
 * the target lacks are emulated through the stack, 15x slower: hence a width per target.) */

#define TILE_COLS 32
#define TILE_ROWS 4 /* the most rows a tile holds: the engine's chunks hold a multiple */
#define ACC_ROW(N, a) ((a) / (TILE_COLS / (N)))       /* sum a's row in the tile */
#define ACC_COL(N, a) ((a) % (TILE_COLS / (N)) * (N)) /* and its first column */

/* Lane indices for splitting a vector of N values into halves and joining them again. */
#define LO_16 0, 1, 2, 3, 4, 5, 6, 7
#define HI_16 8, 9, 10, 11, 12, 13, 14, 15
#define ALL_16 LO_16, HI_16
#define LO_8 0, 1, 2, 3
#define HI_8 4, 5, 6, 7
#define ALL_8 LO_8, HI_8
#define LO_4 0, 1
#define HI_4 2, 3
#define ALL_4 LO_4, HI_4

/* Per-ISA helpers of the vector code (the x86 ones use intrinsics where GCC's vector
 * extensions would go through extra instructions): whether the test of P_unsure fails in any
 * lane, 16-bit words widened to 32-bit lanes, and the low 16 bits of each lane stored. */
#define UNSURE_VEC(P, d, t, r, span) P##_any(~(P##_vu32)((d) > (t)) | (P##_vu32)((r) > (span)))
#define LOAD_U16_VEC(P, p)                                                                    \
    ({                                                                                        \
        P##_vu16 h_;                                                                          \
        memcpy(&h_, (p), sizeof h_);                                                          \
        __builtin_convertvector(h_, P##_vu32);                                                \
    })
#define LOAD_F32_F64_VEC(P, p)                                                                \
    ({                                                                                        \
        P##_vh32 h_;                                                                          \
        memcpy(&h_, (p), sizeof h_);                                                          \
        __builtin_convertvector(h_, P##_vd);                                                  \
    })
#define WIDEN_LO_VEC(P, N, v) __builtin_convertvector(__builtin_shufflevector(v, v, LO_##N), P##_vd)
#define WIDEN_HI_VEC(P, N, v) __builtin_convertvector(__builtin_shufflevector(v, v, HI_##N), P##_vd)
/* bfloat16 by integer rounding to nearest even (normal values: P_store_proven) */
#define STORE_BF16_VEC(P, p, v)                                                               \
    do {                                                                                      \
        const P##_vu32 u_ = (P##_vu32)(v);                                                    \
        STORE_U16_##P(p, (u_ + 0x7FFFu + ((u_ >> 16) & 1u)) >> 16);                           \
    } while (0)
#define STORE_U16_VEC(P, p, u)                                                                \
    do {                                                                                      \
        P##_vu16 h_ = __builtin_convertvector((u), P##_vu16);                                 \
        memcpy((p), &h_, sizeof h_);                                                          \
    } while (0)

/* P_exact (R float64) and P_exact32 (R float32): see there. */
#define EXACT_FN(P, N, TARGET, NAME, R_T, R_LO, R_HI)                                         \
    TARGET __attribute__((noinline, cold)) static P##_vf P##_##NAME(                          \
        const double *l, const R_T *r, Py_ssize_t rank, P##_vf base) {                        \
        P##_vd lo0 = -(P##_vd){}, hi0 = -(P##_vd){}, lo1 = -(P##_vd){}, hi1 = -(P##_vd){};    \
        Py_ssize_t k = 0;                                                                     \
        for (; k + 1 < rank; k += 2, r += 2 * TILE_COLS) {                                    \
            lo0 += l[k] * (R_LO);                                                             \
            hi0 += l[k] * (R_HI);                                                             \
            r += TILE_COLS;                                                                   \
            lo1 += l[k + 1] * (R_LO);                                                         \
            hi1 += l[k + 1] * (R_HI);                                                         \
            r -= TILE_COLS;                                                                   \
        }                                                                                     \
        if (k < rank) {                                                                       \
            lo0 += l[k] * (R_LO);                                                             \
            hi0 += l[k] * (R_HI);                                                             \
        }                                                                                     \
        return P##_finish_odd(lo0 + lo1, hi0 + hi1, base);                                    \
    }

/* Vector types and loads/stores of N values for the target TARGET, prefixed P. */
#define VECTOR_OPS(P, N, TARGET)                                                              \
    typedef float P##_vf __attribute__((vector_size(4 * (N))));                               \
    typedef uint32_t P##_vu32 __attribute__((vector_size(4 * (N))));                          \
    typedef uint16_t P##_vu16 __attribute__((vector_size(2 * (N))));                          \
    /* float64 sums at the native width: a float vector's N values as two halves of N/2 */     \
    typedef double P##_vd __attribute__((vector_size(4 * (N))));                              \
    typedef float P##_vh32 __attribute__((vector_size(2 * (N))));                             \
    F16_VECTOR_OPS(P, N, TARGET)                                                              \
    TARGET static inline P##_vd P##_load_f64(const double *p) {                              \
        P##_vd v;                                                                             \
        memcpy(&v, p, sizeof v);                                                              \
        return v;                                                                             \
    }                                                                                         \
    /* x = sums + base, in float64, rounded to float32: halves lo, hi of the N values */      \
    TARGET static inline P##_vf P##_finish(P##_vd lo, P##_vd hi, P##_vf base) {              \
        P##_vh32 f0 = __builtin_convertvector(lo + (P##_vd)WIDEN_LO_##P(base), P##_vh32);     \
        P##_vh32 f1 = __builtin_convertvector(hi + (P##_vd)WIDEN_HI_##P(base), P##_vh32);     \
        return __builtin_shufflevector(f0, f1, ALL_##N);                                      \
    }                                                                                         \
    /* float64 x rounded to float32 to odd: truncated, the last bit set where inexact. A     \
     * float32 with 13 or more bits to spare then rounds to 16 bits as x itself would (one    \
     * rounding), and it lies on a 16-bit midpoint only where x does. */                      \
    TARGET static inline P##_vh32 P##_to_odd_vec(P##_vd x) {                                  \
        typedef int64_t vl __attribute__((vector_size(4 * (N))));                             \
        typedef int32_t vi __attribute__((vector_size(2 * (N))));                             \
        typedef uint32_t vu __attribute__((vector_size(2 * (N))));                            \
        P##_vh32 t = __builtin_convertvector(x, P##_vh32);                                    \
        P##_vd back = __builtin_convertvector(t, P##_vd);                                     \
        const int64_t mag = INT64_MAX; /* |y| as bits: ordered like |y| (not NaN) */          \
        vi away = __builtin_convertvector(((vl)back & mag) > ((vl)x & mag), vi);              \
        vi inexact = __builtin_convertvector((vl)(back != x), vi) & (vi)(t - t == 0);         \
        vu bits = (vu)t + (vu)away; /* one step toward zero: away is 0 or -1 */               \
        return (P##_vh32)(bits | (vu)(inexact & 1));                                          \
    }                                                                                         \
    TARGET static inline __attribute__((always_inline)) P##_vf P##_finish_odd(               \
        P##_vd lo, P##_vd hi, P##_vf base) {                                                  \
        P##_vh32 f0 = (P##_vh32)TO_ODD_##P(lo + (P##_vd)WIDEN_LO_##P(base));                  \
        P##_vh32 f1 = (P##_vh32)TO_ODD_##P(hi + (P##_vd)WIDEN_HI_##P(base));                  \
        return __builtin_shufflevector(f0, f1, ALL_##N);                                      \
    }                                                                                         \
    TARGET static inline P##_vf P##_load_f32(const float *p) {                               \
        P##_vf v;                                                                             \
        memcpy(&v, p, sizeof v);                                                              \
        return v;                                                                             \
    }                                                                                         \
    /* N/2 floats widened to float64 (exact) */                                               \
    TARGET static inline P##_vd P##_load_f32_f64(const float *p) {                           \
        return (P##_vd)LOAD_F32_F64_##P(p);                                                   \
    }                                                                                         \
    TARGET static inline P##_vf P##_load_bf16(const uint16_t *p) {                           \
        return (P##_vf)(LOAD_U16_##P(p) << 16);                                               \
    }                                                                                         \
    TARGET static inline P##_vu32 P##_store_f32(float *p, P##_vf v) {                        \
        memcpy(p, &v, sizeof v);                                                              \
        return (P##_vu32){};                                                                  \
    }                                                                                         \
    TARGET static inline P##_vu32 P##_store_bf16(uint16_t *p, P##_vf v) {                    \
        P##_vu32 u = (P##_vu32)v;                                                             \
        P##_vu32 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;                            \
        P##_vu32 quiet = (u >> 16) | 0x40u;                                                   \
        P##_vu32 nan = (P##_vu32)(v != v);                                                    \
        STORE_U16_##P(p, (quiet & nan) | (rounded & ~nan));                                   \
        /* a finite sum that rounded to ±inf: counted, as float16's are */                    \
        return (P##_vu32)((rounded & 0x7FFFu) == 0x7F80u) & (P##_vu32)(v - v == 0.0f);       \
    }                                                                                         \
    /* Whether any lane of m is set (one test instruction where the ISA has one). */          \
    TARGET static inline int P##_any(P##_vu32 m) { return ANY_##P(m); }                      \
    /* The lanes of the float32 values v whose rounding into `out` must be settled. */        \
    TARGET static inline P##_vu32 P##_suspects(P##_vf v, float t, int out) {                 \
        P##_vu32 u = (P##_vu32)v;                                                             \
        P##_vf mag = (P##_vf)(u & 0x7FFFFFFFu);                                               \
        const uint32_t low = out == F16 ? 0x1FFFu : 0xFFFFu;                                  \
        const uint32_t mid = out == F16 ? 0x1000u : 0x8000u;                                  \
        const float sub = out == F16 ? 6.103515625e-05f : 0.0f;                               \
        P##_vu32 hit = (P##_vu32)((u & low) == mid) | (P##_vu32)(mag < t) |                   \
                       (P##_vu32)(mag < sub);                                                 \
        return hit & (P##_vu32)((u & 0x7F800000u) != 0x7F800000u);                            \
    }                                                                                         \
    /* The lanes of the float32 sums v = fl32(W + D), D the float32 sum of L·R, whose       \
     * rounding into `out` they do not prove (adapterctl.merge.rounding.float32_bounds: the   \
     * error of D is at most e·c, and the rounding of W + D at most |v|·2^-24, taken twice    \
     * here so that the test's own roundings stay on the safe side): the distance d from v to \
     * its nearest 16-bit midpoint is not above that (v - m is exact: same binade), or |v| is \
     * outside [lo, lo + span] as bits (fast_range: below the row's limit, where the bound    \
     * might reach the midpoints beyond m, float16 subnormals; or rounding to ±inf), or v is  \
     * not finite (d NaN). Vectors with none of these store through store_proven. */          \
    TARGET static inline int P##_unsure(P##_vf v, float e, P##_vf c, uint32_t lo,            \
                                        uint32_t span, int out) {                             \
        P##_vu32 u = (P##_vu32)v;                                                             \
        P##_vu32 mag = u & 0x7FFFFFFFu;                                                       \
        const uint32_t keep = out == F16 ? ~0x1FFFu : 0xFFFF0000u;                            \
        const uint32_t mid = out == F16 ? 0x1000u : 0x8000u;                                  \
        P##_vf d = (P##_vf)((P##_vu32)(v - (P##_vf)((u & keep) | mid)) & 0x7FFFFFFFu);        \
        return UNSURE_##P(d, e * c + (P##_vf)mag * 0x1p-23f, mag - lo, span);                 \
    }                                                                                         \
    /* Store normal values that round to finite 16-bit values (P_unsure proved them). */      \
    TARGET static inline void P##_store_proven(void *p, P##_vf v, int out) {                 \
        if (out == BF16)                                                                      \
            STORE_BF16_##P(p, v);                                                             \
        else                                                                                  \
            STORE_F16_PROVEN(P, p, v);                                                        \
    }                                                                                         \
    /* One vector of N sums in float64 (two halves, each in two running sums, k even and odd, \
     * to halve the dependency chain): row l (rank values) times the N columns of a tile of   \
     * `right` starting at r (tile stride TILE_COLS), plus base, as finish_odd. Rarely taken  \
     * (the fast path's unproven vectors): kept out of line, so the hot loop keeps its        \
     * registers. R: the tile's values as float64, or (EXACT32) the float32 tile the fast     \
     * path just read, where it holds `right` exactly. */                                     \
    EXACT_FN(P, N, TARGET, exact, double, P##_load_f64(r), P##_load_f64(r + (N) / 2))        \
    EXACT_FN(P, N, TARGET, exact32, float, P##_load_f32_f64(r),                              \
             P##_load_f32_f64(r + (N) / 2))                                                   \

#if HAVE_FLOAT16
#define STORE_F16_PROVEN(P, p, v)                                                             \
    do {                                                                                      \
        P##_vh h_ = __builtin_convertvector(v, P##_vh);                                       \
        memcpy(p, &h_, sizeof h_);                                                            \
    } while (0)
/* Stores return the lanes where a finite sum overflowed to ±inf. */
#define F16_VECTOR_OPS(P, N, TARGET)                                                          \
    typedef _Float16 P##_vh __attribute__((vector_size(2 * (N))));                            \
    typedef int32_t P##_vi32 __attribute__((vector_size(4 * (N))));                           \
    TARGET static inline P##_vf P##_load_f16(const uint16_t *p) {                            \
        P##_vh h;                                                                             \
        memcpy(&h, p, sizeof h);                                                              \
        return __builtin_convertvector(h, P##_vf);                                            \
    }                                                                                         \
    TARGET static inline P##_vu32 P##_store_f16(uint16_t *p, P##_vf v) {                     \
        P##_vh h = __builtin_convertvector(v, P##_vh);                                        \
        memcpy(p, &h, sizeof h);                                                              \
        P##_vu16 bits;                                                                        \
        memcpy(&bits, &h, sizeof bits);                                                       \
        P##_vi32 inf = __builtin_convertvector((bits & 0x7FFFu) == 0x7C00u, P##_vi32) &       \
                       (v - v == 0.0f);                                                       \
        return (P##_vu32)inf;                                                                 \
    }
#else
#define F16_VECTOR_OPS(P, N, TARGET)
#define STORE_F16_PROVEN(P, p, v) ((void)0)
#endif

/* The float32 fast path's inputs (16-bit outputs): left (rows, rank) and right (its tiles)
 * rounded to float32, and per row e and per column c such that e[i]·c[j] bounds the error of
 * the float32 sum of row i, column j (adapterctl.merge.numpy_engine._fast_inputs). */
typedef struct {
    const float *left, *right, *err, *cnorm;
    float cmax;      /* the largest c */
    int right_exact; /* right32 holds right exactly: the float64 sums read it */
} fast_t;

/* The range [lo, lo + span] of |v|, as float32 bits, where a float32 sum can be proven by
 * the distance test alone, for b the row's largest e·c. Below the limit |v|·2^-10 (2^-13
 * for float16), the least distance to a midpoint other than the nearest, may be within the
 * sum's error b + |v|·2^-24 (taken twice, as P_unsure does); float16 also flags its
 * subnormals. Above the top, v rounds to ±inf (counted by the full store). The limit is
 * rounded up; one past the top flags everything. */
static inline void fast_range(float b, int out, uint32_t *lo, uint32_t *span) {
    const float k = out == F16 ? 1.0f / (0x1p-13f - 0x1p-23f) : 1.0f / (0x1p-10f - 0x1p-23f);
    float lim = b * k * 1.0001f;
    if (out == F16 && lim < 6.103515625e-05f) lim = 6.103515625e-05f;
    /* the largest float32 that rounds to a finite value: below 65520, below 0x7F7F8000 */
    const uint32_t top = out == F16 ? 0x477FEFFFu : 0x7F7F7FFFu;
    uint32_t bits;
    memcpy(&bits, &lim, sizeof bits);
    if (!(lim <= 3.0e38f) || bits > top) { /* NaN, or nothing provable */
        *lo = UINT32_MAX;
        *span = 0;
    } else {
        *lo = bits;
        *span = top - bits;
    }
}

/* Columns per panel: the panel of `right` (rank x width floats) stays in L2 while every row of
 * the block streams past it. Whole rows when it fits (rank 16 on a 11008-wide weight: 700 KiB);
 * high ranks (several adapters, r = 128...) would otherwise re-read `right` from memory for
 * every tile of rows. */
#define RIGHT_BUDGET (1 << 20)
/* right[k, col] in the tiled layout: (ceil(cols / 32), rank, 32), zero-padded. */
#define RIGHT_AT(k, col) (((col) / TILE_COLS * rank + (k)) * TILE_COLS + (col) % TILE_COLS)

static Py_ssize_t panel_width(Py_ssize_t rank, Py_ssize_t cols) {
    if (rank == 0) return cols > 0 ? cols : 1;
    Py_ssize_t width = RIGHT_BUDGET / (rank * (Py_ssize_t)sizeof(double));
    width -= width % TILE_COLS;
    if (width < TILE_COLS) width = TILE_COLS;
    return width < cols ? width : (cols > 0 ? cols : 1);
}

/* The eight running sums of a tile, s0..s7, in float64: sum a covers row ACC_ROW(a), columns
 * from ACC_COL(a). Each step k loads the tile's vectors of `right` once for all the rows. */
#define FOR_SUMS(X, ...)                                                                      \
    X(0, __VA_ARGS__) X(1, __VA_ARGS__) X(2, __VA_ARGS__) X(3, __VA_ARGS__) X(4, __VA_ARGS__) \
    X(5, __VA_ARGS__) X(6, __VA_ARGS__) X(7, __VA_ARGS__)
/* -0.0: rank 0 keeps W's own zeros. Each sum is two float64 halves (l, h) of N values. */
#define SUM_ZERO(a, VD) VD s##a##l = -(VD){}, s##a##h = -(VD){};
#define SUM_ADD(a, N, RL, RH)                    \
    s##a##l += lk[ACC_ROW(N, a)] * RL[ACC_COL(N, a) / (N)]; \
    s##a##h += lk[ACC_ROW(N, a)] * RH[ACC_COL(N, a) / (N)];
/* The lanes of v (N sums from row row_, column col_) that must be settled, recorded. */
#define NOTE_SUSPECTS(P, N, v, OUT_CODE)                                                      \
    do {                                                                                      \
        const P##_vu32 h_ = P##_suspects((v), thr[rr[row_]], (OUT_CODE));                     \
        if (P##_any(h_)) {                                                                    \
            uint32_t lanes_[N];                                                               \
            memcpy(lanes_, &h_, sizeof h_);                                                   \
            note_lanes(lanes_, (N), index0 + rr[row_] * cols + col_, susp, cap, n_susp);      \
        }                                                                                     \
    } while (0)
/* x = sum + base in float64, rounded to float32, stored (rounded into out), and checked. */
#define SUM_STORE(a, P, N, LOAD_V, STORE_V, OUT_CODE)                                         \
    if (ACC_ROW(N, a) == 0 || rr[ACC_ROW(N, a)] != i) {                                       \
        const Py_ssize_t row_ = ACC_ROW(N, a), col_ = j + ACC_COL(N, a);                      \
        P##_vf v_ = P##_finish(s##a##l, s##a##h, LOAD_V(b[row_] + col_));                     \
        inf_lanes -= STORE_V(o[row_] + col_, v_);                                             \
        if (OUT_CODE != F32) NOTE_SUSPECTS(P, N, v_, OUT_CODE);                               \
    }
/* The float32 fast path of 16-bit outputs: eight float32 sums f0..f7 over `lf` (the tile's
 * rows of fast->left) and the tiles of fast->right; each vector whose rounding the bound
 * cannot prove (P_unsure) is summed again in float64 (P_exact) and then checked as above. */
#define FAST_ZERO(a, VF) VF f##a = -(VF){};
#define FAST_ADD(a, N, RV) f##a += lf[ACC_ROW(N, a)] * RV[ACC_COL(N, a) / (N)];
#define FAST_STORE(a, P, N, LOAD_V, OUT_CODE)                                                 \
    if (ACC_ROW(N, a) == 0 || rr[ACC_ROW(N, a)] != i) {                                       \
        const Py_ssize_t row_ = ACC_ROW(N, a), col_ = j + ACC_COL(N, a);                      \
        const P##_vf v_ = f##a + LOAD_V(b[row_] + col_);                                      \
        if (P##_unsure(v_, e_row[row_], P##_load_f32(cnorm + col_), lo[row_], span[row_],     \
                       OUT_CODE))                                                             \
            redo |= 1u << (a);                                                                \
        else                                                                                  \
            P##_store_proven(o[row_] + col_, v_, OUT_CODE);                                   \
    }
/* The sums in `redo`, summed again in float64 after the tile's proven ones are stored (no
 * call among those: the running sums and constants keep their registers), noted, stored. */
#define FAST_REDO(P, N, LOAD_V, STORE_V, OUT_CODE)                                            \
    for (; redo != 0; redo &= redo - 1) {                                                     \
        const int a_ = __builtin_ctz(redo);                                                   \
        const Py_ssize_t row_ = ACC_ROW(N, a_), col_ = j + ACC_COL(N, a_);                    \
        const P##_vf b_ = LOAD_V(b[row_] + col_);                                             \
        const double *l_ = left + rr[row_] * rank;                                            \
        const P##_vf v_ =                                                                     \
            right_exact                                                                       \
                ? P##_exact32(l_, t32 + ACC_COL(N, a_), rank, b_)                             \
                : P##_exact(l_, right + (j / TILE_COLS) * rank * TILE_COLS + ACC_COL(N, a_),  \
                            rank, b_);                                                        \
        NOTE_SUSPECTS(P, N, v_, OUT_CODE);                                                    \
        inf_lanes -= STORE_V(o[row_] + col_, v_);                                             \
    }

/* Record the flat indices at + q of the n lanes q that `hit` flags (past `cap` only counted). */
static void note_lanes(const uint32_t *hit, int n, Py_ssize_t at, int64_t *susp, Py_ssize_t cap,
                       Py_ssize_t *n_susp) {
    for (int q = 0; q < n; q++)
        if (hit[q]) {
            if (*n_susp < cap) susp[*n_susp] = (int64_t)(at + q);
            (*n_susp)++;
        }
}

/* Record the flat index `at` of a float32 value v whose rounding into `out` must be settled:
 * exactly on a 16-bit midpoint, |v| below the row's threshold t, or (float16) subnormal there.
 * Indices past `cap` are counted, not stored. */
static inline void note_one(float v, float t, int out, Py_ssize_t at, int64_t *susp,
                            Py_ssize_t cap, Py_ssize_t *n) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    const float mag = v < 0 ? -v : v;
    const uint32_t low = out == F16 ? 0x1FFFu : 0xFFFFu, mid = out == F16 ? 0x1000u : 0x8000u;
    const float sub = out == F16 ? 6.103515625e-05f : 0.0f;
    const int hit = (u & low) == mid || mag < t || mag < sub;
    if (hit && (u & 0x7F800000u) != 0x7F800000u) {
        if (*n < cap) susp[*n] = (int64_t)at;
        (*n)++;
    }
}

/* A kernel for one (base dtype, output dtype) pair and one vector width; returns the number of
 * finite sums that rounded to ±inf in a 16-bit output and adds the suspects it records to
 * *n_susp. Panel by panel of columns, rows go a tile at a time (past the last row, a tile
 * repeats its first row and stores it once): the tile's values of `left` are first laid side
 * by side in `lk` (rank x rows of the tile: one pointer walks them, which keeps the inner
 * loop short), then come whole tiles of 32 columns, then the panel's last columns one by one.
 * `thr` holds a threshold per row; `index0` is the flat index of row 0 in the whole tensor. */
#define KERNEL(P, N, TARGET, NAME, IN_T, LOAD, LOAD_V, OUT_T, STORE, STORE_V, COUNT, OUT_CODE) \
    TARGET static Py_ssize_t P##_##NAME(                                                      \
        const void *base_, const double *left, const double *right, void *out_,               \
        Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t rank, double *scratch, const float *thr, \
        int64_t *susp, Py_ssize_t cap, Py_ssize_t *n_susp, Py_ssize_t index0,                 \
        const fast_t *fast) {                                                                  \
        enum { RT = ACC_ROW(N, 7) + 1 }; /* rows per tile */                                   \
        float *scratch32 = (float *)(scratch + TILE_ROWS * (rank > 0 ? rank : 1));             \
        if (OUT_CODE == F32) fast = NULL; /* float32 outputs: float64 sums */                  \
        const IN_T *base = base_;                                                              \
        OUT_T *out = out_;                                                                     \
        Py_ssize_t inf = 0;                                                                    \
        P##_vu32 inf_lanes = {}; /* per lane, how many finite sums became ±inf */              \
        const Py_ssize_t panel = panel_width(rank, cols);                                      \
        for (Py_ssize_t p = 0; p < cols; p += panel) {                                         \
            const Py_ssize_t p_end = p + panel < cols ? p + panel : cols;                      \
            for (Py_ssize_t i = 0; i < rows; i += RT) {                                        \
                Py_ssize_t rr[RT];                                                             \
                const IN_T *b[RT];                                                             \
                OUT_T *o[RT];                                                                  \
                for (int t = 0; t < RT; t++) {                                                 \
                    rr[t] = i + t < rows ? i + t : i;                                          \
                    b[t] = base + rr[t] * cols;                                                \
                    o[t] = out + rr[t] * cols;                                                 \
                    for (Py_ssize_t k = 0; k < rank; k++)                                      \
                        scratch[k * RT + t] = left[rr[t] * rank + k];                          \
                }                                                                              \
                float e_row[RT];          /* the rows' e (P_unsure) */                         \
                uint32_t lo[RT], span[RT]; /* and their range of |v| (fast_range) */          \
                if (fast != NULL)                                                              \
                    for (int t = 0; t < RT; t++) {                                             \
                        for (Py_ssize_t k = 0; k < rank; k++)                                  \
                            scratch32[k * RT + t] = fast->left[rr[t] * rank + k];              \
                        e_row[t] = fast->err[rr[t]];                                           \
                        fast_range(e_row[t] * fast->cmax, OUT_CODE, &lo[t], &span[t]);         \
                    }                                                                          \
                const float *cnorm = fast != NULL ? fast->cnorm : NULL;                        \
                const int right_exact = fast != NULL && fast->right_exact;                     \
                Py_ssize_t j = p;                                                              \
                for (; fast != NULL && j + TILE_COLS <= p_end; j += TILE_COLS) {               \
                    FOR_SUMS(FAST_ZERO, P##_vf)                                                \
                    const float *t32 = fast->right + (j / TILE_COLS) * rank * TILE_COLS;       \
                    const float *r32 = t32, *lf = scratch32;                                   \
                    for (Py_ssize_t k = 0; k < rank; k++, r32 += TILE_COLS, lf += RT) {        \
                        P##_vf RV[TILE_COLS / N];                                              \
                        for (int v = 0; v < TILE_COLS / N; v++)                                \
                            RV[v] = P##_load_f32(r32 + v * N);                                 \
                        FOR_SUMS(FAST_ADD, N, RV)                                              \
                    }                                                                          \
                    unsigned redo = 0; /* the sums P_unsure flags */                           \
                    FOR_SUMS(FAST_STORE, P, N, LOAD_V, OUT_CODE)                               \
                    FAST_REDO(P, N, LOAD_V, STORE_V, OUT_CODE)                                 \
                }                                                                              \
                for (; j + TILE_COLS <= p_end; j += TILE_COLS) {                               \
                    FOR_SUMS(SUM_ZERO, P##_vd)                                                 \
                    const double *r = right + (j / TILE_COLS) * rank * TILE_COLS;              \
                    const double *lk = scratch;                                                \
                    for (Py_ssize_t k = 0; k < rank; k++, r += TILE_COLS, lk += RT) {          \
                        P##_vd RL[TILE_COLS / N], RH[TILE_COLS / N];                           \
                        for (int v = 0; v < TILE_COLS / N; v++) {                              \
                            RL[v] = P##_load_f64(r + v * N);                                   \
                            RH[v] = P##_load_f64(r + v * N + (N) / 2);                         \
                        }                                                                      \
                        FOR_SUMS(SUM_ADD, N, RL, RH)                                           \
                    }                                                                          \
                    FOR_SUMS(SUM_STORE, P, N, LOAD_V, STORE_V, OUT_CODE)                       \
                }                                                                              \
                for (Py_ssize_t row = i; row < i + RT && row < rows; row++) {                  \
                    for (Py_ssize_t col = j; col < p_end; col++) {                             \
                        double acc = -0.0;                                                     \
                        for (Py_ssize_t k = 0; k < rank; k++)                                  \
                            acc += left[row * rank + k] * right[RIGHT_AT(k, col)];             \
                        const float v = (float)(acc + (double)LOAD(base[row * cols + col]));   \
                        out[row * cols + col] = STORE(v);                                      \
                        inf += COUNT(out[row * cols + col], v);                                \
                        if (OUT_CODE != F32)                                                   \
                            note_one(v, thr[row], OUT_CODE, index0 + row * cols + col, susp,   \
                                     cap, n_susp);                                             \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        for (int q = 0; q < (N); q++) inf += inf_lanes[q];                                     \
        return inf;                                                                            \
    }

/* scratch: TILE_ROWS x rank doubles, then as many floats. */
typedef Py_ssize_t (*kernel_fn)(const void *, const double *, const double *, void *,
                                Py_ssize_t, Py_ssize_t, Py_ssize_t, double *, const float *,
                                int64_t *, Py_ssize_t, Py_ssize_t *, Py_ssize_t, const fast_t *);

/* Every (base, output) kernel for one width, and their table P_KERNELS[base][output] (NULL
 * where the compiler has no _Float16). */
#if HAVE_FLOAT16
#define F16_KERNELS(P, N, TARGET)                                                             \
    KERNEL(P, N, TARGET, f16_f16, uint16_t, f16_to_f32, P##_load_f16, uint16_t, f32_to_f16,   \
           P##_store_f16, F16_INF, F16)                                                            \
    KERNEL(P, N, TARGET, f16_bf16, uint16_t, f16_to_f32, P##_load_f16, uint16_t, f32_to_bf16, \
           P##_store_bf16, BF16_INF, BF16)                                                         \
    KERNEL(P, N, TARGET, f16_f32, uint16_t, f16_to_f32, P##_load_f16, float, F32_STORE,       \
           P##_store_f32, NO_COUNT, F32)                                                           \
    KERNEL(P, N, TARGET, bf16_f16, uint16_t, bf16_to_f32, P##_load_bf16, uint16_t, f32_to_f16, \
           P##_store_f16, F16_INF, F16)                                                            \
    KERNEL(P, N, TARGET, f32_f16, float, F32_LOAD, P##_load_f32, uint16_t, f32_to_f16,        \
           P##_store_f16, F16_INF, F16)
#define WITH_F16(fn) fn
#else
#define F16_KERNELS(P, N, TARGET)
#define WITH_F16(fn) NULL
#endif

#define KERNEL_SET(P, N, TARGET)                                                              \
    VECTOR_OPS(P, N, TARGET)                                                                  \
    KERNEL(P, N, TARGET, bf16_bf16, uint16_t, bf16_to_f32, P##_load_bf16, uint16_t,           \
           f32_to_bf16, P##_store_bf16, BF16_INF, BF16)                                            \
    KERNEL(P, N, TARGET, f32_bf16, float, F32_LOAD, P##_load_f32, uint16_t, f32_to_bf16,      \
           P##_store_bf16, BF16_INF, BF16)                                                         \
    KERNEL(P, N, TARGET, bf16_f32, uint16_t, bf16_to_f32, P##_load_bf16, float, F32_STORE,    \
           P##_store_f32, NO_COUNT, F32)                                                           \
    KERNEL(P, N, TARGET, f32_f32, float, F32_LOAD, P##_load_f32, float, F32_STORE,            \
           P##_store_f32, NO_COUNT, F32)                                                           \
    F16_KERNELS(P, N, TARGET)                                                                 \
    static const kernel_fn P##_KERNELS[3][3] = {                                              \
        [BF16] = {[BF16] = P##_bf16_bf16, [F16] = WITH_F16(P##_bf16_f16),                     \
                  [F32] = P##_bf16_f32},                                                      \
        [F16] = {[BF16] = WITH_F16(P##_f16_bf16), [F16] = WITH_F16(P##_f16_f16),              \
                 [F32] = WITH_F16(P##_f16_f32)},                                              \
        [F32] = {[BF16] = P##_f32_bf16, [F16] = WITH_F16(P##_f32_f16), [F32] = P##_f32_f32},  \
    };

/* The widths this build has, widest first. On x86-64, GCC and Clang compile the wide ones for
 * their instruction sets whatever the build's target; the loader runs the widest the CPU (and
 * the OS, which must save the wide registers) supports. */
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define ANY_avx512(m) (_mm512_test_epi32_mask((__m512i)(m), (__m512i)(m)) != 0)
#define ANY_avx2(m) (!_mm256_testz_si256((__m256i)(m), (__m256i)(m)))
/* 16 lanes: the tests as mask registers, the 16-bit loads and stores one instruction each */
#define UNSURE_avx512(d, t, r, span)                                                          \
    ((_mm512_cmp_ps_mask((__m512)(d), (__m512)(t), _CMP_NGT_UQ) |                              \
      _mm512_cmpgt_epu32_mask((__m512i)(r), _mm512_set1_epi32((int)(span)))) != 0)
#define LOAD_U16_avx512(p) ((avx512_vu32)_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)(p))))
#define STORE_U16_avx512(p, u) _mm256_storeu_si256((void *)(p), _mm512_cvtepi32_epi16((__m512i)(u)))
#define LOAD_F32_F64_avx512(p) _mm512_cvtps_pd(_mm256_loadu_ps(p))
#define WIDEN_LO_avx512(v) _mm512_cvtps_pd(_mm512_castps512_ps256((__m512)(v)))
#define WIDEN_HI_avx512(v) _mm512_cvtps_pd(_mm512_extractf32x8_ps((__m512)(v), 1))
/* rounded to float32 to odd: truncated (embedded rounding), the last bit set where inexact */
#define TO_ODD_avx512(x)                                                                      \
    ({                                                                                        \
        const __m256 t_ = _mm512_cvt_roundpd_ps((__m512d)(x), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC); \
        const __mmask8 inexact_ = _mm512_cmp_pd_mask(_mm512_cvtps_pd(t_), (__m512d)(x), _CMP_NEQ_UQ); \
        _mm256_castsi256_ps(_mm256_mask_or_epi32(_mm256_castps_si256(t_), inexact_,         \
                                                 _mm256_castps_si256(t_), _mm256_set1_epi32(1))); \
    })
#define STORE_BF16_avx512(p, v) STORE_BF16_VEC(avx512, p, v)
#define UNSURE_avx2(d, t, r, span) UNSURE_VEC(avx2, d, t, r, span)
#define STORE_BF16_avx2(p, v) STORE_BF16_VEC(avx2, p, v)
#define LOAD_F32_F64_avx2(p) LOAD_F32_F64_VEC(avx2, p)
#define WIDEN_LO_avx2(v) WIDEN_LO_VEC(avx2, 8, v)
#define WIDEN_HI_avx2(v) WIDEN_HI_VEC(avx2, 8, v)
#define TO_ODD_avx2(x) avx2_to_odd_vec(x)
#define LOAD_U16_avx2(p) ((avx2_vu32)_mm256_cvtepu16_epi32(_mm_loadu_si128((const void *)(p))))
/* lanes below 2^16: unsigned saturation keeps them */
#define STORE_U16_avx2(p, u)                                                                  \
    _mm_storeu_si128((void *)(p), _mm_packus_epi32(_mm256_castsi256_si128((__m256i)(u)),       \
                                                   _mm256_extracti128_si256((__m256i)(u), 1)))
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
KERNEL_SET(avx512, 16, TARGET_AVX512)
KERNEL_SET(avx2, 8, TARGET_AVX2)
#if (defined(__clang__) && __clang_major__ >= 11) || (!defined(__clang__) && __GNUC__ >= 10)
/* AVX-512 with BF16 (Zen 4, Cooper Lake, Sapphire Rapids and later): the same code, proven
 * bfloat16 values stored by the hardware's rounding to nearest even (one instruction). */
#define HAVE_AVX512BF16 1
#define TARGET_AVX512BF16                                                                     \
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c")))
#define ANY_avx512bf16 ANY_avx512
#define UNSURE_avx512bf16 UNSURE_avx512
#define LOAD_U16_avx512bf16 LOAD_U16_avx512
#define STORE_U16_avx512bf16 STORE_U16_avx512
#define LOAD_F32_F64_avx512bf16 LOAD_F32_F64_avx512
#define WIDEN_LO_avx512bf16 WIDEN_LO_avx512
#define WIDEN_HI_avx512bf16 WIDEN_HI_avx512
#define TO_ODD_avx512bf16 TO_ODD_avx512
#define STORE_BF16_avx512bf16(p, v)                                                           \
    _mm256_storeu_si256((void *)(p), (__m256i)_mm512_cvtneps_pbh((__m512)(v)))
KERNEL_SET(avx512bf16, 16, TARGET_AVX512BF16)
#endif
#endif
/* Whether any of the four lanes is set: two 64-bit ORs. */
static inline int any_generic(const void *m) {
    uint64_t w[2];
    memcpy(w, m, sizeof w);
    return (w[0] | w[1]) != 0;
}
#define ANY_generic(m) any_generic(&(m))
#define STORE_BF16_generic(p, v) STORE_BF16_VEC(generic, p, v)
#define UNSURE_generic(d, t, r, span) UNSURE_VEC(generic, d, t, r, span)
#define LOAD_U16_generic(p) LOAD_U16_VEC(generic, p)
#define LOAD_F32_F64_generic(p) LOAD_F32_F64_VEC(generic, p)
#define WIDEN_LO_generic(v) WIDEN_LO_VEC(generic, 4, v)
#define WIDEN_HI_generic(v) WIDEN_HI_VEC(generic, 4, v)
#define TO_ODD_generic(x) generic_to_odd_vec(x)
#define STORE_U16_generic(p, u) STORE_U16_VEC(generic, p, u)
KERNEL_SET(generic, 4, )

typedef struct {
    const char *name;
    const kernel_fn (*kernels)[3];
} isa_t;

static const isa_t ALL_ISAS[] = {
#if defined(__x86_64__) && defined(__GNUC__)
#if HAVE_AVX512BF16
    {"avx512bf16", avx512bf16_KERNELS},
#endif
    {"avx512", avx512_KERNELS},
    {"avx2", avx2_KERNELS},
#endif
    {"generic", generic_KERNELS},
};
#define N_ISAS ((int)(sizeof ALL_ISAS / sizeof ALL_ISAS[0]))

static int isa_supported(const char *name) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    unsigned eax, ebx, ecx = 0, edx;
    int f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
    int avx2 = f16c && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                 __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                 __builtin_cpu_supports("avx512vl");
    if (strcmp(name, "avx512") == 0) return avx512;
#if HAVE_AVX512BF16
    if (strcmp(name, "avx512bf16") == 0) return avx512 && __builtin_cpu_supports("avx512bf16");
#endif
    if (strcmp(name, "avx2") == 0) return avx2;
#endif
    return strcmp(name, "generic") == 0;
}

static const isa_t *RUNNABLE[N_ISAS]; /* the ISAs this CPU runs, widest first */
static int n_runnable = 0;

static const char *const DTYPE_NAMES[] = {"bfloat16", "float16", "float32"};

static Py_ssize_t itemsize(int code) { return code == F32 ? 4 : 2; }

static int check_size(const char *fn, const Py_buffer *buf, const char *what,
                      Py_ssize_t expected) {
    if (buf->len != expected) {
        PyErr_Format(PyExc_ValueError, "%s: %s holds %zd bytes, expected %zd", fn, what,
                     buf->len, expected);
        return -1;
    }
    return 0;
}

/* The kernel for the dtype codes and the ISA named (NULL: the widest), after checking the
 * shapes and the sizes of out (unless NULL), base, left and right; NULL with an exception set
 * otherwise. */
static kernel_fn find_kernel(const char *fn, const Py_buffer *out, const Py_buffer *base,
                             const Py_buffer *left, const Py_buffer *right, Py_ssize_t rows,
                             Py_ssize_t cols, Py_ssize_t rank, int base_dt, int out_dt,
                             const char *isa_name) {
    if (rows < 0 || cols < 0 || rank < 0 || base_dt < BF16 || base_dt > F32 || out_dt < BF16 ||
        out_dt > F32) {
        PyErr_Format(PyExc_ValueError, "%s: bad shape or dtype code", fn);
        return NULL;
    }
    const isa_t *isa = RUNNABLE[0];
    if (isa_name != NULL) {
        isa = NULL;
        for (int i = 0; i < n_runnable; i++)
            if (strcmp(RUNNABLE[i]->name, isa_name) == 0) isa = RUNNABLE[i];
        if (isa == NULL) {
            PyErr_Format(PyExc_ValueError, "%s: this CPU cannot run isa %s", fn, isa_name);
            return NULL;
        }
    }
    const kernel_fn kernel = isa->kernels[base_dt][out_dt];
    if (kernel == NULL) {
        PyErr_Format(PyExc_NotImplementedError, "%s: float16 not supported here", fn);
        return NULL;
    }
    const Py_ssize_t right_cols = (cols + TILE_COLS - 1) / TILE_COLS * TILE_COLS; /* padded */
    if ((out != NULL && check_size(fn, out, "out", rows * cols * itemsize(out_dt))) ||
        check_size(fn, base, "base", rows * cols * itemsize(base_dt)) ||
        check_size(fn, left, "left", rows * rank * 8) ||
        check_size(fn, right, "right", rank * right_cols * 8))
        return NULL;
    return kernel;
}

/* An optional buffer argument: None leaves `b` empty; 0, or -1 with an exception set. */
static int optional_buffer(PyObject *o, Py_buffer *b, int writable) {
    if (o == NULL || o == Py_None) return 0;
    return PyObject_GetBuffer(o, b, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0));
}

/* The optional thresholds (rows floats, needed for 16-bit outputs) and suspects buffer (int64s:
 * its length is the capacity); 0, or -1 with an exception set. */
static int check_checks(const char *fn, int out_dt, const Py_buffer *thr, const Py_buffer *susp,
                        Py_ssize_t rows) {
    if (out_dt == F32) return 0;
    if (thr->buf == NULL || susp->buf == NULL) {
        PyErr_Format(PyExc_ValueError, "%s: 16-bit outputs need thr and suspects", fn);
        return -1;
    }
    return check_size(fn, thr, "thr", rows * 4);
}

/* The fast path's optional buffers (all four, or none: float64 sums then), checked against
 * the shapes; 0 with `fast` filled (or set to NULL), or -1 with an exception set. */
typedef struct {
    Py_buffer left, right, err, cnorm;
} fast_bufs_t;

static int get_fast(const char *fn, PyObject *const objs[4], int right_exact, fast_bufs_t *b,
                    Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t rank, fast_t *fast,
                    const fast_t **use) {
    Py_buffer *bufs[4] = {&b->left, &b->right, &b->err, &b->cnorm};
    int given = 0;
    *use = NULL;
    for (int q = 0; q < 4; q++) given += objs[q] != NULL && objs[q] != Py_None;
    if (given == 0) return 0;
    if (given != 4) {
        PyErr_Format(PyExc_ValueError, "%s: left32, right32, err and cnorm come together", fn);
        return -1;
    }
    for (int q = 0; q < 4; q++)
        if (optional_buffer(objs[q], bufs[q], 0) < 0) return -1;
    const Py_ssize_t padded = (cols + TILE_COLS - 1) / TILE_COLS * TILE_COLS;
    if (check_size(fn, &b->left, "left32", rows * rank * 4) ||
        check_size(fn, &b->right, "right32", rank * padded * 4) ||
        check_size(fn, &b->err, "err", rows * 4) || check_size(fn, &b->cnorm, "cnorm", padded * 4))
        return -1;
    fast->left = b->left.buf;
    fast->right = b->right.buf;
    fast->err = b->err.buf;
    fast->cnorm = b->cnorm.buf;
    fast->cmax = 0.0f;
    fast->right_exact = right_exact;
    for (Py_ssize_t j = 0; j < padded; j++) {
        const float c = fast->cnorm[j];
        if (!(c >= 0.0f && c <= 3.0e38f)) { /* NaN, inf or negative: no bound */
            PyErr_Format(PyExc_ValueError, "%s: cnorm holds %g", fn, (double)c);
            return -1;
        }
        if (c > fast->cmax) fast->cmax = c;
    }
    *use = fast;
    return 0;
}

static void release_fast(fast_bufs_t *b) {
    Py_buffer *bufs[4] = {&b->left, &b->right, &b->err, &b->cnorm};
    for (int q = 0; q < 4; q++)
        if (bufs[q]->obj != NULL) PyBuffer_Release(bufs[q]);
}

static double *new_scratch(Py_ssize_t rank) {
    double *scratch =
        PyMem_RawMalloc(2 * sizeof(double) * TILE_ROWS * (size_t)(rank > 0 ? rank : 1));
    if (scratch == NULL) PyErr_NoMemory();
    return scratch;
}

PyDoc_STRVAR(addmm_round_doc,
             "addmm_round(out, base, left, right, rows, cols, rank, base_dtype, out_dtype,\n"
             "            isa=None, thr=None, suspects=None, left32=None, right32=None,\n"
             "            err=None, cnorm=None, right_exact=False) -> (int, int)\n"
             "\n"
             "out = round(float(base + left @ right)), summed in float64 from zero, the base\n"
             "added last; with left32, right32 (left and right's tiles in float32), err (rows)\n"
             "and cnorm (the padded columns) given, 16-bit outputs sum in float32 and sum again\n"
             "in float64 only what err[i]*cnorm[j] does not prove (rounding.float32_bounds);\n"
             "right_exact: right32 holds right exactly (R = A of float32 or 16-bit factors), so\n"
             "those float64 sums read right32, which is in cache (a false claim gives wrong\n"
             "values: the caller checks it).\n"
             "\n"
             "out: writable C-contiguous buffer of rows*cols values of out_dtype; base: rows*cols\n"
             "values of base_dtype; left: float64 (rows, rank); right: float64 (rank, cols) in\n"
             "tiles of TILE_COLS columns, (ceil(cols / TILE_COLS), rank, TILE_COLS), zero-padded.\n"
             "Dtypes are the names in DTYPES. isa: one of ISAS (default: the first, the widest\n"
             "this CPU runs). 16-bit outputs need thr (float32, a threshold per row) and\n"
             "suspects (a writable int64 buffer): the flat indices of the values to settle\n"
             "(adapterctl.merge.rounding) are written there, as many as fit. Returns the number\n"
             "of finite sums that became infinite (16-bit outputs) and the number of\n"
             "suspects found (more than fit: the caller settles the whole tensor otherwise).");

static PyObject *addmm_round(PyObject *self, PyObject *args) {
    Py_buffer out, base, left, right, thr = {0}, susp = {0};
    fast_bufs_t fb = {0};
    fast_t fast;
    const fast_t *use = NULL;
    Py_ssize_t rows, cols, rank, inf = 0, n_susp = 0;
    int base_dt, out_dt;
    const char *isa_name = NULL;
    PyObject *thr_o = NULL, *susp_o = NULL, *f[4] = {NULL, NULL, NULL, NULL};
    int right_exact = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*y*y*y*nnnii|zOOOOOOp:addmm_round", &out, &base, &left,
                          &right, &rows, &cols, &rank, &base_dt, &out_dt, &isa_name, &thr_o,
                          &susp_o, &f[0], &f[1], &f[2], &f[3], &right_exact))
        return NULL;
    PyObject *result = NULL;
    double *scratch = NULL;
    if (optional_buffer(thr_o, &thr, 0) < 0 || optional_buffer(susp_o, &susp, 1) < 0) goto done;
    const kernel_fn kernel = find_kernel("addmm_round", &out, &base, &left, &right, rows, cols,
                                         rank, base_dt, out_dt, isa_name);
    if (kernel == NULL || check_checks("addmm_round", out_dt, &thr, &susp, rows) < 0 ||
        get_fast("addmm_round", f, right_exact, &fb, rows, cols, rank, &fast, &use) < 0 ||
        (scratch = new_scratch(rank)) == NULL)
        goto done;
    Py_BEGIN_ALLOW_THREADS;
    inf = kernel(base.buf, left.buf, right.buf, out.buf, rows, cols, rank, scratch, thr.buf,
                 susp.buf, susp.len / 8, &n_susp, 0, use);
    Py_END_ALLOW_THREADS;
    result = Py_BuildValue("(nn)", inf, n_susp);
done:
    PyMem_RawFree(scratch);
    release_fast(&fb);
    PyBuffer_Release(&out);
    PyBuffer_Release(&base);
    PyBuffer_Release(&left);
    PyBuffer_Release(&right);
    if (thr.obj != NULL) PyBuffer_Release(&thr);
    if (susp.obj != NULL) PyBuffer_Release(&susp);
    return result;
}

#ifndef _WIN32
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <unistd.h>

/* The base may be a memory map of its file (no copy through a read buffer). A file that
 * shrinks while it is read makes the mapped pages past its new end raise SIGBUS: the handler
 * below, installed the first time addmm_round_into runs (and kept: SIGBUS handlers are
 * process-wide), jumps back out of the kernel of the thread that faulted there, and the call
 * raises BufferError instead of the process dying. A SIGBUS anywhere else goes to the
 * handler that was there before (Python's faulthandler, or the default: the process dies). */
static _Thread_local sigjmp_buf *bus_guard; /* set while this thread reads a base */
static struct sigaction bus_previous;
static int bus_installed; /* under the GIL */

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    sigjmp_buf *guard = bus_guard;
    if (guard != NULL) {
        bus_guard = NULL;
        siglongjmp(*guard, 1);
    }
    if (bus_previous.sa_flags & SA_SIGINFO) {
        if (bus_previous.sa_sigaction != NULL) bus_previous.sa_sigaction(sig, info, context);
    } else if (bus_previous.sa_handler == SIG_DFL || bus_previous.sa_handler == SIG_IGN) {
        signal(sig, SIG_DFL); /* the faulting access runs again and ends the process */
    } else {
        bus_previous.sa_handler(sig);
    }
}

static int install_bus_guard(void) {
    if (bus_installed) return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &bus_previous) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    bus_installed = 1;
    return 0;
}

/* Writes n bytes at offset; returns 0, or the errno of a failed write. */
static int pwrite_all(int fd, const char *data, size_t n, long long offset) {
    while (n > 0) {
        ssize_t done = pwrite(fd, data, n, (off_t)offset);
        if (done < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (done == 0) return EIO;
        data += done;
        n -= (size_t)done;
        offset += done;
    }
    return 0;
}

/* One addmm_round_into call's work, block by block (see there). */
typedef struct {
    kernel_fn kernel;
    const char *in;
    const double *left;
    const void *right;
    void *buffer;
    const float *thr;
    int64_t *susp;
    const fast_t *fast;
    double *scratch;
    Py_ssize_t rows, cols, rank, block, cap, in_size, row_bytes;
    long long offset;
    int fd;
    Py_ssize_t inf, n_susp; /* out */
    int err;                /* out: errno of a failed write */
} blocks_t;

static void run_blocks(blocks_t *a) {
    for (Py_ssize_t r0 = 0; r0 < a->rows && a->err == 0; r0 += a->block) {
        const Py_ssize_t n = a->rows - r0 < a->block ? a->rows - r0 : a->block;
        fast_t part; /* the fast path's rows of this block */
        if (a->fast != NULL)
            part = (fast_t){a->fast->left + r0 * a->rank, a->fast->right, a->fast->err + r0,
                            a->fast->cnorm, a->fast->cmax, a->fast->right_exact};
        a->inf += a->kernel(a->in + r0 * a->cols * a->in_size, a->left + r0 * a->rank, a->right,
                            a->buffer, n, a->cols, a->rank, a->scratch,
                            a->thr == NULL ? NULL : a->thr + r0, a->susp, a->cap, &a->n_susp,
                            r0 * a->cols, a->fast == NULL ? NULL : &part);
        a->err = pwrite_all(a->fd, a->buffer, (size_t)(n * a->row_bytes),
                            a->offset + r0 * a->row_bytes);
    }
}

/* run_blocks with the SIGBUS guard up; 0, or -1 where reading the base faulted. */
static int guarded_blocks(blocks_t *a) {
    sigjmp_buf jump;
    if (sigsetjmp(jump, 1) != 0) return -1; /* back from on_sigbus */
    bus_guard = &jump;
    run_blocks(a);
    bus_guard = NULL;
    return 0;
}

PyDoc_STRVAR(addmm_round_into_doc,
             "addmm_round_into(fd, offset, buffer, base, left, right, rows, cols, rank,\n"
             "                 base_dtype, out_dtype, isa=None, thr=None, suspects=None,\n"
             "                 left32=None, right32=None, err=None, cnorm=None,\n"
             "                 right_exact=False) -> (int, int)\n"
             "\n"
             "addmm_round, block of rows by block of rows through `buffer` (writable; its size\n"
             "sets the block: a multiple of TILE_ROWS rows where it holds more than one tile),\n"
             "each block written with pwrite into the file `fd` at `offset` onwards. One call\n"
             "per tensor, the GIL released throughout. Raises OSError when a write fails, and\n"
             "BufferError when reading `base` faults (a memory map of a file that shrank).\n"
             "Returns what addmm_round returns; suspects are flat indices in the whole tensor.");

static PyObject *addmm_round_into(PyObject *self, PyObject *args) {
    Py_buffer buffer, base, left, right, thr = {0}, susp = {0};
    fast_bufs_t fb = {0};
    fast_t fast;
    const fast_t *use = NULL;
    int fd, base_dt, out_dt;
    long long offset;
    Py_ssize_t rows, cols, rank, inf = 0, n_susp = 0;
    const char *isa_name = NULL;
    PyObject *thr_o = NULL, *susp_o = NULL, *f[4] = {NULL, NULL, NULL, NULL};
    int right_exact = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "iLw*y*y*y*nnnii|zOOOOOOp:addmm_round_into", &fd, &offset,
                          &buffer, &base, &left, &right, &rows, &cols, &rank, &base_dt, &out_dt,
                          &isa_name, &thr_o, &susp_o, &f[0], &f[1], &f[2], &f[3],
                          &right_exact))
        return NULL;
    PyObject *result = NULL;
    double *scratch = NULL;
    if (optional_buffer(thr_o, &thr, 0) < 0 || optional_buffer(susp_o, &susp, 1) < 0) goto done;
    const kernel_fn kernel = find_kernel("addmm_round_into", NULL, &base, &left, &right, rows,
                                         cols, rank, base_dt, out_dt, isa_name);
    if (kernel == NULL || check_checks("addmm_round_into", out_dt, &thr, &susp, rows) < 0 ||
        get_fast("addmm_round_into", f, right_exact, &fb, rows, cols, rank, &fast, &use) < 0)
        goto done;
    const Py_ssize_t row_bytes = cols * itemsize(out_dt);
    if (rows == 0 || row_bytes == 0) { /* an empty tensor: nothing to write */
        result = Py_BuildValue("(nn)", (Py_ssize_t)0, (Py_ssize_t)0);
        goto done;
    }
    Py_ssize_t block = buffer.len / row_bytes;
    if (block > TILE_ROWS) block -= block % TILE_ROWS;
    if (block < 1 || offset < 0) {
        PyErr_SetString(PyExc_ValueError,
                        "addmm_round_into: buffer holds less than a row, or offset < 0");
        goto done;
    }
    if ((scratch = new_scratch(rank)) == NULL || install_bus_guard() < 0) goto done;
    blocks_t job = {
        .kernel = kernel, .in = base.buf, .left = left.buf, .right = right.buf,
        .buffer = buffer.buf, .thr = thr.buf, .susp = susp.buf, .fast = use,
        .scratch = scratch, .rows = rows, .cols = cols, .rank = rank, .block = block,
        .cap = susp.len / 8, .in_size = itemsize(base_dt), .row_bytes = row_bytes,
        .offset = offset, .fd = fd,
    };
    int faulted;
    Py_BEGIN_ALLOW_THREADS;
    faulted = guarded_blocks(&job);
    Py_END_ALLOW_THREADS;
    if (faulted) {
        PyErr_SetString(PyExc_BufferError,
                        "addmm_round_into: reading the base faulted (its file shrank?)");
        goto done;
    }
    if (job.err != 0) {
        errno = job.err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    inf = job.inf;
    n_susp = job.n_susp;
    result = Py_BuildValue("(nn)", inf, n_susp);
done:
    PyMem_RawFree(scratch);
    release_fast(&fb);
    PyBuffer_Release(&buffer);
    PyBuffer_Release(&base);
    PyBuffer_Release(&left);
    PyBuffer_Release(&right);
    if (thr.obj != NULL) PyBuffer_Release(&thr);
    if (susp.obj != NULL) PyBuffer_Release(&susp);
    return result;
}
#endif

static PyMethodDef methods[] = {
    {"addmm_round", addmm_round, METH_VARARGS, addmm_round_doc},
#ifndef _WIN32
    {"addmm_round_into", addmm_round_into, METH_VARARGS, addmm_round_into_doc},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fused",
    "The fused LoRA kernel of adapterctl's NumPy merge engine (adapterctl.merge.numpy_engine).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__fused(void) {
    n_runnable = 0;
    for (int i = 0; i < N_ISAS; i++)
        if (isa_supported(ALL_ISAS[i].name)) RUNNABLE[n_runnable++] = &ALL_ISAS[i];
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    PyObject *names = Py_BuildValue("(sss)", DTYPE_NAMES[0], DTYPE_NAMES[1], DTYPE_NAMES[2]);
    if (names == NULL || PyModule_AddObject(m, "DTYPES", names) < 0) {
        Py_XDECREF(names);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *isas = PyTuple_New(n_runnable);
    for (int i = 0; isas != NULL && i < n_runnable; i++) {
        PyObject *name = PyUnicode_FromString(RUNNABLE[i]->name);
        if (name == NULL) Py_CLEAR(isas);
        else PyTuple_SET_ITEM(isas, i, name);
    }
    if (isas == NULL || PyModule_AddObject(m, "ISAS", isas) < 0) {
        Py_XDECREF(isas);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "FLOAT16", HAVE_FLOAT16) < 0 ||
        PyModule_AddIntConstant(m, "TILE_ROWS", TILE_ROWS) < 0 ||
        PyModule_AddIntConstant(m, "TILE_COLS", TILE_COLS) < 0 ||
        PyModule_AddIntConstant(m, "FACTORS_FLOAT64", 1) < 0 ||
        PyModule_AddIntConstant(m, "FLOAT32_SUMS", 2) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
