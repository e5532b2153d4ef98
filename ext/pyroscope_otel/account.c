/*
 * account.c — accounting: every nanosecond of a tracked thread's CPU is charged once, to
 * (stack, labels), in the recorder's active buffer.
 *
 * 1. A timer sample (HANDLER, the thread whose CPU timer fired): if the thread holds the
 *    GVL, its stack is walked and the CPU it used since its previous sample is charged to
 *    (stack, its current labels), with a count of 1. Where the stack cannot be walked now
 *    the sample is deferred, not lost: a thread running C code without the GVL is sampled
 *    when it takes the GVL back (thread_events.c, Ruby >= 3.2; on 3.1 its CPU goes to its
 *    next sample), one in a GC when the GC ends (gc_events.c); a deferred sample weighs
 *    the CPU up to the moment its timer fired, like any other.
 * 2. A label change, a fiber switch or a thread's exit (GVL, or NOGVL for exits): the CPU
 *    used since the thread's previous sample is charged to the *old* labels, count 0, so
 *    that a span shorter than the sample interval keeps its CPU. Its stack: the old
 *    labels' last sample (taken, or charged by a change) when they had one; else a stack sampled recently in spans of the
 *    same kind (attribution.c); else, for a kind never sampled yet, where the labels
 *    changed (own frames trimmed), held until the kind's first stack. A change within
 *    PO_BOUNDED_NS of the thread's last CPU clock read at a change (a span starting, then
 *    its tags; its tags ending, then the span) takes its tail from the monotonic clock
 *    instead of another read (a system call): CPU cannot run faster than wall time, so the
 *    tail is too long by at most that bound, and only if the thread was descheduled
 *    meanwhile; the next read takes the excess back from the next tail, so the thread's
 *    total stays exact and so does a span's, unless the excess falls at its last change.
 *
 * With profile type :wall each charge also carries the thread's wall time not charged yet
 * (wall.c): a sample, the wall it spent holding the GVL since the last one; a tail, all of
 * the old labels' wall not charged yet, to the sample the CPU tail went to.
 *
 * Both paths run under po_lock, which the handler only tries: when taken, the sample is
 * skipped and its CPU carried forward. Memory: the stack buffers, allocated at start for
 * max_depth (the handler's, and the GVL paths' under po_lock), nothing per sample.
 * Calls go down only: the recorder, attribution, stacks, timers, labels, the CPU clock.
 */
#include "pyroscope_otel.h"
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#ifdef HAVE_RB_INTERNAL_THREAD_ADD_EVENT_HOOK
/* kept by the GVL hooks (thread_events.c) */
static int holds_gvl(const po_thread *t)
{
    return t->holds_gvl;
}
#else
int ruby_thread_has_gvl_p(void); /* exported by libruby, declared only in internal headers */

/* Ruby 3.1: asked of the VM (thread-local state: safe in the handler); see DESIGN.md for
 * its bias */
static int holds_gvl(const po_thread *t)
{
    (void)t;
    return ruby_thread_has_gvl_p();
}
#endif

volatile int po_running;
po_config po_cfg = { 10000000L, 512, 65536, 0, 0, 0 };
static VALUE *handler_frames, *gvl_frames;
static int *handler_lines, *gvl_lines;
static int frames_depth;

/* counters: written under po_lock, or with atomics where the handler cannot lock */
uint64_t po_stat_samples, po_stat_sampling_ns, po_stat_label_changes, po_stat_label_flushes, po_stat_boundary_flushes,
    po_stat_boundary_walks, po_stat_drawn_flushes,
    po_stat_skipped_busy, po_stat_skipped_off_gvl, po_stat_timer_errors;
int po_stat_last_timer_errno;

static void free_frames(void)
{
    free(handler_frames); free(handler_lines); free(gvl_frames); free(gvl_lines);
    handler_frames = gvl_frames = NULL;
    handler_lines = gvl_lines = NULL;
    frames_depth = 0;
}

