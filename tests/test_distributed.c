/* Data-parallel training (imml_set_collective, doc/DISTRIBUTED.md): R ranks
 * simulated in one process with threads, the allgather given through shared
 * memory and a barrier, the gradient allreduce done by the "host" (sum over
 * ranks in rank order, divided by R).  Every rank must end with the
 * parameters, strata dictionary, predominant-modality state and losses of
 * one model trained on the whole global batch; and the collective's errors
 * (failing or inconsistent allgather, arguments, state) change nothing.
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
  fprintf(stderr, "rank %d: %s: %s: %s\n", rank, what, imml_strerror(st),
          imml_errmsg(m));
  fflush(stderr);
  _Exit(3);
}

static const int k_dims[3] = {5, 7, 4};

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
  s.optimizer = (v & 4) ? IMML_OPT_ADAMW : IMML_OPT_SGD;
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

static imml_model *mk(const imml_config *c) {
  imml_model *m = NULL;
  char err[256];
  imml_status st = imml_model_create_ex(c, NULL, &m, err, sizeof err);
  ck_assert_msg(st == IMML_OK, "imml_model_create_ex: %d %s", (int)st, err);
  return m;
}

static imml_status optim(imml_model *m, int kind) {
  imml_optim_config oc;
  imml_optim_config_init(&oc, (imml_optimizer_kind)kind);
  if (kind == IMML_OPT_SGD) {
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
  imml_params_flat(m, &data, NULL, &n);
  s->params = xmemdup(data, n * sizeof(float));
  s->dict = xmemdup(m->dict, dict_floats(m) * sizeof(float));
  s->fill = imml_dict_fill(m);
  s->pos = m->dict_pos;
  imml_predominant(m, &s->p, &s->fixed);
  imml_warmup_state(m, &s->steps, s->ema);
}

/* Puts a state into a fresh model (same configuration up to max_batch). */
static void state_put(imml_model *m, const mstate *s) {
  memcpy(m->params, s->params, m->n_params * sizeof(float));
  m->max_p = NAN; /* written behind the library's back */
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

/* What one run (the reference, the oracle, or one rank) leaves behind. */
typedef struct record {
  imml_losses loss[N_STEPS];
  float *grad[N_STEPS]; /* reduced gradients fed to imml_step */
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
  ck_assert_msg(e == IMML_OK, "single-process forward: %s", imml_errmsg(m));
  e = imml_backward(m, dh);
  ck_assert_msg(e == IMML_OK, "single-process backward: %s", imml_errmsg(m));
  float *g;
  size_t n;
  imml_params_flat(m, NULL, &g, &n);
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
    const imml_status e = imml_step(m);
    ck_assert_msg(e == IMML_OK, "reference step: %s", imml_errmsg(m));
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
    float *g;
    imml_params_flat(m, NULL, &g, NULL);
    thread_allreduce_mean(w, r, g);
    memcpy(rec->grad[st], g, w->n_params * sizeof(float));
    e = imml_step(m);
    if (e != IMML_OK)
      die_rank(r, "imml_step", e, m);
  }
  return NULL;
}

