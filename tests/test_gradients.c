/*
 * The correctness test of libimml's numbers: an independent float64
 * implementation of METHOD.md sections 1-5 (written from METHOD.md only,
 * not from lib/), differentiated by central finite differences, against the
 * library's float32 forward (logits, every loss term) and backward (every
 * parameter tensor and every input h_m), and the strata dictionary push.
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
  size_t off[RMAXT];    /* tensor offsets in x (imml_param_info order) */
  size_t hoff[RMAXM];   /* offsets of h_m (B x d_m) in x */
} ref_cfg;

typedef struct ref_out {
  double ce, con, dis, total;
  double logits[RMAXB * RMAXC];
  double z[RMAXM][RMAXB * RMAXK];
  int correct[RMAXM]; /* unimodal argmax hits */
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

static int zero_ft_forward(void *user_data, int training, int batch,
                           int n_modalities, int knowledge_dim,
                           const float *const *slots, int n_classes,
                           float *logits) {
  (void)user_data;
  (void)training;
  (void)n_modalities;
  (void)knowledge_dim;
  (void)slots;
  memset(logits, 0, sizeof(float) * (size_t)batch * (size_t)n_classes);
  return 0;
}

static int zero_ft_backward(void *user_data, int batch, int n_modalities,
                            int knowledge_dim, const float *const *slots,
                            const float *dlogits, int n_classes,
                            float *const *dslots) {
  (void)user_data;
  (void)slots;
  (void)dlogits;
  (void)n_classes;
  for (int m = 0; m < n_modalities; m++)
    memset(dslots[m], 0, sizeof(float) * (size_t)batch * (size_t)knowledge_dim);
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
  float *feat[RMAXM], *dfeat[RMAXM];
  int labels[RMAXB];
  double ema[RMAXM]; /* reference warm-up EMAs */
  int steps;         /* reference warm-up step count */
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
  char err[256] = "";
  imml_status st = imml_model_create_ex(&cfg, c->host_ft ? &ops : NULL, &hs->m,
                                        err, sizeof err);
  ck_assert_msg(st == IMML_OK, "[%s] imml_model_create: %s (%s)", c->name,
                imml_strerror(st), err);

  /* Parameter tensors: names, order and shapes as METHOD.md and imml.h. */
  hs->ntens = imml_param_count(hs->m);
  const int want = 6 * c->M + (c->host_ft ? 2 : 4);
  ck_assert_msg(hs->ntens == want, "[%s] %d tensors, expected %d", c->name,
                hs->ntens, want);
  static const char *const sfx[6] = {"w1", "b1", "w2", "b2", "wc", "bc"};
  size_t off = 0;
  for (int t = 0; t < hs->ntens; t++) {
    imml_param_view v;
    ck_assert_int_eq(imml_param_info(hs->m, t, &v), IMML_OK);
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
  imml_optim_config_init(&oc, IMML_OPT_SGD);
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

/* Reads the model's float32 parameters and the batch into x (double). */
static void fill_x(harness *hs, int B, double *x, ref_cfg *rc) {
  for (int t = 0; t < hs->ntens; t++) {
    imml_param_view v;
    ck_assert_int_eq(imml_param_info(hs->m, t, &v), IMML_OK);
    for (int i = 0; i < v.rows * v.cols; i++)
      x[hs->off[t] + (size_t)i] = (double)v.data[i];
  }
  size_t o = hs->nparam;
  for (int m = 0; m < hs->c.M; m++) {
    rc->hoff[m] = o;
    for (int i = 0; i < B * hs->dims[m]; i++)
      x[o + (size_t)i] = (double)hs->feat[m][i];
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

/* One training step: forward + backward on a random batch of B rows.
 * Always checks the forward values, the dictionary push and the warm-up
 * state; with `full`, also every gradient against finite differences. */
static void run_step(harness *hs, int B, int full, const char *tag) {
  const gcase *c = &hs->c;
  const int M = c->M, k = hs->k, Mk = hs->Mk, J = c->J, C = hs->C;
  size_t nx = hs->nparam;
  for (int m = 0; m < M; m++)
    nx += (size_t)(B * hs->dims[m]);
  double *x = malloc(sizeof(double) * nx);
  double *g = malloc(sizeof(double) * nx);
  double *strata = malloc(sizeof(double) * (size_t)RMAXJ * (size_t)Mk);
  float *old = malloc(sizeof(float) * (size_t)J * (size_t)Mk);
  float *now = malloc(sizeof(float) * (size_t)J * (size_t)Mk);
  float *raw = malloc(sizeof(float) * (size_t)J * (size_t)Mk);
  ref_out *kn = malloc(sizeof *kn), *ro = malloc(sizeof *ro);
  ck_assert(x && g && strata && old && now && raw && kn && ro);

  ref_cfg rc;
  memset(&rc, 0, sizeof rc);
  rc.M = M;
  rc.H = hs->H;
  rc.k = k;
  rc.C = C;
  rc.B = B;
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

  /* Draw the batch (again, while a pre-activation is near the kink). */
  rc.p = -1;
  rc.nstrata = 0;
  rc.strata = NULL;
  for (int tries = 0;; tries++) {
    for (int m = 0; m < M; m++)
      for (int i = 0; i < B * hs->dims[m]; i++)
        hs->feat[m][i] = (float)(2.0 * rng_unif(&hs->rng) - 1.0);
    for (int i = 0; i < B; i++)
      hs->labels[i] = (int)(rng_next(&hs->rng) % (uint64_t)C);
    fill_x(hs, B, x, &rc);
    ref_forward(&rc, x, hs->labels, kn); /* knowledge at the base point */
    if (!full || kn->min_pre >= MIN_PRE)
      break;
    ck_assert_msg(tries < 1000, "[%s] no batch away from the ReLU kink",
                  c->name);
  }

  /* Library state at the start of the step. */
  int p = -1, fixed = 0;
  ck_assert_int_eq(imml_predominant(hs->m, &p, &fixed), IMML_OK);
  const int warm = !fixed;
  const int fill0 = dict_logical(hs->m, Mk, old);
  const int pos0 = hs->m->dict_pos;
  memcpy(raw, hs->m->dict, sizeof(float) * (size_t)J * (size_t)Mk);
  if (c->predominant >= 0 && (!fixed || p != c->predominant))
    record_fail(hs, "%s: imml_predominant p %d fixed %d, config.predominant %d",
                tag, p, fixed, c->predominant);
  if (c->predominant < 0 && warm != (hs->steps < c->warmup))
    record_fail(hs, "%s: warm-up %d after %d completed steps (warmup_steps %d)",
                tag, warm, hs->steps, c->warmup);

  /* The reference of this step. */
  rc.p = warm ? -1 : p;
  if (!warm) {
    if (fill0 == 0) { /* the batch's own detached knowledge */
      rc.nstrata = B;
      for (int i = 0; i < B; i++)
        for (int m = 0; m < M; m++)
          for (int s = 0; s < k; s++)
            strata[(size_t)i * Mk + m * k + s] = kn->z[m][i * k + s];
    } else { /* D as it is at the start of the call */
      rc.nstrata = fill0;
      for (int i = 0; i < fill0 * Mk; i++)
        strata[i] = (double)hs->m->dict[i];
    }
    rc.strata = strata;
  }
  ref_forward(&rc, x, hs->labels, ro);

  /* The library: forward. */
  float lg[RMAXB * RMAXC];
  imml_losses ls;
  ck_assert_int_eq(imml_zero_grad(hs->m), IMML_OK);
  const float *fp[RMAXM];
  for (int m = 0; m < M; m++)
    fp[m] = hs->feat[m];
  imml_status st =
      imml_forward(hs->m, IMML_MODE_TRAIN, B, fp, hs->labels, lg, &ls);
  ck_assert_msg(st == IMML_OK, "[%s] %s: imml_forward: %s", c->name, tag,
                imml_errmsg(hs->m));
  if (hs->m->dict_fill != fill0 || hs->m->dict_pos != pos0 ||
      memcmp(raw, hs->m->dict, sizeof(float) * (size_t)J * (size_t)Mk) != 0)
    record_fail(hs, "%s: a training forward changed the dictionary", tag);

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
    const double lib[5] = {sqrt(nl), ls.ce, ls.con, ls.dis, ls.total};
    const double ref[5] = {sqrt(nr), ro->ce, ro->con, ro->dis, ro->total};
    static const char *const what[5] = {"logits", "ce", "con", "dis", "total"};
    for (int i = 0; i < 5; i++) {
      if (e[i] > hs->worst_fwd)
        hs->worst_fwd = e[i];
      if (!(e[i] < TOL_FWD))
        record_fail(hs, "%s: forward %s rel err %.3e (lib %.9g ref %.9g%s)",
                    tag, what[i], e[i], lib[i], ref[i],
                    i == 0 ? ", norms" : "");
    }
  }

  /* The library: backward. */
  float *dfp[RMAXM];
  for (int m = 0; m < M; m++) {
    for (int i = 0; i < B * hs->dims[m]; i++)
      hs->dfeat[m][i] = NAN;
    dfp[m] = hs->dfeat[m];
  }
  st = imml_backward(hs->m, dfp);
  ck_assert_msg(st == IMML_OK, "[%s] %s: imml_backward: %s", c->name, tag,
                imml_errmsg(hs->m));

  /* Gradients against central differences of the reference. */
  if (full) {
    fd_gradient(&rc, x, nx, hs->labels, g);
    double *lib = malloc(sizeof(double) * nx);
    ck_assert_ptr_nonnull(lib);
    for (int t = 0; t < hs->ntens; t++) {
      imml_param_view v;
      ck_assert_int_eq(imml_param_info(hs->m, t, &v), IMML_OK);
      const size_t n = (size_t)v.rows * (size_t)v.cols;
      for (size_t i = 0; i < n; i++)
        lib[i] = (double)v.grad[i];
      const double e = rel_err_vec(lib, g + hs->off[t], n);
      double ng = 0.0;
      for (size_t i = 0; i < n; i++)
        ng += g[hs->off[t] + i] * g[hs->off[t] + i];
      if (e > hs->worst_grad)
        hs->worst_grad = e;
      if (hs->verbose)
        fprintf(stderr, "#   [%s] %s d%-8s rel %.2e  |g_ref| %.3e\n", c->name,
                tag, v.name, e, sqrt(ng));
      if (!(e < TOL_GRAD))
        record_fail(hs, "%s: gradient of %s rel err %.3e (|g_ref| %.3e)", tag,
                    v.name, e, sqrt(ng));
    }
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
        fprintf(stderr, "#   [%s] %s dh%-7d rel %.2e  |g_ref| %.3e\n", c->name,
                tag, m, e, sqrt(ng));
      if (!(e < TOL_GRAD))
        record_fail(hs, "%s: gradient of input h%d rel err %.3e (|g_ref| %.3e)",
                    tag, m, e, sqrt(ng));
    }
    free(lib);
  }

  /* The push: FIFO ring, D = last J rows of (D_old, batch rows). */
  {
    const int tot = fill0 + B;
    const int fill1 = tot < J ? tot : J;
    const int got = dict_logical(hs->m, Mk, now);
    if (got != fill1) {
      record_fail(hs, "%s: dict_fill %d after the push, expected %d", tag, got,
                  fill1);
    } else {
      const int pos_ok = fill1 < J ? hs->m->dict_pos == fill1
                         : B <= J  ? hs->m->dict_pos == (pos0 + B) % J
                                   : 1;
      if (!pos_ok)
        record_fail(hs,
                    "%s: dict_pos %d after the push (fill %d pos %d + B %d)",
                    tag, hs->m->dict_pos, fill0, pos0, B);
      double dd = 0.0, rr = 0.0;
      int old_ok = 1;
      for (int t = 0; t < fill1; t++) {
        const int src = tot - fill1 + t; /* index in (D_old, batch) */
        const float *row = now + (size_t)t * Mk;
        if (src < fill0) {
          if (memcmp(row, old + (size_t)src * Mk, sizeof(float) * Mk) != 0)
            old_ok = 0;
        } else {
          const int b = src - fill0;
          for (int m = 0; m < M; m++)
            for (int s = 0; s < k; s++) {
              const double r = kn->z[m][b * k + s];
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
            hs, "%s: pushed rows differ from the batch knowledge (rel %.3e)",
            tag, e);
    }
  }

  /* Warm-up bookkeeping (METHOD.md section 5). */
  if (warm) {
    for (int m = 0; m < M; m++)
      hs->ema[m] = 0.9 * hs->ema[m] + 0.1 * ro->correct[m] / (double)B;
    hs->steps++;
    int steps = -1, p1 = -2, fixed1 = -1;
    float ema[RMAXM];
    ck_assert_int_eq(imml_warmup_state(hs->m, &steps, ema), IMML_OK);
    ck_assert_int_eq(imml_predominant(hs->m, &p1, &fixed1), IMML_OK);
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
        if (hs->ema[m] > hs->ema[best] + 1e-9)
          best = m;
      if (!fixed1 || p1 != best)
        record_fail(hs, "%s: after warm-up p %d fixed %d, expected p %d", tag,
                    p1, fixed1, best);
    }
  }

  ck_assert_int_eq(imml_step(hs->m), IMML_OK);
  free(x);
  free(g);
  free(strata);
  free(old);
  free(now);
  free(raw);
  free(kn);
  free(ro);
}

static void run_case(const gcase *c) {
  harness *hs = malloc(sizeof *hs);
  ck_assert_ptr_nonnull(hs);
  harness_setup(hs, c);
  char tag[80];
  for (int s = 0; s < c->n_fill; s++) {
    snprintf(tag, sizeof tag, "fill step %d", s + 1);
    run_step(hs, c->B_fill, 0, tag);
  }
  for (int s = 0; s < c->n_check; s++) {
    int p = -1;
    ck_assert_int_eq(imml_predominant(hs->m, &p, NULL), IMML_OK);
    snprintf(tag, sizeof tag, "step %d (p=%d%s, fill %d pos %d)",
             c->n_fill + s + 1, p, p < 0 ? " warm-up" : "", hs->m->dict_fill,
             hs->m->dict_pos);
    run_step(hs, c->B, 1, tag);
  }
  if (hs->verbose)
    fprintf(stderr, "# [%s] worst: grad %.2e fwd %.2e dict %.2e\n", c->name,
            hs->worst_grad, hs->worst_fwd, hs->worst_dict);
  const int nfail = hs->nfail;
  char first[600];
  snprintf(first, sizeof first, "%s", hs->first);
  harness_free(hs);
  free(hs);
  ck_assert_msg(nfail == 0, "[%s] %d check(s) failed; first: %s", c->name,
                nfail, first);
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
  return s;
}

int main(void) { return imml_run_suite(gradients_suite()); }
