/* Faults (the reliability issue, doc/RELIABILITY.md): allocation failure
 * of the Nth allocation of every allocating call (create, load from memory
 * and from a file, share, optimiser set-up, collective, save) with nothing
 * leaked and the model bit-identical afterwards; a failed create, load or
 * share returns a failed handle allocated through the same allocator
 * (none when that allocation fails too), and once it is freed every byte
 * is returned; NaN and Inf produced inside the computation (an exploding
 * learning rate, overflowing gradients, non-finite host callback outputs),
 * each refused as a whole; garbage from the other ranks of a collective,
 * and the first collective step on an empty dictionary;
 * imml_unimodal_get's states; a checkpoint state that would load but never
 * train; and absurd sizes refused before any allocation but the failed
 * handle's.
 *
 * Every allocation goes through a counting hook whose blocks carry a
 * header and trailing canaries, so a leak, a double free, an overrun or a
 * block freed through the wrong allocator is seen here as well as by
 * ASan/LeakSanitizer and valgrind. */
/* flock(): BSD and Linux, outside POSIX */
#define _DEFAULT_SOURCE

#include "check_main.h"
#include "common.h"

#include "imml.h"
#include "internal.h"

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------ */
/* Helpers                                                             */
/* ------------------------------------------------------------------ */

static const int dims2[2] = {5, 7};
static const int dims3[3] = {4, 6, 3};

static void small_cfg(imml_config *c, int M, const int *dims) {
  imml_config_init(c);
  c->n_modalities = M;
  c->dims = dims;
  c->hidden_dim = 8;
  c->knowledge_dim = 4;
  c->n_classes = 3;
  c->max_batch = 6;
  c->dict_size = 10;
  c->warmup_steps = 2;
  c->seed = 5;
}

static void adamw(imml_model *m) {
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
  oc.lr = 1e-2f;
  ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
}

/* One complete training step on a batch drawn from r: forward, backward,
 * commit, and (with_step) imml_optim_step. */
static void train_step(imml_model *m, drng *r, int with_step) {
  imml_config c;
  imml_config_init(&c);
  ck_assert_int_eq(imml_model_get_config(m, &c), IMML_OK);
  batch b;
  batch_random(&b, c.n_modalities, c.dims, 1 + (int)(drng_u64(r) % 6),
               c.n_classes, r);
  imml_status st =
      imml_forward(m, IMML_MODE_TRAIN, b.B, feats(&b), b.y, NULL, NULL);
  ck_assert_msg(st == IMML_OK, "forward: %d %s", (int)st, imml_model_errmsg(m));
  backward_ok(m, NULL);
  if (with_step) {
    st = imml_optim_step(m);
    ck_assert_msg(st == IMML_OK, "step: %d %s", (int)st, imml_model_errmsg(m));
  }
  batch_free(&b);
}

/* A heap copy of the model's checkpoint. */
static unsigned char *save_to_mem(imml_model *m, size_t *size) {
  size_t need = 0;
  ck_assert_int_eq(imml_model_save_mem(m, NULL, 0, &need), IMML_OK);
  unsigned char *buf = xcalloc(need, 1);
  ck_assert_int_eq(imml_model_save_mem(m, buf, need, size), IMML_OK);
  ck_assert_uint_eq(*size, need);
  return buf;
}

static int same_checkpoint(imml_model *m, const unsigned char *buf,
                           size_t size) {
  size_t n;
  unsigned char *now = save_to_mem(m, &n);
  const int same = n == size && memcmp(now, buf, size) == 0;
  free(now);
  return same;
}

/* Every parameter, gradient, moment and dictionary entry is finite. */
static void expect_all_finite(imml_model *m, const char *what) {
  float *p, *g;
  size_t n;
  ck_assert_int_eq(imml_param_flat(m, &p, &g, &n), IMML_OK);
  for (size_t i = 0; i < n; i++) {
    ck_assert_msg(isfinite(p[i]) && isfinite(g[i]),
                  "%s: parameter/gradient %zu is %g/%g", what, i, (double)p[i],
                  (double)g[i]);
    if (m->opt.active)
      ck_assert_msg(isfinite(m->opt.m1[i]) && isfinite(m->opt.m2[i]),
                    "%s: moment %zu is not finite", what, i);
  }
  const size_t nd = (size_t)m->dict_fill * (size_t)m->cfg.n_modalities *
                    (size_t)m->cfg.knowledge_dim;
  for (size_t i = 0; i < nd; i++)
    ck_assert_msg(isfinite(m->dict[i]), "%s: dictionary value %zu is %g", what,
                  i, (double)m->dict[i]);
}

/* ------------------------------------------------------------------ */
/* A failing, counting allocator                                       */
/* ------------------------------------------------------------------ */

/* The allocator itself (fail_alloc, fa_hooks, fa_reset) is in common.h. */

/* Arms the allocator to fail the n-th call from now (and, with rest, every
 * later one). */
static void fa_arm(fail_alloc *c, long n, int rest) {
  c->fail_at = c->calls + n;
  c->fail_rest = rest;
  c->failed = 0;
}

static void fa_disarm(fail_alloc *c) {
  c->fail_at = 0;
  c->fail_rest = 0;
}

/* Nothing outstanding and nothing foreign freed. */
static void fa_balanced(const fail_alloc *c, const char *what) {
  ck_assert_msg(c->bad_frees == 0, "%s: %ld foreign pointers freed", what,
                c->bad_frees);
  ck_assert_msg(c->overruns == 0, "%s: %ld blocks written past their end", what,
                c->overruns);
  ck_assert_msg(c->mallocs == c->frees && c->live == 0,
                "%s: %ld allocations, %ld frees, %zu bytes leaked", what,
                c->mallocs, c->frees, c->live);
}

#define MAX_ALLOCS 64 /* no call here makes more allocations */

/* The outcome of a create, load or share whose allocations failed (st):
 * IMML_ERR_NOMEM and a failed handle holding a message that says so,
 * allocated through the same allocator as its only block outstanding
 * beyond `outstanding` -- or, when the allocator refused that too
 * (`refused_after`: every call after the failing one fails), no handle.
 * Frees the handle. */
static void nomem_outcome(imml_status st, imml_model *h, fail_alloc *c,
                          long outstanding, int refused_after,
                          const char *what) {
  ck_assert_msg(st == IMML_ERR_NOMEM, "%s: status %d (%s) '%s'", what, (int)st,
                imml_status_string(st), imml_model_errmsg(h));
  ck_assert_int_ge(c->failed, 1);
  if (refused_after) {
    ck_assert_msg(h == NULL,
                  "%s: a failed handle although every allocation "
                  "failed",
                  what);
    ck_assert_msg(c->mallocs - c->frees == outstanding,
                  "%s: %ld blocks left by a failure without a handle", what,
                  c->mallocs - c->frees - outstanding);
    return;
  }
  ck_assert_msg(h != NULL, "%s: no failed handle", what);
  ck_assert_msg(strstr(imml_model_errmsg(h), "memory") != NULL,
                "%s: NOMEM message does not say so: '%s'", what,
                imml_model_errmsg(h));
  ck_assert_msg(c->mallocs - c->frees == outstanding + 1,
                "%s: the failure holds %ld blocks (the failed handle only "
                "expected)",
                what, c->mallocs - c->frees - outstanding);
  ck_assert_int_eq(imml_param_count(h), 0);
  imml_config cfg;
  imml_config_init(&cfg);
  ck_assert_int_eq(imml_model_get_config(h, &cfg), IMML_ERR_STATE);
  imml_model_free(h);
  ck_assert_msg(c->mallocs - c->frees == outstanding,
                "%s: blocks left after freeing the failed handle", what);
}

/* A host F&T: logits = concat(slots) Wf for a fixed Wf; poisoning writes a
 * non-finite value into the last logit or into one dslot value. */
typedef struct host {
  int M, k, C;
  float w[IMML_MAX_MODALITIES * 8 * 8];
  float poison_fwd; /* 0: none, else written to the last logit */
  float poison_bwd; /* 0: none, else written to dslots[M-1][last] */
  int n_fwd, n_bwd;
} host;

static int host_forward(void *ud, int training, int B, int M, int k,
                        const float *const *slots, int C, float *logits) {
  host *h = ud;
  (void)training;
  h->n_fwd++;
  if (M != h->M || k != h->k || C != h->C)
    return 99;
  for (int i = 0; i < B; i++)
    for (int j = 0; j < C; j++) {
      float acc = 0.0f;
      for (int m = 0; m < M; m++)
        for (int t = 0; t < k; t++)
          acc +=
              slots[m][(size_t)i * k + t] * h->w[(size_t)(m * k + t) * C + j];
      logits[(size_t)i * C + j] = acc;
    }
  if (h->poison_fwd != 0.0f)
    logits[(size_t)B * C - 1] = h->poison_fwd;
  return 0;
}

static int host_backward(void *ud, int B, int M, int k,
                         const float *const *slots, const float *dlogits, int C,
                         float *const *dslots) {
  host *h = ud;
  (void)slots;
  h->n_bwd++;
  for (int m = 0; m < M; m++)
    for (int i = 0; i < B; i++)
      for (int t = 0; t < k; t++) {
        float acc = 0.0f;
        for (int j = 0; j < C; j++)
          acc += dlogits[(size_t)i * C + j] * h->w[(size_t)(m * k + t) * C + j];
        dslots[m][(size_t)i * k + t] = acc;
      }
  if (h->poison_bwd != 0.0f)
    dslots[M - 1][(size_t)B * k - 1] = h->poison_bwd;
  return 0;
}

static void host_init(host *h, int M, int k, int C, uint64_t seed) {
  memset(h, 0, sizeof *h);
  ck_assert_int_le(M * k * C, (int)(sizeof h->w / sizeof h->w[0]));
  h->M = M;
  h->k = k;
  h->C = C;
  drng r = {seed};
  for (int i = 0; i < M * k * C; i++)
    h->w[i] = 0.5f * drng_unif(&r);
}

static imml_ft_ops host_ops(host *h) {
  imml_ft_ops ops;
  imml_ft_ops_init(&ops);
  ops.forward = host_forward;
  ops.backward = host_backward;
  ops.user_data = h;
  return ops;
}

/* ------------------------------------------------------------------ */
/* Allocation failure: imml_model_create                               */
/* ------------------------------------------------------------------ */

/* Fails the 1st, 2nd, ... allocation of imml_model_create (only that one,
 * or that one and every later one) until the call succeeds.  A failure
 * returns a failed handle from the same allocator (none when every later
 * allocation fails too), and after imml_model_free every byte is back.
 * _i: 0 built-in F&T, M = 2; 1 host F&T, M = 3, strict slots. */
