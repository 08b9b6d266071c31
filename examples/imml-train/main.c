/* imml-train: trains, evaluates and compares IMML models on CSV data, one
 * file per modality, through libimml's public API (imml.h) only. */
/* imml_threads_set() (--threads) is in imml.h's experimental part. */
#define IMML_EXPERIMENTAL
#include "args.h"
#include "compare.h"
#include "data.h"
#include "rng.h"
#include "train.h"

#include <imml.h>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const arg_ctx args_ctx = {"imml-train", 0};

/* Where --demo finds the mfeat data without --data-dir: the source tree's
 * copy when it is there (a binary in its build tree), else the installed
 * one (meson install: PREFIX/share/imml/mfeat). */
#ifndef IMML_DATA_DIR
#define IMML_DATA_DIR "/usr/local/share/imml/mfeat"
#endif
#ifndef IMML_SRC_DATA_DIR
#define IMML_SRC_DATA_DIR "examples/data/mfeat"
#endif

static const char *demo_data_dir(void) {
  FILE *f = fopen(IMML_SRC_DATA_DIR "/mfeat-fac.csv", "rb");
  if (f) {
    fclose(f);
    return IMML_SRC_DATA_DIR;
  }
  return IMML_DATA_DIR;
}

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
    "  imml-train --write-split DIR [OPTIONS] MOD1.csv MOD2.csv [...]\n"
    "  imml-train --compare N [OPTIONS] MOD1.csv MOD2.csv [...]\n"
    "  imml-train --compare N [OPTIONS] --train A.csv,B.csv --test "
    "A2.csv,B2.csv\n"
    "  imml-train --demo [--data-dir DIR] [OPTIONS]\n"
    "  imml-train --predict MODEL [--stats FILE] [--out FILE] [--aux-shuffled]"
    "\n"
    "             MOD1.csv ...\n"
    "\n"
    "Data: one CSV file per modality, in the same modality order every time.\n"
    "Each file has a header row, then one sample per row, the same samples in\n"
    "the same order in every file, and the class label in the last column:\n"
    "integers 0..C-1 (C = largest label + 1; every class must occur), equal\n"
    "across files.  A first line with a non-numeric cell, or whose cells but\n"
    "the last are the column indices 0,1,2,... (or 1,2,3,...), is the header;\n"
    "any other first line is read as the first sample, with a warning\n"
    "(--header yes|no decides instead).  Features are standardised per\n"
    "column with the fitting rows' mean and (population) standard deviation;\n"
    "a constant column gets std 1.\n"
    "\n",
    "Model (doc/METHOD.md):\n"
    "  --hidden H            branch hidden width (256)\n"
    "  --knowledge K         knowledge width k (128)\n"
    "  --dict-size J         strata dictionary capacity (256)\n"
    "  --beta B              front-door mixing beta in [0,1] (0.5)\n"
    "  --gamma1 G            weight of the contrastive loss (0.1)\n"
    "  --gamma2 G            weight of the unimodal heads' loss (1.0)\n"
    "  --tau T               contrastive temperature (0.1)\n"
    "  --warmup N            warm-up steps before p is fixed (100); the\n"
    "                        default is scaled down to 20% of the training\n"
    "                        steps when it would cover more (a note says so)\n"
    "  --slot-mode MODE      conditional | strict (conditional)\n"
    "  --predominant P       auto | modality index, 0-based in file order\n"
    "                        (auto); an index is fixed from the start, with\n"
    "                        no warm-up\n"
    "  --choose-p HOW        with --predominant auto, how p is fixed after\n"
    "                        the warm-up: heldout (the unimodal head with the\n"
    "                        lowest validation cross-entropy; heads the\n"
    "                        validation rows cannot tell apart from it are\n"
    "                        ranked on every training row), library (the\n"
    "                        library's rule: lowest warm-up EMA of the heads'\n"
    "                        training cross-entropy) or a modality index\n"
    "                        (heldout)\n"
    "  --seed S              seed of the split, shuffles and initial weights\n"
    "                        (0)\n"
    "Optimiser:\n"
    "  --optimizer NAME      adamw | sgd (adamw)\n"
    "  --lr X                learning rate (0.001)\n"
    "  --weight-decay X      decoupled for AdamW, L2 for SGD (0: AdamW = "
    "Adam)\n"
    "  --momentum X          SGD momentum in [0,1) (0)\n",
    "Training:\n"
    "  --epochs N            most epochs (60)\n"
    "  --batch N             batch size; the last batch may be smaller (64)\n"
    "  --threads N           BLAS threads (imml_threads_set); default: "
    "BLAS's\n"
    "                        own default\n"
    "  --precision P         fp32 | bf16 (fp32): the matrix products' inputs\n"
    "                        (config.precision, doc/DECISIONS.md); bf16 falls\n"
    "                        back to fp32 with a warning where the build or\n"
    "                        the CPU lacks it\n"
    "  --test-fraction F     stratified test share in [0,1) (0.5); 0 trains "
    "on\n"
    "                        every row and reports no test accuracy\n"
    "  --val-fraction F      stratified validation share of the training rows\n"
    "                        in [0,1) (0.2): chooses p (--choose-p heldout)\n"
    "                        and the best epoch; 0: neither\n"
    "  --patience N          stop after N epochs without a better validation\n"
    "                        accuracy (10); 0: never stop early.  The best\n"
    "                        epoch's model is kept either way\n"
    "  --train-subsample F   keep a stratified share F in (0,1] of the\n"
    "                        training rows (1): the small-data regime\n"
    "  --train LIST          comma-separated training files (instead of the\n"
    "                        positional files)\n"
    "  --test LIST           comma-separated test files, one per modality: no\n"
    "                        split, the training files are all training rows\n"
    "  --header MODE         auto | yes | no: whether each CSV's first line "
    "is\n"
    "                        a header row (auto)\n"
    "  --metrics FILE        per-epoch CSV: epoch,loss,ce,con,dis,train_acc,\n"
    "                        test_acc,seconds,val_acc (accuracies in 0..1,\n"
    "                        seconds since the start of training)\n"
    "  --save FILE           save the model (imml_model_save) and its "
    "standardisation\n"
    "                        statistics to FILE.stats\n"
    "  --write-split DIR     write the split as DIR/NAME.train.csv (training\n"
    "                        rows, validation included) and DIR/NAME.test.csv\n"
    "                        (raw values, exact); trains only when --save,\n"
    "                        --metrics or --min-test-acc asks for a model\n"
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
    "  --aux-shuffled        also report the accuracy with the rows of every\n"
    "                        modality but p permuted (seeded by --seed; p: "
    "the\n"
    "                        model's, or --predominant INDEX)\n"
    "  Each file must have the model's feature columns, optionally followed "
    "by\n"
    "  the label column; with labels the accuracy and macro-F1 are printed on\n"
    "  stderr.  Output: a header 'index,predicted,p_0,...,p_{C-1}', then one\n"
    "  line per row: 0-based row index, predicted class, class "
    "probabilities.\n",
    "Comparison:\n"
    "  --compare N           for seeds S..S+N-1 (S = --seed): split with that\n"
    "                        seed (or use --train/--test), carve the\n"
    "                        validation rows, and train on the same rows with\n"
    "                        the same seed, each keeping its best validation\n"
    "                        epoch:\n"
    "    unimodal            every modality alone: an M=2 model whose second\n"
    "                        input is a constant 0 of width 1, gamma1 =\n"
    "                        gamma2 = 0, no front-door (a unimodal MLP); the\n"
    "                        table's row is the predominant modality's\n"
    "    late fusion         all modalities, gamma1 = gamma2 = 0, no "
    "front-door\n"
    "                        (automatic p with a warm-up longer than "
    "training,\n"
    "                        so every slot stays z_m)\n"
    "    late fusion + heads as late fusion with gamma2 = --gamma2\n"
    "    OGM-GE              late fusion with on-the-fly gradient modulation\n"
    "                        and Gaussian noise (Peng et al., CVPR 2022)\n"
    "    QMF                 confidence-weighted late fusion (Zhang et al.,\n"
    "                        ICML 2023); doc/BASELINES.md has both\n"
    "    IMML conditional    the full method, --slot-mode conditional\n"
    "    IMML strict         the full method, --slot-mode strict\n"
    "                        The predominant modality of a seed is the one\n"
    "                        its IMML conditional run fixed; the shuffled\n"
    "                        test permutes the test rows of every other\n"
    "                        modality (one seeded permutation, labels\n"
    "                        unchanged).  The table gives test accuracy,\n"
    "                        macro-F1 and the shuffled accuracy, mean +- "
    "sample\n"
    "                        std over seeds, each modality's accuracy alone\n"
    "                        and from the IMML conditional runs' heads.\n"
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
                                     "                       "
                                     " " IMML_SRC_DATA_DIR "\n"
                                     "                        when it exists, "
                                     "else\n"
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
  O_VAL,
  O_PATIENCE,
  O_CHOOSE,
  O_SUBSAMPLE,
  O_HEADER,
  O_AUXSHUF,
  O_COUNT
};

