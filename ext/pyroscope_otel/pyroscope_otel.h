/*
 * pyroscope_otel.h — the types and entry points shared by the extension's files.
 *
 * Execution contexts used in every file's header comment:
 *   HANDLER  the SIGPROF handler, on the thread whose CPU timer expired; async-signal-safe
 *            code only, no malloc, no Ruby objects, never blocks (try-lock only).
 *   GVL      a Ruby thread holding the GVL; may allocate Ruby objects and may raise
 *            (longjmp), so nothing that can raise runs while po_lock is held.
 *   NOGVL    a native thread without the GVL (thread event hooks on Ruby >= 3.2, the
 *            atfork child handler); may malloc/free and take po_lock, never touches Ruby
 *            objects.
 *
 * po_lock is the one lock of the extension. It guards the thread table's mutable fields,
 * label-set reference counts and the intern table, and both aggregation buffers. GVL and
 * NOGVL code spin on it (its holders never block and never hold it for more than a few
 * microseconds); the handler only tries it and, when it is taken, skips the sample: the
 * thread's CPU time is not lost, the next sample's weight carries it.
 */
#ifndef PYROSCOPE_OTEL_H
#define PYROSCOPE_OTEL_H

#include <ruby.h>
#include <ruby/debug.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#define PO_MAX_THREADS 4096
#define PO_MAX_DEPTH_LIMIT 4096
#define PO_MAX_SKIP 64 /* own frames a label change may trim above its caller */

/* ---- lock.c ---------------------------------------------------------------------- */
void po_lock(void);
int po_trylock(void); /* HANDLER-safe; 1 when acquired */
void po_unlock(void);
void po_lock_reset_after_fork(void);

/* xorshift64: a few cycles, the state the caller's own (HANDLER-safe) */
static inline uint64_t po_xorshift64(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *state = x;
}

/* ---- cpu_clock.c: thread ids and CPU clocks ------------------------------------------ */
uint64_t po_thread_cpu_ns(pid_t tid); /* HANDLER-safe; a system call */
clockid_t po_thread_clock(pid_t tid);
pid_t po_gettid(void);                /* HANDLER-safe; a system call */
pid_t po_current_tid(void);           /* GVL: the same, cached per thread (label changes) */
void po_current_tid_after_fork_child(void);
uint64_t po_realtime_ns(void);
void po_mn_threads_init(void);         /* at load */
int po_mn_threads_enabled(void);      /* M:N threads in the main Ractor: native threads shared by its threads */
/* GVL (or the RESUMED hook, on the thread): the calling Ruby thread may share its native
 * thread, under M:N threads or in a Ractor other than the main one */
int po_shares_native_thread(void);
uint64_t po_monotonic_ns(void);       /* vDSO: no system call */

/* ---- labels.c: immutable, interned, reference-counted label sets ---------------- */
#define PO_MAX_LABELS 100       /* the server's labels-per-sample limit */
#define PO_MAX_KEY_BYTES 1024   /* the server's label name limit */
#define PO_MAX_VALUE_BYTES 2048 /* the server's label value limit */
typedef struct po_label {
    const char *key, *value;
    uint32_t key_len, value_len;
} po_label;

typedef struct po_labelset {
    uint64_t hash;
    uint64_t kind; /* hash of its pairs but the ids of one span (profile_id, ...): spans of a kind */
    uint32_t refs; /* under po_lock */
    uint32_t count;
    struct po_labelset *intern_next;
    po_label pairs[]; /* sorted by key, keys unique; the bytes follow the array */
} po_labelset;

/* GVL: builds (or finds) the interned set for a Ruby Hash; returns a new reference.
 * May raise on bad keys/values: call it before taking po_lock. NULL for an empty hash. */
po_labelset *po_labelset_from_hash(VALUE hash);
/* GVL: likewise from n (key, value) String pairs with distinct keys; may raise. */
po_labelset *po_labelset_from_pairs(const VALUE *kv, long n);
void po_label_pair(VALUE *key, VALUE *value); /* GVL: checks and converts one pair; may raise */
/* GVL: base with over's pairs added (over wins on a shared key); a new reference, NULL
 * when both are empty or memory is short. Never raises. */
