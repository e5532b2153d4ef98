/*
 * transport.c — the uploader: a bounded queue of windows and one native thread that
 * encodes, gzips and POSTs them with libcurl.
 *
 * Contexts. Enqueue (GVL) builds nothing here: it takes a finished export model, appends
 * it under `mu` and returns; `mu` is never held across encoding or network I/O, so an
 * application thread never waits on the server. The uploader thread is a plain pthread,
 * not a Ruby thread: it never takes the GVL, never touches Ruby objects, and runs with
 * every signal blocked (so neither our SIGPROF nor another profiler's lands on it, and it
 * is never sampled). Flush waits without the GVL, interruptibly, with a deadline.
 *
 * Failure policy (SPEC §2.1): network errors, 408, 429 and 5xx are retried with
 * exponential backoff (1 s doubling, 60 s cap) and full jitter, or after Retry-After
 * when the server gives one; 400, 413, 422 and other answers are not retried. A window is
 * dropped after max_attempts or when it becomes too old for the server (55 min). The
 * queue holds at most max_windows windows and max_bytes of models: past either, the
 * oldest waiting window is dropped. Every drop is counted, with its samples.
 * Logging: the thread cannot call Ruby, so it records an event when the kind of outcome
 * changes (first failure of a kind, recovery), and the Ruby side drains them into its
 * Logger. Events name the URL without user info and never carry headers.
 *
 * A job whose URL is file://<path> is written to files by local_store.c instead of
 * POSTed, with the same splitting, retries and counters.
 *
 * Fork: the thread does not exist in the child; the atfork child handler resets the lock
 * and forgets the parent's queue (the parent sends it), so the child starts afresh.
 */
#include "pyroscope_otel.h"
#include "export_model.h"
#include "transport.h"
#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <ruby/thread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct po_job {
    struct po_job *next;
    po_model *model;
    char *url;      /* with its query */
    char *log_url;  /* without user info or query, for events */
    uint32_t *bounds;
    uint32_t n_chunks, next_chunk;
    int attempts;
    uint64_t next_try_ms, created_ms;
    size_t bytes;
} po_job;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;  /* work or quit for the thread */
static pthread_cond_t idle = PTHREAD_COND_INITIALIZER;  /* the queue emptied */
static po_job *head, *tail;
static size_t queued_windows, queued_bytes;
static int thread_running, quit, busy;
static po_transport_config cfg;
static struct curl_slist *headers;
static po_transport_stats stats;
static char last_error[256];
/* For state-change logging, per server: PO_OK or the kind of its last failure. A few
 * servers at once (a reconfigure leaves the old one's windows queued); one not listed
 * starts healthy. */
#define DESTS 8
static struct { char log_url[256]; int last_kind; } dests[DESTS];
static unsigned dest_next;

/* under mu */
static int *last_kind_of(const char *log_url)
{
    for (int i = 0; i < DESTS; i++)
        if (strncmp(dests[i].log_url, log_url, sizeof(dests[i].log_url) - 1) == 0) return &dests[i].last_kind;
    unsigned i = dest_next++ % DESTS;
    snprintf(dests[i].log_url, sizeof(dests[i].log_url), "%s", log_url);
    dests[i].last_kind = 0; /* PO_OK, defined below */
    return &dests[i].last_kind;
}

#define EVENTS 32
static struct { int level; char msg[320]; } events[EVENTS];
static unsigned ev_head, ev_count;

