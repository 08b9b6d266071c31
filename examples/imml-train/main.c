/* imml-train: trains, evaluates and compares IMML models on CSV data, one
 * file per modality, through libimml's public API (imml.h) only. */
/* imml_threads_set() (--threads) is in imml.h's experimental part. */
#define IMML_EXPERIMENTAL
#include "args.h"
#include "compare.h"
#include "data.h"
#include "train.h"

#include <imml.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const arg_ctx args_ctx = {"imml-train", 0};

#ifndef IMML_DATA_DIR
#define IMML_DATA_DIR "examples/data/mfeat"
#endif

/* The demo: fac (216 profile correlations, the predominant view) with mor
 * (6 morphological features, a weak auxiliary view), tuned to finish in
 * well under two minutes on two cores (see README.md). */
#define DEMO_SEEDS 5
#define DEMO_EPOCHS 60

#define STR_(x) #x
#define STR(x) STR_(x)

enum { EXIT_BELOW_MIN = 3 };

static const char *const usage_text[] = {
    "Usage:\n"
    "  imml-train [OPTIONS] MOD1.csv MOD2.csv [...]       train, 50/50 split\n"
    "  imml-train [OPTIONS] --train A.csv,B.csv --test A2.csv,B2.csv\n"
    "  imml-train --compare N [OPTIONS] MOD1.csv MOD2.csv [...]\n"
    "  imml-train --demo [--data-dir DIR] [OPTIONS]\n"
    "  imml-train --predict MODEL [--stats FILE] [--out FILE] MOD1.csv ...\n"
    "\n"
    "Data: one CSV file per modality, in the same modality order every time.\n"
    "Each file has a header row, then one sample per row, the same samples in\n"
    "the same order in every file, and the class label in the last column:\n"
    "integers 0..C-1 (C = largest label + 1; every class must occur), equal\n"
    "across files.  Features are standardised per column with the training\n"
    "rows' mean and (population) standard deviation; a constant column gets\n"
    "std 1.\n"
    "\n",
    "Model (doc/METHOD.md):\n"
    "  --hidden H            branch hidden width (256)\n"
    "  --knowledge K         knowledge width k (128)\n"
    "  --dict-size J         strata dictionary capacity (256)\n"
    "  --beta B              front-door mixing beta in [0,1] (0.5)\n"
    "  --gamma1 G            weight of the contrastive loss (0.1)\n"
    "  --gamma2 G            weight of the unimodal heads' loss (1.0)\n"
    "  --tau T               contrastive temperature (0.1)\n"
    "  --warmup N            warm-up steps before p is chosen (100)\n"
    "  --slot-mode MODE      conditional | strict (conditional)\n"
    "  --predominant P       auto | modality index, 0-based in file order\n"
    "                        (auto)\n"
    "  --seed S              seed of the split, shuffles and initial weights\n"
    "                        (0)\n"
    "Optimiser:\n"
    "  --optimizer NAME      adamw | sgd (adamw)\n"
    "  --lr X                learning rate (0.001)\n"
    "  --weight-decay X      decoupled for AdamW, L2 for SGD (0: AdamW = "
    "Adam)\n"
    "  --momentum X          SGD momentum in [0,1) (0)\n"
    "Training:\n"
    "  --epochs N            (60)\n"
    "  --batch N             batch size; the last batch may be smaller (64)\n"
    "  --threads N           BLAS threads (imml_threads_set); default: "
    "BLAS's\n"
    "                        own default\n"
    "  --test-fraction F     stratified test share in [0,1) (0.5); 0 trains "
    "on\n"
    "                        every row and reports no test accuracy\n"
    "  --train LIST          comma-separated training files (instead of the\n"
    "                        positional files)\n"
    "  --test LIST           comma-separated test files, one per modality: no\n"
    "                        split, the training files are all training rows\n"
    "  --metrics FILE        per-epoch CSV: epoch,loss,ce,con,dis,train_acc,\n"
    "                        test_acc,seconds (accuracies in 0..1, seconds\n"
    "                        since the start of training)\n"
    "  --save FILE           save the model (imml_model_save) and its "
    "standardisation\n"
    "                        statistics to FILE.stats\n"
    "  --write-split DIR     write the split as DIR/NAME.train.csv and\n"
    "                        DIR/NAME.test.csv (raw values, exact)\n"
    "  --min-test-acc X      exit with status 3 if the final test accuracy\n"
    "                        (0..1) is below X\n"
    "  --no-standardize      use the features as read (the saved statistics\n"
    "                        are then mean 0, std 1)\n"
    "  --quiet               no progress on stderr\n",
    "Prediction:\n"
    "  --predict MODEL       load MODEL (imml_model_load) and MODEL.stats,\n"
    "                        predict every row of the given files\n"
    "  --stats FILE          statistics file (default MODEL.stats)\n"
    "  --out FILE            write predictions here (default stdout)\n"
    "  Each file must have the model's feature columns, optionally followed "
    "by\n"
    "  the label column; with labels the accuracy is printed on stderr.\n"
    "  Output: a header 'index,predicted,p_0,...,p_{C-1}', then one line per\n"
    "  row: 0-based row index, predicted class, class probabilities.\n",
    "Comparison:\n"
    "  --compare N           for seeds S..S+N-1 (S = --seed), split with that\n"
    "                        seed and train on the same split and seed:\n"
    "    unimodal            the predominant modality alone: an M=2 model "
    "whose\n"
    "                        second input is a constant 0 of width 1, gamma1 "
    "=\n"
    "                        gamma2 = 0, no front-door (a unimodal MLP)\n"
    "    late fusion         all modalities, gamma1 = gamma2 = 0, no "
    "front-door\n"
    "                        (automatic p with a warm-up longer than "
    "training,\n"
    "                        so every slot stays z_m)\n"
    "    late fusion + heads as late fusion with gamma2 = --gamma2\n"
    "    IMML conditional    the full method, --slot-mode conditional\n"
    "    IMML strict         the full method, --slot-mode strict\n"
    "                        With --predominant auto the predominant modality\n"
    "                        of a seed is the one its IMML conditional run\n"
    "                        chose; the unimodal baseline uses it, and the\n"
    "                        shuffled test permutes the test rows of every\n"
    "                        other modality (one seeded permutation, labels\n"
    "                        unchanged).  The table gives test accuracy,\n"
    "                        macro-F1 and the shuffled accuracy, mean +- "
    "sample\n"
    "                        std over seeds, and each modality's unimodal "
    "head\n"
    "                        accuracy from the IMML conditional runs.\n"
    "  --demo                --compare " STR(
        DEMO_SEEDS) " on fac (predominant) +\n"
                    "                        mor (auxiliary) of the shipped "
                    "mfeat data,\n"
                    "                        " STR(
                        DEMO_EPOCHS) " epochs\n"
                                     "                        (--compare and "
                                     "--epochs override)\n"
                                     "  --data-dir DIR        the mfeat "
                                     "directory for --demo (default:\n"
                                     "                        " IMML_DATA_DIR
                                     ")\n"
                                     "\n"
                                     "  --help, --version\n"
                                     "Exit status: 0 success, 1 error (data, "
                                     "file or library), 2 bad command\n"
                                     "line, 3 test accuracy below "
                                     "--min-test-acc.\n",
    NULL};

