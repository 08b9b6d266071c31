/* mpi-train: data-parallel twin of imml-train over MPI (doc/DISTRIBUTED.md).
 *
 * Every rank reads the modality CSV files, makes the same seeded split,
 * standardisation and per-epoch shuffle, and takes its shard of every global
 * batch (rank r: a contiguous slice of the batch, sizes differing by at most
 * one row).  libimml's collective step (imml_collective_set, one
 * MPI_Allgather per training forward) keeps the strata dictionary and the
 * predominant-modality state identical on every rank; each step is
 * imml_forward, imml_backward and imml_commit, then the gradients are summed
 * with MPI_Allreduce on imml_param_flat's gradient block and divided by the
 * number of ranks, and every rank applies the same update
 * (imml_optim_step).  Rank 0 writes the checkpoint, the statistics sidecar
 * and the metrics.
 *
 * With one rank the run is bit-identical to imml-train with the same flags
 * and BLAS thread count.  --bench trains on synthetic data of a given shape
 * and reports the time per step and its parts.
 *
 * Uses the public header imml.h, MPI, and imml-train's option (args.c),
 * CSV and data code. */
/* The collective (imml_collective_set) and imml_threads_set are in imml.h's
 * experimental part. */
#define IMML_EXPERIMENTAL
#include "data.h"
#include "rng.h"

#include <imml.h>
#include <mpi.h>

#include "../imml-train/args.h"
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Messages about option values come from rank 0 only (main sets quiet). */
static arg_ctx args_ctx = {"mpi-train", 0};

enum { EXIT_BELOW_MIN = 3 };

static int g_rank, g_size;

/* ------------------------------------------------------------------ */
/* Messages                                                            */
/* ------------------------------------------------------------------ */

/* An error after which the ranks cannot go on together: print (naming the
 * rank when there are several) and abort the whole job, so that no rank is
 * left waiting in a collective. */
