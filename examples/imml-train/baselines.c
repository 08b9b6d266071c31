/* OGM-GE and QMF on the library's branches (doc/BASELINES.md). */
/* imml_unimodal_get() (OGM-GE's unimodal outputs) is in imml.h's
 * experimental part. */
#define IMML_EXPERIMENTAL
#include "baselines.h"

#include "rng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Standard normal draws, two at a time (Marsaglia's polar method on 53-bit
 * uniforms). */
typedef struct gauss_gen {
  trng r;
  double spare;
  int has_spare;
} gauss_gen;

static double gauss(gauss_gen *g) {
  if (g->has_spare) {
    g->has_spare = 0;
    return g->spare;
  }
  double u, v, q;
  do {
    u = 2.0 * (double)(trng_next(&g->r) >> 11) * 0x1.0p-53 - 1.0;
    v = 2.0 * (double)(trng_next(&g->r) >> 11) * 0x1.0p-53 - 1.0;
    q = u * u + v * v;
  } while (q >= 1.0 || q == 0.0);
  const double f = sqrt(-2.0 * log(q) / q);
  g->spare = v * f;
  g->has_spare = 1;
  return u * f;
}

/* ------------------------------------------------------------------ */
/* OGM-GE                                                              */
/* ------------------------------------------------------------------ */

/* The branch tensors whose gradients are modulated: the encoder of each
 * modality (METHOD.md section 1: W1, b1, W2, b2). */
static const char *const enc_names[4] = {"w1", "b1", "w2", "b2"};

struct ogm_state {
  int M, k, C, max_batch;
  float alpha;
  gauss_gen rng;
  imml_param_view wf, bf;
  imml_param_view wc[IMML_MAX_MODALITIES], bc[IMML_MAX_MODALITIES];
  imml_param_view enc[IMML_MAX_MODALITIES][4];
  float coeff[IMML_MAX_MODALITIES];
  double coeff_sum[IMML_MAX_MODALITIES];
  long steps;
  float *logits; /* max_batch x C */
};

static int find(imml_model *model, const char *name, imml_param_view *v) {
  const imml_status st = imml_param_find(model, name, v);
  if (st != IMML_OK) {
    lib_error("imml_param_find", st, model);
    return -1;
  }
  return 0;
}

static int ogm_attach(void *ctx, imml_model *model) {
  ogm_state *s = ctx;
  if (find(model, "ft.w", &s->wf) != 0 || find(model, "ft.b", &s->bf) != 0)
    return -1;
  for (int m = 0; m < s->M; m++) {
    char name[32];
    snprintf(name, sizeof name, "m%d.wc", m);
    if (find(model, name, &s->wc[m]) != 0)
      return -1;
    snprintf(name, sizeof name, "m%d.bc", m);
    if (find(model, name, &s->bc[m]) != 0)
      return -1;
    for (int t = 0; t < 4; t++) {
      snprintf(name, sizeof name, "m%d.%s", m, enc_names[t]);
      if (find(model, name, &s->enc[m][t]) != 0)
        return -1;
    }
  }
  return 0;
}

/* The coefficients k_m of this batch.  OGM-GE's unimodal output of
 * modality m is the fused head's slice for its slot plus a 1/M share of the
 * bias, out_m = z_m Wf_m + bf / M; the library computes it as the unimodal
 * head o_m = z_m Wc_m + bc_m once Wc_m = Wf_m and bc_m = bf / M (gamma2 = 0:
 * nothing else reads the heads).  An evaluation forward on the batch, with
 * the parameters of the coming training forward, gives every o_m. */
