/* Properties of METHOD.md that a correct libimml shows (section "What a
 * correct implementation shows", sections 2, 5 and 6): beta = 0 and
 * J_eff = 1 front-door limits, plain late fusion during warm-up, host F&T
 * callbacks equivalent to the built-in F&T, failing callbacks change
 * nothing, the automatic choice of p, determinism, and the exact
 * initialisation values. */
#include "check_main.h"
#include "common.h"

#include "imml.h"
#include "internal.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ */
/* Helpers                                                             */
/* ------------------------------------------------------------------ */

/* Standard normal (Box-Muller) from the shared drng stream. */
static double drng_normal(drng *r) {
  double u1 = ((double)(drng_u64(r) >> 11) + 1.0) * 0x1.0p-53;
  double u2 = (double)(drng_u64(r) >> 11) * 0x1.0p-53;
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static void small_cfg(imml_config *c, int M, const int *dims) {
  imml_config_init(c);
  c->n_modalities = M;
  c->dims = dims;
  c->hidden_dim = 8;
  c->knowledge_dim = 4;
  c->n_classes = 3;
  c->max_batch = 6;
  c->dict_size = 10;
  c->seed = 7;
}

static void fwd_train(imml_model *m, const batch *b, float *logits,
                      imml_losses *l) {
  imml_status st =
      imml_forward(m, IMML_MODE_TRAIN, b->B, feats(b), b->y, logits, l);
  ck_assert_msg(st == IMML_OK, "train forward: %d %s", (int)st,
                imml_model_errmsg(m));
}

static void train_once(imml_model *m, const batch *b) {
  fwd_train(m, b, NULL, NULL);
  backward_ok(m, NULL);
}

static void view(imml_model *m, int i, imml_param_view *v) {
  ck_assert_int_eq(imml_param_get(m, i, v), IMML_OK);
}

/* The tensor called `name` (imml_param_find); with mod >= 0 the name is
 * "m<mod>.<name>". */
static void view_named(imml_model *m, int mod, const char *name,
                       imml_param_view *v) {
  char full[32];
  if (mod >= 0)
    snprintf(full, sizeof full, "m%d.%s", mod, name);
  else
    snprintf(full, sizeof full, "%s", name);
  ck_assert_msg(imml_param_find(m, full, v) == IMML_OK, "no tensor %s", full);
}

/* Norm-wise relative error ||a - ref|| / max(||ref||, 1e-12). */
static double rel_ff(const float *a, const float *ref, size_t n) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < n; i++) {
    const double d = (double)a[i] - (double)ref[i];
    num += d * d;
    den += (double)ref[i] * (double)ref[i];
  }
  return sqrt(num) / fmax(sqrt(den), 1e-12);
}

static double rel_fd(const float *a, const double *ref, size_t n) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < n; i++) {
    const double d = (double)a[i] - ref[i];
    num += d * d;
    den += ref[i] * ref[i];
  }
  return sqrt(num) / fmax(sqrt(den), 1e-12);
}

static int all_zero(const float *x, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (x[i] != 0.0f)
      return 0;
  return 1;
}

/* ------------------------------------------------------------------ */
/* Host F&T: concat + linear, like the built-in one                    */
/* ------------------------------------------------------------------ */

typedef struct host_ft {
  int M, k, C;
  float *w, *b;   /* (M k, C), (C) */
  float *dw, *db; /* gradients, accumulated */
  int fail_forward, fail_backward;
  int n_forward, n_backward, last_training;
} host_ft;

static int host_forward(void *ud, int training, int B, int M, int k,
                        const float *const *slots, int C, float *logits) {
  host_ft *h = ud;
  h->n_forward++;
  h->last_training = training;
  if (h->fail_forward)
    return h->fail_forward;
  ck_assert_int_eq(M, h->M);
  ck_assert_int_eq(k, h->k);
  ck_assert_int_eq(C, h->C);
  for (int i = 0; i < B; i++)
    for (int j = 0; j < C; j++) {
      float acc = h->b[j];
      for (int m = 0; m < M; m++)
        for (int t = 0; t < k; t++)
          acc +=
              slots[m][(size_t)i * k + t] * h->w[(size_t)(m * k + t) * C + j];
      logits[(size_t)i * C + j] = acc;
    }
  return 0;
}

static int host_backward(void *ud, int B, int M, int k,
                         const float *const *slots, const float *dlogits, int C,
                         float *const *dslots) {
  host_ft *h = ud;
  h->n_backward++;
  if (h->fail_backward)
    return h->fail_backward;
  for (int m = 0; m < M; m++)
    for (int i = 0; i < B; i++)
      for (int t = 0; t < k; t++) {
        float acc = 0.0f;
        for (int j = 0; j < C; j++)
          acc += dlogits[(size_t)i * C + j] * h->w[(size_t)(m * k + t) * C + j];
        dslots[m][(size_t)i * k + t] = acc;
      }
  for (int m = 0; m < M; m++)
    for (int t = 0; t < k; t++)
      for (int j = 0; j < C; j++) {
        float acc = 0.0f;
        for (int i = 0; i < B; i++)
          acc += slots[m][(size_t)i * k + t] * dlogits[(size_t)i * C + j];
        h->dw[(size_t)(m * k + t) * C + j] += acc;
      }
  for (int j = 0; j < C; j++) {
    float acc = 0.0f;
    for (int i = 0; i < B; i++)
      acc += dlogits[(size_t)i * C + j];
    h->db[j] += acc;
  }
  return 0;
}

static void host_init(host_ft *h, int M, int k, int C) {
  memset(h, 0, sizeof *h);
  h->M = M;
  h->k = k;
  h->C = C;
  h->w = xcalloc((size_t)M * k * C, sizeof(float));
  h->b = xcalloc((size_t)C, sizeof(float));
  h->dw = xcalloc((size_t)M * k * C, sizeof(float));
  h->db = xcalloc((size_t)C, sizeof(float));
}

static void host_free(host_ft *h) {
  free(h->w);
  free(h->b);
  free(h->dw);
  free(h->db);
}

static imml_ft_ops host_ops(host_ft *h) {
  imml_ft_ops ops;
  imml_ft_ops_init(&ops);
  ops.forward = host_forward;
  ops.backward = host_backward;
  ops.user_data = h;
  return ops;
}

/* The host's Wf, bf: the ft.w, ft.b of a built-in model. */
static void host_copy_from(host_ft *h, imml_model *builtin) {
  imml_param_view w, b;
  view_named(builtin, -1, "ft.w", &w);
  view_named(builtin, -1, "ft.b", &b);
  ck_assert_str_eq(w.name, "ft.w");
  ck_assert_str_eq(b.name, "ft.b");
  memcpy(h->w, w.data, (size_t)w.rows * w.cols * sizeof(float));
  memcpy(h->b, b.data, (size_t)b.cols * sizeof(float));
}

/* ------------------------------------------------------------------ */
/* beta = 0: every row of xhat_a is identical                          */
/* ------------------------------------------------------------------ */

START_TEST(test_beta0_rows_identical) {
  static const int dims[3] = {5, 7, 3};
  const float betas[2] = {0.0f, 0.7f};
  for (int bi = 0; bi < 2; bi++) {
    const float beta = betas[bi];
    imml_config c;
    small_cfg(&c, 3, dims);
    c.beta = beta;
    c.slot_mode = IMML_SLOT_STRICT;
    c.predominant = 1;
    const int M = 3, k = c.knowledge_dim, p = 1;
    imml_model *m = create_ok(&c, NULL);
    drng r = {11};
    batch b1, b2;
    batch_random(&b1, M, dims, 4, c.n_classes, &r);
    batch_random(&b2, M, dims, 4, c.n_classes, &r);
    train_once(m, &b1); /* attends over the batch itself */
    train_once(m, &b2); /* attends over 4 dictionary entries */
    const int J = imml_fdc_dict_fill(m);
    ck_assert_int_eq(J, 8); /* partly filled: 8 of 10 */

    /* Wq, Wk: zero gradient exactly when beta = 0. */
    imml_param_view wq, wk;
    view_named(m, -1, "fdc.wq", &wq);
    view_named(m, -1, "fdc.wk", &wk);
    const size_t nq = (size_t)wq.rows * wq.cols;
    if (beta == 0.0f) {
      ck_assert_msg(all_zero(wq.grad, nq), "beta=0: dWq not zero");
      ck_assert_msg(all_zero(wk.grad, nq), "beta=0: dWk not zero");
    } else {
      ck_assert_msg(!all_zero(wq.grad, nq), "beta=0.7: dWq is zero");
      ck_assert_msg(!all_zero(wk.grad, nq), "beta=0.7: dWk is zero");
    }

    const int B = 5;
    float *z[3], *slot[3];
    for (int mm = 0; mm < M; mm++) {
      z[mm] = xcalloc((size_t)B * k, sizeof(float));
      slot[mm] = xcalloc((size_t)B * k, sizeof(float));
      for (int i = 0; i < B * k; i++)
        z[mm][i] = 2.0f * drng_unif(&r);
    }
    ck_assert_int_eq(imml_fdc_adjust(m, B, (const float *const *)z, slot),
                     IMML_OK);
    ck_assert_msg(memcmp(slot[p], z[p], (size_t)B * k * sizeof(float)) == 0,
                  "slot_p != z_p");
    int differ = 0;
    for (int a = 0; a < M; a++) {
      if (a == p)
        continue;
      for (int i = 1; i < B; i++)
        if (memcmp(slot[a] + (size_t)i * k, slot[a], k * sizeof(float)) != 0)
          differ = 1;
      if (beta != 0.0f)
        continue;
      for (int i = 1; i < B; i++)
        ck_assert_msg(
            memcmp(slot[a] + (size_t)i * k, slot[a], k * sizeof(float)) == 0,
            "beta=0: row %d of xhat_%d differs from row 0", i, a);
      /* ... and equals the empirical mean of the strata. */
      for (int t = 0; t < k; t++) {
        double mean = 0.0;
        for (int j = 0; j < J; j++)
          mean += m->dict[(size_t)j * M * k + (size_t)a * k + t];
        mean /= J;
        ck_assert_msg(fabs(slot[a][t] - mean) <= 1e-6 * fmax(1.0, fabs(mean)),
                      "beta=0: xhat_%d[%d] = %.9g, mean of strata %.9g", a, t,
                      (double)slot[a][t], mean);
      }
    }
    if (beta != 0.0f)
      ck_assert_msg(differ, "beta=0.7: the rows of xhat should differ "
                            "(degenerate test input)");
    for (int mm = 0; mm < M; mm++) {
      free(z[mm]);
      free(slot[mm]);
    }
    batch_free(&b1);
    batch_free(&b2);
    imml_model_free(m);
  }
}
END_TEST

