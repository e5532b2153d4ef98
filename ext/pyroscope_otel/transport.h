/* transport.h — the uploader's interface (transport.c). */
#ifndef PYROSCOPE_OTEL_TRANSPORT_H
#define PYROSCOPE_OTEL_TRANSPORT_H

#include <stddef.h>
#include <stdint.h>

struct curl_slist;
struct po_model;

typedef struct po_transport_config {
    long connect_timeout_ms, timeout_ms;
    size_t max_windows, max_bytes;
    int max_attempts;
    size_t local_max_bytes; /* the local target's cap on its directory's profiles */
    char user_agent[128];
    char ca_file[512];
} po_transport_config;

typedef struct po_transport_stats {
    /* a window ends sent, failed (refused, out of attempts or too old to send) or dropped
     * (the queue over its caps); samples_dropped counts the samples of the last two */
    uint64_t windows_sent, windows_failed, windows_dropped, samples_dropped, requests, retries, bytes_sent;
    uint64_t cpu_ns; /* the uploader thread's CPU: encoding, gzip, HTTP, files */
    size_t queued_windows, queued_bytes;
} po_transport_stats;

void po_transport_init(void);
int po_transport_configure(const po_transport_config *c, struct curl_slist *headers); /* takes headers; ENOMEM */
int po_transport_enqueue(struct po_model *m, const char *url, const char *log_url); /* takes m; EINVAL unconfigured */
int po_transport_flush(double timeout_s); /* GVL; waits without it; 1 when the queue drained */
void po_transport_stats_read(po_transport_stats *out, char *err, size_t errlen);
int po_transport_next_event(int *level, char *msg, size_t len);

/* local_store.c, on the uploader thread: one gzipped pprof file of a window at
 * base[.chunk].pb.gz, then the directory pruned to max_bytes. */
enum { PO_STORE_OK = 0, PO_STORE_RETRY, PO_STORE_FAILED };
int po_local_store(const char *base, uint32_t chunk, const uint8_t *gz, size_t len, size_t max_bytes, char *err,
                   size_t errlen);

#endif
