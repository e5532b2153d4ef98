/*
 * aggregate.c — one window's samples: (stack, label set) -> CPU ns, wall ns (profile type
 * :wall only, wall.c) and sample count.
 *
 * Written from the HANDLER, so recording never allocates: every table is allocated up
 * front with a fixed capacity derived from max_samples (a window's distinct samples). When
 * a table is full the sample is dropped and counted, with its CPU time, so that the loss
 * is visible, never silent.
 *
 * Frames are stored once per distinct stack prefix, in a prefix tree of nodes (parent
 * node, frame, line), unique per prefix; a stack is its leaf node and its depth. Deep
 * stacks share most of their frames (a Rails request: ~150 frames of server and
 * middleware above the 20-50 where requests differ), so 5 000 distinct 200-frame stacks
 * take 250 000 nodes or fewer where storing them flat took 1 000 000 frames.
 * Interning a stack, on the handler's path, costs about what hashing and comparing it
 * flat did (bench/record_cost.c; the figures are in DESIGN.md):
 *   - it is compared from the root with the last stack interned under the same root frame
 *     (a "path"): the frames they share need no hashing (the path keeps its prefixes'
 *     hashes) and no lookup;
 *   - its hash finds it among the window's stacks; a candidate is confirmed by walking
 *     its nodes up to the shared part only, nodes being unique per prefix;
 *   - a stack new to the window descends from there, looking each node up, until one is
 *     missing; the rest are appended, each right after its parent. A node right after its
 *     parent is found there, never in the index: a new stack adds one index entry at most,
 *     and a stack's own nodes lie together.
 * All of it is bounded by the depth and the tables' sizes.
 * Samples are keyed by (stack, interned label set pointer). Every table is an
 * open-addressing index over a dense array, so clearing a window touches only what it used.
 *
 * The frames are GC objects (iseqs, method entries); po_agg_mark marks every node's frame
 * with rb_gc_mark, which also pins it, so they stay valid and unmoved through GC and
 * compaction until the window is taken and cleared.
 *
 * Memory per buffer (there are two: one written, one taken), allocated at init; pages are
 * touched only as they are used. At the default max_samples of 65 536: samples 2 MiB and
 * their index 0.5 MiB, stacks 1 MiB + 0.5 MiB, nodes (8 per sample slot, 524 288: as many
 * as the flat arena had frames) 8 MiB + 0.5 MiB, paths and scratch 0.25 MiB; 12.75 MiB.
 *
 * Contexts: record and clear under po_lock (HANDLER or GVL); init/free on the GVL while
 * no handler can reach the buffer; mark in the GC's mark phase, under po_lock; reading the
 * stacks of a taken buffer, which no handler writes, on the GVL without the lock.
 */
#include "pyroscope_otel.h"
#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Frame nodes per sample slot: as many as the flat arena this replaced had frames, so that
 * no window that fitted then is dropped now (a tree never has more nodes than its stacks
 * have frames); 5 000 stacks may have 100 frames each of their own. */
#define NODES_PER_SAMPLE 8
#define NO_NODE UINT32_MAX

typedef struct po_node {
    VALUE frame;
    uint32_t parent; /* NO_NODE for a root frame */
    int32_t line;
} po_node;

/* The last stack interned from one root frame, root first: its nodes and the hashes of
 * its prefixes. A stack's root side is nearly always that of a recent one (the thread's
 * entry, the server, the framework): compared with it, it needs no hashing or lookup. One
 * per root frame (by its hash, PATHS of them), as threads of different kinds (and the
 * "(garbage collection)" frame) share nothing: alternating, they would find no prefix. */
#define PATH_BITS 2
#define PATHS (1 << PATH_BITS)
typedef struct po_path {
    uint32_t len;
    uint32_t node[PO_MAX_STACK];
    uint64_t hash[PO_MAX_STACK];
} po_path;

typedef struct po_stack {
    uint32_t leaf;  /* its leaf-most frame's node; NO_NODE for an empty stack */
    uint32_t depth;
    uint32_t tag;   /* the hash's high half: a lookup walks the nodes of equal tags only */
    uint32_t slot;  /* position in the hash index, to clear it without a rescan */
} po_stack;

