/*
 * bench/record_cost.c — what recording one sample costs in aggregate.c (po_agg_record,
 * the SIGPROF handler's aggregation step), in ns per record (best of 7 runs) on
 * synthetic stacks shaped like real ones: `shared` root-side frames common to all
 * stacks (a middleware chain), then frames of each stack's own.
 *
 *   new       each record is a stack the window has not seen yet (cleared between runs):
 *             the common case with deep, varied stacks (Rails)
 *   repeat    the same distinct stacks again, round robin: a stack already stored
 *   one       a single stack over and over (hot caches: the floor)
 * and new/repeat again with every other stack from a second root-side chain (two kinds of
 * thread), so that consecutive stacks share no frame at all; and cold, with the caches
 * emptied before each record, as a handler finds them after the application's work.
 *
 * Build and run against the checkout's aggregate.c (Ruby's headers only, no libruby):
 *   cc -O2 -std=gnu11 -I$(ruby -e 'print RbConfig::CONFIG["rubyhdrdir"]') \
 *      -I$(ruby -e 'print RbConfig::CONFIG["rubyarchhdrdir"]') -Iext/pyroscope_otel \
 *      bench/record_cost.c ext/pyroscope_otel/aggregate.c -o /tmp/record_cost && /tmp/record_cost
 * Under valgrind --tool=callgrind --toggle-collect=po_agg_record, `record_cost <case>
 * <depth> <chains>` runs one case once: Ir / records = instructions per record (records:
 * new 2 000, repeat 2 000 new + 10 000 repeated, one 2 001).
 */
#include "pyroscope_otel.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STACKS 2000 /* distinct stacks per window: 2 000 x 200 frames fit the old flat arena */
#define MAX_SAMPLES 65536

/* aggregate.c's only links to the rest of the extension */
void po_labelset_ref(po_labelset *ls) { (void)ls; }
void po_labelset_unref(po_labelset *ls) { (void)ls; }
void rb_gc_mark(VALUE v) { (void)v; }

static VALUE frames[STACKS][256];
static int lines[STACKS][256];

/* leaf first, as rb_profile_frames gives them: the last `shared` frames are those of
 * every stack of the same chain (one or two chains, alternating) */
static void make_stacks(int depth, int shared, int chains)
{
    for (int s = 0; s < STACKS; s++)
        for (int i = 0; i < depth; i++) {
            int from_root = depth - 1 - i;
            int own = from_root >= shared;
            frames[s][i] = (VALUE)(0x7f0000100000ULL +
                                   40ULL * (own ? 100000 + s * depth + i : (s % chains) * 10000 + from_root));
            lines[s][i] = 10 + from_root;
        }
}

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

/* cold: before each record, 4 MiB written elsewhere push the tables out of L1 and L2, as
 * the application's own work does between two samples; each record is timed alone */
static int cold;
static char evict_buf[4 << 20];
static double timed_ns, timer_ns;

static void rec(po_agg *a, int s, int depth)
{
    if (!cold) {
        po_agg_record(a, frames[s], lines[s], depth, NULL, 1000, 1);
        return;
    }
    for (size_t i = 0; i < sizeof(evict_buf); i += 64) evict_buf[i]++;
    double t0 = now_ns();
    po_agg_record(a, frames[s], lines[s], depth, NULL, 1000, 1);
    timed_ns += now_ns() - t0 - timer_ns;
}

/* ns per record of one run of `kind` */
static double run(po_agg *a, const char *kind, int depth, long *dropped)
{
    long n = 0;
    po_agg_clear(a);
    if (!strcmp(kind, "repeat"))
        for (int s = 0; s < STACKS; s++) po_agg_record(a, frames[s], lines[s], depth, NULL, 1000, 1);
    else if (!strcmp(kind, "one"))
        po_agg_record(a, frames[0], lines[0], depth, NULL, 1000, 1);
    timed_ns = 0;
    double t0 = now_ns();
    if (!strcmp(kind, "new")) {
        for (int s = 0; s < STACKS; s++, n++) rec(a, s, depth);
    } else if (!strcmp(kind, "repeat")) {
        for (int r = 0; r < 5; r++)
            for (int s = 0; s < STACKS; s++, n++) rec(a, s, depth);
    } else {
        for (int r = 0; r < STACKS; r++, n++) rec(a, 0, depth);
    }
    double t1 = now_ns();
    *dropped = (long)a->dropped_samples;
    return (cold ? timed_ns : t1 - t0) / n;
}

int main(int argc, char **argv)
{
    po_agg a;
    if (po_agg_init(&a, MAX_SAMPLES)) return 1;
    long dropped;
    if (argc == 4) { /* one case, once: for callgrind */
        int depth = atoi(argv[2]);
        make_stacks(depth, depth * 3 / 4, atoi(argv[3]));
        run(&a, argv[1], depth, &dropped);
        return 0;
    }
    static const int depths[] = { 20, 200 };
    static const struct { const char *kind; int chains, cold; } cases[] = {
        { "new", 1, 0 }, { "repeat", 1, 0 }, { "one", 1, 0 }, { "new", 2, 0 }, { "repeat", 2, 0 },
        { "new", 1, 1 }, { "repeat", 1, 1 },
    };
    for (int i = 0; i < 1000; i++) { /* the cost of reading the clock, taken off each cold record */
        double t0 = now_ns();
        timer_ns += (now_ns() - t0) / 1000;
    }
    printf("%-7s %6s %7s %6s %5s %12s %8s\n", "case", "depth", "shared", "chains", "cold", "ns/record", "dropped");
    for (unsigned d = 0; d < sizeof(depths) / sizeof(*depths); d++) {
        int depth = depths[d], shared = depth * 3 / 4;
        for (unsigned c = 0; c < sizeof(cases) / sizeof(*cases); c++) {
            make_stacks(depth, shared, cases[c].chains);
            cold = cases[c].cold;
            double best = 1e18;
            for (int r = 0; r < (cold ? 3 : 15); r++) {
                double ns = run(&a, cases[c].kind, depth, &dropped);
                if (ns < best) best = ns;
            }
            printf("%-7s %6d %7d %6d %5s %12.1f %8ld\n", cases[c].kind, depth, shared, cases[c].chains,
                   cold ? "yes" : "no", best, dropped);
        }
    }
    po_agg_clear(&a);
    po_agg_free(&a);
    return 0;
}
