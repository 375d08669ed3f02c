/* Decode attention on CPU: one query token per sequence against its paged bf16 KV cache,
 * with grouped-query heads, float32 arithmetic and a bf16 result.
 *
 * Why a kernel: torch's CPU attention (flash or math) costs 100 us per layer for one
 * sequence of 128 tokens and 2 ms for 32 of them (measured here), a third of a decode step
 * at batch 8 and half of one at batch 32, for work that reads a few hundred KB. This
 * reads each key and value row once, straight from the cache (no gathered copy), for all
 * the query heads that share it.
 *
 * Layout: q and out [B, heads, D]; k_cache and v_cache [slots, kv_heads, D]; slots [B, T]
 * int64, the cache slot of each context position; lens [B] int64, the context length of
 * each sequence (positions past it are padding). Heads h*G .. h*G+G-1 share kv head h.
 */
#include <math.h>

#include "common.h"

/* Scratch of each thread, grown on demand and kept: [G, T] scores. */
static __thread float *scores;
static __thread int64_t scores_len;

static int reserve_scores(int64_t n) {
    if (n <= scores_len) return 0;
    float *grown = malloc(sizeof(float) * (size_t)n);
    if (grown == NULL) return -1;
    free(scores);
    scores = grown;
    scores_len = n;
    return 0;
}

static inline float dot(const float *q, const uint16_t *k, int64_t d) {
    f32v acc = {0};
    int64_t i = 0;
    for (; i + VL <= d; i += VL) acc += load_f32(q + i) * load_bf16(k + i);
    float s = hsum(acc);
    for (; i < d; i++) s += q[i] * bf16_to_float(k[i]);
    return s;
}

/* acc[0..d) += p * v[0..d) */
static inline void axpy(float *acc, float p, const uint16_t *v, int64_t d) {
    int64_t i = 0;
    for (; i + VL <= d; i += VL) {
        f32v a = load_f32(acc + i) + p * load_bf16(v + i);
        memcpy(acc + i, &a, sizeof a);
    }
    for (; i < d; i++) acc[i] += p * bf16_to_float(v[i]);
}

/* One sequence b and kv head h: softmax(q K^T * scale) V for its G query heads. */
static int attend(int64_t b, int64_t h, const uint16_t *q, const uint16_t *k_cache,
                  const uint16_t *v_cache, const int64_t *slots, int64_t T, const int64_t *lens,
                  uint16_t *out, int64_t heads, int64_t kv_heads, int64_t d, float scale) {
    const int64_t G = heads / kv_heads, len = lens[b] < T ? lens[b] : T;
    if (reserve_scores(G * (len > 0 ? len : 1))) return -1;
    float qf[G][d], acc[G][d];
    for (int64_t g = 0; g < G; g++) {
        const uint16_t *qrow = q + (b * heads + h * G + g) * d;
        for (int64_t i = 0; i < d; i++) {
            qf[g][i] = bf16_to_float(qrow[i]) * scale;
            acc[g][i] = 0.0f;
        }
    }
    const int64_t *seq_slots = slots + b * T;
    float max[G], sum[G];
    for (int64_t g = 0; g < G; g++) max[g] = -INFINITY, sum[g] = 0.0f;
    for (int64_t t = 0; t < len; t++) {
        const uint16_t *key = k_cache + (seq_slots[t] * kv_heads + h) * d;
        for (int64_t g = 0; g < G; g++) {
            const float s = dot(qf[g], key, d);
            scores[g * len + t] = s;
            if (s > max[g]) max[g] = s;
        }
    }
    for (int64_t g = 0; g < G; g++)
        for (int64_t t = 0; t < len; t++) {
            const float p = expf(scores[g * len + t] - max[g]);
            scores[g * len + t] = p;
            sum[g] += p;
        }
    for (int64_t t = 0; t < len; t++) {
        const uint16_t *value = v_cache + (seq_slots[t] * kv_heads + h) * d;
        for (int64_t g = 0; g < G; g++) axpy(acc[g], scores[g * len + t], value, d);
    }
    for (int64_t g = 0; g < G; g++) {
        uint16_t *orow = out + (b * heads + h * G + g) * d;
        const float inv = sum[g] > 0.0f ? 1.0f / sum[g] : 0.0f;
        for (int64_t i = 0; i < d; i++) orow[i] = float_to_bf16(acc[g][i] * inv);
    }
    return 0;
}

/* Python: decode(q, k_cache, v_cache, slots, T, lens, out, B, heads, kv_heads, d,
 * num_threads, scale) -> None; pointers and sizes as ints, scale a float. Raises
 * MemoryError when the scratch memory cannot grow. */
static PyObject *py_decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t v[12];
    double scale;
    if (fastcall_args("decode", args, nargs, 13, 12, v, &scale)) return NULL;
    const uint16_t *q = (const uint16_t *)(intptr_t)v[0], *k_cache = (const uint16_t *)(intptr_t)v[1];
    const uint16_t *v_cache = (const uint16_t *)(intptr_t)v[2];
    const int64_t *slots = (const int64_t *)(intptr_t)v[3], *lens = (const int64_t *)(intptr_t)v[5];
    uint16_t *out = (uint16_t *)(intptr_t)v[6];
    const int64_t T = v[4], B = v[7], heads = v[8], kv_heads = v[9], d = v[10];
    if (kv_heads <= 0 || heads % kv_heads || d <= 0) {
        PyErr_Format(PyExc_ValueError, "decode(): heads %lld, kv_heads %lld, head_dim %lld",
                     (long long)heads, (long long)kv_heads, (long long)d);
        return NULL;
    }
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) if (B * kv_heads >= 2) num_threads(v[11]) \
    reduction(| : failed)
    for (int64_t item = 0; item < B * kv_heads; item++)
        failed |= attend(item / kv_heads, item % kv_heads, q, k_cache, v_cache, slots, T, lens,
                         out, heads, kv_heads, d, (float)scale);
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode", (PyCFunction)(void (*)(void))py_decode, METH_FASTCALL,
     "one query per sequence against its paged bf16 KV cache; see decode_attention.c"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_loraplex_decode_attention", NULL, -1,
                                    methods};

PyMODINIT_FUNC PyInit__loraplex_decode_attention(void) { return PyModule_Create(&module); }