/* ------------------------------------------------------------------ */
/* J_eff = 1: xhat equals the single dictionary entry, for any beta     */
/* ------------------------------------------------------------------ */

START_TEST(test_jeff1_single_entry) {
  static const int dims[3] = {5, 7, 3};
  const float betas[5] = {0.0f, 0.25f, 0.5f, 0.7f, 1.0f};
  const int M = 3, p = 0;
  for (int variant = 0; variant < 2; variant++) {
    for (int bi = 0; bi < 5; bi++) {
      for (int mode = 0; mode < 2; mode++) {
        imml_config c;
        small_cfg(&c, M, dims);
        c.beta = betas[bi];
        c.predominant = p;
        c.slot_mode = mode;
        /* variant 0: dict_size 1 and a batch of 4 (only the last row
         * stays); variant 1: dict_size 10 and a batch of 1. */
        c.dict_size = variant == 0 ? 1 : 10;
        const int Bt = variant == 0 ? 4 : 1, k = c.knowledge_dim;
        imml_model *m = create_ok(&c, NULL);
        drng r = {23};
        batch b;
        batch_random(&b, M, dims, Bt, c.n_classes, &r);
        train_once(m, &b);
        ck_assert_int_eq(imml_fdc_dict_fill(m), 1);
        const float *entry = m->dict; /* [d_0; d_1; d_2] */
        for (int mm = 0; mm < M; mm++)
          ck_assert_msg(memcmp(entry + (size_t)mm * k,
                               m->train.z[mm] + (size_t)(Bt - 1) * k,
                               k * sizeof(float)) == 0,
                        "the entry is not the batch's last row of z_%d", mm);
        const int B = 5;
        float *z[3], *slot[3];
        for (int mm = 0; mm < M; mm++) {
          z[mm] = xcalloc((size_t)B * k, sizeof(float));
          slot[mm] = xcalloc((size_t)B * k, sizeof(float));
          for (int i = 0; i < B * k; i++)
            z[mm][i] = 3.0f * drng_unif(&r);
        }
        ck_assert_int_eq(imml_fdc_adjust(m, B, (const float *const *)z, slot),
                         IMML_OK);
        for (int a = 0; a < M; a++) {
          if (a == p)
            continue;
          for (int i = 0; i < B; i++)
            for (int t = 0; t < k; t++) {
              const double want = (double)entry[(size_t)a * k + t] +
                                  (mode == IMML_SLOT_CONDITIONAL
                                       ? (double)z[a][(size_t)i * k + t]
                                       : 0.0);
              const double got = slot[a][(size_t)i * k + t];
              ck_assert_msg(fabs(got - want) <= 1e-6 * fmax(1.0, fabs(want)),
                            "J_eff=1 beta=%g mode=%d: slot_%d[%d][%d] = %.9g, "
                            "want %.9g",
                            (double)c.beta, mode, a, i, t, got, want);
            }
        }
        for (int mm = 0; mm < M; mm++) {
          free(z[mm]);
          free(slot[mm]);
        }
        batch_free(&b);
        imml_model_free(m);
      }
    }
  }
}
END_TEST

/* Empty dictionary and a batch of one: the transient strata are the row
 * itself, so xhat_a = z_a. */
START_TEST(test_empty_dict_single_row) {
  static const int dims[2] = {5, 7};
  imml_config c;
  small_cfg(&c, 2, dims);
  c.predominant = 1;
  c.beta = 0.6f;
  c.slot_mode = IMML_SLOT_STRICT;
  const int k = c.knowledge_dim;
  imml_model *m = create_ok(&c, NULL);
  ck_assert_int_eq(imml_fdc_dict_fill(m), 0);
  drng r = {5};
  float z0[4], z1[4], s0[4], s1[4];
  for (int t = 0; t < k; t++) {
    z0[t] = drng_unif(&r);
    z1[t] = drng_unif(&r);
  }
  const float *z[2] = {z0, z1};
  float *s[2] = {s0, s1};
  ck_assert_int_eq(imml_fdc_adjust(m, 1, z, s), IMML_OK);
  for (int t = 0; t < k; t++) {
    ck_assert_float_eq(s1[t], z1[t]);
    ck_assert_msg(fabsf(s0[t] - z0[t]) <= 1e-6f * fmaxf(1.0f, fabsf(z0[t])),
                  "xhat_0[%d] = %.9g, z_0 = %.9g", t, (double)s0[t],
                  (double)z0[t]);
  }
  ck_assert_int_eq(imml_fdc_dict_fill(m), 0);
  imml_model_free(m);
}
END_TEST

/* ------------------------------------------------------------------ */
/* gamma1 = gamma2 = 0 during warm-up: plain late fusion                */
/* ------------------------------------------------------------------ */

/* Double-precision late fusion: logits = sum_m z_m Wf_m + bf with z_m the
 * MDKEN knowledge; returns CE and fills the gradients of every W1, b1, W2,
 * b2, Wf, bf (in flat layout, Wc/bc/Wq/Wk zero) and of the inputs. */
static double late_fusion_ref(imml_model *m, const batch *b, double *logits,
                              double *grad, double **dh) {
  const imml_config *c = &m->cfg;
  const int M = c->n_modalities, H = c->hidden_dim, k = c->knowledge_dim,
            C = c->n_classes, B = b->B;
  float *P = NULL;
  size_t n = 0;
  ck_assert_int_eq(imml_param_flat(m, &P, NULL, &n), IMML_OK);
  memset(grad, 0, n * sizeof(double));
  imml_param_view wf, bf;
  view_named(m, -1, "ft.w", &wf);
  view_named(m, -1, "ft.b", &bf);
  const size_t off_wf = (size_t)(wf.data - P), off_bf = (size_t)(bf.data - P);
  double *u = xcalloc((size_t)M * B * H, sizeof(double));
  double *z = xcalloc((size_t)M * B * k, sizeof(double));
  for (int mm = 0; mm < M; mm++) {
    imml_param_view w1, b1, w2, b2;
    view_named(m, mm, "w1", &w1);
    view_named(m, mm, "b1", &b1);
    view_named(m, mm, "w2", &w2);
    view_named(m, mm, "b2", &b2);
    const int d = c->dims[mm];
    for (int i = 0; i < B; i++) {
      for (int hh = 0; hh < H; hh++) {
        double acc = b1.data[hh];
        for (int j = 0; j < d; j++)
          acc +=
              (double)b->x[mm][(size_t)i * d + j] * w1.data[(size_t)j * H + hh];
        u[((size_t)mm * B + i) * H + hh] = acc > 0.0 ? acc : 0.0;
      }
      for (int t = 0; t < k; t++) {
        double acc = b2.data[t];
        for (int hh = 0; hh < H; hh++)
          acc += u[((size_t)mm * B + i) * H + hh] * w2.data[(size_t)hh * k + t];
        z[((size_t)mm * B + i) * k + t] = acc;
      }
    }
  }
  double ce = 0.0;
  double *dlog = xcalloc((size_t)B * C, sizeof(double));
  for (int i = 0; i < B; i++) {
    double *li = logits + (size_t)i * C;
    for (int j = 0; j < C; j++) {
      double acc = bf.data[j];
      for (int mm = 0; mm < M; mm++)
        for (int t = 0; t < k; t++)
          acc += z[((size_t)mm * B + i) * k + t] *
                 wf.data[(size_t)(mm * k + t) * C + j];
      li[j] = acc;
    }
    double mx = li[0];
    for (int j = 1; j < C; j++)
      mx = fmax(mx, li[j]);
    double s = 0.0;
    for (int j = 0; j < C; j++)
      s += exp(li[j] - mx);
    ce -= li[b->y[i]] - mx - log(s);
    for (int j = 0; j < C; j++)
      dlog[(size_t)i * C + j] =
          (exp(li[j] - mx) / s - (j == b->y[i] ? 1.0 : 0.0)) / B;
  }
  ce /= B;
  for (int i = 0; i < B; i++)
    for (int j = 0; j < C; j++) {
      grad[off_bf + j] += dlog[(size_t)i * C + j];
      for (int mm = 0; mm < M; mm++)
        for (int t = 0; t < k; t++)
          grad[off_wf + (size_t)(mm * k + t) * C + j] +=
              z[((size_t)mm * B + i) * k + t] * dlog[(size_t)i * C + j];
    }
  double *dz = xcalloc((size_t)k, sizeof(double));
  double *du = xcalloc((size_t)H, sizeof(double));
  for (int mm = 0; mm < M; mm++) {
    imml_param_view w1, b1, w2, b2;
    view_named(m, mm, "w1", &w1);
    view_named(m, mm, "b1", &b1);
    view_named(m, mm, "w2", &w2);
    view_named(m, mm, "b2", &b2);
    const size_t o_w1 = (size_t)(w1.data - P), o_b1 = (size_t)(b1.data - P),
                 o_w2 = (size_t)(w2.data - P), o_b2 = (size_t)(b2.data - P);
    const int d = c->dims[mm];
    for (int i = 0; i < B; i++) {
      const double *ui = u + ((size_t)mm * B + i) * H;
      for (int t = 0; t < k; t++) {
        double acc = 0.0;
        for (int j = 0; j < C; j++)
          acc +=
              dlog[(size_t)i * C + j] * wf.data[(size_t)(mm * k + t) * C + j];
        dz[t] = acc;
        grad[o_b2 + t] += acc;
        for (int hh = 0; hh < H; hh++)
          grad[o_w2 + (size_t)hh * k + t] += ui[hh] * acc;
      }
      for (int hh = 0; hh < H; hh++) {
        double acc = 0.0;
        for (int t = 0; t < k; t++)
          acc += dz[t] * w2.data[(size_t)hh * k + t];
        du[hh] = ui[hh] > 0.0 ? acc : 0.0;
        grad[o_b1 + hh] += du[hh];
        for (int j = 0; j < d; j++)
          grad[o_w1 + (size_t)j * H + hh] +=
              (double)b->x[mm][(size_t)i * d + j] * du[hh];
      }
      for (int j = 0; j < d; j++) {
        double acc = 0.0;
        for (int hh = 0; hh < H; hh++)
          acc += du[hh] * w1.data[(size_t)j * H + hh];
        dh[mm][(size_t)i * d + j] = acc;
      }
    }
  }
  free(u);
  free(z);
  free(dlog);
  free(dz);
  free(du);
  return ce;
}

