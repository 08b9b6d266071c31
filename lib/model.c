/* Model lifetime, forward/backward orchestration, warm-up and the choice
 * of the predominant modality (METHOD.md section 5), and the parameter
 * API. */
#include "bf16.h"
#include "cache.h"
#include "internal.h"
#include "kernels.h"

#include <float.h>
#include <math.h>
#include <string.h>

static int max_int(int a, int b) { return a > b ? a : b; }

static size_t dict_bytes(const imml_model *m) {
  return (size_t)m->cfg.dict_size * (size_t)m->cfg.n_modalities *
         (size_t)m->cfg.knowledge_dim * sizeof(float);
}

/* Carves the whole arena; with c->base NULL it only measures. */
static void carve_model(imml_carver *c, imml_model *m) {
  const imml_config *cfg = &m->cfg;
  const size_t B = (size_t)cfg->max_batch, k = (size_t)cfg->knowledge_dim,
               C = (size_t)cfg->n_classes, H = (size_t)cfg->hidden_dim,
               J = (size_t)m->jmax, M = (size_t)cfg->n_modalities;
  imml_grads_scratch *g = &m->g;
  m->params = imml_carve(c, m->n_params, sizeof(float));
  m->grads = imml_carve(c, m->n_params, sizeof(float));
  m->stage = imml_carve(c, m->n_params, sizeof(float));
  size_t dict_n;
  if (!imml_size_mul(&dict_n, (size_t)cfg->dict_size, M * k))
    c->overflow = 1;
  m->dict = imml_carve(c, dict_n, sizeof(float));
  m->acc.rows = imml_carve(c, dict_n, sizeof(float));
  imml_carve_acts(c, cfg, m->jmax, 1, &m->train, &m->train_att);
  imml_carve_acts(c, cfg, m->jmax, 0, &m->eval, &m->eval_att);
  g->dlogits = imml_carve(c, B * C, sizeof(float));
  for (size_t mm = 0; mm < M; mm++) {
    g->dslot[mm] = imml_carve(c, B * k, sizeof(float));
    g->dz[mm] = imml_carve(c, B * k, sizeof(float));
  }
  g->dn_p = imml_carve(c, B * k, sizeof(float));
  g->dn_a = imml_carve(c, B * k, sizeof(float));
  g->ds = imml_carve(c, B * B, sizeof(float));
  g->dst = imml_carve(c, B * B, sizeof(float));
  m->train_att.dw = imml_carve(c, B * J, sizeof(float));
  m->train_att.de = imml_carve(c, B * J, sizeof(float));
  g->dq = imml_carve(c, B * k, sizeof(float));
  m->train_att.dk = imml_carve(c, J * k, sizeof(float));
  g->dqk = imml_carve(c, B * M * k, sizeof(float));
  g->dout = imml_carve(c, B * C, sizeof(float));
  g->du = imml_carve(c, B * H, sizeof(float));
}

/* A model over its memory limit (or whose sizes saturate): the message
 * names the limit's field and the sizes, and the handle itself becomes the
 * failed handle that carries it (a refused model allocates nothing
 * else). */
static imml_status refuse_too_large(imml_model *m, const char *limit_name,
                                    int saturated, size_t total, size_t arena,
                                    size_t extra_bytes, size_t gemm_bytes,
                                    char *err, size_t n) {
  const imml_config *cfg = &m->cfg;
  if (saturated)
    imml_set_err(err, n,
                 "%s = %zu bytes: the model's sizes overflow (it would need "
                 "more than SIZE_MAX bytes; max_batch %d, dict_size %d, "
                 "hidden_dim %d)",
                 limit_name, cfg->memory_limit, cfg->max_batch, cfg->dict_size,
                 cfg->hidden_dim);
  else
    imml_set_err(err, n,
                 "%s = %zu bytes: the model needs %zu bytes (arena %zu, "
                 "optimiser state %zu, bf16 scratch %zu; max_batch %d, "
                 "dict_size %d, hidden_dim %d, knowledge_dim %d, "
                 "n_classes %d, n_modalities %d)",
                 limit_name, cfg->memory_limit, total, arena, extra_bytes,
                 gemm_bytes, cfg->max_batch, cfg->dict_size, cfg->hidden_dim,
                 cfg->knowledge_dim, cfg->n_classes, cfg->n_modalities);
  const imml_allocator keep = m->alloc;
  memset(m, 0, sizeof *m);
  m->alloc = keep;
  m->failed = 1;
  imml_set_err(m->errmsg, sizeof m->errmsg, "%s", err ? err : "");
  return IMML_ERR_TOO_LARGE;
}

