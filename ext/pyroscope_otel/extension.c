/*
 * extension.c — Init and the thin Ruby binding, Pyroscope::Native (GVL; the fork handler
 * excepted, below).
 *
 * Arguments are checked here, before any lock is taken or any state changes, so that a
 * bad call raises (ArgumentError/TypeError naming the value) and leaves nothing half
 * done. Keyword options and defaults live in lib/pyroscope/native.rb.
 * Also holds the GC root that marks the aggregation buffers, and the fork handler.
 *
 * Fork (atfork child: NOGVL, the child's only thread, async-signal-safe code only): the
 * sampler and the ticker reset themselves, the child is marked forked, and when the
 * sampler was running a postponed job is asked for, which restarts sampling and has a
 * thread run the `on_fork_child` block, so that profiling restarts in the child also
 * after a fork that bypasses Process._fork (daemon(3)
 * in Process.daemon, a C extension's fork()): the exporter's Ruby thread is gone there
 * and nothing else would. The job (GVL) and the Ruby hooks on _fork and daemon all call
 * `after_fork`, which runs the block once per fork, whichever comes first.
 */
#include "pyroscope_otel.h"
#include <pthread.h>
#include <ruby/debug.h>

static VALUE mNative;
void po_export_binding_init(VALUE mNative);
void po_pprof_read_init(VALUE mNative);

static VALUE fork_child_block = Qnil;
static volatile int forked; /* set in a child of fork; cleared by the after_fork that runs the block */
#ifdef HAVE_RB_POSTPONED_JOB_PREREGISTER
static rb_postponed_job_handle_t fork_job = POSTPONED_JOB_HANDLE_INVALID;
#endif

static void roots_mark(void *p)
{
    (void)p;
    rb_gc_mark(fork_child_block);
    po_recorder_mark();
    po_threads_mark();
}

static const rb_data_type_t roots_type = {
    .wrap_struct_name = "pyroscope_otel/roots",
    .function = { .dmark = roots_mark },
};

static VALUE native_start(VALUE self, VALUE rate, VALUE depth, VALUE max_samples, VALUE no_signals, VALUE wall,
                          VALUE wall_all)
{
    (void)self;
    int hz = NUM2INT(rate);
    if (hz < 1 || hz > 1000) rb_raise(rb_eArgError, "sample_rate must be 1..1000 Hz, got %d", hz);
    int d = NUM2INT(depth);
    if (d < 1 || d > PO_MAX_DEPTH_LIMIT) rb_raise(rb_eArgError, "max_depth must be 1..%d, got %d", PO_MAX_DEPTH_LIMIT, d);
    long m = NUM2LONG(max_samples);
    if (m < 16 || m > (1L << 24)) rb_raise(rb_eArgError, "max_samples must be 16..%ld, got %ld", 1L << 24, m);
#ifndef HAVE_RB_INTERNAL_THREAD_ADD_EVENT_HOOK
    if (RTEST(wall))
        rb_raise(rb_eArgError, "profile type :wall needs Ruby >= 3.2 (its GVL hand-over events); this is Ruby %" PRIsVALUE,
                 rb_const_get(rb_cObject, rb_intern("RUBY_VERSION")));
#endif
    return po_start(1000000000L / hz, d, (uint32_t)m, RTEST(no_signals), RTEST(wall), RTEST(wall_all)) ? Qtrue : Qfalse;
}

static VALUE native_stop(VALUE self)
{
    (void)self;
    return po_stop() ? Qtrue : Qfalse;
}

static VALUE native_running_p(VALUE self)
{
    (void)self;
    return po_running ? Qtrue : Qfalse;
}

static VALUE native_take_window(VALUE self)
{
    (void)self;
    return po_take_window();
}

static VALUE native_set_own_paths(VALUE self, VALUE paths)
{
    (void)self;
    po_stack_set_own_paths(paths);
    return paths;
}

/* add_id_label(name): a label whose value names one span; a span without a timer sample
 * takes a stack sampled in spans whose other labels are the same (attribution.c). */
static VALUE native_add_id_label(VALUE self, VALUE name)
{
    (void)self;
    StringValue(name);
    po_labelset_add_id_key(RSTRING_PTR(name), RSTRING_LEN(name));
    return name;
}

