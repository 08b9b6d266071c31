/*
 * The correctness test of libimml's numbers: an independent float64
 * implementation of METHOD.md sections 1-5 (written from METHOD.md only,
 * not from lib/), differentiated by central finite differences, against the
 * library's float32 forward (logits, every loss term) and backward (every
 * parameter tensor and every input h_m), the strata dictionary push and the
 * warm-up, for training steps of one micro-batch and of several.
 *
 * Gradient accumulation (doc/DECISIONS.md)
 *   A step is K >= 1 micro-batches (imml_forward TRAIN + imml_backward
 *   each), then one imml_commit.  Every micro-batch sees the pre-step model
 *   (parameters, the dictionary as of the last commit, p); the gradient
 *   after K backwards is the sum over the micro-batches of the gradient of
 *   each one's own loss (its own means, L_con pairs within it), as K calls
 *   of PyTorch's loss.backward() accumulate; the commit pushes micro-batch
 *   1's rows, then 2's, ..., as K pushes would, and during warm-up makes
 *   one EMA update with the accuracy of the union of the step's rows and
 *   counts one step.  run_step() checks all of it against the reference of
 *   each micro-batch; test_accumulate_identical checks determinism and the
 *   sum with the library alone.
 *
 * Reference
 *   ref_forward() computes, in double, from the model's float32 parameters
 *   and inputs converted to double: the MDKEN branches and heads, L_dis,
 *   L_con (l(S) and l(S^T)), the strata attention with beta weighting over
 *   the dictionary as the library holds it at the start of the step (or
 *   over the batch's own knowledge when the dictionary is empty: those
 *   strata are computed once at the base point and then held constant, so
 *   the finite differences see them detached), the conditional / strict
 *   slots, the built-in concat + linear F&T (or a host F&T that returns
 *   zero logits), CE and total = CE + g1 L_con + g2 L_dis.  During warm-up:
 *   slots = z_m, L_con = 0, no attention.
 *
 *   Reference gradients: fourth-order central differences of the double
 *   total loss, step h = 2e-4 * max(1, |x|), for every parameter and input
 *   component (see fd_gradient() for why not the two-point stencil).
 *
 * Tolerances (justification)
 *   - Gradients, per tensor, norm-wise ||g - g_ref|| / max(||g_ref||, 1e-12)
 *     < 1e-4 (METHOD.md's bound against a float64 reference).  Our g_ref
 *     is a float64 fourth-order central difference: truncation error
 *     ~h^4 |f^(5)| ~ 1e-16 and rounding error ~ 1e-16 |L| / h ~ 1e-12 per
 *     component, far below 1e-4 of any tensor norm we meet (smallest
 *     ~3e-6).  The library's float32 arithmetic contributes ~1e-7..1e-5
 *     relative (1e-5 only on those tiny tensors).  Tensors whose
 *     exact gradient is zero (Wq, Wk for beta = 0 or in warm-up, heads when
 *     g2 = 0, ...) have an exactly zero finite difference too, because the
 *     loss then does not depend on them numerically (0 * x == 0), so the
 *     1e-12 floor demands an exact zero from the library as well.
 *   - Forward: logits norm-wise and each loss term (ce, con, dis, total)
 *     relative 1e-5: the float32 forward of these small shapes is accurate
 *     to ~1e-6 relative; values are O(0.1..3), no cancellation.
 *   - Dictionary: entries that were already there must be bit-identical;
 *     the pushed rows (library float32 z) equal the double z within 1e-5
 *     norm-wise.
 * Finite differences through a ReLU are only valid away from the kink:
 * each checked batch is redrawn until every pre-activation |h W1 + b1|
 * is >= 1e-3 (a perturbation of 2h = 4e-4 of one W1, b1 or h entry moves
 * a pre-activation by at most 4e-4, as |h| <= 1 and |W1| < 1), and
 * fd_gradient() asserts that no perturbation changed the ReLU pattern.
 *
 * Set IMML_GRAD_VERBOSE=1 to print the worst errors of every case.
 */
#include "check_main.h"
#include "common.h"

#include "imml.h"
#include "internal.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Bounds of the shapes this test uses (fixed arrays, no VLAs). */
enum {
  RMAXM = 3,
  RMAXB = 16,
  RMAXH = 8,
  RMAXK = 4,
  RMAXC = 4,
  RMAXJ = 16,
  RMAXT = 6 * RMAXM + 4
};

#define TOL_GRAD 1e-4
#define TOL_FWD 1e-5
#define TOL_DICT 1e-5
#define MIN_PRE 1e-3
#define FD_STEP 2e-4

/* ------------------------------------------------------------------ */
/* float64 reference of METHOD.md sections 1-5                         */
/* ------------------------------------------------------------------ */

typedef struct ref_cfg {
  int M, H, k, C, B;
  int dims[RMAXM];
  double beta, g1, g2, tau;
  int p; /* predominant modality, -1: warm-up */
  int strict;
  int builtin_ft;       /* 0: host F&T returning zero logits */
  int nstrata;          /* J_eff */
  const double *strata; /* nstrata x (M k), modality order, constants */
  size_t off[RMAXT];    /* tensor offsets in x (imml_param_get order) */
  size_t hoff[RMAXM];   /* offsets of h_m (B x d_m) in x */
} ref_cfg;

typedef struct ref_out {
  double ce, con, dis, total;
  double logits[RMAXB * RMAXC];
  double z[RMAXM][RMAXB * RMAXK];
  int correct[RMAXM]; /* unimodal argmax hits */
  double ce_m[RMAXM]; /* unimodal heads' batch cross-entropies */
  double min_pre;     /* min |pre-activation| over all branches */
  uint64_t pattern;   /* hash of the ReLU on/off pattern */
} ref_out;

/* -log softmax(o)[y], with the row maximum subtracted. */
static double ref_ce_row(const double *o, int n, int y) {
  double mx = o[0];
  for (int j = 1; j < n; j++)
    if (o[j] > mx)
      mx = o[j];
  double s = 0.0;
  for (int j = 0; j < n; j++)
    s += exp(o[j] - mx);
  return mx + log(s) - o[y];
}

/* l(S) (transpose = 0) or l(S^T) (transpose = 1), S: B x B. */
static double ref_lsup(const double *S, int B, int transpose, const int *y) {
  double tot = 0.0;
  for (int i = 0; i < B; i++) {
    double row[RMAXB];
    for (int j = 0; j < B; j++)
      row[j] = transpose ? S[j * B + i] : S[i * B + j];
    double mx = row[0];
    for (int j = 1; j < B; j++)
      if (row[j] > mx)
        mx = row[j];
    double s = 0.0;
    for (int j = 0; j < B; j++)
      s += exp(row[j] - mx);
    const double lse = mx + log(s);
    int npos = 0;
    double acc = 0.0;
    for (int j = 0; j < B; j++)
      if (y[j] == y[i]) {
        npos++;
        acc += lse - row[j];
      }
    tot += acc / npos;
  }
  return tot / B;
}

static void ref_normalize(const double *z, int B, int k, double *n) {
  for (int i = 0; i < B; i++) {
    double ss = 0.0;
    for (int s = 0; s < k; s++)
      ss += z[i * k + s] * z[i * k + s];
    double r = sqrt(ss);
    if (r < 1e-12)
      r = 1e-12;
    for (int s = 0; s < k; s++)
      n[i * k + s] = z[i * k + s] / r;
  }
}

