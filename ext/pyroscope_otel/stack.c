/*
 * stack.c — capturing the calling thread's Ruby stack.
 *
 * Runs in the HANDLER (sampling) and on the GVL (label changes), always for the calling
 * thread, which must hold the GVL: rb_profile_frames walks the current execution context
 * and allocates nothing. During a GC the VM's frames may be mid-move (compaction), so the
 * stack is not walked and the sample is charged to a synthetic "(garbage collection)"
 * frame instead, which is also where a profiler user wants that CPU to show.
 * At the end of a GC (its exit hook, gc_events.c) the moves are over and the frames can be
 * walked again, though the VM still reports a GC.
 * The caller's buffers hold max_depth + 1 + PO_MAX_SKIP entries: a deeper stack keeps its max_depth
 * leaf-most frames and ends in a "(truncated)" marker in place of the root-most ones.
 *
 * At a label change (GVL), the stack that gets an unsampled span's CPU is the code that
 * changed the labels: the leaf-most frames of C functions and of the gem's and the
 * OpenTelemetry gems' own files (registered as path prefixes) are trimmed first, so
 * that neither this gem nor the SDK is ever the leaf of such a charge. Other stacks are
 * kept as they are: a timer sample in the SDK is the SDK's true cost, but it is not drawn
 * for another span's unseen CPU (po_stack_is_own, attribution.c).
 */
#include "pyroscope_otel.h"
#include <string.h>

/* Path prefixes of the gem's and OpenTelemetry's own code (GVL: set and read). */
static char **own_paths;
static long *own_lens;
static long own_count;

/* GVL: frames of files under these prefixes are never the leaf of a label-change charge. */
void po_stack_set_own_paths(VALUE paths)
{
    Check_Type(paths, T_ARRAY);
    long n = RARRAY_LEN(paths);
    for (long i = 0; i < n; i++) Check_Type(RARRAY_AREF(paths, i), T_STRING);
    size_t cap = n > 0 ? (size_t)n : 1;
    char **p = calloc(cap, sizeof(char *));
    long *l = calloc(cap, sizeof(long));
    for (long i = 0; p && l && i < n; i++) {
        VALUE s = RARRAY_AREF(paths, i);
        l[i] = RSTRING_LEN(s);
        if (!(p[i] = malloc(l[i] + 1))) break;
        memcpy(p[i], RSTRING_PTR(s), l[i]);
    }
    int ok = p && l;
    for (long i = 0; ok && i < n; i++) ok = p[i] != NULL;
    if (!ok) {
        for (long i = 0; p && i < n; i++) free(p[i]);
        free(p);
        free(l);
        rb_raise(rb_eNoMemError, "pyroscope: cannot store own paths");
    }
    po_lock(); /* the readers run under it */
    char **old = own_paths;
    long *old_lens = own_lens;
    long old_n = own_count;
    own_paths = p;
    own_lens = l;
    own_count = n;
    po_unlock();
    for (long i = 0; i < old_n; i++) free(old[i]);
    free(old);
    free(old_lens);
}

/* A file of ours (the gem's, the SDK's). */
static int own_path(VALUE path)
{
    if (!RB_TYPE_P(path, T_STRING)) return 0;
    const char *p = RSTRING_PTR(path);
    long n = RSTRING_LEN(path);
    for (long i = 0; i < own_count; i++)
        if (n >= own_lens[i] && memcmp(p, own_paths[i], own_lens[i]) == 0) return 1;
    return 0;
}

/* A C function (no path: what matters is the Ruby code that called it), or our code.
 * rb_profile_frame_path returns the iseq's existing path: it allocates nothing. */
static int own_frame(VALUE frame)
{
    VALUE path = rb_profile_frame_path(frame);
    return NIL_P(path) || own_path(path);
}

int po_stack_is_own(const VALUE *frames, int n)
{
    for (int i = 0; i < n; i++) {
        if (frames[i] == PO_FRAME_SYNTHETIC) return 0;
        VALUE path = rb_profile_frame_path(frames[i]);
        if (!NIL_P(path)) return own_path(path);
    }
    return 0;
}

int po_stack_capture(VALUE *frames, int *lines, int max_depth, int flags)
{
    int trim_own = flags & PO_STACK_TRIM_OWN;
    if (!(flags & PO_STACK_GC_ENDING) && rb_during_gc()) {
        frames[0] = PO_FRAME_SYNTHETIC;
        lines[0] = PO_LINE_GC;
        return 1;
    }
    int n = rb_profile_frames(0, max_depth + 1 + (trim_own ? PO_MAX_SKIP : 0), frames, lines);
    if (trim_own) {
        int skip = 0;
        while (skip < n - 1 && skip < PO_MAX_SKIP && own_frame(frames[skip])) skip++;
        if (skip) {
            n -= skip;
            memmove(frames, frames + skip, n * sizeof(VALUE));
            memmove(lines, lines + skip, n * sizeof(int));
        }
    }
    if (n > max_depth) {
        frames[max_depth] = PO_FRAME_SYNTHETIC;
        lines[max_depth] = PO_LINE_TRUNCATED;
        n = max_depth + 1;
    }
    return n;
}

VALUE po_frame_name(VALUE frame, int line)
{
    if (frame == PO_FRAME_SYNTHETIC)
        return rb_str_new_cstr(line == PO_LINE_GC             ? "(garbage collection)"
                               : line == PO_LINE_FIBER_SWITCH ? "(fiber switch)"
                               : line == PO_LINE_THREAD_EXIT  ? "(thread exit)"
                               : line == PO_LINE_DROPPED      ? "(dropped)"
                               : line == PO_LINE_GVL_WAIT     ? "(waiting for GVL)"
                                                              : "(truncated)");
    VALUE name = rb_profile_frame_full_label(frame);
    return NIL_P(name) ? rb_str_new_cstr("(unknown)") : name;
}
