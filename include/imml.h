/*
 * libimml - interventional imbalanced multi-modal representation learning.
 *
 * A C11 implementation of IMML (Li et al., "Interventional Imbalanced
 * Multi-Modal Representation Learning via beta-Generalization Front-Door
 * Criterion", arXiv 2406.11490): a modality discriminative knowledge
 * exploration network (MDKEN) with a contrastive alignment loss, and a
 * beta-generalization front-door adjustment (FDC) placed in front of the
 * host's fusion and target head (F&T).  Every number follows
 * doc/METHOD.md (the project's contract, copied from the design).
 *
 * Conventions
 * - Every function that can fail returns an imml_status.  IMML_OK is 0.
 *   A failed call leaves the model exactly as it was before the call
 *   (parameters, gradients, strata dictionary, optimiser state,
 *   predominant-modality state) and stores a message naming the problem,
 *   read with imml_errmsg().
 * - Caller-filled structs start with `size_t struct_size` and are set up by
 *   their *_init() function, which writes the defaults.  The library reads
 *   only the bytes struct_size covers, so fields can be appended without
 *   breaking programs built against an older header.
 * - Matrices are row-major float32.  "B x d" means B rows of d floats.
 * - The library never prints, never exits, never aborts, and keeps no
 *   global mutable state.  A model may be used by one thread at a time;
 *   different models may be used from different threads at once.
 *   imml_predict() on one model from several threads at once is safe when
 *   each thread passes its own imml_workspace.
 * - imml_backward() and imml_step() split their passes over every
 *   parameter (from 1 Mi parameters on) over as many threads as the BLAS
 *   uses (imml_blas_threads()); those threads start and end within the
 *   call, with every signal blocked, and results are the same for any
 *   thread count.  (Their stacks come from the system's thread library,
 *   which reuses them; a host that wants no threads at all sets the BLAS
 *   to one thread.)
 * - After imml_model_create() (or a load) the library allocates nothing in
 *   imml_forward(), imml_backward(), imml_fdc_adjust(), imml_step() and
 *   imml_predict(): every buffer is carved from one arena at create time.
 */
#ifndef IMML_H
#define IMML_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(IMML_BUILDING)
#define IMML_API __declspec(dllexport)
#elif defined(__GNUC__) && defined(IMML_BUILDING)
#define IMML_API __attribute__((visibility("default")))
#else
#define IMML_API
#endif

/* ------------------------------------------------------------------ */
/* Version                                                             */
/* ------------------------------------------------------------------ */

#define IMML_VERSION_MAJOR 0
#define IMML_VERSION_MINOR 1
#define IMML_VERSION_PATCH 0
#define IMML_VERSION_NUMBER                                                    \
  (IMML_VERSION_MAJOR * 10000 + IMML_VERSION_MINOR * 100 + IMML_VERSION_PATCH)
#define IMML_VERSION_STRING "0.1.0"

/*! imml_version_number() :
 * @return IMML_VERSION_NUMBER of the library actually linked, so a program
 *         can check that header and library agree. */
IMML_API unsigned imml_version_number(void);

/*! imml_version_string() : @return "MAJOR.MINOR.PATCH", static storage. */
IMML_API const char *imml_version_string(void);

/* ------------------------------------------------------------------ */
/* Status codes: explicit, frozen, append-only.                        */
/* ------------------------------------------------------------------ */