po_labelset *po_labelset_merge(const po_labelset *base, const po_labelset *over);
uint64_t po_labelset_kind(const po_labelset *ls); /* NULL ok: the kind of no labels */
void po_labelset_add_id_key(const char *key, long len); /* GVL; may raise: sets built later leave it out of their kind */
/* GVL: base with `changes` applied (a Hash of tags: any key or value by its to_s, nil
 * removes the key); a new reference, NULL when empty. *previous (unless NULL) gets the
 * changed keys' values in base (nil where absent): applied, they restore them. May raise. */
po_labelset *po_labelset_apply(const po_labelset *base, VALUE changes, VALUE *previous);
VALUE po_labelset_to_hash(const po_labelset *ls); /* GVL */
void po_labelset_ref(po_labelset *ls);            /* under po_lock; NULL ok */
void po_labelset_unref(po_labelset *ls);          /* under po_lock; NULL ok; may free */
size_t po_labelset_live_count(void);              /* under po_lock */
/* the length of at most max bytes of p that does not split a UTF-8 character */
long po_utf8_prefix(const char *p, long len, long max);

/* A sample of a window, kept by threads and fibers to add CPU to it later. The one way to
 * hold on to a sample: it is void unless its epoch is the epoch of the buffer it is used
 * with, so a reference survives buffer swaps, clears and reallocations (a new
 * max_samples or max_depth) without ever reaching a sample it was not taken for. */
typedef struct po_sample_ref {
    uint64_t epoch; /* 0: none */
    uint32_t index;
} po_sample_ref;
#define PO_NO_SAMPLE ((po_sample_ref){ 0, 0 })

/* ---- thread_state.c: the table of known threads -------------------------------- */
typedef struct po_thread {
    pid_t tid;              /* 0: free slot */
    int index;              /* in po_threads: what its timer's signal carries */
    VALUE owner;            /* the Ruby Thread whose entry it is; marked (pinned) while in use */
    volatile int holds_gvl; /* Ruby >= 3.2: kept by the GVL hooks */
    int has_timer;
    int tracked;            /* its CPU is being accounted (sampled, and charged at label changes) */
    int excluded;           /* the gem's own Ruby threads: never given a timer */
    volatile int switching; /* inside a label change: its own samples are deferred to it */
    volatile int deferred;  /* a sample its timer asked for where the stack could not be
                             * walked: PO_DEFER_OFF_GVL or PO_DEFER_GC; 0: none */
    volatile uint64_t deferred_at_cpu_ns; /* its CPU time when that timer fired */
    timer_t timer;
    uint64_t last_cpu_ns;   /* CPU time already accounted; under po_lock */
    /* monotonic times: of the last read of its CPU clock at a label change (0: none since
     * its last sample), and of the moment last_cpu_ns stands for; under po_lock */
    uint64_t read_mono_ns, accounted_mono_ns;
    po_labelset *labels;    /* the label slot: what its samples carry now; under po_lock */
    po_labelset *base;      /* thread-wide labels, under every fiber's own; under po_lock */
    struct po_fiber_labels *fiber; /* labels of the fiber running on it, NULL if it has none */
    VALUE fiber_obj;        /* the Ruby object of `fiber`, marked while it is current */
    long interval_ns;       /* mean sampling interval of its timer */
    uint64_t rng;           /* jitter state, touched only by the thread's own handler */
    uint64_t label_changes;
    /* the sample this thread last charged under its current labels; none since the labels
     * changed. Under po_lock. */
    po_sample_ref last;
    /* the labels before the current ones (a reference) and their last sample: a span
     * ending returns to them, and their next charge needs no stack walk */
    po_labelset *prev_labels;
    po_sample_ref prev;
    /* wall time (wall.c), with profile type :wall only. Monotonic ns: the moment its wall
     * is charged up to while it holds the GVL; wall it spent holding the GVL before its
     * last release, not charged yet (it goes with its next CPU charge); short waits carried
     * until one is walked, blocked and waiting for the GVL, and the carry that makes the
     * next walk. Under po_lock. */
    uint64_t wall_at_ns, wall_held_ns, wall_carry_ns, wall_carry_gvl_ns, wall_walk_at_ns;
    /* the moments it released the GVL and asked for it back; 0: none since it resumed.
     * Written by the SUSPENDED and READY hooks (NOGVL, no lock), read at RESUMED. */
    volatile uint64_t wall_suspended_ns, wall_ready_ns;
} po_thread;

