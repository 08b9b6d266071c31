/* API behaviour of libimml (include/imml.h): configuration validation and
 * the failed handles of refused constructors, status texts and versions,
 * argument and state errors of forward, backward and commit (a failed call
 * changes nothing), micro-batches and what waits for their commit,
 * evaluation that never changes the model, no allocation after create, the
 * parameter API, imml_predict and shares, the predominant state, and a
 * model with 8 modalities. */
#include "bf16.h"
#include "check_main.h"
#include "common.h"

#include "imml.h"
#include "internal.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ */
/* Helpers                                                             */
/* ------------------------------------------------------------------ */

static const int dims2[2] = {5, 7};

static void small_cfg(imml_config *c, int M, const int *dims) {
  imml_config_init(c);
  c->n_modalities = M;
  c->dims = dims;
  c->hidden_dim = 8;
  c->knowledge_dim = 4;
  c->n_classes = 3;
  c->max_batch = 6;
  c->dict_size = 10;
  c->seed = 3;
}

static void fwd_train(imml_model *m, const batch *b) {
  imml_status st =
      imml_forward(m, IMML_MODE_TRAIN, b->B, feats(b), b->y, NULL, NULL);
  ck_assert_msg(st == IMML_OK, "train forward: %d %s", (int)st,
                imml_model_errmsg(m));
}

/* Trivial host F&T (logits = bias of the slot sums), for the API tests. */
static int dummy_forward(void *ud, int training, int B, int M, int k,
                         const float *const *slots, int C, float *logits) {
  (void)ud;
  (void)training;
  for (int i = 0; i < B; i++)
    for (int j = 0; j < C; j++) {
      float acc = 0.0f;
      for (int m = 0; m < M; m++)
        acc += slots[m][(size_t)i * k + (size_t)(j % k)];
      logits[(size_t)i * C + j] = acc;
    }
  return 0;
}

static int dummy_backward(void *ud, int B, int M, int k,
                          const float *const *slots, const float *dlogits,
                          int C, float *const *dslots) {
  (void)ud;
  (void)slots;
  for (int m = 0; m < M; m++) {
    memset(dslots[m], 0, (size_t)B * k * sizeof(float));
    for (int i = 0; i < B; i++)
      for (int j = 0; j < C; j++)
        dslots[m][(size_t)i * k + (size_t)(j % k)] +=
            dlogits[(size_t)i * C + j];
  }
  return 0;
}

static imml_ft_ops dummy_ops(void) {
  imml_ft_ops ops;
  imml_ft_ops_init(&ops);
  ops.forward = dummy_forward;
  ops.backward = dummy_backward;
  return ops;
}

/* ------------------------------------------------------------------ */
/* Counting allocator                                                  */
/* ------------------------------------------------------------------ */

/* The hooks are common.h's fail_alloc: counting, refusing nothing until armed.
 */
static void use_counter(imml_config *cfg, fail_alloc *c) {
  fa_reset(c);
  cfg->allocator = fa_hooks(c);
}

/* ------------------------------------------------------------------ */
/* Failed handles                                                      */
/* ------------------------------------------------------------------ */

/* f is the failed handle a constructor returned: it holds a message, every
 * call but imml_model_errmsg and imml_model_free is refused with
 * IMML_ERR_STATE and keeps that message, and the counting queries give 0.
 * Frees f. */
static void check_failed_handle(imml_model *f, const char *what) {
  ck_assert_msg(f != NULL, "%s: no failed handle", what);
  char msg[IMML_ERRMSG_SIZE];
  snprintf(msg, sizeof msg, "%s", imml_model_errmsg(f));
  ck_assert_msg(msg[0] != '\0', "%s: the failed handle holds no message", what);
  float in0[64], in1[64], out0[64], out1[64];
  memset(in0, 0, sizeof in0);
  memset(in1, 0, sizeof in1);
  const float *x[2] = {in0, in1};
  float *dx[2] = {out0, out1};
  int y[2] = {0, 0};
  imml_param_view v;
  imml_config cfg;
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_SGD);
  size_t n = 0;
  int p = 0, steps = 0;
  imml_model *share = NULL;
  const imml_status got[] = {
      imml_forward(f, IMML_MODE_TRAIN, 1, x, y, NULL, NULL),
      imml_forward(f, IMML_MODE_EVAL, 1, x, NULL, NULL, NULL),
      imml_backward(f, dx),
      imml_commit(f),
      imml_predict(f, 1, x, NULL, NULL, NULL),
      imml_fdc_adjust(f, 1, x, dx),
      imml_param_get(f, 0, &v),
      imml_param_find(f, "ft.w", &v),
      imml_param_flat(f, NULL, NULL, &n),
      imml_grad_zero(f),
      imml_predominant_get(f, &p, NULL),
      imml_predominant_set(f, 0),
      imml_optim_setup(f, &oc),
      imml_optim_set_lr(f, 0.5f),
      imml_optim_step(f),
      imml_model_get_config(f, &cfg),
      imml_model_save_mem(f, NULL, 0, &n),
      imml_model_share(f, &share),
      imml_warmup_get(f, &steps, NULL),
      imml_unimodal_get(f, 0, out0),
      imml_collective_set(f, NULL),
  };
  static const char *const name[] = {
      "forward train",  "forward eval", "backward",        "commit",
      "predict",        "fdc_adjust",   "param_get",       "param_find",
      "param_flat",     "grad_zero",    "predominant_get", "predominant_set",
      "optim_setup",    "optim_set_lr", "optim_step",      "model_get_config",
      "model_save_mem", "model_share",  "warmup_get",      "unimodal_get",
      "collective_set"};
  for (size_t i = 0; i < sizeof got / sizeof got[0]; i++) {
    ck_assert_msg(got[i] == IMML_ERR_STATE,
                  "%s: %s on a failed handle: status %d, expected %d", what,
                  name[i], (int)got[i], (int)IMML_ERR_STATE);
  }
  ck_assert_msg(strcmp(imml_model_errmsg(f), msg) == 0,
                "%s: the refused calls replaced the failed handle's message "
                "\"%s\" by \"%s\"",
                what, msg, imml_model_errmsg(f));
  /* a refused share is itself a failed handle (or NULL) */
  if (share)
    ck_assert_msg(imml_model_errmsg(share)[0] != '\0',
                  "%s: the refused share holds no message", what);
  imml_model_free(share);
  ck_assert_int_eq(imml_param_count(f), 0);
  ck_assert_int_eq(imml_fdc_dict_fill(f), 0);
  imml_model_free(f);
}

/* ------------------------------------------------------------------ */
/* Configuration                                                       */
/* ------------------------------------------------------------------ */

START_TEST(test_config_defaults) {
  imml_config c;
  memset(&c, 0xa5, sizeof c);
  imml_config_init(&c);
  ck_assert_uint_eq(c.struct_size, sizeof(imml_config));
  ck_assert_int_eq(c.n_modalities, 2);
  ck_assert_ptr_null(c.dims);
  ck_assert_int_eq(c.hidden_dim, 256);
  ck_assert_int_eq(c.knowledge_dim, 128);
  ck_assert_int_eq(c.n_classes, 0);
  ck_assert_int_eq(c.max_batch, 64);
  ck_assert_int_eq(c.dict_size, 256);
  ck_assert(c.beta == 0.5f);
  ck_assert(c.gamma1 == 0.1f);
  ck_assert(c.gamma2 == 1.0f);
  ck_assert(c.tau == 0.1f);
  ck_assert_int_eq(c.predominant, -1);
  ck_assert_int_eq(c.warmup_steps, 100);
  ck_assert_int_eq(c.slot_mode, IMML_SLOT_CONDITIONAL);
  ck_assert_uint_eq(c.seed, 0);
  ck_assert(c.allocator.malloc_fn == NULL);
  ck_assert(c.allocator.free_fn == NULL);
  ck_assert_ptr_null(c.allocator.user_data);
  ck_assert_int_eq(c.precision, IMML_PRECISION_FP32);
  ck_assert_uint_eq(c.memory_limit, IMML_MEMORY_LIMIT_DEFAULT);
  ck_assert_uint_eq(IMML_MEMORY_LIMIT_DEFAULT,
                    SIZE_MAX > 0xffffffffu ? (size_t)8 << 30 : SIZE_MAX);
  /* the defaults plus dims and n_classes make a valid model */
  int dims[2] = {3, 4};
  c.dims = dims;
  c.n_classes = 2;
  imml_model *m = create_ok(&c, NULL);
  dims[0] = 99; /* dims were copied at create */
  imml_config got;
  imml_config_init(&got);
  ck_assert_int_eq(imml_model_get_config(m, &got), IMML_OK);
  ck_assert_int_eq(got.dims[0], 3);
  ck_assert_int_eq(got.dims[1], 4);
  ck_assert_int_eq(got.hidden_dim, 256);
  ck_assert_int_eq(got.n_classes, 2);
  ck_assert_int_eq(imml_model_get_config(NULL, &got), IMML_ERR_NULL);
  ck_assert_int_eq(imml_model_get_config(m, NULL), IMML_ERR_NULL);
  imml_model_free(m);

  imml_ft_ops ops;
  memset(&ops, 0xa5, sizeof ops);
  imml_ft_ops_init(&ops);
  ck_assert_uint_eq(ops.struct_size, sizeof(imml_ft_ops));
  ck_assert(ops.forward == NULL);
  ck_assert(ops.backward == NULL);
  ck_assert_ptr_null(ops.user_data);
}
END_TEST

static void *only_malloc(size_t n, void *ud) {
  (void)ud;
  return malloc(n);
}

static void only_free(void *p, void *ud) {
  (void)ud;
  free(p);
}

typedef struct cfg_case {
  const char *field; /* must appear in the message */
  const char *value; /* must appear too, or NULL */
  imml_status st, alt;
} cfg_case;

enum { N_CFG_CASES = 27 };

static const int dims65[65] = {
    3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,
    3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,
    3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3};
static const int dims_zero[2] = {5, 0};