/* Trains the scenario on R threads; rec[r] holds rank r's record. */
static void run_world(world *w, const scen *s, const gdata *d) {
  memset(w, 0, sizeof *w);
  w->s = s;
  w->d = d;
  w->R = s->R;
  int bmax = s->rank_max_batch;
  if (bmax == 0)
    for (int r = 0; r < s->R; r++)
      if (s->shard[r] > bmax)
        bmax = s->shard[r];
  imml_config c;
  scen_config(s, bmax, &c);
  const size_t count =
      1 + (size_t)s->M + (size_t)bmax * (1 + (size_t)s->M * c.knowledge_dim);
  w->gcap = count * (size_t)s->R;
  w->gbuf = xcalloc(w->gcap, sizeof(float));
  ck_assert_int_eq(pthread_barrier_init(&w->bar, NULL, (unsigned)s->R), 0);
  for (int r = 0; r < s->R; r++) {
    w->model[r] = mk(&c);
    ck_assert_int_eq(optim(w->model[r], s->optimizer), IMML_OK);
    w->ctx[r].w = w;
    w->ctx[r].rank = r;
    imml_collective col;
    imml_collective_init(&col);
    col.world_size = s->R;
    col.rank = r;
    col.allgather = thread_allgather;
    col.user_data = &w->ctx[r];
    ck_assert_int_eq(imml_set_collective(w->model[r], &col), IMML_OK);
    imml_params_flat(w->model[r], NULL, NULL, &w->n_params);
    record *rec = &w->rec[r];
    for (int st = 0; st < N_STEPS; st++) {
      rec->grad[st] = xcalloc(w->n_params, sizeof(float));
      for (int mm = 0; mm < s->M; mm++)
        rec->dh[st][mm] =
            xcalloc((size_t)s->shard[r] * (size_t)k_dims[mm], sizeof(float));
    }
  }
  w->rbuf = xcalloc(w->n_params * (size_t)s->R, sizeof(float));
  pthread_t th[MAX_R];
  for (int r = 0; r < s->R; r++)
    ck_assert_int_eq(pthread_create(&th[r], NULL, rank_main, &w->ctx[r]), 0);
  for (int r = 0; r < s->R; r++)
    ck_assert_int_eq(pthread_join(th[r], NULL), 0);
  for (int r = 0; r < s->R; r++) {
    w->rec[r].n_params = w->n_params;
    state_take(&w->rec[r].fin, w->model[r]);
    imml_model_free(w->model[r]);
    w->model[r] = NULL;
  }
  pthread_barrier_destroy(&w->bar);
  free(w->gbuf);
  free(w->rbuf);
}

static void world_free(world *w) {
  for (int r = 0; r < w->R; r++)
    record_free(&w->rec[r], w->s->M);
}

/* Per-tensor norm-wise relative error of two flat parameter blocks laid
 * out like `model`'s; the largest one. */
