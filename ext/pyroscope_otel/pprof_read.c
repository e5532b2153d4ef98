/*
 * pprof_read.c — reading a pprof profile back (Native.read_pprof), for the command-line
 * tool that renders the local target's files: gunzip with zlib, decode with protobuf-c,
 * resolve locations, functions and strings into plain Ruby data.
 *
 * GVL throughout. The Ruby data is built under rb_protect, so the decoded C tree is freed
 * even when building raises (a malformed profile raises a clear ArgumentError). Every index into the tables is checked: the
 * input is a file, not something this gem necessarily wrote.
 */
#include "pyroscope_otel.h"
#include "profile.pb-c.h"
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#define MAX_INFLATED (512u << 20) /* a profile larger than this is not one of ours */

/* the bytes of a gzipped or plain profile; *owned is set when they were inflated */
static uint8_t *inflated(const uint8_t *in, size_t len, size_t *out_len, int *owned)
{
    *owned = 0;
    if (len < 2 || in[0] != 0x1f || in[1] != 0x8b) {
        *out_len = len;
        return (uint8_t *)in;
    }
    z_stream z;
    memset(&z, 0, sizeof(z));
    if (inflateInit2(&z, 15 + 16) != Z_OK) return NULL;
    size_t cap = len * 4 + 1024, n = 0;
    uint8_t *buf = malloc(cap);
    z.next_in = (Bytef *)in;
    z.avail_in = (uInt)len;
    int rc = Z_OK;
    while (buf && rc == Z_OK) {
        if (n == cap) {
            if (cap >= MAX_INFLATED) break;
            uint8_t *nb = realloc(buf, cap * 2);
            if (!nb) { free(buf); buf = NULL; break; }
            buf = nb;
            cap *= 2;
        }
        z.next_out = buf + n;
        z.avail_out = (uInt)(cap - n);
        rc = inflate(&z, Z_NO_FLUSH);
        n = cap - z.avail_out;
    }
    inflateEnd(&z);
    if (!buf || rc != Z_STREAM_END) { free(buf); return NULL; }
    *out_len = n;
    *owned = 1;
    return buf;
}

static const char *str_at(const Perftools__Profiles__Profile *p, int64_t i)
{
    return i >= 0 && (size_t)i < p->n_string_table ? p->string_table[i] : "";
}

static VALUE str(const Perftools__Profiles__Profile *p, int64_t i)
{
    return rb_utf8_str_new_cstr(str_at(p, i));
}

static const Perftools__Profiles__Function *function_by_id(const Perftools__Profiles__Profile *p, uint64_t id)
{
    /* ids are usually index + 1: try that first */
    if (id >= 1 && id <= p->n_function && p->function[id - 1]->id == id) return p->function[id - 1];
    for (size_t i = 0; i < p->n_function; i++)
        if (p->function[i]->id == id) return p->function[i];
    return NULL;
}

static const Perftools__Profiles__Location *location_by_id(const Perftools__Profiles__Profile *p, uint64_t id)
{
    if (id >= 1 && id <= p->n_location && p->location[id - 1]->id == id) return p->location[id - 1];
    for (size_t i = 0; i < p->n_location; i++)
        if (p->location[i]->id == id) return p->location[i];
    return NULL;
}

/* { sample_types: [[type, unit]], period:, time_nanos:, duration_nanos:,
 *   samples: [[frames leaf first ([name, file, line]), labels Hash, values Array]] } */
