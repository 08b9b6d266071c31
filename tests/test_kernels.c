/*
 * Unit tests of the numerical kernels of lib/kernels.h.
 *
 * Two kinds of checks, following METHOD.md ("What a correct implementation
 * shows"):
 *
 *  - every forward value (and every backward formula) against an independent
 *    float64 re-computation written below with plain loops, by norm-wise
 *    relative error ||y - y_ref|| / max(||y_ref||, 1e-12) < REF_TOL;
 *  - every backward kernel against central finite differences taken through
 *    the float32 forward kernel, same error measure, below FD_TOL.
 *
 * Shapes include a batch of one and non-square matrices (1x1, 1x7, 7x1,
 * 5x3, 13x29, ...) plus a few shapes drawn from a fixed-seed generator.
 * Inputs read through a leading dimension larger than the width carry NaN in
 * their padding (a kernel that reads it produces NaN and fails); outputs
 * carry a sentinel in their padding that must survive.
 *
 * Set IMML_TEST_VERBOSE=1 to print every measured error on stderr.
 */
#include "check_main.h"
#include "kernels.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* float32 kernels against float64 loops: the kernels sum in float32 (BLAS)
 * or double, over at most a few dozen terms of magnitude <= 1 (or a
 * log-sum-exp of a few hundred), so the norm-wise error is a few float32
 * ulps, ~1e-7..1e-6.  1e-5 leaves a margin of 10x and still catches any
 * wrong term, index or stride (errors of order 1e-2..1). */
#define REF_TOL 1e-5

/* Central differences through the float32 forward.  The error of
 * (f(x+h) - f(x-h)) / 2h is truncation, ~h^2 |f'''| / 6, plus rounding,
 * ~eps32 |f| / h with eps32 = 6e-8.  Piecewise-linear kernels (linear,
 * ReLU with |x| > 0.05 > h) have no truncation error, so they use
 * h = H_LIN = 1e-2, giving a rounding error ~1e-5 relative.  Smooth kernels
 * (softmax, l2 normalization, cross-entropy, SupCon) on inputs in [-1, 1]
 * use h = H_SMOOTH = 1e-3: truncation ~1e-7, rounding ~6e-8 * O(1) / 2e-3
 * ~ 3e-5 absolute per component against gradient components of 1e-3..1e-1,
 * i.e. 1e-4..1e-3 norm-wise.  The worst error these tests measure
 * (IMML_TEST_VERBOSE=1) is 1e-3, for SupCon with all labels equal, where the
 * gradient softmax - 1/B is itself small; linear and ReLU stay below 5e-5,
 * the other smooth kernels below 5e-4.  FD_TOL = 1e-2 is 10x above that,
 * while a wrong gradient (a missing term, a sign, a factor 2 or 1/B, a
 * transposed index) gives errors of order 0.1..1. */
#define FD_TOL 1e-2
#define H_LIN 1e-2
#define H_SMOOTH 1e-3

/* Sentinel stored in the padding of output matrices. */
#define OUT_PAD (-1234.5f)

/* ------------------------------------------------------------------------ */
/* Fixed-seed generator (splitmix64) and allocation.                         */

typedef struct {
  uint64_t s;
} prng;

