/*
 * labels.c — label sets: what a thread's label slot points to.
 *
 * A label set is immutable once built, interned (equal sets share one allocation, so the
 * aggregation can key samples by pointer) and reference-counted: the slot of every thread
 * that carries it holds one reference and so does every aggregated sample of it, which
 * keeps it alive until its window is taken even after the span that made it has ended.
 *
 * Contexts: building from a Ruby Hash and converting back run on the GVL and may raise,
 * so they finish all Ruby work before taking po_lock. ref/unref and the intern table run
 * under po_lock (GVL or NOGVL); unref may free. The handler only reads a set's pointer and
 * takes a reference through po_labelset_ref, which never allocates.
 */
#include "pyroscope_otel.h"
#include <stdlib.h>
#include <string.h>


static po_labelset **intern_buckets;
static size_t intern_mask, intern_count;

/* Names of labels whose value identifies one span (GVL: set and read). */
#define MAX_ID_KEYS 8
static char id_keys[MAX_ID_KEYS][64] = { "profile_id", "span_id", "trace_id" };
static int id_key_count = 3;

/* Eight bytes per step (byte-wise FNV-1a over a request's four sets was ~2.5 k
 * instructions): each word mixed by a multiply and the high half folded back down. The
 * length goes in first, so that a key's end is unambiguous. Kinds are told apart by it
 * alone, so it must not collide: 64 bits, every input bit reaching every output bit. */
static uint64_t mix(uint64_t h, uint64_t w)
{
    h = (h ^ w) * 0x9e3779b97f4a7c15ULL;
    return h ^ (h >> 32);
}

static uint64_t hash_bytes(uint64_t h, const char *p, size_t n)
{
    h = mix(h, n);
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = mix(h, w);
    }
    if (n) {
        uint64_t w = 0;
        memcpy(&w, p, n);
        h = mix(h, w);
    }
    return h;
}

long po_utf8_prefix(const char *p, long len, long max)
{
    if (len <= max) return len;
    while (max > 0 && ((unsigned char)p[max] & 0xC0) == 0x80) max--;
    return max;
}

static VALUE label_key(VALUE k)
{
    if (RB_TYPE_P(k, T_STRING)) return k;
    if (RB_TYPE_P(k, T_SYMBOL)) return rb_sym2str(k);
    rb_raise(rb_eTypeError, "label key must be a String or Symbol, got %"PRIsVALUE" (%+"PRIsVALUE")",
             rb_obj_class(k), k);
}

/* Numbers and booleans become their text, as the Pyroscope gem's tags did. */
static VALUE label_value(VALUE v, VALUE key)
{
    switch (TYPE(v)) {
    case T_STRING: return v;
    case T_SYMBOL: return rb_sym2str(v);
    case T_FIXNUM: case T_BIGNUM: case T_FLOAT: case T_TRUE: case T_FALSE: return rb_obj_as_string(v);
    default:
        rb_raise(rb_eTypeError,
                 "label %+"PRIsVALUE" must have a String, Symbol, Numeric, true or false value, got %"PRIsVALUE,
                 key, rb_obj_class(v));
    }
}

static int cmp_label(const void *a, const void *b)
{
    const po_label *x = a, *y = b;
    uint32_t n = x->key_len < y->key_len ? x->key_len : y->key_len;
    int c = memcmp(x->key, y->key, n);
    if (c) return c;
    return (x->key_len > y->key_len) - (x->key_len < y->key_len);
}

static int labelset_equal(const po_labelset *a, const po_labelset *b)
{
    if (a->hash != b->hash || a->count != b->count) return 0;
    for (uint32_t i = 0; i < a->count; i++) {
        const po_label *x = &a->pairs[i], *y = &b->pairs[i];
        if (x->key_len != y->key_len || x->value_len != y->value_len ||
            memcmp(x->key, y->key, x->key_len) || memcmp(x->value, y->value, x->value_len))
            return 0;
    }
    return 1;
}

static void intern_grow(void)
{
    size_t cap = intern_buckets ? (intern_mask + 1) * 2 : 256;
    po_labelset **nb = calloc(cap, sizeof(*nb));
    if (!nb) return; /* a longer chain is slower, never wrong */
    for (size_t i = 0; intern_buckets && i <= intern_mask; i++) {
        po_labelset *ls = intern_buckets[i];
        while (ls) {
            po_labelset *next = ls->intern_next;
            size_t b = ls->hash & (cap - 1);
            ls->intern_next = nb[b];
            nb[b] = ls;
            ls = next;
        }
    }
    free(intern_buckets);
    intern_buckets = nb;
    intern_mask = cap - 1;
}