enum { PO_OK = 0, PO_NET, PO_RETRY_HTTP, PO_REJECTED };

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* under mu */
static void event(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void event(int level, const char *fmt, ...)
{
    unsigned i = (ev_head + ev_count) % EVENTS;
    if (ev_count == EVENTS) ev_head = (ev_head + 1) % EVENTS;
    else ev_count++;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(events[i].msg, sizeof(events[i].msg), fmt, ap);
    va_end(ap);
    events[i].level = level;
}

static void job_free(po_job *j)
{
    if (j->model) { po_model_free(j->model); free(j->model); }
    free(j->url); free(j->log_url); free(j->bounds); free(j);
}

/* under mu: takes j (whose predecessor is prev, NULL for the head) off the queue */
static void job_done(po_job *prev, po_job *j, int dropped)
{
    if (prev) prev->next = j->next;
    else head = j->next;
    if (tail == j) tail = prev;
    queued_windows--;
    queued_bytes -= j->bytes;
    if (dropped) {
        stats.windows_dropped++;
        stats.samples_dropped += j->model->n_smp - (j->next_chunk ? j->bounds[j->next_chunk - 1] : 0);
    } else {
        stats.windows_sent++;
    }
    job_free(j);
    if (!head) pthread_cond_broadcast(&idle);
}

struct response { long status; long retry_after; };

static size_t on_header(char *buf, size_t size, size_t n, void *arg)
{
    struct response *r = arg;
    size_t len = size * n;
    if (len > 12 && strncasecmp(buf, "Retry-After:", 12) == 0) r->retry_after = strtol(buf + 12, NULL, 10);
    return len;
}

static size_t discard_body(char *buf, size_t size, size_t n, void *arg)
{
    (void)buf; (void)arg;
    return size * n;
}

/* One POST. Returns PO_OK, PO_NET, PO_RETRY_HTTP or PO_REJECTED; *retry_after_s >= 0 when
 * the server said when to come back. */
static int post(CURL *curl, const po_job *j, const uint8_t *body, size_t len, long *retry_after_s, char *err,
                size_t errlen)
{
    struct response r = { 0, -1 };
    char curl_err[CURL_ERROR_SIZE] = "";
    curl_easy_setopt(curl, CURLOPT_URL, j->url);
    curl_easy_setopt(curl, CURLOPT_POST, 1L);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, (const char *)body);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(curl, CURLOPT_USERAGENT, cfg.user_agent);
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, cfg.connect_timeout_ms);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, cfg.timeout_ms);
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L); /* no SIGALRM for timeouts: not our signal to take */
    curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(curl, CURLOPT_HEADERDATA, &r);
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, discard_body);
    curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, curl_err);
    curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(curl, CURLOPT_SSL_VERIFYHOST, 2L);
    if (cfg.ca_file[0]) curl_easy_setopt(curl, CURLOPT_CAINFO, cfg.ca_file);
    CURLcode rc = curl_easy_perform(curl);
    *retry_after_s = r.retry_after;
    if (rc != CURLE_OK) {
        snprintf(err, errlen, "%s", curl_err[0] ? curl_err : curl_easy_strerror(rc));
        return PO_NET;
    }
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &r.status);
    if (r.status >= 200 && r.status < 300) return PO_OK;
    snprintf(err, errlen, "HTTP %ld", r.status);
    if (r.status == 408 || r.status == 429 || r.status >= 500) return PO_RETRY_HTTP;
    return PO_REJECTED;
}