/* Applies out-of-range case i to a valid config. */
static cfg_case apply_case(int i, imml_config *c) {
  const imml_status INV = IMML_ERR_INVALID_ARG;
  cfg_case k = {NULL, NULL, INV, INV};
  switch (i) {
  case 0:
    c->n_modalities = 1;
    k.field = "n_modalities";
    break;
  case 1:
    /* beyond IMML_MAX_MODALITIES: a limit (TOO_LARGE) or a range
     * (INVALID_ARG); both describe it */
    c->n_modalities = 65;
    c->dims = dims65;
    k.field = "n_modalities";
    k.value = "65";
    k.st = IMML_ERR_TOO_LARGE;
    break;
  case 2:
    c->dims = NULL;
    k.field = "dims";
    k.st = k.alt = IMML_ERR_NULL;
    break;
  case 3:
    c->dims = dims_zero;
    k.field = "dims[1]";
    break;
  case 4:
    c->hidden_dim = 0;
    k.field = "hidden_dim";
    break;
  case 5:
    c->knowledge_dim = 0;
    k.field = "knowledge_dim";
    break;
  case 6:
    c->n_classes = 1;
    k.field = "n_classes";
    break;
  case 7:
    c->max_batch = 0;
    k.field = "max_batch";
    break;
  case 8:
    c->dict_size = 0;
    k.field = "dict_size";
    break;
  case 9:
    c->beta = -0.1f;
    k.field = "beta";
    k.value = "-0.1";
    break;
  case 10:
    c->beta = 1.1f;
    k.field = "beta";
    k.value = "1.1";
    break;
  case 11:
    c->beta = NAN;
    k.field = "beta";
    k.value = "nan";
    break;
  case 12:
    c->gamma1 = -1.0f;
    k.field = "gamma1";
    k.value = "-1";
    break;
  case 13:
    c->tau = 0.0f;
    k.field = "tau";
    break;
  case 14:
    c->predominant = -2;
    k.field = "predominant";
    k.value = "-2";
    break;
  case 15:
    c->predominant = c->n_modalities;
    k.field = "predominant";
    break;
  case 16:
    c->warmup_steps = -1;
    k.field = "warmup_steps";
    k.value = "-1";
    break;
  case 17:
    c->slot_mode = 7;
    k.field = "slot_mode";
    k.value = "7";
    break;
  case 18:
    c->struct_size = sizeof(imml_config) - 1;
    k.field = "struct_size";
    break;
  case 19:
    c->allocator.malloc_fn = only_malloc;
    k.field = "allocator";
    break;
  case 20:
    c->allocator.free_fn = only_free;
    k.field = "allocator";
    break;
  case 21:
    c->gamma2 = -0.5f;
    k.field = "gamma2";
    break;
  case 22:
    c->tau = -1.0f;
    k.field = "tau";
    break;
  case 23:
    c->beta = INFINITY;
    k.field = "beta";
    break;
  case 24:
    c->precision = 2;
    k.field = "precision";
    k.value = "2";
    break;
  case 25:
    if (!imml_bf16_supported(NULL, 0)) {
      /* a build or CPU without bf16 products refuses it, saying why */
      c->precision = IMML_PRECISION_BF16;
      k.field = "precision";
      k.st = k.alt = IMML_ERR_UNSUPPORTED;
    } else { /* bf16 works here (tests/test_bf16.c): a negative value */
      c->precision = -1;
      k.field = "precision";
      k.value = "-1";
    }
    break;
  case 26:
    /* far below the arena of even this small model */
    c->memory_limit = 4096;
    k.field = "memory_limit";
    k.st = k.alt = IMML_ERR_TOO_LARGE;
    break;
  default:
    ck_abort_msg("no case %d", i);
  }
  return k;
}

START_TEST(test_config_rejects_field) {
  imml_config c;
  small_cfg(&c, 2, dims2);
  const cfg_case k = apply_case(_i, &c);
  imml_model *out = (imml_model *)&c;
  const imml_status st = imml_model_create(&c, NULL, &out);
  ck_assert_msg(st == k.st || st == k.alt,
                "case %d (%s): status %d (%s), expected %d", _i, k.field,
                (int)st, imml_status_string(st), (int)k.st);
  ck_assert_msg(out != NULL && out != (imml_model *)&c,
                "case %d: no failed handle in *out", _i);
  const char *err = imml_model_errmsg(out);
  ck_assert_msg(strlen(err) < IMML_ERRMSG_SIZE,
                "case %d: message not terminated", _i);
  ck_assert_msg(strstr(err, k.field) != NULL,
                "case %d: message \"%s\" does not name %s", _i, err, k.field);
  if (k.value)
    ck_assert_msg(strstr(err, k.value) != NULL,
                  "case %d: message \"%s\" does not give the value %s", _i, err,
                  k.value);
  check_failed_handle(out, k.field);
  /* a host-F&T model is refused alike */
  imml_ft_ops ops = dummy_ops();
  char msg[IMML_ERRMSG_SIZE];
  create_fails(&c, &ops, st, msg, sizeof msg);
  ck_assert_msg(strstr(msg, k.field) != NULL,
                "case %d, host F&T: message \"%s\" does not name %s", _i, msg,
                k.field);
}
END_TEST

START_TEST(test_config_accepts_boundaries) {
  for (int i = 0; i < 11; i++) {
    imml_config c;
    small_cfg(&c, 2, dims2);
    switch (i) {
    case 0:
      c.beta = 0.0f;
      break;
    case 1:
      c.beta = 1.0f;
      break;
    case 2:
      c.gamma1 = 0.0f;
      c.gamma2 = 0.0f;
      break;
    case 3:
      c.predominant = 1;
      break;
    case 4:
      c.warmup_steps = 0;
      break;
    case 5:
      c.n_modalities = 64;
      c.dims = dims65;
      c.hidden_dim = 2;
      c.knowledge_dim = 2;
      break;
    case 6:
      c.slot_mode = IMML_SLOT_STRICT;
      break;
    case 7:
      c.tau = 1e-3f;
      c.n_classes = 2;
      c.max_batch = 1;
      c.dict_size = 1;
      break;
    case 8:
      c.hidden_dim = 1;
      c.knowledge_dim = 1;
      break;
    case 9:
      c.precision = IMML_PRECISION_FP32;
      c.memory_limit = SIZE_MAX;
      break;
    default:
      c.seed = UINT64_MAX;
      break;
    }
    imml_model *m = NULL;
    const imml_status st = imml_model_create(&c, NULL, &m);
    ck_assert_msg(st == IMML_OK, "boundary case %d refused: %d %s", i, (int)st,
                  imml_model_errmsg(m));
    ck_assert_ptr_nonnull(m);
    ck_assert_str_eq(imml_model_errmsg(m), "");
    imml_model_free(m);
  }
  /* a struct_size from a newer, larger header is accepted when the bytes
   * this library does not know are zero, and refused with
   * IMML_ERR_UNKNOWN_FIELD (a failed handle naming the byte) otherwise */
  const size_t extra = 32;
  unsigned char *big = xcalloc(1, sizeof(imml_config) + extra);
  imml_config c;
  small_cfg(&c, 2, dims2);
  c.struct_size = sizeof(imml_config) + extra;
  memcpy(big, &c, sizeof c);
  imml_model *m = NULL;
  ck_assert_int_eq(
      imml_model_create((const imml_config *)(void *)big, NULL, &m), IMML_OK);
  ck_assert_ptr_nonnull(m);
  imml_config got;
  imml_config_init(&got);
  ck_assert_int_eq(imml_model_get_config(m, &got), IMML_OK);
  ck_assert_uint_eq(got.struct_size, sizeof(imml_config));
  ck_assert_int_eq(got.hidden_dim, c.hidden_dim);
  imml_model_free(m);
  const size_t where[2] = {sizeof(imml_config),
                           sizeof(imml_config) + extra - 1};
  for (int w = 0; w < 2; w++) {
    memset(big + sizeof c, 0, extra);
    big[where[w]] = 0x01;
    char msg[IMML_ERRMSG_SIZE], at[32];
    create_fails((const imml_config *)(void *)big, NULL, IMML_ERR_UNKNOWN_FIELD,
                 msg, sizeof msg);
    snprintf(at, sizeof at, "%zu", where[w]);
    ck_assert_msg(strstr(msg, at) != NULL,
                  "message \"%s\" does not name byte %s", msg, at);
  }
  free(big);
  /* the same rule for imml_ft_ops */
  c.struct_size = sizeof c;
  imml_ft_ops ops = dummy_ops();
  unsigned char *bigops = xcalloc(1, sizeof ops + extra);
  ops.struct_size = sizeof ops + extra;
  memcpy(bigops, &ops, sizeof ops);
  m = create_ok(&c, (const imml_ft_ops *)(void *)bigops);
  imml_model_free(m);
  bigops[sizeof ops + 3] = 0xff;
  create_fails(&c, (const imml_ft_ops *)(void *)bigops, IMML_ERR_UNKNOWN_FIELD,
               NULL, 0);
  free(bigops);
}
END_TEST

START_TEST(test_create_null_and_ft_args) {
  imml_config c;
  small_cfg(&c, 2, dims2);
  imml_model *m = (imml_model *)&c;
  /* a NULL config: a failed handle that says so */
  ck_assert_int_eq(imml_model_create(NULL, NULL, &m), IMML_ERR_NULL);
  ck_assert_msg(m != NULL && m != (imml_model *)&c, "no failed handle");
  ck_assert_msg(strstr(imml_model_errmsg(m), "config"),
                "message \"%s\" does not name the config",
                imml_model_errmsg(m));
  check_failed_handle(m, "NULL config");
  /* no out: nothing to hand a handle to */
  ck_assert_int_eq(imml_model_create(&c, NULL, NULL), IMML_ERR_NULL);
  /* host F&T: both callbacks needed, struct_size checked */
  char msg[IMML_ERRMSG_SIZE];
  imml_ft_ops ops = dummy_ops();
  ops.backward = NULL;
  create_fails(&c, &ops, IMML_ERR_NULL, msg, sizeof msg);
  ck_assert_msg(strstr(msg, "backward"), "message \"%s\"", msg);
  ops = dummy_ops();
  ops.forward = NULL;
  create_fails(&c, &ops, IMML_ERR_NULL, msg, sizeof msg);
  ck_assert_msg(strstr(msg, "forward"), "message \"%s\"", msg);
  ops = dummy_ops();
  ops.struct_size = 4;
  create_fails(&c, &ops, IMML_ERR_INVALID_ARG, msg, sizeof msg);
  ck_assert_msg(strstr(msg, "struct_size"), "message \"%s\"", msg);
  /* the message lives in the failed handle, terminated within it */
  c.hidden_dim = 0;
  m = NULL;
  ck_assert_int_eq(imml_model_create(&c, NULL, &m), IMML_ERR_INVALID_ARG);
  ck_assert_ptr_nonnull(m);
  ck_assert_msg(strlen(imml_model_errmsg(m)) > 0 &&
                    strlen(imml_model_errmsg(m)) < IMML_ERRMSG_SIZE,
                "message length %zu", strlen(imml_model_errmsg(m)));
  check_failed_handle(m, "hidden_dim 0");
  /* success: a model whose message is empty */
  c.hidden_dim = 8;
  m = NULL;
  ck_assert_int_eq(imml_model_create(&c, NULL, &m), IMML_OK);
  ck_assert_ptr_nonnull(m);
  ck_assert_str_eq(imml_model_errmsg(m), "");
  ck_assert_int_eq(m->failed, 0);
  imml_model_free(m);
}
END_TEST

