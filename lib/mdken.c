/* The modality discriminative knowledge exploration network (METHOD.md
 * section 1): per-modality branches, unimodal heads, L_dis, and the
 * contrastive alignment L_con, forward and backward. */
#include "internal.h"
#include "kernels.h"

#include <string.h>

/* Branches run as tasks on a bf16 model's threads (k_tasks) where the
 * largest branch is no more than its share of the work: each thread then
 * runs whole branches with products of its own, no product split and no
 * operand packed twice.  Otherwise (float32, whose BLAS has its own
 * threads; one branch that outweighs the rest) the branches run in turn
 * and each product may split.  Either way every value is computed the
 * same way: the results are the same bits.  order[] lists the branches
 * largest first, so the threads finish close together. */
typedef struct branch_plan {
  double macs; /* the branches' multiply-adds per row, all together */
  int order[IMML_MAX_MODALITIES];
} branch_plan;

/* Multiply-adds per row of branch mm's forward products. */
static double branch_cost(const imml_config *c, int mm) {
  return (double)c->hidden_dim * (c->dims[mm] + c->knowledge_dim) +
         (double)c->knowledge_dim * c->n_classes;
}

/* 1 if no branch is more than its share of `threads` threads' work. */
static int branches_balanced(const imml_config *c, int threads) {
  const int M = c->n_modalities;
  double total = 0.0, top = 0.0;
  for (int mm = 0; mm < M; mm++) {
    const double x = branch_cost(c, mm);
    total += x;
    top = x > top ? x : top;
  }
  return threads >= 2 && top * (threads < M ? threads : M) <= total;
}

static int plan_branches(const imml_model *m, branch_plan *bp) {
  const imml_config *c = &m->cfg;
  if (!m->gemm || !branches_balanced(c, imml_threads_set(0)))
    return 0;
  double cost[IMML_MAX_MODALITIES];
  bp->macs = 0.0;
  for (int mm = 0; mm < c->n_modalities; mm++) {
    cost[mm] = branch_cost(c, mm);
    bp->macs += cost[mm];
    int at = mm; /* insertion, largest first, ties by index */
    while (at > 0 && cost[bp->order[at - 1]] < cost[mm]) {
      bp->order[at] = bp->order[at - 1];
      at--;
    }
    bp->order[at] = mm;
  }
  return 1;
}

size_t mdken_ctx_work_floats(const imml_config *c) {
  return branches_balanced(c, 2) ? mdken_work_floats(c, c->max_batch) : 0;
}

typedef struct branch_job {
  const imml_model *m;
  imml_acts *a;        /* forward */
  const imml_acts *ca; /* backward */
  const float *const *h;
  imml_grads_scratch *g;
  const imml_ptensors *dP;
  float *const *dh;
  float ce_scale;
  const branch_plan *plan;
} branch_job;

/* Branch mm: u = relu(h W1 + b1), z = u W2 + b2, o = z Wc + bc, and its
 * head's cross-entropy. */
static void branch_forward(const imml_model *m, k_ctx *ctx, imml_acts *a,
                           const float *const *h, int mm) {
  const imml_config *c = &m->cfg;
  const imml_ptensors *P = &m->pt;
  const int B = a->batch, H = c->hidden_dim, k = c->knowledge_dim,
            C = c->n_classes, d = c->dims[mm];
  /* u (B, H) = relu(h (B, d) W1 (d, H) + b1) */
  k_linear_forward(ctx, B, d, H, h[mm], d, P->w1[mm], P->b1[mm], a->u[mm]);
  k_relu_forward((size_t)B * H, a->u[mm], a->u[mm]);
  /* z (B, k) = u W2 + b2 */
  k_linear_forward(ctx, B, H, k, a->u[mm], H, P->w2[mm], P->b2[mm], a->z[mm]);
  /* o (B, C) = z Wc + bc */
  k_linear_forward(ctx, B, k, C, a->z[mm], k, P->wc[mm], P->bc[mm], a->o[mm]);
  if (a->has_labels) {
    a->ce[mm] = k_xent_forward(B, C, a->o[mm], a->labels, a->po[mm]);
    a->correct[mm] = k_count_correct(B, C, a->o[mm], a->labels);
  }
}

static void branch_forward_task(void *arg, int part, k_ctx *sub) {
  const branch_job *j = arg;
  branch_forward(j->m, sub, j->a, j->h, j->plan->order[part]);
}

void mdken_forward(const imml_model *m, imml_acts *a, const float *const *h) {
  const int M = m->cfg.n_modalities;
  branch_plan bp;
  branch_job j = {m, a, a, h, NULL, NULL, NULL, 0.0f, &bp};
  if (plan_branches(m, &bp) &&
      k_tasks(m->gemm, M, 0, bp.macs * a->batch, branch_forward_task, &j))
    m->gemm->branch_jobs++;
  else
    for (int mm = 0; mm < M; mm++)
      branch_forward(m, m->gemm, a, h, mm);
  double dis = 0.0;
  if (a->has_labels)
    for (int mm = 0; mm < M; mm++)
      dis += a->ce[mm];
  a->losses.dis = dis / M;
}