static void ref_forward(const ref_cfg *c, const double *x, const int *y,
                        ref_out *out) {
  const int M = c->M, H = c->H, k = c->k, C = c->C, B = c->B;
  double slot[RMAXM][RMAXB * RMAXK];

  /* Section 1: branches, heads, L_dis. */
  out->min_pre = INFINITY;
  out->pattern = 0;
  out->dis = 0.0;
  for (int m = 0; m < M; m++) {
    const int d = c->dims[m];
    const double *hm = x + c->hoff[m];
    const double *W1 = x + c->off[m * 6 + 0], *b1 = x + c->off[m * 6 + 1];
    const double *W2 = x + c->off[m * 6 + 2], *b2 = x + c->off[m * 6 + 3];
    const double *Wc = x + c->off[m * 6 + 4], *bc = x + c->off[m * 6 + 5];
    double ce = 0.0;
    out->correct[m] = 0;
    for (int i = 0; i < B; i++) {
      double u[RMAXH], o[RMAXC];
      for (int j = 0; j < H; j++) {
        double pre = b1[j];
        for (int t = 0; t < d; t++)
          pre += hm[i * d + t] * W1[t * H + j];
        if (fabs(pre) < out->min_pre)
          out->min_pre = fabs(pre);
        u[j] = pre > 0.0 ? pre : 0.0;
        out->pattern = out->pattern * 1000003u + (pre > 0.0 ? 2u : 1u);
      }
      for (int q = 0; q < k; q++) {
        double zz = b2[q];
        for (int j = 0; j < H; j++)
          zz += u[j] * W2[j * k + q];
        out->z[m][i * k + q] = zz;
      }
      for (int cc = 0; cc < C; cc++) {
        double oo = bc[cc];
        for (int q = 0; q < k; q++)
          oo += out->z[m][i * k + q] * Wc[q * C + cc];
        o[cc] = oo;
      }
      ce += ref_ce_row(o, C, y[i]);
      int best = 0;
      for (int cc = 1; cc < C; cc++)
        if (o[cc] > o[best])
          best = cc;
      out->correct[m] += best == y[i];
    }
    out->ce_m[m] = ce / B;
    out->dis += ce / B;
  }
  out->dis /= M;
  for (int m = 0; m < M; m++)
    memcpy(slot[m], out->z[m], sizeof(double) * (size_t)(B * k));

  out->con = 0.0;
  if (c->p >= 0) {
    const int p = c->p, Mk = M * k, J = c->nstrata;
    /* Section 1: contrastive alignment. */
    double np_[RMAXB * RMAXK], na[RMAXB * RMAXK], S[RMAXB * RMAXB];
    ref_normalize(out->z[p], B, k, np_);
    for (int a = 0; a < M; a++) {
      if (a == p)
        continue;
      ref_normalize(out->z[a], B, k, na);
      for (int i = 0; i < B; i++)
        for (int j = 0; j < B; j++) {
          double dot = 0.0;
          for (int s = 0; s < k; s++)
            dot += np_[i * k + s] * na[j * k + s];
          S[i * B + j] = dot / c->tau;
        }
      out->con += 0.5 * (ref_lsup(S, B, 0, y) + ref_lsup(S, B, 1, y));
    }
    out->con /= M - 1;

    /* Section 2: attention over the strata, predominant first. */
    int order[RMAXM], no = 0;
    order[no++] = p;
    for (int m = 0; m < M; m++)
      if (m != p)
        order[no++] = m;
    const double *Wq = x + c->off[M * 6 + 0], *Wk = x + c->off[M * 6 + 1];
    double K[RMAXJ][RMAXK], Q[RMAXB][RMAXK], w[RMAXB][RMAXJ];
    for (int j = 0; j < J; j++)
      for (int t = 0; t < k; t++) {
        double acc = 0.0;
        for (int b = 0; b < M; b++)
          for (int s = 0; s < k; s++)
            acc += c->strata[(size_t)j * Mk + order[b] * k + s] *
                   Wk[(b * k + s) * k + t];
        K[j][t] = acc;
      }
    for (int i = 0; i < B; i++)
      for (int t = 0; t < k; t++) {
        double acc = 0.0;
        for (int b = 0; b < M; b++)
          for (int s = 0; s < k; s++)
            acc += out->z[order[b]][i * k + s] * Wq[(b * k + s) * k + t];
        Q[i][t] = acc;
      }
    for (int i = 0; i < B; i++) {
      double e[RMAXJ], mx = -INFINITY, sum = 0.0;
      for (int j = 0; j < J; j++) {
        double dot = 0.0;
        for (int t = 0; t < k; t++)
          dot += Q[i][t] * K[j][t];
        e[j] = dot / sqrt((double)k);
        if (e[j] > mx)
          mx = e[j];
      }
      for (int j = 0; j < J; j++) {
        e[j] = exp(e[j] - mx);
        sum += e[j];
      }
      for (int j = 0; j < J; j++)
        w[i][j] = c->beta * (e[j] / sum) + (1.0 - c->beta) / J;
    }
    for (int a = 0; a < M; a++) {
      if (a == p)
        continue;
      for (int i = 0; i < B; i++)
        for (int s = 0; s < k; s++) {
          double xh = 0.0;
          for (int j = 0; j < J; j++)
            xh += w[i][j] * c->strata[(size_t)j * Mk + a * k + s];
          slot[a][i * k + s] = c->strict ? xh : out->z[a][i * k + s] + xh;
        }
    }
  }

  /* Section 3: F&T; section 4: objective. */
  out->ce = 0.0;
  for (int i = 0; i < B; i++) {
    double *lg = out->logits + i * C;
    for (int cc = 0; cc < C; cc++) {
      double acc = 0.0;
      if (c->builtin_ft) {
        const double *Wf = x + c->off[M * 6 + 2], *bf = x + c->off[M * 6 + 3];
        acc = bf[cc];
        for (int m = 0; m < M; m++)
          for (int s = 0; s < k; s++)
            acc += slot[m][i * k + s] * Wf[(m * k + s) * C + cc];
      }
      lg[cc] = acc;
    }
    out->ce += ref_ce_row(lg, C, y[i]);
  }
  out->ce /= B;
  out->total = out->ce + c->g1 * out->con + c->g2 * out->dis;
}

/* Fourth-order central differences of the total loss w.r.t. every
 * component of x:
 *   g = (8 (f(x+h) - f(x-h)) - (f(x+2h) - f(x-2h))) / (12 h),
 * h = FD_STEP * max(1, |x|).  Truncation error h^4 |f^(5)| / 30 ~ 1e-16,
 * rounding error ~ 1e-16 |L| / h ~ 1e-12 per component.  (The two-point
 * stencil with h = 1e-6 has ~1e-10 rounding noise per component, which is
 * ~1e-4 relative on the structurally small gradients met here, e.g. an
 * auxiliary branch in strict mode that the loss reaches only through the
 * attention weights, |g| ~ 3e-6: too close to the tolerance to tell the
 * library's error from the reference's.)  When every f is equal the
 * result is exactly 0. */
static void fd_gradient(const ref_cfg *c, double *x, size_t nx, const int *y,
                        double *g) {
  static const double mul[4] = {-2.0, -1.0, 1.0, 2.0};
  ref_out o;
  ref_forward(c, x, y, &o);
  const uint64_t pattern = o.pattern;
  for (size_t i = 0; i < nx; i++) {
    const double xi = x[i];
    const double h = FD_STEP * (fabs(xi) > 1.0 ? fabs(xi) : 1.0);
    double f[4];
    for (int q = 0; q < 4; q++) {
      x[i] = xi + mul[q] * h;
      ref_forward(c, x, y, &o);
      f[q] = o.total;
      ck_assert_msg(o.pattern == pattern,
                    "finite difference of x[%zu] crossed a ReLU kink", i);
    }
    x[i] = xi;
    g[i] = (8.0 * (f[2] - f[1]) - (f[3] - f[0])) / (12.0 * h);
  }
}

/* ------------------------------------------------------------------ */
/* Host F&T whose logits are constant zero (CE then has no gradient)   */
/* ------------------------------------------------------------------ */

static int zero_ft_forward(void *user_data, int training, int rows,
                           int n_modalities, int knowledge_dim,
                           const float *const *slots, int n_classes,
                           float *logits) {
  (void)user_data;
  (void)training;
  (void)n_modalities;
  (void)knowledge_dim;
  (void)slots;
  memset(logits, 0, sizeof(float) * (size_t)rows * (size_t)n_classes);
  return 0;
}

static int zero_ft_backward(void *user_data, int rows, int n_modalities,
                            int knowledge_dim, const float *const *slots,
                            const float *dlogits, int n_classes,
                            float *const *dslots) {
  (void)user_data;
  (void)slots;
  (void)dlogits;
  (void)n_classes;
  for (int m = 0; m < n_modalities; m++)
    memset(dslots[m], 0, sizeof(float) * (size_t)rows * (size_t)knowledge_dim);
  return 0;
}

/* ------------------------------------------------------------------ */
/* Test harness                                                        */
/* ------------------------------------------------------------------ */

typedef struct gcase {
  int M;
  int predominant; /* config.predominant, -1: choose */
  int warmup;      /* config.warmup_steps */
  int strict;
  float beta, g1, g2;
  int host_ft;
  int J;
  int B_fill, n_fill; /* unchecked training steps before the checked ones */
  int B, n_check;     /* checked steps */
  /* Micro-batches of every checked step (0 or 1: one; fill steps have
   * one); the first has B rows, the others B2 (B for 0). */
  int K, B2;
  uint64_t seed;
  char name[200];
} gcase;