static double tensor_err(const imml_model *model, const float *a,
                         const float *b, const char **worst) {
  double e = 0.0;
  for (int t = 0; t < model->n_tensors; t++) {
    const imml_tensor *T = &model->tensors[t];
    const double x = rel_err(a + T->offset, b + T->offset,
                             (size_t)T->rows * (size_t)T->cols);
    if (x > e) {
      e = x;
      *worst = T->name;
    }
  }
  return e;
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
    imml_zero_grad(oracle);
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
    ck_assert(memcmp(after.ema, next->ema, (size_t)s->M * sizeof(float)) == 0);
    e = rel_err(next->dict, after.dict, dict_n);
    ck_assert_msg(e <= TOL, "step %d: dictionary: relative error %g", st, e);
    state_free(&after);
  }
  record_free(&orc, s->M);
  /* 3. The whole trajectory: N_STEPS steps of R ranks against one process
   *    trained alone from the same seed.  The per-step differences of 2
   *    are carried through the optimiser (see TOL_ADAMW). */
  const double tol = s->optimizer == IMML_OPT_ADAMW ? TOL_ADAMW : TOL;
  const mstate *a = &q0->fin, *b = &ref->fin;
  ck_assert_int_eq(a->fill, b->fill);
  ck_assert_int_eq(a->pos, b->pos);
  ck_assert_int_eq(a->p, b->p);
  ck_assert_int_eq(a->fixed, b->fixed);
  ck_assert_int_eq(a->steps, b->steps);
  ck_assert_msg(memcmp(a->ema, b->ema, (size_t)s->M * sizeof(float)) == 0,
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
  const int B = (int)send[0];
  /* layout: B, M counts, max_batch labels, knowledge */
  switch (f->damage) {
  case DMG_B_ZERO:
    m1[0] = 0.0f;
    break;
  case DMG_B_FRACTION:
    m1[0] = 2.5f;
    break;
  case DMG_B_TOO_LARGE:
    m1[0] = 1e6f;
    break;
  case DMG_OWN_B:
    recv[0] = (float)(B == 1 ? 2 : B - 1);
    break;
  case DMG_LABEL:
    m1[1 + 2] = (float)N_CLASSES;
    break;
  case DMG_LABEL_FRAC:
    m1[1 + 2] = 0.5f;
    break;
  case DMG_NAN:
    m1[count - 1 - 0] = NAN; /* the last modality's padding row: unread */
    m1[1 + 2 + 6 + 1] = NAN; /* first knowledge row of modality 0 */
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
  ck_assert_int_eq(imml_set_collective(m, &col), IMML_OK);
}

/* A failing allgather (loop 0: dictionary empty, p given; 1: during
 * warm-up; 2: after warm-up with a filled dictionary) or a damaged
 * gathered message (loops 3..): the forward fails with the status the
 * damage calls for and changes nothing; the step is not pending. */
START_TEST(test_allgather_failure_changes_nothing) {
  const int damage = _i < 3 ? DMG_NONE : _i - 3 + 1;
  imml_config c;
  small_cfg(&c, _i == 0 ? 0 : -1);
  imml_model *m = mk(&c);
  ck_assert_int_eq(optim(m, IMML_OPT_ADAMW), IMML_OK);
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
    ck_assert_int_eq(imml_step(m), IMML_OK);
  }
  ck_assert_int_eq(f.calls, pre);
  /* Two ranks with the same rows: the gathered batch holds them twice. */
  ck_assert_int_eq(imml_dict_fill(m),
                   pre * 2 * B < c.dict_size ? pre * 2 * B : c.dict_size);
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
  };
  ck_assert_msg(st == want[damage], "damage %d: status %d (%s), want %d",
                damage, (int)st, imml_errmsg(m), (int)want[damage]);
  ck_assert(imml_errmsg(m)[0] != '\0');
  if (damage == DMG_NONE)
    ck_assert_ptr_nonnull(strstr(imml_errmsg(m), "allgather"));
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
  ck_assert_int_eq(imml_set_collective(NULL, &col), IMML_ERR_NULL);
  /* allgather missing */
  ck_assert_int_eq(imml_set_collective(m, &col), IMML_ERR_NULL);
  ck_assert(imml_errmsg(m)[0] != '\0');
  col.allgather = dummy_allgather;
  col.struct_size = sizeof col - 1;
  ck_assert_int_eq(imml_set_collective(m, &col), IMML_ERR_INVALID_ARG);
  col.struct_size = 0;
  ck_assert_int_eq(imml_set_collective(m, &col), IMML_ERR_INVALID_ARG);
  col.struct_size = sizeof col;
  static const int bad[][2] = {{0, 0}, {-1, 0}, {65537, 0},
                               {2, 2}, {2, -1}, {1, 1}};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    col.world_size = bad[i][0];
    col.rank = bad[i][1];
    ck_assert_msg(imml_set_collective(m, &col) == IMML_ERR_INVALID_ARG,
                  "world_size %d rank %d accepted", bad[i][0], bad[i][1]);
    ck_assert(imml_errmsg(m)[0] != '\0');
  }
  ck_assert_int_eq(m->coll.active, 0);
  col.world_size = 3;
  col.rank = 2;
  ck_assert_int_eq(imml_set_collective(m, &col), IMML_OK);
  ck_assert_str_eq(imml_errmsg(m), "");
  ck_assert_int_eq(m->coll.active, 1);
  /* Replacing and detaching. */
  col.world_size = 1;
  col.rank = 0;
  ck_assert_int_eq(imml_set_collective(m, &col), IMML_OK);
  ck_assert_int_eq(imml_set_collective(m, NULL), IMML_OK);
  ck_assert_int_eq(m->coll.active, 0);
  ck_assert_int_eq(imml_set_collective(m, NULL), IMML_OK);
  imml_model_free(m);
}
END_TEST