static int ogm_batch(void *ctx, imml_model *model, int bs, const int *rows,
                     const int *labels, const float *const *features) {
  (void)rows;
  ogm_state *s = ctx;
  const int M = s->M, k = s->k, C = s->C;
  for (int m = 0; m < M; m++) {
    memcpy(s->wc[m].data, s->wf.data + (size_t)m * k * C,
           (size_t)k * C * sizeof(float));
    for (int c = 0; c < C; c++)
      s->bc[m].data[c] = s->bf.data[c] / (float)M;
  }
  imml_status st =
      imml_forward(model, IMML_MODE_EVAL, bs, features, NULL, NULL, NULL);
  if (st != IMML_OK) {
    lib_error("imml_forward (OGM-GE scores)", st, model);
    return -1;
  }
  double score[IMML_MAX_MODALITIES], total = 0.0;
  for (int m = 0; m < M; m++) {
    st = imml_unimodal_get(model, m, s->logits);
    if (st != IMML_OK) {
      lib_error("imml_unimodal_get", st, model);
      return -1;
    }
    /* s_m = sum_i softmax(out_m,i)[y_i] */
    double sm = 0.0;
    for (int i = 0; i < bs; i++) {
      const float *l = s->logits + (size_t)i * C;
      float mx = l[0];
      for (int c = 1; c < C; c++)
        mx = l[c] > mx ? l[c] : mx;
      double z = 0.0;
      for (int c = 0; c < C; c++)
        z += exp((double)l[c] - (double)mx);
      sm += exp((double)l[labels[i]] - (double)mx) / z;
    }
    score[m] = sm;
    total += sm;
  }
  /* rho_m = s_m / (mean of the other modalities' s); k_m = 1 - tanh(alpha
   * rho_m) when rho_m > 1, else 1 (Peng et al., Eq. 10; for M = 2 the
   * ratio of the two scores). */
  for (int m = 0; m < M; m++) {
    const double others = (total - score[m]) / (M - 1);
    const double rho = others > 0.0 ? score[m] / others : HUGE_VAL;
    s->coeff[m] =
        rho > 1.0 ? (float)(1.0 - tanh((double)s->alpha * rho)) : 1.0f;
    s->coeff_sum[m] += s->coeff[m];
  }
  s->steps++;
  return 0;
}

/* g <- k_m g, then g <- g + N(0, (std(g) + 1e-8)^2) per tensor (GE). */
static int ogm_before_update(void *ctx, imml_model *model) {
  (void)model;
  ogm_state *s = ctx;
  for (int m = 0; m < s->M; m++)
    for (int t = 0; t < 4; t++) {
      const imml_param_view *v = &s->enc[m][t];
      const size_t n = (size_t)v->rows * (size_t)v->cols;
      const float c = s->coeff[m];
      double sum = 0.0, sum2 = 0.0;
      for (size_t i = 0; i < n; i++) {
        v->grad[i] *= c;
        sum += v->grad[i];
      }
      const double mean = sum / (double)n;
      for (size_t i = 0; i < n; i++)
        sum2 += ((double)v->grad[i] - mean) * ((double)v->grad[i] - mean);
      /* torch.Tensor.std: the unbiased estimate (n - 1) */
      const double sd = (n > 1 ? sqrt(sum2 / (double)(n - 1)) : 0.0) + 1e-8;
      for (size_t i = 0; i < n; i++)
        v->grad[i] += (float)(sd * gauss(&s->rng));
    }
  return 0;
}

ogm_state *ogm_create(int m, int k, int c, int max_batch, float alpha,
                      uint64_t seed, method_hooks *hooks) {
  ogm_state *s = calloc(1, sizeof *s);
  if (s)
    s->logits = malloc((size_t)max_batch * (size_t)c * sizeof(float));
  if (!s || !s->logits) {
    free(s);
    errorf("out of memory");
    return NULL;
  }
  s->M = m;
  s->k = k;
  s->C = c;
  s->max_batch = max_batch;
  s->alpha = alpha;
  trng_seed(&s->rng.r, seed, 5);
  for (int i = 0; i < m; i++)
    s->coeff[i] = 1.0f;
  memset(hooks, 0, sizeof *hooks);
  hooks->ctx = s;
  hooks->attach = ogm_attach;
  hooks->batch = ogm_batch;
  hooks->before_update = ogm_before_update;
  return s;
}

float ogm_coeff(const ogm_state *s, int m) { return s->coeff[m]; }

double ogm_mean_coeff(const ogm_state *s, int m) {
  return s->steps ? s->coeff_sum[m] / (double)s->steps : 1.0;
}

