/* Command-line value parsing shared by imml-train and mpi-train: each
 * function checks one option value, prints "PROG: error: --NAME: expected
 * ..., got 'VALUE'" on stderr (unless quiet) and returns -1, or stores the
 * value and returns 0. */
#ifndef IMML_TRAIN_ARGS_H
#define IMML_TRAIN_ARGS_H

typedef struct arg_ctx {
  const char *prog; /* program name in messages */
  int quiet;        /* 1: no messages (e.g. MPI ranks other than 0) */
} arg_ctx;

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
