/**
 * @file imml.h
 * @brief libimml 1.x: interventional imbalanced multi-modal representation
 *        learning.
 *
 * A C11 implementation of IMML (Li et al., "Interventional Imbalanced
 * Multi-Modal Representation Learning via beta-Generalization Front-Door
 * Criterion", arXiv 2406.11490): a modality discriminative knowledge
 * exploration network (MDKEN) with a contrastive alignment loss, and a
 * beta-generalization front-door adjustment (FDC) placed in front of the
 * host's fusion and target head (F&T).  Every number follows
 * doc/METHOD.md (the project's contract, copied from the design).
 *
 * @par Conventions
 * - Every function that can fail returns an ::imml_status; ::IMML_OK is 0.
 *   A failed call leaves the model exactly as it was before the call
 *   (parameters, gradients, strata dictionary, optimiser state,
 *   predominant-modality state).
 * - **One error channel.** Every failing call on a model handle stores a
 *   message naming the problem in that handle, read with
 *   imml_model_errmsg().  This includes the constructors: a failed
 *   imml_model_create(), imml_model_load() or imml_model_load_mem() still
 *   returns a handle in `*out` (as sqlite3_open does) that holds only the
 *   message; read it, then imml_model_free() it.  Only when even that
 *   handle cannot be allocated, or `out` is NULL, is `*out` NULL.  (A
 *   failed imml_model_share() leaves its message in the shared model.)
 * - Caller-filled structs start with `size_t struct_size` and are set up by
 *   their `*_init()` function, which writes the defaults.  They grow by
 *   appending fields (doc/ABI.md): a struct from an older 1.x header gets
 *   the defaults for the fields it lacks; one from a newer header is
 *   accepted when every byte this library does not know is zero, and
 *   refused with ::IMML_ERR_UNKNOWN_FIELD otherwise.
 * - Matrices are row-major float32.  "B x d" means B rows of d floats.
 * - The library never prints, never exits, never aborts, and keeps no
 *   global mutable state.  A handle may be used by one thread at a time;
 *   different handles may be used from different threads at once.  To
 *   serve one model from several threads, give each thread a share of it
 *   (imml_model_share()).
 * - imml_backward() and imml_optim_step() split their passes over every
 *   parameter (from 1 Mi parameters on) over as many threads as the BLAS
 *   uses; a bf16 model (imml_config.precision) also runs its matrix
 *   products on up to that many threads (at most 8), where they are large
 *   enough, in imml_forward(), imml_backward(), imml_predict() and
 *   imml_fdc_adjust().  Those threads start and end
 *   within the call (they are alive while the call runs the host's
 *   callbacks), with every signal blocked, and results are the same for
 *   any thread count.
 * - Memory: every buffer a training or inference step needs is carved from
 *   one arena when the model is created or loaded; imml_forward(),
 *   imml_backward(), imml_commit(), imml_fdc_adjust(), imml_optim_step()
 *   and imml_predict() allocate nothing.  imml_optim_setup() (optimiser
 *   state), imml_model_share() (the share's scratch), imml_model_save()
 *   (the file image) and imml_collective_set() (gathered buffers) allocate,
 *   once per call, through the model's allocator.
 *
 * @par Names
 * Every public name starts with `imml_` or `IMML_`.  A function is
 * `imml_<noun>_<verb>`, the noun being what it acts on (`model`, `param`,
 * `grad`, `optim`, `predominant`, `fdc`, `config`, ...), except the calls
 * that run the method on one batch of a model, which are bare verbs:
 * imml_forward(), imml_backward(), imml_commit(), imml_predict().  A query
 * that returns its value directly names the value (imml_param_count(),
 * imml_version_number()).  doc/ABI.md has the full rule.
 *
 * @par Stable and experimental
 * Everything in this header is frozen for every 1.x release, except the
 * section compiled only when `IMML_EXPERIMENTAL` is defined before
 * including it (as zstd's ZSTD_STATIC_LINKING_ONLY): its names may change
 * or disappear in any release.
 */
#ifndef IMML_H
#define IMML_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** @cond INTERNAL */
#if defined(_WIN32) && defined(IMML_BUILDING)
#define IMML_API __declspec(dllexport)
#elif defined(__GNUC__) && defined(IMML_BUILDING)
#define IMML_API __attribute__((visibility("default")))
#else
#define IMML_API
#endif
/** @endcond */

/* ------------------------------------------------------------------ */
/** @name Version                                                      */
/* ------------------------------------------------------------------ */
/** @{ */

