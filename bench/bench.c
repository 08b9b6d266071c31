/* libimml benchmark: median time of one full training step (forward with
 * every loss term, backward with input gradients, commit, AdamW step) and of
 * one inference forward, for the shapes of doc/PERFORMANCE.md; plus the share
 * of the step spent inside the matrix products and their ceiling on this
 * machine: cblas_sgemm in float32, the library's bf16 kernel with
 * --precision bf16 (and oneDNN's bf16 matmul next to it when the build found
 * oneDNN, -Ddnnl).
 *
 * usage: bench [--shape NAME] [--reps N] [--threads N] [--csv] [--rss]
 *              [--gemms] [--precision fp32|bf16]
 *
 * --rss reports, for each shape run, the growth of the peak resident set
 * from just before the model is created (BLAS already warmed up) to the end
 * of training, next to the bytes the method needs: parameters, gradients,
 * AdamW's two moments, and the activations a training step keeps.
 * --gemms lists the timed training steps' sgemm calls by shape: how many
 * per step, their time and rate.
 *
 * The time spent in cblas_sgemm is measured by interposing the symbol: this
 * executable defines cblas_sgemm, which the dynamic linker binds libimml's
 * calls to, times the call and forwards it to the BLAS library's own.  The
 * bf16 kernel is internal to the library, so this executable links the
 * library's objects (not libimml.so) with -Wl,--wrap=imml_bf16_gemm, and
 * __wrap_imml_bf16_gemm below times each call the same way. */

#define IMML_EXPERIMENTAL /* imml_threads_set */
#include <imml.h>

#include "bf16.h" /* lib/: the kernel, for the wrapper and the ceiling */

#include <cblas.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(IMML_BENCH_DNNL)
#include <oneapi/dnnl/dnnl.h>
#endif

char *openblas_get_corename(void);

typedef void (*sgemm_fn)(const enum CBLAS_ORDER, const enum CBLAS_TRANSPOSE,
                         const enum CBLAS_TRANSPOSE, const blasint,
                         const blasint, const blasint, const float,
                         const float *, const blasint, const float *,
                         const blasint, const float, float *, const blasint);

static sgemm_fn real_sgemm;
/* time and flops inside the matrix products (sgemm or the bf16 kernel)
 * called from the thread that runs the step.  A product split across the
 * library's helpers counts whole, with its wall time; but where a bf16
 * model runs its branches as tasks (lib/mdken.c), the products a helper
 * runs are not counted: the share is then that of the step thread's time,
 * and the rate that of the products it ran itself */
static double sgemm_seconds;
static double sgemm_flops;
static pthread_t step_thread;

/* Optional per-shape log of the timed steps' sgemm calls (--gemms). */
typedef struct gemm_entry {
  enum CBLAS_TRANSPOSE ta, tb;
  int m, n, k;
  long calls;
  double seconds;
} gemm_entry;
#define GEMM_LOG_MAX 128
static gemm_entry gemm_log[GEMM_LOG_MAX];
static int n_gemm_log, gemm_log_on, want_gemm_log;

