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
  const float *wf = m->params + m->tensors[IMML_PER_MODALITY * M + 2].offset;
  const float *bf = m->params + m->tensors[IMML_PER_MODALITY * M + 3].offset;
  /* logits (B, C) = [slot_1; ...; slot_M] (B, Mk) Wf (Mk, C) + bf */
  for (int i = 0; i < B; i++)
    for (int j = 0; j < C; j++)
      a->logits[(size_t)i * C + j] = bf[j];
  for (int mm = 0; mm < M; mm++)
    k_gemm(m->gemm, 0, 0, B, C, k, 1.0f, a->slot[mm], k,
           wf + (size_t)mm * k * C, C, 1.0f, a->logits, C);
  return 0;
}

int ft_backward(imml_model *m, float *G) {
  const imml_config *c = &m->cfg;
  imml_acts *a = &m->train;
  const int B = a->batch, k = c->knowledge_dim, C = c->n_classes,
            M = c->n_modalities;
  if (!m->builtin_ft)
    return m->ft.backward(m->ft.user_data, B, M, k,
                          (const float *const *)a->slot, m->g.dlogits, C,
                          m->g.dslot);
  const size_t off_w = m->tensors[IMML_PER_MODALITY * M + 2].offset;
  const size_t off_b = m->tensors[IMML_PER_MODALITY * M + 3].offset;
  for (int mm = 0; mm < M; mm++) {
    const size_t blk = (size_t)mm * k * C;
    /* dWf block += slot_mᵀ dlogits; dslot_m = dlogits Wf_blockᵀ */
    k_linear_backward(m->gemm, B, k, C, a->slot[mm], k, m->params + off_w + blk,
                      m->g.dlogits, G + off_w + blk, mm == 0 ? G + off_b : NULL,
                      m->g.dslot[mm], k, 0.0f);
  }
  return 0;
}
