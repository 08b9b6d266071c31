/* Built-in optimisers with PyTorch's update rules: SGD (momentum,
 * dampening 0, Nesterov, coupled weight decay) and AdamW (bias-corrected,
 * decoupled weight decay), with optional global gradient-norm clipping. */
#include "cache.h"
#include "internal.h"
#include "kernels.h"

#include <math.h>
#include <string.h>

void imml_optim_config_init(imml_optim_config *cfg, imml_optim_kind kind) {
  if (!cfg)
    return;
  memset(cfg, 0, sizeof *cfg);
  cfg->struct_size = sizeof *cfg;
  cfg->kind = kind;
  cfg->lr = 1e-3f;
  cfg->weight_decay = kind == IMML_OPTIM_ADAMW ? 0.01f : 0.0f;
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
  imml_optim_config c;
  imml_optim_config_init(&c, IMML_OPTIM_ADAMW);
  const imml_status st = imml_struct_in(
      &c, sizeof c, IMML_OPTIM_CONFIG_SIZE_KNOWN, IMML_OPTIM_CONFIG_SIZE_1_0,
      in, "imml_optim_config", "imml_optim_config_init", err, n);
  if (st != IMML_OK)
    return st;
  const char *bad = NULL;
  double v = 0.0;
  if (c.kind != IMML_OPTIM_SGD && c.kind != IMML_OPTIM_ADAMW) {
    imml_set_err(err, n,
                 "optim.kind = %d: must be IMML_OPTIM_SGD (0) or "
                 "IMML_OPTIM_ADAMW (1)",
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
  if (c.flags != 0) {
    imml_set_err(err, n, "optim.flags = %d: must be 0 (reserved)", c.flags);
    return IMML_ERR_INVALID_ARG;
  }
  if (c.nesterov && !(c.kind == IMML_OPTIM_SGD && c.momentum > 0.0f)) {
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
  if (m->arena_bytes > m->cfg.memory_limit ||
      bytes > m->cfg.memory_limit - m->arena_bytes)
    return imml_fail(m, IMML_ERR_TOO_LARGE,
                     "memory_limit = %zu bytes: the arena (%zu) and the "
                     "optimiser state (%zu) would exceed it",
                     m->cfg.memory_limit, m->arena_bytes, bytes);
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
  imml_cache_note(m, IMML_EV_MOMENTS_ZEROED, NULL);
  return IMML_OK;
}

imml_status imml_optim_setup(imml_model *m, const imml_optim_config *cfg) {
  IMML_ENTER_TRAIN(m);
  if (!cfg)
    return imml_fail(m, IMML_ERR_NULL, "optimiser config is NULL");
  imml_optim_config c;
  imml_status st = imml_optim_validate(cfg, &c, m->errmsg, sizeof m->errmsg);
  if (st != IMML_OK)
    return st;
  return imml_optim_alloc(m, &c);
}

imml_status imml_optim_set_lr(imml_model *m, float lr) {
  IMML_ENTER_TRAIN(m);
  if (!m->opt.active)
    return imml_fail(m, IMML_ERR_STATE,
                     "no optimiser: call imml_optim_setup() first");
  if (!in_range(lr, 0.0f, 1e30f))
    return imml_fail(m, IMML_ERR_INVALID_ARG,
                     "lr = %g: must be finite, >= 0 and <= 1e30", (double)lr);
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
  int nesterov, first;
} step_coef;

/* Every pass below is branch-free so the compiler vectorises it, and works
 * on one range of the parameters (see step_range). */

/* AdamW's update of one element (PyTorch's order of operations), shared by
 * the exact check and the commit so that they compute the same values. */
static inline void adamw_elem(const step_coef *k, float P, float G, float M1,
                              float M2, float *p, float *m1, float *m2) {
  const float g = G * k->clip;
  *m1 = k->b1 * M1 + (1.0f - k->b1) * g;
  *m2 = k->b2 * M2 + (1.0f - k->b2) * g * g;
  *p =
      P * k->decay - k->step_size * (*m1 / (sqrtf(*m2) / k->bc2_sqrt + k->eps));
}

/* AdamW, exact check: computes every new value without storing it;
 * returns k_nonfinite_bits over them. */
IMML_HOT static uint32_t adamw_check(const step_coef *k, size_t n,
                                     const float *restrict P,
                                     const float *restrict G,
                                     const float *restrict M1,
                                     const float *restrict M2) {
  const step_coef c = *k; /* a local copy: no aliasing with the arrays */
  uint32_t worst = 0;
  for (size_t i = 0; i < n; i++) {
    float p, m1, m2;
    adamw_elem(&c, P[i], G[i], M1[i], M2[i], &p, &m1, &m2);
    worst =
        k_nonfinite_bits(k_nonfinite_bits(k_nonfinite_bits(worst, p), m1), m2);
  }
  return worst;
}

/* AdamW, commit: stores the new values, zeroes the gradient and records
 * max |m1| (top[0]), max |m2| (top[1]) and max |p| (top[2]) as bits. */
IMML_HOT static void adamw_commit(const step_coef *k, size_t n,
                                  float *restrict P, float *restrict G,
                                  float *restrict M1, float *restrict M2,
                                  uint32_t *top) {
  const step_coef c = *k;
  uint32_t top1 = 0, top2 = 0, topp = 0;
  for (size_t i = 0; i < n; i++) {
    float p, m1, m2;
    adamw_elem(&c, P[i], G[i], M1[i], M2[i], &p, &m1, &m2);
    P[i] = p;
    M1[i] = m1;
    M2[i] = m2;
    G[i] = 0.0f;
    top1 = k_top_bits(top1, m1);
    top2 = k_top_bits(top2, m2);
    topp = k_top_bits(topp, p);
  }
  top[0] = top1;
  top[1] = top2;
  top[2] = topp;
}

/* AdamW, the proof a step tries first: a bound on every new value from
 * five numbers, max |P|, max |G| and max |M1|, max M2 (all >= 0) and the
 * coefficients.  Round-to-nearest is monotonic and odd, so with
 * g = max|G| clip, for every i the commit's float values satisfy
 *   |m1_i| <= m1b = b1 max1 + c1 g,        0 <= m2_i <= b2 max2 + c2 g g,
 *   den_i = sqrt(m2_i) / bc2 + eps >= eps,  so |m1_i / den_i| <= q = m1b / eps,
 *   |P_i decay - step (m1_i / den_i)| <= max|P| |decay| + step q,
 * each side evaluated in float in the commit's order.  The quotient is
 * bounded on its own: with a tiny eps it can overflow although step q
 * would not.  When q, the m2 bound and the final bound are below 1e37 no
 * new value can overflow (NaN fails every comparison); otherwise the
 * caller runs the exact check. */
static int adamw_bound(const step_coef *k, float max_p, float max_g, float max1,
                       float max2) {
  const float g = max_g * k->clip;
  const float m1 = k->b1 * max1 + (1.0f - k->b1) * g;
  const float m2 = k->b2 * max2 + (1.0f - k->b2) * g * g;
  const float q = m1 / k->eps;
  const float bound = max_p * fabsf(k->decay) + k->step_size * q;
  return q < 1e37f && m2 < 1e37f && bound < 1e37f;
}

/* max |P| (top[0]) and max |G| (top[1]) as bits, in one pass: what the
 * bound needs when the host may have written either block. */
IMML_HOT static void maxima_pass(size_t n, const float *restrict P,
                                 const float *restrict G, uint32_t *top) {
  uint32_t tp = 0, tg = 0;
  for (size_t i = 0; i < n; i++) {
    tp = k_top_bits(tp, P[i]);
    tg = k_top_bits(tg, G[i]);
  }
  top[0] = tp;
  top[1] = tg;
}

/* One SGD pass (PyTorch semantics, dampening 0): with commit 0 returns
 * k_nonfinite_bits over the new values, with commit 1 stores them and zeroes
 * the gradient. */
IMML_HOT static uint32_t sgd_pass(const step_coef *k, size_t n,
                                  float *restrict P, float *restrict G,
                                  float *restrict M1, int commit) {
  const float clip = k->clip, wd = k->wd, mom = k->mom, lr = k->lr;
  uint32_t worst = 0;
  if (mom == 0.0f) {
    for (size_t i = 0; i < n; i++) {
      const float p = P[i] - lr * (G[i] * clip + wd * P[i]);
      if (commit) {
        P[i] = p;
        G[i] = 0.0f;
      } else {
        worst = k_nonfinite_bits(worst, p);
      }
    }
    return worst;
  }
  const float keep = k->first ? 0.0f : mom; /* first step: buf = d */
  const float nest = k->nesterov ? mom : 0.0f;
  const float use_buf = k->nesterov ? 0.0f : 1.0f;
  for (size_t i = 0; i < n; i++) {
    const float d = G[i] * clip + wd * P[i];
    const float buf = keep * M1[i] + d;
    /* nesterov: d + mom buf; plain: buf */
    const float step = use_buf * buf + (1.0f - use_buf) * (d + nest * buf);
    const float p = P[i] - lr * step;
    if (commit) {
      P[i] = p;
      M1[i] = buf;
      G[i] = 0.0f;
    } else {
      worst = k_nonfinite_bits(k_nonfinite_bits(worst, p), buf);
    }
  }
  return worst;
}

enum { PASS_MAXIMA, PASS_CHECK, PASS_COMMIT };

/* One pass of a step over all parameters, split by imml_par_for; out[part]
 * receives the part's bits (three words for an AdamW commit). */
typedef struct step_job {
  const step_coef *k;
  float *P, *G, *M1, *M2;
  int adamw, pass;
  uint32_t out[IMML_PAR_MAX][3];
} step_job;

static void step_range(void *ctx, int part, size_t lo, size_t hi) {
  step_job *j = ctx;
  const size_t n = hi - lo;
  float *P = j->P + lo, *G = j->G + lo, *M1 = j->M1 + lo,
        *M2 = j->M2 ? j->M2 + lo : NULL;
  uint32_t *out = j->out[part];
  if (!j->adamw)
    out[0] = sgd_pass(j->k, n, P, G, M1, j->pass == PASS_COMMIT);
  else if (j->pass == PASS_MAXIMA)
    maxima_pass(n, P, G, out);
  else if (j->pass == PASS_CHECK)
    out[0] = adamw_check(j->k, n, P, G, M1, M2);
  else
    adamw_commit(j->k, n, P, G, M1, M2, out);
}

/* Runs one pass; returns the OR (checks) or the max (maxima, AdamW
 * commit) of the parts' first words, and leaves every word so combined in
 * out[0]. */
static uint32_t run_pass(step_job *j, size_t n, int pass) {
  j->pass = pass;
  const int parts = imml_par_for(n, step_range, j);
  uint32_t r[3] = {0, 0, 0};
  for (int i = 0; i < parts; i++)
    for (int w = 0; w < 3; w++) {
      const uint32_t a = j->out[i][w];
      if (pass == PASS_CHECK || !j->adamw)
        r[w] |= a;
      else
        r[w] = a > r[w] ? a : r[w];
    }
  for (int w = 0; w < 3; w++)
    j->out[0][w] = r[w];
  return r[0];
}

/* The coefficients of the next update: clipping (from the squared gradient
 * norm ss), decay, and the bias corrections of step t + 1 in double. */
static void step_coefs(const imml_optim *o, double ss, step_coef *k) {
  memset(k, 0, sizeof *k);
  k->clip = 1.0f;
  if (o->cfg.clip_norm > 0.0f) {
    const double coef = o->cfg.clip_norm / (sqrt(ss) + 1e-6);
    if (coef < 1.0)
      k->clip = (float)coef;
  }
  k->lr = o->cfg.lr;
  k->wd = o->cfg.weight_decay;
  k->mom = o->cfg.momentum;
  k->nesterov = o->cfg.nesterov;
  k->first = !o->has_buf;
  k->b1 = o->cfg.beta1;
  k->b2 = o->cfg.beta2;
  k->eps = o->cfg.eps;
  const double t = (double)(o->t + 1);
  k->decay = (float)(1.0 - (double)k->lr * k->wd);
  k->step_size = (float)((double)k->lr / (1.0 - pow((double)k->b1, t)));
  k->bc2_sqrt = (float)sqrt(1.0 - pow((double)k->b2, t));
}

imml_status imml_optim_step(imml_model *m) {
  IMML_ENTER_TRAIN(m);
  imml_optim *o = &m->opt;
  if (!o->active)
    return imml_fail(m, IMML_ERR_STATE,
                     "no optimiser: call imml_optim_setup() first");
  if (m->acc.micro > 0)
    return imml_fail(m, IMML_ERR_STATE,
                     "%d micro-batch(es) since the last imml_commit: commit "
                     "the training step before its update",
                     m->acc.micro);
  if (o->t >= IMML_OPTIM_STEPS_MAX)
    return imml_fail(m, IMML_ERR_STATE,
                     "the optimiser has taken %lld steps, the most its bias "
                     "corrections are exact for (2^53); nothing changed",
                     (long long)o->t);
  const size_t n = m->n_params;
  float *P = m->params, *G = m->grads;
  /* The norm is needed only for clipping; a non-finite gradient is caught
   * by the checking pass below either way. */
  double ss = 0.0;
  if (o->cfg.clip_norm > 0.0f) {
    ss = k_sum_squares(n, G);
    if (!isfinite(ss))
      return imml_fail(m, IMML_ERR_NONFINITE,
                       "gradients are not finite (squared norm %g); the step "
                       "was refused and nothing changed",
                       ss);
  }
  step_coef k;
  step_coefs(o, ss, &k);
  const int adamw = o->cfg.kind == IMML_OPTIM_ADAMW;
  step_job j;
  memset(&j, 0, sizeof j);
  j.k = &k;
  j.P = P;
  j.G = G;
  j.M1 = o->m1;
  j.M2 = adamw ? o->m2 : NULL;
  j.adamw = adamw;
  /* Pass 1 proves every new value finite without storing it (AdamW: a
   * bound first, the exact values only if the bound is inconclusive); only
   * then does pass 2 commit, so a refused step changes nothing. */
  int proven = 0;
  if (adamw) {
    imml_cache *c = &m->cache;
    if (isnan(c->max1) || isnan(c->max2)) {
      /* a NaN or infinite moment stays non-finite: the exact check runs */
      const imml_maxima mm = {NAN, NAN, k_max_abs(n, o->m1),
                              k_max_abs(n, o->m2)};
      imml_cache_note(m, IMML_EV_MOMENTS_MEASURED, &mm);
    }
    /* Neither block handed out: the maxima the library kept suffice. */
    float max_p, max_g;
    if (imml_cache_maxima(m, &max_p, &max_g))
      proven = adamw_bound(&k, max_p, max_g, c->max1, c->max2);
    if (!proven) {
      run_pass(&j, n, PASS_MAXIMA);
      proven = adamw_bound(&k, k_bits_float(j.out[0][0]),
                           k_bits_float(j.out[0][1]), c->max1, c->max2);
    }
  }
  if (!proven && (run_pass(&j, n, PASS_CHECK) & 0x80000000u)) {
    if (!k_all_finite(n, G))
      return imml_fail(m, IMML_ERR_NONFINITE,
                       "gradients are not finite; the step was refused and "
                       "nothing changed");
    return imml_fail(m, IMML_ERR_NONFINITE,
                     "the update would make a parameter or a moment "
                     "non-finite (lr %g too large?); nothing changed",
                     (double)k.lr);
  }
  run_pass(&j, n, PASS_COMMIT);
  const imml_maxima after = {k_bits_float(j.out[0][2]), 0.0f,
                             k_bits_float(j.out[0][0]),
                             k_bits_float(j.out[0][1])};
  imml_cache_note(m, IMML_EV_STEPPED, adamw ? &after : NULL);
  o->t++;
  o->has_buf = o->has_buf || (!adamw && k.mom != 0.0f);
  return IMML_OK;
}