/** Major version: changes only when the ABI breaks (soname libimml.so.1). */
#define IMML_VERSION_MAJOR 1
/** Minor version: grows when a release adds to the API. */
#define IMML_VERSION_MINOR 0
/** Patch version: fixes only. */
#define IMML_VERSION_PATCH 0
/** The version as one number, MAJOR * 10000 + MINOR * 100 + PATCH. */
#define IMML_VERSION_NUMBER                                                    \
  (IMML_VERSION_MAJOR * 10000 + IMML_VERSION_MINOR * 100 + IMML_VERSION_PATCH)
/** The version as "MAJOR.MINOR.PATCH". */
#define IMML_VERSION_STRING "1.0.0"

/** The version number of the library actually linked, so a program can
 *  check that header and library agree.
 *  @return ::IMML_VERSION_NUMBER of the linked library. */
IMML_API unsigned imml_version_number(void);

/** The version string of the library actually linked.
 *  @return "MAJOR.MINOR.PATCH", in static storage. */
IMML_API const char *imml_version_string(void);

/** @} */

/* ------------------------------------------------------------------ */
/** @name Status codes                                                  */
/* ------------------------------------------------------------------ */
/** @{ */

/** What a call did.  Values are explicit, frozen and append-only. */
typedef enum imml_status {
  IMML_OK = 0,                  /**< success */
  IMML_ERR_NULL = 1,            /**< a required pointer argument is NULL */
  IMML_ERR_INVALID_ARG = 2,     /**< a value is out of its allowed range */
  IMML_ERR_NOMEM = 3,           /**< the allocator returned NULL */
  IMML_ERR_SHAPE = 4,           /**< batch size or dimensions do not match */
  IMML_ERR_LABEL = 5,           /**< a label is outside 0..C-1 */
  IMML_ERR_STATE = 6,           /**< call made in the wrong state or order */
  IMML_ERR_CALLBACK = 7,        /**< a host callback returned non-zero */
  IMML_ERR_NONFINITE = 8,       /**< NaN or Inf in an input or a result */
  IMML_ERR_IO = 9,              /**< the operating system refused I/O */
  IMML_ERR_BAD_MAGIC = 10,      /**< not an imml checkpoint */
  IMML_ERR_BAD_VERSION = 11,    /**< checkpoint format version unknown */
  IMML_ERR_TRUNCATED = 12,      /**< checkpoint shorter than it says */
  IMML_ERR_CHECKSUM = 13,       /**< checkpoint CRC-32 does not match */
  IMML_ERR_FORMAT = 14,         /**< checkpoint field invalid/inconsistent */
  IMML_ERR_TOO_LARGE = 15,      /**< sizes overflow or exceed a limit */
  IMML_ERR_NEED_CALLBACKS = 16, /**< checkpoint needs host F&T callbacks */
  IMML_ERR_BUFFER_SMALL = 17,   /**< caller buffer too small */
  /** a caller struct from a newer header sets a field this library does
   *  not know (a non-zero byte beyond this library's struct) */
  IMML_ERR_UNKNOWN_FIELD = 18,
  /** this build or this CPU lacks what the request needs */
  IMML_ERR_UNSUPPORTED = 19
} imml_status;

/** A description of a status code.
 *  @param status any value, known or not.
 *  @return a static, constant text ("unknown status" for values this
 *          version does not know). */
IMML_API const char *imml_status_string(imml_status status);

/** @} */

/* ------------------------------------------------------------------ */
/** @name Configuration                                                 */
/* ------------------------------------------------------------------ */
/** @{ */

/** Largest number of modalities a model may have. */
#define IMML_MAX_MODALITIES 64

/** Optional allocator hooks.  Both functions or neither must be set.
 *  Every allocation the library makes for a model goes through them, with
 *  one exception: the handle a create or load returns when it refuses its
 *  config or options (whose allocator is then not trusted) comes from
 *  malloc.  imml_model_free() releases each block the way it came. */
typedef struct imml_allocator {
  /** Returns `size` bytes aligned for float and double, or NULL.  Need
   *  not zero the memory. */
  void *(*malloc_fn)(size_t size, void *user_data);
  /** Releases a block from malloc_fn (never called with NULL). */
  void (*free_fn)(void *ptr, void *user_data);
  /** Passed unchanged to both functions. */
  void *user_data;
} imml_allocator;

/** How the auxiliary modalities reach the F&T (METHOD.md section 2). */
typedef enum imml_slot_mode {
  IMML_SLOT_CONDITIONAL = 0, /**< slot_a = z_a + xhat_a (default) */
  IMML_SLOT_STRICT = 1       /**< slot_a = xhat_a */
} imml_slot_mode;

