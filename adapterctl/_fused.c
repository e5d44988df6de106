/* adapterctl._fused: the NumPy merge engine's fused kernel.
 *
 * One call merges a block of rows of a 16/32-bit weight in a single pass over memory:
 *
 *     out[i, j] = round_out( float(base[i, j]) + sum_k left[i, k] * right[k, j] )
 *
 * base (rows, cols) in bfloat16, float16 or float32; left (rows, rank) and right (rank, cols)
 * in float32: the LoRA factors with their coefficients (see merge_cpu._row_factors), right
 * passed in tiles of 32 columns, (ceil(cols / 32), rank, 32) zero-padded, so that the values
 * a tile of the output needs lie side by side (merge_cpu._right_tiles). The sum is taken in
 * float32 and rounded once into out (rows, cols): bfloat16 to nearest even with NaN kept quiet
 * (as torch and ml_dtypes round), float16 by the compiler's IEEE conversion (needs _Float16:
 * GCC 12+, Clang 15+; elsewhere float16 is refused and merge_cpu uses NumPy for it), or
 * float32. NumPy does the same in three passes (matmul, widening add, rounding); this is one,
 * with the running sums in registers.
 *
 * Built as an optional extension: where it cannot be compiled, merge_cpu uses NumPy alone.
 * The GIL is released while the kernel runs, so the engine's worker threads run it at once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__)
/* 64-byte vectors are only passed between inlined helpers: no ABI is crossed. */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(__FLT16_MAX__)
#define HAVE_FLOAT16 1
#else
#define HAVE_FLOAT16 0
#endif

/* One build runs at its best on AVX-512, AVX2 + FMA + F16C and plain x86-64 alike (GCC 12+
 * with glibc, whose loader picks the clone; elsewhere the baseline build). */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && \
    defined(__GLIBC__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

enum { BF16 = 0, F16 = 1, F32 = 2 };

/* The hot loop works on tiles of 4 rows x 32 columns: eight running sums of 16 floats held in
 * registers (GCC vector types: one AVX-512 register each, two AVX2 or four SSE ones), each
 * vector of `right` loaded once for the four rows and the tile's rank x 32 values of `right`
 * contiguous. */
typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu32 __attribute__((vector_size(64)));
typedef int32_t vi32 __attribute__((vector_size(64)));
typedef uint16_t vu16 __attribute__((vector_size(32)));
#if HAVE_FLOAT16
typedef _Float16 vh __attribute__((vector_size(32)));
#endif

#define V 16      /* floats in a vf */
#define TILE_ROWS 4
#define TILE_COLS (2 * V)

/* ---- conversions, one value (column tails) and 16 at once (the tiles); same arithmetic ---- */

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

static inline vf load_f32_v(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline vf load_bf16_v(const uint16_t *p) {
    vu16 h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu32) << 16);
}

static inline Py_ssize_t store_f32_v(float *p, vf v) {
    memcpy(p, &v, sizeof v);
    return 0;
}

static inline Py_ssize_t store_bf16_v(uint16_t *p, vf v) {
    vu32 u = (vu32)v;
    vu32 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    vu32 quiet = (u >> 16) | 0x40u;
    vu32 nan = (vu32)(v != v);
    vu16 h = __builtin_convertvector((quiet & nan) | (rounded & ~nan), vu16);
    memcpy(p, &h, sizeof h);
    return 0;
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

static inline vf load_f16_v(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, vf);
}

/* Stores 16 float16 values; returns how many finite sums overflowed to ±inf. */
static inline Py_ssize_t store_f16_v(uint16_t *p, vf v) {
    vh h = __builtin_convertvector(v, vh);
    memcpy(p, &h, sizeof h);
    vu16 bits;
    memcpy(&bits, &h, sizeof bits);
    vi32 inf = __builtin_convertvector((bits & 0x7FFFu) == 0x7C00u, vi32) & (v - v == 0.0f);
    Py_ssize_t n = 0;
    for (int t = 0; t < V; t++) n -= inf[t];
    return n;
}
#endif

