/* What the kernels of this folder share: bf16 <-> float32 on vectors of 16 floats (GCC
 * vector extensions: AVX-512 where the CPU has it, narrower elsewhere), the CPython
 * entry-point helpers, and OpenMP. Included once per kernel source, never installed. */
#ifndef LORAPLEX_KERNELS_COMMON_H
#define LORAPLEX_KERNELS_COMMON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define VL 16   /* floats per vector */

typedef float f32v __attribute__((vector_size(VL * 4)));
typedef uint32_t u32v __attribute__((vector_size(VL * 4)));
typedef uint16_t u16v __attribute__((vector_size(VL * 2)));

static inline f32v load_bf16(const uint16_t *p) {
    u16v half;
    memcpy(&half, p, sizeof half);
    u32v bits = __builtin_convertvector(half, u32v) << 16;
    f32v f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline f32v load_f32(const float *p) {
    f32v v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Round to nearest even, as torch does; NaN stays NaN. */
static inline void store_bf16(uint16_t *p, f32v f) {
    u32v bits;
    memcpy(&bits, &f, sizeof bits);
    u32v rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    u32v nan = (bits >> 16) | 0x40u;
    u32v is_nan = (u32v)((bits & 0x7fffffffu) > 0x7f800000u);
    u16v half = __builtin_convertvector((is_nan & nan) | (~is_nan & rounded), u16v);
    memcpy(p, &half, sizeof half);
}

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* store_bf16's rounding for one value. */
static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* Sum of the lanes as a tree (depth 4, not a chain of 15 dependent adds). */
static inline float hsum(f32v v) {
    for (int width = VL / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) v[l] += v[l + width];
    return v[0];
}

/* A METH_FASTCALL entry point's arguments: exactly ``want`` of them, all Python ints
 * (addresses, sizes) stored in order in ``ints``, except the one at ``float_at`` (-1: none),
 * a float, stored in ``*f``. Returns 0, or -1 with the error set. */
static inline int fastcall_args(const char *name, PyObject *const *args, Py_ssize_t nargs,
                                Py_ssize_t want, Py_ssize_t float_at, int64_t *ints, double *f) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments, got %zd", name, want, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < want; i++) {
        if (i == float_at) {
            *f = PyFloat_AsDouble(args[i]);
            if (*f == -1.0 && PyErr_Occurred()) return -1;
            continue;
        }
        *ints = PyLong_AsLongLong(args[i]);
        if (*ints == -1 && PyErr_Occurred()) return -1;
        ints++;
    }
    return 0;
}

#endif
