/* LoRA for a few tokens at a time on CPU, each token with its own adapter slot (a BGMV:
 * batched gather matrix-vector), in bf16 with float32 accumulation.
 *
 * Why a kernel: a decode step multiplies one row per sequence by thin matrices (k = 16..48
 * columns). oneDNN takes 60-80 us per bf16 product of that size, and torch's float32
 * path needs four operations per projection and reads the slots in float32 with the zero
 * blocks of a fused B: three times the adapter's own bytes. This reads each slot's bf16
 * weights once per tile of up to 4 tokens, skips B's zero blocks, and adds the delta into
 * ``out`` in place. Long runs of one slot (a prefill) go to sgmv.c instead.
 *
 * The slot layout is in lora_slots.h. Compiled at first use with -O3 -march=native (kernels/__init__.py) as a CPython
 * extension module: a METH_FASTCALL call costs well under a microsecond, where ctypes
 * spent several converting the arguments of each call.
 */
#include "common.h"
#include "lora_slots.h"

#define TILE 4  /* tokens of one slot that share each weight load */
_Static_assert(TILE == 4, "lora_bgmv_bf16 dispatches runs of 1..4 tokens");
#define ROWS 4  /* rows of A per shrink block; columns of out per expand block: ROWS * VL */
#define PF_ROWS 8  /* the shrink prefetches A this many rows ahead: the weights come from L3 or DRAM */

/* h[t][j] = A[j, :] . x_t for t < T, j < k. xs: the T token rows (bf16, [n_in]);
 * xf: the same as float32, [T, n_in]; a: [k, n_in]. Blocks of ROWS rows x T tokens keep
 * ROWS * T independent sums in registers; missing rows of the last block read ``zero_row``.
 * T is a constant at each call site (inlined). With AVX512-BF16, one vdpbf16ps multiplies
 * 32 bf16 pairs straight from memory (no conversion; twice the products of an FMA). */
static inline __attribute__((always_inline)) void shrink(
        int T, int64_t n_in, int64_t j_begin, int64_t j_end, int64_t k,
        const uint16_t *const *xs, const float *xf, const uint16_t *a,
        const uint16_t *zero_row, float *h, int64_t h_stride) {
#ifdef __AVX512BF16__
    const int64_t n_vec = n_in / (2 * VL) * (2 * VL);
#else
    const int64_t n_vec = n_in / VL * VL;
#endif
    for (int64_t j0 = j_begin; j0 < j_end; j0 += ROWS) {
        const uint16_t *row[ROWS];
        for (int q = 0; q < ROWS; q++) row[q] = j0 + q < k ? a + (j0 + q) * n_in : zero_row;
        f32v acc[TILE][ROWS] = {{{0}}};
#ifdef __AVX512BF16__
        for (int64_t i = 0; i < n_vec; i += 2 * VL) {
            for (int q = 0; q < ROWS; q++) __builtin_prefetch(row[q] + PF_ROWS * n_in + i);
            __m512bh w[ROWS];
            for (int q = 0; q < ROWS; q++) w[q] = (__m512bh)_mm512_loadu_si512(row[q] + i);
            for (int t = 0; t < T; t++) {
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(xs[t] + i);
                for (int q = 0; q < ROWS; q++)
                    acc[t][q] = (f32v)_mm512_dpbf16_ps((__m512)acc[t][q], xv, w[q]);
            }
        }
#else
        for (int64_t i = 0; i < n_vec; i += VL) {
            for (int q = 0; q < ROWS; q++) __builtin_prefetch(row[q] + PF_ROWS * n_in + i);
            f32v w[ROWS];
            for (int q = 0; q < ROWS; q++) w[q] = load_bf16(row[q] + i);
            for (int t = 0; t < T; t++) {
                const f32v xv = load_f32(xf + t * n_in + i);
                for (int q = 0; q < ROWS; q++) acc[t][q] += xv * w[q];
            }
        }
#endif
        for (int t = 0; t < T; t++)
            for (int q = 0; q < ROWS && j0 + q < k; q++) {
                float s = hsum(acc[t][q]);
                for (int64_t i = n_vec; i < n_in; i++) s += xf[t * n_in + i] * bf16_to_float(row[q][i]);
                h[t * h_stride + j0 + q] = s;
            }
    }
}

/* out[t, c0:c1] += sum_{j < r} h[t][j] * bt[j, c0:c1] for t < T; bt: rows of B^T (stride
 * n_out) of one slice, h already scaled by alpha; out rows given by ``out_rows``. */