typedef struct harness {
  gcase c;
  imml_model *m;
  int dims[RMAXM];
  int H, k, C, Mk, ntens;
  size_t off[RMAXT], nparam;
  uint64_t rng;
  /* the step's micro-batches, one after the other (RMAXB rows in all) */
  float *feat[RMAXM], *dfeat[RMAXM];
  int labels[RMAXB];
  double ema[RMAXM]; /* reference warm-up EMAs */
  int steps;         /* reference warm-up step count */
  /* warm-up commits of several micro-batches whose union statistic gave
   * an EMA other than the mean of the micro-batches' own accuracies would
   * (so the test tells the two apart) */
  int ema_distinct;
  int nfail;
  char first[600];
  double worst_grad, worst_fwd, worst_dict;
  int verbose;
} harness;

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static void
record_fail(harness *hs, const char *fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  fprintf(stderr, "# FAIL [%s] %s\n", hs->c.name, buf);
  if (hs->nfail == 0)
    snprintf(hs->first, sizeof hs->first, "%s", buf);
  hs->nfail++;
}

static uint64_t rng_next(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static double rng_unif(uint64_t *s) { /* [0, 1) */
  return (double)(rng_next(s) >> 11) * (1.0 / 9007199254740992.0);
}

static double rel_err_vec(const double *a, const double *ref, size_t n) {
  double dd = 0.0, rr = 0.0;
  for (size_t i = 0; i < n; i++) {
    dd += (a[i] - ref[i]) * (a[i] - ref[i]);
    rr += ref[i] * ref[i];
  }
  const double den = sqrt(rr) > 1e-12 ? sqrt(rr) : 1e-12;
  return sqrt(dd) / den;
}

static double rel_err_scalar(double a, double ref) {
  const double den = fabs(ref) > 1e-12 ? fabs(ref) : 1e-12;
  return fabs(a - ref) / den;
}

static void harness_setup(harness *hs, const gcase *c) {
  memset(hs, 0, sizeof *hs);
  hs->c = *c;
  hs->verbose = getenv("IMML_GRAD_VERBOSE") != NULL;
  hs->rng = c->seed * 7919u + 17u;
  static const int dims_all[RMAXM] = {5, 4, 6};
  for (int m = 0; m < c->M; m++)
    hs->dims[m] = dims_all[m];
  hs->H = 6;
  hs->k = 4;
  hs->C = 3;
  hs->Mk = c->M * hs->k;

  imml_config cfg;
  imml_config_init(&cfg);
  cfg.n_modalities = c->M;
  cfg.dims = hs->dims;
  cfg.hidden_dim = hs->H;
  cfg.knowledge_dim = hs->k;
  cfg.n_classes = hs->C;
  cfg.max_batch = c->B > c->B_fill ? c->B : c->B_fill;
  if (c->B2 > cfg.max_batch)
    cfg.max_batch = c->B2;
  cfg.dict_size = c->J;
  cfg.beta = c->beta;
  cfg.gamma1 = c->g1;
  cfg.gamma2 = c->g2;
  cfg.tau = 0.5f;
  cfg.predominant = c->predominant;
  cfg.warmup_steps = c->warmup;
  cfg.slot_mode = c->strict ? IMML_SLOT_STRICT : IMML_SLOT_CONDITIONAL;
  cfg.seed = c->seed;

  imml_ft_ops ops;
  imml_ft_ops_init(&ops);
  ops.forward = zero_ft_forward;
  ops.backward = zero_ft_backward;
  imml_status st = imml_model_create(&cfg, c->host_ft ? &ops : NULL, &hs->m);
  ck_assert_msg(st == IMML_OK, "[%s] imml_model_create: %s (%s)", c->name,
                imml_status_string(st), imml_model_errmsg(hs->m));

  /* Parameter tensors: names, order and shapes as METHOD.md and imml.h. */
  hs->ntens = imml_param_count(hs->m);
  const int want = 6 * c->M + (c->host_ft ? 2 : 4);
  ck_assert_msg(hs->ntens == want, "[%s] %d tensors, expected %d", c->name,
                hs->ntens, want);
  static const char *const sfx[6] = {"w1", "b1", "w2", "b2", "wc", "bc"};
  size_t off = 0;
  for (int t = 0; t < hs->ntens; t++) {
    imml_param_view v;
    ck_assert_int_eq(imml_param_get(hs->m, t, &v), IMML_OK);
    char nm[32];
    int rows, cols;
    if (t < 6 * c->M) {
      const int mm = t / 6, w = t % 6;
      snprintf(nm, sizeof nm, "m%d.%s", mm, sfx[w]);
      const int nin[6] = {hs->dims[mm], 1, hs->H, 1, hs->k, 1};
      const int nout[6] = {hs->H, hs->H, hs->k, hs->k, hs->C, hs->C};
      rows = nin[w];
      cols = nout[w];
    } else {
      static const char *const tail[4] = {"fdc.wq", "fdc.wk", "ft.w", "ft.b"};
      const int w = t - 6 * c->M;
      snprintf(nm, sizeof nm, "%s", tail[w]);
      rows = w == 3 ? 1 : hs->Mk;
      cols = w < 2 ? hs->k : hs->C;
    }
    ck_assert_msg(strcmp(v.name, nm) == 0 && v.rows == rows && v.cols == cols,
                  "[%s] tensor %d is %s %dx%d, expected %s %dx%d", c->name, t,
                  v.name, v.rows, v.cols, nm, rows, cols);
    hs->off[t] = off;
    off += (size_t)rows * (size_t)cols;
  }
  hs->nparam = off;
  for (int m = 0; m < c->M; m++) {
    const size_t n = (size_t)RMAXB * (size_t)hs->dims[m];
    hs->feat[m] = malloc(sizeof(float) * n);
    hs->dfeat[m] = malloc(sizeof(float) * n);
    ck_assert_ptr_nonnull(hs->feat[m]);
    ck_assert_ptr_nonnull(hs->dfeat[m]);
  }

  /* "Real training" between steps: plain SGD. */
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_SGD);
  oc.lr = 0.05f;
  ck_assert_int_eq(imml_optim_setup(hs->m, &oc), IMML_OK);
}

static void harness_free(harness *hs) {
  for (int m = 0; m < hs->c.M; m++) {
    free(hs->feat[m]);
    free(hs->dfeat[m]);
  }
  imml_model_free(hs->m);
}

/* Reads the model's float32 parameters and rows r0..r0+B-1 of the step's
 * features into x (double). */
static void fill_x(harness *hs, int r0, int B, double *x, ref_cfg *rc) {
  for (int t = 0; t < hs->ntens; t++) {
    imml_param_view v;
    ck_assert_int_eq(imml_param_get(hs->m, t, &v), IMML_OK);
    for (int i = 0; i < v.rows * v.cols; i++)
      x[hs->off[t] + (size_t)i] = (double)v.data[i];
  }
  size_t o = hs->nparam;
  for (int m = 0; m < hs->c.M; m++) {
    rc->hoff[m] = o;
    const float *f = hs->feat[m] + (size_t)r0 * (size_t)hs->dims[m];
    for (int i = 0; i < B * hs->dims[m]; i++)
      x[o + (size_t)i] = (double)f[i];
    o += (size_t)(B * hs->dims[m]);
  }
}

/* The dictionary in FIFO order, oldest first; returns its fill. */
static int dict_logical(const imml_model *m, int Mk, float *out) {
  const int fill = m->dict_fill, J = m->cfg.dict_size;
  const int start = fill < J ? 0 : m->dict_pos;
  for (int t = 0; t < fill; t++)
    memcpy(out + (size_t)t * (size_t)Mk,
           m->dict + (size_t)((start + t) % J) * (size_t)Mk,
           sizeof(float) * (size_t)Mk);
  return fill;
}

/* The number of components of x for B rows: the parameters, then the
 * features. */
static size_t x_count(const harness *hs, int B) {
  size_t nx = hs->nparam;
  for (int m = 0; m < hs->c.M; m++)
    nx += (size_t)(B * hs->dims[m]);
  return nx;
}

/* Every parameter gradient of the library, in x's order, into g. */
static void lib_grads(harness *hs, double *g) {
  for (int t = 0; t < hs->ntens; t++) {
    imml_param_view v;
    ck_assert_int_eq(imml_param_get(hs->m, t, &v), IMML_OK);
    for (int i = 0; i < v.rows * v.cols; i++)
      g[hs->off[t] + (size_t)i] = (double)v.grad[i];
  }
}

/* The state a micro-batch leaves alone until the commit: the dictionary
 * (contents, fill, position), the warm-up and the predominant modality. */
