/*
 * export_model.c — the dedup tables of an export model (see export_model.h).
 *
 * Plain C, no Ruby: the builder that reads a Ruby window (export.c) calls it on the GVL,
 * nothing else touches a model until the uploader thread owns it. Allocation failures set
 * m->oom rather than aborting: the window is then dropped and counted, the process goes on.
 * Strings are copied and made valid UTF-8 (invalid bytes become U+FFFD), because pprof's
 * strings are protobuf strings, which decoders reject when they are not UTF-8.
 */
#include "export_model.h"
#include <stdlib.h>
#include <string.h>

/* room for `need` items: doubling, or exactly that many when the caller knows its total */
static void *grow_to(po_model *m, void *p, uint32_t *cap, uint32_t need, size_t elem, int exact)
{
    if (need <= *cap && p) return p; /* a NULL array is allocated even for 0 items: NULL means failure */
    uint32_t c = exact ? need : *cap ? *cap : 64;
    while (c < need) c *= 2;
    void *q = realloc(p, (size_t)c * elem);
    if (!q) { m->oom = 1; return NULL; }
    m->approx_bytes += (size_t)(c - *cap) * elem;
    *cap = c;
    return q;
}

static void *grow(po_model *m, void *p, uint32_t *cap, uint32_t need, size_t elem)
{
    return grow_to(m, p, cap, need, elem, 0);
}

#define GROW(m, arr, cap, need) \
    do { void *q_ = grow((m), (arr), &(cap), (need), sizeof(*(arr))); if (!q_) return 0; (arr) = q_; } while (0)

static uint64_t hash_bytes(const char *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) { h ^= (unsigned char)p[i]; h *= 0x100000001b3ULL; }
    return h;
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
    return x;
}

static int map_grow(po_u64map *mp)
{
    uint32_t cap = mp->keys ? (mp->mask + 1) * 2 : 256;
    uint64_t *k = calloc(cap, sizeof(*k));
    uint32_t *v = calloc(cap, sizeof(*v));
    if (!k || !v) { free(k); free(v); return -1; }
    for (uint32_t i = 0; mp->keys && i <= mp->mask; i++) {
        if (!mp->vals[i]) continue;
        uint32_t pos = (uint32_t)mix64(mp->keys[i]) & (cap - 1);
        while (v[pos]) pos = (pos + 1) & (cap - 1);
        k[pos] = mp->keys[i];
        v[pos] = mp->vals[i];
    }
    free(mp->keys); free(mp->vals);
    mp->keys = k; mp->vals = v; mp->mask = cap - 1;
    return 0;
}

/* the value for key, or UINT32_MAX with *slot where to insert it */
static uint32_t map_find(po_u64map *mp, uint64_t key, uint32_t *slot)
{
    uint32_t pos = (uint32_t)mix64(key) & mp->mask;
    while (mp->vals[pos]) {
        if (mp->keys[pos] == key) return mp->vals[pos] - 1;
        pos = (pos + 1) & mp->mask;
    }
    *slot = pos;
    return UINT32_MAX;
}

void po_model_init(po_model *m)
{
    memset(m, 0, sizeof(*m));
    po_model_string(m, "", 0);            /* 0, as pprof requires */
    po_model_string(m, "cpu", 3);         /* 1: PO_STR_CPU in pprof.c */
    po_model_string(m, "nanoseconds", 11); /* 2: PO_STR_NANOSECONDS */
    po_model_string(m, "wall", 4);        /* 3: PO_STR_WALL (only a profile with wall values uses it) */
}

void po_model_free(po_model *m)
{
    for (uint32_t i = 0; i < m->n_str; i++) free(m->str[i]);
    free(m->str); free(m->str_len); free(m->str_hash); free(m->str_index);
    free(m->fn); free(m->fn_map.keys); free(m->fn_map.vals);
    free(m->loc); free(m->loc_map.keys); free(m->loc_map.vals);
    free(m->stk); free(m->locids); free(m->smp); free(m->labs);
    memset(m, 0, sizeof(*m));
}

/* Copies s as valid UTF-8 into a new NUL-terminated buffer. */
static char *utf8_copy(const char *s, size_t len, size_t *out_len)
{
    char *d = malloc(len * 3 + 1), *o = d;
    if (!d) return NULL;
    const unsigned char *p = (const unsigned char *)s, *end = p + len;
    while (p < end) {
        unsigned c = *p;
        size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        int ok = n && p + n <= end;
        for (size_t i = 1; ok && i < n; i++) ok = (p[i] & 0xC0) == 0x80;
        if (ok && n == 2) ok = c >= 0xC2;
        if (ok && n == 3) ok = !(c == 0xE0 && p[1] < 0xA0) && !(c == 0xED && p[1] >= 0xA0);
        if (ok && n == 4) ok = c <= 0xF4 && !(c == 0xF0 && p[1] < 0x90) && !(c == 0xF4 && p[1] >= 0x90);
        if (ok) { memcpy(o, p, n); o += n; p += n; }
        else { memcpy(o, "\xEF\xBF\xBD", 3); o += 3; p++; }
    }
    *o = 0;
    *out_len = (size_t)(o - d);
    return d;
}