START_TEST(test_nomem_create) {
  host h;
  host_init(&h, 3, 4, 3, 1);
  imml_ft_ops ops = host_ops(&h);
  for (int rest = 0; rest < 2; rest++) {
    int succeeded = 0;
    long failures = 0;
    for (long n = 1; n <= MAX_ALLOCS && !succeeded; n++) {
      imml_config c;
      if (_i == 0) {
        small_cfg(&c, 2, dims2);
      } else {
        small_cfg(&c, 3, dims3);
        c.slot_mode = IMML_SLOT_STRICT;
      }
      fail_alloc cnt;
      fa_reset(&cnt);
      fa_arm(&cnt, n, rest);
      c.allocator = fa_hooks(&cnt);
      imml_model *m = (imml_model *)&c; /* must be overwritten */
      const imml_status st = imml_model_create(&c, _i ? &ops : NULL, &m);
      if (st == IMML_OK) {
        ck_assert_msg(cnt.failed == 0,
                      "allocation %ld returned NULL but create succeeded", n);
        ck_assert_ptr_nonnull(m);
        ck_assert_str_eq(imml_model_errmsg(m), "");
        succeeded = 1;
        imml_model_free(m);
      } else {
        char what[96];
        snprintf(what, sizeof what, "create, allocation %ld failing (%s)", n,
                 rest ? "and the rest" : "only");
        ck_assert_msg(m != (imml_model *)&c, "%s: *out not written", what);
        nomem_outcome(st, m, &cnt, 0, rest, what);
        failures++;
      }
      fa_balanced(&cnt, "imml_model_create");
    }
    ck_assert_msg(succeeded, "create never succeeded");
    ck_assert_int_ge(failures, 1);
  }
}
END_TEST

/* ------------------------------------------------------------------ */
/* Allocation failure: imml_model_load_mem, imml_model_load            */
/* ------------------------------------------------------------------ */

/* Checkpoints of three kinds: built-in F&T with AdamW state in flight,
 * host F&T with SGD momentum, and a model without optimiser. */
static unsigned char *ckpt_case(int i, host *h, size_t *size) {
  imml_config c;
  imml_model *m;
  drng r = {100 + (uint64_t)i};
  if (i == 0) {
    small_cfg(&c, 2, dims2);
    m = create_ok(&c, NULL);
    adamw(m);
    for (int s = 0; s < 4; s++)
      train_step(m, &r, 1);
  } else if (i == 1) {
    small_cfg(&c, 3, dims3);
    imml_ft_ops ops = host_ops(h);
    m = create_ok(&c, &ops);
    imml_optim_config oc;
    imml_optim_config_init(&oc, IMML_OPTIM_SGD);
    oc.lr = 0.05f;
    oc.momentum = 0.9f;
    ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
    for (int s = 0; s < 3; s++)
      train_step(m, &r, 1);
  } else {
    small_cfg(&c, 2, dims2);
    c.predominant = 1;
    m = create_ok(&c, NULL);
    train_step(m, &r, 0);
  }
  unsigned char *buf = save_to_mem(m, size);
  imml_model_free(m);
  return buf;
}

/* The entries of dir, sorted, as "a,b,"; returns their number. */
static int list_dir(const char *dir, char *out, size_t n) {
  DIR *d = opendir(dir);
  ck_assert_ptr_nonnull(d);
  char names[16][256];
  int count = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
      continue;
    ck_assert_int_lt(count, 16);
    snprintf(names[count++], sizeof names[0], "%s", e->d_name);
  }
  closedir(d);
  for (int i = 1; i < count; i++)
    for (int j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
      char t[256];
      memcpy(t, names[j], sizeof t);
      memcpy(names[j], names[j - 1], sizeof t);
      memcpy(names[j - 1], t, sizeof t);
    }
  size_t len = 0;
  out[0] = '\0';
  for (int i = 0; i < count; i++) {
    const size_t add = strlen(names[i]) + 1;
    ck_assert_uint_lt(len + add, n);
    memcpy(out + len, names[i], add - 1);
    out[len + add - 1] = ',';
    len += add;
    out[len] = '\0';
  }
  return count;
}

/* _i = checkpoint kind x {memory, file}: every allocation of the load
 * failing in turn gives IMML_ERR_NOMEM and a failed handle saying so (none
 * when every later allocation fails too), and nothing leaked once it is
 * freed; the load that finally succeeds gives the same model. */