typedef struct step_state {
  int fill, pos, p, fixed, steps;
  float ema[RMAXM];
  float *raw; /* J x M k, storage order */
} step_state;

static void state_take(harness *hs, step_state *s) {
  const size_t n = (size_t)hs->c.J * (size_t)hs->Mk;
  s->fill = hs->m->dict_fill;
  s->pos = hs->m->dict_pos;
  ck_assert_int_eq(imml_predominant_get(hs->m, &s->p, &s->fixed), IMML_OK);
  ck_assert_int_eq(imml_warmup_get(hs->m, &s->steps, s->ema), IMML_OK);
  memcpy(s->raw, hs->m->dict, sizeof(float) * n);
}

static int state_same(harness *hs, const step_state *s) {
  const size_t n = (size_t)hs->c.J * (size_t)hs->Mk;
  int p = -2, fixed = -1, steps = -1;
  float ema[RMAXM];
  ck_assert_int_eq(imml_predominant_get(hs->m, &p, &fixed), IMML_OK);
  ck_assert_int_eq(imml_warmup_get(hs->m, &steps, ema), IMML_OK);
  return hs->m->dict_fill == s->fill && hs->m->dict_pos == s->pos &&
         p == s->p && fixed == s->fixed && steps == s->steps &&
         memcmp(ema, s->ema, sizeof(float) * (size_t)hs->c.M) == 0 &&
         memcmp(hs->m->dict, s->raw, sizeof(float) * n) == 0;
}

/* Per tensor, the library's parameter gradients `lib` against the
 * reference `ref` (both in x's order). */
static void check_grads(harness *hs, const double *lib, const double *ref,
                        const char *tag) {
  for (int t = 0; t < hs->ntens; t++) {
    imml_param_view v;
    ck_assert_int_eq(imml_param_get(hs->m, t, &v), IMML_OK);
    const size_t n = (size_t)v.rows * (size_t)v.cols;
    const double e = rel_err_vec(lib + hs->off[t], ref + hs->off[t], n);
    double ng = 0.0;
    for (size_t i = 0; i < n; i++)
      ng += ref[hs->off[t] + i] * ref[hs->off[t] + i];
    if (e > hs->worst_grad)
      hs->worst_grad = e;
    if (hs->verbose)
      fprintf(stderr, "#   [%s] %s d%-8s rel %.2e  |g_ref| %.3e\n", hs->c.name,
              tag, v.name, e, sqrt(ng));
    if (!(e < TOL_GRAD))
      record_fail(hs, "%s: gradient of %s rel err %.3e (|g_ref| %.3e)", tag,
                  v.name, e, sqrt(ng));
  }
}

/* One training step of K micro-batches (K = 1: a plain step), each a
 * forward and a backward on its own random batch of Bs[q] rows, then one
 * imml_commit and one optimiser step (doc/DECISIONS.md, gradient
 * accumulation).  The reference of micro-batch q is ref_forward on its own
 * rows alone (its own means, L_con pairs within it) over the pre-step
 * state: the parameters, the dictionary as of the last commit (or its own
 * knowledge when that is empty) and the pre-step p.  Always checks every
 * micro-batch's forward values, that its backward changes neither the
 * dictionary nor the warm-up nor p, the commit's push of micro-batch 1's
 * rows, then 2's, ..., and the warm-up state (one EMA update per commit,
 * over the union of the rows).  With `full`, also each micro-batch's input
 * gradients against finite differences of its reference, the accumulated
 * parameter gradients against the sum of those, and, for K > 1, that this
 * sum is far from the gradient of the union of the rows as one batch (so
 * that the test tells the two apart). */
