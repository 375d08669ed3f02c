/* LoRA for long runs of tokens of one adapter slot on CPU (an SGMV: segmented gather matrix
 * multiply), in bf16 with float32 accumulation: a prefill's shrink and expand as two thin
 * matrix products per row block, the delta added into ``out`` in place.
 *
 * Why a kernel: at 512 rows the products are [512, in] @ [in, k] and [512, r] @ [r, out]
 * with k = 16..48 and r = 16. oneDNN runs such thin shapes at about a third of its rate on
 * the base's square ones (torch's path took 0.74-0.94 ms per layer of the default model,
 * where the adapter's arithmetic is 4% of the base's ~9 ms), and the delta is written, read
 * and added as separate passes. bgmv.c's dot-product layout suits a few rows, not hundreds.
 * This takes 0.51-0.63 ms per layer there.
 *
 * Per run of one slot, the threads first repack its weights for vdpbf16ps, whose operands
 * are pairs of bf16 along the summed dimension (~70 KB per projection, 6-11 us):
 *   A^T as ap[p][j] = (A[j, 2p], A[j, 2p+1]) for p < in / 2, j < kp (k padded to 16 columns)
 *   each slice's B^T as bp[q][c] = (B^T[2q, c], B^T[2q+1, c]) for q < rp / 2 (r padded to even)
 * then share the run's rows in blocks of MB. Per block: h = x A^T in float32 (one vector per
 * 16 columns of k, MB rows at once), h * alpha rounded to bf16 (as torch's bf16 path rounds
 * it), then per slice and 48 columns at a time out += h_slice B_slice^T, added to out's bf16
 * values and rounded once. B's zero blocks are never read.
 *
 * Needs AVX512-BF16; elsewhere ``SUPPORTED`` is 0 and the caller uses torch.
 */
#include "common.h"
#include "lora_slots.h"

#define MB 8  /* rows per block: shrink and expand reuse each weight vector MB times */
#define EXPAND_NV 3  /* the expand's vectors of 16 columns per step: MB x 3 = 24 sums in registers */

#ifdef __AVX512BF16__

static inline uint32_t load_pair(const uint16_t *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* h[i][kc + 16 v + l] = sum_p x_i[2p..2p+1] . ap[p][kc + 16 v + l] for rows i < MB, v < NV.
 * xr: MB row pointers (missing rows repeat a real one; their sums are not stored); NV is a
 * constant at each call (inlined). */
static inline __attribute__((always_inline)) void shrink_block(
        int NV, int mb, const uint16_t *const *xr, int64_t n_in, const uint32_t *ap, int64_t kp,
        int64_t kc, const uint16_t *a, int64_t k, float *h) {
    __m512 acc[MB][3];
    for (int i = 0; i < MB; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = _mm512_setzero_ps();
    const int64_t pairs = n_in / 2;
    for (int64_t p = 0; p < pairs; p++) {
        __m512bh w[3];
        for (int v = 0; v < NV; v++) w[v] = (__m512bh)_mm512_loadu_si512(ap + p * kp + kc + 16 * v);
        for (int i = 0; i < MB; i++) {
            const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)load_pair(xr[i] + 2 * p));
            for (int v = 0; v < NV; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], xv, w[v]);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(h + i * kp + kc + 16 * v, acc[i][v]);
    if (n_in % 2)  /* the last input column has no partner: add it here */
        for (int i = 0; i < mb; i++)
            for (int64_t j = kc; j < kc + 16 * NV && j < k; j++)
                h[i * kp + j] += bf16_to_float(xr[i][n_in - 1]) * bf16_to_float(a[j * n_in + n_in - 1]);
}

/* Mask of the lanes of a 16-column vector at column c that fall before ``cols``. */
static inline __mmask16 tail_mask(int64_t c, int64_t cols) {
    const int64_t left = cols - c;
    return left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

/* out_i[c0 + c] += sum_q hb_i[2q..2q+1] . bp[q][c] for rows i < MB, c < cols: one slice.
 * hb: bf16 pairs of the block's scaled h for this slice, row stride hb_stride (in pairs);
 * out_rows: MB rows (a block's missing rows point to a spare row). */
static inline void expand_slice(uint16_t *const *out_rows, int64_t c0, int64_t cols,
                                const uint32_t *bp, int64_t rpairs, const uint32_t *hb,
                                int64_t hb_stride) {
    for (int64_t c = 0; c < cols; c += 16 * EXPAND_NV) {
        __mmask16 m[EXPAND_NV];
        for (int v = 0; v < EXPAND_NV; v++) m[v] = tail_mask(c + 16 * v, cols);
        __m512 acc[MB][EXPAND_NV];
        for (int i = 0; i < MB; i++)
            for (int v = 0; v < EXPAND_NV; v++) acc[i][v] = _mm512_setzero_ps();
        for (int64_t q = 0; q < rpairs; q++) {
            __m512bh w[EXPAND_NV];
            for (int v = 0; v < EXPAND_NV; v++)
                w[v] = (__m512bh)_mm512_maskz_loadu_epi32(m[v], bp + q * cols + c + 16 * v);
            for (int i = 0; i < MB; i++) {
                const __m512bh hv = (__m512bh)_mm512_set1_epi32((int)hb[i * hb_stride + q]);
                for (int v = 0; v < EXPAND_NV; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], hv, w[v]);
            }
        }
        for (int i = 0; i < MB; i++)  /* all MB rows, masked: the sums stay in registers */
            for (int v = 0; v < EXPAND_NV; v++) {
                uint16_t *o = out_rows[i] + c0 + c + 16 * v;
                const __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m[v], o));
                const __m512 sum = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)),
                                                 acc[i][v]);
                _mm256_mask_storeu_epi16(o, m[v], (__m256i)_mm512_cvtneps_pbh(sum));
            }
    }
}

