/*
 * export_binding.c — Pyroscope::Native's export calls (GVL): configure the uploader,
 * enqueue a taken window, encode one to pprof bytes (for files and tests), flush, and
 * read the uploader's counters and events.
 *
 * Arguments are checked and the export model built (the GVL part, measured and counted
 * as export_gvl_ns) before anything is handed to the uploader; encoding inside `encode`
 * runs with the GVL released.
 */
#include "pyroscope_otel.h"
#include "export_model.h"
#include "transport.h"
#include <curl/curl.h>
#include <ruby/thread.h>
#include <stdlib.h>
#include <string.h>

po_model *po_model_from_window(VALUE window, int sample_rate, VALUE app_root, VALUE prefixes, VALUE tags);
po_model *po_model_from_agg(const po_agg *a, uint64_t started, uint64_t ended, int sample_rate, VALUE app_root,
                            VALUE prefixes, VALUE tags);

/* A taken window's export model, owned by this object until _enqueue_model takes it. */
typedef struct taken {
    po_model *m;
    uint64_t started, ended;
    uint32_t samples;
} taken;

static void taken_free(void *p)
{
    taken *t = p;
    if (t->m) { po_model_free(t->m); free(t->m); }
    xfree(t);
}

static const rb_data_type_t taken_type = {
    .wrap_struct_name = "pyroscope_otel/taken_window",
    .function = { .dfree = taken_free },
    .flags = RUBY_TYPED_FREE_IMMEDIATELY,
};

static uint64_t export_gvl_ns, export_models;
static VALUE cTaken;

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void check_opts(VALUE opts)
{
    Check_Type(opts, T_ARRAY);
    if (RARRAY_LEN(opts) != 4) rb_raise(rb_eArgError, "export options must be [sample_rate, app_root, prefixes, tags]");
}

/* opts: [sample_rate, app_root, stdlib_prefixes, tags] */
static po_model *build(VALUE window, VALUE opts)
{
    check_opts(opts);
    uint64_t t0 = mono_ns();
    po_model *m = po_model_from_window(window, NUM2INT(RARRAY_AREF(opts, 0)), RARRAY_AREF(opts, 1),
                                       RARRAY_AREF(opts, 2), RARRAY_AREF(opts, 3));
    export_gvl_ns += mono_ns() - t0;
    export_models++;
    return m;
}

struct take_args { po_agg *a; uint64_t started, ended; VALUE opts; po_model *m; };

static VALUE take_build(VALUE arg)
{
    struct take_args *t = (struct take_args *)arg;
    VALUE o = t->opts;
    t->m = po_model_from_agg(t->a, t->started, t->ended, NUM2INT(RARRAY_AREF(o, 0)), RARRAY_AREF(o, 1),
                             RARRAY_AREF(o, 2), RARRAY_AREF(o, 3));
    return Qnil;
}

static VALUE take_end(VALUE arg)
{
    po_window_end(((struct take_args *)arg)->a);
    return Qnil;
}

/* _take_model(opts) -> a TakenWindow (started_at_ns, ended_at_ns, samples), or nil when
 * there is nothing to send: the window goes straight from the sampler's buffer into an
 * export model, without Ruby objects per sample. */
static VALUE native_take_model(VALUE self, VALUE opts)
{
    (void)self;
    check_opts(opts);
    uint64_t t0 = mono_ns();
    struct take_args t = { .opts = opts };
    t.a = po_window_begin(&t.started, &t.ended);
    if (!t.a) return Qnil;
    uint32_t samples = t.a->samples_used;
    rb_ensure(take_build, (VALUE)&t, take_end, (VALUE)&t);
    export_gvl_ns += mono_ns() - t0;
    export_models++;
    if (!t.m) return Qnil; /* out of memory: counted by the model as dropped */
    if (t.m->n_smp == 0) { po_model_free(t.m); free(t.m); return Qnil; }
    taken *tk;
    VALUE obj = TypedData_Make_Struct(cTaken, taken, &taken_type, tk);
    tk->m = t.m;
    tk->started = t.started;
    tk->ended = t.ended;
    tk->samples = samples;
    return obj;
}

static VALUE taken_started(VALUE self) { return ULL2NUM(((taken *)rb_check_typeddata(self, &taken_type))->started); }
static VALUE taken_ended(VALUE self) { return ULL2NUM(((taken *)rb_check_typeddata(self, &taken_type))->ended); }
static VALUE taken_samples(VALUE self) { return UINT2NUM(((taken *)rb_check_typeddata(self, &taken_type))->samples); }