static const arg_opt opt_table[O_COUNT] = {
    [O_TRAIN] = {"train", 1},
    [O_TEST] = {"test", 1},
    [O_SPLIT] = {"write-split", 1},
    [O_PREDICT] = {"predict", 1},
    [O_STATS] = {"stats", 1},
    [O_OUT] = {"out", 1},
    [O_COMPARE] = {"compare", 1},
    [O_DEMO] = {"demo", 0},
    [O_DATADIR] = {"data-dir", 1},
    [O_VAL] = {"val-fraction", 1},
    [O_PATIENCE] = {"patience", 1},
    [O_CHOOSE] = {"choose-p", 1},
    [O_SUBSAMPLE] = {"train-subsample", 1},
    [O_HEADER] = {"header", 1},
    [O_AUXSHUF] = {"aux-shuffled", 0},
};

static const arg_spec args_spec = {&args_ctx, opt_table, O_COUNT, usage_text,
                                   0};

typedef struct cli {
  train_opts o;
  fit_opts f;
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
  case O_VAL:
    return arg_num(&args_ctx, name, v, 0, 0, 1, 1, &c->f.val_fraction);
  case O_PATIENCE:
    return arg_int(&args_ctx, name, v, 0, 1000000, &c->f.patience);
  case O_SUBSAMPLE:
    return arg_num(&args_ctx, name, v, 0, 1, 1, 0, &c->f.subsample);
  case O_CHOOSE:
    if (strcmp(v, "heldout") == 0) {
      c->f.choose_p = CHOOSE_HELDOUT;
      return 0;
    }
    if (strcmp(v, "library") == 0) {
      c->f.choose_p = CHOOSE_LIBRARY;
      return 0;
    }
    if (v[0] >= '0' && v[0] <= '9')
      return arg_int(&args_ctx, name, v, 0, IMML_MAX_MODALITIES - 1,
                     &c->f.choose_p);
    fprintf(stderr,
            "imml-train: error: --%s: expected heldout, library or a "
            "modality index, got '%s'\n",
            name, v);
    return -1;
  case O_HEADER:
    if (strcmp(v, "auto") == 0)
      c->f.header = CSV_HEADER_AUTO;
    else if (strcmp(v, "yes") == 0)
      c->f.header = CSV_HEADER_YES;
    else if (strcmp(v, "no") == 0)
      c->f.header = CSV_HEADER_NO;
    else {
      fprintf(stderr,
              "imml-train: error: --%s: expected auto, yes or no, got '%s'\n",
              name, v);
      return -1;
    }
    return 0;
  case O_AUXSHUF:
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
    static const int train_only[] = {
        O_COMPARE, O_DEMO, O_TEST, O_METRICS,  O_SAVE,   O_SPLIT,
        O_MINACC,  O_FRAC, O_VAL,  O_PATIENCE, O_CHOOSE, O_SUBSAMPLE};
    for (size_t k = 0; k < sizeof train_only / sizeof *train_only; k++)
      if (g[train_only[k]])
        return arg_usage(&args_ctx, "--%s cannot be used with --predict",
                         arg_opt_name(opt_table, train_only[k]));
    if (g[O_PRED] && !g[O_AUXSHUF])
      return arg_usage(&args_ctx,
                       "--predominant with --predict needs --aux-shuffled (it "
                       "names the modality left unshuffled)");
    if (c->n_files < 1)
      return arg_usage(&args_ctx, "--predict needs the modality CSV files");
    if (c->o.predominant >= c->n_files)
      return arg_usage(&args_ctx,
                       "--predominant %d: modality indices are 0..%d",
                       c->o.predominant, c->n_files - 1);
    return -1;
  }
  if (g[O_STATS] || g[O_OUT] || g[O_AUXSHUF])
    return arg_usage(&args_ctx,
                     "--stats, --out and --aux-shuffled are options of "
                     "--predict");
  if (g[O_DEMO]) {
    if (c->n_files > 0)
      return arg_usage(&args_ctx,
                       "--demo takes no data files (see --data-dir)");
    if (g[O_TEST])
      return arg_usage(&args_ctx, "--demo makes its own splits: no --test");
    static char fac[4096], mor[4096];
    const char *dir = c->data_dir ? c->data_dir : demo_data_dir();
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
    static const int no_compare[] = {O_SAVE, O_METRICS, O_SPLIT, O_MINACC};
    for (size_t k = 0; k < sizeof no_compare / sizeof *no_compare; k++)
      if (g[no_compare[k]])
        return arg_usage(&args_ctx, "--%s cannot be used with --compare",
                         arg_opt_name(opt_table, no_compare[k]));
    if (!g[O_TEST] && c->o.test_fraction <= 0.0)
      return arg_usage(&args_ctx, "--compare needs test rows: --test-fraction "
                                  "> 0 or --test");
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
  if (g[O_CHOOSE]) {
    if (c->o.predominant >= 0)
      return arg_usage(&args_ctx,
                       "--choose-p applies with --predominant auto (an index "
                       "given to --predominant is fixed from the start)");
    if (c->f.choose_p >= c->n_files)
      return arg_usage(&args_ctx, "--choose-p %d: modality indices are 0..%d",
                       c->f.choose_p, c->n_files - 1);
    if (c->f.choose_p == CHOOSE_HELDOUT && c->f.val_fraction <= 0.0)
      return arg_usage(&args_ctx, "--choose-p heldout needs validation rows "
                                  "(--val-fraction > 0)");
  } else if (c->f.val_fraction <= 0.0) {
    c->f.choose_p = CHOOSE_LIBRARY; /* no validation rows: the library's */
  }
  c->f.warmup_given = g[O_WARMUP];
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

/* Warns about every file whose first line was read as a sample. */
static void warn_headerless(const cli *c, const raw_data *rd) {
  for (int m = 0; m < rd->m; m++)
    if (rd->headerless[m])
      notef(c->o.quiet,
            "imml-train: warning: %s: no header row (line 1 is numbers, not "
            "column indices): read as the first sample; --header yes reads "
            "it as a header\n",
            rd->path[m]);
}

static int load_files(const cli *c, raw_data *rd, int n, char *const *files,
                      const int *dims) {
  char err[1024];
  if (raw_load_ex(rd, n, files, dims, c->f.header, err, sizeof err) != 0) {
    errorf("%s", err);
    return -1;
  }
  warn_headerless(c, rd);
  return 0;
}

/* The --test files: same widths as the training files, training classes. */
static int load_test(const cli *c, const raw_data *rd, raw_data *rt) {
  if (load_files(c, rt, c->n_test_files, c->test_files, NULL) != 0)
    return -1;
  for (int m = 0; m < rd->m; m++)
    if (rt->d[m] != rd->d[m]) {
      errorf("%s has %d feature columns but the training file %s has %d",
             rt->path[m], rt->d[m], rd->path[m], rd->d[m]);
      return -1;
    }
  return check_test_labels(rt, rd->c);
}

static int cmp_int(const void *a, const void *b) {
  const int x = *(const int *)a, y = *(const int *)b;
  return (x > y) - (x < y);
}

/* DIR/NAME.train.csv (fitting and validation rows, in file order) and
 * DIR/NAME.test.csv. */
static int write_split_files(const cli *c, const raw_data *rd, const int *fit,
                             int nfit, const int *va, int nva, const int *te,
                             int nte) {
  int *tr = malloc((size_t)(nfit + nva > 0 ? nfit + nva : 1) * sizeof(int));
  int rc = -1;
  if (!tr) {
    errorf("out of memory");
    return -1;
  }
  memcpy(tr, fit, (size_t)nfit * sizeof(int));
  memcpy(tr + nfit, va, (size_t)nva * sizeof(int));
  qsort(tr, (size_t)(nfit + nva), sizeof(int), cmp_int);
  for (int m = 0; m < rd->m; m++) {
    char base[256], path[4096], err[512];
    base_name(rd->path[m], base, sizeof base);
    snprintf(path, sizeof path, "%s/%s.train.csv", c->split_dir, base);
    if (write_rows(rd, m, tr, nfit + nva, path, err, sizeof err) != 0) {
      errorf("%s", err);
      goto out;
    }
    snprintf(path, sizeof path, "%s/%s.test.csv", c->split_dir, base);
    if (write_rows(rd, m, te, nte, path, err, sizeof err) != 0) {
      errorf("%s", err);
      goto out;
    }
  }
  rc = 0;
out:
  free(tr);
  return rc;
}

static int do_train(cli *c) {
  train_opts *o = &c->o;
  raw_data rd = {0}, rt = {0};
  dataset tr = {0}, va = {0}, te = {0};
  stdz sz = {0};
  int *fit = NULL, *va_idx = NULL, *te_idx = NULL, nfit = 0, nva = 0, nte = 0;
  imml_model *model = NULL;
  FILE *metrics = NULL;
  int rc = 1;
  char err[1024];
  const int fixed_test = c->given[O_TEST];
  if (load_files(c, &rd, c->n_files, c->files, NULL) != 0)
    goto out;
  if (check_classes(rd.y, rd.n, rd.c,
                    fixed_test ? "training rows" : "data rows", err,
                    sizeof err) != 0) {
    errorf("%s", err);
    goto out;
  }
  if (fixed_test && load_test(c, &rd, &rt) != 0)
    goto out;
  if (seed_rows(&rd, fixed_test, o, &c->f, o->seed, &fit, &nfit, &va_idx, &nva,
                &te_idx, &nte) != 0)
    goto out;
  if (c->split_dir) {
    if (write_split_files(c, &rd, fit, nfit, va_idx, nva, te_idx, nte) != 0)
      goto out;
    if (!c->o.save && !c->o.metrics && !c->given[O_MINACC]) {
      printf("wrote the split to %s: %d training rows (%d of them for "
             "validation), %d test rows; not training (--save, --metrics or "
             "--min-test-acc would)\n",
             c->split_dir, nfit + nva, nva, nte);
      rc = 0;
      goto out;
    }
  }
  if (stdz_fit(&sz, &rd, fit, nfit, o->no_standardize) != 0 ||
      stdz_apply(&sz, &rd, fit, nfit, &tr) != 0 ||
      stdz_apply(&sz, &rd, va_idx, nva, &va) != 0 ||
      (fixed_test ? stdz_apply(&sz, &rt, NULL, 0, &te)
                  : stdz_apply(&sz, &rd, te_idx, nte, &te)) != 0)
    goto oom;
  if (c->o.metrics) {
    metrics = fopen(c->o.metrics, "w");
    if (!metrics) {
      errorf("%s: cannot create: %s", c->o.metrics, strerror(errno));
      goto out;
    }
    fprintf(metrics,
            "epoch,loss,ce,con,dis,train_acc,test_acc,seconds,val_acc\n");
  }
  notef(o->quiet,
        "imml-train: %d modalities, %d classes, %d training rows (%d for "
        "validation), %d test rows\n",
        rd.m, rd.c, tr.n + va.n, va.n, te.n);
  const long steps = (long)o->epochs * ((tr.n + o->batch - 1) / o->batch);
  char note[256];
  train_opts ro = *o;
  if (o->predominant < 0) {
    ro.warmup = warmup_effective(o->warmup, c->f.warmup_given, steps, note,
                                 sizeof note);
    if (note[0])
      notef(o->quiet, "imml-train: %s\n", note);
  }
  imml_config cfg;
  make_config(&ro, rd.m, rd.d, rd.c, &cfg);
  const int choose = ro.warmup == 0 ? CHOOSE_LIBRARY : c->f.choose_p;
  run_spec spec = {"", 1, 1, 0, metrics, choose, 1, c->f.patience, NULL};
  run_result res;
  if (train_run(&ro, &cfg, &tr, &va, &te, &spec, &model, &res) != 0)
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
  char pname[512] = "not fixed (warm-up longer than training)";
  if (res.p >= 0) {
    char b[200], how[256];
    base_name(rd.path[res.p], b, sizeof b);
    if (o->predominant >= 0)
      snprintf(how, sizeof how, "given");
    else if (res.p_by_host && choose == CHOOSE_HELDOUT)
      snprintf(how, sizeof how, "held-out choice after %d warm-up step%s",
               res.p_step, res.p_step == 1 ? "" : "s");
    else if (res.p_by_host)
      snprintf(how, sizeof how, "given by --choose-p after %d warm-up step%s",
               res.p_step, res.p_step == 1 ? "" : "s");
    else
      snprintf(how, sizeof how,
               "the library's choice after %d warm-up step%s%s", ro.warmup,
               ro.warmup == 1 ? "" : "s",
               res.heldout_fallback
                   ? " (no validation rows: too few training rows per class)"
                   : "");
    snprintf(pname, sizeof pname, "%d (%s), %s", res.p, b, how);
  }
  printf("rows: %d fitting, %d validation, %d test\n", tr.n, va.n, te.n);
  printf("train accuracy %.6f\n", res.last.train_acc);
  if (va.n > 0)
    printf("validation accuracy %.6f\n", res.last.val_acc);
  if (te.n > 0)
    printf("test accuracy %.6f\n", res.last.test_acc);
  printf("predominant modality %s\n", pname);
  if (res.p_by_host && choose == CHOOSE_HELDOUT) {
    printf("validation cross-entropy (accuracy) of each unimodal head at the "
           "choice:");
    for (int m = 0; m < rd.m; m++)
      printf(" %d=%.4f (%.4f)", m, res.head_val_ce[m], res.head_val_acc[m]);
    printf("\n");
    if (res.p_tied > 1) {
      printf("the validation rows could not tell %d heads apart; their "
             "cross-entropy on every training row:",
             res.p_tied);
      for (int m = 0; m < rd.m; m++)
        if (!isnan(res.head_all_ce[m]))
          printf(" %d=%.4f", m, res.head_all_ce[m]);
      printf("\n");
    }
  }
  if (va.n > 0)
    printf("best epoch %d of %d trained (%s)\n", res.best_epoch, res.epochs_run,
           res.stopped_early ? "stopped early, best epoch restored"
           : res.restored    ? "best epoch restored"
                             : "the last epoch");
  printf("training time %.1fs\n", res.last.seconds);
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
  if (c->given[O_MINACC] && !(res.last.test_acc >= c->o.min_test_acc)) {
    errorf("test accuracy %.6f is below --min-test-acc %.6f", res.last.test_acc,
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
  free(fit);
  free(va_idx);
  free(te_idx);
  dataset_free(&tr);
  dataset_free(&va);
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
  int *pred = NULL, *perm = NULL;
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
  imml_config_init(&cfg);
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
  if (load_files(c, &rd, c->n_files, c->files, cfg.dims) != 0)
    goto out;
  if (rd.y && rd.c > cfg.n_classes) {
    errorf("%s: label %d is outside the model's classes 0..%d", c->files[0],
           rd.c - 1, cfg.n_classes - 1);
    goto out;
  }
  int p = c->o.predominant;
  if (c->given[O_AUXSHUF]) {
    if (!rd.y) {
      errorf("--aux-shuffled needs the label column in the files");
      goto out;
    }
    int fixed = 0, mp = -1;
    imml_predominant_get(model, &mp, &fixed);
    if (p < 0 && !fixed) {
      errorf("%s has not fixed its predominant modality (its warm-up did not "
             "end): give --predominant INDEX for --aux-shuffled",
             c->predict);
      goto out;
    }
    if (p < 0)
      p = mp;
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
    notef(c->o.quiet,
          "imml-train: accuracy %.6f (%d of %d rows), macro-F1 %.6f\n",
          (double)ok / rd.n, ok, rd.n, macro_f1(rd.y, pred, rd.n, C));
  }
  if (c->given[O_AUXSHUF]) {
    /* One seeded permutation of the rows for every modality but p (the
     * permutation --compare uses for the same seed). */
    perm = malloc((size_t)rd.n * sizeof(int));
    if (!perm) {
      errorf("out of memory");
      goto out;
    }
    for (int i = 0; i < rd.n; i++)
      perm[i] = i;
    trng r;
    trng_seed(&r, c->o.seed, 3);
    trng_shuffle(&r, perm, (size_t)rd.n);
    int *swap[IMML_MAX_MODALITIES] = {0};
    for (int m = 0; m < rd.m; m++)
      swap[m] = m == p ? NULL : perm;
    if (predict_rows(model, &ds, swap, pred, NULL) != 0)
      goto out;
    char b[200];
    base_name(rd.path[p], b, sizeof b);
    notef(c->o.quiet,
          "imml-train: accuracy with the auxiliary modalities shuffled %.6f "
          "(every modality but %d (%s) permuted, seed %llu), macro-F1 %.6f\n",
          accuracy(rd.y, pred, rd.n), p, b, (unsigned long long)c->o.seed,
          macro_f1(rd.y, pred, rd.n, C));
  }
  rc = 0;
out:
  if (out && out != stdout)
    fclose(out);
  free(pred);
  free(perm);
  free(probs);
  dataset_free(&ds);
  raw_free(&rd);
  stdz_free(&sz);
  imml_model_free(model);
  return rc;
}

static int do_compare(cli *c) {
  raw_data rd = {0}, rt = {0};
  char err[1024];
  int rc = 1;
  const int fixed_test = c->given[O_TEST];
  if (load_files(c, &rd, c->n_files, c->files, NULL) != 0)
    return 1;
  if (check_classes(rd.y, rd.n, rd.c,
                    fixed_test ? "training rows" : "data rows", err,
                    sizeof err) != 0) {
    errorf("%s", err);
    goto out;
  }
  if (fixed_test && load_test(c, &rd, &rt) != 0)
    goto out;
  if (c->given[O_DEMO])
    notef(c->o.quiet,
          "imml-train --demo: fac (predominant) + mor (auxiliary), same as\n"
          "  imml-train --compare %d --epochs %d %s %s\n",
          c->compare, c->o.epochs, c->files[0], c->files[1]);
  rc = run_compare(&c->o, &c->f, &rd, fixed_test ? &rt : NULL, c->compare);
out:
  raw_free(&rd);
  raw_free(&rt);
  return rc;
}

int main(int argc, char **argv) {
  cli c;
  memset(&c, 0, sizeof c);
  train_opts_init(&c.o);
  fit_opts_init(&c.f);
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
