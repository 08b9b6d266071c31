/* Data-parallel training (imml_collective_set, experimental,
 * doc/DISTRIBUTED.md): R ranks simulated in one process with threads, the
 * allgather given through shared memory and a barrier, the gradient
 * allreduce done by the "host" (sum over ranks in rank order, divided by
 * R).  A step is forward, backward (K micro-batches), commit, then the
 * allreduce and the optimiser step.  Every rank must end with the
 * parameters, strata dictionary, predominant-modality state and losses of
 * one model trained on the whole global batch, with gradient accumulation
 * too; ranks must agree on a predominant modality the host fixes; and the
 * collective's errors (failing or inconsistent allgather, arguments, state)
 * change nothing.
 *
 * Tolerance.  A rank sums over its own rows (B_r of them) where the single
 * process sums over all G rows, and the host then adds R partial sums: the
 * same float32 terms in another order.  A reordered sum of n terms differs
 * by up to about n u (u = 2^-24 = 6e-8) relative to the sum of the terms'
 * magnitudes: ~1e-6 for the sums here (G = 12 rows, R <= 4, inner GEMM sums
 * of k, H and the feature widths <= 8), more relative to the result where
 * the sum cancels (bias gradients, the softmax backward of the attention).
 * Checked from the same state (the ranks' state before each step put into a
 * single-process "oracle"): gradients per tensor, norm-wise, observed up to
 * 2.6e-6, dL/dh 2.4e-7, losses 4e-16; TOL = 1e-5.  Over a whole run (6
 * steps against an independently trained single process) these differences
 * are carried by the optimiser: SGD observed 4.3e-7 on the parameters (TOL);
 * AdamW, whose update lr m / sqrt(v) turns the relative error of a gradient
 * entry into an absolute change of lr times it (largest where a gradient is
 * near zero), observed 3.4e-6 (TOL_ADAMW = 1e-4).  A real error (a wrong
 * scale R or B_r/G, a row offset, a missing term) is of order 1e-2 .. 1.
 * Integer-derived state (dictionary fill and ring position, warm-up steps
 * and EMAs, the predominant modality) must be identical, and every rank
 * must hold the same bits as every other. */
#include "check_main.h"
#include "common.h"

#include "cache.h"
#include "imml.h"
#include "internal.h"

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_R 4
#define G_ROWS 12
#define N_STEPS 6
#define N_CLASSES 3
#define TOL 1e-5
#define TOL_ADAMW 1e-4

/* ------------------------------------------------------------------ */
/* Helpers                                                             */
/* ------------------------------------------------------------------ */

static void *xmemdup(const void *src, size_t bytes) {
  void *p = xcalloc(1, bytes);
  memcpy(p, src, bytes);
  return p;
}

/* ||a - b|| / max(||b||, 1e-12), in double. */
static double rel_err(const float *a, const float *b, size_t n) {
  double d = 0.0, r = 0.0;
  for (size_t i = 0; i < n; i++) {
    const double e = (double)a[i] - (double)b[i];
    d += e * e;
    r += (double)b[i] * (double)b[i];
  }
  return sqrt(d) / fmax(sqrt(r), 1e-12);
}

static double rel_err_d(double a, double b) {
  return fabs(a - b) / fmax(fabs(b), 1e-12);
}

/* Runs of a scenario die loudly if a rank thread meets a library error: a
 * rank that stopped would leave the others waiting at a barrier. */
static void die_rank(int rank, const char *what, imml_status st,
                     const imml_model *m) {
  fprintf(stderr, "rank %d: %s: %s: %s\n", rank, what, imml_status_string(st),
          imml_model_errmsg(m));
  fflush(stderr);
  _Exit(3);
}

static const int k_dims[3] = {5, 7, 4};

/* The allgather message of one rank (lib/model.c, gather_batch): its batch
 * size, its fixed p (-1: not fixed), M unimodal cross-entropy sums (each a
 * double as two floats, hi and lo), max_batch labels, then M blocks of
 * max_batch x k knowledge. */
#define MSG_B 0
#define MSG_P 1
#define MSG_HEAD 2

static size_t msg_floats(int M, int max_batch, int k) {
  return MSG_HEAD + 2 * (size_t)M + (size_t)max_batch * (1 + (size_t)M * k);
}

/* ------------------------------------------------------------------ */
/* Scenarios                                                           */
/* ------------------------------------------------------------------ */

typedef struct scen {
  int R;
  int shard[MAX_R]; /* rows of every rank; they sum to G_ROWS */
  int M;
  int slot_mode;
  int predominant; /* -1: automatic, warm-up of 3 steps */
  int optimizer;
  int dict_size;
  int rank_max_batch; /* 0: the largest shard */
} scen;

static const int k_shards[][MAX_R + 1] = {
    /* R, shard sizes */
    {1, 12, 0, 0, 0}, {2, 6, 6, 0, 0}, {2, 9, 3, 0, 0}, {3, 4, 4, 4, 0},
    {3, 6, 5, 1, 0},  {4, 3, 3, 3, 3}, {4, 4, 4, 2, 2},
};
#define N_SHARDS ((int)(sizeof k_shards / sizeof k_shards[0]))
#define N_SCEN (N_SHARDS * 8)

/* Scenario i: shard layout i % N_SHARDS, then slot mode, predominant given
 * (modality 1, the first step attends over the gathered global batch) or
 * automatic, and M = 2 (SGD with momentum) or M = 3 (AdamW). */
static scen scen_get(int i) {
  scen s;
  memset(&s, 0, sizeof s);
  const int *sh = k_shards[i % N_SHARDS];
  s.R = sh[0];
  for (int r = 0; r < s.R; r++)
    s.shard[r] = sh[1 + r];
  const int v = i / N_SHARDS;
  s.slot_mode = (v & 1) ? IMML_SLOT_STRICT : IMML_SLOT_CONDITIONAL;
  s.predominant = (v & 2) ? -1 : 1;
  s.M = (v & 4) ? 3 : 2;
  s.optimizer = (v & 4) ? IMML_OPTIM_ADAMW : IMML_OPTIM_SGD;
  /* J >= G so that the first step's transient strata (the gathered G rows)
   * fit the attention scratch of a rank whose max_batch is its shard (see
   * test_known_bug_gathered_strata_exceed_jmax); with M = 3 the ring wraps
   * (6 steps of 12 rows > 32 entries). */
  s.dict_size = s.M == 3 ? 32 : 64;
  return s;
}

static void scen_config(const scen *s, int max_batch, imml_config *c) {
  imml_config_init(c);
  c->n_modalities = s->M;
  c->dims = k_dims;
  c->hidden_dim = 8;
  c->knowledge_dim = 6;
  c->n_classes = N_CLASSES;
  c->max_batch = max_batch;
  c->dict_size = s->dict_size;
  c->beta = 0.5f;
  c->gamma1 = 0.5f;
  c->gamma2 = 1.0f;
  c->tau = 0.5f;
  c->predominant = s->predominant;
  c->warmup_steps = 3;
  c->slot_mode = s->slot_mode;
  c->seed = 11;
}

static imml_model *mk(const imml_config *c) { return create_ok(c, NULL); }

static imml_status optim(imml_model *m, int kind) {
  imml_optim_config oc;
  imml_optim_config_init(&oc, (imml_optim_kind)kind);
  if (kind == IMML_OPTIM_SGD) {
    oc.lr = 0.05f;
    oc.momentum = 0.9f;
  } else {
    oc.lr = 0.01f;
  }
  return imml_optim_setup(m, &oc);
}

/* The global batches of every step: G_ROWS rows, labels 0..C-1. */
typedef struct gdata {
  int M;
  float *x[N_STEPS][IMML_MAX_MODALITIES];
  int *y[N_STEPS];
} gdata;

static void gdata_make(gdata *d, int M, uint64_t seed) {
  drng r = {seed};
  memset(d, 0, sizeof *d);
  d->M = M;
  for (int s = 0; s < N_STEPS; s++) {
    for (int m = 0; m < M; m++) {
      const size_t n = (size_t)G_ROWS * (size_t)k_dims[m];
      d->x[s][m] = xcalloc(n, sizeof(float));
      for (size_t i = 0; i < n; i++)
        d->x[s][m][i] = drng_unif(&r);
    }
    d->y[s] = xcalloc(G_ROWS, sizeof(int));
    for (int i = 0; i < G_ROWS; i++)
      d->y[s][i] = (int)(drng_u64(&r) % N_CLASSES);
  }
}

static void gdata_free(gdata *d) {
  for (int s = 0; s < N_STEPS; s++) {
    for (int m = 0; m < d->M; m++)
      free(d->x[s][m]);
    free(d->y[s]);
  }
}

/* The state that decides a model's next step. */
typedef struct mstate {
  float *params, *dict;
  int fill, pos, p, fixed, steps;
  float ema[IMML_MAX_MODALITIES];
} mstate;

static size_t dict_floats(const imml_model *m) {
  return (size_t)m->cfg.dict_size * (size_t)m->cfg.n_modalities *
         (size_t)m->cfg.knowledge_dim;
}