/* Under po_lock: the interned twin of `cand` with a new reference, or `cand` itself
 * entered into the table. */
static po_labelset *intern(po_labelset *cand)
{
    if (!intern_buckets || intern_count >= intern_mask + 1) intern_grow();
    if (!intern_buckets) { cand->refs = 1; cand->intern_next = NULL; return cand; }
    size_t b = cand->hash & intern_mask;
    for (po_labelset *ls = intern_buckets[b]; ls; ls = ls->intern_next) {
        if (labelset_equal(ls, cand)) {
            ls->refs++;
            return ls;
        }
    }
    cand->refs = 1;
    cand->intern_next = intern_buckets[b];
    intern_buckets[b] = cand;
    intern_count++;
    return cand;
}

static int id_key(const po_label *l)
{
    for (int i = 0; i < id_key_count; i++)
        if (strlen(id_keys[i]) == l->key_len && memcmp(l->key, id_keys[i], l->key_len) == 0) return 1;
    return 0;
}

void po_labelset_add_id_key(const char *key, long len)
{
    if (len <= 0 || len >= (long)sizeof(id_keys[0])) rb_raise(rb_eArgError, "id label name must be 1..63 bytes, got %ld", len);
    for (int i = 0; i < id_key_count; i++)
        if ((long)strlen(id_keys[i]) == len && memcmp(id_keys[i], key, len) == 0) return;
    if (id_key_count == MAX_ID_KEYS) rb_raise(rb_eArgError, "at most %d id label names", MAX_ID_KEYS);
    memcpy(id_keys[id_key_count], key, len);
    id_keys[id_key_count++][len] = 0;
}

#define HASH_SEED 0xcbf29ce484222325ULL

uint64_t po_labelset_kind(const po_labelset *ls)
{
    return ls ? ls->kind : HASH_SEED;
}

/* Hashes and interns a filled, sorted set; returns a new reference (maybe to its twin). */
static po_labelset *seal(po_labelset *ls)
{
    uint64_t h = HASH_SEED, kind = HASH_SEED;
    for (uint32_t i = 0; i < ls->count; i++) {
        h = hash_bytes(h, ls->pairs[i].key, ls->pairs[i].key_len);
        h = hash_bytes(h, ls->pairs[i].value, ls->pairs[i].value_len);
        if (id_key(&ls->pairs[i])) continue;
        kind = hash_bytes(kind, ls->pairs[i].key, ls->pairs[i].key_len);
        kind = hash_bytes(kind, ls->pairs[i].value, ls->pairs[i].value_len);
    }
    ls->hash = h;
    ls->kind = kind;
    po_lock();
    po_labelset *got = intern(ls);
    po_unlock();
    if (got != ls) free(ls);
    return got;
}

static int find_key(const po_labelset *ls, const po_label *l)
{
    return bsearch(l, ls->pairs, ls->count, sizeof(po_label), cmp_label) != NULL;
}

static char *copy_pair(po_label *to, const po_label *from, char *p)
{
    memcpy(p, from->key, from->key_len + 1);
    to->key = p;
    to->key_len = from->key_len;
    p += from->key_len + 1;
    memcpy(p, from->value, from->value_len + 1);
    to->value = p;
    to->value_len = from->value_len;
    return p + from->value_len + 1;
}

/* a key and a value from Strings, cut to the server's limits on a character boundary */
static char *copy_strings(po_label *to, VALUE ks, VALUE vs, char *p)
{
    long kl = po_utf8_prefix(RSTRING_PTR(ks), RSTRING_LEN(ks), PO_MAX_KEY_BYTES);
    long vl = po_utf8_prefix(RSTRING_PTR(vs), RSTRING_LEN(vs), PO_MAX_VALUE_BYTES);
    memcpy(p, RSTRING_PTR(ks), kl); p[kl] = 0; to->key = p; to->key_len = kl; p += kl + 1;
    memcpy(p, RSTRING_PTR(vs), vl); p[vl] = 0; to->value = p; to->value_len = vl;
    return p + vl + 1;
}

/* a thread's labels, within the server's labels-per-sample limit */
static void check_count(long n)
{
    if (n > PO_MAX_LABELS)
        rb_raise(rb_eArgError, "too many labels on one thread: %ld (the server accepts at most %d per sample)", n,
                 PO_MAX_LABELS);
}

/* String key -> String value, so that "a" and :a are one key and the later one wins,
 * as in a Hash merge. */
