/* The training loop of imml-train, its progress display and the
 * evaluation helpers shared by the train, predict and compare modes. */
#ifndef IMML_TRAIN_TRAIN_H
#define IMML_TRAIN_TRAIN_H

#include "args.h"
#include "data.h"

#include <imml.h>

#include <stdint.h>
#include <stdio.h>

/* train_opts and train_opts_init(): args.h. */

/* How the predominant modality p is fixed at the end of the warm-up
 * (--choose-p; doc/DECISIONS.md, "imml-train"): a modality index >= 0, or */
enum {
  CHOOSE_HELDOUT = -1, /* the unimodal head with the lowest cross-entropy
                          on the validation rows; among the heads those rows
                          cannot tell apart from it (a paired test), the
                          lowest cross-entropy on every training row */
  CHOOSE_LIBRARY = -2  /* the library's own rule (METHOD.md section 5) */
};

/* The share of the training steps a default warm-up may cover before it
 * is scaled down (warmup_effective()). */
#define WARMUP_CAP 0.2

/* imml-train's own training options (mpi-train does not have them). */
typedef struct fit_opts {
  double val_fraction; /* stratified validation share of the training rows */
  int patience;        /* epochs without a better validation score before
                          stopping early; 0: never stop early */
  int choose_p;        /* CHOOSE_HELDOUT, CHOOSE_LIBRARY or an index */
  int warmup_given;    /* 1: --warmup was given: never scaled */
  double subsample;    /* --train-subsample: share of the training rows
                          kept, in (0, 1] */
  int header;          /* a csv_header: --header */
} fit_opts;

/*! fit_opts_init() : the defaults documented in --help. */
void fit_opts_init(fit_opts *f);

/*! warmup_effective() : the warm-up of a run of `total` training steps.
 *  A default warm-up (given == 0) longer than WARMUP_CAP * total is scaled
 *  down to that (at least 1 step); a given one is kept.  When the result
 *  differs from `warmup`, or a given warm-up covers more than WARMUP_CAP of
 *  training, note receives a sentence for the user (else ""). */
int warmup_effective(int warmup, int given, long total, char *note,
                     size_t size);

/*! seed_rows() : the rows of one run, as indices of rd in file order:
 *  the test rows (fixed_test: none, rd is all training rows; else a
 *  stratified split with o->test_fraction, generator stream 1 of seed),
 *  then of the training rows a stratified subsample f->subsample (stream
 *  4) and a stratified validation share f->val_fraction (stream 7); the
 *  rest are the fitting rows.  Every step keeps at least one row of each
 *  class, and draws only from the labels of the rows in file order, so the
 *  same training rows read from a file of their own (--write-split, then
 *  --train) give the same validation rows.
 *  @return 0, or -1 after printing the error. */
int seed_rows(const raw_data *rd, int fixed_test, const train_opts *o,
              const fit_opts *f, uint64_t seed, int **fit, int *nfit, int **va,
              int *nva, int **te, int *nte);

/*! make_config() : the library configuration for M modalities of widths
 *  dims and C classes, from the options. */
void make_config(const train_opts *o, int m, const int *dims, int c,
                 imml_config *cfg);

typedef struct epoch_report {
  int epoch;
  double loss, ce, con, dis;  /* means over the epoch's training rows */
  double train_acc, test_acc; /* NaN when not evaluated / no test rows */
  double val_acc, val_ce;     /* NaN without validation rows */
  double seconds;             /* since the start of training (in
                                 run_result.last: the whole training) */
} epoch_report;

/* What train_run() did besides the last epoch's numbers. */
typedef struct run_result {
  epoch_report last;    /* the returned model's numbers: the best epoch's
                           when it was restored (train/test accuracy measured
                           again on it) */
  int epochs_run;       /* epochs trained (< o->epochs after early stopping) */
  int best_epoch;       /* the epoch whose model is returned */
  int restored;         /* 1: the best epoch's model replaced the last one */
  int stopped_early;    /* 1: patience ran out */
  int p;                /* the predominant modality fixed, or -1 */
  int p_by_host;        /* 1: fixed by imml_predominant_set (--choose-p) */
  int p_step;           /* training step after which p was fixed, or 0 */
  int heldout_fallback; /* 1: CHOOSE_HELDOUT without validation rows: the
                           library's rule fixed p */
  /* CHOOSE_HELDOUT: each head's validation accuracy and cross-entropy at
   * the choice, and, when p_tied > 1, its cross-entropy on every training
   * row (NaN otherwise) */
  double head_val_acc[IMML_MAX_MODALITIES], head_val_ce[IMML_MAX_MODALITIES];
  double head_all_ce[IMML_MAX_MODALITIES];
  int p_tied; /* CHOOSE_HELDOUT: heads the validation rows could not tell
                 apart from the best one, itself included */
} run_result;