void ogm_free(ogm_state *s) {
  if (!s)
    return;
  free(s->logits);
  free(s);
}

/* ------------------------------------------------------------------ */
/* QMF                                                                 */
/* ------------------------------------------------------------------ */

/* The energy temperature: the confidence is -E / 10 = logsumexp / 10, as
 * in the authors' code. */
#define QMF_T 10.0
/* Weight of the ranking regulariser (the text-image code adds it with 1). */
#define QMF_LAMBDA 1.0
/* Most classes the host head handles (its softmax scratch). */
#define QMF_MAX_CLASSES 4096

struct qmf_state {
  int M, k, C, max_batch, n_train;
  /* host parameters: per modality W_m (k x C) then b_m (C); one block */
  size_t n_params;
  float *params, *grads, *best, *mom1, *mom2;
  int kind;
  float lr, weight_decay, momentum, beta1, beta2, eps;
  long t;
  /* training forward caches: l (M x B x C), conf (M x B) */
  float *l, *conf;
  int train_batch;
  /* evaluation scratch */
  float *le, *confe;
  float *dl;    /* B x C */
  double *dc;   /* B */
  double *hist; /* n_train x M cumulative per-sample losses */
  /* the batch of the coming training forward */
  int bs;
  const int *rows, *labels;
  imml_ft_ops ops; /* the callbacks, user_data = this state */
};

static float *qmf_w(qmf_state *s, float *base, int m) {
  return base + (size_t)m * (size_t)(s->k + 1) * (size_t)s->C;
}

/* l_m = slot_m W_m + b_m; conf_m = logsumexp(l_m) / T; out = sum_m conf_m
 * l_m. */
static void qmf_fuse(qmf_state *s, int B, const float *const *slots, float *l,
                     float *conf, float *logits) {
  const int M = s->M, k = s->k, C = s->C;
  for (int m = 0; m < M; m++) {
    const float *W = qmf_w(s, s->params, m), *bias = W + (size_t)k * C;
    float *lm = l + (size_t)m * B * C;
    for (int i = 0; i < B; i++) {
      float *row = lm + (size_t)i * C;
      const float *x = slots[m] + (size_t)i * k;
      for (int c = 0; c < C; c++)
        row[c] = bias[c];
      for (int j = 0; j < k; j++) {
        const float a = x[j];
        const float *w = W + (size_t)j * C;
        for (int c = 0; c < C; c++)
          row[c] += a * w[c];
      }
      float mx = row[0];
      for (int c = 1; c < C; c++)
        mx = row[c] > mx ? row[c] : mx;
      double z = 0.0;
      for (int c = 0; c < C; c++)
        z += exp((double)row[c] - (double)mx);
      conf[(size_t)m * B + i] = (float)(((double)mx + log(z)) / QMF_T);
    }
  }
  for (int i = 0; i < B; i++)
    for (int c = 0; c < C; c++) {
      float v = 0.0f;
      for (int m = 0; m < M; m++)
        v += conf[(size_t)m * B + i] * l[((size_t)m * B + i) * C + c];
      logits[(size_t)i * C + c] = v;
    }
}

static int qmf_forward(void *user_data, int training, int batch,
                       int n_modalities, int knowledge_dim,
                       const float *const *slots, int n_classes,
                       float *logits) {
  qmf_state *s = user_data;
  if (n_modalities != s->M || knowledge_dim != s->k || n_classes != s->C ||
      batch < 1 || batch > s->max_batch)
    return 1;
  if (training) {
    qmf_fuse(s, batch, slots, s->l, s->conf, logits);
    s->train_batch = batch;
  } else {
    qmf_fuse(s, batch, slots, s->le, s->confe, logits);
  }
  return 0;
}

/* Softmax of row (C values) into p; returns logsumexp. */
static double softmax_row(const float *row, int C, double *p) {
  float mx = row[0];
  for (int c = 1; c < C; c++)
    mx = row[c] > mx ? row[c] : mx;
  double z = 0.0;
  for (int c = 0; c < C; c++)
    z += (p[c] = exp((double)row[c] - (double)mx));
  for (int c = 0; c < C; c++)
    p[c] /= z;
  return (double)mx + log(z);
}