START_TEST(test_nomem_load) {
  const int kind = _i / 2, from_file = _i % 2;
  host h;
  host_init(&h, 3, 4, 3, 2);
  imml_ft_ops ops = host_ops(&h);
  const imml_ft_ops *ft = kind == 1 ? &ops : NULL;
  size_t size;
  unsigned char *buf = ckpt_case(kind, &h, &size);
  char dir[512], path[600];
  make_tmpdir(dir, sizeof dir, "imml-faults.");
  snprintf(path, sizeof path, "%s/model.imml", dir);
  write_file(path, buf, size);
  for (int rest = 0; rest < 2; rest++) {
    int succeeded = 0;
    long failures = 0;
    for (long n = 1; n <= MAX_ALLOCS && !succeeded; n++) {
      fail_alloc cnt;
      fa_reset(&cnt);
      fa_arm(&cnt, n, rest);
      imml_load_options o;
      imml_load_options_init(&o);
      o.allocator = fa_hooks(&cnt);
      imml_model *m = (imml_model *)&o; /* must be overwritten */
      const imml_status st = from_file
                                 ? imml_model_load(path, ft, &o, &m)
                                 : imml_model_load_mem(buf, size, ft, &o, &m);
      if (st == IMML_OK) {
        ck_assert_msg(cnt.failed == 0,
                      "allocation %ld returned NULL but the load succeeded", n);
        ck_assert_str_eq(imml_model_errmsg(m), "");
        ck_assert_msg(same_checkpoint(m, buf, size),
                      "the model loaded after failures differs");
        succeeded = 1;
        imml_model_free(m);
      } else {
        char what[96];
        snprintf(what, sizeof what, "kind %d %s, allocation %ld failing (%s)",
                 kind, from_file ? "file" : "memory", n,
                 rest ? "and the rest" : "only");
        ck_assert_msg(m != (imml_model *)&o, "%s: *out not written", what);
        nomem_outcome(st, m, &cnt, 0, rest, what);
        failures++;
      }
      fa_balanced(&cnt, from_file ? "imml_model_load" : "imml_model_load_mem");
    }
    ck_assert_msg(succeeded, "the load never succeeded");
    /* handle + arena (+ optimiser state) (+ the file's bytes) */
    ck_assert_int_ge(failures, 2 + (kind != 2) + from_file);
  }
  /* the file is untouched */
  size_t fsize;
  unsigned char *fb = read_file(path, &fsize);
  ck_assert(fsize == size && memcmp(fb, buf, size) == 0);
  free(fb);
  remove_tree(dir);
  free(buf);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Allocation failure on an existing model                             */
/* ------------------------------------------------------------------ */

/* A model on the failing allocator, part-way through training: warm-up
 * done, a wrapped dictionary, AdamW moments in flight, gradients of a
 * committed step not yet applied, and a training forward awaiting its
 * backward. */
static imml_model *busy_model(fail_alloc *cnt, drng *r, const imml_ft_ops *ft) {
  imml_config c;
  small_cfg(&c, 2, dims2);
  c.dict_size = 5;
  fa_reset(cnt);
  c.allocator = fa_hooks(cnt);
  imml_model *m = create_ok(&c, ft);
  adamw(m);
  for (int s = 0; s < 4; s++)
    train_step(m, r, 1);
  train_step(m, r, 0); /* gradients accumulated, not applied */
  batch b;
  batch_random(&b, 2, dims2, 3, c.n_classes, r);
  ck_assert_int_eq(
      imml_forward(m, IMML_MODE_TRAIN, b.B, feats(&b), b.y, NULL, NULL),
      IMML_OK);
  batch_free(&b);
  int p, fixed;
  ck_assert_int_eq(imml_predominant_get(m, &p, &fixed), IMML_OK);
  ck_assert_int_eq(fixed, 1);
  ck_assert_int_eq(imml_fdc_dict_fill(m), 5);
  return m;
}

/* Completes the pending step, trains one more, and leaves a new training
 * forward pending: the same on two models given the same seed. */
static void advance(imml_model *m, uint64_t seed) {
  drng r = {seed};
  backward_ok(m, NULL);
  ck_assert_int_eq(imml_optim_step(m), IMML_OK);
  train_step(m, &r, 1);
  batch b;
  batch_random(&b, 2, dims2, 4, 3, &r);
  ck_assert_int_eq(
      imml_forward(m, IMML_MODE_TRAIN, b.B, feats(&b), b.y, NULL, NULL),
      IMML_OK);
  batch_free(&b);
}

/* imml_optim_setup replacing an optimiser whose state is in flight (AdamW,
 * then SGD momentum): every allocation failing in turn gives
 * IMML_ERR_NOMEM and keeps the old optimiser bit for bit, and training
 * continues exactly like a model that never saw the failures. */
START_TEST(test_nomem_optim_setup) {
  fail_alloc cnt, cref;
  drng r = {7}, rr = {7};
  imml_model *m = busy_model(&cnt, &r, NULL);
  imml_model *ref = busy_model(&cref, &rr, NULL);
  imml_optim_config cfgs[2];
  imml_optim_config_init(&cfgs[0], IMML_OPTIM_SGD);
  cfgs[0].lr = 0.1f;
  cfgs[0].momentum = 0.5f;
  imml_optim_config_init(&cfgs[1], IMML_OPTIM_ADAMW);
  cfgs[1].lr = 0.02f;
  cfgs[1].clip_norm = 1.0f;
  for (int round = 0; round < 4; round++) {
    const imml_optim_config *oc = &cfgs[round % 2];
    const int rest = round / 2;
    long failures = 0;
    int done = 0;
    for (long n = 1; n <= MAX_ALLOCS && !done; n++) {
      snap s0;
      snap_take(m, &s0);
      ck_assert(s0.opt_active && s0.opt_t > 0);
      const long outstanding = cnt.mallocs - cnt.frees;
      const size_t live = cnt.live;
      fa_arm(&cnt, n, rest);
      const imml_status st = imml_optim_setup(m, oc);
      fa_disarm(&cnt);
      if (st == IMML_OK) {
        ck_assert_int_eq(cnt.failed, 0);
        done = 1;
      } else {
        ck_assert_msg(st == IMML_ERR_NOMEM, "allocation %ld: status %d (%s)", n,
                      (int)st, imml_status_string(st));
        ck_assert_msg(strstr(imml_model_errmsg(m), "memory") != NULL, "'%s'",
                      imml_model_errmsg(m));
        expect_unchanged(m, &s0, "failed imml_optim_setup");
        ck_assert_msg(cnt.mallocs - cnt.frees == outstanding &&
                          cnt.live == live,
                      "allocation %ld: failed imml_optim_setup leaked", n);
        failures++;
      }
      snap_free(&s0);
    }
    ck_assert(done);
    ck_assert_int_ge(failures, 1);
    ck_assert_int_eq(imml_optim_setup(ref, oc), IMML_OK);
    advance(m, 50 + (uint64_t)round);
    advance(ref, 50 + (uint64_t)round);
    snap sa, sb;
    snap_take(m, &sa);
    snap_take(ref, &sb);
    snap_check(&sb, &sa, "training after failed set-ups");
    snap_free(&sa);
    snap_free(&sb);
  }
  imml_model_free(m);
  imml_model_free(ref);
  fa_balanced(&cnt, "model with failed optimiser set-ups");
  fa_balanced(&cref, "reference model");
}
END_TEST

/* imml_model_share: every allocation failing in turn gives IMML_ERR_NOMEM
 * and a failed handle from the model's allocator saying so (none when
 * every later allocation fails too), nothing leaked once it is freed, the
 * model untouched (a pending training forward included), and the share
 * finally made predicts like an evaluation forward. */
START_TEST(test_nomem_share) {
  fail_alloc cnt;
  drng r = {8};
  host h;
  host_init(&h, 2, 4, 3, 3);
  imml_ft_ops ops = host_ops(&h);
  imml_model *m = busy_model(&cnt, &r, _i ? &ops : NULL);
  for (int rest = 0; rest < 2; rest++) {
    int done = 0;
    for (long n = 1; n <= MAX_ALLOCS && !done; n++) {
      snap s0;
      snap_take(m, &s0);
      const long outstanding = cnt.mallocs - cnt.frees;
      const size_t live = cnt.live;
      fa_arm(&cnt, n, rest);
      imml_model *ws = (imml_model *)&cnt; /* must be overwritten */
      const imml_status st = imml_model_share(m, &ws);
      fa_disarm(&cnt);
      char msg[256];
      snprintf(msg, sizeof msg, "%s", imml_model_errmsg(m));
      expect_unchanged(m, &s0, "imml_model_share");
      snap_free(&s0);
      if (st == IMML_OK) {
        ck_assert_int_eq(cnt.failed, 0);
        done = 1;
        batch b;
        batch_random(&b, 2, dims2, 6, 3, &r);
        float l1[18], l2[18];
        ck_assert_int_eq(imml_predict(ws, 6, feats(&b), l1, NULL, NULL),
                         IMML_OK);
        ck_assert_int_eq(
            imml_forward(m, IMML_MODE_EVAL, 6, feats(&b), NULL, l2, NULL),
            IMML_OK);
        ck_assert(memcmp(l1, l2, sizeof l1) == 0);
        batch_free(&b);
        imml_model_free(ws);
      } else {
        char what[96];
        snprintf(what, sizeof what, "share, allocation %ld failing (%s)", n,
                 rest ? "and the rest" : "only");
        /* a share's failure is a call on the model: *out is NULL and the
         * message is the model's, nothing left allocated */
        ck_assert_msg(ws == NULL, "%s: *out not NULL", what);
        ck_assert_int_eq(st, IMML_ERR_NOMEM);
        ck_assert_msg(strstr(msg, "out of memory"), "%s: model message '%s'",
                      what, msg);
        ck_assert_msg(cnt.mallocs - cnt.frees == outstanding &&
                          cnt.live == live,
                      "%s: a refused share left memory allocated", what);
      }
      ck_assert_msg(cnt.mallocs - cnt.frees == outstanding && cnt.live == live,
                    "allocation %ld: the share leaked", n);
    }
    ck_assert(done);
  }
  /* the pending step is still there and completes */
  backward_ok(m, NULL);
  imml_model_free(m);
  fa_balanced(&cnt, "share");
}
END_TEST

/* imml_model_save allocates its buffer and a file name: either failing
 * gives IMML_ERR_NOMEM, the model untouched, the existing file untouched
 * and no temporary file left; imml_model_save_mem allocates nothing. */
START_TEST(test_nomem_save) {
  fail_alloc cnt;
  drng r = {9};
  imml_model *m = busy_model(&cnt, &r, NULL);
  char dir[512], path[600], names[256];
  make_tmpdir(dir, sizeof dir, "imml-faults.");
  snprintf(path, sizeof path, "%s/model.imml", dir);
  const char old[] = "an older checkpoint";
  write_file(path, old, sizeof old);
  for (int rest = 0; rest < 2; rest++) {
    int done = 0;
    long failures = 0;
    for (long n = 1; n <= MAX_ALLOCS && !done; n++) {
      snap s0;
      snap_take(m, &s0);
      fa_arm(&cnt, n, rest);
      const long outstanding = cnt.mallocs - cnt.frees;
      const imml_status st = imml_model_save(m, path);
      fa_disarm(&cnt);
      ck_assert_msg(cnt.mallocs - cnt.frees == outstanding,
                    "allocation %ld: imml_model_save leaked", n);
      ck_assert_int_eq(list_dir(dir, names, sizeof names), 1);
      ck_assert_str_eq(names, "model.imml,");
      size_t fsize;
      unsigned char *fb = read_file(path, &fsize);
      if (st == IMML_OK) {
        ck_assert_int_eq(cnt.failed, 0);
        ck_assert_msg(same_checkpoint(m, fb, fsize), "saved file differs");
        done = 1;
      } else {
        ck_assert_msg(st == IMML_ERR_NOMEM, "allocation %ld: status %d (%s)", n,
                      (int)st, imml_status_string(st));
        ck_assert_msg(strstr(imml_model_errmsg(m), "memory") != NULL, "'%s'",
                      imml_model_errmsg(m));
        ck_assert_msg(fsize == sizeof old && memcmp(fb, old, sizeof old) == 0,
                      "a failed save changed the existing file");
        failures++;
      }
      free(fb);
      expect_unchanged(m, &s0, "imml_model_save"); /* it only reads the model */
      snap_free(&s0);
    }
    ck_assert(done);
    ck_assert_int_ge(failures, 1);
    write_file(path, old, sizeof old);
  }
  /* imml_model_save_mem allocates nothing */
  const long calls = cnt.calls;
  size_t size;
  unsigned char *buf = save_to_mem(m, &size);
  ck_assert_int_eq(cnt.calls, calls);
  free(buf);
  ck_assert_int_eq(imml_backward(m, NULL), IMML_OK);
  imml_model_free(m);
  fa_balanced(&cnt, "save");
  remove_tree(dir);
}
END_TEST

/* A collective of two ranks faked in one process: rank 1 sends what rank
 * 0 sends, except one value poisoned by the test. */
typedef struct fake_peer {
  long poison_at; /* index into rank 1's message; < 0: none */
  float poison;
  int calls;
} fake_peer;

static int fake_allgather(void *ud, const float *send, size_t count,
                          float *recv) {
  fake_peer *f = ud;
  f->calls++;
  memcpy(recv, send, count * sizeof(float));
  memcpy(recv + count, send, count * sizeof(float));
  if (f->poison_at >= 0 && (size_t)f->poison_at < count)
    recv[count + (size_t)f->poison_at] = f->poison;
  return 0;
}

static imml_collective fake_collective(fake_peer *f) {
  imml_collective co;
  imml_collective_init(&co);
  co.world_size = 2;
  co.rank = 0;
  co.allgather = fake_allgather;
  co.user_data = f;
  return co;
}

/* A collective where every one of `world` ranks sends what this one
 * sends. */
typedef struct fake_world {
  int world;
} fake_world;

static int world_allgather(void *ud, const float *send, size_t count,
                           float *recv) {
  const fake_world *w = ud;
  for (int r = 0; r < w->world; r++)
    memcpy(recv + (size_t)r * count, send, count * sizeof(float));
  return 0;
}

/* imml_collective_set allocates the gathered buffers: a failure keeps the
 * collective the model had (none, then a previous one) and changes
 * nothing else. */
START_TEST(test_nomem_collective_set) {
  fail_alloc cnt;
  drng r = {15};
  imml_model *m = busy_model(&cnt, &r, NULL);
  backward_ok(m, NULL); /* no step pending, nothing uncommitted */
  fake_peer f = {-1, 0.0f, 0};
  imml_collective co = fake_collective(&f);
  for (int round = 0; round < 2; round++) {
    int done = 0;
    for (long n = 1; n <= MAX_ALLOCS && !done; n++) {
      snap s0;
      snap_take(m, &s0);
      const int active = m->coll.active;
      const void *block = m->coll.block;
      const long outstanding = cnt.mallocs - cnt.frees;
      fa_arm(&cnt, n, 0);
      const imml_status st = imml_collective_set(m, &co);
      fa_disarm(&cnt);
      if (st == IMML_OK) {
        done = 1;
      } else {
        ck_assert_msg(st == IMML_ERR_NOMEM, "allocation %ld: status %d (%s)", n,
                      (int)st, imml_status_string(st));
        ck_assert_msg(strstr(imml_model_errmsg(m), "memory") != NULL, "'%s'",
                      imml_model_errmsg(m));
        expect_unchanged(m, &s0, "failed imml_collective_set");
        ck_assert(m->coll.active == active && m->coll.block == block);
        ck_assert_msg(cnt.mallocs - cnt.frees == outstanding,
                      "allocation %ld: failed imml_collective_set leaked", n);
      }
      snap_free(&s0);
    }
    ck_assert(done);
    ck_assert_int_eq(m->coll.active, 1);
  }
  /* a collective step through the fake peer works */
  train_step(m, &r, 1);
  ck_assert_int_ge(f.calls, 1);
  ck_assert_int_eq(imml_collective_set(m, NULL), IMML_OK);
  imml_model_free(m);
  fa_balanced(&cnt, "collective_set");
}
END_TEST

enum { N_GARBAGE = 13 };

/* What the other rank sends in a collective step is a callback output like
 * any other: a batch size, label, knowledge value or unimodal cross-entropy
 * sum that is NaN, infinite or out of range must refuse the training
 * forward (the model unchanged, no step pending), never reach the model.
 * Without that, a negative or non-finite sum drives the warm-up EMA
 * negative or non-finite (and the checkpoint the model then saves is
 * refused by imml_model_load), and a NaN batch size or label is converted
 * to int (undefined behaviour).  A rank
 * whose fixed predominant modality differs (here: the other rank claims a
 * p while this one has none) is refused with IMML_ERR_STATE on every rank.
 * The message (lib/model.c, gather_batch) is: batch size, fixed p (-1:
 * none), M cross-entropy sums as (hi, lo) float pairs, max_batch labels,
 * then M x max_batch x k knowledge values. */
START_TEST(test_collective_garbage_refused) {
  imml_config c;
  small_cfg(&c, 2, dims2);
  c.warmup_steps = 3;
  const int M = 2, Bmax = c.max_batch, C = c.n_classes;
  imml_model *m = create_ok(&c, NULL);
  fake_peer f = {-1, 0.0f, 0};
  imml_collective co = fake_collective(&f);
  ck_assert_int_eq(imml_collective_set(m, &co), IMML_OK);
  drng r = {16};
  train_step(m, &r, 0); /* one good collective step */
  const long ce = 2, lab = 2 + 2 * M, z = 2 + 2 * M + Bmax;
  struct {
    long at;
    float v;
    imml_status want; /* IMML_OK here: any refusal */
    const char *what;
  } cases[N_GARBAGE] = {
      {0, 0.0f, IMML_ERR_SHAPE, "batch size 0"},
      {0, NAN, IMML_ERR_SHAPE, "batch size NaN"},
      {0, (float)(Bmax + 1), IMML_ERR_SHAPE, "batch size max_batch + 1"},
      {lab, NAN, IMML_ERR_LABEL, "label NaN"},
      {lab + 1, (float)C, IMML_ERR_LABEL, "label C"},
      {z + 1, INFINITY, IMML_ERR_NONFINITE, "knowledge Inf"},
      {ce, NAN, IMML_OK, "cross-entropy sum NaN"},
      {ce, -1.0f, IMML_OK, "cross-entropy sum -1"},
      {ce + 1, INFINITY, IMML_OK, "cross-entropy sum low part Inf"},
      {ce + 2, -INFINITY, IMML_OK, "cross-entropy sum of modality 1 -Inf"},
      {1, 0.0f, IMML_ERR_STATE, "the other rank has p = 0 fixed"},
      {1, NAN, IMML_ERR_STATE, "the other rank's p NaN"},
      {1, 2.0f, IMML_ERR_STATE, "the other rank's p out of range"},
  };
  const int i = _i;
  batch b;
  batch_random(&b, 2, dims2, 4, C, &r);
  snap s0;
  snap_take(m, &s0);
  f.poison_at = cases[i].at;
  f.poison = cases[i].v;
  const imml_status st =
      imml_forward(m, IMML_MODE_TRAIN, b.B, feats(&b), b.y, NULL, NULL);
  f.poison_at = -1;
  if (st == IMML_OK) {
    /* show what the accepted garbage does to the model */
    imml_status sb = imml_backward(m, NULL);
    if (sb == IMML_OK)
      sb = imml_commit(m);
    int steps = 0;
    float ema[2] = {0, 0};
    imml_warmup_get(m, &steps, ema);
    ck_abort_msg("%s: the collective forward accepted it (backward and "
                 "commit %d, warm-up EMAs %g %g)",
                 cases[i].what, (int)sb, (double)ema[0], (double)ema[1]);
  }
  if (cases[i].want != IMML_OK)
    ck_assert_msg(st == cases[i].want, "%s: status %d (%s), expected %d",
                  cases[i].what, (int)st, imml_status_string(st),
                  (int)cases[i].want);
  ck_assert_msg(imml_model_errmsg(m)[0] != '\0', "%s: no message",
                cases[i].what);
  expect_unchanged(m, &s0, cases[i].what);
  ck_assert_int_eq(imml_backward(m, NULL), IMML_ERR_STATE);
  /* and the next good step goes through */
  train_step(m, &r, 0);
  snap_free(&s0);
  batch_free(&b);
  imml_model_free(m);
}
END_TEST

/* The first collective step on an empty dictionary attends over the
 * gathered global batch (G = the sum of the shards, up to world_size x
 * max_batch rows); the attention scratch must hold G rows, not only
 * max(dict_size, max_batch).  Here every rank sends this rank's batch, and
 * the predominant modality is named, so the very first step uses the
 * front-door adjustment with an empty dictionary.  _i: world size 2 (G = 4)
 * or 32 (G = 64), max_batch 2, dict_size 3.  The logits of this rank's rows
 * must equal (to rounding) those of one process given the global batch, and
 * nothing may be written past the model's arena (the counting allocator's
 * canaries, and ASan/valgrind in CI). */
START_TEST(test_collective_empty_dictionary) {
  static const int d[2] = {3, 3};
  const int R = _i ? 32 : 2, B = 2, G = R * B, C = 2;
  imml_config c;
  small_cfg(&c, 2, d);
  c.hidden_dim = 4;
  c.knowledge_dim = 2;
  c.n_classes = C;
  c.max_batch = B;
  c.dict_size = 3;
  c.predominant = 0;
  fail_alloc cnt;
  fa_reset(&cnt);
  c.allocator = fa_hooks(&cnt);
  imml_model *m = create_ok(&c, NULL);
  fake_world w = {R};
  imml_collective co;
  imml_collective_init(&co);
  co.world_size = R;
  co.rank = 0;
  co.allgather = world_allgather;
  co.user_data = &w;
  ck_assert_int_eq(imml_collective_set(m, &co), IMML_OK);
  /* one process, the global batch: R copies of this rank's batch */
  imml_config c1 = c;
  c1.max_batch = G;
  fail_alloc cnt1;
  fa_reset(&cnt1);
  c1.allocator = fa_hooks(&cnt1);
  imml_model *one = create_ok(&c1, NULL);
  drng r = {17};
  batch b, g;
  batch_random(&b, 2, d, B, C, &r);
  memset(&g, 0, sizeof g);
  g.M = 2;
  g.B = G;
  for (int mm = 0; mm < 2; mm++) {
    g.dims[mm] = d[mm];
    g.x[mm] = xcalloc((size_t)G * d[mm], sizeof(float));
    for (int i = 0; i < R; i++)
      memcpy(g.x[mm] + (size_t)i * B * d[mm], b.x[mm],
             (size_t)B * d[mm] * sizeof(float));
  }
  g.y = xcalloc((size_t)G, sizeof(int));
  for (int i = 0; i < G; i++)
    g.y[i] = b.y[i % B];
  float lc[2 * 2], *l1 = xcalloc((size_t)G * C, sizeof(float));
  const imml_status st =
      imml_forward(m, IMML_MODE_TRAIN, B, feats(&b), b.y, lc, NULL);
  ck_assert_msg(st == IMML_OK, "collective forward: %s", imml_model_errmsg(m));
  ck_assert_int_eq(
      imml_forward(one, IMML_MODE_TRAIN, G, feats(&g), g.y, l1, NULL), IMML_OK);
  backward_ok(m, NULL); /* the commit pushes the global batch */
  ck_assert_int_eq(imml_fdc_dict_fill(m), 3);
  imml_model_free(m);
  imml_model_free(one);
  fa_balanced(&cnt, "collective model");
  fa_balanced(&cnt1, "single-process model");
  for (int i = 0; i < B * C; i++)
    ck_assert_msg(fabsf(lc[i] - l1[i]) <= 1e-5f * (1.0f + fabsf(l1[i])),
                  "world %d: logit %d is %.9g, one process gives %.9g", R, i,
                  (double)lc[i], (double)l1[i]);
  free(l1);
  batch_free(&b);
  batch_free(&g);
}
END_TEST

/* ------------------------------------------------------------------ */
/* NaN and Inf produced inside the computation                         */
/* ------------------------------------------------------------------ */

/* The example: SGD (or AdamW) at the largest accepted rate makes
 * the parameters huge; a later forward overflows.  Every call either
 * succeeds or is refused with IMML_ERR_NONFINITE, a refused call changes
 * nothing, and the model never holds a non-finite value. */
START_TEST(test_exploding_lr) {
  imml_config c;
  small_cfg(&c, 2, dims2);
  imml_model *m = create_ok(&c, NULL);
  imml_optim_config oc;
  imml_optim_config_init(&oc, _i ? IMML_OPTIM_ADAMW : IMML_OPTIM_SGD);
  oc.lr = 1e30f; /* the cap imml_optim_setup accepts */
  oc.weight_decay = 0.0f;
  ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
  imml_model *ws = NULL;
  ck_assert_int_eq(imml_model_share(m, &ws), IMML_OK);
  drng r = {10};
  int refused_forward = 0, refused_other = 0;
  for (int it = 0; it < 8 && !refused_forward; it++) {
    batch b;
    batch_random(&b, 2, dims2, 4, c.n_classes, &r);
    snap s0;
    snap_take(m, &s0);
    imml_losses l;
    float lg[12];
    imml_status st =
        imml_forward(m, IMML_MODE_TRAIN, b.B, feats(&b), b.y, lg, &l);
    if (st == IMML_OK) {
      /* the backward (then the commit, which cannot overflow), then the
       * step: each refused as a whole or done */
      for (int phase = 0; phase < 2 && st == IMML_OK; phase++) {
        snap_free(&s0);
        snap_take(m, &s0);
        st = phase == 0 ? imml_backward(m, NULL) : imml_optim_step(m);
        if (phase == 0 && st == IMML_OK)
          ck_assert_msg(imml_commit(m) == IMML_OK, "commit: %s",
                        imml_model_errmsg(m));
        if (st != IMML_OK) {
          ck_assert_msg(st == IMML_ERR_NONFINITE,
                        "iteration %d phase %d: status %d (%s)", it, phase,
                        (int)st, imml_status_string(st));
          ck_assert_str_ne(imml_model_errmsg(m), "");
          expect_unchanged(m, &s0, phase ? "refused step" : "refused backward");
          refused_other++;
          ck_assert_int_eq(imml_grad_zero(m), IMML_OK);
        }
      }
    } else {
      ck_assert_msg(st == IMML_ERR_NONFINITE, "iteration %d: status %d (%s)",
                    it, (int)st, imml_status_string(st));
      ck_assert_msg(strstr(imml_model_errmsg(m), "finite") != NULL,
                    "message '%s'", imml_model_errmsg(m));
      /* a refused training forward leaves no pending step (DECISIONS.md),
       * and nothing else changes */
      s0.pending = 0;
      expect_unchanged(m, &s0, "refused training forward");
      ck_assert_int_eq(imml_backward(m, NULL), IMML_ERR_STATE);
      /* evaluation overflows the same way */
      ck_assert_int_eq(
          imml_forward(m, IMML_MODE_EVAL, b.B, feats(&b), NULL, lg, NULL),
          IMML_ERR_NONFINITE);
      ck_assert_int_eq(imml_predict(ws, b.B, feats(&b), lg, NULL, NULL),
                       IMML_ERR_NONFINITE);
      ck_assert_str_ne(imml_model_errmsg(ws), "");
      ck_assert_int_eq(imml_predict(m, b.B, feats(&b), lg, NULL, NULL),
                       IMML_ERR_NONFINITE);
      ck_assert_str_ne(imml_model_errmsg(m), "");
      expect_unchanged(m, &s0, "refused evaluation");
      refused_forward = 1;
    }
    expect_all_finite(m, "exploding learning rate");
    snap_free(&s0);
    batch_free(&b);
  }
  ck_assert_msg(refused_forward,
                "lr 1e30 never made a forward overflow (%d other refusals)",
                refused_other);
  imml_model_free(ws);
  imml_model_free(m);
}
END_TEST

/* Sets every element of a tensor to v, or (signed) to +v in column 0 and
 * -v in the others. */
static void set_tensor(imml_model *m, const char *name, float v, int signed_) {
  imml_param_view pv;
  const imml_status st = imml_param_find(m, name, &pv);
  ck_assert_msg(st == IMML_OK, "no parameter %s: %d %s", name, (int)st,
                imml_model_errmsg(m));
  ck_assert_str_eq(pv.name, name);
  for (int j = 0; j < pv.rows * pv.cols; j++)
    pv.data[j] = signed_ && j % pv.cols != 0 ? -v : v;
}

/* Parameters crafted (through imml_param_find) to large finite values so
 * that the forward is finite but a gradient overflows: W1 = 1e20 makes
 * u ~ 1e20 while W2 = b2 = 0 keeps z = 0; ft.w = +-1e20 (the sign
 * differs between classes, or the softmax gradient would cancel) makes
 * dz ~ 1e20, so dW2 = uᵀ dz ~ 1e40 overflows float.  The backward is
 * refused as a whole and leaves the model bit-identical, the step still
 * pending.  _i: bit 0 p fixed (front-door adjustment, dictionary in use) or
 * warm-up; _i >> 1: 0 gradients all zero (direct), 1 gradients of a
 * committed step accumulated, 2 an uncommitted micro-batch accumulated
 * (which the refusal keeps, and the commit then takes with this one). */
START_TEST(test_backward_overflow_refused) {
  const int fixed = _i & 1, staged = _i >> 1;
  imml_config c;
  small_cfg(&c, 2, dims2);
  c.warmup_steps = fixed ? 2 : 100;
  imml_model *m = create_ok(&c, NULL);
  adamw(m);
  drng r = {11 + (uint64_t)_i};
  for (int s = 0; s < 3; s++)
    train_step(m, &r, 1);
  if (staged == 1) {
    train_step(m, &r, 0);
  } else if (staged == 2) {
    batch b0;
    batch_random(&b0, 2, dims2, 3, c.n_classes, &r);
    ck_assert_int_eq(
        imml_forward(m, IMML_MODE_TRAIN, b0.B, feats(&b0), b0.y, NULL, NULL),
        IMML_OK);
    backward_only_ok(m, NULL);
    ck_assert_int_eq(m->acc.micro, 1);
    batch_free(&b0);
  }
  int p, fx;
  ck_assert_int_eq(imml_predominant_get(m, &p, &fx), IMML_OK);
  ck_assert_int_eq(fx, fixed);
  ck_assert_int_ge(imml_fdc_dict_fill(m), 1);
  for (int mm = 0; mm < 2; mm++) {
    char name[16];
    snprintf(name, sizeof name, "m%d.w1", mm);
    set_tensor(m, name, 1e20f, 0);
    snprintf(name, sizeof name, "m%d.b1", mm);
    set_tensor(m, name, 0.0f, 0);
    snprintf(name, sizeof name, "m%d.w2", mm);
    set_tensor(m, name, 0.0f, 0);
    snprintf(name, sizeof name, "m%d.b2", mm);
    set_tensor(m, name, 0.0f, 0);
  }
  set_tensor(m, "ft.w", 1e20f, 1);
  batch b;
  batch_random(&b, 2, dims2, 5, c.n_classes, &r);
  for (int i = 0; i < b.dims[0]; i++)
    b.x[0][i] = 1.0f; /* row 0: u = relu(5e20) for sure */
  imml_losses l;
  float lg[15];
  const imml_status fst =
      imml_forward(m, IMML_MODE_TRAIN, b.B, feats(&b), b.y, lg, &l);
  ck_assert_msg(fst == IMML_OK, "the crafted forward should be finite: %s",
                imml_model_errmsg(m));
  ck_assert(isfinite(l.total));
  snap s0;
  snap_take(m, &s0);
  ck_assert_int_eq(s0.pending, 1);
  float *dh[2];
  for (int mm = 0; mm < 2; mm++)
    dh[mm] = xcalloc((size_t)b.B * dims2[mm], sizeof(float));
  for (int round = 0; round < 2; round++) {
    const imml_status st = imml_backward(m, round ? NULL : dh);
    ck_assert_msg(st == IMML_ERR_NONFINITE, "round %d: status %d (%s) '%s'",
                  round, (int)st, imml_status_string(st), imml_model_errmsg(m));
    const char *msg = imml_model_errmsg(m);
    ck_assert_msg(strstr(msg, "m0.w2") || strstr(msg, "m1.w2"),
                  "the message should name the overflowing tensor: '%s'", msg);
    expect_unchanged(m, &s0, "refused backward");
  }
  /* the refused step is still pending: with sane parameters the same
   * activations give finite gradients and the step completes */
  set_tensor(m, "ft.w", 1e-30f, 1);
  ck_assert_int_eq(imml_backward(m, NULL), IMML_OK);
  ck_assert_int_eq(imml_backward(m, NULL), IMML_ERR_STATE);
  ck_assert_int_eq(m->acc.micro, staged == 2 ? 2 : 1);
  ck_assert_int_eq(imml_commit(m), IMML_OK);
  for (int mm = 0; mm < 2; mm++)
    free(dh[mm]);
  snap_free(&s0);
  batch_free(&b);
  imml_model_free(m);
}
END_TEST

/* A host F&T whose outputs are NaN or infinite: logits in a training
 * forward, an evaluation forward and imml_predict; dL/dslot in a backward.
 * Each is IMML_ERR_NONFINITE with a message and the model unchanged; the
 * refused backward keeps the step pending, and completing it gives the
 * model of a host that never misbehaved.  _i: 0 warm-up, 1 p fixed. */
START_TEST(test_host_nonfinite_outputs) {
  const float bad[3] = {NAN, INFINITY, -INFINITY};
  imml_config c;
  small_cfg(&c, 2, dims2);
  c.warmup_steps = _i ? 1 : 50;
  host h, href;
  host_init(&h, 2, c.knowledge_dim, c.n_classes, 12);
  host_init(&href, 2, c.knowledge_dim, c.n_classes, 12);
  imml_ft_ops ops = host_ops(&h), oref = host_ops(&href);
  imml_model *m = create_ok(&c, &ops), *ref = create_ok(&c, &oref);
  adamw(m);
  adamw(ref);
  imml_model *ws = NULL;
  ck_assert_int_eq(imml_model_share(m, &ws), IMML_OK);
  drng r = {13}, rr = {13}, rb = {14};
  for (int s = 0; s < 2; s++) {
    train_step(m, &r, 1);
    train_step(ref, &rr, 1);
  }
  for (int v = 0; v < 3; v++) {
    batch b;
    batch_random(&b, 2, dims2, 4, c.n_classes, &rb);
    snap s0;
    snap_take(m, &s0);
    float lg[12];
    h.poison_fwd = bad[v];
    ck_assert_int_eq(
        imml_forward(m, IMML_MODE_TRAIN, b.B, feats(&b), b.y, lg, NULL),
        IMML_ERR_NONFINITE);
    ck_assert_msg(strstr(imml_model_errmsg(m), "logits") != NULL, "'%s'",
                  imml_model_errmsg(m));
    expect_unchanged(m, &s0, "non-finite host logits (training)");
    ck_assert_int_eq(imml_backward(m, NULL), IMML_ERR_STATE);
    ck_assert_int_eq(
        imml_forward(m, IMML_MODE_EVAL, b.B, feats(&b), b.y, lg, NULL),
        IMML_ERR_NONFINITE);
    ck_assert_str_ne(imml_model_errmsg(m), "");
    ck_assert_int_eq(imml_predict(ws, b.B, feats(&b), lg, NULL, NULL),
                     IMML_ERR_NONFINITE);
    ck_assert_msg(strstr(imml_model_errmsg(ws), "logits") != NULL, "'%s'",
                  imml_model_errmsg(ws));
    ck_assert_int_eq(imml_predict(m, b.B, feats(&b), lg, NULL, NULL),
                     IMML_ERR_NONFINITE);
    ck_assert_msg(strstr(imml_model_errmsg(m), "logits") != NULL, "'%s'",
                  imml_model_errmsg(m));
    expect_unchanged(m, &s0, "non-finite host logits (evaluation)");
    h.poison_fwd = 0.0f;
    snap_free(&s0);

    /* the backward */
    ck_assert_int_eq(
        imml_forward(m, IMML_MODE_TRAIN, b.B, feats(&b), b.y, NULL, NULL),
        IMML_OK);
    ck_assert_int_eq(
        imml_forward(ref, IMML_MODE_TRAIN, b.B, feats(&b), b.y, NULL, NULL),
        IMML_OK);
    snap_take(m, &s0);
    h.poison_bwd = bad[v];
    for (int round = 0; round < 2; round++) {
      ck_assert_int_eq(imml_backward(m, NULL), IMML_ERR_NONFINITE);
      ck_assert_msg(strstr(imml_model_errmsg(m), "dslot") != NULL, "'%s'",
                    imml_model_errmsg(m));
      expect_unchanged(m, &s0, "non-finite host dslots");
    }
    h.poison_bwd = 0.0f;
    backward_ok(m, NULL);
    backward_ok(ref, NULL);
    ck_assert_int_eq(imml_optim_step(m), IMML_OK);
    ck_assert_int_eq(imml_optim_step(ref), IMML_OK);
    snap sa, sb;
    snap_take(m, &sa);
    snap_take(ref, &sb);
    snap_check(&sb, &sa, "after the host recovered");
    snap_free(&sa);
    snap_free(&sb);
    snap_free(&s0);
    batch_free(&b);
  }
  int p, fixed;
  ck_assert_int_eq(imml_predominant_get(m, &p, &fixed), IMML_OK);
  ck_assert_int_eq(fixed, _i);
  imml_model_free(ws);
  imml_model_free(m);
  imml_model_free(ref);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Unimodal logits                                                     */
/* ------------------------------------------------------------------ */

/* imml_unimodal_get reads what the last successful imml_predict on the
 * handle (a share, or the model itself) left: NULL arguments, a modality
 * out of range, no successful prediction yet, or a failed one since, are
 * refused with their status.  A failed prediction must leave nothing to
 * read whether it failed in its argument checks (here: NaN features) or in
 * the forward (non-finite logits): otherwise the unimodal logits of an
 * earlier batch are returned as those of the batch just refused. */
START_TEST(test_unimodal_get_errors) {
  imml_config c;
  small_cfg(&c, 2, dims2);
  imml_model *m = create_ok(&c, NULL);
  imml_model *ws = NULL;
  ck_assert_int_eq(imml_model_share(m, &ws), IMML_OK);
  float o[6 * 3];
  ck_assert_int_eq(imml_unimodal_get(NULL, 0, o), IMML_ERR_NULL);
  ck_assert_int_eq(imml_unimodal_get(ws, 0, NULL), IMML_ERR_NULL);
  ck_assert_int_eq(imml_unimodal_get(ws, 0, o), IMML_ERR_STATE);
  ck_assert_int_eq(imml_unimodal_get(m, 0, o), IMML_ERR_STATE);
  drng r = {18};
  batch b;
  batch_random(&b, 2, dims2, 4, c.n_classes, &r);
  ck_assert_int_eq(imml_predict(ws, 4, feats(&b), NULL, NULL, NULL), IMML_OK);
  /* the share's result is the share's: the model holds none */
  ck_assert_int_eq(imml_unimodal_get(m, 0, o), IMML_ERR_STATE);
  float o0[12], o1[12], again[12];
  ck_assert_int_eq(imml_unimodal_get(ws, 0, o0), IMML_OK);
  ck_assert_int_eq(imml_unimodal_get(ws, 1, o1), IMML_OK);
  ck_assert_int_eq(imml_unimodal_get(ws, -1, o), IMML_ERR_INVALID_ARG);
  ck_assert_int_eq(imml_unimodal_get(ws, 2, o), IMML_ERR_INVALID_ARG);
  ck_assert(memcmp(o0, o1, sizeof o0) != 0);
  /* the same batch again gives the same unimodal logits, on the share and
   * on the model itself */
  ck_assert_int_eq(imml_predict(ws, 4, feats(&b), NULL, NULL, NULL), IMML_OK);
  ck_assert_int_eq(imml_unimodal_get(ws, 0, again), IMML_OK);
  ck_assert(memcmp(o0, again, sizeof o0) == 0);
  ck_assert_int_eq(imml_predict(m, 4, feats(&b), NULL, NULL, NULL), IMML_OK);
  memset(again, 0, sizeof again);
  ck_assert_int_eq(imml_unimodal_get(m, 1, again), IMML_OK);
  ck_assert(memcmp(o1, again, sizeof o1) == 0);
  /* a prediction refused for its arguments leaves nothing to read */
  b.x[1][3] = NAN;
  ck_assert_int_eq(imml_predict(ws, 4, feats(&b), NULL, NULL, NULL),
                   IMML_ERR_NONFINITE);
  ck_assert_int_eq(imml_unimodal_get(ws, 0, o), IMML_ERR_STATE);
  ck_assert_int_eq(imml_predict(m, 4, feats(&b), NULL, NULL, NULL),
                   IMML_ERR_NONFINITE);
  ck_assert_int_eq(imml_unimodal_get(m, 0, o), IMML_ERR_STATE);
  batch_free(&b);
  imml_model_free(ws);
  imml_model_free(m);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Checkpoint state that loads but cannot be used                      */
/* ------------------------------------------------------------------ */

static uint32_t rd32(const unsigned char *b, size_t at) {
  return (uint32_t)b[at] | (uint32_t)b[at + 1] << 8 |
         (uint32_t)b[at + 2] << 16 | (uint32_t)b[at + 3] << 24;
}

static void wr32(unsigned char *b, size_t at, uint32_t v) {
  for (int i = 0; i < 4; i++)
    b[at + (size_t)i] = (unsigned char)(v >> (8 * i));
}

static uint32_t crc32_bitwise(const unsigned char *p, size_t n) {
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; i++) {
    crc ^= p[i];
    for (int j = 0; j < 8; j++)
      crc = (crc & 1u) ? 0xEDB88320u ^ (crc >> 1) : crc >> 1;
  }
  return crc ^ 0xFFFFFFFFu;
}

/* Offset of the optimiser's second moment in a checkpoint (doc/FORMAT.md),
 * and the parameter count. */
static size_t second_moment_at(const unsigned char *b, size_t size,
                               size_t *n_params) {
  const uint32_t M = rd32(b, 24);
  size_t o = 28 + 4 * (size_t)M;
  const uint32_t k = rd32(b, o + 4);
  o += 20 + 16 + 12 + 8 + 4 + 12 + 4 * (size_t)M;
  const uint32_t nt = rd32(b, o);
  o += 4;
  size_t np = 0;
  for (uint32_t i = 0; i < nt; i++) {
    o += 4 + rd32(b, o);
    const size_t cnt = (size_t)rd32(b, o) * rd32(b, o + 4);
    o += 8 + 4 * cnt;
    np += cnt;
  }
  o += 8 + 4 * (size_t)rd32(b, o) * M * k; /* dictionary */
  ck_assert_uint_eq(rd32(b, o), 1);        /* an optimiser */
  o += 52 + 4 * np; /* its fields (48 bytes after the flag), moment 1 */
  ck_assert_uint_le(o + 4 * np + 4, size);
  *n_params = np;
  return o;
}

/* AdamW's second moment is a running mean of squares: a negative value in
 * a checkpoint (finite, so it passes the NaN/Inf check) makes sqrt(v) NaN
 * in every later imml_optim_step, which is then refused for ever with a message
 * blaming the learning rate.  The loader must refuse it as a format error
 * naming the field. */
START_TEST(test_negative_second_moment_refused) {
  imml_config c;
  small_cfg(&c, 2, dims2);
  imml_model *m = create_ok(&c, NULL);
  adamw(m);
  drng r = {19};
  for (int s = 0; s < 2; s++)
    train_step(m, &r, 1);
  size_t size, np;
  unsigned char *buf = save_to_mem(m, &size);
  const size_t at = second_moment_at(buf, size, &np);
  const float neg = -0.5f;
  uint32_t u;
  memcpy(&u, &neg, sizeof u);
  wr32(buf, at + 4 * (np / 2), u);
  wr32(buf, size - 4, crc32_bitwise(buf, size - 4));
  imml_model *l = NULL;
  const imml_status st = imml_model_load_mem(buf, size, NULL, NULL, &l);
  if (st == IMML_OK) {
    const imml_status ss = imml_optim_step(l);
    char msg[256];
    snprintf(msg, sizeof msg, "%s", imml_model_errmsg(l));
    imml_model_free(l);
    ck_abort_msg(
        "a negative AdamW second moment was loaded; imml_optim_step then "
        "gives %d (%s): '%s'",
        (int)ss, imml_status_string(ss), msg);
  }
  ck_assert_ptr_nonnull(l); /* the failed handle */
  ck_assert_msg(st == IMML_ERR_FORMAT, "status %d (%s) '%s'", (int)st,
                imml_status_string(st), imml_model_errmsg(l));
  ck_assert_msg(strstr(imml_model_errmsg(l), "moment") != NULL, "'%s'",
                imml_model_errmsg(l));
  imml_model_free(l);
  free(buf);
  imml_model_free(m);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Absurd sizes: refused before any allocation                         */
/* ------------------------------------------------------------------ */

enum { N_ABSURD = 13 };

/* A create refused as too large "before any allocation": the allocator was
 * asked for nothing bigger than a handle (the failed handle it returns --
 * which comes from the allocator once the config has been validated, from
 * malloc when the config itself is refused -- is the only block
 * outstanding), and once that is freed nothing is left.  The message is
 * copied into err. */
static void too_large_outcome(imml_status st, imml_model *m, fail_alloc *cnt,
                              char *err, size_t n, const char *what) {
  ck_assert_msg(st == IMML_ERR_TOO_LARGE, "%s: status %d (%s) '%s'", what,
                (int)st, imml_status_string(st), imml_model_errmsg(m));
  ck_assert_msg(m != NULL, "%s: no failed handle", what);
  snprintf(err, n, "%s", imml_model_errmsg(m));
  ck_assert_msg(cnt->max_req <= sizeof(struct imml_model),
                "%s: a %zu-byte allocation before the refusal", what,
                cnt->max_req);
  const long held = cnt->mallocs - cnt->frees;
  ck_assert_msg(held == 1 || (held == 0 && cnt->calls == 0),
                "%s: %ld blocks outstanding after %ld allocator calls (at most "
                "the failed handle expected)",
                what, held, cnt->calls);
  imml_model_free(m);
  fa_balanced(cnt, what);
}

static int big_dims[IMML_MAX_MODALITIES];

/* Case i: one field (or one product) beyond the limits; returns the text
 * the message must contain. */
static const char *absurd_case(int i, imml_config *c) {
  small_cfg(c, 2, dims2);
  switch (i) {
  case 0:
    big_dims[0] = INT_MAX;
    big_dims[1] = 7;
    c->dims = big_dims;
    return "dims[0]";
  case 1:
    big_dims[0] = 5;
    big_dims[1] = (1 << 24) + 1;
    c->dims = big_dims;
    return "dims[1]";
  case 2:
    c->hidden_dim = INT_MAX;
    return "hidden_dim";
  case 3:
    c->knowledge_dim = INT_MAX;
    return "knowledge_dim";
  case 4:
    c->n_classes = INT_MAX;
    return "n_classes";
  case 5:
    c->max_batch = INT_MAX;
    return "max_batch";
  case 6:
    c->dict_size = INT_MAX;
    return "dict_size";
  case 7:
    c->n_modalities = INT_MAX;
    return "n_modalities";
  case 8:
    c->n_modalities = IMML_MAX_MODALITIES + 1;
    return "n_modalities";
  case 9:
    c->max_batch = 1 << 30;
    return "max_batch";
  case 10:
    c->dict_size = (1 << 20) + 1;
    return "dict_size";
  case 11: /* a small model over a smaller memory_limit */
    c->memory_limit = 1024;
    return "memory_limit";
  default:
    /* M k beyond the limit although each is within its own */
    for (int m = 0; m < IMML_MAX_MODALITIES; m++)
      big_dims[m] = 3;
    c->n_modalities = IMML_MAX_MODALITIES;
    c->dims = big_dims;
    c->knowledge_dim = 1 << 20;
    return "knowledge_dim";
  }
}

START_TEST(test_absurd_config_sizes) {
  imml_config c;
  const char *field = absurd_case(_i, &c);
  fail_alloc cnt;
  fa_reset(&cnt);
  c.allocator = fa_hooks(&cnt);
  imml_model *m = (imml_model *)&c;
  char err[256] = "", what[32];
  snprintf(what, sizeof what, "case %d", _i);
  const imml_status st = imml_model_create(&c, NULL, &m);
  too_large_outcome(st, m, &cnt, err, sizeof err, what);
  ck_assert_msg(strstr(err, field) != NULL, "case %d: '%s' does not name %s",
                _i, err, field);
}
END_TEST

/* Products of fields each within its own limit but whose model could not
 * exist in a 64-bit address space (more than 2^47 bytes, the x86-64 user
 * space): they must be refused as too large before the allocator is asked
 * for anything but a handle, like a single field beyond its limit. */
enum { N_PRODUCTS = 4 };

START_TEST(test_absurd_products_too_large) {
  imml_config c;
  small_cfg(&c, 2, dims2);
  const char *what = "";
  switch (_i) {
  case 0: /* W1 alone: 2^24 x 2^24 floats = 4 PiB per modality */
    big_dims[0] = 1 << 24;
    big_dims[1] = 1 << 24;
    c.dims = big_dims;
    c.hidden_dim = 1 << 24;
    what = "dims x hidden_dim";
    break;
  case 1: /* W2: 2^24 x 2^20 floats = 64 TiB per modality */
    c.hidden_dim = 1 << 24;
    c.knowledge_dim = 1 << 20;
    what = "hidden_dim x knowledge_dim";
    break;
  case 2: /* Wc: 64 modalities x 2^18 x 2^20 floats */
    for (int m = 0; m < IMML_MAX_MODALITIES; m++)
      big_dims[m] = 3;
    c.n_modalities = IMML_MAX_MODALITIES;
    c.dims = big_dims;
    c.knowledge_dim = 1 << 18;
    c.n_classes = 1 << 20;
    what = "n_modalities x knowledge_dim x n_classes";
    break;
  default: /* every field at its limit */
    for (int m = 0; m < IMML_MAX_MODALITIES; m++)
      big_dims[m] = 1 << 24;
    c.n_modalities = IMML_MAX_MODALITIES;
    c.dims = big_dims;
    c.hidden_dim = 1 << 24;
    c.knowledge_dim = 1 << 18;
    c.n_classes = 1 << 20;
    c.max_batch = 1 << 20;
    c.dict_size = 1 << 20;
    what = "every field at its limit";
    break;
  }
  fail_alloc cnt;
  fa_reset(&cnt);
  c.allocator = fa_hooks(&cnt);
  imml_model *m = (imml_model *)&c;
  char err[256] = "";
  const imml_status st = imml_model_create(&c, NULL, &m);
  too_large_outcome(st, m, &cnt, err, sizeof err, what);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Temporary files of imml_model_save (issue 13, finding 6)            */
/* ------------------------------------------------------------------ */

/* imml_model_save writes PATH.imml-tmp-N (N = 0..7, the first one no other
 * save holds) and renames it over PATH (doc/FORMAT.md).  libimml 0.x wrote
 * PATH.tmp.XXXXXX (mkstemp): a save killed with -9 left its file behind,
 * every later crash added one more, and no save ever removed them. */

/* path.imml-tmp-i */
static void tmp_name(char *out, size_t n, const char *path, int i) {
  snprintf(out, n, "%s.imml-tmp-%d", path, i);
}

/* The file holds exactly size bytes of buf. */
static int file_holds(const char *path, const void *buf, size_t size) {
  size_t n;
  unsigned char *b = read_file(path, &n);
  const int same = n == size && (size == 0 || memcmp(b, buf, size) == 0);
  free(b);
  return same;
}

/* A small trained model and its checkpoint. */
static imml_model *saver_model(uint64_t seed, unsigned char **buf,
                               size_t *size) {
  imml_config c;
  small_cfg(&c, 2, dims2);
  imml_model *m = create_ok(&c, NULL);
  adamw(m);
  drng r = {seed};
  for (int s = 0; s < 3; s++)
    train_step(m, &r, 1);
  *buf = save_to_mem(m, size);
  return m;
}

/* A save killed with -9 leaves PATH.imml-tmp-0 holding what it had
 * written; the next save to PATH takes that name, and leaves no temporary
 * behind.  Files that are not PATH's temporaries are left alone: another
 * checkpoint's (other.imml.imml-tmp-0), names outside the eight
 * (PATH.imml-tmp-8, PATH.imml-tmp-00), and 0.x's PATH.tmp.XXXXXX.  _i: what
 * the killed save had written: 0 half the checkpoint, 1 all of it (killed
 * between fsync and rename), 2 nothing (killed right after creating the
 * file), 3 five bytes (a prefix of the magic), 4 half, beside the files of
 * others. */
START_TEST(test_stale_temporary_reused) {
  unsigned char *buf;
  size_t size;
  imml_model *m = saver_model(31, &buf, &size);
  char dir[512], path[600], t0[640], names[512];
  make_tmpdir(dir, sizeof dir, "imml-faults.");
  snprintf(path, sizeof path, "%s/model.imml", dir);
  tmp_name(t0, sizeof t0, path, 0);
  static const char *const others[] = {
      "other.imml.imml-tmp-0", "model.imml.imml-tmp-8",
      "model.imml.imml-tmp-00", "model.imml.tmp.AbC123"};
  const size_t n_written[] = {size / 2, size, 0, 5, size / 2};
  write_file(t0, buf, n_written[_i]);
  if (_i == 4) {
    for (int i = 0; i < 4; i++) {
      char o[700];
      snprintf(o, sizeof o, "%s/%s", dir, others[i]);
      write_file(o, buf, size / 2);
    }
  } else {
    write_file(path, "an older checkpoint", 19);
  }
  const imml_status st = imml_model_save(m, path);
  ck_assert_msg(st == IMML_OK, "save beside a stale temporary: %d '%s'",
                (int)st, imml_model_errmsg(m));
  list_dir(dir, names, sizeof names);
  if (_i == 4) {
    ck_assert_str_eq(names, "model.imml,model.imml.imml-tmp-00,"
                            "model.imml.imml-tmp-8,model.imml.tmp.AbC123,"
                            "other.imml.imml-tmp-0,");
    for (int i = 0; i < 4; i++) {
      char o[700];
      snprintf(o, sizeof o, "%s/%s", dir, others[i]);
      ck_assert_msg(file_holds(o, buf, size / 2), "%s was changed", others[i]);
    }
  } else {
    ck_assert_str_eq(names, "model.imml,");
  }
  ck_assert_msg(file_holds(path, buf, size), "PATH is not the checkpoint");
  imml_model *r = NULL;
  ck_assert_int_eq(imml_model_load(path, NULL, NULL, &r), IMML_OK);
  ck_assert_msg(same_checkpoint(r, buf, size), "the loaded model differs");
  imml_model_free(r);
  imml_model_free(m);
  free(buf);
  remove_tree(dir);
}
END_TEST

/* A file under a temporary's name that no save of libimml wrote is never
 * touched: not opened for writing, truncated, renamed or removed, and not
 * followed when it is a link; the save takes the next name.  When all
 * eight names are taken the save fails with IMML_ERR_IO, naming them, and
 * PATH keeps its old content.  _i: PATH.imml-tmp-0 is 0 a regular file
 * that does not start with the magic, 1 a link to a file of the user's,
 * 2 a directory, 3 a FIFO, 4 a file starting with 7 bytes of the magic;
 * 5 every one of the eight names is such a regular file. */
START_TEST(test_foreign_temporary_untouched) {
  unsigned char *buf;
  size_t size;
  imml_model *m = saver_model(32, &buf, &size);
  char dir[512], path[600], t0[640], victim[600], names[1024];
  make_tmpdir(dir, sizeof dir, "imml-faults.");
  snprintf(path, sizeof path, "%s/model.imml", dir);
  snprintf(victim, sizeof victim, "%s/victim", dir);
  tmp_name(t0, sizeof t0, path, 0);
  static const char notes[] = "the user's notes, not a checkpoint\n";
  const char old[] = "an older checkpoint";
  write_file(path, old, sizeof old);
  static const char magic7[] = "IMMLCKPx and more";
  switch (_i) {
  case 0:
  case 5:
    write_file(t0, notes, sizeof notes);
    break;
  case 1:
    write_file(victim, notes, sizeof notes);
    ck_assert_int_eq(symlink(victim, t0), 0);
    break;
  case 2:
    ck_assert_int_eq(mkdir(t0, 0700), 0);
    break;
  case 3:
    ck_assert_int_eq(mkfifo(t0, 0600), 0);
    break;
  default:
    write_file(t0, magic7, sizeof magic7);
    break;
  }
  for (int i = 1; _i == 5 && i < 8; i++) {
    char ti[640];
    tmp_name(ti, sizeof ti, path, i);
    write_file(ti, notes, sizeof notes);
  }
  struct stat before, after;
  ck_assert_int_eq(lstat(t0, &before), 0);
  const imml_status st = imml_model_save(m, path);
  ck_assert_int_eq(lstat(t0, &after), 0);
  ck_assert_msg(before.st_ino == after.st_ino &&
                    before.st_mode == after.st_mode &&
                    before.st_size == after.st_size,
                "case %d: PATH.imml-tmp-0 was replaced or changed", _i);
  list_dir(dir, names, sizeof names);
  if (_i == 5) {
    ck_assert_msg(st == IMML_ERR_IO, "every name foreign: status %d (%s)",
                  (int)st, imml_status_string(st));
    ck_assert_msg(strstr(imml_model_errmsg(m), "imml-tmp") != NULL, "'%s'",
                  imml_model_errmsg(m));
    ck_assert_msg(file_holds(path, old, sizeof old), "PATH was changed");
    for (int i = 0; i < 8; i++) {
      char ti[640];
      tmp_name(ti, sizeof ti, path, i);
      ck_assert_msg(file_holds(ti, notes, sizeof notes),
                    "foreign temporary %d was changed", i);
    }
    ck_assert_int_eq(list_dir(dir, names, sizeof names), 9);
  } else {
    ck_assert_msg(st == IMML_OK, "case %d: save: %d '%s'", _i, (int)st,
                  imml_model_errmsg(m));
    ck_assert_msg(file_holds(path, buf, size), "PATH is not the checkpoint");
    if (_i == 1) {
      ck_assert_str_eq(names, "model.imml,model.imml.imml-tmp-0,victim,");
      ck_assert_msg(file_holds(victim, notes, sizeof notes),
                    "the link's target was written");
      char link[640];
      const ssize_t n = readlink(t0, link, sizeof link - 1);
      ck_assert_int_eq(n, (ssize_t)strlen(victim));
      link[n] = '\0';
      ck_assert_str_eq(link, victim);
    } else {
      ck_assert_str_eq(names, "model.imml,model.imml.imml-tmp-0,");
    }
    if (_i == 0)
      ck_assert(file_holds(t0, notes, sizeof notes));
    if (_i == 4)
      ck_assert(file_holds(t0, magic7, sizeof magic7));
  }
  imml_model_free(m);
  free(buf);
  remove_tree(dir);
}
END_TEST

/* A temporary held under flock (a save in progress, in another process or
 * through another open file description of this one) is not taken: the
 * save uses the next name and the held file keeps its bytes.  Once it is
 * released (its saver died), the next save takes it over and nothing is
 * left of it.  _i: 0 held by another open file description of this
 * process, 1 held by another process, 2 all eight names held (the save
 * fails with IMML_ERR_IO, PATH unchanged; after the release
 * PATH.imml-tmp-0 is taken over, and the seven others are left as their
 * savers wrote them, or removed, but not changed). */
START_TEST(test_held_temporary_not_stolen) {
  unsigned char *buf;
  size_t size;
  imml_model *m = saver_model(33, &buf, &size);
  char dir[512], path[600], t0[640], names[1024];
  make_tmpdir(dir, sizeof dir, "imml-faults.");
  snprintf(path, sizeof path, "%s/model.imml", dir);
  tmp_name(t0, sizeof t0, path, 0);
  const char old[] = "an older checkpoint";
  write_file(path, old, sizeof old);
  const int n_held = _i == 2 ? 8 : 1;
  int held[8];
  pid_t holder = -1;
  int ready[2] = {-1, -1}, go[2] = {-1, -1};
  for (int i = 0; i < n_held; i++) {
    char ti[640];
    tmp_name(ti, sizeof ti, path, i);
    write_file(ti, buf, size / 2); /* a save's partial file */
  }
  if (_i == 1) {
    ck_assert_int_eq(pipe(ready), 0);
    ck_assert_int_eq(pipe(go), 0);
    fflush(stdout);
    fflush(stderr);
    holder = fork();
    ck_assert_int_ge(holder, 0);
    if (holder == 0) {
      alarm(120); /* never outlive a test that died */
      const int fd = open(t0, O_RDWR);
      char c = 'r';
      if (fd < 0 || flock(fd, LOCK_EX) != 0 || write(ready[1], &c, 1) != 1)
        _exit(2);
      if (read(go[0], &c, 1) < 0)
        _exit(3);
      _exit(0);
    }
    char c;
    ck_assert_int_eq(read(ready[0], &c, 1), 1);
  } else {
    for (int i = 0; i < n_held; i++) {
      char ti[640];
      tmp_name(ti, sizeof ti, path, i);
      held[i] = open(ti, O_RDWR);
      ck_assert_int_ge(held[i], 0);
      ck_assert_int_eq(flock(held[i], LOCK_EX), 0);
    }
  }
  struct stat before, after;
  ck_assert_int_eq(stat(t0, &before), 0);
  imml_status st = imml_model_save(m, path);
  ck_assert_int_eq(stat(t0, &after), 0);
  ck_assert_msg(before.st_ino == after.st_ino,
                "the held temporary was renamed away");
  for (int i = 0; i < n_held; i++) {
    char ti[640];
    tmp_name(ti, sizeof ti, path, i);
    ck_assert_msg(file_holds(ti, buf, size / 2),
                  "held temporary %d was written", i);
  }
  if (_i == 2) {
    ck_assert_msg(st == IMML_ERR_IO, "all eight held: status %d (%s)", (int)st,
                  imml_status_string(st));
    ck_assert_msg(strstr(imml_model_errmsg(m), "imml-tmp") != NULL, "'%s'",
                  imml_model_errmsg(m));
    ck_assert_msg(file_holds(path, old, sizeof old), "PATH was changed");
    ck_assert_int_eq(list_dir(dir, names, sizeof names), 9);
  } else {
    ck_assert_msg(st == IMML_OK, "save beside a held temporary: %d '%s'",
                  (int)st, imml_model_errmsg(m));
    ck_assert_msg(file_holds(path, buf, size), "PATH is not the checkpoint");
    list_dir(dir, names, sizeof names);
    ck_assert_str_eq(names, "model.imml,model.imml.imml-tmp-0,");
  }
  /* the holder goes away without cleaning up, as a killed save does */
  if (_i == 1) {
    char c = 'g';
    ck_assert_int_eq(write(go[1], &c, 1), 1);
    int ws = 0;
    ck_assert_int_eq(waitpid(holder, &ws, 0), holder);
    ck_assert_msg(WIFEXITED(ws) && WEXITSTATUS(ws) == 0, "holder: 0x%x",
                  (unsigned)ws);
    close(ready[0]);
    close(ready[1]);
    close(go[0]);
    close(go[1]);
  } else {
    for (int i = 0; i < n_held; i++)
      close(held[i]);
  }
  st = imml_model_save(m, path);
  ck_assert_msg(st == IMML_OK, "save after the release: %d '%s'", (int)st,
                imml_model_errmsg(m));
  ck_assert_msg(file_holds(path, buf, size), "PATH is not the checkpoint");
  struct stat sb;
  ck_assert_msg(lstat(t0, &sb) != 0, "the released temporary is still there");
  /* the other released names: still holding what their savers wrote, or
   * gone, but nothing else */
  for (int i = 1; i < n_held; i++) {
    char ti[640];
    tmp_name(ti, sizeof ti, path, i);
    ck_assert_msg(lstat(ti, &sb) != 0 || file_holds(ti, buf, size / 2),
                  "released temporary %d was changed", i);
  }
  ck_assert_int_le(list_dir(dir, names, sizeof names), n_held);
  ck_assert_msg(!strncmp(names, "model.imml,", 11), "%s", names);
  imml_model_free(m);
  free(buf);
  remove_tree(dir);
}
END_TEST

/* Real crashes: a child process saves the model to PATH again and again;
 * the test stops it (SIGSTOP) at a pseudo-random moment until it is caught
 * with its temporary file open, and kills it with -9.  Three such crashes
 * in a row leave at most one temporary (each new saver takes the dead
 * one's file), PATH always holds a complete checkpoint (the rename is
 * atomic), and one more save leaves PATH alone in the directory.  (0.x
 * left one more PATH.tmp.XXXXXX per crash, for ever.) */
#define KILL_ROUNDS 3
#define KILL_ATTEMPTS 20000

static void saver_child(imml_model *m, const char *path, int fd) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = SIG_DFL;
  sigaction(SIGALRM, &sa, NULL);
  alarm(300); /* never outlive a test that died */
  for (long i = 0;; i++) {
    if (imml_model_save(m, path) != IMML_OK)
      _exit(2);
    const char c = 's';
    if (i == 0 && write(fd, &c, 1) != 1)
      _exit(3);
  }
}

START_TEST(test_kill9_during_saves) {
  /* large enough that writing the file is a good part of each save */
  static const int dims[2] = {300, 200};
  imml_config c;
  small_cfg(&c, 2, dims);
  c.hidden_dim = 256;
  c.knowledge_dim = 32;
  imml_model *m = create_ok(&c, NULL);
  adamw(m);
  size_t size;
  unsigned char *buf = save_to_mem(m, &size);
  char dir[512], path[600], t0[640], names[1024];
  make_tmpdir(dir, sizeof dir, "imml-faults.");
  snprintf(path, sizeof path, "%s/model.imml", dir);
  tmp_name(t0, sizeof t0, path, 0);
  drng r = {34};
  for (int round = 0; round < KILL_ROUNDS; round++) {
    int fds[2];
    ck_assert_int_eq(pipe(fds), 0);
    fflush(stdout);
    fflush(stderr);
    const pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
      close(fds[0]);
      saver_child(m, path, fds[1]);
    }
    close(fds[1]);
    char ch;
    ck_assert_int_eq(read(fds[0], &ch, 1), 1); /* one save done */
    close(fds[0]);
    int caught = 0, ws = 0;
    for (int a = 0; a < KILL_ATTEMPTS && !caught; a++) {
      const struct timespec ts = {0, 20000 + (long)(drng_u64(&r) % 1000000)};
      nanosleep(&ts, NULL);
      ck_assert_int_eq(kill(pid, SIGSTOP), 0);
      ck_assert_int_eq(waitpid(pid, &ws, WUNTRACED), pid);
      ck_assert_msg(WIFSTOPPED(ws), "the saver ended: status 0x%x",
                    (unsigned)ws);
      struct stat sb;
      caught = lstat(t0, &sb) == 0;
      ck_assert_int_eq(kill(pid, caught ? SIGKILL : SIGCONT), 0);
    }
    if (!caught)
      kill(pid, SIGKILL);
    ck_assert_int_eq(waitpid(pid, &ws, 0), pid);
    ck_assert_msg(caught,
                  "round %d: the saver was never caught with its "
                  "temporary file in %d attempts",
                  round, KILL_ATTEMPTS);
    ck_assert(WIFSIGNALED(ws) && WTERMSIG(ws) == SIGKILL);
    /* one stale file, however many savers died */
    list_dir(dir, names, sizeof names);
    ck_assert_msg(!strcmp(names, "model.imml,model.imml.imml-tmp-0,"),
                  "after crash %d: %s", round + 1, names);
    ck_assert_msg(file_holds(path, buf, size),
                  "after crash %d, PATH is not a whole checkpoint", round + 1);
  }
  const imml_status st = imml_model_save(m, path);
  ck_assert_msg(st == IMML_OK, "save after the crashes: %d '%s'", (int)st,
                imml_model_errmsg(m));
  list_dir(dir, names, sizeof names);
  ck_assert_str_eq(names, "model.imml,");
  ck_assert(file_holds(path, buf, size));
  imml_model_free(m);
  free(buf);
  remove_tree(dir);
}
END_TEST

static Suite *faults_suite(void) {
  Suite *s = suite_create("faults");
  TCase *tc = tcase_create("nomem");
  tcase_add_loop_test(tc, test_nomem_create, 0, 2);
  tcase_add_loop_test(tc, test_nomem_load, 0, 6);
  tcase_add_test(tc, test_nomem_optim_setup);
  tcase_add_loop_test(tc, test_nomem_share, 0, 2);
  tcase_add_test(tc, test_nomem_save);
  suite_add_tcase(s, tc);
  tc = tcase_create("nonfinite");
  tcase_add_loop_test(tc, test_exploding_lr, 0, 2);
  tcase_add_loop_test(tc, test_backward_overflow_refused, 0, 6);
  tcase_add_loop_test(tc, test_host_nonfinite_outputs, 0, 2);
  suite_add_tcase(s, tc);
  tc = tcase_create("collective");
  tcase_add_test(tc, test_nomem_collective_set);
  tcase_add_loop_test(tc, test_collective_garbage_refused, 0, N_GARBAGE);
  tcase_add_loop_test(tc, test_collective_empty_dictionary, 0, 2);
  suite_add_tcase(s, tc);
  tc = tcase_create("shapes");
  tcase_add_test(tc, test_unimodal_get_errors);
  tcase_add_loop_test(tc, test_absurd_config_sizes, 0, N_ABSURD);
  tcase_add_loop_test(tc, test_absurd_products_too_large, 0, N_PRODUCTS);
  suite_add_tcase(s, tc);
  tc = tcase_create("checkpoint");
  tcase_add_test(tc, test_negative_second_moment_refused);
  suite_add_tcase(s, tc);
  tc = tcase_create("temporaries");
  tcase_add_loop_test(tc, test_stale_temporary_reused, 0, 5);
  tcase_add_loop_test(tc, test_foreign_temporary_untouched, 0, 6);
  tcase_add_loop_test(tc, test_held_temporary_not_stolen, 0, 3);
  tcase_add_test(tc, test_kill9_during_saves);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) { return imml_run_suite(faults_suite()); }