/** Arithmetic of the matrix products. */
typedef enum imml_precision {
  IMML_PRECISION_FP32 = 0, /**< float32 everywhere (default) */
  /** bfloat16 inputs, float32 accumulation, for the matrix products only;
   *  weights, gradients, optimiser state, losses and the dictionary stay
   *  float32.  Needs a build with the bf16 kernel (meson option -Dbf16)
   *  and a CPU with AVX512-BF16; otherwise creation is refused with
   *  ::IMML_ERR_UNSUPPORTED and a message saying why. */
  IMML_PRECISION_BF16 = 1
} imml_precision;

/** Default of imml_config::memory_limit and
 *  imml_load_options::memory_limit: 8 GiB (SIZE_MAX on 32-bit systems). */
#define IMML_MEMORY_LIMIT_DEFAULT                                              \
  ((size_t)(SIZE_MAX > 0xffffffffu ? (size_t)8 << 30 : SIZE_MAX))

/** A model's shape and hyper-parameters.  Set up with imml_config_init(). */
typedef struct imml_config {
  size_t struct_size;       /**< sizeof(imml_config), set by imml_config_init */
  int n_modalities;         /**< M, 2..IMML_MAX_MODALITIES (default 2) */
  const int *dims;          /**< M feature widths d_m >= 1, copied at create
                                 (default NULL: must be set) */
  int hidden_dim;           /**< H, branch hidden width (default 256) */
  int knowledge_dim;        /**< k, knowledge width (default 128) */
  int n_classes;            /**< C >= 2 (default 0: must be set) */
  int max_batch;            /**< largest batch of any call (default 64) */
  int dict_size;            /**< J, strata dictionary capacity (default 256) */
  float beta;               /**< beta in [0, 1] (default 0.5) */
  float gamma1;             /**< weight of L_con, >= 0 (default 0.1) */
  float gamma2;             /**< weight of L_dis, >= 0 (default 1.0) */
  float tau;                /**< contrastive temperature > 0 (default 0.1) */
  int predominant;          /**< p in 0..M-1, or -1 = choose (default -1) */
  int warmup_steps;         /**< >= 0 (default 100); see METHOD.md section 5 */
  int slot_mode;            /**< an ::imml_slot_mode (default conditional) */
  uint64_t seed;            /**< parameter initialisation seed (default 0) */
  imml_allocator allocator; /**< allocator (default: malloc/free) */
  int precision;            /**< an ::imml_precision (default fp32) */
  /** Memory budget: a model whose arena (every buffer it will need,
   *  counted exactly from this config) exceeds it is refused with
   *  ::IMML_ERR_TOO_LARGE before the arena is allocated (only the handle
   *  that then carries the message is); imml_optim_setup() counts the
   *  optimiser state too (default ::IMML_MEMORY_LIMIT_DEFAULT). */
  size_t memory_limit;
} imml_config;

/** Writes METHOD.md's defaults into `*cfg`, including struct_size.  dims
 *  and n_classes must still be set by the caller.
 *  @param cfg the struct to fill; NULL is a no-op. */
IMML_API void imml_config_init(imml_config *cfg);

/** @} */

/* ------------------------------------------------------------------ */
/** @name Fusion and target (F&T) callbacks                             */
/* ------------------------------------------------------------------ */
/** @{ */

/** A host F&T: any function from the M slots (each B x k, modality order)
 *  to logits (B x C).  Callbacks run synchronously on the calling thread.
 *  A non-zero return aborts the libimml call with ::IMML_ERR_CALLBACK and
 *  the model is left unchanged.  Set up with imml_ft_ops_init(). */
typedef struct imml_ft_ops {
  size_t struct_size; /**< sizeof(imml_ft_ops), set by imml_ft_ops_init */
  /** Writes logits (B x C).  `training` is 1 when a backward for this batch
   *  may follow (cache what the backward needs), 0 for evaluation. */
  int (*forward)(void *user_data, int training, int batch, int n_modalities,
                 int knowledge_dim, const float *const *slots, int n_classes,
                 float *logits);
  /** Given dL/dlogits (B x C) of the last training forward, overwrites
   *  dslots[m] (B x k each) with dL/dslot_m and accumulates the host's own
   *  parameter gradients.  `slots` are the values that forward received. */
  int (*backward)(void *user_data, int batch, int n_modalities,
                  int knowledge_dim, const float *const *slots,
                  const float *dlogits, int n_classes, float *const *dslots);
  /** Passed unchanged to both callbacks; must outlive the model. */
  void *user_data;
} imml_ft_ops;

