/* The beta-generalization front-door adjustment (METHOD.md section 2):
 * the strata ring, the cross-sample attention, the F&T slots, and their
 * backward.  No gradient ever flows into the strata. */
#include "internal.h"
#include "kernels.h"

#include <math.h>
#include <string.h>

fdc_view fdc_dict_view(const imml_model *m) {
  fdc_view v;
  const int k = m->cfg.knowledge_dim, M = m->cfg.n_modalities;
  memset(&v, 0, sizeof v);
  for (int mm = 0; mm < M; mm++)
    v.d[mm] = m->dict + (size_t)mm * k;
  v.ld = M * k;
  v.n = m->dict_fill;
  v.one_block = 1;
  return v;
}

fdc_view fdc_batch_view(const imml_model *m, const float *const *z, int n) {
  fdc_view v;
  memset(&v, 0, sizeof v);
  for (int mm = 0; mm < m->cfg.n_modalities; mm++)
    v.d[mm] = z[mm];
  v.ld = m->cfg.knowledge_dim;
  v.n = n;
  return v;
}

/* Modality at position pos of the stacked order [p; a1; a2; ...]. */
static int order_at(int p, int pos) {
  if (pos == 0)
    return p;
  return pos - 1 < p ? pos - 1 : pos;
}

/* The scores q cᵀ = q (D Wk)ᵀ = (q Wkᵀ) Dᵀ can be associated either way:
 * through the keys c = D Wk (J, k), or through the projected queries
 * qk = q Wkᵀ (B, M k).  The products differ (J M k k + B J k against
 * B M k k + B J M k in the forward, and likewise in the backward), so each
 * forward takes the one with fewer multiply-adds for its own B and J_eff;
 * the values agree up to float rounding (doc/DECISIONS.md). */
static int use_query_side(int B, int J, int k, int M, int backward) {
  const double mk = (double)M * k;
  double keys = (double)J * k * (mk + B), queries = (double)B * mk * (k + J);
  if (backward) { /* dc, dq, dWk against dqk, dq, dWk */
    keys += (double)J * k * (mk + 2.0 * B);
    queries += (double)B * mk * (J + 2.0 * k);
  }
  return queries < keys;
}

/* The strata matrix as one (J, M k) operand in modality order, or NULL if
 * the view's modalities are separate arrays. */
static const float *strata_matrix(const fdc_view *v) {
  return v->one_block ? v->d[0] : NULL;
}

/* The auxiliary modalities' slots, one task each (independent outputs;
 * k_tasks); the predominant one's is its knowledge. */
typedef struct slot_job {
  const imml_model *m;
  const fdc_scratch *att;
  const fdc_view *v;
  const float *const *z;
  float *const *slot;
  int B, p;
} slot_job;

static void slot_task(void *arg, int part, k_ctx *ctx) {
  const slot_job *j = arg;
  const int B = j->B, k = j->m->cfg.knowledge_dim, J = j->v->n;
  const int mm = part < j->p ? part : part + 1; /* the auxiliary modalities */
  const int cond = j->m->cfg.slot_mode == IMML_SLOT_CONDITIONAL;
  if (cond && j->slot[mm] != j->z[mm])
    memcpy(j->slot[mm], j->z[mm], (size_t)B * k * sizeof(float));
  /* xhat_a (B, k) = w (B, J) d_a (J, k); conditional adds it to z_a */
  k_gemm(ctx, 0, 0, B, k, J, 1.0f, j->att->w, J, j->v->d[mm], j->v->ld,
         cond ? 1.0f : 0.0f, j->slot[mm], k);
}