START_TEST(test_free_null_and_null_handles) {
  imml_model_free(NULL);
  ck_assert_msg(imml_model_errmsg(NULL) && imml_model_errmsg(NULL)[0] != '\0',
                "imml_model_errmsg(NULL) should be a static text");
  ck_assert_int_eq(imml_param_count(NULL), 0);
  ck_assert_int_eq(imml_fdc_dict_fill(NULL), 0);
  int p = 5;
  ck_assert_int_eq(imml_predominant_get(NULL, &p, NULL), IMML_ERR_NULL);
  ck_assert_int_eq(imml_predominant_set(NULL, 0), IMML_ERR_NULL);
  ck_assert_int_eq(imml_warmup_get(NULL, NULL, NULL), IMML_ERR_NULL);
  ck_assert_int_eq(imml_grad_zero(NULL), IMML_ERR_NULL);
  ck_assert_int_eq(imml_optim_step(NULL), IMML_ERR_NULL);
  ck_assert_int_eq(imml_commit(NULL), IMML_ERR_NULL);
  ck_assert_int_eq(imml_param_flat(NULL, NULL, NULL, NULL), IMML_ERR_NULL);
  imml_param_view v;
  ck_assert_int_eq(imml_param_get(NULL, 0, &v), IMML_ERR_NULL);
  ck_assert_int_eq(imml_param_find(NULL, "ft.w", &v), IMML_ERR_NULL);
  imml_config c;
  imml_config_init(&c);
  ck_assert_int_eq(imml_model_get_config(NULL, &c), IMML_ERR_NULL);
  /* a share of nothing: refused, with a failed handle (or none) */
  imml_model *s = NULL;
  ck_assert_int_eq(imml_model_share(NULL, &s), IMML_ERR_NULL);
  if (s) {
    ck_assert_msg(imml_model_errmsg(s)[0] != '\0', "no message");
    imml_model_free(s);
  }
  ck_assert_int_eq(imml_model_share(NULL, NULL), IMML_ERR_NULL);
}
END_TEST

START_TEST(test_status_string) {
  const int n = IMML_ERR_UNSUPPORTED + 1;
  for (int i = 0; i < n; i++) {
    const char *s = imml_status_string((imml_status)i);
    ck_assert_ptr_nonnull(s);
    ck_assert_msg(s[0] != '\0', "status %d has an empty text", i);
    ck_assert_msg(strcmp(s, "unknown status") != 0, "status %d is not known",
                  i);
    for (int j = 0; j < i; j++)
      ck_assert_msg(strcmp(s, imml_status_string((imml_status)j)) != 0,
                    "statuses %d and %d share the text \"%s\"", j, i, s);
  }
  ck_assert_str_eq(imml_status_string((imml_status)n), "unknown status");
  ck_assert_str_eq(imml_status_string((imml_status)-1), "unknown status");
  ck_assert_str_eq(imml_status_string((imml_status)12345), "unknown status");
  /* the frozen numbers */
  ck_assert_int_eq(IMML_OK, 0);
  ck_assert_int_eq(IMML_ERR_CALLBACK, 7);
  ck_assert_int_eq(IMML_ERR_BUFFER_SMALL, 17);
  ck_assert_int_eq(IMML_ERR_UNKNOWN_FIELD, 18);
  ck_assert_int_eq(IMML_ERR_UNSUPPORTED, 19);
}
END_TEST

