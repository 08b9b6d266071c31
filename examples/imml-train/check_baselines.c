/* check-baselines: the peer baselines of --compare against their
 * definitions (doc/BASELINES.md).
 *
 *  1. QMF: the host head's backward (fused term with detached confidences,
 *     unimodal cross-entropies, ranking regulariser) against central finite
 *     differences of the loss in double, for three seeds: norm-wise
 *     relative error below 1e-3 (float32 forward; a wrong term gives
 *     errors of 1e-1 and more).
 *  2. OGM-GE: the unimodal outputs the hooks obtain through the library's
 *     heads add up, over the modalities, to the fused logits of late fusion
 *     (out_m = z_m Wf_m + bf / M), to 1e-4; the coefficients follow
 *     k_m = 1 - tanh(alpha rho_m) for rho_m > 1, else 1, from those
 *     outputs; a constant gradient comes out scaled by exactly k_m (its
 *     noise has std 1e-8), and a varied one keeps its mean and gains the
 *     variance of its scaled self (GE), within sampling error (4096
 *     entries: a few percent). */
#define IMML_EXPERIMENTAL
#include "baselines.h"
#include "rng.h"

#include <imml.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

static void check(int ok, const char *what, double got, double limit) {
  printf("%s %s: %.3g (limit %.3g)\n", ok ? "ok" : "FAIL", what, got, limit);
  failures += !ok;
}

static double unif(trng *r) { return (double)(trng_next(r) >> 11) * 0x1.0p-53; }

