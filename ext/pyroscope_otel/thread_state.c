/*
 * thread_state.c — the table of threads the profiler knows: whose entry is whose, found
 * how, and released when. The entry holds each concern's per-thread state (label slot,
 * timer, GVL flags, CPU accounting); this file owns only the entry's identity and life.
 * It sits above accounting: an entry found to belong to an ended thread is charged its
 * last CPU (po_account_exit_locked) before it is released.
 *
 * The table is a fixed array so that the handler can reach its thread's entry by index
 * (the timer's sigev_value) without a lookup structure that could be resized under it.
 * An entry is claimed when a thread is registered for sampling or first gets labels and
 * released when the thread exits (thread_events.c), when its end is noticed later (below),
 * or when a fork leaves it behind. Entries are reused, so the handler checks that the
 * entry's tid is its own before using it, and again under po_lock (account.c): an entry
 * may be released by another thread than its own.
 *
 * Each entry names its owner, the Ruby Thread it belongs to (marked, so pinned), because
 * a tid alone does not tell threads apart: Ruby's thread cache (3.1) runs a later Ruby
 * thread on the native thread of an ended one, with the same tid, and the kernel reuses
 * tids. An entry is its owner's only: a lookup that finds its tid's entry owned by
 * another Ruby thread releases it (on the calling native thread, that thread has ended:
 * a native thread runs one Ruby thread at a time), so a new thread never inherits an
 * ended one's labels, timer or CPU accounting. Ends nothing reports (Ruby 3.1: threads
 * that raise or are killed, Timeout's watchers) are found by a sweep asking owners
 * Thread#alive? (3.1 only; on >= 3.2 the EXITED hook sees every end).
 *
 * Finding a thread's entry: the handler by index (above); Ruby >= 3.3 by the Ruby thread,
 * through rb_internal_thread_specific_* (its thread event hooks may run on another native
 * thread than the thread they are about, so nothing native-thread-local would do);
 * Ruby 3.1 and 3.2 through a thread-local cache, their hooks running on the thread itself.
 * Either way the entry's tid and owner are checked on use.
 *
 * Contexts: lookups and claims run on the GVL or, for the calling thread, in thread event
 * hooks on Ruby >= 3.2 (no Ruby method is called on that path); exiting threads' entries
 * are released NOGVL on Ruby >= 3.2. The sweep and lookups of another thread's entry
 * call Thread#alive? and #native_thread_id: GVL, outside po_lock, never in a thread event
 * hook. Every change to an entry's fields happens under po_lock.
 */
#include "pyroscope_otel.h"
#include <errno.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

po_thread po_threads[PO_MAX_THREADS];
uint64_t po_threads_refused;
int po_threads_high_water; /* entries at or above it have never been used */

static __thread po_thread *tls_self;

#ifdef HAVE_RB_INTERNAL_THREAD_SPECIFIC_KEY_CREATE
#include <ruby/thread.h>
static rb_internal_thread_specific_key_t slot_key;

void po_thread_keys_init(void)
{
    slot_key = rb_internal_thread_specific_key_create();
}

po_thread *po_thread_of(VALUE thread)
{
    return rb_internal_thread_specific_get(thread, slot_key);
}

void po_thread_bind(VALUE thread, po_thread *t)
{
    rb_internal_thread_specific_set(thread, slot_key, t);
}
#else
void po_thread_keys_init(void) {}
#endif

static po_thread *find_locked(pid_t tid)
{
    for (int i = 0; i < po_threads_high_water; i++)
        if (po_threads[i].tid == tid) return &po_threads[i];
    return NULL;
}

/* Under po_lock: a free entry for Ruby thread `owner` on native thread `tid`, or NULL when
 * the table is full. */
