/* Helpers shared by the Check suites.  Each test_*.c is an executable of its
 * own and uses only some of them, so they are all static inline:
 *
 * - the test-data generator (splitmix64), independent of the library's own
 *   generator (test_properties.c keeps its own reference xoshiro on purpose);
 * - xcalloc, a calloc that fails the test instead of returning NULL;
 * - same_f and same_optim_config, bit-for-bit comparisons;
 * - batch: M feature matrices and their labels on the heap, drawn from a
 *   drng stream (test_checkpoint.c and test_threads.c keep fixed-size
 *   batches of their own, fixed_batch);
 * - a temporary directory and whole files in it;
 * - snap: a model's whole mutable state, for "a failed call (or an
 *   evaluation) changes nothing" and "two models trained alike are alike". */
#ifndef IMML_TESTS_COMMON_H
#define IMML_TESTS_COMMON_H

#define IMML_EXPERIMENTAL
#include "imml.h"
#include "internal.h"

#include <check.h>
#include <dirent.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ------------------------------------------------------------------ */
/* Deterministic test data                                             */
/* ------------------------------------------------------------------ */

/* One step of splitmix64. */
static inline uint64_t splitmix64(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

/* Uniform in [-1, 1), from the top 53 bits of one step. */
static inline float splitmix_unif(uint64_t *s) {
  return (float)((double)(splitmix64(s) >> 11) * 0x1p-52 - 1.0);
}

/* A splitmix64 stream: drng r = {seed}. */
typedef struct drng {
  uint64_t s;
} drng;

static inline uint64_t drng_u64(drng *r) { return splitmix64(&r->s); }

/* Uniform in [-1, 1), from the top 24 bits of one step. */
static inline float drng_unif(drng *r) {
  return (float)((double)(drng_u64(r) >> 40) * 0x1.0p-24 * 2.0 - 1.0);
}

/* ------------------------------------------------------------------ */
/* Allocation and comparison                                           */
/* ------------------------------------------------------------------ */

/* Zeroed memory for n elements of size bytes (at least one byte). */
static inline void *xcalloc(size_t n, size_t size) {
  void *p = calloc(n ? n : 1, size ? size : 1);
  ck_assert_ptr_nonnull(p);
  return p;
}

/* The same bits (so -0 differs from +0, and a NaN equals itself). */
static inline int same_f(float a, float b) {
  return memcmp(&a, &b, sizeof a) == 0;
}

static inline int same_optim_config(const imml_optim_config *x,
                                    const imml_optim_config *y) {
  return x->kind == y->kind && same_f(x->lr, y->lr) &&
         same_f(x->weight_decay, y->weight_decay) &&
         same_f(x->momentum, y->momentum) && x->nesterov == y->nesterov &&
         same_f(x->beta1, y->beta1) && same_f(x->beta2, y->beta2) &&
         same_f(x->eps, y->eps) && same_f(x->clip_norm, y->clip_norm);
}

/* ------------------------------------------------------------------ */
/* A counting allocator that can fail on request                       */
/* ------------------------------------------------------------------ */

/* Allocator hooks (imml_allocator) that count calls, blocks and bytes and
 * can refuse the fail_at-th call (and, with fail_rest, every later one).
 * Every block carries a header, so a pointer that did not come from these
 * hooks is detected in fa_free (and a hook block given to free() crashes),
 * and a trailing canary, so a write past a block's end is counted.
 * Used by test_faults.c, test_model.c and test_distributed.c. */
#define FA_HDR 64
#define FA_TAIL 4096 /* canary bytes after every block */
#define FA_CANARY 0xA5
#define FA_MAGIC 0x4641554c54414c4cULL

typedef struct fail_alloc {
  long calls;     /* malloc_fn calls so far (failed ones included) */
  long fail_at;   /* 1-based call number to fail; 0: never */
  int fail_rest;  /* also fail every call after fail_at */
  long failed;    /* calls answered with NULL */
  long mallocs;   /* successful allocations */
  long frees;     /* blocks given back */
  long bad_frees; /* pointers that did not come from this allocator */
  long overruns;  /* blocks whose trailing canary was overwritten */
  size_t live;    /* bytes outstanding */
  size_t max_req; /* largest request */
} fail_alloc;

static inline void *fa_malloc(size_t size, void *ud) {
  fail_alloc *c = ud;
  c->calls++;
  if (size > c->max_req)
    c->max_req = size;
  if (c->fail_at > 0 &&
      (c->calls == c->fail_at || (c->fail_rest && c->calls > c->fail_at))) {
    c->failed++;
    return NULL;
  }
  if (size > ((size_t)1 << 40))
    return NULL; /* beyond any machine this runs on */
  unsigned char *p = malloc(size + FA_HDR + FA_TAIL);
  if (!p)
    return NULL;
  const uint64_t magic = FA_MAGIC;
  memcpy(p, &magic, sizeof magic);
  memcpy(p + 8, &size, sizeof size);
  memset(p + FA_HDR + size, FA_CANARY, FA_TAIL);
  c->mallocs++;
  c->live += size;
  return p + FA_HDR;
}

static inline void fa_free(void *ptr, void *ud) {
  fail_alloc *c = ud;
  if (!ptr)
    return;
  unsigned char *p = (unsigned char *)ptr - FA_HDR;
  uint64_t magic;
  memcpy(&magic, p, sizeof magic);
  if (magic != FA_MAGIC) {
    c->bad_frees++;
    return;
  }
  size_t size;
  memcpy(&size, p + 8, sizeof size);
  for (size_t i = 0; i < FA_TAIL; i++)
    if (p[FA_HDR + size + i] != FA_CANARY) {
      c->overruns++;
      break;
    }
  magic = 0;
  memcpy(p, &magic, sizeof magic);
  c->frees++;
  c->live -= size;
  free(p);
}

static inline imml_allocator fa_hooks(fail_alloc *c) {
  imml_allocator a;
  a.malloc_fn = fa_malloc;
  a.free_fn = fa_free;
  a.user_data = c;
  return a;
}

static inline void fa_reset(fail_alloc *c) { memset(c, 0, sizeof *c); }

/* ------------------------------------------------------------------ */
/* Batches                                                             */
/* ------------------------------------------------------------------ */

/* One batch: M feature matrices (B x dims[m], row-major) and B labels. */
typedef struct batch {
  int M, B;
  int dims[IMML_MAX_MODALITIES];
  float *x[IMML_MAX_MODALITIES];
  int *y;
} batch;

/* Zeroed features and labels. */
static inline void batch_alloc(batch *b, int M, const int *dims, int B) {
  memset(b, 0, sizeof *b);
  b->M = M;
  b->B = B;
  for (int m = 0; m < M; m++) {
    b->dims[m] = dims[m];
    b->x[m] = xcalloc((size_t)B * (size_t)dims[m], sizeof(float));
  }
  b->y = xcalloc((size_t)B, sizeof(int));
}

/* Features scale * uniform [-1, 1), modality after modality, then labels
 * uniform in 0..C-1, all drawn from r. */
static inline void batch_random_scaled(batch *b, int M, const int *dims, int B,
                                       int C, drng *r, float scale) {
  batch_alloc(b, M, dims, B);
  for (int m = 0; m < M; m++)
    for (int i = 0; i < B * dims[m]; i++)
      b->x[m][i] = scale * drng_unif(r);
  for (int i = 0; i < B; i++)
    b->y[i] = (int)(drng_u64(r) % (uint64_t)C);
}

/* Features uniform in [-1, 1) (scale 1 is exact: the same bits). */
static inline void batch_random(batch *b, int M, const int *dims, int B, int C,
                                drng *r) {
  batch_random_scaled(b, M, dims, B, C, r, 1.0f);
}

static inline void batch_free(batch *b) {
  for (int m = 0; m < b->M; m++)
    free(b->x[m]);
  free(b->y);
  memset(b, 0, sizeof *b);
}

/* The features as imml_forward takes them. */
static inline const float *const *feats(const batch *b) {
  return (const float *const *)b->x;
}

/* Zeroed input gradients shaped like b's features. */
static inline void dfeat_alloc(float **dh, const batch *b) {
  for (int m = 0; m < b->M; m++)
    dh[m] = xcalloc((size_t)b->B * (size_t)b->dims[m], sizeof(float));
}

static inline void dfeat_free(float **dh, int M) {
  for (int m = 0; m < M; m++) {
    free(dh[m]);
    dh[m] = NULL;
  }
}

/* ------------------------------------------------------------------ */
/* Temporary directories and files                                     */
/* ------------------------------------------------------------------ */

/* A new directory $TMPDIR/<prefix>XXXXXX (/tmp without TMPDIR). */
static inline void make_tmpdir(char *dir, size_t n, const char *prefix) {
  const char *base = getenv("TMPDIR");
  snprintf(dir, n, "%s/%sXXXXXX", base && *base ? base : "/tmp", prefix);
  ck_assert_ptr_nonnull(mkdtemp(dir));
}

/* dir and everything below it (a missing dir is no error). */
static inline void remove_tree(const char *dir) {
  DIR *d = opendir(dir);
  if (!d)
    return;
  struct dirent *e;
  char path[1024];
  while ((e = readdir(d)) != NULL) {
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
      continue;
    const int len = snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
    if (len < 0 || (size_t)len >= sizeof path)
      continue; /* not a name of this entry: leave it */
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISDIR(st.st_mode))
      remove_tree(path);
    else
      unlink(path);
  }
  closedir(d);
  rmdir(dir);
}