/* The state a new arena starts in: gradients and the dictionary at zero
 * (parameters are initialised or loaded next; activation and scratch
 * buffers are always written first, so an arena sized for a large
 * max_batch costs address space, not touched memory), the named views,
 * and the predominant modality (METHOD.md section 5). */
static void start_state(imml_model *m) {
  const imml_config *cfg = &m->cfg;
  imml_ptensors_point(m, m->params, &m->pt);
  imml_ptensors_point(m, m->grads, &m->gt);
  imml_ptensors_point(m, m->stage, &m->stt);
  memset(m->grads, 0, m->n_params * sizeof(float));
  memset(m->dict, 0, dict_bytes(m));
  imml_cache_note(m, IMML_EV_ARENA_NEW, NULL);
  if (cfg->predominant >= 0) {
    m->p = cfg->predominant;
    m->p_fixed = 1;
  } else if (cfg->warmup_steps == 0) {
    m->p = 0; /* argmin of all-zero EMAs: lowest index */
    m->p_fixed = 1;
  } else {
    m->p = -1;
  }
}

imml_status imml_model_build(const imml_config *cfg, const int *dims,
                             const imml_ft_ops *ft, const char *limit_name,
                             size_t extra_bytes, imml_model **out, char *err,
                             size_t n) {
  imml_model *m = imml_alloc(&cfg->allocator, sizeof *m);
  if (!m) {
    imml_set_err(err, n,
                 "out of memory allocating the model handle (%zu "
                 "bytes)",
                 sizeof *m);
    return IMML_ERR_NOMEM;
  }
  memset(m, 0, sizeof *m);
  m->alloc = cfg->allocator;
  m->cfg = *cfg;
  memcpy(m->dims, dims, (size_t)cfg->n_modalities * sizeof(int));
  m->cfg.dims = m->dims;
  m->builtin_ft = ft == NULL;
  if (ft)
    m->ft = *ft;
  m->jmax = max_int(cfg->dict_size, cfg->max_batch);
  const uint64_t np =
      imml_params_layout(&m->cfg, m->builtin_ft, m->tensors, &m->n_tensors);
  imml_carver c = {NULL, 0, 0};
  if (np > SIZE_MAX / sizeof(float))
    c.overflow = 1;
  m->n_params = (size_t)np;
  if (!c.overflow)
    carve_model(&c, m);
  /* One carver, run to count (sizes saturate at SIZE_MAX), then to carve:
   * the memory limit is checked on the exact count before the arena is
   * allocated. */
  size_t total = c.used;
  /* a bf16 model's product scratch and its threads' work memory for the
   * knowledge network's branches (lib/bf16.c, mdken.c) count too */
  size_t work = 0, gemm_bytes = 0;
  const int bf16 = cfg->precision == IMML_PRECISION_BF16;
  int work_ok = 1;
  if (bf16) {
    work = mdken_ctx_work_floats(cfg);
    work_ok = work <= SIZE_MAX / 128;
    gemm_bytes = work_ok ? imml_bf16_ctx_bytes(work) : SIZE_MAX;
  }
  const int saturated = c.overflow || !work_ok ||
                        !imml_size_add(&total, extra_bytes) ||
                        !imml_size_add(&total, gemm_bytes);
  if (saturated || total > cfg->memory_limit) {
    *out = m;
    return refuse_too_large(m, limit_name, saturated, total, c.used,
                            extra_bytes, gemm_bytes, err, n);
  }
  m->arena_bytes = c.used;
  m->arena = imml_alloc(&m->alloc, c.used);
  if (!m->arena) {
    imml_set_err(err, n, "out of memory allocating the %zu-byte arena", c.used);
    imml_free(&m->alloc, m);
    return IMML_ERR_NOMEM;
  }
  if (bf16 && !(m->gemm = imml_bf16_ctx_create(&m->alloc, work))) {
    imml_set_err(err, n,
                 "out of memory allocating the %zu-byte bf16 scratch (or "
                 "its threads' lock)",
                 gemm_bytes);
    imml_free(&m->alloc, m->arena);
    imml_free(&m->alloc, m);
    return IMML_ERR_NOMEM;
  }
  c.base = m->arena;
  c.used = 0;
  carve_model(&c, m);
  start_state(m);
  *out = m;
  return IMML_OK;
}

