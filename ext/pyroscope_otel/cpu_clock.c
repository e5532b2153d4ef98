/*
 * cpu_clock.c — thread ids and CPU clocks, the base every layer reads.
 *
 * Linux encodes a thread's CPU clock id from its tid (what glibc's pthread_getcpuclockid
 * computes), which lets us read and time threads we know only by Thread#native_thread_id.
 * A thread-CPU clock read is a system call (1.5–3 µs on the dev VMs): callers read it once
 * per event, and label changes in quick succession not at all (account.c); the monotonic
 * clock is read through the vDSO (~25 ns). po_gettid is async-signal-safe (HANDLER); po_current_tid caches it per
 * native thread for the GVL paths (label changes). And whether native threads are the
 * Ruby threads' own (not under M:N threads), which all of this assumes: Ruby >= 3.3 runs
 * the main Ractor's threads M:N when RUBY_MN_THREADS is any number above 0 (its own
 * test, atoi(...) > 0 in thread_pthread.c, read once at boot; read here once at load), and
 * every other Ractor's threads M:N always.
 */
#include "pyroscope_otel.h"
#include <ruby/ractor.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

static __thread pid_t tls_tid;

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

pid_t po_current_tid(void)
{
    if (!tls_tid) tls_tid = po_gettid();
    return tls_tid;
}

void po_current_tid_after_fork_child(void)
{
    tls_tid = po_gettid();
}

uint64_t po_realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

uint64_t po_monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int mn_threads;
/* set in the main Ractor's storage only, at load (Ruby's test for the main Ractor,
 * rb_ractor_main_p, is not public) */
static rb_ractor_local_key_t main_ractor_key;
static int main_ractor_mark;

void po_mn_threads_init(void)
{
#ifdef HAVE_RB_INTERNAL_THREAD_SPECIFIC_KEY_CREATE /* Ruby >= 3.3, which has M:N threads */
    const char *v = getenv("RUBY_MN_THREADS");
    mn_threads = v && atoi(v) > 0; /* "2" enables them as "1" does; "0" or "no" does not */
#endif
    main_ractor_key = rb_ractor_local_storage_ptr_newkey(NULL);
    rb_ractor_local_storage_ptr_set(main_ractor_key, &main_ractor_mark);
}

int po_mn_threads_enabled(void)
{
    return mn_threads;
}

int po_shares_native_thread(void)
{
    /* the extension is not Ractor-safe: no other Ractor calls it, so nothing but sampling
     * would ever reach their threads, whose native threads are shared (>= 3.3) */
    return mn_threads || rb_ractor_local_storage_ptr(main_ractor_key) != &main_ractor_mark;
}