/* The whole file, on the heap (free it); its length in *size. */
static inline unsigned char *read_file(const char *path, size_t *size) {
  FILE *f = fopen(path, "rb");
  ck_assert_msg(f != NULL, "cannot open %s", path);
  ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
  const long len = ftell(f);
  ck_assert_int_ge(len, 0);
  ck_assert_int_eq(fseek(f, 0, SEEK_SET), 0);
  unsigned char *buf = xcalloc((size_t)len, 1);
  ck_assert_uint_eq(fread(buf, 1, (size_t)len, f), (size_t)len);
  fclose(f);
  *size = (size_t)len;
  return buf;
}

/* path holds exactly size bytes of buf (created or truncated). */
static inline void write_file(const char *path, const void *buf, size_t size) {
  FILE *f = fopen(path, "wb");
  ck_assert_ptr_nonnull(f);
  if (size)
    ck_assert_uint_eq(fwrite(buf, 1, size, f), size);
  ck_assert_int_eq(fclose(f), 0);
}

/* ------------------------------------------------------------------ */
/* Model snapshots                                                     */
/* ------------------------------------------------------------------ */

/* Everything a failed call (or an evaluation) must leave bit-identical:
 * parameters, gradients, the whole dictionary, its fill and position, the
 * predominant and warm-up state, whether a training step is pending, and
 * the optimiser: presence, configuration, step count, momentum flag and
 * moments.  Also where the optimiser's buffers are, which only a
 * comparison with the same model (expect_unchanged) looks at. */
