/*
 * extension.c — Init and the thin Ruby binding, Pyroscope::Native (all GVL).
 *
 * Arguments are checked here, before any lock is taken or any state changes, so that a
 * bad call raises (ArgumentError/TypeError naming the value) and leaves nothing half
 * done. Keyword options and defaults live in lib/pyroscope/native.rb.
 * Also holds the GC root that marks the aggregation buffers, and the fork handler.
 */
#include "pyroscope_otel.h"
#include <pthread.h>

static VALUE mNative;
void po_export_binding_init(VALUE mNative);

static void roots_mark(void *p)
{
    (void)p;
    po_windows_mark();
}

static const rb_data_type_t roots_type = {
    .wrap_struct_name = "pyroscope_otel/roots",
    .function = { .dmark = roots_mark },
};

static VALUE native_start(VALUE self, VALUE rate, VALUE depth, VALUE max_samples)
{
    (void)self;
    int hz = NUM2INT(rate);
    if (hz < 1 || hz > 1000) rb_raise(rb_eArgError, "sample_rate must be 1..1000 Hz, got %d", hz);
    int d = NUM2INT(depth);
    if (d < 1 || d > PO_MAX_DEPTH_LIMIT) rb_raise(rb_eArgError, "max_depth must be 1..%d, got %d", PO_MAX_DEPTH_LIMIT, d);
    long m = NUM2LONG(max_samples);
    if (m < 16 || m > (1L << 24)) rb_raise(rb_eArgError, "max_samples must be 16..%ld, got %ld", 1L << 24, m);
    return po_start(1000000000L / hz, d, (uint32_t)m) ? Qtrue : Qfalse;
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

static VALUE build_labelset(VALUE labels)
{
    return (VALUE)po_labelset_from_hash(labels);
}

/* set_labels(hash_or_nil, skip_frames = 0): replace the calling thread's labels. The CPU
 * used since its last sample goes to the old labels, with the stack minus skip_frames
 * frames above this call (the caller's own helper frames). */
static VALUE native_set_labels(int argc, VALUE *argv, VALUE self)
{
    (void)self;
    VALUE labels, skip;
    rb_scan_args(argc, argv, "11", &labels, &skip);
    int s = NIL_P(skip) ? 0 : NUM2INT(skip);
    if (s < 0 || s >= PO_MAX_SKIP) rb_raise(rb_eArgError, "skip_frames must be 0..%d, got %d", PO_MAX_SKIP - 1, s);
    po_thread *t = po_thread_current(1);
    if (!t) rb_raise(rb_eRuntimeError, "pyroscope: more than %d threads carry labels", PO_MAX_THREADS);
    t->switching = 1; /* cleared by po_switch_labels, or here if building the set raises */
    int state = 0;
    VALUE ls = rb_protect(build_labelset, labels, &state);
    if (state) {
        t->switching = 0;
        rb_jump_tag(state);
    }
    po_switch_labels(t, (po_labelset *)ls, s + 1 /* this C function's own frame */);
    return Qnil;
}

static VALUE native_labels(VALUE self)
{
    (void)self;
    po_thread *t = po_thread_current(0);
    if (!t) return rb_hash_new();
    po_lock();
    po_labelset *ls = t->labels;
    po_labelset_ref(ls);
    po_unlock();
    VALUE h = po_labelset_to_hash(ls);
    po_lock();
    po_labelset_unref(ls);
    po_unlock();
    return h;
}

static pid_t tid_arg(VALUE tid)
{
    long v = NUM2LONG(tid);
    if (v <= 0 || v > INT32_MAX) rb_raise(rb_eArgError, "not a native thread id: %ld", v);
    return (pid_t)v;
}

/* set_thread_labels(thread, hash_or_nil): another thread's slot (a Thread, or its native
 * thread id). Its stack is not ours to walk, so its CPU since its last sample goes to the
 * new labels. */
static VALUE native_set_thread_labels(VALUE self, VALUE thread, VALUE labels)
{
    VALUE tid = rb_obj_is_kind_of(thread, rb_cThread) ? rb_funcall(thread, rb_intern("native_thread_id"), 0) : thread;
    if (NIL_P(tid)) return Qfalse; /* not started, or exited */
    pid_t id = tid_arg(tid);
    po_thread *mine = po_thread_current(1);
    if (mine && mine->tid == id) return native_set_labels(1, &labels, self), Qtrue;
    po_labelset *ls = po_labelset_from_hash(labels);
    po_thread *t = po_thread_by_tid(id, 1);
#ifdef HAVE_RB_INTERNAL_THREAD_SPECIFIC_KEY_CREATE
    /* bound, so that its exit frees the entry (3.3+ finds entries by Ruby thread) */
    if (t && rb_obj_is_kind_of(thread, rb_cThread)) po_thread_bind(thread, t);
#endif
    po_lock();
    if (!t || t->tid != id) { /* no room, or the thread exited meanwhile */
        po_labelset_unref(ls);
        po_unlock();
        return Qfalse;
    }
    po_labelset *old = t->labels;
    t->labels = ls;
    t->label_changes++;
    po_labelset_unref(old);
    po_unlock();
    return Qtrue;
}

static VALUE native_stats(VALUE self)
{
    (void)self;
    VALUE h = rb_hash_new();
    po_lock();
    size_t threads = po_threads_in_use(), label_sets = po_labelset_live_count();
    uint64_t samples = po_stat_samples, sampling_ns = po_stat_sampling_ns, flushes = po_stat_label_flushes,
             boundary = po_stat_boundary_flushes, terr = po_stat_timer_errors;
    uint64_t refused = po_threads_refused;
    uint64_t dropped = po_active ? po_active->dropped_samples : 0;
    uint64_t dropped_ns = po_active ? po_active->dropped_cpu_ns : 0;
    po_unlock();
#define SET(k, v) rb_hash_aset(h, ID2SYM(rb_intern(k)), v)
    SET("running", po_running ? Qtrue : Qfalse);
    SET("samples", ULL2NUM(samples));
    SET("sampling_cpu_ns", ULL2NUM(sampling_ns));
    SET("label_flushes", ULL2NUM(flushes));
    SET("boundary_flushes", ULL2NUM(boundary));
    SET("skipped_busy", ULL2NUM(__atomic_load_n(&po_stat_skipped_busy, __ATOMIC_RELAXED)));
    SET("skipped_off_gvl", ULL2NUM(__atomic_load_n(&po_stat_skipped_off_gvl, __ATOMIC_RELAXED)));
    SET("timer_errors", ULL2NUM(terr));
    SET("last_timer_errno", INT2NUM(po_stat_last_timer_errno));
    SET("threads", SIZET2NUM(threads));
    SET("threads_refused", ULL2NUM(refused));
    SET("label_sets", SIZET2NUM(label_sets));
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
    t->excluded = 1;
    po_timer_disarm(t);
    po_unlock();
    return Qtrue;
}

static VALUE native_thread_cpu_ns(VALUE self)
{
    (void)self;
    return ULL2NUM(po_thread_cpu_ns(po_gettid()));
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

    po_thread_events_init();
    rb_set_end_proc(stop_at_exit, Qnil);
    pthread_atfork(NULL, NULL, po_sampler_after_fork_child);

    rb_define_singleton_method(mNative, "_start", native_start, 3);
    rb_define_singleton_method(mNative, "stop", native_stop, 0);
    rb_define_singleton_method(mNative, "running?", native_running_p, 0);
    rb_define_singleton_method(mNative, "take_window", native_take_window, 0);
    rb_define_singleton_method(mNative, "set_labels", native_set_labels, -1);
    rb_define_singleton_method(mNative, "labels", native_labels, 0);
    rb_define_singleton_method(mNative, "set_thread_labels", native_set_thread_labels, 2);
    rb_define_singleton_method(mNative, "stats", native_stats, 0);
    rb_define_singleton_method(mNative, "thread_cpu_ns", native_thread_cpu_ns, 0);
    rb_define_singleton_method(mNative, "exclude_current_thread", native_exclude_current_thread, 0);
    rb_define_const(mNative, "MAX_THREADS", INT2NUM(PO_MAX_THREADS));
    po_export_binding_init(mNative);
}
