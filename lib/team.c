/* Call-scoped helper threads; see team.h for the contract.
 *
 * Publishing a job: the caller writes fn and arg, zeroes `finished`, and
 * stores a new state word (a new generation, the part count, next part
 * 0).  Every member, the caller first, then claims parts by a
 * compare-and-swap on that word; a claim fails, and the member stops,
 * when the generation is no longer the one it saw.  fn and arg are read
 * only after a successful claim, and the caller overwrites them only once
 * `finished` says every part of the previous job is done, so a member
 * always reads the job it claimed a part of.
 *
 * Waiting: a helper spins on the state word for up to SPIN_NS, then sleeps
 * on `wake`.  It counts itself in `sleepers` before it checks the word a
 * last time under the mutex; the caller stores the word before it reads
 * `sleepers` (both sequentially consistent), so either the helper sees
 * the new job or the caller sees a sleeper and broadcasts under the
 * mutex.  No wake-up is lost. */
#include "team.h"
#include "internal.h"

#include <sched.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

/* How long an idle helper spins before it sleeps: longer than the
 * element-wise work between two products of a step usually takes, short
 * enough not to hold a core through a host's callback. */
#define SPIN_NS 200000

#define GEN(s) ((s) >> 16)
#define PARTS(s) ((int)(((s) >> 8) & 0xff))
#define NEXT(s) ((int)((s)&0xff))

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Claims and runs parts of generation `gen` until none is left. */
static void serve(imml_team *t, uint64_t gen, int member) {
  uint64_t s = atomic_load(&t->state);
  while (GEN(s) == gen && NEXT(s) < PARTS(s)) {
    if (!atomic_compare_exchange_weak(&t->state, &s, s + 1))
      continue; /* s now holds the word as it is */
    t->fn(t->arg, NEXT(s), member);
    atomic_fetch_add(&t->finished, 1);
    s = atomic_load(&t->state);
  }
}

/* Waits until the generation differs from `seen`; returns the word. */
static uint64_t await_job(imml_team *t, uint64_t seen) {
  uint64_t s = atomic_load(&t->state);
  const int64_t until = now_ns() + SPIN_NS;
  for (unsigned i = 1; GEN(s) == seen; i++) {
    CPU_RELAX();
    s = atomic_load(&t->state);
    if (GEN(s) == seen && i % 64 == 0 && now_ns() > until)
      break;
  }
  if (GEN(s) != seen)
    return s;
  pthread_mutex_lock(&t->mu);
  atomic_fetch_add(&t->sleepers, 1);
  while (GEN(s = atomic_load(&t->state)) == seen)
    pthread_cond_wait(&t->wake, &t->mu);
  atomic_fetch_sub(&t->sleepers, 1);
  pthread_mutex_unlock(&t->mu);
  return s;
}

static void *helper_main(void *arg) {
  imml_team_member *me = arg;
  imml_team *t = me->team;
  for (;;) {
    const uint64_t s = await_job(t, me->seen);
    me->seen = GEN(s);
    if (atomic_load(&t->quit))
      return NULL;
    serve(t, me->seen, me->index);
  }
}

/* A new generation (with its part count), waking any sleeping helper. */
static void publish(imml_team *t, int parts) {
  const uint64_t gen = GEN(atomic_load(&t->state)) + 1;
  atomic_store(&t->state, gen << 16 | (uint64_t)parts << 8);
  if (atomic_load(&t->sleepers) > 0) {
    pthread_mutex_lock(&t->mu);
    pthread_cond_broadcast(&t->wake);
    pthread_mutex_unlock(&t->mu);
  }
}

int imml_team_init(imml_team *t) {
  atomic_init(&t->state, 0);
  atomic_init(&t->finished, 0);
  atomic_init(&t->sleepers, 0);
  atomic_init(&t->quit, 0);
  t->fn = NULL;
  t->arg = NULL;
  t->helpers = 0;
  t->asked = 0;
  if (pthread_mutex_init(&t->mu, NULL) != 0)
    return -1;
  if (pthread_cond_init(&t->wake, NULL) != 0) {
    pthread_mutex_destroy(&t->mu);
    return -1;
  }
  return 0;
}

void imml_team_destroy(imml_team *t) {
  imml_team_end(t);
  pthread_cond_destroy(&t->wake);
  pthread_mutex_destroy(&t->mu);
}

int imml_team_running(const imml_team *t) { return t->helpers > 0; }

/* Starts helpers until n run, each with every signal blocked
 * (imml_thread_start).  A helper that cannot be had is simply not there,
 * and is not asked for again in this call. */
static void start(imml_team *t, int n) {
  t->asked = n;
  const uint64_t gen = GEN(atomic_load(&t->state));
  while (t->helpers < n) {
    t->member[t->helpers] = (imml_team_member){t, t->helpers + 1, gen};
    if (!imml_thread_start(&t->tid[t->helpers], helper_main,
                           &t->member[t->helpers]))
      break;
    t->helpers++;
  }
}

void imml_team_run(imml_team *t, int threads, int parts, imml_team_fn fn,
                   void *arg) {
  if (threads > IMML_TEAM_MAX)
    threads = IMML_TEAM_MAX;
  const int want = (parts < threads ? parts : threads) - 1;
  if (want > t->asked && parts <= IMML_TEAM_PARTS)
    start(t, want);
  if (t->helpers == 0 || parts < 2 || parts > IMML_TEAM_PARTS) {
    for (int i = 0; i < parts; i++)
      fn(arg, i, 0);
    return;
  }
  t->fn = fn;
  t->arg = arg;
  atomic_store(&t->finished, 0);
  publish(t, parts);
  serve(t, GEN(atomic_load(&t->state)), 0);
  /* what is left runs on helpers now: wait for it */
  for (unsigned i = 1; atomic_load(&t->finished) < parts; i++) {
    CPU_RELAX();
    if (i % 1024 == 0)
      sched_yield();
  }
}

void imml_team_end(imml_team *t) {
  if (t->helpers > 0) {
    atomic_store(&t->quit, 1);
    publish(t, 0);
    for (int i = 0; i < t->helpers; i++)
      pthread_join(t->tid[i], NULL);
    atomic_store(&t->quit, 0);
  }
  t->helpers = 0;
  t->asked = 0;
}
