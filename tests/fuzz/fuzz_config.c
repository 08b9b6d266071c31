/* libFuzzer target: bytes -> an imml_config (+ dims, an optimiser
 * configuration, a collective) -> imml_model_create and, when the model
 * exists, imml_optim_setup, imml_collective_set, one prediction and one
 * training step.
 *
 * Input (fuzz_common.h's encoding; a missing field keeps its default):
 *   byte   flags: 1 host F&T, 2 optimiser, 4 train a step, 8 struct_size
 *          one short, 16 dims NULL, 32 collective, 64 malloc_fn alone,
 *          128 a struct from a newer header (struct_size 8 bytes larger,
 *          the first extra byte read below, the others zero)
 *   int    n_modalities, then min(n_modalities, 64) dims (when >= 1)
 *   int    hidden_dim, knowledge_dim, n_classes, max_batch, dict_size,
 *          predominant, warmup_steps, slot_mode
 *   float  beta, gamma1, gamma2, tau
 *   4+4    seed (two raw u32)
 *   int    optimiser kind; float lr, weight_decay, momentum; int nesterov;
 *          float beta1, beta2, eps, clip_norm
 *   int    collective world_size, rank
 *   int    precision
 *   int    memory_limit in KiB (as an unsigned 32-bit value)
 *   int    the first byte beyond the library's imml_config (flag 128; the
 *          low 8 bits)
 * (The fields added in 1.0 come last, so that inputs written for the
 * earlier encoding keep their meaning.)
 *
 * Promises checked: create succeeds only for a config inside the
 * documented ranges; a refusal is NULL / INVALID_ARG / TOO_LARGE / NOMEM /
 * UNKNOWN_FIELD / UNSUPPORTED with a failed handle holding a message (no
 * handle only for NOMEM), and nothing left allocated once that handle is
 * freed; NOMEM only when the capped allocator refused; TOO_LARGE before any
 * allocation but the failed handle's; UNKNOWN_FIELD only for a non-zero
 * byte beyond the library's struct, and such a struct never creates a
 * model; the dims array is read only up to n_modalities (it is allocated
 * to that size, so ASan sees an over-read); no leak after
 * imml_model_free. */
#include "fuzz_common.h"

static int in_range(float v, float lo, float hi) {
  return isfinite(v) && v >= lo && v <= hi;
}

/* What imml.h documents for a config that creates a model. */
static void check_valid(const imml_config *c, const int *dims) {
  FUZZ_CHECK(c->n_modalities >= 2 && c->n_modalities <= IMML_MAX_MODALITIES,
             "n_modalities %d", c->n_modalities);
  for (int m = 0; m < c->n_modalities; m++)
    FUZZ_CHECK(dims[m] >= 1, "dims[%d] = %d", m, dims[m]);
  FUZZ_CHECK(c->hidden_dim >= 1 && c->knowledge_dim >= 1 && c->n_classes >= 2 &&
                 c->max_batch >= 1 && c->dict_size >= 1,
             "H %d k %d C %d B %d J %d", c->hidden_dim, c->knowledge_dim,
             c->n_classes, c->max_batch, c->dict_size);
  FUZZ_CHECK(in_range(c->beta, 0.0f, 1.0f), "beta %g", (double)c->beta);
  FUZZ_CHECK(isfinite(c->gamma1) && c->gamma1 >= 0.0f, "gamma1");
  FUZZ_CHECK(isfinite(c->gamma2) && c->gamma2 >= 0.0f, "gamma2");
  FUZZ_CHECK(isfinite(c->tau) && c->tau > 0.0f, "tau %g", (double)c->tau);
  FUZZ_CHECK(c->predominant >= -1 && c->predominant < c->n_modalities,
             "predominant %d", c->predominant);
  FUZZ_CHECK(c->warmup_steps >= 0, "warmup_steps %d", c->warmup_steps);
  FUZZ_CHECK(c->slot_mode == IMML_SLOT_CONDITIONAL ||
                 c->slot_mode == IMML_SLOT_STRICT,
             "slot_mode %d", c->slot_mode);
}