static void run_step(harness *hs, int K, const int *Bs, int full,
                     const char *tag) {
  const gcase *c = &hs->c;
  const int M = c->M, k = hs->k, Mk = hs->Mk, J = c->J, C = hs->C;
  int rows = 0;
  for (int q = 0; q < K; q++)
    rows += Bs[q];
  ck_assert_msg(K >= 1 && rows <= RMAXB, "[%s] %d rows in %d micro-batches",
                c->name, rows, K);
  const size_t nxmax = x_count(hs, rows);
  double *x = malloc(sizeof(double) * nxmax);
  double *g = malloc(sizeof(double) * nxmax);
  double *gsum = calloc(hs->nparam, sizeof(double));
  double *lib = malloc(sizeof(double) * nxmax);
  double *strata = malloc(sizeof(double) * (size_t)RMAXJ * (size_t)Mk);
  double *zu = malloc(sizeof(double) * (size_t)RMAXM * RMAXB * RMAXK);
  float *old = malloc(sizeof(float) * (size_t)J * (size_t)Mk);
  float *now = malloc(sizeof(float) * (size_t)J * (size_t)Mk);
  step_state s0;
  s0.raw = malloc(sizeof(float) * (size_t)J * (size_t)Mk);
  ref_out *kn = malloc(sizeof *kn), *ro = malloc(sizeof *ro);
  ck_assert(x && g && gsum && lib && strata && zu && old && now && s0.raw &&
            kn && ro);

  ref_cfg rc;
  memset(&rc, 0, sizeof rc);
  rc.M = M;
  rc.H = hs->H;
  rc.k = k;
  rc.C = C;
  for (int m = 0; m < M; m++)
    rc.dims[m] = hs->dims[m];
  rc.beta = (double)c->beta;
  rc.g1 = (double)c->g1;
  rc.g2 = (double)c->g2;
  rc.tau = 0.5;
  rc.strict = c->strict;
  rc.builtin_ft = !c->host_ft;
  for (int t = 0; t < hs->ntens; t++)
    rc.off[t] = hs->off[t];

  /* Library state at the start of the step. */
  state_take(hs, &s0);
  const int p = s0.p, fixed = s0.fixed;
  const int warm = !fixed;
  const int fill0 = dict_logical(hs->m, Mk, old);
  const int pos0 = s0.pos;
  if (c->predominant >= 0 && (!fixed || p != c->predominant))
    record_fail(hs,
                "%s: imml_predominant_get p %d fixed %d, config.predominant %d",
                tag, p, fixed, c->predominant);
  if (c->predominant < 0 && warm != (hs->steps < c->warmup))
    record_fail(hs, "%s: warm-up %d after %d completed steps (warmup_steps %d)",
                tag, warm, hs->steps, c->warmup);
  ck_assert_int_eq(imml_grad_zero(hs->m), IMML_OK);

  double ce_sum[RMAXM] = {0.0};  /* sum over rows of unimodal CE */
  double ce_mean[RMAXM] = {0.0}; /* mean of the micro-batches' CEs */
  int r0 = 0;
  for (int q = 0; q < K; q++) {
    const int B = Bs[q];
    char mtag[160];
    if (K > 1)
      snprintf(mtag, sizeof mtag, "%s micro-batch %d/%d (B=%d)", tag, q + 1, K,
               B);
    else
      snprintf(mtag, sizeof mtag, "%s", tag);
    const size_t nx = x_count(hs, B);
    rc.B = B;

    /* Draw the batch (again, while a pre-activation is near the kink). */
    rc.p = -1;
    rc.nstrata = 0;
    rc.strata = NULL;
    for (int tries = 0;; tries++) {
      for (int m = 0; m < M; m++) {
        float *f = hs->feat[m] + (size_t)r0 * (size_t)hs->dims[m];
        for (int i = 0; i < B * hs->dims[m]; i++)
          f[i] = (float)(2.0 * rng_unif(&hs->rng) - 1.0);
      }
      for (int i = 0; i < B; i++)
        hs->labels[r0 + i] = (int)(rng_next(&hs->rng) % (uint64_t)C);
      fill_x(hs, r0, B, x, &rc);
      ref_forward(&rc, x, hs->labels + r0, kn); /* knowledge, base point */
      if (!full || kn->min_pre >= MIN_PRE)
        break;
      ck_assert_msg(tries < 1000, "[%s] no batch away from the ReLU kink",
                    c->name);
    }
    for (int m = 0; m < M; m++)
      for (int i = 0; i < B; i++)
        for (int s = 0; s < k; s++)
          zu[((size_t)m * RMAXB + (size_t)(r0 + i)) * RMAXK + (size_t)s] =
              kn->z[m][i * k + s];

    /* The reference of this micro-batch. */
    rc.p = warm ? -1 : p;
    if (!warm) {
      if (fill0 == 0) { /* the micro-batch's own detached knowledge */
        rc.nstrata = B;
        for (int i = 0; i < B; i++)
          for (int m = 0; m < M; m++)
            for (int s = 0; s < k; s++)
              strata[(size_t)i * Mk + m * k + s] = kn->z[m][i * k + s];
      } else { /* D as the last commit left it */
        rc.nstrata = fill0;
        for (int i = 0; i < fill0 * Mk; i++)
          strata[i] = (double)s0.raw[i];
      }
      rc.strata = strata;
    }
    ref_forward(&rc, x, hs->labels + r0, ro);

    /* The library: forward. */
    float lg[RMAXB * RMAXC];
    imml_losses ls;
    const float *fp[RMAXM];
    for (int m = 0; m < M; m++)
      fp[m] = hs->feat[m] + (size_t)r0 * (size_t)hs->dims[m];
    imml_status st =
        imml_forward(hs->m, IMML_MODE_TRAIN, B, fp, hs->labels + r0, lg, &ls);
    ck_assert_msg(st == IMML_OK, "[%s] %s: imml_forward: %s", c->name, mtag,
                  imml_model_errmsg(hs->m));
    if (!state_same(hs, &s0))
      record_fail(hs,
                  "%s: a training forward changed the dictionary or the "
                  "warm-up",
                  mtag);

    /* Forward values. */
    {
      double lgd[RMAXB * RMAXC];
      for (int i = 0; i < B * C; i++)
        lgd[i] = (double)lg[i];
      const double e[5] = {
          rel_err_vec(lgd, ro->logits, (size_t)(B * C)),
          rel_err_scalar(ls.ce, ro->ce), rel_err_scalar(ls.con, ro->con),
          rel_err_scalar(ls.dis, ro->dis), rel_err_scalar(ls.total, ro->total)};
      double nl = 0.0, nr = 0.0; /* logits: report the norms */
      for (int i = 0; i < B * C; i++) {
        nl += lgd[i] * lgd[i];
        nr += ro->logits[i] * ro->logits[i];
      }
      const double libv[5] = {sqrt(nl), ls.ce, ls.con, ls.dis, ls.total};
      const double ref[5] = {sqrt(nr), ro->ce, ro->con, ro->dis, ro->total};
      static const char *const what[5] = {"logits", "ce", "con", "dis",
                                          "total"};
      for (int i = 0; i < 5; i++) {
        if (e[i] > hs->worst_fwd)
          hs->worst_fwd = e[i];
        if (!(e[i] < TOL_FWD))
          record_fail(hs, "%s: forward %s rel err %.3e (lib %.9g ref %.9g%s)",
                      mtag, what[i], e[i], libv[i], ref[i],
                      i == 0 ? ", norms" : "");
      }
    }

    /* The library: backward, which accumulates and changes nothing else
     * until the commit. */
    float *dfp[RMAXM];
    for (int m = 0; m < M; m++) {
      for (int i = 0; i < B * hs->dims[m]; i++)
        hs->dfeat[m][i] = NAN;
      dfp[m] = hs->dfeat[m];
    }
    st = imml_backward(hs->m, dfp);
    ck_assert_msg(st == IMML_OK, "[%s] %s: imml_backward: %s", c->name, mtag,
                  imml_model_errmsg(hs->m));
    if (!state_same(hs, &s0))
      record_fail(hs,
                  "%s: imml_backward changed the dictionary, the warm-up or "
                  "p before the commit",
                  mtag);
    if (hs->m->acc.micro != q + 1)
      record_fail(hs, "%s: %d uncommitted micro-batches, expected %d", mtag,
                  hs->m->acc.micro, q + 1);

    /* Input gradients of this micro-batch against central differences. */
    if (full) {
      fd_gradient(&rc, x, nx, hs->labels + r0, g);
      for (size_t i = 0; i < hs->nparam; i++)
        gsum[i] += g[i];
      for (int m = 0; m < M; m++) {
        const size_t n = (size_t)(B * hs->dims[m]);
        for (size_t i = 0; i < n; i++)
          lib[i] = (double)hs->dfeat[m][i];
        const double e = rel_err_vec(lib, g + rc.hoff[m], n);
        double ng = 0.0;
        for (size_t i = 0; i < n; i++)
          ng += g[rc.hoff[m] + i] * g[rc.hoff[m] + i];
        if (e > hs->worst_grad)
          hs->worst_grad = e;
        if (hs->verbose)
          fprintf(stderr, "#   [%s] %s dh%-7d rel %.2e  |g_ref| %.3e\n",
                  c->name, mtag, m, e, sqrt(ng));
        if (!(e < TOL_GRAD))
          record_fail(hs,
                      "%s: gradient of input h%d rel err %.3e (|g_ref| %.3e)",
                      mtag, m, e, sqrt(ng));
      }
    }
    for (int m = 0; m < M; m++) {
      ce_sum[m] += ro->ce_m[m] * B;
      ce_mean[m] += ro->ce_m[m] / K;
    }
    r0 += B;
  }

  /* The accumulated parameter gradients: the sum of the micro-batches'. */
  if (full) {
    char gtag[200];
    if (K > 1)
      snprintf(gtag, sizeof gtag, "%s, sum over %d micro-batches", tag, K);
    else
      snprintf(gtag, sizeof gtag, "%s", tag);
    lib_grads(hs, lib);
    check_grads(hs, lib, gsum, gtag);
    if (K > 1) {
      /* The union of the rows as one batch (what one step over the same
       * rows would give) must be far from the sum. */
      rc.B = rows;
      rc.p = warm ? -1 : p;
      rc.nstrata = 0;
      rc.strata = NULL;
      if (!warm) {
        if (fill0 == 0) {
          rc.nstrata = rows;
          for (int i = 0; i < rows; i++)
            for (int m = 0; m < M; m++)
              for (int s = 0; s < k; s++)
                strata[(size_t)i * Mk + m * k + s] =
                    zu[((size_t)m * RMAXB + (size_t)i) * RMAXK + (size_t)s];
        } else {
          rc.nstrata = fill0;
          for (int i = 0; i < fill0 * Mk; i++)
            strata[i] = (double)s0.raw[i];
        }
        rc.strata = strata;
      }
      fill_x(hs, 0, rows, x, &rc);
      fd_gradient(&rc, x, x_count(hs, rows), hs->labels, g);
      const double e = rel_err_vec(lib, g, hs->nparam);
      if (hs->verbose)
        fprintf(stderr, "#   [%s] %s: sum vs union of the rows rel %.2e\n",
                c->name, tag, e);
      if (!(e > 100.0 * TOL_GRAD))
        record_fail(hs,
                    "%s: the sum over the micro-batches is within %.3e of the "
                    "gradient of their union as one batch: this step cannot "
                    "tell the two apart",
                    tag, e);
    }
  }

  /* The commit. */
  const imml_status st = imml_commit(hs->m);
  ck_assert_msg(st == IMML_OK, "[%s] %s: imml_commit: %s", c->name, tag,
                imml_model_errmsg(hs->m));
  if (hs->m->acc.micro != 0)
    record_fail(hs, "%s: %d uncommitted micro-batches after the commit", tag,
                hs->m->acc.micro);

  /* The push: FIFO ring, D = last J rows of (D_old, micro-batch 1's rows,
   * micro-batch 2's, ...), as K successive pushes. */
  {
    int all_fit = 1; /* every micro-batch fits the ring */
    for (int q = 0; q < K; q++)
      all_fit &= Bs[q] <= J;
    const int tot = fill0 + rows;
    const int fill1 = tot < J ? tot : J;
    const int got = dict_logical(hs->m, Mk, now);
    if (got != fill1) {
      record_fail(hs, "%s: dict_fill %d after the push, expected %d", tag, got,
                  fill1);
    } else {
      const int pos_ok = fill1 < J ? hs->m->dict_pos == fill1
                         : all_fit ? hs->m->dict_pos == (pos0 + rows) % J
                                   : 1;
      if (!pos_ok)
        record_fail(hs,
                    "%s: dict_pos %d after the push (fill %d pos %d + %d rows; "
                    "%d successive pushes end at %d)",
                    tag, hs->m->dict_pos, fill0, pos0, rows, K,
                    fill1 < J ? fill1 : (pos0 + rows) % J);
      double dd = 0.0, rr = 0.0;
      int old_ok = 1;
      for (int t = 0; t < fill1; t++) {
        const int src = tot - fill1 + t; /* index in (D_old, step rows) */
        const float *row = now + (size_t)t * Mk;
        if (src < fill0) {
          if (memcmp(row, old + (size_t)src * Mk, sizeof(float) * Mk) != 0)
            old_ok = 0;
        } else {
          const int b = src - fill0;
          for (int m = 0; m < M; m++)
            for (int s = 0; s < k; s++) {
              const double r =
                  zu[((size_t)m * RMAXB + (size_t)b) * RMAXK + (size_t)s];
              dd += ((double)row[m * k + s] - r) * ((double)row[m * k + s] - r);
              rr += r * r;
            }
        }
      }
      const double e = sqrt(dd) / (sqrt(rr) > 1e-12 ? sqrt(rr) : 1e-12);
      if (e > hs->worst_dict)
        hs->worst_dict = e;
      if (!old_ok)
        record_fail(hs, "%s: surviving dictionary entries changed or moved",
                    tag);
      if (!(e < TOL_DICT))
        record_fail(
            hs, "%s: pushed rows differ from the step's knowledge (rel %.3e)",
            tag, e);
    }
  }

  /* Warm-up bookkeeping (METHOD.md section 5): one update per commit, the
   * unimodal cross-entropy of the union of the micro-batches' rows; after
   * warm-up p is the lowest EMA. */
  if (warm) {
    int distinct = 0;
    for (int m = 0; m < M; m++) {
      const double before = hs->ema[m];
      hs->ema[m] = 0.9 * before + 0.1 * ce_sum[m] / (double)rows;
      distinct |= fabs(0.9 * before + 0.1 * ce_mean[m] - hs->ema[m]) > 1e-4;
    }
    hs->ema_distinct += K > 1 && distinct;
    hs->steps++;
    int steps = -1, p1 = -2, fixed1 = -1;
    float ema[RMAXM];
    ck_assert_int_eq(imml_warmup_get(hs->m, &steps, ema), IMML_OK);
    ck_assert_int_eq(imml_predominant_get(hs->m, &p1, &fixed1), IMML_OK);
    if (steps != hs->steps)
      record_fail(hs, "%s: warm-up steps %d, expected %d", tag, steps,
                  hs->steps);
    for (int m = 0; m < M; m++)
      if (fabs((double)ema[m] - hs->ema[m]) > 1e-5)
        record_fail(hs, "%s: ema[%d] %.7f, expected %.7f", tag, m,
                    (double)ema[m], hs->ema[m]);
    if (hs->steps < c->warmup) {
      if (fixed1 || p1 != -1)
        record_fail(hs, "%s: p %d fixed %d during warm-up", tag, p1, fixed1);
    } else {
      int best = 0;
      for (int m = 1; m < M; m++)
        if (hs->ema[m] < hs->ema[best] - 1e-9)
          best = m;
      if (!fixed1 || p1 != best)
        record_fail(hs, "%s: after warm-up p %d fixed %d, expected p %d", tag,
                    p1, fixed1, best);
    }
  }

  ck_assert_int_eq(imml_optim_step(hs->m), IMML_OK);
  free(x);
  free(g);
  free(gsum);
  free(lib);
  free(strata);
  free(zu);
  free(old);
  free(now);
  free(s0.raw);
  free(kn);
  free(ro);
}