/* Adds one timed product to the --gemms log, by transposes and shape. */
static void gemm_log_add(enum CBLAS_TRANSPOSE ta, enum CBLAS_TRANSPOSE tb,
                         int m, int n, int k, double dt) {
  int i = 0;
  while (i < n_gemm_log &&
         !(gemm_log[i].ta == ta && gemm_log[i].tb == tb && gemm_log[i].m == m &&
           gemm_log[i].n == n && gemm_log[i].k == k))
    i++;
  if (i == n_gemm_log) {
    if (n_gemm_log == GEMM_LOG_MAX)
      return;
    gemm_log[n_gemm_log++] = (gemm_entry){ta, tb, m, n, k, 0, 0.0};
  }
  gemm_log[i].calls++;
  gemm_log[i].seconds += dt;
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void cblas_sgemm(const enum CBLAS_ORDER order, const enum CBLAS_TRANSPOSE ta,
                 const enum CBLAS_TRANSPOSE tb, const blasint m,
                 const blasint n, const blasint k, const float alpha,
                 const float *a, const blasint lda, const float *b,
                 const blasint ldb, const float beta, float *c,
                 const blasint ldc) {
  const double t0 = now();
  real_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  const double dt = now() - t0;
  sgemm_seconds += dt;
  sgemm_flops += 2.0 * m * n * k;
  if (gemm_log_on)
    gemm_log_add(ta, tb, m, n, k, dt);
}

void __real_imml_bf16_gemm(struct k_ctx *ctx, int threads, int trans_a,
                           int trans_b, int m, int n, int kk, float alpha,
                           const float *a, int lda, const float *b, int ldb,
                           float beta, float *c, int ldc);
void __wrap_imml_bf16_gemm(struct k_ctx *ctx, int threads, int trans_a,
                           int trans_b, int m, int n, int kk, float alpha,
                           const float *a, int lda, const float *b, int ldb,
                           float beta, float *c, int ldc);

/* The library's calls of its bf16 kernel, timed (--wrap). */
void __wrap_imml_bf16_gemm(struct k_ctx *ctx, int threads, int trans_a,
                           int trans_b, int m, int n, int kk, float alpha,
                           const float *a, int lda, const float *b, int ldb,
                           float beta, float *c, int ldc) {
  if (!pthread_equal(pthread_self(), step_thread)) {
    __real_imml_bf16_gemm(ctx, threads, trans_a, trans_b, m, n, kk, alpha, a,
                          lda, b, ldb, beta, c, ldc);
    return;
  }
  const double t0 = now();
  __real_imml_bf16_gemm(ctx, threads, trans_a, trans_b, m, n, kk, alpha, a, lda,
                        b, ldb, beta, c, ldc);
  const double dt = now() - t0;
  sgemm_seconds += dt;
  sgemm_flops += 2.0 * m * n * kk;
  if (gemm_log_on)
    gemm_log_add(trans_a ? CblasTrans : CblasNoTrans,
                 trans_b ? CblasTrans : CblasNoTrans, m, n, kk, dt);
}

/* --gemms: the step's products grouped by shape, per training step. */
static void print_gemm_log(int steps) {
  printf("# matrix products per training step: op(A) op(B) m n k, calls, "
         "ms, GFLOP/s\n");
  for (int i = 0; i < n_gemm_log; i++) {
    const gemm_entry *e = &gemm_log[i];
    printf("#   %c%c %5d %5d %5d  %3.0f  %7.3f  %6.1f\n",
           e->ta == CblasTrans ? 'T' : 'N', e->tb == CblasTrans ? 'T' : 'N',
           e->m, e->n, e->k, (double)e->calls / steps, 1e3 * e->seconds / steps,
           2.0 * e->m * e->n * e->k * (double)e->calls / e->seconds * 1e-9);
  }
  n_gemm_log = 0;
}

typedef struct shape {
  const char *name;
  int M, B, dims[4], H, k, C, J;
} shape;

static const shape shapes[] = {
    {"small", 2, 64, {216, 6}, 256, 128, 10, 256},
    {"paper", 2, 64, {768, 6144}, 512, 256, 101, 256},
    {"large-batch", 2, 512, {768, 2048}, 512, 256, 101, 256},
    {"many-modalities", 4, 128, {512, 512, 256, 64}, 256, 128, 20, 256},
};

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;
static float frand(void) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return (float)((rng_state >> 40) * 0x1.0p-24) * 2.0f - 1.0f;
}

