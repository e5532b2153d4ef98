/*
 * export_model.h — a window in the shape pprof needs, as plain C data: deduplicated
 * strings, functions (name, file), locations (function, line), stacks (location ids leaf
 * first) and samples (a stack, label string pairs, CPU ns, and with profile type :wall
 * wall ns). Built on the GVL from a taken
 * window (export_model.c); read without the GVL by the encoder (pprof.c) on the uploader
 * thread.
 * Owned by one upload job at a time; freed with po_model_free.
 */
#ifndef PYROSCOPE_OTEL_EXPORT_MODEL_H
#define PYROSCOPE_OTEL_EXPORT_MODEL_H

#include <stddef.h>
#include <stdint.h>

typedef struct po_u64map {
    uint64_t *keys;
    uint32_t *vals; /* value + 1; 0 = empty */
    uint32_t mask, used;
} po_u64map;

typedef struct po_model {
    /* strings: id 0 is "" as pprof requires */
    char **str;
    uint32_t *str_len;
    uint64_t *str_hash;
    uint32_t n_str, cap_str;
    uint32_t *str_index;
    uint32_t str_mask;
    /* functions and locations, deduplicated through u64 keys */
    uint32_t (*fn)[2]; /* name, file */
    uint32_t n_fn, cap_fn;
    po_u64map fn_map;
    struct po_loc { uint32_t fn; int32_t line; } *loc;
    uint32_t n_loc, cap_loc;
    po_u64map loc_map;
    /* stacks, each stored once however many samples have it: location numbers, leaf first */
    struct po_xstack { uint32_t loc_off, n_loc; } *stk;
    uint32_t n_stk, cap_stk;
    uint32_t *locids;
    uint32_t n_locids, cap_locids;
    /* samples */
    struct po_xsample { uint32_t stack, lab_off, n_lab; int64_t cpu_ns, wall_ns; } *smp;
    uint32_t n_smp, cap_smp;
    uint32_t *labs; /* (key, value) string ids */
    uint32_t n_labs, cap_labs;
    int64_t time_nanos, duration_nanos, period;
    size_t approx_bytes; /* what the model holds, for the queue's byte cap */
    int oom;             /* an allocation failed: the model is incomplete, drop it */
    int wall;            /* profile type :wall, or a sample with wall ns (set by po_model_sample):
                          * profiles get the second sample type */
} po_model;

void po_model_init(po_model *m);
void po_model_free(po_model *m);
uint32_t po_model_string(po_model *m, const char *s, size_t len); /* copies, UTF-8 scrubbed */
uint32_t po_model_function(po_model *m, uint32_t name, uint32_t file);
uint32_t po_model_location(po_model *m, uint32_t fn, int32_t line);
/* room for that many more stacks and location numbers, allocated once: a window's stacks
 * can take megabytes, which growing by doubling would hold twice over; 0 or -1 (oom) */
int po_model_reserve_stacks(po_model *m, uint32_t stacks, uint32_t locids);
/* adds a stack (locs leaf first); its number, UINT32_MAX when out of memory */
uint32_t po_model_stack(po_model *m, const uint32_t *locs, uint32_t n_loc);
/* adds a sample of a stack; labs (key, value) string id pairs */
void po_model_sample(po_model *m, uint32_t stack, const uint32_t *labs, uint32_t n_lab, int64_t cpu_ns, int64_t wall_ns);

#define PO_SERVER_MAX_DEPTH 1000
#define PO_SERVER_MAX_SAMPLES 16000
#define PO_SERVER_MAX_BYTES (4u << 20)

/* Sample types of a profile: a model with wall values packs both by default (files, the
 * encoder); an upload to Pyroscope sends them as two profiles (pprof.c says why). */
#define PO_TYPE_CPU 1
#define PO_TYPE_WALL 2
#define PO_TYPES_OF(m) ((m)->wall ? PO_TYPE_CPU | PO_TYPE_WALL : PO_TYPE_CPU)
/* pprof.c: the profile of samples [from, to) as packed pprof bytes, with those sample types
 * (samples without a value of them left out); NULL on failure */
uint8_t *po_pprof_pack(const po_model *m, uint32_t from, uint32_t to, int types, size_t *len);
int po_pprof_has(const po_model *m, uint32_t from, uint32_t to, int types); /* a sample with such a value */
/* the split of all samples into profiles within the server's limits: fills bounds with
 * ascending sample indexes ending at n_smp; returns their count (0 on failure) */
uint32_t po_pprof_split(const po_model *m, uint32_t **bounds);
/* gzip (zlib, level 6) of buf; NULL on failure */
uint8_t *po_gzip(const uint8_t *buf, size_t len, size_t *out_len);

#endif
