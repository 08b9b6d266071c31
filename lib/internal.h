/*
 * The model struct and the prototypes shared inside lib/.  Nothing here is
 * exported: the shared library's symbols are those of imml.h only.
 */
#ifndef IMML_INTERNAL_H
#define IMML_INTERNAL_H

#define IMML_EXPERIMENTAL
#include "imml.h"

#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#define IMML_ERRMSG_SIZE 256
#define IMML_NAME_SIZE 16
/* Per modality: w1 b1 w2 b2 wc bc; then fdc.wq fdc.wk ft.w ft.b. */
#define IMML_PER_MODALITY 6
#define IMML_MAX_TENSORS (IMML_PER_MODALITY * IMML_MAX_MODALITIES + 4)

enum { T_W1 = 0, T_B1, T_W2, T_B2, T_WC, T_BC };

/* Named views of one parameter-shaped block (the parameters, the
 * gradients or the staging block of a backward), built once when a model
 * or share is made (imml_ptensors_point), as llm.c's ParameterTensors: the
 * method files name a tensor instead of computing its index.  The public
 * order and names (imml_param_get) are the layout's, in arena.c. */
typedef struct imml_ptensors {
  float *w1[IMML_MAX_MODALITIES]; /* (d_m, H) */
  float *b1[IMML_MAX_MODALITIES]; /* (H) */
  float *w2[IMML_MAX_MODALITIES]; /* (H, k) */
  float *b2[IMML_MAX_MODALITIES]; /* (k) */
  float *wc[IMML_MAX_MODALITIES]; /* (k, C) */
  float *bc[IMML_MAX_MODALITIES]; /* (C) */
  float *wq;                      /* fdc.wq (M k, k) */
  float *wk;                      /* fdc.wk (M k, k) */
  float *ftw;                     /* ft.w (M k, C); NULL with host F&T */
  float *ftb;                     /* ft.b (C); NULL with host F&T */
} imml_ptensors;

typedef struct imml_tensor {
  char name[IMML_NAME_SIZE];
  int rows, cols;
  int fan_in;    /* n_in of the layer (METHOD.md section 6) */
  size_t offset; /* into params / grads, in floats */
} imml_tensor;

/* A read-only view of the strata a forward attends over: either the
 * dictionary (row stride M k) or the batch's own detached knowledge. */
typedef struct fdc_view {
  const float *d[IMML_MAX_MODALITIES]; /* d[m]: (n, k), row stride ld */
  int ld;
  int n;         /* J_eff */
  int one_block; /* 1: d[0] is one (n, M k) matrix, modalities in order */
} fdc_view;

/* Activations of one forward.  The model owns one for training (with the
 * feature copies the backward needs) and one for evaluation; a share owns
 * an evaluation one of its own.  The attention's scratch is apart
 * (fdc_scratch): a collective step may use a larger one. */
typedef struct imml_acts {
  int batch;
  int warm; /* 1: forward ran in warm-up (slots = z, no L_con) */
  int p;    /* predominant modality used (-1 in warm-up) */
  int has_labels;
  int gathered;                   /* training forward of a collective step */
  int query_side;                 /* attention scores via qk, not kk */
  fdc_view view;                  /* the strata attended over */
  float *h[IMML_MAX_MODALITIES];  /* (B, d_m) copies, training only */
  float *u[IMML_MAX_MODALITIES];  /* (B, H) relu(h W1 + b1) */
  float *z[IMML_MAX_MODALITIES];  /* (B, k) knowledge */
  float *o[IMML_MAX_MODALITIES];  /* (B, C) unimodal logits */
  float *po[IMML_MAX_MODALITIES]; /* (B, C) softmax(o) */
  float *nz[IMML_MAX_MODALITIES]; /* (B, k) row-normalised z */
  float *r[IMML_MAX_MODALITIES];  /* (B) normalisation denominators */
  /* (B, B) S = n_p n_aᵀ / tau of each auxiliary and its transpose; once
   * L_con is computed, each holds its rows' softmax (for the backward) */
  float *s[IMML_MAX_MODALITIES];
  float *st[IMML_MAX_MODALITIES];
  float *slot[IMML_MAX_MODALITIES]; /* (B, k) F&T inputs */
  float *q;                         /* (B, k) */
  float *qk;                        /* (B, M k) q Wkᵀ, modality order */
  float *logits;                    /* (B, C) */
  float *probs;                     /* (B, C) softmax(logits) */
  int *labels;                      /* (B) */
  int correct[IMML_MAX_MODALITIES]; /* unimodal correct counts */
  double ce[IMML_MAX_MODALITIES];   /* unimodal batch cross-entropies */
  imml_losses losses;
} imml_acts;

