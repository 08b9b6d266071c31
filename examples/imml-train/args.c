/* The command line shared by imml-train and mpi-train. */
#include "args.h"

#include <imml.h>

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const arg_opt train_opt_table[TRAIN_OPT_COUNT] = {
    [O_HIDDEN] = {"hidden", 1},
    [O_KNOWLEDGE] = {"knowledge", 1},
    [O_DICT] = {"dict-size", 1},
    [O_BETA] = {"beta", 1},
    [O_GAMMA1] = {"gamma1", 1},
    [O_GAMMA2] = {"gamma2", 1},
    [O_TAU] = {"tau", 1},
    [O_WARMUP] = {"warmup", 1},
    [O_SLOT] = {"slot-mode", 1},
    [O_PRED] = {"predominant", 1},
    [O_SEED] = {"seed", 1},
    [O_OPTIM] = {"optimizer", 1},
    [O_LR] = {"lr", 1},
    [O_WD] = {"weight-decay", 1},
    [O_MOMENTUM] = {"momentum", 1},
    [O_EPOCHS] = {"epochs", 1},
    [O_BATCH] = {"batch", 1},
    [O_THREADS] = {"threads", 1},
    [O_FRAC] = {"test-fraction", 1},
    [O_METRICS] = {"metrics", 1},
    [O_SAVE] = {"save", 1},
    [O_MINACC] = {"min-test-acc", 1},
    [O_QUIET] = {"quiet", 0},
    [O_NOSTD] = {"no-standardize", 0},
    [O_PRECISION] = {"precision", 1},
    [O_HELP] = {"help", 0},
    [O_VERSION] = {"version", 0},
};

void train_opts_init(train_opts *o) {
  memset(o, 0, sizeof *o);
  o->hidden = 256;
  o->knowledge = 128;
  o->dict_size = 256;
  o->beta = 0.5f;
  o->gamma1 = 0.1f;
  o->gamma2 = 1.0f;
  o->tau = 0.1f;
  o->warmup = 100;
  o->slot_mode = IMML_SLOT_CONDITIONAL;
  o->predominant = -1;
  o->seed = 0;
  o->optimizer = IMML_OPTIM_ADAMW;
  o->lr = 1e-3f;
  o->weight_decay = 0.0f;
  o->momentum = 0.0f;
  o->epochs = 60;
  o->batch = 64;
  o->threads = 0;
  o->precision = IMML_PRECISION_FP32;
  o->test_fraction = 0.5;
  o->min_test_acc = 0.0;
}

const char *arg_opt_name(const arg_opt *own, int id) {
  return id < TRAIN_OPT_COUNT ? train_opt_table[id].name : own[id].name;
}

int arg_usage(const arg_ctx *c, const char *fmt, ...) {
  if (!c->quiet) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: error: ", c->prog);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\nTry '%s --help'.\n", c->prog);
    va_end(ap);
  }
  return ARG_EXIT_USAGE;
}

int arg_bad_value(const arg_ctx *c) {
  if (!c->quiet)
    fprintf(stderr, "Try '%s --help'.\n", c->prog);
  return ARG_EXIT_USAGE;
}

/* A value's own error message (no --help hint); @return -1. */
static int value_error(const arg_ctx *c, const char *name, const char *what,
                       const char *v) {
  if (!c->quiet)
    fprintf(stderr, "%s: error: --%s: expected %s, got '%s'\n", c->prog, name,
            what, v);
  return -1;
}