static void state_take(mstate *s, imml_model *m) {
  float *data;
  size_t n;
  imml_param_flat(m, &data, NULL, &n);
  s->params = xmemdup(data, n * sizeof(float));
  s->dict = xmemdup(m->dict, dict_floats(m) * sizeof(float));
  s->fill = imml_fdc_dict_fill(m);
  s->pos = m->dict_pos;
  imml_predominant_get(m, &s->p, &s->fixed);
  imml_warmup_get(m, &s->steps, s->ema);
}

/* Puts a state into a fresh model (same configuration up to max_batch). */
static void state_put(imml_model *m, const mstate *s) {
  memcpy(m->params, s->params, m->n_params * sizeof(float));
  imml_cache_note(m, IMML_EV_PARAMS_CHANGED, NULL); /* behind its back */
  memcpy(m->dict, s->dict, dict_floats(m) * sizeof(float));
  m->dict_fill = s->fill;
  m->dict_pos = s->pos;
  m->p = s->fixed ? s->p : -1;
  m->p_fixed = s->fixed;
  m->steps = s->steps;
  memcpy(m->ema, s->ema, sizeof m->ema);
}

static void state_free(mstate *s) {
  free(s->params);
  free(s->dict);
  memset(s, 0, sizeof *s);
}

/* imml_predominant_get reports (want_p, want_fixed). */
static void expect_predominant(imml_model *m, int want_p, int want_fixed,
                               const char *what) {
  int p = -7, fixed = -7;
  ck_assert_int_eq(imml_predominant_get(m, &p, &fixed), IMML_OK);
  ck_assert_msg(p == want_p && fixed == want_fixed,
                "%s: predominant (%d, fixed %d), want (%d, fixed %d)", what, p,
                fixed, want_p, want_fixed);
}

/* What one run (the reference, the oracle, or one rank) leaves behind. */
typedef struct record {
  imml_losses loss[N_STEPS];
  float *grad[N_STEPS]; /* reduced gradients fed to imml_optim_step */
  float *dh[N_STEPS][IMML_MAX_MODALITIES];
  mstate pre[N_STEPS]; /* state before each step (ranks) */
  mstate fin;          /* state after the last step */
  size_t n_params;
} record;

static void record_free(record *rec, int M) {
  for (int s = 0; s < N_STEPS; s++) {
    free(rec->grad[s]);
    for (int m = 0; m < M; m++)
      free(rec->dh[s][m]);
    state_free(&rec->pre[s]);
  }
  state_free(&rec->fin);
  memset(rec, 0, sizeof *rec);
}

/* One single-process step on global batch `st` into rec (loss, gradient
 * before the update, dL/dh). */
static void single_step(imml_model *m, const gdata *d, int st, record *rec) {
  float *dh[IMML_MAX_MODALITIES];
  for (int mm = 0; mm < d->M; mm++)
    dh[mm] = rec->dh[st][mm] =
        xcalloc((size_t)G_ROWS * (size_t)k_dims[mm], sizeof(float));
  imml_status e =
      imml_forward(m, IMML_MODE_TRAIN, G_ROWS, (const float *const *)d->x[st],
                   d->y[st], NULL, &rec->loss[st]);
  ck_assert_msg(e == IMML_OK, "single-process forward: %s",
                imml_model_errmsg(m));
  e = imml_backward(m, dh);
  ck_assert_msg(e == IMML_OK, "single-process backward: %s",
                imml_model_errmsg(m));
  e = imml_commit(m);
  ck_assert_msg(e == IMML_OK, "single-process commit: %s",
                imml_model_errmsg(m));
  float *g;
  size_t n;
  imml_param_flat(m, NULL, &g, &n);
  rec->n_params = n;
  rec->grad[st] = xmemdup(g, n * sizeof(float));
}

/* The reference: one process trained on the whole global batches. */
static void run_reference(const scen *s, const gdata *d, record *rec) {
  imml_config c;
  scen_config(s, G_ROWS, &c);
  imml_model *m = mk(&c);
  ck_assert_int_eq(optim(m, s->optimizer), IMML_OK);
  memset(rec, 0, sizeof *rec);
  for (int st = 0; st < N_STEPS; st++) {
    single_step(m, d, st, rec);
    const imml_status e = imml_optim_step(m);
    ck_assert_msg(e == IMML_OK, "reference step: %s", imml_model_errmsg(m));
  }
  state_take(&rec->fin, m);
  imml_model_free(m);
}

/* ------------------------------------------------------------------ */
/* R ranks as threads                                                  */
/* ------------------------------------------------------------------ */

typedef struct world world;

typedef struct rank_ctx {
  world *w;
  int rank;
} rank_ctx;

struct world {
  const scen *s;
  const gdata *d;
  int R;
  pthread_barrier_t bar;
  float *gbuf; /* R * count floats of the allgather */
  size_t gcap; /* its capacity */
  float *rbuf; /* R * n_params of the gradient allreduce */
  size_t n_params;
  rank_ctx ctx[MAX_R];
  record rec[MAX_R];
  imml_model *model[MAX_R];
  void *arg; /* what a test's own rank threads need */
};

/* The imml_collective callback: every rank writes its message into the
 * shared buffer, waits for all, reads all of them, and waits again so that
 * nobody overwrites the buffer while another rank still reads it. */
static int thread_allgather(void *user_data, const float *send, size_t count,
                            float *recv) {
  rank_ctx *c = user_data;
  world *w = c->w;
  if (count * (size_t)w->R > w->gcap) {
    fprintf(stderr, "allgather: %zu floats exceed the buffer\n", count);
    _Exit(4);
  }
  memcpy(w->gbuf + (size_t)c->rank * count, send, count * sizeof(float));
  pthread_barrier_wait(&w->bar);
  memcpy(recv, w->gbuf, (size_t)w->R * count * sizeof(float));
  pthread_barrier_wait(&w->bar);
  return 0;
}

/* The host's allreduce: sum in rank order, then divide by R; every rank
 * gets the same bits. */
static void thread_allreduce_mean(world *w, int rank, float *g) {
  const size_t n = w->n_params;
  memcpy(w->rbuf + (size_t)rank * n, g, n * sizeof(float));
  pthread_barrier_wait(&w->bar);
  for (size_t i = 0; i < n; i++) {
    float sum = 0.0f;
    for (int r = 0; r < w->R; r++)
      sum += w->rbuf[(size_t)r * n + i];
    g[i] = sum / (float)w->R;
  }
  pthread_barrier_wait(&w->bar);
}

static int shard_offset(const scen *s, int rank) {
  int off = 0;
  for (int r = 0; r < rank; r++)
    off += s->shard[r];
  return off;
}

static void *rank_main(void *arg) {
  rank_ctx *c = arg;
  world *w = c->w;
  const scen *s = w->s;
  const int r = c->rank, B = s->shard[r], off = shard_offset(s, r);
  imml_model *m = w->model[r];
  record *rec = &w->rec[r];
  for (int st = 0; st < N_STEPS; st++) {
    const float *x[IMML_MAX_MODALITIES];
    float *dh[IMML_MAX_MODALITIES];
    for (int mm = 0; mm < s->M; mm++) {
      x[mm] = w->d->x[st][mm] + (size_t)off * (size_t)k_dims[mm];
      dh[mm] = rec->dh[st][mm];
    }
    state_take(&rec->pre[st], m);
    imml_status e = imml_forward(m, IMML_MODE_TRAIN, B, x, w->d->y[st] + off,
                                 NULL, &rec->loss[st]);
    if (e != IMML_OK)
      die_rank(r, "imml_forward", e, m);
    e = imml_backward(m, dh);
    if (e != IMML_OK)
      die_rank(r, "imml_backward", e, m);
    e = imml_commit(m);
    if (e != IMML_OK)
      die_rank(r, "imml_commit", e, m);
    float *g;
    imml_param_flat(m, NULL, &g, NULL);
    thread_allreduce_mean(w, r, g);
    memcpy(rec->grad[st], g, w->n_params * sizeof(float));
    e = imml_optim_step(m);
    if (e != IMML_OK)
      die_rank(r, "imml_optim_step", e, m);
  }
  return NULL;
}

/* R models of configuration c, each attached to the world's collective as
 * rank r, and the buffers the ranks share. */
static void world_open(world *w, int R, const imml_config *c) {
  w->R = R;
  w->gcap =
      msg_floats(c->n_modalities, c->max_batch, c->knowledge_dim) * (size_t)R;
  w->gbuf = xcalloc(w->gcap, sizeof(float));
  ck_assert_int_eq(pthread_barrier_init(&w->bar, NULL, (unsigned)R), 0);
  for (int r = 0; r < R; r++) {
    w->model[r] = mk(c);
    w->ctx[r].w = w;
    w->ctx[r].rank = r;
    imml_collective col;
    imml_collective_init(&col);
    col.world_size = R;
    col.rank = r;
    col.allgather = thread_allgather;
    col.user_data = &w->ctx[r];
    ck_assert_int_eq(imml_collective_set(w->model[r], &col), IMML_OK);
    ck_assert_int_eq(imml_param_flat(w->model[r], NULL, NULL, &w->n_params),
                     IMML_OK);
  }
  w->rbuf = xcalloc(w->n_params * (size_t)R, sizeof(float));
}