/* The attention scratch of one forward and its backward (fdc.c): the
 * model's own (m->train_att, m->eval_att, for jmax strata) or, in a
 * collective step whose gathered batch exceeds jmax, the collective's
 * (m->coll.att, for R max_batch strata).  The caller picks it and passes
 * it to fdc_forward and fdc_backward; nothing is swapped.  The forward
 * writes kk, alpha and w, the backward reads them and writes dw, de, dk
 * (NULL in an evaluation scratch). */
typedef struct fdc_scratch {
  float *kk;    /* (Jmax, k) keys c = D Wk */
  float *alpha; /* (B, Jmax) */
  float *w;     /* (B, Jmax) */
  float *dw;    /* (B, Jmax) */
  float *de;    /* (B, Jmax) */
  float *dk;    /* (Jmax, k) */
} fdc_scratch;

/* Backward scratch (training only). */
typedef struct imml_grads_scratch {
  float *dlogits;                    /* (B, C) */
  float *dslot[IMML_MAX_MODALITIES]; /* (B, k) */
  float *dz[IMML_MAX_MODALITIES];    /* (B, k) */
  float *dn_p;                       /* (B, k) */
  float *dn_a;                       /* (B, k) */
  float *ds;                         /* (B, B) */
  float *dst;                        /* (B, B) */
  float *dq;                         /* (B, k) */
  float *dqk;                        /* (B, M k) */
  float *dout;                       /* (B, C) */
  float *du;                         /* (B, H) */
} imml_grads_scratch;

/* Gathered global batch of a collective training step (imml_set_collective).
 * Rows are in rank order; this rank's rows start at `off`. */
typedef struct imml_coll {
  int active;
  imml_collective ops;
  size_t count;                   /* floats each rank sends */
  float *send;                    /* (count) */
  float *recv;                    /* (R, count) */
  int n;                          /* G = rows of the global batch */
  int off;                        /* first row of this rank */
  float *z[IMML_MAX_MODALITIES];  /* (G, k) gathered knowledge */
  float *nz[IMML_MAX_MODALITIES]; /* (G, k) */
  float *r[IMML_MAX_MODALITIES];  /* (G) */
  float *s[IMML_MAX_MODALITIES];  /* (G, G) as imml_acts.s */
  float *st[IMML_MAX_MODALITIES]; /* (G, G) as imml_acts.st */
  float *ds, *dst;                /* (G, G) */
  int *labels;                    /* (G) */
  double ce[IMML_MAX_MODALITIES]; /* unimodal CE sums over ranks */
  /* Attention scratch for up to R * max_batch strata (an empty dictionary
   * is replaced by the gathered batch), allocated only when that exceeds
   * the model's jmax (att.kk NULL otherwise): a gathered step's forward
   * and backward are then given it instead of m->train_att. */
  fdc_scratch att;
  void *block;
} imml_coll;

/* The micro-batches of the training step being accumulated (imml_backward
 * adds, imml_commit ends the step).  Their knowledge rows wait in a ring of
 * dict_size entries laid out like the dictionary (only the last J rows of a
 * step can survive in it), their unimodal statistics in sums. */
