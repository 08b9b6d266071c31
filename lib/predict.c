/* Inference that only reads the model: imml_predict with a caller-owned
 * workspace, so several threads can serve one loaded model at once. */
#include "internal.h"
#include "kernels.h"

#include <string.h>

#ifdef IMML_HAVE_OPENBLAS_THREADS
#include <cblas.h>
#endif

static int same_shape(const imml_workspace *ws, const imml_model *m) {
  const imml_config *a = &ws->cfg, *b = &m->cfg;
  if (a->n_modalities != b->n_modalities || a->hidden_dim != b->hidden_dim ||
      a->knowledge_dim != b->knowledge_dim || a->n_classes != b->n_classes ||
      a->max_batch != b->max_batch || ws->jmax != m->jmax)
    return 0;
  return memcmp(ws->dims, m->dims, (size_t)a->n_modalities * sizeof(int)) == 0;
}

imml_status imml_workspace_create(const imml_model *m, imml_workspace **out) {
  if (!m || !out)
    return IMML_ERR_NULL;
  *out = NULL;
  imml_workspace *ws = imml_alloc(&m->alloc, sizeof *ws);
  if (!ws)
    return IMML_ERR_NOMEM;
  memset(ws, 0, sizeof *ws);
  ws->alloc = m->alloc;
  ws->cfg = m->cfg;
  memcpy(ws->dims, m->dims, sizeof ws->dims);
  ws->cfg.dims = ws->dims;
  ws->jmax = m->jmax;
  imml_carver c = {NULL, 0, 0};
  imml_carve_acts(&c, &ws->cfg, ws->jmax, 0, &ws->acts);
  ws->arena = imml_alloc(&ws->alloc, c.used);
  if (!ws->arena) {
    imml_free(&m->alloc, ws);
    return IMML_ERR_NOMEM;
  }
  c.base = ws->arena;
  c.used = 0;
  imml_carve_acts(&c, &ws->cfg, ws->jmax, 0, &ws->acts);
  *out = ws;
  return IMML_OK;
}

void imml_workspace_free(imml_workspace *ws) {
  if (!ws)
    return;
  const imml_allocator a = ws->alloc;
  imml_free(&a, ws->arena);
  imml_free(&a, ws);
}

const char *imml_workspace_errmsg(const imml_workspace *ws) {
  return ws ? ws->errmsg : "no workspace (NULL handle)";
}

imml_status imml_predict(const imml_model *m, imml_workspace *ws, int B,
                         const float *const *x, float *logits, float *probs,
                         int *classes) {
  if (!m || !ws)
    return IMML_ERR_NULL;
  ws->errmsg[0] = '\0';
  ws->has_result = 0;
  if (!same_shape(ws, m)) {
    imml_set_err(ws->errmsg, sizeof ws->errmsg,
                 "workspace was created for a model of another shape");
    return IMML_ERR_SHAPE;
  }
  imml_status st =
      imml_check_batch(&m->cfg, B, x, NULL, 0, ws->errmsg, sizeof ws->errmsg);
  if (st != IMML_OK)
    return st;
  imml_acts *a = &ws->acts;
  st = imml_run_forward(m, a, 0, B, x, NULL, NULL, ws->errmsg,
                        sizeof ws->errmsg);
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
  ws->has_result = 1;
  return IMML_OK;
}

imml_status imml_predict_unimodal(const imml_workspace *ws, int m,
                                  float *logits) {
  if (!ws || !logits)
    return IMML_ERR_NULL;
  if (!ws->has_result)
    return IMML_ERR_STATE;
  if (m < 0 || m >= ws->cfg.n_modalities)
    return IMML_ERR_INVALID_ARG;
  memcpy(logits, ws->acts.o[m],
         (size_t)ws->acts.batch * ws->cfg.n_classes * sizeof(float));
  return IMML_OK;
}

int imml_blas_threads(int n) {
#ifdef IMML_HAVE_OPENBLAS_THREADS
  if (n > 0)
    openblas_set_num_threads(n);
  return openblas_get_num_threads();
#else
  (void)n;
  return 0;
#endif
}