#define F32_LOAD(x) (x)
#define F32_STORE(x) (x)
/* A float16 result is ±inf while its float32 sum was finite: the value overflowed. */
#define F16_INF(h, f) (((h) & 0x7FFFu) == 0x7C00u && (f) - (f) == 0.0f)
#define NO_COUNT(h, f) 0

/* Columns per panel: the panel of `right` (rank x width floats) stays in L2 while every row of
 * the block streams past it. Whole rows when it fits (rank 16 on a 11008-wide weight: 700 KiB);
 * high ranks (several adapters, r = 128...) would otherwise re-read `right` from memory for
 * every 4 rows. */
#define RIGHT_BUDGET (1 << 20)
/* right[k, col] in the tiled layout: (ceil(cols / 32), rank, 32), zero-padded. */
#define RIGHT_AT(k, col) (((col) / TILE_COLS * rank + (k)) * TILE_COLS + (col) % TILE_COLS)

static Py_ssize_t panel_width(Py_ssize_t rank, Py_ssize_t cols) {
    if (rank == 0) return cols > 0 ? cols : 1;
    Py_ssize_t width = RIGHT_BUDGET / (rank * (Py_ssize_t)sizeof(float));
    width -= width % TILE_COLS;
    if (width < TILE_COLS) width = TILE_COLS;
    return width < cols ? width : (cols > 0 ? cols : 1);
}

/* A kernel for one (base dtype, output dtype) pair; returns the number of float16 overflows.
 * Panel by panel of columns, rows go four at a time (past the last row, a tile repeats its
 * first row and stores it once); in each, whole tiles of 4 x 32 columns, then the panel's last
 * columns one by one. */
