/*
 * sampler.c — the profiler's state, start/stop, and the two ways CPU time is recorded.
 *
 * 1. A timer sample (HANDLER, the thread whose CPU timer fired): if the thread holds the
 *    GVL, its stack is walked and the CPU time it used since its previous sample is
 *    charged to (stack, its current labels), with a count of 1. A thread without the GVL
 *    (running C code that released it) is not walked (its VM state may be changing under
 *    another thread's GC); its CPU time is not lost but carried into its next sample.
 * 2. A label change (GVL, the thread itself): before the slot changes, the CPU time used
 *    since the thread's previous sample is charged to the *old* labels, with a count of 0.
 *    This is what gives a span shorter than the sample interval its CPU: without it, that
 *    time would land on whatever label comes next. Which stack gets it: when the old labels
 *    already had a timer sample, that sample's stack (a random sample of the span's own
 *    code); only a span that got no timer sample at all is charged at the stack where its
 *    labels change, the one stack of it we have. Charging every tail at the change site
 *    instead was measured to put ~50% of the CPU of 10 ms spans, and ~95% of 1.5 ms
 *    spans, on that one site.
 *
 * Both paths update a thread's last_cpu_ns and the active buffer under po_lock, which the
 * handler only tries: when taken, the sample is skipped and its CPU carried forward.
 * Memory: two aggregation buffers (one being written, one being taken), allocated at
 * start with the configured capacity and reused; the handler's stack buffer likewise.
 */
#include "pyroscope_otel.h"
#include <errno.h>
#include <stdlib.h>
#include <string.h>

volatile int po_running;
po_config po_cfg = { 10000000L, 512, 65536, 0 };
po_agg *po_active;
static po_agg bufs[2];
static uint32_t bufs_cap;
static VALUE *handler_frames, *gvl_frames;
static int *handler_lines, *gvl_lines;
static int buffers_depth;

/* counters: written under po_lock, or with atomics where the handler cannot lock */
uint64_t po_stat_samples, po_stat_sampling_ns, po_stat_label_flushes, po_stat_boundary_flushes, po_stat_drawn_flushes, po_stat_skipped_busy, po_stat_skipped_off_gvl,
    po_stat_timer_errors;
int po_stat_last_timer_errno;

po_agg *po_agg_buffers(void)
{
    return bufs;
}

/* Spans of a kind share stacks for their unseen CPU; code without labels, only the
 * thread's own. */
static uint64_t kind_of(const po_thread *t)
{
    return t->labels ? po_labelset_kind(t->labels) : po_labelset_kind(NULL) ^ ((uint64_t)t->tid * 0x9e3779b97f4a7c15ULL);
}

/* Under po_lock, on the sampled thread, which holds the GVL: its stack and the CPU it used
 * since its previous sample, with a count of 1. The stack is also a draw for its kind's
 * unseen CPU (attribution.c), unless it is the profiler's or the SDK's own code: their
 * cost shows where it was sampled, never as another span's work. */
static void sample_locked(po_thread *t, VALUE *frames, int *lines, int synthetic_leaf, uint64_t fired_at_cpu_ns)
{
    uint64_t now = po_thread_cpu_ns(t->tid);
    /* a deferred sample stands for the moment its timer fired: the CPU after that goes to
     * the next sample, as for any other, or every deferred sample would also take the
     * CPU up to the moment it could be taken (measured: +5 points to zlib's share) */
    uint64_t at = fired_at_cpu_ns && fired_at_cpu_ns < now ? fired_at_cpu_ns : now;
    if (at <= t->last_cpu_ns) return;
    int n = 0;
    if (synthetic_leaf) { /* the buffers have room for it: max_depth + 1 + PO_MAX_SKIP */
        frames[0] = PO_FRAME_SYNTHETIC;
        lines[0] = synthetic_leaf;
        n = 1;
    }
    n += po_stack_capture(frames + n, lines + n, po_cfg.max_depth, synthetic_leaf == PO_LINE_GC ? PO_STACK_GC_ENDING : 0);
    if (n <= 0) return;
    uint32_t stack = po_agg_intern_stack(po_active, frames, lines, n);
    t->last = po_agg_ref(po_active, po_agg_record_stack(po_active, stack, t->labels, at - t->last_cpu_ns, 1));
    if (!po_stack_is_own(frames, n)) po_attr_note(po_active, kind_of(t), stack);
    po_stat_samples++;
    t->last_cpu_ns = at;
    /* the walk and the aggregation, on this thread's clock: the profiler's own cost,
     * measured where it is spent; charged to the next sample, like any CPU */
    po_stat_sampling_ns += po_thread_cpu_ns(t->tid) - now;
}

