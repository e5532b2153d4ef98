/*
 * local_store.c — the local target: a window's gzipped pprof files in a directory instead
 * of an upload (server_address "file:///some/dir").
 *
 * Runs on the uploader thread (transport.c), never with the GVL and never on an
 * application thread, with the same windows, splitting and retries as uploads. A file is
 * written under a temporary name and renamed, so a reader never sees half of one. After
 * each file the directory's *.pb.gz files are counted and the oldest (by modification
 * time, then name) removed until they fit in the configured byte cap; the file just
 * written is never removed.
 */
#include "transport.h"
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SUFFIX ".pb.gz"

typedef struct entry {
    char *name;
    off_t size;
    struct timespec mtime;
} entry;

static int older(const void *a, const void *b)
{
    const entry *x = a, *y = b;
    if (x->mtime.tv_sec != y->mtime.tv_sec) return x->mtime.tv_sec < y->mtime.tv_sec ? -1 : 1;
    if (x->mtime.tv_nsec != y->mtime.tv_nsec) return x->mtime.tv_nsec < y->mtime.tv_nsec ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int is_profile(const char *name)
{
    size_t n = strlen(name), s = strlen(SUFFIX);
    return n > s && strcmp(name + n - s, SUFFIX) == 0;
}

/* Removes the oldest profiles of dir until the rest fit in max_bytes, keeping `keep`. */
static void prune(const char *dir, const char *keep, size_t max_bytes)
{
    DIR *d = opendir(dir);
    if (!d) return;
    entry *list = NULL;
    size_t n = 0, cap = 0;
    unsigned long long total = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!is_profile(de->d_name)) continue;
        struct stat st;
        if (fstatat(dirfd(d), de->d_name, &st, 0) != 0 || !S_ISREG(st.st_mode)) continue;
        if (n == cap) {
            size_t ncap = cap ? cap * 2 : 64;
            entry *nl = realloc(list, ncap * sizeof(entry));
            if (!nl) break;
            list = nl;
            cap = ncap;
        }
        if (!(list[n].name = strdup(de->d_name))) break;
        list[n].size = st.st_size;
        list[n].mtime = st.st_mtim;
        total += (unsigned long long)st.st_size;
        n++;
    }
    if (total > max_bytes) {
        qsort(list, n, sizeof(entry), older);
        for (size_t i = 0; i < n && total > max_bytes; i++) {
            if (strcmp(list[i].name, keep) == 0) continue;
            if (unlinkat(dirfd(d), list[i].name, 0) == 0) total -= (unsigned long long)list[i].size;
        }
    }
    for (size_t i = 0; i < n; i++) free(list[i].name);
    free(list);
    closedir(d);
}

int po_local_store(const char *base, uint32_t chunk, const uint8_t *gz, size_t len, size_t max_bytes, char *err,
                   size_t errlen)
{
    char path[4096], tmp[4096 + 8];
    int w = chunk ? snprintf(path, sizeof(path), "%s.%u" SUFFIX, base, chunk)
                  : snprintf(path, sizeof(path), "%s" SUFFIX, base);
    if (w < 0 || (size_t)w >= sizeof(path)) {
        snprintf(err, errlen, "path too long: %s", base);
        return PO_STORE_FAILED;
    }
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    int ok = f && fwrite(gz, 1, len, f) == len;
    int saved = errno;
    if (f && fclose(f) != 0 && ok) { ok = 0; saved = errno; }
    if (ok && rename(tmp, path) != 0) { ok = 0; saved = errno; }
    if (!ok) {
        unlink(tmp);
        snprintf(err, errlen, "cannot write %s: %s", path, strerror(saved));
        /* a full disk or a missing directory may be fixed; retried like a network error */
        return PO_STORE_RETRY;
    }
    char dir[4096];
    snprintf(dir, sizeof(dir), "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) {
        *slash = 0;
        prune(slash == dir ? "/" : dir, slash + 1, max_bytes);
    }
    return PO_STORE_OK;
}