/* _enqueue_model(taken_window, url, log_url): hands its model to the uploader (once). */
static VALUE native_enqueue_model(VALUE self, VALUE obj, VALUE url, VALUE log_url)
{
    (void)self;
    taken *tk = rb_check_typeddata(obj, &taken_type);
    StringValueCStr(url);
    StringValueCStr(log_url);
    if (!tk->m) rb_raise(rb_eArgError, "this window was enqueued already");
    po_model *m = tk->m;
    tk->m = NULL;
    return po_transport_enqueue(m, RSTRING_PTR(url), RSTRING_PTR(log_url)) == 0 ? Qtrue : Qfalse;
}

static VALUE native_enqueue(VALUE self, VALUE window, VALUE opts, VALUE url, VALUE log_url)
{
    (void)self;
    StringValueCStr(url);
    StringValueCStr(log_url);
    po_model *m = build(window, opts);
    if (!m) return Qfalse;
    if (po_transport_enqueue(m, RSTRING_PTR(url), RSTRING_PTR(log_url)) != 0) return Qfalse;
    return Qtrue;
}

struct encoded { po_model *m; uint32_t *bounds; uint32_t n; uint8_t **bufs; size_t *lens; int failed; };

static void *encode_nogvl(void *arg)
{
    struct encoded *e = arg;
    e->n = po_pprof_split(e->m, &e->bounds);
    if (!e->n) { e->failed = 1; return NULL; }
    e->bufs = calloc(e->n, sizeof(*e->bufs));
    e->lens = calloc(e->n, sizeof(*e->lens));
    if (!e->bufs || !e->lens) { e->failed = 1; return NULL; }
    for (uint32_t i = 0; i < e->n && !e->failed; i++) {
        size_t plen = 0;
        uint8_t *packed = po_pprof_pack(e->m, i ? e->bounds[i - 1] : 0, e->bounds[i], PO_TYPES_OF(e->m), &plen);
        e->bufs[i] = packed ? po_gzip(packed, plen, &e->lens[i]) : NULL;
        free(packed);
        if (!e->bufs[i]) e->failed = 1;
    }
    return NULL;
}

/* the model's pprof, gzipped and split within the server's limits; frees the model */
static VALUE encode_model(po_model *m)
{
    struct encoded e = { 0 };
    e.m = m;
    rb_thread_call_without_gvl(encode_nogvl, &e, RUBY_UBF_IO, NULL);
    VALUE out = rb_ary_new_capa(e.n);
    for (uint32_t i = 0; i < e.n && !e.failed; i++) rb_ary_push(out, rb_str_new((const char *)e.bufs[i], e.lens[i]));
    for (uint32_t i = 0; e.bufs && i < e.n; i++) free(e.bufs[i]);
    free(e.bufs); free(e.lens); free(e.bounds);
    po_model_free(e.m);
    free(e.m);
    if (e.failed) rb_raise(rb_eNoMemError, "pyroscope: out of memory encoding the profile");
    return out;
}

/* _encode_model(taken_window) -> [gzipped pprof String, ...] (once): what the uploader
 * would send, for files written by hand and the benchmarks. */
static VALUE native_encode_model(VALUE self, VALUE obj)
{
    (void)self;
    taken *tk = rb_check_typeddata(obj, &taken_type);
    if (!tk->m) rb_raise(rb_eArgError, "this window was enqueued already");
    po_model *m = tk->m;
    tk->m = NULL;
    return encode_model(m);
}

/* encode(window, opts) -> [gzipped pprof String, ...], for windows made as Ruby data */
static VALUE native_encode(VALUE self, VALUE window, VALUE opts)
{
    (void)self;
    po_model *m = build(window, opts);
    if (!m) rb_raise(rb_eNoMemError, "pyroscope: out of memory building the profile");
    return encode_model(m);
}

static long positive(VALUE v, const char *name)
{
    long n = NUM2LONG(v);
    if (n <= 0) rb_raise(rb_eArgError, "%s must be positive, got %ld", name, n);
    return n;
}

/* configure_transport(headers, connect_timeout_ms, timeout_ms, max_windows, max_bytes,
 *                     max_attempts, user_agent, ca_file_or_nil, local_max_bytes) */
