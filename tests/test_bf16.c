/* bf16 matrix products (imml_config.precision = IMML_PRECISION_BF16;
 * doc/DECISIONS.md, "bf16 matrix products"):
 *
 * - the rounding (nearest even, NaN, infinity, subnormals), in software
 *   and as the kernel's conversion does it;
 * - the kernel against a double-precision product of the bf16-rounded
 *   operands: bf16 inputs, float32 accumulation, every layout and edge;
 * - bf16 forward and backward against the float32 path on the gradient
 *   test's grid of cases, within the tolerance doc/DECISIONS.md justifies;
 * - results independent of the thread count, shares predicting at once;
 * - no allocation in a bf16 step, counted by the model's allocator hooks
 *   and by a malloc interposer in this executable;
 * - checkpoints unchanged: a bf16 model's loads as an ordinary one;
 * - where bf16 is unavailable (this CPU, or valgrind's), a bf16 model is
 *   refused with IMML_ERR_UNSUPPORTED and the reason.
 *
 * Tests that need the kernel check the refusal instead when this machine
 * cannot run it.  IMML_BF16_VERBOSE=1 prints the grid's errors. */
#include "bf16.h"
#include "check_main.h"
#include "common.h"
#include "kernels.h"

#include <dirent.h>
#include <float.h>
#include <math.h>
#include <pthread.h>

/* ------------------------------------------------------------------ */
/* A malloc interposer: the executable's malloc family binds every      */
/* allocation of the process (the library's, libc's, pthread's) and    */
/* counts those made while counting is on.  Not under ASan, TSan or     */
/* MSan, whose runtimes own malloc; glibc only (__libc_malloc).         */
/* ------------------------------------------------------------------ */

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) ||     \
    __has_feature(memory_sanitizer)
#define NO_INTERPOSER 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define NO_INTERPOSER 1
#endif
#if defined(__GLIBC__) && !defined(NO_INTERPOSER)
#define HAVE_INTERPOSER 1
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);

static int counting;
static long counted;

static void count_one(void) {
  if (__atomic_load_n(&counting, __ATOMIC_RELAXED))
    __atomic_add_fetch(&counted, 1, __ATOMIC_RELAXED);
}

void *malloc(size_t n) {
  count_one();
  return __libc_malloc(n);
}
void *calloc(size_t n, size_t size) {
  count_one();
  return __libc_calloc(n, size);
}
void *realloc(void *p, size_t n) {
  count_one();
  return __libc_realloc(p, n);
}
void free(void *p) { __libc_free(p); }
int posix_memalign(void **p, size_t align, size_t n) {
  count_one();
  *p = __libc_memalign(align, n);
  return *p ? 0 : 12; /* ENOMEM */
}
void *aligned_alloc(size_t align, size_t n) {
  count_one();
  return __libc_memalign(align, n);
}
#endif

/* ------------------------------------------------------------------ */
/* Helpers                                                             */
/* ------------------------------------------------------------------ */

static int have_bf16(void) {
  char why[200];
  return imml_bf16_supported(why, sizeof why);
}

/* Where bf16 is unavailable, a test checks the refusal instead: a bf16
 * model is refused with IMML_ERR_UNSUPPORTED and the reason. */
static void note_unsupported(const char *test) {
  char why[200], msg[IMML_ERRMSG_SIZE];
  ck_assert(!imml_bf16_supported(why, sizeof why));
  const int dims[2] = {3, 2};
  imml_config c;
  imml_config_init(&c);
  c.dims = dims;
  c.n_classes = 2;
  c.precision = IMML_PRECISION_BF16;
  create_fails(&c, NULL, IMML_ERR_UNSUPPORTED, msg, sizeof msg);
  ck_assert_msg(strstr(msg, why) != NULL, "message \"%s\" lacks \"%s\"", msg,
                why);
  fprintf(stderr, "# %s: bf16 unavailable (%s): refused as it should be\n",
          test, why);
}

/* The test's own context for calling the kernel directly. */
static const imml_allocator plain_alloc = {NULL, NULL, NULL};
static k_ctx *kernel_ctx(void) {
  k_ctx *p = imml_bf16_ctx_create(&plain_alloc, 0);
  ck_assert_ptr_nonnull(p);
  return p;
}

static float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

/* A small model's config (the gradient test's sizes by default). */
static void small_config(imml_config *c, int M, const int *dims, int H, int k,
                         int C, int B, int J) {
  imml_config_init(c);
  c->n_modalities = M;
  c->dims = dims;
  c->hidden_dim = H;
  c->knowledge_dim = k;
  c->n_classes = C;
  c->max_batch = B;
  c->dict_size = J;
}

/* ------------------------------------------------------------------ */
/* Rounding                                                            */
/* ------------------------------------------------------------------ */

START_TEST(test_round_software) {
  /* 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even
   * mantissa (1); 1 + 3 2^-8 lies between 1 + 2^-7 and 1 + 2^-6: to the
   * even one (1 + 2^-6); anything above halfway rounds up */
  ck_assert(same_f(imml_bf16_round(1.0f + 0x1p-8f), 1.0f));
  ck_assert(same_f(imml_bf16_round(1.0f + 3 * 0x1p-8f), 1.0f + 0x1p-6f));
  ck_assert(same_f(imml_bf16_round(1.0f + 0x1p-8f + 0x1p-20f), 1.0f + 0x1p-7f));
  ck_assert(
      same_f(imml_bf16_round(-(1.0f + 0x1p-8f + 0x1p-20f)), -(1.0f + 0x1p-7f)));
  ck_assert(same_f(imml_bf16_round(1.0f + 0x1p-9f), 1.0f));
  /* exact values stay; the top of the range overflows to infinity */
  ck_assert(same_f(imml_bf16_round(3.0f), 3.0f));
  ck_assert(same_f(imml_bf16_round(-0.0f), -0.0f));
  ck_assert(same_f(imml_bf16_round(FLT_MAX), INFINITY));
  ck_assert(same_f(imml_bf16_round(-INFINITY), -INFINITY));
  ck_assert(isnan(imml_bf16_round(NAN)));
  /* a signalling NaN comes back quiet, not as infinity */
  ck_assert(isnan(imml_bf16_round(bits_float(0x7f800001u))));
  /* subnormal inputs read as zero, as the instructions' */
  ck_assert(same_f(imml_bf16_round(FLT_MIN / 2), 0.0f));
  ck_assert(same_f(imml_bf16_round(-FLT_MIN / 4), -0.0f));
  ck_assert(same_f(imml_bf16_round(FLT_MIN), FLT_MIN));
  /* within half a bf16 ulp (2^-8 relative) of every normal value */
  drng r = {7};
  for (int i = 0; i < 100000; i++) {
    const float x = ldexpf(drng_unif(&r), (int)(drng_u64(&r) % 60) - 30);
    const float y = imml_bf16_round(x);
    ck_assert((float_bits(y) & 0xffffu) == 0);
    ck_assert_msg(fabsf(y - x) <= fabsf(x) * 0x1p-8f, "%a -> %a", (double)x,
                  (double)y);
  }
}
END_TEST

