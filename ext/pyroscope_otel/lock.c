/*
 * lock.c — po_lock, the extension's one lock (what it guards: pyroscope_otel.h).
 *
 * A spin lock rather than a pthread mutex because the SIGPROF handler must be able to
 * try it: pthread_mutex_trylock is not async-signal-safe. Holders never block, never call
 * into Ruby and hold it for microseconds, so waiters spin briefly and then yield the CPU.
 * Contexts: HANDLER (po_trylock only), GVL, NOGVL.
 */
#include "pyroscope_otel.h"
#include <sched.h>

static volatile char po_lock_word;

int po_trylock(void)
{
    return !__atomic_test_and_set(&po_lock_word, __ATOMIC_ACQUIRE);
}

void po_lock(void)
{
    unsigned spins = 0;
    while (__atomic_test_and_set(&po_lock_word, __ATOMIC_ACQUIRE)) {
        if (++spins > 64) {
            sched_yield();
            spins = 0;
        }
    }
}

void po_unlock(void)
{
    __atomic_clear(&po_lock_word, __ATOMIC_RELEASE);
}

/* The child of fork has one thread: a holder that was another thread no longer exists. */
void po_lock_reset_after_fork(void)
{
    __atomic_clear(&po_lock_word, __ATOMIC_RELEASE);
}