static void *uploader(void *arg)
{
    (void)arg;
    CURL *curl = curl_easy_init();
    pthread_mutex_lock(&mu);
    while (!quit) {
        uint64_t now = now_ms();
        if (!head || head->next_try_ms > now) {
            if (!head) {
                pthread_cond_wait(&wake, &mu);
            } else {
                uint64_t at = head->next_try_ms;
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                uint64_t wait = at - now;
                ts.tv_sec += (time_t)(wait / 1000);
                ts.tv_nsec += (long)(wait % 1000) * 1000000L;
                if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
                pthread_cond_timedwait(&wake, &mu, &ts);
            }
            continue;
        }
        po_job *j = head;
        if (now - j->created_ms > 55ULL * 60 * 1000) { /* the server refuses data over an hour old */
            event(2, "dropping a window to %s: it could not be sent within 55 minutes", j->log_url);
            job_done(NULL, j, 1);
            continue;
        }
        busy = 1;
        pthread_mutex_unlock(&mu);

        int kind = PO_OK;
        long retry_after = -1;
        char err[CURL_ERROR_SIZE + 32] = "";
        if (!curl) {
            kind = PO_REJECTED;
            snprintf(err, sizeof(err), "libcurl could not be initialised");
        } else if (!j->bounds && (j->n_chunks = po_pprof_split(j->model, &j->bounds)) == 0) {
            kind = PO_REJECTED;
            snprintf(err, sizeof(err), "out of memory while encoding");
        }
        size_t sent_bytes = 0;
        uint64_t requests = 0;
        while (kind == PO_OK && j->next_chunk < j->n_chunks) {
            uint32_t from = j->next_chunk ? j->bounds[j->next_chunk - 1] : 0, to = j->bounds[j->next_chunk];
            size_t plen = 0, glen = 0;
            uint8_t *packed = po_pprof_pack(j->model, from, to, &plen);
            uint8_t *gz = packed ? po_gzip(packed, plen, &glen) : NULL;
            free(packed);
            if (!gz) {
                kind = PO_REJECTED;
                snprintf(err, sizeof(err), "out of memory while encoding");
                break;
            }
            if (strncmp(j->url, "file://", 7) == 0) {
                int r = po_local_store(j->url + 7, j->next_chunk, gz, glen, cfg.local_max_bytes, err, sizeof(err));
                kind = r == PO_STORE_OK ? PO_OK : r == PO_STORE_RETRY ? PO_NET : PO_REJECTED;
            } else {
                kind = post(curl, j, gz, glen, &retry_after, err, sizeof(err));
            }
            free(gz);
            requests++;
            if (kind == PO_OK) { j->next_chunk++; sent_bytes += glen; }
        }

        pthread_mutex_lock(&mu);
        busy = 0;
        stats.requests += requests;
        stats.bytes_sent += sent_bytes;
        int *last_kind = last_kind_of(j->log_url);
        if (kind != *last_kind) {
            if (kind == PO_OK) event(1, "uploads to %s succeed again", j->log_url);
            else event(3, "upload to %s failed: %s%s", j->log_url, err,
                       kind == PO_REJECTED ? " (not retried)" : " (will retry)");
            *last_kind = kind;
        }
        if (kind != PO_OK) snprintf(last_error, sizeof(last_error), "%s: %s", j->log_url, err);
        if (kind == PO_OK) {
            job_done(NULL, j, 0);
        } else if (kind == PO_REJECTED || ++j->attempts >= cfg.max_attempts) {
            job_done(NULL, j, 1);
        } else {
            stats.retries++;
            uint64_t backoff = 1000ULL << (j->attempts - 1 < 6 ? j->attempts - 1 : 6);
            if (backoff > 60000) backoff = 60000;
            backoff = backoff / 2 + (uint64_t)rand() % (backoff + 1); /* 0.5..1.5 x */
            if (retry_after >= 0) backoff = (uint64_t)(retry_after < 3600 ? retry_after : 3600) * 1000;
            j->next_try_ms = now_ms() + backoff;
        }
    }
    thread_running = 0;
    pthread_cond_broadcast(&idle);
    pthread_mutex_unlock(&mu);
    if (curl) curl_easy_cleanup(curl);
    return NULL;
}

/* under mu */
static int start_thread(void)
{
    if (thread_running) return 0;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* the thread inherits "everything blocked" */
    pthread_t th;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    quit = 0;
    int rc = pthread_create(&th, &attr, uploader, NULL);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc == 0) thread_running = 1;
    return rc;
}

void po_transport_configure(const po_transport_config *c, struct curl_slist *hdrs)
{
    pthread_mutex_lock(&mu);
    cfg = *c;
    curl_slist_free_all(headers);
    headers = hdrs;
    pthread_mutex_unlock(&mu);
}