void po_sample_from_handler(po_thread *t)
{
    /* A sample inside a label change would show the binding as the leaf and take the
     * CPU of the work before it; deferred, that CPU goes with the change's own charge. */
    if (t->switching) {
        __atomic_add_fetch(&po_stat_skipped_busy, 1, __ATOMIC_RELAXED);
        return;
    }
    if (rb_during_gc()) {
        /* The VM's frames may be moving (compaction): the stack that triggered the GC is
         * walked when it ends (gc_events.c), with the GC as its leaf. */
        t->deferred_at_cpu_ns = po_thread_cpu_ns(t->tid);
        t->gc_pending = 1;
        return;
    }
    if (!po_current_thread_holds_gvl(t)) {
        /* Running C code that released the GVL (zlib, a database driver): its stack is not
         * ours to walk now, but it is the stack it will have when it takes the GVL back,
         * where the thread event hook samples it (Ruby >= 3.2). */
        t->deferred_at_cpu_ns = po_thread_cpu_ns(t->tid);
        t->off_gvl_pending = 1;
        __atomic_add_fetch(&po_stat_skipped_off_gvl, 1, __ATOMIC_RELAXED);
        return;
    }
    if (!po_trylock()) {
        __atomic_add_fetch(&po_stat_skipped_busy, 1, __ATOMIC_RELAXED);
        return;
    }
    /* signal.c checked the entry's tid before the lock: since then another thread may have
     * released it (an ended thread's entry, thread_state.c) and a claim reused it */
    if (t->tid == po_gettid() && po_running && po_active) {
        if (t->has_timer) po_timer_rejitter(t); /* under po_lock: the timer cannot be deleted meanwhile */
        sample_locked(t, handler_frames, handler_lines, 0, 0);
    }
    po_unlock();
}

/* GVL, on the calling thread (the signal-free mode's postponed job): the same sample,
 * taken where waiting for the lock is allowed. */
void po_sample_on_gvl(void)
{
    po_thread *t = po_thread_current(0);
    if (!t || !t->tracked || t->switching || rb_during_gc()) return;
    po_lock();
    if (po_running && po_active) sample_locked(t, gvl_frames, gvl_lines, 0, 0);
    po_unlock();
}

void po_sample_deferred(po_thread *t, int synthetic_leaf)
{
    if (t->switching || !t->tracked) return;
    po_lock();
    if (po_running && po_active) sample_locked(t, gvl_frames, gvl_lines, synthetic_leaf, t->deferred_at_cpu_ns);
    po_unlock();
}

/* Where the CPU since a thread's last sample is charged when its labels change or it
 * exits. */
enum tail_site { TAIL_HERE, TAIL_FIBER_SWITCH, TAIL_EXIT };

/* The stack for unseen CPU that no sample of its kind can take: where the labels change,
 * minus the binding's and the SDK's frames, when that is the code's own stack; else a
 * synthetic frame naming why there is none. */
