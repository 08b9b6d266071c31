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

/*! make_config() : the library configuration for M modalities of widths
 *  dims and C classes, from the options. */
void make_config(const train_opts *o, int m, const int *dims, int c,
                 imml_config *cfg);

typedef struct epoch_report {
  int epoch;
  double loss, ce, con, dis;  /* means over the epoch's training rows */
  double train_acc, test_acc; /* NaN when not evaluated / no test rows */
  double seconds;             /* since the start of training */
} epoch_report;

typedef struct run_spec {
  const char *title;   /* prefix of the progress line, may be "" */
  int eval_each_epoch; /* 1: train/test accuracy after every epoch; 0: only
                          after the last one */
  int epoch_lines;     /* 1: when stderr is not a terminal, one line per epoch;
                          0: no progress unless stderr is a terminal */
  int transient;       /* 1: erase the terminal progress line at the end
                          instead of leaving it */
  FILE *metrics;       /* NULL, or the per-epoch CSV (rows only: the caller
                          writes the header) */
} run_spec;

/*! train_run() : creates a model from cfg, attaches the optimiser and runs
 *  o->epochs epochs over tr (seeded shuffle; batches of o->batch, the last
 *  one partial) with imml_forward(TRAIN) -> imml_backward -> imml_commit ->
 *  imml_optim_step.
 *  te may have n = 0.  On success *out owns the model and *last holds the
 *  last epoch's report.  @return 0, or -1 after printing the error. */
int train_run(const train_opts *o, const imml_config *cfg, const dataset *tr,
              const dataset *te, const run_spec *spec, imml_model **out,
              epoch_report *last);

/*! predict_rows() : classes (and, if probs is not NULL, probabilities, n x C)
 *  of every row of ds, in batches of the model's max_batch, through
 *  imml_predict() on `model` (the model itself: imml-train predicts on the
 *  thread that trains; or a share of it).  `swap` NULL, or per modality
 *  NULL or a row permutation: modality m's row i is then taken from row
 *  swap[m][i] (the corrupted-auxiliary test).
 *  @return 0, or -1 after printing the library's error. */
int predict_rows(imml_model *model, const dataset *ds, int *const *swap,
                 int *classes, float *probs);

/*! head_predict() : classes from modality m's unimodal head o_m (METHOD.md
 *  section 1), as imml_unimodal_get() reports them. */
int head_predict(imml_model *model, int m, const dataset *ds, int *classes);

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