typedef struct snap {
  size_t n, ndict;
  float *params, *grads, *dict, *m1, *m2;
  int fill, pos, p, fixed, steps, pending, staged, opt_active, has_buf;
  int64_t opt_t;
  imml_optim_config ocfg;
  float ema[IMML_MAX_MODALITIES];
  const void *opt_block;
  const float *opt_m1, *opt_m2;
} snap;

/* The snapshot's own (successful) API calls clear imml_model_errmsg(m). */
static inline void snap_take(imml_model *m, snap *s) {
  float *d = NULL, *g = NULL;
  memset(s, 0, sizeof *s);
  ck_assert_int_eq(imml_param_flat(m, &d, &g, &s->n), IMML_OK);
  s->params = xcalloc(s->n, sizeof(float));
  s->grads = xcalloc(s->n, sizeof(float));
  memcpy(s->params, d, s->n * sizeof(float));
  memcpy(s->grads, g, s->n * sizeof(float));
  s->ndict = (size_t)m->cfg.dict_size * (size_t)m->cfg.n_modalities *
             (size_t)m->cfg.knowledge_dim;
  s->dict = xcalloc(s->ndict, sizeof(float));
  memcpy(s->dict, m->dict, s->ndict * sizeof(float));
  s->fill = imml_fdc_dict_fill(m);
  s->pos = m->dict_pos;
  s->pending = m->pending;
  s->staged = m->acc.micro;
  ck_assert_int_eq(imml_predominant_get(m, &s->p, &s->fixed), IMML_OK);
  ck_assert_int_eq(imml_warmup_get(m, &s->steps, s->ema), IMML_OK);
  s->opt_active = m->opt.active;
  s->opt_t = m->opt.t;
  s->has_buf = m->opt.has_buf;
  s->ocfg = m->opt.cfg;
  s->opt_block = m->opt.block;
  s->opt_m1 = m->opt.m1;
  s->opt_m2 = m->opt.m2;
  if (m->opt.active) {
    s->m1 = xcalloc(s->n, sizeof(float));
    s->m2 = xcalloc(s->n, sizeof(float));
    memcpy(s->m1, m->opt.m1, s->n * sizeof(float));
    memcpy(s->m2, m->opt.m2, s->n * sizeof(float));
  }
}

static inline void snap_free(snap *s) {
  free(s->params);
  free(s->grads);
  free(s->dict);
  free(s->m1);
  free(s->m2);
  memset(s, 0, sizeof *s);
}

