/*
 * timer.c — the sampling trigger: one POSIX CPU-time timer per Ruby thread.
 *
 * Why this design: each timer runs on its thread's own CPU clock and is delivered with
 * SIGEV_THREAD_ID to that thread, so a signal means "this thread has used one more
 * interval of CPU" and lands exactly on the thread that used it. A process-wide
 * ITIMER_PROF would hit whichever thread happens to run, and a sampler thread that
 * signals the GVL holder would charge idle wall time and cost a wake-up per tick even
 * when the process is idle. Idle or blocked threads here get no signals at all, so the
 * cost scales with CPU used, not with thread count. The weight of a sample is measured,
 * not assumed (CPU time since the thread's previous sample), so merged or late signals
 * cost no accuracy. Linux only (SIGEV_THREAD_ID).
 *
 * Jitter: the kernel checks CPU timers on its scheduler tick (4 ms at HZ=250), so a fixed
 * 10 ms period becomes a fixed 8/12 ms pattern that phase-locks with periodic work: a
 * loop alternating 30 ms and 10 ms of two methods was measured at a 50:50 split instead
 * of 75:25. Each sample therefore re-arms its timer for a uniformly random 0.5..1.5
 * intervals; the mean rate is unchanged and, weights being measured, no accuracy is lost.
 *
 * Contexts: arm on the GVL (registration), disarm under po_lock on the GVL or NOGVL
 * (stop, thread exit); po_timer_rejitter in the HANDLER (timer_settime is
 * async-signal-safe), on the timer's own thread.
 */
#include "pyroscope_otel.h"
#include <errno.h>
#include <signal.h>
#include <string.h>

#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid
#endif

int po_timer_arm(po_thread *t, int slot, long interval_ns)
{
    struct sigevent sev;
    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SIGPROF;
    sev.sigev_value.sival_int = slot;
    sev.sigev_notify_thread_id = t->tid;
    timer_t timer;
    if (timer_create(po_thread_clock(t->tid), &sev, &timer) != 0) return errno;

    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    t->rng = ((uint64_t)t->tid << 32) ^ (uint64_t)now.tv_nsec ^ 0x9e3779b97f4a7c15ULL;
    t->timer = timer;
    t->interval_ns = interval_ns;
    if (po_timer_rejitter(t) != 0) {
        int e = errno;
        timer_delete(timer);
        return e;
    }
    t->has_timer = 1;
    return 0;
}

int po_timer_rejitter(po_thread *t)
{
    uint64_t x = po_xorshift64(&t->rng); /* no state outside the thread's own entry */
    long next = t->interval_ns / 2 + (long)(x % (uint64_t)t->interval_ns);
    struct itimerspec its;
    /* the period is the fallback for samples skipped before they could re-arm */
    its.it_interval.tv_sec = t->interval_ns / 1000000000L;
    its.it_interval.tv_nsec = t->interval_ns % 1000000000L;
    its.it_value.tv_sec = next / 1000000000L;
    its.it_value.tv_nsec = next % 1000000000L;
    return timer_settime(t->timer, 0, &its, NULL);
}

void po_timer_disarm(po_thread *t)
{
    if (!t->has_timer) return;
    timer_delete(t->timer);
    t->has_timer = 0;
}
