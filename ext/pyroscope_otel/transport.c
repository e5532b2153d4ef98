/*
 * transport.c — the uploader: a bounded queue of windows and one native thread that
 * encodes, gzips and POSTs them with libcurl.
 *
 * Contexts. Enqueue (GVL) builds nothing here: it takes a finished export model, appends
 * it under `mu` and returns; `mu` is never held across encoding or network I/O, so an
 * application thread never waits on the server. The uploader thread is a plain pthread,
 * not a Ruby thread: it never takes the GVL, never touches Ruby objects, and runs with
 * every signal blocked (so neither our SIGPROF nor another profiler's lands on it, and it
 * is never sampled). Flush waits without the GVL, interruptibly, with a deadline. The
 * fork handlers run in the forking thread; the exit handler in the thread calling exit.
 *
 * Configuration: each configure publishes a new immutable `po_conf` (settings and header
 * list). A job takes a reference to the current one under `mu` and uses it for all its
 * requests, so a reconfigure during a POST (which lasts up to `timeout`) never frees the
 * header list libcurl is walking, and no request mixes two configurations; the last user
 * frees it.
 *
 * Failure policy (SPEC §2.1): network errors, 408, 429 and 5xx are retried with
 * exponential backoff (1 s doubling, 60 s cap) and full jitter, or after Retry-After
 * (seconds or an HTTP date, capped at an hour) when the server gives one; 400, 413, 422
 * and other answers are not retried. A window is dropped after max_attempts or when it
 * becomes too old for the server (55 min). The queue holds at most max_windows windows
 * and max_bytes of models: past either, the oldest waiting window is dropped. Every drop
 * is counted, with its samples.
 * Logging: the thread cannot call Ruby, so it records an event when the kind of outcome
 * changes (first failure of a kind, recovery), and the Ruby side drains them into its
 * Logger. Events name the URL without user info and never carry headers.
 *
 * A job whose URL is file://<path> is written to files by local_store.c instead of
 * POSTed, with the same splitting, retries and counters.
 *
 * Time: every deadline is on CLOCK_MONOTONIC, condition variables included
 * (pthread_condattr_setclock), so a step of the wall clock neither stretches a flush nor
 * fires a retry early. Only a Retry-After date is wall time, turned into a delay on
 * arrival.
 *
 * libcurl runs through a multi handle, so that the thread can be woken out of a transfer
 * (curl_multi_wakeup) and every libcurl call is bracketed (`in_curl`): between two calls
 * the thread holds no lock of libcurl's or OpenSSL's.
 *
 * Exit: after Ruby's at_exit blocks (the exporter's bounded flush among them), an atexit
 * handler, registered after curl_global_init and so run before OpenSSL's own cleanup,
 * asks the thread to stop, which aborts a transfer in progress at its next step, and
 * joins it (at most STOP_WAIT_MS): OpenSSL is never torn down under a live TLS write.
 *
 * Fork: the prepare handler takes `mu` and, when the thread is inside libcurl, wakes it
 * and waits (at most FORK_WAIT_MS; a step is non-blocking, so it is reached in far less)
 * until it is parked between two calls; `mu` is held across fork, so it stays parked
 * (the parent handler lets it go on with its transfer, unaborted). The child therefore
 * inherits no lock of libcurl's, OpenSSL's or ours held by a thread it does not have.
 * The child forgets the parent's queue (the parent sends it) and its thread; it never
 * touches the parent's multi and easy handles, leaked on purpose (one of each per fork):
 * cleaning them up would end the TLS session on the socket the parent still uses. Its
 * first enqueue starts its own thread with handles of its own. The alternative, a child
 * that only avoids the inherited handles, is not enough: a global lock of OpenSSL's or
 * libcurl's that the parent's thread held at fork (mid-handshake) is never released in
 * the child, whose own first upload would wait on it forever.
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

#define STOP_WAIT_MS 2000 /* exit: a transfer is aborted at its next step, far sooner */
#define FORK_WAIT_MS 1000 /* fork: a step never blocks, it ends far sooner */
#define RETRY_AFTER_MAX_S 3600

typedef struct po_conf {
    unsigned refs; /* under mu: the current one is referenced once, plus once per job using it */
    po_transport_config c;
    struct curl_slist *headers;
} po_conf;