/* a and b hold the same state (of one model at two times, or of two). */
static inline void snap_check(const snap *a, const snap *b, const char *what) {
  ck_assert_msg(a->n == b->n, "%s: parameter count changed", what);
  ck_assert_msg(memcmp(a->params, b->params, a->n * sizeof(float)) == 0,
                "%s: parameters changed", what);
  ck_assert_msg(memcmp(a->grads, b->grads, a->n * sizeof(float)) == 0,
                "%s: gradients changed", what);
  ck_assert_msg(a->ndict == b->ndict &&
                    memcmp(a->dict, b->dict, a->ndict * sizeof(float)) == 0,
                "%s: dictionary contents changed", what);
  ck_assert_msg(a->fill == b->fill, "%s: dictionary fill %d -> %d", what,
                a->fill, b->fill);
  ck_assert_msg(a->pos == b->pos, "%s: dictionary position %d -> %d", what,
                a->pos, b->pos);
  ck_assert_msg(a->p == b->p && a->fixed == b->fixed,
                "%s: predominant (%d,%d) -> (%d,%d)", what, a->p, a->fixed,
                b->p, b->fixed);
  ck_assert_msg(a->steps == b->steps, "%s: warm-up steps %d -> %d", what,
                a->steps, b->steps);
  ck_assert_msg(memcmp(a->ema, b->ema, sizeof a->ema) == 0,
                "%s: warm-up EMAs changed", what);
  ck_assert_msg(a->pending == b->pending, "%s: pending step %d -> %d", what,
                a->pending, b->pending);
  ck_assert_msg(a->staged == b->staged,
                "%s: uncommitted micro-batches %d -> %d", what, a->staged,
                b->staged);
  ck_assert_msg(a->opt_active == b->opt_active,
                "%s: optimiser presence %d -> %d", what, a->opt_active,
                b->opt_active);
  ck_assert_msg(same_optim_config(&a->ocfg, &b->ocfg),
                "%s: optimiser configuration changed", what);
  ck_assert_msg(a->opt_t == b->opt_t && a->has_buf == b->has_buf,
                "%s: optimiser step %lld -> %lld, has_buf %d -> %d", what,
                (long long)a->opt_t, (long long)b->opt_t, a->has_buf,
                b->has_buf);
  if (a->opt_active) {
    ck_assert_msg(memcmp(a->m1, b->m1, a->n * sizeof(float)) == 0,
                  "%s: first moment changed", what);
    ck_assert_msg(memcmp(a->m2, b->m2, a->n * sizeof(float)) == 0,
                  "%s: second moment changed", what);
  }
}

/* Takes a snapshot of m and compares it with *before, taken of m too. */
static inline void expect_unchanged(imml_model *m, const snap *before,
                                    const char *what) {
  snap now;
  snap_take(m, &now);
  snap_check(before, &now, what);
  ck_assert_msg(now.opt_block == before->opt_block &&
                    now.opt_m1 == before->opt_m1 &&
                    now.opt_m2 == before->opt_m2,
                "%s: optimiser buffers moved", what);
  snap_free(&now);
}

/* A model from the config (and host F&T, or NULL), or a failed test that
 * says why. */
static inline imml_model *create_ok(const imml_config *c,
                                    const imml_ft_ops *ft) {
  imml_model *m = NULL;
  const imml_status st = imml_model_create(c, ft, &m);
  ck_assert_msg(st == IMML_OK, "imml_model_create: %d %s", (int)st,
                imml_model_errmsg(m));
  ck_assert_ptr_nonnull(m);
  return m;
}

/* A create that must fail with `want`: returns the failed handle's message
 * (copied into msg) after checking that the handle exists, then frees it. */
static inline void create_fails(const imml_config *c, const imml_ft_ops *ft,
                                imml_status want, char *msg, size_t n) {
  imml_model *m = NULL;
  const imml_status st = imml_model_create(c, ft, &m);
  ck_assert_msg(st == want, "imml_model_create: %d, expected %d (%s)", (int)st,
                (int)want, imml_model_errmsg(m));
  ck_assert_msg(m != NULL || st == IMML_ERR_NOMEM,
                "a failed create returned no handle");
  ck_assert_msg(imml_model_errmsg(m)[0] != '\0',
                "a failed create left no message");
  if (msg && n)
    snprintf(msg, n, "%s", imml_model_errmsg(m));
  imml_model_free(m);
}

/* imml_backward that must succeed (one micro-batch, not committed). */
static inline void backward_only_ok(imml_model *m, float *const *dh) {
  const imml_status st = imml_backward(m, dh);
  ck_assert_msg(st == IMML_OK, "backward: %d %s", (int)st,
                imml_model_errmsg(m));
}

/* A whole K = 1 training step after its forward: imml_backward, then
 * imml_commit (the 0.x imml_backward). */
static inline void backward_ok(imml_model *m, float *const *dh) {
  backward_only_ok(m, dh);
  const imml_status st = imml_commit(m);
  ck_assert_msg(st == IMML_OK, "commit: %d %s", (int)st, imml_model_errmsg(m));
}

#endif