static VALUE to_ruby(VALUE arg)
{
    const Perftools__Profiles__Profile *p = (const Perftools__Profiles__Profile *)arg;
    VALUE frames_of_location = rb_hash_new(); /* location id -> frames (inlined lines: leaf first) */
    VALUE samples = rb_ary_new_capa((long)p->n_sample);
    for (size_t i = 0; i < p->n_sample; i++) {
        const Perftools__Profiles__Sample *s = p->sample[i];
        VALUE frames = rb_ary_new_capa((long)s->n_location_id);
        for (size_t k = 0; k < s->n_location_id; k++) {
            VALUE key = ULL2NUM(s->location_id[k]);
            VALUE lf = rb_hash_lookup2(frames_of_location, key, Qundef);
            if (lf == Qundef) {
                const Perftools__Profiles__Location *loc = location_by_id(p, s->location_id[k]);
                if (!loc) rb_raise(rb_eArgError, "pprof: sample refers to missing location %llu",
                                   (unsigned long long)s->location_id[k]);
                lf = rb_ary_new_capa((long)loc->n_line);
                for (size_t l = loc->n_line; l-- > 0;) { /* the last line is the caller-most */
                    const Perftools__Profiles__Function *f = function_by_id(p, loc->line[l]->function_id);
                    rb_ary_unshift(lf, rb_ary_new_from_args(3, f ? str(p, f->name) : rb_str_new_cstr("(unknown)"),
                                                            f ? str(p, f->filename) : rb_str_new_cstr(""),
                                                            LL2NUM(loc->line[l]->line)));
                }
                rb_hash_aset(frames_of_location, key, lf);
            }
            rb_ary_concat(frames, lf);
        }
        VALUE labels = rb_hash_new();
        for (size_t l = 0; l < s->n_label; l++) {
            const Perftools__Profiles__Label *lb = s->label[l];
            rb_hash_aset(labels, str(p, lb->key), lb->str ? str(p, lb->str) : LL2NUM(lb->num));
        }
        VALUE values = rb_ary_new_capa((long)s->n_value);
        for (size_t v = 0; v < s->n_value; v++) rb_ary_push(values, LL2NUM(s->value[v]));
        rb_ary_push(samples, rb_ary_new_from_args(3, frames, labels, values));
    }
    VALUE types = rb_ary_new();
    for (size_t i = 0; i < p->n_sample_type; i++)
        rb_ary_push(types, rb_ary_new_from_args(2, str(p, p->sample_type[i]->type), str(p, p->sample_type[i]->unit)));
    VALUE h = rb_hash_new();
    rb_hash_aset(h, ID2SYM(rb_intern("sample_types")), types);
    rb_hash_aset(h, ID2SYM(rb_intern("period")), LL2NUM(p->period));
    rb_hash_aset(h, ID2SYM(rb_intern("time_nanos")), LL2NUM(p->time_nanos));
    rb_hash_aset(h, ID2SYM(rb_intern("duration_nanos")), LL2NUM(p->duration_nanos));
    rb_hash_aset(h, ID2SYM(rb_intern("samples")), samples);
    return h;
}

/* read_pprof(bytes): a gzipped or plain pprof profile as Ruby data (see to_ruby). */
static VALUE native_read_pprof(VALUE self, VALUE bytes)
{
    (void)self;
    StringValue(bytes);
    size_t len = 0;
    int owned = 0;
    uint8_t *raw = inflated((const uint8_t *)RSTRING_PTR(bytes), (size_t)RSTRING_LEN(bytes), &len, &owned);
    if (!raw) rb_raise(rb_eArgError, "pprof: not a valid gzip stream (or larger than %u bytes inflated)", MAX_INFLATED);
    Perftools__Profiles__Profile *p = perftools__profiles__profile__unpack(NULL, len, raw);
    if (owned) free(raw);
    RB_GC_GUARD(bytes);
    if (!p) rb_raise(rb_eArgError, "pprof: not a pprof Profile message");
    int state = 0;
    VALUE result = rb_protect(to_ruby, (VALUE)p, &state);
    perftools__profiles__profile__free_unpacked(p, NULL);
    if (state) rb_jump_tag(state);
    return result;
}

void po_pprof_read_init(VALUE mNative)
{
    rb_define_singleton_method(mNative, "read_pprof", native_read_pprof, 1);
}
