/* custom-head: the smallest host fusion and target head (F&T) for libimml.
 *
 * libimml turns each modality's features into its knowledge and the
 * front-door adjusted slots s_m (B x k each); the host maps the slots to
 * logits.  Here the head is logits = sum_m s_m W_m + b, its parameters live
 * in the host's own struct (reached through user_data), and the host trains
 * them with its own SGD next to libimml's AdamW.  Data: two synthetic
 * modalities of 4 classes, one informative (predominant), one weak.
 * Exits 1, saying why, unless the loss falls and test accuracy is > 0.9. */
#include <imml.h>
#include <stdio.h>
#include <string.h>

enum { M = 2, D = 8, K = 16, C = 4, B = 32, NTR = 512, NTE = 256 };

typedef struct head {
  float w[M][K * C], b[C];   /* the head's parameters */
  float gw[M][K * C], gb[C]; /* their gradients, accumulated by backward */
} head;

/* forward: logits (B x C) from the M slots (B x k each) */
static int head_forward(void *user_data, int training, int batch, int n_mod,
                        int k, const float *const *slots, int n_classes,
                        float *logits) {
  const head *h = user_data;
  (void)training; /* nothing to cache: backward receives the slots again */
  for (int i = 0; i < batch; i++)
    for (int c = 0; c < n_classes; c++) {
      float z = h->b[c];
      for (int m = 0; m < n_mod; m++)
        for (int j = 0; j < k; j++)
          z += slots[m][i * k + j] * h->w[m][j * n_classes + c];
      logits[i * n_classes + c] = z;
    }
  return 0;
}

/* backward: dslots = dlogits W_m^T (overwritten); dW_m += s_m^T dlogits */
static int head_backward(void *user_data, int batch, int n_mod, int k,
                         const float *const *slots, const float *dlogits,
                         int n_classes, float *const *dslots) {
  head *h = user_data;
  for (int i = 0; i < batch; i++)
    for (int c = 0; c < n_classes; c++) {
      float g = dlogits[i * n_classes + c];
      h->gb[c] += g;
      for (int m = 0; m < n_mod; m++)
        for (int j = 0; j < k; j++) {
          if (c == 0)
            dslots[m][i * k + j] = 0.0f;
          dslots[m][i * k + j] += g * h->w[m][j * n_classes + c];
          h->gw[m][j * n_classes + c] += g * slots[m][i * k + j];
        }
    }
  return 0;
}

static unsigned rng = 12345u;
static float unif(void) { /* in [-1, 1) */
  rng = rng * 1664525u + 1013904223u;
  return (float)(rng >> 8) / 8388608.0f - 1.0f;
}

/* sample i of class i % C; modality 0 carries the class clearly, 1 barely */
static float x[M][NTR + NTE][D], mu[M][C][D];
static int y[NTR + NTE];

int main(void) {
  for (int m = 0; m < M; m++)
    for (int c = 0; c < C; c++)
      for (int j = 0; j < D; j++)
        mu[m][c][j] = (m == 0 ? 1.5f : 0.3f) * unif();
  for (int i = 0; i < NTR + NTE; i++) {
    y[i] = i % C;
    for (int m = 0; m < M; m++)
      for (int j = 0; j < D; j++)
        x[m][i][j] = mu[m][y[i]][j] + 0.5f * unif();
  }
  static head h; /* zero gradients; small random weights */
  for (int m = 0; m < M; m++)
    for (int j = 0; j < K * C; j++)
      h.w[m][j] = 0.1f * unif();
  imml_ft_ops ops;
  imml_ft_ops_init(&ops);
  ops.forward = head_forward, ops.backward = head_backward;
  ops.user_data = &h;
  int dims[M] = {D, D};
  imml_config cfg;
  imml_config_init(&cfg);
  cfg.dims = dims, cfg.n_classes = C, cfg.max_batch = B;
  cfg.hidden_dim = 32, cfg.knowledge_dim = K, cfg.dict_size = 64;
  cfg.warmup_steps = 32;
  imml_optim_config opt;
  imml_optim_config_init(&opt, IMML_OPTIM_ADAMW);
  opt.lr = 3e-3f;
  imml_model *model = NULL;
  imml_status st = imml_model_create(&cfg, &ops, &model);
  if (st == IMML_OK)
    st = imml_optim_setup(model, &opt);
  double first = 0, last = 0;
  for (int epoch = 0; epoch < 12 && st == IMML_OK; epoch++) {
    double sum = 0;
    for (int i0 = 0; i0 < NTR && st == IMML_OK; i0 += B) {
      const float *f[M] = {x[0][i0], x[1][i0]};
      imml_losses loss;
      st = imml_forward(model, IMML_MODE_TRAIN, B, f, y + i0, NULL, &loss);
      if (st == IMML_OK)
        st = imml_backward(model, NULL); /* the head's backward runs here */
      if (st == IMML_OK)
        st = imml_commit(model);
      if (st == IMML_OK)
        st = imml_optim_step(model); /* libimml's parameters */
      if (st == IMML_OK)
        sum += loss.total / (NTR / B);
      for (int m = 0; m < M; m++) /* the host's own SGD on the head */
        for (int j = 0; j < K * C; j++)
          h.w[m][j] -= 0.05f * h.gw[m][j], h.gw[m][j] = 0.0f;
      for (int c = 0; c < C; c++)
        h.b[c] -= 0.05f * h.gb[c], h.gb[c] = 0.0f;
    }
    if (epoch == 0)
      first = sum;
    last = sum;
  }
  int correct = 0;
  for (int i0 = NTR; i0 < NTR + NTE && st == IMML_OK; i0 += B) {
    const float *f[M] = {x[0][i0], x[1][i0]};
    int cls[B];
    st = imml_predict(model, B, f, NULL, NULL, cls);
    for (int i = 0; st == IMML_OK && i < B; i++)
      correct += cls[i] == y[i0 + i];
  }
  if (st != IMML_OK)
    fprintf(stderr, "custom-head: %s: %s\n", imml_status_string(st),
            imml_model_errmsg(model));
  imml_model_free(model);
  if (st != IMML_OK)
    return 1;
  double acc = (double)correct / NTE;
  printf("loss %.3f -> %.3f, test accuracy %.3f\n", first, last, acc);
  if (!(last < first) || !(acc > 0.9)) {
    fprintf(stderr, "custom-head: loss did not fall or accuracy <= 0.9\n");
    return 1;
  }
  return 0;
}
