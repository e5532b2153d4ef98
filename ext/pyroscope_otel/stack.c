/*
 * stack.c — capturing the calling thread's Ruby stack.
 *
 * Runs in the HANDLER (sampling) and on the GVL (label changes), always for the calling
 * thread, which must hold the GVL: rb_profile_frames walks the current execution context
 * and allocates nothing. During a GC the VM's frames may be mid-move (compaction), so the
 * stack is not walked and the sample is charged to a synthetic "(garbage collection)"
 * frame instead, which is also where a profiler user wants that CPU to show.
 * The caller's buffers hold max_depth + 1 + PO_MAX_SKIP entries: a deeper stack keeps its max_depth
 * leaf-most frames and ends in a "(truncated)" marker in place of the root-most ones.
 */
#include "pyroscope_otel.h"
#include <string.h>

int po_stack_capture(VALUE *frames, int *lines, int max_depth, int skip)
{
    if (rb_during_gc()) {
        frames[0] = PO_FRAME_SYNTHETIC;
        lines[0] = PO_LINE_GC;
        return 1;
    }
    /* rb_profile_frames' own start argument skips nothing on some Rubies (3.1 re-tests the
     * same frame), so the frames to skip are captured and dropped here. */
    int n = rb_profile_frames(0, max_depth + 1 + skip, frames, lines);
    if (n <= skip) return 0;
    if (skip) {
        n -= skip;
        memmove(frames, frames + skip, n * sizeof(VALUE));
        memmove(lines, lines + skip, n * sizeof(int));
    }
    if (n > max_depth) {
        frames[max_depth] = PO_FRAME_SYNTHETIC;
        lines[max_depth] = PO_LINE_TRUNCATED;
        n = max_depth + 1;
    }
    return n;
}