/* Packed weights of the run being computed (shared by the team; the calling thread's). */
static __thread uint32_t *packed;
static __thread int64_t packed_len;
/* Each thread's block scratch: h [MB, kp] float32, hb [MB, S * rp / 2] bf16 pairs, and a
 * spare output row [n_out] bf16 that a block's missing rows write to. */
static __thread float *block_h;
static __thread int64_t block_h_len;

static int grow(void **buf, int64_t *len, int64_t need, size_t elem) {
    if (need <= *len) return 0;
    void *grown = malloc(elem * (size_t)need);
    if (grown == NULL) return -1;
    free(*buf);
    *buf = grown;
    *len = need;
    return 0;
}

/* The rows rows[0..n) all use ``slot`` (rank r > 0): out[rows[i]] += alpha * B (A x[rows[i]]). */
static int run_slot(const struct lora_slots *w, int32_t slot, int64_t r, int64_t n,
                    const int32_t *rows, const uint16_t *x, int64_t x_stride, uint16_t *out,
                    int64_t out_stride, float alpha) {
    const int64_t n_in = w->n_in, S = w->num_slices, n_out = w->out_offsets[S];
    const int64_t k = S * r, kp = (k + 15) / 16 * 16, rp = (r + 1) / 2 * 2, pairs = n_in / 2;
    const uint16_t *a = w->a_flat + slot * w->a_slot_stride;
    const uint16_t *bt = w->b_flat + slot * w->b_slot_stride;
    if (grow((void **)&packed, &packed_len, pairs * kp + rp / 2 * n_out, sizeof(uint32_t))) return -1;
    uint32_t *ap = packed, *bp = packed + pairs * kp; /* bp: slice s at bp + rp / 2 * out_offsets[s] */
    const int64_t blocks = (n + MB - 1) / MB, hb_stride = S * rp / 2;
    int failed = 0;
#pragma omp parallel num_threads(w->num_threads) reduction(| : failed)
    {
#pragma omp for schedule(static)
        for (int64_t p = 0; p < pairs; p++) {
            for (int64_t j = 0; j < k; j++) ap[p * kp + j] = load_pair(a + j * n_in + 2 * p);
            for (int64_t j = k; j < kp; j++) ap[p * kp + j] = 0;
        }
#pragma omp for schedule(static) collapse(2)
        for (int64_t s = 0; s < S; s++)
            for (int64_t q = 0; q < rp / 2; q++) {
                const int64_t c0 = w->out_offsets[s], cols = w->out_offsets[s + 1] - c0;
                const uint16_t *even = bt + (s * r + 2 * q) * n_out + c0;
                const uint16_t *odd = 2 * q + 1 < r ? even + n_out : NULL;
                uint32_t *dst = bp + rp / 2 * c0 + q * cols;
                for (int64_t c = 0; c < cols; c++)
                    dst[c] = (uint32_t)even[c] | (odd ? (uint32_t)odd[c] << 16 : 0u);
            }
        /* implicit barrier: the packed weights are complete */
        float *h = NULL; /* [MB, kp], then hb: [MB, S * rp / 2] bf16 pairs, then the spare row */
        if (grow((void **)&block_h, &block_h_len, MB * kp + MB * hb_stride + (n_out + 1) / 2, sizeof(float)))
            failed = 1; /* still meets the loop below: every thread must reach a worksharing loop */
        else
            h = block_h;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            if (h == NULL) continue;
            uint32_t *hb = (uint32_t *)(h + MB * kp);
            uint16_t *spare = (uint16_t *)(hb + MB * hb_stride);
            const int mb = (int)(n - b * MB < MB ? n - b * MB : MB);
            const uint16_t *xr[MB];
            uint16_t *out_rows[MB];
            for (int i = 0; i < MB; i++) {
                const int32_t row = rows[b * MB + (i < mb ? i : 0)];
                xr[i] = x + row * x_stride;
                out_rows[i] = i < mb ? out + row * out_stride : spare;
            }
            int64_t kc = 0;
            for (; kc + 48 <= kp; kc += 48) shrink_block(3, mb, xr, n_in, ap, kp, kc, a, k, h);
            if (kp - kc == 32) shrink_block(2, mb, xr, n_in, ap, kp, kc, a, k, h);
            if (kp - kc == 16) shrink_block(1, mb, xr, n_in, ap, kp, kc, a, k, h);
            /* hb[i][s * rp / 2 + q] = bf16 pair (alpha h[i][s r + 2q], alpha h[i][s r + 2q + 1]) */
            for (int i = 0; i < mb; i++) {
                if (rp == r) { /* even rank: the pairs are h's row as it is, rounded */
                    for (int64_t j = 0; j < k; j += 16)
                        _mm256_mask_storeu_epi16((uint16_t *)(hb + i * hb_stride) + j, tail_mask(j, k),
                                                 (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(
                                                     _mm512_set1_ps(alpha), _mm512_loadu_ps(h + i * kp + j))));
                    continue;
                }
                for (int64_t s = 0; s < S; s++)
                    for (int64_t q = 0; q < rp / 2; q++) {
                        const int64_t j = s * r + 2 * q;
                        const float hi = 2 * q + 1 < r ? alpha * h[i * kp + j + 1] : 0.0f;
                        hb[i * hb_stride + s * rp / 2 + q] =
                            (uint32_t)float_to_bf16(alpha * h[i * kp + j]) | (uint32_t)float_to_bf16(hi) << 16;
                    }
            }
            for (int64_t s = 0; s < S; s++) {
                const int64_t c0 = w->out_offsets[s];
                expand_slice(out_rows, c0, w->out_offsets[s + 1] - c0, bp + rp / 2 * c0, rp / 2,
                             hb + s * rp / 2, hb_stride);
            }
        }
    }
    return failed ? -1 : 0;
}