static po_thread *claim_locked(VALUE owner, pid_t tid)
{
    for (int i = 0; i < PO_MAX_THREADS; i++) {
        po_thread *t = &po_threads[i];
        if (t->tid) continue;
        memset(t, 0, sizeof(*t));
        t->tid = tid;
        t->index = i;
        t->owner = owner;
        t->last_cpu_ns = po_thread_cpu_ns(tid);
        if (i >= po_threads_high_water) po_threads_high_water = i + 1;
        return t;
    }
    return NULL;
}

/* GVL, not under po_lock: Thread#alive?. A method call: it may run interrupts, so other
 * threads may run (and claim or release entries) before it returns. */
static int thread_alive(VALUE thread)
{
    static ID id_alive_p;
    if (!id_alive_p) id_alive_p = rb_intern("alive?");
    return RTEST(rb_funcall(thread, id_alive_p, 0));
}

#ifndef HAVE_RB_INTERNAL_THREAD_ADD_EVENT_HOOK
/* Ruby 3.1: nothing reports the end of a thread that raised or was killed (:thread_end
 * fires only for threads that return), and Timeout.timeout kills its watcher thread at
 * every call. Entries of a native thread that a new Ruby thread reuses go at the new
 * thread's first lookup (entry_of_self), the common case: Ruby's thread cache hands the
 * next thread an ended one's native thread. The others are released by a sweep that asks
 * each owner Thread#alive? (owners are marked, so asking never touches a freed object):
 * before a claim once every `sweep_every` claims, a sixteenth of the entries the last
 * sweep kept, so that ended threads' entries stay under a sixteenth of the live ones;
 * before refusing a claim when the table is full; and when stats are read (their
 * `threads` counts live threads). A sweep costs 45-120 ns per entry (measured, 100 to
 * 4 000 entries): ~1-2 us per claim amortized, next to the 30-60 us of CPU it takes to
 * start a Ruby thread (no difference measured in that cost). */
static unsigned claims_since_sweep, sweep_every = 1;

/* GVL, not under po_lock, never in a thread event hook: calls Thread#alive?. The entry is
 * released from this thread while the dead thread's native thread may still be running
 * (finishing, or parked in Ruby's thread cache); its handler checks the tid again under
 * po_lock (account.c), so a late signal cannot use an entry released under it. */
static void sweep_ended(void)
{
    unsigned kept = 0;
    po_lock();
    int n = po_threads_high_water;
    po_unlock();
    for (int i = 0; i < n; i++) {
        po_lock();
        VALUE owner = po_threads[i].tid ? po_threads[i].owner : Qfalse;
        po_unlock();
        if (!RTEST(owner)) continue;
        if (thread_alive(owner)) { /* `owner` is on this stack: GC keeps it even if released meanwhile */
            kept++;
            continue;
        }
        po_lock();
        if (po_threads[i].tid && po_threads[i].owner == owner) {
            po_account_exit_locked(&po_threads[i]);
            po_thread_release(&po_threads[i]);
        }
        po_unlock();
    }
    claims_since_sweep = 0;
    sweep_every = kept / 16 + 1;
}

/* 1 when it swept: a full table then holds live threads only */
static int sweep_when_due(void)
{
    if (claims_since_sweep < sweep_every) return 0;
    sweep_ended();
    return 1;
}
#define SWEEP_WHEN_DUE() sweep_when_due()
#define SWEEP_NOW() sweep_ended()
#define COUNT_CLAIM() (claims_since_sweep++)
#else
/* Ruby >= 3.2: the EXITED hook releases every thread's entry, whichever way it ends: a
 * full table holds live threads only, there is nothing to sweep. */
#define SWEEP_WHEN_DUE() 1
#define SWEEP_NOW() ((void)0)
#define COUNT_CLAIM() ((void)0)
#endif

/* Under po_lock: `thread`'s entry on native thread `tid`, claimed when `create`; NULL
 * when there is none (or no room), and *taken when tid's entry belongs to another Ruby
 * thread that has not ended (`drop` 0) or that has ended (`drop` 1: it is released, its
 * CPU charged). Under M:N threads (3.3+, where sampling is refused) Ruby threads share
 * native threads, so another owner's entry is shared, as it always was. */