uint32_t po_model_string(po_model *m, const char *s, size_t len)
{
    size_t n;
    char *copy = utf8_copy(s, len, &n);
    if (!copy) { m->oom = 1; return 0; }
    uint64_t h = hash_bytes(copy, n);
    if (m->n_str + 1 > (m->str_mask + 1) / 2) {
        uint32_t cap = m->str_index ? (m->str_mask + 1) * 2 : 256;
        uint32_t *idx = calloc(cap, sizeof(*idx));
        if (!idx) { free(copy); m->oom = 1; return 0; }
        for (uint32_t i = 0; i < m->n_str; i++) {
            uint32_t pos = (uint32_t)m->str_hash[i] & (cap - 1);
            while (idx[pos]) pos = (pos + 1) & (cap - 1);
            idx[pos] = i + 1;
        }
        free(m->str_index);
        m->str_index = idx;
        m->str_mask = cap - 1;
    }
    uint32_t pos = (uint32_t)h & m->str_mask;
    while (m->str_index[pos]) {
        uint32_t i = m->str_index[pos] - 1;
        if (m->str_hash[i] == h && m->str_len[i] == n && memcmp(m->str[i], copy, n) == 0) {
            free(copy);
            return i;
        }
        pos = (pos + 1) & m->str_mask;
    }
    uint32_t cap = m->cap_str;
    void *a = grow(m, m->str, &cap, m->n_str + 1, sizeof(*m->str));
    if (!a) { free(copy); return 0; }
    m->str = a;
    uint32_t cap2 = m->cap_str;
    a = grow(m, m->str_len, &cap2, m->n_str + 1, sizeof(*m->str_len));
    if (!a) { free(copy); return 0; }
    m->str_len = a;
    uint32_t cap3 = m->cap_str;
    a = grow(m, m->str_hash, &cap3, m->n_str + 1, sizeof(*m->str_hash));
    if (!a) { free(copy); return 0; }
    m->str_hash = a;
    m->cap_str = cap;
    uint32_t i = m->n_str++;
    m->str[i] = copy;
    m->str_len[i] = (uint32_t)n;
    m->str_hash[i] = h;
    m->str_index[pos] = i + 1;
    m->approx_bytes += n + 1;
    return i;
}

static uint32_t intern_pair(po_model *m, po_u64map *mp, uint64_t key, uint32_t count)
{
    if ((!mp->keys || mp->used + 1 > (mp->mask + 1) / 2) && map_grow(mp)) { m->oom = 1; return UINT32_MAX - 1; }
    uint32_t slot, v = map_find(mp, key, &slot);
    if (v != UINT32_MAX) return v;
    mp->keys[slot] = key;
    mp->vals[slot] = count + 1;
    mp->used++;
    return UINT32_MAX;
}

uint32_t po_model_function(po_model *m, uint32_t name, uint32_t file)
{
    uint32_t v = intern_pair(m, &m->fn_map, ((uint64_t)name << 32) | file, m->n_fn);
    if (v != UINT32_MAX) return v == UINT32_MAX - 1 ? 0 : v;
    GROW(m, m->fn, m->cap_fn, m->n_fn + 1);
    m->fn[m->n_fn][0] = name;
    m->fn[m->n_fn][1] = file;
    return m->n_fn++;
}

uint32_t po_model_location(po_model *m, uint32_t fn, int32_t line)
{
    uint32_t v = intern_pair(m, &m->loc_map, ((uint64_t)fn << 32) | (uint32_t)line, m->n_loc);
    if (v != UINT32_MAX) return v == UINT32_MAX - 1 ? 0 : v;
    GROW(m, m->loc, m->cap_loc, m->n_loc + 1);
    m->loc[m->n_loc].fn = fn;
    m->loc[m->n_loc].line = line;
    return m->n_loc++;
}

static int reserve_stacks(po_model *m, uint32_t stacks, uint32_t locids, int exact)
{
    void *a;
    if (!(a = grow_to(m, m->stk, &m->cap_stk, m->n_stk + stacks, sizeof(*m->stk), exact))) return -1;
    m->stk = a;
    if (!(a = grow_to(m, m->locids, &m->cap_locids, m->n_locids + locids, sizeof(*m->locids), exact))) return -1;
    m->locids = a;
    return 0;
}

int po_model_reserve_stacks(po_model *m, uint32_t stacks, uint32_t locids)
{
    return reserve_stacks(m, stacks, locids, 1);
}

uint32_t po_model_stack(po_model *m, const uint32_t *locs, uint32_t n_loc)
{
    if (reserve_stacks(m, 1, n_loc, 0)) return UINT32_MAX;
    m->stk[m->n_stk].loc_off = m->n_locids;
    m->stk[m->n_stk].n_loc = n_loc;
    memcpy(&m->locids[m->n_locids], locs, n_loc * sizeof(*locs));
    m->n_locids += n_loc;
    return m->n_stk++;
}

void po_model_sample(po_model *m, uint32_t stack, const uint32_t *labs, uint32_t n_lab, int64_t cpu_ns, int64_t wall_ns)
{
    void *a;
    if (!(a = grow(m, m->labs, &m->cap_labs, m->n_labs + 2 * n_lab, sizeof(*m->labs)))) return;
    m->labs = a;
    if (!(a = grow(m, m->smp, &m->cap_smp, m->n_smp + 1, sizeof(*m->smp)))) return;
    m->smp = a;
    struct po_xsample *s = &m->smp[m->n_smp++];
    s->stack = stack;
    s->lab_off = m->n_labs;
    s->n_lab = n_lab;
    s->cpu_ns = cpu_ns;
    s->wall_ns = wall_ns;
    if (wall_ns) m->wall = 1;
    memcpy(&m->labs[m->n_labs], labs, 2 * n_lab * sizeof(*labs));
    m->n_labs += 2 * n_lab;
}
