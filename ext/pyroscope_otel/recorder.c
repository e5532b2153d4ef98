/*
 * recorder.c — the two aggregation buffers: the active one, which accounting writes, and
 * the one being taken (a window: exported, or converted to Ruby data by window.c).
 *
 * Allocated at start for max_samples and reused (kept through stop/start at the same
 * size, so a restart loses nothing). A take swaps the active buffer under po_lock, hands
 * the old one to the taker, who reads it without the lock (nothing writes it), and clears
 * it at the end; the kinds' stacks (attribution.c) are copied into the new active buffer
 * at the swap. One take at a time: a second concurrent take gets nothing.
 * Every clear or reallocation gives a buffer a new epoch, so sample references
 * (po_sample_ref) into older contents are void, never wrong.
 * Marking: both buffers' frames are marked (pinned) in the GC's mark phase.
 *
 * Contexts: alloc on the GVL while stopped; swap, clear and mark under po_lock; the
 * fork child's clear single-threaded.
 */
#include "pyroscope_otel.h"

po_agg *po_active;
static po_agg bufs[2];
static uint32_t bufs_cap;
static int taking;

static void free_buffers(void)
{
    po_lock();
    po_agg_clear(&bufs[0]);
    po_agg_clear(&bufs[1]);
    po_unlock();
    po_agg_free(&bufs[0]);
    po_agg_free(&bufs[1]);
    bufs_cap = 0;
}

void po_recorder_alloc(uint32_t max_samples)
{
    if (bufs_cap == max_samples) return;
    free_buffers();
    if (po_agg_init(&bufs[0], max_samples) || po_agg_init(&bufs[1], max_samples)) {
        free_buffers();
        rb_raise(rb_eNoMemError, "pyroscope: cannot allocate sample buffers for max_samples=%u", max_samples);
    }
    bufs_cap = max_samples;
    po_active = &bufs[0];
    po_active->started_at_ns = po_realtime_ns();
}

po_agg *po_window_begin(uint64_t *started, uint64_t *ended)
{
    uint64_t now = po_realtime_ns();
    *started = *ended = now;
    if (taking || !po_active) return NULL;
    taking = 1;
    po_lock();
    po_agg *a = po_active;
    po_active = a == &bufs[0] ? &bufs[1] : &bufs[0];
    po_active->started_at_ns = now;
    po_attr_carry_over(a, po_active);
    po_unlock();
    *started = a->started_at_ns;
    return a;
}

void po_window_end(po_agg *a)
{
    po_lock();
    po_agg_clear(a);
    po_unlock();
    taking = 0;
}

void po_recorder_mark(void)
{
    po_lock();
    po_agg_mark(&bufs[0]);
    po_agg_mark(&bufs[1]);
    po_unlock();
}

/* The child of fork: the parent's window is the parent's to send. */
void po_recorder_after_fork_child(void)
{
    taking = 0;
    po_agg_clear(&bufs[0]);
    po_agg_clear(&bufs[1]);
    if (po_active) po_active->started_at_ns = po_realtime_ns();
}