extern po_thread po_threads[PO_MAX_THREADS];
extern int po_threads_high_water; /* under po_lock: entries at or above it have never been used */

/* GVL, or a thread event hook about the calling thread (3.2+): the calling thread's entry */
po_thread *po_thread_current(int create);
/* GVL, outside po_lock and thread event hooks (calls Ruby methods): any Ruby thread's
 * entry; NULL when it has not started or has ended, or the table is full */
po_thread *po_thread_of_thread(VALUE thread, int create);
void po_threads_mark(void);                       /* GC mark phase: the entries' owners and running fibers' objects */
/* GVL, outside po_lock and thread event hooks: releases the entries of threads that ended
 * unseen (Ruby 3.1, which reports only threads that return; a no-op on >= 3.2) */
void po_threads_sweep(void);
po_thread *po_thread_cached(void);               /* GVL: the calling thread's entry if known, no search */
void po_thread_keys_init(void);
#ifdef HAVE_RB_INTERNAL_THREAD_SPECIFIC_KEY_CREATE
po_thread *po_thread_of(VALUE thread);            /* any context: the entry bound to a Ruby thread */
void po_thread_bind(VALUE thread, po_thread *t);
#endif
void po_thread_register_current(void);            /* GVL: the calling thread's CPU is accounted, with a timer */
void po_thread_release(po_thread *t);             /* under po_lock: timer, labels, slot */
void po_thread_forget_current(void);              /* 3.1/3.2: the calling thread is exiting */
void po_threads_after_fork_child(void);
size_t po_threads_in_use(void);                   /* under po_lock */
extern uint64_t po_threads_refused; /* claims refused: the table was full of live threads */

/* ---- label_slots.c: per-fiber labels, thread-wide labels, the fiber switch ------- */
typedef struct po_fiber_labels {
    po_labelset *tags;      /* the fiber's tags */
    VALUE spans;            /* Array of its active spans' SpanLabels, innermost last */
    po_labelset *own;       /* its tags with its innermost span's labels over them */
    po_labelset *effective; /* its thread's base with `own` over it: what its samples carry */
    po_labelset *merged_base; /* the base `effective` was merged from */
    po_thread *on;          /* the entry of the thread it is running on, else NULL */
    int stale;              /* `effective` is to be merged again before use */
    po_sample_ref last; /* its last sample under `effective` while it was not running */
    uint64_t suspended_ns; /* monotonic: when it last stopped running (wall.c); 0: running or never */
} po_fiber_labels;

/* under po_lock: t no longer runs t->fiber (the one link between a thread's entry and a
 * fiber's labels, cut from the thread's side by the table, accounting and label slots) */
static inline void po_thread_detach_fiber(po_thread *t)
{
    if (t->fiber) t->fiber->on = NULL;
    t->fiber = NULL;
    t->fiber_obj = 0;
}

#define PO_MAX_SPANS 128 /* active spans per fiber; one more drops the outermost */
extern uint64_t po_spans_dropped; /* GVL: outermost spans dropped past the cap, since load */
void po_label_slots_init(VALUE mNative); /* at load */

/* ---- timer.c: one POSIX CPU-time timer per thread ------------------------------ */
int po_timer_arm(po_thread *t, int slot, long interval_ns); /* 0 or errno */
void po_timer_disarm(po_thread *t);
int po_timer_rejitter(po_thread *t); /* HANDLER: next expiry in 0.5..1.5 intervals */

/* ---- signal.c -------------------------------------------------------------------- */
void po_signal_install(void); /* GVL; raises when another profiler owns SIGPROF */
int po_signal_installed(void);