START_TEST(test_warmup_late_fusion) {
  static const int dims[3] = {5, 7, 3};
  const int M = 3;
  for (int mode = 0; mode < 2; mode++) {
    imml_config c;
    small_cfg(&c, M, dims);
    c.gamma1 = 0.0f;
    c.gamma2 = 0.0f;
    c.warmup_steps = 1000;
    c.slot_mode = mode;
    c.dict_size = 8;
    const int C = c.n_classes;
    imml_model *m = create_ok(&c, NULL);
    imml_optim_config oc;
    imml_optim_config_init(&oc, IMML_OPTIM_SGD);
    oc.lr = 0.1f;
    ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
    float *P = NULL, *G = NULL;
    size_t n = 0;
    ck_assert_int_eq(imml_param_flat(m, &P, &G, &n), IMML_OK);
    double *gref = xcalloc(n, sizeof(double));
    drng r = {99};
    const int sizes[5] = {4, 6, 5, 3, 6};
    for (int step = 0; step < 5; step++) {
      batch b;
      batch_random(&b, M, dims, sizes[step], C, &r);
      const int B = b.B;
      float *dh[3];
      double *dhr[3];
      dfeat_alloc(dh, &b);
      for (int mm = 0; mm < M; mm++)
        dhr[mm] = xcalloc((size_t)B * dims[mm], sizeof(double));
      double *lref = xcalloc((size_t)B * C, sizeof(double));
      const double ce = late_fusion_ref(m, &b, lref, gref, dhr);
      float *logits = xcalloc((size_t)B * C, sizeof(float));
      imml_losses l;
      fwd_train(m, &b, logits, &l);
      ck_assert_msg(rel_fd(logits, lref, (size_t)B * C) < 1e-5,
                    "step %d: logits differ from late fusion (rel %g)", step,
                    rel_fd(logits, lref, (size_t)B * C));
      ck_assert_msg(fabs(l.ce - ce) <= 1e-5 * fabs(ce),
                    "step %d: ce %.9g, late fusion %.9g", step, l.ce, ce);
      ck_assert_msg(l.total == l.ce, "total %.17g != ce %.17g", l.total, l.ce);
      ck_assert_msg(l.con == 0.0, "L_con = %g during warm-up", l.con);
      /* warm-up: every slot is z_m, in the forward and in fdc_adjust */
      {
        const int k = c.knowledge_dim;
        float *z[3], *sl[3];
        for (int mm = 0; mm < M; mm++) {
          ck_assert_msg(memcmp(m->train.slot[mm], m->train.z[mm],
                               (size_t)B * k * sizeof(float)) == 0,
                        "warm-up: slot_%d != z_%d", mm, mm);
          z[mm] = xcalloc((size_t)B * k, sizeof(float));
          sl[mm] = xcalloc((size_t)B * k, sizeof(float));
          memcpy(z[mm], m->train.z[mm], (size_t)B * k * sizeof(float));
        }
        ck_assert_int_eq(imml_fdc_adjust(m, B, (const float *const *)z, sl),
                         IMML_OK);
        for (int mm = 0; mm < M; mm++) {
          ck_assert_msg(memcmp(sl[mm], z[mm], (size_t)B * k * sizeof(float)) ==
                            0,
                        "warm-up: imml_fdc_adjust slot_%d != z_%d", mm, mm);
          free(z[mm]);
          free(sl[mm]);
        }
      }
      backward_ok(m, dh);
      for (int i = 0; i < imml_param_count(m); i++) {
        imml_param_view v;
        view(m, i, &v);
        const size_t cnt = (size_t)v.rows * v.cols, off = (size_t)(v.data - P);
        const double e = rel_fd(v.grad, gref + off, cnt);
        ck_assert_msg(e < 1e-5,
                      "step %d mode %d: gradient of %s differs from "
                      "late fusion (rel %g)",
                      step, mode, v.name, e);
        if (strstr(v.name, ".wc") || strstr(v.name, ".bc") ||
            strstr(v.name, "fdc."))
          ck_assert_msg(all_zero(v.grad, cnt), "%s gradient not zero", v.name);
      }
      for (int mm = 0; mm < M; mm++) {
        const double e = rel_fd(dh[mm], dhr[mm], (size_t)B * dims[mm]);
        ck_assert_msg(e < 1e-5, "step %d: dL/dh_%d differs (rel %g)", step, mm,
                      e);
      }
      int p = 0, fixed = 1;
      ck_assert_int_eq(imml_predominant_get(m, &p, &fixed), IMML_OK);
      ck_assert_int_eq(p, -1);
      ck_assert_int_eq(fixed, 0);
      ck_assert_int_eq(imml_optim_step(m), IMML_OK);
      free(logits);
      free(lref);
      for (int mm = 0; mm < M; mm++)
        free(dhr[mm]);
      dfeat_free(dh, M);
      batch_free(&b);
    }
    ck_assert_int_eq(imml_fdc_dict_fill(m), 8); /* filled and wrapped */
    free(gref);
    imml_model_free(m);
  }
}
END_TEST

/* ------------------------------------------------------------------ */
/* Host F&T callbacks = the built-in concat + linear                    */
/* ------------------------------------------------------------------ */