static po_thread *lookup_locked(VALUE thread, pid_t tid, int create, int drop, int *taken)
{
    po_thread *t = find_locked(tid);
    *taken = 0;
    if (t && t->owner != thread && !po_mn_threads_enabled()) {
        if (!drop) {
            *taken = 1;
            return NULL;
        }
        po_account_exit_locked(t);
        po_thread_release(t);
        t = NULL;
    }
    if (!t && create) {
        t = claim_locked(thread, tid);
        if (t) COUNT_CLAIM();
    }
    return t;
}

/* GVL: lookup_locked under po_lock. When the table is full and no sweep ran in this call
 * (`swept` 0), one sweep (3.1) and a retry; then the refusal is counted. */
static po_thread *lookup(VALUE thread, pid_t tid, int create, int drop, int swept)
{
    int taken;
    for (;;) {
        po_lock();
        po_thread *t = lookup_locked(thread, tid, create, drop, &taken);
        if (!t && create && !taken && swept) po_threads_refused++;
        po_unlock();
        if (t || !create || taken || swept) return t;
        SWEEP_NOW();
        swept = 1;
    }
}

/* The calling Ruby thread's entry (GVL, or a thread event hook about the calling thread on
 * Ruby >= 3.2, where no Ruby method is called: the sweep is 3.1's). An entry of this
 * native thread owned by another Ruby thread was left by one that ran here before and has
 * ended unseen (a native thread runs one Ruby thread at a time, and this one runs us): it
 * is released, never inherited. */
static po_thread *entry_of_self(VALUE thread, pid_t tid, int create)
{
    int swept = create ? SWEEP_WHEN_DUE() : 0;
    return lookup(thread, tid, create, 1, swept);
}

po_thread *po_thread_current(int create)
{
    pid_t tid = po_current_tid();
    VALUE thread = rb_thread_current();
#ifdef HAVE_RB_INTERNAL_THREAD_SPECIFIC_KEY_CREATE
    po_thread *t = po_thread_of(thread);
#else
    po_thread *t = tls_self;
#endif
    if (t && t->tid == tid && t->owner == thread) return t;
    t = entry_of_self(thread, tid, create);
#ifdef HAVE_RB_INTERNAL_THREAD_SPECIFIC_KEY_CREATE
    if (t) po_thread_bind(thread, t);
#endif
    tls_self = t;
    return t;
}

po_thread *po_thread_of_thread(VALUE thread, int create)
{
    if (thread == rb_thread_current()) return po_thread_current(create);
    int swept = create ? SWEEP_WHEN_DUE() : 0;
    /* its tid read after any sweep, whose method calls may switch threads */
    static ID id_native_thread_id;
    if (!id_native_thread_id) id_native_thread_id = rb_intern("native_thread_id");
    VALUE v = rb_funcall(thread, id_native_thread_id, 0);
    if (NIL_P(v)) return NULL; /* not started, or ended */
    long id = NUM2LONG(v);
    if (id <= 0 || id > INT32_MAX) return NULL;
    pid_t tid = (pid_t)id;

    /* Another owner's entry on that tid: unlike on the thread itself, whether its owner
     * ended takes asking. Alive, it runs there now: `thread` has ended since its tid was
     * read (a method call may switch threads), and has nothing to label. */
    po_lock();
    po_thread *t = find_locked(tid);
    VALUE owner = t && t->owner != thread && !po_mn_threads_enabled() ? t->owner : Qfalse;
    po_unlock();
    if (RTEST(owner)) {
        if (thread_alive(owner)) return NULL;
        po_lock();
        t = find_locked(tid);
        if (t && t->owner == owner) {
            po_account_exit_locked(t);
            po_thread_release(t);
        }
        po_unlock();
    }
    t = lookup(thread, tid, create, 0, swept);
    if (!t || !create) return t;
#ifdef HAVE_RB_INTERNAL_THREAD_SPECIFIC_KEY_CREATE
    /* bound, so that its EXITED hook releases the entry (3.3+ finds entries by thread) */
    po_thread_bind(thread, t);
#endif
    /* It may have ended since its tid was read, its exit hook (3.2+) finding no entry:
     * released here then, not left behind. */
    if (!thread_alive(thread)) {
        po_lock();
        if (t->tid == tid && t->owner == thread) {
            po_account_exit_locked(t);
            po_thread_release(t);
        }
        po_unlock();
#ifdef HAVE_RB_INTERNAL_THREAD_SPECIFIC_KEY_CREATE
        po_thread_bind(thread, NULL);
#endif
        return NULL;
    }
    return t;
}