static VALUE native_stats(VALUE self)
{
    (void)self;
    VALUE h = rb_hash_new();
    po_threads_sweep(); /* `threads` counts live threads' entries, on 3.1 too */
    po_lock();
    size_t threads = po_threads_in_use(), label_sets = po_labelset_live_count();
    uint64_t samples = po_stat_samples, sampling_ns = po_stat_sampling_ns, flushes = po_stat_label_flushes,
             boundary = po_stat_boundary_flushes, walks = po_stat_boundary_walks, drawn = po_stat_drawn_flushes, terr = po_stat_timer_errors;
    uint64_t refused = po_threads_refused;
    uint64_t changes = po_stat_label_changes, dropped_total = po_stat_samples_dropped;
    uint64_t dropped = po_active ? po_active->dropped_samples : 0;
    uint64_t dropped_ns = po_active ? po_active->dropped_cpu_ns : 0;
    po_unlock();
#define SET(k, v) rb_hash_aset(h, ID2SYM(rb_intern(k)), v)
    SET("running", po_running ? Qtrue : Qfalse);
    SET("samples", ULL2NUM(samples));
    SET("sampling_cpu_ns", ULL2NUM(sampling_ns));
    SET("samples_dropped", ULL2NUM(dropped_total));
    SET("label_changes", ULL2NUM(changes));
    SET("label_flushes", ULL2NUM(flushes));
    SET("boundary_flushes", ULL2NUM(boundary));
    SET("boundary_walks", ULL2NUM(walks));
    SET("drawn_flushes", ULL2NUM(drawn));
    SET("skipped_busy", ULL2NUM(__atomic_load_n(&po_stat_skipped_busy, __ATOMIC_RELAXED)));
    SET("skipped_off_gvl", ULL2NUM(__atomic_load_n(&po_stat_skipped_off_gvl, __ATOMIC_RELAXED)));
    SET("timer_errors", ULL2NUM(terr));
    SET("last_timer_errno", INT2NUM(po_stat_last_timer_errno));
    SET("threads", SIZET2NUM(threads));
    SET("threads_refused", ULL2NUM(refused));
    SET("label_sets", SIZET2NUM(label_sets));
    SET("spans_dropped", ULL2NUM(po_spans_dropped));
    SET("window_dropped_samples", ULL2NUM(dropped));
    SET("window_dropped_cpu_ns", ULL2NUM(dropped_ns));
    SET("signal_handler_installed", po_signal_installed() ? Qtrue : Qfalse);
#undef SET
    return h;
}

/* The calling thread is the gem's own (the exporter): never sample it. */
static VALUE native_exclude_current_thread(VALUE self)
{
    (void)self;
    po_thread *t = po_thread_current(1);
    if (!t) return Qfalse;
    po_lock();
    po_account_exclude_locked(t);
    po_unlock();
    return Qtrue;
}

static VALUE native_thread_cpu_ns(VALUE self)
{
    (void)self;
    return ULL2NUM(po_thread_cpu_ns(po_gettid()));
}

/* on_fork_child { }: the block each child of fork runs once, as early as it can (GVL);
 * while one is set, a child's sampling restarts. on_fork_child without a block: none. */
static VALUE native_on_fork_child(VALUE self)
{
    (void)self;
    fork_child_block = rb_block_given_p() ? rb_block_proc() : Qnil;
    return Qnil;
}

/* Runs the on_fork_child block if this process is a child of fork that has not run it yet.
 * Returns whether it ran. */
static VALUE native_after_fork(VALUE self)
{
    (void)self;
    if (!forked) return Qfalse;
    forked = 0; /* first: the block may switch threads, to the job's that calls here too */
    if (!NIL_P(fork_child_block)) rb_proc_call_with_block(fork_child_block, 0, NULL, Qnil);
    return Qtrue;
}

/* The restart's own thread: the job runs where Ruby forbids locking a Mutex (a postponed
 * job is trap context: Logger, Monitor and the exporter's start raised ThreadError there,
 * and the child ran on without its exporter). An error is the block's to report; here it
 * can only be dropped (nothing to raise into). */
