/* Checkpoints (lib/checkpoint.c): bit-exact round trips through files and
 * memory, exact resume of training, a loader that refuses every corrupted
 * or crafted input with its own status and a message naming the field (in
 * the failed handle it returns), atomic saves, saves refused while
 * micro-batches are not committed, a predominant modality fixed by the
 * host, the load options' memory_limit and struct_size rules, and
 * concurrent imml_predict on shares of a loaded model.
 *
 * The test reads the format independently of the library: the byte layout
 * of write_model() (little-endian u32/u64/f32 fields, see walk_layout())
 * and CRC-32 IEEE 802.3 computed bit by bit (crc32_ref()). */
#include "check_main.h"
#include "common.h"
#include "internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define DIM0 3
#define DIM1 2
#define HID 4
#define KDIM 2
#define NCLS 2
#define MAXB 8
#define BIG_ALLOC ((size_t)1 << 20) /* no loader allocation may exceed it */

/* ---- deterministic data -------------------------------------------- */

/* One batch in fixed arrays (common.h's batch is on the heap); f[] points
 * into the struct, so it is filled in place. */
typedef struct fixed_batch {
  float x0[MAXB * DIM0];
  float x1[MAXB * DIM1];
  int y[MAXB];
  const float *f[2];
} fixed_batch;

/* Modality 0 carries the label, modality 1 is noise. */
static void make_batch(fixed_batch *b, uint64_t seed, int B) {
  uint64_t s = seed * 7919u + 1u;
  for (int i = 0; i < B; i++) {
    b->y[i] = (int)(splitmix64(&s) % NCLS);
    for (int j = 0; j < DIM0; j++)
      b->x0[i * DIM0 + j] =
          splitmix_unif(&s) + (j == 0 ? (b->y[i] ? 0.8f : -0.8f) : 0.0f);
    for (int j = 0; j < DIM1; j++)
      b->x1[i * DIM1 + j] = splitmix_unif(&s);
  }
  b->f[0] = b->x0;
  b->f[1] = b->x1;
}

/* ---- a host F&T: fixed linear map of the slots ---------------------- */

static const float host_w[2][KDIM][NCLS] = {{{0.7f, -0.4f}, {0.2f, 0.5f}},
                                            {{-0.3f, 0.6f}, {0.9f, -0.1f}}};

static int host_forward(void *ud, int training, int B, int M, int k,
                        const float *const *slots, int C, float *logits) {
  (void)ud;
  (void)training;
  if (M != 2 || k != KDIM || C != NCLS)
    return 1;
  for (int i = 0; i < B; i++)
    for (int c = 0; c < C; c++) {
      float acc = 0.0f;
      for (int mm = 0; mm < M; mm++)
        for (int j = 0; j < k; j++)
          acc += slots[mm][i * k + j] * host_w[mm][j][c];
      logits[i * C + c] = acc;
    }
  return 0;
}

static int host_backward(void *ud, int B, int M, int k,
                         const float *const *slots, const float *dlogits, int C,
                         float *const *dslots) {
  (void)ud;
  (void)slots;
  for (int mm = 0; mm < M; mm++)
    for (int i = 0; i < B; i++)
      for (int j = 0; j < k; j++) {
        float acc = 0.0f;
        for (int c = 0; c < C; c++)
          acc += dlogits[i * C + c] * host_w[mm][j][c];
        dslots[mm][i * k + j] = acc;
      }
  return 0;
}

static imml_ft_ops host_ops(void) {
  imml_ft_ops ops;
  imml_ft_ops_init(&ops);
  ops.forward = host_forward;
  ops.backward = host_backward;
  return ops;
}

/* ---- a counting allocator ------------------------------------------- */

typedef struct counter {
  size_t limit;   /* requests above it are refused (NULL) */
  size_t max_req; /* largest request seen */
  long n_alloc, live;
  size_t expected; /* a request size not counted in n_other */
  long n_other;    /* requests neither for a handle nor `expected` bytes */
} counter;

static void *cnt_malloc(size_t size, void *ud) {
  counter *c = ud;
  if (size > c->max_req)
    c->max_req = size;
  if (size != sizeof(struct imml_model) && size != c->expected)
    c->n_other++;
  if (size > c->limit)
    return NULL;
  void *p = malloc(size);
  if (p) {
    c->n_alloc++;
    c->live++;
  }
  return p;
}

static void cnt_free(void *p, void *ud) {
  counter *c = ud;
  c->live--;
  free(p);
}

static void counting_options(imml_load_options *o, counter *c) {
  memset(c, 0, sizeof *c);
  c->limit = BIG_ALLOC;
  imml_load_options_init(o);
  o->allocator.malloc_fn = cnt_malloc;
  o->allocator.free_fn = cnt_free;
  o->allocator.user_data = c;
}

/* A failed load's handle: it exists (the tests here never run out of
 * memory for it), holds a message, which is copied into err, holds nothing
 * but that (at most one block of the counting allocator, of at most the
 * size of a handle, when c is given) and is freed, after which nothing of
 * c's is left.  Every other call on it is refused. */
static void failed_handle(imml_model *h, imml_status st, const counter *c,
                          char *err, size_t n, const char *label) {
  ck_assert_msg(h != NULL, "%s: status %d (%s) without a failed handle", label,
                (int)st, imml_status_string(st));
  const char *msg = imml_model_errmsg(h);
  ck_assert_msg(msg[0] != '\0', "%s: no message for status %d (%s)", label,
                (int)st, imml_status_string(st));
  if (err && n)
    snprintf(err, n, "%s", msg);
  if (c)
    ck_assert_msg(c->live <= 1, "%s: the failed handle holds %ld blocks", label,
                  c->live);
  ck_assert_int_eq(imml_param_count(h), 0);
  size_t need = 0;
  ck_assert_int_eq(imml_model_save_mem(h, NULL, 0, &need), IMML_ERR_STATE);
  imml_model_free(h);
  if (c)
    ck_assert_msg(c->live == 0,
                  "%s: %ld blocks left after freeing the failed "
                  "handle",
                  label, c->live);
}

/* ---- models ---------------------------------------------------------- */

#define OPT_NONE (-1)

typedef struct spec {
  int B; /* max_batch = training batch */
  int J; /* dict_size */
  int predominant;
  int warmup;
  int opt; /* OPT_NONE, IMML_OPTIM_SGD (momentum/Nesterov), IMML_OPTIM_ADAMW */
  int host_ft;
  int strict;
  int lr_change_at; /* training step before which imml_optim_set_lr runs */
  int plain_sgd;    /* SGD without momentum */
  uint64_t seed;
} spec;

static imml_model *make_model(const spec *sp) {
  static const int dims[2] = {DIM0, DIM1};
  imml_config cfg;
  imml_config_init(&cfg);
  cfg.n_modalities = 2;
  cfg.dims = dims;
  cfg.hidden_dim = HID;
  cfg.knowledge_dim = KDIM;
  cfg.n_classes = NCLS;
  cfg.max_batch = sp->B;
  cfg.dict_size = sp->J;
  cfg.predominant = sp->predominant;
  cfg.warmup_steps = sp->warmup;
  cfg.slot_mode = sp->strict ? IMML_SLOT_STRICT : IMML_SLOT_CONDITIONAL;
  cfg.seed = sp->seed;
  imml_ft_ops ops = host_ops();
  imml_model *m = create_ok(&cfg, sp->host_ft ? &ops : NULL);
  if (sp->opt != OPT_NONE) {
    imml_optim_config oc;
    imml_optim_config_init(&oc, (imml_optim_kind)sp->opt);
    if (sp->opt == IMML_OPTIM_ADAMW) {
      oc.lr = 0.01f;
      oc.weight_decay = 0.01f;
      oc.clip_norm = 1.0f;
    } else if (!sp->plain_sgd) {
      oc.lr = 0.05f;
      oc.momentum = 0.9f;
      oc.nesterov = 1;
      oc.weight_decay = 1e-3f;
    } else {
      oc.lr = 0.05f;
    }
    ck_assert_msg(imml_optim_setup(m, &oc) == IMML_OK, "setup: %s",
                  imml_model_errmsg(m));
  }
  return m;
}

/* Training steps from..to-1 on batches that depend only on the step. */
static void train(imml_model *m, const spec *sp, int from, int to) {
  fixed_batch b;
  for (int s = from; s < to; s++) {
    if (sp->lr_change_at > 0 && s == sp->lr_change_at)
      ck_assert_int_eq(imml_optim_set_lr(m, 0.004f), IMML_OK);
    make_batch(&b, (uint64_t)s, sp->B);
    imml_status st =
        imml_forward(m, IMML_MODE_TRAIN, sp->B, b.f, b.y, NULL, NULL);
    ck_assert_msg(st == IMML_OK, "forward step %d: %s", s,
                  imml_model_errmsg(m));
    st = imml_backward(m, NULL);
    ck_assert_msg(st == IMML_OK, "backward step %d: %s", s,
                  imml_model_errmsg(m));
    st = imml_commit(m);
    ck_assert_msg(st == IMML_OK, "commit step %d: %s", s, imml_model_errmsg(m));
    if (sp->opt != OPT_NONE) {
      st = imml_optim_step(m);
      ck_assert_msg(st == IMML_OK, "step %d: %s", s, imml_model_errmsg(m));
    }
  }
}

static void eval_logits(imml_model *m, int B, float *out) {
  fixed_batch b;
  make_batch(&b, 99991, B);
  const imml_status st =
      imml_forward(m, IMML_MODE_EVAL, B, b.f, NULL, out, NULL);
  ck_assert_msg(st == IMML_OK, "eval forward: %s", imml_model_errmsg(m));
}

static int same_bits(const void *a, const void *b, size_t n) {
  return n == 0 || memcmp(a, b, n) == 0;
}

/* Everything a checkpoint holds, compared bit for bit, and the EVAL logits. */
static void assert_models_equal(imml_model *a, imml_model *b,
                                const char *label) {
  imml_config ca, cb;
  imml_config_init(&ca);
  imml_config_init(&cb);
  ck_assert_int_eq(imml_model_get_config(a, &ca), IMML_OK);
  ck_assert_int_eq(imml_model_get_config(b, &cb), IMML_OK);
  ck_assert_msg(
      ca.n_modalities == cb.n_modalities &&
          same_bits(ca.dims, cb.dims, (size_t)ca.n_modalities * sizeof(int)) &&
          ca.hidden_dim == cb.hidden_dim &&
          ca.knowledge_dim == cb.knowledge_dim &&
          ca.n_classes == cb.n_classes && ca.max_batch == cb.max_batch &&
          ca.dict_size == cb.dict_size && same_f(ca.beta, cb.beta) &&
          same_f(ca.gamma1, cb.gamma1) && same_f(ca.gamma2, cb.gamma2) &&
          same_f(ca.tau, cb.tau) && ca.predominant == cb.predominant &&
          ca.warmup_steps == cb.warmup_steps && ca.slot_mode == cb.slot_mode &&
          ca.seed == cb.seed,
      "%s: configurations differ", label);
  ck_assert_msg(a->builtin_ft == b->builtin_ft, "%s: F&T kind differs", label);
  /* parameters */
  float *pa, *pb;
  size_t na, nb;
  ck_assert_int_eq(imml_param_flat(a, &pa, NULL, &na), IMML_OK);
  ck_assert_int_eq(imml_param_flat(b, &pb, NULL, &nb), IMML_OK);
  ck_assert_msg(na == nb, "%s: parameter counts differ", label);
  ck_assert_msg(same_bits(pa, pb, na * sizeof(float)), "%s: parameters differ",
                label);
  ck_assert_int_eq(imml_param_count(a), imml_param_count(b));
  for (int i = 0; i < imml_param_count(a); i++) {
    imml_param_view va, vb;
    ck_assert_int_eq(imml_param_get(a, i, &va), IMML_OK);
    ck_assert_int_eq(imml_param_get(b, i, &vb), IMML_OK);
    ck_assert_str_eq(va.name, vb.name);
    ck_assert(va.rows == vb.rows && va.cols == vb.cols);
  }
  /* dictionary */
  const size_t Mk = (size_t)ca.n_modalities * (size_t)ca.knowledge_dim;
  ck_assert_msg(imml_fdc_dict_fill(a) == imml_fdc_dict_fill(b) &&
                    a->dict_fill == b->dict_fill && a->dict_pos == b->dict_pos,
                "%s: dictionary fill/pos %d/%d vs %d/%d", label, a->dict_fill,
                a->dict_pos, b->dict_fill, b->dict_pos);
  ck_assert_msg(
      same_bits(a->dict, b->dict, (size_t)a->dict_fill * Mk * sizeof(float)),
      "%s: dictionary entries differ", label);
  /* predominant state */
  int p1, p2, f1, f2, s1, s2;
  float e1[2], e2[2];
  ck_assert_int_eq(imml_predominant_get(a, &p1, &f1), IMML_OK);
  ck_assert_int_eq(imml_predominant_get(b, &p2, &f2), IMML_OK);
  ck_assert_int_eq(imml_warmup_get(a, &s1, e1), IMML_OK);
  ck_assert_int_eq(imml_warmup_get(b, &s2, e2), IMML_OK);
  ck_assert_msg(p1 == p2 && f1 == f2 && s1 == s2 &&
                    same_bits(e1, e2, sizeof e1),
                "%s: predominant state (p %d/%d fixed %d/%d steps %d/%d) "
                "differs",
                label, p1, p2, f1, f2, s1, s2);
  /* optimiser */
  const imml_optim *oa = &a->opt, *ob = &b->opt;
  ck_assert_msg(oa->active == ob->active, "%s: optimiser presence differs",
                label);
  if (oa->active) {
    ck_assert_msg(same_optim_config(&oa->cfg, &ob->cfg),
                  "%s: optimiser configuration differs", label);
    ck_assert_msg(oa->t == ob->t && oa->has_buf == ob->has_buf,
                  "%s: optimiser step %lld/%lld has_buf %d/%d", label,
                  (long long)oa->t, (long long)ob->t, oa->has_buf, ob->has_buf);
    ck_assert_msg(same_bits(oa->m1, ob->m1, na * sizeof(float)) &&
                      same_bits(oa->m2, ob->m2, na * sizeof(float)),
                  "%s: optimiser moments differ", label);
  }
  /* predictions */
  float la[MAXB * NCLS], lb[MAXB * NCLS];
  eval_logits(a, ca.max_batch, la);
  eval_logits(b, ca.max_batch, lb);
  ck_assert_msg(same_bits(la, lb, (size_t)ca.max_batch * NCLS * sizeof(float)),
                "%s: EVAL logits differ", label);
}