/* The outcome of a case that run_case reports besides its failures. */
typedef struct case_stats {
  int ema_distinct;
} case_stats;

static case_stats run_case(const gcase *c) {
  harness *hs = malloc(sizeof *hs);
  ck_assert_ptr_nonnull(hs);
  harness_setup(hs, c);
  const int K = c->K > 1 ? c->K : 1;
  int bc[RMAXB];
  ck_assert_int_le(K, RMAXB);
  for (int q = 0; q < K; q++)
    bc[q] = q == 0 || !c->B2 ? c->B : c->B2;
  char tag[80];
  for (int s = 0; s < c->n_fill; s++) {
    snprintf(tag, sizeof tag, "fill step %d", s + 1);
    run_step(hs, 1, &c->B_fill, 0, tag);
  }
  for (int s = 0; s < c->n_check; s++) {
    int p = -1;
    ck_assert_int_eq(imml_predominant_get(hs->m, &p, NULL), IMML_OK);
    snprintf(tag, sizeof tag, "step %d (p=%d%s, fill %d pos %d)",
             c->n_fill + s + 1, p, p < 0 ? " warm-up" : "", hs->m->dict_fill,
             hs->m->dict_pos);
    run_step(hs, K, bc, 1, tag);
  }
  if (hs->verbose)
    fprintf(stderr, "# [%s] worst: grad %.2e fwd %.2e dict %.2e\n", c->name,
            hs->worst_grad, hs->worst_fwd, hs->worst_dict);
  const int nfail = hs->nfail;
  case_stats cs = {hs->ema_distinct};
  char first[600];
  snprintf(first, sizeof first, "%s", hs->first);
  harness_free(hs);
  free(hs);
  ck_assert_msg(nfail == 0, "[%s] %d check(s) failed; first: %s", c->name,
                nfail, first);
  return cs;
}

/* ------------------------------------------------------------------ */
/* Cases                                                               */
/* ------------------------------------------------------------------ */

static const int mp_list[5][2] = {{2, 0}, {2, 1}, {3, 0}, {3, 1}, {3, 2}};
static const float beta_list[3] = {0.0f, 0.5f, 1.0f};
static const char *const dict_names[3] = {"empty", "partial", "full+wrapped"};

/* A case with (M, p) from mp_list[mp] (p named, so there is no warm-up),
 * the given slot mode and beta; every other field zero. */
static void named_case(gcase *c, int mp, int strict, float beta) {
  memset(c, 0, sizeof *c);
  c->M = mp_list[mp][0];
  c->predominant = mp_list[mp][1];
  c->warmup = 3;
  c->strict = strict;
  c->beta = beta;
}

/* Named p (no warm-up): (M, p) x slot mode x beta x dictionary state x
 * {total with g1 = 0.5, g2 = 1;  CE only with g1 = g2 = 0}. */
enum { N_GRID = 5 * 2 * 3 * 3 * 2 };

START_TEST(test_grid) {
  int r = _i;
  const int loss = r % 2;
  r /= 2;
  const int dict = r % 3;
  r /= 3;
  const int bi = r % 3;
  r /= 3;
  const int strict = r % 2;
  r /= 2;
  const int mp = r;
  gcase c;
  named_case(&c, mp, strict, beta_list[bi]);
  c.g1 = loss == 0 ? 0.5f : 0.0f;
  c.g2 = loss == 0 ? 1.0f : 0.0f;
  c.J = 10;
  c.B_fill = 8;
  c.n_fill = dict; /* 0: empty, 1: 8 of 10, 2: full, wrapped to pos 6 */
  c.B = c.M == 2 ? 8 : 6;
  c.n_check = 1;
  c.seed = 1000u + (uint64_t)_i;
  snprintf(c.name, sizeof c.name,
           "grid#%d M=%d p=%d %s beta=%.1f dict=%s loss=%s B=%d", _i, c.M,
           c.predominant, strict ? "strict" : "conditional", (double)c.beta,
           dict_names[dict], loss == 0 ? "total(g1=0.5,g2=1)" : "CE-only", c.B);
  run_case(&c);
}
END_TEST

/* Each auxiliary term alone: host F&T with zero logits and zero dslots,
 * (g1, g2) = (0, 1) for L_dis, (1, 0) for L_con. */
enum { N_TERMS = 2 * 5 * 2 };

START_TEST(test_loss_terms) {
  int r = _i;
  const int term = r % 2;
  r /= 2;
  const int dict = r % 2;
  r /= 2;
  const int mp = r;
  gcase c;
  named_case(&c, mp, dict, 0.5f); /* both modes, though dslots are zero */
  c.g1 = term == 0 ? 0.0f : 1.0f;
  c.g2 = term == 0 ? 1.0f : 0.0f;
  c.host_ft = 1;
  c.J = 10;
  c.B_fill = 8;
  c.n_fill = dict ? 2 : 0;
  c.B = c.M == 2 ? 8 : 6;
  c.n_check = 1;
  c.seed = 5000u + (uint64_t)_i;
  snprintf(c.name, sizeof c.name,
           "terms#%d M=%d p=%d zero-F&T %s dict=%s loss=%s B=%d", _i, c.M,
           c.predominant, c.strict ? "strict" : "conditional",
           dict_names[dict ? 2 : 0],
           term == 0 ? "L_dis-only(g1=0,g2=1)" : "L_con-only(g1=1,g2=0)", c.B);
  run_case(&c);
}
END_TEST

/* Automatic choice of p: warmup_steps = 3, five checked steps (three in
 * warm-up over an empty / partial / full dictionary, then two with the
 * chosen p over the full, wrapped dictionary). */
enum { N_WARM = 2 * 2 * 2 * 2 };

