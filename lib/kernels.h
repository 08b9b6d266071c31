/*
 * Numerical kernels: forward/backward pairs on row-major float32 matrices.
 * They know nothing of the model; every matrix product goes through
 * k_gemm, which runs cblas_sgemm, or in a bf16 model the bf16 kernel of
 * lib/bf16.c.  Backward kernels accumulate (+=) into parameter gradients
 * as METHOD.md section 7 says; the shape of each argument rides along as a
 * comment.  Internal: not exported from the shared library.
 */
#ifndef IMML_KERNELS_H
#define IMML_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Hot element-wise loops are compiled for AVX2 as well as the baseline on
 * x86-64 and chosen at load time (GNU ifunc), so the library stays
 * portable while the loops that are memory- or ALU-bound use wide vectors.
 * IMML_HOT goes on static functions only: GCC and clang disagree on how a
 * multiversioned function declared in a header is resolved across
 * translation units, and a static one needs no such agreement. */
/* ThreadSanitizer instruments the ifunc resolvers, which then run before
 * its runtime is up: no clones under TSan. */
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define IMML_NO_TARGET_CLONES 1
#endif
#endif
#if defined(__SANITIZE_THREAD__) && !defined(IMML_NO_TARGET_CLONES)
#define IMML_NO_TARGET_CLONES 1
#endif
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) &&          \
    !defined(__clang_analyzer__) && !defined(IMML_NO_TARGET_CLONES)
#define IMML_HOT __attribute__((target_clones("avx2", "default")))
#else
#define IMML_HOT
#endif

/* Reductions on float bit patterns: integer operations, which vectorise
 * where a float accumulation would not without -ffast-math. */

/* worst | (exponent field + 1): bit 31 of the accumulation is set once any
 * accumulated x is NaN or infinite (all exponent bits ones carry into it). */
static inline uint32_t k_nonfinite_bits(uint32_t worst, float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return worst | ((u & 0x7f800000u) + 0x00800000u);
}

/* max(top, magnitude bits of x).  Magnitude bits order like |x|, with
 * infinity above every finite value and NaN above infinity; k_bits_float
 * turns the maximum back into max |x| (NaN if any x was NaN). */
static inline uint32_t k_top_bits(uint32_t top, float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  u &= 0x7fffffffu;
  return u > top ? u : top;
}

static inline float k_bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* The arithmetic of a model's matrix products (imml_config.precision).
 * NULL (float32, the default) needs no state: cblas_sgemm.  A bf16 model
 * owns one, with the scratch of lib/bf16.c allocated at its creation; so
 * does each of its shares, which may predict on another thread. */
typedef struct k_ctx {
  int bf16; /* 1: operands rounded to bf16, float32 accumulation */
  /* the least work of a part, to start the call's helpers and once they
   * run (bf16.h; tests lower them to split small products) */
  double start_min_macs, part_min_macs;
  struct imml_team *team; /* helper threads of the current call (team.h);
                             NULL in a member's single-thread context */
  struct k_ctx *solo;     /* the members' single-thread contexts */
  void *scratch;          /* 64-byte aligned: all regions, or a member's */
  float *work;            /* a member's work floats (k_tasks) */
  size_t work_floats;
  /* jobs k_tasks ran on the team, and how many of them were the
   * knowledge network's branches (mdken.c); the tests read them */
  long tasks_run, branch_jobs;
  void *block; /* the allocation holding the context and its scratch */
} k_ctx;

/* Independent tasks: runs fn(arg, part, sub) for part 0 .. parts-1 on the
 * threads of a bf16 context's team (imml_threads_set), in any order and
 * concurrently, where sub is the running thread's own single-thread
 * context: its products are not split further, and sub->work holds at
 * least `work_floats` floats no other task touches meanwhile.  Returns 0,
 * having run nothing, where that is not possible or not worth it (a
 * float32 or NULL context, one thread, fewer than 2 parts, too little
 * work memory, or `macs` multiply-adds in all too few for a thread each:
 * bf16.h's thresholds of a product's part): the caller then runs the
 * parts itself. */
typedef void (*k_task_fn)(void *arg, int part, struct k_ctx *sub);
int k_tasks(k_ctx *ctx, int parts, size_t work_floats, double macs,
            k_task_fn fn, void *arg);

/* C = alpha op(A) op(B) + beta C; op(A): m x kk, op(B): kk x n.  C is not
 * read when beta is 0. */
void k_gemm(k_ctx *ctx, int trans_a, int trans_b, int m, int n, int kk,
            float alpha, const float *a, int lda, const float *b, int ldb,
            float beta, float *c, int ldc);