/* imml_set_collective between a training forward and its backward would
 * change the meaning of the pending step: refused, pending step kept. */
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
  ck_assert_int_eq(imml_set_collective(m, &col), IMML_ERR_STATE);
  ck_assert(imml_errmsg(m)[0] != '\0');
  ck_assert_int_eq(imml_set_collective(m, NULL), IMML_ERR_STATE);
  ck_assert_int_eq(m->coll.active, _i == 1);
  /* An evaluation forward keeps the step pending and is local. */
  ck_assert_int_eq(imml_forward(m, IMML_MODE_EVAL, 4,
                                (const float *const *)d.x[1], NULL, NULL, NULL),
                   IMML_OK);
  ck_assert_int_eq(f.calls, _i == 1 ? 1 : 0);
  ck_assert_int_eq(imml_set_collective(m, &col), IMML_ERR_STATE);
  ck_assert_int_eq(imml_backward(m, NULL), IMML_OK);
  ck_assert_int_eq(imml_dict_fill(m), _i == 1 ? 8 : 4);
  ck_assert_int_eq(imml_set_collective(m, &col), IMML_OK);
  ck_assert_int_eq(imml_set_collective(m, NULL), IMML_OK);
  gdata_free(&d);
  imml_model_free(m);
}
END_TEST

/* An allocator that can be told to fail: imml_set_collective then reports
 * IMML_ERR_NOMEM and keeps the collective it had. */
typedef struct fail_alloc {
  int fail;
} fail_alloc;

static void *fa_malloc(size_t n, void *u) {
  fail_alloc *a = u;
  return a->fail ? NULL : malloc(n);
}

static void fa_free(void *p, void *u) {
  (void)u;
  free(p);
}

START_TEST(test_set_collective_nomem) {
  fail_alloc fa = {0};
  imml_config c;
  small_cfg(&c, 1);
  c.allocator.malloc_fn = fa_malloc;
  c.allocator.free_fn = fa_free;
  c.allocator.user_data = &fa;
  imml_model *m = mk(&c);
  fake f = {0, DMG_NONE, 0, 0};
  attach_fake(m, &f);
  imml_collective col;
  imml_collective_init(&col);
  col.allgather = dummy_allgather;
  col.world_size = 4;
  fa.fail = 1;
  ck_assert_int_eq(imml_set_collective(m, &col), IMML_ERR_NOMEM);
  fa.fail = 0;
  ck_assert_int_eq(m->coll.active, 1);
  ck_assert_int_eq(m->coll.ops.world_size, 2);
  gdata d;
  gdata_make(&d, 2, 4);
  ck_assert_int_eq(imml_forward(m, IMML_MODE_TRAIN, 3,
                                (const float *const *)d.x[0], d.y[0], NULL,
                                NULL),
                   IMML_OK);
  ck_assert_int_eq(imml_backward(m, NULL), IMML_OK);
  ck_assert_int_eq(f.calls, 1);
  ck_assert_int_eq(imml_dict_fill(m), 6);
  gdata_free(&d);
  imml_model_free(m);
}
END_TEST

/* After detaching, training is local and bit-identical to a model that
 * never had a collective; evaluation and imml_predict never gather. */
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
  imml_workspace *ws;
  ck_assert_int_eq(imml_workspace_create(a, &ws), IMML_OK);
  ck_assert_int_eq(
      imml_predict(a, ws, 4, (const float *const *)d.x[0], lb, NULL, NULL),
      IMML_OK);
  ck_assert_int_eq(f.calls, 0);
  imml_workspace_free(ws);
  ck_assert_int_eq(imml_set_collective(a, NULL), IMML_OK);
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
    ck_assert(memcmp(a->grads, b->grads, a->n_params * sizeof(float)) == 0);
    imml_zero_grad(a);
    imml_zero_grad(b);
  }
  ck_assert_int_eq(f.calls, 0);
  ck_assert_int_eq(imml_dict_fill(a), imml_dict_fill(b));
  gdata_free(&d);
  imml_model_free(a);
  imml_model_free(b);
}
END_TEST

/* Regression: p given, empty dictionary, G = 12 gathered rows > max(J = 8,
 * max_batch = 3) strata; the attention scratch sized for the model's own
 * max(J, max_batch) rows was overrun before imml_set_collective sized it
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
  imml_blas_threads(1);
  return imml_run_suite(distributed_suite());
}
