/*
 * ticker.c — the signal-free mode (no_signals: true), for libraries that cannot bear a
 * profiling signal (EINTR in old C clients, see SPEC §4).
 *
 * No timer and no SIGPROF: a native thread (all signals blocked, never the GVL, never a
 * Ruby object) wakes every interval of wall time and triggers a pre-registered postponed
 * job with rb_postponed_job_trigger, which Ruby >= 3.3 allows from any thread. The job
 * runs on whichever Ruby thread holds the GVL at its next interrupt check (GVL context)
 * and samples that thread: its stack and the CPU it used since its previous sample
 * (account.c). A thread that is never running when the job fires is not walked, but its
 * CPU is not lost: it goes to its next sample or label change. Label changes charge as in
 * the signal mode.
 *
 * Ruby < 3.3 cannot trigger a postponed job from a non-Ruby thread (and its
 * rb_postponed_job_register_one is racy, Bug #19991), so there the mode takes no timer
 * samples at all and records CPU only at label changes; po_ticker_start says so by
 * returning 0.
 *
 * stop is one step that no interrupt can cut short (a Thread#raise or a trap arriving
 * during it is raised after it): it wakes the ticker from its wait and joins it with the
 * GVL held, which takes microseconds and cannot deadlock, the ticker never waiting for the
 * GVL (rb_postponed_job_trigger is async-signal-safe). Joined without the GVL, Ruby checked
 * interrupts around the join, and a raise there left the hooks installed and every thread
 * tracked with its CPU clock of then: the next start charged all CPU used while stopped
 * to the first sample.
 *
 * Fork: the ticker thread does not exist in the child; the atfork handler forgets it and
 * re-initialises the wait's mutex and condition variable (the ticker may have held them).
 */
#include "pyroscope_otel.h"

#ifdef HAVE_RB_POSTPONED_JOB_PREREGISTER
#include <errno.h>
#include <pthread.h>
#include <signal.h>

static rb_postponed_job_handle_t job = POSTPONED_JOB_HANDLE_INVALID;
static pthread_t thread;
static pthread_mutex_t wait_lock; /* guards `ticking` and the wait on `wake` */
static pthread_cond_t wake;       /* on CLOCK_MONOTONIC: stop's signal, else the next tick */
static int ticking;
static long tick_ns;

static void init_wait(void)
{
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&wake, &attr);
    pthread_condattr_destroy(&attr);
    pthread_mutex_init(&wait_lock, NULL);
}

static void sample_job(void *arg)
{
    (void)arg;
    po_thread *t = po_thread_current(0);
    if (t) po_sample_on_gvl(t);
}

static void *tick(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&wait_lock);
    while (ticking) {
        struct timespec at;
        clock_gettime(CLOCK_MONOTONIC, &at);
        long ns = at.tv_nsec + tick_ns % 1000000000L;
        at.tv_sec += tick_ns / 1000000000L + ns / 1000000000L;
        at.tv_nsec = ns % 1000000000L;
        while (ticking && pthread_cond_timedwait(&wake, &wait_lock, &at) != ETIMEDOUT) {}
        if (ticking) rb_postponed_job_trigger(job);
    }
    pthread_mutex_unlock(&wait_lock);
    return NULL;
}

int po_ticker_start(long interval_ns)
{
    if (job == POSTPONED_JOB_HANDLE_INVALID) {
        job = rb_postponed_job_preregister(0, sample_job, NULL);
        if (job == POSTPONED_JOB_HANDLE_INVALID) return 0;
        init_wait();
    }
    if (ticking) return 1;
    tick_ns = interval_ns;
    ticking = 1; /* no ticker runs: no lock needed */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old); /* inherited by the new thread */
    int err = pthread_create(&thread, NULL, tick, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err) {
        ticking = 0;
        rb_syserr_fail(err, "pyroscope: cannot start the sampling ticker");
    }
    return 1;
}

void po_ticker_stop(void)
{
    if (!ticking) return;
    pthread_mutex_lock(&wait_lock);
    ticking = 0;
    pthread_cond_signal(&wake);
    pthread_mutex_unlock(&wait_lock);
    pthread_join(thread, NULL);
}

void po_ticker_after_fork_child(void)
{
    if (job == POSTPONED_JOB_HANDLE_INVALID) return; /* never started */
    ticking = 0;
    init_wait();
}

#else

int po_ticker_start(long interval_ns)
{
    (void)interval_ns;
    return 0;
}

void po_ticker_stop(void) {}
void po_ticker_after_fork_child(void) {}

#endif