static inline __attribute__((always_inline)) void expand(
        int T, int64_t r, int64_t c0, int64_t c1, int64_t n_out, const float *h,
        int64_t h_stride, const uint16_t *bt, uint16_t *const *out_rows) {
    int64_t c = c0;
    for (; c + ROWS * VL <= c1; c += ROWS * VL) {
        f32v acc[TILE][ROWS] = {{{0}}};
        for (int64_t j = 0; j < r; j++) {
            for (int q = 0; q < ROWS; q += 2) __builtin_prefetch(bt + (j + 2) * n_out + c + q * VL);
            f32v w[ROWS];
            for (int q = 0; q < ROWS; q++) w[q] = load_bf16(bt + j * n_out + c + q * VL);
            for (int t = 0; t < T; t++) {
                const float hj = h[t * h_stride + j];
                for (int q = 0; q < ROWS; q++) acc[t][q] += hj * w[q];
            }
        }
        for (int t = 0; t < T; t++)
            for (int q = 0; q < ROWS; q++) {
                uint16_t *o = out_rows[t] + c + q * VL;
                store_bf16(o, load_bf16(o) + acc[t][q]);
            }
    }
    for (; c < c1; c++)  /* columns past the last full block (sizes not a multiple of 64) */
        for (int t = 0; t < T; t++) {
            float s = 0.0f;
            for (int64_t j = 0; j < r; j++) s += h[t * h_stride + j] * bf16_to_float(bt[j * n_out + c]);
            out_rows[t][c] = float_to_bf16(bf16_to_float(out_rows[t][c]) + s);
        }
}

/* The start of part ``part`` of ``parts`` equal shares of n items. */
static inline int64_t share(int64_t n, int part, int parts) { return n * part / parts; }

/* T tokens (rows[0..T)) of one slot: shrink, scale, expand slice by slice; this call does
 * part ``part`` of ``parts``. With parts > 1 every thread of an OpenMP team calls it with
 * the same xf and h: each shrinks its share of A's row blocks and, after a barrier, adds
 * its share of each slice's column blocks. */
static inline __attribute__((always_inline)) void tile(
        int T, const int32_t *rows, int64_t n_in, int64_t num_slices, const int64_t *out_offsets,
        const uint16_t *x, int64_t x_stride, uint16_t *out, int64_t out_stride, int64_t r,
        const uint16_t *a, const uint16_t *bt, int64_t max_k, float alpha, float *xf,
        float *h, const uint16_t *zero_row, int part, int parts) {
    const int64_t k = num_slices * r, n_out = out_offsets[num_slices];
    uint16_t *out_rows[TILE];
    const uint16_t *xs[TILE];
    for (int t = 0; t < T; t++) {
        xs[t] = x + rows[t] * x_stride;
        out_rows[t] = out + rows[t] * out_stride;
        if (part == 0)
            for (int64_t i = 0; i < n_in; i++) xf[t * n_in + i] = bf16_to_float(xs[t][i]);
    }
#ifdef _OPENMP
    if (parts > 1) {
#pragma omp barrier
    }
#endif
    const int64_t blocks = (k + ROWS - 1) / ROWS;
    const int64_t j_begin = ROWS * share(blocks, part, parts);
    const int64_t j_end = part == parts - 1 ? k : ROWS * share(blocks, part + 1, parts);
    shrink(T, n_in, j_begin, j_end, k, xs, xf, a, zero_row, h, max_k);
    for (int t = 0; t < T; t++)
        for (int64_t j = j_begin; j < j_end; j++) h[t * max_k + j] *= alpha;
#ifdef _OPENMP
    if (parts > 1) {
#pragma omp barrier
    }
#endif
    for (int64_t s = 0; s < num_slices; s++) {
        const int64_t c0 = out_offsets[s], c1 = out_offsets[s + 1], full = (c1 - c0) / (ROWS * VL);
        const int64_t begin = c0 + ROWS * VL * share(full, part, parts);
        const int64_t end = part == parts - 1 ? c1 : c0 + ROWS * VL * share(full, part + 1, parts);
        expand(T, r, begin, end, n_out, h + s * r, max_k, bt + s * r * n_out, out_rows);
    }
}

/* One run of up to TILE tokens; T must be a constant at each tile() call for its inlined
 * loops to unroll. */
static inline void run_tile(int64_t run, const int32_t *rows, const struct lora_slots *w,
                            int64_t r, const uint16_t *a, const uint16_t *bt, const uint16_t *x,
                            int64_t x_stride, uint16_t *out, int64_t out_stride, float alpha,
                            float *xf, float *h, const uint16_t *zero_row, int part, int parts) {
#define TILE_OF(T) tile(T, rows, w->n_in, w->num_slices, w->out_offsets, x, x_stride, out, \
                        out_stride, r, a, bt, w->max_k, alpha, xf, h, zero_row, part, parts)
    switch (run) {
        case 4: TILE_OF(4); break;
        case 3: TILE_OF(3); break;
        case 2: TILE_OF(2); break;
        default: TILE_OF(1); break;
    }
#undef TILE_OF
}

/* Scratch memory of each thread, grown on demand and kept: a decode step makes hundreds
 * of calls, each too short to pay for a malloc and a calloc. */
static __thread float *scratch;
static __thread int64_t scratch_floats;
static __thread uint16_t *zeros;
static __thread int64_t zeros_len;
static __thread int64_t *runs;  /* the calling thread's tile list: [n + 1] starts */
static __thread int64_t runs_len;