#define KERNEL(NAME, IN_T, LOAD, LOAD_V, OUT_T, STORE, STORE_V, COUNT)                       \
    CLONES static Py_ssize_t NAME(const void *base_, const float *left, const float *right, \
                                  void *out_, Py_ssize_t rows, Py_ssize_t cols,             \
                                  Py_ssize_t rank) {                                        \
        const IN_T *base = base_;                                                           \
        OUT_T *out = out_;                                                                  \
        Py_ssize_t inf = 0;                                                                 \
        const Py_ssize_t panel = panel_width(rank, cols);                                   \
        for (Py_ssize_t p = 0; p < cols; p += panel) {                                      \
            const Py_ssize_t p_end = p + panel < cols ? p + panel : cols;                   \
            for (Py_ssize_t i = 0; i < rows; i += TILE_ROWS) {                              \
                Py_ssize_t r_[TILE_ROWS];                                                   \
                for (int t = 0; t < TILE_ROWS; t++) r_[t] = i + t < rows ? i + t : i;       \
                const IN_T *b0 = base + r_[0] * cols, *b1 = base + r_[1] * cols;            \
                const IN_T *b2 = base + r_[2] * cols, *b3 = base + r_[3] * cols;            \
                const float *l0 = left + r_[0] * rank, *l1 = left + r_[1] * rank;          \
                const float *l2 = left + r_[2] * rank, *l3 = left + r_[3] * rank;          \
                OUT_T *o0 = out + r_[0] * cols, *o1 = out + r_[1] * cols;                   \
                OUT_T *o2 = out + r_[2] * cols, *o3 = out + r_[3] * cols;                   \
                Py_ssize_t j = p;                                                           \
                for (; j + TILE_COLS <= p_end; j += TILE_COLS) {                            \
                    vf a0 = LOAD_V(b0 + j), a1 = LOAD_V(b0 + j + V); /* row i   */          \
                    vf c0 = LOAD_V(b1 + j), c1 = LOAD_V(b1 + j + V); /* row i+1 */          \
                    vf d0 = LOAD_V(b2 + j), d1 = LOAD_V(b2 + j + V); /* row i+2 */          \
                    vf e0 = LOAD_V(b3 + j), e1 = LOAD_V(b3 + j + V); /* row i+3 */          \
                    const float *r = right + (j / TILE_COLS) * rank * TILE_COLS;            \
                    for (Py_ssize_t k = 0; k < rank; k++, r += TILE_COLS) {                 \
                        const vf r0 = load_f32_v(r), r1 = load_f32_v(r + V);                \
                        a0 += l0[k] * r0;                                                   \
                        a1 += l0[k] * r1;                                                   \
                        c0 += l1[k] * r0;                                                   \
                        c1 += l1[k] * r1;                                                   \
                        d0 += l2[k] * r0;                                                   \
                        d1 += l2[k] * r1;                                                   \
                        e0 += l3[k] * r0;                                                   \
                        e1 += l3[k] * r1;                                                   \
                    }                                                                       \
                    inf += STORE_V(o0 + j, a0) + STORE_V(o0 + j + V, a1);                   \
                    if (r_[1] != i) inf += STORE_V(o1 + j, c0) + STORE_V(o1 + j + V, c1);   \
                    if (r_[2] != i) inf += STORE_V(o2 + j, d0) + STORE_V(o2 + j + V, d1);   \
                    if (r_[3] != i) inf += STORE_V(o3 + j, e0) + STORE_V(o3 + j + V, e1);   \
                }                                                                           \
                for (Py_ssize_t row = i; row < i + TILE_ROWS && row < rows; row++) {        \
                    for (Py_ssize_t col = j; col < p_end; col++) {                          \
                        float acc = LOAD(base[row * cols + col]);                           \
                        for (Py_ssize_t k = 0; k < rank; k++)                               \
                            acc += left[row * rank + k] * right[RIGHT_AT(k, col)];          \
                        out[row * cols + col] = STORE(acc);                                 \
                        inf += COUNT(out[row * cols + col], acc);                           \
                    }                                                                       \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
        return inf;                                                                         \
    }

KERNEL(merge_bf16_bf16, uint16_t, bf16_to_f32, load_bf16_v, uint16_t, f32_to_bf16, store_bf16_v,
       NO_COUNT)
KERNEL(merge_f32_bf16, float, F32_LOAD, load_f32_v, uint16_t, f32_to_bf16, store_bf16_v, NO_COUNT)
KERNEL(merge_bf16_f32, uint16_t, bf16_to_f32, load_bf16_v, float, F32_STORE, store_f32_v, NO_COUNT)
KERNEL(merge_f32_f32, float, F32_LOAD, load_f32_v, float, F32_STORE, store_f32_v, NO_COUNT)
#if HAVE_FLOAT16
KERNEL(merge_f16_f16, uint16_t, f16_to_f32, load_f16_v, uint16_t, f32_to_f16, store_f16_v, F16_INF)
KERNEL(merge_f16_bf16, uint16_t, f16_to_f32, load_f16_v, uint16_t, f32_to_bf16, store_bf16_v,
       NO_COUNT)
KERNEL(merge_f16_f32, uint16_t, f16_to_f32, load_f16_v, float, F32_STORE, store_f32_v, NO_COUNT)
KERNEL(merge_bf16_f16, uint16_t, bf16_to_f32, load_bf16_v, uint16_t, f32_to_f16, store_f16_v,
       F16_INF)
KERNEL(merge_f32_f16, float, F32_LOAD, load_f32_v, uint16_t, f32_to_f16, store_f16_v, F16_INF)
#define WITH_F16(fn) fn
#else
#define WITH_F16(fn) NULL
#endif

typedef Py_ssize_t (*kernel_fn)(const void *, const float *, const float *, void *, Py_ssize_t,
                                Py_ssize_t, Py_ssize_t);

/* KERNELS[base dtype][output dtype]; NULL where the compiler has no _Float16. */
static const kernel_fn KERNELS[3][3] = {
    [BF16] = {[BF16] = merge_bf16_bf16, [F16] = WITH_F16(merge_bf16_f16), [F32] = merge_bf16_f32},
    [F16] = {[BF16] = WITH_F16(merge_f16_bf16), [F16] = WITH_F16(merge_f16_f16),
             [F32] = WITH_F16(merge_f16_f32)},
    [F32] = {[BF16] = merge_f32_bf16, [F16] = WITH_F16(merge_f32_f16), [F32] = merge_f32_f32},
};

static const char *const DTYPE_NAMES[] = {"bfloat16", "float16", "float32"};

static Py_ssize_t itemsize(int code) { return code == F32 ? 4 : 2; }

static int check_size(const Py_buffer *buf, const char *what, Py_ssize_t expected) {
    if (buf->len != expected) {
        PyErr_Format(PyExc_ValueError, "addmm_round: %s holds %zd bytes, expected %zd", what,
                     buf->len, expected);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(addmm_round_doc,
             "addmm_round(out, base, left, right, rows, cols, rank, base_dtype, out_dtype) -> int\n"
             "\n"
             "out = round(base + left @ right), summed in float32 and rounded once.\n"
             "\n"
             "out: writable C-contiguous buffer of rows*cols values of out_dtype; base: rows*cols\n"
             "values of base_dtype; left: float32 (rows, rank); right: float32 (rank, cols) in\n"
             "tiles of TILE_COLS columns, (ceil(cols / TILE_COLS), rank, TILE_COLS), zero-padded.\n"
             "Dtypes are the names in DTYPES. Returns the number of finite sums that became\n"
             "infinite (float16 outputs only).");

static PyObject *addmm_round(PyObject *self, PyObject *args) {
    Py_buffer out, base, left, right;
    Py_ssize_t rows, cols, rank, inf = 0;
    int base_dt, out_dt;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*y*y*y*nnnii:addmm_round", &out, &base, &left, &right, &rows,
                          &cols, &rank, &base_dt, &out_dt))
        return NULL;
    PyObject *result = NULL;
    if (rows < 0 || cols < 0 || rank < 0 || base_dt < BF16 || base_dt > F32 || out_dt < BF16 ||
        out_dt > F32) {
        PyErr_SetString(PyExc_ValueError, "addmm_round: bad shape or dtype code");
        goto done;
    }
    const kernel_fn kernel = KERNELS[base_dt][out_dt];
    if (kernel == NULL) {
        PyErr_SetString(PyExc_NotImplementedError, "addmm_round: float16 not supported here");
        goto done;
    }
    const Py_ssize_t right_cols = (cols + TILE_COLS - 1) / TILE_COLS * TILE_COLS; /* padded */
    if (check_size(&out, "out", rows * cols * itemsize(out_dt)) ||
        check_size(&base, "base", rows * cols * itemsize(base_dt)) ||
        check_size(&left, "left", rows * rank * 4) ||
        check_size(&right, "right", rank * right_cols * 4))
        goto done;
    Py_BEGIN_ALLOW_THREADS;
    inf = kernel(base.buf, left.buf, right.buf, out.buf, rows, cols, rank);
    Py_END_ALLOW_THREADS;
    result = PyLong_FromSsize_t(inf);
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&base);
    PyBuffer_Release(&left);
    PyBuffer_Release(&right);
    return result;
}

static PyMethodDef methods[] = {
    {"addmm_round", addmm_round, METH_VARARGS, addmm_round_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fused", "The NumPy merge engine's fused LoRA kernel (see merge_cpu).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__fused(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    PyObject *names = Py_BuildValue("(sss)", DTYPE_NAMES[0], DTYPE_NAMES[1], DTYPE_NAMES[2]);
    if (names == NULL || PyModule_AddObject(m, "DTYPES", names) < 0) {
        Py_XDECREF(names);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "FLOAT16", HAVE_FLOAT16) < 0 ||
        PyModule_AddIntConstant(m, "TILE_ROWS", TILE_ROWS) < 0 ||
        PyModule_AddIntConstant(m, "TILE_COLS", TILE_COLS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