static uint64_t last_epoch; /* GVL or under po_lock; never reset, not even by fork */

static uint32_t pow2_at_least(uint64_t n)
{
    uint32_t p = 16;
    while (p < n) p <<= 1;
    return p;
}

int po_agg_init(po_agg *a, uint32_t max_samples)
{
    memset(a, 0, sizeof(*a));
    a->epoch = ++last_epoch;
    a->samples_cap = max_samples;
    a->stacks_cap = max_samples;
    a->nodes_cap = max_samples * NODES_PER_SAMPLE;
    a->sample_index_mask = pow2_at_least((uint64_t)max_samples * 2) - 1;
    a->stack_index_mask = a->sample_index_mask;
    a->node_index_mask = a->stack_index_mask; /* at most one node per stack is in it */
    a->node_index_shift = 64 - __builtin_popcount(a->node_index_mask);
    a->nodes = calloc(a->nodes_cap, sizeof(po_node));
    a->node_index = calloc(a->node_index_mask + 1, sizeof(uint32_t));
    a->stacks = calloc(a->stacks_cap, sizeof(po_stack));
    a->stack_index = calloc(a->stack_index_mask + 1, sizeof(uint32_t));
    a->samples = calloc(a->samples_cap, sizeof(po_sample));
    a->sample_index = calloc(a->sample_index_mask + 1, sizeof(uint32_t));
    a->paths = calloc(PATHS, sizeof(po_path));
    a->copy_frames = calloc(PO_MAX_STACK, sizeof(VALUE));
    a->copy_lines = calloc(PO_MAX_STACK, sizeof(int));
    if (!a->nodes || !a->node_index || !a->stacks || !a->stack_index || !a->samples || !a->sample_index ||
        !a->paths || !a->copy_frames || !a->copy_lines) {
        po_agg_free(a);
        return ENOMEM;
    }
    return 0;
}

void po_agg_free(po_agg *a)
{
    free(a->nodes);
    free(a->node_index);
    free(a->stacks);
    free(a->stack_index);
    free(a->samples);
    free(a->sample_index);
    free(a->paths);
    free(a->copy_frames);
    free(a->copy_lines);
    memset(a, 0, sizeof(*a));
}

static inline uint64_t mix(uint64_t h, uint64_t v)
{
    h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    return h;
}

static inline uint64_t finish(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return h;
}

/* one word per frame: addresses leave the top 16 bits free for the line */
static inline uint64_t frame_word(VALUE frame, int line)
{
    return (uint64_t)frame ^ ((uint64_t)(uint32_t)line << 47);
}

/* A node's position in the index: multiplicative hashing, the product's top bits, which
 * depend on every bit of the key. */
static inline uint32_t node_pos(const po_agg *a, uint32_t parent, VALUE frame, int line)
{
    return (uint32_t)(((frame_word(frame, line) + parent) * 0x9e3779b97f4a7c15ULL) >> a->node_index_shift);
}

/* The node (parent, frame, line), or NO_NODE with *slot its place in the index. A node
 * right after its parent (NO_NODE + 1 being node 0, the first root) is not in the index:
 * it is found there. */
static uint32_t find(const po_agg *a, uint32_t parent, VALUE frame, int line, uint32_t *slot)
{
    uint32_t next = parent + 1;
    if (next < a->nodes_used) {
        const po_node *n = &a->nodes[next];
        if (n->parent == parent && n->frame == frame && n->line == line) return next;
    }
    uint32_t pos = node_pos(a, parent, frame, line);
    for (uint32_t e; (e = a->node_index[pos]) != 0; pos = (pos + 1) & a->node_index_mask) {
        const po_node *n = &a->nodes[e - 1];
        if (n->parent == parent && n->frame == frame && n->line == line) return e - 1;
    }
    *slot = pos;
    return NO_NODE;
}

/* Is the stack ending at node `at` this one, given that its depth is right and its root
 * side is the path's first `shared` nodes, ending at node `base`? Nodes are unique per
 * prefix, so only the frames below `base` need comparing. Writes them to the path. */
