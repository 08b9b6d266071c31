/* Splitting the element-wise passes over every parameter (the optimiser
 * step, the gradient checks) across threads.  libimml keeps no threads of
 * its own: a pass long enough to pay for it starts short-lived helpers and
 * joins them before returning, so no thread outlives a call and nothing
 * needs shutting down.  The thread count follows the BLAS's own setting
 * (imml_threads_set), which the host already sizes to its cores. */
#include "internal.h"
#include "kernels.h"

#include <pthread.h>
#include <signal.h>

#ifdef IMML_HAVE_OPENBLAS_THREADS
#include <cblas.h>
#endif

int imml_threads_set(int n) {
#ifdef IMML_HAVE_OPENBLAS_THREADS
  if (n > 0)
    openblas_set_num_threads(n);
  return openblas_get_num_threads();
#else
  (void)n;
  return 0;
#endif
}

/* A part shorter than this (in elements) is not worth a thread: starting
 * and joining one costs tens of microseconds, a pass over 512 Ki floats
 * about a hundred. */
#define PAR_MIN_PART ((size_t)1 << 19)

typedef struct par_task {
  imml_range_fn fn;
  void *ctx;
  int part;
  size_t lo, hi;
} par_task;

static void *par_run(void *arg) {
  const par_task *t = arg;
  t->fn(t->ctx, t->part, t->lo, t->hi);
  return NULL;
}

int imml_thread_start(pthread_t *t, void *(*fn)(void *), void *arg) {
  sigset_t all, old;
  sigfillset(&all);
  const int masked = pthread_sigmask(SIG_SETMASK, &all, &old) == 0;
  const int ok = pthread_create(t, NULL, fn, arg) == 0;
  if (masked)
    pthread_sigmask(SIG_SETMASK, &old, NULL);
  return ok;
}

int imml_par_parts(size_t n) {
  int threads = imml_threads_set(0);
  if (threads > IMML_PAR_MAX)
    threads = IMML_PAR_MAX;
  size_t by_size = n / PAR_MIN_PART;
  int parts = by_size < (size_t)threads ? (int)by_size : threads;
  return parts < 1 ? 1 : parts;
}

int imml_par_for(size_t n, imml_range_fn fn, void *ctx) {
  const int parts = imml_par_parts(n);
  if (parts == 1) {
    fn(ctx, 0, 0, n);
    return 1;
  }
  /* Boundaries on 16-float (64-byte) multiples: no two threads write
   * the same cache line. */
  size_t chunk = (n + (size_t)parts - 1) / (size_t)parts;
  chunk = (chunk + 15) & ~(size_t)15;
  par_task task[IMML_PAR_MAX];
  pthread_t tid[IMML_PAR_MAX];
  int started[IMML_PAR_MAX] = {0};
  for (int i = 0; i < parts; i++) {
    const size_t lo = (size_t)i * chunk < n ? (size_t)i * chunk : n;
    const size_t hi = lo + chunk < n ? lo + chunk : n;
    task[i] = (par_task){fn, ctx, i, lo, hi};
  }
  for (int i = 1; i < parts; i++)
    started[i] = imml_thread_start(&tid[i], par_run, &task[i]);
  par_run(&task[0]);
  for (int i = 1; i < parts; i++) {
    if (started[i])
      pthread_join(tid[i], NULL);
    else /* no thread to be had: the caller does that part too */
      par_run(&task[i]);
  }
  return parts;
}

/* Whole-array reductions over the parameters or gradients, split the same
 * way (each part's result in its own slot, combined after the join). */
typedef struct zero_job {
  const float *x;
  int zero[IMML_PAR_MAX];
} zero_job;

static void zero_range(void *ctx, int part, size_t lo, size_t hi) {
  zero_job *j = ctx;
  j->zero[part] = k_all_zero(hi - lo, j->x + lo);
}

int imml_par_all_zero(size_t n, const float *x) {
  zero_job j;
  j.x = x;
  const int parts = imml_par_for(n, zero_range, &j);
  int zero = 1;
  for (int i = 0; i < parts; i++)
    zero &= j.zero[i];
  return zero;
}

typedef struct max_job {
  const float *x;
  float top[IMML_PAR_MAX];
} max_job;

static void max_range(void *ctx, int part, size_t lo, size_t hi) {
  max_job *j = ctx;
  j->top[part] = k_max_abs(hi - lo, j->x + lo);
}

float imml_par_max_abs(size_t n, const float *x) {
  max_job j;
  j.x = x;
  const int parts = imml_par_for(n, max_range, &j);
  /* Combined as magnitude bits, like the parts themselves: NaN, then
   * infinity, outrank every finite value whatever the order. */
  uint32_t top = 0;
  for (int i = 0; i < parts; i++)
    top = k_top_bits(top, j.top[i]);
  return k_bits_float(top);
}
