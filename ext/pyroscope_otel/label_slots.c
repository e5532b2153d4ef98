/*
 * label_slots.c — whose labels a thread's samples carry: per-fiber labels, thread-wide
 * labels, and the fiber switch. Binding: Native.set_labels, labels, fiber_labels,
 * set_fiber_labels, set_thread_labels.
 *
 * The OpenTelemetry context lives per Fiber, so the labels do too. A fiber that sets
 * labels gets a Pyroscope::Native::FiberLabels object, kept in its fiber-local storage
 * (Thread#[]), holding what it set (`own`) and what its samples carry (`effective`: its
 * thread's thread-wide `base` with `own` over it). A fiber that never set labels carries
 * just its thread's base, so a new fiber starts with no span, as its OTel context does.
 * A thread's slot (po_thread.labels, what the handler reads) is the effective set of the
 * fiber running on it; a RUBY_EVENT_FIBER_SWITCH hook (GVL, on the thread, after the
 * switch) puts the new fiber's labels in the slot, and po_switch_fiber charges the CPU
 * the old fiber used since the last sample to the old labels.
 *
 * A fiber's labels can be changed while it is not running (a span that ends on another
 * fiber or thread): only its object changes, or, when it runs on another thread right now,
 * that thread's slot too (without a stack to charge, like any change made from outside).
 * Thread-wide labels changed later reach a fiber's effective set when it next runs.
 *
 * Contexts: everything here runs on the GVL. Ruby work (building sets, which may raise,
 * allocating objects) happens before po_lock is taken; the object of the fiber running on
 * a thread is marked through the thread table, so it cannot be freed while it is current.
 * The free function runs on the GVL during GC (no allocation) and takes po_lock.
 */
#include "pyroscope_otel.h"

static ID id_fiber_labels;
static VALUE cFiberLabels;

static void fiber_labels_free(void *p)
{
    po_fiber_labels *f = p;
    po_lock();
    if (f->on && f->on->fiber == f) po_fiber_labels_detach(f->on);
    po_labelset_unref(f->own);
    po_labelset_unref(f->effective);
    po_labelset_unref(f->merged_base);
    po_unlock();
    xfree(f);
}

static const rb_data_type_t fiber_labels_type = {
    .wrap_struct_name = "pyroscope_otel/fiber_labels",
    .function = { .dfree = fiber_labels_free, .dsize = NULL },
    .flags = RUBY_TYPED_FREE_IMMEDIATELY,
};

void po_fiber_labels_detach(po_thread *t)
{
    if (t->fiber) t->fiber->on = NULL;
    t->fiber = NULL;
    t->fiber_obj = 0;
}

void po_label_slots_mark(void)
{
    po_lock();
    for (int i = 0; i < PO_MAX_THREADS; i++)
        if (po_threads[i].tid && po_threads[i].fiber_obj) rb_gc_mark(po_threads[i].fiber_obj);
    po_unlock();
}

/* the calling fiber's object, created when `create`; Qnil when it has none */
static VALUE current_object(int create)
{
    VALUE obj = rb_thread_local_aref(rb_thread_current(), id_fiber_labels);
    if (rb_typeddata_is_kind_of(obj, &fiber_labels_type)) return obj;
    if (!create) return Qnil;
    po_fiber_labels *f;
    obj = TypedData_Make_Struct(cFiberLabels, po_fiber_labels, &fiber_labels_type, f);
    rb_thread_local_aset(rb_thread_current(), id_fiber_labels, obj);
    return obj;
}

static po_fiber_labels *fiber_labels_of(VALUE obj)
{
    return rb_check_typeddata(obj, &fiber_labels_type);
}

/* Under po_lock: f's own set becomes `own` (a reference it takes), its effective set
 * `effective` (likewise) merged from `base`; its last sample is void. */
static void store_locked(po_fiber_labels *f, po_labelset *own, po_labelset *effective, po_labelset *base)
{
    po_labelset_unref(f->own);
    po_labelset_unref(f->effective);
    po_labelset_unref(f->merged_base);
    f->own = own;
    f->effective = effective;
    po_labelset_ref(base);
    f->merged_base = base;
    f->stale = 0;
    f->last_agg = NULL;
}

