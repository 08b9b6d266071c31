/* Inference: imml_predict on a model or one of its shares (each thread
 * serving a model has a share of its own), and the unimodal heads' logits
 * of the last evaluation. */
#include "internal.h"
#include "kernels.h"

#include <string.h>

static imml_status predict_call(imml_model *m, int B, const float *const *x,
                                float *logits, float *probs, int *classes) {
  IMML_ENTER(m);
  m->eval_valid = 0;
  imml_status st =
      imml_check_batch(&m->cfg, B, x, NULL, 0, m->errmsg, sizeof m->errmsg);
  if (st != IMML_OK)
    return st;
  imml_share_sync(m);
  imml_acts *a = &m->eval;
  st = imml_run_forward(m, a, &m->eval_att, 0, B, x, NULL, NULL, m->errmsg,
                        sizeof m->errmsg);
  if (st != IMML_OK)
    return st;
  const int C = m->cfg.n_classes;
  if (logits)
    memcpy(logits, a->logits, (size_t)B * C * sizeof(float));
  if (probs)
    k_softmax_rows(B, C, a->logits, C, probs, C);
  if (classes)
    for (int i = 0; i < B; i++)
      classes[i] = k_argmax(C, a->logits + (size_t)i * C);
  m->eval_valid = 1;
  return IMML_OK;
}

imml_status imml_predict(imml_model *m, int B, const float *const *x,
                         float *logits, float *probs, int *classes) {
  return imml_leave(m, predict_call(m, B, x, logits, probs, classes));
}

imml_status imml_unimodal_get(imml_model *m, int mod, float *logits) {
  IMML_ENTER(m);
  if (!logits)
    return imml_fail(m, IMML_ERR_NULL, "logits is NULL");
  if (!m->eval_valid)
    return imml_fail(m, IMML_ERR_STATE,
                     "no evaluation result on this handle: call imml_predict "
                     "or an evaluation imml_forward first");
  if (mod < 0 || mod >= m->cfg.n_modalities)
    return imml_fail(m, IMML_ERR_INVALID_ARG, "modality %d: must be in 0..%d",
                     mod, m->cfg.n_modalities - 1);
  memcpy(logits, m->eval.o[mod],
         (size_t)m->eval.batch * m->cfg.n_classes * sizeof(float));
  return IMML_OK;
}
