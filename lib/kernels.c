/* Numerical kernels; see kernels.h for the contract of each. */
#include "kernels.h"
#include "bf16.h"

#define IMML_EXPERIMENTAL /* imml_threads_set */
#include "imml.h"

#include <cblas.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

void k_gemm(k_ctx *ctx, int trans_a, int trans_b, int m, int n, int kk,
            float alpha, const float *a, int lda, const float *b, int ldb,
            float beta, float *c, int ldc) {
  if (m <= 0 || n <= 0)
    return;
  if (kk <= 0) { /* empty sum: C = beta C, as BLAS defines it */
    for (int i = 0; i < m; i++)
      for (int j = 0; j < n; j++)
        c[(size_t)i * ldc + j] =
            beta == 0.0f ? 0.0f : beta * c[(size_t)i * ldc + j];
    return;
  }
  if (ctx && ctx->bf16) {
    /* as many threads as the BLAS is set to (imml_threads_set) */
    imml_bf16_gemm(ctx, imml_threads_set(0), trans_a, trans_b, m, n, kk, alpha,
                   a, lda, b, ldb, beta, c, ldc);
    return;
  }
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, m, n, kk, alpha, a, lda, b,
              ldb, beta, c, ldc);
}

int k_tasks(k_ctx *ctx, int parts, size_t work_floats, double macs,
            k_task_fn fn, void *arg) {
  if (!ctx || !ctx->bf16 || !ctx->team || parts < 2 ||
      work_floats > ctx->work_floats)
    return 0;
  const int threads = imml_threads_set(0);
  if (threads < 2)
    return 0;
  const int per = threads < parts ? threads : parts;
  if (macs / per < imml_bf16_part_min(ctx))
    return 0;
  imml_bf16_tasks(ctx, threads, parts, fn, arg);
  ctx->tasks_run++;
  return 1;
}

void k_linear_forward(k_ctx *ctx, int batch, int n_in, int n_out,
                      const float *x, int ldx, const float *w, const float *b,
                      float *y) {
  float beta = 0.0f;
  if (b) {
    for (int i = 0; i < batch; i++)
      memcpy(y + (size_t)i * n_out, b, (size_t)n_out * sizeof *y);
    beta = 1.0f;
  }
  /* y (B, n_out) = x (B, n_in) W (n_in, n_out) [+ y] */
  k_gemm(ctx, 0, 0, batch, n_out, n_in, 1.0f, x, ldx, w, n_out, beta, y, n_out);
}

void k_linear_backward(k_ctx *ctx, int batch, int n_in, int n_out,
                       const float *x, int ldx, const float *w, const float *dy,
                       float *dw, float *db, float *dx, int lddx,
                       float dx_beta) {
  /* dW (n_in, n_out) += xᵀ (n_in, B) dy (B, n_out) */
  if (dw)
    k_gemm(ctx, 1, 0, n_in, n_out, batch, 1.0f, x, ldx, dy, n_out, 1.0f, dw,
           n_out);
  if (db)
    for (int i = 0; i < batch; i++) {
      const float *row = dy + (size_t)i * n_out;
      for (int j = 0; j < n_out; j++)
        db[j] += row[j];
    }
  /* dx (B, n_in) = dy (B, n_out) Wᵀ (n_out, n_in) */
  if (dx)
    k_gemm(ctx, 0, 1, batch, n_in, n_out, 1.0f, dy, n_out, w, n_out, dx_beta,
           dx, lddx);
}