int po_transport_enqueue(po_model *m, const char *url, const char *log_url)
{
    po_job *j = calloc(1, sizeof(*j));
    if (j) {
        j->url = strdup(url);
        j->log_url = strdup(log_url);
    }
    if (!j || !j->url || !j->log_url) {
        if (j) { j->model = NULL; job_free(j); }
        return ENOMEM;
    }
    j->model = m;
    j->bytes = m->approx_bytes + sizeof(*m);
    j->created_ms = j->next_try_ms = now_ms();
    pthread_mutex_lock(&mu);
    if (tail) tail->next = j; else head = j;
    tail = j;
    queued_windows++;
    queued_bytes += j->bytes;
    /* over a cap: drop the oldest window that is not being sent right now */
    int dropped = 0;
    while (queued_windows > cfg.max_windows || queued_bytes > cfg.max_bytes) {
        po_job *prev = busy ? head : NULL, *victim = prev ? prev->next : head;
        if (!victim || victim == j) break;
        job_done(prev, victim, 1);
        dropped++;
    }
    if (dropped) event(2, "upload queue over its cap: dropped the %d oldest window(s)", dropped);
    int rc = start_thread();
    pthread_cond_signal(&wake);
    pthread_mutex_unlock(&mu);
    return rc;
}

struct flush_wait { uint64_t deadline_ms; int interrupted, drained; };

static void *wait_idle(void *arg)
{
    struct flush_wait *w = arg;
    pthread_mutex_lock(&mu);
    while ((head || busy) && thread_running && !w->interrupted) {
        /* retries waiting on backoff are due now: a flush asks for the last chance */
        if (head && !busy) { head->next_try_ms = 0; pthread_cond_signal(&wake); }
        uint64_t now = now_ms();
        if (now >= w->deadline_ms) break;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t step = w->deadline_ms - now < 50 ? w->deadline_ms - now : 50;
        ts.tv_nsec += (long)step * 1000000L;
        if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
        pthread_cond_timedwait(&idle, &mu, &ts);
    }
    w->drained = !head && !busy;
    pthread_mutex_unlock(&mu);
    return NULL;
}

static void unblock_wait(void *arg)
{
    struct flush_wait *w = arg;
    pthread_mutex_lock(&mu);
    w->interrupted = 1;
    pthread_cond_broadcast(&idle);
    pthread_mutex_unlock(&mu);
}

int po_transport_flush(double timeout_s)
{
    struct flush_wait w = { now_ms() + (uint64_t)(timeout_s * 1000), 0, 0 };
    for (;;) {
        w.interrupted = 0;
        rb_thread_call_without_gvl(wait_idle, &w, unblock_wait, &w);
        if (!w.interrupted) break; /* drained, deadline passed, or the uploader is gone */
        /* Any interrupt wakes the wait, Ruby's own scheduling too (seen on 3.4): run it (a
           trap or Thread#raise may raise and longjmp out; nothing here needs cleanup), then
           wait on until the deadline. */
        rb_thread_check_ints();
    }
    return w.drained;
}

void po_transport_stats_read(po_transport_stats *out, char *err, size_t errlen)
{
    pthread_mutex_lock(&mu);
    *out = stats;
    out->queued_windows = queued_windows;
    out->queued_bytes = queued_bytes;
    snprintf(err, errlen, "%s", last_error);
    pthread_mutex_unlock(&mu);
}

int po_transport_next_event(int *level, char *msg, size_t len)
{
    pthread_mutex_lock(&mu);
    int got = ev_count > 0;
    if (got) {
        *level = events[ev_head].level;
        snprintf(msg, len, "%s", events[ev_head].msg);
        ev_head = (ev_head + 1) % EVENTS;
        ev_count--;
    }
    pthread_mutex_unlock(&mu);
    return got;
}

void po_transport_init(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
    pthread_atfork(NULL, NULL, po_transport_after_fork_child);
}

void po_transport_after_fork_child(void)
{
    pthread_mutex_init(&mu, NULL);
    pthread_cond_init(&wake, NULL);
    pthread_cond_init(&idle, NULL);
    /* the job in flight belonged to a thread that is gone; the rest are the parent's */
    while (head) { po_job *n = head->next; job_free(head); head = n; }
    tail = NULL;
    queued_windows = queued_bytes = 0;
    thread_running = busy = 0;
    memset(dests, 0, sizeof(dests));
    ev_count = 0;
}