static int ogm_checks(void) {
  enum { M = 3, B = 16, C = 5 };
  const int dims[M] = {7, 3, 40};
  train_opts o;
  train_opts_init(&o);
  o.hidden = 256;
  o.knowledge = 16;
  o.gamma1 = 0.0f;
  o.gamma2 = 0.0f;
  o.warmup = 1000000; /* late fusion: every slot z_m */
  imml_config cfg;
  make_config(&o, M, dims, C, &cfg);
  imml_model *model = NULL;
  if (imml_model_create(&cfg, NULL, &model) != IMML_OK) {
    printf("FAIL: imml_model_create: %s\n", imml_model_errmsg(model));
    imml_model_free(model);
    return 1;
  }
  method_hooks h;
  ogm_state *s =
      ogm_create(M, cfg.knowledge_dim, C, cfg.max_batch, OGM_ALPHA, 7, &h);
  if (!s || h.attach(h.ctx, model) != 0)
    return 1;
  trng r;
  trng_seed(&r, 11, 1);
  /* a fused head far from its initialisation, so that the slices differ */
  imml_param_view wf, bf;
  imml_param_find(model, "ft.w", &wf);
  imml_param_find(model, "ft.b", &bf);
  for (int i = 0; i < wf.rows * wf.cols; i++)
    wf.data[i] = (float)(unif(&r) * 2.0 - 1.0);
  for (int i = 0; i < C; i++)
    bf.data[i] = (float)(unif(&r) * 2.0 - 1.0);
  float *x[M];
  const float *feat[M];
  for (int m = 0; m < M; m++) {
    x[m] = malloc((size_t)B * dims[m] * sizeof(float));
    for (int i = 0; i < B * dims[m]; i++)
      x[m][i] = (float)(unif(&r) * 4.0 - 2.0);
    feat[m] = x[m];
  }
  int labels[B], rows[B];
  for (int i = 0; i < B; i++) {
    labels[i] = (int)trng_below(&r, C);
    rows[i] = i;
  }
  if (h.batch(h.ctx, model, B, rows, labels, feat) != 0)
    return 1;
  float fused[B * C], sum[B * C], o_m[B * C];
  imml_forward(model, IMML_MODE_EVAL, B, feat, NULL, fused, NULL);
  memset(sum, 0, sizeof sum);
  double score[M], total = 0.0;
  for (int m = 0; m < M; m++) {
    imml_unimodal_get(model, m, o_m);
    score[m] = 0.0;
    for (int i = 0; i < B; i++) {
      double mx = o_m[i * C], z = 0.0;
      for (int c = 0; c < C; c++)
        mx = o_m[i * C + c] > mx ? o_m[i * C + c] : mx;
      for (int c = 0; c < C; c++)
        z += exp(o_m[i * C + c] - mx);
      score[m] += exp(o_m[i * C + labels[i]] - mx) / z;
    }
    total += score[m];
    for (int i = 0; i < B * C; i++)
      sum[i] += o_m[i];
  }
  double err = 0.0;
  for (int i = 0; i < B * C; i++)
    err = fmax(err, fabs((double)sum[i] - (double)fused[i]));
  check(err < 1e-4, "OGM-GE: sum of unimodal outputs = fused logits (max abs)",
        err, 1e-4);
  double cerr = 0.0;
  int slowed = 0;
  for (int m = 0; m < M; m++) {
    const double rho = score[m] / ((total - score[m]) / (M - 1));
    const double k = rho > 1.0 ? 1.0 - tanh(OGM_ALPHA * rho) : 1.0;
    slowed += k < 1.0;
    cerr = fmax(cerr, fabs(k - (double)ogm_coeff(s, m)));
  }
  check(cerr < 1e-6 && slowed >= 1,
        "OGM-GE: coefficients k_m from the ratios (max abs)", cerr, 1e-6);
  /* modulation of the slowed modality: a constant gradient (b1) and a
   * varied one (w2, H x k = 4096 entries) */
  int slow = 0;
  for (int m = 1; m < M; m++)
    slow = ogm_coeff(s, m) < ogm_coeff(s, slow) ? m : slow;
  const float k = ogm_coeff(s, slow);
  char name[32];
  imml_param_view b1, w2;
  snprintf(name, sizeof name, "m%d.b1", slow);
  imml_param_find(model, name, &b1);
  snprintf(name, sizeof name, "m%d.w2", slow);
  imml_param_find(model, name, &w2);
  const int nw = w2.rows * w2.cols;
  double *before = malloc((size_t)nw * sizeof(double));
  for (int i = 0; i < b1.cols; i++)
    b1.grad[i] = 0.5f;
  double m0 = 0.0, v0 = 0.0;
  for (int i = 0; i < nw; i++) {
    w2.grad[i] = (float)(unif(&r) * 2.0 - 0.5); /* mean 0.5, var 1/3 */
    before[i] = w2.grad[i];
    m0 += before[i];
  }
  m0 /= nw;
  for (int i = 0; i < nw; i++)
    v0 += (before[i] - m0) * (before[i] - m0);
  v0 /= nw - 1;
  h.before_update(h.ctx, model);
  double berr = 0.0;
  for (int i = 0; i < b1.cols; i++)
    berr = fmax(berr, fabs((double)b1.grad[i] - 0.5 * k));
  check(berr < 1e-6, "OGM-GE: constant gradient scaled by k_m (max abs)", berr,
        1e-6);
  double m1 = 0.0, v1 = 0.0;
  for (int i = 0; i < nw; i++)
    m1 += w2.grad[i];
  m1 /= nw;
  for (int i = 0; i < nw; i++)
    v1 += (w2.grad[i] - m1) * (w2.grad[i] - m1);
  v1 /= nw - 1;
  /* after: mean k m0, variance k^2 v0 (scaled) + k^2 v0 (noise) */
  const double vratio = v1 / (2.0 * k * k * v0);
  const double merr = fabs(m1 - k * m0) / (k * sqrt(2.0 * v0 / nw));
  check(fabs(vratio - 1.0) < 0.15,
        "OGM-GE: GE noise doubles the scaled variance (ratio - 1)",
        fabs(vratio - 1.0), 0.15);
  check(merr < 5.0, "OGM-GE: mean kept (standard errors)", merr, 5.0);
  free(before);
  for (int m = 0; m < M; m++)
    free(x[m]);
  ogm_free(s);
  imml_model_free(model);
  return 0;
}

int main(void) {
  for (uint64_t seed = 1; seed <= 3; seed++) {
    const double e = qmf_gradcheck(seed);
    char what[64];
    snprintf(what, sizeof what, "QMF: backward vs finite differences, seed %d",
             (int)seed);
    check(e < 1e-3, what, e, 1e-3);
  }
  if (ogm_checks() != 0) {
    printf("FAIL: OGM-GE set-up\n");
    failures++;
  }
  return failures ? 1 : 0;
}