static void init_params(imml_model *m) {
  imml_rng r;
  imml_rng_seed(&r, m->cfg.seed);
  for (int i = 0; i < m->n_tensors; i++) {
    const imml_tensor *t = &m->tensors[i];
    imml_rng_uniform_init(&r, m->params + t->offset,
                          (size_t)t->rows * (size_t)t->cols, t->fan_in);
  }
}

imml_status imml_model_create(const imml_config *cfg, const imml_ft_ops *ft,
                              imml_model **out) {
  char err[IMML_ERRMSG_SIZE] = "";
  if (!out)
    return IMML_ERR_NULL;
  *out = NULL;
  imml_config c;
  int dims[IMML_MAX_MODALITIES];
  imml_status st = imml_config_validate(cfg, &c, dims, err, sizeof err);
  /* A failed handle uses the caller's allocator once it is known good. */
  const imml_allocator *alloc = st == IMML_OK ? &c.allocator : NULL;
  imml_ft_ops ops;
  if (st == IMML_OK && ft)
    st = imml_ft_validate(ft, &ops, err, sizeof err);
  imml_model *m = NULL;
  if (st == IMML_OK)
    st = imml_model_build(&c, dims, ft ? &ops : NULL, "config.memory_limit", 0,
                          &m, err, sizeof err);
  if (st == IMML_OK)
    init_params(m);
  return imml_hand_out(st, m, alloc, err, out);
}

/* The output direction of the struct rule: the caller's struct_size (set
 * by imml_config_init) says how much it can take, so a program built
 * against an older header never receives a newer library's fields. */
imml_status imml_model_get_config(imml_model *m, imml_config *cfg) {
  IMML_ENTER(m);
  if (!cfg)
    return imml_fail(m, IMML_ERR_NULL, "cfg is NULL: nowhere to copy to");
  size_t size;
  memcpy(&size, cfg, sizeof size);
  if (size < IMML_CONFIG_SIZE_1_0 || size > 4096)
    return imml_fail(m, IMML_ERR_INVALID_ARG,
                     "cfg->struct_size = %zu: call imml_config_init(cfg) "
                     "first, so the library knows how much it may write",
                     size);
  memcpy(cfg, &m->cfg, size < sizeof *cfg ? size : sizeof *cfg);
  memcpy(cfg, &size, sizeof size); /* the caller's size stays */
  return IMML_OK;
}

/* ------------------------------------------------------------------ */

imml_status imml_check_batch(const imml_config *c, int B, const float *const *x,
                             const int *labels, int need_labels, char *err,
                             size_t n) {
  if (B < 1 || B > c->max_batch) {
    imml_set_err(err, n, "batch = %d: must be in 1..max_batch (%d)", B,
                 c->max_batch);
    return IMML_ERR_SHAPE;
  }
  if (!x) {
    imml_set_err(err, n, "features is NULL: pass %d matrix pointers",
                 c->n_modalities);
    return IMML_ERR_NULL;
  }
  for (int mm = 0; mm < c->n_modalities; mm++) {
    if (!x[mm]) {
      imml_set_err(err, n, "features[%d] is NULL", mm);
      return IMML_ERR_NULL;
    }
  }
  for (int mm = 0; mm < c->n_modalities; mm++) {
    const size_t cnt = (size_t)B * (size_t)c->dims[mm];
    if (!k_all_finite(cnt, x[mm])) {
      size_t i = 0;
      while (i < cnt && isfinite(x[mm][i]))
        i++;
      imml_set_err(err, n, "features[%d] row %zu column %zu is %g", mm,
                   i / (size_t)c->dims[mm], i % (size_t)c->dims[mm],
                   (double)x[mm][i]);
      return IMML_ERR_NONFINITE;
    }
  }
  if (need_labels && !labels) {
    imml_set_err(err, n, "labels is NULL: a training forward needs labels");
    return IMML_ERR_NULL;
  }
  if (labels)
    for (int i = 0; i < B; i++)
      if (labels[i] < 0 || labels[i] >= c->n_classes) {
        imml_set_err(err, n, "labels[%d] = %d: must be in 0..%d", i, labels[i],
                     c->n_classes - 1);
        return IMML_ERR_LABEL;
      }
  return IMML_OK;
}