static int collect_pair(VALUE k, VALUE v, VALUE strs)
{
    if (NIL_P(v)) return ST_CONTINUE; /* nil removes: the Pyroscope gem's tag semantics */
    po_label_pair(&k, &v);
    rb_hash_aset(strs, k, v);
    return ST_CONTINUE;
}

static int flatten_pair(VALUE k, VALUE v, VALUE ary)
{
    rb_ary_push(ary, k);
    rb_ary_push(ary, v);
    return ST_CONTINUE;
}

po_labelset *po_labelset_from_hash(VALUE hash)
{
    if (NIL_P(hash)) return NULL;
    Check_Type(hash, T_HASH);
    VALUE strs = rb_hash_new();
    rb_hash_foreach(hash, collect_pair, strs);
    long n = RHASH_SIZE(strs);
    if (n == 0) return NULL;
    check_count(n);
    VALUE kv = rb_ary_new_capa(n * 2);
    rb_hash_foreach(strs, flatten_pair, kv);
    po_labelset *ls = po_labelset_from_pairs(RARRAY_CONST_PTR(kv), n);
    RB_GC_GUARD(kv);
    RB_GC_GUARD(strs);
    return ls;
}

po_labelset *po_labelset_from_pairs(const VALUE *kv, long n)
{
    size_t bytes = 0;
    for (long i = 0; i < n * 2; i++) bytes += RSTRING_LEN(kv[i]) + 1;
    po_labelset *ls = malloc(sizeof(*ls) + n * sizeof(po_label) + bytes);
    if (!ls) rb_raise(rb_eNoMemError, "pyroscope: cannot allocate a label set");
    char *p = (char *)&ls->pairs[n];
    for (long i = 0; i < n; i++) {
        p = copy_strings(&ls->pairs[i], kv[2 * i], kv[2 * i + 1], p);
    }
    qsort(ls->pairs, n, sizeof(po_label), cmp_label);
    ls->count = (uint32_t)n;
    return seal(ls);
}

/* GVL: a label pair's key and value as Strings, checked and converted as for a Hash. */
void po_label_pair(VALUE *k, VALUE *v)
{
    VALUE key = *k;
    *k = label_key(key);
    if (RSTRING_LEN(*k) == 0) rb_raise(rb_eArgError, "label key must not be empty");
    *v = label_value(*v, key);
}

/* Merge of two sorted sets; on a shared key `over` wins. At most PO_MAX_LABELS pairs:
 * `over`'s first, then `base`'s in key order. */
po_labelset *po_labelset_merge(const po_labelset *base, const po_labelset *over)
{
    po_lock();
    if (!base || !over) {
        po_labelset *one = over ? (po_labelset *)over : (po_labelset *)base;
        po_labelset_ref(one);
        po_unlock();
        return one;
    }
    po_unlock();
    uint32_t n = 0, from_base = 0;
    size_t bytes = 0;
    for (uint32_t i = 0; i < over->count; i++, n++)
        bytes += over->pairs[i].key_len + over->pairs[i].value_len + 2;
    for (uint32_t i = 0; i < base->count && n < PO_MAX_LABELS; i++) {
        if (find_key(over, &base->pairs[i])) continue;
        bytes += base->pairs[i].key_len + base->pairs[i].value_len + 2;
        n++;
        from_base++;
    }
    po_labelset *ls = malloc(sizeof(*ls) + n * sizeof(po_label) + bytes);
    if (!ls) return NULL;
    char *p = (char *)&ls->pairs[n];
    uint32_t k = 0;
    for (uint32_t i = 0; i < over->count; i++) p = copy_pair(&ls->pairs[k++], &over->pairs[i], p);
    for (uint32_t i = 0; i < base->count && from_base; i++) {
        if (find_key(over, &base->pairs[i])) continue;
        p = copy_pair(&ls->pairs[k++], &base->pairs[i], p);
        from_base--;
    }
    qsort(ls->pairs, k, sizeof(po_label), cmp_label);
    ls->count = k;
    return seal(ls);
}

/* Tags, as the Pyroscope gem's: any key or value by its to_s; nil removes the key. */
static VALUE tag_text(VALUE v)
{
    return RB_TYPE_P(v, T_STRING) ? v : RB_TYPE_P(v, T_SYMBOL) ? rb_sym2str(v) : rb_obj_as_string(v);
}

static int collect_change(VALUE k, VALUE v, VALUE strs)
{
    k = tag_text(k);
    if (RSTRING_LEN(k) == 0) rb_raise(rb_eArgError, "label key must not be empty");
    rb_hash_aset(strs, k, NIL_P(v) ? Qnil : tag_text(v));
    return ST_CONTINUE;
}