/* ---- format helpers --------------------------------------------------- */

static uint32_t crc32_ref(const unsigned char *p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; i++) {
    c ^= p[i];
    for (int b = 0; b < 8; b++)
      c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
  }
  return ~c;
}

static uint32_t rd32(const unsigned char *b, size_t off) {
  return (uint32_t)b[off] | (uint32_t)b[off + 1] << 8 |
         (uint32_t)b[off + 2] << 16 | (uint32_t)b[off + 3] << 24;
}

static uint64_t rd64(const unsigned char *b, size_t off) {
  return (uint64_t)rd32(b, off) | (uint64_t)rd32(b, off + 4) << 32;
}

static void wr32(unsigned char *b, size_t off, uint32_t v) {
  b[off] = (unsigned char)v;
  b[off + 1] = (unsigned char)(v >> 8);
  b[off + 2] = (unsigned char)(v >> 16);
  b[off + 3] = (unsigned char)(v >> 24);
}

static void wr64(unsigned char *b, size_t off, uint64_t v) {
  wr32(b, off, (uint32_t)v);
  wr32(b, off + 4, (uint32_t)(v >> 32));
}

static void wrf(unsigned char *b, size_t off, float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  wr32(b, off, u);
}

static void fix_crc(unsigned char *b, size_t size) {
  wr32(b, size - 4, crc32_ref(b, size - 4));
}

/* Offsets of every field, from write_model()'s layout. */
typedef struct layout {
  size_t n_mod, dims, hidden, knowledge, classes, max_batch, dict_size, beta,
      gamma1, gamma2, tau, predominant, warmup, slot_mode, seed, builtin;
  size_t p_fixed, p, steps, ema;
  size_t n_tensors_at;
  int n_tensors;
  size_t t_len[IMML_MAX_TENSORS], t_rows[IMML_MAX_TENSORS],
      t_data[IMML_MAX_TENSORS];
  size_t n_params;
  size_t dict_fill, dict_pos, dict_data;
  size_t opt_flag, opt_kind, opt_lr, opt_wd, opt_mom, opt_nesterov, opt_b1,
      opt_b2, opt_eps, opt_clip, opt_t, opt_has_buf, opt_m1, opt_m2;
  int has_opt;
  size_t crc;
} layout;

static void walk_layout(const unsigned char *b, size_t size, layout *L) {
  memset(L, 0, sizeof *L);
  ck_assert_uint_ge(size, 28);
  ck_assert(memcmp(b, "IMMLCKPT", 8) == 0);
  ck_assert_uint_eq(rd32(b, 8), 1);
  ck_assert_uint_eq(rd32(b, 12), 0);
  ck_assert_uint_eq(rd64(b, 16), size - 28);
  size_t o = 24;
  L->n_mod = o;
  const uint32_t M = rd32(b, o);
  ck_assert_uint_eq(M, 2);
  o += 4;
  L->dims = o;
  o += 4 * M;
  L->hidden = o, o += 4;
  L->knowledge = o, o += 4;
  const uint32_t k = rd32(b, L->knowledge);
  L->classes = o, o += 4;
  L->max_batch = o, o += 4;
  L->dict_size = o, o += 4;
  L->beta = o, o += 4;
  L->gamma1 = o, o += 4;
  L->gamma2 = o, o += 4;
  L->tau = o, o += 4;
  L->predominant = o, o += 4;
  L->warmup = o, o += 4;
  L->slot_mode = o, o += 4;
  L->seed = o, o += 8;
  L->builtin = o, o += 4;
  L->p_fixed = o, o += 4;
  L->p = o, o += 4;
  L->steps = o, o += 4;
  L->ema = o, o += 4 * M;
  L->n_tensors_at = o;
  L->n_tensors = (int)rd32(b, o);
  ck_assert_int_le(L->n_tensors, IMML_MAX_TENSORS);
  o += 4;
  for (int i = 0; i < L->n_tensors; i++) {
    ck_assert_uint_le(o + 4, size);
    L->t_len[i] = o;
    const uint32_t len = rd32(b, o);
    ck_assert_uint_lt(len, IMML_NAME_SIZE);
    o += 4 + len;
    L->t_rows[i] = o;
    const size_t cnt = (size_t)rd32(b, o) * rd32(b, o + 4);
    o += 8;
    L->t_data[i] = o;
    o += 4 * cnt;
    L->n_params += cnt;
  }
  L->dict_fill = o, o += 4;
  L->dict_pos = o, o += 4;
  L->dict_data = o;
  o += 4 * (size_t)rd32(b, L->dict_fill) * M * k;
  L->opt_flag = o, o += 4;
  L->has_opt = (int)rd32(b, L->opt_flag);
  if (L->has_opt) {
    L->opt_kind = o, o += 4;
    L->opt_lr = o, o += 4;
    L->opt_wd = o, o += 4;
    L->opt_mom = o, o += 4;
    L->opt_nesterov = o, o += 4;
    L->opt_b1 = o, o += 4;
    L->opt_b2 = o, o += 4;
    L->opt_eps = o, o += 4;
    L->opt_clip = o, o += 4;
    L->opt_t = o, o += 8;
    L->opt_has_buf = o, o += 4;
    L->opt_m1 = o, o += 4 * L->n_params;
    L->opt_m2 = o, o += 4 * L->n_params;
  }
  L->crc = o;
  ck_assert_uint_eq(o + 4, size);
  ck_assert_uint_eq(rd32(b, o), crc32_ref(b, o));
}

/* A heap copy of the model's checkpoint, with `extra` spare bytes. */
static unsigned char *save_to_mem(imml_model *m, size_t *size, size_t extra) {
  size_t need = 0;
  ck_assert_int_eq(imml_model_save_mem(m, NULL, 0, &need), IMML_OK);
  ck_assert_uint_gt(need, 28);
  unsigned char *buf = malloc(need + extra);
  ck_assert_ptr_nonnull(buf);
  size_t got = 0;
  const imml_status st = imml_model_save_mem(m, buf, need, &got);
  ck_assert_msg(st == IMML_OK, "save_mem: %s", imml_model_errmsg(m));
  ck_assert_uint_eq(got, need);
  *size = need;
  return buf;
}

static imml_model *load_from_mem(const unsigned char *buf, size_t size,
                                 const imml_ft_ops *ft) {
  imml_model *m = NULL;
  const imml_status st = imml_model_load_mem(buf, size, ft, NULL, &m);
  ck_assert_msg(st == IMML_OK, "load_mem: %s (%s)", imml_status_string(st),
                imml_model_errmsg(m));
  ck_assert_ptr_nonnull(m);
  ck_assert_str_eq(imml_model_errmsg(m), "");
  return m;
}

/* A file load that must succeed. */
static imml_model *load_file_ok(const char *path, const imml_ft_ops *ft,
                                const imml_load_options *o) {
  imml_model *m = NULL;
  const imml_status st = imml_model_load(path, ft, o, &m);
  ck_assert_msg(st == IMML_OK, "load %s: %s (%s)", path, imml_status_string(st),
                imml_model_errmsg(m));
  ck_assert_ptr_nonnull(m);
  ck_assert_str_eq(imml_model_errmsg(m), "");
  return m;
}

/* A file load that must fail with `want`; the failed handle's message is
 * copied into err (when given). */
static void load_file_fails(const char *path, const imml_ft_ops *ft,
                            const imml_load_options *o, imml_status want,
                            char *err, size_t n) {
  imml_model *m = NULL;
  const imml_status st = imml_model_load(path, ft, o, &m);
  ck_assert_msg(st == want, "load %s: status %d (%s), expected %d: '%s'", path,
                (int)st, imml_status_string(st), (int)want,
                imml_model_errmsg(m));
  failed_handle(m, st, NULL, err, n, path);
}

/* ---- directory listings (temporary directories: common.h) ---------- */

/* Names in dir (not . and ..), sorted into one "a,b," string. */
static int list_dir(const char *dir, char *out, size_t n) {
  DIR *d = opendir(dir);
  ck_assert_ptr_nonnull(d);
  char names[16][256];
  int count = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
      continue;
    if (count < 16)
      snprintf(names[count], sizeof names[count], "%s", e->d_name);
    count++;
  }
  closedir(d);
  ck_assert_int_le(count, 16);
  for (int i = 1; i < count; i++)
    for (int j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
      char t[256];
      memcpy(t, names[j], sizeof t);
      memcpy(names[j], names[j - 1], sizeof t);
      memcpy(names[j - 1], t, sizeof t);
    }
  out[0] = '\0';
  for (int i = 0; i < count; i++) {
    strncat(out, names[i], n - strlen(out) - 1);
    strncat(out, ",", n - strlen(out) - 1);
  }
  return count;
}

/* ---- self-test of the test's own reader ----------------------------- */

START_TEST(test_reference_crc) {
  ck_assert_uint_eq(crc32_ref((const unsigned char *)"123456789", 9),
                    0xCBF43926u);
  ck_assert_uint_eq(crc32_ref((const unsigned char *)"", 0), 0);
}
END_TEST

/* ---- round trips ------------------------------------------------------ */

typedef struct rt_case {
  spec sp;
  int steps;
} rt_case;

static const rt_case rt_cases[] = {
    /* AdamW, warm-up done, dictionary wrapped */
    {{4, 3, -1, 2, IMML_OPTIM_ADAMW, 0, 0, 0, 0, 1}, 3},
    /* AdamW, warm-up in flight, dictionary partly filled (6 of 8) */
    {{3, 8, -1, 5, IMML_OPTIM_ADAMW, 0, 0, 0, 0, 2}, 2},
    /* SGD Nesterov, predominant fixed by the config */
    {{4, 3, 1, 100, IMML_OPTIM_SGD, 0, 0, 0, 0, 3}, 4},
    /* no optimiser, never trained: empty dictionary */
    {{4, 3, -1, 3, OPT_NONE, 0, 0, 0, 0, 4}, 0},
    /* host F&T */
    {{4, 3, -1, 1, IMML_OPTIM_ADAMW, 1, 0, 0, 0, 5}, 3},
    /* warmup 0 (fixed at creation), plain SGD (no buffer), strict slots */
    {{3, 8, -1, 0, IMML_OPTIM_SGD, 0, 1, 0, 1, 6}, 3},
    /* no optimiser but trained (gradients accumulated, not saved) */
    {{2, 5, -1, 1, OPT_NONE, 0, 0, 0, 0, 7}, 2},
};
#define N_RT (int)(sizeof rt_cases / sizeof rt_cases[0])

START_TEST(test_roundtrip_mem) {
  const rt_case *rc = &rt_cases[_i];
  imml_model *m = make_model(&rc->sp);
  train(m, &rc->sp, 0, rc->steps);
  imml_ft_ops ops = host_ops();
  const imml_ft_ops *ft = rc->sp.host_ft ? &ops : NULL;

  size_t need = 0;
  ck_assert_int_eq(imml_model_save_mem(m, NULL, 12345, &need), IMML_OK);
  ck_assert_str_eq(imml_model_errmsg(m), "");
  unsigned char *buf = malloc(need + 64);
  ck_assert_ptr_nonnull(buf);
  /* too small: refused, nothing written */
  memset(buf, 0xA5, need + 64);
  size_t got = 0;
  ck_assert_int_eq(imml_model_save_mem(m, buf, need - 1, &got),
                   IMML_ERR_BUFFER_SMALL);
  ck_assert_str_ne(imml_model_errmsg(m), "");
  ck_assert_int_eq(imml_model_save_mem(m, buf, 0, &got), IMML_ERR_BUFFER_SMALL);
  for (size_t i = 0; i < need + 64; i++)
    ck_assert_msg(buf[i] == 0xA5, "byte %zu written by a refused save", i);
  ck_assert_int_eq(imml_model_save_mem(m, buf, need, NULL), IMML_ERR_NULL);
  /* larger than needed: writes exactly need bytes */
  ck_assert_int_eq(imml_model_save_mem(m, buf, need + 64, &got), IMML_OK);
  ck_assert_uint_eq(got, need);
  for (size_t i = need; i < need + 64; i++)
    ck_assert(buf[i] == 0xA5);
  layout L;
  walk_layout(buf, need, &L);
  ck_assert_int_eq(L.has_opt, rc->sp.opt != OPT_NONE);
  ck_assert_uint_eq(rd32(buf, L.builtin), rc->sp.host_ft ? 0u : 1u);

  imml_model *r = load_from_mem(buf, need, ft);
  assert_models_equal(m, r, "memory round trip");
  /* a loaded model starts with zero gradients */
  float *g;
  size_t n;
  ck_assert_int_eq(imml_param_flat(r, NULL, &g, &n), IMML_OK);
  for (size_t i = 0; i < n; i++)
    ck_assert(g[i] == 0.0f);
  /* saving the loaded model reproduces the bytes */
  size_t size2;
  unsigned char *buf2 = save_to_mem(r, &size2, 0);
  ck_assert_uint_eq(size2, need);
  ck_assert_msg(memcmp(buf, buf2, need) == 0, "re-saved bytes differ");
  /* a loaded model keeps training exactly like the original */
  if (rc->sp.opt != OPT_NONE) {
    train(m, &rc->sp, rc->steps, rc->steps + 2);
    train(r, &rc->sp, rc->steps, rc->steps + 2);
    assert_models_equal(m, r, "trained after memory round trip");
  }
  free(buf2);
  free(buf);
  imml_model_free(r);
  imml_model_free(m);
}
END_TEST

START_TEST(test_roundtrip_file) {
  const rt_case *rc = &rt_cases[_i];
  imml_model *m = make_model(&rc->sp);
  train(m, &rc->sp, 0, rc->steps);
  imml_ft_ops ops = host_ops();
  const imml_ft_ops *ft = rc->sp.host_ft ? &ops : NULL;
  char dir[512], path[600], names[1024];
  make_tmpdir(dir, sizeof dir, "imml-ckpt-");
  snprintf(path, sizeof path, "%s/model.imml", dir);
  const imml_status st = imml_model_save(m, path);
  ck_assert_msg(st == IMML_OK, "save: %s", imml_model_errmsg(m));
  ck_assert_str_eq(imml_model_errmsg(m), "");
  ck_assert_int_eq(list_dir(dir, names, sizeof names), 1);
  ck_assert_str_eq(names, "model.imml,");
  /* the file holds exactly the bytes imml_save_mem produces */
  size_t fsize, msize;
  unsigned char *fbytes = read_file(path, &fsize);
  unsigned char *mbytes = save_to_mem(m, &msize, 0);
  ck_assert_uint_eq(fsize, msize);
  ck_assert(memcmp(fbytes, mbytes, msize) == 0);

  imml_model *r = load_file_ok(path, ft, NULL);
  assert_models_equal(m, r, "file round trip");
  imml_model_free(r);

  /* with options, every allocation via the caller's hooks */
  counter cnt;
  imml_load_options o;
  counting_options(&o, &cnt);
  r = load_file_ok(path, ft, &o);
  ck_assert_int_gt(cnt.n_alloc, 0);
  assert_models_equal(m, r, "file round trip (options)");
  imml_model_free(r);
  ck_assert_int_eq(cnt.live, 0);

  free(fbytes);
  free(mbytes);
  imml_model_free(m);
  remove_tree(dir);
}
END_TEST

