/*
 * pprof.c — encoding an export model as pprof (protobuf-c, from proto/profile.proto) and
 * gzip (zlib), within the Pyroscope server's limits.
 *
 * Runs on the uploader thread, without the GVL, on a model no other thread touches.
 * A window becomes one or more profiles: po_pprof_split cuts the samples so that each
 * profile has at most 16 000 samples and at most 4 MiB packed, using per-item upper
 * bounds of the encoded size (so no profile can come out over the limit), and each
 * profile carries only the strings, functions and locations its samples use.
 * The profile: string_table[0] = ""; sample_type and period_type cpu/nanoseconds;
 * period = 1e9 / sample rate; one value per sample, CPU nanoseconds; time_nanos and
 * duration_nanos of the window; Function{name, system_name, filename}; Location{line}.
 * With profile type :wall (a model with wall values) the default is two sample types,
 * cpu/nanoseconds then wall/nanoseconds, two values per sample, on the same stacks and
 * labels (the local target's files, the encoder). An upload to Pyroscope instead sends
 * each window as two profiles, cpu alone (unchanged) and wall alone (sample and period
 * type wall/nanoseconds; transport.c): the server names a whole profile after its first
 * "wall" sample type if it has one (grafana/pyroscope pkg/og/convert/pprof/profile.go,
 * RawProfile.metricName), and each sample type's profile type id is
 * <that name>:<type>:<unit>:<period type>:<period unit> (pkg/phlaredb/labels/labels.go),
 * so one profile with both types would move the CPU from
 * process_cpu:cpu:nanoseconds:cpu:nanoseconds to wall:cpu:nanoseconds:cpu:nanoseconds,
 * where Grafana's CPU views and traces-to-profiles settings no longer find it. Split, the
 * ids are process_cpu:cpu:nanoseconds:cpu:nanoseconds and
 * wall:wall:nanoseconds:wall:nanoseconds.
 */
#include "export_model.h"
#include "profile.pb-c.h"
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

typedef Perftools__Profiles__Profile Profile;
typedef Perftools__Profiles__Sample Sample;
typedef Perftools__Profiles__Label Label;
typedef Perftools__Profiles__Location Location;
typedef Perftools__Profiles__Line Line;
typedef Perftools__Profiles__Function Function;
typedef Perftools__Profiles__ValueType ValueType;

/* Upper bounds of encoded bytes (field tags, lengths and varints at their widest). */
#define UB_SAMPLE_BASE 24
#define UB_PER_LOCATION_ID 5
#define UB_PER_LABEL 18
#define UB_STRING_OVERHEAD 7
#define UB_FUNCTION 36
#define UB_LOCATION 36
#define UB_PROFILE_BASE 128
#define PO_STR_CPU 1
#define PO_STR_NANOSECONDS 2
#define PO_STR_WALL 3
#define UB_PER_VALUE 11 /* a second value: a varint at its widest */

struct stamps {
    uint32_t *str, *fn, *loc; /* the chunk that last used each item */
};

/* Upper bound of the bytes sample s adds to `chunk`, given what the chunk has already. */
static size_t sample_cost(const po_model *m, const struct po_xsample *s, const struct stamps *st, uint32_t chunk)
{
    const struct po_xstack *k = &m->stk[s->stack];
    size_t add = UB_SAMPLE_BASE + (m->wall ? UB_PER_VALUE : 0) + (size_t)k->n_loc * UB_PER_LOCATION_ID +
                 (size_t)s->n_lab * UB_PER_LABEL;
#define STR_COST(id) (st->str[id] == chunk ? 0 : (size_t)m->str_len[id] + UB_STRING_OVERHEAD)
    for (uint32_t j = 0; j < k->n_loc; j++) {
        uint32_t l = m->locids[k->loc_off + j], f = m->loc[l].fn;
        if (st->loc[l] == chunk) continue;
        add += UB_LOCATION;
        if (st->fn[f] != chunk) add += UB_FUNCTION + STR_COST(m->fn[f][0]) + STR_COST(m->fn[f][1]);
    }
    for (uint32_t j = 0; j < 2 * s->n_lab; j++) add += STR_COST(m->labs[s->lab_off + j]);
#undef STR_COST
    return add;
}