START_TEST(test_warmup) {
  int r = _i;
  const int loss = r % 2;
  r /= 2;
  const int bi = r % 2;
  r /= 2;
  const int strict = r % 2;
  r /= 2;
  gcase c;
  memset(&c, 0, sizeof c);
  c.M = r == 0 ? 2 : 3;
  c.predominant = -1;
  c.warmup = 3;
  c.strict = strict;
  c.beta = bi ? 1.0f : 0.5f;
  c.g1 = loss == 0 ? 0.5f : 1.0f;
  c.g2 = loss == 0 ? 1.0f : 0.0f;
  c.J = 10;
  c.B_fill = 8;
  c.B = 8;
  c.n_check = 5;
  c.seed = 9000u + (uint64_t)_i;
  snprintf(c.name, sizeof c.name,
           "warmup#%d M=%d p=auto(3 steps) %s beta=%.1f loss=%s B=%d", _i, c.M,
           strict ? "strict" : "conditional", (double)c.beta,
           loss == 0 ? "total(g1=0.5,g2=1)" : "CE+L_con(g1=1,g2=0)", c.B);
  run_case(&c);
}
END_TEST

/* Batches larger than the dictionary: the transient view has B > J rows,
 * and a push keeps only the last J rows. */
enum { N_LARGE = 4 };

START_TEST(test_large_batch) {
  gcase c;
  memset(&c, 0, sizeof c);
  c.M = _i % 2 ? 3 : 2;
  c.predominant = c.M - 1;
  c.warmup = 3;
  c.strict = 0;
  c.beta = 0.5f;
  c.g1 = 0.5f;
  c.g2 = 1.0f;
  c.J = _i < 2 ? 10 : 3;
  c.B = _i < 2 ? 12 : 8;
  c.B_fill = c.B;
  c.n_check = 3;
  c.seed = 12000u + (uint64_t)_i;
  snprintf(c.name, sizeof c.name,
           "large#%d M=%d p=%d conditional beta=0.5 J=%d B=%d", _i, c.M,
           c.predominant, c.J, c.B);
  run_case(&c);
}
END_TEST

/* A small batch over a larger dictionary: the forward then computes the
 * scores through the projected queries q Wkᵀ rather than the keys D Wk
 * (lib/fdc.c picks the order with fewer multiply-adds); the grid's
 * shapes take the keys.  (M, p) x slot mode x beta x dictionary state. */
enum { N_QUERY_SIDE = 5 * 2 * 2 * 2 };

START_TEST(test_query_side) {
  int r = _i;
  const int dict = r % 2;
  r /= 2;
  const int bi = r % 2;
  r /= 2;
  const int strict = r % 2;
  r /= 2;
  const int mp = r;
  gcase c;
  named_case(&c, mp, strict, bi ? 1.0f : 0.5f);
  c.g1 = 0.5f;
  c.g2 = 1.0f;
  c.J = 16;
  c.B_fill = 8;
  c.n_fill = dict ? 3 : 1; /* 8 of 16, or full and wrapped to pos 8 */
  c.B = 3;
  c.n_check = 2;
  c.seed = 14000u + (uint64_t)_i;
  snprintf(c.name, sizeof c.name,
           "query-side#%d M=%d p=%d %s beta=%.1f dict=%s J=16 B=3", _i, c.M,
           c.predominant, strict ? "strict" : "conditional", (double)c.beta,
           dict_names[dict ? 2 : 1]);
  run_case(&c);
}
END_TEST

/* Gradient accumulation (doc/DECISIONS.md): K = 2 micro-batches of 5 and
 * 3 rows (5 and 4 over J = 6) per checked step, named p, over an empty,
 * partial, full+wrapped dictionary, and one smaller than the step's rows
 * (J = 6: only micro-batch 1's last 2 rows and micro-batch 2's 4 rows
 * remain).  Each micro-batch's reference is its own loss over the
 * pre-step dictionary; the accumulated gradient is checked against the
 * sum of the two, the push against (D, rows of 1, rows of 2), and the sum
 * is shown to differ from the gradient of the union of the rows (one
 * step over the same rows).  Two checked steps: the second attends over
 * the dictionary the first one's commit left. */
enum { N_ACCUM = 5 * 4 };

START_TEST(test_accumulate) {
  const int dict = _i % 4, mp = _i / 4;
  gcase c;
  named_case(&c, mp, (mp + dict) % 2, 0.5f);
  c.g1 = 0.5f;
  c.g2 = 1.0f;
  c.J = dict < 3 ? 10 : 6;
  c.B_fill = 8;
  c.n_fill = dict < 3 ? dict : 1; /* 8 of 10, full (pos 6); J 6: full */
  c.K = 2;
  c.B = 5;
  c.B2 = dict < 3 ? 3 : 4;
  c.n_check = 2;
  c.seed = 16000u + (uint64_t)_i;
  snprintf(c.name, sizeof c.name,
           "accumulate#%d M=%d p=%d %s beta=0.5 dict=%s J=%d K=2 B=%d+%d", _i,
           c.M, c.predominant, c.strict ? "strict" : "conditional",
           dict < 3 ? dict_names[dict] : "full+wrapped", c.J, c.B, c.B2);
  run_case(&c);
}
END_TEST

/* Gradient accumulation through the warm-up: every step K = 2
 * micro-batches of 5 and 3 rows, warmup_steps = 3.  Each commit makes one
 * EMA update with the accuracy of the union of its 8 rows (not the mean of
 * the two micro-batches' accuracies, nor two updates) and counts one step;
 * p is fixed by the third commit and used from the fourth step on. */
enum { N_ACCUM_WARM = 2 * 2 };

START_TEST(test_accumulate_warmup) {
  gcase c;
  memset(&c, 0, sizeof c);
  c.M = _i / 2 ? 3 : 2;
  c.predominant = -1;
  c.warmup = 3;
  c.strict = _i % 2;
  c.beta = 0.5f;
  c.g1 = 0.5f;
  c.g2 = 1.0f;
  c.J = 10;
  c.K = 2;
  c.B = 5;
  c.B2 = 3;
  c.n_check = 5;
  c.seed = 17000u + (uint64_t)_i;
  snprintf(c.name, sizeof c.name,
           "accumulate-warmup#%d M=%d p=auto(3 steps) %s beta=0.5 K=2 B=5+3",
           _i, c.M, c.strict ? "strict" : "conditional");
  const case_stats cs = run_case(&c);
  ck_assert_msg(cs.ema_distinct > 0,
                "[%s] no warm-up commit where the union's accuracy and the "
                "mean of the micro-batches' accuracies differ: the case "
                "cannot tell them apart",
                c.name);
}
END_TEST

/* A K = 1 step (forward, backward, commit, optimiser step) is
 * deterministic: two models trained alike stay bit-identical (parameters,
 * gradients, dictionary, warm-up and predominant state, optimiser), and a
 * third model replaying the same steps reaches the same state.  From that
 * state, a step of two micro-batches of the SAME rows gives, by the sum
 * definition, twice the K = 1 gradient (a mean would give it once), the
 * same dL/dh in each backward as the K = 1 step, the rows pushed twice,
 * one warm-up step and the same EMA (the union of two copies of the rows
 * has their accuracy).  (The sum against the float64 reference with
 * different micro-batches: test_accumulate.) */
enum { DET_STEPS = 5, DET_B = 6 };

static imml_model *det_model(void) {
  static const int dims[3] = {5, 4, 6};
  imml_config cfg;
  imml_config_init(&cfg);
  cfg.n_modalities = 3;
  cfg.dims = dims;
  cfg.hidden_dim = 6;
  cfg.knowledge_dim = 4;
  cfg.n_classes = 3;
  cfg.max_batch = DET_B;
  cfg.dict_size = 10;
  cfg.gamma1 = 0.5f;
  cfg.tau = 0.5f;
  cfg.warmup_steps = 2;
  cfg.seed = 4242;
  imml_model *m = create_ok(&cfg, NULL);
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
  oc.lr = 1e-2f;
  ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
  return m;
}

/* One training step of K micro-batches, all of b's rows; dh[q] (or NULL)
 * receives micro-batch q's dL/dh. */
static void det_step(imml_model *m, const batch *b, int K, float **dh[]) {
  for (int q = 0; q < K; q++) {
    const imml_status st =
        imml_forward(m, IMML_MODE_TRAIN, b->B, feats(b), b->y, NULL, NULL);
    ck_assert_msg(st == IMML_OK, "forward: %d %s", (int)st,
                  imml_model_errmsg(m));
    backward_only_ok(m, dh ? dh[q] : NULL);
  }
  const imml_status st = imml_commit(m);
  ck_assert_msg(st == IMML_OK, "commit: %d %s", (int)st, imml_model_errmsg(m));
}

