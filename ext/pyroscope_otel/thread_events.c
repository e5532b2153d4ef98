/*
 * thread_events.c — learning when threads start, exit, take and release the GVL.
 * The one file with per-Ruby-version paths (chosen by extconf's have_func, not by version):
 *
 * Ruby >= 3.2 (rb_internal_thread_add_event_hook). On 3.3+ a hook may run on another
 * native thread than the one it is about, so it finds the entry through the event's
 * Ruby thread (thread_state.c); on 3.2 (no event_data->thread) it runs on the thread.
 *   RESUMED   (GVL held, on the thread): marks the thread as holding the GVL and, the first
 *             time a thread runs while profiling, gives it its CPU timer.
 *   SUSPENDED (on the thread, just before it releases the GVL; may repeat on 3.2): marks it
 *             as not holding the GVL, so its samples are carried, not walked.
 *   EXITED    (NOGVL, on the exiting thread, however it ends): deletes its timer and frees
 *             its entry. This hook stays installed while stopped so that label slots never
 *             outlive threads.
 *   READY     (NOGVL, only with profile type :wall): the thread wants the GVL back.
 *   With :wall, SUSPENDED and READY also note the moment, and RESUMED charges the time
 *   blocked and waiting for the GVL to the stack that released it (wall.c) before the
 *   deferred CPU sample.
 *   The hooks run on every GVL hand-over, so they do a thread-local read and a store (and
 *   with :wall a clock read; RESUMED the lock).
 *
 * Ruby 3.1 has none of these events: profile type :wall is refused at start there
 * (extension.c, and the Ruby config before it), never approximated.
 *
 * Ruby 3.1 (fallback): no thread event API. New threads are registered by a C-level
 * TracePoint on :thread_begin (GVL, on the new thread), exits seen by one on :thread_end,
 * which fires only for threads that return: a thread that raises or is killed (every
 * Timeout.timeout watcher is) ends unseen. Its entry is released when its end is noticed
 * (thread_state.c): by the next Ruby thread on its native thread (Ruby's thread cache
 * reuses it, tid included) at its first lookup, which for a thread started while
 * profiling is its registration here; otherwise by a sweep of ended owners before claims.
 * Whether a signalled thread holds the GVL is asked of the VM (ruby_thread_has_gvl_p,
 * exported but not in the public headers; it reads thread-local state, so it is safe in
 * the handler). Known bias: the VM reports a thread as holding the GVL until the very
 * moment it releases it for a blocking region, and only blocking regions count: a thread
 * that is between giving up the GVL on a time-slice switch and getting it back still
 * reads as holding it. Such a thread uses almost no CPU, so its timer rarely fires then;
 * when it does, the sample is attributed to its last Ruby frame rather than carried.
 *
 * Threads that already exist at start are registered by start itself (Thread.list and
 * their native thread ids), on every version.
 *
 * M:N threads break "one Ruby thread, one native thread, one CPU clock": under
 * RUBY_MN_THREADS (Ruby >= 3.3, any value above 0) sampling is refused with a warning
 * (profiler.c); threads of Ractors other than the main one, M:N on >= 3.3 whatever the
 * variable says, are never registered (RESUMED above; Thread.list at start lists the
 * main Ractor's threads only).
 */
#include "pyroscope_otel.h"
#include <stdlib.h>
#include <string.h>

#ifdef HAVE_RB_INTERNAL_THREAD_ADD_EVENT_HOOK
#include <ruby/thread.h>

static rb_internal_thread_event_hook_t *gvl_hook, *exit_hook;

/* the entry of the thread an event is about, or NULL */
static po_thread *event_thread(const rb_internal_thread_event_data_t *data)
{
#ifdef HAVE_RB_INTERNAL_THREAD_SPECIFIC_KEY_CREATE
    po_thread *t = po_thread_of(data->thread);
    return t && t->tid && t->owner == data->thread ? t : NULL; /* else released since it was bound */
#else
    (void)data;
    return po_thread_current(0);
#endif
}

