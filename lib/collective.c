/* Data-parallel training (doc/DISTRIBUTED.md): the host's allgather
 * attached to a model (imml_collective_set), and the one message a
 * collective training forward gathers: every rank's batch size, fixed
 * predominant modality, unimodal cross-entropy sums, labels and knowledge
 * rows, unpacked into the global batch the contrastive loss, an empty
 * dictionary's strata, the warm-up and the commit then use. */
#include "internal.h"
#include "kernels.h"

#include <float.h>
#include <string.h>

/* Packs this rank's batch size, fixed predominant modality, unimodal
 * cross-entropy sums, labels and knowledge into one message, allgathers
 * it, and unpacks the global batch in rank order.  The message has the same
 * length for every batch size, so ranks with different shard sizes still
 * agree on the count.  A cross-entropy sum (double) travels as two floats,
 * hi = (float)x and lo = (float)(x - hi), which keep about 48 bits. */
/* This rank's message: batch size, p (-1: not fixed), the unimodal CE
 * sums as hi/lo float pairs, labels, then knowledge, each in a fixed slot
 * sized for max_batch. */
static void pack_message(const imml_model *m, const imml_acts *a,
                         imml_coll *g) {
  const imml_config *c = &m->cfg;
  const int M = c->n_modalities, k = c->knowledge_dim, Bmax = c->max_batch;
  const int B = a->batch;
  float *snd = g->send;
  memset(snd, 0, g->count * sizeof(float));
  snd[0] = (float)B;
  snd[1] = (float)(m->p_fixed ? m->p : -1);
  for (int mm = 0; mm < M; mm++) {
    const double sum = a->ce[mm] * B;
    const float hi = (float)sum;
    snd[2 + 2 * mm] = hi;
    snd[3 + 2 * mm] = (float)(sum - (double)hi);
  }
  float *lab = snd + 2 + 2 * M;
  for (int i = 0; i < B; i++)
    lab[i] = (float)a->labels[i];
  float *zz = lab + Bmax;
  for (int mm = 0; mm < M; mm++)
    memcpy(zz + (size_t)mm * Bmax * k, a->z[mm], (size_t)B * k * sizeof(float));
}

imml_status imml_coll_gather(const imml_model *m, imml_acts *a, imml_coll *g,
                             char *err, size_t n) {
  const imml_config *c = &m->cfg;
  const int M = c->n_modalities, k = c->knowledge_dim, Bmax = c->max_batch,
            R = g->ops.world_size;
  const int B = a->batch;
  const float *snd = g->send;
  pack_message(m, a, g);
  int rc = g->ops.allgather(g->ops.user_data, g->send, g->count, g->recv);
  if (rc != 0) {
    imml_set_err(err, n, "allgather callback returned %d", rc);
    return IMML_ERR_CALLBACK;
  }
  int rows = 0;
  for (int mm = 0; mm < M; mm++)
    g->ce[mm] = 0.0;
  for (int r = 0; r < R; r++) {
    const float *msg = g->recv + (size_t)r * g->count;
    const float fb = msg[0];
    if (!(fb >= 1.0f && fb <= (float)Bmax) || fb != (float)(int)fb) {
      imml_set_err(err, n,
                   "allgather: rank %d sent batch size %g (must be "
                   "in 1..%d); is every rank in the same step?",
                   r, (double)fb, Bmax);
      return IMML_ERR_SHAPE;
    }
    const int br = (int)fb;
    if (r == g->ops.rank && br != B) {
      imml_set_err(err, n,
                   "allgather returned %d rows for this rank (%d "
                   "sent): the callback mixed up ranks",
                   br, B);
      return IMML_ERR_CALLBACK;
    }
    if (r == g->ops.rank)
      g->off = rows;
    if (msg[1] != snd[1]) {
      imml_set_err(err, n,
                   "allgather: rank %d has predominant modality %g, this rank "
                   "%g (-1: not fixed): every rank must fix the same p "
                   "(imml_predominant_set) before the same step",
                   r, (double)msg[1], (double)snd[1]);
      return IMML_ERR_STATE;
    }
    for (int mm = 0; mm < M; mm++) {
      /* a rank's sum of br cross-entropies, each at most 2 FLT_MAX (two
       * finite logits apart); both halves finite */
      const float hi = msg[2 + 2 * mm], lo = msg[3 + 2 * mm];
      const double sum = (double)hi + (double)lo;
      if (!(hi <= FLT_MAX && hi >= -FLT_MAX && lo <= FLT_MAX &&
            lo >= -FLT_MAX && sum >= 0.0 &&
            sum <= 2.0 * (double)FLT_MAX * br)) {
        imml_set_err(err, n,
                     "allgather: rank %d sent a cross-entropy sum of %g for "
                     "modality %d (must be finite and >= 0)",
                     r, sum, mm);
        return IMML_ERR_CALLBACK;
      }
      g->ce[mm] += sum;
    }
    const float *rl = msg + 2 + 2 * M;
    for (int i = 0; i < br; i++) {
      const float fl = rl[i];
      if (!(fl >= 0.0f && fl < (float)c->n_classes) || fl != (float)(int)fl) {
        imml_set_err(err, n, "allgather: rank %d label %d is %g", r, i,
                     (double)fl);
        return IMML_ERR_LABEL;
      }
      g->labels[rows + i] = (int)fl;
    }
    const float *rz = rl + Bmax;
    for (int mm = 0; mm < M; mm++) {
      const float *src = rz + (size_t)mm * Bmax * k;
      if (!k_all_finite((size_t)br * k, src)) {
        imml_set_err(err, n,
                     "allgather: rank %d knowledge of modality %d is "
                     "not finite",
                     r, mm);
        return IMML_ERR_NONFINITE;
      }
      memcpy(g->z[mm] + (size_t)rows * k, src, (size_t)br * k * sizeof(float));
    }
    rows += br;
  }
  g->n = rows;
  return IMML_OK;
}