typedef struct imml_accum {
  int micro;    /* backwards since the last commit */
  float *rows;  /* (J, M k) staged entries, ring */
  size_t n;     /* rows staged this step (may exceed J) */
  int pos;      /* next staging slot */
  int adv;      /* where K successive pushes would move the ring, mod J */
  int64_t seen; /* rows counted in the statistics below */
  double ce[IMML_MAX_MODALITIES];     /* sum over rows of unimodal CE */
  double ce_one[IMML_MAX_MODALITIES]; /* the last local micro-batch's mean */
  int gathered;                       /* the last micro-batch was gathered */
} imml_accum;

/* The most optimiser steps a model may take or a checkpoint may hold:
 * every step count up to it is exact in double, so the bias corrections
 * 1 - beta^t stay finite and t + 1 never overflows. */
#define IMML_OPTIM_STEPS_MAX ((int64_t)1 << 53)

typedef struct imml_optim {
  int active;
  imml_optim_config cfg;
  int64_t t;   /* completed updates */
  float *m1;   /* (n_params) momentum / first moment */
  float *m2;   /* (n_params) second moment (AdamW) */
  int has_buf; /* SGD: momentum buffer initialised */
  void *block; /* the allocation holding m1, m2 */
} imml_optim;

enum { IMML_EXPOSED_PARAMS = 1, IMML_EXPOSED_GRADS = 2 };

/* What the library knows about blocks only it writes, so that a step can
 * skip reading them.  Changed only by imml_cache_note (cache.h), where
 * each call site says what happened. */
typedef struct imml_cache {
  int grads_zero; /* the gradients were last set to +0.0 by the library */
  /* Blocks the host may write through pointers it was given
   * (imml_param_get/find, imml_param_flat), for good: IMML_EXPOSED_*. */
  int exposed;
  /* max |params| and max |grads| (NaN: not known), trusted while neither
   * block is exposed: a step then proves its update finite without reading
   * either block. */
  float max_p, max_g;
  /* AdamW: max |m1| and max |m2| (NaN: not known, e.g. after a load);
   * the moments are never exposed. */
  float max1, max2;
} imml_cache;

struct imml_model {
  imml_allocator alloc;
  imml_config cfg; /* cfg.dims points at dims[] */
  int dims[IMML_MAX_MODALITIES];
  int builtin_ft;
  imml_ft_ops ft;
  char errmsg[IMML_ERRMSG_SIZE];

  int n_tensors;
  imml_tensor tensors[IMML_MAX_TENSORS];
  size_t n_params;
  float *params; /* (n_params) */
  float *grads;  /* (n_params) */
  float *stage;  /* (n_params) gradients of one backward, before commit */
  /* Named views of params, grads and stage (a share: params only). */
  imml_ptensors pt, gt, stt;
  imml_cache cache; /* facts about params, grads, moments (cache.h) */

  /* Strata dictionary: J entries of M k floats, entry j = [d_j0; d_j1; ..]
   * in modality order. */
  float *dict;
  int dict_fill; /* J_eff */
  int dict_pos;  /* next ring slot to write */

  /* Predominant modality (METHOD.md section 5). */
  int p; /* -1 until fixed */
  int p_fixed;
  int steps; /* completed training steps while choosing */
  float ema[IMML_MAX_MODALITIES];

  int pending; /* a training forward awaits its backward */
  int jmax;    /* max(J, max_batch): rows of any strata view */
  imml_acts train;
  imml_acts eval;
  fdc_scratch train_att; /* the attention scratch of train (with dw, de, dk) */
  fdc_scratch eval_att;  /* ... and of eval (kk, alpha, w only) */
  imml_grads_scratch g;

