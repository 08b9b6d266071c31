/* imml_config defaults, validation with messages that name the field, and
 * overflow-checked size arithmetic. */
#include "bf16.h"
#include "internal.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

/* Upper bounds that keep every product of two of them, and every BLAS
 * leading dimension, far inside int and size_t. */
#define LIMIT_DIM (1 << 24)
#define LIMIT_SMALL (1 << 20)
void imml_config_init(imml_config *cfg) {
  if (!cfg)
    return;
  memset(cfg, 0, sizeof *cfg);
  cfg->struct_size = sizeof *cfg;
  cfg->n_modalities = 2;
  cfg->dims = NULL;
  cfg->hidden_dim = 256;
  cfg->knowledge_dim = 128;
  cfg->n_classes = 0;
  cfg->max_batch = 64;
  cfg->dict_size = 256;
  cfg->beta = 0.5f;
  cfg->gamma1 = 0.1f;
  cfg->gamma2 = 1.0f;
  cfg->tau = 0.1f;
  cfg->predominant = -1;
  cfg->warmup_steps = 100;
  cfg->slot_mode = IMML_SLOT_CONDITIONAL;
  cfg->seed = 0;
  cfg->precision = IMML_PRECISION_FP32;
  cfg->memory_limit = IMML_MEMORY_LIMIT_DEFAULT;
}

void imml_ft_ops_init(imml_ft_ops *ops) {
  if (!ops)
    return;
  memset(ops, 0, sizeof *ops);
  ops->struct_size = sizeof *ops;
}

int imml_size_add(size_t *a, size_t b) {
  if (*a > SIZE_MAX - b)
    return 0;
  *a += b;
  return 1;
}

int imml_size_mul(size_t *out, size_t a, size_t b) {
  if (a != 0 && b > SIZE_MAX / a)
    return 0;
  *out = a * b;
  return 1;
}

static imml_status check_int(const char *field, int v, int lo, int hi,
                             char *err, size_t n) {
  if (v < lo) {
    imml_set_err(err, n, "config.%s = %d: must be >= %d", field, v, lo);
    return IMML_ERR_INVALID_ARG;
  }
  if (v > hi) {
    imml_set_err(err, n, "config.%s = %d: exceeds the limit %d", field, v, hi);
    return IMML_ERR_TOO_LARGE;
  }
  return IMML_OK;
}

static imml_status check_float(const char *field, float v, float lo,
                               int lo_open, float hi, char *err, size_t n) {
  if (!isfinite(v) || (lo_open ? !(v > lo) : !(v >= lo)) || !(v <= hi)) {
    imml_set_err(err, n, "config.%s = %g: must be finite and in %c%g, %g]",
                 field, (double)v, lo_open ? '(' : '[', (double)lo, (double)hi);
    return IMML_ERR_INVALID_ARG;
  }
  return IMML_OK;
}

#define TRY(expr)                                                              \
  do {                                                                         \
    imml_status st_ = (expr);                                                  \
    if (st_ != IMML_OK)                                                        \
      return st_;                                                              \
  } while (0)

imml_status imml_config_validate(const imml_config *in, imml_config *out,
                                 int *dims_out, char *err, size_t n) {
  if (!in) {
    imml_set_err(err, n, "config is NULL");
    return IMML_ERR_NULL;
  }
  imml_config c;
  imml_config_init(&c);
  TRY(imml_struct_in(&c, sizeof c, IMML_CONFIG_SIZE_KNOWN, IMML_CONFIG_SIZE_1_0,
                     in, "imml_config", "imml_config_init", err, n));
  TRY(check_int("n_modalities", c.n_modalities, 2, IMML_MAX_MODALITIES, err,
                n));
  if (!c.dims) {
    imml_set_err(err, n, "config.dims is NULL: set %d feature widths",
                 c.n_modalities);
    return IMML_ERR_NULL;
  }
  for (int m = 0; m < c.n_modalities; m++) {
    char field[32];
    snprintf(field, sizeof field, "dims[%d]", m);
    TRY(check_int(field, c.dims[m], 1, LIMIT_DIM, err, n));
  }
  TRY(check_int("hidden_dim", c.hidden_dim, 1, LIMIT_DIM, err, n));
  TRY(check_int("knowledge_dim", c.knowledge_dim, 1, LIMIT_SMALL, err, n));
  TRY(check_int("n_classes", c.n_classes, 2, LIMIT_SMALL, err, n));
  TRY(check_int("max_batch", c.max_batch, 1, LIMIT_SMALL, err, n));
  TRY(check_int("dict_size", c.dict_size, 1, LIMIT_SMALL, err, n));
  TRY(check_float("beta", c.beta, 0.0f, 0, 1.0f, err, n));
  TRY(check_float("gamma1", c.gamma1, 0.0f, 0, 1e30f, err, n));
  TRY(check_float("gamma2", c.gamma2, 0.0f, 0, 1e30f, err, n));
  TRY(check_float("tau", c.tau, 0.0f, 1, 1e30f, err, n));
  if (c.predominant < -1 || c.predominant >= c.n_modalities) {
    imml_set_err(err, n,
                 "config.predominant = %d: must be -1 (automatic) or a "
                 "modality in 0..%d",
                 c.predominant, c.n_modalities - 1);
    return IMML_ERR_INVALID_ARG;
  }
  TRY(check_int("warmup_steps", c.warmup_steps, 0, INT_MAX, err, n));
  if (c.slot_mode != IMML_SLOT_CONDITIONAL && c.slot_mode != IMML_SLOT_STRICT) {
    imml_set_err(err, n,
                 "config.slot_mode = %d: must be IMML_SLOT_CONDITIONAL (0) or "
                 "IMML_SLOT_STRICT (1)",
                 c.slot_mode);
    return IMML_ERR_INVALID_ARG;
  }
  if (!c.allocator.malloc_fn != !c.allocator.free_fn) {
    imml_set_err(err, n,
                 "config.allocator: malloc_fn and free_fn must both be set "
                 "or both be NULL");
    return IMML_ERR_INVALID_ARG;
  }
  if (c.precision != IMML_PRECISION_FP32 &&
      c.precision != IMML_PRECISION_BF16) {
    imml_set_err(err, n,
                 "config.precision = %d: must be IMML_PRECISION_FP32 (0) or "
                 "IMML_PRECISION_BF16 (1)",
                 c.precision);
    return IMML_ERR_INVALID_ARG;
  }
  if (c.precision == IMML_PRECISION_BF16) {
    char why[160];
    if (!imml_bf16_supported(why, sizeof why)) {
      imml_set_err(err, n,
                   "config.precision = IMML_PRECISION_BF16: %s; use "
                   "IMML_PRECISION_FP32",
                   why);
      return IMML_ERR_UNSUPPORTED;
    }
  }
  /* M k is a BLAS leading dimension and an attention width. */
  if ((long long)c.n_modalities * c.knowledge_dim > LIMIT_DIM) {
    imml_set_err(err, n,
                 "config.n_modalities * knowledge_dim = %lld exceeds the "
                 "limit %d",
                 (long long)c.n_modalities * c.knowledge_dim, LIMIT_DIM);
    return IMML_ERR_TOO_LARGE;
  }
  if (dims_out) {
    for (int m = 0; m < c.n_modalities; m++)
      dims_out[m] = c.dims[m];
    c.dims = dims_out;
  }
  if (out)
    *out = c;
  return IMML_OK;
}