static int cmp_double(const void *a, const void *b) {
  const double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double median(double *v, int n) {
  qsort(v, (size_t)n, sizeof *v, cmp_double);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void die(const char *what, imml_status st, imml_model *m) {
  fprintf(stderr, "bench: %s: %s: %s\n", what, imml_status_string(st),
          imml_model_errmsg(m));
  imml_model_free(m);
  exit(1);
}

/* Measured sgemm rate on the paper-scale layer, the ceiling libimml can
 * approach: C (64 x 512) = A (64 x 6144) B (6144 x 512) and its backward
 * shapes. */
static double sgemm_ceiling(int reps) {
  const int m = 64, n = 512, k = 6144;
  float *a = malloc(sizeof(float) * m * k), *b = malloc(sizeof(float) * k * n),
        *c = malloc(sizeof(float) * m * n), *d = malloc(sizeof(float) * k * n);
  for (int i = 0; i < m * k; i++)
    a[i] = frand();
  for (int i = 0; i < k * n; i++)
    b[i] = frand();
  double *t = malloc(sizeof(double) * (size_t)reps);
  for (int r = -3; r < reps; r++) {
    const double t0 = now();
    real_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, a, k,
               b, n, 0.0f, c, n);
    real_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, k, n, m, 1.0f, a, k, c,
               n, 1.0f, d, n);
    real_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, k, n, 1.0f, c, n, b,
               n, 0.0f, a, k);
    if (r >= 0)
      t[r] = now() - t0;
  }
  const double s = median(t, reps);
  free(a);
  free(b);
  free(c);
  free(d);
  free(t);
  return 3.0 * 2.0 * m * n * k / s / 1e9;
}

/* The same three products through the library's bf16 kernel (operands
 * rounded in the call, as in a step), at the benchmark's thread count. */
static double bf16_ceiling(int reps, int threads) {
  const int m = 64, n = 512, k = 6144;
  float *a = malloc(sizeof(float) * m * k), *b = malloc(sizeof(float) * k * n),
        *c = malloc(sizeof(float) * m * n), *d = malloc(sizeof(float) * k * n);
  const imml_allocator plain = {NULL, NULL, NULL};
  struct k_ctx *ctx = imml_bf16_ctx_create(&plain, 0);
  if (!ctx) {
    fprintf(stderr, "bench: out of memory\n");
    exit(1);
  }
  for (int i = 0; i < m * k; i++)
    a[i] = frand();
  for (int i = 0; i < k * n; i++)
    b[i] = d[i] = frand();
  double *t = malloc(sizeof(double) * (size_t)reps);
  for (int r = -3; r < reps; r++) {
    const double t0 = now();
    __real_imml_bf16_gemm(ctx, threads, 0, 0, m, n, k, 1.0f, a, k, b, n, 0.0f,
                          c, n);
    __real_imml_bf16_gemm(ctx, threads, 1, 0, k, n, m, 1.0f, a, k, c, n, 1.0f,
                          d, n);
    __real_imml_bf16_gemm(ctx, threads, 0, 1, m, k, n, 1.0f, c, n, b, n, 0.0f,
                          a, k);
    if (r >= 0)
      t[r] = now() - t0;
  }
  const double s = median(t, reps);
  free(a);
  free(b);
  free(c);
  free(d);
  imml_bf16_ctx_free(&plain, ctx);
  free(t);
  return 3.0 * 2.0 * m * n * k / s / 1e9;
}

#if defined(IMML_BENCH_DNNL)
/* oneDNN's bf16 matmul (bf16 operands already rounded and laid out, float32
 * result, the primitive created once) on the same three products, with the
 * threads its OpenMP runtime has (OMP_NUM_THREADS): the rate of the library
 * PyTorch's bf16 autocast calls, for reference.  0 if a call fails. */