  imml_optim opt;
  imml_coll coll;
  imml_accum acc;
  void *arena;
  size_t arena_bytes;
  /* The matrix products' context (kernels.h): NULL in float32, a bf16
   * model's (and each share's own) scratch otherwise. */
  struct k_ctx *gemm;

  int failed;               /* a failed create/load: holds errmsg only */
  const imml_model *parent; /* a share: reads parent's state (not NULL) */
  int eval_valid;           /* eval holds a successful evaluation */
};

/* status.c */
void imml_set_err(char *buf, size_t size, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
imml_status imml_fail(imml_model *m, imml_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Enters a public call on a handle: NULL and failed handles are refused
 * (a failed handle keeps its message), the message is cleared.  The
 * _TRAIN form also refuses a share. */
imml_status imml_enter(imml_model *m, int writes);
#define IMML_ENTER(m)                                                          \
  do {                                                                         \
    imml_status st_enter_ = imml_enter((m), 0);                                \
    if (st_enter_ != IMML_OK)                                                  \
      return st_enter_;                                                        \
  } while (0)
#define IMML_ENTER_TRAIN(m)                                                    \
  do {                                                                         \
    imml_status st_enter_ = imml_enter((m), 1);                                \
    if (st_enter_ != IMML_OK)                                                  \
      return st_enter_;                                                        \
  } while (0)
/* Leaves a public call that may have run matrix products, passing its
 * status through: the helper threads the products started in the call
 * (team.h) are joined, so no thread outlives a call. */
imml_status imml_leave(imml_model *m, imml_status st);
/* A failed handle holding `msg`, allocated with `a` (or malloc when a is
 * NULL or inconsistent); NULL when even that fails. */
imml_model *imml_failed_handle(const imml_allocator *a, const char *msg);
/* Sets *out to m on success, or to a failed handle holding err. */
imml_status imml_hand_out(imml_status st, imml_model *m,
                          const imml_allocator *a, const char *err,
                          imml_model **out);

/* Caller structs (doc/ABI.md): copies the caller's struct `src` (whose
 * first field is its struct_size) over `dst`, which holds this library's
 * defaults and is dst_size bytes.  Refuses a struct smaller than min_size
 * (the 1.0 fields) and one whose bytes from `known` on (the end of this
 * library's last field) are not all zero. */
imml_status imml_struct_in(void *dst, size_t dst_size, size_t known,
                           size_t min_size, const void *src, const char *type,
                           const char *init, char *err, size_t n);
/* The 1.0 sizes: the end of each struct's last 1.0 field.  Frozen: a
 * later field is appended after these and never changes them. */
#define IMML_END_OF(type, field)                                               \
  (offsetof(type, field) + sizeof(((type *)0)->field))
#define IMML_CONFIG_SIZE_1_0 IMML_END_OF(imml_config, memory_limit)
#define IMML_FT_OPS_SIZE_1_0 IMML_END_OF(imml_ft_ops, user_data)
#define IMML_OPTIM_CONFIG_SIZE_1_0 IMML_END_OF(imml_optim_config, flags)
#define IMML_LOAD_OPTIONS_SIZE_1_0 IMML_END_OF(imml_load_options, memory_limit)
#define IMML_COLLECTIVE_SIZE_1_0 IMML_END_OF(imml_collective, user_data)
/* The end of each struct's last field in this version: bytes from here on
 * are unknown.  Equal to the 1.0 sizes until a field is appended. */
#define IMML_CONFIG_SIZE_KNOWN IMML_END_OF(imml_config, memory_limit)
#define IMML_FT_OPS_SIZE_KNOWN IMML_END_OF(imml_ft_ops, user_data)
#define IMML_OPTIM_CONFIG_SIZE_KNOWN IMML_END_OF(imml_optim_config, flags)
#define IMML_LOAD_OPTIONS_SIZE_KNOWN                                           \
  IMML_END_OF(imml_load_options, memory_limit)
#define IMML_COLLECTIVE_SIZE_KNOWN IMML_END_OF(imml_collective, user_data)

/* rng.c (METHOD.md section 6) */
typedef struct imml_rng {
  uint64_t s[4];
} imml_rng;
void imml_rng_seed(imml_rng *r, uint64_t seed);
uint64_t imml_rng_next(imml_rng *r);
/* Fills n values U(-1/sqrt(n_in), 1/sqrt(n_in)), one draw each. */
void imml_rng_uniform_init(imml_rng *r, float *x, size_t n, int n_in);

/* config.c: validation with field-naming messages and overflow-checked
 * size arithmetic. */
imml_status imml_config_validate(const imml_config *cfg, imml_config *out,
                                 int *dims_out, char *err, size_t err_size);
imml_status imml_ft_validate(const imml_ft_ops *ft, imml_ft_ops *out, char *err,
                             size_t err_size);
/* a += b, a *= b with overflow detection; return 0 on overflow. */
int imml_size_add(size_t *a, size_t b);
int imml_size_mul(size_t *out, size_t a, size_t b);

/* arena.c */
void *imml_alloc(const imml_allocator *a, size_t bytes);
void imml_free(const imml_allocator *a, void *p);
/* A bump carver over one block; with base NULL it only counts. */
typedef struct imml_carver {
  char *base;
  size_t used;
  int overflow;
} imml_carver;
void *imml_carve(imml_carver *c, size_t count, size_t elem);
/* Carves an activation set for max_batch rows and the forward part of
 * its attention scratch (kk, alpha, w); training adds the feature
 * copies. */
void imml_carve_acts(imml_carver *c, const imml_config *cfg, int jmax,
                     int training, imml_acts *a, fdc_scratch *att);
uint64_t imml_params_layout(const imml_config *cfg, int builtin_ft,
                            imml_tensor *t, int *n_tensors);
/* Points the named views t into a parameter-shaped block at base (NULL:
 * every view NULL), by m's layout (m->tensors). */
void imml_ptensors_point(const imml_model *m, float *base, imml_ptensors *t);

/* mdken.c (METHOD.md section 1) */
void mdken_forward(const imml_model *m, imml_acts *a, const float *const *h);
/* Work floats one thread needs for a branch's backward at this batch
 * (SIZE_MAX if that overflows). */
size_t mdken_work_floats(const imml_config *c, int batch);
/* Work floats per thread a bf16 model's context holds: those of max_batch
 * where the branches may ever run as tasks (balanced at two threads),
 * else 0. */
size_t mdken_ctx_work_floats(const imml_config *c);
/* Contrastive loss over `n` rows (the batch, or a gathered global batch);
 * the backward adds the gradient for this rank's rows. */
typedef struct con_space {
  int n;
  float *const *z;
  float *const *nz;
  float *const *r;
  float *const *s;
  float *const *st;
  const int *labels;
  float *ds, *dst;
} con_space;
double mdken_contrastive_forward(const imml_model *m, int p,
                                 const con_space *cs);
/* The backward of mdken_forward and mdken_contrastive_forward: reads the
 * activations a (and cs, the contrastive space the forward used, whose
 * ds and dst it writes), takes dL/dslot from the F&T and FDC backwards in
 * g->dz, uses g's other buffers as scratch, and adds into the gradient
 * views dP; dh (NULL: not wanted) receives dL/dh.  off is this rank's first
 * row in cs; con_scale multiplies the contrastive gradient, ce_scale the
 * unimodal heads' (both 1 outside a collective step). */
void mdken_backward(const imml_model *m, const imml_acts *a,
                    imml_grads_scratch *g, const con_space *cs,
                    const imml_ptensors *dP, float *const *dh, int off,
                    float con_scale, float ce_scale);

/* par.c: fn(ctx, part, lo, hi) over [0, n) in contiguous parts, the first
 * on the calling thread; returns the number of parts (1..IMML_PAR_MAX),
 * which imml_par_parts(n) tells in advance.  Parts are numbered so that
 * per-part results can be combined in a fixed order. */
#define IMML_PAR_MAX 8
typedef void (*imml_range_fn)(void *ctx, int part, size_t lo, size_t hi);
int imml_par_parts(size_t n);
/* pthread_create with every signal blocked in the new thread (it inherits
 * the mask at creation), so no host signal handler ever runs on a libimml
 * thread: 1 if the thread started. */
int imml_thread_start(pthread_t *t, void *(*fn)(void *), void *arg);
int imml_par_for(size_t n, imml_range_fn fn, void *ctx);
/* k_all_zero and k_max_abs, split the same way. */
float imml_par_max_abs(size_t n, const float *x);
int imml_par_all_zero(size_t n, const float *x);

/* fdc.c (METHOD.md section 2) */
fdc_view fdc_dict_view(const imml_model *m);
fdc_view fdc_batch_view(const imml_model *m, const float *const *z, int n);
/* Slots from knowledge z (M pointers (B, k)) over view v; writes q, qk
 * of a and kk, alpha, w of att. */
void fdc_forward(const imml_model *m, imml_acts *a, const fdc_scratch *att,
                 int p, const float *const *z, float *const *slot,
                 const fdc_view *v);
/* The backward of fdc_forward over a and att (the same scratch): takes
 * dL/dslot in g->dslot, writes dL/dz into g->dz, adds into dg's fdc.wq
 * and fdc.wk. */
void fdc_backward(const imml_model *m, const imml_acts *a,
                  const fdc_scratch *att, imml_grads_scratch *g,
                  const imml_ptensors *dg);

/* collective.c: gathers the global batch of a collective training forward
 * into *g (this rank's rows start at g->off). */
imml_status imml_coll_gather(const imml_model *m, imml_acts *a, imml_coll *g,
                             char *err, size_t n);

/* model.c */
/* limit_name names the memory limit's field in a refusal; a model over the
 * limit is refused with IMML_ERR_TOO_LARGE and *out receives its handle,
 * turned into a failed handle holding the message. */
imml_status imml_model_build(const imml_config *cfg, const int *dims,
                             const imml_ft_ops *ft, const char *limit_name,
                             size_t extra_bytes, imml_model **out, char *err,
                             size_t n);
/* Pushes n staged entries (M k floats each, from rows in ring order
 * starting at first, ring of J) into the dictionary. */
void fdc_push_entries(imml_model *m, const float *rows, int first, int n);
/* Stages n rows of knowledge (M pointers (n, k)) for the next commit. */
void imml_stage_rows(imml_model *m, const float *const *z, int n);
/* A share reads its parent's dictionary and predominant state. */
void imml_share_sync(imml_model *m);
imml_status imml_check_batch(const imml_config *c, int batch,
                             const float *const *x, const int *labels,
                             int need_labels, char *err, size_t n);
/* One forward into a with attention scratch att; a collective training
 * forward (coll non-NULL) also gathers into *coll. */
imml_status imml_run_forward(const imml_model *m, imml_acts *a,
                             const fdc_scratch *att, int training, int batch,
                             const float *const *h, const int *labels,
                             imml_coll *coll, char *err, size_t n);

/* optim.c */
imml_status imml_optim_validate(const imml_optim_config *in,
                                imml_optim_config *out, char *err, size_t n);
imml_status imml_optim_alloc(imml_model *m, const imml_optim_config *c);

/* ft.c (METHOD.md section 3) */
int ft_forward(const imml_model *m, imml_acts *a, int training);
/* The backward of ft_forward over a: dL/dlogits in g->dlogits, dL/dslot
 * into g->dslot, ft.w and ft.b's gradients added into d. */
int ft_backward(const imml_model *m, const imml_acts *a, imml_grads_scratch *g,
                const imml_ptensors *d);

#endif /* IMML_INTERNAL_H */