static void sample_stamp(const po_model *m, const struct po_xsample *s, struct stamps *st, uint32_t chunk)
{
    const struct po_xstack *k = &m->stk[s->stack];
    for (uint32_t j = 0; j < k->n_loc; j++) {
        uint32_t l = m->locids[k->loc_off + j], f = m->loc[l].fn;
        st->loc[l] = st->fn[f] = st->str[m->fn[f][0]] = st->str[m->fn[f][1]] = chunk;
    }
    for (uint32_t j = 0; j < 2 * s->n_lab; j++) st->str[m->labs[s->lab_off + j]] = chunk;
}

uint32_t po_pprof_split(const po_model *m, uint32_t **bounds_out)
{
    struct stamps st = {
        calloc(m->n_str + 1, sizeof(uint32_t)), calloc(m->n_fn + 1, sizeof(uint32_t)),
        calloc(m->n_loc + 1, sizeof(uint32_t)),
    };
    uint32_t cap = 4, n = 0;
    uint32_t *bounds = malloc(cap * sizeof(uint32_t));
    if (!st.str || !st.fn || !st.loc || !bounds) goto fail;

    uint32_t chunk = 1, count = 0;
    size_t bytes = UB_PROFILE_BASE;
    for (uint32_t i = 0; i < m->n_smp; i++) {
        const struct po_xsample *s = &m->smp[i];
        size_t add = sample_cost(m, s, &st, chunk);
        if (count > 0 && (count + 1 > PO_SERVER_MAX_SAMPLES || bytes + add > PO_SERVER_MAX_BYTES)) {
            if (n + 2 > cap) {
                uint32_t *b = realloc(bounds, (cap *= 2) * sizeof(uint32_t));
                if (!b) goto fail;
                bounds = b;
            }
            bounds[n++] = i;
            chunk++;
            count = 0;
            bytes = UB_PROFILE_BASE;
            add = sample_cost(m, s, &st, chunk);
        }
        sample_stamp(m, s, &st, chunk);
        bytes += add;
        count++;
    }
    bounds[n++] = m->n_smp;
    free(st.str); free(st.fn); free(st.loc);
    *bounds_out = bounds;
    return n;
fail:
    free(st.str); free(st.fn); free(st.loc); free(bounds);
    return 0;
}

struct packer {
    const po_model *m;
    uint32_t *str_map, *fn_map, *loc_map; /* model id -> profile id (+1 for strings) */
    char **strs;
    uint32_t n_strs;
    Function *fns;
    Function **fn_ptrs;
    uint32_t n_fns;
    Location *locs;
    Location **loc_ptrs;
    Line *lines;
    Line **line_ptrs;
    uint32_t n_locs;
};

static int64_t str_id(struct packer *p, uint32_t id)
{
    if (!p->str_map[id]) {
        p->strs[p->n_strs] = p->m->str[id];
        p->str_map[id] = ++p->n_strs;
    }
    return p->str_map[id] - 1;
}

static uint64_t fn_id(struct packer *p, uint32_t f)
{
    if (!p->fn_map[f]) {
        Function *fn = &p->fns[p->n_fns];
        perftools__profiles__function__init(fn);
        fn->id = p->n_fns + 1;
        fn->name = fn->system_name = str_id(p, p->m->fn[f][0]);
        fn->filename = str_id(p, p->m->fn[f][1]);
        p->fn_ptrs[p->n_fns] = fn;
        p->fn_map[f] = ++p->n_fns;
    }
    return p->fn_map[f];
}

static uint64_t loc_id(struct packer *p, uint32_t l)
{
    if (!p->loc_map[l]) {
        uint32_t k = p->n_locs;
        Location *loc = &p->locs[k];
        Line *line = &p->lines[k];
        perftools__profiles__location__init(loc);
        perftools__profiles__line__init(line);
        line->function_id = fn_id(p, p->m->loc[l].fn);
        line->line = p->m->loc[l].line;
        p->line_ptrs[k] = line;
        loc->id = k + 1;
        loc->n_line = 1;
        loc->line = &p->line_ptrs[k];
        p->loc_ptrs[k] = loc;
        p->loc_map[l] = ++p->n_locs;
    }
    return p->loc_map[l];
}

/* Sample s as a message, in the scratch arrays `ids` and `labels` (room for its stack and
 * its labels); assigns profile ids to what it uses on first sight. */