/* ---- exact resume ------------------------------------------------------ */

typedef struct resume_case {
  spec sp;
  int n_before, n_after;
  int warm_in_flight; /* 1: warm-up not finished at save; 0: finished */
  int via_file;
} resume_case;

static const resume_case resume_cases[] = {
    /* AdamW, warm-up (5 steps) in flight at save, finishes after load */
    {{4, 3, -1, 5, IMML_OPTIM_ADAMW, 0, 0, 0, 0, 11}, 3, 4, 1, 0},
    /* AdamW, warm-up done; lr changed before the save */
    {{4, 3, -1, 2, IMML_OPTIM_ADAMW, 0, 0, 1, 0, 12}, 4, 3, 0, 1},
    /* SGD momentum + Nesterov, in flight, dictionary partly filled */
    {{2, 5, -1, 3, IMML_OPTIM_SGD, 0, 0, 0, 0, 13}, 2, 4, 1, 0},
    /* SGD momentum, predominant fixed by the config */
    {{4, 3, 1, 10, IMML_OPTIM_SGD, 0, 0, 0, 0, 14}, 3, 3, 0, 1},
    /* AdamW with host F&T, in flight */
    {{4, 3, -1, 2, IMML_OPTIM_ADAMW, 1, 0, 0, 0, 15}, 1, 4, 1, 0},
    /* plain SGD, strict slots, lr changed after the resume */
    {{3, 4, -1, 1, IMML_OPTIM_SGD, 0, 1, 4, 1, 16}, 2, 4, 0, 0},
};
#define N_RESUME (int)(sizeof resume_cases / sizeof resume_cases[0])

START_TEST(test_exact_resume) {
  const resume_case *rc = &resume_cases[_i];
  const spec *sp = &rc->sp;
  imml_ft_ops ops = host_ops();
  const imml_ft_ops *ft = sp->host_ft ? &ops : NULL;
  /* uninterrupted run */
  imml_model *ref = make_model(sp);
  train(ref, sp, 0, rc->n_before + rc->n_after);
  /* interrupted run */
  imml_model *m = make_model(sp);
  train(m, sp, 0, rc->n_before);
  int p, fixed;
  ck_assert_int_eq(imml_predominant_get(m, &p, &fixed), IMML_OK);
  if (rc->warm_in_flight) {
    int steps;
    ck_assert_int_eq(imml_warmup_get(m, &steps, NULL), IMML_OK);
    ck_assert_msg(!fixed && steps == rc->n_before,
                  "warm-up should be in flight at save");
  } else {
    ck_assert_msg(fixed, "warm-up should be finished at save");
  }
  imml_model *r = NULL;
  char dir[512] = "";
  if (rc->via_file) {
    char path[600];
    make_tmpdir(dir, sizeof dir, "imml-ckpt-");
    snprintf(path, sizeof path, "%s/resume.imml", dir);
    ck_assert_int_eq(imml_model_save(m, path), IMML_OK);
    imml_model_free(m);
    r = load_file_ok(path, ft, NULL);
  } else {
    size_t size;
    unsigned char *buf = save_to_mem(m, &size, 0);
    imml_model_free(m);
    r = load_from_mem(buf, size, ft);
    free(buf);
  }
  train(r, sp, rc->n_before, rc->n_before + rc->n_after);
  float *pa, *pb;
  size_t na, nb;
  ck_assert_int_eq(imml_param_flat(ref, &pa, NULL, &na), IMML_OK);
  ck_assert_int_eq(imml_param_flat(r, &pb, NULL, &nb), IMML_OK);
  ck_assert_uint_eq(na, nb);
  ck_assert_msg(memcmp(pa, pb, na * sizeof(float)) == 0,
                "resumed parameters differ from the uninterrupted run");
  assert_models_equal(ref, r, "resume");
  ck_assert_int_eq(imml_predominant_get(r, &p, &fixed), IMML_OK);
  if (rc->warm_in_flight && sp->warmup <= rc->n_before + rc->n_after)
    ck_assert_msg(fixed, "warm-up should have finished after the resume");
  imml_model_free(r);
  imml_model_free(ref);
  if (dir[0])
    remove_tree(dir);
}
END_TEST

/* ---- corruption --------------------------------------------------------- */

/* The small model of the corruption tests: M = 2, dims {3, 2}, H = 4, k = 2,
 * C = 2, J = 3, B = 2, AdamW, warm-up finished, dictionary full. */
static const spec small_spec = {2, 3, -1, 2, IMML_OPTIM_ADAMW, 0, 0, 0, 0, 21};

static unsigned char *small_checkpoint(size_t *size, size_t extra,
                                       imml_model **keep) {
  imml_model *m = make_model(&small_spec);
  train(m, &small_spec, 0, 3);
  unsigned char *buf = save_to_mem(m, size, extra);
  if (keep)
    *keep = m;
  else
    imml_model_free(m);
  return buf;
}

/* Loads through the counting allocator and checks the failure contract:
 * status, a failed handle holding only the message (copied into err),
 * nothing left allocated once it is freed, no huge allocation.  Returns
 * the status. */
static imml_status load_refused(const unsigned char *buf, size_t size,
                                const imml_ft_ops *ft, char *err, size_t n,
                                const char *label) {
  counter cnt;
  imml_load_options o;
  counting_options(&o, &cnt);
  imml_model *m = (imml_model *)&cnt; /* must be overwritten */
  const imml_status st = imml_model_load_mem(buf, size, ft, &o, &m);
  ck_assert_msg(st != IMML_OK, "%s: a corrupted checkpoint was loaded", label);
  ck_assert_msg(m != (imml_model *)&cnt, "%s: *out not written", label);
  failed_handle(m, st, &cnt, err, n, label);
  ck_assert_msg(cnt.max_req <= BIG_ALLOC,
                "%s: allocation of %zu bytes before the refusal", label,
                cnt.max_req);
  return st;
}

/* The status a single corrupted byte at `pos` must produce. */
static int expected_for_position(size_t pos, size_t size, imml_status st) {
  if (pos < 8)
    return st == IMML_ERR_BAD_MAGIC;
  if (pos < 12)
    return st == IMML_ERR_BAD_VERSION;
  if (pos < 16)
    return st == IMML_ERR_FORMAT; /* reserved */
  if (pos < 24) /* payload size: larger -> truncated, smaller -> trailing */
    return st == IMML_ERR_TRUNCATED || st == IMML_ERR_FORMAT;
  (void)size;
  return st == IMML_ERR_CHECKSUM;
}

START_TEST(test_every_byte_flip_rejected) {
  static const unsigned char masks[] = {0xFF, 0x01, 0x80};
  const unsigned char mask = masks[_i];
  imml_model *orig = NULL;
  size_t size;
  unsigned char *buf = small_checkpoint(&size, 0, &orig);
  unsigned char *copy = malloc(size);
  ck_assert_ptr_nonnull(copy);
  char err[256], label[64];
  for (size_t pos = 0; pos < size; pos++) {
    memcpy(copy, buf, size);
    copy[pos] ^= mask;
    snprintf(label, sizeof label, "byte %zu ^ 0x%02x", pos, mask);
    counter cnt;
    imml_load_options o;
    counting_options(&o, &cnt);
    imml_model *m = NULL;
    const imml_status st = imml_model_load_mem(copy, size, NULL, &o, &m);
    if (st == IMML_OK) {
      /* Only acceptable if nothing observable changed; the CRC covers
       * every byte, so this must not happen at all. */
      assert_models_equal(orig, m, label);
      imml_model_free(m);
      ck_abort_msg("%s: loaded despite the CRC", label);
    }
    failed_handle(m, st, &cnt, err, sizeof err, label);
    ck_assert_msg(cnt.max_req <= BIG_ALLOC,
                  "%s: failure contract (max request %zu)", label, cnt.max_req);
    ck_assert_msg(expected_for_position(pos, size, st),
                  "%s: status %d (%s), message '%s'", label, (int)st,
                  imml_status_string(st), err);
  }
  free(copy);
  free(buf);
  imml_model_free(orig);
}
END_TEST

START_TEST(test_every_truncation_rejected) {
  size_t size;
  unsigned char *buf = small_checkpoint(&size, 0, NULL);
  char err[256], label[64];
  for (size_t len = 0; len < size; len++) {
    /* a fresh exact-size copy so ASan sees any read past the end */
    unsigned char *t = malloc(len ? len : 1);
    ck_assert_ptr_nonnull(t);
    memcpy(t, buf, len);
    snprintf(label, sizeof label, "truncated to %zu", len);
    const imml_status st = load_refused(t, len, NULL, err, sizeof err, label);
    ck_assert_msg(st == IMML_ERR_TRUNCATED, "%s: status %d (%s) '%s'", label,
                  (int)st, imml_status_string(st), err);
    free(t);
  }
  free(buf);
}
END_TEST

START_TEST(test_malformed_header) {
  size_t size;
  unsigned char *buf = small_checkpoint(&size, 256, NULL);
  unsigned char *c = malloc(size + 256);
  ck_assert_ptr_nonnull(c);
  char err[256];
  imml_status st;

  /* wrong magic, anywhere in the 8 bytes, CRC fixed or not */
  for (size_t i = 0; i < 8; i++) {
    memcpy(c, buf, size);
    c[i] = (unsigned char)'x';
    st = load_refused(c, size, NULL, err, sizeof err, "magic");
    ck_assert_int_eq(st, IMML_ERR_BAD_MAGIC);
    ck_assert_ptr_nonnull(strstr(err, "magic"));
    fix_crc(c, size);
    ck_assert_int_eq(load_refused(c, size, NULL, err, sizeof err, "magic"),
                     IMML_ERR_BAD_MAGIC);
  }
  /* short inputs: a wrong prefix is bad magic, a right one truncated */
  ck_assert_int_eq(load_refused((const unsigned char *)"IMMX", 4, NULL, err,
                                sizeof err, "short"),
                   IMML_ERR_BAD_MAGIC);
  ck_assert_int_eq(load_refused((const unsigned char *)"PK\3\4abc", 7, NULL,
                                err, sizeof err, "zip"),
                   IMML_ERR_BAD_MAGIC);
  /* the brief's lengths */
  const size_t lens[] = {0, 7, 27, size / 2, size - 1};
  for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
    st = load_refused(buf, lens[i], NULL, err, sizeof err, "truncated");
    ck_assert_msg(st == IMML_ERR_TRUNCATED, "length %zu: %d '%s'", lens[i],
                  (int)st, err);
  }
  /* version 2 (and 0), CRC fixed so only the version is wrong */
  const uint32_t versions[] = {2, 0, 0xFFFFFFFFu};
  for (size_t i = 0; i < 3; i++) {
    memcpy(c, buf, size);
    wr32(c, 8, versions[i]);
    fix_crc(c, size);
    st = load_refused(c, size, NULL, err, sizeof err, "version");
    ck_assert_int_eq(st, IMML_ERR_BAD_VERSION);
    ck_assert_msg(strstr(err, "version") && strstr(err, "offset 8"), "'%s'",
                  err);
  }
  /* bad CRC: the stored value, or one payload bit */
  memcpy(c, buf, size);
  c[size - 1] ^= 0x10;
  st = load_refused(c, size, NULL, err, sizeof err, "crc");
  ck_assert_int_eq(st, IMML_ERR_CHECKSUM);
  ck_assert_msg(strstr(err, "CRC"), "'%s'", err);
  memcpy(c, buf, size);
  c[size / 2] ^= 0x04;
  ck_assert_int_eq(load_refused(c, size, NULL, err, sizeof err, "crc2"),
                   IMML_ERR_CHECKSUM);
  /* trailing bytes after the CRC */
  const size_t extra[] = {1, 4, 200};
  for (size_t i = 0; i < 3; i++) {
    memcpy(c, buf, size);
    memset(c + size, 0, extra[i]);
    st = load_refused(c, size + extra[i], NULL, err, sizeof err, "trailing");
    ck_assert_msg(st == IMML_ERR_FORMAT, "%zu trailing bytes: %d '%s'",
                  extra[i], (int)st, err);
    ck_assert_msg(strstr(err, "trailing") && strstr(err, "offset 16"), "'%s'",
                  err);
  }
  free(c);
  free(buf);
}
END_TEST

/* ---- crafted files with a correct CRC ------------------------------- */

#define S(x) (1u << (x))
#define ANY_ERR                                                                \
  (S(IMML_ERR_FORMAT) | S(IMML_ERR_TRUNCATED) | S(IMML_ERR_TOO_LARGE) |        \
   S(IMML_ERR_NONFINITE))
#define NO_OFFSET ((size_t)-1)

typedef struct expect {
  unsigned allowed;   /* bit mask of acceptable statuses */
  const char *needle; /* the message must contain it (NULL: skip) */
  size_t offset;      /* the message must name "offset <this>" */
  int offset_any;     /* the message must name some offset */
  const char *what;
} crafted_expect;

static void set_expect(crafted_expect *e, const char *what, unsigned allowed,
                       const char *needle, size_t offset) {
  e->what = what;
  e->allowed = allowed;
  e->needle = needle;
  e->offset = offset;
  e->offset_any = 1;
}

/* Applies crafted case i to buf (capacity size + 64); returns the new size
 * (the CRC is recomputed afterwards by the caller). */