typedef struct po_job {
    struct po_job *next;
    po_model *model;
    char *url;      /* with its query */
    char *log_url;  /* without user info or query, for events */
    uint32_t *bounds;
    uint32_t n_chunks, next_chunk;
    int next_part; /* of a chunk uploaded as two profiles (cpu, then wall): 1 when the cpu one went */
    int attempts;
    uint64_t next_try_ms, created_ms;
    size_t bytes;
} po_job;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake;  /* work, quit or the end of a fork for the thread */
static pthread_cond_t idle;  /* the queue emptied, the thread left libcurl or ended */
static po_job *head, *tail;
static size_t queued_windows, queued_bytes;
static int thread_running, quit, busy;
static pthread_t thread;
static CURLM *multi;          /* the thread's, while it has one: woken by a stop or a fork */
static int in_curl, paused;   /* the thread is inside a libcurl call; a fork is under way */
static po_conf *conf;         /* the current configuration */
static po_conf *job_conf;     /* the one the job in progress uses */
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

/* PO_STOPPED: the transfer was aborted because the process exits; not a failure */
enum { PO_OK = 0, PO_NET, PO_RETRY_HTTP, PO_REJECTED, PO_STOPPED };

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* under mu; deadline on now_ms()'s clock, which the condition variables use */
static void wait_until(pthread_cond_t *cv, uint64_t deadline_ms)
{
    struct timespec ts = { (time_t)(deadline_ms / 1000), (long)(deadline_ms % 1000) * 1000000L };
    pthread_cond_timedwait(cv, &mu, &ts);
}

static void init_sync(void)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&wake, &a);
    pthread_cond_init(&idle, &a);
    pthread_condattr_destroy(&a);
    pthread_mutex_init(&mu, NULL);
}

