/* A program built against the frozen 1.0 header (tests/abi/imml-1.0.h),
 * run against the library of this tree: every caller struct it fills has
 * the 1.0 size, and every stable call must work as 1.0 documented it.
 * Exit status 0 when all checks pass (doc/ABI.md, "How structs grow"). */
#include "imml-1.0.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

#define CHECK(cond, ...)                                                       \
  do {                                                                         \
    if (!(cond)) {                                                             \
      failures++;                                                              \
      printf("FAIL %s:%d: ", __FILE__, __LINE__);                              \
      printf(__VA_ARGS__);                                                     \
      printf("\n");                                                            \
    }                                                                          \
  } while (0)

/* A host F&T: logits = sum over slots of the slot's first C columns. */
static int ft_fwd(void *ud, int training, int B, int M, int k,
                  const float *const *slots, int C, float *logits) {
  (void)training;
  *(int *)ud += 1;
  for (int i = 0; i < B; i++)
    for (int c = 0; c < C; c++) {
      float s = 0.0f;
      for (int m = 0; m < M; m++)
        s += slots[m][(size_t)i * k + c];
      logits[(size_t)i * C + c] = s;
    }
  return 0;
}

static int ft_bwd(void *ud, int B, int M, int k, const float *const *slots,
                  const float *dlogits, int C, float *const *dslots) {
  (void)ud;
  (void)slots;
  for (int m = 0; m < M; m++)
    for (int i = 0; i < B; i++)
      for (int j = 0; j < k; j++)
        dslots[m][(size_t)i * k + j] = j < C ? dlogits[(size_t)i * C + j] : 0;
  return 0;
}

int main(void) {
  enum { B = 8, C = 3 };
  int dims[2] = {5, 4};
  float x0[B * 5], x1[B * 4];
  int y[B];
  unsigned s = 12345u;
  for (int i = 0; i < B * 5; i++)
    x0[i] = (float)((s = s * 1103515245u + 12345u) >> 16 & 1023) / 512.0f - 1;
  for (int i = 0; i < B * 4; i++)
    x1[i] = (float)((s = s * 1103515245u + 12345u) >> 16 & 1023) / 512.0f - 1;
  for (int i = 0; i < B; i++)
    y[i] = i % C;
  const float *x[2] = {x0, x1};

  CHECK(imml_version_number() / 10000 == 1, "linked library is not 1.x: %u",
        imml_version_number());

  imml_config cfg;
  imml_config_init(&cfg);
  CHECK(cfg.struct_size == sizeof(imml_config), "init set struct_size %zu",
        cfg.struct_size);
  cfg.dims = dims;
  cfg.n_classes = C;
  cfg.hidden_dim = 6;
  cfg.knowledge_dim = 4;
  cfg.max_batch = B;
  cfg.dict_size = 16;
  cfg.warmup_steps = 2;

  int calls = 0;
  imml_ft_ops ft;
  imml_ft_ops_init(&ft);
  ft.forward = ft_fwd;
  ft.backward = ft_bwd;
  ft.user_data = &calls;

  imml_model *m = NULL;
  imml_status st = imml_model_create(&cfg, &ft, &m);
  CHECK(st == IMML_OK, "create: %s", imml_model_errmsg(m));
  if (st != IMML_OK)
    return 1;
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
  oc.lr = 0.01f;
  st = imml_optim_setup(m, &oc);
  CHECK(st == IMML_OK, "optim_setup: %s", imml_model_errmsg(m));

  for (int step = 0; step < 4; step++) {
    imml_losses l;
    st = imml_forward(m, IMML_MODE_TRAIN, B, x, y, NULL, &l);
    CHECK(st == IMML_OK && isfinite(l.total), "forward: %s",
          imml_model_errmsg(m));
    st = imml_backward(m, NULL);
    CHECK(st == IMML_OK, "backward: %s", imml_model_errmsg(m));
    st = imml_commit(m);
    CHECK(st == IMML_OK, "commit: %s", imml_model_errmsg(m));
    st = imml_optim_step(m);
    CHECK(st == IMML_OK, "optim_step: %s", imml_model_errmsg(m));
  }
  int p = -2, fixed = -1;
  CHECK(imml_predominant_get(m, &p, &fixed) == IMML_OK && fixed == 1 &&
            p >= 0 && p < 2,
        "predominant after warm-up: p %d fixed %d", p, fixed);
  CHECK(imml_fdc_dict_fill(m) == 16, "dictionary fill %d",
        imml_fdc_dict_fill(m));
  CHECK(calls > 0, "host F&T never called");

  size_t size = 0;
  CHECK(imml_model_save_mem(m, NULL, 0, &size) == IMML_OK && size > 0,
        "save_mem size: %s", imml_model_errmsg(m));
  void *buf = malloc(size);
  CHECK(buf && imml_model_save_mem(m, buf, size, &size) == IMML_OK,
        "save_mem: %s", imml_model_errmsg(m));

  imml_load_options lo;
  imml_load_options_init(&lo);
  CHECK(lo.struct_size == sizeof lo, "load options struct_size");
  imml_model *m2 = NULL;
  st = imml_model_load_mem(buf, size, &ft, &lo, &m2);
  CHECK(st == IMML_OK, "load_mem: %s", imml_model_errmsg(m2));

  /* A 1.0 load_options with a memory limit too small: refused, with the
   * message on the failed handle. */
  lo.memory_limit = 1024;
  imml_model *m3 = NULL;
  st = imml_model_load_mem(buf, size, &ft, &lo, &m3);
  CHECK(st == IMML_ERR_TOO_LARGE && m3 &&
            strstr(imml_model_errmsg(m3), "memory_limit"),
        "small memory_limit: %d %s", (int)st, imml_model_errmsg(m3));
  imml_model_free(m3);

  float lg1[B * C], lg2[B * C];
  int cls[B];
  imml_model *share = NULL;
  CHECK(imml_model_share(m2, &share) == IMML_OK, "share: %s",
        imml_model_errmsg(m2));
  CHECK(imml_predict(m, B, x, lg1, NULL, NULL) == IMML_OK, "predict: %s",
        imml_model_errmsg(m));
  CHECK(imml_predict(share, B, x, lg2, NULL, cls) == IMML_OK,
        "predict on share: %s", imml_model_errmsg(share));
  CHECK(memcmp(lg1, lg2, sizeof lg1) == 0,
        "a loaded model predicts differently");
  imml_model_free(share);
  imml_model_free(m2);
  free(buf);

  /* A failed create hands back a handle holding the message. */
  cfg.n_classes = 1;
  imml_model *bad = NULL;
  st = imml_model_create(&cfg, NULL, &bad);
  CHECK(st == IMML_ERR_INVALID_ARG && bad &&
            strstr(imml_model_errmsg(bad), "n_classes"),
        "bad create: %d %s", (int)st, imml_model_errmsg(bad));
  CHECK(imml_forward(bad, IMML_MODE_EVAL, B, x, NULL, NULL, NULL) ==
            IMML_ERR_STATE,
        "a failed handle accepted a forward");
  imml_model_free(bad);
  imml_model_free(m);
  printf("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
  return failures ? 1 : 0;
}