/** Zeroes `*ops` and sets struct_size.
 *  @param ops the struct to fill; NULL is a no-op. */
IMML_API void imml_ft_ops_init(imml_ft_ops *ops);

/** @} */

/* ------------------------------------------------------------------ */
/** @name Model handles                                                 */
/* ------------------------------------------------------------------ */
/** @{ */

/** An opaque model handle: parameters, gradients, strata dictionary,
 *  predominant-modality state, optimiser, and its own scratch and
 *  message. */
typedef struct imml_model imml_model;

/** Creates a model: validates `cfg`, allocates every buffer the model will
 *  need and initialises the parameters (METHOD.md section 6).
 *  @param cfg  the configuration (read only during the call).
 *  @param ft   NULL for the built-in concat + linear F&T (parameters ft.w,
 *              ft.b), or host callbacks (copied).
 *  @param out  receives the model.  On failure it receives a handle that
 *              holds only the message (see Conventions), or NULL when not
 *              even that could be allocated.
 *  @return ::IMML_OK, ::IMML_ERR_NULL, ::IMML_ERR_INVALID_ARG,
 *          ::IMML_ERR_UNKNOWN_FIELD, ::IMML_ERR_TOO_LARGE (a size over a
 *          limit or over cfg->memory_limit), ::IMML_ERR_UNSUPPORTED or
 *          ::IMML_ERR_NOMEM. */
IMML_API imml_status imml_model_create(const imml_config *cfg,
                                       const imml_ft_ops *ft, imml_model **out);

/** Options of imml_model_load() and imml_model_load_mem().  Set up with
 *  imml_load_options_init(). */
typedef struct imml_load_options {
  size_t struct_size; /**< sizeof(imml_load_options), set by the init */
  /** the loaded model's allocator (default: malloc/free) */
  imml_allocator allocator;
  /** Memory budget of the loaded model: as imml_config::memory_limit, for
   *  its arena plus the optimiser state the checkpoint holds, and for the
   *  file's own size; checked before either is allocated (default
   *  ::IMML_MEMORY_LIMIT_DEFAULT). */
  size_t memory_limit;
} imml_load_options;

/** Writes the defaults into `*opt`, including struct_size.
 *  @param opt the struct to fill; NULL is a no-op. */
IMML_API void imml_load_options_init(imml_load_options *opt);

/** Loads a checkpoint file (format: doc/FORMAT.md), validating every field
 *  before it is used.
 *  @param path  the file.
 *  @param ft    NULL for a checkpoint of a model with the built-in F&amp;T;
 *               the host's callbacks for one saved with host callbacks.
 *  @param opt   NULL for the defaults.
 *  @param out   as in imml_model_create().
 *  @return ::IMML_OK, or the status naming what is wrong with the file or
 *          the arguments. */
IMML_API imml_status imml_model_load(const char *path, const imml_ft_ops *ft,
                                     const imml_load_options *opt,
                                     imml_model **out);

/** Loads a checkpoint from memory; as imml_model_load().
 *  @param buf   the checkpoint bytes (read only during the call).
 *  @param size  their count.
 *  @param ft    as in imml_model_load().
 *  @param opt   NULL for the defaults.
 *  @param out   as in imml_model_create().
 *  @return ::IMML_OK, or the status of the failure (message in the
 *          handle, imml_model_errmsg()).
 */
IMML_API imml_status imml_model_load_mem(const void *buf, size_t size,
                                         const imml_ft_ops *ft,
                                         const imml_load_options *opt,
                                         imml_model **out);

/** Creates a share of `model` for inference on another thread: a handle
 *  that reads the model's parameters, dictionary and predominant modality
 *  in place, with its own evaluation scratch and message.  A share serves
 *  imml_predict(), evaluation forwards, imml_fdc_adjust() and the read-only
 *  queries; calls that would change the model are refused with
 *  ::IMML_ERR_STATE.  No call that changes the model (training,
 *  imml_predominant_set(), a load into it, ...) may overlap a call on one of
 *  its shares, and every share must be freed before its model.
 *  @param model the model to share (not itself a share).
 *  @param out   receives the share, or NULL on failure (the message is
 *               then in `model`).
 *  @return ::IMML_OK, or the status of the failure (message in the
 *          handle, imml_model_errmsg()).
 */
IMML_API imml_status imml_model_share(imml_model *model, imml_model **out);

/** Releases a handle and everything it allocated.
 *  @param model a model, a share or a failed handle; NULL is a no-op. */
IMML_API void imml_model_free(imml_model *model);