/* Runs fn(&ctx[r]) on one thread per rank and waits for all of them. */
static void world_run(world *w, void *(*fn)(void *)) {
  pthread_t th[MAX_R];
  for (int r = 0; r < w->R; r++)
    ck_assert_int_eq(pthread_create(&th[r], NULL, fn, &w->ctx[r]), 0);
  for (int r = 0; r < w->R; r++)
    ck_assert_int_eq(pthread_join(th[r], NULL), 0);
}

/* Frees the models still open and the shared buffers. */
static void world_close(world *w) {
  for (int r = 0; r < w->R; r++) {
    imml_model_free(w->model[r]);
    w->model[r] = NULL;
  }
  pthread_barrier_destroy(&w->bar);
  free(w->gbuf);
  free(w->rbuf);
  w->gbuf = w->rbuf = NULL;
}

/* Trains the scenario on R threads; rec[r] holds rank r's record. */
static void run_world(world *w, const scen *s, const gdata *d) {
  memset(w, 0, sizeof *w);
  w->s = s;
  w->d = d;
  int bmax = s->rank_max_batch;
  if (bmax == 0)
    for (int r = 0; r < s->R; r++)
      if (s->shard[r] > bmax)
        bmax = s->shard[r];
  imml_config c;
  scen_config(s, bmax, &c);
  world_open(w, s->R, &c);
  for (int r = 0; r < s->R; r++) {
    ck_assert_int_eq(optim(w->model[r], s->optimizer), IMML_OK);
    record *rec = &w->rec[r];
    for (int st = 0; st < N_STEPS; st++) {
      rec->grad[st] = xcalloc(w->n_params, sizeof(float));
      for (int mm = 0; mm < s->M; mm++)
        rec->dh[st][mm] =
            xcalloc((size_t)s->shard[r] * (size_t)k_dims[mm], sizeof(float));
    }
  }
  world_run(w, rank_main);
  for (int r = 0; r < s->R; r++) {
    w->rec[r].n_params = w->n_params;
    state_take(&w->rec[r].fin, w->model[r]);
  }
  world_close(w);
}

static void world_free(world *w) {
  for (int r = 0; r < w->R; r++)
    record_free(&w->rec[r], w->s->M);
}

/* Per-tensor norm-wise relative error of two flat parameter blocks laid
 * out like `model`'s (imml_param_get order, no padding); the largest one. */
static double tensor_err(imml_model *model, const float *a, const float *b,
                         const char **worst) {
  double e = 0.0;
  size_t off = 0;
  for (int t = 0; t < imml_param_count(model); t++) {
    imml_param_view v;
    ck_assert_int_eq(imml_param_get(model, t, &v), IMML_OK);
    const size_t cnt = (size_t)v.rows * (size_t)v.cols;
    const double x = rel_err(a + off, b + off, cnt);
    if (x > e) {
      e = x;
      *worst = v.name;
    }
    off += cnt;
  }
  return e;
}

/* Warm-up EMAs of a collective run against a single process: the global
 * cross-entropy is summed over ranks' shares (each rank's mean times its
 * rows), the single process's over rows, so the two agree to rounding, not
 * bit for bit (METHOD.md section 5). */
static int ema_close(const float *a, const float *b, int M, double tol) {
  for (int m = 0; m < M; m++)
    if (!(fabs((double)a[m] - (double)b[m]) <=
          tol * (1.0 + fabs((double)b[m]))))
      return 0;
  return 1;
}

static void state_same(const mstate *a, const mstate *b, size_t np,
                       size_t dict_n, int M, const char *what) {
  ck_assert_msg(memcmp(a->params, b->params, np * sizeof(float)) == 0,
                "%s: parameters differ", what);
  ck_assert_msg(memcmp(a->dict, b->dict, dict_n * sizeof(float)) == 0,
                "%s: dictionaries differ", what);
  ck_assert_msg(a->fill == b->fill && a->pos == b->pos && a->p == b->p &&
                    a->fixed == b->fixed && a->steps == b->steps &&
                    memcmp(a->ema, b->ema, (size_t)M * sizeof(float)) == 0,
                "%s: fill %d/%d pos %d/%d p %d/%d fixed %d/%d steps %d/%d "
                "(or EMAs) differ",
                what, a->fill, b->fill, a->pos, b->pos, a->p, b->p, a->fixed,
                b->fixed, a->steps, b->steps);
}

/* The checks of one scenario.  max_err receives the largest relative
 * errors seen: per-step gradient, dL/dh, losses; parameters and dictionary
 * after the last step. */
static void compare_world(const scen *s, const world *w, const gdata *d,
                          const record *ref, double *max_err) {
  imml_config c;
  scen_config(s, G_ROWS, &c);
  imml_model *oracle = mk(&c);
  const size_t np = ref->n_params, dict_n = dict_floats(oracle);
  const char *worst = "";
  const record *q0 = &w->rec[0];
  /* 1. Every rank holds the same bits before every step and at the end:
   *    it applied the same reduced gradient and pushed the same gathered
   *    rows. */
  for (int r = 1; r < s->R; r++) {
    char what[64];
    for (int st = 0; st < N_STEPS; st++) {
      snprintf(what, sizeof what, "rank %d vs rank 0 before step %d", r, st);
      state_same(&w->rec[r].pre[st], &q0->pre[st], np, dict_n, s->M, what);
    }
    snprintf(what, sizeof what, "rank %d vs rank 0 at the end", r);
    state_same(&w->rec[r].fin, &q0->fin, np, dict_n, s->M, what);
  }
  /* 2. Each step, from the ranks' state before it, equals the
   *    single-process step on the global batch from that same state (the
   *    oracle): reduced gradient, dL/dh, losses, and the state it leads
   *    to.  Only summation order differs: TOL. */
  record orc;
  memset(&orc, 0, sizeof orc);
  for (int st = 0; st < N_STEPS; st++) {
    imml_grad_zero(oracle);
    state_put(oracle, &q0->pre[st]);
    single_step(oracle, d, st, &orc);
    double e = tensor_err(oracle, q0->grad[st], orc.grad[st], &worst);
    ck_assert_msg(e <= TOL, "step %d: gradient of %s: relative error %g", st,
                  worst, e);
    if (getenv("IMML_TEST_VERBOSE") && e > 1e-6)
      fprintf(stderr, "  step %d: gradient of %s: %.2g\n", st, worst, e);
    max_err[0] = fmax(max_err[0], e);
    /* Input gradients: rank r's rows carry R times the global gradient (so
     * that host encoders' gradients average like the library's). */
    for (int mm = 0; mm < s->M; mm++) {
      const size_t dm = (size_t)k_dims[mm];
      float *cat = xcalloc((size_t)G_ROWS * dm, sizeof(float));
      for (int r = 0; r < s->R; r++) {
        const size_t o = (size_t)shard_offset(s, r) * dm;
        for (size_t i = 0; i < (size_t)s->shard[r] * dm; i++)
          cat[o + i] = w->rec[r].dh[st][mm][i] / (float)s->R;
      }
      e = rel_err(cat, orc.dh[st][mm], (size_t)G_ROWS * dm);
      free(cat);
      ck_assert_msg(e <= TOL, "step %d: dL/dh[%d]: relative error %g", st, mm,
                    e);
      max_err[1] = fmax(max_err[1], e);
    }
    /* Losses: con is the global value on every rank; ce and dis are the
     * rank's own means, whose B_r/G-weighted sum (the plain mean when the
     * shards are equal) is the global one. */
    const imml_losses *L = &orc.loss[st];
    double ce = 0.0, dis = 0.0;
    for (int r = 0; r < s->R; r++) {
      const imml_losses *l = &w->rec[r].loss[st];
      ce += l->ce * s->shard[r] / G_ROWS;
      dis += l->dis * s->shard[r] / G_ROWS;
      if (L->con == 0.0)
        ck_assert_msg(l->con == 0.0, "step %d rank %d: con %g in warm-up", st,
                      r, l->con);
      e = rel_err_d(l->con, L->con);
      ck_assert_msg(e <= TOL, "step %d rank %d: con %.9g vs %.9g", st, r,
                    l->con, L->con);
      max_err[2] = fmax(max_err[2], e);
    }
    const double tot =
        ce + (double)c.gamma1 * q0->loss[st].con + (double)c.gamma2 * dis;
    e = fmax(fmax(rel_err_d(ce, L->ce), rel_err_d(dis, L->dis)),
             rel_err_d(tot, L->total));
    ck_assert_msg(e <= TOL, "step %d: ce %.9g/%.9g dis %.9g/%.9g", st, ce,
                  L->ce, dis, L->dis);
    max_err[2] = fmax(max_err[2], e);
    /* The oracle's dictionary push and warm-up update land where the
     * ranks' did. */
    mstate after;
    state_take(&after, oracle);
    const mstate *next = st + 1 < N_STEPS ? &q0->pre[st + 1] : &q0->fin;
    ck_assert_int_eq(after.fill, next->fill);
    ck_assert_int_eq(after.pos, next->pos);
    ck_assert_int_eq(after.p, next->p);
    ck_assert_int_eq(after.fixed, next->fixed);
    ck_assert_int_eq(after.steps, next->steps);
    ck_assert_msg(ema_close(after.ema, next->ema, s->M, 1e-6),
                  "step %d: warm-up EMAs differ from the single process's", st);
    e = rel_err(next->dict, after.dict, dict_n);
    ck_assert_msg(e <= TOL, "step %d: dictionary: relative error %g", st, e);
    state_free(&after);
  }
  record_free(&orc, s->M);
  /* 3. The whole trajectory: N_STEPS steps of R ranks against one process
   *    trained alone from the same seed.  The per-step differences of 2
   *    are carried through the optimiser (see TOL_ADAMW). */
  const double tol = s->optimizer == IMML_OPTIM_ADAMW ? TOL_ADAMW : TOL;
  const mstate *a = &q0->fin, *b = &ref->fin;
  ck_assert_int_eq(a->fill, b->fill);
  ck_assert_int_eq(a->pos, b->pos);
  ck_assert_int_eq(a->p, b->p);
  ck_assert_int_eq(a->fixed, b->fixed);
  ck_assert_int_eq(a->steps, b->steps);
  ck_assert_msg(ema_close(a->ema, b->ema, s->M, tol),
                "warm-up EMAs differ from the single process's");
  /* The predominant modality is decided (given, or after the warm-up). */
  ck_assert_int_eq(b->fixed, 1);
  if (s->predominant >= 0)
    ck_assert_int_eq(b->p, s->predominant);
  double e = tensor_err(oracle, a->params, b->params, &worst);
  ck_assert_msg(e <= tol, "parameters of %s: relative error %g", worst, e);
  max_err[3] = fmax(max_err[3], e);
  e = rel_err(a->dict, b->dict, dict_n);
  ck_assert_msg(e <= tol, "dictionary: relative error %g", e);
  max_err[4] = fmax(max_err[4], e);
  imml_model_free(oracle);
}