/* ---- stack.c: stack capture ----------------------------------------------------- */
#define PO_FRAME_SYNTHETIC ((VALUE)Qfalse)  /* synthetic frames carry a kind in the line field */
#define PO_LINE_GC (-1)
#define PO_LINE_TRUNCATED (-2)
#define PO_LINE_FIBER_SWITCH (-3)
#define PO_LINE_THREAD_EXIT (-4)
#define PO_LINE_DROPPED (-5) /* in windows and exports only: what a full buffer dropped */
#define PO_LINE_GVL_WAIT (-6) /* wall: waiting to get the GVL back, on top of the stack that released it */
#define PO_MAX_STACK (PO_MAX_DEPTH_LIMIT + 1 + PO_MAX_SKIP) /* the most frames a capture buffer holds */
/* HANDLER or GVL, the calling thread only, which must hold the GVL. With PO_STACK_TRIM_OWN
 * (GVL, under po_lock), drops leaf-most frames of C functions and own paths (at most
 * PO_MAX_SKIP, never the last). Keeps at most max_depth + 1 (the extra one a truncation
 * marker); buffers hold max_depth + 1 + PO_MAX_SKIP. Returns the count. */
#define PO_STACK_TRIM_OWN 1  /* trim_own below */
#define PO_STACK_GC_ENDING 2 /* a GC sample taken after the GC (its exit hook, or the job): walk */
int po_stack_capture(VALUE *frames, int *lines, int max_depth, int flags);
void po_stack_set_own_paths(VALUE paths); /* GVL; Array of String prefixes */
VALUE po_frame_name(VALUE frame, int line); /* GVL: "Class#method", or a synthetic frame's name */
/* Under po_lock (HANDLER or GVL): the leaf-most Ruby frame is the gem's or the SDK's */
int po_stack_is_own(const VALUE *frames, int n);

/* ---- aggregate.c: (stack, labels) -> cpu ns, count, in bounded memory -------------- */
typedef struct po_sample {
    uint64_t cpu_ns;
    uint64_t wall_ns; /* profile type :wall only (wall.c); 0 otherwise */
    uint64_t count;
    po_labelset *labels; /* a reference held by this sample */
    uint32_t stack;
    uint32_t slot;
} po_sample;

/* One window's samples. Outside aggregate.c, read only the samples, the counters and the
 * stack count; a stack's frames through po_agg_stack. */
typedef struct po_agg {
    struct po_node *nodes; /* the frames: a prefix tree, a stack being its leaf node */
    uint32_t *node_index;
    uint32_t nodes_used, nodes_cap, node_index_mask, node_index_shift;
    struct po_stack *stacks;
    uint32_t *stack_index; /* open addressing: stack number + 1, 0 = empty */
    uint32_t stacks_used, stacks_cap, stack_index_mask; /* stack numbers: 0 .. stacks_used - 1 */
    struct po_path *paths; /* the last stacks interned */
    VALUE *copy_frames;    /* po_agg_copy_stack's scratch */
    int *copy_lines;
    po_sample *samples;
    uint32_t *sample_index;
    uint32_t samples_used, samples_cap, sample_index_mask;
    uint64_t dropped_samples, dropped_cpu_ns, dropped_wall_ns;
    uint64_t started_at_ns; /* CLOCK_REALTIME */
    uint64_t epoch;         /* new at every init and clear, from one counter that never resets */
} po_agg;


int po_agg_init(po_agg *a, uint32_t max_samples); /* GVL; 0 or ENOMEM */
void po_agg_free(po_agg *a);                      /* GVL, the agg must be empty */
/* Under po_lock (HANDLER or GVL); never allocate. A stack's number, or UINT32_MAX when a
 * table is full (or the stack is deeper than PO_MAX_STACK): */
uint32_t po_agg_intern_stack(po_agg *a, const VALUE *frames, const int *lines, int depth);
uint32_t po_agg_copy_stack(po_agg *to, const po_agg *from, uint32_t stack); /* from's stack into to */
/* The sample's number, or UINT32_MAX when it was dropped (stack UINT32_MAX: dropped too). */
uint32_t po_agg_record_stack(po_agg *a, uint32_t stack, po_labelset *labels, uint64_t cpu_ns, uint64_t count);
extern uint64_t po_stat_samples_dropped; /* samples (and charges) refused by full windows, ever */
uint32_t po_agg_record(po_agg *a, const VALUE *frames, const int *lines, int depth,
                       po_labelset *labels, uint64_t cpu_ns, uint64_t count);