typedef enum imml_status {
  IMML_OK = 0,
  IMML_ERR_NULL = 1,            /* a required pointer argument is NULL */
  IMML_ERR_INVALID_ARG = 2,     /* a value is out of its allowed range */
  IMML_ERR_NOMEM = 3,           /* the allocator returned NULL */
  IMML_ERR_SHAPE = 4,           /* batch size / dimensions do not match */
  IMML_ERR_LABEL = 5,           /* a label is outside 0..C-1 */
  IMML_ERR_STATE = 6,           /* call made in the wrong state/order */
  IMML_ERR_CALLBACK = 7,        /* an F&T callback returned non-zero */
  IMML_ERR_NONFINITE = 8,       /* NaN or Inf in an input or a result */
  IMML_ERR_IO = 9,              /* the operating system refused I/O */
  IMML_ERR_BAD_MAGIC = 10,      /* not an imml checkpoint */
  IMML_ERR_BAD_VERSION = 11,    /* checkpoint format version unknown */
  IMML_ERR_TRUNCATED = 12,      /* checkpoint shorter than it says */
  IMML_ERR_CHECKSUM = 13,       /* checkpoint CRC-32 does not match */
  IMML_ERR_FORMAT = 14,         /* checkpoint field invalid/inconsistent */
  IMML_ERR_TOO_LARGE = 15,      /* sizes overflow or exceed the limits */
  IMML_ERR_NEED_CALLBACKS = 16, /* checkpoint needs host F&T callbacks */
  IMML_ERR_BUFFER_SMALL = 17    /* caller buffer too small */
} imml_status;

/*! imml_strerror() : @return a static, constant description of `status`
 *  ("unknown status" for values this version does not know). */
IMML_API const char *imml_strerror(imml_status status);

/* ------------------------------------------------------------------ */
/* Configuration                                                       */
/* ------------------------------------------------------------------ */

/** Largest number of modalities a model may have. */
#define IMML_MAX_MODALITIES 64

/** Optional allocator hooks.  Both or neither must be set.  Every
 *  allocation the library makes goes through them.  `malloc_fn` need not
 *  zero the memory; alignment must be suitable for float and double. */
typedef struct imml_allocator {
  void *(*malloc_fn)(size_t size, void *user_data);
  void (*free_fn)(void *ptr, void *user_data);
  void *user_data;
} imml_allocator;

/** How the auxiliary modalities reach the F&T (METHOD.md section 2). */
typedef enum imml_slot_mode {
  IMML_SLOT_CONDITIONAL = 0, /* slot_a = z_a + xhat_a (default) */
  IMML_SLOT_STRICT = 1       /* slot_a = xhat_a */
} imml_slot_mode;

typedef struct imml_config {
  size_t struct_size;       /* = sizeof(imml_config), set by imml_config_init */
  int n_modalities;         /* M, 2..IMML_MAX_MODALITIES (default 2) */
  const int *dims;          /* M feature widths d_m >= 1; copied at create.
                               Default NULL: must be set. */
  int hidden_dim;           /* H (default 256) */
  int knowledge_dim;        /* k (default 128) */
  int n_classes;            /* C >= 2 (default 0: must be set) */
  int max_batch;            /* largest B of any call (default 64) */
  int dict_size;            /* J, strata dictionary capacity (default 256) */
  float beta;               /* in [0, 1] (default 0.5) */
  float gamma1;             /* weight of L_con, >= 0 (default 0.1) */
  float gamma2;             /* weight of L_dis, >= 0 (default 1.0) */
  float tau;                /* contrastive temperature > 0 (default 0.1) */
  int predominant;          /* p in 0..M-1, or -1 = choose (default -1) */
  int warmup_steps;         /* >= 0 (default 100); see imml_predominant() */
  int slot_mode;            /* imml_slot_mode (default conditional) */
  uint64_t seed;            /* parameter initialisation seed (default 0) */
  imml_allocator allocator; /* default: malloc/free */
} imml_config;

/*! imml_config_init() : writes METHOD.md's defaults into *cfg, including
 *  struct_size.  dims and n_classes must still be set by the caller. */
IMML_API void imml_config_init(imml_config *cfg);

/* ------------------------------------------------------------------ */
/* Fusion and target (F&T) callbacks                                   */
/* ------------------------------------------------------------------ */