/* The kernel's conversion is the software rounding: a 1 x 1 x 1 product
 * x * 1 returns bf16(x) exactly (one product, nothing to accumulate), for
 * random bit patterns, constructed ties and special values. */
START_TEST(test_round_kernel) {
  if (!have_bf16()) {
    note_unsupported("round_kernel");
    return;
  }
  k_ctx *scr = kernel_ctx();
  drng r = {11};
  const float one = 1.0f;
  int ties = 0;
  for (int i = 0; i < 200000; i++) {
    uint32_t u = (uint32_t)drng_u64(&r);
    if (i % 4 == 1) /* exactly halfway between two bf16 values */
      u = (u & 0xffff0000u) | 0x8000u;
    if (i % 4 == 2) /* one ulp of float32 either side of halfway */
      u = (u & 0xffff0000u) | (i % 8 == 2 ? 0x7fffu : 0x8001u);
    const uint32_t e = u & 0x7f800000u;
    if (e == 0x7f800000u || e == 0 || e >= 0x7e800000u)
      continue; /* NaN, infinity, subnormal, and products that overflow */
    const float x = bits_float(u);
    float c = NAN;
    imml_bf16_gemm(scr, 1, 0, 0, 1, 1, 1, 1.0f, &x, 1, &one, 1, 0.0f, &c, 1);
    const float want = imml_bf16_round(x);
    ck_assert_msg(same_f(c, want), "bf16(%a): kernel %a, software %a",
                  (double)x, (double)c, (double)want);
    ties += i % 4 == 1;
  }
  ck_assert_int_gt(ties, 10000);
  /* 0 * NaN is NaN, an infinite operand gives infinity */
  float x = NAN, c = 0.0f;
  imml_bf16_gemm(scr, 1, 0, 0, 1, 1, 1, 1.0f, &x, 1, &one, 1, 0.0f, &c, 1);
  ck_assert(isnan(c));
  x = INFINITY;
  imml_bf16_gemm(scr, 1, 0, 0, 1, 1, 1, 1.0f, &x, 1, &one, 1, 0.0f, &c, 1);
  ck_assert(same_f(c, INFINITY));
  imml_bf16_ctx_free(&plain_alloc, scr);
}
END_TEST

/* ------------------------------------------------------------------ */
/* The kernel                                                          */
/* ------------------------------------------------------------------ */

/* Shapes around the kernel's blocking (micro-tile 6 x 64, slices of 256
 * along the sum, blocks of 96 rows and 512 columns) and its edges. */
static const int gemm_shapes[][3] = {
    {1, 1, 1},     {1, 1, 2},      {1, 17, 3},      {5, 1, 7},
    {6, 64, 256},  {7, 65, 257},   {12, 128, 512},  {95, 63, 255},
    {96, 512, 2},  {97, 513, 9},   {130, 300, 600}, {13, 1100, 40},
    {200, 70, 31}, {64, 101, 256}, {3, 5, 1000},    {190, 10, 129},
};
enum { N_GEMM_SHAPES = sizeof gemm_shapes / sizeof gemm_shapes[0] };

/* One shape in all four layouts, with padded leading dimensions, the
 * alpha and beta variants and 1, 2 or 3 threads: each element within the
 * float32 accumulation bound of the double product of the bf16-rounded
 * operands; C's padding untouched; C never read when beta is 0. */
START_TEST(test_gemm_reference) {
  if (!have_bf16()) {
    note_unsupported("gemm_reference");
    return;
  }
  const int m = gemm_shapes[_i][0], n = gemm_shapes[_i][1],
            kk = gemm_shapes[_i][2];
  k_ctx *scr = kernel_ctx();
  /* split every product that has two micro-tiles along m or n, on the
   * context's helpers (threads 2 and 3 below) */
  scr->start_min_macs = scr->part_min_macs = 1.0;
  drng r = {100u + (uint64_t)_i};
  int differs_from_fp32 = 0;
  for (int v = 0; v < 8; v++) {
    const int ta = v & 1, tb = (v >> 1) & 1, threads = 1 + v % 3;
    const float alpha = v < 4 ? 1.0f : -0.75f;
    const float beta = v % 4 == 0 ? 0.0f : (v % 4 == 1 ? 1.0f : 0.5f);
    const int lda = (ta ? m : kk) + v % 3, ldb = (tb ? kk : n) + (v + 1) % 3,
              ldc = n + v % 2 * 3;
    const size_t na = (size_t)(ta ? kk : m) * lda,
                 nb = (size_t)(tb ? n : kk) * ldb, nc = (size_t)m * ldc;
    float *a = xcalloc(na, sizeof(float)), *b = xcalloc(nb, sizeof(float));
    float *c = xcalloc(nc, sizeof(float)), *c0 = xcalloc(nc, sizeof(float));
    for (size_t i = 0; i < na; i++)
      a[i] = drng_unif(&r);
    for (size_t i = 0; i < nb; i++)
      b[i] = drng_unif(&r) * 4.0f;
    for (size_t i = 0; i < nc; i++)
      c[i] = beta == 0.0f ? NAN : drng_unif(&r);
    memcpy(c0, c, nc * sizeof(float));
    imml_bf16_gemm(scr, threads, ta, tb, m, n, kk, alpha, a, lda, b, ldb, beta,
                   c, ldc);
    /* op(A) and op(B)ᵀ as rows along the sum, exact and rounded */
    float *ar = xcalloc((size_t)m * kk, sizeof(float)),
          *br = xcalloc((size_t)n * kk, sizeof(float)),
          *ax = xcalloc((size_t)m * kk, sizeof(float)),
          *bx = xcalloc((size_t)n * kk, sizeof(float));
    for (int k = 0; k < kk; k++) {
      for (int i = 0; i < m; i++) {
        ax[(size_t)i * kk + k] =
            ta ? a[(size_t)k * lda + i] : a[(size_t)i * lda + k];
        ar[(size_t)i * kk + k] = imml_bf16_round(ax[(size_t)i * kk + k]);
      }
      for (int j = 0; j < n; j++) {
        bx[(size_t)j * kk + k] =
            tb ? b[(size_t)j * ldb + k] : b[(size_t)k * ldb + j];
        br[(size_t)j * kk + k] = imml_bf16_round(bx[(size_t)j * kk + k]);
      }
    }
    for (int i = 0; i < m; i++) {
      for (int j = 0; j < n; j++) {
        double s = 0.0, sabs = 0.0, s32 = 0.0;
        const float *xr = ar + (size_t)i * kk, *yr = br + (size_t)j * kk;
        const float *xe = ax + (size_t)i * kk, *ye = bx + (size_t)j * kk;
        for (int k = 0; k < kk; k++) {
          const double p = (double)xr[k] * yr[k];
          s += p;
          sabs += fabs(p);
          s32 += (double)xe[k] * ye[k];
        }
        const double old = beta == 0.0f ? 0.0 : beta * c0[(size_t)i * ldc + j];
        const double want = alpha * s + old;
        /* float32 accumulation of kk products, the scaling and the beta
         * term: (kk + 3) float32 roundings of the magnitudes involved */
        const double bound =
            (kk + 3) * 0x1p-24 * (fabs(alpha) * sabs + fabs(old)) + 1e-37;
        const float got = c[(size_t)i * ldc + j];
        ck_assert_msg(fabs(got - want) <= bound,
                      "%dx%dx%d ta=%d tb=%d threads=%d: C[%d][%d] = %.9g, "
                      "bf16 reference %.9g (bound %.3g)",
                      m, n, kk, ta, tb, threads, i, j, (double)got, want,
                      bound);
        differs_from_fp32 |= fabs(got - (alpha * s32 + old)) > bound;
      }
      for (int j = n; j < ldc; j++)
        ck_assert_msg(same_f(c[(size_t)i * ldc + j], c0[(size_t)i * ldc + j]),
                      "C's padding written at [%d][%d]", i, j);
    }
    free(a);
    free(b);
    free(c);
    free(c0);
    free(ar);
    free(br);
    free(ax);
    free(bx);
  }
  /* the operands really were rounded: float32 products differ */
  ck_assert_msg(differs_from_fp32, "no element differs from float32");
  imml_bf16_ctx_free(&plain_alloc, scr);
}
END_TEST