/* Parses the value v of shared option id into *o.  @return 0 or -1. */
static int train_opt_set(const arg_ctx *c, train_opts *o, int id,
                         const char *v) {
  const char *name = train_opt_table[id].name;
  switch (id) {
  case O_HIDDEN:
    return arg_int(c, name, v, 1, 1 << 20, &o->hidden);
  case O_KNOWLEDGE:
    return arg_int(c, name, v, 1, 1 << 20, &o->knowledge);
  case O_DICT:
    return arg_int(c, name, v, 1, 1 << 24, &o->dict_size);
  case O_BETA:
    return arg_float(c, name, v, 0, 0, 1, 0, &o->beta);
  case O_GAMMA1:
    return arg_float(c, name, v, 0, 0, 1e6, 0, &o->gamma1);
  case O_GAMMA2:
    return arg_float(c, name, v, 0, 0, 1e6, 0, &o->gamma2);
  case O_TAU:
    return arg_float(c, name, v, 0, 1, 1e6, 0, &o->tau);
  case O_WARMUP:
    return arg_int(c, name, v, 0, INT_MAX, &o->warmup);
  case O_SLOT:
    if (strcmp(v, "conditional") == 0)
      o->slot_mode = IMML_SLOT_CONDITIONAL;
    else if (strcmp(v, "strict") == 0)
      o->slot_mode = IMML_SLOT_STRICT;
    else
      return value_error(c, name, "conditional or strict", v);
    return 0;
  case O_PRED:
    if (strcmp(v, "auto") == 0) {
      o->predominant = -1;
      return 0;
    }
    return arg_int(c, name, v, 0, IMML_MAX_MODALITIES - 1, &o->predominant);
  case O_SEED: {
    char *end;
    errno = 0;
    const unsigned long long s = strtoull(v, &end, 10);
    if (errno || end == v || *end != '\0' || v[0] == '-')
      return value_error(c, name, "an unsigned integer", v);
    o->seed = (uint64_t)s;
    return 0;
  }
  case O_OPTIM:
    if (strcmp(v, "adamw") == 0 || strcmp(v, "adam") == 0)
      o->optimizer = IMML_OPTIM_ADAMW;
    else if (strcmp(v, "sgd") == 0)
      o->optimizer = IMML_OPTIM_SGD;
    else
      return value_error(c, name, "adamw or sgd", v);
    return 0;
  case O_LR:
    return arg_float(c, name, v, 0, 1, 1e6, 0, &o->lr);
  case O_WD:
    return arg_float(c, name, v, 0, 0, 1e6, 0, &o->weight_decay);
  case O_MOMENTUM:
    return arg_float(c, name, v, 0, 0, 1, 1, &o->momentum);
  case O_EPOCHS:
    return arg_int(c, name, v, 1, 1000000, &o->epochs);
  case O_BATCH:
    return arg_int(c, name, v, 1, 1 << 20, &o->batch);
  case O_THREADS:
    return arg_int(c, name, v, 1, 4096, &o->threads);
  case O_FRAC:
    return arg_num(c, name, v, 0, 0, 1, 1, &o->test_fraction);
  case O_MINACC:
    return arg_num(c, name, v, 0, 0, 1, 0, &o->min_test_acc);
  case O_METRICS:
    o->metrics = v;
    return 0;
  case O_SAVE:
    o->save = v;
    return 0;
  case O_QUIET:
    o->quiet = 1;
    return 0;
  case O_NOSTD:
    o->no_standardize = 1;
    return 0;
  case O_PRECISION:
    if (strcmp(v, "fp32") == 0)
      o->precision = IMML_PRECISION_FP32;
    else if (strcmp(v, "bf16") == 0)
      o->precision = IMML_PRECISION_BF16;
    else
      return value_error(c, name, "fp32 or bf16", v);
    return 0;
  default:
    return 0;
  }
}

static int is_named(const arg_opt *opt, const char *name, size_t nlen) {
  return opt->name && strlen(opt->name) == nlen &&
         strncmp(opt->name, name, nlen) == 0;
}

int arg_next(const arg_spec *spec, arg_iter *it, int argc, char **argv,
             train_opts *o, int *given) {
  const arg_ctx *c = spec->ctx;
  while (it->next < argc) {
    char *a = argv[it->next++];
    if (it->operands_only || a[0] != '-' || a[1] != '-' || a[2] == '\0') {
      if (a[0] == '-' && a[1] == '-' && a[2] == '\0' && !it->operands_only) {
        it->operands_only = 1;
        continue;
      }
      if (a[0] == '-' && a[1] != '\0' && !it->operands_only)
        return arg_usage(c, "unknown option '%s'", a);
      it->arg = a;
      return ARG_OPERAND;
    }
    char *name = a + 2, *eq = strchr(name, '=');
    const size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
    int id = -1;
    for (int k = 0; k < spec->n_opts; k++)
      if (is_named(k < TRAIN_OPT_COUNT ? &train_opt_table[k] : &spec->opts[k],
                   name, nlen))
        id = k;
    if (id < 0)
      return arg_usage(c, "unknown option '%s'", a);
    const arg_opt *opt =
        id < TRAIN_OPT_COUNT ? &train_opt_table[id] : &spec->opts[id];
    char *val = NULL;
    if (opt->has_arg) {
      if (eq)
        val = eq + 1;
      else if (it->next < argc)
        val = argv[it->next++];
      else
        return arg_usage(c, "option '%s' needs a value", a);
    } else if (eq) {
      if (spec->no_value_quotes_arg)
        return arg_usage(c, "option '%s' takes no value", a);
      return arg_usage(c, "option '--%s' takes no value", opt->name);
    }
    if (id == O_HELP) {
      for (int k = 0; spec->usage[k] && !c->quiet; k++)
        fputs(spec->usage[k], stdout);
      return 0;
    }
    if (id == O_VERSION) {
      if (!c->quiet)
        printf("%s (libimml %s)\n", c->prog, imml_version_string());
      return 0;
    }
    if (id >= TRAIN_OPT_COUNT) {
      it->id = id;
      it->arg = val;
      return ARG_OPTION;
    }
    if (train_opt_set(c, o, id, val) != 0)
      return arg_bad_value(c);
    given[id] = 1;
  }
  return ARG_END;
}

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