static void sample_msg(struct packer *p, const struct po_xsample *s, int types, Sample *out, uint64_t *ids, int64_t *value,
                       Label *labels, Label **label_ptrs)
{
    const po_model *m = p->m;
    const struct po_xstack *k = &m->stk[s->stack];
    perftools__profiles__sample__init(out);
    for (uint32_t j = 0; j < k->n_loc; j++) ids[j] = loc_id(p, m->locids[k->loc_off + j]);
    out->location_id = ids;
    out->n_location_id = k->n_loc;
    out->n_value = 0;
    if (types & PO_TYPE_CPU) value[out->n_value++] = s->cpu_ns;
    if (types & PO_TYPE_WALL) value[out->n_value++] = s->wall_ns;
    out->value = value;
    for (uint32_t j = 0; j < s->n_lab; j++) {
        perftools__profiles__label__init(&labels[j]);
        labels[j].key = str_id(p, m->labs[s->lab_off + 2 * j]);
        labels[j].str = str_id(p, m->labs[s->lab_off + 2 * j + 1]);
        label_ptrs[j] = &labels[j];
    }
    out->label = label_ptrs;
    out->n_label = s->n_lab;
}

static size_t varint_len(uint64_t v)
{
    size_t n = 1;
    for (; v >= 0x80; v >>= 7) n++;
    return n;
}

static uint8_t *varint_put(uint8_t *o, uint64_t v)
{
    for (; v >= 0x80; v >>= 7) *o++ = (uint8_t)(v | 0x80);
    *o++ = (uint8_t)v;
    return o;
}

#define SAMPLE_TAG 0x12 /* Profile.sample: field 2, length-delimited */

/* Samples are packed one at a time, each between the profile's field 1 and its fields 3 and
 * on: a whole window's samples as messages took 8 bytes per location id (a window of 5 000
 * stacks of 200 frames: 8 MB) beside the packed bytes. */
/* a sample the profile leaves out: none of the values it carries */
static int left_out(const struct po_xsample *s, int types)
{
    return !((types & PO_TYPE_CPU) && s->cpu_ns) && !((types & PO_TYPE_WALL) && s->wall_ns);
}

int po_pprof_has(const po_model *m, uint32_t from, uint32_t to, int types)
{
    for (uint32_t i = from; i < to; i++)
        if (!left_out(&m->smp[i], types)) return 1;
    return 0;
}