/* the pair of ls with key k (truncated as stored), or NULL */
static const po_label *pair_with_key(const po_labelset *ls, VALUE k)
{
    po_label probe = { RSTRING_PTR(k), NULL, (uint32_t)po_utf8_prefix(RSTRING_PTR(k), RSTRING_LEN(k), PO_MAX_KEY_BYTES), 0 };
    return ls ? bsearch(&probe, ls->pairs, ls->count, sizeof(po_label), cmp_label) : NULL;
}

static int replaced(const po_label *l, const po_label **changed, long n)
{
    for (long j = 0; j < n; j++)
        if (changed[j] == l) return 1;
    return 0;
}

/* Built in place from base's pairs and the changes' Strings: a request's tag_wrapper
 * applies and restores one tag, and going through a Ruby Hash of all the fiber's tags
 * (to_h, merge, from_hash) cost ~8 k instructions per request. */
po_labelset *po_labelset_apply(const po_labelset *base, VALUE changes, VALUE *previous)
{
    if (!RB_TYPE_P(changes, T_HASH)) rb_raise(rb_eArgError, "tags must be a Hash, got %+"PRIsVALUE, changes);
    check_count((long)RHASH_SIZE(changes));
    VALUE strs = rb_hash_new(); /* "a" and :a are one key; the later wins, as in a Hash merge */
    rb_hash_foreach(changes, collect_change, strs);
    VALUE kv = rb_ary_new_capa(RHASH_SIZE(strs) * 2);
    rb_hash_foreach(strs, flatten_pair, kv);
    long nc = RARRAY_LEN(kv) / 2;
    const VALUE *c = RARRAY_CONST_PTR(kv);
    const po_label *changed[PO_MAX_LABELS];
    VALUE prev = previous ? rb_hash_new() : Qnil;
    long n = 0;
    size_t bytes = 0;
    for (long i = 0; i < nc; i++) {
        changed[i] = pair_with_key(base, c[2 * i]);
        if (previous) rb_hash_aset(prev, c[2 * i], changed[i] ? rb_utf8_str_new(changed[i]->value, changed[i]->value_len) : Qnil);
        if (NIL_P(c[2 * i + 1])) continue;
        n++;
        bytes += RSTRING_LEN(c[2 * i]) + RSTRING_LEN(c[2 * i + 1]) + 2;
    }
    for (uint32_t i = 0; base && i < base->count; i++) {
        if (replaced(&base->pairs[i], changed, nc)) continue;
        n++;
        bytes += base->pairs[i].key_len + base->pairs[i].value_len + 2;
    }
    check_count(n);
    if (previous) *previous = prev;
    if (n == 0) return NULL;
    po_labelset *ls = malloc(sizeof(*ls) + n * sizeof(po_label) + bytes);
    if (!ls) rb_raise(rb_eNoMemError, "pyroscope: cannot allocate a label set");
    char *p = (char *)&ls->pairs[n];
    uint32_t k = 0;
    for (uint32_t i = 0; base && i < base->count; i++)
        if (!replaced(&base->pairs[i], changed, nc)) p = copy_pair(&ls->pairs[k++], &base->pairs[i], p);
    for (long i = 0; i < nc; i++) {
        if (NIL_P(c[2 * i + 1])) continue;
        VALUE ks = c[2 * i], vs = c[2 * i + 1];
        p = copy_strings(&ls->pairs[k++], ks, vs, p);
    }
    qsort(ls->pairs, k, sizeof(po_label), cmp_label);
    ls->count = k;
    RB_GC_GUARD(kv);
    RB_GC_GUARD(strs);
    return seal(ls);
}

VALUE po_labelset_to_hash(const po_labelset *ls)
{
    VALUE h = rb_hash_new();
    for (uint32_t i = 0; ls && i < ls->count; i++)
        rb_hash_aset(h, rb_utf8_str_new(ls->pairs[i].key, ls->pairs[i].key_len),
                     rb_utf8_str_new(ls->pairs[i].value, ls->pairs[i].value_len));
    return h;
}

void po_labelset_ref(po_labelset *ls)
{
    if (ls) ls->refs++;
}

void po_labelset_unref(po_labelset *ls)
{
    if (!ls || --ls->refs) return;
    if (intern_buckets) {
        po_labelset **pp = &intern_buckets[ls->hash & intern_mask];
        while (*pp && *pp != ls) pp = &(*pp)->intern_next;
        if (*pp) { *pp = ls->intern_next; intern_count--; }
    }
    free(ls);
}

size_t po_labelset_live_count(void)
{
    return intern_count;
}