/* The options of imml-train alone; the shared ones are in args.h. */
enum opt_id {
  O_TRAIN = TRAIN_OPT_COUNT,
  O_TEST,
  O_SPLIT,
  O_PREDICT,
  O_STATS,
  O_OUT,
  O_COMPARE,
  O_DEMO,
  O_DATADIR,
  O_COUNT
};

static const arg_opt opt_table[O_COUNT] = {
    [O_TRAIN] = {"train", 1},       [O_TEST] = {"test", 1},
    [O_SPLIT] = {"write-split", 1}, [O_PREDICT] = {"predict", 1},
    [O_STATS] = {"stats", 1},       [O_OUT] = {"out", 1},
    [O_COMPARE] = {"compare", 1},   [O_DEMO] = {"demo", 0},
    [O_DATADIR] = {"data-dir", 1},
};

static const arg_spec args_spec = {&args_ctx, opt_table, O_COUNT, usage_text,
                                   0};

typedef struct cli {
  train_opts o;
  int given[O_COUNT];
  int compare;
  const char *split_dir, *predict, *stats, *out, *data_dir;
  char *train_list, *test_list; /* owned copies, split in place */
  char *files[IMML_MAX_MODALITIES + 1];
  int n_files;
  char *test_files[IMML_MAX_MODALITIES + 1];
  int n_test_files;
} cli;