/* under mu */
static void conf_drop(po_conf *k)
{
    if (--k->refs == 0) { curl_slist_free_all(k->headers); free(k); }
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
enum job_end { JOB_SENT, JOB_FAILED, JOB_DROPPED };
static void job_done(po_job *prev, po_job *j, enum job_end end)
{
    if (prev) prev->next = j->next;
    else head = j->next;
    if (tail == j) tail = prev;
    queued_windows--;
    queued_bytes -= j->bytes;
    if (end == JOB_SENT) {
        stats.windows_sent++;
    } else {
        if (end == JOB_FAILED) stats.windows_failed++;
        else stats.windows_dropped++;
        stats.samples_dropped += j->model->n_smp - (j->next_chunk ? j->bounds[j->next_chunk - 1] : 0);
    }
    job_free(j);
    if (!head) pthread_cond_broadcast(&idle);
}

/* The uploader, before each libcurl call: waits while a fork is under way (so that the
 * child inherits no lock libcurl or OpenSSL holds), then marks itself inside libcurl.
 * Returns 1 when the process exits and the transfer is to be abandoned. */
static int curl_enter(void)
{
    pthread_mutex_lock(&mu);
    while (paused) pthread_cond_wait(&wake, &mu);
    in_curl = 1;
    int stop = quit;
    pthread_mutex_unlock(&mu);
    return stop;
}

static void curl_leave(void)
{
    pthread_mutex_lock(&mu);
    in_curl = 0;
    if (paused) pthread_cond_broadcast(&idle);
    pthread_mutex_unlock(&mu);
}

/* Retry-After: delay-seconds or an HTTP date (RFC 9110 §10.2.3), as seconds from now
 * (uncapped); -1 when absent or unreadable. */
static long retry_after_s(const char *v, size_t len)
{
    char s[64];
    while (len && (*v == ' ' || *v == '\t')) { v++; len--; }
    while (len && (v[len - 1] == '\r' || v[len - 1] == '\n' || v[len - 1] == ' ')) len--;
    if (len == 0 || len >= sizeof(s)) return -1;
    memcpy(s, v, len);
    s[len] = '\0';
    if (s[0] >= '0' && s[0] <= '9') {
        char *end;
        long n = strtol(s, &end, 10);
        return *end ? -1 : n;
    }
    time_t at = curl_getdate(s, NULL);
    if (at == -1) return -1;
    time_t now = time(NULL); /* the date is wall time: read against the wall clock, once */
    return at <= now ? 0 : (long)(at - now);
}

struct response { long status; long retry_after; };

static size_t on_header(char *buf, size_t size, size_t n, void *arg)
{
    struct response *r = arg;
    size_t len = size * n;
    if (len > 12 && strncasecmp(buf, "Retry-After:", 12) == 0) r->retry_after = retry_after_s(buf + 12, len - 12);
    return len;
}

static size_t discard_body(char *buf, size_t size, size_t n, void *arg)
{
    (void)buf; (void)arg;
    return size * n;
}

/* One POST with the job's configuration k. Returns PO_OK, PO_NET, PO_RETRY_HTTP,
 * PO_REJECTED or PO_STOPPED; *retry_after_s >= 0 when the server said when to come back. */
static int post(CURL *curl, const po_conf *k, const po_job *j, const uint8_t *body, size_t len,
                long *retry_after_s, char *err, size_t errlen)
{
    struct response r = { 0, -1 };
    char curl_err[CURL_ERROR_SIZE] = "";
    curl_easy_reset(curl); /* nothing of an earlier job's configuration stays (a CA file) */
    curl_easy_setopt(curl, CURLOPT_URL, j->url);
    curl_easy_setopt(curl, CURLOPT_POST, 1L);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, (const char *)body);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, k->headers);
    curl_easy_setopt(curl, CURLOPT_USERAGENT, k->c.user_agent);
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, k->c.connect_timeout_ms);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, k->c.timeout_ms);
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L); /* no SIGALRM for timeouts: not our signal to take */
    curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(curl, CURLOPT_HEADERDATA, &r);
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, discard_body);
    curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, curl_err);
    curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(curl, CURLOPT_SSL_VERIFYHOST, 2L);
    if (k->c.ca_file[0]) curl_easy_setopt(curl, CURLOPT_CAINFO, k->c.ca_file);

    CURLcode rc = CURLE_OK;
    CURLMcode mc = CURLM_OK;
    int stopped = curl_enter(), added = 0, running = 0;
    if (!stopped) {
        mc = curl_multi_add_handle(multi, curl);
        added = running = mc == CURLM_OK;
    }
    while (running) {
        mc = curl_multi_perform(multi, &running);
        if (mc == CURLM_OK && running) mc = curl_multi_poll(multi, NULL, 0, 1000, NULL);
        if (mc != CURLM_OK) break;
        curl_leave();
        if ((stopped = curl_enter())) break;
    }
    if (!stopped && mc == CURLM_OK) {
        CURLMsg *msg;
        int left;
        while ((msg = curl_multi_info_read(multi, &left)))
            if (msg->msg == CURLMSG_DONE) rc = msg->data.result;
    }
    if (added) curl_multi_remove_handle(multi, curl);
    curl_leave();
    *retry_after_s = r.retry_after;
    if (stopped) {
        snprintf(err, errlen, "stopped: the process exits");
        return PO_STOPPED;
    }
    if (mc != CURLM_OK || rc != CURLE_OK) {
        snprintf(err, errlen, "%s", curl_err[0] ? curl_err : mc != CURLM_OK ? curl_multi_strerror(mc) : curl_easy_strerror(rc));
        return PO_NET;
    }
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &r.status);
    if (r.status >= 200 && r.status < 300) return PO_OK;
    snprintf(err, errlen, "HTTP %ld", r.status);
    if (r.status == 408 || r.status == 429 || r.status >= 500) return PO_RETRY_HTTP;
    return PO_REJECTED;
}