static double dnnl_ceiling(int reps) {
  const int64_t m = 64, n = 512, k = 6144;
  /* (M, K, N) of each product and the strides of its A (M x K) and B
   * (K x N): NN, then TN and NT, whose transposed operand is read through
   * its strides */
  const int64_t shp[3][3] = {{m, k, n}, {k, m, n}, {m, n, k}};
  const int64_t sa[3][2] = {{k, 1}, {1, k}, {n, 1}};
  const int64_t sb[3][2] = {{n, 1}, {n, 1}, {1, n}};
  dnnl_engine_t eng = NULL;
  dnnl_stream_t str = NULL;
  dnnl_primitive_t prim[3] = {NULL, NULL, NULL};
  dnnl_memory_t mem[3][3] = {{NULL}};
  void *buf[3][3] = {{NULL}};
  double rate = 0.0, *t = malloc(sizeof(double) * (size_t)reps);
  int ok =
      dnnl_engine_create(&eng, dnnl_cpu, 0) == dnnl_success &&
      dnnl_stream_create(&str, eng, dnnl_stream_default_flags) == dnnl_success;
  for (int p = 0; p < 3 && ok; p++) {
    const int64_t M = shp[p][0], K = shp[p][1], N = shp[p][2];
    dnnl_memory_desc_t md[3];
    const dnnl_dims_t da = {M, K}, db = {K, N}, dc = {M, N};
    const dnnl_dims_t xa = {sa[p][0], sa[p][1]}, xb = {sb[p][0], sb[p][1]};
    ok = dnnl_memory_desc_init_by_strides(&md[0], 2, da, dnnl_bf16, xa) ==
             dnnl_success &&
         dnnl_memory_desc_init_by_strides(&md[1], 2, db, dnnl_bf16, xb) ==
             dnnl_success &&
         dnnl_memory_desc_init_by_tag(&md[2], 2, dc, dnnl_f32, dnnl_ab) ==
             dnnl_success;
    dnnl_matmul_desc_t mm;
    dnnl_primitive_desc_t pd = NULL;
    ok =
        ok &&
        dnnl_matmul_desc_init(&mm, &md[0], &md[1], NULL, &md[2]) ==
            dnnl_success &&
        dnnl_primitive_desc_create(&pd, &mm, NULL, eng, NULL) == dnnl_success &&
        dnnl_primitive_create(&prim[p], pd) == dnnl_success;
    if (pd)
      dnnl_primitive_desc_destroy(pd);
    for (int i = 0; i < 3 && ok; i++) {
      const size_t bytes = dnnl_memory_desc_get_size(&md[i]);
      buf[p][i] = aligned_alloc(64, (bytes + 63) / 64 * 64);
      memset(buf[p][i], 0x3f, bytes); /* bf16 0x3f3f = 0.746 */
      ok = dnnl_memory_create(&mem[p][i], &md[i], eng, buf[p][i]) ==
           dnnl_success;
    }
  }
  for (int r = -3; r < reps && ok; r++) {
    const double t0 = now();
    for (int p = 0; p < 3 && ok; p++) {
      dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, mem[p][0]},
                                 {DNNL_ARG_WEIGHTS, mem[p][1]},
                                 {DNNL_ARG_DST, mem[p][2]}};
      ok = dnnl_primitive_execute(prim[p], str, 3, args) == dnnl_success;
    }
    ok = ok && dnnl_stream_wait(str) == dnnl_success;
    if (r >= 0)
      t[r] = now() - t0;
  }
  if (ok)
    rate = 3.0 * 2.0 * (double)m * n * k / median(t, reps) / 1e9;
  for (int p = 0; p < 3; p++) {
    if (prim[p])
      dnnl_primitive_destroy(prim[p]);
    for (int i = 0; i < 3; i++) {
      if (mem[p][i])
        dnnl_memory_destroy(mem[p][i]);
      free(buf[p][i]);
    }
  }
  if (str)
    dnnl_stream_destroy(str);
  if (eng)
    dnnl_engine_destroy(eng);
  free(t);
  return rate;
}
#endif

/* A field of /proc/self/status in bytes (VmRSS: now, VmHWM: peak), or -1. */
static double proc_status_bytes(const char *field) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  double v = -1.0;
  const size_t n = strlen(field);
  while (f && fgets(line, sizeof line, f))
    if (!strncmp(line, field, n) && line[n] == ':')
      v = 1024.0 * atof(line + n + 1);
  if (f)
    fclose(f);
  return v;
}

/* Resets the peak (VmHWM) to the current resident set (Linux >= 4.0). */
static void reset_peak_rss(void) {
  FILE *f = fopen("/proc/self/clear_refs", "w");
  if (f) {
    fputs("5", f);
    fclose(f);
  }
}

/* Floats of the activations a training step must keep for its backward
 * (doc/PERFORMANCE.md): per modality the input copy, u, z, unimodal logits
 * and probabilities, normalised z, and S and its transpose per auxiliary;
 * the attention's q, keys, weights; slots, logits, probabilities. */