/** A host F&T: any function from the M slots (each B x k, modality order)
 *  to logits (B x C).  Callbacks run synchronously on the calling thread.
 *  A non-zero return aborts the libimml call with IMML_ERR_CALLBACK and
 *  the model is left unchanged.
 *
 *  forward:  write logits (B x C).  `training` is 1 when a backward for
 *            this batch may follow (cache what the backward needs), 0 for
 *            evaluation.
 *  backward: given dL/dlogits (B x C) for the last training forward,
 *            overwrite dslots[m] (B x k each) with dL/dslot_m and
 *            accumulate the host's own parameter gradients.  `slots` are the
 *            same values the training forward received.
 */
typedef struct imml_ft_ops {
  size_t struct_size; /* = sizeof(imml_ft_ops) */
  int (*forward)(void *user_data, int training, int batch, int n_modalities,
                 int knowledge_dim, const float *const *slots, int n_classes,
                 float *logits);
  int (*backward)(void *user_data, int batch, int n_modalities,
                  int knowledge_dim, const float *const *slots,
                  const float *dlogits, int n_classes, float *const *dslots);
  void *user_data;
} imml_ft_ops;

/*! imml_ft_ops_init() : zeroes *ops and sets struct_size. */
IMML_API void imml_ft_ops_init(imml_ft_ops *ops);

/* ------------------------------------------------------------------ */
/* Model lifetime                                                      */
/* ------------------------------------------------------------------ */

typedef struct imml_model imml_model;

/*! imml_model_create() :
 *  Validates `cfg`, allocates every buffer the model will ever need and
 *  initialises the parameters (METHOD.md section 6).
 *  @ft   NULL for the built-in concat + linear F&T (parameters ft.w, ft.b),
 *        or host callbacks (copied; user_data must outlive the model).
 *  @out  receives the model, or NULL on failure.
 *  @return IMML_OK, or IMML_ERR_NULL / IMML_ERR_INVALID_ARG /
 *          IMML_ERR_TOO_LARGE / IMML_ERR_NOMEM.  Use imml_model_create_ex()
 *          to receive the message that names the offending field. */
IMML_API imml_status imml_model_create(const imml_config *cfg,
                                       const imml_ft_ops *ft, imml_model **out);

/*! imml_model_create_ex() : as imml_model_create(), and on failure writes
 *  a NUL-terminated message naming the field and its value into
 *  errmsg[0..errmsg_size-1] (errmsg may be NULL). */
IMML_API imml_status imml_model_create_ex(const imml_config *cfg,
                                          const imml_ft_ops *ft,
                                          imml_model **out, char *errmsg,
                                          size_t errmsg_size);

/*! imml_model_free() : releases everything; NULL is a no-op. */
IMML_API void imml_model_free(imml_model *model);

/*! imml_errmsg() : the message of the last failed call on `model`, or ""
 *  after a successful one.  Owned by the model; valid until the next call
 *  on it.  NULL model: a static text. */
IMML_API const char *imml_errmsg(const imml_model *model);

/*! imml_model_config() : copies the model's configuration into *cfg (dims
 *  points into the model and lives as long as it). */
IMML_API imml_status imml_model_config(const imml_model *model,
                                       imml_config *cfg);

/* ------------------------------------------------------------------ */
/* Forward, backward, front-door adjustment                            */
/* ------------------------------------------------------------------ */

typedef enum imml_mode {
  IMML_MODE_TRAIN = 0, /* computes every loss term; a backward may follow */
  IMML_MODE_EVAL = 1   /* never changes the model; labels optional */
} imml_mode;

/** Loss terms of one forward (METHOD.md section 4), summed in double.
 *  total = ce + gamma1 * con + gamma2 * dis.  All NaN when no labels. */
typedef struct imml_losses {
  double total;
  double ce;  /* CE(logits, y) of the F&T */
  double con; /* L_con, 0 during warm-up */
  double dis; /* L_dis */
} imml_losses;