static size_t craft(int i, unsigned char *b, size_t size, const layout *L,
                    crafted_expect *e) {
  const float f_nan = NAN, f_inf = INFINITY;
  const int last = L->n_tensors - 1;
  const uint32_t J = rd32(b, L->dict_size);
  const uint32_t p = rd32(b, L->p);
  switch (i) {
  case 0:
    wr32(b, L->dims, 0x7FFFFFFFu);
    set_expect(e, "dims[0] = 2^31-1",
               S(IMML_ERR_TOO_LARGE) | S(IMML_ERR_TRUNCATED), "dims[0]",
               NO_OFFSET);
    break;
  case 1:
    wr32(b, L->hidden, 0x7FFFFFFFu);
    set_expect(e, "hidden_dim = 2^31-1",
               S(IMML_ERR_TOO_LARGE) | S(IMML_ERR_TRUNCATED), "hidden_dim",
               NO_OFFSET);
    break;
  case 2: /* within the per-field limits, 2^48 parameters in total */
    wr32(b, L->dims, 1u << 24);
    wr32(b, L->hidden, 1u << 24);
    set_expect(e, "dims[0] = hidden = 2^24",
               S(IMML_ERR_TOO_LARGE) | S(IMML_ERR_TRUNCATED), NULL, NO_OFFSET);
    break;
  case 3:
    wr32(b, L->knowledge, 1u << 20);
    set_expect(e, "knowledge_dim = 2^20",
               S(IMML_ERR_TOO_LARGE) | S(IMML_ERR_TRUNCATED), NULL, NO_OFFSET);
    break;
  case 4:
    wr32(b, L->classes, 0x7FFFFFFFu);
    set_expect(e, "n_classes = 2^31-1",
               S(IMML_ERR_TOO_LARGE) | S(IMML_ERR_TRUNCATED), "n_classes",
               NO_OFFSET);
    break;
  case 5:
    wr32(b, L->dims + 4, 0xFFFFFFFFu);
    set_expect(e, "dims[1] = 2^32-1",
               S(IMML_ERR_FORMAT) | S(IMML_ERR_TOO_LARGE), "dims", NO_OFFSET);
    break;
  case 6:
    wr32(b, L->n_mod, 1000);
    set_expect(e, "n_modalities = 1000", S(IMML_ERR_FORMAT), "n_modalities",
               L->n_mod);
    break;
  case 7:
    wr32(b, L->n_mod, 0);
    set_expect(e, "n_modalities = 0", S(IMML_ERR_FORMAT), "n_modalities",
               L->n_mod);
    break;
  case 8:
    wr32(b, L->n_mod, 3); /* everything after shifts */
    set_expect(e, "n_modalities = 3", ANY_ERR, NULL, NO_OFFSET);
    break;
  case 9:
    wr32(b, L->t_rows[0], 4); /* m0.w1 is 3 x 4 */
    set_expect(e, "m0.w1 rows", S(IMML_ERR_FORMAT), "m0.w1", L->t_rows[0]);
    break;
  case 10:
    wr32(b, L->hidden, HID + 1); /* tensors stay 4 wide */
    set_expect(e, "hidden_dim vs tensor shape", S(IMML_ERR_FORMAT), "m0.w1",
               L->t_rows[0]);
    break;
  case 11:
    wr32(b, L->n_tensors_at, (uint32_t)L->n_tensors - 1);
    set_expect(e, "tensor count", S(IMML_ERR_FORMAT), "tensors",
               L->n_tensors_at);
    break;
  case 12:
    b[L->t_len[2] + 4 + 4] = (unsigned char)'3'; /* m0.w2 -> m0.w3 */
    set_expect(e, "tensor name", S(IMML_ERR_FORMAT), "m0.w2", L->t_len[2]);
    break;
  case 13:
    wr32(b, L->t_len[0], 0x7FFFFFFFu);
    set_expect(e, "tensor name length", S(IMML_ERR_FORMAT), "m0.w1",
               L->t_len[0]);
    break;
  case 14:
    wrf(b, L->t_data[2] + 4, f_nan);
    set_expect(e, "NaN parameter", S(IMML_ERR_NONFINITE), "m0.w2",
               L->t_data[2]);
    break;
  case 15:
    wrf(b, L->t_data[last], f_inf);
    set_expect(e, "Inf parameter", S(IMML_ERR_NONFINITE), "ft.b",
               L->t_data[last]);
    break;
  case 16:
    wrf(b, L->ema + 4, f_nan);
    set_expect(e, "NaN ema", S(IMML_ERR_NONFINITE), "ema", L->ema);
    break;
  case 17:
    wrf(b, L->ema, -0.5f); /* an EMA of cross-entropies is >= 0 */
    set_expect(e, "ema < 0", S(IMML_ERR_FORMAT), "ema", L->p_fixed);
    break;
  case 18:
    wr32(b, L->dict_fill, J + 1);
    set_expect(e, "dict fill > dict_size", S(IMML_ERR_FORMAT), "dictionary",
               L->dict_fill);
    break;
  case 19:
    wr32(b, L->dict_fill, 0x7FFFFFFFu);
    set_expect(e, "dict fill 2^31-1", S(IMML_ERR_FORMAT), "dictionary",
               L->dict_fill);
    break;
  case 20:
    wr32(b, L->dict_pos, J);
    set_expect(e, "dict pos = dict_size", S(IMML_ERR_FORMAT), "dictionary",
               L->dict_fill);
    break;
  case 21:
    wr32(b, L->dict_fill, 1); /* partial fill needs pos == fill */
    wr32(b, L->dict_pos, 0);
    set_expect(e, "dict pos != fill", S(IMML_ERR_FORMAT), "dictionary",
               L->dict_fill);
    break;
  case 22:
    wrf(b, L->dict_data + 8, f_inf);
    set_expect(e, "Inf dictionary entry", S(IMML_ERR_NONFINITE), "dictionary",
               L->dict_data);
    break;
  case 23:
    wr32(b, L->p, 5);
    set_expect(e, "p out of range", S(IMML_ERR_FORMAT), "predominant",
               L->p_fixed);
    break;
  case 24:
    wr32(b, L->p_fixed, 2);
    set_expect(e, "p_fixed = 2", S(IMML_ERR_FORMAT), "predominant", L->p_fixed);
    break;
  case 25:
    wr32(b, L->p_fixed, 0); /* p stays set */
    set_expect(e, "unfixed with p", S(IMML_ERR_FORMAT), "predominant",
               L->p_fixed);
    break;
  case 26:
    wr32(b, L->p_fixed, 0);
    wr32(b, L->p, 0xFFFFFFFFu); /* steps (2) >= warmup_steps (2) */
    set_expect(e, "warm-up over but unfixed", S(IMML_ERR_FORMAT), "warm-up",
               L->p_fixed);
    break;
  case 27:
    wr32(b, L->predominant, p == 0 ? 1u : 0u);
    set_expect(e, "config predominant vs state", S(IMML_ERR_FORMAT),
               "predominant", L->p_fixed);
    break;
  case 28:
    wr32(b, L->builtin, 2);
    set_expect(e, "builtin_ft = 2", S(IMML_ERR_FORMAT), "builtin_ft",
               L->builtin);
    break;
  case 29:
    wrf(b, L->beta, 2.0f);
    set_expect(e, "beta = 2", S(IMML_ERR_FORMAT), "beta", NO_OFFSET);
    break;
  case 30:
    wrf(b, L->tau, 0.0f);
    set_expect(e, "tau = 0", S(IMML_ERR_FORMAT), "tau", NO_OFFSET);
    break;
  case 31:
    wr32(b, L->slot_mode, 7);
    set_expect(e, "slot_mode = 7", S(IMML_ERR_FORMAT), "slot_mode", NO_OFFSET);
    break;
  case 32:
    wr32(b, L->opt_flag, 2);
    set_expect(e, "optimiser flag = 2", S(IMML_ERR_FORMAT), "optimiser flag",
               L->opt_flag);
    break;
  case 33:
    wrf(b, L->opt_lr, -1.0f);
    set_expect(e, "optim lr < 0", S(IMML_ERR_FORMAT), "lr =", L->opt_kind);
    break;
  case 34:
    wr32(b, L->opt_kind, 9);
    set_expect(e, "optim kind = 9", S(IMML_ERR_FORMAT), "kind =", L->opt_kind);
    break;
  case 35:
    wrf(b, L->opt_b2, 1.0f);
    set_expect(e, "optim beta2 = 1", S(IMML_ERR_FORMAT),
               "beta2 =", L->opt_kind);
    break;
  case 36:
    wr32(b, L->opt_has_buf, 3);
    set_expect(e, "has_buf = 3", S(IMML_ERR_FORMAT), "has_buf", L->opt_kind);
    break;
  case 37:
    wr64(b, L->opt_t, (uint64_t)1 << 63);
    set_expect(e, "optimiser step 2^63", S(IMML_ERR_FORMAT), "step",
               L->opt_kind);
    break;
  case 38:
    wrf(b, L->crc - 4, f_nan);
    set_expect(e, "NaN second moment", S(IMML_ERR_NONFINITE), "moment 2",
               L->opt_m2);
    break;
  case 39:
    wr32(b, 12, 1);
    set_expect(e, "reserved = 1", S(IMML_ERR_FORMAT), "reserved", 12);
    break;
  case 40:
    wr32(b, 8, 2);
    set_expect(e, "version 2", S(IMML_ERR_BAD_VERSION), "version", 8);
    break;
  case 41: /* four bytes no field accounts for, before the CRC */
    memset(b + L->crc, 0, 8);
    size += 4;
    wr64(b, 16, size - 28);
    set_expect(e, "unread payload bytes", S(IMML_ERR_FORMAT), "unexpected",
               L->crc);
    break;
  case 42: /* the last float of moment 2 missing */
    size -= 4;
    wr64(b, 16, size - 28);
    set_expect(e, "payload cut inside moment 2", S(IMML_ERR_TRUNCATED),
               "moment 2", L->opt_m2);
    break;
  case 43:
    wr64(b, 16, size - 28 + 1);
    set_expect(e, "payload size + 1", S(IMML_ERR_TRUNCATED), "payload", 16);
    break;
  case 44:
    wr64(b, 16, size - 28 - 1);
    set_expect(e, "payload size - 1", S(IMML_ERR_FORMAT), "payload", 16);
    break;
  case 45:
    wr32(b, L->opt_flag, 0); /* optimiser bytes left over */
    set_expect(e, "no optimiser but its bytes", S(IMML_ERR_FORMAT),
               "unexpected", L->opt_flag + 4);
    break;
  case 46:
    wr32(b, L->warmup, 0x80000000u);
    set_expect(e, "warmup_steps = 2^31", S(IMML_ERR_FORMAT), "warmup_steps",
               L->warmup);
    break;
  case 47:
    wr32(b, L->max_batch, 0);
    set_expect(e, "max_batch = 0", S(IMML_ERR_FORMAT), "max_batch", NO_OFFSET);
    break;
  case 48:
    wrf(b, L->gamma1, f_nan);
    set_expect(e, "gamma1 = NaN", S(IMML_ERR_FORMAT) | S(IMML_ERR_NONFINITE),
               "gamma1", NO_OFFSET);
    break;
  case 49:
    wrf(b, L->opt_eps, 0.0f);
    set_expect(e, "optim eps = 0", S(IMML_ERR_FORMAT), "eps =", L->opt_kind);
    break;
  case 50:
    wr32(b, L->opt_nesterov, 1); /* AdamW */
    set_expect(e, "nesterov with AdamW", S(IMML_ERR_FORMAT),
               "nesterov =", L->opt_kind);
    break;
  case 51:
    wr32(b, L->steps, 0x80000000u);
    set_expect(e, "warm-up steps 2^31", S(IMML_ERR_FORMAT), "steps", L->steps);
    break;
  case 52:
    wr32(b, L->dict_size, 2); /* fill 3 > dict_size 2 */
    set_expect(e, "dict_size below fill", S(IMML_ERR_FORMAT), "dictionary",
               L->dict_fill);
    break;
  default:
    ck_abort_msg("no crafted case %d", i);
  }
  return size;
}
#define N_CRAFTED 53

START_TEST(test_crafted_with_valid_crc) {
  size_t size;
  unsigned char *buf = small_checkpoint(&size, 64, NULL);
  layout L;
  walk_layout(buf, size, &L);
  ck_assert_int_eq(L.has_opt, 1);
  ck_assert_uint_eq(rd32(buf, L.p_fixed), 1); /* warm-up finished */
  ck_assert_uint_eq(rd32(buf, L.dict_fill), rd32(buf, L.dict_size));
  crafted_expect e;
  memset(&e, 0, sizeof e);
  const size_t n = craft(_i, buf, size, &L, &e);
  fix_crc(buf, n);
  char err[256];
  const imml_status st = load_refused(buf, n, NULL, err, sizeof err, e.what);
  ck_assert_msg((e.allowed >> st) & 1u, "%s: status %d (%s), message '%s'",
                e.what, (int)st, imml_status_string(st), err);
  if (e.needle)
    ck_assert_msg(strstr(err, e.needle) != NULL,
                  "%s: message does not name '%s': '%s'", e.what, e.needle,
                  err);
  if (e.offset_any)
    ck_assert_msg(strstr(err, "offset") != NULL,
                  "%s: message names no offset: '%s'", e.what, err);
  if (e.offset != NO_OFFSET) {
    char want[48];
    snprintf(want, sizeof want, "offset %zu", e.offset);
    ck_assert_msg(strstr(err, want) != NULL, "%s: message lacks '%s': '%s'",
                  e.what, want, err);
  }
  free(buf);
}
END_TEST

/* max_batch and dict_size do not scale the checkpoint, so the file's size
 * cannot bound the memory they imply; the loader must still fail cleanly
 * (here: the allocator refuses) without leaking or crashing. */
START_TEST(test_crafted_huge_batch_fails_cleanly) {
  size_t size;
  unsigned char *buf = small_checkpoint(&size, 0, NULL);
  layout L;
  walk_layout(buf, size, &L);
  wr32(buf, _i == 0 ? L.max_batch : L.dict_size, 1u << 20);
  if (_i == 1)
    wr32(buf, L.dict_pos, rd32(buf, L.dict_fill)); /* partial fill rule */
  fix_crc(buf, size);
  counter cnt;
  imml_load_options o;
  counting_options(&o, &cnt);
  imml_model *m = NULL;
  const imml_status st = imml_model_load_mem(buf, size, NULL, &o, &m);
  ck_assert_msg(st != IMML_OK, "loaded a 2^20 %s model under a 1 MB cap",
                _i == 0 ? "max_batch" : "dict_size");
  failed_handle(m, st, &cnt, NULL, 0, "2^20 max_batch or dict_size");
  free(buf);
}
END_TEST

/* ---- F&T callbacks ------------------------------------------------------ */

