/* Command-line value parsing shared by imml-train and mpi-train. */
#include "args.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

int arg_long(const arg_ctx *c, const char *name, const char *s, long lo,
             long hi, long *out) {
  char *end;
  errno = 0;
  const long v = strtol(s, &end, 10);
  if (errno || end == s || *end != '\0' || v < lo || v > hi) {
    if (!c->quiet)
      fprintf(stderr,
              "%s: error: --%s: expected an integer in %ld..%ld, got '%s'\n",
              c->prog, name, lo, hi, s);
    return -1;
  }
  *out = v;
  return 0;
}

int arg_int(const arg_ctx *c, const char *name, const char *s, int lo, int hi,
            int *out) {
  long v;
  if (arg_long(c, name, s, lo, hi, &v) != 0)
    return -1;
  *out = (int)v;
  return 0;
}

int arg_num(const arg_ctx *c, const char *name, const char *s, double lo,
            int lo_open, double hi, int hi_open, double *out) {
  char *end;
  errno = 0;
  const double v = strtod(s, &end);
  if (errno || end == s || *end != '\0' || !isfinite(v) ||
      (lo_open ? v <= lo : v < lo) || (hi_open ? v >= hi : v > hi)) {
    if (!c->quiet)
      fprintf(stderr,
              "%s: error: --%s: expected a number in %c%g, %g%c, got "
              "'%s'\n",
              c->prog, name, lo_open ? '(' : '[', lo, hi, hi_open ? ')' : ']',
              s);
    return -1;
  }
  *out = v;
  return 0;
}

int arg_float(const arg_ctx *c, const char *name, const char *s, double lo,
              int lo_open, double hi, int hi_open, float *out) {
  double v;
  if (arg_num(c, name, s, lo, lo_open, hi, hi_open, &v) != 0)
    return -1;
  *out = (float)v;
  return 0;
}