/*! imml_forward() :
 *  @features  M pointers, features[m] is B x dims[m].
 *  @labels    B labels in 0..C-1; required for IMML_MODE_TRAIN, optional
 *             (NULL) for IMML_MODE_EVAL.
 *  @logits    NULL or B x C output.
 *  @losses    NULL or output (NaN fields when labels is NULL).
 *  A training forward copies what the backward needs; the model's
 *  parameters, gradients and dictionary are not changed.  An evaluation
 *  forward uses separate scratch, so it may run between a training forward
 *  and its backward.  Non-finite features are refused (IMML_ERR_NONFINITE). */
IMML_API imml_status imml_forward(imml_model *model, imml_mode mode, int batch,
                                  const float *const *features,
                                  const int *labels, float *logits,
                                  imml_losses *losses);

/*! imml_backward() :
 *  Accumulates (+=) into every parameter's gradient the gradient of the
 *  total loss of the last training forward, then completes the training
 *  step: pushes the batch's knowledge into the strata dictionary and
 *  advances the warm-up (METHOD.md sections 2 and 5).
 *  @dfeatures  NULL, or M pointers each NULL or B x dims[m]: overwritten
 *              with dL/dh_m (contents unspecified if the call fails).
 *  @return IMML_ERR_STATE without a preceding training forward;
 *          IMML_ERR_CALLBACK, IMML_ERR_NONFINITE: nothing in the model was
 *          changed and the step stays pending.  A host F&T backward that
 *          already ran has accumulated into the host's own gradients: a
 *          host that retries or skips the step should reset those. */
IMML_API imml_status imml_backward(imml_model *model, float *const *dfeatures);

/*! imml_fdc_adjust() :
 *  The front-door adjustment alone: from M knowledge matrices (B x k) and
 *  the current dictionary, write the M F&T slots (B x k each) exactly as a
 *  forward would build them (during warm-up: slot_m = z_m).  An empty
 *  dictionary is replaced by the batch's own knowledge, as in forward.
 *  No side effects.  slots must not overlap knowledge. */
IMML_API imml_status imml_fdc_adjust(imml_model *model, int batch,
                                     const float *const *knowledge,
                                     float *const *slots);

/* ------------------------------------------------------------------ */
/* Parameters                                                          */
/* ------------------------------------------------------------------ */

typedef struct imml_param_view {
  const char *name; /* "m0.w1", "fdc.wq", "ft.w", ... (model-owned) */
  int rows;         /* n_in for weights, 1 for biases */
  int cols;         /* n_out */
  float *data;      /* rows x cols row-major, owned by the model */
  float *grad;      /* same shape */
} imml_param_view;

/*! imml_param_count() : number of named parameter tensors (0 for NULL). */
IMML_API int imml_param_count(const imml_model *model);

/*! imml_param_info() : the i-th tensor, 0 <= i < imml_param_count().
 *  Order: per modality m: m<m>.w1 b1 w2 b2 wc bc; fdc.wq fdc.wk; then
 *  ft.w ft.b (built-in F&T only).  The host may read and write data and
 *  grad through the view (its own optimiser, gradient reduction). */
IMML_API imml_status imml_param_info(imml_model *model, int i,
                                     imml_param_view *view);

/*! imml_params_flat() : every parameter (in imml_param_info order, no
 *  padding) is one contiguous block of *count floats, and so is every
 *  gradient (same layout): one allreduce reduces all gradients.  data and
 *  grad may be NULL.  Once the host holds a pointer to a block (from here
 *  or imml_param_info), imml_backward() and imml_step() read that block
 *  to see what the host wrote, which costs a pass over it per call. */
IMML_API imml_status imml_params_flat(imml_model *model, float **data,
                                      float **grad, size_t *count);

/*! imml_zero_grad() : sets every gradient to 0. */
IMML_API imml_status imml_zero_grad(imml_model *model);

/*! imml_predominant() : *p receives the predominant modality, or -1 while
 *  it is not chosen yet; *fixed (may be NULL) 1 once it is fixed.  A
 *  predominant modality named in the config is fixed from the start and
 *  there is no warm-up. */
IMML_API imml_status imml_predominant(const imml_model *model, int *p,
                                      int *fixed);