/* base with own over it; when memory is short, own alone (never raises) */
static po_labelset *merged(po_labelset *base, po_labelset *own)
{
    po_labelset *m = po_labelset_merge(base, own);
    if (!m && own) {
        po_lock();
        po_labelset_ref(own);
        po_unlock();
        m = own;
    }
    return m;
}

/* A new reference to what f's samples carry on t, brought up to date with t's base. */
static po_labelset *effective_on(po_thread *t, po_fiber_labels *f)
{
    po_lock();
    po_labelset *base = f ? t->base : NULL, *own = f ? f->own : NULL;
    int stale = f && (f->stale || f->merged_base != base);
    po_labelset_ref(base);
    po_labelset_ref(own);
    po_unlock();
    po_labelset *m = stale ? merged(base, own) : NULL;
    po_lock();
    if (stale) {
        po_labelset_ref(own);
        store_locked(f, own, m, base);
    }
    po_labelset *want = f ? f->effective : t->base;
    po_labelset_ref(want);
    po_labelset_unref(base);
    po_labelset_unref(own);
    po_unlock();
    return want;
}

static void on_fiber_switch(VALUE tp, void *arg)
{
    (void)tp;
    (void)arg;
    po_thread *t = po_thread_cached();
    if (!t) return; /* a thread that never carried labels nor was sampled */
    VALUE obj = current_object(0);
    po_fiber_labels *f = NIL_P(obj) ? NULL : fiber_labels_of(obj);
    if (!f && !t->fiber) return; /* from one fiber without labels to another: both carry the base */
    t->switching = 1;
    po_switch_fiber(t, f, obj, effective_on(t, f));
}

static VALUE build_labelset(VALUE labels)
{
    return (VALUE)po_labelset_from_hash(labels);
}

static po_thread *current_entry(void)
{
    po_thread *t = po_thread_current(1);
    if (!t) rb_raise(rb_eRuntimeError, "pyroscope: more than %d threads carry labels", PO_MAX_THREADS);
    return t;
}

/* The calling fiber's own labels become `labels`: the CPU its thread used since the last
 * sample goes to the old labels. */
static void set_current(po_thread *t, VALUE obj, VALUE labels)
{
    t->switching = 1; /* cleared by po_switch_labels, or here if building the set raises */
    int state = 0;
    po_labelset *own = (po_labelset *)rb_protect(build_labelset, labels, &state);
    if (state) {
        t->switching = 0;
        rb_jump_tag(state);
    }
    po_fiber_labels *f = fiber_labels_of(obj);
    po_lock();
    po_labelset *base = t->base;
    po_labelset_ref(base);
    po_unlock();
    po_labelset *m = merged(base, own);
    po_lock();
    store_locked(f, own, m, base);
    po_labelset_unref(base);
    if (t->fiber != f) {
        po_fiber_labels_detach(t);
        t->fiber = f;
        t->fiber_obj = obj;
        f->on = t;
    }
    po_labelset_ref(m);
    po_unlock();
    po_switch_labels(t, m);
    RB_GC_GUARD(obj);
}

/* set_labels(hash_or_nil): the calling fiber's own labels. */
static VALUE native_set_labels(VALUE self, VALUE labels)
{
    (void)self;
    set_current(current_entry(), current_object(1), labels);
    return Qnil;
}

/* fiber_labels: the calling fiber's FiberLabels, to change them later from anywhere. */
static VALUE native_fiber_labels(VALUE self)
{
    (void)self;
    current_entry();
    return current_object(1);
}

/* set_fiber_labels(fiber_labels, hash_or_nil): that fiber's own labels, from whichever
 * fiber or thread is running. */
