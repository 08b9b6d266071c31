/* imml_unimodal_get() (head_predict) is in imml.h's experimental part. */
#define IMML_EXPERIMENTAL
#include "train.h"

#include "rng.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------ */
/* Messages and progress                                               */
/* ------------------------------------------------------------------ */

static size_t g_line_len; /* length of the open '\r' progress line, or 0 */

static void end_line(void) {
  if (g_line_len) {
    fputc('\n', stderr);
    g_line_len = 0;
  }
}

/* Erases the open progress line and leaves the cursor at its start. */
static void clear_line(void) {
  if (!g_line_len)
    return;
  fputc('\r', stderr);
  for (size_t i = 0; i < g_line_len; i++)
    fputc(' ', stderr);
  fputc('\r', stderr);
  fflush(stderr);
  g_line_len = 0;
}

void errorf(const char *fmt, ...) {
  end_line();
  va_list ap;
  va_start(ap, fmt);
  fputs("imml-train: error: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
}

void notef(int quiet, const char *fmt, ...) {
  if (quiet)
    return;
  end_line();
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
}

void lib_error(const char *call, imml_status st, const imml_model *model) {
  const char *msg = model ? imml_model_errmsg(model) : "";
  errorf("%s: %s%s%s", call, imml_status_string(st), msg[0] ? ": " : "", msg);
}

double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int stderr_is_tty(void) { return isatty(fileno(stderr)); }

/* Columns of the terminal on stderr (80 if unknown).  A '\r' redraw only
 * works while the line does not wrap, so the line is cut to fit. */
static size_t term_columns(void) {
#ifdef TIOCGWINSZ
  struct winsize ws;
  if (ioctl(fileno(stderr), TIOCGWINSZ, &ws) == 0 && ws.ws_col > 1)
    return ws.ws_col;
#endif
  return 80;
}

/* Redraws the progress line in place (terminal). */
static void draw_line(const char *text) {
  size_t len = strlen(text);
  const size_t cols = term_columns() - 1;
  if (len > cols)
    len = cols;
  fprintf(stderr, "\r%.*s", (int)len, text);
  for (size_t i = len; i < g_line_len; i++)
    fputc(' ', stderr);
  g_line_len = len > 0 ? len : 1;
  fflush(stderr);
}

static void fmt_time(char *buf, size_t n, double s) {
  if (!(s >= 0.0) || s > 1e7)
    snprintf(buf, n, "?");
  else if (s < 60.0)
    snprintf(buf, n, "%.1fs", s);
  else if (s < 3600.0)
    snprintf(buf, n, "%dm%02ds", (int)(s / 60.0), (int)fmod(s, 60.0));
  else
    snprintf(buf, n, "%dh%02dm", (int)(s / 3600.0), (int)fmod(s / 60.0, 60.0));
}

static void fmt_acc(char *buf, size_t n, double a) {
  if (isnan(a))
    snprintf(buf, n, "-");
  else
    snprintf(buf, n, "%.2f%%", 100.0 * a);
}

static void progress_text(char *buf, size_t n, const char *title, int epoch,
                          int epochs, int b, int nb, const epoch_report *r,
                          double elapsed, double frac_done, int show_acc) {
  char tr[16], te[16], va[16], el[16], left[16];
  fmt_acc(tr, sizeof tr, r->train_acc);
  fmt_acc(te, sizeof te, r->test_acc);
  fmt_acc(va, sizeof va, r->val_acc);
  fmt_time(el, sizeof el, elapsed);
  fmt_time(left, sizeof left,
           frac_done > 0.0 ? elapsed / frac_done - elapsed : -1.0);
  char acc[80] = "";
  if (show_acc && !isnan(r->val_acc))
    snprintf(acc, sizeof acc, " | train %s val %s test %s", tr, va, te);
  else if (show_acc)
    snprintf(acc, sizeof acc, " | train %s test %s", tr, te);
  snprintf(buf, n,
           "%sepoch %d/%d, batch %d/%d | %s, %s left%s | loss %.4f ce %.4f "
           "con %.4f dis %.4f",
           title, epoch, epochs, b, nb, el, left, acc, r->loss, r->ce, r->con,
           r->dis);
}

/* ------------------------------------------------------------------ */
/* Options                                                             */
/* ------------------------------------------------------------------ */

void fit_opts_init(fit_opts *f) {
  memset(f, 0, sizeof *f);
  f->val_fraction = 0.2;
  f->patience = 10;
  f->choose_p = CHOOSE_HELDOUT;
  f->subsample = 1.0;
  f->header = CSV_HEADER_AUTO;
}

int warmup_effective(int warmup, int given, long total, char *note,
                     size_t size) {
  if (size)
    note[0] = '\0';
  if (total <= 0 || warmup <= 0)
    return warmup;
  const long cap = (long)floor(WARMUP_CAP * (double)total);
  if ((long)warmup <= cap)
    return warmup;
  const double share = 100.0 * (double)warmup / (double)total;
  if (given) {
    snprintf(note, size,
             "--warmup %d covers %.0f%% of the %ld training steps%s", warmup,
             share > 999.0 ? 999.0 : share, total,
             (long)warmup >= total
                 ? ": p is never fixed and the front-door never applied (plain "
                   "late fusion)"
                 : "");
    return warmup;
  }
  const int w = cap >= 1 ? (int)cap : 1;
  snprintf(note, size,
           "warm-up %d steps (scaled from %d: the default warm-up would cover "
           "%.0f%% of the %ld training steps; capped at %.0f%%, --warmup N "
           "sets it)",
           w, warmup, share > 999.0 ? 999.0 : share, total, 100.0 * WARMUP_CAP);
  return w;
}

/* Whether bf16 products are available (--precision bf16): a probe model
 * of the smallest shape asks the library.  Where they are not, a warning
 * says why, once, and training goes on in fp32. */
static int bf16_available(void) {
  static int known = -1;
  if (known >= 0)
    return known;
  const int dims[2] = {1, 1};
  imml_config c;
  imml_config_init(&c);
  c.dims = dims;
  c.n_classes = 2;
  c.hidden_dim = c.knowledge_dim = c.max_batch = c.dict_size = 1;
  c.precision = IMML_PRECISION_BF16;
  imml_model *probe = NULL;
  const imml_status st = imml_model_create(&c, NULL, &probe);
  known = st == IMML_OK;
  if (!known) {
    end_line();
    fprintf(stderr,
            "imml-train: warning: --precision bf16 is unavailable (%s: %s); "
            "training in fp32\n",
            imml_status_string(st), probe ? imml_model_errmsg(probe) : "");
  }
  imml_model_free(probe);
  return known;
}

/* Evaluation runs in batches of max_batch: at least 256 rows when the
 * training batch is smaller, so BLAS gets larger matrices. */
void make_config(const train_opts *o, int m, const int *dims, int c,
                 imml_config *cfg) {
  imml_config_init(cfg);
  cfg->n_modalities = m;
  cfg->dims = dims;
  cfg->n_classes = c;
  cfg->hidden_dim = o->hidden;
  cfg->knowledge_dim = o->knowledge;
  cfg->max_batch = o->batch > 256 ? o->batch : 256;
  cfg->dict_size = o->dict_size;
  cfg->beta = o->beta;
  cfg->gamma1 = o->gamma1;
  cfg->gamma2 = o->gamma2;
  cfg->tau = o->tau;
  cfg->predominant = o->predominant;
  cfg->warmup_steps = o->warmup;
  cfg->slot_mode = o->slot_mode;
  cfg->seed = o->seed;
  cfg->precision = o->precision == IMML_PRECISION_BF16 && bf16_available()
                       ? IMML_PRECISION_BF16
                       : IMML_PRECISION_FP32;
}

/* ------------------------------------------------------------------ */
/* Rows                                                                */
/* ------------------------------------------------------------------ */

/* Maps idx[0..n) through map (idx[i] <- map[idx[i]]). */
static void remap(int *idx, int n, const int *map) {
  for (int i = 0; i < n; i++)
    idx[i] = map[idx[i]];
}

/* Splits the rows rows[0..n) of rd by their labels: frac of each class to
 * *b, the rest to *a (stratified, seeded stream), as indices of rd. */
static int split_rows(const raw_data *rd, const int *rows, int n, double frac,
                      uint64_t seed, uint64_t stream, int **a, int *na, int **b,
                      int *nb) {
  char err[256];
  int *y = malloc((size_t)(n > 0 ? n : 1) * sizeof(int));
  if (!y) {
    errorf("out of memory");
    return -1;
  }
  for (int i = 0; i < n; i++)
    y[i] = rd->y[rows[i]];
  const int rc = split_stratified_stream(y, n, rd->c, frac, seed, stream, a, na,
                                         b, nb, err, sizeof err);
  free(y);
  if (rc != 0) {
    errorf("%s", err);
    return -1;
  }
  remap(*a, *na, rows);
  remap(*b, *nb, rows);
  return 0;
}

int seed_rows(const raw_data *rd, int fixed_test, const train_opts *o,
              const fit_opts *f, uint64_t seed, int **fit, int *nfit, int **va,
              int *nva, int **te, int *nte) {
  int *all = malloc((size_t)rd->n * sizeof(int)), *tr = NULL, *drop = NULL;
  int ntr = 0, ndrop = 0, rc = -1;
  *fit = *va = *te = NULL;
  *nfit = *nva = *nte = 0;
  if (!all) {
    errorf("out of memory");
    return -1;
  }
  for (int i = 0; i < rd->n; i++)
    all[i] = i;
  if (fixed_test) {
    tr = all;
    ntr = rd->n;
    all = NULL;
  } else if (split_rows(rd, all, rd->n, o->test_fraction, seed, 1, &tr, &ntr,
                        te, nte) != 0) {
    goto out;
  }
  if (f->subsample < 1.0) {
    int *kept = NULL, nkept = 0;
    if (split_rows(rd, tr, ntr, 1.0 - f->subsample, seed, 4, &kept, &nkept,
                   &drop, &ndrop) != 0)
      goto out;
    free(tr);
    tr = kept;
    ntr = nkept;
  }
  if (split_rows(rd, tr, ntr, f->val_fraction, seed, 7, fit, nfit, va, nva) !=
      0)
    goto out;
  rc = 0;
out:
  free(all);
  free(tr);
  free(drop);
  if (rc != 0) {
    free(*fit);
    free(*va);
    free(*te);
    *fit = *va = *te = NULL;
  }
  return rc;
}

/* ------------------------------------------------------------------ */
/* Evaluation                                                          */
/* ------------------------------------------------------------------ */

double accuracy(const int *y, const int *pred, int n) {
  if (n <= 0)
    return NAN;
  int ok = 0;
  for (int i = 0; i < n; i++)
    ok += y[i] == pred[i];
  return (double)ok / (double)n;
}

double macro_f1(const int *y, const int *pred, int n, int c) {
  if (n <= 0 || c <= 0)
    return NAN;
  int *tp = calloc((size_t)c * 3, sizeof(int));
  if (!tp)
    return NAN;
  int *fp = tp + c, *fn = tp + 2 * c;
  for (int i = 0; i < n; i++) {
    if (y[i] == pred[i]) {
      tp[y[i]]++;
    } else {
      fn[y[i]]++;
      if (pred[i] >= 0 && pred[i] < c)
        fp[pred[i]]++;
    }
  }
  double sum = 0.0;
  int used = 0;
  for (int k = 0; k < c; k++) {
    const int den = 2 * tp[k] + fp[k] + fn[k];
    if (den == 0)
      continue;
    sum += 2.0 * tp[k] / den;
    used++;
  }
  free(tp);
  return used ? sum / used : NAN;
}

int predict_rows(imml_model *model, const dataset *ds, int *const *swap,
                 int *classes, float *probs) {
  imml_config cfg;
  imml_config_init(&cfg);
  imml_model_get_config(model, &cfg);
  const int M = ds->m, C = cfg.n_classes, mb = cfg.max_batch;
  float *buf[IMML_MAX_MODALITIES] = {0};
  const float *feat[IMML_MAX_MODALITIES];
  int rc = -1;
  for (int m = 0; m < M; m++) {
    if (swap && swap[m]) {
      buf[m] = malloc((size_t)mb * (size_t)ds->d[m] * sizeof(float));
      if (!buf[m]) {
        errorf("out of memory");
        goto out;
      }
    }
  }
  for (int i0 = 0; i0 < ds->n; i0 += mb) {
    const int b = ds->n - i0 < mb ? ds->n - i0 : mb;
    for (int m = 0; m < M; m++) {
      const size_t d = (size_t)ds->d[m];
      if (!buf[m]) {
        feat[m] = ds->x[m] + (size_t)i0 * d;
        continue;
      }
      for (int i = 0; i < b; i++)
        memcpy(buf[m] + (size_t)i * d, ds->x[m] + (size_t)swap[m][i0 + i] * d,
               d * sizeof(float));
      feat[m] = buf[m];
    }
    const imml_status st = imml_predict(
        model, b, feat, NULL, probs ? probs + (size_t)i0 * (size_t)C : NULL,
        classes + i0);
    if (st != IMML_OK) {
      lib_error("imml_predict", st, model);
      goto out;
    }
  }
  rc = 0;
out:
  for (int m = 0; m < M; m++)
    free(buf[m]);
  return rc;
}

double mean_ce(const float *probs, const int *y, int n, int c) {
  if (n <= 0)
    return NAN;
  double sum = 0.0;
  for (int i = 0; i < n; i++) {
    const double q = (double)probs[(size_t)i * (size_t)c + (size_t)y[i]];
    sum -= log(q > 1e-30 ? q : 1e-30);
  }
  return sum / n;
}

/* Accuracy and cross-entropy of every unimodal head o_m, as the library
 * computes it (imml_unimodal_get after each imml_predict batch). */
int heads_eval(imml_model *model, const dataset *ds, double *acc, double *ce,
               double *row_ce) {
  imml_config cfg;
  imml_config_init(&cfg);
  imml_model_get_config(model, &cfg);
  const int C = cfg.n_classes, mb = cfg.max_batch, M = ds->m;
  float *o = malloc((size_t)mb * (size_t)C * sizeof(float));
  long *ok = calloc((size_t)M, sizeof(long));
  double *sum = calloc((size_t)M, sizeof(double));
  int rc = -1;
  if (!o || !ok || !sum) {
    errorf("out of memory");
    goto out;
  }
  for (int i0 = 0; i0 < ds->n; i0 += mb) {
    const int b = ds->n - i0 < mb ? ds->n - i0 : mb;
    const float *feat[IMML_MAX_MODALITIES];
    for (int k = 0; k < M; k++)
      feat[k] = ds->x[k] + (size_t)i0 * (size_t)ds->d[k];
    imml_status st = imml_predict(model, b, feat, NULL, NULL, NULL);
    if (st != IMML_OK) {
      lib_error("imml_predict", st, model);
      goto out;
    }
    for (int m = 0; m < M; m++) {
      st = imml_unimodal_get(model, m, o);
      if (st != IMML_OK) {
        lib_error("imml_unimodal_get", st, model);
        goto out;
      }
      for (int i = 0; i < b; i++) {
        const float *row = o + (size_t)i * (size_t)C;
        const int y = ds->y[i0 + i];
        int best = 0;
        float mx = row[0];
        for (int c = 1; c < C; c++)
          if (row[c] > row[best])
            best = c;
        mx = row[best];
        double se = 0.0;
        for (int c = 0; c < C; c++)
          se += exp((double)row[c] - (double)mx);
        const double l = (double)mx + log(se) - (double)row[y];
        sum[m] += l;
        if (row_ce)
          row_ce[(size_t)(i0 + i) * (size_t)M + (size_t)m] = l;
        ok[m] += best == y;
      }
    }
  }
  for (int m = 0; m < M; m++) {
    acc[m] = ds->n > 0 ? (double)ok[m] / ds->n : NAN;
    if (ce)
      ce[m] = ds->n > 0 ? sum[m] / ds->n : NAN;
  }
  rc = 0;
out:
  free(o);
  free(ok);
  free(sum);
  return rc;
}

/* ------------------------------------------------------------------ */
/* Training                                                            */
/* ------------------------------------------------------------------ */

/* CHOOSE_HELDOUT: the head with the lowest validation cross-entropy,
 * when the validation rows tell it apart from the others; the heads they
 * cannot tell apart from it (mean per-row difference below twice its
 * standard error, a paired test) are ranked by their cross-entropy on every
 * training row, fitting and validation.  @return the index. */
static int heldout_choice(imml_model *model, const dataset *tr,
                          const dataset *va, run_result *res) {
  const int M = va->m, n = va->n;
  double *rc = malloc((size_t)n * (size_t)M * sizeof(double));
  if (!rc) {
    errorf("out of memory");
    return -1;
  }
  if (heads_eval(model, va, res->head_val_acc, res->head_val_ce, rc) != 0) {
    free(rc);
    return -1;
  }
  int best = 0;
  for (int m = 1; m < M; m++) {
    const double a = res->head_val_ce[m], b = res->head_val_ce[best];
    if (a < b || (a == b && res->head_val_acc[m] > res->head_val_acc[best]))
      best = m;
  }
  int tied[IMML_MAX_MODALITIES] = {0}, n_tied = 1;
  tied[best] = 1;
  for (int m = 0; m < M; m++) {
    if (m == best)
      continue;
    double s1 = 0.0, s2 = 0.0;
    for (int i = 0; i < n; i++) {
      const double d = rc[(size_t)i * M + m] - rc[(size_t)i * M + best];
      s1 += d;
      s2 += d * d;
    }
    const double mean = s1 / n;
    const double var = n > 1 ? (s2 - n * mean * mean) / (n - 1) : INFINITY;
    const double se = sqrt(var > 0.0 ? var : 0.0) / sqrt((double)n);
    if (mean <= 2.0 * se) {
      tied[m] = 1;
      n_tied++;
    }
  }
  free(rc);
  res->p_tied = n_tied;
  if (n_tied == 1)
    return best;
  double acc[IMML_MAX_MODALITIES], ce[IMML_MAX_MODALITIES];
  if (heads_eval(model, tr, acc, ce, NULL) != 0)
    return -1;
  int p = -1;
  for (int m = 0; m < M; m++) {
    res->head_all_ce[m] =
        ((double)tr->n * ce[m] + (double)n * res->head_val_ce[m]) /
        (double)(tr->n + n);
    if (tied[m] && (p < 0 || res->head_all_ce[m] < res->head_all_ce[p]))
      p = m;
  }
  return p;
}

/* Fixes p with imml_predominant_set() between two steps: the held-out
 * choice (CHOOSE_HELDOUT) or the given index. */
static int fix_p(imml_model *model, const dataset *tr, const dataset *va,
                 int how, int step, run_result *res) {
  const int p =
      how == CHOOSE_HELDOUT ? heldout_choice(model, tr, va, res) : how;
  if (p < 0)
    return -1;
  const imml_status st = imml_predominant_set(model, p);
  if (st != IMML_OK) {
    lib_error("imml_predominant_set", st, model);
    return -1;
  }
  res->p = p;
  res->p_by_host = 1;
  res->p_step = step;
  return 0;
}

/* The model's state at the best epoch so far: its checkpoint in memory. */
typedef struct snapshot {
  unsigned char *buf;
  size_t size, cap;
} snapshot;

static int snapshot_take(imml_model *model, snapshot *s,
                         const method_hooks *h) {
  size_t need = 0;
  imml_status st = imml_model_save_mem(model, NULL, 0, &need);
  if (st == IMML_OK && need > s->cap) {
    unsigned char *nb = realloc(s->buf, need);
    if (!nb) {
      errorf("out of memory for a %zu-byte copy of the model", need);
      return -1;
    }
    s->buf = nb;
    s->cap = need;
  }
  if (st == IMML_OK)
    st = imml_model_save_mem(model, s->buf, s->cap, &s->size);
  if (st != IMML_OK) {
    lib_error("imml_model_save_mem", st, model);
    return -1;
  }
  return h && h->snapshot ? h->snapshot(h->ctx) : 0;
}

/* Replaces *model by the snapshot's model. */
static int snapshot_restore(imml_model **model, const snapshot *s,
                            const method_hooks *h) {
  imml_model *m = NULL;
  const imml_status st =
      imml_model_load_mem(s->buf, s->size, h ? h->ft : NULL, NULL, &m);
  if (st != IMML_OK) {
    lib_error("imml_model_load_mem", st, m);
    imml_model_free(m);
    return -1;
  }
  imml_model_free(*model);
  *model = m;
  if (h && h->restore && h->restore(h->ctx) != 0)
    return -1;
  return h && h->attach ? h->attach(h->ctx, m) : 0;
}

/* r's training accuracy, and its test accuracy (NaN without test rows),
 * of the model as it is; pred holds max(tr->n, te->n) classes. */
static int measure_acc(imml_model *model, const dataset *tr, const dataset *te,
                       int *pred, epoch_report *r) {
  if (predict_rows(model, tr, NULL, pred, NULL) != 0)
    return -1;
  r->train_acc = accuracy(tr->y, pred, tr->n);
  r->test_acc = NAN;
  if (te->n > 0) {
    if (predict_rows(model, te, NULL, pred, NULL) != 0)
      return -1;
    r->test_acc = accuracy(te->y, pred, te->n);
  }
  return 0;
}

int train_run(const train_opts *o, const imml_config *cfg0, const dataset *tr,
              const dataset *va, const dataset *te, const run_spec *spec,
              imml_model **out, run_result *res) {
  *out = NULL;
  memset(res, 0, sizeof *res);
  res->p = -1;
  for (int m = 0; m < IMML_MAX_MODALITIES; m++)
    res->head_val_acc[m] = res->head_val_ce[m] = res->head_all_ce[m] = NAN;
  const int M = tr->m, B = o->batch, N = tr->n, C = cfg0->n_classes;
  const int nb = (N + B - 1) / B;
  const int tty = !o->quiet && stderr_is_tty();
  const int lines = !o->quiet && !tty && spec->epoch_lines;
  const method_hooks *h = spec->hooks;
  imml_config cfg = *cfg0;
  /* The host fixes p after W steps: the library's own choice would come
   * only after step W + 1. */
  const int W = cfg.warmup_steps;
  int how = spec->choose_p;
  if (how == CHOOSE_HELDOUT && va->n == 0) {
    /* too few rows for a validation share: the library's rule */
    how = CHOOSE_LIBRARY;
    res->heldout_fallback = spec->front_door && cfg.predominant < 0;
  }
  const int host_choice = spec->front_door && cfg.predominant < 0 &&
                          how != CHOOSE_LIBRARY && W > 0 && W < INT_MAX;
  if (host_choice)
    cfg.warmup_steps = W + 1;
  imml_model *model = NULL;
  float *xb[IMML_MAX_MODALITIES] = {0};
  int *perm = NULL, *yb = NULL, *rb = NULL, *pred = NULL;
  float *vprob = NULL;
  snapshot snap = {NULL, 0, 0};
  int rc = -1;
  imml_status st = imml_model_create(&cfg, h ? h->ft : NULL, &model);
  if (st != IMML_OK) {
    /* model: NULL, or the failed handle that holds the message */
    lib_error("imml_model_create", st, model);
    imml_model_free(model);
    return -1;
  }
  imml_optim_config oc;
  imml_optim_config_init(&oc, (imml_optim_kind)o->optimizer);
  oc.lr = o->lr;
  oc.weight_decay = o->weight_decay;
  oc.momentum = o->momentum;
  st = imml_optim_setup(model, &oc);
  if (st != IMML_OK) {
    lib_error("imml_optim_setup", st, model);
    goto out;
  }
  if (h && h->attach && h->attach(h->ctx, model) != 0)
    goto out;
  perm = malloc((size_t)N * sizeof(int));
  yb = malloc((size_t)B * sizeof(int));
  rb = malloc((size_t)B * sizeof(int));
  const int most =
      N > te->n ? (N > va->n ? N : va->n) : (te->n > va->n ? te->n : va->n);
  pred = malloc((size_t)(most > 0 ? most : 1) * sizeof(int));
  vprob = malloc((size_t)(va->n > 0 ? va->n : 1) * (size_t)C * sizeof(float));
  if (!perm || !yb || !rb || !pred || !vprob)
    goto oom;
  for (int m = 0; m < M; m++) {
    xb[m] = malloc((size_t)B * (size_t)tr->d[m] * sizeof(float));
    if (!xb[m])
      goto oom;
  }
  for (int i = 0; i < N; i++)
    perm[i] = i;
  trng rng;
  trng_seed(&rng, o->seed, 2);
  const double t0 = now_seconds();
  double last_draw = -1.0;
  epoch_report r = {0};
  r.train_acc = r.test_acc = r.val_acc = r.val_ce = NAN;
  epoch_report best = r;
  long step = 0;
  int since_best = 0;
  for (int ep = 1; ep <= o->epochs; ep++) {
    trng_shuffle(&rng, perm, (size_t)N);
    double sum[4] = {0, 0, 0, 0};
    int seen = 0;
    for (int b = 0; b < nb; b++) {
      const int i0 = b * B, bs = N - i0 < B ? N - i0 : B;
      const float *feat[IMML_MAX_MODALITIES];
      for (int m = 0; m < M; m++) {
        const size_t d = (size_t)tr->d[m];
        for (int i = 0; i < bs; i++)
          memcpy(xb[m] + (size_t)i * d, tr->x[m] + (size_t)perm[i0 + i] * d,
                 d * sizeof(float));
        feat[m] = xb[m];
      }
      for (int i = 0; i < bs; i++) {
        rb[i] = perm[i0 + i];
        yb[i] = tr->y[rb[i]];
      }
      if (h && h->batch && h->batch(h->ctx, model, bs, rb, yb, feat) != 0)
        goto out;
      imml_losses L;
      st = imml_forward(model, IMML_MODE_TRAIN, bs, feat, yb, NULL, &L);
      if (st != IMML_OK) {
        lib_error("imml_forward", st, model);
        goto out;
      }
      st = imml_backward(model, NULL);
      if (st != IMML_OK) {
        lib_error("imml_backward", st, model);
        goto out;
      }
      st = imml_commit(model);
      if (st != IMML_OK) {
        lib_error("imml_commit", st, model);
        goto out;
      }
      if (h && h->before_update && h->before_update(h->ctx, model) != 0)
        goto out;
      st = imml_optim_step(model);
      if (st != IMML_OK) {
        lib_error("imml_optim_step", st, model);
        goto out;
      }
      step++;
      if (host_choice && step == W && fix_p(model, tr, va, how, W, res) != 0)
        goto out;
      sum[0] += L.total * bs;
      sum[1] += L.ce * bs;
      sum[2] += L.con * bs;
      sum[3] += L.dis * bs;
      seen += bs;
      r.epoch = ep;
      r.loss = sum[0] / seen;
      r.ce = sum[1] / seen;
      r.con = sum[2] / seen;
      r.dis = sum[3] / seen;
      const double t = now_seconds() - t0;
      if (tty && (t - last_draw >= 0.1 || b == nb - 1)) {
        char text[512];
        progress_text(text, sizeof text, spec->title, ep, o->epochs, b + 1, nb,
                      &r, t, ((ep - 1) + (b + 1.0) / nb) / o->epochs,
                      spec->eval_each_epoch);
        draw_line(text);
        last_draw = t;
      }
    }
    res->epochs_run = ep;
    if (spec->eval_each_epoch) {
      if (measure_acc(model, tr, te, pred, &r) != 0)
        goto out;
    }
    int p_now = -1, fixed = 0;
    imml_predominant_get(model, &p_now, &fixed);
    const int eligible = !spec->front_door || fixed;
    int stop = 0;
    if (va->n > 0) {
      if (predict_rows(model, va, NULL, pred, vprob) != 0)
        goto out;
      r.val_acc = accuracy(va->y, pred, va->n);
      r.val_ce = mean_ce(vprob, va->y, va->n, C);
      if (eligible) {
        if (!res->best_epoch || r.val_acc > best.val_acc ||
            (r.val_acc == best.val_acc && r.val_ce < best.val_ce)) {
          if (snapshot_take(model, &snap, h) != 0)
            goto out;
          res->best_epoch = ep;
          since_best = 0;
        } else {
          since_best++;
        }
        stop = spec->patience > 0 && since_best >= spec->patience;
      }
    }
    r.seconds = now_seconds() - t0;
    if (res->best_epoch == ep)
      best = r;
    char text[512];
    progress_text(text, sizeof text, spec->title, ep, o->epochs, nb, nb, &r,
                  r.seconds, (double)ep / o->epochs, spec->eval_each_epoch);
    if (tty)
      draw_line(text);
    else if (lines)
      fprintf(stderr, "%s\n", text);
    if (spec->metrics) {
      fprintf(spec->metrics, "%d,%.6f,%.6f,%.6f,%.6f,", ep, r.loss, r.ce, r.con,
              r.dis);
      const double tail[2] = {r.train_acc, r.test_acc};
      for (int k = 0; k < 2; k++)
        if (isnan(tail[k]))
          fprintf(spec->metrics, "nan,");
        else
          fprintf(spec->metrics, "%.6f,", tail[k]);
      fprintf(spec->metrics, "%.3f,", r.seconds);
      if (isnan(r.val_acc))
        fprintf(spec->metrics, "nan\n");
      else
        fprintf(spec->metrics, "%.6f\n", r.val_acc);
      fflush(spec->metrics);
    }
    if (stop) {
      res->stopped_early = 1;
      break;
    }
  }
  if (tty && spec->transient)
    clear_line();
  else if (tty)
    end_line();
  const double trained = now_seconds() - t0;
  if (res->best_epoch && res->best_epoch != res->epochs_run) {
    if (snapshot_restore(&model, &snap, h) != 0)
      goto out;
    res->restored = 1;
    r = best;
    r.seconds = trained;
  } else if (!res->best_epoch) {
    res->best_epoch = res->epochs_run;
  }
  /* The returned model's accuracies (measured again after a restore, or
   * when they were not measured every epoch). */
  if (res->restored || !spec->eval_each_epoch) {
    if (measure_acc(model, tr, te, pred, &r) != 0)
      goto out;
  }
  if (!res->p_by_host) {
    int p = -1, fixed = 0;
    imml_predominant_get(model, &p, &fixed);
    res->p = fixed ? p : -1;
  }
  res->last = r;
  *out = model;
  model = NULL;
  rc = 0;
  goto out;
oom:
  errorf("out of memory");
out:
  end_line();
  for (int m = 0; m < M; m++)
    free(xb[m]);
  free(perm);
  free(yb);
  free(rb);
  free(pred);
  free(vprob);
  free(snap.buf);
  imml_model_free(model);
  return rc;
}