/* ------------------------------------------------------------------ */
/* Tests: R ranks = one process                                        */
/* ------------------------------------------------------------------ */

START_TEST(test_ranks_match_single_process) {
  const scen s = scen_get(_i);
  gdata d;
  gdata_make(&d, s.M, 1000 + (uint64_t)_i);
  record ref;
  run_reference(&s, &d, &ref);
  /* A first step with p given attends over the gathered batch: the
   * dictionary is empty before it and holds the G rows after it. */
  world *w = xcalloc(1, sizeof *w);
  run_world(w, &s, &d);
  double max_err[5] = {0, 0, 0, 0, 0};
  compare_world(&s, w, &d, &ref, max_err);
  if (getenv("IMML_TEST_VERBOSE"))
    fprintf(stderr,
            "scenario %d (R=%d M=%d %s p=%d): max rel err grad %.2g dh %.2g "
            "loss %.2g params %.2g dict %.2g\n",
            _i, s.R, s.M, s.slot_mode ? "strict" : "cond", s.predominant,
            max_err[0], max_err[1], max_err[2], max_err[3], max_err[4]);
  world_free(w);
  free(w);
  record_free(&ref, s.M);
  gdata_free(&d);
}
END_TEST

/* A dictionary smaller than the global batch (J = 8 < G = 12): every push
 * keeps the last 8 gathered rows.  The ranks' max_batch is G so that the
 * first step's attention over the gathered batch fits (the library
 * limitation named above). */
START_TEST(test_ranks_small_dictionary) {
  scen s = scen_get(_i ? 5 + 2 * N_SHARDS : 4 + 4 * N_SHARDS);
  s.dict_size = 8;
  s.rank_max_batch = G_ROWS;
  gdata d;
  gdata_make(&d, s.M, 2000 + (uint64_t)_i);
  record ref;
  run_reference(&s, &d, &ref);
  world *w = xcalloc(1, sizeof *w);
  run_world(w, &s, &d);
  double max_err[5] = {0, 0, 0, 0, 0};
  compare_world(&s, w, &d, &ref, max_err);
  ck_assert_int_eq(ref.fin.fill, 8);
  world_free(w);
  free(w);
  record_free(&ref, s.M);
  gdata_free(&d);
}
END_TEST

