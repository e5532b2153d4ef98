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
 * Fork: the ticker thread does not exist in the child; the atfork handler forgets it.
 */
#include "pyroscope_otel.h"

#ifdef HAVE_RB_POSTPONED_JOB_PREREGISTER
#include <pthread.h>
#include <ruby/thread.h>
#include <signal.h>

static rb_postponed_job_handle_t job = POSTPONED_JOB_HANDLE_INVALID;
static pthread_t thread;
static volatile int ticking;
static long tick_ns;

static void sample_job(void *arg)
{
    (void)arg;
    po_thread *t = po_thread_current(0);
    if (t) po_sample_on_gvl(t);
}

static void *tick(void *arg)
{
    (void)arg;
    while (__atomic_load_n(&ticking, __ATOMIC_ACQUIRE)) {
        struct timespec ts = { tick_ns / 1000000000L, tick_ns % 1000000000L };
        nanosleep(&ts, NULL);
        if (__atomic_load_n(&ticking, __ATOMIC_ACQUIRE)) rb_postponed_job_trigger(job);
    }
    return NULL;
}

int po_ticker_start(long interval_ns)
{
    if (job == POSTPONED_JOB_HANDLE_INVALID) job = rb_postponed_job_preregister(0, sample_job, NULL);
    if (job == POSTPONED_JOB_HANDLE_INVALID) return 0;
    if (ticking) return 1;
    tick_ns = interval_ns;
    ticking = 1;
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

static void *join_ticker(void *arg)
{
    pthread_join(*(pthread_t *)arg, NULL);
    return NULL;
}

void po_ticker_stop(void)
{
    if (!ticking) return;
    __atomic_store_n(&ticking, 0, __ATOMIC_RELEASE);
    /* at most one interval; without the GVL so that a job waiting for it cannot deadlock */
    rb_thread_call_without_gvl(join_ticker, &thread, RUBY_UBF_IO, NULL);
}

void po_ticker_after_fork_child(void)
{
    ticking = 0;
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