/* k_gemm with a bf16 context takes the kernel, NULL takes cblas_sgemm
 * (float32, whose result differs), and both keep BLAS's empty-sum rule. */
START_TEST(test_kgemm_dispatch) {
  if (!have_bf16()) {
    note_unsupported("kgemm_dispatch");
    return;
  }
  imml_allocator plain = {NULL, NULL, NULL};
  k_ctx *ctx = imml_bf16_ctx_create(&plain, 0);
  ck_assert_ptr_nonnull(ctx);
  ck_assert_int_eq(((uintptr_t)ctx->scratch) % 64, 0);
  enum { M = 9, N = 70, K = 33 };
  float a[M * K], b[K * N], c1[M * N], c2[M * N], c3[M * N];
  drng r = {5};
  for (int i = 0; i < M * K; i++)
    a[i] = drng_unif(&r);
  for (int i = 0; i < K * N; i++)
    b[i] = drng_unif(&r);
  k_ctx *scr = kernel_ctx();
  k_gemm(ctx, 0, 0, M, N, K, 1.0f, a, K, b, N, 0.0f, c1, N);
  imml_bf16_gemm(scr, 1, 0, 0, M, N, K, 1.0f, a, K, b, N, 0.0f, c2, N);
  k_gemm(NULL, 0, 0, M, N, K, 1.0f, a, K, b, N, 0.0f, c3, N);
  ck_assert(memcmp(c1, c2, sizeof c1) == 0);
  ck_assert(memcmp(c1, c3, sizeof c1) != 0);
  /* kk = 0: C = beta C, and 0 with beta 0 whatever C held */
  for (int i = 0; i < M * N; i++)
    c1[i] = NAN;
  k_gemm(ctx, 0, 0, M, N, 0, 1.0f, a, 1, b, N, 0.0f, c1, N);
  for (int i = 0; i < M * N; i++)
    ck_assert(same_f(c1[i], 0.0f));
  imml_bf16_ctx_free(&plain_alloc, scr);
  imml_bf16_ctx_free(&plain, ctx);
}
END_TEST

/* ------------------------------------------------------------------ */
/* bf16 against float32 on the gradient test's grid                     */
/* ------------------------------------------------------------------ */

/* Norm-wise relative error ||got - ref|| / ||ref|| of every quantity of
 * one training step, bf16 model against float32 model from the same state.
 * The bound (doc/DECISIONS.md, "bf16 matrix products"): rounding both
 * operands of a product to bf16 (unit roundoff u = 2^-8: 8 significant
 * bits) perturbs it by at most 2u relative, to first order, where its sums
 * do not cancel; a path from the features to a gradient crosses at most 14
 * products (7 forward to the logits, 7 back to a first-layer weight), to
 * the logits and losses at most 7.  So 28u for gradients and dL/dh, 14u
 * for logits and losses.  A gradient tensor carrying less than 2^-6 of the
 * whole gradient's norm is measured against 2^-6 of it instead: inside
 * such a tensor (a bias summing rows of opposite sign, the attention's
 * weights when beta is small) cancellation magnifies roundings beyond any
 * fixed bound, on a scale that does not matter to the step. */
#define BF16_U 0x1p-8
#define BF16_TOL_LOSS (14 * BF16_U)
#define BF16_TOL_GRAD (28 * BF16_U)

static double rel_err(const float *got, const float *ref, size_t n,
                      double floor_norm) {
  double dd = 0.0, rr = 0.0;
  for (size_t i = 0; i < n; i++) {
    const double d = (double)got[i] - ref[i];
    dd += d * d;
    rr += (double)ref[i] * ref[i];
  }
  double den = sqrt(rr) > floor_norm ? sqrt(rr) : floor_norm;
  if (den <= 0.0)
    return sqrt(dd) > 0.0 ? INFINITY : 0.0;
  return sqrt(dd) / den;
}

static double loss_err(double got, double ref) {
  const double den = fabs(ref) > 1e-3 ? fabs(ref) : 1e-3;
  return fabs(got - ref) / den;
}

/* Copies a's parameters, dictionary and predominant state into b. */
static void copy_state(imml_model *a, imml_model *b) {
  float *pa = NULL, *pb = NULL;
  size_t na = 0, nb = 0;
  ck_assert_int_eq(imml_param_flat(a, &pa, NULL, &na), IMML_OK);
  ck_assert_int_eq(imml_param_flat(b, &pb, NULL, &nb), IMML_OK);
  ck_assert_uint_eq(na, nb);
  memcpy(pb, pa, na * sizeof(float));
  const size_t nd = (size_t)a->cfg.dict_size * (size_t)a->cfg.n_modalities *
                    (size_t)a->cfg.knowledge_dim;
  memcpy(b->dict, a->dict, nd * sizeof(float));
  b->dict_fill = a->dict_fill;
  b->dict_pos = a->dict_pos;
  b->p = a->p;
  b->p_fixed = a->p_fixed;
  b->steps = a->steps;
  memcpy(b->ema, a->ema, sizeof b->ema);
}

/* Sets every first-layer bias so that the ReLU's sign is the same for any
 * input in [-1, 1]: b1_j = +-(sum_i |W1_ij| + 1/4), alternating.  The
 * step is then a smooth function of every product, so the two precisions
 * differ by rounding only; at a unit whose pre-activation is near zero, a
 * rounding flips the ReLU and the first layer's gradient jumps by a whole
 * term (seen up to 56% on this grid without the margins), which says
 * nothing about the arithmetic. */
