/*
 * c-host: a C11 host program that owns its encoders and plugs libimml in
 * between them and the labels.
 *
 *   x_m --[host encoder: h_m = relu(x_m We_m + be_m)]--> h_m
 *       --[libimml: MDKEN + FDC + built-in F&T]--> logits, loss
 *
 * Per training step the host
 *   1. encodes the batch of each modality (its own parameters),
 *   2. calls imml_forward(IMML_MODE_TRAIN) on the encoded features h_m,
 *   3. calls imml_backward() with dfeatures buffers to receive dL/dh_m,
 *   4. back-propagates dL/dh_m through its encoders and updates them with
 *      its own Adam (written below),
 *   5. ends the step with imml_commit() (the batch enters the strata
 *      dictionary, the warm-up advances), and
 *   6. updates libimml's parameters with imml_optim_step().
 *
 * Data: two views of UCI mfeat (fac: 216 profile correlations, mor: 6
 * morphological features), standardised with the training statistics,
 * a fixed stratified split (every 4th sample of each class is a test
 * sample: 1500 train / 500 test).
 *
 * The program checks its own result and exits non-zero, saying why, when
 *   - the analytic gradient of a few encoder weights (chain rule through
 *     dL/dh_m from imml_backward) disagrees with a central finite
 *     difference of the loss computed with IMML_MODE_EVAL forwards (which
 *     never change the model), checked before any training (warm-up,
 *     empty dictionary) and again in the last epoch (front-door
 *     adjustment active, dictionary full);
 *   - the mean training loss of the last epoch is not below that of the
 *     first;
 *   - the test accuracy is not clearly above chance (10 classes).
 *
 * Usage: c-host DATA_DIR   (DATA_DIR holds mfeat-fac.csv, mfeat-mor.csv)
 *
 * Uses the public API (imml.h) only.
 */
#include <imml.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define N_SAMPLES 2000
#define N_CLASSES 10
#define N_MOD 2
#define ENC_DIM 64        /* width of each host encoder's output h_m */
#define BATCH 64          /* training and evaluation batch */
#define EPOCHS 12         /* training epochs */
#define WARMUP 48         /* libimml warm-up steps (two epochs) */
#define MIN_TEST_ACC 0.85 /* chance is 0.10 */
/* Norm-wise relative error allowed between the analytic encoder gradient
 * and central differences (step 1e-3) of the float32 EVAL loss: rounding
 * of the loss (~1e-7 relative) and ReLU kinks crossed by the step leave
 * an error of a few 1e-3 here; a wrong chain rule gives O(1). */
#define FD_TOL 2e-2

static const char *const view_names[N_MOD] = {"fac", "mor"};

/* ------------------------------------------------------------------ */
/* Small utilities                                                     */
/* ------------------------------------------------------------------ */

static void *xcalloc(size_t n, size_t size) {
  void *p = calloc(n ? n : 1, size);
  if (!p) {
    fprintf(stderr, "c-host: out of memory (%zu x %zu bytes)\n", n, size);
    exit(EXIT_FAILURE);
  }
  return p;
}

