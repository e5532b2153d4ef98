/*
 * label_slots.c — whose labels a thread's samples carry: per-fiber labels, span labels,
 * thread-wide labels, and the fiber switch. Binding: Native.set_labels, labels,
 * fiber_labels, change_fiber_tags, set_thread_labels, change_thread_tags, push_span,
 * pop_span.
 *
 * The OpenTelemetry context lives per Fiber, so the labels do too. A fiber that sets
 * labels gets a Pyroscope::Native::FiberLabels object, kept in its fiber-local storage
 * (Thread#[]), holding its tags (Pyroscope.tag_wrapper & co.), the label sets of its
 * active spans (a stack: the innermost one's labels are over the others), and what its
 * samples carry (`effective`: its thread's thread-wide `base`, then its tags, then its
 * innermost span's labels over them). A fiber that never set labels carries just its
 * thread's base, so a new fiber starts with no span, as its OTel context does.
 * A thread's slot (po_thread.labels, what the handler reads) is the effective set of the
 * fiber running on it; a RUBY_EVENT_FIBER_SWITCH hook (GVL, on the thread, after the
 * switch) puts the new fiber's labels in the slot, and po_switch_fiber charges the CPU
 * the old fiber used since the last sample to the old labels.
 *
 * Span labels are pushed by the span processor's on_start as a SpanLabels object and
 * popped by its on_finish, from whatever fiber or thread that runs on: popping changes the
 * starting fiber's object, and, when that fiber runs on another thread right now, that
 * thread's slot (without a stack to charge, like any change made from outside). Spans may
 * end in any order; an outer one ending first leaves the inner one's labels in place.
 * Thread-wide labels changed later reach a fiber's effective set when it next runs.
 * A fiber holds at most PO_MAX_SPANS active spans: pushing one more drops the outermost
 * (counted, po_spans_dropped), whose labels then never come back; memory stays bounded
 * when spans are started and never finished.
 *
 * A thread needs an entry in the thread table for a slot. When the table is full (4 096
 * live threads), labelling calls go on without one instead of raising into the
 * application: the fiber keeps its labels, the thread's samples do not exist (it is not
 * sampled either), the refusals are counted and warned about once.
 *
 * Contexts: everything here runs on the GVL. Ruby work (building sets, which may raise,
 * allocating objects) happens before po_lock is taken; the object of the fiber running on
 * a thread is marked through the thread table, so it cannot be freed while it is current.
 * Free functions run on the GVL during GC (no allocation) and take po_lock.
 */
#include "pyroscope_otel.h"

static ID id_fiber_labels;
static VALUE cFiberLabels, cSpanLabels;

static void fiber_labels_mark(void *p)
{
    rb_gc_mark(((po_fiber_labels *)p)->spans);
}

static void fiber_labels_free(void *p)
{
    po_fiber_labels *f = p;
    po_lock();
    if (f->on && f->on->fiber == f) po_thread_detach_fiber(f->on);
    po_labelset_unref(f->tags);
    po_labelset_unref(f->own);
    po_labelset_unref(f->effective);
    po_labelset_unref(f->merged_base);
    po_unlock();
    xfree(f);
}

static const rb_data_type_t fiber_labels_type = {
    .wrap_struct_name = "pyroscope_otel/fiber_labels",
    .function = { .dmark = fiber_labels_mark, .dfree = fiber_labels_free },
    .flags = RUBY_TYPED_FREE_IMMEDIATELY,
};

/* One active labelled span: its label set and the FiberLabels it was pushed on (nil once
 * popped). */
typedef struct span_labels {
    po_labelset *labels;
    VALUE fiber;
} span_labels;

static void span_labels_mark(void *p)
{
    rb_gc_mark(((span_labels *)p)->fiber);
}

static void span_labels_free(void *p)
{
    span_labels *s = p;
    po_lock();
    po_labelset_unref(s->labels);
    po_unlock();
    xfree(s);
}

static const rb_data_type_t span_labels_type = {
    .wrap_struct_name = "pyroscope_otel/span_labels",
    .function = { .dmark = span_labels_mark, .dfree = span_labels_free },
    .flags = RUBY_TYPED_FREE_IMMEDIATELY,
};

