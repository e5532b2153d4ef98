/*
 * profiler.c — control: start, stop, and the child of fork.
 *
 * start (GVL) installs the SIGPROF handler (signal.c, unless no_signals), sizes the
 * recorder's buffers and the stack buffers, forgets the kinds' stacks of a previous run,
 * starts the signal-free ticker when asked, enables the thread and GC event hooks, and
 * registers every live Ruby thread (a timer each); threads started later register
 * themselves (thread_events.c). stop disarms every timer and disables the hooks; the
 * exit hook stays, so that no entry outlives its thread. Nothing in stop checks
 * interrupts, so a Thread#raise or a trap cannot leave it half done (ticker.c).
 *
 * The top of the sampling core: it calls every layer below (triggers, threads, accounting,
 * recorder) and nothing calls it but the binding (extension.c).
 */
#include "pyroscope_otel.h"

static void register_thread(VALUE thread)
{
    po_thread *t = po_thread_of_thread(thread, 1);
    if (!t) return;
    po_lock();
    if (t->owner == thread) po_account_register_locked(t, 0); /* else released meanwhile by its exit hook (NOGVL) */
    po_unlock();
}

static VALUE register_each_thread(RB_BLOCK_CALL_FUNC_ARGLIST(thread, arg))
{
    (void)arg;
    if (thread == rb_thread_current()) {
        po_thread_register_current();
    } else {
        register_thread(thread);
    }
    return Qnil;
}

int po_start(long interval_ns, int max_depth, uint32_t max_samples, int no_signals, int wall, int wall_all)
{
    if (po_running) return 0;
    if (po_mn_threads_enabled()) {
        rb_warn("pyroscope: not sampling: M:N threads (RUBY_MN_THREADS above 0) share native threads between "
                "Ruby threads, so per-thread CPU timers cannot attribute CPU time; unset RUBY_MN_THREADS");
        return 0;
    }
    if (!no_signals) po_signal_install();
    po_recorder_alloc(max_samples);
    po_account_alloc(max_depth);
    po_wall_start(max_depth, wall, wall_all);
    po_lock();
    po_attr_forget(); /* samples from before a stop are not recent */
    po_unlock();
    po_cfg.interval_ns = interval_ns;
    po_cfg.max_depth = max_depth;
    po_cfg.max_samples = max_samples;
    po_cfg.no_signals = no_signals;
    po_cfg.wall = wall;
    po_cfg.wall_all = wall_all;
    __atomic_store_n(&po_running, 1, __ATOMIC_SEQ_CST);
    if (no_signals && !po_ticker_start(interval_ns))
        rb_warn("pyroscope: no_signals on Ruby < 3.3: no timer samples (postponed job triggers from another "
                "thread need Ruby 3.3); CPU is recorded only where labels change, at the stack of the change");
    po_thread_events_start();
    po_gc_events_start();
    VALUE list = rb_funcall(rb_cThread, rb_intern("list"), 0);
    rb_block_call(list, rb_intern("each"), 0, NULL, register_each_thread, Qnil);
    return 1;
}

int po_stop(void)
{
    if (!po_running) return 0;
    __atomic_store_n(&po_running, 0, __ATOMIC_SEQ_CST);
    po_ticker_stop();
    po_thread_events_stop();
    po_gc_events_stop();
    po_lock();
    for (int i = 0; i < PO_MAX_THREADS; i++) {
        if (po_threads[i].has_timer) po_timer_disarm(&po_threads[i]);
        po_threads[i].tracked = 0;
    }
    po_unlock();
    return 1;
}

/* The child of fork: the parent's window is the parent's to send, and no timer survives. */
void po_profiler_after_fork_child(void)
{
    po_lock_reset_after_fork();
    po_running = 0;
    po_recorder_after_fork_child();
    po_threads_after_fork_child();
}