/* Splits a comma-separated list in place. */
static int split_list(const char *name, char *list, char **out, int *n) {
  *n = 0;
  for (char *p = list;;) {
    char *comma = strchr(p, ',');
    if (comma)
      *comma = '\0';
    if (*p == '\0') {
      fprintf(stderr, "imml-train: error: --%s: empty file name in the list\n",
              name);
      return -1;
    }
    if (*n == IMML_MAX_MODALITIES) {
      fprintf(stderr, "imml-train: error: --%s: more than %d files\n", name,
              IMML_MAX_MODALITIES);
      return -1;
    }
    out[(*n)++] = p;
    if (!comma)
      break;
    p = comma + 1;
  }
  return 0;
}

/* Sets one of imml-train's own options.  @return 0 or -1. */
static int set_option(cli *c, int id, const char *v) {
  const char *name = opt_table[id].name;
  long l;
  switch (id) {
  case O_COMPARE:
    if (arg_long(&args_ctx, name, v, 1, 10000, &l) != 0)
      return -1;
    c->compare = (int)l;
    return 0;
  case O_TRAIN:
  case O_TEST: {
    const size_t len = strlen(v) + 1;
    char *copy = malloc(len);
    if (!copy) {
      fprintf(stderr, "imml-train: error: out of memory\n");
      return -1;
    }
    memcpy(copy, v, len);
    if (id == O_TRAIN) {
      free(c->train_list);
      c->train_list = copy;
      return split_list(name, copy, c->files, &c->n_files);
    }
    free(c->test_list);
    c->test_list = copy;
    return split_list(name, copy, c->test_files, &c->n_test_files);
  }
  case O_SPLIT:
    c->split_dir = v;
    return 0;
  case O_PREDICT:
    c->predict = v;
    return 0;
  case O_STATS:
    c->stats = v;
    return 0;
  case O_OUT:
    c->out = v;
    return 0;
  case O_DATADIR:
    c->data_dir = v;
    return 0;
  default:
    return 0;
  }
}

/* Parses argv into *c.  @return -1 to continue, or an exit status. */
static int parse_args(cli *c, int argc, char **argv) {
  arg_iter it = {1, 0, 0, NULL};
  int positional = 0, r;
  while ((r = arg_next(&args_spec, &it, argc, argv, &c->o, c->given)) !=
         ARG_END) {
    if (r >= 0)
      return r;
    if (r == ARG_OPERAND) {
      if (c->given[O_TRAIN])
        return arg_usage(&args_ctx,
                         "'%s': give the training files either as "
                         "arguments or with --train",
                         it.arg);
      if (c->n_files == IMML_MAX_MODALITIES)
        return arg_usage(&args_ctx, "more than %d modality files",
                         IMML_MAX_MODALITIES);
      c->files[c->n_files++] = it.arg;
      positional = 1;
      continue;
    }
    if (it.id == O_TRAIN && positional)
      return arg_usage(&args_ctx, "--train: give the training files either as "
                                  "arguments or with --train");
    if (set_option(c, it.id, it.arg) != 0)
      return arg_bad_value(&args_ctx);
    c->given[it.id] = 1;
  }
  return -1;
}

