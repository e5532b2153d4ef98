/*
 * gc_events.c — the end of each GC, where a timer sample that landed during it is taken.
 *
 * A sample cannot walk the stack during a GC: compaction may be moving the frames' objects.
 * Charging GC CPU to a lone "(garbage collection)" frame instead hid which code allocated
 * enough to trigger it (measured in the demo: 5 % of all CPU, most of it a route's work).
 * So the handler only marks the thread (deferred), and the sample is taken once the VM is
 * consistent again, at the stack that triggered the GC, with "(garbage collection)" as its
 * leaf. Its weight is the thread's CPU since its previous sample, as always, so deferring
 * it loses nothing. Where it is taken depends on what the Ruby's allocation path costs:
 *
 * - Ruby >= 3.3: a C TracePoint on RUBY_INTERNAL_EVENT_GC_EXIT, enabled while the sampler
 *   runs. It runs on the thread that ran the GC, with the GVL, before any Ruby code, so the
 *   stack is exactly the allocating one. The allocation fast path checks for NEWOBJ hooks
 *   only (measured, callgrind: the same instructions per Object.new with it on or off).
 * - Ruby 3.1 (and 3.2, not measured here, so treated alike): any internal GC hook sends
 *   every allocation down the slow path, under the VM lock (measured on 3.1: +29 %
 *   instructions per object, +580 k per request of the web benchmark at 8x work). There the
 *   handler asks for a postponed job instead (rb_postponed_job_register_one, documented
 *   async-signal-safe; only the thread running the GC, which holds the GVL, asks, so the
 *   registrations never race, Bug #19991). The job runs on that thread at its next
 *   interrupt check after the GC: the stack is the allocating code's, or the frame it
 *   returned to when that check came at a method's end.
 *
 * Contexts: po_gc_events_start/stop GVL; po_gc_events_deferred HANDLER; the hook and the
 * job GVL, allocating no Ruby object. When no sample is pending the hook's work is one
 * thread-local read.
 */
#include "pyroscope_otel.h"

static void take_deferred(void)
{
    po_thread *t = po_thread_cached();
    if (t && t->deferred == PO_DEFER_GC) po_sample_deferred(t, PO_DEFER_GC);
}

#ifdef HAVE_RB_POSTPONED_JOB_PREREGISTER
static VALUE exit_tp;

static void on_gc_exit(VALUE tp, void *arg)
{
    (void)tp;
    (void)arg;
    take_deferred();
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

void po_gc_events_deferred(void)
{
}
#else
static void gc_job(void *arg)
{
    (void)arg;
    take_deferred();
}

void po_gc_events_start(void)
{
}

void po_gc_events_stop(void)
{
}

void po_gc_events_deferred(void)
{
    rb_postponed_job_register_one(0, gc_job, NULL);
}
#endif