void po_threads_sweep(void)
{
#ifndef HAVE_RB_INTERNAL_THREAD_ADD_EVENT_HOOK
    sweep_ended();
#endif
}

po_thread *po_thread_cached(void)
{
    VALUE thread = rb_thread_current();
#ifdef HAVE_RB_INTERNAL_THREAD_SPECIFIC_KEY_CREATE
    po_thread *t = po_thread_of(thread);
#else
    po_thread *t = tls_self;
#endif
    return t && t->tid == po_current_tid() && t->owner == thread ? t : NULL;
}

/* GC mark phase, in one pass up to the high-water mark (not all 4 096 entries at every
 * GC): entries' owners and the objects of the fibers running on them (label_slots.c).
 * Owners marked, hence pinned: compaction never moves them, so comparing an owner with a
 * Thread stays an identity test, and an owner is never freed (and its address reused by a
 * new Thread) while an entry names it. */
void po_threads_mark(void)
{
    po_lock();
    for (int i = 0; i < po_threads_high_water; i++) {
        po_thread *t = &po_threads[i];
        if (!t->tid) continue;
        if (RTEST(t->owner)) rb_gc_mark(t->owner);
        if (t->fiber_obj) rb_gc_mark(t->fiber_obj);
    }
    po_unlock();
}

void po_thread_register_current(void)
{
    po_thread *t = po_thread_current(1);
    if (!t) return;
    po_lock();
    po_account_register_locked(t, 1);
    po_unlock();
}

void po_thread_release(po_thread *t)
{
    po_timer_disarm(t);
    po_thread_detach_fiber(t);
    po_labelset_unref(t->labels);
    po_labelset_unref(t->base);
    po_labelset_unref(t->prev_labels);
    memset(t, 0, sizeof(*t));
}

void po_thread_forget_current(void)
{
    po_lock();
    po_thread *t = find_locked(po_current_tid());
    if (t) {
        po_account_exit_locked(t);
        po_thread_release(t);
    }
    po_unlock();
    tls_self = NULL;
}

size_t po_threads_in_use(void)
{
    size_t n = 0;
    for (int i = 0; i < po_threads_high_water; i++) n += po_threads[i].tid != 0;
    return n;
}

/* Only the forking thread lives on in the child, with a new tid and no timers (POSIX
 * timers are not inherited); its labels stay, everyone else's entries go. */
void po_threads_after_fork_child(void)
{
    pid_t self = po_gettid();
    po_thread *mine = tls_self && tls_self->tid == po_current_tid() ? tls_self : NULL;
    for (int i = 0; i < po_threads_high_water; i++) {
        po_thread *t = &po_threads[i];
        if (!t->tid) continue;
        if (t == mine) {
            t->tid = self;
            t->has_timer = 0;
            t->tracked = 0;
            t->holds_gvl = 1;
            t->last_cpu_ns = po_thread_cpu_ns(self);
        } else {
            t->has_timer = 0; /* the timer died with the parent's thread */
            po_thread_detach_fiber(t);
            po_labelset_unref(t->labels);
            po_labelset_unref(t->base);
            po_labelset_unref(t->prev_labels);
            memset(t, 0, sizeof(*t));
        }
    }
    po_current_tid_after_fork_child();
}