void po_account_alloc(int max_depth)
{
    if (frames_depth == max_depth) return;
    free_frames();
    size_t n = (size_t)max_depth + 1 + PO_MAX_SKIP;
    handler_frames = malloc(n * sizeof(VALUE));
    gvl_frames = malloc(n * sizeof(VALUE));
    handler_lines = malloc(n * sizeof(int));
    gvl_lines = malloc(n * sizeof(int));
    if (!handler_frames || !gvl_frames || !handler_lines || !gvl_lines) {
        free_frames();
        rb_raise(rb_eNoMemError, "pyroscope: cannot allocate stack buffers for max_depth=%d", max_depth);
    }
    frames_depth = max_depth;
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
    uint32_t idx = po_agg_record_stack(po_active, stack, t->labels, at - t->last_cpu_ns, 1);
    uint64_t wall = po_wall_on_gvl_locked(t); /* its wall holding the GVL goes where its CPU goes */
    if (wall) po_agg_add_wall(po_active, idx, wall);
    t->last = po_agg_ref(po_active, idx);
    if (!po_stack_is_own(frames, n)) po_attr_note(po_active, kind_of(t), stack);
    po_stat_samples++;
    t->last_cpu_ns = at;
    t->read_mono_ns = 0; /* `at` may be a past moment: the next change reads the clock */
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
    /* Where the stack cannot be walked now, the sample is taken when it can (its weight is
     * the CPU up to now): a thread running C code that released the GVL (zlib, a database
     * driver) has, when it takes the GVL back, the stack that released it, where the
     * thread event hook samples it (Ruby >= 3.2); while a GC runs (on this thread: another
     * thread's GC finds this one off the GVL) the VM's frames may be moving (compaction),
     * and the GC's exit hook samples the stack that triggered it (gc_events.c). */
    int why = !holds_gvl(t) ? PO_DEFER_OFF_GVL : rb_during_gc() ? PO_DEFER_GC : 0;
    if (why) {
        t->deferred_at_cpu_ns = po_thread_cpu_ns(t->tid);
        t->deferred = why;
        if (why == PO_DEFER_OFF_GVL) __atomic_add_fetch(&po_stat_skipped_off_gvl, 1, __ATOMIC_RELAXED);
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
void po_sample_on_gvl(po_thread *t)
{
    if (!t->tracked || t->switching || rb_during_gc()) return;
    po_lock();
    if (po_running && po_active) sample_locked(t, gvl_frames, gvl_lines, 0, 0);
    po_unlock();
}

void po_sample_deferred(po_thread *t, int why)
{
    if (t->deferred != why) return;
    t->deferred = 0;
    if (t->switching || !t->tracked) return;
    po_lock();
    if (po_running && po_active) {
        /* the handler that deferred it could not re-draw the next expiry (the timer may be
         * deleted unless po_lock is held): without it the timer runs at its fixed period
         * and phase-locks with periodic work (measured: a zlib loop 10 points under) */
        if (t->has_timer) po_timer_rejitter(t);
        sample_locked(t, gvl_frames, gvl_lines, why == PO_DEFER_GC ? PO_LINE_GC : 0, t->deferred_at_cpu_ns);
    }
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
    else {
        n = po_stack_capture(gvl_frames, gvl_lines, po_cfg.max_depth, PO_STACK_TRIM_OWN); /* our own frames: no allocation */
        po_stat_boundary_walks++;
    }
    return n > 0 ? po_agg_intern_stack(po_active, gvl_frames, gvl_lines, n) : UINT32_MAX;
}

/* Under po_lock: the stack for a charge of labels without a sample in this window: one
 * drawn from their kind's recent samples (*drawn set), else the fallback, walked where
 * labels change once per kind (attribution.c). */
static uint32_t charge_stack(uint64_t kind, enum tail_site site, int *drawn)
{
    uint32_t stack = po_attr_draw(po_active, kind);
    *drawn = stack != UINT32_MAX;
    if (*drawn) return stack;
    stack = site == TAIL_HERE ? po_attr_boundary(po_active, kind) : UINT32_MAX;
    if (stack == UINT32_MAX) {
        stack = fallback_stack(site);
        if (site == TAIL_HERE) po_attr_set_boundary(po_active, kind, stack);
    }
    return stack;
}

/* Under po_lock, on the thread itself: its CPU time now, for a label change. Measured: 4
 * reads per request (a span and a tag_wrapper in it) were 4 of the 6 system calls the
 * profiled web server added per request, ~3 µs each there; 2 of them came within a few
 * µs of the one before. */
#define PO_BOUNDED_NS 20000
static uint64_t cpu_now_for_change(po_thread *t)
{
    uint64_t mono = po_monotonic_ns();
    if (t->read_mono_ns && mono - t->read_mono_ns < PO_BOUNDED_NS) {
        uint64_t now = t->last_cpu_ns + (mono - t->accounted_mono_ns);
        t->accounted_mono_ns = mono;
        return now;
    }
    uint64_t now = po_thread_cpu_ns(t->tid);
    /* taken after the read: the system call's own time is in `now`, and counted again by
     * the next estimate (~1.5 µs moved from each span's first change to the one before)
     * when taken before */
    t->read_mono_ns = t->accounted_mono_ns = po_monotonic_ns();
    return now;
}

/* Under po_lock: charges the CPU since the thread's last sample to its current labels
 * (count 0): to that sample when it was taken or charged under them in this window (the
 * first charge becomes it), else to a stack drawn from the recent samples of its labels'
 * kind (attribution.c), else to the fallback. */
static void charge_tail_locked(po_thread *t, enum tail_site site)
{
    if (!po_running || !t->tracked || !po_active) return;
    if (site != TAIL_EXIT && t->tid != po_current_tid()) return;
    uint64_t now = site == TAIL_EXIT ? po_thread_cpu_ns(t->tid) : cpu_now_for_change(t);
    if (now <= t->last_cpu_ns) return;
    uint64_t tail = now - t->last_cpu_ns;
    po_sample *last = po_agg_sample(po_active, t->last);
    if (last) {
        last->cpu_ns += tail;
        /* a charge where the labels changed, held for its kind's first stack: so is this */
        if (!last->count) po_attr_hold(po_active, kind_of(t), t->last, tail);
    } else {
        uint64_t kind = kind_of(t);
        int drawn;
        uint32_t idx = po_agg_record_stack(po_active, charge_stack(kind, site, &drawn), t->labels, tail, 0);
        if (drawn) {
            po_stat_drawn_flushes++;
        } else {
            po_attr_hold(po_active, kind, po_agg_ref(po_active, idx), tail);
            po_stat_boundary_flushes++;
        }
        /* the labels' later tails join it (a span's, around the tags set inside it): one
         * walk and one sample per span, not one per change (measured: a request with a
         * tag_wrapper in its span made 3 samples, each with the span's id, for the window
         * to hold and the export to carry) */
        t->last = po_agg_ref(po_active, idx);
    }
    t->last_cpu_ns = now;
    po_stat_label_flushes++;
}

/* Under po_lock, after the CPU tail: the wall not charged yet under the current labels
 * (wall.c) goes where that tail went, else where it would have gone. */
static void charge_wall_tail_locked(po_thread *t, enum tail_site site)
{
    if (!po_cfg.wall || !po_running || !t->tracked || !po_active) return;
    int on_gvl = site != TAIL_EXIT && t->tid == po_current_tid();
    if (site != TAIL_EXIT && !on_gvl) return; /* as charge_tail_locked: not its own thread */
    uint64_t wall = po_wall_tail_locked(t, on_gvl);
    if (!wall) return;
    po_sample *last = po_agg_sample(po_active, t->last);
    if (last) {
        last->wall_ns += wall;
        return;
    }
    int drawn;
    uint32_t idx = po_agg_record_stack(po_active, charge_stack(kind_of(t), site, &drawn), t->labels, 0, 0);
    po_agg_add_wall(po_active, idx, wall);
    t->last = po_agg_ref(po_active, idx);
}

void po_account_exit_locked(po_thread *t)
{
    charge_tail_locked(t, TAIL_EXIT);
    charge_wall_tail_locked(t, TAIL_EXIT);
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
    po_stat_label_changes++;
}

void po_switch_labels(po_thread *t, po_labelset *labels)
{
    po_lock();
    if (labels != t->labels) {
        charge_tail_locked(t, TAIL_HERE);
        charge_wall_tail_locked(t, TAIL_HERE);
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
    if (labels != t->labels) {
        charge_tail_locked(t, TAIL_FIBER_SWITCH);
        charge_wall_tail_locked(t, TAIL_FIBER_SWITCH);
    }
    if (was) {
        was->last = t->last; /* it keeps its last sample for when it runs again */
        po_wall_fiber_suspended_locked(was);
    }
    po_thread_detach_fiber(t);
    if (labels != t->labels) po_put_labels_locked(t, labels);
    else po_labelset_unref(labels);
    if (f) {
        f->on = t;
        t->fiber = f;
        t->fiber_obj = fiber_obj;
        t->last = f->last;
        if (po_running && t->tracked && po_active) po_wall_fiber_resumed_locked(t, f);
    } else {
        t->last = PO_NO_SAMPLE;
    }
    t->switching = 0;
    po_unlock();
}

void po_account_register_locked(po_thread *t, int holds_gvl)
{
    if (!po_running || t->tracked || t->excluded) return;
    t->last_cpu_ns = po_thread_cpu_ns(t->tid);
    t->read_mono_ns = 0;
    t->holds_gvl = holds_gvl;
    t->tracked = 1;
    po_wall_register_locked(t);
    if (po_cfg.no_signals) return; /* accounted at label changes and by the ticker's jobs */
    int err = po_timer_arm(t, t->index, po_cfg.interval_ns);
    if (err) {
        po_stat_timer_errors++;
        po_stat_last_timer_errno = err;
    }
}

void po_account_exclude_locked(po_thread *t)
{
    t->excluded = 1;
    t->tracked = 0;
    po_timer_disarm(t);
}