/* Sends (or stores) what is left of job j with configuration k; no lock held. */
static int send_job(CURL *curl, const po_conf *k, po_job *j, long *retry_after, uint64_t *requests,
                    size_t *sent_bytes, char *err, size_t errlen)
{
    if (!curl || !multi) {
        snprintf(err, errlen, "libcurl could not be initialised");
        return PO_REJECTED;
    }
    if (!j->bounds && (j->n_chunks = po_pprof_split(j->model, &j->bounds)) == 0) {
        snprintf(err, errlen, "out of memory while encoding");
        return PO_REJECTED;
    }
    int kind = PO_OK, local = strncmp(j->url, "file://", 7) == 0;
    while (kind == PO_OK && j->next_chunk < j->n_chunks) {
        uint32_t from = j->next_chunk ? j->bounds[j->next_chunk - 1] : 0, to = j->bounds[j->next_chunk];
        /* a file holds both sample types; the server gets a cpu and a wall profile (pprof.c) */
        int types = local || !j->model->wall ? PO_TYPES_OF(j->model) : j->next_part ? PO_TYPE_WALL : PO_TYPE_CPU;
        int last_part = types != PO_TYPE_CPU || !j->model->wall || local;
        if (types == PO_TYPE_WALL && !po_pprof_has(j->model, from, to, types)) { /* no wall in it: nothing to send */
            j->next_chunk++;
            j->next_part = 0;
            continue;
        }
        size_t plen = 0, glen = 0;
        uint8_t *packed = po_pprof_pack(j->model, from, to, types, &plen);
        uint8_t *gz = packed ? po_gzip(packed, plen, &glen) : NULL;
        free(packed);
        if (!gz) {
            snprintf(err, errlen, "out of memory while encoding");
            return PO_REJECTED;
        }
        if (local) {
            int r = po_local_store(j->url + 7, j->next_chunk, gz, glen, k->c.local_max_bytes, err, errlen);
            kind = r == PO_STORE_OK ? PO_OK : r == PO_STORE_RETRY ? PO_NET : PO_REJECTED;
        } else {
            kind = post(curl, k, j, gz, glen, retry_after, err, errlen);
        }
        free(gz);
        if (kind != PO_STOPPED) (*requests)++;
        if (kind == PO_OK) {
            *sent_bytes += glen;
            if (last_part) {
                j->next_chunk++;
                j->next_part = 0;
            } else {
                j->next_part = 1;
            }
        }
    }
    return kind;
}

static void *uploader(void *arg)
{
    (void)arg;
    curl_enter();
    CURL *curl = curl_easy_init();
    CURLM *m = curl_multi_init();
    curl_leave();
    pthread_mutex_lock(&mu);
    multi = m;
    while (!quit) {
        uint64_t now = now_ms();
        if (!head || head->next_try_ms > now) {
            if (!head) pthread_cond_wait(&wake, &mu);
            else wait_until(&wake, head->next_try_ms);
            continue;
        }
        po_job *j = head;
        if (now - j->created_ms > 55ULL * 60 * 1000) { /* the server refuses data over an hour old */
            event(2, "dropping a window to %s: it could not be sent within 55 minutes", j->log_url);
            job_done(NULL, j, JOB_FAILED);
            continue;
        }
        busy = 1;
        po_conf *k = job_conf = conf;
        k->refs++;
        pthread_mutex_unlock(&mu);

        long retry_after = -1;
        uint64_t requests = 0;
        size_t sent_bytes = 0;
        char err[CURL_ERROR_SIZE + 32] = "";
        uint64_t cpu0 = po_thread_cpu_ns(po_gettid());
        int kind = send_job(curl, k, j, &retry_after, &requests, &sent_bytes, err, sizeof(err));
        uint64_t cpu = po_thread_cpu_ns(po_gettid()) - cpu0;

        pthread_mutex_lock(&mu);
        busy = 0;
        job_conf = NULL;
        stats.cpu_ns += cpu;
        stats.requests += requests;
        stats.bytes_sent += sent_bytes;
        if (kind == PO_STOPPED) { conf_drop(k); break; } /* the job stays queued: not a failure */
        int *last_kind = last_kind_of(j->log_url);
        if (kind != *last_kind) {
            if (kind == PO_OK) event(1, "uploads to %s succeed again", j->log_url);
            else event(3, "upload to %s failed: %s%s", j->log_url, err,
                       kind == PO_REJECTED ? " (not retried)" : " (will retry)");
            *last_kind = kind;
        }
        if (kind != PO_OK) snprintf(last_error, sizeof(last_error), "%s: %s", j->log_url, err);
        if (kind == PO_OK) {
            job_done(NULL, j, JOB_SENT);
        } else if (kind == PO_REJECTED || ++j->attempts >= k->c.max_attempts) {
            job_done(NULL, j, JOB_FAILED);
        } else {
            stats.retries++;
            uint64_t backoff = 1000ULL << (j->attempts - 1 < 6 ? j->attempts - 1 : 6);
            if (backoff > 60000) backoff = 60000;
            backoff = backoff / 2 + (uint64_t)rand() % (backoff + 1); /* 0.5..1.5 x */
            if (retry_after >= 0) backoff = (uint64_t)(retry_after < RETRY_AFTER_MAX_S ? retry_after : RETRY_AFTER_MAX_S) * 1000;
            j->next_try_ms = now_ms() + backoff;
        }
        conf_drop(k);
    }
    multi = NULL;
    pthread_mutex_unlock(&mu);
    curl_enter();
    if (m) curl_multi_cleanup(m);
    if (curl) curl_easy_cleanup(curl);
    curl_leave();
    pthread_mutex_lock(&mu);
    thread_running = 0;
    pthread_cond_broadcast(&idle);
    pthread_mutex_unlock(&mu);
    return NULL;
}