static uint32_t fallback_stack(enum tail_site site)
{
    int n = 1;
    gvl_frames[0] = PO_FRAME_SYNTHETIC;
    if (site == TAIL_FIBER_SWITCH) gvl_lines[0] = PO_LINE_FIBER_SWITCH;
    else if (site == TAIL_EXIT) gvl_lines[0] = PO_LINE_THREAD_EXIT;
    else n = po_stack_capture(gvl_frames, gvl_lines, po_cfg.max_depth, PO_STACK_TRIM_OWN); /* our own frames: no allocation */
    return n > 0 ? po_agg_intern_stack(po_active, gvl_frames, gvl_lines, n) : UINT32_MAX;
}

/* Under po_lock: charges the CPU since the thread's last sample to its current labels
 * (count 0): to that sample when it was taken under them in this window, else to a stack
 * drawn from the recent samples of its labels' kind (attribution.c), else to the fallback. */
static void charge_tail_locked(po_thread *t, enum tail_site site)
{
    if (!po_running || !t->tracked || !po_active) return;
    if (site != TAIL_EXIT && t->tid != po_current_tid()) return;
    uint64_t now = po_thread_cpu_ns(t->tid);
    if (now <= t->last_cpu_ns) return;
    uint64_t tail = now - t->last_cpu_ns;
    po_sample *last = po_agg_sample(po_active, t->last);
    if (last) {
        last->cpu_ns += tail;
    } else {
        uint64_t kind = kind_of(t);
        uint32_t stack = po_attr_draw(po_active, kind);
        if (stack != UINT32_MAX) {
            po_agg_record_stack(po_active, stack, t->labels, tail, 0);
            po_stat_drawn_flushes++;
        } else {
            uint32_t idx = po_agg_record_stack(po_active, fallback_stack(site), t->labels, tail, 0);
            po_attr_hold(po_active, kind, po_agg_ref(po_active, idx), tail);
            po_stat_boundary_flushes++;
        }
    }
    t->last_cpu_ns = now;
    po_stat_label_flushes++;
}

void po_thread_exit_locked(po_thread *t)
{
    charge_tail_locked(t, TAIL_EXIT);
    po_thread_release(t);
}

/* Under po_lock: `labels` (a reference the slot takes) replaces the thread's labels; the
 * old ones are remembered with their last sample, which comes back with them. */
void po_put_labels_locked(po_thread *t, po_labelset *labels)
{
    po_labelset *old = t->labels;
    po_sample_ref old_last = t->last;
    t->last = labels == t->prev_labels ? t->prev : PO_NO_SAMPLE;
    po_labelset_unref(t->prev_labels);
    t->prev_labels = old; /* the slot's reference moves here */
    t->prev = old_last;
    t->labels = labels;
    t->label_changes++;
}

void po_switch_labels(po_thread *t, po_labelset *labels)
{
    po_lock();
    if (labels != t->labels) {
        charge_tail_locked(t, TAIL_HERE);
        po_put_labels_locked(t, labels);
    } else {
        po_labelset_unref(labels); /* the same set: nothing to charge, the slot has its reference */
    }
    t->switching = 0;
    po_unlock();
}

void po_switch_fiber(po_thread *t, po_fiber_labels *f, VALUE fiber_obj, po_labelset *labels)
{
    po_lock();
    po_fiber_labels *was = t->fiber;
    if (labels != t->labels) charge_tail_locked(t, TAIL_FIBER_SWITCH);
    if (was) was->last = t->last; /* it keeps its last sample for when it runs again */
    po_fiber_labels_detach(t);
    if (labels != t->labels) po_put_labels_locked(t, labels);
    else po_labelset_unref(labels);
    if (f) {
        f->on = t;
        t->fiber = f;
        t->fiber_obj = fiber_obj;
        t->last = f->last;
    } else {
        t->last = PO_NO_SAMPLE;
    }
    t->switching = 0;
    po_unlock();
}