/* out[rows[i]] += alpha * B_s (A_s x[rows[i]]) with s = slots[i], for i < n; rows of one
 * slot must be adjacent (each run is one segment), slots of rank 0 are skipped.
 * Returns 0, or -1 if scratch memory could not be allocated (``out`` may be partly updated). */
static int lora_sgmv_bf16(const struct lora_slots *w, int64_t n, const int32_t *rows,
                          const int32_t *slots, const uint16_t *x, int64_t x_stride, uint16_t *out,
                          int64_t out_stride, float alpha) {
    for (int64_t i = 0; i < n;) {
        int64_t run = 1;
        while (i + run < n && slots[i + run] == slots[i]) run++;
        const int64_t r = w->slot_ranks[slots[i]];
        if (r > 0 && run_slot(w, slots[i], r, run, rows + i, x, x_stride, out, out_stride, alpha))
            return -1;
        i += run;
    }
    prefetch_next(w, n, slots);
    return 0;
}

#endif /* __AVX512BF16__ */

/* Python: add(slots, n, rows, token_slots, x, x_stride, out, out_stride, alpha) -> None, the
 * arguments of bgmv.c's add; raises MemoryError when scratch memory cannot grow. */
static PyObject *py_add(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
#ifdef __AVX512BF16__
    int64_t v[8];
    double alpha;
    if (fastcall_args("add", args, nargs, 9, 8, v, &alpha)) return NULL;
    if (lora_sgmv_bf16((const struct lora_slots *)(intptr_t)v[0], v[1], (const int32_t *)(intptr_t)v[2],
                       (const int32_t *)(intptr_t)v[3], (const uint16_t *)(intptr_t)v[4], v[5],
                       (uint16_t *)(intptr_t)v[6], v[7], (float)alpha))
        return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    (void)args, (void)nargs;
    PyErr_SetString(PyExc_RuntimeError, "sgmv: built without AVX512-BF16 (SUPPORTED is 0)");
    return NULL;
#endif
}

static PyMethodDef methods[] = {
    {"add", (PyCFunction)(void (*)(void))py_add, METH_FASTCALL,
     "out[rows[i]] += alpha * B_s (A_s x[rows[i]]), s = token_slots[i], for long runs; see sgmv.c"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_loraplex_sgmv", NULL, -1, methods};

PyMODINIT_FUNC PyInit__loraplex_sgmv(void) {
    PyObject *m = PyModule_Create(&module);
#ifdef __AVX512BF16__
    const long supported = 1;
#else
    const long supported = 0;
#endif
    if (m != NULL && PyModule_AddIntConstant(m, "SUPPORTED", supported)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