/* The contrastive space of a training forward over a: the gathered
 * global batch of a collective step (coll non-NULL), else the batch
 * itself; ds and dst are the backward's (G, G) or (B, B) scratch (NULL:
 * g NULL, a forward). */
static con_space con_space_of(imml_acts *a, imml_coll *coll,
                              imml_grads_scratch *g) {
  if (coll)
    return (con_space){coll->n,  coll->z,      coll->nz, coll->r,  coll->s,
                       coll->st, coll->labels, coll->ds, coll->dst};
  return (con_space){a->batch,
                     a->z,
                     a->nz,
                     a->r,
                     a->s,
                     a->st,
                     a->labels,
                     g ? g->ds : NULL,
                     g ? g->dst : NULL};
}

/* The attention scratch of a training forward and its backward: the
 * collective's when it has one (a gathered step attends over up to
 * R max_batch strata), else the model's own. */
static const fdc_scratch *train_scratch(const imml_model *m, int gathered) {
  return gathered && m->coll.att.kk ? &m->coll.att : &m->train_att;
}

/* One forward into a.  Evaluations never change m; a collective training
 * forward (coll non-NULL) also fills the gathered buffers in *coll. */
imml_status imml_run_forward(const imml_model *m, imml_acts *a,
                             const fdc_scratch *att, int training, int B,
                             const float *const *h, const int *labels,
                             imml_coll *coll, char *err, size_t n) {
  const imml_config *c = &m->cfg;
  a->batch = B;
  a->has_labels = labels != NULL;
  a->gathered = coll != NULL;
  if (labels)
    memcpy(a->labels, labels, (size_t)B * sizeof(int));
  a->warm = !m->p_fixed;
  a->p = m->p_fixed ? m->p : -1;
  a->losses.con = 0.0;
  mdken_forward(m, a, h);
  if (coll) {
    imml_status st = imml_coll_gather(m, a, coll, err, n);
    if (st != IMML_OK)
      return st;
  }
  if (a->warm) {
    for (int mm = 0; mm < c->n_modalities; mm++)
      memcpy(a->slot[mm], a->z[mm],
             (size_t)B * c->knowledge_dim * sizeof(float));
  } else {
    if (labels) {
      const con_space cs = con_space_of(a, coll, NULL);
      a->losses.con = mdken_contrastive_forward(m, a->p, &cs);
    }
    fdc_view v = fdc_dict_view(m);
    if (v.n == 0) /* empty dictionary: the (global) batch's own knowledge */
      v = coll ? fdc_batch_view(m, (const float *const *)coll->z, coll->n)
               : fdc_batch_view(m, (const float *const *)a->z, B);
    fdc_forward(m, a, att, a->p, (const float *const *)a->z, a->slot, &v);
  }
  int rc = ft_forward(m, a, training);
  if (rc != 0) {
    imml_set_err(err, n, "F&T forward callback returned %d", rc);
    return IMML_ERR_CALLBACK;
  }
  const size_t nl = (size_t)B * c->n_classes;
  if (!k_all_finite(nl, a->logits)) {
    imml_set_err(err, n, "F&T produced non-finite logits%s",
                 m->builtin_ft ? " (parameters or features too large?)"
                               : " (host callback output)");
    return IMML_ERR_NONFINITE;
  }
  if (labels) {
    a->losses.ce = k_xent_forward(B, c->n_classes, a->logits, labels, a->probs);
    a->losses.total = a->losses.ce + (double)c->gamma1 * a->losses.con +
                      (double)c->gamma2 * a->losses.dis;
    if (!isfinite(a->losses.total)) {
      imml_set_err(err, n, "loss is not finite (ce %g, con %g, dis %g)",
                   a->losses.ce, a->losses.con, a->losses.dis);
      return IMML_ERR_NONFINITE;
    }
  } else {
    a->losses.total = a->losses.ce = a->losses.con = a->losses.dis = NAN;
  }
  return IMML_OK;
}

