/*
 * gc_events.c — the end of each GC, where a timer sample that landed during it is taken.
 *
 * A sample cannot walk the stack during a GC: compaction may be moving the frames' objects.
 * Charging GC CPU to a lone "(garbage collection)" frame instead hid which code allocated
 * enough to trigger it (measured in the demo: 5 % of all CPU, most of it a route's work).
 * So the handler only marks the thread (deferred), and this hook, which runs on the
 * thread that ran the GC, with the GVL, once the VM is consistent again and before any
 * Ruby code runs, takes the sample at the stack that triggered the GC, with
 * "(garbage collection)" as its leaf. Its weight is the thread's CPU since its previous
 * sample, as always, so deferring it loses nothing.
 *
 * Contexts: the hook is a C TracePoint on RUBY_INTERNAL_EVENT_GC_EXIT (GVL; it must not
 * allocate Ruby objects, and does not). Enabled while the sampler runs; the work it does
 * when no sample is pending is one thread-local read.
 */
#include "pyroscope_otel.h"

static VALUE exit_tp;

static void on_gc_exit(VALUE tp, void *arg)
{
    (void)tp;
    (void)arg;
    po_thread *t = po_thread_cached();
    if (t && t->deferred == PO_DEFER_GC) po_sample_deferred(t, PO_DEFER_GC);
}

void po_gc_events_start(void)
{
    if (!exit_tp) {
        exit_tp = rb_tracepoint_new(0, RUBY_INTERNAL_EVENT_GC_EXIT, on_gc_exit, NULL);
        rb_gc_register_mark_object(exit_tp);
    }
    rb_tracepoint_enable(exit_tp);
}

void po_gc_events_stop(void)
{
    if (exit_tp) rb_tracepoint_disable(exit_tp);
}