/* The host's own generator (splitmix64): shuffling and encoder init. */
static uint64_t rng_next(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static double rng_uniform(uint64_t *s) { /* [0, 1) */
  return (double)(rng_next(s) >> 11) * (1.0 / 9007199254740992.0);
}

static void shuffle(int *a, int n, uint64_t *s) {
  for (int i = n - 1; i > 0; i--) {
    const int j = (int)(rng_next(s) % (uint64_t)(i + 1));
    const int t = a[i];
    a[i] = a[j];
    a[j] = t;
  }
}

static double now_seconds(void) {
  struct timespec ts;
  timespec_get(&ts, TIME_UTC);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ------------------------------------------------------------------ */
/* Data                                                                */
/* ------------------------------------------------------------------ */

typedef struct view {
  int dim;
  float *x; /* N_SAMPLES x dim */
} view;

/* Reads DATA_DIR/mfeat-NAME.csv: a header row, then N_SAMPLES rows of
 * features with the label in the last column.  Returns 0 on success. */
static int load_view(const char *dir, const char *name, view *v, int *labels) {
  char path[4096];
  snprintf(path, sizeof path, "%s/mfeat-%s.csv", dir, name);
  FILE *f = fopen(path, "r");
  if (!f) {
    fprintf(stderr, "c-host: cannot open %s\n", path);
    return -1;
  }
  static char line[1 << 16];
  int ok = fgets(line, sizeof line, f) != NULL; /* header */
  int cols = 0;
  if (ok) {
    for (const char *c = line; *c; c++)
      cols += *c == ',';
    cols += 1;
  }
  if (!ok || cols < 2) {
    fprintf(stderr, "c-host: %s: missing or bad header\n", path);
    fclose(f);
    return -1;
  }
  v->dim = cols - 1;
  v->x = xcalloc((size_t)N_SAMPLES * (size_t)v->dim, sizeof(float));
  int row = 0;
  while (row < N_SAMPLES && fgets(line, sizeof line, f)) {
    char *p = line, *end;
    for (int j = 0; j < cols; j++) {
      const double val = strtod(p, &end);
      if (end == p) {
        fprintf(stderr, "c-host: %s: row %d column %d is not a number\n", path,
                row + 2, j + 1);
        fclose(f);
        return -1;
      }
      p = end;
      if (*p == ',')
        p++;
      if (j < v->dim) {
        v->x[(size_t)row * (size_t)v->dim + (size_t)j] = (float)val;
      } else {
        const int y = (int)val;
        if (y < 0 || y >= N_CLASSES || (labels[row] >= 0 && labels[row] != y)) {
          fprintf(stderr, "c-host: %s: row %d has a bad label %g\n", path,
                  row + 2, val);
          fclose(f);
          return -1;
        }
        labels[row] = y;
      }
    }
    row++;
  }
  fclose(f);
  if (row != N_SAMPLES) {
    fprintf(stderr, "c-host: %s: %d data rows, expected %d\n", path, row,
            N_SAMPLES);
    return -1;
  }
  return 0;
}

/* Standardises every column with the mean and standard deviation of the
 * training rows. */
static void standardise(view *v, const int *train, int n_train) {
  const size_t d = (size_t)v->dim;
  for (size_t j = 0; j < d; j++) {
    double s = 0.0, s2 = 0.0;
    for (int i = 0; i < n_train; i++) {
      const double val = v->x[(size_t)train[i] * d + j];
      s += val;
      s2 += val * val;
    }
    const double mean = s / n_train;
    double var = s2 / n_train - mean * mean;
    const double sd = var > 1e-12 ? sqrt(var) : 1.0;
    for (size_t i = 0; i < N_SAMPLES; i++)
      v->x[i * d + j] = (float)((v->x[i * d + j] - mean) / sd);
  }
}

/* ------------------------------------------------------------------ */
/* The host encoders and their Adam                                    */
/* ------------------------------------------------------------------ */

typedef struct adam {
  float *m, *v;
  long t;
} adam;

typedef struct encoder {
  int in;         /* d_m of the raw view */
  float *w, *b;   /* in x ENC_DIM, ENC_DIM */
  float *gw, *gb; /* gradients, same shapes */
  adam aw, ab;    /* Adam moments */
  float *xb;      /* BATCH x in: the batch's raw inputs */
  float *pre;     /* BATCH x ENC_DIM: x We + be */
  float *h;       /* BATCH x ENC_DIM: relu(pre), fed to libimml */
  float *dh;      /* BATCH x ENC_DIM: dL/dh from imml_backward */
  float *h_fd;    /* BATCH x ENC_DIM: scratch of the gradient check */
} encoder;

static void encoder_init(encoder *e, int in, uint64_t *rng) {
  const size_t nw = (size_t)in * ENC_DIM;
  e->in = in;
  e->w = xcalloc(nw, sizeof(float));
  e->b = xcalloc(ENC_DIM, sizeof(float));
  e->gw = xcalloc(nw, sizeof(float));
  e->gb = xcalloc(ENC_DIM, sizeof(float));
  e->aw.m = xcalloc(nw, sizeof(float));
  e->aw.v = xcalloc(nw, sizeof(float));
  e->ab.m = xcalloc(ENC_DIM, sizeof(float));
  e->ab.v = xcalloc(ENC_DIM, sizeof(float));
  e->aw.t = e->ab.t = 0;
  e->xb = xcalloc((size_t)BATCH * (size_t)in, sizeof(float));
  e->pre = xcalloc((size_t)BATCH * ENC_DIM, sizeof(float));
  e->h = xcalloc((size_t)BATCH * ENC_DIM, sizeof(float));
  e->dh = xcalloc((size_t)BATCH * ENC_DIM, sizeof(float));
  e->h_fd = xcalloc((size_t)BATCH * ENC_DIM, sizeof(float));
  const double a = 1.0 / sqrt((double)in);
  for (size_t i = 0; i < nw; i++)
    e->w[i] = (float)((2.0 * rng_uniform(rng) - 1.0) * a);
  for (int i = 0; i < ENC_DIM; i++)
    e->b[i] = (float)((2.0 * rng_uniform(rng) - 1.0) * a);
}

static void encoder_free(encoder *e) {
  free(e->w);
  free(e->b);
  free(e->gw);
  free(e->gb);
  free(e->aw.m);
  free(e->aw.v);
  free(e->ab.m);
  free(e->ab.v);
  free(e->xb);
  free(e->pre);
  free(e->h);
  free(e->dh);
  free(e->h_fd);
}

/* pre = x We + be; h = relu(pre). */
static void encoder_forward(const encoder *e, int n, const float *x, float *pre,
                            float *h) {
  for (int i = 0; i < n; i++) {
    float *p = pre + (size_t)i * ENC_DIM;
    for (int u = 0; u < ENC_DIM; u++)
      p[u] = e->b[u];
    for (int j = 0; j < e->in; j++) {
      const float xv = x[(size_t)i * (size_t)e->in + (size_t)j];
      const float *wr = e->w + (size_t)j * ENC_DIM;
      for (int u = 0; u < ENC_DIM; u++)
        p[u] += xv * wr[u];
    }
    for (int u = 0; u < ENC_DIM; u++)
      h[(size_t)i * ENC_DIM + u] = p[u] > 0.0f ? p[u] : 0.0f;
  }
}

/* From dL/dh (e->dh): dpre = dh * [pre > 0]; gw += xᵀ dpre; gb += sum dpre.
 * (dpre is written over e->dh.) */
static void encoder_backward(encoder *e, int n) {
  for (size_t i = 0; i < (size_t)n * ENC_DIM; i++)
    if (!(e->pre[i] > 0.0f))
      e->dh[i] = 0.0f;
  for (int i = 0; i < n; i++) {
    const float *dp = e->dh + (size_t)i * ENC_DIM;
    for (int u = 0; u < ENC_DIM; u++)
      e->gb[u] += dp[u];
    for (int j = 0; j < e->in; j++) {
      const float xv = e->xb[(size_t)i * (size_t)e->in + (size_t)j];
      float *gr = e->gw + (size_t)j * ENC_DIM;
      for (int u = 0; u < ENC_DIM; u++)
        gr[u] += xv * dp[u];
    }
  }
}

/* Adam (Kingma & Ba), bias-corrected; zeroes the gradient afterwards. */
static void adam_update(adam *s, float *w, float *g, size_t n, float lr) {
  const float b1 = 0.9f, b2 = 0.999f, eps = 1e-8f;
  s->t++;
  const float c1 = 1.0f - powf(b1, (float)s->t);
  const float c2 = 1.0f - powf(b2, (float)s->t);
  for (size_t i = 0; i < n; i++) {
    s->m[i] = b1 * s->m[i] + (1.0f - b1) * g[i];
    s->v[i] = b2 * s->v[i] + (1.0f - b2) * g[i] * g[i];
    w[i] -= lr * (s->m[i] / c1) / (sqrtf(s->v[i] / c2) + eps);
    g[i] = 0.0f;
  }
}

static void encoder_step(encoder *e, float lr) {
  adam_update(&e->aw, e->w, e->gw, (size_t)e->in * ENC_DIM, lr);
  adam_update(&e->ab, e->b, e->gb, ENC_DIM, lr);
}

/* Copies the rows idx[0..n-1] of a view into the encoder's batch buffer
 * and encodes them. */
static void encode_batch(encoder *e, const view *v, const int *idx, int n) {
  for (int i = 0; i < n; i++)
    memcpy(e->xb + (size_t)i * (size_t)e->in,
           v->x + (size_t)idx[i] * (size_t)v->dim,
           (size_t)v->dim * sizeof(float));
  encoder_forward(e, n, e->xb, e->pre, e->h);
}

/* ------------------------------------------------------------------ */
/* libimml helpers                                                     */
/* ------------------------------------------------------------------ */

static int check(imml_model *model, imml_status st, const char *what) {
  if (st == IMML_OK)
    return 0;
  fprintf(stderr, "c-host: %s failed: %s (%s)\n", what, imml_status_string(st),
          imml_model_errmsg(model));
  return -1;
}

/* ------------------------------------------------------------------ */
/* Gradient check of the encoder chain                                 */
/* ------------------------------------------------------------------ */

#define FD_MAX 8

/* One entry of an encoder to check: weight (row j, unit u) or, with
 * j = -1, the bias of unit u. */
typedef struct fd_entry {
  int j, u;
  double fd; /* central finite difference of the EVAL loss */
} fd_entry;

typedef struct fd_plan {
  int n[N_MOD];
  fd_entry e[N_MOD][FD_MAX];
} fd_plan;

/* The loss of the current batch with encoder `m`'s entry replaced by
 * `val`, through an IMML_MODE_EVAL forward (which never changes the
 * model).  The other encoders' outputs are those of the training forward.
 */
static int eval_loss(imml_model *model, encoder *enc, int m, int n,
                     const int *yb, float *target, float val, double *loss) {
  const float saved = *target;
  *target = val;
  encoder_forward(&enc[m], n, enc[m].xb, enc[m].h_fd, enc[m].h_fd);
  *target = saved;
  const float *feat[N_MOD];
  for (int i = 0; i < N_MOD; i++)
    feat[i] = i == m ? enc[i].h_fd : enc[i].h;
  imml_losses L;
  if (check(model, imml_forward(model, IMML_MODE_EVAL, n, feat, yb, NULL, &L),
            "imml_forward (EVAL, gradient check)"))
    return -1;
  *loss = L.total;
  return 0;
}

/* Before the backward of the current training step: picks a few entries
 * per encoder and takes their central finite differences.  The chosen
 * unit is the one active for the most samples of the batch; its inputs
 * are sampled across the view. */
static int fd_measure(imml_model *model, encoder *enc, int n, const int *yb,
                      fd_plan *plan) {
  for (int m = 0; m < N_MOD; m++) {
    encoder *e = &enc[m];
    int best_u = 0, best_cnt = -1;
    for (int u = 0; u < ENC_DIM; u++) {
      int cnt = 0;
      for (int i = 0; i < n; i++)
        cnt += e->pre[(size_t)i * ENC_DIM + u] > 0.0f;
      if (cnt > best_cnt)
        best_cnt = cnt, best_u = u;
    }
    int k = 0;
    const int n_w = e->in < FD_MAX - 1 ? e->in : FD_MAX - 1;
    for (int t = 0; t < n_w; t++)
      plan->e[m][k++] = (fd_entry){(int)((long)t * e->in / n_w), best_u, 0.0};
    plan->e[m][k++] = (fd_entry){-1, best_u, 0.0};
    plan->n[m] = k;
    for (int t = 0; t < k; t++) {
      fd_entry *en = &plan->e[m][t];
      float *target =
          en->j < 0 ? &e->b[en->u] : &e->w[(size_t)en->j * ENC_DIM + en->u];
      const float w0 = *target, eps = 1e-3f;
      const float wp = w0 + eps, wm = w0 - eps;
      double lp, lm;
      if (eval_loss(model, enc, m, n, yb, target, wp, &lp) ||
          eval_loss(model, enc, m, n, yb, target, wm, &lm))
        return -1;
      en->fd = (lp - lm) / ((double)wp - (double)wm);
    }
  }
  return 0;
}

/* After encoder_backward(): compares the analytic gradients (in gw, gb,
 * which hold only this step's gradient) with the finite differences. */
static int fd_compare(const encoder *enc, const fd_plan *plan,
                      const char *when) {
  int bad = 0;
  for (int m = 0; m < N_MOD; m++) {
    double num = 0.0, den = 0.0;
    for (int t = 0; t < plan->n[m]; t++) {
      const fd_entry *en = &plan->e[m][t];
      const double g = en->j < 0 ? enc[m].gb[en->u]
                                 : enc[m].gw[(size_t)en->j * ENC_DIM + en->u];
      num += (g - en->fd) * (g - en->fd);
      den += g * g;
    }
    const double rel = sqrt(num) / fmax(sqrt(den), 1e-12);
    printf("gradient check (%s), encoder %s, %d entries: "
           "||analytic - fd|| / ||analytic|| = %.2e (||analytic|| = %.2e)\n",
           when, view_names[m], plan->n[m], rel, sqrt(den));
    if (!(rel < FD_TOL) || !(sqrt(den) > 0.0)) {
      fprintf(stderr,
              "c-host: FAIL: the encoder gradient through dL/dh of "
              "imml_backward disagrees with finite differences (%s, %s: "
              "relative error %.3e, tolerance %.1e)\n",
              when, view_names[m], rel, FD_TOL);
      for (int t = 0; t < plan->n[m]; t++) {
        const fd_entry *en = &plan->e[m][t];
        const double g = en->j < 0 ? enc[m].gb[en->u]
                                   : enc[m].gw[(size_t)en->j * ENC_DIM + en->u];
        fprintf(stderr, "  w[%d][%d]: analytic %.6e  fd %.6e\n", en->j, en->u,
                g, en->fd);
      }
      bad = 1;
    }
  }
  return bad ? -1 : 0;
}

/* ------------------------------------------------------------------ */
/* Training and evaluation                                             */
/* ------------------------------------------------------------------ */

/* Test accuracy and mean loss through IMML_MODE_EVAL forwards. */
static int evaluate(imml_model *model, encoder *enc, const view *views,
                    const int *labels, const int *idx, int n, double *acc,
                    double *loss) {
  int correct = 0;
  double lsum = 0.0;
  float logits[BATCH * N_CLASSES];
  int yb[BATCH];
  for (int s = 0; s < n; s += BATCH) {
    const int b = n - s < BATCH ? n - s : BATCH;
    const float *feat[N_MOD];
    for (int m = 0; m < N_MOD; m++) {
      encode_batch(&enc[m], &views[m], idx + s, b);
      feat[m] = enc[m].h;
    }
    for (int i = 0; i < b; i++)
      yb[i] = labels[idx[s + i]];
    imml_losses L;
    if (check(model,
              imml_forward(model, IMML_MODE_EVAL, b, feat, yb, logits, &L),
              "imml_forward (EVAL)"))
      return -1;
    lsum += L.total * b;
    for (int i = 0; i < b; i++) {
      int arg = 0;
      for (int c = 1; c < N_CLASSES; c++)
        if (logits[i * N_CLASSES + c] > logits[i * N_CLASSES + arg])
          arg = c;
      correct += arg == yb[i];
    }
  }
  *acc = (double)correct / n;
  *loss = lsum / n;
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s DATA_DIR (the directory of mfeat-*.csv)\n",
            argv[0]);
    return 2;
  }
  const double t0 = now_seconds();
  printf("c-host: libimml %s (header %s)\n", imml_version_string(),
         IMML_VERSION_STRING);
  if (imml_version_number() != IMML_VERSION_NUMBER) {
    fprintf(stderr, "c-host: header and library versions differ\n");
    return 1;
  }

  /* --- data --------------------------------------------------------- */
  int labels[N_SAMPLES];
  for (int i = 0; i < N_SAMPLES; i++)
    labels[i] = -1;
  view views[N_MOD];
  for (int m = 0; m < N_MOD; m++)
    if (load_view(argv[1], view_names[m], &views[m], labels))
      return 1;
  /* Fixed stratified split: the samples are stored class by class, and
   * every 4th sample is a test sample. */
  int train[N_SAMPLES], test[N_SAMPLES], n_train = 0, n_test = 0;
  for (int i = 0; i < N_SAMPLES; i++) {
    if (i % 4 == 3)
      test[n_test++] = i;
    else
      train[n_train++] = i;
  }
  for (int m = 0; m < N_MOD; m++)
    standardise(&views[m], train, n_train);
  printf("data: views %s (%d) + %s (%d), %d train / %d test samples\n",
         view_names[0], views[0].dim, view_names[1], views[1].dim, n_train,
         n_test);

  /* --- the host encoders --------------------------------------------- */
  uint64_t rng = 20240611u;
  encoder enc[N_MOD];
  for (int m = 0; m < N_MOD; m++)
    encoder_init(&enc[m], views[m].dim, &rng);

  /* --- libimml --------------------------------------------------------- */
  const int dims[N_MOD] = {ENC_DIM, ENC_DIM};
  imml_config cfg;
  imml_config_init(&cfg);
  cfg.n_modalities = N_MOD;
  cfg.dims = dims;
  cfg.hidden_dim = 128;
  cfg.knowledge_dim = 64;
  cfg.n_classes = N_CLASSES;
  cfg.max_batch = BATCH;
  cfg.dict_size = 256;
  cfg.warmup_steps = WARMUP;
  cfg.seed = 7;
  imml_model *model = NULL;
  imml_status st = imml_model_create(&cfg, NULL, &model);
  if (st != IMML_OK) {
    /* A failed create still returns a handle holding the message (NULL
     * only when even that could not be allocated). */
    fprintf(stderr, "c-host: imml_model_create failed: %s (%s)\n",
            imml_status_string(st), imml_model_errmsg(model));
    imml_model_free(model);
    return 1;
  }
  imml_optim_config ocfg;
  imml_optim_config_init(&ocfg, IMML_OPTIM_ADAMW);
  ocfg.lr = 1e-3f;
  if (check(model, imml_optim_setup(model, &ocfg), "imml_optim_setup")) {
    imml_model_free(model);
    return 1;
  }
  const float enc_lr = 1e-3f;

  /* --- training -------------------------------------------------------- */
  int failed = 0;
  double first_loss = 0.0, last_loss = 0.0;
  int yb[BATCH];
  float *dfeat[N_MOD];
  const float *feat[N_MOD];
  for (int m = 0; m < N_MOD; m++) {
    dfeat[m] = enc[m].dh;
    feat[m] = enc[m].h;
  }
  for (int epoch = 0; epoch < EPOCHS && !failed; epoch++) {
    shuffle(train, n_train, &rng);
    double lsum = 0.0;
    int seen = 0;
    for (int s = 0; s < n_train && !failed; s += BATCH) {
      const int b = n_train - s < BATCH ? n_train - s : BATCH;
      for (int m = 0; m < N_MOD; m++)
        encode_batch(&enc[m], &views[m], train + s, b);
      for (int i = 0; i < b; i++)
        yb[i] = labels[train[s + i]];

      imml_losses L;
      if (check(model,
                imml_forward(model, IMML_MODE_TRAIN, b, feat, yb, NULL, &L),
                "imml_forward (TRAIN)")) {
        failed = 1;
        break;
      }
      lsum += L.total * b;
      seen += b;

      /* The gradient check runs on the first batch of the first epoch
       * (warm-up, empty dictionary) and of the last epoch (front-door
       * adjustment active): finite differences of EVAL forwards, which may
       * run between a training forward and its backward, taken before the
       * commit, which pushes the batch into the dictionary and so changes
       * the loss. */
      const int do_fd = s == 0 && (epoch == 0 || epoch == EPOCHS - 1);
      fd_plan plan;
      char when[96] = "";
      if (do_fd) {
        int p = -1;
        imml_predominant_get(model, &p, NULL);
        snprintf(when, sizeof when, "epoch %d, %s, dictionary %d/%d", epoch + 1,
                 p < 0 ? "warm-up" : "FDC active", imml_fdc_dict_fill(model),
                 cfg.dict_size);
        if (fd_measure(model, enc, b, yb, &plan)) {
          failed = 1;
          break;
        }
      }

      if (check(model, imml_backward(model, dfeat), "imml_backward")) {
        failed = 1;
        break;
      }
      for (int m = 0; m < N_MOD; m++)
        encoder_backward(&enc[m], b);
      if (do_fd) {
        if (fd_compare(enc, &plan, when)) {
          failed = 1;
          break;
        }
      }
      for (int m = 0; m < N_MOD; m++)
        encoder_step(&enc[m], enc_lr);
      if (check(model, imml_commit(model), "imml_commit") ||
          check(model, imml_optim_step(model), "imml_optim_step")) {
        failed = 1;
        break;
      }
    }
    if (failed)
      break;
    const double mean = lsum / seen;
    if (epoch == 0)
      first_loss = mean;
    last_loss = mean;
    double acc, tl;
    if (evaluate(model, enc, views, labels, test, n_test, &acc, &tl)) {
      failed = 1;
      break;
    }
    int p = -1;
    imml_predominant_get(model, &p, NULL);
    printf("epoch %2d  train loss %.4f  test loss %.4f  test acc %.4f  "
           "predominant %s\n",
           epoch + 1, mean, tl, acc, p < 0 ? "(warm-up)" : view_names[p]);
  }

  /* --- verdict --------------------------------------------------------- */
  if (!failed) {
    double acc, tl;
    if (evaluate(model, enc, views, labels, test, n_test, &acc, &tl)) {
      failed = 1;
    } else {
      printf("mean train loss: first epoch %.4f, last epoch %.4f\n", first_loss,
             last_loss);
      printf("test accuracy %.4f (chance 0.10, required > %.2f)\n", acc,
             MIN_TEST_ACC);
      if (!(last_loss < first_loss)) {
        fprintf(stderr,
                "c-host: FAIL: the training loss did not decrease "
                "(first epoch %.4f, last epoch %.4f)\n",
                first_loss, last_loss);
        failed = 1;
      }
      if (!(acc > MIN_TEST_ACC)) {
        fprintf(stderr, "c-host: FAIL: test accuracy %.4f is not above %.2f\n",
                acc, MIN_TEST_ACC);
        failed = 1;
      }
    }
  }
  printf("c-host: %s in %.2f s\n", failed ? "FAILED" : "passed",
         now_seconds() - t0);

  imml_model_free(model);
  for (int m = 0; m < N_MOD; m++) {
    encoder_free(&enc[m]);
    free(views[m].x);
  }
  return failed ? 1 : 0;
}