#if defined(__GNUC__)
__attribute__((format(printf, 1, 2), noreturn))
#endif
static void
fatal(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  if (g_size > 1)
    fprintf(stderr, "mpi-train[rank %d]: error: ", g_rank);
  else
    fputs("mpi-train: error: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, 1);
  exit(1);
}

static void lib_fatal(const char *call, imml_status st, const imml_model *m) {
  const char *msg = m ? imml_model_errmsg(m) : "";
  fatal("%s: %s%s%s", call, imml_status_string(st), msg[0] ? ": " : "", msg);
}

/* Informational lines on stderr, rank 0 only, unless quiet. */
#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static void
note(int quiet, const char *fmt, ...) {
  if (quiet || g_rank != 0)
    return;
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
}

static void *xmalloc(size_t n) {
  void *p = malloc(n ? n : 1);
  if (!p)
    fatal("out of memory (%zu bytes)", n);
  return p;
}

/* ------------------------------------------------------------------ */
/* Options                                                             */
/* ------------------------------------------------------------------ */

typedef struct opts {
  train_opts t; /* the options shared with imml-train (args.h) */
  const char *dump_params;
  /* benchmark */
  int bench, bench_steps, bench_warmup, bench_classes;
  int bench_m, bench_dims[IMML_MAX_MODALITIES];
  char *files[IMML_MAX_MODALITIES + 1];
  int n_files;
} opts;

/* The options of mpi-train alone; the shared ones are in args.h. */
enum opt_id {
  O_DUMP = TRAIN_OPT_COUNT,
  O_BENCH,
  O_BSTEPS,
  O_BWARM,
  O_BDIMS,
  O_BCLASSES,
  O_COUNT
};

static const arg_opt opt_table[O_COUNT] = {
    [O_DUMP] = {"dump-params", 1},   [O_BENCH] = {"bench", 0},
    [O_BSTEPS] = {"bench-steps", 1}, [O_BWARM] = {"bench-warmup", 1},
    [O_BDIMS] = {"bench-dims", 1},   [O_BCLASSES] = {"bench-classes", 1},
};

static const char *const usage_text[] = {
    "Usage:\n"
    "  mpirun -np R mpi-train [OPTIONS] MOD1.csv MOD2.csv [...]\n"
    "  mpirun -np R mpi-train --bench [OPTIONS]\n"
    "\n"
    "Data-parallel twin of imml-train (doc/DISTRIBUTED.md).  Every rank reads\n"
    "the CSV files (same format as imml-train), makes the same seeded split,\n"
    "standardisation and shuffles, and trains on its shard of every global\n"
    "batch; the collective step keeps the dictionary and the predominant\n"
    "choice identical on every rank, gradients are averaged with\n"
    "MPI_Allreduce, rank 0 writes the checkpoint and the metrics.  With one\n"
    "rank the run equals imml-train's with the same options.\n"
    "\n"
    "Model (doc/METHOD.md): --hidden H (256) --knowledge K (128)\n"
    "  --dict-size J (256) --beta B (0.5) --gamma1 G (0.1) --gamma2 G (1.0)\n"
    "  --tau T (0.1) --warmup N (100) --slot-mode conditional|strict\n"
    "  --predominant auto|INDEX (auto) --seed S (0)\n"
    "Optimiser: --optimizer adamw|sgd (adamw) --lr X (0.001)\n"
    "  --weight-decay X (0) --momentum X (0, sgd only)\n"
    "Training:\n"
    "  --epochs N            (60)\n"
    "  --batch N             GLOBAL batch size (64), split across the ranks:\n"
    "                        rank r takes a contiguous slice, sizes differ by\n"
    "                        at most one row; a last batch with fewer rows\n"
    "                        than ranks is skipped (reported)\n"
    "  --test-fraction F     stratified test share in [0,1) (0.5)\n"
    "  --threads N           BLAS threads per rank (default: the cores of the\n"
    "                        node divided by the ranks on it)\n"
    "  --precision P         fp32 | bf16 (fp32): the matrix products' inputs\n"
    "                        (config.precision); bf16 falls back to fp32 with\n"
    "                        a warning unless every rank has it\n"
    "  --metrics FILE        per-epoch CSV (rank 0), as imml-train's\n"
    "  --save FILE           checkpoint + FILE.stats (rank 0); imml-train\n"
    "                        --predict FILE reads them\n"
    "  --dump-params FILE    the flat parameters as text (rank 0), one line\n"
    "                        'index name value' with 9 significant digits\n"
    "  --min-test-acc X      exit 3 if the final test accuracy is below X\n"
    "  --no-standardize      use the features as read\n"
    "  --quiet               no progress on stderr\n"
    "Benchmark (synthetic data, no files):\n"
    "  --bench               time training steps; defaults then: --hidden 512\n"
    "                        --knowledge 256 --batch 128 --predominant 0\n"
    "  --bench-dims LIST     feature widths, comma-separated (768,6144)\n"
    "  --bench-classes C     (101)\n"
    "  --bench-steps N       timed steps (20)\n"
    "  --bench-warmup N      untimed steps first (3)\n"
    "  --help, --version\n"
    "Exit status: 0 success, 1 error, 2 bad command line, 3 test accuracy\n"
    "below --min-test-acc.\n",
    NULL};

static const arg_spec args_spec = {&args_ctx, opt_table, O_COUNT, usage_text,
                                   1};

static int parse_dims(const char *s, opts *o) {
  o->bench_m = 0;
  const char *p = s;
  for (;;) {
    char *end;
    errno = 0;
    const long v = strtol(p, &end, 10);
    if (errno || end == p || v < 1 || v > (1L << 24) ||
        (*end != ',' && *end != '\0') || o->bench_m == IMML_MAX_MODALITIES) {
      if (g_rank == 0)
        fprintf(stderr,
                "mpi-train: error: --bench-dims: expected a comma-separated "
                "list of widths >= 1, got '%s'\n",
                s);
      return -1;
    }
    o->bench_dims[o->bench_m++] = (int)v;
    if (*end == '\0')
      break;
    p = end + 1;
  }
  if (o->bench_m < 2) {
    if (g_rank == 0)
      fprintf(stderr, "mpi-train: error: --bench-dims: need at least two "
                      "modalities\n");
    return -1;
  }
  return 0;
}

/* Sets one of mpi-train's own options.  @return 0 or -1. */
static int set_option(opts *o, int id, const char *v) {
  const char *name = opt_table[id].name;
  switch (id) {
  case O_DUMP:
    o->dump_params = v;
    return 0;
  case O_BENCH:
    o->bench = 1;
    return 0;
  case O_BSTEPS:
    return arg_int(&args_ctx, name, v, 1, 1000000, &o->bench_steps);
  case O_BWARM:
    return arg_int(&args_ctx, name, v, 0, 1000000, &o->bench_warmup);
  case O_BDIMS:
    return parse_dims(v, o);
  case O_BCLASSES:
    return arg_int(&args_ctx, name, v, 2, 1 << 20, &o->bench_classes);
  default:
    return 0;
  }
}

static void opts_init(opts *o) {
  memset(o, 0, sizeof *o);
  train_opts_init(&o->t);
  o->bench_steps = 20;
  o->bench_warmup = 3;
  o->bench_classes = 101;
  o->bench_m = 2;
  o->bench_dims[0] = 768;
  o->bench_dims[1] = 6144;
}

/* @return -1 to go on, or an exit status. */
static int parse_args(opts *o, int argc, char **argv) {
  train_opts *t = &o->t;
  int given[O_COUNT] = {0};
  arg_iter it = {1, 0, 0, NULL};
  int r;
  while ((r = arg_next(&args_spec, &it, argc, argv, t, given)) != ARG_END) {
    if (r >= 0)
      return r;
    if (r == ARG_OPERAND) {
      if (o->n_files == IMML_MAX_MODALITIES)
        return arg_usage(&args_ctx, "more than %d modality files",
                         IMML_MAX_MODALITIES);
      o->files[o->n_files++] = it.arg;
      continue;
    }
    if (set_option(o, it.id, it.arg) != 0)
      return arg_bad_value(&args_ctx);
    given[it.id] = 1;
  }
  if (t->momentum > 0.0f && t->optimizer != IMML_OPTIM_SGD)
    return arg_usage(&args_ctx, "--momentum applies to --optimizer sgd only");
  if (t->batch < g_size)
    return arg_usage(&args_ctx,
                     "--batch: the global batch needs at least one row per "
                     "rank (%d ranks)",
                     g_size);
  if (o->bench) {
    static const int data_only[] = {O_SAVE,   O_METRICS, O_DUMP,
                                    O_MINACC, O_FRAC,    O_EPOCHS};
    for (size_t k = 0; k < sizeof data_only / sizeof *data_only; k++)
      if (given[data_only[k]])
        return arg_usage(&args_ctx, "--%s does not apply to --bench",
                         arg_opt_name(opt_table, data_only[k]));
    if (o->n_files > 0)
      return arg_usage(&args_ctx, "--bench takes no data files ('%s')",
                       o->files[0]);
    if (!given[O_HIDDEN])
      t->hidden = 512;
    if (!given[O_KNOWLEDGE])
      t->knowledge = 256;
    if (!given[O_BATCH])
      t->batch = 128;
    if (!given[O_PRED])
      t->predominant = 0;
    if (t->predominant >= o->bench_m)
      return arg_usage(&args_ctx, "--predominant: modality indices are 0..%s",
                       o->bench_m == 2 ? "1" : "M-1");
    return -1;
  }
  if (given[O_BSTEPS] || given[O_BWARM] || given[O_BDIMS] || given[O_BCLASSES])
    return arg_usage(&args_ctx, "--bench-* options need --bench");
  if (o->n_files < 2)
    return arg_usage(&args_ctx,
                     "need at least two modality CSV files (one per "
                     "modality), got %s",
                     o->n_files == 0 ? "none" : "one");
  if (given[O_MINACC] && t->test_fraction <= 0.0)
    return arg_usage(&args_ctx, "--min-test-acc needs --test-fraction > 0");
  if (t->predominant >= o->n_files)
    return arg_usage(&args_ctx, "--predominant %d: modality indices are 0..%d",
                     t->predominant, o->n_files - 1);
  return -1;
}

/* ------------------------------------------------------------------ */
/* The collective and the gradient reduction                           */
/* ------------------------------------------------------------------ */

typedef struct comm_stats {
  double gather_s, reduce_s;
  long gathers, reduces;
} comm_stats;

/* imml_collective.allgather: one MPI_Allgather of `count` floats. */
static int mpi_allgather(void *user_data, const float *send, size_t count,
                         float *recv) {
  comm_stats *cs = user_data;
  if (count > (size_t)INT_MAX)
    return -1;
  const double t0 = MPI_Wtime();
  const int rc = MPI_Allgather(send, (int)count, MPI_FLOAT, recv, (int)count,
                               MPI_FLOAT, MPI_COMM_WORLD);
  cs->gather_s += MPI_Wtime() - t0;
  cs->gathers++;
  return rc == MPI_SUCCESS ? 0 : 2;
}

/* Sums every rank's gradients and divides by R (imml_collective_set scales
 * them so that this mean is the single-process gradient of the global
 * batch).  With one rank there is nothing to do. */
static void average_gradients(imml_model *m, comm_stats *cs) {
  if (g_size == 1)
    return;
  float *g;
  size_t n;
  imml_param_flat(m, NULL, &g, &n);
  const double t0 = MPI_Wtime();
  for (size_t done = 0; done < n;) {
    const size_t part = n - done > (size_t)INT_MAX ? (size_t)INT_MAX : n - done;
    if (MPI_Allreduce(MPI_IN_PLACE, g + done, (int)part, MPI_FLOAT, MPI_SUM,
                      MPI_COMM_WORLD) != MPI_SUCCESS)
      fatal("MPI_Allreduce of the gradients failed");
    done += part;
  }
  const float inv = 1.0f / (float)g_size;
  for (size_t i = 0; i < n; i++)
    g[i] *= inv;
  cs->reduce_s += MPI_Wtime() - t0;
  cs->reduces++;
}

/* Rows of the global batch [0, b) that rank r trains on: a contiguous
 * slice; the first b % R ranks take one row more. */
static void shard_of(int b, int r, int *off, int *rows) {
  const int base = b / g_size, extra = b % g_size;
  *rows = base + (r < extra);
  *off = r * base + (r < extra ? r : extra);
}

/* Every rank must hold the same model: compares a hash of the whole
 * checkpoint (parameters, dictionary, warm-up and optimiser state) across
 * ranks. */
static void check_ranks_agree(imml_model *m, const char *when) {
  if (g_size == 1)
    return;
  size_t n = 0;
  imml_status st = imml_model_save_mem(m, NULL, 0, &n);
  if (st != IMML_OK && st != IMML_ERR_BUFFER_SMALL)
    lib_fatal("imml_model_save_mem", st, m);
  unsigned char *buf = xmalloc(n);
  st = imml_model_save_mem(m, buf, n, &n);
  if (st != IMML_OK)
    lib_fatal("imml_model_save_mem", st, m);
  uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
  for (size_t i = 0; i < n; i++)
    h = (h ^ buf[i]) * 0x100000001b3ull;
  free(buf);
  unsigned long long v[2] = {h, ~h}, r[2];
  MPI_Allreduce(v, r, 2, MPI_UNSIGNED_LONG_LONG, MPI_MAX, MPI_COMM_WORLD);
  if (r[0] != h || r[1] != ~h)
    fatal("the ranks' models differ %s (checkpoint hashes disagree)", when);
}

/* ------------------------------------------------------------------ */
/* Model                                                               */
/* ------------------------------------------------------------------ */

/* Training shards have at most ceil(batch / R) rows: that is max_batch, so
 * the gathered buffers hold R * max_batch ~ batch rows. */
static int train_max_batch(const opts *o) {
  return (o->t.batch + g_size - 1) / g_size;
}

static imml_model *make_model(const opts *o, int m, const int *dims, int c,
                              comm_stats *cs) {
  imml_config cfg;
  imml_config_init(&cfg);
  cfg.n_modalities = m;
  cfg.dims = dims;
  cfg.n_classes = c;
  cfg.hidden_dim = o->t.hidden;
  cfg.knowledge_dim = o->t.knowledge;
  cfg.max_batch = train_max_batch(o);
  cfg.dict_size = o->t.dict_size;
  cfg.beta = o->t.beta;
  cfg.gamma1 = o->t.gamma1;
  cfg.gamma2 = o->t.gamma2;
  cfg.tau = o->t.tau;
  cfg.predominant = o->t.predominant;
  cfg.warmup_steps = o->t.warmup;
  cfg.slot_mode = o->t.slot_mode;
  cfg.seed = o->t.seed;
  cfg.precision = IMML_PRECISION_FP32;
  imml_model *model = NULL;
  imml_status st;
  if (o->t.precision == IMML_PRECISION_BF16) {
    /* bf16 where every rank has it (the ranks must compute alike);
     * otherwise fp32, with a warning that gives the library's reason. */
    cfg.precision = IMML_PRECISION_BF16;
    st = imml_model_create(&cfg, NULL, &model);
    int ok = st == IMML_OK, all = 0;
    MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!all) {
      /* each rank that lacks bf16 says why; rank 0 says what happens */
      if (!ok)
        fprintf(stderr,
                "mpi-train: rank %d: --precision bf16 is unavailable (%s: "
                "%s)\n",
                g_rank, imml_status_string(st),
                model ? imml_model_errmsg(model) : "");
      if (g_rank == 0)
        fprintf(stderr, "mpi-train: warning: --precision bf16 is "
                        "unavailable on some rank; training in fp32\n");
      imml_model_free(model);
      model = NULL;
      cfg.precision = IMML_PRECISION_FP32;
    }
  }
  if (!model)
    st = imml_model_create(&cfg, NULL, &model);
  if (st != IMML_OK) {
    /* model: NULL, or the failed handle that holds the message */
    char msg[512];
    snprintf(msg, sizeof msg, "%s", model ? imml_model_errmsg(model) : "");
    imml_model_free(model);
    fatal("imml_model_create: %s%s%s", imml_status_string(st),
          msg[0] ? ": " : "", msg);
  }
  imml_optim_config oc;
  imml_optim_config_init(&oc, (imml_optim_kind)o->t.optimizer);
  oc.lr = o->t.lr;
  oc.weight_decay = o->t.weight_decay;
  oc.momentum = o->t.momentum;
  st = imml_optim_setup(model, &oc);
  if (st != IMML_OK)
    lib_fatal("imml_optim_setup", st, model);
  imml_collective col;
  imml_collective_init(&col);
  col.world_size = g_size;
  col.rank = g_rank;
  col.allgather = mpi_allgather;
  col.user_data = cs;
  st = imml_collective_set(model, &col);
  if (st != IMML_OK)
    lib_fatal("imml_collective_set", st, model);
  return model;
}