START_TEST(test_version) {
  ck_assert_uint_eq(imml_version_number(), IMML_VERSION_NUMBER);
  ck_assert_uint_eq(IMML_VERSION_NUMBER, IMML_VERSION_MAJOR * 10000 +
                                             IMML_VERSION_MINOR * 100 +
                                             IMML_VERSION_PATCH);
  ck_assert_str_eq(imml_version_string(), IMML_VERSION_STRING);
  char buf[64];
  snprintf(buf, sizeof buf, "%d.%d.%d", IMML_VERSION_MAJOR, IMML_VERSION_MINOR,
           IMML_VERSION_PATCH);
  ck_assert_str_eq(imml_version_string(), buf);
  /* this is the 1.x ABI (soname libimml.so.1) */
  ck_assert_int_eq(IMML_VERSION_MAJOR, 1);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Forward / backward argument and state errors                        */
/* ------------------------------------------------------------------ */

/* A model part-way through training: warm-up done (p fixed), a partly
 * filled dictionary, non-zero accumulated gradients, an optimiser. */
static imml_model *trained_model(drng *r, int steps) {
  imml_config c;
  small_cfg(&c, 2, dims2);
  c.warmup_steps = 2;
  imml_model *m = create_ok(&c, NULL);
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
  ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
  for (int s = 0; s < steps; s++) {
    batch b;
    batch_random(&b, 2, dims2, 3, c.n_classes, r);
    fwd_train(m, &b);
    backward_ok(m, NULL);
    if (s + 1 < steps)
      ck_assert_int_eq(imml_optim_step(m), IMML_OK);
    batch_free(&b);
  }
  return m;
}

/* The message of the last expect_fail (the snapshot's own successful calls
 * clear imml_model_errmsg). */
static char last_msg[IMML_ERRMSG_SIZE];

/* The call failed with `want`, left a message and changed nothing. */
static void expect_fail(imml_model *m, imml_status got, imml_status want,
                        const snap *before, const char *what) {
  ck_assert_msg(got == want, "%s: status %d (%s), expected %d (%s)", what,
                (int)got, imml_status_string(got), (int)want,
                imml_status_string(want));
  ck_assert_msg(imml_model_errmsg(m)[0] != '\0', "%s: empty imml_model_errmsg",
                what);
  snprintf(last_msg, sizeof last_msg, "%s", imml_model_errmsg(m));
  expect_unchanged(m, before, what);
}

START_TEST(test_forward_argument_errors) {
  drng r = {17}, r2 = {17};
  imml_model *m = trained_model(&r, 3);
  imml_model *ref = trained_model(&r2, 3);
  const int C = 3, maxb = 6;
  batch b, big;
  batch_random(&b, 2, dims2, 4, C, &r);
  batch_random(&big, 2, dims2, maxb + 1, C, &r);
  fwd_train(m, &b); /* a pending step the failures must not disturb */
  fwd_train(ref, &b);
  snap s0;
  snap_take(m, &s0);
  ck_assert_int_ge(s0.fill, 1);
  ck_assert_int_eq(s0.fixed, 1);
  float logits[7 * 3];
  imml_losses l;
  for (int mode = 0; mode < 2; mode++) {
    const imml_mode md = mode ? IMML_MODE_EVAL : IMML_MODE_TRAIN;
    ck_assert_int_eq(imml_forward(NULL, md, 4, feats(&b), b.y, logits, &l),
                     IMML_ERR_NULL);
    expect_fail(m, imml_forward(m, md, 4, NULL, b.y, logits, &l), IMML_ERR_NULL,
                &s0, "features NULL");
    const float *half[2] = {b.x[0], NULL};
    expect_fail(m, imml_forward(m, md, 4, half, b.y, logits, &l), IMML_ERR_NULL,
                &s0, "features[1] NULL");
    expect_fail(m, imml_forward(m, md, 0, feats(&b), b.y, logits, &l),
                IMML_ERR_SHAPE, &s0, "batch 0");
    expect_fail(m, imml_forward(m, md, -1, feats(&b), b.y, logits, &l),
                IMML_ERR_SHAPE, &s0, "batch -1");
    expect_fail(m,
                imml_forward(m, md, maxb + 1, feats(&big), big.y, logits, &l),
                IMML_ERR_SHAPE, &s0, "batch max_batch+1");
    const int saved = b.y[2];
    b.y[2] = -1;
    expect_fail(m, imml_forward(m, md, 4, feats(&b), b.y, logits, &l),
                IMML_ERR_LABEL, &s0, "label -1");
    b.y[2] = C;
    expect_fail(m, imml_forward(m, md, 4, feats(&b), b.y, logits, &l),
                IMML_ERR_LABEL, &s0, "label C");
    b.y[2] = saved;
    /* non-finite features, message naming the modality and the row */
    const float bad[3] = {NAN, INFINITY, -INFINITY};
    for (int v = 0; v < 3; v++) {
      const int mm = v == 1 ? 0 : 1, row = v == 1 ? 0 : 2, col = v;
      float *cell = &b.x[mm][(size_t)row * dims2[mm] + col];
      const float keep = *cell;
      *cell = bad[v];
      expect_fail(m, imml_forward(m, md, 4, feats(&b), b.y, logits, &l),
                  IMML_ERR_NONFINITE, &s0, "non-finite feature");
      char mod1[32], mod2[32], rowtxt[32];
      snprintf(mod1, sizeof mod1, "features[%d]", mm);
      snprintf(mod2, sizeof mod2, "modality %d", mm);
      snprintf(rowtxt, sizeof rowtxt, "row %d", row);
      const char *msg = last_msg;
      ck_assert_msg(
          (strstr(msg, mod1) || strstr(msg, mod2)) && strstr(msg, rowtxt),
          "message \"%s\" does not name modality %d row %d", msg, mm, row);
      *cell = keep;
    }
  }
  expect_fail(m,
              imml_forward(m, IMML_MODE_TRAIN, 4, feats(&b), NULL, logits, &l),
              IMML_ERR_NULL, &s0, "labels NULL in training");
  expect_fail(m, imml_forward(m, (imml_mode)2, 4, feats(&b), b.y, logits, &l),
              IMML_ERR_INVALID_ARG, &s0, "mode 2");
  expect_fail(m, imml_forward(m, (imml_mode)-1, 4, feats(&b), b.y, logits, &l),
              IMML_ERR_INVALID_ARG, &s0, "mode -1");
  /* a successful call clears the message */
  ck_assert_int_eq(
      imml_forward(m, IMML_MODE_EVAL, 4, feats(&b), NULL, logits, NULL),
      IMML_OK);
  ck_assert_str_eq(imml_model_errmsg(m), "");
  /* the pending step survived every failure: its backward equals that of a
   * model that never saw them */
  backward_ok(m, NULL);
  backward_ok(ref, NULL);
  snap a, c;
  snap_take(m, &a);
  snap_take(ref, &c);
  snap_check(&c, &a, "backward after the failed calls");
  snap_free(&a);
  snap_free(&c);
  snap_free(&s0);
  batch_free(&b);
  batch_free(&big);
  imml_model_free(m);
  imml_model_free(ref);
}
END_TEST

START_TEST(test_backward_state_errors) {
  imml_config c;
  small_cfg(&c, 2, dims2);
  c.warmup_steps = 2;
  imml_model *m = create_ok(&c, NULL);
  drng r = {4};
  batch b;
  batch_random(&b, 2, dims2, 4, c.n_classes, &r);
  float *dh[2];
  dfeat_alloc(dh, &b);
  snap s0;
  ck_assert_int_eq(imml_backward(NULL, NULL), IMML_ERR_NULL);
  snap_take(m, &s0);
  expect_fail(m, imml_backward(m, NULL), IMML_ERR_STATE, &s0,
              "backward on a fresh model");
  expect_fail(m, imml_backward(m, dh), IMML_ERR_STATE, &s0,
              "backward on a fresh model, with dfeatures");
  ck_assert_int_eq(imml_commit(NULL), IMML_ERR_NULL);
  expect_fail(m, imml_commit(m), IMML_ERR_STATE, &s0,
              "commit on a fresh model");
  ck_assert_int_eq(
      imml_forward(m, IMML_MODE_EVAL, 4, feats(&b), b.y, NULL, NULL), IMML_OK);
  expect_fail(m, imml_backward(m, NULL), IMML_ERR_STATE, &s0,
              "backward after an evaluation forward only");
  expect_fail(m, imml_commit(m), IMML_ERR_STATE, &s0,
              "commit after an evaluation forward only");
  /* a training forward refused for its arguments leaves nothing pending */
  expect_fail(m,
              imml_forward(m, IMML_MODE_TRAIN, 0, feats(&b), b.y, NULL, NULL),
              IMML_ERR_SHAPE, &s0, "bad training forward");
  expect_fail(m, imml_backward(m, NULL), IMML_ERR_STATE, &s0,
              "backward after a refused training forward");
  snap_free(&s0);
  for (int round = 0; round < 3; round++) {
    fwd_train(m, &b);
    /* a training forward alone is no micro-batch: nothing to commit */
    snap_take(m, &s0);
    ck_assert_int_eq(s0.pending, 1);
    expect_fail(m, imml_commit(m), IMML_ERR_STATE, &s0,
                "commit after a training forward without its backward");
    snap_free(&s0);
    backward_ok(m, dh);
    snap_take(m, &s0);
    ck_assert_int_eq(s0.fill, round < 2 ? 4 * (round + 1) : 10);
    ck_assert_int_eq(s0.staged, 0);
    expect_fail(m, imml_backward(m, dh), IMML_ERR_STATE, &s0,
                "second backward");
    expect_fail(m, imml_backward(m, NULL), IMML_ERR_STATE, &s0,
                "third backward");
    expect_fail(m, imml_commit(m), IMML_ERR_STATE, &s0, "second commit");
    snap_free(&s0);
  }
  dfeat_free(dh, 2);
  batch_free(&b);
  imml_model_free(m);
}
END_TEST

/* Between a step's micro-batches (backwards not yet committed) the calls
 * that need a whole step refuse with IMML_ERR_STATE and change nothing:
 * imml_optim_step, imml_model_save(_mem), imml_collective_set,
 * imml_predominant_set; the dictionary and the warm-up wait for the
 * commit, which takes every micro-batch at once. */
START_TEST(test_uncommitted_refusals) {
  imml_config c;
  small_cfg(&c, 2, dims2);
  c.warmup_steps = 2;
  imml_model *m = create_ok(&c, NULL);
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
  ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
  char dir[256], path[300];
  make_tmpdir(dir, sizeof dir, "imml-model-");
  snprintf(path, sizeof path, "%s/m.imml", dir);
  drng r = {31};
  batch b1, b2;
  batch_random(&b1, 2, dims2, 4, c.n_classes, &r);
  batch_random(&b2, 2, dims2, 3, c.n_classes, &r);
  imml_collective coll;
  imml_collective_init(&coll);
  for (int micro = 1; micro <= 2; micro++) {
    fwd_train(m, micro == 1 ? &b1 : &b2);
    backward_only_ok(m, NULL);
    snap s0;
    snap_take(m, &s0);
    ck_assert_int_eq(s0.staged, micro);
    ck_assert_int_eq(s0.fill, 0);  /* nothing pushed before the commit */
    ck_assert_int_eq(s0.steps, 0); /* nor counted */
    expect_fail(m, imml_optim_step(m), IMML_ERR_STATE, &s0,
                "optim_step with uncommitted micro-batches");
    size_t size = 0;
    expect_fail(m, imml_model_save_mem(m, NULL, 0, &size), IMML_ERR_STATE, &s0,
                "save_mem with uncommitted micro-batches");
    expect_fail(m, imml_model_save(m, path), IMML_ERR_STATE, &s0,
                "save with uncommitted micro-batches");
    ck_assert_msg(access(path, F_OK) != 0, "a refused save wrote %s", path);
    expect_fail(m, imml_collective_set(m, &coll), IMML_ERR_STATE, &s0,
                "collective_set with uncommitted micro-batches");
    expect_fail(m, imml_collective_set(m, NULL), IMML_ERR_STATE, &s0,
                "collective detach with uncommitted micro-batches");
    expect_fail(m, imml_predominant_set(m, 1), IMML_ERR_STATE, &s0,
                "predominant_set with uncommitted micro-batches");
    expect_fail(m, imml_backward(m, NULL), IMML_ERR_STATE, &s0,
                "a second backward of the same forward");
    snap_free(&s0);
  }
  ck_assert_int_eq(imml_commit(m), IMML_OK);
  ck_assert_str_eq(imml_model_errmsg(m), "");
  snap s1;
  snap_take(m, &s1);
  ck_assert_int_eq(s1.staged, 0);
  ck_assert_int_eq(s1.fill, b1.B + b2.B);
  ck_assert_int_eq(s1.steps, 1); /* one step however many micro-batches */
  ck_assert_int_eq(s1.fixed, 0);
  snap_free(&s1);
  /* a committed model saves and steps */
  size_t size = 0;
  const imml_status ss = imml_model_save_mem(m, NULL, 0, &size);
  ck_assert_msg(ss == IMML_OK || ss == IMML_ERR_BUFFER_SMALL,
                "save_mem size query after the commit: %d %s", (int)ss,
                imml_model_errmsg(m));
  ck_assert_uint_gt(size, 0);
  ck_assert_int_eq(imml_model_save(m, path), IMML_OK);
  ck_assert_int_eq(imml_optim_step(m), IMML_OK);
  remove_tree(dir);
  batch_free(&b1);
  batch_free(&b2);
  imml_model_free(m);
}
END_TEST

/* The logical dictionary row t (oldest first) of m. */
static const float *dict_row(const imml_model *m, int t) {
  const int J = m->cfg.dict_size;
  const int start = m->dict_fill < J ? 0 : m->dict_pos;
  return m->dict + (size_t)((start + t) % J) * (size_t)m->cfg.n_modalities *
                       (size_t)m->cfg.knowledge_dim;
}

/* imml_backward accumulates (+=): two steps without an optimiser step give
 * the sum of the two steps' gradients (imml_commit does not touch them),
 * and imml_grad_zero resets. */
START_TEST(test_backward_accumulates) {
  imml_config c;
  small_cfg(&c, 2, dims2);
  c.warmup_steps = 1;
  imml_model *a = create_ok(&c, NULL), *b = create_ok(&c, NULL);
  drng r = {12};
  batch b1, b2;
  batch_random(&b1, 2, dims2, 4, c.n_classes, &r);
  batch_random(&b2, 2, dims2, 5, c.n_classes, &r);
  float *ga, *gb;
  size_t n;
  ck_assert_int_eq(imml_param_flat(a, NULL, &ga, &n), IMML_OK);
  ck_assert_int_eq(imml_param_flat(b, NULL, &gb, &n), IMML_OK);
  /* a: two steps accumulated */
  fwd_train(a, &b1);
  backward_ok(a, NULL);
  fwd_train(a, &b2);
  backward_ok(a, NULL);
  /* b: the same two steps, gradients taken apart */
  fwd_train(b, &b1);
  backward_ok(b, NULL);
  float *g1 = xcalloc(n, sizeof(float));
  memcpy(g1, gb, n * sizeof(float));
  ck_assert_int_eq(imml_grad_zero(b), IMML_OK);
  fwd_train(b, &b2);
  backward_ok(b, NULL);
  int nonzero = 0;
  for (size_t i = 0; i < n; i++) {
    const float sum = g1[i] + gb[i];
    ck_assert_msg(memcmp(&ga[i], &sum, sizeof sum) == 0,
                  "grad[%zu] = %.9g, sum of the two steps %.9g", i,
                  (double)ga[i], (double)sum);
    nonzero += g1[i] != 0.0f && gb[i] != 0.0f;
  }
  ck_assert_int_gt(nonzero, 0);
  free(g1);
  batch_free(&b1);
  batch_free(&b2);
  imml_model_free(a);
  imml_model_free(b);
}
END_TEST

/* Two micro-batches of one step: each sees the model as the last commit
 * left it (parameters, dictionary, p), so the accumulated gradient is the
 * float sum of the gradients each would give as the step's only
 * micro-batch, and the commit pushes the first micro-batch's rows, then the
 * second's, into the ring. */
START_TEST(test_micro_batches_accumulate) {
  imml_config c;
  small_cfg(&c, 2, dims2);
  c.predominant = 1; /* the attention over the dictionary from step 1 on */
  const int Mk = c.n_modalities * c.knowledge_dim, J = c.dict_size;
  /* a: micro-batches b1, b2; b: b1 alone; d: b2 alone */
  imml_model *a = create_ok(&c, NULL), *b = create_ok(&c, NULL),
             *d = create_ok(&c, NULL);
  imml_model *all[3] = {a, b, d};
  drng r = {13};
  batch b0, b1, b2;
  batch_random(&b0, 2, dims2, 3, c.n_classes, &r);
  batch_random(&b1, 2, dims2, 4, c.n_classes, &r);
  batch_random(&b2, 2, dims2, 5, c.n_classes, &r);
  /* one whole step first: a non-empty dictionary, non-zero gradients */
  for (int i = 0; i < 3; i++) {
    fwd_train(all[i], &b0);
    backward_ok(all[i], NULL);
    ck_assert_int_eq(imml_grad_zero(all[i]), IMML_OK);
  }
  float *dha[2], *dhb[2];
  dfeat_alloc(dha, &b1);
  dfeat_alloc(dhb, &b1);
  fwd_train(a, &b1);
  backward_only_ok(a, dha);
  fwd_train(b, &b1);
  backward_only_ok(b, dhb);
  for (int mm = 0; mm < 2; mm++)
    ck_assert_msg(
        memcmp(dha[mm], dhb[mm], (size_t)b1.B * dims2[mm] * sizeof(float)) == 0,
        "micro-batch 1: dL/dh_%d differs from a lone micro-batch", mm);
  dfeat_free(dha, 2);
  dfeat_free(dhb, 2);
  dfeat_alloc(dha, &b2);
  dfeat_alloc(dhb, &b2);
  fwd_train(a, &b2);
  backward_only_ok(a, dha);
  fwd_train(d, &b2);
  backward_only_ok(d, dhb);
  for (int mm = 0; mm < 2; mm++)
    ck_assert_msg(
        memcmp(dha[mm], dhb[mm], (size_t)b2.B * dims2[mm] * sizeof(float)) == 0,
        "micro-batch 2: dL/dh_%d differs from the same batch as the "
        "step's only micro-batch (it did not see the pre-step model)",
        mm);
  dfeat_free(dha, 2);
  dfeat_free(dhb, 2);
  ck_assert_int_eq(a->acc.micro, 2);
  ck_assert_int_eq(imml_fdc_dict_fill(a), b0.B);
  float *ga, *gb, *gd;
  size_t n;
  ck_assert_int_eq(imml_param_flat(a, NULL, &ga, &n), IMML_OK);
  ck_assert_int_eq(imml_param_flat(b, NULL, &gb, &n), IMML_OK);
  ck_assert_int_eq(imml_param_flat(d, NULL, &gd, &n), IMML_OK);
  int both = 0;
  for (size_t i = 0; i < n; i++) {
    const float sum = gb[i] + gd[i];
    ck_assert_msg(memcmp(&ga[i], &sum, sizeof sum) == 0,
                  "grad[%zu] = %.9g after two micro-batches, the sum of their "
                  "gradients is %.9g",
                  i, (double)ga[i], (double)sum);
    both += gb[i] != 0.0f && gd[i] != 0.0f;
  }
  ck_assert_int_gt(both, 0);
  for (int i = 0; i < 3; i++)
    ck_assert_int_eq(imml_commit(all[i]), IMML_OK);
  /* commit ran after the gradients were summed and left them alone */
  for (size_t i = 0; i < n; i++) {
    const float sum = gb[i] + gd[i];
    ck_assert_msg(memcmp(&ga[i], &sum, sizeof sum) == 0,
                  "imml_commit changed grad[%zu]", i);
  }
  /* a's ring: the last J rows of (b0, b1, b2); b's holds (b0, b1) and d's
   * (b0, b2), the same rows computed by the same forwards */
  const int tot = b0.B + b1.B + b2.B;
  ck_assert_int_gt(tot, J);
  ck_assert_int_eq(imml_fdc_dict_fill(a), J);
  ck_assert_int_eq(a->dict_pos, tot % J);
  for (int t = 0; t < J; t++) {
    const int src = tot - J + t;
    const float *want = src < b0.B          ? dict_row(b, src)
                        : src < b0.B + b1.B ? dict_row(b, src)
                                            : dict_row(d, src - b1.B);
    ck_assert_msg(memcmp(dict_row(a, t), want, sizeof(float) * (size_t)Mk) == 0,
                  "dictionary row %d (row %d of b0, b1, b2) is not that row", t,
                  src);
  }
  for (int i = 0; i < 3; i++)
    imml_model_free(all[i]);
  batch_free(&b0);
  batch_free(&b1);
  batch_free(&b2);
}
END_TEST

/* An evaluation forward, imml_predict (on the model and on a share) and
 * imml_fdc_adjust between a training forward and its backward, or between
 * the backward and its commit, disturb neither. */
START_TEST(test_eval_between_forward_and_backward) {
  imml_config c;
  small_cfg(&c, 2, dims2);
  c.warmup_steps = 2;
  const int k = c.knowledge_dim;
  imml_model *a = create_ok(&c, NULL), *b = create_ok(&c, NULL);
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
  ck_assert_int_eq(imml_optim_setup(a, &oc), IMML_OK);
  ck_assert_int_eq(imml_optim_setup(b, &oc), IMML_OK);
  imml_model *ws = NULL;
  ck_assert_int_eq(imml_model_share(a, &ws), IMML_OK);
  drng r = {21};
  for (int round = 0; round < 5; round++) {
    batch t, e;
    batch_random(&t, 2, dims2, 4, c.n_classes, &r);
    batch_random(&e, 2, dims2, 6, c.n_classes, &r);
    float *dha[2], *dhb[2];
    dfeat_alloc(dha, &t);
    dfeat_alloc(dhb, &t);
    fwd_train(a, &t);
    fwd_train(b, &t);
    float lg[18];
    imml_losses l;
    ck_assert_int_eq(
        imml_forward(a, IMML_MODE_EVAL, e.B, feats(&e), e.y, lg, &l), IMML_OK);
    ck_assert_int_eq(
        imml_forward(a, IMML_MODE_EVAL, 2, feats(&e), NULL, lg, &l), IMML_OK);
    ck_assert_int_eq(imml_predict(ws, e.B, feats(&e), lg, NULL, NULL), IMML_OK);
    ck_assert_int_eq(imml_predict(a, e.B, feats(&e), lg, NULL, NULL), IMML_OK);
    float *z[2], *s[2];
    for (int mm = 0; mm < 2; mm++) {
      z[mm] = xcalloc((size_t)e.B * k, sizeof(float));
      s[mm] = xcalloc((size_t)e.B * k, sizeof(float));
      for (int i = 0; i < e.B * k; i++)
        z[mm][i] = drng_unif(&r);
    }
    ck_assert_int_eq(imml_fdc_adjust(a, e.B, (const float *const *)z, s),
                     IMML_OK);
    const imml_status st = imml_backward(a, dha);
    ck_assert_msg(st == IMML_OK,
                  "round %d: backward after an evaluation forward: %d (%s) %s",
                  round, (int)st, imml_status_string(st), imml_model_errmsg(a));
    ck_assert_int_eq(
        imml_forward(a, IMML_MODE_EVAL, e.B, feats(&e), e.y, lg, &l), IMML_OK);
    ck_assert_int_eq(imml_predict(ws, e.B, feats(&e), lg, NULL, NULL), IMML_OK);
    ck_assert_int_eq(imml_predict(a, 3, feats(&e), lg, NULL, NULL), IMML_OK);
    ck_assert_int_eq(imml_fdc_adjust(a, e.B, (const float *const *)z, s),
                     IMML_OK);
    ck_assert_int_eq(imml_commit(a), IMML_OK);
    backward_ok(b, dhb);
    for (int mm = 0; mm < 2; mm++)
      ck_assert_msg(memcmp(dha[mm], dhb[mm],
                           (size_t)t.B * dims2[mm] * sizeof(float)) == 0,
                    "round %d: dL/dh_%d disturbed by the evaluation", round,
                    mm);
    snap sa, sb;
    snap_take(a, &sa);
    snap_take(b, &sb);
    snap_check(&sb, &sa, "backward after evaluation calls");
    snap_free(&sa);
    snap_free(&sb);
    ck_assert_int_eq(imml_optim_step(a), IMML_OK);
    ck_assert_int_eq(imml_optim_step(b), IMML_OK);
    for (int mm = 0; mm < 2; mm++) {
      free(z[mm]);
      free(s[mm]);
    }
    dfeat_free(dha, 2);
    dfeat_free(dhb, 2);
    batch_free(&t);
    batch_free(&e);
  }
  imml_model_free(ws);
  imml_model_free(a);
  imml_model_free(b);
}
END_TEST

/* Evaluation (forward EVAL, predict, fdc_adjust) never changes the model,
 * in warm-up and after it (an evaluation during a pending training step:
 * test_eval_between_forward_and_backward). */
START_TEST(test_eval_never_changes_model) {
  imml_config c;
  small_cfg(&c, 2, dims2);
  c.warmup_steps = 2;
  const int k = c.knowledge_dim, C = c.n_classes;
  imml_model *m = create_ok(&c, NULL);
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_SGD);
  oc.momentum = 0.9f;
  ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
  imml_model *ws = NULL;
  ck_assert_int_eq(imml_model_share(m, &ws), IMML_OK);
  drng r = {8};
  for (int round = 0; round < 6; round++) {
    batch e;
    batch_random(&e, 2, dims2, 5, C, &r);
    snap s0;
    snap_take(m, &s0);
    float lg[15], pr[15];
    int cls[5];
    imml_losses l;
    ck_assert_int_eq(
        imml_forward(m, IMML_MODE_EVAL, e.B, feats(&e), NULL, lg, &l), IMML_OK);
    ck_assert_msg(isnan(l.total) && isnan(l.ce) && isnan(l.con) && isnan(l.dis),
                  "losses without labels should be NaN");
    expect_unchanged(m, &s0, "evaluation forward without labels");
    ck_assert_int_eq(
        imml_forward(m, IMML_MODE_EVAL, e.B, feats(&e), e.y, lg, &l), IMML_OK);
    ck_assert_msg(isfinite(l.total) && isfinite(l.ce) && isfinite(l.dis) &&
                      isfinite(l.con),
                  "losses with labels should be finite");
    ck_assert_msg(fabs(l.total - (l.ce + (double)c.gamma1 * l.con +
                                  (double)c.gamma2 * l.dis)) <=
                      1e-12 * fabs(l.total) + 1e-12,
                  "total != ce + gamma1 con + gamma2 dis");
    expect_unchanged(m, &s0, "evaluation forward with labels");
    ck_assert_int_eq(imml_predict(ws, e.B, feats(&e), lg, pr, cls), IMML_OK);
    expect_unchanged(m, &s0, "imml_predict");
    float *z[2], *s[2];
    for (int mm = 0; mm < 2; mm++) {
      z[mm] = xcalloc((size_t)e.B * k, sizeof(float));
      s[mm] = xcalloc((size_t)e.B * k, sizeof(float));
      for (int i = 0; i < e.B * k; i++)
        z[mm][i] = drng_unif(&r);
    }
    ck_assert_int_eq(imml_fdc_adjust(m, e.B, (const float *const *)z, s),
                     IMML_OK);
    expect_unchanged(m, &s0, "imml_fdc_adjust");
    snap_free(&s0);
    for (int mm = 0; mm < 2; mm++) {
      free(z[mm]);
      free(s[mm]);
    }
    /* one training step moves the model on */
    batch t;
    batch_random(&t, 2, dims2, 3, C, &r);
    fwd_train(m, &t);
    batch_free(&t);
    backward_ok(m, NULL);
    ck_assert_int_eq(imml_optim_step(m), IMML_OK);
    batch_free(&e);
  }
  int p, fixed;
  imml_predominant_get(m, &p, &fixed);
  ck_assert_int_eq(fixed, 1);
  imml_model_free(ws);
  imml_model_free(m);
}
END_TEST

