/* Handles: entering a public call, failed handles that carry the message
 * of a failed create or load (the one error channel), shares of a model
 * for inference on other threads, and freeing. */
#include "bf16.h"
#include "internal.h"

#include <string.h>

imml_status imml_enter(imml_model *m, int writes) {
  if (!m)
    return IMML_ERR_NULL;
  if (m->failed)
    return IMML_ERR_STATE; /* keeps the message of the failed create/load */
  m->errmsg[0] = '\0';
  if (writes && m->parent)
    return imml_fail(m, IMML_ERR_STATE,
                     "this handle is a share of a model (imml_model_share): "
                     "it predicts and evaluates only; call this on the model");
  return IMML_OK;
}

imml_status imml_leave(imml_model *m, imml_status st) {
  if (m && !m->failed)
    imml_bf16_ctx_end(m->gemm);
  return st;
}

imml_model *imml_failed_handle(const imml_allocator *a, const char *msg) {
  imml_allocator use = {NULL, NULL, NULL};
  if (a && !a->malloc_fn == !a->free_fn)
    use = *a;
  imml_model *m = imml_alloc(&use, sizeof *m);
  if (!m)
    return NULL;
  memset(m, 0, sizeof *m);
  m->alloc = use;
  m->failed = 1;
  imml_set_err(m->errmsg, sizeof m->errmsg, "%s", msg);
  return m;
}

imml_status imml_hand_out(imml_status st, imml_model *m,
                          const imml_allocator *a, const char *err,
                          imml_model **out) {
  if (st == IMML_OK || (m && m->failed)) {
    *out = m; /* the model, or the failed handle a refusal already made */
    return st;
  }
  *out = imml_failed_handle(a, err[0] ? err : imml_status_string(st));
  return st;
}

void imml_share_sync(imml_model *m) {
  const imml_model *p = m->parent;
  if (!p)
    return;
  /* a state a concurrent change of the model could tear (which the API
   * forbids) is read as not fixed rather than followed out of bounds */
  const int pp = p->p, fixed = p->p_fixed;
  m->p_fixed = fixed && pp >= 0 && pp < m->cfg.n_modalities;
  m->p = m->p_fixed ? pp : -1;
  m->steps = p->steps;
  memcpy(m->ema, p->ema, sizeof m->ema);
  m->dict_fill = p->dict_fill;
  m->dict_pos = p->dict_pos;
}

imml_status imml_model_share(imml_model *model, imml_model **out) {
  if (!out)
    return IMML_ERR_NULL;
  *out = NULL;
  IMML_ENTER(model);
  if (model->parent)
    return imml_fail(model, IMML_ERR_STATE,
                     "this handle is itself a share: share the model");
  imml_model *s = imml_alloc(&model->alloc, sizeof *s);
  if (!s)
    return imml_fail(model, IMML_ERR_NOMEM,
                     "out of memory for a share's handle (%zu bytes)",
                     sizeof *s);
  memset(s, 0, sizeof *s);
  s->alloc = model->alloc;
  s->cfg = model->cfg;
  memcpy(s->dims, model->dims, sizeof s->dims);
  s->cfg.dims = s->dims;
  s->builtin_ft = model->builtin_ft;
  s->ft = model->ft;
  s->n_tensors = model->n_tensors;
  memcpy(s->tensors, model->tensors, sizeof s->tensors);
  s->n_params = model->n_params;
  s->params = model->params;
  s->dict = model->dict;
  s->jmax = model->jmax;
  s->parent = model;
  imml_carver c = {NULL, 0, 0};
  imml_carve_acts(&c, &s->cfg, s->jmax, 0, &s->eval, &s->eval_att);
  s->arena_bytes = c.used;
  s->arena = imml_alloc(&s->alloc, c.used);
  if (!s->arena) {
    imml_free(&s->alloc, s);
    return imml_fail(model, IMML_ERR_NOMEM,
                     "out of memory for a share's %zu-byte scratch", c.used);
  }
  /* its own product scratch: a share may predict on another thread (and
   * only predicts: its branches need no work memory) */
  if (model->gemm && !(s->gemm = imml_bf16_ctx_create(&s->alloc, 0))) {
    imml_free(&s->alloc, s->arena);
    imml_free(&s->alloc, s);
    return imml_fail(model, IMML_ERR_NOMEM,
                     "out of memory for a share's %zu-byte bf16 scratch",
                     imml_bf16_ctx_bytes(0));
  }
  c.base = s->arena;
  c.used = 0;
  imml_carve_acts(&c, &s->cfg, s->jmax, 0, &s->eval, &s->eval_att);
  imml_ptensors_point(s, s->params, &s->pt); /* no gradients: never trains */
  imml_share_sync(s);
  *out = s;
  return IMML_OK;
}

void imml_model_free(imml_model *m) {
  if (!m)
    return;
  const imml_allocator a = m->alloc;
  imml_free(&a, m->opt.block);
  imml_free(&a, m->coll.block);
  imml_free(&a, m->arena);
  imml_bf16_ctx_free(&a, m->gemm);
  imml_free(&a, m);
}

const char *imml_model_errmsg(const imml_model *model) {
  if (!model)
    return "no model handle (NULL): the create or load had nowhere to put it, "
           "or not even its handle could be allocated";
  return model->errmsg;
}