void fdc_forward(const imml_model *m, imml_acts *a, const fdc_scratch *att,
                 int p, const float *const *z, float *const *slot,
                 const fdc_view *v) {
  const imml_config *c = &m->cfg;
  const int B = a->batch, k = c->knowledge_dim, M = c->n_modalities, J = v->n;
  const float *wq = m->pt.wq, *wk = m->pt.wk;
  const float inv_sqrt_k = 1.0f / sqrtf((float)k);
  a->query_side = use_query_side(B, J, k, M, a == &m->train && c->beta != 0.0f);
  /* q (B, k) = [z_p; z_a1; ...] (B, Mk) Wq (Mk, k), one block at a time */
  for (int pos = 0; pos < M; pos++)
    k_gemm(m->gemm, 0, 0, B, k, k, 1.0f, z[order_at(p, pos)], k,
           wq + (size_t)pos * k * k, k, pos == 0 ? 0.0f : 1.0f, a->q, k);
  if (a->query_side) {
    /* qk (B, Mk), block of modality mm = q Wk_posᵀ; E = qk Dᵀ / sqrt(k) */
    const int ldq = M * k;
    for (int pos = 0; pos < M; pos++)
      k_gemm(m->gemm, 0, 1, B, k, k, 1.0f, a->q, k, wk + (size_t)pos * k * k, k,
             0.0f, a->qk + (size_t)order_at(p, pos) * k, ldq);
    const float *d = strata_matrix(v);
    if (d)
      k_gemm(m->gemm, 0, 1, B, J, M * k, inv_sqrt_k, a->qk, ldq, d, v->ld, 0.0f,
             att->alpha, J);
    else
      for (int mm = 0; mm < M; mm++)
        k_gemm(m->gemm, 0, 1, B, J, k, inv_sqrt_k, a->qk + (size_t)mm * k, ldq,
               v->d[mm], v->ld, mm == 0 ? 0.0f : 1.0f, att->alpha, J);
  } else {
    /* c (J, k) = [d_p; d_a1; ...] Wk; E = q cᵀ / sqrt(k) */
    for (int pos = 0; pos < M; pos++)
      k_gemm(m->gemm, 0, 0, J, k, k, 1.0f, v->d[order_at(p, pos)], v->ld,
             wk + (size_t)pos * k * k, k, pos == 0 ? 0.0f : 1.0f, att->kk, k);
    k_gemm(m->gemm, 0, 1, B, J, k, inv_sqrt_k, a->q, k, att->kk, k, 0.0f,
           att->alpha, J);
  }
  /* alpha (B, J) = softmax(E) */
  k_softmax_rows(B, J, att->alpha, J, att->alpha, J);
  /* w = beta alpha + (1 - beta) / J */
  const float beta = c->beta, flat = (1.0f - c->beta) / (float)J;
  const size_t nw = (size_t)B * J;
  for (size_t i = 0; i < nw; i++)
    att->w[i] = beta * att->alpha[i] + flat;
  if (slot[p] != z[p])
    memcpy(slot[p], z[p], (size_t)B * k * sizeof(float));
  slot_job sj = {m, att, v, z, slot, B, p};
  if (!k_tasks(m->gemm, M - 1, 0, (double)(M - 1) * B * k * J, slot_task, &sj))
    for (int part = 0; part < M - 1; part++)
      slot_task(&sj, part, m->gemm);
  a->view = *v;
  a->p = p;
}

/* The backward's independent products, as tasks (k_tasks). */
typedef struct back_job {
  const imml_model *m;
  const imml_acts *a;
  const fdc_scratch *att;
  imml_grads_scratch *g;
  const imml_ptensors *dg;
  const fdc_view *v;
  float inv_sqrt_k;
} back_job;

/* Keys side: 0: dQ (B, k) = dE c / sqrt(k); 1: dK (J, k) = dEᵀ Q / sqrt(k). */
static void dqk_task(void *arg, int i, k_ctx *ctx) {
  const back_job *j = arg;
  const int B = j->a->batch, k = j->m->cfg.knowledge_dim, J = j->v->n;
  if (i == 0)
    k_gemm(ctx, 0, 0, B, k, J, j->inv_sqrt_k, j->att->de, J, j->att->kk, k,
           0.0f, j->g->dq, k);
  else
    k_gemm(ctx, 1, 0, J, k, B, j->inv_sqrt_k, j->att->de, J, j->a->q, k, 0.0f,
           j->att->dk, k);
}

/* Keys side: dWk block pos += d_mᵀ dK. */
static void dwk_task(void *arg, int pos, k_ctx *ctx) {
  const back_job *j = arg;
  const int k = j->m->cfg.knowledge_dim, J = j->v->n;
  k_gemm(ctx, 1, 0, k, k, J, 1.0f, j->v->d[order_at(j->a->p, pos)], j->v->ld,
         j->att->dk, k, 1.0f, j->dg->wk + (size_t)pos * k * k, k);
}

/* dWq block pos += z_mᵀ dQ; dz_m += dQ Wq_blockᵀ. */
static void dwq_task(void *arg, int pos, k_ctx *ctx) {
  const back_job *j = arg;
  const int B = j->a->batch, k = j->m->cfg.knowledge_dim;
  const int mm = order_at(j->a->p, pos);
  const size_t blk = (size_t)pos * k * k;
  k_gemm(ctx, 1, 0, k, k, B, 1.0f, j->a->z[mm], k, j->g->dq, k, 1.0f,
         j->dg->wq + blk, k);
  k_gemm(ctx, 0, 1, B, k, k, 1.0f, j->g->dq, k, j->m->pt.wq + blk, k, 1.0f,
         j->g->dz[mm], k);
}