static int same_stack(const po_agg *a, po_path *p, uint32_t at, const VALUE *frames, const int *lines, uint32_t d,
                      uint32_t shared, uint32_t base)
{
    for (uint32_t i = 0; i < d - shared; i++) {
        const po_node *n = &a->nodes[at];
        if (n->frame != frames[i] || n->line != lines[i]) return 0;
        p->node[d - 1 - i] = at;
        at = n->parent;
    }
    return at == base;
}

uint32_t po_agg_intern_stack(po_agg *a, const VALUE *frames, const int *lines, int depth)
{
    if (depth < 0 || depth > PO_MAX_STACK) return UINT32_MAX;
    uint32_t d = (uint32_t)depth;
    po_path *p = &a->paths[d ? (frame_word(frames[d - 1], lines[d - 1]) * 0x9e3779b97f4a7c15ULL) >> (64 - PATH_BITS) : 0];
    uint32_t most = p->len < d ? p->len : d, k = 0;
    /* from the root, frames[d - 1 - k] being the k-th: first what it shares with the path */
    for (; k < most; k++) {
        const po_node *n = &a->nodes[p->node[k]];
        if (n->frame != frames[d - 1 - k] || n->line != lines[d - 1 - k]) break;
    }
    uint32_t shared = k, base = shared ? p->node[shared - 1] : NO_NODE;
    uint64_t h = shared ? p->hash[shared - 1] : 0x243f6a8885a308d3ULL;
    for (; k < d; k++) p->hash[k] = h = mix(h, frame_word(frames[d - 1 - k], lines[d - 1 - k]));
    p->len = shared; /* the rest of the path is rewritten below */
    h = finish(mix(h, d));

    uint32_t tag = (uint32_t)(h >> 32), pos = (uint32_t)h & a->stack_index_mask;
    for (uint32_t e; (e = a->stack_index[pos]) != 0; pos = (pos + 1) & a->stack_index_mask) {
        const po_stack *s = &a->stacks[e - 1];
        if (s->tag == tag && s->depth == d && same_stack(a, p, s->leaf, frames, lines, d, shared, base)) {
            p->len = d;
            return e - 1;
        }
    }
    if (a->stacks_used == a->stacks_cap) return UINT32_MAX;
    /* New to the window: the nodes it has already, then its own, each after its parent.
     * Only the first of those may need an entry in the index: at most one per stack. */
    uint32_t at = base, slot = 0;
    for (k = shared; k < d; k++) {
        uint32_t n = find(a, at, frames[d - 1 - k], lines[d - 1 - k], &slot);
        if (n == NO_NODE) break;
        p->node[k] = at = n;
    }
    p->len = k;
    if (k < d) {
        if (a->nodes_cap - a->nodes_used < d - k) return UINT32_MAX;
        if (a->nodes_used != at + 1) a->node_index[slot] = a->nodes_used + 1;
        for (; k < d; k++) {
            a->nodes[a->nodes_used] = (po_node){ frames[d - 1 - k], at, lines[d - 1 - k] };
            p->node[k] = at = a->nodes_used++;
        }
        p->len = d;
    }
    uint32_t n = a->stacks_used++;
    a->stacks[n] = (po_stack){ at, d, tag, pos };
    a->stack_index[pos] = n + 1;
    return n;
}

uint32_t po_agg_stack(const po_agg *a, uint32_t stack, VALUE *frames, int *lines, uint32_t cap)
{
    const po_stack *s = &a->stacks[stack];
    uint32_t at = s->leaf;
    for (uint32_t i = 0; i < s->depth && i < cap; i++) {
        frames[i] = a->nodes[at].frame;
        lines[i] = a->nodes[at].line;
        at = a->nodes[at].parent;
    }
    return s->depth;
}

uint32_t po_agg_copy_stack(po_agg *to, const po_agg *from, uint32_t stack)
{
    uint32_t depth = po_agg_stack(from, stack, to->copy_frames, to->copy_lines, PO_MAX_STACK);
    return po_agg_intern_stack(to, to->copy_frames, to->copy_lines, (int)depth);
}

