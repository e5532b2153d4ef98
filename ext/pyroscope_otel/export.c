/*
 * export.c — a window into an export model (GVL), from either of its two forms:
 *   - po_model_from_agg: straight from the sampler's aggregation buffer (what the
 *     exporter uses): Ruby is asked only for each distinct frame's name and file, label
 *     sets are read as C strings, so a window of N distinct (stack, span) pairs creates no
 *     per-sample Ruby object (measured: the Ruby window of 40 000 span ids held ~20 MB of
 *     heap at its peak);
 *   - po_model_from_window: from a taken window as Ruby data (window.c), for tests and
 *     tools that make windows by hand.
 *
 * This is the only export step that holds the GVL. Work is per distinct thing, not per
 * sample (st_tables keyed by frame, file String, stack and label set). Encoding, gzip and
 * sending happen later without the GVL (pprof.c, transport.c).
 *
 * What it applies, from SPEC §2.1: file names shortened (the app root stripped, "gems/..."
 * kept, Ruby's library prefixes stripped); label names sanitized to [A-Za-z0-9_.] (other
 * bytes become "_", empty names dropped, the first of duplicate names kept, sample labels
 * before global tags) and cut at 1 024 bytes, values cut at 2 048 (at a UTF-8 boundary);
 * stacks deeper than 1 000 frames cut to 999 and a "(truncated)" frame.
 * With profile type :wall (the sampler's, or a Ruby window whose samples carry wall ns as
 * a fifth element) the model carries both values and a sample is left out only when both
 * are 0.
 * What a full buffer dropped is one more sample: a "(dropped)" frame with the dropped CPU
 * and only the global tags (the dropped samples' own labels are not known), so that a
 * profile's total is the window's. A Ruby window has that sample already (window.c).
 * Raises only before the model exists (bad options); a model that ran out of memory is
 * freed and NULL returned.
 */
#include "pyroscope_otel.h"
#include "export_model.h"
#include <ruby/st.h>
#include <stdlib.h>
#include <string.h>

struct build {
    po_model *m;
    st_table *frames; /* frame VALUE -> function id (from_agg) */
    st_table *strs;   /* String VALUE -> string id */
    st_table *files;  /* file String VALUE -> string id (shortened) */
    st_table *stacks; /* stack Array VALUE -> the model's stack */
    st_table *labels; /* labels Hash VALUE -> index into spans */
    uint32_t (*spans)[2]; /* (offset, count) into ids: label pairs */
    uint32_t n_spans, cap_spans;
    uint32_t *ids;
    uint32_t n_ids, cap_ids;
    VALUE app_root, prefixes, tags;
    uint32_t truncated_loc;
};

static int reserve(void **p, uint32_t *cap, uint32_t need, size_t elem)
{
    if (need <= *cap && *p) return 0; /* allocated even for nothing: spans of no labels point into it */
    uint32_t c = *cap ? *cap : 256;
    while (c < need) c *= 2;
    void *q = realloc(*p, (size_t)c * elem);
    if (!q) return -1;
    *p = q;
    *cap = c;
    return 0;
}

static uint32_t string_id(struct build *b, VALUE s)
{
    st_data_t id;
    if (st_lookup(b->strs, (st_data_t)s, &id)) return (uint32_t)id;
    uint32_t i = po_model_string(b->m, RSTRING_PTR(s), RSTRING_LEN(s));
    st_insert(b->strs, (st_data_t)s, i);
    return i;
}

static int starts_with_dir(const char *p, long n, VALUE dir)
{
    long d = RSTRING_LEN(dir);
    return d > 0 && n > d && memcmp(p, RSTRING_PTR(dir), d) == 0 && p[d] == '/';
}