/* A stack's depth; its leaf-most min(depth, cap) frames and lines written leaf first.
 * Under po_lock, or on a taken buffer. */
uint32_t po_agg_stack(const po_agg *a, uint32_t stack, VALUE *frames, int *lines, uint32_t cap);
void po_agg_clear(po_agg *a);                  /* under po_lock */
po_sample_ref po_agg_ref(const po_agg *a, uint32_t index); /* PO_NO_SAMPLE for UINT32_MAX */
/* Under po_lock: adds wall ns to sample `index` (UINT32_MAX: to what the buffer dropped) */
void po_agg_add_wall(po_agg *a, uint32_t index, uint64_t wall_ns);
po_sample *po_agg_sample(po_agg *a, po_sample_ref ref);    /* under po_lock; NULL when void */
void po_agg_mark(const po_agg *a);             /* GC mark phase */

/* ---- attribution.c: where unseen CPU goes (under po_lock) -------------------------- */
void po_attr_note(po_agg *a, uint64_t kind, uint32_t stack); /* a timer sample's stack in a */
/* the fallback sample that took cpu_ns of a kind without a stack yet */
void po_attr_hold(po_agg *a, uint64_t kind, po_sample_ref sample, uint64_t cpu_ns);
uint32_t po_attr_draw(const po_agg *a, uint64_t kind); /* a recent stack of that kind in a, or UINT32_MAX */
uint32_t po_attr_boundary(const po_agg *a, uint64_t kind); /* the kind's walked boundary stack in a, or UINT32_MAX */
void po_attr_set_boundary(po_agg *a, uint64_t kind, uint32_t stack);
void po_attr_carry_over(const po_agg *from, po_agg *to); /* the kinds' stacks follow a swap */
void po_attr_forget(void);

/* ---- recorder.c: the two buffers, the active one and the one being taken ----------- */
extern po_agg *po_active; /* the buffer accounting writes; swapped by a take */
void po_recorder_alloc(uint32_t max_samples); /* GVL, stopped; raises NoMemoryError */
/* GVL: swaps out the active buffer for a take (its start and the take's time in *started,
 * *ended); NULL when another take is under way or the sampler never started. The taker
 * reads it without the lock (nothing writes it) and hands it back. */
po_agg *po_window_begin(uint64_t *started, uint64_t *ended);
void po_window_end(po_agg *a); /* GVL: clears it; the next take may begin */
void po_recorder_mark(void);   /* GC mark phase */
void po_recorder_after_fork_child(void);

/* ---- account.c: charging CPU to (stack, labels) ---------------------------------------- */
typedef struct po_config {
    long interval_ns;
    int max_depth;
    uint32_t max_samples;
    int no_signals; /* no timers, no SIGPROF: the ticker's postponed jobs sample instead */
    int wall;       /* profile type :wall: every sample also carries wall time (wall.c; Ruby >= 3.2) */
    int wall_all;   /* wall of every thread; else only while a thread has labels (a span, tags) */
} po_config;

extern volatile int po_running;
extern po_config po_cfg;

void po_account_alloc(int max_depth); /* GVL, stopped: stack buffers; raises NoMemoryError */
/* under po_lock: t's CPU is accounted from now on, with a timer unless no_signals */
void po_account_register_locked(po_thread *t, int holds_gvl);
void po_account_exclude_locked(po_thread *t); /* under po_lock: the gem's own threads */
void po_sample_from_handler(po_thread *t);    /* HANDLER, on t's thread */
void po_sample_on_gvl(po_thread *t);          /* GVL, on t's thread (the ticker's job) */
/* GVL, on t's own thread: the sample its timer asked for where its stack could not be
 * walked (t->deferred == why), taken now that it can and before any Ruby code ran: just
 * after it took the GVL back (Ruby >= 3.2), at the stack that released it; at the end of
 * a GC, at the stack that triggered it, under a "(garbage collection)" leaf. */
#define PO_DEFER_OFF_GVL 1
#define PO_DEFER_GC 2
void po_sample_deferred(po_thread *t, int why);
/* Under po_lock, t's thread is exiting or has ended (any context): its CPU since its last
 * sample is charged (its stack cannot be walked: its last sample's, or its kind's); the
 * caller then releases the entry. */