/** The message of the last failed call on `model`.
 *  @return "" after a successful call; the message otherwise, owned by the
 *          handle and valid until the next call on it; a static text for a
 *          NULL handle.
 *  @param model any handle, a failed one included, or NULL.
 */
IMML_API const char *imml_model_errmsg(const imml_model *model);

/** Copies the model's configuration.  The caller first sets
 *  cfg->struct_size (imml_config_init() does), which says how many bytes
 *  the library may write: a program built against an older header receives
 *  only the fields it knows, and cfg->struct_size keeps its value.
 *  @param model the model or a share.
 *  @param cfg   receives it (cfg->dims points into the model and lives as
 *               long as it).  ::IMML_ERR_INVALID_ARG when cfg->struct_size
 *               is not set.
 *  @return ::IMML_OK, or the status of the failure (message in the
 *          handle, imml_model_errmsg()).
 */
IMML_API imml_status imml_model_get_config(imml_model *model, imml_config *cfg);

/** Writes the model to a file atomically (temporary file beside it, then
 *  rename).  Refused with ::IMML_ERR_STATE while micro-batches are not
 *  committed (imml_commit()).
 *  @param model the model.
 *  @param path  the file to create or replace.
 *  @return ::IMML_OK, or the status of the failure (message in the
 *          handle, imml_model_errmsg()).
 */
IMML_API imml_status imml_model_save(imml_model *model, const char *path);

/** Writes the model to memory.
 *  @param model    the model.
 *  @param buf      NULL to ask for the size only.
 *  @param capacity bytes available at buf.
 *  @param size     receives the byte count needed (buf NULL: the call
 *                  succeeds; capacity too small: ::IMML_ERR_BUFFER_SMALL)
 *                  or written.
 *  @return ::IMML_OK, or the status of the failure (message in the
 *          handle, imml_model_errmsg()).
 */
IMML_API imml_status imml_model_save_mem(imml_model *model, void *buf,
                                         size_t capacity, size_t *size);

/** @} */

/* ------------------------------------------------------------------ */
/** @name Training and inference on one batch                          */
/* ------------------------------------------------------------------ */
/** @{ */

/** Which forward imml_forward() runs. */
typedef enum imml_mode {
  IMML_MODE_TRAIN = 0, /**< computes every loss term; a backward may follow */
  IMML_MODE_EVAL = 1   /**< never changes the model; labels optional */
} imml_mode;

/** Loss terms of one forward (METHOD.md section 4), summed in double.
 *  total = ce + gamma1 * con + gamma2 * dis.  All NaN without labels. */
typedef struct imml_losses {
  double total; /**< the training objective */
  double ce;    /**< CE(logits, y) of the F&T */
  double con;   /**< L_con, 0 during warm-up */
  double dis;   /**< L_dis, the unimodal heads' mean cross-entropy */
} imml_losses;

/** Runs a forward on one batch.
 *  A training forward keeps what the backward needs and changes nothing
 *  else; an evaluation forward uses separate scratch, so it may run
 *  between a training forward and its backward.
 *  @param model    the model (a share: evaluation only).
 *  @param mode     ::IMML_MODE_TRAIN or ::IMML_MODE_EVAL.
 *  @param batch    B, 1..max_batch.
 *  @param features M pointers, features[m] is B x dims[m], all finite.
 *  @param labels   B labels in 0..C-1; required for training, optional
 *                  (NULL) for evaluation.
 *  @param logits   NULL or a B x C output.
 *  @param losses   NULL or an output (NaN fields without labels).
 *  @return ::IMML_OK, or the status of the failure (message in the
 *          handle, imml_model_errmsg()).
 */
IMML_API imml_status imml_forward(imml_model *model, imml_mode mode, int batch,
                                  const float *const *features,
                                  const int *labels, float *logits,
                                  imml_losses *losses);

/** Computes the gradients of the last training forward's loss and adds
 *  (+=) them to every parameter's gradient.  This completes one
 *  micro-batch: several forward/backward pairs accumulate before one
 *  imml_commit() (doc/DECISIONS.md, gradient accumulation).
 *  @param model     the model.
 *  @param dfeatures NULL, or M pointers each NULL or B x dims[m]:
 *                   overwritten with dL/dh_m (unspecified on failure).
 *  @return ::IMML_ERR_STATE without a preceding training forward;
 *          ::IMML_ERR_CALLBACK or ::IMML_ERR_NONFINITE: nothing in the model
 *          changed and the forward stays pending (a host F&T backward that
 *          already ran has accumulated into the host's own gradients). */
IMML_API imml_status imml_backward(imml_model *model, float *const *dfeatures);