/* the calling fiber's object, created when `create`; Qnil when it has none */
static VALUE current_object(int create)
{
    VALUE obj = rb_thread_local_aref(rb_thread_current(), id_fiber_labels);
    if (rb_typeddata_is_kind_of(obj, &fiber_labels_type)) return obj;
    if (!create) return Qnil;
    po_fiber_labels *f;
    obj = TypedData_Make_Struct(cFiberLabels, po_fiber_labels, &fiber_labels_type, f);
    f->spans = rb_ary_new();
    rb_thread_local_aset(rb_thread_current(), id_fiber_labels, obj);
    return obj;
}

static po_fiber_labels *fiber_labels_of(VALUE obj)
{
    return rb_check_typeddata(obj, &fiber_labels_type);
}

static VALUE warn_table_full(VALUE unused)
{
    (void)unused;
    rb_warn("pyroscope: %d threads are known to the profiler, the most it holds: threads beyond them are "
            "neither labelled nor sampled (counted in Pyroscope::Native.stats[:threads_refused])",
            PO_MAX_THREADS);
    return Qnil;
}

/* Labelling is the application's call path (a request's tag_wrapper), so a full thread
 * table never raises: the threads beyond it go unlabelled, counted in stats
 * (po_threads_refused), with one warning per process. */
static void warn_once_table_full(void)
{
    static int warned;
    if (warned) return;
    warned = 1;
    int state;
    rb_protect(warn_table_full, Qnil, &state); /* a Warning.warn that raises stays out of the app too */
    if (state) rb_set_errinfo(Qnil);
}

/* The calling thread's entry, claimed if need be; NULL when the table is full of live
 * threads (its fibers then keep their labels, unused). */
static po_thread *current_entry(void)
{
    po_thread *t = po_thread_current(1);
    if (!t) warn_once_table_full();
    return t;
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
    f->last = PO_NO_SAMPLE;
}