START_TEST(test_callbacks_required_and_refused) {
  spec sp = small_spec;
  sp.host_ft = 1;
  imml_model *host = make_model(&sp);
  train(host, &sp, 0, 2);
  size_t hsize, bsize;
  unsigned char *hbuf = save_to_mem(host, &hsize, 0);
  unsigned char *bbuf = small_checkpoint(&bsize, 0, NULL);
  imml_ft_ops ops = host_ops();
  char err[256];

  imml_status st = load_refused(hbuf, hsize, NULL, err, sizeof err, "no ft");
  ck_assert_int_eq(st, IMML_ERR_NEED_CALLBACKS);
  ck_assert_msg(strstr(err, "imml_ft_ops") || strstr(err, "callback"), "'%s'",
                err);
  st = load_refused(bbuf, bsize, &ops, err, sizeof err, "ft for built-in");
  ck_assert_int_eq(st, IMML_ERR_INVALID_ARG);
  ck_assert_msg(strstr(err, "built-in"), "'%s'", err);
  /* invalid ops for a host checkpoint */
  imml_ft_ops bad = ops;
  bad.struct_size = 0;
  st = load_refused(hbuf, hsize, &bad, err, sizeof err, "ft struct_size");
  ck_assert_int_eq(st, IMML_ERR_INVALID_ARG);
  ck_assert_msg(strstr(err, "struct_size"), "'%s'", err);
  bad = ops;
  bad.backward = NULL;
  st = load_refused(hbuf, hsize, &bad, err, sizeof err, "ft backward NULL");
  ck_assert_int_eq(st, IMML_ERR_NULL);
  ck_assert_msg(strstr(err, "backward"), "'%s'", err);
  /* with the callbacks it loads and predicts like the original */
  imml_model *r = load_from_mem(hbuf, hsize, &ops);
  assert_models_equal(host, r, "host F&T");
  imml_model_free(r);
  /* the same through files */
  char dir[512], path[600];
  make_tmpdir(dir, sizeof dir, "imml-ckpt-");
  snprintf(path, sizeof path, "%s/host.imml", dir);
  ck_assert_int_eq(imml_model_save(host, path), IMML_OK);
  load_file_fails(path, NULL, NULL, IMML_ERR_NEED_CALLBACKS, err, sizeof err);
  ck_assert_msg(strstr(err, "imml_ft_ops") || strstr(err, "callback"), "'%s'",
                err);
  r = load_file_ok(path, &ops, NULL);
  assert_models_equal(host, r, "host F&T (file)");
  imml_model_free(r);
  remove_tree(dir);
  free(hbuf);
  free(bbuf);
  imml_model_free(host);
}
END_TEST

/* ---- files and arguments ------------------------------------------------ */

START_TEST(test_load_io_errors) {
  char dir[512], path[600], err[256];
  make_tmpdir(dir, sizeof dir, "imml-ckpt-");
  snprintf(path, sizeof path, "%s/does-not-exist.imml", dir);
  counter cnt;
  imml_load_options o;
  counting_options(&o, &cnt);
  imml_model *m = NULL;
  ck_assert_int_eq(imml_model_load(path, NULL, &o, &m), IMML_ERR_IO);
  failed_handle(m, IMML_ERR_IO, &cnt, err, sizeof err, "missing file");
  ck_assert_msg(strstr(err, "does-not-exist.imml") != NULL, "'%s'", err);
  load_file_fails(path, NULL, NULL, IMML_ERR_IO, err, sizeof err);
  ck_assert_msg(strstr(err, "does-not-exist.imml") != NULL, "'%s'", err);
  /* truncated and empty files report like memory */
  size_t size;
  unsigned char *buf = small_checkpoint(&size, 0, NULL);
  const size_t lens[] = {0, 7, 27, size / 2, size - 1};
  snprintf(path, sizeof path, "%s/short.imml", dir);
  for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
    write_file(path, buf, lens[i]);
    m = NULL;
    ck_assert_int_eq(imml_model_load(path, NULL, &o, &m), IMML_ERR_TRUNCATED);
    failed_handle(m, IMML_ERR_TRUNCATED, &cnt, NULL, 0, "short file");
  }
  write_file(path, buf, size);
  m = load_file_ok(path, NULL, &o);
  imml_model_free(m);
  ck_assert_int_eq(cnt.live, 0);
  /* NULL arguments: a failed handle when there is somewhere to put it */
  m = NULL;
  ck_assert_int_eq(imml_model_load(NULL, NULL, NULL, &m), IMML_ERR_NULL);
  failed_handle(m, IMML_ERR_NULL, NULL, NULL, 0, "load(NULL path)");
  ck_assert_int_eq(imml_model_load(path, NULL, NULL, NULL), IMML_ERR_NULL);
  m = NULL;
  ck_assert_int_eq(imml_model_load_mem(NULL, 10, NULL, NULL, &m),
                   IMML_ERR_NULL);
  failed_handle(m, IMML_ERR_NULL, NULL, NULL, 0, "load_mem(NULL buffer)");
  ck_assert_int_eq(imml_model_load_mem(buf, size, NULL, NULL, NULL),
                   IMML_ERR_NULL);
  /* options too old: refused without using their allocator */
  o.struct_size = sizeof o - 1;
  const long calls = cnt.n_alloc;
  m = NULL;
  ck_assert_int_eq(imml_model_load_mem(buf, size, NULL, &o, &m),
                   IMML_ERR_INVALID_ARG);
  ck_assert_int_eq(cnt.n_alloc, calls);
  failed_handle(m, IMML_ERR_INVALID_ARG, &cnt, err, sizeof err, "old options");
  ck_assert_msg(strstr(err, "struct_size") != NULL, "'%s'", err);
  free(buf);
  remove_tree(dir);
}
END_TEST

/* A directory is not a checkpoint: an I/O error, without trying to
 * allocate whatever size the file system reports for it. */
START_TEST(test_load_directory_is_io_error) {
  char dir[512], err[256];
  make_tmpdir(dir, sizeof dir, "imml-ckpt-");
  counter cnt;
  imml_load_options o;
  counting_options(&o, &cnt);
  imml_model *m = NULL;
  const imml_status st = imml_model_load(dir, NULL, &o, &m);
  remove_tree(dir);
  ck_assert_msg(st == IMML_ERR_IO, "loading a directory: status %d (%s) '%s'",
                (int)st, imml_status_string(st), imml_model_errmsg(m));
  failed_handle(m, st, &cnt, err, sizeof err, "directory");
  ck_assert_msg(cnt.max_req <= BIG_ALLOC,
                "loading a directory requested %zu bytes", cnt.max_req);
}
END_TEST

/* imml_model_load must check its options before it uses them: an allocator
 * with only one hook, or fields beyond a too-small struct_size, are refused
 * before any allocation goes through them (the failed handle included). */
START_TEST(test_load_validates_options_first) {
  char dir[512], path[600], err[256];
  make_tmpdir(dir, sizeof dir, "imml-ckpt-");
  snprintf(path, sizeof path, "%s/model.imml", dir);
  size_t size;
  unsigned char *buf = small_checkpoint(&size, 0, NULL);
  write_file(path, buf, size);
  counter cnt;
  imml_load_options o;
  counting_options(&o, &cnt);
  imml_model *m = NULL;
  imml_status st;
  if (_i == 0) {
    o.allocator.free_fn = NULL; /* malloc_fn without free_fn */
    st = imml_model_load(path, NULL, &o, &m);
  } else {
    o.struct_size = sizeof(size_t); /* the allocator is not covered */
    st = imml_model_load(path, NULL, &o, &m);
  }
  free(buf);
  remove_tree(dir);
  ck_assert_int_eq(st, IMML_ERR_INVALID_ARG);
  ck_assert_msg(cnt.n_alloc == 0 && cnt.max_req == 0,
                "case %d: the unvalidated allocator was used (%ld calls, "
                "largest %zu bytes)",
                _i, cnt.n_alloc, cnt.max_req);
  failed_handle(m, st, NULL, err, sizeof err, "invalid options");
  if (_i == 0)
    ck_assert_msg(strstr(err, "allocator") != NULL, "'%s'", err);
  else
    ck_assert_msg(strstr(err, "struct_size") != NULL, "'%s'", err);
}
END_TEST

/* ---- atomic saves ------------------------------------------------------- */

START_TEST(test_atomic_save) {
  char dir[512], path[600], names[1024];
  make_tmpdir(dir, sizeof dir, "imml-ckpt-");
  snprintf(path, sizeof path, "%s/model.imml", dir);
  spec sa = small_spec, sb = small_spec;
  sb.seed = 99;
  imml_model *a = make_model(&sa), *b = make_model(&sb);
  train(a, &sa, 0, 2);
  train(b, &sb, 0, 3);

  /* first save: exactly one file, no temporary left over */
  ck_assert_int_eq(imml_model_save(a, path), IMML_OK);
  ck_assert_int_eq(list_dir(dir, names, sizeof names), 1);
  ck_assert_str_eq(names, "model.imml,");
  /* saving over it replaces it */
  ck_assert_int_eq(imml_model_save(b, path), IMML_OK);
  ck_assert_int_eq(list_dir(dir, names, sizeof names), 1);
  ck_assert_str_eq(names, "model.imml,");
  imml_model *r = load_file_ok(path, NULL, NULL);
  assert_models_equal(b, r, "overwritten checkpoint");
  imml_model_free(r);
  /* over an unrelated file too */
  write_file(path, "not a checkpoint at all", 23);
  ck_assert_int_eq(imml_model_save(a, path), IMML_OK);
  size_t fsize, msize;
  unsigned char *fb = read_file(path, &fsize);
  unsigned char *mb = save_to_mem(a, &msize, 0);
  ck_assert(fsize == msize && memcmp(fb, mb, msize) == 0);
  free(fb);
  free(mb);
  ck_assert_int_eq(list_dir(dir, names, sizeof names), 1);

  /* into a directory that does not exist: IO, nothing created */
  char missing[700];
  snprintf(missing, sizeof missing, "%s/no-such-dir/model.imml", dir);
  ck_assert_int_eq(imml_model_save(a, missing), IMML_ERR_IO);
  ck_assert_msg(strstr(imml_model_errmsg(a), "no-such-dir") != NULL, "'%s'",
                imml_model_errmsg(a));
  ck_assert_int_eq(list_dir(dir, names, sizeof names), 1);
  ck_assert_str_eq(names, "model.imml,");
  /* onto a path that is a directory: IO, the temporary file removed */
  char sub[700];
  snprintf(sub, sizeof sub, "%s/sub", dir);
  ck_assert_int_eq(mkdir(sub, 0700), 0);
  ck_assert_int_eq(imml_model_save(a, sub), IMML_ERR_IO);
  ck_assert_str_ne(imml_model_errmsg(a), "");
  ck_assert_int_eq(list_dir(dir, names, sizeof names), 2);
  ck_assert_str_eq(names, "model.imml,sub,");
  ck_assert_int_eq(list_dir(sub, names, sizeof names), 0);
  /* the existing checkpoint is untouched by the failures */
  r = load_file_ok(path, NULL, NULL);
  assert_models_equal(a, r, "after failed saves");
  imml_model_free(r);
  /* NULL arguments */
  ck_assert_int_eq(imml_model_save(a, NULL), IMML_ERR_NULL);
  ck_assert_int_eq(imml_model_save(NULL, path), IMML_ERR_NULL);
  size_t sz;
  ck_assert_int_eq(imml_model_save_mem(NULL, NULL, 0, &sz), IMML_ERR_NULL);

  imml_model_free(a);
  imml_model_free(b);
  remove_tree(dir);
}
END_TEST

/* ---- concurrent prediction --------------------------------------------- */

#define N_THREADS 4
#define N_PBATCH 5
#define N_REPEAT 200

static const int pbatch_size[N_PBATCH] = {8, 5, 1, 8, 3};

typedef struct predict_out {
  float logits[N_PBATCH][MAXB * NCLS];
  float probs[N_PBATCH][MAXB * NCLS];
  int classes[N_PBATCH][MAXB];
} predict_out;

typedef struct worker {
  imml_model *share; /* this thread's share of the model */
  const predict_out *expect;
  fixed_batch in[N_PBATCH];
  int errors, mismatches;
} worker;

/* Every batch through imml_predict on h (a model or a share). */
static int predict_all(imml_model *h, const fixed_batch *in, predict_out *out) {
  for (int b = 0; b < N_PBATCH; b++)
    if (imml_predict(h, pbatch_size[b], in[b].f, out->logits[b], out->probs[b],
                     out->classes[b]) != IMML_OK)
      return 1;
  return 0;
}

static void *worker_main(void *arg) {
  worker *w = arg;
  predict_out *got = malloc(sizeof *got);
  if (!got) {
    w->errors++;
    return NULL;
  }
  for (int r = 0; r < N_REPEAT; r++) {
    memset(got, 0, sizeof *got);
    if (predict_all(w->share, w->in, got)) {
      w->errors++;
      continue;
    }
    for (int b = 0; b < N_PBATCH; b++) {
      const size_t nl = (size_t)pbatch_size[b] * NCLS * sizeof(float);
      if (memcmp(got->logits[b], w->expect->logits[b], nl) ||
          memcmp(got->probs[b], w->expect->probs[b], nl) ||
          memcmp(got->classes[b], w->expect->classes[b],
                 (size_t)pbatch_size[b] * sizeof(int)))
        w->mismatches++;
    }
  }
  free(got);
  return NULL;
}

static imml_model *share_ok(imml_model *m) {
  imml_model *s = NULL;
  const imml_status st = imml_model_share(m, &s);
  ck_assert_msg(st == IMML_OK, "imml_model_share: %d %s", (int)st,
                imml_model_errmsg(s));
  ck_assert_ptr_nonnull(s);
  return s;
}