/* One training step on this rank's shard: forward (with the allgather),
 * backward, commit (the global batch enters the dictionary, the warm-up
 * advances), gradient average, update.  t: NULL, or += the seconds of
 * forward, backward + commit, gradient average and update. */
static void train_step(imml_model *model, int b, const float *const *feat,
                       const int *y, imml_losses *L, comm_stats *cs,
                       double *t) {
  double t0 = MPI_Wtime();
  imml_status st = imml_forward(model, IMML_MODE_TRAIN, b, feat, y, NULL, L);
  if (st != IMML_OK)
    lib_fatal("imml_forward", st, model);
  double t1 = MPI_Wtime();
  st = imml_backward(model, NULL);
  if (st != IMML_OK)
    lib_fatal("imml_backward", st, model);
  st = imml_commit(model);
  if (st != IMML_OK)
    lib_fatal("imml_commit", st, model);
  double t2 = MPI_Wtime();
  average_gradients(model, cs);
  double t3 = MPI_Wtime();
  st = imml_optim_step(model);
  if (st != IMML_OK)
    lib_fatal("imml_optim_step", st, model);
  double t4 = MPI_Wtime();
  if (t) {
    t[0] += t1 - t0;
    t[1] += t2 - t1;
    t[2] += t3 - t2;
    t[3] += t4 - t3;
  }
}