/* The history of each sample of the batch: its cumulative loss of head m,
 * updated before the ranking loss is formed (as the text-image code
 * does). */
static void qmf_history_update(qmf_state *s, int B) {
  const int M = s->M, C = s->C;
  double p[QMF_MAX_CLASSES];
  for (int m = 0; m < M; m++) {
    const float *lm = s->l + (size_t)m * B * C;
    for (int i = 0; i < B; i++) {
      const double lse = softmax_row(lm + (size_t)i * C, C, p);
      s->hist[(size_t)s->rows[i] * M + m] +=
          lse - (double)lm[(size_t)i * C + s->labels[i]];
    }
  }
}

/* dL/dslot_m and the host gradients (accumulated) of
 *   L = CE(out) + sum_m CE(l_m) + lambda sum_m L_rank(conf_m),
 * with conf_m detached in out (dL/dout = dlogits comes from the library),
 * from the training forward's caches and the current history. */
static void qmf_grads(qmf_state *s, int B, const float *const *slots,
                      const float *dlogits, float *const *dslots) {
  const int M = s->M, k = s->k, C = s->C;
  double p[QMF_MAX_CLASSES];
  for (int m = 0; m < M; m++) {
    const float *lm = s->l + (size_t)m * B * C;
    const float *cm = s->conf + (size_t)m * B;
    double hmin = s->hist[m], hmax = s->hist[m];
    for (int r = 1; r < s->n_train; r++) {
      const double v = s->hist[(size_t)r * M + m];
      hmin = v < hmin ? v : hmin;
      hmax = v > hmax ? v : hmax;
    }
    /* L_rank = (1/B) sum_i max(0, t_i (c_i - c_j) - |h_i - h_j|), j = i + 1
     * mod B, h the history normalised to [0, 1], t_i = sign(h_i - h_j). */
    for (int i = 0; i < B; i++)
      s->dc[i] = 0.0;
    if (hmax > hmin && B > 1)
      for (int i = 0; i < B; i++) {
        const int j = (i + 1) % B;
        const double hi = (s->hist[(size_t)s->rows[i] * M + m] - hmin) /
                          (hmax - hmin),
                     hj = (s->hist[(size_t)s->rows[j] * M + m] - hmin) /
                          (hmax - hmin);
        const double t = hi > hj ? 1.0 : (hi < hj ? -1.0 : 0.0);
        if (t == 0.0)
          continue;
        if (t * ((double)cm[i] - (double)cm[j]) - fabs(hi - hj) > 0.0) {
          s->dc[i] += QMF_LAMBDA * t / B;
          s->dc[j] -= QMF_LAMBDA * t / B;
        }
      }
    /* dl_m = conf_m dout + (softmax(l_m) - onehot(y)) / B
     *        + dconf_m softmax(l_m) / T */
    for (int i = 0; i < B; i++) {
      softmax_row(lm + (size_t)i * C, C, p);
      float *d = s->dl + (size_t)i * C;
      for (int c = 0; c < C; c++)
        d[c] = (float)((double)cm[i] * (double)dlogits[(size_t)i * C + c] +
                       (p[c] - (c == s->labels[i] ? 1.0 : 0.0)) / B +
                       s->dc[i] * p[c] / QMF_T);
    }
    float *W = qmf_w(s, s->params, m), *gW = qmf_w(s, s->grads, m);
    float *gb = gW + (size_t)k * C;
    for (int i = 0; i < B; i++) {
      const float *x = slots[m] + (size_t)i * k, *d = s->dl + (size_t)i * C;
      float *dx = dslots[m] + (size_t)i * k;
      for (int j = 0; j < k; j++) {
        const float *w = W + (size_t)j * C;
        float *g = gW + (size_t)j * C;
        float acc = 0.0f;
        for (int c = 0; c < C; c++) {
          g[c] += x[j] * d[c];
          acc += d[c] * w[c];
        }
        dx[j] = acc;
      }
      for (int c = 0; c < C; c++)
        gb[c] += d[c];
    }
  }
}