void fdc_backward(const imml_model *m, const imml_acts *a,
                  const fdc_scratch *att, imml_grads_scratch *g,
                  const imml_ptensors *dg) {
  const imml_config *c = &m->cfg;
  const int B = a->batch, k = c->knowledge_dim, M = c->n_modalities;
  const size_t bk = (size_t)B * k * sizeof(float);
  /* Slots: dz_m = dslot_m, except strict mode where z_a reaches its slot
   * only through the (detached) strata. */
  for (int mm = 0; mm < M; mm++) {
    if (a->warm || mm == a->p || c->slot_mode == IMML_SLOT_CONDITIONAL)
      memcpy(g->dz[mm], g->dslot[mm], bk);
    else
      memset(g->dz[mm], 0, bk);
  }
  if (a->warm || c->beta == 0.0f)
    return; /* no attention, or alpha has weight 0: zero gradient */
  const fdc_view *v = &a->view;
  const int J = v->n, p = a->p;
  const float inv_sqrt_k = 1.0f / sqrtf((float)k);
  float *dwk = dg->wk;
  const float *wk = m->pt.wk;
  back_job j = {m, a, att, g, dg, v, inv_sqrt_k};
  /* dalpha (B, J) = beta sum_a dxhat_a (B, k) d_aᵀ (k, J) */
  int first = 1;
  for (int mm = 0; mm < M; mm++) {
    if (mm == p)
      continue;
    k_gemm(m->gemm, 0, 1, B, J, k, c->beta, g->dslot[mm], k, v->d[mm], v->ld,
           first ? 0.0f : 1.0f, att->dw, J);
    first = 0;
  }
  /* dE = alpha ⊙ (dalpha - rowsum(dalpha ⊙ alpha)) */
  k_softmax_backward_rows(B, J, att->alpha, J, att->dw, J, att->de, J);
  if (a->query_side) {
    /* dqk (B, Mk) = dE (B, J) D (J, Mk) / sqrt(k); then per block
     * dQ += dqk_m Wk_pos and dWk_pos += dqk_mᵀ Q */
    const int ldq = M * k;
    const float *d = strata_matrix(v);
    if (d)
      k_gemm(m->gemm, 0, 0, B, M * k, J, inv_sqrt_k, att->de, J, d, v->ld, 0.0f,
             g->dqk, ldq);
    else
      for (int mm = 0; mm < M; mm++)
        k_gemm(m->gemm, 0, 0, B, k, J, inv_sqrt_k, att->de, J, v->d[mm], v->ld,
               0.0f, g->dqk + (size_t)mm * k, ldq);
    for (int pos = 0; pos < M; pos++) {
      const float *blk = g->dqk + (size_t)order_at(p, pos) * k;
      const size_t w = (size_t)pos * k * k;
      k_gemm(m->gemm, 0, 0, B, k, k, 1.0f, blk, ldq, wk + w, k,
             pos == 0 ? 0.0f : 1.0f, g->dq, k);
      k_gemm(m->gemm, 1, 0, k, k, B, 1.0f, blk, ldq, a->q, k, 1.0f, dwk + w, k);
    }
  } else {
    /* dQ (B, k) = dE (B, J) c (J, k) / sqrt(k) and dK (J, k) = dEᵀ Q /
     * sqrt(k), then dWk block += d_mᵀ dK: one task each */
    if (!k_tasks(m->gemm, 2, 0, 2.0 * B * k * J, dqk_task, &j))
      for (int i = 0; i < 2; i++)
        dqk_task(&j, i, m->gemm);
    if (!k_tasks(m->gemm, M, 0, (double)M * k * k * J, dwk_task, &j))
      for (int pos = 0; pos < M; pos++)
        dwk_task(&j, pos, m->gemm);
  }
  if (!k_tasks(m->gemm, M, 0, 2.0 * M * B * k * k, dwq_task, &j))
    for (int pos = 0; pos < M; pos++)
      dwq_task(&j, pos, m->gemm);
}

/* Staged knowledge of the step's micro-batches (imml_backward), kept in a
 * ring of J entries: a step that stages more than J rows keeps only its
 * last J, which are all a sequence of pushes would leave. */
void imml_stage_rows(imml_model *m, const float *const *z, int batch) {
  const int J = m->cfg.dict_size, k = m->cfg.knowledge_dim,
            M = m->cfg.n_modalities;
  imml_accum *s = &m->acc;
  const int start = batch > J ? batch - J : 0;
  for (int i = start; i < batch; i++) {
    float *entry = s->rows + (size_t)s->pos * M * k;
    for (int mm = 0; mm < M; mm++)
      memcpy(entry + (size_t)mm * k, z[mm] + (size_t)i * k,
             (size_t)k * sizeof(float));
    s->pos = (s->pos + 1) % J;
  }
  s->n += (size_t)batch;
  /* a push of more than J rows writes J of them, ending where it began */
  s->adv = (s->adv + (batch > J ? J : batch)) % J;
}

void fdc_push_entries(imml_model *m, const float *rows, int first, int n) {
  const int J = m->cfg.dict_size, k = m->cfg.knowledge_dim,
            M = m->cfg.n_modalities;
  const size_t Mk = (size_t)M * k;
  for (int i = 0; i < n; i++) {
    const int from = (first + i) % J;
    memcpy(m->dict + (size_t)m->dict_pos * Mk, rows + (size_t)from * Mk,
           Mk * sizeof(float));
    m->dict_pos = (m->dict_pos + 1) % J;
    if (m->dict_fill < J)
      m->dict_fill++;
  }
}