/* Cross-checks of the options, before any file is read. */
static int check_args(cli *c) {
  const int *g = c->given;
  if (c->o.momentum > 0.0f && c->o.optimizer != IMML_OPTIM_SGD)
    return arg_usage(&args_ctx, "--momentum applies to --optimizer sgd only");
  if (c->predict) {
    static const int train_only[] = {O_COMPARE, O_DEMO,  O_TEST,   O_METRICS,
                                     O_SAVE,    O_SPLIT, O_MINACC, O_FRAC};
    for (size_t k = 0; k < sizeof train_only / sizeof *train_only; k++)
      if (g[train_only[k]])
        return arg_usage(&args_ctx, "--%s cannot be used with --predict",
                         arg_opt_name(opt_table, train_only[k]));
    if (c->n_files < 1)
      return arg_usage(&args_ctx, "--predict needs the modality CSV files");
    return -1;
  }
  if (g[O_STATS] || g[O_OUT])
    return arg_usage(&args_ctx, "--stats and --out are options of --predict");
  if (g[O_DEMO]) {
    if (c->n_files > 0)
      return arg_usage(&args_ctx,
                       "--demo takes no data files (see --data-dir)");
    if (g[O_TEST])
      return arg_usage(&args_ctx, "--demo makes its own splits: no --test");
    static char fac[4096], mor[4096];
    const char *dir = c->data_dir ? c->data_dir : IMML_DATA_DIR;
    snprintf(fac, sizeof fac, "%s/mfeat-fac.csv", dir);
    snprintf(mor, sizeof mor, "%s/mfeat-mor.csv", dir);
    c->files[0] = fac;
    c->files[1] = mor;
    c->n_files = 2;
    if (!g[O_COMPARE])
      c->compare = DEMO_SEEDS;
    if (!g[O_EPOCHS])
      c->o.epochs = DEMO_EPOCHS;
  } else if (g[O_DATADIR]) {
    return arg_usage(&args_ctx, "--data-dir is an option of --demo");
  }
  if (c->n_files < 2)
    return arg_usage(&args_ctx,
                     "need at least two modality CSV files (one per "
                     "modality), got %s",
                     c->n_files == 0 ? "none" : "one");
  if (c->compare || g[O_DEMO]) {
    static const int no_compare[] = {O_TEST, O_SAVE, O_METRICS, O_SPLIT,
                                     O_MINACC};
    for (size_t k = 0; k < sizeof no_compare / sizeof *no_compare; k++)
      if (g[no_compare[k]])
        return arg_usage(&args_ctx, "--%s cannot be used with --compare",
                         arg_opt_name(opt_table, no_compare[k]));
    if (c->o.test_fraction <= 0.0)
      return arg_usage(&args_ctx, "--compare needs --test-fraction > 0");
  }
  if (g[O_TEST]) {
    if (g[O_FRAC] || g[O_SPLIT])
      return arg_usage(&args_ctx,
                       "--test gives the test rows: no --test-fraction or "
                       "--write-split");
    if (c->n_test_files != c->n_files)
      return arg_usage(&args_ctx,
                       "--test has %d files but there are %d training "
                       "files: give one test file per modality",
                       c->n_test_files, c->n_files);
  } else if (g[O_MINACC] && c->o.test_fraction <= 0.0) {
    return arg_usage(&args_ctx,
                     "--min-test-acc needs test rows (--test-fraction > 0 "
                     "or --test)");
  }
  if (c->o.predominant >= c->n_files)
    return arg_usage(&args_ctx, "--predominant %d: modality indices are 0..%d",
                     c->o.predominant, c->n_files - 1);
  return -1;
}

/* ------------------------------------------------------------------ */

static int check_test_labels(const raw_data *te, int c) {
  for (int i = 0; i < te->n; i++)
    if (te->y[i] >= c) {
      errorf("%s: data row %d has label %d, but the training files have "
             "classes 0..%d only",
             te->path[0], i + 1, te->y[i], c - 1);
      return -1;
    }
  return 0;
}