START_TEST(test_concurrent_predict) {
  spec sp = {MAXB, 6, -1, 2, IMML_OPTIM_ADAMW, 0, 0, 0, 0, 31};
  imml_model *orig = make_model(&sp);
  train(orig, &sp, 0, 4);
  int p, fixed;
  ck_assert_int_eq(imml_predominant_get(orig, &p, &fixed), IMML_OK);
  ck_assert(fixed); /* predictions go through the front-door adjustment */
  size_t size;
  unsigned char *buf = save_to_mem(orig, &size, 0);
  imml_model *m = load_from_mem(buf, size, NULL);

  /* one share per thread, taken before the threads start (a handle is used
   * by one thread at a time, and imml_model_share is a call on m) */
  static worker w[N_THREADS];
  for (int t = 0; t < N_THREADS; t++) {
    memset(&w[t], 0, sizeof w[t]);
    w[t].share = share_ok(m);
    for (int b = 0; b < N_PBATCH; b++)
      make_batch(&w[t].in[b], 500 + (uint64_t)b, pbatch_size[b]);
  }
  /* single-threaded expectations: a share of the loaded model, a share of
   * the original, the loaded model itself and the original's evaluation
   * forwards all agree */
  static predict_out expect, check;
  imml_model *ws = share_ok(m);
  ck_assert_int_eq(predict_all(ws, w[0].in, &expect), 0);
  imml_model *ws2 = share_ok(orig);
  ck_assert_int_eq(predict_all(ws2, w[0].in, &check), 0);
  ck_assert_msg(memcmp(&expect, &check, sizeof expect) == 0,
                "loaded model predicts differently from the original");
  memset(&check, 0, sizeof check);
  ck_assert_int_eq(predict_all(m, w[0].in, &check), 0);
  ck_assert_msg(memcmp(&expect, &check, sizeof expect) == 0,
                "the loaded model predicts differently from its share");
  for (int b = 0; b < N_PBATCH; b++) {
    float lg[MAXB * NCLS];
    ck_assert_int_eq(imml_forward(orig, IMML_MODE_EVAL, pbatch_size[b],
                                  w[0].in[b].f, NULL, lg, NULL),
                     IMML_OK);
    ck_assert(memcmp(lg, expect.logits[b],
                     (size_t)pbatch_size[b] * NCLS * sizeof(float)) == 0);
  }
  imml_model_free(ws2);

  pthread_t th[N_THREADS];
  for (int t = 0; t < N_THREADS; t++) {
    w[t].expect = &expect;
    ck_assert_int_eq(pthread_create(&th[t], NULL, worker_main, &w[t]), 0);
  }
  /* the main thread predicts too, with its own share */
  int main_mismatch = 0;
  for (int r = 0; r < N_REPEAT / 4; r++) {
    memset(&check, 0, sizeof check);
    ck_assert_int_eq(predict_all(ws, w[0].in, &check), 0);
    main_mismatch += memcmp(&check, &expect, sizeof check) != 0;
  }
  for (int t = 0; t < N_THREADS; t++)
    ck_assert_int_eq(pthread_join(th[t], NULL), 0);
  for (int t = 0; t < N_THREADS; t++)
    ck_assert_msg(w[t].errors == 0 && w[t].mismatches == 0,
                  "thread %d: %d errors, %d mismatching batches", t,
                  w[t].errors, w[t].mismatches);
  ck_assert_int_eq(main_mismatch, 0);
  /* prediction never changes the model */
  size_t size2;
  unsigned char *buf2 = save_to_mem(m, &size2, 0);
  ck_assert(size2 == size && memcmp(buf, buf2, size) == 0);
  free(buf2);
  for (int t = 0; t < N_THREADS; t++)
    imml_model_free(w[t].share);
  imml_model_free(ws);
  free(buf);
  imml_model_free(m);
  imml_model_free(orig);
}
END_TEST

/* ---- 1.0: commit, host-fixed p, memory_limit, newer options ------- */

/* Saving is refused (IMML_ERR_STATE, naming the commit) while micro-batches
 * are not committed: one, or two accumulated, after a save-able state.
 * Nothing is written -- the existing file stays as it was, no temporary
 * file is left, the caller's buffer is untouched -- and the model is
 * unchanged.  After imml_commit the save goes through and loads as the
 * model.  _i: 1 or 2 uncommitted micro-batches. */
START_TEST(test_save_refused_uncommitted) {
  const int K = 1 + _i;
  spec sp = small_spec;
  sp.B = 4;
  imml_model *m = make_model(&sp);
  train(m, &sp, 0, 2);
  char dir[512], path[600], names[1024];
  make_tmpdir(dir, sizeof dir, "imml-ckpt-");
  snprintf(path, sizeof path, "%s/model.imml", dir);
  ck_assert_int_eq(imml_model_save(m, path), IMML_OK);
  size_t before_size;
  unsigned char *before = read_file(path, &before_size);
  /* a pending training forward alone does not stop a save */
  fixed_batch b;
  make_batch(&b, 777, sp.B);
  ck_assert_int_eq(imml_forward(m, IMML_MODE_TRAIN, sp.B, b.f, b.y, NULL, NULL),
                   IMML_OK);
  size_t need = 0;
  ck_assert_int_eq(imml_model_save_mem(m, NULL, 0, &need), IMML_OK);
  for (int k = 0; k < K; k++) {
    if (k > 0) {
      make_batch(&b, 778 + (uint64_t)k, sp.B);
      ck_assert_int_eq(
          imml_forward(m, IMML_MODE_TRAIN, sp.B, b.f, b.y, NULL, NULL),
          IMML_OK);
    }
    backward_only_ok(m, NULL);
  }
  ck_assert_int_eq(m->acc.micro, K);
  snap s0;
  snap_take(m, &s0);
  /* to a file */
  imml_status st = imml_model_save(m, path);
  ck_assert_msg(st == IMML_ERR_STATE, "save with %d uncommitted: %d (%s)", K,
                (int)st, imml_status_string(st));
  ck_assert_msg(strstr(imml_model_errmsg(m), "commit") != NULL, "'%s'",
                imml_model_errmsg(m));
  ck_assert_int_eq(list_dir(dir, names, sizeof names), 1);
  ck_assert_str_eq(names, "model.imml,");
  size_t after_size;
  unsigned char *after = read_file(path, &after_size);
  ck_assert_msg(after_size == before_size &&
                    memcmp(after, before, before_size) == 0,
                "a refused save changed the file");
  free(after);
  /* to a new file: not created */
  char fresh[700];
  snprintf(fresh, sizeof fresh, "%s/fresh.imml", dir);
  ck_assert_int_eq(imml_model_save(m, fresh), IMML_ERR_STATE);
  ck_assert_int_eq(list_dir(dir, names, sizeof names), 1);
  /* to memory: neither the size query nor the save answers, nothing is
   * written */
  unsigned char *buf = malloc(need + 64);
  ck_assert_ptr_nonnull(buf);
  memset(buf, 0xA5, need + 64);
  size_t got = 12345;
  ck_assert_int_eq(imml_model_save_mem(m, NULL, 0, &got), IMML_ERR_STATE);
  ck_assert_int_eq(imml_model_save_mem(m, buf, need + 64, &got),
                   IMML_ERR_STATE);
  ck_assert_msg(strstr(imml_model_errmsg(m), "commit") != NULL, "'%s'",
                imml_model_errmsg(m));
  for (size_t i = 0; i < need + 64; i++)
    ck_assert_msg(buf[i] == 0xA5, "byte %zu written by a refused save", i);
  expect_unchanged(m, &s0, "refused saves");
  snap_free(&s0);
  /* committed: the save goes through, and the file loads as the model */
  ck_assert_int_eq(imml_commit(m), IMML_OK);
  ck_assert_int_eq(m->acc.micro, 0);
  ck_assert_int_eq(imml_model_save(m, path), IMML_OK);
  free(buf);
  buf = save_to_mem(m, &got, 0);
  imml_model *r = load_file_ok(path, NULL, NULL);
  assert_models_equal(m, r, "saved after the commit");
  size_t fsize;
  unsigned char *fb = read_file(path, &fsize);
  ck_assert(fsize == got && memcmp(fb, buf, got) == 0);
  free(fb);
  imml_model_free(r);
  free(buf);
  free(before);
  imml_model_free(m);
  remove_tree(dir);
}
END_TEST

/* A predominant modality fixed by the host (imml_predominant_set) before
 * the warm-up chose one is part of the checkpoint: the loaded model has p
 * fixed, the same p, the same warm-up state, refuses another
 * imml_predominant_set, and trains on exactly like the original.  The
 * config's predominant stays -1.  _i: 0 saved right after the set (never
 * trained), 1 after training steps; bit 1: through a file. */
START_TEST(test_predominant_set_saved) {
  const int trained = _i & 1, via_file = _i >> 1;
  spec sp = {4, 3, -1, 50, IMML_OPTIM_ADAMW, 0, 0, 0, 0, 41};
  imml_model *m = make_model(&sp);
  if (trained)
    train(m, &sp, 0, 2); /* warm-up in flight, p not chosen */
  int p = 7, fixed = 7;
  ck_assert_int_eq(imml_predominant_get(m, &p, &fixed), IMML_OK);
  ck_assert_int_eq(fixed, 0);
  ck_assert_int_eq(p, -1);
  ck_assert_int_eq(imml_predominant_set(m, 1), IMML_OK);
  ck_assert_int_eq(imml_predominant_get(m, &p, &fixed), IMML_OK);
  ck_assert(p == 1 && fixed == 1);
  if (trained)
    train(m, &sp, 2, 4); /* steps with p fixed by the host */
  size_t size;
  unsigned char *buf = save_to_mem(m, &size, 0);
  layout L;
  walk_layout(buf, size, &L);
  ck_assert_uint_eq(rd32(buf, L.p_fixed), 1);
  ck_assert_uint_eq(rd32(buf, L.p), 1);
  ck_assert_uint_eq(rd32(buf, L.predominant), 0xFFFFFFFFu); /* -1 */
  imml_model *r;
  char dir[512] = "";
  if (via_file) {
    char path[600];
    make_tmpdir(dir, sizeof dir, "imml-ckpt-");
    snprintf(path, sizeof path, "%s/p.imml", dir);
    ck_assert_int_eq(imml_model_save(m, path), IMML_OK);
    r = load_file_ok(path, NULL, NULL);
  } else {
    r = load_from_mem(buf, size, NULL);
  }
  p = fixed = 7;
  ck_assert_int_eq(imml_predominant_get(r, &p, &fixed), IMML_OK);
  ck_assert_msg(p == 1 && fixed == 1, "loaded: p %d fixed %d", p, fixed);
  imml_config rc;
  imml_config_init(&rc);
  ck_assert_int_eq(imml_model_get_config(r, &rc), IMML_OK);
  ck_assert_int_eq(rc.predominant, -1);
  assert_models_equal(m, r, "p fixed by the host");
  /* fixed for good, in the loaded model as in the original */
  ck_assert_int_eq(imml_predominant_set(r, 0), IMML_ERR_STATE);
  ck_assert_int_eq(imml_predominant_set(m, 0), IMML_ERR_STATE);
  ck_assert_int_eq(imml_predominant_get(r, &p, &fixed), IMML_OK);
  ck_assert(p == 1 && fixed == 1);
  /* it re-saves to the same bytes and trains on like the original */
  size_t size2;
  unsigned char *buf2 = save_to_mem(r, &size2, 0);
  ck_assert(size2 == size && memcmp(buf, buf2, size) == 0);
  free(buf2);
  train(m, &sp, 4, 6);
  train(r, &sp, 4, 6);
  assert_models_equal(m, r, "trained after the load, p fixed by the host");
  free(buf);
  imml_model_free(r);
  imml_model_free(m);
  if (dir[0])
    remove_tree(dir);
}
END_TEST

/* imml_load_options.memory_limit: a checkpoint whose model needs more
 * (its arena, and its optimiser state when it has one) is refused with
 * IMML_ERR_TOO_LARGE and a message naming memory_limit before anything
 * but a handle is allocated; with a limit comfortably above what it needs
 * it loads, and takes no more than the limit.  (The library may check an
 * upper bound of the arena rather than its exact size, so the exact
 * boundary is not tested.)  _i: 0 memory, no optimiser; 1 file, no
 * optimiser; 2 memory, AdamW; 3 file, AdamW. */
START_TEST(test_load_memory_limit) {
  const int via_file = _i & 1, with_opt = _i >> 1;
  spec sp = small_spec;
  sp.opt = with_opt ? IMML_OPTIM_ADAMW : OPT_NONE;
  imml_model *m = make_model(&sp);
  train(m, &sp, 0, 3);
  const size_t arena = m->arena_bytes;
  const size_t opt_bytes = with_opt ? 2 * m->n_params * sizeof(float) : 0;
  const size_t need = arena + opt_bytes;
  ck_assert_uint_gt(arena, 0);
  size_t size;
  unsigned char *buf = save_to_mem(m, &size, 0);
  char dir[512], path[600], err[256];
  make_tmpdir(dir, sizeof dir, "imml-ckpt-");
  snprintf(path, sizeof path, "%s/model.imml", dir);
  write_file(path, buf, size);
  const size_t limits[] = {1, arena / 2, need - 1};
  for (size_t i = 0; i < sizeof limits / sizeof limits[0]; i++) {
    counter cnt;
    imml_load_options o;
    counting_options(&o, &cnt);
    cnt.expected = via_file ? size : 0;
    o.memory_limit = limits[i];
    imml_model *r = NULL;
    const imml_status st = via_file
                               ? imml_model_load(path, NULL, &o, &r)
                               : imml_model_load_mem(buf, size, NULL, &o, &r);
    char label[64];
    snprintf(label, sizeof label, "memory_limit %zu (needs %zu)", limits[i],
             need);
    ck_assert_msg(st == IMML_ERR_TOO_LARGE, "%s: status %d (%s) '%s'", label,
                  (int)st, imml_status_string(st), imml_model_errmsg(r));
    /* handles, and the file's bytes (read first), but nothing of the
     * model's memory (arena, optimiser state) */
    ck_assert_msg(cnt.n_other == 0,
                  "%s: %ld allocations other than handles before the "
                  "refusal (largest %zu bytes)",
                  label, cnt.n_other, cnt.max_req);
    failed_handle(r, st, &cnt, err, sizeof err, label);
    ck_assert_msg(strstr(err, "memory_limit") != NULL, "%s: '%s'", label, err);
  }
  /* under a limit it fits in, it loads, and keeps to it */
  imml_load_options o;
  imml_load_options_init(&o);
  o.memory_limit = 2 * need + ((size_t)64 << 10);
  imml_model *r = via_file ? load_file_ok(path, NULL, &o) : NULL;
  if (!via_file) {
    const imml_status st = imml_model_load_mem(buf, size, NULL, &o, &r);
    ck_assert_msg(st == IMML_OK, "memory_limit %zu (needs %zu): %s",
                  o.memory_limit, need, imml_model_errmsg(r));
  }
  assert_models_equal(m, r, "loaded under a memory_limit");
  ck_assert_uint_eq(r->arena_bytes, arena);
  ck_assert_uint_le(r->arena_bytes + (r->opt.active ? opt_bytes : 0),
                    o.memory_limit);
  ck_assert_int_eq(r->opt.active, with_opt);
  imml_model_free(r);
  free(buf);
  imml_model_free(m);
  remove_tree(dir);
}
END_TEST

