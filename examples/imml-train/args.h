/* The command line shared by imml-train and mpi-train: the options both
 * take (parsed into a train_opts), the argv walker and the value parsers.
 * Messages go to stderr as "PROG: error: ..." unless arg_ctx.quiet. */
#ifndef IMML_TRAIN_ARGS_H
#define IMML_TRAIN_ARGS_H

#include <stdint.h>

typedef struct arg_ctx {
  const char *prog; /* program name in messages */
  int quiet;        /* 1: no messages (e.g. MPI ranks other than 0) */
} arg_ctx;

enum { ARG_EXIT_USAGE = 2 }; /* exit status of a bad command line */

/* The options of both programs, with the same defaults and value checks. */
typedef struct train_opts {
  /* model: every METHOD.md hyper-parameter */
  int hidden, knowledge, dict_size;
  float beta, gamma1, gamma2, tau;
  int warmup;
  int slot_mode;   /* imml_slot_mode */
  int predominant; /* -1: auto */
  uint64_t seed;   /* split, shuffles and parameter initialisation */
  /* optimiser */
  int optimizer; /* imml_optim_kind */
  float lr, weight_decay, momentum;
  /* loop */
  int epochs, batch;
  int threads;          /* BLAS threads; 0: the program's default */
  int precision;        /* imml_precision of the products (--precision) */
  double test_fraction; /* stratified test share in [0, 1) */
  double min_test_acc;  /* floor of the final test accuracy, 0..1 */
  const char *metrics;  /* per-epoch CSV, or NULL */
  const char *save;     /* checkpoint path, or NULL */
  int no_standardize;   /* 1: features are used as read */
  int quiet;
} train_opts;

/*! train_opts_init() : the defaults documented in --help. */
void train_opts_init(train_opts *o);

/* Option ids 0..TRAIN_OPT_COUNT-1 are the shared options, which
 * arg_next() parses into a train_opts (and --help, --version, which it
 * answers); a program numbers its own options from TRAIN_OPT_COUNT on. */
enum train_opt_id {
  O_HIDDEN,
  O_KNOWLEDGE,
  O_DICT,
  O_BETA,
  O_GAMMA1,
  O_GAMMA2,
  O_TAU,
  O_WARMUP,
  O_SLOT,
  O_PRED,
  O_SEED,
  O_OPTIM,
  O_LR,
  O_WD,
  O_MOMENTUM,
  O_EPOCHS,
  O_BATCH,
  O_THREADS,
  O_FRAC,
  O_METRICS,
  O_SAVE,
  O_MINACC,
  O_QUIET,
  O_NOSTD,
  O_PRECISION,
  O_HELP,
  O_VERSION,
  TRAIN_OPT_COUNT
};

typedef struct arg_opt {
  const char *name; /* without the leading "--" */
  int has_arg;      /* 1: takes a value (--name=value or --name value) */
} arg_opt;

typedef struct arg_spec {
  const arg_ctx *ctx;
  /* The program's own options, indexed by id: entries below
   * TRAIN_OPT_COUNT are unused (NULL names); n_opts is the program's
   * number of option ids, shared ones included. */
  const arg_opt *opts;
  int n_opts;
  const char *const *usage; /* --help text: pieces, NULL-terminated */
  /* 1: "option '--quiet=1' takes no value" (the argument as given);
   * 0: "option '--quiet' takes no value". */
  int no_value_quotes_arg;
} arg_spec;

/* Walks argv: set next = 1 (and the rest 0) before the first call. */
typedef struct arg_iter {
  int next;          /* index of the next argument */
  int operands_only; /* 1 after "--" */
  int id;            /* ARG_OPTION: the program's option */
  char *arg;         /* ARG_OPTION: its value or NULL; ARG_OPERAND: it */
} arg_iter;

enum { ARG_END = -1, ARG_OPERAND = -2, ARG_OPTION = -3 };

/*! arg_next() : the next argument of argv.  A shared option is parsed into
 *  *o and given[id] set, and the walk goes on; --help and --version print
 *  (unless quiet) and return 0.
 *  @return ARG_END, ARG_OPERAND (anything not an option, "-" included, and
 *  everything after "--"), ARG_OPTION (one of spec->opts: the caller sets
 *  it, and given[id]; arg_bad_value() after a bad value), or an exit status
 *  (0, or ARG_EXIT_USAGE after printing the error and the --help hint). */
int arg_next(const arg_spec *spec, arg_iter *it, int argc, char **argv,
             train_opts *o, int *given);

/*! arg_opt_name() : the name of option id, shared or in own[]. */
const char *arg_opt_name(const arg_opt *own, int id);

/*! arg_usage() : "PROG: error: MESSAGE" and the --help hint.
 *  @return ARG_EXIT_USAGE. */
int arg_usage(const arg_ctx *c, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/*! arg_bad_value() : the --help hint after a value's message.
 *  @return ARG_EXIT_USAGE. */
int arg_bad_value(const arg_ctx *c);

/* Value parsers: each checks one option value, prints "PROG: error:
 * --NAME: expected ..., got 'VALUE'" and returns -1, or stores the value
 * and returns 0. */
int arg_long(const arg_ctx *c, const char *name, const char *s, long lo,
             long hi, long *out);
int arg_int(const arg_ctx *c, const char *name, const char *s, int lo, int hi,
            int *out);
/* A finite number in [lo, hi], with either end open when *_open is 1. */
int arg_num(const arg_ctx *c, const char *name, const char *s, double lo,
            int lo_open, double hi, int hi_open, double *out);
int arg_float(const arg_ctx *c, const char *name, const char *s, double lo,
              int lo_open, double hi, int hi_open, float *out);

#endif