/*! imml_warmup_state() : completed training steps counted so far (capped
 *  at warmup_steps once fixed) and the per-modality accuracy EMAs e_m
 *  (ema may be NULL; otherwise M floats). */
IMML_API imml_status imml_warmup_state(const imml_model *model, int *steps,
                                       float *ema);

/*! imml_dict_fill() : J_eff, the number of filled dictionary entries. */
IMML_API int imml_dict_fill(const imml_model *model);

/* ------------------------------------------------------------------ */
/* Optimisers                                                          */
/* ------------------------------------------------------------------ */

typedef enum imml_optimizer_kind {
  IMML_OPT_SGD = 0,  /* PyTorch SGD: momentum, dampening 0, nesterov */
  IMML_OPT_ADAMW = 1 /* PyTorch AdamW: bias-corrected, decoupled decay */
} imml_optimizer_kind;

typedef struct imml_optim_config {
  size_t struct_size;
  int kind;           /* imml_optimizer_kind (default AdamW) */
  float lr;           /* default 1e-3 */
  float weight_decay; /* default 0.01 for AdamW, 0 for SGD */
  float momentum;     /* SGD (default 0) */
  int nesterov;       /* SGD, needs momentum > 0 (default 0) */
  float beta1;        /* AdamW (default 0.9) */
  float beta2;        /* AdamW (default 0.999) */
  float eps;          /* AdamW (default 1e-8) */
  float clip_norm;    /* > 0: clip the global gradient L2 norm to this
                         before the update (PyTorch clip_grad_norm_); 0 off */
} imml_optim_config;

/*! imml_optim_config_init() : PyTorch's defaults for `kind`. */
IMML_API void imml_optim_config_init(imml_optim_config *cfg,
                                     imml_optimizer_kind kind);

/*! imml_optim_setup() : attaches an optimiser to the model, allocating its
 *  state (moments) once.  Calling it again replaces the optimiser and
 *  resets its state. */
IMML_API imml_status imml_optim_setup(imml_model *model,
                                      const imml_optim_config *cfg);

/*! imml_optim_set_lr() : changes the learning rate for the next steps. */
IMML_API imml_status imml_optim_set_lr(imml_model *model, float lr);

/*! imml_step() : applies one update from the accumulated gradients, then
 *  sets every gradient to 0.  Refuses (IMML_ERR_NONFINITE, nothing
 *  changed) when a gradient or an updated value would be non-finite. */
IMML_API imml_status imml_step(imml_model *model);

/* ------------------------------------------------------------------ */
/* Checkpoints (format: doc/FORMAT.md)                                 */
/* ------------------------------------------------------------------ */

typedef struct imml_load_options {
  size_t struct_size;
  imml_allocator allocator; /* default: malloc/free */
  char *errmsg;             /* optional out: message of a failure */
  size_t errmsg_size;
} imml_load_options;

IMML_API void imml_load_options_init(imml_load_options *opt);

/*! imml_save() : writes the model atomically (temporary file + rename). */
IMML_API imml_status imml_save(imml_model *model, const char *path);

/*! imml_save_mem() : with buf NULL, *size receives the byte count needed;
 *  otherwise writes at most `capacity` bytes (IMML_ERR_BUFFER_SMALL when
 *  too small) and *size receives the count written. */
IMML_API imml_status imml_save_mem(imml_model *model, void *buf,
                                   size_t capacity, size_t *size);

/*! imml_load() / imml_load_mem() : validates every field before use.  A
 *  checkpoint of a model with host F&T needs `ft`; one with the built-in
 *  F&T ignores it unless given, in which case it is refused. */
IMML_API imml_status imml_load(const char *path, const imml_ft_ops *ft,
                               imml_model **out);
IMML_API imml_status imml_load_mem(const void *buf, size_t size,
                                   const imml_ft_ops *ft, imml_model **out);
IMML_API imml_status imml_load_ex(const char *path, const imml_ft_ops *ft,
                                  const imml_load_options *opt,
                                  imml_model **out);