/* One auxiliary modality's alignment with the predominant one: its S,
 * Sᵀ, softmax rows and loss (independent of the others'; k_tasks). */
typedef struct pair_job {
  const imml_model *m;
  const con_space *cs;
  int p;
  double loss[IMML_MAX_MODALITIES];
} pair_job;

static void pair_task(void *arg, int part, k_ctx *ctx) {
  pair_job *j = arg;
  const con_space *cs = j->cs;
  const int N = cs->n, k = j->m->cfg.knowledge_dim, p = j->p;
  const int aa = part < p ? part : part + 1; /* the auxiliary modalities */
  /* S (N, N) = n_p n_aᵀ / tau */
  k_gemm(ctx, 0, 1, N, N, k, 1.0f / j->m->cfg.tau, cs->nz[p], k, cs->nz[aa], k,
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
  j->loss[aa] = 0.5 * (l_rows + l_cols);
}

double mdken_contrastive_forward(const imml_model *m, int p,
                                 const con_space *cs) {
  const imml_config *c = &m->cfg;
  const int N = cs->n, k = c->knowledge_dim, M = c->n_modalities;
  for (int mm = 0; mm < M; mm++)
    k_l2norm_forward(N, k, cs->z[mm], cs->nz[mm], cs->r[mm]);
  pair_job j = {m, cs, p, {0}};
  if (!k_tasks(m->gemm, M - 1, 0, (double)(M - 1) * N * N * k, pair_task, &j))
    for (int part = 0; part < M - 1; part++)
      pair_task(&j, part, m->gemm);
  double con = 0.0;
  for (int aa = 0; aa < M; aa++)
    if (aa != p)
      con += j.loss[aa];
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

/* Branch mm backward from dz[mm] (and its head's loss), with dout (B, C)
 * and du (B, H) as work memory. */
static void branch_backward(const branch_job *j, k_ctx *ctx, int mm,
                            float *dout, float *du) {
  const imml_model *m = j->m;
  const imml_config *c = &m->cfg;
  const imml_ptensors *P = &m->pt, *dP = j->dP;
  const imml_acts *a = j->ca;
  imml_grads_scratch *g = j->g;
  const int B = a->batch, H = c->hidden_dim, k = c->knowledge_dim,
            C = c->n_classes, d = c->dims[mm];
  const float head_scale = j->ce_scale * c->gamma2 / (float)c->n_modalities;
  if (head_scale != 0.0f) {
    /* do (B, C) = (gamma2/M) (softmax(o) - onehot(y)) / B */
    k_xent_backward(B, C, a->po[mm], a->labels, head_scale, dout, 0.0f);
    k_linear_backward(ctx, B, k, C, a->z[mm], k, P->wc[mm], dout, dP->wc[mm],
                      dP->bc[mm], g->dz[mm], k, 1.0f);
  }
  /* z = u W2 + b2: dW2 += uᵀ dz, db2 += sum dz, du = dz W2ᵀ */
  k_linear_backward(ctx, B, H, k, a->u[mm], H, P->w2[mm], g->dz[mm], dP->w2[mm],
                    dP->b2[mm], du, H, 0.0f);
  k_relu_backward((size_t)B * H, a->u[mm], du, du);
  float *dx = j->dh ? j->dh[mm] : NULL;
  k_linear_backward(ctx, B, d, H, a->h[mm], d, P->w1[mm], du, dP->w1[mm],
                    dP->b1[mm], dx, d, 0.0f);
}

static void branch_backward_task(void *arg, int part, k_ctx *sub) {
  const branch_job *j = arg;
  const size_t B = (size_t)j->ca->batch;
  branch_backward(j, sub, j->plan->order[part], sub->work,
                  sub->work + B * (size_t)j->m->cfg.n_classes);
}

size_t mdken_work_floats(const imml_config *c, int batch) {
  size_t n; /* saturates: a size past SIZE_MAX is refused, not wrapped */
  return imml_size_mul(&n, (size_t)batch,
                       (size_t)c->n_classes + (size_t)c->hidden_dim)
             ? n
             : SIZE_MAX;
}

void mdken_backward(const imml_model *m, const imml_acts *a,
                    imml_grads_scratch *g, const con_space *cs,
                    const imml_ptensors *dP, float *const *dh, int off,
                    float con_scale, float ce_scale) {
  const imml_config *c = &m->cfg;
  const int M = c->n_modalities;
  if (!a->warm && c->gamma1 != 0.0f)
    contrastive_backward(m, a, g, cs, off, con_scale);
  branch_plan bp;
  branch_job j = {m, NULL, a, NULL, g, dP, dh, ce_scale, &bp};
  /* the backward's products: twice the forward's (dW and dx) */
  if (plan_branches(m, &bp) &&
      k_tasks(m->gemm, M, mdken_work_floats(c, a->batch),
              2.0 * bp.macs * a->batch, branch_backward_task, &j))
    m->gemm->branch_jobs++;
  else
    for (int mm = 0; mm < M; mm++)
      branch_backward(&j, m->gemm, mm, g->dout, g->du);
}