/* base with over over it, a new reference; when memory is short, over alone (never raises) */
static po_labelset *merged(po_labelset *base, po_labelset *over)
{
    po_labelset *m = po_labelset_merge(base, over);
    if (!m && over) {
        po_lock();
        po_labelset_ref(over);
        po_unlock();
        m = over;
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

/* f's tags or spans changed: its own and effective sets follow, and so does the slot of
 * the thread running it. The calling fiber's change charges its thread's CPU since the
 * last sample to the old labels (t->switching was set by the caller); a change to a fiber
 * running elsewhere swaps that thread's slot; one not running waits for it to run. */
static void refresh(VALUE obj)
{
    po_fiber_labels *f = fiber_labels_of(obj);
    long n = RARRAY_LEN(f->spans);
    po_labelset *top = n ? ((span_labels *)DATA_PTR(RARRAY_AREF(f->spans, n - 1)))->labels : NULL;
    po_labelset *own = merged(f->tags, top);
    if (current_object(0) == obj) {
        po_thread *t = current_entry();
        if (!t) { /* no room in the thread table: the fiber keeps them, its thread has no slot */
            po_lock();
            store_locked(f, own, NULL, NULL);
            f->stale = 1;
            po_unlock();
            return;
        }
        po_lock();
        po_labelset *base = t->base;
        po_labelset_ref(base);
        po_unlock();
        po_labelset *m = merged(base, own);
        po_lock();
        store_locked(f, own, m, base);
        po_labelset_unref(base);
        if (t->fiber != f) {
            po_thread_detach_fiber(t);
            t->fiber = f;
            t->fiber_obj = obj;
            f->on = t;
        }
        po_labelset_ref(m);
        po_unlock();
        po_switch_labels(t, m);
        return;
    }
    po_lock();
    po_thread *on = f->on;
    po_labelset *base = on ? on->base : NULL;
    po_labelset_ref(base);
    po_unlock();
    po_labelset *m = on ? merged(base, own) : NULL;
    po_lock();
    if (on && f->on == on) {
        store_locked(f, own, m, base);
        po_labelset_ref(m);
        po_put_labels_locked(on, m);
    } else { /* not running (or its thread exited meanwhile: exit hooks run without the GVL) */
        store_locked(f, own, NULL, NULL);
        f->stale = 1;
        po_labelset_unref(m);
    }
    po_labelset_unref(base);
    po_unlock();
}

/* Marks the calling thread as changing its labels, when obj is the calling fiber's: a
 * timer sample meanwhile is deferred to the change's own charge. */
static po_thread *begin_change(VALUE obj)
{
    if (current_object(0) != obj) return NULL;
    po_thread *t = current_entry();
    if (t) t->switching = 1;
    return t;
}

struct tags_arg {
    VALUE obj, labels;
    int apply;       /* labels are changes to the fiber's tags, not all of them */
    VALUE previous;  /* when applied: the changed keys' previous values */
    po_labelset *base;
};

static VALUE apply_changes(VALUE p)
{
    struct tags_arg *a = (struct tags_arg *)p;
    return (VALUE)po_labelset_apply(a->base, a->labels, &a->previous);
}

static VALUE drop_base(VALUE p)
{
    struct tags_arg *a = (struct tags_arg *)p;
    po_lock();
    po_labelset_unref(a->base);
    po_unlock();
    return Qnil;
}

/* the set in *slot (a fiber's tags, a thread's thread-wide labels) with the changes
 * applied; that set is held meanwhile: a tag's to_s may run Ruby code, and so let another
 * thread change it */
static po_labelset *applied(struct tags_arg *a, po_labelset *const *slot)
{
    po_lock();
    a->base = *slot;
    po_labelset_ref(a->base);
    po_unlock();
    return (po_labelset *)rb_ensure(apply_changes, (VALUE)a, drop_base, (VALUE)a);
}

static VALUE set_tags(VALUE p)
{
    struct tags_arg *a = (struct tags_arg *)p;
    po_fiber_labels *f = fiber_labels_of(a->obj);
    po_labelset *tags = a->apply ? applied(a, &f->tags) : po_labelset_from_hash(a->labels);
    po_lock();
    po_labelset_unref(f->tags);
    f->tags = tags;
    po_unlock();
    refresh(a->obj);
    return Qnil;
}

static VALUE end_change(VALUE t)
{
    if (t) ((po_thread *)t)->switching = 0;
    return Qnil;
}

/* the previous values of the keys changed when apply, else nil */
static VALUE change_tags(VALUE obj, VALUE labels, int apply)
{
    fiber_labels_of(obj);
    struct tags_arg a = { obj, labels, apply, Qnil, NULL };
    rb_ensure(set_tags, (VALUE)&a, end_change, (VALUE)begin_change(obj));
    return a.previous;
}

/* set_labels(hash_or_nil): the calling fiber's tags. */
static VALUE native_set_labels(VALUE self, VALUE labels)
{
    (void)self;
    current_entry();
    change_tags(current_object(1), labels, 0);
    return Qnil;
}

/* fiber_labels: the calling fiber's FiberLabels, to change them later from anywhere. */
static VALUE native_fiber_labels(VALUE self)
{
    (void)self;
    current_entry();
    return current_object(1);
}

/* change_fiber_tags(fiber_labels, tags): tags merged into that fiber's (a nil value
 * removes the key); returns the previous values of the keys changed (nil for absent),
 * which restore them when passed back. */
static VALUE native_change_fiber_tags(VALUE self, VALUE obj, VALUE tags)
{
    (void)self;
    return change_tags(obj, tags, 1);
}

struct push_arg {
    VALUE obj, *kv;
    long n;
};

uint64_t po_spans_dropped;

static VALUE push(VALUE p)
{
    struct push_arg *a = (struct push_arg *)p;
    span_labels *s;
    VALUE token = TypedData_Make_Struct(cSpanLabels, span_labels, &span_labels_type, s);
    s->fiber = Qnil;
    s->labels = po_labelset_from_pairs(a->kv, a->n);
    s->fiber = a->obj;
    VALUE spans = fiber_labels_of(a->obj)->spans;
    rb_ary_push(spans, token);
    /* Spans that never finish (a lost on_finish) would pile up for the fiber's life, a
     * thread's root fiber living as long as the process: the outermost goes, its pop
     * becomes a no-op. Never the innermost, whose labels the fiber carries. */
    if (RARRAY_LEN(spans) > PO_MAX_SPANS) {
        span_labels *oldest = DATA_PTR(rb_ary_shift(spans));
        oldest->fiber = Qnil;
        po_spans_dropped++;
    }
    refresh(a->obj);
    return token;
}

/* push_span(key, value, ...): labels (up to 3 pairs with distinct keys) over the calling
 * fiber's until pop_span(the returned SpanLabels). */
static VALUE native_push_span(int argc, VALUE *argv, VALUE self)
{
    (void)self;
    if (argc < 2 || argc > 6 || argc % 2) rb_raise(rb_eArgError, "push_span takes 1 to 3 key, value pairs, got %d arguments", argc);
    VALUE kv[6];
    for (int i = 0; i < argc; i += 2) {
        kv[i] = argv[i];
        kv[i + 1] = argv[i + 1];
        po_label_pair(&kv[i], &kv[i + 1]);
    }
    current_entry();
    VALUE obj = current_object(1);
    struct push_arg a = { obj, kv, argc / 2 };
    VALUE token = rb_ensure(push, (VALUE)&a, end_change, (VALUE)begin_change(obj));
    RB_GC_GUARD(kv[0]);
    return token;
}

static VALUE pop(VALUE token)
{
    span_labels *s = rb_check_typeddata(token, &span_labels_type);
    VALUE obj = s->fiber, spans = fiber_labels_of(obj)->spans;
    s->fiber = Qnil;
    long n = RARRAY_LEN(spans), i = n - 1;
    while (i >= 0 && RARRAY_AREF(spans, i) != token) i--;
    if (i < 0) return Qnil;
    rb_ary_delete_at(spans, i);
    if (i == n - 1) refresh(obj); /* an outer span ending first changes nothing */
    return Qnil;
}

/* pop_span(span_labels): the span ended, on any fiber or thread; a second pop is a no-op. */
static VALUE native_pop_span(VALUE self, VALUE token)
{
    (void)self;
    span_labels *s = rb_check_typeddata(token, &span_labels_type);
    if (NIL_P(s->fiber)) return Qnil;
    return rb_ensure(pop, token, end_change, (VALUE)begin_change(s->fiber));
}

static VALUE hash_of(po_labelset **slot)
{
    po_lock();
    po_labelset *ls = *slot;
    po_labelset_ref(ls);
    po_unlock();
    VALUE h = po_labelset_to_hash(ls);
    po_lock();
    po_labelset_unref(ls);
    po_unlock();
    return h;
}

/* labels: what the calling thread's samples carry now. */
static VALUE native_labels(VALUE self)
{
    (void)self;
    po_thread *t = po_thread_current(0);
    return t ? hash_of(&t->labels) : rb_hash_new();
}

/* The live Ruby thread whose native thread id is `tid`, or nil */
static VALUE thread_with_tid(VALUE tid)
{
    long v = NUM2LONG(tid);
    if (v <= 0 || v > INT32_MAX) rb_raise(rb_eArgError, "not a native thread id: %ld", v);
    ID id_native_thread_id = rb_intern("native_thread_id");
    VALUE list = rb_funcall(rb_cThread, rb_intern("list"), 0);
    for (long i = 0; i < RARRAY_LEN(list); i++) {
        VALUE thread = RARRAY_AREF(list, i);
        VALUE id = rb_funcall(thread, id_native_thread_id, 0);
        if (!NIL_P(id) && NUM2LONG(id) == v) return thread;
    }
    return Qnil;
}

/* A thread's thread-wide labels, under every one of its fibers' own (a Thread, or its
 * native thread id): `labels` replaces them, or, with `previous`, is merged into them as
 * change_fiber_tags merges a fiber's tags (*previous: the changed keys' previous values).
 * Another thread's stack is not ours to walk, so its CPU since its last sample goes to the
 * new labels. False when the thread has not started or has ended, or the thread table is
 * full. */
static VALUE label_thread(VALUE thread, VALUE labels, VALUE *previous)
{
    /* A native id stands for the Ruby thread running there: the entry is that thread's,
     * so its end releases it. (Claimed by tid alone, it was bound to no thread: nothing
     * released it, and a later thread given the same tid inherited its labels.) A tid no
     * Ruby thread runs on is never sampled: nothing to label. */
    if (!rb_obj_is_kind_of(thread, rb_cThread)) thread = thread_with_tid(thread);
    if (NIL_P(thread)) return Qfalse;
    int self_thread = thread == rb_thread_current();
    uint64_t refused = po_threads_refused;
    po_thread *t = self_thread ? current_entry() : po_thread_of_thread(thread, 1);
    if (!t && po_threads_refused != refused) warn_once_table_full();
    if (!t) return Qfalse;
    struct tags_arg a = { Qnil, labels, 1, Qnil, NULL };
    po_labelset *base = previous ? applied(&a, &t->base) : po_labelset_from_hash(labels);
    po_lock();
    if (!t->tid || t->owner != thread) { /* it exited meanwhile (exit hooks run without the GVL) */
        po_labelset_unref(base);
        po_unlock();
        return Qfalse;
    }
    if (previous) *previous = a.previous;
    po_labelset_unref(t->base);
    t->base = base;
    po_fiber_labels *f = t->fiber;
    po_unlock();
    if (self_thread) {
        t->switching = 1;
        po_switch_labels(t, effective_on(t, f));
        return Qtrue;
    }
    po_labelset *want = effective_on(t, f);
    po_lock();
    /* checked again in the same hold as the put: its exit hook (3.2+, without the GVL)
     * may have released the entry since; labels put on a released entry were never
     * unreferenced, and a reclaimed one, another thread's by then, would have got them */
    int still = t->tid && t->owner == thread;
    if (still) po_put_labels_locked(t, want);
    else po_labelset_unref(want);
    po_unlock();
    return still ? Qtrue : Qfalse;
}

/* set_thread_labels(thread, hash_or_nil): replaces a thread's thread-wide labels; true, or
 * false when it has no entry (label_thread). */
static VALUE native_set_thread_labels(VALUE self, VALUE thread, VALUE labels)
{
    (void)self;
    return label_thread(thread, labels, NULL);
}

/* change_thread_tags(thread, tags): tags merged into a thread's thread-wide labels (a nil
 * value removes the key); the previous values of the keys changed, or nil when the thread
 * has no entry (label_thread). */
static VALUE native_change_thread_tags(VALUE self, VALUE thread, VALUE tags)
{
    (void)self;
    VALUE previous = Qnil;
    return RTEST(label_thread(thread, tags, &previous)) ? previous : Qnil;
}

void po_label_slots_init(VALUE mNative)
{
    id_fiber_labels = rb_intern("__pyroscope_otel_fiber_labels");
    cFiberLabels = rb_define_class_under(mNative, "FiberLabels", rb_cObject);
    rb_undef_alloc_func(cFiberLabels);
    cSpanLabels = rb_define_class_under(mNative, "SpanLabels", rb_cObject);
    rb_undef_alloc_func(cSpanLabels);

    VALUE tp = rb_tracepoint_new(0, RUBY_EVENT_FIBER_SWITCH, on_fiber_switch, NULL);
    rb_gc_register_mark_object(tp);
    rb_tracepoint_enable(tp);

    rb_define_singleton_method(mNative, "set_labels", native_set_labels, 1);
    rb_define_singleton_method(mNative, "labels", native_labels, 0);
    rb_define_singleton_method(mNative, "fiber_labels", native_fiber_labels, 0);
    rb_define_singleton_method(mNative, "change_fiber_tags", native_change_fiber_tags, 2);
    rb_define_singleton_method(mNative, "set_thread_labels", native_set_thread_labels, 2);
    rb_define_singleton_method(mNative, "change_thread_tags", native_change_thread_tags, 2);
    rb_define_singleton_method(mNative, "push_span", native_push_span, -1);
    rb_define_singleton_method(mNative, "pop_span", native_pop_span, 1);
}
