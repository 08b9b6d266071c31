/*
 * A team: helper threads that serve one public call (doc/DECISIONS.md,
 * "Threads: a team per call").  The first job worth splitting in a call
 * starts the helpers; between jobs they spin for a moment and then sleep,
 * so the next job costs a wake-up rather than a thread start; the call
 * ends the team (imml_team_end) before it returns, so no thread outlives
 * a call.  Jobs are split into numbered parts that any member, the caller
 * included, claims one at a time: a helper the system has not scheduled
 * yet leaves its part to the others.  Internal: not exported.
 */
#ifndef IMML_TEAM_H
#define IMML_TEAM_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

/* The most threads of a team (the caller's included). */
#define IMML_TEAM_MAX 8
/* The most parts of a job. */
#define IMML_TEAM_PARTS 255

/* Runs part `part` of a job on member `member` of the team (0 the caller,
 * 1 .. the helpers): a part may use memory of its member's. */
typedef void (*imml_team_fn)(void *arg, int part, int member);

typedef struct imml_team_member {
  struct imml_team *team;
  int index;     /* 1 .. IMML_TEAM_MAX - 1 */
  uint64_t seen; /* the generation this member has last served */
} imml_team_member;

typedef struct imml_team {
  /* Generation << 16 | parts << 8 | next part to claim: one word, so a
   * claim (a compare-and-swap) can only take a part of the job it saw.
   * On a cache line of its own: idle helpers spin reading it. */
  _Alignas(64) _Atomic uint64_t state;
  _Alignas(64) atomic_int finished; /* parts of the current job done */
  atomic_int sleepers;              /* helpers waiting on `wake` */
  atomic_int quit;                  /* set by imml_team_end */
  imml_team_fn fn; /* the current job, stable while any part runs */
  void *arg;
  pthread_mutex_t mu;
  pthread_cond_t wake;
  int helpers; /* helpers running in this call */
  int asked;   /* the most helpers asked for in this call */
  pthread_t tid[IMML_TEAM_MAX];
  imml_team_member member[IMML_TEAM_MAX];
} imml_team;

/* 0 on success; else the team cannot be used (and needs no destroy). */
int imml_team_init(imml_team *t);
/* Ends the team if it runs, then frees its mutex and condition. */
void imml_team_destroy(imml_team *t);

/* 1 if a job run now would find helpers running (no start to pay). */
int imml_team_running(const imml_team *t);

/* Runs fn(arg, 0 .. parts-1) and returns once every part is done, on the
 * caller and min(threads, parts) - 1 helpers, which it starts if fewer
 * were asked for so far in this call (helpers started stay until the
 * call's imml_team_end, and serve every later job of the call whatever
 * its `threads`).  Parts run in no fixed order and concurrently: each must
 * touch memory of its own (or of its member's).  Without helpers (none could be
 * started, or threads or parts is 1, or parts is over IMML_TEAM_PARTS) the
 * caller runs every part itself, in order, as member 0. */
void imml_team_run(imml_team *t, int threads, int parts, imml_team_fn fn,
                   void *arg);

/* Stops and joins the helpers, if any run: every public call that may
 * have started them calls this before it returns. */
void imml_team_end(imml_team *t);

#endif /* IMML_TEAM_H */