static void relu_margins(imml_model *a, imml_model *b) {
  const int H = a->cfg.hidden_dim;
  for (int mm = 0; mm < a->cfg.n_modalities; mm++) {
    const int d = a->cfg.dims[mm];
    char name[16];
    imml_param_view w1v, b1av, b1bv;
    snprintf(name, sizeof name, "m%d.w1", mm);
    ck_assert_int_eq(imml_param_find(a, name, &w1v), IMML_OK);
    snprintf(name, sizeof name, "m%d.b1", mm);
    ck_assert_int_eq(imml_param_find(a, name, &b1av), IMML_OK);
    ck_assert_int_eq(imml_param_find(b, name, &b1bv), IMML_OK);
    const float *w1 = w1v.data;
    float *b1a = b1av.data, *b1b = b1bv.data;
    for (int j = 0; j < H; j++) {
      double sum = 0.25;
      for (int i = 0; i < d; i++)
        sum += fabs(w1[(size_t)i * H + j]);
      b1a[j] = b1b[j] = (float)(j % 2 ? -sum : sum);
    }
  }
}

/* Whether the two models' last training forward left the same ReLU
 * pattern in every hidden unit. */
static int same_relu(const imml_model *a, const imml_model *b) {
  const size_t n = (size_t)a->train.batch * (size_t)a->cfg.hidden_dim;
  for (int mm = 0; mm < a->cfg.n_modalities; mm++)
    for (size_t i = 0; i < n; i++)
      if ((a->train.u[mm][i] > 0.0f) != (b->train.u[mm][i] > 0.0f))
        return 0;
  return 1;
}

typedef struct grid_case {
  int M, p, strict, dict, loss;
  float beta;
  int dims[3], H, k, C, B, J;
  uint64_t seed;
} grid_case;

typedef struct grid_worst {
  double loss, logits, grad, dh;
} grid_worst;

/* One case: fill steps on the float32 model, its state copied into a bf16
 * model, then the same training step on both. */
static grid_worst run_grid_case(const grid_case *g, const char *name) {
  imml_config c;
  small_config(&c, g->M, g->dims, g->H, g->k, g->C, g->B, g->J);
  c.beta = g->beta;
  c.gamma1 = g->loss == 0 ? 0.5f : 0.0f;
  c.gamma2 = g->loss == 0 ? 1.0f : 0.0f;
  c.tau = 0.5f;
  c.predominant = g->p;
  c.slot_mode = g->strict ? IMML_SLOT_STRICT : IMML_SLOT_CONDITIONAL;
  c.seed = g->seed;
  imml_model *f = create_ok(&c, NULL);
  c.precision = IMML_PRECISION_BF16;
  imml_model *h = create_ok(&c, NULL);
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_SGD);
  oc.lr = 0.05f;
  ck_assert_int_eq(imml_optim_setup(f, &oc), IMML_OK);
  drng r = {g->seed};
  for (int s = 0; s < g->dict; s++) { /* 0: empty, 1: partial, 2: wrapped */
    batch fb;
    batch_random(&fb, g->M, g->dims, g->B, g->C, &r);
    ck_assert_int_eq(
        imml_forward(f, IMML_MODE_TRAIN, g->B, feats(&fb), fb.y, NULL, NULL),
        IMML_OK);
    backward_ok(f, NULL);
    ck_assert_int_eq(imml_optim_step(f), IMML_OK);
    batch_free(&fb);
  }
  copy_state(f, h);
  relu_margins(f, h);
  batch b;
  batch_random(&b, g->M, g->dims, g->B, g->C, &r);
  float *lf = xcalloc((size_t)g->B * g->C, sizeof(float));
  float *lh = xcalloc((size_t)g->B * g->C, sizeof(float));
  imml_losses sf, sh;
  ck_assert_int_eq(
      imml_forward(f, IMML_MODE_TRAIN, g->B, feats(&b), b.y, lf, &sf), IMML_OK);
  ck_assert_int_eq(
      imml_forward(h, IMML_MODE_TRAIN, g->B, feats(&b), b.y, lh, &sh), IMML_OK);
  ck_assert_msg(same_relu(f, h), "%s: the ReLU margins did not hold", name);
  float *df[3], *dg[3];
  dfeat_alloc(df, &b);
  dfeat_alloc(dg, &b);
  backward_only_ok(f, df);
  backward_only_ok(h, dg);
  grid_worst w = {0, 0, 0, 0};
  const double lt[4][2] = {
      {sh.total, sf.total}, {sh.ce, sf.ce}, {sh.con, sf.con}, {sh.dis, sf.dis}};
  for (int i = 0; i < 4; i++) {
    const double e = loss_err(lt[i][0], lt[i][1]);
    w.loss = e > w.loss ? e : w.loss;
  }
  w.logits = rel_err(lh, lf, (size_t)g->B * g->C, 0.0);
  float *gf = NULL, *gh = NULL;
  size_t np = 0;
  ck_assert_int_eq(imml_param_flat(f, NULL, &gf, &np), IMML_OK);
  ck_assert_int_eq(imml_param_flat(h, NULL, &gh, NULL), IMML_OK);
  double all = 0.0;
  for (size_t i = 0; i < np; i++)
    all += (double)gf[i] * gf[i];
  const double floor_norm = sqrt(all) * 0x1p-6;
  for (int t = 0; t < imml_param_count(f); t++) {
    imml_param_view vf, vh;
    ck_assert_int_eq(imml_param_get(f, t, &vf), IMML_OK);
    ck_assert_int_eq(imml_param_get(h, t, &vh), IMML_OK);
    const size_t cnt = (size_t)vf.rows * vf.cols;
    const double e = rel_err(vh.grad, vf.grad, cnt, floor_norm);
    ck_assert_msg(e <= BF16_TOL_GRAD, "%s: gradient of %s off by %.4f", name,
                  vf.name, e);
    w.grad = e > w.grad ? e : w.grad;
  }
  for (int mm = 0; mm < g->M; mm++) {
    const double e = rel_err(dg[mm], df[mm], (size_t)g->B * g->dims[mm], 0.0);
    w.dh = e > w.dh ? e : w.dh;
  }
  ck_assert_msg(w.loss <= BF16_TOL_LOSS, "%s: a loss off by %.4f", name,
                w.loss);
  ck_assert_msg(w.logits <= BF16_TOL_LOSS, "%s: logits off by %.4f", name,
                w.logits);
  ck_assert_msg(w.dh <= BF16_TOL_GRAD, "%s: dL/dh off by %.4f", name, w.dh);
  /* the bf16 path was taken: float32 gives other bits */
  ck_assert_msg(memcmp(lf, lh, (size_t)g->B * g->C * sizeof(float)) != 0,
                "%s: bf16 logits are the float32 ones", name);
  if (getenv("IMML_BF16_VERBOSE"))
    fprintf(stderr, "# %s: loss %.2e logits %.2e grad %.2e dh %.2e\n", name,
            w.loss, w.logits, w.grad, w.dh);
  dfeat_free(df, g->M);
  dfeat_free(dg, g->M);
  free(lf);
  free(lh);
  batch_free(&b);
  imml_model_free(f);
  imml_model_free(h);
  return w;
}

