/*
 * attribution.c — where the CPU of code that no timer sample saw is charged.
 *
 * A thread's CPU since its last sample is charged when its labels change (a span ends), so
 * that spans shorter than the sample interval keep their CPU. The code that burned it was
 * not seen. The stack where the labels change ran none of it (the request block that
 * called the span's work): charging it there was measured to put 35 % of a demo's CPU,
 * and 60 % of the span CPU of a fast API, on frames that did no work. Instead it goes to
 * a stack sampled recently in a span of the same kind: the same labels apart from the ids
 * of one span (po_labelset_kind). Timer samples land in proportion to CPU, so a stack
 * drawn at random from a kind's recent samples is an unbiased estimate of where that
 * kind's unseen CPU went; per span it is one draw, over many spans the picture is the
 * kind's. A span's CPU total stays exact; its stack is the kind's, not necessarily its own.
 * A kind is drawn from once it has a stack; before, its CPU goes where its labels changed,
 * and the samples that took it are held (po_attr_hold) and moved to the kind's first stack:
 * neither a new kind's first spans nor code that rarely runs long enough for a sample (one
 * thread's gaps between spans) stays at the boundaries. A kind holds at most PO_KIND_HELD
 * samples (a kind without span ids needs one: its labels are the same at every charge).
 * A kind's boundary is walked once and reused, across windows too: a kind's labels change at the
 * same code each time (the processor's on_start, a tag_wrapper), and a kind too short to
 * be sampled (the gap between requests, a span's moments around its tags) would otherwise
 * walk a stack at every change (measured: 2 walks per request of the web benchmark,
 * ~5.7 k instructions, a tenth of what the profiler added per request).
 * Code without labels is a kind per thread (account.c): the gaps between one thread's
 * spans, not every unlabelled thread of the process. Stacks of the profiler's and the
 * SDK's own code are never noted (their cost stays where it was sampled), and a start
 * forgets every kind: samples from before a stop are not recent.
 *
 * The memory: a direct-mapped table of kinds, each with a ring of the stack numbers of its
 * last PO_KIND_STACKS timer samples in the active buffer. Stack numbers are only valid in
 * the buffer they were taken in, so each entry carries that buffer's epoch, and a swap
 * copies the entries of the outgoing buffer into the new one (po_attr_carry_over): a kind
 * never starts a window with nothing to draw from. Two kinds sharing a slot evict each
 * other; the cost is a few more charges where the labels changed.
 *
 * Contexts: everything runs under po_lock (HANDLER for po_attr_note, GVL or NOGVL for the
 * rest); nothing allocates. A moved charge keeps the sample it left, with less CPU (maybe
 * none: export skips empty samples).
 */
#include "pyroscope_otel.h"
#include <string.h>

#define PO_KINDS 1024 /* a power of two */
#define PO_KIND_STACKS 8
#define PO_KIND_HELD 16 /* a kind's unsampled spans before its first sample (~7 for 1.5 ms spans at 100 Hz) */

typedef struct kind_entry {
    uint64_t kind;
    uint64_t epoch; /* of the buffer its stack numbers belong to; 0: empty */
    uint32_t used, next;
    uint32_t stacks[PO_KIND_STACKS];
    uint32_t boundary; /* where its labels changed, walked once; UINT32_MAX: not yet */
    /* CPU of this kind charged where its labels changed while it had no stack yet, and the
     * samples that took it (one per span; kinds without span ids share one): moved to the
     * kind's first stack */
    uint32_t holding;
    po_sample_ref held[PO_KIND_HELD];
    uint64_t held_ns[PO_KIND_HELD];
} kind_entry;

static kind_entry kinds[PO_KINDS];
static uint64_t rng = 0x2545f4914f6cdd1dULL;

static kind_entry *entry_of(uint64_t kind)
{
    return &kinds[kind & (PO_KINDS - 1)];
}

/* e becomes kind's, in a, empty */
static void claim(kind_entry *e, const po_agg *a, uint64_t kind)
{
    memset(e, 0, sizeof(*e));
    e->kind = kind;
    e->epoch = a->epoch;
    e->boundary = UINT32_MAX;
}

void po_attr_note(po_agg *a, uint64_t kind, uint32_t stack)
{
    if (stack == UINT32_MAX) return;
    kind_entry *e = entry_of(kind);
    if (e->kind != kind || e->epoch != a->epoch) claim(e, a, kind);
    for (uint32_t i = 0; i < e->holding; i++) {
        po_sample *held = po_agg_sample(a, e->held[i]);
        if (!held) continue;
        /* a timer sample may have joined it (same stack and labels): only the held part moves */
        uint64_t ns = e->held_ns[i] < held->cpu_ns ? e->held_ns[i] : held->cpu_ns;
        if (po_agg_record_stack(a, stack, held->labels, ns, 0) != UINT32_MAX) held->cpu_ns -= ns;
    }
    e->holding = 0;
    e->stacks[e->next] = stack;
    e->next = (e->next + 1) % PO_KIND_STACKS;
    if (e->used < PO_KIND_STACKS) e->used++;
}

void po_attr_hold(po_agg *a, uint64_t kind, po_sample_ref sample, uint64_t cpu_ns)
{
    kind_entry *e = entry_of(kind);
    if (e->kind != kind || e->epoch != a->epoch) claim(e, a, kind);
    if (e->used || !sample.epoch) return;
    uint32_t i = 0;
    while (i < e->holding && (e->held[i].epoch != sample.epoch || e->held[i].index != sample.index)) i++;
    if (i == e->holding) {
        if (i == PO_KIND_HELD) return; /* stays where the labels changed */
        e->held[e->holding++] = sample;
        e->held_ns[i] = 0;
    }
    e->held_ns[i] += cpu_ns;
}

uint32_t po_attr_draw(const po_agg *a, uint64_t kind)
{
    kind_entry *e = entry_of(kind);
    if (e->kind != kind || e->epoch != a->epoch || e->used == 0) return UINT32_MAX;
    return e->stacks[po_xorshift64(&rng) % e->used];
}

uint32_t po_attr_boundary(const po_agg *a, uint64_t kind)
{
    kind_entry *e = entry_of(kind);
    return e->kind == kind && e->epoch == a->epoch ? e->boundary : UINT32_MAX;
}

void po_attr_set_boundary(po_agg *a, uint64_t kind, uint32_t stack)
{
    kind_entry *e = entry_of(kind);
    if (e->kind != kind || e->epoch != a->epoch) claim(e, a, kind);
    e->boundary = stack;
}

void po_attr_carry_over(const po_agg *from, po_agg *to)
{
    for (int i = 0; i < PO_KINDS; i++) {
        kind_entry *e = &kinds[i];
        if (e->epoch != from->epoch || (!e->used && e->boundary == UINT32_MAX)) continue;
        uint32_t kept = 0;
        for (uint32_t j = 0; j < e->used; j++) {
            uint32_t s = po_agg_copy_stack(to, from, e->stacks[j]);
            if (s != UINT32_MAX) e->stacks[kept++] = s;
        }
        if (e->boundary != UINT32_MAX) e->boundary = po_agg_copy_stack(to, from, e->boundary);
        e->epoch = to->epoch;
        e->holding = 0; /* held CPU stays in the window it was charged in */
        e->used = kept;
        e->next = kept % PO_KIND_STACKS;
    }
}

void po_attr_forget(void)
{
    memset(kinds, 0, sizeof(kinds));
}