/* With one rank the collective step is the plain step, bit for bit. */
START_TEST(test_one_rank_bit_identical) {
  scen s = scen_get(0);
  s.predominant = _i ? -1 : 0;
  gdata d;
  gdata_make(&d, s.M, 77);
  record ref;
  run_reference(&s, &d, &ref);
  world *w = xcalloc(1, sizeof *w);
  s.rank_max_batch = G_ROWS;
  run_world(w, &s, &d);
  const record *q = &w->rec[0];
  for (int st = 0; st < N_STEPS; st++) {
    ck_assert(memcmp(q->grad[st], ref.grad[st], ref.n_params * sizeof(float)) ==
              0);
    ck_assert(memcmp(&q->loss[st], &ref.loss[st], sizeof(imml_losses)) == 0);
  }
  ck_assert(
      memcmp(q->fin.params, ref.fin.params, ref.n_params * sizeof(float)) == 0);
  ck_assert(memcmp(q->fin.dict, ref.fin.dict,
                   (size_t)s.dict_size * (size_t)s.M * 6 * sizeof(float)) == 0);
  world_free(w);
  free(w);
  record_free(&ref, s.M);
  gdata_free(&d);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Tests: gradient accumulation                                        */
/* ------------------------------------------------------------------ */

#define K_MICRO 2
#define ACC_STEPS 5

/* Every step is K_MICRO micro-batches then one commit.  Micro-batch k of
 * rank r has shard[k][r] rows; the global micro-batch k is the
 * concatenation of every rank's micro-batch k in rank order: the first rows
 * of that step's batch of data set k. */
typedef struct acc_case {
  int R, M, predominant, slot_mode, dict_size;
  int shard[K_MICRO][MAX_R];
} acc_case;

static const acc_case k_acc[] = {
    /* p chosen after the 3-step warm-up; 2 x 5 rows a step into J = 16 */
    {2, 3, -1, IMML_SLOT_CONDITIONAL, 16, {{3, 2}, {1, 4}}},
    /* p given: both micro-batches of the first step attend over their own
     * gathered rows (the dictionary fills only at the commit) */
    {3, 2, 1, IMML_SLOT_STRICT, 16, {{2, 2, 2}, {4, 1, 1}}},
    /* 12 rows a step into J = 8: a commit keeps the step's last 8 */
    {4, 2, -1, IMML_SLOT_CONDITIONAL, 8, {{1, 2, 1, 2}, {3, 1, 1, 1}}},
};
#define N_ACC ((int)(sizeof k_acc / sizeof k_acc[0]))

/* Rows of the global micro-batch k. */
static int acc_rows(const acc_case *a, int k) {
  int n = 0;
  for (int r = 0; r < a->R; r++)
    n += a->shard[k][r];
  return n;
}

/* First row of rank r's part of the global micro-batch k. */
static int acc_offset(const acc_case *a, int k, int rank) {
  int off = 0;
  for (int r = 0; r < rank; r++)
    off += a->shard[k][r];
  return off;
}

static void acc_config(const acc_case *a, int max_batch, imml_config *c) {
  scen s;
  memset(&s, 0, sizeof s);
  s.R = a->R;
  s.M = a->M;
  s.slot_mode = a->slot_mode;
  s.predominant = a->predominant;
  s.optimizer = IMML_OPTIM_SGD;
  s.dict_size = a->dict_size;
  scen_config(&s, max_batch, c);
}

/* What a run (the single process, or one rank) leaves after every step. */
typedef struct acc_out {
  /* the step's accumulated gradients (a rank's: their mean over ranks) */
  float *grad[ACC_STEPS];
  mstate post[ACC_STEPS]; /* the state after the step */
  imml_losses loss[ACC_STEPS][K_MICRO];
} acc_out;

static void acc_out_free(acc_out *o) {
  for (int st = 0; st < ACC_STEPS; st++) {
    free(o->grad[st]);
    state_free(&o->post[st]);
  }
  memset(o, 0, sizeof *o);
}

typedef struct acc_world {
  const acc_case *a;
  gdata d[K_MICRO];
  acc_out out[MAX_R];
} acc_world;

/* The end of step st, after its commit (and a rank's allreduce): records
 * the gradients, then zeroes them, except after the last step, which is an
 * SGD update (so the parameters, and with them every comparison, stay
 * exact until then), and records the state. */
static imml_status acc_step_end(imml_model *m, int st, acc_out *o) {
  float *g = NULL;
  size_t n = 0;
  imml_param_flat(m, NULL, &g, &n);
  o->grad[st] = xmemdup(g, n * sizeof(float));
  const imml_status e =
      st == ACC_STEPS - 1 ? imml_optim_step(m) : imml_grad_zero(m);
  state_take(&o->post[st], m);
  return e;
}

static void *acc_rank_main(void *arg) {
  rank_ctx *c = arg;
  world *w = c->w;
  acc_world *aw = w->arg;
  const acc_case *a = aw->a;
  const int r = c->rank;
  imml_model *m = w->model[r];
  acc_out *o = &aw->out[r];
  float *g = NULL;
  imml_param_flat(m, NULL, &g, NULL);
  for (int st = 0; st < ACC_STEPS; st++) {
    imml_status e;
    for (int k = 0; k < K_MICRO; k++) {
      const int off = acc_offset(a, k, r);
      const float *x[IMML_MAX_MODALITIES];
      for (int mm = 0; mm < a->M; mm++)
        x[mm] = aw->d[k].x[st][mm] + (size_t)off * (size_t)k_dims[mm];
      e = imml_forward(m, IMML_MODE_TRAIN, a->shard[k][r], x,
                       aw->d[k].y[st] + off, NULL, &o->loss[st][k]);
      if (e != IMML_OK)
        die_rank(r, "imml_forward", e, m);
      e = imml_backward(m, NULL);
      if (e != IMML_OK)
        die_rank(r, "imml_backward", e, m);
    }
    e = imml_commit(m);
    if (e != IMML_OK)
      die_rank(r, "imml_commit", e, m);
    thread_allreduce_mean(w, r, g);
    e = acc_step_end(m, st, o);
    if (e != IMML_OK)
      die_rank(r, "end of step", e, m);
  }
  return NULL;
}

/* The single process: each step, the K_MICRO global micro-batches, one
 * commit. */
static void acc_single(const acc_world *aw, acc_out *o) {
  const acc_case *a = aw->a;
  imml_config c;
  acc_config(a, G_ROWS, &c);
  imml_model *m = mk(&c);
  ck_assert_int_eq(optim(m, IMML_OPTIM_SGD), IMML_OK);
  memset(o, 0, sizeof *o);
  for (int st = 0; st < ACC_STEPS; st++) {
    for (int k = 0; k < K_MICRO; k++) {
      ck_assert_int_eq(imml_forward(m, IMML_MODE_TRAIN, acc_rows(a, k),
                                    (const float *const *)aw->d[k].x[st],
                                    aw->d[k].y[st], NULL, &o->loss[st][k]),
                       IMML_OK);
      backward_only_ok(m, NULL);
    }
    ck_assert_int_eq(m->acc.micro, K_MICRO);
    ck_assert_int_eq(imml_commit(m), IMML_OK);
    ck_assert_int_eq(acc_step_end(m, st, o), IMML_OK);
  }
  imml_model_free(m);
}

/* Gradient accumulation with the collective: on R ranks, K = 2
 * micro-batches per rank and one commit give every rank the same
 * dictionary and warm-up state (bit for bit), equal to those of a single
 * process doing K = 2 micro-batches whose micro-batch k is the
 * concatenation of every rank's micro-batch k: integer state (fill, ring
 * position, warm-up steps and EMAs, p) exactly, the dictionary within TOL
 * (a rank's knowledge rows come from products over its own rows); and the
 * mean over ranks of the accumulated gradients equals the single process's
 * accumulated gradients within TOL, per tensor, every step.  The last step
 * applies an SGD update on both sides. */
START_TEST(test_accumulation_ranks_match_single_process) {
  const acc_case *a = &k_acc[_i];
  acc_world *aw = xcalloc(1, sizeof *aw);
  aw->a = a;
  for (int k = 0; k < K_MICRO; k++)
    gdata_make(&aw->d[k], a->M, 3000 + 10 * (uint64_t)_i + (uint64_t)k);
  acc_out ref;
  acc_single(aw, &ref);

  int bmax = 0;
  for (int k = 0; k < K_MICRO; k++)
    for (int r = 0; r < a->R; r++)
      bmax = a->shard[k][r] > bmax ? a->shard[k][r] : bmax;
  imml_config c;
  acc_config(a, bmax, &c);
  world *w = xcalloc(1, sizeof *w);
  w->arg = aw;
  world_open(w, a->R, &c);
  for (int r = 0; r < a->R; r++)
    ck_assert_int_eq(optim(w->model[r], IMML_OPTIM_SGD), IMML_OK);
  world_run(w, acc_rank_main);

  imml_model *layout = w->model[0];
  const size_t np = w->n_params, dict_n = dict_floats(layout);
  const acc_out *q = &aw->out[0];
  for (int st = 0; st < ACC_STEPS; st++) {
    char what[64];
    /* 1. every rank holds the same bits */
    for (int r = 1; r < a->R; r++) {
      snprintf(what, sizeof what, "rank %d vs rank 0 after step %d", r, st);
      state_same(&aw->out[r].post[st], &q->post[st], np, dict_n, a->M, what);
      ck_assert_msg(
          memcmp(aw->out[r].grad[st], q->grad[st], np * sizeof(float)) == 0,
          "%s: reduced gradients differ", what);
    }
    /* 2. the mean over ranks of the accumulated gradients */
    const char *worst = "";
    double e = tensor_err(layout, q->grad[st], ref.grad[st], &worst);
    ck_assert_msg(e <= TOL,
                  "step %d: accumulated gradient of %s: relative error %g", st,
                  worst, e);
    /* 3. dictionary and warm-up state */
    const mstate *x = &q->post[st], *y = &ref.post[st];
    ck_assert_msg(x->fill == y->fill && x->pos == y->pos && x->p == y->p &&
                      x->fixed == y->fixed && x->steps == y->steps,
                  "step %d: fill %d/%d pos %d/%d p %d/%d fixed %d/%d steps "
                  "%d/%d (ranks/single)",
                  st, x->fill, y->fill, x->pos, y->pos, x->p, y->p, x->fixed,
                  y->fixed, x->steps, y->steps);
    ck_assert_msg(ema_close(x->ema, y->ema, a->M, 1e-6),
                  "step %d: warm-up EMAs differ from the single process's", st);
    e = rel_err(x->dict, y->dict, dict_n);
    ck_assert_msg(e <= TOL, "step %d: dictionary: relative error %g", st, e);
    /* one commit pushed both micro-batches (the step's last J rows when
     * it has more), leaving the ring where two successive pushes would (a
     * push of more than J rows moves it by J), and advanced the warm-up
     * once */
    const int J = a->dict_size, r0 = acc_rows(a, 0), r1 = acc_rows(a, 1);
    const int pushed = (st + 1) * (r0 + r1);
    const int moved = (st + 1) * ((r0 < J ? r0 : J) + (r1 < J ? r1 : J));
    ck_assert_int_eq(y->fill, pushed < J ? pushed : J);
    ck_assert_int_eq(y->pos, moved % J);
    if (a->predominant < 0)
      ck_assert_int_eq(y->steps,
                       st + 1 < c.warmup_steps ? st + 1 : c.warmup_steps);
    if (st < ACC_STEPS - 1) {
      ck_assert_msg(memcmp(x->params, y->params, np * sizeof(float)) == 0,
                    "step %d: parameters changed without an update", st);
    } else {
      e = tensor_err(layout, x->params, y->params, &worst);
      ck_assert_msg(e <= TOL, "after the update: %s: relative error %g", worst,
                    e);
    }
    /* 4. the losses of every global micro-batch: con on every rank, ce as
     *    the B_r/G-weighted sum of the ranks' own means */
    for (int k = 0; k < K_MICRO; k++) {
      const imml_losses *L = &ref.loss[st][k];
      double ce = 0.0;
      for (int r = 0; r < a->R; r++) {
        const imml_losses *l = &aw->out[r].loss[st][k];
        ce += l->ce * a->shard[k][r] / acc_rows(a, k);
        if (L->con == 0.0)
          ck_assert_msg(l->con == 0.0, "step %d.%d rank %d: con %g in warm-up",
                        st, k, r, l->con);
        e = rel_err_d(l->con, L->con);
        ck_assert_msg(e <= TOL, "step %d.%d rank %d: con %.9g vs %.9g", st, k,
                      r, l->con, L->con);
      }
      e = rel_err_d(ce, L->ce);
      ck_assert_msg(e <= TOL, "step %d.%d: ce %.9g vs %.9g", st, k, ce, L->ce);
    }
  }
  /* p is fixed (given, or chosen by the warm-up) and the last step used the
   * front door */
  const mstate *fin = &ref.post[ACC_STEPS - 1];
  ck_assert_int_eq(fin->fixed, 1);
  if (a->predominant >= 0)
    ck_assert_int_eq(fin->p, a->predominant);
  ck_assert_msg(ref.loss[ACC_STEPS - 1][0].con > 0.0,
                "no L_con after the warm-up");
  world_close(w);
  for (int r = 0; r < a->R; r++)
    acc_out_free(&aw->out[r]);
  acc_out_free(&ref);
  for (int k = 0; k < K_MICRO; k++)
    gdata_free(&aw->d[k]);
  free(aw);
  free(w);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Tests: a predominant modality fixed by the host                     */
/* ------------------------------------------------------------------ */

#define PS_ROWS 3 /* rows of every rank's shard */

typedef struct pset_case {
  int R;
  int pre;         /* collective warm-up steps before the ranks fix p */
  int setp[MAX_R]; /* the p each rank fixes, -1: none */
} pset_case;

static const pset_case k_pset[] = {
    {2, 0, {1, 1}},      /* all agree, fresh models */
    {3, 1, {0, 0, 0}},   /* all agree, after a warm-up step */
    {2, 0, {0, 1}},      /* two different p */
    {2, 1, {1, -1}},     /* one fixes p, the other does not */
    {3, 1, {1, 1, 0}},   /* two agree, one differs */
    {3, 0, {-1, -1, 1}}, /* only the last rank fixes p */
};
#define N_PSET ((int)(sizeof k_pset / sizeof k_pset[0]))

/* Every rank fixes the same p. */
static int pset_agree(const pset_case *pc) {
  for (int r = 0; r < pc->R; r++)
    if (pc->setp[r] < 0 || pc->setp[r] != pc->setp[0])
      return 0;
  return 1;
}

typedef struct pset_world {
  const pset_case *pc;
  gdata d;
  int phase; /* 0: the warm-up steps; 1: the training step after the set */
  imml_status st[MAX_R];
  imml_losses loss[MAX_R];
} pset_world;

static void *pset_rank_main(void *arg) {
  rank_ctx *c = arg;
  world *w = c->w;
  pset_world *pw = w->arg;
  const int r = c->rank, M = pw->d.M;
  imml_model *m = w->model[r];
  const int first = pw->phase == 0 ? 0 : pw->pc->pre;
  const int last = pw->phase == 0 ? pw->pc->pre : pw->pc->pre + 1;
  for (int st = first; st < last; st++) {
    const float *x[IMML_MAX_MODALITIES];
    for (int mm = 0; mm < M; mm++)
      x[mm] = pw->d.x[st][mm] + (size_t)r * PS_ROWS * (size_t)k_dims[mm];
    imml_status e = imml_forward(m, IMML_MODE_TRAIN, PS_ROWS, x,
                                 pw->d.y[st] + r * PS_ROWS, NULL, &pw->loss[r]);
    if (pw->phase == 1) {
      pw->st[r] = e; /* refusals are the main thread's to judge */
      if (e != IMML_OK)
        return NULL;
    } else if (e != IMML_OK) {
      die_rank(r, "imml_forward", e, m);
    }
    e = imml_backward(m, NULL);
    if (e != IMML_OK)
      die_rank(r, "imml_backward", e, m);
    e = imml_commit(m);
    if (e != IMML_OK)
      die_rank(r, "imml_commit", e, m);
  }
  return NULL;
}

/* imml_predominant_set with a collective.  When every rank fixes the same
 * p, the next training step proceeds with that p on every rank (the
 * front-door forward, L_con > 0, equal to a single process that fixed the
 * same p) and the ranks stay identical.  When the ranks fix different p,
 * or one fixes p and another does not, the next training forward is
 * refused on every rank with IMML_ERR_STATE and no model changes. */
START_TEST(test_predominant_set_collective) {
  const pset_case *pc = &k_pset[_i];
  const int M = 2, G = pc->R * PS_ROWS;
  scen s;
  memset(&s, 0, sizeof s);
  s.R = pc->R;
  s.M = M;
  s.predominant = -1;
  s.dict_size = 16;
  imml_config c;
  scen_config(&s, PS_ROWS, &c);
  pset_world *pw = xcalloc(1, sizeof *pw);
  pw->pc = pc;
  gdata_make(&pw->d, M, 5000 + (uint64_t)_i);
  world *w = xcalloc(1, sizeof *w);
  w->arg = pw;
  world_open(w, pc->R, &c);
  pw->phase = 0;
  world_run(w, pset_rank_main);

  /* the hosts fix p (a local call: no collective) */
  snap before[MAX_R];
  for (int r = 0; r < pc->R; r++) {
    imml_model *m = w->model[r];
    if (pc->setp[r] >= 0) {
      ck_assert_int_eq(imml_predominant_set(m, pc->setp[r]), IMML_OK);
      expect_predominant(m, pc->setp[r], 1, "after imml_predominant_set");
    } else {
      expect_predominant(m, -1, 0, "a rank that fixes nothing");
    }
    snap_take(m, &before[r]);
  }
  pw->phase = 1;
  world_run(w, pset_rank_main);

  if (pset_agree(pc)) {
    const int p = pc->setp[0];
    for (int r = 0; r < pc->R; r++) {
      imml_model *m = w->model[r];
      ck_assert_msg(pw->st[r] == IMML_OK, "rank %d: forward %d (%s)", r,
                    (int)pw->st[r], imml_model_errmsg(m));
      ck_assert_int_eq(m->train.warm, 0);
      ck_assert_int_eq(m->train.p, p);
      ck_assert_msg(pw->loss[r].con > 0.0, "rank %d: L_con = %g", r,
                    pw->loss[r].con);
      expect_predominant(m, p, 1, "after the step");
    }
    mstate s0;
    state_take(&s0, w->model[0]);
    for (int r = 1; r < pc->R; r++) {
      mstate sr;
      state_take(&sr, w->model[r]);
      state_same(&sr, &s0, w->n_params, dict_floats(w->model[0]), M,
                 "ranks after the step with the fixed p");
      state_free(&sr);
    }
    /* the single process that fixed the same p at the same point */
    imml_config cs;
    scen_config(&s, G_ROWS, &cs);
    imml_model *one = mk(&cs);
    imml_losses l;
    for (int st = 0; st <= pc->pre; st++) {
      if (st == pc->pre)
        ck_assert_int_eq(imml_predominant_set(one, p), IMML_OK);
      ck_assert_int_eq(imml_forward(one, IMML_MODE_TRAIN, G,
                                    (const float *const *)pw->d.x[st],
                                    pw->d.y[st], NULL, &l),
                       IMML_OK);
      backward_ok(one, NULL);
    }
    for (int r = 0; r < pc->R; r++) {
      const double e = rel_err_d(pw->loss[r].con, l.con);
      ck_assert_msg(e <= TOL, "rank %d: con %.9g, single process %.9g", r,
                    pw->loss[r].con, l.con);
    }
    mstate so;
    state_take(&so, one);
    ck_assert_int_eq(so.fill, s0.fill);
    ck_assert_int_eq(so.pos, s0.pos);
    ck_assert(so.p == s0.p && so.fixed == s0.fixed);
    const double e = rel_err(s0.dict, so.dict, dict_floats(one));
    ck_assert_msg(e <= TOL, "dictionary: relative error %g", e);
    state_free(&so);
    state_free(&s0);
    imml_model_free(one);
  } else {
    for (int r = 0; r < pc->R; r++) {
      imml_model *m = w->model[r];
      ck_assert_msg(pw->st[r] == IMML_ERR_STATE,
                    "rank %d (p %d): forward %d, want IMML_ERR_STATE (%s)", r,
                    pc->setp[r], (int)pw->st[r], imml_model_errmsg(m));
      ck_assert_msg(strstr(imml_model_errmsg(m), "predominant") != NULL,
                    "rank %d: message '%s' does not name the predominant "
                    "modality",
                    r, imml_model_errmsg(m));
      expect_unchanged(m, &before[r], "refused forward");
      ck_assert_int_eq(imml_backward(m, NULL), IMML_ERR_STATE);
      expect_unchanged(m, &before[r], "backward after the refused forward");
    }
  }
  for (int r = 0; r < pc->R; r++)
    snap_free(&before[r]);
  world_close(w);
  gdata_free(&pw->d);
  free(pw);
  free(w);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Tests: errors                                                       */
/* ------------------------------------------------------------------ */

/* A single-threaded stand-in for a world of 2 ranks: rank 1 sends a copy of
 * rank 0's message (a legal world whose ranks hold the same rows), with
 * optional damage to test the library's checks of the gathered data. */
typedef struct fake {
  int fail;   /* return this */
  int damage; /* 0 none, else a damage kind below */
  int calls;
  size_t count;
} fake;

enum {
  DMG_NONE,
  DMG_B_ZERO,      /* rank 1 claims 0 rows */
  DMG_B_FRACTION,  /* rank 1 claims 2.5 rows */
  DMG_B_TOO_LARGE, /* rank 1 claims max_batch + 1 rows */
  DMG_OWN_B,       /* this rank's slot comes back with another size */
  DMG_LABEL,       /* rank 1 label out of range */
  DMG_LABEL_FRAC,  /* rank 1 label 0.5 */
  DMG_NAN,         /* rank 1 knowledge NaN */
  DMG_P,           /* rank 1 has fixed another predominant modality */
  DMG_COUNT
};

static int fake_allgather(void *user_data, const float *send, size_t count,
                          float *recv) {
  fake *f = user_data;
  f->calls++;
  f->count = count;
  if (f->fail)
    return f->fail;
  memcpy(recv, send, count * sizeof(float));
  memcpy(recv + count, send, count * sizeof(float));
  float *m1 = recv + count;
  const int B = (int)send[MSG_B];
  /* small_cfg's layout (msg_floats): M = 2, max_batch = 6, k = 6 */
  const size_t labels = MSG_HEAD + 2 * 2, knowledge = labels + 6;
  switch (f->damage) {
  case DMG_B_ZERO:
    m1[MSG_B] = 0.0f;
    break;
  case DMG_B_FRACTION:
    m1[MSG_B] = 2.5f;
    break;
  case DMG_B_TOO_LARGE:
    m1[MSG_B] = 1e6f;
    break;
  case DMG_OWN_B:
    recv[MSG_B] = (float)(B == 1 ? 2 : B - 1);
    break;
  case DMG_LABEL:
    m1[labels] = (float)N_CLASSES;
    break;
  case DMG_LABEL_FRAC:
    m1[labels] = 0.5f;
    break;
  case DMG_NAN:
    m1[count - 1 - 0] = NAN; /* the last modality's padding row: unread */
    m1[knowledge + 1] = NAN; /* first knowledge row of modality 0 */
    break;
  case DMG_P:
    m1[MSG_P] = send[MSG_P] == 0.0f ? 1.0f : 0.0f;
    break;
  default:
    break;
  }
  return 0;
}

static void small_cfg(imml_config *c, int predominant) {
  imml_config_init(c);
  c->n_modalities = 2;
  c->dims = k_dims;
  c->hidden_dim = 8;
  c->knowledge_dim = 6;
  c->n_classes = N_CLASSES;
  c->max_batch = 6;
  c->dict_size = 10;
  c->gamma1 = 0.5f;
  c->predominant = predominant;
  c->warmup_steps = 3;
  c->seed = 5;
}

static void attach_fake(imml_model *m, fake *f) {
  imml_collective col;
  imml_collective_init(&col);
  col.world_size = 2;
  col.rank = 0;
  col.allgather = fake_allgather;
  col.user_data = f;
  ck_assert_int_eq(imml_collective_set(m, &col), IMML_OK);
}

/* A failing allgather (loop 0: dictionary empty, p given; 1: during
 * warm-up; 2: after warm-up with a filled dictionary) or a damaged
 * gathered message (loops 3..): the forward fails with the status the
 * damage calls for and changes nothing; the step is not pending.  In even
 * loops from 2 on, the failing forward is the step's second micro-batch:
 * the first one stays staged, and the step can still be committed. */
START_TEST(test_allgather_failure_changes_nothing) {
  const int damage = _i < 3 ? DMG_NONE : _i - 3 + 1;
  imml_config c;
  small_cfg(&c, _i == 0 ? 0 : -1);
  imml_model *m = mk(&c);
  ck_assert_int_eq(optim(m, IMML_OPTIM_ADAMW), IMML_OK);
  fake f = {0, DMG_NONE, 0, 0};
  attach_fake(m, &f);
  gdata d;
  gdata_make(&d, 2, 9);
  const int B = 4;
  const int pre = _i == 0 ? 0 : _i == 1 ? 1 : 4;
  for (int st = 0; st < pre; st++) {
    ck_assert_int_eq(imml_forward(m, IMML_MODE_TRAIN, B,
                                  (const float *const *)d.x[st], d.y[st], NULL,
                                  NULL),
                     IMML_OK);
    ck_assert_int_eq(imml_backward(m, NULL), IMML_OK);
    ck_assert_int_eq(imml_commit(m), IMML_OK);
    ck_assert_int_eq(imml_optim_step(m), IMML_OK);
  }
  ck_assert_int_eq(f.calls, pre);
  /* Two ranks with the same rows: the gathered batch holds them twice. */
  ck_assert_int_eq(imml_fdc_dict_fill(m),
                   pre * 2 * B < c.dict_size ? pre * 2 * B : c.dict_size);
  const int staged = _i >= 2 && _i % 2 == 0;
  if (staged) {
    ck_assert_int_eq(imml_forward(m, IMML_MODE_TRAIN, B,
                                  (const float *const *)d.x[4], d.y[4], NULL,
                                  NULL),
                     IMML_OK);
    ck_assert_int_eq(imml_backward(m, NULL), IMML_OK);
    ck_assert_int_eq(m->acc.micro, 1);
  }
  snap s;
  snap_take(m, &s);
  f.fail = damage == DMG_NONE ? 5 : 0;
  f.damage = damage;
  const imml_status st = imml_forward(
      m, IMML_MODE_TRAIN, B, (const float *const *)d.x[5], d.y[5], NULL, NULL);
  static const imml_status want[DMG_COUNT] = {
      [DMG_NONE] = IMML_ERR_CALLBACK,    [DMG_B_ZERO] = IMML_ERR_SHAPE,
      [DMG_B_FRACTION] = IMML_ERR_SHAPE, [DMG_B_TOO_LARGE] = IMML_ERR_SHAPE,
      [DMG_OWN_B] = IMML_ERR_CALLBACK,   [DMG_LABEL] = IMML_ERR_LABEL,
      [DMG_LABEL_FRAC] = IMML_ERR_LABEL, [DMG_NAN] = IMML_ERR_NONFINITE,
      [DMG_P] = IMML_ERR_STATE,
  };
  ck_assert_msg(st == want[damage], "damage %d: status %d (%s), want %d",
                damage, (int)st, imml_model_errmsg(m), (int)want[damage]);
  ck_assert(imml_model_errmsg(m)[0] != '\0');
  if (damage == DMG_NONE)
    ck_assert_ptr_nonnull(strstr(imml_model_errmsg(m), "allgather"));
  expect_unchanged(m, &s, "failed collective forward");
  ck_assert_int_eq(imml_backward(m, NULL), IMML_ERR_STATE);
  expect_unchanged(m, &s, "backward after the failed forward");
  /* The next good step works. */
  f.fail = 0;
  f.damage = DMG_NONE;
  ck_assert_int_eq(imml_forward(m, IMML_MODE_TRAIN, B,
                                (const float *const *)d.x[5], d.y[5], NULL,
                                NULL),
                   IMML_OK);
  ck_assert_int_eq(imml_backward(m, NULL), IMML_OK);
  ck_assert_int_eq(m->acc.micro, 1 + staged);
  ck_assert_int_eq(imml_commit(m), IMML_OK);
  const int rows = (pre + 1 + staged) * 2 * B;
  ck_assert_int_eq(imml_fdc_dict_fill(m),
                   rows < c.dict_size ? rows : c.dict_size);
  snap_free(&s);
  gdata_free(&d);
  imml_model_free(m);
}
END_TEST

static int dummy_allgather(void *u, const float *s, size_t n, float *r) {
  (void)u;
  memcpy(r, s, n * sizeof(float));
  return 0;
}

START_TEST(test_set_collective_arguments) {
  imml_config c;
  small_cfg(&c, -1);
  imml_model *m = mk(&c);
  imml_collective col;
  imml_collective_init(&col);
  ck_assert_uint_eq(col.struct_size, sizeof col);
  ck_assert_int_eq(col.world_size, 1);
  ck_assert_int_eq(col.rank, 0);
  ck_assert(col.allgather == NULL);
  ck_assert_ptr_null(col.user_data);
  imml_collective_init(NULL); /* no-op */
  ck_assert_int_eq(imml_collective_set(NULL, &col), IMML_ERR_NULL);
  /* allgather missing */
  ck_assert_int_eq(imml_collective_set(m, &col), IMML_ERR_NULL);
  ck_assert(imml_model_errmsg(m)[0] != '\0');
  col.allgather = dummy_allgather;
  col.struct_size = sizeof col - 1;
  ck_assert_int_eq(imml_collective_set(m, &col), IMML_ERR_INVALID_ARG);
  col.struct_size = 0;
  ck_assert_int_eq(imml_collective_set(m, &col), IMML_ERR_INVALID_ARG);
  col.struct_size = sizeof col;
  static const int bad[][2] = {{0, 0}, {-1, 0}, {65537, 0},
                               {2, 2}, {2, -1}, {1, 1}};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    col.world_size = bad[i][0];
    col.rank = bad[i][1];
    ck_assert_msg(imml_collective_set(m, &col) == IMML_ERR_INVALID_ARG,
                  "world_size %d rank %d accepted", bad[i][0], bad[i][1]);
    ck_assert(imml_model_errmsg(m)[0] != '\0');
  }
  ck_assert_int_eq(m->coll.active, 0);
  col.world_size = 3;
  col.rank = 2;
  ck_assert_int_eq(imml_collective_set(m, &col), IMML_OK);
  ck_assert_str_eq(imml_model_errmsg(m), "");
  ck_assert_int_eq(m->coll.active, 1);
  /* Replacing and detaching. */
  col.world_size = 1;
  col.rank = 0;
  ck_assert_int_eq(imml_collective_set(m, &col), IMML_OK);
  ck_assert_int_eq(imml_collective_set(m, NULL), IMML_OK);
  ck_assert_int_eq(m->coll.active, 0);
  ck_assert_int_eq(imml_collective_set(m, NULL), IMML_OK);
  /* A struct from a newer header: accepted when every byte this library
   * does not know is zero, else IMML_ERR_UNKNOWN_FIELD and the collective
   * in place stays. */
  struct {
    imml_collective c;
    unsigned char tail[16];
  } big;
  memset(&big, 0, sizeof big);
  big.c = col;
  big.c.struct_size = sizeof big;
  big.c.world_size = 2;
  big.c.rank = 1;
  ck_assert_int_eq(imml_collective_set(m, &big.c), IMML_OK);
  ck_assert_int_eq(m->coll.ops.world_size, 2);
  big.c.world_size = 3;
  big.tail[5] = 1;
  ck_assert_int_eq(imml_collective_set(m, &big.c), IMML_ERR_UNKNOWN_FIELD);
  ck_assert(imml_model_errmsg(m)[0] != '\0');
  ck_assert_int_eq(m->coll.active, 1);
  ck_assert_int_eq(m->coll.ops.world_size, 2);
  imml_model_free(m);
}
END_TEST

/* imml_collective_set between a training forward and the step's commit
 * would change the meaning of the step under way: refused, the pending
 * forward and then the uncommitted micro-batch kept. */
START_TEST(test_set_collective_while_pending) {
  imml_config c;
  small_cfg(&c, 1);
  imml_model *m = mk(&c);
  fake f = {0, DMG_NONE, 0, 0};
  gdata d;
  gdata_make(&d, 2, 3);
  if (_i == 1)
    attach_fake(m, &f);
  ck_assert_int_eq(imml_forward(m, IMML_MODE_TRAIN, 4,
                                (const float *const *)d.x[0], d.y[0], NULL,
                                NULL),
                   IMML_OK);
  imml_collective col;
  imml_collective_init(&col);
  col.allgather = dummy_allgather;
  ck_assert_int_eq(imml_collective_set(m, &col), IMML_ERR_STATE);
  ck_assert(imml_model_errmsg(m)[0] != '\0');
  ck_assert_int_eq(imml_collective_set(m, NULL), IMML_ERR_STATE);
  ck_assert_int_eq(m->coll.active, _i == 1);
  /* An evaluation forward keeps the step pending and is local. */
  ck_assert_int_eq(imml_forward(m, IMML_MODE_EVAL, 4,
                                (const float *const *)d.x[1], NULL, NULL, NULL),
                   IMML_OK);
  ck_assert_int_eq(f.calls, _i == 1 ? 1 : 0);
  ck_assert_int_eq(imml_collective_set(m, &col), IMML_ERR_STATE);
  ck_assert_int_eq(imml_backward(m, NULL), IMML_OK);
  snap s;
  snap_take(m, &s);
  ck_assert_int_eq(imml_collective_set(m, &col), IMML_ERR_STATE);
  ck_assert(imml_model_errmsg(m)[0] != '\0');
  ck_assert_int_eq(imml_collective_set(m, NULL), IMML_ERR_STATE);
  expect_unchanged(m, &s, "imml_collective_set before the commit");
  snap_free(&s);
  ck_assert_int_eq(m->coll.active, _i == 1);
  ck_assert_int_eq(imml_fdc_dict_fill(m), 0);
  ck_assert_int_eq(imml_commit(m), IMML_OK);
  ck_assert_int_eq(imml_fdc_dict_fill(m), _i == 1 ? 8 : 4);
  ck_assert_int_eq(imml_collective_set(m, &col), IMML_OK);
  ck_assert_int_eq(imml_collective_set(m, NULL), IMML_OK);
  gdata_free(&d);
  imml_model_free(m);
}
END_TEST

/* An allocator that can be told to fail (common.h's fail_alloc): then
 * imml_collective_set reports IMML_ERR_NOMEM and keeps the collective it
 * had. */
START_TEST(test_set_collective_nomem) {
  fail_alloc al;
  fa_reset(&al);
  imml_config c;
  small_cfg(&c, 1);
  c.allocator = fa_hooks(&al);
  imml_model *m = mk(&c);
  fake f = {0, DMG_NONE, 0, 0};
  attach_fake(m, &f);
  imml_collective col;
  imml_collective_init(&col);
  col.allgather = dummy_allgather;
  col.world_size = 4;
  al.fail_at = al.calls + 1; /* the next call, and every later one */
  al.fail_rest = 1;
  ck_assert_int_eq(imml_collective_set(m, &col), IMML_ERR_NOMEM);
  al.fail_at = 0;
  ck_assert_int_eq(m->coll.active, 1);
  ck_assert_int_eq(m->coll.ops.world_size, 2);
  gdata d;
  gdata_make(&d, 2, 4);
  ck_assert_int_eq(imml_forward(m, IMML_MODE_TRAIN, 3,
                                (const float *const *)d.x[0], d.y[0], NULL,
                                NULL),
                   IMML_OK);
  ck_assert_int_eq(imml_backward(m, NULL), IMML_OK);
  ck_assert_int_eq(imml_commit(m), IMML_OK);
  ck_assert_int_eq(f.calls, 1);
  ck_assert_int_eq(imml_fdc_dict_fill(m), 6);
  gdata_free(&d);
  imml_model_free(m);
  ck_assert_msg(al.mallocs == al.frees && al.live == 0 && !al.bad_frees &&
                    !al.overruns,
                "%ld allocations, %ld frees, %zu bytes outstanding", al.mallocs,
                al.frees, al.live);
}
END_TEST

/* After detaching, training is local and bit-identical to a model that
 * never had a collective; evaluation and imml_predict (on the model and on
 * a share of it) never gather. */
START_TEST(test_detach_and_local_evaluation) {
  imml_config c;
  small_cfg(&c, -1);
  imml_model *a = mk(&c), *b = mk(&c);
  fake f = {0, DMG_NONE, 0, 0};
  attach_fake(a, &f);
  gdata d;
  gdata_make(&d, 2, 8);
  float la[4 * N_CLASSES], lb[4 * N_CLASSES];
  ck_assert_int_eq(imml_forward(a, IMML_MODE_EVAL, 4,
                                (const float *const *)d.x[0], d.y[0], la, NULL),
                   IMML_OK);
  imml_model *ws = NULL;
  ck_assert_int_eq(imml_model_share(a, &ws), IMML_OK);
  ck_assert_int_eq(
      imml_predict(ws, 4, (const float *const *)d.x[0], lb, NULL, NULL),
      IMML_OK);
  ck_assert(memcmp(la, lb, sizeof la) == 0);
  ck_assert_int_eq(
      imml_predict(a, 4, (const float *const *)d.x[0], lb, NULL, NULL),
      IMML_OK);
  ck_assert(memcmp(la, lb, sizeof la) == 0);
  ck_assert_int_eq(f.calls, 0);
  imml_model_free(ws);
  ck_assert_int_eq(imml_collective_set(a, NULL), IMML_OK);
  for (int st = 0; st < 5; st++) {
    imml_losses l1, l2;
    ck_assert_int_eq(imml_forward(a, IMML_MODE_TRAIN, 4,
                                  (const float *const *)d.x[st], d.y[st], la,
                                  &l1),
                     IMML_OK);
    ck_assert_int_eq(imml_forward(b, IMML_MODE_TRAIN, 4,
                                  (const float *const *)d.x[st], d.y[st], lb,
                                  &l2),
                     IMML_OK);
    ck_assert(memcmp(la, lb, sizeof la) == 0);
    ck_assert(memcmp(&l1, &l2, sizeof l1) == 0);
    ck_assert_int_eq(imml_backward(a, NULL), IMML_OK);
    ck_assert_int_eq(imml_backward(b, NULL), IMML_OK);
    ck_assert_int_eq(imml_commit(a), IMML_OK);
    ck_assert_int_eq(imml_commit(b), IMML_OK);
    ck_assert(memcmp(a->grads, b->grads, a->n_params * sizeof(float)) == 0);
    imml_grad_zero(a);
    imml_grad_zero(b);
  }
  ck_assert_int_eq(f.calls, 0);
  ck_assert_int_eq(imml_fdc_dict_fill(a), imml_fdc_dict_fill(b));
  gdata_free(&d);
  imml_model_free(a);
  imml_model_free(b);
}
END_TEST

/* Regression: p given, empty dictionary, G = 12 gathered rows > max(J = 8,
 * max_batch = 3) strata; the attention scratch sized for the model's own
 * max(J, max_batch) rows was overrun before imml_collective_set sized it
 * for the gathered batch. */
START_TEST(test_gathered_strata_exceed_jmax) {
  scen s = scen_get(5); /* R = 4, shards 3+3+3+3, p given */
  s.dict_size = 8;
  gdata d;
  gdata_make(&d, s.M, 1005);
  record ref;
  run_reference(&s, &d, &ref);
  world *w = xcalloc(1, sizeof *w);
  run_world(w, &s, &d);
  double max_err[5] = {0, 0, 0, 0, 0};
  compare_world(&s, w, &d, &ref, max_err);
  world_free(w);
  free(w);
  record_free(&ref, s.M);
  gdata_free(&d);
}
END_TEST

static Suite *distributed_suite(void) {
  Suite *s = suite_create("distributed");
  TCase *tc = tcase_create("ranks");
  tcase_set_timeout(tc, 600);
  tcase_add_loop_test(tc, test_ranks_match_single_process, 0, N_SCEN);
  tcase_add_loop_test(tc, test_ranks_small_dictionary, 0, 2);
  tcase_add_loop_test(tc, test_one_rank_bit_identical, 0, 2);
  tcase_add_test(tc, test_gathered_strata_exceed_jmax);
  tcase_add_loop_test(tc, test_accumulation_ranks_match_single_process, 0,
                      N_ACC);
  tcase_add_loop_test(tc, test_predominant_set_collective, 0, N_PSET);
  suite_add_tcase(s, tc);
  tc = tcase_create("errors");
  tcase_add_loop_test(tc, test_allgather_failure_changes_nothing, 0,
                      3 + DMG_COUNT - 1);
  tcase_add_test(tc, test_set_collective_arguments);
  tcase_add_loop_test(tc, test_set_collective_while_pending, 0, 2);
  tcase_add_test(tc, test_set_collective_nomem);
  tcase_add_test(tc, test_detach_and_local_evaluation);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  /* One BLAS thread: the rank threads call BLAS concurrently, and the sums
   * must not depend on how BLAS splits them. */
  imml_threads_set(1);
  return imml_run_suite(distributed_suite());
}