static int write_split_files(const cli *c, const raw_data *rd, const int *tr,
                             int ntr, const int *te, int nte) {
  for (int m = 0; m < rd->m; m++) {
    char base[256], path[4096], err[512];
    base_name(rd->path[m], base, sizeof base);
    snprintf(path, sizeof path, "%s/%s.train.csv", c->split_dir, base);
    if (write_rows(rd, m, tr, ntr, path, err, sizeof err) != 0) {
      errorf("%s", err);
      return -1;
    }
    snprintf(path, sizeof path, "%s/%s.test.csv", c->split_dir, base);
    if (write_rows(rd, m, te, nte, path, err, sizeof err) != 0) {
      errorf("%s", err);
      return -1;
    }
  }
  return 0;
}

static int do_train(cli *c) {
  train_opts *o = &c->o;
  raw_data rd = {0}, rt = {0};
  dataset tr = {0}, te = {0};
  stdz sz = {0};
  int *tr_idx = NULL, *te_idx = NULL, ntr = 0, nte = 0;
  imml_model *model = NULL;
  FILE *metrics = NULL;
  int rc = 1;
  char err[1024];
  if (raw_load(&rd, c->n_files, c->files, NULL, err, sizeof err) != 0) {
    errorf("%s", err);
    goto out;
  }
  if (c->given[O_TEST]) {
    if (raw_load(&rt, c->n_test_files, c->test_files, NULL, err, sizeof err) !=
        0) {
      errorf("%s", err);
      goto out;
    }
    for (int m = 0; m < rd.m; m++)
      if (rt.d[m] != rd.d[m]) {
        errorf("%s has %d feature columns but the training file %s has %d",
               rt.path[m], rt.d[m], rd.path[m], rd.d[m]);
        goto out;
      }
    if (check_classes(rd.y, rd.n, rd.c, "training rows", err, sizeof err) !=
        0) {
      errorf("%s", err);
      goto out;
    }
    if (check_test_labels(&rt, rd.c) != 0)
      goto out;
    tr_idx = malloc((size_t)rd.n * sizeof(int));
    if (!tr_idx)
      goto oom;
    for (int i = 0; i < rd.n; i++)
      tr_idx[i] = i;
    ntr = rd.n;
    if (stdz_fit(&sz, &rd, tr_idx, ntr, o->no_standardize) != 0 ||
        stdz_apply(&sz, &rd, NULL, 0, &tr) != 0 ||
        stdz_apply(&sz, &rt, NULL, 0, &te) != 0)
      goto oom;
  } else {
    if (check_classes(rd.y, rd.n, rd.c, "data rows", err, sizeof err) != 0) {
      errorf("%s", err);
      goto out;
    }
    if (split_stratified(rd.y, rd.n, rd.c, c->o.test_fraction, o->seed, &tr_idx,
                         &ntr, &te_idx, &nte, err, sizeof err) != 0) {
      errorf("%s", err);
      goto out;
    }
    if (stdz_fit(&sz, &rd, tr_idx, ntr, o->no_standardize) != 0 ||
        stdz_apply(&sz, &rd, tr_idx, ntr, &tr) != 0 ||
        stdz_apply(&sz, &rd, te_idx, nte, &te) != 0)
      goto oom;
    if (c->split_dir &&
        write_split_files(c, &rd, tr_idx, ntr, te_idx, nte) != 0)
      goto out;
  }
  if (c->o.metrics) {
    metrics = fopen(c->o.metrics, "w");
    if (!metrics) {
      errorf("%s: cannot create: %s", c->o.metrics, strerror(errno));
      goto out;
    }
    fprintf(metrics, "epoch,loss,ce,con,dis,train_acc,test_acc,seconds\n");
  }
  notef(o->quiet,
        "imml-train: %d modalities, %d classes, %d training rows, %d test "
        "rows\n",
        rd.m, rd.c, tr.n, te.n);
  imml_config cfg;
  make_config(o, rd.m, rd.d, rd.c, &cfg);
  run_spec spec = {"", 1, 1, 0, metrics};
  epoch_report rep;
  if (train_run(o, &cfg, &tr, &te, &spec, &model, &rep) != 0)
    goto out;
  if (metrics) {
    const int bad = ferror(metrics);
    if (fclose(metrics) != 0 || bad) {
      metrics = NULL;
      errorf("%s: write error", c->o.metrics);
      goto out;
    }
    metrics = NULL;
  }
  int p = -1, fixed = 0;
  imml_predominant_get(model, &p, &fixed);
  char pname[256] = "not chosen yet (warm-up longer than training)";
  if (p >= 0) {
    char b[200];
    base_name(rd.path[p], b, sizeof b);
    snprintf(pname, sizeof pname, "%d (%s)%s", p, b,
             o->predominant >= 0 ? ", given" : ", chosen after warm-up");
  }
  printf("train accuracy %.6f\n", rep.train_acc);
  if (te.n > 0)
    printf("test accuracy %.6f\n", rep.test_acc);
  printf("predominant modality %s\n", pname);
  printf("training time %.1fs\n", rep.seconds);
  fflush(stdout);
  if (c->o.save) {
    imml_status st = imml_model_save(model, c->o.save);
    if (st != IMML_OK) {
      lib_error("imml_model_save", st, model);
      goto out;
    }
    char spath[4096];
    snprintf(spath, sizeof spath, "%s.stats", c->o.save);
    if (stdz_save(&sz, spath, err, sizeof err) != 0) {
      errorf("%s", err);
      goto out;
    }
    notef(o->quiet, "imml-train: saved %s and %s\n", c->o.save, spath);
  }
  rc = 0;
  if (c->given[O_MINACC] && !(rep.test_acc >= c->o.min_test_acc)) {
    errorf("test accuracy %.6f is below --min-test-acc %.6f", rep.test_acc,
           c->o.min_test_acc);
    rc = EXIT_BELOW_MIN;
  }
  goto out;
oom:
  errorf("out of memory");
out:
  if (metrics)
    fclose(metrics);
  imml_model_free(model);
  free(tr_idx);
  free(te_idx);
  dataset_free(&tr);
  dataset_free(&te);
  stdz_free(&sz);
  raw_free(&rd);
  raw_free(&rt);
  return rc;
}