static imml_status forward_call(imml_model *m, imml_mode mode, int B,
                                const float *const *x, const int *labels,
                                float *logits, imml_losses *losses) {
  IMML_ENTER(m);
  if (mode != IMML_MODE_TRAIN && mode != IMML_MODE_EVAL)
    return imml_fail(m, IMML_ERR_INVALID_ARG,
                     "mode = %d: must be IMML_MODE_TRAIN (0) or "
                     "IMML_MODE_EVAL (1)",
                     (int)mode);
  const int training = mode == IMML_MODE_TRAIN;
  if (training && m->parent)
    return imml_fail(m, IMML_ERR_STATE,
                     "a share of a model only evaluates: train the model "
                     "itself");
  imml_status st = imml_check_batch(&m->cfg, B, x, labels, training, m->errmsg,
                                    sizeof m->errmsg);
  if (st != IMML_OK)
    return st;
  imml_share_sync(m);
  imml_acts *a = training ? &m->train : &m->eval;
  const float *const *h = x;
  if (training) {
    m->pending = 0; /* the cached activations are about to change */
    for (int mm = 0; mm < m->cfg.n_modalities; mm++)
      memcpy(a->h[mm], x[mm], (size_t)B * m->cfg.dims[mm] * sizeof(float));
    h = (const float *const *)a->h;
  } else {
    m->eval_valid = 0;
  }
  imml_coll *coll = training && m->coll.active ? &m->coll : NULL;
  const fdc_scratch *att =
      training ? train_scratch(m, coll != NULL) : &m->eval_att;
  st = imml_run_forward(m, a, att, training, B, h, labels, coll, m->errmsg,
                        sizeof m->errmsg);
  if (st != IMML_OK)
    return st;
  if (logits)
    memcpy(logits, a->logits, (size_t)B * m->cfg.n_classes * sizeof(float));
  if (losses)
    *losses = a->losses;
  if (training)
    m->pending = 1; /* an evaluation leaves a pending step pending */
  else
    m->eval_valid = 1;
  return IMML_OK;
}

imml_status imml_forward(imml_model *m, imml_mode mode, int B,
                         const float *const *x, const int *labels,
                         float *logits, imml_losses *losses) {
  return imml_leave(m, forward_call(m, mode, B, x, labels, logits, losses));
}

/* Adds the finished micro-batch to the step: its knowledge rows (the
 * global batch's in a collective step) wait for imml_commit, and so do its
 * unimodal statistics. */
static void stage_micro_batch(imml_model *m) {
  const imml_acts *a = &m->train;
  imml_accum *s = &m->acc;
  const int M = m->cfg.n_modalities;
  if (a->gathered) {
    imml_stage_rows(m, (const float *const *)m->coll.z, m->coll.n);
    s->seen += m->coll.n;
    for (int mm = 0; mm < M; mm++)
      s->ce[mm] += m->coll.ce[mm];
  } else {
    imml_stage_rows(m, (const float *const *)a->z, a->batch);
    s->seen += a->batch;
    for (int mm = 0; mm < M; mm++) {
      s->ce[mm] += a->ce[mm] * a->batch;
      s->ce_one[mm] = a->ce[mm];
    }
  }
  s->gathered = a->gathered;
  s->micro++;
}

/* The lowest of n values (ties: the lowest index). */
static int argmin_f(int n, const float *x) {
  int best = 0;
  for (int i = 1; i < n; i++)
    if (x[i] < x[best])
      best = i;
  return best;
}

/* METHOD.md section 5: e_m <- 0.9 e_m + 0.1 ce_m, ce_m the unimodal head's
 * cross-entropy over the step's batch (the union of its micro-batches, or
 * of every rank's rows), evaluated in double and rounded once; after the
 * step that completes warm-up, p is the modality with the lowest e_m (ties:
 * the lowest index). */
static void advance_warmup(imml_model *m) {
  const int M = m->cfg.n_modalities;
  if (m->p_fixed)
    return;
  for (int mm = 0; mm < M; mm++) {
    /* one local micro-batch: its own mean, not (mean B) / B */
    double ce = m->acc.micro == 1 && !m->acc.gathered
                    ? m->acc.ce_one[mm]
                    : m->acc.ce[mm] / (double)m->acc.seen;
    if (ce > FLT_MAX) /* logits near FLT_MAX: keep the EMA finite */
      ce = FLT_MAX;
    m->ema[mm] = (float)(0.9 * (double)m->ema[mm] + 0.1 * ce);
  }
  m->steps++;
  if (m->steps >= m->cfg.warmup_steps) {
    m->p = argmin_f(M, m->ema);
    m->p_fixed = 1;
  }
}

