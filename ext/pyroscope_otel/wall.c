/*
 * wall.c — wall time (profile type :wall, Ruby >= 3.2): every nanosecond of a tracked
 * thread's time while it is kept (below) is charged once, to (stack, labels), as the
 * sample's second value beside its CPU.
 *
 * A thread's time is cut by its GVL hand-overs, which the thread event hooks report
 * (thread_events.c):
 *   holding the GVL  RESUMED to SUSPENDED: its on-CPU wall (or time the kernel ran
 *                    something else while it held the GVL). Charged with its CPU: a timer
 *                    sample, a deferred sample or a tail takes the wall since the last
 *                    such charge (po_wall_on_gvl_locked), so it lands where CPU samples
 *                    land, weighted as they are.
 *   blocked          SUSPENDED to READY: IO, sleep, a lock, a C call that released the GVL.
 *   waiting for GVL  READY to RESUMED: another thread held it.
 * SUSPENDED and READY run without the GVL (on 3.3+ maybe on another native thread): they
 * only store the moment (monotonic clock, vDSO: no system call), no lock, no Ruby. RESUMED
 * runs on the thread, with the GVL, before any Ruby code continues: its stack is still the
 * one that released the GVL, so its blocked time goes there (the blocking call's frame
 * the leaf: IO#read, Kernel#sleep, PG::Connection#exec) and its wait for the GVL there
 * under a synthetic "(waiting for GVL)" leaf.
 *
 * Cost per hand-over is constant: a clock read and a store at SUSPENDED and READY; at
 * RESUMED a clock read, the lock and a few additions. The one cost that grows with the
 * stack, a walk (~1-6 µs), happens only when the thread's waits since its last walk reach
 * a threshold drawn uniformly in 0.5-1.5 ms (PO_WALL_WALK_NS): a wait that long is walked
 * at once and charged exactly; shorter ones are carried and charged with the wait whose
 * walk crosses the threshold. That is the CPU timer's estimator (a sample weighs the time
 * since the previous one): a stack's expected wall is its share of the waits, and the
 * random threshold cannot phase-lock with periodic waits. Measured alternative: walking
 * every hand-over costs a walk per socket read in a web server (µs-long waits).
 *
 * Label changes, fiber switches, exits: po_wall_tail_locked gives account.c everything not
 * charged yet under the old labels (the GVL stretch since the last charge and the carried
 * waits), charged with the CPU tail. So a span's wall total is the time from its labels'
 * set to their removal: its duration.
 * Fibers: a fiber with labels of its own (a span, tags) is charged the time it was
 * suspended when it runs again (po_wall_fiber_resumed_locked), to the stack it resumes at
 * (a fiber scheduler's task waiting on IO: the IO call, under the scheduler's io_wait) and
 * in its own labels: such a fiber's wall is its own, as each thread's is.
 *
 * Kept: with wall_all, every tracked thread's wall; by default only while the thread has
 * labels (a span, tags): a pool's idle workers waiting on their queue would fill a wall
 * profile, and are outside every span; they cost no walk either.
 *
 * Contexts: the hooks as above; the rest under po_lock (HANDLER for po_wall_on_gvl_locked,
 * GVL, NOGVL for exits). Memory: one stack buffer, allocated at start.
 * Calls go down only: aggregate, stack, the clock.
 */
#include "pyroscope_otel.h"
#include <stdlib.h>

#define PO_WALL_WALK_NS 1000000ULL

static VALUE *frames;
static int *lines;
static int frames_depth;
static uint64_t rng = 0x9e3779b97f4a7c15ULL; /* under po_lock */
static uint64_t started_ns;                   /* the last start: older moments are void */
static int wall_on, wall_all, depth;          /* set at start, while stopped */

int po_wall_enabled(void)
{
    return wall_on;
}

void po_wall_start(int max_depth, int on, int all)
{
    started_ns = po_monotonic_ns();
    wall_on = on;
    wall_all = all;
    depth = max_depth;
    if (frames_depth == max_depth) return;
    free(frames);
    free(lines);
    size_t n = (size_t)max_depth + 2 + PO_MAX_SKIP; /* a capture, and the synthetic leaf before it */
    frames = malloc(n * sizeof(VALUE));
    lines = malloc(n * sizeof(int));
    if (!frames || !lines) {
        free(frames);
        free(lines);
        frames = NULL;
        lines = NULL;
        frames_depth = 0;
        rb_raise(rb_eNoMemError, "pyroscope: cannot allocate the wall stack buffer for max_depth=%d", max_depth);
    }
    frames_depth = max_depth;
}

static uint64_t next_walk(void)
{
    return PO_WALL_WALK_NS / 2 + po_xorshift64(&rng) % PO_WALL_WALK_NS;
}