static uint32_t file_id(struct build *b, VALUE file)
{
    st_data_t id;
    if (st_lookup(b->files, (st_data_t)file, &id)) return (uint32_t)id;
    const char *p = RSTRING_PTR(file);
    long n = RSTRING_LEN(file), cut = 0;
    if (starts_with_dir(p, n, b->app_root)) {
        cut = RSTRING_LEN(b->app_root) + 1;
    } else {
        for (long i = n - 6; i >= 0; i--) /* the last "/gems/": gems/<name>-<version>/... */
            if (memcmp(p + i, "/gems/", 6) == 0) { cut = i + 1; break; }
        for (long i = 0; !cut && i < RARRAY_LEN(b->prefixes); i++) {
            VALUE pre = RARRAY_AREF(b->prefixes, i);
            if (starts_with_dir(p, n, pre)) cut = RSTRING_LEN(pre) + 1;
        }
    }
    uint32_t i = po_model_string(b->m, p + cut, n - cut);
    st_insert(b->files, (st_data_t)file, i);
    return i;
}

static uint32_t push_span(struct build *b, const uint32_t *ids, uint32_t n)
{
    if (reserve((void **)&b->ids, &b->cap_ids, b->n_ids + n, sizeof(uint32_t)) ||
        reserve((void **)&b->spans, &b->cap_spans, b->n_spans + 1, sizeof(*b->spans))) {
        b->m->oom = 1;
        return UINT32_MAX;
    }
    memcpy(b->ids + b->n_ids, ids, n * sizeof(uint32_t));
    b->spans[b->n_spans][0] = b->n_ids;
    b->spans[b->n_spans][1] = n;
    b->n_ids += n;
    return b->n_spans++;
}

static uint32_t model_stack(struct build *b, VALUE frames)
{
    st_data_t idx;
    if (st_lookup(b->stacks, (st_data_t)frames, &idx)) return (uint32_t)idx;
    Check_Type(frames, T_ARRAY);
    long n = RARRAY_LEN(frames), keep = n > PO_SERVER_MAX_DEPTH ? PO_SERVER_MAX_DEPTH - 1 : n;
    uint32_t locs[PO_SERVER_MAX_DEPTH];
    for (long i = 0; i < keep; i++) {
        VALUE f = RARRAY_AREF(frames, i);
        Check_Type(f, T_ARRAY);
        uint32_t fn = po_model_function(b->m, string_id(b, RARRAY_AREF(f, 0)), file_id(b, RARRAY_AREF(f, 1)));
        locs[i] = po_model_location(b->m, fn, NUM2INT(RARRAY_AREF(f, 2)));
    }
    if (keep < n) locs[keep++] = b->truncated_loc;
    uint32_t stack = po_model_stack(b->m, locs, (uint32_t)keep);
    st_insert(b->stacks, (st_data_t)frames, stack);
    return stack;
}

