/*
 * window.c — a window (everything aggregated since the last take, taken through the
 * recorder's po_window_begin/po_window_end while sampling goes on into the other buffer)
 * as plain Ruby data: po_take_window, for tests and tools. The exporter takes it straight
 * into an export model instead (export_binding.c).
 *
 * GVL. The swap of the active buffer is the only step under po_lock; turning frames into
 * strings (rb_profile_frame_*, which allocate and so may run the GC or raise) happens
 * after it on the taken buffer, which no handler writes. The taken buffer stays marked
 * (its frames pinned) until it is cleared at the end, also when the conversion raises
 * (rb_ensure). One take at a time: a second concurrent take gets an empty window.
 *
 * Result: { samples: [[frames, labels, cpu_ns, count, wall_ns], ...], dropped_samples:,
 *           dropped_cpu_ns:, started_at_ns:, ended_at_ns: } (wall_ns 0 unless profile type
 * :wall is on)
 * frames is leaf first, each [name, file, line] (line 0 where there is none); a stack is
 * one frozen Array shared by all the samples that have it. What the buffer dropped when
 * full is one more sample, frames [["(dropped)", "", 0]] and no labels, so that the
 * samples' CPU is the window's whole CPU; dropped_samples and dropped_cpu_ns say the same.
 */
#include "pyroscope_otel.h"
#include <ruby/st.h>

struct take {
    po_agg *agg;
    VALUE *frames; /* a stack's frames and lines, PO_MAX_STACK each, in one allocation */
    int *lines;
    st_table *frame_cache; /* frame VALUE -> index in frame_objs */
    st_table *label_cache; /* po_labelset* -> index in label_objs */
    VALUE frame_objs, label_objs, stack_objs, result;
};

/* name and file of a frame: a frozen pair per distinct frame, shared by its lines */
static VALUE frame_info(struct take *tk, VALUE frame, int line)
{
    st_data_t idx;
    if (frame != PO_FRAME_SYNTHETIC && st_lookup(tk->frame_cache, (st_data_t)frame, &idx))
        return RARRAY_AREF(tk->frame_objs, (long)idx);
    VALUE file = frame == PO_FRAME_SYNTHETIC ? Qnil : rb_profile_frame_path(frame);
    VALUE info = rb_ary_new_from_args(2, po_frame_name(frame, line), NIL_P(file) ? rb_str_new_cstr("") : file);
    OBJ_FREEZE(info);
    if (frame != PO_FRAME_SYNTHETIC) st_insert(tk->frame_cache, (st_data_t)frame, (st_data_t)RARRAY_LEN(tk->frame_objs));
    rb_ary_push(tk->frame_objs, info);
    return info;
}

static VALUE frame_obj(struct take *tk, VALUE frame, int line)
{
    VALUE info = frame_info(tk, frame, line);
    VALUE obj = rb_ary_new_from_args(3, RARRAY_AREF(info, 0), RARRAY_AREF(info, 1), INT2NUM(line < 0 ? 0 : line));
    OBJ_FREEZE(obj);
    return obj;
}

static VALUE labels_obj(struct take *tk, po_labelset *ls)
{
    st_data_t idx;
    if (st_lookup(tk->label_cache, (st_data_t)ls, &idx)) return RARRAY_AREF(tk->label_objs, (long)idx);
    VALUE h = po_labelset_to_hash(ls);
    OBJ_FREEZE(h);
    st_insert(tk->label_cache, (st_data_t)ls, (st_data_t)RARRAY_LEN(tk->label_objs));
    rb_ary_push(tk->label_objs, h);
    return h;
}

static VALUE convert(VALUE arg)
{
    struct take *tk = (struct take *)arg;
    po_agg *a = tk->agg;
    tk->stack_objs = rb_ary_new_capa(a->stacks_used);
    for (uint32_t i = 0; i < a->stacks_used; i++) {
        uint32_t depth = po_agg_stack(a, i, tk->frames, tk->lines, PO_MAX_STACK);
        VALUE frames = rb_ary_new_capa(depth);
        for (uint32_t j = 0; j < depth; j++) rb_ary_push(frames, frame_obj(tk, tk->frames[j], tk->lines[j]));
        OBJ_FREEZE(frames);
        rb_ary_push(tk->stack_objs, frames);
    }
    VALUE samples = rb_ary_new_capa(a->samples_used);
    for (uint32_t i = 0; i < a->samples_used; i++) {
        po_sample *s = &a->samples[i];
        if (s->cpu_ns == 0 && s->wall_ns == 0) continue; /* all its CPU moved to its kind's stack (attribution.c) */
        rb_ary_push(samples, rb_ary_new_from_args(5, RARRAY_AREF(tk->stack_objs, s->stack), labels_obj(tk, s->labels),
                                                  ULL2NUM(s->cpu_ns), ULL2NUM(s->count), ULL2NUM(s->wall_ns)));
    }
    if (a->dropped_samples) {
        VALUE dropped = rb_ary_new_from_args(1, frame_obj(tk, PO_FRAME_SYNTHETIC, PO_LINE_DROPPED));
        OBJ_FREEZE(dropped);
        rb_ary_push(samples, rb_ary_new_from_args(5, dropped, labels_obj(tk, NULL), ULL2NUM(a->dropped_cpu_ns),
                                                  ULL2NUM(a->dropped_samples), ULL2NUM(a->dropped_wall_ns)));
    }
    VALUE r = tk->result;
    rb_hash_aset(r, ID2SYM(rb_intern("samples")), samples);
    rb_hash_aset(r, ID2SYM(rb_intern("dropped_samples")), ULL2NUM(a->dropped_samples));
    rb_hash_aset(r, ID2SYM(rb_intern("dropped_cpu_ns")), ULL2NUM(a->dropped_cpu_ns));
    return r;
}

static VALUE finish(VALUE arg)
{
    struct take *tk = (struct take *)arg;
    st_free_table(tk->frame_cache);
    st_free_table(tk->label_cache);
    xfree(tk->frames);
    po_window_end(tk->agg);
    return Qnil;
}

VALUE po_take_window(void)
{
    VALUE result = rb_hash_new();
    struct take tk = { 0 };
    tk.frames = xmalloc(PO_MAX_STACK * (sizeof(VALUE) + sizeof(int))); /* may raise: before the take */
    tk.lines = (int *)(tk.frames + PO_MAX_STACK);
    uint64_t started, ended;
    po_agg *a = po_window_begin(&started, &ended);
    rb_hash_aset(result, ID2SYM(rb_intern("started_at_ns")), ULL2NUM(started));
    rb_hash_aset(result, ID2SYM(rb_intern("ended_at_ns")), ULL2NUM(ended));
    if (!a) {
        xfree(tk.frames);
        rb_hash_aset(result, ID2SYM(rb_intern("samples")), rb_ary_new());
        rb_hash_aset(result, ID2SYM(rb_intern("dropped_samples")), INT2FIX(0));
        rb_hash_aset(result, ID2SYM(rb_intern("dropped_cpu_ns")), INT2FIX(0));
        return result;
    }
    tk.result = result;
    tk.agg = a;
    tk.frame_objs = rb_ary_new();
    tk.label_objs = rb_ary_new();
    tk.frame_cache = st_init_numtable();
    tk.label_cache = st_init_numtable();
    rb_ensure(convert, (VALUE)&tk, finish, (VALUE)&tk);
    RB_GC_GUARD(tk.frame_objs);
    RB_GC_GUARD(tk.label_objs);
    RB_GC_GUARD(tk.stack_objs);
    return result;
}

