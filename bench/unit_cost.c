/*
 * The unit prices of bench/request_cost.rb's cost model, on this machine: ns per call of a
 * thread-CPU clock read (a system call: no vDSO path for CPU clocks), a monotonic clock
 * read (vDSO), a plain system call, a CPU timer re-arm, and a signal delivered to the
 * calling thread and returned from (an empty handler, so the kernel's part alone).
 * Best of 5 rounds each; prints JSON.
 *   cc -O2 -o unit_cost bench/unit_cost.c && ./unit_cost
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define N 200000

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static void on_signal(int sig) { (void)sig; }

static timer_t timer;
static pid_t tid;

static void thread_clock(void) { struct timespec ts; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts); }
static void mono_clock(void) { struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts); }
static void plain_syscall(void) { syscall(SYS_getppid); }
static void timer_rearm(void)
{
    struct itimerspec its = { { 0, 0 }, { 3600, 0 } };
    timer_settime(timer, 0, &its, NULL);
}
static void signal_self(void) { syscall(SYS_tgkill, getpid(), tid, SIGPROF); }

static double best(void (*f)(void))
{
    double b = 1e18;
    for (int r = 0; r < 5; r++) {
        double t = now_ns();
        for (int i = 0; i < N; i++) f();
        double per = (now_ns() - t) / N;
        if (per < b) b = per;
    }
    return b;
}

int main(void)
{
    struct sigaction sa = { 0 };
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGPROF, &sa, NULL);
    tid = (pid_t)syscall(SYS_gettid);
    struct sigevent sev = { 0 };
    sev.sigev_notify = SIGEV_NONE;
    timer_create(CLOCK_THREAD_CPUTIME_ID, &sev, &timer);
    printf("{\"thread_clock_ns\":%.1f,\"mono_clock_ns\":%.1f,\"syscall_ns\":%.1f,\"timer_settime_ns\":%.1f,"
           "\"signal_ns\":%.1f}\n",
           best(thread_clock), best(mono_clock), best(plain_syscall), best(timer_rearm), best(signal_self));
    return 0;
}