imml_status imml_ft_validate(const imml_ft_ops *in, imml_ft_ops *out, char *err,
                             size_t n) {
  imml_ft_ops ft;
  imml_ft_ops_init(&ft);
  TRY(imml_struct_in(&ft, sizeof ft, IMML_FT_OPS_SIZE_KNOWN,
                     IMML_FT_OPS_SIZE_1_0, in, "imml_ft_ops",
                     "imml_ft_ops_init", err, n));
  if (!ft.forward || !ft.backward) {
    imml_set_err(err, n, "ft.%s is NULL: host F&T needs both callbacks",
                 ft.forward ? "backward" : "forward");
    return IMML_ERR_NULL;
  }
  *out = ft;
  return IMML_OK;
}

/* Every public struct ends exactly at its last field (no tail padding) on
 * LP64, so that an older program's sizeof is where its fields end: the
 * copy below then never takes padding for a newer field (doc/ABI.md). */
#if SIZE_MAX > 0xffffffffu
_Static_assert(sizeof(imml_config) == IMML_CONFIG_SIZE_KNOWN,
               "imml_config has tail padding");
_Static_assert(sizeof(imml_ft_ops) == IMML_FT_OPS_SIZE_KNOWN,
               "imml_ft_ops has tail padding");
_Static_assert(sizeof(imml_optim_config) == IMML_OPTIM_CONFIG_SIZE_KNOWN,
               "imml_optim_config has tail padding");
_Static_assert(sizeof(imml_load_options) == IMML_LOAD_OPTIONS_SIZE_KNOWN,
               "imml_load_options has tail padding");
_Static_assert(sizeof(imml_collective) == IMML_COLLECTIVE_SIZE_KNOWN,
               "imml_collective has tail padding");
#endif

/* The largest struct_size worth reading: a larger value is not a size but
 * an uninitialised field, and reading that far could fault. */
#define STRUCT_SIZE_MAX 4096

imml_status imml_struct_in(void *dst, size_t dst_size, size_t known,
                           size_t min_size, const void *src, const char *type,
                           const char *init, char *err, size_t n) {
  size_t size;
  memcpy(&size, src, sizeof size); /* struct_size is the first field */
  if (size < min_size) {
    imml_set_err(err, n,
                 "%s.struct_size = %zu: smaller than the %zu bytes of "
                 "libimml 1.0's %s; call %s()",
                 type, size, min_size, type, init);
    return IMML_ERR_INVALID_ARG;
  }
  if (size > STRUCT_SIZE_MAX) {
    imml_set_err(err, n,
                 "%s.struct_size = %zu: not a struct size (over %d bytes); "
                 "call %s()",
                 type, size, STRUCT_SIZE_MAX, init);
    return IMML_ERR_INVALID_ARG;
  }
  const unsigned char *p = src;
  /* Unknown bytes start where this library's last field ends: a newer
   * field may sit in what is tail padding here. */
  for (size_t i = known; i < size; i++)
    if (p[i] != 0) {
      imml_set_err(err, n,
                   "%s byte %zu is 0x%02x: beyond the %zu bytes of fields "
                   "this library's %s has, only zeros are accepted (the "
                   "program sets a field of a newer libimml than %s)",
                   type, i, p[i], known, type, IMML_VERSION_STRING);
      return IMML_ERR_UNKNOWN_FIELD;
    }
  memcpy(dst, src, size < dst_size ? size : dst_size);
  memcpy(dst, &dst_size, sizeof dst_size);
  return IMML_OK;
}