/* Correct predictions over all rows of ds: every rank predicts a slice
 * (imml_predict on its model: prediction stays local, the collective is not
 * used) and the counts are summed. */
static double accuracy_all(imml_model *model, const dataset *ds, int *pred) {
  if (ds->n == 0)
    return NAN;
  imml_config cfg;
  imml_config_init(&cfg);
  imml_model_get_config(model, &cfg);
  const int lo = (int)((long long)ds->n * g_rank / g_size);
  const int hi = (int)((long long)ds->n * (g_rank + 1) / g_size);
  long long ok = 0;
  for (int i0 = lo; i0 < hi; i0 += cfg.max_batch) {
    const int b = hi - i0 < cfg.max_batch ? hi - i0 : cfg.max_batch;
    const float *feat[IMML_MAX_MODALITIES];
    for (int m = 0; m < ds->m; m++)
      feat[m] = ds->x[m] + (size_t)i0 * (size_t)ds->d[m];
    const imml_status st = imml_predict(model, b, feat, NULL, NULL, pred);
    if (st != IMML_OK)
      lib_fatal("imml_predict", st, model);
    for (int i = 0; i < b; i++)
      ok += pred[i] == ds->y[i0 + i];
  }
  long long all = 0;
  MPI_Allreduce(&ok, &all, 1, MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD);
  return (double)all / (double)ds->n;
}