static int qmf_backward(void *user_data, int batch, int n_modalities,
                        int knowledge_dim, const float *const *slots,
                        const float *dlogits, int n_classes,
                        float *const *dslots) {
  qmf_state *s = user_data;
  if (n_modalities != s->M || knowledge_dim != s->k || n_classes != s->C ||
      batch != s->train_batch || batch != s->bs)
    return 1;
  qmf_history_update(s, batch);
  qmf_grads(s, batch, slots, dlogits, dslots);
  return 0;
}

static int qmf_batch(void *ctx, imml_model *model, int bs, const int *rows,
                     const int *labels, const float *const *features) {
  (void)model;
  (void)features;
  qmf_state *s = ctx;
  s->bs = bs;
  s->rows = rows;
  s->labels = labels;
  return 0;
}

/* The host heads' update, with the optimiser the library uses (PyTorch's
 * AdamW or SGD), then zeroed gradients. */
static int qmf_before_update(void *ctx, imml_model *model) {
  (void)model;
  qmf_state *s = ctx;
  s->t++;
  const double bc1 = 1.0 - pow((double)s->beta1, (double)s->t);
  const double bc2 = 1.0 - pow((double)s->beta2, (double)s->t);
  for (size_t i = 0; i < s->n_params; i++) {
    float g = s->grads[i];
    if (s->kind == IMML_OPTIM_ADAMW) {
      s->params[i] -= s->lr * s->weight_decay * s->params[i];
      s->mom1[i] = s->beta1 * s->mom1[i] + (1.0f - s->beta1) * g;
      s->mom2[i] = s->beta2 * s->mom2[i] + (1.0f - s->beta2) * g * g;
      const double mh = (double)s->mom1[i] / bc1;
      const double vh = (double)s->mom2[i] / bc2;
      s->params[i] -= (float)((double)s->lr * mh / (sqrt(vh) + s->eps));
    } else {
      g += s->weight_decay * s->params[i];
      if (s->momentum > 0.0f) {
        s->mom1[i] = s->t == 1 ? g : s->momentum * s->mom1[i] + g;
        g = s->mom1[i];
      }
      s->params[i] -= s->lr * g;
    }
    s->grads[i] = 0.0f;
  }
  return 0;
}

static int qmf_snapshot(void *ctx) {
  qmf_state *s = ctx;
  memcpy(s->best, s->params, s->n_params * sizeof(float));
  return 0;
}

static int qmf_restore(void *ctx) {
  qmf_state *s = ctx;
  memcpy(s->params, s->best, s->n_params * sizeof(float));
  return 0;
}