/* imml_load_options from a newer header: a struct_size beyond this
 * library's struct is accepted when every extra byte is zero, and refused
 * with IMML_ERR_UNKNOWN_FIELD (a message naming the struct) when any is
 * not -- before the options' allocator is used for anything.  _i: the
 * extra byte set (0..15), or 16: every extra byte zero. */
typedef struct newer_options {
  imml_load_options o;
  unsigned char tail[16];
} newer_options;

START_TEST(test_load_options_newer_struct) {
  size_t size;
  imml_model *orig = NULL;
  unsigned char *buf = small_checkpoint(&size, 0, &orig);
  newer_options big;
  memset(&big, 0, sizeof big);
  counter cnt;
  counting_options(&big.o, &cnt);
  big.o.struct_size = sizeof big;
  ck_assert_uint_eq(sizeof big, sizeof(imml_load_options) + 16);
  imml_model *m = NULL;
  if (_i == 16) {
    const imml_status st = imml_model_load_mem(buf, size, NULL, &big.o, &m);
    ck_assert_msg(st == IMML_OK, "zero tail: %d %s", (int)st,
                  imml_model_errmsg(m));
    ck_assert_int_gt(cnt.n_alloc, 0); /* the options were read */
    assert_models_equal(orig, m, "options with a zero tail");
    imml_model_free(m);
    ck_assert_int_eq(cnt.live, 0);
    /* a memory_limit in them is honoured too */
    big.o.memory_limit = 1;
    m = NULL;
    ck_assert_int_eq(imml_model_load_mem(buf, size, NULL, &big.o, &m),
                     IMML_ERR_TOO_LARGE);
    failed_handle(m, IMML_ERR_TOO_LARGE, &cnt, NULL, 0, "zero tail, limit 1");
  } else {
    big.tail[_i] = (unsigned char)(_i == 15 ? 0x80 : 1 + _i);
    char dir[512], path[600], err[256];
    make_tmpdir(dir, sizeof dir, "imml-ckpt-");
    snprintf(path, sizeof path, "%s/model.imml", dir);
    write_file(path, buf, size);
    for (int via_file = 0; via_file < 2; via_file++) {
      m = NULL;
      const imml_status st =
          via_file ? imml_model_load(path, NULL, &big.o, &m)
                   : imml_model_load_mem(buf, size, NULL, &big.o, &m);
      ck_assert_msg(st == IMML_ERR_UNKNOWN_FIELD,
                    "tail byte %d set (%s): status %d (%s) '%s'", _i,
                    via_file ? "file" : "memory", (int)st,
                    imml_status_string(st), imml_model_errmsg(m));
      ck_assert_msg(cnt.n_alloc == 0 && cnt.max_req == 0,
                    "the refused options' allocator was used");
      failed_handle(m, st, &cnt, err, sizeof err, "unknown field");
      ck_assert_msg(strstr(err, "imml_load_options") != NULL, "'%s'", err);
    }
    remove_tree(dir);
  }
  free(buf);
  imml_model_free(orig);
}
END_TEST

/* ---- hostile checkpoints (issue 13) ------------------------------------ */

/* Finding 1: the optimiser's step count, crafted with the CRC recomputed.
 * libimml 0.x loaded any count up to INT64_MAX: at INT64_MAX the next
 * imml_step computed t + 1 (signed overflow, reported by UBSan) and left
 * every parameter NaN; at INT64_MAX - 1 the second step did; counts past
 * 2^53 loaded too.  A count over 2^53 must be refused with
 * IMML_ERR_FORMAT naming the step field, from memory and from a file, with
 * nothing but the failed handle allocated. */
static const uint64_t steps_over[] = {
    (uint64_t)INT64_MAX,      (uint64_t)INT64_MAX - 1, ((uint64_t)1 << 53) + 1,
    ((uint64_t)1 << 53) + 2,  (uint64_t)1 << 62,       UINT64_MAX,
    ((uint64_t)1 << 63) + 1u,
};
#define N_STEPS_OVER (int)(sizeof steps_over / sizeof steps_over[0])

START_TEST(test_step_count_over_bound_refused) {
  const uint64_t t = steps_over[_i];
  size_t size;
  unsigned char *buf = small_checkpoint(&size, 0, NULL);
  layout L;
  walk_layout(buf, size, &L);
  ck_assert_int_eq(L.has_opt, 1);
  wr64(buf, L.opt_t, t);
  fix_crc(buf, size);
  char label[64], err[256];
  snprintf(label, sizeof label, "optimiser step %llu", (unsigned long long)t);
  const imml_status st = load_refused(buf, size, NULL, err, sizeof err, label);
  ck_assert_msg(st == IMML_ERR_FORMAT, "%s: status %d (%s) '%s'", label,
                (int)st, imml_status_string(st), err);
  char want[48];
  snprintf(want, sizeof want, "offset %zu", L.opt_kind);
  ck_assert_msg(strstr(err, "step") && strstr(err, "2^53") && strstr(err, want),
                "%s: the message names neither the field, its bound nor "
                "its offset: '%s'",
                label, err);
  /* the same from a file */
  char dir[512], path[600];
  make_tmpdir(dir, sizeof dir, "imml-ckpt-");
  snprintf(path, sizeof path, "%s/steps.imml", dir);
  write_file(path, buf, size);
  counter cnt;
  imml_load_options o;
  counting_options(&o, &cnt);
  cnt.expected = size; /* the file's bytes */
  imml_model *m = NULL;
  ck_assert_int_eq(imml_model_load(path, NULL, &o, &m), IMML_ERR_FORMAT);
  failed_handle(m, IMML_ERR_FORMAT, &cnt, err, sizeof err, label);
  ck_assert_msg(strstr(err, "2^53") != NULL, "'%s'", err);
  remove_tree(dir);
  free(buf);
}
END_TEST

/* One forward, backward and commit on a batch of the small spec. */
static void accumulate_one(imml_model *m, uint64_t seed) {
  fixed_batch b;
  make_batch(&b, seed, small_spec.B);
  const imml_status st =
      imml_forward(m, IMML_MODE_TRAIN, small_spec.B, b.f, b.y, NULL, NULL);
  ck_assert_msg(st == IMML_OK, "forward: %s", imml_model_errmsg(m));
  backward_ok(m, NULL);
}

static void expect_finite_params(imml_model *m, const char *what) {
  float *p = NULL, *g = NULL;
  size_t n = 0;
  ck_assert_int_eq(imml_param_flat(m, &p, &g, &n), IMML_OK);
  for (size_t i = 0; i < n; i++)
    ck_assert_msg(isfinite(p[i]) && isfinite(g[i]) && isfinite(m->opt.m1[i]) &&
                      isfinite(m->opt.m2[i]),
                  "%s: parameter, gradient or moment %zu is not finite", what,
                  i);
}

/* A count of exactly 2^53 (or 2^53 - 1, one step below) loads: the
 * optimiser's steps up to 2^53 are exact in double.  Its next
 * imml_optim_step is refused with IMML_ERR_STATE and changes nothing
 * (parameters, gradients, moments, count); every value stays finite; the
 * model saves and reloads at the bound; imml_optim_setup starts the count
 * again and the step goes through.  _i: bit 0 SGD with momentum instead of
 * AdamW, bit 1 start at 2^53 - 1 (one step succeeds, reaching 2^53). */
START_TEST(test_step_count_at_bound) {
  const int sgd = _i & 1, below = _i >> 1;
  const int64_t bound = (int64_t)1 << 53;
  spec sp = small_spec;
  sp.opt = sgd ? IMML_OPTIM_SGD : IMML_OPTIM_ADAMW;
  imml_model *orig = make_model(&sp);
  train(orig, &sp, 0, 3);
  size_t size;
  unsigned char *buf = save_to_mem(orig, &size, 0);
  layout L;
  walk_layout(buf, size, &L);
  wr64(buf, L.opt_t, (uint64_t)(below ? bound - 1 : bound));
  fix_crc(buf, size);
  imml_model *m = load_from_mem(buf, size, NULL);
  ck_assert_int_eq(m->opt.t, below ? bound - 1 : bound);
  if (below) {
    accumulate_one(m, 501);
    const imml_status st = imml_optim_step(m);
    ck_assert_msg(st == IMML_OK, "step from 2^53 - 1: %s",
                  imml_model_errmsg(m));
    ck_assert_int_eq(m->opt.t, bound);
    expect_finite_params(m, "after the step to 2^53");
  }
  accumulate_one(m, 502);
  for (int attempt = 0; attempt < 2; attempt++) {
    snap s0;
    snap_take(m, &s0);
    const imml_status st = imml_optim_step(m);
    ck_assert_msg(st == IMML_ERR_STATE,
                  "step at 2^53 (attempt %d): status %d (%s) '%s'", attempt,
                  (int)st, imml_status_string(st), imml_model_errmsg(m));
    ck_assert_msg(strstr(imml_model_errmsg(m), "2^53") != NULL, "'%s'",
                  imml_model_errmsg(m));
    expect_unchanged(m, &s0, "a step refused at 2^53");
    snap_free(&s0);
  }
  ck_assert_int_eq(m->opt.t, bound);
  expect_finite_params(m, "after the refused steps");
  /* it saves at the bound, and that checkpoint loads */
  size_t size2;
  unsigned char *buf2 = save_to_mem(m, &size2, 0);
  walk_layout(buf2, size2, &L);
  ck_assert_uint_eq(rd64(buf2, L.opt_t), (uint64_t)bound);
  imml_model *r = load_from_mem(buf2, size2, NULL);
  ck_assert_int_eq(r->opt.t, bound);
  imml_model_free(r);
  free(buf2);
  /* a new optimiser starts again from 0 */
  imml_optim_config oc = m->opt.cfg;
  ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
  ck_assert_int_eq(imml_optim_step(m), IMML_OK);
  ck_assert_int_eq(m->opt.t, 1);
  expect_finite_params(m, "after a new optimiser's first step");
  imml_model_free(m);
  free(buf);
  imml_model_free(orig);
}
END_TEST

/* Finding 2: loading what is not a regular file.  libimml 0.x opened the
 * path with fopen, which blocks on a FIFO without a writer until one
 * comes: imml_load never returned.  Every load here runs in a child
 * process with an alarm as a watchdog, so that a load that blocks fails
 * the test instead of hanging it; the child reports what the load
 * answered and what it allocated. */
#define LOAD_WATCHDOG_S 30

typedef struct load_report {
  int status, have_handle;
  long n_alloc;
  size_t max_req, n_other;
  long live_after_free;
  char msg[IMML_ERRMSG_SIZE];
} load_report;

static void child_load(const char *path, size_t expected, int fd) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = SIG_DFL;
  sigaction(SIGALRM, &sa, NULL);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGALRM);
  sigprocmask(SIG_UNBLOCK, &set, NULL);
  alarm(LOAD_WATCHDOG_S);
  load_report rep;
  memset(&rep, 0, sizeof rep);
  counter cnt;
  imml_load_options o;
  counting_options(&o, &cnt);
  cnt.expected = expected;
  imml_model *m = NULL;
  rep.status = (int)imml_model_load(path, NULL, &o, &m);
  rep.have_handle = m != NULL;
  snprintf(rep.msg, sizeof rep.msg, "%s", imml_model_errmsg(m));
  rep.n_alloc = cnt.n_alloc;
  rep.max_req = cnt.max_req;
  rep.n_other = (size_t)cnt.n_other;
  imml_model_free(m);
  rep.live_after_free = cnt.live;
  const unsigned char *p = (const unsigned char *)&rep;
  size_t done = 0;
  while (done < sizeof rep) {
    const ssize_t w = write(fd, p + done, sizeof rep - done);
    if (w <= 0)
      _exit(3);
    done += (size_t)w;
  }
  _exit(0);
}

/* imml_model_load(path) with the counting allocator (a request of
 * `expected` bytes is not counted in n_other), in a child process. */
static void load_in_child(const char *path, size_t expected, load_report *rep) {
  int fds[2];
  ck_assert_int_eq(pipe(fds), 0);
  fflush(stdout);
  fflush(stderr);
  const pid_t pid = fork();
  ck_assert_int_ge(pid, 0);
  if (pid == 0) {
    close(fds[0]);
    child_load(path, expected, fds[1]);
  }
  close(fds[1]);
  unsigned char *p = (unsigned char *)rep;
  size_t got = 0;
  for (;;) {
    const ssize_t r = read(fds[0], p + got, sizeof *rep - got);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      break;
    got += (size_t)r;
    if (got == sizeof *rep)
      break;
  }
  close(fds[0]);
  int ws = 0;
  while (waitpid(pid, &ws, 0) < 0 && errno == EINTR)
    ;
  ck_assert_msg(!(WIFSIGNALED(ws) && WTERMSIG(ws) == SIGALRM),
                "imml_model_load('%s') was still blocked after %d s", path,
                LOAD_WATCHDOG_S);
  ck_assert_msg(WIFEXITED(ws) && WEXITSTATUS(ws) == 0 && got == sizeof *rep,
                "the loading child failed (wait status 0x%x, %zu bytes of "
                "report)",
                (unsigned)ws, got);
}

/* A refusal of a non-regular file: IMML_ERR_IO, a message naming the path
 * and the kind of object, and nothing allocated but the failed handle. */
static void expect_not_regular(const load_report *rep, const char *path,
                               const char *kind, const char *label) {
  ck_assert_msg(rep->status == IMML_ERR_IO, "%s: status %d (%s) '%s'", label,
                rep->status, imml_status_string((imml_status)rep->status),
                rep->msg);
  ck_assert_msg(rep->have_handle, "%s: no failed handle", label);
  ck_assert_msg(strstr(rep->msg, path) != NULL &&
                    strstr(rep->msg, kind) != NULL,
                "%s: the message names neither '%s' nor '%s': '%s'", label,
                path, kind, rep->msg);
  ck_assert_msg(rep->n_alloc == 1 && rep->max_req == sizeof(struct imml_model),
                "%s: %ld allocations (largest %zu bytes): only the failed "
                "handle expected",
                label, rep->n_alloc, rep->max_req);
  ck_assert_msg(rep->live_after_free == 0, "%s: %ld blocks leaked", label,
                rep->live_after_free);
}

/* _i: 0 a FIFO without a writer; 1 a FIFO holding a whole valid
 * checkpoint, its writer still open (the bytes stay in it: the loader
 * reads nothing); 2 a symbolic link to a FIFO; 3 a directory; 4 /dev/null
 * (a character device); 5 a UNIX socket (open fails: "cannot open"); 6 a
 * symbolic link to a valid checkpoint, which loads. */