/** Completes a training step after its K >= 1 micro-batches: pushes their
 *  knowledge into the strata dictionary in order and advances the warm-up
 *  once (METHOD.md sections 2 and 5).  Gradients are not touched: update
 *  them with imml_optim_step() or the host's own optimiser.
 *  @return ::IMML_ERR_STATE when no backward completed since the last
 *          commit, or while a training forward awaits its backward.
 *  @param model the model (not a share).
 */
IMML_API imml_status imml_commit(imml_model *model);

/** Predicts one batch: an evaluation forward that also writes
 *  probabilities and classes.
 *  @param model    the model or one of its shares.
 *  @param batch    B, 1..max_batch.
 *  @param features M pointers, features[m] is B x dims[m], all finite.
 *  @param logits   NULL or a B x C output.
 *  @param probs    NULL or a B x C output, softmax(logits).
 *  @param classes  NULL or B argmax classes.
 *  @return ::IMML_OK, or the status of the failure (message in the
 *          handle, imml_model_errmsg()).
 */
IMML_API imml_status imml_predict(imml_model *model, int batch,
                                  const float *const *features, float *logits,
                                  float *probs, int *classes);

/** The front-door adjustment alone: from M knowledge matrices (B x k) and
 *  the current dictionary, writes the M F&T slots (B x k each) exactly as a
 *  forward would build them (during warm-up: slot_m = z_m).  An empty
 *  dictionary is replaced by the batch's own knowledge, as in a forward.
 *  Changes nothing in the model.
 *  @param model     the model or one of its shares.
 *  @param batch     B, 1..max_batch.
 *  @param knowledge M pointers to B x k matrices, all finite.
 *  @param slots     M pointers to B x k outputs, not overlapping
 *                   knowledge; slots that overlap each other are
 *                   refused with ::IMML_ERR_INVALID_ARG.
 *  @return ::IMML_OK, or the status of the failure (message in the
 *          handle, imml_model_errmsg()).
 */
IMML_API imml_status imml_fdc_adjust(imml_model *model, int batch,
                                     const float *const *knowledge,
                                     float *const *slots);

/** The number of filled dictionary entries, J_eff.
 *  @return J_eff, or 0 for NULL or a failed handle.
 *  @param model the model or a share.
 */
IMML_API int imml_fdc_dict_fill(const imml_model *model);

/** @} */

/* ------------------------------------------------------------------ */
/** @name Parameters and gradients                                      */
/* ------------------------------------------------------------------ */
/** @{ */

/** One named parameter tensor and its gradient, in the model's memory. */
typedef struct imml_param_view {
  const char *name; /**< "m0.w1", "fdc.wq", "ft.w", ... (model-owned) */
  int rows;         /**< n_in for weights, 1 for biases */
  int cols;         /**< n_out */
  float *data;      /**< rows x cols row-major, owned by the model */
  float *grad;      /**< same shape */
} imml_param_view;

/** The number of named parameter tensors.
 *  @return the count, 0 for NULL, a share or a failed handle.
 *  @param model the model.
 */
IMML_API int imml_param_count(const imml_model *model);

/** The i-th parameter tensor.  Order: per modality m: m<m>.w1 b1 w2 b2 wc
 *  bc; fdc.wq fdc.wk; then ft.w ft.b (built-in F&T only).  The host may
 *  read and write data and grad through the view (its own optimiser,
 *  gradient reduction, gradient modulation).
 *  @param model the model (not a share).
 *  @param i     0 <= i < imml_param_count().
 *  @param view  receives the tensor.
 *  @return ::IMML_OK, or the status of the failure (message in the
 *          handle, imml_model_errmsg()).
 */
IMML_API imml_status imml_param_get(imml_model *model, int i,
                                    imml_param_view *view);

/** The parameter tensor called `name`; as imml_param_get().
 *  @return ::IMML_ERR_INVALID_ARG when no tensor has that name.
 *  @param model the model (not a share).
 *  @param name  a name as imml_param_view::name gives it.
 *  @param view  receives the tensor.
 */
IMML_API imml_status imml_param_find(imml_model *model, const char *name,
                                     imml_param_view *view);

/** Every parameter, in imml_param_get() order without padding, is one
 *  contiguous block of `*count` floats, and so is every gradient (same
 *  layout): one allreduce reduces all gradients.  Once the host holds a
 *  pointer into a block (from here or imml_param_get()), imml_backward()
 *  and imml_optim_step() read that block to see what the host wrote,
 *  which costs a pass over it per call.
 *  @param model the model (not a share).
 *  @param data  NULL or receives the parameter block.
 *  @param grad  NULL or receives the gradient block.
 *  @param count NULL or receives the number of floats in each.
 *  @return ::IMML_OK, or the status of the failure (message in the
 *          handle, imml_model_errmsg()).
 */
