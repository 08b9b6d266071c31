/* A program built against an imaginary libimml 1.1 whose caller structs
 * each have one more field, run against the library of this tree (older
 * than the program).  The rule (doc/ABI.md, after Linux's
 * copy_struct_from_user): the newer struct is accepted when every byte this
 * library does not know is zero, and refused with IMML_ERR_UNKNOWN_FIELD,
 * naming the byte, otherwise.  Exit status 0 when all checks pass. */
#define IMML_EXPERIMENTAL
#include <imml.h>

#include <stdio.h>
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

/* The 1.1 structs: the 1.0 fields, then one more (written out for the
 * optimiser config, wrapped for the others: the 1.0 structs have no tail
 * padding, so both lay the new field out the same way). */
typedef struct config_1_1 {
  imml_config v10;
  uint64_t added;
} config_1_1;

typedef struct optim_config_1_1 {
  size_t struct_size;
  int kind;
  float lr, weight_decay, momentum;
  int nesterov;
  float beta1, beta2, eps, clip_norm;
  int flags;
  float added;
} optim_config_1_1;

typedef struct ft_ops_1_1 {
  imml_ft_ops v10;
  void *added;
} ft_ops_1_1;

typedef struct load_options_1_1 {
  imml_load_options v10;
  int added;
} load_options_1_1;

typedef struct collective_1_1 {
  imml_collective v10;
  int added;
} collective_1_1;

static int ft_fwd(void *ud, int training, int B, int M, int k,
                  const float *const *slots, int C, float *logits) {
  (void)ud, (void)training, (void)M, (void)k, (void)slots;
  memset(logits, 0, sizeof(float) * (size_t)B * (size_t)C);
  return 0;
}

static int ft_bwd(void *ud, int B, int M, int k, const float *const *slots,
                  const float *dlogits, int C, float *const *dslots) {
  (void)ud, (void)slots, (void)dlogits, (void)C;
  for (int m = 0; m < M; m++)
    memset(dslots[m], 0, sizeof(float) * (size_t)B * (size_t)k);
  return 0;
}

static int gather1(void *ud, const float *send, size_t count, float *recv) {
  (void)ud;
  memcpy(recv, send, count * sizeof(float));
  return 0;
}

/* The call must be refused with IMML_ERR_UNKNOWN_FIELD naming a byte of
 * the new field, which starts at `byte` and is `size` bytes long. */
static void expect_unknown(imml_status st, const char *msg, size_t byte,
                           size_t size, const char *what) {
  CHECK(st == IMML_ERR_UNKNOWN_FIELD, "%s: status %d (%s)", what, (int)st, msg);
  const char *at = strstr(msg, "byte ");
  size_t named = 0;
  CHECK(at && sscanf(at, "byte %zu", &named) == 1 && named >= byte &&
            named < byte + size,
        "%s: message does not name a byte in %zu..%zu: %s", what, byte,
        byte + size - 1, msg);
}

int main(void) {
  int dims[2] = {3, 2};
  config_1_1 c;
  memset(&c, 0, sizeof c);
  imml_config_init(&c.v10);
  c.v10.struct_size = sizeof c;
  c.v10.dims = dims;
  c.v10.n_classes = 2;
  c.v10.hidden_dim = 4;
  c.v10.knowledge_dim = 3;
  c.v10.max_batch = 4;
  c.v10.dict_size = 4;

  /* config: the new field zero is accepted, non-zero refused */
  imml_model *m = NULL;
  imml_status st = imml_model_create(&c.v10, NULL, &m);
  CHECK(st == IMML_OK, "1.1 config with a zero new field: %s",
        imml_model_errmsg(m));
  imml_model_free(m);
  c.added = 7;
  m = NULL;
  st = imml_model_create(&c.v10, NULL, &m);
  CHECK(m != NULL, "no failed handle");
  expect_unknown(st, imml_model_errmsg(m), offsetof(config_1_1, added),
                 sizeof c.added, "config");
  imml_model_free(m);
  c.added = 0;

  /* ft ops */
  ft_ops_1_1 f;
  memset(&f, 0, sizeof f);
  imml_ft_ops_init(&f.v10);
  f.v10.struct_size = sizeof f;
  f.v10.forward = ft_fwd;
  f.v10.backward = ft_bwd;
  st = imml_model_create(&c.v10, &f.v10, &m);
  CHECK(st == IMML_OK, "1.1 ft ops, zero: %s", imml_model_errmsg(m));
  imml_model_free(m);
  f.added = &f;
  st = imml_model_create(&c.v10, &f.v10, &m);
  expect_unknown(st, imml_model_errmsg(m), offsetof(ft_ops_1_1, added),
                 sizeof f.added, "ft_ops");
  imml_model_free(m);

  st = imml_model_create(&c.v10, NULL, &m);
  CHECK(st == IMML_OK, "create: %s", imml_model_errmsg(m));
  if (st != IMML_OK)
    return 1;

  /* optimiser config, with the new field in 1.0's tail padding */
  optim_config_1_1 o;
  memset(&o, 0, sizeof o);
  imml_optim_config_init((imml_optim_config *)&o, IMML_OPTIM_SGD);
  o.struct_size = sizeof o;
  st = imml_optim_setup(m, (const imml_optim_config *)&o);
  CHECK(st == IMML_OK, "1.1 optim config, zero: %s", imml_model_errmsg(m));
  o.added = 1.0f;
  st = imml_optim_setup(m, (const imml_optim_config *)&o);
  expect_unknown(st, imml_model_errmsg(m), offsetof(optim_config_1_1, added),
                 sizeof o.added, "optim_config");

  /* collective (experimental, same rule) */
  collective_1_1 col;
  memset(&col, 0, sizeof col);
  imml_collective_init(&col.v10);
  col.v10.struct_size = sizeof col;
  col.v10.allgather = gather1;
  st = imml_collective_set(m, &col.v10);
  CHECK(st == IMML_OK, "1.1 collective, zero: %s", imml_model_errmsg(m));
  col.added = -1;
  st = imml_collective_set(m, &col.v10);
  expect_unknown(st, imml_model_errmsg(m), offsetof(collective_1_1, added),
                 sizeof col.added, "collective");

  /* load options */
  size_t size = 0;
  static unsigned char buf[1 << 16];
  st = imml_model_save_mem(m, buf, sizeof buf, &size);
  CHECK(st == IMML_OK, "save_mem: %s", imml_model_errmsg(m));
  load_options_1_1 lo;
  memset(&lo, 0, sizeof lo);
  imml_load_options_init(&lo.v10);
  lo.v10.struct_size = sizeof lo;
  imml_model *l = NULL;
  st = imml_model_load_mem(buf, size, NULL, &lo.v10, &l);
  CHECK(st == IMML_OK, "1.1 load options, zero: %s", imml_model_errmsg(l));
  imml_model_free(l);
  lo.added = 3;
  st = imml_model_load_mem(buf, size, NULL, &lo.v10, &l);
  expect_unknown(st, imml_model_errmsg(l), offsetof(load_options_1_1, added),
                 sizeof lo.added, "load_options");
  imml_model_free(l);

  /* A struct_size below 1.0's fields is refused as such. */
  c.v10.struct_size = offsetof(imml_config, memory_limit);
  st = imml_model_create(&c.v10, NULL, &l);
  CHECK(st == IMML_ERR_INVALID_ARG &&
            strstr(imml_model_errmsg(l), "struct_size"),
        "short config: %d %s", (int)st, imml_model_errmsg(l));
  imml_model_free(l);

  imml_model_free(m);
  printf("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
  return failures ? 1 : 0;
}