/* Server label names: [A-Za-z0-9_.]; other bytes become "_". */
static VALUE label_name(VALUE key)
{
    VALUE k = rb_str_dup(rb_obj_as_string(key));
    rb_str_set_len(k, po_utf8_prefix(RSTRING_PTR(k), RSTRING_LEN(k), PO_MAX_KEY_BYTES));
    char *p = RSTRING_PTR(k);
    for (long i = 0; i < RSTRING_LEN(k); i++) {
        char c = p[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.'))
            p[i] = '_';
    }
    return k;
}

struct label_acc { struct build *b; VALUE seen; uint32_t *pairs; uint32_t n, cap; };

static int add_label(VALUE k, VALUE v, VALUE arg)
{
    struct label_acc *a = (struct label_acc *)arg;
    if (NIL_P(v) || a->n >= a->cap) return ST_CONTINUE;
    VALUE name = label_name(k);
    if (RSTRING_LEN(name) == 0 || RTEST(rb_hash_lookup2(a->seen, name, Qfalse))) return ST_CONTINUE;
    rb_hash_aset(a->seen, name, Qtrue);
    a->pairs[2 * a->n] = po_model_string(a->b->m, RSTRING_PTR(name), RSTRING_LEN(name));
    VALUE vs = rb_obj_as_string(v);
    /* the server's value limit; the sampler's label sets are cut already, global tags not */
    a->pairs[2 * a->n + 1] = po_model_string(a->b->m, RSTRING_PTR(vs), po_utf8_prefix(RSTRING_PTR(vs), RSTRING_LEN(vs), PO_MAX_VALUE_BYTES));
    a->n++;
    return ST_CONTINUE;
}

static uint32_t label_span(struct build *b, VALUE labels)
{
    st_data_t idx;
    if (st_lookup(b->labels, (st_data_t)labels, &idx)) return (uint32_t)idx;
    Check_Type(labels, T_HASH);
    uint32_t pairs[2 * PO_MAX_LABELS];
    struct label_acc a = { b, rb_hash_new(), pairs, 0, PO_MAX_LABELS };
    rb_hash_foreach(labels, add_label, (VALUE)&a);
    if (!NIL_P(b->tags)) rb_hash_foreach(b->tags, add_label, (VALUE)&a);
    uint32_t span = push_span(b, pairs, 2 * a.n);
    st_insert(b->labels, (st_data_t)labels, span);
    return span;
}

struct build_args { struct build *b; VALUE window; };

static VALUE build_samples(VALUE arg)
{
    struct build *b = ((struct build_args *)arg)->b;
    VALUE samples = rb_hash_fetch(((struct build_args *)arg)->window, ID2SYM(rb_intern("samples")));
    Check_Type(samples, T_ARRAY);
    for (long i = 0; i < RARRAY_LEN(samples) && !b->m->oom; i++) {
        VALUE s = RARRAY_AREF(samples, i);
        Check_Type(s, T_ARRAY);
        int64_t cpu = NUM2LL(RARRAY_AREF(s, 2));
        int64_t wall = RARRAY_LEN(s) > 4 ? NUM2LL(RARRAY_AREF(s, 4)) : 0; /* [.., count, wall_ns] */
        if (cpu < 0) cpu = 0;
        if (wall < 0) wall = 0;
        if (cpu == 0 && wall == 0) continue;
        uint32_t st = model_stack(b, RARRAY_AREF(s, 0)), lt = label_span(b, RARRAY_AREF(s, 1));
        if (st == UINT32_MAX || lt == UINT32_MAX) break;
        po_model_sample(b->m, st, b->ids + b->spans[lt][0], b->spans[lt][1] / 2, cpu, wall);
    }
    return Qnil;
}

static VALUE build_cleanup(VALUE arg)
{
    struct build *b = ((struct build_args *)arg)->b;
    if (b->frames) st_free_table(b->frames);
    st_free_table(b->strs); st_free_table(b->files); st_free_table(b->stacks); st_free_table(b->labels);
    free(b->spans); free(b->ids);
    return Qnil;
}

static po_model *new_model(uint64_t started, uint64_t ended, int sample_rate)
{
    po_model *m = malloc(sizeof(*m));
    if (!m) rb_raise(rb_eNoMemError, "pyroscope: cannot allocate an export model");
    po_model_init(m);
    m->time_nanos = (int64_t)started;
    m->duration_nanos = ended > started ? (int64_t)(ended - started) : 0;
    m->period = 1000000000LL / (sample_rate > 0 ? sample_rate : 100);
    return m;
}

static void check_opts(VALUE app_root, VALUE prefixes, VALUE tags)
{
    Check_Type(app_root, T_STRING);
    Check_Type(prefixes, T_ARRAY);
    if (!NIL_P(tags)) Check_Type(tags, T_HASH);
}

/* ---- from the aggregation buffer ---- */

struct agg_build {
    struct build *b;
    const po_agg *a;
    uint32_t *stack_of; /* per stack number: the model's stack */
    uint32_t tag_pairs[2 * PO_MAX_LABELS];
    uint32_t n_tags;
};

static uint32_t frame_function(struct build *b, VALUE frame, int line)
{
    if (frame == PO_FRAME_SYNTHETIC) {
        VALUE name = po_frame_name(frame, line);
        return po_model_function(b->m, po_model_string(b->m, RSTRING_PTR(name), RSTRING_LEN(name)), 0);
    }
    st_data_t fn;
    if (st_lookup(b->frames, (st_data_t)frame, &fn)) return (uint32_t)fn;
    VALUE name = po_frame_name(frame, line), file = rb_profile_frame_path(frame);
    uint32_t id = po_model_function(b->m, po_model_string(b->m, RSTRING_PTR(name), RSTRING_LEN(name)),
                                    NIL_P(file) ? 0 : file_id(b, file));
    st_insert(b->frames, (st_data_t)frame, id);
    return id;
}

/* a label set's (name, value) ids: names sanitized as label_name does, the first of equal
 * names kept, then the global tags whose names are not taken; at most PO_MAX_LABELS */
static uint32_t labelset_span(struct agg_build *ab, const po_labelset *ls)
{
    struct build *b = ab->b;
    st_data_t idx;
    if (st_lookup(b->labels, (st_data_t)ls, &idx)) return (uint32_t)idx;
    uint32_t pairs[2 * PO_MAX_LABELS], n = 0;
    char name[PO_MAX_KEY_BYTES];
    for (uint32_t i = 0; ls && i < ls->count && n < PO_MAX_LABELS; i++) {
        const po_label *l = &ls->pairs[i];
        uint32_t len = l->key_len > PO_MAX_KEY_BYTES ? PO_MAX_KEY_BYTES : l->key_len;
        for (uint32_t k = 0; k < len; k++) {
            char c = l->key[k];
            name[k] = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' ? c : '_';
        }
        uint32_t key = po_model_string(b->m, name, len), dup = 0;
        for (uint32_t k = 0; k < n && !dup; k++) dup = pairs[2 * k] == key;
        if (dup) continue;
        pairs[2 * n] = key;
        pairs[2 * n + 1] = po_model_string(b->m, l->value, l->value_len);
        n++;
    }
    for (uint32_t t = 0; t < ab->n_tags && n < PO_MAX_LABELS; t++) {
        uint32_t dup = 0;
        for (uint32_t k = 0; k < n && !dup; k++) dup = pairs[2 * k] == ab->tag_pairs[2 * t];
        if (dup) continue;
        pairs[2 * n] = ab->tag_pairs[2 * t];
        pairs[2 * n + 1] = ab->tag_pairs[2 * t + 1];
        n++;
    }
    uint32_t span = push_span(b, pairs, 2 * n);
    st_insert(b->labels, (st_data_t)ls, span);
    return span;
}

static VALUE build_from_agg(VALUE arg)
{
    struct agg_build *ab = (struct agg_build *)arg;
    struct build *b = ab->b;
    const po_agg *a = ab->a;
    if (!NIL_P(b->tags)) {
        struct label_acc acc = { b, rb_hash_new(), ab->tag_pairs, 0, PO_MAX_LABELS };
        rb_hash_foreach(b->tags, add_label, (VALUE)&acc);
        ab->n_tags = acc.n;
    }
    VALUE frames[PO_SERVER_MAX_DEPTH];
    int lines[PO_SERVER_MAX_DEPTH];
    uint32_t locs[PO_SERVER_MAX_DEPTH], total = 0;
    for (uint32_t i = 0; i < a->stacks_used; i++) {
        uint32_t depth = po_agg_stack(a, i, frames, lines, 0);
        total += depth > PO_SERVER_MAX_DEPTH ? PO_SERVER_MAX_DEPTH : depth;
    }
    if (po_model_reserve_stacks(b->m, a->stacks_used + 1, total + 1)) return Qnil; /* and "(dropped)" */
    for (uint32_t i = 0; i < a->stacks_used && !b->m->oom; i++) {
        uint32_t depth = po_agg_stack(a, i, frames, lines, PO_SERVER_MAX_DEPTH);
        uint32_t keep = depth > PO_SERVER_MAX_DEPTH ? PO_SERVER_MAX_DEPTH - 1 : depth;
        for (uint32_t j = 0; j < keep; j++)
            locs[j] = po_model_location(b->m, frame_function(b, frames[j], lines[j]), lines[j] < 0 ? 0 : lines[j]);
        if (keep < depth) locs[keep++] = b->truncated_loc;
        ab->stack_of[i] = po_model_stack(b->m, locs, keep);
    }
    for (uint32_t i = 0; i < a->samples_used && !b->m->oom; i++) {
        const po_sample *s = &a->samples[i];
        if (s->cpu_ns == 0 && s->wall_ns == 0) continue;
        uint32_t lt = labelset_span(ab, s->labels);
        if (lt == UINT32_MAX) break;
        po_model_sample(b->m, ab->stack_of[s->stack], b->ids + b->spans[lt][0], b->spans[lt][1] / 2, (int64_t)s->cpu_ns,
                        (int64_t)s->wall_ns);
    }
    if ((a->dropped_cpu_ns || a->dropped_wall_ns) && !b->m->oom) { /* the samples' labels are gone; the global tags are everyone's */
        uint32_t dropped = po_model_location(b->m, frame_function(b, PO_FRAME_SYNTHETIC, PO_LINE_DROPPED), 0);
        uint32_t lt = labelset_span(ab, NULL);
        if (lt != UINT32_MAX)
            po_model_sample(b->m, po_model_stack(b->m, &dropped, 1), b->ids + b->spans[lt][0], b->spans[lt][1] / 2,
                            (int64_t)a->dropped_cpu_ns, (int64_t)a->dropped_wall_ns);
    }
    return Qnil;
}

po_model *po_model_from_agg(const po_agg *a, uint64_t started, uint64_t ended, int sample_rate, VALUE app_root,
                            VALUE prefixes, VALUE tags)
{
    check_opts(app_root, prefixes, tags);
    uint32_t *stack_of = malloc(sizeof(uint32_t) * (a->stacks_used ? a->stacks_used : 1));
    if (!stack_of) rb_raise(rb_eNoMemError, "pyroscope: cannot allocate an export model");
    po_model *m = new_model(started, ended, sample_rate);
    m->wall = po_wall_enabled(); /* and any sample with wall ns sets it (po_model_sample) */
    struct build b = { .m = m, .app_root = app_root, .prefixes = prefixes, .tags = tags };
    b.frames = st_init_numtable();
    b.strs = st_init_numtable();
    b.files = st_init_numtable();
    b.stacks = st_init_numtable();
    b.labels = st_init_numtable();
    b.truncated_loc = po_model_location(m, po_model_function(m, po_model_string(m, "(truncated)", 11), 0), 0);
    struct agg_build ab = { .b = &b, .a = a, .stack_of = stack_of };
    int state = 0;
    rb_protect(build_from_agg, (VALUE)&ab, &state);
    struct build_args args = { &b, Qnil };
    build_cleanup((VALUE)&args);
    free(stack_of);
    if (state) { po_model_free(m); free(m); rb_jump_tag(state); }
    if (m->oom) { po_model_free(m); free(m); return NULL; }
    return m;
}

/* ---- from a window as Ruby data ---- */

po_model *po_model_from_window(VALUE window, int sample_rate, VALUE app_root, VALUE prefixes, VALUE tags)
{
    Check_Type(window, T_HASH);
    check_opts(app_root, prefixes, tags);
    uint64_t started = NUM2ULL(rb_hash_fetch(window, ID2SYM(rb_intern("started_at_ns"))));
    uint64_t ended = NUM2ULL(rb_hash_fetch(window, ID2SYM(rb_intern("ended_at_ns"))));
    po_model *m = new_model(started, ended, sample_rate);
    struct build b = { .m = m, .app_root = app_root, .prefixes = prefixes, .tags = tags };
    b.strs = st_init_numtable();
    b.files = st_init_numtable();
    b.stacks = st_init_numtable();
    b.labels = st_init_numtable();
    b.truncated_loc = po_model_location(m, po_model_function(m, po_model_string(m, "(truncated)", 11), 0), 0);
    struct build_args args = { &b, window };
    int state = 0;
    rb_protect(build_samples, (VALUE)&args, &state);
    build_cleanup((VALUE)&args);
    if (state) { po_model_free(m); free(m); rb_jump_tag(state); }
    if (m->oom) { po_model_free(m); free(m); return NULL; }
    return m;
}