IMML_API imml_status imml_param_flat(imml_model *model, float **data,
                                     float **grad, size_t *count);

/** Sets every gradient to 0.
 *  @param model the model (not a share).
 *  @return ::IMML_OK, or the status of the failure (message in the
 *          handle, imml_model_errmsg()).
 */
IMML_API imml_status imml_grad_zero(imml_model *model);

/** @} */

/* ------------------------------------------------------------------ */
/** @name Predominant modality (METHOD.md section 5)                    */
/* ------------------------------------------------------------------ */
/** @{ */

/** The predominant modality.
 *  @param model the model or a share.
 *  @param p     receives p, or -1 while it is not fixed yet.
 *  @param fixed NULL or receives 1 once p is fixed, else 0.  A
 *               predominant modality named in the config is fixed from the
 *               start and there is no warm-up.
 *  @return ::IMML_OK, or the status of the failure (message in the
 *          handle, imml_model_errmsg()).
 */
IMML_API imml_status imml_predominant_get(imml_model *model, int *p,
                                          int *fixed);

/** Fixes the predominant modality before the library has (for example from
 *  the unimodal heads' accuracy on held-out data).  The next training
 *  forward follows METHOD.md section 2; the choice is saved in checkpoints.
 *  With a collective, every rank must fix the same p before its next
 *  training forward, or that forward is refused on every rank.
 *  @param model the model (not a share).
 *  @param p     a modality in 0..M-1.
 *  @return ::IMML_ERR_STATE once p is fixed, or while a training forward or
 *          uncommitted micro-batches are pending. */
IMML_API imml_status imml_predominant_set(imml_model *model, int p);

/** @} */

/* ------------------------------------------------------------------ */
/** @name Optimisers                                                    */
/* ------------------------------------------------------------------ */
/** @{ */

/** The built-in optimisers. */
typedef enum imml_optim_kind {
  IMML_OPTIM_SGD = 0,  /**< PyTorch SGD: momentum, dampening 0, nesterov */
  IMML_OPTIM_ADAMW = 1 /**< PyTorch AdamW: bias-corrected, decoupled decay */
} imml_optim_kind;

/** An optimiser's hyper-parameters.  Set up with imml_optim_config_init(). */
typedef struct imml_optim_config {
  size_t struct_size; /**< sizeof(imml_optim_config), set by the init */
  int kind;           /**< an ::imml_optim_kind (default AdamW) */
  float lr;           /**< learning rate (default 1e-3) */
  float weight_decay; /**< default 0.01 for AdamW, 0 for SGD */
  float momentum;     /**< SGD (default 0) */
  int nesterov;       /**< SGD, needs momentum > 0 (default 0) */
  float beta1;        /**< AdamW (default 0.9) */
  float beta2;        /**< AdamW (default 0.999) */
  float eps;          /**< AdamW (default 1e-8) */
  /** > 0: clip the global gradient L2 norm to this before the update
   *  (PyTorch clip_grad_norm_); 0: off (default) */
  float clip_norm;
  /** 0.  Reserved for optimiser options of later releases; it also keeps
   *  the struct free of tail padding (doc/ABI.md). */
  int flags;
} imml_optim_config;

/** Writes PyTorch's defaults for `kind` into `*cfg`, including
 *  struct_size.
 *  @param cfg  the struct to fill; NULL is a no-op.
 *  @param kind the optimiser. */
IMML_API void imml_optim_config_init(imml_optim_config *cfg,
                                     imml_optim_kind kind);

/** Attaches an optimiser to the model, allocating its state (moments)
 *  once.  Calling it again replaces the optimiser and resets its state.
 *  @param model the model (not a share).
 *  @param cfg   the optimiser's configuration.
 *  @return ::IMML_OK, or the status of the failure (message in the
 *          handle, imml_model_errmsg()).
 */
IMML_API imml_status imml_optim_setup(imml_model *model,
                                      const imml_optim_config *cfg);

/** Changes the learning rate for the next steps.
 *  @param model the model, with an optimiser attached.
 *  @param lr    a finite value >= 0.
 *  @return ::IMML_OK, or the status of the failure (message in the
 *          handle, imml_model_errmsg()).
 */
IMML_API imml_status imml_optim_set_lr(imml_model *model, float lr);