qmf_state *qmf_create(int m, int k, int c, int max_batch, int n_train,
                      const train_opts *o, method_hooks *hooks) {
  if (c > QMF_MAX_CLASSES) {
    errorf("QMF: %d classes, at most %d", c, QMF_MAX_CLASSES);
    return NULL;
  }
  qmf_state *s = calloc(1, sizeof *s);
  if (!s) {
    errorf("out of memory");
    return NULL;
  }
  s->M = m;
  s->k = k;
  s->C = c;
  s->max_batch = max_batch;
  s->n_train = n_train;
  s->n_params = (size_t)m * (size_t)(k + 1) * (size_t)c;
  const size_t bc = (size_t)max_batch * (size_t)c;
  s->params = calloc(s->n_params, sizeof(float));
  s->grads = calloc(s->n_params, sizeof(float));
  s->best = calloc(s->n_params, sizeof(float));
  s->mom1 = calloc(s->n_params, sizeof(float));
  s->mom2 = calloc(s->n_params, sizeof(float));
  s->l = malloc((size_t)m * bc * sizeof(float));
  s->le = malloc((size_t)m * bc * sizeof(float));
  s->conf = malloc((size_t)m * (size_t)max_batch * sizeof(float));
  s->confe = malloc((size_t)m * (size_t)max_batch * sizeof(float));
  s->dl = malloc(bc * sizeof(float));
  s->dc = malloc((size_t)max_batch * sizeof(double));
  s->hist =
      calloc((size_t)(n_train > 0 ? n_train : 1) * (size_t)m, sizeof(double));
  if (!s->params || !s->grads || !s->best || !s->mom1 || !s->mom2 || !s->l ||
      !s->le || !s->conf || !s->confe || !s->dl || !s->dc || !s->hist) {
    qmf_free(s);
    errorf("out of memory");
    return NULL;
  }
  /* U(-1/sqrt(k), 1/sqrt(k)) for weights and biases, as PyTorch's
   * nn.Linear and the library (METHOD.md section 6). */
  trng r;
  trng_seed(&r, o->seed, 6);
  const double a = 1.0 / sqrt((double)k);
  for (size_t i = 0; i < s->n_params; i++)
    s->params[i] =
        (float)((2.0 * (double)(trng_next(&r) >> 11) * 0x1.0p-53 - 1.0) * a);
  imml_optim_config oc;
  imml_optim_config_init(&oc, (imml_optim_kind)o->optimizer);
  s->kind = o->optimizer;
  s->lr = o->lr;
  s->weight_decay = o->weight_decay;
  s->momentum = o->momentum;
  s->beta1 = oc.beta1;
  s->beta2 = oc.beta2;
  s->eps = oc.eps;
  imml_ft_ops_init(&s->ops);
  s->ops.forward = qmf_forward;
  s->ops.backward = qmf_backward;
  s->ops.user_data = s;
  memset(hooks, 0, sizeof *hooks);
  hooks->ctx = s;
  hooks->batch = qmf_batch;
  hooks->before_update = qmf_before_update;
  hooks->snapshot = qmf_snapshot;
  hooks->restore = qmf_restore;
  hooks->ft = &s->ops;
  return s;
}

void qmf_free(qmf_state *s) {
  if (!s)
    return;
  free(s->params);
  free(s->grads);
  free(s->best);
  free(s->mom1);
  free(s->mom2);
  free(s->l);
  free(s->le);
  free(s->conf);
  free(s->confe);
  free(s->dl);
  free(s->dc);
  free(s->hist);
  free(s);
}

/* ------------------------------------------------------------------ */
/* Test support                                                        */
/* ------------------------------------------------------------------ */

/* QMF's loss in double for the finite-difference check: conf frozen (cbar)
 * in the fused term, which meets the incoming dL/dout as a linear form;
 * the unimodal losses and the ranking loss on the live parameters. */
static double qmf_ref_loss(const qmf_state *s, int B, const float *const *slots,
                           const float *dlogits, const float *cbar) {
  const int M = s->M, k = s->k, C = s->C;
  double loss = 0.0;
  double l[QMF_MAX_CLASSES];
  for (int m = 0; m < M; m++) {
    const float *W = s->params + (size_t)m * (size_t)(k + 1) * (size_t)C;
    const float *bias = W + (size_t)k * C;
    double conf[64];
    double hmin = s->hist[m], hmax = s->hist[m];
    for (int r = 1; r < s->n_train; r++) {
      const double v = s->hist[(size_t)r * M + m];
      hmin = v < hmin ? v : hmin;
      hmax = v > hmax ? v : hmax;
    }
    for (int i = 0; i < B; i++) {
      for (int c = 0; c < C; c++) {
        l[c] = bias[c];
        for (int j = 0; j < k; j++)
          l[c] += (double)slots[m][(size_t)i * k + j] *
                  (double)W[(size_t)j * C + c];
      }
      double mx = l[0], z = 0.0;
      for (int c = 1; c < C; c++)
        mx = l[c] > mx ? l[c] : mx;
      for (int c = 0; c < C; c++)
        z += exp(l[c] - mx);
      const double lse = mx + log(z);
      conf[i] = lse / QMF_T;
      loss += (lse - l[s->labels[i]]) / B;
      for (int c = 0; c < C; c++)
        loss += (double)dlogits[(size_t)i * C + c] *
                (double)cbar[(size_t)m * B + i] * l[c];
    }
    if (hmax > hmin)
      for (int i = 0; i < B; i++) {
        const int j = (i + 1) % B;
        const double hi = (s->hist[(size_t)s->rows[i] * M + m] - hmin) /
                          (hmax - hmin),
                     hj = (s->hist[(size_t)s->rows[j] * M + m] - hmin) /
                          (hmax - hmin);
        const double t = hi > hj ? 1.0 : (hi < hj ? -1.0 : 0.0);
        const double v = t * (conf[i] - conf[j]) - fabs(hi - hj);
        if (t != 0.0 && v > 0.0)
          loss += QMF_LAMBDA * v / B;
      }
  }
  return loss;
}