START_TEST(test_host_ft_equals_builtin) {
  static const int dims[3] = {5, 7, 3};
  const int M = 3;
  for (int mode = 0; mode < 2; mode++) {
    imml_config c;
    small_cfg(&c, M, dims);
    c.slot_mode = mode;
    c.dict_size = 8;
    c.warmup_steps = 2;
    c.seed = 1234;
    const int k = c.knowledge_dim, C = c.n_classes;
    imml_model *a = create_ok(&c, NULL);
    host_ft h;
    host_init(&h, M, k, C);
    host_copy_from(&h, a);
    imml_ft_ops ops = host_ops(&h);
    imml_model *b = create_ok(&c, &ops);
    ck_assert_int_eq(imml_param_count(a), imml_param_count(b) + 2);
    float *Pa, *Ga, *Pb, *Gb;
    size_t na, nb;
    ck_assert_int_eq(imml_param_flat(a, &Pa, &Ga, &na), IMML_OK);
    ck_assert_int_eq(imml_param_flat(b, &Pb, &Gb, &nb), IMML_OK);
    ck_assert_uint_eq(na, nb + (size_t)M * k * C + (size_t)C);
    /* same seed: every shared parameter is identical (ft.* drawn last) */
    ck_assert_msg(memcmp(Pa, Pb, nb * sizeof(float)) == 0,
                  "shared parameters differ at creation");
    imml_optim_config oc;
    imml_optim_config_init(&oc, IMML_OPTIM_SGD);
    oc.lr = 0.05f;
    ck_assert_int_eq(imml_optim_setup(a, &oc), IMML_OK);
    ck_assert_int_eq(imml_optim_setup(b, &oc), IMML_OK);
    imml_param_view fw, fb;
    view_named(a, -1, "ft.w", &fw);
    view_named(a, -1, "ft.b", &fb);
    drng r = {4242};
    const int sizes[7] = {4, 6, 5, 3, 6, 4, 5};
    for (int step = 0; step < 7; step++) {
      batch bt;
      batch_random(&bt, M, dims, sizes[step], C, &r);
      const int B = bt.B;
      float *la = xcalloc((size_t)B * C, sizeof(float));
      float *lb = xcalloc((size_t)B * C, sizeof(float));
      float *dha[3], *dhb[3];
      dfeat_alloc(dha, &bt);
      dfeat_alloc(dhb, &bt);
      imml_losses xa, xb;
      fwd_train(a, &bt, la, &xa);
      fwd_train(b, &bt, lb, &xb);
      ck_assert_int_eq(h.last_training, 1);
      const double el = rel_ff(lb, la, (size_t)B * C);
      ck_assert_msg(el < 1e-5, "step %d mode %d: logits differ (rel %g)", step,
                    mode, el);
      ck_assert_msg(fabs(xa.total - xb.total) <= 1e-5 * fabs(xa.total) &&
                        fabs(xa.ce - xb.ce) <= 1e-5 * fabs(xa.ce) &&
                        fabs(xa.con - xb.con) <= 1e-5 * fabs(xa.con) &&
                        fabs(xa.dis - xb.dis) <= 1e-5 * fabs(xa.dis),
                    "step %d: losses differ: total %.9g vs %.9g, ce %.9g vs "
                    "%.9g, con %.9g vs %.9g, dis %.9g vs %.9g",
                    step, xa.total, xb.total, xa.ce, xb.ce, xa.con, xb.con,
                    xa.dis, xb.dis);
      backward_ok(a, dha);
      backward_ok(b, dhb);
      for (int i = 0; i < imml_param_count(b); i++) {
        imml_param_view va, vb;
        view(a, i, &va);
        view(b, i, &vb);
        ck_assert_str_eq(va.name, vb.name);
        const size_t cnt = (size_t)va.rows * va.cols;
        const double e = rel_ff(vb.grad, va.grad, cnt);
        ck_assert_msg(e < 1e-5,
                      "step %d mode %d: gradient of %s differs "
                      "(rel %g)",
                      step, mode, va.name, e);
      }
      const double ew = rel_ff(h.dw, fw.grad, (size_t)M * k * C);
      const double eb = rel_ff(h.db, fb.grad, (size_t)C);
      ck_assert_msg(ew < 1e-5 && eb < 1e-5,
                    "step %d: host dWf/dbf differ (rel %g, %g)", step, ew, eb);
      for (int mm = 0; mm < M; mm++) {
        const double e = rel_ff(dhb[mm], dha[mm], (size_t)B * dims[mm]);
        ck_assert_msg(e < 1e-5, "step %d: dL/dh_%d differs (rel %g)", step, mm,
                      e);
      }
      ck_assert_int_eq(imml_fdc_dict_fill(a), imml_fdc_dict_fill(b));
      const size_t nd = (size_t)imml_fdc_dict_fill(a) * M * k;
      ck_assert_msg(rel_ff(b->dict, a->dict, nd) < 1e-5,
                    "step %d: dictionaries differ", step);
      int pa, pb, fa, fbx;
      imml_predominant_get(a, &pa, &fa);
      imml_predominant_get(b, &pb, &fbx);
      ck_assert_int_eq(pa, pb);
      ck_assert_int_eq(fa, fbx);
      /* the same SGD step on both; the host updates its own Wf, bf */
      ck_assert_int_eq(imml_optim_step(a), IMML_OK);
      ck_assert_int_eq(imml_optim_step(b), IMML_OK);
      for (size_t i = 0; i < (size_t)M * k * C; i++) {
        h.w[i] = h.w[i] - oc.lr * h.dw[i];
        h.dw[i] = 0.0f;
      }
      for (int j = 0; j < C; j++) {
        h.b[j] = h.b[j] - oc.lr * h.db[j];
        h.db[j] = 0.0f;
      }
      free(la);
      free(lb);
      dfeat_free(dha, M);
      dfeat_free(dhb, M);
      batch_free(&bt);
    }
    ck_assert_int_eq(imml_fdc_dict_fill(a), 8);
    int p, fixed;
    imml_predominant_get(a, &p, &fixed);
    ck_assert_int_eq(fixed, 1);
    /* the host's evaluation forward receives training = 0 */
    {
      batch bt;
      batch_random(&bt, M, dims, 3, C, &r);
      float la[9], lb[9];
      ck_assert_int_eq(
          imml_forward(a, IMML_MODE_EVAL, 3, feats(&bt), NULL, la, NULL),
          IMML_OK);
      ck_assert_int_eq(
          imml_forward(b, IMML_MODE_EVAL, 3, feats(&bt), NULL, lb, NULL),
          IMML_OK);
      ck_assert_int_eq(h.last_training, 0);
      ck_assert_msg(rel_ff(lb, la, 9) < 1e-5, "eval logits differ");
      imml_model *ws = NULL;
      ck_assert_int_eq(imml_model_share(b, &ws), IMML_OK);
      h.last_training = 1;
      ck_assert_int_eq(imml_predict(ws, 3, feats(&bt), lb, NULL, NULL),
                       IMML_OK);
      ck_assert_int_eq(h.last_training, 0);
      ck_assert_msg(rel_ff(lb, la, 9) < 1e-5, "predict logits differ");
      imml_model_free(ws);
      batch_free(&bt);
    }
    imml_model_free(a);
    imml_model_free(b);
    host_free(&h);
  }
}
END_TEST

/* ------------------------------------------------------------------ */
/* A failing callback changes nothing                                  */
/* ------------------------------------------------------------------ */