START_TEST(test_fdc_adjust_errors) {
  imml_config c;
  small_cfg(&c, 2, dims2);
  c.predominant = 0;
  const int k = c.knowledge_dim;
  imml_model *m = create_ok(&c, NULL);
  float z0[24], z1[24], s0b[24], s1b[24];
  drng r = {2};
  for (int i = 0; i < 24; i++) {
    z0[i] = drng_unif(&r);
    z1[i] = drng_unif(&r);
  }
  const float *z[2] = {z0, z1};
  float *s[2] = {s0b, s1b};
  snap s0;
  snap_take(m, &s0);
  ck_assert_int_eq(imml_fdc_adjust(NULL, 2, z, s), IMML_ERR_NULL);
  expect_fail(m, imml_fdc_adjust(m, 0, z, s), IMML_ERR_SHAPE, &s0, "batch 0");
  expect_fail(m, imml_fdc_adjust(m, 7, z, s), IMML_ERR_SHAPE, &s0, "batch 7");
  expect_fail(m, imml_fdc_adjust(m, 2, NULL, s), IMML_ERR_NULL, &s0,
              "knowledge NULL");
  expect_fail(m, imml_fdc_adjust(m, 2, z, NULL), IMML_ERR_NULL, &s0,
              "slots NULL");
  const float *zh[2] = {z0, NULL};
  expect_fail(m, imml_fdc_adjust(m, 2, zh, s), IMML_ERR_NULL, &s0,
              "knowledge[1] NULL");
  z1[k + 1] = NAN;
  expect_fail(m, imml_fdc_adjust(m, 2, z, s), IMML_ERR_NONFINITE, &s0,
              "NaN knowledge");
  z1[k + 1] = 0.5f;
  /* slots sharing memory (the same buffer, or one row apart) */
  float *same[2] = {s0b, s0b}, *shifted[2] = {s0b + k, s0b};
  expect_fail(m, imml_fdc_adjust(m, 2, z, same), IMML_ERR_INVALID_ARG, &s0,
              "the same slot twice");
  ck_assert_ptr_nonnull(strstr(last_msg, "overlap"));
  expect_fail(m, imml_fdc_adjust(m, 2, z, shifted), IMML_ERR_INVALID_ARG, &s0,
              "overlapping slots");
  /* two B x k outputs side by side in one array are fine */
  float *halves[2] = {s0b, s0b + 2 * k};
  ck_assert_int_eq(imml_fdc_adjust(m, 2, z, halves), IMML_OK);
  ck_assert_int_eq(imml_fdc_adjust(m, 2, z, s), IMML_OK);
  ck_assert_str_eq(imml_model_errmsg(m), "");
  snap_free(&s0);
  imml_model_free(m);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Allocation                                                          */
/* ------------------------------------------------------------------ */

START_TEST(test_no_allocation_after_create) {
  for (int variant = 0; variant < 2; variant++) {
    static const int dims3[3] = {5, 7, 3};
    imml_config c;
    small_cfg(&c, 3, dims3);
    c.warmup_steps = 5;
    c.dict_size = 8;
    c.slot_mode = variant ? IMML_SLOT_STRICT : IMML_SLOT_CONDITIONAL;
    fail_alloc cnt;
    use_counter(&c, &cnt);
    imml_ft_ops ops = dummy_ops();
    imml_model *m = create_ok(&c, variant ? &ops : NULL);
    imml_optim_config oc;
    imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
    oc.clip_norm = 1.0f;
    ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
    imml_model *ws = NULL;
    ck_assert_int_eq(imml_model_share(m, &ws), IMML_OK);
    ck_assert_msg(cnt.mallocs >= 3, "the hooks were not used (%ld mallocs)",
                  cnt.mallocs);
    const long mallocs0 = cnt.mallocs, frees0 = cnt.frees;
    drng r = {77};
    const int k = c.knowledge_dim, C = c.n_classes;
    float *z[3], *sl[3];
    for (int mm = 0; mm < 3; mm++) {
      z[mm] = xcalloc((size_t)6 * k, sizeof(float));
      sl[mm] = xcalloc((size_t)6 * k, sizeof(float));
    }
    for (int step = 0; step < 50; step++) {
      batch b;
      batch_random(&b, 3, dims3, 1 + step % 6, C, &r);
      float *dh[3];
      dfeat_alloc(dh, &b);
      float lg[18], pr[18];
      int cls[6];
      imml_losses l;
      ck_assert_int_eq(
          imml_forward(m, IMML_MODE_TRAIN, b.B, feats(&b), b.y, lg, &l),
          IMML_OK);
      ck_assert_int_eq(
          imml_forward(m, IMML_MODE_EVAL, b.B, feats(&b), NULL, lg, &l),
          IMML_OK);
      ck_assert_int_eq(imml_backward(m, dh), IMML_OK);
      if (step % 3 == 1) { /* a second micro-batch */
        ck_assert_int_eq(
            imml_forward(m, IMML_MODE_TRAIN, b.B, feats(&b), b.y, lg, &l),
            IMML_OK);
        ck_assert_int_eq(imml_backward(m, NULL), IMML_OK);
        ck_assert_int_eq(imml_optim_step(m), IMML_ERR_STATE);
      }
      ck_assert_int_eq(imml_commit(m), IMML_OK);
      ck_assert_int_eq(imml_optim_step(m), IMML_OK);
      ck_assert_int_eq(
          imml_forward(m, IMML_MODE_EVAL, b.B, feats(&b), b.y, lg, &l),
          IMML_OK);
      ck_assert_int_eq(imml_predict(ws, b.B, feats(&b), lg, pr, cls), IMML_OK);
      ck_assert_int_eq(imml_predict(m, b.B, feats(&b), lg, pr, cls), IMML_OK);
      for (int mm = 0; mm < 3; mm++)
        for (int i = 0; i < b.B * k; i++)
          z[mm][i] = drng_unif(&r);
      ck_assert_int_eq(imml_fdc_adjust(m, b.B, (const float *const *)z, sl),
                       IMML_OK);
      /* failures must not allocate either */
      ck_assert_int_eq(imml_backward(m, NULL), IMML_ERR_STATE);
      ck_assert_int_eq(imml_commit(m), IMML_ERR_STATE);
      ck_assert_int_eq(
          imml_forward(ws, IMML_MODE_TRAIN, b.B, feats(&b), b.y, lg, &l),
          IMML_ERR_STATE);
      ck_assert_int_eq(
          imml_forward(m, IMML_MODE_TRAIN, 0, feats(&b), b.y, lg, &l),
          IMML_ERR_SHAPE);
      ck_assert_msg(cnt.mallocs == mallocs0 && cnt.frees == frees0,
                    "step %d: %ld allocations and %ld frees after create", step,
                    cnt.mallocs - mallocs0, cnt.frees - frees0);
      dfeat_free(dh, 3);
      batch_free(&b);
    }
    imml_param_view v;
    size_t n;
    float *pd;
    ck_assert_int_eq(imml_param_get(m, 0, &v), IMML_OK);
    ck_assert_int_eq(imml_param_flat(m, &pd, NULL, &n), IMML_OK);
    ck_assert_int_eq(imml_grad_zero(m), IMML_OK);
    ck_assert_int_eq(imml_optim_set_lr(m, 1e-4f), IMML_OK);
    ck_assert_msg(cnt.mallocs == mallocs0 && cnt.frees == frees0,
                  "allocations in the parameter API");
    int p, fixed;
    imml_predominant_get(m, &p, &fixed);
    ck_assert_int_eq(fixed, 1);
    for (int mm = 0; mm < 3; mm++) {
      free(z[mm]);
      free(sl[mm]);
    }
    imml_model_free(ws);
    imml_model_free(m);
    ck_assert_int_eq(cnt.bad_frees, 0);
    ck_assert_msg(cnt.frees == cnt.mallocs, "%ld mallocs, %ld frees",
                  cnt.mallocs, cnt.frees);
    ck_assert_uint_eq(cnt.live, 0);
  }
}
END_TEST

/* Every allocation goes through the hooks and is given back; a failing
 * allocator gives IMML_ERR_NOMEM and leaks nothing. */
START_TEST(test_allocator_hooks_balance) {
  imml_config c;
  small_cfg(&c, 2, dims2);
  fail_alloc cnt;
  use_counter(&c, &cnt);
  /* create + optimiser (set up twice) + shares, then free */
  imml_model *m = create_ok(&c, NULL);
  const long after_create = cnt.mallocs;
  ck_assert_int_ge(after_create, 1);
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
  ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
  ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
  imml_model *ws = NULL, *ws2 = NULL;
  ck_assert_int_eq(imml_model_share(m, &ws), IMML_OK);
  ck_assert_int_eq(imml_model_share(m, &ws2), IMML_OK);
  ck_assert_int_gt(cnt.mallocs, after_create);
  imml_model_free(ws2); /* shares go before their model, in any order */
  imml_model_free(ws);
  imml_model_free(m);
  ck_assert_int_eq(cnt.bad_frees, 0);
  ck_assert_int_eq(cnt.frees, cnt.mallocs);
  ck_assert_uint_eq(cnt.live, 0);
  const long total = cnt.mallocs;

  /* a refused create hands out a failed handle: through the hooks once the
   * config (and so its allocator) is known good, here refused for its
   * memory_limit; an invalid config's hooks are not trusted, but whatever
   * went through them is given back */
  for (int v = 0; v < 2; v++) {
    imml_config bad = c;
    if (v == 0)
      bad.memory_limit = 4096;
    else
      bad.hidden_dim = 0;
    use_counter(&bad, &cnt);
    imml_model *f = NULL;
    ck_assert_int_eq(imml_model_create(&bad, NULL, &f),
                     v == 0 ? IMML_ERR_TOO_LARGE : IMML_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(f);
    ck_assert_msg(v == 1 || cnt.mallocs >= 1,
                  "the failed handle was not allocated through the hooks");
    imml_model_free(f);
    ck_assert_int_eq(cnt.bad_frees, 0);
    ck_assert_int_eq(cnt.frees, cnt.mallocs);
    ck_assert_uint_eq(cnt.live, 0);
  }

  /* fail each allocation in turn: create, then the optimiser, then the
   * share, until every call succeeds.  With the hooks failing for good,
   * a failed handle cannot be allocated either: *out is then NULL (or a
   * handle holding the message, which must be freed). */
  int done = 0;
  for (long fail = 0; !done; fail++) {
    ck_assert_msg(fail <= total, "an allocation never failed");
    use_counter(&c, &cnt);
    cnt.fail_at = fail + 1; /* the first `fail` succeed, then none */
    cnt.fail_rest = 1;
    imml_model *out = (imml_model *)&c;
    const imml_status st = imml_model_create(&c, NULL, &out);
    if (fail < after_create) {
      ck_assert_msg(st == IMML_ERR_NOMEM,
                    "allocation %ld failing: status %d, expected NOMEM", fail,
                    (int)st);
      ck_assert_msg(out != (imml_model *)&c, "*out not set");
      if (out) {
        ck_assert_msg(out->failed, "NOMEM handed out a working model");
        ck_assert_msg(imml_model_errmsg(out)[0] != '\0',
                      "no message for NOMEM");
        imml_model_free(out);
      }
    } else {
      ck_assert_int_eq(st, IMML_OK);
      snap s0;
      snap_take(out, &s0);
      const imml_status so = imml_optim_setup(out, &oc);
      if (so == IMML_OK) {
        imml_model *w = (imml_model *)&c;
        const imml_status sw = imml_model_share(out, &w);
        if (sw == IMML_OK) {
          done = 1;
          imml_model_free(w);
        } else {
          ck_assert_int_eq(sw, IMML_ERR_NOMEM);
          ck_assert_msg(w != (imml_model *)&c, "*out not set");
          if (w) {
            ck_assert_msg(w->failed, "NOMEM handed out a working share");
            imml_model_free(w);
          }
        }
      } else {
        ck_assert_int_eq(so, IMML_ERR_NOMEM);
        ck_assert_msg(imml_model_errmsg(out)[0] != '\0',
                      "no message for NOMEM");
        expect_unchanged(out, &s0, "failed imml_optim_setup");
        ck_assert_int_eq(imml_optim_step(out), IMML_ERR_STATE);
      }
      snap_free(&s0);
      imml_model_free(out);
    }
    ck_assert_int_eq(cnt.bad_frees, 0);
    ck_assert_msg(cnt.frees == cnt.mallocs, "fail %ld: %ld mallocs, %ld frees",
                  fail, cnt.mallocs, cnt.frees);
  }
}
END_TEST

/* ------------------------------------------------------------------ */
/* Parameter API                                                       */
/* ------------------------------------------------------------------ */

START_TEST(test_param_api) {
  static const int dims3[3] = {5, 7, 3};
  for (int builtin = 1; builtin >= 0; builtin--) {
    imml_config c;
    small_cfg(&c, 3, dims3);
    const int H = c.hidden_dim, k = c.knowledge_dim, C = c.n_classes, M = 3;
    imml_ft_ops ops = dummy_ops();
    imml_model *m = create_ok(&c, builtin ? NULL : &ops);
    const int nt = 6 * M + 2 + (builtin ? 2 : 0);
    ck_assert_int_eq(imml_param_count(m), nt);
    float *data = NULL, *grad = NULL;
    size_t count = 0;
    ck_assert_int_eq(imml_param_flat(m, &data, &grad, &count), IMML_OK);
    ck_assert_ptr_nonnull(data);
    ck_assert_ptr_nonnull(grad);
    size_t off = 0;
    for (int i = 0; i < nt; i++) {
      char want[32];
      int rows, cols;
      if (i < 6 * M) {
        static const char *const suf[6] = {"w1", "b1", "w2", "b2", "wc", "bc"};
        const int mm = i / 6, t = i % 6;
        snprintf(want, sizeof want, "m%d.%s", mm, suf[t]);
        const int R[6] = {dims3[mm], 1, H, 1, k, 1};
        const int Cc[6] = {H, H, k, k, C, C};
        rows = R[t];
        cols = Cc[t];
      } else {
        static const char *const tail[4] = {"fdc.wq", "fdc.wk", "ft.w", "ft.b"};
        const int t = i - 6 * M;
        snprintf(want, sizeof want, "%s", tail[t]);
        rows = t == 3 ? 1 : M * k;
        cols = t < 2 ? k : C;
      }
      imml_param_view v;
      memset(&v, 0, sizeof v);
      ck_assert_int_eq(imml_param_get(m, i, &v), IMML_OK);
      ck_assert_str_eq(v.name, want);
      ck_assert_int_eq(v.rows, rows);
      ck_assert_int_eq(v.cols, cols);
      ck_assert_msg(v.data == data + off, "%s data is not at flat offset %zu",
                    want, off);
      ck_assert_msg(v.grad == grad + off, "%s grad is not at flat offset %zu",
                    want, off);
      /* the same tensor by name */
      imml_param_view byname;
      memset(&byname, 0, sizeof byname);
      ck_assert_int_eq(imml_param_find(m, want, &byname), IMML_OK);
      ck_assert_str_eq(byname.name, want);
      ck_assert(byname.rows == rows && byname.cols == cols &&
                byname.data == v.data && byname.grad == v.grad);
      off += (size_t)rows * cols;
    }
    ck_assert_uint_eq(count, off);
    /* writes through a view are writes to the flat block and are used */
    imml_param_view v;
    ck_assert_int_eq(imml_param_get(m, 1, &v), IMML_OK);
    v.data[0] = 0.25f;
    ck_assert(data[(size_t)dims3[0] * H] == 0.25f);
    for (size_t i = 0; i < count; i++)
      grad[i] = 1.0f;
    ck_assert_int_eq(imml_grad_zero(m), IMML_OK);
    for (size_t i = 0; i < count; i++)
      ck_assert_msg(grad[i] == 0.0f, "imml_grad_zero left grad[%zu]", i);
    /* bad indices */
    snap s0;
    snap_take(m, &s0);
    expect_fail(m, imml_param_get(m, -1, &v), IMML_ERR_INVALID_ARG, &s0,
                "index -1");
    expect_fail(m, imml_param_get(m, nt, &v), IMML_ERR_INVALID_ARG, &s0,
                "index count");
    expect_fail(m, imml_param_get(m, 0, NULL), IMML_ERR_NULL, &s0, "view NULL");
    /* names no tensor has: unknown, a prefix, another case, and the
     * built-in F&T's on a host-F&T model */
    static const char *const unknown[] = {"m3.w1", "m0.w", "M0.W1", "", "ft.w"};
    for (int u = 0; u < (builtin ? 4 : 5); u++) {
      expect_fail(m, imml_param_find(m, unknown[u], &v), IMML_ERR_INVALID_ARG,
                  &s0, "unknown name");
      ck_assert_msg(u == 3 || strstr(last_msg, unknown[u]) != NULL,
                    "message \"%s\" does not give the name %s", last_msg,
                    unknown[u]);
    }
    expect_fail(m, imml_param_find(m, NULL, &v), IMML_ERR_NULL, &s0,
                "name NULL");
    expect_fail(m, imml_param_find(m, "m0.w1", NULL), IMML_ERR_NULL, &s0,
                "view NULL (find)");
    snap_free(&s0);
    /* flat with NULL outputs */
    ck_assert_int_eq(imml_param_flat(m, NULL, NULL, &count), IMML_OK);
    ck_assert_uint_eq(count, off);
    imml_model_free(m);
  }
}
END_TEST

/* ------------------------------------------------------------------ */
/* imml_predict                                                        */
/* ------------------------------------------------------------------ */

START_TEST(test_predict_matches_eval) {
  imml_config c;
  small_cfg(&c, 2, dims2);
  c.warmup_steps = 2;
  c.n_classes = 4;
  const int C = c.n_classes;
  imml_model *m = create_ok(&c, NULL);
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
  oc.lr = 1e-2f;
  ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
  imml_model *ws = NULL;
  ck_assert_int_eq(imml_model_share(m, &ws), IMML_OK);
  drng r = {404};
  for (int round = 0; round < 5; round++) {
    batch e;
    batch_random(&e, 2, dims2, 1 + round, C, &r);
    const int B = e.B;
    float lf[24], lp[24], pr[24];
    int cls[6];
    ck_assert_int_eq(
        imml_forward(m, IMML_MODE_EVAL, B, feats(&e), NULL, lf, NULL), IMML_OK);
    ck_assert_int_eq(imml_predict(ws, B, feats(&e), lp, pr, cls), IMML_OK);
    ck_assert_str_eq(imml_model_errmsg(ws), "");
    ck_assert_msg(memcmp(lf, lp, (size_t)B * C * sizeof(float)) == 0,
                  "round %d: predict logits != eval forward logits", round);
    /* on the model itself: the same numbers */
    {
      float lm[24], pm[24];
      int cm[6];
      ck_assert_int_eq(imml_predict(m, B, feats(&e), lm, pm, cm), IMML_OK);
      ck_assert_msg(memcmp(lm, lp, (size_t)B * C * sizeof(float)) == 0 &&
                        memcmp(pm, pr, (size_t)B * C * sizeof(float)) == 0 &&
                        memcmp(cm, cls, (size_t)B * sizeof(int)) == 0,
                    "round %d: predict on the model != predict on its share",
                    round);
    }
    for (int i = 0; i < B; i++) {
      double sum = 0.0, mx = lp[i * C];
      int best = 0;
      for (int j = 0; j < C; j++) {
        sum += pr[i * C + j];
        if (lp[i * C + j] > lp[i * C + best])
          best = j;
        mx = fmax(mx, lp[i * C + j]);
      }
      ck_assert_msg(fabs(sum - 1.0) <= 1e-6, "row %d: probs sum to %.9g", i,
                    sum);
      ck_assert_int_eq(cls[i], best);
      double z = 0.0;
      for (int j = 0; j < C; j++)
        z += exp(lp[i * C + j] - mx);
      for (int j = 0; j < C; j++) {
        const double want = exp(lp[i * C + j] - mx) / z;
        ck_assert_msg(fabs(pr[i * C + j] - want) <= 1e-6,
                      "prob[%d][%d] = %.9g, softmax %.9g", i, j,
                      (double)pr[i * C + j], want);
      }
    }
    /* outputs are optional */
    int cls2[6];
    ck_assert_int_eq(imml_predict(ws, B, feats(&e), NULL, NULL, cls2), IMML_OK);
    ck_assert_int_eq(memcmp(cls, cls2, (size_t)B * sizeof(int)), 0);
    ck_assert_int_eq(imml_predict(ws, B, feats(&e), NULL, NULL, NULL), IMML_OK);
    /* argument errors are reported through the handle called, the share's
     * own message leaving the model's alone */
    ck_assert_int_eq(imml_predict(NULL, B, feats(&e), lp, pr, cls),
                     IMML_ERR_NULL);
    ck_assert_int_eq(imml_predict(ws, B, NULL, lp, pr, cls), IMML_ERR_NULL);
    ck_assert_int_eq(imml_predict(ws, 0, feats(&e), lp, pr, cls),
                     IMML_ERR_SHAPE);
    ck_assert_msg(imml_model_errmsg(ws)[0] != '\0', "no share message");
    ck_assert_str_eq(imml_model_errmsg(m), "");
    e.x[1][0] = NAN;
    ck_assert_int_eq(imml_predict(ws, B, feats(&e), lp, pr, cls),
                     IMML_ERR_NONFINITE);
    ck_assert_msg(imml_model_errmsg(ws)[0] != '\0', "no share message");
    ck_assert_int_eq(imml_predict(m, B, feats(&e), lp, pr, cls),
                     IMML_ERR_NONFINITE);
    ck_assert_msg(imml_model_errmsg(m)[0] != '\0', "no model message");
    /* train on */
    batch t;
    batch_random(&t, 2, dims2, 6, C, &r);
    fwd_train(m, &t);
    backward_ok(m, NULL);
    ck_assert_int_eq(imml_optim_step(m), IMML_OK);
    batch_free(&t);
    batch_free(&e);
  }
  int p, fixed;
  imml_predominant_get(m, &p, &fixed);
  ck_assert_int_eq(fixed, 1);
  /* a share serves evaluation only: every call that would change the model
   * is refused with IMML_ERR_STATE, and the model is left as it was */
  {
    batch t;
    batch_random(&t, 2, dims2, 3, C, &r);
    snap s0;
    snap_take(m, &s0);
    imml_param_view v;
    float *pd = NULL;
    size_t n = 0;
    const imml_status got[] = {
        imml_forward(ws, IMML_MODE_TRAIN, 3, feats(&t), t.y, NULL, NULL),
        imml_backward(ws, NULL),
        imml_commit(ws),
        imml_optim_setup(ws, &oc),
        imml_optim_set_lr(ws, 0.5f),
        imml_optim_step(ws),
        imml_grad_zero(ws),
        imml_predominant_set(ws, 0),
        imml_param_get(ws, 0, &v),
        imml_param_find(ws, "ft.w", &v),
        imml_param_flat(ws, &pd, NULL, &n),
        imml_collective_set(ws, NULL),
    };
    for (size_t i = 0; i < sizeof got / sizeof got[0]; i++)
      ck_assert_msg(got[i] == IMML_ERR_STATE,
                    "training call %zu on a share: status %d, expected %d", i,
                    (int)got[i], (int)IMML_ERR_STATE);
    ck_assert_msg(imml_model_errmsg(ws)[0] != '\0', "no share message");
    ck_assert_int_eq(imml_param_count(ws), 0);
    expect_unchanged(m, &s0, "training calls on a share");
    snap_free(&s0);
    /* the share still reads the model: its predominant state, its
     * dictionary fill, its evaluation */
    int ps = -2, fs = -2;
    ck_assert_int_eq(imml_predominant_get(ws, &ps, &fs), IMML_OK);
    ck_assert(ps == p && fs == 1);
    ck_assert_int_eq(imml_fdc_dict_fill(ws), imml_fdc_dict_fill(m));
    /* a share of a share is refused */
    imml_model *ws2 = NULL;
    const imml_status s2 = imml_model_share(ws, &ws2);
    ck_assert_msg(s2 == IMML_ERR_STATE || s2 == IMML_ERR_INVALID_ARG,
                  "a share of a share: status %d", (int)s2);
    if (ws2) {
      ck_assert_msg(ws2->failed, "a share of a share is a working handle");
      imml_model_free(ws2);
    }
    /* a new share holds no evaluation yet; after a predict it holds the
     * unimodal heads' logits, which an evaluation forward of the model
     * gives as well */
    imml_model *ws3 = NULL;
    ck_assert_int_eq(imml_model_share(m, &ws3), IMML_OK);
    float o[3 * 4], om[3 * 4];
    ck_assert_int_eq(imml_unimodal_get(ws3, 0, o), IMML_ERR_STATE);
    ck_assert_int_eq(imml_predict(ws3, 3, feats(&t), NULL, NULL, NULL),
                     IMML_OK);
    ck_assert_int_eq(
        imml_forward(m, IMML_MODE_EVAL, 3, feats(&t), NULL, NULL, NULL),
        IMML_OK);
    for (int mm = 0; mm < 2; mm++) {
      ck_assert_int_eq(imml_unimodal_get(ws3, mm, o), IMML_OK);
      ck_assert_int_eq(imml_unimodal_get(m, mm, om), IMML_OK);
      ck_assert_msg(memcmp(o, om, sizeof o) == 0,
                    "unimodal logits of modality %d: share != model", mm);
    }
    ck_assert_int_eq(imml_unimodal_get(ws3, 2, o), IMML_ERR_INVALID_ARG);
    imml_model_free(ws3);
    batch_free(&t);
  }
  imml_model_free(ws);
  imml_model_free(m);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Predominant state API                                               */
/* ------------------------------------------------------------------ */

START_TEST(test_predominant_api) {
  static const int d3[3] = {4, 4, 4};
  imml_config c;
  small_cfg(&c, 3, d3);
  /* named p: fixed from the start, no warm-up */
  c.predominant = 2;
  imml_model *m = create_ok(&c, NULL);
  int p = -5, fixed = -5, steps = -5;
  ck_assert_int_eq(imml_predominant_get(m, &p, &fixed), IMML_OK);
  ck_assert_int_eq(p, 2);
  ck_assert_int_eq(fixed, 1);
  ck_assert_int_eq(imml_warmup_get(m, &steps, NULL), IMML_OK);
  ck_assert_int_eq(steps, 0);
  imml_model_free(m);
  /* automatic: not chosen yet */
  c.predominant = -1;
  c.warmup_steps = 4;
  m = create_ok(&c, NULL);
  ck_assert_int_eq(imml_predominant_get(m, &p, &fixed), IMML_OK);
  ck_assert_int_eq(p, -1);
  ck_assert_int_eq(fixed, 0);
  float ema[3] = {9, 9, 9};
  ck_assert_int_eq(imml_warmup_get(m, &steps, ema), IMML_OK);
  ck_assert_int_eq(steps, 0);
  ck_assert(ema[0] == 0.0f && ema[1] == 0.0f && ema[2] == 0.0f);
  ck_assert_int_eq(imml_predominant_get(m, NULL, NULL), IMML_ERR_NULL);
  imml_model_free(m);
  /* warmup_steps = 0: fixed at create, ties to the lowest index */
  c.warmup_steps = 0;
  m = create_ok(&c, NULL);
  ck_assert_int_eq(imml_predominant_get(m, &p, &fixed), IMML_OK);
  ck_assert_int_eq(p, 0);
  ck_assert_int_eq(fixed, 1);
  snap s0;
  snap_take(m, &s0);
  expect_fail(m, imml_predominant_set(m, 1), IMML_ERR_STATE, &s0,
              "predominant_set once fixed at create");
  snap_free(&s0);
  imml_model_free(m);
}
END_TEST

/* imml_predominant_set: the host fixes p during the warm-up; the next
 * training forward follows METHOD.md section 2 (L_con counts); refused
 * for a p out of range, while a training forward is pending, and once p is
 * fixed (named in the config, chosen, or set). */
START_TEST(test_predominant_set) {
  static const int d3[3] = {4, 4, 4};
  imml_config c;
  small_cfg(&c, 3, d3);
  c.predominant = 2;
  imml_model *m = create_ok(&c, NULL);
  snap s0;
  snap_take(m, &s0);
  expect_fail(m, imml_predominant_set(m, 2), IMML_ERR_STATE, &s0,
              "predominant_set of a named p");
  snap_free(&s0);
  imml_model_free(m);

  c.predominant = -1;
  c.warmup_steps = 4;
  m = create_ok(&c, NULL);
  drng r = {61};
  batch b;
  batch_random(&b, 3, d3, 5, c.n_classes, &r);
  imml_losses l;
  ck_assert_int_eq(
      imml_forward(m, IMML_MODE_TRAIN, b.B, feats(&b), b.y, NULL, &l), IMML_OK);
  ck_assert_msg(l.con == 0.0, "L_con = %g in warm-up", l.con);
  snap_take(m, &s0);
  expect_fail(m, imml_predominant_set(m, 1), IMML_ERR_STATE, &s0,
              "predominant_set while a training forward is pending");
  expect_fail(m, imml_predominant_set(m, -1), IMML_ERR_INVALID_ARG, &s0,
              "predominant_set -1");
  expect_fail(m, imml_predominant_set(m, 3), IMML_ERR_INVALID_ARG, &s0,
              "predominant_set M");
  snap_free(&s0);
  backward_ok(m, NULL);
  int p = -5, fixed = -5;
  ck_assert_int_eq(imml_predominant_get(m, &p, &fixed), IMML_OK);
  ck_assert(p == -1 && fixed == 0);
  ck_assert_int_eq(imml_predominant_set(m, 1), IMML_OK);
  ck_assert_str_eq(imml_model_errmsg(m), "");
  ck_assert_int_eq(imml_predominant_get(m, &p, &fixed), IMML_OK);
  ck_assert_int_eq(p, 1);
  ck_assert_int_eq(fixed, 1);
  snap_take(m, &s0);
  expect_fail(m, imml_predominant_set(m, 1), IMML_ERR_STATE, &s0,
              "predominant_set twice");
  expect_fail(m, imml_predominant_set(m, 0), IMML_ERR_STATE, &s0,
              "predominant_set of another p once set");
  snap_free(&s0);
  /* the next training step is past the warm-up, and p stays */
  ck_assert_int_eq(
      imml_forward(m, IMML_MODE_TRAIN, b.B, feats(&b), b.y, NULL, &l), IMML_OK);
  ck_assert_msg(l.con > 0.0, "L_con = %g after predominant_set", l.con);
  backward_ok(m, NULL);
  ck_assert_int_eq(imml_predominant_get(m, &p, &fixed), IMML_OK);
  ck_assert(p == 1 && fixed == 1);
  batch_free(&b);
  imml_model_free(m);
}
END_TEST

/* ------------------------------------------------------------------ */
/* M = 8                                                               */
/* ------------------------------------------------------------------ */

START_TEST(test_eight_modalities) {
  static const int dims8[8] = {3, 4, 5, 6, 7, 8, 9, 10};
  for (int mode = 0; mode < 2; mode++) {
    imml_config c;
    imml_config_init(&c);
    c.n_modalities = 8;
    c.dims = dims8;
    c.hidden_dim = 8;
    c.knowledge_dim = 4;
    c.n_classes = 4;
    c.max_batch = 6;
    c.dict_size = 16;
    c.warmup_steps = 2;
    c.slot_mode = mode;
    c.seed = 88;
    imml_model *m = create_ok(&c, NULL);
    ck_assert_int_eq(imml_param_count(m), 6 * 8 + 4);
    imml_optim_config oc;
    imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
    ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
    imml_model *ws = NULL;
    ck_assert_int_eq(imml_model_share(m, &ws), IMML_OK);
    drng r = {8};
    for (int step = 0; step < 6; step++) {
      batch b;
      batch_random(&b, 8, dims8, 6, c.n_classes, &r);
      float *dh[8];
      dfeat_alloc(dh, &b);
      float lg[24];
      imml_losses l;
      ck_assert_int_eq(
          imml_forward(m, IMML_MODE_TRAIN, 6, feats(&b), b.y, lg, &l), IMML_OK);
      ck_assert_msg(isfinite(l.total), "loss not finite");
      if (step >= 2)
        ck_assert_msg(l.con > 0.0, "step %d: L_con = %g after warm-up", step,
                      l.con);
      else
        ck_assert_msg(l.con == 0.0, "L_con = %g in warm-up", l.con);
      backward_ok(m, dh);
      for (int mm = 0; mm < 8; mm++)
        for (int i = 0; i < 6 * dims8[mm]; i++)
          ck_assert_msg(isfinite(dh[mm][i]), "dh not finite");
      ck_assert_int_eq(imml_optim_step(m), IMML_OK);
      int cls[6];
      ck_assert_int_eq(imml_predict(ws, 6, feats(&b), NULL, NULL, cls),
                       IMML_OK);
      for (int i = 0; i < 6; i++)
        ck_assert(cls[i] >= 0 && cls[i] < c.n_classes);
      dfeat_free(dh, 8);
      batch_free(&b);
    }
    int p, fixed;
    imml_predominant_get(m, &p, &fixed);
    ck_assert_int_eq(fixed, 1);
    ck_assert(p >= 0 && p < 8);
    ck_assert_int_eq(imml_fdc_dict_fill(m), 16);
    imml_model_free(ws);
    imml_model_free(m);
  }
}
END_TEST

static Suite *model_suite(void) {
  Suite *s = suite_create("model");
  TCase *tc = tcase_create("api");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, test_config_defaults);
  tcase_add_loop_test(tc, test_config_rejects_field, 0, N_CFG_CASES);
  tcase_add_test(tc, test_config_accepts_boundaries);
  tcase_add_test(tc, test_create_null_and_ft_args);
  tcase_add_test(tc, test_free_null_and_null_handles);
  tcase_add_test(tc, test_status_string);
  tcase_add_test(tc, test_version);
  tcase_add_test(tc, test_forward_argument_errors);
  tcase_add_test(tc, test_backward_state_errors);
  tcase_add_test(tc, test_uncommitted_refusals);
  tcase_add_test(tc, test_backward_accumulates);
  tcase_add_test(tc, test_micro_batches_accumulate);
  tcase_add_test(tc, test_eval_between_forward_and_backward);
  tcase_add_test(tc, test_eval_never_changes_model);
  tcase_add_test(tc, test_fdc_adjust_errors);
  tcase_add_test(tc, test_no_allocation_after_create);
  tcase_add_test(tc, test_allocator_hooks_balance);
  tcase_add_test(tc, test_param_api);
  tcase_add_test(tc, test_predict_matches_eval);
  tcase_add_test(tc, test_predominant_api);
  tcase_add_test(tc, test_predominant_set);
  tcase_add_test(tc, test_eight_modalities);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) { return imml_run_suite(model_suite()); }