/* Under po_lock. */
static void register_locked(po_thread *t, int holds_gvl)
{
    if (!po_running || t->tracked || t->excluded) return;
    t->last_cpu_ns = po_thread_cpu_ns(t->tid);
    t->holds_gvl = holds_gvl;
    t->tracked = 1;
    if (po_cfg.no_signals) return; /* accounted at label changes and by the ticker's jobs */
    int err = po_timer_arm(t, (int)(t - po_threads), po_cfg.interval_ns);
    if (err) {
        po_stat_timer_errors++;
        po_stat_last_timer_errno = err;
    }
}

void po_sampler_register_current(void)
{
    po_thread *t = po_thread_current(1);
    if (!t) return;
    po_lock();
    register_locked(t, 1);
    po_unlock();
}

static void register_thread(VALUE thread)
{
    po_thread *t = po_thread_of_thread(thread, 1);
    if (!t) return;
    po_lock();
    if (t->owner == thread) register_locked(t, 0); /* else released meanwhile by its exit hook (NOGVL) */
    po_unlock();
}

static void free_buffers(void)
{
    po_lock();
    po_agg_clear(&bufs[0]);
    po_agg_clear(&bufs[1]);
    po_unlock();
    po_agg_free(&bufs[0]);
    po_agg_free(&bufs[1]);
    free(handler_frames); free(handler_lines); free(gvl_frames); free(gvl_lines);
    handler_frames = gvl_frames = NULL;
    handler_lines = gvl_lines = NULL;
    bufs_cap = 0;
    buffers_depth = 0;
}

/* GVL, not running: no handler and no label change can reach the buffers. Keeps the
 * samples of a previous run when the sizes did not change, so stop/start loses nothing. */
static void ensure_buffers(uint32_t max_samples, int max_depth)
{
    if (bufs_cap == max_samples && buffers_depth == max_depth) return;
    free_buffers();
    size_t n = (size_t)max_depth + 1 + PO_MAX_SKIP;
    handler_frames = malloc(n * sizeof(VALUE));
    gvl_frames = malloc(n * sizeof(VALUE));
    handler_lines = malloc(n * sizeof(int));
    gvl_lines = malloc(n * sizeof(int));
    if (!handler_frames || !gvl_frames || !handler_lines || !gvl_lines ||
        po_agg_init(&bufs[0], max_samples) || po_agg_init(&bufs[1], max_samples)) {
        free_buffers();
        rb_raise(rb_eNoMemError, "pyroscope: cannot allocate sample buffers for max_samples=%u", max_samples);
    }
    bufs_cap = max_samples;
    buffers_depth = max_depth;
    po_active = &bufs[0];
    po_active->started_at_ns = po_realtime_ns();
}

static VALUE register_each_thread(RB_BLOCK_CALL_FUNC_ARGLIST(thread, arg))
{
    (void)arg;
    if (thread == rb_thread_current()) {
        po_sampler_register_current();
    } else {
        register_thread(thread);
    }
    return Qnil;
}

int po_start(long interval_ns, int max_depth, uint32_t max_samples, int no_signals)
{
    if (po_running) return 0;
    if (po_mn_threads_enabled()) {
        rb_warn("pyroscope: not sampling: M:N threads (RUBY_MN_THREADS=1) share native threads between "
                "Ruby threads, so per-thread CPU timers cannot attribute CPU time; unset RUBY_MN_THREADS");
        return 0;
    }
    if (!no_signals) po_signal_install();
    ensure_buffers(max_samples, max_depth);
    po_lock();
    po_attr_forget();
    po_unlock();
    po_cfg.interval_ns = interval_ns;
    po_cfg.max_depth = max_depth;
    po_cfg.max_samples = max_samples;
    po_cfg.no_signals = no_signals;
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
void po_sampler_after_fork_child(void)
{
    po_lock_reset_after_fork();
    po_running = 0;
    po_agg_clear(&bufs[0]);
    po_agg_clear(&bufs[1]);
    po_threads_after_fork_child();
    if (po_active) po_active->started_at_ns = po_realtime_ns();
}

uint64_t po_realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}