static const int mp_list[5][2] = {{2, 0}, {2, 1}, {3, 0}, {3, 1}, {3, 2}};
static const float beta_list[3] = {0.0f, 0.5f, 1.0f};

/* test_gradients.c's grid: (M, p) x slot mode x beta x dictionary state x
 * {total (g1 = 0.5, g2 = 1), CE only}, its sizes (d = 5, 4, 6; H = 6;
 * k = 4; C = 3; J = 10; B = 8 for M = 2, 6 for M = 3). */
enum { N_GRID = 5 * 2 * 3 * 3 * 2 };

START_TEST(test_grid) {
  if (!have_bf16()) {
    note_unsupported("grid");
    return;
  }
  int r = _i;
  grid_case g;
  memset(&g, 0, sizeof g);
  g.loss = r % 2;
  r /= 2;
  g.dict = r % 3;
  r /= 3;
  g.beta = beta_list[r % 3];
  r /= 3;
  g.strict = r % 2;
  r /= 2;
  g.M = mp_list[r][0];
  g.p = mp_list[r][1];
  const int dims[3] = {5, 4, 6};
  memcpy(g.dims, dims, sizeof dims);
  g.H = 6;
  g.k = 4;
  g.C = 3;
  g.J = 10;
  g.B = g.M == 2 ? 8 : 6;
  g.seed = 1000u + (uint64_t)_i;
  char name[160];
  snprintf(name, sizeof name, "grid#%d M=%d p=%d %s beta=%.1f dict=%d %s", _i,
           g.M, g.p, g.strict ? "strict" : "conditional", (double)g.beta,
           g.dict, g.loss == 0 ? "total" : "CE-only");
  run_grid_case(&g, name);
}
END_TEST

/* Wider cases, whose products run over the kernel's blocks and edges:
 * sums of hundreds of terms, odd widths, a batch larger than one
 * micro-tile column, both attention orders. */