static uint64_t prng_next(prng *g) {
  uint64_t z = (g->s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static double prng_u01(prng *g) {
  return (double)(prng_next(g) >> 11) * 0x1.0p-53;
}

static float prng_uniform(prng *g, double lo, double hi) {
  return (float)(lo + (hi - lo) * prng_u01(g));
}

static int prng_int(prng *g, int n) {
  return (int)(prng_next(g) % (uint64_t)n);
}

static void *xmalloc(size_t bytes) {
  void *p = malloc(bytes ? bytes : 1);
  ck_assert_ptr_nonnull(p);
  return p;
}

static float *falloc(size_t n) { return xmalloc(n * sizeof(float)); }
static double *dalloc(size_t n) { return xmalloc(n * sizeof(double)); }
static int *ialloc(size_t n) { return xmalloc(n * sizeof(int)); }

/* x (rows, cols) with row stride ld: values uniform in [lo, hi), padding
 * columns cols..ld-1 set to pad. */
static void fill_mat(prng *g, float *x, int rows, int cols, int ld, double lo,
                     double hi, float pad) {
  for (int i = 0; i < rows; i++) {
    for (int j = 0; j < cols; j++)
      x[(size_t)i * ld + j] = prng_uniform(g, lo, hi);
    for (int j = cols; j < ld; j++)
      x[(size_t)i * ld + j] = pad;
  }
}

static void fill(prng *g, float *x, size_t n, double lo, double hi) {
  for (size_t i = 0; i < n; i++)
    x[i] = prng_uniform(g, lo, hi);
}

/* Values with gap <= |x| < mag, random sign. */
static void fill_away(prng *g, float *x, size_t n, double gap, double mag) {
  for (size_t i = 0; i < n; i++) {
    const float v = prng_uniform(g, gap, mag);
    x[i] = (prng_next(g) & 1) ? v : -v;
  }
}

static void set_all(float *x, size_t n, float v) {
  for (size_t i = 0; i < n; i++)
    x[i] = v;
}

/* ------------------------------------------------------------------------ */
/* Error measures and reporting.                                             */

/* ||y - ref|| / max(||ref||, 1e-12); y has row stride ldy, ref is
 * contiguous (rows, cols). */
static double rel_err_mat(int rows, int cols, const float *y, int ldy,
                          const double *ref) {
  double num = 0.0, den = 0.0;
  for (int i = 0; i < rows; i++)
    for (int j = 0; j < cols; j++) {
      const double r = ref[(size_t)i * cols + j];
      const double d = (double)y[(size_t)i * ldy + j] - r;
      num += d * d;
      den += r * r;
    }
  return sqrt(num) / fmax(sqrt(den), 1e-12);
}

static double rel_err_vec(int n, const float *y, const double *ref) {
  return rel_err_mat(1, n, y, n, ref);
}

static double rel_err_scalar(double y, double ref) {
  return fabs(y - ref) / fmax(fabs(ref), 1e-12);
}

static void check_err(double err, double tol, const char *fmt, ...) {
  char what[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  if (getenv("IMML_TEST_VERBOSE"))
    fprintf(stderr, "%-60s err %.3g\n", what, err);
  ck_assert_msg(err < tol, "%s: relative error %.6g, tolerance %g", what, err,
                tol);
}

/* 1 if columns cols..ld-1 of every row still hold OUT_PAD. */
static int pad_intact(int rows, int cols, int ld, const float *y) {
  for (int i = 0; i < rows; i++)
    for (int j = cols; j < ld; j++)
      if (y[(size_t)i * ld + j] != OUT_PAD)
        return 0;
  return 1;
}

/* sum_ij r_ij y_ij in double, r contiguous (rows, cols), y row stride ldy. */
static double project(int rows, int cols, const float *r, const float *y,
                      int ldy) {
  double s = 0.0;
  for (int i = 0; i < rows; i++)
    for (int j = 0; j < cols; j++)
      s += (double)r[(size_t)i * cols + j] * y[(size_t)i * ldy + j];
  return s;
}

/* Central differences of f with respect to the (rows, cols) block of x
 * (row stride ld), into g (contiguous).  The actual step is the difference
 * of the rounded float32 arguments. */
typedef double (*loss_fn)(void *ctx);

static void fd_grad(loss_fn f, void *ctx, float *x, int rows, int cols, int ld,
                    double h, double *g) {
  for (int i = 0; i < rows; i++)
    for (int j = 0; j < cols; j++) {
      float *p = x + (size_t)i * ld + j;
      const float x0 = *p;
      const float xp = (float)(x0 + h), xm = (float)(x0 - h);
      *p = xp;
      const double fp = f(ctx);
      *p = xm;
      const double fm = f(ctx);
      *p = x0;
      g[(size_t)i * cols + j] = (fp - fm) / ((double)xp - (double)xm);
    }
}

/* ------------------------------------------------------------------------ */
/* Shapes.                                                                   */

#define N_RANDOM_SHAPES 3

static const int SHAPES2[][2] = {{1, 1}, {1, 7}, {7, 1},   {5, 3},
                                 {3, 5}, {2, 2}, {13, 29}, {29, 13}};
#define N_SHAPES2 ((int)(sizeof SHAPES2 / sizeof SHAPES2[0]))

static void shape2(int idx, int *rows, int *cols) {
  if (idx < N_SHAPES2) {
    *rows = SHAPES2[idx][0];
    *cols = SHAPES2[idx][1];
  } else {
    prng g = {0xC0FFEEull + (uint64_t)idx};
    *rows = 1 + prng_int(&g, 20);
    *cols = 1 + prng_int(&g, 24);
  }
}

/* (m, n, kk) for k_gemm; (batch, n_in, n_out) for the linear layer. */
static const int SHAPES3[][3] = {{1, 1, 1},    {1, 7, 3},   {7, 1, 5},
                                 {5, 3, 4},    {3, 5, 1},   {2, 2, 2},
                                 {13, 29, 17}, {29, 13, 2}, {4, 6, 29}};
#define N_SHAPES3 ((int)(sizeof SHAPES3 / sizeof SHAPES3[0]))

static void shape3(int idx, int *a, int *b, int *c) {
  if (idx < N_SHAPES3) {
    *a = SHAPES3[idx][0];
    *b = SHAPES3[idx][1];
    *c = SHAPES3[idx][2];
  } else {
    prng g = {0xBADC0DEull + (uint64_t)idx};
    *a = 1 + prng_int(&g, 20);
    *b = 1 + prng_int(&g, 20);
    *c = 1 + prng_int(&g, 20);
  }
}

static const int SUPCON_B[] = {1, 2, 3, 5, 8, 13};
#define N_SUPCON_B ((int)(sizeof SUPCON_B / sizeof SUPCON_B[0]))

static int supcon_batch(int idx) {
  if (idx < N_SUPCON_B)
    return SUPCON_B[idx];
  prng g = {0xFEEDull + (uint64_t)idx};
  return 2 + prng_int(&g, 23);
}

static const int VEC_N[] = {1, 2, 7, 8, 9, 15, 64, 377};
#define N_VEC_N ((int)(sizeof VEC_N / sizeof VEC_N[0]))

static int vec_len(int idx) {
  if (idx < N_VEC_N)
    return VEC_N[idx];
  prng g = {0xABCDull + (uint64_t)idx};
  return 1 + prng_int(&g, 500);
}

/* ------------------------------------------------------------------------ */
/* Float64 references.                                                       */

static void ref_softmax(int cols, const double *x, double *y) {
  double m = x[0];
  for (int j = 1; j < cols; j++)
    m = fmax(m, x[j]);
  double s = 0.0;
  for (int j = 0; j < cols; j++)
    s += exp(x[j] - m);
  for (int j = 0; j < cols; j++)
    y[j] = exp(x[j] - m) / s;
}

static void ref_log_softmax(int cols, const double *x, double *y) {
  double m = x[0];
  for (int j = 1; j < cols; j++)
    m = fmax(m, x[j]);
  double s = 0.0;
  for (int j = 0; j < cols; j++)
    s += exp(x[j] - m);
  const double lse = m + log(s);
  for (int j = 0; j < cols; j++)
    y[j] = x[j] - lse;
}

/* Row i of a float matrix (row stride ld) into double. */
static void row_to_double(int cols, const float *x, double *out) {
  for (int j = 0; j < cols; j++)
    out[j] = x[j];
}

static int ref_argmax(int n, const float *x) {
  int best = 0;
  for (int j = 0; j < n; j++)
    if (x[j] > x[best])
      best = j;
  return best;
}

/* ======================================================================== */
/* k_gemm                                                                    */

START_TEST(test_gemm_ref) {
  int m, n, kk;
  shape3(_i, &m, &n, &kk);
  prng g = {100 + (uint64_t)_i};
  static const float alphas[] = {1.0f, -0.75f};
  static const float betas[] = {0.0f, 1.0f, 0.5f};
  for (int ta = 0; ta < 2; ta++)
    for (int tb = 0; tb < 2; tb++)
      for (int pad = 0; pad <= 3; pad += 3)
        for (int ai = 0; ai < 2; ai++)
          for (int bi = 0; bi < 3; bi++) {
            const float alpha = alphas[ai], beta = betas[bi];
            /* op(A) is m x kk: stored (m, kk) or, transposed, (kk, m). */
            const int ar = ta ? kk : m, ac = ta ? m : kk, lda = ac + pad;
            const int br = tb ? n : kk, bc = tb ? kk : n, ldb = bc + pad;
            const int ldc = n + pad;
            float *a = falloc((size_t)ar * lda);
            float *b = falloc((size_t)br * ldb);
            float *c = falloc((size_t)m * ldc);
            double *ref = dalloc((size_t)m * n);
            fill_mat(&g, a, ar, ac, lda, -1, 1, NAN);
            fill_mat(&g, b, br, bc, ldb, -1, 1, NAN);
            /* beta = 0: C is write-only (BLAS), so NaN there must vanish. */
            fill_mat(&g, c, m, n, ldc, -1, 1, OUT_PAD);
            if (beta == 0.0f)
              for (int i = 0; i < m; i++)
                set_all(c + (size_t)i * ldc, (size_t)n, NAN);
            for (int i = 0; i < m; i++)
              for (int j = 0; j < n; j++) {
                double s = 0.0;
                for (int p = 0; p < kk; p++) {
                  const double av =
                      ta ? a[(size_t)p * lda + i] : a[(size_t)i * lda + p];
                  const double bv =
                      tb ? b[(size_t)j * ldb + p] : b[(size_t)p * ldb + j];
                  s += av * bv;
                }
                ref[(size_t)i * n + j] =
                    alpha * s + (beta == 0.0f
                                     ? 0.0
                                     : beta * (double)c[(size_t)i * ldc + j]);
              }
            k_gemm(NULL, ta, tb, m, n, kk, alpha, a, lda, b, ldb, beta, c, ldc);
            check_err(rel_err_mat(m, n, c, ldc, ref), REF_TOL,
                      "gemm m=%d n=%d k=%d ta=%d tb=%d pad=%d alpha=%g "
                      "beta=%g",
                      m, n, kk, ta, tb, pad, alpha, beta);
            ck_assert_msg(pad_intact(m, n, ldc, c),
                          "gemm wrote into the padding of C (ldc=%d > n=%d)",
                          ldc, n);
            free(a);
            free(b);
            free(c);
            free(ref);
          }
}
END_TEST

/* kk = 0: the product is an empty sum, C = beta C (0 for beta = 0, even over
 * NaN); m = 0 or n = 0: nothing is touched. */
START_TEST(test_gemm_empty) {
  int m, n;
  shape2(_i, &m, &n);
  prng g = {200 + (uint64_t)_i};
  static const float betas[] = {0.0f, 1.0f, 0.5f, -2.0f};
  float dummy[4] = {NAN, NAN, NAN, NAN};
  const int ldc = n + 2;
  float *c = falloc((size_t)m * ldc);
  float *c0 = falloc((size_t)m * ldc);
  double *ref = dalloc((size_t)m * n);
  for (int bi = 0; bi < 4; bi++)
    for (int ta = 0; ta < 2; ta++)
      for (int tb = 0; tb < 2; tb++) {
        const float beta = betas[bi];
        fill_mat(&g, c, m, n, ldc, -1, 1, OUT_PAD);
        if (beta == 0.0f)
          for (int i = 0; i < m; i++)
            set_all(c + (size_t)i * ldc, (size_t)n, NAN);
        for (int i = 0; i < m; i++)
          for (int j = 0; j < n; j++)
            ref[(size_t)i * n + j] =
                beta == 0.0f ? 0.0 : beta * (double)c[(size_t)i * ldc + j];
        k_gemm(NULL, ta, tb, m, n, 0, 0.5f, dummy, 1, dummy, 1, beta, c, ldc);
        ck_assert_msg(pad_intact(m, n, ldc, c), "gemm kk=0 wrote padding");
        if (beta == 0.0f) {
          for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
              ck_assert_msg(c[(size_t)i * ldc + j] == 0.0f,
                            "gemm kk=0 beta=0: C[%d,%d] = %g, expected 0", i, j,
                            (double)c[(size_t)i * ldc + j]);
        } else {
          check_err(rel_err_mat(m, n, c, ldc, ref), REF_TOL,
                    "gemm kk=0 m=%d n=%d beta=%g", m, n, beta);
        }
      }
  /* m = 0 and n = 0 leave C alone. */
  fill_mat(&g, c, m, n, ldc, -1, 1, OUT_PAD);
  memcpy(c0, c, (size_t)m * ldc * sizeof *c);
  k_gemm(NULL, 0, 0, 0, n, 3, 1.0f, dummy, 3, dummy, n, 0.0f, c, ldc);
  k_gemm(NULL, 0, 0, m, 0, 3, 1.0f, dummy, 3, dummy, 1, 0.0f, c, ldc);
  ck_assert_msg(memcmp(c, c0, (size_t)m * ldc * sizeof *c) == 0,
                "gemm with m=0 or n=0 modified C");
  free(c);
  free(c0);
  free(ref);
}
END_TEST

/* ======================================================================== */
/* k_linear_forward / k_linear_backward                                      */

START_TEST(test_linear_forward_ref) {
  int bsz, nin, nout;
  shape3(_i, &bsz, &nin, &nout);
  prng g = {300 + (uint64_t)_i};
  for (int bias = 0; bias < 2; bias++)
    for (int pad = 0; pad <= 2; pad += 2) {
      const int ldx = nin + pad;
      float *x = falloc((size_t)bsz * ldx);
      float *w = falloc((size_t)nin * nout);
      float *b = falloc((size_t)nout);
      float *y = falloc((size_t)bsz * nout);
      double *ref = dalloc((size_t)bsz * nout);
      fill_mat(&g, x, bsz, nin, ldx, -1, 1, NAN);
      fill(&g, w, (size_t)nin * nout, -1, 1);
      fill(&g, b, (size_t)nout, -1, 1);
      set_all(y, (size_t)bsz * nout, NAN); /* y is write-only */
      for (int i = 0; i < bsz; i++)
        for (int o = 0; o < nout; o++) {
          double s = bias ? (double)b[o] : 0.0;
          for (int p = 0; p < nin; p++)
            s += (double)x[(size_t)i * ldx + p] * w[(size_t)p * nout + o];
          ref[(size_t)i * nout + o] = s;
        }
      k_linear_forward(NULL, bsz, nin, nout, x, ldx, w, bias ? b : NULL, y);
      check_err(rel_err_mat(bsz, nout, y, nout, ref), REF_TOL,
                "linear_forward B=%d in=%d out=%d bias=%d ldx=%d", bsz, nin,
                nout, bias, ldx);
      free(x);
      free(w);
      free(b);
      free(y);
      free(ref);
    }
}
END_TEST

/* Analytic backward against float64, with known values pre-filled in dW, db
 * (accumulated) and dx (scaled by dx_beta); every subset of the outputs. */
START_TEST(test_linear_backward_ref) {
  int bsz, nin, nout;
  shape3(_i, &bsz, &nin, &nout);
  prng g = {400 + (uint64_t)_i};
  for (int mask = 0; mask < 8; mask++)
    for (int beta_i = 0; beta_i < 2; beta_i++)
      for (int pad = 0; pad <= 3; pad += 3) {
        const float dx_beta = (float)beta_i;
        const int ldx = nin + 1, lddx = nin + pad;
        const int want_dw = mask & 1, want_db = mask & 2, want_dx = mask & 4;
        float *x = falloc((size_t)bsz * ldx);
        float *w = falloc((size_t)nin * nout);
        float *dy = falloc((size_t)bsz * nout);
        float *dw = falloc((size_t)nin * nout);
        float *db = falloc((size_t)nout);
        float *dx = falloc((size_t)bsz * lddx);
        double *dw_ref = dalloc((size_t)nin * nout);
        double *db_ref = dalloc((size_t)nout);
        double *dx_ref = dalloc((size_t)bsz * nin);
        fill_mat(&g, x, bsz, nin, ldx, -1, 1, NAN);
        fill(&g, w, (size_t)nin * nout, -1, 1);
        fill(&g, dy, (size_t)bsz * nout, -1, 1);
        fill(&g, dw, (size_t)nin * nout, -2, 2);
        fill(&g, db, (size_t)nout, -2, 2);
        fill_mat(&g, dx, bsz, nin, lddx, -2, 2, OUT_PAD);
        if (dx_beta == 0.0f)
          for (int i = 0; i < bsz; i++)
            set_all(dx + (size_t)i * lddx, (size_t)nin, NAN);
        for (int p = 0; p < nin; p++)
          for (int o = 0; o < nout; o++) {
            double s = dw[(size_t)p * nout + o];
            for (int i = 0; i < bsz; i++)
              s += (double)x[(size_t)i * ldx + p] * dy[(size_t)i * nout + o];
            dw_ref[(size_t)p * nout + o] = s;
          }
        for (int o = 0; o < nout; o++) {
          double s = db[o];
          for (int i = 0; i < bsz; i++)
            s += dy[(size_t)i * nout + o];
          db_ref[o] = s;
        }
        for (int i = 0; i < bsz; i++)
          for (int p = 0; p < nin; p++) {
            double s = dx_beta == 0.0f
                           ? 0.0
                           : dx_beta * (double)dx[(size_t)i * lddx + p];
            for (int o = 0; o < nout; o++)
              s += (double)dy[(size_t)i * nout + o] * w[(size_t)p * nout + o];
            dx_ref[(size_t)i * nin + p] = s;
          }
        k_linear_backward(NULL, bsz, nin, nout, x, ldx, w, dy,
                          want_dw ? dw : NULL, want_db ? db : NULL,
                          want_dx ? dx : NULL, lddx, dx_beta);
        if (want_dw)
          check_err(rel_err_mat(nin, nout, dw, nout, dw_ref), REF_TOL,
                    "linear_backward dW B=%d in=%d out=%d mask=%d", bsz, nin,
                    nout, mask);
        if (want_db)
          check_err(rel_err_vec(nout, db, db_ref), REF_TOL,
                    "linear_backward db B=%d in=%d out=%d mask=%d", bsz, nin,
                    nout, mask);
        if (want_dx) {
          check_err(rel_err_mat(bsz, nin, dx, lddx, dx_ref), REF_TOL,
                    "linear_backward dx B=%d in=%d out=%d beta=%g lddx=%d", bsz,
                    nin, nout, dx_beta, lddx);
          ck_assert_msg(pad_intact(bsz, nin, lddx, dx),
                        "linear_backward wrote into the padding of dx");
        }
        free(x);
        free(w);
        free(dy);
        free(dw);
        free(db);
        free(dx);
        free(dw_ref);
        free(db_ref);
        free(dx_ref);
      }
}
END_TEST

struct linear_ctx {
  int bsz, nin, nout, ldx;
  float *x, *w, *b, *y;
  const float *r;
};

static double linear_loss(void *p) {
  struct linear_ctx *c = p;
  k_linear_forward(NULL, c->bsz, c->nin, c->nout, c->x, c->ldx, c->w, c->b,
                   c->y);
  return project(c->bsz, c->nout, c->r, c->y, c->nout);
}

/* Backward against finite differences of L = sum(r ⊙ (x W + b)); then the
 * accumulation: a second call into pre-filled buffers adds the same amount. */
START_TEST(test_linear_backward_fd) {
  int bsz, nin, nout;
  shape3(_i, &bsz, &nin, &nout);
  prng g = {500 + (uint64_t)_i};
  const int ldx = nin + 2;
  const size_t nx = (size_t)bsz * nin, nw = (size_t)nin * nout;
  float *x = falloc((size_t)bsz * ldx), *w = falloc(nw);
  float *b = falloc((size_t)nout), *y = falloc((size_t)bsz * nout);
  float *r = falloc((size_t)bsz * nout);
  float *dw = falloc(nw), *db = falloc((size_t)nout), *dx = falloc(nx);
  double *gw = dalloc(nw), *gb = dalloc((size_t)nout), *gx = dalloc(nx);
  fill_mat(&g, x, bsz, nin, ldx, -1, 1, NAN);
  fill(&g, w, nw, -1, 1);
  fill(&g, b, (size_t)nout, -1, 1);
  fill(&g, r, (size_t)bsz * nout, -1, 1);
  struct linear_ctx ctx = {bsz, nin, nout, ldx, x, w, b, y, r};
  fd_grad(linear_loss, &ctx, x, bsz, nin, ldx, H_LIN, gx);
  fd_grad(linear_loss, &ctx, w, nin, nout, nout, H_LIN, gw);
  fd_grad(linear_loss, &ctx, b, 1, nout, nout, H_LIN, gb);
  set_all(dw, nw, 0.0f);
  set_all(db, (size_t)nout, 0.0f);
  set_all(dx, nx, NAN);
  k_linear_backward(NULL, bsz, nin, nout, x, ldx, w, r, dw, db, dx, nin, 0.0f);
  check_err(rel_err_vec((int)nw, dw, gw), FD_TOL,
            "linear FD dW B=%d in=%d out=%d", bsz, nin, nout);
  check_err(rel_err_vec(nout, db, gb), FD_TOL, "linear FD db B=%d in=%d out=%d",
            bsz, nin, nout);
  check_err(rel_err_vec((int)nx, dx, gx), FD_TOL,
            "linear FD dx B=%d in=%d out=%d", bsz, nin, nout);

  /* Accumulation: pre-filled dW, db receive + x^T r, sum r; dx with
   * dx_beta = 1 receives + r W^T.  Expected: pre-fill + FD gradient. */
  double *ew = dalloc(nw), *eb = dalloc((size_t)nout), *ex = dalloc(nx);
  for (size_t k = 0; k < nw; k++) {
    dw[k] = prng_uniform(&g, 3, 5);
    ew[k] = dw[k] + gw[k];
  }
  for (int k = 0; k < nout; k++) {
    db[k] = prng_uniform(&g, 3, 5);
    eb[k] = db[k] + gb[k];
  }
  for (size_t k = 0; k < nx; k++) {
    dx[k] = prng_uniform(&g, 3, 5);
    ex[k] = dx[k] + gx[k];
  }
  k_linear_backward(NULL, bsz, nin, nout, x, ldx, w, r, dw, db, dx, nin, 1.0f);
  check_err(rel_err_vec((int)nw, dw, ew), FD_TOL,
            "linear accumulate dW B=%d in=%d out=%d", bsz, nin, nout);
  check_err(rel_err_vec(nout, db, eb), FD_TOL,
            "linear accumulate db B=%d in=%d out=%d", bsz, nin, nout);
  check_err(rel_err_vec((int)nx, dx, ex), FD_TOL,
            "linear accumulate dx (beta 1) B=%d in=%d out=%d", bsz, nin, nout);
  free(x);
  free(w);
  free(b);
  free(y);
  free(r);
  free(dw);
  free(db);
  free(dx);
  free(gw);
  free(gb);
  free(gx);
  free(ew);
  free(eb);
  free(ex);
}
END_TEST

/* ======================================================================== */
/* k_relu_forward / k_relu_backward                                          */

START_TEST(test_relu_ref) {
  const int n = vec_len(_i);
  prng g = {600 + (uint64_t)_i};
  float *x = falloc((size_t)n), *y = falloc((size_t)n);
  float *dy = falloc((size_t)n), *dx = falloc((size_t)n);
  double *ref = dalloc((size_t)n);
  fill(&g, x, (size_t)n, -1, 1);
  fill(&g, dy, (size_t)n, -1, 1);
  /* Exact zeros (relu'(0) = 0) and a negative zero. */
  for (int k = 0; k < n; k += 5)
    x[k] = (k / 5) % 2 ? -0.0f : 0.0f;
  for (int k = 0; k < n; k++)
    ref[k] = x[k] > 0.0f ? (double)x[k] : 0.0;
  set_all(y, (size_t)n, NAN);
  k_relu_forward((size_t)n, x, y);
  check_err(rel_err_vec(n, y, ref), REF_TOL, "relu_forward n=%d", n);
  for (int k = 0; k < n; k++)
    ck_assert_msg(y[k] == (float)ref[k], "relu_forward(%g) = %g", (double)x[k],
                  (double)y[k]);
  /* In place. */
  float *yy = falloc((size_t)n);
  memcpy(yy, x, (size_t)n * sizeof *x);
  k_relu_forward((size_t)n, yy, yy);
  check_err(rel_err_vec(n, yy, ref), REF_TOL, "relu_forward in place n=%d", n);

  /* Backward: mask from the pre-activation x > 0, not from the output. */
  for (int k = 0; k < n; k++)
    ref[k] = x[k] > 0.0f ? (double)dy[k] : 0.0;
  set_all(dx, (size_t)n, NAN); /* overwritten, not accumulated */
  k_relu_backward((size_t)n, y, dy, dx);
  check_err(rel_err_vec(n, dx, ref), REF_TOL, "relu_backward n=%d", n);
  for (int k = 0; k < n; k++)
    ck_assert_msg(dx[k] == (float)ref[k], "relu_backward at x=%g: %g vs %g",
                  (double)x[k], (double)dx[k], ref[k]);
  /* In place (dx == dy). */
  memcpy(dx, dy, (size_t)n * sizeof *dy);
  k_relu_backward((size_t)n, y, dx, dx);
  check_err(rel_err_vec(n, dx, ref), REF_TOL, "relu_backward in place n=%d", n);
  free(x);
  free(y);
  free(yy);
  free(dy);
  free(dx);
  free(ref);
}
END_TEST

struct relu_ctx {
  int n;
  float *x, *y;
  const float *r;
};

static double relu_loss(void *p) {
  struct relu_ctx *c = p;
  k_relu_forward((size_t)c->n, c->x, c->y);
  return project(1, c->n, c->r, c->y, c->n);
}

START_TEST(test_relu_fd) {
  const int n = vec_len(_i);
  prng g = {700 + (uint64_t)_i};
  float *x = falloc((size_t)n), *y = falloc((size_t)n);
  float *r = falloc((size_t)n), *dx = falloc((size_t)n);
  double *gx = dalloc((size_t)n);
  /* |x| >= 0.05 > h: the central difference never straddles the kink. */
  fill_away(&g, x, (size_t)n, 0.05, 1.0);
  fill(&g, r, (size_t)n, -1, 1);
  if (n > 1) { /* make sure both branches occur */
    x[0] = 0.5f;
    x[1] = -0.5f;
  }
  struct relu_ctx ctx = {n, x, y, r};
  fd_grad(relu_loss, &ctx, x, 1, n, n, H_LIN, gx);
  k_relu_forward((size_t)n, x, y);
  k_relu_backward((size_t)n, y, r, dx);
  check_err(rel_err_vec(n, dx, gx), FD_TOL, "relu FD n=%d", n);
  free(x);
  free(y);
  free(r);
  free(dx);
  free(gx);
}
END_TEST

/* ======================================================================== */
/* k_softmax_rows / log-softmax (k_xent_forward) / k_softmax_backward_rows   */

/* Inputs: moderate range, large range (max subtraction must prevent
 * overflow), and a constant row. */
static void fill_logits(prng *g, int variant, float *x, int rows, int cols,
                        int ld) {
  const double mag = variant == 0 ? 3.0 : 300.0;
  fill_mat(g, x, rows, cols, ld, -mag, mag, NAN);
  if (variant == 1 && rows > 1)
    for (int j = 0; j < cols; j++)
      x[(size_t)(rows - 1) * ld + j] = 88.5f;
}

/* The row-wise log-softmax the library computes inside k_xent_forward
 * (its log-sum-exp, max subtracted), read one element at a time:
 * y[i][j] = -(cross-entropy of row i alone with label j).  The library
 * has no log-softmax kernel of its own; this checks the one it uses. */
static void log_softmax_by_xent(int rows, int cols, const float *x, int ldx,
                                float *y, int ldy) {
  for (int i = 0; i < rows; i++)
    for (int j = 0; j < cols; j++) {
      const int label = j;
      y[(size_t)i * ldy + j] =
          (float)-k_xent_forward(1, cols, x + (size_t)i * ldx, &label, NULL);
    }
}

static void check_softmax_like(int idx, int log_variant) {
  int rows, cols;
  shape2(idx, &rows, &cols);
  prng g = {800 + (uint64_t)idx + 17u * (uint64_t)log_variant};
  for (int variant = 0; variant < 2; variant++)
    for (int pad = 0; pad <= 2; pad += 2) {
      const int ldx = cols + pad + 1, ldy = cols + pad;
      float *x = falloc((size_t)rows * ldx), *y = falloc((size_t)rows * ldy);
      double *ref = dalloc((size_t)rows * cols), *xd = dalloc((size_t)cols);
      fill_logits(&g, variant, x, rows, cols, ldx);
      fill_mat(&g, y, rows, cols, ldy, 0, 0, OUT_PAD);
      for (int i = 0; i < rows; i++)
        set_all(y + (size_t)i * ldy, (size_t)cols, NAN);
      for (int i = 0; i < rows; i++) {
        row_to_double(cols, x + (size_t)i * ldx, xd);
        if (log_variant)
          ref_log_softmax(cols, xd, ref + (size_t)i * cols);
        else
          ref_softmax(cols, xd, ref + (size_t)i * cols);
      }
      if (log_variant)
        log_softmax_by_xent(rows, cols, x, ldx, y, ldy);
      else
        k_softmax_rows(rows, cols, x, ldx, y, ldy);
      check_err(rel_err_mat(rows, cols, y, ldy, ref), REF_TOL,
                "%s %dx%d range=%s ldx=%d ldy=%d",
                log_variant ? "log_softmax" : "softmax", rows, cols,
                variant ? "300" : "3", ldx, ldy);
      /* Row-wise too, so that one bad row cannot hide behind large ones. */
      for (int i = 0; i < rows; i++)
        check_err(rel_err_mat(1, cols, y + (size_t)i * ldy, ldy,
                              ref + (size_t)i * cols),
                  REF_TOL, "%s %dx%d row %d",
                  log_variant ? "log_softmax" : "softmax", rows, cols, i);
      ck_assert_msg(pad_intact(rows, cols, ldy, y),
                    "softmax wrote into the padding of y");
      free(x);
      free(y);
      free(ref);
      free(xd);
    }
}

START_TEST(test_softmax_ref) { check_softmax_like(_i, 0); }
END_TEST

START_TEST(test_log_softmax_ref) { check_softmax_like(_i, 1); }
END_TEST

START_TEST(test_softmax_backward_ref) {
  int rows, cols;
  shape2(_i, &rows, &cols);
  prng g = {900 + (uint64_t)_i};
  for (int pad = 0; pad <= 3; pad += 3) {
    const int lda = cols + pad, ldda = cols + 1 + pad, lddx = cols + 2 * pad;
    float *a = falloc((size_t)rows * lda), *da = falloc((size_t)rows * ldda);
    float *dx = falloc((size_t)rows * lddx);
    double *ref = dalloc((size_t)rows * cols), *xd = dalloc((size_t)cols);
    double *ad = dalloc((size_t)cols);
    /* a: genuine softmax rows, computed in double here. */
    fill_mat(&g, a, rows, cols, lda, 0, 0, NAN);
    for (int i = 0; i < rows; i++) {
      for (int j = 0; j < cols; j++)
        xd[j] = prng_uniform(&g, -3, 3);
      ref_softmax(cols, xd, ad);
      for (int j = 0; j < cols; j++)
        a[(size_t)i * lda + j] = (float)ad[j];
    }
    fill_mat(&g, da, rows, cols, ldda, -1, 1, NAN);
    fill_mat(&g, dx, rows, cols, lddx, 0, 0, OUT_PAD);
    for (int i = 0; i < rows; i++)
      set_all(dx + (size_t)i * lddx, (size_t)cols, NAN);
    for (int i = 0; i < rows; i++) {
      double dot = 0.0;
      for (int j = 0; j < cols; j++)
        dot += (double)a[(size_t)i * lda + j] * da[(size_t)i * ldda + j];
      for (int j = 0; j < cols; j++)
        ref[(size_t)i * cols + j] =
            a[(size_t)i * lda + j] * (da[(size_t)i * ldda + j] - dot);
    }
    k_softmax_backward_rows(rows, cols, a, lda, da, ldda, dx, lddx);
    check_err(rel_err_mat(rows, cols, dx, lddx, ref), REF_TOL,
              "softmax_backward %dx%d lda=%d ldda=%d lddx=%d", rows, cols, lda,
              ldda, lddx);
    ck_assert_msg(pad_intact(rows, cols, lddx, dx),
                  "softmax_backward wrote into the padding of dx");
    free(a);
    free(da);
    free(dx);
    free(ref);
    free(xd);
    free(ad);
  }
}
END_TEST

struct softmax_ctx {
  int rows, cols;
  float *x, *y;
  const float *r;
};

static double softmax_loss(void *p) {
  struct softmax_ctx *c = p;
  k_softmax_rows(c->rows, c->cols, c->x, c->cols, c->y, c->cols);
  return project(c->rows, c->cols, c->r, c->y, c->cols);
}

START_TEST(test_softmax_backward_fd) {
  int rows, cols;
  shape2(_i, &rows, &cols);
  prng g = {1000 + (uint64_t)_i};
  const size_t n = (size_t)rows * cols;
  float *x = falloc(n), *y = falloc(n), *r = falloc(n), *dx = falloc(n);
  double *gx = dalloc(n);
  fill(&g, x, n, -1, 1);
  fill(&g, r, n, -1, 1);
  struct softmax_ctx ctx = {rows, cols, x, y, r};
  fd_grad(softmax_loss, &ctx, x, rows, cols, cols, H_SMOOTH, gx);
  k_softmax_rows(rows, cols, x, cols, y, cols);
  k_softmax_backward_rows(rows, cols, y, cols, r, cols, dx, cols);
  check_err(rel_err_vec((int)n, dx, gx), FD_TOL, "softmax FD %dx%d", rows,
            cols);
  free(x);
  free(y);
  free(r);
  free(dx);
  free(gx);
}
END_TEST

/* ======================================================================== */
/* k_xent_forward / k_xent_backward                                          */

static double ref_xent(int bsz, int classes, const float *o, const int *y,
                       double *probs) {
  double *od = dalloc((size_t)classes), *ls = dalloc((size_t)classes);
  double total = 0.0;
  for (int i = 0; i < bsz; i++) {
    row_to_double(classes, o + (size_t)i * classes, od);
    ref_log_softmax(classes, od, ls);
    total -= ls[y[i]];
    ref_softmax(classes, od, probs + (size_t)i * classes);
  }
  free(od);
  free(ls);
  return total / bsz;
}

START_TEST(test_xent_ref) {
  int bsz, classes;
  shape2(_i, &bsz, &classes);
  prng g = {1100 + (uint64_t)_i};
  const size_t n = (size_t)bsz * classes;
  float *o = falloc(n), *probs = falloc(n), *dl = falloc(n);
  double *pref = dalloc(n), *gref = dalloc(n);
  int *y = ialloc((size_t)bsz);
  for (int variant = 0; variant < 2; variant++) {
    fill_logits(&g, variant, o, bsz, classes, classes);
    for (int i = 0; i < bsz; i++)
      y[i] = prng_int(&g, classes);
    const double lref = ref_xent(bsz, classes, o, y, pref);
    set_all(probs, n, NAN);
    const double l = k_xent_forward(bsz, classes, o, y, probs);
    check_err(rel_err_scalar(l, lref), REF_TOL,
              "xent_forward loss B=%d C=%d range=%d", bsz, classes, variant);
    check_err(rel_err_vec((int)n, probs, pref), REF_TOL,
              "xent_forward probs B=%d C=%d", bsz, classes);
    const double l2 = k_xent_forward(bsz, classes, o, y, NULL);
    ck_assert_msg(l2 == l, "xent_forward with probs=NULL: %.17g vs %.17g", l2,
                  l);

    /* Backward: dlogits = dbeta dlogits + scale (probs - onehot) / B, from
     * the reference probabilities. */
    static const float dbetas[] = {0.0f, 1.0f, 0.5f};
    static const float scales[] = {1.0f, 0.25f};
    for (int bi = 0; bi < 3; bi++)
      for (int si = 0; si < 2; si++) {
        const float dbeta = dbetas[bi], scale = scales[si];
        fill(&g, dl, n, -2, 2);
        if (dbeta == 0.0f)
          set_all(dl, n, NAN); /* write-only when dbeta = 0 */
        for (int i = 0; i < bsz; i++)
          for (int j = 0; j < classes; j++) {
            const size_t k = (size_t)i * classes + j;
            const double t = j == y[i] ? 1.0 : 0.0;
            gref[k] = (dbeta == 0.0f ? 0.0 : dbeta * (double)dl[k]) +
                      scale * ((double)probs[k] - t) / bsz;
          }
        k_xent_backward(bsz, classes, probs, y, scale, dl, dbeta);
        check_err(rel_err_vec((int)n, dl, gref), REF_TOL,
                  "xent_backward B=%d C=%d dbeta=%g scale=%g", bsz, classes,
                  dbeta, scale);
      }
  }
  free(o);
  free(probs);
  free(dl);
  free(pref);
  free(gref);
  free(y);
}
END_TEST

struct xent_ctx {
  int bsz, classes;
  float *o;
  const int *y;
  float scale;
};

static double xent_loss(void *p) {
  struct xent_ctx *c = p;
  return c->scale * k_xent_forward(c->bsz, c->classes, c->o, c->y, NULL);
}

START_TEST(test_xent_fd) {
  int bsz, classes;
  shape2(_i, &bsz, &classes);
  prng g = {1200 + (uint64_t)_i};
  const size_t n = (size_t)bsz * classes;
  float *o = falloc(n), *probs = falloc(n), *dl = falloc(n);
  double *go = dalloc(n), *acc = dalloc(n);
  int *y = ialloc((size_t)bsz);
  fill(&g, o, n, -1, 1);
  for (int i = 0; i < bsz; i++)
    y[i] = prng_int(&g, classes);
  const float scale = 0.7f;
  struct xent_ctx ctx = {bsz, classes, o, y, scale};
  fd_grad(xent_loss, &ctx, o, bsz, classes, classes, H_SMOOTH, go);
  k_xent_forward(bsz, classes, o, y, probs);
  set_all(dl, n, NAN);
  k_xent_backward(bsz, classes, probs, y, scale, dl, 0.0f);
  check_err(rel_err_vec((int)n, dl, go), FD_TOL, "xent FD B=%d C=%d", bsz,
            classes);
  /* Accumulation with dbeta = 1 into known values. */
  for (size_t k = 0; k < n; k++) {
    dl[k] = prng_uniform(&g, 3, 5);
    acc[k] = dl[k] + go[k];
  }
  k_xent_backward(bsz, classes, probs, y, scale, dl, 1.0f);
  check_err(rel_err_vec((int)n, dl, acc), FD_TOL,
            "xent accumulate (dbeta 1) B=%d C=%d", bsz, classes);
  free(o);
  free(probs);
  free(dl);
  free(go);
  free(acc);
  free(y);
}
END_TEST

/* ======================================================================== */
/* k_argmax / k_count_correct                                                */

START_TEST(test_argmax_cases) {
  static const struct {
    int n;
    float x[10];
    int want;
  } cases[] = {
      {1, {0.0f}, 0},
      {1, {-5.0f}, 0},
      {2, {2.0f, 1.0f}, 0},
      {2, {1.0f, 2.0f}, 1},
      {4, {1.0f, 3.0f, 3.0f, 2.0f}, 1},
      {3, {5.0f, 5.0f, 5.0f}, 0},
      {3, {-2.0f, -1.0f, -1.0f}, 1},
      {3, {-INFINITY, -3.0f, -3.0f}, 1},
      {2, {-0.0f, 0.0f}, 0},
      {10, {1, 2, 3, 4, 5, 6, 7, 8, 9, 9}, 8},
      {10, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, 9},
      {5, {-1e30f, -1e30f, -1e-30f, -1e-30f, -1e30f}, 2},
  };
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    const int got = k_argmax(cases[c].n, cases[c].x);
    ck_assert_msg(got == cases[c].want, "k_argmax case %zu: got %d, want %d", c,
                  got, cases[c].want);
  }
}
END_TEST

START_TEST(test_count_correct_cases) {
  /* Ties go to the lowest index. */
  static const float logits[] = {
      1, 1, 0, /* argmax 0 (tie 0/1) label 0: correct   */
      1, 1, 0, /* argmax 0 (tie 0/1) label 1: wrong     */
      0, 2, 2, /* argmax 1 (tie 1/2) label 1: correct   */
      0, 2, 2, /* argmax 1 (tie 1/2) label 2: wrong     */
      0, 0, 3, /* argmax 2           label 2: correct   */
      3, 0, 0, /* argmax 0           label 1: wrong     */
      7, 7, 7, /* argmax 0 (3-way)   label 0: correct   */
  };
  static const int labels[] = {0, 1, 1, 2, 2, 1, 0};
  ck_assert_int_eq(k_count_correct(7, 3, logits, labels), 4);
  ck_assert_int_eq(k_count_correct(1, 3, logits + 3, labels + 1), 0);
  ck_assert_int_eq(k_count_correct(1, 3, logits, labels), 1);
}
END_TEST

/* Random logits on a coarse grid (many ties) against a plain-loop count. */
START_TEST(test_count_correct_random) {
  int bsz, classes;
  shape2(_i, &bsz, &classes);
  prng g = {1300 + (uint64_t)_i};
  const size_t n = (size_t)bsz * classes;
  float *o = falloc(n);
  int *y = ialloc((size_t)bsz);
  for (int rep = 0; rep < 20; rep++) {
    for (size_t k = 0; k < n; k++)
      o[k] = (float)(prng_int(&g, 3) - 1);
    int want = 0;
    for (int i = 0; i < bsz; i++) {
      const int am = ref_argmax(classes, o + (size_t)i * classes);
      /* Half the rows labelled with their argmax, the rest at random. */
      y[i] = (prng_next(&g) & 1) ? am : prng_int(&g, classes);
      want += y[i] == am;
      ck_assert_int_eq(k_argmax(classes, o + (size_t)i * classes), am);
    }
    ck_assert_int_eq(k_count_correct(bsz, classes, o, y), want);
  }
  free(o);
  free(y);
}
END_TEST

/* ======================================================================== */
/* k_l2norm_forward / k_l2norm_backward                                      */

/* The L2-normalization tests use a matrix with an all-zero row (the 1e-12
 * branch) in variant 1. */
static int zero_row_of(int variant, int rows) {
  return variant == 1 ? rows / 2 : -1;
}

START_TEST(test_l2norm_ref) {
  int rows, cols;
  shape2(_i, &rows, &cols);
  prng g = {1400 + (uint64_t)_i};
  const size_t n = (size_t)rows * cols;
  float *z = falloc(n), *nz = falloc(n), *r = falloc((size_t)rows);
  float *dn = falloc(n), *dz = falloc(n);
  double *nref = dalloc(n), *rref = dalloc((size_t)rows), *gref = dalloc(n);
  for (int variant = 0; variant < 2; variant++) {
    const int zr = zero_row_of(variant, rows);
    fill(&g, z, n, -1, 1);
    if (zr >= 0)
      set_all(z + (size_t)zr * cols, (size_t)cols, 0.0f);
    fill(&g, dn, n, -1, 1);
    fill(&g, dz, n, -1, 1); /* known pre-fill: backward accumulates */
    for (int i = 0; i < rows; i++) {
      const float *zi = z + (size_t)i * cols;
      double ss = 0.0;
      for (int j = 0; j < cols; j++)
        ss += (double)zi[j] * zi[j];
      const double den = fmax(sqrt(ss), 1e-12);
      rref[i] = den;
      double dot = 0.0;
      for (int j = 0; j < cols; j++) {
        nref[(size_t)i * cols + j] = zi[j] / den;
        dot += nref[(size_t)i * cols + j] * dn[(size_t)i * cols + j];
      }
      for (int j = 0; j < cols; j++) {
        const size_t k = (size_t)i * cols + j;
        gref[k] = dz[k] + (sqrt(ss) > 1e-12 ? (dn[k] - nref[k] * dot) / den
                                            : dn[k] / 1e-12);
      }
    }
    set_all(nz, n, NAN);
    set_all(r, (size_t)rows, NAN);
    k_l2norm_forward(rows, cols, z, nz, r);
    check_err(rel_err_mat(rows, cols, nz, cols, nref), REF_TOL,
              "l2norm_forward n %dx%d zero_row=%d", rows, cols, zr);
    for (int i = 0; i < rows; i++)
      check_err(rel_err_scalar(r[i], rref[i]), REF_TOL,
                "l2norm_forward r %dx%d row %d (zero_row=%d)", rows, cols, i,
                zr);
    if (zr >= 0)
      for (int j = 0; j < cols; j++)
        ck_assert_msg(nz[(size_t)zr * cols + j] == 0.0f,
                      "l2norm of a zero row: n[%d] = %g", j,
                      (double)nz[(size_t)zr * cols + j]);
    k_l2norm_backward(rows, cols, nz, r, dn, dz);
    /* Row by row: the zero row's gradient is ~1e12 and would hide the
     * others in a whole-matrix norm. */
    for (int i = 0; i < rows; i++)
      check_err(rel_err_mat(1, cols, dz + (size_t)i * cols, cols,
                            gref + (size_t)i * cols),
                REF_TOL, "l2norm_backward %dx%d row %d (zero_row=%d)", rows,
                cols, i, zr);
  }
  free(z);
  free(nz);
  free(r);
  free(dn);
  free(dz);
  free(nref);
  free(rref);
  free(gref);
}
END_TEST

struct l2_ctx {
  int rows, cols;
  float *z, *nz, *r;
  const float *w;
};

static double l2_loss(void *p) {
  struct l2_ctx *c = p;
  k_l2norm_forward(c->rows, c->cols, c->z, c->nz, c->r);
  return project(c->rows, c->cols, c->w, c->nz, c->cols);
}

START_TEST(test_l2norm_fd) {
  int rows, cols;
  shape2(_i, &rows, &cols);
  prng g = {1500 + (uint64_t)_i};
  const size_t n = (size_t)rows * cols;
  float *z = falloc(n), *nz = falloc(n), *r = falloc((size_t)rows);
  float *w = falloc(n), *dz = falloc(n);
  double *gz = dalloc(n), *acc = dalloc(n);
  /* |z| >= 0.05 keeps every row norm far above 1e-12 and, with one column,
   * keeps z from crossing 0 (where n = sign(z) jumps). */
  fill_away(&g, z, n, 0.05, 1.0);
  fill(&g, w, n, -1, 1);
  struct l2_ctx ctx = {rows, cols, z, nz, r, w};
  fd_grad(l2_loss, &ctx, z, rows, cols, cols, H_SMOOTH, gz);
  k_l2norm_forward(rows, cols, z, nz, r);
  set_all(dz, n, 0.0f);
  k_l2norm_backward(rows, cols, nz, r, w, dz);
  check_err(rel_err_vec((int)n, dz, gz), FD_TOL, "l2norm FD %dx%d", rows, cols);
  /* Accumulation into known values. */
  for (size_t k = 0; k < n; k++) {
    dz[k] = prng_uniform(&g, 3, 5);
    acc[k] = dz[k] + gz[k];
  }
  k_l2norm_backward(rows, cols, nz, r, w, dz);
  check_err(rel_err_vec((int)n, dz, acc), FD_TOL, "l2norm accumulate %dx%d",
            rows, cols);
  free(z);
  free(nz);
  free(r);
  free(w);
  free(dz);
  free(gz);
  free(acc);
}
END_TEST

/* The zero row: for ||z|| <= 1e-12, n = z / 1e-12 is linear, so a step
 * h = 1e-13 (||z +- h e_k|| = h < 1e-12) stays in that branch and the
 * central difference is exact up to rounding. */
START_TEST(test_l2norm_zero_row_fd) {
  int rows, cols;
  shape2(_i, &rows, &cols);
  prng g = {1600 + (uint64_t)_i};
  const size_t n = (size_t)rows * cols;
  const int zr = rows / 2;
  float *z = falloc(n), *nz = falloc(n), *r = falloc((size_t)rows);
  float *w = falloc(n), *dz = falloc(n);
  double *gz = dalloc((size_t)cols);
  fill_away(&g, z, n, 0.05, 1.0);
  set_all(z + (size_t)zr * cols, (size_t)cols, 0.0f);
  fill(&g, w, n, -1, 1);
  struct l2_ctx ctx = {rows, cols, z, nz, r, w};
  fd_grad(l2_loss, &ctx, z + (size_t)zr * cols, 1, cols, cols, 1e-13, gz);
  k_l2norm_forward(rows, cols, z, nz, r);
  set_all(dz, n, 0.0f);
  k_l2norm_backward(rows, cols, nz, r, w, dz);
  check_err(rel_err_vec(cols, dz + (size_t)zr * cols, gz), FD_TOL,
            "l2norm zero-row FD %dx%d", rows, cols);
  free(z);
  free(nz);
  free(r);
  free(w);
  free(dz);
  free(gz);
}
END_TEST

/* ======================================================================== */
/* k_supcon_forward / k_supcon_backward                                      */

enum { LAB_SINGLETON, LAB_ALL_EQUAL, LAB_ALL_DISTINCT, LAB_TWO_CLASSES, N_LAB };
static const char *const LAB_NAME[N_LAB] = {"singleton", "all-equal",
                                            "all-distinct", "two-classes"};

static void make_labels(prng *g, int scheme, int bsz, int *y) {
  for (int i = 0; i < bsz; i++) {
    switch (scheme) {
    case LAB_SINGLETON:
      y[i] = prng_int(g, 3);
      break;
    case LAB_ALL_EQUAL:
      y[i] = 4;
      break;
    case LAB_ALL_DISTINCT:
      y[i] = 3 * i + 1;
      break;
    default:
      y[i] = (i * 7 / 3) % 2;
      break;
    }
  }
  if (scheme == LAB_SINGLETON) {
    /* Class 9 appears once (|P| = 1); class 0 at least twice if B >= 3. */
    y[bsz - 1] = 9;
    if (bsz >= 3)
      y[0] = y[1] = 0;
  }
}

static int count_label(int bsz, const int *y, int label) {
  int n = 0;
  for (int j = 0; j < bsz; j++)
    n += y[j] == label;
  return n;
}

/* The float matrix x (B, B) as doubles in out (returns out). */
static double *st_d(int bsz, const float *x, double *out) {
  for (size_t i = 0; i < (size_t)bsz * bsz; i++)
    out[i] = x[i];
  return out;
}

/* l(T) in double for a contiguous (B, B) matrix T whose rows are anchors;
 * grad (if not NULL) receives dl/dT = (softmax(T_i) - P_i / |P(i)|) / B. */
static double ref_supcon(int bsz, const double *t, const int *y, double *grad) {
  double *ls = dalloc((size_t)bsz);
  double total = 0.0;
  for (int i = 0; i < bsz; i++) {
    const double *ti = t + (size_t)i * bsz;
    ref_log_softmax(bsz, ti, ls);
    int np = 0;
    double acc = 0.0;
    for (int j = 0; j < bsz; j++)
      if (y[j] == y[i]) {
        acc += ls[j];
        np++;
      }
    total -= acc / np;
    if (grad)
      for (int j = 0; j < bsz; j++)
        grad[(size_t)i * bsz + j] =
            (exp(ls[j]) - (y[j] == y[i] ? 1.0 / np : 0.0)) / bsz;
  }
  free(ls);
  return total / bsz;
}

/* S (B, B) stored with row stride ld.  orient 0 reads rows of S
 * (rs = ld, cs = 1), orient 1 rows of Sᵀ (rs = 1, cs = ld).  T receives the
 * matrix whose rows are the anchors, built by an explicit transpose. */
static void anchors_matrix(int bsz, const float *s, int ld, int orient,
                           double *t) {
  for (int i = 0; i < bsz; i++)
    for (int j = 0; j < bsz; j++)
      t[(size_t)i * bsz + j] =
          orient ? s[(size_t)j * ld + i] : s[(size_t)i * ld + j];
}

START_TEST(test_supcon_ref) {
  const int bsz = supcon_batch(_i);
  prng g = {1700 + (uint64_t)_i};
  const size_t bb = (size_t)bsz * bsz;
  int *y = ialloc((size_t)bsz);
  double *t = dalloc(bb), *gt = dalloc(bb), *gref = dalloc(bb),
         *gref_p = dalloc(bb);
  for (int scheme = 0; scheme < N_LAB; scheme++)
    for (int orient = 0; orient < 2; orient++)
      for (int pad = 0; pad <= 3; pad += 3) {
        const int ld = bsz + pad;
        const int rs = orient ? 1 : ld, cs = orient ? ld : 1;
        float *s = falloc((size_t)bsz * ld), *ds = falloc((size_t)bsz * ld);
        make_labels(&g, scheme, bsz, y);
        /* tau = 0.1 on cosine similarities: S in [-10, 10]. */
        fill_mat(&g, s, bsz, bsz, ld, -10, 10, NAN);
        anchors_matrix(bsz, s, ld, orient, t);
        const double lref = ref_supcon(bsz, t, y, gt);
        float *pr = falloc(bb);
        const double l = k_supcon_forward(bsz, s, rs, cs, y, pr);
        check_err(rel_err_scalar(l, lref), REF_TOL,
                  "supcon_forward B=%d labels=%s orient=%d ld=%d", bsz,
                  LAB_NAME[scheme], orient, ld);
        if (bsz == 1)
          ck_assert_msg(l == 0.0, "supcon of one sample is %g, not 0", l);

        /* Backward: known pre-fill plus scale * dl/dT mapped back onto S. */
        const float scale = 0.35f;
        fill_mat(&g, ds, bsz, bsz, ld, -1, 1, OUT_PAD);
        for (int i = 0; i < bsz; i++)
          for (int j = 0; j < bsz; j++) {
            const size_t st = orient ? (size_t)j * ld + i : (size_t)i * ld + j;
            gref[orient ? (size_t)j * bsz + i : (size_t)i * bsz + j] =
                ds[st] + scale * gt[(size_t)i * bsz + j];
          }
        /* the stored probabilities are the anchors' softmax rows */
        for (int i = 0; i < bsz; i++)
          for (int j = 0; j < bsz; j++)
            gref_p[(size_t)i * bsz + j] =
                gt[(size_t)i * bsz + j] * bsz +
                (y[j] == y[i] ? 1.0 / count_label(bsz, y, y[i]) : 0.0);
        check_err(rel_err_vec((int)bb, pr, gref_p), REF_TOL,
                  "supcon_forward probabilities B=%d labels=%s orient=%d "
                  "ld=%d",
                  bsz, LAB_NAME[scheme], orient, ld);
        k_supcon_backward(bsz, pr, y, scale, ds, rs, cs);
        free(pr);
        check_err(rel_err_mat(bsz, bsz, ds, ld, gref), REF_TOL,
                  "supcon_backward B=%d labels=%s orient=%d ld=%d", bsz,
                  LAB_NAME[scheme], orient, ld);
        ck_assert_msg(pad_intact(bsz, bsz, ld, ds),
                      "supcon_backward wrote into the padding of dS");
        free(s);
        free(ds);
      }
  free(y);
  free(t);
  free(gt);
  free(gref);
  free(gref_p);
}
END_TEST

/* The stored probabilities keep float accuracy element-wise when the
 * logits are large (tau = 1e-3 on cosines: |S| up to 1000), where rounding
 * max + log-sum-exp as one number would cost up to |max| ulp. */
START_TEST(test_supcon_probs_large_logits) {
  enum { NB = 64 };
  prng g = {2100};
  float *s = falloc(NB * NB), *pr = falloc(NB * NB);
  double *t = dalloc(NB * NB), *ls = dalloc(NB);
  int y[NB];
  make_labels(&g, LAB_TWO_CLASSES, NB, y);
  fill(&g, s, NB * NB, -1000, 1000);
  k_supcon_forward(NB, s, NB, 1, y, pr);
  double worst = 0.0;
  int checked = 0;
  for (int i = 0; i < NB; i++) {
    for (int j = 0; j < NB; j++)
      t[j] = s[(size_t)i * NB + j];
    ref_log_softmax(NB, t, ls);
    for (int j = 0; j < NB; j++) {
      const double ref = exp(ls[j]);
      if (ref < 1e-30)
        continue; /* underflows in float */
      worst = fmax(worst, fabs(pr[(size_t)i * NB + j] - ref) / ref);
      checked++;
    }
  }
  ck_assert_int_ge(checked, NB);
  ck_assert_msg(worst < 1e-5,
                "softmax of logits up to 1000: element relative error %.3g",
                worst);
  free(s);
  free(pr);
  free(t);
  free(ls);
}
END_TEST

/* Reading S with (rs, cs) = (1, B) is the same as reading an explicit Sᵀ
 * with (B, 1). */
START_TEST(test_supcon_orientation) {
  const int bsz = supcon_batch(_i);
  prng g = {1800 + (uint64_t)_i};
  const size_t bb = (size_t)bsz * bsz;
  float *s = falloc(bb), *st = falloc(bb), *p1 = falloc(bb);
  float *d1 = falloc(bb), *d2 = falloc(bb);
  double *d2t = dalloc(bb), *p2d = dalloc(bb);
  int *y = ialloc((size_t)bsz);
  for (int scheme = 0; scheme < N_LAB; scheme++) {
    make_labels(&g, scheme, bsz, y);
    fill(&g, s, bb, -5, 5);
    for (int i = 0; i < bsz; i++)
      for (int j = 0; j < bsz; j++)
        st[(size_t)i * bsz + j] = s[(size_t)j * bsz + i];
    const double l1 = k_supcon_forward(bsz, s, 1, bsz, y, p1);
    /* in place, as the model stores them */
    const double l2 = k_supcon_forward(bsz, st, bsz, 1, y, st);
    check_err(rel_err_scalar(l1, l2), REF_TOL,
              "supcon forward S(1,B) vs S^T(B,1) B=%d labels=%s", bsz,
              LAB_NAME[scheme]);
    set_all(d1, bb, 0.0f);
    set_all(d2, bb, 0.0f);
    check_err(rel_err_vec((int)bb, p1, st_d(bsz, st, p2d)), REF_TOL,
              "supcon probabilities S(1,B) vs in place on S^T B=%d labels=%s",
              bsz, LAB_NAME[scheme]);
    k_supcon_backward(bsz, p1, y, 1.0f, d1, 1, bsz);
    k_supcon_backward(bsz, st, y, 1.0f, d2, bsz, 1);
    for (int i = 0; i < bsz; i++)
      for (int j = 0; j < bsz; j++)
        d2t[(size_t)i * bsz + j] = d2[(size_t)j * bsz + i];
    check_err(rel_err_vec((int)bb, d1, d2t), REF_TOL,
              "supcon backward S(1,B) vs S^T(B,1) B=%d labels=%s", bsz,
              LAB_NAME[scheme]);
  }
  free(s);
  free(st);
  free(p1);
  free(d1);
  free(d2);
  free(d2t);
  free(p2d);
  free(y);
}
END_TEST

struct supcon_ctx {
  int bsz;
  float *s;
  const int *y;
  float w_rows, w_cols; /* weights of l(S) and l(Sᵀ) */
};

static double supcon_loss(void *p) {
  struct supcon_ctx *c = p;
  double l = 0.0;
  if (c->w_rows != 0.0f)
    l += c->w_rows * k_supcon_forward(c->bsz, c->s, c->bsz, 1, c->y, NULL);
  if (c->w_cols != 0.0f)
    l += c->w_cols * k_supcon_forward(c->bsz, c->s, 1, c->bsz, c->y, NULL);
  return l;
}

/* Finite differences of scale * l(S) (rows), scale * l(Sᵀ) (columns), and
 * the symmetric term (s/2)(l(S) + l(Sᵀ)) of METHOD.md section 7, whose
 * gradient both orientations accumulate into one dS. */
START_TEST(test_supcon_fd) {
  const int bsz = supcon_batch(_i);
  prng g = {1900 + (uint64_t)_i};
  const size_t bb = (size_t)bsz * bsz;
  float *s = falloc(bb), *ds = falloc(bb), *pr = falloc(bb), *pc = falloc(bb);
  double *gs = dalloc(bb), *acc = dalloc(bb);
  int *y = ialloc((size_t)bsz);
  const float scale = 0.7f;
  static const char *const what[3] = {"rows (B,1)", "cols (1,B)",
                                      "both, accumulated"};
  for (int scheme = 0; scheme < N_LAB; scheme++)
    for (int mode = 0; mode < 3; mode++) {
      make_labels(&g, scheme, bsz, y);
      fill(&g, s, bb, -1, 1);
      const float wr = mode == 0 ? scale : mode == 2 ? scale / 2 : 0.0f;
      const float wc = mode == 1 ? scale : mode == 2 ? scale / 2 : 0.0f;
      struct supcon_ctx ctx = {bsz, s, y, wr, wc};
      fd_grad(supcon_loss, &ctx, s, bsz, bsz, bsz, H_SMOOTH, gs);
      k_supcon_forward(bsz, s, bsz, 1, y, pr);
      k_supcon_forward(bsz, s, 1, bsz, y, pc);
      set_all(ds, bb, 0.0f);
      if (wr != 0.0f)
        k_supcon_backward(bsz, pr, y, wr, ds, bsz, 1);
      if (wc != 0.0f)
        k_supcon_backward(bsz, pc, y, wc, ds, 1, bsz);
      check_err(rel_err_vec((int)bb, ds, gs), FD_TOL,
                "supcon FD %s B=%d labels=%s", what[mode], bsz,
                LAB_NAME[scheme]);
      /* Accumulation into known values. */
      for (size_t k = 0; k < bb; k++) {
        ds[k] = prng_uniform(&g, 3, 5);
        acc[k] = ds[k] + gs[k];
      }
      if (wr != 0.0f)
        k_supcon_backward(bsz, pr, y, wr, ds, bsz, 1);
      if (wc != 0.0f)
        k_supcon_backward(bsz, pc, y, wc, ds, 1, bsz);
      check_err(rel_err_vec((int)bb, ds, acc), FD_TOL,
                "supcon accumulate %s B=%d labels=%s", what[mode], bsz,
                LAB_NAME[scheme]);
    }
  free(s);
  free(ds);
  free(pr);
  free(pc);
  free(gs);
  free(acc);
  free(y);
}
END_TEST

/* ======================================================================== */
/* k_all_finite                                                              */

START_TEST(test_all_finite) {
  const int n = vec_len(_i);
  prng g = {2000 + (uint64_t)_i};
  float *x = falloc((size_t)n);
  static const float specials[] = {0.0f,    -0.0f,    1.0f,    -1.0f,
                                   FLT_MAX, -FLT_MAX, FLT_MIN, -FLT_MIN,
                                   1e-45f,  -1e-45f,  3.0e38f, -3.0e38f};
  const int nspec = (int)(sizeof specials / sizeof specials[0]);
  fill(&g, x, (size_t)n, -1e30, 1e30);
  for (int k = 0; k < n; k++)
    if (prng_int(&g, 3) == 0)
      x[k] = specials[prng_int(&g, nspec)];
  /* All finite, including values whose plain sum overflows to Inf. */
  if (n >= 2)
    x[0] = x[n - 1] = FLT_MAX;
  ck_assert_msg(k_all_finite((size_t)n, x) == 1,
                "k_all_finite: finite data of length %d reported non-finite",
                n);
  static const float bad[] = {NAN, -NAN, INFINITY, -INFINITY};
  static const char *const bad_name[] = {"NaN", "-NaN", "+Inf", "-Inf"};
  for (int b = 0; b < 4; b++)
    for (int pos = 0; pos < n; pos++) {
      /* Every position for short vectors; first, middle, last for long. */
      if (n > 16 && pos != 0 && pos != n / 2 && pos != n - 1)
        continue;
      const float keep = x[pos];
      x[pos] = bad[b];
      ck_assert_msg(k_all_finite((size_t)n, x) == 0,
                    "k_all_finite missed %s at %d of %d", bad_name[b], pos, n);
      x[pos] = keep;
    }
  ck_assert_int_eq(k_all_finite((size_t)n, x), 1); /* restored */
  /* +Inf and -Inf together. */
  if (n >= 2) {
    const float a0 = x[0], a1 = x[n - 1];
    x[0] = INFINITY;
    x[n - 1] = -INFINITY;
    ck_assert_int_eq(k_all_finite((size_t)n, x), 0);
    x[0] = a0;
    x[n - 1] = a1;
  }
  /* A prefix that stops before a trailing NaN is finite. */
  x[n - 1] = NAN;
  ck_assert_int_eq(k_all_finite((size_t)n - 1, x), 1);
  ck_assert_int_eq(k_all_finite((size_t)n, x), 0);
  /* Empty input: vacuously finite. */
  ck_assert_int_eq(k_all_finite(0, x), 1);
  free(x);
}
END_TEST

/* k_transpose: exact, with strides on both sides, '=' and '+='; and the
 * 32-wide blocking is crossed (shape 45 x 70 below). */
START_TEST(test_transpose) {
  int rows, cols;
  if (_i == 0) {
    rows = 45;
    cols = 70;
  } else {
    shape2(_i - 1, &rows, &cols);
  }
  prng g = {3000 + (uint64_t)_i};
  const int ldx = cols + 2, ldy = rows + 3;
  float *x = falloc((size_t)rows * ldx);
  float *y = falloc((size_t)cols * ldy);
  float *y0 = falloc((size_t)cols * ldy);
  fill_mat(&g, x, rows, cols, ldx, -1.0, 1.0, NAN);
  fill_mat(&g, y0, cols, rows, ldy, -1.0, 1.0, OUT_PAD);
  for (int acc = 0; acc <= 1; acc++) {
    memcpy(y, y0, sizeof(float) * (size_t)cols * ldy);
    k_transpose(rows, cols, x, ldx, y, ldy, acc);
    for (int j = 0; j < cols; j++)
      for (int i = 0; i < rows; i++) {
        const float want =
            acc ? y0[(size_t)j * ldy + i] + x[(size_t)i * ldx + j]
                : x[(size_t)i * ldx + j];
        ck_assert_msg(y[(size_t)j * ldy + i] == want,
                      "transpose %dx%d acc %d: y[%d][%d] = %g, want %g", rows,
                      cols, acc, j, i, (double)y[(size_t)j * ldy + i],
                      (double)want);
      }
    ck_assert_msg(pad_intact(cols, rows, ldy, y),
                  "transpose %dx%d wrote outside its output", rows, cols);
  }
  free(x);
  free(y);
  free(y0);
}
END_TEST

/* k_sum_squares: against a plain double loop, for lengths around the
 * 8-way interleave (n < 8, n % 8 != 0); values span many magnitudes. */
START_TEST(test_sum_squares) {
  const int n = vec_len(_i);
  prng g = {4000 + (uint64_t)_i};
  float *x = falloc((size_t)n);
  fill(&g, x, (size_t)n, -3.0, 3.0);
  for (int k = 0; k < n; k += 5)
    x[k] *= 1e-3f;
  double ref = 0.0;
  for (int k = 0; k < n; k++)
    ref += (double)x[k] * x[k];
  /* Only the summation order differs: a few ulps of double. */
  check_err(rel_err_scalar(k_sum_squares((size_t)n, x), ref), 1e-12,
            "sum_squares n=%d", n);
  ck_assert_msg(k_sum_squares(0, x) == 0.0, "empty sum is 0");
  free(x);
}
END_TEST

/* k_all_zero: only the +0.0 bit pattern counts as zero. */
START_TEST(test_all_zero) {
  const int n = vec_len(_i);
  float *x = falloc((size_t)n);
  memset(x, 0, sizeof(float) * (size_t)n);
  ck_assert_msg(k_all_zero((size_t)n, x) == 1, "n=%d zeros", n);
  static const float bad[] = {-0.0f, 1e-45f, -1e-45f, 1.0f, NAN, INFINITY};
  for (size_t b = 0; b < sizeof bad / sizeof bad[0]; b++) {
    const int at[3] = {0, n / 2, n - 1};
    for (int w = 0; w < 3; w++) {
      x[at[w]] = bad[b];
      ck_assert_msg(k_all_zero((size_t)n, x) == 0, "n=%d: %g at %d is not +0",
                    n, (double)bad[b], at[w]);
      x[at[w]] = 0.0f;
    }
  }
  ck_assert_msg(k_all_zero(0, x) == 1, "empty input counts as all zero");
  free(x);
}
END_TEST

/* ======================================================================== */

static Suite *kernels_suite(void) {
  Suite *s = suite_create("kernels");
  const int n2 = N_SHAPES2 + N_RANDOM_SHAPES;
  const int n3 = N_SHAPES3 + N_RANDOM_SHAPES;
  const int nb = N_SUPCON_B + N_RANDOM_SHAPES;
  const int nv = N_VEC_N + N_RANDOM_SHAPES;
  TCase *tc;

  tc = tcase_create("gemm");
  tcase_add_loop_test(tc, test_gemm_ref, 0, n3);
  tcase_add_loop_test(tc, test_gemm_empty, 0, n2);
  suite_add_tcase(s, tc);

  tc = tcase_create("linear");
  tcase_add_loop_test(tc, test_linear_forward_ref, 0, n3);
  tcase_add_loop_test(tc, test_linear_backward_ref, 0, n3);
  tcase_add_loop_test(tc, test_linear_backward_fd, 0, n3);
  suite_add_tcase(s, tc);

  tc = tcase_create("relu");
  tcase_add_loop_test(tc, test_relu_ref, 0, nv);
  tcase_add_loop_test(tc, test_relu_fd, 0, nv);
  suite_add_tcase(s, tc);

  tc = tcase_create("softmax");
  tcase_add_loop_test(tc, test_softmax_ref, 0, n2);
  tcase_add_loop_test(tc, test_log_softmax_ref, 0, n2);
  tcase_add_loop_test(tc, test_softmax_backward_ref, 0, n2);
  tcase_add_loop_test(tc, test_softmax_backward_fd, 0, n2);
  suite_add_tcase(s, tc);

  tc = tcase_create("xent");
  tcase_add_loop_test(tc, test_xent_ref, 0, n2);
  tcase_add_loop_test(tc, test_xent_fd, 0, n2);
  suite_add_tcase(s, tc);

  tc = tcase_create("argmax");
  tcase_add_test(tc, test_argmax_cases);
  tcase_add_test(tc, test_count_correct_cases);
  tcase_add_loop_test(tc, test_count_correct_random, 0, n2);
  suite_add_tcase(s, tc);

  tc = tcase_create("l2norm");
  tcase_add_loop_test(tc, test_l2norm_ref, 0, n2);
  tcase_add_loop_test(tc, test_l2norm_fd, 0, n2);
  tcase_add_loop_test(tc, test_l2norm_zero_row_fd, 0, n2);
  suite_add_tcase(s, tc);

  tc = tcase_create("supcon");
  tcase_add_loop_test(tc, test_supcon_ref, 0, nb);
  tcase_add_test(tc, test_supcon_probs_large_logits);
  tcase_add_loop_test(tc, test_supcon_orientation, 0, nb);
  tcase_add_loop_test(tc, test_supcon_fd, 0, nb);
  suite_add_tcase(s, tc);

  tc = tcase_create("all_finite");
  tcase_add_loop_test(tc, test_all_finite, 0, nv);
  tcase_add_loop_test(tc, test_all_zero, 0, nv);
  tcase_add_loop_test(tc, test_sum_squares, 0, nv);
  suite_add_tcase(s, tc);

  tc = tcase_create("transpose");
  tcase_add_loop_test(tc, test_transpose, 0, n2 + 1);
  suite_add_tcase(s, tc);

  return s;
}

int main(void) { return imml_run_suite(kernels_suite()); }
