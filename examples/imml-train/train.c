/* imml_unimodal_get() (head_predict) is in imml.h's experimental part. */
#define IMML_EXPERIMENTAL
#include "train.h"

#include "rng.h"

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
  char tr[16], te[16], el[16], left[16];
  fmt_acc(tr, sizeof tr, r->train_acc);
  fmt_acc(te, sizeof te, r->test_acc);
  fmt_time(el, sizeof el, elapsed);
  fmt_time(left, sizeof left,
           frac_done > 0.0 ? elapsed / frac_done - elapsed : -1.0);
  char acc[64] = "";
  if (show_acc)
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

/* Classes from modality m's unimodal head o_m, as the library computes it
 * (imml_unimodal_get after each imml_predict batch). */
int head_predict(imml_model *model, int m, const dataset *ds, int *classes) {
  imml_config cfg;
  imml_model_get_config(model, &cfg);
  const int C = cfg.n_classes, mb = cfg.max_batch;
  float *o = malloc((size_t)mb * (size_t)C * sizeof(float));
  int rc = -1;
  if (!o) {
    errorf("out of memory");
    goto out;
  }
  for (int i0 = 0; i0 < ds->n; i0 += mb) {
    const int b = ds->n - i0 < mb ? ds->n - i0 : mb;
    const float *feat[IMML_MAX_MODALITIES];
    for (int k = 0; k < ds->m; k++)
      feat[k] = ds->x[k] + (size_t)i0 * (size_t)ds->d[k];
    imml_status st = imml_predict(model, b, feat, NULL, NULL, NULL);
    if (st != IMML_OK) {
      lib_error("imml_predict", st, model);
      goto out;
    }
    st = imml_unimodal_get(model, m, o);
    if (st != IMML_OK) {
      lib_error("imml_unimodal_get", st, model);
      goto out;
    }
    for (int i = 0; i < b; i++) {
      const float *row = o + (size_t)i * (size_t)C;
      int best = 0;
      for (int c = 1; c < C; c++)
        if (row[c] > row[best])
          best = c;
      classes[i0 + i] = best;
    }
  }
  rc = 0;
out:
  free(o);
  return rc;
}

/* ------------------------------------------------------------------ */
/* Training                                                            */
/* ------------------------------------------------------------------ */

int train_run(const train_opts *o, const imml_config *cfg, const dataset *tr,
              const dataset *te, const run_spec *spec, imml_model **out,
              epoch_report *last) {
  *out = NULL;
  const int M = tr->m, B = o->batch, N = tr->n;
  const int nb = (N + B - 1) / B;
  const int tty = !o->quiet && stderr_is_tty();
  const int lines = !o->quiet && !tty && spec->epoch_lines;
  imml_model *model = NULL;
  float *xb[IMML_MAX_MODALITIES] = {0};
  int *perm = NULL, *yb = NULL, *pred = NULL;
  int rc = -1;
  imml_status st = imml_model_create(cfg, NULL, &model);
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
  perm = malloc((size_t)N * sizeof(int));
  yb = malloc((size_t)B * sizeof(int));
  pred = malloc((size_t)(N > te->n ? N : te->n) * sizeof(int));
  if (!perm || !yb || !pred)
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
  r.train_acc = r.test_acc = NAN;
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
      for (int i = 0; i < bs; i++)
        yb[i] = tr->y[perm[i0 + i]];
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
      st = imml_optim_step(model);
      if (st != IMML_OK) {
        lib_error("imml_optim_step", st, model);
        goto out;
      }
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
    if (spec->eval_each_epoch || ep == o->epochs) {
      if (predict_rows(model, tr, NULL, pred, NULL) != 0)
        goto out;
      r.train_acc = accuracy(tr->y, pred, N);
      r.test_acc = NAN;
      if (te->n > 0) {
        if (predict_rows(model, te, NULL, pred, NULL) != 0)
          goto out;
        r.test_acc = accuracy(te->y, pred, te->n);
      }
    }
    r.seconds = now_seconds() - t0;
    char text[512];
    progress_text(text, sizeof text, spec->title, ep, o->epochs, nb, nb, &r,
                  r.seconds, (double)ep / o->epochs,
                  spec->eval_each_epoch || ep == o->epochs);
    if (tty)
      draw_line(text);
    else if (lines)
      fprintf(stderr, "%s\n", text);
    if (spec->metrics) {
      fprintf(spec->metrics, "%d,%.6f,%.6f,%.6f,%.6f,%.6f,", ep, r.loss, r.ce,
              r.con, r.dis, r.train_acc);
      if (isnan(r.test_acc))
        fprintf(spec->metrics, "nan");
      else
        fprintf(spec->metrics, "%.6f", r.test_acc);
      fprintf(spec->metrics, ",%.3f\n", r.seconds);
      fflush(spec->metrics);
    }
  }
  if (tty && spec->transient)
    clear_line();
  else if (tty)
    end_line();
  *last = r;
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
  free(pred);
  imml_model_free(model);
  return rc;
}
