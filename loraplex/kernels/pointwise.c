/* A decoder layer's per-token ops in bf16 on CPU: the residual add with the RMSNorm after
 * it, and the SiLU-gated product of the MLP.
 *
 * Why a kernel: torch runs RMSNorm on bf16 as eight operations (cast, square, mean, add,
 * rsqrt, two products, cast back) and the gated product as two; on a decode step of a few
 * rows each one is dispatch, not arithmetic: 23 us per norm and 12-26 us per gated
 * product measured here, ~1.5-2.5 ms of a 25-30 ms step of the default model. One call
 * here takes one or two microseconds.
 *
 * Rounding follows torch's so results match it to float32 summation order: the sum
 * x + residual is rounded to bf16 (it is the next residual), the norm is computed in
 * float32 from it and rounded once after the weight; SiLU is rounded to bf16 before the
 * product, as ``F.silu(gate) * up`` does in bf16.
 */
#include "common.h"
#include <math.h>

typedef int32_t i32v __attribute__((vector_size(VL * 4)));

/* Lanes of a where mask is set, else of b (mask: a vector comparison's result). */
static inline f32v select_f32v(i32v mask, f32v a, f32v b) {
    i32v ia, ib;
    memcpy(&ia, &a, sizeof ia);
    memcpy(&ib, &b, sizeof ib);
    const i32v bits = (mask & ia) | (~mask & ib);
    f32v out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

/* e^x as 2^n * 2^f with n = round(x log2 e), f in [-0.5, 0.5] and a degree-6 polynomial
 * for 2^f (relative error ~2e-7, far under bf16's 4e-3); x is clamped to +-87, where
 * float32 over- or underflows. */
static inline f32v exp_f32v(f32v x) {
    const f32v hi = (f32v){0} + 126.0f, lo = (f32v){0} - 126.0f;
    f32v t = x * 1.44269504f;
    t = select_f32v(t > hi, hi, t);
    t = select_f32v(t < lo, lo, t);
    const float magic = 12582912.0f;  /* 1.5 * 2^23: adding it rounds to an integer, ties to even */
    const f32v n = (t + magic) - magic;
    const f32v f = t - n;
    /* 2^f = e^(f ln 2): the Taylor coefficients (ln 2)^k / k!. */
    f32v p = 0.000154035304f * f + 0.00133335581f;
    p = p * f + 0.00961812911f;
    p = p * f + 0.0555041087f;
    p = p * f + 0.240226507f;
    p = p * f + 0.693147181f;
    p = p * f + 1.0f;
    const i32v bits = (__builtin_convertvector(n, i32v) + 127) << 23;
    f32v scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Row of d: x <- bf16(x + res) (res may be NULL: x unchanged), out <- bf16(x * inv_rms * w). */
static void add_rms_norm_row(uint16_t *x, const uint16_t *res, const uint16_t *w, uint16_t *out,
                             int64_t d, float eps) {
    f32v acc = {0};
    float tail = 0.0f;
    int64_t i = 0;
    for (; i + VL <= d; i += VL) {
        if (res != NULL) store_bf16(x + i, load_bf16(x + i) + load_bf16(res + i));
        const f32v s = load_bf16(x + i);
        acc += s * s;
    }
    for (; i < d; i++) {
        if (res != NULL) x[i] = float_to_bf16(bf16_to_float(x[i]) + bf16_to_float(res[i]));
        const float s = bf16_to_float(x[i]);
        tail += s * s;
    }
    const float inv = 1.0f / sqrtf((hsum(acc) + tail) / (float)d + eps);
    for (i = 0; i + VL <= d; i += VL) store_bf16(out + i, load_bf16(x + i) * inv * load_bf16(w + i));
    for (; i < d; i++) out[i] = float_to_bf16(bf16_to_float(x[i]) * inv * bf16_to_float(w[i]));
}

/* Row of gu = [gate | up], each of n: out <- bf16(bf16(silu(gate)) * up). */
static void silu_mul_row(const uint16_t *gu, uint16_t *out, int64_t n) {
    const uint16_t *up = gu + n;
    int64_t i = 0;
    for (; i + VL <= n; i += VL) {
        const f32v g = load_bf16(gu + i);
        uint16_t silu[VL];
        store_bf16(silu, g / (1.0f + exp_f32v(-g)));
        store_bf16(out + i, load_bf16(silu) * load_bf16(up + i));
    }
    for (; i < n; i++) {
        const float g = bf16_to_float(gu[i]);
        const float silu = bf16_to_float(float_to_bf16(g / (1.0f + expf(-g))));
        out[i] = float_to_bf16(silu * bf16_to_float(up[i]));
    }
}

/* Rows are shared among the threads only from this many on: below it a parallel region
 * costs more than the rows (a decode step has 1-64). */
#define PARALLEL_ROWS 64

/* Python: add_rms_norm(x, residual, weight, out, rows, d, eps, num_threads) -> None;
 * pointers as ints (residual 0 for none), rows [rows, d] contiguous. */
static PyObject *py_add_rms_norm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t v[7];  /* x, residual, weight, out, rows, d, num_threads */
    double eps;
    if (fastcall_args("add_rms_norm", args, nargs, 8, 6, v, &eps)) return NULL;
    const int64_t threads = v[6];
    uint16_t *x = (uint16_t *)(intptr_t)v[0], *out = (uint16_t *)(intptr_t)v[3];
    const uint16_t *res = (const uint16_t *)(intptr_t)v[1], *w = (const uint16_t *)(intptr_t)v[2];
    const int64_t rows = v[4], d = v[5];
#pragma omp parallel for if (rows >= PARALLEL_ROWS) num_threads(threads)
    for (int64_t r = 0; r < rows; r++)
        add_rms_norm_row(x + r * d, res == NULL ? NULL : res + r * d, w, out + r * d, d, (float)eps);
    Py_RETURN_NONE;
}

/* Python: silu_mul(gate_up, out, rows, n, num_threads) -> None; gate_up [rows, 2n] and
 * out [rows, n] contiguous. */
static PyObject *py_silu_mul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t v[5];
    if (fastcall_args("silu_mul", args, nargs, 5, -1, v, NULL)) return NULL;
    const uint16_t *gu = (const uint16_t *)(intptr_t)v[0];
    uint16_t *out = (uint16_t *)(intptr_t)v[1];
    const int64_t rows = v[2], n = v[3];
#pragma omp parallel for if (rows >= PARALLEL_ROWS) num_threads(v[4])
    for (int64_t r = 0; r < rows; r++) silu_mul_row(gu + r * 2 * n, out + r * n, n);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"add_rms_norm", (PyCFunction)(void (*)(void))py_add_rms_norm, METH_FASTCALL,
     "x <- x + residual (bf16), out <- RMSNorm(x) * weight; see pointwise.c"},
    {"silu_mul", (PyCFunction)(void (*)(void))py_silu_mul, METH_FASTCALL,
     "out <- silu(gate) * up for rows of [gate | up]; see pointwise.c"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_loraplex_pointwise", NULL, -1, methods};

PyMODINIT_FUNC PyInit__loraplex_pointwise(void) { return PyModule_Create(&module); }