uint32_t po_agg_record(po_agg *a, const VALUE *frames, const int *lines, int depth,
                       po_labelset *labels, uint64_t cpu_ns, uint64_t count)
{
    return po_agg_record_stack(a, po_agg_intern_stack(a, frames, lines, depth), labels, cpu_ns, count);
}

uint64_t po_stat_samples_dropped;

uint32_t po_agg_record_stack(po_agg *a, uint32_t stack, po_labelset *labels, uint64_t cpu_ns, uint64_t count)
{
    if (stack == UINT32_MAX) goto drop;
    uint64_t h = finish(mix(mix(0, stack), (uint64_t)(uintptr_t)labels));
    uint32_t pos = (uint32_t)h & a->sample_index_mask;
    for (;;) {
        uint32_t e = a->sample_index[pos];
        if (e == 0) break;
        po_sample *s = &a->samples[e - 1];
        if (s->stack == stack && s->labels == labels) {
            s->cpu_ns += cpu_ns;
            s->count += count;
            return e - 1;
        }
        pos = (pos + 1) & a->sample_index_mask;
    }
    if (a->samples_used == a->samples_cap) goto drop;
    uint32_t n = a->samples_used++;
    po_sample *s = &a->samples[n];
    s->cpu_ns = cpu_ns;
    s->wall_ns = 0;
    s->count = count;
    s->labels = labels;
    s->stack = stack;
    s->slot = pos;
    po_labelset_ref(labels);
    a->sample_index[pos] = n + 1;
    return n;
drop:
    a->dropped_samples += count ? count : 1;
    a->dropped_cpu_ns += cpu_ns;
    po_stat_samples_dropped += count ? count : 1;
    return UINT32_MAX;
}

/* Empties the node index. Past about 4 entries per 4 KiB page of it, nearly every page has
 * been written already and zeroing it whole is the faster way; below, each entry is found
 * again, newest first: with linear probing, an entry's probe sequence only passes entries
 * older than itself, which are still in place when it is looked up. */
static void clear_nodes(po_agg *a)
{
    if (a->nodes_used == 0) return; /* nor any path: also a buffer never initialized */
    if (a->stacks_used > (a->node_index_mask + 1) / 256) {
        memset(a->node_index, 0, (a->node_index_mask + 1) * sizeof(uint32_t));
    } else {
        for (uint32_t id = a->nodes_used; id-- > 0;) {
            const po_node *n = &a->nodes[id];
            if (id == n->parent + 1) continue; /* not in the index */
            uint32_t pos = node_pos(a, n->parent, n->frame, n->line);
            while (a->node_index[pos] != id + 1) pos = (pos + 1) & a->node_index_mask;
            a->node_index[pos] = 0;
        }
    }
    a->nodes_used = 0;
    for (int i = 0; i < PATHS; i++) a->paths[i].len = 0;
}

void po_agg_clear(po_agg *a)
{
    for (uint32_t i = 0; i < a->samples_used; i++) {
        a->sample_index[a->samples[i].slot] = 0;
        po_labelset_unref(a->samples[i].labels);
    }
    for (uint32_t i = 0; i < a->stacks_used; i++) a->stack_index[a->stacks[i].slot] = 0;
    clear_nodes(a);
    a->samples_used = a->stacks_used = 0;
    a->dropped_samples = a->dropped_cpu_ns = a->dropped_wall_ns = 0;
    a->epoch = ++last_epoch;
}

po_sample_ref po_agg_ref(const po_agg *a, uint32_t index)
{
    return index == UINT32_MAX ? PO_NO_SAMPLE : (po_sample_ref){ a->epoch, index };
}

void po_agg_add_wall(po_agg *a, uint32_t index, uint64_t wall_ns)
{
    if (index == UINT32_MAX) a->dropped_wall_ns += wall_ns;
    else a->samples[index].wall_ns += wall_ns;
}

po_sample *po_agg_sample(po_agg *a, po_sample_ref ref)
{
    if (!a || ref.epoch != a->epoch || ref.index >= a->samples_used) return NULL;
    return &a->samples[ref.index];
}

void po_agg_mark(const po_agg *a)
{
    for (uint32_t i = 0; i < a->nodes_used; i++) rb_gc_mark(a->nodes[i].frame);
}
