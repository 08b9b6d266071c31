/* Fusion and target (METHOD.md section 3): the built-in concat + linear
 * F&T and the adapter for host callbacks. */
#include "internal.h"
#include "kernels.h"

int ft_forward(const imml_model *m, imml_acts *a, int training) {
  const imml_config *c = &m->cfg;
  const int B = a->batch, k = c->knowledge_dim, C = c->n_classes,
            M = c->n_modalities;
  if (!m->builtin_ft)
    return m->ft.forward(m->ft.user_data, training, B, M, k,
                         (const float *const *)a->slot, C, a->logits);
  const float *wf = m->pt.ftw, *bf = m->pt.ftb;
  /* logits (B, C) = [slot_1; ...; slot_M] (B, Mk) Wf (Mk, C) + bf */
  for (int i = 0; i < B; i++)
    for (int j = 0; j < C; j++)
      a->logits[(size_t)i * C + j] = bf[j];
  for (int mm = 0; mm < M; mm++)
    k_gemm(m->gemm, 0, 0, B, C, k, 1.0f, a->slot[mm], k,
           wf + (size_t)mm * k * C, C, 1.0f, a->logits, C);
  return 0;
}

int ft_backward(const imml_model *m, const imml_acts *a, imml_grads_scratch *g,
                const imml_ptensors *d) {
  const imml_config *c = &m->cfg;
  const int B = a->batch, k = c->knowledge_dim, C = c->n_classes,
            M = c->n_modalities;
  if (!m->builtin_ft)
    return m->ft.backward(m->ft.user_data, B, M, k,
                          (const float *const *)a->slot, g->dlogits, C,
                          g->dslot);
  for (int mm = 0; mm < M; mm++) {
    const size_t blk = (size_t)mm * k * C;
    /* dWf block += slot_mᵀ dlogits; dslot_m = dlogits Wf_blockᵀ */
    k_linear_backward(m->gemm, B, k, C, a->slot[mm], k, m->pt.ftw + blk,
                      g->dlogits, d->ftw + blk, mm == 0 ? d->ftb : NULL,
                      g->dslot[mm], k, 0.0f);
  }
  return 0;
}
