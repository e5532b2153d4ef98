/*
 * thread_state.c — the table of threads the profiler knows: their label slot, CPU timer
 * and CPU time already accounted.
 *
 * The table is a fixed array so that the handler can reach its thread's entry by index
 * (the timer's sigev_value) without a lookup structure that could be resized under it.
 * An entry is claimed when a thread is registered for sampling or first gets labels and
 * released when the thread exits (thread_events.c) or a fork leaves it behind. Entries are
 * reused, so the handler checks that the entry's tid is its own before using it.
 *
 * Finding a thread's entry: the handler by index (above); Ruby >= 3.3 by the Ruby thread,
 * through rb_internal_thread_specific_* (its thread event hooks may run on another native
 * thread than the thread they are about, so nothing native-thread-local would do);
 * Ruby 3.1 and 3.2 through a thread-local cache, their hooks running on the thread itself.
 * Either way the entry's tid is checked on use, since entries are reused (and Ruby's thread
 * cache reuses a native thread for a later Ruby thread).
 *
 * Contexts: lookups and claims run on the GVL or, for exiting threads on Ruby >= 3.2,
 * NOGVL; every change to an entry's fields happens under po_lock.
 */
#include "pyroscope_otel.h"
#include <errno.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

po_thread po_threads[PO_MAX_THREADS];
uint64_t po_threads_refused;
static int high_water; /* entries at or above it have never been used */

static __thread po_thread *tls_self;
static __thread pid_t tls_tid;

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

pid_t po_gettid(void)
{
    return (pid_t)syscall(SYS_gettid);
}

/* Linux encodes a thread's CPU clock id from its tid (what glibc's pthread_getcpuclockid
 * computes); it lets us read and time threads we know only by Thread#native_thread_id. */
static clockid_t thread_clock(pid_t tid)
{
    return (clockid_t)((~(unsigned)tid << 3) | 6); /* CPUCLOCK_PERTHREAD_MASK | CPUCLOCK_SCHED */
}

clockid_t po_thread_clock(pid_t tid)
{
    return thread_clock(tid);
}

uint64_t po_thread_cpu_ns(pid_t tid)
{
    struct timespec ts;
    if (clock_gettime(thread_clock(tid), &ts) != 0) return 0;
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static po_thread *find_locked(pid_t tid)
{
    for (int i = 0; i < high_water; i++)
        if (po_threads[i].tid == tid) return &po_threads[i];
    return NULL;
}

po_thread *po_thread_by_tid(pid_t tid, int create)
{
    if (tid <= 0) return NULL;
    po_lock();
    po_thread *t = find_locked(tid);
    if (!t && create) {
        for (int i = 0; i < PO_MAX_THREADS; i++) {
            if (po_threads[i].tid == 0) {
                t = &po_threads[i];
                memset(t, 0, sizeof(*t));
                t->tid = tid;
                t->last_cpu_ns = po_thread_cpu_ns(tid);
                if (i >= high_water) high_water = i + 1;
                break;
            }
        }
        if (!t) po_threads_refused++;
    }
    po_unlock();
    return t;
}

po_thread *po_thread_current(int create)
{
    if (!tls_tid) tls_tid = po_gettid();
#ifdef HAVE_RB_INTERNAL_THREAD_SPECIFIC_KEY_CREATE
    VALUE thread = rb_thread_current();
    po_thread *t = po_thread_of(thread);
    if (t && t->tid == tls_tid) return t;
    t = po_thread_by_tid(tls_tid, create);
    if (t) po_thread_bind(thread, t);
#else
    po_thread *t = tls_self;
    if (t && t->tid == tls_tid) return t;
    t = po_thread_by_tid(tls_tid, create);
#endif
    tls_self = t;
    return t;
}

pid_t po_current_tid(void)
{
    if (!tls_tid) tls_tid = po_gettid();
    return tls_tid;
}

po_thread *po_thread_cached(void)
{
    if (!tls_tid) tls_tid = po_gettid();
#ifdef HAVE_RB_INTERNAL_THREAD_SPECIFIC_KEY_CREATE
    po_thread *t = po_thread_of(rb_thread_current());
#else
    po_thread *t = tls_self;
#endif
    return t && t->tid == tls_tid ? t : NULL;
}

void po_thread_release(po_thread *t)
{
    po_timer_disarm(t);
    po_fiber_labels_detach(t);
    po_labelset_unref(t->labels);
    po_labelset_unref(t->base);
    po_labelset_unref(t->prev_labels);
    memset(t, 0, sizeof(*t));
}

void po_thread_forget_current(void)
{
    pid_t tid = tls_tid ? tls_tid : po_gettid();
    po_lock();
    po_thread *t = find_locked(tid);
    if (t) po_thread_exit_locked(t);
    po_unlock();
    tls_self = NULL;
}

size_t po_threads_in_use(void)
{
    size_t n = 0;
    for (int i = 0; i < high_water; i++) n += po_threads[i].tid != 0;
    return n;
}

/* Only the forking thread lives on in the child, with a new tid and no timers (POSIX
 * timers are not inherited); its labels stay, everyone else's entries go. */
void po_threads_after_fork_child(void)
{
    pid_t self = po_gettid();
    po_thread *mine = tls_self && tls_self->tid == tls_tid ? tls_self : NULL;
    for (int i = 0; i < high_water; i++) {
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
            po_fiber_labels_detach(t);
            po_labelset_unref(t->labels);
            po_labelset_unref(t->base);
            po_labelset_unref(t->prev_labels);
            memset(t, 0, sizeof(*t));
        }
    }
    tls_tid = self;
}