START_TEST(test_wide) {
  if (!have_bf16()) {
    note_unsupported("wide");
    return;
  }
  static const int shapes[4][8] = {
      /* M, d0, d1, H, k, C, B, J */
      {2, 300, 37, 70, 33, 5, 40, 64},
      {2, 513, 130, 257, 64, 101, 96, 40},
      {3, 64, 65, 128, 17, 7, 24, 100},
      {2, 20, 700, 96, 129, 3, 130, 16},
  };
  const int *s = shapes[_i];
  grid_case g;
  memset(&g, 0, sizeof g);
  g.M = s[0];
  g.p = _i % g.M;
  g.dims[0] = s[1];
  g.dims[1] = s[2];
  g.dims[2] = 50;
  g.H = s[3];
  g.k = s[4];
  g.C = s[5];
  g.B = s[6];
  g.J = s[7];
  g.beta = 0.5f;
  g.dict = 1 + _i % 2;
  g.strict = _i == 2;
  g.seed = 77u + (uint64_t)_i;
  char name[80];
  snprintf(name, sizeof name, "wide#%d", _i);
  run_grid_case(&g, name);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Threads, shares, allocation, checkpoints, refusal                    */
/* ------------------------------------------------------------------ */

/* A model big enough that its products split over threads. */
static const int big_dims[2] = {512, 256};

static void big_config(imml_config *c) {
  small_config(c, 2, big_dims, 256, 128, 10, 128, 256);
  c->predominant = 0;
  c->precision = IMML_PRECISION_BF16;
}

static void train_step(imml_model *m, const batch *b, float **dh) {
  ck_assert_int_eq(
      imml_forward(m, IMML_MODE_TRAIN, b->B, feats(b), b->y, NULL, NULL),
      IMML_OK);
  backward_ok(m, dh);
  ck_assert_int_eq(imml_optim_step(m), IMML_OK);
}

/* Four balanced modalities: the knowledge network's branches run as tasks
 * on a bf16 model's threads (lib/mdken.c), each with products of its own. */
static const int branch_dims[4] = {192, 160, 192, 96};

static void branch_config(imml_config *c) {
  small_config(c, 4, branch_dims, 128, 64, 7, 96, 128);
  c->predominant = 1;
  c->precision = IMML_PRECISION_BF16;
}

/* Three modalities, strict slots, the predominant one last. */
static const int strict_dims[3] = {160, 192, 96};

static void strict_config(imml_config *c) {
  small_config(c, 3, strict_dims, 128, 64, 7, 96, 128);
  c->predominant = 2;
  c->slot_mode = IMML_SLOT_STRICT;
  c->precision = IMML_PRECISION_BF16;
}

/* The kernel gives every element from the same sums in the same order
 * whichever thread computes it, and a branch run as a task computes what
 * it computes in turn: one and two threads agree bit for bit, for the
 * whole state after training steps (input gradients included) and for a
 * prediction.  At two threads every job worth splitting at all is split
 * (the thresholds lowered to 1 multiply-add): case 0 (two unbalanced
 * modalities) splits products and runs the attention's blocks as tasks;
 * cases 1 (four modalities, conditional slots) and 2 (three, strict) also
 * run the branches and the alignment's pairs as tasks. */
START_TEST(test_threads_identical) {
  if (!have_bf16()) {
    note_unsupported("threads_identical");
    return;
  }
  const int before = imml_threads_set(0);
  imml_config c;
  if (_i == 0)
    big_config(&c);
  else if (_i == 1)
    branch_config(&c);
  else
    strict_config(&c);
  const int M = c.n_modalities;
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
  snap s[2];
  float *logits[2], *dh[2][4];
  for (int t = 0; t < 2; t++) {
    imml_threads_set(t + 1);
    if (t == 1 && imml_threads_set(0) < 2) {
      fprintf(stderr, "# threads_identical: SKIP (the BLAS ignores thread "
                      "settings)\n");
      snap_free(&s[0]);
      free(logits[0]);
      for (int mm = 0; mm < M; mm++)
        free(dh[0][mm]);
      imml_threads_set(before);
      return;
    }
    imml_model *m = create_ok(&c, NULL);
    if (t == 1)
      m->gemm->start_min_macs = m->gemm->part_min_macs = 1.0;
    ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
    for (int mm = 0; mm < M; mm++)
      dh[t][mm] = xcalloc((size_t)c.max_batch * c.dims[mm], sizeof(float));
    drng r = {3};
    for (int i = 0; i < 4; i++) {
      batch b;
      batch_random(&b, M, c.dims, c.max_batch - i, c.n_classes, &r);
      train_step(m, &b, dh[t]);
      batch_free(&b);
    }
    batch b;
    batch_random(&b, M, c.dims, 100 < c.max_batch ? 100 : c.max_batch,
                 c.n_classes, &r);
    logits[t] = xcalloc((size_t)b.B * c.n_classes, sizeof(float));
    ck_assert_int_eq(imml_predict(m, b.B, feats(&b), logits[t], NULL, NULL),
                     IMML_OK);
    snap_take(m, &s[t]);
    /* two threads ran tasks (the attention's independent products), and
     * cases 1 and 2 their branches among them (forward and backward of
     * each step, and the prediction's forward); one thread ran none */
    ck_assert_msg((m->gemm->tasks_run > 0) == (t == 1),
                  "case %d, %d threads: %ld task jobs", _i, t + 1,
                  m->gemm->tasks_run);
    ck_assert_msg(m->gemm->branch_jobs == (t == 1 && _i > 0 ? 9 : 0),
                  "case %d, %d threads: %ld branch jobs", _i, t + 1,
                  m->gemm->branch_jobs);
    if (t == 1) {
      ck_assert(memcmp(logits[0], logits[1],
                       (size_t)b.B * c.n_classes * sizeof(float)) == 0);
      for (int mm = 0; mm < M; mm++)
        ck_assert_msg(
            memcmp(dh[0][mm], dh[1][mm],
                   (size_t)(c.max_batch - 3) * c.dims[mm] * sizeof(float)) == 0,
            "input gradient of modality %d differs", mm);
    }
    batch_free(&b);
    imml_model_free(m);
  }
  imml_threads_set(before);
  snap_check(&s[0], &s[1], "1 thread against 2");
  for (int t = 0; t < 2; t++) {
    snap_free(&s[t]);
    free(logits[t]);
    for (int mm = 0; mm < M; mm++)
      free(dh[t][mm]);
  }
}
END_TEST

/* Threads of this process (entries of /proc/self/task), or -1. */
static int task_count(void) {
  DIR *d = opendir("/proc/self/task");
  if (!d)
    return -1;
  int n = 0;
  for (const struct dirent *e; (e = readdir(d));)
    n += e->d_name[0] != '.';
  closedir(d);
  return n;
}

/* The process's thread count returns to `base` (a joined thread can stay
 * listed for a moment after its join): 1 if it does within a second. */
static int tasks_back_to(int base) {
  for (int i = 0; i < 1000; i++) {
    if (task_count() == base)
      return 1;
    const struct timespec ms = {0, 1000000};
    nanosleep(&ms, NULL);
  }
  return 0;
}

/* A host F&T that notes the most threads it saw while it ran. */
typedef struct host_seen {
  int most;
} host_seen;

static int seen_forward(void *ud, int training, int B, int M, int k,
                        const float *const *slots, int C, float *logits) {
  (void)training;
  host_seen *h = ud;
  const int n = task_count();
  h->most = n > h->most ? n : h->most;
  for (int i = 0; i < B; i++)
    for (int j = 0; j < C; j++)
      logits[(size_t)i * C + j] = slots[j % M][(size_t)i * k + j % k];
  return 0;
}

static int seen_backward(void *ud, int B, int M, int k,
                         const float *const *slots, const float *dlogits, int C,
                         float *const *dslots) {
  (void)ud;
  for (int mm = 0; mm < M; mm++)
    for (size_t i = 0; i < (size_t)B * k; i++)
      dslots[mm][i] = 0.01f * slots[mm][i] + dlogits[i % ((size_t)B * C)];
  return 0;
}

/* The helpers a call's products start live while the call runs (the host
 * F&T, called after the knowledge network's products, sees them) and are
 * joined before it returns: after imml_forward, imml_backward,
 * imml_predict and imml_fdc_adjust the process has the threads it had. */
START_TEST(test_no_thread_outlives_call) {
  if (!have_bf16()) {
    note_unsupported("no_thread_outlives_call");
    return;
  }
  const int before = imml_threads_set(0);
  if (imml_threads_set(2) < 2 || task_count() < 1) {
    imml_threads_set(before);
    fprintf(stderr, "# no_thread_outlives_call: SKIP (%s)\n",
            task_count() < 1 ? "no /proc/self/task"
                             : "the BLAS ignores thread settings");
    return;
  }
  imml_config c;
  big_config(&c);
  host_seen h = {0};
  imml_ft_ops ops;
  imml_ft_ops_init(&ops);
  ops.forward = seen_forward;
  ops.backward = seen_backward;
  ops.user_data = &h;
  imml_model *m = create_ok(&c, &ops);
  m->gemm->start_min_macs = m->gemm->part_min_macs = 1.0;
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
  ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
  const int base = task_count();
  drng r = {21};
  batch b;
  batch_random(&b, 2, big_dims, c.max_batch, c.n_classes, &r);
  for (int step = 0; step < 2; step++) {
    h.most = 0;
    ck_assert_int_eq(
        imml_forward(m, IMML_MODE_TRAIN, b.B, feats(&b), b.y, NULL, NULL),
        IMML_OK);
    ck_assert_msg(h.most > base, "forward: %d threads inside, %d before",
                  h.most, base);
    ck_assert_msg(tasks_back_to(base), "forward left %d threads, had %d",
                  task_count(), base);
    backward_ok(m, NULL);
    ck_assert_msg(tasks_back_to(base), "backward left %d threads, had %d",
                  task_count(), base);
    ck_assert_int_eq(imml_optim_step(m), IMML_OK);
  }
  h.most = 0;
  ck_assert_int_eq(imml_predict(m, b.B, feats(&b), NULL, NULL, NULL), IMML_OK);
  ck_assert_msg(h.most > base, "predict: %d threads inside, %d before", h.most,
                base);
  ck_assert_msg(tasks_back_to(base), "predict left %d threads, had %d",
                task_count(), base);
  /* fdc_adjust's attention products, on the fixed predominant modality */
  const int k = c.knowledge_dim;
  float *z[2], *slots[2];
  for (int mm = 0; mm < 2; mm++) {
    z[mm] = xcalloc((size_t)b.B * k, sizeof(float));
    slots[mm] = xcalloc((size_t)b.B * k, sizeof(float));
    for (size_t i = 0; i < (size_t)b.B * k; i++)
      z[mm][i] = drng_unif(&r);
  }
  ck_assert_int_eq(
      imml_fdc_adjust(m, b.B, (const float *const *)z, (float *const *)slots),
      IMML_OK);
  ck_assert_msg(tasks_back_to(base), "fdc_adjust left %d threads, had %d",
                task_count(), base);
  for (int mm = 0; mm < 2; mm++) {
    free(z[mm]);
    free(slots[mm]);
  }
  batch_free(&b);
  imml_model_free(m);
  imml_threads_set(before);
}
END_TEST

typedef struct share_job {
  imml_model *share;
  const batch *b;
  float *out;
  int reps;
  imml_status st;
} share_job;

static void *share_run(void *arg) {
  share_job *j = arg;
  j->st = IMML_OK;
  for (int i = 0; i < j->reps && j->st == IMML_OK; i++)
    j->st = imml_predict(j->share, j->b->B, feats(j->b), j->out, NULL, NULL);
  return NULL;
}

/* Two shares predict at once on two threads, each with its own product
 * scratch: both get what the model alone gives. */
START_TEST(test_shares_concurrent) {
  if (!have_bf16()) {
    note_unsupported("shares_concurrent");
    return;
  }
  imml_config c;
  big_config(&c);
  imml_model *m = create_ok(&c, NULL);
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
  ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
  drng r = {9};
  batch b[2];
  for (int i = 0; i < 3; i++) {
    batch t;
    batch_random(&t, 2, big_dims, c.max_batch, c.n_classes, &r);
    train_step(m, &t, NULL);
    batch_free(&t);
  }
  const size_t nl = (size_t)c.max_batch * c.n_classes;
  float *want[2], *got[2];
  share_job job[2];
  pthread_t tid[2];
  for (int i = 0; i < 2; i++) {
    batch_random(&b[i], 2, big_dims, c.max_batch - 17 * i, c.n_classes, &r);
    want[i] = xcalloc(nl, sizeof(float));
    got[i] = xcalloc(nl, sizeof(float));
    ck_assert_int_eq(imml_predict(m, b[i].B, feats(&b[i]), want[i], NULL, NULL),
                     IMML_OK);
    imml_model *sh = NULL;
    ck_assert_int_eq(imml_model_share(m, &sh), IMML_OK);
    ck_assert_ptr_nonnull(sh->gemm);
    ck_assert_ptr_ne(sh->gemm, m->gemm);
    job[i] = (share_job){sh, &b[i], got[i], 5, IMML_OK};
  }
  for (int i = 0; i < 2; i++)
    ck_assert_int_eq(pthread_create(&tid[i], NULL, share_run, &job[i]), 0);
  for (int i = 0; i < 2; i++) {
    pthread_join(tid[i], NULL);
    ck_assert_int_eq(job[i].st, IMML_OK);
    ck_assert(memcmp(want[i], got[i],
                     (size_t)b[i].B * c.n_classes * sizeof(float)) == 0);
    imml_model_free(job[i].share);
    batch_free(&b[i]);
    free(want[i]);
    free(got[i]);
  }
  imml_model_free(m);
}
END_TEST

/* Allocations through the model's hooks, counted. */
typedef struct hook_count {
  long mallocs, frees;
} hook_count;

static void *hook_malloc(size_t n, void *ud) {
  ((hook_count *)ud)->mallocs++;
  return malloc(n);
}

static void hook_free(void *p, void *ud) {
  ((hook_count *)ud)->frees++;
  free(p);
}

/* From the first timed step to the last: training steps (forward,
 * backward with input gradients, commit, AdamW), a prediction on the
 * model and one on a share, at two threads so that products split.  The
 * allocator hooks see nothing; nor does the process's malloc.  float32
 * first, bf16 second (when this machine runs it). */
START_TEST(test_no_alloc) {
  const int before = imml_threads_set(0);
  for (int prec = 0; prec < 2; prec++) {
    if (prec == 1 && !have_bf16()) {
      note_unsupported("no_alloc");
      break;
    }
    /* float32 at one thread: OpenBLAS's threaded sgemm (Debian's 0.3.21,
     * pthreads) mallocs its job array in every call, which no setting of
     * libimml's can avoid; bf16 at two, its own threads */
    imml_threads_set(prec ? 2 : 1);
    hook_count hc = {0, 0};
    imml_config c;
    big_config(&c);
    c.precision = prec ? IMML_PRECISION_BF16 : IMML_PRECISION_FP32;
    c.allocator.malloc_fn = hook_malloc;
    c.allocator.free_fn = hook_free;
    c.allocator.user_data = &hc;
    imml_model *m = create_ok(&c, NULL);
    imml_optim_config oc;
    imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
    ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
    imml_model *sh = NULL;
    ck_assert_int_eq(imml_model_share(m, &sh), IMML_OK);
    drng r = {21};
    batch b[4];
    float *dh[4][2];
    for (int i = 0; i < 4; i++) {
      batch_random(&b[i], 2, big_dims, c.max_batch - 9 * (i % 2), c.n_classes,
                   &r);
      dfeat_alloc(dh[i], &b[i]);
    }
    float *logits = xcalloc((size_t)c.max_batch * c.n_classes, sizeof(float));
    /* warm-up: the first thread start, the first call of everything */
    train_step(m, &b[0], dh[0]);
    ck_assert_int_eq(imml_predict(sh, b[0].B, feats(&b[0]), logits, NULL, NULL),
                     IMML_OK);
    const long hooks0 = hc.mallocs + hc.frees;
#if defined(HAVE_INTERPOSER)
    __atomic_store_n(&counted, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&counting, 1, __ATOMIC_RELAXED);
#endif
    /* no Check assertion inside the window: a passing one messages the
     * runner, which allocates */
    int failed = 0;
    for (int i = 1; i < 4; i++) {
      failed |= imml_forward(m, IMML_MODE_TRAIN, b[i].B, feats(&b[i]), b[i].y,
                             NULL, NULL) != IMML_OK;
      failed |= imml_backward(m, dh[i]) != IMML_OK;
      failed |= imml_commit(m) != IMML_OK;
      failed |= imml_optim_step(m) != IMML_OK;
      failed |=
          imml_predict(m, b[i].B, feats(&b[i]), logits, NULL, NULL) != IMML_OK;
      failed |=
          imml_predict(sh, b[i].B, feats(&b[i]), logits, NULL, NULL) != IMML_OK;
    }
#if defined(HAVE_INTERPOSER)
    __atomic_store_n(&counting, 0, __ATOMIC_RELAXED);
#endif
    ck_assert_msg(!failed, "a call failed: %s / %s", imml_model_errmsg(m),
                  imml_model_errmsg(sh));
#if defined(HAVE_INTERPOSER)
    const long seen = __atomic_load_n(&counted, __ATOMIC_RELAXED);
    ck_assert_msg(seen == 0, "%s steps: %ld allocations in the process",
                  prec ? "bf16" : "float32", seen);
#else
    fprintf(stderr, "# no_alloc: no malloc interposer in this build "
                    "(sanitizer): the allocator hooks only\n");
#endif
    ck_assert_msg(hc.mallocs + hc.frees == hooks0,
                  "%s steps: %ld allocator-hook calls", prec ? "bf16" : "fp32",
                  hc.mallocs + hc.frees - hooks0);
    imml_model_free(sh);
    imml_model_free(m);
    ck_assert_int_eq(hc.mallocs, hc.frees);
    for (int i = 0; i < 4; i++) {
      dfeat_free(dh[i], 2);
      batch_free(&b[i]);
    }
    free(logits);
  }
  imml_threads_set(before);
}
END_TEST

#if defined(HAVE_INTERPOSER)
/* The interposer counts: a malloc inside the window is seen (so a zero
 * above means something). */
START_TEST(test_interposer_counts) {
  __atomic_store_n(&counted, 0, __ATOMIC_RELAXED);
  __atomic_store_n(&counting, 1, __ATOMIC_RELAXED);
  void *volatile p = malloc(24);
  void *q = NULL;
  const int rc = posix_memalign(&q, 64, 100);
  __atomic_store_n(&counting, 0, __ATOMIC_RELAXED);
  ck_assert_int_eq(rc, 0);
  free(p);
  free(q);
  ck_assert_int_eq(__atomic_load_n(&counted, __ATOMIC_RELAXED), 2);
}
END_TEST
#endif

/* A bf16 model's checkpoint is an ordinary one: it loads (as float32,
 * FORMAT.md), with the same parameters and dictionary, and saves again to
 * the same bytes. */
START_TEST(test_checkpoint_unchanged) {
  if (!have_bf16()) {
    note_unsupported("checkpoint_unchanged");
    return;
  }
  imml_config c;
  big_config(&c);
  c.predominant = -1;
  c.warmup_steps = 2;
  imml_model *m = create_ok(&c, NULL);
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
  ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
  drng r = {4};
  for (int i = 0; i < 4; i++) {
    batch b;
    batch_random(&b, 2, big_dims, c.max_batch, c.n_classes, &r);
    train_step(m, &b, NULL);
    batch_free(&b);
  }
  imml_config got;
  imml_config_init(&got);
  ck_assert_int_eq(imml_model_get_config(m, &got), IMML_OK);
  ck_assert_int_eq(got.precision, IMML_PRECISION_BF16);
  size_t n1 = 0, n2 = 0;
  ck_assert_int_eq(imml_model_save_mem(m, NULL, 0, &n1), IMML_OK);
  unsigned char *b1 = xcalloc(n1, 1);
  ck_assert_int_eq(imml_model_save_mem(m, b1, n1, &n1), IMML_OK);
  imml_model *l = NULL;
  ck_assert_int_eq(imml_model_load_mem(b1, n1, NULL, NULL, &l), IMML_OK);
  ck_assert_int_eq(imml_model_get_config(l, &got), IMML_OK);
  ck_assert_int_eq(got.precision, IMML_PRECISION_FP32);
  ck_assert_ptr_null(l->gemm);
  snap sm, sl;
  snap_take(m, &sm);
  snap_take(l, &sl);
  ck_assert(memcmp(sm.params, sl.params, sm.n * sizeof(float)) == 0);
  ck_assert(memcmp(sm.dict, sl.dict, sm.ndict * sizeof(float)) == 0);
  ck_assert(memcmp(sm.m1, sl.m1, sm.n * sizeof(float)) == 0);
  ck_assert_int_eq(imml_model_save_mem(l, NULL, 0, &n2), IMML_OK);
  ck_assert_uint_eq(n1, n2);
  unsigned char *b2 = xcalloc(n2, 1);
  ck_assert_int_eq(imml_model_save_mem(l, b2, n2, &n2), IMML_OK);
  ck_assert(memcmp(b1, b2, n1) == 0);
  snap_free(&sm);
  snap_free(&sl);
  free(b1);
  free(b2);
  imml_model_free(l);
  imml_model_free(m);
}
END_TEST

/* Where this build or CPU cannot run bf16 (valgrind's synthetic CPU has
 * no AVX-512), creation is refused with IMML_ERR_UNSUPPORTED, a failed
 * handle and a message naming the field and the reason; where it can, a
 * bf16 model is created with its own product context, a float32 one with
 * none. */
START_TEST(test_refused_or_created) {
  imml_config c;
  const int dims[2] = {5, 4};
  small_config(&c, 2, dims, 6, 4, 3, 8, 10);
  imml_model *f = create_ok(&c, NULL);
  ck_assert_ptr_null(f->gemm);
  imml_model_free(f);
  c.precision = IMML_PRECISION_BF16;
  char why[200];
  if (imml_bf16_supported(why, sizeof why)) {
    imml_model *m = create_ok(&c, NULL);
    ck_assert_ptr_nonnull(m->gemm);
    ck_assert_int_eq(m->gemm->bf16, 1);
    imml_model_free(m);
    return;
  }
  ck_assert(why[0] != '\0');
  char msg[IMML_ERRMSG_SIZE];
  create_fails(&c, NULL, IMML_ERR_UNSUPPORTED, msg, sizeof msg);
  ck_assert_msg(strstr(msg, "precision") && strstr(msg, why),
                "message \"%s\" does not name the field and \"%s\"", msg, why);
  fprintf(stderr, "# refused as expected: %s\n", msg);
}
END_TEST

/* The memory limit counts a bf16 model's scratch: a limit just under
 * what the model needs refuses it, naming the scratch. */
START_TEST(test_memory_limit_counts_scratch) {
  if (!have_bf16()) {
    note_unsupported("memory_limit_counts_scratch");
    return;
  }
  imml_config c;
  const int dims[2] = {5, 5}; /* balanced: work memory for tasks */
  small_config(&c, 2, dims, 6, 4, 3, 8, 10);
  imml_model *f = create_ok(&c, NULL);
  const size_t arena = f->arena_bytes;
  imml_model_free(f);
  c.precision = IMML_PRECISION_BF16;
  /* with each thread's work memory for a branch's backward */
  const size_t ctx = imml_bf16_ctx_bytes(mdken_ctx_work_floats(&c));
  ck_assert_uint_gt(ctx, imml_bf16_ctx_bytes(0));
  c.memory_limit = arena + ctx - 1;
  char msg[IMML_ERRMSG_SIZE];
  create_fails(&c, NULL, IMML_ERR_TOO_LARGE, msg, sizeof msg);
  ck_assert_msg(strstr(msg, "bf16 scratch") != NULL, "%s", msg);
  c.memory_limit = arena + ctx;
  imml_model_free(create_ok(&c, NULL));
}
END_TEST

static Suite *bf16_suite(void) {
  Suite *s = suite_create("bf16");
  TCase *tc = tcase_create("round");
  tcase_add_test(tc, test_round_software);
  tcase_add_test(tc, test_round_kernel);
  suite_add_tcase(s, tc);
  tc = tcase_create("gemm");
  tcase_add_loop_test(tc, test_gemm_reference, 0, N_GEMM_SHAPES);
  tcase_add_test(tc, test_kgemm_dispatch);
  suite_add_tcase(s, tc);
  tc = tcase_create("grid");
  tcase_add_loop_test(tc, test_grid, 0, N_GRID);
  tcase_add_loop_test(tc, test_wide, 0, 4);
  suite_add_tcase(s, tc);
  tc = tcase_create("model");
  tcase_add_test(tc, test_refused_or_created);
  tcase_add_test(tc, test_memory_limit_counts_scratch);
  tcase_add_loop_test(tc, test_threads_identical, 0, 3);
  tcase_add_test(tc, test_no_thread_outlives_call);
  tcase_add_test(tc, test_shares_concurrent);
#if defined(HAVE_INTERPOSER)
  tcase_add_test(tc, test_interposer_counts);
#endif
  tcase_add_test(tc, test_no_alloc);
  tcase_add_test(tc, test_checkpoint_unchanged);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) { return imml_run_suite(bf16_suite()); }
