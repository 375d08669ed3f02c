/* One projection's adapter slots as the LoRA kernels (bgmv.c, sgmv.c) read them, fixed
 * while the engine runs, built once by lora/native.py (its ctypes mirror, _LoRASlots).
 * Layout of a slot (lora/ops.py): slot s of a projection with S slices at rank r, k = S * r:
 *   A:   a_flat + s * a_slot_stride, [k, n_in] row-major; rows [i*r, (i+1)*r) = slice i
 *   B^T: b_flat + s * b_slot_stride, [k, n_out] row-major; rows [i*r, (i+1)*r) are nonzero
 *        only in slice i's columns [out_offsets[i], out_offsets[i+1]) */
#ifndef LORAPLEX_KERNELS_LORA_SLOTS_H
#define LORAPLEX_KERNELS_LORA_SLOTS_H

#include <stdint.h>

struct lora_slots {
    int64_t n_in, num_slices;
    const int64_t *out_offsets; /* [num_slices + 1] */
    const int32_t *slot_ranks;  /* [slots]; 0: the slot's adapter does not target this projection */
    const uint16_t *a_flat;
    int64_t a_slot_stride;
    const uint16_t *b_flat;
    int64_t b_slot_stride;
    int64_t max_k; /* num_slices * the largest rank */
    const struct lora_slots *next; /* the projection that runs next in the model, or NULL */
    int64_t num_threads;           /* torch's intra-op threads when the slots were made */
};

/* Ask for ``slot``'s weights in ``w`` ahead of time (into L2): a decode step streams the
 * whole base model through the caches between two LoRA calls, so without this every call
 * starts from DRAM. Only the nonzero blocks of B^T are asked for. */
static inline void prefetch_slot(const struct lora_slots *w, int32_t slot) {
    const int64_t r = w->slot_ranks[slot];
    if (r == 0) return;
    const int64_t k = w->num_slices * r, n_out = w->out_offsets[w->num_slices];
    const char *a = (const char *)(w->a_flat + slot * w->a_slot_stride);
    for (int64_t byte = 0; byte < k * w->n_in * 2; byte += 64) __builtin_prefetch(a + byte, 0, 2);
    const uint16_t *bt = w->b_flat + slot * w->b_slot_stride;
    for (int64_t s = 0; s < w->num_slices; s++)
        for (int64_t j = s * r; j < (s + 1) * r; j++) {
            const char *row = (const char *)(bt + j * n_out + w->out_offsets[s]);
            const int64_t bytes = 2 * (w->out_offsets[s + 1] - w->out_offsets[s]);
            for (int64_t byte = 0; byte < bytes; byte += 64) __builtin_prefetch(row + byte, 0, 2);
        }
}

/* The same slots are likely to run next: ask for up to 4 of them, each in the next
 * projection it has weights in. Projections that none of a step's adapters target get no
 * call (lora/layers.py), so for q_proj/v_proj adapters the qkv call asks for the next
 * layer's qkv (3 projections on). */
static inline void prefetch_next(const struct lora_slots *w, int64_t n, const int32_t *slots) {
    for (int64_t i = 0, asked = 0; i < n && asked < 4; i++)
        if (i == 0 || slots[i] != slots[i - 1]) {
            const struct lora_slots *next = w->next;
            for (int hops = 0; next != NULL && next->slot_ranks[slots[i]] == 0 && hops < 3; hops++)
                next = next->next;
            if (next != NULL) prefetch_slot(next, slots[i]); /* nothing if its rank is 0 */
            asked++;
        }
}

#endif