/* What a training method adds to the plain loop (the peer baselines of
 * --compare, baselines.h).  Every function may be NULL; each returns 0, or
 * -1 after printing an error. */
typedef struct method_hooks {
  const imml_ft_ops *ft; /* host F&T, or NULL for the built-in one */
  void *ctx;
  /* A model handle to work on: after creation, and after the best epoch's
   * model is restored (a new handle). */
  int (*attach)(void *ctx, imml_model *model);
  /* Before the training forward of a batch: its training-row indices,
   * labels and features. */
  int (*batch)(void *ctx, imml_model *model, int bs, const int *rows,
               const int *labels, const float *const *features);
  /* After imml_commit(), before imml_optim_step(). */
  int (*before_update)(void *ctx, imml_model *model);
  /* Copy / bring back the method's own state with the best epoch. */
  int (*snapshot)(void *ctx);
  int (*restore)(void *ctx);
} method_hooks;

typedef struct run_spec {
  const char *title;   /* prefix of the progress line, may be "" */
  int eval_each_epoch; /* 1: train/test accuracy after every epoch; 0: only
                          for the returned model */
  int epoch_lines;     /* 1: when stderr is not a terminal, one line per epoch;
                          0: no progress unless stderr is a terminal */
  int transient;       /* 1: erase the terminal progress line at the end
                          instead of leaving it */
  FILE *metrics;       /* NULL, or the per-epoch CSV (rows only: the caller
                          writes the header) */
  /* With cfg->predominant < 0 and cfg->warmup_steps = W > 0: how p is fixed
   * after W steps.  Anything but CHOOSE_LIBRARY creates the model with
   * warmup_steps W + 1 and calls imml_predominant_set() after the W-th
   * step, so the library's own choice (after step W + 1) never comes
   * first. */
  int choose_p;
  /* 1: the method applies the front-door once p is fixed: only epochs that
   * end with p fixed compete for the best epoch (and count for patience),
   * so the returned model is never one still in warm-up. */
  int front_door;
  int patience;              /* as fit_opts */
  const method_hooks *hooks; /* NULL: none */
} run_spec;

/*! train_run() : creates a model from cfg, attaches the optimiser and runs
 *  up to o->epochs epochs over tr (seeded shuffle; batches of o->batch, the
 *  last one partial) with imml_forward(TRAIN) -> imml_backward ->
 *  imml_commit -> imml_optim_step.  With validation rows (va->n > 0), the
 *  validation accuracy is measured after every epoch; the best epoch
 *  (highest accuracy, ties: lower validation cross-entropy) is kept with
 *  imml_model_save_mem() and restored at the end, and training stops after
 *  spec->patience epochs without a better one (patience > 0).
 *  te may have n = 0.  On success *out owns the model.
 *  @return 0, or -1 after printing the error. */
int train_run(const train_opts *o, const imml_config *cfg, const dataset *tr,
              const dataset *va, const dataset *te, const run_spec *spec,
              imml_model **out, run_result *res);

/*! predict_rows() : classes (and, if probs is not NULL, probabilities, n x C)
 *  of every row of ds, in batches of the model's max_batch, through
 *  imml_predict() on `model` (the model itself: imml-train predicts on the
 *  thread that trains; or a share of it).  `swap` NULL, or per modality
 *  NULL or a row permutation: modality m's row i is then taken from row
 *  swap[m][i] (the corrupted-auxiliary test).
 *  @return 0, or -1 after printing the library's error. */
int predict_rows(imml_model *model, const dataset *ds, int *const *swap,
                 int *classes, float *probs);

/*! heads_eval() : accuracy and mean cross-entropy on ds of every modality's
 *  unimodal head o_m (METHOD.md section 1), as imml_unimodal_get() reports
 *  it after each imml_predict() batch.  acc and ce hold M values; ce may
 *  be NULL; row_ce NULL or n x M, each row's cross-entropy per head.
 *  @return 0, or -1 after printing the error. */
int heads_eval(imml_model *model, const dataset *ds, double *acc, double *ce,
               double *row_ce);

/*! mean_ce() : mean -log probs[i][y[i]] over n rows of C probabilities
 *  (each probability floored at 1e-30). */
double mean_ce(const float *probs, const int *y, int n, int c);

double accuracy(const int *y, const int *pred, int n);
/*! macro_f1() : mean F1 over the classes that occur in y or pred. */
double macro_f1(const int *y, const int *pred, int n, int c);

/* Messages on stderr ("imml-train: error: ..."), after ending an open
 * progress line. */
void errorf(const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2)))
#endif
    ;
void lib_error(const char *call, imml_status st, const imml_model *model);
/* Informational lines on stderr, unless quiet. */
void notef(int quiet, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
double now_seconds(void);
int stderr_is_tty(void);

#endif