/* y = x W + b.  x: (B, n_in) with row stride ldx, W: (n_in, n_out),
 * b: (n_out) or NULL, y: (B, n_out). */
void k_linear_forward(k_ctx *ctx, int batch, int n_in, int n_out,
                      const float *x, int ldx, const float *w, const float *b,
                      float *y);

/* dW += xᵀ dy; db += sum_i dy_i (if db); dx = dx_beta dx + dy Wᵀ (if dx).
 * dy: (B, n_out), dx: (B, n_in) with row stride lddx. */
void k_linear_backward(k_ctx *ctx, int batch, int n_in, int n_out,
                       const float *x, int ldx, const float *w, const float *dy,
                       float *dw, float *db, float *dx, int lddx,
                       float dx_beta);

/* y = max(x, 0), in place allowed. */
void k_relu_forward(size_t n, const float *x, float *y);
/* dx = dy ⊙ [y > 0] where y is the ReLU output (same mask as pre > 0);
 * in place allowed (dx == dy). */
void k_relu_backward(size_t n, const float *y, const float *dy, float *dx);

/* Row-wise softmax of an (R, C) matrix, max subtracted. */
void k_softmax_rows(int rows, int cols, const float *x, int ldx, float *y,
                    int ldy);

/* dx = a ⊙ (da - rowsum(da ⊙ a)): the backward of a = softmax(x). */
void k_softmax_backward_rows(int rows, int cols, const float *a, int lda,
                             const float *da, int ldda, float *dx, int lddx);

/* Mean softmax cross-entropy (1/B) sum_i -log softmax(o_i)[y_i], summed in
 * double.  probs (B, C) receives softmax(o) (may be NULL). */
double k_xent_forward(int batch, int classes, const float *logits,
                      const int *labels, float *probs);
/* dlogits = dbeta dlogits + scale (probs - onehot(y)) / B. */
void k_xent_backward(int batch, int classes, const float *probs,
                     const int *labels, float scale, float *dlogits,
                     float dbeta);
/* Number of rows whose argmax (lowest index on ties) equals the label. */
int k_count_correct(int batch, int classes, const float *logits,
                    const int *labels);
/* Index of the largest of x[0..n-1], lowest index on ties. */
int k_argmax(int n, const float *x);

/* n_i = z_i / max(||z_i||, 1e-12); r_i receives that denominator. */
void k_l2norm_forward(int rows, int cols, const float *z, float *nz, float *r);
/* dz += (dn - n (n·dn)) / r where ||z|| > 1e-12, dz += dn / 1e-12 else. */
void k_l2norm_backward(int rows, int cols, const float *nz, const float *r,
                       const float *dn, float *dz);

/* Supervised contrastive term of METHOD.md section 1 on the rows of a
 * (B, B) matrix read as S[i*rs + j*cs] (rs = B, cs = 1: rows of S;
 * rs = 1, cs = B: rows of Sᵀ).  Positives: P(i) = {j : y_j = y_i}.
 * Returns l = -(1/B) sum_i (1/|P(i)|) sum_{j in P(i)} log softmax(row i)[j].
 * probs (may be NULL) receives softmax(row i) as row i of a contiguous
 * (B, B) matrix; it may be s itself when rs = B and cs = 1. */
double k_supcon_forward(int batch, const float *s, int rs, int cs,
                        const int *labels, float *probs);
/* dS[i*rs + j*cs] += scale (probs_ij - P_ij / |P(i)|) / B, with probs the
 * contiguous (B, B) softmax rows k_supcon_forward stored. */
void k_supcon_backward(int batch, const float *probs, const int *labels,
                       float scale, float *ds, int rs, int cs);

/* y (cols, rows) = xᵀ for x (rows, cols) with row strides ldx, ldy;
 * y[j*ldy + i] op= x[i*ldx + j] with op '=' (accumulate 0) or '+='. */
void k_transpose(int rows, int cols, const float *x, int ldx, float *y, int ldy,
                 int accumulate);

/* sum_i x_i^2 in double, as 8 interleaved partial sums (a fixed order, so
 * the result is reproducible, and independent chains that vectorise). */
double k_sum_squares(size_t n, const float *x);

/* The largest |x_i| (0 for n = 0), +inf if any x_i is infinite and NaN if
 * any is NaN: an integer max over the magnitude bits, which vectorises. */
float k_max_abs(size_t n, const float *x);

/* 1 if all n values are finite. */
int k_all_finite(size_t n, const float *x);
/* 1 if all n values are +0.0 (bit pattern 0; -0.0 is not). */
int k_all_zero(size_t n, const float *x);

#endif /* IMML_KERNELS_H */