static double activation_floats(const shape *s) {
  double f = 0.0;
  for (int i = 0; i < s->M; i++)
    f += (double)s->B * (s->dims[i] + s->H + 3.0 * s->k + 2.0 * s->C + 1.0);
  f += (double)(s->M - 1) * 2.0 * s->B * s->B;
  f += (double)s->B * s->k + (double)s->J * s->k + 2.0 * s->B * s->J;
  f += 2.0 * s->B * s->C;
  return f;
}

static void run_shape(const shape *s, int reps, int threads, int csv,
                      double ceiling, int rss, int precision,
                      double ref_ceiling) {
  reset_peak_rss();
  const double rss0 = proc_status_bytes("VmRSS");
  imml_config cfg;
  imml_config_init(&cfg);
  cfg.n_modalities = s->M;
  cfg.dims = s->dims;
  cfg.hidden_dim = s->H;
  cfg.knowledge_dim = s->k;
  cfg.n_classes = s->C;
  cfg.max_batch = s->B;
  cfg.dict_size = s->J;
  cfg.predominant = 0; /* no warm-up: every step runs the full method */
  cfg.precision = precision;
  imml_model *m = NULL;
  imml_status st = imml_model_create(&cfg, NULL, &m);
  if (st != IMML_OK)
    die("create", st, m); /* m: the failed handle holding the message */
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
  if ((st = imml_optim_setup(m, &oc)) != IMML_OK)
    die("optim", st, m);
  float *x[4], *dx[4];
  for (int i = 0; i < s->M; i++) {
    const size_t n = (size_t)s->B * s->dims[i];
    x[i] = malloc(n * sizeof(float));
    dx[i] = malloc(n * sizeof(float));
    for (size_t j = 0; j < n; j++)
      x[i][j] = frand();
  }
  int *y = malloc(sizeof(int) * (size_t)s->B);
  for (int i = 0; i < s->B; i++)
    y[i] = i % s->C;
  float *logits = malloc(sizeof(float) * (size_t)s->B * s->C);
  double *t_train = malloc(sizeof(double) * (size_t)reps);
  double *t_infer = malloc(sizeof(double) * (size_t)reps);
  double *t_gemm = malloc(sizeof(double) * (size_t)reps);
  double gemm_flops = 0.0;
  /* the first steps fill the dictionary, so the timed ones attend over J */
  const int warm = s->J / s->B + 3;
  for (int r = -warm; r < reps; r++) {
    sgemm_seconds = 0.0;
    sgemm_flops = 0.0;
    gemm_log_on = want_gemm_log && r >= 0;
    const double t0 = now();
    if ((st = imml_forward(m, IMML_MODE_TRAIN, s->B, (const float *const *)x, y,
                           logits, NULL)) != IMML_OK)
      die("forward", st, m);
    if ((st = imml_backward(m, dx)) != IMML_OK)
      die("backward", st, m);
    if ((st = imml_commit(m)) != IMML_OK)
      die("commit", st, m);
    if ((st = imml_optim_step(m)) != IMML_OK)
      die("step", st, m);
    const double t1 = now();
    gemm_log_on = 0;
    if (r >= 0) {
      t_train[r] = t1 - t0;
      t_gemm[r] = sgemm_seconds;
      gemm_flops = sgemm_flops;
    }
  }
  for (int r = -3; r < reps; r++) {
    const double t0 = now();
    if ((st = imml_forward(m, IMML_MODE_EVAL, s->B, (const float *const *)x,
                           NULL, logits, NULL)) != IMML_OK)
      die("eval", st, m);
    if (r >= 0)
      t_infer[r] = now() - t0;
  }
  const double train = median(t_train, reps), infer = median(t_infer, reps),
               gemm = median(t_gemm, reps);
  const double rate = gemm_flops / train / 1e9;
  if (rss) {
    size_t n_params = 0;
    imml_param_flat(m, NULL, NULL, &n_params);
    const double need = 4.0 * (4.0 * (double)n_params + activation_floats(s));
    const double grew = proc_status_bytes("VmHWM") - rss0;
    printf("%s: peak RSS grew by %.1f MiB; parameters + gradients + AdamW "
           "moments + activations = %.1f MiB; ratio %.2f\n",
           s->name, grew / 1048576.0, need / 1048576.0, grew / need);
  }
  const char *pname = precision == IMML_PRECISION_BF16 ? "bf16" : "fp32";
  /* rate inside the products alone (flops over the time in them) */
  const double in_rate = gemm > 0.0 ? gemm_flops / gemm / 1e9 : 0.0;
  if (csv)
    printf("%s,%d,%.4f,%.4f,%.3f,%.2f,%.2f,%s,%s,%.2f,%.2f\n", s->name, threads,
           1e3 * train, 1e3 * infer, gemm / train, rate, ceiling,
           openblas_get_corename(), pname, in_rate, ref_ceiling);
  else
    printf("%-16s %s threads %d  train step %8.3f ms  inference %7.3f ms  "
           "in products %4.1f%% at %6.1f GFLOP/s  step %6.1f GFLOP/s "
           "(ceiling %.1f%s)\n",
           s->name, pname, threads, 1e3 * train, 1e3 * infer,
           100.0 * gemm / train, in_rate, rate, ceiling,
           ref_ceiling > 0.0 ? ", oneDNN bf16 matmul" : "");
  if (!csv && ref_ceiling > 0.0)
    printf("%-16s oneDNN bf16 matmul on the ceiling's products: %.1f "
           "GFLOP/s\n",
           "", ref_ceiling);
  for (int i = 0; i < s->M; i++) {
    free(x[i]);
    free(dx[i]);
  }
  free(y);
  free(logits);
  free(t_train);
  free(t_infer);
  free(t_gemm);
  imml_model_free(m);
  if (want_gemm_log)
    print_gemm_log(reps);
}