static int do_predict(cli *c) {
  imml_model *model = NULL;
  stdz sz = {0};
  raw_data rd = {0};
  dataset ds = {0};
  int *pred = NULL;
  float *probs = NULL;
  FILE *out = NULL;
  int rc = 1;
  char err[1024] = "";
  imml_status st = imml_model_load(c->predict, NULL, NULL, &model);
  if (st != IMML_OK) {
    /* model: NULL, or the failed handle that holds the message (freed at
     * out) */
    const char *msg = model ? imml_model_errmsg(model) : "";
    errorf("imml_model_load %s: %s%s%s", c->predict, imml_status_string(st),
           msg[0] ? ": " : "", msg);
    goto out;
  }
  imml_config cfg;
  imml_model_get_config(model, &cfg);
  char spath[4096];
  snprintf(spath, sizeof spath, "%s.stats", c->predict);
  const char *stats = c->stats ? c->stats : spath;
  if (stdz_load(&sz, stats, err, sizeof err) != 0) {
    errorf("%s", err);
    goto out;
  }
  if (sz.m != cfg.n_modalities) {
    errorf("%s has %d modalities but the model %s has %d", stats, sz.m,
           c->predict, cfg.n_modalities);
    goto out;
  }
  for (int m = 0; m < sz.m; m++)
    if (sz.d[m] != cfg.dims[m]) {
      errorf("%s: modality %d has %d features but the model has %d", stats, m,
             sz.d[m], cfg.dims[m]);
      goto out;
    }
  if (c->n_files != cfg.n_modalities) {
    errorf("the model has %d modalities: give one CSV file per modality "
           "(got %d)",
           cfg.n_modalities, c->n_files);
    goto out;
  }
  if (raw_load(&rd, c->n_files, c->files, cfg.dims, err, sizeof err) != 0) {
    errorf("%s", err);
    goto out;
  }
  if (rd.y && rd.c > cfg.n_classes) {
    errorf("%s: label %d is outside the model's classes 0..%d", c->files[0],
           rd.c - 1, cfg.n_classes - 1);
    goto out;
  }
  const int C = cfg.n_classes;
  pred = malloc((size_t)rd.n * sizeof(int));
  probs = malloc((size_t)rd.n * (size_t)C * sizeof(float));
  if (!pred || !probs || stdz_apply(&sz, &rd, NULL, 0, &ds) != 0) {
    errorf("out of memory");
    goto out;
  }
  if (predict_rows(model, &ds, NULL, pred, probs) != 0)
    goto out;
  out = c->out ? fopen(c->out, "w") : stdout;
  if (!out) {
    errorf("%s: cannot create: %s", c->out, strerror(errno));
    goto out;
  }
  fprintf(out, "index,predicted");
  for (int k = 0; k < C; k++)
    fprintf(out, ",p_%d", k);
  fputc('\n', out);
  for (int i = 0; i < rd.n; i++) {
    fprintf(out, "%d,%d", i, pred[i]);
    for (int k = 0; k < C; k++)
      fprintf(out, ",%.6g", (double)probs[(size_t)i * C + k]);
    fputc('\n', out);
  }
  const int bad = ferror(out);
  if ((out != stdout ? fclose(out) : fflush(out)) != 0 || bad) {
    out = NULL;
    errorf("%s: write error", c->out ? c->out : "stdout");
    goto out;
  }
  out = NULL;
  if (rd.y) {
    int ok = 0;
    for (int i = 0; i < rd.n; i++)
      ok += pred[i] == rd.y[i];
    notef(c->o.quiet, "imml-train: accuracy %.6f (%d of %d rows)\n",
          (double)ok / rd.n, ok, rd.n);
  }
  rc = 0;
out:
  if (out && out != stdout)
    fclose(out);
  free(pred);
  free(probs);
  dataset_free(&ds);
  raw_free(&rd);
  stdz_free(&sz);
  imml_model_free(model);
  return rc;
}

