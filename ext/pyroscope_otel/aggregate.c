/*
 * aggregate.c — one window's samples: (stack, label set) -> CPU ns and sample count.
 *
 * Written from the HANDLER, so recording never allocates: every table is allocated up
 * front with a fixed capacity (a window's distinct samples, max_samples, with room for
 * distinct stacks and their frames derived from it). When a table is full the sample is
 * dropped and counted, with its CPU time, so that the loss is visible, never silent.
 * Stacks are deduplicated (many label sets share a stack), samples are keyed by the
 * interned label set's pointer. Both tables are open-addressing indexes over dense
 * arrays, so clearing a window touches only what it used.
 *
 * The frames are GC objects (iseqs, method entries); po_agg_mark marks them with
 * rb_gc_mark, which also pins them, so they stay valid and unmoved through GC and
 * compaction until the window is taken and cleared.
 *
 * Contexts: record and clear under po_lock (HANDLER or GVL); init/free on the GVL while
 * no handler can reach the buffer; mark in the GC's mark phase, under po_lock.
 */
#include "pyroscope_otel.h"
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define FRAMES_PER_SAMPLE 8 /* arena frames per sample slot: stacks share far more */

static uint64_t last_epoch; /* GVL or under po_lock; never reset, not even by fork */


static uint32_t pow2_at_least(uint32_t n)
{
    uint32_t p = 16;
    while (p < n) p <<= 1;
    return p;
}

int po_agg_init(po_agg *a, uint32_t max_samples)
{
    memset(a, 0, sizeof(*a));
    a->epoch = ++last_epoch;
    a->samples_cap = max_samples;
    a->stacks_cap = max_samples;
    a->frames_cap = max_samples * FRAMES_PER_SAMPLE;
    a->sample_index_mask = pow2_at_least(max_samples * 2) - 1;
    a->stack_index_mask = a->sample_index_mask;
    a->frames = calloc(a->frames_cap, sizeof(VALUE));
    a->lines = calloc(a->frames_cap, sizeof(int32_t));
    a->stacks = calloc(a->stacks_cap, sizeof(po_stack));
    a->samples = calloc(a->samples_cap, sizeof(po_sample));
    a->stack_index = calloc(a->stack_index_mask + 1, sizeof(uint32_t));
    a->sample_index = calloc(a->sample_index_mask + 1, sizeof(uint32_t));
    if (!a->frames || !a->lines || !a->stacks || !a->samples || !a->stack_index || !a->sample_index) {
        po_agg_free(a);
        return ENOMEM;
    }
    return 0;
}

void po_agg_free(po_agg *a)
{
    free(a->frames);
    free(a->lines);
    free(a->stacks);
    free(a->samples);
    free(a->stack_index);
    free(a->sample_index);
    memset(a, 0, sizeof(*a));
}

static inline uint64_t mix(uint64_t h, uint64_t v)
{
    h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    return h;
}

static inline uint64_t finish(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return h;
}

uint32_t po_agg_intern_stack(po_agg *a, const VALUE *frames, const int *lines, int depth)
{
    uint64_t h = (uint64_t)depth;
    for (int i = 0; i < depth; i++) h = mix(mix(h, (uint64_t)frames[i]), (uint64_t)(uint32_t)lines[i]);
    h = finish(h);
    uint32_t pos = (uint32_t)h & a->stack_index_mask;
    for (;;) {
        uint32_t e = a->stack_index[pos];
        if (e == 0) break;
        po_stack *s = &a->stacks[e - 1];
        if (s->hash == h && s->depth == (uint32_t)depth &&
            memcmp(&a->frames[s->off], frames, depth * sizeof(VALUE)) == 0 &&
            memcmp(&a->lines[s->off], lines, depth * sizeof(int32_t)) == 0)
            return e - 1;
        pos = (pos + 1) & a->stack_index_mask;
    }
    if (a->stacks_used == a->stacks_cap || a->frames_cap - a->frames_used < (uint32_t)depth) return UINT32_MAX;
    uint32_t n = a->stacks_used++;
    po_stack *s = &a->stacks[n];
    s->hash = h;
    s->off = a->frames_used;
    s->depth = (uint32_t)depth;
    s->slot = pos;
    memcpy(&a->frames[s->off], frames, depth * sizeof(VALUE));
    memcpy(&a->lines[s->off], lines, depth * sizeof(int32_t));
    a->frames_used += depth;
    a->stack_index[pos] = n + 1;
    return n;
}

uint32_t po_agg_copy_stack(po_agg *to, const po_agg *from, uint32_t stack)
{
    const po_stack *s = &from->stacks[stack];
    return po_agg_intern_stack(to, &from->frames[s->off], &from->lines[s->off], (int)s->depth);
}

uint32_t po_agg_record(po_agg *a, const VALUE *frames, const int *lines, int depth,
                       po_labelset *labels, uint64_t cpu_ns, uint64_t count)
{
    return po_agg_record_stack(a, po_agg_intern_stack(a, frames, lines, depth), labels, cpu_ns, count);
}

uint32_t po_agg_record_stack(po_agg *a, uint32_t stack, po_labelset *labels, uint64_t cpu_ns, uint64_t count)
{
    if (stack == UINT32_MAX) goto drop;
    uint64_t h = finish(mix(mix(0, stack), (uint64_t)(uintptr_t)labels));
    uint32_t pos = (uint32_t)h & a->sample_index_mask;
    for (;;) {
        uint32_t e = a->sample_index[pos];
        if (e == 0) break;
        po_sample *s = &a->samples[e - 1];
        if (s->stack == stack && s->labels == labels) {
            s->cpu_ns += cpu_ns;
            s->count += count;
            return e - 1;
        }
        pos = (pos + 1) & a->sample_index_mask;
    }
    if (a->samples_used == a->samples_cap) goto drop;
    uint32_t n = a->samples_used++;
    po_sample *s = &a->samples[n];
    s->cpu_ns = cpu_ns;
    s->count = count;
    s->labels = labels;
    s->stack = stack;
    s->slot = pos;
    po_labelset_ref(labels);
    a->sample_index[pos] = n + 1;
    return n;
drop:
    a->dropped_samples += count ? count : 1;
    a->dropped_cpu_ns += cpu_ns;
    return UINT32_MAX;
}

void po_agg_clear(po_agg *a)
{
    for (uint32_t i = 0; i < a->samples_used; i++) {
        a->sample_index[a->samples[i].slot] = 0;
        po_labelset_unref(a->samples[i].labels);
    }
    for (uint32_t i = 0; i < a->stacks_used; i++) a->stack_index[a->stacks[i].slot] = 0;
    a->samples_used = a->stacks_used = a->frames_used = 0;
    a->dropped_samples = a->dropped_cpu_ns = 0;
    a->epoch = ++last_epoch;
}

po_sample_ref po_agg_ref(const po_agg *a, uint32_t index)
{
    return index == UINT32_MAX ? PO_NO_SAMPLE : (po_sample_ref){ a->epoch, index };
}

po_sample *po_agg_sample(po_agg *a, po_sample_ref ref)
{
    if (!a || ref.epoch != a->epoch || ref.index >= a->samples_used) return NULL;
    return &a->samples[ref.index];
}

void po_agg_mark(const po_agg *a)
{
    for (uint32_t i = 0; i < a->frames_used; i++) rb_gc_mark(a->frames[i]);
}