/* Forgets the step's micro-batches (after a commit). */
static void accum_reset(imml_accum *s) {
  s->micro = 0;
  s->n = 0;
  s->pos = 0;
  s->adv = 0;
  s->seen = 0;
  memset(s->ce, 0, sizeof s->ce);
}

/* The name of the first tensor of a parameter-shaped block G holding a
 * value that is not finite. */
static const char *nonfinite_tensor(const imml_model *m, const float *G) {
  for (int i = 0; i < m->n_tensors; i++) {
    const imml_tensor *t = &m->tensors[i];
    if (!k_all_finite((size_t)t->rows * t->cols, G + t->offset))
      return t->name;
  }
  return "a parameter";
}

static imml_status backward_call(imml_model *m, float *const *dh) {
  IMML_ENTER_TRAIN(m);
  if (!m->pending)
    return imml_fail(m, IMML_ERR_STATE,
                     "imml_backward needs a successful training forward "
                     "(IMML_MODE_TRAIN) since the last backward");
  const imml_config *c = &m->cfg;
  imml_acts *a = &m->train;
  const int B = a->batch, M = c->n_modalities;
  const size_t np = m->n_params;
  /* When the gradients are all +0.0 (the usual case after imml_grad_zero
   * or imml_optim_step), this step accumulates into them directly and a
   * refused step restores them with one memset.  Otherwise it is computed
   * in the staging buffer and added only once it has been checked.  The
   * zeros are checked only if the host holds a pointer to the gradients. */
  const int direct = imml_cache_grads_zero(m);
  float *G = direct ? m->grads : m->stage;
  const imml_ptensors *dG = direct ? &m->gt : &m->stt;
  if (!direct)
    memset(G, 0, np * sizeof(float));
  /* In a collective step, scale so that the mean over ranks of every
   * rank's gradient is the single-process gradient of the global batch:
   * the rank's own means weigh B/G of the global ones, and the global L_con
   * is differentiated here for this rank's rows only. */
  const int gathered = a->gathered;
  const float ce_scale =
      gathered ? (float)((double)m->coll.ops.world_size * B / m->coll.n) : 1.0f;
  const float con_scale = gathered ? (float)m->coll.ops.world_size : 1.0f;
  const int off = gathered ? m->coll.off : 0;
  /* dlogits (B, C) = ce_scale (softmax - onehot) / B */
  k_xent_backward(B, c->n_classes, a->probs, a->labels, ce_scale, m->g.dlogits,
                  0.0f);
  imml_status st = IMML_OK;
  int rc = ft_backward(m, a, &m->g, dG);
  if (rc != 0) {
    st = imml_fail(m, IMML_ERR_CALLBACK,
                   "F&T backward callback returned %d; nothing changed", rc);
    goto refuse;
  }
  for (int mm = 0; mm < M; mm++)
    if (!k_all_finite((size_t)B * c->knowledge_dim, m->g.dslot[mm])) {
      st = imml_fail(m, IMML_ERR_NONFINITE,
                     "F&T backward gave non-finite dL/dslot[%d]; nothing "
                     "changed",
                     mm);
      goto refuse;
    }
  fdc_backward(m, a, train_scratch(m, gathered), &m->g, dG);
  const con_space cs = con_space_of(a, gathered ? &m->coll : NULL, &m->g);
  mdken_backward(m, a, &m->g, &cs, dG, dh, off, con_scale, ce_scale);
  /* One check over the whole block (its largest magnitude: infinity or NaN
   * when a value is not finite); only a failure looks for the tensor to
   * name (the tensors tile [0, n_params)). */
  const float gmax = imml_par_max_abs(np, G);
  if (!(gmax <= FLT_MAX)) {
    st = imml_fail(m, IMML_ERR_NONFINITE,
                   "gradient of %s is not finite; the micro-batch was "
                   "refused and nothing changed",
                   nonfinite_tensor(m, G));
    goto refuse;
  }
  if (!direct)
    for (size_t i = 0; i < np; i++)
      m->grads[i] += G[i];
  /* a sum's maximum is not known */
  const imml_maxima added = {NAN, direct ? gmax : NAN, NAN, NAN};
  imml_cache_note(m, IMML_EV_GRADS_ADDED, &added);
  stage_micro_batch(m);
  m->pending = 0;
  return IMML_OK;
refuse:
  if (direct)
    memset(m->grads, 0, np * sizeof(float));
  return st;
}

