/*
 * signal.c — SIGPROF set-up and the handler's entry.
 *
 * The handler is installed on the first start and never removed: a SIGPROF still pending
 * after stop (or queued by a timer that was being deleted) must find a handler that does
 * nothing, not the default action, which terminates the process. It is installed with
 * SA_RESTART so that system calls interrupted by a sample resume instead of failing with
 * EINTR, and it refuses to start when another handler (stackprof, another profiler) owns
 * SIGPROF rather than silently stealing its signal.
 *
 * HANDLER: on_sigprof and everything it calls. It acts only on signals from our own timers
 * (si_code SI_TIMER), on the thread the timer was made for, and preserves errno.
 */
#include "pyroscope_otel.h"
#include <errno.h>
#include <signal.h>
#include <string.h>

static int installed;

static void on_sigprof(int sig, siginfo_t *info, void *ucontext)
{
    (void)sig;
    (void)ucontext;
    int saved_errno = errno;
    if (po_running && info && info->si_code == SI_TIMER) {
        int slot = info->si_value.sival_int;
        if (slot >= 0 && slot < PO_MAX_THREADS) {
            po_thread *t = &po_threads[slot];
            if (t->tid != 0 && t->tid == po_gettid()) {
                po_sample_from_handler(t);
                if (t->deferred == PO_DEFER_GC) po_gc_events_deferred();
            }
        }
    }
    errno = saved_errno;
}

void po_signal_install(void)
{
    struct sigaction old;
    if (sigaction(SIGPROF, NULL, &old) != 0) rb_sys_fail("sigaction(SIGPROF)");
    if ((old.sa_flags & SA_SIGINFO) && old.sa_sigaction == on_sigprof) {
        installed = 1;
        return;
    }
    if (!(old.sa_flags & SA_SIGINFO) && (old.sa_handler == SIG_DFL || old.sa_handler == SIG_IGN)) {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = on_sigprof;
        sa.sa_flags = SA_SIGINFO | SA_RESTART;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGPROF, &sa, NULL) != 0) rb_sys_fail("sigaction(SIGPROF)");
        installed = 1;
        return;
    }
    rb_raise(rb_eRuntimeError,
             "pyroscope: another profiler (stackprof, ruby-prof, ...) has a SIGPROF handler installed; "
             "stop it before starting Pyroscope, or start Pyroscope first");
}

int po_signal_installed(void)
{
    return installed;
}