static void on_gvl_event(rb_event_flag_t event, const rb_internal_thread_event_data_t *data, void *arg)
{
    (void)arg;
    po_thread *t = event_thread(data);
    if (event == RUBY_INTERNAL_THREAD_EVENT_RESUMED) { /* holds the GVL, on the thread itself */
        if (t && t->tracked) {
            /* before holds_gvl: a timer sample in between would take the wait as GVL time */
            if (po_cfg.wall && t->tid == po_current_tid()) po_wall_resumed(t);
            t->holds_gvl = 1;
            /* the stack can be walked only from its own thread (3.3+ may run hooks elsewhere) */
            if (t->deferred == PO_DEFER_OFF_GVL && t->tid == po_current_tid()) po_sample_deferred(t, PO_DEFER_OFF_GVL);
        } else if (po_running && !po_shares_native_thread()) { /* another Ractor's thread: M:N */
            po_thread_register_current();
        }
    } else if (event == RUBY_INTERNAL_THREAD_EVENT_READY) {
        if (t && t->tracked) po_wall_ready(t);
    } else if (t) {
        t->holds_gvl = 0;
        if (po_cfg.wall && t->tracked) po_wall_suspended(t);
    }
}

static void on_exit_event(rb_event_flag_t event, const rb_internal_thread_event_data_t *data, void *arg)
{
    (void)event;
    (void)arg;
#ifdef HAVE_RB_INTERNAL_THREAD_SPECIFIC_KEY_CREATE
    po_thread *t = po_thread_of(data->thread);
    po_thread_bind(data->thread, NULL);
    if (!t) return;
    po_lock();
    /* its own entry only: since it was bound, another thread may have released it (having
     * found it ended, thread_state.c) and claimed it for a thread of its own */
    if (t->tid && t->owner == data->thread) {
        po_account_exit_locked(t);
        po_thread_release(t);
    }
    po_unlock();
#else
    (void)data;
    po_thread_forget_current();
#endif
}

void po_thread_events_init(void)
{
    po_thread_keys_init();
    exit_hook = rb_internal_thread_add_event_hook(on_exit_event, RUBY_INTERNAL_THREAD_EVENT_EXITED, NULL);
}

void po_thread_events_start(void)
{
    /* READY only for wall time: one hook call fewer per hand-over without it */
    if (!gvl_hook)
        gvl_hook = rb_internal_thread_add_event_hook(
            on_gvl_event,
            RUBY_INTERNAL_THREAD_EVENT_RESUMED | RUBY_INTERNAL_THREAD_EVENT_SUSPENDED |
                (po_cfg.wall ? RUBY_INTERNAL_THREAD_EVENT_READY : 0),
            NULL);
}

void po_thread_events_stop(void)
{
    if (gvl_hook) rb_internal_thread_remove_event_hook(gvl_hook);
    gvl_hook = NULL;
}

#else /* Ruby 3.1 */

static VALUE begin_tp, end_tp;

static void on_thread_begin(VALUE tp, void *arg)
{
    (void)tp;
    (void)arg;
    po_thread_register_current();
}

static void on_thread_end(VALUE tp, void *arg)
{
    (void)tp;
    (void)arg;
    po_thread_forget_current();
}

void po_thread_events_init(void)
{
    begin_tp = rb_tracepoint_new(0, RUBY_EVENT_THREAD_BEGIN, on_thread_begin, NULL);
    end_tp = rb_tracepoint_new(0, RUBY_EVENT_THREAD_END, on_thread_end, NULL);
    rb_gc_register_mark_object(begin_tp);
    rb_gc_register_mark_object(end_tp);
    rb_tracepoint_enable(end_tp);
}

void po_thread_events_start(void)
{
    rb_tracepoint_enable(begin_tp);
}

void po_thread_events_stop(void)
{
    rb_tracepoint_disable(begin_tp);
}

#endif