IMML_HOT static void relu_forward_impl(size_t n, const float *x, float *y) {
  for (size_t i = 0; i < n; i++)
    y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

void k_relu_forward(size_t n, const float *x, float *y) {
  relu_forward_impl(n, x, y);
}

IMML_HOT static void relu_backward_impl(size_t n, const float *y,
                                        const float *dy, float *dx) {
  for (size_t i = 0; i < n; i++)
    dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

void k_relu_backward(size_t n, const float *y, const float *dy, float *dx) {
  relu_backward_impl(n, y, dy, dx);
}

/* exp(x) for x <= 88, branch-free so that loops around it vectorise:
 * Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, Cephes' degree-7
 * polynomial for exp(r), and 2^n built in the exponent bits.  Within a few
 * ulp of a correctly rounded expf (tested against double exp); below -87.3
 * it returns ~1.2e-38 instead of a subnormal, an absolute error under
 * 1.2e-38.  Integer n comes from the bits of the rounding sum, never from
 * a float-to-int conversion, so a NaN stays NaN without undefined
 * behaviour. */
static inline float exp_approx(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.44269504088896341f + 12582912.0f; /* + 1.5 2^23 */
  uint32_t tb;
  memcpy(&tb, &t, sizeof tb);
  const int32_t ni = (int32_t)(tb & 0x7fffffu) - 0x400000;
  const float n = t - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t sb = (uint32_t)(ni + 127) << 23;
  float scale;
  memcpy(&scale, &sb, sizeof scale);
  return p * scale;
}

/* Largest of x[0], x[stride], ... x[(cols-1) stride]. */
static float row_max(int cols, const float *x, size_t stride) {
  float m = x[0];
  for (int j = 1; j < cols; j++)
    if (x[(size_t)j * stride] > m)
      m = x[(size_t)j * stride];
  return m;
}

/* sum_j exp(x_j - m), as 8 interleaved double partial sums (fixed order,
 * vectorisable); with y non-NULL also stores each exp in y (stride 1). */
IMML_HOT static double row_exp_sum(int cols, const float *x, size_t stride,
                                   float m, float *y) {
  double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int j = 0;
  if (stride == 1 && y) {
    for (; j + 8 <= cols; j += 8)
      for (int l = 0; l < 8; l++) {
        const float e = exp_approx(x[j + l] - m);
        y[j + l] = e;
        part[l] += e;
      }
    for (int l = 0; j < cols; j++, l++) {
      y[j] = exp_approx(x[j] - m);
      part[l] += y[j];
    }
  } else if (stride == 1) {
    for (; j + 8 <= cols; j += 8)
      for (int l = 0; l < 8; l++)
        part[l] += exp_approx(x[j + l] - m);
    for (int l = 0; j < cols; j++, l++)
      part[l] += exp_approx(x[j] - m);
  } else {
    for (int l = 0; j < cols; j++, l = (l + 1) & 7)
      part[l] += exp_approx(x[(size_t)j * stride] - m);
  }
  return ((part[0] + part[1]) + (part[2] + part[3])) +
         ((part[4] + part[5]) + (part[6] + part[7]));
}

/* Row maximum and log of the shifted exponential sum (summed in double). */
static void row_lse(int cols, const float *x, size_t stride, float *mx,
                    float *lse) {
  const float m = row_max(cols, x, stride);
  *mx = m;
  *lse = (float)log(row_exp_sum(cols, x, stride, m, NULL));
}

/* y_j = exp((x_j - m) - lse) for a row read with a stride: its softmax,
 * given its max m and the log of its shifted exponential sum.  (Adding m
 * and lse first would round their sum, an error of up to |m| ulp.) */
IMML_HOT static void store_softmax_row(int cols, const float *x, size_t stride,
                                       float m, float lse, float *y) {
  for (int j = 0; j < cols; j++)
    y[j] = exp_approx((x[(size_t)j * stride] - m) - lse);
}

IMML_HOT static void softmax_rows_impl(int rows, int cols, const float *x,
                                       int ldx, float *y, int ldy) {
  for (int i = 0; i < rows; i++) {
    const float *xi = x + (size_t)i * ldx;
    float *yi = y + (size_t)i * ldy;
    const float m = row_max(cols, xi, 1);
    const float inv = (float)(1.0 / row_exp_sum(cols, xi, 1, m, yi));
    for (int j = 0; j < cols; j++)
      yi[j] *= inv;
  }
}

void k_softmax_rows(int rows, int cols, const float *x, int ldx, float *y,
                    int ldy) {
  softmax_rows_impl(rows, cols, x, ldx, y, ldy);
}

void k_softmax_backward_rows(int rows, int cols, const float *a, int lda,
                             const float *da, int ldda, float *dx, int lddx) {
  for (int i = 0; i < rows; i++) {
    const float *ai = a + (size_t)i * lda;
    const float *dai = da + (size_t)i * ldda;
    float *dxi = dx + (size_t)i * lddx;
    double dot = 0.0;
    for (int j = 0; j < cols; j++)
      dot += (double)dai[j] * ai[j];
    const float d = (float)dot;
    for (int j = 0; j < cols; j++)
      dxi[j] = ai[j] * (dai[j] - d);
  }
}

double k_xent_forward(int batch, int classes, const float *logits,
                      const int *labels, float *probs) {
  double total = 0.0;
  for (int i = 0; i < batch; i++) {
    const float *oi = logits + (size_t)i * classes;
    float m, lse;
    row_lse(classes, oi, 1, &m, &lse);
    total -= (double)(oi[labels[i]] - m - lse);
  }
  if (probs)
    k_softmax_rows(batch, classes, logits, classes, probs, classes);
  return total / batch;
}

void k_xent_backward(int batch, int classes, const float *probs,
                     const int *labels, float scale, float *dlogits,
                     float dbeta) {
  const float g = scale / (float)batch;
  for (int i = 0; i < batch; i++) {
    const float *pi = probs + (size_t)i * classes;
    float *di = dlogits + (size_t)i * classes;
    for (int j = 0; j < classes; j++) {
      const float t = (j == labels[i]) ? 1.0f : 0.0f;
      const float v = g * (pi[j] - t);
      di[j] = dbeta == 0.0f ? v : dbeta * di[j] + v;
    }
  }
}

int k_argmax(int n, const float *x) {
  int best = 0;
  for (int j = 1; j < n; j++)
    if (x[j] > x[best])
      best = j;
  return best;
}

int k_count_correct(int batch, int classes, const float *logits,
                    const int *labels) {
  int c = 0;
  for (int i = 0; i < batch; i++)
    c += k_argmax(classes, logits + (size_t)i * classes) == labels[i];
  return c;
}

#define NORM_EPS 1e-12f

void k_l2norm_forward(int rows, int cols, const float *z, float *nz, float *r) {
  for (int i = 0; i < rows; i++) {
    const float *zi = z + (size_t)i * cols;
    float *ni = nz + (size_t)i * cols;
    double ss = 0.0;
    for (int j = 0; j < cols; j++)
      ss += (double)zi[j] * zi[j];
    float nrm = (float)sqrt(ss);
    const float den = nrm > NORM_EPS ? nrm : NORM_EPS;
    r[i] = den;
    for (int j = 0; j < cols; j++)
      ni[j] = zi[j] / den;
  }
}

void k_l2norm_backward(int rows, int cols, const float *nz, const float *r,
                       const float *dn, float *dz) {
  for (int i = 0; i < rows; i++) {
    const float *ni = nz + (size_t)i * cols;
    const float *dni = dn + (size_t)i * cols;
    float *dzi = dz + (size_t)i * cols;
    const float inv = 1.0f / r[i];
    if (r[i] > NORM_EPS) {
      double dot = 0.0;
      for (int j = 0; j < cols; j++)
        dot += (double)ni[j] * dni[j];
      const float d = (float)dot;
      for (int j = 0; j < cols; j++)
        dzi[j] += (dni[j] - ni[j] * d) * inv;
    } else {
      /* ||z|| <= 1e-12: n = z / 1e-12 is linear in z. */
      for (int j = 0; j < cols; j++)
        dzi[j] += dni[j] * inv;
    }
  }
}

double k_supcon_forward(int batch, const float *s, int rs, int cs,
                        const int *labels, float *probs) {
  double total = 0.0;
  for (int i = 0; i < batch; i++) {
    const float *si = s + (size_t)i * rs;
    float m, lse;
    row_lse(batch, si, (size_t)cs, &m, &lse);
    double acc = 0.0;
    int npos = 0;
    for (int j = 0; j < batch; j++)
      if (labels[j] == labels[i]) {
        acc += (double)(si[(size_t)j * cs] - m - lse);
        npos++;
      }
    total -= acc / npos;
    /* Row i is consumed: with probs == s it may now be overwritten. */
    if (probs)
      store_softmax_row(batch, si, (size_t)cs, m, lse,
                        probs + (size_t)i * batch);
  }
  return total / batch;
}

IMML_HOT static void supcon_backward_impl(int batch, const float *probs,
                                          const int *labels, float scale,
                                          float *ds, int rs, int cs) {
  const float g = scale / (float)batch;
  for (int i = 0; i < batch; i++) {
    const float *pi = probs + (size_t)i * batch;
    float *dsi = ds + (size_t)i * rs;
    int npos = 0;
    for (int j = 0; j < batch; j++)
      npos += labels[j] == labels[i];
    const float ppos = 1.0f / (float)npos;
    for (int j = 0; j < batch; j++) {
      const float t = labels[j] == labels[i] ? ppos : 0.0f;
      dsi[(size_t)j * cs] += g * (pi[j] - t);
    }
  }
}

void k_supcon_backward(int batch, const float *probs, const int *labels,
                       float scale, float *ds, int rs, int cs) {
  supcon_backward_impl(batch, probs, labels, scale, ds, rs, cs);
}

void k_transpose(int rows, int cols, const float *x, int ldx, float *y, int ldy,
                 int accumulate) {
  /* Blocked so that both the reads and the writes stay within a few cache
   * lines per block. */
  enum { BLK = 32 };
  for (int i0 = 0; i0 < rows; i0 += BLK)
    for (int j0 = 0; j0 < cols; j0 += BLK) {
      const int i1 = i0 + BLK < rows ? i0 + BLK : rows;
      const int j1 = j0 + BLK < cols ? j0 + BLK : cols;
      for (int j = j0; j < j1; j++) {
        float *yj = y + (size_t)j * ldy;
        for (int i = i0; i < i1; i++) {
          const float v = x[(size_t)i * ldx + j];
          yj[i] = accumulate ? yj[i] + v : v;
        }
      }
    }
}

IMML_HOT static double sum_squares_impl(size_t n, const float *x) {
  double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; l++)
      part[l] += (double)x[i + l] * (double)x[i + l];
  for (int l = 0; i < n; i++, l++)
    part[l] += (double)x[i] * (double)x[i];
  return ((part[0] + part[1]) + (part[2] + part[3])) +
         ((part[4] + part[5]) + (part[6] + part[7]));
}

double k_sum_squares(size_t n, const float *x) {
  return sum_squares_impl(n, x);
}

IMML_HOT static float max_abs_impl(size_t n, const float *x) {
  uint32_t top = 0;
  for (size_t i = 0; i < n; i++)
    top = k_top_bits(top, x[i]);
  return k_bits_float(top);
}

float k_max_abs(size_t n, const float *x) { return max_abs_impl(n, x); }

IMML_HOT static int all_finite_impl(size_t n, const float *x) {
  uint32_t any = 0;
  for (size_t i = 0; i < n; i++)
    any = k_nonfinite_bits(any, x[i]);
  return (any & 0x80000000u) == 0;
}

int k_all_finite(size_t n, const float *x) { return all_finite_impl(n, x); }

IMML_HOT static int all_zero_impl(size_t n, const float *x) {
  uint32_t any = 0;
  for (size_t i = 0; i < n; i++) {
    uint32_t u;
    memcpy(&u, &x[i], sizeof u);
    any |= u;
  }
  return any == 0;
}

int k_all_zero(size_t n, const float *x) { return all_zero_impl(n, x); }