static VALUE native_set_fiber_labels(VALUE self, VALUE obj, VALUE labels)
{
    (void)self;
    po_fiber_labels *f = fiber_labels_of(obj);
    if (current_object(0) == obj) {
        set_current(current_entry(), obj, labels);
        return Qnil;
    }
    po_labelset *own = po_labelset_from_hash(labels);
    po_lock();
    po_thread *on = f->on;
    po_labelset *base = on ? on->base : NULL;
    po_labelset_ref(base);
    po_unlock();
    /* not running: merged with its thread's base when it next runs */
    po_labelset *m = on ? merged(base, own) : NULL;
    po_lock();
    if (f->on == on && (!on || on->base == base)) {
        store_locked(f, own, m, base);
        f->stale = !on;
        if (on) {
            po_labelset_ref(m);
            po_labelset_unref(on->labels);
            on->labels = m;
            on->last_agg = NULL;
            on->label_changes++;
        }
    } else { /* its thread exited meanwhile (exit hooks run without the GVL) */
        store_locked(f, own, NULL, NULL);
        f->stale = 1;
        po_labelset_unref(m);
    }
    po_labelset_unref(base);
    po_unlock();
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

static VALUE fiber_labels_to_h(VALUE obj)
{
    po_fiber_labels *f = fiber_labels_of(obj);
    po_lock();
    po_labelset *ls = f->own;
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

/* set_thread_labels(thread, hash_or_nil): a thread's thread-wide labels, under every one
 * of its fibers' own (a Thread, or its native thread id). Another thread's stack is not
 * ours to walk, so its CPU since its last sample goes to the new labels. */
static VALUE native_set_thread_labels(VALUE self, VALUE thread, VALUE labels)
{
    (void)self;
    int is_thread = rb_obj_is_kind_of(thread, rb_cThread);
    VALUE tid = is_thread ? rb_funcall(thread, rb_intern("native_thread_id"), 0) : thread;
    if (NIL_P(tid)) return Qfalse; /* not started, or exited */
    pid_t id = tid_arg(tid);
    po_thread *mine = po_thread_current(1);
    int self_thread = mine && mine->tid == id;
    po_labelset *base = po_labelset_from_hash(labels);
    po_thread *t = self_thread ? mine : po_thread_by_tid(id, 1);
#ifdef HAVE_RB_INTERNAL_THREAD_SPECIFIC_KEY_CREATE
    /* bound, so that its exit frees the entry (3.3+ finds entries by Ruby thread) */
    if (t && !self_thread && is_thread) po_thread_bind(thread, t);
#endif
    po_lock();
    if (!t || t->tid != id) { /* no room, or the thread exited meanwhile */
        po_labelset_unref(base);
        po_unlock();
        return Qfalse;
    }
    po_labelset_unref(t->base);
    t->base = base;
    po_fiber_labels *f = t->fiber;
    po_unlock();
    if (self_thread) {
        t->switching = 1;
        po_switch_labels(t, effective_on(t, f));
    } else {
        po_labelset *want = effective_on(t, f);
        po_lock();
        po_labelset_unref(t->labels);
        t->labels = want;
        t->last_agg = NULL;
        t->label_changes++;
        po_unlock();
    }
    return Qtrue;
}

void po_label_slots_init(VALUE mNative)
{
    id_fiber_labels = rb_intern("__pyroscope_otel_fiber_labels");
    cFiberLabels = rb_define_class_under(mNative, "FiberLabels", rb_cObject);
    rb_undef_alloc_func(cFiberLabels);
    rb_define_method(cFiberLabels, "to_h", fiber_labels_to_h, 0);

    VALUE tp = rb_tracepoint_new(0, RUBY_EVENT_FIBER_SWITCH, on_fiber_switch, NULL);
    rb_gc_register_mark_object(tp);
    rb_tracepoint_enable(tp);

    rb_define_singleton_method(mNative, "set_labels", native_set_labels, 1);
    rb_define_singleton_method(mNative, "labels", native_labels, 0);
    rb_define_singleton_method(mNative, "fiber_labels", native_fiber_labels, 0);
    rb_define_singleton_method(mNative, "set_fiber_labels", native_set_fiber_labels, 2);
    rb_define_singleton_method(mNative, "set_thread_labels", native_set_thread_labels, 2);
}
