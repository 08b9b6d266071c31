/* libimml benchmark: median time of one full training step (forward with
 * every loss term, backward with input gradients, commit, AdamW step) and of
 * one inference forward, for the shapes of doc/PERFORMANCE.md; plus the share
 * of the step spent inside cblas_sgemm and the sgemm ceiling of this machine.
 *
 * usage: bench [--shape NAME] [--reps N] [--threads N] [--csv] [--rss]
 *              [--gemms]
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
 * calls to, times the call and forwards it to the BLAS library's own. */

#define IMML_EXPERIMENTAL /* imml_threads_set */
#include <imml.h>

#include <cblas.h>
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

char *openblas_get_corename(void);

typedef void (*sgemm_fn)(const enum CBLAS_ORDER, const enum CBLAS_TRANSPOSE,
                         const enum CBLAS_TRANSPOSE, const blasint,
                         const blasint, const blasint, const float,
                         const float *, const blasint, const float *,
                         const blasint, const float, float *, const blasint);

static sgemm_fn real_sgemm;
static double sgemm_seconds;
static double sgemm_flops;

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
  if (!gemm_log_on)
    return;
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

/* --gemms: the step's sgemm calls grouped by shape, per training step. */
static void print_gemm_log(int steps) {
  printf("# sgemm calls per training step: op(A) op(B) m n k, calls, "
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
                      double ceiling, int rss) {
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
  if (csv)
    printf("%s,%d,%.4f,%.4f,%.3f,%.2f,%.2f,%s\n", s->name, threads, 1e3 * train,
           1e3 * infer, gemm / train, rate, ceiling, openblas_get_corename());
  else
    printf("%-16s threads %d  train step %8.3f ms  inference %7.3f ms  "
           "in sgemm %4.1f%%  %6.1f GFLOP/s (sgemm ceiling %.1f)\n",
           s->name, threads, 1e3 * train, 1e3 * infer, 100.0 * gemm / train,
           rate, ceiling);
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
  const char *only = NULL;
  int reps = 30, threads = 0, csv = 0, rss = 0;
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
    else {
      fprintf(stderr, "usage: bench [--shape NAME] [--reps N] [--threads N] "
                      "[--csv] [--rss] [--gemms]\n");
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
  const double ceiling = sgemm_ceiling(reps < 20 ? reps : 20);
  int ran = 0;
  for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
    if (only && strcmp(only, shapes[i].name) != 0)
      continue;
    run_shape(&shapes[i], reps, threads, csv, ceiling, rss);
    ran = 1;
  }
  if (!ran) {
    fprintf(stderr, "bench: unknown shape '%s'\n", only);
    return 2;
  }
  return 0;
}