/* Detaches the collective and frees its block. */
static void coll_release(imml_model *m) {
  imml_free(&m->alloc, m->coll.block);
  memset(&m->coll, 0, sizeof m->coll);
}

/* Carves (or, with cv->base NULL, counts) the collective's buffers for R
 * ranks of up to Bm rows: the message, the gathered batch and its
 * contrastive scratch, and attention scratch when R Bm exceeds jmax. */
static void carve_coll(imml_carver *cv, imml_coll *g, size_t M, size_t k,
                       size_t Bm, size_t R, size_t jmax) {
  size_t G = 0, GG = 0, rk = 0;
  if (!imml_size_mul(&G, R, Bm) || !imml_size_mul(&GG, G, G) ||
      !imml_size_mul(&rk, R, g->count))
    cv->overflow = 1;
  g->send = imml_carve(cv, g->count, sizeof(float));
  g->recv = imml_carve(cv, rk, sizeof(float));
  for (size_t mm = 0; mm < M; mm++) {
    g->z[mm] = imml_carve(cv, G * k, sizeof(float));
    g->nz[mm] = imml_carve(cv, G * k, sizeof(float));
    g->r[mm] = imml_carve(cv, G, sizeof(float));
    g->s[mm] = imml_carve(cv, GG, sizeof(float));
    g->st[mm] = imml_carve(cv, GG, sizeof(float));
  }
  g->ds = imml_carve(cv, GG, sizeof(float));
  g->dst = imml_carve(cv, GG, sizeof(float));
  g->labels = imml_carve(cv, G, sizeof(int));
  if (G > jmax) {
    /* kk (G, k), alpha, w, dw, de (Bmax, G), dk (G, k) */
    size_t gk = 0, bg = 0;
    if (!imml_size_mul(&gk, G, k) || !imml_size_mul(&bg, Bm, G))
      cv->overflow = 1;
    g->att.kk = imml_carve(cv, gk, sizeof(float));
    g->att.alpha = imml_carve(cv, bg, sizeof(float));
    g->att.w = imml_carve(cv, bg, sizeof(float));
    g->att.dw = imml_carve(cv, bg, sizeof(float));
    g->att.de = imml_carve(cv, bg, sizeof(float));
    g->att.dk = imml_carve(cv, gk, sizeof(float));
  }
}

void imml_collective_init(imml_collective *c) {
  if (!c)
    return;
  memset(c, 0, sizeof *c);
  c->struct_size = sizeof *c;
  c->world_size = 1;
}

imml_status imml_collective_set(imml_model *m, const imml_collective *in) {
  IMML_ENTER_TRAIN(m);
  if (m->pending || m->acc.micro > 0)
    return imml_fail(
        m, IMML_ERR_STATE, "a training step is under way: %s first",
        m->pending ? "call imml_backward and imml_commit" : "call imml_commit");
  if (!in) {
    coll_release(m);
    return IMML_OK;
  }
  imml_collective cv_in;
  imml_collective_init(&cv_in);
  imml_status st_in =
      imml_struct_in(&cv_in, sizeof cv_in, IMML_COLLECTIVE_SIZE_KNOWN,
                     IMML_COLLECTIVE_SIZE_1_0, in, "imml_collective",
                     "imml_collective_init", m->errmsg, sizeof m->errmsg);
  if (st_in != IMML_OK)
    return st_in;
  const imml_collective *ops = &cv_in;
  if (!ops->allgather)
    return imml_fail(m, IMML_ERR_NULL, "collective.allgather is NULL");
  if (ops->world_size < 1 || ops->world_size > (1 << 16))
    return imml_fail(m, IMML_ERR_INVALID_ARG,
                     "collective.world_size = %d: must be in 1..65536",
                     ops->world_size);
  if (ops->rank < 0 || ops->rank >= ops->world_size)
    return imml_fail(m, IMML_ERR_INVALID_ARG,
                     "collective.rank = %d: must be in 0..%d", ops->rank,
                     ops->world_size - 1);
  const imml_config *c = &m->cfg;
  const size_t M = (size_t)c->n_modalities, k = (size_t)c->knowledge_dim,
               Bm = (size_t)c->max_batch, R = (size_t)ops->world_size;
  imml_coll g;
  memset(&g, 0, sizeof g);
  g.ops = *ops;
  g.ops.struct_size = sizeof g.ops;
  g.count = 2 + 2 * M + Bm * (1 + M * k);
  imml_carver cv = {NULL, 0, 0};
  for (int pass = 0; pass < 2; pass++) {
    carve_coll(&cv, &g, M, k, Bm, R, (size_t)m->jmax);
    if (cv.overflow)
      return imml_fail(m, IMML_ERR_TOO_LARGE,
                       "world_size %d x max_batch %d: gathered buffers "
                       "overflow",
                       ops->world_size, c->max_batch);
    if (pass == 0) {
      g.block = imml_alloc(&m->alloc, cv.used);
      if (!g.block)
        return imml_fail(m, IMML_ERR_NOMEM,
                         "out of memory for %zu bytes of gathered buffers",
                         cv.used);
      cv.base = g.block;
      cv.used = 0;
    }
  }
  coll_release(m);
  m->coll = g;
  m->coll.active = 1;
  return IMML_OK;
}