static VALUE native_configure_transport(int argc, VALUE *argv, VALUE self)
{
    VALUE hdrs, cto, to, mw, mb, ma, ua, ca, lmb;
    rb_scan_args(argc, argv, "9", &hdrs, &cto, &to, &mw, &mb, &ma, &ua, &ca, &lmb);
    (void)self;
    Check_Type(hdrs, T_ARRAY);
    po_transport_config c;
    memset(&c, 0, sizeof(c));
    c.connect_timeout_ms = positive(cto, "connect_timeout");
    c.timeout_ms = positive(to, "timeout");
    c.max_windows = (size_t)positive(mw, "queue_max_windows");
    c.max_bytes = (size_t)positive(mb, "queue_max_bytes");
    c.max_attempts = (int)positive(ma, "max_attempts");
    c.local_max_bytes = (size_t)positive(lmb, "local_max_bytes");
    snprintf(c.user_agent, sizeof(c.user_agent), "%s", StringValueCStr(ua));
    if (!NIL_P(ca)) snprintf(c.ca_file, sizeof(c.ca_file), "%s", StringValueCStr(ca));
    struct curl_slist *list = NULL;
    for (long i = 0; i < RARRAY_LEN(hdrs); i++) {
        VALUE h = RARRAY_AREF(hdrs, i);
        struct curl_slist *n = curl_slist_append(list, StringValueCStr(h));
        if (!n) { curl_slist_free_all(list); rb_raise(rb_eNoMemError, "pyroscope: out of memory"); }
        list = n;
    }
    if (po_transport_configure(&c, list) != 0) rb_raise(rb_eNoMemError, "pyroscope: out of memory");
    return Qnil;
}

static VALUE native_flush(VALUE self, VALUE timeout)
{
    (void)self;
    double t = NUM2DBL(timeout);
    if (t < 0) rb_raise(rb_eArgError, "timeout must be >= 0, got %f", t);
    return po_transport_flush(t) ? Qtrue : Qfalse;
}

static VALUE native_upload_stats(VALUE self)
{
    (void)self;
    po_transport_stats s;
    char err[256];
    po_transport_stats_read(&s, err, sizeof(err));
    VALUE h = rb_hash_new();
#define SET(k, v) rb_hash_aset(h, ID2SYM(rb_intern(k)), v)
    SET("windows_sent", ULL2NUM(s.windows_sent));
    SET("windows_failed", ULL2NUM(s.windows_failed));
    SET("windows_dropped", ULL2NUM(s.windows_dropped));
    SET("samples_dropped", ULL2NUM(s.samples_dropped));
    SET("requests", ULL2NUM(s.requests));
    SET("retries", ULL2NUM(s.retries));
    SET("bytes_sent", ULL2NUM(s.bytes_sent));
    SET("cpu_ns", ULL2NUM(s.cpu_ns));
    SET("queued_windows", SIZET2NUM(s.queued_windows));
    SET("queued_bytes", SIZET2NUM(s.queued_bytes));
    SET("last_error", err[0] ? rb_str_new_cstr(err) : Qnil);
    SET("export_gvl_ns", ULL2NUM(export_gvl_ns));
    SET("export_models", ULL2NUM(export_models));
#undef SET
    return h;
}

/* [[level, message], ...]: level 1 info, 2 warn, 3 error */
static VALUE native_upload_events(VALUE self)
{
    (void)self;
    VALUE out = rb_ary_new();
    int level;
    char msg[320];
    while (po_transport_next_event(&level, msg, sizeof(msg)))
        rb_ary_push(out, rb_ary_new_from_args(2, INT2NUM(level), rb_str_new_cstr(msg)));
    return out;
}

void po_export_binding_init(VALUE mNative)
{
    po_transport_init();
    rb_define_singleton_method(mNative, "_configure_transport", native_configure_transport, -1);
    rb_define_singleton_method(mNative, "_enqueue", native_enqueue, 4);
    rb_define_singleton_method(mNative, "_take_model", native_take_model, 1);
    rb_define_singleton_method(mNative, "_enqueue_model", native_enqueue_model, 3);
    rb_define_singleton_method(mNative, "_encode_model", native_encode_model, 1);
    cTaken = rb_define_class_under(mNative, "TakenWindow", rb_cObject);
    rb_undef_alloc_func(cTaken);
    rb_define_method(cTaken, "started_at_ns", taken_started, 0);
    rb_define_method(cTaken, "ended_at_ns", taken_ended, 0);
    rb_define_method(cTaken, "samples", taken_samples, 0);
    rb_define_singleton_method(mNative, "_encode", native_encode, 2);
    rb_define_singleton_method(mNative, "flush", native_flush, 1);
    rb_define_singleton_method(mNative, "upload_stats", native_upload_stats, 0);
    rb_define_singleton_method(mNative, "upload_events", native_upload_events, 0);
}