START_TEST(test_accumulate_identical) {
  static const int dims[3] = {5, 4, 6};
  drng r = {99};
  batch bt[DET_STEPS];
  for (int s = 0; s < DET_STEPS; s++)
    batch_random(&bt[s], 3, dims, DET_B, 3, &r);
  imml_model *a = det_model(), *a2 = det_model();
  const int J = a->cfg.dict_size, Mk = 3 * a->cfg.knowledge_dim;
  float *olda = xcalloc((size_t)J * Mk, sizeof(float));
  float *nowa = xcalloc((size_t)J * Mk, sizeof(float));
  float *nowd = xcalloc((size_t)J * Mk, sizeof(float));
  for (int s = 0; s < DET_STEPS; s++) {
    const batch *b = &bt[s];
    /* d: the first s steps again, then the step of two copies of b */
    imml_model *d = det_model();
    for (int t = 0; t < s; t++) {
      det_step(d, &bt[t], 1, NULL);
      ck_assert_int_eq(imml_optim_step(d), IMML_OK);
    }
    snap sa, sa2, sd;
    snap_take(a, &sa);
    snap_take(d, &sd);
    snap_check(&sa, &sd, "a model replaying the same steps");
    snap_free(&sd);
    snap_free(&sa);
    const int fill0 = dict_logical(a, Mk, olda), pos0 = a->dict_pos;

    float *dha[3], *dha2[3], *dhd1[3], *dhd2[3];
    dfeat_alloc(dha, b);
    dfeat_alloc(dha2, b);
    dfeat_alloc(dhd1, b);
    dfeat_alloc(dhd2, b);
    float **one_a[1] = {dha}, **one_a2[1] = {dha2}, **two_d[2] = {dhd1, dhd2};
    det_step(a, b, 1, one_a);
    det_step(a2, b, 1, one_a2);
    det_step(d, b, 2, two_d);

    /* K = 1, twice: bit-identical */
    snap_take(a, &sa);
    snap_take(a2, &sa2);
    snap_check(&sa, &sa2, "two models after the same K = 1 step");
    for (int m = 0; m < 3; m++) {
      const size_t n = (size_t)DET_B * (size_t)dims[m] * sizeof(float);
      ck_assert_msg(memcmp(dha[m], dha2[m], n) == 0,
                    "step %d: dL/dh_%d differs between two models", s, m);
      ck_assert_msg(memcmp(dhd1[m], dha[m], n) == 0 &&
                        memcmp(dhd2[m], dha[m], n) == 0,
                    "step %d: dL/dh_%d of a micro-batch differs from the K = "
                    "1 step's on the same rows and state",
                    s, m);
    }

    /* K = 2 of identical micro-batches: twice the gradient */
    snap_take(d, &sd);
    ck_assert_msg(memcmp(sd.params, sa.params, sa.n * sizeof(float)) == 0,
                  "step %d: the commit changed the parameters", s);
    for (int t = 0; t < imml_param_count(a); t++) {
      imml_param_view va, vd;
      ck_assert_int_eq(imml_param_get(a, t, &va), IMML_OK);
      ck_assert_int_eq(imml_param_get(d, t, &vd), IMML_OK);
      double dd = 0.0, rr = 0.0;
      for (int i = 0; i < va.rows * va.cols; i++) {
        const double want = 2.0 * (double)va.grad[i];
        dd += ((double)vd.grad[i] - want) * ((double)vd.grad[i] - want);
        rr += want * want;
      }
      const double e = sqrt(dd) / (sqrt(rr) > 1e-30 ? sqrt(rr) : 1e-30);
      ck_assert_msg(rr > 0.0 ? e < 1e-6 : dd == 0.0,
                    "step %d: gradient of %s after two micro-batches of the "
                    "same rows is not twice the K = 1 gradient (rel %.3e)",
                    s, va.name, e);
    }
    /* the rows pushed twice: D = last J of (D_old, R, R), R = the rows
     * a's step pushed (the last B of a's dictionary) */
    const int filla = dict_logical(a, Mk, nowa);
    const int filld = dict_logical(d, Mk, nowd);
    const int tot = fill0 + 2 * DET_B;
    ck_assert_int_eq(filla, fill0 + DET_B < J ? fill0 + DET_B : J);
    ck_assert_int_eq(filld, tot < J ? tot : J);
    ck_assert_msg(d->dict_pos == (tot < J ? tot : (pos0 + 2 * DET_B) % J),
                  "step %d: dict_pos %d after the commit of two micro-batches "
                  "of %d rows from pos %d (fill %d); two successive pushes "
                  "end at %d",
                  s, d->dict_pos, DET_B, pos0, fill0,
                  tot < J ? tot : (pos0 + 2 * DET_B) % J);
    for (int t = 0; t < filld; t++) {
      const int src = tot - filld + t; /* in (D_old, R, R) */
      const float *want =
          src < fill0
              ? olda + (size_t)src * Mk
              : nowa + (size_t)(filla - DET_B + (src - fill0) % DET_B) * Mk;
      ck_assert_msg(
          memcmp(nowd + (size_t)t * Mk, want, sizeof(float) * (size_t)Mk) == 0,
          "step %d: dictionary row %d is not row %d of (D, R, R)", s, t, src);
    }
    /* one warm-up step per commit, the union's accuracy */
    ck_assert_msg(sd.steps == sa.steps,
                  "step %d: warm-up steps %d after a K = 2 commit, %d after "
                  "K = 1",
                  s, sd.steps, sa.steps);
    for (int m = 0; m < 3; m++)
      ck_assert_msg(fabsf(sd.ema[m] - sa.ema[m]) <= 1e-7f,
                    "step %d: ema[%d] %.9g after a K = 2 commit of two copies, "
                    "%.9g after K = 1",
                    s, m, (double)sd.ema[m], (double)sa.ema[m]);
    ck_assert_msg(sd.p == sa.p && sd.fixed == sa.fixed,
                  "step %d: p %d fixed %d after a K = 2 commit, p %d fixed %d "
                  "after K = 1",
                  s, sd.p, sd.fixed, sa.p, sa.fixed);
    snap_free(&sd);
    snap_free(&sa);
    snap_free(&sa2);

    /* the optimiser step keeps the two K = 1 models identical */
    ck_assert_int_eq(imml_optim_step(a), IMML_OK);
    ck_assert_int_eq(imml_optim_step(a2), IMML_OK);
    snap_take(a, &sa);
    snap_take(a2, &sa2);
    snap_check(&sa, &sa2, "two models after the same optimiser step");
    snap_free(&sa);
    snap_free(&sa2);
    dfeat_free(dha, 3);
    dfeat_free(dha2, 3);
    dfeat_free(dhd1, 3);
    dfeat_free(dhd2, 3);
    imml_model_free(d);
  }
  int p = -1, fixed = 0;
  ck_assert_int_eq(imml_predominant_get(a, &p, &fixed), IMML_OK);
  ck_assert_msg(fixed == 1, "the warm-up did not end within the test");
  ck_assert_int_eq(imml_fdc_dict_fill(a), J);
  free(olda);
  free(nowa);
  free(nowd);
  for (int s = 0; s < DET_STEPS; s++)
    batch_free(&bt[s]);
  imml_model_free(a);
  imml_model_free(a2);
}
END_TEST

static Suite *gradients_suite(void) {
  Suite *s = suite_create("gradients");
  TCase *tc = tcase_create("grid");
  tcase_add_loop_test(tc, test_grid, 0, N_GRID);
  suite_add_tcase(s, tc);
  tc = tcase_create("loss_terms");
  tcase_add_loop_test(tc, test_loss_terms, 0, N_TERMS);
  suite_add_tcase(s, tc);
  tc = tcase_create("warmup");
  tcase_add_loop_test(tc, test_warmup, 0, N_WARM);
  suite_add_tcase(s, tc);
  tc = tcase_create("large_batch");
  tcase_add_loop_test(tc, test_large_batch, 0, N_LARGE);
  suite_add_tcase(s, tc);
  tc = tcase_create("query_side");
  tcase_add_loop_test(tc, test_query_side, 0, N_QUERY_SIDE);
  suite_add_tcase(s, tc);
  tc = tcase_create("accumulate");
  tcase_add_loop_test(tc, test_accumulate, 0, N_ACCUM);
  tcase_add_loop_test(tc, test_accumulate_warmup, 0, N_ACCUM_WARM);
  tcase_add_test(tc, test_accumulate_identical);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) { return imml_run_suite(gradients_suite()); }
