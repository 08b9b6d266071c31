/* Built-in optimisers with PyTorch's update rules: SGD (momentum,
 * dampening 0, Nesterov, coupled weight decay) and AdamW (bias-corrected,
 * decoupled weight decay), with optional global gradient-norm clipping. */
#include "internal.h"
#include "kernels.h"

#include <math.h>
#include <string.h>

void imml_optim_config_init(imml_optim_config *cfg, imml_optimizer_kind kind) {
  if (!cfg)
    return;
  memset(cfg, 0, sizeof *cfg);
  cfg->struct_size = sizeof *cfg;
  cfg->kind = kind;
  cfg->lr = 1e-3f;
  cfg->weight_decay = kind == IMML_OPT_ADAMW ? 0.01f : 0.0f;
  cfg->momentum = 0.0f;
  cfg->nesterov = 0;
  cfg->beta1 = 0.9f;
  cfg->beta2 = 0.999f;
  cfg->eps = 1e-8f;
  cfg->clip_norm = 0.0f;
}

static int in_range(float v, float lo, float hi) {
  return isfinite(v) && v >= lo && v <= hi;
}

imml_status imml_optim_validate(const imml_optim_config *in,
                                imml_optim_config *out, char *err, size_t n) {
  if (in->struct_size < sizeof *in) {
    imml_set_err(err, n,
                 "optim.struct_size = %zu: smaller than this library's "
                 "imml_optim_config (%zu); call imml_optim_config_init()",
                 in->struct_size, sizeof *in);
    return IMML_ERR_INVALID_ARG;
  }
  const imml_optim_config c = *in;
  const char *bad = NULL;
  double v = 0.0;
  if (c.kind != IMML_OPT_SGD && c.kind != IMML_OPT_ADAMW) {
    imml_set_err(err, n,
                 "optim.kind = %d: must be IMML_OPT_SGD (0) or "
                 "IMML_OPT_ADAMW (1)",
                 c.kind);
    return IMML_ERR_INVALID_ARG;
  }
  if (!in_range(c.lr, 0.0f, 1e30f))
    bad = "lr", v = c.lr;
  else if (!in_range(c.weight_decay, 0.0f, 1e30f))
    bad = "weight_decay", v = c.weight_decay;
  else if (!in_range(c.momentum, 0.0f, 1.0f) || c.momentum == 1.0f)
    bad = "momentum", v = c.momentum;
  else if (!in_range(c.beta1, 0.0f, 1.0f) || c.beta1 == 1.0f)
    bad = "beta1", v = c.beta1;
  else if (!in_range(c.beta2, 0.0f, 1.0f) || c.beta2 == 1.0f)
    bad = "beta2", v = c.beta2;
  else if (!in_range(c.eps, 0.0f, 1e30f) || c.eps == 0.0f)
    bad = "eps", v = c.eps;
  else if (!in_range(c.clip_norm, 0.0f, 1e30f))
    bad = "clip_norm", v = c.clip_norm;
  if (bad) {
    imml_set_err(err, n,
                 "optim.%s = %g is out of range (lr, weight_decay, clip_norm "
                 ">= 0; momentum, beta1, beta2 in [0, 1); eps > 0)",
                 bad, v);
    return IMML_ERR_INVALID_ARG;
  }
  if (c.nesterov && !(c.kind == IMML_OPT_SGD && c.momentum > 0.0f)) {
    imml_set_err(err, n, "optim.nesterov = %d needs SGD with momentum > 0",
                 c.nesterov);
    return IMML_ERR_INVALID_ARG;
  }
  *out = c;
  out->struct_size = sizeof *out;
  return IMML_OK;
}

imml_status imml_optim_alloc(imml_model *m, const imml_optim_config *c) {
  size_t bytes;
  if (!imml_size_mul(&bytes, m->n_params, 2 * sizeof(float)))
    return imml_fail(m, IMML_ERR_TOO_LARGE, "optimiser state overflows");
  void *block = imml_alloc(&m->alloc, bytes);
  if (!block)
    return imml_fail(m, IMML_ERR_NOMEM,
                     "out of memory allocating %zu bytes of optimiser state",
                     bytes);
  memset(block, 0, bytes);
  imml_free(&m->alloc, m->opt.block);
  memset(&m->opt, 0, sizeof m->opt);
  m->opt.block = block;
  m->opt.m1 = block;
  m->opt.m2 = (float *)block + m->n_params;
  m->opt.cfg = *c;
  m->opt.active = 1;
  return IMML_OK;
}

imml_status imml_optim_setup(imml_model *m, const imml_optim_config *cfg) {
  if (!m)
    return IMML_ERR_NULL;
  m->errmsg[0] = '\0';
  if (!cfg)
    return imml_fail(m, IMML_ERR_NULL, "optimiser config is NULL");
  imml_optim_config c;
  imml_status st = imml_optim_validate(cfg, &c, m->errmsg, sizeof m->errmsg);
  if (st != IMML_OK)
    return st;
  return imml_optim_alloc(m, &c);
}