START_TEST(test_load_not_regular_file) {
  char dir[512], path[600], target[600], label[64];
  make_tmpdir(dir, sizeof dir, "imml-ckpt-");
  snprintf(path, sizeof path, "%s/object", dir);
  snprintf(target, sizeof target, "%s/target", dir);
  snprintf(label, sizeof label, "case %d", _i);
  size_t size;
  unsigned char *buf = small_checkpoint(&size, 0, NULL);
  load_report rep;
  int wfd = -1;
  switch (_i) {
  case 0:
    ck_assert_int_eq(mkfifo(path, 0600), 0);
    load_in_child(path, 0, &rep);
    expect_not_regular(&rep, path, "FIFO", "a FIFO without a writer");
    break;
  case 1: {
    ck_assert_int_eq(mkfifo(path, 0600), 0);
    /* O_RDWR: a writer that does not wait for a reader (Linux) */
    wfd = open(path, O_RDWR | O_NONBLOCK);
    ck_assert_int_ge(wfd, 0);
    ck_assert_int_eq(write(wfd, buf, size), (ssize_t)size);
    load_in_child(path, 0, &rep);
    expect_not_regular(&rep, path, "FIFO", "a FIFO holding a checkpoint");
    unsigned char *back = xcalloc(size + 1, 1);
    ck_assert_int_eq(read(wfd, back, size + 1), (ssize_t)size);
    ck_assert_msg(memcmp(back, buf, size) == 0,
                  "the refused load consumed bytes of the FIFO");
    free(back);
    close(wfd);
    break;
  }
  case 2:
    ck_assert_int_eq(mkfifo(target, 0600), 0);
    ck_assert_int_eq(symlink(target, path), 0);
    load_in_child(path, 0, &rep);
    expect_not_regular(&rep, path, "FIFO", "a link to a FIFO");
    break;
  case 3:
    ck_assert_int_eq(mkdir(path, 0700), 0);
    load_in_child(path, 0, &rep);
    expect_not_regular(&rep, path, "directory", "a directory");
    break;
  case 4: {
    struct stat sb;
    ck_assert_int_eq(stat("/dev/null", &sb), 0);
    ck_assert(S_ISCHR(sb.st_mode));
    load_in_child("/dev/null", 0, &rep);
    expect_not_regular(&rep, "/dev/null", "character device", "/dev/null");
    break;
  }
  case 5: {
    const int s = socket(AF_UNIX, SOCK_STREAM, 0);
    ck_assert_int_ge(s, 0);
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    ck_assert_uint_lt(strlen(path), sizeof sa.sun_path);
    memcpy(sa.sun_path, path, strlen(path) + 1);
    ck_assert_int_eq(bind(s, (struct sockaddr *)&sa, sizeof sa), 0);
    ck_assert_int_eq(listen(s, 1), 0);
    load_in_child(path, 0, &rep);
    close(s);
    /* open() itself fails (ENXIO): the same status, the path named */
    expect_not_regular(&rep, path, "cannot open", "a UNIX socket");
    break;
  }
  default:
    write_file(target, buf, size);
    ck_assert_int_eq(symlink(target, path), 0);
    load_in_child(path, size, &rep);
    ck_assert_msg(rep.status == IMML_OK, "a link to a checkpoint: %d '%s'",
                  rep.status, rep.msg);
    ck_assert_int_eq(rep.live_after_free, 0);
    break;
  }
  free(buf);
  remove_tree(dir);
}
END_TEST

/* Finding 3: a file is judged by its header and its size before its body
 * is read.  libimml 0.x allocated and read the whole file first: 64 MiB of
 * zeros cost a 64 MiB allocation before the 8-byte magic was looked at.
 * Every file here is refused with nothing allocated but the failed handle
 * (the counting allocator refuses anything over 1 MiB besides, which would
 * turn a large allocation into IMML_ERR_NOMEM).  Large files are sparse
 * (ftruncate), so they cost no disk.  _i: 0 64 MiB of zeros; 1 a valid
 * header declaring a 64 MiB payload, loaded under a 1 MiB memory_limit;
 * 2 a valid checkpoint and one trailing byte; 3 a valid checkpoint and
 * 64 MiB of trailing zeros; 4 a valid checkpoint without its last byte;
 * 5 a valid checkpoint cut to 100 bytes; 6 a 28-byte header declaring a
 * payload of 2^64 - 1 bytes; 7 a 4 GiB file whose header declares a
 * payload exactly 2^32 bytes smaller than the file holds (sizes truncated
 * to 32 bits would agree). */
#define BIG_FILE ((off_t)64 << 20)

static void sparse_file(const char *path, const void *head, size_t n,
                        off_t size) {
  const int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  ck_assert_int_ge(fd, 0);
  if (n)
    ck_assert_int_eq(write(fd, head, n), (ssize_t)n);
  ck_assert_int_eq(ftruncate(fd, size), 0);
  ck_assert_int_eq(close(fd), 0);
}

START_TEST(test_load_checks_size_first) {
  char dir[512], path[600], err[256], label[64];
  make_tmpdir(dir, sizeof dir, "imml-ckpt-");
  snprintf(path, sizeof path, "%s/model.imml", dir);
  snprintf(label, sizeof label, "case %d", _i);
  size_t size;
  unsigned char *buf = small_checkpoint(&size, 0, NULL);
  unsigned char hdr[28];
  memcpy(hdr, buf, 24);
  imml_status want = IMML_ERR_FORMAT;
  const char *needle = "trailing";
  size_t limit = IMML_MEMORY_LIMIT_DEFAULT;
  switch (_i) {
  case 0:
    sparse_file(path, NULL, 0, BIG_FILE);
    want = IMML_ERR_BAD_MAGIC;
    needle = "magic";
    break;
  case 1:
    wr64(hdr, 16, (uint64_t)BIG_FILE - 28);
    sparse_file(path, hdr, 24, BIG_FILE);
    want = IMML_ERR_TOO_LARGE;
    needle = "load_options.memory_limit";
    limit = (size_t)1 << 20;
    break;
  case 2:
    sparse_file(path, buf, size, (off_t)size + 1);
    break;
  case 3:
    sparse_file(path, buf, size, (off_t)size + BIG_FILE);
    break;
  case 4:
    write_file(path, buf, size - 1);
    want = IMML_ERR_TRUNCATED;
    needle = "payload size";
    break;
  case 5:
    write_file(path, buf, 100);
    want = IMML_ERR_TRUNCATED;
    needle = "payload size";
    break;
  case 6:
    wr64(hdr, 16, UINT64_MAX);
    wr32(hdr, 24, 0);
    write_file(path, hdr, 28);
    want = IMML_ERR_TRUNCATED;
    needle = "payload size";
    break;
  default:
    wr64(hdr, 16, 28);
    sparse_file(path, hdr, 24, ((off_t)1 << 32) + 56);
    break;
  }
  counter cnt;
  imml_load_options o;
  counting_options(&o, &cnt);
  o.memory_limit = limit;
  imml_model *m = NULL;
  const imml_status st = imml_model_load(path, NULL, &o, &m);
  ck_assert_msg(st == want, "%s: status %d (%s), expected %d: '%s'", label,
                (int)st, imml_status_string(st), (int)want,
                imml_model_errmsg(m));
  ck_assert_msg(cnt.n_alloc == 1 && cnt.n_other == 0 &&
                    cnt.max_req == sizeof(struct imml_model),
                "%s: %ld allocations, largest %zu bytes, before the refusal "
                "(only the failed handle expected): '%s'",
                label, cnt.n_alloc, cnt.max_req, imml_model_errmsg(m));
  failed_handle(m, st, &cnt, err, sizeof err, label);
  ck_assert_msg(strstr(err, needle) != NULL, "%s: '%s' does not say '%s'",
                label, err, needle);
  free(buf);
  remove_tree(dir);
}
END_TEST

/* Finding 4: sizes that the file does not scale.  A checkpoint of 42,576
 * bytes (AdamW) with max_batch crafted to 2^17 (inside max_batch's own
 * limit, CRC recomputed) made libimml 0.x ask its allocator for
 * 1,099,898,595,584 bytes.  With the default load options (memory_limit 8 GiB)
 * it is refused with IMML_ERR_TOO_LARGE naming load_options.memory_limit and
 * its value, before anything of the model is allocated: from memory nothing but
 * the failed handle, from a file the file's own bytes besides. _i: 0 max_batch
 * 2^17 from memory, 1 the same from a file, 2 max_batch 2^20 (the field's
 * own limit) from memory, 3 dict_size 2^20 from memory under a 64 MiB
 * memory_limit (its ~0.3 GB arena fits the default). */
START_TEST(test_load_crafted_batch_budget) {
  static const int dims[2] = {16, 8};
  imml_config c;
  imml_config_init(&c);
  c.dims = dims;
  c.hidden_dim = 40;
  c.knowledge_dim = 16;
  c.n_classes = 2;
  c.max_batch = 4;
  c.dict_size = 8;
  imml_model *orig = create_ok(&c, NULL);
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
  ck_assert_int_eq(imml_optim_setup(orig, &oc), IMML_OK);
  size_t size;
  unsigned char *buf = save_to_mem(orig, &size, 0);
  imml_model_free(orig);
  ck_assert_msg(size > 38000 && size < 46000, "the checkpoint is %zu bytes",
                size);
  /* unchanged, it loads under the default options without a request
   * larger than the counting allocator's 1 MiB */
  counter cnt;
  imml_load_options o;
  counting_options(&o, &cnt);
  imml_model *m = NULL;
  ck_assert_int_eq(imml_model_load_mem(buf, size, NULL, &o, &m), IMML_OK);
  imml_model_free(m);
  ck_assert_int_eq(cnt.live, 0);
  /* the offsets of max_batch, dict_size and the dictionary position, for
   * M = 2 (walk_layout's) */
  const size_t at_batch = 24 + 4 + 8 + 12, at_dict = at_batch + 4;
  ck_assert_uint_eq(rd32(buf, at_batch), 4);
  ck_assert_uint_eq(rd32(buf, at_dict), 8);
  const int via_file = _i == 1;
  if (_i <= 1)
    wr32(buf, at_batch, 1u << 17);
  else if (_i == 2)
    wr32(buf, at_batch, 1u << 20);
  else
    wr32(buf, at_dict, 1u << 20); /* fill 0 = position 0: still valid */
  fix_crc(buf, size);
  counting_options(&o, &cnt);
  if (_i == 3)
    o.memory_limit = (size_t)64 << 20;
  char dir[512] = "", path[600], err[256], label[64];
  snprintf(label, sizeof label, "case %d", _i);
  m = NULL;
  imml_status st;
  if (via_file) {
    make_tmpdir(dir, sizeof dir, "imml-ckpt-");
    snprintf(path, sizeof path, "%s/budget.imml", dir);
    write_file(path, buf, size);
    cnt.expected = size;
    st = imml_model_load(path, NULL, &o, &m);
  } else {
    st = imml_model_load_mem(buf, size, NULL, &o, &m);
  }
  ck_assert_msg(st == IMML_ERR_TOO_LARGE, "%s: status %d (%s) '%s'", label,
                (int)st, imml_status_string(st), imml_model_errmsg(m));
  const size_t handle = sizeof(struct imml_model);
  ck_assert_msg(cnt.n_other == 0 && cnt.n_alloc == 1 + via_file &&
                    cnt.max_req <= (via_file && size > handle ? size : handle),
                "%s: %ld allocations (%ld of neither a handle nor the file), "
                "largest %zu bytes",
                label, cnt.n_alloc, cnt.n_other, cnt.max_req);
  failed_handle(m, st, &cnt, err, sizeof err, label);
  /* 2^20 rows: the memory_limit, or a size limit of the config's that
   * names the field, refuses them */
  char want[80];
  if (_i == 2)
    snprintf(want, sizeof want, "%s",
             strstr(err, "memory_limit") ? "load_options.memory_limit"
                                         : "max_batch");
  else
    snprintf(want, sizeof want, "load_options.memory_limit = %zu bytes",
             o.memory_limit);
  ck_assert_msg(strstr(err, want) != NULL, "%s: '%s' does not say '%s'", label,
                err, want);
  if (dir[0])
    remove_tree(dir);
  free(buf);
}
END_TEST

static Suite *checkpoint_suite(void) {
  Suite *s = suite_create("checkpoint");
  TCase *tc = tcase_create("roundtrip");
  tcase_add_test(tc, test_reference_crc);
  tcase_add_loop_test(tc, test_roundtrip_mem, 0, N_RT);
  tcase_add_loop_test(tc, test_roundtrip_file, 0, N_RT);
  tcase_add_loop_test(tc, test_exact_resume, 0, N_RESUME);
  suite_add_tcase(s, tc);
  tc = tcase_create("corruption");
  tcase_add_loop_test(tc, test_every_byte_flip_rejected, 0, 3);
  tcase_add_test(tc, test_every_truncation_rejected);
  tcase_add_test(tc, test_malformed_header);
  tcase_add_loop_test(tc, test_crafted_with_valid_crc, 0, N_CRAFTED);
  tcase_add_loop_test(tc, test_crafted_huge_batch_fails_cleanly, 0, 2);
  tcase_add_test(tc, test_callbacks_required_and_refused);
  suite_add_tcase(s, tc);
  tc = tcase_create("files");
  tcase_add_test(tc, test_load_io_errors);
  tcase_add_test(tc, test_load_directory_is_io_error);
  tcase_add_loop_test(tc, test_load_validates_options_first, 0, 2);
  tcase_add_test(tc, test_atomic_save);
  suite_add_tcase(s, tc);
  tc = tcase_create("api_1_0");
  tcase_add_loop_test(tc, test_save_refused_uncommitted, 0, 2);
  tcase_add_loop_test(tc, test_predominant_set_saved, 0, 4);
  tcase_add_loop_test(tc, test_load_memory_limit, 0, 4);
  tcase_add_loop_test(tc, test_load_options_newer_struct, 0, 17);
  suite_add_tcase(s, tc);
  tc = tcase_create("hostile");
  tcase_add_loop_test(tc, test_step_count_over_bound_refused, 0, N_STEPS_OVER);
  tcase_add_loop_test(tc, test_step_count_at_bound, 0, 4);
  tcase_add_loop_test(tc, test_load_not_regular_file, 0, 7);
  tcase_add_loop_test(tc, test_load_checks_size_first, 0, 8);
  tcase_add_loop_test(tc, test_load_crafted_batch_budget, 0, 4);
  suite_add_tcase(s, tc);
  tc = tcase_create("threads");
  tcase_add_test(tc, test_concurrent_predict);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) { return imml_run_suite(checkpoint_suite()); }