static VALUE after_fork_thread(void *unused)
{
    (void)unused;
    int state = 0;
    rb_protect(native_after_fork, Qnil, &state);
    if (state) rb_set_errinfo(Qnil);
    return Qnil;
}

/* The postponed job: GVL, at the child's first interrupt check (a fork through
 * Process._fork has usually restarted already). Sampling restarts here, at once, as it
 * ran in the parent: the child of a bare fork() has no timer thread to hand the GVL to
 * another thread while it computes. The rest (the exporter, the logger) locks Mutexes,
 * which a postponed job may not: a thread of its own does it. */
static void after_fork_job(void *unused)
{
    (void)unused;
    if (!forked || NIL_P(fork_child_block)) return;
    po_start(po_cfg.interval_ns, po_cfg.max_depth, po_cfg.max_samples, po_cfg.no_signals, po_cfg.wall, po_cfg.wall_all);
    rb_thread_create(after_fork_thread, NULL);
}

static void after_fork_child(void)
{
    int was_running = po_running;
    po_profiler_after_fork_child();
    po_ticker_after_fork_child();
    forked = 1;
    if (!was_running) return;
#ifdef HAVE_RB_POSTPONED_JOB_PREREGISTER
    if (fork_job != POSTPONED_JOB_HANDLE_INVALID) rb_postponed_job_trigger(fork_job);
#else
    /* needs the calling Ruby thread (a C library's own thread may have forked); this is
     * the child's only thread, so nothing flushes the jobs concurrently (Bug #19991) */
    if (ruby_native_thread_p()) rb_postponed_job_register_one(0, after_fork_job, NULL);
#endif
}

/* End procs run in reverse order of registration, so this one, registered at load, runs
 * after the application's at_exit blocks (the exporter's last window among them) and
 * before the VM is torn down: a sample walking a VM being destroyed would crash it. */
static void stop_at_exit(VALUE unused)
{
    (void)unused;
    po_stop();
}

RUBY_FUNC_EXPORTED void Init_pyroscope_otel(void)
{
    VALUE mPyroscope = rb_define_module("Pyroscope");
    mNative = rb_define_module_under(mPyroscope, "Native");

    /* The GC calls dmark only for a non-NULL data pointer; any address will do. */
    static int roots_data;
    VALUE roots = TypedData_Wrap_Struct(rb_cObject, &roots_type, &roots_data);
    rb_gc_register_mark_object(roots);

    po_mn_threads_init();
    po_thread_events_init();
    rb_set_end_proc(stop_at_exit, Qnil);
#ifdef HAVE_RB_POSTPONED_JOB_PREREGISTER
    fork_job = rb_postponed_job_preregister(0, after_fork_job, NULL);
#endif
    pthread_atfork(NULL, NULL, after_fork_child);

    rb_define_singleton_method(mNative, "_start", native_start, 6);
#ifdef HAVE_RB_INTERNAL_THREAD_ADD_EVENT_HOOK
    rb_define_const(mNative, "WALL_SUPPORTED", Qtrue);
#else
    rb_define_const(mNative, "WALL_SUPPORTED", Qfalse);
#endif
    rb_define_singleton_method(mNative, "stop", native_stop, 0);
    rb_define_singleton_method(mNative, "running?", native_running_p, 0);
    rb_define_singleton_method(mNative, "take_window", native_take_window, 0);
    rb_define_singleton_method(mNative, "stats", native_stats, 0);
    rb_define_singleton_method(mNative, "own_paths=", native_set_own_paths, 1);
    rb_define_singleton_method(mNative, "add_id_label", native_add_id_label, 1);
    rb_define_singleton_method(mNative, "thread_cpu_ns", native_thread_cpu_ns, 0);
    rb_define_singleton_method(mNative, "exclude_current_thread", native_exclude_current_thread, 0);
    rb_define_singleton_method(mNative, "on_fork_child", native_on_fork_child, 0);
    rb_define_singleton_method(mNative, "after_fork", native_after_fork, 0);
    rb_define_const(mNative, "MAX_THREADS", INT2NUM(PO_MAX_THREADS));
    po_export_binding_init(mNative);
    po_label_slots_init(mNative);
    po_pprof_read_init(mNative);
}