double qmf_gradcheck(uint64_t seed) {
  enum { M = 3, K = 5, C = 4, B = 6, N = 9 };
  train_opts o;
  train_opts_init(&o);
  o.seed = seed;
  method_hooks h;
  qmf_state *s = qmf_create(M, K, C, B, N, &o, &h);
  if (!s)
    return INFINITY;
  trng r;
  trng_seed(&r, seed, 99);
  float slot_mem[M][B * K], dslot_mem[M][B * K], dlogits[B * C], out[B * C];
  const float *slots[M];
  float *dslots[M];
  int rows[B], labels[B];
  for (int m = 0; m < M; m++) {
    for (int i = 0; i < B * K; i++)
      slot_mem[m][i] =
          (float)(4.0 * (double)(trng_next(&r) >> 11) * 0x1.0p-53 - 2.0);
    slots[m] = slot_mem[m];
    dslots[m] = dslot_mem[m];
  }
  /* larger head weights than the initialisation, so that the confidences
   * differ and the ranking terms are active */
  for (size_t i = 0; i < s->n_params; i++)
    s->params[i] *= 8.0f;
  for (int i = 0; i < B; i++) {
    rows[i] = (int)((i * 4 + 1) % N);
    labels[i] = (int)trng_below(&r, C);
  }
  for (int i = 0; i < B * C; i++)
    dlogits[i] = (float)(((double)(trng_next(&r) >> 11) * 0x1.0p-53 - 0.5) / B);
  for (int i = 0; i < N * M; i++)
    s->hist[i] = 3.0 * (double)(trng_next(&r) >> 11) * 0x1.0p-53;
  qmf_batch(s, NULL, B, rows, labels, NULL);
  qmf_forward(s, 1, B, M, K, slots, C, out);
  float cbar[M * B];
  memcpy(cbar, s->conf, sizeof cbar);
  memset(s->grads, 0, s->n_params * sizeof(float));
  qmf_grads(s, B, slots, dlogits, dslots);
  /* central differences in double on every parameter and slot entry */
  const double eps = 1e-3;
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < s->n_params; i++) {
    const float keep = s->params[i], up = keep + (float)eps,
                down = keep - (float)eps;
    s->params[i] = up;
    const double lp = qmf_ref_loss(s, B, slots, dlogits, cbar);
    s->params[i] = down;
    const double lm = qmf_ref_loss(s, B, slots, dlogits, cbar);
    s->params[i] = keep;
    const double fd = (lp - lm) / ((double)up - (double)down), g = s->grads[i];
    num += (g - fd) * (g - fd);
    den += fd * fd;
  }
  for (int m = 0; m < M; m++)
    for (int i = 0; i < B * K; i++) {
      const float keep = slot_mem[m][i], up = keep + (float)eps,
                  down = keep - (float)eps;
      slot_mem[m][i] = up;
      const double lp = qmf_ref_loss(s, B, slots, dlogits, cbar);
      slot_mem[m][i] = down;
      const double lm = qmf_ref_loss(s, B, slots, dlogits, cbar);
      slot_mem[m][i] = keep;
      const double fd = (lp - lm) / ((double)up - (double)down),
                   g = dslot_mem[m][i];
      num += (g - fd) * (g - fd);
      den += fd * fd;
    }
  qmf_free(s);
  return sqrt(num) / (den > 0.0 ? sqrt(den) : 1.0);
}