/* under mu */
static int start_thread(void)
{
    if (thread_running) return 0;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* the thread inherits "everything blocked" */
    quit = 0;
    int rc = pthread_create(&thread, NULL, uploader, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc == 0) thread_running = 1;
    return rc;
}

int po_transport_configure(const po_transport_config *c, struct curl_slist *hdrs)
{
    po_conf *k = malloc(sizeof(*k));
    if (!k) { curl_slist_free_all(hdrs); return ENOMEM; }
    k->refs = 1;
    k->c = *c;
    k->headers = hdrs;
    pthread_mutex_lock(&mu);
    po_conf *old = conf;
    conf = k;
    if (old) conf_drop(old);
    pthread_mutex_unlock(&mu);
    return 0;
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
    if (!conf) { /* never configured: nothing to send with */
        pthread_mutex_unlock(&mu);
        job_free(j);
        return EINVAL;
    }
    if (tail) tail->next = j; else head = j;
    tail = j;
    queued_windows++;
    queued_bytes += j->bytes;
    /* over a cap: drop the oldest window that is not being sent right now */
    int dropped = 0;
    while (queued_windows > conf->c.max_windows || queued_bytes > conf->c.max_bytes) {
        po_job *prev = busy ? head : NULL, *victim = prev ? prev->next : head;
        if (!victim || victim == j) break;
        job_done(prev, victim, JOB_DROPPED);
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
        wait_until(&idle, w->deadline_ms - now < 50 ? w->deadline_ms : now + 50);
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

/* atexit, after Ruby's at_exit blocks and before OpenSSL's cleanup: stops and joins the
 * thread, aborting a transfer in progress, so that OpenSSL is not torn down under it. */
static void stop_at_exit(void)
{
    pthread_mutex_lock(&mu);
    if (!thread_running) { pthread_mutex_unlock(&mu); return; }
    quit = 1;
    pthread_cond_signal(&wake);
    if (multi) curl_multi_wakeup(multi);
    uint64_t deadline = now_ms() + STOP_WAIT_MS;
    while (thread_running && now_ms() < deadline) wait_until(&idle, deadline);
    int ended = !thread_running;
    pthread_mutex_unlock(&mu);
    if (ended) pthread_join(thread, NULL);
}

/* fork: see the header. Keeps mu until fork_parent or fork_child. */
static void fork_prepare(void)
{
    pthread_mutex_lock(&mu);
    paused = 1;
    if (in_curl && multi) curl_multi_wakeup(multi);
    uint64_t deadline = now_ms() + FORK_WAIT_MS;
    while (in_curl && now_ms() < deadline) wait_until(&idle, deadline);
}

static void fork_parent(void)
{
    paused = 0;
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&mu);
}

static void fork_child(void)
{
    init_sync();
    /* the job in flight belonged to a thread that is gone; the rest are the parent's */
    while (head) { po_job *n = head->next; job_free(head); head = n; }
    tail = NULL;
    queued_windows = queued_bytes = 0;
    if (job_conf) conf_drop(job_conf);
    job_conf = NULL;
    multi = NULL; /* the parent's: see the header */
    thread_running = busy = in_curl = paused = quit = 0;
    memset(dests, 0, sizeof(dests));
    ev_count = 0;
    /* the child's counters count its own windows: a parent's sent or dropped ones are not
     * the child's to report (a soak compares each process's with what the server holds) */
    memset(&stats, 0, sizeof(stats));
    last_error[0] = 0;
}

void po_transport_init(void)
{
    init_sync();
    curl_global_init(CURL_GLOBAL_DEFAULT);
    atexit(stop_at_exit); /* after curl_global_init's OpenSSL init: runs before its cleanup */
    pthread_atfork(fork_prepare, fork_parent, fork_child);
}