uint8_t *po_pprof_pack(const po_model *m, uint32_t from, uint32_t to, int types, size_t *len)
{
    /* a cpu-only model keeps every sample it has (its export left out the empty ones) */
    int filter = m->wall && types != (PO_TYPE_CPU | PO_TYPE_WALL);
    uint32_t max_loc = 0, max_lab = 0, n_ids = 0;
    for (uint32_t i = from; i < to; i++) {
        uint32_t n_loc = m->stk[m->smp[i].stack].n_loc;
        n_ids += n_loc;
        if (n_loc > max_loc) max_loc = n_loc;
        if (m->smp[i].n_lab > max_lab) max_lab = m->smp[i].n_lab;
    }
    struct packer p = { .m = m };
    p.str_map = calloc(m->n_str, sizeof(uint32_t));
    p.fn_map = calloc(m->n_fn ? m->n_fn : 1, sizeof(uint32_t));
    p.loc_map = calloc(m->n_loc ? m->n_loc : 1, sizeof(uint32_t));
    p.strs = malloc(m->n_str * sizeof(char *));
    uint32_t n_locs = n_ids < m->n_loc ? n_ids : m->n_loc;
    uint32_t n_fns = n_locs < m->n_fn ? n_locs : m->n_fn;
    p.fns = malloc((n_fns + 1) * sizeof(Function));
    p.fn_ptrs = malloc((n_fns + 1) * sizeof(Function *));
    p.locs = malloc((n_locs + 1) * sizeof(Location));
    p.loc_ptrs = malloc((n_locs + 1) * sizeof(Location *));
    p.lines = malloc((n_locs + 1) * sizeof(Line));
    p.line_ptrs = malloc((n_locs + 1) * sizeof(Line *));
    uint32_t *sizes = malloc((to - from + 1) * sizeof(uint32_t));
    uint64_t *ids = malloc((max_loc + 1) * sizeof(uint64_t));
    Label *labels = malloc((max_lab + 1) * sizeof(Label));
    Label **label_ptrs = malloc((max_lab + 1) * sizeof(Label *));
    uint8_t *out = NULL;
    if (!p.str_map || !p.fn_map || !p.loc_map || !p.strs || !p.fns || !p.fn_ptrs || !p.locs || !p.loc_ptrs ||
        !p.lines || !p.line_ptrs || !sizes || !ids || !labels || !label_ptrs)
        goto done;

    str_id(&p, 0);
    ValueType vt[2], period_type;
    ValueType *vts[2];
    size_t n_types = 0;
    perftools__profiles__value_type__init(&period_type);
    period_type.type = str_id(&p, types & PO_TYPE_CPU ? PO_STR_CPU : PO_STR_WALL);
    period_type.unit = str_id(&p, PO_STR_NANOSECONDS);
    for (int k = 0; k < 2; k++) {
        int type = k ? PO_TYPE_WALL : PO_TYPE_CPU;
        if (!(types & type)) continue;
        perftools__profiles__value_type__init(&vt[n_types]);
        vt[n_types].type = str_id(&p, k ? PO_STR_WALL : PO_STR_CPU);
        vt[n_types].unit = period_type.unit;
        vts[n_types] = &vt[n_types];
        n_types++;
    }

    Sample smp;
    int64_t value[2];
    size_t samples_len = 0;
    for (uint32_t i = from; i < to; i++) {
        if (filter && left_out(&m->smp[i], types)) continue;
        sample_msg(&p, &m->smp[i], types, &smp, ids, value, labels, label_ptrs);
        sizes[i - from] = (uint32_t)perftools__profiles__sample__get_packed_size(&smp);
        samples_len += 1 + varint_len(sizes[i - from]) + sizes[i - from];
    }

    Profile head, rest; /* field 1 before the samples, fields 3 and on after them */
    perftools__profiles__profile__init(&head);
    head.n_sample_type = n_types;
    head.sample_type = vts;
    perftools__profiles__profile__init(&rest);
    rest.period_type = &period_type;
    rest.period = m->period;
    rest.time_nanos = m->time_nanos;
    rest.duration_nanos = m->duration_nanos;
    rest.n_location = p.n_locs;
    rest.location = p.loc_ptrs;
    rest.n_function = p.n_fns;
    rest.function = p.fn_ptrs;
    rest.n_string_table = p.n_strs;
    rest.string_table = p.strs;
    size_t head_len = perftools__profiles__profile__get_packed_size(&head);
    *len = head_len + samples_len + perftools__profiles__profile__get_packed_size(&rest);
    out = malloc(*len);
    if (!out) goto done;
    uint8_t *o = out + perftools__profiles__profile__pack(&head, out);
    for (uint32_t i = from; i < to; i++) {
        if (filter && left_out(&m->smp[i], types)) continue;
        sample_msg(&p, &m->smp[i], types, &smp, ids, value, labels, label_ptrs);
        *o++ = SAMPLE_TAG;
        o = varint_put(o, sizes[i - from]);
        o += perftools__profiles__sample__pack(&smp, o);
    }
    perftools__profiles__profile__pack(&rest, o);
done:
    free(p.str_map); free(p.fn_map); free(p.loc_map); free(p.strs); free(p.fns); free(p.fn_ptrs);
    free(p.locs); free(p.loc_ptrs); free(p.lines); free(p.line_ptrs);
    free(sizes); free(ids); free(labels); free(label_ptrs);
    return out;
}

uint8_t *po_gzip(const uint8_t *buf, size_t len, size_t *out_len)
{
    z_stream z;
    memset(&z, 0, sizeof(z));
    /* level 1: level 6 took 1.45x the CPU for 12 % fewer bytes (bench/export_cost.rb, 5 000 stacks) */
    if (deflateInit2(&z, 1, Z_DEFLATED, 15 + 16 /* gzip wrapper */, 8, Z_DEFAULT_STRATEGY) != Z_OK) return NULL;
    size_t cap = deflateBound(&z, len) + 32;
    uint8_t *out = malloc(cap);
    if (!out) { deflateEnd(&z); return NULL; }
    z.next_in = (Bytef *)buf;
    z.avail_in = (uInt)len;
    z.next_out = out;
    z.avail_out = (uInt)cap;
    int rc = deflate(&z, Z_FINISH);
    *out_len = z.total_out;
    deflateEnd(&z);
    if (rc != Z_STREAM_END) { free(out); return NULL; }
    return out;
}