imml_status imml_backward(imml_model *m, float *const *dh) {
  return imml_leave(m, backward_call(m, dh));
}

imml_status imml_commit(imml_model *m) {
  IMML_ENTER_TRAIN(m);
  imml_accum *s = &m->acc;
  if (s->micro == 0)
    return imml_fail(m, IMML_ERR_STATE,
                     "imml_commit needs at least one successful imml_backward "
                     "since the last commit");
  /* the pending forward attended over this dictionary: its backward must
   * run before the commit changes it */
  if (m->pending)
    return imml_fail(m, IMML_ERR_STATE,
                     "a training forward awaits its backward: call "
                     "imml_backward (or start the next step's forward after "
                     "the commit)");
  /* The step's last min(n, J) rows, oldest first, written so that they
   * end where K successive pushes would have left the ring. */
  const int J = m->cfg.dict_size;
  const int cnt = s->n <= (size_t)J ? (int)s->n : J;
  m->dict_pos = (m->dict_pos + s->adv + J - cnt) % J;
  fdc_push_entries(m, s->rows, s->n <= (size_t)J ? 0 : s->pos, cnt);
  advance_warmup(m);
  accum_reset(s);
  return IMML_OK;
}

static imml_status fdc_adjust_call(imml_model *m, int B, const float *const *z,
                                   float *const *slots) {
  IMML_ENTER(m);
  const imml_config *c = &m->cfg;
  const int k = c->knowledge_dim, M = c->n_modalities;
  if (B < 1 || B > c->max_batch)
    return imml_fail(m, IMML_ERR_SHAPE,
                     "batch = %d: must be in 1..max_batch (%d)", B,
                     c->max_batch);
  if (!z || !slots)
    return imml_fail(m, IMML_ERR_NULL, "%s is NULL", z ? "slots" : "knowledge");
  for (int mm = 0; mm < M; mm++) {
    if (!z[mm] || !slots[mm])
      return imml_fail(m, IMML_ERR_NULL, "%s[%d] is NULL",
                       z[mm] ? "slots" : "knowledge", mm);
    if (!k_all_finite((size_t)B * k, z[mm]))
      return imml_fail(m, IMML_ERR_NONFINITE,
                       "knowledge[%d] holds NaN or infinity", mm);
  }
  /* the slots are written at once (on several threads in bf16) */
  const uintptr_t bytes = (uintptr_t)B * k * sizeof(float);
  for (int mm = 0; mm < M; mm++)
    for (int nn = 0; nn < mm; nn++) {
      const uintptr_t x = (uintptr_t)slots[mm], y = (uintptr_t)slots[nn];
      if (x < y + bytes && y < x + bytes)
        return imml_fail(m, IMML_ERR_INVALID_ARG,
                         "slots[%d] and slots[%d] overlap: each modality "
                         "needs a B x k output of its own",
                         nn, mm);
    }
  imml_share_sync(m);
  imml_acts *a = &m->eval;
  m->eval_valid = 0; /* the attention scratch is about to change */
  a->batch = B;
  if (!m->p_fixed) {
    for (int mm = 0; mm < M; mm++)
      memmove(slots[mm], z[mm], (size_t)B * k * sizeof(float));
    return IMML_OK;
  }
  fdc_view v = fdc_dict_view(m);
  if (v.n == 0)
    v = fdc_batch_view(m, z, B);
  fdc_forward(m, a, &m->eval_att, m->p, z, slots, &v);
  return IMML_OK;
}

imml_status imml_fdc_adjust(imml_model *m, int B, const float *const *z,
                            float *const *slots) {
  return imml_leave(m, fdc_adjust_call(m, B, z, slots));
}

int imml_fdc_dict_fill(const imml_model *m) {
  if (!m || m->failed)
    return 0;
  return m->parent ? m->parent->dict_fill : m->dict_fill;
}

