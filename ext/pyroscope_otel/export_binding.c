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

static uint64_t export_gvl_ns, export_models;

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* opts: [sample_rate, app_root, stdlib_prefixes, tags] */
static po_model *build(VALUE window, VALUE opts)
{
    Check_Type(opts, T_ARRAY);
    if (RARRAY_LEN(opts) != 4) rb_raise(rb_eArgError, "export options must be [sample_rate, app_root, prefixes, tags]");
    uint64_t t0 = mono_ns();
    po_model *m = po_model_from_window(window, NUM2INT(RARRAY_AREF(opts, 0)), RARRAY_AREF(opts, 1),
                                       RARRAY_AREF(opts, 2), RARRAY_AREF(opts, 3));
    export_gvl_ns += mono_ns() - t0;
    export_models++;
    return m;
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
        uint8_t *packed = po_pprof_pack(e->m, i ? e->bounds[i - 1] : 0, e->bounds[i], &plen);
        e->bufs[i] = packed ? po_gzip(packed, plen, &e->lens[i]) : NULL;
        free(packed);
        if (!e->bufs[i]) e->failed = 1;
    }
    return NULL;
}

/* encode(window, opts) -> [gzipped pprof String, ...], split within the server's limits */
static VALUE native_encode(VALUE self, VALUE window, VALUE opts)
{
    (void)self;
    struct encoded e = { 0 };
    e.m = build(window, opts);
    if (!e.m) rb_raise(rb_eNoMemError, "pyroscope: out of memory building the profile");
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
    po_transport_configure(&c, list);
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
    SET("windows_dropped", ULL2NUM(s.windows_dropped));
    SET("samples_dropped", ULL2NUM(s.samples_dropped));
    SET("requests", ULL2NUM(s.requests));
    SET("retries", ULL2NUM(s.retries));
    SET("bytes_sent", ULL2NUM(s.bytes_sent));
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
    rb_define_singleton_method(mNative, "_encode", native_encode, 2);
    rb_define_singleton_method(mNative, "flush", native_flush, 1);
    rb_define_singleton_method(mNative, "upload_stats", native_upload_stats, 0);
    rb_define_singleton_method(mNative, "upload_events", native_upload_events, 0);
}
