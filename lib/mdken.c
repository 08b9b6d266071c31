/* The modality discriminative knowledge exploration network (METHOD.md
 * section 1): per-modality branches, unimodal heads, L_dis, and the
 * contrastive alignment L_con, forward and backward. */
#include "internal.h"
#include "kernels.h"

#include <string.h>

void mdken_forward(const imml_model *m, imml_acts *a, const float *const *h) {
  const imml_config *c = &m->cfg;
  const int B = a->batch, H = c->hidden_dim, k = c->knowledge_dim,
            C = c->n_classes;
  double dis = 0.0;
  for (int mm = 0; mm < c->n_modalities; mm++) {
    const imml_ptensors *P = &m->pt;
    const int d = c->dims[mm];
    /* u (B, H) = relu(h (B, d) W1 (d, H) + b1) */
    k_linear_forward(m->gemm, B, d, H, h[mm], d, P->w1[mm], P->b1[mm],
                     a->u[mm]);
    k_relu_forward((size_t)B * H, a->u[mm], a->u[mm]);
    /* z (B, k) = u W2 + b2 */
    k_linear_forward(m->gemm, B, H, k, a->u[mm], H, P->w2[mm], P->b2[mm],
                     a->z[mm]);
    /* o (B, C) = z Wc + bc */
    k_linear_forward(m->gemm, B, k, C, a->z[mm], k, P->wc[mm], P->bc[mm],
                     a->o[mm]);
    if (a->has_labels) {
      a->ce[mm] = k_xent_forward(B, C, a->o[mm], a->labels, a->po[mm]);
      dis += a->ce[mm];
      a->correct[mm] = k_count_correct(B, C, a->o[mm], a->labels);
    }
  }
  a->losses.dis = dis / c->n_modalities;
}

double mdken_contrastive_forward(const imml_model *m, int p,
                                 const con_space *cs) {
  const imml_config *c = &m->cfg;
  const int N = cs->n, k = c->knowledge_dim, M = c->n_modalities;
  double con = 0.0;
  for (int mm = 0; mm < M; mm++)
    k_l2norm_forward(N, k, cs->z[mm], cs->nz[mm], cs->r[mm]);
  for (int aa = 0; aa < M; aa++) {
    if (aa == p)
      continue;
    /* S (N, N) = n_p n_aᵀ / tau */
    k_gemm(m->gemm, 0, 1, N, N, k, 1.0f / c->tau, cs->nz[p], k, cs->nz[aa], k,
           0.0f, cs->s[aa], N);
    /* l(Sᵀ) reads the rows of an explicit transpose: contiguous rows are
     * several times faster than a column walk once N is in the hundreds. */
    k_transpose(N, N, cs->s[aa], N, cs->st[aa], N, 0);
    /* Each pass leaves its softmax rows in place of S (Sᵀ) for the
     * backward, which then needs no exponential. */
    const double l_rows =
        k_supcon_forward(N, cs->s[aa], N, 1, cs->labels, cs->s[aa]);
    const double l_cols =
        k_supcon_forward(N, cs->st[aa], N, 1, cs->labels, cs->st[aa]);
    con += 0.5 * (l_rows + l_cols);
  }
  return con / (M - 1);
}

/* Adds scale * dL_con/dz for this rank's rows (off .. off+B-1 of the
 * space cs) into g->dz (METHOD.md section 7). */
static void contrastive_backward(const imml_model *m, const imml_acts *a,
                                 imml_grads_scratch *g, const con_space *cs,
                                 int off, float scale) {
  const imml_config *c = &m->cfg;
  const int B = a->batch, N = cs->n, k = c->knowledge_dim, M = c->n_modalities,
            p = a->p;
  const float s = c->gamma1 / (float)(M - 1);
  const float inv_tau = scale / c->tau;
  memset(g->dn_p, 0, (size_t)B * k * sizeof(float));
  for (int aa = 0; aa < M; aa++) {
    if (aa == p)
      continue;
    memset(cs->ds, 0, (size_t)N * N * sizeof(float));
    memset(cs->dst, 0, (size_t)N * N * sizeof(float));
    /* dS = (s/2) (A + Eᵀ): A from the rows of S, E from the rows of Sᵀ */
    k_supcon_backward(N, cs->s[aa], cs->labels, 0.5f * s, cs->ds, N, 1);
    k_supcon_backward(N, cs->st[aa], cs->labels, 0.5f * s, cs->dst, N, 1);
    k_transpose(N, N, cs->dst, N, cs->ds, N, 1);
    /* dn_p (B, k) += dS[own rows] (B, N) n_a (N, k) / tau */
    k_gemm(m->gemm, 0, 0, B, k, N, inv_tau, cs->ds + (size_t)off * N, N,
           cs->nz[aa], k, 1.0f, g->dn_p, k);
    /* dn_a (B, k) = (dSᵀ)[own rows] n_p / tau = dS[:, own]ᵀ n_p / tau */
    k_gemm(m->gemm, 1, 0, B, k, N, inv_tau, cs->ds + off, N, cs->nz[p], k, 0.0f,
           g->dn_a, k);
    k_l2norm_backward(B, k, cs->nz[aa] + (size_t)off * k, cs->r[aa] + off,
                      g->dn_a, g->dz[aa]);
  }
  k_l2norm_backward(B, k, cs->nz[p] + (size_t)off * k, cs->r[p] + off, g->dn_p,
                    g->dz[p]);
}

void mdken_backward(const imml_model *m, const imml_acts *a,
                    imml_grads_scratch *g, const con_space *cs,
                    const imml_ptensors *dP, float *const *dh, int off,
                    float con_scale, float ce_scale) {
  const imml_config *c = &m->cfg;
  const imml_ptensors *P = &m->pt;
  const int B = a->batch, H = c->hidden_dim, k = c->knowledge_dim,
            C = c->n_classes, M = c->n_modalities;
  if (!a->warm && c->gamma1 != 0.0f)
    contrastive_backward(m, a, g, cs, off, con_scale);
  const float head_scale = ce_scale * c->gamma2 / (float)M;
  for (int mm = 0; mm < M; mm++) {
    const int d = c->dims[mm];
    if (head_scale != 0.0f) {
      /* do (B, C) = (gamma2/M) (softmax(o) - onehot(y)) / B */
      k_xent_backward(B, C, a->po[mm], a->labels, head_scale, g->dout, 0.0f);
      k_linear_backward(m->gemm, B, k, C, a->z[mm], k, P->wc[mm], g->dout,
                        dP->wc[mm], dP->bc[mm], g->dz[mm], k, 1.0f);
    }
    /* z = u W2 + b2: dW2 += uᵀ dz, db2 += sum dz, du = dz W2ᵀ */
    k_linear_backward(m->gemm, B, H, k, a->u[mm], H, P->w2[mm], g->dz[mm],
                      dP->w2[mm], dP->b2[mm], g->du, H, 0.0f);
    k_relu_backward((size_t)B * H, a->u[mm], g->du, g->du);
    float *dx = dh ? dh[mm] : NULL;
    k_linear_backward(m->gemm, B, d, H, a->h[mm], d, P->w1[mm], g->du,
                      dP->w1[mm], dP->b1[mm], dx, d, 0.0f);
  }
}