/* ------------------------------------------------------------------ */

int imml_param_count(const imml_model *m) {
  return m && !m->failed && !m->parent ? m->n_tensors : 0;
}

static void param_view(imml_model *m, int i, imml_param_view *v) {
  const imml_tensor *t = &m->tensors[i];
  v->name = t->name;
  v->rows = t->rows;
  v->cols = t->cols;
  v->data = m->params + t->offset;
  v->grad = m->grads + t->offset;
  imml_cache_note(m, IMML_EV_PARAMS_EXPOSED, NULL);
  imml_cache_note(m, IMML_EV_GRADS_EXPOSED, NULL);
}

imml_status imml_param_get(imml_model *m, int i, imml_param_view *v) {
  IMML_ENTER_TRAIN(m);
  if (!v)
    return imml_fail(m, IMML_ERR_NULL, "view is NULL");
  if (i < 0 || i >= m->n_tensors)
    return imml_fail(m, IMML_ERR_INVALID_ARG,
                     "parameter index %d: must be in 0..%d", i,
                     m->n_tensors - 1);
  param_view(m, i, v);
  return IMML_OK;
}

imml_status imml_param_find(imml_model *m, const char *name,
                            imml_param_view *v) {
  IMML_ENTER_TRAIN(m);
  if (!name || !v)
    return imml_fail(m, IMML_ERR_NULL, "%s is NULL", name ? "view" : "name");
  for (int i = 0; i < m->n_tensors; i++)
    if (strcmp(m->tensors[i].name, name) == 0) {
      param_view(m, i, v);
      return IMML_OK;
    }
  return imml_fail(m, IMML_ERR_INVALID_ARG,
                   "no parameter is called '%.40s' (names: m0.w1 .. m%d.bc, "
                   "fdc.wq, fdc.wk%s)",
                   name, m->cfg.n_modalities - 1,
                   m->builtin_ft ? ", ft.w, ft.b" : "");
}

imml_status imml_param_flat(imml_model *m, float **data, float **grad,
                            size_t *count) {
  IMML_ENTER_TRAIN(m);
  if (data) {
    *data = m->params;
    imml_cache_note(m, IMML_EV_PARAMS_EXPOSED, NULL);
  }
  if (grad) {
    *grad = m->grads;
    imml_cache_note(m, IMML_EV_GRADS_EXPOSED, NULL);
  }
  if (count)
    *count = m->n_params;
  return IMML_OK;
}

imml_status imml_grad_zero(imml_model *m) {
  IMML_ENTER_TRAIN(m);
  memset(m->grads, 0, m->n_params * sizeof(float));
  imml_cache_note(m, IMML_EV_GRADS_ZEROED, NULL);
  return IMML_OK;
}

imml_status imml_predominant_get(imml_model *m, int *p, int *fixed) {
  IMML_ENTER(m);
  if (!p)
    return imml_fail(m, IMML_ERR_NULL, "p is NULL");
  imml_share_sync(m);
  *p = m->p_fixed ? m->p : -1;
  if (fixed)
    *fixed = m->p_fixed;
  return IMML_OK;
}

imml_status imml_predominant_set(imml_model *m, int p) {
  IMML_ENTER_TRAIN(m);
  const int M = m->cfg.n_modalities;
  if (p < 0 || p >= M)
    return imml_fail(m, IMML_ERR_INVALID_ARG,
                     "p = %d: must be a modality in 0..%d", p, M - 1);
  if (m->p_fixed)
    return imml_fail(m, IMML_ERR_STATE,
                     "the predominant modality is already fixed (p = %d)",
                     m->p);
  if (m->pending || m->acc.micro > 0)
    return imml_fail(m, IMML_ERR_STATE,
                     "a training step is under way (%s): fix p between steps",
                     m->pending ? "a training forward awaits its backward"
                                : "micro-batches are not committed");
  m->p = p;
  m->p_fixed = 1;
  return IMML_OK;
}

imml_status imml_warmup_get(imml_model *m, int *steps, float *ema) {
  IMML_ENTER(m);
  imml_share_sync(m);
  if (steps)
    *steps = m->steps;
  if (ema)
    memcpy(ema, m->ema, (size_t)m->cfg.n_modalities * sizeof(float));
  return IMML_OK;
}

/* ------------------------------------------------------------------ */
