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
 * Contexts: arm on the GVL (registration), disarm under po_lock on the GVL or NOGVL
 * (stop, thread exit). Nothing here runs in the handler.
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

    /* The first expiry is spread over one interval by tid so that threads started
     * together do not sample in lockstep. */
    struct itimerspec its;
    long first = interval_ns - (long)((unsigned)t->tid * 2654435761u % (unsigned long)interval_ns) / 2;
    its.it_interval.tv_sec = interval_ns / 1000000000L;
    its.it_interval.tv_nsec = interval_ns % 1000000000L;
    its.it_value.tv_sec = first / 1000000000L;
    its.it_value.tv_nsec = first % 1000000000L;
    if (timer_settime(timer, 0, &its, NULL) != 0) {
        int e = errno;
        timer_delete(timer);
        return e;
    }
    t->timer = timer;
    t->has_timer = 1;
    return 0;
}

void po_timer_disarm(po_thread *t)
{
    if (!t->has_timer) return;
    timer_delete(t->timer);
    t->has_timer = 0;
}