START_TEST(test_callback_failure_changes_nothing) {
  static const int dims[2] = {5, 7};
  const int M = 2;
  imml_config c;
  small_cfg(&c, M, dims);
  c.warmup_steps = 3;
  c.dict_size = 16;
  const int k = c.knowledge_dim, C = c.n_classes;
  host_ft h, href;
  host_init(&h, M, k, C);
  host_init(&href, M, k, C);
  drng wr = {77};
  for (int i = 0; i < M * k * C; i++)
    h.w[i] = href.w[i] = 0.5f * drng_unif(&wr);
  for (int j = 0; j < C; j++)
    h.b[j] = href.b[j] = 0.1f * drng_unif(&wr);
  imml_ft_ops ops = host_ops(&h), ops_ref = host_ops(&href);
  imml_model *m = create_ok(&c, &ops);
  imml_model *ref = create_ok(&c, &ops_ref); /* same history, never fails */
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
  ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
  ck_assert_int_eq(imml_optim_setup(ref, &oc), IMML_OK);
  imml_model *ws = NULL; /* a share of m */
  ck_assert_int_eq(imml_model_share(m, &ws), IMML_OK);
  drng r = {31337};
  /* rounds: 0 = warm-up in progress (1 step done), 1 = the step that
   * completes warm-up, 2.. = p fixed, dictionary in use */
  for (int round = 0; round < 5; round++) {
    batch b;
    batch_random(&b, M, dims, 4 + round % 3, C, &r);
    /* one good step (accumulated gradients stay, so they are non-zero) */
    for (int w = 0; w < 2; w++) {
      imml_model *x = w ? ref : m;
      fwd_train(x, &b, NULL, NULL);
      backward_ok(x, NULL);
      if (round % 2 == 1)
        ck_assert_int_eq(imml_optim_step(x), IMML_OK);
    }
    batch b2;
    batch_random(&b2, M, dims, 5, C, &r);
    snap s0, s1;
    snap_take(m, &s0);
    ck_assert_msg(!all_zero(s0.grads, s0.n) || round % 2 == 1,
                  "gradients should be non-zero before the failures");

    /* forward callback fails: train, eval and predict */
    h.fail_forward = 7;
    ck_assert_int_eq(
        imml_forward(m, IMML_MODE_TRAIN, b2.B, feats(&b2), b2.y, NULL, NULL),
        IMML_ERR_CALLBACK);
    ck_assert_msg(imml_model_errmsg(m)[0] != '\0',
                  "no message after a failure");
    snap_take(m, &s1);
    snap_check(&s0, &s1, "failed training forward");
    snap_free(&s1);
    ck_assert_int_eq(
        imml_forward(m, IMML_MODE_EVAL, b2.B, feats(&b2), b2.y, NULL, NULL),
        IMML_ERR_CALLBACK);
    ck_assert_msg(imml_model_errmsg(m)[0] != '\0',
                  "no message after a failure");
    ck_assert_int_eq(imml_predict(ws, b2.B, feats(&b2), NULL, NULL, NULL),
                     IMML_ERR_CALLBACK);
    ck_assert_msg(imml_model_errmsg(ws)[0] != '\0', "no share message");
    ck_assert_int_eq(imml_predict(m, b2.B, feats(&b2), NULL, NULL, NULL),
                     IMML_ERR_CALLBACK);
    ck_assert_msg(imml_model_errmsg(m)[0] != '\0',
                  "no message after a failure");
    snap_take(m, &s1);
    snap_check(&s0, &s1, "failed evaluation forward");
    snap_free(&s1);
    h.fail_forward = 0;

    /* backward callback fails */
    fwd_train(m, &b2, NULL, NULL);
    fwd_train(ref, &b2, NULL, NULL);
    s0.pending = 1; /* the forward leaves only its step pending */
    snap_take(m, &s1);
    snap_check(&s0, &s1, "training forward");
    snap_free(&s1);
    float *dh[2];
    dfeat_alloc(dh, &b2);
    h.fail_backward = -3;
    ck_assert_int_eq(imml_backward(m, dh), IMML_ERR_CALLBACK);
    ck_assert_msg(imml_model_errmsg(m)[0] != '\0',
                  "no message after a failure");
    snap_take(m, &s1);
    snap_check(&s0, &s1, "failed backward");
    snap_free(&s1);
    h.fail_backward = 0;

    /* nothing changed, so the step can be completed and matches a model
     * that never failed */
    backward_ok(m, dh);
    backward_ok(ref, NULL);
    ck_assert_int_eq(imml_backward(m, NULL), IMML_ERR_STATE);
    snap sr;
    snap_take(m, &s1);
    snap_take(ref, &sr);
    snap_check(&sr, &s1, "retried backward vs a model that never failed");
    ck_assert_msg(memcmp(h.dw, href.dw, (size_t)M * k * C * sizeof(float)) == 0,
                  "host gradients differ");
    snap_free(&s1);
    snap_free(&sr);
    snap_free(&s0);
    dfeat_free(dh, M);
    batch_free(&b);
    batch_free(&b2);
  }
  int p, fixed;
  imml_predominant_get(m, &p, &fixed);
  ck_assert_int_eq(fixed, 1);
  imml_model_free(ws);
  imml_model_free(m);
  imml_model_free(ref);
  host_free(&h);
  host_free(&href);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Automatic choice of p                                               */
/* ------------------------------------------------------------------ */

/* Modality `informative` carries the label as a scaled one-hot plus small
 * noise; every other modality is pure N(0, 1) noise. */
static void informative_batch(batch *b, int M, const int *dims, int B, int C,
                              int informative, drng *r) {
  batch_alloc(b, M, dims, B);
  for (int i = 0; i < B; i++)
    b->y[i] = (int)(drng_u64(r) % (uint64_t)C);
  for (int m = 0; m < M; m++)
    for (int i = 0; i < B; i++)
      for (int j = 0; j < dims[m]; j++) {
        float v;
        if (m == informative)
          v = 0.1f * (float)drng_normal(r) + (j == b->y[i] ? 2.0f : 0.0f);
        else
          v = (float)drng_normal(r);
        b->x[m][(size_t)i * dims[m] + j] = v;
      }
}

/* Cross-entropy of one row of logits against label y, in double. */
static double row_ce(int n, const float *o, int y) {
  double mx = o[0];
  for (int j = 1; j < n; j++)
    if (o[j] > mx)
      mx = o[j];
  double sum = 0.0;
  for (int j = 0; j < n; j++)
    sum += exp((double)o[j] - mx);
  return mx + log(sum) - (double)o[y];
}

static imml_model *run_auto_p(int informative, int warmup) {
  static const int dims[2] = {6, 6};
  const int M = 2, B = 16;
  imml_config c;
  imml_config_init(&c);
  c.n_modalities = M;
  c.dims = dims;
  c.hidden_dim = 16;
  c.knowledge_dim = 8;
  c.n_classes = 3;
  c.max_batch = B;
  c.dict_size = 64;
  c.warmup_steps = warmup;
  c.seed = 2024;
  imml_model *m = create_ok(&c, NULL);
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
  oc.lr = 1e-2f;
  ck_assert_int_eq(imml_optim_setup(m, &oc), IMML_OK);
  drng r = {555};
  double ema[2] = {0.0, 0.0};
  for (int step = 0; step < warmup + 5; step++) {
    batch b;
    informative_batch(&b, M, dims, B, c.n_classes, informative, &r);
    int p, fixed;
    ck_assert_int_eq(imml_predominant_get(m, &p, &fixed), IMML_OK);
    if (step < warmup) {
      ck_assert_msg(p == -1 && fixed == 0, "step %d: p %d fixed %d too early",
                    step, p, fixed);
    }
    fwd_train(m, &b, NULL, NULL);
    /* the unimodal batch cross-entropies (METHOD.md section 5), from the
     * cached head logits */
    double ce[2];
    for (int mm = 0; mm < M; mm++) {
      double sum = 0.0;
      for (int i = 0; i < B; i++)
        sum += row_ce(c.n_classes, m->train.o[mm] + (size_t)i * c.n_classes,
                      b.y[i]);
      ce[mm] = sum / B;
    }
    backward_ok(m, NULL);
    ck_assert_int_eq(imml_optim_step(m), IMML_OK);
    int steps;
    float got[2];
    ck_assert_int_eq(imml_warmup_get(m, &steps, got), IMML_OK);
    if (step < warmup) {
      for (int mm = 0; mm < M; mm++) {
        /* the library keeps float EMAs: follow its rounding */
        ema[mm] = (float)(0.9 * ema[mm] + 0.1 * ce[mm]);
        ck_assert_msg(fabs(got[mm] - ema[mm]) <= 1e-5 * (1.0 + ema[mm]),
                      "step %d: e_%d = %.9g, expected %.9g", step, mm,
                      (double)got[mm], ema[mm]);
      }
      ck_assert_int_eq(steps, step + 1);
    } else {
      ck_assert_msg(fabs(got[0] - ema[0]) <= 1e-5 * (1.0 + ema[0]) &&
                        fabs(got[1] - ema[1]) <= 1e-5 * (1.0 + ema[1]),
                    "EMAs changed after warm-up");
      ck_assert_int_eq(steps, warmup);
    }
    batch_free(&b);
  }
  int p, fixed;
  ck_assert_int_eq(imml_predominant_get(m, &p, &fixed), IMML_OK);
  ck_assert_int_eq(fixed, 1);
  ck_assert_msg(p == informative, "chose p = %d, the label is in modality %d",
                p, informative);
  ck_assert_msg(ema[informative] < ema[1 - informative] - 0.2,
                "EMAs %.3f %.3f do not separate the modalities", ema[0],
                ema[1]);
  return m;
}

START_TEST(test_auto_predominant) {
  for (int inf = 0; inf < 2; inf++) {
    imml_model *a = run_auto_p(inf, 30);
    imml_model *b = run_auto_p(inf, 30);
    float *pa, *pb;
    size_t na, nb;
    ck_assert_int_eq(imml_param_flat(a, &pa, NULL, &na), IMML_OK);
    ck_assert_int_eq(imml_param_flat(b, &pb, NULL, &nb), IMML_OK);
    ck_assert_uint_eq(na, nb);
    ck_assert_msg(memcmp(pa, pb, na * sizeof(float)) == 0,
                  "two identical runs gave different parameters");
    int p1, p2;
    imml_predominant_get(a, &p1, NULL);
    imml_predominant_get(b, &p2, NULL);
    ck_assert_int_eq(p1, p2);
    imml_model_free(a);
    imml_model_free(b);
  }
}
END_TEST

/* The selection itself: heads forced to constant logits make the
 * cross-entropies known in closed form (the heads that predict the label
 * have the lowest), ties go to the lowest index. */
START_TEST(test_predominant_ties_lowest_index) {
  static const int dims[3] = {4, 5, 6};
  /* predicted class of each modality's head, per case; labels are all 0 */
  static const int predicted[3][3] = {{0, 0, 0}, {1, 0, 0}, {2, 1, 0}};
  static const int expect_p[3] = {0, 1, 2};
  for (int cs = 0; cs < 3; cs++) {
    imml_config c;
    small_cfg(&c, 3, dims);
    c.warmup_steps = 3;
    imml_model *m = create_ok(&c, NULL);
    for (int mm = 0; mm < 3; mm++) {
      imml_param_view wc, bc;
      view_named(m, mm, "wc", &wc);
      view_named(m, mm, "bc", &bc);
      ck_assert_msg(strstr(wc.name, ".wc") && strstr(bc.name, ".bc"),
                    "unexpected tensor order");
      memset(wc.data, 0, (size_t)wc.rows * wc.cols * sizeof(float));
      for (int j = 0; j < c.n_classes; j++)
        bc.data[j] = j == predicted[cs][mm] ? 5.0f : 0.0f;
    }
    drng r = {8};
    /* logits 5 on one class, 0 on the C - 1 others; every label is 0 */
    const double lse = log(exp(5.0) + (double)(c.n_classes - 1));
    double ema_good = 0.0, ema_bad = 0.0;
    for (int step = 0; step < 3; step++) {
      batch b;
      batch_random(&b, 3, dims, 5, c.n_classes, &r);
      for (int i = 0; i < b.B; i++)
        b.y[i] = 0;
      train_once(m, &b);
      ema_good = (float)(0.9 * ema_good + 0.1 * (lse - 5.0));
      ema_bad = (float)(0.9 * ema_bad + 0.1 * lse);
      float got[3];
      int steps;
      imml_warmup_get(m, &steps, got);
      for (int mm = 0; mm < 3; mm++) {
        const double want = predicted[cs][mm] == 0 ? ema_good : ema_bad;
        ck_assert_msg(fabs(got[mm] - want) <= 1e-6 * (1.0 + want),
                      "case %d step %d: e_%d = %.9g, want %.9g", cs, step, mm,
                      (double)got[mm], want);
      }
      batch_free(&b);
    }
    int p, fixed;
    imml_predominant_get(m, &p, &fixed);
    ck_assert_int_eq(fixed, 1);
    ck_assert_msg(p == expect_p[cs], "case %d: p = %d, want %d", cs, p,
                  expect_p[cs]);
    imml_model_free(m);
  }
}
END_TEST

/* ------------------------------------------------------------------ */
/* The host fixes p: imml_predominant_set                               */
/* ------------------------------------------------------------------ */

/* M = 3, gamma1 > 0, a warm-up long enough never to end here; predominant
 * -1 (the library would choose) or given. */
static void set_cfg(imml_config *c, const int *dims, int predominant) {
  small_cfg(c, 3, dims);
  c->warmup_steps = 100;
  c->gamma1 = 0.5f;
  c->beta = 0.6f;
  c->predominant = predominant;
}

/* p as imml_predominant_get reports it, and whether it is fixed. */
static void expect_predominant(imml_model *m, int want_p, int want_fixed,
                               const char *what) {
  int p = -7, fixed = -7;
  ck_assert_int_eq(imml_predominant_get(m, &p, &fixed), IMML_OK);
  ck_assert_msg(p == want_p && fixed == want_fixed,
                "%s: predominant (%d, fixed %d), want (%d, fixed %d)", what, p,
                fixed, want_p, want_fixed);
}

/* imml_predominant_set(m, q) refused with `want`, a message, and m
 * unchanged. */
static void set_refused(imml_model *m, int q, imml_status want,
                        const char *what) {
  snap s;
  snap_take(m, &s);
  const imml_status st = imml_predominant_set(m, q);
  ck_assert_msg(st == want, "%s: imml_predominant_set(%d) = %d, want %d", what,
                q, (int)st, (int)want);
  ck_assert_msg(imml_model_errmsg(m)[0] != '\0', "%s: no message", what);
  expect_unchanged(m, &s, what);
  snap_free(&s);
}

/* Refused (IMML_ERR_INVALID_ARG, nothing changed) for a p outside 0..M-1,
 * and (IMML_ERR_STATE) on a share; accepted while the library has not
 * fixed p (loop 0: a fresh model; 1: after 2 warm-up steps, the dictionary
 * partly filled).  Afterwards imml_predominant_get reports p fixed, on the
 * model and on its share, and the next training forward is the front-door
 * forward: bit for bit the one of a model given p in its configuration
 * (same parameters and dictionary), slot_p = z_p, the auxiliary slots
 * attend over the strata, L_con > 0 and counted in the total.  A second
 * imml_predominant_set is refused, and the choice is saved in checkpoints. */
START_TEST(test_predominant_set) {
  static const int dims[3] = {5, 7, 3};
  const int M = 3, p = 2, pre = _i ? 2 : 0;
  imml_config c, cp;
  set_cfg(&c, dims, -1);
  set_cfg(&cp, dims, p);
  const int k = c.knowledge_dim, C = c.n_classes;
  imml_model *m = create_ok(&c, NULL);
  imml_model *ref = create_ok(&cp, NULL); /* p given from the start */
  drng r = {4100 + (uint64_t)_i};
  batch b;
  /* Warm-up steps without an optimiser: the parameters stay those of
   * ref, and so does the dictionary (knowledge does not depend on p). */
  for (int st = 0; st < pre; st++) {
    batch_random(&b, M, dims, 4, C, &r);
    imml_losses l;
    fwd_train(m, &b, NULL, &l);
    ck_assert_msg(l.con == 0.0, "L_con = %g in warm-up", l.con);
    backward_ok(m, NULL);
    train_once(ref, &b);
    batch_free(&b);
  }
  ck_assert_int_eq(imml_fdc_dict_fill(m), 4 * pre);
  expect_predominant(m, -1, 0, "before imml_predominant_set");

  const int bad[5] = {-1, M, IMML_MAX_MODALITIES, INT_MIN, INT_MAX};
  for (int i = 0; i < 5; i++)
    set_refused(m, bad[i], IMML_ERR_INVALID_ARG, "p out of range");
  ck_assert_int_eq(imml_predominant_set(NULL, p), IMML_ERR_NULL);

  imml_model *sh = NULL;
  ck_assert_int_eq(imml_model_share(m, &sh), IMML_OK);
  {
    snap s;
    snap_take(m, &s);
    ck_assert_int_eq(imml_predominant_set(sh, p), IMML_ERR_STATE);
    ck_assert_msg(imml_model_errmsg(sh)[0] != '\0', "no message on the share");
    expect_unchanged(m, &s, "imml_predominant_set on a share");
    snap_free(&s);
  }
  expect_predominant(sh, -1, 0, "share, before imml_predominant_set");

  snap s0;
  snap_take(m, &s0);
  ck_assert_int_eq(imml_predominant_set(m, p), IMML_OK);
  ck_assert_str_eq(imml_model_errmsg(m), "");
  expect_predominant(m, p, 1, "after imml_predominant_set");
  expect_predominant(sh, p, 1, "share, after imml_predominant_set");
  {
    /* nothing else changed (the warm-up step count may be capped) */
    snap s1;
    snap_take(m, &s1);
    s0.p = p;
    s0.fixed = 1;
    s0.steps = s1.steps;
    snap_check(&s0, &s1, "imml_predominant_set");
    snap_free(&s1);
  }
  snap_free(&s0);
  set_refused(m, p, IMML_ERR_STATE, "set again, same p");
  set_refused(m, 0, IMML_ERR_STATE, "set again, another p");

  /* the next training forward */
  batch_random(&b, M, dims, 5, C, &r);
  const int B = b.B;
  float lg[5 * 3], lr[5 * 3];
  imml_losses l, lref;
  ck_assert_int_eq(imml_grad_zero(m), IMML_OK);
  ck_assert_int_eq(imml_grad_zero(ref), IMML_OK);
  fwd_train(m, &b, lg, &l);
  fwd_train(ref, &b, lr, &lref);
  ck_assert_int_eq(m->train.warm, 0);
  ck_assert_int_eq(m->train.p, p);
  ck_assert_msg(l.con > 0.0 && isfinite(l.con), "L_con = %g after the set",
                l.con);
  const double tot = l.ce + (double)c.gamma1 * l.con + (double)c.gamma2 * l.dis;
  ck_assert_msg(fabs(l.total - tot) <= 1e-12 * fabs(tot),
                "total %.17g != ce + g1 con + g2 dis = %.17g", l.total, tot);
  ck_assert_msg(memcmp(lg, lr, sizeof lg) == 0,
                "logits differ from a model given p = %d in its config", p);
  ck_assert_msg(memcmp(&l, &lref, sizeof l) == 0,
                "losses differ from a model given p = %d in its config", p);
  for (int mm = 0; mm < M; mm++) {
    const size_t bytes = (size_t)B * k * sizeof(float);
    const int same = memcmp(m->train.slot[mm], m->train.z[mm], bytes) == 0;
    ck_assert_msg(mm == p ? same : !same,
                  "slot %d %s z_%d (p = %d): not the front-door slots", mm,
                  same ? "equals" : "differs from", mm, p);
    ck_assert_msg(memcmp(m->train.slot[mm], ref->train.slot[mm], bytes) == 0,
                  "slot %d differs from a model given p in its config", mm);
  }
  backward_ok(m, NULL);
  backward_ok(ref, NULL);
  ck_assert_msg(memcmp(m->grads, ref->grads, m->n_params * sizeof(float)) == 0,
                "gradients differ from a model given p = %d in its config", p);
  ck_assert_int_eq(imml_fdc_dict_fill(m), imml_fdc_dict_fill(ref));
  expect_predominant(m, p, 1, "after a training step");
  set_refused(m, p, IMML_ERR_STATE, "set after training with it");
  batch_free(&b);

  /* saved in checkpoints */
  imml_model_free(sh);
  size_t n = 0;
  ck_assert_int_eq(imml_model_save_mem(m, NULL, 0, &n), IMML_OK);
  unsigned char *buf = xcalloc(n, 1);
  ck_assert_int_eq(imml_model_save_mem(m, buf, n, &n), IMML_OK);
  imml_model *back = NULL;
  const imml_status st = imml_model_load_mem(buf, n, NULL, NULL, &back);
  ck_assert_msg(st == IMML_OK, "load: %d %s", (int)st, imml_model_errmsg(back));
  expect_predominant(back, p, 1, "loaded checkpoint");
  set_refused(back, 0, IMML_ERR_STATE, "set on a loaded fixed model");
  imml_model_free(back);
  free(buf);
  imml_model_free(m);
  imml_model_free(ref);
}
END_TEST

/* Once p is fixed, by the configuration (loop 0: there is no warm-up) or
 * by the end of the warm-up (loop 1), imml_predominant_set is refused with
 * IMML_ERR_STATE for every modality, the model's own p included, and
 * changes nothing; an out-of-range p is still IMML_ERR_INVALID_ARG. */
START_TEST(test_predominant_set_refused_once_fixed) {
  static const int dims[3] = {5, 7, 3};
  const int M = 3;
  imml_config c;
  set_cfg(&c, dims, _i == 0 ? 1 : -1);
  c.warmup_steps = 2;
  imml_model *m = create_ok(&c, NULL);
  if (_i == 0) {
    expect_predominant(m, 1, 1, "given in the config");
  } else {
    drng r = {4200};
    for (int st = 0; st < c.warmup_steps; st++) {
      batch b;
      batch_random(&b, M, dims, 4, c.n_classes, &r);
      train_once(m, &b);
      batch_free(&b);
    }
  }
  int p = -1, fixed = 0;
  ck_assert_int_eq(imml_predominant_get(m, &p, &fixed), IMML_OK);
  ck_assert_int_eq(fixed, 1);
  for (int q = 0; q < M; q++)
    set_refused(m, q, IMML_ERR_STATE, q == p ? "fixed, own p" : "fixed");
  set_refused(m, M, IMML_ERR_INVALID_ARG, "fixed, p out of range");
  expect_predominant(m, p, 1, "after the refusals");
  imml_model_free(m);
}
END_TEST

/* Between a training forward and its commit the step is under way:
 * imml_predominant_set is refused (IMML_ERR_STATE, nothing changed) after
 * the forward and after the uncommitted backward, and accepted once the
 * step is committed. */
START_TEST(test_predominant_set_refused_mid_step) {
  static const int dims[3] = {5, 7, 3};
  const int M = 3;
  imml_config c;
  set_cfg(&c, dims, -1);
  imml_model *m = create_ok(&c, NULL);
  drng r = {4300};
  batch b;
  batch_random(&b, M, dims, 4, c.n_classes, &r);
  fwd_train(m, &b, NULL, NULL);
  set_refused(m, 1, IMML_ERR_STATE, "set after a training forward");
  backward_only_ok(m, NULL);
  set_refused(m, 1, IMML_ERR_STATE, "set with an uncommitted micro-batch");
  ck_assert_int_eq(imml_commit(m), IMML_OK);
  expect_predominant(m, -1, 0, "after one warm-up step");
  ck_assert_int_eq(imml_predominant_set(m, 1), IMML_OK);
  expect_predominant(m, 1, 1, "set between steps");
  batch_free(&b);
  imml_model_free(m);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Determinism                                                         */
/* ------------------------------------------------------------------ */

START_TEST(test_determinism) {
  static const int dims[3] = {5, 7, 3};
  const int M = 3;
  imml_config c;
  small_cfg(&c, M, dims);
  c.warmup_steps = 3;
  c.dict_size = 8;
  c.seed = 0xfeedULL;
  const int C = c.n_classes;
  imml_model *a = create_ok(&c, NULL), *b = create_ok(&c, NULL);
  imml_optim_config oc;
  imml_optim_config_init(&oc, IMML_OPTIM_ADAMW);
  oc.clip_norm = 1.0f;
  ck_assert_int_eq(imml_optim_setup(a, &oc), IMML_OK);
  ck_assert_int_eq(imml_optim_setup(b, &oc), IMML_OK);
  drng r = {1};
  for (int step = 0; step < 10; step++) {
    batch bt;
    batch_random(&bt, M, dims, 3 + step % 4, C, &r);
    const int B = bt.B;
    float la[18], lb[18];
    float *dha[3], *dhb[3];
    dfeat_alloc(dha, &bt);
    dfeat_alloc(dhb, &bt);
    imml_losses xa, xb;
    imml_model *ms[2] = {a, b};
    for (int w = 0; w < 2; w++) {
      fwd_train(ms[w], &bt, w ? lb : la, w ? &xb : &xa);
      backward_ok(ms[w], w ? dhb : dha);
      /* an evaluation between the steps (test_model covers one between a
       * training forward and its backward) */
      ck_assert_int_eq(
          imml_forward(ms[w], IMML_MODE_EVAL, B, feats(&bt), NULL, NULL, NULL),
          IMML_OK);
      ck_assert_int_eq(imml_optim_step(ms[w]), IMML_OK);
    }
    ck_assert_msg(memcmp(la, lb, (size_t)B * C * sizeof(float)) == 0,
                  "step %d: logits differ", step);
    ck_assert_msg(xa.total == xb.total && xa.ce == xb.ce && xa.con == xb.con &&
                      xa.dis == xb.dis,
                  "step %d: losses differ", step);
    for (int mm = 0; mm < M; mm++)
      ck_assert_msg(
          memcmp(dha[mm], dhb[mm], (size_t)B * dims[mm] * sizeof(float)) == 0,
          "step %d: dL/dh_%d differ", step, mm);
    snap sa, sb;
    snap_take(a, &sa);
    snap_take(b, &sb);
    snap_check(&sa, &sb, "two identically trained models");
    snap_free(&sa);
    snap_free(&sb);
    dfeat_free(dha, M);
    dfeat_free(dhb, M);
    batch_free(&bt);
  }
  int p, fixed;
  imml_predominant_get(a, &p, &fixed);
  ck_assert_int_eq(fixed, 1);
  ck_assert_int_eq(imml_fdc_dict_fill(a), 8);
  imml_model_free(a);
  imml_model_free(b);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Initialisation (METHOD.md section 6)                                */
/* ------------------------------------------------------------------ */

typedef struct ref_rng {
  uint64_t s[4];
} ref_rng;

static uint64_t ref_splitmix64(uint64_t *x) {
  uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

static uint64_t ref_rotl(uint64_t x, int k) {
  return (x << k) | (x >> (64 - k));
}

static uint64_t ref_next(ref_rng *r) {
  uint64_t *s = r->s;
  const uint64_t result = ref_rotl(s[1] * 5, 7) * 9;
  const uint64_t t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = ref_rotl(s[3], 45);
  return result;
}

static void ref_seed(ref_rng *r, uint64_t seed) {
  uint64_t x = seed;
  for (int i = 0; i < 4; i++)
    r->s[i] = ref_splitmix64(&x);
}

static float ref_value(ref_rng *r, int n_in) {
  const double u = (double)(ref_next(r) >> 40) * 0x1.0p-24;
  return (float)((2.0 * u - 1.0) / sqrt((double)n_in));
}

START_TEST(test_reference_generator_selfcheck) {
  uint64_t x = 0;
  ck_assert_uint_eq(ref_splitmix64(&x), 0xe220a8397b1dcdafULL);
  ref_rng r = {{1, 2, 3, 4}};
  ck_assert_uint_eq(ref_next(&r), 11520u);
  ck_assert_uint_eq(ref_next(&r), 0u);
}
END_TEST

/* One tensor of the draw order. */
typedef struct ref_tensor {
  char name[16];
  int rows, cols, fan_in;
} ref_tensor;

static int ref_layout(const imml_config *c, int builtin, ref_tensor *t) {
  const int M = c->n_modalities, H = c->hidden_dim, k = c->knowledge_dim,
            C = c->n_classes;
  int n = 0;
  for (int m = 0; m < M; m++) {
    const int d = c->dims[m];
    const struct {
      const char *s;
      int rows, cols, fan;
    } L[6] = {{"w1", d, H, d}, {"b1", 1, H, d}, {"w2", H, k, H},
              {"b2", 1, k, H}, {"wc", k, C, k}, {"bc", 1, C, k}};
    for (int i = 0; i < 6; i++) {
      snprintf(t[n].name, sizeof t[n].name, "m%d.%s", m, L[i].s);
      t[n].rows = L[i].rows;
      t[n].cols = L[i].cols;
      t[n].fan_in = L[i].fan;
      n++;
    }
  }
  const struct {
    const char *s;
    int rows, cols;
  } F[4] = {{"fdc.wq", M * k, k},
            {"fdc.wk", M * k, k},
            {"ft.w", M * k, C},
            {"ft.b", 1, C}};
  for (int i = 0; i < (builtin ? 4 : 2); i++) {
    snprintf(t[n].name, sizeof t[n].name, "%s", F[i].s);
    t[n].rows = F[i].rows;
    t[n].cols = F[i].cols;
    t[n].fan_in = M * k;
    n++;
  }
  return n;
}

START_TEST(test_init_values) {
  static const int dims[2] = {5, 7};
  static const uint64_t seeds[4] = {0, 1, 0xdeadbeefULL, UINT64_MAX};
  static const char *const spot[7] = {"m0.w1",  "m0.b1", "m1.wc", "fdc.wq",
                                      "fdc.wk", "ft.w",  "ft.b"};
  for (int si = 0; si < 4; si++) {
    for (int builtin = 1; builtin >= 0; builtin--) {
      imml_config c;
      small_cfg(&c, 2, dims);
      c.hidden_dim = 6;
      c.knowledge_dim = 3;
      c.n_classes = 4;
      c.seed = seeds[si];
      host_ft h;
      host_init(&h, 2, 3, 4);
      imml_ft_ops ops = host_ops(&h);
      imml_model *m = create_ok(&c, builtin ? NULL : &ops);
      ref_tensor t[16];
      const int nt = ref_layout(&c, builtin, t);
      ck_assert_int_eq(imml_param_count(m), nt);
      ref_rng r;
      ref_seed(&r, c.seed);
      int spots_seen = 0;
      for (int i = 0; i < nt; i++) {
        imml_param_view v;
        view(m, i, &v);
        ck_assert_str_eq(v.name, t[i].name);
        ck_assert_int_eq(v.rows, t[i].rows);
        ck_assert_int_eq(v.cols, t[i].cols);
        const int cnt = t[i].rows * t[i].cols;
        int is_spot = 0;
        for (int s = 0; s < 7; s++)
          is_spot |= strcmp(spot[s], t[i].name) == 0;
        for (int e = 0; e < cnt; e++) {
          const float want = ref_value(&r, t[i].fan_in);
          /* exact equality, every value; the first and last of the
           * named tensors are reported by name */
          ck_assert_msg(memcmp(&v.data[e], &want, sizeof want) == 0,
                        "seed %llu %s[%d] = %.9g, expected %.9g%s",
                        (unsigned long long)c.seed, t[i].name, e,
                        (double)v.data[e], (double)want,
                        is_spot && (e == 0 || e == cnt - 1) ? " (first/last)"
                                                            : "");
          ck_assert_msg(fabsf(want) <=
                            1.0f / sqrtf((float)t[i].fan_in) * (1.0f + 1e-6f),
                        "reference value out of range");
        }
        spots_seen += is_spot;
        ck_assert_msg(all_zero(v.grad, (size_t)cnt),
                      "gradient of %s not zero at creation", t[i].name);
      }
      ck_assert_int_eq(spots_seen, builtin ? 7 : 5);
      imml_model_free(m);
      host_free(&h);
    }
  }
}
END_TEST

/* ------------------------------------------------------------------ */
/* imml_fdc_adjust = the slots a forward builds = section 2 in double  */
/* ------------------------------------------------------------------ */

/* Double reference of section 2 over strata d[m] (n rows, stride ld). */
static void fdc_ref(imml_model *m, int B, const float *const *z,
                    const float *const *d, int ld, int n, double **slot) {
  const imml_config *c = &m->cfg;
  const int M = c->n_modalities, k = c->knowledge_dim;
  int p = -1;
  imml_predominant_get(m, &p, NULL);
  ck_assert_int_ge(p, 0);
  int order[IMML_MAX_MODALITIES];
  order[0] = p;
  for (int mm = 0, pos = 1; mm < M; mm++)
    if (mm != p)
      order[pos++] = mm;
  imml_param_view wq, wk;
  view_named(m, -1, "fdc.wq", &wq);
  view_named(m, -1, "fdc.wk", &wk);
  double *q = xcalloc((size_t)B * k, sizeof(double));
  double *kk = xcalloc((size_t)n * k, sizeof(double));
  double *w = xcalloc((size_t)B * n, sizeof(double));
  for (int i = 0; i < B; i++)
    for (int t = 0; t < k; t++) {
      double acc = 0.0;
      for (int pos = 0; pos < M; pos++)
        for (int s = 0; s < k; s++)
          acc += (double)z[order[pos]][(size_t)i * k + s] *
                 wq.data[(size_t)(pos * k + s) * k + t];
      q[(size_t)i * k + t] = acc;
    }
  for (int j = 0; j < n; j++)
    for (int t = 0; t < k; t++) {
      double acc = 0.0;
      for (int pos = 0; pos < M; pos++)
        for (int s = 0; s < k; s++)
          acc += (double)d[order[pos]][(size_t)j * ld + s] *
                 wk.data[(size_t)(pos * k + s) * k + t];
      kk[(size_t)j * k + t] = acc;
    }
  for (int i = 0; i < B; i++) {
    double mx = -INFINITY, sum = 0.0;
    double *wi = w + (size_t)i * n;
    for (int j = 0; j < n; j++) {
      double e = 0.0;
      for (int t = 0; t < k; t++)
        e += q[(size_t)i * k + t] * kk[(size_t)j * k + t];
      wi[j] = e / sqrt((double)k);
      mx = fmax(mx, wi[j]);
    }
    for (int j = 0; j < n; j++) {
      wi[j] = exp(wi[j] - mx);
      sum += wi[j];
    }
    for (int j = 0; j < n; j++)
      wi[j] = c->beta * (wi[j] / sum) + (1.0 - c->beta) / n;
  }
  for (int mm = 0; mm < M; mm++)
    for (int i = 0; i < B; i++)
      for (int t = 0; t < k; t++) {
        double own = z[mm][(size_t)i * k + t];
        if (mm == p) {
          slot[mm][(size_t)i * k + t] = own;
          continue;
        }
        double xh = 0.0;
        for (int j = 0; j < n; j++)
          xh += w[(size_t)i * n + j] * d[mm][(size_t)j * ld + t];
        slot[mm][(size_t)i * k + t] =
            (c->slot_mode == IMML_SLOT_CONDITIONAL ? own : 0.0) + xh;
      }
  free(q);
  free(kk);
  free(w);
}

START_TEST(test_fdc_adjust_matches_forward_and_reference) {
  static const int dims[3] = {5, 7, 3};
  const int M = 3;
  for (int mode = 0; mode < 2; mode++) {
    for (int filled = 0; filled < 2; filled++) {
      imml_config c;
      small_cfg(&c, M, dims);
      c.predominant = 2; /* stacked order [2; 0; 1] */
      c.beta = 0.6f;
      c.slot_mode = mode;
      const int k = c.knowledge_dim;
      imml_model *m = create_ok(&c, NULL);
      drng r = {600 + (uint64_t)mode};
      batch b;
      if (filled) {
        batch_random_scaled(&b, M, dims, 4, c.n_classes, &r, 2.0f);
        train_once(m, &b);
        batch_free(&b);
        ck_assert_int_eq(imml_fdc_dict_fill(m), 4);
      }
      batch_random_scaled(&b, M, dims, 5, c.n_classes, &r, 2.0f);
      fwd_train(m, &b, NULL, NULL);
      const int B = b.B;
      float *z[3], *slot[3];
      double *sref[3];
      for (int mm = 0; mm < M; mm++) {
        z[mm] = xcalloc((size_t)B * k, sizeof(float));
        slot[mm] = xcalloc((size_t)B * k, sizeof(float));
        sref[mm] = xcalloc((size_t)B * k, sizeof(double));
        memcpy(z[mm], m->train.z[mm], (size_t)B * k * sizeof(float));
      }
      ck_assert_int_eq(imml_fdc_adjust(m, B, (const float *const *)z, slot),
                       IMML_OK);
      for (int mm = 0; mm < M; mm++)
        ck_assert_msg(memcmp(slot[mm], m->train.slot[mm],
                             (size_t)B * k * sizeof(float)) == 0,
                      "mode %d filled %d: imml_fdc_adjust slot %d differs "
                      "from the forward's",
                      mode, filled, mm);
      const float *d[3];
      int ld, n;
      if (filled) {
        for (int mm = 0; mm < M; mm++)
          d[mm] = m->dict + (size_t)mm * k;
        ld = M * k;
        n = imml_fdc_dict_fill(m);
      } else {
        for (int mm = 0; mm < M; mm++)
          d[mm] = z[mm];
        ld = k;
        n = B;
      }
      fdc_ref(m, B, (const float *const *)z, d, ld, n, sref);
      for (int mm = 0; mm < M; mm++) {
        const double e = rel_fd(slot[mm], sref[mm], (size_t)B * k);
        ck_assert_msg(e < 1e-5,
                      "mode %d filled %d: slot %d vs reference "
                      "rel %g",
                      mode, filled, mm, e);
      }
      /* the backward still completes normally afterwards */
      backward_ok(m, NULL);
      for (int mm = 0; mm < M; mm++) {
        free(z[mm]);
        free(slot[mm]);
        free(sref[mm]);
      }
      batch_free(&b);
      imml_model_free(m);
    }
  }
}
END_TEST

/* ------------------------------------------------------------------ */
/* The strata ring                                                      */
/* ------------------------------------------------------------------ */

START_TEST(test_dict_ring) {
  static const int dims[2] = {5, 7};
  const int M = 2;
  imml_config c;
  small_cfg(&c, M, dims);
  c.dict_size = 3;
  c.predominant = 0;
  const int k = c.knowledge_dim;
  imml_model *m = create_ok(&c, NULL);
  drng r = {3};
  batch b;
  /* a training forward not followed by a backward pushes nothing */
  batch_random(&b, M, dims, 4, c.n_classes, &r);
  fwd_train(m, &b, NULL, NULL);
  ck_assert_int_eq(imml_fdc_dict_fill(m), 0);
  batch_free(&b);
  /* a batch of 5 into J = 3: only its last 3 rows stay, in order */
  batch_random(&b, M, dims, 5, c.n_classes, &r);
  train_once(m, &b);
  ck_assert_int_eq(imml_fdc_dict_fill(m), 3);
  float keep[3 * 2 * 4];
  for (int j = 0; j < 3; j++)
    for (int mm = 0; mm < M; mm++)
      ck_assert_msg(memcmp(m->dict + ((size_t)j * M + mm) * k,
                           m->train.z[mm] + (size_t)(2 + j) * k,
                           k * sizeof(float)) == 0,
                    "entry %d modality %d is not row %d", j, mm, 2 + j);
  memcpy(keep, m->dict, sizeof keep);
  batch_free(&b);
  /* FIFO: the next 2 rows overwrite the 2 oldest entries */
  batch_random(&b, M, dims, 2, c.n_classes, &r);
  train_once(m, &b);
  ck_assert_int_eq(imml_fdc_dict_fill(m), 3);
  int found_old = 0;
  for (int j = 0; j < 3; j++) {
    const float *e = m->dict + (size_t)j * M * k;
    if (memcmp(e, keep + (size_t)2 * M * k, (size_t)M * k * sizeof(float)) == 0)
      found_old++;
    for (int i = 0; i < 2; i++) {
      int same = 1;
      for (int mm = 0; mm < M; mm++)
        same &= memcmp(e + (size_t)mm * k, m->train.z[mm] + (size_t)i * k,
                       k * sizeof(float)) == 0;
      found_old += same * 10;
    }
  }
  ck_assert_msg(found_old == 21,
                "after the wrap the ring should hold the newest old row and "
                "both new rows (code %d)",
                found_old);
  /* evaluation never pushes */
  ck_assert_int_eq(
      imml_forward(m, IMML_MODE_EVAL, 2, feats(&b), b.y, NULL, NULL), IMML_OK);
  ck_assert_int_eq(imml_fdc_dict_fill(m), 3);
  batch_free(&b);
  imml_model_free(m);
}
END_TEST

static Suite *properties_suite(void) {
  Suite *s = suite_create("properties");
  TCase *tc = tcase_create("core");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, test_beta0_rows_identical);
  tcase_add_test(tc, test_jeff1_single_entry);
  tcase_add_test(tc, test_empty_dict_single_row);
  tcase_add_test(tc, test_warmup_late_fusion);
  tcase_add_test(tc, test_host_ft_equals_builtin);
  tcase_add_test(tc, test_callback_failure_changes_nothing);
  tcase_add_test(tc, test_auto_predominant);
  tcase_add_test(tc, test_predominant_ties_lowest_index);
  tcase_add_loop_test(tc, test_predominant_set, 0, 2);
  tcase_add_loop_test(tc, test_predominant_set_refused_once_fixed, 0, 2);
  tcase_add_test(tc, test_predominant_set_refused_mid_step);
  tcase_add_test(tc, test_determinism);
  tcase_add_test(tc, test_reference_generator_selfcheck);
  tcase_add_test(tc, test_init_values);
  tcase_add_test(tc, test_fdc_adjust_matches_forward_and_reference);
  tcase_add_test(tc, test_dict_ring);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) { return imml_run_suite(properties_suite()); }