imml_status imml_optim_set_lr(imml_model *m, float lr) {
  if (!m)
    return IMML_ERR_NULL;
  m->errmsg[0] = '\0';
  if (!m->opt.active)
    return imml_fail(m, IMML_ERR_STATE,
                     "no optimiser: call imml_optim_setup() first");
  if (!in_range(lr, 0.0f, 1e30f))
    return imml_fail(m, IMML_ERR_INVALID_ARG,
                     "lr = %g: must be finite and >= 0", (double)lr);
  m->opt.cfg.lr = lr;
  return IMML_OK;
}

/* The coefficients of one update, shared by the check and the commit. */
typedef struct step_coef {
  float clip; /* gradient scale from clipping (or 1) */
  float lr, wd, mom, b1, b2, eps;
  float decay;     /* AdamW: 1 - lr wd */
  float step_size; /* AdamW: lr / (1 - b1^t) */
  float bc2_sqrt;  /* AdamW: sqrt(1 - b2^t) */
  int kind, nesterov, first;
} step_coef;

/* Update of element i: new parameter and moments into *p, *m1, *m2. */
static inline void update_one(const step_coef *k, float g, float *p, float *m1,
                              float *m2) {
  g *= k->clip;
  if (k->kind == IMML_OPT_SGD) {
    float d = g;
    if (k->wd != 0.0f)
      d = d + k->wd * *p;
    if (k->mom != 0.0f) {
      *m1 = k->first ? d : k->mom * *m1 + d;
      d = k->nesterov ? d + k->mom * *m1 : *m1;
    }
    *p = *p - k->lr * d;
  } else {
    float x = *p * k->decay;
    *m1 = k->b1 * *m1 + (1.0f - k->b1) * g;
    *m2 = k->b2 * *m2 + (1.0f - k->b2) * g * g;
    const float denom = sqrtf(*m2) / k->bc2_sqrt + k->eps;
    *p = x - k->step_size * (*m1 / denom);
  }
}

imml_status imml_step(imml_model *m) {
  if (!m)
    return IMML_ERR_NULL;
  m->errmsg[0] = '\0';
  imml_optim *o = &m->opt;
  if (!o->active)
    return imml_fail(m, IMML_ERR_STATE,
                     "no optimiser: call imml_optim_setup() first");
  const size_t n = m->n_params;
  float *P = m->params, *G = m->grads;
  double ss = 0.0;
  for (size_t i = 0; i < n; i++)
    ss += (double)G[i] * G[i];
  if (!isfinite(ss))
    return imml_fail(m, IMML_ERR_NONFINITE,
                     "gradients are not finite (squared norm %g); the step "
                     "was refused and nothing changed",
                     ss);
  step_coef k;
  memset(&k, 0, sizeof k);
  k.kind = o->cfg.kind;
  k.clip = 1.0f;
  if (o->cfg.clip_norm > 0.0f) {
    const double coef = o->cfg.clip_norm / (sqrt(ss) + 1e-6);
    if (coef < 1.0)
      k.clip = (float)coef;
  }
  k.lr = o->cfg.lr;
  k.wd = o->cfg.weight_decay;
  k.mom = o->cfg.momentum;
  k.nesterov = o->cfg.nesterov;
  k.first = !o->has_buf;
  k.b1 = o->cfg.beta1;
  k.b2 = o->cfg.beta2;
  k.eps = o->cfg.eps;
  const double t = (double)(o->t + 1);
  k.decay = (float)(1.0 - (double)k.lr * k.wd);
  k.step_size = (float)((double)k.lr / (1.0 - pow((double)k.b1, t)));
  k.bc2_sqrt = (float)sqrt(1.0 - pow((double)k.b2, t));
  /* Pass 1 computes every new value without storing it; only if all are
   * finite does pass 2 commit, so a refused step changes nothing. */
  float bad = 0.0f;
  for (size_t i = 0; i < n; i++) {
    float p = P[i], a = o->m1[i], b = o->m2[i];
    update_one(&k, G[i], &p, &a, &b);
    bad += p * 0.0f + a * 0.0f + b * 0.0f;
  }
  if (bad != 0.0f)
    return imml_fail(m, IMML_ERR_NONFINITE,
                     "the update would make a parameter or a moment "
                     "non-finite (lr %g too large?); nothing changed",
                     (double)k.lr);
  for (size_t i = 0; i < n; i++)
    update_one(&k, G[i], &P[i], &o->m1[i], &o->m2[i]);
  memset(G, 0, n * sizeof(float));
  o->t++;
  o->has_buf = k.mom != 0.0f || o->has_buf;
  return IMML_OK;
}