/* imml_config as a newer header would declare it: 8 more bytes. */
typedef struct newer_config {
  imml_config c;
  unsigned char tail[8];
} newer_config;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_reader r = {data, size, 0};
  int flags = 0;
  fuzz_byte(&r, &flags);
  newer_config nc;
  memset(&nc, 0, sizeof nc);
  imml_config *cp = &nc.c;
  imml_config_init(cp);
  imml_config c = *cp;
  c.n_modalities = fuzz_int(&r, c.n_modalities);
  /* exactly as many dims as the config claims, on the heap */
  const int nd = c.n_modalities >= 1 && c.n_modalities <= IMML_MAX_MODALITIES
                     ? c.n_modalities
                     : 1;
  int *dims = malloc((size_t)nd * sizeof(int));
  FUZZ_CHECK(dims != NULL, "test allocation");
  for (int m = 0; m < nd; m++)
    dims[m] = fuzz_int(&r, 4);
  c.dims = flags & 16 ? NULL : dims;
  c.hidden_dim = fuzz_int(&r, 8);
  c.knowledge_dim = fuzz_int(&r, 4);
  c.n_classes = fuzz_int(&r, 3);
  c.max_batch = fuzz_int(&r, 4);
  c.dict_size = fuzz_int(&r, 8);
  c.predominant = fuzz_int(&r, c.predominant);
  c.warmup_steps = fuzz_int(&r, 2);
  c.slot_mode = fuzz_int(&r, c.slot_mode);
  c.beta = fuzz_float(&r, c.beta);
  c.gamma1 = fuzz_float(&r, c.gamma1);
  c.gamma2 = fuzz_float(&r, c.gamma2);
  c.tau = fuzz_float(&r, c.tau);
  c.seed = (uint64_t)fuzz_u32(&r) | (uint64_t)fuzz_u32(&r) << 32;
  /* what follows the config in the input, read now (reading has no
   * effect): the 1.0 fields come after it */
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
  oc.kind = fuzz_int(&r, oc.kind);
  oc.lr = fuzz_float(&r, oc.lr);
  oc.weight_decay = fuzz_float(&r, oc.weight_decay);
  oc.momentum = fuzz_float(&r, oc.momentum);
  oc.nesterov = fuzz_int(&r, oc.nesterov);
  oc.beta1 = fuzz_float(&r, oc.beta1);
  oc.beta2 = fuzz_float(&r, oc.beta2);
  oc.eps = fuzz_float(&r, oc.eps);
  oc.clip_norm = fuzz_float(&r, oc.clip_norm);
  int world = fuzz_int(&r, 1);
  const int rank = fuzz_int(&r, 0);
  c.precision = fuzz_int(&r, c.precision);
  if (r.pos < r.n) /* else the default */
    c.memory_limit = (size_t)(uint32_t)fuzz_int(&r, 0) << 10;
  const int tail = fuzz_int(&r, 0) & 0xff;
  fuzz_alloc a;
  memset(&a, 0, sizeof a);
  c.allocator = fuzz_hooks(&a);
  if (flags & 64)
    c.allocator.free_fn = NULL;
  if (flags & 8)
    c.struct_size = sizeof c - 1;
  else if (flags & 128)
    c.struct_size = sizeof nc;
  *cp = c;
  nc.tail[0] = (unsigned char)tail;
  const int unknown_field = (flags & 128) && !(flags & 8) && tail != 0;
  const imml_ft_ops ops = fuzz_host_ops();
  imml_model *m = (imml_model *)&c; /* must be overwritten */
  const imml_status st = imml_model_create(cp, flags & 1 ? &ops : NULL, &m);
  if (st != IMML_OK) {
    FUZZ_CHECK(m != (imml_model *)&c, "*out not written");
    FUZZ_CHECK(st == IMML_ERR_NULL || st == IMML_ERR_INVALID_ARG ||
                   st == IMML_ERR_TOO_LARGE || st == IMML_ERR_NOMEM ||
                   st == IMML_ERR_UNKNOWN_FIELD || st == IMML_ERR_UNSUPPORTED,
               "create: %s", imml_status_string(st));
    FUZZ_CHECK(st != IMML_ERR_UNKNOWN_FIELD || unknown_field,
               "UNKNOWN_FIELD without a non-zero unknown byte: %s",
               imml_model_errmsg(m));
    FUZZ_CHECK(st != IMML_ERR_UNSUPPORTED || c.precision != IMML_PRECISION_FP32,
               "UNSUPPORTED for an fp32 model: %s", imml_model_errmsg(m));
    FUZZ_CHECK(st != IMML_ERR_NOMEM || a.refused > 0, "spurious NOMEM: %s",
               imml_model_errmsg(m));
    /* nothing bigger than a handle was asked for: the failed handle is the
     * only block held (none when it came from malloc, the config itself
     * being refused, and then the allocator was not called at all) */
    FUZZ_CHECK(st != IMML_ERR_TOO_LARGE ||
                   (a.blocks == 1 ? a.max_req <= a.live : a.calls == 0),
               "TOO_LARGE after %ld allocations (largest %zu bytes, %ld "
               "held): %s",
               a.calls, a.max_req, a.blocks, imml_model_errmsg(m));
    FUZZ_CHECK(a.blocks <= 1, "a refused create holds %ld blocks", a.blocks);
    fuzz_failed_handle(st, m, "imml_model_create");
    FUZZ_CHECK(a.live == 0 && a.blocks == 0, "refused create leaked %zu bytes",
               a.live);
    free(dims);
    return 0;
  }
  FUZZ_CHECK(m != NULL && m != (imml_model *)&c &&
                 imml_model_errmsg(m)[0] == '\0',
             "created, message '%s'", m ? imml_model_errmsg(m) : "(null)");
  FUZZ_CHECK(!(flags & (8 | 16 | 64)), "created from an invalid config");
  FUZZ_CHECK(!unknown_field, "created from a config with an unknown field");
  FUZZ_CHECK(c.precision == IMML_PRECISION_FP32 ||
                 c.precision == IMML_PRECISION_BF16,
             "created with precision %d", c.precision);
  check_valid(&c, dims);
  /* the model copied dims: the caller's array may go */
  free(dims);
  dims = NULL;

  if (flags & 2) {
    const imml_status so = imml_optim_setup(m, &oc);
    if (so != IMML_OK) {
      fuzz_check_failure(so, imml_model_errmsg(m), "imml_optim_setup");
      FUZZ_CHECK(so == IMML_ERR_INVALID_ARG || so == IMML_ERR_NOMEM ||
                     so == IMML_ERR_TOO_LARGE,
                 "optim_setup: %s", imml_status_string(so));
    } else {
      FUZZ_CHECK(in_range(oc.lr, 0.0f, 1e30f) &&
                     in_range(oc.eps, 0.0f, 1e30f) && oc.eps > 0.0f &&
                     in_range(oc.beta2, 0.0f, 1.0f) && oc.beta2 < 1.0f,
                 "optimiser accepted lr %g eps %g beta2 %g", (double)oc.lr,
                 (double)oc.eps, (double)oc.beta2);
    }
  }
  if (flags & 32) {
    imml_collective co;
    imml_collective_init(&co);
    co.world_size = world;
    co.rank = rank;
    co.allgather = fuzz_allgather;
    co.user_data = &world;
    const imml_status sc = imml_collective_set(m, &co);
    if (sc != IMML_OK) {
      fuzz_check_failure(sc, imml_model_errmsg(m), "imml_collective_set");
      FUZZ_CHECK(sc == IMML_ERR_INVALID_ARG || sc == IMML_ERR_NOMEM ||
                     sc == IMML_ERR_TOO_LARGE,
                 "collective_set: %s", imml_status_string(sc));
    }
  }
  /* a step costs about max_batch x the arena: only for small models */
  if (flags & 4 && a.live <= ((size_t)4 << 20))
    fuzz_exercise(m, 1);
  imml_model_free(m);
  FUZZ_CHECK(a.live == 0 && a.blocks == 0, "imml_model_free left %zu bytes",
             a.live);
  return 0;
}