IMML_API imml_status imml_load_mem_ex(const void *buf, size_t size,
                                      const imml_ft_ops *ft,
                                      const imml_load_options *opt,
                                      imml_model **out);

/* ------------------------------------------------------------------ */
/* Inference                                                           */
/* ------------------------------------------------------------------ */

typedef struct imml_workspace imml_workspace;

/*! imml_workspace_create() : scratch for imml_predict(), sized for the
 *  model's max_batch, allocated with the model's allocator.  One per
 *  thread; it can be used with any model of the same shape. */
IMML_API imml_status imml_workspace_create(const imml_model *model,
                                           imml_workspace **out);
IMML_API void imml_workspace_free(imml_workspace *ws);
IMML_API const char *imml_workspace_errmsg(const imml_workspace *ws);

/*! imml_predict() : evaluation forward that only reads the model.
 *  @logits, @probs  NULL or B x C outputs (probs = softmax(logits)).
 *  @classes         NULL or B argmax classes. */
IMML_API imml_status imml_predict(const imml_model *model, imml_workspace *ws,
                                  int batch, const float *const *features,
                                  float *logits, float *probs, int *classes);

/* ------------------------------------------------------------------ */
/* Data-parallel training (doc/DISTRIBUTED.md)                         */
/* ------------------------------------------------------------------ */

/** The one collective libimml needs, given by the host (MPI_Allgather,
 *  NCCL, threads, ...): libimml itself stays free of any transport. */
typedef struct imml_collective {
  size_t struct_size;
  int world_size; /* R >= 1 */
  int rank;       /* this process, 0..R-1 */
  /* Gathers `count` floats from every rank into recv (R * count floats,
   * rank order).  count is the same on every rank.  Non-zero aborts the
   * libimml call with IMML_ERR_CALLBACK. */
  int (*allgather)(void *user_data, const float *send, size_t count,
                   float *recv);
  void *user_data;
} imml_collective;

/*! imml_collective_init() : zeroes *c, sets struct_size and world_size 1. */
IMML_API void imml_collective_init(imml_collective *c);

/*! imml_set_collective() :
 *  Makes every training step of this model one shard of a global batch:
 *  the global batch is the concatenation of every rank's batch in rank
 *  order (shards may differ in size).  A training forward gathers each
 *  rank's knowledge rows, labels and unimodal accuracy counts (one
 *  allgather), so that L_con is computed over the global batch, an empty
 *  dictionary is replaced by the global batch's knowledge, the warm-up
 *  uses the global accuracy, and imml_backward pushes the global batch
 *  into the dictionary: every rank keeps an identical dictionary and
 *  predominant-modality state.  The gradients a rank computes are scaled
 *  so that their plain mean over the R ranks equals the gradient of the
 *  single-process loss on the global batch: allreduce-sum them and divide
 *  by R.  Reported ce and dis are the rank's own means, con the global
 *  value.  Evaluation and imml_predict stay local.
 *  NULL detaches.  Allocates the gathered buffers (for R * max_batch rows);
 *  IMML_ERR_STATE while a training step is pending. */
IMML_API imml_status imml_set_collective(imml_model *model,
                                         const imml_collective *c);

/*! imml_predict_unimodal() : after a successful imml_predict() with this
 *  workspace, copies modality m's unimodal head logits o_m (METHOD.md
 *  section 1) for the same batch into logits (B x C).  IMML_ERR_STATE
 *  before any successful imml_predict on the workspace. */
IMML_API imml_status imml_predict_unimodal(const imml_workspace *ws, int m,
                                           float *logits);

/*! imml_blas_threads() : sets the number of threads of the BLAS library
 *  (process-wide, it is BLAS's own setting) when that BLAS supports it.
 *  libimml's own element-wise passes follow the same number.
 *  @return the number now in effect, or 0 if unknown. */
IMML_API int imml_blas_threads(int n);

#ifdef __cplusplus
}
#endif

#endif /* IMML_H */