/** Applies one update from the accumulated gradients, then sets every
 *  gradient to 0.
 *  @return ::IMML_ERR_NONFINITE (nothing changed) when a gradient or an
 *          updated value would be non-finite; ::IMML_ERR_STATE without an
 *          optimiser, or while micro-batches are not committed.
 *  @param model the model (not a share), with an optimiser attached.
 */
IMML_API imml_status imml_optim_step(imml_model *model);

/** @} */

#ifdef __cplusplus
}
#endif

#endif /* IMML_H */

/* ------------------------------------------------------------------ */
/* Experimental: not frozen.  Define IMML_EXPERIMENTAL before including */
/* imml.h to use it; any release may change or remove what is here.    */
/* ------------------------------------------------------------------ */
#if defined(IMML_EXPERIMENTAL) && !defined(IMML_H_EXPERIMENTAL)
#define IMML_H_EXPERIMENTAL

#ifdef __cplusplus
extern "C" {
#endif

/** @name Experimental: data-parallel training (doc/DISTRIBUTED.md)
 *  Compiled only with IMML_EXPERIMENTAL defined; not frozen. */
/** @{ */

/** The one collective libimml needs, given by the host (MPI_Allgather,
 *  NCCL, threads, ...): libimml itself stays free of any transport.  Set
 *  up with imml_collective_init(). */
typedef struct imml_collective {
  size_t struct_size; /**< sizeof(imml_collective), set by the init */
  int world_size;     /**< R >= 1 */
  int rank;           /**< this process, 0..R-1 */
  /** Gathers `count` floats from every rank into recv (R * count floats,
   *  rank order), bit for bit.  count is the same on every rank.  Non-zero
   *  aborts the libimml call with ::IMML_ERR_CALLBACK. */
  int (*allgather)(void *user_data, const float *send, size_t count,
                   float *recv);
  void *user_data; /**< passed unchanged to allgather */
} imml_collective;

/** Zeroes `*c`, sets struct_size and world_size 1.
 *  @param c the struct to fill; NULL is a no-op. */
IMML_API void imml_collective_init(imml_collective *c);

/** Makes every training step of this model one shard of a global batch
 *  (the concatenation of every rank's batch in rank order; shards may
 *  differ in size).  A training forward gathers each rank's knowledge
 *  rows, labels, unimodal statistics and fixed p (one allgather), so that
 *  L_con is computed over the global batch, an empty dictionary is replaced
 *  by the global batch's knowledge, the warm-up uses global statistics, and
 *  imml_commit() pushes the global batches into the dictionary: every rank
 *  keeps an identical dictionary and predominant-modality state.  The
 *  gradients a rank computes are scaled so that their plain mean over the
 *  R ranks equals the gradient of the single-process loss on the global
 *  batch: allreduce-sum them and divide by R.  Reported ce and dis are the
 *  rank's own means, con the global value.  Evaluation and imml_predict()
 *  stay local.
 *  @param model the model (not a share).
 *  @param c     the collective (copied), or NULL to detach.
 *  @return ::IMML_ERR_STATE while a training forward or uncommitted
 *          micro-batches are pending. */
IMML_API imml_status imml_collective_set(imml_model *model,
                                         const imml_collective *c);

/** @} */

/** @name Experimental: introspection and threads
 *  Compiled only with IMML_EXPERIMENTAL defined; not frozen. */
/** @{ */

/** The warm-up state (METHOD.md section 5).
 *  @param model the model or a share.
 *  @param steps NULL or receives the completed training steps counted so
 *               far (capped at warmup_steps once fixed).
 *  @param ema   NULL or receives M floats, the per-modality EMAs e_m.
 *  @return ::IMML_OK, or the status of the failure (message in the
 *          handle, imml_model_errmsg()).
 */
IMML_API imml_status imml_warmup_get(imml_model *model, int *steps, float *ema);

/** Modality m's unimodal head logits o_m (METHOD.md section 1) from the
 *  last successful imml_predict() or evaluation forward on this handle.
 *  @param model  the model or a share.
 *  @param m      a modality in 0..M-1.
 *  @param logits a B x C output, B that evaluation's batch.
 *  @return ::IMML_ERR_STATE when no evaluation result is held. */
IMML_API imml_status imml_unimodal_get(imml_model *model, int m, float *logits);

/** Sets the number of threads of the BLAS library (process-wide: it is the
 *  BLAS's own setting) when that BLAS supports it; libimml's own passes
 *  over the parameters follow the same number.
 *  @param n the thread count, or <= 0 to only ask.
 *  @return the number now in effect, or 0 if unknown. */
IMML_API int imml_threads_set(int n);

/** @} */

#ifdef __cplusplus
}
#endif

#endif /* IMML_EXPERIMENTAL */