static int reserve(int64_t floats, int64_t n_zeros) {
    if (floats > scratch_floats) {
        float *grown = malloc(sizeof(float) * (size_t)floats);
        if (grown == NULL) return -1;
        free(scratch);
        scratch = grown;
        scratch_floats = floats;
    }
    if (n_zeros > zeros_len) {
        uint16_t *grown = calloc((size_t)n_zeros, sizeof(uint16_t));
        if (grown == NULL) return -1;
        free(zeros);
        zeros = grown;
        zeros_len = n_zeros;
    }
    return 0;
}

/* out[rows[i], :] += alpha * B_s (A_s x[rows[i], :]) with s = slots[i], for i < n, skipping
 * slots of rank 0 in w->slot_ranks. Entries with the same slot should be adjacent: runs of
 * up to TILE share their weight loads. The work is shared among the OpenMP threads (the
 * ones torch uses between its own products): the runs when there are two or more (at 32
 * tokens the LoRA work on one core took 11% of a step that the base products spread over
 * two), else the one run's rows of A and columns of B (batch 1: two cores bring in the
 * weights faster than one).
 * Returns 0, or -1 if the scratch memory could not be allocated (``out`` may be partly
 * updated then). */
static int lora_bgmv_bf16(const struct lora_slots *w, int64_t n, const int32_t *rows,
                          const int32_t *slots, const uint16_t *x, int64_t x_stride,
                          uint16_t *out, int64_t out_stride, float alpha) {
    const int64_t n_in = w->n_in, max_k = w->max_k;
    if (n + 1 > runs_len) {
        int64_t *grown = malloc(sizeof(int64_t) * (size_t)(n + 1));
        if (grown == NULL) return -1;
        free(runs);
        runs = grown;
        runs_len = n + 1;
    }
    int64_t num_runs = 0;
    for (int64_t i = 0; i < n; num_runs++) {
        runs[num_runs] = i;
        int64_t run = 1;
        while (i + run < n && run < TILE && slots[i + run] == slots[i]) run++;
        i += run;
    }
    runs[num_runs] = n;
    const int64_t *starts = runs;
    if (num_runs == 1 && w->slot_ranks[slots[0]] > 0 && w->num_threads > 1) {
        if (reserve(TILE * n_in + TILE * max_k, n_in)) return -1;
        float *xf = scratch, *h = scratch + TILE * n_in; /* this thread's: shared by the team */
        const uint16_t *zero_row = zeros;
        const int32_t slot = slots[0];
        const uint16_t *a = w->a_flat + slot * w->a_slot_stride;
        const uint16_t *bt = w->b_flat + slot * w->b_slot_stride;
#pragma omp parallel num_threads(w->num_threads)
        {
#ifdef _OPENMP
            const int part = omp_get_thread_num(), parts = omp_get_num_threads();
#else
            const int part = 0, parts = 1;
#endif
            run_tile(n, rows, w, w->slot_ranks[slot], a, bt, x, x_stride, out, out_stride,
                     alpha, xf, h, zero_row, part, parts);
        }
        prefetch_next(w, n, slots);
        return 0;
    }
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) if (num_runs >= 2) num_threads(w->num_threads) \
    reduction(| : failed)
    for (int64_t u = 0; u < num_runs; u++) {
        const int64_t i = starts[u], run = starts[u + 1] - i;
        const int32_t slot = slots[i];
        const int64_t r = w->slot_ranks[slot];
        if (r == 0) continue;
        if (reserve(TILE * n_in + TILE * max_k, n_in)) {
            failed = 1;
            continue;
        }
        float *xf = scratch, *h = scratch + TILE * n_in; /* [TILE, n_in], [TILE, max_k] */
        const uint16_t *a = w->a_flat + slot * w->a_slot_stride;
        const uint16_t *bt = w->b_flat + slot * w->b_slot_stride;
        run_tile(run, rows + i, w, r, a, bt, x, x_stride, out, out_stride, alpha, xf, h, zeros,
                 0, 1);
    }
    prefetch_next(w, n, slots);
    return failed ? -1 : 0;
}

/* Python: add(slots, n, rows, token_slots, x, x_stride, out, out_stride, alpha) -> None.
 * Pointers and sizes are ints (addresses from ctypes.addressof and Tensor.data_ptr()),
 * alpha a float; raises MemoryError when the scratch memory cannot grow. */
static PyObject *py_add(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t v[8];
    double alpha;
    if (fastcall_args("add", args, nargs, 9, 8, v, &alpha)) return NULL;
    if (lora_bgmv_bf16((const struct lora_slots *)(intptr_t)v[0], v[1], (const int32_t *)(intptr_t)v[2],
                       (const int32_t *)(intptr_t)v[3], (const uint16_t *)(intptr_t)v[4], v[5],
                       (uint16_t *)(intptr_t)v[6], v[7], (float)alpha))
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"add", (PyCFunction)(void (*)(void))py_add, METH_FASTCALL,
     "out[rows[i]] += alpha * B_s (A_s x[rows[i]]), s = token_slots[i]; see bgmv.c"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_loraplex_bgmv", NULL, -1, methods};

PyMODINIT_FUNC PyInit__loraplex_bgmv(void) { return PyModule_Create(&module); }