static void dump_params(imml_model *model, const char *path) {
  FILE *f = fopen(path, "w");
  if (!f)
    fatal("%s: cannot create: %s", path, strerror(errno));
  size_t idx = 0;
  for (int t = 0; t < imml_param_count(model); t++) {
    imml_param_view v;
    imml_param_get(model, t, &v);
    const size_t n = (size_t)v.rows * (size_t)v.cols;
    for (size_t i = 0; i < n; i++, idx++)
      fprintf(f, "%zu %s %.9g\n", idx, v.name, (double)v.data[i]);
  }
  if (ferror(f) | fclose(f))
    fatal("%s: write error", path);
}

/* ------------------------------------------------------------------ */
/* Training on CSV data                                                */
/* ------------------------------------------------------------------ */

static int do_train(const opts *o) {
  raw_data rd;
  dataset tr = {0}, te = {0};
  stdz sz = {0};
  int *tr_idx = NULL, *te_idx = NULL, ntr = 0, nte = 0;
  char err[1024];
  if (raw_load(&rd, o->n_files, o->files, NULL, err, sizeof err) != 0)
    fatal("%s", err);
  if (check_classes(rd.y, rd.n, rd.c, "data rows", err, sizeof err) != 0)
    fatal("%s", err);
  if (split_stratified(rd.y, rd.n, rd.c, o->t.test_fraction, o->t.seed, &tr_idx,
                       &ntr, &te_idx, &nte, err, sizeof err) != 0)
    fatal("%s", err);
  if (stdz_fit(&sz, &rd, tr_idx, ntr, o->t.no_standardize) != 0 ||
      stdz_apply(&sz, &rd, tr_idx, ntr, &tr) != 0 ||
      stdz_apply(&sz, &rd, te_idx, nte, &te) != 0)
    fatal("out of memory");
  const int M = rd.m, N = tr.n, B = o->t.batch;
  if (N < g_size)
    fatal("%d training rows cannot be shared by %d ranks", N, g_size);
  FILE *metrics = NULL;
  if (o->t.metrics && g_rank == 0) {
    metrics = fopen(o->t.metrics, "w");
    if (!metrics)
      fatal("%s: cannot create: %s", o->t.metrics, strerror(errno));
    fprintf(metrics, "epoch,loss,ce,con,dis,train_acc,test_acc,seconds\n");
  }
  comm_stats cs = {0, 0, 0, 0};
  imml_model *model = make_model(o, M, rd.d, rd.c, &cs);
  const int nb_full = (N + B - 1) / B, last = N - (nb_full - 1) * B;
  const int nb = last < g_size ? nb_full - 1 : nb_full;
  {
    int o0, b0, o1, b1;
    shard_of(B < N ? B : N, 0, &o0, &b0);
    shard_of(B < N ? B : N, g_size - 1, &o1, &b1);
    note(o->t.quiet,
         "mpi-train: %d ranks, %d modalities, %d classes, %d training rows, "
         "%d test rows; global batch %d, shards of %d..%d rows, %d steps per "
         "epoch\n",
         g_size, M, rd.c, N, te.n, B, b1, b0, nb);
    if (nb < nb_full)
      note(o->t.quiet,
           "mpi-train: the last batch of each epoch (%d rows) has fewer rows "
           "than ranks and is skipped\n",
           last);
  }
  int *perm = xmalloc((size_t)N * sizeof(int));
  const int smax = (B + g_size - 1) / g_size;
  int *yb = xmalloc((size_t)smax * sizeof(int));
  imml_config mc;
  imml_config_init(&mc);
  imml_model_get_config(model, &mc);
  int *pred = xmalloc((size_t)mc.max_batch * sizeof(int));
  float *xb[IMML_MAX_MODALITIES];
  for (int m = 0; m < M; m++)
    xb[m] = xmalloc((size_t)smax * (size_t)tr.d[m] * sizeof(float));
  for (int i = 0; i < N; i++)
    perm[i] = i;
  trng rng;
  trng_seed(&rng, o->t.seed, 2); /* imml-train's shuffle stream */
  const double t0 = MPI_Wtime();
  double train_acc = NAN, test_acc = NAN;
  for (int ep = 1; ep <= o->t.epochs; ep++) {
    trng_shuffle(&rng, perm, (size_t)N);
    double sum[5] = {0, 0, 0, 0, 0}; /* total, ce, con, dis, rows */
    for (int b = 0; b < nb; b++) {
      const int i0 = b * B, bs = N - i0 < B ? N - i0 : B;
      int off, rows;
      shard_of(bs, g_rank, &off, &rows);
      const float *feat[IMML_MAX_MODALITIES];
      for (int m = 0; m < M; m++) {
        const size_t d = (size_t)tr.d[m];
        for (int i = 0; i < rows; i++)
          memcpy(xb[m] + (size_t)i * d,
                 tr.x[m] + (size_t)perm[i0 + off + i] * d, d * sizeof(float));
        feat[m] = xb[m];
      }
      for (int i = 0; i < rows; i++)
        yb[i] = tr.y[perm[i0 + off + i]];
      imml_losses L;
      train_step(model, rows, feat, yb, &L, &cs, NULL);
      /* ce, dis: this rank's means; con: the global batch's.  Weighted by
       * the shard's rows, their sum over ranks is the global batch's. */
      sum[0] += L.total * rows;
      sum[1] += L.ce * rows;
      sum[2] += L.con * rows;
      sum[3] += L.dis * rows;
      sum[4] += rows;
    }
    double all[5];
    MPI_Allreduce(sum, all, 5, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    train_acc = accuracy_all(model, &tr, pred);
    test_acc = accuracy_all(model, &te, pred);
    const double secs = MPI_Wtime() - t0;
    note(o->t.quiet,
         "epoch %d/%d | %.1fs | train %.2f%% test %.2f%% | loss %.4f ce %.4f "
         "con %.4f dis %.4f\n",
         ep, o->t.epochs, secs, 100.0 * train_acc, 100.0 * test_acc,
         all[0] / all[4], all[1] / all[4], all[2] / all[4], all[3] / all[4]);
    if (metrics) {
      fprintf(metrics, "%d,%.6f,%.6f,%.6f,%.6f,%.6f,", ep, all[0] / all[4],
              all[1] / all[4], all[2] / all[4], all[3] / all[4], train_acc);
      if (isnan(test_acc))
        fprintf(metrics, "nan");
      else
        fprintf(metrics, "%.6f", test_acc);
      fprintf(metrics, ",%.3f\n", secs);
      fflush(metrics);
    }
  }
  const double secs = MPI_Wtime() - t0;
  check_ranks_agree(model, "after training");
  int rc = 0;
  if (g_rank == 0) {
    if (metrics && (ferror(metrics) | fclose(metrics)))
      fatal("%s: write error", o->t.metrics);
    int p = -1, fixed = 0;
    imml_predominant_get(model, &p, &fixed);
    printf("ranks %d, global batch %d\n", g_size, B);
    printf("train accuracy %.6f\n", train_acc);
    if (te.n > 0)
      printf("test accuracy %.6f\n", test_acc);
    if (p >= 0) {
      char b[200];
      base_name(rd.path[p], b, sizeof b);
      printf("predominant modality %d (%s)%s\n", p, b,
             o->t.predominant >= 0 ? ", given" : ", chosen after warm-up");
    } else {
      printf("predominant modality not chosen yet (warm-up longer than "
             "training)\n");
    }
    printf("training time %.1fs (allgather %.2fs, allreduce %.2fs)\n", secs,
           cs.gather_s, cs.reduce_s);
    fflush(stdout);
    if (o->t.save) {
      const imml_status st = imml_model_save(model, o->t.save);
      if (st != IMML_OK)
        lib_fatal("imml_model_save", st, model);
      char spath[4096];
      snprintf(spath, sizeof spath, "%s.stats", o->t.save);
      if (stdz_save(&sz, spath, err, sizeof err) != 0)
        fatal("%s", err);
      note(o->t.quiet, "mpi-train: saved %s and %s\n", o->t.save, spath);
    }
    if (o->dump_params)
      dump_params(model, o->dump_params);
    if (o->t.min_test_acc > 0.0 && !(test_acc >= o->t.min_test_acc)) {
      fprintf(stderr,
              "mpi-train: error: test accuracy %.6f is below "
              "--min-test-acc %.6f\n",
              test_acc, o->t.min_test_acc);
      rc = EXIT_BELOW_MIN;
    }
  }
  MPI_Bcast(&rc, 1, MPI_INT, 0, MPI_COMM_WORLD);
  for (int m = 0; m < M; m++)
    free(xb[m]);
  free(perm);
  free(yb);
  free(pred);
  imml_model_free(model);
  free(tr_idx);
  free(te_idx);
  dataset_free(&tr);
  dataset_free(&te);
  stdz_free(&sz);
  raw_free(&rd);
  return rc;
}

/* ------------------------------------------------------------------ */
/* Benchmark on synthetic data                                         */
/* ------------------------------------------------------------------ */

#define BENCH_POOL 4 /* distinct synthetic shards, cycled */

static double uniform(trng *r) {
  return (double)(trng_next(r) >> 11) * 0x1.0p-53;
}

static int do_bench(const opts *o) {
  const int M = o->bench_m, C = o->bench_classes, B = o->t.batch;
  int off, rows;
  shard_of(B, g_rank, &off, &rows);
  /* Synthetic features: this rank's own stream; class-dependent means so
   * that the model has something to learn. */
  trng r;
  trng_seed(&r, o->t.seed, 100 + (uint64_t)g_rank);
  float *x[BENCH_POOL][IMML_MAX_MODALITIES];
  int *y[BENCH_POOL];
  for (int s = 0; s < BENCH_POOL; s++) {
    y[s] = xmalloc((size_t)rows * sizeof(int));
    for (int i = 0; i < rows; i++)
      y[s][i] = (int)trng_below(&r, (size_t)C);
    for (int m = 0; m < M; m++) {
      const size_t d = (size_t)o->bench_dims[m];
      x[s][m] = xmalloc((size_t)rows * d * sizeof(float));
      for (int i = 0; i < rows; i++)
        for (size_t j = 0; j < d; j++)
          x[s][m][(size_t)i * d + j] =
              (float)(2.0 * uniform(&r) - 1.0 +
                      ((size_t)y[s][i] % d == j ? 1.0 : 0.0));
    }
  }
  comm_stats cs = {0, 0, 0, 0};
  imml_model *model = make_model(o, M, o->bench_dims, C, &cs);
  size_t np;
  imml_param_flat(model, NULL, NULL, &np);
  double t[4] = {0, 0, 0, 0};
  imml_losses L;
  for (int s = 0; s < o->bench_warmup; s++)
    train_step(model, rows, (const float *const *)x[s % BENCH_POOL],
               y[s % BENCH_POOL], &L, &cs, NULL);
  MPI_Barrier(MPI_COMM_WORLD);
  cs.gather_s = cs.reduce_s = 0.0;
  const double t0 = MPI_Wtime();
  for (int s = 0; s < o->bench_steps; s++)
    train_step(model, rows, (const float *const *)x[s % BENCH_POOL],
               y[s % BENCH_POOL], &L, &cs, t);
  MPI_Barrier(MPI_COMM_WORLD);
  const double wall = MPI_Wtime() - t0;
  check_ranks_agree(model, "after the benchmark");
  /* Per step, the slowest rank's parts. */
  double mine[6] = {t[0] - cs.gather_s, cs.gather_s, t[1], t[2], t[3], 0.0},
         worst[6];
  MPI_Reduce(mine, worst, 6, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
  if (g_rank == 0) {
    imml_config mc;
    imml_config_init(&mc);
    imml_model_get_config(model, &mc);
    const double n = o->bench_steps, ms = 1e3 * wall / n;
    const double gmax = (double)g_size * mc.max_batch;
    /* gathered buffers: send + R messages, per modality z, nz, r (G rows)
     * and S, S^T (G x G); dS, dS^T (G x G) */
    const double msg =
        1.0 + M + mc.max_batch * (1.0 + (double)M * mc.knowledge_dim);
    const double gbytes =
        4.0 * (msg * (1.0 + g_size) +
               M * (gmax * (2.0 * mc.knowledge_dim + 1.0) + 2.0 * gmax * gmax) +
               2.0 * gmax * gmax + gmax);
    printf("bench: ranks %d, global batch %d (shard %d), dims", g_size, B,
           rows);
    for (int m = 0; m < M; m++)
      printf("%s%d", m ? "," : " ", o->bench_dims[m]);
    printf(", H %d, k %d, C %d, J %d, p %d, BLAS threads %d, %s\n", o->t.hidden,
           o->t.knowledge, C, o->t.dict_size, o->t.predominant,
           imml_threads_set(0) > 0 ? imml_threads_set(0) : -1,
           mc.precision == IMML_PRECISION_BF16 ? "bf16" : "fp32");
    printf("bench: %.1f ms/step, %.0f samples/s over %d steps\n", ms,
           B * n / wall, o->bench_steps);
    printf("bench: slowest rank per step: forward %.1f ms + allgather %.2f ms "
           "+ backward and commit %.1f ms + allreduce %.2f ms + update %.1f "
           "ms\n",
           1e3 * worst[0] / n, 1e3 * worst[1] / n, 1e3 * worst[2] / n,
           1e3 * worst[3] / n, 1e3 * worst[4] / n);
    printf("bench: allreduce %zu floats (%.1f MiB), gathered buffers %.1f "
           "MiB per rank\n",
           np, 4.0 * (double)np / 1048576.0, gbytes / 1048576.0);
    fflush(stdout);
  }
  for (int s = 0; s < BENCH_POOL; s++) {
    free(y[s]);
    for (int m = 0; m < M; m++)
      free(x[s][m]);
  }
  imml_model_free(model);
  return 0;
}

/* BLAS threads per rank: the cores of this node shared by its ranks. */
static void set_threads(const opts *o) {
  int n = o->t.threads;
  if (n == 0) {
    MPI_Comm node;
    int local = 1;
    if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, g_rank,
                            MPI_INFO_NULL, &node) == MPI_SUCCESS) {
      MPI_Comm_size(node, &local);
      MPI_Comm_free(&node);
    }
    const long cores = sysconf(_SC_NPROCESSORS_ONLN);
    n = cores > local ? (int)(cores / local) : 1;
  }
  imml_threads_set(n);
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  args_ctx.quiet = g_rank != 0;
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  if (imml_version_number() != IMML_VERSION_NUMBER) {
    if (g_rank == 0)
      fprintf(stderr, "mpi-train: built for libimml %s but linked with %s\n",
              IMML_VERSION_STRING, imml_version_string());
    MPI_Finalize();
    return 1;
  }
  opts o;
  opts_init(&o);
  int rc = parse_args(&o, argc, argv);
  if (rc < 0) {
    set_threads(&o);
    rc = o.bench ? do_bench(&o) : do_train(&o);
  }
  MPI_Finalize();
  return rc;
}