int main(int argc, char **argv) {
  step_thread = pthread_self();
  const char *only = NULL;
  int reps = 30, threads = 0, csv = 0, rss = 0, precision = IMML_PRECISION_FP32;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--shape") && i + 1 < argc)
      only = argv[++i];
    else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
      reps = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
      threads = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--csv"))
      csv = 1;
    else if (!strcmp(argv[i], "--rss"))
      rss = 1;
    else if (!strcmp(argv[i], "--gemms"))
      want_gemm_log = 1;
    else if (!strcmp(argv[i], "--precision") && i + 1 < argc &&
             (!strcmp(argv[i + 1], "fp32") || !strcmp(argv[i + 1], "bf16")))
      precision = !strcmp(argv[++i], "bf16") ? IMML_PRECISION_BF16
                                             : IMML_PRECISION_FP32;
    else {
      fprintf(stderr, "usage: bench [--shape NAME] [--reps N] [--threads N] "
                      "[--csv] [--rss] [--gemms] [--precision fp32|bf16]\n");
      return 2;
    }
  }
  if (reps < 1)
    reps = 1;
  real_sgemm = (sgemm_fn)(uintptr_t)dlsym(RTLD_NEXT, "cblas_sgemm");
  if (!real_sgemm) {
    fprintf(stderr, "bench: cannot find the BLAS library's cblas_sgemm\n");
    return 1;
  }
  threads = imml_threads_set(threads);
  char why[200];
  if (precision == IMML_PRECISION_BF16 &&
      !imml_bf16_supported(why, sizeof why)) {
    fprintf(stderr, "bench: --precision bf16: %s\n", why);
    return 1;
  }
  /* the ceiling of the products this run uses; in bf16 also oneDNN's */
  const int creps = reps < 20 ? reps : 20;
  double ceiling = 0.0, ref_ceiling = 0.0;
  if (precision == IMML_PRECISION_BF16) {
    ceiling = bf16_ceiling(creps, threads);
#if defined(IMML_BENCH_DNNL)
    ref_ceiling = dnnl_ceiling(creps);
#endif
  } else {
    ceiling = sgemm_ceiling(creps);
  }
  int ran = 0;
  for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
    if (only && strcmp(only, shapes[i].name) != 0)
      continue;
    run_shape(&shapes[i], reps, threads, csv, ceiling, rss, precision,
              ref_ceiling);
    ran = 1;
  }
  if (!ran) {
    fprintf(stderr, "bench: unknown shape '%s'\n", only);
    return 2;
  }
  return 0;
}