static int do_compare(cli *c) {
  raw_data rd = {0};
  char err[1024];
  int rc = 1;
  if (raw_load(&rd, c->n_files, c->files, NULL, err, sizeof err) != 0) {
    errorf("%s", err);
    return 1;
  }
  if (check_classes(rd.y, rd.n, rd.c, "data rows", err, sizeof err) != 0) {
    errorf("%s", err);
    goto out;
  }
  if (c->given[O_DEMO])
    notef(c->o.quiet,
          "imml-train --demo: fac (predominant) + mor (auxiliary), same as\n"
          "  imml-train --compare %d --epochs %d %s %s\n",
          c->compare, c->o.epochs, c->files[0], c->files[1]);
  rc = run_compare(&c->o, &rd, c->compare, c->o.test_fraction);
out:
  raw_free(&rd);
  return rc;
}

int main(int argc, char **argv) {
  cli c;
  memset(&c, 0, sizeof c);
  train_opts_init(&c.o);
  if (imml_version_number() != IMML_VERSION_NUMBER) {
    fprintf(stderr, "imml-train: built for libimml %s but linked with %s\n",
            IMML_VERSION_STRING, imml_version_string());
    return 1;
  }
  int rc = parse_args(&c, argc, argv);
  if (rc < 0)
    rc = check_args(&c);
  if (rc < 0) {
    if (c.o.threads > 0)
      imml_threads_set(c.o.threads);
    if (c.predict)
      rc = do_predict(&c);
    else if (c.compare > 0)
      rc = do_compare(&c);
    else
      rc = do_train(&c);
  }
  free(c.train_list);
  free(c.test_list);
  return rc;
}