static int kept(const po_thread *t)
{
    return wall_on && (wall_all || t->labels);
}

void po_wall_register_locked(po_thread *t)
{
    t->wall_at_ns = po_monotonic_ns();
    t->wall_held_ns = t->wall_carry_ns = t->wall_carry_gvl_ns = 0;
    t->wall_walk_at_ns = next_walk();
    t->wall_suspended_ns = t->wall_ready_ns = 0;
}

uint64_t po_wall_on_gvl_locked(po_thread *t)
{
    if (!wall_on) return 0;
    uint64_t now = po_monotonic_ns();
    uint64_t w = t->wall_held_ns + (now > t->wall_at_ns ? now - t->wall_at_ns : 0);
    t->wall_held_ns = 0;
    t->wall_at_ns = now;
    return kept(t) ? w : 0;
}

uint64_t po_wall_tail_locked(po_thread *t, int on_gvl)
{
    if (!wall_on) return 0;
    uint64_t now = po_monotonic_ns();
    uint64_t w = t->wall_held_ns + t->wall_carry_ns + t->wall_carry_gvl_ns;
    if (on_gvl && now > t->wall_at_ns) w += now - t->wall_at_ns;
    t->wall_held_ns = t->wall_carry_ns = t->wall_carry_gvl_ns = 0;
    t->wall_at_ns = now;
    return kept(t) ? w : 0;
}

/* Under po_lock, on t's thread holding the GVL: the carried waits to the stack here (the
 * one that released the GVL, or where a fiber resumed), the wait for the GVL under its
 * synthetic leaf. Kept carried when there is no stack to walk. */
static void charge_here_locked(po_thread *t)
{
    if (!frames) return;
    int n = po_stack_capture(frames + 1, lines + 1, depth, 0);
    if (n <= 0) return;
    if (t->wall_carry_ns) {
        uint32_t stack = po_agg_intern_stack(po_active, frames + 1, lines + 1, n);
        po_agg_add_wall(po_active, po_agg_record_stack(po_active, stack, t->labels, 0, 0), t->wall_carry_ns);
    }
    if (t->wall_carry_gvl_ns) {
        frames[0] = PO_FRAME_SYNTHETIC;
        lines[0] = PO_LINE_GVL_WAIT;
        uint32_t stack = po_agg_intern_stack(po_active, frames, lines, n + 1);
        po_agg_add_wall(po_active, po_agg_record_stack(po_active, stack, t->labels, 0, 0), t->wall_carry_gvl_ns);
    }
    t->wall_carry_ns = t->wall_carry_gvl_ns = 0;
}

static void charge_wait_locked(po_thread *t, uint64_t blocked, uint64_t waited)
{
    t->wall_carry_ns += blocked;
    t->wall_carry_gvl_ns += waited;
    if (t->wall_carry_ns + t->wall_carry_gvl_ns < t->wall_walk_at_ns) return;
    t->wall_walk_at_ns = next_walk();
    charge_here_locked(t);
}

void po_wall_suspended(po_thread *t)
{
    if (!t->wall_suspended_ns) t->wall_suspended_ns = po_monotonic_ns(); /* may repeat on 3.2: the first */
    t->wall_ready_ns = 0;
}

void po_wall_ready(po_thread *t)
{
    if (t->wall_suspended_ns && !t->wall_ready_ns) t->wall_ready_ns = po_monotonic_ns();
}

void po_wall_resumed(po_thread *t)
{
    uint64_t s = t->wall_suspended_ns, r = t->wall_ready_ns;
    t->wall_suspended_ns = t->wall_ready_ns = 0;
    if (!s) return;
    uint64_t now = po_monotonic_ns();
    po_lock();
    /* s before the thread's last charge: a release from before it was registered */
    if (po_active && t->tracked && s >= t->wall_at_ns && s <= now) { /* a stop untracks every thread */
        t->wall_held_ns += s - t->wall_at_ns;
        t->wall_at_ns = now;
        uint64_t ready = r >= s && r <= now ? r : now; /* no READY seen: all of it blocked */
        if (kept(t)) charge_wait_locked(t, ready - s, now - ready);
    }
    po_unlock();
}

void po_wall_fiber_resumed_locked(po_thread *t, po_fiber_labels *f)
{
    uint64_t s = f->suspended_ns;
    f->suspended_ns = 0;
    if (!wall_on || !s || s < started_ns || !(wall_all || f->own) || !kept(t)) return;
    uint64_t now = po_monotonic_ns();
    if (now > s) charge_wait_locked(t, now - s, 0);
}

void po_wall_fiber_suspended_locked(po_fiber_labels *f)
{
    f->suspended_ns = wall_on ? po_monotonic_ns() : 0;
}