void po_account_exit_locked(po_thread *t);
/* GVL, the calling thread: account its CPU since the last sample to its current labels,
 * then put `labels` (a new reference the slot takes) in its slot. */
void po_switch_labels(po_thread *t, po_labelset *labels);
/* under po_lock: the slot takes `labels` (a reference) without charging anything; for
 * changes made from another thread, whose stack is not ours to walk */
void po_put_labels_locked(po_thread *t, po_labelset *labels);
/* GVL, on the calling thread just after it switched to the fiber whose labels are `f`
 * (NULL: none of its own): as po_switch_labels, but the old fiber's stack is gone; each
 * fiber keeps its last sample while it is not running. `labels` is a new reference that
 * the slot takes. */
void po_switch_fiber(po_thread *t, po_fiber_labels *f, VALUE fiber_obj, po_labelset *labels);
extern uint64_t po_stat_samples, po_stat_sampling_ns, po_stat_label_changes, po_stat_label_flushes, po_stat_boundary_flushes,
    po_stat_boundary_walks, po_stat_drawn_flushes, po_stat_skipped_busy, po_stat_skipped_off_gvl, po_stat_timer_errors;
extern int po_stat_last_timer_errno;

/* ---- wall.c: wall time, from the GVL hand-overs (Ruby >= 3.2) ------------------------ */
/* GVL, at start: profile type :wall on, for every thread or only labelled ones; its stack
 * buffer (raises NoMemoryError) */
void po_wall_start(int max_depth, int on, int all);
int po_wall_enabled(void);
void po_wall_register_locked(po_thread *t);    /* under po_lock: t's wall is accounted from now */
/* Under po_lock, t holding the GVL (HANDLER on t, or t itself): its wall since the last
 * charge while holding the GVL, for a CPU charge to carry (0 when not kept) */
uint64_t po_wall_on_gvl_locked(po_thread *t);
/* Under po_lock, t's labels about to change or t exiting (on_gvl 0: its current stretch is
 * not known to be on the GVL): everything not charged yet; 0 when not kept */
uint64_t po_wall_tail_locked(po_thread *t, int on_gvl);
void po_wall_suspended(po_thread *t);           /* NOGVL hook: released the GVL */
void po_wall_ready(po_thread *t);               /* NOGVL hook: wants it back */
void po_wall_resumed(po_thread *t);             /* GVL, on t's own thread: got it back */
/* GVL, on t's thread, under po_lock, just after fiber f (its labels now t's) was switched
 * to: the wall f spent suspended, if it has labels of its own */
void po_wall_fiber_resumed_locked(po_thread *t, po_fiber_labels *f);
void po_wall_fiber_suspended_locked(po_fiber_labels *f); /* under po_lock: f stops running now */

/* ---- thread_events.c: per-Ruby-version thread lifecycle and GVL state --------------- */
void po_thread_events_init(void);  /* at load */
void po_thread_events_start(void); /* GVL, on start */
void po_thread_events_stop(void);  /* GVL, on stop */

/* ---- gc_events.c: the end of each GC, where a sample deferred during it is taken ---- */
void po_gc_events_start(void); /* GVL */
void po_gc_events_stop(void);  /* GVL */
void po_gc_events_deferred(void); /* HANDLER, on the thread running the GC: a GC sample was deferred */

/* ---- ticker.c: the signal-free trigger (Ruby >= 3.3) ---------------------------------- */
int po_ticker_start(long interval_ns); /* GVL; 0 when this Ruby cannot do it */
void po_ticker_stop(void);             /* GVL */
void po_ticker_after_fork_child(void);

/* ---- profiler.c: control --------------------------------------------------------------- */
int po_start(long interval_ns, int max_depth, uint32_t max_samples, int no_signals, int wall, int wall_all); /* GVL; 0 if running */
int po_stop(void);                                                                    /* GVL; 0 if stopped */
void po_profiler_after_fork_child(void);

/* ---- window.c: a taken window as Ruby data ------------------------------------------- */
VALUE po_take_window(void); /* GVL */

void Init_pyroscope_otel(void);

#endif
